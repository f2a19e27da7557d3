"""Model structure from tensor names: blocks, modules and model order."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeshard.format.blocks import (
    describe_blocks,
    families,
    group_tensors,
    is_tail,
    model_order,
    module_of,
    natural_key,
    split_block,
)


def llama(n_layers: int, prefix: str = "model.layers", quantized: bool = False) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(n_layers):
        for mod in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"):
            suffixes = ("qweight", "qzeros", "scales", "g_idx") if quantized else ("weight",)
            names += [f"{prefix}.{i}.{mod}.{s}" for s in suffixes]
        names.append(f"{prefix}.{i}.input_layernorm.weight")
    return names


def shuffled(names: list[str], seed: int = 0) -> list[str]:
    out = list(names)
    random.Random(seed).shuffle(out)
    return out


@pytest.mark.parametrize(
    "name, block",
    [
        ("model.layers.7.mlp.up_proj.weight", ("model.layers", 7)),
        ("transformer.h.11.attn.c_attn.weight", ("transformer.h", 11)),
        ("model.decoder.layers.0.fc1.bias", ("model.decoder.layers", 0)),
        ("encoder.block.3.layer.1.DenseReluDense.wi.weight", ("encoder.block", 3)),
        ("model.layers.2.block_sparse_moe.experts.5.w1.weight", ("model.layers", 2)),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("0.weight", None),  # nothing before the number: not a family
        ("model.layers.3", None),  # nothing after the number
    ],
)
def test_split_block(name: str, block: tuple[str, int] | None) -> None:
    assert split_block(name) == block


@pytest.mark.parametrize(
    "names, family",
    [
        (llama(3), "model.layers"),
        (llama(3, "transformer.h"), "transformer.h"),
        (llama(3, "model.decoder.layers"), "model.decoder.layers"),
    ],
)
def test_block_families(names: list[str], family: str) -> None:
    groups = group_tensors(shuffled(names))
    blocks = [g for g in groups if g.kind == "block"]
    assert [g.key for g in blocks] == [f"{family}.{i}" for i in range(3)]
    assert families(groups) == {family: [0, 1, 2]}
    for g in blocks:
        assert all(t.startswith(g.key + ".") for t in g.tensors)
        assert len(g.tensors) == 4


def test_numbers_compare_as_numbers() -> None:
    names = llama(12)
    blocks = [g.number for g in group_tensors(shuffled(names)) if g.kind == "block"]
    assert blocks == list(range(12))  # 2 before 10
    assert natural_key("layers.2") < natural_key("layers.10")
    assert natural_key("a9b") < natural_key("a10a")


def test_embeddings_first_norm_and_head_last() -> None:
    groups = group_tensors(shuffled(llama(2)))
    assert groups[0].key == "model.embed_tokens.weight" and groups[0].kind == "head"
    assert [g.key for g in groups[-2:]] == ["model.norm.weight", "lm_head.weight"]
    assert all(g.kind == "tail" for g in groups[-2:])


@pytest.mark.parametrize(
    "name, tail",
    [
        ("model.norm.weight", True),
        ("lm_head.weight", True),
        ("transformer.ln_f.weight", True),
        ("model.decoder.final_layer_norm.weight", True),
        ("output.weight", True),
        ("score.weight", True),
        ("model.embed_tokens.weight", False),
        ("transformer.wte.weight", False),
        ("transformer.wpe.weight", False),
        ("embeddings.LayerNorm.weight", False),
        ("model.rotary_emb.inv_freq", False),
    ],
)
def test_is_tail(name: str, tail: bool) -> None:
    assert is_tail(name) is tail


def test_two_families_in_one_model() -> None:
    names = [
        "model.embed_tokens.weight",
        "model.vision_tower.blocks.0.attn.weight",
        "model.vision_tower.blocks.1.attn.weight",
        "model.layers.0.mlp.weight",
        "model.layers.1.mlp.weight",
        "model.norm.weight",
    ]
    groups = group_tensors(shuffled(names))
    fams = families(groups)
    assert fams == {"model.layers": [0, 1], "model.vision_tower.blocks": [0, 1]}
    # each family's blocks are contiguous in model order
    keys = [g.family for g in groups if g.kind == "block"]
    assert keys == sorted(keys, key=keys.index)
    assert len({k for k in keys}) == 2 and keys[0] != keys[-1]


def test_moe_experts_stay_in_their_layer() -> None:
    names = [
        f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
        for i in range(2)
        for e in (0, 2, 10)
        for w in ("w1", "w2", "w3")
    ] + [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)]
    groups = group_tensors(shuffled(names))
    assert [g.key for g in groups] == ["model.layers.0", "model.layers.1"]
    experts = [m.name.split(".")[5] for m in groups[0].modules if ".experts." in m.name]
    assert experts == ["0"] * 3 + ["2"] * 3 + ["10"] * 3
    assert len(groups[0].tensors) == 10


def test_gptq_module_members_grouped_in_fixed_order() -> None:
    base = "model.layers.0.mlp.down_proj"
    names = shuffled([f"{base}.{s}" for s in ("bias", "g_idx", "scales", "qzeros", "qweight")])
    names += ["model.layers.0.post_attention_layernorm.weight"]
    (block,) = group_tensors(names)
    mods = {m.name: m for m in block.modules}
    q = mods[base]
    assert q.quantized and not mods["model.layers.0.post_attention_layernorm"].quantized
    assert q.tensors == tuple(
        f"{base}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx", "bias")
    )
    assert module_of(f"{base}.qweight") == base and module_of("plain") == "plain"


def test_describe_blocks() -> None:
    groups = group_tensors(llama(18))
    assert describe_blocks(groups) == "model.embed_tokens, layers 0-17, model.norm, lm_head"
    assert describe_blocks(groups[3:6]) == "layers 2-4"
    assert describe_blocks([]) == ""
    # a block split across shards is named once per shard, not repeated
    assert describe_blocks([groups[1], groups[1]]) == "layers 0"


@pytest.mark.parametrize(
    "names",
    [
        ["a01", "a1"],
        ["x.layers.01.w", "x.layers.1.w"],
        ["l.0.w.01", "l.0.w.1"],
        ["f01.0.w", "f1.0.w"],
        ["lm_head.01", "lm_head.1"],
    ],
)
def test_names_equal_as_numbers_still_have_one_order(names: list[str]) -> None:
    """Leading zeros make natural keys tie; the order must not follow the input."""
    assert model_order(names) == model_order(names[::-1])


# --------------------------------------------------------------------------- properties

component = st.one_of(
    st.from_regex(r"[a-z_]{1,6}", fullmatch=True),
    st.from_regex(r"[0-9]{1,3}", fullmatch=True),
)
names_st = st.lists(
    st.lists(component, min_size=1, max_size=5).map(".".join), min_size=0, max_size=30, unique=True
)


@given(names_st, st.randoms(use_true_random=False))
def test_model_order_is_a_permutation_independent_of_input_order(
    names: list[str], rnd: random.Random
) -> None:
    order = model_order(names)
    assert sorted(order) == sorted(names)
    other = list(names)
    rnd.shuffle(other)
    assert model_order(other) == order
    groups = group_tensors(names)
    assert len({g.key for g in groups}) == len(groups)
    # head, then blocks, then tail
    kinds = [g.kind for g in groups]
    assert kinds == sorted(kinds, key=["head", "block", "tail"].index)
    # within a family, block numbers strictly increase
    for numbers in families(groups).values():
        assert numbers == sorted(set(numbers))


def test_encoder_blocks_come_before_decoder_blocks() -> None:
    names = [
        "model.decoder.layers.0.fc1.weight",
        "model.decoder.layers.1.fc1.weight",
        "model.encoder.layers.0.fc1.weight",
        "model.encoder.layers.1.fc1.weight",
        "model.shared.weight",
        "lm_head.weight",
    ]
    keys = [g.key for g in group_tensors(names)]
    assert keys == [
        "model.shared.weight",
        "model.encoder.layers.0",
        "model.encoder.layers.1",
        "model.decoder.layers.0",
        "model.decoder.layers.1",
        "lm_head.weight",
    ]


def test_vision_tower_comes_before_the_language_model() -> None:
    names = ["model.layers.0.mlp.weight", "model.vision_tower.layers.0.mlp.weight"]
    assert [g.key for g in group_tensors(names)] == [
        "model.vision_tower.layers.0",
        "model.layers.0",
    ]


# --------------------------------------------------------------------------- reference


def _reference_key(name: str) -> tuple[tuple[int, int | str], ...]:
    import re

    return tuple((0, int(p)) if p.isdecimal() else (1, p) for p in re.split(r"(\d+)", name) if p)


def _reference_order(names: list[str]) -> list[str]:
    """Model order computed the plain way (every key of every full name, no shortcut),
    as layout computed it before it learned to reuse keys across blocks."""
    from safeshard.format.blocks import GPTQ_SUFFIXES, _family_rank, _tail_rank

    def block(n: str) -> tuple[str, int] | None:
        parts = n.split(".")
        for i in range(1, len(parts) - 1):
            if parts[i].isdecimal():
                return ".".join(parts[:i]), int(parts[i])
        return None

    def member(n: str) -> tuple[int, object, str]:
        last = n.rsplit(".", 1)[-1]
        if last in GPTQ_SUFFIXES:
            return GPTQ_SUFFIXES.index(last), (), last
        return len(GPTQ_SUFFIXES), _reference_key(last), last

    blocks: dict[tuple[str, int], list[str]] = {}
    head, tail = [], []
    for n in names:
        b = block(n)
        if b is not None:
            blocks.setdefault(b, []).append(n)
        elif is_tail(n):
            tail.append(n)
        else:
            head.append(n)
    out = sorted(head, key=lambda x: (0 if "embed" in x else 1, _reference_key(x), x))
    for _block, members in sorted(
        blocks.items(), key=lambda kv: (_family_rank(kv[0][0]), _reference_key(kv[0][0]), kv[0])
    ):
        mods: dict[str, list[str]] = {}
        for n in members:
            mods.setdefault(module_of(n), []).append(n)
        for m in sorted(mods, key=lambda m: (_reference_key(m), m)):
            out += sorted(mods[m], key=member)
    out += sorted(tail, key=lambda x: (_tail_rank(x), _reference_key(x), x))
    return out


name_parts = st.sampled_from(
    ["model", "layers", "h", "mlp", "experts", "0", "1", "01", "2", "10", "007", "weight",
     "qweight", "g_idx", "scales", "a1", "b2c", "", "x-1", "٣", "²", "lm_head", "norm"]
)  # fmt: skip


@given(st.lists(st.lists(name_parts, min_size=1, max_size=6).map(".".join), unique=True))
def test_model_order_matches_the_plain_computation(names: list[str]) -> None:
    """Keys reused across blocks give exactly the order of computing each key in full,
    including leading zeros, empty components and non-ASCII digits ("²" is not one)."""
    assert model_order(names) == _reference_order(names)


def test_superscript_digits_are_text_not_numbers() -> None:
    """``str.isdigit`` is true for "²" but ``int`` cannot read it: it is no block number."""
    assert split_block("model.layers.².weight") is None
    assert natural_key("a²") == ((1, "a²"),)
    groups = group_tensors(["x.².y", "x.1.y"])
    assert [(g.key, g.kind) for g in groups] == [("x.².y", "head"), ("x.1", "block")]
