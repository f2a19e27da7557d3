"""Crash safety: a split killed at any point leaves OUT_DIR absent, resumable or complete.

Never an index that points at a missing or short shard; ``--resume`` finishes the job;
the source is untouched. Deterministic kill points use the output transaction's
``on_step`` hook (the child process SIGKILLs itself at a named step); timer kills and
Ctrl-C hit wherever the copy happens to be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import safeshard
from helpers.splitkit import llama, run_killed, sha256, write_custom
from safeshard.checkpoint import read_header, read_index
from safeshard.errors import HeaderError
from safeshard.format.filenames import TMP_PREFIX
from safeshard.format.header import TensorSpec, build_header
from safeshard.io.bytesrc import LocalFile
from safeshard.io.copier import digest_file
from safeshard.io.transaction import JOURNAL_NAME

CAP = 9_000
SPLIT = (
    "import sys, safeshard; "
    "safeshard.split(sys.argv[1], sys.argv[2], max_shard_size=int(sys.argv[3]))"
)


def run_split(
    src: Path, out: Path, cap: int, crash: str | None
) -> subprocess.CompletedProcess[str]:
    """Split in a child process killed at step ``crash`` (see outdir.STEPS)."""
    if crash is None:
        return subprocess.run(
            [sys.executable, "-c", SPLIT, str(src), str(out), str(cap)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    return run_killed("split", crash, src, out, max_shard_size=cap)  # type: ignore[no-any-return]


def shard(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def state_of(out: Path) -> str:
    """``absent``, ``resumable`` or ``complete``; fails on anything else."""
    if not out.exists():
        return "absent"
    names = {p.name for p in out.iterdir()}
    for name in names:
        if name.endswith(".safetensors"):
            try:
                read_header(out / name)  # complete files only: no short shard under its name
            except HeaderError as e:
                pytest.fail(f"a partial shard is visible under its final name: {e}")
    index = out / "model.safetensors.index.json"
    if index.exists():
        idx = read_index(index)
        for shard in idx.shard_files():
            assert (out / shard).is_file(), f"index points at missing {shard}"
            h = read_header(out / shard)
            listed = {t for t, f in idx.weight_map.items() if f == shard}
            assert {t.name for t in h.tensors} == listed
        assert "model.safeshard.json" in names, "the index is written after the manifest"
        return "complete"
    shards = [n for n in names if n.endswith(".safetensors")]
    if not shards:
        return "absent"
    if shards == ["model.safetensors"] and "model.safeshard.json" in names:
        return "complete"
    assert JOURNAL_NAME in names, f"shards without an index or a journal: {sorted(names)}"
    return "resumable"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_custom(
        tmp_path / "src" / "model.safetensors",
        llama(layers=6),
        {"format": "pt"},
        key_order=sorted(llama(layers=6)),
        indent=1,
    )


def finish_and_check(source: Path, out: Path, cap: int, digest: str) -> list[str]:
    r = safeshard.split(source, out, max_shard_size=cap, resume=True)
    assert state_of(out) == "complete"
    assert not list(out.glob(TMP_PREFIX + "*")) and not (out / JOURNAL_NAME).exists()
    merged = out.parent / "merged.safetensors"
    safeshard.merge(out, merged, force=True)
    assert sha256(merged) == digest
    assert sha256(source) == digest
    return r.kept


@pytest.mark.parametrize(
    "point, expected, kept",
    [
        ("writing:0", {"absent", "resumable"}, 0),
        ("written:0", {"resumable"}, 0),
        ("journaled:0", {"resumable"}, 1),
        ("writing:2", {"resumable"}, 2),
        ("journaled:2", {"resumable"}, 3),
        ("committing", {"resumable"}, -1),
        ("moved:model.safeshard.json", {"resumable"}, -1),
    ],
)
def test_kill_at_each_point_then_resume(
    source: Path, tmp_path: Path, point: str, expected: set[str], kept: int
) -> None:
    digest = sha256(source)
    out = tmp_path / "out"
    n = len(safeshard.split(source, out, max_shard_size=CAP, dry_run=True).files)
    assert n >= 4
    step, _, k = point.partition(":")
    if k.isdigit():
        point = f"{step}:{shard(int(k), n)}"
    proc = run_split(source, out, CAP, point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert state_of(out) in expected
    assert sha256(source) == digest
    got = finish_and_check(source, out, CAP, digest)
    assert len(got) == (n if kept == -1 else kept)


@pytest.mark.parametrize(
    "point", ["writing:model.safetensors", "journaled:model.safetensors", "committing"]
)
def test_single_file_output_killed(source: Path, tmp_path: Path, point: str) -> None:
    digest = sha256(source)
    out = tmp_path / "out"
    proc = run_split(source, out, 10**9, point)
    assert proc.returncode == -signal.SIGKILL
    st = state_of(out)
    assert st in {"absent", "resumable"}
    finish_and_check(source, out, 10**9, digest)


def test_kill_then_plain_rerun_is_refused_then_resumed(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    n = len(safeshard.split(source, out, max_shard_size=CAP, dry_run=True).files)
    run_split(source, out, CAP, f"journaled:{shard(1, n)}")
    with pytest.raises(safeshard.OutputExistsError, match="--resume"):
        safeshard.split(source, out, max_shard_size=CAP)
    assert finish_and_check(source, out, CAP, sha256(source))


def test_kill_then_force_starts_over(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    n = len(safeshard.split(source, out, max_shard_size=CAP, dry_run=True).files)
    run_split(source, out, CAP, f"journaled:{shard(1, n)}")
    r = safeshard.split(source, out, max_shard_size=CAP, force=True)
    assert not r.kept and state_of(out) == "complete"


def big_source(folder: Path, layers: int = 8, mib_per_layer: int = 24) -> Path:
    """A sparse ~200 MB source: cheap to make, long enough to be killed mid-copy."""
    n = mib_per_layer * 1024 * 1024 // 2
    specs = [TensorSpec("model.embed_tokens.weight", "F16", (1024, 64), 1024 * 64 * 2)]
    for i in range(layers):
        specs.append(TensorSpec(f"model.layers.{i}.mlp.up_proj.weight", "F16", (n,), 2 * n))
    header = build_header(specs, {"format": "pt"})
    folder.mkdir(parents=True)
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        # a few real bytes per tensor so that misplaced data would show in the merge
        pos = len(header)
        for s in specs:
            f.seek(pos)
            f.write(s.name.encode() * 3)
            pos += s.nbytes
        f.truncate(pos)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.25, 0.6, 1.0, 1.6])
def test_timer_kill_anywhere(tmp_path: Path, delay: float) -> None:
    src = big_source(tmp_path / "src")
    digest = sha256(src)
    out = tmp_path / "out"
    cap = 60 * 1024 * 1024
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", SPLIT, str(src), str(out), str(cap)], env=env)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state_of(out) in {"absent", "resumable", "complete"}
    finish_and_check(src, out, cap, digest)


@pytest.mark.slow
def test_ctrl_c_leaves_no_partial_file(tmp_path: Path) -> None:
    src = big_source(tmp_path / "src")
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "safeshard", "split", str(src), str(out), "-s", str(60 * 2**20)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while not list(out.glob(TMP_PREFIX + "*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 130:
        assert "interrupted" in err
        assert not list(out.glob(TMP_PREFIX + "*"))
        assert not (out / ".safeshard.lock").exists()
    assert state_of(out) in {"absent", "resumable", "complete"}
    finish_and_check(src, out, 60 * 2**20, sha256(src))


def test_journal_records_each_finished_shard(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    n = len(safeshard.split(source, out, max_shard_size=CAP, dry_run=True).files)
    run_split(source, out, CAP, f"journaled:{shard(1, n)}")
    lines = [json.loads(x) for x in (out / JOURNAL_NAME).read_text().splitlines()]
    assert lines[0]["start"]["format"] == "safeshard-journal"
    assert lines[0]["start"]["kind"] == "split"
    files = dict(x["file"] for x in lines[1:])
    assert sorted(files) == [shard(0, n), shard(1, n)]
    for name, rec in files.items():
        with LocalFile.open(out / name) as src:
            got = digest_file(src)
        assert (got.header, got.tensors) == (rec["header"], rec["tensors"])
