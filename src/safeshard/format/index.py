"""Hugging Face shard indexes (``*.safetensors.index.json``): strict, path-safe parsing.

Every ``weight_map`` value must be a plain ``.safetensors`` file name in the index's
own folder, as written and percent-decoded, so that a hostile index can never make
safeshard read or write elsewhere, on a local disk or through any URL protocol.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from safeshard import gcpause
from safeshard.errors import (
    IndexFormatError,
    IndexPathAbsoluteError,
    IndexPathNulError,
    IndexPathSchemeError,
    IndexPathSeparatorError,
    IndexPathTraversalError,
    UnsafeIndexPathError,
)
from safeshard.format.filenames import ANY_INDEX_SUFFIX, INDEX_SUFFIX
from safeshard.format.filenames import SHARD_RE as SHARD_RE  # importable here too
from safeshard.format.filenames import shard_name as shard_name  # importable here too

_DRIVE_RE = re.compile(r"^[A-Za-z]:")

NAME_MAX = 255
"""Longest file name, in bytes, of the common file systems (ext4, XFS, btrfs, tmpfs,
APFS); a longer weight_map value names no file."""


@dataclass(frozen=True)
class ShardIndex:
    """A parsed index: ``weight_map`` maps tensor names to shard file names."""

    path: Path
    weight_map: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def base(self) -> str:
        return index_base(self.path.name)

    @property
    def total_size(self) -> int | None:
        value = self.metadata.get("total_size")
        return value if isinstance(value, int) else None

    def shard_files(self) -> list[str]:
        """Distinct shard file names, sorted."""
        return list(self._shard_files)

    @functools.cached_property
    def _shard_files(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.weight_map.values())))

    def tensors_by_shard(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {f: [] for f in self.shard_files()}
        for tensor, f in self.weight_map.items():
            out[f].append(tensor)
        return out


def index_base(filename: str) -> str:
    """``model`` for ``model.safetensors.index.json`` (or a bare ``model.index.json``)."""
    for suffix in (INDEX_SUFFIX, ANY_INDEX_SUFFIX):
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
"""``http:``, ``s3:``, ``file:``, ``c:``: a name that a URL parser or Windows reads as
somewhere else."""

_ESCAPE_RE = re.compile(r"%[0-9A-Fa-f]{2}")


def _decoded(value: str) -> str:
    """``value`` percent-decoded until nothing changes (``%252E`` is ``%2E`` is ``.``),
    as a server that decodes (even twice) would read it; at most 8 rounds."""
    for _ in range(8):
        if not _ESCAPE_RE.search(value):
            return value
        value = unquote(value, errors="surrogateescape")
    return value


def check_shard_name(index_path: str | os.PathLike[str], tensor: str, value: object) -> str:
    r"""Return ``value`` if it is a safe shard file name; else an :class:`UnsafeIndexPathError`,
    of the class of the rule it breaks.

    Each rule is checked on the value as written and on the value percent-decoded
    (repeatedly), because a URL joins the name in as written and a server may decode
    it: ``%2E%2E%2Fx.safetensors`` is ``../x.safetensors`` to an HTTP server.

    - :class:`IndexPathNulError`: a NUL byte (``\x00``, ``%00``);
    - :class:`IndexPathAbsoluteError`: an absolute path or a drive (``/x``, ``\x``, ``C:``);
    - :class:`IndexPathSchemeError`: a URL scheme (``http:``, ``s3:``, ``file:``);
    - :class:`IndexPathTraversalError`: ``..`` as a path part (``..``, ``../x``, ``%2E%2E``);
    - :class:`IndexPathSeparatorError`: a ``/`` or ``\`` (``%2F``, ``%5C``);
    - :class:`UnsafeIndexPathError` itself: not a non-empty string, a lone surrogate
      escape, longer than 255 bytes, or not ending in ``.safetensors``.
    """
    where = f"{index_path}: weight_map[{tensor!r}]"
    if not isinstance(value, str) or not value:
        raise UnsafeIndexPathError(f"{where} must be a non-empty file name, found {value!r}")
    decoded = _decoded(value)
    forms = (value,) if decoded == value else (value, decoded)
    shown = f"{value!r}" if decoded == value else f"{value!r} (percent-decoded: {decoded!r})"
    if any("\x00" in f for f in forms):
        raise IndexPathNulError(f"{where} = {shown} contains a NUL byte")
    if any(f.startswith(("/", "\\")) or os.path.isabs(f) for f in forms):
        raise IndexPathAbsoluteError(
            f"{where} = {shown} is an absolute path; shards must sit beside the index"
        )
    if any(_DRIVE_RE.match(f) for f in forms):
        raise IndexPathAbsoluteError(
            f"{where} = {shown} names a drive; shards must sit beside the index"
        )
    if any(_SCHEME_RE.match(f) for f in forms):
        raise IndexPathSchemeError(
            f"{where} = {shown} starts with a URL scheme; shards must be plain file names "
            "beside the index, never URLs"
        )
    for f in forms:
        parts = re.split(r"[/\\]", f)
        if ".." in parts or f.startswith(".."):
            raise IndexPathTraversalError(
                f"{where} = {shown} climbs out of the index's folder with '..'"
            )
    if any("/" in f or "\\" in f for f in forms):
        raise IndexPathSeparatorError(
            f"{where} = {shown} has a path separator; shards must be plain file names "
            "beside the index"
        )
    try:
        encoded = os.fsencode(value)
    except UnicodeEncodeError:
        raise UnsafeIndexPathError(
            f"{where} = {value!r} holds a lone surrogate escape; it names no file"
        ) from None
    if len(encoded) > NAME_MAX:
        raise UnsafeIndexPathError(
            f"{where} is {len(encoded)} bytes long; no file name can be longer than "
            f"{NAME_MAX} bytes"
        )
    if not value.endswith(".safetensors"):
        raise UnsafeIndexPathError(
            f"{where} = {value!r} does not end in .safetensors; safeshard reads only "
            "safetensors shards"
        )
    return value


def _no_duplicates(path: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise IndexFormatError(f"{path}: the key {key!r} appears twice")
            out[key] = value
        return out

    return hook


@gcpause.pausing
def parse_index_bytes(data: bytes, path: str | os.PathLike[str]) -> ShardIndex:
    """Parse and validate index JSON ``data`` read from ``path``."""
    name = str(path)
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates(name))
    except IndexFormatError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise IndexFormatError(f"{name}: not a valid JSON index ({e})") from None
    if not isinstance(obj, dict):
        raise IndexFormatError(f"{name}: index must be a JSON object, found {type(obj).__name__}")
    wm = obj.get("weight_map")
    if not isinstance(wm, dict):
        raise IndexFormatError(f"{name}: index has no 'weight_map' object")
    meta = obj.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{name}: 'metadata' must be an object, found {type(meta).__name__}")
    if "total_size" in meta:
        ts = meta["total_size"]
        if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
            raise IndexFormatError(
                f"{name}: metadata.total_size must be a non-negative integer, found {ts!r}"
            )
    safe: set[str] = set()  # an index names a few shards, each many times: check each once
    for tensor, value in wm.items():
        if type(value) is not str or value not in safe:
            safe.add(check_shard_name(name, tensor, value))
    where = path if hasattr(path, "parent") else Path(path)  # a storage path stays one
    return ShardIndex(path=where, weight_map=wm, metadata=dict(meta))  # type: ignore[arg-type]


def index_json(weight_map: dict[str, str], metadata: dict[str, Any]) -> bytes:
    """Serialize an index the way transformers and huggingface_hub write it:
    ``json.dumps(index, indent=2, sort_keys=True) + "\n"``, byte for byte.

    The weight map is written a line per entry with the C string encoder, because
    ``json.dumps`` with ``indent`` runs the pure-Python encoder (seconds for a million
    entries)."""
    meta = json.dumps(metadata, indent=2, sort_keys=True).replace("\n", "\n  ")
    enc = _encode_string
    lines = ",\n".join(f"    {enc(k)}: {enc(v)}" for k, v in sorted(weight_map.items()))
    body = f"{{\n{lines}\n  }}" if weight_map else "{}"
    return f'{{\n  "metadata": {meta},\n  "weight_map": {body}\n}}\n'.encode()


_encode_string: Any = getattr(json.encoder, "c_encode_basestring_ascii", None) or (
    json.encoder.py_encode_basestring_ascii
)
"""``json.dumps`` of a string with ``ensure_ascii``: the C function where Python has it."""
