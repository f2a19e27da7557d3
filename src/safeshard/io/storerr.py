"""Errors of object storage, said plainly: what failed, where, and whether it was retried.

Every error a storage client raises (botocore, s3fs, aiohttp, fsspec) becomes a
:class:`~safeshard.errors.SafeshardError` whose message names

- the object or prefix (its URL, credentials redacted),
- the operation (``look up``, ``read``, ``list the prefix``, ``upload``, ``copy``, ...),
- what happened, classified: access refused, access key refused, bucket missing,
  endpoint unreachable, connection reset or closed by the server, the server's own error
  (with its HTTP status and error code, never its bare text alone), or another error,
- whether safeshard retried it (ranged reads are retried; other requests are not, beyond
  what the storage client itself does).

A missing bucket is a :class:`~safeshard.errors.CheckpointNotFoundError` (exit 3), like a
missing key; every other storage failure is a :class:`~safeshard.errors.ReadError` or,
for a write, a :class:`~safeshard.errors.WriteError` (exit 4).
"""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from safeshard.errors import (
    CheckpointNotFoundError,
    ReadError,
    SafeshardError,
    StorageError,
    UsageError,
    WriteError,
)
from safeshard.redact import MASK, redact

__all__ = ["CLIENT_MODULES", "classify", "from_client", "storage_op", "translating"]

CLIENT_MODULES = (
    "botocore",
    "aiobotocore",
    "aiohttp",
    "s3fs",
    "fsspec",
    "upath",
    "gcsfs",
    "adlfs",
    "urllib3",
    "http.client",
    "requests",
    "huggingface_hub",
    "yarl",
)
"""Modules whose exceptions are storage errors."""

WRITES = ("upload", "copy", "remove", "write", "commit", "stage", "abort")
"""Operations (by their first word) that write."""

_CONNECT = (
    "EndpointConnectionError",
    "ClientConnectorError",
    "ClientConnectorDNSError",
    "ConnectionRefusedError",
    "gaierror",
    "ConnectTimeoutError",
    "ServerTimeoutError",
    "ClientConnectorSSLError",
    "ProxyConnectionError",
)
_RESET = (
    "ConnectionResetError",
    "ConnectionAbortedError",
    "BrokenPipeError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ConnectionClosedError",
    "RemoteDisconnected",
    "IncompleteRead",
    "ReadTimeoutError",
    "ResponseStreamingError",
    "ProtocolError",
)
_DENIED = ("AccessDenied", "Forbidden", "AllAccessDisabled", "AccountProblem")
_BAD_KEY = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "NoCredentialsError",
    "PartialCredentialsError",
)


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen and len(seen) < 16:
        seen.append(cur)
        yield cur
        cur = cur.__cause__ or cur.__context__


def _raised_in_client(e: BaseException) -> bool:
    """Whether a storage client's code is on ``e``'s traceback below safeshard's last
    frame (a builtin ``ValueError`` or ``TypeError`` raised by botocore or fsspec)."""
    tb = e.__traceback__
    inside = False
    while tb is not None:
        mod = str(tb.tb_frame.f_globals.get("__name__", ""))
        if mod == "safeshard" or mod.startswith("safeshard."):
            inside = False
        elif mod.startswith(CLIENT_MODULES):
            inside = True
        tb = tb.tb_next
    return inside


def from_client(e: BaseException) -> bool:
    """Whether ``e`` comes from a storage client (or is an OSError one raised)."""
    if isinstance(e, SafeshardError) or not isinstance(e, Exception):
        return False
    for x in _chain(e):
        mod = type(x).__module__ or ""
        if mod.startswith(CLIENT_MODULES) or _raised_in_client(x):
            return True
    return isinstance(e, OSError)


def _response(e: BaseException) -> tuple[int | None, str, str]:
    """The HTTP status, error code and server message found in ``e``'s chain."""
    for x in _chain(e):
        resp = getattr(x, "response", None)
        if isinstance(resp, Mapping):
            err = resp.get("Error") or {}
            meta = resp.get("ResponseMetadata") or {}
            status = meta.get("HTTPStatusCode")
            return (
                int(status) if isinstance(status, int) else None,
                str(err.get("Code") or ""),
                str(err.get("Message") or ""),
            )
        status = getattr(x, "status", None)  # aiohttp.ClientResponseError
        if isinstance(status, int) and type(x).__name__.startswith("Client"):
            return status, "", str(getattr(x, "message", "") or "")
    return None, "", ""


def _all(e: BaseException) -> list[BaseException]:
    """``e``'s chain, and the errors botocore wraps in its own (``kwargs["error"]``)."""
    out: list[BaseException] = []
    todo = [e]
    while todo and len(out) < 32:
        for x in _chain(todo.pop()):
            if x in out:
                continue
            out.append(x)
            kwargs = getattr(x, "kwargs", None)
            inner = kwargs.get("error") if isinstance(kwargs, Mapping) else None
            if isinstance(inner, BaseException):
                todo.append(inner)
    return out


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for x in _all(e) for c in type(x).__mro__}


_RESET_ERRNOS = (errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE)


def _was_reset(e: BaseException) -> bool:
    """Whether the connection was reset or closed after it was made (not refused)."""
    for x in _all(e):
        if type(x).__name__ in _RESET:
            return True
        if isinstance(x, OSError) and x.errno in _RESET_ERRNOS:
            return True
        low = str(x).lower()
        if "reset by peer" in low or "connection reset" in low or "server disconnected" in low:
            return True
    return False


def _bucket(url: str) -> str:
    _, sep, rest = url.partition("://")
    return (rest if sep else url).split("/", 1)[0]


def _endpoint(e: BaseException) -> str | None:
    for x in _chain(e):
        kwargs = getattr(x, "kwargs", None)
        if isinstance(kwargs, Mapping) and kwargs.get("endpoint_url"):
            return redact(str(kwargs["endpoint_url"]))
        host = getattr(x, "host", None)
        port = getattr(x, "port", None)
        if isinstance(host, str) and host:
            return f"{host}:{port}" if port else host
    return None


def classify(url: object, operation: str, e: BaseException, *, attempts: int = 1) -> SafeshardError:
    """The :class:`SafeshardError` for ``e``, raised by a storage client while doing
    ``operation`` on ``url`` (tried ``attempts`` times)."""
    if isinstance(e, SafeshardError):
        return e
    name = redact(str(url))
    text = redact(str(e) or type(e).__name__)
    status, code, server = _response(e)
    server = redact(server)
    names = _names(e)
    low = f"{code} {text}".lower()
    retried = f"failed after {attempts} attempts" if attempts > 1 else "safeshard did not retry it"
    cls: type[StorageError] = WriteError if operation.startswith(WRITES) else ReadError
    where = f"{name}: cannot {operation}"
    said = " ".join(
        x for x in (f"HTTP {status}" if status else "", code if code != str(status) else "") if x
    )
    if server and server not in said:
        said = f"{said} ({server})" if said else server

    if "ParamValidationError" in names or "InvalidBucketName" in (code, *names):
        first = text.replace("\\n", "\n").splitlines()
        detail = "; ".join(x.split(" must match the regex")[0] for x in first[1:] or first)
        hint = (
            "; credentials do not belong in an s3:// URL: use the environment, the AWS config "
            "or --storage-option key=... secret=..."
            if MASK + "@" in name
            else ""
        )
        return UsageError(f"{where}: the storage client refused the request ({detail}){hint}")
    if code == "NoSuchBucket" or "nosuchbucket" in low or "bucket does not exist" in low:
        return CheckpointNotFoundError(
            f"{where}: the bucket {_bucket(name)!r} does not exist ({retried}); create it "
            "first or check the URL"
        )
    if code in _BAD_KEY or names & set(_BAD_KEY) or "invalidaccesskeyid" in low:
        return cls(
            f"{where}: the storage refused the access key or signature"
            f" ({said or text}; {retried}); check the credentials (environment, AWS config, "
            "or --storage-option key=... secret=...)",
            filename=name,
            err=errno.EACCES,
        )
    if (
        code in _DENIED
        or status == 403
        or isinstance(e, PermissionError)
        or "accessdenied" in low
        or "forbidden" in low
    ):
        return cls(
            f"{where}: access was refused ({said or text}; {retried}); check the credentials "
            "and the permissions of the bucket (environment, AWS config, or "
            "--storage-option key=... secret=...)",
            filename=name,
            err=errno.EACCES,
        )
    if _was_reset(e):
        return cls(
            f"{where}: the connection was reset or closed by the server during the request "
            f"({type(e).__name__}: {text}; {retried}); the endpoint was reached, so try "
            "again, and check the server or a proxy between",
            filename=name,
            err=errno.ECONNRESET,
        )
    if names & set(_CONNECT) or "could not connect" in low:
        at = _endpoint(e)
        return cls(
            f"{where}: cannot reach the storage endpoint{f' {at}' if at else ''} ({text}; "
            f"{retried}); check the endpoint URL (AWS_ENDPOINT_URL, "
            "--storage-option client_kwargs.endpoint_url=...) and the network",
            filename=name,
            err=errno.ECONNREFUSED,
        )
    if (status is not None and status >= 500) or code in (
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
    ):
        return cls(
            f"{where}: the storage server failed with {said} ({retried}); try again "
            "later, and check the server if it persists",
            filename=name,
            err=errno.EIO,
        )
    if status is not None or code:
        return cls(
            f"{where}: the storage server answered {said} ({retried})",
            filename=name,
            err=errno.EIO,
        )
    if isinstance(e, (ValueError, TypeError)):
        return UsageError(
            f"{where}: the URL or a storage option is not valid ({type(e).__name__}: {text}); "
            "check the URL and the --storage-option values"
        )
    err_no = e.errno if isinstance(e, OSError) and isinstance(e.errno, int) else errno.EIO
    why = e.strerror if isinstance(e, OSError) and e.strerror else text
    return cls(
        f"{where}: {redact(str(why))} ({type(e).__name__}; {retried})",
        filename=name,
        err=err_no,
    )


@contextlib.contextmanager
def storage_op(url: object, operation: str) -> Iterator[None]:
    """Turn a storage client's error inside the block into :func:`classify`'s error.
    A :class:`FileNotFoundError` that is not about a missing bucket passes through
    (callers decide what a missing object means)."""
    try:
        yield
    except SafeshardError:
        raise
    except FileNotFoundError as e:
        _, code, _ = _response(e)
        if code == "NoSuchBucket" or "bucket does not exist" in str(e).lower():
            raise classify(url, operation, e) from None
        raise
    except Exception as e:
        if not from_client(e):
            raise
        raise classify(url, operation, e) from None


T = TypeVar("T")


def translating(
    ops: Mapping[str, tuple[str, Callable[[Any, tuple[Any, ...]], object]]],
) -> Callable[[type[T]], type[T]]:
    """A class decorator: each method named in ``ops`` runs under :func:`storage_op`,
    with its operation and the URL that ``where(self, args)`` gives."""

    def wrap(cls: type[T]) -> type[T]:
        for method, (operation, where) in ops.items():
            fn = cls.__dict__.get(method)
            if fn is None:
                continue

            def make(fn: Any, operation: str, where: Any) -> Any:
                @functools.wraps(fn)
                def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                    with storage_op(_safe_where(where, self, args), operation):
                        return fn(self, *args, **kwargs)

                return wrapper

            setattr(cls, method, make(fn, operation, where))
        return cls

    return wrap


def _safe_where(
    where: Callable[[Any, tuple[Any, ...]], object], obj: Any, args: tuple[Any, ...]
) -> object:
    try:
        return where(obj, args)
    except Exception:  # a message's URL must never turn into another error
        return getattr(obj, "url", "?")
