"""verify: every finding from a crafted broken checkpoint, none on a clean split."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.ckpt import (
    Decl,
    Edit,
    edit_index,
    flip_byte,
    names_in,
    read_tensors,
    rewrite,
    shards,
    tiny_gptq,
    write_file,
)
from safeshard.checkpoint import locate, read_header
from safeshard.cli import main
from safeshard.errors import (
    AmbiguousCheckpointError,
    CheckpointNotFoundError,
    SafeshardError,
    SizeParseError,
    UsageError,
)
from safeshard.ops.split import split
from safeshard.ops.verify import CODES, VerifyReport, discover, verify


@dataclass
class Split:
    src: Path
    out: Path
    cap: int

    @property
    def shards(self) -> list[Path]:
        return shards(self.out)

    @property
    def index(self) -> Path:
        return self.out / "model.safetensors.index.json"


def make_split(
    tmp: Path, edit: Edit | None = None, layers: int | None = None, *, sha256: bool = False
) -> Split:
    """``tiny-gptq`` (after ``edit``) split with a cap of a third of it: 3+ shards."""
    src = tiny_gptq(tmp / "src", edit, layers)
    cap = src.stat().st_size // 3
    split(src, tmp / "out", max_shard_size=cap, sha256=sha256)
    return Split(src, tmp / "out", cap)


@pytest.fixture
def clean(tmp_path: Path) -> Split:
    """A split with the default integrity record: header and tensor digests."""
    s = make_split(tmp_path)
    assert len(s.shards) >= 3
    return s


@pytest.fixture
def clean_sha(tmp_path: Path) -> Split:
    """A split that also records each shard's SHA-256 (``--sha256``)."""
    s = make_split(tmp_path, sha256=True)
    assert len(s.shards) >= 3
    return s


def codes(rep: VerifyReport) -> set[str]:
    return rep.codes


def find(rep: VerifyReport, code: str) -> list[tuple[str | None, str | None]]:
    return [(f.file, f.tensor) for f in rep.by_code(code)]


def full(s: Split, **kw: Any) -> VerifyReport:
    return verify(s.out, against=s.src, deep=True, max_shard_size=s.cap, **kw)


# --------------------------------------------------------------------------- clean


def test_clean_split_has_no_findings(clean: Split) -> None:
    rep = full(clean)
    assert rep.findings == []
    assert rep.ok
    assert rep.checks == ["structure", "size", "manifest", "gptq", "against", "deep"]
    assert rep.shards == len(clean.shards)
    assert rep.tensors == len(read_header(clean.src).tensors)
    files = sum(p.stat().st_size for p in clean.shards)
    assert rep.total_size == files
    # every shard tensor byte is compared with the source: each byte of each side read
    # once, and the file hashes are implied rather than recomputed
    data = sum(read_header(p).data_size for p in clean.shards)
    assert rep.bytes_read == 2 * data == data + read_header(clean.src).data_size
    assert (rep.hashed_files, rep.digested_files) == (0, len(clean.shards))


def test_without_a_source_every_tensor_digest_is_read_once(clean: Split) -> None:
    rep = verify(clean.out)
    assert rep.ok
    data = sum(read_header(p).data_size for p in clean.shards)
    assert rep.bytes_read == data  # the headers are checked from the headers read
    assert (rep.hashed_files, rep.digested_files) == (0, len(clean.shards))


def test_clean_split_with_file_hashes(clean_sha: Split) -> None:
    clean = clean_sha
    rep = full(clean, hash_files=True)
    assert rep.ok
    files = sum(p.stat().st_size for p in clean.shards)
    assert rep.bytes_read == files + read_header(clean.src).data_size
    assert (rep.hashed_files, rep.compared_files) == (len(clean.shards), 0)
    rep = verify(clean.out)  # by default the digests, even where a SHA-256 is recorded
    assert rep.ok and rep.hashed_files == 0


def test_hash_files_without_recorded_sha256_hashes_nothing(clean: Split) -> None:
    rep = full(clean, hash_files=True)
    assert rep.ok and rep.hashed_files == 0


def test_wrong_manifest_hash_needs_hash_files(clean_sha: Split) -> None:
    clean = clean_sha
    mp = clean.out / "model.safeshard.json"
    obj = json.loads(mp.read_text())
    obj["shards"][0]["sha256"] = "0" * 64
    mp.write_text(json.dumps(obj))
    assert verify(clean.out, against=clean.src).ok  # every byte equals the source's
    assert verify(clean.out).ok  # and every digest the manifest's
    rep = verify(clean.out, against=clean.src, hash_files=True)
    assert find(rep, "hash-mismatch") == [(clean.shards[0].name, None)]
    assert find(verify(clean.out, hash_files=True), "hash-mismatch") == [
        (clean.shards[0].name, None)
    ]


def test_a_version_1_manifest_is_checked_by_sha256(clean_sha: Split) -> None:
    """Manifests written before header digests (version 1) carry only SHA-256s."""
    clean = clean_sha
    mp = clean.out / "model.safeshard.json"
    obj = json.loads(mp.read_text())
    obj["version"] = 1
    for s in obj["shards"]:
        del s["header"]
    mp.write_text(json.dumps(obj))
    rep = verify(clean.out)
    assert rep.ok and rep.hashed_files == len(clean.shards)
    flip_byte(clean.shards[0], clean.shards[0].stat().st_size - 1)
    assert find(verify(clean.out), "hash-mismatch") == [(clean.shards[0].name, None)]


def changed_header(p: Path) -> None:
    """Same size, valid, same tensors, but not the header split wrote."""
    raw = p.read_bytes()
    h = read_header(p)
    body = h.raw.rstrip(b" ")
    p.write_bytes(
        raw[:8] + b"{ " + body[1:] + b" " * (len(h.raw) - len(body) - 1) + raw[h.data_start :]
    )
    assert read_header(p).tensors == h.tensors


def test_a_changed_header_is_found_by_its_digest(clean: Split) -> None:
    p = next(p for p in clean.shards if read_header(p).raw.endswith(b" "))
    changed_header(p)
    for rep in (verify(clean.out), verify(clean.out, against=clean.src)):
        assert [(f.code, f.file) for f in rep.findings] == [("header-hash", p.name)]


def test_non_canonical_header_is_hashed_even_against_a_source(clean_sha: Split) -> None:
    """Same size, valid, same tensors, but not the header split wrote: only the hash sees it."""
    clean = clean_sha
    mp = clean.out / "model.safeshard.json"
    obj = json.loads(mp.read_text())
    obj["version"] = 1  # no header digests: the SHA-256 is what vouches for the header
    for s in obj["shards"]:
        del s["header"]
    mp.write_text(json.dumps(obj))
    p = next(p for p in clean.shards if read_header(p).raw.endswith(b" "))
    raw = p.read_bytes()
    h = read_header(p)
    body = h.raw.rstrip(b" ")
    moved = b"{ " + body[1:] + b" " * (len(h.raw) - len(body) - 1)
    p.write_bytes(raw[:8] + moved + raw[h.data_start :])
    assert read_header(p).tensors == h.tensors
    rep = verify(clean.out, against=clean.src)
    assert find(rep, "hash-mismatch") == [(p.name, None)]
    assert rep.compared_files == len(clean.shards) - 1


@pytest.mark.parametrize("how", ["folder", "index", "single"])
def test_clean_every_path_form(clean: Split, tmp_path: Path, how: str) -> None:
    target = {"folder": clean.out, "index": clean.index, "single": clean.src}[how]
    rep = verify(target)
    assert rep.ok, rep.findings
    assert rep.shards == (1 if how == "single" else len(clean.shards))


@pytest.mark.parametrize("sha", [False, True])
def test_single_file_split_with_manifest(tmp_path: Path, sha: bool) -> None:
    src = tiny_gptq(tmp_path / "src", layers=1)
    split(src, tmp_path / "one", max_shard_size="100MB", sha256=sha)
    (single,) = (tmp_path / "one").glob("*.safetensors")
    assert verify(tmp_path / "one", against=src).ok
    flip_byte(single, single.stat().st_size - 1)
    rep = verify(tmp_path / "one", hash_files=sha)
    assert find(rep, "hash-mismatch") == ([(single.name, None)] if sha else [])
    assert find(rep, "manifest-tensor-hash") == [(single.name, "lm_head.weight")]


def test_no_data_read_without_manifest_or_source(clean: Split) -> None:
    (clean.out / "model.safeshard.json").unlink()
    rep = verify(clean.out)
    assert rep.ok
    assert rep.bytes_read == 0
    assert "manifest" not in rep.checks


# --------------------------------------------------------------------------- structure


def test_missing_shard(clean: Split) -> None:
    gone = clean.shards[1]
    gone.unlink()
    rep = full(clean)
    assert find(rep, "missing-shard") == [(gone.name, None)]
    # tensors that were in it are not blamed a second time
    assert "missing-tensor" not in codes(rep)
    assert "against-missing" not in codes(rep)
    assert "gptq-missing" not in codes(rep)
    assert "total-size" not in codes(rep)


def test_truncated_shard(clean: Split) -> None:
    p = clean.shards[2]
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 10)
    rep = full(clean)
    assert (p.name, None) in find(rep, "bad-header")
    assert "truncated" in rep.by_code("bad-header")[0].message
    assert find(rep, "size-mismatch") == [(p.name, None)]


def test_bad_header_message_is_the_readers(clean: Split) -> None:
    p = clean.shards[0]
    with open(p, "r+b") as f:
        f.write(struct.pack("<Q", 10**9))
    rep = verify(clean.out)
    (bad,) = rep.by_code("bad-header")
    assert bad.file == p.name and "exceeds the limit" in bad.message


def test_flipped_byte_detected_by_manifest_and_against(clean: Split) -> None:
    p = clean.shards[1]
    h = read_header(p)
    victim = h.tensors[len(h.tensors) // 2]
    flip_byte(p, h.data_start + victim.begin + 3)
    rep = verify(clean.out)
    assert rep.codes == {"manifest-tensor-hash"}
    assert find(rep, "manifest-tensor-hash") == [(p.name, victim.name)]
    rep = verify(clean.out, against=clean.src)
    assert find(rep, "against-bytes") == [(p.name, victim.name)]
    assert "first at byte 3 " in rep.by_code("against-bytes")[0].message


def test_flipped_byte_in_source_detected_by_against(clean: Split) -> None:
    h = read_header(clean.src)
    victim = h.tensors[-1]
    flip_byte(clean.src, h.data_start + victim.end - 1)
    rep = verify(clean.out, against=clean.src)
    assert [t for _, t in find(rep, "against-bytes")] == [victim.name]
    assert rep.codes == {"against-bytes"}  # the shards themselves are fine
    assert verify(clean.out).ok


def test_flipped_header_byte(clean: Split) -> None:
    p = clean.shards[0]
    h = read_header(p)
    # a space of the header padding, or the last byte of the JSON, changes
    flip_byte(p, h.data_start - 1)
    rep = verify(clean.out)
    assert rep.codes & {"bad-header", "hash-mismatch"}


def test_tensor_missing_from_index(clean: Split) -> None:
    victim = "model.layers.1.mlp.up_proj.scales"
    edit_index(clean.out, lambda o: o["weight_map"].pop(victim))
    rep = full(clean)
    holder = [p.name for p in clean.shards if victim in names_in(p)]
    assert find(rep, "unindexed-tensor") == [(holder[0], victim)]


def test_tensor_in_two_shards(clean: Split) -> None:
    a, b = clean.shards[0], clean.shards[1]
    victim = next(iter(names_in(b)))
    _, data_b, _ = read_tensors(b)

    def add(decls: dict[str, Any], data: dict[str, bytes]) -> None:
        decls[victim] = read_tensors(b)[0][victim]
        data[victim] = data_b[victim]

    rewrite(a, add)
    rep = verify(clean.out)
    assert find(rep, "duplicate-tensor") == [(b.name, victim)]
    assert a.name in rep.by_code("duplicate-tensor")[0].message
    # the index still lists b only, so it is not "unindexed"; a's extra copy is
    assert "wrong-shard" not in codes(rep)


def test_wrong_total_size(clean: Split) -> None:
    edit_index(clean.out, lambda o: o["metadata"].update(total_size=12345))
    rep = full(clean)
    assert find(rep, "total-size") == [(clean.index.name, None)]
    data = sum(read_header(p).data_size for p in clean.shards)
    assert f"set it to {data}" in rep.by_code("total-size")[0].message


def test_total_size_counting_whole_files_is_accepted(clean: Split) -> None:
    """GPTQModel writes total_size as the sum of file sizes: not a finding."""
    files = sum(p.stat().st_size for p in clean.shards)
    edit_index(clean.out, lambda o: o["metadata"].update(total_size=files))
    assert "total-size" not in verify(clean.out).codes


def test_entry_points_to_wrong_shard(clean: Split) -> None:
    a, b = clean.shards[0], clean.shards[2]
    victim = next(iter(names_in(a)))
    edit_index(clean.out, lambda o: o["weight_map"].update({victim: b.name}))
    rep = full(clean)
    assert find(rep, "wrong-shard") == [(b.name, victim)]
    assert a.name in rep.by_code("wrong-shard")[0].message


def test_index_entry_in_no_shard(clean: Split) -> None:
    edit_index(
        clean.out,
        lambda o: o["weight_map"].update({"ghost.weight": clean.shards[0].name}),
    )
    rep = verify(clean.out)
    assert find(rep, "missing-tensor") == [(clean.shards[0].name, "ghost.weight")]


def test_stray_shard(clean: Split) -> None:
    stray = clean.out / "model-00001-of-00009.safetensors"
    shutil.copy(clean.shards[0], stray)
    rep = full(clean)
    assert find(rep, "stray-shard") == [(stray.name, None)]


def test_stale_temporary(clean: Split) -> None:
    (clean.out / ".safeshard-tmp-model-00001-of-00005.safetensors.123").write_bytes(b"x")
    assert [f.code for f in verify(clean.out).findings] == ["stale-temp"]


def test_shard_count_mismatch(clean: Split) -> None:
    last = clean.shards[-1]
    n = len(clean.shards)
    renamed = last.with_name(f"model-{n:05d}-of-{n + 1:05d}.safetensors")
    last.rename(renamed)
    edit_index(
        clean.out,
        lambda o: o["weight_map"].update(
            {k: renamed.name for k, v in o["weight_map"].items() if v == last.name}
        ),
    )
    rep = verify(clean.out)
    assert (renamed.name, None) in find(rep, "shard-count")


def test_shard_numbering_gap(clean: Split) -> None:
    n = len(clean.shards)
    first = clean.shards[0]
    moved = first.with_name(f"model-{n + 1:05d}-of-{n:05d}.safetensors")
    first.rename(moved)
    edit_index(
        clean.out,
        lambda o: o["weight_map"].update(
            {k: moved.name for k, v in o["weight_map"].items() if v == first.name}
        ),
    )
    rep = verify(clean.out)
    assert (clean.index.name, None) in find(rep, "shard-count")


def test_oversize(clean: Split) -> None:
    sizes = {p.name: p.stat().st_size for p in clean.shards}
    cap = sorted(sizes.values())[-2]  # only files strictly larger are over
    rep = verify(clean.out, max_shard_size=cap)
    over = sorted(n for n, s in sizes.items() if s > cap)
    assert over and sorted(f or "" for f, _ in find(rep, "oversize")) == over
    assert verify(clean.out, max_shard_size=max(sizes.values())).ok


def test_header_only_change_is_one_finding_written_once(clean_sha: Split) -> None:
    """Without a source, a file whose hash differs is re-read tensor by tensor; when every
    tensor still matches, the one hash-mismatch finding says the header changed."""
    clean = clean_sha
    p = next(p for p in clean.shards if read_header(p).raw.endswith(b" "))
    changed_header(p)
    rep = verify(clean.out, hash_files=True)
    assert [(f.code, f.file) for f in rep.findings] == [
        ("header-hash", p.name),
        ("hash-mismatch", p.name),
    ]
    assert rep.findings[1].message.endswith(
        "yet every tensor matches the manifest's digest, so the header bytes changed, or the "
        "manifest's file hash is wrong"
    )


# --------------------------------------------------------------------------- finding the checkpoint


def test_verify_refuses_the_ambiguity_split_refuses(clean: Split) -> None:
    """A folder with an index and a single file under another base name: split, merge
    and inspect refuse it, and so does verify, rather than check one of them."""
    other = clean.out / "gptq_model-4bit-128g.safetensors"
    shutil.copy(clean.src, other)
    with pytest.raises(AmbiguousCheckpointError):
        locate(clean.out)
    with pytest.raises(AmbiguousCheckpointError, match=r"gptq_model-4bit-128g\.safetensors"):
        verify(clean.out)
    code, _ = run("verify", str(clean.out))
    assert code not in (0, 1)  # an error (usage or input), not "clean" or "findings"
    assert verify(clean.index).ok  # naming the index says which one is meant
    assert verify(other).ok


def _layout(folder: Path, src: Path, kind: str) -> None:
    """Folders that discovery must read one way: the checkpoint, or an error."""
    folder.mkdir()
    if kind in ("sharded", "sharded+same-base-single", "sharded+other-single", "two-indexes"):
        split(src, folder, max_shard_size=src.stat().st_size // 3)
    if kind == "sharded+same-base-single":
        shutil.copy(src, folder / "model.safetensors")
    if kind == "sharded+other-single":
        shutil.copy(src, folder / "other.safetensors")
    if kind == "two-indexes":
        shutil.copy(folder / "model.safetensors.index.json", folder / "b.safetensors.index.json")
    if kind in ("single", "two-singles"):
        shutil.copy(src, folder / "model.safetensors")
    if kind == "two-singles":
        shutil.copy(src, folder / "gptq_model-4bit-128g.safetensors")
    if kind == "orphan-shards":
        split(src, folder, max_shard_size=src.stat().st_size // 3)
        (folder / "model.safetensors.index.json").unlink()


@pytest.mark.parametrize(
    "kind",
    [
        "sharded",
        "sharded+same-base-single",
        "sharded+other-single",
        "two-indexes",
        "single",
        "two-singles",
        "orphan-shards",
        "empty",
    ],
)
def test_verify_and_locate_agree_on_what_the_checkpoint_is(tmp_path: Path, kind: str) -> None:
    src = tiny_gptq(tmp_path / "src", layers=1)
    folder = tmp_path / kind
    _layout(folder, src, kind)
    try:
        loc = locate(folder)
    except SafeshardError as e:
        with pytest.raises(type(e)):
            verify(folder)
        return
    target, _ = discover(folder)
    assert [folder / f for f in target.files] == list(loc.files)
    assert target.index_path == (loc.index.path if loc.index is not None else None)
    assert verify(folder).ok


# --------------------------------------------------------------------------- index


def test_unsafe_index_entry_is_reported_and_skipped(clean: Split) -> None:
    edit_index(
        clean.out,
        lambda o: o["weight_map"].update({"model.norm.weight": "../evil.safetensors"}),
    )
    rep = verify(clean.out)
    assert find(rep, "bad-index") == [(clean.index.name, "model.norm.weight")]
    assert "climbs out" in rep.by_code("bad-index")[0].message
    # the real tensor is still found, unlisted
    assert [t for _, t in find(rep, "unindexed-tensor")] == ["model.norm.weight"]


def test_unparsable_index(clean: Split) -> None:
    clean.index.write_text("{not json")
    rep = verify(clean.out)
    assert find(rep, "bad-index") == [(clean.index.name, None)]
    assert rep.shards == len(clean.shards)  # shards still checked, found by name


def test_bad_total_size_type(clean: Split) -> None:
    edit_index(clean.out, lambda o: o["metadata"].update(total_size="12"))
    rep = verify(clean.out)
    assert rep.codes == {"bad-index"}


# --------------------------------------------------------------------------- manifest


def test_manifest_records_another_file(clean: Split) -> None:
    mp = clean.out / "model.safeshard.json"
    obj = json.loads(mp.read_text())
    obj["shards"][0]["file"] = "model-00009-of-00009.safetensors"
    mp.write_text(json.dumps(obj))
    rep = verify(clean.out)
    got = find(rep, "manifest-mismatch")
    assert (clean.shards[0].name, None) in got
    assert ("model-00009-of-00009.safetensors", None) in got


def test_manifest_tensor_records(clean: Split) -> None:
    mp = clean.out / "model.safeshard.json"
    obj = json.loads(mp.read_text())
    obj["tensors"]["ghost"] = {"digest": "0" * 32, "nbytes": 4}
    del obj["tensors"]["model.norm.weight"]
    mp.write_text(json.dumps(obj))
    rep = verify(clean.out)
    assert sorted(t or "" for _, t in find(rep, "manifest-mismatch")) == [
        "ghost",
        "model.norm.weight",
    ]


def test_unreadable_manifest(clean: Split) -> None:
    (clean.out / "model.safeshard.json").write_text("[]")
    rep = verify(clean.out)
    assert find(rep, "bad-manifest") == [("model.safeshard.json", None)]


def test_manifest_with_wrong_size(clean: Split) -> None:
    mp = clean.out / "model.safeshard.json"
    obj = json.loads(mp.read_text())
    obj["shards"][1]["size"] += 1
    mp.write_text(json.dumps(obj))
    rep = verify(clean.out)
    assert find(rep, "size-mismatch") == [(clean.shards[1].name, None)]
    assert "hash-mismatch" not in rep.codes


# --------------------------------------------------------------------------- gptq


def _holder(s: Split, tensor: str) -> Path:
    return next(p for p in s.shards if tensor in names_in(p))


def test_gptq_module_missing_scales(clean: Split) -> None:
    victim = "model.layers.1.self_attn.k_proj.scales"
    holder = _holder(clean, victim)

    def drop(decls: dict[str, Any], data: dict[str, bytes]) -> None:
        del decls[victim], data[victim]

    rewrite(holder, drop)
    edit_index(clean.out, lambda o: o["weight_map"].pop(victim))
    rep = verify(clean.out)
    assert (None, victim) in [(None, t) for _, t in find(rep, "gptq-missing")]
    assert len(rep.by_code("gptq-missing")) == 1


def test_wrong_g_idx_length(tmp_path: Path) -> None:
    victim = "model.layers.2.mlp.down_proj.g_idx"

    def shorten(decls: dict[str, Decl], data: dict[str, bytes]) -> None:
        n = decls[victim][1][0] - 8
        decls[victim] = ("I32", (n,))
        data[victim] = data[victim][: 4 * n]

    s = make_split(tmp_path, shorten)
    rep = verify(s.out)
    assert find(rep, "gptq-shape") == [(_holder(s, victim).name, victim)]
    assert "bits=4" in rep.by_code("gptq-shape")[0].message


def test_wrong_gptq_dtype(tmp_path: Path) -> None:
    victim = "model.layers.0.mlp.up_proj.scales"

    def widen(decls: dict[str, Decl], data: dict[str, bytes]) -> None:
        decls[victim] = ("F32", decls[victim][1])
        data[victim] = data[victim] * 2

    s = make_split(tmp_path, widen)
    assert [t for _, t in find(verify(s.out), "gptq-dtype")] == [victim]


def test_gptq_config_disagreeing_with_shapes(clean: Split) -> None:
    (clean.out / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": 32}))
    rep = verify(clean.out)
    assert "gptq-config" in rep.codes


def test_g_idx_out_of_range_only_with_deep(tmp_path: Path) -> None:
    victim = "model.layers.0.self_attn.q_proj.g_idx"

    def corrupt(decls: dict[str, Decl], data: dict[str, bytes]) -> None:
        n_in = decls[victim][1][0]
        values = list(struct.unpack(f"<{n_in}i", data[victim]))
        values[5] = n_in  # far past the last group
        values[6] = -1
        data[victim] = struct.pack(f"<{n_in}i", *values)

    s = make_split(tmp_path, corrupt)
    assert "gptq-g-idx-range" not in verify(s.out).codes
    rep = verify(s.out, deep=True)
    assert find(rep, "gptq-g-idx-range") == [(_holder(s, victim).name, victim)]
    n_in = read_header(s.src)[victim].shape[0]
    assert f"2 of {n_in} values" in rep.by_code("gptq-g-idx-range")[0].message


def test_unquantized_model_skips_gptq(tmp_path: Path) -> None:
    f = write_file(
        tmp_path / "model.safetensors", {"w": ("F16", (4, 4))}, metadata={"format": "pt"}
    )
    rep = verify(f, deep=True)
    assert rep.ok and "gptq" not in rep.checks


def test_gptq_metadata_without_quantized_tensors(tmp_path: Path) -> None:
    meta = {"format": "pt", "gptq_bits": "4", "gptq_group_size": "128"}
    f = write_file(tmp_path / "model.safetensors", {"w": ("F16", (4, 4))}, metadata=meta)
    assert verify(f).codes == {"gptq-config"}


# --------------------------------------------------------------------------- against


def test_against_name_dtype_shape_metadata(clean: Split, tmp_path: Path) -> None:
    decls, data, _meta = read_tensors(clean.src)
    other = tmp_path / "other" / "model.safetensors"
    decls2 = dict(decls)
    data2 = dict(data)
    decls2.pop("model.norm.weight")
    decls2["extra.weight"] = ("F16", (2,))
    data2["extra.weight"] = b"\0" * 4
    name_dt = "model.embed_tokens.weight"
    decls2[name_dt] = ("BF16", decls[name_dt][1])
    name_sh = "lm_head.weight"
    decls2[name_sh] = ("F16", (decls[name_sh][1][1], decls[name_sh][1][0]))
    write_file(other, decls2, data2, metadata={"format": "pt"})
    rep = verify(clean.out, against=other)
    assert [t for _, t in find(rep, "against-missing")] == ["extra.weight"]
    assert [t for _, t in find(rep, "against-extra")] == ["model.norm.weight"]
    assert [t for _, t in find(rep, "against-dtype")] == [name_dt]
    assert [t for _, t in find(rep, "against-shape")] == [name_sh]
    assert sorted(f or "" for f, _ in find(rep, "against-metadata")) == sorted(
        p.name for p in clean.shards
    )
    assert "against-bytes" not in rep.codes


def test_against_a_sharded_source(clean: Split, tmp_path: Path) -> None:
    resplit = tmp_path / "resplit"
    split(clean.out, resplit, max_shard_size=clean.cap * 2)
    assert verify(resplit, against=clean.out).ok
    assert verify(clean.out, against=clean.index).ok


def test_bad_source_is_a_finding(clean: Split, tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x01" * 7)
    rep = verify(clean.out, against=broken)
    assert find(rep, "bad-source") == [(str(broken), None)]


# --------------------------------------------------------------------------- arguments


def test_unusable_arguments_raise(clean: Split, tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        verify(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError):
        verify(clean.out, against=tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError):
        verify(empty)
    with pytest.raises(SizeParseError):
        verify(clean.out, max_shard_size="4Gb")
    with pytest.raises(UsageError):
        verify(clean.out, workers=0)


def test_findings_have_documented_codes(clean: Split) -> None:
    clean.shards[0].unlink()
    flip_byte(clean.shards[1], 100)
    rep = verify(clean.out, against=clean.src, deep=True)
    assert rep.findings
    assert all(f.code in CODES for f in rep.findings)


def test_progress_counts_every_byte_read(clean: Split) -> None:
    seen: list[int] = []
    totals: list[int] = []

    @contextmanager
    def prog(total: int) -> Iterator[Callable[[int], None]]:
        totals.append(total)
        yield seen.append

    rep = verify(clean.out, against=clean.src, progress=prog)
    assert totals == [rep.bytes_read] == [sum(seen)]


@pytest.mark.parametrize("workers", [1, 2, 8])
def test_workers_do_not_change_the_result(clean: Split, workers: int) -> None:
    flip_byte(clean.shards[2], clean.shards[2].stat().st_size - 2)
    rep = verify(clean.out, against=clean.src, workers=workers)
    assert rep.codes == {"against-bytes"}
    rep = verify(clean.out, workers=workers)
    assert rep.codes == {"manifest-tensor-hash"}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_flipped_byte_is_found(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    tmp = tmp_path_factory.mktemp("flip")
    s = make_split(tmp, layers=1)
    assert len(s.shards) > 1
    p = data.draw(st.sampled_from(s.shards))
    offset = data.draw(st.integers(0, p.stat().st_size - 1))
    flip_byte(p, offset)
    assert not verify(s.out).ok


# --------------------------------------------------------------------------- CLI


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), env={"HF_HUB_OFFLINE": "1"})
    return res.exit_code, res.output


def test_cli_clean_exit_0(clean: Split) -> None:
    code, out = run(
        "verify", str(clean.out), "--against", str(clean.src), "--max-shard-size", str(clean.cap)
    )
    assert code == 0, out
    n = len(read_header(clean.src).tensors)
    assert out.startswith(f"OK: {len(clean.shards)} shards, {n} tensors")


def test_cli_findings_exit_1_and_json(clean: Split) -> None:
    gone = clean.shards[0]
    gone.unlink()
    code, out = run("verify", str(clean.out))
    assert code == 1
    assert "missing-shard" in out
    code, out = run("verify", str(clean.out), "--json")
    assert code == 1
    obj = json.loads(out)
    assert obj["ok"] is False
    assert [f["code"] for f in obj["findings"]] == ["missing-shard"]
    assert obj["findings"][0]["file"] == gone.name


def test_cli_usage_errors_exit_2_missing_paths_3(clean: Split, tmp_path: Path) -> None:
    assert run("verify", str(tmp_path / "nope"))[0] == 3
    assert run("verify", str(clean.out), "--against", str(tmp_path / "nope"))[0] == 3
    assert run("verify", str(clean.out), "--max-shard-size", "4Gb")[0] == 2
    assert run("verify", str(clean.out), "--workers", "0")[0] == 2


def test_cli_json_on_clean(clean: Split) -> None:
    code, out = run("verify", str(clean.out), "--json", "--deep")
    assert code == 0
    obj = json.loads(out)
    assert obj["ok"] is True and obj["findings"] == []
    assert obj["shards"] == len(clean.shards)
    assert os.path.samefile(obj["path"], clean.out)


def test_every_code_and_json_key_is_documented(clean: Split) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "verify.md").read_text()
    for code in CODES:
        assert f"| `{code}` |" in doc, code
    for key in full(clean).to_json():
        assert f"`{key}`" in doc, key


def test_headers_in_object_storage_are_read_at_once_with_the_same_findings(
    clean: Split, s3: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify reads the shards' headers in object storage in parallel (two reads meet at
    a barrier, which one reader after another would never reach), and a missing shard and
    a bad header are found as they are locally."""
    import safeshard.ops.verify as verify_module
    from helpers.reads import Meeting
    from safeshard.io.remote import filesystem

    base, opts = s3
    fs, root = filesystem(base, opts)
    fs.put(str(clean.out) + "/", f"{root}/out/", recursive=True)
    names = [p.name for p in clean.shards]
    fs.rm_file(f"{root}/out/{names[0]}")
    fs.pipe_file(f"{root}/out/{names[1]}", struct.pack("<Q", 10**9) + b"{}")
    meeting = Meeting(verify_module._one_header)
    monkeypatch.setattr(verify_module, "_one_header", meeting)
    rep = verify(f"{base}/out", storage_options=opts)
    assert not meeting.broken
    assert find(rep, "missing-shard") == [(names[0], None)]
    assert find(rep, "bad-header") == [(names[1], None)]
