"""safeshard.stream beyond plain causal LMs (issue 17, items 2, 3 and 7): embeddings with a
padding row, every model head (seq2seq, sequence classification, image-text-to-text),
models built under ``torch.device("meta")``, and configs stream cannot build.

Outputs are compared with ``torch.equal`` to the same model loaded whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Phi3Config,
)

import safeshard
from safeshard.stream import streamer_of

NEW = 5


def _one_block(model: Any, path: Path) -> int:
    """The least budget stream accepts for ``model``: its largest streamed unit and what
    must stay resident."""
    s = streamer_of(safeshard.stream(model, path))
    need = s.engine.minimum_budget()[0]
    s.close()
    return need


# --------------------------------------------------------------------------- padding_idx


def _decoder(family: str, pad: int) -> Any:
    common: dict[str, Any] = {
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": pad,
        "bos_token_id": 1,
        "eos_token_id": None,
    }
    cfg = LlamaConfig(**common) if family == "llama" else Phi3Config(**common)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


@pytest.mark.parametrize(
    ("family", "pad"), [("llama", 0), ("llama", 47), ("llama", 95), ("phi3", 95)]
)
def test_an_embedding_with_a_padding_row_streams_by_rows(
    tmp_path: Path, family: str, pad: int
) -> None:
    torch.manual_seed(0)
    _decoder(family, pad).save_pretrained(tmp_path)
    full = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert full.get_input_embeddings().padding_idx == pad
    ids = torch.tensor([[1, 5, pad, 60, 5, pad, 90]])  # the padding id among others
    low = torch.tensor([[1, 2, 3]])  # without it: the rows read do not include it
    budget = _one_block(safeshard.empty_model(tmp_path), tmp_path)
    m = safeshard.stream(safeshard.empty_model(tmp_path), tmp_path, max_resident_bytes=budget)
    s = streamer_of(m)
    emb = "model.embed_tokens"
    assert s.specs[emb].rows is not None and emb not in s.stats.resident
    with torch.no_grad():
        for x in (ids, low):
            assert torch.equal(m(x).logits, full(x).logits)
            assert torch.equal(
                m.generate(x, max_new_tokens=NEW, do_sample=False),
                full.generate(x, max_new_tokens=NEW, do_sample=False),
            )
    assert s.stats.row_bytes > 0  # read by rows indeed
    assert m.get_input_embeddings().padding_idx == pad  # the module's own, put back
