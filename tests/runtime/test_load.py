"""safeshard.load: parallel positional reads, byte-identical to safetensors, every dtype."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeshard
from conftest import write_st
from helpers.reads import in_header_read
from safeshard.checkpoint import read_header
from safeshard.errors import (
    DeviceError,
    MissingExtraError,
    ReadError,
    SafeshardError,
    UnsupportedDtypeError,
)
from safeshard.format.header import DTYPE_BITS, tensor_nbytes
from safeshard.format.index import index_json, shard_name
from safeshard.io.bytesrc import Extent, LocalFile
from safeshard.ops.synth import PRESETS, synthesize

# `safeshard.load` is the function; the module is reached through sys.modules.
L = importlib.import_module("safeshard.runtime.readers")

TORCH_DTYPES = sorted(d for d, attr in L.TORCH_DTYPES.items() if hasattr(torch, attr))
SUBBYTE = ("F4", "F6_E2M3", "F6_E3M2")
SHAPES: tuple[tuple[int, ...], ...] = ((), (0,), (3, 0, 2), (5,), (2, 3), (4, 1, 3))


def rand_fill(seed: int = 0) -> Any:
    def fill(name: str, n: int) -> bytes:
        return np.random.default_rng([seed, len(name), n]).bytes(n)

    return fill


def file_bytes(path: Path, name: str) -> bytes:
    """The stored bytes of tensor ``name``, read independently of safeshard.load."""
    h = read_header(path)
    t = h.by_name[name]
    with open(path, "rb") as f:
        f.seek(h.data_start + t.begin)
        return f.read(t.nbytes)


def tbytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_torch(ours: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> None:
    assert set(ours) == set(ref)
    for name, r in ref.items():
        t = ours[name]
        assert t.dtype == r.dtype, name
        assert tuple(t.shape) == tuple(r.shape), name
        assert t.device.type == "cpu"
        assert tbytes(t) == tbytes(r), name


def all_dtypes_file(path: Path, dtypes: Sequence[str], seed: int = 0) -> Path:
    tensors = {f"t.{d}.{i}": (d, list(s)) for d in dtypes for i, s in enumerate(SHAPES)}
    return write_st(path, tensors, {"format": "pt"}, fill=rand_fill(seed))


# --------------------------------------------------------------------------- dtypes


def test_every_torch_dtype_matches_safetensors_or_stored_bytes(tmp_path: Path) -> None:
    f = all_dtypes_file(tmp_path / "m.safetensors", TORCH_DTYPES)
    ours = safeshard.load(f)
    assert len(ours) == len(TORCH_DTYPES) * len(SHAPES)
    ref = safetensors.torch.load_file(f)
    assert_same_torch(ours, ref)
    # and the stored bytes themselves, read without either library
    for name, t in ours.items():
        dtype = name.split(".")[1]
        assert t.dtype == getattr(torch, L.TORCH_DTYPES[dtype]), name
        assert tbytes(t) == file_bytes(f, name), name


def test_bf16_and_fp8_values_round_trip(tmp_path: Path) -> None:
    src = {
        "bf16": torch.randn(17, 5).to(torch.bfloat16),
        "fp8": torch.randn(64).to(torch.float8_e4m3fn),
        "fp8b": torch.randn(3, 3).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
    f = tmp_path / "v.safetensors"
    safetensors.torch.save_file(src, f)
    ours = safeshard.load(f, workers=3)
    for k, v in src.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape
        assert (
            torch.equal(ours[k].view(torch.uint8), v.view(torch.uint8))
            if v.dim()
            else (tbytes(ours[k]) == tbytes(v))
        )


def test_tensors_are_owned_and_writable(tmp_path: Path) -> None:
    f = all_dtypes_file(tmp_path / "m.safetensors", ["F32", "I64"])
    a = safeshard.load(f)
    b = safeshard.load(f)
    t = a["t.F32.4"]
    t.add_(1.0)  # writable, and not shared with another load
    assert tbytes(b["t.F32.4"]) == file_bytes(f, "t.F32.4")
    assert tbytes(t) != file_bytes(f, "t.F32.4")
    assert t.is_contiguous()


@pytest.mark.parametrize("dtype", SUBBYTE)
def test_subbyte_dtypes_are_an_error_or_raw(tmp_path: Path, dtype: str) -> None:
    f = write_st(tmp_path / "s.safetensors", {"packed": (dtype, [4, 8])}, fill=rand_fill())
    with pytest.raises(UnsupportedDtypeError) as e:
        safeshard.load(f)
    assert "'packed'" in str(e.value) and dtype in str(e.value) and "raw" in str(e.value)
    raw = safeshard.load(f, unsupported="raw")["packed"]
    assert raw.dtype == torch.uint8 and raw.dim() == 1
    assert tbytes(raw) == file_bytes(f, "packed")
    assert raw.numel() == tensor_nbytes(dtype, [4, 8])


def test_unsupported_must_be_error_or_raw(tmp_path: Path) -> None:
    f = write_st(tmp_path / "s.safetensors", {"x": ("F4", [2])})
    with pytest.raises(ValueError, match="unsupported"):
        safeshard.load(f, unsupported="skip")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- numpy


def test_numpy_matches_safetensors_numpy(tmp_path: Path) -> None:
    dtypes = sorted(L.NUMPY_DTYPES)
    f = all_dtypes_file(tmp_path / "n.safetensors", dtypes, seed=3)
    ours = safeshard.load(f, framework="numpy")
    ref = safetensors.numpy.load_file(str(f))
    assert set(ours) == set(ref)
    for k, r in ref.items():
        a = ours[k]
        assert isinstance(a, np.ndarray)
        assert a.dtype == r.dtype and a.shape == r.shape, k
        assert a.tobytes() == r.tobytes() == file_bytes(f, k), k
        assert a.flags.writeable and a.flags.c_contiguous


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4"])
def test_numpy_lacks_bf16_and_fp8(tmp_path: Path, dtype: str) -> None:
    f = write_st(tmp_path / "b.safetensors", {"w": (dtype, [2, 4])}, fill=rand_fill())
    with pytest.raises(UnsupportedDtypeError) as e:
        safeshard.load(f, framework="numpy")
    assert "'w'" in str(e.value) and dtype in str(e.value)
    raw = safeshard.load(f, framework="numpy", unsupported="raw")["w"]
    assert raw.dtype == np.uint8 and raw.tobytes() == file_bytes(f, "w")


# --------------------------------------------------------------------------- layouts


def write_sharded(folder: Path, tensors: dict[str, tuple[str, list[int]]], nshards: int) -> Path:
    """Spread ``tensors`` round-robin over ``nshards`` files with an index; returns the index."""
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for i in range(nshards):
        part = {n: tensors[n] for n in names[i::nshards]}
        fname = shard_name("model", i + 1, nshards)
        write_st(folder / fname, part, {"format": "pt"}, fill=rand_fill(i))
        weight_map.update({n: fname for n in part})
    index = folder / "model.safetensors.index.json"
    index.write_bytes(index_json(weight_map, {"total_size": 0}))
    return index


def reference(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in paths:
        out.update(safetensors.torch.load_file(p))
    return out


def test_single_file_folder_and_index_all_load(tmp_path: Path) -> None:
    tensors = {
        f"model.layers.{i}.{m}": (d, [i + 1, 7])
        for i in range(6)
        for m, d in (("q.weight", "F16"), ("k.weight", "BF16"), ("g_idx", "I32"))
    }
    single = write_st(tmp_path / "one" / "model.safetensors", tensors, fill=rand_fill())
    index = write_sharded(tmp_path / "many", tensors, 3)
    shards = sorted((tmp_path / "many").glob("model-*.safetensors"))
    ref_single = reference([single])
    ref_many = reference(shards)
    assert_same_torch(safeshard.load(single), ref_single)
    assert_same_torch(safeshard.load(single.parent), ref_single)
    assert_same_torch(safeshard.load(index), ref_many)
    assert_same_torch(safeshard.load(index.parent, workers=1), ref_many)


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p.startswith("tiny")))
def test_tiny_presets_match_safetensors(tmp_path: Path, preset: str) -> None:
    folder = synthesize(tmp_path / preset, preset, tokenizer=False)
    files = sorted(folder.glob("*.safetensors"))
    ref = reference(files)
    for workers in (1, 4):
        assert_same_torch(safeshard.load(folder, workers=workers), ref)
    # and split into shards with an index, as safeshard split writes them
    out = tmp_path / f"{preset}-split"
    safeshard.split(files[0], out, max_shard_size=ref_bytes(ref) // 3 + 4096)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    assert_same_torch(safeshard.load(out), ref)
    arrays = safeshard.load(out, framework="numpy", unsupported="raw")
    for k, r in ref.items():
        assert arrays[k].tobytes() == tbytes(r)


def ref_bytes(ref: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ref.values())


# --------------------------------------------------------------------------- read jobs


spans_strategy = st.lists(
    st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 300)), min_size=0, max_size=25
)


@given(spans_strategy, st.integers(1, 200))
def test_plan_jobs_cover_every_byte_once_within_chunk(
    sizes: list[tuple[str, int]], chunk: int
) -> None:
    sources = {name: LocalFile(-1, name, 10**9) for name in ("a", "b")}  # never read
    spans: list[Extent] = []
    pos = {"a": 8, "b": 16}
    for i, (path, n) in enumerate(sizes):
        spans.append(Extent(sources[path], pos[path], n, f"t{i}"))
        pos[path] += n
    jobs = L.plan_jobs(spans, chunk)
    seen: dict[int, list[tuple[int, int]]] = {}
    for j in jobs:
        assert 0 < j.length <= chunk
        assert 0 < len(j.parts) <= L.IOV_MAX
        assert sum(n for _, _, n in j.parts) == j.length
        off = j.offset
        for k, start, n in j.parts:
            s = spans[k]
            assert s.source is j.source
            assert s.offset + start == off  # contiguous in the file
            off += n
            seen.setdefault(k, []).append((start, n))
    for k, s in enumerate(spans):
        pieces = sorted(seen.get(k, []))
        covered = 0
        for start, n in pieces:
            assert start == covered
            covered += n
        assert covered == s.nbytes


def test_adjacent_small_tensors_share_one_read(tmp_path: Path, monkeypatch: Any) -> None:
    tensors = {f"n{i:03d}": ("F32", [3]) for i in range(200)}
    f = write_st(tmp_path / "small.safetensors", tensors, fill=rand_fill())
    calls = record_reads(monkeypatch)
    out = safeshard.load(f)
    assert len(calls) == 1
    h = read_header(f)
    assert calls[0][1:] == (h.data_start, 200 * 12)
    assert_same_torch(out, reference([f]))


def record_reads(monkeypatch: Any) -> list[tuple[int, int, int]]:
    """Patch the one read function; returns the (thread id, offset, length) of each call
    that reads tensor data."""
    calls: list[tuple[int, int, int]] = []
    lock = threading.Lock()
    real = LocalFile.readinto

    def spy(self: LocalFile, buffers: Sequence[memoryview], offset: int) -> int:
        if in_header_read():  # the headers' two reads each are not the load's
            return real(self, buffers, offset)
        with lock:
            calls.append((threading.get_ident(), offset, sum(len(b) for b in buffers)))
        return real(self, buffers, offset)

    monkeypatch.setattr(LocalFile, "readinto", spy)
    return calls


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    decl=st.lists(
        st.tuples(
            st.sampled_from(TORCH_DTYPES),
            st.lists(st.integers(0, 9), min_size=0, max_size=3),
        ),
        min_size=1,
        max_size=12,
    ),
    chunk=st.integers(1, 64),
    workers=st.integers(1, 4),
    nshards=st.integers(1, 3),
)
def test_chunked_parallel_loads_equal_stored_bytes(
    tmp_path_factory: Any,
    monkeypatch: Any,
    decl: list[tuple[str, list[int]]],
    chunk: int,
    workers: int,
    nshards: int,
) -> None:
    """Tiny chunks split tensors over many jobs and threads; bytes must still land right."""
    folder = tmp_path_factory.mktemp("prop")
    tensors = {f"model.layers.{i}.w": (d, s) for i, (d, s) in enumerate(decl)}
    nshards = min(nshards, len(tensors))
    index = write_sharded(folder, tensors, nshards)
    monkeypatch.setattr(L, "CHUNK_BYTES", chunk)
    calls = record_reads(monkeypatch)
    ours = safeshard.load(index, workers=workers)
    shards = sorted(folder.glob("model-*.safetensors"))
    for name in tensors:
        src = next(p for p in shards if name in read_header(p).by_name)
        assert tbytes(ours[name]) == file_bytes(src, name)
        assert tuple(ours[name].shape) == tuple(tensors[name][1])
    assert all(n <= chunk for _, _, n in calls)
    total = sum(tensor_nbytes(d, s) for d, s in tensors.values())
    assert sum(n for _, _, n in calls) == total  # every byte read exactly once


def test_one_worker_reads_in_the_calling_thread(tmp_path: Path, monkeypatch: Any) -> None:
    f = write_st(tmp_path / "m.safetensors", {"a": ("F32", [64]), "b": ("F32", [64])})
    monkeypatch.setattr(L, "CHUNK_BYTES", 32)
    calls = record_reads(monkeypatch)
    safeshard.load(f, workers=1)
    assert len(calls) == 16
    assert {c[0] for c in calls} == {threading.get_ident()}


# --------------------------------------------------------------------------- errors


def test_file_shrinking_after_open_is_a_clear_error(tmp_path: Path, monkeypatch: Any) -> None:
    f = write_st(tmp_path / "m.safetensors", {"a": ("F32", [4]), "victim": ("F32", [1000])})
    monkeypatch.setattr(L, "CHUNK_BYTES", 1024)

    data_start = read_header(f).data_start

    def short(self: LocalFile, buffers: Sequence[memoryview], offset: int) -> int:
        return 0 if offset > data_start else os.preadv(self.fd, buffers, offset)

    monkeypatch.setattr(LocalFile, "readinto", short)
    with pytest.raises(ReadError) as e:
        safeshard.load(f, workers=2)
    assert "'victim'" in str(e.value) and str(f) in str(e.value)


def test_truncated_shard_fails_before_reading(tmp_path: Path, monkeypatch: Any) -> None:
    index = write_sharded(tmp_path, {f"w{i}": ("F16", [8, 8]) for i in range(4)}, 2)
    victim = tmp_path / shard_name("model", 2, 2)
    os.truncate(victim, victim.stat().st_size - 3)
    calls = record_reads(monkeypatch)
    with pytest.raises(SafeshardError) as e:
        safeshard.load(index)
    assert victim.name in str(e.value)
    assert calls == []


def test_bad_arguments(tmp_path: Path) -> None:
    f = write_st(tmp_path / "m.safetensors", {"a": ("F32", [4])})
    with pytest.raises(ValueError, match="workers"):
        safeshard.load(f, workers=0)
    with pytest.raises(ValueError, match="framework"):
        safeshard.load(f, framework="jax")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    f = write_st(tmp_path / "m.safetensors", {"a": ("F32", [4])})
    with pytest.raises(DeviceError, match=r"cuda.*is_available\(\) is False"):
        safeshard.load(f, device="cuda")
    with pytest.raises(DeviceError, match="framework='torch'"):
        safeshard.load(f, framework="numpy", device="cuda")
    with pytest.raises(DeviceError, match="'cpu' or 'cuda'"):
        safeshard.load(f, device="meta")
    assert safeshard.load(f, device="cpu:0")["a"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_load_matches_cpu(tmp_path: Path, monkeypatch: Any) -> None:  # pragma: no cover
    f = all_dtypes_file(tmp_path / "m.safetensors", TORCH_DTYPES)
    monkeypatch.setattr(L, "CUDA_CHUNK_BYTES", 64)
    cpu = safeshard.load(f)
    gpu = safeshard.load(f, device="cuda", workers=3)
    for k, t in cpu.items():
        assert gpu[k].device.type == "cuda" and gpu[k].dtype == t.dtype
        assert tbytes(gpu[k].cpu()) == tbytes(t)


def test_missing_framework_names_the_extra(monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"safeshard\[torch\]"):
        L.backend_for("torch")
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(MissingExtraError, match=r"safeshard\[numpy\]"):
        L.backend_for("numpy")
    assert issubclass(MissingExtraError, ImportError)


def test_package_import_pulls_in_neither_torch_nor_numpy() -> None:
    code = (
        "import sys, safeshard; "
        "assert callable(safeshard.load) and callable(safeshard.open); "
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_every_official_dtype_has_a_decision() -> None:
    """Each safetensors dtype is mapped for torch, or documented as raw-only."""
    for d in DTYPE_BITS:
        assert d in L.TORCH_DTYPES or d in SUBBYTE, d


def test_job_size_spreads_small_reads_and_caps_big_ones() -> None:
    mib = 1024 * 1024
    assert L.job_size(10 * L.CHUNK_BYTES, 1) == L.CHUNK_BYTES
    assert L.job_size(100 * L.CHUNK_BYTES, 4) == L.CHUNK_BYTES
    assert L.job_size(160 * mib, 4) == 10 * mib  # four jobs per thread
    assert L.job_size(3 * mib, 4) == L.MIN_CHUNK_BYTES


# --------------------------------------------------------------------------- load-bench


def test_load_bench_json_reports_each_variant(tmp_path: Path) -> None:
    """Runs two variants for real (fresh processes) on a tiny preset; checks the report."""
    from click.testing import CliRunner

    from safeshard.cli import main

    folder = synthesize(tmp_path / "m", "tiny-gptq", tokenizer=False)
    total = sum(sum(t.nbytes for t in read_header(p).tensors) for p in folder.glob("*.safetensors"))
    args = ["load-bench", str(folder), "--warm", "--json", "--budget", "1MB", "--workers", "2"]
    args += ["--variant", "parallel", "--variant", "walk"]
    res = CliRunner().invoke(main, args, env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["tensor_bytes"] == total and report["workers"] == 2
    assert set(report["runs"]) == {"warm"}
    runs = report["runs"]["warm"]
    assert set(runs) == {"parallel", "walk"}
    for r in runs.values():
        assert r["median_s"] > 0 and r["gbps"] == pytest.approx(total / r["median_s"] / 1e9)
        assert r["peak_rss"] >= r["rss_after_imports"] > 0
    s = report["summary"]
    assert s["warm_walk_vs_parallel"] == pytest.approx(
        runs["walk"]["gbps"] / runs["parallel"]["gbps"]
    )
    assert s["warm_walk_rss_limit"] == 1_000_000 + 150_000_000
    assert s["warm_walk_rss_ok"] is (runs["walk"]["peak_rss_over_imports"] < 151_000_000)


def test_load_bench_refuses_a_bad_checkpoint(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from safeshard.cli import main

    f = write_st(tmp_path / "m.safetensors", {"a": ("F32", [4])})
    os.truncate(f, f.stat().st_size - 1)
    res = CliRunner().invoke(main, ["load-bench", str(f), "--warm"])
    assert res.exit_code == 3
    assert "m.safetensors" in res.output


def test_load_bench_without_torch_names_the_extra(tmp_path: Path, monkeypatch: Any) -> None:
    import importlib.util

    from click.testing import CliRunner

    from safeshard.cli import main

    f = write_st(tmp_path / "m.safetensors", {"a": ("F32", [4])})
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    res = CliRunner().invoke(main, ["load-bench", str(f), "--warm"])
    assert res.exit_code == 3
    assert "safeshard[torch]" in res.output


def test_gc_is_paused_during_the_load_and_restored(tmp_path: Path, monkeypatch: Any) -> None:
    import gc

    f = write_st(tmp_path / "m.safetensors", {"a": ("F32", [4])})
    during: list[bool] = []
    real = LocalFile.readinto

    def spy(self: LocalFile, buffers: Sequence[memoryview], offset: int) -> int:
        if not in_header_read():
            during.append(gc.isenabled())
        return real(self, buffers, offset)

    monkeypatch.setattr(LocalFile, "readinto", spy)
    was = gc.isenabled()
    try:
        gc.enable()
        safeshard.load(f)
        assert gc.isenabled() and during == [False]
        gc.disable()
        safeshard.load(f)
        assert not gc.isenabled()
        write_st(tmp_path / "bad.safetensors", {"a": ("F4", [4])})
        gc.enable()
        with pytest.raises(UnsupportedDtypeError):
            safeshard.load(tmp_path / "bad.safetensors")
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
