"""Tiny models for the tensor-parallel tests (tests/runtime/test_tp.py,
tests/ops/test_tpsplit.py), written by ``save_pretrained`` from a config."""

from __future__ import annotations

from pathlib import Path


def tiny_llama(folder: Path, *, tied: bool, heads: int = 8, kv: int = 4, seed: int = 1) -> Path:
    """A 2-layer Llama (hidden 64, intermediate 96, vocab 128) with ``heads`` attention
    heads and ``kv`` key/value heads, its embedding tied to ``lm_head`` if ``tied``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=128,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def tiny_phi3(folder: Path, *, seed: int = 2) -> Path:
    """A 2-layer Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``; 8 heads, 4 kv heads)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = Phi3Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=128,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    Phi3ForCausalLM(cfg).save_pretrained(folder)
    return folder
