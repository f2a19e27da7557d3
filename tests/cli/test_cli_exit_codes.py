"""One exit-code map for every command (safeshard.cli.exit_code), documented in the README.

0 ok, 1 findings, 2 usage, 3 input, 4 I/O, 70 a bug, 130 interrupted. Each command
family gets a case per code it can end with: the real situation where one is cheap to
build (a missing path, a bad header, an existing output, a corrupted shard, EIO from
the kernel's read calls), else the library error raised where the command calls the
library.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import safeshard
import safeshard.cli as cli
from conftest import write_st
from helpers.splitkit import llama
from safeshard.cli import main
from safeshard.errors import (
    DiskFullError,
    OutputLockedError,
    ReadError,
    UnwritableOutputError,
)

MP = pytest.MonkeyPatch
Setup = Callable[[Path, MP], list[str]]


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, args, env={"HF_HUB_OFFLINE": "1"})


def src(t: Path) -> str:
    """A small single-file checkpoint folder (about 6 KB)."""
    folder = t / "src"
    if not folder.exists():
        write_st(folder / "model.safetensors", {k: (d, list(s)) for k, (d, s) in llama(2).items()})
    return str(folder)


def shards(t: Path) -> str:
    out = t / "shards"
    if not out.exists():
        safeshard.split(src(t), out, max_shard_size=3000)
    return str(out)


def corrupt(t: Path) -> str:
    out = Path(shards(t))
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    return str(out)


def changed(t: Path) -> str:
    f = write_st(
        t / "b" / "model.safetensors",
        {k: (d, list(s)) for k, (d, s) in llama(2).items()},
        fill=lambda name, n: b"\x05" * n,
    )
    return str(f.parent)


def bad_header(t: Path) -> str:
    bad = t / "bad.safetensors"
    bad.write_bytes((1000).to_bytes(8, "little") + b"{}")
    return str(bad)


def a_file(t: Path) -> Path:
    f = t / "a-file"
    f.write_text("x")
    return f


def eio(mp: MP) -> None:
    """Every read (and copy) of tensor data fails with EIO, as from a failing disk."""

    def fail(*a: Any, **k: Any) -> Any:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    mp.setattr(os, "pread", fail)
    mp.setattr(os, "preadv", fail)
    if hasattr(os, "copy_file_range"):
        mp.setattr(os, "copy_file_range", fail)


def raising(mp: MP, target: str, exc: BaseException) -> None:
    """Make the library function a command calls raise ``exc``."""

    def boom(*a: Any, **k: Any) -> Any:
        raise exc

    mp.setattr(target, boom)


def _exists(t: Path, mp: MP) -> list[str]:
    shards(t)
    return ["split", src(t), shards(t)]


def inject(target: str, exc: BaseException, args: Callable[[Path], list[str]]) -> Setup:
    """Run ``args`` with the library function ``target`` raising ``exc``."""

    def setup(t: Path, mp: MP) -> list[str]:
        a = args(t)
        raising(mp, target, exc)
        return a

    return setup


def _eio_then(args: Callable[[Path], list[str]]) -> Setup:
    def setup(t: Path, mp: MP) -> list[str]:
        a = args(t)
        eio(mp)
        return a

    return setup


CASES: dict[str, tuple[Setup, int]] = {
    # inspect
    "inspect-ok": (lambda t, mp: ["inspect", src(t)], 0),
    "inspect-bad-size": (lambda t, mp: ["inspect", src(t), "--max-shard-size", "4Gb"], 2),
    "inspect-missing": (lambda t, mp: ["inspect", str(t / "nope")], 3),
    "inspect-bad-header": (lambda t, mp: ["inspect", bad_header(t)], 3),
    "inspect-eio": (_eio_then(lambda t: ["inspect", src(t)]), 4),
    "inspect-read-error": (
        inject(
            "safeshard.cli.inspect_cmd.inspect",
            ReadError("x: cannot read"),
            lambda t: ["inspect", src(t)],
        ),
        4,
    ),
    # split
    "split-ok": (lambda t, mp: ["split", src(t), str(t / "o"), "-s", "3000"], 0),
    "split-resume-and-force": (
        lambda t, mp: ["split", src(t), str(t / "o"), "--resume", "--force"],
        2,
    ),
    "split-name-markup": (lambda t, mp: ["split", src(t), str(t / "o"), "--name", "[/]x"], 2),
    "split-missing": (lambda t, mp: ["split", str(t / "nope"), str(t / "o")], 3),
    "split-bad-header": (lambda t, mp: ["split", bad_header(t), str(t / "o")], 3),
    "split-output-exists": (_exists, 3),
    "split-cap-too-small": (lambda t, mp: ["split", src(t), str(t / "o"), "-s", "1000"], 3),
    "split-eio": (_eio_then(lambda t: ["split", src(t), str(t / "o"), "-s", "3000"]), 4),
    "split-locked": (
        inject(
            "safeshard.cli.split_cmd.split",
            OutputLockedError("o: locked"),
            lambda t: ["split", src(t), str(t / "o")],
        ),
        4,
    ),
    "split-disk-full": (
        inject(
            "safeshard.cli.split_cmd.split",
            DiskFullError("o: the disk is full"),
            lambda t: ["split", src(t), str(t / "o")],
        ),
        4,
    ),
    # split --update
    "update-ok": (lambda t, mp: ["split", changed(t), shards(t), "--update"], 0),
    "update-and-force": (lambda t, mp: ["split", changed(t), shards(t), "--update", "--force"], 2),
    "update-refused": (lambda t, mp: ["split", changed(t), src(t), "--update"], 3),
    "update-unwritable": (
        inject(
            "safeshard.cli.split_update.update",
            UnwritableOutputError("o: ro"),
            lambda t: ["split", changed(t), shards(t), "--update"],
        ),
        4,
    ),
    # merge
    "merge-ok": (lambda t, mp: ["merge", shards(t), str(t / "m.safetensors")], 0),
    "merge-missing": (lambda t, mp: ["merge", str(t / "nope"), str(t / "m.safetensors")], 3),
    "merge-output-exists": (lambda t, mp: ["merge", shards(t), str(a_file(t))], 3),
    "merge-folder-is-a-file": (
        lambda t, mp: ["merge", shards(t), str(a_file(t) / "m.safetensors")],
        4,
    ),
    "merge-eio": (_eio_then(lambda t: ["merge", shards(t), str(t / "m.safetensors")]), 4),
    # verify
    "verify-clean": (lambda t, mp: ["verify", shards(t)], 0),
    "verify-corrupt": (lambda t, mp: ["verify", corrupt(t)], 1),
    "verify-bad-option": (lambda t, mp: ["verify", shards(t), "--workers", "0"], 2),
    "verify-missing": (lambda t, mp: ["verify", str(t / "nope")], 3),
    "verify-read-error": (
        inject(
            "safeshard.cli.verify_cmd.verify",
            ReadError("x: cannot read"),
            lambda t: ["verify", shards(t)],
        ),
        4,
    ),
    "verify-oserror": (
        inject(
            "safeshard.cli.verify_cmd.verify",
            OSError(errno.EIO, "I/O error"),
            lambda t: ["verify", shards(t)],
        ),
        4,
    ),
    # diff
    "diff-identical": (lambda t, mp: ["diff", src(t), shards(t)], 0),
    "diff-different": (lambda t, mp: ["diff", src(t), changed(t)], 1),
    "diff-bad-option": (lambda t, mp: ["diff", src(t), src(t), "--workers", "0"], 2),
    "diff-missing": (lambda t, mp: ["diff", src(t), str(t / "nope")], 3),
    "diff-bad-header": (lambda t, mp: ["diff", src(t), bad_header(t)], 3),
    "diff-eio": (_eio_then(lambda t: ["diff", src(t), changed(t)]), 4),
    # synth, load-bench, demo
    "synth-bad-preset": (lambda t, mp: ["synth", str(t / "s"), "-p", "nope"], 2),
    "synth-exists": (lambda t, mp: _synth_twice(t), 3),
    "load-bench-missing": (lambda t, mp: ["load-bench", str(t / "nope")], 3),
    "load-bench-bad-header": (lambda t, mp: ["load-bench", bad_header(t), "--warm"], 3),
    "demo-keep-is-a-file": (lambda t, mp: ["demo", "--keep", str(a_file(t) / "k")], 4),
}


def _synth_twice(t: Path) -> list[str]:
    args = ["synth", str(t / "s"), "-p", "tiny-llama", "--layers", "1", "-q"]
    assert invoke(args).exit_code == 0
    return args


def _family(case: str) -> str:
    return "load-bench" if case.startswith("load-bench") else case.split("-")[0]


@pytest.mark.parametrize("family", sorted({_family(c) for c in CASES}))
def test_exit_code_map(tmp_path: Path, family: str) -> None:
    """Every case of one command family ends with its code, whatever the others do."""
    wrong = []
    for case, (setup, code) in CASES.items():
        if _family(case) != family:
            continue
        t = tmp_path / case
        t.mkdir()
        with pytest.MonkeyPatch.context() as mp:
            args = setup(t, mp)
            res = invoke(args)
        problems = []
        if res.exit_code != code:
            problems.append(f"exit {res.exit_code}, expected {code}")
        if "Traceback" in res.stderr:
            problems.append("a traceback")
        if code >= 2 and (res.stdout != "" or not res.stderr.strip()):
            problems.append("an error must say why on stderr, and nothing on stdout")
        if code in (3, 4) and not (
            res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1
        ):
            problems.append("not one 'error: ' line")
        if problems:
            wrong.append(f"{case}: {'; '.join(problems)}\n{res.stdout}{res.stderr}")
    assert not wrong, "\n".join(wrong)


def test_ctrl_c_anywhere_exits_130(tmp_path: Path, monkeypatch: MP) -> None:
    # while click converts an option (before the command runs: click alone exits 1)
    raising(monkeypatch, "safeshard.cli.app.parse_size", KeyboardInterrupt())
    res = invoke(["inspect", src(tmp_path), "--max-shard-size", "1GB"])
    assert res.exit_code == 130 and "interrupted" in res.stderr
    # inside the command
    raising(monkeypatch, "safeshard.cli.inspect_cmd.inspect", KeyboardInterrupt())
    res = invoke(["inspect", src(tmp_path)])
    assert res.exit_code == 130 and "interrupted" in res.stderr


def test_a_bug_exits_70_with_an_escaped_traceback(tmp_path: Path, monkeypatch: MP) -> None:
    raising(monkeypatch, "safeshard.cli.inspect_cmd.inspect", RuntimeError("boom\x1b[2J\nx"))
    res = invoke(["inspect", src(tmp_path)])
    assert res.exit_code == 70
    assert "Traceback (most recent call last):" in res.stderr
    assert r"builtins.RuntimeError: boom\x1b[2J\nx" in res.stderr
    assert "\x1b" not in res.stderr
    assert "a bug in safeshard" in res.stderr


def test_a_broken_pipe_exits_4_quietly(tmp_path: Path, monkeypatch: MP) -> None:
    raising(monkeypatch, "safeshard.cli.inspect_cmd.render", BrokenPipeError(errno.EPIPE, "pipe"))
    res = invoke(["inspect", src(tmp_path)])
    assert res.exit_code == 4
    assert res.stderr == ""


@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["human", "json"])
def test_a_closed_stdout_pipe_exits_4_quietly(tmp_path: Path, extra: list[str]) -> None:
    """``safeshard inspect X | head``: rich and click each exit 1 on EPIPE by themselves."""
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[2])}
    cmd = [sys.executable, "-m", "safeshard", "inspect", src(tmp_path), *extra]
    try:
        proc = subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, env=env, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr == b""


def test_the_map() -> None:
    from safeshard import errors as e

    assert cli.exit_code(e.UsageError("x")) == 2
    assert cli.exit_code(e.SizeParseError("x")) == 2
    exc: BaseException
    for exc in (
        e.HeaderJSONError("f", "x"),
        e.CheckpointNotFoundError("x"),
        e.AmbiguousCheckpointError("x"),
        e.ShardMismatchError("x"),
        e.OversizeTensorError("x"),
        e.OutputExistsError("x"),
        e.UpdateError("x"),
        e.BudgetError("x"),
        e.MissingExtraError("x"),
        e.IndexFormatError("x"),
    ):
        assert cli.exit_code(exc) == 3, exc
    for exc in (
        e.ReadError("x"),
        e.WriteError("x"),
        e.DiskFullError("x"),
        e.UnwritableOutputError("x"),
        e.OutputFolderMissingError("x"),
        e.OutputLockedError("x"),
        PermissionError(errno.EACCES, "x"),
        OSError(errno.EIO, "x"),
    ):
        assert cli.exit_code(exc) == 4, exc
    assert cli.exit_code(KeyboardInterrupt()) == 130
    assert cli.exit_code(ValueError("x")) == 70


def _codes(text: str) -> set[int]:
    return {int(c) for c in re.findall(r"^\s*\|?\s*(\d+)\s", text, re.M)}


def test_codes_are_documented_in_the_readme_and_the_package() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    codes = {v for k, v in vars(cli).items() if k.startswith("EXIT_")}
    assert codes == {0, 1, 2, 3, 4, 70, 130}
    assert _codes(section) == codes
    doc = cli.__doc__ or ""
    assert _codes(doc.split("Exit codes", 1)[1]) == codes
    assert readme.startswith(
        "# safeshard\n\n```sh\n"
        "make demo   # creates .venv, installs safeshard, runs the main job on a small embedded"
        " sample\n"
        "make test   # creates .venv if needed, installs the test dependencies, runs the whole"
        " test suite\n```\n"
    )
