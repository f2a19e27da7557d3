"""``safeshard split NEW_SRC OUT_DIR --update``: the printing side of :mod:`safeshard.ops.update`.

Not a command of its own: ``split --update`` calls :func:`run_update`.
"""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from safeshard.cli._text import safe
from safeshard.cli.app import byte_progress, emit_json, say, warn
from safeshard.errors import UsageError
from safeshard.ops.update import UpdateResult, describe, update
from safeshard.sizes import format_size


def _given(param: str) -> bool:
    """Whether the user gave ``param`` on the command line (not its default)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True
    return ctx.get_parameter_source(param) not in (ParameterSource.DEFAULT, None)


def run_update(
    src: str,
    out_dir: str,
    *,
    cap: int,
    base: str,
    allow_oversize: bool,
    dry_run: bool,
    balance: bool,
    resume: bool,
    force: bool,
    sha256: bool,
    storage_options: dict[str, Any] | None,
    as_json: bool,
    break_lock: bool = False,
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
        sha256=sha256,
        storage_options=storage_options,
        break_lock=break_lock,
        progress=lambda label, total: byte_progress(total, label, quiet or as_json),
    )
    if as_json:
        emit_json(result.to_json())
        return
    _report(result, quiet)


def _report(result: UpdateResult, quiet: bool) -> None:
    for w in result.warnings:
        warn(w)
    verb = "would update" if result.dry_run else "updated"
    say(f"{result.source} -> {result.out_dir}: {verb}: {describe(result)}")
    names = [safe(f.file) for f in result.files]
    width = max((len(n) for n in names), default=4)
    say(
        f"{'#':>3}  {'file':<{width}}  {'bytes':>15}  {'size':>9}  {'tensors':>7}  "
        f"{'status':<9}  blocks"
    )
    for i, (f, name) in enumerate(zip(result.files, names, strict=True), 1):
        say(
            f"{i:>3}  {name:<{width}}  {f.size:>15,}  {format_size(f.size):>9}  "
            f"{f.tensors:>7}  {f.status:<9}  {f.blocks}"
            + (f"  [from {f.previous}]" if f.previous not in (None, f.file) else "")
        )
    for label, items in (
        ("kept (not touched)", result.kept),
        ("renamed (same bytes)", [f"{a} -> {b}" for a, b in result.renamed]),
        ("rewritten", result.rewritten),
        ("added", result.added),
        ("removed (names no longer in OUT_DIR)", result.removed),
    ):
        if items:
            say(f"{label}: {', '.join(items)}")
    if result.index is not None:
        say(f"index: {result.index.name} (total_size {result.total_size})")
    if result.manifest is not None and not result.dry_run:
        kind = "lossless merge" if result.lossless else "canonical merge (source was sharded)"
        say(f"manifest: {result.manifest.name} ({kind})")
    if quiet:
        return
    if result.changed:
        shown = ", ".join(result.changed[:6]) + (" ..." if len(result.changed) > 6 else "")
        say(f"changed tensors: {shown}")
    if result.copied:
        say(f"copied: {', '.join(result.copied)}")
    for n in result.notes:
        say(f"note: {n}")
