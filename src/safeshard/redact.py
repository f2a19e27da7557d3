"""Credentials never shown: the one redaction function for URLs in text.

A URL may carry credentials in two places: its userinfo (``https://user:pw@host/``,
``s3://KEY:SECRET@bucket/``) and its query string (a presigned URL's
``X-Amz-Signature``, ``X-Amz-Credential`` and ``X-Amz-Security-Token``, Google's
``X-Goog-Signature``, Azure's SAS ``sig``, ``token``, ``access_token``, ...).
:func:`redact` replaces both with ``***`` wherever a URL appears in a text: every
message, error, progress label, result field, manifest and index safeshard makes
passes through it, and the CLI applies it once more to everything it prints.

It also removes the literal secrets registered with :func:`secrets_shown_never` (the
CLI registers the credentials of the URLs and ``--storage-option`` values it was given),
because a storage client may quote a secret out of its URL (s3fs takes
``KEY:SECRET@bucket`` as a bucket name and says so).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote

__all__ = [
    "MASK",
    "SECRET_PARAMS",
    "redact",
    "redact_url",
    "secrets_of_options",
    "secrets_of_url",
    "secrets_shown_never",
]

MASK = "***"

SECRET_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "signature",
        "sig",
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "sas",
        "sastoken",
        "sas_token",
        "api_key",
        "apikey",
        "key",
        "secret",
        "password",
        "passwd",
        "pw",
        "credential",
        "credentials",
        "awsaccesskeyid",
        "client_secret",
        "code",
        "auth",
        "authorization",
        "session_token",
        "security_token",
    }
)
"""Query parameters whose values are credentials (compared case-insensitively)."""

_URL_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s'\"<>`]*)")
_SCHEMELESS_USERINFO_RE = re.compile(
    r"(?<![\w/@.%\-])([^\s/@:'\"<>`]+):([^\s/@'\"<>`]+)@(?=[\w.\-])"
)
"""``KEY:SECRET@bucket`` without its scheme, as a storage client may quote a bucket."""
_PARAM_RE = re.compile(r"([?&;])([^=&;#\s]+)=([^&;#\s'\"<>`]*?)(?=[&;#\s'\"<>`]|:\s|:?$)")

_OPTION_KEY_RE = re.compile(
    r"(?i)(secret|password|passwd|token|credential|signature|sas|account_key|private_key|"
    r"^key$|access_key|api_key|session)"
)
"""Storage option names whose values are credentials."""

_lock = threading.Lock()
_secrets: list[str] = []
MIN_SECRET = 3
"""Shorter literal secrets are not searched for (they would mask ordinary words);
their URLs are still redacted by structure."""


def _redact_one(scheme: str, rest: str) -> str:
    # userinfo: everything before the last '@' of the authority
    end = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if i != -1:
            end = min(end, i)
    authority = rest[:end]
    at = authority.rfind("@")
    if at != -1:
        rest = MASK + rest[at:]
    q = rest.find("?")
    if q != -1:
        head, query = rest[:q], rest[q:]

        def param(m: re.Match[str]) -> str:
            name = unquote(m.group(2)).lower()
            if name in SECRET_PARAMS:
                return f"{m.group(1)}{m.group(2)}={MASK}"
            return m.group(0)

        rest = head + _PARAM_RE.sub(param, query)
    return scheme + rest


def redact(value: object) -> str:
    """``value`` as text with the credentials of every URL in it replaced by ``***`` (see the
    module docs). Text without a URL, ``@`` or registered secret comes back unchanged."""
    text = value if isinstance(value, str) else str(value)  # a path object is shown as text
    with _lock:
        secrets = list(_secrets)
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    if "://" in text:
        text = _URL_RE.sub(lambda m: _redact_one(m.group(1), m.group(2)), text)
    if "@" in text:
        text = _SCHEMELESS_USERINFO_RE.sub(lambda m: f"{MASK}@", text)
    return text


def redact_url(url: object) -> str:
    """``str(url)`` redacted: how a path or URL is shown."""
    return redact(url)


def secrets_of_url(url: str) -> list[str]:
    """The credential strings a URL holds: its userinfo parts and the values of its
    credential query parameters (raw and percent-decoded)."""
    out: list[str] = []
    for m in _URL_RE.finditer(url):
        rest = m.group(2)
        end = min([i for i in (rest.find(c) for c in "/?#") if i != -1] or [len(rest)])
        authority = rest[:end]
        at = authority.rfind("@")
        if at != -1:
            info = authority[:at]
            out.append(info)
            out.extend(info.split(":", 1))
        for p in _PARAM_RE.finditer(rest):
            if unquote(p.group(2)).lower() in SECRET_PARAMS and p.group(3):
                out.append(p.group(3))
    return sorted({v for s in out for v in (s, unquote(s)) if len(v) >= MIN_SECRET}, key=len)


def secrets_of_options(options: Mapping[str, Any] | None) -> list[str]:
    """The credential values in fsspec storage options (nested dicts included)."""
    out: list[str] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, str):
            if _OPTION_KEY_RE.search(key) and len(node) >= MIN_SECRET:
                out.append(node)
            out.extend(secrets_of_url(node))

    walk(options or {}, "")
    return out


@contextlib.contextmanager
def secrets_shown_never(secrets: Iterable[str]) -> Iterator[None]:
    """While the block runs, :func:`redact` also masks each of ``secrets`` literally."""
    added = [s for s in secrets if len(s) >= MIN_SECRET]
    with _lock:
        _secrets.extend(added)
        _secrets.sort(key=len, reverse=True)  # a longer secret before its parts
    try:
        yield
    finally:
        with _lock:
            for s in added:
                _secrets.remove(s)
