"""Merge shards back into one ``.safetensors`` file, losslessly where possible.

``merge(SRC, OUT_FILE)`` first validates the index against the shards
(:func:`source.open_checkpoint`: every listed tensor in its shard, no extras, no
duplicates). It then streams tensor bytes by byte ranges into a temporary file
beside OUT_FILE, fsyncs it and renames it, through the same output transaction as
split (:class:`safeshard.io.transaction.OutputFolder` on OUT_FILE's folder: lock, temporary name,
fsync, rename); an existing OUT_FILE is refused unless ``force``.

- **Lossless.** When the shards' manifest (``{BASE}.safeshard.json``) records the
  original file's header and that header describes exactly the shards' tensors
  (names, dtypes, shapes, sizes) and ``__metadata__``, the output gets those header
  bytes and the source's data order: it is the original file, byte for byte, with
  the same SHA-256.
- **Canonical.** Otherwise (shards from another tool, or a manifest that no longer
  matches), the output has a compact header and model order, and the result says
  so and why.

Each tensor's digest is computed while copying and checked against the manifest,
so a corrupted shard fails the merge instead of producing a corrupted file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeshard import gcpause
from safeshard.checkpoint import Checkpoint, common_metadata, open_checkpoint, read_manifest
from safeshard.errors import (
    HeaderError,
    IndexFormatError,
    OutputExistsError,
    OutputFolderMissingError,
    ShardMismatchError,
)
from safeshard.format.blocks import model_order
from safeshard.format.filenames import TP_RECORD_NAME
from safeshard.format.header import Header, TensorSpec, build_header
from safeshard.format.manifest import Manifest, manifest_path
from safeshard.io.bytesrc import Extent, Sink
from safeshard.io.copier import Hashes, Progress, Sha256Follower, Sha256Pool, copy_pieces
from safeshard.io.localfs import require_space
from safeshard.io.store import (
    as_path,
    local_path,
    output_folder,
    same_file,
    translate_errors,
    url_of,
)
from safeshard.io.storerr import storage_op
from safeshard.io.transaction import StepHook
from safeshard.ops.tpmerge import merged_extents, rank_sources, read_tp
from safeshard.ops.writer import open_sources, tensor_extents
from safeshard.redact import redact_url

__all__ = ["MergeResult", "manifest_of", "merge", "merge_layout"]


@dataclass
class MergeResult:
    """What ``merge`` wrote."""

    source: str
    out_file: Path
    size: int
    sha256: str | None
    """The output's SHA-256 when asked for (``sha256=True``), else None."""
    tensors: int
    lossless: bool
    reason: str
    """Why the output is canonical (empty when lossless)."""
    verified: int = 0
    """Tensors whose digest matched the manifest."""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "out_file": redact_url(self.out_file),
            "size": self.size,
            "sha256": self.sha256,
            "tensors": self.tensors,
            "lossless": self.lossless,
            "reason": self.reason,
            "verified_tensors": self.verified,
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class Layout:
    """The merged file: header bytes and tensor names in data order."""

    header: bytes
    order: list[str]
    lossless: bool
    reason: str

    @property
    def header_len(self) -> int:
        return len(self.header)


def manifest_of(ckpt: Checkpoint, warnings: list[str]) -> Manifest | None:
    """The checkpoint's safeshard manifest, or None (an unreadable one noted in ``warnings``)."""
    try:
        return read_manifest(ckpt.folder, ckpt.located.base)
    except IndexFormatError as e:
        warnings.append(f"ignoring an unreadable manifest: {e}")
        return None


def merge_layout(ckpt: Checkpoint, manifest: Manifest | None) -> Layout:
    """The header and data order of the merged file (lossless when the manifest allows)."""
    metadata, _ = common_metadata(ckpt)
    why, src = _lossless_problem(ckpt, manifest, metadata)
    if src is not None and manifest is not None and manifest.source is not None:
        raw = manifest.source.header_bytes
        return Layout(
            header=struct.pack("<Q", len(raw)) + raw,
            order=[t.name for t in src.tensors],
            lossless=True,
            reason="",
        )
    order = model_order(list(ckpt.entries))
    specs = [TensorSpec.of(ckpt.entries[n].info) for n in order]
    return Layout(
        header=build_header(specs, metadata),
        order=order,
        lossless=False,
        reason=f"{why}: wrote a canonical file (compact header, model order)",
    )


def _lossless_problem(
    ckpt: Checkpoint, manifest: Manifest | None, metadata: dict[str, str] | None
) -> tuple[str, None] | tuple[None, Header]:
    """Why the merge cannot restore the original file, or the original's header."""
    where = manifest_path(ckpt.folder, ckpt.located.base)
    if manifest is None:
        return f"no safeshard manifest ({where.name}) beside the shards", None
    if manifest.source is None:
        why = f"{where.name} records no original file (the split's input was already sharded)"
        return why, None
    try:
        src = manifest.source.parse()
    except HeaderError as err:
        return f"{where.name} records an invalid original header ({err})", None
    entries = ckpt.entries
    differ = len(src.tensors) != len(entries)
    if not differ:
        for t in src.tensors:
            entry = entries.get(t.name)
            if entry is None or (entry.info.dtype, entry.info.shape, entry.info.nbytes) != (
                t.dtype,
                t.shape,
                t.nbytes,
            ):
                differ = True
                break
    if differ:
        recorded = {t.name: (t.dtype, t.shape, t.nbytes) for t in src.tensors}
        actual = {n: (e.info.dtype, e.info.shape, e.info.nbytes) for n, e in entries.items()}
        diff = sorted(set(recorded) ^ set(actual)) or sorted(
            n for n in recorded if recorded[n] != actual[n]
        )
        why = (
            f"the shards' tensors differ from the original recorded in {where.name} "
            f"(e.g. {diff[0]!r})"
        )
        return why, None
    if (src.metadata or None) != (metadata or None):
        why = f"the shards' __metadata__ differs from the original recorded in {where.name}"
        return why, None
    return None, src


@gcpause.pausing
@translate_errors
def merge(
    src: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Progress | None = None,
    on_step: StepHook | None = None,
    sha256: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    break_lock: bool = False,
) -> MergeResult:
    """Merge the checkpoint at ``src`` (a folder, an index or a file) into ``out_file``.

    ``progress`` is called with a number of bytes each time that many are written;
    the total is the output's size (``MergeResult.size``). ``on_step`` is called with
    each step of the output transaction (:data:`safeshard.io.journal.STEPS`). ``sha256``
    also computes the output's SHA-256, in a thread of its own that follows the copy. ``src`` and
    ``out_file`` may be URLs (:mod:`safeshard.io.store`), reached with ``storage_options``.
    """
    tp = read_tp(src, storage_options)
    out = as_path(out_file, storage_options)
    warnings: list[str] = []
    job: _Job
    if tp is not None:
        with storage_op(url_of(out), "look up the output"):
            _check_output(out, tp.paths, force)
        framed, header = tp.record.merged(tp.where)
        tp_order = [t.name for t in header.tensors]
        layout = Layout(framed, tp_order, tp.record.lossless, tp.record.reason)
        job = _Job(
            layout=layout,
            size=header.file_size,
            tensors=len(tp.record.tensors),
            recorded=tp.record.digests,
            record_name=TP_RECORD_NAME,
            sources=lambda: rank_sources(tp),
            pieces=lambda sources: merged_extents(tp, tp_order, sources),
            path_of=lambda name: str(tp.folder / tp.record.ranks[0]),
        )
    else:
        ckpt = open_checkpoint(src, storage_options=storage_options)
        with storage_op(url_of(out), "look up the output"):
            _check_output(out, list(ckpt.located.paths), force)
        manifest = manifest_of(ckpt, warnings)
        layout = merge_layout(ckpt, manifest)
        job = _Job(
            layout=layout,
            size=layout.header_len + ckpt.total_tensor_bytes,
            tensors=len(ckpt.entries),
            recorded={n: r.digest for n, r in manifest.tensors.items()}
            if manifest is not None
            else None,
            record_name=manifest_path(ckpt.folder, ckpt.located.base).name,
            sources=lambda: open_sources(ckpt),
            pieces=lambda sources: iter([tensor_extents(ckpt, layout.order, sources)]),
            path_of=lambda name: str(ckpt.path_of(name)),
        )
    return _write(job, src, out, warnings, progress, on_step, sha256, storage_options, break_lock)


@dataclass
class _Job:
    """What one merge writes: the layout, and where its pieces come from."""

    layout: Layout
    size: int
    tensors: int
    recorded: Mapping[str, str] | None
    """Digests to check each tensor against (None: no record at all)."""
    record_name: str
    sources: Callable[[], AbstractContextManager[Any]]
    pieces: Callable[[Any], Iterator[list[Extent]]]
    """Given the open sources, the pieces in batches of whole tensors."""
    path_of: Callable[[str], str]


def _write(
    job: _Job,
    src: str | os.PathLike[str],
    out: Path,
    warnings: list[str],
    progress: Progress | None,
    on_step: StepHook | None,
    sha256: bool,
    storage_options: Mapping[str, Any] | None,
    break_lock: bool,
) -> MergeResult:
    layout, size = job.layout, job.size
    local = local_path(out)  # None: an object in storage
    if local is not None:
        require_space(local.parent, size, f"{out.name}: the merged file would")
    recorded = job.recorded or {}

    follower: list[Sha256Follower] = []
    inline = hashlib.sha256() if sha256 and local is None else None  # no descriptor to follow

    def fill(sink: Sink, sources: Any) -> Hashes:
        fd = sink.fileno()
        if sha256 and fd is not None:
            follower.append(Sha256Follower(fd, size, Sha256Pool(1), name=str(out)))
        head = layout.header
        hashes: Hashes | None = None
        for batch in job.pieces(sources):  # whole tensors per batch: bounded memory
            got = copy_pieces(
                sink,
                head,
                batch,
                progress=progress,
                on_written=follower[0].advance if follower else None,
                sha256=inline,
            )
            if hashes is None:
                hashes = got
            else:
                hashes.tensors.update(got.tensors)
            head = b""
        if hashes is None:  # no tensors: the header alone
            hashes = copy_pieces(
                sink,
                head,
                [],
                progress=progress,
                on_written=follower[0].advance if follower else None,
                sha256=inline,
            )
        bad = [n for n, digest in hashes.tensors.items() if n in recorded and recorded[n] != digest]
        if bad:
            raise ShardMismatchError(
                f"{job.path_of(bad[0])}: tensor {bad[0]!r} does not match the digest "
                f"recorded in {job.record_name}"
                + (f" ({len(bad)} tensors differ)" if len(bad) > 1 else "")
                + "; the shard is corrupted or was changed, so nothing was written. "
                "Run `safeshard verify` to see every difference."
            )
        return hashes

    try:
        with (
            job.sources() as sources,
            output_folder(
                out.parent,
                on_step=on_step,
                storage_options=storage_options,
                break_lock=break_lock,
            ) as tx,
        ):
            warnings += tx.recovered
            hashes = tx.write(out.name, lambda sink: fill(sink, sources), size=size)
    except BaseException:
        for f in follower:
            f.cancel()
        raise
    verified = sum(1 for n in hashes.tensors if n in recorded)
    if job.recorded is not None and verified < job.tensors:
        warnings.append(
            f"{job.tensors - verified} tensors have no hash in {job.record_name} and were "
            "not checked"
        )
    return MergeResult(
        source=redact_url(src),
        out_file=out,
        size=size,
        sha256=follower[0].result() if follower else inline.hexdigest() if inline else None,
        tensors=len(layout.order),
        lossless=layout.lossless,
        reason=layout.reason,
        verified=verified,
        warnings=warnings,
    )


def _check_output(out: Path, sources: Sequence[Any], force: bool) -> None:
    if out.is_dir():
        raise OutputExistsError(f"{out}: is a folder; give the path of the file to write")
    # (object storage has no folders to create)
    if local_path(out) is not None and not out.parent.is_dir():
        raise OutputFolderMissingError(
            f"{out.parent}: the folder for {out.name} does not exist (or is a file); "
            "create it first",
            filename=str(out.parent),
            err=errno.ENOENT,
        )
    if out.exists():
        for p in sources:
            if same_file(out, p):
                raise OutputExistsError(
                    f"{out}: is one of the checkpoint's own files; write the merged file "
                    "elsewhere (the source is never modified)"
                )
        if not force:
            raise OutputExistsError(f"{out}: already exists; pass --force to replace it")
