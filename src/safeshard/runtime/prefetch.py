"""What to keep, what to read ahead, and in what order: the streaming runner's engine.

An :class:`Engine` serves *units* (a model's blocks and the tensors outside them)
to a caller that announces each use with :meth:`Engine.acquire` and its end with
:meth:`Engine.release`. It needs neither torch nor a model: reading a unit and
letting it go are the ``load`` and ``unload`` functions it is given, and the bytes
it holds are accounted in a shared :class:`~safeshard.runtime.residency.Residency`.

*Predictive prefetch.* A background thread reads the next ``prefetch`` units the
caller will ask for. The order is learned: during the first pass (between
:meth:`Engine.begin_pass` and :meth:`Engine.end_pass`) it is model order; after
that it is the order of the last pass, replayed cyclically, so that while the
last blocks of one pass run, the first blocks of the next one are read. A use the
prediction missed is read on the spot, and the reader follows from there.

*A stable resident subset.* Cyclic access defeats least-recently-used eviction:
with a budget smaller than the model, every unit would be evicted just before it
is needed again. Instead :meth:`Engine.plan` keeps a fixed subset resident, as much
as fits once the streaming window (the ``1 + prefetch`` largest streamed units) is
set aside, largest units first (later ones first among equals, so that their run
time covers the reads of the next pass). The rest is read for each use and released
after it, so the bytes read per pass are about the model size minus the resident part.

Under a fixed budget the holdings never exceed it. With an automatic budget
(:class:`~safeshard.runtime.membudget.AutoBudget`), :meth:`Engine.begin_pass` re-reads the
memory available and plans again: a smaller budget releases resident units at once
(those in use when their use ends), a larger one keeps more after their next use.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from safeshard.errors import BudgetError, UsageError
from safeshard.runtime.budgeted import BudgetedReads
from safeshard.runtime.membudget import AutoBudget
from safeshard.runtime.residency import Residency, Stopped
from safeshard.sizes import format_size

__all__ = ["Engine", "EngineStats", "Unit"]


@dataclass(frozen=True)
class Unit:
    """One thing the engine holds or not as a whole.

    ``index`` is its position in model order. ``pinned``: it must stay resident (it
    is in use while other units are, e.g. weights of a module that encloses blocks).
    ``rows``: the caller can do without holding it (an embedding read row by row),
    so it is kept only when everything else is, and it never widens the window.
    """

    key: str
    nbytes: int
    index: int
    pinned: bool = False
    rows: bool = False


@dataclass
class EngineStats:
    """Counters since the engine started."""

    passes: int = 0
    loads: int = 0
    inline_loads: int = 0
    bytes_loaded: int = 0
    extra_bytes: int = 0
    """Bytes read outside whole units (embedding rows)."""
    expert_bytes: int = 0
    """Bytes of MoE experts read by expert (:mod:`safeshard.runtime.experts`)."""
    evictions: int = 0
    loads_by_unit: dict[str, int] = field(default_factory=dict)


class Engine:
    """Serves units under a budget with a learned, cyclic prefetch; see the module docstring."""

    def __init__(
        self,
        units: Sequence[Unit],
        residency: Residency,
        load: Callable[[Unit], Any],
        unload: Callable[[Unit, Any], None],
        *,
        prefetch: int = 1,
        auto: AutoBudget | None = None,
        label: str = "",
        reserve: int = 0,
        share: int | None = None,
    ) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise UsageError(f"prefetch must be a non-negative integer, not {prefetch!r}")
        self.units = list(units)
        if [u.index for u in self.units] != list(range(len(self.units))):
            raise UsageError("units must be numbered 0, 1, 2, ... in model order")
        self.by_key = {u.key: u for u in self.units}
        self.res = residency
        self._cond = residency.cond
        self._load = load
        self._unload = unload
        self.prefetch = prefetch
        self.label = label
        self.reserve = reserve
        """The least the holdings outside the units need at once (the experts of one MoE
        layer read by expert): counted in the minimum budget."""
        self.share = reserve if share is None else max(share, reserve)
        """Bytes of the budget the plan leaves to holdings outside the units."""
        self._in_use: dict[str, int] = {}
        self._reading: dict[str, int] = {}
        self._failed: dict[str, BaseException] = {}
        self._keep: set[str] = set()
        self._kept: set[str] = set()  # keep-pinned now (a subset of _keep that is held)
        self.schedule: list[int] = [u.index for u in self.units if not u.rows]
        """The predicted order of use: model order, then the last pass's order."""
        self.learned = False
        self._cursor = -1
        self._pass: list[int] = []
        self._depth = 0
        self._demand = False
        self._wanted: dict[str, int] = {}  # units the caller waits for
        self._thread: threading.Thread | None = None
        self.stats = EngineStats()
        self.trace: list[tuple[str, str]] | None = None
        """Set to a list to record ``(event, unit key)``: acquire, release, load-start,
        load-done (by the reader), load-inline, evict."""
        self._life = BudgetedReads(
            residency,
            closed_message=f"{label}: the streamed model was closed",
            on_evict=self._evicted,
        )
        with self._cond:
            if auto is not None:
                residency.follow(auto)
            else:
                residency.follow_memory(force=True)
            self.plan()

    @property
    def auto(self) -> AutoBudget | None:
        """The automatic budget the residency follows, if any."""
        return self.res.auto

    # ------------------------------------------------------------------ planning

    def minimum_budget(self) -> tuple[int, Unit | None]:
        """Smallest budget that can run: the pinned units plus the largest other unit."""
        pinned = sum(u.nbytes for u in self.units if u.pinned) + self.reserve
        others = [u for u in self.units if not u.pinned and not u.rows]
        big = max(others, key=lambda u: u.nbytes, default=None)
        return pinned + (big.nbytes if big is not None else 0), big

    def check(self) -> None:
        """:class:`BudgetError` if the budget cannot hold what must be held at once."""
        budget = self.res.budget
        if budget is None:
            return
        need, big = self.minimum_budget()
        if need <= budget:
            return
        pinned = [u for u in self.units if u.pinned]
        what = f"{big.key!r} holds {big.nbytes:,} bytes ({format_size(big.nbytes)})" if big else ""
        if pinned:
            what += (", " if what else "") + (
                f"and {', '.join(repr(u.key) for u in pinned)} must stay resident "
                f"({sum(u.nbytes for u in pinned):,} bytes)"
            )
        if self.reserve:
            what += (", " if what else "") + (
                f"and the experts of one MoE layer take {self.reserve:,} bytes"
            )
        source = f" ({self.auto.describe()})" if self.auto is not None else ""
        raise BudgetError(
            f"{self.label}: {what}: more than max_resident_bytes={budget:,} "
            f"({format_size(budget)}){source}; raise the budget to at least {need:,} bytes"
            f"{self._guidance()}"
        )

    def _guidance(self) -> str:
        """The two budgets worth knowing, for error messages."""
        need, big = self.minimum_budget()
        total = sum(u.nbytes for u in self.units)
        unit = f", the largest unit {big.key!r}" if big is not None else ""
        return (
            f" (the smallest budget that runs is {need:,} bytes ({format_size(need)}){unit}; "
            f"from {total:,} bytes ({format_size(total)}), the whole model, decoding reads "
            "nothing; `safeshard inspect` shows both)"
        )

    def plan(self) -> None:
        """Choose the resident subset for the budget now and apply it."""
        with self._cond:
            budget = self.res.budget
            if budget is not None:
                budget = max(0, budget - self.share)
            keep: set[str]
            if budget is None or sum(u.nbytes for u in self.units) <= budget:
                keep = {u.key for u in self.units}
            else:
                last: dict[int, int] = {}
                for pos, i in enumerate(self.schedule):
                    last[i] = pos
                keep = {u.key for u in self.units if u.pinned}
                used = sum(u.nbytes for u in self.units if u.pinned)
                free = [u for u in self.units if not u.pinned]
                window = sorted((u for u in free if not u.rows), key=lambda u: (-u.nbytes, u.index))
                # once a pass is learned, units it did not use (an encoder, run once
                # before the decoder's passes) come last: keeping them saves no reads
                unused = set(range(len(self.units))) - set(last) if self.learned else set()
                order = sorted(
                    free,
                    key=lambda u: (
                        u.rows,
                        u.index in unused,
                        -u.nbytes,
                        -last.get(u.index, -1),
                        -u.index,
                    ),
                )
                k = 1 + self.prefetch
                for c in order:
                    w = 0
                    taken = 0
                    for u in window:
                        if taken == k:
                            break
                        if u.key in keep or u is c:
                            continue
                        w += u.nbytes
                        taken += 1
                    if used + c.nbytes + w <= budget:
                        keep.add(c.key)
                        used += c.nbytes
            self._keep = keep
            for key in list(self._kept - keep):
                self._kept.discard(key)
                self.res.unpin(key)
                if key not in self._in_use:
                    self.res.discard(key)
            for key in keep - self._kept:
                if key in self.res:
                    self.res.pin(key)
                    self._kept.add(key)
            self._cond.notify_all()

    @property
    def keep(self) -> set[str]:
        """Keys of the units chosen to stay resident."""
        with self._cond:
            return set(self._keep)

    def refresh_budget(self, *, force: bool = False) -> int | None:
        """With an automatic budget, re-read the memory available (if due, or ``force``)
        and plan again; returns the budget."""
        with self._cond:
            if self._life.follow_memory(force=force):
                self.plan()
            return self.res.budget

    # ------------------------------------------------------------------ passes

    def begin_pass(self) -> None:
        """A pass over the model starts (nested calls count once)."""
        with self._cond:
            self._depth += 1
            if self._depth > 1:
                return
            self._check_open()
            if not self.learned and self._pass:
                # units used before the first pass, outside any (an encoder that generate
                # runs once on its own) are not predicted for the passes that follow
                before = set(self._pass)
                rest = [i for i in self.schedule if i not in before]
                if rest:
                    self.schedule = rest
                    self._cursor = -1
            self._pass = []
            self.stats.passes += 1
        self.refresh_budget()

    def end_pass(self) -> None:
        """The pass ends: its order of use becomes the prediction."""
        with self._cond:
            self._depth = max(0, self._depth - 1)
            if self._depth:
                return
            if self._pass:
                replan = not self.learned or set(self._pass) != set(self.schedule)
                self.schedule = list(self._pass)
                self._cursor = len(self.schedule) - 1
                self.learned = True
                if replan:
                    self.plan()
            self._cond.notify_all()

    def _note(self, u: Unit) -> None:
        """Record a use of ``u`` and move the prediction there (lock held)."""
        self._pass.append(u.index)
        pos = len(self._pass) - 1
        sched = self.schedule
        if pos < len(sched) and sched[pos] == u.index:
            self._cursor = pos
        elif sched:
            n = len(sched)
            for k in range(1, n + 1):
                p = (self._cursor + k) % n
                if sched[p] == u.index:
                    self._cursor = p
                    break
        self._drop_stale(keep=u.key)
        self._cond.notify_all()

    def _window(self) -> list[Unit]:
        """The next ``prefetch`` units after the cursor that are not resident or in use."""
        sched = self.schedule
        n = len(sched)
        out: list[Unit] = []
        if not n or not self.prefetch:
            return out
        seen: set[int] = set()
        for k in range(1, n + 1):
            i = sched[(self._cursor + k) % n]
            if i in seen:
                continue
            seen.add(i)
            u = self.units[i]
            if u.key in self._kept or u.key in self._in_use:
                continue
            out.append(u)
            if len(out) == self.prefetch:
                break
        return out

    def upcoming(self) -> list[str]:
        """Keys of the units the reader reads next (the prefetch window), in order."""
        with self._cond:
            return [u.key for u in self._window()]

    def _drop_stale(self, keep: str = "") -> None:
        """Release prefetched units the prediction no longer expects soon (lock held)."""
        window = {u.key for u in self._window()}
        for key in self.res:
            if (
                key in self.by_key
                and key != keep
                and key not in self._wanted
                and key not in window
                and key not in self._in_use
                and key not in self._kept
                and not self.res.pins(key)
            ):
                self.res.discard(key)

    # ------------------------------------------------------------------ use

    def acquire(self, key: str) -> Any:
        """The value of unit ``key``, held (and pinned) until :meth:`release`.

        Waits for the reader if it is reading it; otherwise reads it here.
        """
        u = self.by_key[key]
        with self._cond:
            self._check_open()
            self._wanted[key] = self._wanted.get(key, 0) + 1
            try:
                self._note(u)
                self._trace("acquire", key)
                while True:
                    if key in self.res:
                        self.res.pin(key)
                        self._in_use[key] = self._in_use.get(key, 0) + 1
                        return self.res.get(key)
                    if key in self._failed:
                        raise self._failed.pop(key)
                    if key in self._reading:
                        self._cond.wait()
                        self._check_open()
                        continue
                    self._make_room(u.nbytes, f"{u.key!r}")
                    self._reading[key] = u.nbytes
                    break
            finally:
                left = self._wanted.pop(key) - 1
                if left:
                    self._wanted[key] = left
            self._start_reader()

        def failed(_: BaseException) -> None:
            self._reading.pop(key, None)

        value = self._life.read(u.nbytes, lambda: self._load(u), failed=failed)
        with self._cond:
            self._reading.pop(key, None)
            (value,) = self._life.hold([(key, value, u.nbytes)], reserved=u.nbytes)
            self.res.pin(key)
            self._in_use[key] = self._in_use.get(key, 0) + 1
            self._loaded(u, inline=True)
            return value

    def release(self, key: str) -> None:
        """End one use of ``key``: it is released unless resident or still in use."""
        with self._cond:
            left = self._in_use.get(key, 0) - 1
            if left < 0:
                return
            self.res.unpin(key)
            self._trace("release", key)
            if left:
                self._in_use[key] = left
                return
            del self._in_use[key]
            # a unit used again next (a tied embedding: lm_head, then the next token's
            # embedding) stays until the prediction moves on, as if prefetched
            if key not in self._kept and all(u.key != key for u in self._window()):
                self.res.discard(key)
            self._cond.notify_all()

    def acquire_bytes(self, nbytes: int, what: str, *, read: bool = True) -> None:
        """Reserve ``nbytes`` for a read outside whole units (give back with
        :meth:`release_bytes`); ``read``: count them as embedding rows read."""
        with self._cond:
            self._check_open()
            self._make_room(nbytes, what)
            if read:
                self.stats.extra_bytes += nbytes

    def release_bytes(self, nbytes: int) -> None:
        self.res.unreserve(nbytes)

    def in_use(self) -> dict[str, int]:
        with self._cond:
            return dict(self._in_use)

    def _make_room(self, nbytes: int, what: str) -> None:
        """Reserve ``nbytes`` now for the caller's own read (lock held): release
        prefetched units furthest ahead first, then resident ones not in use, then
        wait for reads in flight."""
        try:
            while not self.res.reserve(nbytes, wait=False, evict=False, what=what):
                self._demand = True
                ready = [
                    k
                    for k in self.res
                    if k in self.by_key
                    and k not in self._in_use
                    and k not in self._kept
                    and not self.res.pins(k)
                ]
                if ready:
                    order = {u.key: n for n, u in enumerate(self._window())}
                    victim = max(ready, key=lambda k: order.get(k, len(order)))
                    self.res.discard(victim)
                    continue
                idle = [k for k in self._kept if k not in self._in_use]
                if idle:
                    victim = min(idle, key=lambda k: self.by_key[k].nbytes)
                    self._kept.discard(victim)
                    self._keep.discard(victim)
                    self.res.unpin(victim)
                    self.res.discard(victim)
                    continue
                if self._reading:
                    self._cond.wait()
                    self._check_open()
                    continue
                busy = sum(self.res.size(k) for k in self._in_use if k in self.res)
                budget = self.res.budget
                raise BudgetError(
                    f"{self.label}: {what} needs {nbytes:,} bytes while units in use "
                    f"({', '.join(repr(k) for k in self._in_use)}) hold {busy:,}; together "
                    f"more than max_resident_bytes={budget:,} "
                    f"({format_size(budget or 0)}); raise the budget{self._guidance()}"
                )
        finally:
            self._demand = False
            self._cond.notify_all()

    # ------------------------------------------------------------------ reader

    def _start_reader(self) -> None:
        if self.prefetch and self._thread is None and not self._life.closed:
            self._thread = self._life.start(self._run, "safeshard-stream-prefetch")

    def _targets(self) -> list[Unit]:
        return [
            u
            for u in self._window()
            if u.key not in self.res and u.key not in self._reading and u.key not in self._failed
        ]

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._life.closed:
                        return
                    targets = [] if self._demand else self._targets()
                    if targets:
                        break
                    self._cond.wait()
                u = targets[0]

                def stop(key: str = u.key) -> bool:
                    return (
                        self._life.closed
                        or self._demand
                        or key not in {t.key for t in self._targets()}
                    )

                try:
                    self._life.reserve(
                        u.nbytes, wait=True, evict=False, stop=stop, what=repr(u.key)
                    )
                except Stopped:
                    continue
                except BudgetError as e:
                    self._failed[u.key] = e
                    self._cond.notify_all()
                    continue
                if stop():
                    # while the reservation waited for room, the caller read the unit
                    # itself (or it is no longer wanted): a second read would hold bytes
                    # counted nowhere once the caller's read ends (BudgetError at the
                    # minimum budget with nothing in use)
                    self.res.unreserve(u.nbytes)
                    continue
                self._reading[u.key] = u.nbytes
                self._trace("load-start", u.key)

            def failed(e: BaseException, key: str = u.key) -> None:
                self._reading.pop(key, None)
                self._failed[key] = e
                self._cond.notify_all()

            try:
                value = self._life.read(u.nbytes, functools.partial(self._load, u), failed=failed)
            except BaseException:
                continue
            with self._cond:
                self._reading.pop(u.key, None)
                if self.closed:  # closed while reading: nobody will use it
                    self.res.unreserve(u.nbytes)
                    self._unload(u, value)
                    self._cond.notify_all()
                    return
                self._life.hold([(u.key, value, u.nbytes)], reserved=u.nbytes)
                self._loaded(u, inline=False)
                self._drop_stale()

    def _loaded(self, u: Unit, *, inline: bool) -> None:
        """Book a finished load (lock held)."""
        if u.key in self._keep and u.key not in self._kept:
            self.res.pin(u.key)
            self._kept.add(u.key)
        s = self.stats
        s.loads += 1
        s.inline_loads += inline
        s.bytes_loaded += u.nbytes
        s.loads_by_unit[u.key] = s.loads_by_unit.get(u.key, 0) + 1
        self._trace("load-inline" if inline else "load-done", u.key)
        self._cond.notify_all()

    def _evicted(self, key: str, value: Any) -> None:
        u = self.by_key.get(key)
        if u is None:
            return
        self.stats.evictions += 1
        self._trace("evict", key)
        self._unload(u, value)

    def _trace(self, event: str, key: str) -> None:
        if self.trace is not None:
            self.trace.append((event, key))

    # ------------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        self._life.check_open()

    @property
    def closed(self) -> bool:
        return self._life.closed

    def close(self) -> None:
        """Stop the reader and release everything held. Safe to call twice."""
        self._life.close(self._release_all)

    def _release_all(self) -> None:
        with self._cond:
            self._kept.clear()
            self._in_use.clear()
            for key in [k for k in self.res if k in self.by_key]:
                self.res.discard(key, force=True)
