"""Buffers the readers allocate: numpy's without its huge-page advice (which, where the
kernel compacts memory on a fault, made first touches 2.6x slower), the caller's numpy
setting left as it was."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from safeshard.runtime.readers import HUGEPAGE_FROM, NumpyBackend, numpy_empty

np = pytest.importorskip("numpy")


def _vm_flags(address: int) -> list[str]:
    """The ``VmFlags`` of the mapping holding ``address`` (Linux ``/proc/self/smaps``)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _setter() -> object:
    return np._core.multiarray._set_madvise_hugepage


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_large_numpy_buffers_are_not_advised_huge_pages() -> None:
    n = 4 * HUGEPAGE_FROM
    middle = n // 2  # numpy advises the 2 MiB-aligned inside of the buffer only
    plain = np.empty(n, dtype=np.uint8)
    if "hg" not in _vm_flags(plain.ctypes.data + middle):
        pytest.skip("this numpy does not advise huge pages here")
    ours = numpy_empty(np, n)
    assert ours.dtype == np.uint8 and ours.shape == (n,)
    assert "hg" not in _vm_flags(ours.ctypes.data + middle)
    buf, view = NumpyBackend().empty(n)
    assert "hg" not in _vm_flags(buf.ctypes.data + middle) and view.nbytes == n
    again = np.empty(n, dtype=np.uint8)  # numpy's setting is back
    assert "hg" in _vm_flags(again.ctypes.data + middle)


@pytest.mark.parametrize("setting", [True, False])
def test_the_callers_setting_is_restored_across_threads(setting: bool) -> None:
    setter = _setter()
    before = setter(setting)  # type: ignore[operator]
    try:
        threads = [
            threading.Thread(target=lambda: [numpy_empty(np, HUGEPAGE_FROM) for _ in range(50)])
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert setter(setting) is setting  # type: ignore[operator]
    finally:
        setter(before)  # type: ignore[operator]


def test_small_buffers_are_plain() -> None:
    a = numpy_empty(np, 100)
    assert a.shape == (100,) and a.dtype == np.uint8
