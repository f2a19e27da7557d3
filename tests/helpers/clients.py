"""Real-client loads for tests: does a folder load, and what does the model compute?

Import from any test as ``from clients import hf_logits, hub_load_strict, gptq_logits``
(``tests/`` is on pytest's ``pythonpath``). Compare a folder before and after a split::

    before = hf_logits(src)
    after = hf_logits(out)
    assert torch.equal(before, after)

- :func:`hf_logits`: ``transformers.AutoModelForCausalLM.from_pretrained`` with
  ``output_loading_info=True``; asserts no missing, unexpected or mismatched keys and no
  load errors; returns the logits of :data:`INPUT_IDS` in eval mode (float32 by default).
- :func:`hub_load_strict`: ``huggingface_hub.load_torch_model(model, folder, strict=True)``
  on a model built from the folder's ``config.json``.
- :func:`gptq_logits`: transformers + GPTQModel (``gptq_torch`` backend, CPU) in a
  subprocess, because a bad GPTQ tensor can abort the process; returns the logits, or
  raises :class:`ClientLoadError` with the child's stderr.

transformers only looks for ``model.safetensors`` or ``model.safetensors.index.json``.
For a folder whose weights have another base name (AutoGPTQ's
``gptq_model-4bit-128g.safetensors``, or a split made with ``--name``), these helpers
name the file that :func:`safeshard.source.locate` finds through ``config.transformers_weights``,
which transformers 5 honours. Pass ``native=True`` to forbid that and test what
transformers finds on its own.

All of them run offline (``HF_HUB_OFFLINE=1``). Importing this module needs neither torch
nor transformers; each function imports what it uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from safeshard.checkpoint import locate

INPUT_IDS: list[list[int]] = [
    [1, 15, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 2]
]
"""A fixed batch of one sequence: ids below 259, so valid for every synth tokenizer/vocab."""

NATIVE_NAMES = ("model.safetensors", "model.safetensors.index.json")
"""The only weights transformers and huggingface_hub find in a folder by themselves."""

GPTQ_CONFIG = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True}
"""The GPTQConfig the GPTQModel load uses (with ``backend="gptq_torch"``)."""


class ClientLoadError(AssertionError):
    """A real client refused the folder, or loaded it with missing or unexpected weights."""


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def weights_override(folder: str | os.PathLike[str], native: bool = False) -> str | None:
    """The file name transformers must be told about, or None if it finds the weights itself.

    With ``native``, raise instead of overriding.
    """
    folder = Path(folder)
    if any((folder / n).is_file() for n in NATIVE_NAMES):
        return None
    loc = locate(folder)
    name = loc.index.path.name if loc.index is not None else loc.files[0].name
    if native:
        raise ClientLoadError(
            f"{folder}: transformers finds no model.safetensors or model.safetensors.index.json "
            f"here (the checkpoint is {name})"
        )
    return name


def _load_config(folder: Path, native: bool) -> Any:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    override = weights_override(folder, native)
    if override is not None:
        cfg.transformers_weights = override
    return cfg


def _check_info(folder: Path, info: dict[str, Any]) -> None:
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise ClientLoadError(f"{folder}: transformers loaded it with problems: {bad}")


def hf_load(folder: str | os.PathLike[str], *, dtype: Any = None, native: bool = False) -> Any:
    """``AutoModelForCausalLM.from_pretrained(folder)`` in eval mode, with clean loading info.

    ``dtype`` defaults to ``torch.float32`` (fp16/bf16 weights are upcast exactly). A GPTQ
    folder is refused here: use :func:`gptq_logits`.
    """
    _offline()
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    cfg = _load_config(folder, native)
    if getattr(cfg, "quantization_config", None):
        raise ClientLoadError(f"{folder}: a quantized model; load it with gptq_logits()")
    # with output_loading_info=True this returns (model, info); transformers types it a model
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        folder,
        config=cfg,
        dtype=torch.float32 if dtype is None else dtype,
        output_loading_info=True,
    )
    model, info = loaded
    _check_info(folder, info)
    model.eval()
    return model


def hf_logits(
    folder: str | os.PathLike[str],
    *,
    input_ids: list[list[int]] | None = None,
    dtype: Any = None,
    native: bool = False,
) -> Any:
    """Logits of ``input_ids`` (default :data:`INPUT_IDS`) from :func:`hf_load`'s model."""
    import torch

    model = hf_load(folder, dtype=dtype, native=native)
    ids = torch.tensor(INPUT_IDS if input_ids is None else input_ids)
    with torch.no_grad():
        return model(ids).logits.detach().clone()


def hub_load_strict(folder: str | os.PathLike[str]) -> Any:
    """Build the model from ``config.json`` and fill it with
    ``huggingface_hub.load_torch_model(model, folder, strict=True)``; return it in eval mode.

    huggingface_hub looks for ``model.safetensors.index.json`` or a single ``*.safetensors``
    in the folder, and needs the file's keys to be the model's ``state_dict`` keys (true for
    Llama; not for Mixtral in transformers 5, whose experts are fused at load time).

    A tied-embeddings model stores no ``lm_head.weight`` (no writer stores an alias twice),
    yet torch lists the alias in ``state_dict``; for such a model the load runs with
    ``strict=False`` and the same check is made here, allowing only missing keys that share
    storage with a loaded tensor. Every other key must match both ways.
    """
    _offline()
    import torch
    from huggingface_hub import load_torch_model
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    cfg = AutoConfig.from_pretrained(folder)
    if getattr(cfg, "quantization_config", None):
        raise ClientLoadError(f"{folder}: a quantized model; load it with gptq_logits()")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = model.state_dict()
    aliases = _aliases(state)
    try:
        if not aliases:
            load_torch_model(model, folder, strict=True)
        else:
            # typed a bare NamedTuple; it is torch's _IncompatibleKeys
            result: Any = load_torch_model(model, folder, strict=False)
            missing = [k for k in result.missing_keys if k not in aliases]
            if missing or result.unexpected_keys:
                raise ClientLoadError(
                    f"{folder}: huggingface_hub load: missing {missing}, "
                    f"unexpected {list(result.unexpected_keys)}"
                )
    except RuntimeError as e:
        raise ClientLoadError(f"{folder}: huggingface_hub strict load failed: {e}") from e
    model.eval()
    return model


def _aliases(state: dict[str, Any]) -> set[str]:
    """Keys whose tensor shares storage with an earlier key (tied weights)."""
    seen: dict[tuple[int, int], str] = {}
    out: set[str] = set()
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen:
            out.add(key)
        else:
            seen[ident] = key
    return out


# --------------------------------------------------------------------------- GPTQModel

_GPTQ_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPTQConfig
    args = json.loads(sys.argv[1])
    cfg = AutoConfig.from_pretrained(args["folder"])
    if args["override"]:
        cfg.transformers_weights = args["override"]
    q = GPTQConfig(**args["gptq"], backend="gptq_torch")
    model, info = AutoModelForCausalLM.from_pretrained(
        args["folder"], config=cfg, quantization_config=q, output_loading_info=True,
        device_map="cpu", dtype=torch.float16,
    )
    bad = {k: [str(x) for x in v] for k, v in info.items() if v}
    if bad:
        print("LOADING-INFO " + json.dumps(bad), file=sys.stderr)
        sys.exit(3)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(args["ids"])).logits.float()
    torch.save(logits, args["out"])
    """
)


def gptq_logits(
    folder: str | os.PathLike[str],
    *,
    input_ids: list[list[int]] | None = None,
    native: bool = False,
    timeout: float = 900,
) -> Any:
    """Logits (float32) of a GPTQ folder loaded by transformers + GPTQModel on the CPU.

    Runs in a subprocess with ``HF_HUB_OFFLINE=1`` and ``TMPDIR`` /
    ``TORCHINDUCTOR_CACHE_DIR`` in a temporary folder. Raises :class:`ClientLoadError`
    with the child's stderr if it fails, aborts, or reports missing/unexpected keys.
    """
    import torch

    folder = Path(folder).resolve()
    override = weights_override(folder, native)
    with tempfile.TemporaryDirectory(prefix="safeshard-gptq-") as tmp:
        out = Path(tmp) / "logits.pt"
        args = {
            "folder": str(folder),
            "override": override,
            "gptq": GPTQ_CONFIG,
            "ids": INPUT_IDS if input_ids is None else input_ids,
            "out": str(out),
        }
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TMPDIR=tmp,
            TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"),
            TOKENIZERS_PARALLELISM="false",
        )
        proc = subprocess.run(
            [sys.executable, "-c", _GPTQ_CHILD, json.dumps(args)],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not out.is_file():
            tail = proc.stderr[-6000:]
            raise ClientLoadError(
                f"{folder}: the GPTQModel load exited with {proc.returncode}:\n{tail}"
            )
        return torch.load(out)
