"""safeshard.stream: a transformers model on the meta device, run with its weights streamed.

Every output is compared with ``torch.equal`` to the same model loaded whole by
``from_pretrained``: the forward logits and the tokens of a greedy ``generate``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

import safeshard
from safeshard.cli import main
from safeshard.errors import BudgetError, DeviceError, ModelMismatchError, UsageError
from safeshard.runtime.membudget import AutoBudget, MemoryReading
from safeshard.runtime.stream import streamer_of

IDS = torch.tensor([[1, 15, 72, 101, 108, 108, 111, 44, 32, 119]])
NEW = 6


def _config(family: str, layers: int) -> Any:
    common: dict[str, Any] = {"vocab_size": 300, "bos_token_id": 1, "eos_token_id": None}
    if family in ("llama", "llama-tied"):
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=family == "llama-tied",
            **common,
        )
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=64, **common)
    if family == "opt":
        return OPTConfig(
            hidden_size=64,
            num_hidden_layers=layers,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
            **common,
        )
    raise AssertionError(family)


class Model:
    """A tiny model saved in several shards, and its outputs when loaded whole."""

    def __init__(self, folder: Path, family: str, layers: int) -> None:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family, layers), dtype=torch.float32)
        model.save_pretrained(folder, max_shard_size="100KB")
        self.folder = folder
        full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            self.logits = full(IDS).logits
            self.tokens = full.generate(IDS, max_new_tokens=NEW, do_sample=False)

    def streamed(self, **kw: Any) -> Any:
        return safeshard.stream(safeshard.empty_model(self.folder), self.folder, **kw)

    def check(self, model: Any) -> None:
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, self.logits)
            assert torch.equal(
                model.generate(IDS, max_new_tokens=NEW, do_sample=False), self.tokens
            )


FAMILIES = ["llama", "llama-tied", "gpt2", "opt"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    root = tmp_path_factory.mktemp("stream-models")
    out = {f: Model(root / f, f, layers=4) for f in FAMILIES}
    out["llama-8"] = Model(root / "llama-8", "llama", layers=8)
    return out


def sizes(model: Model, **kw: Any) -> tuple[int, int, int]:
    """(one block: the least budget, the whole model, the biggest unit) for ``model``."""
    m = model.streamed(**kw)
    s = streamer_of(m)
    units = s.units
    biggest = max(u.nbytes for u in units if not u.rows and not u.pinned)
    one = biggest + sum(u.nbytes for u in units if u.pinned)
    total = s.model_bytes
    s.close()
    return one, total, biggest


def held_now(model: Any) -> int:
    """Bytes of the model's weights that are not meta placeholders right now (an account
    independent of the runner's own)."""
    seen: set[int] = set()
    n = 0
    for mod in model.modules():
        tensors = list(mod._parameters.values()) + [
            b for k, b in mod._buffers.items() if k not in mod._non_persistent_buffers_set
        ]
        for t in tensors:
            if t is None or t.device.type == "meta" or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def watch_holdings(model: Any) -> list[int]:
    """Record :func:`held_now` whenever a module with weights starts running."""
    seen: list[int] = []
    for mod in model.modules():
        if mod._parameters or any(k not in mod._non_persistent_buffers_set for k in mod._buffers):
            mod.register_forward_pre_hook(lambda m, a: seen.append(held_now(model)))
    return seen


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", ["one block", "half", "everything"])
def test_streamed_outputs_equal_a_full_load(
    models: dict[str, Model], family: str, budget: str
) -> None:
    model = models[family]
    one, total, _ = sizes(model)
    limit = {"one block": one, "half": max(one, total // 2), "everything": None}[budget]
    m = model.streamed(max_resident_bytes=limit)
    seen = watch_holdings(m)
    model.check(m)
    stats = streamer_of(m).stats
    if limit is not None:
        assert stats.peak_resident_bytes <= limit
        assert max(seen) <= limit
    else:
        assert stats.bytes_read == total  # each unit read once, then kept
    assert stats.passes == 1 + NEW


def test_module_granularity_and_no_prefetch_give_the_same_outputs(
    models: dict[str, Model],
) -> None:
    model = models["llama"]
    one, total, _ = sizes(model, granularity="module")
    for kw in (
        {"granularity": "module", "max_resident_bytes": one},
        {"granularity": "module", "max_resident_bytes": total // 2, "prefetch": 2},
        {"prefetch": 0, "max_resident_bytes": total // 2},
        {"rows": False, "page_cache": "drop", "max_resident_bytes": total // 2},
    ):
        m = model.streamed(**kw)
        model.check(m)
        streamer_of(m).close()


def test_models_built_by_hand_on_meta_or_with_init_empty_weights(
    models: dict[str, Model],
) -> None:
    init_empty_weights = pytest.importorskip("accelerate").init_empty_weights
    model = models["gpt2"]
    cfg = AutoConfig.from_pretrained(model.folder)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.check(safeshard.stream(m.eval(), model.folder))
    with init_empty_weights():  # parameters on meta, buffers real
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.check(safeshard.stream(m.eval(), model.folder, max_resident_bytes="300KB"))


def test_tied_weights_stay_tied(models: dict[str, Model]) -> None:
    model = models["llama-tied"]
    m = model.streamed()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    with torch.no_grad():
        m(IDS)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.lm_head.weight.device.type == "cpu"  # kept: no budget


# --------------------------------------------------------------------------- instrumented


def test_the_next_block_is_read_before_this_one_ends_across_tokens_too(
    models: dict[str, Model],
) -> None:
    model = models["llama-8"]
    one, _, _ = sizes(model)
    m = model.streamed(max_resident_bytes=2 * one + 1024)  # room for one block ahead
    s = streamer_of(m)
    late: list[tuple[str, str]] = []
    checked: list[tuple[str, str]] = []

    def wait_next(key: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if not s.engine.learned:
                return  # the first pass predicts model order; test the learned ones
            nxt = s.engine.upcoming()
            if not nxt:
                return
            end = time.monotonic() + 10
            while nxt[0] not in s.lc.residency and time.monotonic() < end:
                time.sleep(0.001)
            (checked if nxt[0] in s.lc.residency else late).append((key, nxt[0]))

        return hook

    for spec in s.specs.values():
        for user in spec.users:  # runs before the hook that releases the unit
            user.register_forward_hook(wait_next(spec.unit.key), prepend=True)
    model.check(m)
    assert not late
    pairs = dict(checked)
    assert pairs["model.layers.3"] == "model.layers.4"
    # the last unit of a token runs while the first block of the next token is read
    last = [k for k, _ in checked][-1]
    assert pairs[last] == "model.layers.0", checked[-12:]


def test_half_the_model_as_budget_reads_about_half_per_token(models: dict[str, Model]) -> None:
    model = models["llama-8"]
    for granularity, bound in (("module", 0.55), ("block", None)):
        _, total, biggest = sizes(model, granularity=granularity)
        budget = total // 2
        m = model.streamed(max_resident_bytes=budget, granularity=granularity)
        s = streamer_of(m)
        marks: list[int] = []

        def tick(input_ids: Any, scores: Any, s: Any = s, marks: list[int] = marks) -> Any:
            marks.append(s.stats.bytes_read)
            return scores

        with torch.no_grad():
            m.generate(IDS, max_new_tokens=8, do_sample=False, logits_processor=[tick])
        per_token = (marks[-1] - marks[0]) / (len(marks) - 1)
        resident = sum(u.nbytes for u in s.units if u.key in s.stats.resident)
        window = 2 * biggest  # one unit in use, one read ahead
        assert resident >= budget - window - biggest  # the budget is put to use
        assert per_token <= total - resident + 1024  # only the rest is read, rows aside
        if bound is not None:
            assert per_token <= bound * total, (per_token, total)
        s.close()


def test_auto_budget_follows_a_faked_reading(models: dict[str, Model]) -> None:
    model = models["llama-8"]
    one, total, _ = sizes(model)
    others = [0]
    limit = total + 10 * one
    box: list[Any] = []

    def read() -> list[MemoryReading]:  # a cgroup: what the runner holds is in use
        held = box[0].lc.residency.resident_bytes if box else 0
        return [MemoryReading(limit - others[0] - held, "fake cgroup")]

    m = model.streamed(max_resident_bytes=AutoBudget(read, margin=0.0, min_margin=0, interval=0.0))
    s = streamer_of(m)
    box.append(s)
    assert s.stats.budget == limit
    model.check(m)
    assert s.lc.residency.resident_bytes == total  # all of it kept
    others[0] = limit - 3 * one  # memory drops: 3 blocks' worth left
    with torch.no_grad():
        m(IDS)
    assert s.stats.budget == 3 * one
    assert s.lc.residency.resident_bytes <= 3 * one
    assert len(s.stats.resident) < len(s.units)
    model.check(m)  # still right, with less memory
    others[0] = 0
    assert s.refresh_budget() == limit
    with torch.no_grad():
        m(IDS)
    assert s.stats.resident == [u.key for u in s.units]


def test_open_with_an_automatic_budget(models: dict[str, Model]) -> None:
    auto = AutoBudget(lambda: [MemoryReading(10**6, "fake")], margin=0.5, min_margin=0)
    with safeshard.open(models["llama"].folder, max_resident_bytes=auto) as lc:
        assert lc.budget == 500_000
        for _, tensors in lc.iter_layers():
            assert tensors and lc.resident_bytes <= 500_000


# --------------------------------------------------------------------------- refused up front


def test_a_block_larger_than_the_budget_is_refused_before_any_pass(
    models: dict[str, Model],
) -> None:
    model = models["llama"]
    one, _, _ = sizes(model)
    empty = safeshard.empty_model(model.folder)
    with pytest.raises(BudgetError, match=r"'model\.layers\.\d' holds .* at least"):
        safeshard.stream(empty, model.folder, max_resident_bytes=one - 1)
    with pytest.raises(UsageError):
        streamer_of(empty)  # nothing was attached


def test_a_checkpoint_missing_a_tensor_is_refused(models: dict[str, Model], tmp_path: Path) -> None:
    src = models["llama"].folder
    tensors: dict[str, torch.Tensor] = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(f))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ModelMismatchError, match=r"no tensor .*layers\.2\.mlp\.up_proj\.weight"):
        safeshard.stream(safeshard.empty_model(tmp_path), tmp_path)


def test_a_misshapen_checkpoint_is_refused(models: dict[str, Model]) -> None:
    src = models["llama"].folder
    cfg = AutoConfig.from_pretrained(src)
    cfg.intermediate_size = 96
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(
        ModelMismatchError, match=r"shape \[128, 64\] in the checkpoint.*\[96, 64\]"
    ):
        safeshard.stream(m, src)


def test_a_checkpoint_with_tensors_the_model_lacks_is_refused(
    models: dict[str, Model],
) -> None:
    src = models["llama"].folder
    cfg = AutoConfig.from_pretrained(src)
    cfg.num_hidden_layers = 3  # the checkpoint has 4
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ModelMismatchError, match=r"no place in the model .*layers\.3"):
        safeshard.stream(m, src)


def test_a_model_with_real_weights_is_refused(models: dict[str, Model]) -> None:
    src = models["opt"].folder
    real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    with pytest.raises(
        UsageError, match=r"meta device.*'model\.decoder\.embed_tokens\.weight' is on cpu"
    ):
        safeshard.stream(real, src)
    with pytest.raises(UsageError, match=r"torch\.nn\.Module"):
        safeshard.stream(object(), src)


# --------------------------------------------------------------------------- lifetime


def test_close_puts_the_placeholders_back_and_removes_the_hooks(models: dict[str, Model]) -> None:
    model = models["llama"]
    m = model.streamed()
    with torch.no_grad():
        m(IDS)
    assert held_now(m) > 0
    s = streamer_of(m)
    s.close()
    assert held_now(m) == 0
    with pytest.raises(UsageError):
        streamer_of(m)
    assert not any(mod._forward_pre_hooks for mod in m.modules())
    model.check(safeshard.stream(m, model.folder))  # can be streamed again


def test_a_missing_device_is_refused(models: dict[str, Model]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="cuda"):
        models["llama"].streamed(device="cuda")


def test_streaming_twice_is_refused(models: dict[str, Model]) -> None:
    m = models["llama"].streamed()
    with pytest.raises(UsageError, match="already streamed"):
        safeshard.stream(m, models["llama"].folder)


def test_a_dropped_model_stops_its_reader(models: dict[str, Model]) -> None:
    import gc

    m = models["llama"].streamed(max_resident_bytes="400KB")
    with torch.no_grad():
        m(IDS)
    engine = streamer_of(m).engine
    del m
    gc.collect()
    assert engine.closed
    assert not any(
        t.name == "safeshard-stream-prefetch" and t.is_alive()
        for t in threading.enumerate()
        if t is engine._thread
    )


# --------------------------------------------------------------------------- CLI


def test_cli_run_generates_the_same_tokens(models: dict[str, Model]) -> None:
    model = models["llama"]
    ids = ",".join(str(i) for i in IDS[0].tolist())
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(model.folder),
            "--prompt-ids",
            ids,
            "--max-new-tokens",
            str(NEW),
            "--max-resident",
            "400KB",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["new_token_ids"] == model.tokens[0, IDS.shape[1] :].tolist()
    assert report["peak_resident_bytes"] <= 400_000
    assert report["bytes_read_per_token"] > 0
    text = CliRunner().invoke(main, ["run", str(model.folder), "--prompt-ids", ids])
    assert text.exit_code == 0 and "per token" in text.output
    bad = CliRunner().invoke(main, ["run", str(model.folder), "--prompt-ids", "1,x"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output  # a usage error
    small = CliRunner().invoke(
        main, ["run", str(model.folder), "--prompt-ids", "1", "--max-resident", "1KB"]
    )
    assert small.exit_code == 3 and "max_resident_bytes" in small.output  # BudgetError
