"""The shard planner: a pure function from tensor sizes to shards.

It reads no files. Given tensors (name, dtype, shape, byte count), the metadata
every shard carries, and a cap on the *whole file size* (8-byte length + header
JSON with padding + data), it returns shards whose exact headers are computed, so
the planned size is the size written.

Packing is greedy in model order over *units*:

- a whole block (``model.layers.N``) when it fits in one file;
- otherwise each of its modules (a GPTQ module's qweight/qzeros/scales/g_idx/bias
  stay together) when the module fits;
- otherwise each tensor of the module;
- each tensor outside the blocks is a unit of its own.

A unit that does not fit in the current shard starts the next one. A tensor that
alone exceeds the cap is an :class:`OversizeTensorError`, or, with
``allow_oversize``, goes alone into a shard of its own with a warning.

``balance`` keeps the greedy shard count but minimises the largest shard, by
binary search on the cap over the same units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import OversizeTensorError, PlanError
from .header import HeaderSizer, TensorSpec, build_header
from .layout import Group, group_tensors
from .sizes import format_size


@dataclass(frozen=True)
class Unit:
    """Tensors that must land in the same shard, and the groups they belong to."""

    tensors: tuple[TensorSpec, ...]
    group: Group
    whole_group: bool

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ShardPlan:
    """One planned file: its tensors in data order and its exact header bytes."""

    tensors: tuple[TensorSpec, ...]
    header: bytes
    groups: tuple[Group, ...]
    oversize: bool = False

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size


@dataclass(frozen=True)
class Plan:
    """A whole plan: shards in order, the cap it was made for, and any warnings."""

    shards: tuple[ShardPlan, ...]
    cap: int
    metadata: dict[str, str] | None
    warnings: tuple[str, ...] = ()
    split_groups: tuple[str, ...] = field(default=())

    @property
    def total_size(self) -> int:
        """Sum of tensor data bytes (the index's ``total_size``)."""
        return sum(s.data_size for s in self.shards)

    @property
    def largest(self) -> int:
        return max((s.file_size for s in self.shards), default=0)

    def weight_map(self, names: Sequence[str]) -> dict[str, str]:
        """Tensor → file name, given the file names of the shards in order."""
        out: dict[str, str] = {}
        for shard, fname in zip(self.shards, names, strict=True):
            for t in shard.tensors:
                out[t.name] = fname
        return out


def solo_size(t: TensorSpec, metadata: Mapping[str, str] | None) -> int:
    """Size of a file holding only ``t``."""
    return len(build_header([t], metadata)) + t.nbytes


def _file_size(tensors: Sequence[TensorSpec], empty: HeaderSizer) -> int:
    """Size of a file holding ``tensors``; ``empty`` is a sizer with only the metadata."""
    sizer = empty.copy()
    for t in tensors:
        sizer.add(t)
    return sizer.file_size


def make_units(
    specs: Mapping[str, TensorSpec],
    groups: Sequence[Group],
    cap: int,
    metadata: Mapping[str, str] | None,
) -> tuple[list[Unit], list[str]]:
    """Break groups into units that fit ``cap`` where they can; also return split group keys."""
    units: list[Unit] = []
    split: list[str] = []
    empty = HeaderSizer(metadata)
    for g in groups:
        whole = tuple(specs[n] for n in g.tensors)
        if len(whole) == 1 or _file_size(whole, empty) <= cap:
            units.append(Unit(whole, g, True))
            continue
        split.append(g.key)
        for m in g.modules:
            mod = tuple(specs[n] for n in m.tensors)
            if len(mod) == 1 or _file_size(mod, empty) <= cap:
                units.append(Unit(mod, g, False))
            else:
                units.extend(Unit((t,), g, False) for t in mod)
    return units, split


def _pack(
    units: Sequence[Unit],
    cap: int,
    metadata: Mapping[str, str] | None,
    allow_oversize: bool,
) -> list[list[Unit]] | None:
    """Greedy packing; None when a unit cannot fit alone and oversize is not allowed."""
    shards: list[list[Unit]] = []
    cur: list[Unit] = []
    empty = HeaderSizer(metadata)
    sizer = empty.copy()
    for u in units:
        if cur:
            trial = sizer.copy()
            for t in u.tensors:
                trial.add(t)
            if trial.file_size <= cap:
                cur.append(u)
                sizer = trial
                continue
            shards.append(cur)
            cur = []
        sizer = empty.copy()
        for t in u.tensors:
            sizer.add(t)
        if sizer.file_size > cap:
            if not allow_oversize:
                return None
            shards.append([u])
            sizer = empty.copy()
            continue
        cur = [u]
    if cur:
        shards.append(cur)
    return shards


def _shard_plan(units: Sequence[Unit], metadata: Mapping[str, str] | None, cap: int) -> ShardPlan:
    tensors = tuple(t for u in units for t in u.tensors)
    groups: list[Group] = []
    for u in units:
        if not groups or groups[-1].key != u.group.key:
            groups.append(u.group)
    header = build_header(tensors, metadata)
    size = len(header) + sum(t.nbytes for t in tensors)
    return ShardPlan(tensors=tensors, header=header, groups=tuple(groups), oversize=size > cap)


def plan_shards(
    tensors: Sequence[TensorSpec],
    cap: int,
    metadata: Mapping[str, str] | None = None,
    *,
    balance: bool = False,
    allow_oversize: bool = False,
) -> Plan:
    """Plan shards of at most ``cap`` bytes each (whole files) for ``tensors``."""
    if cap <= 0:
        raise PlanError(f"cap must be positive, got {cap}")
    specs = {t.name: t for t in tensors}
    if len(specs) != len(tensors):
        raise PlanError("tensor names must be unique")
    groups = group_tensors(list(specs))
    units, split = make_units(specs, groups, cap, metadata)
    empty = HeaderSizer(metadata)
    solos = [(u.tensors[0], _file_size(u.tensors, empty)) for u in units if len(u.tensors) == 1]
    oversize = [(t, need) for t, need in solos if need > cap]
    warnings: list[str] = []
    if oversize and not allow_oversize:
        t, need = max(oversize, key=lambda x: x[1])
        smallest = max(need for _, need in oversize)
        raise OversizeTensorError(
            f"tensor {t.name!r} ({t.dtype}{list(t.shape)}, {format_size(t.nbytes)}) needs a "
            f"file of {need} bytes, over the cap of {cap} bytes; the smallest cap that works "
            f"is {smallest} bytes ({format_size(smallest)}), or pass --allow-oversize to put "
            "such tensors alone in oversized shards"
        )
    for t, need in oversize:
        warnings.append(
            f"tensor {t.name!r} alone needs {need} bytes, over the cap of {cap}: "
            "it gets an oversized shard of its own"
        )
    packed = _pack(units, cap, metadata, allow_oversize)
    assert packed is not None
    if balance and len(packed) > 1 and not oversize:
        packed = _balance(units, packed, cap, metadata)
    shards = tuple(_shard_plan(s, metadata, cap) for s in packed)
    return Plan(
        shards=shards,
        cap=cap,
        metadata=dict(metadata) if metadata is not None else None,
        warnings=tuple(warnings),
        split_groups=tuple(split),
    )


def _balance(
    units: Sequence[Unit],
    greedy: list[list[Unit]],
    cap: int,
    metadata: Mapping[str, str] | None,
) -> list[list[Unit]]:
    """Smallest largest-shard size that still packs into ``len(greedy)`` shards."""
    n = len(greedy)
    empty = HeaderSizer(metadata)
    lo = max(_file_size(u.tensors, empty) for u in units)
    hi = max(_file_size([t for u in s for t in u.tensors], empty) for s in greedy)
    best = greedy
    while lo < hi:
        mid = (lo + hi) // 2
        trial = _pack(units, mid, metadata, False)
        if trial is not None and len(trial) <= n:
            best, hi = trial, mid
        else:
            lo = mid + 1
    final = _pack(units, hi, metadata, False)
    if final is not None and len(final) <= n:
        best = final
    return best
