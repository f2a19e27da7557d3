"""The record of a tensor-parallel split (``tp.json``), and the byte ranges that merge it.

``split --tp N`` (:mod:`safeshard.ops.tpsplit`) writes ``OUT/rank-0000r-of-0000N/``, one
ordinary checkpoint per rank, and ``OUT/tp.json`` last: the plan, the world size, the
merged file's header (what a plain ``merge`` of the source writes) and, per tensor, its
dtype, full shape, style and each rank's slice (``dim`` and row ``intervals``).

:func:`read_tp` finds that record in a folder; :func:`merged_extents` says where each
byte of every full tensor lies in the ranks' files: along the split dim, each outer row
(the product of the dims before ``dim``) is rebuilt from segments of the ranks' rows,
each segment taken from the first rank that holds it (with grouped-query attention a
key/value head is on several ranks); a replicated tensor comes from rank 0. No tensor is
ever loaded: merge copies those extents with the one copier.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeshard.checkpoint import Checkpoint, open_checkpoint, read_json_file
from safeshard.errors import HeaderError, IndexFormatError, ShardMismatchError
from safeshard.format.filenames import TP_RECORD_NAME, rank_folder_name
from safeshard.format.header import DTYPE_BITS, Header, TensorInfo, parse_header, tensor_nbytes
from safeshard.io.bytesrc import Extent, Sources
from safeshard.io.store import as_path
from safeshard.ops.writer import open_sources
from safeshard.redact import redact_url

__all__ = [
    "TP_FORMAT",
    "TpCheckpoint",
    "TpRecord",
    "TpTensor",
    "merged_extents",
    "rank_mismatches",
    "read_tp",
    "tp_folder",
]

TP_FORMAT = "safeshard-tp"
TP_VERSION = 1

Intervals = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TpTensor:
    """One tensor of the source and its slice on each rank (``dim`` None: replicated)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    style: str
    dim: int | None
    slices: tuple[Intervals, ...]
    """Per rank, the rows of ``dim`` it holds (empty when ``dim`` is None)."""

    def rank_shape(self, rank: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        s = list(self.shape)
        s[self.dim] = sum(b - a for a, b in self.slices[rank])
        return tuple(s)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "style": self.style,
            "dim": self.dim,
            "slices": None if self.dim is None else [[list(iv) for iv in s] for s in self.slices],
        }


@dataclass(frozen=True)
class TpRecord:
    """``tp.json``: see the module docs."""

    world_size: int
    base: str
    plan: dict[str, str]
    tensors: dict[str, TpTensor]
    """In the merged file's data order."""
    merged_header: str
    """The merged file's header JSON, exactly as a plain merge of the source writes it."""
    lossless: bool
    reason: str
    digests: dict[str, str] | None
    """XXH3-128 of full tensors from the source's manifest (None: the source had none)."""
    heads: dict[str, int] | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes of the full tensors."""
        return sum(tensor_nbytes(t.dtype, t.shape) for t in self.tensors.values())

    @property
    def ranks(self) -> list[str]:
        return [rank_folder_name(r, self.world_size) for r in range(self.world_size)]

    def to_json(self) -> bytes:
        obj = {
            "format": TP_FORMAT,
            "version": TP_VERSION,
            "world_size": self.world_size,
            "ranks": self.ranks,
            "base": self.base,
            "tp_plan": self.plan,
            "heads": self.heads,
            "merged": {
                "header": self.merged_header,
                "lossless": self.lossless,
                "reason": self.reason,
            },
            "digests": self.digests,
        }
        head = json.dumps(obj, indent=1, ensure_ascii=False)[:-2]
        rows = ",\n".join(
            f"  {json.dumps(n, ensure_ascii=False)}: {json.dumps(t.to_json())}"
            for n, t in self.tensors.items()
        )
        return f'{head},\n "tensors": {{\n{rows}\n }}\n}}\n'.encode()

    @classmethod
    def parse(cls, obj: Mapping[str, Any], where: str) -> TpRecord:
        """The record in ``obj`` (read from ``where``); :class:`IndexFormatError` if it
        is not one safeshard wrote."""
        try:
            return cls._parse(obj, where)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, IndexFormatError):
                raise
            raise IndexFormatError(
                f"{where}: not a valid tensor-parallel record ({type(e).__name__}: {e})"
            ) from None

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], where: str) -> TpRecord:
        if obj.get("format") != TP_FORMAT or obj.get("version") != TP_VERSION:
            raise IndexFormatError(
                f"{where}: not a {TP_FORMAT} record of version {TP_VERSION} "
                f"(format {obj.get('format')!r}, version {obj.get('version')!r})"
            )
        ws = obj["world_size"]
        if isinstance(ws, bool) or not isinstance(ws, int) or ws < 1:
            raise ValueError(f"world_size {ws!r}")
        if obj.get("ranks") != [rank_folder_name(r, ws) for r in range(ws)]:
            raise ValueError("the rank folders are not rank-0000r-of-0000N for r < world_size")
        tensors: dict[str, TpTensor] = {}
        for name, t in dict(obj["tensors"]).items():
            shape = tuple(int(d) for d in t["shape"])
            dim = t["dim"]
            slices: tuple[Intervals, ...] = ()
            if dim is not None:
                if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < len(shape):
                    raise ValueError(f"tensor {name!r}: dim {dim!r}")
                raw = t["slices"]
                if len(raw) != ws:
                    raise ValueError(f"tensor {name!r}: {len(raw)} slices for {ws} ranks")
                slices = tuple(tuple((int(a), int(b)) for a, b in s) for s in raw)
                for s in slices:
                    for a, b in s:
                        if not 0 <= a <= b <= shape[dim]:
                            raise ValueError(f"tensor {name!r}: interval {a}..{b}")
            dtype = str(t["dtype"])
            if dtype not in DTYPE_BITS or (dim is not None and DTYPE_BITS[dtype] % 8):
                raise ValueError(f"tensor {name!r}: dtype {dtype!r}")
            tensors[str(name)] = TpTensor(str(name), dtype, shape, str(t["style"]), dim, slices)
        merged = obj["merged"]
        heads = obj.get("heads")
        return cls(
            world_size=ws,
            base=str(obj["base"]),
            plan={str(k): str(v) for k, v in dict(obj["tp_plan"]).items()},
            tensors=tensors,
            merged_header=str(merged["header"]),
            lossless=bool(merged["lossless"]),
            reason=str(merged["reason"]),
            digests=None
            if obj.get("digests") is None
            else {str(k): str(v) for k, v in dict(obj["digests"]).items()},
            heads=None if heads is None else {str(k): int(v) for k, v in dict(heads).items()},
        )

    def merged(self, where: str) -> tuple[bytes, Header]:
        """The merged file's header bytes (length prefix included), checked against the
        tensors; the tensors' data order is the header's."""
        raw = self.merged_header.encode("utf-8")
        framed = struct.pack("<Q", len(raw)) + raw
        size = len(framed) + sum(tensor_nbytes(t.dtype, t.shape) for t in self.tensors.values())
        try:
            header = parse_header(framed, size, where)
        except HeaderError as e:
            raise IndexFormatError(f"{where}: the merged header is invalid ({e})") from None
        got = {t.name: (t.dtype, t.shape) for t in header.tensors}
        want = {n: (t.dtype, t.shape) for n, t in self.tensors.items()}
        if got != want:
            raise IndexFormatError(f"{where}: the merged header does not describe the tensors")
        return framed, header


@dataclass
class TpCheckpoint:
    """A tensor-parallel split: its folder, record and each rank's checkpoint."""

    folder: Path
    record: TpRecord
    ranks: list[Checkpoint]

    @property
    def where(self) -> str:
        return redact_url(self.folder / TP_RECORD_NAME)

    @property
    def paths(self) -> list[Any]:
        return [p for c in self.ranks for p in c.located.paths]


def tp_folder(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None) -> Any:
    """``path`` as a folder if it is the output of ``split --tp`` (a ``tp.json`` and no
    weight file or index of its own), else None."""
    folder = as_path(path, storage_options)
    try:
        if not folder.is_dir() or not (folder / TP_RECORD_NAME).is_file():
            return None
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return None
    return None if any(".safetensors" in n for n in names) else folder


def read_tp(src: Any, storage_options: Mapping[str, Any] | None = None) -> TpCheckpoint | None:
    """The tensor-parallel split in the folder ``src``, or None when ``src`` holds no
    ``tp.json``; :class:`IndexFormatError` when it is not a record safeshard wrote. Each
    rank folder is opened and checked against the record."""
    folder = as_path(src, storage_options)
    obj = read_json_file(folder / TP_RECORD_NAME)
    where = redact_url(folder / TP_RECORD_NAME)
    if obj is None:
        if (folder / TP_RECORD_NAME).is_file():
            raise IndexFormatError(
                f"{where}: not a readable JSON object, so the rank folders beside it cannot "
                "be put together; rerun split --tp with --force"
            )
        return None
    rec = TpRecord.parse(obj, where)
    ranks = [open_checkpoint(folder / name, storage_options=storage_options) for name in rec.ranks]
    for r, ck in enumerate(ranks):
        bad = rank_mismatches(rec, r, {n: e.info for n, e in ck.entries.items()}, where)
        if bad:
            tensor, why = bad[0]
            raise ShardMismatchError(
                f"{redact_url(folder / rec.ranks[r])}: tensor {tensor!r} {why}"
            )
    return TpCheckpoint(folder, rec, ranks)


def rank_mismatches(
    rec: TpRecord, rank: int, tensors: Mapping[str, TensorInfo], where: str
) -> list[tuple[str, str]]:
    """``(tensor, what is wrong)`` wherever the tensors of rank ``rank``'s checkpoint
    (``tensors``, by name) are not the slices ``rec`` (read from ``where``) gives that
    rank: a tensor missing or extra, or another dtype or shape."""
    out = [
        (t, f"has a slice on rank {rank} in {where}; the rank folder has no such tensor")
        for t in sorted(set(rec.tensors) - set(tensors))
    ]
    out += [(t, f"is not in {where}") for t in sorted(set(tensors) - set(rec.tensors))]
    for name, t in rec.tensors.items():
        info = tensors.get(name)
        if info is not None and (info.dtype, info.shape) != (t.dtype, t.rank_shape(rank)):
            out.append(
                (
                    name,
                    f"is {info.dtype} {list(info.shape)}, not the {t.dtype} "
                    f"{list(t.rank_shape(rank))} {where} records for rank {rank}",
                )
            )
    return out


@contextmanager
def rank_sources(tp: TpCheckpoint) -> Iterator[list[Sources]]:
    """Every rank's shards as byte sources, open for the duration."""
    with ExitStack() as stack:
        yield [stack.enter_context(open_sources(c)) for c in tp.ranks]


def cover(t: TpTensor) -> list[tuple[int, int, int, int]]:
    """``(start, stop, rank, local start)``: the rows ``[0, shape[dim])`` of ``t`` in
    order, each segment from the first rank that holds it, at row ``local start`` of
    that rank's slice; :class:`ShardMismatchError` if a row is on no rank."""
    if t.dim is None:
        raise ValueError(f"tensor {t.name!r} is not split")
    n = t.shape[t.dim]
    held: list[tuple[int, int, int, int]] = []  # (a, b, rank, local a)
    for r, s in enumerate(t.slices):
        local = 0
        for a, b in s:
            if b > a:
                held.append((a, b, r, local))
            local += b - a
    cuts = sorted({0, n, *(a for a, _, _, _ in held), *(b for _, b, _, _ in held)})
    out: list[tuple[int, int, int, int]] = []
    for x, y in itertools.pairwise(cuts):
        if y <= x:
            continue
        found = min(((r, la + x - a) for a, b, r, la in held if a <= x and y <= b), default=None)
        if found is None:
            raise ShardMismatchError(
                f"tensor {t.name!r}: rows {x}..{y - 1} of dim {t.dim} are on no rank"
            )
        r, local = found
        if out and out[-1][2] == r and out[-1][1] == x and out[-1][3] + (x - out[-1][0]) == local:
            out[-1] = (out[-1][0], y, r, out[-1][3])
        else:
            out.append((x, y, r, local))
    return out


BATCH = 1 << 16
"""Extents held at once while merging (a batch ends with a whole tensor): a rowwise split
has one extent per row and rank, millions for a large model."""


def merged_extents(
    tp: TpCheckpoint, order: Sequence[str], sources: Sequence[Sources], *, batch: int | None = None
) -> Iterator[list[Extent]]:
    """Where the bytes of each full tensor in ``order`` lie in the ranks' files, in order,
    in batches of whole tensors of about ``batch`` extents (consecutive extents of one
    tensor carry its name: the copier digests them as one)."""
    rec = tp.record
    limit = BATCH if batch is None else batch
    opened: dict[tuple[int, int], tuple[Any, int]] = {}

    def place(r: int, name: str) -> tuple[Any, int, int]:
        """(source, absolute offset of the tensor's data, its bytes) on rank ``r``."""
        ck = tp.ranks[r]
        e = ck.entries[name]
        key = (r, e.shard)
        got = opened.get(key)
        if got is None:
            h = ck.headers[e.shard]
            got = opened[key] = (sources[r].get(h.path), h.data_start)
        return got[0], got[1] + e.info.begin, e.info.end - e.info.begin

    out: list[Extent] = []
    for name in order:
        if len(out) >= limit:
            yield out
            out = []
        t = rec.tensors[name]
        if t.dim is None or tensor_nbytes(t.dtype, t.shape) == 0:
            src, off, n = place(0, name)
            out.append(Extent(src, off, n, name))
            continue
        item = DTYPE_BITS[t.dtype] // 8
        inner = item
        for d in t.shape[t.dim + 1 :]:
            inner *= d
        outer = 1
        for d in t.shape[: t.dim]:
            outer *= d
        segs = cover(t)
        starts: dict[int, tuple[Any, int, int]] = {}
        for _, _, r, _ in segs:
            if r not in starts:
                src, off, _n = place(r, name)
                rows = sum(b - a for a, b in t.slices[r])
                starts[r] = (src, off, rows * inner)
        first = len(out)
        for o in range(outer):
            for x, y, r, local in segs:
                src, off, row = starts[r]
                at, n = off + o * row + local * inner, (y - x) * inner
                last = out[-1] if len(out) > first else None
                if last is not None and last.source is src and last.end == at:
                    out[-1] = Extent(src, last.offset, last.nbytes + n, name)
                else:
                    out.append(Extent(src, at, n, name))
    if out:
        yield out
