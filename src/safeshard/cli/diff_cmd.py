"""``safeshard diff A B [--json]``: exit 0 identical, 1 different, else the common codes.

The error codes are those of every command (see :mod:`safeshard.cli`): 2 usage,
3 input (A or B missing or broken), 4 I/O.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from safeshard.cli.app import (
    EXIT_FINDINGS,
    EXIT_OK,
    LOCATION,
    byte_progress,
    emit_json,
    json_option,
    main,
    quiet_option,
    say,
    storage_option,
)
from safeshard.ops.diff import DiffReport, diff


@main.command("diff")
@click.argument("a", type=LOCATION)
@click.argument("b", type=LOCATION)
@click.option(
    "--trust-manifests",
    is_flag=True,
    help="Use SHA-256s recorded in safeshard manifests instead of reading those bytes.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Files read in parallel (default: CPUs)."
)
@storage_option
@json_option
@quiet_option
def diff_cmd(
    a: str,
    b: str,
    trust_manifests: bool,
    workers: int | None,
    storage_options: dict[str, Any] | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Tensors added, removed and changed from A to B, and which shards differ.

    A and B are .safetensors files, model folders or indexes. Exit code 0 when they
    hold the same tensors and metadata, 1 when they differ, 2 on a usage error, 3 when
    A or B is missing or broken, 4 on an I/O error.
    """
    report = diff(
        a,
        b,
        trust_manifests=trust_manifests,
        workers=workers,
        progress=lambda total: byte_progress(total, "comparing", quiet or as_json),
        storage_options=storage_options,
    )
    if as_json:
        emit_json(report.to_json())
    else:
        _print(report)
    sys.exit(EXIT_OK if report.identical else EXIT_FINDINGS)


def _short(kind: str, value: str) -> str:
    return value[:12] if kind == "bytes" else value


def _print(r: DiffReport) -> None:
    """One line per difference (long tensor names stay whole and greppable, escaped)."""
    for n in r.removed:
        say(f"- {n}")
    for n in r.added:
        say(f"+ {n}")
    for c in r.changed:
        label = f"{c.digest} " if c.kind == "bytes" else ""
        say(f"~ {c.name}: {c.kind} {label}{_short(c.kind, c.a)} -> {_short(c.kind, c.b)}")
    if r.metadata_changed:
        say(f"~ __metadata__: {r.metadata_a!r} -> {r.metadata_b!r}")
    differ = r.shards_differ
    if differ:
        for s in r.shards:
            a = (s.a_sha256 or "")[:12] or "-"
            b = (s.b_sha256 or "")[:12] or "-"
            say(f"shard {s.file}: {s.status} (sha256 {a} -> {b})")
    summary = (
        f"{len(r.added)} added, {len(r.removed)} removed, {len(r.changed)} changed, "
        f"{r.unchanged} unchanged"
    )
    if r.metadata_changed:
        summary += ", __metadata__ changed"
    if r.shards:
        summary += f"; {len(differ)} of {len(r.shards)} shard files differ"
    verdict = "IDENTICAL tensors" if r.identical else "DIFFERENT"
    say(f"{verdict}: {summary}")
