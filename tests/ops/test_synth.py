"""Tests for safeshard.synth and `safeshard synth`: valid files, real shapes, real loads."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from safeshard.checkpoint import read_header
from safeshard.cli import main
from safeshard.errors import OutputExistsError, SynthError
from safeshard.ops.synth import (
    PRESETS,
    _apply_masks,
    _float_masks,
    data_order,
    expected_size,
    preset_tensors,
    synthesize,
    weights_name,
)

TINY = ["tiny-gptq", "tiny-llama", "tiny-llama-tied", "tiny-moe"]
TINY_DENSE = ["tiny-llama", "tiny-llama-tied", "tiny-moe"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(folder: Path) -> Path:
    (w,) = sorted(folder.glob("*.safetensors"))
    return w


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny preset written once for the module (seed 0)."""
    root = tmp_path_factory.mktemp("synth")
    return {name: synthesize(root / name, name) for name in TINY}


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_folder_files_and_names(tiny: dict[str, Path], name: str) -> None:
    folder = tiny[name]
    files = {f.name for f in folder.iterdir()}
    expected = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    if PRESETS[name].gptq:
        expected |= {"gptq_model-4bit-128g.safetensors", "quantize_config.json"}
    else:
        expected |= {"model.safetensors"}
    assert files == expected
    assert _weights(folder).stat().st_size < 4_000_000


@pytest.mark.parametrize("name", TINY)
def test_weights_pass_strict_reader_and_official_loader(tiny: dict[str, Path], name: str) -> None:
    from safetensors import safe_open

    path = _weights(tiny[name])
    header = read_header(path)
    assert header.file_size == path.stat().st_size == expected_size(name)
    assert header.data_start % 8 == 0
    specs = {t.name: (t.dtype, t.shape) for t in preset_tensors(name)}
    assert {t.name: (t.dtype, t.shape) for t in header.tensors} == specs
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(specs)
        assert f.metadata() == header.metadata
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(key)
            assert tuple(t.shape) == specs[key][1]


@pytest.mark.parametrize("name", TINY)
def test_layout_is_what_the_official_writer_writes(
    tiny: dict[str, Path], name: str, tmp_path: Path
) -> None:
    """Re-saving with safetensors gives the same header and the same data bytes."""
    from safetensors.torch import load_file, save_file

    path = _weights(tiny[name])
    ours = read_header(path)
    again = tmp_path / "official.safetensors"
    save_file(load_file(path), again, metadata=ours.metadata)
    theirs = read_header(again)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    assert ours.tensors == theirs.tensors
    blob_ours, blob_theirs = path.read_bytes(), again.read_bytes()
    assert blob_ours[ours.data_start :] == blob_theirs[theirs.data_start :]
    if len(ours.metadata or {}) <= 1:  # the official writer orders metadata by hash
        assert blob_ours == blob_theirs


def test_data_order_sorts_by_alignment_then_name() -> None:
    tensors = preset_tensors("tiny-gptq")
    order = data_order(tensors)
    dtypes = [t.dtype for t in order]
    assert dtypes == sorted(dtypes, key=lambda d: {"I32": 0, "F16": 1}[d])
    for dt in ("I32", "F16"):
        names = [t.name for t in order if t.dtype == dt]
        assert names == sorted(names)


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_dtype_override(tmp_path: Path, dtype: str) -> None:
    folder = synthesize(tmp_path, "tiny-llama", dtype=dtype)
    header = read_header(folder / "model.safetensors")
    assert {t.dtype for t in header.tensors} == {dtype}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["torch_dtype"] == {"BF16": "bfloat16", "F32": "float32"}[dtype]


# --------------------------------------------------------------------------- GPTQ


def _unpack_i32(blob: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(blob) // 4}i", blob))


def test_gptq_shapes_dtypes_and_structure(tiny: dict[str, Path]) -> None:
    folder = tiny["tiny-gptq"]
    path = folder / "gptq_model-4bit-128g.safetensors"
    cfg = json.loads((folder / "config.json").read_text())
    qc = json.loads((folder / "quantize_config.json").read_text())
    assert qc == cfg["quantization_config"]
    assert qc["bits"] == 4 and qc["group_size"] == 128 and qc["sym"] is True
    assert qc["desc_act"] is False and qc["checkpoint_format"] == "gptq"
    assert qc["quant_method"] == "gptq" and qc["model_file_base_name"] is None
    assert {"true_sequential", "model_name_or_path", "damp_percent", "static_groups"} <= set(qc)
    bits, g = qc["bits"], qc["group_size"]
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    linears = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    header = read_header(path)
    blob = path.read_bytes()

    def data(name: str) -> bytes:
        t = header[name]
        return blob[header.data_start + t.begin : header.data_start + t.end]

    for layer in range(cfg["num_hidden_layers"]):
        for mod, (n_in, n_out) in linears.items():
            pre = f"model.layers.{layer}.{mod}"
            assert header[f"{pre}.qweight"].dtype == "I32"
            assert header[f"{pre}.qweight"].shape == (n_in * bits // 32, n_out)
            assert header[f"{pre}.qzeros"].dtype == "I32"
            assert header[f"{pre}.qzeros"].shape == (n_in // g, n_out * bits // 32)
            assert header[f"{pre}.scales"].dtype == "F16"
            assert header[f"{pre}.scales"].shape == (n_in // g, n_out)
            assert header[f"{pre}.g_idx"].dtype == "I32"
            assert header[f"{pre}.g_idx"].shape == (n_in,)
            assert _unpack_i32(data(f"{pre}.g_idx")) == [i // g for i in range(n_in)]
            # symmetric: zero point 8 stored as 7 in every nibble
            zeros = _unpack_i32(data(f"{pre}.qzeros"))
            assert all(((z >> (4 * k)) & 0xF) == 7 for z in zeros for k in range(8))
            scales = struct.unpack(f"<{header[f'{pre}.scales'].numel}e", data(f"{pre}.scales"))
            assert all(2**-9 <= s < 2**-7 for s in scales)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert header[name].dtype == "F16"
    assert header.metadata == {
        "format": "pt",
        "auto_gptq_version": header.metadata["auto_gptq_version"] if header.metadata else "",
        "gptq_bits": "4",
        "gptq_group_size": "128",
        "gptq_desc_act": "False",
        "gptq_damp_percent": "0.01",
        "gptq_checkpoint_format": "gptq",
        "gptq_quant_method": "gptq",
    }


@pytest.mark.parametrize(
    ("name", "lo", "hi"), [("llama-2-7b-gptq", 3.85e9, 3.95e9), ("llama-2-13b-gptq", 7.2e9, 7.3e9)]
)
def test_llama2_presets_have_real_shapes(name: str, lo: float, hi: float) -> None:
    p = PRESETS[name]
    tensors = {t.name: t for t in preset_tensors(name)}
    h, inter = p.hidden, p.intermediate
    assert (h, inter, p.layers, p.vocab) in {(4096, 11008, 32, 32000), (5120, 13824, 40, 32000)}
    assert tensors["model.embed_tokens.weight"].shape == (32000, h)
    assert tensors["lm_head.weight"].shape == (32000, h)
    last = f"model.layers.{p.layers - 1}"
    assert tensors[f"{last}.mlp.down_proj.qweight"].shape == (inter // 8, h)
    assert tensors[f"{last}.mlp.up_proj.scales"].shape == (h // 128, inter)
    assert f"model.layers.{p.layers}.mlp.up_proj.qweight" not in tensors
    assert lo < expected_size(name) < hi
    assert weights_name(p) == "gptq_model-4bit-128g.safetensors"


def test_layers_override_changes_block_count() -> None:
    tensors = preset_tensors("llama-2-13b-gptq", layers=2)
    blocks = {t.name.split(".")[2] for t in tensors if t.name.startswith("model.layers.")}
    assert blocks == {"0", "1"}


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", TINY)
def test_same_seed_same_bytes_other_seed_other_bytes(
    tiny: dict[str, Path], tmp_path: Path, name: str
) -> None:
    again = synthesize(tmp_path / "again", name, seed=0)
    other = synthesize(tmp_path / "other", name, seed=1)
    for f in sorted(tiny[name].iterdir()):
        assert _sha(again / f.name) == _sha(f), f.name
    w = _weights(tiny[name]).name
    assert _sha(other / w) != _sha(tiny[name] / w)
    assert read_header(other / w).raw == read_header(tiny[name] / w).raw


@settings(max_examples=200, deadline=None)
@given(
    raw=st.binary(min_size=64, max_size=64),
    dtype=st.sampled_from(["F16", "BF16", "F32"]),
    role=st.sampled_from(["weight", "norm", "scales"]),
)
def test_float_fill_ranges(raw: bytes, dtype: str, role: str) -> None:
    and_mask, or_bits = _float_masks(dtype, role)  # type: ignore[arg-type]
    width = 4 if dtype == "F32" else 2
    blob = _apply_masks(raw, width, and_mask, or_bits)
    if dtype == "F16":
        values = struct.unpack("<32e", blob)
    elif dtype == "F32":
        values = struct.unpack("<16f", blob)
    else:  # bf16 is the top half of an f32
        values = tuple(
            struct.unpack("<f", b"\0\0" + blob[i : i + 2])[0] for i in range(0, len(blob), 2)
        )
    lo, hi = {"weight": (2**-7, 2**-5), "norm": (0.5, 2.0), "scales": (2**-9, 2**-7)}[role]
    for v in values:
        assert lo <= abs(v) < hi
        if role != "weight":
            assert v > 0


# --------------------------------------------------------------------------- errors & CLI


def test_refuses_unknown_preset_bad_layers_and_gptq_dtype(tmp_path: Path) -> None:
    with pytest.raises(SynthError, match="unknown preset 'nope'"):
        synthesize(tmp_path, "nope")
    with pytest.raises(SynthError, match="at least 1"):
        synthesize(tmp_path, "tiny-llama", layers=0)
    with pytest.raises(SynthError, match="GPTQ"):
        synthesize(tmp_path, "tiny-gptq", dtype="F32")
    with pytest.raises(SynthError, match="F8"):
        synthesize(tmp_path, "tiny-llama", dtype="F8")
    assert not list(tmp_path.glob("*.safetensors"))


def test_refuses_existing_weights_unless_forced(tmp_path: Path) -> None:
    synthesize(tmp_path, "tiny-llama")
    with pytest.raises(OutputExistsError, match=r"model\.safetensors"):
        synthesize(tmp_path, "tiny-llama", seed=3)
    before = _sha(tmp_path / "model.safetensors")
    synthesize(tmp_path, "tiny-llama", seed=3, force=True)
    assert _sha(tmp_path / "model.safetensors") != before
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".safeshard-tmp")]


def test_cli_synth_json(tmp_path: Path) -> None:
    out = tmp_path / "m"
    res = CliRunner().invoke(
        main, ["synth", str(out), "--preset", "tiny-gptq", "--layers", "2", "--seed", "5", "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["layers"] == 2 and doc["seed"] == 5 and doc["preset"] == "tiny-gptq"
    weights = out / "gptq_model-4bit-128g.safetensors"
    assert doc["weights"] == str(weights)
    assert doc["file_size"] == weights.stat().st_size == expected_size("tiny-gptq", 2)
    assert "quantize_config.json" in doc["files"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2


def test_cli_synth_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["synth", str(tmp_path), "--preset", "nope"])
    assert res.exit_code == 2
    res = runner.invoke(main, ["synth", str(tmp_path), "--preset", "tiny-llama", "--layers", "0"])
    assert res.exit_code == 2
    assert runner.invoke(main, ["synth", str(tmp_path), "-p", "tiny-llama", "-q"]).exit_code == 0
    res = runner.invoke(main, ["synth", str(tmp_path), "-p", "tiny-llama"])
    assert res.exit_code == 3 and "--force" in res.output
    res = runner.invoke(main, ["synth", str(tmp_path), "-p", "tiny-gptq", "--dtype", "F32"])
    assert res.exit_code == 3 and "GPTQ" in res.output


def test_cli_help_lists_presets() -> None:
    res = CliRunner().invoke(main, ["synth", "--help"])
    assert res.exit_code == 0
    for name in PRESETS:
        assert name in res.output


# --------------------------------------------------------------------------- real clients


def test_tokenizer_loads_offline(tiny: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    folder = tiny["tiny-llama"]
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("Hello, world! ü")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert tok.eos_token_id == 2
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, world! ü"
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert max(ids) < len(tok) <= vocab


@pytest.mark.parametrize("name", TINY_DENSE)
def test_tiny_dense_presets_load_in_transformers(tiny: dict[str, Path], name: str) -> None:
    import torch

    from helpers.clients import INPUT_IDS, hf_load, hf_logits

    logits = hf_logits(tiny[name], native=True)  # transformers finds model.safetensors itself
    assert logits.shape == (1, len(INPUT_IDS[0]), PRESETS[name].vocab)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0
    assert torch.equal(logits, hf_logits(tiny[name]))
    if PRESETS[name].tied:
        model = hf_load(tiny[name])
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_hf_logits_rejects_a_missing_tensor(tiny: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from helpers.clients import ClientLoadError, hf_logits

    src = tiny["tiny-llama"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ClientLoadError, match="up_proj"):
        hf_logits(tmp_path)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-tied"])
def test_hub_load_strict(tiny: dict[str, Path], name: str) -> None:
    import torch

    from helpers.clients import hf_load, hub_load_strict

    hub = hub_load_strict(tiny[name])
    ref = hf_load(tiny[name])
    hub_state, ref_state = hub.state_dict(), ref.state_dict()
    assert hub_state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(hub_state[key], value), key


def test_hub_load_strict_refuses_fused_moe(tiny: dict[str, Path]) -> None:
    from helpers.clients import ClientLoadError, hub_load_strict

    with pytest.raises(ClientLoadError, match="Missing key"):
        hub_load_strict(tiny["tiny-moe"])


def _dequantize_to_dense(src: Path, dst: Path) -> None:
    """A plain fp32 Llama folder with W[i,j] = s[g_idx[i], j] * (q[i,j] - (z[g_idx[i], j] + 1))."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "gptq_model-4bit-128g.safetensors")
    dense: dict[str, torch.Tensor] = {}
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    for name, t in tensors.items():
        if name.endswith((".qzeros", ".scales", ".g_idx")):
            continue
        if not name.endswith(".qweight"):
            dense[name] = t.float()
            continue
        pre = name[: -len(".qweight")]
        q = (t.unsqueeze(1) >> shifts.view(1, -1, 1)) & 0xF  # [in/8, 8, out]
        q = q.reshape(-1, t.shape[1])  # [in, out]
        zq = tensors[pre + ".qzeros"]
        z = ((zq.unsqueeze(2) >> shifts.view(1, 1, -1)) & 0xF).reshape(zq.shape[0], -1)
        g = tensors[pre + ".g_idx"].long()
        s = tensors[pre + ".scales"].float()
        w = s[g] * (q.float() - (z[g].float() + 1))  # [in, out]
        dense[pre + ".weight"] = w.t().contiguous()
    save_file(dense, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    del cfg["quantization_config"]
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.slow
@pytest.mark.gptq
def test_tiny_gptq_loads_in_gptqmodel_and_matches_dequantized(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """GPTQModel's logits equal (to fp16 precision) a dense model built from our packing."""
    import torch

    from helpers.clients import gptq_logits, hf_logits

    logits = gptq_logits(tiny["tiny-gptq"])
    assert torch.isfinite(logits).all()
    _dequantize_to_dense(tiny["tiny-gptq"], tmp_path)
    ref = hf_logits(tmp_path)
    assert logits.shape == ref.shape
    err = (logits - ref).abs().max().item()
    assert err < 0.01 * ref.abs().max().item(), err  # measured ~1e-3 of 1.1
    assert torch.corrcoef(torch.stack([logits.flatten(), ref.flatten()]))[0, 1] > 0.9999


@pytest.mark.slow
@pytest.mark.gptq
def test_gptq_logits_reports_missing_scales(tiny: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from helpers.clients import ClientLoadError, gptq_logits

    src = tiny["tiny-gptq"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    w = "gptq_model-4bit-128g.safetensors"
    tensors = load_file(src / w)
    del tensors["model.layers.0.mlp.up_proj.scales"]
    save_file(tensors, tmp_path / w, metadata=read_header(src / w).metadata)
    with pytest.raises(ClientLoadError, match=r"up_proj\.scales"):
        gptq_logits(tmp_path)


# --------------------------------------------------------------------------- streaming


_RSS_CHILD = textwrap.dedent(
    """
    # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss across fork and exec.
    import json, re, sys, time
    from safeshard.ops.synth import synthesize

    def hwm_kib():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))

    base = hwm_kib()
    t = time.perf_counter()
    synthesize(sys.argv[1], "llama-2-13b-gptq", layers=2, seed=0)
    seconds = time.perf_counter() - t
    print(json.dumps({"base_kib": base, "peak_kib": hwm_kib(), "seconds": seconds}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_13b_shaped_two_layers_streams_with_bounded_memory(tmp_path: Path) -> None:
    from safetensors import safe_open

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(proc.stdout)
    path = tmp_path / "gptq_model-4bit-128g.safetensors"
    try:
        size = path.stat().st_size
        assert size == expected_size("llama-2-13b-gptq", layers=2) > 900_000_000
        assert doc["peak_kib"] * 1024 < 100_000_000, doc
        header = read_header(path)
        assert len({t.name.split(".")[2] for t in header.tensors if ".layers." in t.name}) == 2
        with safe_open(path, framework="pt") as f:
            assert set(f.keys()) == {t.name for t in header.tensors}
            g_idx = f.get_tensor("model.layers.1.mlp.down_proj.g_idx")
            assert g_idx.tolist() == [i // 128 for i in range(13824)]
            assert f.get_slice("lm_head.weight").get_shape() == [32000, 5120]
    finally:
        path.unlink(missing_ok=True)


def _hand_split(src: Path, dst: Path, base: str) -> None:
    """Two shards + index under ``base``, written with the official writer (not safeshard)."""
    from safetensors.torch import load_file, save_file

    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(_weights(src))
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        shard = f"{base}-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (dst / f"{base}.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("base", ["model", "gptq_model-4bit-128g"])
def test_clients_load_sharded_folders_under_any_base(
    tiny: dict[str, Path], tmp_path: Path, base: str
) -> None:
    import torch

    from helpers.clients import ClientLoadError, hf_logits, hub_load_strict

    src = tiny["tiny-llama"]
    _hand_split(src, tmp_path, base)
    assert torch.equal(hf_logits(tmp_path), hf_logits(src))
    if base == "model":
        assert torch.equal(hf_logits(tmp_path, native=True), hf_logits(src))
        hub_load_strict(tmp_path)
    else:
        with pytest.raises(ClientLoadError, match=r"finds no model\.safetensors"):
            hf_logits(tmp_path, native=True)
