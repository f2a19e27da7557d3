"""``safeshard load-bench PATH``: load throughput and peak memory on this machine.

Each variant runs in a fresh Python process, so peak RSS (``ru_maxrss``) belongs to
that variant alone; each child first imports torch, safetensors and safeshard and
records its RSS after imports, then (``--cold``) evicts every shard from the page
cache with ``posix_fadvise(DONTNEED)``, then times the variant:

- ``sequential``: :func:`safeshard.load` with one worker;
- ``parallel``: :func:`safeshard.load` with ``--workers`` threads;
- ``walk``: a layer walk of :func:`safeshard.open` under ``--budget`` with prefetch 1;
- ``baseline``: ``safetensors.torch.load_file`` of each shard in turn, every tensor
  cloned and kept (both sides end with owned tensors);
- ``fault`` (warm only): allocating the same tensors and writing every byte, the cost
  of faulting in fresh memory, which bounds any loader of owned tensors;
- ``walk+work`` with prefetch 0 and 1: the budgeted walk with simulated work per layer
  (a sleep of ``layer bytes / --work-rate``). From the prefetch-0 run's per-layer
  reads and work, ``prefetch_ideal_on_s`` is the time with perfect overlap (each
  layer's read hidden under the previous layer's work); ``prefetch_overlap_fraction``
  is the time prefetch saved over the time it could save.

Variants run ``--repeats`` times in rotating order; medians are reported.

PATH may be a URL (``s3://bucket/model``, with ``--storage-option``): there is no local
page cache to evict or fill, so the runs are labelled ``remote`` (``--cold``/``--warm``
are refused), and the baseline fetches each object whole and loads it with
``safetensors.torch.load``. The storage options reach each child on its standard input,
never on its command line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

import safeshard
from safeshard.checkpoint import open_checkpoint
from safeshard.cli._text import safe
from safeshard.cli.app import (
    LOCATION,
    SIZE,
    emit_json,
    err,
    json_option,
    line,
    main,
    out,
    say,
    storage_option,
)
from safeshard.errors import MissingExtraError, SafeshardError, UsageError
from safeshard.io.store import as_path, is_remote
from safeshard.runtime.readers import CHUNK_BYTES, default_workers
from safeshard.sizes import format_size

LOAD_VARIANTS = ("sequential", "parallel", "walk", "baseline")
WARM_ONLY = ("fault",)
WORK_VARIANTS = ("walk+work prefetch 0", "walk+work prefetch 1")
ALL_VARIANTS = LOAD_VARIANTS + WARM_ONLY + WORK_VARIANTS


@main.command("load-bench")
@click.argument("path", type=LOCATION)
@click.option("--workers", "-j", type=click.IntRange(min=1), help="Threads for parallel loads.")
@click.option(
    "--budget",
    type=SIZE,
    default="1GiB",
    show_default=True,
    help="max_resident_bytes of the layer walks.",
)
@click.option("--cold", "mode", flag_value="cold", help="Only cold-cache runs (shards evicted).")
@click.option("--warm", "mode", flag_value="warm", help="Only warm-cache runs.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--work-rate",
    type=SIZE,
    default="1GB",
    show_default=True,
    help="Simulated work per second of the walk+work variants (bytes of layer per second).",
)
@click.option(
    "--variant",
    "variants",
    multiple=True,
    type=click.Choice(ALL_VARIANTS),
    help="Run only these variants (repeatable). Default: all.",
)
@storage_option
@json_option
def load_bench(
    path: str,
    workers: int | None,
    budget: int,
    mode: str | None,
    repeats: int,
    work_rate: int,
    variants: tuple[str, ...],
    storage_options: dict[str, Any] | None,
    as_json: bool,
) -> None:
    """Measure load throughput (GB/s) and peak RSS of PATH (file, folder or index).

    Runs cold (page cache evicted before each run) and warm by default; --cold or
    --warm picks one. Compare parallel against baseline, and walk's peak RSS against
    its RSS after imports plus the budget. PATH may be a URL (s3://...): the runs are
    then "remote" (no local cache to evict or fill).
    """
    missing = [m for m in ("torch", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"load-bench needs {' and '.join(missing)} (it compares against "
            "safetensors.torch.load_file); run: pip install 'safeshard[torch]' safetensors"
        )
    ckpt = open_checkpoint(path, storage_options=storage_options)
    remote = is_remote(ckpt.folder)
    if remote and mode:
        raise UsageError(
            f"--{mode} needs local files: {path} is in object storage, where each run reads "
            "the objects again (there is no local page cache to evict or fill); leave out "
            f"--{mode}"
        )
    files = [str(h.path) for h in ckpt.headers]
    total = ckpt.total_tensor_bytes
    nworkers = workers or default_workers()
    modes = ["remote"] if remote else [mode] if mode else ["cold", "warm"]
    chosen = list(variants) or list(ALL_VARIANTS)
    params = {
        "path": path,
        "files": files,
        "workers": nworkers,
        "budget": budget,
        "work_rate": work_rate,
        "storage_options": storage_options,
    }
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for m in modes:
        names = [
            v
            for v in chosen
            if (v not in WARM_ONLY or m != "cold") and (v not in WORK_VARIANTS or m == modes[-1])
        ]
        if not names:
            continue
        if m == "warm":
            _warm_up(files)
        runs[m] = _paired(names, m, params, repeats, quiet=as_json)
    result = {
        "path": path,
        "files": len(files),
        "file_bytes": ckpt.file_size,
        "tensor_bytes": total,
        "workers": nworkers,
        "budget": budget,
        "work_rate": work_rate,
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "runs": runs,
        "summary": _summary(runs, budget, total, work_rate),
    }
    if as_json:
        emit_json(result)
    else:
        _print_table(result)


def _paired(
    names: Sequence[str], mode: str, params: dict[str, Any], repeats: int, quiet: bool
) -> dict[str, dict[str, Any]]:
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(repeats):
        order = list(names[r % len(names) :]) + list(names[: r % len(names)])
        for n in order:
            if mode == "warm":
                _warm_up(params["files"])
            s = _run_child(n, mode, params)
            samples[n].append(s)
            if not quiet:
                err.print(
                    line(
                        f"  {mode} round {r + 1} {n}: {s['seconds']:.2f} s, "
                        f"{s['bytes'] / s['seconds'] / 1e9:.2f} GB/s, peak RSS "
                        f"{s['peak_rss'] / 1e6:.0f} MB"
                    )
                )
    out_: dict[str, dict[str, Any]] = {}
    for n, ss in samples.items():
        med = statistics.median(s["seconds"] for s in ss)
        nbytes = ss[0]["bytes"]
        peak = max(s["peak_rss"] for s in ss)
        base = statistics.median(s["rss_after_imports"] for s in ss)
        entry: dict[str, Any] = {
            "median_s": med,
            "times_s": [s["seconds"] for s in ss],
            "gbps": nbytes / med / 1e9 if med > 0 else None,
            "peak_rss": peak,
            "rss_after_imports": base,
            "peak_rss_over_imports": peak - base,
        }
        for key in ("work_s", "ideal_overlapped_s"):
            if key in ss[0]:
                entry[key] = statistics.median(s[key] for s in ss)
        out_[n] = entry
    return out_


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _summary(
    runs: dict[str, dict[str, dict[str, Any]]], budget: int, total: int, work_rate: int
) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for m, vs in runs.items():

        def g(v: str, key: str, vs: dict[str, dict[str, Any]] = vs) -> Any:
            return vs[v][key] if v in vs else None

        s[f"{m}_parallel_gbps"] = g("parallel", "gbps")
        s[f"{m}_baseline_gbps"] = g("baseline", "gbps")
        s[f"{m}_parallel_vs_baseline"] = _ratio(g("parallel", "gbps"), g("baseline", "gbps"))
        s[f"{m}_parallel_vs_sequential"] = _ratio(g("parallel", "gbps"), g("sequential", "gbps"))
        s[f"{m}_walk_vs_parallel"] = _ratio(g("walk", "gbps"), g("parallel", "gbps"))
        if "walk" in vs:
            over = vs["walk"]["peak_rss_over_imports"]
            s[f"{m}_walk_peak_rss_over_imports"] = over
            s[f"{m}_walk_rss_limit"] = budget + 150_000_000
            s[f"{m}_walk_rss_ok"] = over < budget + 150_000_000
        if "fault" in vs:
            s[f"{m}_fault_gbps"] = g("fault", "gbps")
            s[f"{m}_parallel_vs_fault"] = _ratio(g("parallel", "gbps"), g("fault", "gbps"))
        p0, p1 = g(WORK_VARIANTS[0], "median_s"), g(WORK_VARIANTS[1], "median_s")
        if p0 is not None and p1 is not None:
            ideal = vs[WORK_VARIANTS[0]].get("ideal_overlapped_s")
            possible = p0 - ideal if ideal is not None else None
            s["prefetch_off_s"] = p0
            s["prefetch_on_s"] = p1
            s["prefetch_work_s"] = total / work_rate
            s["prefetch_ideal_on_s"] = ideal
            s["prefetch_saved_s"] = p0 - p1
            s["prefetch_possible_s"] = possible
            s["prefetch_overlap_fraction"] = _ratio(p0 - p1, possible)
    return s


def _print_table(result: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(
        title=line(
            f"{result['path']}: {result['files']} file(s), "
            f"{format_size(result['tensor_bytes'])} of tensors, {result['workers']} workers, "
            f"budget {format_size(result['budget'])}"
        ),
        title_justify="left",
    )
    for col in ("cache", "variant", "median s", "GB/s", "peak RSS", "over imports"):
        t.add_column(col, justify="left" if col in ("cache", "variant") else "right")
    for m, vs in result["runs"].items():
        for v, e in vs.items():
            t.add_row(
                safe(m),
                safe(v),
                f"{e['median_s']:.2f}",
                f"{e['gbps']:.2f}" if e["gbps"] else "-",
                format_size(e["peak_rss"]),
                format_size(e["peak_rss_over_imports"]),
            )
    out.print(t)
    for k, v in result["summary"].items():
        if v is None:
            continue
        shown = f"{v:.2f}" if isinstance(v, float) else str(v)
        say(f"{k}: {shown}")


# --------------------------------------------------------------------------- processes


def _warm_up(files: Sequence[str]) -> None:
    """Read every file once so the page cache holds it."""
    buf = bytearray(8 << 20)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            pos = 0
            while n := os.preadv(fd, [buf], pos):
                pos += n
        finally:
            os.close(fd)


def _run_child(variant: str, mode: str, params: dict[str, Any]) -> dict[str, Any]:
    spec = json.dumps({"variant": variant, "mode": mode, **params})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = "from safeshard.cli.load_bench_cmd import child_main; child_main()"
    proc = subprocess.run(  # the spec on stdin: storage options stay off the command line
        [sys.executable, "-c", code],
        input=spec,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SafeshardError(
            f"load-bench variant {variant!r} ({mode}) failed with exit code {proc.returncode}: "
            f"{proc.stderr.strip()[-2000:]}"
        )
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``: now, ``VmHWM``: peak).

    ``ru_maxrss`` is only the fallback: Linux carries the parent's high-water mark
    into it across fork and exec.
    """
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover


def _rss_now() -> int:
    return _status_bytes("VmRSS")


def _evict(files: Sequence[str]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child_main() -> None:
    """Entry point of one measured run (a fresh process): prints one JSON line."""
    spec = json.loads(sys.stdin.read())
    import safetensors.torch
    import torch

    del safetensors, torch
    base = _rss_now()
    if spec["mode"] == "cold":
        _evict(spec["files"])
    t0 = time.perf_counter()
    extra = _VARIANTS[spec["variant"]](spec)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    ckpt = safeshard.open_checkpoint(spec["path"], storage_options=spec.get("storage_options"))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "bytes": ckpt.total_tensor_bytes,
                "peak_rss": peak,
                "rss_after_imports": base,
                **extra,
            }
        )
    )


def _v_load(spec: dict[str, Any], workers: int) -> dict[str, Any]:

    sd = safeshard.load(spec["path"], workers=workers, storage_options=spec.get("storage_options"))
    n = len(sd)
    del sd
    return {"tensors": n}


def _v_walk(spec: dict[str, Any], rate: int | None, prefetch: int) -> dict[str, Any]:

    waits: list[float] = []  # time the caller waited for each layer
    works: list[float] = []  # simulated work on each layer
    with safeshard.open(
        spec["path"],
        max_resident_bytes=spec["budget"],
        prefetch=prefetch,
        workers=spec["workers"],
        storage_options=spec.get("storage_options"),
    ) as lc:
        walk = lc.iter_layers()
        while True:
            t0 = time.perf_counter()
            item = next(walk, None)
            waits.append(time.perf_counter() - t0)
            if item is None:
                break
            layer = item[1]
            if rate:
                works.append(sum(t.nbytes for t in layer.values()) / rate)
                time.sleep(works[-1])
            del item, layer
        peak = lc.peak_resident_bytes
    out: dict[str, Any] = {"held_peak": peak}
    if rate:
        out["work_s"] = sum(works)
        if prefetch == 0:
            # Without prefetch each wait is that layer's read. With perfect overlap, the
            # read of layer i+1 hides under the work on layer i.
            reads = waits[: len(works)]
            ideal = reads[0] + works[-1]
            ideal += sum(max(w, r) for w, r in zip(works[:-1], reads[1:], strict=True))
            out["ideal_overlapped_s"] = ideal
    return out


def _v_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """``load_file`` of each shard; for objects in storage, each fetched whole with
    fsspec and loaded from those bytes with ``safetensors.torch.load``."""
    from safetensors.torch import load, load_file

    kept: dict[str, Any] = {}
    for f in spec["files"]:
        p = as_path(f, spec.get("storage_options"))
        sd = load(p.read_bytes()) if is_remote(p) else load_file(f)
        kept.update({k: v.clone() for k, v in sd.items()})
        del sd
    return {"tensors": len(kept)}


def _v_fault(spec: dict[str, Any]) -> dict[str, Any]:
    """Allocate every tensor and write all its bytes, in parallel chunks."""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    import torch

    ckpt = open_checkpoint(spec["path"], storage_options=spec.get("storage_options"))
    bufs = [torch.empty(e.info.nbytes, dtype=torch.uint8) for e in ckpt.entries.values()]
    pieces = [
        (b.data_ptr() + o, min(CHUNK_BYTES, b.numel() - o))
        for b in bufs
        for o in range(0, b.numel(), CHUNK_BYTES)
    ]
    with ThreadPoolExecutor(spec["workers"]) as ex:
        list(ex.map(lambda p: ctypes.memset(p[0], 0, p[1]), pieces))
    return {"tensors": len(bufs)}


_VARIANTS: dict[str, Any] = {
    "sequential": lambda s: _v_load(s, 1),
    "parallel": lambda s: _v_load(s, s["workers"]),
    "walk": lambda s: _v_walk(s, None, 1),
    "baseline": _v_baseline,
    "fault": _v_fault,
    "walk+work prefetch 0": lambda s: _v_walk(s, s["work_rate"], 0),
    "walk+work prefetch 1": lambda s: _v_walk(s, s["work_rate"], 1),
}
