"""Tensor-parallel slices: which part of each tensor a rank holds, and its byte ranges.

This module is the plan and the arithmetic, with no torch: given a tensor-parallel plan
in transformers' vocabulary, a rank and a world size, :meth:`RankPlan.slice_of` says
which part of each stored tensor the rank holds, and :func:`byte_ranges` /
:func:`coalesce` turn that part into the few reads that fetch it. The reading itself is
:mod:`safeshard.runtime.tpread`; :func:`safeshard.load` and :func:`safeshard.open` take
``tp_plan``, ``rank`` and ``world_size`` and return each rank's slices.

*Plans.* A plan maps name patterns to styles, as ``base_model_tp_plan`` and
``_tp_plan`` do in transformers (``"layers.*.self_attn.q_proj": "colwise"``). A key
matches a tensor when it equals the tensor's name or its module's name, after any
prefix (``model.``), with ``*`` standing for one name component (a layer number); the
longest matching key wins. ``tp_plan="auto"`` asks transformers for the model class's
own plan (its ``tp_plan``: ``base_model_tp_plan`` under the base model's prefix plus the
CausalLM class's ``_tp_plan`` for ``lm_head``) from ``config.json``.

*Styles* and what they do to stored tensors, exactly as transformers' shard-on-read does
(:class:`transformers.distributed.sharding_utils.DtensorShardOperation`):

- ``colwise``, ``colwise_rep``, ``colwise_gather_output``: a weight ``[out, in]`` is split
  along ``out`` (dim ``ndim-2``), its bias too;
- ``rowwise``, ``rowwise_split_input``, ``rowwise_rep``: a weight is split along its last
  dim (``in``); the bias is replicated;
- ``embedding_rowwise`` (vocab-parallel) splits dim 0, ``embedding_colwise`` dim 1;
- ``packed_colwise`` / ``packed_rowwise``: fused weights (gate/up) split by sections: dim
  ``ndim-2`` (resp. the last) is cut into 2 equal sections, each section split across
  the ranks, and the rank's pieces concatenated (``_StridedShard(split_factor=2)``);
- ``replicate`` and the styles that install forward hooks only (``sequence_parallel``,
  ``all_reduce``, ``moe_tp_experts``, ...): every rank gets the whole tensor.

A split is torch's ``chunk`` (and DTensor ``Shard``): ranks get ``ceil(n / world_size)``
rows each, the last ones fewer (possibly none).

safeshard adds two things transformers lacks for stored weights:

- ``qkv_colwise``: a fused QKV projection (Phi-3 ``qkv_proj``) split by sections of
  unequal size (``heads × head_dim``, ``kv_heads × head_dim`` twice) by whole heads, so a
  rank's q, k and v heads belong together (transformers' own Phi-3 plan splits the fused
  rows as one block and gathers the output instead);
- grouped-query attention: with fewer key/value heads than ranks, a ``colwise`` ``k_proj``
  / ``v_proj`` (and the k and v sections of ``qkv_colwise``) give each rank whole heads,
  each head replicated on ``world_size / kv_heads`` ranks (the layout vLLM uses);
  transformers would cut a head in pieces. This needs the model's head counts: from
  ``config.json`` beside the checkpoint, or ``tp_config``.

*GPTQ.* A GPTQ module (``qweight [in·b/32, out]``, ``qzeros [in/g, out·b/32]``,
``scales [in/g, out]``, ``g_idx [in]``, ``bias [out]``) is sliced consistently: colwise
along ``out`` (``qweight``, ``scales`` and ``bias`` by feature, ``qzeros`` by packed
word; ``g_idx`` replicated), rowwise along ``in`` (``qweight`` by packed word, ``scales``
and ``qzeros`` by group, ``g_idx`` by feature; ``bias`` replicated; with act-order
``desc_act``, ``scales`` and ``qzeros`` are replicated since any row may use any group). A
split that cuts a group or a packed word is refused with :class:`TensorParallelError`
naming the tensor and the compatible world sizes.

*Reads.* A split along dim 0 is one contiguous byte range; a split along a later dim is
one range per outer row. :func:`coalesce` reads through a gap between two ranges of one
tensor when the gap is at most ``gap`` bytes (the gap floor: :data:`LOCAL_GAP` for local
files, :data:`REMOTE_GAP` for object storage) and the tensor's reads stay within
:data:`OVERREAD` (2×) its slice bytes, bridging the smallest gaps first. So the bytes a
rank reads for a tensor are at most ``OVERREAD ×`` its slice, and exactly the slice for
dim-0 splits.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeshard.checkpoint import quant_configs, read_json_file
from safeshard.errors import MissingExtraError, TensorParallelError, UsageError
from safeshard.format.header import DTYPE_BITS, TensorInfo
from safeshard.format.quant import config_settings
from safeshard.io.ranges import coalesce as ranges_coalesce

__all__ = [
    "LOCAL_GAP",
    "OVERREAD",
    "REMOTE_GAP",
    "Plan",
    "RankPlan",
    "ReadStats",
    "TensorSlice",
    "auto_plan",
    "byte_ranges",
    "chunk",
    "coalesce",
    "resolve_rank",
    "row_extent",
]

OVERREAD = 2.0
"""Most bytes read for one tensor's slice, as a multiple of the slice's bytes."""

LOCAL_GAP = 1024
"""Largest gap read through between two ranges of a local file (the gap floor): a read
call costs about as much as copying a kilobyte, so bigger gaps are not worth reading."""

REMOTE_GAP = 4 * 1024 * 1024
"""Largest gap read through between two ranges of an object in storage: a ranged GET
costs milliseconds, so bigger gaps are worth reading through (still within OVERREAD)."""

COLWISE = frozenset({"colwise", "colwise_rep", "colwise_gather_output"})
ROWWISE = frozenset({"rowwise", "rowwise_split_input", "rowwise_rep"})
EMBEDDING = {"embedding_rowwise": 0, "embedding_colwise": 1}
PACKED = frozenset({"packed_colwise", "packed_rowwise"})
REPLICATED = frozenset(
    {
        "replicate",
        "sequence_parallel",
        "replicated_with_grad_allreduce",
        "mla_kv_a_proj",
        "all_reduce",
        "moe_tp_experts",
        "moe_identity_expert",
        "local_params",
        "isolated",
        "gather",
    }
)
QKV = "qkv_colwise"
STYLES = COLWISE | ROWWISE | frozenset(EMBEDDING) | PACKED | REPLICATED | {QKV}
"""Every style a plan may name."""

KV_PROJECTIONS = ("k_proj", "v_proj")
"""Module names of separate key/value projections (sliced by whole kv heads)."""

GPTQ_MEMBERS = ("qweight", "qzeros", "scales", "g_idx")


# --------------------------------------------------------------------------- rank


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the integers given, or torch.distributed's when a process
    group is initialized and they are left out."""
    if rank is None or world_size is None:
        dist = _initialized_dist()
        if dist is None:
            raise UsageError(
                "tp_plan needs rank and world_size: pass both as integers, or initialize "
                "torch.distributed (init_process_group) first"
            )
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    for what, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise UsageError(f"{what} must be an integer, not {v!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(
            f"rank must be in 0..world_size-1; got rank={rank}, world_size={world_size}"
        )
    return rank, world_size


def _initialized_dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def chunk(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s chunk of ``size`` rows: torch.chunk / DTensor
    ``Shard`` (``ceil(size / world_size)`` each, the last ranks fewer or none)."""
    step = -(-size // world_size)
    start = min(rank * step, size)
    return start, min(start + step, size)


# --------------------------------------------------------------------------- plans


class Plan:
    """Name patterns -> styles (see the module docs for matching and styles)."""

    def __init__(self, rules: Mapping[str, str]) -> None:
        if not isinstance(rules, Mapping):
            raise UsageError(
                f"tp_plan must be a mapping of name patterns to styles or 'auto', not {rules!r}"
            )
        self.rules = dict(rules)
        self._compiled: list[tuple[int, str, re.Pattern[str]]] = []
        for key, style in self.rules.items():
            if style not in STYLES:
                raise UsageError(
                    f"tp_plan[{key!r}] = {style!r} is not a style safeshard knows; use one of "
                    + ", ".join(sorted(STYLES))
                )
            body = r"[^.]+".join(re.escape(p) for p in key.split("*"))
            self._compiled.append((len(key), key, re.compile(rf"(?:.+\.)?{body}")))
        self._compiled.sort(key=lambda c: -c[0])

    def match(self, name: str) -> tuple[str, str] | None:
        """``(key, style)`` of the rule for tensor ``name``, or None. A rule for the tensor
        itself wins over one for its module; among those, the longest key."""
        module = name.rsplit(".", 1)[0] if "." in name else None
        for candidate in (name, module):
            if candidate is None:
                continue
            for _, key, rx in self._compiled:
                if rx.fullmatch(candidate):
                    return key, self.rules[key]
        return None


def auto_plan(folder: str | os.PathLike[str] | Any) -> dict[str, str]:
    """The tensor-parallel plan transformers uses for the model in ``folder`` (its
    ``config.json``): the model class's ``tp_plan``, built on the meta device."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MissingExtraError(
            f"tp_plan='auto' reads the model's plan through transformers, which is not "
            f"installed ({e}); run: pip install transformers, or pass the plan as a dict"
        ) from None
    cfg = _read_config(folder)
    if cfg is None:
        raise UsageError(
            f"{folder}: tp_plan='auto' needs the model's config.json beside the weights; "
            "pass the plan as a dict instead"
        )
    config = transformers.AutoConfig.for_model(**cfg)
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    plan: dict[str, str] = {}
    if cls is not None:
        model = None
        few = _one_layer(cfg)
        if few is not None:
            # the plan is the classes' and the config's, gathered over the model's
            # submodels: the same with one layer as with all, and built 3x faster
            with contextlib.suppress(Exception):
                model = _on_meta(torch, cls, transformers.AutoConfig.for_model(**few))
        if model is None:
            model = _on_meta(torch, cls, config)
        plan = dict(getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {})
    if not plan:
        plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not plan:
        raise UsageError(
            f"{folder}: transformers has no tensor-parallel plan for "
            f"{arch or cfg.get('model_type')!r}; pass the plan as a dict"
        )
    return plan


def _on_meta(torch: Any, cls: Any, config: Any) -> Any:
    """``cls(config)`` on the meta device. (transformers' ``no_init_weights`` would save
    another millisecond, but it swaps ``torch.nn.init``'s functions process-wide, under any
    other thread building a model.)"""
    with torch.device("meta"):
        return cls(config)


def _one_layer(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """``cfg`` with ``num_hidden_layers`` 1, here and in the sub-configs it holds (a
    list with one entry per layer cut to its first), or None if it names no layer count
    above 1."""

    def cut(d: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        out, changed = dict(d), False
        n = d.get("num_hidden_layers")
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            for k, v in d.items():
                if isinstance(v, list) and len(v) == n:
                    out[k] = v[:1]
            out["num_hidden_layers"], changed = 1, True
        for k, v in d.items():
            if isinstance(v, Mapping) and k != "quantization_config":
                out[k], sub = cut(v)
                changed = changed or sub
        return out, changed

    few, changed = cut(cfg)
    return few if changed else None


def _read_config(folder: Any) -> dict[str, Any] | None:
    p = folder / "config.json" if hasattr(folder, "joinpath") else Path(folder) / "config.json"
    return read_json_file(p)


# --------------------------------------------------------------------------- slices


@dataclass(frozen=True)
class TensorSlice:
    """A rank's part of one tensor: rows ``intervals`` of dim ``dim`` (in stored units),
    concatenated; ``dim`` None means the whole tensor."""

    name: str
    dtype: str
    full_shape: tuple[int, ...]
    dim: int | None
    intervals: tuple[tuple[int, int], ...]
    style: str = "replicate"

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        s = list(self.full_shape)
        s[self.dim] = sum(b - a for a, b in self.intervals)
        return tuple(s)

    @property
    def nbytes(self) -> int:
        n = DTYPE_BITS[self.dtype]
        for d in self.shape:
            n *= d
        return n // 8

    @property
    def whole(self) -> bool:
        return self.dim is None or self.intervals == ((0, self.full_shape[self.dim]),)


@dataclass
class ReadStats:
    """What a rank's reads did: bytes read (gaps read through included), the bytes of the
    slices, reads issued, and the same per tensor."""

    bytes_read: int = 0
    slice_bytes: int = 0
    reads: int = 0
    tensors: dict[str, tuple[int, int]] = field(default_factory=dict)
    """name -> (bytes read, slice bytes)."""

    def note(self, name: str, read: int, useful: int, reads: int) -> None:
        self.bytes_read += read
        self.slice_bytes += useful
        self.reads += reads
        self.tensors[name] = (read, useful)


@dataclass(frozen=True)
class Heads:
    """Attention head counts, for head-aware splits."""

    heads: int
    kv_heads: int
    head_dim: int


@dataclass
class GPTQ:
    """GPTQ settings of a checkpoint, as far as slicing needs them."""

    desc_act: bool = False


class RankPlan:
    """A plan resolved for one rank: :meth:`slice_of` gives each tensor's slice."""

    def __init__(
        self,
        plan: Plan,
        rank: int,
        world_size: int,
        *,
        heads: Heads | None = None,
        gptq: GPTQ | None = None,
        tensors: Mapping[str, TensorInfo] | None = None,
        where: str = "",
    ) -> None:
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.heads = heads
        self.gptq = gptq or GPTQ()
        self.tensors = dict(tensors or {})
        self.where = where

    @classmethod
    def build(
        cls,
        tp_plan: Mapping[str, str] | str,
        rank: int | None,
        world_size: int | None,
        *,
        folder: Any,
        tensors: Mapping[str, TensorInfo],
        metadata: Mapping[str, str] | None = None,
        tp_config: Mapping[str, Any] | None = None,
        where: str = "",
    ) -> RankPlan:
        """Resolve ``tp_plan`` ("auto" or a mapping) for ``rank`` of ``world_size``
        (torch.distributed's when None), with the head counts from ``tp_config`` or the
        ``config.json`` in ``folder``, and GPTQ's ``desc_act`` from its configs."""
        r, ws = resolve_rank(rank, world_size)
        if isinstance(tp_plan, str):
            if tp_plan != "auto":
                raise UsageError(
                    f"tp_plan must be 'auto' or a mapping of patterns to styles, not {tp_plan!r}"
                )
            rules = auto_plan(folder)
        else:
            rules = dict(tp_plan)
        cfg = dict(tp_config) if tp_config is not None else (_read_config(folder) or {})
        heads = _heads_of(cfg)
        desc = False
        try:
            settings, _ = config_settings(quant_configs(folder), metadata)
            desc = any(bool(s.desc_act) for s in settings)
        except Exception:  # unreadable configs: no act-order
            desc = False
        if "desc_act" in cfg:
            desc = bool(cfg["desc_act"])
        return cls(Plan(rules), r, ws, heads=heads, gptq=GPTQ(desc), tensors=tensors, where=where)

    # ------------------------------------------------------------------ slicing

    def slice_of(self, info: TensorInfo) -> TensorSlice:
        """The rank's slice of ``info``; :class:`TensorParallelError` if the split would
        cut a GPTQ group or packed word, or a head where heads must stay whole."""
        m = self.plan.match(info.name)
        style = m[1] if m is not None else "replicate"
        whole = TensorSlice(info.name, info.dtype, info.shape, None, (), style)
        if style in REPLICATED or not info.shape or self.world_size == 1:
            return whole
        member = info.name.rsplit(".", 1)[-1]
        module = info.name.rsplit(".", 1)[0] if "." in info.name else ""
        gptq = self._gptq_members(module)
        if gptq is not None and member in (*GPTQ_MEMBERS, "bias"):
            return self._gptq_slice(info, style, member, module, gptq)
        n = len(info.shape)
        if style in COLWISE:
            dim = 0 if (member == "bias" or n == 1) else n - 2
            return self._split(info, style, dim, kv=self._is_kv(module))
        if style in ROWWISE:
            if member == "bias":
                return whole
            return self._split(info, style, n - 1)
        if style in EMBEDDING:
            dim = EMBEDDING[style]
            if dim >= n:
                return whole
            return self._split(info, style, dim)
        if style in PACKED:
            if n == 1:
                return whole if style == "packed_rowwise" else self._split(info, style, 0)
            dim = n - 2 if style == "packed_colwise" else n - 1
            size = info.shape[dim]
            sec = -(-size // 2)
            return self._sections(info, style, dim, [(0, min(sec, size)), (min(sec, size), size)])
        # qkv_colwise
        dim = 0 if (member == "bias" or n == 1) else n - 2
        return self._qkv(info, dim)

    def _is_kv(self, module: str) -> bool:
        return module.rsplit(".", 1)[-1] in KV_PROJECTIONS

    def _rows(self, info: TensorInfo, size: int, kv: bool, unit: int = 1) -> tuple[int, int]:
        """The rank's ``[start, stop)`` of ``size`` logical rows; whole kv heads when ``kv``
        and there are fewer kv heads than ranks."""
        h = self.heads
        if kv and h is not None and h.kv_heads < self.world_size:
            if size != h.kv_heads * h.head_dim or self.world_size % h.kv_heads:
                raise TensorParallelError(
                    f"{self.where}: tensor {info.name!r}: {h.kv_heads} key/value heads cannot be "
                    f"replicated evenly over world_size={self.world_size} ranks (or its "
                    f"{size} rows are not {h.kv_heads} heads of {h.head_dim}); use a world size "
                    f"that divides or is a multiple of {h.kv_heads}"
                )
            head = self.rank * h.kv_heads // self.world_size
            return head * h.head_dim, (head + 1) * h.head_dim
        return chunk(size, self.world_size, self.rank)

    def _split(self, info: TensorInfo, style: str, dim: int, kv: bool = False) -> TensorSlice:
        a, b = self._rows(info, info.shape[dim], kv)
        return TensorSlice(info.name, info.dtype, info.shape, dim, ((a, b),), style)

    def _sections(
        self,
        info: TensorInfo,
        style: str,
        dim: int,
        sections: Sequence[tuple[int, int]],
        kv: Sequence[bool] = (),
    ) -> TensorSlice:
        parts: list[tuple[int, int]] = []
        for k, (s0, s1) in enumerate(sections):
            if s1 <= s0:
                continue
            a, b = self._rows(info, s1 - s0, bool(kv[k]) if k < len(kv) else False)
            if b > a:
                parts.append((s0 + a, s0 + b))
        return TensorSlice(info.name, info.dtype, info.shape, dim, tuple(_merge(parts)), style)

    def _qkv(self, info: TensorInfo, dim: int) -> TensorSlice:
        h = self.heads
        size = info.shape[dim]
        if h is None or size != (h.heads + 2 * h.kv_heads) * h.head_dim:
            raise TensorParallelError(
                f"{self.where}: tensor {info.name!r} is planned {QKV!r}, which needs the head "
                f"counts (num_attention_heads, num_key_value_heads, head_dim) from config.json "
                f"or tp_config, matching its {size} fused rows"
                + (f" (they give {(h.heads + 2 * h.kv_heads) * h.head_dim})" if h else "")
            )
        q, kv = h.heads * h.head_dim, h.kv_heads * h.head_dim
        self._check_heads(info, h.heads, "query")
        if h.kv_heads >= self.world_size:
            self._check_heads(info, h.kv_heads, "key/value")
        secs = [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
        return self._sections(info, QKV, dim, secs, kv=(False, True, True))

    def _check_heads(self, info: TensorInfo, heads: int, what: str) -> None:
        if heads % self.world_size:
            ok = [w for w in range(1, heads + 1) if heads % w == 0]
            raise TensorParallelError(
                f"{self.where}: tensor {info.name!r}: {heads} {what} heads do not split evenly "
                f"over world_size={self.world_size}; compatible world sizes: "
                + ", ".join(map(str, ok))
            )

    # ------------------------------------------------------------------ GPTQ

    def _gptq_members(self, module: str) -> dict[str, TensorInfo] | None:
        qw = self.tensors.get(f"{module}.qweight")
        if qw is None or len(qw.shape) != 2:
            return None
        return {
            m: t
            for m in (*GPTQ_MEMBERS, "bias")
            if (t := self.tensors.get(f"{module}.{m}")) is not None
        }

    def _gptq_slice(
        self,
        info: TensorInfo,
        style: str,
        member: str,
        module: str,
        members: Mapping[str, TensorInfo],
    ) -> TensorSlice:
        whole = TensorSlice(info.name, info.dtype, info.shape, None, (), style)
        qw = members["qweight"]
        out = qw.shape[1]
        gi = members.get("g_idx")
        sc = members.get("scales")
        qz = members.get("qzeros")
        if qz is not None and len(qz.shape) == 2 and qz.shape[1] and (qz.shape[1] * 32) % out == 0:
            bits = qz.shape[1] * 32 // out
        elif gi is not None:
            bits = qw.shape[0] * 32 // gi.shape[0]
        else:
            bits = 4
        pack = 32 // bits if bits in (2, 4, 8) else 1
        n_in = gi.shape[0] if gi is not None else qw.shape[0] * pack
        groups = sc.shape[0] if sc is not None and len(sc.shape) == 2 else 1
        group = -(-n_in // groups) if groups else n_in
        if style not in COLWISE and style not in ROWWISE:
            raise TensorParallelError(
                f"{self.where}: tensor {info.name!r} belongs to a GPTQ module planned "
                f"{style!r}; GPTQ modules split only colwise or rowwise (or are replicated): "
                "plan the fused projection 'replicate' or split it before quantizing"
            )
        colwise = style in COLWISE
        kv = self._is_kv(module)
        if colwise:
            if member == "g_idx":
                return whole
            unit = pack if member == "qzeros" else 1
            dim = 0 if member == "bias" else 1
            what = f"a packed word of {pack} output features" if unit > 1 else ""
            return self._gptq_dim(info, style, dim, out, unit, what, kv)
        # rowwise: split the input features
        if member == "bias":
            return whole
        if member in ("scales", "qzeros"):
            if self.gptq.desc_act:
                return whole
            return self._gptq_dim(
                info, style, 0, n_in, group, f"a GPTQ group of {group} input features"
            )
        if member == "qweight":
            return self._gptq_dim(
                info, style, 0, n_in, pack, f"a packed word of {pack} input features"
            )
        # g_idx: one entry per input feature; the rank's features must still be whole
        # groups (without act-order) and whole packed words of qweight
        if not self.gptq.desc_act:
            self._gptq_dim(info, style, 0, n_in, group, f"a GPTQ group of {group} input features")
        self._gptq_dim(info, style, 0, n_in, pack, f"a packed word of {pack} input features")
        return self._gptq_dim(info, style, 0, n_in, 1, "")

    def _gptq_dim(
        self,
        info: TensorInfo,
        style: str,
        dim: int,
        logical: int,
        unit: int,
        what: str,
        kv: bool = False,
    ) -> TensorSlice:
        a, b = self._rows(info, logical, kv)
        if unit > 1 and (a % unit or (b % unit and b != logical)):
            ok = compatible_world_sizes(logical, unit)
            smallest = next((w for w in ok if w > 1), None)
            raise TensorParallelError(
                f"{self.where}: tensor {info.name!r}: world_size={self.world_size} gives rank "
                f"{self.rank} features {a}..{b - 1} of {logical}, which splits {what}; "
                f"compatible world sizes: {', '.join(map(str, ok))}"
                + (f" (smallest above 1: {smallest})" if smallest else "")
            )
        return TensorSlice(
            info.name, info.dtype, info.shape, dim, ((a // unit, -(-b // unit)),), style
        )


def compatible_world_sizes(logical: int, unit: int, limit: int = 1024) -> list[int]:
    """World sizes whose chunks of ``logical`` features start and end on whole units."""
    ok = []
    for w in range(1, min(limit, max(1, logical)) + 1):
        step = -(-logical // w)
        if step % unit == 0 or w == 1:
            ok.append(w)
    return ok


def _heads_of(cfg: Mapping[str, Any]) -> Heads | None:
    text = cfg.get("text_config")
    if isinstance(text, Mapping) and "num_attention_heads" not in cfg:
        cfg = text
    heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    if not isinstance(heads, int) or heads < 1:
        return None
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim")
    if not isinstance(hd, int) or hd < 1:
        if not isinstance(hidden, int) or hidden % heads:
            return None
        hd = hidden // heads
    if not isinstance(kv, int) or kv < 1:
        return None
    return Heads(heads, kv, hd)


def _merge(parts: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in parts:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


# --------------------------------------------------------------------------- bytes


def byte_ranges(sl: TensorSlice) -> list[tuple[int, int]]:
    """``(offset, length)`` of the slice's bytes inside the tensor's bytes, in order; the
    slice is their concatenation. Adjacent ranges are merged."""
    dim = sl.dim
    if dim is None or sl.whole:
        return [(0, sl.nbytes)] if sl.nbytes else []
    shape = sl.full_shape
    inner = _whole_bytes(sl)
    for d in shape[dim + 1 :]:
        inner *= d
    outer = 1
    for d in shape[:dim]:
        outer *= d
    row = shape[dim] * inner
    out: list[tuple[int, int]] = []
    for o in range(outer):
        base = o * row
        for a, b in sl.intervals:
            if b <= a:
                continue
            off, n = base + a * inner, (b - a) * inner
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((off, n))
    return out


def row_extent(sl: TensorSlice) -> tuple[int, int] | None:
    """For a slice with a range in every outer row (split along a dim after the first,
    not whole: :func:`byte_ranges` would list one or more ranges per row), the offsets of
    its first byte and of the end of its last byte inside the tensor's bytes; None for any
    other slice. Constant time, where listing the ranges costs one tuple per row."""
    dim = sl.dim
    if dim is None or sl.whole or dim == 0:
        return None
    item = _whole_bytes(sl)
    inner = item
    for d in sl.full_shape[dim + 1 :]:
        inner *= d
    outer = 1
    for d in sl.full_shape[:dim]:
        outer *= d
    spans = [(a, b) for a, b in sl.intervals if b > a]
    if outer < 2 or not spans:
        return None
    row = sl.full_shape[dim] * inner
    return spans[0][0] * inner, (outer - 1) * row + spans[-1][1] * inner


def _whole_bytes(sl: TensorSlice) -> int:
    """Bytes of one element of ``sl``; a sub-byte dtype cannot be sliced."""
    if sl.dtype not in DTYPE_BITS or DTYPE_BITS[sl.dtype] % 8:
        raise TensorParallelError(
            f"tensor {sl.name!r} has dtype {sl.dtype}, whose elements are not whole bytes; "
            "it can only be replicated (plan it 'replicate')"
        )
    return DTYPE_BITS[sl.dtype] // 8


def coalesce(
    ranges: Sequence[tuple[int, int]], *, gap: int, overread: float = OVERREAD
) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Group ``ranges`` (sorted, disjoint ``(offset, length)``) into reads.

    Each read is ``(offset, length, pieces)`` where ``pieces`` are the ``(offset, length)``
    ranges it covers. A gap is read through when it is at most ``gap`` bytes, smallest
    gaps first, as long as all reads together stay within ``overread ×`` the ranges'
    bytes (the one coalescer, :func:`safeshard.io.ranges.coalesce`)."""
    useful = sum(n for _, n in ranges)
    runs = ranges_coalesce(ranges, gap=gap, allowance=int((overread - 1.0) * useful))
    return [(r.offset, r.length, [ranges[i] for i, _, _ in r.parts]) for r in runs]
