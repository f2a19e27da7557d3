"""writer: base names checked, output file names, and the manifest/index of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safeshard.errors import UsageError
from safeshard.format.header import TensorSpec
from safeshard.format.manifest import Manifest
from safeshard.io.transaction import FileRecord
from safeshard.ops.writer import check_base, describe_checkpoint, output_names


@pytest.mark.parametrize("base", ["model", "gptq_model-4bit-128g", "modèle", "a.b"])
def test_usable_base_names_pass(base: str) -> None:
    assert check_base(base) == base


@pytest.mark.parametrize(
    "base",
    ["", ".", "..", ".hidden", "a/b", "a\\b", "a\x00b", "m.safetensors", "m.json", "bad\udcff"],
)
def test_unusable_base_names_are_a_usage_error(base: str) -> None:
    with pytest.raises(UsageError, match="is not a usable base name"):
        check_base(base)


def test_output_names() -> None:
    assert output_names("m", 1) == ["m.safetensors"]
    assert output_names("m", 3) == [
        "m-00001-of-00003.safetensors",
        "m-00002-of-00003.safetensors",
        "m-00003-of-00003.safetensors",
    ]


A, B, C = (TensorSpec(n, "F16", (2,), 4) for n in "abc")


def test_describe_a_sharded_checkpoint() -> None:
    names = output_names("m", 2)
    records = {
        names[0]: FileRecord(100, "h0", {"a": "da", "b": "db"}, sha256="s0"),
        names[1]: FileRecord(50, "h1", {"c": "dc"}),
    }
    files = describe_checkpoint(
        Path("/out"),
        "m",
        names,
        [[A, B], [C]],
        records,
        cap=120,
        source=None,
        fingerprint="fp",
        index_metadata={"format": "pt"},
    )
    assert list(files) == ["m.safeshard.json", "m.safetensors.index.json"]  # index last
    man = Manifest.from_json(files["m.safeshard.json"] or b"")
    assert (man.base, man.cap, man.fingerprint) == ("m", 120, "fp")
    assert [(s.file, s.size, s.sha256, s.header) for s in man.shards] == [
        (names[0], 100, "s0", "h0"),
        (names[1], 50, None, "h1"),
    ]
    assert {k: (t.digest, t.nbytes) for k, t in man.tensors.items()} == {
        "a": ("da", 4),
        "b": ("db", 4),
        "c": ("dc", 4),
    }
    index = json.loads(files["m.safetensors.index.json"] or b"")
    assert index["metadata"] == {"format": "pt", "total_size": 12}
    assert index["weight_map"] == {"a": names[0], "b": names[0], "c": names[1]}


def test_a_single_file_has_no_index() -> None:
    files = describe_checkpoint(
        Path("/out"),
        "m",
        ["m.safetensors"],
        [[A]],
        {"m.safetensors": FileRecord(30, "h", {"a": "da"})},
        cap=None,
        source=None,
        fingerprint=None,
    )
    assert files["m.safetensors.index.json"] is None
    assert Manifest.from_json(files["m.safeshard.json"] or b"").tensors["a"].digest == "da"


def test_a_record_missing_a_tensor_digest_is_not_silently_dropped() -> None:
    with pytest.raises(KeyError):
        describe_checkpoint(
            Path("/out"),
            "m",
            ["m.safetensors"],
            [[A, B]],
            {"m.safetensors": FileRecord(30, "h", {"a": "da"})},
            cap=None,
            source=None,
            fingerprint=None,
        )
