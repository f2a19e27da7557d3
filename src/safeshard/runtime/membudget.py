"""How much memory this process may still use, for ``max_resident_bytes="auto"``.

:func:`read_memory` reads every limit that applies to the calling process:

- **cgroup v2**: for the process's cgroup and each ancestor with a ``memory.max``,
  ``memory.max - (memory.current - inactive_file)``. The page cache that is not in
  active use (``inactive_file`` in ``memory.stat``) is left out of the usage because
  the kernel reclaims it before it fails an allocation (the "working set" that
  container runtimes report).
- **cgroup v1**: the same with ``memory.limit_in_bytes``, ``memory.usage_in_bytes`` and
  ``total_inactive_file``, each limit against the usage of the cgroup it is set on
  (which counts its other children too); ``hierarchical_memory_limit`` only when the
  cgroup that sets it is not visible.

Every level that has a limit gives a reading, and the budget follows the smallest.
- **the host**: ``MemAvailable`` from ``/proc/meminfo``.

:class:`AutoBudget` turns those readings into a budget: the tightest of them, with a
safety margin, re-read as the caller goes (at most every :attr:`AutoBudget.interval`
seconds), so a budget shrinks when memory gets scarce and grows when it is freed.

Everything is injectable for tests: ``read_memory(root=...)`` reads a fake ``/proc``
and ``/sys`` tree, and ``AutoBudget(read=...)`` takes any function returning readings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from safeshard.errors import UsageError
from safeshard.sizes import format_size, parse_size

__all__ = [
    "AutoBudget",
    "BudgetSpec",
    "MemoryReading",
    "read_memory",
    "resolve_budget",
]

UNLIMITED = 1 << 60
"""cgroup v1 writes "no limit" as a number near 2**63; anything this large is no limit."""


@dataclass(frozen=True)
class MemoryReading:
    """One limit on this process's memory.

    ``available`` is how many more bytes it may use. ``counts_cache``: whether the
    process's own file-backed memory (the mapped checkpoint pages a runner holds)
    already counts as available here, as it does in ``MemAvailable``; for cgroups it
    counts as used, so a budget adds back what is held.
    """

    available: int
    source: str
    counts_cache: bool = False


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _meminfo(root: Path) -> MemoryReading | None:
    stat = root / "proc" / "meminfo"
    try:
        lines = stat.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                unit = 1024 if len(parts) > 2 and parts[2] == "kB" else 1
                return MemoryReading(int(parts[1]) * unit, f"{stat} MemAvailable", True)
    return None


def _cgroup_paths(root: Path) -> list[tuple[str, str]]:
    """``(controllers, path)`` of each line of ``/proc/self/cgroup``."""
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[1], parts[2]))
    return out


def _ancestors(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and each of its parents up to ``base``, deepest first; if the
    process's own folder is not there (a container that mounts its cgroup at the
    root), ``base`` alone."""
    here = base / rel.strip("/") if rel.strip("/") else base
    if not here.is_dir():
        return [base] if base.is_dir() else []
    out = [here]
    while here != base and base in here.parents:
        here = here.parent
        out.append(here)
    return out


def _cgroup_v2(root: Path, rel: str) -> list[MemoryReading]:
    base = root / "sys" / "fs" / "cgroup"
    out = []
    for d in _ancestors(base, rel):
        limit = _read_int(d / "memory.max")
        used = _read_int(d / "memory.current")
        if limit is None or used is None:
            continue
        inactive = _read_stat(d / "memory.stat").get("inactive_file", 0)
        working = max(0, used - inactive)
        out.append(MemoryReading(max(0, limit - working), f"cgroup v2 {d}/memory.max"))
    return out


def _cgroup_v1(root: Path, rel: str) -> list[MemoryReading]:
    """One reading per level of the process's memory cgroup that has a limit.

    In v1 a cgroup's ``memory.usage_in_bytes`` counts its descendants too, so each
    limit is compared with the usage *of the cgroup it is set on* (siblings included),
    never with the process's own cgroup's usage. ``hierarchical_memory_limit`` (the
    tightest limit of the process's cgroup and its ancestors) is used only when the
    cgroup that sets it is not visible (a container sees only its own part of the
    tree); then the usage of the highest visible level is the nearest one known.
    """
    base = root / "sys" / "fs" / "cgroup" / "memory"
    out = []
    levels = _ancestors(base, rel)
    seen: list[int] = []  # limits found on visible levels
    top_used: int | None = None
    top_inactive = 0
    hier: int | None = None
    for i, d in enumerate(levels):
        stat = _read_stat(d / "memory.stat")
        if i == 0:
            hier = stat.get("hierarchical_memory_limit")
        used = _read_int(d / "memory.usage_in_bytes")
        if used is None:
            continue
        inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
        top_used, top_inactive = used, inactive
        limit = _read_int(d / "memory.limit_in_bytes")
        if limit is None or limit >= UNLIMITED:
            continue
        seen.append(limit)
        working = max(0, used - inactive)
        out.append(MemoryReading(max(0, limit - working), f"cgroup v1 {d}/memory.limit_in_bytes"))
    if (
        hier is not None
        and hier < UNLIMITED
        and top_used is not None
        and hier < min(seen, default=UNLIMITED)
    ):
        working = max(0, top_used - top_inactive)
        out.append(
            MemoryReading(
                max(0, hier - working),
                f"cgroup v1 {levels[0]}/memory.stat hierarchical_memory_limit",
            )
        )
    return out


def read_memory(root: str | os.PathLike[str] = "/") -> list[MemoryReading]:
    """Every memory limit found for this process (see the module docstring).

    ``root`` prefixes ``/proc`` and ``/sys`` (tests point it at a fake tree). Returns
    an empty list where none can be read (not Linux, or no ``/proc``).
    """
    base = Path(root)
    out: list[MemoryReading] = []
    for controllers, rel in _cgroup_paths(base):
        if controllers == "" and (base / "sys" / "fs" / "cgroup" / "cgroup.controllers").exists():
            out += _cgroup_v2(base, rel)
        elif "memory" in controllers.split(","):
            out += _cgroup_v1(base, rel)
    host = _meminfo(base)
    if host is not None:
        out.append(host)
    return out


class AutoBudget:
    """A budget that follows the memory available (``max_resident_bytes="auto"``).

    For each reading, the budget it allows is ``available`` plus what the caller
    holds now (unless the reading already counts that, see
    :attr:`MemoryReading.counts_cache`), minus a margin of ``margin`` (a fraction of
    that total) but at least ``min_margin`` bytes; the budget is the smallest of those.
    ``read`` returns the readings (default: :func:`read_memory` under ``root``);
    readings are refreshed when :meth:`budget` is called and ``interval`` seconds have
    passed since the last one (``clock`` measures them).
    """

    def __init__(
        self,
        read: Callable[[], Sequence[MemoryReading]] | None = None,
        *,
        root: str | os.PathLike[str] = "/",
        margin: float = 0.1,
        min_margin: int | str = "128MiB",
        interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= margin < 1:
            raise UsageError(f"margin must be a fraction in [0, 1), not {margin!r}")
        if interval < 0:
            raise UsageError(f"interval must be at least 0 seconds, not {interval!r}")
        self._read = read if read is not None else (lambda: read_memory(root))
        self.margin = margin
        self.min_margin = 0 if min_margin in (0, "0") else parse_size(min_margin)
        self.interval = interval
        self._clock = clock
        self._stamp: float | None = None
        self.readings: list[MemoryReading] = []
        """The readings the last budget came from."""

    def due(self) -> bool:
        """Whether the readings are older than :attr:`interval`."""
        return self._stamp is None or self._clock() - self._stamp >= self.interval

    def refresh(self) -> list[MemoryReading]:
        """Read the memory limits now."""
        readings = list(self._read())
        if not readings:
            raise UsageError(
                "max_resident_bytes='auto': no memory reading is available on this system "
                "(no cgroup memory limit and no /proc/meminfo); pass a size such as '4GB'"
            )
        self.readings = readings
        self._stamp = self._clock()
        return readings

    def budget(self, held: int = 0, *, force: bool = False) -> int:
        """The budget now, for a caller that holds ``held`` bytes."""
        if force or self.due() or not self.readings:
            self.refresh()
        allowed: list[int] = []
        for r in self.readings:  # never empty: refresh() refuses no readings
            total = r.available + (0 if r.counts_cache else held)
            allowed.append(max(0, total - max(self.min_margin, int(total * self.margin))))
        return min(allowed)

    def describe(self) -> str:
        """Which reading limits the budget, for messages."""
        if not self.readings:
            return "no reading yet"
        r = min(self.readings, key=lambda x: x.available)
        return f"{format_size(r.available)} available ({r.source})"

    def __repr__(self) -> str:
        return (
            f"<AutoBudget margin={self.margin} min_margin={self.min_margin:,}: {self.describe()}>"
        )


BudgetSpec = int | str | AutoBudget | None
"""What ``max_resident_bytes`` accepts: bytes, a size string, ``"auto"``, an
:class:`AutoBudget`, or None for no limit."""


def resolve_budget(spec: BudgetSpec) -> tuple[int | None, AutoBudget | None]:
    """``(fixed budget, None)`` or ``(None, automatic budget)`` for ``spec``."""
    if spec is None:
        return None, None
    if isinstance(spec, AutoBudget):
        return None, spec
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return None, AutoBudget()
    return parse_size(spec), None
