"""``safeshard demo``: the main job, end to end, on a small generated sample."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click

from safeshard.cli.app import SIZE, line, main, out, say
from safeshard.cli.inspect_cmd import render as render_inspect
from safeshard.cli.split_cmd import render as render_split
from safeshard.cli.verify_cmd import render as render_verify
from safeshard.io.copier import hash_file
from safeshard.ops.inspect import inspect
from safeshard.ops.merge import merge
from safeshard.ops.split import split
from safeshard.ops.synth import synthesize
from safeshard.ops.verify import verify
from safeshard.runtime.lazy import open as lazy_open
from safeshard.runtime.load import load
from safeshard.sizes import format_size


def _step(n: int, title: str) -> None:
    out.print()
    out.rule(line((f"{n}. {title}", "bold")))


@main.command("demo")
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the sample and its shards here and keep them (default: a temp folder, removed).",
)
@click.option(
    "--max-shard-size",
    "cap",
    type=SIZE,
    default="700KB",
    show_default=True,
    help="Cap for the demo split (the sample is about 1.8 MB).",
)
def demo_cmd(keep: Path | None, cap: int) -> None:
    """Make a tiny GPTQ checkpoint, then inspect, split, verify, merge and load it."""
    work = Path(tempfile.mkdtemp(prefix="safeshard-demo-")) if keep is None else keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        _run(work, cap)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, cap: int) -> None:
    src_dir = work / "tiny-gptq"
    out_dir = work / "tiny-gptq-sharded"

    _step(1, "synthesize a tiny GPTQ Llama (what AutoGPTQ writes: one file)")
    synthesize(src_dir, "tiny-gptq", force=True)
    for p in sorted(src_dir.iterdir()):
        say(f"  {p.name:<40} {p.stat().st_size:>10,} bytes")
    weights = next(src_dir.glob("*.safetensors"))

    _step(2, f"safeshard inspect {src_dir.name} --max-shard-size {format_size(cap)}")

    render_inspect(inspect(src_dir, cap=cap))

    _step(3, f"safeshard split {src_dir.name} {out_dir.name} --max-shard-size {format_size(cap)}")
    t0 = time.perf_counter()
    result = split(src_dir, out_dir, max_shard_size=cap, force=True)
    render_split(result, quiet=False)
    say(f"  ({time.perf_counter() - t0:.2f} s)")

    _step(4, f"safeshard verify {out_dir.name} --against {weights.name}")
    report = verify(out_dir, against=weights, max_shard_size=cap)
    render_verify(report)

    _step(5, "safeshard merge: back to the original file, byte for byte")
    merged = work / "merged.safetensors"
    merge(out_dir, merged, force=True)
    same = hash_file(merged) == hash_file(weights)
    say(
        f"  sha256({merged.name}) {'==' if same else '!='} sha256({weights.name}): "
        f"{'identical' if same else 'DIFFERENT'}"
    )
    merged.unlink()

    _step(6, "safeshard.load (parallel) and safeshard.open (budgeted layer walk)")
    _load(out_dir)


def _load(out_dir: Path) -> None:

    try:
        import torch  # noqa: F401

        framework = "torch"
    except ImportError:
        try:
            import numpy  # noqa: F401

            framework = "numpy"
        except ImportError:
            say("  skipped: install safeshard[numpy] or safeshard[torch] to load tensors")
            return
    t0 = time.perf_counter()
    tensors = load(out_dir, framework=framework)  # type: ignore[arg-type]
    took = time.perf_counter() - t0
    say(f"  load({framework}): {len(tensors)} tensors in {took * 1000:.1f} ms")
    budget = 400_000
    with lazy_open(out_dir, max_resident_bytes=budget, prefetch=1, framework=framework) as ckpt:  # type: ignore[arg-type]
        for name, layer in ckpt.iter_layers():
            size = sum(int(t.nbytes) for t in layer.values())
            say(f"  walk: {name:<28} {len(layer):>3} tensors {format_size(size):>10}")
        peak = ckpt.peak_resident_bytes
    say(
        f"  (the walk held at most {format_size(peak)} of tensors at once; "
        f"budget {format_size(budget)})"
    )
