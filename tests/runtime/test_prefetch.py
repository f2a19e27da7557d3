"""safeshard.prefetch: learned cyclic prefetch, the resident subset, the budget; no torch."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeshard.errors import BudgetError, CheckpointClosedError
from safeshard.runtime.membudget import AutoBudget, MemoryReading
from safeshard.runtime.prefetch import Engine, Unit
from safeshard.runtime.residency import Residency


class Rig:
    """An engine over fake units of the given sizes; records loads and the holdings seen."""

    def __init__(
        self,
        sizes: Sequence[int],
        budget: int | None,
        *,
        prefetch: int = 1,
        pinned: Sequence[int] = (),
        delay: float = 0.0,
        fail: str = "",
        auto: AutoBudget | None = None,
    ) -> None:
        self.units = [Unit(f"u{i}", n, i, pinned=i in pinned) for i, n in enumerate(sizes)]
        self.res = Residency(budget, label="rig")
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.seen: list[int] = []
        self.delay = delay
        self.fail = fail
        self.lock = threading.Lock()
        self.engine = Engine(
            self.units, self.res, self.load, self.unload, prefetch=prefetch, auto=auto, label="rig"
        )
        self.engine.trace = []

    def load(self, u: Unit) -> str:
        if self.delay:
            time.sleep(self.delay)
        if u.key == self.fail:
            raise OSError(5, "I/O error")
        with self.lock:
            self.loads.append(u.key)
            self.seen.append(self.res.resident_bytes)
        return f"value of {u.key}"

    def unload(self, u: Unit, value: object) -> None:
        self.unloads.append(u.key)

    def run(self, order: Sequence[int], hold: float = 0.0) -> None:
        """One pass using the units in ``order``, each for ``hold`` seconds."""
        e = self.engine
        e.begin_pass()
        for i in order:
            key = f"u{i}"
            assert e.acquire(key) == f"value of {key}"
            self.seen.append(self.res.resident_bytes)
            if hold:
                time.sleep(hold)
            e.release(key)
        e.end_pass()

    def events(self, kind: str) -> list[str]:
        assert self.engine.trace is not None
        return [k for ev, k in self.engine.trace if ev == kind]


def wait_for(cond: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.002)
    return False


def test_reader_loads_the_next_unit_while_one_is_in_use() -> None:
    rig = Rig([10] * 5, budget=25, delay=0.001)
    e = rig.engine
    e.begin_pass()
    for i in range(5):
        e.acquire(f"u{i}")
        if i < 4:  # block k+1 is read before block k is released
            assert wait_for(lambda i=i: f"u{i + 1}" in rig.loads), rig.engine.trace
        e.release(f"u{i}")
    e.end_pass()
    assert max(rig.seen) <= 25
    assert rig.engine.stats.inline_loads == 1  # only the very first unit


def test_the_learned_order_is_replayed_across_passes() -> None:
    rig = Rig([10] * 4, budget=25, delay=0.001)
    order = [2, 0, 3, 1]  # not model order
    rig.run(order)  # predicted in model order: mostly missed, read inline
    assert rig.engine.schedule == order
    # between passes, the reader reads the first unit of the next pass
    assert wait_for(lambda: "u2" in rig.res), rig.engine.trace
    inline = len(rig.events("load-inline"))
    e = rig.engine
    e.begin_pass()
    for n, i in enumerate(order):
        e.acquire(f"u{i}")
        nxt = order[(n + 1) % len(order)]  # for the last unit: the first of the next pass
        assert wait_for(lambda nxt=nxt: f"u{nxt}" in rig.events("load-done")[-1:]), e.trace
        e.release(f"u{i}")
    e.end_pass()
    # the second pass read nothing inline: every unit was read ahead
    assert len(rig.events("load-inline")) == inline
    assert max(rig.seen) <= 25


def test_a_stable_subset_stays_resident_and_the_rest_is_read_each_pass() -> None:
    rig = Rig([10] * 10, budget=50, prefetch=1)
    # window: 2 units of 10; resident: 3 units, the last ones (their run time covers the
    # reads of the next pass)
    assert rig.engine.keep == {"u7", "u8", "u9"}
    rig.run(range(10))
    assert wait_for(lambda: "u0" in rig.res)  # read ahead for the next pass
    first = len(rig.loads)
    for _ in range(3):
        rig.run(range(10))
    assert wait_for(lambda: "u0" in rig.res)
    per_pass = (len(rig.loads) - first) / 3
    assert per_pass == 7  # model (10 units) minus resident (3)
    assert max(rig.seen) <= 50
    assert rig.res.peak_bytes <= 50


def test_largest_units_are_kept_first() -> None:
    rig = Rig([5, 40, 10, 10, 10, 30], budget=80, prefetch=1)
    # window = 2 largest streamed; keeping u1 (40): 40 + (30 + 10) = 80 fits
    assert rig.engine.keep == {"u1"}
    rig2 = Rig([5, 40, 10, 10, 10, 30], budget=None)
    assert rig2.engine.keep == {f"u{i}" for i in range(6)}


def test_a_use_the_prediction_missed_is_read_on_the_spot() -> None:
    rig = Rig([10] * 6, budget=30)
    rig.run(range(6))
    rig.run([5, 3, 1, 0, 2, 4])  # all different from the learned order: no deadlock
    rig.run([5, 3, 1, 0, 2, 4])  # now learned
    assert max(rig.seen) <= 30
    assert rig.engine.schedule == [5, 3, 1, 0, 2, 4]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    extra=st.integers(0, 60),
    prefetch=st.integers(0, 3),
    passes=st.lists(st.permutations(range(8)), min_size=1, max_size=3),
)
def test_holdings_never_exceed_the_budget(
    sizes: list[int], extra: int, prefetch: int, passes: list[list[int]]
) -> None:
    budget = max(sizes) + extra
    rig = Rig(sizes, budget=budget, prefetch=prefetch)
    try:
        for order in passes:
            rig.run([i for i in order if i < len(sizes)])
    finally:
        rig.engine.close()
    assert max(rig.seen, default=0) <= budget
    assert rig.res.peak_bytes <= budget


def test_a_unit_larger_than_the_budget_is_refused_up_front() -> None:
    rig = Rig([10, 30, 10], budget=25)
    with pytest.raises(BudgetError, match=r"'u1' holds 30 bytes .* at least 30 bytes"):
        rig.engine.check()
    pinned = Rig([10, 20, 10], budget=25, pinned=[0])
    with pytest.raises(BudgetError, match=r"'u0' must stay resident"):
        pinned.engine.check()
    Rig([10, 20, 10], budget=30, pinned=[0]).engine.check()


def test_a_failed_read_surfaces_where_the_unit_is_used() -> None:
    rig = Rig([10] * 3, budget=30, fail="u1")
    e = rig.engine
    e.begin_pass()
    e.acquire("u0")
    with pytest.raises(OSError, match="I/O error"):
        e.acquire("u1")
    e.release("u0")
    e.end_pass()


def test_auto_budget_shrinks_when_memory_drops_and_grows_back() -> None:
    # a cgroup of 1000 bytes: what others use, plus what the engine holds, is not free
    others = [0]
    holder: list[Residency] = []

    def read() -> list[MemoryReading]:
        held = holder[0].resident_bytes if holder else 0
        return [MemoryReading(1000 - others[0] - held, "fake cgroup")]

    auto = AutoBudget(read, margin=0.0, min_margin=0, interval=0.0)
    rig = Rig([10] * 10, budget=None, auto=auto)
    holder.append(rig.res)
    assert rig.res.budget == 1000 and len(rig.engine.keep) == 10
    rig.run(range(10))
    assert rig.res.resident_bytes == 100  # everything kept
    others[0] = 960  # memory gets scarce: 40 bytes left for the engine
    rig.run(range(10))
    assert rig.res.budget == 40
    assert rig.res.resident_bytes <= 40
    assert len(rig.engine.keep) == 2  # 40 bytes minus a window of 2 units
    assert wait_for(lambda: "u0" in rig.res)
    before = len(rig.loads)
    rig.run(range(10))
    assert wait_for(lambda: "u0" in rig.res)
    assert len(rig.loads) - before == 8
    assert max(rig.seen[-20:]) <= 40
    others[0] = 0  # memory comes back
    rig.run(range(10))  # re-planned when the pass starts: keeps more after this one
    assert len(rig.engine.keep) == 10
    before = len(rig.loads)
    rig.run(range(10))
    assert len(rig.loads) == before


def test_close_stops_the_reader_and_releases_everything() -> None:
    rig = Rig([10] * 4, budget=None, delay=0.001)
    rig.run(range(4))
    rig.engine.close()
    assert rig.res.resident_bytes == 0
    assert sorted(rig.unloads) == ["u0", "u1", "u2", "u3"]
    assert rig.engine._thread is None or not rig.engine._thread.is_alive()
    with pytest.raises(CheckpointClosedError):
        rig.engine.acquire("u0")
    rig.engine.close()  # twice is fine
