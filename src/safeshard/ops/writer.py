"""What split and update write, and what they report: one family for both writers.

- names: :func:`check_base`, :func:`output_names`;
- one shard: :func:`write_shard` copies a header and source byte ranges into a file of an
  output transaction (:class:`safeshard.io.transaction.OutputFolder`), hashing on the way;
- the records that describe a finished checkpoint: :func:`describe_checkpoint` builds the
  manifest and index bytes, written last by the transaction's commit;
- provenance: :func:`source_record` (the original single file the manifest keeps, so merge
  restores it) and :func:`fingerprint` (what an interrupted run must match to be resumed);
- results: :class:`OutputFile` and :class:`OutputResult`, the base of
  :class:`~safeshard.ops.split.SplitResult` and :class:`~safeshard.ops.update.UpdateResult`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from safeshard.checkpoint import Checkpoint, read_manifest
from safeshard.errors import (
    HeaderError,
    IndexFormatError,
    OutputExistsError,
    SafeshardError,
    UsageError,
)
from safeshard.format.blocks import describe_blocks
from safeshard.format.filenames import INDEX_SUFFIX, shard_name
from safeshard.format.header import TensorSpec
from safeshard.format.index import index_json
from safeshard.format.manifest import (
    MANIFEST_SUFFIX,
    Manifest,
    ShardRecord,
    SourceRecord,
    TensorRecord,
    manifest_path,
)
from safeshard.io import store as storage
from safeshard.io.bytesrc import Extent, Sink, Sources
from safeshard.io.copier import (
    Hashes,
    Progress,
    Sha256Follower,
    Sha256Pool,
    copy_pieces,
    digest_file,
    hash_source,
)
from safeshard.io.transaction import FileRecord, OutputStore
from safeshard.ops.plan import Plan, ShardPlan
from safeshard.ops.sidecar import SidecarResult, copy_sidecars
from safeshard.redact import redact_url

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "DEFAULT_MAX_SHARD_SIZE",
    "FileStatus",
    "OutputFile",
    "OutputResult",
    "SplitResult",
    "check_base",
    "describe_checkpoint",
    "fingerprint",
    "finish_split",
    "intact",
    "open_sources",
    "output_names",
    "shard_file",
    "source_record",
    "tensor_extents",
    "with_sha256",
    "write_shard",
]

DEFAULT_MAX_SHARD_SIZE = "4GB"

CHECKPOINT_SUFFIXES = (".safetensors", INDEX_SUFFIX, MANIFEST_SUFFIX)
"""Files of a checkpoint in an output folder: weights, indexes, manifests."""

FileStatus = Literal["planned", "written", "kept", "renamed", "rewritten", "added"]
"""``planned`` (dry run); ``written`` (split); ``kept`` (not touched); ``renamed`` (same
bytes, new ``-of-N`` name); ``rewritten`` (new bytes for an old shard); ``added`` (new)."""


@dataclass(frozen=True)
class OutputFile:
    """One file of the output: name, exact size, SHA-256 (None for bytes not yet written),
    tensor count, the blocks it holds, what happened to it, and the old name it replaces."""

    file: str
    size: int
    sha256: str | None
    tensors: int
    blocks: str
    status: FileStatus
    oversize: bool = False
    previous: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "size": self.size,
            "sha256": self.sha256,
            "tensors": self.tensors,
            "blocks": self.blocks,
            "oversize": self.oversize,
            "status": self.status,
            "previous": self.previous,
        }


@dataclass
class OutputResult:
    """What a writer planned or did in ``out_dir``; see the subclasses."""

    source: str
    out_dir: Path
    base: str
    cap: int
    dry_run: bool
    files: list[OutputFile]
    index: Path | None
    manifest: Path | None
    lossless: bool
    """True when the manifest records the original file's header (merge restores it)."""
    data_size: int = 0
    """Sum of tensor data bytes (the index's ``total_size``)."""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def total_size(self) -> int:
        return self.data_size

    @property
    def single_file(self) -> bool:
        return len(self.files) == 1

    @property
    def largest(self) -> int:
        return max((f.size for f in self.files), default=0)

    def with_status(self, *status: FileStatus) -> list[str]:
        return [f.file for f in self.files if f.status in status]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "out_dir": redact_url(self.out_dir),
            "dry_run": self.dry_run,
            "base": self.base,
            "cap": self.cap,
            "single_file": self.single_file,
            "shards": [f.to_json() for f in self.files],
            "index": None if self.index is None else self.index.name,
            "manifest": None if self.manifest is None else self.manifest.name,
            "total_size": self.total_size,
            "largest": self.largest,
            "lossless": self.lossless,
            "removed": list(self.removed),
            "copied": list(self.copied),
            "skipped": list(self.skipped),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


@dataclass
class SplitResult(OutputResult):
    """What ``split`` planned or did; ``plan`` is the shard plan."""

    plan: Plan = field(default_factory=lambda: Plan((), 0, None))

    @property
    def kept(self) -> list[str]:
        """Shards of an interrupted run kept by ``resume``."""
        return self.with_status("kept")

    @property
    def written(self) -> list[str]:
        return self.with_status("written")

    def to_json(self) -> dict[str, Any]:
        obj = super().to_json()
        obj["split_groups"] = list(self.plan.split_groups)
        obj["kept"] = self.kept
        obj["written"] = self.written
        return obj


def shard_file(name: str, shard: ShardPlan, sha: str | None, status: FileStatus) -> OutputFile:
    """The :class:`OutputFile` of a planned shard."""
    return OutputFile(
        file=name,
        size=shard.file_size,
        sha256=sha,
        tensors=len(shard.tensors),
        blocks=describe_blocks(shard.groups),
        status=status,
        oversize=shard.oversize,
    )


# --------------------------------------------------------------------------- names


def check_base(base: str) -> str:
    """``base`` if it is a usable plain base name; else :class:`UsageError`.

    It must also be text (no lone surrogate, such as the ``\\udcff`` a byte that is not
    UTF-8 becomes in a command-line argument): the index, manifest and journal record
    file names as JSON text.
    """
    bad = (
        not base
        or base in (".", "..")
        or base.startswith(".")
        or any(c in base for c in "/\\\x00")
        or base.endswith((".safetensors", ".json"))
        or not _is_text(base)
    )
    if bad:
        raise UsageError(
            f"--name {base!r} is not a usable base name: give a plain name (UTF-8 text) "
            "without a path, a leading dot or an extension, e.g. model or gptq_model-4bit-128g"
        )
    return base


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def output_names(base: str, n: int) -> list[str]:
    """``{base}.safetensors`` for one shard, else ``{base}-{i:05d}-of-{n:05d}.safetensors``."""
    if n == 1:
        return [f"{base}.safetensors"]
    return [shard_name(base, i + 1, n) for i in range(n)]


# --------------------------------------------------------------------------- one shard


def open_sources(ckpt: Checkpoint) -> Sources:
    """The checkpoint's shards as byte sources (local files or objects in storage), each
    checked against its header's size."""
    files = {h.path: f for h, f in zip(ckpt.headers, ckpt.located.files, strict=True)}
    return Sources(
        {h.path: h.file_size for h in ckpt.headers},
        lambda path: ckpt.place.open(files.get(path, path)),
    )


def tensor_extents(ckpt: Checkpoint, names: Sequence[str], sources: Sources) -> list[Extent]:
    """Where each named tensor's bytes lie, in the given order."""
    opened: dict[int, tuple[Any, int]] = {}  # shard -> (source, data start)
    entries = ckpt.entries
    out = []
    for n in names:
        e = entries[n]
        src = opened.get(e.shard)
        if src is None:
            h = ckpt.headers[e.shard]
            src = opened[e.shard] = (sources.get(h.path), h.data_start)
        info = e.info
        out.append(Extent(src[0], src[1] + info.begin, info.end - info.begin, n))
    return out


@dataclass
class Written:
    """A shard just written: its journal record, and the SHA-256 still being computed."""

    record: FileRecord
    hashes: Hashes
    sha256: Sha256Follower | Computed | None = None


@dataclass(frozen=True)
class Computed:
    """A SHA-256 computed inline while the file was written (an object in storage, which
    a follower cannot read back), offered like a :class:`Sha256Follower`'s."""

    digest: str

    def result(self) -> str:
        return self.digest


def write_shard(
    tx: OutputStore,
    name: str,
    header: bytes,
    pieces: Sequence[Extent],
    *,
    progress: Progress | None = None,
    stage: bool = False,
    sha256: Sha256Pool | None = None,
) -> Written:
    """Write ``header`` then ``pieces`` as the file ``name`` of ``tx`` and journal it.

    Where ``tx`` can have the server copy the pieces' bytes (objects in the same store:
    :meth:`~safeshard.io.remote.RemoteFolder.server_copy`), it does. With ``stage`` the
    file waits under its temporary name for the commit. With a ``sha256`` pool, the file's
    SHA-256 is computed by a thread of its own that may finish later (:func:`with_sha256`
    waits for it).
    """
    size = len(header) + sum(p.nbytes for p in pieces)
    copied = tx.server_copy(
        name, header, pieces, stage=stage, sha256=sha256 is not None, progress=progress
    )
    if copied is not None:  # the server copied the bytes, and they were read back
        tmp, hashes, digest = copied
        rec = FileRecord(size, hashes.header, hashes.tensors, staged=tmp)
        tx.record(name, rec)
        return Written(rec, hashes, None if digest is None else Computed(digest))
    follower: Sha256Follower | None = None
    computed: Computed | None = None

    def fill(sink: Sink) -> Hashes:
        nonlocal follower, computed
        fd = sink.fileno()
        if sha256 is not None and fd is not None:
            follower = Sha256Follower(fd, size, sha256, name=str(tx.folder / name))
        # an object in storage cannot be read back by a follower: hash it as it is sent
        inline = hashlib.sha256() if sha256 is not None and fd is None else None
        got = copy_pieces(
            sink,
            header,
            pieces,
            progress=progress,
            on_written=follower.advance if follower is not None else None,
            sha256=inline,
        )
        if inline is not None:
            computed = Computed(inline.hexdigest())
        return got

    try:
        if stage:
            tmp, hashes = tx.stage(name, fill, size=size)
        else:
            tmp, hashes = None, tx.write(name, fill, size=size)
    except BaseException:
        if follower is not None:
            follower.cancel()
        raise
    rec = FileRecord(size, hashes.header, hashes.tensors, staged=tmp)
    tx.record(name, rec)
    return Written(rec, hashes, follower if follower is not None else computed)


def with_sha256(records: dict[str, FileRecord], written: Mapping[str, Written]) -> None:
    """Wait for the SHA-256 of each written file and put it in its record."""
    for name, w in written.items():
        if w.sha256 is not None:
            records[name] = replace(records[name], sha256=w.sha256.result())


def hash_kept(done: dict[str, FileRecord], kept: Iterable[str], folder: Any) -> None:
    """Fill in the SHA-256 of each kept shard whose record (of a run without ``sha256``)
    lacks it, reading the file or object in ``folder``."""
    for n in kept:
        if done[n].sha256 is None:
            with storage.open_source(folder / n) as kept_file:
                done[n] = replace(done[n], sha256=hash_source(kept_file))


def intact(path: Path, rec: FileRecord, *, progress: Progress | None = None) -> bool:
    """Whether the file at ``path`` still has the bytes ``rec`` describes: its size, then
    its header and tensor digests (or, for a record of an older safeshard with only a
    SHA-256, that)."""
    try:
        # its size, then its digests read back (ranged GETs for an object)
        if storage.regular_size(path) != rec.size:
            return False
        if rec.header is None:
            if rec.sha256 is None:
                return False
            with storage.open_source(path) as src:
                return hash_source(src, progress=progress) == rec.sha256
        with storage.open_source(path) as src:
            got = digest_file(src, progress=progress)
    except (SafeshardError, OSError):
        return False
    return got.header == rec.header and got.tensors == rec.tensors


# --------------------------------------------------------------------------- resume


def begin_split(
    tx: OutputStore,
    result: SplitResult,
    names: Sequence[str],
    fp: str,
    *,
    resume: bool,
    force: bool,
    progress: Progress | None,
) -> dict[str, FileRecord]:
    """Start a split's run in ``tx`` (split, and each rank folder of ``split --tp``):
    refuse a folder that holds a checkpoint unless asked, start the journal with the
    shards ``resume`` keeps, remove the other checkpoint files (``result.removed``: those
    the new checkpoint will not have), and return the kept shards' records."""
    existing = tx.checkpoint_files(CHECKPOINT_SUFFIXES)
    kept = _kept_on_resume(
        tx, result, names, fp, existing, resume=resume, force=force, progress=progress
    )
    tx.start("split", fp, keep=kept)
    removed = tx.remove(n for n in existing if n not in kept)
    finals = {*names, f"{result.base}{INDEX_SUFFIX}", f"{result.base}{MANIFEST_SUFFIX}"}
    result.removed = [n for n in removed if n not in finals]
    return kept


def _kept_on_resume(
    tx: OutputStore,
    result: SplitResult,
    names: Sequence[str],
    fp: str,
    existing: Sequence[str],
    *,
    resume: bool,
    force: bool,
    progress: Progress | None,
) -> dict[str, FileRecord]:
    """Refuse a folder that holds a checkpoint (``existing``) unless asked; the shards
    ``resume`` keeps (those an earlier run's journal or a finished run's manifest vouches
    for, re-hashed)."""
    if existing and not (resume or force):
        listed = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise OutputExistsError(
            f"{tx.folder}: already holds a checkpoint ({listed}); pass --force to replace it or "
            "--resume to finish an interrupted split"
        )
    if not resume:
        return {}
    vouched = tx.resumable("split", fp)
    if not vouched:
        vouched = _finished(tx.folder, result.base, fp, names, result.plan)
    if not vouched and existing:
        why = (
            "no journal of an earlier run was found"
            if tx.earlier_run is None and read_manifest_quiet(tx.folder, result.base) is None
            else "the earlier run planned other shards or read a source that has changed since"
        )
        result.notes.append(f"resume: {why}: every shard is written")
    return _check_kept(tx.folder, names, result.plan, vouched, progress)


def read_manifest_quiet(folder: Path, base: str) -> object | None:
    try:
        return read_manifest(folder, base, follow_symlinks=False)
    except (IndexFormatError, OSError):
        return None


def _finished(
    out: Path, base: str, fp: str, names: Sequence[str], plan: Plan
) -> dict[str, FileRecord]:
    """Shards a finished split with the same fingerprint vouches for through its manifest."""
    try:
        man = read_manifest(out, base, follow_symlinks=False)
    except (IndexFormatError, OSError):
        return {}
    if man is None or man.fingerprint != fp:
        return {}
    by_file = {s.file: s for s in man.shards}
    vouched: dict[str, FileRecord] = {}
    for name, shard in zip(names, plan.shards, strict=True):
        rec = by_file.get(name)
        tensors = {t.name: man.tensors.get(t.name) for t in shard.tensors}
        if rec is None or any(r is None for r in tensors.values()):
            continue
        vouched[name] = FileRecord(
            rec.size,
            rec.header,
            {n: r.digest for n, r in tensors.items() if r is not None},
            sha256=rec.sha256,
        )
    return vouched


def _check_kept(
    out: Path,
    names: Sequence[str],
    plan: Plan,
    vouched: Mapping[str, FileRecord],
    progress: Progress | None,
) -> dict[str, FileRecord]:
    """Vouched shards on disk whose bytes still match the plan and the record."""
    kept: dict[str, FileRecord] = {}
    for name, shard in zip(names, plan.shards, strict=True):
        d = vouched.get(name)
        if d is None or d.staged is not None or d.size != shard.file_size:
            continue
        if set(d.tensors) != {t.name for t in shard.tensors}:
            continue
        if intact(out / name, d, progress=progress):
            kept[name] = d
    return kept


# --------------------------------------------------------------------------- records


def describe_checkpoint(
    out: Path,
    base: str,
    names: Sequence[str],
    shards: Sequence[Sequence[TensorSpec]],
    records: Mapping[str, FileRecord],
    *,
    cap: int | None,
    source: SourceRecord | None,
    fingerprint: str | None,
    index_metadata: Mapping[str, Any] | None = None,
) -> dict[str, bytes | None]:
    """The manifest and index of a finished checkpoint, in the order they are written
    (index last; None: a single file has no index). ``records[name]`` is each file's;
    ``index_metadata`` (a source index's ``metadata``) is carried into the index, with
    its ``total_size`` made the new one's."""
    manifest = Manifest(
        base=base,
        cap=cap,
        shards=[
            ShardRecord(n, records[n].size, records[n].sha256, records[n].header) for n in names
        ],
        tensors={
            t.name: TensorRecord(records[n].tensors[t.name], t.nbytes)
            for n, tensors in zip(names, shards, strict=True)
            for t in tensors
        },
        source=source,
        fingerprint=fingerprint,
    )
    index: bytes | None = None
    if len(names) > 1:
        meta = {k: v for k, v in (index_metadata or {}).items() if k != "total_size"}
        meta["total_size"] = sum(t.nbytes for tensors in shards for t in tensors)
        weight_map = {t.name: n for n, tensors in zip(names, shards, strict=True) for t in tensors}
        index = index_json(weight_map, meta)
    return {
        manifest_path(out, base).name: manifest.to_json(),
        f"{base}{INDEX_SUFFIX}": index,
    }


def finish_split(
    tx: OutputStore,
    ckpt: Checkpoint,
    src: str | os.PathLike[str],
    out: Path,
    base: str,
    names: Sequence[str],
    plan: Plan,
    records: Mapping[str, FileRecord],
    *,
    source: SourceRecord | None,
    fingerprint: str | None,
) -> SidecarResult:
    """Finish a split whose shards ``names`` (of ``plan``) are written: copy ``ckpt``'s
    sidecar files (only the known ones when ``src`` named a single file), then commit the
    manifest and the index (:func:`describe_checkpoint`, the source index's metadata
    carried over). Returns what the sidecar copy did."""
    side = copy_sidecars(
        ckpt.folder,
        tx,
        base=base,
        only_known=Path(src).name.endswith(".safetensors"),
        open_file=ckpt.place.open,
    )
    tx.commit(
        finals=describe_checkpoint(
            out,
            base,
            names,
            [s.tensors for s in plan.shards],
            records,
            cap=plan.cap,
            source=source,
            fingerprint=fingerprint,
            index_metadata=None if ckpt.index is None else ckpt.index.metadata,
        )
    )
    return side


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
    warnings: list[str] = []
    try:
        man = read_manifest(folder, base, place=ckpt.place)
    except IndexFormatError as e:
        man = None
        warnings.append(f"ignoring an unreadable manifest: {e}")
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
                return man.source, warnings
        else:
            warnings.append(
                f"{manifest_path(folder, base)} does not describe these shards ({why}); "
                "it is not carried forward"
            )
    if len(ckpt.headers) == 1:
        h = ckpt.headers[0]
        return SourceRecord(Path(h.path).name, h.file_size, h.raw.decode("utf-8")), warnings
    return None, warnings


def fingerprint(
    ckpt: Checkpoint, headers: Sequence[bytes], names: Sequence[str], *extra: str
) -> str:
    """Identity of a write: the planned headers and names, the source files' identity
    (path, size, modification time, header), and ``extra`` (e.g. the old manifest)."""
    sources = [
        [*storage.identity(f, ckpt.place), hashlib.sha256(hd.raw).hexdigest()]
        for hd, f in zip(ckpt.headers, ckpt.located.files, strict=True)
    ]
    shards = [[n, hashlib.sha256(h).hexdigest()] for n, h in zip(names, headers, strict=True)]
    obj = {"sources": sources, "shards": shards, "extra": list(extra)}
    return hashlib.sha256(json.dumps(obj).encode("utf-8")).hexdigest()
