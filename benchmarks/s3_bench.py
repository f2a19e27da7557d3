"""safeshard on object storage, against a local S3 server (moto), in one run.

Run with ``make bench-s3`` or ``python benchmarks/s3_bench.py [--layers N]``. It starts
moto's S3 server on 127.0.0.1, synthesizes a Llama-2-7B GPTQ checkpoint of about 1 GB
(``--layers``, default 6) under the system temp folder, uploads it to a bucket, and then
runs each variant in a subprocess of its own (``--repeats`` times, rotated), reporting
wall time, throughput, peak RSS, and for the safeshard variants the most ranged GETs and
bytes in flight at once:

- split: S3 -> S3 (``safeshard split s3://.../src s3://.../out``), local -> local, and
  the naive route (download every object with ``s3fs.get``, then split locally);
- load: ``safeshard.load`` from S3, from local files, and the naive route (download, then
  load locally).

moto's server is written in Python and serves about 50-100 MB/s here, so this measures
safeshard's memory bounds and concurrency against a real S3 API, not a real bucket's
speed. Everything it writes (temp folder, server) is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PY = sys.executable

CHILD_PRELUDE = """
import json, os, sys, time
opts = json.loads(os.environ["BENCH_OPTS"])
def peak():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
"""

CHILDREN = {
    "split s3->s3": CHILD_PRELUDE
    + """
import safeshard
from safeshard.remote import DEFAULT_LIMITS
t0 = time.perf_counter()
r = safeshard.split(sys.argv[1], sys.argv[2], max_shard_size="300MB", storage_options=opts,
                    force=True)
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(),
                  "stats": DEFAULT_LIMITS.stats.to_json(), "files": len(r.files)}))
""",
    "split local": CHILD_PRELUDE
    + """
import safeshard
t0 = time.perf_counter()
r = safeshard.split(sys.argv[1], sys.argv[2], max_shard_size="300MB", force=True)
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "files": len(r.files)}))
""",
    "split naive (download, then split)": CHILD_PRELUDE
    + """
import s3fs, safeshard
t0 = time.perf_counter()
fs = s3fs.S3FileSystem(**opts)
fs.get(sys.argv[1].removeprefix("s3://") + "/", sys.argv[3] + "/", recursive=True)
r = safeshard.split(sys.argv[3], sys.argv[2], max_shard_size="300MB", force=True)
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "files": len(r.files)}))
""",
    "load s3": CHILD_PRELUDE
    + """
import safeshard
from safeshard.remote import DEFAULT_LIMITS
t0 = time.perf_counter()
sd = safeshard.load(sys.argv[1], framework="numpy", storage_options=opts)
n = sum(a.nbytes for a in sd.values())
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "bytes": n,
                  "stats": DEFAULT_LIMITS.stats.to_json()}))
""",
    "load local": CHILD_PRELUDE
    + """
import safeshard
t0 = time.perf_counter()
sd = safeshard.load(sys.argv[1], framework="numpy")
n = sum(a.nbytes for a in sd.values())
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "bytes": n}))
""",
    "load naive (download, then load)": CHILD_PRELUDE
    + """
import s3fs, safeshard
t0 = time.perf_counter()
fs = s3fs.S3FileSystem(**opts)
fs.get(sys.argv[1].removeprefix("s3://") + "/", sys.argv[2] + "/", recursive=True)
sd = safeshard.load(sys.argv[2], framework="numpy")
n = sum(a.nbytes for a in sd.values())
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "bytes": n}))
""",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.1)


def run_child(name: str, args: Sequence[str], opts: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "BENCH_OPTS": json.dumps(opts)}
    proc = subprocess.run(
        [PY, "-c", CHILDREN[name], *args], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=6, help="blocks of the 7B GPTQ preset")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["split", "load"], action="append")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    only = set(args.only or ["split", "load"])
    work = Path(tempfile.mkdtemp(prefix="safeshard-s3-bench-"))
    server, endpoint = start_moto()
    opts = {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    results: dict[str, Any] = {"endpoint": "moto on 127.0.0.1", "cpus": os.cpu_count()}
    try:
        import boto3
        import s3fs

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        ).create_bucket(Bucket="bench")
        src = work / "src"
        log(f"synthesizing llama-2-7b-gptq ({args.layers} layers) ...")
        subprocess.run(
            [
                PY,
                "-m",
                "safeshard",
                "synth",
                str(src),
                "--preset",
                "llama-2-7b-gptq",
                "--layers",
                str(args.layers),
                "--quiet",
            ],
            check=True,
            capture_output=True,
        )
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        results["size"] = size
        log(f"  {size / 1e9:.2f} GB; uploading ...")
        fs = s3fs.S3FileSystem(**opts)
        fs.put(str(src) + "/", "bench/src/", recursive=True)
        # a sharded copy to load from, on both sides
        subprocess.run(
            [
                PY,
                "-m",
                "safeshard",
                "split",
                str(src),
                str(work / "shards"),
                "-s",
                "400MB",
                "--quiet",
            ],
            check=True,
            capture_output=True,
        )
        fs.put(str(work / "shards") + "/", "bench/shards/", recursive=True)
        variants: dict[str, list[str]] = {}
        if "split" in only:
            variants["split s3->s3"] = ["s3://bench/src", "s3://bench/out"]
            variants["split local"] = [str(src), str(work / "out-local")]
            variants["split naive (download, then split)"] = [
                "s3://bench/src",
                str(work / "out-naive"),
                str(work / "dl-split"),
            ]
        if "load" in only:
            variants["load s3"] = ["s3://bench/shards"]
            variants["load local"] = [str(work / "shards")]
            variants["load naive (download, then load)"] = [
                "s3://bench/shards",
                str(work / "dl-load"),
            ]
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in variants}
        names = list(variants)
        for r in range(args.repeats):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                for d in ("dl-split", "dl-load", "out-local", "out-naive"):
                    shutil.rmtree(work / d, ignore_errors=True)
                got = run_child(n, variants[n], opts)
                runs[n].append(got)
                log(f"  round {r + 1} {n}: {got['s']:.2f} s, peak RSS {got['rss'] / 1e6:.0f} MB")
        summary = {}
        for n, rs in runs.items():
            t = statistics.median(x["s"] for x in rs)
            summary[n] = {
                "median_s": t,
                "MB/s": size / t / 1e6,
                "peak_rss_MB": max(x["rss"] for x in rs) / 1e6,
                **({"remote": rs[-1]["stats"]} if "stats" in rs[-1] else {}),
            }
        results["variants"] = summary
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(f"\n{'variant':<36} | median s | MB/s  | peak RSS MB | most GETs / MiB in flight")
    for n, v in results.get("variants", {}).items():
        rem = v.get("remote")
        flight = (
            f"{rem['max_requests_in_flight']} / {rem['max_bytes_in_flight'] / 2**20:.0f}"
            if rem
            else "-"
        )
        print(
            f"{n:<36} | {v['median_s']:>8.2f} | {v['MB/s']:>5.0f} | {v['peak_rss_MB']:>11.0f} | "
            f"{flight}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
