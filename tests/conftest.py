"""Shared fixtures: small safetensors files built from exact header bytes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from safeshard.format.header import TensorSpec, build_header, tensor_nbytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TensorDecl = tuple[str, Sequence[int]]
"""``(dtype, shape)`` of one tensor."""

WriteST = Callable[..., Path]


def write_st(
    path: Path,
    tensors: Mapping[str, TensorDecl],
    metadata: Mapping[str, str] | None = None,
    *,
    fill: Callable[[str, int], bytes] | None = None,
) -> Path:
    """Write a valid safetensors file at ``path`` with ``tensors`` in the given order.

    Data bytes come from ``fill(name, nbytes)``; by default each tensor is filled with a
    byte derived from its position so that misplaced offsets show up in comparisons.
    """
    specs = [
        TensorSpec(name, dtype, tuple(shape), tensor_nbytes(dtype, shape))
        for name, (dtype, shape) in tensors.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(build_header(specs, metadata))
        for i, s in enumerate(specs):
            f.write(fill(s.name, s.nbytes) if fill else bytes([(i * 37 + 1) % 256]) * s.nbytes)
    return path


@pytest.fixture
def st_file() -> WriteST:
    """``st_file(path, {"name": ("F16", [2, 3])}, metadata)`` writes a valid file."""
    return write_st


# --------------------------------------------------------------------------- a real S3 server


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto(env: dict[str, str] | None = None) -> Iterator[str]:
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, on a free port, for the whole session.

    A real HTTP S3 API: tests reach it through s3fs, with no mock of our own and no
    network beyond loopback. Skipped where moto or s3fs is not installed.
    """
    yield from _moto()


@pytest.fixture(scope="session")
def s3_auth_endpoint() -> Iterator[str]:
    """A second moto server that checks credentials (every request needs a known key)."""
    yield from _moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})


@pytest.fixture
def s3(s3_endpoint: str, request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, object]]]:
    """A fresh bucket on the test S3 server: ``(s3://bucket, storage_options)``."""
    import re
    import uuid

    import boto3

    options: dict[str, object] = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    slug = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:30].strip("-")
    bucket = f"t-{slug}-{uuid.uuid4().hex[:8]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)  # us-east-1: no location constraint
    yield f"s3://{bucket}", options
