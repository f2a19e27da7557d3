"""Reading a rank's tensor-parallel slices: only their bytes, scattered into the tensors.

The slices come from :mod:`safeshard.tpplan`. Each slice's byte ranges are grouped into
reads by :func:`safeshard.tpplan.coalesce`; a read is one scatter read (``os.preadv`` for a
local file, parallel ranged GETs for an object in storage) whose buffers are the pieces
of the destination tensor and, for a gap read through, a scratch buffer whose bytes are
dropped. Reads are cut into jobs of at most :data:`safeshard.runtime.readers.CHUNK_BYTES` and run on
the same thread pool as :func:`safeshard.load`.

A strided slice (a split along a later dim: one range per outer row) of a *local* shard is
instead copied out of the shard mapped into memory, one strided copy per interval of the
split dim (:class:`_Maps`): a read call per row cost more CPU than the disk took (a rank of
a 2.2 GB Llama: 1.6 s warm with a call per row, 0.36 s with the copies). Only the slice's
bytes are copied.

What the disk moves is whole pages: local shards are read with the kernel's readahead off
(``POSIX_FADV_RANDOM``), so a read fetches its own pages and not the 8 MiB after each
slice's end, and the pages between the first and last byte of a strided slice are asked for
in one go (``POSIX_FADV_WILLNEED``, see :func:`_prefetch`) just before the slice is copied, so
they come at sequential speed. On a 2.2 GB Llama at world size 4 a rank's disk reads went
from 1.44 GB to 1.07 GB (docs/tensor-parallel.md).
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safeshard.checkpoint import Checkpoint, open_checkpoint
from safeshard.format.header import DTYPE_BITS, TensorInfo
from safeshard.gcpause import paused
from safeshard.io.bytesrc import Extent, read_exact
from safeshard.io.store import translate_errors
from safeshard.runtime.readers import (
    CHUNK_BYTES,
    Backend,
    ShardFiles,
    backend_for,
    check_dtype,
    check_workers,
    run_all,
)
from safeshard.tpplan import (
    LOCAL_GAP,
    OVERREAD,
    REMOTE_GAP,
    RankPlan,
    ReadStats,
    TensorSlice,
    byte_ranges,
    coalesce,
    row_extent,
)

__all__ = ["load_rank", "rank_plan", "read_slices"]


@dataclass
class _Job:
    source: Any
    offset: int
    length: int = 0
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    """``(tensor index or -1 for a gap, start in that tensor's slice, length)``."""


def rank_plan(
    ckpt: Checkpoint,
    tp_plan: Mapping[str, str] | str,
    rank: int | None,
    world_size: int | None,
    tp_config: Mapping[str, Any] | None = None,
) -> RankPlan:
    """``tp_plan`` resolved for ``ckpt`` and one rank (see :meth:`RankPlan.build`)."""
    where = str(ckpt.index.path) if ckpt.index is not None else ckpt.headers[0].path
    return RankPlan.build(
        tp_plan,
        rank,
        world_size,
        folder=ckpt.folder,
        tensors={n: e.info for n, e in ckpt.entries.items()},
        metadata=ckpt.metadata,
        tp_config=tp_config,
        where=where,
    )


def read_slices(
    files: ShardFiles,
    backend: Backend,
    plan: RankPlan,
    infos: Sequence[TensorInfo],
    *,
    workers: int,
    pool: Any = None,
    unsupported: str = "error",
    stats: ReadStats | None = None,
    overread: float = OVERREAD,
) -> dict[str, Any]:
    """Read the rank's slice of each of ``infos``; returns name -> tensor of the slice's
    shape. ``stats`` (if given) counts the bytes read and the slices' bytes."""
    slices = [plan.slice_of(i) for i in infos]
    raw = [check_dtype(backend, i, files.ckpt.path_of(i.name), unsupported) for i in infos]
    bufs: list[Any] = []
    views: list[memoryview] = []
    reads_all: list[_Job] = []
    batches: list[list[_Job]] = []
    biggest_gap = 0
    maps = _Maps(backend)
    tasks: list[Callable[[], None]] = []
    no_readahead: set[int] = set()
    for k, (info, sl) in enumerate(zip(infos, slices, strict=True)):
        buf, view = backend.empty(sl.nbytes)
        bufs.append(buf)
        views.append(view)
        span = files.span(info)
        fd = span.source.fileno()
        gap = LOCAL_GAP if fd is not None else REMOTE_GAP
        if fd is not None and fd not in no_readahead:
            no_readahead.add(fd)
            _advise(fd, 0, 0, "POSIX_FADV_RANDOM")
        extent = row_extent(sl) if fd is not None and maps.usable else None
        if fd is not None and extent is not None:
            # strided rows of a local file: one strided copy out of the mapped pages
            # (a read call per row cost more CPU than the disk took)
            if stats is not None:
                stats.note(info.name, sl.nbytes, sl.nbytes, 1)
            first, last = span.offset + extent[0], span.offset + extent[1]
            maps.expect(fd)
            tasks.append(
                functools.partial(_prefetch_then, first, last, maps.copy_out, fd, span, sl, view)
            )
            continue
        ranges = byte_ranges(sl)
        reads = coalesce(ranges, gap=gap, overread=overread)
        if stats is not None:
            stats.note(info.name, sum(r[1] for r in reads), sl.nbytes, len(reads))
        first_read = len(reads_all)
        dest = 0
        for off, _length, pieces in reads:
            pos = off
            segs: list[tuple[int, int, int]] = []
            for p_off, p_len in pieces:
                if p_off > pos:
                    segs.append((-1, 0, p_off - pos))
                    biggest_gap = max(biggest_gap, p_off - pos)
                segs.append((k, dest, p_len))
                dest += p_len
                pos = p_off + p_len
            _cut(reads_all, span.source, span.offset + off, segs)
        # one job per CHUNK_BYTES of the tensor's reads, run in file order by one thread
        # (the kernel's readahead sees the strided rows go forward)
        batch: list[_Job] = []
        size = 0
        for rd in reads_all[first_read:]:
            if batch and size + rd.length > CHUNK_BYTES:
                batches.append(batch)
                batch, size = [], 0
            batch.append(rd)
            size += rd.length
        if batch:
            batches.append(batch)
    junk = memoryview(bytearray(biggest_gap)) if biggest_gap else memoryview(b"")

    def run(batch: list[_Job]) -> None:
        for job in batch:
            buffers = [
                junk[:n] if k < 0 else views[k][start : start + n] for k, start, n in job.segments
            ]
            first = next((k for k, _, _ in job.segments if k >= 0), 0)
            read_exact(job.source, buffers, job.offset, f"tensor {infos[first].name!r}")

    tasks += [functools.partial(run, b) for b in batches]
    try:
        run_all(lambda task: task(), tasks, workers, pool)
    finally:
        tasks.clear()
        maps.close()
    out: dict[str, Any] = {}
    for info, sl, buf, r in zip(infos, slices, bufs, raw, strict=True):
        shaped = TensorInfo(info.name, info.dtype, sl.shape, 0, sl.nbytes)
        out[info.name] = backend.finish(buf, shaped, r)
    return out


class _Maps:
    """Local shards mapped read-only (copy-on-write, never written) for strided copies,
    through the backend's own array type (torch or numpy)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.usable = backend.name in ("torch", "numpy")
        self._maps: dict[int, mmap.mmap] = {}
        self._pending: dict[int, int] = {}
        self._lock = threading.Lock()

    def expect(self, fd: int) -> None:
        """Count one more copy out of ``fd``'s mapping: the copy that brings the count
        back to zero unmaps it (see :meth:`copy_out`)."""
        self._pending[fd] = self._pending.get(fd, 0) + 1

    def _map(self, fd: int) -> mmap.mmap:
        with self._lock:
            mm = self._maps.get(fd)
            if mm is None:
                mm = self._maps[fd] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            return mm

    def _array(self, buffer: Any, offset: int, count: int) -> Any:
        if self.backend.name == "torch":
            torch = self.backend.torch  # type: ignore[attr-defined]
            return torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=offset)
        np = self.backend.np  # type: ignore[attr-defined]
        return np.frombuffer(buffer, dtype=np.uint8, count=count, offset=offset)

    def copy_out(self, fd: int, span: Extent, sl: TensorSlice, dest: memoryview) -> None:
        """Copy the slice ``sl`` of the tensor at ``span`` (in the file ``fd``) into
        ``dest``: each interval of dim ``sl.dim`` as one strided copy of every outer row."""
        src = self._array(self._map(fd), span.offset, span.nbytes)
        dst = self._array(dest, 0, dest.nbytes)
        dim = sl.dim if sl.dim is not None else 0
        inner = DTYPE_BITS[sl.dtype] // 8
        for d in sl.full_shape[dim + 1 :]:
            inner *= d
        outer = 1
        for d in sl.full_shape[:dim]:
            outer *= d
        rows = src.reshape(outer, sl.full_shape[dim] * inner)
        out = dst.reshape(outer, dest.nbytes // outer if outer else 0)
        pos = 0
        for a, b in sl.intervals:
            n = (b - a) * inner
            out[:, pos : pos + n] = rows[:, a * inner : b * inner]
            pos += n
        del src, rows  # no export of the mapping outlives the copy
        self._done(fd)

    def _done(self, fd: int) -> None:
        """One copy out of ``fd`` finished: unmap it after the last one, on this worker
        while the other reads go on (tearing down a mapped shard's page tables took
        25-35 ms per rank of a 2.2 GB Llama when left to the end)."""
        with self._lock:
            left = self._pending[fd] = self._pending.get(fd, 1) - 1
            mm = self._maps.pop(fd, None) if left <= 0 else None
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for mm in maps.values():
            with contextlib.suppress(BufferError):
                mm.close()


PREFETCH_STEP = 4 * 1024 * 1024
"""Largest range of one ``POSIX_FADV_WILLNEED`` call. The kernel reads ahead at most
``max(read_ahead_kb, max_sectors_kb)`` per call and silently drops the rest (a 23 MB
``down_proj`` slice had only its first 8 MiB prefetched), so a span is asked for in steps."""


def _advise(fd: int, offset: int, length: int, advice: str) -> None:
    """``posix_fadvise``, where the platform has it; advice only, errors ignored."""
    advise, flag = getattr(os, "posix_fadvise", None), getattr(os, advice, None)
    if advise is None or flag is None:  # pragma: no cover - not Linux
        return
    with contextlib.suppress(OSError):
        advise(fd, offset, length, flag)


def _prefetch(fd: int, first: int, last: int) -> None:
    """Ask the kernel to read the bytes ``[first, last)`` of ``fd`` now, in steps of
    :data:`PREFETCH_STEP`. Used for the span of a strided slice: reading its pages through
    at sequential speed costs less than a small read per row, even where the slice
    touches only half of them (``down_proj`` at world size 4: 55-64%; reading only those
    took 1.0-1.2 s a rank against 0.7 s for the whole span)."""
    for at in range(first, last, PREFETCH_STEP):
        _advise(fd, at, min(PREFETCH_STEP, last - at), "POSIX_FADV_WILLNEED")


def _prefetch_then(
    first: int,
    last: int,
    copy: Callable[[int, Extent, TensorSlice, memoryview], None],
    fd: int,
    span: Extent,
    sl: TensorSlice,
    dest: memoryview,
) -> None:
    """Prefetch ``[first, last)`` of ``fd`` (the span of the strided slice ``sl``), then
    copy the slice out: one task, so the prefetches run on the workers, a few slices ahead
    of the copies, and the planning never waits on the disk."""
    _prefetch(fd, first, last)
    copy(fd, span, sl, dest)


def _cut(jobs: list[_Job], source: Any, offset: int, segs: Sequence[tuple[int, int, int]]) -> None:
    """Append jobs reading ``segs`` from ``offset`` on, each at most CHUNK_BYTES."""
    cur = _Job(source, offset)
    jobs.append(cur)
    for k, start, n in segs:
        done = 0
        while done < n:
            if cur.length >= CHUNK_BYTES:
                cur = _Job(source, cur.offset + cur.length)
                jobs.append(cur)
            take = min(n - done, CHUNK_BYTES - cur.length)
            cur.segments.append((k, start + done if k >= 0 else 0, take))
            cur.length += take
            done += take


@translate_errors
def load_rank(
    path: str | os.PathLike[str],
    *,
    tp_plan: Mapping[str, str] | str,
    rank: int | None = None,
    world_size: int | None = None,
    tp_config: Mapping[str, Any] | None = None,
    tp_stats: ReadStats | None = None,
    framework: str = "torch",
    workers: int | None = None,
    unsupported: str = "error",
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`safeshard.load` for one tensor-parallel rank (see :mod:`safeshard.tpplan`)."""
    nworkers = check_workers(workers)
    backend = backend_for(framework)
    ckpt = open_checkpoint(path, storage_options=storage_options)
    plan = rank_plan(ckpt, tp_plan, rank, world_size, tp_config)
    infos = [e.info for e in ckpt.entries.values()]
    with ShardFiles(ckpt) as files, paused():
        return read_slices(
            files, backend, plan, infos, workers=nworkers, unsupported=unsupported, stats=tp_stats
        )
