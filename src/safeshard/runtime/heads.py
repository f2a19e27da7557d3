"""Which transformers model a folder's ``config.json`` builds, for :func:`safeshard.empty_model`.

stream runs four kinds of model heads (*tasks*), each built by its transformers Auto class:

============================  ==========================================
``"causal-lm"``               ``AutoModelForCausalLM`` (Llama, GPT-2, ...)
``"seq2seq-lm"``              ``AutoModelForSeq2SeqLM`` (T5, BART, ...)
``"image-text-to-text"``      ``AutoModelForImageTextToText`` (LLaVA, ...)
``"sequence-classification"`` ``AutoModelForSequenceClassification``
============================  ==========================================

Without a ``task``, :func:`choose_task` takes the head the config's ``architectures``
names (what ``save_pretrained`` wrote), looked up in transformers' own Auto mappings for
the installed version, or the first of these Auto classes its ``auto_map`` maps (a model
with its own code, ``trust_remote_code``); a config without ``architectures`` is taken as
a causal LM, an encoder-decoder as seq2seq, where transformers has such a model for its type.

Everything here reads only ``config.json``: a config transformers rejects, or a model
type with none of these heads, is a :class:`~safeshard.errors.ModelConfigError` naming
the file and the reason, before any weight is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safeshard.errors import ModelConfigError, UsageError

__all__ = ["AUTO_CLASSES", "TASKS", "build", "choose_task", "load_config"]

AUTO_CLASSES = {
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "seq2seq-lm": ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    "image-text-to-text": (
        "AutoModelForImageTextToText",
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    ),
    "sequence-classification": (
        "AutoModelForSequenceClassification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    ),
}
"""task -> (transformers Auto class, its mapping of model type -> class name)."""

TASKS = tuple(AUTO_CLASSES)

# what transformers raises for a config it cannot read or build a model from
_REJECTED = (ValueError, KeyError, TypeError, AttributeError, IndexError, OSError)


def _names(task: str) -> dict[str, Any]:
    from transformers.models.auto import modeling_auto

    return dict(getattr(modeling_auto, AUTO_CLASSES[task][1]))


def _classes(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]


def load_config(folder: Path, *, trust_remote_code: bool = False) -> Any:
    """The folder's config through ``AutoConfig``; :class:`ModelConfigError` if transformers
    rejects it (with transformers' reason)."""
    import transformers

    where = folder / "config.json"
    try:
        return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except _REJECTED as e:
        raise ModelConfigError(
            f"{where}: transformers {transformers.__version__} cannot read this config "
            f"({type(e).__name__}: {_short(e)}); fix the file or build the model yourself "
            "under torch.device('meta') and pass it to safeshard.stream"
        ) from None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def choose_task(cfg: Any, task: str | None, where: str) -> str:
    """The task to build ``cfg`` as: ``task`` checked, or the one its ``architectures`` name.

    ``where`` (the config's path) starts the messages."""
    model_type = str(getattr(cfg, "model_type", "") or "")
    archs = [a for a in (getattr(cfg, "architectures", None) or []) if isinstance(a, str)]
    auto_map = getattr(cfg, "auto_map", None) or {}
    remote = [t for t in TASKS if isinstance(auto_map, dict) and AUTO_CLASSES[t][0] in auto_map]
    if task is not None:
        if task not in AUTO_CLASSES:
            raise UsageError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
        if model_type not in _names(task) and task not in remote:
            raise ModelConfigError(
                f"{where}: model type {model_type!r} has no {task} model in transformers"
                f"{_offers(model_type)}"
            )
        return task
    for arch in archs:
        for t in TASKS:
            if any(arch in _classes(v) for v in _names(t).values()):
                return t
    if remote:  # the model's own code (trust_remote_code): the first head it maps
        return remote[0]
    if not archs:
        if getattr(cfg, "is_encoder_decoder", False) and model_type in _names("seq2seq-lm"):
            return "seq2seq-lm"
        for t in ("causal-lm", "image-text-to-text", "seq2seq-lm"):
            if model_type in _names(t):
                return t
    what = f"architectures {archs}" if archs else "no architectures"
    raise ModelConfigError(
        f"{where}: model type {model_type!r} ({what}) is not a model stream runs; it builds "
        f"{', '.join(TASKS)} models{_offers(model_type)}"
    )


def _offers(model_type: str) -> str:
    have = [t for t in TASKS if model_type in _names(t)]
    if not have:
        return ""
    return f"; for this type it can build {', '.join(have)} (empty_model(path, task=...))"


def build(cfg: Any, task: str, *, dtype: Any, trust_remote_code: bool, where: str) -> Any:
    """``cfg`` built as ``task`` (call under ``torch.device("meta")``);
    :class:`ModelConfigError` if transformers rejects the config's values."""
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[task][0])
    try:
        return auto.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    except _REJECTED as e:
        raise ModelConfigError(
            f"{where}: transformers cannot build a {task} model from this config "
            f"({type(e).__name__}: {_short(e)})"
        ) from None
