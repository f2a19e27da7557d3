"""Every file name safeshard writes or recognizes, in one place.

Checkpoint files (shards, the index, the manifest) and the names of an output folder's
bookkeeping (temporaries, the lock, the journal, staged files). Pure names: nothing here
opens a file.
"""

from __future__ import annotations

import re

__all__ = [
    "ANY_INDEX_SUFFIX",
    "INDEX_SUFFIX",
    "JOURNAL_NAME",
    "LOCK_NAME",
    "MANIFEST_SUFFIX",
    "RANK_RE",
    "SHARD_RE",
    "STAGE_PREFIX",
    "TMP_PREFIX",
    "TP_RECORD_NAME",
    "is_plain_name",
    "rank_folder_name",
    "shard_name",
    "temp_name",
]

# --------------------------------------------------------------------------- checkpoint files

INDEX_SUFFIX = ".safetensors.index.json"
"""The index of a sharded checkpoint: ``{base}.safetensors.index.json``."""

ANY_INDEX_SUFFIX = ".index.json"
"""What every index name ends with (also the older ``{base}.index.json``)."""

MANIFEST_SUFFIX = ".safeshard.json"
"""safeshard's manifest beside a checkpoint: ``{base}.safeshard.json``."""

SHARD_RE = re.compile(r"^(?P<base>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")
"""``{base}-{i:05d}-of-{n:05d}.safetensors``"""


def shard_name(base: str, i: int, n: int) -> str:
    """``{base}-{i:05d}-of-{n:05d}.safetensors`` with ``i`` counted from 1."""
    return f"{base}-{i:05d}-of-{n:05d}.safetensors"


# --------------------------------------------------------------------------- tensor-parallel output

TP_RECORD_NAME = "tp.json"
"""The record of a tensor-parallel split (``split --tp``): plan, world size, each tensor's
slice per rank; written last, beside the rank folders."""

RANK_RE = re.compile(r"^rank-(?P<r>\d{5})-of-(?P<n>\d{5})$")
"""``rank-{r:05d}-of-{n:05d}``"""


def rank_folder_name(rank: int, world_size: int) -> str:
    """``rank-{rank:05d}-of-{world_size:05d}``: the folder of one rank's checkpoint (ranks
    counted from 0, as torch.distributed counts them)."""
    return f"rank-{rank:05d}-of-{world_size:05d}"


# --------------------------------------------------------------------------- an output folder's own

TMP_PREFIX = ".safeshard-tmp-"
"""Every temporary safeshard creates starts with this (hidden; removed on recovery)."""

STAGE_PREFIX = f"{TMP_PREFIX}stage-"
"""Temporary name of a file waiting for its rename: ``.safeshard-tmp-stage-{name}.part``."""

LOCK_NAME = ".safeshard.lock"
"""The lock file (or lock object) of an output folder."""

JOURNAL_NAME = ".safeshard-journal.json"
"""The journal of an output transaction (a local file, or an object under a prefix)."""


def temp_name(name: str, *, stage: bool = False) -> str:
    """The temporary name of ``name``: hidden, and never ending in ``.safetensors`` or
    ``.json``, so no loader that globs a folder can mistake it for a checkpoint file."""
    return f"{STAGE_PREFIX if stage else TMP_PREFIX}{name}.part"


def is_plain_name(name: str) -> bool:
    """Whether ``name`` is a plain file name (no folder part, not ``.``/``..``, no NUL)."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
    )
