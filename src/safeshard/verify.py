"""Check a checkpoint and report every problem as a named finding; never stop at the first.

:func:`verify` raises only when its arguments are unusable (the path does not
exist or holds no checkpoint, a bad size); everything wrong *with* the checkpoint
is a :class:`Finding` with a stable ``code`` (see :data:`CODES`), the file, the
tensor, and a message that says what to do.

Checks, in order:

- **structure**: each shard passes the strict reader; the index parses and is
  path-safe; every index entry lies in the shard it names, no tensor lies in two
  shards, every shard tensor is indexed; no stray shard of the same base or
  leftover temporary; ``total_size`` and the ``-of-N`` names agree with the shards;
- **size** (with ``max_shard_size``): no file is over the cap;
- **manifest** (when ``{BASE}.safeshard.json`` exists): the files and tensors it
  lists are the checkpoint's, and each file's size and SHA-256 are as recorded. A
  file whose hash differs is re-read to name the tensors whose digest changed.
  With ``against``, a file whose every tensor is compared byte for byte with the
  source and whose header is the canonical one for those tensors (as split writes
  it) is fully determined by what was compared, so its SHA-256 is not recomputed
  unless ``hash_files`` asks for it: that hash costs more CPU than reading the file;
- **gptq** (quantized checkpoints): every module has qweight/qzeros/scales/g_idx
  with the shapes and dtypes that bits and group size imply (:mod:`safeshard.quant`);
  with ``deep``, every g_idx value indexes an existing group;
- **against** (with ``against``): the same tensor names, dtypes, shapes, bytes and
  ``__metadata__`` as the source. Bytes are compared directly, tensor by tensor,
  reading each byte of each side once.

All tensor bytes are read in one pass per file, files in parallel
(:mod:`safeshard.scan`); nothing is read when no check needs data.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import quant
from .errors import (
    CheckpointNotFoundError,
    HeaderError,
    IndexFormatError,
    SafeshardError,
    UnsafeIndexPathError,
    UsageError,
)
from .fsio import stale_temporaries
from .header import Header, TensorInfo, build_header, read_header
from .index import INDEX_SUFFIX, SHARD_RE, ShardIndex, check_shard_name, read_index
from .manifest import Manifest, manifest_path, read_manifest
from .scan import FileResult, FileTask, Range, scan
from .sizes import format_size, parse_size
from .source import Checkpoint, locate, open_checkpoint

CODES: dict[str, str] = {
    "bad-header": "a file fails the strict safetensors reader",
    "bad-index": "the index is unreadable, or a weight_map entry is not a safe shard name",
    "missing-shard": "a shard the index names does not exist",
    "missing-tensor": "an index entry is in no shard",
    "wrong-shard": "an index entry names one shard, but the tensor lies in another",
    "duplicate-tensor": "a tensor lies in more than one shard",
    "unindexed-tensor": "a tensor in a shard is not in the index",
    "stray-shard": "a shard file of the index's base that the index does not list",
    "stale-temp": "a temporary file an interrupted safeshard write left behind",
    "total-size": "metadata.total_size disagrees with the shards",
    "shard-count": "shard names disagree with their -of-N count or are not numbered 1..N",
    "oversize": "a file is larger than --max-shard-size",
    "bad-manifest": "the safeshard manifest is unreadable",
    "manifest-mismatch": "the manifest lists other files or tensors than the checkpoint has",
    "size-mismatch": "a file's size differs from the manifest's",
    "hash-mismatch": "a file's SHA-256 differs from the manifest's",
    "manifest-tensor-hash": "a tensor's digest (XXH3-128) differs from the manifest's",
    "read-error": "a file could not be read to its end",
    "gptq-missing": "a GPTQ module lacks qweight, qzeros, scales or g_idx",
    "gptq-shape": "a GPTQ tensor's shape disagrees with bits and group size",
    "gptq-dtype": "a GPTQ tensor's dtype is not the one GPTQ stores",
    "gptq-config": "quantization settings are invalid, or disagree with each other or the shapes",
    "gptq-g-idx-range": "a g_idx value names a group that does not exist (--deep)",
    "bad-source": "the --against source cannot be read as a checkpoint",
    "against-missing": "a source tensor is not in the checkpoint",
    "against-extra": "a checkpoint tensor is not in the source",
    "against-dtype": "a tensor's dtype differs from the source's",
    "against-shape": "a tensor's shape differs from the source's",
    "against-bytes": "a tensor's bytes differ from the source's",
    "against-metadata": "a file's __metadata__ differs from the source's",
}
"""Every finding code, with what it means. Codes are stable: scripts may match on them."""

_GPTQ_CODES = {
    "missing": "gptq-missing",
    "shape": "gptq-shape",
    "dtype": "gptq-dtype",
    "config": "gptq-config",
}

ProgressFactory = Callable[[int], AbstractContextManager[Callable[[int], None]]]
"""Called with the total bytes to read; yields a callback taking bytes just read
(the shape of :func:`safeshard.cli.byte_progress` with its label bound)."""


@dataclass(frozen=True)
class Finding:
    """One problem: a stable ``code``, the file and tensor concerned (or None), a message."""

    code: str
    file: str | None
    tensor: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "file": self.file,
            "tensor": self.tensor,
            "message": self.message,
        }


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` when there are no findings.

    ``shards``: weight files checked; ``tensors``: distinct tensors found;
    ``total_size``: bytes of those files; ``bytes_read``: tensor and file bytes read
    for hashing and comparing (both sides); ``checks``: which checks ran.
    """

    path: str
    findings: list[Finding] = field(default_factory=list)
    shards: int = 0
    tensors: int = 0
    total_size: int = 0
    bytes_read: int = 0
    bytes_verified: int = 0
    checks: list[str] = field(default_factory=list)
    against: str | None = None
    hashed_files: int = 0
    """Files whose whole SHA-256 was computed and checked against the manifest."""
    compared_files: int = 0
    """Files with a manifest whose SHA-256 was left out: every byte was compared instead."""

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "path": self.path,
            "against": self.against,
            "shards": self.shards,
            "tensors": self.tensors,
            "total_size": self.total_size,
            "bytes_verified": self.bytes_verified,
            "bytes_read": self.bytes_read,
            "checks": list(self.checks),
            "hashed_files": self.hashed_files,
            "compared_files": self.compared_files,
            "findings": [f.to_json() for f in self.findings],
        }


# --------------------------------------------------------------------------- discovery


@dataclass
class _Target:
    folder: Path
    base: str
    index_path: Path | None
    index: ShardIndex | None
    files: list[str]  # weight file names, in index order (or the single file)


def _lenient_index(path: Path, report: VerifyReport) -> ShardIndex | None:
    """Read the index; on failure, report it and salvage what is safe to use."""
    try:
        return read_index(path)
    except IndexFormatError as e:
        first = e
    except OSError as e:
        report.findings.append(
            Finding("bad-index", path.name, None, f"{path}: cannot read the index ({e.strerror})")
        )
        return None
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        obj = None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or not isinstance(wm, dict):
        report.findings.append(
            Finding(
                "bad-index",
                path.name,
                None,
                f"{first}; fix or regenerate the index (safeshard split writes one)",
            )
        )
        return None
    found: list[Finding] = []
    weight_map: dict[str, str] = {}
    for tensor, value in wm.items():
        try:
            weight_map[str(tensor)] = check_shard_name(path, tensor, value)
        except UnsafeIndexPathError as e:
            found.append(
                Finding(
                    "bad-index",
                    path.name,
                    str(tensor),
                    f"{e}; safeshard will not open it. Point it at a shard file beside the index",
                )
            )
    meta = obj.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    ts = meta.get("total_size")
    if "total_size" in meta and (not isinstance(ts, int) or isinstance(ts, bool) or ts < 0):
        found.append(
            Finding(
                "bad-index",
                path.name,
                None,
                f"{path}: metadata.total_size must be a non-negative integer, found {ts!r}",
            )
        )
        del meta["total_size"]
    if not found:
        found.append(Finding("bad-index", path.name, None, str(first)))
    report.findings.extend(found)
    return ShardIndex(path=path, weight_map=weight_map, metadata=meta)


def _discover(p: Path, report: VerifyReport) -> _Target:
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such file or folder")
    index_path: Path | None = None
    if p.is_file() and p.name.endswith(".safetensors"):
        return _Target(p.parent, p.name[: -len(".safetensors")], None, None, [p.name])
    if p.is_file() and p.name.endswith(".json"):
        index_path = p
    elif p.is_dir():
        indexes = sorted(p.glob("*" + INDEX_SUFFIX))
        if len(indexes) == 1:
            index_path = indexes[0]
        else:
            loc = locate(p)  # raises when nothing or several checkpoints are there
            if loc.index is None:
                f = loc.files[0]
                return _Target(f.parent, f.name[: -len(".safetensors")], None, None, [f.name])
            index_path = loc.index.path
    else:
        raise CheckpointNotFoundError(
            f"{p}: not a .safetensors file, a *.safetensors.index.json index or a folder"
        )
    assert index_path is not None
    name = index_path.name
    base = name[: -len(INDEX_SUFFIX)] if name.endswith(INDEX_SUFFIX) else name.split(".")[0]
    index = _lenient_index(index_path, report)
    files = index.shard_files() if index is not None else []
    if index is None:  # fall back to the shard files that look like this base's
        files = sorted(
            f.name
            for f in index_path.parent.glob(base + "-*.safetensors")
            if (m := SHARD_RE.match(f.name)) and m.group("base") == base
        )
    return _Target(index_path.parent, base, index_path, index, files)


# --------------------------------------------------------------------------- the checker


class _Verifier:
    def __init__(
        self,
        report: VerifyReport,
        target: _Target,
        cap: int | None,
        deep: bool,
        against: Path | None,
        hash_files: bool,
    ) -> None:
        self.report = report
        self.hash_files = hash_files
        self.t = target
        self.cap = cap
        self.deep = deep
        self.against = against
        self.headers: dict[str, Header] = {}  # good weight files by name
        self.bad: set[str] = set()  # missing or unreadable weight files
        self.where: dict[str, list[str]] = {}  # tensor -> files holding it
        self.manifest: Manifest | None = None
        self.tasks: dict[str, dict[str, Range]] = {}  # file -> range name -> range
        self.whole: set[str] = set()
        self.expect_sha: dict[str, str] = {}
        self.gidx: dict[str, tuple[str, int]] = {}  # g_idx tensor -> (file, groups)
        self.source: Checkpoint | None = None

    def add(self, code: str, file: str | None, tensor: str | None, message: str) -> None:
        self.report.findings.append(Finding(code, file, tensor, message))

    def path(self, name: str) -> Path:
        return self.t.folder / name

    # ---------------------------------------------------------------- structure

    def read_headers(self) -> None:
        for name in self.t.files:
            p = self.path(name)
            if not p.is_file():
                self.bad.add(name)
                if self.t.index_path is not None:
                    self.add(
                        "missing-shard",
                        name,
                        None,
                        f"{p}: listed in {self.t.index_path.name} but does not exist; "
                        "copy it again or re-run the split",
                    )
                continue
            try:
                h = read_header(p)
            except HeaderError as e:
                self.bad.add(name)
                self.add("bad-header", name, None, f"{e}; copy the file again or re-run the split")
                continue
            except OSError as e:
                self.bad.add(name)
                self.add("bad-header", name, None, f"{p}: cannot read it ({e.strerror})")
                continue
            self.headers[name] = h
            for ti in h.tensors:
                self.where.setdefault(ti.name, []).append(name)
        self.report.shards = len(self.t.files)
        self.report.tensors = len(self.where)
        self.report.total_size = sum(h.file_size for h in self.headers.values())

    def check_index(self) -> None:
        idx = self.t.index
        for tensor, files in self.where.items():
            if len(files) > 1:
                self.add(
                    "duplicate-tensor",
                    files[1],
                    tensor,
                    f"tensor {tensor!r} lies in {', '.join(files)}; a loader keeps whichever it "
                    "reads last. Re-run the split, or remove it from all but the indexed shard",
                )
        if idx is None:
            return
        ipath = self.t.index_path
        iname = ipath.name if ipath is not None else "index"
        for tensor, fname in idx.weight_map.items():
            if fname in self.bad:
                continue
            files = self.where.get(tensor, [])
            if fname in files:
                continue
            if files:
                self.add(
                    "wrong-shard",
                    fname,
                    tensor,
                    f"{iname} says {tensor!r} is in {fname}, but it lies in {', '.join(files)}; "
                    "regenerate the index",
                )
            else:
                self.add(
                    "missing-tensor",
                    fname,
                    tensor,
                    f"{iname} says {tensor!r} is in {fname}, but no shard holds it; the shard "
                    "is stale or the index belongs to another checkpoint",
                )
        for name, h in self.headers.items():
            for ti in h.tensors:
                if ti.name not in idx.weight_map:
                    self.add(
                        "unindexed-tensor",
                        name,
                        ti.name,
                        f"{name} holds {ti.name!r}, which {iname} does not list; loaders that "
                        "follow the index never see it. Regenerate the index",
                    )
        self._check_total_size(idx, iname)
        self._check_names(idx, iname)
        self._check_strays(idx, iname)

    def _check_total_size(self, idx: ShardIndex, iname: str) -> None:
        said = idx.total_size
        if said is None or self.bad:
            return
        data = sum(h.data_size for h in self.headers.values())
        files = sum(h.file_size for h in self.headers.values())
        if said not in (data, files):
            self.add(
                "total-size",
                iname,
                None,
                f"{iname} says total_size={said}, but the shards hold {data} tensor bytes "
                f"({files} bytes as files); set it to {data}",
            )

    def _check_names(self, idx: ShardIndex, iname: str) -> None:
        listed = idx.shard_files()
        matches = {f: SHARD_RE.match(f) for f in listed}
        numbered = {f: m for f, m in matches.items() if m is not None}
        if not numbered:
            return
        n = len(listed)
        for f, m in matches.items():
            if m is None:
                self.add(
                    "shard-count",
                    f,
                    None,
                    f"{iname} lists {f}, which is not named {{base}}-{{i:05d}}-of-{{n:05d}} like "
                    "the other shards",
                )
            elif int(m.group("n")) != n:
                self.add(
                    "shard-count",
                    f,
                    None,
                    f"{f} says there are {int(m.group('n'))} shards, but {iname} lists {n}; "
                    "the index mixes two splits. Re-run the split",
                )
        seen = sorted(int(m.group("i")) for m in numbered.values())
        if len(numbered) == n and seen != list(range(1, n + 1)):
            self.add(
                "shard-count",
                iname,
                None,
                f"{iname} lists shards numbered {seen}, not 1..{n}",
            )

    def _check_strays(self, idx: ShardIndex, iname: str) -> None:
        listed = idx.shard_files()
        bases = {self.t.base}
        for f in listed:
            m = SHARD_RE.match(f)
            if m is not None:
                bases.add(m.group("base"))
        for p in sorted(self.t.folder.glob("*.safetensors")):
            m = SHARD_RE.match(p.name)
            if m is None or p.name in listed:
                continue
            if m.group("base") in bases:
                self.add(
                    "stray-shard",
                    p.name,
                    None,
                    f"{p} has the index's base name but {iname} does not list it; a leftover of "
                    "an earlier split? Delete it so no tool mixes it in",
                )

    def check_temporaries(self) -> None:
        for p in stale_temporaries(self.t.folder):
            self.add(
                "stale-temp",
                p.name,
                None,
                f"{p} is a temporary file of an interrupted safeshard write; delete it, or "
                "finish the split with --resume",
            )

    def check_sizes(self) -> None:
        if self.cap is None:
            return
        self.report.checks.append("size")
        for name in self.t.files:
            p = self.path(name)
            size = self.headers[name].file_size if name in self.headers else _size(p)
            if size is not None and size > self.cap:
                self.add(
                    "oversize",
                    name,
                    None,
                    f"{name} is {size} bytes ({format_size(size)}), over the cap of {self.cap} "
                    f"bytes by {size - self.cap}; re-split with --max-shard-size {self.cap}",
                )

    # ---------------------------------------------------------------- manifest

    def check_manifest(self) -> None:
        mpath = manifest_path(self.t.folder, self.t.base)
        try:
            man = read_manifest(self.t.folder, self.t.base)
        except IndexFormatError as e:
            self.add("bad-manifest", mpath.name, None, f"{e}; re-run the split to rewrite it")
            return
        except OSError as e:
            self.add("bad-manifest", mpath.name, None, f"{mpath}: cannot read ({e.strerror})")
            return
        if man is None:
            return
        self.manifest = man
        self.report.checks.append("manifest")
        recorded = {}
        for s in man.shards:
            try:
                check_shard_name(mpath, "shards", s.file)
            except UnsafeIndexPathError as e:
                self.add("bad-manifest", mpath.name, None, f"{e}; re-run the split")
                continue
            recorded[s.file] = s
        for name in self.t.files:
            if name not in recorded:
                self.add(
                    "manifest-mismatch",
                    name,
                    None,
                    f"{mpath.name} does not record {name}; it belongs to another split. "
                    "Re-run the split",
                )
        for fname, rec in recorded.items():
            if fname not in self.t.files:
                self.add(
                    "manifest-mismatch",
                    fname,
                    None,
                    f"{mpath.name} records {fname}, which the checkpoint does not list",
                )
                continue
            size = _size(self.path(fname))
            if size is None:
                continue  # missing-shard says it
            if size != rec.size:
                self.add(
                    "size-mismatch",
                    fname,
                    None,
                    f"{fname} is {size} bytes, but {mpath.name} records {rec.size}; the file is "
                    f"{'truncated' if size < rec.size else 'longer'}. Copy it again",
                )
                continue
            if rec.sha256 is not None:
                self.whole.add(fname)
                self.expect_sha[fname] = rec.sha256
        present: dict[str, TensorInfo] = {}
        for h in self.headers.values():
            for ti in h.tensors:
                present.setdefault(ti.name, ti)
        if man.tensors and not self.bad:
            for tensor, trec in man.tensors.items():
                info = present.get(tensor)
                if info is None:
                    self.add(
                        "manifest-mismatch",
                        None,
                        tensor,
                        f"{mpath.name} records {tensor!r}, which no shard holds",
                    )
                elif info.nbytes != trec.nbytes:
                    self.add(
                        "manifest-mismatch",
                        self.where[tensor][0],
                        tensor,
                        f"{tensor!r} has {info.nbytes} bytes, but {mpath.name} records "
                        f"{trec.nbytes}",
                    )
            for tensor in present:
                if tensor not in man.tensors:
                    self.add(
                        "manifest-mismatch",
                        self.where[tensor][0],
                        tensor,
                        f"{mpath.name} does not record {tensor!r}",
                    )

    # ---------------------------------------------------------------- gptq

    def check_gptq(self) -> None:
        tensors = [ti for h in self.headers.values() for ti in h.tensors]
        first = next(iter(self.headers.values()), None)
        try:
            rep = quant.analyze(tensors, self.t.folder, first.metadata if first else None)
        except SafeshardError as e:  # defensive: analyze reports, it should not raise
            self.add("gptq-config", None, None, str(e))
            return
        if rep is None:
            return
        self.report.checks.append("gptq")
        incomplete = self._incomplete_modules()
        for prob in rep.problems:
            if prob.module is not None and prob.module in incomplete:
                continue
            holders = self.where.get(prob.tensor or "")
            file = holders[0] if holders else None
            self.add(_GPTQ_CODES[prob.kind], file, prob.tensor, _gptq_message(prob, rep))
        if not self.deep:
            return
        modules = quant.quantized_modules(tensors)
        for mod, members in modules.items():
            if mod in incomplete:
                continue
            g = members.get("g_idx")
            sc = members.get("scales") or members.get("qzeros")
            if g is None or sc is None or g.dtype != "I32" or len(g.shape) != 1:
                continue
            if len(sc.shape) != 2:
                continue
            fname = self.where[g.name][0]
            self.gidx[g.name] = (fname, sc.shape[0])
            self._range(fname, g, capture=True)

    def _incomplete_modules(self) -> set[str]:
        """Modules with a tensor indexed to a missing or unreadable shard."""
        if self.t.index is None or not self.bad:
            return set()
        return {t.rsplit(".", 1)[0] for t, f in self.t.index.weight_map.items() if f in self.bad}

    def check_gidx_values(self, results: Mapping[str, FileResult]) -> None:
        for tensor, (fname, groups) in self.gidx.items():
            data = results[fname].captured.get(tensor) if fname in results else None
            if data is None:
                continue
            values = memoryview(data).cast("i")
            if sys.byteorder == "big":  # pragma: no cover - little-endian hosts here
                import array

                arr = array.array("i", data)
                arr.byteswap()
                values = memoryview(arr)
            if not len(values):
                continue
            lo, hi = min(values), max(values)
            if lo < 0 or hi >= groups:
                bad = sum(1 for v in values if v < 0 or v >= groups)
                self.add(
                    "gptq-g-idx-range",
                    fname,
                    tensor,
                    f"{tensor}: {bad} of {len(values)} values lie outside [0, {groups}) (they "
                    f"span {lo}..{hi}); they index rows of scales/qzeros that do not exist. "
                    "Re-quantize, or restore the tensor from the source",
                )

    # ---------------------------------------------------------------- against

    def open_source(self) -> None:
        assert self.against is not None
        self.report.checks.append("against")
        try:
            self.source = open_checkpoint(self.against)
        except CheckpointNotFoundError:
            raise
        except (SafeshardError, OSError) as e:
            self.add(
                "bad-source",
                str(self.against),
                None,
                f"cannot compare: the source is not a readable checkpoint ({e})",
            )

    def check_against(self) -> None:
        src = self.source
        if src is None:
            return
        sname = str(self.against)
        skipped = set()
        if self.t.index is not None:
            skipped = {t for t, f in self.t.index.weight_map.items() if f in self.bad}
        for tensor in src.entries:
            if tensor not in self.where and tensor not in skipped:
                self.add(
                    "against-missing",
                    None,
                    tensor,
                    f"the source {sname} has {tensor!r}, which no shard holds",
                )
        for fname, h in self.headers.items():
            for ti in h.tensors:
                e = src.entries.get(ti.name)
                if e is None:
                    self.add(
                        "against-extra",
                        fname,
                        ti.name,
                        f"{fname} holds {ti.name!r}, which the source {sname} does not have",
                    )
                elif e.info.dtype != ti.dtype:
                    self.add(
                        "against-dtype",
                        fname,
                        ti.name,
                        f"{ti.name!r} is {ti.dtype} in {fname} but {e.info.dtype} in the source",
                    )
                elif e.info.shape != ti.shape:
                    self.add(
                        "against-shape",
                        fname,
                        ti.name,
                        f"{ti.name!r} has shape {list(ti.shape)} in {fname} but "
                        f"{list(e.info.shape)} in the source",
                    )
                else:
                    other = (str(src.path_of(ti.name)), src.absolute_offset(ti.name))
                    self._range(fname, ti, against=other)
            if h.metadata != src.metadata:
                self.add(
                    "against-metadata",
                    fname,
                    None,
                    f"{fname} has __metadata__ {h.metadata!r}, but the source has "
                    f"{src.metadata!r}; loaders read settings such as format=pt from it",
                )

    # ---------------------------------------------------------------- data pass

    def _range(
        self,
        fname: str,
        ti: TensorInfo,
        *,
        capture: bool = False,
        against: tuple[str, int] | None = None,
    ) -> None:
        h = self.headers[fname]
        ranges = self.tasks.setdefault(fname, {})
        old = ranges.get(ti.name)
        ranges[ti.name] = Range(
            ti.name,
            h.data_start + ti.begin,
            ti.nbytes,
            digest=False,
            against=against or (old.against if old else None),
            capture=capture or (old.capture if old else False),
        )

    def skip_implied_hashes(self) -> None:
        """Leave out whole-file hashes that the comparison with the source already implies."""
        if self.hash_files or self.source is None:
            return
        for fname in sorted(self.whole):
            h = self.headers.get(fname)
            ranges = self.tasks.get(fname, {})
            if h is None or not all(
                t.name in ranges and ranges[t.name].against is not None for t in h.tensors
            ):
                continue
            if h.raw != build_header(h.tensors, h.metadata)[8:]:
                continue  # a header split would not write: only the hash vouches for it
            self.whole.discard(fname)
            self.report.compared_files += 1

    def file_tasks(self) -> list[FileTask]:
        names = [n for n in self.t.files if n in self.whole or n in self.tasks]
        return [
            FileTask(
                str(self.path(n)),
                tuple(self.tasks.get(n, {}).values()),
                whole=n in self.whole,
                size=_size(self.path(n)) or 0,
            )
            for n in names
        ]

    def apply_results(self, results: Mapping[str, FileResult]) -> None:
        sname = str(self.against)
        for fname, res in results.items():
            if res.error is not None:
                self.add(
                    "read-error",
                    fname,
                    None,
                    f"{self.path(fname)}: {res.error}; copy it again, or check the disk",
                )
            for tensor, at in res.differs.items():
                rng = self.tasks[fname][tensor]
                self.add(
                    "against-bytes",
                    fname,
                    tensor,
                    f"{tensor!r} in {fname} differs from the source {sname}, first at byte {at} "
                    f"of {rng.nbytes} (file offset {rng.offset + at}); one of the copies is "
                    "corrupt",
                )

    def _amend_hash_finding(self, fname: str, more: str) -> None:
        found = self.report.findings
        for i, f in enumerate(found):
            if f.code == "hash-mismatch" and f.file == fname:
                found[i] = Finding(f.code, f.file, f.tensor, f.message + more)
                return

    def check_hashes(self, results: Mapping[str, FileResult], workers: int | None) -> None:
        """Report files whose SHA-256 differs from the manifest's.

        Without a source to compare with, such files are read again, hashing each
        tensor, to name the tensors that changed.
        """
        mismatched = []
        for fname, res in results.items():
            want = self.expect_sha.get(fname)
            if want is not None and res.sha256 is not None and res.sha256 != want:
                mismatched.append(fname)
                self.add(
                    "hash-mismatch",
                    fname,
                    None,
                    f"{fname} has SHA-256 {res.sha256}, but the manifest records {want}; the "
                    "file changed since the split. Copy it again",
                )
        man = self.manifest
        if man is None or not man.tensors or not mismatched or self.source is not None:
            return
        tasks = []
        for fname in mismatched:
            h = self.headers.get(fname)
            if h is None:
                continue
            ranges = tuple(
                Range(ti.name, h.data_start + ti.begin, ti.nbytes, digest=True)
                for ti in h.tensors
                if ti.name in man.tensors
            )
            tasks.append(FileTask(str(self.path(fname)), ranges, size=h.file_size))
        for task, res in zip(tasks, scan(tasks, workers=workers), strict=True):
            fname = Path(task.path).name
            bad = [t for t, d in res.hashes.items() if d != man.tensors[t].digest]
            for t in bad:
                self.add(
                    "manifest-tensor-hash",
                    fname,
                    t,
                    f"{t!r} in {fname} has digest {res.hashes[t]}, but the manifest records "
                    f"{man.tensors[t].digest}; its bytes changed since the split",
                )
            if not bad and res.error is None:
                self._amend_hash_finding(
                    fname,
                    "; yet every tensor matches the manifest's digest, so the header bytes "
                    "changed, or the manifest's file hash is wrong",
                )


def _gptq_message(prob: quant.QuantProblem, rep: quant.QuantReport) -> str:
    s = rep.settings
    where = f" (settings from {s.source}: bits={s.bits}, group_size={s.group_size})"
    fix = {
        "missing": "; the checkpoint is incomplete: restore it from the quantizer's output",
        "shape": "; the tensor does not match the quantization settings",
        "dtype": "",
        "config": "",
    }[prob.kind]
    return prob.message + (where if prob.kind in ("shape", "config") else "") + fix


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size
    except OSError:
        return None


def _cap(value: int | str | None) -> int | None:
    if value is None:
        return None
    return parse_size(value)


# --------------------------------------------------------------------------- entry point


def verify(
    path: str | os.PathLike[str],
    *,
    against: str | os.PathLike[str] | None = None,
    max_shard_size: int | str | None = None,
    deep: bool = False,
    hash_files: bool = False,
    workers: int | None = None,
    progress: ProgressFactory | None = None,
) -> VerifyReport:
    """Check the checkpoint at ``path`` (a file, a folder or an index); see the module docs.

    Returns a :class:`VerifyReport`; problems with the checkpoint are findings, never
    exceptions. Raises :class:`CheckpointNotFoundError` when ``path`` or ``against``
    does not exist or holds no checkpoint, :class:`AmbiguousCheckpointError` when a
    folder holds several, :class:`SizeParseError` for a bad ``max_shard_size`` and
    :class:`UsageError` for ``workers`` < 1.

    ``hash_files`` recomputes every file's SHA-256 for the manifest check even when
    the comparison with ``against`` already vouches for each byte.
    """
    if workers is not None and workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers}")
    cap = _cap(max_shard_size)
    src = Path(against) if against is not None else None
    if src is not None and not src.exists():
        raise CheckpointNotFoundError(f"{src}: no such file or folder (given as --against)")
    report = VerifyReport(path=str(path), against=None if src is None else str(src))
    target = _discover(Path(path), report)
    v = _Verifier(report, target, cap, deep, src, hash_files)
    report.checks.append("structure")
    v.read_headers()
    v.check_index()
    v.check_temporaries()
    v.check_sizes()
    v.check_manifest()
    v.check_gptq()
    if src is not None:
        v.open_source()
        v.check_against()
    v.skip_implied_hashes()
    report.hashed_files = len(v.whole)
    tasks = v.file_tasks()
    total = sum(t.planned_bytes for t in tasks)
    ctx: AbstractContextManager[Callable[[int], None] | None] = (
        progress(total) if progress is not None and tasks else nullcontext(None)
    )
    with ctx as advance:
        results = scan(tasks, workers=workers, progress=advance)
    by_name = {Path(t.path).name: r for t, r in zip(tasks, results, strict=True)}
    report.bytes_read = sum(r.bytes_read for r in results)
    report.bytes_verified = sum(
        t.size if t.whole else sum(r.nbytes for r in t.ranges) for t in tasks
    )
    v.apply_results(by_name)
    v.check_gidx_values(by_name)
    v.check_hashes(by_name, workers)
    if deep:
        report.checks.append("deep")
    return report
