"""The parts of a multipart upload whose bytes are mostly copied on the server.

A shard written to object storage is its header followed by byte runs of source objects
in the same store. With S3's ``UploadPartCopy`` a part can be a byte range of an existing
object, copied by the server without passing through this machine; every part but the
last must hold at least :data:`MIN_PART` bytes (S3's 5 MiB floor). :func:`plan_parts`
lays a file out as such parts, pure arithmetic over sizes:

- the header, and any run (or run's tail) too small to be a part of its own, go into
  *sent* parts (:class:`SendPart`: bytes read with ranged GETs and uploaded), filled up to
  ``send_bytes``;
- the rest of each run is cut into *copied* parts (:class:`CopyPart`) of at most
  ``copy_bytes``.

The file's bytes are the parts' bytes in order, and every part but the last holds at
least :data:`MIN_PART` bytes (tested as properties).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from safeshard.errors import UsageError

__all__ = ["MIN_PART", "CopyPart", "Run", "SendPart", "plan_parts"]

MIB = 1024 * 1024

MIN_PART = 5 * MIB
"""S3's smallest part of a multipart upload, but for the last."""


@dataclass(frozen=True)
class Run:
    """Bytes ``[start, stop)`` of source number ``source``."""

    source: int
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class SendPart:
    """A part uploaded from here: the header's first ``header`` bytes (0 or all of it),
    then the bytes of ``runs`` read from their sources."""

    header: int
    runs: tuple[Run, ...]

    @property
    def nbytes(self) -> int:
        return self.header + sum(r.nbytes for r in self.runs)


@dataclass(frozen=True)
class CopyPart:
    """A part the server copies from a source object's bytes."""

    run: Run

    @property
    def nbytes(self) -> int:
        return self.run.nbytes


Part = SendPart | CopyPart


def plan_parts(header: int, runs: Sequence[Run], *, send_bytes: int, copy_bytes: int) -> list[Part]:
    """The parts of a file of ``header`` bytes then ``runs`` (see the module docs)."""
    if send_bytes < MIN_PART or copy_bytes < MIN_PART:
        raise UsageError(
            f"part sizes must be at least {MIN_PART} bytes "
            f"(send_bytes={send_bytes}, copy_bytes={copy_bytes})"
        )
    parts: list[Part] = []
    head = header
    pending: list[Run] = []  # the sent part being filled
    filled = header

    def close_send() -> None:
        nonlocal head, pending, filled
        if filled:
            parts.append(SendPart(head, tuple(pending)))
        head, pending, filled = 0, [], 0

    todo = [r for r in runs if r.nbytes > 0]
    for i, r in enumerate(todo):
        last_run = i == len(todo) - 1
        pos = r.start
        if filled >= send_bytes:
            close_send()
        if filled:  # top up the open sent part first
            take = min(r.stop - pos, send_bytes - filled)
            pending.append(Run(r.source, pos, pos + take))
            filled += take
            pos += take
            if filled < send_bytes:
                continue  # the run is used up; the part stays open
            close_send()
        while pos < r.stop:
            rest = r.stop - pos
            if rest < MIN_PART and not last_run:
                pending.append(Run(r.source, pos, r.stop))  # too small to copy alone
                filled = rest
                break
            take = min(rest, copy_bytes)
            parts.append(CopyPart(Run(r.source, pos, pos + take)))
            pos += take
    close_send()
    return parts
