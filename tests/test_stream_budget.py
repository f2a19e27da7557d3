"""Budget accounting at the exact minimum budget, and the budget guidance that stream's
errors and ``safeshard inspect`` give (issue 17, items 6 and 7)."""

from __future__ import annotations

import threading
from typing import Any

from safeshard.prefetch import Engine, Unit
from safeshard.residency import Residency


class WatchedResidency(Residency):
    """A real :class:`Residency` that tells when the reader thread starts a waiting
    reservation and when it gives one back."""

    def __init__(self, budget: int) -> None:
        super().__init__(budget, label="race")
        self.reader_waits = threading.Event()
        self.reader_unreserved = threading.Event()

    def reserve(self, nbytes: int, *, wait: bool, **kw: Any) -> bool:
        if wait:  # only the reader thread waits
            self.reader_waits.set()
        return super().reserve(nbytes, wait=wait, **kw)

    def unreserve(self, nbytes: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.reader_unreserved.set()
        super().unreserve(nbytes)


def test_the_reader_does_not_read_again_a_unit_the_caller_is_reading() -> None:
    """The reader waits for room to prefetch a small unit; the caller frees room and reads
    that unit itself. Before the fix the reader woke, reserved too and read it again; the
    caller's read finished first and cleared the unit's "being read" mark, so the
    reader's reservation was counted nowhere, and the next big unit was refused with
    ``BudgetError ... units in use () hold 0`` at the exact minimum budget."""
    sizes = {"big0": 100, "small": 10, "big1": 100}
    units = [Unit(k, n, i) for i, (k, n) in enumerate(sizes.items())]
    res = WatchedResidency(100)  # the minimum: the largest unit
    reader_reads = threading.Event()
    caller_went_on = threading.Event()

    def load(u: Unit) -> str:
        if u.key == "small":
            if threading.current_thread() is threading.main_thread():
                # the caller's read: let the reader wake up and act meanwhile
                woke = threading.Event()

                def either() -> None:
                    while not (reader_reads.is_set() or res.reader_unreserved.is_set()):
                        if woke.wait(0.005):
                            return
                    woke.set()

                either()
            else:  # a second read of it: hold it until the caller has gone on
                reader_reads.set()
                caller_went_on.wait(5)
        return u.key

    engine = Engine(units, res, load, lambda u, v: None, prefetch=1, label="race")
    try:
        engine.begin_pass()
        engine.acquire("big0")  # the reader now wants 'small' but there is no room
        assert res.reader_waits.wait(5)
        with res.cond:  # the reader waits inside reserve (it holds the lock until then)
            engine.release("big0")
        engine.acquire("small")
        engine.release("small")
        try:
            assert engine.acquire("big1") == "big1"  # BudgetError before the fix
        finally:
            caller_went_on.set()
        engine.release("big1")
        engine.end_pass()
        assert engine.stats.loads_by_unit["small"] == 1
    finally:
        engine.close()
    assert res.resident_bytes == 0
