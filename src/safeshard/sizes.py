"""Size strings, written the same way everywhere in safeshard.

``4GB`` is decimal (4,000,000,000), ``4GiB`` is binary (4 × 1024³), a plain
number is bytes, and ``fat32`` is FAT32's file limit, 4 GiB − 1 byte.
A lowercase ``b`` would mean bits, so it is refused rather than guessed.
"""

from __future__ import annotations

import re
from fractions import Fraction

from safeshard.errors import SizeParseError

FAT32_LIMIT = 4 * 1024**3 - 1
"""FAT32's largest file: 4 GiB − 1 byte (4,294,967,295)."""

NAMED_SIZES = {"fat32": FAT32_LIMIT}

UNITS = {
    "B": 1,
    "KB": 10**3,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
"""Accepted units, case-sensitive: the SI and IEC spellings."""

_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*$", re.ASCII)
_BYTE_UNITS = {u.lower(): u for u in reversed(UNITS)}  # KB wins over kB


def parse_size(text: str | int) -> int:
    """Parse ``text`` into a number of bytes.

    >>> parse_size("4GB"), parse_size("4GiB"), parse_size("fat32")
    (4000000000, 4294967296, 4294967295)
    """
    if isinstance(text, bool):
        raise SizeParseError(f"size {text!r} is not a size; write e.g. 4GB, 500MiB or 123456")
    if isinstance(text, int):
        if text <= 0:
            raise SizeParseError(f"size {text} must be a positive number of bytes")
        return text
    raw = str(text)
    if raw.strip().lower() in NAMED_SIZES:
        return NAMED_SIZES[raw.strip().lower()]
    m = _SIZE_RE.match(raw)
    if not m:
        raise SizeParseError(
            f"cannot read size {raw!r}; write a number with an optional unit, e.g. 4GB, 500MiB, "
            "123456 or fat32"
        )
    unit = m.group("unit") or "B"
    if unit not in UNITS:
        if unit.endswith("b") and unit.lower() in _BYTE_UNITS:
            raise SizeParseError(
                f"size {raw!r} ends in a lowercase 'b', which means bits; "
                f"write {_BYTE_UNITS[unit.lower()]} for bytes"
            )
        raise SizeParseError(
            f"unknown unit {unit!r} in size {raw!r}; use B, KB, MB, GB, TB (decimal) or "
            "KiB, MiB, GiB, TiB (binary)"
        )
    # Exact arithmetic: float would reject 4.1GB (4.1e9 is not exact in binary) and
    # overflow on long digit strings.
    try:
        value = Fraction(m.group("num")) * UNITS[unit]
    except ValueError:  # more digits than int() will convert
        raise SizeParseError(f"size {raw[:40]!r}... is too long to be a size") from None
    if value <= 0:
        raise SizeParseError(f"size {raw!r} must be a positive number of bytes")
    if value.denominator != 1:
        raise SizeParseError(f"size {raw!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Human-readable decimal size, e.g. ``3.62 GB``."""
    step = 1000.0
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if round(abs(value), 2) < step or unit == "TB":  # 999,999,999 is 1.00 GB
            return f"{n} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= step
    raise AssertionError("unreachable")
