"""safeshard.mapped: zero-copy tensors over mapped shards, populated and released by page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import safeshard
from conftest import write_st
from safeshard.checkpoint import open_checkpoint
from safeshard.runtime.mapped import PAGE, MappedShards
from safeshard.runtime.readers import ShardFiles, TorchBackend


def fill(name: str, n: int) -> bytes:
    return np.random.default_rng([len(name), n]).bytes(n)


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    # "a" ends and "b" starts inside one page; "big" spans many pages; "odd" is misaligned
    return write_st(
        tmp_path / "model.safetensors",
        {
            "a": ("F32", [1000]),
            "b": ("F32", [1000]),
            "big": ("F16", [64, 1024]),
            "odd": ("U8", [3]),
            "odd16": ("F16", [5]),
            "empty": ("F32", [0, 4]),
        },
        fill=fill,
    )


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def mapped(maps: MappedShards, path: Path, start: int, end: int) -> list[bool]:
    """For each page of file bytes ``[start, end)``: is it mapped in this process now
    (the present bit of /proc/self/pagemap)?"""
    base = maps._maps[str(path)].base
    out = []
    with open("/proc/self/pagemap", "rb") as f:
        for page in range(start // PAGE, (end - 1) // PAGE + 1):
            f.seek((base // PAGE + page) * 8)
            out.append(bool(int.from_bytes(f.read(8), "little") >> 63))
    return out


def open_maps(path: Path) -> tuple[MappedShards, ShardFiles]:
    files = ShardFiles(open_checkpoint(path))
    return MappedShards(files, TorchBackend(), workers=2), files


def test_views_hold_the_same_values_as_a_load(shard: Path) -> None:
    want = safeshard.load(shard)
    maps, files = open_maps(shard)
    try:
        for name, expected in want.items():
            info = files.ckpt.entries[name].info
            t = maps.tensor(info)
            assert t.dtype == expected.dtype and t.shape == expected.shape
            assert raw(t) == raw(expected), name  # random bytes: compare bytes, not floats
        rows = maps.read_rows(files.ckpt.entries["big"].info, [5, 0, 63])
        assert raw(rows) == raw(want["big"][[5, 0, 63]])
    finally:
        maps.close()
        files.close()


def test_release_keeps_pages_shared_with_a_held_neighbour(shard: Path) -> None:
    maps, files = open_maps(shard)
    try:
        a, b = (maps.extent(files.ckpt.entries[n].info) for n in ("a", "b"))
        assert a.end == b.offset and a.end % PAGE  # they share a page
        maps.hold([a, b])
        assert maps.populate([a, b]) == 8000
        assert all(mapped(maps, shard, a.offset, b.end))
        maps.release([a])
        shared = b.offset // PAGE * PAGE
        assert a.offset < shared and not any(mapped(maps, shard, a.offset, shared))  # a's own
        assert all(mapped(maps, shard, b.offset, b.end))  # the page shared with b stays
        maps.release([b])
        assert not any(mapped(maps, shard, a.offset, b.end))
        assert maps.bytes_populated == 8000
    finally:
        maps.close()
        files.close()


def test_released_tensors_stay_readable(shard: Path) -> None:
    maps, files = open_maps(shard)
    try:
        info = files.ckpt.entries["big"].info
        e = maps.extent(info)
        maps.hold([e])
        maps.populate([e])
        t = maps.tensor(info)
        before = raw(t)
        maps.release([e])
        assert raw(t) == before  # the pages are read again on touch
    finally:
        maps.close()
        files.close()


def test_unsupported_raw_gives_the_stored_bytes_flat(tmp_path: Path) -> None:
    # F4 has no torch dtype: with unsupported="raw" a view is its stored bytes, as load gives
    f = write_st(tmp_path / "m.safetensors", {"f4": ("F4", [4, 8]), "none": ("F4", [0])}, fill=fill)
    want = safeshard.load(f, unsupported="raw")
    files = ShardFiles(open_checkpoint(f))
    maps = MappedShards(files, TorchBackend(), workers=1, unsupported="raw")
    try:
        info = files.ckpt.entries["f4"].info
        t = maps.tensor(info)
        assert t.dtype == torch.uint8 and raw(t) == raw(want["f4"])
        rows = maps.read_rows(info, [3, 1])
        assert (
            tuple(rows.shape) == (2, 4)
            and raw(rows) == raw(want["f4"])[12:16] + raw(want["f4"])[4:8]
        )
        empty = maps.tensor(files.ckpt.entries["none"].info)
        assert empty.dtype == torch.uint8 and empty.numel() == 0
        strict = MappedShards(files, TorchBackend(), workers=1)
        with pytest.raises(safeshard.UnsupportedDtypeError):
            strict.tensor(info)
        strict.close()
    finally:
        maps.close()
        files.close()
