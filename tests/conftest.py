"""Shared fixtures: small safetensors files built from exact header bytes."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from safeshard.header import TensorSpec, build_header, tensor_nbytes

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
