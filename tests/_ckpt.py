"""Small checkpoints for verify/diff tests: a tiny GPTQ source, and ways to break a split.

The source is a Llama-shaped GPTQ v1 checkpoint (4-bit, group 32) small enough to
write in milliseconds: ``gptq_model-4bit-32g.safetensors`` beside a
``quantize_config.json``. :func:`rewrite` rebuilds a shard with other tensors while
keeping the file valid, so tests can craft exactly one inconsistency at a time.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from safeshard.header import TensorSpec, build_header, read_header, tensor_nbytes

BITS = 4
GROUP = 32
HIDDEN = 64
INTER = 96
VOCAB = 32
SRC_NAME = f"gptq_model-{BITS}bit-{GROUP}g.safetensors"
METADATA = {"format": "pt", "gptq_bits": str(BITS), "gptq_group_size": str(GROUP)}

Decl = tuple[str, tuple[int, ...]]


def gptq_module(prefix: str, n_in: int, n_out: int) -> dict[str, Decl]:
    groups = -(-n_in // GROUP)
    return {
        f"{prefix}.qweight": ("I32", (n_in * BITS // 32, n_out)),
        f"{prefix}.qzeros": ("I32", (groups, n_out * BITS // 32)),
        f"{prefix}.scales": ("F16", (groups, n_out)),
        f"{prefix}.g_idx": ("I32", (n_in,)),
    }


def gptq_tensors(layers: int = 3) -> dict[str, Decl]:
    """Tensors of the tiny model in model order."""
    t: dict[str, Decl] = {"model.embed_tokens.weight": ("F16", (VOCAB, HIDDEN))}
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = ("F16", (HIDDEN,))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t.update(gptq_module(f"{p}.self_attn.{proj}", HIDDEN, HIDDEN))
        t[f"{p}.post_attention_layernorm.weight"] = ("F16", (HIDDEN,))
        t.update(gptq_module(f"{p}.mlp.gate_proj", HIDDEN, INTER))
        t.update(gptq_module(f"{p}.mlp.up_proj", HIDDEN, INTER))
        t.update(gptq_module(f"{p}.mlp.down_proj", INTER, HIDDEN))
    t["model.norm.weight"] = ("F16", (HIDDEN,))
    t["lm_head.weight"] = ("F16", (VOCAB, HIDDEN))
    return t


def tensor_bytes(name: str, dtype: str, shape: tuple[int, ...], seed: int = 0) -> bytes:
    """Deterministic contents: g_idx = arange(in) // group, others pseudo-random."""
    n = tensor_nbytes(dtype, shape)
    if name.endswith(".g_idx"):
        return struct.pack(f"<{shape[0]}i", *(i // GROUP for i in range(shape[0])))
    return random.Random(f"{seed}:{name}").randbytes(n)


def write_file(
    path: Path,
    tensors: Mapping[str, Decl],
    data: Mapping[str, bytes] | None = None,
    metadata: Mapping[str, str] | None = METADATA,
    seed: int = 0,
) -> Path:
    """A valid safetensors file with ``tensors`` in order; bytes from ``data`` or generated."""
    specs = [TensorSpec(n, d, tuple(s), tensor_nbytes(d, s)) for n, (d, s) in tensors.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(build_header(specs, metadata))
        for s in specs:
            blob = data[s.name] if data and s.name in data else None
            f.write(blob if blob is not None else tensor_bytes(s.name, s.dtype, s.shape, seed))
    return path


def gptq_source(
    folder: Path,
    layers: int = 3,
    *,
    tensors: Mapping[str, Decl] | None = None,
    data: Mapping[str, bytes] | None = None,
    seed: int = 0,
) -> Path:
    """Write the tiny GPTQ source folder; return the weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quantize_config.json").write_text(
        json.dumps({"bits": BITS, "group_size": GROUP, "desc_act": False, "sym": True})
    )
    return write_file(folder / SRC_NAME, tensors or gptq_tensors(layers), data, seed=seed)


def read_tensors(path: Path) -> tuple[dict[str, Decl], dict[str, bytes], dict[str, str] | None]:
    """Every tensor of ``path`` in data order, with its bytes, and the metadata."""
    h = read_header(path)
    raw = path.read_bytes()
    decls = {t.name: (t.dtype, t.shape) for t in h.tensors}
    data = {t.name: raw[h.data_start + t.begin : h.data_start + t.end] for t in h.tensors}
    return decls, data, h.metadata


def rewrite(path: Path, edit: Callable[[dict[str, Decl], dict[str, bytes]], None]) -> Path:
    """Rebuild the file at ``path`` after ``edit`` changes its tensors in place."""
    decls, data, meta = read_tensors(path)
    edit(decls, data)
    return write_file(path, decls, data, meta)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def edit_index(folder: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    p = next(folder.glob("*.safetensors.index.json"))
    obj = json.loads(p.read_text())
    edit(obj)
    p.write_text(json.dumps(obj, indent=2))
    return p


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*-of-*.safetensors"))


def names_in(path: Path) -> Iterable[str]:
    return [t.name for t in read_header(path).tensors]
