"""Copy byte ranges into a file while digesting them, without slowing the copy.

One safetensors file is written as a header followed by *pieces*: byte ranges of open
source files, one tensor each. Consecutive pieces that are contiguous in one source
are joined into *runs* of at most :data:`COPY_CHUNK` bytes, so a file of many small
tensors costs a few system calls, not one per tensor. The calling thread moves each
run with :func:`fsio.copy_range` (``copy_file_range`` where the kernel has it) and
hands it to the kernel's writeback at once (``sync_file_range``), so the disk writes
while the copy runs and the final fsync has little left to do.

Integrity at disk speed. One background thread follows the copier: it re-reads each
just-copied run from the *source* with ``os.preadv``, where it is still in the page
cache, into a reusable :data:`fsio.CHUNK` buffer, and feeds each tensor's bytes to its
digest (:data:`manifest.TENSOR_DIGEST`, XXH3-128, about 11 GB/s on one core here). The
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

import ctypes
import errno
import hashlib
import os
import queue
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from .errors import ReadError, read_error
from .fsio import CHUNK, copy_range
from .manifest import Hasher, header_digest, tensor_digest, tensor_hasher

COPY_CHUNK = 64 * 1024 * 1024
"""Largest run copied (and handed to the digest thread) at once."""

MAX_LAG = 4
"""Runs the digest thread may fall behind the copier (so at most 256 MiB of source)."""

EMPTY_DIGEST = tensor_digest(b"")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Piece:
    """``nbytes`` bytes at ``offset`` in ``fd`` (the file ``path``), forming tensor ``name``."""

    name: str
    fd: int
    offset: int
    nbytes: int
    path: str = ""


@dataclass(frozen=True)
class Hashes:
    """Digests of a written file: its header's, and each tensor's (hex, XXH3-128)."""

    header: str
    tensors: dict[str, str]


@dataclass
class _Run:
    """Consecutive pieces contiguous in one source: ``parts`` are ``(piece index, start
    inside the piece, length)`` in order."""

    fd: int
    offset: int
    nbytes: int = 0
    parts: list[tuple[int, int, int]] = field(default_factory=list)


def plan_runs(pieces: Sequence[Piece], chunk: int | None = None) -> list[_Run]:
    """Join ``pieces`` (skipping empty ones) into runs of at most ``chunk`` bytes."""
    limit = COPY_CHUNK if chunk is None else chunk
    runs: list[_Run] = []
    cur: _Run | None = None
    for i, p in enumerate(pieces):
        pos = 0
        while pos < p.nbytes:
            if (
                cur is None
                or cur.fd != p.fd
                or cur.offset + cur.nbytes != p.offset + pos
                or cur.nbytes >= limit
            ):
                cur = _Run(p.fd, p.offset + pos)
                runs.append(cur)
            n = min(p.nbytes - pos, limit - cur.nbytes)
            cur.parts.append((i, pos, n))
            cur.nbytes += n
            pos += n
    return runs


class _DigestThread(threading.Thread):
    """Re-reads each queued run once and feeds each piece's bytes to its digest."""

    def __init__(self, pieces: Sequence[Piece]) -> None:
        super().__init__(daemon=True, name="safeshard-digest")
        self.pieces = pieces
        self.queue: queue.Queue[_Run | None] = queue.Queue(maxsize=MAX_LAG)
        self.digests: dict[str, str] = {}
        self.error: BaseException | None = None
        self._cancel = threading.Event()

    def run(self) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        current: Hasher | None = None
        while True:
            run = self.queue.get()
            if run is None:
                return
            if self._cancel.is_set() or self.error is not None:
                continue  # drain so the copier never blocks on a dead thread
            try:
                current = self._digest(run, view, current)
            except BaseException as e:  # reported by the copier
                self.error = e

    def _digest(self, run: _Run, view: memoryview, current: Hasher | None) -> Hasher | None:
        """Feed ``run``'s bytes to its pieces' digests; returns the digest of a piece that
        continues into the next run (a piece larger than one run)."""
        parts = iter(run.parts)
        index, start, length = next(parts)
        left = length  # bytes of the current part still to feed
        pos = 0
        while pos < run.nbytes:
            want = min(len(view), run.nbytes - pos)
            got = _read(run.fd, view[:want], run.offset + pos)
            if got < want:
                p = self.pieces[index]
                raise ReadError(
                    f"{p.path or 'source'}: the file ended while reading tensor {p.name!r} "
                    f"(byte {run.offset + pos + got}); it shrank while being copied",
                    filename=p.path or None,
                )
            at = 0
            while at < got:
                n = min(left, got - at)
                if current is None:
                    current = tensor_hasher()
                current.update(view[at : at + n])
                at += n
                left -= n
                if left == 0:
                    if start + length == self.pieces[index].nbytes:
                        self.digests[self.pieces[index].name] = current.hexdigest()
                        current = None
                    nxt = next(parts, None)
                    if nxt is None:
                        break
                    index, start, length = nxt
                    left = length
            pos += got
        return current

    def stop(self) -> None:
        self._cancel.set()


def _read(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; fewer bytes only at end of file."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def copy_pieces(
    dst_fd: int,
    header: bytes,
    pieces: Sequence[Piece],
    *,
    progress: Progress | None = None,
    on_written: Callable[[int], None] | None = None,
) -> Hashes:
    """Write ``header`` then every piece, in order, to ``dst_fd`` from offset 0.

    Returns the digest of the header and of each piece. ``on_written`` is called with the
    number of bytes of the file written so far (a :class:`Sha256Follower` follows it).
    Raises :class:`~safeshard.errors.ReadError` for a source that cannot be read, and the
    copy's ``OSError`` otherwise (``ENOSPC`` on a full disk).
    """
    digester = _DigestThread(pieces)
    digester.start()
    ok = False
    try:
        _write_all(dst_fd, header, 0)
        pos = len(header)
        if progress is not None:
            progress(pos)
        if on_written is not None:
            on_written(pos)
        for run in plan_runs(pieces):
            try:
                copy_range(run.fd, dst_fd, run.offset, run.nbytes, pos)
            except ReadError:
                raise
            except OSError as e:
                if e.errno in _WRITE_ERRNOS:
                    raise
                p = pieces[run.parts[0][0]]
                raise read_error(p.path or "source", f"copy tensor {p.name!r}", e) from e
            _start_writeback(dst_fd, pos, run.nbytes)
            if digester.error is not None:
                raise digester.error
            digester.queue.put(run)
            pos += run.nbytes
            if progress is not None:
                progress(run.nbytes)
            if on_written is not None:
                on_written(pos)
        ok = True
    finally:
        if not ok:
            digester.stop()
        digester.queue.put(None)
        digester.join()
    if digester.error is not None:
        raise digester.error
    digests = digester.digests
    for p in pieces:
        if p.nbytes == 0:
            digests[p.name] = EMPTY_DIGEST
    return Hashes(header=header_digest(header), tensors=digests)


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Errors of a copy that are the output's, not the source's."""


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
        self._fd = os.dup(fd)
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
            os.close(self._fd)

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
            got = _read(self._fd, view[:want], pos)
            if got < want:
                raise ReadError(
                    f"{self.name}: the file ended at byte {pos + got} while computing its SHA-256",
                    filename=self.name,
                )
            h.update(view[:got])
            pos += got
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


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def digest_file(path: str | os.PathLike[str], *, progress: Progress | None = None) -> Hashes:
    """The header digest and each tensor's digest of the safetensors file at ``path``,
    reading it once (what :func:`copy_pieces` computes while writing it)."""
    from .header import read_header

    h = read_header(path)
    header = header_digest(struct.pack("<Q", h.header_len) + h.raw)
    digests: dict[str, str] = {}
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise read_error(path, "open", e) from None
    try:
        for t in h.tensors:
            d = tensor_hasher()
            pos, end = h.data_start + t.begin, h.data_start + t.end
            while pos < end:
                want = min(len(buf), end - pos)
                try:
                    got = _read(fd, view[:want], pos)
                except OSError as e:
                    raise read_error(path, f"read tensor {t.name!r}", e) from None
                if got < want:
                    raise ReadError(
                        f"{path}: the file ended at byte {pos + got} inside tensor {t.name!r}",
                        filename=str(path),
                    )
                d.update(view[:got])
                pos += got
                if progress is not None:
                    progress(got)
            digests[t.name] = d.hexdigest()
    finally:
        os.close(fd)
    return Hashes(header=header, tensors=digests)


def hash_file(path: str | os.PathLike[str], *, progress: Progress | None = None) -> str:
    """SHA-256 of a whole file, read with a bounded buffer."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise read_error(path, "open", e) from None
    try:
        offset = 0
        while True:
            try:
                got = os.preadv(fd, [view], offset)
            except OSError as e:
                raise read_error(path, f"read at byte {offset}", e) from None
            if got <= 0:
                break
            h.update(view[:got])
            offset += got
            if progress is not None:
                progress(got)
    finally:
        os.close(fd)
    return h.hexdigest()
