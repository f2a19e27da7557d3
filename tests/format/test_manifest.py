"""manifest: the JSON round trip (golden bytes), digests, and malformed manifests refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xxhash

from safeshard.errors import IndexFormatError
from safeshard.format.manifest import (
    Manifest,
    ShardRecord,
    SourceRecord,
    TensorRecord,
    header_digest,
    manifest_path,
    tensor_digest,
)

M = Manifest(
    base="model",
    cap=1000,
    shards=[
        ShardRecord("model-00001-of-00002.safetensors", 600, None, "h1"),
        ShardRecord("model-00002-of-00002.safetensors", 500, "ab" * 32, "h2"),
    ],
    tensors={"b": TensorRecord("d2", 8), "a": TensorRecord("d1", 4)},
    source=SourceRecord("orig.safetensors", 1100, '{"a":{}}'),
    fingerprint="fp",
)

GOLDEN = (
    b'{"format":"safeshard-manifest","version":2,"base":"model","cap":1000,"shards":['
    b'{"file":"model-00001-of-00002.safetensors","size":600,"header":"h1","sha256":null},'
    b'{"file":"model-00002-of-00002.safetensors","size":500,"header":"h2","sha256":"'
    + b"ab"
    * 32
    + b'"}],"tensor_digest":"xxh3_128","tensors":{"a":{"digest":"d1","nbytes":4},'
    b'"b":{"digest":"d2","nbytes":8}},"source":{"file":"orig.safetensors","size":1100,'
    b'"header":"{\\"a\\":{}}"},"fingerprint":"fp"}\n'
)


def test_to_json_golden_bytes_and_round_trip() -> None:
    assert M.to_json() == GOLDEN  # compact, tensors sorted by name
    assert Manifest.from_json(GOLDEN) == M


def test_minimal_manifest_round_trips() -> None:
    m = Manifest(base="x", cap=None)
    assert Manifest.from_json(m.to_json()) == m


def test_non_ascii_names_stay_utf8() -> None:
    m = Manifest(base="modèle", cap=None, tensors={"é": TensorRecord("d", 1)})
    data = m.to_json()
    assert "modèle".encode() in data
    assert Manifest.from_json(data) == m


def test_version_1_is_read() -> None:
    obj = json.loads(GOLDEN)
    obj["version"] = 1
    assert Manifest.from_json(json.dumps(obj).encode()) == M


def test_digests() -> None:
    assert tensor_digest(b"abc") == xxhash.xxh3_128(b"abc").hexdigest()
    assert header_digest(b"{}") == header_digest(bytearray(b"{}")) != header_digest(b"{ }")
    assert manifest_path(Path("/o"), "model") == Path("/o/model.safeshard.json")


def _with(**change: object) -> bytes:
    obj = json.loads(GOLDEN)
    obj.update(change)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not a safeshard manifest"),
        (_with(format="other"), "not a safeshard manifest"),
        (_with(version=3), "version 3 is not supported"),
        (_with(tensor_digest="sha1"), "tensor digests are 'sha1'"),
        (_with(shards=[{"file": "a"}]), "malformed manifest"),
        (_with(shards=[{"file": "a", "size": 1, "sha256": 5}]), "malformed manifest"),
        (_with(tensors={"a": {"digest": "d"}}), "malformed manifest"),
        (_with(tensors=[]), "malformed manifest"),
        (_with(cap="big"), "malformed manifest"),
        (_with(source={"file": "f", "size": 1, "header": "\ud800"}), "malformed manifest"),
    ],
)
def test_malformed_manifests_are_refused_naming_the_file(data: bytes, match: str) -> None:
    with pytest.raises(IndexFormatError, match=match) as e:
        Manifest.from_json(data, "/o/model.safeshard.json")
    assert str(e.value).startswith("/o/model.safeshard.json: ")
