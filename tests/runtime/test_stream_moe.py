"""MoE models streamed by expert (safeshard.experts): only the experts the router picks are
read, into a cache within the budget; outputs ``torch.equal`` to ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

import safeshard
from safeshard.runtime.stream import streamer_of

IDS = torch.tensor([[1, 15, 72, 61, 18, 8, 11, 44, 32, 19]])
NEW = 6
E, K, LAYERS = 8, 2, 2
COMMON: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "bos_token_id": 1,
    "eos_token_id": None,
    "pad_token_id": None,
    "num_experts_per_tok": K,
}


def _config(family: str) -> Any:
    if family == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=E)
    return Qwen2MoeConfig(
        **COMMON,
        intermediate_size=64,
        num_experts=E,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
    )


class Ref:
    """A tiny MoE model saved by save_pretrained (Hub names: per-expert tensors) or with
    the model's own fused names, and its outputs loaded whole."""

    def __init__(self, folder: Path, family: str, *, fused: bool = False) -> None:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)
        model.save_pretrained(folder, max_shard_size="80KB")
        if fused:  # the model's own names: experts as [E, ...] tensors
            for f in folder.glob("*.safetensors"):
                f.unlink()
            for f in folder.glob("*.index.json"):
                f.unlink()
            sd = {k: v.contiguous() for k, v in model.state_dict().items()}
            sd.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
            save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.folder = folder
        self.picks: list[tuple[int, set[int]]] = []
        hooks = []
        for i, layer in enumerate(full.model.layers):
            hooks.append(layer.mlp.gate.register_forward_hook(self._record(i)))
        with torch.no_grad():
            self.logits = full(IDS).logits
            self.first_picks = list(self.picks)
            self.tokens = full.generate(IDS, max_new_tokens=NEW, do_sample=False)
        for h in hooks:
            h.remove()

    def _record(self, layer: int) -> Any:
        def hook(m: Any, a: Any, out: Any) -> None:
            self.picks.append((layer, set(out[2].flatten().tolist())))

        return hook

    def streamed(self, **kw: Any) -> Any:
        return safeshard.stream(safeshard.empty_model(self.folder), self.folder, **kw)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Ref:
    return Ref(tmp_path_factory.mktemp("mixtral"), "mixtral")


def _equal(ref: Ref, model: Any) -> None:
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref.logits)
        assert torch.equal(model.generate(IDS, max_new_tokens=NEW, do_sample=False), ref.tokens)


def test_reads_only_the_experts_the_router_picks(mixtral: Ref) -> None:
    model = mixtral.streamed(prefetch=0)
    s = streamer_of(model)
    assert s.experts is not None and len(s.experts.layers) == LAYERS
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, mixtral.logits)
    picked = {(layer, e) for layer, es in mixtral.first_picks for e in es}
    assert set(s.experts.entries) == picked
    one = s.experts.layers[0].expert_bytes
    assert s.stats.expert_bytes == len(picked) * one
    assert len(picked) < LAYERS * E  # the prompt does not use every expert
    s.close()


@pytest.mark.parametrize("prefetch", [0, 1])
def test_tight_budget_is_equal_and_reads_by_expert(mixtral: Ref, prefetch: int) -> None:
    probe = mixtral.streamed()
    floor, _ = streamer_of(probe).engine.minimum_budget()
    layer = streamer_of(probe).experts.layers[0]  # type: ignore[union-attr]
    nonexpert = sum(u.nbytes for u in streamer_of(probe).units)
    streamer_of(probe).close()
    # the blocks stay resident, the cache holds a bit more than one layer's experts
    budget = max(floor, nonexpert + floor + 2 * layer.expert_bytes)
    model = mixtral.streamed(max_resident_bytes=budget, prefetch=prefetch)
    _equal(mixtral, model)
    s = streamer_of(model).stats
    assert s.peak_resident_bytes <= budget
    assert s.experts is not None and s.experts.evictions > 0  # the cache was too small
    # decoding: each token reads at most top-k experts per layer (never whole blocks)
    before = s.expert_bytes
    with torch.no_grad():
        model(IDS[:, :1])
    read = streamer_of(model).stats.expert_bytes - before
    assert read <= LAYERS * (K + (prefetch and K)) * layer.expert_bytes
    assert streamer_of(model).stats.bytes_read - s.bytes_read == read  # blocks stayed
    streamer_of(model).close()


def test_block_granular_reads_every_expert(mixtral: Ref) -> None:
    model = mixtral.streamed(experts=False)
    assert streamer_of(model).experts is None
    _equal(mixtral, model)
    streamer_of(model).close()


@pytest.mark.slow
@pytest.mark.parametrize(("family", "fused"), [("qwen2_moe", False), ("mixtral", True)])
def test_other_layouts_stream_equal(tmp_path: Path, family: str, fused: bool) -> None:
    """Qwen2-MoE (shared expert kept in its block), and experts stored fused ([E, ...]
    tensors, read by row ranges)."""
    ref = Ref(tmp_path, family, fused=fused)
    probe = ref.streamed()
    floor, _ = streamer_of(probe).engine.minimum_budget()
    assert streamer_of(probe).experts is not None
    streamer_of(probe).close()
    for budget in (None, floor):
        model = ref.streamed(max_resident_bytes=budget)
        _equal(ref, model)
        s = streamer_of(model).stats
        assert s.expert_bytes > 0
        if budget is not None:
            assert s.peak_resident_bytes <= budget
        streamer_of(model).close()


def test_eager_experts_implementation_is_equal(mixtral: Ref) -> None:
    """The per-expert loop (experts_implementation="eager") as well as the default."""
    full = AutoModelForCausalLM.from_pretrained(
        mixtral.folder, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    model = safeshard.empty_model(mixtral.folder)
    model.set_experts_implementation("eager")
    budget, _ = streamer_of(mixtral.streamed()).engine.minimum_budget()
    model = safeshard.stream(model, mixtral.folder, max_resident_bytes=budget)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, full(IDS).logits)
    assert streamer_of(model).stats.expert_bytes > 0
    streamer_of(model).close()


def test_cache_keeps_the_hot_experts(mixtral: Ref) -> None:
    """Within the budget, experts used again are not read again."""
    probe = mixtral.streamed()
    floor, _ = streamer_of(probe).engine.minimum_budget()
    layer = streamer_of(probe).experts.layers[0]  # type: ignore[union-attr]
    nonexpert = sum(u.nbytes for u in streamer_of(probe).units)
    streamer_of(probe).close()
    budget = nonexpert + floor + 2 * layer.expert_bytes
    model = mixtral.streamed(max_resident_bytes=budget, prefetch=0)
    one = IDS[:, :1]
    with torch.no_grad():
        model(IDS)  # a prompt: most experts, more than the cache holds
        model(one)
        before = streamer_of(model).stats
        assert before.experts is not None
        hits = before.experts.hits
        model(one)  # the same token: the same experts, now cached
        after = streamer_of(model).stats
    assert after.expert_bytes == before.expert_bytes
    assert after.experts is not None and after.experts.hits - hits == LAYERS * K
    assert after.peak_resident_bytes <= budget
    streamer_of(model).close()
