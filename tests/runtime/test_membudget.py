"""safeshard.membudget: memory readings from a fake /proc and /sys, and the automatic budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from safeshard.errors import UsageError
from safeshard.runtime.membudget import AutoBudget, MemoryReading, read_memory, resolve_budget

MiB = 1024 * 1024
GiB = 1024 * MiB


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def meminfo(root: Path, available_kb: int) -> None:
    write(
        root / "proc" / "meminfo",
        f"MemTotal:       32000000 kB\nMemFree:         1000000 kB\n"
        f"MemAvailable:   {available_kb:>8} kB\nBuffers:           31364 kB\n",
    )


def cgroup_v2(root: Path, rel: str, levels: dict[str, tuple[str, int, int]]) -> None:
    """``levels``: cgroup folder -> (memory.max, memory.current, inactive_file)."""
    write(root / "proc" / "self" / "cgroup", f"0::{rel}\n")
    write(root / "sys" / "fs" / "cgroup" / "cgroup.controllers", "cpu memory io\n")
    for folder, (limit, current, inactive) in levels.items():
        d = root / "sys" / "fs" / "cgroup" / folder.strip("/")
        write(d / "memory.max", f"{limit}\n")
        write(d / "memory.current", f"{current}\n")
        write(d / "memory.stat", f"anon 123\nfile 456\ninactive_file {inactive}\nactive_file 9\n")


def test_cgroup_v2_tightest_level_wins_and_inactive_cache_counts_as_free(tmp_path: Path) -> None:
    meminfo(tmp_path, 8 * 1024 * 1024)  # 8 GiB on the host
    cgroup_v2(
        tmp_path,
        "/user.slice/job",
        {
            "/user.slice/job": (str(2 * GiB), GiB + 512 * MiB, 256 * MiB),  # 768 MiB free
            "/user.slice": (str(4 * GiB), GiB, 0),  # 3 GiB free
            "/": ("max", 10 * GiB, 0),  # no limit at the root
        },
    )
    readings = read_memory(tmp_path)
    avail = sorted(r.available for r in readings)
    assert avail == [768 * MiB, 3 * GiB, 8 * GiB]
    host = [r for r in readings if r.counts_cache]
    assert len(host) == 1 and "MemAvailable" in host[0].source
    b = AutoBudget(root=tmp_path, margin=0.0, min_margin=0)
    assert b.budget(held=0) == 768 * MiB
    assert b.budget(held=100 * MiB) == 868 * MiB  # cgroups count what is held as used


def test_cgroup_v1_uses_the_hierarchical_limit(tmp_path: Path) -> None:
    meminfo(tmp_path, 64 * 1024 * 1024)
    write(tmp_path / "proc" / "self" / "cgroup", "5:cpu:/\n4:memory:/process_api/abc\n")
    d = tmp_path / "sys" / "fs" / "cgroup" / "memory" / "process_api" / "abc"
    write(d / "memory.limit_in_bytes", "9223372036854771712\n")  # unlimited here...
    write(d / "memory.usage_in_bytes", f"{3 * GiB}\n")
    write(
        d / "memory.stat",
        f"cache 1\nhierarchical_memory_limit {4 * GiB}\ntotal_inactive_file {GiB}\n",
    )  # ...but 4 GiB above
    readings = read_memory(tmp_path)
    v1 = [r for r in readings if "cgroup v1" in r.source]
    assert [r.available for r in v1] == [4 * GiB - (3 * GiB - GiB)]


def test_a_container_with_its_cgroup_mounted_at_the_root(tmp_path: Path) -> None:
    write(tmp_path / "proc" / "self" / "cgroup", "0::/kubepods/pod1/ctr\n")
    write(tmp_path / "sys" / "fs" / "cgroup" / "cgroup.controllers", "memory\n")
    base = tmp_path / "sys" / "fs" / "cgroup"
    write(base / "memory.max", f"{GiB}\n")
    write(base / "memory.current", f"{256 * MiB}\n")
    assert [r.available for r in read_memory(tmp_path)] == [768 * MiB]


def test_no_reading_at_all_is_a_usage_error(tmp_path: Path) -> None:
    assert read_memory(tmp_path) == []
    with pytest.raises(UsageError, match="pass a size"):
        AutoBudget(root=tmp_path).budget()


def test_the_budget_keeps_a_margin_and_follows_the_readings() -> None:
    now = [0.0]
    value = [GiB]
    calls = [0]

    def read() -> list[MemoryReading]:
        calls[0] += 1
        return [MemoryReading(value[0], "fake")]

    b = AutoBudget(read, margin=0.25, min_margin=64 * MiB, interval=1.0, clock=lambda: now[0])
    assert b.budget() == GiB - GiB // 4
    value[0] = 128 * MiB
    assert b.budget() == GiB - GiB // 4  # not re-read before the interval
    now[0] = 1.0
    assert b.due()
    assert b.budget() == 64 * MiB  # the minimum margin, not 25%
    value[0] = 10 * MiB
    assert b.budget(force=True) == 0  # never negative
    assert calls[0] == 3
    assert "fake" in b.describe()


def test_host_readings_already_count_the_page_cache_held() -> None:
    b = AutoBudget(
        lambda: [MemoryReading(GiB, "host", counts_cache=True)], margin=0.0, min_margin=0
    )
    assert b.budget(held=512 * MiB) == GiB


def test_resolve_budget_spellings() -> None:
    assert resolve_budget(None) == (None, None)
    assert resolve_budget("2GB") == (2_000_000_000, None)
    assert resolve_budget(1234) == (1234, None)
    fixed, auto = resolve_budget(" Auto ")
    assert fixed is None and isinstance(auto, AutoBudget)
    mine = AutoBudget(lambda: [MemoryReading(1, "x")])
    assert resolve_budget(mine) == (None, mine)
    with pytest.raises(UsageError):
        AutoBudget(margin=1.5)
