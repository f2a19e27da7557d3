"""Run a transformers model bigger than memory: layer-streamed inference under a budget.

:func:`stream` takes a model built on the meta device (no weights yet) and a
checkpoint, and installs hooks so that each block's weights are materialized from
the checkpoint just before the block runs and released after it; ``model(...)`` and
``model.generate(...)`` then work unchanged::

    model = safeshard.empty_model("llama-folder")  # or from_config under torch.device("meta")
    model = safeshard.stream(model, "llama-folder", max_resident_bytes="500MB")
    out = model.generate(input_ids, max_new_tokens=32)

How it works:

- *Units.* Each block (``model.layers.7``) is one unit; the tensors outside the
  blocks are grouped by the module that uses them (embeddings, final norm, lm_head).
  Tied weights are one tensor installed in every place that shares it, so they stay
  tied. A hook pair on each unit's module(s) acquires the unit before the module runs
  and releases it after (even if it raises).
- *Reads.* Tensors are views of the shards mapped in memory (:mod:`safeshard.runtime.mapped`):
  a unit is read by populating its pages in parallel, and released by unmapping them,
  so nothing is copied and a warm page cache costs almost nothing.
- *Budget and prefetch* (:mod:`safeshard.runtime.prefetch`): a stable subset stays resident,
  the rest is streamed, and a background thread reads the next ``prefetch`` units in
  the order learned on the first pass, cyclically across tokens. The holdings are
  counted in the same :class:`~safeshard.runtime.residency.Residency` as
  :func:`safeshard.open`'s, and ``max_resident_bytes`` takes the same values,
  ``"auto"`` included (:mod:`safeshard.runtime.membudget`).
- *Embeddings by rows.* An embedding that is not resident and not tied is not read
  whole: its forward reads just the rows of the ids it is given.
- *GPTQ.* Models built through transformers' GPTQ integration (``empty_model`` does
  it) stream their ``qweight``/``qzeros``/``scales``/``g_idx`` buffers like weights;
  after each read, the v1 zero points are converted as the integration converts them
  at load, and each quantized module is post-initialized once.

Before any forward pass, :func:`stream` checks that the model is on the meta device
(:class:`UsageError`), that the checkpoint has every tensor the model needs with the
right shape and a compatible dtype (:class:`ModelMismatchError`), and that the budget
holds the largest unit (:class:`BudgetError`).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safeshard.errors import MissingExtraError, ModelMismatchError, UsageError
from safeshard.io.bytesrc import Extent
from safeshard.runtime import heads
from safeshard.runtime.experts import ExpertLayer, ExpertStats, ExpertStore, find_expert_layers
from safeshard.runtime.experts import install as install_expert_hooks
from safeshard.runtime.lazy import LazyCheckpoint
from safeshard.runtime.mapped import MappedShards
from safeshard.runtime.membudget import BudgetSpec, read_memory
from safeshard.runtime.modelmap import (
    GPTQ,
    Granularity,
    UnitSpec,
    check_meta,
    gptq_support,
    init_buffers,
    match,
    plan_units,
)
from safeshard.runtime.prefetch import Engine, Unit
from safeshard.runtime.readers import TorchBackend, import_torch, parse_device
from safeshard.sizes import format_size

__all__ = ["STREAM_WORKERS", "StreamStats", "Streamer", "empty_model", "stream", "streamer_of"]

PageCache = Literal["auto", "keep", "drop"]

STREAM_WORKERS = 4
"""Threads that read a unit's pages (8 read no faster than 4 on the development machine)."""

_ATTR = "_safeshard_streamer"


@dataclass
class StreamStats:
    """What a streamed model has done so far (see :attr:`Streamer.stats`)."""

    passes: int
    """Forward passes of the whole model."""
    bytes_read: int
    """Bytes of units read (a unit read twice counts twice), plus embedding rows."""
    row_bytes: int
    """Of which embedding rows."""
    loads: int
    inline_loads: int
    """Units read by the forward pass itself because the reader had not read them."""
    peak_resident_bytes: int
    resident_bytes: int
    budget: int | None
    resident: list[str] = field(default_factory=list)
    """The units chosen to stay resident, in model order."""
    expert_bytes: int = 0
    """Of ``bytes_read``, MoE experts read by expert."""
    experts: ExpertStats | None = None
    """The expert cache's counters (MoE models streamed by expert)."""


class _Loaded:
    """A unit's tensors while held: views of the mapping (or copies), and its pages."""

    __slots__ = ("extents", "fresh", "tensors")

    def __init__(self, tensors: dict[str, Any], extents: list[Extent]) -> None:
        self.tensors = tensors
        self.extents = extents
        self.fresh = True


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise MissingExtraError(
            "safeshard.stream runs transformers models, and transformers is not installed "
            f"({e}); run: pip install transformers"
        ) from None
    return transformers


class Streamer:
    """The hooks, holdings and reader behind a streamed model; see :func:`stream`.

    Get it with :func:`streamer_of`. :meth:`close` removes the hooks and releases
    everything (the model's weights are meta placeholders again).
    """

    def __init__(
        self,
        model: Any,
        path: str | os.PathLike[str],
        *,
        max_resident_bytes: BudgetSpec = None,
        prefetch: int = 1,
        device: str = "cpu",
        workers: int | None = None,
        page_cache: PageCache = "auto",
        rows: bool = True,
        granularity: Granularity = "block",
        experts: bool = True,
    ) -> None:
        torch = import_torch()
        self.torch = torch
        if not isinstance(model, torch.nn.Module):
            raise UsageError(
                "stream() takes a torch.nn.Module built on the meta device, not "
                f"{type(model).__name__}"
            )
        if getattr(model, _ATTR, None) is not None:
            raise UsageError(
                "this model is already streamed; call streamer_of(model).close() first"
            )
        if page_cache not in ("auto", "keep", "drop"):
            raise UsageError(f"page_cache must be 'auto', 'keep' or 'drop', not {page_cache!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise UsageError(f"prefetch must be a non-negative integer, not {prefetch!r}")
        if granularity not in ("block", "module"):
            raise UsageError(f"granularity must be 'block' or 'module', not {granularity!r}")
        self.backend = TorchBackend()
        self.device = parse_device(self.backend, device)
        check_meta(model)
        tie = getattr(model, "tie_weights", None)
        if callable(tie):  # as from_pretrained does (init_empty_weights unties them)
            tie()
        nworkers = STREAM_WORKERS if workers is None else workers
        self.lc = LazyCheckpoint(
            path, max_resident_bytes=max_resident_bytes, prefetch=prefetch, workers=nworkers
        )
        self.label = self.lc.path
        try:
            try:
                tensors = match(model, self.lc, self.device)
            except ModelMismatchError as e:
                raise ModelMismatchError(f"{e}{_head_hint(model)}") from None
            gptq = gptq_support(model)
            layers = find_expert_layers(model, tensors) if experts and gptq is None else []
            specs = plan_units(model, tensors, gptq, rows=rows, granularity=granularity)
            self._setup(model, specs, gptq, prefetch, nworkers, page_cache, layers)
        except BaseException:
            self.lc.close()
            raise

    def _setup(
        self,
        model: Any,
        specs: list[UnitSpec],
        gptq: GPTQ | None,
        prefetch: int,
        workers: int,
        page_cache: PageCache,
        layers: list[ExpertLayer],
    ) -> None:
        self.model_ref = weakref.ref(model)
        self.specs = {s.unit.key: s for s in specs}
        self._convert = gptq.convert if gptq is not None else None
        self._installed: set[str] = set()
        self._post_inited: set[int] = set()
        self._rows_active: dict[int, int] = {}
        self._rows_pad: dict[int, int] = {}  # an embedding's own padding_idx while renumbered
        total = sum(s.unit.nbytes for s in specs)
        # MoE experts read by expert: the least one call needs, and the share of the
        # budget they get (all that the other units leave, when those can all stay)
        floor = ExpertStore.floor(layers)
        budget = self.lc.residency.budget
        share: int | None = None
        if layers and budget is not None:
            share = budget - total if budget - total >= floor else floor
        total += sum(x.expert_bytes * x.num for x in layers)
        drop = page_cache == "drop"
        if page_cache == "auto":
            with contextlib.suppress(Exception):
                readings = read_memory()
                drop = bool(readings) and total > min(r.available for r in readings)
        self.drop_cache = drop
        ref = weakref.ref(self)

        def load(u: Unit) -> Any:
            me = ref()
            if me is None:
                raise UsageError("the streamed model is gone")
            return me._load(u)

        def unload(u: Unit, value: Any) -> None:
            me = ref()
            if me is not None:
                me._unload(u, value)

        self.engine = Engine(
            [s.unit for s in specs],
            self.lc.residency,
            load,
            unload,
            prefetch=prefetch,
            label=self.label,
            reserve=floor,
            share=share,
        )
        self.engine.check()
        init_buffers(model, self.device)
        self.maps = MappedShards(self.lc.files, self.backend, workers=workers, drop_cache=drop)
        self.experts: ExpertStore | None = None
        if layers:
            self.experts = ExpertStore(
                model,
                layers,
                self.maps,
                self.engine,
                share,
                device=self.device,
                prefetch=prefetch > 0,
            )
        self._hooks: list[Any] = []
        self._install_hooks(model)
        self._finalizer = weakref.finalize(
            model, _close_resources, self.engine, self.maps, self.lc, self._hooks, self.experts
        )

    # ------------------------------------------------------------------ hooks

    def _install_hooks(self, model: Any) -> None:
        hooks = self._hooks
        engine = self.engine
        store = self.experts

        def begin(m: Any, a: Any) -> None:
            engine.begin_pass()
            if store is not None:
                store.begin_pass()

        hooks.append(model.register_forward_pre_hook(begin))
        if store is not None:
            install_expert_hooks(store, hooks)
        hooks.append(
            model.register_forward_hook(lambda m, a, o: engine.end_pass(), always_call=True)
        )
        for spec in self.specs.values():
            if spec.rows is not None:
                emb = spec.rows
                hooks.append(
                    emb.register_forward_pre_hook(
                        self._rows_pre(spec), with_kwargs=True, prepend=True
                    )
                )
                hooks.append(emb.register_forward_hook(self._rows_post(spec), always_call=True))
                continue
            for m in spec.users:
                hooks.append(m.register_forward_pre_hook(self._pre(spec.unit.key), prepend=True))
                hooks.append(m.register_forward_hook(self._post(spec.unit.key), always_call=True))

    def _pre(self, key: str) -> Callable[..., None]:
        def pre(module: Any, args: Any) -> None:
            self.acquire(key)

        return pre

    def _post(self, key: str) -> Callable[..., None]:
        def post(module: Any, args: Any, output: Any) -> None:
            self.release(key)

        return post

    # ------------------------------------------------------------------ units

    def acquire(self, key: str) -> None:
        """Materialize unit ``key`` in the model until :meth:`release` (the hooks call it)."""
        loaded = self.engine.acquire(key)
        if key not in self._installed:
            self._install(self.specs[key], loaded)

    def release(self, key: str) -> None:
        self.engine.release(key)

    def _load(self, u: Unit) -> _Loaded:
        """Read unit ``u`` (any thread): populate its pages, build its tensors."""
        spec = self.specs[u.key]
        maps = self.maps
        infos = {i.name: i for t in spec.tensors for i in t.reads}
        extents = [maps.extent(i) for i in infos.values()]
        maps.hold(extents)
        try:
            maps.populate(extents)
            out: dict[str, Any] = {}
            built: dict[int, dict[str, Any]] = {}
            for t in spec.tensors:
                if t.fused is not None:  # made by transformers' own conversion ops
                    made = built.get(id(t.fused))
                    if made is None:
                        made = built[id(t.fused)] = t.fused.run(
                            _converted_reader(maps, infos, t.dtype), self.model_ref()
                        )
                    x = made[t.name]
                else:
                    x = maps.tensor(t.info)
                if t.copy and t.fused is None:
                    x = x.to(dtype=t.dtype) if x.dtype != t.dtype else x.clone()
                if self.device is not None:
                    x = x.to(self.device)
                out[t.name] = x
        except BaseException:
            maps.release(extents)
            raise
        if self.device is not None:  # the copies are on the device: the pages can go now
            maps.release(extents)
            extents = []
        return _Loaded(out, extents)

    def _unload(self, u: Unit, value: Any) -> None:
        """Let ``u`` go (lock held, any thread): placeholders back, pages released."""
        spec = self.specs.get(u.key)
        if spec is None or not isinstance(value, _Loaded):
            return
        if u.key in self._installed:
            self._installed.discard(u.key)
            for t in spec.tensors:
                for s in t.slots:
                    s.put(t.placeholder)
            for m in spec.quant:  # dequantization caches made from the released tensors
                for reset in ("_stream_reset_cache", "clear_weight_cache"):
                    fn = getattr(m, reset, None)
                    if callable(fn):
                        fn()
        value.tensors = {}
        if value.extents:
            self.maps.release(value.extents)
            value.extents = []

    def _install(self, spec: UnitSpec, loaded: _Loaded) -> None:
        """Put a held unit's tensors in their slots (main thread)."""
        torch = self.torch
        for t in spec.tensors:
            x = loaded.tensors[t.name]
            param = None
            for s in t.slots:
                if s.param and param is None:
                    # requires_grad as the model's own: with it off, torch's matmul copies
                    # the whole weight for some input strides (generate's prefill does that)
                    param = torch.nn.Parameter(x, requires_grad=t.placeholder.requires_grad)
                s.put(param if s.param else x)
        self._installed.add(spec.unit.key)
        if not loaded.fresh:
            return
        loaded.fresh = False
        with torch.no_grad():
            if self._convert is not None:
                for t in spec.tensors:
                    if t.gptq_module is not None:  # our own copy: convert it in place
                        self._convert(t.gptq_module)
            for m in spec.quant:
                if id(m) not in self._post_inited:
                    self._post_inited.add(id(m))
                    m.post_init()

    # ------------------------------------------------------------------ embedding rows

    def _rows_pre(self, spec: UnitSpec) -> Callable[..., Any]:
        """Pre-hook of an embedding read by rows: read the rows of the ids given, install
        them as a small weight, and hand the module the ids renumbered into it."""
        torch = self.torch
        t = spec.tensors[0]
        key = spec.unit.key
        n_rows = t.info.shape[0]
        row_bytes = t.info.nbytes // n_rows if n_rows else 0

        def whole(module: Any) -> None:
            self.acquire(key)
            self._rows_active[id(module)] = -1

        def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            ids = args[0] if args else kwargs.get("input")
            if (
                key in self.engine.keep
                or not isinstance(ids, torch.Tensor)
                or ids.dtype not in (torch.int64, torch.int32)
                or ids.numel() == 0
            ):
                return whole(module)
            uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            rows = uniq.tolist()
            if rows[0] < 0 or rows[-1] >= n_rows:
                return whole(module)  # the embedding raises its own index error
            nbytes = len(rows) * row_bytes
            self.engine.acquire_bytes(nbytes, f"{len(rows)} row(s) of {t.name!r}")
            try:
                x = self.maps.read_rows(t.info, rows)
                if x.dtype != t.dtype:
                    x = x.to(t.dtype)
                if self.device is not None:
                    x = x.to(self.device)
            except BaseException:
                self.engine.release_bytes(nbytes)
                raise
            t.slots[0].put(torch.nn.Parameter(x, requires_grad=t.placeholder.requires_grad))
            self._rows_active[id(module)] = nbytes
            pad = getattr(module, "padding_idx", None)
            if pad is not None:  # renumbered too: the table has only the rows read
                self._rows_pad[id(module)] = pad
                module.padding_idx = bisect.bisect_left(rows, pad) if pad in rows else None
            inverse = inverse.reshape(ids.shape).to(ids.device)
            if args:
                return (inverse, *args[1:]), kwargs
            return args, {**kwargs, "input": inverse}

        return pre

    def _rows_post(self, spec: UnitSpec) -> Callable[..., None]:
        t = spec.tensors[0]
        key = spec.unit.key

        def post(module: Any, args: Any, output: Any) -> None:
            nbytes = self._rows_active.pop(id(module), 0)
            if id(module) in self._rows_pad:
                module.padding_idx = self._rows_pad.pop(id(module))
            if nbytes < 0:
                self.release(key)
                return
            t.slots[0].put(t.placeholder)
            if nbytes:
                self.engine.release_bytes(nbytes)

        return post

    # ------------------------------------------------------------------ reporting

    @property
    def stats(self) -> StreamStats:
        e = self.engine.stats
        res = self.lc.residency
        keep = self.engine.keep
        return StreamStats(
            passes=e.passes,
            bytes_read=e.bytes_loaded + e.extra_bytes + e.expert_bytes,
            row_bytes=e.extra_bytes,
            loads=e.loads,
            inline_loads=e.inline_loads,
            peak_resident_bytes=res.peak_bytes,
            resident_bytes=res.resident_bytes,
            budget=res.budget,
            resident=[u.key for u in self.engine.units if u.key in keep],
            expert_bytes=e.expert_bytes,
            experts=None if self.experts is None else self.experts.stats,
        )

    @property
    def units(self) -> list[Unit]:
        """The units in model order."""
        return list(self.engine.units)

    @property
    def model_bytes(self) -> int:
        """Bytes of all units and experts: what holding the whole model takes."""
        layers = self.experts.layers if self.experts is not None else []
        return sum(u.nbytes for u in self.engine.units) + sum(
            x.expert_bytes * x.num for x in layers
        )

    def refresh_budget(self) -> int | None:
        """Re-read the memory available now (``max_resident_bytes="auto"``) and plan again."""
        return self.engine.refresh_budget(force=True)

    def close(self) -> None:
        """Remove the hooks and release everything; the weights are meta placeholders
        again. Safe to call twice."""
        self._finalizer()
        model = self.model_ref()
        if model is not None and model.__dict__.get(_ATTR) is self:
            del model.__dict__[_ATTR]

    def __repr__(self) -> str:
        s = self.stats
        b = "no budget" if s.budget is None else f"budget {format_size(s.budget)}"
        return (
            f"<Streamer {self.label!r}: {len(self.specs)} units, "
            f"{format_size(self.model_bytes)}, {b}, {len(s.resident)} resident>"
        )


def _head_hint(model: Any) -> str:
    """When the model's class is not the one its config's ``architectures`` names (a BART
    checkpoint built as ``BartForCausalLM``), say so: the usual cause of a mismatch."""
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    name = type(model).__name__
    if not archs or name in archs:
        return ""
    return (
        f"; the model is a {name} but the config names {', '.join(map(str, archs))}: build it "
        "with safeshard.empty_model(path), which picks that head"
    )


def _converted_reader(
    maps: MappedShards, infos: dict[str, Any], dtype: Any
) -> Callable[[str], Any]:
    """Checkpoint key -> a view of it in the mapping, in ``dtype`` (a fused tensor's source)."""

    def read(k: str) -> Any:
        return maps.tensor(infos[k]).to(dtype=dtype)

    return read


def _close_resources(
    engine: Engine,
    maps: MappedShards,
    lc: LazyCheckpoint,
    hooks: list[Any],
    experts: ExpertStore | None = None,
) -> None:
    for h in hooks:
        h.remove()
    hooks.clear()
    if experts is not None:
        experts.close()
    engine.close()
    maps.close()
    lc.close()


# --------------------------------------------------------------------------- public


def stream(
    model: Any,
    path: str | os.PathLike[str],
    *,
    max_resident_bytes: BudgetSpec = None,
    prefetch: int = 1,
    device: str = "cpu",
    workers: int | None = None,
    page_cache: PageCache = "auto",
    rows: bool = True,
    granularity: Granularity = "block",
    experts: bool = True,
) -> Any:
    """Stream ``model``'s weights from the checkpoint at ``path`` as it runs; returns ``model``.

    ``model`` is a transformers model (any ``torch.nn.Module``) built on the meta
    device; ``path`` a ``.safetensors`` file, a folder or an index.

    - ``max_resident_bytes``: bytes or a size string bounding what is held at once
      (None: no bound, everything is kept after its first use; ``"auto"``: follow the
      memory available, see :class:`~safeshard.runtime.membudget.AutoBudget`, which may also be
      passed). A block larger than the budget is a :class:`BudgetError`, now.
    - ``prefetch``: how many units to read ahead of the one running (0: none).
    - ``device``: where the weights go: ``"cpu"`` (they map the page cache, no copy),
      or ``"cuda"``/``"cuda:N"`` (copied from the mapped pages).
    - ``workers``: threads reading a unit (default :data:`STREAM_WORKERS`).
    - ``page_cache``: ``"drop"`` also drops released pages from the page cache,
      ``"keep"`` leaves them there, ``"auto"`` drops them when the model is bigger
      than the memory available (where caching them would only evict other data).
    - ``rows``: read a streamed embedding row by row instead of whole.
    - ``granularity``: ``"block"`` or ``"module"`` units (see :mod:`safeshard.runtime.modelmap`).
    - ``experts``: read a MoE model's experts one by one, only those the router picks,
      into a frequency-aware cache (see :mod:`safeshard.runtime.experts`); False reads them with
      their block.

    See the module docstring for what is checked before the first forward pass.
    :func:`streamer_of` gives statistics and ``close()``.
    """
    s = Streamer(
        model,
        path,
        max_resident_bytes=max_resident_bytes,
        prefetch=prefetch,
        device=device,
        workers=workers,
        page_cache=page_cache,
        rows=rows,
        granularity=granularity,
        experts=experts,
    )
    model.__dict__[_ATTR] = s
    return model


def streamer_of(model: Any) -> Streamer:
    """The :class:`Streamer` that :func:`stream` attached to ``model``."""
    s = getattr(model, "__dict__", {}).get(_ATTR)
    if not isinstance(s, Streamer):
        raise UsageError("this model is not streamed; call safeshard.stream(model, path) first")
    return s


def _folder(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def empty_model(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    gptq_backend: str = "gptq_torch",
    trust_remote_code: bool = False,
    task: str | None = None,
) -> Any:
    """A model for the checkpoint at ``path``, built on the meta device from its folder's
    ``config.json``, ready for :func:`stream`.

    ``task`` picks the head: ``"causal-lm"``, ``"seq2seq-lm"``, ``"image-text-to-text"``
    or ``"sequence-classification"``; by default the one the config's ``architectures``
    names (:mod:`safeshard.runtime.heads`). A config transformers rejects, or a model type with
    none of these heads, is a :class:`~safeshard.errors.ModelConfigError`, before any read.

    GPTQ checkpoints (a ``quantization_config`` with ``quant_method: gptq``) get the
    quantized modules transformers' GPTQ integration would load them into, with
    ``gptq_backend``. ``dtype`` defaults to the config's (float16 for GPTQ, float32
    if the config names none).
    """
    torch = import_torch()
    tf = _import_transformers()
    folder = _folder(path)
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"{folder}: no config.json here to build the model from; build it yourself under "
            "torch.device('meta') and pass it to safeshard.stream"
        )
    where = str(folder / "config.json")
    cfg = heads.load_config(folder, trust_remote_code=trust_remote_code)
    task = heads.choose_task(cfg, task, where)
    qc = getattr(cfg, "quantization_config", None)
    quantizer = None
    if qc is not None:
        from transformers.quantizers.auto import get_hf_quantizer

        fields = qc if isinstance(qc, dict) else qc.to_dict()
        if str(fields.get("quant_method", "")).lower() != "gptq":
            raise UsageError(
                f"{folder}: quant_method {fields.get('quant_method')!r} is not supported; "
                "stream() runs plain and GPTQ checkpoints"
            )
        keep = ("bits", "group_size", "desc_act", "sym", "checkpoint_format", "true_sequential")
        gcfg = tf.GPTQConfig(
            **{k: fields[k] for k in keep if k in fields and fields[k] is not None},
            backend=gptq_backend,
        )
        quantizer, cfg, _ = get_hf_quantizer(  # type: ignore[no-untyped-call]
            cfg, gcfg, {"": "cpu"}, True, {}
        )
    if dtype is None:
        if quantizer is not None:
            dtype = torch.float16
        else:
            dtype = (
                getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
            )
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype, torch.float32)
    with torch.device("meta"):
        model = heads.build(
            cfg, task, dtype=dtype, trust_remote_code=trust_remote_code, where=where
        )
        if quantizer is not None:
            quantizer.preprocess_model(
                model=model,
                dtype=dtype,
                device_map={"": "cpu"},
                checkpoint_files=None,
                use_kernels=False,
            )
            model.hf_quantizer = quantizer
    model.eval()
    return model
