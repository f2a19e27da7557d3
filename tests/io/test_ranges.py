"""safeshard.io.ranges: the one range coalescer (properties, and the reads of the three
coalescers it replaced, kept here as references)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeshard.io.ranges import Run, coalesce
from safeshard.tpplan import coalesce as tp_coalesce


def _ranges(draw: st.DrawFn, disjoint: bool) -> list[tuple[int, int]]:
    sizes = draw(st.lists(st.integers(0, 40), max_size=25))
    out: list[tuple[int, int]] = []
    pos = 0
    for n in sizes:
        if disjoint:
            pos += draw(st.integers(0, 30))
        else:
            pos = draw(st.integers(0, 300))
        out.append((pos, n))
        if disjoint:
            pos += n
    return out


@st.composite
def any_ranges(draw: st.DrawFn) -> list[tuple[int, int]]:
    return _ranges(draw, disjoint=draw(st.booleans()))


@st.composite
def sorted_disjoint(draw: st.DrawFn) -> list[tuple[int, int]]:
    return [r for r in _ranges(draw, disjoint=True) if r[1] > 0]


limits = st.one_of(st.none(), st.integers(1, 64))


@settings(max_examples=400, deadline=None)
@given(
    ranges=any_ranges(),
    gap=st.integers(0, 40),
    allowance=st.one_of(st.none(), st.integers(-5, 100)),
    max_run=limits,
    max_parts=st.one_of(st.none(), st.integers(1, 6)),
    nstreams=st.integers(1, 3),
    seed=st.randoms(use_true_random=False),
)
def test_properties(
    ranges: list[tuple[int, int]],
    gap: int,
    allowance: int | None,
    max_run: int | None,
    max_parts: int | None,
    nstreams: int,
    seed: object,
) -> None:
    pool = [object() for _ in range(nstreams)]
    streams = [seed.choice(pool) for _ in ranges]  # type: ignore[attr-defined]
    runs = coalesce(
        ranges,
        gap=gap,
        allowance=allowance,
        max_run=max_run,
        max_parts=max_parts,
        streams=streams,
    )
    # order kept: the parts, run after run, are the input's bytes in input order
    flat = [p for r in runs for p in r.parts]
    assert [i for i, _, _ in flat] == sorted(i for i, _, _ in flat)
    # every input byte covered, exactly once
    covered: dict[int, int] = {}
    for i, start, n in flat:
        assert n > 0 and start == covered.get(i, 0)
        covered[i] = start + n
    assert covered == {i: n for i, (_, n) in enumerate(ranges) if n > 0}
    read_through = 0
    for r in runs:
        assert r.parts and r.offset == ranges[r.parts[0][0]][0] + r.parts[0][1]
        # within limits
        if max_run is not None:
            assert r.length <= max_run
        if max_parts is not None:
            assert len(r.parts) <= max_parts
        assert len({id(streams[i]) for i, _, _ in r.parts}) == 1
        # parts go forward, each gap at most ``gap``; the run ends with its last part
        pos = r.offset
        for i, start, n in r.parts:
            at = ranges[i][0] + start
            assert 0 <= at - pos <= gap
            read_through += at - pos
            pos = at + n
        assert pos == r.end
    if allowance is not None:
        assert read_through <= max(allowance, 0)


@settings(max_examples=300, deadline=None)
@given(ranges=sorted_disjoint(), gap=st.integers(0, 40))
def test_contiguous_ranges_without_limits_make_one_run_per_stretch(
    ranges: list[tuple[int, int]], gap: int
) -> None:
    runs = coalesce(ranges, gap=gap)
    # a run breaks exactly where a gap is wider than ``gap``
    breaks = sum(1 for a, b in itertools.pairwise(ranges) if b[0] - (a[0] + a[1]) > gap)
    assert len(runs) == (breaks + 1 if ranges else 0)


def test_examples() -> None:
    assert coalesce([]) == []
    assert coalesce([(0, 4), (4, 4), (10, 2)]) == [
        Run(0, 8, [(0, 0, 4), (1, 0, 4)]),
        Run(10, 2, [(2, 0, 2)]),
    ]
    # a long range is cut; its rest starts the next run
    assert coalesce([(0, 10), (10, 3)], max_run=4) == [
        Run(0, 4, [(0, 0, 4)]),
        Run(4, 4, [(0, 4, 4)]),
        Run(8, 4, [(0, 8, 2), (1, 0, 2)]),
        Run(12, 1, [(1, 2, 1)]),
    ]
    # the smallest gaps are read through first, within the allowance
    runs = coalesce([(0, 1), (4, 1), (6, 1), (8, 1)], gap=5, allowance=2)
    assert [(r.offset, r.length) for r in runs] == [(0, 1), (4, 5)]
    # empty ranges neither take a part nor separate their neighbours
    assert coalesce([(0, 2), (50, 0), (2, 2)]) == [Run(0, 4, [(0, 0, 2), (2, 0, 2)])]
    # an overlap is never joined
    assert len(coalesce([(0, 4), (2, 4)], gap=10)) == 2
    with pytest.raises(ValueError, match="max_run"):
        coalesce([(0, 1)], max_run=0)
    with pytest.raises(ValueError, match="max_parts"):
        coalesce([(0, 1)], max_parts=0)
    with pytest.raises(ValueError, match="streams"):
        coalesce([(0, 1)], streams=[])


# --------------------------------------------------------------------------- references
# The coalescers the one above replaced, as they were: the same inputs must give the same
# reads.


def old_contiguous(
    ranges: Sequence[tuple[int, int]],
    streams: Sequence[object],
    limit: int,
    max_parts: int | None,
) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """copier.plan_runs and load.plan_jobs (after its sort): contiguous pieces of one
    source, at most ``limit`` bytes and ``max_parts`` parts a run."""
    runs: list[tuple[object, Run]] = []
    cur: tuple[object, Run] | None = None
    for i, (off, n) in enumerate(ranges):
        pos = 0
        while pos < n:
            if (
                cur is None
                or cur[0] is not streams[i]
                or cur[1].offset + cur[1].length != off + pos
                or cur[1].length >= limit
                or (max_parts is not None and len(cur[1].parts) >= max_parts)
            ):
                cur = (streams[i], Run(off + pos))
                runs.append(cur)
            take = min(n - pos, limit - cur[1].length)
            cur[1].parts.append((i, pos, take))
            cur[1].length += take
            pos += take
    return [(r.offset, r.length, r.parts) for _, r in runs]


def old_tp(
    ranges: Sequence[tuple[int, int]], gap: int, overread: float
) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """tp.coalesce as it was."""
    if not ranges:
        return []
    useful = sum(n for _, n in ranges)
    allowance = int((overread - 1.0) * useful)
    gaps = [(ranges[i + 1][0] - (ranges[i][0] + ranges[i][1]), i) for i in range(len(ranges) - 1)]
    bridge = [False] * len(gaps)
    for g, i in sorted(gaps):
        if g > gap or g > allowance:
            break
        allowance -= g
        bridge[i] = True
    reads: list[tuple[int, int, list[tuple[int, int]]]] = []
    cur_off, cur_pieces = ranges[0][0], [ranges[0]]
    for i in range(1, len(ranges)):
        if bridge[i - 1]:
            cur_pieces.append(ranges[i])
        else:
            last = cur_pieces[-1]
            reads.append((cur_off, last[0] + last[1] - cur_off, cur_pieces))
            cur_off, cur_pieces = ranges[i][0], [ranges[i]]
    last = cur_pieces[-1]
    reads.append((cur_off, last[0] + last[1] - cur_off, cur_pieces))
    return reads


@settings(max_examples=400, deadline=None)
@given(
    ranges=any_ranges(),
    limit=st.integers(1, 64),
    max_parts=st.one_of(st.none(), st.integers(1, 6)),
    nstreams=st.integers(1, 3),
    seed=st.randoms(use_true_random=False),
)
def test_same_runs_as_the_contiguous_planners(
    ranges: list[tuple[int, int]],
    limit: int,
    max_parts: int | None,
    nstreams: int,
    seed: object,
) -> None:
    pool = [object() for _ in range(nstreams)]
    streams = [seed.choice(pool) for _ in ranges]  # type: ignore[attr-defined]
    new = coalesce(ranges, max_run=limit, max_parts=max_parts, streams=streams)
    assert [(r.offset, r.length, r.parts) for r in new] == old_contiguous(
        ranges, streams, limit, max_parts
    )


@settings(max_examples=400, deadline=None)
@given(
    ranges=sorted_disjoint(),
    gap=st.integers(0, 40),
    overread=st.sampled_from([0.5, 1.0, 1.25, 2.0, 5.0]),
)
def test_same_reads_as_the_tp_coalescer(
    ranges: list[tuple[int, int]], gap: int, overread: float
) -> None:
    assert tp_coalesce(ranges, gap=gap, overread=overread) == old_tp(ranges, gap, overread)
