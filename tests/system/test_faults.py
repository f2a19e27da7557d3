"""Faults: kill -9 anywhere, a full disk, a failing read. Nothing lost, nothing half-written.

Every trial checks the same promise: the source's bytes are unchanged, and the output is
absent, resumable, or complete and verifying; the next run finishes the job.

- kill -9 at spread points of split, merge and ``split --update``: each child is killed
  after a delay drawn across the duration of an unkilled run. ``make test`` runs a few
  trials each; ``SAFESHARD_FAULT_TRIALS=20 make faults`` runs at least 20 each.
- a full disk: a small tmpfs mounted as the output where the machine allows it (root),
  else ENOSPC injected at the write layer;
- a read error injected mid-copy.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import safeshard
from safeshard.checkpoint import read_header, read_index
from safeshard.errors import DiskFullError, HeaderError, ReadError
from safeshard.format.filenames import TMP_PREFIX
from safeshard.format.header import TensorSpec, build_header
from safeshard.io import localfs
from safeshard.io.transaction import JOURNAL_NAME

TRIALS = int(os.environ.get("SAFESHARD_FAULT_TRIALS", "3"))
MIB = 1024 * 1024


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def make_source(path: Path, layers: int, mib_per_layer: int, seed: int = 0) -> Path:
    """A real-bytes source: ``layers`` blocks of ``mib_per_layer`` MiB, random content."""
    rnd = random.Random(seed)
    n = mib_per_layer * MIB // 2
    specs = [TensorSpec("model.embed_tokens.weight", "F16", (256, 64), 256 * 64 * 2)]
    for i in range(layers):
        specs.append(TensorSpec(f"model.layers.{i}.mlp.up_proj.weight", "F16", (n,), 2 * n))
        specs.append(TensorSpec(f"model.layers.{i}.input_layernorm.weight", "F16", (64,), 128))
    specs.append(TensorSpec("lm_head.weight", "F16", (256, 64), 256 * 64 * 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(build_header(specs, {"format": "pt"}))
        for s in specs:
            f.write(rnd.randbytes(s.nbytes))
    return path


def state(out: Path, index_name: str = "model.safetensors.index.json") -> str:
    """``absent``, ``resumable`` or ``complete``; fails on a visible partial file."""
    if not out.exists():
        return "absent"
    names = {p.name for p in out.iterdir()}
    for name in names:
        if name.endswith(".safetensors"):
            try:
                read_header(out / name)
            except HeaderError as e:
                pytest.fail(f"a partial file is visible under its final name: {e}")
    if index_name in names:
        idx = read_index(out / index_name)
        for shard in idx.shard_files():
            assert (out / shard).is_file(), f"the index lists a missing {shard}"
        assert safeshard.verify(out).ok
        return "complete"
    if not any(n.endswith(".safetensors") for n in names):
        return "absent"
    assert JOURNAL_NAME in names, f"shards without an index or a journal: {sorted(names)}"
    return "resumable"


def run_timed(code: str, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True, timeout=300)
    return time.perf_counter() - t0


def kill_after(code: str, delay: float, *args: str) -> int:
    proc = subprocess.Popen([sys.executable, "-c", code, *args])
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


SPLIT = (
    "import sys, safeshard; "
    "safeshard.split(sys.argv[1], sys.argv[2], max_shard_size=int(sys.argv[3]))"
)
MERGE = "import sys, safeshard; safeshard.merge(sys.argv[1], sys.argv[2], force=True)"
UPDATE = "import sys, safeshard; safeshard.update(sys.argv[1], sys.argv[2])"
CAP = 20 * MIB


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sources")
    old = make_source(base / "old" / "model.safetensors", layers=6, mib_per_layer=8, seed=1)
    new = make_source(base / "new" / "model.safetensors", layers=6, mib_per_layer=8, seed=1)
    # the new version: layer 3 retrained
    h = read_header(new)
    t = h.by_name["model.layers.3.mlp.up_proj.weight"]
    with open(new, "r+b") as f:
        f.seek(h.data_start + t.begin)
        f.write(random.Random(9).randbytes(t.nbytes))
    return old, new


def delays(duration: float) -> Iterator[float]:
    """Kill delays spread over the run: from process start-up to just past the end."""
    rnd = random.Random(1234)
    for i in range(TRIALS):
        yield duration * (i + rnd.random()) / TRIALS * 1.1


def test_split_killed_anywhere_is_resumed(sources: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = sources
    digest = sha(src)
    duration = run_timed(SPLIT, str(src), str(tmp_path / "probe"), str(CAP))
    for i, delay in enumerate(delays(duration)):
        out = tmp_path / f"out{i}"
        kill_after(SPLIT, delay, str(src), str(out), str(CAP))
        assert sha(src) == digest
        st = state(out)
        assert st in {"absent", "resumable", "complete"}
        safeshard.split(src, out, max_shard_size=CAP, resume=st != "absent")
        assert state(out) == "complete"
        assert safeshard.verify(out, against=src).ok
        assert not list(out.glob(TMP_PREFIX + "*"))


def test_merge_killed_anywhere_leaves_nothing_or_the_whole_file(
    sources: tuple[Path, Path], tmp_path: Path
) -> None:
    src, _ = sources
    digest = sha(src)
    shards = tmp_path / "shards"
    safeshard.split(src, shards, max_shard_size=CAP)
    before = {p.name: sha(p) for p in shards.iterdir() if p.is_file()}
    duration = run_timed(MERGE, str(shards), str(tmp_path / "probe.safetensors"))
    for i, delay in enumerate(delays(duration)):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        merged = folder / "merged.safetensors"
        kill_after(MERGE, delay, str(shards), str(merged))
        assert {p.name: sha(p) for p in shards.iterdir() if p.is_file()} == before
        if merged.exists():
            assert sha(merged) == digest  # never a partial file under the final name
        safeshard.merge(shards, merged, force=True)
        assert sha(merged) == digest
        assert not list(folder.glob(TMP_PREFIX + "*"))


def test_update_killed_anywhere_is_finished_by_the_next_run(
    sources: tuple[Path, Path], tmp_path: Path
) -> None:
    old, new = sources
    digest = sha(new)
    probe = tmp_path / "probe"
    safeshard.split(old, probe, max_shard_size=CAP)
    duration = run_timed(UPDATE, str(new), str(probe))
    for i, delay in enumerate(delays(duration)):
        out = tmp_path / f"out{i}"
        safeshard.split(old, out, max_shard_size=CAP)
        kill_after(UPDATE, delay, str(new), str(out))
        assert sha(new) == digest
        index = out / "model.safetensors.index.json"
        if index.exists():  # the old split, whole, or the new one, whole
            rep_old = safeshard.verify(out, against=old)
            rep_new = safeshard.verify(out, against=new)
            assert rep_old.codes <= {"stale-temp"} or rep_new.codes <= {"stale-temp"}
        safeshard.update(new, out)
        assert safeshard.verify(out, against=new).ok
        assert not list(out.glob(TMP_PREFIX + "*"))


# --------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_tmpfs(where: Path, size: int) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_split_onto_a_full_file_system(
    sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = sources
    digest = sha(src)
    with small_tmpfs(tmp_path / "small", 30 * MIB) as disk:
        out = disk / "out"
        # the space check up front cannot know what else fills the disk meanwhile
        monkeypatch.setattr(localfs, "free_bytes", lambda folder: None)
        with pytest.raises(DiskFullError, match="disk is full") as e:
            safeshard.split(src, out, max_shard_size=CAP)
        monkeypatch.undo()
        assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
        for p in out.iterdir() if out.exists() else []:
            assert not p.name.startswith(TMP_PREFIX), "a partial file was left behind"
            if p.name.endswith(".safetensors"):
                read_header(p)  # only whole shards under final names
        assert state(out) in {"absent", "resumable"}
    assert sha(src) == digest


def test_merge_onto_a_full_file_system(sources: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = sources
    shards = tmp_path / "shards"
    safeshard.split(src, shards, max_shard_size=CAP)
    with small_tmpfs(tmp_path / "small", 40 * MIB) as disk:
        real_free = localfs.free_bytes
        try:  # let the up-front check pass, so the disk fills mid-copy
            localfs.free_bytes = lambda folder: None
            with pytest.raises(DiskFullError, match="disk is full"):
                safeshard.merge(shards, disk / "merged.safetensors")
        finally:
            localfs.free_bytes = real_free
        # and with the check: refused before a byte is written
        with pytest.raises(DiskFullError, match="are free"):
            safeshard.merge(shards, disk / "merged.safetensors")
        assert sorted(p.name for p in disk.iterdir()) == []


# --------------------------------------------------------------------------- a failing read


def test_a_read_error_mid_copy_is_clear_and_leaves_no_partial_file(
    sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = sources
    digest = sha(src)
    out = tmp_path / "out"
    real_cfr, real_preadv = os.copy_file_range, os.preadv
    src_ino = os.stat(src).st_ino
    budget = {"bytes": 30 * MIB}

    def is_source(fd: int) -> bool:
        return os.fstat(fd).st_ino == src_ino

    def cfr(s: int, d: int, n: int, *rest: int) -> int:
        if is_source(s):
            budget["bytes"] -= n
            if budget["bytes"] < 0:
                raise OSError(errno.EIO, "Input/output error")
        return real_cfr(s, d, n, *rest)

    def preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
        if is_source(fd) and budget["bytes"] < 0:
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(os, "copy_file_range", cfr)
    monkeypatch.setattr(os, "preadv", preadv)
    with pytest.raises(ReadError, match=r"model\.safetensors") as e:
        safeshard.split(src, out, max_shard_size=CAP)
    assert e.value.errno == errno.EIO
    monkeypatch.undo()
    assert not list(out.glob(TMP_PREFIX + "*"))
    assert state(out) in {"absent", "resumable"}
    safeshard.split(src, out, max_shard_size=CAP, resume=True)
    assert state(out) == "complete" and sha(src) == digest
