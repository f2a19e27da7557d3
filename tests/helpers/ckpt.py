"""Checkpoints for verify/diff tests: ``tiny-gptq`` from synth, and ways to break a split.

:func:`tiny_gptq` synthesizes the ``tiny-gptq`` preset (a 4-bit, group-128 GPTQ
Llama written the way AutoGPTQ writes it) and can edit its tensors first, so a test
can start from a source with exactly one flaw. :func:`rewrite` rebuilds any file with
other tensors while keeping it valid, to craft one inconsistency at a time in a split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from safeshard.checkpoint import read_header
from safeshard.format.header import TensorSpec, build_header, tensor_nbytes
from safeshard.ops.synth import synthesize

Decl = tuple[str, tuple[int, ...]]
Edit = Callable[[dict[str, Decl], dict[str, bytes]], None]


def tiny_gptq(folder: Path, edit: Edit | None = None, layers: int | None = None) -> Path:
    """Synthesize ``tiny-gptq`` into ``folder``, apply ``edit`` to its weights; return them."""
    synthesize(folder, "tiny-gptq", layers)
    (weights,) = folder.glob("*.safetensors")
    if edit is not None:
        rewrite(weights, edit)
    return weights


def filler(name: str, nbytes: int) -> bytes:
    return random.Random(name).randbytes(nbytes)


def write_file(
    path: Path,
    tensors: Mapping[str, Decl],
    data: Mapping[str, bytes] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """A valid safetensors file with ``tensors`` in order; bytes from ``data`` or generated."""
    specs = [TensorSpec(n, d, tuple(s), tensor_nbytes(d, s)) for n, (d, s) in tensors.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(build_header(specs, metadata))
        for s in specs:
            blob = data[s.name] if data and s.name in data else None
            f.write(blob if blob is not None else filler(s.name, s.nbytes))
    return path


def read_tensors(path: Path) -> tuple[dict[str, Decl], dict[str, bytes], dict[str, str] | None]:
    """Every tensor of ``path`` in data order, with its bytes, and the metadata."""
    h = read_header(path)
    raw = path.read_bytes()
    decls = {t.name: (t.dtype, t.shape) for t in h.tensors}
    data = {t.name: raw[h.data_start + t.begin : h.data_start + t.end] for t in h.tensors}
    return decls, data, h.metadata


def rewrite(path: Path, edit: Edit) -> Path:
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
