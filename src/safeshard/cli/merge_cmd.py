"""``safeshard merge SRC OUT_FILE``: shards back into one file, losslessly where possible."""

from __future__ import annotations

from typing import Any

import click

from safeshard.checkpoint import open_checkpoint
from safeshard.cli.app import (
    LOCATION,
    byte_progress,
    emit_json,
    json_option,
    main,
    quiet_option,
    say,
    storage_option,
    warn,
)
from safeshard.ops.merge import merge
from safeshard.ops.tpmerge import read_tp
from safeshard.sizes import format_size


@main.command("merge")
@click.argument("src", type=LOCATION)
@click.argument("out_file", type=LOCATION)
@click.option("--force", is_flag=True, help="Replace OUT_FILE if it exists.")
@click.option(
    "--sha256",
    is_flag=True,
    help="Also compute and print the output's SHA-256 (in a thread that follows the copy).",
)
@click.option(
    "--break-lock",
    is_flag=True,
    help="Object storage: take over the prefix's lock object even if its writer may be alive "
    "(only when you know it died).",
)
@storage_option
@json_option
@quiet_option
def merge_cmd(
    src: str,
    out_file: str,
    force: bool,
    sha256: bool,
    break_lock: bool,
    storage_options: dict[str, Any] | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Merge the shards of SRC (a folder or an index) into OUT_FILE.

    SRC may also be the output of `split --tp N` (a folder with tp.json and rank
    folders): each tensor is rebuilt from the ranks' slices.

    The index is checked against the shards first. Shards written by safeshard
    come back as the original file, byte for byte (the same SHA-256); shards from
    elsewhere become a canonical file, and the result says so.
    """
    tp = read_tp(src, storage_options)
    total = (
        tp.record.total_bytes
        if tp is not None
        else open_checkpoint(src, storage_options=storage_options).total_tensor_bytes
    )
    with byte_progress(total, "merge", quiet or as_json) as advance:
        result = merge(
            src,
            out_file,
            force=force,
            progress=advance,
            sha256=sha256,
            storage_options=storage_options,
            break_lock=break_lock,
        )
    if as_json:
        emit_json(result.to_json())
        return
    for w in result.warnings:
        warn(w)
    say(
        f"{result.source} -> {result.out_file}: {result.tensors} tensors, "
        f"{result.size} bytes ({format_size(result.size)})"
    )
    if result.sha256 is not None:
        say(f"sha256 {result.sha256}")
    if result.lossless:
        say("lossless: the original file's exact header and data order were restored")
        if result.verified == result.tensors:
            say(
                "identical to the original: its recorded header was written and every "
                "tensor's digest matched the manifest"
            )
    else:
        say(f"canonical: {result.reason}")
    if result.verified and not quiet:
        say(f"{result.verified} tensors matched the manifest's digests")
