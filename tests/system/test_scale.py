"""Every command stays linear in the number of tensors.

A file of many zero-size tensors is all header: what a command does per tensor is
all it does. Each command runs on n and on 4n such tensors, in this process, and its
CPU time (``time.process_time``: other processes on a loaded machine barely move it)
must grow about 4x: linear is 4, n log n a little more, quadratic 16. A ratio over
:data:`MAX_RATIO` is measured once more before failing, so a burst of noise does
not fail the test. ``benchmarks/scale.py`` measures the same commands at 1,000,000
tensors.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import safeshard

N = 25_000
MAX_RATIO = 7.0
"""Allowed growth of CPU time from n to 4n tensors (linear: 4; quadratic: 16)."""
MAX_PER_TENSOR = 60e-6
"""CPU seconds per tensor at 4n: a generous bound on the constant (about 10x now)."""


def write_zero_tensors(path: Path, n: int) -> int:
    """A valid file: an MoE-like layout of ``n`` zero-size tensors and two real ones;
    returns the header length."""
    per_layer = max(1, n // 16)
    parts = [
        '"__metadata__":{"format":"pt"}',
        '"model.embed_tokens.weight":{"dtype":"F16","shape":[4,4],"data_offsets":[0,32]}',
        '"lm_head.weight":{"dtype":"F16","shape":[4,4],"data_offsets":[32,64]}',
    ]
    for i in range(n):
        layer, rest = divmod(i, per_layer)
        expert, k = divmod(rest, 3)
        name = f"model.layers.{layer}.experts.{expert}.w{k + 1}.weight"
        parts.append(json.dumps(name) + ':{"dtype":"BF16","shape":[0],"data_offsets":[64,64]}')
    body = ("{" + ",".join(parts) + "}").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(range(64)))
    return len(body)


def _steps(folder: Path, n: int) -> dict[str, Callable[[], object]]:
    src = folder / "src" / "model.safetensors"
    header = write_zero_tensors(src, n)
    cap = header // 4  # the headers alone make several shards
    out, merged = folder / "split", folder / "merged.safetensors"

    def split() -> object:
        shutil.rmtree(out, ignore_errors=True)
        return safeshard.split(src, out, max_shard_size=cap)

    def verify() -> object:
        rep = safeshard.verify(out)
        assert rep.ok, rep.findings[:3]
        return rep

    def open_all() -> object:
        with safeshard.open(out, framework="numpy") as ck:
            assert sum(1 for _ in ck) == n + 2
        return None

    split()  # what verify, merge, open and diff read
    return {
        "inspect": lambda: safeshard.inspect(src, cap),
        "split": split,
        "verify": verify,
        "merge": lambda: safeshard.merge(out, merged, force=True),
        "open": open_all,
        "diff": lambda: safeshard.diff(src, out),
    }


def _cpu(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Callable[[], object]]]:
    base = tmp_path_factory.mktemp("scale")
    return {n: _steps(base / str(n), n) for n in (N, 4 * N)}


@pytest.mark.parametrize("step", ["inspect", "split", "verify", "merge", "open", "diff"])
def test_cost_per_tensor_does_not_grow(
    runs: dict[int, dict[str, Callable[[], object]]], step: str
) -> None:
    small, large = runs[N][step], runs[4 * N][step]
    ratio = 0.0
    for _attempt in range(2):
        t_small, t_large = _cpu(small), _cpu(large)
        ratio = t_large / max(t_small, 1e-3)
        if ratio <= MAX_RATIO and t_large / (4 * N) <= MAX_PER_TENSOR:
            return
    pytest.fail(
        f"{step}: {t_small:.2f} s CPU at {N:,} tensors, {t_large:.2f} s at {4 * N:,}: "
        f"x{ratio:.1f} (at most x{MAX_RATIO}) and {t_large / (4 * N) * 1e6:.1f} µs per "
        f"tensor (at most {MAX_PER_TENSOR * 1e6:.0f})"
    )
