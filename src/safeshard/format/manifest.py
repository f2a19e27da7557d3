"""The sidecar manifest safeshard writes beside an index: ``{BASE}.safeshard.json``.

It keeps loaders' files untouched (the index stays exactly what transformers and
huggingface_hub expect) and records what the index cannot:

- each shard's file name, size and the digest of its header bytes; with the tensor
  digests below, that covers every byte of every shard, so a copy or an upload can be
  checked without the source. The whole-file SHA-256 (the Hugging Face Hub's LFS id)
  is recorded too when asked for (``--sha256``);
- each tensor's digest (XXH3-128, see :data:`TENSOR_DIGEST`) and size, so an update
  reads the new source only once and ``verify`` can name the tensor a corrupted
  byte belongs to;
- the source: its file name, size, and its header bytes exactly as stored, which
  fix key order, whitespace, metadata position, data order and padding. With them,
  ``merge`` restores the original file byte for byte.

Layout (version 2)::

    {
      "format": "safeshard-manifest", "version": 2,
      "base": "model", "cap": 4000000000,
      "shards": [{"file": "model-00001-of-00002.safetensors", "size": 123,
                  "header": "<xxh3_128 of the header bytes>", "sha256": null}],
      "tensor_digest": "xxh3_128",
      "tensors": {"model.embed_tokens.weight": {"digest": "...", "nbytes": 456}},
      "source": {"file": "gptq_model-4bit-128g.safetensors", "size": 789,
                 "header": "{...}"},  # or null for foreign input
      "fingerprint": "..."  # the split's plan and source identity, for --resume (or null)
    }

Version-1 manifests (every shard with a ``sha256`` and no ``header``) are still read.

Why two hash functions: the file SHA-256 is what the Hub shows, so it must be
SHA-256, but it runs at about 1.1 GB/s on one core here, slower than the disk; the
per-tensor digest only detects change, and XXH3-128 runs at about 11 GB/s, which keeps
``split`` near the speed of ``cp``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import xxhash

from safeshard.errors import IndexFormatError
from safeshard.format.filenames import MANIFEST_SUFFIX as MANIFEST_SUFFIX  # importable here too
from safeshard.format.header import Header, parse_header

FORMAT = "safeshard-manifest"
VERSION = 2
READS = (1, 2)
"""Manifest versions this safeshard reads (1: every shard has a SHA-256 and no header
digest; 2: a header digest, and a SHA-256 only when asked for)."""
TENSOR_DIGEST = "xxh3_128"
"""The per-tensor digest recorded in manifests."""


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def tensor_hasher() -> Hasher:
    """A new hasher of :data:`TENSOR_DIGEST` (releases the GIL on large buffers)."""
    return xxhash.xxh3_128()


def tensor_digest(data: bytes | bytearray | memoryview) -> str:
    """The :data:`TENSOR_DIGEST` hex digest of ``data``."""
    h = tensor_hasher()
    h.update(data)
    return h.hexdigest()


def header_digest(header: bytes | bytearray | memoryview) -> str:
    """The :data:`TENSOR_DIGEST` of a file's header bytes (length prefix, JSON, padding):
    with every tensor's digest, it covers every byte of a safetensors file."""
    return tensor_digest(header)


@dataclass(frozen=True)
class ShardRecord:
    """One file: name, size, the digest of its header bytes (None in version-1
    manifests) and its SHA-256 (None unless asked for with ``--sha256``)."""

    file: str
    size: int
    sha256: str | None
    header: str | None = None


@dataclass(frozen=True)
class TensorRecord:
    digest: str
    nbytes: int


@dataclass(frozen=True)
class SourceRecord:
    """The original single file: name, size, and its header JSON exactly as stored."""

    file: str
    size: int
    header: str

    @property
    def header_bytes(self) -> bytes:
        return self.header.encode("utf-8")

    def parse(self) -> Header:
        """The recorded header, validated as if read from the original file.

        Raises a :class:`~safeshard.errors.HeaderError` when the record is not a valid
        header for a file of ``size`` bytes.
        """
        raw = self.header_bytes
        return parse_header(struct.pack("<Q", len(raw)) + raw, self.size, self.file)


@dataclass
class Manifest:
    base: str
    cap: int | None
    shards: list[ShardRecord] = field(default_factory=list)
    tensors: dict[str, TensorRecord] = field(default_factory=dict)
    source: SourceRecord | None = None
    fingerprint: str | None = None

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "base": self.base,
            "cap": self.cap,
            "shards": [
                {"file": s.file, "size": s.size, "header": s.header, "sha256": s.sha256}
                for s in self.shards
            ],
            "tensor_digest": TENSOR_DIGEST,
            "tensors": {
                name: {"digest": t.digest, "nbytes": t.nbytes}
                for name, t in sorted(self.tensors.items())
            },
            "source": None
            if self.source is None
            else {"file": self.source.file, "size": self.source.size, "header": self.source.header},
            "fingerprint": self.fingerprint,
        }
        # compact: with an indent, json.dumps runs its pure-Python encoder (seconds for a
        # million tensors); without one, the C encoder
        try:
            text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
            return text.encode("utf-8")
        except UnicodeEncodeError:  # a source file name that is not UTF-8 stays escaped
            return (json.dumps(obj, separators=(",", ":")) + "\n").encode("ascii")

    @classmethod
    def from_json(cls, data: bytes, path: str | os.PathLike[str] = "<manifest>") -> Manifest:
        where = str(path)
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise IndexFormatError(f"{where}: manifest is not valid JSON ({e})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise IndexFormatError(f"{where}: not a safeshard manifest")
        if obj.get("version") not in READS:
            raise IndexFormatError(
                f"{where}: manifest version {obj.get('version')!r} is not supported "
                f"(this safeshard reads versions {', '.join(map(str, READS))}); upgrade safeshard"
            )
        if obj.get("tensor_digest") != TENSOR_DIGEST:
            raise IndexFormatError(
                f"{where}: tensor digests are {obj.get('tensor_digest')!r}, but this safeshard "
                f"reads {TENSOR_DIGEST!r}; upgrade safeshard or split again with --force"
            )
        try:
            shards = [
                ShardRecord(
                    str(s["file"]),
                    int(s["size"]),
                    _opt_str(s.get("sha256")),
                    _opt_str(s.get("header")),
                )
                for s in obj["shards"]
            ]
            tensors = {
                str(k): TensorRecord(str(v["digest"]), int(v["nbytes"]))
                for k, v in obj["tensors"].items()
            }
            src = obj.get("source")
            source = (
                None
                if src is None
                else SourceRecord(str(src["file"]), int(src["size"]), _text(src["header"]))
            )
            cap = obj.get("cap")
            fp = obj.get("fingerprint")
            return cls(
                base=str(obj["base"]),
                cap=None if cap is None else int(cap),
                shards=shards,
                tensors=tensors,
                source=source,
                fingerprint=None if fp is None else str(fp),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IndexFormatError(f"{where}: malformed manifest ({e!r})") from None


def _text(value: Any) -> str:
    """``value`` as text that UTF-8 can encode; a lone surrogate escape (``"\\ud800"``)
    raises ``UnicodeEncodeError``, a ``ValueError``."""
    text = str(value)
    text.encode("utf-8")
    return text


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected a string or null, found {value!r}")
    return value


def manifest_path(folder: Path, base: str) -> Path:
    return folder / f"{base}{MANIFEST_SUFFIX}"
