"""GPTQ detection and the per-module consistency check (safeshard.quant)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeshard.checkpoint import quant_configs
from safeshard.format.header import TensorInfo, tensor_nbytes
from safeshard.format.quant import (
    EXPECTED_DTYPES,
    QuantProblem,
    analyze,
    check_module,
    config_settings,
    infer_module,
    infer_settings,
    quantized_modules,
)

MOD = "model.layers.0.mlp.up_proj"


def info(name: str, dtype: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, dtype, shape, 0, tensor_nbytes(dtype, shape))


def gptq_members(
    module: str, in_f: int, out_f: int, bits: int, group: int, bias: bool = False
) -> dict[str, TensorInfo]:
    """A consistent GPTQ v1 module, with shapes from the format table (REFERENCE.md)."""
    groups = 1 if group <= 0 else math.ceil(in_f / group)
    shapes = {
        "qweight": (in_f * bits // 32, out_f),
        "qzeros": (groups, out_f * bits // 32),
        "scales": (groups, out_f),
        "g_idx": (in_f,),
    }
    out = {f"{module}.{m}": info(f"{module}.{m}", EXPECTED_DTYPES[m], s) for m, s in shapes.items()}
    if bias:
        out[f"{module}.bias"] = info(f"{module}.bias", "F16", (out_f,))
    return out


def kinds(problems: list[QuantProblem]) -> list[tuple[str, str | None]]:
    return [(p.kind, p.tensor) for p in problems]


# --------------------------------------------------------------------------- shapes


def module(shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    return {f"{MOD}.{m}": info(f"{MOD}.{m}", EXPECTED_DTYPES[m], s) for m, s in shapes.items()}


def test_the_gptq_table_for_llama_mlp_passes() -> None:
    # Llama-2-7B up_proj, 4-bit, group 128: in 4096, out 11008, shapes written out.
    table = {
        "qweight": (4096 // 8, 11008),
        "qzeros": (4096 // 128, 11008 // 8),
        "scales": (4096 // 128, 11008),
        "g_idx": (4096,),
    }
    assert check_module(MOD, module(table), 4, 128) == []
    wrong = {**table, "scales": (4096 // 64, 11008)}
    assert kinds(check_module(MOD, module(wrong), 4, 128)) == [("shape", f"{MOD}.scales")]


def test_group_size_minus_one_is_a_single_group() -> None:
    table = {"qweight": (512, 4096), "qzeros": (1, 512), "scales": (1, 4096), "g_idx": (4096,)}
    assert check_module(MOD, module(table), 4, -1) == []
    assert check_module(MOD, module(table), 4, 128) != []


def test_groups_round_up_when_in_is_not_a_multiple() -> None:
    table = {"qweight": (12, 64), "qzeros": (2, 8), "scales": (2, 64), "g_idx": (96,)}
    assert check_module(MOD, module(table), 4, 64) == []
    short = {**table, "qzeros": (1, 8), "scales": (1, 64)}
    assert check_module(MOD, module(short), 4, 64) != []


dims = st.integers(1, 64).map(lambda k: 32 * k)


@settings(max_examples=60, deadline=None)
@given(
    in_f=dims,
    out_f=dims,
    bits=st.sampled_from([2, 4, 8]),
    group=st.sampled_from([-1, 32, 64, 128]),
    bias=st.booleans(),
)
def test_a_consistent_module_has_no_problems(
    in_f: int, out_f: int, bits: int, group: int, bias: bool
) -> None:
    members = gptq_members(MOD, in_f, out_f, bits, group, bias)
    assert check_module(MOD, members, bits, group) == []
    assert infer_module({k.rsplit(".", 1)[1]: v for k, v in members.items()})[0] == bits


@settings(max_examples=60, deadline=None)
@given(
    in_f=dims,
    out_f=dims,
    bits=st.sampled_from([2, 4, 8]),
    group=st.sampled_from([32, 128]),
    member=st.sampled_from(["qweight", "qzeros", "scales", "g_idx"]),
    axis=st.integers(0, 1),
    delta=st.sampled_from([-1, 1, 7]),
)
def test_one_wrong_dimension_is_blamed_on_that_tensor(
    in_f: int, out_f: int, bits: int, group: int, member: str, axis: int, delta: int
) -> None:
    members = gptq_members(MOD, in_f, out_f, bits, group)
    name = f"{MOD}.{member}"
    old = members[name]
    shape = list(old.shape)
    axis = min(axis, len(shape) - 1)
    shape[axis] = max(0, shape[axis] + delta)
    if shape[axis] == old.shape[axis]:
        return
    members[name] = info(name, old.dtype, tuple(shape))
    problems = check_module(MOD, members, bits, group)
    assert problems, (member, shape)
    assert {p.tensor for p in problems} == {name}
    (p,) = problems
    assert p.kind == "shape"
    assert p.found == shape
    assert p.expected == list(old.shape)
    assert p.module == MOD


def test_missing_member_is_reported_with_module_and_tensor() -> None:
    members = gptq_members(MOD, 256, 128, 4, 128)
    del members[f"{MOD}.scales"]
    problems = check_module(MOD, members, 4, 128)
    assert kinds(problems) == [("missing", f"{MOD}.scales")]
    assert problems[0].expected == "scales"
    assert problems[0].found is None
    assert "scales" in problems[0].message


def test_wrong_dtype_is_reported() -> None:
    members = gptq_members(MOD, 256, 128, 4, 128)
    members[f"{MOD}.scales"] = info(f"{MOD}.scales", "F32", (2, 128))
    members[f"{MOD}.g_idx"] = info(f"{MOD}.g_idx", "I64", (256,))
    problems = check_module(MOD, members, 4, 128)
    assert sorted((p.kind, p.tensor, p.expected, p.found) for p in problems) == [
        ("dtype", f"{MOD}.g_idx", "I32", "I64"),
        ("dtype", f"{MOD}.scales", "F16", "F32"),
    ]


def test_bits_8_against_4_bit_shapes_blames_the_packed_tensors() -> None:
    members = gptq_members(MOD, 1024, 512, 4, 128)
    problems = check_module(MOD, members, 8, 128)
    by_tensor = {p.tensor: p for p in problems}
    assert set(by_tensor) == {f"{MOD}.qweight", f"{MOD}.qzeros"}
    assert by_tensor[f"{MOD}.qweight"].expected == [1024 * 8 // 32, 512]
    assert by_tensor[f"{MOD}.qweight"].found == [1024 * 4 // 32, 512]
    assert "bits=8" in by_tensor[f"{MOD}.qweight"].message


def test_bias_of_the_wrong_length_is_reported() -> None:
    members = gptq_members(MOD, 256, 128, 4, 128, bias=True)
    members[f"{MOD}.bias"] = info(f"{MOD}.bias", "F16", (127,))
    assert kinds(check_module(MOD, members, 4, 128)) == [("shape", f"{MOD}.bias")]


def test_member_names_alone_are_accepted() -> None:
    members = {k.rsplit(".", 1)[1]: v for k, v in gptq_members(MOD, 256, 128, 4, 64).items()}
    assert check_module(MOD, members, 4, 64) == []
    del members["g_idx"]
    assert kinds(check_module(MOD, members, 4, 64)) == [("missing", f"{MOD}.g_idx")]


def test_unknown_bits_checks_only_presence_and_dtype() -> None:
    members = gptq_members(MOD, 256, 128, 4, 128)
    members[f"{MOD}.qweight"] = info(f"{MOD}.qweight", "I32", (3, 5))
    assert check_module(MOD, members, None, None) == []


def test_problem_to_json_round_trips_through_json() -> None:
    members = gptq_members(MOD, 256, 128, 4, 128)
    del members[f"{MOD}.qzeros"]
    (p,) = check_module(MOD, members, 4, 128)
    data = json.loads(json.dumps(p.to_json()))
    assert data["kind"] == "missing"
    assert data["module"] == MOD
    assert data["tensor"] == f"{MOD}.qzeros"
    assert set(data) == {"kind", "module", "tensor", "expected", "found", "message"}


# --------------------------------------------------------------------------- modules, inference


def test_quantized_modules_finds_gptq_modules_only() -> None:
    tensors = [
        *gptq_members(MOD, 256, 128, 4, 128).values(),
        info("model.layers.0.input_layernorm.weight", "F16", (256,)),
        info("model.embed_tokens.weight", "F16", (10, 256)),
        info("model.layers.0.other.scales", "F16", (4,)),
    ]
    mods = quantized_modules(tensors)
    assert list(mods) == [MOD]
    assert set(mods[MOD]) == {"qweight", "qzeros", "scales", "g_idx"}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128])
def test_infer_module_recovers_bits_and_group(bits: int, group: int) -> None:
    members = gptq_members(MOD, 1024, 256, bits, group)
    assert infer_module({k.rsplit(".", 1)[1]: v for k, v in members.items()}) == (bits, group)


def test_infer_module_single_group_is_minus_one() -> None:
    members = gptq_members(MOD, 1024, 256, 4, -1)
    assert infer_module({k.rsplit(".", 1)[1]: v for k, v in members.items()}) == (4, -1)


def test_infer_settings_takes_the_majority_and_prefers_a_real_group() -> None:
    mods = {}
    for i in range(3):
        m = f"model.layers.{i}.mlp.up_proj"
        mods[m] = quantized_modules(gptq_members(m, 1024, 256, 4, 128).values())[m]
    small = "model.layers.0.small"
    mods[small] = quantized_modules(gptq_members(small, 64, 64, 4, 128).values())[small]
    s = infer_settings(mods)
    assert s is not None
    assert (s.method, s.bits, s.group_size, s.source) == ("gptq", 4, 128, "inferred")
    assert s.desc_act is None and s.sym is None


# --------------------------------------------------------------------------- configs


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


QC = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "quant_method": "gptq"}


def test_settings_from_quantize_config(tmp_path: Path) -> None:
    write_json(tmp_path / "quantize_config.json", QC)
    (s,), problems = config_settings(quant_configs(tmp_path))
    assert problems == []
    assert (s.method, s.bits, s.group_size, s.desc_act, s.sym, s.source) == (
        "gptq",
        4,
        128,
        False,
        True,
        "quantize_config.json",
    )


def test_settings_from_config_json(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {"model_type": "llama", "quantization_config": QC})
    (s,), problems = config_settings(quant_configs(tmp_path))
    assert problems == []
    assert (s.bits, s.group_size, s.source) == (4, 128, "config.json")


def test_settings_from_autogptq_metadata() -> None:
    meta = {"format": "pt", "gptq_bits": "4", "gptq_group_size": "128", "gptq_desc_act": "False"}
    (s,), problems = config_settings(None, meta)
    assert problems == []
    assert (s.bits, s.group_size, s.desc_act, s.sym, s.source) == (4, 128, False, None, "metadata")


def test_quantize_config_wins_and_disagreement_is_reported(tmp_path: Path) -> None:
    write_json(tmp_path / "quantize_config.json", QC)
    write_json(tmp_path / "config.json", {"quantization_config": {**QC, "group_size": 64}})
    tensors = gptq_members(MOD, 256, 128, 4, 128).values()
    q = analyze(tensors, quant_configs(tmp_path))
    assert q is not None
    assert q.settings.source == "quantize_config.json"
    assert q.settings.group_size == 128
    assert [(p.kind, p.expected, p.found) for p in q.problems] == [("config", 128, 64)]
    assert "config.json" in q.problems[0].message


def test_bad_config_values_are_problems_not_exceptions(tmp_path: Path) -> None:
    write_json(tmp_path / "quantize_config.json", {"bits": "four", "group_size": 128, "sym": 3})
    q = analyze(gptq_members(MOD, 256, 128, 4, 128).values(), quant_configs(tmp_path))
    assert q is not None
    config = [p for p in q.problems if p.kind == "config"]
    assert {p.found for p in config} >= {"four", "3"}
    # bits falls back to what the shapes say, so the modules are still checked
    assert q.settings.bits == 4


# --------------------------------------------------------------------------- analyze


def test_unquantized_checkpoint_gives_none(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {"model_type": "llama"})
    assert (
        analyze([info("model.layers.0.mlp.up_proj.weight", "F16", (4, 4))], quant_configs(tmp_path))
        is None
    )


def test_no_config_means_inferred_settings() -> None:
    tensors = [*gptq_members(MOD, 512, 256, 4, 64).values()]
    q = analyze(tensors)
    assert q is not None
    assert q.settings.to_json() == {
        "method": "gptq",
        "bits": 4,
        "group_size": 64,
        "desc_act": None,
        "sym": None,
    }
    assert q.settings.source == "inferred"
    assert q.modules == (MOD,)
    assert q.ok


def test_config_bits_8_with_4_bit_tensors_is_reported(tmp_path: Path) -> None:
    write_json(tmp_path / "quantize_config.json", {**QC, "bits": 8})
    mods = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    tensors = [t for m in mods for t in gptq_members(m, 512, 512, 4, 128).values()]
    q = analyze(tensors, quant_configs(tmp_path))
    assert q is not None
    assert q.settings.bits == 8
    assert q.inferred is not None and q.inferred.bits == 4
    summary = [p for p in q.problems if p.kind == "config"]
    assert [(p.expected, p.found) for p in summary] == [(8, 4)]
    shape = {p.tensor for p in q.problems if p.kind == "shape"}
    assert shape == {f"{m}.{t}" for m in mods for t in ("qweight", "qzeros")}


def test_gptq_config_without_quantized_tensors_is_reported(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {"quantization_config": QC})
    q = analyze([info("model.layers.0.mlp.up_proj.weight", "F16", (4, 4))], quant_configs(tmp_path))
    assert q is not None
    assert q.modules == ()
    assert [p.kind for p in q.problems] == ["config"]


def test_non_gptq_method_is_reported_but_not_checked_as_gptq(tmp_path: Path) -> None:
    write_json(
        tmp_path / "config.json", {"quantization_config": {"quant_method": "awq", "bits": 4}}
    )
    # AWQ packs along out: qweight [in, out*bits/32], which is not GPTQ's layout
    tensors = [
        info(f"{MOD}.qweight", "I32", (256, 16)),
        info(f"{MOD}.qzeros", "I32", (2, 16)),
        info(f"{MOD}.scales", "F16", (2, 128)),
    ]
    q = analyze(tensors, quant_configs(tmp_path))
    assert q is not None
    assert q.settings.method == "awq"
    assert q.problems == ()


def test_missing_fields_are_filled_from_later_sources(tmp_path: Path) -> None:
    write_json(tmp_path / "quantize_config.json", {"bits": 4})
    q = analyze(gptq_members(MOD, 512, 256, 4, 64).values(), quant_configs(tmp_path))
    assert q is not None
    assert (q.settings.bits, q.settings.group_size, q.settings.source) == (
        4,
        64,
        "quantize_config.json",
    )
    assert q.ok
