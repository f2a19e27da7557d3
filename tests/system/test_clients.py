"""Real clients load split output: transformers, huggingface_hub, GPTQModel.

Also the loaders' documented lookup rules (which file a folder's weights are), written
here as small functions because AutoGPTQ is not installed: transformers looks for
``model.safetensors`` then ``model.safetensors.index.json``; AutoGPTQ's
``get_checkpoints`` (and GPTQModel, safetensors only) tries the base names
``[model_file_base_name]`` or ``gptq_model-{bits}bit-{group}g`` then ``model``, and for
each base ``{base}.safetensors.index.json`` before ``{base}.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import safeshard
from safeshard.checkpoint import locate

synth = pytest.importorskip("safeshard.ops.synth")


def transformers_finds(folder: Path) -> str | None:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return name
    return None


def autogptq_finds(folder: Path) -> str | None:
    qc: dict[str, Any] = json.loads((folder / "quantize_config.json").read_text())
    named = qc.get("model_file_base_name")
    bases = [named] if named else [f"gptq_model-{qc['bits']}bit-{qc['group_size']}g", "model"]
    for base in bases:
        for name in (f"{base}.safetensors.index.json", f"{base}.safetensors"):
            if (folder / name).is_file():
                return name
    return None


gptqmodel_finds = autogptq_finds  # the same rule, .safetensors only (REFERENCE.md)


def cap_for(folder: Path, parts: int) -> int:
    """A cap giving one file (parts=1) or several (about ``parts``, blocks permitting)."""
    size = next(folder.glob("*.safetensors")).stat().st_size
    return size // parts + 4096


def check_count(files: list[Any], parts: int) -> None:
    assert len(files) == 1 if parts == 1 else len(files) >= min(parts, 3)


@pytest.fixture(scope="module")
def gptq_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.synthesize(tmp_path_factory.mktemp("gptq") / "src", "tiny-gptq")  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- lookup rules


@pytest.mark.parametrize(
    "name, parts, autogptq, hf",
    [
        ("model", 4, "model.safetensors.index.json", "model.safetensors.index.json"),
        ("model", 1, "model.safetensors", "model.safetensors"),
        (
            "gptq_model-4bit-128g",
            4,
            "gptq_model-4bit-128g.safetensors.index.json",
            None,
        ),
        ("gptq_model-4bit-128g", 1, "gptq_model-4bit-128g.safetensors", None),
        ("custom", 3, "custom.safetensors.index.json", None),
    ],
)
def test_loaders_lookup_rules_find_the_output(
    gptq_src: Path, tmp_path: Path, name: str, parts: int, autogptq: str, hf: str | None
) -> None:
    out = tmp_path / "out"
    r = safeshard.split(gptq_src, out, max_shard_size=cap_for(gptq_src, parts), name=name)
    check_count(r.files, parts)
    assert autogptq_finds(out) == autogptq
    assert gptqmodel_finds(out) == autogptq
    assert transformers_finds(out) == hf
    loc = locate(out)
    assert (loc.index.path.name if loc.index else loc.files[0].name) == autogptq
    if hf is None:
        assert any("transformers looks only for model.safetensors" in n for n in r.notes)


def test_source_lookup_works_before_split(gptq_src: Path) -> None:
    # the synthesized source is AutoGPTQ-named: the rules under test must find it too
    assert autogptq_finds(gptq_src) == "gptq_model-4bit-128g.safetensors"
    assert transformers_finds(gptq_src) is None


# --------------------------------------------------------------------------- transformers, hub


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-llama-tied"])
@pytest.mark.parametrize("parts", [1, 4])
def test_tiny_llama_split_loads_with_equal_logits(tmp_path: Path, preset: str, parts: int) -> None:
    torch = pytest.importorskip("torch")
    from helpers.clients import hf_load, hf_logits, hub_load_strict

    src = synth.synthesize(tmp_path / "src", preset)
    out = tmp_path / "out"
    r = safeshard.split(src, out, max_shard_size=cap_for(src, parts))
    check_count(r.files, parts)
    assert (out / "model.safeshard.json").is_file()  # the manifest sits beside the weights
    before = hf_logits(src)
    after = hf_logits(out, native=True)  # clean loading info is asserted inside
    assert torch.equal(before, after)
    hub = hub_load_strict(out)
    ref = hf_load(src)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(hub(ids).logits, ref(ids).logits)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, hub.state_dict()[k]), k


# --------------------------------------------------------------------------- GPTQModel


@pytest.mark.slow
@pytest.mark.gptq
def test_tiny_gptq_split_loads_through_gptqmodel(gptq_src: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("gptqmodel")
    from helpers.clients import gptq_logits

    before = gptq_logits(gptq_src)
    out = tmp_path / "out"
    r = safeshard.split(gptq_src, out, max_shard_size=cap_for(gptq_src, 4))
    check_count(r.files, 4)
    assert torch.equal(gptq_logits(out, native=True), before)
    named = tmp_path / "named"
    safeshard.split(
        gptq_src, named, max_shard_size=cap_for(gptq_src, 3), name="gptq_model-4bit-128g"
    )
    assert torch.equal(gptq_logits(named), before)
