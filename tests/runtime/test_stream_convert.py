"""safeshard.stream on checkpoints that transformers renames and fuses when it loads them.

Each model is written by ``save_pretrained`` (so under the Hub's names: transformers 5
reverts its conversion when it saves) and compared with ``torch.equal`` to the same
checkpoint loaded by ``from_pretrained``: forward logits and greedy tokens, with no budget
and at a budget that streams. The LLaVA model is also run through its image path
(``pixel_values``), so the vision tower and the multi-modal projector are streamed too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    GPTNeoXConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MixtralConfig,
    PhimoeConfig,
    Qwen2MoeConfig,
)

import safeshard
from safeshard.errors import ModelMismatchError
from safeshard.runtime.stream import streamer_of

IDS = torch.tensor([[1, 15, 72, 61, 18, 8, 11, 44, 32, 19]])
NEW = 5
SMALL: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "bos_token_id": 1,
    "eos_token_id": None,
    "pad_token_id": None,
}


def _config(family: str) -> Any:
    if family == "gpt_neox":
        return GPTNeoXConfig(
            **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
            max_position_embeddings=64,
        )
    if family == "mixtral":
        return MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **SMALL,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        )
    if family == "phimoe":
        return PhimoeConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
    if family == "llava":
        return LlavaConfig(
            text_config=LlamaConfig(**SMALL),
            vision_config=CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            ),
            image_token_index=99,
        )
    raise AssertionError(family)


# a key of each checkpoint that exists only under the Hub's names
HUB_KEY = {
    "gpt_neox": "embed_out.weight",
    "mixtral": "model.layers.0.block_sparse_moe.experts.0.w1.weight",
    "qwen2_moe": "model.layers.0.mlp.experts.0.gate_proj.weight",
    "phimoe": "model.layers.0.block_sparse_moe.experts.0.w1.weight",
    "llava": "language_model.model.embed_tokens.weight",
}


def _cls(family: str) -> Any:
    return LlavaForConditionalGeneration if family == "llava" else AutoModelForCausalLM


def _save(folder: Path, family: str) -> None:
    torch.manual_seed(0)
    cfg = _config(family)
    model = (
        LlavaForConditionalGeneration(cfg)
        if family == "llava"
        else AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    )
    model.save_pretrained(folder, max_shard_size="60KB")


def _empty(folder: Path, family: str) -> Any:
    if family != "llava":
        return safeshard.empty_model(folder)
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = LlavaForConditionalGeneration._from_config(
            AutoConfig.from_pretrained(folder), dtype=torch.float32
        )
    return model.eval()


def _hub_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            keys.update(s.keys())
    return keys


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt_neox", "mixtral", "qwen2_moe", "phimoe", "llava"])
def test_hub_checkpoint_streams_equal(tmp_path: Path, family: str) -> None:
    _save(tmp_path, family)
    assert HUB_KEY[family] in _hub_keys(tmp_path)  # really the Hub's names, not the model's
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    full = _cls(family).from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = full(IDS).logits
        tokens = full.generate(IDS, max_new_tokens=NEW, do_sample=False)
    model = safeshard.stream(_empty(tmp_path, family), tmp_path)
    need, _ = streamer_of(model).engine.minimum_budget()
    total = streamer_of(model).model_bytes
    budgets = [None, need, max(need, total // 2)]
    for budget in budgets:
        model = _empty(tmp_path, family)
        model = safeshard.stream(model, tmp_path, max_resident_bytes=budget)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, logits), (family, budget)
            out = model.generate(IDS, max_new_tokens=NEW, do_sample=False)
            assert torch.equal(out, tokens), (family, budget)
        s = streamer_of(model).stats
        if budget is not None:
            assert s.peak_resident_bytes <= budget
        streamer_of(model).close()


def _llava_image_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    cfg = _config("llava")
    vision = cfg.vision_config
    # strategy "default" drops the CLS token: one image token per patch
    assert cfg.vision_feature_select_strategy == "default"
    n_image = (vision.image_size // vision.patch_size) ** 2
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(
        1, vision.num_channels, vision.image_size, vision.image_size, generator=gen
    )
    ids = torch.tensor([[1, 15, 72] + [cfg.image_token_index] * n_image + [61, 18, 8, 11]])
    return ids, pixels


@pytest.mark.slow
def test_llava_image_streams_equal(tmp_path: Path) -> None:
    """LLaVA with pixel_values: the vision tower and the projector stream equal too."""
    _save(tmp_path, "llava")
    ids, pixels = _llava_image_inputs()
    full = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = full(input_ids=ids, pixel_values=pixels).logits
        tokens = full.generate(
            input_ids=ids, pixel_values=pixels, max_new_tokens=NEW, do_sample=False
        )
        # the image changes the logits: the image path really ran
        assert not torch.equal(full(input_ids=ids, pixel_values=pixels * 0).logits, logits)
    model = safeshard.stream(_empty(tmp_path, "llava"), tmp_path)
    need, _ = streamer_of(model).engine.minimum_budget()
    total = streamer_of(model).model_bytes
    streamer_of(model).close()
    for budget in [None, need, max(need, total // 2)]:
        model = safeshard.stream(_empty(tmp_path, "llava"), tmp_path, max_resident_bytes=budget)
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels).logits
            assert torch.equal(out, logits), budget
            gen = model.generate(
                input_ids=ids, pixel_values=pixels, max_new_tokens=NEW, do_sample=False
            )
            assert torch.equal(gen, tokens), budget
        s = streamer_of(model).stats
        if budget is not None:
            assert s.peak_resident_bytes <= budget
        streamer_of(model).close()


def test_fused_tensor_shape_mismatch_is_refused(tmp_path: Path) -> None:
    """A Hub checkpoint whose fused result does not fit the model is refused before any read."""
    _save(tmp_path, "mixtral")
    cfg = _config("mixtral")
    cfg.intermediate_size = 48  # the checkpoint's experts have 64
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with pytest.raises(ModelMismatchError, match=r"experts\.(gate_up|down)_proj"):
        safeshard.stream(model, tmp_path)
