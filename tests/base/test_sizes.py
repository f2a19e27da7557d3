"""Size strings: one table of accepted spellings and one of clear refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeshard.errors import SizeParseError
from safeshard.sizes import FAT32_LIMIT, format_size, parse_size

K, M, G, T = 10**3, 10**6, 10**9, 10**12
KI, MI, GI, TI = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4GB", 4 * G),
        ("4GiB", 4 * GI),
        ("500MB", 500 * M),
        ("500MiB", 500 * MI),
        ("3KB", 3 * K),
        ("3kB", 3 * K),
        ("3KiB", 3 * KI),
        ("2TB", 2 * T),
        ("2TiB", 2 * TI),
        ("123456", 123456),
        ("123456B", 123456),
        ("1", 1),
        ("fat32", FAT32_LIMIT),
        ("FAT32", FAT32_LIMIT),
        (" 4GB ", 4 * G),
        ("4 GB", 4 * G),
        ("1.5GB", 1_500_000_000),
        ("4.1GB", 4_100_000_000),  # not exact in binary floating point
        ("0.5KB", 500),
        (".5KiB", 512),
        ("1.25MiB", 1_310_720),
        (4 * G, 4 * G),
        ("5" + "0" * 30, 5 * 10**30),
    ],
)
def test_accepted(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


def test_fat32_is_four_gib_minus_one() -> None:
    assert FAT32_LIMIT == 4_294_967_295 == 4 * 1024**3 - 1


@pytest.mark.parametrize(
    "text, match",
    [
        ("4Gb", "bits"),
        ("4gb", "bits"),
        ("4mb", "bits"),
        ("4kb", "bits"),
        ("4Mib", "bits"),
        ("4b", "bits"),
        ("4XB", "unknown unit 'XB'"),
        ("4G", "unknown unit 'G'"),
        ("4 bytes", "unknown unit"),
        ("-4GB", "cannot read size"),
        ("-1", "cannot read size"),
        ("0", "positive"),
        ("0GB", "positive"),
        ("0.0", "positive"),
        ("", "cannot read size"),
        ("   ", "cannot read size"),
        ("GB", "cannot read size"),
        ("four GB", "cannot read size"),
        ("4.GB", "cannot read size"),
        ("1e9", "cannot read size"),
        ("4GB4", "cannot read size"),
        ("0.5B", "whole number"),
        ("1.0001KB", "whole number"),
        ("٤GB", "cannot read size"),  # an Arabic-Indic digit is not a size
        ("9" * 5000, "too long"),
        (0, "positive"),
        (-5, "positive"),
        (True, "not a size"),
    ],
)
def test_refused_with_a_clear_message(text: str | int, match: str) -> None:
    with pytest.raises(SizeParseError, match=match) as info:
        parse_size(text)
    assert isinstance(info.value, ValueError)


def test_bits_message_names_the_byte_spelling() -> None:
    with pytest.raises(SizeParseError, match="write GB for bytes"):
        parse_size("4gb")
    with pytest.raises(SizeParseError, match="write MiB for bytes"):
        parse_size("4mib")


@given(st.integers(1, 10**15))
def test_plain_numbers_are_bytes(n: int) -> None:
    assert parse_size(str(n)) == n == parse_size(n)


@given(
    st.integers(1, 10**6),
    st.sampled_from([("KB", K), ("MB", M), ("GB", G), ("TB", T), ("KiB", KI), ("GiB", GI)]),
)
def test_units_multiply(n: int, unit: tuple[str, int]) -> None:
    name, factor = unit
    assert parse_size(f"{n}{name}") == n * factor


@given(st.integers(0, 10**16))
def test_format_size_is_decimal_and_close(n: int) -> None:
    text = format_size(n)
    number, unit = text.split(" ")
    factor = {"B": 1, "KB": K, "MB": M, "GB": G, "TB": T}[unit]
    assert abs(float(number) * factor - n) <= 0.005 * factor
    if unit != "TB":
        assert float(number) < 1000


def test_format_size_examples() -> None:
    assert format_size(0) == "0 B"
    assert format_size(999) == "999 B"
    assert format_size(3_620_000_000) == "3.62 GB"
    assert format_size(FAT32_LIMIT) == "4.29 GB"


@pytest.mark.parametrize(
    "n, text", [(999_999, "1.00 MB"), (999_995_000, "1.00 GB"), (999_994_999, "999.99 MB")]
)
def test_format_size_rounds_up_into_the_next_unit(n: int, text: str) -> None:
    assert format_size(n) == text
