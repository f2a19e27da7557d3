"""Copying a model folder's other files (config, tokenizer, README) beside new shards.

What is copied:

- SRC is a folder or an index: every regular file of that folder, except weights and
  hidden files. A symlink is followed only when it resolves inside the folder, or
  into the ``blobs`` folder of a Hugging Face cache snapshot's repository; a link to
  anywhere else (``config.json -> ~/.aws/credentials``) is left behind, never copied;
- SRC is a single ``.safetensors`` file: its folder may be anything (a Downloads
  folder), so only the files a model folder is known to hold
  (:data:`KNOWN_SIDECARS`) are copied.

Never copied: weights of any format (``.safetensors``, ``.bin``, ``.pt``, ``.pth``,
``.ckpt``, ``.h5``, ``.msgpack``, ``.gguf``, ``.onnx``, ...), any ``*.index.json``
(an old index must never sit beside new shards), safeshard manifests
(``*.safeshard.json``), hidden files (``.gitattributes``, safeshard's lock and
temporaries) and sub-folders.

``quantize_config.json`` is rewritten when needed so that AutoGPTQ and GPTQModel
find the new shards: a ``model_file_base_name`` that names another base is
changed to BASE, and one is added when BASE is not a name those loaders try by
default (``gptq_model-{bits}bit-{group}g`` or ``model``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeshard.errors import StorageError, read_error
from safeshard.format.filenames import ANY_INDEX_SUFFIX, MANIFEST_SUFFIX
from safeshard.io.bytesrc import ByteSource, read_exact
from safeshard.io.store import open_source
from safeshard.io.transaction import OutputStore

WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".ggml",
    ".onnx",
    ".onnx_data",
    ".npz",
    ".pkl",
    ".pickle",
    ".tflite",
    ".mlmodel",
)
"""File endings of model weights: never copied beside new shards."""

SKIPPED_SUFFIXES = (*WEIGHT_SUFFIXES, ANY_INDEX_SUFFIX, MANIFEST_SUFFIX)

KNOWN_SIDECARS = frozenset(
    {
        "config.json",
        "generation_config.json",
        "quantize_config.json",
        "quant_config.json",
        "quantization_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
        "README.md",
        "LICENSE",
        "LICENSE.txt",
        "USE_POLICY.md",
    }
)
"""What a model folder holds besides weights; copied when SRC is a single file."""

QUANTIZE_CONFIG = "quantize_config.json"


@dataclass
class SidecarResult:
    """File names copied, skipped (weights, indexes, hidden), and notes for the user."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def is_weights_file(name: str) -> bool:
    """Whether ``name`` is a weights file, an index or a manifest (never copied)."""
    return name.endswith(SKIPPED_SUFFIXES)


def plan_sidecars(folder: Path, *, only_known: bool) -> tuple[list[Path], list[str]]:
    """Files of ``folder`` to copy, and names deliberately left behind."""
    copy: list[Path] = []
    skipped: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.startswith(".") or not entry.is_file():
            continue
        if (
            is_weights_file(name)
            or (only_known and name not in KNOWN_SIDECARS)
            or not link_stays_home(entry, folder)
        ):
            skipped.append(name)
        else:
            copy.append(entry)
    return copy, skipped


def link_stays_home(entry: Path, folder: Path) -> bool:
    """Whether ``entry`` is a regular file, or a symlink that resolves inside the model
    folder or the Hugging Face cache's ``blobs`` folder of the same repository (a cache
    snapshot's files are links ``snapshots/REV/NAME -> ../../blobs/SHA``).

    A link elsewhere (``config.json -> ~/.aws/credentials``) is not followed: its target
    would be copied into OUT_DIR as a readable file, ready to upload.
    """
    if not isinstance(entry, Path) or not entry.is_symlink():
        return True  # a regular file, or an object in storage (no links there)
    try:
        target = entry.resolve(strict=True)
        home = folder.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    allowed = [home]
    if home.parent.name == "snapshots":
        allowed.append(home.parent.parent / "blobs")
    return any(target.is_relative_to(a) for a in allowed)


def default_bases(quantize_config: dict[str, Any]) -> list[str]:
    """Base names AutoGPTQ tries when ``model_file_base_name`` is unset."""
    bases: list[str] = []
    bits, group = quantize_config.get("bits"), quantize_config.get("group_size")
    if bits is not None and group is not None:
        bases.append(f"gptq_model-{bits}bit-{group}g")
    bases.append("model")
    return bases


def rewrite_quantize_config(data: bytes, base: str) -> tuple[bytes | None, str | None]:
    """The new ``quantize_config.json`` bytes naming ``base`` (None: keep as is), and a note."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None, f"{QUANTIZE_CONFIG} is not valid JSON; copied unchanged"
    if not isinstance(obj, dict):
        return None, None
    named = obj.get("model_file_base_name")
    if isinstance(named, str) and named:
        if named == base:
            return None, None
        note = f"{QUANTIZE_CONFIG}: model_file_base_name {named!r} -> {base!r}"
    elif base in default_bases(obj):
        return None, None
    else:
        note = (
            f"{QUANTIZE_CONFIG}: added model_file_base_name {base!r} so that AutoGPTQ and "
            "GPTQModel find the shards"
        )
    obj["model_file_base_name"] = base
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    try:
        return text.encode("utf-8"), note
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800") stays escaped
        return (json.dumps(obj, indent=2) + "\n").encode("ascii"), note


MAX_CONFIG_BYTES = 1024 * 1024
"""Most bytes of ``quantize_config.json`` read to rewrite it (real ones are ~300 bytes);
a larger one is copied unchanged, streamed like any other file."""


def _read_config(src: Path, open_file: Callable[[Path], ByteSource]) -> bytes | None:
    """The bytes of ``quantize_config.json`` (None: larger than :data:`MAX_CONFIG_BYTES`).
    Never more than that many bytes are held, local or in object storage."""
    try:
        with open_file(src) as source:
            if source.size > MAX_CONFIG_BYTES:
                return None
            buf = memoryview(bytearray(source.size))
            read_exact(source, [buf], 0, QUANTIZE_CONFIG)
            return bytes(buf)
    except OSError as e:
        if isinstance(e, StorageError):
            raise
        raise read_error(src, "read", e) from None


def copy_sidecars(
    folder: Path,
    tx: OutputStore,
    *,
    base: str,
    only_known: bool,
    open_file: Callable[[Path], ByteSource] = open_source,
) -> SidecarResult:
    """Copy ``folder``'s other files into the output transaction ``tx`` (see the module docs).

    ``open_file`` opens one of them (a checkpoint's :attr:`~safeshard.checkpoint.Checkpoint.place`
    knows whether they are local files or objects)."""
    result = SidecarResult()
    files, result.skipped = plan_sidecars(folder, only_known=only_known)
    for src in files:
        if src.name == QUANTIZE_CONFIG:
            data = _read_config(src, open_file)
            new, note = (None, None) if data is None else rewrite_quantize_config(data, base)
            if data is None:
                result.notes.append(
                    f"{QUANTIZE_CONFIG} is larger than {MAX_CONFIG_BYTES} bytes, which no "
                    "quantize config is; copied unchanged"
                )
            if note:
                result.notes.append(note)
            if new is not None:
                tx.write_bytes(src.name, new)
                result.copied.append(src.name)
                continue
        with open_file(src) as source:
            tx.copy_in(source, src.name)
        result.copied.append(src.name)
    return result
