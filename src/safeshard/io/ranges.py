"""One range coalescer: byte ranges grouped into runs, each read with one (scatter) read.

:func:`coalesce` is pure: it takes ``(offset, length)`` ranges and returns :class:`Run`
groups; it opens and reads nothing. Its users:

- :func:`safeshard.io.copier.plan_runs`: pieces of a file copied run by run (contiguous
  pieces only, at most a chunk per run);
- :func:`safeshard.runtime.readers.plan_jobs`: tensors read job by job (the same, at most
  ``IOV_MAX`` buffers per read);
- :func:`safeshard.tpplan.coalesce`: a rank's strided slice, its gaps read through
  when small, within an over-read allowance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Run", "coalesce"]


@dataclass
class Run:
    """One read: ``length`` bytes from ``offset`` (gaps read through included).

    ``parts`` are ``(range index, start inside that range, length)`` in order; the bytes
    between two parts that are not contiguous are a gap, read and dropped.
    """

    offset: int
    length: int = 0
    parts: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(
    ranges: Sequence[tuple[int, int]],
    *,
    gap: int = 0,
    allowance: int | None = None,
    max_run: int | None = None,
    max_parts: int | None = None,
    streams: Sequence[object] | None = None,
) -> list[Run]:
    """Group ``ranges`` (``(offset, length)``, in the order given) into runs, in that order.

    Two consecutive ranges share a run when the second starts at most ``gap`` bytes
    after the first ends (never before it). With ``allowance``, the gaps read through
    add up to at most ``allowance`` bytes, the smallest gaps chosen first (ties: the
    earliest). A run holds at most ``max_run`` bytes, gaps included (a longer range is
    cut over several runs), and at most ``max_parts`` parts. With ``streams`` (one
    object per range, compared by identity: a file, say), a run never spans two.
    Empty ranges are skipped: they neither take a part nor separate their neighbours.
    """
    if max_run is not None and max_run < 1:
        raise ValueError(f"max_run must be at least 1 byte, not {max_run}")
    if max_parts is not None and max_parts < 1:
        raise ValueError(f"max_parts must be at least 1, not {max_parts}")
    if streams is not None and len(streams) != len(ranges):
        raise ValueError(f"{len(streams)} streams for {len(ranges)} ranges")
    live = [i for i, (_, n) in enumerate(ranges) if n > 0]
    # bridge[k]: live[k + 1] may join the run of live[k] (the gap before it, if any, is read)
    bridge = [False] * max(0, len(live) - 1)
    gaps: list[tuple[int, int]] = []
    for k in range(len(live) - 1):
        a, b = live[k], live[k + 1]
        if streams is not None and streams[a] is not streams[b]:
            continue
        g = ranges[b][0] - (ranges[a][0] + ranges[a][1])
        if 0 <= g <= gap:
            gaps.append((g, k))
    if allowance is None:
        for _, k in gaps:
            bridge[k] = True
    else:
        left = allowance
        for g, k in sorted(gaps):
            if g > left:
                break
            left -= g
            bridge[k] = True
    runs: list[Run] = []
    cur: Run | None = None
    for k, i in enumerate(live):
        off, n = ranges[i]
        pos = 0
        joined = k > 0 and bridge[k - 1]
        while pos < n:
            hole = off + pos - cur.end if cur is not None else 0
            if (
                cur is None
                or not joined
                or (max_run is not None and cur.length + hole >= max_run)
                or (max_parts is not None and len(cur.parts) >= max_parts)
            ):
                cur = Run(off + pos)
                runs.append(cur)
                hole = 0
            take = n - pos if max_run is None else min(n - pos, max_run - cur.length - hole)
            cur.parts.append((i, pos, take))
            cur.length += hole + take
            pos += take
            joined = True  # the rest of a cut range continues where its run stopped
    return runs
