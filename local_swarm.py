#!/usr/bin/env python3
"""local-swarm: one OpenAI-compatible endpoint backed by a swarm of local llama.cpp workers.

Run it:

    python local_swarm.py                 # build llama.cpp for this machine, fetch a model, serve
    python local_swarm.py doctor          # print hardware, build key and plan; start nothing
    python local_swarm.py --help

The daemon is one asyncio process. It supervises N `python -m llama_cpp.server` subprocesses bound
to 127.0.0.1, each serving one request at a time, and exposes /v1/models, /v1/chat/completions
(streaming and not) and /health on a hand-written HTTP/1.1 + Server-Sent-Events server.

Sections, in dependency order (grep for "# ====" for a table of contents):
    constants, errors, config, HTTP/SSE protocol, HTTP server, hardware and build, models,
    workers, worker pool, chat API, server wiring, CLI.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence

# =====================================================================================================
# Constants
# =====================================================================================================
# Every limit has a name and a reason; nothing below is mutated at run time.

VERSION = "0.2.0"
SWARM_MODEL_ID = "local-swarm"           # the id under which the swarm itself is listed in /v1/models
HERE = Path(__file__).resolve().parent
DEFAULT_BUILDS_DIR = HERE / "llama_builds"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"      # the llama-cpp-python release the workers are built from

log = logging.getLogger("local_swarm")

# =====================================================================================================
# Errors
# =====================================================================================================
# One root. HTTPError carries the status and the OpenAI error fields, so any layer can refuse a
# request precisely; the connection handler is the only place that turns exceptions into replies.


class SwarmError(Exception):
    """Root of every error this module raises on purpose."""


class HTTPError(SwarmError):
    """A request that gets an error reply: status plus the OpenAI error shape.

    `close` asks the server to close the connection after replying (framing errors, smuggling).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: Sequence[tuple[str, str]] = (), close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = tuple(headers)
        self.close = close

    def body(self) -> dict[str, Any]:
        """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class WorkerError(SwarmError):
    """A worker failed: it died, refused, or broke a stream. `started` is True once any byte of
    its reply reached the client (then the request cannot be retried elsewhere)."""

    def __init__(self, message: str, started: bool = False) -> None:
        super().__init__(message)
        self.started = started


class BuildError(SwarmError):
    """Building or installing llama-cpp-python failed; the message says what to do."""


class ModelError(SwarmError):
    """No usable model: not found, not downloadable, or a checksum mismatch."""


# =====================================================================================================
# Config
# =====================================================================================================
# One frozen Config is built in main() from flags and passed into every constructor. No module-level
# mutable state: tests build their own Config and their own services.


@dataclass(frozen=True)
class HttpLimits:
    """Named limits of the HTTP server. Each bounds a read so that no client can make the daemon
    buffer without end or wait forever (slowloris)."""

    max_request_line: int = 8 * 1024          # method + target + version; 414 past it
    max_header_bytes: int = 16 * 1024         # all header lines together (h11's default); 431
    max_header_count: int = 100               # header fields; 431
    max_body: int = 16 * 1024 * 1024          # an agent's long conversation fits with room; 413
    max_chunk_line: int = 1024                # chunk-size line incl. extensions; 400
    header_timeout: float = 10.0              # from first byte to end of headers; 408
    body_timeout: float = 60.0                # whole body; 408
    keepalive_timeout: float = 15.0           # idle between requests, then close quietly
    max_pipelined: int = 16                   # parsed-but-unanswered requests per connection
    linger_timeout: float = 2.0               # after a closing reply, for the client to stop sending
    send_timeout: float = 60.0                # a client that reads nothing this long is dropped


@dataclass(frozen=True)
class Config:
    """Everything the daemon was told. None means "choose from the hardware and the model"."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model: str | None = None                  # path to a .gguf; None: discover, else fetch the default
    instances: int | None = None
    ctx: int | None = None
    threads: int | None = None                # threads per worker
    log_level: str = "info"
    builds_dir: Path = DEFAULT_BUILDS_DIR
    cache_dir: Path = field(default_factory=lambda: Path(
        os.environ.get("LOCAL_SWARM_CACHE", Path.home() / ".cache" / "local-swarm")))
    queue_size: int = 64                      # waiting requests beyond busy workers; 429 past it
    worker_start_timeout: float = 180.0       # model load on a slow disk
    request_timeout: float = 600.0            # whole generation
    max_retries: int = 2                      # re-dispatch of a request whose worker died early
    http: HttpLimits = field(default_factory=HttpLimits)


# =====================================================================================================
# HTTP/1.1 and SSE protocol
# =====================================================================================================
# Pure code: bytes in, records out; no sockets, no clock (the server owns I/O and deadlines).
# RequestParser turns a byte stream into RequestHead then Request events, enforcing every bound in
# HttpLimits. Bad input raises HTTPError carrying the status to answer and close=True: once framing is
# in doubt the connection cannot be reused. The grammar is RFC 9112's as h11 reads it (h11 is the
# reference in tests/test_http.py); where this parser is stricter, the check says why.
# SSE helpers frame our replies and unframe workers' streams (WHATWG HTML, server-sent events).

MAX_CONTENT_LENGTH_DIGITS = 20       # as h11: a longer Content-Length is malformed (400), not just big
SSE_DONE = b"data: [DONE]\n\n"
SSE_MAX_LINE = 1024 * 1024           # an upstream event line longer than this is a broken worker

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE = re.compile(rb"(%s) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])" % _TOKEN)
_FIELD_VALUE = rb"[^\x00\s]+(?:[ \t]+[^\x00\s]+)*"     # h11's: no NUL, CR, LF; obs-text allowed
_HEADER_LINE = re.compile(rb"(%s):[ \t]*(%s)?[ \t]*" % (_TOKEN, _FIELD_VALUE))
_HEAD_END = re.compile(rb"\n\r?\n")                      # the blank line; bare LF tolerated, as h11
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")   # extensions read, ignored
_SSE_LINE_END = re.compile(rb"\r\n|\r|\n")
_SSE_SPLIT = re.compile(r"\r\n|\r|\n")


def _bad(message: str, status: int = 400, code: str = "bad_request") -> HTTPError:
    """An error for input that breaks framing: the reply closes the connection."""
    return HTTPError(status, message, code=code, close=True)


def _tokens(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """The comma-separated, lower-cased tokens of every header called `name` (any case)."""
    return [token.strip().lower() for key, value in headers if key.lower() == name
            for token in value.split(",")]


def persistent(version: str, headers: Iterable[tuple[str, str]]) -> bool:
    """True if the connection stays open after this message (RFC 9112 §9.3)."""
    tokens = _tokens(headers, "connection")
    if "close" in tokens:
        return False
    return version == "HTTP/1.1" or "keep-alive" in tokens


@dataclass(frozen=True)
class RequestHead:
    """A parsed request head, emitted before its body so the server can answer 100-continue."""

    method: str
    target: str
    version: str                              # "HTTP/1.1" or "HTTP/1.0"
    headers: tuple[tuple[str, str], ...]
    content_length: int                       # 0 when chunked or absent
    chunked: bool

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def has_body(self) -> bool:
        return self.chunked or self.content_length > 0

    @property
    def expect_continue(self) -> bool:
        """True if the client waits for 100 Continue (HTTP/1.0 expectations are ignored)."""
        return self.version == "HTTP/1.1" and "100-continue" in _tokens(self.headers, "expect")


@dataclass(frozen=True)
class Request:
    """One complete request as a handler sees it."""

    method: str                               # upper-case token, e.g. "GET", "POST", "HEAD"
    target: str                               # raw request-target, e.g. "/v1/models?x=1"
    path: str                                 # target without the query string
    version: str                              # "HTTP/1.1" or "HTTP/1.0"
    headers: tuple[tuple[str, str], ...]      # names lower-cased, order kept, values stripped
    body: bytes

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first header called `name` (any case); `default` if there is none."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def json(self) -> Any:
        """The body parsed as UTF-8 JSON. Raises HTTPError 400 "invalid_json" if it is empty,
        not UTF-8, not JSON, or nested too deeply to parse."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (ValueError, RecursionError) as exc:      # UnicodeDecodeError is a ValueError
            raise HTTPError(400, f"request body is not valid JSON: {exc}",
                            code="invalid_json") from exc


@dataclass
class Response:
    """A reply. With `stream` set the body is sent chunked, one chunk per item, each flushed."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None

    @classmethod
    def json(cls, obj: Any, status: int = 200,
             headers: Sequence[tuple[str, str]] = ()) -> Response:
        """A JSON reply."""
        body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        return cls(status, [("Content-Type", "application/json"), *headers], body)

    @classmethod
    def error(cls, exc: HTTPError) -> Response:
        """The OpenAI-shaped error reply for `exc`, with its headers (and Connection: close if
        exc.close, which the server honours)."""
        closing = [("Connection", "close")] if exc.close else []
        return cls.json(exc.body(), exc.status, [*exc.headers, *closing])

    @classmethod
    def sse(cls, stream: AsyncIterator[bytes],
            headers: Sequence[tuple[str, str]] = ()) -> Response:
        """A server-sent-events reply relaying `stream` (items already framed by sse_*)."""
        return cls(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                         ("X-Accel-Buffering", "no"), *headers], stream=stream)


Handler = Callable[[Request], Awaitable[Response]]


def _split_lines(block: bytes) -> list[bytes]:
    """Lines of a head or trailer block, each without its LF or CRLF ending."""
    return [line[:-1] if line.endswith(b"\r") else line for line in block.split(b"\n")]


def _parse_field(line: bytes) -> tuple[str, str]:
    """One header line as (lower-cased name, value without surrounding whitespace).
    Raises HTTPError 400 on obs-fold, a missing colon, space before it, or bad characters."""
    if line[:1] in (b" ", b"\t"):
        # obs-fold: RFC 9112 §5.2 lets a server reject it, and front ends disagree on unfolding
        # (a smuggling vector), so this parser rejects where h11 unfolds.
        raise _bad("obsolete line folding in a header", code="invalid_header")
    match = _HEADER_LINE.fullmatch(line)
    if match is None:
        raise _bad(f"malformed header line {bytes(line[:64])!r}", code="invalid_header")
    return match[1].decode("ascii").lower(), (match[2] or b"").decode("latin-1")


def _parse_fields(lines: list[bytes], limits: HttpLimits) -> tuple[tuple[str, str], ...]:
    """Header (or trailer) lines parsed; raises HTTPError 431 past max_header_count, else 400."""
    if len(lines) > limits.max_header_count:
        raise _bad(f"more than {limits.max_header_count} header fields", 431, "too_many_headers")
    return tuple(_parse_field(line) for line in lines)


def _content_length(headers: Sequence[tuple[str, str]], limits: HttpLimits) -> int | None:
    """The declared body length, None if absent. Raises HTTPError 400 when values conflict or
    are not 1-20 digits, 413 past max_body."""
    values = {part.strip() for name, value in headers if name == "content-length"
              for part in value.split(",")}
    if not values:
        return None
    value = values.pop()
    if values or not (value.isascii() and value.isdigit()) \
            or len(value) > MAX_CONTENT_LENGTH_DIGITS:
        raise _bad("invalid or conflicting Content-Length", code="invalid_content_length")
    if int(value) > limits.max_body:
        raise _bad(f"request body over {limits.max_body} bytes", 413, "request_too_large")
    return int(value)


def _is_chunked(headers: Sequence[tuple[str, str]]) -> bool:
    """True for `Transfer-Encoding: chunked`; raises HTTPError 501 for any other coding."""
    codings = [value.lower() for name, value in headers if name == "transfer-encoding"]
    if not codings:
        return False
    if codings != ["chunked"]:
        raise _bad("only Transfer-Encoding: chunked is supported", 501,
                   "unsupported_transfer_encoding")
    return True


def _check_host(version: str, headers: Sequence[tuple[str, str]]) -> None:
    """Raises HTTPError 400 unless an HTTP/1.1 request has exactly one Host (at most one in 1.0)."""
    hosts = sum(1 for name, _ in headers if name == "host")
    if hosts > 1 or (hosts == 0 and version == "HTTP/1.1"):
        raise _bad("an HTTP/1.1 request needs exactly one Host header", code="invalid_host")


def _canonical(headers: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Headers as h11 passes them on: one Content-Length with its single value, and
    Transfer-Encoding lower-cased. Call after validation."""
    out: list[tuple[str, str]] = []
    seen_length = False
    for name, value in headers:
        if name == "content-length":
            if seen_length:
                continue
            seen_length, value = True, value.split(",")[0].strip()
        elif name == "transfer-encoding":
            value = value.lower()
        out.append((name, value))
    return tuple(out)


def parse_head(block: bytes, limits: HttpLimits) -> RequestHead:
    """Parse a request head: request line and header lines, without the final blank line.
    Returns the head; raises HTTPError (close=True): 400 malformed, 413 body too big, 431 too
    many fields, 501 transfer coding, 505 version."""
    lines = _split_lines(block)
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise _bad("malformed request line", code="invalid_request_line")
    method, target, number = (part.decode("ascii") for part in match.groups())
    if number not in ("1.0", "1.1"):            # h11 accepts any d.d; we speak 1.0 and 1.1 only
        raise _bad(f"HTTP/{number} is not supported", 505, "http_version_not_supported")
    version = "HTTP/" + number
    headers = _parse_fields(lines[1:], limits)
    length, chunked = _content_length(headers, limits), _is_chunked(headers)
    if chunked and length is not None:
        # RFC 9112 §6.3 lets TE win, as h11 does; rejecting closes the smuggling gap outright.
        raise _bad("Content-Length with Transfer-Encoding", code="request_smuggling")
    _check_host(version, headers)
    return RequestHead(method, target, version, _canonical(headers), length or 0, chunked)


@dataclass
class _LengthBody:
    """A body framed by Content-Length."""

    length: int

    def read(self, buf: bytearray) -> bytes | None:
        """The body taken from the front of `buf` once all of it is there, else None."""
        if len(buf) < self.length:
            return None
        body = bytes(buf[:self.length])
        del buf[:self.length]
        return body


class ChunkedDecoder:
    """Pure decoder of a chunked request body (RFC 9112 §7.1). Chunk sizes are validated (1-20
    hex digits, line within max_chunk_line), extensions ignored, CRLF required after each chunk's
    data, trailers validated like headers and dropped. The decoded size is bounded by max_body."""

    def __init__(self, limits: HttpLimits) -> None:
        self._limits = limits
        self._body = bytearray()
        self._left = 0                         # bytes of the current chunk's data still to come
        self._step: Callable[[bytearray], bool] | None = self._size_line

    def read(self, buf: bytearray) -> bytes | None:
        """Consume what it can from the front of `buf`. Returns the decoded body once the last
        chunk and trailers are in, None if more is needed. Raises HTTPError 400/413/431."""
        while self._step is not None:
            if not self._step(buf):
                return None
        return bytes(self._body)

    def _size_line(self, buf: bytearray) -> bool:
        limit = self._limits.max_chunk_line
        end = buf.find(b"\r\n", 0, limit + 2)
        if end < 0:
            if len(buf) > limit + 1:
                raise _bad(f"chunk-size line over {limit} bytes", code="invalid_chunk")
            return False
        match = _CHUNK_LINE.fullmatch(buf, 0, end)
        if match is None:
            raise _bad("malformed chunk-size line", code="invalid_chunk")
        self._left = int(match[1], 16)
        del buf[:end + 2]
        if len(self._body) + self._left > self._limits.max_body:
            raise _bad(f"request body over {self._limits.max_body} bytes", 413, "request_too_large")
        self._step = self._data if self._left else self._trailer
        return True

    def _data(self, buf: bytearray) -> bool:
        taken = buf[:self._left]
        if not taken:
            return False
        self._body += taken
        del buf[:len(taken)]
        self._left -= len(taken)
        if not self._left:
            self._step = self._data_end
        return True

    def _data_end(self, buf: bytearray) -> bool:
        if buf[:2] != b"\r\n"[:len(buf)]:
            raise _bad("chunk data not followed by CRLF", code="invalid_chunk")
        if len(buf) < 2:
            return False
        del buf[:2]
        self._step = self._size_line
        return True

    def _trailer(self, buf: bytearray) -> bool:
        limit = self._limits.max_header_bytes
        if buf[:1] == b"\n" or buf[:2] == b"\r\n":        # no trailer fields: the usual case
            del buf[:1 if buf[0] == 0x0A else 2]
            self._step = None
            return True
        match = _HEAD_END.search(buf, 0, limit + 3)
        if match is None:
            if len(buf) > limit + 2:
                raise _bad(f"trailer over {limit} bytes", 431, "header_too_large")
            return False
        _parse_fields(_split_lines(bytes(buf[:match.start()])), self._limits)
        del buf[:match.end()]
        self._step = None
        return True


class RequestParser:
    """Incremental, pure HTTP/1.1 request parser in the style of h11: feed() bytes, then call
    next_event() until it returns None (more bytes needed).

    For each request it returns a RequestHead once the head is complete (so the server can answer
    `Expect: 100-continue`), then the Request once its body is. Pipelined requests follow one
    another. Empty lines before a request line are skipped (RFC 9112 §2.2; h11 rejects them).
    Raises HTTPError with close=True: 400 malformed, 408 never (no clock here), 413 body,
    414 request line, 431 header bytes or count, 501 transfer coding, 505 version."""

    def __init__(self, limits: HttpLimits) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._scan = 0                         # where the search for the blank line resumes
        self._head: RequestHead | None = None
        self._body: _LengthBody | ChunkedDecoder | None = None

    @property
    def phase(self) -> str:
        """"idle" (nothing of a next request yet), "head" (part of a head), or "body"."""
        if self._head is not None:
            return "body"
        return "head" if self._buf else "idle"

    @property
    def awaiting_body(self) -> bool:
        """True when a head is done, its body is not empty, and none of the body has arrived."""
        return self._head is not None and self._head.has_body and not self._buf

    def feed(self, data: bytes) -> None:
        """Append received bytes; next_event() does the parsing and the limit checks."""
        self._buf += data

    def next_event(self) -> RequestHead | Request | None:
        """The next RequestHead or Request, or None if more bytes are needed."""
        if self._head is None:
            return self._next_head()
        assert self._body is not None
        body = self._body.read(self._buf)
        if body is None:
            return None
        head, self._head, self._body = self._head, None, None
        return Request(head.method, head.target, head.path, head.version, head.headers, body)

    def _next_head(self) -> RequestHead | None:
        match = self._find_head_end()
        if match is None:
            return None
        block = bytes(self._buf[:match.start()])
        del self._buf[:match.end()]
        self._scan = 0
        head = parse_head(block, self._limits)
        self._head = head
        self._body = ChunkedDecoder(self._limits) if head.chunked else _LengthBody(head.content_length)
        return head

    def _skip_empty_lines(self) -> None:
        while self._buf[:1] == b"\n" or self._buf[:2] == b"\r\n":
            del self._buf[:1 if self._buf[0] == 0x0A else 2]

    def _find_head_end(self) -> re.Match[bytes] | None:
        """The blank line that ends the head, None if not yet here. Raises 400/414/431."""
        self._skip_empty_lines()
        line_end = self._request_line_end()
        if line_end is None:
            return None
        limit = self._limits.max_header_bytes
        stop = line_end + limit + 3            # the furthest a blank line may end
        match = _HEAD_END.search(self._buf, max(line_end, self._scan), stop)
        if match is None and len(self._buf) >= stop:
            raise _bad(f"headers over {limit} bytes", 431, "header_too_large")
        self._scan = max(line_end, len(self._buf) - 2)
        return match

    def _request_line_end(self) -> int | None:
        """Index of the LF ending the request line, None if not yet here. Raises 400/414."""
        buf, limit = self._buf, self._limits.max_request_line
        if buf[:1] < b"\x21" and buf not in (b"", b"\r"):
            # as h11: no head starts with a control byte or space (a TLS hello, say)
            raise _bad("malformed request line", code="invalid_request_line")
        line_end = buf.find(b"\n", 0, limit + 2)
        if line_end < 0 and len(buf) <= limit + 1:
            return None
        if line_end < 0 or line_end - (buf[line_end - 1] == 0x0D) > limit:
            raise _bad(f"request line over {limit} bytes", 414, "uri_too_long")
        return line_end


def sse_event(data: str) -> bytes:
    """One server-sent event carrying `data`: "data: <line>\\n" for each of its lines (split at
    \\r\\n, \\r or \\n), then a blank line."""
    if "\n" not in data and "\r" not in data:       # the per-token path: one line, no regex
        return b"data: " + data.encode("utf-8", "replace") + b"\n\n"
    text = "".join(f"data: {line}\n" for line in _SSE_SPLIT.split(data))
    return text.encode("utf-8", "replace") + b"\n"


def sse_json(obj: Any) -> bytes:
    """An event whose data is `obj` as compact JSON (JSON text never spans lines)."""
    return sse_event(json.dumps(obj, separators=(",", ":")))


def sse_comment(text: str = "") -> bytes:
    """A comment event, ": text\\n\\n": clients ignore it, proxies see traffic (keep-alive)."""
    lines = "".join(f": {line}\n" for line in _SSE_SPLIT.split(text))
    return lines.encode("utf-8", "replace") + b"\n"


class SSEDecoder:
    """Incremental parser for an upstream text/event-stream. Lines end with \\n, \\r\\n or \\r
    (even split across feeds); `data` fields are joined with \\n; comments and other fields
    (event, id, retry) are ignored; an unfinished event at the end is never returned."""

    def __init__(self, max_line: int = SSE_MAX_LINE) -> None:
        self._max_line = max_line
        self._buf = b""
        self._data: list[str] = []            # data fields of the event being read
        self._skip_lf = False                 # the last feed ended in \r: a leading \n is its pair
        self._first = True                    # a UTF-8 byte-order mark may open the stream

    def feed(self, data: bytes) -> list[str]:
        """The data payloads of the events completed by `data`, in order. Raises WorkerError if
        a line passes max_line bytes."""
        if not data:
            return []
        if self._skip_lf and data[:1] == b"\n":
            data = data[1:]
        buf, start, events = self._buf + data, 0, []
        for match in _SSE_LINE_END.finditer(buf):
            self._line(buf[start:match.start()], events)
            start = match.end()
        self._skip_lf = start == len(buf) and buf.endswith(b"\r")
        self._buf = buf[start:]
        if len(self._buf) > self._max_line:
            raise WorkerError(f"event-stream line over {self._max_line} bytes")
        return events

    def _line(self, raw: bytes, events: list[str]) -> None:
        """Apply one line: a blank one dispatches the event, a `data` field extends it."""
        if not raw:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        text = raw.decode("utf-8", "replace")
        if self._first:
            self._first, text = False, text.removeprefix("\ufeff")
        name, _, value = text.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)


# =====================================================================================================
# HTTP server
# =====================================================================================================
# Asyncio streams, no framework. Per connection two tasks: a reader that parses requests ahead into
# a bounded queue (max_pipelined) and enforces the header/body deadlines, and the connection task
# that answers them in order. The reader keeps reading while a handler runs or a stream is relayed,
# so a client that leaves (EOF or reset) cancels the work at once: the handler sees CancelledError,
# a stream is aclose()d and its `finally` cancels upstream generation. Half-closing clients count as
# leaving. The connection task is the catch-all boundary; the handler call and a stream's items are
# the application boundary (a failure there is logged once and becomes a 500 or a cut-short reply).
# Client mistakes are answered with 4xx and logged at debug level only.

READ_CHUNK = 64 * 1024               # bytes asked of the socket per read; the parser bounds the rest
STOP_GRACE = 5.0                     # seconds stop() waits for cancelled connections to unwind
CORS_MAX_AGE = 600                   # seconds a browser may cache a preflight answer
SERVER_HEADER = f"local-swarm/{VERSION}"
ALLOWED_METHODS = "GET, POST, HEAD, OPTIONS"
ALLOWED_HEADERS = ("Authorization", "Content-Type", "X-Api-Key")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})  # framing is ours
_TOKEN_TEXT = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_BAD_VALUE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")      # CR, LF, NUL, controls, non-latin-1


@dataclass(frozen=True)
class CorsPolicy:
    """Which browser origins may call the API: an origin equal to a configured one, or to one
    plus ":port"; "*" allows every origin."""

    origins: tuple[str, ...]

    def allows(self, origin: str | None) -> bool:
        """True if a reply to this Origin may be read by the page that sent it."""
        if not origin or not (origin.isascii() and origin.isprintable()):
            return False                       # never echo odd bytes back, even under "*"
        if "*" in self.origins or origin in self.origins:
            return True
        base, colon, port = origin.rpartition(":")
        return bool(colon) and base in self.origins and port.isascii() and port.isdigit() \
            and len(port) <= 5

    def headers(self, request: Request) -> list[tuple[str, str]]:
        """CORS headers for any reply: the echoed origin if allowed, and Vary: Origin."""
        origin = request.header("origin")
        if origin is None:
            return []
        allowed = [("Access-Control-Allow-Origin", origin)] if self.allows(origin) else []
        return [*allowed, ("Vary", "Origin")]

    def preflight(self, request: Request) -> Response:
        """The server's own answer to OPTIONS: 204, plus what may be sent if the origin is allowed."""
        headers = [("Allow", ALLOWED_METHODS)]
        if self.allows(request.header("origin")):
            headers += [("Access-Control-Allow-Methods", ALLOWED_METHODS),
                        ("Access-Control-Allow-Headers", _allowed_headers(request)),
                        ("Access-Control-Max-Age", str(CORS_MAX_AGE))]
        return Response(204, headers)


def _allowed_headers(request: Request) -> str:
    """ALLOWED_HEADERS plus the header names a preflight asked for (well-formed ones only)."""
    names = list(ALLOWED_HEADERS)
    seen = {name.lower() for name in names}
    for name in (request.header("access-control-request-headers") or "").split(","):
        name = name.strip()
        if _TOKEN_TEXT.fullmatch(name) and name.lower() not in seen:
            names.append(name)
            seen.add(name.lower())
    return ", ".join(names)


def _check_reply(response: Response) -> None:
    """Raises ValueError if a handler's reply could not be sent as given (a bug, so a 500):
    a status outside 200-599, or a header that could split the reply or is not latin-1."""
    if not 200 <= response.status <= 599:
        raise ValueError(f"reply status {response.status} is not a final status")
    for name, value in response.headers:
        if not _TOKEN_TEXT.fullmatch(name) or _BAD_VALUE.search(value):
            raise ValueError(f"invalid reply header {name!r}: {value!r}")


def _bodiless(status: int) -> bool:
    """True for statuses that never carry a body (RFC 9110 §6.4.1)."""
    return status < 200 or status in (204, 304)


def _framing(request: Request | None, response: Response) -> list[tuple[str, str]]:
    """Content-Length (HEAD included: the would-be body's), chunked for a stream to HTTP/1.1,
    nothing for a stream to HTTP/1.0 (it ends when the connection does)."""
    if _bodiless(response.status):
        return []
    if response.stream is None:
        return [("Content-Length", str(len(response.body)))]
    if request is None or request.version == "HTTP/1.1":
        return [("Transfer-Encoding", "chunked")]
    return []


def _render_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    """Status line and header lines, ending with the blank line."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


async def _aclose(stream: AsyncIterator[bytes] | None) -> None:
    """Close a stream that can be closed, so an async generator's `finally` runs now."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class _Connection:
    """One client connection: see the section comment."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Handler, limits: HttpLimits, cors: CorsPolicy) -> None:
        self._reader, self._writer, self._transport = reader, writer, writer.transport
        self._handler, self._limits, self._cors = handler, limits, cors
        self._parser = RequestParser(limits)
        self._queue: asyncio.Queue[Request | HTTPError | None] = asyncio.Queue(limits.max_pipelined)
        self._drained = asyncio.Event()       # set while every queued request has been answered
        self._busy = False                    # answering: the client leaving cancels the main task
        self._deadline: float | None = None   # when the head or body being read is overdue
        self._main: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        """Serve until the connection ends. The catch-all boundary for this connection."""
        self._main = asyncio.current_task()
        self._reading = asyncio.create_task(self._read_loop())
        try:
            if await self._respond_loop():
                await self._linger()
        except (ConnectionError, TimeoutError) as exc:          # gone, or stopped reading
            log.debug("HTTP client dropped: %r", exc)
        except asyncio.CancelledError:                          # stop(), or the client left
            self._transport.abort()
            raise
        except Exception:  # a bug in this server costs one connection, never the daemon
            log.exception("HTTP connection failed")
        finally:
            self._reading.cancel()
            self._writer.close()               # before the await: stop() may cancel us again there
            await asyncio.wait({self._reading})

    # ---- answering (the connection task) ------------------------------------------------------

    async def _respond_loop(self) -> bool:
        """Answer queued requests in order. True if a reply closed the connection (the client
        may still be sending), False if the client left or stayed idle."""
        while True:
            item = await self._next_item()
            if item is None:
                return False
            if isinstance(item, HTTPError):
                log.debug("bad HTTP request: %s %s", item.status, item.message)
                await self._send(None, Response.error(item), keep=False)
                return True
            if not await self._answer(item):
                return True

    async def _next_item(self) -> Request | HTTPError | None:
        """The next request or framing error; None if the client left or sent nothing for
        keepalive_timeout (a request already arriving is bounded by the reader's deadlines)."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        self._drained.set()
        try:
            async with asyncio.timeout(self._limits.keepalive_timeout):
                return await self._queue.get()
        except TimeoutError:
            if self._parser.phase == "idle":
                return None
        return await self._queue.get()

    async def _answer(self, request: Request) -> bool:
        """Answer one request; True if the connection stays open for the next."""
        self._busy = True
        try:
            response = await self._respond(request)
            keep = persistent(request.version, request.headers) \
                and "close" not in _tokens(response.headers, "connection")
            if response.stream is not None and request.version == "HTTP/1.0":
                keep = False                   # no chunked in 1.0: the body ends with the connection
            return await self._send(request, response, keep) and keep
        finally:
            self._busy = False

    async def _respond(self, request: Request) -> Response:
        """The reply to a request: OPTIONS is answered here, the rest by the handler. HTTPError
        becomes its error reply; any other failure is a logged 500."""
        if request.method == "OPTIONS":
            return self._cors.preflight(request)
        try:
            response = await self._handler(request)
            _check_reply(response)
            return response
        except HTTPError as exc:
            return Response.error(exc)
        except Exception:  # the application boundary: a handler bug is a 500, the server lives on
            log.exception("handler failed on %s %s", request.method, request.path)
            return Response.error(HTTPError(500, "internal server error", type="server_error",
                                            code="internal_error"))

    def _head(self, request: Request | None, response: Response, keep: bool) -> bytes:
        """The reply head: our Server, framing and Connection headers, the handler's others, CORS."""
        headers = [("Server", SERVER_HEADER)]
        headers += [(n, v) for n, v in response.headers if n.lower() not in _OWN_HEADERS]
        if request is not None:
            headers += self._cors.headers(request)
        headers += _framing(request, response)
        if not keep:
            headers.append(("Connection", "close"))
        elif request is not None and request.version == "HTTP/1.0":
            headers.append(("Connection", "keep-alive"))
        return _render_head(response.status, headers)

    async def _send(self, request: Request | None, response: Response, keep: bool) -> bool:
        """Write one reply; True if it went out whole. HEAD and bodiless statuses get the head
        only (a stream is then closed unread); a stream is relayed item by item."""
        head, stream = self._head(request, response, keep), response.stream
        head_only = _bodiless(response.status) or (request is not None and request.method == "HEAD")
        if head_only or stream is None:
            await _aclose(stream)
            self._writer.write(head if head_only else head + response.body)
            await self._drain()
            return True
        self._writer.write(head)
        return await self._relay(stream, chunked=request is None or request.version == "HTTP/1.1")

    async def _relay(self, stream: AsyncIterator[bytes], chunked: bool) -> bool:
        """Write each item of a stream as it comes, one flushed chunk each: the per-token path.
        Returns False if the stream failed (the reply is cut short, without the last chunk).
        The stream is closed in every case, so its `finally` runs."""
        write, drain, next_item = self._writer.write, self._drain, stream.__anext__
        try:
            while True:
                try:
                    item = await next_item()
                except StopAsyncIteration:
                    break
                except SwarmError as exc:
                    log.warning("stream ended early: %s", exc)
                    return False
                except Exception:  # the stream is application code: its bug cuts this reply only
                    log.exception("stream failed after the reply started")
                    return False
                if item:                       # an empty chunk would end the body
                    write(b"%x\r\n%b\r\n" % (len(item), item) if chunked else item)
                    await drain()
            if chunked:
                write(b"0\r\n\r\n")
            return True
        finally:
            await _aclose(stream)

    async def _drain(self) -> None:
        """Flush the write buffer. Raises ConnectionError if the client is gone and TimeoutError
        if it has read nothing for send_timeout."""
        if not self._transport.get_write_buffer_size():
            await self._writer.drain()         # nothing queued: returns at once (no timer)
            return
        async with asyncio.timeout(self._limits.send_timeout):
            await self._writer.drain()

    async def _linger(self) -> None:
        """After a closing reply: send FIN, then give the client linger_timeout to stop sending,
        so that unread input does not turn our close into a reset that destroys the reply."""
        if self._writer.can_write_eof():
            self._writer.write_eof()
        if self._reading is not None:
            await asyncio.wait({self._reading}, timeout=self._limits.linger_timeout)

    # ---- reading (the reader task) ------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Parse requests into the queue, then read on (discarding) until the client leaves, and
        report that. Catch-all boundary of the reader task."""
        try:
            await self._read_until_eof()
        except OSError as exc:                                  # reset: same as leaving
            log.debug("HTTP client read failed: %r", exc)
        except Exception:  # a bug here must close the connection, not leave it hanging
            log.exception("reading an HTTP request failed")
        self._on_eof()

    async def _read_until_eof(self) -> None:
        try:
            await self._read_requests()
        except HTTPError as exc:
            await self._enqueue(exc)           # answered in turn; then the connection closes
        while await self._reader.read(READ_CHUNK):
            pass                               # after the last request only the EOF matters

    async def _read_requests(self) -> None:
        """Queue requests until EOF or one that ends the connection. Raises HTTPError."""
        while True:
            event = self._parser.next_event()
            if event is None:
                if not await self._receive():
                    return
            elif isinstance(event, RequestHead):
                await self._on_head(event)
            else:
                self._deadline = None
                await self._enqueue(event)
                if not persistent(event.version, event.headers):
                    return

    async def _receive(self) -> bool:
        """Read more bytes into the parser; False at EOF. Raises HTTPError 408 past the
        deadline of the head (from its first byte) or of the body."""
        phase = self._parser.phase
        if phase == "idle":
            self._deadline = None
        elif self._deadline is None:
            timeout = self._limits.header_timeout if phase == "head" else self._limits.body_timeout
            self._deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(self._deadline):
                data = await self._reader.read(READ_CHUNK)
        except TimeoutError:
            what = "headers" if phase == "head" else "body"
            raise _bad(f"request {what} not received in time", 408, "request_timeout") from None
        self._parser.feed(data)
        return bool(data)

    async def _on_head(self, head: RequestHead) -> None:
        """Send 100 Continue if the client waits for it, once earlier replies are out; the body
        deadline starts after it."""
        if head.expect_continue and self._parser.awaiting_body:
            await self._drained.wait()
            self._writer.write(_CONTINUE)
            await self._writer.drain()
        self._deadline = None

    async def _enqueue(self, item: Request | HTTPError) -> None:
        self._drained.clear()
        await self._queue.put(item)

    def _on_eof(self) -> None:
        """The client left: cancel the answer in progress, or wake an idle connection task."""
        if self._busy and self._main is not None:
            self._main.cancel()
            return
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)


class HttpServer:
    """The HTTP/1.1 server in front of `handler`. start() binds (port 0 picks a free port, then
    `port` holds it); stop() stops accepting, cancels every connection (closing open streams) and
    closes the sockets. It owns one task per connection."""

    def __init__(self, handler: Handler, limits: HttpLimits, host: str = "127.0.0.1",
                 port: int = 0,
                 cors_origins: Sequence[str] = ("http://localhost", "http://127.0.0.1")) -> None:
        self.port = port
        self._handler, self._limits, self._host = handler, limits, host
        self._cors = CorsPolicy(tuple(cors_origins))
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError if the address is taken."""
        self._server = await asyncio.start_server(self._accept, self._host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("HTTP server listening on http://%s:%d", self._host, self.port)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:               # stop() has begun
            writer.transport.abort()
            return
        connection = _Connection(reader, writer, self._handler, self._limits, self._cors)
        task = asyncio.get_running_loop().create_task(connection.serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: writer.close())   # also if cancelled before it ran

    async def stop(self) -> None:
        """Stop accepting and end every connection; waits at most STOP_GRACE for them."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_GRACE)
            if stuck:
                log.warning("%d HTTP connections did not stop in %s s", len(stuck), STOP_GRACE)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_GRACE):   # Python 3.12+ waits for every connection
                await server.wait_closed()


# =====================================================================================================
# Hardware and build
# =====================================================================================================
# (build helper)


# =====================================================================================================
# Models
# =====================================================================================================
# (build helper)


# =====================================================================================================
# Workers
# =====================================================================================================


# =====================================================================================================
# Worker pool
# =====================================================================================================


# =====================================================================================================
# Chat API
# =====================================================================================================


# =====================================================================================================
# Server wiring
# =====================================================================================================


# =====================================================================================================
# CLI
# =====================================================================================================


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    raise SystemExit("not yet")


if __name__ == "__main__":
    sys.exit(main())
