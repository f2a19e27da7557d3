"""safeshard.runtime.budgeted: the one lifecycle of a reader under a budget; and the
residency's own automatic budget. No torch."""

from __future__ import annotations

import threading
import time

import pytest

from safeshard.errors import CheckpointClosedError
from safeshard.runtime.budgeted import BudgetedReads
from safeshard.runtime.membudget import AutoBudget, MemoryReading
from safeshard.runtime.residency import Residency, Stopped


def test_reserve_read_hold_turns_the_reservation_into_entries() -> None:
    res = Residency(100, label="/m")
    life = BudgetedReads(res, closed_message="/m: closed")
    assert life.reserve(30, wait=False)
    assert res.reserved_bytes == 30
    value = life.read(30, lambda: "bytes")
    held = life.hold([("a", value, 10), ("b", "other", 20)], reserved=30)
    assert held == ["bytes", "other"]
    assert (res.held_bytes, res.reserved_bytes) == (30, 0)
    # a key already held keeps its value
    assert life.reserve(10, wait=False)
    assert life.hold([("a", "late", 10)], reserved=10) == ["bytes"]
    assert (res.held_bytes, res.reserved_bytes) == (30, 0)


def test_a_failed_read_gives_the_reservation_back_and_tells_the_owner() -> None:
    res = Residency(100)
    life = BudgetedReads(res, closed_message="closed")
    life.reserve(40, wait=False)
    seen: list[BaseException] = []

    def boom() -> str:
        raise OSError(5, "I/O error")

    with pytest.raises(OSError, match="I/O error"):
        life.read(40, boom, failed=seen.append)
    assert res.reserved_bytes == 0 and len(seen) == 1 and isinstance(seen[0], OSError)


def test_a_wait_ends_when_stopped_or_closed() -> None:
    res = Residency(10)
    life = BudgetedReads(res, closed_message="/m: closed")
    res.add("x", 1, 10)
    res.pin("x")
    with pytest.raises(Stopped):
        life.reserve(5, wait=True, stop=lambda: True)
    out: list[BaseException] = []

    def waiter() -> None:
        try:
            life.reserve(5, wait=True)
        except BaseException as e:
            out.append(e)

    t = life.start(waiter, "test-waiter")
    time.sleep(0.05)
    assert not out  # still waiting for room
    released: list[bool] = []
    assert life.close(lambda: released.append(True))
    assert not t.is_alive()  # joined by close
    assert len(out) == 1 and isinstance(out[0], CheckpointClosedError)
    assert "/m: closed" in str(out[0])
    assert released == [True]
    assert not life.close(lambda: released.append(True))  # twice: nothing more
    assert released == [True]
    with pytest.raises(CheckpointClosedError):
        life.check_open()


def test_close_removes_the_eviction_hook_after_the_release() -> None:
    res = Residency(None)
    gone: list[str] = []
    life = BudgetedReads(res, closed_message="c", on_evict=lambda k, v: gone.append(k))
    res.add("a", 1, 1)
    res.add("b", 2, 1)
    res.discard("a")
    assert gone == ["a"]

    def release() -> None:
        res.discard("b")

    life.close(release)
    assert gone == ["a", "b"]  # the release still saw the hook
    res.add("c", 3, 1)
    res.discard("c")
    assert gone == ["a", "b"] and res.on_evict_hooks == []


def test_close_from_the_reader_thread_itself_does_not_join_it() -> None:
    life = BudgetedReads(Residency(None), closed_message="c")
    done = threading.Event()

    def reader() -> None:
        life.close(lambda: None)
        done.set()

    t = life.start(reader, "test-reader")
    assert done.wait(5)
    t.join(5)
    assert life.closed


def test_the_residency_owns_the_automatic_budget() -> None:
    available = [1000]
    now = [0.0]
    auto = AutoBudget(
        lambda: [MemoryReading(available[0], "fake")],
        margin=0.0,
        min_margin=0,
        interval=1.0,
        clock=lambda: now[0],
    )
    res = Residency(5, auto=auto)
    assert res.budget == 1000 and res.auto is auto  # read at once; the fixed one ignored
    available[0] = 500
    assert not res.follow_memory()  # not due yet
    assert res.budget == 1000
    now[0] = 2.0
    assert res.follow_memory()
    assert res.budget == 500
    assert not res.follow_memory(force=True)  # re-read, unchanged
    res.add("a", 1, 100)  # what it holds counts as available to it (a cgroup reading)
    assert res.follow_memory(force=True) and res.budget == 600
    fixed = Residency(5)
    assert not fixed.follow_memory(force=True) and fixed.budget == 5
    fixed.follow(auto)
    assert fixed.auto is auto and fixed.budget == 500
