"""A lazy checkpoint: tensors read on first access, layer walks under a memory budget.

:func:`open` validates every shard's header up front (a truncated or malformed
shard fails there, never in the middle of a walk), keeps the shards open, and
returns a :class:`LazyCheckpoint`, a read-only mapping name -> tensor that reads a
tensor's bytes, and only those, the first time it is asked for.

*Holdings.* The checkpoint keeps what it has read so a second access is free. With
``max_resident_bytes`` it keeps its holdings (tensors held, plus reads in flight)
within that budget by releasing the oldest-read tensors first. A tensor the caller
still references stays alive, but it is the caller's, not the checkpoint's. The
accounting is a :class:`~safeshard.runtime.residency.Residency` (:attr:`LazyCheckpoint.residency`),
the one :func:`safeshard.stream` uses too. ``max_resident_bytes="auto"`` (or an
:class:`~safeshard.runtime.membudget.AutoBudget`) sizes the budget from the memory available
and re-reads it as tensors are read.

*Layer walks.* :meth:`LazyCheckpoint.iter_layers` yields ``(key, {name: tensor})``
for each group of :func:`safeshard.format.blocks.group_tensors` in model order (each
head tensor, each block such as ``model.layers.7``, each tail tensor) while a
background thread reads the next ``prefetch`` groups. The group being yielded
stays held until the caller asks for the next one; then the walk releases what it
read for it (tensors held before the walk stay held). Prefetched groups are not
released before they are yielded; the reader waits for room instead. So a walk
holds at most ``1 + prefetch`` groups, and never more than the budget; the
process's memory stays that low as long as the caller drops each layer when done
with it. A group larger than the budget is a :class:`BudgetError`, raised when
the walk starts.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Generator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from types import TracebackType
from typing import Any

from safeshard.checkpoint import open_checkpoint
from safeshard.errors import BudgetError, CheckpointClosedError, UsageError
from safeshard.format.blocks import Group, group_tensors, model_order
from safeshard.format.header import TensorInfo
from safeshard.runtime.budgeted import BudgetedReads
from safeshard.runtime.membudget import BudgetSpec, resolve_budget
from safeshard.runtime.readers import (
    Framework,
    ShardFiles,
    Unsupported,
    backend_for,
    check_workers,
    read_tensors,
)
from safeshard.runtime.residency import Residency, Stopped
from safeshard.runtime.tpread import rank_plan, read_slices
from safeshard.sizes import format_size

__all__ = ["LazyCheckpoint", "open"]


class LazyCheckpoint(Mapping[str, Any]):
    """A read-only mapping name -> tensor over a checkpoint's shards; see :func:`open`."""

    def __init__(
        self,
        path: str | PathLike[str],
        *,
        max_resident_bytes: BudgetSpec = None,
        prefetch: int = 1,
        framework: Framework = "torch",
        workers: int | None = None,
        unsupported: Unsupported = "error",
        storage_options: Mapping[str, Any] | None = None,
        tp_plan: Mapping[str, str] | str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        tp_config: Mapping[str, Any] | None = None,
        tp_stats: Any = None,
    ) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise UsageError(f"prefetch must be a non-negative integer, not {prefetch!r}")
        fixed, auto = resolve_budget(max_resident_bytes)
        self.prefetch = prefetch
        self.workers = check_workers(workers)
        self.unsupported = unsupported
        self._backend = backend_for(framework)
        self._ckpt = open_checkpoint(path, storage_options=storage_options)
        self._order = model_order(list(self._ckpt.entries))
        self._groups = group_tensors(self._order)
        self._res = Residency(fixed, auto=auto, label=self.path)
        self._cond = self._res.cond
        self._life = BudgetedReads(
            self._res, closed_message=f"{self.path}: this lazy checkpoint is closed"
        )
        self._walks: weakref.WeakSet[Generator[Any, None, None]] = weakref.WeakSet()
        self._pool = (
            ThreadPoolExecutor(self.workers, thread_name_prefix="safeshard-lazy")
            if self.workers > 1
            else None
        )
        self._tp: Any = None
        self.tp_stats = tp_stats
        if tp_plan is not None:
            self._tp = rank_plan(self._ckpt, tp_plan, rank, world_size, tp_config)
        self._files = ShardFiles(self._ckpt)

    # ------------------------------------------------------------------ mapping

    def __getitem__(self, name: str) -> Any:
        with self._cond:
            self._check_open()
            if name in self._res:
                return self._res.get(name)
        if name not in self._ckpt.entries:
            raise KeyError(name)
        return self._fetch([self.info(name)], pin=False, wait=False, stop=None)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._ckpt.entries

    # ------------------------------------------------------------------ introspection

    @property
    def metadata(self) -> dict[str, str] | None:
        """The first shard's ``__metadata__``."""
        return self._ckpt.metadata

    @property
    def path(self) -> str:
        """The index, or the single file, this checkpoint was opened from."""
        index = self._ckpt.index
        return str(index.path) if index is not None else self._ckpt.headers[0].path

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and byte range of tensor ``name`` (no data read)."""
        return self._ckpt.entries[name].info

    def layers(self) -> list[Group]:
        """The groups in model order, exactly as :func:`safeshard.format.blocks.group_tensors` makes
        them: each head tensor, each numbered block, each tail tensor."""
        return list(self._groups)

    def nbytes(self, group: Group) -> int:
        """Tensor bytes of ``group``."""
        return sum(self._size(self.info(t)) for t in group.tensors)

    def _size(self, info: TensorInfo) -> int:
        """Bytes held for ``info``: the rank's slice with a tp_plan, else the tensor."""
        return int(self._tp.slice_of(info).nbytes) if self._tp is not None else info.nbytes

    def _read(self, infos: Sequence[TensorInfo]) -> dict[str, Any]:
        if self._tp is not None:
            return read_slices(
                self._files,
                self._backend,
                self._tp,
                infos,
                workers=self.workers,
                pool=self._pool,
                unsupported=self.unsupported,
                stats=self.tp_stats,
            )
        return read_tensors(
            self._files,
            self._backend,
            infos,
            workers=self.workers,
            pool=self._pool,
            unsupported=self.unsupported,
        )

    @property
    def files(self) -> ShardFiles:
        """The open shards (for readers that share them, such as memory maps)."""
        return self._files

    @property
    def budget(self) -> int | None:
        """The byte budget now (None: no limit). With ``max_resident_bytes="auto"`` it
        follows the memory available, re-read at most every
        :attr:`safeshard.runtime.membudget.AutoBudget.interval` seconds as tensors are read."""
        return self._res.budget

    @property
    def residency(self) -> Residency:
        """The holdings accounting (shared with :func:`safeshard.stream`'s runner)."""
        return self._res

    @property
    def resident_bytes(self) -> int:
        """Bytes this checkpoint holds now, reads in flight included."""
        return self._res.resident_bytes

    @property
    def peak_resident_bytes(self) -> int:
        """Highest :attr:`resident_bytes` seen so far."""
        return self._res.peak_bytes

    @property
    def held(self) -> list[str]:
        """Names of the tensors held now, oldest first."""
        return self._res.keys()

    def release(self) -> None:
        """Drop every unpinned tensor held."""
        self._res.drop_unpinned()

    def refresh_budget(self) -> int | None:
        """Re-read the memory available now (``max_resident_bytes="auto"`` only) and
        return the budget; a fixed budget is returned unchanged."""
        self._life.follow_memory(force=True)
        return self._res.budget

    def _follow_memory(self) -> None:
        """With an automatic budget, re-read the memory available if it is time to."""
        self._life.follow_memory()

    # ------------------------------------------------------------------ walking

    def iter_layers(self) -> Generator[tuple[str, dict[str, Any]], None, None]:
        """Yield ``(group key, {tensor name: tensor})`` in model order, prefetching.

        A background thread reads up to ``prefetch`` groups ahead. When the caller asks
        for the next group, the walk releases what it read for the previous one, so it
        holds at most ``1 + prefetch`` groups. With a budget, every group must fit in
        it: a larger one raises :class:`BudgetError` here, before anything is read.
        With a budget, one walk at a time: two walks sharing a budget could each wait
        for the other's layer to be released, so a second one raises :class:`UsageError`
        until the first is exhausted or closed.
        """
        self._check_open()
        self._follow_memory()
        if self.budget is not None and any(
            inspect.getgeneratorstate(w) != inspect.GEN_CLOSED for w in self._walks
        ):
            raise UsageError(
                f"{self.path}: a layer walk of this checkpoint is still open; with "
                "max_resident_bytes set, finish it or call its close() before starting another"
            )
        budget = self.budget
        if budget is not None:
            for g in self._groups:
                size = self.nbytes(g)
                if size > budget:
                    raise BudgetError(
                        f"{self.path}: {g.kind} {g.key!r} holds {size:,} bytes "
                        f"({format_size(size)}), more than max_resident_bytes={budget:,} "
                        f"({format_size(budget)}); raise the budget to at least {size:,} "
                        "bytes or read its tensors one at a time"
                    )
        walk = self._walk_inline() if self.prefetch == 0 else self._walk_prefetch()
        self._walks.add(walk)
        return walk

    def _walk_inline(self) -> Generator[tuple[str, dict[str, Any]], None, None]:
        for g in self._groups:
            added: list[str] = []
            infos = [self.info(t) for t in g.tensors]
            tensors = self._fetch(infos, pin=True, wait=True, stop=None, added=added)
            try:
                yield g.key, tensors
            finally:
                del tensors
                self._unpin(g.tensors, drop=added)

    def _walk_prefetch(self) -> Generator[tuple[str, dict[str, Any]], None, None]:
        groups = self._groups
        state: dict[str, Any] = {"pos": 0, "stop": False}
        ready: dict[int, tuple[dict[str, Any], list[str]]] = {}
        failed: dict[int, BaseException] = {}

        def stopped() -> bool:
            return bool(state["stop"]) or self._life.closed

        def reader() -> None:
            i = 0
            try:
                for i, g in enumerate(groups):
                    with self._cond:
                        while not stopped() and i > state["pos"] + self.prefetch:
                            self._cond.wait()
                        if stopped():
                            return
                    infos = [self.info(t) for t in g.tensors]
                    added: list[str] = []
                    tensors = self._fetch(infos, pin=True, wait=True, stop=stopped, added=added)
                    with self._cond:
                        ready[i] = (tensors, added)
                        self._cond.notify_all()
            except Stopped:
                return
            except BaseException as e:
                with self._cond:
                    failed[i] = e
                    self._cond.notify_all()

        thread = self._life.start(reader, "safeshard-prefetch")
        try:
            for i, g in enumerate(groups):
                with self._cond:
                    state["pos"] = i
                    self._cond.notify_all()
                    while i not in ready and i not in failed:
                        if self._life.closed:
                            raise CheckpointClosedError(f"{self.path}: closed during a layer walk")
                        self._cond.wait()
                    if i in failed:
                        raise failed.pop(i)
                    tensors, added = ready.pop(i)
                try:
                    yield g.key, tensors
                finally:
                    del tensors
                    self._unpin(g.tensors, drop=added)
        finally:
            with self._cond:
                state["stop"] = True
                self._cond.notify_all()
            thread.join()
            self._life.finished(thread)
            with self._cond:
                for i, (_, added) in ready.items():  # prefetched but never yielded
                    self._unpin(groups[i].tensors, drop=added, locked=True)
                ready.clear()

    # ------------------------------------------------------------------ holdings

    def _fetch(
        self,
        infos: Sequence[TensorInfo],
        *,
        pin: bool,
        wait: bool,
        stop: Any,
        added: list[str] | None = None,
    ) -> dict[str, Any]:
        """Return ``infos``' tensors, reading those not held.

        ``pin`` keeps all of them from release until :meth:`_unpin`. Room for the
        missing ones is made by releasing unpinned holdings oldest first; if that is
        not enough, ``wait`` waits for unpins, otherwise the read goes unheld (the
        tensors are the caller's alone). Names newly held are appended to ``added``.
        """
        self._follow_memory()
        res = self._res
        with self._cond:
            self._check_open()
            have = {i.name: res.get(i.name) for i in infos if i.name in res}
            if pin:
                for name in have:
                    res.pin(name)
            missing = [i for i in infos if i.name not in have]
            need = sum(self._size(i) for i in missing)
            try:
                hold = self._reserve(need, missing, wait=wait, stop=stop)
            except BaseException:
                if pin:
                    self._unpin(list(have), locked=True)
                raise

        def failed(_: BaseException) -> None:
            if pin:
                self._unpin(list(have), locked=True)

        got = self._life.read(
            need if hold else 0, lambda: self._read(missing) if missing else {}, failed=failed
        )
        with self._cond:
            if hold:
                fresh = [i.name not in res for i in missing]
                held = self._life.hold(
                    [(i.name, got[i.name], self._size(i)) for i in missing], reserved=need
                )
                for i, value, new in zip(missing, held, fresh, strict=True):
                    got[i.name] = value
                    if new and added is not None:
                        added.append(i.name)
                    if pin:
                        res.pin(i.name)
        out = {**have, **got}
        return {i.name: out[i.name] for i in infos}

    def _reserve(self, need: int, missing: Sequence[TensorInfo], *, wait: bool, stop: Any) -> bool:
        """Make room for ``need`` bytes (lock held); True if reserved, False to read unheld."""
        budget = self._res.budget
        if budget is not None and need > budget:
            big = max(missing, key=lambda i: i.nbytes)
            raise BudgetError(
                f"{self.path}: reading {len(missing)} tensor(s) of {need:,} bytes"
                + (f" (tensor {big.name!r})" if len(missing) == 1 else "")
                + f" exceeds max_resident_bytes={budget:,} ({format_size(budget)});"
                " raise the budget"
            )

        return self._life.reserve(
            need, wait=wait, stop=stop, what=f"reading {len(missing)} tensor(s)"
        )

    def _unpin(
        self, names: Sequence[str], *, drop: Sequence[str] = (), locked: bool = False
    ) -> None:
        """Unpin ``names``; then release those of ``drop`` that no one else pins."""
        with self._cond:
            for n in names:
                self._res.unpin(n)
            for n in drop:
                self._res.discard(n)
            self._cond.notify_all()

    # ------------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        self._life.check_open()

    @property
    def closed(self) -> bool:
        return self._life.closed

    def close(self) -> None:
        """Stop walks, release holdings, close the shard files. Safe to call twice."""
        self._life.close(self._release_all)

    def _release_all(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._res.clear()
        self._files.close()

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        life = getattr(self, "_life", None)
        if life is not None and not life.closed:
            with contextlib.suppress(Exception):  # best effort at interpreter exit
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._res)} held"
        return f"<LazyCheckpoint {self.path!r}: {len(self)} tensors, {state}>"


def open(
    path: str | PathLike[str],
    *,
    max_resident_bytes: BudgetSpec = None,
    prefetch: int = 1,
    framework: Framework = "torch",
    workers: int | None = None,
    unsupported: Unsupported = "error",
    storage_options: Mapping[str, Any] | None = None,
    tp_plan: Mapping[str, str] | str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    tp_config: Mapping[str, Any] | None = None,
    tp_stats: Any = None,
) -> LazyCheckpoint:
    """Open the checkpoint at ``path`` (file, folder or index; local or a URL reached with
    ``storage_options``) lazily.

    Every shard header is validated now. ``max_resident_bytes`` (bytes or a size
    string such as ``"1GiB"``) bounds what the checkpoint holds; ``prefetch`` is how
    many groups :meth:`~LazyCheckpoint.iter_layers` reads ahead (0: none);
    ``workers`` threads read each group. ``framework`` and ``unsupported`` are as for
    :func:`safeshard.load`. Use it as a context manager to close its files.

    With ``tp_plan``, ``rank`` and ``world_size`` (as for :func:`safeshard.load`), each
    tensor is the rank's slice and only its bytes are read; ``max_resident_bytes`` then
    counts the slices' bytes, so a walk holds at most the budget of the rank's slices.
    """
    return LazyCheckpoint(
        path,
        max_resident_bytes=max_resident_bytes,
        prefetch=prefetch,
        framework=framework,
        workers=workers,
        unsupported=unsupported,
        storage_options=storage_options,
        tp_plan=tp_plan,
        rank=rank,
        world_size=world_size,
        tp_config=tp_config,
        tp_stats=tp_stats,
    )
