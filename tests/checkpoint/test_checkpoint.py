"""Discovery (``locate``) and reading a checkpoint as one set of tensors (``open_checkpoint``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from safeshard.checkpoint import Found, find, locate, open_checkpoint, read_json_file
from safeshard.errors import (
    AmbiguousCheckpointError,
    CheckpointNotFoundError,
    HeaderError,
    IndexFormatError,
    ShardMismatchError,
    UnsafeIndexPathError,
)
from safeshard.format.index import index_json, shard_name

TensorDecl = tuple[str, list[int]]
WriteST = Callable[..., Path]  # the st_file fixture (tests/conftest.py)
ONE: dict[str, TensorDecl] = {"w": ("F16", [2, 2])}


def write_sharded(
    write_st: WriteST,
    folder: Path,
    shards: list[Mapping[str, TensorDecl]],
    base: str = "model",
    weight_map: dict[str, str] | None = None,
) -> Path:
    """Write ``shards`` as ``{base}-0000i-of-0000n.safetensors`` plus the index."""
    n = len(shards)
    wm: dict[str, str] = {}
    for i, tensors in enumerate(shards, 1):
        write_st(folder / shard_name(base, i, n), tensors, {"format": "pt"})
        wm.update({t: shard_name(base, i, n) for t in tensors})
    index = folder / f"{base}.safetensors.index.json"
    index.write_bytes(index_json(weight_map if weight_map is not None else wm, {"total_size": 0}))
    return index


# --------------------------------------------------------------------------- locate


def test_locate_single_file(tmp_path: Path, st_file: WriteST) -> None:
    f = st_file(tmp_path / "whatever.safetensors", ONE)
    loc = locate(f)
    assert loc.files == (f,) and loc.index is None
    assert loc.folder == tmp_path and loc.base == "whatever"
    assert loc.paths == (f,)


def test_locate_index_path(tmp_path: Path, st_file: WriteST) -> None:
    index = write_sharded(st_file, tmp_path, [{"a": ("U8", [1])}, {"b": ("U8", [1])}])
    loc = locate(index)
    assert loc.index is not None and loc.index.path == index
    assert [f.name for f in loc.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert loc.base == "model" and loc.paths[-1] == index


def test_folder_with_index(tmp_path: Path, st_file: WriteST) -> None:
    index = write_sharded(st_file, tmp_path, [{"a": ("U8", [1])}, {"b": ("U8", [1])}])
    (tmp_path / "config.json").write_text("{}")
    loc = locate(tmp_path)
    assert loc.index is not None and loc.index.path == index and len(loc.files) == 2


@pytest.mark.parametrize("base", ["model", "gptq_model-4bit-128g", "my-weights"])
def test_index_comes_before_a_single_file_of_the_same_base(
    tmp_path: Path, st_file: WriteST, base: str
) -> None:
    """Every loader tries {base}.safetensors.index.json before {base}.safetensors."""
    index = write_sharded(st_file, tmp_path, [{"a": ("U8", [1])}, {"b": ("U8", [1])}], base=base)
    st_file(tmp_path / f"{base}.safetensors", {"stale": ("U8", [1])})
    loc = locate(tmp_path)
    assert loc.index is not None and loc.index.path == index


def test_quantize_config_model_file_base_name(tmp_path: Path, st_file: WriteST) -> None:
    (tmp_path / "quantize_config.json").write_text(
        json.dumps({"bits": 4, "group_size": 128, "model_file_base_name": "my-weights"})
    )
    f = st_file(tmp_path / "my-weights.safetensors", ONE)
    loc = locate(tmp_path)
    assert loc.files == (f,) and loc.base == "my-weights"


def test_autogptq_file_name(tmp_path: Path, st_file: WriteST) -> None:
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    f = st_file(tmp_path / "gptq_model-4bit-128g.safetensors", ONE)
    loc = locate(tmp_path)
    assert loc.files == (f,) and loc.base == "gptq_model-4bit-128g"


def test_model_safetensors(tmp_path: Path, st_file: WriteST) -> None:
    f = st_file(tmp_path / "model.safetensors", ONE)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert locate(tmp_path).files == (f,)


@pytest.mark.parametrize(
    "names",
    [
        ["gptq_model-4bit-128g.safetensors", "model.safetensors"],
        ["a.safetensors", "b.safetensors"],
        ["model.safetensors.index.json", "gptq_model-4bit-128g.safetensors"],
        ["model.safetensors.index.json", "other.safetensors.index.json"],
    ],
)
def test_two_candidates_are_ambiguous_and_both_listed(
    tmp_path: Path, st_file: WriteST, names: list[str]
) -> None:
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    for name in names:
        if name.endswith(".index.json"):
            write_sharded(st_file, tmp_path, [{"a": ("U8", [1])}], base=name.split(".")[0])
        else:
            st_file(tmp_path / name, ONE)
    with pytest.raises(AmbiguousCheckpointError) as info:
        locate(tmp_path)
    for name in names:
        assert name in str(info.value)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("extra", [[], ["config.json", "README.md"]])
def test_empty_folder_not_found(tmp_path: Path, extra: list[str]) -> None:
    for name in extra:
        (tmp_path / name).write_text("{}")
    with pytest.raises(CheckpointNotFoundError) as info:
        locate(tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path) in str(info.value)


def test_orphan_shards_without_index(tmp_path: Path, st_file: WriteST) -> None:
    write_sharded(st_file, tmp_path, [{"a": ("U8", [1])}, {"b": ("U8", [1])}])
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"without an index.*00001-of-00002"):
        locate(tmp_path)


def test_missing_path_and_wrong_file_kind(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        locate(tmp_path / "nope")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError, match=r"not a \.safetensors file"):
        locate(tmp_path / "pytorch_model.bin")


def test_unsafe_index_is_refused_at_discovery(tmp_path: Path, st_file: WriteST) -> None:
    write_sharded(st_file, tmp_path, [{"a": ("U8", [1])}], weight_map={"a": "../a.safetensors"})
    with pytest.raises(UnsafeIndexPathError):
        locate(tmp_path)


def test_find_decides_by_names_and_parses_nothing(tmp_path: Path, st_file: WriteST) -> None:
    """``find`` is the rule every command shares (verify too, which then reads the index
    leniently): a malformed index is still the checkpoint a folder means."""
    index = write_sharded(st_file, tmp_path, [{"a": ("U8", [1])}])
    index.write_text("{not json")
    st_file(tmp_path / "model.safetensors", ONE)  # same base: the index is meant
    assert find(tmp_path) == Found(folder=tmp_path, index=index)
    assert find(tmp_path).base == "model"
    assert find(tmp_path / "model.safetensors") == Found(
        folder=tmp_path, file=tmp_path / "model.safetensors"
    )
    with pytest.raises(IndexFormatError):
        locate(tmp_path)
    st_file(tmp_path / "other.safetensors", ONE)
    with pytest.raises(AmbiguousCheckpointError):
        find(tmp_path)


def test_read_json_file(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "b.json").write_text("[1]")
    (tmp_path / "c.json").write_text("{nope")
    assert read_json_file(tmp_path / "a.json") == {"x": 1}
    assert read_json_file(tmp_path / "b.json") is None
    assert read_json_file(tmp_path / "c.json") is None
    assert read_json_file(tmp_path / "absent.json") is None


# --------------------------------------------------------------------------- open_checkpoint


def _fill(name: str, n: int) -> bytes:
    return (name.encode() * n)[:n]


def test_open_single_file_offsets_point_at_the_data(tmp_path: Path, st_file: WriteST) -> None:
    tensors: dict[str, TensorDecl] = {"x": ("F32", [3]), "yy": ("I8", [5]), "z": ("F16", [0])}
    f = st_file(tmp_path / "model.safetensors", tensors, {"format": "pt"}, fill=_fill)
    ck = open_checkpoint(tmp_path)
    assert set(ck.entries) == set(tensors)
    assert ck.metadata == {"format": "pt"}
    assert ck.total_tensor_bytes == 12 + 5
    assert ck.file_size == f.stat().st_size
    raw = f.read_bytes()
    for name in tensors:
        e = ck.entries[name]
        assert ck.path_of(name) == f
        start = ck.absolute_offset(name)
        assert raw[start : start + e.info.nbytes] == _fill(name, e.info.nbytes)


def test_open_sharded(tmp_path: Path, st_file: WriteST) -> None:
    shards: list[Mapping[str, TensorDecl]] = [
        {"a": ("U8", [3]), "b": ("F16", [2])},
        {"c": ("I32", [1])},
    ]
    write_sharded(st_file, tmp_path, shards)
    ck = open_checkpoint(tmp_path)
    assert ck.index is not None and len(ck.headers) == 2
    assert ck.path_of("c").name == "model-00002-of-00002.safetensors"
    assert ck.entries["c"].shard == 1 and ck.entries["a"].shard == 0
    assert ck.total_tensor_bytes == 3 + 4 + 4
    assert ck.file_size == sum(
        (tmp_path / shard_name("model", i, 2)).stat().st_size for i in (1, 2)
    )
    assert sorted(t.name for t in ck.tensors()) == ["a", "b", "c"]


S1, S2 = shard_name("model", 1, 2), shard_name("model", 2, 2)


@pytest.mark.parametrize(
    "weight_map, match",
    [
        ({"a": S2, "b": S1}, r"'a' is indexed to model-00002-of-00002.*lies in model-00001"),
        ({"a": S1, "b": S2, "ghost": S1}, r"'ghost' listed in the index.*is in no shard"),
        ({"a": S1}, r"'b' in model-00002-of-00002.safetensors is not in the index"),
    ],
    ids=["wrong-shard", "missing-tensor", "unlisted-tensor"],
)
def test_index_and_shards_disagree(
    tmp_path: Path, st_file: WriteST, weight_map: dict[str, str], match: str
) -> None:
    index = write_sharded(
        st_file, tmp_path, [{"a": ("U8", [1])}, {"b": ("U8", [1])}], weight_map=weight_map
    )
    if "b" not in weight_map:  # keep shard 2 listed so that it is read
        weight_map = {**weight_map, "other": S2}
        st_file(tmp_path / S2, {"b": ("U8", [1]), "other": ("U8", [1])})
        index.write_bytes(index_json(weight_map, {}))
    with pytest.raises(ShardMismatchError, match=match) as info:
        open_checkpoint(tmp_path)
    assert str(index) in str(info.value)
    assert isinstance(info.value, ValueError)
    # without the index check, only the shards are read
    ck = open_checkpoint(tmp_path, check_index=False)
    assert "b" in ck.entries


def test_tensor_in_two_shards(tmp_path: Path, st_file: WriteST) -> None:
    write_sharded(
        st_file, tmp_path, [{"a": ("U8", [1])}, {"a": ("U8", [1])}], weight_map={"a": S1, "x": S2}
    )
    with pytest.raises(ShardMismatchError, match="'a' is in both"):
        open_checkpoint(tmp_path)


def test_many_problems_are_summarised(tmp_path: Path, st_file: WriteST) -> None:
    wm = {f"ghost{i}": S1 for i in range(8)} | {"a": S1, "b": S2}
    write_sharded(st_file, tmp_path, [{"a": ("U8", [1])}, {"b": ("U8", [1])}], weight_map=wm)
    with pytest.raises(ShardMismatchError, match=r"and 3 more.*safeshard verify"):
        open_checkpoint(tmp_path)


def test_missing_shard_file(tmp_path: Path, st_file: WriteST) -> None:
    index = write_sharded(st_file, tmp_path, [{"a": ("U8", [1])}, {"b": ("U8", [1])}])
    (tmp_path / S2).unlink()
    with pytest.raises(CheckpointNotFoundError, match=S2) as info:
        open_checkpoint(index)
    assert str(index) in str(info.value)


def test_bad_shard_header_names_the_shard(tmp_path: Path, st_file: WriteST) -> None:
    write_sharded(st_file, tmp_path, [{"a": ("U8", [1])}, {"b": ("U8", [1])}])
    with open(tmp_path / S2, "ab") as f:
        f.write(b"trailing")
    with pytest.raises(HeaderError) as info:
        open_checkpoint(tmp_path)
    assert S2 in str(info.value)


def test_the_headers_of_shards_in_object_storage_are_read_at_once(
    st_file: WriteST,
    tmp_path: Path,
    s3: tuple[str, dict[str, object]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each header in object storage waits out a round trip or two: the shards' headers
    are read in parallel (two reads meet at a barrier, which one reader after another
    would never reach), and come back in the shards' order."""
    import safeshard.checkpoint as door
    from helpers.reads import Meeting
    from safeshard.io.remote import filesystem

    shards: list[Mapping[str, TensorDecl]] = [{f"t{i}": ("F16", [i + 1])} for i in range(4)]
    folder = write_sharded(st_file, tmp_path / "m", shards).parent
    base, opts = s3
    fs, root = filesystem(base, opts)
    fs.put(str(folder) + "/", f"{root}/m/", recursive=True)
    meeting = Meeting(door._header_at)
    monkeypatch.setattr(door, "_header_at", meeting)
    ckpt = open_checkpoint(f"{base}/m", storage_options=opts)
    assert [[t.name for t in h.tensors] for h in ckpt.headers] == [["t0"], ["t1"], ["t2"], ["t3"]]
    assert not meeting.broken
