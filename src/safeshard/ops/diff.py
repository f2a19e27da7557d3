"""What differs between two checkpoints: tensors added, removed and changed, and shards.

:func:`diff` compares tensors by name. A tensor *changed* when its dtype, its shape
or its bytes differ; bytes are compared by digest (XXH3-128, :data:`TENSOR_DIGEST`),
hashing each side's tensors in one pass per file, files in parallel
(:mod:`safeshard.io.scan`). With ``trust_manifests``, the digests a safeshard manifest
records (XXH3-128 per tensor, SHA-256 per file) are used instead of reading (fast,
but blind to a file corrupted after the split: that is ``safeshard verify``'s job).

For sharded inputs, it also says which shard files differ, by name and SHA-256 (the
Hugging Face Hub's LFS id). The two inputs are *identical* when they hold the same
tensors (names, dtypes, shapes, bytes) with the same ``__metadata__``, however they
are sharded.

Every error is a :class:`~safeshard.errors.SafeshardError`: what
:func:`~safeshard.checkpoint.open_checkpoint` raises for a missing or broken input, and
:class:`~safeshard.errors.ReadError` when a file cannot be read to its end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from safeshard import gcpause
from safeshard.checkpoint import Checkpoint, open_checkpoint, read_manifest
from safeshard.errors import IndexFormatError, ReadError, UsageError
from safeshard.format.manifest import TENSOR_DIGEST, Manifest
from safeshard.io.scan import FileResult, FileTask, Range, scan
from safeshard.io.store import translate_errors
from safeshard.redact import redact_url

ProgressFactory = Callable[[int], AbstractContextManager[Callable[[int], None]]]

ChangeKind = Literal["dtype", "shape", "bytes"]
ShardStatus = Literal["same", "changed", "only-a", "only-b"]


@dataclass(frozen=True)
class TensorChange:
    """A tensor in both inputs that differs; ``a``/``b`` are the dtypes, shapes or digests.

    ``digest`` names the digest ``a`` and ``b`` are for a ``bytes`` change
    (:data:`TENSOR_DIGEST`, XXH3-128), and is None otherwise.
    """

    name: str
    kind: ChangeKind
    a: str
    b: str

    @property
    def digest(self) -> str | None:
        return TENSOR_DIGEST if self.kind == "bytes" else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "a": self.a,
            "b": self.b,
            "digest": self.digest,
        }


@dataclass(frozen=True)
class ShardChange:
    """One shard file name and how it compares: ``same``, ``changed``, ``only-a``, ``only-b``."""

    file: str
    status: ShardStatus
    a_sha256: str | None
    b_sha256: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "status": self.status,
            "a_sha256": self.a_sha256,
            "b_sha256": self.b_sha256,
        }


@dataclass
class DiffReport:
    """What :func:`diff` found. ``identical`` when no tensor or metadata differs."""

    a: str
    b: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[TensorChange] = field(default_factory=list)
    unchanged: int = 0
    metadata_a: dict[str, str] | None = None
    metadata_b: dict[str, str] | None = None
    shards: list[ShardChange] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def metadata_changed(self) -> bool:
        return self.metadata_a != self.metadata_b

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed or self.metadata_changed)

    @property
    def shards_differ(self) -> list[ShardChange]:
        return [s for s in self.shards if s.status != "same"]

    def to_json(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "a": self.a,
            "b": self.b,
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": [c.to_json() for c in self.changed],
            "unchanged": self.unchanged,
            "metadata": None
            if not self.metadata_changed
            else {"a": self.metadata_a, "b": self.metadata_b},
            "shards": [s.to_json() for s in self.shards],
            "bytes_read": self.bytes_read,
        }


@dataclass
class _Side:
    ckpt: Checkpoint
    manifest: Manifest | None
    sharded: bool
    hashes: dict[str, str] = field(default_factory=dict)  # tensor -> digest
    files: dict[str, str | None] = field(default_factory=dict)  # file name -> sha256

    def file_name(self, tensor: str) -> str:
        return self.ckpt.path_of(tensor).name


def _side(path: str | os.PathLike[str], trust: bool, options: Mapping[str, Any] | None) -> _Side:
    ckpt = open_checkpoint(path, storage_options=options)
    man: Manifest | None = None
    if trust:
        try:
            man = read_manifest(ckpt.folder, ckpt.located.base)
        except (IndexFormatError, OSError):
            man = None  # an unusable manifest is not trusted: the bytes are read instead
    return _Side(ckpt, man, ckpt.index is not None)


def _plan(side: _Side, want: list[str], trust: bool) -> list[FileTask]:
    """Tasks that hash ``want`` (tensors) and, if sharded, whole files, minus trusted ones."""
    ck = side.ckpt
    man = side.manifest
    recorded = {s.file: s for s in man.shards} if man is not None else {}
    need: dict[str, list[Range]] = {}
    for t in want:
        rec = man.tensors.get(t) if man is not None else None
        if trust and rec is not None:
            side.hashes[t] = rec.digest
            continue
        info = ck.entries[t].info
        need.setdefault(side.file_name(t), []).append(
            Range(t, ck.absolute_offset(t), info.nbytes, digest=True)
        )
    tasks = []
    for i, h in enumerate(ck.headers):
        name = Path(h.path).name
        whole = False
        if side.sharded:
            srec = recorded.get(name)
            if trust and srec is not None and srec.size == h.file_size:
                side.files[name] = srec.sha256
            else:
                whole = True
                side.files[name] = None
        if whole or name in need:
            tasks.append(
                FileTask(
                    side.ckpt.located.files[i],
                    tuple(need.get(name, ())),
                    whole=whole,
                    size=h.file_size,
                )
            )
    return tasks


def _apply(side: _Side, tasks: list[FileTask], results: list[FileResult]) -> None:
    for task, res in zip(tasks, results, strict=True):
        if res.error is not None:
            raise ReadError(
                f"{task.path}: cannot read it to compare: {res.error}", filename=task.path
            )
        side.hashes.update(res.hashes)
        if task.whole:
            side.files[PurePosixPath(str(task.path)).name] = res.sha256


@gcpause.pausing
@translate_errors
def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    trust_manifests: bool = False,
    workers: int | None = None,
    progress: ProgressFactory | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DiffReport:
    """Compare the checkpoints at ``a`` and ``b`` (files, folders or indexes; local paths
    or URLs, reached with ``storage_options``).

    Raises what :func:`~safeshard.checkpoint.open_checkpoint` raises when an input is
    missing or broken (run ``safeshard verify`` on it), :class:`ReadError` when a file
    cannot be read to its end, and :class:`UsageError` for ``workers`` < 1.
    """
    if workers is not None and workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers}")
    sa = _side(a, trust_manifests, storage_options)
    sb = _side(b, trust_manifests, storage_options)
    ea, eb = sa.ckpt.entries, sb.ckpt.entries
    report = DiffReport(a=redact_url(a), b=redact_url(b))
    report.removed = sorted(n for n in ea if n not in eb)
    report.added = sorted(n for n in eb if n not in ea)
    report.metadata_a, report.metadata_b = sa.ckpt.metadata, sb.ckpt.metadata
    same_layout: list[str] = []
    for name in sorted(n for n in ea if n in eb):
        ia, ib = ea[name].info, eb[name].info
        if ia.dtype != ib.dtype:
            report.changed.append(TensorChange(name, "dtype", ia.dtype, ib.dtype))
        elif ia.shape != ib.shape:
            report.changed.append(
                TensorChange(name, "shape", str(list(ia.shape)), str(list(ib.shape)))
            )
        else:
            same_layout.append(name)
    ta = _plan(sa, same_layout, trust_manifests)
    tb = _plan(sb, same_layout, trust_manifests)
    tasks = ta + tb
    total = sum(t.planned_bytes for t in tasks)
    ctx: AbstractContextManager[Callable[[int], None] | None] = (
        progress(total) if progress is not None and tasks else nullcontext(None)
    )
    with ctx as advance:
        results = scan(tasks, workers=workers, progress=advance)
    report.bytes_read = sum(r.bytes_read for r in results)
    _apply(sa, ta, results[: len(ta)])
    _apply(sb, tb, results[len(ta) :])
    for name in same_layout:
        ha, hb = sa.hashes[name], sb.hashes[name]
        if ha != hb:
            report.changed.append(TensorChange(name, "bytes", ha, hb))
        else:
            report.unchanged += 1
    report.changed.sort(key=lambda c: c.name)
    if sa.sharded or sb.sharded:
        report.shards = _shards(sa, sb)
    return report


def _shards(sa: _Side, sb: _Side) -> list[ShardChange]:
    def files(side: _Side) -> dict[str, str | None]:
        if side.sharded:
            return side.files
        return {Path(h.path).name: None for h in side.ckpt.headers}

    fa, fb = files(sa), files(sb)
    out: list[ShardChange] = []
    for name in sorted(set(fa) | set(fb)):
        if name in fa and name in fb:
            status: ShardStatus = (
                "same" if fa[name] is not None and fa[name] == fb[name] else "changed"
            )
            out.append(ShardChange(name, status, fa[name], fb[name]))
        elif name in fa:
            out.append(ShardChange(name, "only-a", fa[name], None))
        else:
            out.append(ShardChange(name, "only-b", None, fb[name]))
    return out
