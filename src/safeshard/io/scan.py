"""Read files once, in parallel, and check their bytes on the way.

One :class:`FileTask` reads one file sequentially, through a byte source
(:mod:`safeshard.io.bytesrc`: a local file or an object in storage), into a reusable
:data:`~safeshard.io.localfs.CHUNK` buffer and, from that single pass, can:

- compute the SHA-256 of the whole file (the Hugging Face Hub's LFS id);
- compute a digest per byte range (one tensor each; :data:`manifest.TENSOR_DIGEST`);
- compare a byte range with the same-length range of *another* file, reading that
  file's bytes exactly once, into a second buffer, and comparing with ``memcmp``;
- keep a copy of small ranges (e.g. ``g_idx``) for later checks.

Tasks run on a thread pool, one file per thread, largest first. Reads, hashing
(on large buffers) and the ``memcmp`` foreign call all release the GIL, so
threads overlap I/O and hashing. Comparing directly costs almost nothing next to a
second SHA-256, which is what lets ``verify --against`` stay close to the time of
reading both copies.

Nothing here raises on differing or short files: a :class:`FileResult` reports what
was found; only a missing file or a failed ``open`` surfaces as ``error``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from safeshard.errors import SafeshardError
from safeshard.format.manifest import Hasher, tensor_digest, tensor_hasher
from safeshard.io.bytesrc import ByteSource, read_into
from safeshard.io.localfs import CHUNK
from safeshard.io.store import open_source

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Range:
    """``nbytes`` bytes at absolute ``offset`` in the task's file, named ``name``.

    ``digest`` hashes it (:data:`manifest.TENSOR_DIGEST`); ``against`` =
    ``(path, offset)`` compares it with the bytes at ``offset`` in the file at
    ``path`` (a local path or a storage path); ``capture`` keeps a copy.
    """

    name: str
    offset: int
    nbytes: int
    digest: bool = False
    against: tuple[Any, int] | None = None
    capture: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class FileTask:
    """What to do with one file (a local path or a storage path). Range names must be
    unique within a task."""

    path: Any
    ranges: tuple[Range, ...] = ()
    whole: bool = False
    size: int = 0
    """The file size expected (for planning and progress); 0 means unknown."""

    @property
    def planned_bytes(self) -> int:
        """Bytes this task will read, from its own file and from compared files."""
        own = self.size if self.whole else sum(r.nbytes for r in _merge(self.ranges))
        return own + sum(r.nbytes for r in self.ranges if r.against is not None)


@dataclass
class FileResult:
    """What a task found. ``differs`` maps a range to the first differing byte in it."""

    path: str
    sha256: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)
    differs: dict[str, int] = field(default_factory=dict)
    captured: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    bytes_read: int = 0


class _Extent:
    """A byte span ``[offset, end)`` to read."""

    __slots__ = ("end", "nbytes", "offset")

    def __init__(self, offset: int, end: int) -> None:
        self.offset, self.end, self.nbytes = offset, end, end - offset


def _merge(ranges: Sequence[Range]) -> list[_Extent]:
    """The union of ``ranges`` as sorted, non-overlapping extents (adjacent ones joined)."""
    out: list[_Extent] = []
    for r in sorted(ranges, key=lambda r: r.offset):
        if r.nbytes == 0:
            continue
        if out and r.offset <= out[-1].end:
            if r.end > out[-1].end:
                out[-1] = _Extent(out[-1].offset, r.end)
        else:
            out.append(_Extent(r.offset, r.end))
    return out


# --------------------------------------------------------------------------- compare


def _load_memcmp() -> Callable[[int, int, int], int] | None:
    """libc's ``memcmp`` through ctypes (a foreign call, so the GIL is released)."""
    try:
        if sys.platform == "win32":  # pragma: no cover - not tested here
            lib = ctypes.cdll.msvcrt
        else:
            name = ctypes.util.find_library("c")
            lib = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        fn = lib.memcmp
    except (OSError, AttributeError):  # pragma: no cover - every libc has memcmp
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_MEMCMP = _load_memcmp()


class _Buffer:
    """A reusable read buffer with its address, for ``memcmp``."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self._c = (ctypes.c_char * size).from_buffer(self.data) if _MEMCMP and size else None
        self.address = ctypes.addressof(self._c) if self._c is not None else 0

    def release(self) -> None:
        self._c = None
        self.view.release()


def _equal(a: _Buffer, a_off: int, b: _Buffer, b_off: int, n: int) -> bool:
    if _MEMCMP is not None and a.address and b.address:
        return _MEMCMP(a.address + a_off, b.address + b_off, n) == 0
    return bytes(a.view[a_off : a_off + n]) == bytes(b.view[b_off : b_off + n])


def _first_difference(a: memoryview, b: memoryview) -> int:
    """Index of the first differing byte of two equal-length views that differ."""
    step = 4096
    for start in range(0, len(a), step):
        x, y = bytes(a[start : start + step]), bytes(b[start : start + step])
        if x != y:
            for i, (p, q) in enumerate(zip(x, y, strict=True)):
                if p != q:
                    return start + i
    return len(a)


# --------------------------------------------------------------------------- one file


def _why(e: BaseException, path: str, what: str) -> str:
    """What went wrong, without the path that the caller names (``FileResult.path``)."""
    text = str(e.strerror) if isinstance(e, OSError) and e.strerror else str(e)
    if text.startswith(path + ": "):
        return text[len(path) + 2 :]  # a StorageError names the file: "cannot open: ..."
    return f"{what}: {text}"


class _Cancelled(Exception):
    pass


class _Runner:
    """Runs one task; ``other_fds`` caches the compared files it opened."""

    def __init__(self, task: FileTask, progress: Progress | None, stop: threading.Event) -> None:
        self.task = task
        self.progress = progress
        self.stop = stop
        self.result = FileResult(str(task.path))
        self.others: dict[str, ByteSource] = {}

    def _other(self, path: Any) -> ByteSource:
        key = str(path)
        src = self.others.get(key)
        if src is None:
            src = open_source(path)
            self.others[key] = src
        return src

    def _advance(self, n: int) -> None:
        self.result.bytes_read += n
        if self.progress is not None and n:
            self.progress(n)

    def run(self) -> FileResult:
        try:
            src = open_source(self.task.path)
        except (OSError, SafeshardError) as e:
            self.result.error = _why(e, self.result.path, "cannot open")
            return self.result
        try:
            self._scan(src)
        except _Cancelled:
            self.result.error = "cancelled"
        except (OSError, SafeshardError) as e:
            self.result.error = _why(e, self.result.path, "read failed")
        finally:
            src.close()
            for other in self.others.values():
                other.close()
        return self.result

    def _scan(self, src: ByteSource) -> None:
        task, res = self.task, self.result
        size = src.size
        ranges = sorted(task.ranges, key=lambda r: (r.offset, r.end))
        for r in ranges:  # empty ranges need no bytes
            if r.nbytes == 0:
                if r.digest:
                    res.hashes[r.name] = tensor_digest(b"")
                if r.capture:
                    res.captured[r.name] = b""
        ranges = [r for r in ranges if r.nbytes]
        extents = [_Extent(0, size)] if task.whole else _merge(ranges)
        whole = hashlib.sha256() if task.whole else None
        buf = _Buffer(CHUNK)
        other = _Buffer(CHUNK) if any(r.against for r in ranges) else None
        hashers: dict[str, Hasher] = {}
        captures: dict[str, bytearray] = {}
        active: list[Range] = []
        nxt = 0
        try:
            for ext in extents:
                pos = ext.offset
                while pos < ext.end:
                    if self.stop.is_set():
                        raise _Cancelled
                    want = min(CHUNK, ext.end - pos)
                    got = read_into(src, [buf.view[:want]], pos)
                    self._advance(got)
                    if got < want:
                        res.error = (
                            f"file ended at byte {pos + got}, expected at least {ext.end} "
                            "(it shrank while being read)"
                        )
                        return
                    c0, c1 = pos, pos + got
                    if whole is not None:
                        whole.update(buf.view[:got])
                    while nxt < len(ranges) and ranges[nxt].offset < c1:
                        r = ranges[nxt]
                        active.append(r)
                        if r.digest:
                            hashers[r.name] = tensor_hasher()
                        if r.capture:
                            captures[r.name] = bytearray()
                        nxt += 1
                    still: list[Range] = []
                    for r in active:
                        s, e = max(r.offset, c0), min(r.end, c1)
                        if s < e:
                            self._piece(r, buf, other, s - c0, e - s, s - r.offset, hashers)
                            if r.capture:
                                captures[r.name] += buf.view[s - c0 : e - c0]
                        if r.end <= c1:
                            if r.digest:
                                res.hashes[r.name] = hashers.pop(r.name).hexdigest()
                            if r.capture:
                                res.captured[r.name] = bytes(captures.pop(r.name))
                        else:
                            still.append(r)
                    active = still
                    pos = c1
            if whole is not None:
                res.sha256 = whole.hexdigest()
        finally:
            buf.release()
            if other is not None:
                other.release()

    def _piece(
        self,
        r: Range,
        buf: _Buffer,
        other: _Buffer | None,
        at: int,
        n: int,
        within: int,
        hashers: dict[str, Hasher],
    ) -> None:
        """Bytes ``buf[at:at+n]``, which are bytes ``within..`` of range ``r``."""
        if r.digest:
            hashers[r.name].update(buf.view[at : at + n])
        if r.against is None or other is None or r.name in self.result.differs:
            return
        path, offset = r.against
        got = read_into(self._other(path), [other.view[:n]], offset + within)
        self._advance(got)
        if got < n:
            self.result.differs[r.name] = within + got
        elif not _equal(buf, at, other, 0, n):
            self.result.differs[r.name] = within + _first_difference(
                buf.view[at : at + n], other.view[:n]
            )


# --------------------------------------------------------------------------- many files


def scan(
    tasks: Sequence[FileTask],
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> list[FileResult]:
    """Run ``tasks`` on a thread pool, largest first; results in the order of ``tasks``.

    ``workers`` defaults to the number of CPUs (at most one thread per task).
    ``progress`` is called from the worker threads with each number of bytes read.
    """
    if not tasks:
        return []
    n = workers if workers is not None else (os.cpu_count() or 2)
    n = max(1, min(n, len(tasks)))
    stop = threading.Event()
    order = sorted(range(len(tasks)), key=lambda i: -tasks[i].planned_bytes)
    results: list[FileResult | None] = [None] * len(tasks)
    if n == 1:
        for i in order:
            results[i] = _Runner(tasks[i], progress, stop).run()
    else:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="safeshard-scan") as pool:
            futures = {i: pool.submit(_Runner(tasks[i], progress, stop).run) for i in order}
            try:
                for i, fut in futures.items():
                    results[i] = fut.result()
            except BaseException:
                stop.set()
                raise
    return [
        r if r is not None else FileResult(t.path, error="cancelled")
        for r, t in zip(results, tasks, strict=True)
    ]
