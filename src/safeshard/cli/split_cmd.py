"""``safeshard split SRC OUT_DIR``: layer-aligned, size-true, streaming, crash-safe."""

from __future__ import annotations

import functools
import json
from typing import Any

import click

from safeshard.cli._text import safe
from safeshard.cli.app import (
    LOCATION,
    SIZE,
    byte_progress,
    emit_json,
    json_option,
    main,
    say,
    storage_option,
    warn,
)
from safeshard.cli.app import quiet_option as quiet_opt
from safeshard.cli.split_update import run_update
from safeshard.ops.split import DEFAULT_MAX_SHARD_SIZE, SplitResult, describe, split
from safeshard.ops.tpsplit import TpSplitResult
from safeshard.sizes import format_size


@main.command("split")
@click.argument("src", type=LOCATION)
@click.argument("out_dir", type=LOCATION)
@click.option(
    "--max-shard-size",
    "-s",
    "cap",
    type=SIZE,
    default=DEFAULT_MAX_SHARD_SIZE,
    show_default=True,
    help="Cap on each whole file (header included): 4GB, 500MiB, fat32, bytes.",
)
@click.option("--balance", is_flag=True, help="Same shard count, sizes as even as possible.")
@click.option(
    "--allow-oversize",
    is_flag=True,
    help="Put a tensor larger than the cap alone in its own oversized shard (with a warning).",
)
@click.option(
    "--name",
    "base",
    default="model",
    show_default=True,
    help="Base name: BASE-00001-of-0000N.safetensors and BASE.safetensors.index.json.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--resume", is_flag=True, help="Keep finished shards that match the plan.")
@click.option("--force", is_flag=True, help="Replace a checkpoint already in OUT_DIR.")
@click.option(
    "--update",
    is_flag=True,
    help="OUT_DIR holds an earlier split of an older version: rewrite only the shards "
    "whose tensors changed (cap and name default to the earlier split's).",
)
@click.option(
    "--sha256",
    is_flag=True,
    help="Also record each shard's SHA-256 (the Hub's LFS id), hashed in parallel. The "
    "default integrity record (header and tensor digests) covers every byte without it.",
)
@click.option(
    "--break-lock",
    is_flag=True,
    help="Object storage: take over the prefix's lock object even if its writer may be alive "
    "(only when you know it died).",
)
@click.option(
    "--tp",
    "tp",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Tensor parallelism: write one checkpoint per rank, OUT_DIR/rank-0000r-of-0000N/, "
    "each holding that rank's slices, and OUT_DIR/tp.json (merge rebuilds the source).",
)
@click.option(
    "--tp-plan",
    "tp_plan_arg",
    default="auto",
    show_default=True,
    metavar="auto|FILE.json",
    help="With --tp: the model's own plan from transformers (auto), or a JSON file of "
    "name patterns to styles.",
)
@storage_option
@json_option
@quiet_opt
def split_cmd(
    src: str,
    out_dir: str,
    cap: int,
    balance: bool,
    allow_oversize: bool,
    base: str,
    dry_run: bool,
    resume: bool,
    force: bool,
    update: bool,
    sha256: bool,
    break_lock: bool,
    tp: int | None,
    tp_plan_arg: str,
    storage_options: dict[str, Any] | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Split SRC (a .safetensors file, a model folder, or an index to reshard) into OUT_DIR.

    Shards keep whole transformer layers together, every file stays within the cap
    with its header, tensor bytes are copied by byte ranges, and a folder with an
    index is always complete. A manifest (BASE.safeshard.json) records shard and
    tensor digests and the original header, so `safeshard merge` restores the
    original file exactly.

    With --tp N, OUT_DIR gets one such checkpoint per tensor-parallel rank
    (rank-00000-of-0000N/ ...), each tensor sliced as `safeshard.load(SRC,
    tp_plan=..., rank=r, world_size=N)` slices it, and tp.json, the plan and every
    slice; `safeshard merge OUT_DIR FILE` rebuilds the unsharded checkpoint.
    """
    tp_plan: dict[str, str] | str = "auto"
    if tp is None and tp_plan_arg != "auto":
        raise click.UsageError("--tp-plan needs --tp N")
    if tp is not None:
        if update:
            raise click.UsageError("--update and --tp cannot be combined")
        if tp_plan_arg != "auto":
            tp_plan = _read_plan(tp_plan_arg)
    run = functools.partial(
        split,
        src,
        out_dir,
        max_shard_size=cap,
        balance=balance,
        allow_oversize=allow_oversize,
        name=base,
        resume=resume,
        force=force,
        sha256=sha256,
        storage_options=storage_options,
        break_lock=break_lock,
        tp=tp,
        tp_plan=tp_plan,
    )
    if update:
        run_update(
            src,
            out_dir,
            cap=cap,
            base=base,
            allow_oversize=allow_oversize,
            dry_run=dry_run,
            balance=balance,
            resume=resume,
            force=force,
            sha256=sha256,
            storage_options=storage_options,
            break_lock=break_lock,
            as_json=as_json,
            quiet=quiet,
        )
        return
    planned = run(dry_run=True)
    if dry_run:
        result = planned
    else:
        total = sum(f.size for f in planned.files)
        with byte_progress(total, "split", quiet or as_json) as advance:
            result = run(progress=advance)
    if as_json:
        emit_json(result.to_json())
        return
    render(result, quiet)


def _read_plan(path: str) -> dict[str, str]:
    """The plan in the JSON file at ``path``: an object of name patterns to styles."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"{path}: {e}", param_hint="--tp-plan") from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in obj.items()
    ):
        raise click.BadParameter(
            f"{path}: not a JSON object of name patterns to styles", param_hint="--tp-plan"
        )
    return obj


def render(result: SplitResult, quiet: bool) -> None:
    """Human output: warnings on stderr, the plan or what was written on stdout."""
    for w in result.warnings:
        warn(w)
    names = [safe(f.file) + (" (oversize)" if f.oversize else "") for f in result.files]
    width = max((len(n) for n in names), default=4)
    head = f"{'#':>3}  {'file':<{width}}  {'bytes':>15}  {'size':>9}  {'tensors':>7}  "
    lines = [head + ("blocks" if result.dry_run else "status   blocks")]
    for i, (f, name) in enumerate(zip(result.files, names, strict=True), 1):
        row = f"{i:>3}  {name:<{width}}  {f.size:>15,}  {format_size(f.size):>9}  {f.tensors:>7}  "
        lines.append(row + (f.blocks if result.dry_run else f"{f.status:<8} {f.blocks}"))
    verb = "would write" if result.dry_run else "wrote"
    say(f"{result.source} -> {result.out_dir}: {verb} {describe(result)}")
    for text in lines:
        say(text)
    if result.index is not None:
        say(f"index: {result.index.name} (total_size {result.total_size})")
    if isinstance(result, TpSplitResult):
        record = result.tp_record.name if result.tp_record is not None else "tp.json"
        say(
            f"tensor parallel: {result.world_size} ranks, each folder a checkpoint with its "
            f"index and manifest; plan and slices in {record}"
        )
    if result.manifest is not None and not result.dry_run:
        kind = "lossless merge" if result.lossless else "canonical merge (source was sharded)"
        say(f"manifest: {result.manifest.name} ({kind})")
    if quiet:
        return
    if result.plan.split_groups:
        groups = ", ".join(result.plan.split_groups)
        say(f"blocks larger than the cap, split between files: {groups}")
    if result.kept:
        say(f"kept {len(result.kept)} finished shard(s): {', '.join(result.kept)}")
    if result.removed:
        say(f"removed from OUT_DIR: {', '.join(result.removed)}")
    if result.copied:
        say(f"copied: {', '.join(result.copied)}")
    for n in result.notes:
        say(f"note: {n}")
