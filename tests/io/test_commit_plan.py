"""The one commit plan both output transactions apply (safeshard.io.journal.commit_plan)."""

from __future__ import annotations

from safeshard.format.filenames import STAGE_PREFIX, temp_name
from safeshard.io.journal import Step, commit_plan, removal_order

FINALS = {"m.safeshard.json": b"manifest", "m.safetensors.index.json": b"index"}


def test_shards_change_old_finals_go_first_index_before_manifest_and_come_back_last() -> None:
    there = {"m.safeshard.json", "m.safetensors.index.json", "old.safetensors"}
    tmp = temp_name("a.safetensors", stage=True)
    plan = commit_plan(
        [(tmp, "a.safetensors")],
        ["old.safetensors"],
        FINALS,
        exists=there.__contains__,
        current=lambda n: None,
    )
    assert plan == [
        Step("rm", "m.safetensors.index.json"),
        Step("rm", "m.safeshard.json"),
        Step("mv", "a.safetensors", tmp=tmp),
        Step("rm", "old.safetensors"),
        Step("put", "m.safeshard.json", data=b"manifest"),
        Step("put", "m.safetensors.index.json", data=b"index"),
    ]
    assert tmp.startswith(STAGE_PREFIX)


def test_nothing_changes_only_finals_whose_bytes_differ_are_written() -> None:
    now = {"m.safeshard.json": b"manifest", "m.safetensors.index.json": b"stale"}
    plan = commit_plan([], [], FINALS, exists=now.__contains__, current=now.get)
    assert plan == [Step("put", "m.safetensors.index.json", data=b"index")]
    assert commit_plan([], [], dict(now), exists=now.__contains__, current=now.get) == []


def test_a_final_the_new_checkpoint_lacks_is_removed_only_when_there() -> None:
    finals: dict[str, bytes | None] = {"m.safeshard.json": None}
    assert commit_plan([], [], finals, exists=lambda n: True, current=lambda n: None) == [
        Step("rm", "m.safeshard.json")
    ]
    assert commit_plan([], [], finals, exists=lambda n: False, current=lambda n: None) == []


def test_removal_order_indexes_then_manifests_then_the_rest() -> None:
    names = ["b.safetensors", "m.safeshard.json", "a.safetensors", "m.index.json"]
    assert removal_order(names) == [
        "m.index.json",
        "m.safeshard.json",
        "a.safetensors",
        "b.safetensors",
    ]
