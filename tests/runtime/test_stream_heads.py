"""safeshard.stream beyond plain causal LMs (issue 17, items 2, 3 and 7): embeddings with a
padding row, every model head (seq2seq, sequence classification, image-text-to-text),
models built under ``torch.device("meta")``, and configs stream cannot build.

Outputs are compared with ``torch.equal`` to the same model loaded whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Phi3Config,
    T5Config,
)

import safeshard
from safeshard.cli import main
from safeshard.errors import ModelConfigError, ModelMismatchError, UsageError
from safeshard.runtime.stream import streamer_of

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


# --------------------------------------------------------------------------- seq2seq


def _seq2seq(family: str) -> Any:
    if family == "t5":
        return T5Config(  # type: ignore[call-arg]  # extra keys go to **kwargs, untyped
            vocab_size=96,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=None,
        )
    return BartConfig(
        vocab_size=96,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=None,
        forced_eos_token_id=None,
        decoder_start_token_id=2,
    )


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_models_stream_the_encoder_once_and_the_decoder_per_token(
    tmp_path: Path, family: str
) -> None:
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(_seq2seq(family)).save_pretrained(tmp_path)
    full = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    built = safeshard.empty_model(tmp_path)  # the head from config.architectures
    assert type(built) is type(full)
    ids = torch.tensor([[5, 6, 7, 8, 9, 3]])
    dec = torch.tensor([[0, 4, 5]])
    new = 6
    with torch.no_grad():
        want_logits = full(input_ids=ids, decoder_input_ids=dec).logits
        want = full.generate(ids, max_new_tokens=new, do_sample=False)
    budget = _one_block(built, tmp_path)

    def blocks(loads: dict[str, int], side: str) -> dict[str, int]:
        return {
            k: n
            for k, n in loads.items()
            if f"{side}." in k and any(p in k for p in (".block.", ".layers."))
        }

    for limit in (budget, None):
        m = safeshard.stream(safeshard.empty_model(tmp_path), tmp_path, max_resident_bytes=limit)
        s = streamer_of(m)
        stats = s.engine.stats
        with torch.no_grad():
            assert torch.equal(m.generate(ids, max_new_tokens=new, do_sample=False), want)
            first = dict(stats.loads_by_unit)  # the first, unlearned run may mispredict
            assert torch.equal(m.generate(ids, max_new_tokens=new, do_sample=False), want)
            again = {k: n - first.get(k, 0) for k, n in stats.loads_by_unit.items()}
            assert torch.equal(m(input_ids=ids, decoder_input_ids=dec).logits, want_logits)
        assert len(blocks(first, "encoder")) == 2 and len(blocks(first, "decoder")) == 2
        if limit is None:  # everything kept after its first use
            assert all(n == 1 for n in first.values()) and not any(again.values()), again
        else:  # the encoder once per generate, every decoder block for each token
            assert all(n == 1 for n in blocks(again, "encoder").values()), again
            assert all(n >= new - 1 for n in blocks(again, "decoder").values()), again
            assert s.stats.peak_resident_bytes <= limit
        s.close()


def test_a_seq2seq_checkpoint_built_as_another_head_is_told_why(tmp_path: Path) -> None:
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(_seq2seq("bart")).save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)  # names BartForConditionalGeneration
    with torch.device("meta"):
        wrong = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(
        ModelMismatchError,
        match=r"is a BartForCausalLM but the config names "
        r"BartForConditionalGeneration.*empty_model",
    ):
        safeshard.stream(wrong, tmp_path)
    # safeshard run on it: the encoder reads the prompt, the new tokens follow the start token
    full = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = full.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    r = CliRunner().invoke(
        main, ["run", str(tmp_path), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["new_token_ids"] == want[0, 1:].tolist()


# --------------------------------------------------------------------------- classification


def test_sequence_classification_streams_equal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(  # type: ignore[call-arg]  # extra keys go to **kwargs, untyped
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        num_labels=3,
    )
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path)
    full = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    built = safeshard.empty_model(tmp_path)
    assert type(built) is type(full)
    m = safeshard.stream(
        built, tmp_path, max_resident_bytes=_one_block(safeshard.empty_model(tmp_path), tmp_path)
    )
    with torch.no_grad():
        assert torch.equal(m(ids).logits, full(ids).logits)
    assert "score" in streamer_of(m).specs


# --------------------------------------------------------------------------- LLaVA


def _llava() -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=120,
        bos_token_id=1,
        eos_token_id=None,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=100, vision_feature_layer=-1
    )


def test_llava_gets_its_head_and_a_meta_build_streams_equal(tmp_path: Path) -> None:
    """The head comes from config.architectures; a model built under torch.device("meta")
    (its CLIP position ids computed by the vision tower's own _init_weights) streams equal
    to the model in memory, repeatedly at the exact minimum budget. The checkpoint is saved
    under the model's own tensor names (save_pretrained's Hub names are item 1's)."""
    torch.manual_seed(0)
    cfg = _llava()
    ref = LlavaForConditionalGeneration(cfg).eval()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.save_pretrained(tmp_path)
    assert type(safeshard.empty_model(tmp_path)) is LlavaForConditionalGeneration
    ids = torch.tensor([[1, 100, 100, 100, 100, 5, 6]])  # 4 image tokens: 4 patches
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels).logits
        tokens = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)

    def build() -> Any:
        with torch.device("meta"):
            return LlavaForConditionalGeneration(cfg).eval()

    budget = _one_block(build(), tmp_path)
    for _ in range(4):  # the minimum-budget accounting race showed once in 15 runs
        m = safeshard.stream(build(), tmp_path, max_resident_bytes=budget)
        with torch.no_grad():
            assert torch.equal(m(input_ids=ids, pixel_values=pixels).logits, want)
            got = m.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
        assert torch.equal(got, tokens)
        assert streamer_of(m).stats.peak_resident_bytes <= budget
        streamer_of(m).close()


# --------------------------------------------------------------------------- refused


def test_a_config_transformers_rejects_or_a_head_stream_lacks_is_refused_by_name(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-model", "hidden_size": 8}')
    (bad / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(ModelConfigError, match=r"bad/config\.json.*no-such-model"):
        safeshard.empty_model(bad)
    # the CLI: bad input (exit 3) naming the file, not "a bug in safeshard" (exit 70)
    r = CliRunner().invoke(main, ["run", str(bad), "--prompt-ids", "1,2"])
    assert r.exit_code == 3, r.output
    assert "config.json" in r.output and "no-such-model" in r.output

    enc = tmp_path / "encoder"
    enc.mkdir()
    (enc / "config.json").write_text(
        '{"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 32,'
        ' "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}'
    )
    with pytest.raises(ModelConfigError, match=r"'bert'.*BertForMaskedLM.*not a model stream"):
        safeshard.empty_model(enc)
    r = CliRunner().invoke(main, ["run", str(enc), "--prompt-ids", "1,2"])
    assert r.exit_code == 3 and "BertForMaskedLM" in r.output, r.output
    with pytest.raises(ModelConfigError, match=r"'bert' has no seq2seq-lm model"):
        safeshard.empty_model(enc, task="seq2seq-lm")
    with pytest.raises(UsageError, match="task must be one of"):
        safeshard.empty_model(enc, task="translation")
    # the head named explicitly: BERT does have a sequence-classification model
    assert type(safeshard.empty_model(enc, task="sequence-classification")).__name__ == (
        "BertForSequenceClassification"
    )


def test_the_head_follows_architectures_then_auto_map() -> None:
    from safeshard.runtime.heads import choose_task

    cfg = LlamaConfig(architectures=["LlamaForSequenceClassification"])
    assert choose_task(cfg, None, "config.json") == "sequence-classification"
    assert choose_task(cfg, "causal-lm", "config.json") == "causal-lm"
    cfg = LlamaConfig()  # no architectures: a causal LM, as before
    assert choose_task(cfg, None, "config.json") == "causal-lm"
    custom = LlamaConfig(  # type: ignore[call-arg]  # extra keys go to **kwargs, untyped
        architectures=["MyOwnLM"], auto_map={"AutoModelForCausalLM": "modeling_mine.MyOwnLM"}
    )
    assert choose_task(custom, None, "config.json") == "causal-lm"
    with pytest.raises(ModelConfigError, match="'MyOwnLM'"):
        choose_task(LlamaConfig(architectures=["MyOwnLM"]), None, "config.json")
