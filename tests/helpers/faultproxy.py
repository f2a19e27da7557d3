"""Real servers on 127.0.0.1 for storage-error and URL-safety tests.

- :class:`FaultProxy`: an HTTP proxy in front of an S3 server (moto) that forwards every
  request, except those a :class:`Rule` matches: it answers them with an S3 error (a 500
  ``InternalError``, a 400 ``InvalidRequest``, or a 501 ``NotImplemented`` as s3rver
  answers ListMultipartUploads),
  resets the connection (``SO_LINGER`` 0), or sends half the body and closes. It records
  every request it saw, counts the ranged GETs, multipart part uploads and parts copied on
  the server (``UploadPartCopy``) it is forwarding at once (``peak``, ``count``), can hold
  each of those for ``delay`` seconds (a slow link, so overlap shows) and can drop the
  ``Range`` header of GETs (``ignore_range``).
- :class:`FolderServer`: a static HTTP server over a folder, with ``Range`` support, that
  decodes and normalizes request paths the way many servers do
  (``/a/b/%2E%2E%2Fx`` is ``/a/x``), so an index entry that escapes the checkpoint's
  folder after percent-decoding would be served.
"""

from __future__ import annotations

import http.client
import http.server
import os
import posixpath
import re
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

S3_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message>"
    b"<RequestId>1</RequestId></Error>"
)
NOT_IMPLEMENTED = b"<Error><Code>NotImplemented</Code></Error>"
INVALID_REQUEST = b"<Error><Code>InvalidRequest</Code><Message>Bad request</Message></Error>"
ANSWERS = {"400": INVALID_REQUEST, "500": S3_ERROR, "501": NOT_IMPLEMENTED}
HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length"}
"""Request headers not forwarded (hop-by-hop; the length is set again)."""
KINDS = ("get", "part", "copy")


@dataclass
class Rule:
    """Which requests to break (regexes on the method and on the path with its query, and
    a request header that must be present, if ``header``) and how: ``"500"``, ``"501"``,
    ``"reset"`` or ``"truncate"``; at most ``times`` times (None: always)."""

    method: str
    target: str
    action: str
    times: int | None = None
    hits: int = 0
    header: str = ""

    def matches(self, method: str, target: str, headers: Any = None) -> bool:
        if not re.fullmatch(self.method, method) or not re.search(self.target, target):
            return False
        if self.header and (headers is None or self.header not in headers):
            return False
        return self.times is None or self.hits < self.times


@dataclass
class _State:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    now: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    delay: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    ignore_range: bool = False


def _reset(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.close_connection = True
    sock = handler.connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        state: _State = self.server.state
        body = self._body()
        action = None
        with state.lock:
            state.seen.append((self.command, self.path))
            for rule in state.rules:
                if rule.matches(self.command, self.path, self.headers):
                    rule.hits += 1
                    action = rule.action
                    break
        if action == "reset":
            _reset(self)
            return
        if action in ANSWERS:
            msg = ANSWERS[action]
            self.send_response(int(action))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        headers["Content-Length"] = str(len(body))
        kind = None
        if self.command == "GET" and "Range" in self.headers:
            kind = "get"
            if state.ignore_range:
                headers.pop("Range", None)
        elif self.command == "PUT" and "partNumber=" in self.path:
            kind = "copy" if "x-amz-copy-source" in self.headers else "part"
        if kind:
            with state.lock:
                state.count[kind] += 1
                state.now[kind] += 1
                state.peak[kind] = max(state.peak[kind], state.now[kind])
        try:
            if kind:
                time.sleep(state.delay[kind])
            up = urllib.parse.urlsplit(state.upstream)
            conn = http.client.HTTPConnection(up.netloc, timeout=120)
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
        finally:
            if kind:
                with state.lock:
                    state.now[kind] -= 1
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if action == "truncate" and self.command == "GET":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            _reset(self)
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultProxy:
    """A fault-injecting HTTP proxy in front of ``upstream`` (see the module docs)."""

    def __init__(self, upstream: str) -> None:
        self.state = _State(upstream)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.daemon_threads = True
        self.server.state = self.state  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, rule: Rule) -> Rule:
        with self.state.lock:
            self.state.rules.append(rule)
        return rule

    @property
    def seen(self) -> list[tuple[str, str]]:
        with self.state.lock:
            return list(self.state.seen)

    @property
    def peak(self) -> dict[str, int]:
        """The most ranged GETs (``"get"``), part uploads (``"part"``) and parts copied on
        the server (``"copy"``) at once."""
        with self.state.lock:
            return dict(self.state.peak)

    @property
    def count(self) -> dict[str, int]:
        """How many ranged GETs, part uploads and copied parts were forwarded."""
        with self.state.lock:
            return dict(self.state.count)

    @property
    def delay(self) -> dict[str, float]:
        """Seconds each ranged GET / part upload is held before it is forwarded."""
        return self.state.delay

    @property
    def ignore_range(self) -> bool:
        return self.state.ignore_range

    @ignore_range.setter
    def ignore_range(self, value: bool) -> None:
        self.state.ignore_range = value

    def reset(self) -> None:
        """Zero ``peak`` and ``count``."""
        with self.state.lock:
            self.state.peak = dict.fromkeys(KINDS, 0)
            self.state.count = dict.fromkeys(KINDS, 0)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _FolderHandler(http.server.SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` (which decodes and normalizes paths) with ``Range``."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def translate_path(self, path: str) -> str:
        self.server.seen.append(path)
        return super().translate_path(path)

    def send_head(self) -> Any:
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            return super().send_head()
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the handler after the copy
        except OSError:
            self.send_error(404, "File not found")
            return None
        size = os.fstat(f.fileno()).st_size
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m is None:
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            return f
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        f.seek(start)
        data = f.read(max(0, end - start + 1))
        f.close()
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        import io

        return io.BytesIO(data)


class FolderServer:
    """A static HTTP server over ``root`` (see the module docs); ``seen`` lists the
    decoded paths it was asked for."""

    def __init__(self, root: Path) -> None:
        handler = lambda *a, **k: _FolderHandler(*a, directory=str(root), **k)  # noqa: E731
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.seen = []  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def seen(self) -> list[str]:
        return [posixpath.normpath(urllib.parse.unquote(p)) for p in self.server.seen]  # type: ignore[attr-defined]

    def __enter__(self) -> FolderServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
