"""A strict reader and a canonical writer for safetensors headers.

The reader never touches tensor data: it reads the 8-byte length and the header
JSON, then validates it in the same order as the official library
(``safetensors/src/tensor.rs``), one error class per failure. The writer builds
the exact header bytes of a file so that a planner can know a shard's size before
writing it.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    ByteRangeMismatchError,
    DuplicateKeyError,
    FileTooShortError,
    GapError,
    HeaderEncodingError,
    HeaderJSONError,
    HeaderLengthError,
    HeaderNotObjectError,
    HeaderStartError,
    HeaderTooLargeError,
    IncompleteDataError,
    InvalidShapeError,
    MetadataError,
    MisalignedTensorError,
    OverlapError,
    TensorEntryError,
    UnknownDtypeError,
)

MAX_HEADER_SIZE = 100_000_000
"""The official reader refuses headers longer than this."""

HEADER_ALIGNMENT = 8
"""Headers are padded with spaces so that data starts on an 8-byte boundary."""

METADATA_KEY = "__metadata__"

_LEADING_JUNK = " \t\r\n\ufeff"  # JSON whitespace and a byte-order mark

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
"""Every dtype on the official list, with its width in bits."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: offsets are relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    """A validated safetensors header.

    ``tensors`` is in data order (by ``begin``); ``by_name`` maps names to entries.
    ``raw`` is the header JSON exactly as stored, padding included.
    """

    path: str
    header_len: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None
    file_size: int
    raw: bytes = field(repr=False)
    by_name: dict[str, TensorInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {t.name: t for t in self.tensors})

    @property
    def data_start(self) -> int:
        """Absolute file offset where tensor data begins (8 + header length)."""
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __getitem__(self, name: str) -> TensorInfo:
        return self.by_name[name]


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``dtype`` and ``shape``; raises ``ValueError`` if not whole bytes."""
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"{dtype}{list(shape)} does not end on a byte boundary")
    return bits // 8


def _reject_duplicates(path: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise DuplicateKeyError(
                    path, f"header repeats the key {key!r}; each key may appear only once"
                )
            out[key] = value
        return out

    return hook


def _reject_constant(path: str) -> Any:
    def hook(token: str) -> Any:
        raise HeaderJSONError(path, f"header is not valid JSON: {token} is not a JSON value")

    return hook


def parse_header(data: bytes, file_size: int, path: str | os.PathLike[str] = "<bytes>") -> Header:
    """Validate ``data``, which holds at least the first ``8 + N`` bytes of a file of ``file_size``.

    Checks, in order: length prefix, header size limit, header within the file, UTF-8,
    nothing before the leading ``{``, JSON (duplicate keys, NaN/Infinity), object,
    Unicode keys (no lone surrogates), metadata, each entry (fields, dtype, shape, size,
    alignment), then the byte ranges (overlap, holes, end of file).
    """
    name = str(path)
    if file_size < 8 or len(data) < 8:
        raise FileTooShortError(
            name, f"file is {file_size} bytes, shorter than the 8-byte header length"
        )
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_SIZE:
        raise HeaderTooLargeError(
            name, f"header length {n} exceeds the limit of {MAX_HEADER_SIZE} bytes"
        )
    if 8 + n > file_size:
        raise HeaderLengthError(
            name, f"header length {n} runs past the end of the file ({file_size} bytes)"
        )
    if len(data) < 8 + n:
        raise HeaderLengthError(name, f"only {len(data)} bytes available for a {n}-byte header")
    raw = bytes(data[8 : 8 + n])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderEncodingError(
            name, f"header is not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    if not text.startswith("{") and text.lstrip(_LEADING_JUNK).startswith("{"):
        raise HeaderStartError(
            name, f"header must start with '{{' with nothing before it, found {text[:1]!r}"
        )
    # A header that does not start with "{" at all is either not JSON or JSON that is
    # not an object; both are reported below, each with its own class.
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_reject_duplicates(name),
            parse_constant=_reject_constant(name),
        )
    except DuplicateKeyError:
        raise
    except HeaderJSONError:
        raise
    except (ValueError, RecursionError) as e:
        raise HeaderJSONError(name, f"header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HeaderNotObjectError(
            name, f"header JSON must be an object, found {type(obj).__name__}"
        )
    for key in obj:
        _check_text(name, key)
    metadata = _parse_metadata(name, obj.get(METADATA_KEY))
    entries = [_parse_entry(name, key, value) for key, value in obj.items() if key != METADATA_KEY]
    entries.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in entries:
        if t.begin < pos:
            raise OverlapError(
                name,
                f"tensor {t.name!r} starts at data offset {t.begin}, inside the previous "
                f"tensor, which ends at {pos}",
            )
        if t.begin > pos:
            raise GapError(
                name,
                f"hole of {t.begin - pos} bytes before tensor {t.name!r} "
                f"(data offsets {pos}..{t.begin} belong to no tensor)",
            )
        pos = t.end
    expected = file_size - 8 - n
    if pos != expected:
        raise IncompleteDataError(
            name,
            f"tensors cover {pos} data bytes but the file holds {expected} after the header "
            f"({'missing' if pos > expected else 'trailing'} "
            f"{abs(expected - pos)} bytes; is the file truncated or appended to?)",
        )
    return Header(
        path=name,
        header_len=n,
        tensors=tuple(entries),
        metadata=metadata,
        file_size=file_size,
        raw=raw,
    )


def _check_text(path: str, text: str) -> None:
    """Reject strings that are not Unicode text: JSON escapes like ``\\ud800`` decode to
    lone surrogates, which the official reader refuses and no writer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HeaderJSONError(
            path,
            f"header string {text!r} holds a lone surrogate escape at character {e.start}; "
            "it is not valid Unicode text",
        ) from None


def _parse_metadata(path: str, value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MetadataError(path, f"__metadata__ must be an object, found {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise MetadataError(
                path, f"__metadata__[{k!r}] must be a string, found {type(v).__name__} {v!r}"
            )
        _check_text(path, k)
        _check_text(path, v)
    return dict(value)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path: str, key: str, value: Any) -> TensorInfo:
    if not isinstance(value, dict):
        raise TensorEntryError(
            path, f"tensor {key!r}: entry must be an object, found {type(value).__name__}"
        )
    for fld in ("dtype", "shape", "data_offsets"):
        if fld not in value:
            raise TensorEntryError(path, f"tensor {key!r}: entry has no {fld!r}")
    extra = set(value) - {"dtype", "shape", "data_offsets"}
    if extra:
        raise TensorEntryError(path, f"tensor {key!r}: unknown fields {sorted(extra)}")
    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise UnknownDtypeError(
            path,
            f"tensor {key!r}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BITS)}",
        )
    shape = value["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidShapeError(
            path, f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers"
        )
    offsets = value["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise TensorEntryError(
            path, f"tensor {key!r}: data_offsets {offsets!r} must be two non-negative integers"
        )
    begin, end = offsets
    if end < begin:
        raise ByteRangeMismatchError(
            path, f"tensor {key!r}: data_offsets [{begin}, {end}] end before they begin"
        )
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise MisalignedTensorError(
            path,
            f"tensor {key!r}: {numel} elements of {dtype} are {bits} bits, "
            "which does not end on a byte boundary",
        )
    if end - begin != bits // 8:
        raise ByteRangeMismatchError(
            path,
            f"tensor {key!r}: data_offsets [{begin}, {end}] span {end - begin} bytes, but "
            f"{dtype}{shape} needs {bits // 8}",
        )
    return TensorInfo(name=key, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at ``path``.

    Reads only the first ``8 + N`` bytes; no tensor data is touched.
    """
    with open(path, "rb") as f:
        return read_header_from(f, path)


def read_header_from(f: Any, path: str | os.PathLike[str]) -> Header:
    """Like :func:`read_header`, from an open binary file object."""
    file_size = os.fstat(f.fileno()).st_size
    head = os.pread(f.fileno(), 8, 0)
    if file_size < 8 or len(head) < 8:
        return parse_header(head, file_size, path)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_SIZE or 8 + n > file_size:
        return parse_header(head, file_size, path)
    body = os.pread(f.fileno(), n, 8)
    return parse_header(head + body, file_size, path)


# --------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class TensorSpec:
    """What a writer needs to lay out one tensor: name, dtype, shape, byte count."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _entry_json(name: str, dtype: str, shape: Sequence[int], begin: int, end: int) -> str:
    entry = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    return _dumps(name) + ":" + _dumps(entry)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _metadata_json(metadata: Mapping[str, str] | None) -> str | None:
    if metadata is None:
        return None
    return _dumps(METADATA_KEY) + ":" + _dumps(dict(metadata))


def _frame(body: bytes) -> bytes:
    pad = (-(len(body))) % HEADER_ALIGNMENT
    return struct.pack("<Q", len(body) + pad) + body + b" " * pad


def build_header(
    tensors: Iterable[TensorSpec | TensorInfo],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The exact bytes (length prefix, JSON, space padding) of a header that lays
    ``tensors`` out contiguously in the given order.

    Metadata comes first, then tensors in data order; JSON is compact and UTF-8. The
    total length ``8 + N`` is a multiple of 8, as the official writer makes it.
    """
    parts: list[str] = []
    meta = _metadata_json(metadata)
    if meta is not None:
        parts.append(meta)
    pos = 0
    for t in tensors:
        parts.append(_entry_json(t.name, t.dtype, t.shape, pos, pos + t.nbytes))
        pos += t.nbytes
    return _frame(("{" + ",".join(parts) + "}").encode("utf-8"))


@functools.lru_cache(maxsize=1 << 17)
def _entry_fixed_len(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """UTF-8 length of a tensor's header entry, less the digits of its two offsets.

    Offsets are the only part of an entry that depends on where the tensor lands, so a
    planner trying many placements serializes each entry once.
    """
    return len(_entry_json(name, dtype, shape, 0, 0).encode("utf-8")) - 2


class HeaderSizer:
    """Exact running size of :func:`build_header` while tensors are appended.

    ``size`` after each :meth:`add` equals ``len(build_header(added, metadata))``
    without rebuilding the JSON, so a planner can pack thousands of tensors cheaply.
    """

    def __init__(self, metadata: Mapping[str, str] | None = None) -> None:
        meta = _metadata_json(metadata)
        self._parts = 0 if meta is None else 1
        self._body = 2 + (0 if meta is None else len(meta.encode("utf-8")))
        self.data = 0

    def cost(self, t: TensorSpec | TensorInfo) -> int:
        """Bytes of JSON (comma included) that appending ``t`` would add."""
        begin, end = self.data, self.data + t.nbytes
        fixed = _entry_fixed_len(t.name, t.dtype, tuple(t.shape))
        return fixed + len(str(begin)) + len(str(end)) + (1 if self._parts else 0)

    def add(self, t: TensorSpec | TensorInfo) -> None:
        self._body += self.cost(t)
        self._parts += 1
        self.data += t.nbytes

    @property
    def header_size(self) -> int:
        return 8 + self._body + (-self._body) % HEADER_ALIGNMENT

    @property
    def file_size(self) -> int:
        return self.header_size + self.data

    def copy(self) -> HeaderSizer:
        other = HeaderSizer.__new__(HeaderSizer)
        other._parts, other._body, other.data = self._parts, self._body, self.data
        return other


def header_size(
    tensors: Iterable[TensorSpec | TensorInfo], metadata: Mapping[str, str] | None = None
) -> int:
    """Length in bytes of :func:`build_header`'s output (prefix included)."""
    sizer = HeaderSizer(metadata)
    for t in tensors:
        sizer.add(t)
    return sizer.header_size
