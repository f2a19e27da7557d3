"""Benchmark: rank-local tensor-parallel loading against "load everything, then slice".

Run with ``make bench-tp`` (or ``python benchmarks/tp_bench.py --help``). In one run,
under one temporary folder removed at the end, it:

1. synthesizes a bf16 Llama (default about 2.2 GB: TinyLlama's shapes, hidden 2048,
   intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000; random bytes) split
   into 500 MB shards with its config.json;
2. for each round and each rank of ``--world-size`` (default 4), one after the other as if
   each rank were on its own host, cold (every shard evicted from the page cache with
   ``POSIX_FADV_DONTNEED``, and ``/proc/sys/vm/drop_caches`` when writable) before each
   route:

   - ``tp``: ``safeshard.load(path, tp_plan="auto", rank=r, world_size=N)``;
   - ``whole``: the route of transformers and vLLM's default loader, every rank reading
     the whole checkpoint (``safeshard.load``, the fastest whole-checkpoint reader here)
     and then cutting its slices out (``.contiguous()`` copies, by the same plan);

3. reports per rank the medians of the time and of the bytes read (for ``whole``,
   ``/proc/self/io`` ``rchar``: every byte the process's read calls returned; for ``tp``,
   ``ReadStats.bytes_read``: the bytes its read calls returned plus those it copied out
   of the mapped shards, where strided slices are copied from, gaps read through
   included), and the ratios tp / whole against the targets (bytes <= 0.3x, cold time
   <= 0.5x); also the bytes fetched from storage (``read_bytes``: whole pages, the
   readahead of dense strided slices included), the measure both routes share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import safeshard  # noqa: E402
from safeshard.ops.synth import Preset, synthesize  # noqa: E402
from safeshard.tpplan import RankPlan, ReadStats  # noqa: E402


def preset(layers: int) -> Preset:
    return Preset(
        name="tp-bench",
        description="TinyLlama shapes, bf16, random bytes",
        arch="llama",
        hidden=2048,
        intermediate=5632,
        layers=layers,
        heads=32,
        kv_heads=4,
        vocab=32000,
        dtype="BF16",
        fill="bytes",
    )


def evict(folder: Path) -> None:
    """Drop the checkpoint's pages from the page cache."""
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        os.sync()
        f.write("3\n")
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def io() -> tuple[int, int]:
    """``rchar`` (bytes the read calls returned) and ``read_bytes`` (bytes fetched from
    storage, readahead included) of this process."""
    vals = dict(
        line.split(": ") for line in Path("/proc/self/io").read_text().splitlines() if ": " in line
    )
    return int(vals.get("rchar", 0)), int(vals.get("read_bytes", 0))


def slice_whole(tensors: dict[str, Any], plan: RankPlan) -> dict[str, Any]:
    """The whole-checkpoint route's second step: cut the rank's slices out (copies)."""
    import torch

    out = {}
    for name, t in tensors.items():
        sl = plan.slice_of(plan.tensors[name])
        if sl.dim is None:
            out[name] = t
        else:
            out[name] = torch.cat([t.narrow(sl.dim, a, b - a) for a, b in sl.intervals], sl.dim)
    return out


def run(folder: Path, world: int, rounds: int) -> dict[str, Any]:
    import torch

    ckpt = safeshard.open_checkpoint(folder)
    tensors = {n: e.info for n, e in ckpt.entries.items()}
    total = sum(i.nbytes for i in tensors.values())
    rows: dict[tuple[str, int], list[tuple[float, int, int]]] = {}
    check_done = False
    for rnd in range(rounds):
        for rank in range(world):
            plan = RankPlan.build(
                "auto", rank, world, folder=folder, tensors=tensors, metadata=ckpt.metadata
            )
            order = ("tp", "whole") if (rnd + rank) % 2 == 0 else ("whole", "tp")
            got: dict[str, dict[str, Any]] = {}
            for route in order:
                evict(folder)
                before, t0 = io(), time.perf_counter()
                if route == "tp":
                    stats = ReadStats()
                    out = safeshard.load(
                        folder, tp_plan="auto", rank=rank, world_size=world, tp_stats=stats
                    )
                else:
                    out = slice_whole(safeshard.load(folder), plan)
                dt = time.perf_counter() - t0
                after = io()
                # tp: the bytes its reads returned or it copied out of mapped pages (strided
                # slices); whole: what its read calls returned (rchar)
                got_bytes = stats.bytes_read if route == "tp" else after[0] - before[0]
                rows.setdefault((route, rank), []).append((dt, got_bytes, after[1] - before[1]))
                if not check_done:
                    got[route] = out
                del out
            if not check_done:
                for k in got["tp"]:
                    a, b = got["tp"][k], got["whole"][k]  # random bytes: compare bits, not NaNs
                    if not torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8)):
                        raise SystemExit(f"rank {rank}: tensor {k} differs between the routes")
                check_done = True
                got.clear()
    report: dict[str, Any] = {"world_size": world, "rounds": rounds, "tensor_bytes": total}
    per_rank = []
    for rank in range(world):
        tp_t = statistics.median(r[0] for r in rows[("tp", rank)])
        wh_t = statistics.median(r[0] for r in rows[("whole", rank)])
        tp_b = statistics.median(r[1] for r in rows[("tp", rank)])
        wh_b = statistics.median(r[1] for r in rows[("whole", rank)])
        tp_d = statistics.median(r[2] for r in rows[("tp", rank)])
        wh_d = statistics.median(r[2] for r in rows[("whole", rank)])
        per_rank.append(
            {
                "rank": rank,
                "tp_s": round(tp_t, 3),
                "whole_s": round(wh_t, 3),
                "tp_bytes": tp_b,
                "whole_bytes": wh_b,
                "time_ratio": round(tp_t / wh_t, 3),
                "bytes_ratio": round(tp_b / wh_b, 3),
                "tp_disk_bytes": tp_d,
                "whole_disk_bytes": wh_d,
            }
        )
    report["ranks"] = per_rank
    report["median_time_ratio"] = statistics.median(r["time_ratio"] for r in per_rank)
    report["median_bytes_ratio"] = statistics.median(r["bytes_ratio"] for r in per_rank)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="single loads vary by 0.1 s here")
    ap.add_argument("--layers", type=int, default=22, help="22: about 2.2 GB")
    ap.add_argument("--keep", type=Path, help="work in this folder and reuse the model there")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="safeshard-tp-bench-"))
    try:
        model = tmp / "model"
        if not (model / "config.json").exists():
            src = tmp / "src"
            synthesize(src, preset(args.layers), tokenizer=False, force=True)
            safeshard.split(src, model, max_shard_size="500MB")
            for extra in ("config.json",):
                shutil.copy(src / extra, model / extra)
            shutil.rmtree(src)
        rep = run(model, args.world_size, args.rounds)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    gb = rep["tensor_bytes"] / 1e9
    print(
        f"bf16 Llama, {gb:.2f} GB of tensors, world size {rep['world_size']}, "
        f"{rep['rounds']} rounds, cold, ranks one after the other; medians"
    )
    head = ("rank", "tp s", "whole s", "time", "tp MB", "whole MB", "bytes", "disk MB tp/whole")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (4, 8, 8, 6, 9, 9, 6, 17), strict=True)))
    for r in rep["ranks"]:
        disk = f"{r['tp_disk_bytes'] / 1e6:.0f}/{r['whole_disk_bytes'] / 1e6:.0f}"
        print(
            f"{r['rank']:>4} {r['tp_s']:>8.2f} {r['whole_s']:>8.2f} {r['time_ratio']:>5.2f}x "
            f"{r['tp_bytes'] / 1e6:>9.0f} {r['whole_bytes'] / 1e6:>9.0f} {r['bytes_ratio']:>5.2f}x "
            f"{disk:>17}"
        )
    t, b = rep["median_time_ratio"], rep["median_bytes_ratio"]
    print(
        f"median over ranks: time {t:.2f}x (target <= 0.5x: {'met' if t <= 0.5 else 'NOT met'}), "
        f"bytes {b:.2f}x (target <= 0.3x: {'met' if b <= 0.3 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
