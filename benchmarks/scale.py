"""safeshard at scale: a million tensors, and a header at the format's 100 MB limit.

Run with ``make bench-scale`` or ``python benchmarks/scale.py [--tensors N]``. For each
case it writes a valid safetensors file of N zero-size tensors (an MoE-like layout:
``model.layers.L.experts.E.wK.weight``, so blocks have thousands of modules) plus a
few real tensors, under the system temp folder, then runs each step in a subprocess
of its own and reports its wall time and peak RSS:

- ``inspect`` (the library call, with the split's cap);
- ``split`` to a folder, with a cap of a quarter of the header, so that the headers
  alone make several shards;
- ``verify`` of the split (manifest: every file hashed);
- ``merge`` of the split back into one file (byte-identical to the source);
- ``open``: ``safeshard.open`` of the split, iterating every name.

Cases: ``N tensors`` (compact names, about 90 header bytes per tensor) and
``near limit`` (the same N, names padded so that the header JSON is
99,999,992 bytes, 8 under the official reader's limit, with a run of leading
whitespace as a writer aligning the data section would put there).

Memory should be proportional to the header: the table divides the peak RSS by the
header size (a child that only imports safeshard is the baseline row). Timings on a
shared machine are noisy: compare rows of one run, not runs.

Everything it writes lives under one temp folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

PY = sys.executable
LIMIT = 100_000_000
NEAR_LIMIT = LIMIT - 8
REAL = (  # (name, dtype, shape): a few tensors with data, so split and merge move bytes
    ("model.embed_tokens.weight", "F16", (64, 32)),
    ("model.norm.weight", "F16", (32,)),
    ("lm_head.weight", "F16", (64, 32)),
)
STEPS = ("inspect", "split", "verify", "merge", "open")

# One child per step: it gets the paths as argv and does one library call.
CHILD = {
    "import": "import safeshard",
    "inspect": (
        "import sys, safeshard\n"
        "r = safeshard.inspect(sys.argv[1], int(sys.argv[2]))\n"
        "assert r.tensor_count == int(sys.argv[3]), r.tensor_count\n"
    ),
    "split": (
        "import sys, safeshard\n"
        "r = safeshard.split(sys.argv[1], sys.argv[2], max_shard_size=int(sys.argv[3]))\n"
        "print(len(r.files))\n"
    ),
    "verify": (
        "import sys, safeshard\n"
        "r = safeshard.verify(sys.argv[1])\n"
        "assert r.ok, [f.message for f in r.findings[:3]]\n"
        "assert r.tensors == int(sys.argv[2]) and 'manifest' in r.checks\n"
    ),
    "merge": "import sys, safeshard\nsafeshard.merge(sys.argv[1], sys.argv[2])\n",
    "open": (
        "import sys, safeshard\n"
        "with safeshard.open(sys.argv[1], framework='numpy') as ck:\n"
        "    n = sum(1 for _ in ck)\n"
        "assert n == int(sys.argv[2]), n\n"
    ),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_measured(step: str, args: Sequence[str]) -> tuple[float, int, str]:
    """Run one step in a child; (wall seconds, peak RSS bytes of the child, its stdout)."""
    cmd = [PY, "-c", CHILD[step], *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{step} failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
        return wall, usage.ru_maxrss * 1024, out.read().decode().strip()


# --------------------------------------------------------------------------- the file


def entry(name: str, dtype: str, shape: Sequence[int], begin: int, end: int) -> str:
    dims = ",".join(map(str, shape))
    return (
        f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":[{dims}],"data_offsets":[{begin},{end}]}}'
    )


def zero_name(i: int, per_layer: int, pad: str) -> str:
    layer, rest = divmod(i, per_layer)
    expert, k = divmod(rest, 3)
    return f"model.layers.{layer}.experts.{expert}.w{k + 1}{pad}.weight"


def write_checkpoint(path: Path, n: int, near_limit: bool) -> tuple[int, int]:
    """Write the file; return (tensor count, header length N)."""
    layers = 64
    per_layer = max(1, -(-n // layers))
    parts = ['"__metadata__":{"format":"pt"}']
    data_size = 0
    for name, dtype, shape in REAL:
        nbytes = 2
        for d in shape:
            nbytes *= d
        parts.append(entry(name, dtype, shape, data_size, data_size + nbytes))
        data_size += nbytes
    zero_tail = f'{{"dtype":"BF16","shape":[0],"data_offsets":[{data_size},{data_size}]}}'
    pad = ""
    if near_limit:
        # bytes for n entries with no padding, then spread what is left over the names
        fixed = sum(len(p) + 1 for p in parts) + 1
        base = sum(len(zero_name(i, per_layer, "")) + 4 + len(zero_tail) for i in range(n))
        room = NEAR_LIMIT - 64 - fixed - base
        if room < 0:
            raise SystemExit(f"{n} tensors do not fit in a {NEAR_LIMIT}-byte header")
        pad = "_" * (room // n)
    parts.extend(f'"{zero_name(i, per_layer, pad)}":{zero_tail}' for i in range(n))
    body = ("{" + ",".join(parts) + "}").encode()
    if near_limit:
        lead = NEAR_LIMIT - len(body)
        body = b" " * lead + body  # leading JSON whitespace: valid since safetensors 0.8
    else:
        body += b" " * (-len(body) % 8)
    assert len(body) <= LIMIT
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)))
        f.write(body)
        f.write(bytes(range(256)) * (data_size // 256) + bytes(data_size % 256))
    return n + len(REAL), len(body)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- one case


def run_case(work: Path, label: str, n: int, near_limit: bool) -> list[dict[str, object]]:
    folder = work / label.replace(" ", "-")
    folder.mkdir()
    src = folder / "src" / "model.safetensors"
    src.parent.mkdir()
    log(f"[{label}] writing {n:,} zero-size tensors ...")
    # in a child, so that this process stays small: a child's peak RSS counts the
    # parent's pages it was forked from
    made = subprocess.run(
        [PY, __file__, "--write", str(src), "--tensors", str(n), *(["--near"] * near_limit)],
        check=True,
        capture_output=True,
        text=True,
    )
    count, header = map(int, made.stdout.split())
    log(f"[{label}] header {header:,} bytes, file {src.stat().st_size:,} bytes")
    cap = header // 4
    out, merged = folder / "split", folder / "merged.safetensors"
    args = {
        "import": [],
        "inspect": [str(src), str(cap), str(count)],
        "split": [str(src), str(out), str(cap)],
        "verify": [str(out), str(count)],
        "merge": [str(out), str(merged)],
        "open": [str(out), str(count)],
    }
    rows: list[dict[str, object]] = []
    for step in ("import", *STEPS):
        log(f"[{label}] {step} ...")
        wall, rss, stdout = run_measured(step, args[step])
        note = f"{stdout} shards" if step == "split" else ""
        if step == "merge":
            same = sha256(merged) == sha256(src)
            note = "byte-identical to the source" if same else "DIFFERS from the source"
            if not same:
                raise SystemExit(f"[{label}] merge did not restore the source")
        rows.append(
            {
                "case": label,
                "step": step,
                "tensors": count,
                "header": header,
                "wall_s": round(wall, 2),
                "peak_rss": rss,
                "rss_per_header": round(rss / header, 2),
                "note": note,
            }
        )
        log(f"[{label}] {step}: {wall:.2f} s, {rss / 1e6:.0f} MB")
    shutil.rmtree(folder)
    return rows


def table(rows: Sequence[dict[str, object]]) -> str:
    head = ("case", "step", "tensors", "header MB", "wall s", "peak RSS MB", "RSS/header", "")
    lines = [head]
    for r in rows:
        lines.append(
            (
                str(r["case"]),
                str(r["step"]),
                f"{r['tensors']:,}",
                f"{int(r['header']) / 1e6:.1f}",  # type: ignore[call-overload]
                f"{r['wall_s']:.2f}",
                f"{int(r['peak_rss']) / 1e6:.0f}",  # type: ignore[call-overload]
                f"{r['rss_per_header']:.2f}",
                str(r["note"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if j == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=1_000_000, help="zero-size tensors per file")
    ap.add_argument(
        "--case",
        choices=("all", "tensors", "near-limit"),
        default="all",
        help="which case to run (default: both)",
    )
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # the file-writing child
    ap.add_argument("--near", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write is not None:
        print(*write_checkpoint(args.write, args.tensors, args.near))
        return 0
    work = Path(tempfile.mkdtemp(prefix="safeshard-scale-"))
    rows: list[dict[str, object]] = []
    try:
        if args.case in ("all", "tensors"):
            rows += run_case(work, f"{args.tensors:,} tensors", args.tensors, False)
        if args.case in ("all", "near-limit"):
            rows += run_case(work, "near limit", args.tensors, True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
