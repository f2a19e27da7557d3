"""Hugging Face indexes: strict parsing and path safety of weight_map values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeshard.checkpoint import read_index
from safeshard.errors import (
    CheckpointNotFoundError,
    IndexFormatError,
    ReadError,
    UnsafeIndexPathError,
)
from safeshard.format.index import (
    SHARD_RE,
    ShardIndex,
    check_shard_name,
    index_base,
    index_json,
    parse_index_bytes,
    shard_name,
)

INDEX = "model.safetensors.index.json"


def write_index(tmp_path: Path, obj: Any, name: str = INDEX) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


@pytest.mark.parametrize(
    "value",
    [
        "../x.safetensors",
        "../../etc/passwd.safetensors",
        "/abs.safetensors",
        "sub/x.safetensors",
        "sub\\x.safetensors",
        "C:\\x.safetensors",
        "C:x.safetensors",
        "c:/x.safetensors",
        "..\\x.safetensors",
        "\\\\server\\share\\x.safetensors",
        "..",
        ".",
        "x.bin",
        "x.safetensors.bin",
        "x.SAFETENSORS",
        "x.safetensors\x00.txt",
        "",
        5,
        None,
        ["x.safetensors"],
    ],
)
def test_unsafe_shard_names_rejected(tmp_path: Path, value: object) -> None:
    p = write_index(tmp_path, {"metadata": {}, "weight_map": {"w": value}})
    with pytest.raises(UnsafeIndexPathError) as info:
        read_index(p)
    assert str(p) in str(info.value)
    assert "'w'" in str(info.value)  # names the tensor
    assert isinstance(info.value, IndexFormatError) and isinstance(info.value, ValueError)
    with pytest.raises(UnsafeIndexPathError):
        check_shard_name(p, "w", value)


@pytest.mark.parametrize(
    "value",
    ["model-00001-of-00002.safetensors", "gptq_model-4bit-128g.safetensors", "x y.safetensors"],
)
def test_plain_names_accepted(tmp_path: Path, value: str) -> None:
    p = write_index(tmp_path, {"metadata": {"total_size": 12}, "weight_map": {"w": value}})
    idx = read_index(p)
    assert idx.weight_map == {"w": value}
    assert idx.total_size == 12
    assert check_shard_name(p, "w", value) == value


@pytest.mark.parametrize("total", [-1, "12", True, False, 1.5, None, [1]])
def test_total_size_must_be_non_negative_int(tmp_path: Path, total: object) -> None:
    p = write_index(tmp_path, {"metadata": {"total_size": total}, "weight_map": {}})
    with pytest.raises(IndexFormatError, match="total_size") as info:
        read_index(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("total", [0, 1, 10**13])
def test_total_size_accepted(tmp_path: Path, total: int) -> None:
    p = write_index(tmp_path, {"metadata": {"total_size": total}, "weight_map": {}})
    assert read_index(p).total_size == total


@pytest.mark.parametrize(
    "raw",
    [
        b'{"metadata":{},"weight_map":{"a":"x.safetensors","a":"y.safetensors"}}',
        b'{"weight_map":{},"weight_map":{}}',
        b'{"metadata":{"total_size":1,"total_size":2},"weight_map":{}}',
    ],
    ids=["weight_map", "top-level", "metadata"],
)
def test_duplicate_keys_rejected(tmp_path: Path, raw: bytes) -> None:
    p = tmp_path / INDEX
    p.write_bytes(raw)
    with pytest.raises(IndexFormatError, match="appears twice") as info:
        read_index(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"[]", "must be a JSON object"),
        (b'"weight_map"', "must be a JSON object"),
        (b"{}", "no 'weight_map'"),
        (b'{"weight_map":[]}', "no 'weight_map'"),
        (b'{"weight_map":{},"metadata":[]}', "'metadata' must be an object"),
        (b'{"weight_map":', "not a valid JSON"),
        (b"\xff\xfe{}", "not a valid JSON"),
        (b"[" * 100_000, "not a valid JSON"),
        (b"", "not a valid JSON"),
    ],
)
def test_malformed_index_rejected(tmp_path: Path, raw: bytes, match: str) -> None:
    p = tmp_path / INDEX
    p.write_bytes(raw)
    with pytest.raises(IndexFormatError, match=match) as info:
        read_index(p)
    assert str(p) in str(info.value)


def test_metadata_null_and_absent_are_empty(tmp_path: Path) -> None:
    objs: list[dict[str, object]] = [{"weight_map": {}}, {"metadata": None, "weight_map": {}}]
    for obj in objs:
        idx = read_index(write_index(tmp_path, obj))
        assert idx.metadata == {} and idx.total_size is None


def test_index_accessors(tmp_path: Path) -> None:
    wm = {
        "b": "model-00002-of-00002.safetensors",
        "a": "model-00001-of-00002.safetensors",
        "c": "model-00001-of-00002.safetensors",
    }
    p = write_index(tmp_path / "sub", {"metadata": {"total_size": 3}, "weight_map": wm})
    idx = read_index(p)
    assert isinstance(idx, ShardIndex)
    assert idx.folder == tmp_path / "sub" and idx.base == "model"
    assert idx.shard_files() == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert idx.tensors_by_shard() == {
        "model-00001-of-00002.safetensors": ["a", "c"],
        "model-00002-of-00002.safetensors": ["b"],
    }


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=10),
        st.integers(1, 3).map(lambda i: shard_name("model", i, 3)),
        max_size=8,
    ),
    st.integers(0, 10**12),
)
def test_index_json_round_trips_with_sorted_keys(wm: dict[str, str], total: int) -> None:
    data = index_json(wm, {"total_size": total})
    obj = json.loads(data)
    assert list(obj) == ["metadata", "weight_map"]
    assert list(obj["weight_map"]) == sorted(wm)
    idx = parse_index_bytes(data, INDEX)
    assert idx.weight_map == wm and idx.total_size == total
    assert data.endswith(b"\n")


@given(st.from_regex(r"[A-Za-z0-9_.]{1,12}", fullmatch=True), st.integers(1, 99999))
def test_shard_name_matches_shard_re(base: str, n: int) -> None:
    for i in {1, n}:
        name = shard_name(base, i, n)
        m = SHARD_RE.match(name)
        assert m is not None
        assert (m["base"], int(m["i"]), int(m["n"])) == (base, i, n)
    assert shard_name("model", 1, 3) == "model-00001-of-00003.safetensors"


def test_every_entry_naming_an_unsafe_shard_is_caught(tmp_path: Path) -> None:
    """Names are checked once each, so an unsafe one after many safe ones still fails."""
    wm: dict[str, object] = {f"t{i}": "model-00001-of-00002.safetensors" for i in range(1000)}
    wm["last"] = "../model-00001-of-00002.safetensors"
    with pytest.raises(UnsafeIndexPathError, match="'last'"):
        read_index(write_index(tmp_path, {"weight_map": wm}))
    wm["last"] = ["model-00001-of-00002.safetensors"]  # not even a string
    with pytest.raises(UnsafeIndexPathError, match="non-empty file name"):
        read_index(write_index(tmp_path, {"weight_map": wm}))


def test_unreadable_index_is_a_safeshard_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such index"):
        read_index(tmp_path / INDEX)
    (tmp_path / "dir.safetensors.index.json").mkdir()
    with pytest.raises(ReadError, match="cannot read the index"):
        read_index(tmp_path / "dir.safetensors.index.json")


@pytest.mark.parametrize(
    "name, base",
    [
        ("model.safetensors.index.json", "model"),
        ("gptq_model-4bit-128g.safetensors.index.json", "gptq_model-4bit-128g"),
        ("model.index.json", "model"),
    ],
)
def test_index_base(tmp_path: Path, name: str, base: str) -> None:
    assert index_base(name) == base
    p = write_index(tmp_path, {"weight_map": {}}, name)
    assert read_index(p).base == base


@given(
    st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=20),
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(
            st.integers(), st.text(max_size=6), st.none(), st.lists(st.integers(), max_size=3)
        ),
        max_size=4,
    ),
)
def test_index_json_is_byte_identical_to_json_dumps(
    weight_map: dict[str, str], metadata: dict[str, object]
) -> None:
    """The fast writer must write what transformers and huggingface_hub write."""
    want = (
        json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True)
        + "\n"
    )
    assert index_json(weight_map, metadata) == want.encode("utf-8")
