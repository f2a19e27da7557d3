"""Copy byte ranges into a file while digesting them, without slowing the copy.

One safetensors file is written as a header followed by *pieces*: byte ranges of open
source files, one tensor each. Consecutive pieces that are contiguous in one source
are joined into *runs* of at most :data:`COPY_CHUNK` bytes, so a file of many small
tensors costs a few system calls, not one per tensor. The calling thread moves each
run with :func:`safeshard.io.localfs.copy_range` (``copy_file_range`` where the kernel has it) and
hands it to the kernel's writeback at once (``sync_file_range``), so the disk writes
while the copy runs and the final fsync has little left to do.

Integrity at disk speed. One background thread follows the copier: it re-reads each
just-copied run from the *source* with ``os.preadv``, where it is still in the page
cache, into a reusable :data:`safeshard.io.localfs.CHUNK` buffer, and feeds each tensor's
bytes to its digest (:data:`manifest.TENSOR_DIGEST`, XXH3-128, about 11 GB/s on one core here). The
digest releases the GIL on large buffers, so hashing and the kernel copy run side by
side. With the header's digest (computed here too), every byte of the file is covered.

The whole-file SHA-256 (the Hugging Face Hub's LFS id) is about ten times slower, so it
is optional and never on the copier's path: :class:`Sha256Follower` hashes the file
being written from its own descriptor in a thread of its own, as the bytes land, and
may lag behind and finish after the copy, while the next file is written. A
:class:`Sha256Pool` bounds how many such threads run at once (one per core).

Memory stays bounded: the digest thread's queue holds at most :data:`MAX_LAG` runs, so
the copier waits for a digest thread that falls behind instead of letting the page
cache drop the bytes before they are read again.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import hashlib
import os
import queue
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from safeshard.errors import ReadError, read_error
from safeshard.format.manifest import Hasher, header_digest, tensor_digest, tensor_hasher
from safeshard.io.bytesrc import (
    ByteSource,
    Extent,
    LocalFile,
    Sink,
    header_of,
    read_exact,
    read_into,
)
from safeshard.io.localfs import CHUNK, advise_sequential, copy_range
from safeshard.io.ranges import coalesce

COPY_CHUNK = 64 * 1024 * 1024
"""Largest run copied (and handed to the digest thread) at once."""

BUFFERED_CHUNK = 8 * 1024 * 1024
"""Run size on the buffered path (object storage): one ranged GET each; up to
:func:`read_window` such buffers are in use."""

READBACK_CHUNK = 8 * BUFFERED_CHUNK
"""Read size when an object is read whole for its digests (:func:`digest_file`,
:func:`hash_source`): one call, which a remote source cuts into up to 8 ranged GETs in
flight at once (a read of one GET at a time would wait on each)."""

MAX_LAG = 4
"""Runs the digest thread may fall behind the copier (so at most 256 MiB of source)."""

EMPTY_DIGEST = tensor_digest(b"")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Hashes:
    """Digests of a written file: its header's, and each tensor's (hex, XXH3-128)."""

    header: str
    tensors: dict[str, str]


@dataclass
class _Run:
    """Consecutive pieces contiguous in one source: ``parts`` are ``(piece index, start
    inside the piece, length)`` in order."""

    source: ByteSource
    offset: int
    nbytes: int = 0
    parts: list[tuple[int, int, int]] = field(default_factory=list)


def plan_runs(pieces: Sequence[Extent], chunk: int | None = None) -> list[_Run]:
    """Join ``pieces`` (skipping empty ones) into runs of at most ``chunk`` bytes: contiguous
    pieces of one source, in order (:func:`safeshard.io.ranges.coalesce`)."""
    limit = COPY_CHUNK if chunk is None else chunk
    runs = coalesce(
        [(p.offset, p.nbytes) for p in pieces], max_run=limit, streams=[p.source for p in pieces]
    )
    return [_Run(pieces[r.parts[0][0]].source, r.offset, r.length, r.parts) for r in runs]


class _Digests:
    """Each piece's digest, fed the bytes of runs in order (a piece may span runs).

    Consecutive pieces with one name are one tensor in several extents (a tensor-parallel
    rank's slice, or a tensor rebuilt from ranks): their digest covers them all, in order.
    """

    def __init__(self, pieces: Sequence[Extent]) -> None:
        self.pieces = pieces
        self.digests: dict[str, str] = {}
        self._hasher: Hasher | None = None

    def _continues(self, index: int) -> bool:
        """Whether the tensor of piece ``index`` goes on in a later piece."""
        name = self.pieces[index].name
        j = index + 1
        while j < len(self.pieces) and self.pieces[j].name == name:
            if self.pieces[j].nbytes:
                return True
            j += 1
        return False

    def feed(self, cursor: _Cursor, view: memoryview) -> None:
        """Feed the next ``len(view)`` bytes of the run ``cursor`` walks."""
        at = 0
        while at < len(view):
            index, start, length = cursor.run.parts[cursor.k]
            n = min(cursor.left, len(view) - at)
            if self._hasher is None:
                self._hasher = tensor_hasher()
            self._hasher.update(view[at : at + n])
            at += n
            cursor.left -= n
            if cursor.left == 0:
                piece = self.pieces[index]
                if start + length == piece.nbytes and not self._continues(index):
                    self.digests[piece.name] = self._hasher.hexdigest()
                    self._hasher = None
                cursor.k += 1
                if cursor.k < len(cursor.run.parts):
                    cursor.left = cursor.run.parts[cursor.k][2]


class _Cursor:
    """Where the digests are inside one run: part ``k``, ``left`` bytes of it to go."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.k = 0
        self.left = run.parts[0][2]


class _DigestThread(threading.Thread):
    """Re-reads each queued run once (it was just copied, so it is in the page cache) and
    feeds each piece's bytes to its digest."""

    def __init__(self, digests: _Digests) -> None:
        super().__init__(daemon=True, name="safeshard-digest")
        self.digests = digests
        self.queue: queue.Queue[_Run | None] = queue.Queue(maxsize=MAX_LAG)
        self.error: BaseException | None = None
        self._cancel = threading.Event()

    def run(self) -> None:
        view = memoryview(bytearray(CHUNK))
        while True:
            run = self.queue.get()
            if run is None:
                return
            if self._cancel.is_set() or self.error is not None:
                continue  # drain so the copier never blocks on a dead thread
            try:
                cursor = _Cursor(run)
                pos = 0
                while pos < run.nbytes:
                    n = min(len(view), run.nbytes - pos)
                    what = f"tensor {self.digests.pieces[run.parts[cursor.k][0]].name!r}"
                    read_exact(run.source, [view[:n]], run.offset + pos, what)
                    self.digests.feed(cursor, view[:n])
                    pos += n
            except BaseException as e:  # reported by the copier
                self.error = e

    def stop(self) -> None:
        self._cancel.set()


def copy_pieces(
    sink: Sink,
    header: bytes,
    pieces: Sequence[Extent],
    *,
    progress: Progress | None = None,
    on_written: Callable[[int], None] | None = None,
    sha256: Hasher | None = None,
) -> Hashes:
    """Write ``header`` then every piece, in order, to ``sink`` (from offset 0).

    Returns the digest of the header and of each piece. ``on_written`` is called with the
    number of bytes of the file written so far (a :class:`Sha256Follower` follows it);
    ``sha256``, when given, is fed every byte written (for outputs a follower cannot
    read back). Where the sink and every source are local files, bytes move with
    ``copy_file_range`` and a thread re-reads them to digest them; otherwise each run is
    read once into a buffer, digested and written from it. Raises
    :class:`~safeshard.errors.ReadError` for a source that cannot be read, and the
    sink's ``OSError`` otherwise (``ENOSPC`` on a full disk).
    """
    digests = _Digests(pieces)
    runs = plan_runs(pieces)
    dst = sink.fileno()
    local = dst is not None and sha256 is None and all(r.source.fileno() is not None for r in runs)

    def wrote(n: int) -> None:
        if progress is not None:
            progress(n)
        if on_written is not None:
            on_written(sink.position)

    sink.write(header)
    if sha256 is not None:
        sha256.update(header)
    wrote(len(header))
    if local and dst is not None:
        _copy_local(runs, pieces, digests, sink, dst, wrote)
    else:
        _copy_buffered(plan_runs(pieces, BUFFERED_CHUNK), pieces, digests, sink, sha256, wrote)
    for p in pieces:
        if p.nbytes == 0 and p.name not in digests.digests:
            digests.digests[p.name] = EMPTY_DIGEST
    return Hashes(header=header_digest(header), tensors=digests.digests)


def _copy_buffered(
    runs: Sequence[_Run],
    pieces: Sequence[Extent],
    digests: _Digests,
    sink: Sink,
    sha256: Hasher | None,
    wrote: Callable[[int], None],
) -> None:
    """The buffered path (a source or the sink without a descriptor: object storage).

    Up to :func:`read_window` runs are read at once, each into a buffer of its own, by
    reader threads (so a remote source has that many ranged GETs in flight), while this
    thread takes the runs in order, digests each and writes it to the sink (whose part
    uploads run in parallel, out of order); memory stays at ``window`` runs of
    :data:`BUFFERED_CHUNK`, plus what the sink holds.
    """
    if not runs:
        return
    window = read_window(runs)
    size = max(r.nbytes for r in runs)
    free: list[memoryview] = [memoryview(bytearray(size)) for _ in range(min(window, len(runs)))]
    stop = threading.Event()

    def read(run: _Run, buf: memoryview) -> memoryview:
        if stop.is_set():
            raise ReadError("cancelled")
        data = buf[: run.nbytes]
        what = f"tensor {pieces[run.parts[0][0]].name!r}"
        read_exact(run.source, [data], run.offset, what)
        return data

    pending: collections.deque[tuple[_Run, memoryview, Future[memoryview]]] = collections.deque()
    todo = iter(runs)
    with ThreadPoolExecutor(len(free), thread_name_prefix="safeshard-read") as pool:
        try:
            while True:
                while free:
                    run = next(todo, None)
                    if run is None:
                        break
                    buf = free.pop()
                    pending.append((run, buf, pool.submit(read, run, buf)))
                if not pending:
                    break
                run, buf, fut = pending.popleft()
                data = fut.result()
                digests.feed(_Cursor(run), data)
                if sha256 is not None:
                    sha256.update(data)
                sink.write(data)
                free.append(buf)
                wrote(run.nbytes)
        finally:
            stop.set()
            for _, _, f in pending:
                f.cancel()


def read_window(runs: Sequence[_Run]) -> int:
    """How many runs :func:`_copy_buffered` reads at once: as many as the remote sources
    allow ranged GETs in flight (:class:`safeshard.io.remote.RemoteLimits`), else 2 (one
    read overlapping one write)."""
    window = 2
    seen: set[int] = set()
    for r in runs:
        if id(r.source) in seen:
            continue
        seen.add(id(r.source))
        limits = getattr(r.source, "limits", None)
        requests = getattr(limits, "requests", None)
        if isinstance(requests, int):
            window = max(window, requests)
    return window


def _copy_local(
    runs: Sequence[_Run],
    pieces: Sequence[Extent],
    digests: _Digests,
    sink: Sink,
    dst: int,
    wrote: Callable[[int], None],
) -> None:
    """The zero-copy path: the kernel copies each run; a thread re-reads it to digest it."""
    for fd in {r.source.fileno() for r in runs}:
        if fd is not None:
            advise_sequential(fd)  # cold sources: merge of a 13B model 1.43x -> 1.14x `cp`
    digester = _DigestThread(digests)
    digester.start()
    ok = False
    try:
        for run in runs:
            src = run.source.fileno()
            if src is None:  # the caller checked every source is local
                raise ReadError(f"{run.source.name}: not a local file; it cannot be copied")
            _copy_run(run, pieces, src, dst, sink)
            if digester.error is not None:
                raise digester.error
            digester.queue.put(run)
            wrote(run.nbytes)
        ok = True
    finally:
        if not ok:
            digester.stop()
        digester.queue.put(None)
        digester.join()
    if digester.error is not None:
        raise digester.error


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Errors of a copy that are the output's, not the source's."""


def _copy_run(run: _Run, pieces: Sequence[Extent], src: int, dst: int, sink: Sink) -> None:
    """Copy a run between local files in the kernel; start its writeback."""
    pos = sink.position
    try:
        copy_range(src, dst, run.offset, run.nbytes, pos)
    except ReadError:
        raise
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise
        p = pieces[run.parts[0][0]]
        raise read_error(p.source.name, f"copy tensor {p.name!r}", e) from e
    sink.wrote(run.nbytes)
    _start_writeback(dst, pos, run.nbytes)


# --------------------------------------------------------------------------- SHA-256


class Sha256Pool:
    """Bounds the SHA-256 threads running at once (default: one per core)."""

    def __init__(self, workers: int | None = None) -> None:
        self.slots = threading.BoundedSemaphore(max(1, workers or os.cpu_count() or 1))


class Sha256Follower:
    """SHA-256 of a file as it is written, in a thread of its own.

    It reads the file through a duplicate of the writer's descriptor (so it may finish
    after the file was closed and renamed), never past the bytes the writer reported
    with :meth:`advance`, and never makes the writer wait.
    """

    def __init__(self, fd: int, size: int, pool: Sha256Pool, *, name: str = "") -> None:
        self.size = size
        self.name = name
        self._src = LocalFile(os.dup(fd), name, size)
        self._pool = pool
        self._written = 0
        self._cond = threading.Condition()
        self._cancelled = False
        self.future: Future[str] = Future()
        self._thread = threading.Thread(target=self._run, daemon=True, name="safeshard-sha256")
        self._thread.start()

    def advance(self, written: int) -> None:
        with self._cond:
            self._written = written
            self._cond.notify()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify()

    def result(self) -> str:
        return self.future.result()

    def _run(self) -> None:
        try:
            with self._pool.slots:
                self.future.set_result(self._hash())
        except BaseException as e:
            self.future.set_exception(e)
        finally:
            self._src.close()

    def _hash(self) -> str:
        h = hashlib.sha256()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        pos = 0
        while pos < self.size:
            with self._cond:
                while self._written <= pos and not self._cancelled:
                    self._cond.wait()
                if self._cancelled:
                    raise ReadError(f"{self.name}: SHA-256 cancelled", filename=self.name)
                avail = self._written
            want = min(len(buf), avail - pos)
            read_exact(self._src, [view[:want]], pos, "the file for its SHA-256")
            h.update(view[:want])
            pos += want
        return h.hexdigest()


# --------------------------------------------------------------------------- writeback

SYNC_FILE_RANGE_WRITE = 2
"""``sync_file_range`` flag: start writeback of dirty pages in the range, do not wait."""


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a just-copied range to disk, without waiting.

    Linux only (through libc); elsewhere a no-op. A file system that refuses it is
    simply not asked (this call only): the final fsync writes everything anyway.
    ctypes releases the GIL for the call.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def digest_file(src: ByteSource, *, progress: Progress | None = None) -> Hashes:
    """The header digest and each tensor's digest of the safetensors file ``src``,
    reading it once (what :func:`copy_pieces` computes while writing it)."""
    h = header_of(src)
    header = header_digest(struct.pack("<Q", h.header_len) + h.raw)
    view = memoryview(bytearray(CHUNK))
    result: dict[str, str] = {}
    if src.fileno() is None:  # an object: few large ranged GETs, not one per tensor
        return Hashes(header=header, tensors=_digest_source(src, h, progress))
    for t in h.tensors:
        d = tensor_hasher()
        pos, end = h.data_start + t.begin, h.data_start + t.end
        while pos < end:
            n = min(len(view), end - pos)
            read_exact(src, [view[:n]], pos, f"tensor {t.name!r}")
            d.update(view[:n])
            pos += n
            if progress is not None:
                progress(n)
        result[t.name] = d.hexdigest()
    return Hashes(header=header, tensors=result)


def _digest_source(src: ByteSource, h: Any, progress: Progress | None) -> dict[str, str]:
    """Each tensor's digest, reading ``src`` in runs of :data:`BUFFERED_CHUNK`."""
    pieces = [Extent(src, h.data_start + t.begin, t.nbytes, t.name) for t in h.tensors]
    digests = _Digests(pieces)
    runs = plan_runs(pieces, READBACK_CHUNK)
    view = memoryview(bytearray(max((r.nbytes for r in runs), default=0)))
    for run in runs:
        data = view[: run.nbytes]
        read_exact(src, [data], run.offset, f"tensor {pieces[run.parts[0][0]].name!r}")
        digests.feed(_Cursor(run), data)
        if progress is not None:
            progress(run.nbytes)
    for p in pieces:
        if p.nbytes == 0 and p.name not in digests.digests:
            digests.digests[p.name] = EMPTY_DIGEST
    return digests.digests


def hash_file(path: str | os.PathLike[str], *, progress: Progress | None = None) -> str:
    """SHA-256 of a whole local file, read with a bounded buffer."""
    with LocalFile.open(path) as src:
        return hash_source(src, progress=progress)


def hash_source(src: ByteSource, *, progress: Progress | None = None) -> str:
    """SHA-256 of all of ``src`` (a local file, or an object read with ranged GETs), read
    with a bounded buffer."""
    h = hashlib.sha256()
    view = memoryview(bytearray(CHUNK if src.fileno() is not None else READBACK_CHUNK))
    offset = 0
    while got := read_into(src, [view], offset):
        h.update(view[:got])
        offset += got
        if progress is not None:
            progress(got)
    return h.hexdigest()
