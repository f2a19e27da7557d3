"""safeshard: split, merge, verify and load large safetensors checkpoints.

The public API is this module and :mod:`safeshard.errors`; every other module (the wings
``format``, ``io``, ``ops``, ``runtime``, ``cli`` and the door ``checkpoint``) is internal
and may change (docs/architecture.md maps them). The core (header, plan, split, merge,
verify) needs neither torch nor numpy.
"""

from __future__ import annotations

__version__ = "0.1.0"

from safeshard import errors
from safeshard.checkpoint import Checkpoint, locate, open_checkpoint, read_header, read_index
from safeshard.errors import *  # noqa: F403
from safeshard.format.header import Header, TensorInfo
from safeshard.format.index import ShardIndex
from safeshard.io.remote import DEFAULT_LIMITS as DEFAULT_REMOTE_LIMITS
from safeshard.io.remote import RemoteLimits, RemoteStats
from safeshard.ops.diff import DiffReport, diff
from safeshard.ops.inspect import InspectReport, TpInspectReport, inspect, inspect_tp
from safeshard.ops.merge import MergeResult, merge
from safeshard.ops.split import SplitResult, split
from safeshard.ops.synth import synthesize
from safeshard.ops.tpsplit import TpSplitResult
from safeshard.ops.update import UpdateResult, update
from safeshard.ops.verify import Finding, VerifyReport, verify
from safeshard.runtime.lazy import LazyCheckpoint
from safeshard.runtime.lazy import open as open  # torch/numpy are imported only when used
from safeshard.runtime.load import load
from safeshard.runtime.membudget import AutoBudget, MemoryReading
from safeshard.runtime.stream import empty_model, stream, streamer_of
from safeshard.runtime.textgen import TextStreamer
from safeshard.sizes import FAT32_LIMIT, parse_size
from safeshard.tpplan import ReadStats

# `open` is exported but left out of __all__ so `from safeshard import *` keeps the builtin.
__all__ = [
    "DEFAULT_REMOTE_LIMITS",
    "FAT32_LIMIT",
    "AutoBudget",
    "MemoryReading",
    "ReadStats",
    "RemoteLimits",
    "RemoteStats",
    "TextStreamer",
    "TpInspectReport",
    "TpSplitResult",
    "inspect_tp",
    "synthesize",
    "Checkpoint",
    "DiffReport",
    "Finding",
    "Header",
    "InspectReport",
    "LazyCheckpoint",
    "MergeResult",
    "ShardIndex",
    "SplitResult",
    "TensorInfo",
    "UpdateResult",
    "VerifyReport",
    "__version__",
    "diff",
    "empty_model",
    "inspect",
    "load",
    "locate",
    "merge",
    "open_checkpoint",
    "parse_size",
    "read_header",
    "read_index",
    "split",
    "stream",
    "streamer_of",
    "update",
    "verify",
    *errors.__all__,
]
