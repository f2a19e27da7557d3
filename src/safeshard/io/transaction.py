"""One output transaction for every writer (split, update, merge): crash safety in one place.

An :class:`OutputFolder` owns a folder while a writer changes it::

    with OutputFolder(out, on_step=hook) as tx:    # lock, recover, clear temporaries
        tx.start("split", fingerprint, keep=kept)  # the journal of this run
        tx.remove(old_files)                       # indexes, then manifests, then the rest
        tx.write(name, fill)                       # temp, fill, fsync, rename: whole or absent
        tmp, _ = tx.stage(name, fill)              # temp name kept until the commit
        tx.commit([(tmp, name)], gone, finals={"model.safeshard.json": data, ...})

1. **Lock.** Entering takes an exclusive lock on ``.safeshard.lock`` in the folder
   (:class:`safeshard.io.localfs.DirLock`): a second writer gets :class:`OutputLockedError`.
2. **Recover.** A journal (``.safeshard-journal.json``) left by a killed run is read. If it
   holds a *commit record*, the commit was decided and is rolled forward now (whatever the
   command), so a folder is never left half-committed. Otherwise temporaries the journal
   names are kept for :meth:`resumable`; every other temporary (``.safeshard-tmp-*``) is
   removed.
3. **Write.** :meth:`write` makes a file under a temporary name, fsyncs it and renames it
   over its final name; :meth:`stage` leaves it under the temporary name for the commit.
   Each finished file is appended to the journal with its size and hashes, so a killed run
   can be resumed. Temporary files are created with ``O_EXCL | O_NOFOLLOW``: a symlink
   planted in the folder is never followed.
4. **Commit.** :meth:`commit` writes the commit record (the ordered list of removals and
   renames), fsyncs it, then: removes the old index, then the old manifest; renames the
   staged files into place; removes the files the new checkpoint no longer has; renames
   the new manifest and, last, the new index into place; deletes the journal. A folder with
   an index is therefore always complete. Manifest and index are written only when their
   bytes change.

Crash points for tests are a hook passed in (``on_step``), called with the name of each
step as it is reached (see :data:`STEPS`); product code never reads the environment for
them. Nothing here reads or writes outside the folder: every name is a plain file name.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from safeshard.errors import (
    OutputExistsError,
    StorageError,
    UpdateError,
    WriteError,
    write_error,
)
from safeshard.format.filenames import (
    JOURNAL_NAME,
    STAGE_PREFIX,
    TMP_PREFIX,
    is_plain_name,
    temp_name,
)
from safeshard.io.bytesrc import ByteSource, Extent, LocalSink, Sink, copy_source
from safeshard.io.copier import Hashes
from safeshard.io.journal import (
    STEPS,
    FileRecord,
    Journal,
    StepHook,
    commit_plan,
    journal_line,
    removal_order,
)
from safeshard.io.localfs import (
    MAX_SMALL_FILE,
    DirLock,
    copy_range,
    create_temporary,
    describe_file,
    fsync_dir,
    not_a_file,
    open_regular,
    read_regular_file,
)
from safeshard.sizes import format_size

__all__ = [
    "JOURNAL_NAME",
    "STAGE_PREFIX",
    "STEPS",
    "TMP_PREFIX",
    "FileRecord",
    "OutputFolder",
    "OutputStore",
    "StepHook",
    "prepare_folder",
]

T = TypeVar("T")


# --------------------------------------------------------------------------- the interface


class OutputStore(Protocol):
    """What a writer needs of an output transaction: :class:`OutputFolder` (a local
    folder) and :class:`safeshard.io.remote.RemoteFolder` (a prefix in object storage)."""

    folder: Any
    recovered: list[str]

    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: Any) -> None: ...
    def path(self, name: str) -> Any: ...
    @property
    def earlier_run(self) -> str | None: ...
    def resumable(self, kind: str, fingerprint: str) -> dict[str, FileRecord]: ...
    def start(
        self, kind: str, fingerprint: str, keep: Mapping[str, FileRecord] | None = None
    ) -> None: ...
    def record(self, name: str, rec: FileRecord) -> None: ...
    def checkpoint_files(self, suffixes: Sequence[str]) -> list[str]: ...
    def exists(self, name: str) -> bool: ...
    def read(self, name: str) -> bytes | None: ...
    def remove(self, names: Iterable[str]) -> list[str]: ...
    def write(self, name: str, fill: Callable[[Sink], T], *, size: int | None = None) -> T: ...
    def write_bytes(self, name: str, data: bytes) -> None: ...
    def copy_in(self, source: ByteSource, name: str) -> None: ...
    def stage(
        self, name: str, fill: Callable[[Sink], T], *, size: int | None = None
    ) -> tuple[str, T]: ...
    def stage_link(self, old: str, name: str) -> str: ...
    def server_copy(
        self,
        name: str,
        header: bytes,
        pieces: Sequence[Extent],
        *,
        stage: bool = False,
        sha256: bool = False,
        progress: Any = None,
    ) -> tuple[str | None, Hashes, str | None] | None: ...
    def commit(
        self,
        moves: Sequence[tuple[str, str]] = (),
        remove: Sequence[str] = (),
        *,
        finals: Mapping[str, bytes | None] | None = None,
    ) -> None: ...


# --------------------------------------------------------------------------- the folder


def prepare_folder(out: Path) -> None:
    """Create ``out`` (and its parents) for writing; clear errors when it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputExistsError(
            f"{out}: exists and is not a folder; choose a folder for the output"
        ) from None
    except OSError as e:
        raise write_error(out, "create the output folder", e) from None


class OutputFolder:
    """The output transaction over one local folder; see the module docs."""

    def __init__(self, folder: str | os.PathLike[str], *, on_step: StepHook | None = None) -> None:
        self.folder = Path(folder)
        self.on_step = on_step
        self.recovered: list[str] = []
        """What entering did to a killed run's leftovers (for the caller's notes)."""
        self._lock = DirLock(self.folder)
        self._journal: Journal | None = None
        self._found: Journal | None = None
        self._fd = -1
        self._mine: set[str] = set()  # temporaries this run created and has not moved
        self._committing = False

    # ------------------------------------------------------------------ lifetime

    def __enter__(self) -> OutputFolder:
        self._lock.__enter__()
        try:
            self.step("locked")
            self._recover()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None and not self._committing:
                # (once the commit record is written, the next writer rolls it forward)
                # files this run left under temporary names are useless without it;
                # finished files stay for --resume, vouched for by the journal (which
                # goes too when it vouches for nothing left)
                self._unlink(list(self._mine))
                j = self._journal
                if j is not None and not any(
                    self.exists(r.staged or n) for n, r in j.files.items()
                ):
                    self._close_journal()
                    self._unlink([JOURNAL_NAME])
        finally:
            self._close_journal()
            self._lock.__exit__(None, None, None)

    def step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    def path(self, name: str) -> Path:
        if not is_plain_name(name):
            raise ValueError(f"not a plain file name: {name!r}")
        return self.folder / name

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        jpath = self.folder / JOURNAL_NAME
        try:
            data = read_regular_file(jpath, follow_symlinks=False, limit=MAX_SMALL_FILE)
        except FileNotFoundError:
            data = None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EINVAL):
                raise not_a_file(jpath, describe_file(jpath), "journal") from None
            if e.errno == errno.EFBIG:
                raise WriteError(
                    f"{jpath}: is larger than {MAX_SMALL_FILE} bytes "
                    f"({format_size(MAX_SMALL_FILE)}), more than any journal safeshard "
                    f"writes, so it is not read. Remove it (rm {os.fspath(jpath)!r}) and run "
                    "again",
                    filename=os.fspath(jpath),
                    err=errno.EFBIG,
                ) from None
            raise write_error(jpath, "read the journal of an earlier run", e) from None
        found = Journal.parse(data) if data is not None else None
        if data is not None and found is None:
            self.recovered.append("ignored an unreadable journal of an earlier run")
        if found is not None and found.commit is not None:
            self._apply(found.commit, replay=True)
            self._unlink([JOURNAL_NAME])
            fsync_dir(self.folder)
            self.recovered.append(
                "finished the commit of an earlier run that was interrupted "
                f"({found.kind}); its files are now in place"
            )
            found = None
        keep = {r.staged for r in found.files.values() if r.staged} if found else set()
        stale = [p.name for p in self.folder.glob(TMP_PREFIX + "*") if p.name not in keep]
        self._unlink(stale)
        if found is None and data is not None:
            self._unlink([JOURNAL_NAME])
        self._found = found

    def resumable(self, kind: str, fingerprint: str) -> dict[str, FileRecord]:
        """Files an earlier, interrupted run of the same work finished (journal records
        whose fingerprint matches), to be checked by the caller before they are kept."""
        found = self._found
        if found is None or found.kind != kind or found.fingerprint != fingerprint:
            return {}
        return dict(found.files)

    @property
    def earlier_run(self) -> str | None:
        """The kind of the interrupted run whose journal is here, if any."""
        return self._found.kind if self._found is not None else None

    # ------------------------------------------------------------------ journal

    def start(
        self, kind: str, fingerprint: str, keep: Mapping[str, FileRecord] | None = None
    ) -> None:
        """Begin this run's journal; ``keep`` carries over files the caller checked.

        Staged files of an earlier run that are not kept are removed.
        """
        keep = dict(keep or {})
        old = self._found
        if old is not None:
            dropped = [
                r.staged
                for n, r in old.files.items()
                if r.staged and (n not in keep or keep[n].staged != r.staged)
            ]
            self._unlink(dropped)
        self._found = None
        self._journal = Journal(kind, fingerprint, keep)
        self._write_now(JOURNAL_NAME, self._journal.encode())
        self._fd = self._open_append(self.folder / JOURNAL_NAME)
        self.step("started")

    def _open_append(self, path: Path) -> int:
        try:
            return open_regular(path, os.O_WRONLY | os.O_APPEND, follow_symlinks=False)
        except OSError as e:
            raise write_error(path, "open the journal", e) from None

    def _append(self, obj: Any) -> None:
        if self._fd < 0:
            raise RuntimeError("OutputFolder.start() must come first")
        data = journal_line(obj)
        try:
            done = 0
            while done < len(data):
                done += os.write(self._fd, data[done:])
            os.fsync(self._fd)
        except OSError as e:
            raise write_error(self.folder / JOURNAL_NAME, "append to the journal", e) from None

    def record(self, name: str, rec: FileRecord) -> None:
        """Note in the journal that ``name`` is finished (``rec.staged``: waiting for commit)."""
        if self._journal is None:  # start() opens the journal before any file is written
            raise WriteError(f"{self.folder}: {name} was finished before the run was started")
        self._journal.files[name] = rec
        self._append({"file": [name, rec.to_json()]})
        self.step(f"journaled:{name}")

    # ------------------------------------------------------------------ files

    def checkpoint_files(self, suffixes: Sequence[str]) -> list[str]:
        """Names of regular files (or symlinks) in the folder ending in one of ``suffixes``."""
        out = []
        try:
            entries = list(os.scandir(self.folder))
        except OSError as e:
            raise write_error(self.folder, "list the output folder", e) from None
        for entry in entries:
            if entry.name.endswith(tuple(suffixes)) and not entry.is_dir(follow_symlinks=False):
                out.append(entry.name)
        return sorted(out)

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path(name))

    def read(self, name: str) -> bytes | None:
        """The bytes of ``name`` (None if absent, a symlink, not a regular file, larger
        than :data:`~safeshard.io.localfs.MAX_SMALL_FILE`, or unreadable)."""
        try:
            return read_regular_file(self.path(name), follow_symlinks=False)
        except OSError:
            return None

    def remove(self, names: Iterable[str]) -> list[str]:
        """Remove ``names`` now: indexes first, then manifests, then the rest. Returns
        those that existed."""
        order = removal_order(names)
        gone = [n for n in order if self.exists(n)]
        self._unlink(order)
        if gone:
            fsync_dir(self.folder)
            self.step("removed")
        return gone

    def _unlink(self, names: Iterable[str]) -> None:
        for n in names:
            try:
                os.unlink(self.path(n))
            except FileNotFoundError:
                pass
            except OSError as e:
                raise write_error(self.folder / n, "remove", e) from None
            self._mine.discard(n)

    def _create(self, tmp: str) -> int:
        path = self.path(tmp)
        try:
            fd = create_temporary(path)
        except OSError as e:
            raise write_error(path, "create", e) from None
        self._mine.add(tmp)
        return fd

    def _fill(self, name: str, tmp: str, fill: Callable[[Sink], T]) -> T:
        """Create ``tmp``, let ``fill`` write it through its descriptor, fsync and close it."""
        fd = self._create(tmp)
        try:
            self.step(f"writing:{name}")
            result = fill(LocalSink(fd, str(self.folder / name)))
            os.fsync(fd)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.close(fd)
            self._unlink([tmp])
            if isinstance(e, OSError) and not isinstance(e, StorageError):
                raise write_error(self.folder / name, "write", e) from e
            raise
        try:
            os.close(fd)
        except OSError as e:
            self._unlink([tmp])
            raise write_error(self.folder / name, "close", e) from e
        return result

    def _move(self, tmp: str, name: str) -> None:
        try:
            os.replace(self.path(tmp), self.path(name))
        except OSError as e:
            raise write_error(self.folder / name, "rename into place", e) from None
        self._mine.discard(tmp)

    def write(self, name: str, fill: Callable[[Sink], T], *, size: int | None = None) -> T:
        """Write ``name`` atomically: ``fill(fd)`` writes a temporary file, which is fsynced
        and renamed over ``name``. On any error the temporary file is removed."""
        tmp = temp_name(name)
        result = self._fill(name, tmp, fill)
        self._move(tmp, name)
        fsync_dir(self.folder)
        self.step(f"written:{name}")
        return result

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write(name, lambda sink: sink.write(data))

    def copy_in(self, source: ByteSource, name: str) -> None:
        """Copy all of ``source`` (a file outside the folder, local or in object storage)
        to ``name`` atomically: by the kernel where it has a descriptor, else streamed
        through a bounded buffer."""
        fd = source.fileno()
        if fd is None:  # an object in storage
            self.write(name, lambda sink: copy_source(source, sink), size=source.size)
            return
        self.write(name, lambda sink: _copy_whole(fd, sink, source.size))

    def stage(
        self, name: str, fill: Callable[[Sink], T], *, size: int | None = None
    ) -> tuple[str, T]:
        """Write ``name``'s new bytes under a temporary name that waits for :meth:`commit`.

        Returns the temporary name and what ``fill`` returned."""
        tmp = temp_name(name, stage=True)
        result = self._fill(name, tmp, fill)
        self.step(f"staged:{name}")
        return tmp, result

    def stage_link(self, old: str, name: str) -> str:
        """Stage ``old``'s bytes to become ``name`` (a hard link; a copy where links fail)."""
        tmp = temp_name(name, stage=True)
        self._unlink([tmp])
        try:
            os.link(self.path(old), self.path(tmp), follow_symlinks=False)
            self._mine.add(tmp)
        except OSError:
            src = self.path(old)
            try:
                sfd = open_regular(src, follow_symlinks=False)
            except OSError as e:
                raise write_error(src, "open to copy", e) from None
            try:
                size = os.fstat(sfd).st_size
                self._fill(name, tmp, lambda sink: _copy_whole(sfd, sink, size))
            finally:
                os.close(sfd)
        self.step(f"staged:{name}")
        return tmp

    def server_copy(
        self,
        name: str,
        header: bytes,
        pieces: Sequence[Extent],
        *,
        stage: bool = False,
        sha256: bool = False,
        progress: Any = None,
    ) -> None:
        """Never: a local folder's files are written by :func:`~safeshard.io.copier.copy_pieces`
        (``copy_file_range`` already copies in the kernel)."""
        return None

    # ------------------------------------------------------------------ commit

    def commit(
        self,
        moves: Sequence[tuple[str, str]] = (),
        remove: Sequence[str] = (),
        *,
        finals: Mapping[str, bytes | None] | None = None,
    ) -> None:
        """Put the staged files in place; see the module docs.

        ``moves``: ``(temporary name, final name)`` of staged files. ``remove``: files the
        new checkpoint no longer has. ``finals``: the small files that describe the
        checkpoint, in the order they are written last (the manifest, then the index);
        None means the new checkpoint has no such file. When any shard moves or goes,
        the existing finals are removed first (the index before the manifest) so that
        no index ever lists a file being replaced; otherwise a final is rewritten only
        when its bytes change.
        """
        plan = commit_plan(moves, remove, dict(finals or {}), exists=self.exists, current=self.read)
        ops: list[tuple[str, ...]] = []
        for step in plan:
            if step.op == "put":  # a final: staged now, renamed in its turn
                tmp, _ = self.stage(step.name, lambda sink, d=step.data: sink.write(d))  # type: ignore[misc]
                ops.append(("mv", tmp, step.name))
            elif step.op == "mv":
                ops.append(("mv", step.tmp, step.name))
            else:
                ops.append(("rm", step.name))
        if ops:
            self._append({"commit": [list(op) for op in ops]})
            self._committing = True
            self.step("committing")
            self._apply(ops, replay=False)
        self._finish()

    def _apply(self, ops: Sequence[tuple[str, ...]], *, replay: bool) -> None:
        """Run commit operations in order. On replay, start after the last rename already
        done (its temporary name is gone), since every rename source is a unique temporary."""
        start = 0
        if replay:
            for i, op in enumerate(ops):
                if op[0] == "mv" and not self.exists(op[1]) and self.exists(op[2]):
                    start = i + 1
        synced = False
        for op in ops[start:]:
            if op[0] == "rm":
                if self.exists(op[1]):
                    self._unlink([op[1]])
                    synced = False
                continue
            tmp, name = op[1], op[2]
            if not synced:
                fsync_dir(self.folder)  # removals are durable before anything replaces them
                synced = True
            if not self.exists(tmp):
                raise UpdateError(
                    f"{self.folder}: the journal of an interrupted run names {tmp}, which is "
                    "gone; the folder cannot be finished. Write it again with --force"
                )
            self._move(tmp, name)
            self.step(f"moved:{name}")
        fsync_dir(self.folder)

    def _close_journal(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def _finish(self) -> None:
        self._close_journal()
        self._unlink([JOURNAL_NAME])
        fsync_dir(self.folder)
        self._journal = None
        self._committing = False
        self.step("committed")

    def _write_now(self, name: str, data: bytes) -> None:
        """Replace ``name`` atomically with ``data`` (no step reported)."""
        tmp = temp_name(name)
        fd = self._create(tmp)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.close(fd)
            self._unlink([tmp])
            raise write_error(self.folder / name, "write", e) from None
        os.close(fd)
        self._move(tmp, name)
        fsync_dir(self.folder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], done)


def _copy_whole(src_fd: int, sink: Sink, size: int) -> None:
    """Copy a whole ``size``-byte file into a local sink."""
    fd = sink.fileno()
    if fd is None:  # only called for local sinks
        raise WriteError("a whole-file copy needs a local file to write to")
    if size:
        copy_range(src_fd, fd, 0, size, 0)
    sink.wrote(size)
