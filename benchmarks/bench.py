"""safeshard benchmark: every speed and memory claim in the README comes from here.

Run with ``make bench`` (or ``python benchmarks/bench.py --help``). It synthesizes a
Llama-2-13B GPTQ checkpoint (7.3 GB) under the system temp folder, unless ``--src``
names one, and measures side by side, in one run, as paired runs in alternating order:

- split: ``cp`` (and ``cp`` + ``sync``), ``safeshard split`` (which fsyncs), and the
  Hugging Face route (``safetensors.torch.load_file`` + ``huggingface_hub.save_torch_state_dict``);
  wall time, peak RSS, ratios of medians;
- merge: round trip SHA-256 equal to the source;
- verify: ``safeshard verify --against`` vs reading both copies (``cat a b > /dev/null``);
- load: parallel ``safeshard.load`` vs sequential ``safetensors.torch.load_file`` + clone,
  cold (evicted with posix_fadvise) and warm, at 4GB and 1GB shards; a budgeted layer walk;
  prefetch on vs off with simulated work.

Everything it writes lives under one temp folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PY = sys.executable
HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of that child alone)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed with {code}:\n{stderr[-3000:]}")
    return wall, rusage.ru_maxrss * 1024


def evict(paths: Sequence[Path]) -> None:
    """Drop ``paths`` from the page cache (cold reads)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def safeshard(*args: str) -> list[str]:
    return [PY, "-m", "safeshard", *args]


HF_ROUTE = r"""
import sys
from safetensors.torch import load_file
from huggingface_hub import save_torch_state_dict
sd = load_file(sys.argv[1])
save_torch_state_dict(sd, sys.argv[2], max_shard_size=sys.argv[3])
"""


def synth(work: Path, preset: str) -> Path:
    out = work / "src"
    log(f"synthesizing {preset} in {out} ...")
    t, _ = run_measured(safeshard("synth", str(out), "--preset", preset, "--quiet"))
    files = sorted(out.glob("*.safetensors"))
    log(f"  {files[0].name}: {files[0].stat().st_size:,} bytes in {t:.1f} s")
    return files[0]


def paired(
    names: Sequence[str],
    runs: dict[str, Callable[[], tuple[float, int]]],
    cleanup: Callable[[], None],
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """Run each variant ``repeats`` times, rotating the order each round."""
    times: dict[str, list[float]] = {n: [] for n in names}
    rss: dict[str, list[int]] = {n: [] for n in names}
    for r in range(repeats):
        order = list(names[r % len(names) :]) + list(names[: r % len(names)])
        for n in order:
            cleanup()
            subprocess.run(["sync"], check=True)
            t, m = runs[n]()
            times[n].append(t)
            rss[n].append(m)
            log(f"  round {r + 1} {n}: {t:.2f} s, peak RSS {m / 1e6:.0f} MB")
    cleanup()
    return {
        n: {"times_s": times[n], "median_s": med(times[n]), "peak_rss": max(rss[n])} for n in names
    }


def bench_split(src: Path, work: Path, repeats: int) -> dict[str, Any]:
    log("== split (4GB cap) vs cp vs Hugging Face route")
    out = work / "split-out"
    cp_out = work / "cp-out.safetensors"
    hf_out = work / "hf-out"

    def cleanup() -> None:
        for p in (out, hf_out):
            shutil.rmtree(p, ignore_errors=True)
        cp_out.unlink(missing_ok=True)

    runs: dict[str, Callable[[], tuple[float, int]]] = {
        "cp": lambda: run_measured(["cp", str(src), str(cp_out)]),
        "cp+sync": lambda: run_measured(["sh", "-c", f'cp "{src}" "{cp_out}" && sync']),
        "safeshard split": lambda: run_measured(
            safeshard("split", str(src), str(out), "--max-shard-size", "4GB", "--quiet")
        ),
        "hf route+sync": lambda: run_measured(
            [
                "sh",
                "-c",
                f'mkdir -p "{hf_out}" && "{PY}" -c \'{HF_ROUTE}\' "{src}" "{hf_out}" 4GB && sync',
            ]
        ),
    }
    res = paired(list(runs), runs, cleanup, repeats)
    s = res["safeshard split"]["median_s"]
    ratios = {
        "split/cp": s / res["cp"]["median_s"],
        "split/(cp+sync)": s / res["cp+sync"]["median_s"],
        "split/hf_route": s / res["hf route+sync"]["median_s"],
    }
    # one more split to inspect the result and round-trip it through merge
    subprocess.run(
        safeshard("split", str(src), str(out), "--quiet"), check=True, capture_output=True
    )
    shards = sorted(out.glob("model-*.safetensors"))
    sizes = [p.stat().st_size for p in shards]
    merged = work / "merged.safetensors"
    t_merge, rss_merge = run_measured(safeshard("merge", str(out), str(merged), "--quiet"))
    same = sha256(merged) == sha256(src)
    merged.unlink()
    result = {
        "variants": res,
        "ratios": ratios,
        "shards": len(shards),
        "shard_sizes": sizes,
        "all_under_4GB": all(x <= 4_000_000_000 for x in sizes),
        "merge_s": t_merge,
        "merge_peak_rss": rss_merge,
        "merge_identical_sha256": same,
    }
    return result


def bench_verify(src: Path, work: Path, repeats: int) -> dict[str, Any]:
    log("== verify --against vs cat both copies")
    out = work / "split-out"
    if not out.exists():
        subprocess.run(
            safeshard("split", str(src), str(out), "--quiet"), check=True, capture_output=True
        )
    files = [src, *sorted(out.glob("*.safetensors"))]
    runs: dict[str, Callable[[], tuple[float, int]]] = {
        "cat both": lambda: run_measured(
            ["sh", "-c", "cat " + " ".join(f'"{f}"' for f in files) + " > /dev/null"]
        ),
        "safeshard verify --against": lambda: run_measured(
            safeshard("verify", str(out), "--against", str(src), "--quiet")
        ),
    }
    cold = paired(list(runs), runs, lambda: evict(files), repeats)
    run_measured(["sh", "-c", "cat " + " ".join(f'"{f}"' for f in files) + " > /dev/null"])
    warm = paired(list(runs), runs, lambda: None, repeats)  # all in the page cache now
    return {
        "cold": cold,
        "warm": warm,
        "ratio_cold": cold["safeshard verify --against"]["median_s"] / cold["cat both"]["median_s"],
        "ratio_warm": warm["safeshard verify --against"]["median_s"] / warm["cat both"]["median_s"],
    }


def bench_load(src: Path, work: Path, repeats: int, cap: str) -> dict[str, Any]:
    log(f"== load, shards of {cap}")
    out = work / f"load-{cap}"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(
        safeshard("split", str(src), str(out), "--max-shard-size", cap, "--quiet"),
        check=True,
        capture_output=True,
    )
    try:
        proc = subprocess.run(
            safeshard(
                "load-bench", str(out), "--json", "--repeats", str(repeats), "--budget", "1GiB"
            ),
            check=True,
            capture_output=True,
            text=True,
        )
        return dict(json.loads(proc.stdout))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--src", type=Path, help="an existing .safetensors file (default: synthesize)")
    ap.add_argument("--preset", default="llama-2-13b-gptq")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["split", "verify", "load"], action="append")
    ap.add_argument("--json-out", type=Path, help="also write the results here")
    args = ap.parse_args()
    only = set(args.only or ["split", "verify", "load"])
    work = Path(tempfile.mkdtemp(prefix="safeshard-bench-"))
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    try:
        src = args.src or synth(work, args.preset)
        results["source"] = {"file": src.name, "size": src.stat().st_size}
        if "split" in only:
            results["split"] = bench_split(src, work, args.repeats)
        if "verify" in only:
            results["verify"] = bench_verify(src, work, args.repeats)
        if "load" in only:
            results["load"] = {
                cap: bench_load(src, work, args.repeats, cap) for cap in ("4GB", "1GB")
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    summarize(results)
    return 0


def summarize(r: dict[str, Any]) -> None:
    lines = ["", "summary (ratios of medians of paired runs):"]
    if "split" in r:
        s = r["split"]
        ratios, variants = s["ratios"], s["variants"]
        lines.append(
            f"  split/cp {ratios['split/cp']:.2f}x, split/(cp+sync) "
            f"{ratios['split/(cp+sync)']:.2f}x, split/HF route {ratios['split/hf_route']:.2f}x"
        )
        lines.append(
            f"  peak RSS split {variants['safeshard split']['peak_rss'] / 1e6:.0f} MB vs HF "
            f"{variants['hf route+sync']['peak_rss'] / 1e6:.0f} MB; {s['shards']} shards, "
            f"all <= 4GB: {s['all_under_4GB']}; merge identical: {s['merge_identical_sha256']}"
        )
    if "verify" in r:
        v = r["verify"]
        lines.append(
            f"  verify --against / cat both: cold {v['ratio_cold']:.2f}x, "
            f"warm {v['ratio_warm']:.2f}x"
        )
    if "load" in r:
        for cap, res in r["load"].items():
            lines.append(f"  load @{cap}: {json.dumps(res.get('summary', res))[:400]}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
