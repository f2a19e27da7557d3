"""gcpause: the collector is off inside a pause, back on after, nesting and errors included."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from safeshard.gcpause import paused, pausing


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        (gc.enable if was else gc.disable)()


def test_paused_disables_then_restores() -> None:
    with paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_nested_pauses_restore_only_at_the_outermost() -> None:
    with paused():
        with paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause leaves the outer one in force
    assert gc.isenabled()


def test_an_error_inside_still_restores() -> None:
    with pytest.raises(ValueError, match="boom"), paused():
        raise ValueError("boom")
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled() -> None:
    gc.disable()
    with paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_pausing_decorator_runs_paused_and_keeps_the_function() -> None:
    @pausing
    def work(a: int, *, b: int = 2) -> tuple[int, bool]:
        """Doc kept."""
        return a + b, gc.isenabled()

    assert work(1, b=3) == (4, False)
    assert gc.isenabled()
    assert work.__name__ == "work" and work.__doc__ == "Doc kept."
    with pytest.raises(TypeError):
        work("x")  # type: ignore[arg-type]  # a bad call still fails, and still restores
    assert gc.isenabled()
