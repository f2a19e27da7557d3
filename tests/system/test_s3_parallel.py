"""Parallel copies to and from object storage, counted where the server sees them.

An HTTP proxy (helpers.faultproxy) sits between safeshard (s3fs) and moto's S3 server on
127.0.0.1 and counts the requests it is forwarding at once: ranged GETs and multipart part uploads.
A reshard S3 -> S3 of a many-part shard must keep at least 4 of each in flight, within
the configured bounds, and write the same bytes; a load must keep at least 4 GETs in
flight; a server that ignores ``Range`` must not make a read fetch the whole object
(issue 16.4).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import safeshard
from helpers.faultproxy import FaultProxy, Rule
from helpers.s3kit import S3, random_model
from safeshard.checkpoint import find
from safeshard.errors import ReadError
from safeshard.io import remote
from safeshard.io.remote import DEFAULT_LIMITS, RemoteFile, filesystem

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def proxied(s3: S3) -> Iterator[tuple[str, dict[str, Any], FaultProxy]]:
    base, opts = s3
    with FaultProxy(opts["client_kwargs"]["endpoint_url"]) as proxy:
        ck = {"endpoint_url": proxy.url, "region_name": "us-east-1"}
        yield base, {**opts, "client_kwargs": ck}, proxy


@pytest.mark.slow
def test_reshard_s3_to_s3_keeps_gets_and_part_uploads_in_flight(
    proxied: tuple[str, dict[str, Any], FaultProxy], tmp_path: Path
) -> None:
    """Where the server cannot copy parts (like s3rver: a 501 for ``UploadPartCopy``), the
    bytes stream through this machine, with GETs and part uploads in flight."""
    base, opts, proxy = proxied
    # 48 MiB and a header: 7 parts of 8 MiB in one shard
    src = random_model(tmp_path / "src", layers=6, mib=8)
    fs, root = filesystem(base, opts)
    fs.put_file(str(src), f"{root}/src/model.safetensors")
    no_copy = proxy.add(Rule("PUT", r"partNumber=", "501", header="x-amz-copy-source"))
    proxy.reset()
    proxy.delay.update(get=0.2, part=0.5)  # a slow link: one request at a time would show
    DEFAULT_LIMITS.upload_stats.max_bytes_in_flight = 0
    r = safeshard.split(f"{base}/src", f"{base}/out", max_shard_size="1GB", storage_options=opts)
    assert len(r.files) == 1
    said = [n for n in r.notes if "cannot copy parts of objects" in n]
    assert len(said) == 1, r.notes
    assert no_copy.hits == 1  # asked once, before any byte was read
    assert proxy.peak["get"] >= 4, proxy.peak
    assert proxy.peak["part"] >= 4, proxy.peak
    assert proxy.peak["get"] <= DEFAULT_LIMITS.requests
    assert proxy.peak["part"] <= DEFAULT_LIMITS.uploads
    assert proxy.count["part"] == -(-src.stat().st_size // (8 * 2**20))  # each part once
    assert DEFAULT_LIMITS.upload_stats.max_bytes_in_flight <= DEFAULT_LIMITS.uploads * 8 * 2**20
    assert fs.cat_file(f"{root}/out/model.safetensors") == src.read_bytes()


@pytest.mark.slow
def test_reshard_s3_to_s3_has_the_server_copy_the_bytes(
    proxied: tuple[str, dict[str, Any], FaultProxy],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 18.1: source and output in one store, so each shard's bytes are copied by
    the server (``UploadPartCopy``, several in flight); only the header's part is sent
    from here. The shards are read back for their digests: a verify, a merge to the
    source's SHA-256 and ``sha256=True`` all agree with the source."""
    base, opts, proxy = proxied
    monkeypatch.setattr(remote, "COPY_PART_BYTES", 8 * 2**20)  # many parts from 48 MiB
    src = random_model(tmp_path / "src", layers=6, mib=8)
    fs, root = filesystem(base, opts)
    fs.put_file(str(src), f"{root}/src/model.safetensors")
    proxy.reset()
    proxy.delay.update(copy=0.5)
    copies = DEFAULT_LIMITS.copy_stats.requests
    r = safeshard.split(
        f"{base}/src", f"{base}/out", max_shard_size="1GB", storage_options=opts, sha256=True
    )
    assert [f.sha256 for f in r.files] == [hashlib.sha256(src.read_bytes()).hexdigest()]
    assert not [n for n in r.notes if "cannot copy" in n], r.notes
    assert proxy.count["part"] == 1  # the header and the first bytes
    assert proxy.count["copy"] == 6, proxy.count
    assert DEFAULT_LIMITS.copy_stats.requests - copies == 6
    assert 4 <= proxy.peak["copy"] <= DEFAULT_LIMITS.uploads, proxy.peak
    assert fs.cat_file(f"{root}/out/model.safetensors") == src.read_bytes()
    # a reshard into three shards: each one's header is new, its bytes copied
    proxy.reset()
    r3 = safeshard.split(
        f"{base}/out", f"{base}/three", max_shard_size="17MB", storage_options=opts
    )
    assert len(r3.files) == 3 and proxy.count["copy"] >= 3, proxy.count
    assert safeshard.verify(f"{base}/three", storage_options=opts).ok
    merged = safeshard.merge(f"{base}/three", tmp_path / "merged.safetensors", storage_options=opts)
    want = safeshard.load(src, framework="numpy")
    got = safeshard.load(merged.out_file, framework="numpy")
    assert got.keys() == want.keys()
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_a_server_whose_copies_fail_gets_the_shard_streamed(
    proxied: tuple[str, dict[str, Any], FaultProxy], tmp_path: Path
) -> None:
    """A server that refuses ``UploadPartCopy`` with another error than a 501 (a 400 here):
    the first part's failure makes the shard stream through this machine, said once;
    nothing else fails."""
    base, opts, proxy = proxied
    src = random_model(tmp_path / "src", layers=3, mib=8)
    fs, root = filesystem(base, opts)
    fs.put_file(str(src), f"{root}/src/model.safetensors")
    broken = proxy.add(Rule("PUT", r"partNumber=", "400", header="x-amz-copy-source"))
    r = safeshard.split(f"{base}/src", f"{base}/out", max_shard_size="1GB", storage_options=opts)
    said = [n for n in r.notes if "cannot copy parts of objects" in n]
    assert len(said) == 1 and "failed" in said[0], r.notes
    assert broken.hits >= 1
    assert fs.cat_file(f"{root}/out/model.safetensors") == src.read_bytes()
    assert not fs.list_multipart_uploads(root.split("/")[0])


@pytest.mark.slow
def test_load_keeps_gets_in_flight_and_reads_the_same_bytes(
    proxied: tuple[str, dict[str, Any], FaultProxy], tmp_path: Path
) -> None:
    base, opts, proxy = proxied
    src = random_model(tmp_path / "src", layers=4, mib=2)
    fs, root = filesystem(base, opts)
    fs.put_file(str(src), f"{root}/m/model.safetensors")
    proxy.reset()
    proxy.delay["get"] = 0.2
    got = safeshard.load(f"{base}/m", framework="numpy", storage_options=opts)
    assert proxy.peak["get"] >= 4, proxy.peak
    want = safeshard.load(src, framework="numpy")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k


def test_a_server_that_ignores_range_is_refused_without_reading_the_object(
    proxied: tuple[str, dict[str, Any], FaultProxy],
) -> None:
    """Issue 16.4: a 200 with the whole object for a ranged GET is stopped and refused
    (a range from byte 0 takes only the bytes asked for)."""
    base, opts, proxy = proxied
    fs, root = filesystem(base, opts)
    blob = os.urandom(3 * 1024 * 1024)
    fs.pipe_file(f"{root}/blob", blob)
    proxy.ignore_range = True
    fs2, path = filesystem(f"{base}/blob", opts)
    src = RemoteFile(fs2, path, name=f"{base}/blob")
    head = memoryview(bytearray(8))
    assert src.readinto([head], 0) == 8 and bytes(head) == blob[:8]
    before = DEFAULT_LIMITS.stats.bytes
    with pytest.raises(ReadError, match="ignored the Range header"):
        src.readinto([memoryview(bytearray(16))], 1000)
    assert DEFAULT_LIMITS.stats.bytes - before <= 16  # the body was not read


def test_a_server_that_cannot_list_uploads_is_named_once(
    proxied: tuple[str, dict[str, Any], FaultProxy], tmp_path: Path
) -> None:
    """Issue 16.8: where incomplete uploads cannot be listed (s3rver), the notes say once
    that a killed run's leftovers cannot be cleaned, instead of skipping silently."""
    base, opts, proxy = proxied
    src = random_model(tmp_path / "src", layers=3, mib=1)
    proxy.add(Rule("GET", r"[?&]uploads", "501"))  # like s3rver: no ListMultipartUploads
    r = safeshard.split(src, f"{base}/out", max_shard_size="1.1MB", storage_options=opts)
    assert len(r.files) == 3
    said = [n for n in r.notes if "cannot list incomplete multipart uploads" in n]
    assert len(said) == 1, r.notes


def test_finding_a_checkpoint_asks_the_server_once_what_its_path_is(
    proxied: tuple[str, dict[str, Any], FaultProxy], tmp_path: Path
) -> None:
    """Whether the path is an object, a prefix or nothing is one lookup (s3fs's ``info``:
    a HEAD, then a listing for a prefix), not one for ``exists`` and another for
    ``is_file``: each is a round trip to a remote server."""
    base, opts, proxy = proxied
    src = random_model(tmp_path / "src", layers=2, mib=1)
    fs, root = filesystem(base, opts)
    fs.put_file(str(src), f"{root}/m/model.safetensors")
    proxy.reset()
    found = find(f"{base}/m", opts)
    assert found.file is not None and found.file.name == "model.safetensors"
    heads = [t for m, t in proxy.seen if m == "HEAD" and t.split("?")[0].rstrip("/").endswith("/m")]
    assert len(heads) == 1, proxy.seen
