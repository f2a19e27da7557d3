"""safeshard.residency: holdings, pins, reservations and the budget, without torch."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeshard.errors import BudgetError
from safeshard.runtime.residency import Residency, Stopped


def test_importing_the_accounting_needs_no_torch() -> None:
    code = (
        "import sys; import safeshard.runtime.residency, safeshard.runtime.prefetch, "
        "safeshard.runtime.membudget; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_add_reserve_and_evict_oldest_unpinned_first() -> None:
    gone: list[str] = []
    r = Residency(10, on_evict=lambda k, v: gone.append(k))
    for key in "abc":
        assert r.reserve(3, wait=False)
        r.add(key, key.upper(), 3, reserved=3)
    assert r.keys() == ["a", "b", "c"] and r.resident_bytes == 9
    r.pin("a")
    assert r.reserve(4, wait=False)  # evicts b (a is pinned), not a
    assert gone == ["b"] and r.keys() == ["a", "c"]
    assert r.resident_bytes == 6 + 4 and r.peak_bytes == 10
    r.unreserve(4)
    assert r.resident_bytes == 6


def test_reserve_without_room_says_no_or_waits_for_an_unpin() -> None:
    r = Residency(10)
    r.reserve(10, wait=False)
    r.add("a", 1, 10, reserved=10)
    r.pin("a")
    assert not r.reserve(1, wait=False)
    assert not r.reserve(1, wait=False, evict=False)
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(r.reserve(5, wait=True)))
    t.start()
    time.sleep(0.05)
    assert not got  # still waiting
    r.unpin("a")  # now a can be evicted
    t.join(5)
    assert got == [True] and "a" not in r and r.resident_bytes == 5


def test_a_waiting_reserve_stops_when_told() -> None:
    r = Residency(4)
    r.reserve(4, wait=False)
    flag = threading.Event()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            r.reserve(2, wait=True, stop=flag.is_set)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    flag.set()
    r.set_budget(4)  # wakes the waiter, which sees stop()
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], Stopped)


def test_more_than_the_whole_budget_is_a_budget_error() -> None:
    r = Residency(100, label="/m")
    with pytest.raises(
        BudgetError, match=r"/m: reading x needs 101 bytes .* max_resident_bytes=100"
    ):
        r.reserve(101, wait=True, what="reading x")
    assert Residency(None).reserve(10**15, wait=False)  # no budget, no limit


def test_a_key_added_twice_keeps_the_first_value() -> None:
    r = Residency()
    r.reserve(3, wait=False)
    assert r.add("k", "first", 3, reserved=3) == "first"
    r.reserve(3, wait=False)
    assert r.add("k", "second", 3, reserved=3) == "first"
    assert r.held_bytes == 3 and r.reserved_bytes == 0


def test_discard_drop_unpinned_and_clear_call_the_hooks() -> None:
    gone: list[tuple[str, Any]] = []
    r = Residency(on_evict=lambda k, v: gone.append((k, v)))
    for k in "abc":
        r.add(k, k * 2, 1)
    r.pin("a")
    assert not r.discard("a") and r.discard("b")
    assert r.drop_unpinned() == ["c"]
    assert r.discard("a", force=True)
    assert gone == [("b", "bb"), ("c", "cc"), ("a", "aa")]
    r.add("d", 0, 1)
    r.reserve(5, wait=False)
    r.clear()
    assert r.resident_bytes == 0 and len(r) == 0 and gone[-1] == ("d", 0)


def test_lowering_the_budget_keeps_what_is_held_but_admits_nothing_more() -> None:
    r = Residency(10)
    r.add("a", 0, 8)
    r.pin("a")
    r.set_budget(5)
    assert r.resident_bytes == 8 and not r.fits(0)  # what is held stays
    assert not r.reserve(1, wait=False)
    r.unpin("a")
    assert r.reserve(5, wait=False) and "a" not in r


Op = tuple[str, int, int]


@settings(max_examples=200, deadline=None)
@given(
    budget=st.integers(1, 40),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["load", "pin", "unpin", "discard", "drop"]),
            st.integers(0, 7),
            st.integers(0, 15),
        ),
        max_size=60,
    ),
)
def test_holdings_never_exceed_the_budget_and_pins_are_never_evicted(
    budget: int, ops: list[Op]
) -> None:
    r = Residency(budget)
    pins: dict[str, int] = {}
    for op, k, n in ops:
        key = f"t{k}"
        if op == "load" and key not in r:
            before = set(r.keys())
            try:
                ok = r.reserve(n, wait=False)
            except BudgetError:
                assert n > budget
                continue
            if ok:
                r.add(key, k, n, reserved=n)
            for gone in before - set(r.keys()):
                assert not pins.get(gone), f"pinned {gone} was evicted"
        elif op == "pin" and key in r:
            r.pin(key)
            pins[key] = pins.get(key, 0) + 1
        elif op == "unpin" and pins.get(key):
            r.unpin(key)
            pins[key] -= 1
        elif op == "discard":
            if r.discard(key):
                assert not pins.get(key)
                pins.pop(key, None)
        elif op == "drop":
            for gone in r.drop_unpinned():
                assert not pins.get(gone)
        assert r.resident_bytes <= budget
        assert r.peak_bytes <= budget and r.peak_bytes >= r.resident_bytes
        assert r.held_bytes == sum(r.size(x) for x in r)
        for key2, count in pins.items():
            if count:
                assert key2 in r
