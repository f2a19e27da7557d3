"""Split a checkpoint into layer-aligned shards, or reshard a sharded one.

``split(SRC, OUT_DIR)`` plans shards with :func:`plan.plan_shards` over the
source's tensors (SRC is a file, a folder or an index; an index means a reshard)
and writes each shard as its exact planned header followed by its tensors in model
order, copied by byte ranges from the source (``copy_file_range``), never through
Python objects the size of a tensor. SHA-256 of each file and an XXH3-128 digest of each tensor are
computed on the side (:mod:`safeshard.hashcopy`).

Output, in OUT_DIR:

- ``{BASE}-{i:05d}-of-{n:05d}.safetensors`` and ``{BASE}.safetensors.index.json``,
  or ``{BASE}.safetensors`` alone (no index) when everything fits in one file;
- ``{BASE}.safeshard.json``, the manifest: shard sizes and SHA-256, per-tensor
  digests (XXH3-128), and the original file's header so that ``merge`` restores it byte for
  byte (carried forward through reshards of safeshard output);
- the source folder's other files (:mod:`safeshard.sidecar`).

Crash safety. Writes happen under an exclusive lock on OUT_DIR. Each file is
written under a temporary name, fsynced and renamed. Before any shard is written,
every old index and manifest in OUT_DIR is removed; the order of writing is
shards, sidecars, manifest, and the index last, so a folder with an index is
complete. A hidden journal (``.safeshard-journal.json``) records each finished
shard's size and hashes with a fingerprint of the plan and the source (paths,
sizes, modification times, headers); ``resume`` keeps the shards it vouches for
after re-hashing them, and the journal is removed when the split completes (the
manifest keeps the fingerprint, so resuming a finished split keeps everything).
Stale temporaries of a killed run are removed on the next run. The source is only
ever opened read-only.

``force`` and ``resume`` both let safeshard replace OUT_DIR's checkpoint files:
every ``*.safetensors``, ``*.safetensors.index.json`` and ``*.safeshard.json`` in
it, whatever their base name, because a leftover weights file of another base would
be found by some loaders instead of the new shards. Other files are left alone,
except those the sidecar copy overwrites.

Building blocks for other writers (a differential ``--update``):
:func:`write_shard` writes one file from a header and source byte ranges and
returns its hashes; :func:`write_manifest_and_index` finishes an output folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import (
    HeaderError,
    IndexFormatError,
    OutputExistsError,
    SafeshardError,
    UsageError,
)
from .fsio import (
    AtomicWriter,
    DirLock,
    fsync_dir,
    require_space,
    stale_temporaries,
    unwritable,
    write_atomic,
)
from .hashcopy import Hashes, Piece, Progress, copy_pieces, hash_file
from .header import TensorSpec, build_header
from .index import INDEX_SUFFIX, index_json, shard_name
from .layout import describe_blocks
from .manifest import (
    MANIFEST_SUFFIX,
    Manifest,
    ShardRecord,
    SourceRecord,
    TensorRecord,
    manifest_path,
    read_manifest,
)
from .plan import Plan, ShardPlan, plan_shards
from .sidecar import copy_sidecars
from .sizes import format_size, parse_size
from .source import Checkpoint, common_metadata, open_checkpoint

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "JOURNAL_NAME",
    "ShardFile",
    "SplitResult",
    "WrittenShard",
    "checkpoint_files",
    "output_names",
    "split",
    "write_manifest_and_index",
    "write_shard",
]

DEFAULT_MAX_SHARD_SIZE = "4GB"
JOURNAL_NAME = ".safeshard-journal.json"
JOURNAL_FORMAT = "safeshard-journal"
CRASH_ENV = "SAFESHARD_TEST_CRASH"
"""Test hook: ``shard-done:K``, ``mid-shard:K``, ``before-manifest`` or ``before-index``
makes the process kill itself with SIGKILL at that point (crash-safety tests)."""

Status = Literal["planned", "written", "kept"]


@dataclass(frozen=True)
class ShardFile:
    """One output file: name, exact size, hash (None in a dry run), contents."""

    file: str
    size: int
    sha256: str | None
    tensors: int
    blocks: str
    oversize: bool
    status: Status

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "size": self.size,
            "sha256": self.sha256,
            "tensors": self.tensors,
            "blocks": self.blocks,
            "oversize": self.oversize,
            "status": self.status,
        }


@dataclass
class SplitResult:
    """What ``split`` planned or did."""

    source: str
    out_dir: Path
    files: list[ShardFile]
    index: Path | None
    manifest: Path | None
    plan: Plan
    base: str
    dry_run: bool
    lossless: bool
    """True when the manifest records the original file's header (merge restores it)."""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def single_file(self) -> bool:
        return len(self.files) == 1

    @property
    def total_size(self) -> int:
        """Sum of tensor data bytes (the index's ``total_size``)."""
        return self.plan.total_size

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "out_dir": str(self.out_dir),
            "dry_run": self.dry_run,
            "base": self.base,
            "cap": self.plan.cap,
            "single_file": self.single_file,
            "shards": [f.to_json() for f in self.files],
            "index": None if self.index is None else self.index.name,
            "manifest": None if self.manifest is None else self.manifest.name,
            "total_size": self.total_size,
            "largest": max((f.size for f in self.files), default=0),
            "split_groups": list(self.plan.split_groups),
            "lossless": self.lossless,
            "kept": self.kept,
            "written": self.written,
            "removed": self.removed,
            "copied": self.copied,
            "skipped": self.skipped,
            "warnings": self.warnings,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- pieces


def output_names(base: str, n: int) -> list[str]:
    """``{base}.safetensors`` for one shard, else ``{base}-{i:05d}-of-{n:05d}.safetensors``."""
    if n == 1:
        return [f"{base}.safetensors"]
    return [shard_name(base, i + 1, n) for i in range(n)]


def check_base(base: str) -> str:
    """``base`` if it is a usable plain base name; else :class:`UsageError`."""
    bad = (
        not base
        or base in (".", "..")
        or base.startswith(".")
        or any(c in base for c in "/\\\x00")
        or base.endswith((".safetensors", ".json"))
    )
    if bad:
        raise UsageError(
            f"--name {base!r} is not a usable base name: give a plain name without a path, "
            "a leading dot or an extension, e.g. model or gptq_model-4bit-128g"
        )
    return base


def checkpoint_files(folder: Path) -> list[Path]:
    """Files in ``folder`` that belong to a checkpoint: weights, indexes, manifests."""
    if not folder.is_dir():
        return []
    suffixes = (".safetensors", INDEX_SUFFIX, MANIFEST_SUFFIX)
    return sorted(p for p in folder.iterdir() if p.name.endswith(suffixes) and not p.is_dir())


def _same_tensors(header_tensors: Any, ckpt: Checkpoint) -> str | None:
    """Why the recorded source does not describe ``ckpt``'s tensors, or None if it does."""
    recorded = {t.name: (t.dtype, t.shape, t.nbytes) for t in header_tensors}
    actual = {t.name: (t.dtype, t.shape, t.nbytes) for t in ckpt.tensors()}
    if recorded == actual:
        return None
    missing = sorted(set(recorded) - set(actual))
    extra = sorted(set(actual) - set(recorded))
    changed = sorted(n for n in set(recorded) & set(actual) if recorded[n] != actual[n])
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors gone (e.g. {missing[0]!r})")
    if extra:
        parts.append(f"{len(extra)} new tensors (e.g. {extra[0]!r})")
    if changed:
        parts.append(f"{len(changed)} changed in dtype or shape (e.g. {changed[0]!r})")
    return "; ".join(parts)


def source_record(ckpt: Checkpoint) -> tuple[SourceRecord | None, list[str]]:
    """The original single file to record in the manifest, and warnings.

    A single file is its own source. A safeshard output whose manifest matches its
    shards carries that manifest's source forward (split, reshard, merge gives the
    original back). Foreign shards have none: their merge is canonical.
    """
    folder, base = ckpt.folder, ckpt.located.base
    try:
        man = read_manifest(folder, base)
    except IndexFormatError as e:
        man = None
        warning: list[str] = [f"ignoring an unreadable manifest: {e}"]
    else:
        warning = []
    if man is not None:
        recorded = {s.file: s.size for s in man.shards}
        actual = {Path(h.path).name: h.file_size for h in ckpt.headers}
        why: str | None
        if recorded != actual:
            why = "its shard names or sizes differ from the files present"
        elif man.source is None:
            why = None
        else:
            try:
                why = _same_tensors(man.source.parse().tensors, ckpt)
            except HeaderError as e:
                why = f"its source header is invalid ({e})"
        if why is None:
            if man.source is not None:
                return man.source, warning
        else:
            warning.append(
                f"{manifest_path(folder, base)} does not describe these shards ({why}); "
                "it is not carried forward"
            )
    if len(ckpt.headers) == 1:
        h = ckpt.headers[0]
        return SourceRecord(Path(h.path).name, h.file_size, h.raw.decode("utf-8")), warning
    return None, warning


def _crash_point(tag: str) -> None:
    if os.environ.get(CRASH_ENV) == tag:
        os.kill(os.getpid(), signal.SIGKILL)


def write_shard(
    target: Path,
    header: bytes,
    pieces: Sequence[Piece],
    *,
    progress: Progress | None = None,
) -> Hashes:
    """Write one safetensors file atomically: ``header`` then the pieces, with hashes."""
    with AtomicWriter(target) as w:
        hashes = copy_pieces(w.fd, header, pieces, progress=progress)
    return hashes


def _pieces(shard: ShardPlan, ckpt: Checkpoint, fds: Sequence[int]) -> list[Piece]:
    out = []
    for t in shard.tensors:
        e = ckpt.entries[t.name]
        out.append(Piece(t.name, fds[e.shard], ckpt.absolute_offset(t.name), t.nbytes))
    return out


def fingerprint(ckpt: Checkpoint, plan: Plan, names: Sequence[str]) -> str:
    """Identity of a split: the planned headers and names, and the source files' identity."""
    h = hashlib.sha256()
    sources = []
    for hd in ckpt.headers:
        st = os.stat(hd.path)
        sources.append(
            [
                os.path.realpath(hd.path),
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(hd.raw).hexdigest(),
            ]
        )
    shards = [
        [n, hashlib.sha256(s.header).hexdigest()] for n, s in zip(names, plan.shards, strict=True)
    ]
    h.update(json.dumps({"sources": sources, "shards": shards}).encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------- journal


@dataclass(frozen=True)
class WrittenShard:
    """A finished shard: its size, SHA-256, and each tensor's digest by name."""

    size: int
    sha256: str
    tensors: dict[str, str]


def _read_journal(out: Path) -> tuple[str | None, dict[str, WrittenShard]]:
    try:
        obj = json.loads((out / JOURNAL_NAME).read_bytes())
        if obj.get("format") != JOURNAL_FORMAT:
            return None, {}
        done = {
            str(f): WrittenShard(int(r["size"]), str(r["sha256"]), dict(r["tensors"]))
            for f, r in obj["shards"].items()
        }
        return str(obj["fingerprint"]), done
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, {}


def _write_journal(out: Path, fp: str, done: Mapping[str, WrittenShard]) -> None:
    obj = {
        "format": JOURNAL_FORMAT,
        "version": 1,
        "fingerprint": fp,
        "shards": {
            f: {"size": d.size, "sha256": d.sha256, "tensors": d.tensors}
            for f, d in sorted(done.items())
        },
    }
    write_atomic(out / JOURNAL_NAME, json.dumps(obj).encode("utf-8"))


def _vouched(
    out: Path, fp: str, plan: Plan, names: Sequence[str], base: str
) -> tuple[dict[str, WrittenShard], str | None]:
    """Finished shards that the journal, or a finished split's manifest, vouches for."""
    jfp, done = _read_journal(out)
    if jfp == fp:
        return done, None
    try:
        man = read_manifest(out, base)
    except IndexFormatError:
        man = None
    if man is not None and man.fingerprint == fp:
        by_file = {s.file: s for s in man.shards}
        vouched: dict[str, WrittenShard] = {}
        for name, shard in zip(names, plan.shards, strict=True):
            rec = by_file.get(name)
            tensors = {t.name: man.tensors.get(t.name) for t in shard.tensors}
            if rec is None or any(r is None for r in tensors.values()):
                continue
            vouched[name] = WrittenShard(
                rec.size, rec.sha256, {n: r.digest for n, r in tensors.items() if r is not None}
            )
        return vouched, None
    if jfp is None and man is None:
        return {}, "no journal of an earlier run was found: every shard is written"
    return {}, (
        "the earlier run planned other shards or read a source that has changed since: "
        "every shard is written"
    )


def _keep(
    out: Path,
    names: Sequence[str],
    plan: Plan,
    vouched: Mapping[str, WrittenShard],
    progress: Progress | None,
) -> dict[str, WrittenShard]:
    """Shards on disk whose size and SHA-256 match the plan and the journal."""
    kept: dict[str, WrittenShard] = {}
    for name, shard in zip(names, plan.shards, strict=True):
        d = vouched.get(name)
        path = out / name
        if d is None or not path.is_file() or path.is_symlink():
            continue
        if d.size != shard.file_size or path.stat().st_size != d.size:
            continue
        if set(d.tensors) != {t.name for t in shard.tensors}:
            continue
        if hash_file(path, progress=progress) == d.sha256:
            kept[name] = d
    return kept


# --------------------------------------------------------------------------- output folder


def _prepare_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputExistsError(
            f"{out}: exists and is not a folder; choose a folder for OUT_DIR"
        ) from None
    except NotADirectoryError:
        raise OutputExistsError(
            f"{out}: cannot create the output folder because a part of its path is a file"
        ) from None
    except OSError as e:
        raise unwritable(out, e) from None


def _check_not_source(out: Path, ckpt: Checkpoint) -> None:
    if out.is_dir() and os.path.samefile(out, ckpt.folder):
        raise OutputExistsError(
            f"{out}: OUT_DIR is the source's own folder; write the shards to another folder "
            "(the source is never modified)"
        )


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# --------------------------------------------------------------------------- split


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
) -> SplitResult:
    """Split (or reshard) the checkpoint at ``src`` into ``out_dir``; see the module docs.

    ``progress`` is called with a number of bytes each time that many are written
    or, for shards kept by ``resume``, re-hashed; the total is the sum of the
    planned file sizes (``SplitResult.files`` of a dry run).
    """
    cap = parse_size(max_shard_size)
    base = check_base(name)
    if resume and force:
        raise UsageError("--resume keeps finished shards and --force replaces them: pick one")
    ckpt = open_checkpoint(src)
    metadata, warnings = common_metadata(ckpt)
    specs = [TensorSpec(t.name, t.dtype, t.shape, t.nbytes) for t in ckpt.tensors()]
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
    out = Path(out_dir)
    result = SplitResult(
        source=str(src),
        out_dir=out,
        files=[_file(n, s, None, "planned") for n, s in zip(names, plan.shards, strict=True)],
        index=None if len(names) == 1 else out / f"{base}{INDEX_SUFFIX}",
        manifest=manifest_path(out, base),
        plan=plan,
        base=base,
        dry_run=dry_run,
        lossless=record is not None,
        warnings=warnings,
        notes=notes,
    )
    if dry_run:
        return result
    _check_not_source(out, ckpt)
    _prepare_out_dir(out)
    try:
        lock = DirLock(out)
        lock.__enter__()
    except OSError as e:
        if isinstance(e, SafeshardError):
            raise
        raise unwritable(out, e) from None
    try:
        _write_all(result, ckpt, names, record, src, resume=resume, force=force, progress=progress)
    finally:
        lock.__exit__(None, None, None)
    return result


def _file(name: str, shard: ShardPlan, sha: str | None, status: Status) -> ShardFile:
    return ShardFile(
        file=name,
        size=shard.file_size,
        sha256=sha,
        tensors=len(shard.tensors),
        blocks=describe_blocks(shard.groups),
        oversize=shard.oversize,
        status=status,
    )


def _write_all(
    result: SplitResult,
    ckpt: Checkpoint,
    names: list[str],
    record: SourceRecord | None,
    src: str | os.PathLike[str],
    *,
    resume: bool,
    force: bool,
    progress: Progress | None,
) -> None:
    out, plan, base = result.out_dir, result.plan, result.base
    _remove(stale_temporaries(out))
    existing = checkpoint_files(out)
    if existing and not (resume or force):
        listed = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise OutputExistsError(
            f"{out}: already holds a checkpoint ({listed}); pass --force to replace it or "
            "--resume to finish an interrupted split"
        )
    fp = fingerprint(ckpt, plan, names)
    kept: dict[str, WrittenShard] = {}
    if resume:
        vouched, why = _vouched(out, fp, plan, names, base)
        if why and existing:
            result.notes.append(f"resume: {why}")
        kept = _keep(out, names, plan, vouched, progress)
    # An index must never point at shards being rewritten: indexes go first, then
    # manifests, then every other checkpoint file not kept.
    doomed = sorted(
        (p for p in existing if p.name not in kept),
        key=lambda p: (
            not p.name.endswith(INDEX_SUFFIX),
            not p.name.endswith(MANIFEST_SUFFIX),
            p.name,
        ),
    )
    _remove(doomed)
    if doomed:
        fsync_dir(out)
    outputs = {*names, f"{base}{INDEX_SUFFIX}", manifest_path(out, base).name}
    result.removed = [p.name for p in doomed if p.name not in outputs]
    _write_journal(out, fp, kept)
    todo = [(n, s) for n, s in zip(names, plan.shards, strict=True) if n not in kept]
    require_space(out, sum(s.file_size for _, s in todo), "the shards")
    done = dict(kept)
    fds = [os.open(h.path, os.O_RDONLY) for h in ckpt.headers]
    try:
        for i, (fname, shard) in enumerate(zip(names, plan.shards, strict=True)):
            if fname in kept:
                continue
            hashes = write_shard(
                out / fname, shard.header, _pieces(shard, ckpt, fds), progress=_hook(i, progress)
            )
            done[fname] = WrittenShard(shard.file_size, hashes.file_sha256, hashes.tensors)
            _write_journal(out, fp, done)
            result.written.append(fname)
            _crash_point(f"shard-done:{i}")
    finally:
        for fd in fds:
            os.close(fd)
    result.kept = [n for n in names if n in kept]
    result.files = [
        _file(n, s, done[n].sha256, "kept" if n in kept else "written")
        for n, s in zip(names, plan.shards, strict=True)
    ]
    src_path = Path(src)
    side = copy_sidecars(
        ckpt.folder, out, base=base, only_known=src_path.name.endswith(".safetensors")
    )
    result.copied, result.skipped = side.copied, side.skipped
    result.notes += side.notes
    _crash_point("before-manifest")
    index_meta: dict[str, Any] = {}
    if ckpt.index is not None:
        index_meta.update({k: v for k, v in ckpt.index.metadata.items() if k != "total_size"})
    write_manifest_and_index(
        out,
        base,
        names,
        plan.shards,
        done,
        cap=plan.cap,
        source=record,
        fingerprint=fp,
        index_metadata=index_meta,
    )
    _remove([out / JOURNAL_NAME])
    fsync_dir(out)


def write_manifest_and_index(
    out: Path,
    base: str,
    names: Sequence[str],
    shards: Sequence[ShardPlan],
    written: Mapping[str, WrittenShard],
    *,
    cap: int | None,
    source: SourceRecord | None,
    fingerprint: str | None,
    index_metadata: Mapping[str, Any] | None = None,
) -> None:
    """The last steps of a split, each atomic: the manifest, then the index (several files).

    ``names[i]`` is the file of ``shards[i]``; ``written`` holds every file's hashes.
    The index comes last, so a folder with an index is complete.
    """
    manifest = Manifest(
        base=base,
        cap=cap,
        shards=[ShardRecord(n, written[n].size, written[n].sha256) for n in names],
        tensors={
            t.name: TensorRecord(written[n].tensors[t.name], t.nbytes)
            for n, s in zip(names, shards, strict=True)
            for t in s.tensors
        },
        source=source,
        fingerprint=fingerprint,
    )
    write_atomic(manifest_path(out, base), manifest.to_json())
    _crash_point("before-index")
    if len(names) > 1:
        meta = dict(index_metadata or {})
        meta["total_size"] = sum(t.nbytes for s in shards for t in s.tensors)
        weight_map = {t.name: n for n, s in zip(names, shards, strict=True) for t in s.tensors}
        write_atomic(out / f"{base}{INDEX_SUFFIX}", index_json(weight_map, meta))


def _hook(i: int, progress: Progress | None) -> Progress | None:
    """Pass progress on; the crash hook ``mid-shard:i`` fires after the first bytes."""
    if os.environ.get(CRASH_ENV) != f"mid-shard:{i}":
        return progress

    def report(n: int) -> None:
        if progress is not None:
            progress(n)
        _crash_point(f"mid-shard:{i}")

    return report


def describe(result: SplitResult) -> str:
    """One line: how many files, the largest, and the cap."""
    largest = max((f.size for f in result.files), default=0)
    return (
        f"{len(result.files)} file{'s' if len(result.files) != 1 else ''}, largest "
        f"{largest} bytes ({format_size(largest)}), cap {result.plan.cap} bytes "
        f"({format_size(result.plan.cap)})"
    )
