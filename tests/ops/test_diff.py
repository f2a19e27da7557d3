"""diff: added, removed and changed tensors, shard differences, exit codes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import xxhash
from click.testing import CliRunner

from helpers.ckpt import flip_byte, read_tensors, rewrite, shards, tiny_gptq, write_file
from safeshard.checkpoint import read_header
from safeshard.cli import main
from safeshard.errors import CheckpointNotFoundError, ReadError, SafeshardError, UsageError
from safeshard.ops.diff import diff
from safeshard.ops.split import split


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return tiny_gptq(tmp_path / "src")


def cap(src: Path) -> int:
    return src.stat().st_size // 3


def copy_of(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(src.read_bytes())
    return dest


def test_identical_files(src: Path, tmp_path: Path) -> None:
    other = copy_of(src, tmp_path / "b" / "model.safetensors")
    rep = diff(src, other)
    assert rep.identical
    assert rep.added == rep.removed == [] and rep.changed == []
    assert rep.unchanged == len(read_header(src).tensors)
    assert rep.shards == []  # neither side is sharded


def test_one_changed_tensor(src: Path, tmp_path: Path) -> None:
    other = copy_of(src, tmp_path / "b" / "model.safetensors")
    h = read_header(other)
    victim = h.tensors[7]
    flip_byte(other, h.data_start + victim.begin)
    rep = diff(src, other)
    assert not rep.identical
    assert [(c.name, c.kind) for c in rep.changed] == [(victim.name, "bytes")]
    change = rep.changed[0]
    raw_a, raw_b = src.read_bytes(), other.read_bytes()
    span = slice(h.data_start + victim.begin, h.data_start + victim.end)
    assert change.a == xxhash.xxh3_128(raw_a[span]).hexdigest()
    assert change.b == xxhash.xxh3_128(raw_b[span]).hexdigest()
    assert change.digest == "xxh3_128"  # not a SHA-256, whatever an old label said
    assert change.to_json()["digest"] == "xxh3_128"
    assert rep.unchanged == len(h.tensors) - 1


def test_added_and_removed_tensors(src: Path, tmp_path: Path) -> None:
    other = copy_of(src, tmp_path / "b" / "model.safetensors")

    def edit(decls: dict[str, tuple[str, tuple[int, ...]]], data: dict[str, bytes]) -> None:
        del decls["model.norm.weight"], data["model.norm.weight"]
        decls["new.a"], data["new.a"] = ("F16", (2,)), b"\1\2\3\4"
        decls["new.b"], data["new.b"] = ("I8", (1,)), b"\7"

    rewrite(other, edit)
    rep = diff(src, other)
    assert rep.removed == ["model.norm.weight"]
    assert rep.added == ["new.a", "new.b"]
    assert rep.changed == []
    assert not rep.identical


def test_dtype_and_shape_changes(src: Path, tmp_path: Path) -> None:
    decls, data, meta = read_tensors(src)
    decls["model.norm.weight"] = ("BF16", decls["model.norm.weight"][1])
    d, s = decls["lm_head.weight"]
    decls["lm_head.weight"] = (d, (s[1], s[0]))
    other = write_file(tmp_path / "b" / "model.safetensors", decls, data, meta)
    rep = diff(src, other)
    assert [(c.name, c.kind, c.a, c.b) for c in rep.changed] == [
        ("lm_head.weight", "shape", str(list(s)), str([s[1], s[0]])),
        ("model.norm.weight", "dtype", "F16", "BF16"),
    ]


def test_metadata_change_is_a_difference(src: Path, tmp_path: Path) -> None:
    decls, data, _ = read_tensors(src)
    other = write_file(tmp_path / "b" / "model.safetensors", decls, data, {"format": "pt"})
    rep = diff(src, other)
    assert rep.changed == [] and rep.metadata_changed and not rep.identical


def test_sharded_vs_single_file(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    split(src, out, max_shard_size=cap(src))
    rep = diff(src, out)
    assert rep.identical  # same tensors, bytes and metadata; only the layout differs
    names = {s.file for s in rep.shards}
    assert names == {src.name} | {p.name for p in shards(out)}
    assert {s.status for s in rep.shards} == {"only-a", "only-b"}


def test_two_splits_name_the_shards_that_differ(src: Path, tmp_path: Path) -> None:
    split(src, tmp_path / "a", max_shard_size=cap(src))
    split(src, tmp_path / "b", max_shard_size=cap(src))
    rep = diff(tmp_path / "a", tmp_path / "b")
    assert rep.identical and rep.shards_differ == []
    assert all(s.a_sha256 == s.b_sha256 is not None for s in rep.shards)
    target = shards(tmp_path / "b")[1]
    h = read_header(target)
    flip_byte(target, h.data_start + h.tensors[0].begin)
    rep = diff(tmp_path / "a", tmp_path / "b")
    assert [c.name for c in rep.changed] == [h.tensors[0].name]
    assert [(s.file, s.status) for s in rep.shards_differ] == [(target.name, "changed")]
    with open(target, "rb") as f:
        assert rep.shards_differ[0].b_sha256 == hashlib.sha256(f.read()).hexdigest()


def test_trusting_manifests_reads_nothing(src: Path, tmp_path: Path) -> None:
    split(src, tmp_path / "a", max_shard_size=cap(src))
    split(src, tmp_path / "b", max_shard_size=cap(src))
    target = shards(tmp_path / "b")[0]
    flip_byte(target, target.stat().st_size - 1)  # after the split: manifests can't know
    trusted = diff(tmp_path / "a", tmp_path / "b", trust_manifests=True)
    assert trusted.bytes_read == 0 and trusted.identical
    assert not diff(tmp_path / "a", tmp_path / "b").identical


def test_dtype_and_shape_changes_name_no_digest(src: Path, tmp_path: Path) -> None:
    decls, data, meta = read_tensors(src)
    name = next(iter(decls))
    decls[name] = ("U8", (len(data[name]),))
    other = write_file(tmp_path / "b" / "model.safetensors", decls, data, meta)
    (change,) = diff(src, other).changed
    assert (change.kind, change.digest, change.to_json()["digest"]) == ("dtype", None, None)


def test_a_file_that_cannot_be_read_to_its_end_is_a_read_error(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file shrinks between reading its header and reading its data."""
    import importlib

    diff_module = importlib.import_module("safeshard.ops.diff")  # the function shadows it

    other = copy_of(src, tmp_path / "b" / "model.safetensors")
    real = diff_module.open_checkpoint

    def then_truncate(path: Path, **kw: object) -> object:
        ckpt = real(path, **kw)
        if Path(path) == other:
            with open(other, "r+b") as f:
                f.truncate(other.stat().st_size - 100)
        return ckpt

    monkeypatch.setattr(diff_module, "open_checkpoint", then_truncate)
    with pytest.raises(ReadError, match=r"model\.safetensors: cannot read it to compare") as info:
        diff(src, other)
    assert isinstance(info.value, SafeshardError) and isinstance(info.value, OSError)


def test_an_unreadable_manifest_is_not_trusted(src: Path, tmp_path: Path) -> None:
    split(src, tmp_path / "a", max_shard_size=cap(src))
    split(src, tmp_path / "b", max_shard_size=cap(src))
    (tmp_path / "b" / "model.safeshard.json").unlink()
    (tmp_path / "b" / "model.safeshard.json").mkdir()  # reading it fails with EISDIR
    rep = diff(tmp_path / "a", tmp_path / "b", trust_manifests=True)
    assert rep.identical and rep.bytes_read > 0


def test_unusable_arguments_raise(src: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        diff(src, tmp_path / "nope")
    with pytest.raises(UsageError):
        diff(src, src, workers=0)


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), env={"HF_HUB_OFFLINE": "1"})
    return res.exit_code, res.output


def test_cli_exit_codes_and_json(src: Path, tmp_path: Path) -> None:
    other = copy_of(src, tmp_path / "b" / "model.safetensors")
    code, out = run("diff", str(src), str(other))
    assert code == 0, out
    assert "IDENTICAL" in out
    h = read_header(other)
    flip_byte(other, h.data_start)
    code, out = run("diff", str(src), str(other))
    assert code == 1 and h.tensors[0].name in out
    code, out = run("diff", str(src), str(other), "--json")
    assert code == 1
    obj = json.loads(out)
    assert obj["identical"] is False
    assert [c["name"] for c in obj["changed"]] == [h.tensors[0].name]
    assert run("diff", str(src), str(tmp_path / "nope"))[0] == 3
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"1234")
    assert run("diff", str(src), str(broken))[0] == 3
