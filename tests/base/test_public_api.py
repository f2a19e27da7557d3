"""The public API: ``safeshard`` and ``safeshard.errors``, and nothing else.

Every name below worked before the package was split into wings (issue 15) or was added
at the root then; a name dropped or renamed fails here. Every public attribute of the
root is listed in ``__all__`` (``open`` excepted: it is exported but kept out of
``__all__`` so ``from safeshard import *`` keeps the builtin), and every name in
``__all__`` resolves.
"""

from __future__ import annotations
import __future__

import inspect
import subprocess
import sys
import types

import pytest

import safeshard
from safeshard import errors

# The root's public names before the restructure (safeshard/__init__.py at 913735d).
BEFORE = {
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
}

# What the docs used to reach through internal modules, now re-exported at the root.
ADDED = {
    "AutoBudget",
    "DEFAULT_REMOTE_LIMITS",
    "MemoryReading",
    "ReadStats",
    "RemoteLimits",
    "RemoteStats",
    "TextStreamer",
    "TpSplitResult",
    "synthesize",
}

# Added since, for the output folder of split --tp.
ADDED_TP = {"TpInspectReport", "inspect_tp"}

# The error tree at 913735d (safeshard.errors.__all__), every one also at the root.
ERRORS_BEFORE = {
    "AmbiguousCheckpointError",
    "BudgetError",
    "ByteRangeMismatchError",
    "CheckpointClosedError",
    "CheckpointNotFoundError",
    "DeviceError",
    "DiskFullError",
    "DuplicateKeyError",
    "FileTooShortError",
    "GapError",
    "HeaderEncodingError",
    "HeaderError",
    "HeaderJSONError",
    "HeaderLengthError",
    "HeaderNotObjectError",
    "HeaderStartError",
    "HeaderTooLargeError",
    "IncompleteDataError",
    "IndexFormatError",
    "InvalidShapeError",
    "MetadataError",
    "MisalignedTensorError",
    "MissingExtraError",
    "ModelMismatchError",
    "OutputExistsError",
    "OutputFolderMissingError",
    "OutputLockedError",
    "OverlapError",
    "OversizeTensorError",
    "PlanError",
    "QuantizationConfigError",
    "ReadError",
    "SafeshardError",
    "ShardMismatchError",
    "SizeParseError",
    "StorageError",
    "SynthError",
    "TensorEntryError",
    "UnknownDtypeError",
    "UnsafeIndexPathError",
    "UnsupportedDtypeError",
    "UnwritableOutputError",
    "UpdateError",
    "UsageError",
    "WriteError",
}


def test_every_name_that_worked_before_still_works() -> None:
    for name in sorted(BEFORE | ADDED | ADDED_TP):
        assert name in safeshard.__all__, name
        assert getattr(safeshard, name) is not None, name
    assert callable(safeshard.open)
    assert "open" not in safeshard.__all__


def test_all_lists_exactly_the_public_attributes() -> None:
    public = {
        name
        for name, value in vars(safeshard).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and value is not __future__.annotations
    }
    assert public - {"open"} == set(safeshard.__all__) - {"__version__"}


def test_the_error_tree_is_public_at_both_doors() -> None:
    assert set(errors.__all__) >= ERRORS_BEFORE
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert getattr(safeshard, name) is cls, name
        if inspect.isclass(cls) and issubclass(cls, BaseException):
            assert issubclass(cls, errors.SafeshardError), name
    public = {
        name
        for name, value in vars(errors).items()
        if not name.startswith("_") and inspect.isclass(value) and issubclass(value, Exception)
    }
    assert public <= set(errors.__all__), public - set(errors.__all__)


@pytest.mark.parametrize(
    "name", ["split", "merge", "load", "verify", "diff", "inspect", "update", "stream"]
)
def test_no_command_is_shadowed_by_a_module(name: str) -> None:
    """The functions are what the root gives; the modules live in their wings."""
    fn = getattr(safeshard, name)
    assert callable(fn) and not isinstance(fn, types.ModuleType)
    assert fn.__module__.startswith(("safeshard.ops.", "safeshard.runtime.")), fn.__module__


def test_importing_safeshard_pulls_no_heavy_dependency() -> None:
    code = (
        "import sys, safeshard; heavy = ('torch', 'numpy', 'transformers', 'fsspec', 's3fs');"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
