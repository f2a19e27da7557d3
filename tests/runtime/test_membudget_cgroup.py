"""``max_resident_bytes="auto"`` under cgroup v1 and v2, on fake ``/proc`` and ``/sys`` trees.

A limit set on an ancestor cgroup is shared with that ancestor's other children: what is
left is the ancestor's limit minus the ancestor's usage (which counts every child), never
minus the process's own cgroup's usage. Every level with a limit gives a reading, and the
budget follows the smallest.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from safeshard.runtime.membudget import AutoBudget, read_memory

MiB = 1024 * 1024
GiB = 1024 * MiB
UNLIMITED_V1 = 9223372036854771712  # what v1 writes for "no limit"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v1_level(root: Path, folder: str, limit: int, usage: int, **stat: int) -> None:
    d = root / "sys" / "fs" / "cgroup" / "memory" / folder.strip("/")
    write(d / "memory.limit_in_bytes", f"{limit}\n")
    write(d / "memory.usage_in_bytes", f"{usage}\n")
    write(d / "memory.stat", "".join(f"{k} {v}\n" for k, v in {"cache": 0, **stat}.items()))


def v2_level(root: Path, folder: str, limit: int | None, current: int, inactive: int = 0) -> None:
    d = root / "sys" / "fs" / "cgroup" / folder.strip("/")
    write(d / "memory.max", f"{'max' if limit is None else limit}\n")
    write(d / "memory.current", f"{current}\n")
    write(d / "memory.stat", f"anon 1\ninactive_file {inactive}\n")


def cgroup_readings(root: Path) -> list[int]:
    return [r.available for r in read_memory(root) if "cgroup" in r.source]


def test_v1_an_ancestors_limit_is_compared_with_the_ancestors_usage(tmp_path: Path) -> None:
    """The case of the issue: 1 GiB on the parent, 971 MiB of it used (mostly by a
    sibling), the process's cgroup using 190 MiB: 53 MiB are left, not 834 MiB."""
    write(tmp_path / "proc" / "self" / "cgroup", "7:memory:/batch/job\n3:cpu:/\n")
    v1_level(tmp_path, "/batch", GiB, GiB - 53 * MiB, hierarchical_memory_limit=GiB)
    v1_level(tmp_path, "/batch/sibling", UNLIMITED_V1, 781 * MiB, hierarchical_memory_limit=GiB)
    v1_level(
        tmp_path,
        "/batch/job",
        UNLIMITED_V1,
        190 * MiB,
        hierarchical_memory_limit=GiB,
        total_inactive_file=0,
    )
    assert min(cgroup_readings(tmp_path)) == 53 * MiB
    budget = AutoBudget(root=tmp_path, margin=0.0, min_margin=0)
    assert budget.budget(held=0) == 53 * MiB
    assert "/batch/memory.limit_in_bytes" in budget.describe()


def test_v1_every_level_with_a_limit_counts_and_the_tightest_wins(tmp_path: Path) -> None:
    write(tmp_path / "proc" / "self" / "cgroup", "4:memory:/a/b/c\n")
    v1_level(tmp_path, "/a", 8 * GiB, 7 * GiB + 924 * MiB)  # 100 MiB left, shared
    v1_level(tmp_path, "/a/b", UNLIMITED_V1, 3 * GiB)
    v1_level(tmp_path, "/a/b/c", 2 * GiB, GiB, total_inactive_file=512 * MiB)  # 1.5 GiB
    assert sorted(cgroup_readings(tmp_path)) == [100 * MiB, GiB + 512 * MiB]


def test_v1_a_hidden_ancestors_limit_uses_the_highest_visible_usage(tmp_path: Path) -> None:
    """The cgroup that sets ``hierarchical_memory_limit`` is not visible (a container):
    the nearest usage known is that of the highest visible level, which counts the
    process's siblings, not the process's own cgroup's."""
    write(tmp_path / "proc" / "self" / "cgroup", "4:memory:/pod/ctr\n")
    hier = {"hierarchical_memory_limit": 2 * GiB}
    v1_level(tmp_path, "/pod", UNLIMITED_V1, GiB + 768 * MiB, **hier)
    v1_level(tmp_path, "/pod/ctr", UNLIMITED_V1, 128 * MiB, **hier)
    assert cgroup_readings(tmp_path) == [256 * MiB]


def test_v2_an_ancestors_limit_is_compared_with_the_ancestors_usage(tmp_path: Path) -> None:
    write(tmp_path / "proc" / "self" / "cgroup", "0::/batch/job\n")
    write(tmp_path / "sys" / "fs" / "cgroup" / "cgroup.controllers", "cpu memory\n")
    v2_level(tmp_path, "/batch", GiB, GiB - 53 * MiB)
    v2_level(tmp_path, "/batch/sibling", None, 781 * MiB)
    v2_level(tmp_path, "/batch/job", None, 190 * MiB)
    assert cgroup_readings(tmp_path) == [53 * MiB]
    assert AutoBudget(root=tmp_path, margin=0.0, min_margin=0).budget() == 53 * MiB


# --------------------------------------------------------------------------- any tree

LEVELS = st.lists(
    st.tuples(
        st.one_of(st.none(), st.integers(64 * MiB, 64 * GiB)),  # the level's own limit
        st.integers(0, 4 * GiB),  # what the level's other children use
        st.integers(0, 512 * MiB),  # inactive page cache among the level's usage
    ),
    min_size=1,
    max_size=4,
)


def build(root: Path, version: int, levels: list[tuple[int | None, int, int]]) -> list[int]:
    """A chain of cgroups, root first, the process in the last; each level's usage is its
    child's plus what its other children use. Returns what each limited level leaves."""
    names = [f"l{i}" for i in range(len(levels))]
    rel = "/" + "/".join(names)
    if version == 1:
        write(root / "proc" / "self" / "cgroup", f"4:memory:{rel}\n")
    else:
        write(root / "proc" / "self" / "cgroup", f"0::{rel}\n")
        write(root / "sys" / "fs" / "cgroup" / "cgroup.controllers", "memory\n")
    usage = 0
    left: list[int] = []
    tightest: int | None = None
    rows = []
    for limit, others, inactive in reversed(levels):  # the process's cgroup first
        usage += others
        inactive = min(inactive, usage)
        rows.append((limit, usage, inactive))
        if limit is not None:
            tightest = limit if tightest is None else min(tightest, limit)
            left.append(max(0, limit - (usage - inactive)))
    for depth, (limit, used, inactive) in zip(range(len(rows), 0, -1), rows, strict=True):
        folder = "/".join(names[:depth])
        if version == 1:
            stat = {"total_inactive_file": inactive}
            if tightest is not None:
                stat["hierarchical_memory_limit"] = tightest
            v1_level(root, folder, UNLIMITED_V1 if limit is None else limit, used, **stat)
        else:
            v2_level(root, folder, limit, used, inactive)
    return left


@settings(max_examples=60, deadline=None)
@given(levels=LEVELS, version=st.sampled_from([1, 2]))
def test_the_tightest_reading_is_what_the_tightest_level_leaves(
    levels: list[tuple[int | None, int, int]], version: int
) -> None:
    with tempfile.TemporaryDirectory() as d:
        left = build(Path(d), version, levels)
        got = cgroup_readings(Path(d))
    if not left:
        assert got == []
    else:
        assert min(got) == min(left)
