"""The safeshard error tree.

Every error safeshard raises derives from :class:`SafeshardError`. Each class also
inherits the builtin exception a caller would naturally catch, so
``except ValueError`` keeps working for code that does not know safeshard::

    SafeshardError
    ├── SizeParseError (ValueError)               a size string like "4GB" is malformed
    ├── UsageError (ValueError)                   options contradict each other or are invalid
    ├── HeaderError (ValueError)                  a .safetensors file is malformed
    │   ├── FileTooShortError                     fewer than 8 bytes
    │   ├── HeaderTooLargeError                   header length over 100,000,000
    │   ├── HeaderLengthError                     header runs past the end of the file
    │   ├── HeaderEncodingError                   header is not UTF-8
    │   ├── HeaderStartError                      padding before "{" that is not JSON whitespace
    │   ├── HeaderJSONError                       header is not JSON
    │   ├── HeaderNotObjectError                  header JSON is not an object
    │   ├── DuplicateKeyError                     a JSON object repeats a key
    │   ├── TensorEntryError                      a tensor entry lacks or mistypes a field
    │   ├── UnknownDtypeError                     dtype not on the official list
    │   ├── InvalidShapeError                     shape is not a list of non-negative ints
    │   ├── ByteRangeMismatchError                data_offsets disagree with shape × dtype
    │   ├── MisalignedTensorError                 sub-byte dtype not ending on a byte
    │   ├── OverlapError                          two tensors share bytes
    │   ├── GapError                              a hole between tensors
    │   ├── IncompleteDataError                   data does not end exactly at end of file
    │   └── MetadataError                         __metadata__ is not a str→str map
    ├── IndexFormatError (ValueError)             a *.safetensors.index.json is malformed
    │   └── UnsafeIndexPathError                  weight_map points outside the folder
    │       ├── IndexPathNulError                 a NUL byte (as written or percent-decoded)
    │       ├── IndexPathAbsoluteError            an absolute path or a drive
    │       ├── IndexPathSchemeError              a URL scheme (http:, s3:, file:)
    │       ├── IndexPathTraversalError           '..' (also %2E%2E)
    │       └── IndexPathSeparatorError           '/' or '\' (also %2F, %5C)
    ├── CheckpointNotFoundError (FileNotFoundError)
    ├── AmbiguousCheckpointError (ValueError)     two checkpoints could be meant
    ├── ShardMismatchError (ValueError)           index and shards disagree
    ├── PlanError (ValueError)                    a cap cannot be kept
    │   └── OversizeTensorError                   one tensor is larger than the cap
    ├── OutputExistsError (FileExistsError)       refusing to overwrite
    ├── OutputLockedError (BlockingIOError)       another process writes the output
    ├── UpdateError (ValueError)                  --update has no sound earlier split to build on
    ├── StorageError (OSError)                    reading or writing storage failed
    │   ├── ReadError                             a file or object could not be read
    │   └── WriteError                            an output could not be written
    │       ├── DiskFullError                     the disk filled up while writing
    │       ├── UnwritableOutputError (PermissionError)  read-only or not writable
    │       └── OutputFolderMissingError (FileNotFoundError)  the output's folder is missing
    ├── QuantizationConfigError (ValueError)      GPTQ settings inconsistent
    ├── BudgetError (MemoryError)                 a block is larger than the memory budget
    ├── ModelMismatchError (ValueError)           a checkpoint lacks or misshapes a model's tensor
    ├── ModelConfigError (ValueError)             config.json builds no model stream can run
    ├── MissingExtraError (ImportError)           torch/numpy needed but not installed
    ├── UnsupportedDtypeError (TypeError)         a dtype the chosen framework cannot hold
    ├── DeviceError (RuntimeError)                the requested device is not available
    ├── CheckpointClosedError (ValueError)        a lazy checkpoint was used after close()
    ├── SynthError (ValueError)                   unknown synth preset, bad layer count or dtype
    └── TensorParallelError (ValueError)          a TP split would cut a GPTQ group or a head
"""

from __future__ import annotations

import errno
from typing import Any

from safeshard.redact import redact

__all__ = [
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
    "IndexPathAbsoluteError",
    "IndexPathNulError",
    "IndexPathSchemeError",
    "IndexPathSeparatorError",
    "IndexPathTraversalError",
    "InvalidShapeError",
    "MetadataError",
    "MisalignedTensorError",
    "MissingExtraError",
    "ModelConfigError",
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
    "TensorParallelError",
    "UnknownDtypeError",
    "UnsafeIndexPathError",
    "UnsupportedDtypeError",
    "UnwritableOutputError",
    "UpdateError",
    "UsageError",
    "WriteError",
]


class SafeshardError(Exception):
    """Base of every error safeshard raises.

    Its text never holds credentials: every string argument passes through
    :func:`safeshard.redact.redact` (URL userinfo and presigned query strings become
    ``***``), so ``str()``, ``repr()`` and pickling show the redacted text only.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class SizeParseError(SafeshardError, ValueError):
    """A size string such as ``4GB`` could not be parsed."""


class UsageError(SafeshardError, ValueError):
    """Options that contradict each other or are invalid (e.g. a --name with a slash)."""


class HeaderError(SafeshardError, ValueError):
    """A safetensors file is malformed. ``path`` names the file."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = redact(str(path))
        self.problem = redact(problem)
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type[HeaderError], tuple[str, str]]:
        # pickle would call cls(message); keep errors intact across process pools
        return type(self), (self.path, self.problem)


class FileTooShortError(HeaderError):
    """The file is shorter than the 8-byte header length."""


class HeaderTooLargeError(HeaderError):
    """The header length exceeds 100,000,000 bytes."""


class HeaderLengthError(HeaderError):
    """The header length runs past the end of the file."""


class HeaderEncodingError(HeaderError):
    """The header is not valid UTF-8."""


class HeaderStartError(HeaderError):
    """Something other than JSON whitespace (a byte-order mark, NUL, form feed, another
    Unicode space) comes before the header's opening ``{``."""


class HeaderJSONError(HeaderError):
    """The header is not valid JSON."""


class HeaderNotObjectError(HeaderError):
    """The header JSON is not an object."""


class DuplicateKeyError(HeaderError):
    """A JSON object in the header repeats a key."""


class TensorEntryError(HeaderError):
    """A tensor entry is not an object with dtype, shape and data_offsets."""


class UnknownDtypeError(HeaderError):
    """A tensor's dtype is not on the official list."""


class InvalidShapeError(HeaderError):
    """A tensor's shape is not a list of non-negative integers."""


class ByteRangeMismatchError(HeaderError):
    """A tensor's data_offsets do not match shape × dtype size."""


class MisalignedTensorError(HeaderError):
    """A sub-byte dtype tensor does not end on a byte boundary."""


class OverlapError(HeaderError):
    """Two tensors' byte ranges overlap."""


class GapError(HeaderError):
    """There is a hole between two tensors' byte ranges."""


class IncompleteDataError(HeaderError):
    """The tensor data does not end exactly at the end of the file."""


class MetadataError(HeaderError):
    """``__metadata__`` is not a string-to-string map."""


class IndexFormatError(SafeshardError, ValueError):
    """A Hugging Face ``*.safetensors.index.json`` is malformed."""


class UnsafeIndexPathError(IndexFormatError):
    """A weight_map entry is not a plain ``.safetensors`` file name in the index's folder.

    Each rule below has its own subclass; every rule is checked on the name as written
    and percent-decoded (a URL carries the name as written, a server may decode it)."""


class IndexPathNulError(UnsafeIndexPathError):
    """A weight_map entry holds a NUL byte (``\\x00``, ``%00``)."""


class IndexPathAbsoluteError(UnsafeIndexPathError):
    """A weight_map entry is an absolute path or names a drive (``/x``, ``%2Fx``, ``C:``)."""


class IndexPathSchemeError(UnsafeIndexPathError):
    """A weight_map entry starts with a URL scheme (``http:``, ``s3:``, ``file:``)."""


class IndexPathTraversalError(UnsafeIndexPathError):
    """A weight_map entry climbs out of the folder with ``..`` (``%2E%2E`` included)."""


class IndexPathSeparatorError(UnsafeIndexPathError):
    """A weight_map entry has a path separator (``/``, ``\\``, ``%2F``, ``%5C``)."""


class CheckpointNotFoundError(SafeshardError, FileNotFoundError):
    """No checkpoint was found at the given path."""


class AmbiguousCheckpointError(SafeshardError, ValueError):
    """A folder holds more than one checkpoint that could be meant."""


class ShardMismatchError(SafeshardError, ValueError):
    """An index and its shards disagree (missing, extra or duplicated tensors)."""


class PlanError(SafeshardError, ValueError):
    """A shard plan cannot keep the requested cap."""


class OversizeTensorError(PlanError):
    """A single tensor is larger than the cap."""


class OutputExistsError(SafeshardError, FileExistsError):
    """The output already exists and overwriting was not requested."""


class OutputLockedError(SafeshardError, BlockingIOError):
    """Another process is writing the same output."""


class UpdateError(SafeshardError, ValueError):
    """A differential update cannot proceed: OUT_DIR holds no safeshard split that matches
    its manifest, or the new source changed while it was read."""


class StorageError(SafeshardError, OSError):
    """Reading or writing storage failed. ``str()`` names the file, the operation and the
    cause; ``errno`` and ``filename`` are those of the underlying :class:`OSError`."""

    def __init__(self, message: str, *, filename: str | None = None, err: int = errno.EIO) -> None:
        super().__init__(err, message)
        self.filename = None if filename is None else redact(str(filename))

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> Any:
        # pickle would call cls(errno, message); keep errors intact across process pools
        return (_rebuild_storage_error, (type(self), str(self.strerror), self.filename, self.errno))


def _rebuild_storage_error(
    cls: type[StorageError], message: str, filename: str | None, err: int
) -> StorageError:
    return cls(message, filename=filename, err=err)


class ReadError(StorageError):
    """A file or object could not be read (an I/O error, a vanished or shrunken file)."""


class WriteError(StorageError):
    """An output could not be written; the partial file, if any, was removed."""


class DiskFullError(WriteError):
    """The disk filled up while writing; the partial file was removed."""

    def __init__(
        self, message: str, *, filename: str | None = None, err: int = errno.ENOSPC
    ) -> None:
        super().__init__(message, filename=filename, err=err)


class UnwritableOutputError(WriteError, PermissionError):
    """The output is on a read-only file system, or the user may not write there."""


class OutputFolderMissingError(WriteError, FileNotFoundError):
    """The folder an output file should go into does not exist."""


def read_error(path: object, operation: str, e: OSError) -> ReadError:
    """A :class:`ReadError` for ``e``, raised while doing ``operation`` on ``path``."""
    why = e.strerror or str(e) or type(e).__name__
    return ReadError(
        f"{path}: cannot {operation}: {why}", filename=str(path), err=e.errno or errno.EIO
    )


def write_error(path: object, operation: str, e: OSError) -> WriteError:
    """The :class:`WriteError` subclass for ``e``, raised while doing ``operation`` on ``path``.

    A full disk is :class:`DiskFullError`; a read-only file system or a missing
    permission is :class:`UnwritableOutputError`; a missing folder is
    :class:`OutputFolderMissingError`. An error that already is a
    :class:`StorageError` is returned unchanged.
    """
    if isinstance(e, WriteError):
        return e
    why = e.strerror or str(e) or type(e).__name__
    code = e.errno or errno.EIO
    name = str(path)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return DiskFullError(
            f"{name}: the disk is full ({operation}); the partial file was removed. "
            "Free space or choose another output folder",
            filename=name,
            err=code,
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        where = "is on a read-only file system" if code == errno.EROFS else "is not writable"
        return UnwritableOutputError(
            f"{name}: cannot {operation}: the output {where}; choose a writable folder",
            filename=name,
            err=code,
        )
    if code in (errno.ENOENT, errno.ENOTDIR):
        return OutputFolderMissingError(
            f"{name}: cannot {operation}: {why}; create the folder first or choose another",
            filename=name,
            err=code,
        )
    return WriteError(f"{name}: cannot {operation}: {why}", filename=name, err=code)


class QuantizationConfigError(SafeshardError, ValueError):
    """GPTQ settings disagree with each other or with the tensor shapes."""


class BudgetError(SafeshardError, MemoryError):
    """A block is larger than the memory budget given to a lazy checkpoint."""


class ModelMismatchError(SafeshardError, ValueError):
    """A checkpoint does not fit the model it is streamed into: a tensor the model needs
    is missing, has another shape or an incompatible dtype, or has no place in it."""


class ModelConfigError(SafeshardError, ValueError):
    """A model folder's ``config.json`` builds no model that stream can run: transformers
    rejects it, or its model type has no head stream builds (the message names it)."""


class MissingExtraError(SafeshardError, ImportError):
    """An optional dependency (torch, numpy) is needed; the message names the extra."""


class UnsupportedDtypeError(SafeshardError, TypeError):
    """A tensor's dtype has no equivalent in the framework asked for."""


class DeviceError(SafeshardError, RuntimeError):
    """The device asked for (e.g. CUDA) is not available."""


class CheckpointClosedError(SafeshardError, ValueError):
    """A lazy checkpoint was used after it was closed."""


class SynthError(SafeshardError, ValueError):
    """A synthetic checkpoint cannot be made as asked (unknown preset, layers, dtype)."""


class TensorParallelError(SafeshardError, ValueError):
    """A tensor-parallel split cannot be made as planned (it would cut a GPTQ group, a
    packed word or an attention head); the message names the compatible world sizes."""
