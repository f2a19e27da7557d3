"""outdir: the one output transaction. Killed at every step, a folder is old or new, never mixed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import safeshard
from helpers.splitkit import llama, write_custom
from safeshard.errors import OutputLockedError
from safeshard.format.filenames import TMP_PREFIX
from safeshard.io.bytesrc import Sink
from safeshard.io.transaction import JOURNAL_NAME, STAGE_PREFIX, FileRecord, OutputFolder

OLD = {
    "a.safetensors": b"A" * 10,
    "b.safetensors": b"B" * 20,
    "m.safeshard.json": b'{"old": 1}',
    "m.safetensors.index.json": b'{"old index": 1}',
}
NEW = {
    "a.safetensors": b"A2" * 7,  # rewritten in place
    "c.safetensors": b"C" * 30,  # added
    "d.safetensors": b"A" * 10,  # the old a, renamed with the same bytes
    "m.safeshard.json": b'{"new": 1}',
    "m.safetensors.index.json": b'{"new index": 1}',
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".")
    }


def transaction(folder: Path, on_step: Callable[[str], None] | None = None) -> None:
    """Turn OLD into NEW the way update does: stage, link, commit."""
    with OutputFolder(folder, on_step=on_step) as tx:
        tx.start("test", "fp")
        moves = []
        for name in ("a.safetensors", "c.safetensors"):
            data = NEW[name]

            def fill(sink: Sink, d: bytes = data) -> None:
                sink.write(d)

            tmp, _ = tx.stage(name, fill)
            tx.record(name, FileRecord(len(data), "sha", staged=tmp))
            moves.append((tmp, name))
        moves.append((tx.stage_link("a.safetensors", "d.safetensors"), "d.safetensors"))
        tx.commit(
            moves,
            ["b.safetensors"],
            finals={
                "m.safeshard.json": NEW["m.safeshard.json"],
                "m.safetensors.index.json": NEW["m.safetensors.index.json"],
            },
        )


def steps_of(tmp_path: Path) -> list[str]:
    folder = tmp_path / "probe"
    folder.mkdir()
    for n, d in OLD.items():
        (folder / n).write_bytes(d)
    seen: list[str] = []
    transaction(folder, seen.append)
    assert snapshot(folder) == NEW
    return seen


def killed_at(folder: Path, step: str) -> None:
    """Run the transaction in a forked child that dies (no cleanup at all) at ``step``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child

        def die(s: str) -> None:
            if s == step:
                os._exit(9)

        try:
            transaction(folder, die)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9


def test_killed_at_every_step_the_folder_is_old_or_new_after_recovery(tmp_path: Path) -> None:
    steps = steps_of(tmp_path)
    assert "committing" in steps and steps[-1] == "committed"
    for i, step in enumerate(steps[:-1]):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        for n, d in OLD.items():
            (folder / n).write_bytes(d)
        killed_at(folder, step)
        committed = steps.index("committing") <= i
        if not committed:  # nothing visible changed before the commit record
            assert snapshot(folder) == OLD, step
        index = folder / "m.safetensors.index.json"
        if index.exists():  # an index present is the old one with the old files, or the new
            assert snapshot(folder) in (OLD, NEW), step
        with OutputFolder(folder) as tx:  # recovery: roll forward, or leave the old state
            tx.start("other", "x")
            tx.commit()
        assert snapshot(folder) == (NEW if committed else OLD), step
        assert sorted(p.name for p in folder.iterdir()) == sorted(NEW if committed else OLD), step


def test_replay_of_a_finished_commit_changes_nothing(tmp_path: Path) -> None:
    """A kill between the last rename and the journal's removal: the replay must not undo."""
    folder = tmp_path / "f"
    folder.mkdir()
    for n, d in OLD.items():
        (folder / n).write_bytes(d)
    killed_at(folder, "moved:m.safetensors.index.json")
    assert (folder / JOURNAL_NAME).exists()
    assert snapshot(folder) == NEW
    with OutputFolder(folder) as tx:
        assert any("interrupted" in r for r in tx.recovered)
    assert snapshot(folder) == NEW and not (folder / JOURNAL_NAME).exists()


def test_staged_files_of_a_killed_run_wait_for_resume_then_go(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    for n, d in OLD.items():
        (folder / n).write_bytes(d)
    killed_at(folder, "journaled:c.safetensors")
    (folder / (TMP_PREFIX + "junk.part")).write_bytes(b"x")
    with OutputFolder(folder) as tx:
        assert not (folder / (TMP_PREFIX + "junk.part")).exists()  # unvouched: removed
        vouched = tx.resumable("test", "fp")
        assert sorted(vouched) == ["a.safetensors", "c.safetensors"]
        assert all((folder / str(r.staged)).is_file() for r in vouched.values())
        assert tx.resumable("test", "other fingerprint") == {}
        tx.start("test", "other fingerprint")  # not kept: the staged files go
        assert not list(folder.glob(STAGE_PREFIX + "*"))
        tx.commit()
    assert snapshot(folder) == OLD


def test_a_hostile_journal_cannot_move_files_outside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    outside = tmp_path / "victim.txt"
    outside.write_text("keep me")
    (folder / (TMP_PREFIX + "x")).write_text("payload")
    lines = [
        {
            "start": {
                "format": "safeshard-journal",
                "version": 2,
                "kind": "split",
                "fingerprint": "f",
            }
        },
        {"commit": [["mv", TMP_PREFIX + "x", "../victim.txt"], ["rm", "../victim.txt"]]},
    ]
    (folder / JOURNAL_NAME).write_text("".join(json.dumps(x) + "\n" for x in lines))
    with OutputFolder(folder) as tx:
        assert any("unreadable journal" in r for r in tx.recovered)
    assert outside.read_text() == "keep me"
    assert not (folder / JOURNAL_NAME).exists()


def test_torn_last_journal_line_is_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    with OutputFolder(folder) as tx:
        tx.start("split", "fp")
        tx.write_bytes("a.safetensors", b"abc")
        tx.record("a.safetensors", FileRecord(3, "s"))
    with open(folder / JOURNAL_NAME, "ab") as f:
        f.write(b'{"file": ["b.safetensors", {"si')  # cut short by a kill
    with OutputFolder(folder) as tx:
        assert sorted(tx.resumable("split", "fp")) == ["a.safetensors"]


def test_second_writer_is_refused_while_a_transaction_is_open(tmp_path: Path) -> None:
    with OutputFolder(tmp_path), pytest.raises(OutputLockedError):
        OutputFolder(tmp_path).__enter__()


# --------------------------------------------------------------------------- through split


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_custom(tmp_path / "src" / "model.safetensors", llama(layers=2), {"format": "pt"})


@pytest.mark.parametrize("where", ["temporary", "final"])
def test_a_planted_symlink_is_never_written_through(
    source: Path, tmp_path: Path, where: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    name = "model.safetensors"
    link = out / (f"{TMP_PREFIX}{name}.part" if where == "temporary" else name)
    link.symlink_to(victim)
    safeshard.split(source, out, force=True)
    assert victim.read_bytes() == b"precious"
    assert (out / name).is_file() and not (out / name).is_symlink()


def test_output_files_get_normal_permissions(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        safeshard.split(source, out, max_shard_size=2_000)
    finally:
        os.umask(old)
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p.name


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_leaks_when_a_source_cannot_be_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    safeshard.split(
        write_custom(tmp_path / "one" / "model.safetensors", llama(layers=4), {"format": "pt"}),
        src,
        max_shard_size=3_000,
    )
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) >= 3
    real_open = os.open

    def failing(path: object, flags: int, *a: object, **k: object) -> int:
        if str(path) == str(shards[-1]):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)  # type: ignore[arg-type]

    before = open_fds()
    monkeypatch.setattr(os, "open", failing)
    for run in (
        lambda: safeshard.split(src, tmp_path / "out", max_shard_size=10**6),
        lambda: safeshard.merge(src, tmp_path / "merged.safetensors"),
    ):
        with pytest.raises(OSError):
            run()
        assert open_fds() == before


def test_an_error_during_the_commit_leaves_it_to_be_rolled_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    for n, d in OLD.items():
        (folder / n).write_bytes(d)

    def fail_at_index(step: str) -> None:
        if step == "moved:m.safeshard.json":
            raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        transaction(folder, fail_at_index)
    assert (folder / JOURNAL_NAME).exists()
    with OutputFolder(folder) as tx:
        assert any("interrupted" in r for r in tx.recovered)
    assert snapshot(folder) == NEW
