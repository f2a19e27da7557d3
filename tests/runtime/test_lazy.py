"""safeshard.open: lazy reads, layer walks in model order, the budget, prefetch, lifetime."""

from __future__ import annotations

import importlib
import itertools
import os
import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeshard
from conftest import write_st
from helpers.reads import in_header_read
from safeshard.checkpoint import read_header
from safeshard.errors import (
    BudgetError,
    CheckpointClosedError,
    HeaderError,
    SafeshardError,
    UsageError,
)
from safeshard.format.blocks import group_tensors, model_order
from safeshard.format.header import tensor_nbytes
from safeshard.format.index import index_json, shard_name
from safeshard.io.bytesrc import LocalFile
from safeshard.ops.synth import PRESETS, synthesize

L = importlib.import_module("safeshard.runtime.readers")


def fill(name: str, n: int) -> bytes:
    return np.random.default_rng([len(name), n, sum(map(ord, name))]).bytes(n)


def tbytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def llama_tensors(layers: int, hidden: int = 16) -> dict[str, tuple[str, list[int]]]:
    """A small Llama-shaped, GPTQ-ish tensor set, written in a scrambled (non-model) order."""
    t: dict[str, tuple[str, list[int]]] = {
        "lm_head.weight": ("F16", [8, hidden]),
        "model.norm.weight": ("F16", [hidden]),
    }
    for i in reversed(range(layers)):
        p = f"model.layers.{i}"
        t[f"{p}.self_attn.q_proj.qweight"] = ("I32", [hidden // 8, hidden])
        t[f"{p}.self_attn.q_proj.scales"] = ("F16", [1, hidden])
        t[f"{p}.mlp.up_proj.qweight"] = ("I32", [hidden // 8, 2 * hidden])
        t[f"{p}.input_layernorm.weight"] = ("F16", [hidden])
    t["model.embed_tokens.weight"] = ("F16", [8, hidden])
    return t


def sharded(folder: Path, tensors: dict[str, tuple[str, list[int]]], n: int) -> Path:
    names = list(tensors)
    per = -(-len(names) // n)
    weight_map = {}
    for i in range(n):
        part = {k: tensors[k] for k in names[i * per : (i + 1) * per]}
        fname = shard_name("model", i + 1, n)
        write_st(folder / fname, part, {"format": "pt"}, fill=fill)
        weight_map.update(dict.fromkeys(part, fname))
    index = folder / "model.safetensors.index.json"
    index.write_bytes(index_json(weight_map, {}))
    return index


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return sharded(tmp_path, llama_tensors(6), 3)


class Reads:
    """Instruments the one read function: records (path, offset, length) of every read of
    tensor data (the headers' reads are left out)."""

    def __init__(self, monkeypatch: Any) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.lock = threading.Lock()
        self.hooks: list[Any] = []
        real = LocalFile.readinto

        def spy(src: LocalFile, buffers: Sequence[memoryview], offset: int) -> int:
            if in_header_read():  # headers are read at open; these tests count tensor reads
                return real(src, buffers, offset)
            n = sum(len(b) for b in buffers)
            with self.lock:
                self.calls.append((src.fd, offset, n))
            for h in self.hooks:
                h(src.fd, offset, n)
            return real(src, buffers, offset)

        monkeypatch.setattr(LocalFile, "readinto", spy)


def offsets_of(index: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (file, absolute offset, nbytes), read from the headers independently."""
    out = {}
    for p in sorted(index.parent.glob("model-*.safetensors")):
        h = read_header(p)
        for t in h.tensors:
            out[t.name] = (str(p), h.data_start + t.begin, t.nbytes)
    return out


def expected(index: Path) -> dict[str, bytes]:
    out = {}
    for name, (path, off, n) in offsets_of(index).items():
        with open(path, "rb") as f:
            f.seek(off)
            out[name] = f.read(n)
    return out


# --------------------------------------------------------------------------- mapping


def test_one_access_reads_only_that_tensors_bytes(ckpt: Path, monkeypatch: Any) -> None:
    reads = Reads(monkeypatch)
    where = offsets_of(ckpt)
    name = "model.layers.3.mlp.up_proj.qweight"
    with safeshard.open(ckpt) as lc:
        assert reads.calls == []  # opening reads no tensor data
        t = lc[name]
        fd_path = {fd: p for p, fd in lc._files.fds.items()}
        assert [(fd_path[fd], off, n) for fd, off, n in reads.calls] == [where[name]]
        assert tbytes(t) == expected(ckpt)[name]
        assert t.dtype == torch.int32 and list(t.shape) == [2, 32]
        assert lc[name] is t  # held: a second access reads nothing
        assert len(reads.calls) == 1


def test_mapping_surface(ckpt: Path, monkeypatch: Any) -> None:
    reads = Reads(monkeypatch)
    names = list(llama_tensors(6))
    with safeshard.open(ckpt) as lc:
        assert list(lc.keys()) == model_order(names)
        assert len(lc) == len(names)
        assert "model.norm.weight" in lc and "nope" not in lc
        assert lc.metadata == {"format": "pt"}
        assert lc.info("model.norm.weight").shape == (16,)
        with pytest.raises(KeyError):
            lc["nope"]
        assert reads.calls == []  # none of the above reads data
        assert lc.get("nope") is None
        assert set(lc.items()) and all(tbytes(v) == expected(ckpt)[k] for k, v in lc.items())


def test_layers_group_exactly_as_the_planner(ckpt: Path) -> None:
    names = list(llama_tensors(6))
    with safeshard.open(ckpt) as lc:
        assert lc.layers() == group_tensors(model_order(names))


def test_iter_layers_yields_in_model_order(ckpt: Path) -> None:
    want = (
        ["model.embed_tokens.weight"]
        + [f"model.layers.{i}" for i in range(6)]
        + ["model.norm.weight", "lm_head.weight"]
    )
    data = expected(ckpt)
    for prefetch in (0, 1, 3):
        with safeshard.open(ckpt, prefetch=prefetch) as lc:
            got = []
            for key, tensors in lc.iter_layers():
                got.append(key)
                block = [n for n in data if n == key or n.startswith(key + ".")]
                assert sorted(tensors) == sorted(block)
                assert all(tbytes(t) == data[n] for n, t in tensors.items())
            assert got == want


def test_layers_beyond_nine_come_in_numeric_order(tmp_path: Path) -> None:
    f = sharded(tmp_path, llama_tensors(12, hidden=8), 2)
    with safeshard.open(f) as lc:
        keys = [k for k, _ in lc.iter_layers()]
    blocks = [k for k in keys if k.startswith("model.layers.")]
    assert blocks == [f"model.layers.{i}" for i in range(12)]


# --------------------------------------------------------------------------- budget


def layer_bytes(lc: Any) -> dict[str, int]:
    return {g.key: lc.nbytes(g) for g in lc.layers()}


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("slack", [0, 1, 3])
def test_walk_never_holds_more_than_the_budget(
    ckpt: Path, monkeypatch: Any, prefetch: int, slack: int
) -> None:
    reads = Reads(monkeypatch)
    with safeshard.open(ckpt, prefetch=prefetch) as probe:
        sizes = layer_bytes(probe)
    budget = max(sizes.values()) * (1 + slack)
    seen: list[int] = []
    with safeshard.open(ckpt, max_resident_bytes=budget, prefetch=prefetch, workers=2) as lc:
        reads.hooks.append(lambda *a: seen.append(lc.resident_bytes))
        for _key, tensors in lc.iter_layers():
            seen.append(lc.resident_bytes)
            assert set(tensors) <= set(lc.held)  # the yielded layer is held, and counted
            del tensors
        assert lc.peak_resident_bytes <= budget
    assert seen and max(seen) <= budget
    assert len(reads.calls) >= len(sizes)


def test_holdings_are_released_oldest_first(ckpt: Path) -> None:
    names = [n for n in model_order(list(llama_tensors(6))) if ".layers." in n]
    one = tensor_nbytes("I32", [2, 32])  # the largest of them
    with safeshard.open(ckpt, max_resident_bytes=3 * one) as lc:
        order: list[str] = []
        for n in names:
            lc[n]
            order.append(n)
            held = lc.held
            assert held == order[len(order) - len(held) :]  # a suffix: oldest went first
            assert lc.resident_bytes <= 3 * one


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=40), mult=st.integers(1, 4))
def test_random_access_keeps_holdings_in_budget(
    tmp_path_factory: Any, picks: list[int], mult: int
) -> None:
    folder = tmp_path_factory.mktemp("lazy")
    index = sharded(folder, llama_tensors(3, hidden=8), 2)
    data = expected(index)
    names = sorted(data)
    budget = max(len(b) for b in data.values()) * mult
    with safeshard.open(index, max_resident_bytes=budget) as lc:
        for p in picks:
            n = names[p % len(names)]
            assert tbytes(lc[n]) == data[n]
            assert lc.resident_bytes <= budget
            assert sum(len(data[h]) for h in lc.held) == lc.resident_bytes


def test_block_over_budget_is_an_error_before_any_read(ckpt: Path, monkeypatch: Any) -> None:
    reads = Reads(monkeypatch)
    with safeshard.open(ckpt) as probe:
        sizes = layer_bytes(probe)
    block = "model.layers.0"
    budget = sizes[block] - 1
    assert sizes["model.embed_tokens.weight"] <= budget
    with safeshard.open(ckpt, max_resident_bytes=budget) as lc:
        with pytest.raises(BudgetError) as e:
            lc.iter_layers()
        msg = str(e.value)
        assert block in msg and f"{sizes[block]:,}" in msg and f"{budget:,}" in msg
        assert reads.calls == []
        assert isinstance(e.value, MemoryError)


def test_tensor_over_budget_is_an_error(ckpt: Path) -> None:
    name = "model.layers.2.mlp.up_proj.qweight"
    with safeshard.open(ckpt, max_resident_bytes="100B") as lc:
        with pytest.raises(BudgetError, match=r"up_proj\.qweight"):
            lc[name]
        assert lc.resident_bytes == 0


def test_access_that_cannot_be_held_is_returned_unheld(ckpt: Path) -> None:
    """During a walk the current layer is pinned; a random read that does not fit beside
    it is still returned, but not held (it is the caller's alone)."""
    with safeshard.open(ckpt, prefetch=0) as probe:
        sizes = layer_bytes(probe)
    budget = sizes["model.layers.0"]
    with safeshard.open(ckpt, max_resident_bytes=budget, prefetch=0) as lc:
        for key, _layer in lc.iter_layers():
            if key == "model.layers.0":
                other = lc["model.layers.5.mlp.up_proj.qweight"]
                assert tbytes(other) == expected(ckpt)["model.layers.5.mlp.up_proj.qweight"]
                assert "model.layers.5.mlp.up_proj.qweight" not in lc.held
                assert lc.resident_bytes <= budget
                break


# --------------------------------------------------------------------------- prefetch


def block_of(where: dict[str, tuple[str, int, int]], lc: Any) -> dict[tuple[str, int], str]:
    out = {}
    for g in lc.layers():
        for n in g.tensors:
            path, off, _ = where[n]
            out[(path, off)] = g.key
    return out


def test_prefetch_reads_the_next_layer_while_the_caller_works(ckpt: Path, monkeypatch: Any) -> None:
    reads = Reads(monkeypatch)
    where = offsets_of(ckpt)
    events: list[tuple[str, str]] = []
    started: dict[str, threading.Event] = {}
    with safeshard.open(ckpt, prefetch=1, workers=1) as lc:
        keys = [g.key for g in lc.layers()]
        started = {k: threading.Event() for k in keys}
        owner = block_of(where, lc)
        fd_path = {fd: p for p, fd in lc._files.fds.items()}

        def on_read(fd: int, offset: int, n: int) -> None:
            key = owner[(fd_path[fd], offset)]
            events.append(("read", key))
            started[key].set()

        reads.hooks.append(on_read)
        for i, (key, _tensors) in enumerate(lc.iter_layers()):
            events.append(("got", key))
            if i + 1 < len(keys):
                # the caller is still inside layer i: layer i+1 must be read now
                assert started[keys[i + 1]].wait(timeout=30), f"no prefetch of {keys[i + 1]}"
                events.append(("seen-ahead", keys[i + 1]))
            events.append(("done", key))
    # never more than `prefetch` (1) layer ahead: layer i+2 is read only after layer i is done
    pos = {e: n for n, e in enumerate(events)}
    for i in range(len(keys) - 2):
        first_read = min(n for n, e in enumerate(events) if e == ("read", keys[i + 2]))
        assert first_read > pos[("done", keys[i])]


def test_without_prefetch_reads_wait_for_the_caller(ckpt: Path, monkeypatch: Any) -> None:
    reads = Reads(monkeypatch)
    where = offsets_of(ckpt)
    events: list[tuple[str, str]] = []
    with safeshard.open(ckpt, prefetch=0) as lc:
        owner = block_of(where, lc)
        fd_path = {fd: p for p, fd in lc._files.fds.items()}
        reads.hooks.append(lambda fd, off, n: events.append(("read", owner[(fd_path[fd], off)])))
        keys = []
        for key, _ in lc.iter_layers():
            keys.append(key)
            events.append(("done", key))
    # each layer's reads come strictly after the previous layer is done
    for prev, key in itertools.pairwise(keys):
        done = events.index(("done", prev))
        assert all(n > done for n, e in enumerate(events) if e == ("read", key))


def test_reader_failure_reaches_the_caller_at_that_layer(ckpt: Path, monkeypatch: Any) -> None:
    reads = Reads(monkeypatch)
    where = offsets_of(ckpt)
    bad = where["model.layers.2.self_attn.q_proj.qweight"]

    def boom(fd: int, offset: int, n: int) -> None:
        if offset == bad[1]:
            raise OSError(5, "simulated I/O error")

    reads.hooks.append(boom)
    with safeshard.open(ckpt, prefetch=2, workers=1) as lc:
        got = []
        with pytest.raises(OSError, match="simulated"):
            for key, _ in lc.iter_layers():
                got.append(key)
        assert got == ["model.embed_tokens.weight", "model.layers.0", "model.layers.1"]


def test_abandoned_walk_stops_its_reader(ckpt: Path) -> None:
    before = threading.active_count()
    with safeshard.open(ckpt, prefetch=2, max_resident_bytes="1MB") as lc:
        walk = lc.iter_layers()
        assert isinstance(walk, Generator)  # typed an Iterator; its docstring promises close()
        next(walk)
        next(walk)
        walk.close()
        assert lc.resident_bytes <= 1_000_000
        assert next(k for k, _ in lc.iter_layers()) == "model.embed_tokens.weight"  # walks again
    assert threading.active_count() <= before


# --------------------------------------------------------------------------- lifetime and bad input


def test_truncated_shard_fails_at_open_not_mid_walk(ckpt: Path, monkeypatch: Any) -> None:
    reads = Reads(monkeypatch)
    victim = ckpt.parent / shard_name("model", 3, 3)
    os.truncate(victim, victim.stat().st_size - 1)
    with pytest.raises(HeaderError) as e:
        safeshard.open(ckpt)
    assert victim.name in str(e.value)
    assert reads.calls == []


def test_shard_replaced_after_header_read_is_caught(ckpt: Path, monkeypatch: Any) -> None:
    real = L.ShardFiles.__init__
    victim = ckpt.parent / shard_name("model", 2, 3)

    def grow_then_open(self: Any, c: Any) -> None:
        with open(victim, "ab") as f:
            f.write(b"\0" * 8)
        real(self, c)

    monkeypatch.setattr(L.ShardFiles, "__init__", grow_then_open)
    with pytest.raises(SafeshardError, match="changed"):
        safeshard.open(ckpt)


def test_context_manager_closes_files(ckpt: Path) -> None:
    with safeshard.open(ckpt, max_resident_bytes="1MB") as lc:
        fds = list(lc._files.fds.values())
        assert len(fds) == 3
        for fd in fds:
            os.fstat(fd)
        lc["model.norm.weight"]
    assert lc.closed
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(CheckpointClosedError):
        lc["model.norm.weight"]
    with pytest.raises(CheckpointClosedError):
        lc.iter_layers()
    lc.close()  # twice is fine


def test_bad_arguments(ckpt: Path) -> None:
    with pytest.raises(ValueError, match="prefetch"):
        safeshard.open(ckpt, prefetch=-1)
    with pytest.raises(ValueError, match="workers"):
        safeshard.open(ckpt, workers=0)
    with pytest.raises(SafeshardError):
        safeshard.open(ckpt, max_resident_bytes="12 bits")


def test_numpy_framework(ckpt: Path) -> None:
    data = expected(ckpt)
    with safeshard.open(ckpt, framework="numpy", max_resident_bytes="64KiB") as lc:
        for _key, arrays in lc.iter_layers():
            for n, a in arrays.items():
                assert isinstance(a, np.ndarray) and a.tobytes() == data[n]


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p.startswith("tiny")))
def test_tiny_presets_walk_equals_load(tmp_path: Path, preset: str) -> None:
    folder = synthesize(tmp_path / preset, preset, tokenizer=False)
    full = safeshard.load(folder)
    with safeshard.open(folder) as probe:
        biggest = max(probe.nbytes(g) for g in probe.layers())
        order = [g.key for g in probe.layers()]
    with safeshard.open(folder, max_resident_bytes=biggest * 2, prefetch=1) as lc:
        seen: dict[str, Any] = {}
        keys = []
        for key, tensors in lc.iter_layers():
            keys.append(key)
            seen.update(tensors)
            assert lc.resident_bytes <= biggest * 2
        assert keys == order
    assert set(seen) == set(full)
    for n, t in full.items():
        assert seen[n].dtype == t.dtype and tbytes(seen[n]) == tbytes(t)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_walk_holds_at_most_prefetch_plus_one_layers(ckpt: Path, prefetch: int) -> None:
    with safeshard.open(ckpt, prefetch=prefetch) as lc:
        sizes = list(layer_bytes(lc).values())
        kept = lc["model.layers.4.mlp.up_proj.qweight"]  # held before the walk: stays held
        extra = kept.numel() * kept.element_size()
        for _key, tensors in lc.iter_layers():
            del tensors
        window = max(sum(sizes[i : i + prefetch + 1]) for i in range(len(sizes)))
        assert lc.peak_resident_bytes <= window + extra
        assert lc.held == ["model.layers.4.mlp.up_proj.qweight"]
        assert lc.resident_bytes == extra


def test_one_budgeted_walk_at_a_time(ckpt: Path) -> None:
    """Two walks under one budget could wait on each other forever: refused, not hung."""
    with safeshard.open(ckpt, max_resident_bytes="4KB", prefetch=1) as lc:
        first = lc.iter_layers()
        assert isinstance(first, Generator)  # typed an Iterator; its docstring promises close()
        next(first)
        with pytest.raises(UsageError, match="close"):
            lc.iter_layers()
        first.close()
        assert len(list(lc.iter_layers())) == len(lc.layers())
    with safeshard.open(ckpt, prefetch=1) as lc:  # without a budget, walks may interleave
        pairs = list(zip(lc.iter_layers(), lc.iter_layers(), strict=True))
        assert [a[0] for a, _ in pairs] == [b[0] for _, b in pairs]
