"""store: local paths stay Paths, URLs become remote paths, messages redact credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

from safeshard.errors import ReadError
from safeshard.io.bytesrc import LocalFile
from safeshard.io.store import as_path, is_remote, open_source, url_of


def test_local_paths_and_file_urls_are_paths(tmp_path: Path) -> None:
    assert as_path(str(tmp_path)) == tmp_path and type(as_path(str(tmp_path))) is type(tmp_path)
    assert as_path(tmp_path) == tmp_path
    assert as_path(f"file://{tmp_path}/x") == tmp_path / "x"
    assert not is_remote(tmp_path) and not is_remote(str(tmp_path)) and not is_remote(None)


def test_an_s3_url_is_a_remote_path() -> None:
    pytest.importorskip("upath")
    pytest.importorskip("s3fs")
    p = as_path("s3://bucket/prefix/model", {"anon": True})
    assert is_remote(p)
    assert str(p).startswith("s3://bucket/prefix/model")
    assert as_path(p) is p  # already remote: kept as is


def test_url_of_redacts_credentials() -> None:
    shown = url_of("https://user:hunter2@example.com/m?X-Amz-Signature=abc123&x=1")
    assert "hunter2" not in shown and "abc123" not in shown
    assert "example.com/m" in shown
    assert url_of(Path("/a/b")) == "/a/b"


def test_open_source_local(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"0123456789")
    src = open_source(p)
    with src:
        assert isinstance(src, LocalFile) and src.size == 10
        buf = bytearray(4)
        assert src.readinto([memoryview(buf)], 3) == 4 and bytes(buf) == b"3456"
    with pytest.raises(ReadError, match=r"missing\.bin"):
        open_source(tmp_path / "missing.bin")
