"""Telling a header read from a tensor read, for tests that spy on ``LocalFile.readinto``.

Every read of a local file goes through ``LocalFile.readinto``, the header's two reads
(the length, then the header, through :func:`safeshard.io.bytesrc.header_of`) included.
Tests that count the reads of tensor data skip the header's with :func:`in_header_read`.
"""

from __future__ import annotations

import sys
from types import FrameType

from safeshard.io import bytesrc

_HEADER_OF = bytesrc.header_of.__code__


def in_header_read() -> bool:
    """Whether the calling read was asked for by the header reader."""
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        if f.f_code is _HEADER_OF:
            return True
        f = f.f_back
    return False
