"""Rank-local tensor-parallel loading (safeshard.tpplan, safeshard.runtime.tpread).

References, said per test:
- transformers' own TP sharding (``from_pretrained(tp_plan="auto")`` under gloo on the
  CPU, spawned processes) for Llama (GQA, tied and untied) and Phi-3 (fused QKV), with a
  forward pass of the TP model against the unsharded one;
- ``torch.chunk`` where transformers' CPU TP has no equivalent: GPTQ modules (transformers
  does not shard GPTQ on the CPU), key/value heads replicated over more ranks than heads
  (transformers would cut a head), and safeshard's ``qkv_colwise`` sections.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeshard
from helpers.tpkit import tiny_llama, tiny_phi3
from safeshard import TensorParallelError, UsageError, tpplan
from safeshard.format.header import TensorInfo
from safeshard.ops.synth import Preset, synthesize
from safeshard.tpplan import (
    OVERREAD,
    Plan,
    RankPlan,
    ReadStats,
    TensorSlice,
    auto_plan,
    byte_ranges,
    chunk,
    coalesce,
    row_extent,
)

torch = pytest.importorskip("torch")

LLAMA_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "embed_tokens": "embedding_rowwise",
    "lm_head": "colwise_gather_output",
}

PHI3_SECTIONS = {
    "layers.*.self_attn.qkv_proj": "qkv_colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_up_proj": "packed_colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
"""safeshard's own styles for Phi-3's fused weights: qkv by whole heads, gate/up by halves."""


# --------------------------------------------------------------------------- models


GPTQ_PRESET = Preset(
    name="tp-gptq",
    description="GPTQ Llama for TP tests",
    arch="llama",
    hidden=128,
    intermediate=256,
    layers=1,
    heads=4,
    kv_heads=2,
    vocab=64,
    gptq=True,
    group_size=32,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    out = {
        "llama": tiny_llama(root / "llama", tied=False, seed=1),
        "llama-tied": tiny_llama(root / "llama-tied", tied=True, seed=1),
        "phi3": tiny_phi3(root / "phi3", seed=2),
        "gptq": synthesize(root / "gptq", GPTQ_PRESET, tokenizer=False),
    }
    return out


# --------------------------------------------------------------------------- references


def chunk_ref(full: Any, ws: int, r: int, dim: int) -> Any:
    parts = torch.chunk(full, ws, dim=dim)
    return parts[r] if r < len(parts) else full.narrow(dim, 0, 0)


def unpack(packed: Any, bits: int, dim: int) -> Any:
    """int4 values packed 8 per int32 along ``dim`` (GPTQ v1), unpacked."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    p = packed.unsqueeze(dim + 1) if dim == 1 else packed.unsqueeze(1)
    if dim == 0:
        vals = (p >> shifts.view(1, per, 1)) & (2**bits - 1)
        return vals.reshape(packed.shape[0] * per, packed.shape[1])
    vals = (p >> shifts.view(1, 1, per)) & (2**bits - 1)
    return vals.reshape(packed.shape[0], packed.shape[1] * per)


def dequant(mod: dict[str, Any], bits: int = 4) -> Any:
    """GPTQ v1 weight [in, out] from qweight, qzeros, scales and g_idx (group ids made
    local to the slice: a rank's g_idx holds global ids)."""
    q = unpack(mod["qweight"], bits, 0).float()
    z = unpack(mod["qzeros"], bits, 1).float() + 1
    g = mod["g_idx"].long()
    g = g - g.min()
    return (q - z[g]) * mod["scales"].float()[g]


def expected_llama(full: dict[str, Any], name: str, ws: int, r: int, kv: int, hd: int) -> Any:
    t = full[name]
    if "norm" in name:
        return t
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return chunk_ref(t, ws, r, 1)
    if ("k_proj" in name or "v_proj" in name) and kv < ws:
        head = r * kv // ws
        return t[head * hd : (head + 1) * hd]
    return chunk_ref(t, ws, r, 0)


# --------------------------------------------------------------------------- pure math


def test_chunk_is_dtensor_shard() -> None:
    from torch.distributed.tensor import Shard

    for size in range(0, 23):
        for ws in range(1, 9):
            for r in range(ws):
                n, off = Shard.local_shard_size_and_offset(size, ws, r)
                a, b = chunk(size, ws, r)
                assert b - a == n
                if n:
                    assert a == off


def test_plan_matching() -> None:
    plan = Plan(LLAMA_PLAN | {"model.layers.1.mlp.up_proj.weight": "replicate"})
    assert plan.match("model.layers.3.self_attn.q_proj.weight") == (
        "layers.*.self_attn.q_proj",
        "colwise",
    )
    assert plan.match("model.layers.3.self_attn.q_proj.bias") is not None
    # a rule for the tensor itself wins over its module's
    assert plan.match("model.layers.1.mlp.up_proj.weight") == (
        "model.layers.1.mlp.up_proj.weight",
        "replicate",
    )
    assert plan.match("model.norm.weight") is None
    assert plan.match("model.layers.0.self_attn.q_proj_extra.weight") is None
    with pytest.raises(UsageError, match="not a style"):
        Plan({"x": "diagonal"})


@settings(max_examples=150, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    item=st.sampled_from(["U8", "F16", "F32"]),
    data=st.data(),
)
def test_byte_ranges_and_coalesce_match_numpy(shape: list[int], item: str, data: Any) -> None:
    import numpy as np

    width = {"U8": 1, "F16": 2, "F32": 4}[item]
    dim = data.draw(st.integers(0, len(shape) - 1))
    n = shape[dim]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=6)))
    intervals = tuple((cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2))
    sl = TensorSlice("t", item, tuple(shape), dim, intervals)
    numel = int(np.prod(shape))
    blob = np.arange(numel * width, dtype=np.uint64).astype(np.uint8)  # wraps: fine
    arr = np.frombuffer(blob.tobytes(), dtype=np.dtype(f"V{width}")).reshape(shape)
    want = np.concatenate(
        [np.take(arr, range(a, b), axis=dim) for a, b in intervals] or [arr[:0]], axis=dim
    ).tobytes()
    raw = blob.tobytes()
    got = b"".join(raw[o : o + k] for o, k in byte_ranges(sl))
    assert got == want
    assert len(got) == sl.nbytes
    ranges = byte_ranges(sl)
    gap = data.draw(st.integers(0, 64))
    reads = coalesce(ranges, gap=gap)
    assert [p for _, _, pieces in reads for p in pieces] == ranges
    assert sum(r[1] for r in reads) <= OVERREAD * sum(k for _, k in ranges)
    for off, length, pieces in reads:
        assert pieces[0][0] == off and pieces[-1][0] + pieces[-1][1] == off + length
        for a, b in itertools.pairwise(pieces):
            assert b[0] - (a[0] + a[1]) <= gap


@settings(max_examples=150, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    item=st.sampled_from(["U8", "F16", "F32"]),
    data=st.data(),
)
def test_row_extent_is_the_first_and_last_byte_of_a_row_split(
    shape: list[int], item: str, data: Any
) -> None:
    dim = data.draw(st.integers(0, len(shape) - 1))
    cuts = sorted(data.draw(st.lists(st.integers(0, shape[dim]), min_size=2, max_size=6)))
    intervals = tuple((cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2))
    sl = TensorSlice("t", item, tuple(shape), dim, intervals)
    ranges = byte_ranges(sl)
    outer = 1
    for d in shape[:dim]:
        outer *= d
    ext = row_extent(sl)
    if dim == 0 or outer < 2 or sl.whole or not ranges:
        assert ext is None
    else:
        assert ext == (ranges[0][0], ranges[-1][0] + ranges[-1][1])
    if len(ranges) >= 2 and outer >= 2:
        assert ext is not None


def _plan_of_full_model(folder: Path) -> dict[str, str]:
    import transformers

    cfg = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = getattr(transformers, cfg["architectures"][0])(
            transformers.AutoConfig.for_model(**cfg)
        )
    return dict(model.tp_plan)


@pytest.mark.parametrize(
    ("model_type", "arch", "extra"),
    [
        ("llama", "LlamaForCausalLM", {}),
        ("phi3", "Phi3ForCausalLM", {}),
        ("gpt_neox", "GPTNeoXForCausalLM", {}),
        ("mixtral", "MixtralForCausalLM", {"num_local_experts": 4}),
        ("qwen2_moe", "Qwen2MoeForCausalLM", {"num_experts": 4, "mlp_only_layers": [1]}),
        (
            "gemma3_text",
            "Gemma3ForCausalLM",
            {"layer_types": ["sliding_attention"] * 2 + ["full_attention"]},
        ),
    ],
)
def test_auto_plan_built_on_one_layer_is_the_full_models(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model_type: str,
    arch: str,
    extra: dict[str, Any],
) -> None:
    """tp_plan="auto" builds the model with one layer (3x faster); the plan must be
    the one transformers gives the model with all its layers."""
    import transformers

    config = transformers.AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    config.architectures = [arch]
    (tmp_path / "config.json").write_text(config.to_json_string())
    want = _plan_of_full_model(tmp_path)
    assert want
    built: list[int] = []
    real = tpplan._on_meta

    def on_meta(torch_: Any, cls: Any, cfg: Any) -> Any:
        built.append(cfg.num_hidden_layers)
        return real(torch_, cls, cfg)

    monkeypatch.setattr(tpplan, "_on_meta", on_meta)
    assert auto_plan(tmp_path) == want
    assert built == [1]  # the fast build, not its fallback


def test_rank_defaults_need_torch_distributed_or_integers(models: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="rank and world_size"):
        safeshard.load(models["llama"], tp_plan=LLAMA_PLAN)
    with pytest.raises(UsageError, match="rank must be in"):
        safeshard.load(models["llama"], tp_plan=LLAMA_PLAN, rank=2, world_size=2)


# --------------------------------------------------------------------------- slices


@pytest.mark.parametrize("ws", [2, 4])
def test_llama_slices_and_bytes(models: dict[str, Path], ws: int) -> None:
    """Every rank's tensors are torch.chunk slices (transformers' Shard semantics; checked
    against transformers itself in the spawned tests); bytes read: dim-0 slices exactly,
    strided ones within the cap."""
    full = safeshard.load(models["llama"])
    for r in range(ws):
        stats = ReadStats()
        out = safeshard.load(models["llama"], tp_plan="auto", rank=r, world_size=ws, tp_stats=stats)
        assert out.keys() == full.keys()
        for name, t in out.items():
            assert torch.equal(t, expected_llama(full, name, ws, r, 4, 8)), name
        for name, (read, useful) in stats.tensors.items():
            strided = name.endswith(("o_proj.weight", "down_proj.weight"))
            assert read <= (OVERREAD if strided else 1.1) * useful, name
            assert useful == out[name].numel() * out[name].element_size()


def test_gqa_kv_heads_replicated_over_more_ranks(tmp_path: Path) -> None:
    """2 kv heads over 4 ranks: each rank holds one whole head, each head on 2 ranks
    (torch reference: transformers would cut the head in halves)."""
    folder = tiny_llama(tmp_path / "m", tied=False, heads=4, kv=2, seed=1)
    full = safeshard.load(folder)
    for r in range(4):
        out = safeshard.load(folder, tp_plan="auto", rank=r, world_size=4)
        for name, t in out.items():
            assert torch.equal(t, expected_llama(full, name, 4, r, 2, 16)), name
    with pytest.raises(TensorParallelError, match="key/value heads"):
        safeshard.load(folder, tp_plan="auto", rank=0, world_size=3)


def test_phi3_fused_sections(models: dict[str, Path]) -> None:
    """Phi-3's own plan (transformers: one block of the fused rows, output gathered), and
    safeshard's sections: qkv by whole heads, gate/up by halves (torch references)."""
    folder = models["phi3"]
    full = safeshard.load(folder)
    plan = PHI3_SECTIONS
    hd, q, kv = 8, 64, 32
    for r in range(2):
        auto = safeshard.load(folder, tp_plan="auto", rank=r, world_size=2)
        name = "model.layers.0.self_attn.qkv_proj.weight"
        assert torch.equal(auto[name], chunk_ref(full[name], 2, r, 0))
        out = safeshard.load(folder, tp_plan=plan, rank=r, world_size=2)
        w = full[name]
        qs, ks, vs = w[:q], w[q : q + kv], w[q + kv :]
        want = torch.cat([chunk_ref(s, 2, r, 0) for s in (qs, ks, vs)])
        assert torch.equal(out[name], want)
        assert out[name].shape[0] == (q + 2 * kv) // 2 and hd
        gu = "model.layers.1.mlp.gate_up_proj.weight"
        gate, up = full[gu].chunk(2, 0)
        assert torch.equal(out[gu], torch.cat([chunk_ref(gate, 2, r, 0), chunk_ref(up, 2, r, 0)]))


def test_gptq_slices_consistent(models: dict[str, Path]) -> None:
    """GPTQ modules (torch.chunk reference: transformers has no CPU TP for GPTQ): every
    member sliced along its packed/grouped dim, and each rank's dequantized slice equals
    the slice of the dequantized full weight."""
    folder = models["gptq"]
    full = safeshard.load(folder)
    for ws in (2, 4):
        for r in range(ws):
            out = safeshard.load(folder, tp_plan="auto", rank=r, world_size=ws)
            for proj, rowwise in (
                ("self_attn.q_proj", False),
                ("self_attn.k_proj", False),
                ("self_attn.o_proj", True),
                ("mlp.up_proj", False),
                ("mlp.down_proj", True),
            ):
                p = f"model.layers.0.{proj}"
                mod = {m: out[f"{p}.{m}"] for m in ("qweight", "qzeros", "scales", "g_idx")}
                ref = {m: full[f"{p}.{m}"] for m in mod}
                w_full, w = dequant(ref), dequant(mod)
                if rowwise:
                    assert torch.equal(mod["qweight"], chunk_ref(ref["qweight"], ws, r, 0))
                    assert torch.equal(mod["scales"], chunk_ref(ref["scales"], ws, r, 0))
                    assert torch.equal(mod["g_idx"], chunk_ref(ref["g_idx"], ws, r, 0))
                    assert torch.equal(w, chunk_ref(w_full, ws, r, 0))
                elif proj == "self_attn.k_proj" and ws == 4:  # 2 kv heads of 32 on 4 ranks
                    head = r * 2 // 4
                    assert torch.equal(w, w_full[:, head * 32 : (head + 1) * 32])
                else:
                    assert torch.equal(mod["qweight"], chunk_ref(ref["qweight"], ws, r, 1))
                    assert torch.equal(mod["qzeros"], chunk_ref(ref["qzeros"], ws, r, 1))
                    assert torch.equal(mod["g_idx"], ref["g_idx"])
                    assert torch.equal(w, chunk_ref(w_full, ws, r, 1))


def test_gptq_split_that_breaks_a_group_is_refused(tmp_path: Path) -> None:
    folder = synthesize(tmp_path / "g", "tiny-gptq", tokenizer=False)  # group 128, hidden 256
    with pytest.raises(TensorParallelError) as e:
        safeshard.load(folder, tp_plan="auto", rank=0, world_size=4)
    msg = str(e.value)
    assert "o_proj" in msg and "GPTQ group of 128" in msg
    assert "compatible world sizes: 1, 2" in msg and "smallest above 1: 2" in msg
    out = safeshard.load(folder, tp_plan="auto", rank=1, world_size=2)
    assert out["model.layers.0.self_attn.o_proj.scales"].shape == (1, 256)


def test_plain_dict_plan_slices_nothing_unplanned(models: dict[str, Path]) -> None:
    out = safeshard.load(
        models["llama"], tp_plan={"layers.*.mlp.up_proj": "colwise"}, rank=0, world_size=2
    )
    assert out["model.layers.0.mlp.up_proj.weight"].shape == (48, 64)
    assert out["model.layers.0.mlp.gate_proj.weight"].shape == (96, 64)
    assert out["lm_head.weight"].shape == (128, 64)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("ws", [2, 4])
def test_strided_slices_copied_from_the_mapping_equal_narrowed_full_tensors(
    models: dict[str, Path], framework: Literal["torch", "numpy"], ws: int
) -> None:
    """Slices along a later dim (rowwise, and packed_rowwise: two intervals per row) are
    copied out of the mapped shards in one strided copy per interval; each equals the
    full tensor narrowed to the slice's intervals, in both frameworks."""
    folder = models["phi3"]
    plan = {
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_up_proj": "packed_rowwise",
        "layers.*.mlp.down_proj": "rowwise",
        "embed_tokens": "embedding_colwise",
    }
    full = safeshard.load(folder)
    ckpt = safeshard.open_checkpoint(folder)
    strided = 0
    for r in range(ws):
        rp = RankPlan.build(
            plan, r, ws, folder=folder, tensors={n: e.info for n, e in ckpt.entries.items()}
        )
        stats = ReadStats()
        out = safeshard.load(
            folder, tp_plan=plan, rank=r, world_size=ws, framework=framework, tp_stats=stats
        )
        assert stats.bytes_read == stats.slice_bytes  # only the slices' bytes copied
        for name, e in ckpt.entries.items():
            sl = rp.slice_of(e.info)
            want = full[name]
            if sl.dim is not None:
                want = torch.cat([want.narrow(sl.dim, a, b - a) for a, b in sl.intervals], sl.dim)
                strided += sl.dim > 0 and not sl.whole
            got = out[name] if framework == "torch" else torch.from_numpy(out[name].copy())
            assert got.shape == want.shape, name
            assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)), name
    assert strided >= 4 * ws


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_local_reads_without_readahead_and_strided_spans_prefetched_in_steps(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every local shard gets POSIX_FADV_RANDOM before anything is prefetched (no 8 MiB
    readahead past each slice), and the span of each strided slice, first to last byte,
    is asked for with POSIX_FADV_WILLNEED in steps of at most PREFETCH_STEP (the kernel
    drops what one call asks beyond its readahead maximum)."""
    from safeshard.runtime import tpread

    folder = models["phi3"]
    plan = {"layers.*.self_attn.o_proj": "rowwise", "layers.*.mlp.down_proj": "rowwise"}
    calls: list[tuple[int, int, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((fd, offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    monkeypatch.setattr(tpread, "PREFETCH_STEP", 4096)
    out = safeshard.load(folder, tp_plan=plan, rank=1, world_size=4)
    ckpt = safeshard.open_checkpoint(folder)
    rp = RankPlan.build(
        plan, 1, 4, folder=folder, tensors={n: e.info for n, e in ckpt.entries.items()}
    )
    randomized = [c[0] for c in calls if c[3] == os.POSIX_FADV_RANDOM]
    assert len(randomized) == len(set(randomized)) == len(ckpt.headers)
    first_willneed = next(i for i, c in enumerate(calls) if c[3] == os.POSIX_FADV_WILLNEED)
    assert all(c[3] == os.POSIX_FADV_RANDOM for c in calls[:first_willneed][-len(randomized) :])
    asked = sorted((c[1], c[1] + c[2]) for c in calls if c[3] == os.POSIX_FADV_WILLNEED)
    assert all(b - a <= 4096 for a, b in asked)
    spans = []
    for name, e in ckpt.entries.items():
        sl = rp.slice_of(e.info)
        if sl.dim is None or sl.dim == 0 or sl.whole:
            continue
        h = ckpt.headers[e.shard]
        ranges = byte_ranges(sl)
        base = h.data_start + e.info.begin
        spans.append((base + ranges[0][0], base + ranges[-1][0] + ranges[-1][1]))
        assert out[name].shape == tuple(sl.shape)
    assert len(spans) >= 4
    # the steps tile each span exactly: consecutive, no gaps, no overlap
    for lo, hi in spans:
        steps = [(a, b) for a, b in asked if lo <= a < hi]
        assert steps[0][0] == lo and steps[-1][1] == hi
        assert all(x[1] == y[0] for x, y in itertools.pairwise(steps))
    assert sum(b - a for a, b in asked) == sum(hi - lo for lo, hi in spans)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_sections_of_fused_weights_are_read_alone(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dim-0 slice in sections (Phi-3's fused QKV and gate/up: a rank's q, k and v rows)
    is read section by section; nothing between them (the other ranks' sections) is asked
    of the disk: every POSIX_FADV_WILLNEED lies inside a strided slice's span."""
    folder = models["phi3"]
    plan = PHI3_SECTIONS
    calls: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            calls.append((offset, offset + length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    stats = ReadStats()
    safeshard.load(folder, tp_plan=plan, rank=1, world_size=2, tp_stats=stats)
    ckpt = safeshard.open_checkpoint(folder)
    rp = RankPlan.build(
        plan,
        1,
        2,
        folder=folder,
        tensors={n: e.info for n, e in ckpt.entries.items()},
        metadata=ckpt.metadata,
    )
    spans, sectioned = [], 0
    for e in ckpt.entries.values():
        sl = rp.slice_of(e.info)
        base = ckpt.headers[e.shard].data_start + e.info.begin
        ext = row_extent(sl)
        if ext is not None:
            spans.append((base + ext[0], base + ext[1]))
        elif len(byte_ranges(sl)) > 1:
            sectioned += 1
            assert stats.tensors[e.info.name] == (sl.nbytes, sl.nbytes)  # the sections alone
    assert sectioned >= 2 and spans
    assert all(any(lo <= a and b <= hi for lo, hi in spans) for a, b in calls), calls


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_each_shard_unmapped_after_its_last_strided_copy(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, framework: Literal["torch", "numpy"]
) -> None:
    """A mapped shard is unmapped by the worker that copies its last strided slice, not
    at the end of the load: when the load closes what is left, nothing is."""
    from safeshard.runtime import tpread

    mapped: list[int] = []
    left: list[int] = []
    real_map, real_close = tpread._Maps._map, tpread._Maps.close

    def map_(self: Any, fd: int) -> Any:
        mm = real_map(self, fd)
        if fd not in mapped:
            mapped.append(fd)
        return mm

    def close(self: Any) -> None:
        left.append(len(self._maps))
        real_close(self)

    monkeypatch.setattr(tpread._Maps, "_map", map_)
    monkeypatch.setattr(tpread._Maps, "close", close)
    folder = models["phi3"]
    out = safeshard.load(folder, tp_plan="auto", rank=1, world_size=2, framework=framework)
    full = safeshard.load(folder, framework=framework)
    assert len(mapped) == len(safeshard.open_checkpoint(folder).headers)
    assert left == [0]
    name = next(n for n in out if n.endswith("o_proj.weight"))
    got, want = out[name], full[name][:, full[name].shape[1] // 2 :]
    if framework == "numpy":
        assert got.tobytes() == want.tobytes()
    else:
        assert torch.equal(got, want)


def test_numpy_and_rchar(models: dict[str, Path]) -> None:
    """The process's own read counter (/proc/self/io rchar) agrees with the stats."""
    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("no /proc/self/io")

    def rchar() -> int:
        for line in io.read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        raise AssertionError("no rchar")

    folder = models["llama"]
    full_size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    plan = {"layers.*.mlp.*_proj": "colwise", "lm_head": "colwise"}  # dim-0 slices only
    stats = ReadStats()
    before = rchar()
    out = safeshard.load(
        folder, tp_plan=plan, rank=1, world_size=4, framework="numpy", tp_stats=stats, workers=1
    )
    read = rchar() - before
    assert stats.bytes_read <= read <= stats.bytes_read + 64 * 1024  # headers, config.json
    assert read < 0.8 * full_size
    assert out["lm_head.weight"].shape == (32, 64)


# --------------------------------------------------------------------------- budget


def test_open_walk_holds_at_most_the_budget_of_slices(models: dict[str, Path]) -> None:
    folder = models["llama"]
    with safeshard.open(folder) as ck:
        biggest_full = max(ck.nbytes(g) for g in ck.layers())
    budget = biggest_full // 2 + 4096  # below a full layer, above a rank's slice of one
    stats = ReadStats()
    full = safeshard.load(folder)
    with safeshard.open(
        folder,
        tp_plan="auto",
        rank=1,
        world_size=2,
        max_resident_bytes=budget,
        prefetch=1,
        tp_stats=stats,
    ) as ck:
        seen = 0
        for _key, tensors in ck.iter_layers():
            for name, t in tensors.items():
                assert torch.equal(t, expected_llama(full, name, 2, 1, 4, 8)), name
                seen += 1
            assert ck.resident_bytes <= budget
        assert ck.peak_resident_bytes <= budget
        assert seen == len(full)
        assert stats.slice_bytes < 0.6 * sum(t.nbytes for t in full.values())
    with (
        pytest.raises(safeshard.BudgetError),
        safeshard.open(folder, max_resident_bytes=budget) as ck,
    ):
        next(iter(ck.iter_layers()))


# --------------------------------------------------------------------------- S3


def _upload(folder: Path, url: str, options: dict[str, Any]) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", **options)
    for f in folder.iterdir():
        if f.is_file():
            fs.put_file(str(f), f"{url[len('s3://') :]}/{f.name}")


def test_s3_ranges_only(models: dict[str, Path], s3: tuple[str, dict[str, Any]]) -> None:
    """From object storage the ranged GETs fetch only the rank's bytes (RemoteStats)."""
    from safeshard.io.remote import DEFAULT_LIMITS

    base, options = s3
    url = f"{base}/llama"
    _upload(models["llama"], url, options)
    local = safeshard.load(models["llama"], tp_plan="auto", rank=1, world_size=4)
    stats = ReadStats()
    before = DEFAULT_LIMITS.stats.bytes
    out = safeshard.load(
        url, tp_plan="auto", rank=1, world_size=4, storage_options=options, tp_stats=stats
    )
    fetched = DEFAULT_LIMITS.stats.bytes - before
    assert out.keys() == local.keys()
    for k in out:
        assert torch.equal(out[k], local[k]), k
    assert stats.bytes_read <= fetched <= stats.bytes_read + 16 * 1024  # + the headers
    assert stats.bytes_read <= OVERREAD * stats.slice_bytes
    full = sum(t.nbytes for t in safeshard.load(models["llama"]).values())
    assert fetched < 0.5 * full


# --------------------------------------------------------------------------- torch.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, ws: int, port: int, paths: dict[str, str], s3json: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ws), LOCAL_RANK=str(rank))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ws)
    try:
        ids = torch.tensor([[1, 5, 9, 3, 7]])
        for key in ("llama", "llama-tied", "phi3"):  # Llamas: GQA, 8 heads, 4 kv heads
            path = paths[key]
            mine = safeshard.load(path, tp_plan="auto")  # rank and world size from dist
            tp_model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
            params = dict(tp_model.named_parameters())
            for name, t in mine.items():
                p = params[name]
                local = p.to_local() if isinstance(p, DTensor) else p
                assert torch.equal(t, local.detach()), (key, name)
            ref = AutoModelForCausalLM.from_pretrained(path)
            with torch.no_grad():
                got = tp_model(ids).logits
                want = ref(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # GPTQ: torch.chunk reference (transformers has no CPU TP for GPTQ)
        full = safeshard.load(paths["gptq"])
        mine = safeshard.load(paths["gptq"], tp_plan="auto")
        q = "model.layers.0.mlp.down_proj.qweight"
        assert torch.equal(mine[q], chunk_ref(full[q], ws, rank, 0))
        if s3json:
            from safeshard.io.remote import DEFAULT_LIMITS

            s3 = json.loads(s3json)
            stats = ReadStats()
            before = DEFAULT_LIMITS.stats.bytes
            remote = safeshard.load(
                s3["url"], tp_plan="auto", storage_options=s3["options"], tp_stats=stats
            )
            fetched = DEFAULT_LIMITS.stats.bytes - before
            from_disk = safeshard.load(paths["llama"], tp_plan="auto")
            for k in from_disk:
                assert torch.equal(remote[k], from_disk[k]), k
            assert stats.bytes_read <= fetched <= stats.bytes_read + 16 * 1024  # + headers
            assert stats.bytes_read <= OVERREAD * stats.slice_bytes
            Path(s3["report"]).joinpath(f"rank{rank}.json").write_text(
                json.dumps({"fetched": fetched, "slice": stats.slice_bytes})
            )
    finally:
        dist.destroy_process_group()


def _spawn(fn: Callable[..., None], ws: int, *args: Any) -> None:
    """``ws`` processes running ``fn(rank, ws, port, *args)``, started from a fork server
    that imported torch, transformers and safeshard once (2 cores, 4 ranks: each rank
    importing them again took 13 s). A fork server, not a fork of the test process: its
    thread pools and fsspec's event loop would not survive a fork."""
    import multiprocessing

    from torch.multiprocessing.spawn import start_processes

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(["torch", "transformers", "safeshard", "test_tp"])
    start_processes(  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        fn, args=(ws, _free_port(), *args), nprocs=ws, join=True, start_method=method
    )


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_torch_distributed_ranks_equal_transformers_tp(
    models: dict[str, Path], ws: int, s3: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """gloo on the CPU, spawned processes: each rank's tensors equal the local shards of
    transformers' own TP model, whose forward equals the unsharded model's; at world
    size 2, each rank also loads from S3 (moto) and reports its RemoteStats bytes."""
    paths = {k: str(v) for k, v in models.items()}
    s3json = ""
    if ws == 2:
        base, options = s3
        _upload(models["llama"], f"{base}/llama", options)
        s3json = json.dumps({"url": f"{base}/llama", "options": options, "report": str(tmp_path)})
    _spawn(_rank_main, ws, paths, s3json)
    if ws == 2:
        reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ws)]
        full = sum(f.stat().st_size for f in models["llama"].glob("*.safetensors"))
        for rep in reports:
            assert 0 < rep["fetched"] < 0.75 * full


def test_rankplan_unit() -> None:
    infos = {
        "a.weight": TensorInfo("a.weight", "F16", (10, 6), 0, 120),
    }
    rp = RankPlan(Plan({"a": "rowwise"}), 3, 4, tensors=infos)
    sl = rp.slice_of(infos["a.weight"])
    assert sl.dim == 1 and sl.intervals == ((6, 6),) and sl.shape == (10, 0) and sl.nbytes == 0
    assert byte_ranges(sl) == []


def test_gptq_fused_styles_are_refused(models: dict[str, Path]) -> None:
    plan = {"layers.*.mlp.up_proj": "packed_colwise"}
    with pytest.raises(TensorParallelError, match="GPTQ module planned 'packed_colwise'"):
        safeshard.load(models["gptq"], tp_plan=plan, rank=0, world_size=2)
