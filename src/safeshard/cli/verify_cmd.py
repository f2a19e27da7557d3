"""``safeshard verify PATH [--against SRC] [--max-shard-size SIZE] [--deep] [--json]``.

Exit codes: 0 clean, 1 findings, and the errors of every command (see
:mod:`safeshard.cli`): 2 usage, 3 input (path not found, no checkpoint), 4 I/O.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table

from safeshard.cli._text import safe
from safeshard.cli.app import (
    EXIT_FINDINGS,
    EXIT_OK,
    LOCATION,
    SIZE,
    byte_progress,
    emit_json,
    json_option,
    line,
    main,
    out,
    quiet_option,
    say,
    storage_option,
)
from safeshard.ops.verify import VerifyReport, verify
from safeshard.sizes import format_size


@main.command("verify")
@click.argument("path", type=LOCATION)
@click.option(
    "--against",
    type=LOCATION,
    help="Compare every tensor with this source: a file, a folder or an index.",
)
@click.option("--max-shard-size", type=SIZE, help="Report files larger than this (e.g. 4GB).")
@click.option("--deep", is_flag=True, help="Also read g_idx values and check their range.")
@click.option(
    "--hash-files",
    is_flag=True,
    help="Also check each file's SHA-256 where the manifest records one (split --sha256).",
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Files read in parallel (default: CPUs)."
)
@storage_option
@json_option
@quiet_option
def verify_cmd(
    path: str,
    against: str | None,
    max_shard_size: int | None,
    deep: bool,
    hash_files: bool,
    workers: int | None,
    storage_options: dict[str, Any] | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Check shards, index, manifest hashes and GPTQ tensors; report every problem.

    PATH is a .safetensors file, a model folder, or a *.safetensors.index.json; or the
    output folder of split --tp, whose tp.json and every rank folder are checked.
    Exit code 0 when clean, 1 with findings, 2 on a usage error, 3 when PATH is not a
    checkpoint, 4 on an I/O error.
    """
    report = verify(
        path,
        against=against,
        max_shard_size=max_shard_size,
        deep=deep,
        hash_files=hash_files,
        workers=workers,
        progress=lambda total: byte_progress(total, "verifying", quiet or as_json),
        storage_options=storage_options,
    )
    if as_json:
        emit_json(report.to_json())
    else:
        render(report)
    sys.exit(EXIT_OK if report.ok else EXIT_FINDINGS)


def render(report: VerifyReport) -> None:
    """Human output on stdout; every finding's file, tensor and message escaped."""
    checks = ", ".join(report.checks)
    if report.ok:
        if report.bytes_verified:
            what = f"{report.bytes_verified:,} bytes verified"
        else:
            what = "headers verified; no manifest and no --against, so no tensor bytes were read"
        ranks = f"{report.ranks} tensor-parallel rank folders, " if report.ranks else ""
        say(
            f"OK: {ranks}{report.shards} shard{'s' if report.shards != 1 else ''}, "
            f"{report.tensors} tensors, {what} ({format_size(report.total_size)}; "
            f"checks: {checks})"
        )
        if report.compared_files:
            say(
                f"{report.compared_files} file(s) compared byte for byte with the source "
                "instead of re-hashing them for the manifest (--hash-files to do both)"
            )
        return
    title = f"{len(report.findings)} finding(s) in {report.path}"
    if out.width >= 120:
        table = Table(title=line(title), expand=True)
        table.add_column("code", style="bold red", no_wrap=True)
        table.add_column("where", max_width=48, overflow="fold")
        table.add_column("message", ratio=1, overflow="fold")
        for f in report.findings:
            table.add_row(safe(f.code), safe(_where(f.file, f.tensor)), safe(f.message))
        out.print(table)
    else:  # a narrow terminal or a pipe: one finding per paragraph, greppable
        say(title)
        for f in report.findings:
            say((f.code, "bold red"), "  ", _where(f.file, f.tensor))
            say(f"    {f.message}")
    counts: dict[str, int] = {}
    for f in report.findings:
        counts[f.code] = counts.get(f.code, 0) + 1
    summary = ", ".join(f"{c} x{n}" if n > 1 else c for c, n in counts.items())
    say(f"FAILED: {summary} (checks: {checks})")


def _where(file: str | None, tensor: str | None) -> str:
    return " : ".join(x for x in (file, tensor) if x)
