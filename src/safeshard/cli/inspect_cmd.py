"""``safeshard inspect PATH [--max-shard-size SIZE] [--json]``."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from safeshard.cli._text import safe
from safeshard.cli.app import (
    LOCATION,
    SIZE,
    emit_json,
    json_option,
    line,
    main,
    out,
    say,
    storage_option,
)
from safeshard.ops.inspect import DEFAULT_CAP, InspectReport, TpInspectReport, inspect, inspect_tp
from safeshard.sizes import format_size

MAX_ROWS = 8
"""Rows shown per list in the human output before ``... and N more``."""


@main.command("inspect")
@click.argument("path", type=LOCATION)
@click.option(
    "--max-shard-size",
    "cap",
    type=SIZE,
    default=str(DEFAULT_CAP),
    show_default="4GB",
    help="Cap to predict a split for: 4GB, 500MiB, fat32, or bytes.",
)
@storage_option
@json_option
def inspect_cmd(path: str, cap: int, storage_options: dict[str, Any] | None, as_json: bool) -> None:
    """Show what a checkpoint holds and what a split would do, reading headers only.

    PATH is a .safetensors file, a model folder, or a *.safetensors.index.json index,
    local or a URL (s3://bucket/prefix: only the headers are read, two ranged reads each).
    The output folder of split --tp is shown as its record (tp.json) and rank folders.
    """
    tp = inspect_tp(path, storage_options=storage_options)
    report = tp if tp is not None else inspect(path, cap, storage_options=storage_options)
    if as_json:
        emit_json(report.to_json())
    elif isinstance(report, TpInspectReport):
        render_tp(report)
    else:
        render(report)


def _size(n: int) -> str:
    return f"{format_size(n)} ({n:,} B)" if n >= 1000 else f"{n} B"


def _more(n: int) -> tuple[str, str]:
    return (f"... and {n} more", "dim")


def _table(title: str) -> Table:
    return Table(title=line(title), title_justify="left", box=None, pad_edge=False)


def render(r: InspectReport) -> None:
    """Human output: concise rich tables on stdout, every file-derived string escaped."""
    kind = f"index {r.index}, {len(r.files)} shards" if r.index else "single file"
    say((r.path, "bold"), f" ({kind})")

    files = _table("Files")
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("tensors", justify="right")
    for f in r.files[:MAX_ROWS]:
        files.add_row(safe(f.name), _size(f.size), str(f.tensors))
    if len(r.files) > MAX_ROWS:
        files.add_row(line(_more(len(r.files) - MAX_ROWS)), "", "")
    if len(r.files) > 1:
        files.add_row(line(("total", "bold")), _size(r.file_size), str(r.tensor_count))
    out.print(files)
    dtypes = ", ".join(f"{d} {format_size(n)}" for d, n in r.dtypes.items())
    say(
        f"{r.tensor_count} tensors, {_size(r.total_tensor_bytes)} of tensor data; "
        f"dtypes: {dtypes or 'none'}"
    )

    out.print()
    if r.block_families:
        blocks = _table("Blocks")
        for col, just in (
            ("family", "left"),
            ("blocks", "right"),
            ("numbers", "left"),
            ("min", "right"),
            ("typical", "right"),
            ("max", "right"),
        ):
            blocks.add_column(col, justify=just)  # type: ignore[arg-type]
        for fam in r.block_families:
            blocks.add_row(
                safe(fam.name),
                str(fam.count),
                f"{fam.first}-{fam.last}",
                format_size(fam.min_bytes),
                format_size(fam.typical_bytes),
                format_size(fam.max_bytes),
            )
        out.print(blocks)
        if r.largest_block is not None:
            b = r.largest_block
            say(f"largest block: {b.name} ({format_size(b.nbytes)})")
    else:
        say("Blocks: none (no repeated numbered prefix such as model.layers.N)")
    if r.largest_tensor is not None:
        t = r.largest_tensor
        say(f"largest tensor: {t.name} {t.dtype}{list(t.shape)} ({format_size(t.nbytes)})")
    if r.outside_blocks:
        total = sum(t.nbytes for t in r.outside_blocks)
        names = ", ".join(f"{t.name} {format_size(t.nbytes)}" for t in r.outside_blocks[:MAX_ROWS])
        rest = len(r.outside_blocks) - MAX_ROWS
        say(
            f"outside blocks: {len(r.outside_blocks)} tensors, {format_size(total)}: {names}",
            *((", ", _more(rest)) if rest > 0 else ()),
        )

    if r.stream_largest_unit is not None:
        u = r.stream_largest_unit
        say(
            f"Stream budget (safeshard run --max-resident): at least {_size(u.nbytes)} "
            f"(the largest unit, {u.name}); from {_size(r.stream_no_read_budget)} "
            "(the whole model) decoding reads nothing"
        )

    out.print()
    q = r.quant
    if q is None:
        say("Quantization: none")
    else:
        s = q.settings
        group = "none" if s.group_size is None else str(s.group_size)
        say(
            "Quantization: ",
            (s.method.upper(), "bold"),
            f" bits={s.bits} group_size={group} desc_act={s.desc_act} sym={s.sym} "
            f"(from {s.source}); {len(q.modules)} quantized modules",
        )
        if q.ok:
            say("  check: settings agree with every quantized module's shapes and dtypes")
        else:
            say("  check: ", (f"{len(q.problems)} problem(s)", "bold red"))
            for p in q.problems[:MAX_ROWS]:
                say(f"    - {p.message}")
            if len(q.problems) > MAX_ROWS:
                say("    ", _more(len(q.problems) - MAX_ROWS))

    if r.metadata:
        items = []
        for k, v in r.metadata.items():
            v = v if len(v) <= 40 else v[:37] + "..."
            items.append(f"{k}={v}")
        say(f"Metadata: {', '.join(items)}")
    else:
        say("Metadata: none")

    out.print()
    cap_text = f"{format_size(r.cap)} ({r.cap:,} B)"
    if r.predicted_shards == 0:
        say(f"Split at {cap_text}: nothing to split (no tensors)")
    elif r.predicted_shards is None:
        say(
            f"Split at {cap_text}: ",
            ("impossible", "bold red"),
            f": {len(r.oversize_tensors)} tensor(s) alone exceed the cap; "
            f"the smallest cap that works is {_size(r.smallest_cap)}",
        )
    else:
        sizes = ", ".join(format_size(s) for s in r.predicted_shard_sizes[:MAX_ROWS])
        more = ", ..." if len(r.predicted_shard_sizes) > MAX_ROWS else ""
        say(f"Split at {cap_text}: {r.predicted_shards} shard(s) ({sizes}{more})")
    if r.oversize_blocks:
        worst = max(r.oversize_blocks, key=lambda b: b.file_size)
        say(
            f"  {len(r.oversize_blocks)} block(s) do not fit in one file at this cap "
            f"(largest: {worst.name}, {format_size(worst.file_size)} alone); "
            "split divides them between their modules"
        )
    for w in r.warnings:
        if w.startswith("GPTQ check"):
            continue
        say(("warning:", "bold yellow"), f" {w}")


def render_tp(r: TpInspectReport) -> None:
    """Human output for a ``split --tp`` folder: the rank folders, the plan, what merge
    would write; every file-derived string escaped."""
    say(
        (r.path, "bold"),
        f" (split --tp: world size {r.world_size}, {len(r.ranks)} rank folders, "
        f"base name {safe(r.base)})",
    )
    ranks = _table("Rank folders")
    for col in ("folder", "files", "size", "tensors", "tensor data"):
        ranks.add_column(col, justify="left" if col == "folder" else "right")
    for k in r.ranks[:MAX_ROWS]:
        ranks.add_row(
            safe(k.name), str(k.files), _size(k.file_size), str(k.tensors), _size(k.tensor_bytes)
        )
    if len(r.ranks) > MAX_ROWS:
        ranks.add_row(line(_more(len(r.ranks) - MAX_ROWS)), "", "", "", "")
    ranks.add_row(
        line(("total", "bold")), str(sum(k.files for k in r.ranks)), _size(r.file_size), "", ""
    )
    out.print(ranks)
    say(
        f"{r.tensor_count} tensors ({_size(r.total_tensor_bytes)} of tensor data): "
        f"{r.sliced} sliced, {r.replicated} replicated on every rank"
    )
    rules = ", ".join(f"{safe(k)}: {safe(v)}" for k, v in list(r.plan.items())[:MAX_ROWS])
    rest = len(r.plan) - MAX_ROWS
    say(f"Plan ({len(r.plan)} rules): {rules}", *((", ", _more(rest)) if rest > 0 else ()))
    how = (
        "the source's own file, byte for byte"
        if r.lossless
        else f"not the source's own bytes: {safe(r.reason or 'canonical')}"
    )
    say(f"Merge: one file of {_size(r.merged_file_size)}, {how}")
    say(
        "Digests of the full tensors: "
        + (
            "recorded in tp.json (merge checks them)"
            if r.digests
            else "none (the source had no manifest)"
        )
    )
