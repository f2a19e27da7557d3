"""safeshard on object storage, against local S3 servers (moto, s3rver), in one run.

Run with ``make bench-s3`` or ``python benchmarks/s3_bench.py [--layers N]``. For each
server (``--server``, default both: moto's Python server, and the Node ``s3rver`` from
the npm registry, installed with ``npm install --prefix`` into a folder this benchmark
makes; skipped with a message when npm or node is missing), it starts the server on
127.0.0.1, synthesizes a Llama-2-7B GPTQ checkpoint (``--layers``, default 6: about
1 GB) under the system temp folder, uploads it, and runs each variant in a subprocess
of its own (``--repeats`` times, rotated), reporting wall time, throughput, peak RSS and
for safeshard the most ranged GETs and part uploads in flight at once:

- the server's own ceiling: one whole GET of the object; 8 parallel 8 MiB ranged GETs
  (s3fs ``cat_file``), their bytes dropped as they come (so memory is reused) or kept
  (so they land in fresh memory, as a load's tensors do); a multipart PUT of 8 MiB parts
  with 1 and with 8 parts in flight (boto3); and a copy of the object through the client
  (boto3: each 8 MiB range fetched, then uploaded as a part, 8 at once), which moves the
  same bytes as a split S3 -> S3 on a server that cannot copy parts itself;
- split: S3 -> S3 (``safeshard split s3://.../src s3://.../out``), local -> S3, local ->
  local, and the naive route (download every object with ``s3fs.get``, then split locally);
- load: ``safeshard.load`` from S3, from local files, and the naive route.

Each safeshard number is printed beside the ceiling it is bounded by, as a ratio:
load against 8 parallel ranged GETs (dropped, and kept), split local -> S3 against the
8-in-flight multipart PUT, and split S3 -> S3 against both that PUT and the copy through
the client. The ceilings' clocks start after their client is made and has had one answer; so
``load s3`` and the S3 -> S3 split are each timed twice: from nothing (the imports of
s3fs and universal-pathlib, and numpy for load, and the client's setup included), and, like
the ceilings, with those libraries imported and the client made and answered once. Everything it
writes (temp folder, servers, npm folder) is removed at the end.
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
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PY = sys.executable
CAP = ["300MB"]
"""The S3 -> S3 split's cap (``--shard-size``)."""

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

SPLIT_S3 = """
import safeshard
from safeshard.io.remote import DEFAULT_LIMITS
t0 = time.perf_counter()
r = safeshard.split(sys.argv[1], sys.argv[2], max_shard_size=os.environ["BENCH_CAP"],
                    storage_options=opts, force=True)
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(),
                  "stats": DEFAULT_LIMITS.stats.to_json(),
                  "puts": DEFAULT_LIMITS.upload_stats.to_json(),
                  "copies": DEFAULT_LIMITS.copy_stats.to_json(), "files": len(r.files)}))
"""

WARM_CLIENT = """
import s3fs, upath, safeshard
# As the ceilings do before their clock starts: the libraries imported, the client made
# and one request answered (s3fs caches the instance, so safeshard uses this client).
fs = s3fs.S3FileSystem(**opts)
fs.info(sorted(fs.ls(sys.argv[1].removeprefix("s3://"), refresh=True))[0])
fs.invalidate_cache()
"""

WARM_OUT = """
import s3fs, upath, safeshard
# the same for an upload from local files: the client made and one request answered
fs = s3fs.S3FileSystem(**opts)
fs.ls(sys.argv[2].removeprefix("s3://").split("/")[0], refresh=True)
fs.invalidate_cache()
"""

CHILDREN = {
    "split s3->s3": CHILD_PRELUDE + SPLIT_S3,
    "split local->s3, client set up first": CHILD_PRELUDE + WARM_OUT + SPLIT_S3,
    "split s3->s3, client set up first": CHILD_PRELUDE + WARM_CLIENT + SPLIT_S3,
    "split s3->s3, streamed (no server copy)": CHILD_PRELUDE
    + "from safeshard.io.remote import DEFAULT_LIMITS\nDEFAULT_LIMITS.server_copy = False\n"
    + SPLIT_S3,
    "split local": CHILD_PRELUDE
    + """
import safeshard
t0 = time.perf_counter()
r = safeshard.split(sys.argv[1], sys.argv[2], max_shard_size=os.environ["BENCH_CAP"],
                    force=True)
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "files": len(r.files)}))
""",
    "split naive (download, then split)": CHILD_PRELUDE
    + """
import s3fs, safeshard
t0 = time.perf_counter()
fs = s3fs.S3FileSystem(**opts)
fs.get(sys.argv[1].removeprefix("s3://") + "/", sys.argv[3] + "/", recursive=True)
r = safeshard.split(sys.argv[3], sys.argv[2], max_shard_size=os.environ["BENCH_CAP"],
                    force=True)
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "files": len(r.files)}))
""",
    "load s3": CHILD_PRELUDE
    + """
import safeshard
from safeshard.io.remote import DEFAULT_LIMITS
t0 = time.perf_counter()
sd = safeshard.load(sys.argv[1], framework="numpy", storage_options=opts)
n = sum(a.nbytes for a in sd.values())
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "bytes": n,
                  "stats": DEFAULT_LIMITS.stats.to_json()}))
""",
    "load s3, client set up first": CHILD_PRELUDE
    + """
import numpy, s3fs, upath, safeshard
from safeshard.io.remote import DEFAULT_LIMITS
# As the ceilings do before their clock starts: the libraries imported, the client made
# and one request answered (s3fs caches the instance, so load uses this client).
fs = s3fs.S3FileSystem(**opts)
fs.info(sorted(fs.ls(sys.argv[1].removeprefix("s3://"), refresh=True))[0])
fs.invalidate_cache()
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

RANGED_GETS = (
    CHILD_PRELUDE
    + """
import s3fs
from concurrent.futures import ThreadPoolExecutor
fs = s3fs.S3FileSystem(**opts)
path = sys.argv[1]
size = fs.info(path)["size"]
step = 8 * 2**20
t0 = time.perf_counter()
"""
)
"""The ranged-GET ceilings' setup: the client made and answered, then the clock started."""

CEILINGS = {
    "ceiling: one whole GET": CHILD_PRELUDE
    + """
import s3fs
fs = s3fs.S3FileSystem(**opts)
path = sys.argv[1]
t0 = time.perf_counter()
n = len(fs.cat_file(path))
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "bytes": n}))
""",
    "ceiling: 8 parallel 8 MiB ranged GETs": RANGED_GETS
    + """
with ThreadPoolExecutor(8) as ex:
    n = sum(ex.map(lambda s: len(fs.cat_file(path, start=s, end=min(s + step, size))),
                   range(0, size, step)))
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "bytes": n}))
""",
    "ceiling: 8 parallel 8 MiB ranged GETs, kept": RANGED_GETS
    + """
with ThreadPoolExecutor(8) as ex:
    kept = list(ex.map(lambda s: fs.cat_file(path, start=s, end=min(s + step, size)),
                       range(0, size, step)))
n = sum(len(b) for b in kept)
print(json.dumps({"s": time.perf_counter() - t0, "rss": peak(), "bytes": n}))
""",
    "ceiling: multipart PUT, 1 part in flight": CHILD_PRELUDE
    + """
import boto3
from concurrent.futures import ThreadPoolExecutor
flight = 1
""",
    "ceiling: multipart PUT, 8 parts in flight": CHILD_PRELUDE
    + """
import boto3
from concurrent.futures import ThreadPoolExecutor
flight = 8
""",
}
CEILINGS["ceiling: copy through the client, 8 in flight"] = (
    CHILD_PRELUDE
    + """
import boto3
from concurrent.futures import ThreadPoolExecutor
ck = opts["client_kwargs"]
c = boto3.client("s3", endpoint_url=ck["endpoint_url"], region_name=ck["region_name"],
                 aws_access_key_id=opts["key"], aws_secret_access_key=opts["secret"])
bucket, key = sys.argv[1].split("/", 1)
out = sys.argv[2].split("/", 1)[1]
size = c.head_object(Bucket=bucket, Key=key)["ContentLength"]
step = 8 * 2**20
t0 = time.perf_counter()
up = c.create_multipart_upload(Bucket=bucket, Key=out)["UploadId"]
def copy(i):
    end = min(size, (i + 1) * step) - 1
    body = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={i * step}-{end}")["Body"].read()
    r = c.upload_part(Bucket=bucket, Key=out, UploadId=up, PartNumber=i + 1, Body=body)
    return {"PartNumber": i + 1, "ETag": r["ETag"]}
with ThreadPoolExecutor(8) as ex:
    done = list(ex.map(copy, range(-(-size // step))))
c.complete_multipart_upload(Bucket=bucket, Key=out, UploadId=up,
                            MultipartUpload={"Parts": done})
s = time.perf_counter() - t0
c.delete_object(Bucket=bucket, Key=out)
print(json.dumps({"s": s, "rss": peak(), "bytes": size}))
"""
)
PUT = """
ck = opts["client_kwargs"]
c = boto3.client("s3", endpoint_url=ck["endpoint_url"], region_name=ck["region_name"],
                 aws_access_key_id=opts["key"], aws_secret_access_key=opts["secret"])
bucket, key = sys.argv[1].split("/", 1)
size = int(sys.argv[2])
part = os.urandom(8 * 2**20)
parts = -(-size // len(part))
t0 = time.perf_counter()
up = c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
def put(i):
    r = c.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=i + 1, Body=part)
    return {"PartNumber": i + 1, "ETag": r["ETag"]}
with ThreadPoolExecutor(flight) as ex:
    done = list(ex.map(put, range(parts)))
c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up,
                            MultipartUpload={"Parts": done})
s = time.perf_counter() - t0
c.delete_object(Bucket=bucket, Key=key)
print(json.dumps({"s": s, "rss": peak(), "bytes": parts * len(part)}))
"""
for _k in list(CEILINGS):
    if "PUT" in _k:
        CEILINGS[_k] += PUT
CHILDREN.update(CEILINGS)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(proc: subprocess.Popen[bytes], url: str, what: str) -> None:
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # the server answers (an error page is an answer)
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def start_moto(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(proc, url + "/moto-api/", "moto's S3 server")
    import boto3

    boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    ).create_bucket(Bucket="bench")
    return proc, {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
    }


S3RVER_JS = """
const S3rver = require('s3rver');
new S3rver({directory: process.argv[2], address: '127.0.0.1', port: +process.argv[3],
            silent: true, configureBuckets: [{name: 'bench', configs: []}]}).run();
"""


def start_s3rver(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]] | str:
    """s3rver 3.7.1 from npm, installed into ``work``; or why it cannot run."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        return "npm or node is not installed"
    prefix = work / "npm"
    log("installing s3rver@3.7.1 with npm ...")
    r = subprocess.run(
        [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "s3rver@3.7.1"],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        return f"npm install s3rver failed: {r.stderr.strip()[-500:]}"
    (work / "s3rver.js").write_text(S3RVER_JS)
    (work / "s3rver-data").mkdir()
    port = free_port()
    # s3rver makes list continuation tokens with DES: OpenSSL 3 needs the legacy provider
    proc = subprocess.Popen(
        [
            node,
            "--openssl-legacy-provider",
            str(work / "s3rver.js"),
            str(work / "s3rver-data"),
            str(port),
        ],
        env={**os.environ, "NODE_PATH": str(prefix / "node_modules")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, url + "/bench", "s3rver")
    return proc, {
        "key": "S3RVER",
        "secret": "S3RVER",
        "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
    }


def run_child(name: str, args: Sequence[str], opts: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "BENCH_OPTS": json.dumps(opts), "BENCH_CAP": CAP[0]}
    proc = subprocess.run(
        [PY, "-c", CHILDREN[name], *args], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def bench_server(
    server: str, opts: dict[str, Any], work: Path, src: Path, size: int, args: Any
) -> dict[str, Any]:
    """Every variant against one server; the medians."""
    import s3fs

    only = set(args.only or ["split", "load"])
    fs = s3fs.S3FileSystem(**opts)
    log(f"[{server}] uploading {size / 1e9:.2f} GB ...")
    fs.put(str(src) + "/", "bench/src/", recursive=True)
    fs.put(str(work / "shards") + "/", "bench/shards/", recursive=True)
    obj = next(p for p in fs.ls("bench/src") if p.endswith(".safetensors"))
    variants: dict[str, list[str]] = {
        "ceiling: one whole GET": [obj],
        "ceiling: 8 parallel 8 MiB ranged GETs": [obj],
        "ceiling: multipart PUT, 1 part in flight": ["bench/ceiling-put", str(size)],
        "ceiling: multipart PUT, 8 parts in flight": ["bench/ceiling-put", str(size)],
    }
    if "split" in only:
        variants["ceiling: copy through the client, 8 in flight"] = [obj, "bench/ceiling-copy"]
        variants["split local->s3, client set up first"] = [str(src), "s3://bench/out-up"]
        variants["split s3->s3"] = ["s3://bench/src", "s3://bench/out"]
        variants["split s3->s3, client set up first"] = ["s3://bench/src", "s3://bench/out3"]
        variants["split s3->s3, streamed (no server copy)"] = ["s3://bench/src", "s3://bench/out2"]
        if server == "moto":  # the local and naive routes once, beside moto
            variants["split local"] = [str(src), str(work / "out-local")]
        variants["split naive (download, then split)"] = [
            "s3://bench/src",
            str(work / "out-naive"),
            str(work / "dl-split"),
        ]
    if "load" in only:
        variants["ceiling: 8 parallel 8 MiB ranged GETs, kept"] = [obj]
        variants["load s3"] = ["s3://bench/shards"]
        variants["load s3, client set up first"] = ["s3://bench/shards"]
        if server == "moto":
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
            # what the last variant wrote (a split's output stays; the PUT ceilings delete
            # their object) is flushed now, not by the kernel during the next variant
            os.sync()
            got = run_child(n, variants[n], opts)
            runs[n].append(got)
            log(
                f"  [{server}] round {r + 1} {n}: {got['s']:.2f} s, "
                f"peak RSS {got['rss'] / 1e6:.0f} MB"
            )
    summary: dict[str, Any] = {}
    for n, rs in runs.items():
        t = statistics.median(x["s"] for x in rs)
        nbytes = rs[-1].get("bytes", size) if n.startswith("ceiling") else size
        summary[n] = {
            "median_s": t,
            "rounds": len(rs),
            "MB/s": nbytes / t / 1e6,
            "peak_rss_MB": max(x["rss"] for x in rs) / 1e6,
            **({"remote": rs[-1]["stats"]} if "stats" in rs[-1] else {}),
            **({"puts": rs[-1]["puts"]} if "puts" in rs[-1] else {}),
            **({"copies": rs[-1]["copies"]} if "copies" in rs[-1] else {}),
        }
    ratios = {}
    get8 = summary["ceiling: 8 parallel 8 MiB ranged GETs"]["MB/s"]
    put8 = summary["ceiling: multipart PUT, 8 parts in flight"]["MB/s"]
    if "load s3" in summary:
        ratios["load s3 / 8 parallel ranged GETs"] = summary["load s3"]["MB/s"] / get8
    if "load s3, client set up first" in summary:
        warm = summary["load s3, client set up first"]["MB/s"]
        ratios["load s3, client set up first / 8 parallel ranged GETs"] = warm / get8
        kept = summary["ceiling: 8 parallel 8 MiB ranged GETs, kept"]["MB/s"]
        ratios["load s3, client set up first / 8 parallel ranged GETs, kept"] = warm / kept
    copy = summary.get("ceiling: copy through the client, 8 in flight", {}).get("MB/s")
    for n in (
        "split local->s3, client set up first",
        "split s3->s3",
        "split s3->s3, client set up first",
        "split s3->s3, streamed (no server copy)",
    ):
        if n in summary:
            ratios[f"{n} / multipart PUT 8 in flight"] = summary[n]["MB/s"] / put8
            if copy and "s3->s3" in n:
                ratios[f"{n} / copy through the client"] = summary[n]["MB/s"] / copy
    for k in ("dl-split", "dl-load", "out-local", "out-naive"):
        shutil.rmtree(work / k, ignore_errors=True)
    return {"variants": summary, "ratios": ratios}


def random_checkpoint(folder: Path, size_mb: int) -> None:
    """``model.safetensors`` in ``folder``: random F16 tensors of 16 MiB, ``size_mb`` MB."""
    from safeshard.format.header import TensorSpec, build_header

    n = 8 * 2**20  # elements: 16 MiB
    count = max(1, size_mb * 10**6 // (2 * n))
    specs = [
        TensorSpec(f"model.layers.{i}.mlp.up_proj.weight", "F16", (n,), 2 * n) for i in range(count)
    ]
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(build_header(specs, {"format": "pt"}))
        for spec in specs:
            f.write(os.urandom(spec.nbytes))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=6, help="blocks of the 7B GPTQ preset")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["split", "load"], action="append")
    ap.add_argument("--server", choices=["moto", "s3rver"], action="append")
    ap.add_argument(
        "--size-mb",
        type=int,
        help="instead of the GPTQ preset, a checkpoint of random 16 MiB tensors this big",
    )
    ap.add_argument("--shard-size", default="300MB", help="the S3 -> S3 split's cap")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    servers = args.server or ["moto", "s3rver"]
    CAP[0] = args.shard_size
    work = Path(tempfile.mkdtemp(prefix="safeshard-s3-bench-"))
    results: dict[str, Any] = {"cpus": os.cpu_count(), "servers": {}}
    try:
        src = work / "src"
        if args.size_mb:
            log(f"writing a {args.size_mb} MB checkpoint of random 16 MiB F16 tensors ...")
            random_checkpoint(src, args.size_mb)
        else:
            log(f"synthesizing llama-2-7b-gptq ({args.layers} layers) ...")
            synth = ["synth", str(src), "--preset", "llama-2-7b-gptq", "--layers"]
            subprocess.run(
                [PY, "-m", "safeshard", *synth, str(args.layers), "--quiet"],
                check=True,
                capture_output=True,
            )
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        results["size"] = size
        # a sharded copy to load from, on every side
        subprocess.run(
            [
                PY,
                "-m",
                "safeshard",
                "split",
                str(src),
                str(work / "shards"),
                "-s",
                CAP[0],
                "--quiet",
            ],
            check=True,
            capture_output=True,
        )
        for server in servers:
            started = start_moto(work) if server == "moto" else start_s3rver(work)
            if isinstance(started, str):
                log(f"[{server}] skipped: {started}")
                results["servers"][server] = {"skipped": started}
                continue
            proc, opts = started
            try:
                results["servers"][server] = bench_server(server, opts, work, src, size, args)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    for server, res in results["servers"].items():
        print(f"\n{server}: {res.get('skipped') or ''}")
        if "variants" not in res:
            continue
        print(
            f"{'variant':<50} | median s | MB/s  | peak RSS MB | "
            "most GETs / PUTs / server copies in flight"
        )
        for n, v in res["variants"].items():
            rem, puts, copies = v.get("remote"), v.get("puts"), v.get("copies")
            flight = "-"
            if rem:
                flight = f"{rem['max_requests_in_flight']}"
                if puts:
                    flight += f" / {puts['max_requests_in_flight']}"
                if copies:
                    flight += f" / {copies['max_requests_in_flight']}"
            print(
                f"{n:<50} | {v['median_s']:>8.2f} | {v['MB/s']:>5.0f} | "
                f"{v['peak_rss_MB']:>11.0f} | {flight}"
            )
        for k, ratio in res["ratios"].items():
            print(f"  ratio {k}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
