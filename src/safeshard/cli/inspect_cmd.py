"""``safeshard inspect PATH [--max-shard-size SIZE] [--json]``."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from ..inspect import DEFAULT_CAP, InspectReport, inspect
from ..sizes import format_size
from . import SIZE, emit_json, handle_errors, json_option, main, out

MAX_ROWS = 8
"""Rows shown per list in the human output before ``... and N more``."""


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option(
    "--max-shard-size",
    "cap",
    type=SIZE,
    default=str(DEFAULT_CAP),
    show_default="4GB",
    help="Cap to predict a split for: 4GB, 500MiB, fat32, or bytes.",
)
@json_option
@handle_errors()
def inspect_cmd(path: str, cap: int, as_json: bool) -> None:
    """Show what a checkpoint holds and what a split would do, reading headers only.

    PATH is a .safetensors file, a model folder, or a *.safetensors.index.json index.
    """
    report = inspect(path, cap)
    if as_json:
        emit_json(report.to_json())
    else:
        render(report)


def _size(n: int) -> str:
    return f"{format_size(n)} ({n:,} B)" if n >= 1000 else f"{n} B"


def _more(n: int) -> str:
    return f"[dim]... and {n} more[/]"


def render(r: InspectReport) -> None:
    """Human output: concise rich tables on stdout."""
    kind = f"index {r.index}, {len(r.files)} shards" if r.index else "single file"
    out.print(f"[bold]{escape(r.path)}[/] ({escape(kind)})")

    files = Table(title="Files", title_justify="left", box=None, pad_edge=False)
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("tensors", justify="right")
    for f in r.files[:MAX_ROWS]:
        files.add_row(escape(f.name), _size(f.size), str(f.tensors))
    if len(r.files) > MAX_ROWS:
        files.add_row(_more(len(r.files) - MAX_ROWS), "", "")
    if len(r.files) > 1:
        files.add_row("[bold]total[/]", _size(r.file_size), str(r.tensor_count))
    out.print(files)
    dtypes = ", ".join(f"{d} {format_size(n)}" for d, n in r.dtypes.items())
    out.print(
        f"{r.tensor_count} tensors, {_size(r.total_tensor_bytes)} of tensor data; "
        f"dtypes: {dtypes or 'none'}"
    )

    out.print()
    if r.block_families:
        blocks = Table(title="Blocks", title_justify="left", box=None, pad_edge=False)
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
                escape(fam.name),
                str(fam.count),
                f"{fam.first}-{fam.last}",
                format_size(fam.min_bytes),
                format_size(fam.typical_bytes),
                format_size(fam.max_bytes),
            )
        out.print(blocks)
        if r.largest_block is not None:
            out.print(
                f"largest block: {escape(r.largest_block.name)} "
                f"({format_size(r.largest_block.nbytes)})"
            )
    else:
        out.print("Blocks: none (no repeated numbered prefix such as model.layers.N)")
    if r.largest_tensor is not None:
        t = r.largest_tensor
        out.print(
            f"largest tensor: {escape(t.name)} {t.dtype}{list(t.shape)} ({format_size(t.nbytes)})"
        )
    if r.outside_blocks:
        total = sum(t.nbytes for t in r.outside_blocks)
        names = ", ".join(
            f"{escape(t.name)} {format_size(t.nbytes)}" for t in r.outside_blocks[:MAX_ROWS]
        )
        extra = (
            f", {_more(len(r.outside_blocks) - MAX_ROWS)}"
            if len(r.outside_blocks) > MAX_ROWS
            else ""
        )
        out.print(
            f"outside blocks: {len(r.outside_blocks)} tensors, {format_size(total)}: {names}{extra}"
        )

    out.print()
    q = r.quant
    if q is None:
        out.print("Quantization: none")
    else:
        s = q.settings
        group = "none" if s.group_size is None else str(s.group_size)
        out.print(
            f"Quantization: [bold]{escape(s.method.upper())}[/] bits={s.bits} group_size={group} "
            f"desc_act={s.desc_act} sym={s.sym} (from {s.source}); "
            f"{len(q.modules)} quantized modules"
        )
        if q.ok:
            out.print("  check: settings agree with every quantized module's shapes and dtypes")
        else:
            out.print(f"  check: [bold red]{len(q.problems)} problem(s)[/]")
            for p in q.problems[:MAX_ROWS]:
                out.print(f"    - {escape(p.message)}")
            if len(q.problems) > MAX_ROWS:
                out.print(f"    {_more(len(q.problems) - MAX_ROWS)}")

    if r.metadata:
        items = []
        for k, v in r.metadata.items():
            v = v if len(v) <= 40 else v[:37] + "..."
            items.append(f"{escape(k)}={escape(v)}")
        out.print(f"Metadata: {', '.join(items)}")
    else:
        out.print("Metadata: none")

    out.print()
    cap_text = f"{format_size(r.cap)} ({r.cap:,} B)"
    if r.predicted_shards == 0:
        out.print(f"Split at {cap_text}: nothing to split (no tensors)")
    elif r.predicted_shards is None:
        out.print(
            f"Split at {cap_text}: [bold red]impossible[/]: {len(r.oversize_tensors)} tensor(s) "
            f"alone exceed the cap; the smallest cap that works is {_size(r.smallest_cap)}"
        )
    else:
        sizes = ", ".join(format_size(s) for s in r.predicted_shard_sizes[:MAX_ROWS])
        more = ", ..." if len(r.predicted_shard_sizes) > MAX_ROWS else ""
        out.print(f"Split at {cap_text}: {r.predicted_shards} shard(s) ({sizes}{more})")
    if r.oversize_blocks:
        worst = max(r.oversize_blocks, key=lambda b: b.file_size)
        out.print(
            f"  {len(r.oversize_blocks)} block(s) do not fit in one file at this cap "
            f"(largest: {escape(worst.name)}, {format_size(worst.file_size)} alone); "
            "split divides them between their modules"
        )
    for w in r.warnings:
        if w.startswith("GPTQ check"):
            continue
        out.print(f"[bold yellow]warning:[/] {escape(w)}")
