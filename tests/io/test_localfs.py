"""fsio: atomic writes leave either the complete target or nothing; copies are exact."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from safeshard.errors import DiskFullError, OutputLockedError
from safeshard.format import filenames
from safeshard.io import localfs as fsio


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(filenames.TMP_PREFIX))


def test_atomic_write_appears_complete_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with fsio.AtomicWriter(target) as w:
        w.write(b"new bytes", 0)
        assert target.read_bytes() == b"old"  # not visible until the rename
    assert target.read_bytes() == b"new bytes"
    assert leftovers(tmp_path) == []


def test_error_in_block_keeps_the_old_target_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), fsio.AtomicWriter(target) as w:
        w.write(b"partial", 0)
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.EIO, "I/O error")])
def test_interrupt_or_error_during_fsync_removes_the_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    target = tmp_path / "f.bin"

    def fail(fd: int) -> None:
        raise exc

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(type(exc)), fsio.AtomicWriter(target) as w:
        w.write(b"data", 0)
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_full_disk_during_fsync_is_disk_full_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with (
        pytest.raises(DiskFullError, match="disk is full") as e,
        fsio.AtomicWriter(tmp_path / "f.bin") as w,
    ):
        w.write(b"data", 0)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert str(tmp_path / "f.bin") in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_range_is_exact_with_and_without_copy_file_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    data = os.urandom(3 * fsio.CHUNK + 12345)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    if not kernel_copy:
        monkeypatch.setattr(fsio, "_HAS_CFR", False)
    dst = tmp_path / "dst.bin"
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(dfd, b"HEAD", 0)
        fsio.copy_range(sfd, dfd, 7, len(data) - 7, 4)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert dst.read_bytes() == b"HEAD" + data[7:]


def test_copy_range_past_the_end_of_the_source_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError, match="ended early"):
            fsio.copy_range(sfd, dfd, 50, 100, 0)
    finally:
        os.close(sfd)
        os.close(dfd)


def test_second_writer_of_a_folder_is_refused(tmp_path: Path) -> None:
    with (
        fsio.DirLock(tmp_path),
        pytest.raises(OutputLockedError, match="another safeshard process"),
    ):
        fsio.DirLock(tmp_path).__enter__()
    with fsio.DirLock(tmp_path):  # released: a later writer gets it
        pass
    assert not (tmp_path / filenames.LOCK_NAME).exists()


def test_a_stale_lock_file_opened_before_its_removal_does_not_grant_the_lock(
    tmp_path: Path,
) -> None:
    """The race of a lock file removed on release: B opened it, A released (and removed
    it), C created and locked a new one; B's lock on the orphan must not count."""
    a = fsio.DirLock(tmp_path).__enter__()
    stale_fd = os.open(tmp_path / filenames.LOCK_NAME, os.O_RDWR)  # B opens the old file
    a.__exit__(None, None, None)  # A removes it and unlocks
    c = fsio.DirLock(tmp_path).__enter__()  # C creates and locks a new file
    b = fsio.DirLock(tmp_path)
    assert b.acquire(stale_fd) is False  # B locks the orphan, sees it is stale
    with pytest.raises(OutputLockedError):
        b.__enter__()  # and on the real path it finds C's lock
    c.__exit__(None, None, None)
    with fsio.DirLock(tmp_path):
        pass


def test_a_failed_copy_file_range_falls_back_for_that_copy_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range here")
    data = os.urandom(100_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    real = os.copy_file_range
    calls = {"n": 0}

    def flaky(*args: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", flaky)
    for i in range(2):
        dst = tmp_path / f"dst{i}.bin"
        sfd = os.open(src, os.O_RDONLY)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fsio.copy_range(sfd, dfd, 0, len(data), 0)
        finally:
            os.close(sfd)
            os.close(dfd)
        assert dst.read_bytes() == data
    assert calls["n"] >= 2, "the second copy used copy_file_range again"
