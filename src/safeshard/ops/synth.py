"""Synthetic checkpoints with real names, shapes, dtypes, configs and file layout.

:func:`synthesize` writes a model folder the way the ecosystem writes one:

- the weights, named as AutoGPTQ names them (``gptq_model-4bit-128g.safetensors``) for the
  GPTQ presets and ``model.safetensors`` otherwise, with AutoGPTQ's ``__metadata__``
  (``format=pt``, ``auto_gptq_version``, ``gptq_*``) or ``{"format": "pt"}``;
- tensors in the official writer's data order (dtype alignment descending, then name),
  with the header bytes the official writer would write for the same tensors;
- ``config.json`` (with ``quantization_config`` for GPTQ presets), ``quantize_config.json``,
  ``generation_config.json``, and a tiny byte-level BPE tokenizer (``tokenizer.json``,
  ``tokenizer_config.json``) that ``AutoTokenizer`` loads offline.

Tensor bytes are streamed in chunks of at most :data:`CHUNK` bytes from a counter-mode
SHAKE-128 stream keyed by ``(seed, tensor name, chunk number)``: the output is the same
for the same seed on every machine, and memory stays bounded for any model size. Neither
torch nor numpy is needed.

Two kinds of fill:

- ``values`` (tiny presets): floats are random but sensible (weights of magnitude
  2**-7..2**-5 with a random sign, norm weights in 0.5..2, GPTQ scales 2**-9..2**-7), so a
  forward pass gives finite logits;
- ``bytes`` (the Llama-2-sized presets): raw random bytes, written at disk speed.

In both, the GPTQ structure is exact and valid v1 packing: ``qweight`` is any int4 nibbles
packed 8 per int32 along the input dim, ``qzeros`` hold zero − 1 = 7 (symmetric, zero 8)
packed along the output dim, ``g_idx`` = arange(in) // group_size.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from safeshard.errors import OutputExistsError, SynthError
from safeshard.format.header import DTYPE_BITS, TensorSpec, build_header, tensor_nbytes
from safeshard.io.localfs import AtomicWriter, write_atomic

__all__ = [
    "AUTO_GPTQ_VERSION",
    "CHUNK",
    "PRESETS",
    "Preset",
    "SynthTensor",
    "data_order",
    "expected_size",
    "preset_tensors",
    "synthesize",
    "weights_name",
]

CHUNK = 8 * 1024 * 1024
"""Largest piece of tensor data held in memory at once while writing."""

AUTO_GPTQ_VERSION = "0.7.1"
"""The AutoGPTQ release whose ``__metadata__`` the GPTQ presets imitate."""

Fill = Literal["values", "bytes"]
Role = Literal["weight", "norm", "qweight", "qzeros", "scales", "g_idx"]

# The official writer (safetensors/src/tensor.rs) sorts by its Dtype enum, which is
# declared in order of alignment; data goes highest first, then by name.
_DTYPE_RANK = {
    d: i
    for i, d in enumerate(
        [
            "BOOL",
            "F4",
            "F6_E2M3",
            "F6_E3M2",
            "U8",
            "I8",
            "F8_E5M2",
            "F8_E4M3",
            "F8_E8M0",
            "F8_E4M3FNUZ",
            "F8_E5M2FNUZ",
            "I16",
            "U16",
            "F16",
            "BF16",
            "I32",
            "U32",
            "F32",
            "C64",
            "F64",
            "I64",
            "U64",
        ]
    )
}

FLOAT_DTYPES = ("F16", "BF16", "F32")
"""Dtypes a non-quantized preset may be written in."""


@dataclass(frozen=True)
class Preset:
    """A model family and size. ``arch`` picks the tensor names; ``fill`` the bytes."""

    name: str
    description: str
    arch: Literal["llama", "mixtral"]
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str = "F16"
    tied: bool = False
    gptq: bool = False
    bits: int = 4
    group_size: int = 128
    experts: int = 0
    experts_per_token: int = 2
    fill: Fill = "values"
    max_positions: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="tiny-gptq",
            description="Llama, 4 layers, hidden 256, GPTQ v1 int4, group 128 (~1.8 MB)",
            arch="llama",
            hidden=256,
            intermediate=512,
            layers=4,
            heads=4,
            kv_heads=2,
            vocab=512,
            gptq=True,
        ),
        Preset(
            name="tiny-llama",
            description="Llama, 4 layers, hidden 128, fp16, separate lm_head (~1.5 MB)",
            arch="llama",
            hidden=128,
            intermediate=256,
            layers=4,
            heads=4,
            kv_heads=2,
            vocab=512,
        ),
        Preset(
            name="tiny-llama-tied",
            description="tiny-llama with tied embeddings: no lm_head tensor (~1.3 MB)",
            arch="llama",
            hidden=128,
            intermediate=256,
            layers=4,
            heads=4,
            kv_heads=2,
            vocab=512,
            tied=True,
        ),
        Preset(
            name="tiny-moe",
            description="Mixtral, 2 layers, 4 experts (top 2), hidden 128, fp16 (~2.0 MB)",
            arch="mixtral",
            hidden=128,
            intermediate=256,
            layers=2,
            heads=4,
            kv_heads=2,
            vocab=512,
            experts=4,
            rope_theta=1e6,
        ),
        Preset(
            name="llama-2-7b-gptq",
            description="Llama-2-7B shapes, GPTQ 4-bit g128, random bytes (~3.9 GB)",
            arch="llama",
            hidden=4096,
            intermediate=11008,
            layers=32,
            heads=32,
            kv_heads=32,
            vocab=32000,
            gptq=True,
            fill="bytes",
            max_positions=4096,
        ),
        Preset(
            name="llama-2-13b-gptq",
            description="Llama-2-13B shapes, GPTQ 4-bit g128, random bytes (~7.3 GB)",
            arch="llama",
            hidden=5120,
            intermediate=13824,
            layers=40,
            heads=40,
            kv_heads=40,
            vocab=32000,
            gptq=True,
            fill="bytes",
            max_positions=4096,
        ),
    ]
}
"""Every preset by name."""


@dataclass(frozen=True)
class SynthTensor:
    """A tensor to synthesize: its spec and how its bytes are made."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    role: Role
    group_size: int = 0  # for g_idx

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape, self.nbytes)


def weights_name(preset: Preset) -> str:
    """The weights file name: AutoGPTQ's ``gptq_model-{bits}bit-{group}g`` or ``model``."""
    if preset.gptq:
        return f"gptq_model-{preset.bits}bit-{preset.group_size}g.safetensors"
    return "model.safetensors"


def _resolve(preset: str | Preset, layers: int | None, dtype: str | None) -> Preset:
    if isinstance(preset, Preset):
        p = preset
    else:
        if preset not in PRESETS:
            raise SynthError(
                f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)} "
                "(safeshard synth --help lists them)"
            )
        p = PRESETS[preset]
    if layers is not None:
        if layers < 1:
            raise SynthError(f"preset {p.name}: --layers must be at least 1, got {layers}")
        p = replace(p, layers=layers)
    if dtype is not None:
        if p.gptq:
            raise SynthError(
                f"preset {p.name} is GPTQ-quantized (int32 + fp16 scales); --dtype applies "
                "only to the non-quantized presets"
            )
        if dtype not in FLOAT_DTYPES:
            raise SynthError(
                f"preset {p.name}: dtype {dtype!r} is not supported; "
                f"use one of {', '.join(FLOAT_DTYPES)}"
            )
        p = replace(p, dtype=dtype)
    if p.gptq:
        ins = {p.hidden, p.heads * p.head_dim, p.intermediate}
        bad = sorted(i for i in ins if i % p.group_size or i * p.bits % 32)
        if bad:
            raise SynthError(
                f"preset {p.name}: input sizes {bad} are not multiples of the group size "
                f"{p.group_size}; GPTQ needs whole groups"
            )
    return p


# --------------------------------------------------------------------------- tensors


def _linear(prefix: str, p: Preset, n_in: int, n_out: int) -> list[SynthTensor]:
    """One linear layer (PyTorch weight [out, in]), GPTQ-quantized if the preset is."""
    if not p.gptq:
        return [SynthTensor(f"{prefix}.weight", p.dtype, (n_out, n_in), "weight")]
    g, b = p.group_size, p.bits
    return [
        SynthTensor(f"{prefix}.qweight", "I32", (n_in * b // 32, n_out), "qweight"),
        SynthTensor(f"{prefix}.qzeros", "I32", (n_in // g, n_out * b // 32), "qzeros"),
        SynthTensor(f"{prefix}.scales", "F16", (n_in // g, n_out), "scales"),
        SynthTensor(f"{prefix}.g_idx", "I32", (n_in,), "g_idx", group_size=g),
    ]


def preset_tensors(preset: str | Preset, layers: int | None = None) -> list[SynthTensor]:
    """The preset's tensors in model order (embeddings, blocks, final norm, lm_head)."""
    p = _resolve(preset, layers, None)
    fdt = "F16" if p.gptq else p.dtype
    h, kv = p.hidden, p.kv_heads * p.head_dim
    out = [SynthTensor("model.embed_tokens.weight", fdt, (p.vocab, h), "weight")]
    for i in range(p.layers):
        pre = f"model.layers.{i}"
        out.append(SynthTensor(f"{pre}.input_layernorm.weight", fdt, (h,), "norm"))
        out += _linear(f"{pre}.self_attn.q_proj", p, h, p.heads * p.head_dim)
        out += _linear(f"{pre}.self_attn.k_proj", p, h, kv)
        out += _linear(f"{pre}.self_attn.v_proj", p, h, kv)
        out += _linear(f"{pre}.self_attn.o_proj", p, p.heads * p.head_dim, h)
        out.append(SynthTensor(f"{pre}.post_attention_layernorm.weight", fdt, (h,), "norm"))
        if p.arch == "mixtral":
            moe = f"{pre}.block_sparse_moe"
            out.append(SynthTensor(f"{moe}.gate.weight", fdt, (p.experts, h), "weight"))
            for e in range(p.experts):
                out += _linear(f"{moe}.experts.{e}.w1", p, h, p.intermediate)
                out += _linear(f"{moe}.experts.{e}.w2", p, p.intermediate, h)
                out += _linear(f"{moe}.experts.{e}.w3", p, h, p.intermediate)
        else:
            out += _linear(f"{pre}.mlp.gate_proj", p, h, p.intermediate)
            out += _linear(f"{pre}.mlp.up_proj", p, h, p.intermediate)
            out += _linear(f"{pre}.mlp.down_proj", p, p.intermediate, h)
    out.append(SynthTensor("model.norm.weight", fdt, (h,), "norm"))
    if not p.tied:
        out.append(SynthTensor("lm_head.weight", fdt, (p.vocab, h), "weight"))
    return out


def data_order(tensors: Sequence[SynthTensor]) -> list[SynthTensor]:
    """The official writer's data order: dtype alignment descending, then name (bytewise)."""
    return sorted(tensors, key=lambda t: (-_DTYPE_RANK[t.dtype], t.name.encode("utf-8")))


# --------------------------------------------------------------------------- bytes


def _stream(seed: int, name: str, chunk: int, length: int) -> bytes:
    key = f"safeshard-synth\0{seed}\0{name}\0{chunk}".encode()
    return hashlib.shake_128(key).digest(length)


# (bit width, sign mask, exponent shift, base exponent with its low bits clear,
#  number of random low exponent bits); see _float_fill.
_FLOAT_LAYOUT = {"F16": (16, 15, 10, 5), "BF16": (16, 15, 7, 8), "F32": (32, 31, 23, 8)}


def _float_masks(dtype: str, role: Role) -> tuple[int, int]:
    """(AND mask, OR bits) of one element that turn random bits into a sensible float.

    Weights: random sign, exponent (bias − 7) or (bias − 6), random mantissa: magnitude
    2**-7 .. 2**-5. Norms: positive, exponent (bias − 1) or bias: 0.5 .. 2. Scales:
    positive, 2**-9 .. 2**-7, so that s·(q − 8) stays near weight magnitude.
    """
    _, sign_bit, shift, exp_bits = _FLOAT_LAYOUT[dtype]
    bias = (1 << (exp_bits - 1)) - 1
    mantissa = (1 << shift) - 1
    base = {"weight": bias - 7, "norm": bias - 1, "scales": bias - 9}[role]
    if base % 2:  # the random low exponent bit must not carry: a layout table error
        raise SynthError(f"{dtype}: exponent base {base} for {role} values is odd")
    and_mask = mantissa | (1 << shift)  # one random low exponent bit
    if role == "weight":
        and_mask |= 1 << sign_bit
    return and_mask, base << shift


def _apply_masks(data: bytes, width_bytes: int, and_mask: int, or_bits: int) -> bytes:
    """Element-wise ``(x & and_mask) | or_bits`` over little-endian elements, as big ints."""
    count = len(data) // width_bytes
    am = and_mask.to_bytes(width_bytes, "little") * count
    ob = or_bits.to_bytes(width_bytes, "little") * count
    x = int.from_bytes(data, "little")
    x = (x & int.from_bytes(am, "little")) | int.from_bytes(ob, "little")
    return x.to_bytes(len(data), "little")


def _g_idx_bytes(start: int, count: int, group: int) -> bytes:
    return struct.pack(f"<{count}i", *((start + i) // group for i in range(count)))


def tensor_chunks(t: SynthTensor, seed: int, fill: Fill) -> Iterator[bytes]:
    """The bytes of ``t`` in pieces of at most :data:`CHUNK` bytes."""
    total = t.nbytes
    elem = max(1, DTYPE_BITS[t.dtype] // 8)
    step = CHUNK - CHUNK % elem
    for k, start in enumerate(range(0, total, step)):
        n = min(step, total - start)
        if t.role == "qzeros":
            # zero point 2**(bits-1) = 8 stored as 7 in every nibble (v1 format)
            yield b"\x77" * n
        elif t.role == "g_idx":
            yield _g_idx_bytes(start // 4, n // 4, t.group_size)
        elif t.role == "qweight" or fill == "bytes":
            yield _stream(seed, t.name, k, n)
        else:
            and_mask, or_bits = _float_masks(t.dtype, t.role)
            yield _apply_masks(_stream(seed, t.name, k, n), elem, and_mask, or_bits)


def _write_weights(
    path: Path,
    tensors: Sequence[SynthTensor],
    metadata: Mapping[str, str],
    seed: int,
    fill: Fill,
    progress: Callable[[int], None] | None,
) -> None:
    """Stream ``tensors`` (already in data order) into ``path`` atomically.

    A writer thread does the ``pwrite`` calls (which release the GIL) while this thread
    makes the next chunk; at most a few chunks are in flight.
    """
    header = build_header([t.spec() for t in tensors], metadata)
    pending: queue.Queue[tuple[bytes, int] | None] = queue.Queue(maxsize=3)
    failure: list[BaseException] = []
    with AtomicWriter(path) as w:

        def writer() -> None:
            while True:
                item = pending.get()
                if item is None:
                    return
                if failure:
                    continue
                try:
                    w.write(item[0], item[1])
                    if progress is not None:
                        progress(len(item[0]))
                except BaseException as e:  # surfaced in the main thread
                    failure.append(e)

        thread = threading.Thread(target=writer, name="safeshard-synth-writer", daemon=True)
        thread.start()
        try:
            pending.put((header, 0))
            offset = len(header)
            for t in tensors:
                for piece in tensor_chunks(t, seed, fill):
                    if failure:
                        break
                    pending.put((piece, offset))
                    offset += len(piece)
        finally:
            pending.put(None)
            thread.join()
        if failure:
            raise failure[0]


# --------------------------------------------------------------------------- configs


def _quant_fields(p: Preset) -> dict[str, Any]:
    return {
        "bits": p.bits,
        "group_size": p.group_size,
        "damp_percent": 0.01,
        "desc_act": False,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": None,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


def safetensors_metadata(p: Preset) -> dict[str, str]:
    """``__metadata__`` as AutoGPTQ writes it for GPTQ presets, else ``{"format": "pt"}``."""
    if not p.gptq:
        return {"format": "pt"}
    q = _quant_fields(p)
    return {
        "format": "pt",
        "auto_gptq_version": AUTO_GPTQ_VERSION,
        "gptq_bits": str(q["bits"]),
        "gptq_group_size": str(q["group_size"]),
        "gptq_desc_act": str(q["desc_act"]),
        "gptq_damp_percent": str(q["damp_percent"]),
        "gptq_checkpoint_format": q["checkpoint_format"],
        "gptq_quant_method": q["quant_method"],
    }


_TORCH_DTYPE = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def model_config(p: Preset) -> dict[str, Any]:
    """``config.json`` as a Llama-2 / Mixtral checkpoint carries it."""
    cfg: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if p.arch == "mixtral" else "LlamaForCausalLM"],
        "model_type": p.arch,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": p.hidden,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate,
        "max_position_embeddings": p.max_positions,
        "num_attention_heads": p.heads,
        "num_hidden_layers": p.layers,
        "num_key_value_heads": p.kv_heads,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "tie_word_embeddings": p.tied,
        "torch_dtype": _TORCH_DTYPE["F16" if p.gptq else p.dtype],
        "use_cache": True,
        "vocab_size": p.vocab,
    }
    if p.arch == "llama":
        cfg["pretraining_tp"] = 1
        cfg["pad_token_id"] = 0
    else:
        cfg["num_local_experts"] = p.experts
        cfg["num_experts_per_tok"] = p.experts_per_token
        cfg["output_router_logits"] = False
        cfg["router_aux_loss_coef"] = 0.02
        cfg["sliding_window"] = None
    if p.gptq:
        cfg["quantization_config"] = _quant_fields(p)
    return cfg


def quantize_config(p: Preset) -> dict[str, Any]:
    """``quantize_config.json`` as AutoGPTQ 0.7 writes it."""
    return _quant_fields(p)


def generation_config(p: Preset) -> dict[str, Any]:
    return {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
"""Ids 0, 1, 2 as in Llama-2; the 256 byte tokens follow."""


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: a printable character for each byte value."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tokenizer_json() -> dict[str, Any]:
    """A byte-level BPE with no merges: 3 special tokens + 256 byte tokens (259 ids)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _bytes_to_unicode():
        vocab[ch] = len(vocab)
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, tok in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                bos,
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------- entry point


def synthesize(
    out_dir: str | os.PathLike[str],
    preset: str | Preset,
    layers: int | None = None,
    seed: int = 0,
    *,
    dtype: str | None = None,
    force: bool = False,
    tokenizer: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a checkpoint folder for ``preset`` into ``out_dir`` and return the folder.

    ``layers`` overrides the preset's layer count, ``dtype`` (``F16``/``BF16``/``F32``)
    the float type of a non-quantized preset. The same arguments give byte-identical
    files. An ``out_dir`` that already holds ``.safetensors`` files is refused unless
    ``force``. ``progress`` is called with the number of weight bytes just written.
    """
    p = _resolve(preset, layers, dtype)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(
        f.name
        for f in folder.iterdir()
        if f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json")
    )
    if existing and not force:
        raise OutputExistsError(
            f"{folder}: already holds {', '.join(existing)}; choose an empty folder "
            "or pass --force to overwrite"
        )
    for name in existing:
        (folder / name).unlink()
    tensors = data_order(preset_tensors(p))
    _write_weights(
        folder / weights_name(p), tensors, safetensors_metadata(p), seed, p.fill, progress
    )
    write_atomic(folder / "config.json", _dump(model_config(p)))
    write_atomic(folder / "generation_config.json", _dump(generation_config(p)))
    if p.gptq:
        write_atomic(folder / "quantize_config.json", _dump(quantize_config(p)))
    if tokenizer:
        write_atomic(folder / "tokenizer.json", _dump(tokenizer_json()))
        write_atomic(folder / "tokenizer_config.json", _dump(tokenizer_config()))
    return folder


def expected_size(preset: str | Preset, layers: int | None = None) -> int:
    """The weights file size the preset makes, header included, without writing it."""
    p = _resolve(preset, layers, None)
    tensors = data_order(preset_tensors(p))
    header = build_header([t.spec() for t in tensors], safetensors_metadata(p))
    return len(header) + sum(t.nbytes for t in tensors)
