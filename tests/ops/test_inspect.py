"""``safeshard inspect``: the library report and the command line."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from safeshard.cli import main
from safeshard.errors import OversizeTensorError
from safeshard.format.blocks import model_order
from safeshard.format.header import TensorSpec, build_header, header_size, tensor_nbytes
from safeshard.format.index import index_json, shard_name
from safeshard.ops.inspect import DEFAULT_CAP, inspect
from safeshard.ops.plan import plan_shards, solo_size
from safeshard.sizes import FAT32_LIMIT

# --------------------------------------------------------------------------- builders


def spec(name: str, dtype: str, shape: Sequence[int]) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape), tensor_nbytes(dtype, shape))


def write_st(
    path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None
) -> Path:
    """A valid safetensors file whose data is a hole (sparse zeros): headers are all we read."""
    header = build_header(specs, metadata)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(s.nbytes for s in specs))
    return path


def linear(prefix: str, n_in: int, n_out: int, gptq: tuple[int, int] | None) -> list[TensorSpec]:
    if gptq is None:
        return [spec(f"{prefix}.weight", "F16", (n_out, n_in))]
    bits, group = gptq
    groups = math.ceil(n_in / group)
    return [
        spec(f"{prefix}.qweight", "I32", (n_in * bits // 32, n_out)),
        spec(f"{prefix}.qzeros", "I32", (groups, n_out * bits // 32)),
        spec(f"{prefix}.scales", "F16", (groups, n_out)),
        spec(f"{prefix}.g_idx", "I32", (n_in,)),
    ]


def llama(
    layers: int,
    hidden: int = 64,
    inter: int = 128,
    vocab: int = 96,
    gptq: tuple[int, int] | None = None,
    family: str = "model.layers",
) -> list[TensorSpec]:
    out = [spec("model.embed_tokens.weight", "F16", (vocab, hidden))]
    for i in range(layers):
        p = f"{family}.{i}"
        out.append(spec(f"{p}.input_layernorm.weight", "F16", (hidden,)))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out += linear(f"{p}.self_attn.{proj}", hidden, hidden, gptq)
        out.append(spec(f"{p}.post_attention_layernorm.weight", "F16", (hidden,)))
        out += linear(f"{p}.mlp.gate_proj", hidden, inter, gptq)
        out += linear(f"{p}.mlp.up_proj", hidden, inter, gptq)
        out += linear(f"{p}.mlp.down_proj", inter, hidden, gptq)
    out.append(spec("model.norm.weight", "F16", (hidden,)))
    out.append(spec("lm_head.weight", "F16", (vocab, hidden)))
    return out


QC = {"bits": 4, "group_size": 32, "desc_act": False, "sym": True, "quant_method": "gptq"}


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


# --------------------------------------------------------------------------- sizes, structure


def test_single_file_counts_sizes_and_dtypes(tmp_path: Path) -> None:
    specs = llama(3)
    specs.append(spec("model.layers.1.extra.weight", "F32", (64, 64)))
    f = write_st(tmp_path / "model.safetensors", specs, {"format": "pt"})
    r = inspect(f)
    assert r.file_size == os.path.getsize(f)
    assert [(x.name, x.size, x.tensors) for x in r.files] == [
        ("model.safetensors", os.path.getsize(f), len(specs))
    ]
    assert r.tensor_count == len(specs)
    assert r.total_tensor_bytes == sum(s.nbytes for s in specs)
    want: dict[str, int] = {}
    for s in specs:
        want[s.dtype] = want.get(s.dtype, 0) + s.nbytes
    assert r.dtypes == want
    assert r.metadata == {"format": "pt"}
    assert r.index is None
    assert r.quant is None


def test_blocks_bytes_largest_and_outside(tmp_path: Path) -> None:
    specs = llama(3)
    specs.append(spec("model.layers.1.extra.weight", "F32", (64, 96)))  # the unique largest
    r = inspect(write_st(tmp_path / "model.safetensors", specs))
    per_block = {
        i: sum(s.nbytes for s in specs if s.name.startswith(f"model.layers.{i}.")) for i in range(3)
    }
    assert r.blocks == 3
    (fam,) = r.block_families
    assert (fam.name, fam.count, fam.first, fam.last) == ("model.layers", 3, 0, 2)
    assert fam.min_bytes == min(per_block.values())
    assert fam.max_bytes == max(per_block.values())
    assert fam.typical_bytes == sorted(per_block.values())[1]
    assert r.largest_block is not None
    assert (r.largest_block.name, r.largest_block.nbytes) == ("model.layers.1", per_block[1])
    biggest = max(specs, key=lambda s: s.nbytes)
    assert r.largest_tensor is not None
    assert (r.largest_tensor.name, r.largest_tensor.nbytes) == (biggest.name, biggest.nbytes)
    outside = {s.name: s.nbytes for s in specs if not s.name.startswith("model.layers.")}
    assert {t.name: t.nbytes for t in r.outside_blocks} == outside


def test_several_block_families(tmp_path: Path) -> None:
    specs = [spec("transformer.wte.weight", "F16", (32, 16))]
    for i in range(12):
        specs.append(spec(f"transformer.h.{i}.mlp.c_fc.weight", "F16", (16, 16)))
    for i in range(2):
        specs.append(spec(f"model.encoder.layers.{i}.fc.weight", "F32", (16, 16)))
    specs.append(spec("transformer.ln_f.weight", "F16", (16,)))
    r = inspect(write_st(tmp_path / "m.safetensors", specs))
    assert r.blocks == 14
    assert {(f.name, f.count, f.first, f.last) for f in r.block_families} == {
        ("transformer.h", 12, 0, 11),
        ("model.encoder.layers", 2, 0, 1),
    }
    assert {t.name for t in r.outside_blocks} == {
        "transformer.wte.weight",
        "transformer.ln_f.weight",
    }


def test_no_blocks(tmp_path: Path) -> None:
    specs = [spec("a", "F32", (4,)), spec("b", "U8", (3,))]
    r = inspect(write_st(tmp_path / "m.safetensors", specs))
    assert r.blocks == 0 and r.block_families == () and r.largest_block is None
    assert [t.name for t in r.outside_blocks] == ["a", "b"]


def test_sharded_folder_and_index_give_the_same_report(tmp_path: Path) -> None:
    specs = llama(4)
    half = len(specs) // 2
    parts = [specs[:half], specs[half:]]
    weight_map: dict[str, str] = {}
    for i, part in enumerate(parts, 1):
        name = shard_name("model", i, 2)
        write_st(tmp_path / name, part, {"format": "pt"})
        weight_map.update({s.name: name for s in part})
    total = sum(s.nbytes for s in specs)
    (tmp_path / "model.safetensors.index.json").write_bytes(
        index_json(weight_map, {"total_size": total})
    )
    by_folder = inspect(tmp_path)
    by_index = inspect(tmp_path / "model.safetensors.index.json")
    assert by_folder.index == "model.safetensors.index.json"
    assert [f.name for f in by_folder.files] == [shard_name("model", i, 2) for i in (1, 2)]
    assert by_folder.file_size == sum(os.path.getsize(tmp_path / f.name) for f in by_folder.files)
    assert by_folder.total_tensor_bytes == total
    assert by_folder.blocks == 4
    a, b = by_folder.to_json(), by_index.to_json()
    a.pop("path"), b.pop("path")
    assert a == b


# --------------------------------------------------------------------------- GPTQ


def gptq_folder(tmp_path: Path, layers: int = 2, bits: int = 4, group: int = 32) -> Path:
    specs = llama(layers, gptq=(bits, group))
    write_st(tmp_path / f"gptq_model-{bits}bit-{group}g.safetensors", specs, {"format": "pt"})
    return tmp_path


def test_gptq_from_quantize_config(tmp_path: Path) -> None:
    folder = gptq_folder(tmp_path)
    write_json(folder / "quantize_config.json", QC)
    r = inspect(folder)
    assert r.quant is not None
    j = r.to_json()
    assert j["quantization"] == {
        "method": "gptq",
        "bits": 4,
        "group_size": 32,
        "desc_act": False,
        "sym": True,
    }
    assert j["quant_source"] == "quantize_config.json"
    assert j["quant_modules"] == 2 * 7
    assert j["quant_check"] == []


def test_gptq_from_config_json(tmp_path: Path) -> None:
    folder = gptq_folder(tmp_path)
    write_json(folder / "config.json", {"model_type": "llama", "quantization_config": QC})
    j = inspect(folder).to_json()
    assert j["quantization"]["bits"] == 4
    assert j["quantization"]["group_size"] == 32
    assert j["quant_source"] == "config.json"
    assert j["quant_check"] == []


def test_gptq_inferred_without_config(tmp_path: Path) -> None:
    folder = gptq_folder(tmp_path, bits=8, group=16)
    j = inspect(folder).to_json()
    assert j["quant_source"] == "inferred"
    assert j["quantization"] == {
        "method": "gptq",
        "bits": 8,
        "group_size": 16,
        "desc_act": None,
        "sym": None,
    }
    assert j["quant_check"] == []


def test_inconsistent_config_is_reported_not_raised(tmp_path: Path) -> None:
    folder = gptq_folder(tmp_path)
    write_json(folder / "quantize_config.json", {**QC, "bits": 8})
    r = inspect(folder)
    j = r.to_json()
    assert j["quantization"]["bits"] == 8
    assert j["quant_inferred"]["bits"] == 4
    config = [p for p in j["quant_check"] if p["kind"] == "config"]
    assert [(p["expected"], p["found"]) for p in config] == [(8, 4)]
    assert {p["tensor"].rsplit(".", 1)[1] for p in j["quant_check"] if p["kind"] == "shape"} == {
        "qweight",
        "qzeros",
    }
    assert any("GPTQ check" in w for w in r.warnings)


def test_gptq_module_missing_scales(tmp_path: Path) -> None:
    specs = [s for s in llama(2, gptq=(4, 32)) if s.name != "model.layers.1.mlp.up_proj.scales"]
    write_st(tmp_path / "model.safetensors", specs)
    write_json(tmp_path / "quantize_config.json", QC)
    j = inspect(tmp_path).to_json()
    assert [(p["kind"], p["module"], p["tensor"]) for p in j["quant_check"]] == [
        ("missing", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.up_proj.scales")
    ]


# --------------------------------------------------------------------------- the cap


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3, 0.17])
def test_predicted_shards_agree_with_the_planner(tmp_path: Path, fraction: float) -> None:
    specs = llama(6, gptq=(4, 32))
    meta = {"format": "pt", "gptq_bits": "4"}
    f = write_st(tmp_path / "model.safetensors", specs, meta)
    cap = max(int(os.path.getsize(f) * fraction), max(solo_size(s, meta) for s in specs))
    r = inspect(f, cap)
    plan = plan_shards(specs, cap, meta)
    assert r.predicted_shards == len(plan.shards)
    assert r.predicted_shard_sizes == tuple(s.file_size for s in plan.shards)
    assert r.cap == cap
    assert r.oversize_tensors == ()


def _mixed_metadata_checkpoint(folder: Path) -> tuple[Path, list[TensorSpec]]:
    """Two shards whose __metadata__ differ: the first carries a long note."""
    folder.mkdir()
    specs = llama(6)
    half = len(specs) // 2
    metas = [{"format": "pt", "note": "n" * 3000}, {"format": "pt"}]
    weight_map: dict[str, str] = {}
    for i, (part, meta) in enumerate(zip([specs[:half], specs[half:]], metas, strict=True), 1):
        name = shard_name("model", i, 2)
        write_st(folder / name, part, meta)
        weight_map.update({s.name: name for s in part})
    index = folder / "model.safetensors.index.json"
    index.write_bytes(index_json(weight_map, {"total_size": sum(s.nbytes for s in specs)}))
    return index, specs


@pytest.mark.parametrize("divisor", [2, 3, 5])
def test_prediction_with_mixed_metadata_is_what_split_makes(tmp_path: Path, divisor: int) -> None:
    """inspect plans with the metadata split writes (what the shards share), not the
    first shard's: same shard count and sizes as split's dry run."""
    from safeshard.ops.split import split

    index, specs = _mixed_metadata_checkpoint(tmp_path / "mixed")
    cap = sum(s.nbytes for s in specs) // divisor
    r = inspect(index, cap)
    dry = split(index, tmp_path / "out", max_shard_size=cap, dry_run=True)
    assert r.predicted_shards == len(dry.files)
    assert r.predicted_shard_sizes == tuple(f.size for f in dry.files)
    assert r.metadata == {"format": "pt"} == dry.plan.metadata
    assert any("different __metadata__" in w for w in r.warnings)
    # and the first shard's metadata would have predicted something else
    first = plan_shards(specs, cap, {"format": "pt", "note": "n" * 3000})
    assert tuple(s.file_size for s in first.shards) != r.predicted_shard_sizes


def test_prediction_for_a_checkpoint_without_tensors(tmp_path: Path) -> None:
    """split writes one header-only file; inspect predicts exactly that file."""
    from safeshard.ops.split import split

    f = write_st(tmp_path / "model.safetensors", [], {"format": "pt"})
    r = inspect(f, 1000)
    dry = split(f, tmp_path / "out", max_shard_size=1000, dry_run=True)
    assert r.predicted_shards == len(dry.files) == 1
    assert r.predicted_shard_sizes == tuple(x.size for x in dry.files)


def test_oversize_tensor_reports_the_smallest_working_cap(tmp_path: Path) -> None:
    specs = llama(2)
    f = write_st(tmp_path / "model.safetensors", specs)
    biggest = max(specs, key=lambda s: s.nbytes)
    cap = solo_size(biggest, None) - 1
    r = inspect(f, cap)
    assert r.predicted_shards is None
    assert r.predicted_shard_sizes == ()
    assert biggest.name in {t.name for t in r.oversize_tensors}
    assert all(t.file_size > cap for t in r.oversize_tensors)
    assert r.smallest_cap == max(solo_size(s, None) for s in specs)
    assert len(plan_shards(specs, r.smallest_cap).shards) >= 1
    with pytest.raises(OversizeTensorError):
        plan_shards(specs, r.smallest_cap - 1)
    assert any("at least" in w and str(r.smallest_cap) in w for w in r.warnings)


def test_oversize_blocks(tmp_path: Path) -> None:
    specs = llama(3, hidden=64, inter=256)
    f = write_st(tmp_path / "model.safetensors", specs)
    by_name = {s.name: s for s in specs}
    block0 = [
        by_name[n] for n in model_order([n for n in by_name if n.startswith("model.layers.0.")])
    ]
    alone = header_size(block0) + sum(s.nbytes for s in block0)
    r = inspect(f, alone - 1)
    assert [b.name for b in r.oversize_blocks] == [f"model.layers.{i}" for i in range(3)]
    assert r.oversize_blocks[0].file_size == alone
    assert r.predicted_shards == len(plan_shards(specs, alone - 1).shards)
    assert inspect(f, alone).oversize_blocks == ()


def test_default_cap_is_4gb(tmp_path: Path) -> None:
    r = inspect(write_st(tmp_path / "model.safetensors", llama(1)))
    assert r.cap == DEFAULT_CAP == 4_000_000_000
    assert r.predicted_shards == 1
    assert r.exceeds == ()


def test_file_over_the_cap_is_listed_in_exceeds(tmp_path: Path) -> None:
    f = write_st(tmp_path / "model.safetensors", llama(2))
    assert inspect(f, os.path.getsize(f)).exceeds == ()
    assert inspect(f, os.path.getsize(f) - 1).exceeds == ("cap",)


@pytest.fixture
def big_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder for sparse multi-GB files, emptied afterwards."""
    folder = tmp_path / "big"
    folder.mkdir()
    yield folder
    for f in folder.iterdir():
        f.unlink()


def _file_of_size(path: Path, size: int) -> Path:
    """A one-tensor file of exactly ``size`` bytes (header included)."""
    n = size
    for _ in range(5):
        n = size - header_size([spec("w", "U8", (n,))])
    s = spec("w", "U8", (n,))
    assert header_size([s]) + n == size
    return write_st(path, [s])


def test_fat32_warning_on_a_sparse_file_over_4gib(big_dir: Path) -> None:
    at_limit = _file_of_size(big_dir / "at.safetensors", FAT32_LIMIT)
    r = inspect(at_limit)
    assert "fat32" not in r.exceeds
    assert r.exceeds == ("cap",)  # 4 GiB - 1 is over the default 4 GB (decimal) cap
    over = _file_of_size(big_dir / "over.safetensors", FAT32_LIMIT + 1)
    r = inspect(over)
    assert r.exceeds == ("fat32", "cap")
    assert any("FAT32" in w and "over.safetensors" in w for w in r.warnings)
    assert inspect(over, FAT32_LIMIT + 1).exceeds == ("fat32",)


def test_llama_2_13b_gptq_shapes_in_under_a_second(big_dir: Path) -> None:
    """Issue 2's "done when", on a sparse file with Llama-2-13B GPTQ shapes."""
    specs = llama(40, hidden=5120, inter=13824, vocab=32000, gptq=(4, 128))
    f = write_st(big_dir / "gptq_model-4bit-128g.safetensors", specs, {"format": "pt"})
    write_json(big_dir / "quantize_config.json", {**QC, "group_size": 128})
    start = time.perf_counter()
    j = inspect(big_dir).to_json()
    elapsed = time.perf_counter() - start
    assert j["blocks"] == 40
    assert j["quantization"]["bits"] == 4 and j["quantization"]["group_size"] == 128
    assert j["quant_check"] == []
    assert "fat32" in j["exceeds"]
    assert j["file_size"] == os.path.getsize(f)
    assert j["predicted_shards"] == len(plan_shards(specs, DEFAULT_CAP, {"format": "pt"}).shards)
    assert elapsed < 1.0, elapsed


# --------------------------------------------------------------------------- command line


JSON_KEYS = {
    "kind",
    "path",
    "index",
    "files",
    "file_size",
    "tensor_count",
    "total_tensor_bytes",
    "dtypes",
    "blocks",
    "block_families",
    "largest_block",
    "largest_tensor",
    "outside_blocks",
    "quantization",
    "quant_source",
    "quant_modules",
    "quant_inferred",
    "quant_check",
    "metadata",
    "cap",
    "predicted_shards",
    "predicted_shard_sizes",
    "smallest_cap",
    "oversize_tensors",
    "oversize_blocks",
    "exceeds",
    "warnings",
    "stream_min_budget",
    "stream_largest_unit",
    "stream_no_read_budget",
}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={"HF_HUB_OFFLINE": "1"})
    return result.exit_code, result.stdout, result.stderr


def test_cli_json_keys_and_values(tmp_path: Path) -> None:
    folder = gptq_folder(tmp_path)
    write_json(folder / "quantize_config.json", QC)
    code, out, _ = run("inspect", str(folder), "--json", "--max-shard-size", "20KiB")
    assert code == 0
    j = json.loads(out)
    assert set(j) == JSON_KEYS
    assert j == json.loads(json.dumps(inspect(folder, 20 * 1024).to_json()))
    assert j["cap"] == 20 * 1024
    assert [set(f) for f in j["files"]] == [{"name", "size", "tensors", "header_size"}]


def test_docs_list_every_json_key() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "inspect-json.md").read_text(encoding="utf-8")
    missing = [k for k in JSON_KEYS if f"`{k}`" not in doc]
    assert missing == []


def test_cli_human_output(tmp_path: Path) -> None:
    folder = gptq_folder(tmp_path, layers=3)
    write_json(folder / "quantize_config.json", QC)
    code, out, _ = run("inspect", str(folder))
    assert code == 0
    assert "gptq_model-4bit-32g.safetensors" in out
    assert "model.layers" in out
    assert "GPTQ" in out and "bits=4" in out and "group_size=32" in out
    assert "1 shard" in out


def test_cli_missing_path_exits_3_with_one_line(tmp_path: Path) -> None:
    code, out, err = run("inspect", str(tmp_path / "nope.safetensors"))
    assert code == 3
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "nope.safetensors" in err


def test_cli_bad_header_exits_3(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((1000).to_bytes(8, "little") + b"{}")
    code, _, err = run("inspect", str(bad))
    assert code == 3
    assert "bad.safetensors" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("size", ["4Gb", "12parsecs", "-5", "0"])
def test_cli_bad_size_is_a_usage_error(tmp_path: Path, size: str) -> None:
    f = write_st(tmp_path / "model.safetensors", llama(1))
    code, _, err = run("inspect", str(f), "--max-shard-size", size)
    assert code == 2
    assert "max-shard-size" in err


def test_cli_fat32_cap_name(tmp_path: Path) -> None:
    f = write_st(tmp_path / "model.safetensors", llama(1))
    code, out, _ = run("inspect", str(f), "--json", "--max-shard-size", "fat32")
    assert code == 0
    assert json.loads(out)["cap"] == FAT32_LIMIT


# --------------------------------------------------------------------------- synthesized presets


@pytest.fixture
def synth() -> Any:
    return pytest.importorskip("safeshard.ops.synth")


@pytest.mark.parametrize("preset", ["tiny-gptq", "tiny-llama"])
def test_inspect_json_on_tiny_presets(tmp_path: Path, preset: str, synth: Any) -> None:
    folder = synth.synthesize(tmp_path / preset, preset)
    code, out, _ = run("inspect", str(folder), "--json")
    assert code == 0
    j = json.loads(out)
    tensors = synth.preset_tensors(preset)
    p = synth.PRESETS[preset]
    assert j["blocks"] == p.layers
    assert j["tensor_count"] == len(tensors)
    assert j["total_tensor_bytes"] == sum(t.nbytes for t in tensors)
    assert j["file_size"] == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert j["predicted_shards"] == 1
    assert j["exceeds"] == []
    if p.gptq:
        assert j["quantization"] == {
            "method": "gptq",
            "bits": p.bits,
            "group_size": p.group_size,
            "desc_act": False,
            "sym": True,
        }
        assert j["quant_source"] == "quantize_config.json"
        assert j["quant_check"] == []
        assert j["quant_modules"] == 7 * p.layers
    else:
        assert j["quantization"] is None
        assert j["quant_check"] == []


@pytest.mark.slow
def test_synthesized_13b_layout_with_40_layers(tmp_path: Path, synth: Any) -> None:
    """The full-size check is manual (7.3 GB); this runs the same path on 40 tiny layers."""
    folder = synth.synthesize(tmp_path / "m", "tiny-gptq", layers=40)
    start = time.perf_counter()
    j = inspect(folder).to_json()
    assert time.perf_counter() - start < 1.0
    assert j["blocks"] == 40
    assert j["quantization"]["bits"] == 4
    assert j["quant_check"] == []
