"""Local speed before and after a change, in one run: two safeshard source trees, paired.

Run with ``python benchmarks/ab.py --before REV [--after REV|worktree]``. It checks the
``before`` revision out into a temporary git worktree, synthesizes a checkpoint (default:
a 10-layer Llama-2-7B GPTQ, about 1.5 GB; ``--preset``/``--layers`` to change), and runs
each operation with the two trees alternately (A/B, B/A, ... ``--pairs`` rounds), each in a
fresh process with ``PYTHONPATH`` pointing at that tree's ``src``:

- ``split`` to 500MB shards (+ ``sync``), ``merge`` of those shards (+ ``sync``);
- ``verify`` of the shards ``--against`` the source, cold (both evicted first);
- ``load``: ``safeshard.load`` of the shards with numpy, warm (page cache) and cold
  (evicted with ``posix_fadvise`` first).

It prints the median time of each side and the median of the per-round ratios after/before
with their min and max, then removes the worktree and everything it wrote.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent

SPLIT = "import sys, safeshard; safeshard.split(sys.argv[1], sys.argv[2], max_shard_size='500MB')"
MERGE = "import sys, safeshard; safeshard.merge(sys.argv[1], sys.argv[2])"
LOAD = "import sys, safeshard; safeshard.load(sys.argv[1], framework='numpy')"
VERIFY = "import sys, safeshard; assert safeshard.verify(sys.argv[1], against=sys.argv[2]).ok"


def evict(folder: Path) -> None:
    for p in folder.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def evict_then(folder: Path, run: Callable[[], float]) -> float:
    evict(folder)
    return run()


def timed(src: Path, code: str, *args: str, sync: bool = False) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", code, *args], env=env, check=True, capture_output=True)
    if sync:
        subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def cold(src_tree: Path, code: str, *folders: Path) -> float:
    """``code`` run on ``folders`` with their safetensors files evicted from the page cache."""
    for folder in folders:
        evict(folder)
    return timed(src_tree, code, *map(str, folders))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--before", required=True, help="a git revision")
    ap.add_argument("--after", default="worktree", help="a git revision, or the working tree")
    ap.add_argument("--preset", default="llama-2-7b-gptq")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument(
        "--only", action="append", default=[], help="run only this operation (repeatable)"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="safeshard-ab-"))
    trees: dict[str, Path] = {}
    try:
        for side, rev in (("before", args.before), ("after", args.after)):
            if rev == "worktree":
                trees[side] = REPO / "src"
                continue
            wt = work / f"tree-{side}"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), rev],
                check=True,
                capture_output=True,
            )
            trees[side] = wt / "src"
        src = work / "model"
        subprocess.run(
            [
                PY,
                "-m",
                "safeshard",
                "synth",
                str(src),
                "--preset",
                args.preset,
                "--layers",
                str(args.layers),
                "--quiet",
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(trees["after"])},
        )
        shards = work / "shards"
        timed(trees["after"], SPLIT, str(src), str(shards))
        ops: dict[str, Callable[[Path], float]] = {
            "split": lambda t: timed(t, SPLIT, str(src), str(work / "out"), sync=True),
            "merge": lambda t: timed(t, MERGE, str(shards), str(work / "m.safetensors"), sync=True),
            "verify": lambda t: cold(t, VERIFY, shards, src),
            "load warm": lambda t: timed(t, LOAD, str(shards)),
            "load cold": lambda t: evict_then(shards, lambda: timed(t, LOAD, str(shards))),
        }
        print(f"{'operation':<10} | before s | after s | after/before: median (min, max)")
        for name, op in ops.items():
            if args.only and name not in args.only:
                continue
            times: dict[str, list[float]] = {"before": [], "after": []}
            for r in range(args.pairs):
                for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    shutil.rmtree(work / "out", ignore_errors=True)
                    (work / "m.safetensors").unlink(missing_ok=True)
                    subprocess.run(["sync"], check=True)
                    times[side].append(op(trees[side]))
            ratios = [a / b for a, b in zip(times["after"], times["before"], strict=True)]
            print(
                f"{name:<10} | {statistics.median(times['before']):>8.2f} | "
                f"{statistics.median(times['after']):>7.2f} | {statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}, {max(ratios):.2f})",
                flush=True,
            )
    finally:
        for tree in trees.values():
            if tree != REPO / "src":
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree.parent)],
                    check=False,
                    capture_output=True,
                )
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
