"""Byte-range copies and crash-safe writes.

- :func:`copy_range` moves bytes between files with ``os.copy_file_range`` where the
  kernel has it, else through a bounded buffer: tensor bytes never pass through Python
  objects the size of a tensor.
- :class:`AtomicWriter` writes under a temporary name in the target folder, fsyncs,
  then renames over the target and fsyncs the folder. On any error the temporary
  file is removed; a full disk becomes :class:`DiskFullError`.
- :class:`DirLock` refuses a second writer of the same output folder.

The output transaction built on these (lock, journal, staging, commit) is
:mod:`safeshard.io.transaction`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from safeshard.errors import DiskFullError, OutputLockedError, WriteError, write_error
from safeshard.format.filenames import LOCK_NAME, TMP_PREFIX
from safeshard.sizes import format_size

CHUNK = 8 * 1024 * 1024
"""Buffer size for the fallback copy and for hashing reads."""

MAX_COPY = 1 << 30
"""Largest single copy_file_range request (the kernel caps one at ~2 GiB)."""


_HAS_CFR = hasattr(os, "copy_file_range")


def advise_sequential(fd: int) -> None:
    """Tell the kernel ``fd`` will be read sequentially (a larger readahead window, as
    ``cp`` asks). Affects only this open file description; a refusal is ignored."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int) -> None:
    """Copy ``length`` bytes at ``offset`` in ``src_fd`` to ``dst_offset`` in ``dst_fd``.

    Uses ``copy_file_range`` where the kernel has it; if it fails (another file system,
    a file system that refuses it), the rest of *this* copy goes through a bounded
    buffer, which also tells a read error from a write error. A full disk is raised as is.
    """
    done = 0
    kernel = _HAS_CFR
    while done < length:
        want = min(MAX_COPY, length - done)
        n = 0
        if kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, want, offset + done, dst_offset + done)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                kernel = False  # this copy only
                continue
            if n == 0:
                kernel = False  # let the buffered path tell end of file from a refusal
                continue
        else:
            n = _copy_buffered(src_fd, dst_fd, offset + done, want, dst_offset + done)
        if n == 0:
            raise OSError(
                errno.EIO,
                f"source ended early: wanted {length - done} more bytes at {offset + done}",
            )
        done += n


def _copy_buffered(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int) -> int:
    buf = bytearray(min(CHUNK, length))
    view = memoryview(buf)
    done = 0
    while done < length:
        want = min(len(buf), length - done)
        got = os.preadv(src_fd, [view[:want]], offset + done)
        if got == 0:
            break
        written = 0
        while written < got:
            written += os.pwrite(dst_fd, view[written:got], dst_offset + done + written)
        done += got
    return done


MAX_SMALL_FILE = 1 << 30
"""Most bytes read from an index, a manifest, a journal or a config file (1 GiB): far
more than any of them holds for a real checkpoint, and a bound on what a hostile or
damaged one (a huge sparse file) can make safeshard hold in memory."""


def open_regular(
    path: str | os.PathLike[str], flags: int = os.O_RDONLY, *, follow_symlinks: bool = True
) -> int:
    """A descriptor on the regular file at ``path``, opened with ``flags``.

    The open never blocks (``O_NONBLOCK``: a FIFO cannot hang it), and anything but a
    regular file is closed again and refused before a byte is read: a folder, a FIFO,
    a socket or a device is ``OSError(EINVAL)``. With ``follow_symlinks=False`` a
    symlink is refused too (``O_NOFOLLOW``: ``OSError(ELOOP)``), as it is for every
    file safeshard reads or locks in an output folder. The descriptor is ``O_CLOEXEC``.
    """
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    fd = os.open(path, flags | os.O_NONBLOCK | nofollow | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(
    path: str | os.PathLike[str],
    *,
    follow_symlinks: bool = True,
    limit: int = MAX_SMALL_FILE,
) -> bytes:
    """The bytes of the regular file at ``path`` (a symlink to one is followed unless
    ``follow_symlinks`` is False).

    For the small files beside a checkpoint (index, manifest, ``config.json``,
    ``quantize_config.json``) and in an output folder (the journal): anything else
    raises ``OSError`` without being read from (see :func:`open_regular`), so that a
    FIFO cannot hang a command and a device (a symlink to ``/dev/zero``) cannot fill
    memory. A folder or a device is ``EINVAL``; a symlink, when not followed, ``ELOOP``;
    a missing file ``FileNotFoundError``; a file of more than ``limit`` bytes ``EFBIG``
    (at most ``limit + 1`` bytes are read, even from a file that grows). A local path
    only: a path that may be in object storage is read through
    :func:`safeshard.io.store.read_small_file`.
    """
    fd = open_regular(path, follow_symlinks=follow_symlinks)
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size > limit:
            raise _too_large(path, limit)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _too_large(path, limit)
    return data


def _too_large(path: str | os.PathLike[str], limit: int) -> OSError:
    return OSError(
        errno.EFBIG, f"larger than {limit} bytes ({format_size(limit)})", os.fspath(path)
    )


def fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_temporary(path: str | os.PathLike[str]) -> int:
    """Create the temporary file ``path`` for writing and return its descriptor.

    The one safe temporary of every writer (the output transaction, ``synth``): a
    leftover of the same name (a killed run's, or a symlink planted there) is removed
    first, and the file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so the bytes
    never go through a symlink or into a file someone else made, even one planted
    between the removal and the creation (that is ``FileExistsError``). Mode ``0644``
    less the umask. ``OSError`` as the kernel raises it.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a leftover of this very name: never write through it
    return os.open(
        path,
        os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
        0o644,
    )


class AtomicWriter:
    """Write ``target`` under a temporary name; on success fsync and rename over it.

    Use as a context manager; ``fd`` is the open temporary file. The target appears
    only complete. On error (a full disk included) the temporary file is removed.
    """

    def __init__(self, target: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.target = Path(target)
        self.tmp = self.target.parent / f"{TMP_PREFIX}{self.target.name}.{os.getpid()}.part"
        self.durable = durable
        self.fd = -1

    def __enter__(self) -> AtomicWriter:
        try:
            self.fd = create_temporary(self.tmp)
        except OSError as e:
            raise write_error(self.tmp, "create", e) from None
        return self

    def write(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                if self.durable:
                    os.fsync(self.fd)
                os.close(self.fd)
                self.fd = -1
                os.replace(self.tmp, self.target)
                if self.durable:
                    fsync_dir(self.target.parent)
                return
        except BaseException as e:  # Ctrl-C during fsync too: never leave the temp file
            self._discard()
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise self._disk_full() from e
            raise
        self._discard()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise self._disk_full() from exc

    def _disk_full(self) -> DiskFullError:
        return DiskFullError(
            f"{self.target}: the disk is full; the partial file was removed. "
            "Free space or choose another output folder."
        )

    def _discard(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def write_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (temp name, fsync, rename)."""
    with AtomicWriter(target) as w:
        w.write(data, 0)


class DirLock:
    """An exclusive, non-blocking lock on an output folder (``.safeshard.lock`` inside it).

    The lock file is removed on release, while still locked. A process that opened the
    old file just before it was removed could then lock that orphaned file while a third
    process creates and locks a new one; so after locking, the lock is kept only if the
    path still names the very file locked (same device and inode), else it is tried again.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd = -1

    def _busy(self) -> OutputLockedError:
        return OutputLockedError(
            f"{self.folder}: another safeshard process is writing this folder; "
            "wait for it to finish or choose another output folder"
        )

    def __enter__(self) -> DirLock:
        for _ in range(100):
            fd = self._open()
            if self.acquire(fd):
                return self
        raise self._busy()  # pragma: no cover - the lock file kept vanishing under us

    def _open(self) -> int:
        """Open (or create) the lock file: never through a symlink (``O_NOFOLLOW``), never
        blocking on a FIFO (``O_NONBLOCK``), and only a regular file is kept."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise not_a_file(self.path, "a symbolic link", "lock file") from None
            raise write_error(self.path, "create the lock file", e) from None
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            os.close(fd)
            raise write_error(self.path, "check the lock file", e) from None
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise not_a_file(self.path, _kind(mode), "lock file")
        return fd

    def acquire(self, fd: int) -> bool:
        """Lock the open lock file ``fd``; True when held (``fd`` is then kept), False
        when ``fd`` was a stale, unlinked lock file (it is closed: open the path again).
        Raises :class:`OutputLockedError` when another process holds the lock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._busy() from None
            raise write_error(self.path, "lock", e) from None
        try:
            st, now = os.fstat(fd), os.stat(self.path, follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)  # closing drops the lock on the orphan
            return False
        self.fd = fd
        return True

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still locked: see the class docs
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def not_a_file(path: Path, kind: str, what: str) -> WriteError:
    """The error for a file safeshard keeps in an output folder (the lock, the journal)
    that something else has replaced: it is never followed, read or written."""
    return WriteError(
        f"{path}: is {kind}, not a {what} safeshard wrote; safeshard never follows or "
        f"reads it. Remove it (rm {os.fspath(path)!r}) and run again, and check who "
        "else can write this folder",
        filename=os.fspath(path),
        err=errno.EEXIST,
    )


def describe_file(path: Path) -> str:
    """What is at ``path`` (``lstat``: a link is a link), in words."""
    try:
        return _kind(os.lstat(path).st_mode)
    except OSError:
        return "not a regular file"


def stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files a killed safeshard left in ``folder``."""
    return sorted(folder.glob(TMP_PREFIX + "*"))


def free_bytes(folder: str | os.PathLike[str]) -> int | None:
    """Bytes an unprivileged writer may still use in ``folder``'s file system (None: unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def require_space(folder: Path, need: int, what: str) -> None:
    """Raise :class:`DiskFullError` before writing when ``need`` bytes clearly do not fit."""
    free = free_bytes(folder)
    if free is not None and need > free:
        raise DiskFullError(
            f"{folder}: {what} need {need} bytes ({format_size(need)}) but only {free} bytes "
            f"({format_size(free)}) are free; free space or choose another output folder"
        )


def unwritable(folder: Path, e: OSError) -> WriteError:
    """A clear error for an output folder that cannot be written (read-only, no permission)."""
    return write_error(folder, "write the output folder", e)
