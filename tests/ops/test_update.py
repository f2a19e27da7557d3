"""update (``split --update``): rewrite only what changed, keep the rest byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeshard
from helpers.splitkit import Decl, gptq_llama, run_killed
from safeshard.checkpoint import read_header, read_index, read_manifest
from safeshard.cli import main
from safeshard.errors import OutputLockedError, OversizeTensorError, UpdateError, UsageError
from safeshard.format.blocks import model_order
from safeshard.format.filenames import TMP_PREFIX
from safeshard.format.header import TensorSpec, build_header, tensor_nbytes
from safeshard.io.localfs import DirLock
from safeshard.ops import synth

PAST_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09: no file written by a test is this old


# --------------------------------------------------------------------------- helpers


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def age(folder: Path) -> None:
    """Set every file's mtime to a fixed past time, so a rewrite cannot go unnoticed."""
    for p in folder.iterdir():
        os.utime(p, ns=(PAST_NS, PAST_NS))


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Each weights file: (SHA-256, mtime in ns, inode)."""
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        st_ = p.stat()
        out[p.name] = (sha(p), st_.st_mtime_ns, st_.st_ino)
    return out


def weights_file(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def holders(out: Path, prefix: str) -> set[str]:
    """Shard files of the split in ``out`` holding a tensor whose name starts with ``prefix``."""
    wm = read_index(out / "model.safetensors.index.json").weight_map
    return {f for t, f in wm.items() if t.startswith(prefix)}


def cap_for(src: Path, parts: int) -> int:
    """A cap that splits the single file ``src`` (a folder) into about ``parts`` shards."""
    return weights_file(src).stat().st_size // parts + 4096


def changed_copy(old: Path, new: Path, preset: str, prefix: str, tmp: Path) -> list[str]:
    """``new`` = a copy of ``old`` whose tensors named ``prefix*`` hold other valid values.

    The other values come from the same preset synthesized with another seed, so the
    model stays loadable (no NaN scales, g_idx in range). Returns the tensors whose
    bytes changed.
    """
    shutil.copytree(old, new)
    other = synth.synthesize(tmp / f"seed1-{preset}", preset, seed=1)
    dst, src = weights_file(new), weights_file(other)
    h = read_header(dst)
    assert h.raw == read_header(src).raw  # the same layout: only bytes differ
    changed = []
    with open(src, "rb") as fs, open(dst, "r+b") as fd:
        for t in h.tensors:
            if not t.name.startswith(prefix):
                continue
            fs.seek(h.data_start + t.begin)
            data = fs.read(t.nbytes)
            fd.seek(h.data_start + t.begin)
            if fd.read(t.nbytes) != data:
                changed.append(t.name)
            fd.seek(h.data_start + t.begin)
            fd.write(data)
    return sorted(changed)


def check_against(out: Path, new: Path) -> None:
    rep = safeshard.verify(out, against=new)
    assert rep.ok, [f.message for f in rep.findings]


def check_merge(out: Path, new: Path, tmp: Path) -> None:
    merged = tmp / "merged.safetensors"
    m = safeshard.merge(out, merged, force=True)
    assert m.lossless, m.reason
    assert sha(merged) == sha(weights_file(new))


def check_caps(out: Path, cap: int) -> None:
    for p in out.glob("*.safetensors"):
        assert p.stat().st_size <= cap, p.name


@pytest.fixture(scope="module")
def gptq_old(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.synthesize(tmp_path_factory.mktemp("synth") / "old", "tiny-gptq")


@pytest.fixture(scope="module")
def gptq_new(gptq_old: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("new")
    changed = changed_copy(gptq_old, tmp / "new", "tiny-gptq", "model.layers.2.", tmp)
    return tmp / "new", changed


def split_old(old: Path, out: Path, parts: int = 4) -> int:
    cap = cap_for(old, parts)
    r = safeshard.split(old, out, max_shard_size=cap)
    assert len(r.files) >= 3
    age(out)
    return cap


# --------------------------------------------------------------------------- the test


def test_only_the_shards_holding_the_changed_block_are_rewritten(
    gptq_old: Path, gptq_new: tuple[Path, list[str]], tmp_path: Path
) -> None:
    new, changed = gptq_new
    assert changed and all(t.startswith("model.layers.2.") for t in changed)
    out = tmp_path / "out"
    split_old(gptq_old, out)
    expected = holders(out, "model.layers.2.")
    before = snapshot(out)
    r = safeshard.update(new, out, sha256=True)  # SHA-256 of new and kept shards alike
    after = snapshot(out)
    assert sorted(r.rewritten) == sorted(expected)
    assert r.changed == changed
    assert r.unchanged == len(read_header(weights_file(new)).tensors) - len(changed)
    assert r.added == r.removed == r.added_tensors == r.removed_tensors == []
    assert not r.names_changed and r.renamed == []
    assert set(after) == set(before)
    for name in before:
        if name in expected:
            assert after[name][0] != before[name][0], name
            assert after[name][1] != PAST_NS, name
        else:
            assert after[name] == before[name], name  # same bytes, mtime and inode
            assert name in r.kept
    check_against(out, new)
    check_merge(out, new, tmp_path)
    man = read_manifest(out, "model")
    assert man is not None
    assert {s.file: s.sha256 for s in man.shards} == {n: v[0] for n, v in after.items()}
    # the index and the manifest agree with a fresh split of the new source
    fresh = tmp_path / "fresh"
    safeshard.split(new, fresh, max_shard_size=r.cap)
    assert snapshot(fresh).keys() == after.keys()
    assert {n: v[0] for n, v in snapshot(fresh).items()} == {n: v[0] for n, v in after.items()}
    fm = read_manifest(fresh, "model")
    assert fm is not None and fm.tensors == man.tensors and fm.source == man.source
    assert (out / "model.safetensors.index.json").read_bytes() == (
        fresh / "model.safetensors.index.json"
    ).read_bytes()


def test_block_split_across_shards_rewrites_both(
    gptq_old: Path, gptq_new: tuple[Path, list[str]], tmp_path: Path
) -> None:
    new, _ = gptq_new
    out = tmp_path / "out"
    # a cap below one block's size: layer 2 spans several shards
    cap = 280_000
    safeshard.split(gptq_old, out, max_shard_size=cap)
    age(out)
    expected = holders(out, "model.layers.2.")
    assert len(expected) >= 2
    before = snapshot(out)
    r = safeshard.update(new, out)
    assert sorted(r.rewritten) == sorted(expected)
    after = snapshot(out)
    assert {n for n in before if before[n] == after[n]} == set(before) - expected
    check_caps(out, cap)
    check_against(out, new)


@pytest.mark.slow
def test_updated_tiny_llama_loads_with_the_new_logits(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from helpers.clients import hf_logits

    old = synth.synthesize(tmp_path / "old", "tiny-llama")
    new = tmp_path / "new"
    assert changed_copy(old, new, "tiny-llama", "model.layers.1.", tmp_path)
    out = tmp_path / "out"
    split_old(old, out)
    r = safeshard.update(new, out)
    assert r.rewritten and r.kept
    want = hf_logits(new)
    assert not torch.equal(want, hf_logits(old))  # the change is visible in the logits
    assert torch.equal(hf_logits(out, native=True), want)


@pytest.mark.slow
@pytest.mark.gptq
def test_updated_tiny_gptq_loads_through_gptqmodel_with_the_new_logits(
    gptq_old: Path, gptq_new: tuple[Path, list[str]], tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("gptqmodel")
    from helpers.clients import gptq_logits

    new, _ = gptq_new
    out = tmp_path / "out"
    split_old(gptq_old, out)
    r = safeshard.update(new, out)
    assert r.rewritten and r.kept
    assert torch.equal(gptq_logits(out, native=True), gptq_logits(new))


# --------------------------------------------------------------------------- added, removed, grown


GPTQ_META = {"format": "pt", "gptq_bits": "4", "gptq_group_size": "32"}


def gptq_tensors(layers: int = 3) -> dict[str, Decl]:
    """A small GPTQ Llama (hidden 64, group 32): about 18 kB per block."""
    return gptq_llama(layers=layers)


def gptq_module(prefix: str, n_in: int, n_out: int) -> dict[str, Decl]:
    groups = n_in // 32
    return {
        f"{prefix}.qweight": ("I32", (n_in // 8, n_out)),
        f"{prefix}.qzeros": ("I32", (groups, n_out // 8)),
        f"{prefix}.scales": ("F16", (groups, n_out)),
        f"{prefix}.g_idx": ("I32", (n_in,)),
    }


def small_source(
    folder: Path,
    tensors: Mapping[str, Decl],
    data: Mapping[str, bytes] | None = None,
    metadata: Mapping[str, str] | None = GPTQ_META,
) -> Path:
    """A one-file source whose tensor bytes depend only on each tensor's name (unless
    given in ``data``): the same tensor has the same bytes in every version."""
    specs = [TensorSpec(n, d, s, tensor_nbytes(d, s)) for n, (d, s) in tensors.items()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quantize_config.json").write_text('{"bits": 4, "group_size": 32}')
    with open(folder / "gptq_model-4bit-32g.safetensors", "wb") as f:
        f.write(build_header(specs, metadata))
        for t in specs:
            blob = (data or {}).get(t.name)
            f.write(blob if blob is not None else random.Random(t.name).randbytes(t.nbytes))
    return folder


def test_added_tensor_joins_its_neighbours_shard(tmp_path: Path) -> None:
    old_t = gptq_tensors(3)
    old = small_source(tmp_path / "old", old_t)
    out = tmp_path / "out"
    cap = cap_for(old, 3) + 8192  # room for a small extra tensor
    safeshard.split(old, out, max_shard_size=cap)
    age(out)
    before = snapshot(out)
    bias = "model.layers.1.self_attn.q_proj.bias"
    new_t = dict(old_t)
    new_t[bias] = ("F16", (64,))
    new = small_source(tmp_path / "new", new_t)
    home = holders(out, "model.layers.1.self_attn.q_proj.")
    assert len(home) == 1
    r = safeshard.update(new, out)
    assert r.added_tensors == [bias] and r.changed == [] and r.removed_tensors == []
    assert r.rewritten == sorted(home) and r.added == [] and not r.names_changed
    assert read_index(out / "model.safetensors.index.json").weight_map[bias] in home
    after = snapshot(out)
    for name in set(before) - home:
        assert after[name] == before[name]
    check_caps(out, cap)
    check_against(out, new)
    check_merge(out, new, tmp_path)
    # data order inside the rewritten shard is model order: the bias beside its module
    names = [t.name for t in read_header(out / sorted(home)[0]).tensors]
    assert names == model_order(names)


def test_added_block_that_fits_nowhere_gets_a_new_shard_and_renames(tmp_path: Path) -> None:
    old = small_source(tmp_path / "old", gptq_tensors(3))
    out = tmp_path / "out"
    cap = cap_for(old, 3)
    safeshard.split(old, out, max_shard_size=cap)
    age(out)
    before = snapshot(out)
    new = small_source(tmp_path / "new", gptq_tensors(4))  # layer 3 is new
    r = safeshard.update(new, out)
    assert all(t.startswith("model.layers.3.") for t in r.added_tensors)
    assert r.changed == [] and r.removed_tensors == []
    assert r.names_changed and len(r.files) > len(before)
    assert r.added, "the new block needs a shard of its own"
    assert r.rewritten == []
    # every old file kept its content under its new name: renamed, same inode and mtime
    assert sorted(a for a, _ in r.renamed) == sorted(before)
    after = snapshot(out)
    for a, b in r.renamed:
        assert after[b] == before[a]
    assert not set(before) & set(after)  # every -of-N name changed
    assert r.removed == sorted(before)  # no old name is left
    assert any("every file name changed" in n for n in r.notes)
    check_caps(out, cap)
    check_against(out, new)
    check_merge(out, new, tmp_path)
    index_names = set(read_index(out / "model.safetensors.index.json").weight_map.values())
    assert index_names == set(after)


def test_removed_tensors_rewrite_their_shard_and_an_emptied_shard_goes(tmp_path: Path) -> None:
    old_t = gptq_tensors(3)
    old = small_source(tmp_path / "old", old_t)
    out = tmp_path / "out"
    safeshard.split(old, out, max_shard_size=cap_for(old, 4))
    age(out)
    before = snapshot(out)
    # drop one module of layer 0, and all of layer 1 (a shard of its own)
    layer1 = holders(out, "model.layers.1.")
    assert len(layer1) == 1
    (only1,) = layer1
    assert {t.name for t in read_header(out / only1).tensors} == {
        t for t in old_t if t.startswith("model.layers.1.")
    }
    gone = {t for t in old_t if t.startswith(("model.layers.1.", "model.layers.0.mlp.up_proj."))}
    new_t = {k: v for k, v in old_t.items() if k not in gone}
    # the source renumbers nothing: layer 2 stays layer 2
    new = small_source(tmp_path / "new", new_t)
    home0 = holders(out, "model.layers.0.mlp.up_proj.")
    r = safeshard.update(new, out)
    assert r.removed_tensors == sorted(gone) and r.changed == [] and r.added_tensors == []
    assert len(r.files) == len(before) - 1 and r.names_changed
    assert only1 in r.removed
    rewritten_from = {f.previous for f in r.files if f.status == "rewritten"}
    assert rewritten_from == home0
    after = snapshot(out)
    for a, b in r.renamed:
        assert after[b] == before[a]
    assert {a for a, _ in r.renamed} == set(before) - home0 - layer1
    check_against(out, new)
    check_merge(out, new, tmp_path)


def test_grown_tensor_splits_its_shard_renames_the_rest(tmp_path: Path) -> None:
    old_t = gptq_tensors(3)
    old = small_source(tmp_path / "old", old_t)
    out = tmp_path / "out"
    cap = cap_for(old, 3)
    safeshard.split(old, out, max_shard_size=cap)
    age(out)
    before = snapshot(out)
    target = "model.layers.1.mlp.down_proj"
    home = holders(out, target + ".")
    assert len(home) == 1
    new_t = dict(old_t)
    new_t.update(gptq_module(target, 96 * 8, 64))  # in-features x8: the module grows
    new = small_source(tmp_path / "new", new_t)
    r = safeshard.update(new, out)
    grown = {f"{target}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")}
    assert set(r.changed) == grown
    assert r.names_changed and len(r.files) > len(before)
    assert {f.previous for f in r.files if f.status == "rewritten"} == home
    assert r.added  # the overflow went to a new shard
    after = snapshot(out)
    assert {a for a, _ in r.renamed} == set(before) - home
    for a, b in r.renamed:
        assert after[b] == before[a]
    check_caps(out, cap)
    check_against(out, new)
    check_merge(out, new, tmp_path)


def test_tensor_over_the_cap_is_refused_unless_allowed(tmp_path: Path) -> None:
    old_t = gptq_tensors(3)
    old = small_source(tmp_path / "old", old_t)
    out = tmp_path / "out"
    cap = cap_for(old, 3)
    safeshard.split(old, out, max_shard_size=cap)
    new_t = dict(old_t)
    new_t["model.embed_tokens.weight"] = ("F16", (cap // 64, 64))
    new = small_source(tmp_path / "new", new_t)
    before = snapshot(out)
    with pytest.raises(OversizeTensorError, match=r"model\.embed_tokens\.weight"):
        safeshard.update(new, out)
    assert snapshot(out) == before
    r = safeshard.update(new, out, allow_oversize=True)
    assert any("oversized" in w for w in r.warnings)
    check_against(out, new)


def test_unchanged_oversized_shard_is_kept(tmp_path: Path) -> None:
    old_t = gptq_tensors(3)
    old_t["model.embed_tokens.weight"] = ("F16", (400, 64))  # 51,200 bytes
    old = small_source(tmp_path / "old", old_t)
    out = tmp_path / "out"
    cap = 40_000
    r0 = safeshard.split(old, out, max_shard_size=cap, allow_oversize=True)
    big = [f.file for f in r0.files if f.oversize]
    assert len(big) == 1
    age(out)
    before = snapshot(out)
    new = small_source(tmp_path / "new", old_t, {"model.norm.weight": b"\x01" * 128})
    r = safeshard.update(new, out)
    assert r.changed == ["model.norm.weight"]
    assert big[0] in r.kept and snapshot(out)[big[0]] == before[big[0]]
    assert any("kept as it was" in w for w in r.warnings)
    check_against(out, new)


def test_no_change_update_rewrites_nothing(gptq_old: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    split_old(gptq_old, out)
    stamps = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    shas = {p.name: sha(p) for p in out.iterdir() if p.is_file()}
    r = safeshard.update(gptq_old, out)
    assert r.up_to_date and r.changed == [] and r.rewritten == r.added == r.removed == []
    assert sorted(r.kept) == sorted(p.name for p in out.glob("*.safetensors"))
    for p in out.glob("*.safetensors"):
        assert (p.stat().st_mtime_ns, p.stat().st_ino) == stamps[p.name]
    for name in ("model.safetensors.index.json", "model.safeshard.json"):
        assert (out / name).stat().st_mtime_ns == stamps[name][0], name
    assert {p.name: sha(p) for p in out.iterdir() if p.is_file()} == shas


def test_metadata_change_rewrites_every_shard(tmp_path: Path) -> None:
    old_t = gptq_tensors(3)
    old = small_source(tmp_path / "old", old_t)
    out = tmp_path / "out"
    safeshard.split(old, out, max_shard_size=cap_for(old, 3))
    new = small_source(tmp_path / "new", old_t, metadata={"format": "pt"})
    r = safeshard.update(new, out)
    assert r.metadata_changed and r.changed == []
    assert r.kept == [] and r.renamed == []
    assert len(r.rewritten) == len(r.files)
    check_against(out, new)
    check_merge(out, new, tmp_path)


def test_smaller_cap_replans_only_the_shards_over_it(tmp_path: Path) -> None:
    old = small_source(tmp_path / "old", gptq_tensors(3))
    out = tmp_path / "out"
    safeshard.split(old, out, max_shard_size=cap_for(old, 4))
    sizes = {p.name: p.stat().st_size for p in out.glob("*.safetensors")}
    small = sorted(sizes.values())[-2]  # the largest shard no longer fits
    r = safeshard.update(old, out, max_shard_size=small)
    assert r.cap == small and r.changed == []
    assert len(r.files) > len(sizes)
    check_caps(out, small)
    check_against(out, old)
    man = read_manifest(out, "model")
    assert man is not None and man.cap == small


def test_one_file_split_stays_one_file(tmp_path: Path) -> None:
    old_t = gptq_tensors(3)
    old = small_source(tmp_path / "old", old_t)
    out = tmp_path / "out"
    safeshard.split(old, out)  # 4GB: one file, no index
    new_t = dict(old_t)
    new_t["model.layers.0.extra.weight"] = ("F16", (8,))
    new = small_source(tmp_path / "new", new_t)
    r = safeshard.update(new, out)
    assert [f.file for f in r.files] == ["model.safetensors"] and r.index is None
    assert r.rewritten == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    check_against(out, new)
    check_merge(out, new, tmp_path)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.data(),
    parts=st.integers(min_value=2, max_value=6),
)
def test_any_edit_gives_a_split_of_the_new_source(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, parts: int
) -> None:
    """Random changes, additions and removals: the result is always a sound split of the
    new source within the cap, and shards without a changed tensor keep their bytes."""
    tmp = tmp_path_factory.mktemp("prop")
    old_t = gptq_tensors(3)
    old = small_source(tmp / "old", old_t)
    out = tmp / "out"
    cap = cap_for(old, parts) + 2048
    safeshard.split(old, out, max_shard_size=cap)
    before = {sha(p): p.name for p in out.glob("*.safetensors")}
    names = sorted(old_t)
    modules = sorted({n.rsplit(".", 1)[0] for n in names})
    dropped = data.draw(st.sets(st.sampled_from(modules), max_size=6))
    removed = {n for n in names if n.rsplit(".", 1)[0] in dropped}  # whole GPTQ modules
    changed = data.draw(st.sets(st.sampled_from(sorted(set(names) - removed)), max_size=6))
    extra = data.draw(st.sets(st.integers(0, 3), max_size=3))
    new_t = {k: v for k, v in old_t.items() if k not in removed}
    for i in extra:
        new_t[f"model.layers.{i}.extra.weight"] = ("F16", (32,))
    blobs = {k: b"\xa5" * tensor_nbytes(*new_t[k]) for k in changed}
    new = small_source(tmp / "new", new_t, blobs)
    r = safeshard.update(new, out, sha256=True)
    assert set(r.removed_tensors) == removed
    check_caps(out, cap)
    check_against(out, new)
    check_merge(out, new, tmp)
    touched = set(r.changed) | removed
    for f in r.files:
        if f.status in ("kept", "renamed"):
            assert f.sha256 in before
            old_names = {t.name for t in read_header(out / f.file).tensors}
            assert not old_names & touched


# --------------------------------------------------------------------------- refusals and safety


def test_refused_without_a_manifest(gptq_old: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    split_old(gptq_old, out)
    (out / "model.safeshard.json").unlink()
    before = snapshot(out)
    with pytest.raises(UpdateError, match=r"no safeshard manifest.*--force"):
        safeshard.update(gptq_old, out)
    assert snapshot(out) == before
    with pytest.raises(UpdateError, match="no such folder"):
        safeshard.update(gptq_old, tmp_path / "nowhere")


def test_refused_when_the_split_does_not_match_its_manifest(gptq_old: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    split_old(gptq_old, out)
    mpath = out / "model.safeshard.json"
    obj = json.loads(mpath.read_text())
    obj["shards"][0]["size"] += 8
    mpath.write_text(json.dumps(obj))
    with pytest.raises(UpdateError, match=r"does not describe.*safeshard verify"):
        safeshard.update(gptq_old, out)
    # a shard missing: the index points at nothing
    fresh = tmp_path / "fresh"
    split_old(gptq_old, fresh)
    next(fresh.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(UpdateError, match=r"does not verify.*safeshard verify"):
        safeshard.update(gptq_old, fresh)


def test_new_source_inside_out_dir_is_refused(gptq_old: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    split_old(gptq_old, out)
    with pytest.raises(UsageError, match="NEW_SRC lies in OUT_DIR"):
        safeshard.update(out, out)


def test_locked_folder_is_refused(gptq_old: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    split_old(gptq_old, out)
    with DirLock(out), pytest.raises(OutputLockedError):
        safeshard.update(gptq_old, out)


def test_source_changing_during_the_update_changes_nothing(
    gptq_old: Path,
    gptq_new: tuple[Path, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    new, changed = gptq_new
    out = tmp_path / "out"
    split_old(gptq_old, out)
    before = {p.name: sha(p) for p in out.iterdir() if p.is_file()}
    upd = sys.modules["safeshard.ops.update"]
    real = upd._hash_source

    def stale(*args: object, **kw: object) -> tuple[dict[str, str], int]:
        hashes, n = real(*args, **kw)
        hashes[changed[0]] = "0" * 32  # as if the bytes changed between the two reads
        return hashes, n

    monkeypatch.setattr(upd, "_hash_source", stale)
    with pytest.raises(UpdateError, match="changed while the update read it"):
        safeshard.update(new, out)
    assert {p.name: sha(p) for p in out.iterdir() if p.is_file()} == before
    assert not list(out.glob(TMP_PREFIX + "*"))


def test_dry_run_writes_nothing(
    gptq_old: Path, gptq_new: tuple[Path, list[str]], tmp_path: Path
) -> None:
    new, _ = gptq_new
    out = tmp_path / "out"
    split_old(gptq_old, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = safeshard.update(new, out, dry_run=True)
    assert r.dry_run and r.rewritten == sorted(holders(out, "model.layers.2."))
    assert all(f.sha256 is None for f in r.files if f.status == "rewritten")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


@pytest.mark.parametrize(
    "point", ["staged:*", "journaled:*", "committing", "moved:model.safeshard.json"]
)
def test_killed_update_is_finished_by_the_next_run(tmp_path: Path, point: str) -> None:
    old = small_source(tmp_path / "old", gptq_tensors(3))
    new = small_source(tmp_path / "new", gptq_tensors(4))  # a new shard, renames
    out = tmp_path / "out"
    safeshard.split(old, out, max_shard_size=cap_for(old, 3))
    src_sha = sha(weights_file(new))
    proc = run_killed("update", point, new, out)
    assert proc.returncode == -9, proc.stderr
    assert sha(weights_file(new)) == src_sha
    index = out / "model.safetensors.index.json"
    if point in ("staged:*", "journaled:*"):
        # the old split is whole until the commit; only the staged shards lie beside it
        rep = safeshard.verify(out, against=old)
        assert rep.codes <= {"stale-temp"}, [f.message for f in rep.findings]
        r = safeshard.update(new, out)  # a second run finishes the job
        assert r.names_changed
        if point == "journaled:*":
            assert r.resumed, "the staged shard the journal vouches for is kept"
    else:
        if index.exists():  # any index present lists whole shards that agree with it
            safeshard.open_checkpoint(out)
        if point.startswith("moved:"):
            assert not index.exists()  # the old index went before anything moved
        r = safeshard.update(new, out)  # the next writer rolls the commit forward
        assert any("interrupted" in n for n in r.notes)
        assert r.up_to_date
    check_against(out, new)
    assert not list(out.glob(TMP_PREFIX + "*"))
    assert not (out / ".safeshard-journal.json").exists()


def test_interrupted_commit_is_finished_by_any_writer(tmp_path: Path) -> None:
    old = small_source(tmp_path / "old", gptq_tensors(3))
    new = small_source(tmp_path / "new", gptq_tensors(4))
    out = tmp_path / "out"
    safeshard.split(old, out, max_shard_size=cap_for(old, 3))
    assert run_killed("update", "moved:*", new, out).returncode == -9
    merged = tmp_path / "merged" / "m.safetensors"
    merged.parent.mkdir()
    # a merge of the folder itself cannot start until it is whole; a split --resume can
    r = safeshard.split(new, out, max_shard_size=cap_for(old, 3), resume=True)
    assert any("interrupted" in n for n in r.notes)
    check_against(out, new)


# --------------------------------------------------------------------------- CLI


def test_cli_update_json(gptq_old: Path, gptq_new: tuple[Path, list[str]], tmp_path: Path) -> None:
    new, changed = gptq_new
    out = tmp_path / "out"
    split_old(gptq_old, out)
    expected = sorted(holders(out, "model.layers.2."))
    res = CliRunner().invoke(main, ["split", str(new), str(out), "--update", "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.output)
    assert obj["rewritten"] == expected
    assert sorted(obj["kept"] + obj["rewritten"]) == sorted(
        p.name for p in out.glob("*.safetensors")
    )
    assert obj["added"] == obj["removed"] == obj["renamed"] == []
    assert obj["tensors"]["changed"] == changed
    assert obj["names_changed"] is False
    assert {s["file"]: s["status"] for s in obj["shards"]} == {
        n: ("rewritten" if n in expected else "kept") for n in obj["kept"] + obj["rewritten"]
    }
    check_against(out, new)


def test_cli_update_text_and_refusals(gptq_old: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    split_old(gptq_old, out)
    new = small_source(tmp_path / "new", gptq_tensors(1))  # another model: every file changes
    runner = CliRunner()
    res = runner.invoke(main, ["split", str(new), str(out), "--update"])
    assert res.exit_code == 0, res.output
    assert "removed (names no longer in OUT_DIR):" in res.output
    assert "every file name changed" in res.output
    res = runner.invoke(main, ["split", str(new), str(out), "--update", "--force"])
    assert res.exit_code == 2 and "--force" in res.output
    (out / "model.safeshard.json").unlink()
    res = runner.invoke(main, ["split", str(new), str(out), "--update"])
    assert res.exit_code == 3 and "no safeshard manifest" in res.output


def test_update_module_has_no_torch_or_numpy() -> None:
    code = (
        "import sys, safeshard.ops.update; assert 'torch' not in sys.modules; "
        "assert 'numpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
