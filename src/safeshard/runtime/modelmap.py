"""Where a checkpoint's tensors go in a model built on the meta device, and in what units.

Used by :mod:`safeshard.runtime.stream` before any forward pass:

- :func:`check_meta`: every parameter is on the meta device (:class:`UsageError`);
- :func:`match`: every parameter and persistent buffer the model needs is in the
  checkpoint with the same shape and a compatible dtype, and every checkpoint tensor
  has a place (:class:`ModelMismatchError`). Each tensor gets its *slots*: every
  ``(module, attribute)`` that holds it, so tied weights (an ``lm_head`` sharing the
  embedding) are one tensor in two places;
- :func:`init_buffers`: non-persistent buffers that a meta build left empty (rotary
  frequencies) are computed by the model's own ``_init_weights``;
- :func:`gptq_support`: what transformers' GPTQ integration does to a quantized
  module after loading it, to do again after each read;
- :func:`plan_units`: the units the runner streams, in model order. With
  ``granularity="block"``, each block (``model.layers.7``) whose module exists is one
  unit, hooked on that module; the other tensors are grouped by the modules holding
  them. With ``"module"``, every tensor is grouped by the modules holding it (each
  ``Linear`` and norm of a block is its own unit): smaller units, so a smaller
  window and more left resident, but every weight must be used by its own module's
  forward, as in the Llama, GPT-2 and OPT families. A unit whose module encloses
  another unit's module (a weight on the model itself) must stay resident.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from safeshard.errors import ModelMismatchError, UsageError
from safeshard.format.blocks import group_tensors, model_order
from safeshard.format.header import TensorInfo
from safeshard.runtime.convert import Fused, plan_conversion
from safeshard.runtime.lazy import LazyCheckpoint
from safeshard.runtime.prefetch import Unit
from safeshard.runtime.readers import TorchBackend, import_torch

__all__ = [
    "GPTQ",
    "Granularity",
    "ModelTensor",
    "Slot",
    "UnitSpec",
    "check_meta",
    "gptq_support",
    "init_buffers",
    "match",
    "plan_units",
]

Granularity = Literal["block", "module"]

_SENTINEL_INT = -(2**31) + 7


@dataclass
class Slot:
    """One place a tensor lives: ``module._parameters[attr]`` or ``module._buffers[attr]``."""

    module: Any
    attr: str
    param: bool

    def put(self, value: Any) -> None:
        (self.module._parameters if self.param else self.module._buffers)[self.attr] = value


@dataclass
class ModelTensor:
    """A checkpoint tensor and where it goes in the model."""

    name: str
    """Its name in the checkpoint."""
    info: TensorInfo
    slots: list[Slot]
    placeholder: Any
    """What the slots hold while it is not materialized (a meta tensor)."""
    dtype: Any
    """The model's dtype for it (a float tensor stored in another float type is converted)."""
    nbytes: int
    """Bytes held while materialized: the mapped bytes, plus a copy where one is made."""
    copy: bool
    """Whether materializing it copies (a dtype conversion, a GPTQ zero-point fix)."""
    gptq_module: Any = None
    """The GPTQ module whose v1 ``qzeros`` this is (converted after each read)."""
    fused: Fused | None = None
    """For a tensor transformers makes from several checkpoint tensors when it loads them
    (:mod:`safeshard.runtime.convert`): the conversion; ``name`` is then the model's name for it."""
    sources: list[TensorInfo] = field(default_factory=list)
    """The checkpoint tensors a fused tensor is made from (``info`` is the first)."""

    @property
    def reads(self) -> list[TensorInfo]:
        """The checkpoint tensors read to materialize it."""
        return self.sources or [self.info]


@dataclass
class UnitSpec:
    """A unit and what it means in the model."""

    unit: Unit
    tensors: list[ModelTensor]
    users: list[Any]
    """The modules whose forward needs it: hooks acquire it around their calls."""
    quant: list[Any]
    """GPTQ modules among its slots."""
    rows: Any = None
    """The ``nn.Embedding`` that reads it row by row when it is not resident, if any."""


@dataclass
class GPTQ:
    """What to do to a model's GPTQ modules after their tensors are read."""

    modules: set[int]
    """``id()`` of each quantized module."""
    convert: Callable[[Any], None] | None
    """Converts a module's freshly read v1 zero points to the v2 form its kernel uses."""


def check_meta(model: Any) -> None:
    """Every parameter on the meta device, else :class:`UsageError`."""
    params = list(model.named_parameters(remove_duplicate=False))
    real = [(n, p) for n, p in params if p.device.type != "meta"]
    if real or not params:
        what = f"parameter {real[0][0]!r} is on {real[0][1].device}" if real else "it has none"
        raise UsageError(
            f"stream() needs a model built on the meta device, with no weights yet; {what}. "
            "Build it with safeshard.empty_model(path), or under torch.device('meta') "
            "(e.g. AutoModelForCausalLM.from_config(config)), or accelerate's init_empty_weights()"
        )


def _persistent(model: Any) -> dict[str, tuple[Any, str, bool, Any]]:
    """name -> (module, attr, is_param, tensor) for every parameter and persistent buffer,
    aliases (tied weights) included."""
    out: dict[str, tuple[Any, str, bool, Any]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        pre = f"{mname}." if mname else ""
        for attr, p in m._parameters.items():
            if p is not None:
                out[pre + attr] = (m, attr, True, p)
        for attr, b in m._buffers.items():
            if b is not None and attr not in m._non_persistent_buffers_set:
                out[pre + attr] = (m, attr, False, b)
    return out


def _ignored_unexpected(model: Any) -> list[re.Pattern[str]]:
    """The model's own patterns of checkpoint tensors to ignore, and stale rotary buffers."""
    pats = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    pats.append(r"rotary_emb\.inv_freq$")
    out = []
    for p in pats:
        with contextlib.suppress(re.error, TypeError):
            out.append(re.compile(p))
    return out


def _name_map(names: list[str], ckpt: set[str], prefix: str) -> dict[str, str]:
    """model name -> checkpoint name for those the checkpoint has (also a checkpoint
    saved with or without the model's ``base_model_prefix``)."""
    out: dict[str, str] = {}
    for n in names:
        if n in ckpt:
            out[n] = n
        elif prefix and n.startswith(prefix + ".") and n[len(prefix) + 1 :] in ckpt:
            out[n] = n[len(prefix) + 1 :]
        elif prefix and f"{prefix}.{n}" in ckpt:
            out[n] = f"{prefix}.{n}"
    return out


def match(model: Any, lc: LazyCheckpoint, device: Any) -> dict[str, ModelTensor]:
    """Checkpoint name -> :class:`ModelTensor` for every tensor the model needs, checked.

    ``device`` (None for the CPU) counts a copy for every tensor moved off the CPU.
    """
    torch = import_torch()
    backend = TorchBackend()
    entries = _persistent(model)
    keys = list(lc.keys())
    names = _name_map(list(entries), set(keys), getattr(model, "base_model_prefix", "") or "")
    fused_of: dict[str, Fused] = {}
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    for k in keys:
        i = lc.info(k)
        shapes[k] = (tuple(i.shape), backend.native_dtype(i.dtype) or torch.uint8)
    conv = plan_conversion(model, shapes, entries, label=str(lc.path))
    if conv is not None and (conv.fused or any(k != m for k, m in conv.renamed.items())):
        # transformers renames or fuses this checkpoint's tensors when it loads them:
        # follow it, and match directly only what it leaves alone
        covered = set(conv.renamed.values())
        for f in conv.fused:
            for target in f.targets:
                fused_of[target] = f
                covered.add(target)
        consumed = set(conv.renamed) | {k for f in conv.fused for k in f.keys}
        names = {n: c for n, c in names.items() if n not in covered and c not in consumed}
        names.update({m: k for k, m in conv.renamed.items()})
    by_obj: dict[int, list[str]] = {}
    for n, (_, _, _, t) in entries.items():
        by_obj.setdefault(id(t), []).append(n)
    out: dict[str, ModelTensor] = {}
    missing: list[str] = []
    for group in by_obj.values():
        fusedp = [n for n in group if n in fused_of]
        if fusedp:
            out[fusedp[0]] = _fused_tensor(lc, fusedp[0], fused_of[fusedp[0]], group, entries)
            continue
        present = [n for n in group if n in names]
        if not present:
            _, _, is_param, t = entries[group[0]]
            if not is_param and t.device.type != "meta":
                continue  # a real buffer the checkpoint does not have: the model's own
            missing.append(group[0])
            continue
        canonical = present[0]
        cname = names[canonical]
        _, _, is_param, t = entries[canonical]
        info = lc.info(cname)
        if tuple(t.shape) != tuple(info.shape):
            raise ModelMismatchError(
                f"{lc.path}: tensor {cname!r} has shape {list(info.shape)} in the checkpoint, "
                f"but the model's {canonical!r} has shape {list(t.shape)}; the checkpoint is "
                "for another model or configuration. Build the model from the checkpoint's "
                "config.json (safeshard.empty_model)"
            )
        stored = backend.native_dtype(info.dtype)
        if stored is None or (
            stored != t.dtype and not (stored.is_floating_point and t.dtype.is_floating_point)
        ):
            raise ModelMismatchError(
                f"{lc.path}: tensor {cname!r} is {info.dtype} in the checkpoint, but the model's "
                f"{canonical!r} is {t.dtype}; only floating-point tensors are converted"
            )
        copy = stored != t.dtype
        extra = t.numel() * t.element_size() if copy or device is not None else 0
        placeholder = t if t.device.type == "meta" else t.to("meta")
        if is_param and not isinstance(placeholder, torch.nn.Parameter):
            placeholder = torch.nn.Parameter(placeholder, requires_grad=t.requires_grad)
        out[cname] = ModelTensor(
            name=cname,
            info=info,
            slots=[Slot(entries[n][0], entries[n][1], entries[n][2]) for n in group],
            placeholder=placeholder,
            dtype=t.dtype,
            nbytes=info.nbytes + extra,
            copy=copy,
        )
    if missing:
        raise ModelMismatchError(
            f"{lc.path}: the checkpoint has no tensor for {len(missing)} of the model's "
            f"weights (first: {', '.join(repr(n) for n in missing[:3])}); it is for another "
            "model, or incomplete. Check it with `safeshard verify`"
        )
    ignore = _ignored_unexpected(model)
    used = {k for t in out.values() for k in (i.name for i in t.reads)}
    unused = [n for n in lc if n not in used and not any(p.search(n) for p in ignore)]
    if unused:
        raise ModelMismatchError(
            f"{lc.path}: {len(unused)} checkpoint tensor(s) have no place in the model "
            f"(first: {', '.join(repr(n) for n in unused[:3])}); the checkpoint is for "
            "another model or configuration"
        )
    return out


def _fused_tensor(
    lc: LazyCheckpoint,
    name: str,
    f: Fused,
    group: list[str],
    entries: dict[str, tuple[Any, str, bool, Any]],
) -> ModelTensor:
    """The :class:`ModelTensor` of a tensor transformers fuses from several (checked)."""
    torch = import_torch()
    _, _, is_param, t = entries[name]
    shape, _ = f.targets[name]
    if tuple(t.shape) != tuple(shape):
        raise ModelMismatchError(
            f"{lc.path}: transformers makes the model's {name!r} from "
            f"{', '.join(repr(k) for k in f.keys[:3])}{' ...' if len(f.keys) > 3 else ''}, "
            f"which gives shape {list(shape)}, but the model's has shape {list(t.shape)}; the "
            "checkpoint is for another configuration. Build the model from the checkpoint's "
            "config.json (safeshard.empty_model)"
        )
    sources = [lc.info(k) for k in f.keys]
    for i in sources:
        stored = TorchBackend().native_dtype(i.dtype)
        if stored is None or not (
            stored == t.dtype or (stored.is_floating_point and t.dtype.is_floating_point)
        ):
            raise ModelMismatchError(
                f"{lc.path}: tensor {i.name!r} is {i.dtype} in the checkpoint, but the model's "
                f"{name!r} made from it is {t.dtype}; only floating-point tensors are converted"
            )
    placeholder = t if t.device.type == "meta" else t.to("meta")
    if is_param and not isinstance(placeholder, torch.nn.Parameter):
        placeholder = torch.nn.Parameter(placeholder, requires_grad=t.requires_grad)
    return ModelTensor(
        name=name,
        info=sources[0],
        slots=[Slot(entries[n][0], entries[n][1], entries[n][2]) for n in group],
        placeholder=placeholder,
        dtype=t.dtype,
        nbytes=sum(i.nbytes for i in sources) + t.numel() * t.element_size(),
        copy=True,
        fused=f,
        sources=sources,
    )


def init_buffers(model: Any, device: Any) -> None:
    """Compute the non-persistent buffers a meta build left empty (rotary frequencies...)
    with the model's own ``_init_weights``, on ``device`` (None: the CPU).

    A buffer that ``_init_weights`` does not fill is a :class:`UsageError` (it would
    otherwise hold garbage)."""
    torch = import_torch()
    target = device if device is not None else torch.device("cpu")
    todo: list[tuple[Any, str, str]] = []
    for mname, m in model.named_modules():
        for attr, b in list(m._buffers.items()):
            if b is not None and attr in m._non_persistent_buffers_set and b.device.type == "meta":
                todo.append((m, attr, f"{mname}.{attr}" if mname else attr))
    if not todo:
        return
    # each module is initialized by the innermost enclosing model that has _init_weights
    # (a composite model, e.g. LLaVA, holds sub-models with their own), as transformers does
    inits: dict[str, Any] = {}
    for mname, m in model.named_modules():
        fn = getattr(m, "_init_weights", None)
        if callable(fn):
            inits[mname] = fn
    owners: dict[int, tuple[Any, Any]] = {}
    for m, attr, name in todo:
        parts = name.split(".")[:-1]
        enclosing = (".".join(parts[:k]) for k in range(len(parts), -1, -1))
        init = next((inits[p] for p in enclosing if p in inits), None)
        if init is None:
            raise UsageError(
                f"buffer {name} is on the meta device and this model has no _init_weights to "
                "compute it; build the model with real buffers (accelerate's init_empty_weights "
                "keeps them)"
            )
        b = m._buffers[attr]
        fill = float("nan") if b.is_floating_point() else _SENTINEL_INT
        m._buffers[attr] = torch.full(b.shape, fill, dtype=b.dtype, device=target)
        owners[id(m)] = (m, init)
    with torch.no_grad():
        for m, init in owners.values():
            init(m)
    for m, attr, name in todo:
        b = m._buffers[attr]
        bad = torch.isnan(b).any() if b.is_floating_point() else (b == _SENTINEL_INT).any()
        if bool(bad):
            raise UsageError(
                f"buffer {name} is on the meta device and the model's _init_weights does not "
                "compute it; build the model with real buffers"
            )


def gptq_support(model: Any) -> GPTQ | None:
    """How to finish the model's GPTQ modules after each read; None for other models."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return None
    fields = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else {})
    method = str(fields.get("quant_method", "")).lower().rsplit(".", 1)[-1]
    if method != "gptq":
        raise UsageError(
            f"stream() runs plain and GPTQ checkpoints, not quant_method={method or None!r}"
        )
    modules = [m for m in model.modules() if hasattr(m, "qweight") and hasattr(m, "post_init")]
    for m in modules:
        name = type(m).__name__.lower()
        if "exllama" in name or "marlin" in name:
            raise UsageError(
                "stream() supports GPTQ modules that post-initialize on their own "
                f"(backend='gptq_torch'); this model uses {type(m).__name__}"
            )
    fmt = str(fields.get("checkpoint_format") or "gptq").lower()
    convert = None
    if fmt == "gptq" and any(getattr(m, "REQUIRES_FORMAT_V2", False) for m in modules):
        from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

        def convert(m: Any) -> None:
            if getattr(m, "REQUIRES_FORMAT_V2", False):
                convert_gptq_v1_to_v2_format_module(m, bits=m.bits, pack_dtype=m.pack_dtype)

    return GPTQ({id(m) for m in modules}, convert)


def _row_embedding(spec_tensors: list[ModelTensor], users: list[Any], torch: Any) -> Any:
    """The embedding module that can read ``spec_tensors`` row by row, or None."""
    if len(spec_tensors) != 1 or len(users) != 1 or len(spec_tensors[0].slots) != 1:
        return None
    m, t = users[0], spec_tensors[0]
    if (
        isinstance(m, torch.nn.Embedding)
        and type(m).forward is torch.nn.Embedding.forward
        and m.max_norm is None
        and t.slots[0].attr == "weight"
        and t.fused is None
        and len(t.info.shape) == 2
    ):
        return m
    return None


def plan_units(
    model: Any,
    tensors: dict[str, ModelTensor],
    gptq: GPTQ | None,
    *,
    rows: bool = True,
    granularity: Granularity = "block",
) -> list[UnitSpec]:
    """The units to stream, in model order (see the module docstring)."""
    if granularity not in ("block", "module"):
        raise UsageError(f"granularity must be 'block' or 'module', not {granularity!r}")
    torch = import_torch()
    modules: dict[str, Any] = {}
    names_of: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        modules.setdefault(n, m)
        names_of.setdefault(id(m), n)

    def full(slot: Slot) -> str:
        mn = names_of[id(slot.module)]
        return f"{mn}.{slot.attr}" if mn else slot.attr

    def owners(c: str) -> list[Any]:
        out: list[Any] = []
        for s in tensors[c].slots:
            if all(o is not s.module for o in out):
                out.append(s.module)
        return out

    by_model = {full(t.slots[0]): t.name for t in tensors.values()}
    raw: list[tuple[str, list[str], list[Any]]] = []  # key, checkpoint names, users
    loose: dict[tuple[int, ...], int] = {}
    for g in group_tensors(model_order(list(by_model))):
        cnames = [by_model[n] for n in g.tensors]
        block = modules.get(g.key) if g.kind == "block" and granularity == "block" else None
        if block is not None:
            users = [block]
            for c in cnames:
                for o in owners(c):
                    on = names_of[id(o)]
                    inside = on == g.key or on.startswith(g.key + ".")
                    if not inside and all(u is not o for u in users):
                        users.append(o)
            raw.append((g.key, cnames, users))
            continue
        for c in cnames:
            own = owners(c)
            ident = tuple(sorted(id(o) for o in own))
            if ident in loose:
                raw[loose[ident]][1].append(c)
            else:
                loose[ident] = len(raw)
                raw.append((names_of[id(own[0])] or "(model)", [c], own))
    user_names = [[names_of[id(u)] for u in users] for _, _, users in raw]
    taken: dict[str, int] = {}
    specs: list[UnitSpec] = []
    for k, (key, cnames, users) in enumerate(raw):
        if key in taken:
            taken[key] += 1
            key = f"{key}#{taken[key]}"
        else:
            taken[key] = 0
        pinned = any(
            n != o and (n == "" or o.startswith(n + "."))
            for j, others in enumerate(user_names)
            if j != k
            for o in others
            for n in user_names[k]
        )
        ts = [tensors[c] for c in cnames]
        quant: list[Any] = []
        if gptq is not None:
            for t in ts:
                for s in t.slots:
                    if id(s.module) not in gptq.modules:
                        continue
                    if all(q is not s.module for q in quant):
                        quant.append(s.module)
                    if gptq.convert is not None and s.attr == "qzeros":
                        t.copy = True
                        t.gptq_module = s.module
                        t.nbytes = 2 * t.info.nbytes
        row_module = _row_embedding(ts, users, torch) if rows and not pinned else None
        unit = Unit(
            key=key,
            nbytes=sum(t.nbytes for t in ts),
            index=k,
            pinned=pinned,
            rows=row_module is not None,
        )
        specs.append(UnitSpec(unit=unit, tensors=ts, users=users, quant=quant, rows=row_module))
    return specs
