"""split: layout, sizes, names, index, manifest, sidecars, resume, refusals."""

from __future__ import annotations

import errno
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from click.testing import CliRunner

import safeshard
from helpers.splitkit import (
    all_tensor_bytes,
    folder_hashes,
    gptq_llama,
    llama,
    sha256,
    tensor_bytes,
    write_custom,
    write_official,
)
from safeshard.checkpoint import read_header, read_index, read_manifest
from safeshard.cli import main
from safeshard.errors import (
    DiskFullError,
    OutputExistsError,
    OutputFolderMissingError,
    OutputLockedError,
    OversizeTensorError,
    UsageError,
)
from safeshard.format.blocks import model_order, split_block
from safeshard.format.filenames import TMP_PREFIX
from safeshard.format.header import TensorSpec, build_header
from safeshard.format.index import SHARD_RE
from safeshard.format.manifest import header_digest
from safeshard.io.localfs import DirLock
from safeshard.io.transaction import JOURNAL_NAME

split_mod = importlib.import_module("safeshard.ops.split")
GPTQ_META = {"format": "pt", "gptq_bits": "4", "gptq_group_size": "32"}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A folder with an AutoGPTQ-style single file, its configs and other files."""
    folder = tmp_path / "src"
    write_official(folder / "gptq_model-4bit-32g.safetensors", gptq_llama(), GPTQ_META)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "README.md").write_text("# model\n")
    return folder


def weights(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def shard_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.safetensors"))


# --------------------------------------------------------------------------- layout and sizes


@pytest.mark.parametrize("cap", [20_000, 30_000, 45_000, 70_000, 10**9])
@pytest.mark.parametrize("balance", [False, True])
def test_files_within_cap_and_blocks_whole(
    src: Path, tmp_path: Path, cap: int, balance: bool
) -> None:
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=cap, balance=balance)
    files = shard_files(out)
    assert [f.name for f in files] == [f.file for f in r.files]
    where: dict[str, set[str]] = {}
    for f in files:
        assert f.stat().st_size <= cap
        assert f.stat().st_size == next(x.size for x in r.files if x.file == f.name)
        for t in read_header(f).tensors:
            b = split_block(t.name)
            if b is not None:
                where.setdefault(f"{b[0]}.{b[1]}", set()).add(f.name)
    for block, names in where.items():
        assert len(names) == 1 or block in r.plan.split_groups, block
    assert all_tensor_bytes(out) == tensor_bytes(weights(src))


def test_block_larger_than_cap_is_split_between_modules(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=12_000)
    assert r.plan.split_groups  # a whole block is ~20 KB here
    for f in shard_files(out):
        assert f.stat().st_size <= 12_000
        modules: dict[str, set[str]] = {}
        for t in read_header(f).tensors:
            modules.setdefault(t.name.rsplit(".", 1)[0], set()).add(t.name.rsplit(".", 1)[1])
        for mod, parts in modules.items():
            if "qweight" in parts:  # a quantized module is never split at this cap
                assert parts == {"qweight", "qzeros", "scales", "g_idx"}, mod


def test_data_in_model_order_and_metadata_kept(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    safeshard.split(src, out, max_shard_size=40_000)
    names: list[str] = []
    for f in shard_files(out):
        h = read_header(f)
        assert h.metadata == GPTQ_META
        assert h.header_len % 8 == 0
        names += [t.name for t in h.tensors]
    assert names == model_order(list(gptq_llama()))
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"


def test_every_shard_loads_with_official_safetensors(src: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "out"
    safeshard.split(src, out, max_shard_size=30_000)
    expected = tensor_bytes(weights(src))
    seen = 0
    for f in shard_files(out):
        with safe_open(str(f), framework="numpy") as g:
            assert g.metadata() == GPTQ_META
            for k in g.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert g.get_tensor(k).tobytes() == expected[k]
                seen += 1
    assert seen == len(expected)


def test_deterministic(src: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    safeshard.split(src, a, max_shard_size=30_000, balance=True)
    safeshard.split(src, b, max_shard_size=30_000, balance=True)
    assert folder_hashes(a) == folder_hashes(b)


# --------------------------------------------------------------------------- names and index


def test_names_index_and_manifest_exactly(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=30_000)
    n = len(r.files)
    assert n > 2
    assert [f.file for f in r.files] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    idx_path = out / "model.safetensors.index.json"
    obj = json.loads(idx_path.read_text())
    assert list(obj) == ["metadata", "weight_map"]
    assert obj["metadata"] == {
        "total_size": sum(len(v) for v in tensor_bytes(weights(src)).values())
    }
    assert list(obj["weight_map"]) == sorted(obj["weight_map"])
    for f in shard_files(out):
        for t in read_header(f).tensors:
            assert obj["weight_map"][t.name] == f.name
    assert read_index(idx_path).total_size == r.total_size
    man = read_manifest(out, "model")
    assert man is not None
    assert [(s.file, s.size, s.header, s.sha256) for s in man.shards] == [
        (f.name, f.stat().st_size, header_digest(header_bytes(f)), None) for f in shard_files(out)
    ]
    src_bytes = tensor_bytes(weights(src))
    assert {k: v.digest for k, v in man.tensors.items()} == {
        k: xxhash.xxh3_128(v).hexdigest() for k, v in src_bytes.items()
    }
    assert man.source is not None
    assert man.source.file == weights(src).name
    assert man.source.header_bytes == read_header(weights(src)).raw
    assert [f.sha256 for f in r.files] == [None] * n  # SHA-256 only when asked for
    assert not (out / JOURNAL_NAME).exists()
    assert not list(out.glob(TMP_PREFIX + "*"))
    assert not (out / ".safeshard.lock").exists()


def header_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: 8 + int.from_bytes(data[:8], "little")]


def test_sha256_when_asked_equals_sha256sum_of_each_shard(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=30_000, sha256=True)
    man = read_manifest(out, "model")
    assert man is not None and len(man.shards) > 2
    assert [s.sha256 for s in man.shards] == [sha256(f) for f in shard_files(out)]
    assert [f.sha256 for f in r.files] == [sha256(f) for f in shard_files(out)]
    assert all(s.header is not None for s in man.shards)


def test_single_shard_is_one_file_without_index(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = safeshard.split(src, out)
    assert [f.name for f in shard_files(out)] == ["model.safetensors"]
    assert r.index is None and r.single_file
    assert not list(out.glob("*.index.json"))
    assert any("one file" in n for n in r.notes)
    assert tensor_bytes(out / "model.safetensors") == tensor_bytes(weights(src))


def test_name_option_and_quantize_config_rewrite(src: Path, tmp_path: Path) -> None:
    (src / "quantize_config.json").write_text(
        json.dumps({"bits": 4, "group_size": 32, "model_file_base_name": "gptq_model-4bit-32g"})
    )
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=30_000, name="mymodel")
    n = len(r.files)
    assert (out / "mymodel.safetensors.index.json").is_file()
    assert (out / "mymodel.safeshard.json").is_file()
    assert all(SHARD_RE.match(f.name)["base"] == "mymodel" for f in shard_files(out))  # type: ignore[index]
    assert (out / f"mymodel-00001-of-{n:05d}.safetensors").is_file()
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc == {"bits": 4, "group_size": 32, "model_file_base_name": "mymodel"}
    assert any("model_file_base_name" in n for n in r.notes)
    # default name: the explicit base name is rewritten to "model"
    out2 = tmp_path / "out2"
    safeshard.split(src, out2, max_shard_size=30_000)
    assert (
        json.loads((out2 / "quantize_config.json").read_text())["model_file_base_name"] == "model"
    )


def test_quantize_config_without_base_name(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    safeshard.split(src, out, max_shard_size=30_000)  # "model" is found by default
    assert (out / "quantize_config.json").read_bytes() == (
        src / "quantize_config.json"
    ).read_bytes()
    out2 = tmp_path / "out2"
    safeshard.split(src, out2, max_shard_size=30_000, name="custom")  # not a default name
    assert (
        json.loads((out2 / "quantize_config.json").read_text())["model_file_base_name"] == "custom"
    )
    out3 = tmp_path / "out3"
    safeshard.split(src, out3, max_shard_size=30_000, name="gptq_model-4bit-32g")  # a default
    assert (out3 / "quantize_config.json").read_bytes() == (
        src / "quantize_config.json"
    ).read_bytes()


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "a\\b", "x.safetensors", ".."])
def test_bad_name_is_a_usage_error(src: Path, tmp_path: Path, bad: str) -> None:
    with pytest.raises(UsageError):
        safeshard.split(src, tmp_path / "out", name=bad)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- other files


def test_sidecars_copied_old_weights_never(src: Path, tmp_path: Path) -> None:
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    (src / "pytorch_model.bin.index.json").write_text("{}")
    (src / "old.safeshard.json").write_text("{}")
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (src / "sub").mkdir()
    (src / "sub" / "x.txt").write_text("x")
    (src / "notes.txt").write_text("hi")
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=30_000)
    expected = {"config.json", "quantize_config.json", "tokenizer.json", "README.md", "notes.txt"}
    assert set(r.copied) == expected
    others = {p.name for p in out.iterdir()} - {f.file for f in r.files}
    assert others == expected | {"model.safetensors.index.json", "model.safeshard.json"}
    assert (out / "README.md").read_text() == "# model\n"
    assert {"pytorch_model.bin", "pytorch_model.bin.index.json"} <= set(r.skipped)


def test_file_source_copies_only_known_sidecars(src: Path, tmp_path: Path) -> None:
    (src / "holiday.jpg").write_bytes(b"\xff\xd8")
    out = tmp_path / "out"
    r = safeshard.split(weights(src), out, max_shard_size=30_000)
    assert set(r.copied) == {"config.json", "quantize_config.json", "tokenizer.json", "README.md"}
    assert not (out / "holiday.jpg").exists()


def test_index_source_reshard_never_mixes_old_index(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    f = write_custom(tmp_path / "src" / "model.safetensors", llama(), {"format": "pt"})
    safeshard.split(f, first, max_shard_size=5_000)
    (first / "config.json").write_text("{}")
    r = safeshard.split(first / "model.safetensors.index.json", second, max_shard_size=9_000)
    idx = read_index(second / "model.safetensors.index.json")
    assert set(idx.shard_files()) == {x.file for x in r.files}
    assert {p.name for p in second.glob("*.safetensors")} == {x.file for x in r.files}
    assert (second / "config.json").is_file()
    assert all_tensor_bytes(second) == tensor_bytes(f)


# --------------------------------------------------------------------------- refusals


def test_oversize_tensor_is_an_error_naming_it(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OversizeTensorError, match=r"embed_tokens|lm_head") as e:
        safeshard.split(src, out, max_shard_size=4_000)
    assert "smallest cap" in str(e.value)
    assert not out.exists()


def test_allow_oversize_warns_and_isolates(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=4_000, allow_oversize=True)
    big = [f for f in r.files if f.oversize]
    assert big and all(f.tensors == 1 for f in big)
    assert r.warnings
    for f in r.files:
        assert f.size <= 4_000 or f.oversize
    assert all_tensor_bytes(out) == tensor_bytes(weights(src))


def test_existing_output_refused_then_force_replaces(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    (out / "other.safetensors.index.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--force"):
        safeshard.split(src, out, max_shard_size=30_000)
    assert (out / "model.safetensors").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == [
        "model.safetensors",
        "other.safetensors.index.json",
    ]
    r = safeshard.split(src, out, max_shard_size=30_000, force=True)
    assert set(r.removed) == {"model.safetensors", "other.safetensors.index.json"}
    assert {p.name for p in out.glob("*.safetensors*")} == {f.file for f in r.files} | {
        "model.safetensors.index.json"
    }


def test_resume_and_force_together_is_usage_error(src: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        safeshard.split(src, tmp_path / "out", resume=True, force=True)


def test_out_dir_is_source_folder_refused(src: Path) -> None:
    before = folder_hashes(src)
    for flag in ({}, {"force": True}):
        with pytest.raises(OutputExistsError, match="own folder"):
            safeshard.split(src, src, max_shard_size=30_000, **flag)  # type: ignore[arg-type]
    assert folder_hashes(src) == before


def test_concurrent_writer_refused(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with DirLock(out), pytest.raises(OutputLockedError, match="another safeshard"):
        safeshard.split(src, out, max_shard_size=30_000)
    assert [p.name for p in out.iterdir()] == []


def test_concurrent_writer_in_another_process_refused(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with subprocess.Popen(  # the context closes the stdout pipe
        [
            sys.executable,
            "-c",
            "import sys, time; from safeshard.io.localfs import DirLock\n"
            f"with DirLock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            with pytest.raises(OutputLockedError):
                safeshard.split(src, out, max_shard_size=30_000)
            assert not shard_files(out)
        finally:
            holder.kill()


def test_output_under_a_file_is_a_clear_error(src: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputFolderMissingError, match="Not a directory") as e:
        safeshard.split(src, tmp_path / "afile" / "out", max_shard_size=30_000)
    assert isinstance(e.value, FileNotFoundError)  # as merge says of the same situation


def test_unwritable_output_folder_is_a_clear_error(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, which chmod cannot stop: make the file system refuse instead.
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def refuse(path: str | os.PathLike[str], flags: int, *args: int, **kw: int) -> int:
        if Path(path).parent == out and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError, match="read-only") as e:
        safeshard.split(src, out, max_shard_size=30_000)
    assert str(out) in str(e.value)
    monkeypatch.undo()
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_folder_with_chmod(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            safeshard.split(src, out, max_shard_size=30_000)
    finally:
        out.chmod(0o755)


def test_full_disk_removes_partial_and_resume_finishes(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    plan = safeshard.split(src, out, max_shard_size=30_000, dry_run=True)
    real = os.copy_file_range

    def full(*args: int) -> int:
        if plan.files[1].file in os.readlink(f"/proc/self/fd/{args[1]}"):  # the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(DiskFullError, match="disk is full") as e:
        safeshard.split(src, out, max_shard_size=30_000)
    assert plan.files[1].file in str(e.value)
    monkeypatch.undo()
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith(TMP_PREFIX) for n in names)
    assert "model.safetensors.index.json" not in names
    assert plan.files[1].file not in names
    assert plan.files[0].file in names
    r = safeshard.split(src, out, max_shard_size=30_000, resume=True)
    assert r.kept == [plan.files[0].file]
    assert all_tensor_bytes(out) == tensor_bytes(weights(src))


def test_not_enough_space_refused_before_writing(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("safeshard.io.localfs.free_bytes", lambda folder: 1000)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match="are free"):
        safeshard.split(src, out, max_shard_size=30_000)
    assert not shard_files(out)


# --------------------------------------------------------------------------- resume


def test_resume_keeps_matching_shards_and_rewrites_the_rest(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=30_000)
    names = [f.file for f in r.files]
    before_hashes = folder_hashes(out)
    # an interrupted run: no index, no manifest, the last shard missing, one corrupted
    (out / "model.safetensors.index.json").unlink()
    man = out / "model.safeshard.json"
    mobj = json.loads(man.read_text())
    lines: list[dict[str, object]] = [
        {
            "start": {
                "format": "safeshard-journal",
                "version": 2,
                "kind": "split",
                "fingerprint": mobj["fingerprint"],
            }
        }
    ]
    for s in mobj["shards"]:
        tensors = {
            t.name: mobj["tensors"][t.name]["digest"] for t in read_header(out / s["file"]).tensors
        }
        rec: dict[str, object] = {
            "size": s["size"],
            "header": s["header"],
            "sha256": s["sha256"],
            "tensors": tensors,
            "staged": None,
        }
        lines.append({"file": [s["file"], rec]})
    man.unlink()
    (out / JOURNAL_NAME).write_text("".join(json.dumps(x) + "\n" for x in lines))
    (out / names[-1]).unlink()
    with open(out / names[1], "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    mtime0 = (out / names[0]).stat().st_mtime_ns
    (out / (TMP_PREFIX + "junk.123")).write_bytes(b"partial")
    r2 = safeshard.split(src, out, max_shard_size=30_000, resume=True)
    assert r2.kept == [n for n in names if n not in (names[1], names[-1])]
    assert set(r2.written) == {names[1], names[-1]}
    assert (out / names[0]).stat().st_mtime_ns == mtime0
    assert not (out / (TMP_PREFIX + "junk.123")).exists()
    assert not (out / JOURNAL_NAME).exists()
    assert (out / "model.safetensors.index.json").is_file()
    assert folder_hashes(out) == before_hashes


def test_resume_of_a_finished_split_keeps_everything(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=30_000)
    before = folder_hashes(out)
    r2 = safeshard.split(src, out, max_shard_size=30_000, resume=True)
    assert r2.kept == [f.file for f in r.files] and not r2.written
    assert folder_hashes(out) == before


def test_resume_rewrites_after_the_source_changed(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    safeshard.split(src, out, max_shard_size=30_000)
    w = weights(src)
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = safeshard.split(src, out, max_shard_size=30_000, resume=True)
    assert not r.kept and r.written
    assert any("changed" in n for n in r.notes)


def test_resume_with_another_cap_rewrites_and_removes_stale(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r1 = safeshard.split(src, out, max_shard_size=20_000)
    r2 = safeshard.split(src, out, max_shard_size=45_000, resume=True)
    assert len(r2.files) != len(r1.files)
    assert {p.name for p in out.glob("*.safetensors")} == {f.file for f in r2.files}
    assert all_tensor_bytes(out) == tensor_bytes(weights(src))


# --------------------------------------------------------------------------- source safety, dry run


def test_source_is_never_modified(src: Path, tmp_path: Path) -> None:
    before = {p.name: (sha256(p), p.stat().st_mtime_ns) for p in src.iterdir()}
    safeshard.split(src, tmp_path / "out", max_shard_size=30_000)
    safeshard.split(src, tmp_path / "out", max_shard_size=20_000, force=True)
    assert {p.name: (sha256(p), p.stat().st_mtime_ns) for p in src.iterdir()} == before


def test_dry_run_writes_nothing(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=30_000, dry_run=True)
    assert not out.exists()
    assert r.dry_run and all(f.status == "planned" and f.sha256 is None for f in r.files)
    real = safeshard.split(src, out, max_shard_size=30_000)
    assert [(f.file, f.size, f.blocks) for f in r.files] == [
        (f.file, f.size, f.blocks) for f in real.files
    ]


# --------------------------------------------------------------------------- hashing engine


# --------------------------------------------------------------------------- CLI


def test_cli_dry_run_shows_files_sizes_blocks(src: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["split", str(src), str(tmp_path / "o"), "-s", "45000", "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    plan = safeshard.split(src, tmp_path / "o", max_shard_size=45_000, dry_run=True)
    for f in plan.files:
        assert f.file in res.output and f"{f.size:,}" in res.output and f.blocks in res.output
    assert "layers 0" in res.output
    assert not (tmp_path / "o").exists()


def test_cli_json_and_exit_codes(src: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "o"
    res = runner.invoke(main, ["split", str(src), str(out), "-s", "30000", "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.output)
    assert obj["index"] == "model.safetensors.index.json"
    assert [s["file"] for s in obj["shards"]] == [p.name for p in shard_files(out)]
    assert all(s["status"] == "written" and s["sha256"] is None for s in obj["shards"])
    again = runner.invoke(main, ["split", str(src), str(out), "-s", "30000"])
    assert again.exit_code == 3 and "--force" in again.output
    both = runner.invoke(main, ["split", str(src), str(out), "--resume", "--force"])
    assert both.exit_code == 2
    bad = runner.invoke(main, ["split", str(src), str(out), "-s", "4gb"])
    assert bad.exit_code == 2


def test_split_module_has_no_torch_or_numpy() -> None:
    code = (
        "import sys, safeshard.ops.split, safeshard.ops.merge, safeshard.cli.split_cmd;"
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_peak_rss_stays_small(tmp_path: Path) -> None:
    # ~600 MB of tensors in 12 blocks; the source is sparse so that writing it is cheap.
    tensors = {"model.embed_tokens.weight": ("F16", (1024, 4096))}
    for i in range(12):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = ("F16", (4096, 6144))
    specs = [TensorSpec(k, d, s, 2 * s[0] * s[1]) for k, (d, s) in tensors.items()]
    header = build_header(specs, {"format": "pt"})
    srcf = tmp_path / "big.safetensors"
    with open(srcf, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(s.nbytes for s in specs))
    # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) high-water mark into
    # ru_maxrss across fork+exec, so a big test process would inflate the child's figure.
    code = (
        "import sys, safeshard\n"
        "safeshard.split(sys.argv[1], sys.argv[2], max_shard_size='150MB')\n"
        "line = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0]\n"
        "print(int(line.split()[1]))"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(srcf), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    rss_kib = int(proc.stdout.strip())
    assert rss_kib < 100 * 1024, f"peak RSS {rss_kib} KiB"
    assert sum(p.stat().st_size for p in shard_files(out)) > 600_000_000


def test_a_sidecar_link_out_of_the_model_folder_is_not_copied(src: Path, tmp_path: Path) -> None:
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = hunter2")
    (src / "config.json").unlink()
    (src / "config.json").symlink_to(secret)
    r = safeshard.split(src, tmp_path / "out", max_shard_size=30_000)
    assert not (tmp_path / "out" / "config.json").exists()
    assert "config.json" in r.skipped


def test_a_hugging_face_cache_snapshot_is_copied_through_its_links(
    src: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    r = safeshard.split(snap, tmp_path / "out", max_shard_size=30_000)
    assert "config.json" in r.copied
    assert (tmp_path / "out" / "config.json").read_bytes() == (src / "config.json").read_bytes()
