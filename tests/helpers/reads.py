"""Spying on reads: telling a header read from a tensor read (for tests that spy on
``LocalFile.readinto``), and proving two reads were in flight at once (:class:`Meeting`).

Every read of a local file goes through ``LocalFile.readinto``, the header's two reads
(the length, then the header, through :func:`safeshard.io.bytesrc.header_of`) included.
Tests that count the reads of tensor data skip the header's with :func:`in_header_read`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from safeshard.io import bytesrc

_HEADER_OF = bytesrc.header_of.__code__


def in_header_read() -> bool:
    """Whether the calling read was asked for by the header reader."""
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        if f.f_code is _HEADER_OF:
            return True
        f = f.f_back
    return False


class Meeting:
    """Wraps ``fn`` so that its first two calls wait for each other at a barrier: calls
    made one after another never meet, and the barrier breaks after ``timeout`` seconds
    (``broken`` then tells). Proves that two calls were in flight at once."""

    def __init__(self, fn: Callable[..., Any], timeout: float = 10) -> None:
        self.fn = fn
        self.barrier = threading.Barrier(2, timeout=timeout)
        self._arrived = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._arrived += 1
            wait = self._arrived <= 2
        if wait:
            with contextlib.suppress(threading.BrokenBarrierError):
                self.barrier.wait()
        return self.fn(*args, **kwargs)

    @property
    def broken(self) -> bool:
        return self.barrier.broken
