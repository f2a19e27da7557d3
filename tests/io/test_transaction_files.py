"""Files safeshard reads or locks in OUT_DIR (the journal, the lock, the manifest) and the
small files it reads beside a checkpoint (the index): never through a symlink planted in
OUT_DIR, never blocking on a FIFO, never from a device, and never more than a bounded size.

Cases whose old behaviour was to hang or to fill memory run in a child process with a
time limit and an address-space limit, so that a regression fails the test instead of
the test run.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import safeshard
from safeshard.checkpoint import read_index
from safeshard.errors import ReadError, SafeshardError, WriteError
from safeshard.format.filenames import LOCK_NAME
from safeshard.io import localfs as fsio
from safeshard.io.localfs import MAX_SMALL_FILE, read_regular_file
from safeshard.io.transaction import JOURNAL_NAME, OutputFolder

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_isolated(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child limited to 1 GiB of address space and ``timeout`` seconds."""
    prelude = textwrap.dedent(
        """
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": SRC},
        check=False,
    )


def with_watchdog(fifo: Path, fn: Callable[[], object]) -> object:
    """Call ``fn`` in a thread; if it is still blocked after 10 s (opening ``fifo``),
    open the FIFO's other end to free it, and fail."""
    box: list[object] = []

    def call() -> None:
        try:
            box.append(fn())
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the reader's open returns now
        os.close(fd)
        t.join(10)
        pytest.fail(f"blocked on the FIFO {fifo.name}")
    return box[0]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# --------------------------------------------------------------------------- the journal


def test_a_journal_linked_to_dev_zero_is_refused_without_reading_it(out: Path) -> None:
    (out / JOURNAL_NAME).symlink_to("/dev/zero")
    proc = run_isolated(
        f"""
        from safeshard.io.transaction import OutputFolder
        try:
            with OutputFolder({str(out)!r}):
                print("ENTERED")
        except Exception as e:
            print(type(e).__name__, e)
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("WriteError"), proc.stdout
    assert "is a symbolic link, not a journal" in proc.stdout
    assert "Remove it" in proc.stdout


def test_a_journal_that_is_a_fifo_is_refused_without_blocking(out: Path) -> None:
    fifo = out / JOURNAL_NAME
    os.mkfifo(fifo)

    def enter() -> object:
        with OutputFolder(out):
            return "entered"

    got = with_watchdog(fifo, enter)
    assert isinstance(got, WriteError), got
    assert "is a FIFO, not a journal" in str(got)
    assert fifo.exists()  # reported, not removed behind the user's back


def test_a_journal_linked_to_a_file_outside_is_not_followed(out: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.json"
    victim.write_text('{"start": {"format": "safeshard-journal"}}\n')
    before = victim.read_bytes()
    (out / JOURNAL_NAME).symlink_to(victim)
    with pytest.raises(WriteError, match="is a symbolic link, not a journal") as e:
        OutputFolder(out).__enter__()
    assert e.value.errno == errno.EEXIST
    assert victim.read_bytes() == before
    assert (out / JOURNAL_NAME).is_symlink()
    assert not (out / LOCK_NAME).exists()  # the lock was released


def test_a_journal_larger_than_the_cap_is_refused_unread(out: Path) -> None:
    with open(out / JOURNAL_NAME, "wb") as f:
        f.truncate(MAX_SMALL_FILE + 1)  # sparse: no disk space used
    with pytest.raises(WriteError, match="larger than") as e:
        OutputFolder(out).__enter__()
    assert e.value.errno == errno.EFBIG
    assert "Remove it" in str(e.value)


# --------------------------------------------------------------------------- the lock


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dangling"])
def test_a_lock_that_is_not_a_regular_file_is_refused(out: Path, tmp_path: Path, kind: str) -> None:
    lock = out / LOCK_NAME
    victim = tmp_path / "victim"
    if kind == "symlink":
        victim.write_text("keep me")
        lock.symlink_to(victim)
    elif kind == "dangling":
        lock.symlink_to(victim)  # O_CREAT through it would create the victim
    else:
        os.mkfifo(lock)
    word = "a FIFO" if kind == "fifo" else "a symbolic link"
    with pytest.raises(WriteError, match=f"is {word}, not a lock file") as e:
        OutputFolder(out).__enter__()
    assert "Remove it" in str(e.value)
    if kind == "symlink":
        assert victim.read_text() == "keep me"
    if kind == "dangling":
        assert not victim.exists()


def test_a_split_into_a_folder_with_a_planted_lock_is_a_clear_cli_error(
    out: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from safeshard.cli import main
    from safeshard.ops.synth import synthesize

    src = synthesize(tmp_path / "src", "tiny-llama", layers=1, tokenizer=False)
    os.mkfifo(out / LOCK_NAME)
    res = CliRunner().invoke(main, ["split", str(src), str(out), "--max-shard-size", "200KB"])
    assert res.exit_code == 4, res.output
    assert "is a FIFO, not a lock file" in res.output
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------- the other files


def test_a_manifest_in_out_dir_is_never_read_through_a_symlink(out: Path, tmp_path: Path) -> None:
    from safeshard.ops.synth import synthesize

    src = synthesize(tmp_path / "src", "tiny-llama", layers=1, tokenizer=False)
    safeshard.split(src, out, max_shard_size="200KB")
    manifest = out / "model.safeshard.json"
    outside = tmp_path / "outside.json"
    outside.write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(outside)
    # the manifest a resume or an update would trust links to a file outside OUT_DIR
    from safeshard.ops.writer import read_manifest_quiet

    assert read_manifest_quiet(out, "model") is None
    with pytest.raises(SafeshardError, match="not a manifest"):
        safeshard.update(src, out)
    assert outside.read_bytes() == (tmp_path / "outside.json").read_bytes()


def test_an_index_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors.index.json"
    os.mkfifo(fifo)
    got = with_watchdog(fifo, lambda: read_index(fifo))
    assert isinstance(got, ReadError), got
    assert "not a regular file" in str(got)


def test_read_regular_file_refuses_links_fifos_devices_and_huge_files(tmp_path: Path) -> None:
    f = tmp_path / "f.json"
    f.write_text(json.dumps({"a": 1}))
    link = tmp_path / "link.json"
    link.symlink_to(f)
    assert read_regular_file(link) == f.read_bytes()  # beside a checkpoint: links followed
    with pytest.raises(OSError) as e:
        read_regular_file(link, follow_symlinks=False)
    assert e.value.errno == errno.ELOOP
    with pytest.raises(OSError) as e:
        read_regular_file("/dev/zero")
    assert e.value.errno == errno.EINVAL
    big = tmp_path / "big.json"
    with open(big, "wb") as h:
        h.truncate(101)
    with pytest.raises(OSError) as e:
        read_regular_file(big, limit=100)
    assert e.value.errno == errno.EFBIG
    assert read_regular_file(big, limit=101) == bytes(101)
    assert fsio.describe_file(link) == "a symbolic link"
