"""Resume and the lock on object storage, against moto's S3 server.

A split to S3 killed (SIGKILL) at points spread over the run is finished by a rerun with
``--resume``, which uploads again at most the shards the killed run had not finished;
the result verifies and merges back to the source's SHA-256. A second writer of one
prefix is refused; a lock whose process is gone, or broken with ``break_lock``, is taken.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import safeshard
from helpers.s3kit import S3, cli_options, random_model, sha, synth_tiny, weights
from helpers.splitkit import run_killed
from safeshard.errors import OutputExistsError, OutputLockedError
from safeshard.format.filenames import JOURNAL_NAME
from safeshard.io.journal import Journal
from safeshard.io.remote import DEFAULT_LIMITS, RemoteFolder, filesystem

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

tiny = pytest.fixture(scope="module", name="tiny")(synth_tiny)


@pytest.mark.slow
def test_a_reshard_copied_on_the_server_killed_midway_is_finished_by_resume(
    s3: S3, tmp_path: Path
) -> None:
    """S3 -> S3 in one store: each shard's bytes are copied by the server (UploadPartCopy).
    Killed after the first shard is copied but before it is journaled, and while the third
    is starting, a rerun with ``resume=True`` copies again exactly the shards that were not
    journaled, leaves no incomplete upload, and merges back to the source's SHA-256."""
    base, opts = s3
    src = random_model(tmp_path / "src", layers=6, mib=12)  # 3 shards of 24 MiB
    fs, root = filesystem(base, opts)
    fs.put_file(str(src), f"{root}/src/model.safetensors")
    cap = 26 * 1024 * 1024
    names = [
        f.file
        for f in safeshard.split(src, tmp_path / "plan", max_shard_size=cap, dry_run=True).files
    ]
    assert len(names) == 3
    for i, (point, done) in enumerate({f"written:{names[0]}": 0, f"writing:{names[2]}": 2}.items()):
        url = f"{base}/c{i}"
        killed = run_killed(
            "split", point, f"{base}/src", url, max_shard_size=cap, storage_options=opts
        )
        assert killed.returncode < 0, (point, killed.stderr[-2000:])
        steps: list[str] = []
        before = DEFAULT_LIMITS.copy_stats.requests
        r = safeshard.split(
            f"{base}/src",
            url,
            max_shard_size=cap,
            storage_options=opts,
            resume=True,
            on_step=steps.append,
        )
        uploaded = [s.split(":", 1)[1] for s in steps if s.startswith("writing:")]
        assert [n for n in uploaded if n.endswith(".safetensors")] == names[done:], point
        assert DEFAULT_LIMITS.copy_stats.requests - before >= len(names) - done  # copied
        assert [f.status for f in r.files] == ["kept"] * done + ["written"] * (len(names) - done)
        assert safeshard.verify(url, against=src, storage_options=opts).ok, point
        merged = tmp_path / f"merged{i}.safetensors"
        safeshard.merge(url, merged, storage_options=opts)
        assert sha(merged) == sha(src), point
        pending = fs.list_multipart_uploads(root.split("/")[0]) or []
        assert not [u for u in pending if f"/c{i}/" in "/" + u["Key"]], pending


@pytest.mark.slow
def test_a_split_to_s3_killed_anywhere_is_finished_by_resume(
    tiny: Path, s3: S3, tmp_path: Path
) -> None:
    base, opts = s3
    src = weights(tiny)
    cap = src.stat().st_size // 4
    names = [
        f.file
        for f in safeshard.split(src, tmp_path / "plan", max_shard_size=cap, dry_run=True).files
    ]
    assert len(names) >= 4
    # kill point -> the shards finished (journaled) before it: while the third is written,
    # the second may still be finishing in the background (its last parts, its completion)
    points = {
        f"written:{names[0]}": {0},
        f"writing:{names[2]}": {1, 2},
        "committing": {len(names)},
    }
    for i, (point, could) in enumerate(points.items()):
        url = f"{base}/r{i}"
        killed = run_killed("split", point, src, url, max_shard_size=cap, storage_options=opts)
        assert killed.returncode < 0, (point, killed.stderr[-2000:])
        done = len(journaled(url, opts))
        assert done in could, (point, done)
        assert journaled(url, opts) == set(names[:done]), point
        if done:  # issue 16.15: the rerun without --resume suggests it, and it works
            with pytest.raises(OutputExistsError, match="--resume"):
                safeshard.split(src, url, max_shard_size=cap, storage_options=opts)
        steps: list[str] = []
        r = safeshard.split(
            src, url, max_shard_size=cap, storage_options=opts, resume=True, on_step=steps.append
        )
        uploaded = [s.split(":", 1)[1] for s in steps if s.startswith("writing:")]
        shards = [n for n in uploaded if n.endswith(".safetensors")]
        assert shards == names[done:], point
        assert [f.status for f in r.files] == ["kept"] * done + ["written"] * (len(names) - done)
        assert safeshard.verify(url, against=src, storage_options=opts).ok, point
        merged = tmp_path / f"merged{i}.safetensors"
        safeshard.merge(url, merged, storage_options=opts)
        assert sha(merged) == sha(src), point
        fs, root = filesystem(url, opts)
        left = {p.rsplit("/", 1)[-1] for p in fs.ls(root, refresh=True)}
        assert not {".safeshard-journal.json", ".safeshard.lock"} & left, point


def journaled(url: str, opts: dict[str, Any]) -> set[str]:
    """The files a killed run's journal under ``url`` vouches for."""
    fs, root = filesystem(url, opts)
    data = fs.cat_file(f"{root}/{JOURNAL_NAME}")
    journal = Journal.parse(data)
    assert journal is not None
    return set(journal.files)


def test_a_second_writer_of_a_prefix_is_refused(tiny: Path, s3: S3) -> None:
    base, opts = s3
    url = f"{base}/locked"
    with RemoteFolder(url, storage_options=opts) as first:
        assert not any("conditional" in r for r in first.recovered)  # moto has them
        with pytest.raises(OutputLockedError, match="--break-lock"):
            safeshard.split(weights(tiny), url, storage_options=opts)
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            RemoteFolder(url, storage_options=opts).__enter__()
        with RemoteFolder(url, storage_options=opts, break_lock=True) as second:
            assert any("--break-lock" in r for r in second.recovered)
    fs, root = filesystem(url, opts)
    assert not fs.exists(f"{root}/.safeshard.lock")


def test_a_lock_whose_process_is_gone_is_taken_over(tiny: Path, s3: S3) -> None:
    base, opts = s3
    url = f"{base}/stale"
    killed = run_killed("split", "started", weights(tiny), url, storage_options=opts)
    assert killed.returncode < 0
    fs, root = filesystem(url, opts)
    assert fs.exists(f"{root}/.safeshard.lock")
    r = safeshard.split(weights(tiny), url, storage_options=opts, force=True)
    assert any("is gone" in n for n in r.notes), r.notes
    assert not fs.exists(f"{root}/.safeshard.lock")


def test_cli_a_second_writer_is_refused_and_break_lock_takes_over(tiny: Path, s3: S3) -> None:
    from click.testing import CliRunner

    from safeshard.cli import main

    base, opts = s3
    url = f"{base}/cli-locked"
    flags = cli_options(opts)
    runner = CliRunner()
    with RemoteFolder(url, storage_options=opts):
        res = runner.invoke(main, ["split", str(tiny), url, *flags])
        assert res.exit_code == 4, res.output
        assert "another safeshard process is writing this prefix" in res.output
        assert "--break-lock" in res.output
        res = runner.invoke(main, ["split", str(tiny), url, "--break-lock", *flags])
        assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_an_update_on_s3_killed_after_staging_is_resumed(
    tiny: Path, s3: S3, tmp_path: Path
) -> None:
    from safeshard.checkpoint import read_header

    base, opts = s3
    url = f"{base}/u"
    cap = weights(tiny).stat().st_size // 4
    safeshard.split(tiny, url, max_shard_size=cap, storage_options=opts)
    new = tmp_path / "new"
    new.mkdir()
    for f in tiny.iterdir():
        (new / f.name).write_bytes(f.read_bytes())
    h = read_header(weights(new))
    with open(weights(new), "r+b") as fh:
        for name in ("model.layers.0.mlp.down_proj.scales", "model.layers.3.mlp.down_proj.scales"):
            t = h.by_name[name]
            fh.seek(h.data_start + t.begin)
            fh.write(b"\x00\x3c" * (t.nbytes // 2))  # fp16 1.0
    plan = safeshard.update(new, url, storage_options=opts, dry_run=True)
    dirty = [f.file for f in plan.files if f.status in ("rewritten", "added")]
    assert len(dirty) == 2
    killed = run_killed("update", f"journaled:{dirty[0]}", new, url, storage_options=opts)
    assert killed.returncode < 0, killed.stderr[-2000:]
    r = safeshard.update(new, url, storage_options=opts)
    assert r.resumed == [dirty[0]]
    assert safeshard.verify(url, against=new, storage_options=opts).ok
    merged = tmp_path / "merged.safetensors"
    safeshard.merge(url, merged, storage_options=opts)
    assert sha(merged) == sha(weights(new))
