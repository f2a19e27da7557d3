r"""Make text from files and users safe to show on a terminal.

Tensor names, metadata, file names, index entries and the error messages that quote
them come from checkpoints downloaded from anywhere. Written raw, an ``ESC [``
sequence recolours or clears the terminal, ``ESC ] 0 ; ... BEL`` retitles it, the C1
control U+009B acts as ``ESC [`` on many terminals, a newline forges a line of output,
and U+202E (right-to-left override) shows the rest of a name reversed, so
``model\u202ecod.exe`` reads as ``modelexe.doc``. :func:`safe` is the one gate: the
CLI passes every string it prints through it, and prints with rich markup switched
off, so ``[bold]`` or ``[/]`` in a name is shown as written rather than read as markup.
"""

from __future__ import annotations

from safeshard.redact import redact

__all__ = ["safe"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe(value: object) -> str:
    """``value`` as text that cannot drive a terminal, on one line.

    Every character that Python's :meth:`str.isprintable` rejects is replaced by the
    escape Python's ``repr`` would use (``\\n``, ``\\t``, ``\\x1b``, ``\\x9b``,
    ``\\u202e``, ``\\udc80``, ``\\U000e0041``): C0 controls including newline, CR, tab,
    ESC and BEL; DEL; the C1 controls U+0080-U+009F; format and bidi controls
    (U+200B-U+200F, U+202A-U+202E, U+2060-U+2069, U+FEFF, ...); the line and paragraph
    separators U+2028/U+2029; lone surrogates; private-use and unassigned code points;
    and every space other than U+0020. All other characters, letters and symbols of
    any script included, are kept as they are, so the result of an ordinary name is
    the name itself.

    The escapes match ``repr``, so a library message that quotes a name with ``!r``
    reads the same as one this function escaped. A backslash is kept as it is (not
    doubled), for the same reason: ``--json`` gives the exact strings where a literal
    backslash followed by ``x1b`` must be told from an escaped ESC.

    ``value`` need not be a string: paths and numbers are converted with ``str()``.

    Credentials are masked first (:func:`safeshard.redact.redact`): the userinfo and
    credential query parameters of a URL, and the secrets the command line holds.
    """
    text = redact(value if isinstance(value, str) else str(value))
    if text.isprintable():  # the common case, at C speed
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)
