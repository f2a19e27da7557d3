"""Source checkpoints for the split/merge/crash tests, written in the ways real writers do.

- :func:`write_custom`: any key order, any data order, ``__metadata__`` first, last or in
  the middle, pretty-printed or compact JSON, extra trailing spaces: everything the
  format allows and a lossless merge must reproduce byte for byte.
- :func:`write_official`: the official ``safetensors`` writer (numpy), which sorts by dtype
  alignment then name and pads to 8.
- :func:`llama` and :func:`gptq_llama`: tensor declarations with real Llama/GPTQ names.

Import as ``from splitkit import ...`` (``tests/`` is on pytest's path).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safeshard.checkpoint import read_header
from safeshard.format.header import tensor_nbytes

Decl = tuple[str, tuple[int, ...]]
"""``(dtype, shape)``."""

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama(
    layers: int = 4, hidden: int = 16, vocab: int = 48, dtype: str = "F16"
) -> dict[str, Decl]:
    """Unquantized Llama tensors in model order."""
    out: dict[str, Decl] = {"model.embed_tokens.weight": (dtype, (vocab, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in LINEARS:
            kind = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            out[f"{p}.{kind}.{m}.weight"] = (dtype, (hidden, hidden))
        out[f"{p}.input_layernorm.weight"] = (dtype, (hidden,))
        out[f"{p}.post_attention_layernorm.weight"] = (dtype, (hidden,))
    out["model.norm.weight"] = (dtype, (hidden,))
    out["lm_head.weight"] = (dtype, (vocab, hidden))
    return out


def gptq_llama(
    layers: int = 3, hidden: int = 64, vocab: int = 48, group: int = 32
) -> dict[str, Decl]:
    """GPTQ v1 int4 Llama tensors (qweight/qzeros/scales/g_idx per linear) in model order."""
    out: dict[str, Decl] = {"model.embed_tokens.weight": ("F16", (vocab, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in LINEARS:
            kind = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            q = f"{p}.{kind}.{m}"
            out[f"{q}.qweight"] = ("I32", (hidden // 8, hidden))
            out[f"{q}.qzeros"] = ("I32", (hidden // group, hidden // 8))
            out[f"{q}.scales"] = ("F16", (hidden // group, hidden))
            out[f"{q}.g_idx"] = ("I32", (hidden,))
        out[f"{p}.input_layernorm.weight"] = ("F16", (hidden,))
        out[f"{p}.post_attention_layernorm.weight"] = ("F16", (hidden,))
    out["model.norm.weight"] = ("F16", (hidden,))
    out["lm_head.weight"] = ("F16", (vocab, hidden))
    return out


def write_custom(
    path: Path,
    tensors: Mapping[str, Decl],
    metadata: Mapping[str, str] | None = None,
    *,
    key_order: Sequence[str] | None = None,
    data_order: Sequence[str] | None = None,
    metadata_at: int = 0,
    indent: int | None = None,
    extra_pad: int = 0,
    seed: int = 0,
) -> Path:
    """A valid safetensors file with the given JSON key order and data order.

    ``metadata_at`` is the position of ``__metadata__`` among the keys; ``indent``
    pretty-prints the JSON; ``extra_pad`` trailing spaces follow it. Bytes are seeded
    random, distinct per tensor.
    """
    data_order = list(data_order or tensors)
    key_order = list(key_order or tensors)
    assert sorted(data_order) == sorted(tensors) == sorted(key_order)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name in data_order:
        dtype, shape = tensors[name]
        n = tensor_nbytes(dtype, shape)
        offsets[name] = (pos, pos + n)
        pos += n
    items: list[tuple[str, object]] = [
        (
            k,
            {
                "dtype": tensors[k][0],
                "shape": list(tensors[k][1]),
                "data_offsets": list(offsets[k]),
            },
        )
        for k in key_order
    ]
    if metadata is not None:
        items.insert(min(metadata_at, len(items)), ("__metadata__", dict(metadata)))
    text = json.dumps(dict(items), indent=indent) + " " * extra_pad
    raw = text.encode("utf-8")
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in data_order:
            begin, end = offsets[name]
            f.write(rng.randbytes(end - begin))
    return path


def write_official(
    path: Path,
    tensors: Mapping[str, Decl],
    metadata: Mapping[str, str] | None = None,
    seed: int = 0,
) -> Path:
    """The same tensors written by ``safetensors.numpy.save_file`` (random values)."""
    import numpy as np
    from safetensors.numpy import save_file

    kinds = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "U8": np.uint8, "I64": np.int64}
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, (dtype, shape) in tensors.items():
        raw = rng.integers(0, 256, size=tensor_nbytes(dtype, shape), dtype=np.uint8)
        arrays[name] = raw.view(kinds[dtype]).reshape(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path), metadata=dict(metadata) if metadata is not None else None)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_bytes(path: Path) -> dict[str, bytes]:
    """Every tensor's bytes in a safetensors file, by name (small test files only)."""
    h = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return {t.name: os.pread(fd, t.nbytes, h.data_start + t.begin) for t in h.tensors}
    finally:
        os.close(fd)


def all_tensor_bytes(folder: Path) -> dict[str, bytes]:
    """Tensor bytes of every ``.safetensors`` file in ``folder`` (names must not repeat)."""
    out: dict[str, bytes] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in tensor_bytes(f).items():
            assert k not in out, f"{k} is in two files"
            out[k] = v
    return out


def folder_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular file in ``folder`` by name."""
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- kill points

KILL_SCRIPT = """
import json, os, signal, sys
import safeshard
fn, point, args, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
def hook(step):
    if step == point or (point.endswith("*") and step.startswith(point[:-1])):
        os.kill(os.getpid(), signal.SIGKILL)
getattr(safeshard, fn)(*args, on_step=hook, **kwargs)
"""


def run_killed(fn: str, point: str, *args: object, **kwargs: object) -> Any:
    """Run ``safeshard.<fn>(*args, **kwargs)`` in a child process that SIGKILLs itself when
    the output transaction reaches step ``point`` (``"written:NAME"``, or a prefix ending in
    ``*``). Returns the ``subprocess.CompletedProcess``."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_SCRIPT,
            fn,
            point,
            json.dumps([str(a) for a in args]),
            json.dumps(kwargs),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
