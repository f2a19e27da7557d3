"""The parts of a multipart upload copied on the server (issue 18.1): a pure planner over
sizes. Properties: the parts' bytes are the file's bytes in order, every part but the last
holds at least S3's 5 MiB, and sent parts stay within ``send_bytes`` unless the header
alone is larger."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeshard.errors import UsageError
from safeshard.io.parts import MIN_PART, CopyPart, Run, SendPart, plan_parts

MIB = 1024 * 1024


def _bytes_of(parts: list[CopyPart | SendPart], header: int) -> list[tuple[int, int, int]]:
    """The file as (source, start, stop) pieces, the header as source -1, joined."""
    out: list[tuple[int, int, int]] = []

    def add(src: int, a: int, b: int) -> None:
        if a == b:
            return
        if out and out[-1][0] == src and out[-1][2] == a:
            out[-1] = (src, out[-1][1], b)
        else:
            out.append((src, a, b))

    at_header = 0
    for p in parts:
        if isinstance(p, SendPart):
            add(-1, at_header, at_header + p.header)
            at_header += p.header
            for r in p.runs:
                add(r.source, r.start, r.stop)
        else:
            add(p.run.source, p.run.start, p.run.stop)
    assert at_header in (0, header)
    return out


def _joined(header: int, runs: list[Run]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = [(-1, 0, header)] if header else []
    for r in runs:
        if r.nbytes == 0:
            continue
        if out and out[-1][0] == r.source and out[-1][2] == r.start:
            out[-1] = (r.source, out[-1][1], r.stop)
        else:
            out.append((r.source, r.start, r.stop))
    return out


def test_a_header_then_one_big_run() -> None:
    parts = plan_parts(1000, [Run(0, 0, 40 * MIB)], send_bytes=8 * MIB, copy_bytes=16 * MIB)
    first = 8 * MIB - 1000
    assert parts == [
        SendPart(1000, (Run(0, 0, first),)),
        CopyPart(Run(0, first, first + 16 * MIB)),
        CopyPart(Run(0, first + 16 * MIB, first + 32 * MIB)),
        CopyPart(Run(0, first + 32 * MIB, 40 * MIB)),
    ]


def test_small_runs_between_big_ones_are_sent_with_their_neighbours() -> None:
    runs = [Run(0, 0, 20 * MIB), Run(1, 0, MIB), Run(0, 30 * MIB, 50 * MIB)]
    parts = plan_parts(100, runs, send_bytes=8 * MIB, copy_bytes=64 * MIB)
    head = 8 * MIB - 100
    assert parts == [
        SendPart(100, (Run(0, 0, head),)),
        CopyPart(Run(0, head, 20 * MIB)),
        SendPart(0, (Run(1, 0, MIB), Run(0, 30 * MIB, 37 * MIB))),
        CopyPart(Run(0, 37 * MIB, 50 * MIB)),
    ]


def test_a_header_alone_is_one_sent_part() -> None:
    assert plan_parts(50, [], send_bytes=MIN_PART, copy_bytes=MIN_PART) == [SendPart(50, ())]


def test_a_small_last_run_is_the_small_last_part() -> None:
    parts = plan_parts(
        10,
        [Run(0, 0, 12 * MIB), Run(0, 20 * MIB, 21 * MIB)],
        send_bytes=MIN_PART,
        copy_bytes=MIN_PART,
    )
    tail = 12 * MIB - (MIN_PART - 10) - MIN_PART  # under the floor: sent with the last run
    assert parts[-1] == SendPart(0, (Run(0, 12 * MIB - tail, 12 * MIB), Run(0, 20 * MIB, 21 * MIB)))
    assert all(p.nbytes >= MIN_PART for p in parts[:-1])


@pytest.mark.parametrize(("send", "copy"), [(MIN_PART - 1, MIN_PART), (MIN_PART, 0)])
def test_parts_below_the_floor_are_refused(send: int, copy: int) -> None:
    with pytest.raises(UsageError, match="at least"):
        plan_parts(0, [Run(0, 0, 1)], send_bytes=send, copy_bytes=copy)


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[int, list[Run], int, int]:
    header = draw(st.integers(0, 3 * MIB))
    runs = []
    for _ in range(draw(st.integers(0, 8))):
        src = draw(st.integers(0, 2))
        start = draw(st.integers(0, 100 * MIB))
        size = draw(st.one_of(st.integers(0, 2 * MIB), st.integers(0, 80 * MIB)))
        runs.append(Run(src, start, start + size))
    send = draw(st.integers(MIN_PART, 16 * MIB))
    copy = draw(st.integers(MIN_PART, 64 * MIB))
    return header, runs, send, copy


@settings(max_examples=400, deadline=None)
@given(_layouts())
def test_parts_are_the_file_in_order_and_big_enough(
    layout: tuple[int, list[Run], int, int],
) -> None:
    header, runs, send, copy = layout
    parts = plan_parts(header, runs, send_bytes=send, copy_bytes=copy)
    assert _bytes_of(parts, header) == _joined(header, runs)
    assert sum(p.nbytes for p in parts) == header + sum(r.nbytes for r in runs)
    assert all(p.nbytes > 0 for p in parts)
    assert all(p.nbytes >= MIN_PART for p in parts[:-1])
    for p in parts:
        if isinstance(p, CopyPart):
            assert p.nbytes <= copy
        elif p.header == 0:
            assert p.nbytes <= send
        else:
            assert p.nbytes <= max(send, header)
    assert sum(1 for p in parts if isinstance(p, SendPart) and p.header) == (header > 0)
