"""What a checkpoint holds, from its headers alone: sizes, layers, GPTQ, and what a split would do.

:func:`inspect` reads every shard's header (never tensor data), the config files
beside the weights, and runs the real shard planner for the given cap. Its
:class:`InspectReport` is plain data; :meth:`InspectReport.to_json` gives the stable
``--json`` layout documented in ``docs/inspect-json.md``.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safeshard import gcpause
from safeshard.checkpoint import common_metadata, open_checkpoint, quant_configs
from safeshard.errors import OversizeTensorError
from safeshard.format.blocks import Group, group_tensors
from safeshard.format.header import TensorInfo, padded_header_size
from safeshard.format.quant import QuantReport, analyze
from safeshard.io.store import translate_errors
from safeshard.ops import plan
from safeshard.ops.plan import FileSizer
from safeshard.ops.tpmerge import read_tp, tp_folder
from safeshard.redact import redact_url
from safeshard.sizes import FAT32_LIMIT, format_size, parse_size

DEFAULT_CAP = 4_000_000_000
"""``4GB``, decimal: the default cap of ``split``."""

LIMIT_FAT32 = "fat32"
LIMIT_CAP = "cap"


@dataclass(frozen=True)
class FileReport:
    """One weights file."""

    name: str
    size: int
    tensors: int
    header_size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # every field, in order; all plain values


@dataclass(frozen=True)
class TensorReport:
    """One tensor, as a largest-tensor or outside-block entry."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, t: TensorInfo) -> TensorReport:
        return cls(t.name, t.dtype, t.shape, t.nbytes)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "bytes": self.nbytes,
        }


@dataclass(frozen=True)
class BlockFamily:
    """A family of numbered blocks (``model.layers``) and its bytes per block."""

    name: str
    count: int
    first: int
    last: int
    min_bytes: int
    max_bytes: int
    typical_bytes: int
    tensors_per_block: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "min_bytes": self.min_bytes,
            "max_bytes": self.max_bytes,
            "typical_bytes": self.typical_bytes,
            "tensors_per_block": self.tensors_per_block,
        }


@dataclass(frozen=True)
class SizedItem:
    """A block or tensor with its data bytes and the size of a file holding it alone."""

    name: str
    nbytes: int
    file_size: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.nbytes, "file_size": self.file_size}


@dataclass(frozen=True)
class InspectReport:
    """Everything ``safeshard inspect`` reports. See ``docs/inspect-json.md``."""

    path: str
    index: str | None
    files: tuple[FileReport, ...]
    file_size: int
    tensor_count: int
    total_tensor_bytes: int
    dtypes: dict[str, int]
    block_families: tuple[BlockFamily, ...]
    largest_block: SizedItem | None
    largest_tensor: TensorReport | None
    outside_blocks: tuple[TensorReport, ...]
    quant: QuantReport | None
    metadata: dict[str, str] | None
    cap: int
    predicted_shards: int | None
    predicted_shard_sizes: tuple[int, ...]
    smallest_cap: int
    oversize_tensors: tuple[SizedItem, ...]
    oversize_blocks: tuple[SizedItem, ...]
    exceeds: tuple[str, ...]
    warnings: tuple[str, ...]
    stream_largest_unit: SizedItem | None = None
    stream_no_read_budget: int = 0

    @property
    def stream_min_budget(self) -> int | None:
        """The smallest ``max_resident_bytes`` stream can run with: the largest unit."""
        u = self.stream_largest_unit
        return u.nbytes if u is not None else None

    @property
    def blocks(self) -> int:
        return sum(f.count for f in self.block_families)

    def to_json(self) -> dict[str, Any]:
        q = self.quant
        return {
            "kind": "checkpoint",
            "path": self.path,
            "index": self.index,
            "files": [f.to_json() for f in self.files],
            "file_size": self.file_size,
            "tensor_count": self.tensor_count,
            "total_tensor_bytes": self.total_tensor_bytes,
            "dtypes": dict(self.dtypes),
            "blocks": self.blocks,
            "block_families": [f.to_json() for f in self.block_families],
            "largest_block": self.largest_block.to_json() if self.largest_block else None,
            "largest_tensor": self.largest_tensor.to_json() if self.largest_tensor else None,
            "outside_blocks": [t.to_json() for t in self.outside_blocks],
            "quantization": q.settings.to_json() if q is not None else None,
            "quant_source": q.settings.source if q is not None else None,
            "quant_modules": len(q.modules) if q is not None else 0,
            "quant_inferred": (
                q.inferred.to_json() if q is not None and q.inferred is not None else None
            ),
            "quant_check": [p.to_json() for p in q.problems] if q is not None else [],
            "metadata": dict(self.metadata) if self.metadata is not None else None,
            "cap": self.cap,
            "predicted_shards": self.predicted_shards,
            "predicted_shard_sizes": list(self.predicted_shard_sizes),
            "smallest_cap": self.smallest_cap,
            "oversize_tensors": [t.to_json() for t in self.oversize_tensors],
            "oversize_blocks": [b.to_json() for b in self.oversize_blocks],
            "exceeds": list(self.exceeds),
            "warnings": list(self.warnings),
            "stream_min_budget": self.stream_min_budget,
            "stream_largest_unit": (
                {"name": self.stream_largest_unit.name, "bytes": self.stream_largest_unit.nbytes}
                if self.stream_largest_unit is not None
                else None
            ),
            "stream_no_read_budget": self.stream_no_read_budget,
        }


@dataclass(frozen=True)
class RankReport:
    """One rank folder of a ``split --tp`` output."""

    name: str
    files: int
    file_size: int
    tensors: int
    tensor_bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # every field, in order; all plain values


@dataclass(frozen=True)
class TpInspectReport:
    """What ``safeshard inspect`` reports on the output of ``split --tp``: the record
    (``tp.json``) and each rank folder. See ``docs/inspect-json.md``."""

    path: str
    world_size: int
    base: str
    plan: dict[str, str]
    tensor_count: int
    sliced: int
    replicated: int
    total_tensor_bytes: int
    merged_file_size: int
    lossless: bool
    reason: str
    """Why merge writes a canonical file and not the source's own (empty when lossless)."""
    digests: bool
    """Whether ``tp.json`` holds the full tensors' digests (the source had a manifest)."""
    ranks: tuple[RankReport, ...]

    @property
    def file_size(self) -> int:
        return sum(r.file_size for r in self.ranks)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "tensor-parallel",
            "path": self.path,
            "world_size": self.world_size,
            "base": self.base,
            "tp_plan": dict(self.plan),
            "tensor_count": self.tensor_count,
            "sliced_tensors": self.sliced,
            "replicated_tensors": self.replicated,
            "total_tensor_bytes": self.total_tensor_bytes,
            "merged_file_size": self.merged_file_size,
            "lossless": self.lossless,
            "reason": self.reason,
            "digests": self.digests,
            "ranks": [r.to_json() for r in self.ranks],
            "file_size": self.file_size,
        }


@gcpause.pausing
@translate_errors
def inspect_tp(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> TpInspectReport | None:
    """The report on ``path`` if it is the output of ``split --tp`` (a folder with
    ``tp.json``), else None. Reads ``tp.json`` and every rank folder's headers, and raises
    the reader's errors where a rank folder is missing or holds other tensors than the
    record gives it (``safeshard verify`` says every problem)."""
    folder = tp_folder(path, storage_options)
    if folder is None:
        return None
    tp = read_tp(folder, storage_options)
    if tp is None:  # pragma: no cover - tp_folder saw tp.json a moment ago
        return None
    rec = tp.record
    framed, _ = rec.merged(tp.where)
    sliced = sum(1 for t in rec.tensors.values() if t.dim is not None)
    return TpInspectReport(
        path=redact_url(path),
        world_size=rec.world_size,
        base=rec.base,
        plan=rec.plan,
        tensor_count=len(rec.tensors),
        sliced=sliced,
        replicated=len(rec.tensors) - sliced,
        total_tensor_bytes=rec.total_bytes,
        merged_file_size=len(framed) + rec.total_bytes,
        lossless=rec.lossless,
        reason=rec.reason,
        digests=rec.digests is not None,
        ranks=tuple(
            RankReport(
                name,
                len(ck.headers),
                ck.file_size,
                len(ck.entries),
                ck.total_tensor_bytes,
            )
            for name, ck in zip(rec.ranks, tp.ranks, strict=True)
        ),
    )


def _families(groups: Sequence[Group], infos: Mapping[str, TensorInfo]) -> list[BlockFamily]:
    by_family: dict[str, list[Group]] = {}
    for g in groups:
        if g.kind == "block" and g.family is not None:
            by_family.setdefault(g.family, []).append(g)
    out: list[BlockFamily] = []
    for name, blocks in by_family.items():
        sizes = [sum(infos[t].nbytes for t in b.tensors) for b in blocks]
        numbers = [b.number for b in blocks if b.number is not None]
        counts = [len(b.tensors) for b in blocks]
        out.append(
            BlockFamily(
                name=name,
                count=len(blocks),
                first=min(numbers),
                last=max(numbers),
                min_bytes=min(sizes),
                max_bytes=max(sizes),
                typical_bytes=int(statistics.median_low(sizes)),
                tensors_per_block=int(statistics.median_low(counts)),
            )
        )
    return out


def stream_units(
    groups: Sequence[Group], infos: Mapping[str, TensorInfo], *, gptq: bool = False
) -> list[tuple[str, int]]:
    """The units ``safeshard.stream`` holds or not as a whole, as the headers show them:
    each block, and the tensors outside the blocks grouped by the module holding them
    (``model.embed_tokens``, ``lm_head``); ``(name, bytes held)`` in model order. A GPTQ
    v1 ``qzeros`` counts twice (stream converts a private copy after each read)."""

    def held(n: str) -> int:
        return infos[n].nbytes * (2 if gptq and n.endswith(".qzeros") else 1)

    units: dict[str, int] = {}
    for g in groups:
        if g.kind == "block":
            units[g.key] = sum(held(n) for n in g.tensors)
            continue
        for n in g.tensors:
            module = n.rsplit(".", 1)[0] if "." in n else "(model)"
            units[module] = units.get(module, 0) + held(n)
    return list(units.items())


@gcpause.pausing
@translate_errors
def inspect(
    path: str | os.PathLike[str],
    cap: int | str = DEFAULT_CAP,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> InspectReport:
    """Inspect the checkpoint at ``path`` (a file, a folder or an index) for ``cap``
    (bytes, or a size string such as ``"4GB"`` or ``"fat32"``).

    The prediction is the plan ``split`` would make: the same planner, the same
    grouping and the same ``__metadata__`` (:func:`~safeshard.checkpoint.common_metadata`,
    what every shard of a split carries). Raises the reader's errors for a missing or
    malformed checkpoint; everything about the checkpoint's content (GPTQ problems,
    oversize tensors) is data. ``path`` may be a URL (:mod:`safeshard.io.store`): only the
    headers are read, two ranged reads each.
    """
    cap = parse_size(cap)
    ckpt = open_checkpoint(path, storage_options=storage_options)
    metadata, meta_warnings = common_metadata(ckpt)
    infos = {e.name: e.info for e in ckpt.entries.values()}
    specs = infos  # the planner sizes header entries as they are
    sizer = FileSizer(specs, metadata)

    files = tuple(
        FileReport(Path(h.path).name, h.file_size, len(h.tensors), h.data_start)
        for h in ckpt.headers
    )
    dtypes: dict[str, int] = {}
    for t in infos.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
    dtypes = dict(sorted(dtypes.items(), key=lambda kv: (-kv[1], kv[0])))

    groups = group_tensors(list(infos))
    families = _families(groups, infos)
    largest_block: SizedItem | None = None
    oversize_blocks: list[SizedItem] = []
    for g in groups:
        if g.kind != "block":
            continue
        item = SizedItem(g.key, sizer.nbytes(g.tensors), sizer.size(g.tensors))
        if largest_block is None or item.nbytes > largest_block.nbytes:
            largest_block = item
        if item.file_size > cap:
            oversize_blocks.append(item)
    outside = tuple(
        TensorReport.of(infos[n]) for g in groups if g.kind != "block" for n in g.tensors
    )
    largest_tensor: TensorReport | None = None
    for g in groups:  # ties go to the first in model order
        for n in g.tensors:
            if largest_tensor is None or infos[n].nbytes > largest_tensor.nbytes:
                largest_tensor = TensorReport.of(infos[n])

    solo = list(map(sizer.solo, specs))
    over = sorted(
        ((n, size) for n, size in zip(specs, solo, strict=True) if size > cap),
        key=lambda kv: (-kv[1], kv[0]),
    )
    oversize_tensors = tuple(SizedItem(n, specs[n].nbytes, size) for n, size in over)
    smallest_cap = max(solo, default=0)
    predicted: int | None
    shard_sizes: tuple[int, ...] = ()
    try:  # the plan split makes, sized without building its headers
        sizes = plan.shard_sizes(list(specs.values()), cap, metadata, groups=groups, sizer=sizer)
    except OversizeTensorError:
        predicted = None
    else:
        # no tensors at all: split writes one header-only file
        shard_sizes = sizes or (padded_header_size(sizer.empty_body),)
        predicted = len(shard_sizes)

    exceeds: list[str] = []
    warnings: list[str] = list(meta_warnings)
    fat = [f for f in files if f.size > FAT32_LIMIT]
    if fat:
        exceeds.append(LIMIT_FAT32)
        for f in fat:
            warnings.append(
                f"{f.name} is {f.size} bytes ({format_size(f.size)}), over FAT32's limit of "
                f"{FAT32_LIMIT} bytes (4 GiB - 1): it cannot be copied to a FAT32 drive; "
                "`safeshard split` with the default 4GB cap (or --max-shard-size fat32) "
                "makes files that fit"
            )
    if any(f.size > cap for f in files):
        exceeds.append(LIMIT_CAP)
    if oversize_tensors:
        worst = oversize_tensors[0]
        warnings.append(
            f"tensor {worst.name!r} alone needs a {worst.file_size}-byte file, over the cap of "
            f"{cap} bytes; no split can keep this cap: use a cap of at least {smallest_cap} "
            f"bytes ({format_size(smallest_cap)}) or split with --allow-oversize"
        )
    q = analyze(infos.values(), quant_configs(ckpt.folder), ckpt.metadata)
    units = stream_units(groups, infos, gptq=q is not None and q.settings.method == "gptq")
    largest_unit = max(units, key=lambda u: u[1], default=None)
    if q is not None and q.problems:
        warnings.append(f"GPTQ check: {len(q.problems)} problem(s), first: {q.problems[0].message}")
    return InspectReport(
        path=redact_url(path),
        index=ckpt.index.path.name if ckpt.index is not None else None,
        files=files,
        file_size=ckpt.file_size,
        tensor_count=len(infos),
        total_tensor_bytes=ckpt.total_tensor_bytes,
        dtypes=dtypes,
        block_families=tuple(families),
        largest_block=largest_block,
        largest_tensor=largest_tensor,
        outside_blocks=outside,
        quant=q,
        metadata=metadata,
        cap=cap,
        predicted_shards=predicted,
        predicted_shard_sizes=shard_sizes,
        smallest_cap=smallest_cap,
        oversize_tensors=oversize_tensors,
        oversize_blocks=tuple(oversize_blocks),
        exceeds=tuple(exceeds),
        warnings=tuple(warnings),
        stream_largest_unit=(
            SizedItem(largest_unit[0], largest_unit[1], largest_unit[1])
            if largest_unit is not None
            else None
        ),
        stream_no_read_budget=sum(n for _, n in units),
    )
