"""The I/O layer: byte sources, one range type, one read loop.

Every byte safeshard reads from a checkpoint goes through this module:

- :class:`ByteSource` is read-only positional access to one file or object: a ``name``
  (a path or URL, for messages), a ``size``, and :meth:`~ByteSource.readinto`, one
  scatter read at an offset that may return fewer bytes than asked. Nothing in its
  interface assumes a file descriptor; :meth:`~ByteSource.fileno` tells a caller whether
  a local zero-copy path (``copy_file_range``) is open to it.
- :class:`LocalFile` is a local file (``os.preadv``); :class:`safeshard.io.remote.RemoteFile`
  is an object in storage reached through fsspec (parallel ranged GETs).
- :class:`Extent` is the one range type: ``nbytes`` bytes at ``offset`` of a source,
  with the name of what they hold (a tensor).
- :func:`read_into` is the one read loop (short reads retried until the end of the
  source); :func:`read_exact` adds "the source ended early" as a
  :class:`~safeshard.errors.ReadError`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from safeshard.errors import ReadError, StorageError, read_error
from safeshard.format.header import Header, read_header_with

__all__ = ["ByteSource", "Extent", "LocalFile", "copy_source", "read_exact", "read_into"]

IOV_MAX = 1024
"""Most buffers one scatter read takes (Linux ``IOV_MAX``)."""


class ByteSource(ABC):
    """Read-only positional access to the bytes of one file or object."""

    name: str
    """The path or URL, for messages (never with credentials)."""
    size: int
    """Bytes in the source when it was opened."""

    @abstractmethod
    def readinto(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Read into ``buffers`` in order, from ``offset``; return the bytes read, which may
        be fewer than asked (0 only at the end of the source). May raise ``OSError``."""

    def fileno(self) -> int | None:
        """A local file descriptor for zero-copy paths, or None (remote sources)."""
        return None

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release what the source holds; safe to call twice."""

    def __enter__(self) -> ByteSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}, {self.size} bytes>"


class LocalFile(ByteSource):
    """A local file, read with ``os.preadv`` through a descriptor held from the start (a
    file replaced later cannot mix with the bytes already read)."""

    def __init__(self, fd: int, name: str, size: int) -> None:
        self.fd = fd
        self.name = name
        self.size = size

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LocalFile:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise read_error(path, "open", e) from None
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise read_error(path, "stat", e) from None
        return cls(fd, os.fspath(path), size)

    def readinto(self, buffers: Sequence[memoryview], offset: int) -> int:
        if _HAS_PREADV:
            return os.preadv(self.fd, buffers, offset)
        done = 0  # pragma: no cover - platforms without preadv
        for b in buffers:  # pragma: no cover
            data = os.pread(self.fd, len(b), offset + done)
            b[: len(data)] = data
            done += len(data)
            if len(data) < len(b):
                break
        return done  # pragma: no cover

    def fileno(self) -> int | None:
        return self.fd if self.fd >= 0 else None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


_HAS_PREADV = hasattr(os, "preadv")


@dataclass(frozen=True)
class Extent:
    """``nbytes`` bytes at ``offset`` of ``source``, holding ``name`` (e.g. a tensor)."""

    source: ByteSource
    offset: int
    nbytes: int
    name: str = ""

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def read_into(src: ByteSource, buffers: Sequence[memoryview], offset: int) -> int:
    """Fill ``buffers`` in order from ``offset`` of ``src``, retrying short reads; fewer
    bytes only at the end of the source. Returns the bytes read. An ``OSError`` becomes a
    :class:`~safeshard.errors.ReadError` naming the source and the offset."""
    bufs = [b for b in buffers if len(b)]
    total = 0
    while bufs:
        try:
            got = src.readinto(bufs[:IOV_MAX], offset)
        except StorageError:
            raise
        except OSError as e:
            raise read_error(src.name, f"read at byte {offset}", e) from None
        if got <= 0:
            break
        offset += got
        total += got
        while bufs and got >= len(bufs[0]):
            got -= len(bufs[0])
            bufs.pop(0)
        if got:
            bufs[0] = bufs[0][got:]
    return total


def read_exact(src: ByteSource, buffers: Sequence[memoryview], offset: int, what: str) -> None:
    """Like :func:`read_into`, and a source that ends early is a
    :class:`~safeshard.errors.ReadError` naming ``what`` was being read."""
    want = sum(len(b) for b in buffers)
    got = read_into(src, buffers, offset)
    if got < want:
        raise ReadError(
            f"{src.name}: the source ended at byte {offset + got} while reading {what}; it "
            "was truncated or replaced after it was opened. Check it with `safeshard verify`",
            filename=src.name,
        )


def read_bytes(src: ByteSource, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of ``src``, fewer only where it ends."""
    buf = bytearray(max(0, min(length, src.size - offset)))
    got = read_into(src, [memoryview(buf)], offset)
    return bytes(buf[:got])


def header_of(src: ByteSource) -> Header:
    """The validated header of the safetensors file ``src`` (two reads: the length, the
    header), through the one header reader :func:`~safeshard.format.header.read_header_with`."""
    return read_header_with(lambda off, n: read_bytes(src, off, n), src.size, src.name)


COPY_CHUNK = 8 * 1024 * 1024
"""Buffer of :func:`copy_source`: one ranged GET of a remote source, one part's worth of
an upload."""


def copy_source(src: ByteSource, sink: Sink, *, chunk: int = COPY_CHUNK) -> int:
    """Copy all ``src.size`` bytes of ``src`` into ``sink`` through one buffer of at most
    ``chunk`` bytes, so a file of any size costs that much memory (a sidecar file copied
    to or from object storage). Returns the bytes copied; a source that ends early is a
    :class:`~safeshard.errors.ReadError`."""
    view = memoryview(bytearray(max(1, min(chunk, src.size))))
    offset = 0
    while offset < src.size:
        n = min(len(view), src.size - offset)
        read_exact(src, [view[:n]], offset, f"bytes {offset}-{offset + n - 1}")
        sink.write(view[:n])
        offset += n
    return offset


# --------------------------------------------------------------------------- sinks


class Sink(ABC):
    """Where one output file's bytes go: written in order, from offset 0."""

    name: str
    """The path or URL, for messages."""
    position: int = 0
    """Bytes written so far."""

    @abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; raises ``OSError`` (``ENOSPC`` on a full disk)."""

    def fileno(self) -> int | None:
        """A local file descriptor for zero-copy paths, or None (remote outputs)."""
        return None

    def wrote(self, nbytes: int) -> None:
        """Note ``nbytes`` appended through :meth:`fileno` by a zero-copy path."""
        self.position += nbytes


class LocalSink(Sink):
    """A local file being written through its descriptor (positional writes)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.position = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.position + done)
        self.position += done

    def fileno(self) -> int | None:
        return self.fd


# --------------------------------------------------------------------------- opening


def open_source(path: str | os.PathLike[str]) -> ByteSource:
    """A :class:`ByteSource` for a local path."""
    return LocalFile.open(path)


class Sources:
    """Byte sources opened once and closed together, by path (a checkpoint's shards).

    Each is opened when first asked for, with ``opener`` (local files by default); with
    ``sizes``, a source whose size changed since its header was read is refused (it
    changed while safeshard worked).
    """

    def __init__(
        self,
        sizes: dict[str, int] | None = None,
        opener: Callable[[str], ByteSource] | None = None,
    ) -> None:
        self._sizes = sizes or {}
        self._opener = opener or open_source
        self._open: dict[str, ByteSource] = {}

    def get(self, path: str) -> ByteSource:
        src = self._open.get(path)
        if src is None:
            src = self._opener(path)
            self._open[path] = src
            want = self._sizes.get(path)
            if want is not None and src.size != want:
                raise ReadError(
                    f"{path}: the file is now {src.size} bytes but its header was read from "
                    f"a {want}-byte file; it changed while safeshard worked. Retry",
                    filename=path,
                )
        return src

    def close(self) -> None:
        opened, self._open = self._open, {}
        for src in opened.values():
            src.close()

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
