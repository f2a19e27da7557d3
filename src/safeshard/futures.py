"""Waiting for work handed to threads whose buffers the caller owns.

:func:`wait_all` waits for every future in order; if one fails (or the wait is
interrupted), the ones not started are cancelled and the running ones are let finish
before the error goes on, so no thread still writes into a buffer the caller is about
to free or reuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

__all__ = ["settle", "wait_all"]


def settle(futures: Sequence[Future[Any]]) -> None:
    """Cancel the futures not started and wait for the running ones, ignoring how they
    end (the caller is already handling an error)."""
    for f in futures:
        f.cancel()
    for f in futures:
        if not f.cancelled():
            with contextlib.suppress(BaseException):
                f.result()


def wait_all(futures: Sequence[Future[Any]]) -> None:
    """Each future's result in order; on the first error, :func:`settle` the rest and
    raise it."""
    try:
        for f in futures:
            f.result()
    except BaseException:
        settle(futures)
        raise
