"""A hostile index must not read outside the checkpoint, over any protocol (issue 16, item 2).

Shard names are checked as written and percent-decoded (``%2E%2E%2F`` is ``../`` to a
server that decodes paths), with one error class per rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import safeshard
from conftest import write_st
from helpers.faultproxy import FolderServer
from safeshard import errors
from safeshard.checkpoint import read_index
from safeshard.cli import main
from safeshard.format.index import check_shard_name

RULES = [
    # (weight_map value, the error class of the rule it breaks)
    ("%2E%2E%2F%2E%2E%2Fevil.safetensors", errors.IndexPathTraversalError),
    ("%2e%2e/evil.safetensors", errors.IndexPathTraversalError),
    ("..%2Fevil.safetensors", errors.IndexPathTraversalError),
    ("%252E%252E%252Fevil.safetensors", errors.IndexPathTraversalError),  # decoded twice
    ("..", errors.IndexPathTraversalError),
    ("../evil.safetensors", errors.IndexPathTraversalError),
    ("a%2Fb.safetensors", errors.IndexPathSeparatorError),
    ("a%5Cb.safetensors", errors.IndexPathSeparatorError),
    ("a%5cb.safetensors", errors.IndexPathSeparatorError),
    ("a\\b.safetensors", errors.IndexPathSeparatorError),
    ("a/b.safetensors", errors.IndexPathSeparatorError),
    ("%00.safetensors", errors.IndexPathNulError),
    ("a\x00.safetensors", errors.IndexPathNulError),
    ("%2Fetc%2Fevil.safetensors", errors.IndexPathAbsoluteError),
    ("/etc/evil.safetensors", errors.IndexPathAbsoluteError),
    ("%5Cevil.safetensors", errors.IndexPathAbsoluteError),
    ("C%3Aevil.safetensors", errors.IndexPathAbsoluteError),
    ("http:evil.safetensors", errors.IndexPathSchemeError),
    ("http%3A%2F%2Fevil.example%2Fx.safetensors", errors.IndexPathSchemeError),
    ("s3://bucket/evil.safetensors", errors.IndexPathSchemeError),
    ("file%3A%2F%2F%2Fetc%2Fx.safetensors", errors.IndexPathSchemeError),
]


@pytest.mark.parametrize("value, cls", RULES)
def test_each_rule_has_its_class_as_written_and_percent_decoded(
    tmp_path: Path, value: str, cls: type[errors.UnsafeIndexPathError]
) -> None:
    with pytest.raises(cls) as info:
        check_shard_name("i.json", "t", value)
    assert isinstance(info.value, errors.UnsafeIndexPathError)
    assert isinstance(info.value, ValueError)
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"t": value}}))
    with pytest.raises(cls):
        read_index(idx)


@pytest.mark.parametrize(
    "value",
    [
        "model-00001-of-00002.safetensors",
        "model%20x.safetensors",
        "a..b.safetensors",
        "x y.safetensors",
    ],
)
def test_harmless_names_still_pass(value: str) -> None:
    assert check_shard_name("i.json", "t", value) == value


def _hostile_tree(root: Path) -> Path:
    """root/a/evil.safetensors (outside) and root/a/b/ckpt/ (an index naming it)."""
    write_st(
        root / "a" / "evil.safetensors", {"stolen": ("F32", [4])}, fill=lambda n, k: b"\x7f" * k
    )
    ckpt = root / "a" / "b" / "ckpt"
    write_st(ckpt / "model-00001-of-00001.safetensors", {"ok": ("F32", [2])})
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"stolen": "%2E%2E%2F%2E%2E%2Fevil.safetensors"}})
    )
    return ckpt


def test_a_percent_encoded_climb_reads_nothing_over_http(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    pytest.importorskip("upath")
    _hostile_tree(tmp_path)
    with FolderServer(tmp_path) as srv:
        url = f"{srv.url}/a/b/ckpt/model.safetensors.index.json"
        with pytest.raises(errors.IndexPathTraversalError, match="percent-decoded"):
            safeshard.load(url, framework="numpy")
        with pytest.raises(errors.IndexPathTraversalError):
            safeshard.open_checkpoint(url)
        for cmd in (["inspect", url], ["merge", url, str(tmp_path / "out.safetensors")]):
            r = CliRunner().invoke(main, cmd)
            assert r.exit_code == 3, r.output
            assert "climbs out" in r.output
        assert "/a/evil.safetensors" not in srv.seen  # never even asked for
    assert not (tmp_path / "out.safetensors").exists()


def test_the_server_does_decode_paths(tmp_path: Path) -> None:
    """The server above serves a decoded climb: the test above would catch a regression."""
    import urllib.request

    _hostile_tree(tmp_path)
    with FolderServer(tmp_path) as srv:
        url = f"{srv.url}/a/b/ckpt/%2E%2E%2F%2E%2E%2Fevil.safetensors"
        with urllib.request.urlopen(url) as r:
            assert r.read() == (tmp_path / "a" / "evil.safetensors").read_bytes()


def test_memory_protocol_is_checked_the_same(tmp_path: Path) -> None:
    pytest.importorskip("upath")
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe(
        "/h16a-safety/ckpt/model.safetensors.index.json",
        json.dumps({"weight_map": {"t": "..%5Cx.safetensors"}}).encode(),
    )
    try:
        with pytest.raises(errors.UnsafeIndexPathError):
            safeshard.open_checkpoint("memory://h16a-safety/ckpt/model.safetensors.index.json")
    finally:
        fs.rm("/h16a-safety", recursive=True)
