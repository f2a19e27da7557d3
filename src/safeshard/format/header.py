"""A safetensors header reader that accepts what the official reader accepts, and a
canonical writer.

**What is accepted.** The rules are those of the official reader
(``SafeTensors::read_metadata`` in ``safetensors/src/tensor.rs``, safetensors 0.8),
including the ones its JSON parser (serde_json) brings:

- an 8-byte little-endian length N of at most 100,000,000, and ``8 + N`` bytes
  within the file;
- N bytes of UTF-8 holding exactly one JSON value. JSON whitespace (space, tab, LF,
  CR) may come before and after it: since safetensors 0.8 (PR #686) writers may pad
  either side to align the data section. Nothing else may: no byte-order mark, NUL,
  form feed or other Unicode space, and an empty or all-blank header is not JSON;
- serde_json's limits: at most 127 nested arrays and objects, numbers within the
  range of a double, no lone UTF-16 surrogate escape (``"\\ud800"``), and ``-0`` is a
  float, not an integer;
- a JSON object. ``__metadata__`` is null or a string-to-string object; every other
  key is a tensor whose entry is an object with ``dtype`` (one of
  :data:`DTYPE_BITS`), ``shape`` (integers from 0 to 2**64 - 1 whose running product
  stays below 2**64) and ``data_offsets`` (two such integers). Other fields of an
  entry are ignored, as the official reader ignores them;
- sorted by ``(begin, end)``, the tensors tile the data section: each begins where
  the previous one ends, spans exactly ``numel * bits / 8`` bytes (whole bytes for
  sub-byte dtypes), and the last ends at the end of the file. Zero-size and 0-rank
  tensors are valid.

**Where this reader is stricter, on purpose.** Two things the official reader
accepts are refused, each with its own error class:

- a JSON object that repeats a key (:class:`~safeshard.errors.DuplicateKeyError`).
  serde_json refuses a repeated ``dtype``/``shape``/``data_offsets`` field or a
  second ``__metadata__``, but silently keeps the *last* of two tensors or metadata
  keys with the same name. A parser that stops at the first match keeps the other
  one, so such a file shows different tensors to different tools: that is what a
  hostile file would use, and nothing legitimate writes it (issue 2 asked for this);
- forms that exist only as artifacts of serde's derived deserializers: a tensor
  entry written as an array ``[dtype, shape, data_offsets]``
  (:class:`~safeshard.errors.TensorEntryError`) and a dtype written as an object
  ``{"F16": null}`` (:class:`~safeshard.errors.UnknownDtypeError`). The format
  (the safetensors README) defines entries as objects and dtypes as strings, no
  writer produces these, and huggingface_hub's header parser cannot read them.

Every other file the official reader refuses is refused here too, and every file
accepted here loads there with the same tensors (``tests/format/test_header.py`` checks both
directions against the installed ``safetensors``). Each rule has its own error
class; when a file breaks several, which one is reported follows the order of the
checks in :func:`parse_header`, not the official reader's.

The reader never touches tensor data: it reads the 8-byte length and the header
JSON. The writer builds the exact header bytes of a file so that a planner can know
a shard's size before writing it.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from safeshard import gcpause
from safeshard.errors import (
    ByteRangeMismatchError,
    DuplicateKeyError,
    FileTooShortError,
    GapError,
    HeaderEncodingError,
    HeaderError,
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

JSON_WHITESPACE = " \t\n\r"
"""The only characters the official reader allows before and after the header JSON."""

MAX_JSON_DEPTH = 127
"""serde_json (the official reader's parser) refuses a 128th level of nested arrays
and objects."""

_U64_MAX = 2**64 - 1
_I64_MIN = -(2**63)
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")

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
    by_name: dict[str, TensorInfo] = field(default_factory=dict, repr=False, compare=False)
    """Built from ``tensors`` when not given (the reader passes the one it built)."""

    def __post_init__(self) -> None:
        if len(self.by_name) != len(self.tensors):
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


class _JSONObject(list):  # type: ignore[type-arg]
    """A JSON object as its ``(key, value)`` pairs in file order, so that repeated keys
    stay visible. A subclass of ``list``: the JSON decoder builds it in C."""

    __slots__ = ()


# A lone surrogate can only come from a \uD800-\uDFFF escape; without one (the usual
# case) no string needs checking.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# "-0" as an integer token. Matches inside strings only cost the slower parse.
_NEGATIVE_ZERO = re.compile(rb"-0(?![.eE])")
# What a writer might wrongly pad with: Unicode spaces, control characters, a
# byte-order mark and other invisible format characters.
_INVISIBLE = re.compile(
    r"[\s\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202f\u2060-\u2064\ufeff]*"
)
_BEGIN_END = operator.attrgetter("begin", "end")


def _json_type(value: Any) -> str:
    if type(value) is _JSONObject:
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _char_name(c: str) -> str:
    names = {"\ufeff": " (a byte-order mark)", "\x00": " (NUL)", "\x0c": " (form feed)"}
    return f"U+{ord(c):04X}{names.get(c, '')}"


def _reject_constant(path: str) -> Any:
    def hook(token: str) -> Any:
        raise HeaderJSONError(path, f"header is not valid JSON: {token} is not a JSON value")

    return hook


def _finite_float(path: str) -> Any:
    def hook(token: str) -> float:
        value = float(token)
        if value - value != 0:  # inf (NaN cannot come from a number token)
            raise HeaderJSONError(
                path,
                f"header number {token[:40]} is out of the range of a double; the official "
                "reader refuses it",
            )
        return value

    return hook


def _int_or_negative_zero(token: str) -> int | float:
    # serde_json reads "-0" as the float -0.0, so it is not an integer where one is needed
    return -0.0 if token == "-0" else int(token)


def _check_start(path: str, text: str) -> None:
    """Refuse padding other than JSON whitespace before the opening ``{``."""
    stripped = text.lstrip(JSON_WHITESPACE)
    if stripped.startswith("{"):
        return
    junk = _INVISIBLE.match(stripped)
    end = junk.end() if junk is not None else 0
    if end and stripped.startswith("{", end):
        raise HeaderStartError(
            path,
            f"header has {_char_name(stripped[0])} before its opening '{{'; only JSON "
            "whitespace (space, tab, LF, CR) may come before it",
        )
    # Anything else is not JSON, or JSON that is not an object: reported by the caller.


def _load_json(path: str, text: str, raw: bytes) -> Any:
    kwargs: dict[str, Any] = {
        "object_pairs_hook": _JSONObject,
        "parse_constant": _reject_constant(path),
        "parse_float": _finite_float(path),
    }
    if _NEGATIVE_ZERO.search(raw):
        kwargs["parse_int"] = _int_or_negative_zero
    try:
        return json.loads(text, **kwargs)
    except HeaderJSONError:
        raise
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            raise HeaderJSONError(
                path,
                f"header JSON ends at character {e.pos}, but {text[e.pos]!r} follows; only "
                "JSON whitespace (space, tab, LF, CR) may pad a header",
            ) from None
        raise HeaderJSONError(path, f"header is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:
        raise HeaderJSONError(path, f"header is not valid JSON: {e}") from None


def _first_repeat(keys: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            return k
        seen.add(k)
    return None


def parse_header(data: bytes, file_size: int, path: str | os.PathLike[str] = "<bytes>") -> Header:
    """Validate ``data``, which holds at least the first ``8 + N`` bytes of a file of ``file_size``.

    Checks, in order: length prefix, header size limit, header within the file, UTF-8,
    nothing but JSON whitespace before the ``{``, JSON (as serde_json reads it: no
    NaN/Infinity, finite numbers, no lone surrogates), an object, then each member in
    file order (a repeated key, the metadata, an entry's fields, dtype, shape, offsets,
    size and alignment; an entry that a later repeat of its key shadows is reported as
    the repeat), then the byte ranges (overlap, holes, end of file). See the module
    docs for what is accepted and where this is stricter than the official reader.
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
    return _parse(name, bytes(data[8 : 8 + n]), file_size)


def _parse(name: str, raw: bytes, file_size: int) -> Header:
    """The checks of :func:`parse_header` from UTF-8 on, for the header JSON ``raw``."""
    n = len(raw)
    with gcpause.paused():
        # The JSON tree is garbage once _parse_object returns, and freed before the
        # collector runs again: it never scans it.
        metadata, entries, by_name = _parse_object(name, raw)
        entries.sort(key=_BEGIN_END)
        pos = 0
        for t in entries:
            if t.begin != pos:
                if t.begin < pos:
                    raise OverlapError(
                        name,
                        f"tensor {t.name!r} starts at data offset {t.begin}, inside the previous "
                        f"tensor, which ends at {pos}",
                    )
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
            by_name=by_name,
        )


def _parse_object(
    path: str, raw: bytes
) -> tuple[dict[str, str] | None, list[TensorInfo], dict[str, TensorInfo]]:
    """The metadata, the tensor entries (in file order) and the entries by name.

    Memory: the decoded text is dropped once parsed, and each entry's JSON as soon
    as its :class:`TensorInfo` is made, so the JSON tree and the entries are never
    both whole (the tree is about three times their size).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderEncodingError(
            path, f"header is not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    _check_start(path, text)
    obj = _load_json(path, text, raw)
    del text
    if type(obj) is not _JSONObject:
        raise HeaderNotObjectError(path, f"header JSON must be an object, found {_json_type(obj)}")
    if _SURROGATE_ESCAPE.search(raw):
        _check_strings(path, obj)
    metadata: dict[str, str] | None = None
    metadata_keys = 0
    entries: list[TensorInfo] = []
    by_name: dict[str, TensorInfo] = {}
    append = entries.append
    width_of = DTYPE_BITS.get
    new = object.__new__
    setattr_ = object.__setattr__
    for i in range(len(obj)):
        key, value = obj[i]
        obj[i] = None  # this entry's JSON is freed once its TensorInfo is made
        if key in by_name or (key == METADATA_KEY and metadata_keys):
            raise DuplicateKeyError(
                path, f"header repeats the key {key!r}; each key may appear only once"
            )
        # The fast path takes the entry every writer writes: the three fields in this
        # order, well typed and consistent. Anything else, valid or not, goes through
        # _parse_entry, which says what is wrong.
        if type(value) is _JSONObject and len(value) == 3:
            (k0, dtype), (k1, shape), (k2, offsets) = value
            if (
                k0 == "dtype"
                and k1 == "shape"
                and k2 == "data_offsets"
                and type(dtype) is str
                and type(shape) is list
                and type(offsets) is list
                and len(offsets) == 2
            ):
                width = width_of(dtype)
                begin, end = offsets
                numel = 1
                for d in shape:
                    if type(d) is not int or d < 0:
                        numel = -1
                        break
                    numel *= d
                if (
                    width is not None
                    and type(begin) is int
                    and type(end) is int
                    and 0 <= begin <= end <= _U64_MAX
                    and 0 <= numel * width <= _U64_MAX
                    and not (numel * width) & 7
                    and end - begin == (numel * width) >> 3
                    and (
                        numel
                        or (not shape[0] and max(shape) <= _U64_MAX)  # [0, ...]: no product
                        or _zero_shape_ok(shape)
                    )
                ):
                    # TensorInfo(key, ...) without the frozen dataclass's __init__ frame:
                    # the same object, made in two thirds of the time
                    t = new(TensorInfo)
                    setattr_(t, "name", key)
                    setattr_(t, "dtype", dtype)
                    setattr_(t, "shape", tuple(shape))
                    setattr_(t, "begin", begin)
                    setattr_(t, "end", end)
                    append(t)
                    by_name[key] = t
                    continue
        try:
            if key == METADATA_KEY:
                metadata = _parse_metadata(path, value)
                metadata_keys += 1
            else:
                t = _parse_entry(path, key, value)
                append(t)
                by_name[key] = t
        except HeaderError:
            # The official reader keeps the last of two entries with one name: a repeat
            # of this key later on is the problem to report, not this entry.
            if any(k == key for k, _ in obj[i + 1 :]):
                raise DuplicateKeyError(
                    path, f"header repeats the key {key!r}; each key may appear only once"
                ) from None
            raise
    return metadata, entries, by_name


def _zero_shape_ok(shape: list[int]) -> bool:
    """A shape of non-negative integers whose product is 0 passes the official reader
    when each dimension fits 64 bits and no running product overflows before the 0."""
    if max(shape) > _U64_MAX:
        return False
    product = 1
    for d in shape:
        if not d:
            return True
        product *= d
        if product > _U64_MAX:
            return False
    return True  # pragma: no cover - the product is 0, so some dimension is


def _check_strings(path: str, obj: Any) -> None:
    """Refuse strings that are not Unicode text: JSON escapes like ``\\ud800`` decode to
    lone surrogates, which the official reader refuses and no writer can encode."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if type(v) is _JSONObject:
            for k, x in v:
                _check_text(path, k)
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            _check_text(path, v)


def _check_text(path: str, text: str) -> None:
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
    if type(value) is not _JSONObject:
        raise MetadataError(path, f"__metadata__ must be an object, found {_json_type(value)}")
    out = dict(value)
    if len(out) != len(value):
        raise DuplicateKeyError(
            path,
            f"__metadata__ repeats the key {_first_repeat(k for k, _ in value)!r}; each key "
            "may appear only once",
        )
    for k, v in value:
        if not isinstance(v, str):
            raise MetadataError(
                path, f"__metadata__[{k!r}] must be a string, found {_json_type(v)} {v!r}"
            )
    return out


def _check_ignored(path: str, tensor: str, fld: str, value: Any) -> None:
    """An entry field the format does not define: the official reader ignores it, once
    its JSON passes serde_json's limits (nesting, number range) and ours (no repeated key)."""
    stack = [(value, 3)]  # the header object is level 1, the entry level 2
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if t is _JSONObject or t is list:
            if depth > MAX_JSON_DEPTH:
                raise HeaderJSONError(
                    path,
                    f"tensor {tensor!r}: field {fld!r} nests arrays and objects more than "
                    f"{MAX_JSON_DEPTH} levels deep, which the official reader refuses",
                )
            if t is _JSONObject:
                if len({k for k, _ in v}) != len(v):
                    raise DuplicateKeyError(
                        path,
                        f"tensor {tensor!r}: field {fld!r} repeats the key "
                        f"{_first_repeat(k for k, _ in v)!r}",
                    )
                stack.extend((x, depth + 1) for _, x in v)
            else:
                stack.extend((x, depth + 1) for x in v)
        elif t is int and not _I64_MIN <= v <= _U64_MAX:
            try:  # serde_json reads an integer beyond 64 bits as a double
                float(v)
            except OverflowError:
                raise HeaderJSONError(
                    path,
                    f"tensor {tensor!r}: field {fld!r} holds an integer out of the range of "
                    "a double, which the official reader refuses",
                ) from None


def _parse_entry(path: str, key: str, value: Any) -> TensorInfo:
    if type(value) is not _JSONObject:
        raise TensorEntryError(
            path, f"tensor {key!r}: entry must be an object, found {_json_type(value)}"
        )
    fields = dict(value)
    if len(fields) != len(value):
        raise DuplicateKeyError(
            path,
            f"tensor {key!r}: entry repeats the field {_first_repeat(k for k, _ in value)!r}",
        )
    try:
        dtype = fields["dtype"]
        shape = fields["shape"]
        offsets = fields["data_offsets"]
    except KeyError as e:
        raise TensorEntryError(path, f"tensor {key!r}: entry has no {e.args[0]!r}") from None
    if len(fields) > 3:
        for fld, v in fields.items():
            if fld not in _ENTRY_FIELDS:
                _check_ignored(path, key, fld, v)
    width = DTYPE_BITS.get(dtype) if type(dtype) is str else None
    if width is None:
        raise UnknownDtypeError(
            path,
            f"tensor {key!r}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BITS)}",
        )
    if type(shape) is not list:
        raise InvalidShapeError(
            path, f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers"
        )
    numel = 1
    for d in shape:
        if type(d) is not int or d < 0 or d > _U64_MAX:
            raise InvalidShapeError(
                path,
                f"tensor {key!r}: shape {shape!r} is not a list of integers from 0 to 2**64 - 1",
            )
        numel *= d
        if numel > _U64_MAX:
            raise InvalidShapeError(
                path,
                f"tensor {key!r}: shape {shape!r} overflows 64 bits when its dimensions are "
                "multiplied in order, which the official reader refuses",
            )
    if (
        type(offsets) is not list
        or len(offsets) != 2
        or type(offsets[0]) is not int
        or type(offsets[1]) is not int
        or not 0 <= offsets[0] <= _U64_MAX
        or not 0 <= offsets[1] <= _U64_MAX
    ):
        raise TensorEntryError(
            path, f"tensor {key!r}: data_offsets {offsets!r} must be two non-negative integers"
        )
    begin, end = offsets
    if end < begin:
        raise ByteRangeMismatchError(
            path, f"tensor {key!r}: data_offsets [{begin}, {end}] end before they begin"
        )
    bits = numel * width
    if bits > _U64_MAX:
        raise InvalidShapeError(
            path,
            f"tensor {key!r}: {numel} elements of {dtype} are {bits} bits, which overflows 64 bits",
        )
    if bits % 8:
        raise MisalignedTensorError(
            path,
            f"tensor {key!r}: {numel} elements of {dtype} are {bits} bits, "
            "which does not end on a byte boundary",
        )
    if end - begin != bits >> 3:
        raise ByteRangeMismatchError(
            path,
            f"tensor {key!r}: data_offsets [{begin}, {end}] span {end - begin} bytes, but "
            f"{dtype}{shape} needs {bits >> 3}",
        )
    return TensorInfo(key, dtype, tuple(shape), begin, end)


def read_header_with(read: Callable[[int, int], bytes], size: int, name: str) -> Header:
    """The one header reader: validate the header of a ``size``-byte file through
    ``read(offset, length)``, which returns the bytes at ``offset`` (fewer only where the
    file ends). Two reads: the length, then the header; no tensor data is touched.

    This module opens nothing: :func:`safeshard.io.bytesrc.header_of` reads through a
    byte source, and :func:`safeshard.checkpoint.read_header` from a path.
    """
    head = read(0, min(8, size))
    if size < 8 or len(head) < 8:
        return parse_header(head, size, name)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_SIZE or 8 + n > size:
        return parse_header(head, size, name)
    body = read(8, n)
    if len(body) < n:  # the file shrank since its size was taken
        return parse_header(head + body, size, name)
    return _parse(name, body, size)


# --------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class TensorSpec:
    """What a writer needs to lay out one tensor: name, dtype, shape, byte count."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, t: TensorInfo) -> TensorSpec:
        """The spec of a header entry: ``TensorSpec(t.name, t.dtype, t.shape, t.nbytes)``
        without the frozen dataclass's ``__init__`` frame (planners make one per tensor,
        and a header can hold millions)."""
        spec = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(spec, "name", t.name)
        setattr_(spec, "dtype", t.dtype)
        setattr_(spec, "shape", t.shape)
        setattr_(spec, "nbytes", t.end - t.begin)
        return spec


class SizedTensor(Protocol):
    """What sizing a header entry needs: a :class:`TensorSpec`, or a :class:`TensorInfo`."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...


# The C string encoder that json.dumps(..., ensure_ascii=False) itself uses.
_encode_string: Any = json.encoder.encode_basestring


def _entry_json(name: str, dtype: str, shape: Sequence[int], begin: int, end: int) -> str:
    """``"name":{"dtype":...,"shape":[...],"data_offsets":[begin,end]}``, exactly as
    ``json.dumps`` writes it with compact separators and ``ensure_ascii=False``."""
    return (
        f'{_encode_string(name)}:{{"dtype":{_encode_string(dtype)},'
        f'"shape":[{",".join(map(str, shape))}],"data_offsets":[{begin},{end}]}}'
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


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
        end = pos + t.nbytes
        parts.append(_entry_json(t.name, t.dtype, t.shape, pos, end))
        pos = end
    return _frame(("{" + ",".join(parts) + "}").encode("utf-8"))


_ENTRY_SKELETON = len(':{"dtype":,"shape":[],"data_offsets":[,]}')
"""An entry's JSON less its name, dtype, dimensions and offsets."""


@functools.lru_cache(maxsize=256)
def _string_json_len(text: str) -> int:
    return _utf8_len(_encode_string(text))


@functools.lru_cache(maxsize=4096)
def _dims_len(shape: tuple[int, ...]) -> int:
    return len(",".join(map(str, shape)))


def entry_fixed_len(t: SizedTensor) -> int:
    """UTF-8 length of a tensor's header entry, less the digits of its two offsets.

    Offsets are the only part of an entry that depends on where the tensor lands, so a
    planner trying many placements measures each entry once. The same bytes as
    ``len(_entry_json(...))``, counted without building the entry.
    """
    name = _encode_string(t.name)
    return (
        (len(name) if name.isascii() else len(name.encode("utf-8")))
        + _ENTRY_SKELETON
        + _string_json_len(t.dtype)
        + _dims_len(tuple(t.shape))
    )


def metadata_len(metadata: Mapping[str, str] | None) -> int:
    """UTF-8 length of the ``"__metadata__":{...}`` member, 0 without metadata."""
    meta = _metadata_json(metadata)
    return 0 if meta is None else _utf8_len(meta)


def padded_header_size(body: int) -> int:
    """File bytes before the data of a header whose JSON is ``body`` bytes long."""
    return 8 + body + (-body) % HEADER_ALIGNMENT


class HeaderSizer:
    """Exact running size of :func:`build_header` while tensors are appended.

    ``header_size`` after each :meth:`add` equals ``len(build_header(added, metadata))``
    without building the JSON, so a planner can pack many tensors cheaply.
    """

    def __init__(self, metadata: Mapping[str, str] | None = None) -> None:
        meta = metadata_len(metadata)
        self._parts = 1 if metadata is not None else 0
        self._body = 2 + meta
        self.data = 0

    def cost(self, t: TensorSpec | TensorInfo) -> int:
        """Bytes of JSON (comma included) that appending ``t`` would add."""
        begin, end = self.data, self.data + t.nbytes
        return entry_fixed_len(t) + len(str(begin)) + len(str(end)) + (1 if self._parts else 0)

    def add(self, t: TensorSpec | TensorInfo) -> None:
        self._body += self.cost(t)
        self._parts += 1
        self.data += t.nbytes

    @property
    def header_size(self) -> int:
        return padded_header_size(self._body)

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
