"""Split a checkpoint into layer-aligned shards, or reshard a sharded one.

``split(SRC, OUT_DIR)`` plans shards with :func:`plan.plan_shards` over the
source's tensors (SRC is a file, a folder or an index; an index means a reshard)
and writes each shard as its exact planned header followed by its tensors in model
order, copied by byte ranges from the source (``copy_file_range``), never through
Python objects the size of a tensor. SHA-256 of each file and an XXH3-128 digest of each tensor are
computed on the side (:mod:`safeshard.io.copier`).

Output, in OUT_DIR:

- ``{BASE}-{i:05d}-of-{n:05d}.safetensors`` and ``{BASE}.safetensors.index.json``,
  or ``{BASE}.safetensors`` alone (no index) when everything fits in one file;
- ``{BASE}.safeshard.json``, the manifest: shard sizes and SHA-256, per-tensor
  digests (XXH3-128), and the original file's header so that ``merge`` restores it byte for
  byte (carried forward through reshards of safeshard output);
- the source folder's other files (:mod:`safeshard.ops.sidecar`).

Crash safety is the output transaction's (:mod:`safeshard.io.transaction`): an exclusive
lock on OUT_DIR; old checkpoint files removed first (indexes, then manifests); each
shard written under a temporary name, fsynced and renamed; sidecars; then the
manifest and, last, the index. A folder with an index is complete. The journal
(``.safeshard-journal.json``) records each finished shard's size and hashes with a
fingerprint of the plan and the source (paths, sizes, modification times, headers);
``resume`` keeps the shards it vouches for after re-hashing them (a finished split's
manifest keeps the fingerprint, so resuming a finished split keeps everything). The
source is only ever opened read-only.

``force`` and ``resume`` both let safeshard replace OUT_DIR's checkpoint files:
every ``*.safetensors``, ``*.safetensors.index.json`` and ``*.safeshard.json`` in
it, whatever their base name, because a leftover weights file of another base would
be found by some loaders instead of the new shards. Other files are left alone,
except those the sidecar copy overwrites.

So the code reads as plan (:func:`plan.plan_shards`), stage (:func:`output.write_shard`
for each shard) and commit (:meth:`safeshard.io.transaction.OutputFolder.commit`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safeshard import gcpause
from safeshard.checkpoint import Checkpoint, common_metadata, open_checkpoint
from safeshard.errors import OutputExistsError, UsageError
from safeshard.format.filenames import INDEX_SUFFIX
from safeshard.format.header import TensorSpec, build_header
from safeshard.format.manifest import manifest_path
from safeshard.io.copier import Progress, Sha256Pool
from safeshard.io.localfs import require_space
from safeshard.io.store import (
    as_path,
    local_path,
    output_folder,
    same_folder,
    translate_errors,
)
from safeshard.io.transaction import JOURNAL_NAME, StepHook, prepare_folder
from safeshard.ops.plan import Plan, ShardPlan, plan_shards
from safeshard.ops.tpsplit import split_tp
from safeshard.ops.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    SplitResult,
    Written,
    begin_split,
    check_base,
    fingerprint,
    finish_split,
    hash_kept,
    open_sources,
    output_names,
    shard_file,
    source_record,
    tensor_extents,
    with_sha256,
    write_shard,
)
from safeshard.redact import redact_url
from safeshard.sizes import format_size, parse_size

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "JOURNAL_NAME", "SplitResult", "describe", "split"]


# --------------------------------------------------------------------------- split


@gcpause.pausing
@translate_errors
def split(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    balance: bool = False,
    allow_oversize: bool = False,
    name: str = "model",
    dry_run: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    on_step: StepHook | None = None,
    sha256: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    break_lock: bool = False,
    tp: int | None = None,
    tp_plan: Mapping[str, str] | str = "auto",
    tp_config: Mapping[str, Any] | None = None,
) -> SplitResult:
    """Split (or reshard) the checkpoint at ``src`` into ``out_dir``; see the module docs.

    ``sha256`` also computes each shard's SHA-256 (the Hub's LFS id), in threads of their
    own, files in parallel; the default integrity record (header and tensor digests)
    does not need it. ``src`` and ``out_dir`` may be URLs (:mod:`safeshard.io.store`),
    reached with ``storage_options``; into object storage, a journal object makes it
    resumable and a lock object refuses a second writer (``break_lock`` takes over a lock
    whose writer died on another host).

    ``progress`` is called with a number of bytes each time that many are written
    or, for shards kept by ``resume``, re-hashed; the total is the sum of the
    planned file sizes (``SplitResult.files`` of a dry run). ``on_step`` is called with
    each step of the output transaction (:data:`safeshard.io.journal.STEPS`).

    ``tp=N`` writes one checkpoint per tensor-parallel rank instead, in
    ``out_dir/rank-0000r-of-0000N/``, sliced by ``tp_plan`` (``"auto"`` or a mapping of
    name patterns to styles; ``tp_config`` gives head counts), with ``out_dir/tp.json``
    recording the slices; ``merge(out_dir, FILE)`` rebuilds the source
    (:mod:`safeshard.ops.tpsplit`; returns a :class:`~safeshard.ops.tpsplit.TpSplitResult`).
    """
    if tp is not None:
        return split_tp(
            src,
            out_dir,
            tp=tp,
            tp_plan=tp_plan,
            tp_config=tp_config,
            max_shard_size=max_shard_size,
            balance=balance,
            allow_oversize=allow_oversize,
            name=name,
            dry_run=dry_run,
            resume=resume,
            force=force,
            progress=progress,
            on_step=on_step,
            sha256=sha256,
            storage_options=storage_options,
            break_lock=break_lock,
        )
    cap = parse_size(max_shard_size)
    base = check_base(name)
    if resume and force:
        raise UsageError("--resume keeps finished shards and --force replaces them: pick one")
    ckpt = open_checkpoint(src, storage_options=storage_options)
    metadata, warnings = common_metadata(ckpt)
    specs = [TensorSpec.of(t) for t in ckpt.tensors()]
    plan = plan_shards(specs, cap, metadata, balance=balance, allow_oversize=allow_oversize)
    if not plan.shards:  # no tensors at all: one file holding only the header
        empty = ShardPlan(tensors=(), header=build_header([], metadata), groups=())
        plan = Plan((empty,), plan.cap, plan.metadata, plan.warnings, plan.split_groups)
    warnings += list(plan.warnings)
    names = output_names(base, len(plan.shards))
    record, more = source_record(ckpt)
    warnings += more
    notes: list[str] = []
    if len(names) == 1:
        notes.append(f"everything fits in one file: {names[0]}, with no index")
    if base != "model":
        notes.append(
            f"transformers looks only for model.safetensors(.index.json); {base!r} is found by "
            "AutoGPTQ and GPTQModel through quantize_config.json"
        )
    out = as_path(out_dir, storage_options)
    result = SplitResult(
        source=redact_url(src),
        out_dir=out,
        base=base,
        cap=plan.cap,
        dry_run=dry_run,
        files=[shard_file(n, s, None, "planned") for n, s in zip(names, plan.shards, strict=True)],
        index=None if len(names) == 1 else out / f"{base}{INDEX_SUFFIX}",
        manifest=manifest_path(out, base),
        lossless=record is not None,
        data_size=plan.total_size,
        warnings=warnings,
        notes=notes,
        plan=plan,
    )
    if dry_run:
        return result
    _check_not_source(out, ckpt)
    local = local_path(out)  # None: a prefix in object storage (nothing to create there)
    if local is not None:
        prepare_folder(local)
    with output_folder(
        out, on_step=on_step, storage_options=storage_options, break_lock=break_lock
    ) as tx:
        recovered_at = len(tx.recovered)
        result.notes += tx.recovered
        fp = fingerprint(ckpt, [s.header for s in plan.shards], names)
        kept = begin_split(tx, result, names, fp, resume=resume, force=force, progress=progress)
        todo = [(n, s) for n, s in zip(names, plan.shards, strict=True) if n not in kept]
        if local is not None:
            require_space(local, sum(s.file_size for _, s in todo), "the shards")
        done = dict(kept)
        pool = Sha256Pool() if sha256 else None
        written: dict[str, Written] = {}
        with open_sources(ckpt) as sources:
            for fname, shard in todo:
                w = write_shard(
                    tx,
                    fname,
                    shard.header,
                    tensor_extents(ckpt, [t.name for t in shard.tensors], sources),
                    progress=progress,
                    sha256=pool,
                )
                written[fname], done[fname] = w, w.record
        with_sha256(done, written)
        if sha256:  # kept shards of a run that did not compute it
            hash_kept(done, kept, out)
        result.files = [
            shard_file(n, s, done[n].sha256, "kept" if n in kept else "written")
            for n, s in zip(names, plan.shards, strict=True)
        ]
        result.notes += tx.recovered[recovered_at:]  # what writing the shards found
        side = finish_split(
            tx, ckpt, src, out, base, names, plan, done, source=record, fingerprint=fp
        )
        result.copied, result.skipped = side.copied, side.skipped
        result.notes += side.notes
    return result


def _check_not_source(out: Path, ckpt: Checkpoint) -> None:
    if same_folder(out, ckpt.folder, ckpt.place):
        raise OutputExistsError(
            f"{out}: OUT_DIR is the source's own folder; write the shards to another folder "
            "(the source is never modified)"
        )


def describe(result: SplitResult) -> str:
    """One line: how many files, the largest, and the cap."""
    largest = result.largest
    return (
        f"{len(result.files)} file{'s' if len(result.files) != 1 else ''}, largest "
        f"{largest} bytes ({format_size(largest)}), cap {result.cap} bytes "
        f"({format_size(result.cap)})"
    )
