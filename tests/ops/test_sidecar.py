"""Sidecar files (config, tokenizer, README, ...) are streamed like shards when either side
is object storage: a large one costs a bounded buffer, never its size in memory.

Measured against a real S3 API (moto's server on 127.0.0.1), in a child process whose
Python allocations are traced (``tracemalloc``) while ``safeshard.split`` copies a model
folder with a 64 MiB sidecar file, local -> S3 and S3 -> local.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from safeshard.io.remote import filesystem
from safeshard.ops.synth import synthesize

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MiB = 1024 * 1024
# The object-storage copier keeps up to 8 ranged GETs and 9 part buffers of 8 MiB in flight
# (README, Object storage): memory is bounded by that, plus slack, whatever the file's size.
# The sidecar is larger than the bound, so a copy through memory whole cannot pass.
BOUND = (8 + 9) * 8 * MiB + 16 * MiB
SIDECAR = 256 * MiB
"""Most Python memory the whole split may hold at once, below the sidecar's size: the
8 MiB copy buffer, one ranged GET or one upload part in flight and the client's copies of
it (46 MiB measured local -> S3, 37 MiB S3 -> local, the same for sidecars of 8 to 160 MiB;
before streaming: 270 and 141 MiB for this 64 MiB file)."""

SRC = str(Path(__file__).resolve().parents[2] / "src")

CHILD = textwrap.dedent(
    """
    import json, sys, tracemalloc
    import safeshard
    import s3fs  # imported before tracing: what the client needs to load is not the copy's
    spec = json.loads(sys.stdin.read())
    tracemalloc.start()
    result = safeshard.split(
        spec["src"], spec["dst"], max_shard_size="200KB", storage_options=spec["options"]
    )
    _, peak = tracemalloc.get_traced_memory()
    print(json.dumps({"peak": peak, "copied": result.copied}))
    """
)


def split_in_child(src: str, dst: str, options: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps({"src": src, "dst": dst, "options": options}),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def sparse_sidecar(path: Path, size: int) -> str:
    """A ``size``-byte file, mostly a hole, with random 4 KiB islands every 4 MiB (so a
    shifted or dropped chunk changes the digest); returns its SHA-256."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 4 * MiB):
            f.seek(offset)
            f.write(os.urandom(4096))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, str]:
    folder = synthesize(tmp_path / "model", "tiny-llama", layers=1, tokenizer=False)
    return folder, sparse_sidecar(folder / "vocab.txt", SIDECAR)


@pytest.mark.slow
def test_a_large_sidecar_is_streamed_local_to_s3(
    model: tuple[Path, str], s3: tuple[str, dict[str, Any]]
) -> None:
    folder, digest = model
    base, opts = s3
    got = split_in_child(str(folder), f"{base}/out", opts)
    assert "vocab.txt" in got["copied"]
    fs, root = filesystem(f"{base}/out", opts)
    h = hashlib.sha256()
    with fs.open(f"{root}/vocab.txt", "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    assert h.hexdigest() == digest
    assert got["peak"] < BOUND, f"peak {got['peak'] / MiB:.1f} MiB"


@pytest.mark.slow
def test_a_large_sidecar_is_streamed_s3_to_local(
    model: tuple[Path, str], s3: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    folder, digest = model
    base, opts = s3
    fs, root = filesystem(f"{base}/src", opts)
    for p in folder.iterdir():
        fs.put_file(str(p), f"{root}/{p.name}")
    out = tmp_path / "out"
    got = split_in_child(f"{base}/src", str(out), opts)
    assert "vocab.txt" in got["copied"]
    assert hashlib.sha256((out / "vocab.txt").read_bytes()).hexdigest() == digest
    assert got["peak"] < BOUND, f"peak {got['peak'] / MiB:.1f} MiB"


def test_a_huge_quantize_config_is_copied_unchanged_not_read_whole(tmp_path: Path) -> None:
    """The one sidecar safeshard parses (to name the new base) is read only when it is
    of a plausible size; a larger one is streamed like any other file."""
    import safeshard

    folder = synthesize(tmp_path / "model", "tiny-gptq", tokenizer=False)
    qc = folder / "quantize_config.json"
    obj = json.loads(qc.read_text())
    obj["model_file_base_name"] = "other"
    obj["padding"] = "x" * (2 * MiB)
    qc.write_text(json.dumps(obj))
    out = tmp_path / "out"
    result = safeshard.split(folder, out, name="renamed")
    assert (out / "quantize_config.json").read_bytes() == qc.read_bytes()
    assert any("larger than" in n and "copied unchanged" in n for n in result.notes)
