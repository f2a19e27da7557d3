"""Copy byte ranges into a file while hashing them, without slowing the copy.

One safetensors file is written as a header followed by *pieces*: byte ranges of
open source files, each one tensor. The calling thread moves the bytes with
:func:`fsio.copy_range` (``copy_file_range`` where the kernel has it), in chunks of
:data:`COPY_CHUNK`. One background thread follows it: it re-reads each just-copied
chunk from the *source* with ``os.preadv``, where it is still in the page cache,
into a reusable :data:`fsio.CHUNK` buffer, and feeds that one read to two hashers:
the SHA-256 of the whole file (the Hugging Face Hub's LFS id) and the per-tensor
digest (:data:`manifest.TENSOR_DIGEST`, XXH3-128, ten times faster). Both release
the GIL on large buffers, so hashing and the kernel copy run side by side.

Each copied chunk is handed to the kernel's writeback at once
(``sync_file_range``), so the disk writes while the copy and the hasher run and
the final fsync has little left to do.

Memory stays bounded: the hasher's queue holds at most :data:`MAX_LAG` chunks, so
the copier waits for a hasher that falls behind instead of letting the page cache
drop the bytes before they are hashed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .fsio import CHUNK, copy_range
from .manifest import tensor_hasher

COPY_CHUNK = 64 * 1024 * 1024
"""Bytes per copy request; hashers are fed at this granularity."""

MAX_LAG = 4
"""Chunks a hasher may fall behind the copier (so at most 256 MiB of source)."""

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Piece:
    """``nbytes`` bytes at ``offset`` in ``fd``, forming the tensor ``name``."""

    name: str
    fd: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Hashes:
    """SHA-256 of a whole written file, and each tensor's :data:`TENSOR_DIGEST` (hex)."""

    file_sha256: str
    tensors: dict[str, str]


# (piece index, fd, offset, length, last chunk of the piece) or None to stop
_Item = tuple[int, int, int, int, bool] | None


class _HashThread(threading.Thread):
    """Re-reads queued source ranges once; feeds the whole-file and per-piece hashers."""

    def __init__(self, pieces: Sequence[Piece], prefix: bytes) -> None:
        super().__init__(daemon=True, name="safeshard-hash")
        self.pieces = pieces
        self.queue: queue.Queue[_Item] = queue.Queue(maxsize=MAX_LAG)
        self.whole = hashlib.sha256(prefix)
        self.digests: dict[str, str] = {}
        self.error: BaseException | None = None
        self._cancel = threading.Event()

    def run(self) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        current = tensor_hasher()
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self._cancel.is_set() or self.error is not None:
                continue  # drain so the copier never blocks on a dead hasher
            index, fd, offset, length, last = item
            try:
                done = 0
                while done < length:
                    want = min(len(buf), length - done)
                    got = os.preadv(fd, [view[:want]], offset + done)
                    if got <= 0:
                        raise OSError(
                            f"source ended early while hashing {self.pieces[index].name!r}"
                        )
                    self.whole.update(view[:got])
                    current.update(view[:got])
                    done += got
                if last:
                    self.digests[self.pieces[index].name] = current.hexdigest()
                    current = tensor_hasher()
            except BaseException as e:  # reported by the copier after join
                self.error = e

    def stop(self) -> None:
        self._cancel.set()


def copy_pieces(
    dst_fd: int,
    header: bytes,
    pieces: Sequence[Piece],
    *,
    progress: Progress | None = None,
) -> Hashes:
    """Write ``header`` then every piece, in order, to ``dst_fd`` from offset 0.

    Returns the SHA-256 of the written file and the digest of each piece. Raises whatever the
    copy or a hasher raised (``OSError`` with ``ENOSPC`` on a full disk).
    """
    hasher = _HashThread(pieces, prefix=header)
    threads = (hasher,)
    for t in threads:
        t.start()
    ok = False
    try:
        _write_all(dst_fd, header, 0)
        pos = len(header)
        if progress is not None:
            progress(pos)
        for index, p in enumerate(pieces):
            done = 0
            while True:
                n = min(COPY_CHUNK, p.nbytes - done)
                if n:
                    copy_range(p.fd, dst_fd, p.offset + done, n, pos + done)
                    _start_writeback(dst_fd, pos + done, n)
                last = done + n >= p.nbytes
                for t in threads:
                    if t.error is not None:
                        raise t.error
                    t.queue.put((index, p.fd, p.offset + done, n, last))
                done += n
                if progress is not None and n:
                    progress(n)
                if last:
                    break
            pos += p.nbytes
        ok = True
    finally:
        for t in threads:
            if not ok:
                t.stop()
            t.queue.put(None)
        for t in threads:
            t.join()
    for t in threads:
        if t.error is not None:
            raise t.error
    return Hashes(file_sha256=hasher.whole.hexdigest(), tensors=hasher.digests)


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

    The final fsync then finds little left to write: the disk works while the copy
    and the hashers do, instead of after them. Linux only (through libc); elsewhere,
    or where the file system refuses, a no-op. ctypes releases the GIL for the call.
    """
    global _sync_file_range
    if _sync_file_range is not None and _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE):
        _sync_file_range = None  # unsupported here: stop asking


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def hash_file(path: str | os.PathLike[str], *, progress: Progress | None = None) -> str:
    """SHA-256 of a whole file, read with a bounded buffer."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while True:
            got = os.preadv(fd, [view], offset)
            if got <= 0:
                break
            h.update(view[:got])
            offset += got
            if progress is not None:
                progress(got)
    finally:
        os.close(fd)
    return h.hexdigest()
