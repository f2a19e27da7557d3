"""Checkpoints in object storage: fsspec URLs as byte sources (``s3://``, ``memory://``, ...).

Any path safeshard takes may be a URL that fsspec understands: ``s3://bucket/key``
(with ``pip install 'safeshard[s3]'``), ``memory://`` (tests), ``file://``, or any other
protocol fsspec has installed (``hf://``, ``gs://``, ``az://``). Credentials and endpoints
come from the usual places (environment, AWS config) or from ``storage_options``; they
are handed to fsspec and never printed, logged or written to a manifest.

:class:`RemoteFile` is a :class:`~safeshard.io.bytesrc.ByteSource` over one object. A read is
cut into ranged GETs of at most :attr:`RemoteLimits.request_bytes` (default 8 MiB),
issued in parallel, at most :attr:`RemoteLimits.requests` (default 8) in flight across
every reader sharing the limits, so at most ``requests × request_bytes`` (64 MiB) are in
flight. On S3 each body is streamed straight into the caller's buffers (one copy), reading
stops after the bytes asked for, and a server that ignores ``Range`` is refused. A failed or
short ranged read is retried :attr:`RemoteLimits.retries` times (default 3, with backoff),
then is a :class:`~safeshard.errors.ReadError` naming the object and the byte range.

:class:`RemoteSink` uploads a file's parts in parallel (:attr:`RemoteLimits.uploads`, default
8, in flight) and :class:`RemoteFolder` is the output transaction on a prefix: a lock object,
a journal object for ``--resume``, and multipart cleanup limited to the keys it writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from safeshard.errors import (
    CheckpointNotFoundError,
    MissingExtraError,
    OutputLockedError,
    ReadError,
    SafeshardError,
    UsageError,
    WriteError,
)
from safeshard.format.filenames import JOURNAL_NAME, LOCK_NAME, TMP_PREFIX, temp_name
from safeshard.format.manifest import header_digest
from safeshard.futures import settle, wait_all
from safeshard.io.bytesrc import ByteSource, Extent, Sink, copy_source, read_exact
from safeshard.io.copier import Hashes, digest_file, hash_source
from safeshard.io.journal import FileRecord, Journal, commit_plan, removal_order
from safeshard.io.parts import CopyPart, Part, Run, SendPart, plan_parts
from safeshard.io.storerr import classify, storage_op, translating

__all__ = [
    "DEFAULT_LIMITS",
    "RemoteFile",
    "RemoteFolder",
    "RemoteLimits",
    "RemoteSink",
    "RemoteStats",
    "filesystem",
    "is_url",
    "url_path",
]

MIB = 1024 * 1024

_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}
"""Protocols whose fsspec implementation lives in another package, and the extra to name."""


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    text = str(path)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").replace("-", "").isalnum()


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec file system for ``url`` and the path within it.

    Raises :class:`MissingExtraError` when fsspec, or the package a protocol needs (s3fs
    for ``s3://``), is not installed, naming the extra to install.
    """
    scheme = url.partition("://")[0].lower()
    try:
        import fsspec.core
    except ImportError:
        raise MissingExtraError(
            f"{url}: reading URLs needs fsspec, which is not installed; run: "
            f"pip install 'safeshard[{_EXTRAS.get(scheme, 's3')}]'"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as e:
        extra = _EXTRAS.get(scheme)
        hint = (
            f"pip install 'safeshard[{extra}]'" if extra else f"install fsspec's {scheme} support"
        )
        raise MissingExtraError(
            f"{scheme}:// URLs need a package that is missing ({e}); run: {hint}"
        ) from None
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise UsageError(f"{scheme}:// is not a protocol fsspec knows ({e})") from None
        raise UsageError(f"{url}: {e}") from None
    return fs, str(path)


def url_path(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """A ``upath.UPath`` for ``url``: the :class:`pathlib.Path` interface over fsspec,
    carrying its file system and ``storage_options``. Raises :class:`MissingExtraError`
    when fsspec, a protocol's package or universal-pathlib is not installed."""
    filesystem(url, storage_options)  # a clear MissingExtraError / UsageError first
    try:
        from upath import UPath  # an optional extra: imported when a URL is used
    except ImportError:
        raise MissingExtraError(
            f"{url}: reading URLs needs universal-pathlib, which is not installed; run: "
            "pip install 'safeshard[s3]'"
        ) from None
    return UPath(url, **dict(storage_options or {}))


@dataclass
class RemoteStats:
    """What remote reads did: requests, retries, bytes, and the most in flight at once."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    max_requests_in_flight: int = 0
    max_bytes_in_flight: int = 0
    _in_flight: int = 0
    _bytes_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self, nbytes: int) -> None:
        with self._lock:
            self.requests += 1
            self._in_flight += 1
            self._bytes_in_flight += nbytes
            self.max_requests_in_flight = max(self.max_requests_in_flight, self._in_flight)
            self.max_bytes_in_flight = max(self.max_bytes_in_flight, self._bytes_in_flight)

    def end(self, nbytes: int, got: int) -> None:
        with self._lock:
            self._in_flight -= 1
            self._bytes_in_flight -= nbytes
            self.bytes += got

    def to_json(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "bytes": self.bytes,
            "max_requests_in_flight": self.max_requests_in_flight,
            "max_bytes_in_flight": self.max_bytes_in_flight,
        }


class RemoteLimits:
    """How remote reads and uploads are cut and bounded; shared by every :class:`RemoteFile`
    and :class:`RemoteSink` given it.

    ``requests`` ranged GETs of at most ``request_bytes`` and ``uploads`` multipart part
    uploads run at once, so what is in flight is bounded by
    ``requests × request_bytes + (uploads + 1) × part size``. With ``server_copy`` (the
    default), a file written to object storage from objects of the same store has its
    bytes copied by the server (:meth:`RemoteFolder.server_copy`); set it to False to
    stream every byte through this machine instead.
    """

    def __init__(
        self,
        *,
        requests: int = 8,
        request_bytes: int = 8 * MIB,
        retries: int = 3,
        uploads: int = 8,
        server_copy: bool = True,
    ) -> None:
        if requests < 1 or request_bytes < 1 or retries < 0 or uploads < 1:
            raise UsageError(
                f"remote limits must be positive (requests={requests}, "
                f"request_bytes={request_bytes}, retries={retries}, uploads={uploads})"
            )
        self.requests = requests
        self.request_bytes = request_bytes
        self.retries = retries
        self.uploads = uploads
        self.server_copy = server_copy
        self.stats = RemoteStats()
        self.upload_stats = RemoteStats()
        """Part uploads (and single-request uploads): counts and the most in flight."""
        self.copy_stats = RemoteStats()
        """Parts copied on the server (``UploadPartCopy``): their requests and bytes."""
        self._slots = threading.BoundedSemaphore(requests)
        self._put_slots = threading.BoundedSemaphore(uploads)
        self._pool: ThreadPoolExecutor | None = None
        self._put_pool: ThreadPoolExecutor | None = None
        self._parts: list[bytearray] = []
        self._lock = threading.Lock()

    @property
    def max_bytes_in_flight(self) -> int:
        return self.requests * self.request_bytes

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.requests, thread_name_prefix="safeshard-get")
            return self._pool

    def take_part(self, size: int) -> bytearray:
        """A part buffer of ``size`` bytes, reused when one is free (so a copy of many
        shards allocates its part buffers once, not once per shard)."""
        with self._lock:
            for i, b in enumerate(self._parts):
                if len(b) == size:
                    return self._parts.pop(i)
        return bytearray(size)

    def give_part(self, buf: bytearray) -> None:
        """Return a part buffer for reuse (at most ``uploads + 1`` are kept)."""
        with self._lock:
            if len(self._parts) <= self.uploads:
                self._parts.append(buf)

    def put_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._put_pool is None:
                self._put_pool = ThreadPoolExecutor(
                    self.uploads, thread_name_prefix="safeshard-put"
                )
            return self._put_pool


DEFAULT_LIMITS = RemoteLimits()


class RemoteFile(ByteSource):
    """One object in storage, read with parallel ranged GETs (see the module docs)."""

    def __init__(
        self,
        fs: Any,
        path: str,
        *,
        name: str,
        size: int | None = None,
        limits: RemoteLimits | None = None,
    ) -> None:
        self.fs = fs
        self.path = path
        self.name = name
        self.limits = limits or DEFAULT_LIMITS
        self.size = self._size() if size is None else size

    def _size(self) -> int:
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{self.name}: no such object") from None
        except Exception as e:  # fsspec back ends raise their own types
            raise _classify(self.name, "look up", e) from None
        if info.get("type") == "directory":
            raise CheckpointNotFoundError(f"{self.name}: is a folder, not an object")
        return int(info["size"])

    def readinto(self, buffers: Sequence[memoryview], offset: int) -> int:
        total = sum(len(b) for b in buffers)
        end = min(offset + total, self.size)
        if end <= offset:
            return 0
        step = self.limits.request_bytes
        ranges = [(s, min(s + step, end)) for s in range(offset, end, step)]
        targets = _cut(buffers, [stop - start for start, stop in ranges])
        slots = self.limits._slots
        if len(ranges) == 1:  # in this thread: no hop through the pool
            with slots:
                self._get(ranges[0][0], ranges[0][1], targets[0])
            return end - offset
        futures: list[Future[None]] = []
        try:
            for (start, stop), views in zip(ranges, targets, strict=True):
                slots.acquire()
                try:
                    futures.append(self.limits.pool().submit(self._get, start, stop, views))
                except BaseException:
                    slots.release()
                    raise
                futures[-1].add_done_callback(lambda _: slots.release())
            wait_all(futures)  # on an error, running GETs finish before their buffers go
        except BaseException:
            settle(futures)  # the futures submitted before an interrupted submit
            raise
        return end - offset

    def _get(self, start: int, stop: int, views: Sequence[memoryview]) -> None:
        """One ranged GET of ``[start, stop)`` into ``views``, retried when it fails or
        comes back short."""
        want = stop - start
        last: BaseException | str = ""
        for attempt in range(self.limits.retries + 1):
            if attempt:
                self.limits.stats.retries += 1
                time.sleep(min(2.0, 0.05 * 2**attempt))
            self.limits.stats.begin(want)
            got = 0
            try:
                got = self._fetch(start, stop, views)
                if got == want:
                    return
                last = f"{got} bytes came back instead of {want}"
            except SafeshardError:
                raise
            except FileNotFoundError:
                raise ReadError(
                    f"{self.name}: the object is gone (reading bytes {start}-{stop - 1})",
                    filename=self.name,
                ) from None
            except PermissionError as e:
                raise _classify(self.name, f"read bytes {start}-{stop - 1}", e) from None
            except Exception as e:  # transient: connection reset, timeout, 5xx
                last = e
            finally:
                self.limits.stats.end(want, got)
        if isinstance(last, BaseException):
            raise _classify(
                self.name,
                f"read bytes {start}-{stop - 1}",
                last,
                attempts=self.limits.retries + 1,
            )
        raise ReadError(
            f"{self.name}: a ranged read of bytes {start}-{stop - 1} failed after "
            f"{self.limits.retries + 1} attempts: {last}",
            filename=self.name,
        )

    def _fetch(self, start: int, stop: int, views: Sequence[memoryview]) -> int:
        """One attempt: the bytes of ``[start, stop)`` into ``views``; how many came."""
        if _is_s3(self.fs):
            from fsspec.asyn import sync

            got: int = sync(self.fs.loop, _s3_get_into, self.fs, self.path, start, stop, views)
            return got
        data = self.fs.cat_file(self.path, start=start, end=stop)
        if len(data) > stop - start:
            raise _ignored_range(self.name, start, stop)
        return _scatter(memoryview(data), views)


def _cut(buffers: Sequence[memoryview], lengths: Sequence[int]) -> list[list[memoryview]]:
    """``buffers`` cut into consecutive groups of views holding ``lengths`` bytes each."""
    out: list[list[memoryview]] = []
    it = iter(buffers)
    cur = memoryview(b"")
    for n in lengths:
        group: list[memoryview] = []
        while n > 0:
            if not len(cur):
                cur = next(it)
                continue
            k = min(n, len(cur))
            group.append(cur[:k])
            cur = cur[k:]
            n -= k
        out.append(group)
    return out


def _scatter(data: memoryview, views: Sequence[memoryview]) -> int:
    """Copy ``data`` into ``views`` in order; the bytes copied."""
    pos = 0
    for v in views:
        n = min(len(v), len(data) - pos)
        if n <= 0:
            break
        v[:n] = data[pos : pos + n]
        pos += n
    return pos


def _is_s3(fs: Any) -> bool:
    """Whether ``fs`` is s3fs's file system (requests made with its client directly)."""
    return type(fs).__name__ == "S3FileSystem" and hasattr(fs, "_call_s3")


def _ignored_range(name: str, start: int, stop: int) -> ReadError:
    return ReadError(
        f"{name}: the server ignored the Range header (asked for bytes {start}-{stop - 1}, "
        "it sent the object from its first byte); safeshard reads objects in ranges, so "
        "this server cannot be read",
        filename=name,
    )


async def _s3_get_into(
    fs: Any, path: str, start: int, stop: int, views: Sequence[memoryview]
) -> int:
    """A ranged GET streamed straight into ``views``: the body is read in the chunks the
    connection delivers and copied once, into place; reading stops after ``stop - start``
    bytes whatever the server sends, and a whole object sent for a range that does not
    begin at 0 is refused (so the bytes in flight stay bounded against any server)."""
    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    resp = await fs._call_s3(
        "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}", **extra
    )
    body = resp["Body"]
    try:
        got_range = str(resp.get("ContentRange") or "")
        if not got_range.startswith(f"bytes {start}-") and start != 0:
            raise _ignored_range(path, start, stop)
        want = stop - start
        got = 0
        it = iter(views)
        view = memoryview(b"")
        stream = getattr(getattr(body, "_raw_stream", None), "content", None)
        while got < want:
            if stream is not None:  # aiohttp: the next chunk as received, not joined
                chunk = await stream.readany()
            else:
                chunk = await body.read(want - got)
            if not chunk:
                break
            data = memoryview(chunk)[: want - got]
            while len(data):
                if not len(view):
                    view = next(it)
                n = min(len(view), len(data))
                view[:n] = data[:n]
                view, data = view[n:], data[n:]
                got += n
        return got
    finally:
        body.close()


def _when(t: object) -> str:
    """A lock's time, for messages."""
    if not isinstance(t, (int, float)):
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _classify(name: str, operation: str, e: BaseException, *, attempts: int = 1) -> SafeshardError:
    """A SafeshardError for an fsspec/botocore error (never with credentials in it):
    see :func:`safeshard.io.storerr.classify`."""
    return classify(name, operation, e, attempts=attempts)


# --------------------------------------------------------------------------- writing


PART_BYTES = 8 * MIB
"""Smallest multipart-upload part; larger where a file would need over 9,000 parts."""

MAX_PARTS = 10_000
"""S3's limit on the parts of one multipart upload."""


def part_size(size: int) -> int:
    """A part size that keeps a ``size``-byte upload under :data:`MAX_PARTS` parts (with
    room to spare), in whole MiB, at least :data:`PART_BYTES`."""
    need = -(-size // (MAX_PARTS - 1000))
    return max(PART_BYTES, -(-need // MIB) * MIB)


class RemoteSink(Sink):
    """An object being written with a multipart upload (sequential writes).

    On S3 (s3fs), each filled part is uploaded by a thread of its own, up to
    :attr:`RemoteLimits.uploads` at once across every sink sharing the limits, while the
    writer fills the next part: the bytes in flight are at most ``(uploads + 1)`` parts.
    A file smaller than one part is one PUT at the commit. Elsewhere the file system's
    own buffered writer is used.
    """

    def __init__(
        self,
        fs: Any,
        path: str,
        name: str,
        size: int | None,
        *,
        limits: RemoteLimits | None = None,
    ) -> None:
        self.name = name
        self.position = 0
        self._parts: _PartUploader | None = None
        self._file: Any = None
        if _is_s3(fs):
            self._parts = _PartUploader(fs, path, name, part_size(size or 0), limits)
        else:
            self._file = fs.open(path, "wb", block_size=part_size(size or 0))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._parts is not None:
            self._parts.write(memoryview(data).cast("B"))
        else:
            self._file.write(data)
        self.position += len(data)

    def commit(self) -> None:
        if self._parts is not None:
            self._parts.complete()
        else:
            self._file.close()

    def abort(self) -> None:
        """Drop what was uploaded (an incomplete multipart upload leaves no parts)."""
        if self._parts is not None:
            self._parts.abort()
            return
        discard = getattr(self._file, "discard", None)
        try:
            if discard is not None:
                discard()
        finally:
            self._file.closed = True  # never completed later by the file's finalizer


class _PartBody(io.RawIOBase):
    """A part's bytes as a seekable file: the HTTP client sends it in small pieces from
    the part buffer, instead of copying the whole part into its socket buffer."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._view) - self._pos)
        memoryview(b).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = (
            len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        )
        data = self._view[self._pos : end].tobytes()
        self._pos = end
        return data


class _PartUploader:
    """A multipart upload to S3 whose parts upload in parallel (see :class:`RemoteSink`)."""

    def __init__(
        self, fs: Any, path: str, name: str, part: int, limits: RemoteLimits | None
    ) -> None:
        self.fs = fs
        self.name = name
        self.bucket, self.key, _ = fs.split_path(path)
        self.part = part
        self.limits = limits or DEFAULT_LIMITS
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}
        self._buf: bytearray | None = self.limits.take_part(part)
        self._fill = 0
        self._futures: list[Future[None]] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = False

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def write(self, data: memoryview) -> None:
        while len(data):
            n = min(len(data), self.part - self._fill)
            self._buffer()[self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == self.part:
                self._send()

    def _buffer(self) -> bytearray:
        """The part being filled; there is none once the last part was sent."""
        if self._buf is None:
            raise WriteError(
                f"{self.name}: written to after its upload was completed or aborted",
                filename=self.name,
            )
        return self._buf

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _send(self, *, last: bool = False) -> None:
        """Hand the filled part to an upload thread (waiting for a free slot); unless it
        is the ``last``, take a buffer for the next part."""
        self._check()
        if self.upload_id is None:
            self.upload_id = str(self._call("create_multipart_upload")["UploadId"])
        number = len(self._futures) + 1
        buf, size = self._buffer(), self._fill
        slots = self.limits._put_slots
        slots.acquire()
        try:
            fut = self.limits.put_pool().submit(self._put_part, number, buf, size)
        except BaseException:
            slots.release()
            raise
        self._futures.append(fut)
        with self._lock:
            self._buf = None if last else self.limits.take_part(self.part)
        self._fill = 0

    def _put_part(self, number: int, buf: bytearray, size: int) -> None:
        try:
            if self._error is not None or self._done:
                return
            _upload_part(self, number, memoryview(buf)[:size])
        except BaseException as e:
            if self._error is None:
                self._error = e
        finally:
            self.limits.give_part(buf)
            self.limits._put_slots.release()

    def _wait(self) -> None:
        for f in self._futures:
            with contextlib.suppress(BaseException):
                f.result()

    def complete(self) -> None:
        if self.upload_id is None:  # smaller than a part: one PUT
            stats = self.limits.upload_stats
            stats.begin(self._fill)
            try:
                self._call("put_object", Body=bytes(memoryview(self._buffer())[: self._fill]))
            finally:
                stats.end(self._fill, self._fill)
            self._done = True
            self._give_back()
            return
        if self._fill:
            self._send(last=True)
        self._give_back()  # no buffer is held while the last parts upload
        self._wait()
        self._check()
        parts = [{"PartNumber": n, "ETag": self.etags[n]} for n in sorted(self.etags)]
        self._call(
            "complete_multipart_upload",
            UploadId=self.upload_id,
            MultipartUpload={"Parts": parts},
        )
        self._done = True

    def _give_back(self) -> None:
        with self._lock:
            buf, self._buf = self._buf, None
        if buf is not None:
            self.limits.give_part(buf)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._wait()
        self._give_back()
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", UploadId=self.upload_id)


class _GaveUp(Exception):
    """A request failed on every attempt; ``last`` is its last error."""

    def __init__(self, last: Exception) -> None:
        super().__init__(str(last))
        self.last = last


def _retried(
    limits: RemoteLimits,
    stats: RemoteStats,
    nbytes: int,
    request: Callable[[], Any],
    *,
    refused: Callable[[PermissionError], BaseException],
    final: Callable[[Exception], BaseException | None] = lambda e: None,
) -> Any:
    """``request()``, moving ``nbytes``, counted in ``stats`` and tried up to
    ``limits.retries`` more times with backoff. A refused permission raises
    ``refused(e)`` at once, and so does any error for which ``final`` gives an exception;
    after the last attempt, :class:`_GaveUp`."""
    last: Exception | None = None
    for attempt in range(limits.retries + 1):
        if attempt:
            stats.retries += 1
            time.sleep(min(2.0, 0.05 * 2**attempt))
        stats.begin(nbytes)
        try:
            out = request()
        except PermissionError as e:
            stats.end(nbytes, 0)
            raise refused(e) from None
        except Exception as e:
            stats.end(nbytes, 0)
            stop = final(e)
            if stop is not None:
                raise stop from None
            last = e
            continue
        stats.end(nbytes, nbytes)
        return out
    raise _GaveUp(last or OSError("no attempt was made"))


def _upload_part(up: Any, number: int, data: memoryview) -> None:
    """Upload ``data`` as part ``number`` of ``up``'s multipart upload (an object with
    ``_call``, ``upload_id``, ``etags``, ``limits`` and ``name``), sent from its buffer
    as a seekable file, with retries; its ETag lands in ``up.etags``."""
    body = _PartBody(data)
    number_of = f"upload part {number}"

    def send() -> Any:
        body.seek(0)
        return up._call("upload_part", UploadId=up.upload_id, PartNumber=number, Body=body)

    try:
        out = _retried(
            up.limits,
            up.limits.upload_stats,
            len(data),
            send,
            refused=lambda e: _classify(up.name, number_of, e),
        )
    except _GaveUp as e:
        raise WriteError(
            f"{up.name}: uploading part {number} failed after "
            f"{up.limits.retries + 1} attempts: {e.last}",
            filename=up.name,
        ) from None
    up.etags[number] = str(out["ETag"])


COPY_PART_BYTES = 64 * MIB
"""Largest part copied on the server (``UploadPartCopy``) in one request."""


class _NoServerCopy(Exception):
    """The server does not implement ``UploadPartCopy`` (s3rver), or the first part
    copied failed for another reason than a refused permission."""


def _same_store(a: Any, b: Any) -> bool:
    """Whether two file systems reach the same store with the same credentials (so the
    server can copy an object of one into the other)."""
    if a is b:
        return True
    return (
        _is_s3(a)
        and type(a) is type(b)
        and getattr(a, "storage_options", None) == getattr(b, "storage_options", None)
    )


def _not_implemented(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e} {e.__cause__}".lower().replace(" ", "")
    return "notimplemented" in text or "501" in text


class _CopyUpload:
    """One multipart upload of :class:`~safeshard.io.parts.Part` s: sent parts are read
    with ranged GETs into a part buffer and uploaded, copied parts are ``UploadPartCopy``
    requests; up to :attr:`RemoteLimits.uploads` parts in flight, so the memory held is at
    most that many part buffers."""

    def __init__(self, fs: Any, path: str, name: str, limits: RemoteLimits) -> None:
        self.fs = fs
        self.name = name
        self.bucket, self.key, _ = fs.split_path(path)
        self.limits = limits
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def run(self, header: bytes, parts: Sequence[Part], sources: Sequence[RemoteFile]) -> None:
        """Upload every part and complete the upload; :class:`_NoServerCopy` when the
        server refuses the first copied part as not implemented."""
        self.upload_id = str(self._call("create_multipart_upload")["UploadId"])
        numbered = list(enumerate(parts, start=1))
        copies = [(n, p) for n, p in numbered if isinstance(p, CopyPart)]
        if copies:  # one alone first: a server without it is found before any GET
            at, copy = copies[0]
            self._copy(at, copy.run, sources[copy.run.source], first=True)
            numbered = [np for np in numbered if np[0] != at]
        slots = self.limits._put_slots
        futures: list[Future[None]] = []
        try:
            for number, part in numbered:
                slots.acquire()
                try:
                    fut = self.limits.put_pool().submit(self._part, number, part, header, sources)
                except BaseException:
                    slots.release()
                    raise
                fut.add_done_callback(lambda _: slots.release())
                futures.append(fut)
            wait_all(futures)
        except BaseException:
            settle(futures)  # the futures submitted before an interrupted submit
            raise
        self._call(
            "complete_multipart_upload",
            UploadId=self.upload_id,
            MultipartUpload={
                "Parts": [{"PartNumber": n, "ETag": self.etags[n]} for n in sorted(self.etags)]
            },
        )
        self.upload_id = None

    def _part(self, number: int, part: Part, header: bytes, sources: Sequence[RemoteFile]) -> None:
        if isinstance(part, CopyPart):
            self._copy(number, part.run, sources[part.run.source])
        else:
            self._send(number, part, header, sources)

    def _copy(self, number: int, run: Run, src: RemoteFile, *, first: bool = False) -> None:
        """Copy one part; for the ``first`` part, a failure other than a refused
        permission is :class:`_NoServerCopy` (the file is then streamed instead)."""
        bucket, key, version = src.fs.split_path(src.path)
        source: dict[str, str] = {"Bucket": bucket, "Key": key}
        if version:
            source["VersionId"] = version
        what = f"copy part {number} (bytes {run.start}-{run.stop - 1} of {src.name})"
        try:
            out = _retried(
                self.limits,
                self.limits.copy_stats,
                run.nbytes,
                lambda: self._call(
                    "upload_part_copy",
                    UploadId=self.upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={run.start}-{run.stop - 1}",
                ),
                refused=lambda e: _classify(self.name, what, e),
                final=lambda e: _NoServerCopy("not implemented") if _not_implemented(e) else None,
            )
        except _GaveUp as e:
            if first:
                raise _NoServerCopy(f"failed: {type(e.last).__name__}") from None
            raise _classify(self.name, what, e.last, attempts=self.limits.retries + 1) from None
        self.etags[number] = str(out["CopyPartResult"]["ETag"])

    def _send(
        self, number: int, part: SendPart, header: bytes, sources: Sequence[RemoteFile]
    ) -> None:
        buf = self.limits.take_part(part.nbytes)
        try:
            view = memoryview(buf)[: part.nbytes]
            view[: part.header] = header[: part.header]
            pos = part.header
            for r in part.runs:
                src = sources[r.source]
                read_exact(src, [view[pos : pos + r.nbytes]], r.start, src.name)
                pos += r.nbytes
            _upload_part(self, number, view)
        finally:
            self.limits.give_part(buf)

    def abort(self) -> None:
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", UploadId=self.upload_id)
            self.upload_id = None


def _runs(pieces: Sequence[Extent]) -> tuple[list[Run], list[ByteSource]]:
    """``pieces`` as runs (adjacent pieces of one source joined) and their sources."""
    sources: list[ByteSource] = []
    index: dict[int, int] = {}
    runs: list[Run] = []
    for p in pieces:
        i = index.get(id(p.source))
        if i is None:
            i = index[id(p.source)] = len(sources)
            sources.append(p.source)
        last = runs[-1] if runs else None
        if last is not None and last.source == i and last.stop == p.offset:
            runs[-1] = Run(i, last.start, p.end)
        else:
            runs.append(Run(i, p.offset, p.end))
    return runs, sources


LOCK_STALE_AFTER = 6 * 3600.0
"""Seconds after which a lock object that was not refreshed is stale (its writer
refreshes it after every file it finishes)."""


@translating(
    {
        "__enter__": ("open the output prefix", lambda self, a: self.url),
        "_read_lock": ("read the lock object", lambda self, a: f"{self.url}/{LOCK_NAME}"),
        "_names": ("list the prefix", lambda self, a: self.url + "/"),
        "checkpoint_files": ("list the prefix", lambda self, a: self.url + "/"),
        "exists": ("look up", lambda self, a: self.path(a[0])),
        "read": ("read", lambda self, a: self.path(a[0])),
        "remove": ("remove objects under", lambda self, a: self.url + "/"),
        "write": ("upload", lambda self, a: self.path(a[0])),
        "copy_in": ("upload", lambda self, a: self.path(a[1])),
        "server_copy": ("copy on the server into", lambda self, a: self.path(a[0])),
        "stage": ("upload", lambda self, a: self.path(a[0])),
        "stage_link": ("copy", lambda self, a: self.path(a[1])),
        "commit": ("commit (copy staged objects into place) under", lambda self, a: self.url),
    }
)
class RemoteFolder:
    """The output transaction over a folder (a key prefix) in object storage.

    It offers what :class:`safeshard.io.transaction.OutputFolder` offers split, update and merge,
    within what object storage can do:

    - a lock object (``.safeshard.lock``) created with a conditional write
      (``If-None-Match: *``), so a second writer of the prefix is refused; it names its
      owner, host, process and time, and is stale when its process is gone from this
      host or it was not refreshed for :data:`LOCK_STALE_AFTER` (``break_lock`` takes
      it over anyway). A server that ignores conditional writes is noted once;
    - every file is written with a multipart upload that is completed only when the file
      is whole (so no reader sees a partial object) and aborted on any error; before a
      file is written, incomplete uploads of that key (a killed run's) are aborted, and
      uploads of safeshard's temporaries under the prefix are aborted on entry;
    - a file's last parts and its completion (which a server may take a second over for a
      large object) go on in the background while the next file is written, one file at
      a time: its journal record waits for them, every other step waits for them first,
      and an error there is raised by the next step;
    - object storage cannot rename: a staged file is uploaded under a temporary key and
      copied into place on the server at the commit;
    - a journal object (``.safeshard-journal.json``, rewritten whole as each file is
      finished) vouches for finished files, so an interrupted run is resumed
      (``--resume``) like a local one;
    - the commit removes the old index first and writes the new index last, so an index
      a reader sees always lists whole files.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        on_step: Any = None,
        break_lock: bool = False,
    ) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url, storage_options)
        self.root = self.root.rstrip("/")
        self.folder: Any = url_path(self.url, storage_options)
        self.on_step = on_step
        self.break_lock = break_lock
        self.recovered: list[str] = []
        self._mine: set[str] = set()
        self._committing = False
        self._found: Any = None
        self._journal: Any = None
        self._lock_body: bytes | None = None
        self._cannot_list = False
        self._no_server_copy = False
        self._finishing: Future[None] | None = None
        self._finisher: ThreadPoolExecutor | None = None
        self._unfinished: set[str] = set()
        self._to_record: dict[str, Any] = {}
        self._journal_lock = threading.Lock()

    # ------------------------------------------------------------------ lifetime

    def __enter__(self) -> RemoteFolder:
        self._lock()
        try:
            self.step("locked")
            self._recover()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            try:
                self._settle()
            except BaseException:
                if exc is None:
                    raise
            if exc is not None and not self._committing:
                for name in list(self._mine):
                    self._rm(name)
                j = self._journal
                if j is not None and not any(
                    self.exists(r.staged or n) for n, r in j.files.items()
                ):
                    self._rm(JOURNAL_NAME)
        finally:
            if self._finisher is not None:
                self._finisher.shutdown(wait=True)
                self._finisher = None
            self._unlock()

    def step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    def path(self, name: str) -> Any:
        self._key(name)  # a plain name
        return self.folder / name

    def _key(self, name: str) -> str:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        return f"{self.root}/{name}"

    def _settle(self) -> None:
        """Wait for the file finishing in the background, raising its error."""
        fut, self._finishing = self._finishing, None
        if fut is not None:
            fut.result()

    # ------------------------------------------------------------------ lock

    def _lock(self) -> None:
        """Create the lock object, or refuse: see the class docs."""
        if not _is_s3(self.fs):
            return  # memory:// and other file systems: no conditional writes to use

        key = self._key(LOCK_NAME)
        body = json.dumps(
            {
                "format": "safeshard-lock",
                "owner": uuid.uuid4().hex,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "time": time.time(),
            }
        ).encode()
        for _ in range(3):
            held = self._read_lock()
            if held is not None:
                why = self._stale(held)
                if why is None and not self.break_lock:
                    raise OutputLockedError(
                        f"{self.url}: another safeshard process is writing this prefix "
                        f"(pid {held.get('pid')} on host {held.get('host')!r}, since "
                        f"{_when(held.get('time'))}; lock object {LOCK_NAME}); wait for it "
                        "to finish, or if it died, pass --break-lock"
                    )
                self.recovered.append(
                    f"took over the lock of an earlier writer ({why or 'broken by --break-lock'})"
                )
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(key)
            if self._put_if_absent(key, body):
                self._lock_body = body
                if self._put_if_absent(key, body):  # a second create must be refused
                    self.recovered.append(
                        "this storage server ignores conditional writes (If-None-Match), so "
                        "a second writer of this prefix would not be detected"
                    )
                return
        raise OutputLockedError(
            f"{self.url}: another safeshard process keeps taking the lock of this prefix"
        )

    def _put_if_absent(self, key: str, body: bytes) -> bool:
        bucket, k, _ = self.fs.split_path(key)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=k, Body=body, IfNoneMatch="*")
        except Exception as e:
            text = f"{type(e).__name__} {e} {e.__cause__}".lower().replace("-", "")
            if "precondition" in text or "412" in text or "conditionalrequest" in text:
                return False
            raise _classify(f"{self.url}/{LOCK_NAME}", "create the lock object", e) from None
        return True

    def _read_lock(self) -> dict[str, Any] | None:

        try:
            data = self.fs.cat_file(self._key(LOCK_NAME))
        except FileNotFoundError:
            return None
        try:
            held = json.loads(data[:4096])
        except ValueError:
            held = None
        return held if isinstance(held, dict) else {"host": "?", "pid": "?", "time": None}

    def _stale(self, held: Mapping[str, Any]) -> str | None:
        """Why the lock ``held`` is stale, or None when its writer may be alive."""

        when = held.get("time")
        if isinstance(when, (int, float)) and time.time() - when > LOCK_STALE_AFTER:
            return f"not refreshed since {_when(when)}"
        pid = held.get("pid")
        if held.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"its process {pid} on this host is gone"
            except OSError:
                return None
        return None

    def _refresh_lock(self) -> None:

        if self._lock_body is None:
            return
        held = json.loads(self._lock_body)
        held["time"] = time.time()
        body = json.dumps(held).encode()
        with contextlib.suppress(Exception):
            self.fs.pipe_file(self._key(LOCK_NAME), body)
            self._lock_body = body

    def _unlock(self) -> None:

        if self._lock_body is None:
            return
        mine = json.loads(self._lock_body).get("owner")
        self._lock_body = None
        with contextlib.suppress(Exception):
            held = self._read_lock()
            if held is not None and held.get("owner") == mine:
                self.fs.rm_file(self._key(LOCK_NAME))

    # ------------------------------------------------------------------ recovery

    def _uploads(self, prefix: str) -> list[dict[str, Any]]:
        """Incomplete multipart uploads of keys starting with ``prefix`` (inside the
        bucket); a server that cannot list them is noted once."""
        if not _is_s3(self.fs):
            return []
        bucket = self.root.partition("/")[0]
        try:
            out = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        except Exception:
            if not self._cannot_list:
                self._cannot_list = True
                self.recovered.append(
                    "this storage server cannot list incomplete multipart uploads, so those "
                    "a killed run left behind cannot be cleaned up here"
                )
            return []
        return list(out.get("Uploads") or [])

    def _abort_uploads(self, prefix: str, keep: Any = None) -> None:
        bucket = self.root.partition("/")[0]
        for up in self._uploads(prefix):
            key = str(up.get("Key", ""))
            if keep is not None and not keep(key):
                continue
            try:
                self.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=up["UploadId"]
                )
            except Exception:
                continue
            self.recovered.append(f"aborted an incomplete upload of {key}")

    def _recover(self) -> None:
        """Read an interrupted run's journal; abort the multipart uploads of safeshard's
        temporaries under this prefix and remove the temporaries it does not vouch for."""
        key_prefix = self._key(TMP_PREFIX).partition("/")[2]
        self._abort_uploads(
            key_prefix, keep=lambda k: "/" not in k[len(key_prefix) - len(TMP_PREFIX) :]
        )
        data = self.read(JOURNAL_NAME)
        found = Journal.parse(data) if data is not None else None
        if data is not None and found is None:
            self.recovered.append("ignored an unreadable journal of an earlier run")
            self._rm(JOURNAL_NAME)
        keep = {r.staged for r in found.files.values() if r.staged} if found else set()
        for name in self._names():
            if name.startswith(TMP_PREFIX) and name not in keep:
                self._rm(name)
        self._found = found

    # ------------------------------------------------------------------ journal

    def start(
        self, kind: str, fingerprint: str, keep: Mapping[str, FileRecord] | None = None
    ) -> None:
        keep = dict(keep or {})
        old = self._found
        if old is not None:
            for n, r in old.files.items():
                if r.staged and (n not in keep or keep[n].staged != r.staged):
                    self._rm(r.staged)
        self._found = None
        self._journal = Journal(kind, fingerprint, keep)
        self._save_journal()
        self.step("started")

    def _save_journal(self) -> None:
        with self._journal_lock:
            if self._journal is None:
                return
            try:
                self.fs.pipe_file(self._key(JOURNAL_NAME), self._journal.encode())
            except Exception as e:
                raise _classify(self.path(JOURNAL_NAME), "write the journal", e) from None

    def resumable(self, kind: str, fingerprint: str) -> dict[str, Any]:
        """Files an earlier, interrupted run of the same work finished (its journal's
        records), to be checked by the caller before they are kept."""
        found = self._found
        if found is None or found.kind != kind or found.fingerprint != fingerprint:
            return {}
        return dict(found.files)

    @property
    def earlier_run(self) -> str | None:
        return self._found.kind if self._found is not None else None

    def record(self, name: str, rec: Any) -> None:
        """Journal ``name`` as finished: now, or when its upload finishes in the
        background."""
        with self._journal_lock:
            if name in self._unfinished:
                self._to_record[name] = rec
                return
        self._record(name, rec)

    def _record(self, name: str, rec: Any) -> None:
        if self._journal is not None:
            with self._journal_lock:
                self._journal.files[name] = rec
            self._save_journal()
        self._refresh_lock()
        self.step(f"journaled:{name}")

    # ------------------------------------------------------------------ files

    def _names(self) -> list[str]:
        self._settle()
        try:
            entries = self.fs.ls(self.root, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            if e.get("type") == "directory":
                continue
            out.append(str(e["name"]).rstrip("/").rsplit("/", 1)[-1])
        return sorted(out)

    def checkpoint_files(self, suffixes: Sequence[str]) -> list[str]:
        return [n for n in self._names() if n.endswith(tuple(suffixes))]

    def exists(self, name: str) -> bool:
        self._settle()
        return bool(self.fs.exists(self._key(name)))

    def read(self, name: str) -> bytes | None:
        self._settle()
        try:
            return bytes(self.fs.cat_file(self._key(name)))
        except FileNotFoundError:
            return None

    def _rm(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(name))
        self._mine.discard(name)

    def remove(self, names: Iterable[str]) -> list[str]:
        self._settle()
        order = removal_order(names)
        gone = [n for n in order if self.exists(n)]
        for n in order:
            self._rm(n)
        if gone:
            self.step("removed")
        return gone

    def _upload(
        self, name: str, key_name: str, fill: Any, size: int | None, done: str, *, later: bool
    ) -> Any:
        """Upload ``fill(sink)`` as ``key_name``, then step ``done``; with ``later``, the
        last parts and the completion go on in the background (see the class docs)."""
        key = self._key(key_name).partition("/")[2]
        self._abort_uploads(key, keep=lambda k: k == key)  # a killed run's, of this key
        sink = RemoteSink(self.fs, self._key(key_name), str(self.path(name)), size)
        self._mine.add(key_name)
        try:
            self.step(f"writing:{name}")
            result = fill(sink)
        except BaseException:
            self._drop(sink, key_name)
            raise
        try:
            self._settle()  # the file before, one at a time
        except BaseException:
            self._drop(sink, key_name)
            raise
        if not later:
            self._finish(name, key_name, sink, done)
            return result
        with self._journal_lock:
            self._unfinished.add(name)
        if self._finisher is None:
            self._finisher = ThreadPoolExecutor(1, thread_name_prefix="safeshard-finish")
        self._finishing = self._finisher.submit(self._finish, name, key_name, sink, done)
        return result

    def _drop(self, sink: RemoteSink, key_name: str) -> None:
        try:
            sink.abort()
        finally:
            self._rm(key_name)

    def _finish(self, name: str, key_name: str, sink: RemoteSink, done: str) -> None:
        """Complete ``sink``'s upload, step ``done``, then journal the record the writer
        left for it, if any."""
        try:
            with storage_op(self.path(name), "upload"):  # named as `write` names it
                sink.commit()
        except BaseException:
            self._drop(sink, key_name)  # and the file stays unfinished: never journaled
            raise
        if key_name == name:
            self._mine.discard(name)
        self.step(done)
        with self._journal_lock:
            self._unfinished.discard(name)
            rec = self._to_record.pop(name, None)
        if rec is not None:
            self._record(name, rec)

    def write(self, name: str, fill: Any, *, size: int | None = None) -> Any:
        return self._upload(name, name, fill, size, f"written:{name}", later=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Upload ``data`` as ``name``, finished before this returns (the commit's index)."""

        def fill(sink: RemoteSink) -> None:
            sink.write(data)

        self._upload(name, name, fill, len(data), f"written:{name}", later=False)

    def copy_in(self, source: ByteSource, name: str) -> None:
        """Copy all of ``source`` (a local file, or an object) to ``name``: on the server
        when it is an object on this storage, else streamed through a bounded buffer (never
        whole)."""
        self._settle()
        if isinstance(source, RemoteFile) and type(source.fs) is type(self.fs):
            self.fs.copy(source.path, self._key(name))
            self.step(f"written:{name}")
            return
        self.write(name, lambda sink: copy_source(source, sink), size=source.size)

    def server_copy(
        self,
        name: str,
        header: bytes,
        pieces: Sequence[Extent],
        *,
        stage: bool = False,
        sha256: bool = False,
        progress: Any = None,
    ) -> tuple[str | None, Hashes, str | None] | None:
        """Write ``header`` then ``pieces`` as ``name`` (staged under a temporary name with
        ``stage``) with the pieces' bytes copied by the server (``UploadPartCopy``), when
        every piece is an object of this store and most bytes can be copied so; else None
        and nothing is written (the caller streams the file).

        The header, and runs too small to be a part, are sent from here
        (:func:`~safeshard.io.parts.plan_parts`). The finished object is then read back
        (parallel ranged GETs) for its digests, and its SHA-256 with ``sha256``; a header
        that did not land as sent is a :class:`~safeshard.errors.WriteError`. A server
        without ``UploadPartCopy`` is noted once and not asked again. Returns the
        temporary name (or None), the digests, and the SHA-256 (or None).
        """
        if not DEFAULT_LIMITS.server_copy or self._no_server_copy or not _is_s3(self.fs):
            return None
        if not pieces:
            return None
        runs, sources = _runs(pieces)
        objects = [s for s in sources if isinstance(s, RemoteFile) and _same_store(s.fs, self.fs)]
        if len(objects) != len(sources):
            return None
        size = len(header) + sum(r.nbytes for r in runs)
        parts = plan_parts(
            len(header),
            runs,
            send_bytes=part_size(size),
            copy_bytes=max(COPY_PART_BYTES, part_size(size)),
        )
        if 2 * sum(p.nbytes for p in parts if isinstance(p, CopyPart)) < size:
            return None  # mostly small runs: streaming them costs no more
        self._settle()
        key_name = temp_name(name, stage=True) if stage else name
        key = self._key(key_name)
        self._abort_uploads(key.partition("/")[2], keep=lambda k: k == key.partition("/")[2])
        shown = str(self.path(name))
        up = _CopyUpload(self.fs, key, shown, DEFAULT_LIMITS)
        self._mine.add(key_name)
        self.step(f"writing:{name}")
        try:
            try:
                up.run(header, parts, objects)
            except _NoServerCopy as e:
                up.abort()
                self._mine.discard(key_name)
                self._no_server_copy = True
                self.recovered.append(
                    f"this storage server cannot copy parts of objects (UploadPartCopy {e}), "
                    "so shards were streamed through this machine"
                )
                return None
            written = RemoteFile(self.fs, key, name=shown, size=size, limits=DEFAULT_LIMITS)
            hashes = digest_file(written, progress=progress)
            if hashes.header != header_digest(header):
                raise WriteError(
                    f"{shown}: the header read back differs from the one sent; the object "
                    "was removed, run the command again",
                    filename=shown,
                )
            digest = hash_source(written) if sha256 else None
        except BaseException:
            try:
                up.abort()
            finally:
                self._rm(key_name)
            raise
        if stage:
            self.step(f"staged:{name}")
            return key_name, hashes, digest
        self._mine.discard(name)
        self.step(f"written:{name}")
        return None, hashes, digest

    def stage(self, name: str, fill: Any, *, size: int | None = None) -> tuple[str, Any]:
        tmp = temp_name(name, stage=True)
        result = self._upload(name, tmp, fill, size, f"staged:{name}", later=True)
        return tmp, result

    def stage_link(self, old: str, name: str) -> str:
        self._settle()
        tmp = temp_name(name, stage=True)
        self.fs.copy(self._key(old), self._key(tmp))
        self._mine.add(tmp)
        self.step(f"staged:{name}")
        return tmp

    def commit(
        self,
        moves: Sequence[tuple[str, str]] = (),
        remove: Sequence[str] = (),
        *,
        finals: Mapping[str, bytes | None] | None = None,
    ) -> None:
        # removing a missing object costs nothing, and the file system's listing cache
        # may miss objects this run uploaded: every final is removed without asking
        self._settle()
        plan = commit_plan(
            moves, remove, dict(finals or {}), exists=lambda name: True, current=self.read
        )
        self._committing = True
        self.step("committing")
        for step in plan:
            if step.op == "rm":
                self._rm(step.name)
                continue
            if step.op == "mv":  # object storage cannot rename: a copy on the server
                self.fs.copy(self._key(step.tmp), self._key(step.name))
                self._rm(step.tmp)
            else:
                self.write_bytes(step.name, step.data)
            self.step(f"moved:{step.name}")
        self._rm(JOURNAL_NAME)
        self._committing = False
        self.step("committed")
