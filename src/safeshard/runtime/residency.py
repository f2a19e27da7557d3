"""Holdings under a memory budget: what is held, what is pinned, what is being read.

A :class:`Residency` is the accounting that :class:`safeshard.LazyCheckpoint` and the
streaming runner (:mod:`safeshard.runtime.stream`) share. It needs neither torch nor numpy:
values are opaque, sizes are what the caller says they are.

- *Entries* ``key -> (value, nbytes)``, oldest first.
- *Reservations*: bytes of reads in flight. A reader reserves before it reads and
  turns the reservation into an entry with :meth:`Residency.add` (or gives it back
  with :meth:`Residency.unreserve`), so the budget also covers what is being read.
- *Pins*: a pinned entry is never evicted to make room; :meth:`Residency.reserve`
  waits for unpins instead, or says no.
- *The budget*: ``held + reserved <= budget`` at all times, except that lowering the
  budget with :meth:`Residency.set_budget` does not take back what is held; the
  owner releases it (the streaming runner does so at once for what is not in use).
  The residency owns it: a fixed number, none, or an automatic budget
  (:class:`~safeshard.runtime.membudget.AutoBudget`, ``max_resident_bytes="auto"``)
  that :meth:`Residency.follow_memory` re-reads.

The lifecycle of a reader under the budget (reserve, read, hold, evict, stop and
close) is :class:`safeshard.runtime.budgeted.BudgetedReads`, shared by the lazy
checkpoint and the streaming engine.

Every method takes the lock itself. The lock is re-entrant, so an owner can hold
``residency.cond`` around several calls that must happen together, and wait on it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from safeshard.errors import BudgetError
from safeshard.runtime.membudget import AutoBudget
from safeshard.sizes import format_size

__all__ = ["Residency", "Stopped"]


class Stopped(Exception):
    """A wait in :meth:`Residency.reserve` was abandoned because ``stop()`` said so."""


class Residency:
    """Entries held under an optional byte budget; see the module docstring.

    Each function in :attr:`on_evict_hooks` (``on_evict`` to start with) is called as
    ``hook(key, value)``, lock held, whenever an entry leaves, by eviction,
    :meth:`discard` or :meth:`clear`. ``label`` starts error messages (a path, usually).
    With ``auto``, the budget follows the memory available (``budget`` is then ignored):
    it is read now and again by :meth:`follow_memory`.
    """

    def __init__(
        self,
        budget: int | None = None,
        *,
        label: str = "",
        on_evict: Callable[[str, Any], None] | None = None,
        auto: AutoBudget | None = None,
    ) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.label = label
        self.auto = auto
        """The automatic budget the budget follows, or None for a fixed one."""
        self._budget = auto.budget(0) if auto is not None else budget
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._held = 0
        self._reserved = 0
        self._peak = 0
        self.on_evict_hooks: list[Callable[[str, Any], None]] = (
            [on_evict] if on_evict is not None else []
        )

    # ------------------------------------------------------------------ budget

    @property
    def budget(self) -> int | None:
        """The byte budget, or None for no limit."""
        return self._budget

    def set_budget(self, budget: int | None) -> None:
        """Change the budget. Waiting reservations see the new value at once."""
        with self.cond:
            self._budget = budget
            self.cond.notify_all()

    def follow(self, auto: AutoBudget) -> None:
        """Make the budget follow ``auto`` from now on (read at once)."""
        with self.cond:
            self.auto = auto
            self.follow_memory(force=True)

    def follow_memory(self, *, force: bool = False) -> bool:
        """With an automatic budget, re-read the memory available if it is time to (or
        ``force``) and set the budget from it; True if the budget changed."""
        with self.cond:
            auto = self.auto
            if auto is None or not (force or auto.due()):
                return False
            before = self._budget
            self.set_budget(auto.budget(self._held + self._reserved, force=True))
            return self._budget != before

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would stay within the budget now."""
        with self.cond:
            b = self._budget
            return b is None or self._held + self._reserved + nbytes <= b

    # ------------------------------------------------------------------ sizes

    @property
    def held_bytes(self) -> int:
        return self._held

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def resident_bytes(self) -> int:
        """Held plus reserved: what the budget limits."""
        with self.cond:
            return self._held + self._reserved

    @property
    def peak_bytes(self) -> int:
        """Highest :attr:`resident_bytes` seen since creation."""
        return self._peak

    def _note_peak(self) -> None:
        now = self._held + self._reserved
        if now > self._peak:
            self._peak = now

    # ------------------------------------------------------------------ entries

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        with self.cond:
            return iter(list(self._entries))

    def keys(self) -> list[str]:
        """Keys held now, oldest first."""
        with self.cond:
            return list(self._entries)

    def get(self, key: str) -> Any:
        """The value held for ``key``; :class:`KeyError` if none."""
        return self._entries[key][0]

    def size(self, key: str) -> int:
        return self._entries[key][1]

    def add(self, key: str, value: Any, nbytes: int, *, reserved: int = 0) -> Any:
        """Hold ``value`` under ``key`` (``nbytes`` counted), using ``reserved`` bytes of a
        reservation made for it. If ``key`` is already held (two readers raced), the
        held value stays and is returned; otherwise ``value`` is returned."""
        with self.cond:
            self._reserved -= reserved
            if key in self._entries:
                out = self._entries[key][0]
            else:
                self._entries[key] = (value, nbytes)
                self._held += nbytes
                out = value
            self._note_peak()
            self.cond.notify_all()
            return out

    def discard(self, key: str, *, force: bool = False) -> bool:
        """Drop ``key`` if held and not pinned (pinned too with ``force``); True if dropped."""
        with self.cond:
            if key not in self._entries or (self._pins.get(key) and not force):
                return False
            self._pins.pop(key, None)
            self._remove(key)
            self.cond.notify_all()
            return True

    def drop_unpinned(self) -> list[str]:
        """Drop every unpinned entry; returns their keys."""
        with self.cond:
            gone = [k for k in self._entries if not self._pins.get(k)]
            for k in gone:
                self._remove(k)
            self.cond.notify_all()
            return gone

    def clear(self) -> None:
        """Drop everything, pins and reservations included."""
        with self.cond:
            for k in list(self._entries):
                self._remove(k)
            self._pins.clear()
            self._reserved = 0
            self.cond.notify_all()

    def _remove(self, key: str) -> None:
        value, nbytes = self._entries.pop(key)
        self._held -= nbytes
        for hook in list(self.on_evict_hooks):
            hook(key, value)

    # ------------------------------------------------------------------ pins

    def pin(self, key: str) -> None:
        """Keep ``key`` from eviction until as many :meth:`unpin` calls."""
        with self.cond:
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> int:
        """Undo one :meth:`pin`; returns the pins left."""
        with self.cond:
            left = self._pins.get(key, 0) - 1
            if left <= 0:
                self._pins.pop(key, None)
                left = 0
            else:
                self._pins[key] = left
            self.cond.notify_all()
            return left

    def pins(self, key: str) -> int:
        return self._pins.get(key, 0)

    # ------------------------------------------------------------------ room

    def reserve(
        self,
        nbytes: int,
        *,
        wait: bool,
        stop: Callable[[], bool] | None = None,
        evict: bool = True,
        what: str = "",
    ) -> bool:
        """Reserve ``nbytes`` for a read about to start.

        Makes room by evicting unpinned entries, oldest first (unless ``evict`` is
        False). If that is not enough: with ``wait``, waits for unpins, releases and
        budget changes (raising :class:`Stopped` when ``stop()`` becomes true);
        without, returns False. ``nbytes`` larger than the whole budget is a
        :class:`BudgetError` naming ``what``.
        """
        with self.cond:
            while True:
                budget = self._budget
                if budget is not None and nbytes > budget:
                    raise BudgetError(
                        f"{self.label}: {what or 'a read'} needs {nbytes:,} bytes "
                        f"({format_size(nbytes)}), more than max_resident_bytes={budget:,} "
                        f"({format_size(budget)}); raise the budget"
                    )
                if budget is None or self._held + self._reserved + nbytes <= budget:
                    self._reserved += nbytes
                    self._note_peak()
                    return True
                if evict:
                    victim = next((k for k in self._entries if not self._pins.get(k)), None)
                    if victim is not None:
                        self._remove(victim)
                        continue
                if not wait:
                    return False
                if stop is not None and stop():
                    raise Stopped
                self.cond.wait()

    def unreserve(self, nbytes: int) -> None:
        """Give back ``nbytes`` of a reservation whose read failed or was abandoned."""
        with self.cond:
            self._reserved -= nbytes
            self.cond.notify_all()

    def __repr__(self) -> str:
        b = "no budget" if self._budget is None else f"budget {self._budget:,}"
        return (
            f"<Residency {self.label!r}: {len(self._entries)} held, "
            f"{self._held:,} + {self._reserved:,} reserved bytes, {b}>"
        )
