"""A fuzzing kit: valid checkpoints, mutations of them, and what every outcome must satisfy.

A :class:`Case` is a valid checkpoint (:class:`Base`: tensors, metadata, and how it is
laid out: one file, hand-made shards with an index, or a ``safeshard split`` output
with its manifest), a list of mutations (:data:`Mut`) and a few options. :func:`run_case`
builds it in a fresh folder, runs it through ``inspect``, ``verify``, ``split`` (to a
fresh OUT_DIR), ``merge`` (to a fresh file), ``diff`` (against the unmutated checkpoint),
``open`` (every tensor of the lazy checkpoint with ``framework="numpy"``, by name or by a
prefetching layer walk) and ``load``, and checks:

- **only SafeshardErrors.** Every outcome is a result or a ``SafeshardError``; any other
  exception is a bug;
- **no hang.** Each command runs under a time limit (``SIGALRM``; a stuck command raises
  :class:`Hang`, which no ``except Exception`` can swallow);
- **no read past the end of a file.** :class:`ReadGuard` wraps ``os.preadv``, ``os.pread``
  and ``os.copy_file_range``, the three calls through which safeshard reads file bytes
  by offset (``io.bytesrc.LocalFile.readinto``, ``io.scan``, ``io.localfs``
  and the header reader all end there), and records every read of a regular file that
  asks for bytes beyond its size. One reader may ask past the end on purpose:
  ``io.copier.hash_file``, which reads a whole file to its end in fixed-size chunks (it
  must not *start* past the end); the header reader never asks past the end;
- **no write outside OUT_DIR or the merge target's folder.** :class:`WriteWatch`, an
  audit hook, sees every path-based write of the process, in every thread, wherever it
  lands; and everything else under the case's folder (the source, the unmutated copy,
  the files outside it that symlinks point to) is snapshotted, content, mode and mtime,
  before and after each command: the source must be byte-identical after;
- **correct results.** The truth is :func:`reference`: the files the checkpoint is made
  of (:func:`safeshard.source.locate`, the one rule every command follows) read by the
  official ``safetensors`` reader, checked against the index independently. A command
  that succeeds on a checkpoint the official reader refuses is a bug; one that refuses
  a valid checkpoint is a bug unless it is one of the documented stricter rules
  (:data:`STRICTER`, and only for a header that holds the form it refuses). When
  ``split`` succeeds its output verifies (also ``--against`` the source) and holds the
  same tensors and metadata; when ``merge`` succeeds the official reader loads the merged
  file with the same tensors; ``diff`` reports exactly the tensors that differ; ``open``
  and ``load`` return every tensor's bytes.

:data:`STATS` counts the cases and each command's outcomes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import re
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import traceback
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import safetensors
from hypothesis import strategies as st

import safeshard
from safeshard import errors
from safeshard.errors import SafeshardError
from safeshard.format.header import DTYPE_BITS
from safeshard.io import copier as hashcopy
from safeshard.runtime.readers import NUMPY_DTYPES

# --------------------------------------------------------------------------- JSON


class Obj:
    """A JSON object as an ordered list of pairs: it may repeat a key."""

    def __init__(self, pairs: Sequence[tuple[str, Any]] = ()) -> None:
        self.pairs = list(pairs)

    def __repr__(self) -> str:
        return f"Obj({self.pairs!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Obj) and self.pairs == other.pairs

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self.pairs:
            if k == key:
                return v
        return default

    def set(self, key: str, value: Any) -> None:
        for i, (k, _) in enumerate(self.pairs):
            if k == key:
                self.pairs[i] = (k, value)
                return
        self.pairs.append((key, value))


@dataclass(frozen=True)
class Raw:
    """A JSON token written as is (``-0``, ``1e400``, ``01``, ``[[[[``...)."""

    text: str

    @classmethod
    def nested(cls, depth: int) -> Raw:
        """``depth`` nested empty arrays."""
        return cls("[" * depth + "]" * depth)

    def __repr__(self) -> str:
        depth = len(self.text) // 2
        if depth > 8 and self.text == "[" * depth + "]" * depth:
            return f"Raw.nested({depth})"
        return f"Raw({self.text!r})"

    def encode(self) -> bytes:
        return self.text.encode("utf-8", "surrogateescape")


def dumps(value: Any, indent: bool = False) -> str:
    """JSON text for ``value``; strings are ASCII-escaped (a lone surrogate becomes
    ``\\ud800``, as a JSON writer in another language would write it)."""
    sep = ",\n  " if indent else ","
    if isinstance(value, Obj):
        return "{" + sep.join(f"{dumps(k)}:{dumps(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return dumps(Obj(list(value.items())), indent)
    return json.dumps(value)


def loads_obj(text: str | bytes) -> Any:
    """Parse JSON keeping repeated keys (objects become :class:`Obj`)."""
    return json.loads(text, object_pairs_hook=Obj)


# --------------------------------------------------------------------------- checkpoints

DTYPES = tuple(DTYPE_BITS)
COMMON_DTYPES = ("F16", "BF16", "F32", "I32", "U8", "I64", "BOOL", "F8_E4M3", "F4", "F6_E2M3")

HOSTILE_TEXT = (
    "",
    "__metadata__",
    "a\x1b[31mred",
    "b\x1b]0;title\x07",
    "c\x9b31m",
    "d\nforged: line",
    "e\r\t\x7f",
    "f\u202eevil\u2066\u200b\u2028",
    "[bold red]x[/] :warning:",
    "\x00nul",
    "\ud800",
    "lone\udfff",
    "pair\ud83d\ude00",
    "\ud83d",
    "../../outside/victim",
    "/abs/path",
    "a\\b",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.99999999999999999999.x",
    "é" * 40,
)

LEAVES = ("weight", "bias", "qweight", "qzeros", "scales", "g_idx")
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "input_layernorm")


def hostile_text(max_size: int = 12) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE_TEXT),
        st.text(st.characters(exclude_categories=()), max_size=max_size),
    )


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def valid_text(max_size: int = 12) -> st.SearchStrategy[str]:
    """Hostile text a valid header may hold (no lone surrogates)."""
    return hostile_text(max_size).filter(_encodable)


def tensor_names() -> st.SearchStrategy[str]:
    structured = st.one_of(
        st.builds(
            lambda i, m, leaf: f"model.layers.{i}.{m}.{leaf}",
            st.integers(0, 3),
            st.sampled_from(MODULES),
            st.sampled_from(LEAVES),
        ),
        st.sampled_from(("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")),
    )
    return st.one_of(structured, structured, valid_text().filter(lambda s: s != "__metadata__"))


def _aligned(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    numel = 1
    for d in shape:
        numel *= d
    return shape if (numel * DTYPE_BITS[dtype]) % 8 == 0 else (*shape, 8)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * DTYPE_BITS[self.dtype] // 8


@st.composite
def tensors(draw: st.DrawFn) -> Tensor:
    name = draw(tensor_names())
    dtype = draw(st.one_of(st.sampled_from(COMMON_DTYPES), st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    return Tensor(name, dtype, _aligned(dtype, shape))


@dataclass(frozen=True)
class Base:
    """A valid checkpoint, and how it is written."""

    tensors: tuple[Tensor, ...]
    metadata: tuple[tuple[str, str], ...] | None
    layout: str
    """``single``: one file; ``sharded``: hand-made shards and an index; ``split``: the
    output of ``safeshard split`` of one file (shards, index, manifest)."""
    shards: int = 2
    mixed_metadata: bool = False
    """``sharded``: the first shard carries no ``__metadata__``."""
    base: str = "model"
    order_seed: int = 0
    """Shuffles key order, data order and where ``__metadata__`` sits."""
    indent: bool = False
    pad: int = 0
    """Extra 8-byte blocks of trailing spaces in each header."""
    entry: bool = False
    """Pass the file or index itself rather than the folder."""


BASE_NAMES = ("model", "gptq_model-4bit-128g", "m\x1b[31m\u202e[b]", "w e+ird.v2", "m\udcff")
"""``\\udcff`` is the byte 0xff, a file name that is not UTF-8 (``os.fsdecode``)."""
BAD_SPLIT_NAMES = ("m\udcff", "a/b", ".x", "")
"""``split --name`` values refused with a UsageError."""
SPLIT_NAMES = ("model",) * 20 + ("gptq_model-4bit-128g", "m\x1b[31m[b]", *BAD_SPLIT_NAMES)
"""``split --name`` values, ``model`` most of the time (about 1 in 7 is refused)."""


@st.composite
def bases(draw: st.DrawFn) -> Base:
    ts = draw(st.lists(tensors(), max_size=7, unique_by=lambda t: t.name))
    meta = draw(
        st.one_of(
            st.none(),
            st.just((("format", "pt"),)),
            st.lists(
                st.tuples(valid_text(6), valid_text(6)), max_size=3, unique_by=lambda kv: kv[0]
            ).map(tuple),
        )
    )
    return Base(
        tensors=tuple(ts),
        metadata=meta,
        layout=draw(st.sampled_from(("single", "sharded", "split"))),
        shards=draw(st.integers(1, 3)),
        mixed_metadata=draw(st.booleans()),
        base=draw(st.sampled_from(BASE_NAMES)),
        order_seed=draw(st.integers(0, 2**16)),
        indent=draw(st.booleans()),
        pad=draw(st.integers(0, 2)),
        entry=draw(st.booleans()),
    )


def tensor_bytes(t: Tensor, salt: int = 0) -> bytes:
    seed = hashlib.sha256(t.name.encode("utf-8", "surrogatepass") + bytes([salt])).digest()
    return (seed * (t.nbytes // len(seed) + 1))[: t.nbytes]


def write_file(
    path: Path,
    ts: Sequence[Tensor],
    metadata: Mapping[str, str] | None,
    *,
    order_seed: int = 0,
    indent: bool = False,
    pad: int = 0,
) -> Path:
    """A valid safetensors file, written by hand: key order, data order and the place of
    ``__metadata__`` shuffled by ``order_seed``, trailing spaces to an 8-byte boundary."""
    rnd = random.Random(order_seed)
    data_order = list(ts)
    rnd.shuffle(data_order)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for t in data_order:
        offsets[t.name] = (pos, pos + t.nbytes)
        pos += t.nbytes
    keys = list(ts)
    rnd.shuffle(keys)
    pairs: list[tuple[str, Any]] = [
        (
            t.name,
            Obj(
                [
                    ("dtype", t.dtype),
                    ("shape", list(t.shape)),
                    ("data_offsets", list(offsets[t.name])),
                ]
            ),
        )
        for t in keys
    ]
    if metadata is not None:
        pairs.insert(rnd.randint(0, len(pairs)), ("__metadata__", Obj(list(metadata.items()))))
    body = dumps(Obj(pairs), indent).encode("ascii")
    body += b" " * ((-len(body)) % 8 + 8 * pad)
    path.write_bytes(
        struct.pack("<Q", len(body)) + body + b"".join(tensor_bytes(t) for t in data_order)
    )
    return path


def write_index(path: Path, weight_map: Mapping[str, str], total: int) -> None:
    obj = Obj(
        [
            ("metadata", Obj([("total_size", total)])),
            ("weight_map", Obj(sorted(weight_map.items()))),
        ]
    )
    path.write_text(dumps(obj, indent=True) + "\n", encoding="ascii")


# --------------------------------------------------------------------------- mutations

Mut = tuple[Any, ...]
"""One mutation: ``(kind, *params)``; see :func:`apply`."""

DEEP = Raw.nested(3000)
"""Nested past Python's recursion limit (a RecursionError in ``json``)."""
NESTED_128 = Raw.nested(128)
"""One level past serde_json's limit (the official reader refuses it)."""

INTS = st.one_of(
    st.sampled_from([0, 1, -1, 7, 8, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]),
    st.integers(-3, 40),
)
RAW_TOKENS = st.sampled_from(
    [
        Raw("-0"),
        Raw("1e400"),
        Raw("1.0"),
        Raw("01"),
        Raw("NaN"),
        Raw("1E2"),
        Raw("-1e-400"),
        Raw("0.5"),
        Raw("true"),
        DEEP,
        NESTED_128,
        Raw('"\\ud800"'),
        Raw('"\\udc00\\ud800"'),
    ]
)


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), INTS, st.floats(), hostile_text(6), RAW_TOKENS)
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.lists(st.tuples(hostile_text(4), inner), max_size=3).map(Obj),
        ),
        max_leaves=6,
    )


PREFIXES = (
    "zero",
    "minus1",
    "plus1",
    "plus8",
    "filesize",
    "filesize-7",
    "limit",
    "limit+1",
    "2**63",
    "2**64-1",
)
LEAD_BYTES = (b" ", b"\t", b"\n", b"\r", b"\x00", b"\xef\xbb\xbf", b"\x0c", b"\xc2\xa0", b"\xff")

header_ops = st.one_of(
    st.tuples(
        st.just("offsets"),
        st.integers(0, 9),
        st.one_of(
            st.tuples(st.just("shift"), st.integers(-9, 9), st.integers(-9, 9)),
            st.tuples(st.just("swap")),
            st.tuples(st.just("set"), st.lists(INTS, max_size=3)),
            st.tuples(st.just("json"), json_values()),
        ),
    ),
    st.tuples(
        st.just("dtype"),
        st.integers(0, 9),
        st.one_of(
            st.sampled_from(DTYPES),
            st.sampled_from(["F17", "f16", "", "F16 ", "float16", "Q4_0"]),
            st.just(Obj([("F16", None)])),
            json_values(),
        ),
    ),
    st.tuples(
        st.just("shape"),
        st.integers(0, 9),
        st.one_of(
            st.tuples(st.just("scale"), st.integers(0, 3), st.sampled_from([0, 2, 3, 2**32])),
            st.tuples(st.just("append"), INTS),
            st.tuples(st.just("drop")),
            st.tuples(st.just("set"), st.lists(INTS, max_size=4)),
            st.tuples(st.just("json"), json_values()),
        ),
    ),
    st.tuples(st.just("rename"), st.integers(0, 9), hostile_text()),
    st.tuples(st.just("dupname"), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(st.just("dupkey"), st.integers(0, 9)),
    st.tuples(
        st.just("field"),
        st.integers(0, 9),
        st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
        st.one_of(st.just("drop"), st.just("dup"), json_values()),
    ),
    st.tuples(st.just("entry"), st.integers(0, 9), json_values()),
    st.tuples(st.just("delete"), st.integers(0, 9)),
    st.tuples(st.just("add"), hostile_text(), json_values()),
    st.tuples(
        st.just("metadata"),
        st.one_of(
            st.just("drop"),
            st.just("dup"),
            st.lists(st.tuples(hostile_text(6), hostile_text(6)), max_size=3).map(Obj),
            json_values(),
        ),
    ),
    st.tuples(st.just("top"), json_values()),
)

weight_path_kinds = st.sampled_from(
    [
        "abs_outside",
        "abs_self",
        "dotdot_outside",
        "dotdot_back",
        "dot_slash",
        "subdir",
        "backslash",
        "drive",
        "other_ext",
        "no_ext",
        "index_name",
        "manifest_name",
        "nul",
        "empty",
        "dot",
        "dotdot",
        "long",
        "surrogate",
        "control",
        "link_outside",
        "link_dir",
        "link_dangling",
        "link_loop",
        "link_dot",
        "dir",
        "fifo",
        "missing",
        "other_shard",
        "int",
        "null",
        "list",
        "pct_dotdot",
        "pct_dotdot_twice",
        "pct_slash",
        "pct_backslash",
        "pct_nul",
        "pct_abs",
        "pct_scheme",
        "scheme_file",
        "scheme_http",
        "pct_harmless",
    ]
)

index_ops = st.one_of(
    st.tuples(st.just("path"), st.integers(0, 9), weight_path_kinds),
    st.tuples(st.just("path_all"), weight_path_kinds),
    st.tuples(st.just("drop"), st.integers(0, 9)),
    st.tuples(st.just("addtensor"), hostile_text(), weight_path_kinds),
    st.tuples(st.just("dup"), st.integers(0, 9)),
    st.tuples(st.just("total_size"), json_values()),
    st.tuples(st.just("metadata"), json_values()),
    st.tuples(st.just("weight_map"), json_values()),
    st.tuples(st.just("top"), json_values()),
)

manifest_ops = st.one_of(
    st.tuples(
        st.just("source_header"),
        st.sampled_from(
            [
                "swap_keys",
                "other_file",
                "garbage",
                "surrogate",
                "nonstr",
                "none",
                "drop_tensor",
                "reorder_data",
            ]
        ),
    ),
    st.tuples(st.just("source"), st.sampled_from(["file", "size"]), json_values()),
    st.tuples(
        st.just("tensor"), st.integers(0, 9), st.sampled_from(["digest", "nbytes"]), json_values()
    ),
    st.tuples(st.just("tensor_digest_of"), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(
        st.just("shard"),
        st.integers(0, 9),
        st.sampled_from(["file", "size", "header", "sha256"]),
        st.one_of(json_values(), st.sampled_from(["../outside/victim.safetensors", "/etc/passwd"])),
    ),
    st.tuples(
        st.just("top"),
        st.sampled_from(
            [
                "format",
                "version",
                "base",
                "cap",
                "fingerprint",
                "tensor_digest",
                "shards",
                "tensors",
                "source",
            ]
        ),
        json_values(),
    ),
    st.tuples(st.just("raw"), st.sampled_from([b"", b"{", b"\xff", DEEP])),
)

PLANT_NAMES = (
    "other.safetensors",
    "@single",
    "@index",
    "@manifest",
    "@shard0",
    "@orphan",
    "x.safetensors.index.json",
    "config.json",
    "quantize_config.json",
    ".safeshard.lock",
    ".safeshard-journal.json",
    ".safeshard-tmp-x",
    "README.md",
    "sub",
    "evil\x1b[31m\n.md",
)
PLANT_KINDS = (
    "valid",
    "garbage",
    "empty",
    "dir",
    "fifo",
    "link_outside_file",
    "link_outside_dir",
    "link_dot",
    "link_parent",
    "dangling",
    "loop",
)

QUANT_VALUES = st.one_of(
    st.builds(
        lambda bits, group, name, act: Obj(
            [
                ("bits", bits),
                ("group_size", group),
                ("model_file_base_name", name),
                ("desc_act", act),
            ]
        ),
        st.one_of(st.sampled_from([2, 3, 4, 8]), json_values()),
        st.one_of(st.sampled_from([-1, 32, 128]), json_values()),
        st.one_of(
            st.sampled_from(["model", "other", "../../outside/victim", "/abs"]), hostile_text()
        ),
        json_values(),
    ),
    json_values(),
)

muts = st.one_of(
    st.tuples(st.just("prefix"), st.integers(0, 9), st.sampled_from(PREFIXES)),
    st.tuples(st.just("header"), st.integers(0, 9), header_ops),
    st.tuples(
        st.just("ws"),
        st.integers(0, 9),
        st.lists(st.sampled_from(LEAD_BYTES), max_size=3).map(b"".join),
        st.lists(st.sampled_from(LEAD_BYTES), max_size=3).map(b"".join),
    ),
    st.tuples(
        st.just("rawheader"),
        st.integers(0, 9),
        st.one_of(
            st.sampled_from(
                [
                    b"",
                    b"{}",
                    b"[]",
                    b"null",
                    b"{" * 200,
                    NESTED_128,
                    DEEP,
                    Raw('{"a":' * 130 + "1" + "}" * 130),
                    b"\xff\xfe",
                    b'{"\xed\xa0\x80":{}}',
                    b'{"__metadata__":{"\\ud800":"x"}}',
                ]
            ),
            st.binary(max_size=24),
        ),
    ),
    st.tuples(st.just("truncate"), st.integers(0, 9), st.integers(1, 64), st.booleans()),
    st.tuples(st.just("append"), st.integers(0, 9), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("flip"), st.integers(0, 9), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("index"), index_ops),
    st.tuples(st.just("manifest"), manifest_ops),
    st.tuples(
        st.just("plant"),
        st.sampled_from(["src", "src", "out", "merged"]),
        st.sampled_from(PLANT_NAMES),
        st.sampled_from(PLANT_KINDS),
    ),
    st.tuples(st.just("linkshard"), st.integers(0, 9)),
    st.tuples(
        st.just("sidecar"),
        st.sampled_from(["quantize_config.json", "config.json"]),
        st.one_of(QUANT_VALUES, st.sampled_from([DEEP, Raw("\udcff")])),
    ),
)


@dataclass(frozen=True)
class Case:
    base: Base
    muts: tuple[Mut, ...] = ()
    force: bool = False
    """``split --force`` / ``merge --force`` (meaningful when something was planted)."""
    workers: int = 1
    walk: bool = False
    """``open``: read through ``iter_layers()`` (prefetching) rather than by name."""
    name: str = "model"
    """``split --name``."""


@st.composite
def cases(draw: st.DrawFn) -> Case:
    return Case(
        base=draw(bases()),
        muts=tuple(draw(st.lists(muts, max_size=3))),
        force=draw(st.booleans()),
        workers=draw(st.sampled_from([1, 4])),
        walk=draw(st.booleans()),
        name=draw(st.sampled_from(SPLIT_NAMES)),
    )


# --------------------------------------------------------------------------- building


@dataclass
class Built:
    """A case on disk."""

    root: Path
    src: Path
    pristine: Path
    outside: Path
    out: Path
    merged: Path
    base: str
    weights: list[str]
    """Weight file names in ``src`` (before mutations), in shard order."""
    index: str | None
    manifest: str | None
    input: Path
    pristine_input: Path
    planted_out: set[str] = field(default_factory=set)
    planted_merge: bool = False

    @property
    def merge_target(self) -> Path:
        return self.merged / "merged.safetensors"


def _write_base(base: Base, folder: Path, stage: Path) -> tuple[list[str], str | None, str | None]:
    """Write ``base`` into ``folder``; returns weight names, index name, manifest name."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(base.metadata) if base.metadata is not None else None
    write = functools.partial(
        write_file, order_seed=base.order_seed, indent=base.indent, pad=base.pad
    )
    if base.layout == "single" or (base.layout == "sharded" and len(base.tensors) < 2):
        name = f"{base.base}.safetensors"
        write(folder / name, base.tensors, meta)
        return [name], None, None
    if base.layout == "sharded":
        n = min(base.shards + 1, len(base.tensors))
        groups = [base.tensors[i::n] for i in range(n)]
        names = [f"{base.base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        wm: dict[str, str] = {}
        for i, (fname, group) in enumerate(zip(names, groups, strict=True)):
            m = None if base.mixed_metadata and i == 0 else meta
            write(folder / fname, group, m)
            wm.update({t.name: fname for t in group})
        index = f"{base.base}.safetensors.index.json"
        write_index(folder / index, wm, sum(t.nbytes for t in base.tensors))
        return names, index, None
    # split: safeshard's own output, with a manifest recording the original header
    stage.mkdir(parents=True, exist_ok=True)
    one = write(stage / "orig.safetensors", base.tensors, meta)
    size = one.stat().st_size
    result = safeshard.split(
        one,
        folder,
        max_shard_size=max(64, size // (base.shards + 1)),
        allow_oversize=True,
        name=base.base if _encodable(base.base) else "model",
        sha256=base.indent,
    )
    names = [f.file for f in result.files]
    index_name = result.index.name if result.index is not None else None
    man = result.manifest
    return names, index_name, man.name if man is not None and man.exists() else None


def build(case: Case, root: Path) -> Built:
    base = case.base
    src, pristine, outside = root / "src", root / "pristine", root / "outside"
    weights, index, manifest = _write_base(base, src, root / "stage")
    _write_base(base, pristine, root / "stage2")
    outside.mkdir()
    victim = [Tensor("victim.weight", "F32", (2,))]
    write_file(outside / "victim.safetensors", victim, {"victim": "1"})
    (outside / "victim.txt").write_text("do not touch\n")
    (outside / "victim_dir").mkdir()
    (outside / "victim_dir" / "inner.txt").write_text("inner\n")
    merged = root / "merged"
    merged.mkdir()
    shutil.rmtree(root / "stage", ignore_errors=True)
    shutil.rmtree(root / "stage2", ignore_errors=True)
    real_base = base.base if base.layout != "split" or _encodable(base.base) else "model"

    def entry(folder: Path) -> Path:
        if not base.entry:
            return folder
        return folder / (index if index is not None else weights[0])

    b = Built(
        root=root,
        src=src,
        pristine=pristine,
        outside=outside,
        out=root / "out",
        merged=merged,
        base=real_base,
        weights=weights,
        index=index,
        manifest=manifest,
        input=entry(src),
        pristine_input=entry(pristine),
    )
    for m in case.muts:
        apply(b, m)
    return b


# --------------------------------------------------------------------------- applying


def _pick(items: Sequence[Any], i: int) -> Any:
    return items[i % len(items)] if items else None


def _split_file(data: bytes) -> tuple[int, bytes, bytes] | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        return None
    return n, data[8 : 8 + n], data[8 + n :]


def _frame(body: bytes, rest: bytes) -> bytes:
    return struct.pack("<Q", len(body)) + body + rest


def _pad(body: bytes) -> bytes:
    return body + b" " * ((-len(body)) % 8)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _plant(path: Path, kind: str, b: Built) -> None:
    _remove(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "valid":
        write_file(path, [Tensor("planted.weight", "F16", (3,))], None)
    elif kind == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link_outside_file":
        path.symlink_to(b.outside / "victim.safetensors")
    elif kind == "link_outside_dir":
        path.symlink_to(b.outside / "victim_dir")
    elif kind == "link_dot":
        path.symlink_to(".")
    elif kind == "link_parent":
        path.symlink_to("..")
    elif kind == "dangling":
        path.symlink_to(b.outside / "nothing-here")
    elif kind == "loop":
        path.symlink_to(path.name)
    else:
        raise AssertionError(kind)


def _plant_name(b: Built, name: str) -> str:
    if name == "@single":
        return f"{b.base}.safetensors"
    if name == "@index":
        return b.index or f"{b.base}.safetensors.index.json"
    if name == "@manifest":
        return b.manifest or f"{b.base}.safeshard.json"
    if name == "@shard0":
        return b.weights[0]
    if name == "@orphan":
        return f"{b.base}-00009-of-00009.safetensors"
    return name


def _weight_value(b: Built, kind: str, tensor_file: str) -> Any:
    """A weight_map value of ``kind``; creates what it names when the kind needs it."""
    src = b.src
    if kind == "abs_outside":
        return str(b.outside / "victim.safetensors")
    if kind == "abs_self":
        return str(src / tensor_file)
    if kind == "dotdot_outside":
        return "../outside/victim.safetensors"
    if kind == "dotdot_back":
        return "../src/" + tensor_file
    if kind == "dot_slash":
        return "./" + tensor_file
    if kind in ("subdir", "backslash"):
        (src / "sub").mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(src / tensor_file, src / "sub" / tensor_file)
        return ("sub/" if kind == "subdir" else "sub\\") + tensor_file
    if kind == "drive":
        return "C:" + tensor_file
    if kind in ("other_ext", "no_ext"):
        name = tensor_file[: -len(".safetensors")] + (".bin" if kind == "other_ext" else "")
        with contextlib.suppress(OSError):
            shutil.copyfile(src / tensor_file, src / name)
        return name
    if kind == "index_name":
        return b.index or "model.safetensors.index.json"
    if kind == "manifest_name":
        return b.manifest or "model.safeshard.json"
    if kind == "nul":
        return tensor_file + "\x00"
    if kind == "empty":
        return ""
    if kind == "dot":
        return "."
    if kind == "dotdot":
        return ".."
    if kind == "long":
        return "a" * 300 + ".safetensors"
    if kind == "surrogate":
        return "\ud800.safetensors"
    if kind == "control":
        name = "a\x1b[31m\n\u202e.safetensors"
        with contextlib.suppress(OSError):
            shutil.copyfile(src / tensor_file, src / name)
        return name
    links = {
        "link_outside": ("link.safetensors", "link_outside_file"),
        "link_dir": ("ldir.safetensors", "link_outside_dir"),
        "link_dangling": ("dangling.safetensors", "dangling"),
        "link_loop": ("loop.safetensors", "loop"),
        "link_dot": ("dot.safetensors", "link_dot"),
        "dir": ("d.safetensors", "dir"),
        "fifo": ("f.safetensors", "fifo"),
    }
    if kind in links:
        name, plant = links[kind]
        _plant(src / name, plant, b)
        return name
    pct = {
        # URL and percent-encoding forms: each names a file that exists under its literal
        # name (so a reader that checks only the raw text would read it), and decodes to
        # a name outside the folder, a separator, a NUL or a URL
        "pct_dotdot": "%2E%2E%2Foutside%2Fvictim.safetensors",
        "pct_dotdot_twice": "%252E%252E%252Foutside%252Fvictim.safetensors",
        "pct_slash": "sub%2F" + tensor_file,
        "pct_backslash": "sub%5C" + tensor_file,
        "pct_nul": tensor_file[: -len(".safetensors")] + "%00.safetensors",
        "pct_abs": "%2F" + tensor_file,
        "pct_scheme": "file%3A" + tensor_file,
        "scheme_file": "file:" + tensor_file,
        "scheme_http": "http:" + tensor_file,
        "pct_harmless": tensor_file.replace("-", "%2D").replace("l", "%6C"),
    }
    if kind in pct:
        name = pct[kind]
        with contextlib.suppress(OSError):
            shutil.copyfile(src / tensor_file, src / name)
        return name
    if kind == "missing":
        return "nothere.safetensors"
    if kind == "other_shard":
        others = [w for w in b.weights if w != tensor_file]
        return others[0] if others else tensor_file
    return {"int": 5, "null": None, "list": [tensor_file]}[kind]


def _mutate_header(tree: Any, op: Mut) -> Any:
    kind = op[0]
    if kind == "top":
        return op[1]
    if not isinstance(tree, Obj):
        return tree
    entries = [i for i, (k, _) in enumerate(tree.pairs) if k != "__metadata__"]
    if kind == "add":
        tree.pairs.append((op[1], op[2]))
        return tree
    if kind == "metadata":
        value = op[1]
        metas = [i for i, (k, _) in enumerate(tree.pairs) if k == "__metadata__"]
        if value == "drop":
            tree.pairs = [(k, v) for k, v in tree.pairs if k != "__metadata__"]
        elif value == "dup":
            tree.pairs.append(("__metadata__", Obj([("format", "pt")])))
        elif metas:
            tree.pairs[metas[0]] = ("__metadata__", value)
        else:
            tree.pairs.insert(0, ("__metadata__", value))
        return tree
    if not entries:
        return tree
    i = entries[op[1] % len(entries)]
    key, entry = tree.pairs[i]
    if kind == "rename":
        tree.pairs[i] = (op[2], entry)
    elif kind == "dupname":
        tree.pairs[i] = (tree.pairs[entries[op[2] % len(entries)]][0], entry)
    elif kind == "dupkey":
        tree.pairs.append((key, entry))
    elif kind == "delete":
        del tree.pairs[i]
    elif kind == "entry":
        tree.pairs[i] = (key, op[2])
    elif not isinstance(entry, Obj):
        return tree
    elif kind == "field":
        name = op[2]
        if op[3] == "drop":
            entry.pairs = [(k, v) for k, v in entry.pairs if k != name]
        elif op[3] == "dup":
            entry.pairs.append((name, entry.get(name)))
        else:
            entry.set(name, op[3])
    elif kind == "dtype":
        entry.set("dtype", op[2])
    elif kind == "offsets":
        how = op[2]
        cur = entry.get("data_offsets")
        ok = isinstance(cur, list) and len(cur) == 2 and all(type(x) is int for x in cur)
        if how[0] == "shift" and ok:
            entry.set("data_offsets", [cur[0] + how[1], cur[1] + how[2]])
        elif how[0] == "swap" and ok:
            entry.set("data_offsets", [cur[1], cur[0]])
        elif how[0] == "set" or how[0] == "json":
            entry.set("data_offsets", how[1])
    elif kind == "shape":
        how = op[2]
        cur = entry.get("shape")
        ok = isinstance(cur, list) and all(type(x) is int for x in cur)
        if how[0] == "scale" and ok and cur:
            j = how[1] % len(cur)
            entry.set("shape", [*cur[:j], cur[j] * how[2], *cur[j + 1 :]])
        elif how[0] == "append" and ok:
            entry.set("shape", [*cur, how[1]])
        elif how[0] == "drop" and ok and cur:
            entry.set("shape", cur[:-1])
        elif how[0] in ("set", "json"):
            entry.set("shape", how[1])
    return tree


def _prefix_value(how: str, n: int, size: int) -> int:
    return {
        "zero": 0,
        "minus1": n - 1,
        "plus1": n + 1,
        "plus8": n + 8,
        "filesize": size - 8,
        "filesize-7": size - 7,
        "limit": 100_000_000,
        "limit+1": 100_000_001,
        "2**63": 2**63,
        "2**64-1": 2**64 - 1,
    }[how] % 2**64


def _weight_path(b: Built, i: int) -> Path | None:
    names = [w for w in b.weights if (b.src / w).exists() and (b.src / w).is_file()]
    name = _pick(names, i)
    return None if name is None else b.src / name


def apply(b: Built, m: Mut) -> None:
    """Apply mutation ``m`` to the case on disk (a no-op where it does not apply)."""
    kind = m[0]
    if kind in ("prefix", "header", "ws", "rawheader", "truncate", "append", "flip"):
        path = _weight_path(b, m[1])
        if path is None:
            return
        data = path.read_bytes()
        parts = _split_file(data)
        if kind == "prefix":
            if len(data) >= 8:
                n = parts[0] if parts else 0
                new = _prefix_value(m[2], n, len(data))
                path.write_bytes(struct.pack("<Q", new) + data[8:])
        elif kind == "header":
            if parts is None:
                return
            try:
                tree = loads_obj(parts[1])
            except ValueError:
                return
            tree = _mutate_header(tree, m[2])
            path.write_bytes(_frame(_pad(dumps(tree).encode("ascii")), parts[2]))
        elif kind == "ws":
            if parts is None:
                return
            body = m[2] + parts[1].strip(b" ") + m[3]
            path.write_bytes(_frame(_pad(body), parts[2]))
        elif kind == "rawheader":
            rest = parts[2] if parts is not None else b""
            body = m[2].encode() if isinstance(m[2], Raw) else m[2]
            path.write_bytes(_frame(body, rest))
        elif kind == "truncate":
            cut = m[2] if m[3] else len(data) * m[2] // 65
            path.write_bytes(data[: max(0, len(data) - cut)])
        elif kind == "append":
            path.write_bytes(data + m[2])
        elif kind == "flip" and data:
            pos = min(len(data) - 1, int(m[2] * len(data)))
            path.write_bytes(data[:pos] + bytes([data[pos] ^ m[3]]) + data[pos + 1 :])
        return
    if kind == "index":
        _apply_index(b, m[1])
    elif kind == "manifest":
        _apply_manifest(b, m[1])
    elif kind == "plant":
        where, name, plant = m[1], _plant_name(b, m[2]), m[3]
        if where == "src":
            _plant(b.src / name, plant, b)
        elif where == "out":
            b.out.mkdir(exist_ok=True)
            _plant(b.out / name, plant, b)
            b.planted_out.add(name)
        else:
            _plant(b.merge_target, plant, b)
            b.planted_merge = True
    elif kind == "linkshard":
        path = _weight_path(b, m[1])
        if path is None:
            return
        (b.outside / "linked").mkdir(exist_ok=True)
        moved = b.outside / "linked" / path.name
        shutil.move(path, moved)
        path.symlink_to(moved)
    elif kind == "sidecar":
        value = m[2]
        p = b.src / m[1]
        _remove(p)
        p.write_bytes(dumps(value).encode("utf-8", "surrogateescape"))  # \udcff: byte 0xff
    else:
        raise AssertionError(kind)


def _apply_index(b: Built, op: Mut) -> None:
    if b.index is None:
        return
    path = b.src / b.index
    if not path.is_file():
        return
    try:
        tree = loads_obj(path.read_bytes())
    except ValueError:
        return
    if not isinstance(tree, Obj):
        return
    kind = op[0]
    if kind == "top":
        path.write_text(dumps(op[1]), encoding="ascii")
        return
    wm = tree.get("weight_map")
    if kind == "weight_map":
        tree.set("weight_map", op[1])
    elif kind == "total_size":
        meta = tree.get("metadata")
        if isinstance(meta, Obj):
            meta.set("total_size", op[1])
    elif kind == "metadata":
        tree.set("metadata", op[1])
    elif isinstance(wm, Obj):
        if kind == "addtensor":
            wm.pairs.append((op[1], _weight_value(b, op[2], _pick(b.weights, 0))))
        elif wm.pairs:
            i = op[1] % len(wm.pairs) if kind != "path_all" else 0
            t, f = wm.pairs[i]
            if kind == "path":
                wm.pairs[i] = (
                    t,
                    _weight_value(b, op[2], f if isinstance(f, str) else b.weights[0]),
                )
            elif kind == "path_all":
                first = f if isinstance(f, str) else b.weights[0]
                value = _weight_value(b, op[1], first)
                wm.pairs = [(t, value if v == first else v) for t, v in wm.pairs]
            elif kind == "drop":
                del wm.pairs[i]
            elif kind == "dup":
                wm.pairs.append((t, f))
    path.write_text(dumps(tree, indent=True), encoding="ascii")


def _apply_manifest(b: Built, op: Mut) -> None:
    if b.manifest is None:
        return
    path = b.src / b.manifest
    kind = op[0]
    if kind == "raw":
        path.write_bytes(op[1].encode() if isinstance(op[1], Raw) else op[1])
        return
    try:
        tree = loads_obj(path.read_bytes())
    except ValueError:
        return
    if not isinstance(tree, Obj):
        return
    if kind == "top":
        tree.set(op[1], op[2])
    elif kind in ("source", "source_header"):
        src = tree.get("source")
        if not isinstance(src, Obj):
            return
        if kind == "source":
            src.set(op[1], op[2])
        else:
            _mutate_source_header(src, op[1], b)
    elif kind in ("tensor", "tensor_digest_of"):
        ts = tree.get("tensors")
        if not isinstance(ts, Obj) or not ts.pairs:
            return
        _, rec = ts.pairs[op[1] % len(ts.pairs)]
        if not isinstance(rec, Obj):
            return
        if kind == "tensor":
            rec.set(op[2], op[3])
        else:
            other = ts.pairs[op[2] % len(ts.pairs)][1]
            if isinstance(other, Obj):
                rec.set("digest", other.get("digest"))
    elif kind == "shard":
        shards = tree.get("shards")
        if not isinstance(shards, list) or not shards:
            return
        rec = shards[op[1] % len(shards)]
        if isinstance(rec, Obj):
            rec.set(op[2], op[3])
    path.write_text(dumps(tree, indent=True), encoding="ascii")


def _mutate_source_header(src: Obj, how: str, b: Built) -> None:
    text = src.get("header")
    if how == "garbage":
        src.set("header", "{not a header")
    elif how == "surrogate":
        src.set("header", '{"\ud800":{"dtype":"F16","shape":[0],"data_offsets":[0,0]}}')
    elif how == "nonstr":
        src.set("header", 5)
    elif how == "none":
        src.pairs = [(k, v) for k, v in src.pairs if k != "header"]
    elif how == "other_file":
        raw = (b.outside / "victim.safetensors").read_bytes()
        parts = _split_file(raw)
        assert parts is not None
        src.set("header", parts[1].decode("ascii"))
    elif isinstance(text, str):
        try:
            tree = loads_obj(text)
        except ValueError:
            return
        if not isinstance(tree, Obj):
            return
        entries = [p for p in tree.pairs if p[0] != "__metadata__"]
        if how == "swap_keys":
            tree.pairs.reverse()
        elif how == "drop_tensor" and entries:
            tree.pairs.remove(entries[0])
        elif how == "reorder_data" and len(entries) >= 2:
            # give the first two tensors each other's offsets (valid only if same size)
            (_, a), (_, c) = entries[0], entries[1]
            if isinstance(a, Obj) and isinstance(c, Obj):
                oa, oc = a.get("data_offsets"), c.get("data_offsets")
                a.set("data_offsets", oc)
                c.set("data_offsets", oa)
        body = dumps(tree)
        src.set("header", body + " " * ((-len(body.encode("utf-8", "surrogatepass"))) % 8))


# --------------------------------------------------------------------------- the truth


@dataclass
class Ref:
    """A valid checkpoint as the official reader sees it."""

    tensors: dict[str, tuple[str, tuple[int, ...], bytes]]
    metadata: list[dict[str, str] | None]
    """Each file's ``__metadata__``, in the located order."""
    stricter: tuple[type[SafeshardError], ...] = ()
    """The refusals :data:`STRICTER` allows for these files (what their headers hold)."""

    @property
    def common_metadata(self) -> dict[str, str] | None:
        metas = self.metadata
        if not metas:
            return None
        first = metas[0]
        if all(m == first for m in metas):
            return first or None
        return {
            k: v
            for k, v in (first or {}).items()
            if all(m is not None and m.get(k) == v for m in metas)
        } or None


def official(
    path: Path,
) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], dict[str, str] | None]:
    """The tensors and metadata of one file, read by the official reader (raises on a
    file it refuses)."""
    data = path.read_bytes()
    items = safetensors.deserialize(data)
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n]).get("__metadata__")
    return {k: (v["dtype"], tuple(v["shape"]), bytes(v["data"])) for k, v in items}, meta


def _safe_weight_name(value: object) -> bool:
    """The index rule, written independently: a plain ``.safetensors`` file name, as
    written and percent-decoded (repeatedly, as a server may), with no URL scheme."""
    if not isinstance(value, str) or not value.endswith(".safetensors"):
        return False
    forms = [value]
    while "%" in forms[-1] and len(forms) < 9:
        nxt = urllib.parse.unquote(forms[-1], errors="surrogateescape")
        if nxt == forms[-1]:
            break
        forms.append(nxt)
    return all(
        not any(c in f for c in "/\\\x00")
        and f not in (".", "..")
        and not f.startswith("..")
        and not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", f)
        for f in forms
    )


def reference(inp: Path) -> tuple[Ref | None, str]:
    """The checkpoint at ``inp`` as the official reader sees it, or None and why not."""
    try:
        loc = safeshard.checkpoint.locate(inp)
    except SafeshardError as e:
        return None, f"locate: {type(e).__name__}"
    except Exception as e:  # a bug in locate: reported by the commands that call it
        return None, f"locate crashed: {e!r}"
    if loc.index is not None:
        bad = [v for v in loc.index.weight_map.values() if not _safe_weight_name(v)]
        assert not bad, f"read_index accepted unsafe weight_map values {bad!r}"
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    stricter: set[type[SafeshardError]] = set()
    where: dict[str, str] = {}
    metas: list[dict[str, str] | None] = []
    for f in loc.files:
        try:
            if not f.is_file():
                return None, f"{f.name}: not a file"
            ts, meta = official(f)
        except (OSError, ValueError) as e:
            return None, f"{f.name}: unreadable ({type(e).__name__})"
        except Exception as e:  # SafetensorError
            return None, f"{f.name}: official reader refuses it ({e})"
        metas.append(meta)
        stricter |= _stricter_forms(f)
        for k, v in ts.items():
            if k in tensors:
                return None, f"{k!r} in two files"
            tensors[k] = v
            where[k] = f.name
    if loc.index is not None and {k: v for k, v in loc.index.weight_map.items()} != where:
        return None, "index and shards disagree"
    return Ref(tensors, metas, tuple(stricter)), ""


def _stricter_forms(path: Path) -> set[type[SafeshardError]]:
    """Which of safeshard's deliberate refusals (:data:`STRICTER`) apply to the header of
    ``path``, a file the official reader accepts: a repeated key anywhere, a tensor entry
    written as an array, a dtype written as an object."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    tree = loads_obj(data[8 : 8 + n])
    found: set[type[SafeshardError]] = set()

    def walk(v: Any) -> None:
        if isinstance(v, Obj):
            keys = [k for k, _ in v.pairs]
            if len(set(keys)) != len(keys):
                found.add(errors.DuplicateKeyError)
            for _, x in v.pairs:
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(tree)
    for key, entry in tree.pairs if isinstance(tree, Obj) else ():
        if key == "__metadata__":
            continue
        if isinstance(entry, list):
            found.add(errors.TensorEntryError)
        elif isinstance(entry, Obj) and isinstance(entry.get("dtype"), Obj):
            found.add(errors.UnknownDtypeError)
    return found


# --------------------------------------------------------------------------- guards


class Hang(BaseException):
    """A command ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds`` (SIGALRM)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"{what} ran for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_EXEMPT_TO_EOF = hashcopy.hash_file.__code__


def _caller_codes(depth: int = 8) -> set[Any]:
    codes = set()
    f: FrameType | None = sys._getframe(3)
    while f is not None and depth:
        codes.add(f.f_code)
        f, depth = f.f_back, depth - 1
    return codes


class ReadGuard:
    """Records every positional read that asks for bytes past the end of a regular file.

    Wraps ``os.preadv``, ``os.pread`` and ``os.copy_file_range`` while active (see the
    module docs for the one reader allowed to ask past the end, and how far).
    """

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.reads = 0
        self._saved: dict[str, Any] = {}

    def _check(self, fd: int, offset: int, length: int, call: str) -> None:
        self.reads += 1
        try:
            st_ = os.fstat(fd)
        except OSError:
            return
        if not stat.S_ISREG(st_.st_mode) or offset + length <= st_.st_size:
            return
        codes = _caller_codes()
        if _EXEMPT_TO_EOF in codes and offset <= st_.st_size:
            return
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = f"fd {fd}"
        self.violations.append(
            f"{call} of {length} bytes at {offset} in {name} ({st_.st_size} bytes)"
        )

    def __enter__(self) -> ReadGuard:
        real_preadv, real_pread = os.preadv, os.pread
        real_cfr = getattr(os, "copy_file_range", None)
        self._saved = {"preadv": real_preadv, "pread": real_pread, "copy_file_range": real_cfr}

        def preadv(fd: int, buffers: Sequence[Any], offset: int, *a: Any) -> int:
            self._check(fd, offset, sum(memoryview(b).nbytes for b in buffers), "preadv")
            return real_preadv(fd, buffers, offset, *a)

        def pread(fd: int, length: int, offset: int) -> bytes:
            self._check(fd, offset, length, "pread")
            return real_pread(fd, length, offset)

        os.preadv, os.pread = preadv, pread  # type: ignore[assignment]
        if real_cfr is not None:

            def copy_file_range(
                src: int,
                dst: int,
                count: int,
                offset_src: int | None = None,
                offset_dst: int | None = None,
            ) -> int:
                if offset_src is not None:
                    self._check(src, offset_src, count, "copy_file_range")
                return int(real_cfr(src, dst, count, offset_src, offset_dst))

            os.copy_file_range = copy_file_range
        return self

    def __exit__(self, *exc: object) -> None:
        os.preadv = self._saved["preadv"]
        os.pread = self._saved["pread"]
        if self._saved["copy_file_range"] is not None:
            os.copy_file_range = self._saved["copy_file_range"]


class WriteWatch:
    """Records every file-system write outside ``allowed`` folders while active.

    A Python audit hook (added once, idle when no watch is active) sees every path-based
    write the interpreter makes, in every thread: ``open``/``os.open`` with a write flag,
    rename/replace, unlink, rmdir, mkdir, link, symlink, chmod, utime and rmtree.
    Paths are resolved through symlinks (the last component too, where the call follows
    it), so a write through a planted symlink counts where it lands.
    """

    _active: WriteWatch | None = None
    _hooked = False
    _busy = threading.local()
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def __init__(self, allowed: Sequence[Path]) -> None:
        self.allowed = [os.path.realpath(p) for p in allowed]
        self.violations: list[str] = []

    def __enter__(self) -> WriteWatch:
        if not WriteWatch._hooked:
            sys.addaudithook(WriteWatch._hook)
            WriteWatch._hooked = True
        WriteWatch._active = self
        return self

    def __exit__(self, *exc: object) -> None:
        WriteWatch._active = None

    @staticmethod
    def _hook(event: str, args: tuple[Any, ...]) -> None:
        watch = WriteWatch._active
        if watch is None or getattr(WriteWatch._busy, "on", False):
            return
        WriteWatch._busy.on = True
        try:
            watch._event(event, args)
        except Exception as e:  # never break the call being watched
            watch.violations.append(f"{event} {args!r}: could not be checked ({e!r})")
        finally:
            WriteWatch._busy.on = False

    def _where(self, path: Any, dir_fd: Any, follow: bool) -> str | None:
        if isinstance(path, int) or path is None:
            return None  # a descriptor: its open was watched
        p = os.fsdecode(path)
        if not os.path.isabs(p) and isinstance(dir_fd, int):
            p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        p = os.path.abspath(p)
        if follow:
            return os.path.realpath(p)
        return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))

    def _check(self, event: str, path: Any, dir_fd: Any = None, follow: bool = False) -> None:
        where = self._where(path, dir_fd, follow)
        if where is None:
            return
        if not any(where == a or where.startswith(a + os.sep) for a in self.allowed):
            self.violations.append(f"{event} {where}")

    def _event(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & self.WRITE_FLAGS
            )
            if writes:
                nofollow = isinstance(flags, int) and flags & getattr(os, "O_NOFOLLOW", 0)
                self._check(event, path, follow=not nofollow)
        elif event in ("os.rename", "os.link"):
            self._check(event, args[0], args[2])
            self._check(event, args[1], args[3])
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):
            self._check(event, args[0], args[1])
        elif event == "os.mkdir":
            self._check(event, args[0], args[2])
        elif event == "os.symlink":
            self._check(event, args[1], args[2])
        elif event in ("os.chmod", "os.chown", "os.utime", "os.chflags", "os.truncate"):
            self._check(event, args[0], follow=True)


Snapshot = dict[str, tuple[Any, ...]]


def snapshot(root: Path, skip: Sequence[Path]) -> Snapshot:
    """Every entry under ``root`` except ``skip``'s subtrees: type, mode, mtime, and the
    content's hash (files) or target (symlinks)."""
    out: Snapshot = {}
    skipped = {os.fspath(p) for p in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            if p in skipped:
                continue
            st_ = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st_.st_mode):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("file", st_.st_mode, st_.st_mtime_ns, digest)
            else:
                out[rel] = ("other", st_.st_mode, st_.st_mtime_ns)
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skipped]
    return out


def snapshot_diff(before: Snapshot, after: Snapshot) -> list[str]:
    changes = [f"created {k!r}" for k in after if k not in before]
    changes += [f"removed {k!r}" for k in before if k not in after]
    changes += [f"changed {k!r}" for k in before if k in after and before[k] != after[k]]
    return changes


# --------------------------------------------------------------------------- checks

STRICTER: tuple[type[SafeshardError], ...] = (
    errors.DuplicateKeyError,
    errors.TensorEntryError,
    errors.UnknownDtypeError,
)
"""What the header reader refuses on purpose although the official reader accepts it
(see ``safeshard.header``'s docstring): repeated keys, array entries, object dtypes."""

COMMAND_TIMEOUT = float(os.environ.get("SAFESHARD_FUZZ_COMMAND_TIMEOUT", "60"))

STATS: Counter[str] = Counter()
"""``"command: outcome"`` -> count, over every case run."""


class Finding(AssertionError):
    """What a case got wrong."""


@dataclass
class Outcome:
    command: str
    result: Any = None
    error: BaseException | None = None

    @property
    def label(self) -> str:
        if self.error is None:
            return "findings" if getattr(self.result, "ok", True) is False else "ok"
        return type(self.error).__name__


def _is_json(obj: Any) -> None:
    json.dumps(obj)


def _located_tensors(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], list[Any]]:
    ref, why = reference(path)
    if ref is None:
        raise Finding(f"the output at {path} is not a valid checkpoint: {why}")
    return ref.tensors, ref.metadata


class Runner:
    """Runs one built case through every command and checks each outcome."""

    def __init__(self, b: Built, case: Case) -> None:
        self.b = b
        self.case = case
        self.problems: list[str] = []
        self.guard = ReadGuard()
        self.skip = [b.out, b.merged]
        self.before = snapshot(b.root, self.skip)
        self.ref, self.why = reference(b.input)
        self.outcomes: dict[str, Outcome] = {}

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def run(self, command: str, fn: Callable[[], Any]) -> Outcome:
        outcome = Outcome(command)
        watch = WriteWatch(self.skip)
        with self.guard, watch, time_limit(COMMAND_TIMEOUT, command):
            try:
                outcome.result = fn()
            except SafeshardError as e:
                outcome.error = e
            except Finding:
                raise
            except Hang as e:
                outcome.error = e
                self.problem(f"{command}: {e}")
            except Exception as e:
                outcome.error = e
                frames = traceback.extract_tb(e.__traceback__)
                ours = [f for f in frames if f"{os.sep}safeshard{os.sep}" in f.filename]
                where = "".join(traceback.format_list([*ours[-2:], frames[-1]]))
                self.problem(
                    f"{command}: raised {type(e).__name__} (not a SafeshardError): {e!r}\n{where}"
                )
        for v in watch.violations:
            self.problem(f"{command}: wrote outside OUT_DIR and the merge folder: {v}")
        after = snapshot(self.b.root, self.skip)
        for change in snapshot_diff(self.before, after):
            self.problem(f"{command}: wrote outside OUT_DIR and the merge folder: {change}")
        self.before = after
        for v in self.guard.violations:
            self.problem(f"{command}: read past the end of a file: {v}")
        self.guard.violations.clear()
        STATS[f"{command}: {outcome.label}"] += 1
        self.outcomes[command] = outcome
        return outcome

    def check(self, command: str, fn: Callable[..., None], *args: Any) -> None:
        """Run a result check; a crash in it is a finding too."""
        try:
            fn(*args)
        except Exception as e:
            self.problem(f"{command}: checking its result raised {type(e).__name__}: {e!r}")

    def expect(self, o: Outcome, allowed_refusals: tuple[type[BaseException], ...] = ()) -> bool:
        """Check success against the truth; True when the result should be checked."""
        if o.error is None:
            if self.ref is None:
                self.problem(f"{o.command}: succeeded on an invalid checkpoint ({self.why})")
                return False
            return True
        allowed = (*self.ref.stricter, *allowed_refusals) if self.ref is not None else ()
        if self.ref is not None and not isinstance(o.error, (Hang, *allowed)):
            self.problem(
                f"{o.command}: refused a checkpoint the official reader accepts: "
                f"{type(o.error).__name__}: {o.error}"
            )
        return False

    def all(self) -> None:
        b, ref = self.b, self.ref
        # inspect
        o = self.run("inspect", lambda: safeshard.inspect(b.input))
        if self.expect(o):
            self.check("inspect", self.check_inspect, o.result)
        # verify
        o = self.run("verify", lambda: safeshard.verify(b.input, workers=self.case.workers))
        if o.error is None:
            self.check("verify", _is_json, o.result.to_json())
            if o.result.ok and ref is None:
                self.problem(f"verify: reported ok on an invalid checkpoint ({self.why})")
        elif ref is not None:
            self.problem(
                f"verify: raised {type(o.error).__name__} on a valid checkpoint: {o.error}"
            )
        src_codes = {f.code for f in o.result.findings} if o.error is None else set()
        # split
        o = self.run(
            "split",
            lambda: safeshard.split(
                b.input,
                b.out,
                force=self.case.force,
                sha256=self.case.workers > 1,
                name=self.case.name,
            ),
        )
        allowed: tuple[type[BaseException], ...] = ()
        if b.planted_out:
            allowed += (errors.OutputExistsError, errors.StorageError)
        if self.case.name in BAD_SPLIT_NAMES:
            allowed += (errors.UsageError,)
        if self.expect(o, allowed):
            self.check("split", self.check_split, o.result, src_codes)
        elif o.error is not None and not isinstance(o.error, errors.StorageError):
            self.check_nothing_written_out()  # a failed write may leave a resumable run
        # merge
        o = self.run(
            "merge",
            lambda: safeshard.merge(b.input, b.merge_target, force=self.case.force),
        )
        allowed = ()
        if b.manifest is not None:
            allowed += (errors.ShardMismatchError,)  # a manifest's digest the shard lacks
        if b.planted_merge:
            allowed += (errors.OutputExistsError, errors.StorageError)
        if self.expect(o, allowed):
            self.check("merge", self.check_merge, o.result)
        elif o.error is not None and not b.planted_merge and os.path.lexists(b.merge_target):
            self.problem(f"merge failed ({o.label}) but left {b.merge_target.name} behind")
        # diff
        o = self.run(
            "diff", lambda: safeshard.diff(b.input, b.pristine_input, workers=self.case.workers)
        )
        if self.expect(o):
            self.check("diff", self.check_diff, o.result)
        # open, and load
        o = self.run("open", self.read_all)
        if self.expect(o):
            self.check("open", self.check_read, "open", o.result)
        o = self.run("load", self.load_all)
        if self.expect(o):
            self.check("load", self.check_read, "load", o.result)

    # ------------------------------------------------------------------ result checks

    def check_inspect(self, report: Any) -> None:
        assert self.ref is not None
        _is_json(report.to_json())
        if report.tensor_count != len(self.ref.tensors):
            self.problem(
                f"inspect: {report.tensor_count} tensors, expected {len(self.ref.tensors)}"
            )

    def check_split(self, result: Any, src_codes: set[str]) -> None:
        assert self.ref is not None
        _is_json(result.to_json())
        report = safeshard.verify(self.b.out)
        inherited = {c for c in src_codes if c.startswith("gptq-")}
        new = [f for f in report.findings if f.code not in inherited]
        if new:
            self.problem(f"split: its output does not verify: {[f.to_json() for f in new]}")
        against = safeshard.verify(self.b.out, against=self.b.input)
        new = [f for f in against.findings if f.code not in inherited]
        if new:
            self.problem(f"split: verify --against the source: {[f.to_json() for f in new]}")
        tensors, metas = _located_tensors(self.b.out)
        if tensors != self.ref.tensors:
            self.problem("split: the output's tensors differ from the source's")
        want = self.ref.common_metadata
        if any((m or None) != want for m in metas):
            self.problem(f"split: output metadata {metas!r}, expected {want!r} in every shard")

    def check_nothing_written_out(self) -> None:
        if not self.b.out.exists():
            return
        left = [
            p.name
            for p in self.b.out.iterdir()
            if p.name not in self.b.planted_out and p.name != ".safeshard.lock"
        ]
        if left:
            self.problem(f"split failed but left {left!r} in OUT_DIR")

    def check_merge(self, result: Any) -> None:
        assert self.ref is not None
        _is_json(result.to_json())
        tensors, meta = official(self.b.merge_target)
        if tensors != self.ref.tensors:
            self.problem("merge: the merged file's tensors differ from the source's")
        if (meta or None) != self.ref.common_metadata:
            self.problem(f"merge: metadata {meta!r}, expected {self.ref.common_metadata!r}")
        if result.size != self.b.merge_target.stat().st_size:
            self.problem(
                f"merge: reported {result.size} bytes, wrote {self.b.merge_target.stat().st_size}"
            )

    def check_diff(self, report: Any) -> None:
        assert self.ref is not None
        _is_json(report.to_json())
        other, why = reference(self.b.pristine_input)
        if other is None:
            self.problem(f"diff: the unmutated checkpoint is invalid ({why})")
            return
        a, c = self.ref.tensors, other.tensors
        if sorted(report.removed) != sorted(set(a) - set(c)):
            self.problem(f"diff: removed {report.removed!r}, expected {sorted(set(a) - set(c))!r}")
        if sorted(report.added) != sorted(set(c) - set(a)):
            self.problem(f"diff: added {report.added!r}, expected {sorted(set(c) - set(a))!r}")
        changed = sorted(n for n in set(a) & set(c) if a[n] != c[n])
        if sorted(ch.name for ch in report.changed) != changed:
            self.problem(
                f"diff: changed {[ch.name for ch in report.changed]!r}, expected {changed!r}"
            )

    def read_all(self) -> dict[str, Any]:
        """Every tensor of the lazy checkpoint, by name or by a prefetching layer walk."""
        with safeshard.open(
            self.b.input, framework="numpy", unsupported="raw", workers=self.case.workers
        ) as ckpt:
            arrays: dict[str, Any] = {}
            if self.case.walk:
                for _, layer in ckpt.iter_layers():
                    arrays.update(layer)
            else:
                arrays = {name: ckpt[name] for name in ckpt}
            return _described(arrays, ckpt.info)

    def load_all(self) -> dict[str, Any]:
        arrays = safeshard.load(
            self.b.input, framework="numpy", unsupported="raw", workers=self.case.workers
        )
        with safeshard.open(self.b.input, framework="numpy", workers=1) as ckpt:
            return _described(arrays, ckpt.info)

    def check_read(self, command: str, got: dict[str, Any]) -> None:
        assert self.ref is not None
        if got != self.ref.tensors:
            self.problem(f"{command}: the tensors read differ from the official reader's")


def _described(arrays: Mapping[str, Any], info: Callable[[str], Any]) -> dict[str, Any]:
    """name -> (dtype, shape, bytes) of numpy arrays (a raw array keeps the header's shape)."""
    out: dict[str, Any] = {}
    for name, array in arrays.items():
        i = info(name)
        shape = tuple(array.shape) if i.dtype in NUMPY_DTYPES else i.shape
        out[name] = (i.dtype, shape, array.tobytes())
    return out


# --------------------------------------------------------------------------- running


def fuzz_tmp() -> str | None:
    """Where cases are written: $SAFESHARD_FUZZ_TMP, else /dev/shm (no disk flushes for
    each fsync), else the system temp folder."""
    env = os.environ.get("SAFESHARD_FUZZ_TMP")
    if env:
        return env
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def run_case(case: Case) -> dict[str, str]:
    """Build ``case`` in a fresh folder, run every command, check every outcome; raise
    :class:`Finding` listing what went wrong. Returns each command's outcome."""
    root = Path(tempfile.mkdtemp(prefix="safeshard-fuzz-", dir=fuzz_tmp()))
    STATS["cases"] += 1
    try:
        b = build(case, root)
        runner = Runner(b, case)
        runner.all()
        if runner.problems:
            STATS["failing"] += 1
            raise Finding("\n".join(runner.problems))
        return {k: o.label for k, o in runner.outcomes.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def summary(stats: Mapping[str, int] | None = None) -> str:
    """The counts: cases tried (and failing, shrinking's replays included), then each
    command's outcomes, one line per command."""
    stats = STATS if stats is None else stats
    lines = [f"cases: {stats.get('cases', 0)} tried, {stats.get('failing', 0)} failing"]
    by_command: dict[str, list[tuple[str, int]]] = {}
    for key, n in stats.items():
        if ": " in key:
            command, outcome = key.split(": ", 1)
            by_command.setdefault(command, []).append((outcome, n))
    for command in ("inspect", "verify", "split", "merge", "diff", "open", "load"):
        items = sorted(by_command.get(command, []), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"  {command:8} " + ", ".join(f"{o} {n}" for o, n in items))
    return "\n".join(lines)


__all__ = [
    "STATS",
    "Base",
    "Case",
    "Finding",
    "Obj",
    "Raw",
    "Tensor",
    "cases",
    "run_case",
    "summary",
]


# --------------------------------------------------------------------------- credential URLs

SECRETS = ("u5er-SECRET-a1", "pw-SECRET-b2", "sig-SECRET-c3", "cred-SECRET-d4", "tok-SECRET-e5")
"""Strings that must never appear in any output, file or exception text."""

URL_FORMS = (
    "userinfo",  # http://USER:PW@host/path
    "userinfo_pct",  # the password percent-encoded in the URL (its decoded form is secret too)
    "presigned",  # ?X-Amz-Signature=...&X-Amz-Credential=...&X-Amz-Security-Token=...
    "query_token",  # ?sig=...&token=...
)

_UNSERVABLE = {"plant", "linkshard"}
"""Mutations that plant FIFOs and links: a plain HTTP server would block on them."""
_UNSERVABLE_KINDS = {
    "fifo",
    "dir",
    "link_outside",
    "link_dir",
    "link_dangling",
    "link_loop",
    "link_dot",
}


def servable(case: Case) -> bool:
    """Whether ``case`` can be served by a plain static HTTP server (no FIFOs, no links)."""
    for m in case.muts:
        if m[0] in _UNSERVABLE:
            return False
        if m[0] == "index" and any(k in _UNSERVABLE_KINDS for k in m[1] if isinstance(k, str)):
            return False
    return True


def credential_url(server: str, rel: str, form: str) -> str:
    """The URL of ``rel`` on ``server`` (``http://127.0.0.1:PORT``) with credentials of
    ``form`` in it."""
    path = urllib.parse.quote(os.fsencode(rel))
    host = server.partition("://")[2]
    user, pw, sig, cred, tok = SECRETS
    if form == "userinfo":
        return f"http://{user}:{pw}@{host}/{path}"
    if form == "userinfo_pct":
        return f"http://{user}:{urllib.parse.quote(pw, safe='')}%21@{host}/{path}"
    if form == "presigned":
        return (
            f"http://{host}/{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={cred}"
            f"&X-Amz-Signature={sig}&X-Amz-Security-Token={tok}"
        )
    return f"http://{host}/{path}?sig={sig}&token={tok}&se=2030-01-01"


def leaked(text: str | bytes) -> list[str]:
    """Which of :data:`SECRETS` (as written or percent-encoded) appear in ``text``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return [s for s in SECRETS if s in text or urllib.parse.quote(s, safe="") in text]


def _exception_text(e: BaseException) -> str:
    return "".join(traceback.format_exception(e)) + repr(e) + str(e)


def run_url_case(case: Case, root: Path, server: str, form: str) -> dict[str, int]:
    """Build ``case`` under ``root`` (served at ``server``), run every command on a URL
    with credentials of ``form``, and check that no secret appears in stdout, stderr,
    any file written, or any exception's text, and that no command exits 70 (a bug).
    Returns each command's exit code."""
    from click.testing import CliRunner

    from safeshard.cli import main

    folder = Path(tempfile.mkdtemp(prefix="url-", dir=root))
    problems: list[str] = []
    codes: dict[str, int] = {}
    try:
        b = build(case, folder)
        target = b.input
        if target.is_dir():  # a static server lists no folder fsspec can read: name the file
            target = target / (b.index or (b.weights[0] if b.weights else "model.safetensors"))
        url = credential_url(server, str(target.relative_to(root)), form)
        out, merged = folder / "o", folder / "m.safetensors"
        commands = {
            "inspect": ["inspect", url],
            "inspect --json": ["inspect", "--json", url],
            "verify --json": ["verify", "--json", url],
            "split": ["split", url, str(out), "--max-shard-size", "1MB", "--force"],
            "merge": ["merge", url, str(merged), "--force"],
            "diff": ["diff", url, str(b.pristine_input)],
        }
        runner = CliRunner()
        for name, args in commands.items():
            with time_limit(COMMAND_TIMEOUT, name):
                r = runner.invoke(main, args)
            codes[name] = r.exit_code
            STATS[f"url {name}: exit {r.exit_code}"] += 1
            text = r.stdout + r.stderr
            if r.exception is not None and not isinstance(r.exception, SystemExit):
                text += _exception_text(r.exception)
            for s in leaked(text):
                problems.append(f"{name}: the secret {s!r} in its output:\n{text[-2000:]}")
            if r.exit_code == 70:
                problems.append(f"{name}: exit 70 (a bug) on {form}:\n{text[-2000:]}")
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                for s in leaked(p.read_bytes()):
                    problems.append(f"{p}: a file written holds the secret {s!r}")
        for name, fn in (
            ("inspect()", lambda: safeshard.inspect(url)),
            ("load()", lambda: safeshard.load(url, framework="numpy")),
        ):
            try:
                with time_limit(COMMAND_TIMEOUT, name):
                    fn()
            except SafeshardError as e:
                for s in leaked(_exception_text(e)):
                    problems.append(f"{name}: the secret {s!r} in {type(e).__name__}: {e!r}")
            except Exception as e:
                problems.append(f"{name}: raised {type(e).__name__} (not a SafeshardError): {e!r}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if problems:
        raise Finding("\n".join(problems))
    return codes
