"""remote: fsspec URLs as byte sources; parallel ranged GETs under a bound, against real S3."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from safeshard.errors import CheckpointNotFoundError, MissingExtraError, ReadError, UsageError
from safeshard.io.bytesrc import LocalFile, read_exact, read_into
from safeshard.io.remote import RemoteFile, RemoteLimits, filesystem, is_url


def test_is_url() -> None:
    assert is_url("s3://b/k") and is_url("memory://x") and is_url("file:///tmp/x")
    assert not is_url("/tmp/x") and not is_url("model.safetensors") and not is_url("C:\\x")


def test_a_missing_protocol_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    for name in ("s3", "s3a"):
        monkeypatch.delitem(registry._registry, name, raising=False)
    with pytest.raises(MissingExtraError, match=r"safeshard\[s3\]"):
        filesystem("s3://bucket/key")


def test_an_unknown_protocol_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="nosuchproto"):
        filesystem("nosuchproto://x/y")


def put(fs: Any, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def test_memory_source_reads_exact_bytes_in_parts() -> None:
    fs, path = filesystem("memory://safeshard-test/a.bin")
    data = os.urandom(100_000)
    put(fs, path, data)
    limits = RemoteLimits(requests=3, request_bytes=7_000)
    src = RemoteFile(fs, path, name="memory://safeshard-test/a.bin", limits=limits)
    assert src.size == len(data) and src.fileno() is None
    bufs = [memoryview(bytearray(n)) for n in (1, 30_000, 0, 50_000, 5)]
    read_exact(src, bufs, 123, "a test range")
    assert b"".join(bytes(b) for b in bufs) == data[123 : 123 + 80_006]
    assert limits.stats.requests == 12 and limits.stats.max_requests_in_flight <= 3
    tail = memoryview(bytearray(100))
    assert read_into(src, [tail], len(data) - 10) == 10
    with pytest.raises(ReadError, match="ended"):
        read_exact(src, [memoryview(bytearray(100))], len(data) - 10, "the end")


def test_local_file_and_read_loop(tmp_path: Any) -> None:
    p = tmp_path / "f.bin"
    data = os.urandom(5000)
    p.write_bytes(data)
    with LocalFile.open(p) as src:
        assert src.fileno() is not None and src.size == 5000
        bufs = [memoryview(bytearray(n)) for n in [100] * 2000]  # more than IOV_MAX buffers
        assert read_into(src, bufs, 0) == 5000
        assert b"".join(bytes(b) for b in bufs)[:5000] == data
    with pytest.raises(ReadError, match="cannot open"):
        LocalFile.open(tmp_path / "missing")


def test_s3_parallel_ranged_reads_stay_within_the_bound(s3: tuple[str, dict[str, Any]]) -> None:
    base, options = s3
    fs, path = filesystem(f"{base}/big.bin", options)
    data = os.urandom(3 * 1024 * 1024 + 17)
    put(fs, path, data)
    limits = RemoteLimits(requests=4, request_bytes=256 * 1024)
    src = RemoteFile(fs, path, name=f"{base}/big.bin", limits=limits)
    out: list[bytes] = [b""] * 4

    def reader(i: int) -> None:  # several readers share the limits
        buf = memoryview(bytearray(len(data) // 4))
        read_exact(src, [buf], i * len(buf), f"quarter {i}")
        out[i] = bytes(buf)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b"".join(out) == data[: 4 * (len(data) // 4)]
    st = limits.stats
    assert 2 <= st.max_requests_in_flight <= 4, st
    assert st.max_bytes_in_flight <= limits.max_bytes_in_flight


def test_s3_errors_are_clear(s3: tuple[str, dict[str, Any]]) -> None:
    base, options = s3
    fs, path = filesystem(f"{base}/missing.safetensors", options)
    with pytest.raises(CheckpointNotFoundError, match="no such object"):
        RemoteFile(fs, path, name=f"{base}/missing.safetensors")
    fs2, path2 = filesystem("s3://no-such-bucket-safeshard/x", options)
    with pytest.raises((CheckpointNotFoundError, ReadError)):
        RemoteFile(fs2, path2, name="s3://no-such-bucket-safeshard/x")


def test_a_failing_ranged_read_is_retried_then_named(monkeypatch: pytest.MonkeyPatch) -> None:
    fs, path = filesystem("memory://safeshard-test/r.bin")
    put(fs, path, b"x" * 1000)
    limits = RemoteLimits(requests=2, request_bytes=400, retries=2)
    src = RemoteFile(fs, path, name="memory://safeshard-test/r.bin", limits=limits)
    calls = {"n": 0}
    real = fs.cat_file

    def flaky(p: str, start: int, end: int) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionResetError("reset by peer")
        if start == 400:
            return bytes(real(p, start=start, end=end))[:-1]  # always short
        return bytes(real(p, start=start, end=end))

    monkeypatch.setattr(fs, "cat_file", flaky)
    with pytest.raises(ReadError, match=r"bytes 400-799 failed after 3 attempts"):
        read_exact(src, [memoryview(bytearray(1000))], 0, "all")
    assert limits.stats.retries >= 3
