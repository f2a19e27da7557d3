"""scan: one pass per file gives the same hashes, differences and captures as slicing."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeshard.io.scan as scan_mod
from safeshard.io.scan import FileTask, Range, scan


def first_diff(a: bytes, b: bytes) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return i
    return None


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(min_size=0, max_size=300),
    cuts=st.lists(st.integers(0, 300), max_size=8),
    flips=st.lists(st.integers(0, 299), max_size=3),
    chunk=st.integers(1, 64),
    whole=st.booleans(),
)
def test_matches_direct_computation(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    data: bytes,
    cuts: list[int],
    flips: list[int],
    chunk: int,
    whole: bool,
) -> None:
    monkeypatch.setattr(scan_mod, "CHUNK", chunk)  # exercise ranges across chunk edges
    tmp = tmp_path_factory.mktemp("scan")
    other = bytearray(data)
    for f in flips:
        if f < len(other):
            other[f] ^= 0xFF
    a, b = tmp / "a", tmp / "b"
    a.write_bytes(data)
    b.write_bytes(b"PAD" + bytes(other))
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    ranges = [
        Range(f"t{i}", lo, hi - lo, digest=True, against=(str(b), lo + 3), capture=True)
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
    ]
    (res,) = scan([FileTask(str(a), tuple(ranges), whole=whole, size=len(data))])
    assert res.error is None
    assert res.sha256 == (hashlib.sha256(data).hexdigest() if whole else None)
    for r in ranges:
        mine, theirs = data[r.offset : r.end], bytes(other[r.offset : r.end])
        assert res.hashes[r.name] == xxhash.xxh3_128(mine).hexdigest()
        assert res.captured[r.name] == mine
        assert res.differs.get(r.name) == first_diff(mine, theirs)
    read_own = len(data) if whole else sum(r.nbytes for r in ranges)
    compared = sum(
        r.nbytes if r.name not in res.differs else 0 for r in ranges
    )  # a differing range stops being read
    assert read_own + compared <= res.bytes_read <= read_own + sum(r.nbytes for r in ranges)


def test_reads_only_the_ranges_when_not_whole(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * 100)
    (res,) = scan([FileTask(str(p), (Range("x", 1000, 10, digest=True),), size=25600)])
    assert res.bytes_read == 10
    assert res.hashes["x"] == xxhash.xxh3_128(p.read_bytes()[1000:1010]).hexdigest()


def test_short_file_is_an_error_not_an_exception(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    (res,) = scan([FileTask(str(p), (Range("x", 0, 10, digest=True),))])
    assert res.error is not None and "ended at byte 3" in res.error
    (res,) = scan([FileTask(str(tmp_path / "missing"), whole=True)])
    assert res.error is not None and res.error.startswith("cannot open")


def test_compared_file_shorter_counts_as_difference(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"abcdef")
    b.write_bytes(b"abc")
    (res,) = scan([FileTask(str(a), (Range("x", 0, 6, against=(str(b), 0)),))])
    assert res.differs == {"x": 3}


def test_many_tasks_in_parallel_keep_order(tmp_path: Path) -> None:
    tasks = []
    for i in range(7):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * (1000 * (i + 1)))
        tasks.append(FileTask(str(p), whole=True, size=1000 * (i + 1)))
    results = scan(tasks, workers=3)
    for i, r in enumerate(results):
        assert r.sha256 == hashlib.sha256(bytes([i]) * (1000 * (i + 1))).hexdigest()
