"""Reading a checkpoint's tensors: parallel positional reads into owned tensors.

:func:`read_tensors` (behind :func:`safeshard.load`) reads tensors of a file, a
folder or an index into freshly allocated tensor memory. The work is cut into *read
jobs* (:func:`plan_jobs`): each job is one contiguous byte range of one shard, at most
:data:`CHUNK_BYTES` long, scattered with a single ``os.preadv`` straight into the
destination tensors (a big tensor is split over several jobs, adjacent small tensors
share one). A thread pool runs
the jobs; large reads release the GIL, so threads overlap disk reads, page faults
and copies.

Frameworks are optional extras, imported only when asked for:

- ``framework="torch"`` (``pip install safeshard[torch]``) maps every safetensors
  dtype torch has: BOOL, U8/I8, I16/U16, I32/U32, I64/U64, F16, BF16, F32, F64,
  C64, and the fp8 types F8_E4M3, F8_E5M2, F8_E4M3FNUZ, F8_E5M2FNUZ and F8_E8M0
  (``float8_e8m0fnu``) where the installed torch has them.
- ``framework="numpy"`` (``pip install safeshard[numpy]``) maps the same types
  except BF16 and the fp8 types, which numpy lacks.

The sub-byte types (F4, F6_E2M3, F6_E3M2) and the types a framework lacks raise
:class:`UnsupportedDtypeError` naming the tensor, unless ``unsupported="raw"``: then
such a tensor comes back as a flat ``uint8`` tensor of its stored bytes (its
``nbytes`` long), to be reinterpreted by the caller.

``device="cuda"`` (torch only) reads into pinned staging buffers, one pair per
worker, and copies each filled buffer to the GPU on the worker's own CUDA stream
while the worker reads the next one; without CUDA it raises :class:`DeviceError`.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from safeshard.checkpoint import Checkpoint
from safeshard.errors import (
    DeviceError,
    MissingExtraError,
    ShardMismatchError,
    UnsupportedDtypeError,
    UsageError,
)
from safeshard.format.header import TensorInfo
from safeshard.futures import wait_all
from safeshard.io.bytesrc import IOV_MAX, ByteSource, Extent, read_exact
from safeshard.io.ranges import coalesce
from safeshard.io.store import open_source

Framework = Literal["torch", "numpy"]
Job = TypeVar("Job")
Unsupported = Literal["error", "raw"]

CHUNK_BYTES = 16 * 1024 * 1024
"""Largest read job: big tensors are split so threads share the work evenly.

On the 2-core development machine (virtio disk, 8 MiB readahead), 8 threads of
16 MiB reads read a cold 1.6 GB checkpoint faster than 4 threads of 64 MiB
(median 0.66 s against 1.07 s) and a warm one as fast."""

MIN_CHUNK_BYTES = 1024 * 1024
"""Smallest job that :func:`job_size` picks when a small read is shared among threads."""

CUDA_CHUNK_BYTES = 16 * 1024 * 1024
"""Size of each pinned staging buffer for ``device="cuda"`` (two per worker)."""


TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
"""safetensors dtype -> ``torch`` attribute name (used when the installed torch has it)."""

NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}
"""safetensors dtype -> numpy dtype name. numpy has no bfloat16 or fp8 types."""


def default_workers() -> int:
    """Threads for parallel reads: twice the CPUs, at least 8 (reads wait on the disk
    more than on the CPU) and at most 16."""
    return max(8, min(16, 2 * (os.cpu_count() or 1)))


# --------------------------------------------------------------------------- frameworks


def import_torch() -> Any:
    """``torch``, or :class:`MissingExtraError` naming the extra to install."""
    try:
        import torch
    except ImportError as e:
        raise MissingExtraError(
            f"loading tensors with framework='torch' needs PyTorch, which is not installed "
            f"({e}); run: pip install 'safeshard[torch]'"
        ) from None
    return torch


def import_numpy() -> Any:
    """``numpy``, or :class:`MissingExtraError` naming the extra to install."""
    try:
        import numpy
    except ImportError as e:
        raise MissingExtraError(
            f"loading arrays with framework='numpy' needs NumPy, which is not installed "
            f"({e}); run: pip install 'safeshard[numpy]'"
        ) from None
    return numpy


class Backend:
    """How one framework allocates a byte buffer and views it as a typed tensor."""

    name: str = ""

    def native_dtype(self, dtype: str) -> Any | None:
        """The framework's dtype for safetensors ``dtype``, or None if it has none."""
        raise NotImplementedError

    def empty(self, nbytes: int) -> tuple[Any, memoryview]:
        """A fresh uint8 buffer of ``nbytes`` and a writable memoryview of its bytes."""
        raise NotImplementedError

    def finish(self, buf: Any, info: TensorInfo, raw: bool) -> Any:
        """The tensor for ``info`` over ``buf`` (flat uint8 when ``raw``)."""
        raise NotImplementedError


class TorchBackend(Backend):
    name = "torch"

    def __init__(self) -> None:
        self.torch = import_torch()

    def native_dtype(self, dtype: str) -> Any | None:
        attr = TORCH_DTYPES.get(dtype)
        return getattr(self.torch, attr, None) if attr else None

    def empty(self, nbytes: int) -> tuple[Any, memoryview]:
        t = self.torch.empty(nbytes, dtype=self.torch.uint8)
        return t, memoryview_at(t.data_ptr(), nbytes)

    def finish(self, buf: Any, info: TensorInfo, raw: bool) -> Any:
        if raw:
            return buf
        return buf.view(self.native_dtype(info.dtype)).reshape(info.shape)


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self) -> None:
        self.np = import_numpy()

    def native_dtype(self, dtype: str) -> Any | None:
        attr = NUMPY_DTYPES.get(dtype)
        return self.np.dtype(attr).newbyteorder("<") if attr else None

    def empty(self, nbytes: int) -> tuple[Any, memoryview]:
        a = numpy_empty(self.np, nbytes)
        return a, memoryview(a).cast("B")

    def finish(self, buf: Any, info: TensorInfo, raw: bool) -> Any:
        if raw:
            return buf
        return buf.view(self.native_dtype(info.dtype)).reshape(info.shape)


HUGEPAGE_FROM = 4 * 1024 * 1024
"""numpy advises the kernel to back allocations of this size and more with huge pages."""

_hugepage_lock = threading.Lock()


def numpy_empty(np: Any, nbytes: int) -> Any:
    """``np.empty(nbytes, uint8)`` without numpy's huge-page advice, as torch allocates.

    numpy calls ``madvise(MADV_HUGEPAGE)`` on large allocations. Where the kernel's THP
    ``defrag`` setting is ``madvise`` (the default), each first touch of such memory may
    compact memory synchronously: on the 2-core VM of docs/object-storage.md, faulting in
    1 GiB took 1.27 s with the advice and 0.49 s without (torch: 0.49 s), and a ``load``
    spends that time inside its copies. The switch is numpy's own
    (``_set_madvise_hugepage``), turned off for this allocation only, under a lock so
    concurrent loads restore the caller's setting."""
    setter = _hugepage_setter(np)
    if setter is None or nbytes < HUGEPAGE_FROM:
        return np.empty(nbytes, dtype=np.uint8)
    with _hugepage_lock:
        previous = setter(False)
        try:
            return np.empty(nbytes, dtype=np.uint8)
        finally:
            setter(previous)


def _hugepage_setter(np: Any) -> Callable[[bool], bool] | None:
    for mod in ("_core", "core"):
        setter = getattr(
            getattr(getattr(np, mod, None), "multiarray", None), "_set_madvise_hugepage", None
        )
        if callable(setter):
            return setter  # type: ignore[no-any-return]
    return None


def backend_for(framework: str) -> Backend:
    """The :class:`Backend` for ``framework`` ("torch" or "numpy")."""
    if framework == "torch":
        return TorchBackend()
    if framework == "numpy":
        return NumpyBackend()
    raise UsageError(f"framework must be 'torch' or 'numpy', not {framework!r}")


def memoryview_at(address: int, nbytes: int) -> memoryview:
    """A writable byte view of ``nbytes`` at ``address`` (memory the caller keeps alive)."""
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")


def check_dtype(backend: Backend, info: TensorInfo, path: str | Path, unsupported: str) -> bool:
    """Whether ``info`` loads raw; raise :class:`UnsupportedDtypeError` if it cannot load."""
    if backend.native_dtype(info.dtype) is not None:
        return False
    if unsupported == "raw":
        return True
    if unsupported != "error":
        raise UsageError(f"unsupported must be 'error' or 'raw', not {unsupported!r}")
    why = (
        "is a sub-byte type no framework stores unpacked"
        if info.dtype in ("F4", "F6_E2M3", "F6_E3M2")
        else f"has no {backend.name} dtype in the installed {backend.name}"
    )
    raise UnsupportedDtypeError(
        f"{path}: tensor {info.name!r} has dtype {info.dtype}, which {why}; pass "
        f"unsupported='raw' to get its {info.nbytes} stored bytes as a flat uint8 tensor"
        + (", or use framework='torch'" if backend.name == "numpy" else "")
    )


# --------------------------------------------------------------------------- reading


Span = Extent
"""A tensor's bytes in a shard: the I/O layer's one range type
(:class:`safeshard.io.bytesrc.Extent`)."""


@dataclass
class ReadJob:
    """One contiguous byte range of one source, read by one scatter read.

    ``parts`` are ``(span index, start inside that tensor, length)`` in file order.
    """

    source: ByteSource
    offset: int
    length: int = 0
    parts: list[tuple[int, int, int]] = field(default_factory=list)


def plan_jobs(spans: Sequence[Span], chunk: int | None = None) -> list[ReadJob]:
    """Cut ``spans`` into read jobs of at most ``chunk`` bytes, in file order.

    A span bigger than ``chunk`` (default :data:`CHUNK_BYTES`) is split across jobs;
    adjacent spans of one file share a job until it holds ``chunk`` bytes or
    :data:`IOV_MAX` parts.
    """
    if chunk is None:
        chunk = CHUNK_BYTES
    if chunk < 1:
        raise UsageError(f"chunk must be at least 1 byte, not {chunk}")
    order = sorted(range(len(spans)), key=lambda k: (spans[k].source.name, spans[k].offset))
    runs = coalesce(
        [(spans[k].offset, spans[k].nbytes) for k in order],
        max_run=chunk,
        max_parts=IOV_MAX,
        streams=[spans[k].source for k in order],
    )
    return [
        ReadJob(
            spans[order[r.parts[0][0]]].source,
            r.offset,
            r.length,
            [(order[i], start, n) for i, start, n in r.parts],
        )
        for r in runs
    ]


def job_size(total: int, workers: int) -> int:
    """Job size for reading ``total`` bytes with ``workers`` threads: about four jobs per
    thread so they finish together, between :data:`MIN_CHUNK_BYTES` and :data:`CHUNK_BYTES`.
    """
    if workers <= 1:
        return CHUNK_BYTES
    return max(min(MIN_CHUNK_BYTES, CHUNK_BYTES), min(CHUNK_BYTES, total // (4 * workers)))


class ShardFiles:
    """A checkpoint's shards opened as byte sources (:mod:`safeshard.io.bytesrc`: local files,
    or objects in storage), checked against their headers.

    Holds each shard open from the start, so a file replaced later cannot mix with the
    headers already validated; a size that changed since is :class:`ShardMismatchError`.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.sources: dict[str, ByteSource] = {}
        try:
            for h, f in zip(ckpt.headers, ckpt.located.files, strict=True):
                src = open_source(f)
                self.sources[h.path] = src
                if src.size != h.file_size:
                    raise ShardMismatchError(
                        f"{h.path}: the file is now {src.size} bytes but its header was read "
                        f"from a {h.file_size}-byte file; it changed while opening. Retry."
                    )
        except BaseException:
            self.close()
            raise

    @property
    def fds(self) -> dict[str, int]:
        """The local files' descriptors by path (for memory mapping)."""
        return {p: fd for p, s in self.sources.items() if (fd := s.fileno()) is not None}

    @property
    def closed(self) -> bool:
        return not self.sources and bool(self.ckpt.headers)

    def span(self, info: TensorInfo) -> Extent:
        h = self.ckpt.headers[self.ckpt.entries[info.name].shard]
        return Extent(self.sources[h.path], h.data_start + info.begin, info.nbytes, info.name)

    def run(self, job: ReadJob, spans: Sequence[Extent], views: Sequence[memoryview]) -> None:
        """Read ``job`` into ``views`` (one writable byte view per span)."""
        buffers = [views[k][start : start + n] for k, start, n in job.parts]
        what = f"tensor {spans[job.parts[0][0]].name!r}"
        read_exact(job.source, buffers, job.offset, what)

    def close(self) -> None:
        sources, self.sources = self.sources, {}
        for src in sources.values():
            src.close()

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_all(
    fn: Callable[[Job], None],
    jobs: Sequence[Job],
    workers: int,
    pool: ThreadPoolExecutor | None = None,
) -> None:
    """Run ``fn`` on every job: inline when ``workers`` is 1, else on ``pool`` or a new one."""
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            fn(j)
        return
    own = pool is None
    ex = pool or ThreadPoolExecutor(max_workers=workers, thread_name_prefix="safeshard-read")
    futures = [ex.submit(fn, j) for j in jobs]
    try:
        wait_all(futures)  # on an error, running reads finish before their buffers go
    finally:
        if own:
            ex.shutdown(wait=True)


def read_tensors(
    files: ShardFiles,
    backend: Backend,
    infos: Sequence[TensorInfo],
    *,
    workers: int,
    pool: ThreadPoolExecutor | None = None,
    unsupported: str = "error",
) -> dict[str, Any]:
    """Allocate and read ``infos`` (any of ``files``' tensors); returns name -> tensor."""
    raw = [check_dtype(backend, i, files.ckpt.path_of(i.name), unsupported) for i in infos]
    spans = [files.span(i) for i in infos]
    bufs: list[Any] = []
    views: list[memoryview] = []
    for info in infos:
        buf, view = backend.empty(info.nbytes)
        bufs.append(buf)
        views.append(view)
    jobs = plan_jobs(spans, job_size(sum(s.nbytes for s in spans), workers))
    run_all(lambda j: files.run(j, spans, views), jobs, workers, pool)
    return {i.name: backend.finish(b, i, r) for i, b, r in zip(infos, bufs, raw, strict=True)}


def check_workers(workers: int | None) -> int:
    """``workers`` validated, or the default; also refuses big-endian hosts."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise UnsupportedDtypeError(
            "safetensors stores little-endian data; safeshard loads only on little-endian hosts"
        )
    n = default_workers() if workers is None else workers
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"workers must be a positive integer, not {workers!r}")
    return n


def parse_device(backend: Backend, device: str) -> Any | None:
    """None for the CPU, a ``torch.device`` for CUDA device, else :class:`DeviceError`."""
    if device == "cpu":
        return None
    if not isinstance(backend, TorchBackend):
        raise DeviceError(
            f"device={device!r} needs framework='torch'; numpy arrays live on the CPU"
        )
    torch = backend.torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"device={device!r} is not a device torch knows ({e})") from None
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise DeviceError(
            f"device={device!r}: safeshard.load reads to 'cpu' or 'cuda'; load to the CPU "
            "and move the tensors with .to()"
        )
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device={device!r} asked for CUDA, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); use device='cpu' or install a CUDA build of torch"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(
            f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return dev


def read_tensors_cuda(
    files: ShardFiles,
    backend: TorchBackend,
    infos: Sequence[TensorInfo],
    workers: int,
    dev: Any,
    unsupported: str,
) -> dict[str, Any]:
    """Read through pinned staging buffers, overlapping disk reads with host-to-device copies.

    Each worker owns a CUDA stream and two pinned buffers of :data:`CUDA_CHUNK_BYTES`:
    while one buffer's copy runs on the stream, the worker reads the next job into the
    other, waiting on that buffer's previous copy first.
    """
    torch = backend.torch
    raw = [check_dtype(backend, i, files.ckpt.path_of(i.name), unsupported) for i in infos]
    spans = [files.span(i) for i in infos]
    dests = [torch.empty(i.nbytes, dtype=torch.uint8, device=dev) for i in infos]
    jobs = plan_jobs(spans, min(CUDA_CHUNK_BYTES, CHUNK_BYTES))
    state = threading.local()

    def run(job: ReadJob) -> None:
        if not hasattr(state, "stream"):
            state.stream = torch.cuda.Stream(device=dev)
            state.bufs = [
                torch.empty(CUDA_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)
            ]
            state.events = [None, None]
            state.turn = 0
        k = state.turn
        state.turn ^= 1
        if state.events[k] is not None:
            state.events[k].synchronize()
        buf = state.bufs[k]
        staging = memoryview_at(buf.data_ptr(), job.length)
        what = f"tensor {spans[job.parts[0][0]].name!r}"
        read_exact(job.source, [staging], job.offset, what)
        with torch.cuda.stream(state.stream):
            pos = 0
            for idx, start, n in job.parts:
                dests[idx][start : start + n].copy_(buf[pos : pos + n], non_blocking=True)
                pos += n
            ev = torch.cuda.Event()
            ev.record(state.stream)
        state.events[k] = ev

    try:
        run_all(run, jobs, workers)
    finally:
        torch.cuda.synchronize(dev)
    return {i.name: backend.finish(d, i, r) for i, d, r in zip(infos, dests, raw, strict=True)}
