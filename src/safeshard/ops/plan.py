"""The shard planner: a pure function from tensor sizes to shards.

It reads no files. Given tensors (name, dtype, shape, byte count), the metadata
every shard carries, and a cap on the *whole file size* (8-byte length + header
JSON with padding + data), it returns shards whose exact headers are computed, so
the planned size is the size written. No shard's header exceeds the 100,000,000
bytes the official reader accepts, whatever the cap.

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

Cost: each tensor's header entry is measured once (:class:`FileSizer`); after that
a unit's size at any position is arithmetic on its totals, so packing is linear in
the number of units and ``balance`` adds a logarithmic factor.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from safeshard import gcpause
from safeshard.errors import OversizeTensorError, PlanError
from safeshard.format.blocks import Group, group_tensors
from safeshard.format.header import (
    MAX_HEADER_SIZE,
    TensorSpec,
    build_header,
    entry_fixed_len,
    metadata_len,
    padded_header_size,
)
from safeshard.format.header import (
    SizedTensor as Sized,
)
from safeshard.sizes import format_size


@dataclass(frozen=True)
class Unit:
    """Tensors that must land in the same shard, and the groups they belong to.

    ``fixed`` is the JSON their header entries take less the digits of the offsets.
    """

    tensors: tuple[Sized, ...]
    group: Group
    whole_group: bool
    nbytes: int = field(default=0, compare=False)
    fixed: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True)
class ShardPlan:
    """One planned file: its tensors in data order and its exact header bytes."""

    tensors: tuple[TensorSpec, ...]
    header: bytes
    groups: tuple[Group, ...]
    oversize: bool = False

    @functools.cached_property
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


# --------------------------------------------------------------------------- sizes


def _entries_len(
    parts: int, data: int, count: int, fixed: int, nbytes: int, sizes: Iterable[int]
) -> int:
    """JSON bytes that appending ``count`` tensors (``nbytes`` of data, entries ``fixed``
    bytes long without their offsets, each of ``sizes`` bytes) adds to a header with
    ``parts`` members whose data ends at ``data``. ``sizes`` is only iterated when an
    offset in between has more digits than the first (rare)."""
    if not count:
        return 0
    commas = count - (0 if parts else 1)
    digits = len(str(data))
    if digits == len(str(data + nbytes)):  # every offset in between has as many digits
        return fixed + commas + 2 * digits * count
    total = fixed + commas
    pos = data
    for size in sizes:
        nxt = pos + size
        total += len(str(pos)) + len(str(nxt))
        pos = nxt
    return total


class FileSizer:
    """Exact sizes of files holding some of ``specs`` with ``metadata``: what
    :func:`~safeshard.format.header.build_header` plus the data would make, without building it.

    Each tensor's header entry is measured once, here; every size after that is
    arithmetic on sums.
    """

    def __init__(self, specs: Mapping[str, Sized], metadata: Mapping[str, str] | None) -> None:
        self.specs = specs
        self.empty_body = 2 + metadata_len(metadata)
        """JSON bytes of a header with no tensors: ``{}`` and the metadata member."""
        self.empty_parts = 0 if metadata is None else 1
        self._fixed = {n: entry_fixed_len(t) for n, t in specs.items()}
        self._nbytes = {n: t.nbytes for n, t in specs.items()}

    def fixed(self, names: Sequence[str]) -> int:
        """Sum of the entry lengths of the tensors ``names``, less the digits of their offsets."""
        return sum(map(self._fixed.__getitem__, names))

    def nbytes(self, names: Sequence[str]) -> int:
        return sum(map(self._nbytes.__getitem__, names))

    def unit(self, names: Sequence[str], group: Group, whole: bool) -> Unit:
        return Unit(
            tuple(map(self.specs.__getitem__, names)),
            group,
            whole,
            self.nbytes(names),
            self.fixed(names),
        )

    def header_json(self, names: Sequence[str]) -> int:
        """Length of the header JSON (before padding) of a file holding ``names``."""
        sizes = map(self._nbytes.__getitem__, names)
        return self.empty_body + _entries_len(
            self.empty_parts, 0, len(names), self.fixed(names), self.nbytes(names), sizes
        )

    def size(self, names: Sequence[str]) -> int:
        """Size of a file holding the tensors ``names`` in this order, header included."""
        return padded_header_size(self.header_json(names)) + self.nbytes(names)

    def solo(self, name: str) -> int:
        """Size of a file holding the tensor ``name`` alone."""
        nbytes = self._nbytes[name]
        body = self.empty_body + self._fixed[name] + self.empty_parts + 1 + len(str(nbytes))
        return padded_header_size(body) + nbytes


class _Shard:
    """The running size of the shard being filled."""

    __slots__ = ("body", "data", "parts")

    def __init__(self, sizer: FileSizer) -> None:
        self.body, self.parts, self.data = sizer.empty_body, sizer.empty_parts, 0

    def after(self, u: Unit) -> tuple[int, int]:
        """(JSON length, file size) once ``u`` is appended."""
        sizes = (t.nbytes for t in u.tensors)
        body = self.body + _entries_len(
            self.parts, self.data, len(u.tensors), u.fixed, u.nbytes, sizes
        )
        return body, padded_header_size(body) + self.data + u.nbytes

    def add(self, u: Unit, body: int) -> None:
        self.body = body
        self.parts += len(u.tensors)
        self.data += u.nbytes


def solo_size(t: TensorSpec, metadata: Mapping[str, str] | None) -> int:
    """Size of a file holding only ``t``."""
    return FileSizer({t.name: t}, metadata).solo(t.name)


# --------------------------------------------------------------------------- units


def _fits(sizer: FileSizer, names: Sequence[str], cap: int, max_header: int) -> bool:
    if len(names) == 1:
        return True
    header = padded_header_size(sizer.header_json(names))
    return header + sizer.nbytes(names) <= cap and header - 8 <= max_header


def make_units(
    groups: Sequence[Group],
    cap: int,
    sizer: FileSizer,
    max_header: int = MAX_HEADER_SIZE,
) -> tuple[list[Unit], list[str]]:
    """Break groups into units that fit ``cap`` where they can; also return split group keys."""
    units: list[Unit] = []
    split: list[str] = []
    for g in groups:
        if _fits(sizer, g.tensors, cap, max_header):
            units.append(sizer.unit(g.tensors, g, True))
            continue
        split.append(g.key)
        for m in g.modules:
            if _fits(sizer, m.tensors, cap, max_header):
                units.append(sizer.unit(m.tensors, g, False))
            else:
                units.extend(sizer.unit((n,), g, False) for n in m.tensors)
    return units, split


def _pack(
    units: Sequence[Unit],
    cap: int,
    sizer: FileSizer,
    allow_oversize: bool,
    max_header: int = MAX_HEADER_SIZE,
) -> list[list[Unit]] | None:
    """Greedy packing; None when a unit cannot fit alone and oversize is not allowed."""
    shards: list[list[Unit]] = []
    cur: list[Unit] = []
    shard = _Shard(sizer)
    for u in units:
        if cur:
            body, size = shard.after(u)
            if size <= cap and padded_header_size(body) - 8 <= max_header:
                cur.append(u)
                shard.add(u, body)
                continue
            shards.append(cur)
            cur = []
            shard = _Shard(sizer)
        body, size = shard.after(u)
        if size > cap:
            if not allow_oversize:
                return None
            shards.append([u])
            continue
        cur = [u]
        shard.add(u, body)
    if cur:
        shards.append(cur)
    return shards


def _shard_plan(units: Sequence[Unit], metadata: Mapping[str, str] | None, cap: int) -> ShardPlan:
    # plan_shards plans TensorSpecs, so its units hold nothing else
    tensors = cast(tuple[TensorSpec, ...], tuple(t for u in units for t in u.tensors))
    groups: list[Group] = []
    for u in units:
        if not groups or groups[-1].key != u.group.key:
            groups.append(u.group)
    header = build_header(tensors, metadata)
    size = len(header) + sum(t.nbytes for t in tensors)
    return ShardPlan(tensors=tensors, header=header, groups=tuple(groups), oversize=size > cap)


@dataclass(frozen=True)
class _Packing:
    """What plan_shards decided, before any header is built."""

    shards: list[list[Unit]]
    warnings: tuple[str, ...]
    split_groups: tuple[str, ...]
    sizer: FileSizer


def _packing(
    tensors: Sequence[Sized],
    cap: int,
    metadata: Mapping[str, str] | None,
    balance: bool,
    allow_oversize: bool,
    groups: Sequence[Group] | None,
    sizer: FileSizer | None,
    max_header: int,
) -> _Packing:
    if cap <= 0:
        raise PlanError(f"cap must be positive, got {cap}")
    specs = {t.name: t for t in tensors}
    if len(specs) != len(tensors):
        raise PlanError("tensor names must be unique")
    if groups is None:
        groups = group_tensors(list(specs))
    if sizer is None:
        sizer = FileSizer(specs, metadata)
    units, split = make_units(groups, cap, sizer, max_header)
    oversize = [
        (u.tensors[0], need)
        for u in units
        if len(u.tensors) == 1 and (need := sizer.solo(u.tensors[0].name)) > cap
    ]
    warnings: list[str] = []
    if oversize and not allow_oversize:
        t, need = max(oversize, key=lambda x: x[1])
        raise OversizeTensorError(
            f"tensor {t.name!r} ({t.dtype}{list(t.shape)}, {format_size(t.nbytes)}) needs a "
            f"file of {need} bytes, over the cap of {cap} bytes; the smallest cap that works "
            f"is {need} bytes ({format_size(need)}), or pass --allow-oversize to put "
            "such tensors alone in oversized shards"
        )
    for t, need in oversize:
        warnings.append(
            f"tensor {t.name!r} alone needs {need} bytes, over the cap of {cap}: "
            "it gets an oversized shard of its own"
        )
    packed = _pack(units, cap, sizer, allow_oversize, max_header)
    if packed is None:  # a unit over the cap that the check above let through
        raise PlanError(
            f"a group of tensors does not fit a file of {cap} bytes ({format_size(cap)}) on "
            "its own; choose a larger cap, or pass --allow-oversize"
        )
    if balance and len(packed) > 1 and not oversize:
        packed = _balance(units, packed, sizer, max_header)
    return _Packing(packed, tuple(warnings), tuple(split), sizer)


@gcpause.pausing
def plan_shards(
    tensors: Sequence[TensorSpec],
    cap: int,
    metadata: Mapping[str, str] | None = None,
    *,
    balance: bool = False,
    allow_oversize: bool = False,
    groups: Sequence[Group] | None = None,
    sizer: FileSizer | None = None,
    max_header: int = MAX_HEADER_SIZE,
) -> Plan:
    """Plan shards of at most ``cap`` bytes each (whole files) for ``tensors``.

    ``groups`` (``group_tensors`` of the names) and ``sizer`` (a :class:`FileSizer`
    for ``tensors`` and ``metadata``) may be passed by a caller that already has them.
    ``max_header`` bounds each shard's header JSON (the official reader's limit).
    """
    p = _packing(tensors, cap, metadata, balance, allow_oversize, groups, sizer, max_header)
    return Plan(
        shards=tuple(_shard_plan(s, metadata, cap) for s in p.shards),
        cap=cap,
        metadata=dict(metadata) if metadata is not None else None,
        warnings=p.warnings,
        split_groups=p.split_groups,
    )


@gcpause.pausing
def shard_sizes(
    tensors: Sequence[Sized],
    cap: int,
    metadata: Mapping[str, str] | None = None,
    *,
    balance: bool = False,
    allow_oversize: bool = False,
    groups: Sequence[Group] | None = None,
    sizer: FileSizer | None = None,
    max_header: int = MAX_HEADER_SIZE,
) -> tuple[int, ...]:
    """``tuple(s.file_size for s in plan_shards(...).shards)`` with the same arguments,
    and the same errors, without building the headers: the same packing, with each
    file's size counted instead of written (what ``inspect`` needs)."""
    p = _packing(tensors, cap, metadata, balance, allow_oversize, groups, sizer, max_header)
    return tuple(p.sizer.size([t.name for u in s for t in u.tensors]) for s in p.shards)


def _balance(
    units: Sequence[Unit],
    greedy: list[list[Unit]],
    sizer: FileSizer,
    max_header: int,
) -> list[list[Unit]]:
    """Smallest largest-shard size that still packs into ``len(greedy)`` shards."""
    n = len(greedy)
    lo = max(sizer.size([t.name for t in u.tensors]) for u in units)
    hi = max(sizer.size([t.name for u in s for t in u.tensors]) for s in greedy)
    best = greedy
    while lo < hi:
        mid = (lo + hi) // 2
        trial = _pack(units, mid, sizer, False, max_header)
        if trial is not None and len(trial) <= n:
            best, hi = trial, mid
        else:
            lo = mid + 1
    final = _pack(units, hi, sizer, False, max_header)
    if final is not None and len(final) <= n:
        best = final
    return best
