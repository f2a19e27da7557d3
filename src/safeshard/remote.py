"""Checkpoints in object storage: fsspec URLs as byte sources (``s3://``, ``memory://``, ...).

Any path safeshard takes may be a URL that fsspec understands: ``s3://bucket/key``
(with ``pip install 'safeshard[s3]'``), ``memory://`` (tests), ``file://``, or any other
protocol fsspec has installed (``hf://``, ``gs://``, ``az://``). Credentials and endpoints
come from the usual places (environment, AWS config) or from ``storage_options``; they
are handed to fsspec and never printed, logged or written to a manifest.

:class:`RemoteFile` is a :class:`~safeshard.byteio.ByteSource` over one object. A read is
cut into ranged GETs of at most :attr:`RemoteLimits.request_bytes` (default 8 MiB),
issued in parallel, at most :attr:`RemoteLimits.requests` (default 8) in flight across
every reader sharing the limits, so at most ``requests × request_bytes`` (64 MiB) are in
flight. A failed or short ranged read is retried :attr:`RemoteLimits.retries` times
(default 3, with backoff), then is a :class:`~safeshard.errors.ReadError` naming the object
and the byte range.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .byteio import ByteSource, Sink
from .errors import (
    CheckpointNotFoundError,
    MissingExtraError,
    ReadError,
    SafeshardError,
    UsageError,
)
from .storerr import translating

__all__ = [
    "DEFAULT_LIMITS",
    "RemoteFile",
    "RemoteFolder",
    "RemoteLimits",
    "RemoteSink",
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
        self, *, requests: int = 8, request_bytes: int = 8 * MIB, retries: int = 3
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


def _classify(name: str, operation: str, e: BaseException, *, attempts: int = 1) -> SafeshardError:
    """A SafeshardError for an fsspec/botocore error (never with credentials in it):
    see :func:`safeshard.storerr.classify`."""
    from .storerr import classify

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
    """An object being written with a multipart upload (sequential writes)."""

    def __init__(self, fs: Any, path: str, name: str, size: int | None) -> None:
        self.name = name
        self.position = 0
        self._file = fs.open(path, "wb", block_size=part_size(size or 0))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._file.write(data)
        self.position += len(data)

    def commit(self) -> None:
        self._file.close()

    def abort(self) -> None:
        """Drop what was uploaded (an incomplete multipart upload leaves no parts)."""
        discard = getattr(self._file, "discard", None)
        try:
            if discard is not None:
                discard()
        finally:
            self._file.closed = True  # never completed later by the file's finalizer


@translating(
    {
        "__enter__": ("open the output prefix", lambda self, a: self.folder),
        "_names": ("list the prefix", lambda self, a: self.folder + "/"),
        "checkpoint_files": ("list the prefix", lambda self, a: self.folder + "/"),
        "exists": ("look up", lambda self, a: self.path(a[0])),
        "read": ("read", lambda self, a: self.path(a[0])),
        "remove": ("remove objects under", lambda self, a: self.folder + "/"),
        "write": ("upload", lambda self, a: self.path(a[0])),
        "copy_in": ("upload", lambda self, a: self.path(a[1])),
        "stage": ("upload", lambda self, a: self.path(a[0])),
        "stage_link": ("copy", lambda self, a: self.path(a[1])),
        "commit": ("commit (copy staged objects into place) under", lambda self, a: self.folder),
    }
)
class RemoteFolder:
    """The output transaction over a folder (a key prefix) in object storage.

    It offers what :class:`safeshard.outdir.OutputFolder` offers split, update and merge,
    within what object storage can do:

    - no lock (object storage has none): two writers of one prefix are not detected;
    - every file is written with a multipart upload that is completed only when the file
      is whole (so no reader sees a partial object) and aborted on any error; uploads a
      killed run left incomplete under the prefix are aborted when the next writer opens it;
    - object storage cannot rename: a staged file is uploaded under a temporary key and
      copied into place on the server at the commit;
    - no journal: an interrupted run is not resumed but written again (``--force``);
    - the commit removes the old index first and writes the new index last, so an index
      a reader sees always lists whole files.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        on_step: Any = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url, storage_options)
        self.root = self.root.rstrip("/")
        self.folder = self.url
        self.on_step = on_step
        self.recovered: list[str] = []
        self._mine: set[str] = set()
        self._committing = False

    # ------------------------------------------------------------------ lifetime

    def __enter__(self) -> RemoteFolder:
        self.step("locked")
        self._recover()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and not self._committing:
            for name in list(self._mine):
                self._rm(name)

    def step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    def path(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _key(self, name: str) -> str:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        return f"{self.root}/{name}"

    def _recover(self) -> None:
        """Abort multipart uploads a killed run left under this prefix; remove its
        temporary objects."""
        from .fsio import TMP_PREFIX

        lister = getattr(self.fs, "list_multipart_uploads", None)
        if lister is not None:
            bucket, _, prefix = self.root.partition("/")
            try:
                uploads = lister(bucket)
            except Exception:
                uploads = []
            for up in uploads or []:
                key = up.get("Key", "")
                if key.startswith(prefix + "/") and "/" not in key[len(prefix) + 1 :]:
                    try:
                        self.fs.call_s3(
                            "abort_multipart_upload",
                            Bucket=bucket,
                            Key=key,
                            UploadId=up["UploadId"],
                        )
                        self.recovered.append(f"aborted an incomplete upload of {key}")
                    except Exception:
                        pass
        for name in self._names():
            if name.startswith(TMP_PREFIX):
                self._rm(name)

    # ------------------------------------------------------------------ journal (none)

    def start(self, kind: str, fingerprint: str, keep: Any = None) -> None:
        self.step("started")

    def resumable(self, kind: str, fingerprint: str) -> dict[str, Any]:
        return {}

    @property
    def earlier_run(self) -> str | None:
        return None

    def record(self, name: str, rec: Any) -> None:
        self.step(f"journaled:{name}")

    # ------------------------------------------------------------------ files

    def _names(self) -> list[str]:
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
        return bool(self.fs.exists(self._key(name)))

    def read(self, name: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._key(name)))
        except FileNotFoundError:
            return None

    def _rm(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(name))
        self._mine.discard(name)

    def remove(self, names: Iterable[str]) -> list[str]:
        order = sorted(
            names,
            key=lambda n: (not n.endswith(".index.json"), not n.endswith(".safeshard.json"), n),
        )
        gone = [n for n in order if self.exists(n)]
        for n in order:
            self._rm(n)
        if gone:
            self.step("removed")
        return gone

    def _upload(self, name: str, key_name: str, fill: Any, size: int | None) -> Any:
        sink = RemoteSink(self.fs, self._key(key_name), self.path(name), size)
        self._mine.add(key_name)
        try:
            self.step(f"writing:{name}")
            result = fill(sink)
            sink.commit()
        except BaseException:
            try:
                sink.abort()
            finally:
                self._rm(key_name)
            raise
        return result

    def write(self, name: str, fill: Any, *, size: int | None = None) -> Any:
        result = self._upload(name, name, fill, size)
        self._mine.discard(name)
        self.step(f"written:{name}")
        return result

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write(name, lambda sink: sink.write(data), size=len(data))

    def copy_in(self, src: Any, name: str) -> None:
        """Copy a file (a local path, or a storage path) to ``name``: on the server when it
        lies on this storage, else streamed through a bounded buffer (never whole)."""
        fs = getattr(src, "fs", None)
        if fs is not None and type(fs) is type(self.fs) and hasattr(src, "path"):
            self.fs.copy(src.path, self._key(name))
            self.step(f"written:{name}")
            return
        from .byteio import copy_source
        from .storage import open_source

        with open_source(src) as source:
            self.write(name, lambda sink: copy_source(source, sink), size=source.size)

    def stage(self, name: str, fill: Any, *, size: int | None = None) -> tuple[str, Any]:
        from .outdir import STAGE_PREFIX

        tmp = f"{STAGE_PREFIX}{name}.part"
        result = self._upload(name, tmp, fill, size)
        self.step(f"staged:{name}")
        return tmp, result

    def stage_link(self, old: str, name: str) -> str:
        from .outdir import STAGE_PREFIX

        tmp = f"{STAGE_PREFIX}{name}.part"
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
        finals = dict(finals or {})
        changing = bool(moves or remove)
        self._committing = True
        self.step("committing")
        if changing:
            for n in reversed(list(finals)):
                self._rm(n)
        for tmp, name in moves:
            self.fs.copy(self._key(tmp), self._key(name))
            self._rm(tmp)
            self.step(f"moved:{name}")
        for n in remove:
            self._rm(n)
        for n, data in finals.items():
            if data is None:
                self._rm(n)
            elif changing or self.read(n) != data:
                self.write_bytes(n, data)
                self.step(f"moved:{n}")
        self._committing = False
        self.step("committed")
