"""Split a checkpoint into one checkpoint per tensor-parallel rank (``split --tp N``).

``split(SRC, OUT, tp=N, tp_plan="auto")`` writes ``OUT/rank-0000r-of-0000N/`` for each
rank ``r``: an ordinary Hugging Face checkpoint of that rank's slices (the tensors' own
names, sliced shapes), sharded under the cap like any split (``model-0000k-of-0000m``
shards, the index, safeshard's manifest) with the source folder's other files
(``config.json``, tokenizer) copied beside them. Each slice is the one
``safeshard.load(SRC, tp_plan=..., rank=r, world_size=N)`` returns
(:meth:`safeshard.tpplan.RankPlan.slice_of`), written as byte ranges of the source
(:func:`safeshard.tpplan.byte_ranges`): nothing is loaded, every byte moves by
``copy_file_range`` (or ranged GETs) through the one copier.

Every rank's slices are computed before anything is written, so a world size that cuts
a GPTQ group or a head is refused (:class:`~safeshard.errors.TensorParallelError`) with
OUT untouched. Each rank folder is its own output transaction (lock, temporaries,
journal, commit); OUT's transaction removes an older ``tp.json`` first and writes the new
one last (:mod:`safeshard.ops.tpmerge`), so a folder with ``tp.json`` is complete.
``safeshard merge OUT FILE`` rebuilds the source from it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from safeshard.checkpoint import Checkpoint, common_metadata, open_checkpoint
from safeshard.errors import OutputExistsError, TensorParallelError, UsageError
from safeshard.format.filenames import INDEX_SUFFIX, RANK_RE, TP_RECORD_NAME
from safeshard.format.filenames import rank_folder_name as rank_folder
from safeshard.format.header import DTYPE_BITS, TensorSpec, build_header
from safeshard.format.manifest import manifest_path
from safeshard.io.bytesrc import Extent, Sources
from safeshard.io.copier import Progress, Sha256Pool
from safeshard.io.localfs import require_space
from safeshard.io.store import as_path, local_path, output_folder, same_folder
from safeshard.io.transaction import FileRecord, StepHook, prepare_folder
from safeshard.ops.merge import manifest_of, merge_layout
from safeshard.ops.plan import Plan, ShardPlan, plan_shards
from safeshard.ops.tpmerge import TpRecord, TpTensor
from safeshard.ops.writer import (
    CHECKPOINT_SUFFIXES,
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
    with_sha256,
    write_shard,
)
from safeshard.redact import redact_url
from safeshard.sizes import parse_size
from safeshard.tpplan import RankPlan, TensorSlice, auto_plan, byte_ranges

__all__ = ["TpSplitResult", "split_tp"]


@dataclass
class TpSplitResult(SplitResult):
    """What ``split(..., tp=N)`` planned or did: ``files`` are every rank's shards (named
    ``rank-0000r-of-0000N/FILE``), ``ranks`` each rank folder's own result."""

    world_size: int = 1
    tp_plan: dict[str, str] = field(default_factory=dict)
    ranks: list[SplitResult] = field(default_factory=list)
    tp_record: Path | None = None

    def to_json(self) -> dict[str, Any]:
        obj = super().to_json()
        obj["world_size"] = self.world_size
        obj["tp_plan"] = dict(self.tp_plan)
        obj["tp_record"] = None if self.tp_record is None else self.tp_record.name
        obj["ranks"] = [
            {"rank": r, "folder": rank_folder(r, self.world_size), **res.to_json()}
            for r, res in enumerate(self.ranks)
        ]
        return obj


def _rules(tp_plan: Mapping[str, str] | str, folder: Any) -> dict[str, str]:
    if isinstance(tp_plan, str):
        if tp_plan != "auto":
            raise UsageError(
                f"tp_plan must be 'auto' or a mapping of patterns to styles, not {tp_plan!r}"
            )
        return auto_plan(folder)
    if not isinstance(tp_plan, Mapping):
        raise UsageError(f"tp_plan must be 'auto' or a mapping, not {tp_plan!r}")
    return {str(k): str(v) for k, v in tp_plan.items()}


def _check_bytes(sl: TensorSlice) -> None:
    if not sl.whole and DTYPE_BITS[sl.dtype] % 8:
        raise TensorParallelError(
            f"tensor {sl.name!r} has dtype {sl.dtype}, whose elements are not whole bytes; "
            "it can only be replicated (plan it 'replicate')"
        )


def rank_extents(ckpt: Checkpoint, slices: Sequence[TensorSlice], sources: Sources) -> list[Extent]:
    """Where each slice's bytes lie in the source, in order: one extent per byte range
    (:func:`~safeshard.tpplan.byte_ranges`), all named after the tensor."""
    opened: dict[int, tuple[Any, int]] = {}
    out: list[Extent] = []
    for sl in slices:
        e = ckpt.entries[sl.name]
        got = opened.get(e.shard)
        if got is None:
            h = ckpt.headers[e.shard]
            got = opened[e.shard] = (sources.get(h.path), h.data_start)
        start = got[1] + e.info.begin
        ranges = byte_ranges(sl)
        if not ranges:
            out.append(Extent(got[0], start, 0, sl.name))
        out.extend(Extent(got[0], start + off, n, sl.name) for off, n in ranges)
    return out


def split_tp(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tp: int,
    tp_plan: Mapping[str, str] | str = "auto",
    tp_config: Mapping[str, Any] | None = None,
    max_shard_size: str | int,
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
) -> TpSplitResult:
    """See the module docs; the options are :func:`safeshard.split`'s."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise UsageError(f"--tp must be a world size of at least 1, not {tp!r}")
    if resume and force:
        raise UsageError("--resume keeps finished shards and --force replaces them: pick one")
    cap = parse_size(max_shard_size)
    base = check_base(name)
    ckpt = open_checkpoint(src, storage_options=storage_options)
    metadata, warnings = common_metadata(ckpt)
    rules = _rules(tp_plan, ckpt.folder)
    infos = list(ckpt.tensors())
    tensors = {t.name: t for t in infos}
    where = str(ckpt.index.path) if ckpt.index is not None else ckpt.headers[0].path
    plans = [
        RankPlan.build(
            rules,
            r,
            tp,
            folder=ckpt.folder,
            tensors=tensors,
            metadata=ckpt.metadata,
            tp_config=tp_config,
            where=where,
        )
        for r in range(tp)
    ]
    # every rank's slices first: a refused world size writes nothing
    slices = [[p.slice_of(t) for t in infos] for p in plans]
    for per_rank in slices:
        for sl in per_rank:
            _check_bytes(sl)
    manifest = manifest_of(ckpt, warnings)
    layout = merge_layout(ckpt, manifest)
    recorded = manifest.tensors if manifest is not None else {}
    heads = plans[0].heads
    record = TpRecord(
        world_size=tp,
        base=base,
        plan=rules,
        tensors=_ordered(layout.order, tensors, slices),
        merged_header=layout.header[8:].decode("utf-8"),
        lossless=layout.lossless,
        reason=layout.reason,
        digests=None
        if manifest is None
        else {n: recorded[n].digest for n in layout.order if n in recorded},
        heads=None if heads is None else asdict(heads),
    )
    out = as_path(out_dir, storage_options)
    ranks: list[SplitResult] = []
    for r in range(tp):
        specs = [TensorSpec(sl.name, sl.dtype, sl.shape, sl.nbytes) for sl in slices[r]]
        plan = plan_shards(specs, cap, metadata, balance=balance, allow_oversize=allow_oversize)
        if not plan.shards:
            empty = ShardPlan(tensors=(), header=build_header([], metadata), groups=())
            plan = Plan((empty,), plan.cap, plan.metadata, plan.warnings, plan.split_groups)
        names = output_names(base, len(plan.shards))
        folder = out / rank_folder(r, tp)
        ranks.append(
            SplitResult(
                source=redact_url(src),
                out_dir=folder,
                base=base,
                cap=plan.cap,
                dry_run=dry_run,
                files=[
                    shard_file(n, s, None, "planned")
                    for n, s in zip(names, plan.shards, strict=True)
                ],
                index=None if len(names) == 1 else folder / f"{base}{INDEX_SUFFIX}",
                manifest=manifest_path(folder, base),
                lossless=False,
                data_size=plan.total_size,
                warnings=[f"rank {r}: {w}" for w in plan.warnings],
                plan=plan,
            )
        )
    result = TpSplitResult(
        source=redact_url(src),
        out_dir=out,
        base=base,
        cap=cap,
        dry_run=dry_run,
        files=_all_files(ranks, tp),
        index=None,
        manifest=None,
        lossless=layout.lossless,
        data_size=sum(r.data_size for r in ranks),
        warnings=warnings + [w for r in ranks for w in r.warnings],
        notes=[
            f"{tp} rank folders rank-00000-of-{tp:05d} .. {rank_folder(tp - 1, tp)}, and "
            f"{TP_RECORD_NAME} (merge rebuilds the source: "
            + ("its original file, byte for byte)" if layout.lossless else "a canonical file)")
        ],
        world_size=tp,
        tp_plan=rules,
        ranks=ranks,
        tp_record=out / TP_RECORD_NAME,
    )
    if dry_run:
        return result
    if same_folder(out, ckpt.folder, ckpt.place):
        raise OutputExistsError(
            f"{out}: OUT_DIR is the source's own folder; write the ranks to another folder "
            "(the source is never modified)"
        )
    local = local_path(out)
    if local is not None:
        prepare_folder(local)
    fp = fingerprint(ckpt, [], [], "tp", json.dumps(rules, sort_keys=True), str(tp))
    with output_folder(
        out, on_step=on_step, storage_options=storage_options, break_lock=break_lock
    ) as top:
        result.notes += top.recovered
        existing = top.checkpoint_files((*CHECKPOINT_SUFFIXES, TP_RECORD_NAME))
        stale = _other_rank_folders(out, tp)
        if (existing and not (force or resume)) or (stale and not force):
            found = existing + [f"{n}/" for n in stale]
            listed = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
            raise OutputExistsError(
                f"{out}: already holds a checkpoint ({listed}); pass --force to replace it"
                + ("" if stale else " or --resume to finish an interrupted split")
            )
        top.start("split-tp", fp)
        # the old record goes first: until the new one is written the folder is incomplete
        result.removed = top.remove(existing)
        with open_sources(ckpt) as sources:
            for r, res in enumerate(ranks):
                _write_rank(
                    ckpt,
                    sources,
                    res,
                    slices[r],
                    extra=(f"tp rank {r} of {tp}", json.dumps(rules, sort_keys=True)),
                    src=src,
                    resume=resume,
                    force=force,
                    progress=progress,
                    on_step=on_step,
                    sha256=sha256,
                    storage_options=storage_options,
                    break_lock=break_lock,
                )
        result.files = _all_files(ranks, tp)
        result.copied = sorted({c for r in ranks for c in r.copied})
        for name in stale:  # after the new ranks: the old ones go before tp.json is written
            result.removed += _empty_rank_folder(
                out / name, result.copied, on_step, storage_options, break_lock
            )
        result.notes += [f"rank {r}: {n}" for r, res in enumerate(ranks) for n in res.notes]
        top.commit(finals={TP_RECORD_NAME: record.to_json()})
    return result


def _other_rank_folders(out: Any, tp: int) -> list[str]:
    """Folders of ``out`` named like rank folders but not of world size ``tp``: left by an
    earlier ``split --tp`` with another world size."""
    try:
        found = [p.name for p in out.iterdir() if RANK_RE.match(p.name) and p.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    ours = {rank_folder(r, tp) for r in range(tp)}
    return sorted(n for n in found if n not in ours)


def _empty_rank_folder(
    folder: Any,
    sidecars: Sequence[str],
    on_step: StepHook | None,
    storage_options: Mapping[str, Any] | None,
    break_lock: bool,
) -> list[str]:
    """Remove what a rank folder of an earlier split holds (its weights, index, manifest
    and the sidecar files a split copies), then the folder if that left it empty; the
    names removed, as ``FOLDER/FILE``. Other files are left where they are."""
    with output_folder(
        folder, on_step=on_step, storage_options=storage_options, break_lock=break_lock
    ) as tx:
        gone = tx.remove([*tx.checkpoint_files(CHECKPOINT_SUFFIXES), *sidecars])
    local = local_path(folder)
    if local is not None:
        with contextlib.suppress(OSError):
            local.rmdir()  # only when empty
    return [f"{folder.name}/{n}" for n in gone]


def _ordered(
    order: Sequence[str], tensors: Mapping[str, Any], slices: Sequence[Sequence[TensorSlice]]
) -> dict[str, TpTensor]:
    at = {n: i for i, n in enumerate(tensors)}
    return {n: _tp_tensor(tensors[n], [s[at[n]] for s in slices]) for n in order}


def _tp_tensor(info: Any, per_rank: Sequence[TensorSlice]) -> TpTensor:
    first = per_rank[0]
    dim = None if all(s.dim is None or s.whole for s in per_rank) else first.dim
    return TpTensor(
        name=info.name,
        dtype=info.dtype,
        shape=tuple(info.shape),
        style=first.style,
        dim=dim,
        slices=()
        if dim is None
        else tuple(s.intervals if s.dim is not None else ((0, info.shape[dim]),) for s in per_rank),
    )


def _all_files(ranks: Sequence[SplitResult], tp: int) -> list[Any]:
    return [
        replace(f, file=f"{rank_folder(r, tp)}/{f.file}")
        for r, res in enumerate(ranks)
        for f in res.files
    ]


def _write_rank(
    ckpt: Checkpoint,
    sources: Sources,
    res: SplitResult,
    slices: Sequence[TensorSlice],
    *,
    extra: Sequence[str],
    src: str | os.PathLike[str],
    resume: bool,
    force: bool,
    progress: Progress | None,
    on_step: StepHook | None,
    sha256: bool,
    storage_options: Mapping[str, Any] | None,
    break_lock: bool,
) -> None:
    """Write one rank's folder: its shards, the sidecars, manifest and index."""
    folder, base, plan = res.out_dir, res.base, res.plan
    names = [f.file for f in res.files]
    local = local_path(folder)
    if local is not None:
        prepare_folder(local)
    with output_folder(
        folder, on_step=on_step, storage_options=storage_options, break_lock=break_lock
    ) as tx:
        res.notes += tx.recovered
        fp = fingerprint(ckpt, [s.header for s in plan.shards], names, *extra)
        kept = begin_split(tx, res, names, fp, resume=resume, force=force, progress=progress)
        todo = [(n, s) for n, s in zip(names, plan.shards, strict=True) if n not in kept]
        if local is not None:
            require_space(local, sum(s.file_size for _, s in todo), "the shards")
        by_name = {sl.name: sl for sl in slices}
        pool = Sha256Pool() if sha256 else None
        done: dict[str, FileRecord] = dict(kept)
        written: dict[str, Written] = {}
        for fname, shard in todo:
            pieces = rank_extents(ckpt, [by_name[t.name] for t in shard.tensors], sources)
            w = write_shard(tx, fname, shard.header, pieces, progress=progress, sha256=pool)
            written[fname], done[fname] = w, w.record
        with_sha256(done, written)
        if sha256:  # kept shards of a run that did not compute it
            hash_kept(done, kept, folder)
        res.files = [
            shard_file(n, s, done[n].sha256, "kept" if n in kept else "written")
            for n, s in zip(names, plan.shards, strict=True)
        ]
        side = finish_split(
            tx, ckpt, src, folder, base, names, plan, done, source=None, fingerprint=fp
        )
        res.copied, res.skipped = side.copied, side.skipped
        res.notes += side.notes
