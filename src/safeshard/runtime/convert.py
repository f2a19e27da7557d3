"""The renames and fusions transformers applies to a checkpoint when it loads it.

transformers 5 loads many Hub checkpoints under other names than their files use: it
renames keys (GPT-NeoX's ``embed_out`` is ``lm_head``, Mixtral's ``block_sparse_moe`` is
``mlp``, LLaVA's ``language_model.model`` is ``model.language_model``) and fuses tensors
(each expert's ``w1``/``w3`` become one ``experts.gate_up_proj`` of shape
``[experts, 2 * intermediate, hidden]``). Its rules are its *checkpoint conversion
mapping* (``transformers.conversion_mapping``), applied by ``transformers.core_model_loading``.

:func:`plan_conversion` runs the same machinery on the checkpoint's *names* only:

- each checkpoint key is renamed as ``from_pretrained`` renames it
  (``rename_source_key``, with the same renamings, converters and base-model prefix);
- a key claimed by a converter is collected, in the order ``from_pretrained`` collects
  it, into a :class:`Fused` target; its converter is then run once on meta tensors, to
  learn the names and shapes it produces without reading a byte.

:meth:`Fused.run` runs the converter on real tensors (views of the mapped shards) when the
target is needed; :meth:`Fused.run_subset` runs it on some experts only (a
``MergeModulelist`` stacks whatever list it is given), which is how
:mod:`safeshard.runtime.experts` builds the rows of the experts a router picked.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safeshard.errors import ModelMismatchError

__all__ = ["Conversion", "Fused", "plan_conversion"]


@dataclass
class Fused:
    """Model tensors made from several checkpoint tensors by one transformers converter."""

    converter: Any
    """A ``WeightConverter`` (a private copy, as ``from_pretrained`` makes one per target)."""
    first: str
    """The first target's model name (what transformers passes the converter as the layer)."""
    sources: dict[str, list[str]] = field(default_factory=dict)
    """Source pattern -> the checkpoint keys it collected, in load order (expert 0, 1, ...)."""
    targets: dict[str, tuple[tuple[int, ...], Any]] = field(default_factory=dict)
    """Model name -> (shape, dtype) of each tensor it produces."""
    merged: bool = False
    """Whether its first operation stacks a list per source pattern (``MergeModulelist``):
    then entry ``i`` of every source list is expert ``i``."""

    @property
    def keys(self) -> list[str]:
        """Every checkpoint key it reads."""
        return [k for ks in self.sources.values() for k in ks]

    @property
    def num_items(self) -> int:
        """Entries per source pattern (the number of experts, for a merged target)."""
        return min((len(v) for v in self.sources.values()), default=0)

    def _convert(self, tensors: Mapping[str, Sequence[Any]], model: Any) -> dict[str, Any]:
        c = copy.copy(self.converter)
        c.collected_tensors = defaultdict(list)
        c.layer_targets = defaultdict(set)
        for pattern, values in tensors.items():
            for v in values:
                c.collected_tensors[pattern].append(_const(v))
        out = c.convert(self.first, model=model, config=getattr(model, "config", None))
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}

    def run(self, read: Callable[[str], Any], model: Any) -> dict[str, Any]:
        """Model name -> tensor for every target, from ``read(checkpoint key)``."""
        return self._convert({p: [read(k) for k in ks] for p, ks in self.sources.items()}, model)

    def run_subset(
        self, read: Callable[[str], Any], items: Sequence[int], model: Any
    ) -> dict[str, Any]:
        """As :meth:`run`, on entries ``items`` of each source list only (some experts)."""
        return self._convert(
            {p: [read(ks[i]) for i in items] for p, ks in self.sources.items()}, model
        )


def _const(v: Any) -> Callable[[], Any]:
    return lambda: v


@dataclass
class Conversion:
    """How the checkpoint's keys become the model's tensors."""

    renamed: dict[str, str]
    """Checkpoint key -> model name, for keys loaded as they are (perhaps renamed)."""
    fused: list[Fused]
    unexpected: list[str]
    """Checkpoint keys with no place in the model (after renaming)."""


def _machinery() -> Any:
    """transformers' conversion API, or None where the installed version has none."""
    try:
        from transformers import conversion_mapping, core_model_loading
    except ImportError:
        return None
    needed = ("rename_source_key", "WeightConverter", "WeightRenaming", "dot_natural_key")
    if not hasattr(conversion_mapping, "get_model_conversion_mapping") or not all(
        hasattr(core_model_loading, n) for n in needed
    ):
        return None
    return conversion_mapping, core_model_loading


def plan_conversion(
    model: Any,
    shapes: Mapping[str, tuple[tuple[int, ...], Any]],
    model_tensors: Mapping[str, Any],
    label: str = "",
) -> Conversion | None:
    """What ``from_pretrained`` would do with the checkpoint's tensors for ``model`` (built on
    the meta device), or None where transformers has no conversion machinery.

    ``shapes``: checkpoint key -> (shape, torch dtype) of each tensor in the checkpoint.

    ``model_tensors``: model name -> its (meta) tensor, aliases included. A converter whose
    output does not fit the model is a :class:`ModelMismatchError`.
    """
    api = _machinery()
    if api is None:
        return None
    cm, cml = api
    import torch

    weight_mapping = cm.get_model_conversion_mapping(model, None, None)
    renamings = [e for e in weight_mapping if isinstance(e, cml.WeightRenaming)]
    converters = [e for e in weight_mapping if isinstance(e, cml.WeightConverter)]
    pattern_to_converter = {k: c for c in converters for k in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)
    renamed: dict[str, str] = {}
    fused: dict[str, Fused] = {}
    unexpected: list[str] = []
    for key in sorted(shapes, key=cml.dot_natural_key):
        new, pattern = cml.rename_source_key(key, renamings, converters, prefix, model_tensors)
        if new not in model_tensors and key in model_tensors:
            new, pattern = cml.rename_source_key(key, [], [], prefix, model_tensors)
        if new not in model_tensors:
            unexpected.append(key)
            continue
        if pattern is None:
            renamed[key] = new
            continue
        f = fused.get(new)
        if f is None:
            conv = copy.deepcopy(pattern_to_converter[pattern])
            f = fused[new] = Fused(converter=conv, first=new)
        f.sources.setdefault(pattern, []).append(key)
    out = Conversion(renamed=renamed, fused=list(fused.values()), unexpected=unexpected)
    for f in out.fused:
        ops = getattr(f.converter, "operations", [])
        f.merged = bool(ops) and type(ops[0]).__name__ == "MergeModulelist"
        try:
            with torch.device("meta"):
                made = f._convert(
                    {
                        p: [
                            torch.empty(shapes[k][0], dtype=shapes[k][1], device="meta") for k in ks
                        ]
                        for p, ks in f.sources.items()
                    },
                    model,
                )
        except Exception as e:  # any failure of transformers' own op on meta tensors
            raise ModelMismatchError(
                f"{label}: transformers fuses {', '.join(repr(k) for k in f.keys[:3])} into "
                f"{f.first!r} when it loads this checkpoint, and that conversion could not be "
                f"planned ({type(e).__name__}: {e}); re-save the checkpoint with the model's own "
                "names (from_pretrained, then save_pretrained with the names of model.state_dict())"
            ) from None
        for name, t in made.items():
            f.targets[name] = (tuple(t.shape), t.dtype)
    return out
