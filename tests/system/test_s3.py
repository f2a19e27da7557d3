"""Object storage end to end, against a real S3 API (moto's server on 127.0.0.1).

split local -> S3, reshard S3 -> S3, verify on S3 (clean and after a flipped byte),
merge S3 -> local (the original SHA-256), update on S3 (only changed shards uploaded),
an upload killed midway (no index, no incomplete multipart upload), and the errors: a
missing bucket, a missing key, refused credentials, an unreachable endpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import safeshard
from helpers.s3kit import S3, cli_options, random_model, sha, synth_tiny, weights
from safeshard.checkpoint import read_header
from safeshard.errors import CheckpointNotFoundError, ReadError, SafeshardError
from safeshard.io.remote import filesystem

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

tiny = pytest.fixture(scope="module", name="tiny")(synth_tiny)


def objects(url: str, options: dict[str, Any]) -> list[str]:
    fs, root = filesystem(url, options)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, refresh=True))


def uploads(url: str, options: dict[str, Any]) -> list[str]:
    fs, root = filesystem(url, options)
    return [u["Key"] for u in fs.list_multipart_uploads(root.split("/")[0]) or []]


def test_split_local_to_s3_then_verify_and_merge_back(tiny: Path, s3: S3, tmp_path: Path) -> None:
    base, opts = s3
    cap = weights(tiny).stat().st_size // 3
    r = safeshard.split(tiny, f"{base}/out", max_shard_size=cap, storage_options=opts)
    assert len(r.files) >= 3
    names = objects(f"{base}/out", opts)
    assert "model.safetensors.index.json" in names and "config.json" in names
    assert [f.file for f in r.files] == [n for n in names if n.startswith("model-")]
    rep = safeshard.verify(f"{base}/out", against=tiny, storage_options=opts)
    assert rep.ok, [f.message for f in rep.findings]
    merged = tmp_path / "merged.safetensors"
    m = safeshard.merge(f"{base}/out", merged, storage_options=opts, sha256=True)
    assert m.lossless and m.sha256 == sha(merged) == sha(weights(tiny))


def test_reshard_s3_to_s3_and_a_flipped_byte_is_found(tiny: Path, s3: S3) -> None:
    base, opts = s3
    size = weights(tiny).stat().st_size
    safeshard.split(tiny, f"{base}/a", max_shard_size=size // 2, storage_options=opts)
    r = safeshard.split(f"{base}/a", f"{base}/b", max_shard_size=size // 4, storage_options=opts)
    assert len(r.files) >= 4
    assert safeshard.verify(f"{base}/b", storage_options=opts).ok
    assert safeshard.verify(f"{base}/b", against=tiny, storage_options=opts).ok
    # flip one byte of one object
    fs, root = filesystem(f"{base}/b", opts)
    key = f"{root}/{r.files[1].file}"
    data = bytearray(fs.cat_file(key))
    data[-3] ^= 0x01
    fs.pipe_file(key, bytes(data))
    rep = safeshard.verify(f"{base}/b", storage_options=opts)
    assert rep.codes == {"manifest-tensor-hash"}
    assert {f.file for f in rep.findings} == {r.files[1].file}
    rep = safeshard.verify(f"{base}/b", against=tiny, storage_options=opts)
    assert "against-bytes" in rep.codes


def test_inspect_reads_only_headers(tiny: Path, s3: S3) -> None:
    base, opts = s3
    safeshard.split(tiny, f"{base}/x", max_shard_size="100MB", storage_options=opts)
    report = safeshard.inspect(f"{base}/x", "1MB", storage_options=opts)
    assert report.tensor_count == len(read_header(weights(tiny)).tensors)
    assert report.quant is not None and report.predicted_shards and report.predicted_shards >= 2


def test_update_on_s3_uploads_only_changed_shards(tiny: Path, s3: S3, tmp_path: Path) -> None:
    base, opts = s3
    cap = weights(tiny).stat().st_size // 4
    safeshard.split(tiny, f"{base}/u", max_shard_size=cap, storage_options=opts)
    fs, root = filesystem(f"{base}/u", opts)
    before = {p: fs.info(p)["ETag"] for p in fs.ls(root, refresh=True)}
    new = tmp_path / "new"
    new.mkdir()
    for f in tiny.iterdir():
        (new / f.name).write_bytes(f.read_bytes())
    h = read_header(weights(new))
    t = h.by_name["model.layers.1.mlp.down_proj.scales"]
    with open(weights(new), "r+b") as fh:
        fh.seek(h.data_start + t.begin)
        fh.write(b"\x00\x3c" * (t.nbytes // 2))  # fp16 1.0
    r = safeshard.update(new, f"{base}/u", storage_options=opts)
    assert r.rewritten and r.kept and not r.names_changed
    after = {p: fs.info(p)["ETag"] for p in fs.ls(root, refresh=True)}
    for name in r.kept:
        assert after[f"{root}/{name}"] == before[f"{root}/{name}"], name
    for name in r.rewritten:
        assert after[f"{root}/{name}"] != before[f"{root}/{name}"], name
    assert safeshard.verify(f"{base}/u", against=new, storage_options=opts).ok


# --------------------------------------------------------------------------- interrupted uploads


def test_a_failing_upload_is_aborted_and_leaves_no_index(s3: S3, tmp_path: Path) -> None:
    base, opts = s3
    src = random_model(tmp_path / "src", layers=3, mib=14, embed=True)  # several parts a shard
    real = os.preadv
    calls = {"n": 0}

    def fail_later(fd: int, bufs: list[memoryview], offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 2:  # mid-way through the first shard, its upload begun
            raise OSError(5, "Input/output error")
        return real(fd, bufs, offset)

    os.preadv = fail_later  # type: ignore[assignment]
    try:
        with pytest.raises(ReadError):
            safeshard.split(src, f"{base}/f", max_shard_size=20_000_000, storage_options=opts)
    finally:
        os.preadv = real
    if _exists(f"{base}/f", opts):
        assert "model.safetensors.index.json" not in objects(f"{base}/f", opts)
    assert uploads(f"{base}/f", opts) == []  # the upload in flight was aborted


KILL = """
import os, sys, json, time, threading, safeshard
real, lock, calls = os.preadv, threading.Lock(), [0]
def stall(fd, bufs, offset):
    with lock:
        calls[0] += 1
        n = calls[0]
    if n > 12:  # part-way through the second shard: its upload begun, never finished
        while True:
            time.sleep(60)
    return real(fd, bufs, offset)
os.preadv = stall
safeshard.split(sys.argv[1], sys.argv[2], max_shard_size=100_000_000,
                storage_options=json.loads(sys.argv[3]), force=True)
"""


def test_an_upload_killed_midway_leaves_no_index_and_the_next_run_cleans_up(
    s3: S3, tmp_path: Path
) -> None:
    import json

    base, opts = s3
    src = random_model(
        tmp_path / "src", layers=10, mib=14, embed=True
    )  # 150 MB: shards of many 16 MiB parts
    url = f"{base}/k"
    # The child stalls its reads part-way through, so the upload it began stays in flight
    # until the kill: no race between the upload finishing and the signal landing.
    proc = subprocess.Popen([sys.executable, "-c", KILL, str(src), url, json.dumps(opts)])
    deadline = time.time() + 120
    while not uploads(url, opts) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the upload finished before it could be killed"
    assert uploads(url, opts), "a multipart upload was in flight"
    if _exists(url, opts):
        assert "model.safetensors.index.json" not in objects(url, opts)
    r = safeshard.split(src, url, max_shard_size=100_000_000, storage_options=opts, force=True)
    assert uploads(url, opts) == []  # what the killed run left was aborted
    assert len(r.files) >= 2
    assert safeshard.verify(url, against=src, storage_options=opts).ok


def _exists(url: str, opts: dict[str, Any]) -> bool:
    fs, root = filesystem(url, opts)
    return bool(fs.exists(root))


# --------------------------------------------------------------------------- errors


def test_a_missing_bucket_or_key_is_a_clear_error(s3: S3) -> None:
    _, opts = s3
    with pytest.raises(CheckpointNotFoundError, match="no such"):
        safeshard.inspect("s3://no-such-bucket-here/model", storage_options=opts)
    base, _ = s3
    with pytest.raises(CheckpointNotFoundError, match="no such"):
        safeshard.inspect(f"{base}/missing/model.safetensors", storage_options=opts)


def test_an_unreachable_endpoint_is_a_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    opts = {
        "key": "x",
        "secret": "y",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
        "skip_instance_cache": True,
    }
    t0 = time.time()
    with pytest.raises(SafeshardError, match=r"127\.0\.0\.1|connect|reach") as e:
        safeshard.inspect("s3://bucket/model.safetensors", storage_options=opts)
    assert isinstance(e.value, OSError)
    assert time.time() - t0 < 60
    assert "y" not in str(e.value).split()  # the secret is never shown


def test_refused_credentials_are_a_clear_error(s3_auth_endpoint: str) -> None:
    opts = {
        "key": "AKIAUNKNOWNKEY00000",
        "secret": "not-the-secret",
        "client_kwargs": {"endpoint_url": s3_auth_endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    with pytest.raises(ReadError, match="credentials") as e:
        safeshard.inspect("s3://bucket/model.safetensors", storage_options=opts)
    assert e.value.errno == 13
    assert "not-the-secret" not in str(e.value)


def test_cli_split_inspect_verify_and_merge_on_s3(tiny: Path, s3: S3, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from safeshard.cli import main

    base, opts = s3
    runner = CliRunner()
    flags = cli_options(opts)
    cap = str(weights(tiny).stat().st_size // 3)
    res = runner.invoke(main, ["split", str(tiny), f"{base}/cli", "-s", cap, "--json", *flags])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["shards"]) >= 3
    res = runner.invoke(main, ["inspect", f"{base}/cli", "--json", *flags])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["tensor_count"] == len(read_header(weights(tiny)).tensors)
    res = runner.invoke(main, ["verify", f"{base}/cli", "--against", str(tiny), *flags])
    assert res.exit_code == 0, res.output
    merged = tmp_path / "m.safetensors"
    res = runner.invoke(main, ["merge", f"{base}/cli", str(merged), *flags])
    assert res.exit_code == 0, res.output
    assert sha(merged) == sha(weights(tiny))
    assert opts["secret"] not in res.output
    res = runner.invoke(main, ["inspect", f"{base}/nothing-here", *flags])
    assert res.exit_code == 3, res.output


def test_storage_option_parsing() -> None:
    from safeshard.cli import parse_storage_options
    from safeshard.errors import UsageError

    got = parse_storage_options(
        ("anon=true", "client_kwargs.region_name=eu-west-1", "max_concurrency=8", "key=abc")
    )
    assert got == {
        "anon": True,
        "client_kwargs": {"region_name": "eu-west-1"},
        "max_concurrency": 8,
        "key": "abc",
    }
    assert parse_storage_options(()) is None
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_storage_options(("novalue",))


# --------------------------------------------------------------------------- loading


def test_load_and_a_budgeted_walk_from_s3_equal_a_local_load(tiny: Path, s3: S3) -> None:
    import numpy as np

    from safeshard.io.remote import DEFAULT_LIMITS

    base, opts = s3
    cap = weights(tiny).stat().st_size // 3
    safeshard.split(tiny, f"{base}/load", max_shard_size=cap, storage_options=opts)
    local = safeshard.load(tiny, framework="numpy")
    before = DEFAULT_LIMITS.stats.requests
    remote = safeshard.load(f"{base}/load", framework="numpy", storage_options=opts)
    assert DEFAULT_LIMITS.stats.requests > before  # ranged GETs, not a download
    assert DEFAULT_LIMITS.stats.max_bytes_in_flight <= DEFAULT_LIMITS.max_bytes_in_flight
    assert remote.keys() == local.keys()
    for name in local:
        assert np.array_equal(remote[name].view(np.uint8), local[name].view(np.uint8)), name
    budget = 400_000
    seen: dict[str, bytes] = {}
    with safeshard.open(
        f"{base}/load",
        framework="numpy",
        max_resident_bytes=budget,
        prefetch=1,
        storage_options=opts,
    ) as lc:
        for _, tensors in lc.iter_layers():
            assert lc.resident_bytes <= budget
            seen.update({n: t.tobytes() for n, t in tensors.items()})
        assert lc.peak_resident_bytes <= budget
    assert seen == {n: a.tobytes() for n, a in local.items()}


def test_streaming_needs_local_files(tiny: Path, s3: S3) -> None:
    pytest.importorskip("torch")
    from safeshard.errors import UsageError

    base, opts = s3
    safeshard.split(tiny, f"{base}/st", max_shard_size="100MB", storage_options=opts)
    from safeshard.runtime.mapped import MappedShards
    from safeshard.runtime.readers import ShardFiles, TorchBackend

    ckpt = safeshard.open_checkpoint(f"{base}/st", storage_options=opts)
    with ShardFiles(ckpt) as files, pytest.raises(UsageError, match="must be local files"):
        MappedShards(files, TorchBackend())


def test_update_with_sha256_hashes_kept_objects_in_storage(
    tiny: Path, s3: S3, tmp_path: Path
) -> None:
    """A split made without --sha256, updated with it: the kept shards are objects, and
    their SHA-256 is computed by reading them back (ranged GETs), not as local files."""
    import hashlib

    base, opts = s3
    cap = weights(tiny).stat().st_size // 3
    safeshard.split(tiny, f"{base}/h", max_shard_size=cap, storage_options=opts)
    new = tmp_path / "new"
    new.mkdir()
    for f in tiny.iterdir():
        (new / f.name).write_bytes(f.read_bytes())
    h = read_header(weights(new))
    t = h.by_name["model.layers.1.mlp.down_proj.scales"]
    with open(weights(new), "r+b") as fh:
        fh.seek(h.data_start + t.begin)
        fh.write(b"\x00\x3c" * (t.nbytes // 2))
    r = safeshard.update(new, f"{base}/h", storage_options=opts, sha256=True)
    assert r.kept and r.rewritten
    fs, root = filesystem(f"{base}/h", opts)
    for out in r.files:
        assert out.sha256 == hashlib.sha256(fs.cat_file(f"{root}/{out.file}")).hexdigest(), out.file


def test_split_with_sha256_to_storage_records_each_objects_sha256(tiny: Path, s3: S3) -> None:
    """A follower cannot read an object back while it uploads: its SHA-256 is computed
    from the bytes as they are sent, and equals the stored object's."""
    import hashlib

    base, opts = s3
    cap = weights(tiny).stat().st_size // 3
    r = safeshard.split(tiny, f"{base}/s", max_shard_size=cap, storage_options=opts, sha256=True)
    assert len(r.files) >= 3
    fs, root = filesystem(f"{base}/s", opts)
    for out in r.files:
        assert out.sha256 == hashlib.sha256(fs.cat_file(f"{root}/{out.file}")).hexdigest(), out.file
    assert safeshard.verify(f"{base}/s", storage_options=opts, hash_files=True).ok
