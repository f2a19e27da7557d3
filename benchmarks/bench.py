"""safeshard benchmark: every speed and memory claim in the README comes from here.

Run with ``make bench`` (or ``python benchmarks/bench.py --help``). It synthesizes a
Llama-2-13B GPTQ checkpoint (7.3 GB) under the system temp folder (``--quick``: a
10-layer Llama-2-7B GPTQ of about 1.5 GB), unless ``--src`` names one, and measures side
by side, in one run, in rounds: every variant of a comparison runs once per round, in an
order rotated each round (A/B, B/A, ...), after a ``sync``; a ratio is computed per round
and reported as the median with its min and max over the rounds (``--pairs``, at least 5).
Writers are timed durable: ``cp`` and the Hugging Face route as command + ``sync``;
safeshard fsyncs its own files, and its runs end with a ``sync`` too, for fairness.

- split: ``safeshard split`` (4GB cap) vs ``cp`` + sync vs the Hugging Face route
  (``safetensors.torch.load_file`` + ``huggingface_hub.save_torch_state_dict`` + sync), and
  ``split --sha256`` vs ``cp`` + sync (each recorded SHA-256 is then checked against
  ``sha256sum``); peak RSS;
- merge: ``safeshard merge`` of those shards vs ``cp`` + sync, both reading cold (their
  inputs evicted first); the merged file must be byte-identical to the source; peak RSS;
- verify: ``safeshard verify --against`` vs reading both copies (``cat a b > /dev/null``),
  cold (evicted with posix_fadvise) and warm;
- load: parallel ``safeshard.load`` vs sequential ``safetensors.torch.load_file`` + clone,
  cold and warm, at 4GB and 1GB shards; the fresh-memory fault rate; a budgeted layer walk;
  prefetch on vs off with simulated work (``safeshard load-bench``).

It refuses to start without enough free disk, and everything it writes lives under one
temp folder that is removed at the end.
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


def synth(work: Path, preset: str, layers: int | None) -> Path:
    out = work / "src"
    log(f"synthesizing {preset} ({layers or 'all'} layers) in {out} ...")
    extra = ["--layers", str(layers)] if layers else []
    t, _ = run_measured(safeshard("synth", str(out), "--preset", preset, "--quiet", *extra))
    files = sorted(out.glob("*.safetensors"))
    log(f"  {files[0].name}: {files[0].stat().st_size:,} bytes in {t:.1f} s")
    return files[0]


Runner = Callable[[], tuple[float, int]]


def rounds(
    runs: dict[str, Runner],
    pairs: int,
    before: Callable[[], None],
    after: Callable[[str], None] = lambda name: None,
) -> dict[str, dict[str, Any]]:
    """Run every variant once per round, rotating the order; ``before`` each run (cleanup,
    cache state), ``after`` each (checks). Returns each variant's times and peak RSS."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    rss: dict[str, list[int]] = {n: [] for n in names}
    for r in range(pairs):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            before()
            subprocess.run(["sync"], check=True)
            t, m = runs[n]()
            after(n)
            times[n].append(t)
            rss[n].append(m)
            log(f"  round {r + 1} {n}: {t:.2f} s, peak RSS {m / 1e6:.0f} MB")
    return {
        n: {
            "times_s": times[n],
            "median_s": med(times[n]),
            "min_s": min(times[n]),
            "max_s": max(times[n]),
            "peak_rss": max(rss[n]),
        }
        for n in names
    }


def ratio(res: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, float]:
    """Per-round ratios ``a / b``: median, min and max; and the ratio of the medians."""
    per = [x / y for x, y in zip(res[a]["times_s"], res[b]["times_s"], strict=True)]
    return {
        "median": med(per),
        "min": min(per),
        "max": max(per),
        "of_medians": res[a]["median_s"] / res[b]["median_s"],
    }


def durable(cmd: str) -> Runner:
    """Time ``cmd`` (a shell command line) followed by ``sync``."""
    return lambda: run_measured(["sh", "-c", f"{cmd} && sync"])


def q(p: Path | str) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"


def bench_split(src: Path, work: Path, pairs: int) -> dict[str, Any]:
    log("== split (4GB cap) vs cp + sync vs the Hugging Face route")
    out, cp_out, hf_out = work / "split-out", work / "cp-out.safetensors", work / "hf-out"
    ss = f"{q(PY)} -m safeshard"

    def cleanup() -> None:
        for p in (out, hf_out):
            shutil.rmtree(p, ignore_errors=True)
        cp_out.unlink(missing_ok=True)

    checked: list[bool] = []

    def check(name: str) -> None:
        if name == "split --sha256":
            man = json.loads((out / "model.safeshard.json").read_text())
            checked.append(all(sha256(out / s["file"]) == s["sha256"] for s in man["shards"]))

    runs: dict[str, Runner] = {
        "cp+sync": durable(f"cp {q(src)} {q(cp_out)}"),
        "split": durable(f"{ss} split {q(src)} {q(out)} -s 4GB --quiet"),
        "split --sha256": durable(f"{ss} split {q(src)} {q(out)} -s 4GB --sha256 --quiet"),
        "hf route+sync": durable(
            f"mkdir -p {q(hf_out)} && {q(PY)} -c {q(HF_ROUTE)} {q(src)} {q(hf_out)} 4GB"
        ),
    }
    res = rounds(runs, pairs, cleanup, check)
    cleanup()
    subprocess.run(
        safeshard("split", str(src), str(out), "--quiet"), check=True, capture_output=True
    )
    sizes = [p.stat().st_size for p in sorted(out.glob("model-*.safetensors"))]
    return {
        "variants": res,
        "split/(cp+sync)": ratio(res, "split", "cp+sync"),
        "split --sha256/(cp+sync)": ratio(res, "split --sha256", "cp+sync"),
        "hf route/split": ratio(res, "hf route+sync", "split"),
        "sha256_recorded_equals_sha256sum": all(checked) and bool(checked),
        "shards": len(sizes),
        "shard_sizes": sizes,
        "all_under_4GB": all(x <= 4_000_000_000 for x in sizes),
    }


def bench_merge(src: Path, work: Path, pairs: int) -> dict[str, Any]:
    log("== merge vs cp + sync")
    out = work / "split-out"
    if not out.exists():
        subprocess.run(
            safeshard("split", str(src), str(out), "--quiet"), check=True, capture_output=True
        )
    merged, cp_out = work / "merged.safetensors", work / "cp-out.safetensors"
    ss = f"{q(PY)} -m safeshard"

    def cleanup() -> None:
        merged.unlink(missing_ok=True)
        cp_out.unlink(missing_ok=True)
        # cp reads the original and merge the shards: with both and two outputs (4x the
        # model) more than the page cache holds, whichever was read last would be warm.
        # Both start cold, so each pays for its own reads.
        evict([src, *sorted(out.glob("*.safetensors"))])

    identical: list[bool] = []
    want = sha256(src)

    def check(name: str) -> None:
        if name == "merge" and not identical:  # once: hashing 7 GB takes a while
            identical.append(sha256(merged) == want)

    runs: dict[str, Runner] = {
        "cp+sync": durable(f"cp {q(src)} {q(cp_out)}"),
        "merge": durable(f"{ss} merge {q(out)} {q(merged)} --quiet"),
    }
    res = rounds(runs, pairs, cleanup, check)
    cleanup()
    return {
        "variants": res,
        "merge/(cp+sync)": ratio(res, "merge", "cp+sync"),
        "merged_identical": bool(identical) and all(identical),
    }


def bench_verify(src: Path, work: Path, pairs: int) -> dict[str, Any]:
    log("== verify --against vs cat both copies")
    out = work / "split-out"
    if not out.exists():
        subprocess.run(
            safeshard("split", str(src), str(out), "--quiet"), check=True, capture_output=True
        )
    files = [src, *sorted(out.glob("*.safetensors"))]
    cat = "cat " + " ".join(q(f) for f in files) + " > /dev/null"
    runs: dict[str, Runner] = {
        "cat both": lambda: run_measured(["sh", "-c", cat]),
        "verify --against": lambda: run_measured(
            safeshard("verify", str(out), "--against", str(src), "--quiet")
        ),
    }
    cold = rounds(runs, pairs, lambda: evict(files))
    run_measured(["sh", "-c", cat])
    warm = rounds(runs, pairs, lambda: None)  # all in the page cache now
    return {
        "cold": cold,
        "warm": warm,
        "cold verify/cat": ratio(cold, "verify --against", "cat both"),
        "warm verify/cat": ratio(warm, "verify --against", "cat both"),
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


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--src", type=Path, help="an existing .safetensors file (default: synthesize)")
    ap.add_argument("--preset", default="llama-2-13b-gptq")
    ap.add_argument("--layers", type=int, help="override the preset's number of blocks")
    ap.add_argument(
        "--quick", action="store_true", help="a 10-layer Llama-2-7B GPTQ (about 1.5 GB)"
    )
    ap.add_argument("--pairs", type=int, default=5, help="rounds per comparison (at least 5)")
    ap.add_argument("--only", choices=["split", "merge", "verify", "load"], action="append")
    ap.add_argument("--json-out", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.pairs < 5:
        ap.error("--pairs must be at least 5")
    if args.quick:
        args.preset, args.layers = "llama-2-7b-gptq", args.layers or 10
    only = set(args.only or ["split", "merge", "verify", "load"])
    tmp = Path(tempfile.gettempdir())
    if args.src is not None:
        size = args.src.stat().st_size
    else:
        cmd = [
            PY,
            "-c",
            "import sys; from safeshard.ops.synth import expected_size as e; "
            "print(e(sys.argv[1], None if sys.argv[2] == '-' else int(sys.argv[2])))",
            args.preset,
            str(args.layers or "-"),
        ]
        size = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    need = int(size * 4.5) + 2**30  # source, shards, cp copy, HF copy, merged file
    if free_bytes(tmp) < need:
        log(
            f"not enough free disk in {tmp}: need {need / 1e9:.1f} GB for a {size / 1e9:.1f} GB "
            f"model, have {free_bytes(tmp) / 1e9:.1f} GB; free space, set TMPDIR, or use --quick"
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="safeshard-bench-"))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
        "pairs": args.pairs,
    }
    try:
        src = args.src or synth(work, args.preset, args.layers)
        results["source"] = {"file": src.name, "size": src.stat().st_size}
        if "split" in only:
            results["split"] = bench_split(src, work, args.pairs)
        if "merge" in only:
            results["merge"] = bench_merge(src, work, args.pairs)
        if "verify" in only:
            results["verify"] = bench_verify(src, work, args.pairs)
        if "load" in only:
            results["load"] = {
                cap: bench_load(src, work, args.pairs, cap) for cap in ("4GB", "1GB")
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    summarize(results)
    return 0


def fmt(r: dict[str, float]) -> str:
    return f"{r['median']:.2f}x (min {r['min']:.2f}, max {r['max']:.2f})"


def summarize(r: dict[str, Any]) -> None:
    lines = ["", f"summary: median of per-round ratios over {r['pairs']} rounds (min, max):"]
    if "split" in r:
        s = r["split"]
        v = s["variants"]
        lines += [
            f"  split / (cp + sync):          {fmt(s['split/(cp+sync)'])}",
            f"  split --sha256 / (cp + sync): {fmt(s['split --sha256/(cp+sync)'])}; "
            f"recorded SHA-256 = sha256sum: {s['sha256_recorded_equals_sha256sum']}",
            f"  HF route / split:             {fmt(s['hf route/split'])}",
            f"  peak RSS: split {v['split']['peak_rss'] / 1e6:.0f} MB, split --sha256 "
            f"{v['split --sha256']['peak_rss'] / 1e6:.0f} MB, HF route "
            f"{v['hf route+sync']['peak_rss'] / 1e6:.0f} MB; {s['shards']} shards, all <= 4GB: "
            f"{s['all_under_4GB']}",
        ]
    if "merge" in r:
        m = r["merge"]
        lines.append(
            f"  merge / (cp + sync):          {fmt(m['merge/(cp+sync)'])}; identical: "
            f"{m['merged_identical']}; peak RSS {m['variants']['merge']['peak_rss'] / 1e6:.0f} MB"
        )
    if "verify" in r:
        v = r["verify"]
        lines.append(f"  verify --against / cat, cold: {fmt(v['cold verify/cat'])}")
        lines.append(f"  verify --against / cat, warm: {fmt(v['warm verify/cat'])}")
    if "load" in r:
        for cap, res in r["load"].items():
            lines.append(f"  load @{cap}: {json.dumps(res.get('summary', res))[:400]}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
