"""safeshard: split, merge, verify and load large safetensors checkpoints.

The core (header, plan, split, merge, verify) needs neither torch nor numpy.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import errors
from .errors import *  # noqa: F403
from .header import Header, TensorInfo, read_header
from .index import ShardIndex, read_index
from .sizes import FAT32_LIMIT, parse_size
from .source import Checkpoint, locate, open_checkpoint

__all__ = [
    "FAT32_LIMIT",
    "Checkpoint",
    "Header",
    "ShardIndex",
    "TensorInfo",
    "__version__",
    "locate",
    "open_checkpoint",
    "parse_size",
    "read_header",
    "read_index",
    *errors.__all__,
]
