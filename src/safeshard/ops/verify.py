"""Check a checkpoint and report every problem as a named finding; never stop at the first.

:func:`verify` raises only when its arguments are unusable (the path does not
exist or holds no checkpoint, a folder holds two, a bad size); everything wrong
*with* the checkpoint is a :class:`Finding` with a stable ``code`` (see
:data:`CODES`), the file, the tensor, and a message that says what to do.

How it runs:

1. **Find and read.** Which checkpoint PATH means is decided by
   :func:`safeshard.checkpoint.find`, the rule every command follows. The index is then
   read leniently (a malformed one is a ``bad-index`` finding, and what can safely be
   used of it is kept), every weight file's header is read with the strict reader,
   then the manifest (``{BASE}.safeshard.json``), the quantization settings and, with
   ``against``, the source. All of it goes into a :class:`Context`, which no check
   changes.
2. **Checks on headers and files.** Each is a function from the context to findings:
   - *structure*: every index entry lies in the shard it names, no tensor lies in two
     shards, every shard tensor is indexed, no stray shard of the same base or
     leftover temporary, ``total_size`` and the ``-of-N`` names agree with the shards;
   - *size* (with ``max_shard_size``): no file is over the cap;
   - *manifest*: the files and tensors it lists are the checkpoint's, with its sizes;
   - *gptq* (quantized checkpoints): every module has qweight/qzeros/scales/g_idx with
     the shapes and dtypes that bits and group size imply (:mod:`safeshard.format.quant`);
   - *against*: the same tensor names, dtypes, shapes and ``__metadata__`` as the
     source.
3. **One pass over the data** (:mod:`safeshard.io.scan`, files in parallel, nothing
   read when no check needs data): each tensor of a file the manifest records is
   digested (XXH3-128; with the header's digest, checked from the header, that covers
   every byte); with ``against``, every tensor is compared byte for byte with the
   source instead, reading each byte of each side once; with ``deep``, the g_idx
   tensors are kept. A file's whole SHA-256 is computed where ``hash_files`` asks for
   it, and for manifests older than header digests (version 1), which have only it;
   there, a file whose every tensor is compared and whose header is the canonical one
   for those tensors (as split writes it) is fully determined by what was compared,
   so its SHA-256 is not recomputed unless ``hash_files`` asks for it.
4. **Checks on the data**: read errors, differing bytes, g_idx values out of range
   (``deep``), tensor digests and SHA-256s that differ from the manifest's. A file
   whose SHA-256 differs and whose tensors were not digested is read once more,
   hashing each tensor, to name the tensors that changed; its finding is written
   after that, once.

A problem is reported once, where it starts: the tensors of a missing or
unreadable shard are not reported again as missing from the index, the source or
a GPTQ module.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from safeshard import gcpause
from safeshard.checkpoint import (
    HEADER_READERS,
    Checkpoint,
    common_metadata,
    find,
    open_checkpoint,
    quant_configs,
    read_header,
    read_index,
    read_json_file,
    read_manifest,
)
from safeshard.errors import (
    CheckpointNotFoundError,
    HeaderError,
    IndexFormatError,
    SafeshardError,
    UnsafeIndexPathError,
    UsageError,
)
from safeshard.format import quant
from safeshard.format.filenames import RANK_RE, SHARD_RE, TP_RECORD_NAME
from safeshard.format.header import Header, TensorInfo, build_header
from safeshard.format.index import ShardIndex, check_shard_name
from safeshard.format.manifest import Manifest, ShardRecord, header_digest, manifest_path
from safeshard.futures import wait_all
from safeshard.io.localfs import stale_temporaries
from safeshard.io.scan import FileResult, FileTask, Range, scan
from safeshard.io.store import as_path, is_remote, translate_errors
from safeshard.ops.tpmerge import TpRecord, rank_mismatches, tp_folder
from safeshard.redact import redact_url
from safeshard.sizes import format_size, parse_size

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
    "header-hash": "a file's header bytes differ from the manifest's digest of them",
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
    "tp-record": "tp.json (a split --tp folder's record) is unreadable or not one safeshard wrote",
    "tp-rank-missing": "a rank folder that tp.json lists does not exist",
    "tp-rank-tensors": "a rank folder's tensors differ from the slices tp.json records",
    "tp-stray-rank": "a rank folder tp.json does not list (left by a split of another world size)",
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
        return asdict(self)  # every field, in order; all plain values


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
    digested_files: int = 0
    """Files whose header and tensor digests were checked against the manifest."""
    compared_files: int = 0
    """Files with a manifest whose SHA-256 was left out: every byte was compared instead."""
    ranks: int = 0
    """Rank folders of a ``split --tp`` output checked (0: not such a folder)."""

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
            "digested_files": self.digested_files,
            "ranks": self.ranks,
            "findings": [f.to_json() for f in self.findings],
        }


# --------------------------------------------------------------------------- find and read


@dataclass(frozen=True)
class Target:
    """The checkpoint PATH means: its folder, base name, index and weight files."""

    folder: Path
    base: str
    index_path: Path | None
    index: ShardIndex | None
    """The index as far as it could be read (None when unreadable or absent)."""
    files: tuple[str, ...]
    """Weight file names: the index's shards (found by name when the index is
    unreadable), or the single file."""

    @property
    def index_name(self) -> str:
        return self.index_path.name if self.index_path is not None else "index"

    def path(self, name: str) -> Path:
        return self.folder / name


def _read_index_leniently(path: Path) -> tuple[ShardIndex | None, list[Finding]]:
    """The index at ``path`` and, when it is malformed, findings and what is safe to use."""
    try:
        return read_index(path), []
    except IndexFormatError as e:
        first = e
    except OSError as e:  # ReadError, or the file vanished
        return None, [Finding("bad-index", path.name, None, f"{e}; fix or regenerate the index")]
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        obj = None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or not isinstance(wm, dict):
        message = f"{first}; fix or regenerate the index (safeshard split writes one)"
        return None, [Finding("bad-index", path.name, None, message)]
    found: list[Finding] = []
    weight_map: dict[str, str] = {}
    safe: set[str] = set()
    for tensor, value in wm.items():
        if type(value) is str and value in safe:
            weight_map[tensor] = value
            continue
        try:
            weight_map[tensor] = check_shard_name(path, tensor, value)
            safe.add(weight_map[tensor])
        except UnsafeIndexPathError as e:
            found.append(
                Finding(
                    "bad-index",
                    path.name,
                    tensor,
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
    return ShardIndex(path=path, weight_map=weight_map, metadata=meta), found


def discover(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[Target, list[Finding]]:
    """The checkpoint at ``path``, found as every command finds it, its index read leniently.

    Raises what :func:`safeshard.checkpoint.find` raises; a malformed index is findings.
    """
    found = find(path, storage_options)
    if found.index is None:
        if found.file is None:  # find() sets exactly one of index and file
            raise CheckpointNotFoundError(f"{path}: no safetensors file or index")
        return Target(found.folder, found.base, None, None, (found.file.name,)), []
    index, findings = _read_index_leniently(found.index)
    if index is not None:
        files = tuple(index.shard_files())
    else:  # fall back to the shard files that look like this base's
        files = tuple(
            sorted(
                f.name
                for f in found.folder.glob(found.base + "-*.safetensors")
                if (m := SHARD_RE.match(f.name)) and m.group("base") == found.base
            )
        )
    return Target(found.folder, found.base, found.index, index, files), findings


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size
    except OSError:
        return None


@dataclass(frozen=True)
class Context:
    """Everything the checks read, built once by :func:`read_context`; no check changes it."""

    target: Target
    headers: Mapping[str, Header]
    """Readable weight files by name, in ``target.files`` order."""
    bad: frozenset[str]
    """Weight files that are missing or fail the strict reader."""
    sizes: Mapping[str, int | None]
    """Size of each weight file on disk (None: missing)."""
    where: Mapping[str, tuple[str, ...]]
    """Tensor name → the files holding it, in ``target.files`` order."""
    manifest: Manifest | None
    quant: quant.QuantReport | None
    source: Checkpoint | None
    against: Path | None
    cap: int | None
    deep: bool
    hash_files: bool

    @property
    def checks(self) -> list[str]:
        """The names of the checks that run, for the report."""
        return [
            name
            for name, runs in (
                ("structure", True),
                ("size", self.cap is not None),
                ("manifest", self.manifest is not None),
                ("gptq", self.quant is not None),
                ("against", self.against is not None),
                ("deep", self.deep),
            )
            if runs
        ]

    def holder(self, tensor: str | None) -> str | None:
        """The first file holding ``tensor``, if any."""
        files = self.where.get(tensor or "")
        return files[0] if files else None

    def skipped(self) -> set[str]:
        """Tensors the index places in a missing or unreadable shard: not blamed again."""
        idx = self.target.index
        if idx is None or not self.bad:
            return set()
        return {t for t, f in idx.weight_map.items() if f in self.bad}

    def incomplete_modules(self) -> set[str]:
        """Modules with a tensor indexed to a missing or unreadable shard."""
        return {t.rsplit(".", 1)[0] for t in self.skipped()}

    def recorded(self) -> dict[str, ShardRecord]:
        """The manifest's shard records with safe file names, by file name."""
        if self.manifest is None:
            return {}
        out: dict[str, ShardRecord] = {}
        for s in self.manifest.shards:
            try:
                check_shard_name(self.manifest_path, "shards", s.file)
            except UnsafeIndexPathError:
                continue  # _check_manifest reports it
            out[s.file] = s
        return out

    @property
    def manifest_path(self) -> Path:
        return manifest_path(self.target.folder, self.target.base)


def _read_headers(
    t: Target,
) -> tuple[dict[str, Header], frozenset[str], dict[str, int | None], list[Finding]]:
    headers: dict[str, Header] = {}
    bad: set[str] = set()
    sizes: dict[str, int | None] = {}
    found: list[Finding] = []
    for name, (size, header, finding) in zip(t.files, _each_header(t), strict=True):
        sizes[name] = size
        if header is not None:
            headers[name] = header
        if finding is not None:
            bad.add(name)
            if finding.code != "missing-shard" or t.index_path is not None:
                found.append(finding)
    return headers, frozenset(bad), sizes, found


def _each_header(t: Target) -> list[tuple[int | None, Header | None, Finding | None]]:
    """Each weight file's size, and its header or what is wrong with it, in order: in
    object storage several at once (each costs round trips), locally one by one."""
    if len(t.files) < 2 or not is_remote(t.folder):
        return [_one_header(t, name) for name in t.files]
    with ThreadPoolExecutor(min(HEADER_READERS, len(t.files))) as pool:
        futures = [pool.submit(_one_header, t, name) for name in t.files]
        wait_all(futures)
    return [f.result() for f in futures]


def _one_header(t: Target, name: str) -> tuple[int | None, Header | None, Finding | None]:
    p = t.path(name)
    size = _size(p)
    if not p.is_file():
        message = (
            f"{p}: listed in {t.index_name} but does not exist; copy it again or re-run the split"
        )
        return size, None, Finding("missing-shard", name, None, message)
    try:
        return size, read_header(p), None
    except HeaderError as e:
        message = f"{e}; copy the file again or re-run the split"
        return size, None, Finding("bad-header", name, None, message)
    except OSError as e:
        return size, None, Finding("bad-header", name, None, f"{e}; check the file and the disk")


def _where(headers: Mapping[str, Header]) -> dict[str, tuple[str, ...]]:
    where: dict[str, tuple[str, ...]] = {}
    for name, h in headers.items():
        for tensor in h.by_name:
            where[tensor] = (*where[tensor], name) if tensor in where else (name,)
    return where


def _read_manifest(t: Target) -> tuple[Manifest | None, list[Finding]]:
    mpath = manifest_path(t.folder, t.base)
    try:
        return read_manifest(t.folder, t.base), []
    except IndexFormatError as e:
        return None, [Finding("bad-manifest", mpath.name, None, f"{e}; re-run the split")]
    except OSError as e:
        return None, [Finding("bad-manifest", mpath.name, None, f"{mpath}: cannot read ({e})")]


def _open_source(
    against: Path, storage_options: Mapping[str, Any] | None
) -> tuple[Checkpoint | None, list[Finding]]:
    try:
        return open_checkpoint(against, storage_options=storage_options), []
    except CheckpointNotFoundError:
        raise
    except (SafeshardError, OSError) as e:
        message = f"cannot compare: the source is not a readable checkpoint ({e})"
        return None, [Finding("bad-source", str(against), None, message)]


def read_context(
    path: str | os.PathLike[str],
    *,
    against: Path | None = None,
    cap: int | None = None,
    deep: bool = False,
    hash_files: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[Context, list[Finding]]:
    """Find the checkpoint at ``path``, read what the checks need, and the findings
    made on the way (unreadable index, headers, manifest, source)."""
    target, found = discover(path, storage_options)
    headers, bad, sizes, more = _read_headers(target)
    found += more
    manifest, more = _read_manifest(target)
    found += more
    first = next(iter(headers.values()), None)
    try:
        q = quant.analyze(
            (ti for h in headers.values() for ti in h.tensors),
            quant_configs(target.folder),
            first.metadata if first is not None else None,
        )
    except SafeshardError as e:  # defensive: analyze reports, it should not raise
        q = None
        found.append(Finding("gptq-config", None, None, str(e)))
    source: Checkpoint | None = None
    if against is not None:
        source, more = _open_source(against, storage_options)
        found += more
    ctx = Context(
        target=target,
        headers=headers,
        bad=bad,
        sizes=sizes,
        where=_where(headers),
        manifest=manifest,
        quant=q,
        source=source,
        against=against,
        cap=cap,
        deep=deep,
        hash_files=hash_files,
    )
    return ctx, found


# --------------------------------------------------------------------------- checks on headers


def check_duplicates(ctx: Context) -> Iterable[Finding]:
    for tensor, files in ctx.where.items():
        if len(files) > 1:
            yield Finding(
                "duplicate-tensor",
                files[1],
                tensor,
                f"tensor {tensor!r} lies in {', '.join(files)}; a loader keeps whichever it "
                "reads last. Re-run the split, or remove it from all but the indexed shard",
            )


def check_index_entries(ctx: Context) -> Iterable[Finding]:
    idx = ctx.target.index
    if idx is None:
        return
    iname = ctx.target.index_name
    for tensor, fname in idx.weight_map.items():
        if fname in ctx.bad:
            continue
        files = ctx.where.get(tensor, ())
        if fname in files:
            continue
        if files:
            yield Finding(
                "wrong-shard",
                fname,
                tensor,
                f"{iname} says {tensor!r} is in {fname}, but it lies in {', '.join(files)}; "
                "regenerate the index",
            )
        else:
            yield Finding(
                "missing-tensor",
                fname,
                tensor,
                f"{iname} says {tensor!r} is in {fname}, but no shard holds it; the shard "
                "is stale or the index belongs to another checkpoint",
            )
    for name, h in ctx.headers.items():
        for ti in h.tensors:
            if ti.name not in idx.weight_map:
                yield Finding(
                    "unindexed-tensor",
                    name,
                    ti.name,
                    f"{name} holds {ti.name!r}, which {iname} does not list; loaders that "
                    "follow the index never see it. Regenerate the index",
                )


def check_total_size(ctx: Context) -> Iterable[Finding]:
    idx = ctx.target.index
    said = idx.total_size if idx is not None else None
    if said is None or ctx.bad:
        return
    data = sum(h.data_size for h in ctx.headers.values())
    files = sum(h.file_size for h in ctx.headers.values())
    if said not in (data, files):
        iname = ctx.target.index_name
        yield Finding(
            "total-size",
            iname,
            None,
            f"{iname} says total_size={said}, but the shards hold {data} tensor bytes "
            f"({files} bytes as files); set it to {data}",
        )


def check_shard_names(ctx: Context) -> Iterable[Finding]:
    idx = ctx.target.index
    if idx is None:
        return
    iname = ctx.target.index_name
    listed = idx.shard_files()
    matches = {f: SHARD_RE.match(f) for f in listed}
    numbered = {f: m for f, m in matches.items() if m is not None}
    if not numbered:
        return
    n = len(listed)
    for f, m in matches.items():
        if m is None:
            yield Finding(
                "shard-count",
                f,
                None,
                f"{iname} lists {f}, which is not named {{base}}-{{i:05d}}-of-{{n:05d}} like "
                "the other shards",
            )
        elif int(m.group("n")) != n:
            yield Finding(
                "shard-count",
                f,
                None,
                f"{f} says there are {int(m.group('n'))} shards, but {iname} lists {n}; "
                "the index mixes two splits. Re-run the split",
            )
    seen = sorted(int(m.group("i")) for m in numbered.values())
    if len(numbered) == n and seen != list(range(1, n + 1)):
        yield Finding(
            "shard-count", iname, None, f"{iname} lists shards numbered {seen}, not 1..{n}"
        )


def check_strays(ctx: Context) -> Iterable[Finding]:
    idx = ctx.target.index
    if idx is None:
        return
    listed = set(idx.shard_files())
    bases = {ctx.target.base}
    for f in listed:
        m = SHARD_RE.match(f)
        if m is not None:
            bases.add(m.group("base"))
    for p in sorted(ctx.target.folder.glob("*.safetensors")):
        m = SHARD_RE.match(p.name)
        if m is not None and p.name not in listed and m.group("base") in bases:
            yield Finding(
                "stray-shard",
                p.name,
                None,
                f"{p} has the index's base name but {ctx.target.index_name} does not list it; "
                "a leftover of an earlier split? Delete it so no tool mixes it in",
            )


def check_temporaries(ctx: Context) -> Iterable[Finding]:
    for p in stale_temporaries(ctx.target.folder):
        yield Finding(
            "stale-temp",
            p.name,
            None,
            f"{p} is a temporary file of an interrupted safeshard write; delete it, or "
            "finish the split with --resume",
        )


def check_sizes(ctx: Context) -> Iterable[Finding]:
    cap = ctx.cap
    if cap is None:
        return
    for name in ctx.target.files:
        size = ctx.sizes.get(name)
        if size is not None and size > cap:
            yield Finding(
                "oversize",
                name,
                None,
                f"{name} is {size} bytes ({format_size(size)}), over the cap of {cap} "
                f"bytes by {size - cap}; re-split with --max-shard-size {cap}",
            )


def check_manifest(ctx: Context) -> Iterable[Finding]:
    man = ctx.manifest
    if man is None:
        return
    mpath = ctx.manifest_path
    files = set(ctx.target.files)
    for s in man.shards:
        try:
            check_shard_name(mpath, "shards", s.file)
        except UnsafeIndexPathError as e:
            yield Finding("bad-manifest", mpath.name, None, f"{e}; re-run the split")
    recorded = ctx.recorded()
    for name in ctx.target.files:
        if name not in recorded:
            yield Finding(
                "manifest-mismatch",
                name,
                None,
                f"{mpath.name} does not record {name}; it belongs to another split. "
                "Re-run the split",
            )
    for fname, rec in recorded.items():
        if fname not in files:
            yield Finding(
                "manifest-mismatch",
                fname,
                None,
                f"{mpath.name} records {fname}, which the checkpoint does not list",
            )
            continue
        size = ctx.sizes.get(fname)
        if size is not None and size != rec.size:  # a missing file is missing-shard
            yield Finding(
                "size-mismatch",
                fname,
                None,
                f"{fname} is {size} bytes, but {mpath.name} records {rec.size}; the file is "
                f"{'truncated' if size < rec.size else 'longer'}. Copy it again",
            )
            continue
        h = ctx.headers.get(fname)
        if h is not None and rec.header is not None:
            got = header_digest(struct.pack("<Q", h.header_len) + h.raw)
            if got != rec.header:
                yield Finding(
                    "header-hash",
                    fname,
                    None,
                    f"{fname}'s header has digest {got}, but {mpath.name} records "
                    f"{rec.header}; its header bytes changed since the split. Copy it again",
                )
    if not man.tensors or ctx.bad:
        return
    for tensor, trec in man.tensors.items():
        holder = ctx.holder(tensor)
        if holder is None:
            yield Finding(
                "manifest-mismatch",
                None,
                tensor,
                f"{mpath.name} records {tensor!r}, which no shard holds",
            )
        elif (nbytes := ctx.headers[holder].by_name[tensor].nbytes) != trec.nbytes:
            yield Finding(
                "manifest-mismatch",
                holder,
                tensor,
                f"{tensor!r} has {nbytes} bytes, but {mpath.name} records {trec.nbytes}",
            )
    for tensor, holders in ctx.where.items():
        if tensor not in man.tensors:
            yield Finding(
                "manifest-mismatch", holders[0], tensor, f"{mpath.name} does not record {tensor!r}"
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


def check_gptq(ctx: Context) -> Iterable[Finding]:
    rep = ctx.quant
    if rep is None:
        return
    incomplete = ctx.incomplete_modules()
    for prob in rep.problems:
        if prob.module is not None and prob.module in incomplete:
            continue
        yield Finding(
            _GPTQ_CODES[prob.kind], ctx.holder(prob.tensor), prob.tensor, _gptq_message(prob, rep)
        )


def gidx_targets(ctx: Context) -> dict[str, tuple[str, int]]:
    """With ``deep``: each g_idx tensor worth reading → (file, number of groups)."""
    if not ctx.deep or ctx.quant is None:
        return {}
    incomplete = ctx.incomplete_modules()
    tensors = (ti for h in ctx.headers.values() for ti in h.tensors)
    out: dict[str, tuple[str, int]] = {}
    for mod, members in quant.quantized_modules(tensors).items():
        if mod in incomplete:
            continue
        g = members.get("g_idx")
        sc = members.get("scales") or members.get("qzeros")
        if g is None or sc is None or g.dtype != "I32" or len(g.shape) != 1:
            continue
        if len(sc.shape) == 2:
            out[g.name] = (ctx.where[g.name][0], sc.shape[0])
    return out


def comparable(ctx: Context) -> Iterable[tuple[str, TensorInfo, tuple[Any, int]]]:
    """(file, tensor, (source path, source offset)) for each tensor that the source holds
    with the same dtype and shape: the ones whose bytes are compared."""
    src = ctx.source
    if src is None:
        return
    for fname, h in ctx.headers.items():
        for ti in h.tensors:
            e = src.entries.get(ti.name)
            if e is not None and e.info.dtype == ti.dtype and e.info.shape == ti.shape:
                yield fname, ti, (src.path_of(ti.name), src.absolute_offset(ti.name))


def check_against(ctx: Context) -> Iterable[Finding]:
    src = ctx.source
    if src is None:
        return
    sname = str(ctx.against)
    skipped = ctx.skipped()
    want, _ = common_metadata(src)  # what split writes into every shard
    for tensor in src.entries:
        if tensor not in ctx.where and tensor not in skipped:
            yield Finding(
                "against-missing",
                None,
                tensor,
                f"the source {sname} has {tensor!r}, which no shard holds",
            )
    for fname, h in ctx.headers.items():
        for ti in h.tensors:
            e = src.entries.get(ti.name)
            if e is None:
                yield Finding(
                    "against-extra",
                    fname,
                    ti.name,
                    f"{fname} holds {ti.name!r}, which the source {sname} does not have",
                )
            elif e.info.dtype != ti.dtype:
                yield Finding(
                    "against-dtype",
                    fname,
                    ti.name,
                    f"{ti.name!r} is {ti.dtype} in {fname} but {e.info.dtype} in the source",
                )
            elif e.info.shape != ti.shape:
                yield Finding(
                    "against-shape",
                    fname,
                    ti.name,
                    f"{ti.name!r} has shape {list(ti.shape)} in {fname} but "
                    f"{list(e.info.shape)} in the source",
                )
        if h.metadata != want:
            yield Finding(
                "against-metadata",
                fname,
                None,
                f"{fname} has __metadata__ {h.metadata!r}, but the source has "
                f"{want!r}; loaders read settings such as format=pt from it",
            )


HEADER_CHECKS: tuple[Callable[[Context], Iterable[Finding]], ...] = (
    check_duplicates,
    check_index_entries,
    check_total_size,
    check_shard_names,
    check_strays,
    check_temporaries,
    check_sizes,
    check_manifest,
    check_gptq,
    check_against,
)
"""The checks that need headers and file names only, in report order."""


# --------------------------------------------------------------------------- the data pass


@dataclass(frozen=True)
class ReadPlan:
    """What the data pass reads: one task per file, the SHA-256 each hashed file must
    have, and how many files with a manifest are vouched for by comparison instead."""

    tasks: tuple[FileTask, ...]
    expect_sha: Mapping[str, str]
    compared_files: int
    digested_files: frozenset[str] = frozenset()
    """Files whose tensors' digests are checked against the manifest."""


def plan_reads(ctx: Context) -> ReadPlan:
    """The single pass over the data that the data checks need (see the module docs).

    Against the manifest, a file is checked by the digest of each of its tensors (its
    header digest, checked from the header, covers the rest: every byte), or, for a
    manifest that records no header digest (safeshard before version 2 manifests), by
    its whole SHA-256; ``hash_files`` adds the SHA-256 wherever the manifest records one.
    A tensor compared byte for byte with ``against`` needs no digest.
    """
    whole: dict[str, str] = {}  # file -> recorded SHA-256
    digest: set[str] = set()  # files whose tensors are checked by their digests
    files = set(ctx.target.files)
    man = ctx.manifest
    for fname, rec in ctx.recorded().items():
        if fname not in files or ctx.sizes.get(fname) != rec.size:
            continue  # missing-shard or size-mismatch says it
        if rec.sha256 is not None and (rec.header is None or ctx.hash_files):
            whole[fname] = rec.sha256
        if rec.header is not None and man is not None and man.tensors:
            digest.add(fname)
    ranges: dict[str, dict[str, Range]] = {}
    for fname, ti, other in comparable(ctx):
        offset = ctx.headers[fname].data_start + ti.begin
        ranges.setdefault(fname, {})[ti.name] = Range(ti.name, offset, ti.nbytes, against=other)
    for tensor, (fname, _groups) in gidx_targets(ctx).items():
        ti = ctx.headers[fname].by_name[tensor]
        old = ranges.setdefault(fname, {}).get(tensor)
        offset = ctx.headers[fname].data_start + ti.begin
        ranges[fname][tensor] = Range(
            tensor, offset, ti.nbytes, against=old.against if old else None, capture=True
        )
    recorded_tensors = man.tensors if man is not None else {}
    for fname in sorted(digest):
        h = ctx.headers.get(fname)
        if h is None:
            continue
        mine = ranges.setdefault(fname, {})
        for ti in h.tensors:
            old = mine.get(ti.name)
            if ti.name not in recorded_tensors or (old is not None and old.against is not None):
                continue
            mine[ti.name] = Range(
                ti.name,
                h.data_start + ti.begin,
                ti.nbytes,
                digest=True,
                capture=old.capture if old else False,
            )
    compared = 0
    if not ctx.hash_files and ctx.source is not None:
        for fname in sorted(whole):
            h = ctx.headers.get(fname)
            mine = ranges.get(fname, {})
            if h is None or not all(
                t.name in mine and mine[t.name].against is not None for t in h.tensors
            ):
                continue
            if h.raw != build_header(h.tensors, h.metadata)[8:]:
                continue  # a header split would not write: only the hash vouches for it
            del whole[fname]
            compared += 1
    tasks = tuple(
        FileTask(
            ctx.target.path(n),
            tuple(r for r in ranges.get(n, {}).values() if r.digest or r.against or r.capture),
            whole=n in whole,
            size=ctx.sizes.get(n) or 0,
        )
        for n in ctx.target.files
        if n in whole or ranges.get(n)
    )
    return ReadPlan(tasks, whole, compared, frozenset(digest))


def rehash_tasks(ctx: Context, files: Sequence[str]) -> list[FileTask]:
    """Tasks that hash each tensor the manifest records in ``files``, to name the ones
    that changed. Only without a source (which already names them) and with a manifest
    that records tensor digests."""
    man = ctx.manifest
    if man is None or not man.tensors or ctx.source is not None:
        return []
    tasks = []
    for fname in files:
        h = ctx.headers.get(fname)
        if h is None:
            continue
        ranges = tuple(
            Range(ti.name, h.data_start + ti.begin, ti.nbytes, digest=True)
            for ti in h.tensors
            if ti.name in man.tensors
        )
        tasks.append(FileTask(ctx.target.path(fname), ranges, size=h.file_size))
    return tasks


def check_reads(
    ctx: Context, plan: ReadPlan, results: Mapping[str, FileResult]
) -> Iterable[Finding]:
    sname = str(ctx.against)
    offsets = {
        (PurePosixPath(str(t.path)).name, r.name): r
        for t in plan.tasks
        for r in t.ranges
        if r.against
    }
    for fname, res in results.items():
        if res.error is not None:
            yield Finding(
                "read-error",
                fname,
                None,
                f"{ctx.target.path(fname)}: {res.error}; copy it again, or check the disk",
            )
        for tensor, at in res.differs.items():
            rng = offsets[fname, tensor]
            yield Finding(
                "against-bytes",
                fname,
                tensor,
                f"{tensor!r} in {fname} differs from the source {sname}, first at byte {at} "
                f"of {rng.nbytes} (file offset {rng.offset + at}); one of the copies is "
                "corrupt",
            )


def check_gidx_values(ctx: Context, results: Mapping[str, FileResult]) -> Iterable[Finding]:
    for tensor, (fname, groups) in gidx_targets(ctx).items():
        data = results[fname].captured.get(tensor) if fname in results else None
        if not data:
            continue
        values: Any = memoryview(data).cast("i")
        if sys.byteorder == "big":  # pragma: no cover - little-endian hosts here
            import array

            values = array.array("i", data)
            values.byteswap()
        lo, hi = min(values), max(values)
        if lo < 0 or hi >= groups:
            bad = sum(1 for v in values if v < 0 or v >= groups)
            yield Finding(
                "gptq-g-idx-range",
                fname,
                tensor,
                f"{tensor}: {bad} of {len(values)} values lie outside [0, {groups}) (they "
                f"span {lo}..{hi}); they index rows of scales/qzeros that do not exist. "
                "Re-quantize, or restore the tensor from the source",
            )


def check_digests(ctx: Context, results: Mapping[str, FileResult]) -> Iterable[Finding]:
    """``manifest-tensor-hash`` for each tensor whose digest differs from the manifest's."""
    man = ctx.manifest
    if man is None:
        return
    for fname, res in results.items():
        for t, d in res.hashes.items():
            rec = man.tensors.get(t)
            if rec is not None and d != rec.digest:
                yield Finding(
                    "manifest-tensor-hash",
                    fname,
                    t,
                    f"{t!r} in {fname} has digest {d}, but the manifest records {rec.digest}; "
                    "its bytes changed since the split. Copy the file again",
                )


def mismatched_hashes(plan: ReadPlan, results: Mapping[str, FileResult]) -> list[str]:
    """Files whose SHA-256 differs from the manifest's."""
    return [
        fname
        for fname, res in results.items()
        if fname in plan.expect_sha
        and res.sha256 is not None
        and res.sha256 != plan.expect_sha[fname]
    ]


def check_hashes(
    ctx: Context,
    plan: ReadPlan,
    results: Mapping[str, FileResult],
    rehashed: Mapping[str, FileResult],
) -> Iterable[Finding]:
    """``hash-mismatch`` for each file whose SHA-256 differs, then, from ``rehashed``
    (each such file's tensors hashed again), ``manifest-tensor-hash`` for each tensor
    that changed; when none did, the file finding says the header must have."""
    man = ctx.manifest
    tensor_findings: list[Finding] = []
    for fname in mismatched_hashes(plan, results):
        message = (
            f"{fname} has SHA-256 {results[fname].sha256}, but the manifest records "
            f"{plan.expect_sha[fname]}; the file changed since the split. Copy it again"
        )
        again = rehashed.get(fname)
        first = fname in plan.digested_files  # digested in the first pass: check_digests
        if first:
            again = results.get(fname)
        if again is not None and man is not None:
            changed = [t for t, d in again.hashes.items() if d != man.tensors[t].digest]
            for t in [] if first else changed:
                tensor_findings.append(
                    Finding(
                        "manifest-tensor-hash",
                        fname,
                        t,
                        f"{t!r} in {fname} has digest {again.hashes[t]}, but the manifest "
                        f"records {man.tensors[t].digest}; its bytes changed since the split",
                    )
                )
            if not changed and again.error is None:
                message += (
                    "; yet every tensor matches the manifest's digest, so the header bytes "
                    "changed, or the manifest's file hash is wrong"
                )
        yield Finding("hash-mismatch", fname, None, message)
    yield from tensor_findings


# --------------------------------------------------------------------------- entry point


def _by_name(tasks: Sequence[FileTask], results: Sequence[FileResult]) -> dict[str, FileResult]:
    return {PurePosixPath(str(t.path)).name: r for t, r in zip(tasks, results, strict=True)}


@gcpause.pausing
@translate_errors
def verify(
    path: str | os.PathLike[str],
    *,
    against: str | os.PathLike[str] | None = None,
    max_shard_size: int | str | None = None,
    deep: bool = False,
    hash_files: bool = False,
    workers: int | None = None,
    progress: ProgressFactory | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check the checkpoint at ``path`` (a file, a folder or an index); see the module docs.

    Returns a :class:`VerifyReport`; problems with the checkpoint are findings, never
    exceptions. Raises :class:`CheckpointNotFoundError` when ``path`` or ``against``
    does not exist or holds no checkpoint, :class:`AmbiguousCheckpointError` when a
    folder holds several, :class:`SizeParseError` for a bad ``max_shard_size`` and
    :class:`UsageError` for ``workers`` < 1.

    ``hash_files`` recomputes every file's SHA-256 for the manifest check even when
    the comparison with ``against`` already vouches for each byte. ``path`` and
    ``against`` may be URLs (:mod:`safeshard.io.store`), read with ``storage_options``.
    """
    if workers is not None and workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers}")
    cap = None if max_shard_size is None else parse_size(max_shard_size)
    one = functools.partial(
        _verify_one,
        cap=cap,
        deep=deep,
        hash_files=hash_files,
        workers=workers,
        progress=progress,
        storage_options=storage_options,
    )
    folder = tp_folder(path, storage_options)
    if folder is None:
        return one(path, against=against)[0]
    if against is not None:
        raise UsageError(
            f"{redact_url(path)}: a tensor-parallel split (tp.json) cannot be compared "
            "with --against; merge it first (safeshard merge) and verify the merged file"
        )
    return verify_tp(folder, one)


def _verify_one(
    path: str | os.PathLike[str],
    *,
    against: str | os.PathLike[str] | None = None,
    cap: int | None,
    deep: bool,
    hash_files: bool,
    workers: int | None,
    progress: ProgressFactory | None,
    storage_options: Mapping[str, Any] | None,
) -> tuple[VerifyReport, Context]:
    """:func:`verify` of one checkpoint, and the context its checks read (the headers,
    for the caller to check more without reading them again)."""
    src = as_path(against, storage_options) if against is not None else None
    if src is not None and not src.exists():
        raise CheckpointNotFoundError(f"{src}: no such file or folder (given as --against)")
    ctx, findings = read_context(
        path,
        against=src,
        cap=cap,
        deep=deep,
        hash_files=hash_files,
        storage_options=storage_options,
    )
    for check in HEADER_CHECKS:
        findings.extend(check(ctx))
    plan = plan_reads(ctx)
    total = sum(t.planned_bytes for t in plan.tasks)
    bar: AbstractContextManager[Callable[[int], None] | None] = (
        progress(total) if progress is not None and plan.tasks else nullcontext(None)
    )
    with bar as advance:
        first = scan(plan.tasks, workers=workers, progress=advance)
    results = _by_name(plan.tasks, first)
    # files whose tensors were digested in the first pass need no second read
    again = rehash_tasks(
        ctx, [f for f in mismatched_hashes(plan, results) if f not in plan.digested_files]
    )
    second = scan(again, workers=workers)
    findings.extend(check_reads(ctx, plan, results))
    findings.extend(check_gidx_values(ctx, results))
    findings.extend(check_digests(ctx, results))
    findings.extend(check_hashes(ctx, plan, results, _by_name(again, second)))
    report = VerifyReport(
        path=redact_url(path),
        findings=findings,
        shards=len(ctx.target.files),
        tensors=len(ctx.where),
        total_size=sum(h.file_size for h in ctx.headers.values()),
        bytes_read=sum(r.bytes_read for r in (*first, *second)),
        bytes_verified=sum(
            t.size if t.whole else sum(r.nbytes for r in t.ranges) for t in plan.tasks
        ),
        checks=ctx.checks,
        against=None if src is None else redact_url(src),
        hashed_files=len(plan.expect_sha),
        compared_files=plan.compared_files,
        digested_files=len(plan.digested_files),
    )
    return report, ctx


# --------------------------------------------------------------------------- tensor parallel


def verify_tp(
    folder: Any, each_rank: Callable[[Any], tuple[VerifyReport, Context]]
) -> VerifyReport:
    """Verify a ``split --tp`` folder: ``tp.json`` is readable, every rank folder it lists
    exists, is a sound checkpoint (``each_rank``: :func:`verify` of one checkpoint with the
    caller's options, and the headers it read; their findings named
    ``rank-0000r-of-0000N/FILE``) and holds exactly the recorded slices (names, dtypes,
    shapes; from those same headers), and no other rank folder lies beside them. The counts
    add up the ranks'."""
    report = VerifyReport(path=redact_url(folder), checks=["tensor-parallel"])
    where = f"{redact_url(folder)}/{TP_RECORD_NAME}"
    obj = read_json_file(folder / TP_RECORD_NAME)
    try:
        if obj is None:
            raise IndexFormatError(f"{where}: not a readable JSON object")
        record = TpRecord.parse(obj, where)
    except IndexFormatError as e:
        report.findings.append(
            Finding("tp-record", TP_RECORD_NAME, None, f"{e}; rerun split --tp with --force")
        )
        return report
    listed = set(record.ranks)
    for rank, name in enumerate(record.ranks):
        rank_dir = folder / name
        if not rank_dir.is_dir():
            report.findings.append(
                Finding(
                    "tp-rank-missing",
                    name,
                    None,
                    f"{where} lists rank {rank} of {record.world_size} in {name}/, which does "
                    "not exist; rerun split --tp with --force",
                )
            )
            continue
        sub, ctx = each_rank(rank_dir)
        report.findings += [
            Finding(f.code, f"{name}/{f.file}" if f.file else name, f.tensor, f.message)
            for f in sub.findings
        ]
        if not ctx.bad:  # else its verify has said which files cannot be read
            infos = {t.name: t for h in ctx.headers.values() for t in h.tensors}
            report.findings += [
                Finding("tp-rank-tensors", name, t, why)
                for t, why in rank_mismatches(record, rank, infos, where)
            ]
        report.shards += sub.shards
        report.tensors = max(report.tensors, sub.tensors)
        report.total_size += sub.total_size
        report.bytes_read += sub.bytes_read
        report.bytes_verified += sub.bytes_verified
        report.hashed_files += sub.hashed_files
        report.compared_files += sub.compared_files
        report.digested_files += sub.digested_files
        report.checks += [c for c in sub.checks if c not in report.checks]
        report.ranks += 1
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if RANK_RE.match(p.name) and p.name not in listed and p.is_dir():
            report.findings.append(
                Finding(
                    "tp-stray-rank",
                    p.name,
                    None,
                    f"{p.name}/ is not one of the {record.world_size} rank folders {where} "
                    "lists (a split with another world size left it); remove it",
                )
            )
    return report
