"""``safeshard diff A B [--json]``: exit 0 identical, 1 different, 2 usage error."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..diff import DiffReport, diff
from . import byte_progress, emit_json, handle_errors, json_option, main, out, quiet_option


@main.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option(
    "--trust-manifests",
    is_flag=True,
    help="Use SHA-256s recorded in safeshard manifests instead of reading those bytes.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Files read in parallel (default: CPUs)."
)
@json_option
@quiet_option
@handle_errors(2)
def diff_cmd(
    a: Path, b: Path, trust_manifests: bool, workers: int | None, as_json: bool, quiet: bool
) -> None:
    """Tensors added, removed and changed from A to B, and which shards differ.

    A and B are .safetensors files, model folders or indexes. Exit code 0 when they
    hold the same tensors and metadata, 1 when they differ, 2 on a usage error.
    """
    report = diff(
        a,
        b,
        trust_manifests=trust_manifests,
        workers=workers,
        progress=lambda total: byte_progress(total, "comparing", quiet or as_json),
    )
    if as_json:
        emit_json(report.to_json())
    else:
        _print(report)
    sys.exit(0 if report.identical else 1)


def _short(kind: str, value: str) -> str:
    return value[:12] if kind == "bytes" else value


def _print(r: DiffReport) -> None:
    """One line per difference (long tensor names stay whole and greppable)."""
    for n in r.removed:
        out.print(f"- {n}", markup=False)
    for n in r.added:
        out.print(f"+ {n}", markup=False)
    for c in r.changed:
        label = "sha256 " if c.kind == "bytes" else ""
        out.print(
            f"~ {c.name}: {c.kind} {label}{_short(c.kind, c.a)} -> {_short(c.kind, c.b)}",
            markup=False,
        )
    if r.metadata_changed:
        out.print(f"~ __metadata__: {r.metadata_a!r} -> {r.metadata_b!r}", markup=False)
    differ = r.shards_differ
    if differ:
        for s in r.shards:
            a = (s.a_sha256 or "")[:12] or "-"
            b = (s.b_sha256 or "")[:12] or "-"
            out.print(f"shard {s.file}: {s.status} (sha256 {a} -> {b})", markup=False)
    summary = (
        f"{len(r.added)} added, {len(r.removed)} removed, {len(r.changed)} changed, "
        f"{r.unchanged} unchanged"
    )
    if r.metadata_changed:
        summary += ", __metadata__ changed"
    if r.shards:
        summary += f"; {len(differ)} of {len(r.shards)} shard files differ"
    verdict = "IDENTICAL tensors" if r.identical else "DIFFERENT"
    out.print(f"{verdict}: {summary}", markup=False)
