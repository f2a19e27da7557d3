"""Where checkpoints live: local paths and fsspec URLs behind one path type.

Every path safeshard takes may be a local path or a URL. :func:`as_path` turns either
into a path object with the :class:`pathlib.Path` interface: a :class:`pathlib.Path` for
local paths (and ``file://`` URLs), a ``upath.UPath`` over fsspec for the others
(``s3://``, ``memory://``, ``hf://``, ...), which carries its file system and the
``storage_options`` it was made with. Finding a checkpoint, reading indexes, manifests
and sidecar files then work the same way on both; tensor bytes are read through
:func:`open_source` (a :class:`~safeshard.io.bytesrc.LocalFile` or a
:class:`~safeshard.io.remote.RemoteFile`), and outputs are written through
:func:`output_folder` (a :class:`~safeshard.io.transaction.OutputFolder` or a
:class:`~safeshard.io.remote.RemoteFolder`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from safeshard.errors import SafeshardError
from safeshard.io.bytesrc import ByteSource, LocalFile
from safeshard.io.localfs import MAX_SMALL_FILE, read_regular_file
from safeshard.io.remote import RemoteFile, RemoteFolder, RemoteLimits, filesystem, url_path
from safeshard.io.remote import is_url as is_url  # re-exported: the one decision asks it here
from safeshard.io.storerr import classify, from_client, storage_op
from safeshard.io.transaction import OutputFolder, OutputStore, StepHook
from safeshard.redact import redact

__all__ = [
    "Place",
    "as_path",
    "is_remote",
    "local_path",
    "open_source",
    "output_folder",
    "place_of",
    "read_small_file",
    "regular_size",
    "same_file",
    "same_folder",
    "storage_error",
    "translate_errors",
    "url_of",
]

P = ParamSpec("P")
R = TypeVar("R")

StorageOptions = Mapping[str, Any] | None


def as_path(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> Path:
    """A local :class:`~pathlib.Path`, or a ``UPath`` for a URL (see the module docs)."""
    return resolve(path, storage_options)[0]


def is_remote(path: object) -> bool:
    """Whether ``path`` is a path object over a non-local fsspec file system."""
    fs = getattr(path, "fs", None)
    if fs is None or (isinstance(path, Path) and type(path).__module__.startswith("pathlib")):
        return False
    protocol = getattr(fs, "protocol", "file")
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return not any(p in ("file", "local") for p in protocols)


def local_path(path: str | os.PathLike[str]) -> Path | None:
    """``path`` as a local :class:`~pathlib.Path` when it is on this machine's file system
    (what kernel copies, ``statvfs``, ``os.path.samefile`` and folder locks need), else
    None (an object, or a prefix, in storage)."""
    if is_remote(path):
        return None
    return path if isinstance(path, Path) else Path(os.fspath(path))


def read_small_file(
    path: Any,
    *,
    follow_symlinks: bool = True,
    limit: int = MAX_SMALL_FILE,
    operation: str | None = None,
    place: Place | None = None,
) -> bytes:
    """The bytes of a small file beside a checkpoint (an index, a manifest, a config):
    a local one through :func:`~safeshard.io.localfs.read_regular_file` (a regular file
    only, at most ``limit`` bytes: never a FIFO, a device or a folder), an object read
    whole (an object is always a regular file). With ``operation``, a storage client's
    error is :func:`~safeshard.io.storerr.storage_op`'s error. ``place``: where ``path``
    lives, when the caller has decided it already."""
    where = place if place is not None else place_of(path)
    return where.read_small(path, follow_symlinks=follow_symlinks, limit=limit, operation=operation)


def url_of(path: object) -> str:
    """How ``path`` is shown in messages and results: the URL or the local path, its
    credentials redacted (:func:`safeshard.redact.redact`; never the storage options,
    which may hold credentials)."""
    return redact(str(path))


@dataclass(frozen=True)
class Place:
    """Where a folder's files live, decided once (:func:`place_of`) and carried by the
    caller: on this machine's file system (``local`` is the folder) or in object storage
    (``local`` is None)."""

    local: Path | None
    limits: RemoteLimits | None = None

    def local_of(self, path: Any) -> Path | None:
        """``path`` (a path of this place) as a local :class:`~pathlib.Path`, or None in
        object storage."""
        if self.local is None:
            return None
        return path if isinstance(path, Path) else Path(os.fspath(path))

    def read_small(
        self,
        path: Any,
        *,
        follow_symlinks: bool = True,
        limit: int = MAX_SMALL_FILE,
        operation: str | None = None,
    ) -> bytes:
        """:func:`read_small_file` of ``path``, a path of this place, without asking again."""
        if self.local is not None:
            return read_regular_file(path, follow_symlinks=follow_symlinks, limit=limit)
        if operation is None:
            return bytes(path.read_bytes())
        with storage_op(path, operation):
            return bytes(path.read_bytes())

    def open(self, path: Any) -> ByteSource:
        """A byte source for the file at ``path`` (a path of this place)."""
        if self.local is not None:
            return LocalFile.open(path)
        return RemoteFile(path.fs, path.path, name=url_of(path), limits=self.limits)


LOCAL = Place(Path("."))
"""The place of local files (its folder is not used to open them)."""


def resolve(
    path: str | os.PathLike[str], storage_options: StorageOptions = None
) -> tuple[Path, Place]:
    """``path`` as :func:`as_path` gives it, with its :class:`Place`: the local-or-remote
    decision made once, for a caller to carry (the checkpoint door does, from its first
    look at a path to the copier)."""
    if not isinstance(path, str):  # a path object: already a remote path, or local
        if is_remote(path):
            return path, Place(None)  # type: ignore[return-value]  # a UPath
        if isinstance(path, Path):
            return path, LOCAL
        path = os.fspath(path)  # another PathLike: its text decides
    if not is_url(path):
        return Path(path), LOCAL
    for scheme in ("file://", "local://"):  # fsspec's local file system
        if path.startswith(scheme):
            return Path(path[len(scheme) :]), LOCAL
    return url_path(path, storage_options), Place(None)


def place_of(path: Any, limits: RemoteLimits | None = None) -> Place:
    """The :class:`Place` of ``path`` (from :func:`as_path`) and of the files beside it."""
    return Place(local_path(path), limits)


def open_source(path: Any, limits: RemoteLimits | None = None) -> ByteSource:
    """A byte source for the file at ``path`` (from :func:`as_path`)."""
    return place_of(path, limits).open(path)


def same_file(a: Any, b: Any) -> bool:
    """Whether the existing files ``a`` and ``b`` are one: by the kernel on this machine,
    by URL in storage."""
    la, lb = local_path(a), local_path(b)
    if la is None or lb is None:
        return str(a) == str(b)
    return os.path.samefile(la, lb)


def regular_size(path: Any) -> int | None:
    """The size of the regular file (or object) at ``path``; None for a symlink, a
    folder or nothing there (an object's absence is :class:`FileNotFoundError`)."""
    local = local_path(path)
    if local is None:
        info = path.fs.info(path.path)
        return None if info.get("type") == "directory" else int(info.get("size") or 0)
    if local.is_symlink() or not local.is_file():
        return None
    return local.stat().st_size


def same_folder(a: Any, b: Any, b_place: Place | None = None) -> bool:
    """Whether the folders ``a`` and ``b`` are one: the same folder on this machine (an
    existing ``a``), or the same URL. ``b_place``: where ``b`` lives, if already decided."""
    la = local_path(a)
    lb = b_place.local_of(b) if b_place is not None else local_path(b)
    if la is None or lb is None:
        return str(a).rstrip("/") == str(b).rstrip("/")
    return la.is_dir() and os.path.samefile(la, lb)


def output_folder(
    path: Any,
    *,
    on_step: StepHook | None = None,
    storage_options: StorageOptions = None,
    break_lock: bool = False,
) -> OutputStore:
    """The output transaction for the folder at ``path``: local or in object storage.

    ``break_lock`` takes over an object-storage prefix's lock object even when its writer
    may be alive (a local folder's lock is the kernel's, released when its process dies).
    """
    if is_remote(path):
        return RemoteFolder(
            str(path),
            storage_options=_options_of(path, storage_options),
            on_step=on_step,
            break_lock=break_lock,
        )
    return OutputFolder(path, on_step=on_step)


def _options_of(path: Any, given: StorageOptions) -> dict[str, Any]:
    opts = getattr(path, "storage_options", None)
    return dict(opts) if opts else dict(given or {})


def identity(path: Any, place: Place | None = None) -> list[Any]:
    """What tells one version of a file from another: the real path, size and
    modification time of a local file; the URL, size and ETag (or modification time)
    of an object. ``place``: where ``path`` lives, if already decided."""
    if (place.local is None) if place is not None else is_remote(path):
        info = path.fs.info(path.path)
        tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
        return [url_of(path), int(info.get("size") or 0), str(tag)]
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def remote_fs(url: str, storage_options: StorageOptions = None) -> Any:
    """The fsspec file system for ``url`` (for callers that need it directly)."""
    return filesystem(url, storage_options)[0]


def translate_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors an fsspec back end raises (botocore, aiohttp, ...) into
    :class:`~safeshard.errors.SafeshardError` subclasses with a clear message, so a
    command on object storage fails like one on local files. Errors of other origins
    pass through unchanged. The client's exception is not chained (its text may quote
    credentials); what it said is in the message, redacted."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except SafeshardError:
            raise
        except Exception as e:
            if not from_client(e):
                raise
            urls = [a for a in (*args, *kwargs.values()) if isinstance(a, str) and is_url(a)]
            raise storage_error(e, url=" or ".join(urls) or None) from None

    return wrapper


def storage_error(
    e: BaseException, url: object = None, operation: str = "complete a storage request"
) -> SafeshardError:
    """A :class:`~safeshard.errors.SafeshardError` for an error of a storage client (see
    :func:`safeshard.io.storerr.classify`); ``url`` defaults to the file the error names."""
    if url is None:
        url = getattr(e, "filename", None) or "storage"
    return classify(url, operation, e)
