"""Mixture-of-experts models streamed by expert: only the experts the router picks are read.

transformers 5 holds a MoE layer's experts as fused 3-D parameters
(``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``) and calls the
experts module as ``experts(hidden_states, top_k_index, top_k_weights)``. Streamed by
block, every token would read all ``E`` experts of every layer; here an expert is the unit:

- *Sources.* Expert ``e`` of a layer is either a set of per-expert checkpoint tensors
  (a Hub checkpoint: ``experts.3.w1.weight``..., fused by transformers' own converter, see
  :mod:`safeshard.runtime.convert`) or row ``e`` of a fused checkpoint tensor (a byte range).
- *The call.* A pre-hook on the experts module reads the experts ``top_k_index`` names
  (those not cached), builds the fused parameters for just those experts (the converter
  run on them, or the rows), installs them, renumbers ``top_k_index`` into them and sets
  ``num_experts`` to their count for the call; a post-hook puts the meta placeholders back.
  Experts are processed in the same order, so outputs are ``torch.equal`` to the full model.
- *The cache.* Read experts stay mapped in an expert cache, evicted by a decayed use count
  (frequency-aware: an expert's count halves every ``half_life`` passes; ties go to the
  least recently used). Its bytes and the per-call copies are reserved in the model's
  :class:`~safeshard.runtime.residency.Residency`, within the same hard budget.
- *Prefetch by popularity.* After a layer's experts run, a reader thread reads the most
  popular experts of the next MoE layer that are not cached (as many as the router picks
  per token), where that fits without evicting a more popular expert.

Everything else (attention, router, shared experts) stays in its block's unit.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from safeshard.format.header import TensorInfo
from safeshard.io.bytesrc import Extent
from safeshard.runtime.mapped import MappedShards
from safeshard.runtime.modelmap import ModelTensor
from safeshard.runtime.prefetch import Engine

__all__ = ["ExpertLayer", "ExpertStats", "ExpertStore", "find_expert_layers"]

HALF_LIFE = 8
"""Passes after which an expert's use count has halved."""


@dataclass
class ExpertStats:
    """What the expert cache did (see :attr:`safeshard.runtime.stream.StreamStats.experts`)."""

    calls: int = 0
    """Calls of MoE experts modules."""
    used: int = 0
    """Experts used, summed over calls."""
    hits: int = 0
    """Of which found in the cache (or read ahead)."""
    reads: int = 0
    bytes_read: int = 0
    prefetched: int = 0
    """Experts read ahead by popularity."""
    prefetch_used: int = 0
    """Of which used before eviction."""
    evictions: int = 0


@dataclass
class ExpertLayer:
    """One MoE experts module and where each expert's bytes are."""

    key: str
    module: Any
    index: int
    num: int
    tensors: list[ModelTensor]
    top_k: int
    expert_infos: list[list[TensorInfo]] = field(default_factory=list)
    """Per expert, the per-expert checkpoint tensors (fused sources)."""
    row_tensors: list[ModelTensor] = field(default_factory=list)
    """Tensors stored fused (``[E, ...]``) in the checkpoint: expert ``e`` is row ``e``."""
    expert_bytes: int = 0
    """Bytes mapped per expert."""
    copy_bytes: int = 0
    """Bytes of the per-call fused copy, per expert."""


def _experts_module(m: Any) -> bool:
    n = getattr(m, "num_experts", None)
    gu = m._parameters.get("gate_up_proj")
    dp = m._parameters.get("down_proj")
    return (
        isinstance(n, int)
        and n > 0
        and gu is not None
        and dp is not None
        and gu.dim() == 3
        and dp.dim() == 3
        and gu.shape[0] == n
        and dp.shape[0] == n
    )


def find_expert_layers(model: Any, tensors: dict[str, ModelTensor]) -> list[ExpertLayer]:
    """The model's MoE experts modules whose tensors can be read by expert, in model order;
    their tensors are taken out of ``tensors`` (they are not part of any block's unit)."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)
    cfg = text() if callable(text) else config
    top_k = int(getattr(cfg, "num_experts_per_tok", 0) or 0) or 1
    owner: dict[tuple[int, str], str] = {}
    for name, t in tensors.items():
        for s in t.slots:
            owner[(id(s.module), s.attr)] = name
    layers: list[ExpertLayer] = []
    for mname, m in model.named_modules():
        if not _experts_module(m):
            continue
        n = m.num_experts
        attrs = [a for a, p in m._parameters.items() if p is not None]
        names = [owner.get((id(m), a)) for a in attrs]
        if any(x is None for x in names):
            continue
        ts = [tensors[x] for x in names if x is not None]
        if any(len(t.slots) != 1 for t in ts):
            continue
        layer = ExpertLayer(key=mname, module=m, index=len(layers), num=n, tensors=ts, top_k=top_k)
        ok = True
        infos: list[list[TensorInfo]] = [[] for _ in range(n)]
        seen: set[int] = set()
        for t in ts:
            f = t.fused
            if f is not None:
                if not f.merged or f.num_items != n or any(len(v) != n for v in f.sources.values()):
                    ok = False
                    break
                if id(f) in seen:
                    continue
                seen.add(id(f))
                by_name = {i.name: i for i in t.sources}
                for ks in f.sources.values():
                    for e, k in enumerate(ks):
                        infos[e].append(by_name[k])
            elif len(t.info.shape) >= 1 and t.info.shape[0] == n and not t.copy:
                layer.row_tensors.append(t)
            else:
                ok = False
                break
        if not ok:
            continue
        layer.expert_infos = infos
        layer.expert_bytes = sum(i.nbytes for i in infos[0]) + sum(
            t.info.nbytes // n for t in layer.row_tensors
        )
        layer.copy_bytes = (
            sum(t.placeholder.numel() * t.placeholder.element_size() for t in ts) // n
        )
        layers.append(layer)
        for x in names:
            if x is not None:
                del tensors[x]
    return layers


class _Entry:
    __slots__ = ("extents", "future", "last", "prefetched", "users")

    def __init__(self, extents: list[Extent]) -> None:
        self.extents = extents
        self.future: Future[None] | None = None
        self.last = 0
        self.users = 0
        self.prefetched = False


class ExpertStore:
    """The experts of a streamed model, read by expert into a frequency-aware cache."""

    def __init__(
        self,
        model: Any,
        layers: Sequence[ExpertLayer],
        maps: MappedShards,
        engine: Engine,
        reserve: int | None,
        *,
        device: Any = None,
        prefetch: bool = True,
    ) -> None:
        import torch

        self.torch = torch
        self._model = weakref.ref(model)
        self.layers = list(layers)
        self.by_module = {id(x.module): x for x in self.layers}
        self.maps = maps
        self.engine = engine
        self.res = engine.res
        self.reserve = reserve
        """Bytes the cache and the per-call copies may hold (None: no bound)."""
        self.device = device
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.cached_bytes = 0
        self.clock = 0
        self.decay = 0.5 ** (1.0 / HALF_LIFE)
        self.stats = ExpertStats()
        self.lock = threading.RLock()
        self._active: dict[int, tuple[int, list[int]]] = {}
        self._copy_held = 0
        self.popularity: dict[int, list[float]] = {x.index: [0.0] * x.num for x in self.layers}
        """Per layer, each expert's decayed use count."""
        self._pool = ThreadPoolExecutor(1, "safeshard-experts") if prefetch else None
        self._closed = False

    @staticmethod
    def floor(layers: Sequence[ExpertLayer]) -> int:
        """Bytes one call may need at most: the copy of every expert of a layer, and one
        expert's pages."""
        return max((x.copy_bytes * x.num + x.expert_bytes for x in layers), default=0)

    # ------------------------------------------------------------------ bytes

    def _extents(self, layer: ExpertLayer, e: int) -> list[Extent]:
        out = [self.maps.extent(i) for i in layer.expert_infos[e]]
        for t in layer.row_tensors:
            span = self.maps.extent(t.info)
            rb = t.info.nbytes // layer.num
            out.append(Extent(span.source, span.offset + e * rb, rb, t.name))
        return out

    def _room(self, nbytes: int, protect: set[tuple[int, int]], *, min_score: float | None) -> bool:
        """Evict cached experts (lowest score first, not in ``protect``) until ``nbytes``
        more fit in the reserve; with ``min_score``, only ones scoring below it.
        (lock held)"""
        if self.reserve is None:
            return True
        while self.cached_bytes + self._copy_held + nbytes > self.reserve:
            victims = [
                (self.popularity[k[0]][k[1]], ent.last, k)
                for k, ent in self.entries.items()
                if k not in protect and ent.users == 0 and ent.future is None
            ]
            if min_score is not None:
                victims = [v for v in victims if v[0] < min_score]
            if not victims:
                return False
            _, _, k = min(victims)
            self._evict(k)
        return True

    def _evict(self, k: tuple[int, int]) -> None:
        ent = self.entries.pop(k)
        layer = self.layers[k[0]]
        self.maps.release(ent.extents)
        self.cached_bytes -= layer.expert_bytes
        self.res.unreserve(layer.expert_bytes)
        self.stats.evictions += 1

    def _take(self, nbytes: int, what: str) -> None:
        """Reserve ``nbytes`` in the shared residency (the engine makes room if it must)."""
        self.engine.acquire_bytes(nbytes, what, read=False)

    # ------------------------------------------------------------------ reads

    def _read(self, k: tuple[int, int], *, prefetched: bool) -> _Entry:
        """Start holding expert ``k`` (lock held); the caller populates it."""
        layer = self.layers[k[0]]
        ent = _Entry(self._extents(layer, k[1]))
        ent.prefetched = prefetched
        self.maps.hold(ent.extents)
        self.entries[k] = ent
        self.cached_bytes += layer.expert_bytes
        self.stats.reads += 1
        self.stats.bytes_read += layer.expert_bytes
        self.engine.stats.expert_bytes += layer.expert_bytes
        return ent

    def _populate(self, ent: _Entry) -> None:
        self.maps.populate(ent.extents)

    # ------------------------------------------------------------------ calls

    def pre(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        torch = self.torch
        layer = self.by_module[id(module)]
        ids = args[1] if len(args) >= 2 else kwargs.get("top_k_index")
        if not isinstance(ids, torch.Tensor):
            raise TypeError(
                f"{layer.key}: the experts module was called without top_k_index; stream it "
                "by block (stream(..., experts=False))"
            )
        uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        hit = [e for e in uniq.tolist() if 0 <= e < layer.num]
        if len(hit) != len(uniq):
            raise ValueError(f"{layer.key}: expert ids out of range: {uniq.tolist()}")
        copy_bytes = layer.copy_bytes * len(hit)
        with self.lock:  # reads ahead in flight cannot be evicted: let them finish
            pending = [x.future for x in self.entries.values() if x.future is not None]
        for fut in pending:
            fut.result()
        with self.lock:
            self.stats.calls += 1
            self.stats.used += len(hit)
            self.clock += 1
            pop = self.popularity[layer.index]
            for e in hit:
                pop[e] += 1.0
            self._room(copy_bytes, set(), min_score=None)
            self._take(copy_bytes, f"{len(hit)} expert(s) of {layer.key!r}")
            self._copy_held += copy_bytes
        try:
            if self.reserve is None or copy_bytes + len(hit) * layer.expert_bytes <= self.reserve:
                # all the picked experts fit at once: one conversion makes the rows
                held: list[_Entry] = []
                try:
                    for e in hit:
                        held.append(self._hold(layer, e))
                    out = self._build(layer, hit)
                finally:
                    with self.lock:
                        for ent in held:
                            ent.users -= 1
            else:
                # expert by expert: at most one expert's pages beyond the cache at once
                out = {
                    t.name: torch.empty((len(hit), *t.placeholder.shape[1:]), dtype=t.dtype)
                    for t in layer.tensors
                }
                for j, e in enumerate(hit):
                    ent = self._hold(layer, e)
                    try:
                        one = self._build(layer, [e])
                        for name, x in one.items():
                            out[name][j].copy_(x[0])
                    finally:
                        with self.lock:
                            ent.users -= 1
        except BaseException:
            with self.lock:
                self._copy_held -= copy_bytes
                self.engine.release_bytes(copy_bytes)
            raise
        for t in layer.tensors:
            x = out[t.name]
            if self.device is not None:
                x = x.to(self.device)
            for s in t.slots:
                s.put(torch.nn.Parameter(x, requires_grad=False) if s.param else x)
        self._active[id(module)] = (copy_bytes, hit)
        module.num_experts = len(hit)
        inverse = inverse.reshape(ids.shape).to(ids.device)
        if len(args) >= 2:
            return (args[0], inverse, *args[2:]), kwargs
        return args, {**kwargs, "top_k_index": inverse}

    def _hold(self, layer: ExpertLayer, e: int) -> _Entry:
        """Expert ``e`` of ``layer`` mapped and populated, in use until ``users`` drops:
        from the cache, from a read ahead in flight, or read now (into the cache, making
        room by evicting the least popular experts not in use)."""
        k = (layer.index, e)
        fresh = False
        with self.lock:
            ent = self.entries.get(k)
            if ent is None:
                self._room(layer.expert_bytes, {k}, min_score=None)
                self._take(layer.expert_bytes, f"expert {e} of {layer.key!r}")
                ent = self._read(k, prefetched=False)
                fresh = True
            else:
                self.stats.hits += 1
                if ent.prefetched:
                    ent.prefetched = False
                    self.stats.prefetch_used += 1
            ent.users += 1
            ent.last = self.clock
            fut = ent.future
        try:
            if fresh:
                self._populate(ent)
            elif fut is not None:
                fut.result()
        except BaseException:
            with self.lock:
                ent.users -= 1
            raise
        return ent

    def _build(self, layer: ExpertLayer, hit: list[int]) -> dict[str, Any]:
        """The layer's fused parameters for experts ``hit`` only (copies)."""
        torch = self.torch
        out: dict[str, Any] = {}
        done: set[int] = set()
        for t in layer.tensors:
            f = t.fused
            if f is None:
                rows = self.maps.tensor(t.info)[torch.tensor(hit)]
                out[t.name] = rows.to(dtype=t.dtype)
                continue
            if id(f) in done:
                continue
            done.add(id(f))
            made = f.run_subset(self._reader(t), hit, self._model())
            out.update(made)
        return out

    def _reader(self, t: ModelTensor) -> Callable[[str], Any]:
        """Checkpoint key -> a view of it in the mapping, in ``t``'s dtype."""
        by_name = {i.name: i for i in t.sources}

        def read(k: str) -> Any:
            return self.maps.tensor(by_name[k]).to(dtype=t.dtype)

        return read

    def post(self, module: Any, args: Any, output: Any) -> None:
        layer = self.by_module[id(module)]
        module.num_experts = layer.num
        for t in layer.tensors:
            for s in t.slots:
                s.put(t.placeholder)
        active = self._active.pop(id(module), None)
        if active is None:
            return
        copy_bytes, _ = active
        with self.lock:
            self._copy_held -= copy_bytes
            self.engine.release_bytes(copy_bytes)
        self._prefetch_after(layer)

    def begin_pass(self) -> None:
        """A token's pass starts: age the use counts."""
        with self.lock:
            for pop in self.popularity.values():
                for e in range(len(pop)):
                    pop[e] *= self.decay

    # ------------------------------------------------------------------ prefetch

    def _prefetch_after(self, layer: ExpertLayer) -> None:
        """Read ahead the next MoE layer's most popular experts that are not cached."""
        if self._pool is None or self._closed or not self.layers:
            return
        nxt = self.layers[(layer.index + 1) % len(self.layers)]
        with self.lock:
            pop = self.popularity[nxt.index]
            order = sorted(range(nxt.num), key=lambda e: -pop[e])
            todo: list[tuple[_Entry, int]] = []
            for e in order[: nxt.top_k]:
                k = (nxt.index, e)
                if k in self.entries or pop[e] <= 0:
                    continue
                if not self._room(nxt.expert_bytes, set(), min_score=pop[e]):
                    break
                if not self.res.reserve(nxt.expert_bytes, wait=False, evict=False):
                    break
                ent = self._read(k, prefetched=True)
                ent.last = self.clock
                self.stats.prefetched += 1
                todo.append((ent, e))
            for ent, _ in todo:
                ent.future = self._pool.submit(self._populate_async, ent)

    def _populate_async(self, ent: _Entry) -> None:
        try:
            self._populate(ent)
        finally:
            with self.lock:
                ent.future = None

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        with self.lock:
            self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self.lock:
            for k in list(self.entries):
                self._evict(k)


def install(store: ExpertStore, hooks: list[Any]) -> None:
    """Hook every experts module of ``store`` (handles appended to ``hooks``)."""
    for layer in store.layers:
        hooks.append(
            layer.module.register_forward_pre_hook(store.pre, with_kwargs=True, prepend=True)
        )
        hooks.append(layer.module.register_forward_hook(store.post, always_call=True))
