"""``safeshard run MODEL "prompt"``: text in through the folder's tokenizer (and its chat
template), text out as it is generated (issue 17, item 5). The tokenizer is a word-level
one trained here and saved into the model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from safeshard.cli import main
from safeshard.runtime.textgen import TextStreamer, load_tokenizer, prompt_ids

CORPUS = [
    "the disk reads the model one block at a time",
    "a small budget keeps memory flat while tokens stream out",
    "hello world from a streamed model",
]
TEMPLATE = (
    "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<bot>{% endif %}"
)
NEW = 6


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<user>", "<bot>"])
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # transformers: no annotations
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text-model")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size="40KB")
    tok.save_pretrained(path)
    return path


def _greedy(folder: Path, ids: list[int]) -> list[int]:
    full = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = full.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
    return [int(t) for t in out[0, len(ids) :]]


def test_run_prints_the_text_a_full_load_generates(folder: Path) -> None:
    tok = load_tokenizer(folder)
    ids = tok("hello world")["input_ids"]
    want_ids = _greedy(folder, ids)
    want = tok.decode(want_ids, skip_special_tokens=True)
    assert want.strip()
    args = ["run", str(folder), "hello world", "--max-new-tokens", str(NEW)]
    r = CliRunner().invoke(main, [*args, "--max-resident", "60KB", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["prompt_ids"] == ids and report["new_token_ids"] == want_ids
    assert report["text"] == want and report["tokens_per_second"] > 0
    assert report["peak_resident_bytes"] <= 60_000
    r = CliRunner().invoke(main, args)  # --max-resident defaults to auto
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == want
    assert "tokens/s" in lines[-1] and "read per token" in lines[-1] and "peak held" in lines[-1]
    # token ids still work, and only one prompt at a time
    r = CliRunner().invoke(main, ["run", str(folder), "--prompt-ids", ",".join(map(str, ids))])
    assert r.exit_code == 0 and r.output.split()[:NEW] == [str(t) for t in want_ids[:NEW]]
    r = CliRunner().invoke(main, ["run", str(folder), "hi", "--prompt-ids", "1"])
    assert r.exit_code == 2


def test_the_chat_template_wraps_the_prompt(folder: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(folder)
    plain = prompt_ids(tok, "hello world")
    with pytest.raises(Exception, match="no chat template"):
        prompt_ids(tok, "hello world", chat=True)
    tok.chat_template = TEMPLATE
    chat = prompt_ids(tok, "hello world")
    user, bot = tok.convert_tokens_to_ids(["<user>", "<bot>"])
    assert chat == [user, *plain, bot]
    assert prompt_ids(tok, "hello world", chat=False) == plain
    chatty = tmp_path / "chat"
    chatty.mkdir()
    for f in folder.iterdir():
        (chatty / f.name).write_bytes(f.read_bytes())
    tok.save_pretrained(chatty)
    r = CliRunner().invoke(
        main, ["run", str(chatty), "hello world", "--json", "--max-new-tokens", str(NEW)]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["prompt_ids"] == chat
    assert report["new_token_ids"] == _greedy(chatty, chat)
    r = CliRunner().invoke(
        main, ["run", str(chatty), "hello world", "--no-chat-template", "--json"]
    )
    assert json.loads(r.output)["prompt_ids"] == plain


def test_text_is_handed_on_as_each_token_comes(folder: Path) -> None:
    tok = load_tokenizer(folder)
    pieces: list[str] = []
    s = TextStreamer(tok, pieces.append)
    s.put(torch.tensor([[5, 6]]))  # the prompt: skipped
    for t in (7, 8, 9):
        s.put(torch.tensor([t]))
        assert len(pieces) == t - 6  # one piece per token, at once
    s.end()
    assert "".join(pieces) == tok.decode([7, 8, 9])


def test_a_folder_without_a_tokenizer_asks_for_ids(tmp_path: Path, folder: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in folder.iterdir():
        if f.name.startswith(("model", "config")):
            (bare / f.name).write_bytes(f.read_bytes())
    r = CliRunner().invoke(main, ["run", str(bare), "hello"])
    assert r.exit_code == 2 and "--prompt-ids" in r.output, r.output
