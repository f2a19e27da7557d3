"""merge: lossless round trips for every writer and cap, reshard chains, foreign shards,
index validation, refusals."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeshard
from helpers.splitkit import (
    all_tensor_bytes,
    gptq_llama,
    llama,
    sha256,
    tensor_bytes,
    write_custom,
    write_official,
)
from safeshard.checkpoint import read_header
from safeshard.cli import main
from safeshard.errors import (
    DiskFullError,
    OutputExistsError,
    ShardMismatchError,
)
from safeshard.format.blocks import model_order
from safeshard.format.filenames import TMP_PREFIX

META = {"format": "pt", "quantizer": "test"}


def round_trip(source: Path, work: Path, **kw: object) -> Path:
    out = work / "shards"
    safeshard.split(source, out, **kw)  # type: ignore[arg-type]
    merged = work / "merged.safetensors"
    r = safeshard.merge(out, merged)
    assert r.lossless, r.reason
    assert r.sha256 is None  # SHA-256 only when asked for
    assert r.verified == r.tensors  # every tensor's digest matched the manifest
    return merged


def test_merge_with_sha256_reports_the_output_hash(tmp_path: Path) -> None:
    source = write_official(tmp_path / "src" / "model.safetensors", gptq_llama(), META)
    safeshard.split(source, tmp_path / "shards", max_shard_size=25_000)
    merged = tmp_path / "merged.safetensors"
    r = safeshard.merge(tmp_path / "shards", merged, sha256=True)
    assert r.sha256 == sha256(merged) == sha256(source)


# --------------------------------------------------------------------------- lossless


def reversed_keys(t: dict[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    return sorted(t, reverse=True)


WRITERS = {
    "official": lambda p, t: write_official(p, t, META),
    "compact-model-order": lambda p, t: write_custom(p, t, META),
    "pretty-meta-last-padded": lambda p, t: write_custom(
        p, t, META, key_order=reversed_keys(t), metadata_at=10**6, indent=2, extra_pad=13
    ),
    "meta-middle-shuffled-data": lambda p, t: write_custom(
        p, t, META, key_order=sorted(t), data_order=reversed_keys(t), metadata_at=3, extra_pad=3
    ),
    "no-metadata": lambda p, t: write_custom(p, t, None, data_order=sorted(t)),
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("cap", [12_000, 25_000, 60_000, 10**9])
def test_round_trip_is_byte_identical(tmp_path: Path, writer: str, cap: int) -> None:
    source = WRITERS[writer](tmp_path / "src" / "model.safetensors", gptq_llama())
    merged = round_trip(source, tmp_path, max_shard_size=cap)
    assert merged.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("writer", list(WRITERS))
def test_round_trip_balanced(tmp_path: Path, writer: str) -> None:
    source = WRITERS[writer](tmp_path / "src" / "model.safetensors", llama(layers=6))
    merged = round_trip(source, tmp_path, max_shard_size=9_000, balance=True)
    assert sha256(merged) == sha256(source)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cap=st.integers(min_value=2_300, max_value=60_000),
    balance=st.booleans(),
    layers=st.integers(min_value=0, max_value=5),
    writer=st.sampled_from(sorted(WRITERS)),
)
def test_round_trip_property(cap: int, balance: bool, layers: int, writer: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = WRITERS[writer](work / "src" / "model.safetensors", llama(layers=layers))
        out = work / "shards"
        r = safeshard.split(source, out, max_shard_size=cap, balance=balance, allow_oversize=True)
        for f in r.files:
            assert (out / f.file).stat().st_size == f.size
            assert f.size <= cap or (f.oversize and f.tensors == 1)
        m = safeshard.merge(out, work / "m.safetensors")
        assert m.lossless
        assert sha256(work / "m.safetensors") == sha256(source)


@pytest.mark.parametrize("preset", ["tiny-gptq", "tiny-llama", "tiny-llama-tied", "tiny-moe"])
def test_round_trip_presets(tmp_path: Path, preset: str) -> None:
    synth = pytest.importorskip("safeshard.ops.synth")
    folder = synth.synthesize(tmp_path / "src", preset)
    source = next(folder.glob("*.safetensors"))
    size = source.stat().st_size
    for i, cap in enumerate([size // 5, size // 2]):
        out = tmp_path / f"shards{i}"
        r = safeshard.split(folder, out, max_shard_size=cap, allow_oversize=True)
        assert len(r.files) > 1
        merged = tmp_path / f"merged{i}.safetensors"
        assert safeshard.merge(out, merged).lossless
        assert sha256(merged) == sha256(source)


def test_reshard_chain_3_then_5_then_merge(tmp_path: Path) -> None:
    source = write_custom(
        tmp_path / "src" / "model.safetensors",
        llama(layers=10),
        META,
        key_order=sorted(llama(layers=10), reverse=True),
        indent=1,
        extra_pad=5,
    )
    size = source.stat().st_size
    three = tmp_path / "three"
    r3 = safeshard.split(source, three, max_shard_size=size // 3 + 2_000, balance=True)
    assert len(r3.files) == 3
    five = tmp_path / "five"
    r5 = safeshard.split(
        three / "model.safetensors.index.json", five, max_shard_size=size // 5 + 800, balance=True
    )
    assert len(r5.files) == 5 and r5.lossless
    two = tmp_path / "two"
    safeshard.split(five, two, max_shard_size=size // 2 + 2_000, name="again")
    single = tmp_path / "single"
    safeshard.split(two, single, max_shard_size=10**9)  # back into one file, still recorded
    for folder in (three, five, two, single):
        merged = tmp_path / f"{folder.name}.safetensors"
        r = safeshard.merge(folder, merged)
        assert r.lossless and sha256(merged) == sha256(source), folder.name


# --------------------------------------------------------------------------- canonical


def foreign_shards(folder: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> Path:
    """Shards written by 'another tool': two files and an index, no manifest."""
    names = list(tensors)
    half = len(names) // 2
    parts = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map: dict[str, str] = {}
    for i, (fname, keys) in enumerate(parts.items()):
        write_custom(folder / fname, {k: tensors[k] for k in keys}, {"format": "pt"}, seed=i)
        weight_map.update(dict.fromkeys(keys, fname))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


def test_foreign_shards_merge_canonical_and_say_so(tmp_path: Path) -> None:
    folder = foreign_shards(tmp_path / "f", llama(layers=3))
    merged = tmp_path / "m.safetensors"
    r = safeshard.merge(folder, merged)
    assert not r.lossless and "no safeshard manifest" in r.reason and "canonical" in r.reason
    h = read_header(merged)
    assert [t.name for t in h.tensors] == model_order(list(llama(layers=3)))
    assert h.metadata == {"format": "pt"}
    assert h.header_len % 8 == 0
    assert tensor_bytes(merged) == all_tensor_bytes(folder)
    res = CliRunner().invoke(main, ["merge", str(folder), str(tmp_path / "c.safetensors")])
    assert res.exit_code == 0 and "canonical" in res.output


def test_split_of_foreign_shards_then_merge_is_canonical_but_complete(tmp_path: Path) -> None:
    folder = foreign_shards(tmp_path / "f", llama(layers=3))
    out = tmp_path / "re"
    r = safeshard.split(folder, out, max_shard_size=6_000)
    assert not r.lossless
    m = safeshard.merge(out, tmp_path / "m.safetensors")
    assert not m.lossless and "records no original" in m.reason
    assert m.verified == len(llama(layers=3))
    assert tensor_bytes(tmp_path / "m.safetensors") == all_tensor_bytes(folder)


def test_changed_shards_fall_back_to_canonical(tmp_path: Path) -> None:
    source = write_custom(tmp_path / "src" / "model.safetensors", llama(layers=2), META)
    out = tmp_path / "out"
    safeshard.split(source, out, max_shard_size=10**9)
    # a new tensor appears: the recorded header no longer describes the shards
    extra = dict(llama(layers=2))
    extra["model.extra.weight"] = ("F16", (4,))
    write_custom(out / "model.safetensors", extra, META)
    r = safeshard.merge(out, tmp_path / "m.safetensors")
    assert not r.lossless and "differ" in r.reason


# --------------------------------------------------------------------------- validation, refusals


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    source = write_official(tmp_path / "src" / "model.safetensors", llama(layers=4), META)
    out = tmp_path / "shards"
    safeshard.split(source, out, max_shard_size=7_000)
    return out


def _edit_index(shards: Path, fn: object) -> None:
    p = shards / "model.safetensors.index.json"
    obj = json.loads(p.read_text())
    fn(obj["weight_map"])  # type: ignore[operator]
    p.write_text(json.dumps(obj))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda wm: wm.pop("model.norm.weight"), "not in the index"),
        (lambda wm: wm.__setitem__("model.ghost.weight", wm["model.norm.weight"]), "in no shard"),
        (
            lambda wm: wm.__setitem__("model.norm.weight", "model-00001-of-00004.safetensors"),
            "indexed to",
        ),
    ],
)
def test_index_is_validated_first(shards: Path, tmp_path: Path, edit: object, message: str) -> None:
    assert len(list(shards.glob("*.safetensors"))) == 4
    _edit_index(shards, edit)
    with pytest.raises(ShardMismatchError, match=message):
        safeshard.merge(shards, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_duplicate_tensor_across_shards_refused(shards: Path, tmp_path: Path) -> None:
    first = sorted(shards.glob("*.safetensors"))[0]
    second = sorted(shards.glob("*.safetensors"))[1]
    dup = {t.name: (t.dtype, t.shape) for t in read_header(first).tensors}
    dup.update({t.name: (t.dtype, t.shape) for t in read_header(second).tensors})
    write_custom(second, dup, META)
    with pytest.raises(ShardMismatchError, match="in both"):
        safeshard.merge(shards, tmp_path / "m.safetensors")


def test_missing_shard_refused(shards: Path, tmp_path: Path) -> None:
    sorted(shards.glob("*.safetensors"))[2].unlink()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safeshard.merge(shards, tmp_path / "m.safetensors")


def test_existing_output_refused_unless_force(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        safeshard.merge(shards, out)
    assert out.read_bytes() == b"keep me"
    r = safeshard.merge(shards, out, force=True)
    assert r.lossless and sha256(out) == sha256(tmp_path / "src" / "model.safetensors")
    res = CliRunner().invoke(main, ["merge", str(shards), str(out)])
    assert res.exit_code == 3 and "already exists" in res.output


def test_output_that_is_a_shard_refused_even_with_force(shards: Path) -> None:
    shard = sorted(shards.glob("*.safetensors"))[0]
    before = sha256(shard)
    with pytest.raises(OutputExistsError, match="own files"):
        safeshard.merge(shards, shard, force=True)
    assert sha256(shard) == before


def test_corrupted_shard_fails_and_writes_nothing(shards: Path, tmp_path: Path) -> None:
    shard = sorted(shards.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        b = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    out = tmp_path / "m.safetensors"
    with pytest.raises(ShardMismatchError, match="digest") as e:
        safeshard.merge(shards, out)
    assert shard.name in str(e.value)
    assert not out.exists()
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))


def test_full_disk_removes_partial(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.copy_file_range
    calls = {"n": 0}

    def full(*args: int) -> int:
        calls["n"] += 1
        if calls["n"] > 1 or args[3] > 0:  # after the first bytes of data
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", full)
    out = tmp_path / "m.safetensors"
    with pytest.raises(DiskFullError, match="partial file was removed"):
        safeshard.merge(shards, out)
    assert not out.exists()
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))


def test_zero_size_and_scalar_tensors_round_trip(tmp_path: Path) -> None:
    tensors = {
        "model.embed_tokens.weight": ("F32", (4, 4)),
        "model.layers.0.empty.weight": ("F16", (0, 7)),
        "model.layers.0.scalar": ("I64", ()),
        "model.layers.1.mlp.weight": ("BF16", (3, 5)),
        "lm_head.weight": ("F32", (4, 4)),
    }
    source = write_custom(tmp_path / "src" / "model.safetensors", tensors, META, indent=3)
    merged = round_trip(source, tmp_path, max_shard_size=400)
    assert merged.read_bytes() == source.read_bytes()


def test_cli_json(shards: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["merge", str(shards), str(tmp_path / "m.safetensors"), "--json"]
    )
    assert res.exit_code == 0, res.output
    obj = json.loads(res.output)
    assert obj["lossless"] is True and obj["sha256"] is None
    res = CliRunner().invoke(
        main,
        ["merge", str(shards), str(tmp_path / "m.safetensors"), "--json", "--force", "--sha256"],
    )
    obj = json.loads(res.output)
    assert obj["lossless"] is True and obj["sha256"] == sha256(tmp_path / "m.safetensors")
    assert obj["verified_tensors"] == len(llama(layers=4))
