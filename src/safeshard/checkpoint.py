"""Finding a checkpoint the way the ecosystem does, and reading it as one set of tensors.

Given a folder: an index (``*.safetensors.index.json``) first; otherwise one
``.safetensors`` file, named by ``quantize_config.json``'s ``model_file_base_name``,
AutoGPTQ's ``gptq_model-{bits}bit-{group}g``, or ``model``. Two candidates that could
both be meant are an error that lists both.

This module is the one door from a path (local or a URL) to a checkpoint: every command
finds, locates and opens what it reads here, and reads headers, indexes, manifests and
config files through it (:func:`read_header`, :func:`read_index`, :func:`read_manifest`,
:func:`read_json_file`, :func:`quant_configs`).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeshard import gcpause
from safeshard.errors import (
    AmbiguousCheckpointError,
    CheckpointNotFoundError,
    IndexFormatError,
    ReadError,
    ShardMismatchError,
    read_error,
)
from safeshard.format.filenames import (
    ANY_INDEX_SUFFIX,
    INDEX_SUFFIX,
    RANK_RE,
    SHARD_RE,
    TP_RECORD_NAME,
)
from safeshard.format.header import Header, TensorInfo
from safeshard.format.index import ShardIndex, index_base, parse_index_bytes
from safeshard.format.manifest import Manifest, manifest_path
from safeshard.format.quant import QuantConfigs
from safeshard.futures import wait_all
from safeshard.io.bytesrc import ByteSource, header_of
from safeshard.io.store import (
    LOCAL,
    Place,
    StorageOptions,
    open_source,
    read_small_file,
    resolve,
    url_of,
)
from safeshard.io.storerr import storage_op

SAFETENSORS = ".safetensors"


@dataclass(frozen=True)
class Located:
    """Where a checkpoint is: a single file, or an index with its shards."""

    folder: Path
    files: tuple[Path, ...]
    index: ShardIndex | None = None
    place: Place = field(default=LOCAL, compare=False)
    """Where its files live, as :func:`find` decided."""

    @property
    def base(self) -> str:
        """Base name: ``model`` for ``model.safetensors`` or ``model.safetensors.index.json``."""
        if self.index is not None:
            return self.index.base
        return self.files[0].name[: -len(SAFETENSORS)]

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every weights path, the index included."""
        return self.files + ((self.index.path,) if self.index is not None else ())


def read_json_file(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path`` (local or in storage), or None if absent, not a
    regular file, unreadable or not a JSON object (nested too deeply for Python's parser
    included)."""
    try:
        data = read_small_file(path)
        obj = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return obj if isinstance(obj, dict) else None


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at ``path``.

    Reads only the first ``8 + N`` bytes; no tensor data is touched. A missing file
    is a :class:`CheckpointNotFoundError`, another I/O failure a
    :class:`~safeshard.errors.ReadError`. ``path`` may be an object in storage (a path
    from :func:`safeshard.io.store.as_path`): then two ranged reads, the length and the
    header.
    """
    return _header_at(path, open_source)


def _header_at(path: Any, open_file: Callable[[Any], ByteSource]) -> Header:
    try:
        src = open_file(path)
    except ReadError as e:
        if e.errno == errno.ENOENT:
            raise CheckpointNotFoundError(f"{path}: no such file") from None
        raise
    with src:
        return header_of(src)


HEADER_READERS = 8
"""Shard headers of a checkpoint in object storage read at once (each costs two requests
in a row: its length, then the header)."""


def _headers(files: Sequence[Any], place: Place) -> list[Header]:
    """Every file's header, in order: in object storage up to :data:`HEADER_READERS` at
    once, since each read waits out a round trip or two; locally one after another."""
    if place.local is not None or len(files) < 2:
        return [_header_at(f, place.open) for f in files]
    with ThreadPoolExecutor(min(HEADER_READERS, len(files))) as pool:
        futures = [pool.submit(_header_at, f, place.open) for f in files]
        wait_all(futures)
    return [f.result() for f in futures]


def read_index(path: str | os.PathLike[str], place: Place | None = None) -> ShardIndex:
    """Read and validate the index at ``path`` (local or in storage).

    A missing file is a :class:`CheckpointNotFoundError`, another I/O failure a
    :class:`~safeshard.errors.ReadError`.
    """
    try:
        # locally a regular file (never a FIFO, which would hang), of a bounded size
        data = read_small_file(path, operation="read the index", place=place)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such index") from None
    except OSError as e:
        raise read_error(path, "read the index", e) from None
    return parse_index_bytes(data, path)


def read_manifest(
    folder: Path, base: str, *, follow_symlinks: bool = True, place: Place | None = None
) -> Manifest | None:
    """The manifest for ``base`` in ``folder``, or None if there is none.

    Something by that name that is not a regular file (a folder, a FIFO, a device, a
    symlink loop; a symlink at all with ``follow_symlinks=False``, as in an output
    folder) or larger than :data:`~safeshard.io.localfs.MAX_SMALL_FILE` is an
    :class:`~safeshard.errors.IndexFormatError`, like a malformed manifest; a file that
    cannot be read is a :class:`~safeshard.errors.ReadError`. ``place``: where ``folder``
    lives, if the caller has decided it already.
    """
    p = manifest_path(folder, base)
    try:
        data = read_small_file(p, follow_symlinks=follow_symlinks, place=place)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ELOOP, errno.EISDIR, errno.EFBIG):
            raise IndexFormatError(f"{p}: not a manifest ({e.strerror})") from None
        raise read_error(p, "read the manifest", e) from None
    return Manifest.from_json(data, p)


def quant_configs(folder: Path | None) -> QuantConfigs:
    """The two config files that may say how a checkpoint was quantized, read from
    ``folder`` (either may be None)."""
    if folder is None:
        return QuantConfigs(None, None)
    return QuantConfigs(
        read_json_file(folder / "quantize_config.json"), read_json_file(folder / "config.json")
    )


@dataclass(frozen=True)
class Found:
    """Which checkpoint a path means, decided from file names alone (nothing is parsed):
    an index (``index``) or a single file (``file``), exactly one of them set."""

    folder: Path
    index: Path | None = None
    file: Path | None = None
    place: Place = field(default=LOCAL, compare=False)
    """Where its files live (local or object storage), decided once by :func:`find`."""

    @property
    def base(self) -> str:
        """``model`` for ``model.safetensors`` or ``model.safetensors.index.json``."""
        if self.index is not None:
            return index_base(self.index.name)
        if self.file is None:  # find() sets exactly one of index and file
            raise CheckpointNotFoundError(f"{self.folder}: no safetensors file or index")
        return self.file.name[: -len(SAFETENSORS)]


def find(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> Found:
    """Which checkpoint ``path`` (a ``.safetensors`` file, an index, or a folder) means.

    The one rule every command follows (``verify`` included, which then reads the
    index leniently). Raises :class:`CheckpointNotFoundError` when there is none and
    :class:`AmbiguousCheckpointError` when two could be meant. ``path`` may be a URL
    (:mod:`safeshard.io.store`), read with ``storage_options``.
    """
    p, place = resolve(path, storage_options)
    return _find(p, place)


def _kind(p: Path, place: Place) -> str | None:
    """``"file"``, ``"directory"``, or None where nothing is: in object storage one
    lookup (``exists`` then ``is_file`` would each ask the server, twice for a prefix)."""
    fs = getattr(p, "fs", None)
    if place.local is not None or fs is None:
        if not p.exists():
            return None
        return "file" if p.is_file() else "directory"
    try:
        info = fs.info(getattr(p, "path", str(p)))
    except FileNotFoundError:
        return None
    return "file" if info.get("type") == "file" else "directory"


def _find(p: Path, place: Place) -> Found:
    with storage_op(p, "look up"):
        kind = _kind(p, place)
    exists, is_file = kind is not None, kind == "file"
    if not exists:
        raise CheckpointNotFoundError(f"{p}: no such file or folder")
    if is_file:
        if p.name.endswith(INDEX_SUFFIX) or p.name.endswith(ANY_INDEX_SUFFIX):
            return Found(folder=p.parent, index=p, place=place)
        if p.name.endswith(SAFETENSORS):
            return Found(folder=p.parent, file=p, place=place)
        raise CheckpointNotFoundError(
            f"{p}: not a .safetensors file or a *.safetensors.index.json index"
        )
    with storage_op(f"{url_of(p).rstrip('/')}/", "list the prefix"):
        return _find_in_folder(p, place)


def locate(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> Located:
    """Find the checkpoint at ``path`` (see :func:`find`) and read its index strictly."""
    found = find(path, storage_options)
    if found.index is not None:
        return _from_index(found.index, found.place)
    if found.file is None:  # find() sets exactly one of index and file
        raise CheckpointNotFoundError(f"{path}: no safetensors file or index")
    return Located(folder=found.folder, files=(found.file,), place=found.place)


def _from_index(p: Path, place: Place) -> Located:
    idx = read_index(p, place)
    files = tuple(p.parent / f for f in idx.shard_files())
    return Located(folder=p.parent, files=files, index=idx, place=place)


def _base_of(filename: str) -> str:
    suffix = INDEX_SUFFIX if filename.endswith(INDEX_SUFFIX) else SAFETENSORS
    return filename[: -len(suffix)]


def _find_in_folder(folder: Path, place: Place) -> Found:
    indexes = sorted(p for p in folder.glob("*" + INDEX_SUFFIX) if p.is_file())
    shards_of_indexes: set[str] = set()
    for ip in indexes:
        base = ip.name[: -len(INDEX_SUFFIX)]
        for f in folder.glob(base + "-*" + SAFETENSORS):
            if SHARD_RE.match(f.name):
                shards_of_indexes.add(f.name)
    singles = sorted(
        f
        for f in folder.glob("*" + SAFETENSORS)
        if f.is_file() and f.name not in shards_of_indexes and not SHARD_RE.match(f.name)
    )
    candidates: list[Path] = list(indexes) + singles
    orphans = sorted(
        f.name
        for f in folder.glob("*" + SAFETENSORS)
        if SHARD_RE.match(f.name) and f.name not in shards_of_indexes
    )
    if not candidates and orphans:
        raise CheckpointNotFoundError(
            f"{folder}: shards without an index ({', '.join(orphans[:3])}"
            f"{', ...' if len(orphans) > 3 else ''}); the *.safetensors.index.json that lists "
            "them is missing, so which tensors they hold cannot be trusted. Pass one shard "
            "file to read it alone"
        )
    if not candidates and (folder / TP_RECORD_NAME).is_file():
        ranks = sorted(p.name for p in folder.iterdir() if RANK_RE.match(p.name))
        raise CheckpointNotFoundError(
            f"{folder}: the output of split --tp ({TP_RECORD_NAME} and "
            f"{len(ranks)} rank folder{'s' if len(ranks) != 1 else ''}"
            + (f": {ranks[0]} .." if ranks else "")
            + "), not one checkpoint: pass a rank folder, or rebuild the whole checkpoint "
            "with safeshard merge (safeshard inspect and verify read it as a whole; in Python, "
            "safeshard.inspect_tp and safeshard.verify)"
        )
    if not candidates:
        raise CheckpointNotFoundError(
            f"{folder}: no *.safetensors file or *.safetensors.index.json index in this folder"
        )
    if len(candidates) == 1:
        return _find(candidates[0], place)
    # Several. One base name with both an index and a single file: every loader tries
    # {base}.safetensors.index.json before {base}.safetensors, so the index is meant.
    # Two base names: transformers looks for `model`, AutoGPTQ and GPTQModel for
    # quantize_config's model_file_base_name or gptq_model-{bits}bit-{group}g first, so
    # different loaders would load different weights: refuse rather than guess.
    bases = {_base_of(c.name) for c in candidates}
    if len(bases) == 1 and indexes:
        return _find(indexes[0], place)
    listed = ", ".join(c.name for c in candidates)
    raise AmbiguousCheckpointError(
        f"{folder}: more than one checkpoint could be meant ({listed}); "
        "pass the file or index itself"
    )


@dataclass(frozen=True)
class Entry:
    """A tensor of a (possibly sharded) checkpoint: which file, and where in it."""

    info: TensorInfo
    shard: int  # position in Checkpoint.headers

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class Checkpoint:
    """A located checkpoint with every shard's header read (no tensor data read)."""

    located: Located
    headers: list[Header]
    place: Place
    """Where its files live (decided once, when it was opened): opens its shards and
    sidecar files, and says whether its folder is on this machine."""
    entries: dict[str, Entry] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.located.folder

    @property
    def index(self) -> ShardIndex | None:
        return self.located.index

    @property
    def metadata(self) -> dict[str, str] | None:
        """The ``__metadata__`` of the first shard (all shards carry the same for safeshard)."""
        return self.headers[0].metadata if self.headers else None

    def path_of(self, name: str) -> Path:
        """The file holding tensor ``name`` (a storage path for a checkpoint in storage)."""
        return self.located.files[self.entries[name].shard]

    def absolute_offset(self, name: str) -> int:
        e = self.entries[name]
        return self.headers[e.shard].data_start + e.info.begin

    def tensors(self) -> Iterator[TensorInfo]:
        for e in self.entries.values():
            yield e.info

    @property
    def total_tensor_bytes(self) -> int:
        return sum(e.info.nbytes for e in self.entries.values())

    @property
    def file_size(self) -> int:
        return sum(h.file_size for h in self.headers)


@gcpause.pausing
def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    check_index: bool = True,
    storage_options: StorageOptions = None,
) -> Checkpoint:
    """Locate ``path`` and read every shard's header.

    With ``check_index``, the index must agree with the shards: every listed tensor in
    its named shard, every shard tensor listed, no tensor in two shards; a
    disagreement raises :class:`ShardMismatchError`.
    """
    loc = locate(path, storage_options)
    with storage_op(loc.folder, "look up the shards in"):
        missing = [f for f in loc.files if not f.is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"{loc.index.path if loc.index else loc.folder}: shard "
            f"{', '.join(m.name for m in missing)} listed in the index does not exist"
        )
    place = loc.place  # local or in object storage: decided once, by find()
    headers = _headers(loc.files, place)
    entries: dict[str, Entry] = {}
    problems: list[str] = []
    new, setattr_ = object.__new__, object.__setattr__
    for i, h in enumerate(headers):
        for t in h.tensors:
            if t.name in entries:
                other = Path(headers[entries[t.name].shard].path).name
                problems.append(f"tensor {t.name!r} is in both {other} and {Path(h.path).name}")
                continue
            entries[t.name] = entry = new(Entry)  # Entry(info=t, shard=i), without __init__
            setattr_(entry, "info", t)
            setattr_(entry, "shard", i)
    if loc.index is not None and check_index:
        names = {Path(h.path).name: i for i, h in enumerate(headers)}
        for tensor, fname in loc.index.weight_map.items():
            e = entries.get(tensor)
            if e is None:
                problems.append(f"tensor {tensor!r} listed in the index for {fname} is in no shard")
            elif e.shard != names[fname]:
                actual = Path(headers[e.shard].path).name
                problems.append(f"tensor {tensor!r} is indexed to {fname} but lies in {actual}")
        for tensor in entries:
            if tensor not in loc.index.weight_map:
                problems.append(
                    f"tensor {tensor!r} in {Path(headers[entries[tensor].shard].path).name} "
                    "is not in the index"
                )
    if problems:
        where = loc.index.path if loc.index is not None else loc.folder
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ShardMismatchError(
            f"{where}: index and shards disagree: {'; '.join(problems[:5])}{more}. "
            "Run `safeshard verify` for the full list."
        )
    return Checkpoint(located=loc, headers=headers, place=place, entries=entries)


def common_metadata(ckpt: Checkpoint) -> tuple[dict[str, str] | None, list[str]]:
    """The ``__metadata__`` every shard shares, and a warning when shards disagree."""
    metas = [h.metadata for h in ckpt.headers]
    if not metas:
        return None, []
    first = metas[0]
    if all(m == first for m in metas):
        return (None if first is None else dict(first)), []
    common: dict[str, str] = {}
    if first is not None:
        for k, v in first.items():
            if all(m is not None and m.get(k) == v for m in metas):
                common[k] = v
    dropped = sorted({k for m in metas if m for k in m} - set(common))
    return common, [
        f"{ckpt.index.path if ckpt.index is not None else ckpt.folder}: the shards carry different "
        f"__metadata__; keeping only the entries they share (dropped: {', '.join(dropped)})"
    ]
