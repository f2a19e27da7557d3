"""Fast loading of a whole checkpoint: :func:`load`, parallel positional reads into owned
tensors.

The reading itself is :mod:`safeshard.runtime.readers` (read jobs, the thread pool,
dtypes, ``device="cuda"``; see its docstring); with a ``tp_plan``, each rank's slices
are read by :mod:`safeshard.runtime.tpread`. Frameworks are optional extras, imported
only when asked for: ``framework="torch"`` (``pip install safeshard[torch]``) or
``framework="numpy"`` (``pip install safeshard[numpy]``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from safeshard.checkpoint import open_checkpoint
from safeshard.gcpause import paused
from safeshard.io.store import translate_errors
from safeshard.runtime.readers import (
    Framework,
    ShardFiles,
    TorchBackend,
    Unsupported,
    backend_for,
    check_workers,
    parse_device,
    read_tensors,
    read_tensors_cuda,
)
from safeshard.runtime.tpread import load_rank

__all__ = ["load"]


@translate_errors
def load(
    path: str | os.PathLike[str],
    *,
    framework: Framework = "torch",
    device: str = "cpu",
    workers: int | None = None,
    unsupported: Unsupported = "error",
    storage_options: Mapping[str, Any] | None = None,
    tp_plan: Mapping[str, str] | str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    tp_config: Mapping[str, Any] | None = None,
    tp_stats: Any = None,
) -> dict[str, Any]:
    """Read every tensor of the checkpoint at ``path`` into owned memory, in parallel.

    ``path`` is a ``.safetensors`` file, a folder, or a ``*.safetensors.index.json``,
    local or a URL (:mod:`safeshard.io.store`, reached with ``storage_options``): from
    object storage, each read job is parallel ranged GETs straight into the tensors'
    memory, with the bytes in flight bounded (:class:`safeshard.io.remote.RemoteLimits`).
    Returns name -> tensor (torch) or array (numpy), in the checkpoint's data order,
    byte-identical to what ``safetensors`` loads. ``workers`` threads read at once
    (default :func:`default_workers`; 1 reads sequentially in the calling thread).
    See the module docstring for dtypes, ``unsupported`` and ``device``.

    With ``tp_plan`` (a mapping of name patterns to transformers' styles, or ``"auto"``),
    each tensor is ``rank``'s slice of ``world_size`` (torch.distributed's when left out),
    and only the slices' bytes are read: see :mod:`safeshard.tpplan` (``tp_config`` gives head
    counts where no config.json is beside the weights; ``tp_stats``, a
    :class:`safeshard.tpplan.ReadStats`, counts the bytes read).
    """
    if tp_plan is not None:
        parse_device(backend_for(framework), device)
        out = load_rank(
            path,
            tp_plan=tp_plan,
            rank=rank,
            world_size=world_size,
            tp_config=tp_config,
            tp_stats=tp_stats,
            framework=framework,
            workers=workers,
            unsupported=unsupported,
            storage_options=storage_options,
        )
        return out if device == "cpu" else {k: v.to(device) for k, v in out.items()}
    nworkers = check_workers(workers)
    backend = backend_for(framework)
    dev = parse_device(backend, device)
    ckpt = open_checkpoint(path, storage_options=storage_options)
    infos = [e.info for e in ckpt.entries.values()]
    with ShardFiles(ckpt) as files, paused():
        if dev is not None and isinstance(backend, TorchBackend):
            return read_tensors_cuda(files, backend, infos, nworkers, dev, unsupported)
        return read_tensors(files, backend, infos, workers=nworkers, unsupported=unsupported)
