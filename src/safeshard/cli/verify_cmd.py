"""``safeshard verify PATH [--against SRC] [--max-shard-size SIZE] [--deep] [--json]``.

Exit codes: 0 clean, 1 findings, 2 a usage error (bad option, path not found).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ..sizes import format_size
from ..verify import VerifyReport, verify
from . import SIZE, byte_progress, emit_json, handle_errors, json_option, main, out, quiet_option


@main.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--against",
    type=click.Path(path_type=Path),
    help="Compare every tensor with this source: a file, a folder or an index.",
)
@click.option("--max-shard-size", type=SIZE, help="Report files larger than this (e.g. 4GB).")
@click.option("--deep", is_flag=True, help="Also read g_idx values and check their range.")
@click.option(
    "--hash-files",
    is_flag=True,
    help="With --against, still recompute each file's SHA-256 for the manifest check.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Files read in parallel (default: CPUs)."
)
@json_option
@quiet_option
@handle_errors(2)
def verify_cmd(
    path: Path,
    against: Path | None,
    max_shard_size: int | None,
    deep: bool,
    hash_files: bool,
    workers: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Check shards, index, manifest hashes and GPTQ tensors; report every problem.

    PATH is a .safetensors file, a model folder, or a *.safetensors.index.json.
    Exit code 0 when clean, 1 with findings, 2 on a usage error.
    """
    report = verify(
        path,
        against=against,
        max_shard_size=max_shard_size,
        deep=deep,
        hash_files=hash_files,
        workers=workers,
        progress=lambda total: byte_progress(total, "verifying", quiet or as_json),
    )
    if as_json:
        emit_json(report.to_json())
    else:
        render(report)
    sys.exit(0 if report.ok else 1)


def render(report: VerifyReport) -> None:
    checks = ", ".join(report.checks)
    if report.ok:
        if report.bytes_verified:
            what = f"{report.bytes_verified:,} bytes verified"
        else:
            what = "headers verified; no manifest and no --against, so no tensor bytes were read"
        out.print(
            f"OK: {report.shards} shard{'s' if report.shards != 1 else ''}, "
            f"{report.tensors} tensors, {what} ({format_size(report.total_size)}; "
            f"checks: {checks})",
            markup=False,
        )
        if report.compared_files:
            out.print(
                f"{report.compared_files} file(s) compared byte for byte with the source "
                "instead of re-hashing them for the manifest (--hash-files to do both)",
                markup=False,
            )
        return
    title = f"{len(report.findings)} finding(s) in {report.path}"
    if out.width >= 120:
        table = Table(title=escape(title), expand=True)
        table.add_column("code", style="bold red", no_wrap=True)
        table.add_column("where", max_width=48, overflow="fold")
        table.add_column("message", ratio=1, overflow="fold")
        for f in report.findings:
            table.add_row(escape(f.code), escape(_where(f.file, f.tensor)), escape(f.message))
        out.print(table)
    else:  # a narrow terminal or a pipe: one finding per paragraph, greppable
        out.print(title, markup=False)
        for f in report.findings:
            out.print(f"[bold red]{escape(f.code)}[/]  {escape(_where(f.file, f.tensor))}")
            out.print(f"    {f.message}", markup=False)
    counts: dict[str, int] = {}
    for f in report.findings:
        counts[f.code] = counts.get(f.code, 0) + 1
    summary = ", ".join(f"{c} x{n}" if n > 1 else c for c, n in counts.items())
    out.print(f"FAILED: {summary} (checks: {checks})", markup=False)


def _where(file: str | None, tensor: str | None) -> str:
    return " : ".join(x for x in (file, tensor) if x)
