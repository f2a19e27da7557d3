"""safeshard: split, merge, verify and load large safetensors checkpoints.

The core (header, plan, split, merge, verify) needs neither torch nor numpy.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import errors
from .diff import DiffReport, diff
from .errors import *  # noqa: F403
from .header import Header, TensorInfo, read_header
from .index import ShardIndex, read_index
from .inspect import InspectReport, inspect
from .lazy import LazyCheckpoint
from .lazy import open as open  # torch/numpy are imported only when used
from .load import load
from .merge import MergeResult, merge
from .sizes import FAT32_LIMIT, parse_size
from .source import Checkpoint, locate, open_checkpoint
from .split import SplitResult, split
from .stream import empty_model, stream, streamer_of
from .update import UpdateResult, update
from .verify import Finding, VerifyReport, verify

# `open` is exported but left out of __all__ so `from safeshard import *` keeps the builtin.
__all__ = [
    "FAT32_LIMIT",
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
