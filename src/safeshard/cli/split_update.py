"""``safeshard split NEW_SRC OUT_DIR --update``: the printing side of :mod:`safeshard.update`.

Not a command of its own: ``split --update`` calls :func:`run_update`.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from ..errors import UsageError
from ..sizes import format_size
from ..update import UpdateResult, describe, update
from . import byte_progress, emit_json, err, out


def _given(param: str) -> bool:
    """Whether the user gave ``param`` on the command line (not its default)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True
    return ctx.get_parameter_source(param) not in (ParameterSource.DEFAULT, None)


def run_update(
    src: Path,
    out_dir: Path,
    *,
    cap: int,
    base: str,
    allow_oversize: bool,
    dry_run: bool,
    balance: bool,
    resume: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Run the update and print (or emit as JSON) what it did."""
    clash = [
        flag
        for flag, on in (("--balance", balance), ("--resume", resume), ("--force", force))
        if on
    ]
    if clash:
        raise UsageError(
            f"--update keeps the earlier plan and cannot be combined with {', '.join(clash)}; "
            "for a fresh split drop --update"
        )
    result = update(
        src,
        out_dir,
        max_shard_size=cap if _given("cap") else None,
        name=base if _given("base") else None,
        allow_oversize=allow_oversize,
        dry_run=dry_run,
        progress=lambda label, total: byte_progress(total, label, quiet or as_json),
    )
    if as_json:
        emit_json(result.to_json())
        return
    _report(result, quiet)


def _report(result: UpdateResult, quiet: bool) -> None:
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {w}", markup=True, highlight=False)
    verb = "would update" if result.dry_run else "updated"
    out.print(f"{result.source} -> {result.out_dir}: {verb}: {describe(result)}")
    width = max((len(f.file) for f in result.files), default=4)
    out.print(
        f"{'#':>3}  {'file':<{width}}  {'bytes':>15}  {'size':>9}  {'tensors':>7}  "
        f"{'status':<9}  blocks",
        markup=False,
    )
    for i, f in enumerate(result.files, 1):
        out.print(
            f"{i:>3}  {f.file:<{width}}  {f.size:>15,}  {format_size(f.size):>9}  "
            f"{f.tensors:>7}  {f.status:<9}  {f.blocks}"
            + (f"  [from {f.previous}]" if f.previous not in (None, f.file) else ""),
            markup=False,
        )
    for label, names in (
        ("kept (not touched)", result.kept),
        ("renamed (same bytes)", [f"{a} -> {b}" for a, b in result.renamed]),
        ("rewritten", result.rewritten),
        ("added", result.added),
        ("removed (names no longer in OUT_DIR)", result.removed),
    ):
        if names:
            out.print(f"{label}: {', '.join(names)}", markup=False)
    if result.index is not None:
        out.print(f"index: {result.index.name} (total_size {result.total_size})", markup=False)
    if result.manifest is not None and not result.dry_run:
        kind = "lossless merge" if result.lossless else "canonical merge (source was sharded)"
        out.print(f"manifest: {result.manifest.name} ({kind})", markup=False)
    if quiet:
        return
    if result.changed:
        shown = ", ".join(result.changed[:6]) + (" ..." if len(result.changed) > 6 else "")
        out.print(f"changed tensors: {shown}", markup=False)
    if result.copied:
        out.print(f"copied: {', '.join(result.copied)}", markup=False)
    for n in result.notes:
        out.print(f"note: {n}", markup=False)
