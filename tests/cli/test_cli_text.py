"""safeshard.cli._text.safe: the one gate between file-derived text and the terminal."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from safeshard.cli._text import safe


def test_controls_are_escaped_as_repr_would() -> None:
    assert safe("a\x1b[31mb") == r"a\x1b[31mb"
    assert safe("\x1b]0;title\x07") == r"\x1b]0;title\x07"
    assert safe("\x9b2J") == r"\x9b2J"
    assert safe("x\ny\rz\tw") == r"x\ny\rz\tw"
    assert safe("\x00\x7f\x80\x9f") == r"\x00\x7f\x80\x9f"
    assert safe("\u202eevil\u2066\u200b\u200d\ufeff") == r"\u202eevil\u2066\u200b\u200d\ufeff"
    assert safe("\u2028\u2029") == r"\u2028\u2029"
    assert safe("\ud800\udcff") == r"\ud800\udcff"
    assert safe("\U000e0041") == r"\U000e0041"  # a tag character (format)
    assert safe("a\xa0b") == r"a\xa0b"  # a space that is not U+0020


def test_printable_text_is_unchanged() -> None:
    for text in ("model.layers.0.weight", "[bold red]x[/]", "é漢字🙂", "a b", ":warning:", ""):
        assert safe(text) == text


def test_non_strings_are_converted() -> None:
    from pathlib import Path

    assert safe(Path("/tmp/a\x1bb")) == r"/tmp/a\x1bb"
    assert safe(12) == "12"


@given(st.text())
def test_result_is_printable_on_one_line(text: str) -> None:
    shown = safe(text)
    assert shown.isprintable()
    assert "\n" not in shown and "\r" not in shown


@given(st.text().filter(lambda t: "\\" not in t))
def test_nothing_is_lost(text: str) -> None:
    """Without a backslash in the input, the escapes decode back to the exact text."""
    shown = safe(text)
    assert shown.encode("ascii", "backslashreplace").decode("unicode_escape") == text


@given(
    st.text(
        alphabet=st.characters(
            blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
        )
        | st.just(" ")
    )
)
def test_printable_text_is_kept(text: str) -> None:
    assert safe(text) == text
