"""Checkpoints in object storage: fsspec URLs as byte sources (``s3://``, ``memory://``, ...).

Any path safeshard takes may be a URL that fsspec understands: ``s3://bucket/key``
(with ``pip install 'safeshard[s3]'``), ``memory://`` (tests), ``file://``, or any other
protocol fsspec has installed (``hf://``, ``gs://``, ``az://``). Credentials and endpoints
come from the usual places (environment, AWS config) or from ``storage_options``; they
are handed to fsspec and never printed, logged or written to a manifest.

:class:`RemoteFile` is a :class:`~safeshard.byteio.ByteSource` over one object. A read is
cut into ranged GETs of at most :attr:`RemoteLimits.request_bytes` (default 16 MiB),
issued in parallel, at most :attr:`RemoteLimits.requests` (default 8) in flight across
every reader sharing the limits, so at most ``requests × request_bytes`` (128 MiB) are in
flight. A failed or short ranged read is retried :attr:`RemoteLimits.retries` times
(default 3, with backoff), then is a :class:`~safeshard.errors.ReadError` naming the object
and the byte range.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .byteio import ByteSource
from .errors import (
    CheckpointNotFoundError,
    MissingExtraError,
    ReadError,
    UsageError,
)

__all__ = [
    "DEFAULT_LIMITS",
    "RemoteFile",
    "RemoteLimits",
    "RemoteStats",
    "filesystem",
    "is_url",
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
    """How remote reads are cut and bounded; shared by every :class:`RemoteFile` given it."""

    def __init__(
        self, *, requests: int = 8, request_bytes: int = 16 * MIB, retries: int = 3
    ) -> None:
        if requests < 1 or request_bytes < 1 or retries < 0:
            raise UsageError(
                f"remote limits must be positive (requests={requests}, "
                f"request_bytes={request_bytes}, retries={retries})"
            )
        self.requests = requests
        self.request_bytes = request_bytes
        self.retries = retries
        self.stats = RemoteStats()
        self._slots = threading.BoundedSemaphore(requests)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def max_bytes_in_flight(self) -> int:
        return self.requests * self.request_bytes

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.requests, thread_name_prefix="safeshard-get")
            return self._pool


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
        futures: list[Future[bytes]] = []
        try:
            for start, stop in ranges:
                self.limits._slots.acquire()
                try:
                    futures.append(self.limits.pool().submit(self._get, start, stop))
                except BaseException:
                    self.limits._slots.release()
                    raise
                futures[-1].add_done_callback(lambda _: self.limits._slots.release())
            parts = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        # scatter the parts into the buffers
        pos = 0
        data_iter = iter(parts)
        chunk = memoryview(b"")
        for buf in buffers:
            filled = 0
            while filled < len(buf) and pos < end - offset:
                if not chunk:
                    chunk = memoryview(next(data_iter))
                n = min(len(buf) - filled, len(chunk))
                buf[filled : filled + n] = chunk[:n]
                chunk = chunk[n:]
                filled += n
                pos += n
        return pos

    def _get(self, start: int, stop: int) -> bytes:
        """One ranged GET of ``[start, stop)``, retried when it fails or comes back short."""
        want = stop - start
        last: BaseException | str = ""
        for attempt in range(self.limits.retries + 1):
            if attempt:
                self.limits.stats.retries += 1
                time.sleep(min(2.0, 0.05 * 2**attempt))
            self.limits.stats.begin(want)
            got = 0
            try:
                data = self.fs.cat_file(self.path, start=start, end=stop)
                got = len(data)
                if got == want:
                    return bytes(data)
                last = f"{got} bytes came back instead of {want}"
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
        raise ReadError(
            f"{self.name}: a ranged read of bytes {start}-{stop - 1} failed after "
            f"{self.limits.retries + 1} attempts: {last}",
            filename=self.name,
        )


def _classify(name: str, operation: str, e: BaseException) -> Exception:
    """A SafeshardError for an fsspec/botocore error (never with credentials in it)."""
    text = str(e) or type(e).__name__
    low = text.lower()
    if isinstance(e, PermissionError) or "accessdenied" in low or "forbidden" in low:
        return ReadError(
            f"{name}: cannot {operation}: access denied ({text}); check the credentials "
            "(environment, AWS config, or --storage-option key=... secret=...)",
            filename=name,
        )
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return CheckpointNotFoundError(f"{name}: the bucket does not exist")
    if "invalidaccesskeyid" in low or "signaturedoesnotmatch" in low or "credentials" in low:
        return ReadError(
            f"{name}: cannot {operation}: the credentials were refused ({text})", filename=name
        )
    if isinstance(e, OSError):
        return ReadError(f"{name}: cannot {operation}: {text}", filename=name, err=e.errno or 5)
    return ReadError(f"{name}: cannot {operation}: {text}", filename=name)
