"""Differential update: bring an earlier split up to date with a new version of the model.

``update(NEW_SRC, OUT_DIR)`` (the CLI's ``safeshard split NEW_SRC OUT_DIR --update``)
starts from the safeshard split already in OUT_DIR: its index, its shards and its
manifest (``{BASE}.safeshard.json``), which records each shard's size and SHA-256,
each tensor's digest and the cap. The old shards' bytes are never read.

1. **Compare.** The new source is read once: every tensor is hashed (XXH3-128, files
   and parts of files in parallel, bounded buffers, :mod:`safeshard.io.scan`) and
   compared with the manifest's hash and the old header's dtype and shape. Each
   tensor is *unchanged*, *changed*, *added* or *removed*.
2. **Plan.** The earlier plan (tensor -> shard) is kept. A shard is *dirty* when one
   of its tensors changed or was removed, or when the ``__metadata__`` changed (every
   header carries it). Added tensors join, a group (block) at a time, the shard
   holding their model-order neighbour (the previous one first) when it still fits
   the cap; the rest get new shards planned by :func:`plan.plan_shards`. A shard
   that no longer fits the cap (a tensor grew, or ``max_shard_size`` is smaller) is
   re-planned in place into as many shards as it needs; a shard left empty goes.
   Inside a rewritten shard the data is in model order, with the exact header of
   :func:`header.build_header`; every file stays within the cap, header included.
3. **Write.** Only dirty shards are written. A shard whose tensors did not change
   is not touched (its bytes and modification time stay). When the shard count
   changes, every ``-of-N`` name changes: shards with unchanged content are renamed,
   not rewritten (the name is not inside the file).

Crash safety is the output transaction's (:mod:`safeshard.io.transaction`). The dirty
shards are first staged under hidden temporary names (fsynced), and renamed shards
are staged as hard links, while the old split stays whole; an update killed then
leaves the old split intact, and the next update keeps the staged shards that its
journal vouches for (resume). Then the commit: its record goes to the journal, the
old index and manifest are removed, the staged files are renamed into place, old
files no longer needed are deleted, and the new manifest and, last, the new index
are renamed into place. A commit interrupted midway is finished by the next writer
that opens the folder. So a folder with an index is always complete. The new source
is only ever opened read-only, and the bytes copied from it are re-hashed on the way
and checked against the first pass, so a source that changes during the update
fails it.

The kept shards are trusted on their recorded sizes and headers; their bytes are
not re-read (run ``safeshard verify OUT_DIR`` for that).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeshard import gcpause
from safeshard.checkpoint import Checkpoint, common_metadata, open_checkpoint, read_manifest
from safeshard.errors import IndexFormatError, SafeshardError, UpdateError, UsageError, read_error
from safeshard.format.blocks import describe_blocks, group_tensors, model_order
from safeshard.format.filenames import INDEX_SUFFIX, MANIFEST_SUFFIX
from safeshard.format.header import TensorSpec, build_header
from safeshard.format.manifest import Manifest, header_digest, manifest_path
from safeshard.io.bytesrc import read_exact
from safeshard.io.copier import Sha256Pool, hash_source
from safeshard.io.localfs import require_space
from safeshard.io.scan import FileTask, Range, scan
from safeshard.io.store import (
    as_path,
    local_path,
    open_source,
    output_folder,
    same_folder,
    translate_errors,
)
from safeshard.io.transaction import FileRecord, OutputStore, StepHook
from safeshard.ops.plan import plan_shards
from safeshard.ops.sidecar import copy_sidecars
from safeshard.ops.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    FileStatus,
    OutputFile,
    OutputResult,
    Written,
    check_base,
    describe_checkpoint,
    fingerprint,
    intact,
    open_sources,
    output_names,
    source_record,
    tensor_extents,
    with_sha256,
    write_shard,
)
from safeshard.redact import redact_url
from safeshard.sizes import format_size, parse_size

__all__ = ["UpdateResult", "describe", "update"]

ProgressFactory = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]
"""Called with a label (``"hashing"``, ``"writing"``) and the bytes that step reads or
writes; yields a callback taking bytes just done."""

MIN_PART = 256 * 1024 * 1024
"""Smallest share of one source file that a hashing thread gets."""


@dataclass
class UpdateResult(OutputResult):
    """What ``update`` planned or did.

    ``removed`` lists every old file name no longer in OUT_DIR: what to delete from a
    copy or an upload. Those whose bytes live on under a new name are also in
    ``renamed``; a shard rewritten under a new name has the old one as ``previous``.
    """

    old_files: list[str] = field(default_factory=list)
    unchanged: int = 0
    changed: list[str] = field(default_factory=list)
    added_tensors: list[str] = field(default_factory=list)
    removed_tensors: list[str] = field(default_factory=list)
    metadata_changed: bool = False
    bytes_hashed: int = 0
    resumed: list[str] = field(default_factory=list)
    """Shards an interrupted update had staged, found intact and kept."""

    @property
    def kept(self) -> list[str]:
        return self.with_status("kept")

    @property
    def rewritten(self) -> list[str]:
        return self.with_status("rewritten")

    @property
    def added(self) -> list[str]:
        return self.with_status("added")

    @property
    def renamed(self) -> list[tuple[str, str]]:
        """``(old name, new name)`` of each shard renamed with its bytes unchanged."""
        return [(f.previous or "", f.file) for f in self.files if f.status == "renamed"]

    @property
    def names_changed(self) -> bool:
        """The shard count changed, so every ``-of-N`` name did."""
        return len(self.files) != len(self.old_files)

    @property
    def up_to_date(self) -> bool:
        """Nothing had to be written: every shard was kept as it was."""
        return all(f.status == "kept" for f in self.files) and not self.removed

    def to_json(self) -> dict[str, Any]:
        obj = super().to_json()
        obj.update(
            {
                "up_to_date": self.up_to_date,
                "names_changed": self.names_changed,
                "old_files": list(self.old_files),
                "kept": self.kept,
                "renamed": [{"from": a, "to": b} for a, b in self.renamed],
                "rewritten": self.rewritten,
                "added": self.added,
                "resumed": list(self.resumed),
                "tensors": {
                    "unchanged": self.unchanged,
                    "changed": list(self.changed),
                    "added": list(self.added_tensors),
                    "removed": list(self.removed_tensors),
                },
                "metadata_changed": self.metadata_changed,
                "bytes_hashed": self.bytes_hashed,
            }
        )
        return obj


# --------------------------------------------------------------------------- the old split


def _fresh(out: Path) -> str:
    return f"make a fresh split with `safeshard split NEW_SRC {out} --force`"


def _find_base(out: Path, name: str | None) -> str:
    if name is not None:
        return check_base(name)
    found = sorted(p.name[: -len(MANIFEST_SUFFIX)] for p in out.glob("*" + MANIFEST_SUFFIX))
    if len(found) > 1:
        raise UsageError(
            f"{out}: holds the manifests of several splits ({', '.join(found)}); "
            "pass --name to say which one to update"
        )
    return found[0] if found else "model"


def _read_old(out: Path, base: str) -> tuple[Manifest, Checkpoint]:
    """The earlier split's manifest and checkpoint, after cheap structural checks."""
    if not out.is_dir():
        raise UpdateError(
            f"{out}: no such folder; --update needs an earlier safeshard split there. "
            "Run a plain split first"
        )
    mpath = manifest_path(out, base)
    try:
        man = read_manifest(out, base, follow_symlinks=False)
    except (IndexFormatError, OSError) as e:
        raise UpdateError(f"{e}; the earlier split cannot be trusted: {_fresh(out)}") from None
    if man is None:
        raise UpdateError(
            f"{out}: holds no safeshard manifest ({mpath.name}), so there is no earlier "
            "safeshard split to update (the manifest records the shard plan and the tensor "
            f"hashes --update builds on); {_fresh(out)}"
        )
    index = out / f"{base}{INDEX_SUFFIX}"
    try:
        ckpt = open_checkpoint(index if index.is_file() else out / f"{base}.safetensors")
    except (SafeshardError, OSError) as e:
        raise UpdateError(
            f"{out}: the earlier split does not verify ({e}). Run `safeshard verify {out}` "
            f"to see what is wrong, or {_fresh(out)}"
        ) from None
    problem = _manifest_problem(man, ckpt)
    if problem is not None:
        raise UpdateError(
            f"{mpath}: does not describe the split beside it ({problem}). Run "
            f"`safeshard verify {out}` to see what is wrong, or {_fresh(out)}"
        )
    return man, ckpt


def _manifest_problem(man: Manifest, ckpt: Checkpoint) -> str | None:
    recorded = {s.file: s.size for s in man.shards}
    actual = {Path(h.path).name: h.file_size for h in ckpt.headers}
    if set(recorded) != set(actual):
        return (
            f"it records {', '.join(sorted(recorded)) or 'no files'}, but the split has "
            f"{', '.join(sorted(actual))}"
        )
    for name, size in actual.items():
        if recorded[name] != size:
            return f"{name} is {size} bytes, but the manifest records {recorded[name]}"
    for tensor, e in ckpt.entries.items():
        rec = man.tensors.get(tensor)
        if rec is None:
            return f"it has no hash for {tensor!r}"
        if rec.nbytes != e.info.nbytes:
            return f"{tensor!r} has {e.info.nbytes} bytes, but the manifest records {rec.nbytes}"
    extra = sorted(set(man.tensors) - set(ckpt.entries))
    if extra:
        return f"it records {extra[0]!r}, which no shard holds"
    return None


# --------------------------------------------------------------------------- the new source


def _parts(ranges: Sequence[Range], k: int) -> list[tuple[Range, ...]]:
    """``ranges`` (in file order) cut into at most ``k`` runs of similar byte counts."""
    total = sum(r.nbytes for r in ranges)
    k = max(1, min(k, total // MIN_PART))
    out: list[tuple[Range, ...]] = []
    cur: list[Range] = []
    done = 0
    for r in ranges:
        cur.append(r)
        done += r.nbytes
        if len(out) < k - 1 and done >= total * (len(out) + 1) / k:
            out.append(tuple(cur))
            cur = []
    if cur or not out:
        out.append(tuple(cur))
    return out


def _hash_source(
    ckpt: Checkpoint, workers: int | None, progress: ProgressFactory | None
) -> tuple[dict[str, str], int]:
    """The digest of every tensor of ``ckpt``, reading each byte once; and the bytes read."""
    n = workers if workers is not None else (os.cpu_count() or 2)
    tasks: list[FileTask] = []
    for h, f in zip(ckpt.headers, ckpt.located.files, strict=True):
        ranges = [Range(t.name, h.data_start + t.begin, t.nbytes, digest=True) for t in h.tensors]
        tasks += [FileTask(f, part, size=h.file_size) for part in _parts(ranges, n)]
    total = sum(t.planned_bytes for t in tasks)
    ctx: AbstractContextManager[Callable[[int], None] | None] = (
        progress("hashing", total) if progress is not None else nullcontext(None)
    )
    with ctx as advance:
        results = scan(tasks, workers=n, progress=advance)
    hashes: dict[str, str] = {}
    for task, res in zip(tasks, results, strict=True):
        if res.error is not None:
            raise read_error(task.path, "hash the new source", OSError(res.error))
        hashes.update(res.hashes)
    return hashes, sum(r.bytes_read for r in results)


# --------------------------------------------------------------------------- the plan


@dataclass
class _Slot:
    """A shard of the updated split: tensors in data order, where it came from, and
    whether its bytes must be written."""

    names: list[str]
    old: str | None
    dirty: bool
    old_size: int = 0


@dataclass
class _Changes:
    unchanged: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _classify(old: Checkpoint, man: Manifest, new: Checkpoint, hashes: dict[str, str]) -> _Changes:
    ch = _Changes()
    for name, e in new.entries.items():
        o = old.entries.get(name)
        if o is None:
            ch.added.append(name)
        elif (
            o.info.dtype != e.info.dtype
            or o.info.shape != e.info.shape
            or man.tensors[name].digest != hashes[name]
        ):
            ch.changed.append(name)
        else:
            ch.unchanged.append(name)
    ch.removed = [n for n in old.entries if n not in new.entries]
    for lst in (ch.changed, ch.added, ch.removed):
        lst.sort()
    return ch


class _Planner:
    def __init__(
        self,
        specs: dict[str, TensorSpec],
        metadata: dict[str, str] | None,
        cap: int,
        allow_oversize: bool,
    ) -> None:
        self.specs = specs
        self.metadata = metadata
        self.cap = cap
        self.allow_oversize = allow_oversize
        self.order = model_order(list(specs))
        self.pos = {n: i for i, n in enumerate(self.order)}
        self.warnings: list[str] = []

    def sort(self, names: Iterable[str]) -> list[str]:
        return sorted(names, key=self.pos.__getitem__)

    def header(self, names: Sequence[str]) -> bytes:
        return build_header([self.specs[n] for n in names], self.metadata)

    def size(self, slot: _Slot) -> int:
        if not slot.dirty:
            return slot.old_size
        return len(self.header(slot.names)) + sum(self.specs[n].nbytes for n in slot.names)

    def fits(self, names: Sequence[str]) -> bool:
        ordered = self.sort(names)
        size = len(self.header(ordered)) + sum(self.specs[n].nbytes for n in ordered)
        return size <= self.cap

    def place_added(self, slots: list[_Slot], added: Sequence[str]) -> None:
        """Put added tensors beside their model-order neighbours, or in new shards."""
        where = {n: i for i, s in enumerate(slots) for n in s.names}
        leftovers: list[str] = []
        for g in group_tensors(list(added)):
            members = list(g.tensors)
            first = min(self.pos[t] for t in members)
            last = max(self.pos[t] for t in members)
            prev = next((where[t] for t in reversed(self.order[:first]) if t in where), None)
            after = next((where[t] for t in self.order[last + 1 :] if t in where), None)
            for c in dict.fromkeys(x for x in (prev, after) if x is not None):
                if self.fits(slots[c].names + members):
                    slots[c].names = self.sort(slots[c].names + members)
                    slots[c].dirty = True
                    where.update((t, c) for t in members)
                    break
            else:
                leftovers += members
        if leftovers:
            specs = [self.specs[n] for n in self.sort(leftovers)]
            plan = plan_shards(specs, self.cap, self.metadata, allow_oversize=self.allow_oversize)
            self.warnings += plan.warnings
            slots += [_Slot([t.name for t in s.tensors], None, True) for s in plan.shards]

    def refit(self, slots: list[_Slot]) -> list[_Slot]:
        """Slots over the cap re-planned in place; empty slots dropped; model order."""
        out: list[_Slot] = []
        for s in slots:
            if not s.names:
                continue
            size = self.size(s)
            if size <= self.cap:
                out.append(s)
                continue
            if not s.dirty and len(s.names) == 1:  # an earlier --allow-oversize shard
                self.warnings.append(
                    f"tensor {s.names[0]!r} alone needs {size} bytes, over the cap of "
                    f"{self.cap}: its oversized shard {s.old} is kept as it was"
                )
                out.append(s)
                continue
            specs = [self.specs[n] for n in self.sort(s.names)]
            plan = plan_shards(specs, self.cap, self.metadata, allow_oversize=self.allow_oversize)
            self.warnings += plan.warnings
            for i, p in enumerate(plan.shards):
                out.append(_Slot([t.name for t in p.tensors], s.old if i == 0 else None, True))
        out.sort(key=lambda s: min(self.pos[n] for n in s.names))
        return out


def _initial_slots(
    old: Checkpoint, man: Manifest, ch: _Changes, metadata_changed: bool
) -> list[_Slot]:
    touched = set(ch.changed) | set(ch.removed)
    gone = set(ch.removed)
    headers = {Path(h.path).name: h for h in old.headers}
    slots = []
    for rec in man.shards:
        h = headers[rec.file]
        names = [t.name for t in h.tensors if t.name not in gone]
        dirty = metadata_changed or any(t.name in touched for t in h.tensors)
        slots.append(_Slot(names, rec.file, dirty, h.file_size))
    return slots


# --------------------------------------------------------------------------- update


@gcpause.pausing
@translate_errors
def update(
    new_src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: str | int | None = None,
    name: str | None = None,
    allow_oversize: bool = False,
    dry_run: bool = False,
    workers: int | None = None,
    progress: ProgressFactory | None = None,
    on_step: StepHook | None = None,
    sha256: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    break_lock: bool = False,
) -> UpdateResult:
    """Update the safeshard split in ``out_dir`` to the checkpoint at ``new_src``.

    See the module docs. ``max_shard_size`` defaults to the cap the manifest records
    (else 4GB); ``name`` to the base of the one manifest in ``out_dir``. ``dry_run``
    hashes the new source and says what would happen, writing nothing. Raises
    :class:`UpdateError` when ``out_dir`` holds no safeshard split that matches its
    manifest, :class:`UsageError` for a bad ``name`` or a ``new_src`` inside
    ``out_dir``, and what :func:`plan.plan_shards` raises for a tensor over the cap.
    ``on_step`` is called with each step of the output transaction
    (:data:`safeshard.io.journal.STEPS`).
    ``sha256`` also computes the SHA-256 of every shard (files in parallel). Both paths
    may be URLs (:mod:`safeshard.io.store`), reached with ``storage_options``; in object
    storage, only the changed shards are uploaded too.
    """
    out = as_path(out_dir, storage_options)
    args = (
        new_src,
        out,
        max_shard_size,
        name,
        allow_oversize,
        dry_run,
        workers,
        progress,
        sha256,
        storage_options,
    )
    if dry_run or not out.is_dir():
        return _update(None, *args)
    with output_folder(
        out, on_step=on_step, storage_options=storage_options, break_lock=break_lock
    ) as tx:
        return _update(tx, *args)


def _update(
    tx: OutputStore | None,
    new_src: str | os.PathLike[str],
    out: Path,
    max_shard_size: str | int | None,
    name: str | None,
    allow_oversize: bool,
    dry_run: bool,
    workers: int | None,
    progress: ProgressFactory | None,
    sha256: bool,
    storage_options: Mapping[str, Any] | None,
) -> UpdateResult:
    base = _find_base(out, name) if out.is_dir() else check_base(name or "model")
    man, old = _read_old(out, base)
    cap = parse_size(
        max_shard_size
        if max_shard_size is not None
        else (man.cap if man.cap is not None else DEFAULT_MAX_SHARD_SIZE)
    )
    new = open_checkpoint(new_src, storage_options=storage_options)
    for f in new.located.files:
        if same_folder(out, f.parent):
            raise UsageError(
                f"{f}: NEW_SRC lies in OUT_DIR {out}, whose files the update replaces; "
                "give the new version from another folder"
            )
    metadata, warnings = common_metadata(new)
    old_meta, _ = common_metadata(old)
    metadata_changed = (old_meta or None) != (metadata or None)
    hashes, hashed = _hash_source(new, workers, progress)
    ch = _classify(old, man, new, hashes)
    specs = {
        n: TensorSpec(n, e.info.dtype, e.info.shape, e.info.nbytes) for n, e in new.entries.items()
    }
    planner = _Planner(specs, metadata, cap, allow_oversize)
    slots = _initial_slots(old, man, ch, metadata_changed)
    planner.place_added(slots, ch.added)
    slots = planner.refit(slots)
    for s in slots:
        if s.dirty:
            s.names = planner.sort(s.names)
    if not slots:  # every tensor removed: one file holding only the header
        slots = [_Slot([], None, True)]
    finals = list(zip(output_names(base, len(slots)), slots, strict=True))
    old_files = [s.file for s in man.shards]
    record, more = source_record(new)
    headers = {fname: planner.header(s.names) for fname, s in finals if s.dirty}
    result = UpdateResult(
        source=redact_url(new_src),
        out_dir=out,
        base=base,
        cap=cap,
        dry_run=dry_run,
        files=_describe(finals, headers, planner, man, None),
        index=out / f"{base}{INDEX_SUFFIX}" if len(finals) > 1 else None,
        manifest=manifest_path(out, base),
        lossless=record is not None,
        data_size=sum(t.nbytes for t in specs.values()),
        warnings=warnings + more + planner.warnings,
        removed=_gone(old_files, finals),
        old_files=old_files,
        unchanged=len(ch.unchanged),
        changed=ch.changed,
        added_tensors=ch.added,
        removed_tensors=ch.removed,
        metadata_changed=metadata_changed,
        bytes_hashed=hashed,
    )
    if tx is not None:
        recovered_at = len(tx.recovered)
        result.notes += tx.recovered
        _write(tx, result, man, new, finals, headers, planner, hashes, record, progress, sha256)
        result.notes += tx.recovered[recovered_at:]  # what writing the shards found
    if metadata_changed:
        result.notes.append("the __metadata__ changed, and every shard's header carries it")
    _note_names(result)
    if result.resumed:
        result.notes.append(
            f"resumed an interrupted update: kept {len(result.resumed)} staged shard(s)"
        )
    if result.up_to_date:
        result.notes.append("no tensor changed: every shard is kept as it was")
    return result


# --------------------------------------------------------------------------- writing


def _write(
    tx: OutputStore,
    result: UpdateResult,
    man: Manifest,
    new: Checkpoint,
    finals: Sequence[tuple[str, _Slot]],
    headers: dict[str, bytes],
    planner: _Planner,
    hashes: dict[str, str],
    record: Any,
    progress: ProgressFactory | None,
    sha256: bool,
) -> None:
    """Stage the dirty shards (resuming an interrupted update's), then commit."""
    out, base = result.out_dir, result.base
    names = [fname for fname, _ in finals]
    all_headers = [headers[f] if s.dirty else _old_header(out / (s.old or f)) for f, s in finals]
    fp = fingerprint(new, all_headers, names)
    todo = [(fname, s) for fname, s in finals if s.dirty]
    sizes = {f.file: f.size for f in result.files}
    staged: dict[str, FileRecord] = {}
    for fname, rec in tx.resumable("update", fp).items():
        slot = dict(todo).get(fname)
        if slot is not None and _intact(tx, rec, sizes[fname], slot.names, hashes):
            staged[fname] = rec
    tx.start("update", fp, keep=staged)
    result.resumed = sorted(staged)
    moves: list[tuple[str, str]] = []
    pool = Sha256Pool() if sha256 else None
    written: dict[str, Written] = {}
    if not result.up_to_date:
        write = [(f, s) for f, s in todo if f not in staged]
        local = local_path(out)  # None: a prefix in object storage
        if local is not None:
            require_space(local, sum(sizes[f] for f, _ in write), "the new shards")
        ctx: AbstractContextManager[Callable[[int], None] | None] = (
            progress("writing", sum(sizes[f] for f, _ in write))
            if progress is not None and write
            else nullcontext(None)
        )
        with open_sources(new) as sources, ctx as advance:
            for fname, slot in write:
                pieces = tensor_extents(new, slot.names, sources)
                w = write_shard(
                    tx, fname, headers[fname], pieces, progress=advance, stage=True, sha256=pool
                )
                moved = sorted(n for n in slot.names if w.hashes.tensors.get(n) != hashes[n])
                if moved:
                    raise UpdateError(
                        f"{new.path_of(moved[0])}: tensor {moved[0]!r} changed while the "
                        "update read it (its digest differs between two reads); nothing in "
                        f"{out} was changed. Run the update again once the source is complete"
                    )
                staged[fname], written[fname] = w.record, w
        moves = [(staged[f].staged or "", f) for f, _ in todo]
        moves += [
            (tx.stage_link(s.old, f), f) for f, s in finals if not s.dirty and s.old and s.old != f
        ]
    side = copy_sidecars(
        new.folder,
        tx,
        base=base,
        only_known=Path(result.source).name.endswith(".safetensors"),
        open_file=new.place.open,
    )
    result.copied, result.skipped = side.copied, side.skipped
    result.notes += side.notes
    recorded = {s.file: s for s in man.shards}
    records: dict[str, FileRecord] = {}
    for (f, s), head in zip(finals, all_headers, strict=True):
        if s.dirty:
            records[f] = staged[f]
            continue
        old = recorded[s.old or f]
        sha = old.sha256
        if sha256 and sha is None:  # an earlier split made without --sha256
            with open_source(out / (s.old or f)) as src:  # a file, or an object read back
                sha = hash_source(src)
        records[f] = FileRecord(old.size, header_digest(head), {n: hashes[n] for n in s.names}, sha)
    with_sha256(records, written)
    result.files = _describe(finals, headers, planner, None, records)
    tx.commit(
        moves,
        result.removed,
        finals=describe_checkpoint(
            out,
            base,
            names,
            [[planner.specs[n] for n in s.names] for _, s in finals],
            records,
            cap=result.cap,
            source=record,
            fingerprint=fp,
            index_metadata=None if new.index is None else new.index.metadata,
        ),
    )


def _intact(
    tx: OutputStore, rec: FileRecord, size: int, names: Sequence[str], hashes: dict[str, str]
) -> bool:
    """Whether an interrupted update's staged file is still what this update would write."""
    if rec.staged is None or rec.size != size or set(rec.tensors) != set(names):
        return False
    if any(rec.tensors[n] != hashes[n] for n in names):
        return False
    return intact(tx.path(rec.staged), rec)


def _gone(old_files: Sequence[str], finals: Sequence[tuple[str, _Slot]]) -> list[str]:
    """Old file names that no longer exist after the update (deleted or renamed away)."""
    targets = {fname for fname, _ in finals}
    return [n for n in old_files if n not in targets]


def _describe(
    finals: Sequence[tuple[str, _Slot]],
    headers: dict[str, bytes],
    planner: _Planner,
    man: Manifest | None,
    records: dict[str, FileRecord] | None,
) -> list[OutputFile]:
    """The files of the update: planned (``records`` None) or done."""
    recorded = {s.file: s for s in man.shards} if man is not None else {}
    files = []
    for fname, s in finals:
        sha: str | None
        if s.dirty:
            status: FileStatus = "added" if s.old is None else "rewritten"
            size = len(headers[fname]) + sum(planner.specs[n].nbytes for n in s.names)
            sha = records[fname].sha256 if records is not None else None
        elif s.old is None:  # a clean slot always comes from an old shard
            raise UpdateError(f"{fname}: kept unchanged, but no old shard is recorded for it")
        else:
            status = "kept" if s.old == fname else "renamed"
            if records is not None:
                sha, size = records[fname].sha256, records[fname].size
            else:
                sha, size = recorded[s.old].sha256, recorded[s.old].size
        blocks = describe_blocks(group_tensors(s.names))
        files.append(OutputFile(fname, size, sha, len(s.names), blocks, status, previous=s.old))
    return files


def _note_names(result: UpdateResult) -> None:
    if not result.names_changed:
        return
    same = [f"{f.previous} -> {f.file}" for f in result.files if f.status == "renamed"]
    result.notes.append(
        f"the shard count changed from {len(result.old_files)} to {len(result.files)}, so every "
        "file name changed (-of-N)"
        + (
            f"; renamed with identical content (not rewritten): {', '.join(same)}"
            if same
            else "; no file kept identical content"
        )
    )


def _old_header(path: Path) -> bytes:
    """A kept shard's header bytes as stored (length prefix included)."""
    with open_source(path) as src:
        head = bytearray(8)
        read_exact(src, [memoryview(head)], 0, "the header length")
        body = bytearray(int.from_bytes(head, "little"))
        read_exact(src, [memoryview(body)], 8, "the header")
        return bytes(head + body)


def describe(result: UpdateResult) -> str:
    """One line: what happened to the tensors and the files."""
    parts = [
        f"{len(result.changed)} tensor(s) changed",
        f"{len(result.added_tensors)} added",
        f"{len(result.removed_tensors)} removed",
        f"{result.unchanged} unchanged",
    ]
    files = [
        f"{len(result.kept)} kept",
        f"{len(result.renamed)} renamed",
        f"{len(result.rewritten)} rewritten",
        f"{len(result.added)} added",
        f"{len(result.removed)} removed",
    ]
    largest = result.largest
    return (
        f"{', '.join(parts)}; files: {', '.join(files)}; largest {largest} bytes "
        f"({format_size(largest)}), cap {result.cap} bytes ({format_size(result.cap)})"
    )
