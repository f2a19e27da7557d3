"""What both output transactions share: the journal, its records, and the one commit plan.

:class:`~safeshard.io.transaction.OutputFolder` (a local folder) and
:class:`~safeshard.io.remote.RemoteFolder` (a prefix in object storage) keep the same
journal (:class:`Journal`, one JSON object per line) and commit in the same order, which
:func:`commit_plan` computes once, as a list of :class:`Step`:

1. when any shard moves or goes, the existing finals (the manifest, the index) are
   removed first, the index before the manifest, so that no index ever lists a file
   being replaced;
2. the staged files are moved into place;
3. the files the new checkpoint no longer has are removed;
4. the finals are written last, the manifest then the index (or removed, when the new
   checkpoint has none); when nothing else changes, a final is written only when its
   bytes change.

Each back end applies the plan its own way: the local folder stages the finals, writes
the plan into its journal as a commit record and renames (so a killed commit is rolled
forward); object storage copies on the server and uploads the finals.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from safeshard.format.filenames import (
    ANY_INDEX_SUFFIX,
    MANIFEST_SUFFIX,
    STAGE_PREFIX,
    TMP_PREFIX,
    is_plain_name,
)

__all__ = [
    "JOURNAL_FORMAT",
    "JOURNAL_VERSION",
    "STEPS",
    "FileRecord",
    "Journal",
    "Step",
    "StepHook",
    "commit_plan",
    "journal_line",
    "removal_order",
]

StepHook = Callable[[str], None]
"""Called with the name of each step an output transaction reaches (tests kill there)."""

STEPS = (
    "locked",
    "started",
    "removed",
    "writing:NAME",
    "written:NAME",
    "staged:NAME",
    "journaled:NAME",
    "committing",
    "moved:NAME",
    "committed",
)
"""The steps an output transaction reports to ``on_step``, in the order they can happen;
``NAME`` is the final file name concerned."""

JOURNAL_FORMAT = "safeshard-journal"
JOURNAL_VERSION = 2


@dataclass(frozen=True)
class FileRecord:
    """What the journal knows of a finished file: size, the digest of its header bytes,
    each tensor's digest, its SHA-256 when computed, and, while it waits for the commit,
    its temporary name."""

    size: int
    header: str | None
    tensors: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None
    staged: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "header": self.header,
            "sha256": self.sha256,
            "tensors": self.tensors,
            "staged": self.staged,
        }

    @classmethod
    def from_json(cls, obj: Any) -> FileRecord:
        staged = obj.get("staged")
        if staged is not None and not (
            isinstance(staged, str) and staged.startswith(STAGE_PREFIX) and is_plain_name(staged)
        ):
            raise ValueError(f"bad staged name {staged!r}")
        tensors = obj.get("tensors", {})
        if not isinstance(tensors, dict):
            raise ValueError("tensors must be an object")
        header, sha = obj.get("header"), obj.get("sha256")
        return cls(
            size=int(obj["size"]),
            header=None if header is None else str(header),
            tensors={str(k): str(v) for k, v in tensors.items()},
            sha256=None if sha is None else str(sha),
            staged=staged,
        )


# --------------------------------------------------------------------------- journal


@dataclass
class Journal:
    """The journal: one JSON object per line.

    Line kinds: ``{"start": {...}}`` (format, kind, fingerprint), ``{"file": [name, record]}``
    and ``{"commit": [[op, ...], ...]}``. A torn last line (a kill mid-append) is ignored.
    """

    kind: str
    fingerprint: str
    files: dict[str, FileRecord] = field(default_factory=dict)
    commit: list[tuple[str, ...]] | None = None

    @classmethod
    def parse(cls, data: bytes) -> Journal | None:
        lines = data.split(b"\n")
        journal: Journal | None = None
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if journal is None:
                    start = obj["start"]
                    if start.get("format") != JOURNAL_FORMAT:
                        return None
                    if start.get("version") != JOURNAL_VERSION:
                        return None
                    journal = cls(str(start["kind"]), str(start["fingerprint"]))
                elif "file" in obj:
                    name, rec = obj["file"]
                    if not isinstance(name, str) or not is_plain_name(name):
                        return None
                    journal.files[name] = FileRecord.from_json(rec)
                elif "commit" in obj:
                    journal.commit = [_op(x) for x in obj["commit"]]
                else:
                    return None
            except (ValueError, KeyError, TypeError, AttributeError):
                if i == len(lines) - 1:
                    break  # a last line without its newline: an append cut short by a kill
                return None
        return journal

    def encode(self) -> bytes:
        """The start line and a line per file (what a new journal holds)."""
        start = {
            "format": JOURNAL_FORMAT,
            "version": JOURNAL_VERSION,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
        }
        lines = [journal_line({"start": start})]
        lines += [journal_line({"file": [n, r.to_json()]}) for n, r in self.files.items()]
        return b"".join(lines)


def _op(x: Any) -> tuple[str, ...]:
    """A commit operation, checked: ``("rm", name)`` or ``("mv", staged name, final name)``."""
    if not isinstance(x, list) or not all(isinstance(p, str) and is_plain_name(p) for p in x[1:]):
        raise ValueError(f"bad commit operation {x!r}")
    if x[:1] == ["rm"] and len(x) == 2:
        return ("rm", x[1])
    if x[:1] == ["mv"] and len(x) == 3 and x[1].startswith(TMP_PREFIX):
        return ("mv", x[1], x[2])
    raise ValueError(f"bad commit operation {x!r}")


def journal_line(obj: Any) -> bytes:
    """One journal line: compact JSON and a newline."""
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


# --------------------------------------------------------------------------- the commit plan


@dataclass(frozen=True)
class Step:
    """One step of a commit: remove ``name`` (``rm``), move the staged file ``tmp`` to
    ``name`` (``mv``), or write a final's ``data`` as ``name`` (``put``)."""

    op: Literal["rm", "mv", "put"]
    name: str
    tmp: str = ""
    data: bytes = b""


def commit_plan(
    moves: Sequence[tuple[str, str]],
    remove: Sequence[str],
    finals: Mapping[str, bytes | None],
    *,
    exists: Callable[[str], bool],
    current: Callable[[str], bytes | None],
) -> list[Step]:
    """The steps of a commit, in order (see the module docs).

    ``moves``: ``(temporary name, final name)`` of staged files. ``remove``: files the new
    checkpoint no longer has. ``finals``: the small files that describe the checkpoint, in
    the order they are written last (the manifest, then the index); None means the new
    checkpoint has no such file. ``exists`` says whether a file is there (a back end that
    removes a missing file for free may answer True), ``current`` what a final holds now
    (None: absent or unreadable).
    """
    plan: list[Step] = []
    changing = bool(moves or remove)
    if changing:
        plan += [Step("rm", n) for n in reversed(list(finals)) if exists(n)]
    plan += [Step("mv", n, tmp=tmp) for tmp, n in moves]
    plan += [Step("rm", n) for n in remove]
    for n, data in finals.items():
        if data is None:
            if exists(n):
                plan.append(Step("rm", n))
        elif changing or current(n) != data:
            plan.append(Step("put", n, data=data))
    return plan


def removal_order(names: Iterable[str]) -> list[str]:
    """``names`` in the order to remove them: indexes first, then manifests, then the rest
    (so no index ever lists a file that is gone)."""
    return sorted(
        names,
        key=lambda n: (not n.endswith(ANY_INDEX_SUFFIX), not n.endswith(MANIFEST_SUFFIX), n),
    )
