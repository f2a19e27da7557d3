"""The lifecycle of a reader under a memory budget: reserve, read, hold, evict, stop, close.

:class:`BudgetedReads` is the one such lifecycle; :class:`safeshard.LazyCheckpoint`
(:mod:`safeshard.runtime.lazy`) and the streaming engine
(:class:`safeshard.runtime.prefetch.Engine`) both run their reads through it. The
accounting and the budget are the :class:`~safeshard.runtime.residency.Residency` it
is given; what to read, and when, stays with its owner:

1. *reserve* the bytes of a read (:meth:`BudgetedReads.reserve`): the residency makes
   room or waits; a wait ends when the owner's ``stop()`` says so
   (:class:`~safeshard.runtime.residency.Stopped`) or when the reader is closed
   (:class:`CheckpointClosedError`);
2. *read* with the lock released (:meth:`BudgetedReads.read`): if the read fails, the
   reservation goes back and the owner's ``failed`` undoes its own bookkeeping;
3. *hold* what was read (:meth:`BudgetedReads.hold`), the reservation turned into entries;
4. *evict*: the owner's ``on_evict`` hook sees every entry that leaves;
5. *stop and close* (:meth:`BudgetedReads.close`): waits end, the background threads
   started with :meth:`BudgetedReads.start` are joined, then the owner releases what
   it holds; the hook is removed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from safeshard.errors import CheckpointClosedError
from safeshard.runtime.residency import Residency

__all__ = ["BudgetedReads"]

T = TypeVar("T")


class BudgetedReads:
    """Reads under ``residency``'s budget, from reservation to close; see the module
    docstring. ``closed_message`` is the :class:`CheckpointClosedError` raised once closed."""

    def __init__(
        self,
        residency: Residency,
        *,
        closed_message: str,
        on_evict: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.res = residency
        self.cond = residency.cond
        self.closed_message = closed_message
        self._closed = False
        self._threads: set[threading.Thread] = set()
        self._on_evict = on_evict
        if on_evict is not None:
            residency.on_evict_hooks.append(on_evict)

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        """:class:`CheckpointClosedError` once closed."""
        if self._closed:
            raise CheckpointClosedError(self.closed_message)

    def follow_memory(self, *, force: bool = False) -> bool:
        """The residency's automatic budget re-read if due (see
        :meth:`Residency.follow_memory`); True if it changed."""
        return self.res.follow_memory(force=force)

    # ------------------------------------------------------------------ one read

    def reserve(
        self,
        nbytes: int,
        *,
        wait: bool,
        stop: Callable[[], bool] | None = None,
        evict: bool = True,
        what: str = "",
    ) -> bool:
        """Reserve ``nbytes`` (see :meth:`Residency.reserve`). A wait ends with
        :class:`Stopped` when ``stop()`` is true, else with :class:`CheckpointClosedError`
        when the reader is closed."""

        def stopped() -> bool:
            if stop is not None and stop():
                return True
            self.check_open()
            return False

        return self.res.reserve(nbytes, wait=wait, stop=stopped, evict=evict, what=what)

    def read(
        self,
        reserved: int,
        read: Callable[[], T],
        *,
        failed: Callable[[BaseException], None] | None = None,
    ) -> T:
        """``read()``, called without the lock, for a reservation of ``reserved`` bytes
        (0: none). If it raises, the reservation goes back and ``failed(error)`` runs,
        both under the lock, and the error propagates."""
        try:
            return read()
        except BaseException as e:
            with self.cond:
                if reserved:
                    self.res.unreserve(reserved)
                if failed is not None:
                    failed(e)
            raise

    def hold(self, entries: Sequence[tuple[str, Any, int]], *, reserved: int) -> list[Any]:
        """Hold each ``(key, value, nbytes)``, turning a reservation of ``reserved`` bytes
        into entries; returns the values held (a key already held keeps its value)."""
        with self.cond:
            return [
                # the whole reservation goes back with the first add
                self.res.add(key, value, nbytes, reserved=reserved if k == 0 else 0)
                for k, (key, value, nbytes) in enumerate(entries)
            ]

    # ------------------------------------------------------------------ threads and close

    def start(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Start a background reader, joined by :meth:`close`."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self.cond:
            self._threads.add(thread)
        thread.start()
        return thread

    def finished(self, thread: threading.Thread) -> None:
        """``thread`` (from :meth:`start`) was joined by its owner."""
        with self.cond:
            self._threads.discard(thread)

    def close(self, release: Callable[[], None]) -> bool:
        """Stop: waits end, background readers are joined (but not the calling thread),
        then ``release()`` lets go of what the owner holds and the eviction hook is
        removed. False if already closed (nothing done)."""
        with self.cond:
            if self._closed:
                return False
            self._closed = True
            self.cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join()
        release()
        with self.cond:
            hook = self._on_evict
            if hook is not None and hook in self.res.on_evict_hooks:
                self.res.on_evict_hooks.remove(hook)
        return True
