"""Tests of the "HTTP/1.1 and SSE protocol" and "HTTP server" sections of local_swarm.py.

Parser tests are tables run through RequestParser and through h11 (the reference parser) on the same
bytes. Server tests use real sockets on 127.0.0.1:0, with h11 as a strict client-side parser of the
replies. Each async test runs under asyncio.run (no pytest-asyncio).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import h11
import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import until  # noqa: E402
from local_swarm import (  # noqa: E402
    SSE_DONE, ChunkedDecoder, HTTPError, HttpLimits, HttpServer, Request, RequestHead,
    RequestParser, Response, SSEDecoder, WorkerError, sse_comment, sse_event, sse_json,
)

# Small limits so every bound can be crossed with small inputs; timeouts roomy unless a test
# is about them.
LIMITS = HttpLimits(max_request_line=1024, max_header_bytes=4096, max_header_count=20,
                    max_body=1000, max_chunk_line=64, header_timeout=3.0, body_timeout=3.0,
                    keepalive_timeout=5.0, linger_timeout=0.5)
QUICK = dataclasses.replace(LIMITS, header_timeout=0.3, body_timeout=0.3, keepalive_timeout=0.3)
# h11 bounds only an incomplete event (request line and headers together), and only checks it when
# it needs more data: the big rows are therefore fed to both parsers in pieces.
H11_MAX_INCOMPLETE = LIMITS.max_request_line + LIMITS.max_header_bytes


def run(coro: Awaitable[Any], timeout: float = 20.0) -> Any:
    """Run one async test body with an overall time limit."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


# =====================================================================================================
# Parser against h11
# =====================================================================================================


@dataclass(frozen=True)
class Case:
    """One row: raw bytes, our expected status (None: accepted), and if we deliberately differ from
    h11 on accept/reject, why (empty: h11 agrees)."""

    name: str
    raw: bytes
    status: int | None = None
    differs: str = ""


@dataclass(frozen=True)
class Parsed:
    """A request reduced to what both parsers report."""

    method: bytes
    target: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


H = b"Host: a\r\n"
CHUNKED = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
BIG = b"x" * 2000

CASES = [
    # ---- valid -------------------------------------------------------------------------------
    Case("simple GET", b"GET /v1/models?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
    Case("POST with Content-Length",
         b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
         b"Content-Length: 7\r\n\r\n{\"a\":1}"),
    Case("chunked with extensions and trailers",
         CHUNKED + b"5;name=val\r\nhello\r\n6;x;y=\"q\"\r\n world\r\n0;end\r\nX-Trailer: 1\r\nY: 2\r\n\r\n"),
    Case("chunked: hex in both cases, whitespace after size",
         CHUNKED + b"A \r\n0123456789\r\na\t\r\n0123456789\r\n00\r\n\r\n"),
    Case("Transfer-Encoding in any case", CHUNKED.replace(b"chunked", b"ChUnKeD") + b"0\r\n\r\n"),
    Case("pipelined pair",
         b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"),
    Case("pipelined chunked then GET", CHUNKED + b"2\r\nhi\r\n0\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n"),
    Case("HTTP/1.0 without Host", b"GET / HTTP/1.0\r\n\r\n"),
    Case("HTTP/1.0 keep-alive POST",
         b"POST /x HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc"),
    Case("header names in any case",
         b"GET / HTTP/1.1\r\nHOST: a\r\nx-LoWeR: B\r\nContent-length: 0\r\n\r\n"),
    Case("odd whitespace around values",
         b"GET / HTTP/1.1\r\nHost:a\r\nX:  \t spaced  value \t \r\nEmpty:\r\nSp: \r\n\r\n"),
    Case("bare LF line ends", b"GET / HTTP/1.1\nHost: a\nX: y\n\n"),
    Case("repeated equal Content-Length",
         b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3, 3\r\n\r\nabc"),
    Case("obs-text and control bytes in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xe9\x01\r\n\r\n"),
    Case("lower-case method token", b"get / HTTP/1.1\r\nHost: a\r\n\r\n"),
    Case("asterisk target", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
    Case("absolute-form target", b"GET http://a/b?c=d HTTP/1.1\r\nHost: a\r\n\r\n"),
    Case("Expect: 100-continue", b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                                 b"Content-Length: 1\r\n\r\nz"),
    Case("incomplete head", b"GET / HTTP/1.1\r\nHost: a\r\n"),
    Case("incomplete body", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhalf"),
    Case("incomplete chunked body", CHUNKED + b"5\r\nhel"),
    Case("empty line before the request line", b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
         differs="RFC 9112 §2.2: a server SHOULD ignore an empty line before a request (clients "
                 "send CRLF after a body); h11 rejects it"),
    # ---- header folding ----------------------------------------------------------------------
    Case("obs-fold continuation with space", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400,
         differs="h11 unfolds; we reject (RFC 9112 §5.2 allows it) since front ends disagree"),
    Case("obs-fold continuation with tab", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n", 400,
         differs="as above"),
    Case("folded line before any header", b"GET / HTTP/1.1\r\n X: a\r\nHost: a\r\n\r\n", 400),
    # ---- request line ------------------------------------------------------------------------
    Case("request line with two parts", b"GET /\r\nHost: a\r\n\r\n", 400),
    Case("request line with a double space", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("request line with a trailing space", b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
    Case("lower-case protocol name", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    Case("bad token character in method", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("non-ASCII target", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("bare CR in request line", b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("space before the request line", b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("TLS hello on the plain port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400),
    Case("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505,
         differs="h11 accepts any HTTP/d.d; we speak 1.0 and 1.1 only"),
    Case("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505, differs="as above"),
    Case("HTTP/0.9", b"GET / HTTP/0.9\r\n\r\n", 505, differs="as above"),
    Case("request line over both limits", b"GET /" + b"a" * 6000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    Case("request line just over our limit", b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
         414, differs="h11 has no request-line limit, only its incomplete-event bound"),
    # ---- header lines ------------------------------------------------------------------------
    Case("header line without colon", b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400),
    Case("whitespace before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    Case("bad token character in name", b"GET / HTTP/1.1\r\nHost: a\r\nX(y): 1\r\n\r\n", 400),
    Case("space inside a name", b"GET / HTTP/1.1\r\nHost: a\r\nX y: 1\r\n\r\n", 400),
    Case("empty header name", b"GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n", 400),
    Case("bare CR in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    Case("NUL in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    Case("missing Host in HTTP/1.1", b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    Case("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    Case("header bytes over both limits",
         b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X%d: %s\r\n" % (i, BIG) for i in range(3)) + b"\r\n",
         431),
    Case("header count over our limit",
         b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(25)) + b"\r\n",
         431, differs="h11 does not count header fields"),
    # ---- framing -----------------------------------------------------------------------------
    Case("Content-Length with Transfer-Encoding",
         b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         400, differs="h11 lets Transfer-Encoding win (RFC 9112 §6.3); we refuse: smuggling"),
    Case("Transfer-Encoding gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    Case("Transfer-Encoding gzip, chunked",
         b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    Case("Transfer-Encoding twice",
         b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
         501),
    Case("Content-Length list that conflicts",
         b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\nab", 400),
    Case("Content-Length repeated, different",
         b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    Case("Content-Length not digits", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", 400),
    Case("Content-Length negative", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    Case("Content-Length with sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx", 400),
    Case("Content-Length empty", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n", 400),
    Case("Content-Length of 21 digits",
         b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * 21 + b"\r\n\r\n", 400),
    Case("Content-Length over max_body",
         b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001, 413,
         differs="h11 has no body-size limit"),
    Case("chunked body over max_body", CHUNKED + b"3e8\r\n" + b"x" * 1000 + b"\r\n1\r\nx\r\n0\r\n\r\n",
         413, differs="as above"),
    Case("chunk size not hex", CHUNKED + b"zz\r\nhi\r\n0\r\n\r\n", 400),
    Case("chunk size of 21 hex digits", CHUNKED + b"0" * 21 + b"\r\n\r\n", 400),
    Case("chunk size missing", CHUNKED + b"\r\nhi\r\n0\r\n\r\n", 400),
    Case("chunk-size line over max_chunk_line", CHUNKED + b"2;" + b"e" * 100 + b"\r\nhi\r\n0\r\n\r\n",
         400, differs="h11 does not bound chunk extensions"),
    Case("no CRLF after chunk data", CHUNKED + b"2\r\nhiXX0\r\n\r\n", 400),
    Case("chunk data longer than its size", CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", 400),
    Case("chunk-size line ended by bare LF", CHUNKED + b"2\nhi\r\n0\r\n\r\n", 400),
    Case("malformed trailer line", CHUNKED + b"0\r\nbad trailer\r\n\r\n", 400),
]


def feed_steps(raw: bytes) -> tuple[int, ...]:
    """Feed small inputs whole and byte by byte; big ones in 512-byte pieces (see H11_MAX_INCOMPLETE)."""
    return (len(raw), 1) if len(raw) <= 2048 else (512,)


def pieces(raw: bytes, step: int) -> list[bytes]:
    return [raw[i:i + step] for i in range(0, len(raw), step)]


def ours(raw: bytes, step: int) -> list[Parsed | str] | int:
    """Our parser's reading: the requests (then "incomplete" if a request is unfinished), or the
    status of the HTTPError it raised."""
    parser, out = RequestParser(LIMITS), []
    try:
        for piece in pieces(raw, step):
            parser.feed(piece)
            while (event := parser.next_event()) is not None:
                if isinstance(event, Request):
                    out.append(Parsed(event.method.encode(), event.target.encode(),
                                      event.version[5:].encode(),
                                      tuple((k.encode("latin-1"), v.encode("latin-1"))
                                            for k, v in event.headers), event.body))
    except HTTPError as exc:
        assert exc.close, "a framing error must close the connection"
        return exc.status
    return out + (["incomplete"] if parser.phase != "idle" else [])


def reference(raw: bytes, step: int) -> list[Parsed | str] | int:
    """h11's reading of the same bytes, answering each request so that the next can be read;
    a rejection gives h11's status hint."""
    conn, out = h11.Connection(h11.SERVER, max_incomplete_event_size=H11_MAX_INCOMPLETE), []
    head, body = None, bytearray()
    try:
        for piece in pieces(raw, step):
            conn.receive_data(piece)
            while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if isinstance(event, h11.Request):
                    head, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    out.append(Parsed(head.method, head.target, head.http_version,
                                      tuple(head.headers), bytes(body)))
                    conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                    conn.send(h11.EndOfMessage())
                    if conn.our_state is h11.MUST_CLOSE:       # HTTP/1.0 and friends
                        return out
                    conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        return exc.error_status_hint
    unfinished = conn.their_state is not h11.IDLE or conn.trailing_data[0]
    return out + (["incomplete"] if unfinished else [])


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_parser_against_h11(case: Case) -> None:
    for step in feed_steps(case.raw):
        mine, theirs = ours(case.raw, step), reference(case.raw, step)
        if case.status is None:
            assert isinstance(mine, list) and mine, f"rejected with {mine}"
        else:
            assert mine == case.status
        if case.differs:
            assert isinstance(mine, int) != isinstance(theirs, int), "h11 now agrees: drop `differs`"
        elif isinstance(mine, list):
            assert mine == theirs
        else:
            assert isinstance(theirs, int), f"h11 accepted: {theirs}"


def test_parser_events_and_fields() -> None:
    parser = RequestParser(LIMITS)
    parser.feed(b"POST /v1/chat?stream=1 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n"
                b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert parser.phase == "head"
    head = parser.next_event()
    assert isinstance(head, RequestHead) and head.expect_continue and parser.awaiting_body
    assert parser.next_event() is None and parser.phase == "body"
    parser.feed(b"{}")
    request = parser.next_event()
    assert isinstance(request, Request) and parser.phase == "idle"
    assert (request.method, request.target, request.path, request.version) == \
        ("POST", "/v1/chat?stream=1", "/v1/chat", "HTTP/1.1")
    assert request.header("X-A") == "1" and request.header("missing", "d") == "d"
    assert request.json() == {}


def test_obs_fold_is_named_in_the_error() -> None:
    parser = RequestParser(LIMITS)
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n")
    with pytest.raises(HTTPError, match="folding"):
        parser.next_event()


def test_chunked_decoder_byte_by_byte() -> None:
    decoder, buf = ChunkedDecoder(LIMITS), bytearray()
    results = []
    for byte in b"3;x\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\nNEXT":
        buf.append(byte)
        results.append(decoder.read(buf))
    assert results.count(None) == len(results) - 5 and results[-5] == b"abcde"
    assert bytes(buf) == b"NEXT"


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b"[" * 100_000, b"{\"a\": 1} x"])
def test_request_json_rejects_bad_bodies(body: bytes) -> None:
    request = Request("POST", "/", "/", "HTTP/1.1", (), body)
    with pytest.raises(HTTPError) as info:
        request.json()
    assert (info.value.status, info.value.code, info.value.close) == (400, "invalid_json", False)


def test_response_constructors() -> None:
    reply = Response.json({"a": [1, "é"]}, 201, [("X-A", "1")])
    assert (reply.status, reply.headers) == (201, [("Content-Type", "application/json"), ("X-A", "1")])
    assert json.loads(reply.body) == {"a": [1, "é"]}
    error = Response.error(HTTPError(401, "no key", type="authentication_error",
                                     headers=[("WWW-Authenticate", "Bearer")], close=True))
    assert error.status == 401 and ("WWW-Authenticate", "Bearer") in error.headers
    assert ("Connection", "close") in error.headers
    assert json.loads(error.body) == {"error": {"message": "no key", "type": "authentication_error",
                                                "param": None, "code": None}}

    async def nothing() -> AsyncIterator[bytes]:
        yield b""
    stream = nothing()
    sse = Response.sse(stream, [("X-B", "2")])
    assert sse.stream is stream and sse.status == 200
    assert {("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"), ("X-B", "2")} <= set(sse.headers)


# =====================================================================================================
# SSE framing
# =====================================================================================================

FRAMES = [
    (sse_event("hello"), b"data: hello\n\n"),
    (sse_event(""), b"data: \n\n"),
    (sse_event("a\nb"), b"data: a\ndata: b\n\n"),
    (sse_event("a\r\nb\rc\n"), b"data: a\ndata: b\ndata: c\ndata: \n\n"),
    (sse_event("é"), "data: é\n\n".encode()),
    (sse_json({"a": [1, 2], "b": "x\ny"}), b'data: {"a":[1,2],"b":"x\\ny"}\n\n'),
    (sse_comment(), b": \n\n"),
    (sse_comment("keep-alive"), b": keep-alive\n\n"),
    (SSE_DONE, b"data: [DONE]\n\n"),
]


@pytest.mark.parametrize("made,expected", FRAMES)
def test_sse_framing(made: bytes, expected: bytes) -> None:
    assert made == expected


DECODES = [
    (b"data: a\n\n", ["a"]),
    (b"data:a\n\n", ["a"]),
    (b"data:  a\n\n", [" a"]),                          # only one space is stripped
    (b"data: a\ndata: b\n\n", ["a\nb"]),
    (b"data: a\r\n\r\ndata: b\r\rdata: c\n\n", ["a", "b", "c"]),
    (b": comment\n\ndata: x\n\n", ["x"]),
    (b"event: delta\nid: 7\nretry: 10\ndata: y\n\n", ["y"]),
    (b"data\n\n", [""]),                                # a field with no colon: empty value
    (b"data:\n\n", [""]),
    (b"event: ping\n\n", []),                           # no data: nothing to dispatch
    (b"data: [DONE]\n\n", ["[DONE]"]),
    (b"data: unfinished\n", []),
    ("data: é€😀\n\n".encode(), ["é€😀"]),
    (b"\xef\xbb\xbfdata: bom\n\n", ["bom"]),
    (b"data: a\r", []),                                 # the line is read, the event not ended
]


@pytest.mark.parametrize("raw,events", DECODES)
def test_sse_decoder(raw: bytes, events: list[str]) -> None:
    assert SSEDecoder().feed(raw) == events
    one_by_one, decoder = [], SSEDecoder()
    for byte in raw:
        one_by_one += decoder.feed(bytes([byte]))
    assert one_by_one == events


@pytest.mark.parametrize("raw", [
    b"data: a\r\n\r\ndata: b\r\rdata: c\n\n: x\r\ndata: d\r\n\r\n",
    "data: é€😀\r\ndata: 2\r\r".encode(),
])
def test_sse_decoder_split_at_every_boundary(raw: bytes) -> None:
    whole = SSEDecoder().feed(raw)
    assert whole
    for cut in range(len(raw) + 1):
        decoder = SSEDecoder()
        assert decoder.feed(raw[:cut]) + decoder.feed(raw[cut:]) == whole, cut


@pytest.mark.parametrize("data", ["plain", "two\nlines", "crlf\r\nline", "", "{\"k\":\"v\"}"])
def test_sse_round_trip(data: str) -> None:
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert SSEDecoder().feed(sse_event(data)) == [expected]


def test_sse_decoder_bounds_a_line() -> None:
    decoder = SSEDecoder(max_line=16)
    with pytest.raises(WorkerError):
        decoder.feed(b"data: " + b"x" * 32)


# =====================================================================================================
# Server harness
# =====================================================================================================


class App:
    """The handler under test: a few routes, and a record of what happened to slow work."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.stream_closed = asyncio.Event()
        self.yielded = 0
        self.streams: list[AsyncIterator[bytes]] = []
        self.seen: list[str] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(f"{request.method} {request.path}")
        query = dict(part.split("=") for part in request.target.partition("?")[2].split("&") if part)
        route: Callable[[Request, dict[str, str]], Awaitable[Response]] = getattr(
            self, "route_" + request.path.strip("/").replace("-", "_"), self.route_echo)
        return await route(request, query)

    async def route_echo(self, request: Request, query: dict[str, str]) -> Response:
        return Response.json({"method": request.method, "path": request.path,
                              "body": request.body.decode("latin-1")})

    async def route_json(self, request: Request, query: dict[str, str]) -> Response:
        return Response.json({"got": request.json()})

    async def route_text(self, request: Request, query: dict[str, str]) -> Response:
        return Response(200, [("Content-Type", "text/plain")], b"hello world")

    async def route_delay(self, request: Request, query: dict[str, str]) -> Response:
        await asyncio.sleep(int(query.get("ms", "0")) / 1000)
        return await self.route_echo(request, query)

    async def route_sleep(self, request: Request, query: dict[str, str]) -> Response:
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response.json({})

    async def route_boom(self, request: Request, query: dict[str, str]) -> Response:
        raise RuntimeError("a bug in a route")

    async def route_teapot(self, request: Request, query: dict[str, str]) -> Response:
        raise HTTPError(418, "short and stout", code="teapot", headers=[("X-Tea", "1")])

    async def route_fatal(self, request: Request, query: dict[str, str]) -> Response:
        raise HTTPError(400, "cannot continue", close=True)

    async def route_stream(self, request: Request, query: dict[str, str]) -> Response:
        stream = self.events(int(query.get("n", "3")), float(query.get("gap", "0")),
                             int(query.get("size", "0")), query.get("then", ""))
        self.streams.append(stream)
        return Response(int(query.get("status", "200")), [("Content-Type", "text/event-stream")],
                        stream=stream)

    async def events(self, n: int, gap: float, size: int, then: str) -> AsyncIterator[bytes]:
        try:
            yield b""                                   # must not be sent: it would end the body
            for i in range(n):
                self.yielded += 1
                yield sse_json({"i": i, "pad": "x" * size})
                await asyncio.sleep(gap)
            if then == "stall":
                await asyncio.sleep(30)
            if then == "fail":
                raise RuntimeError("upstream broke")
            yield SSE_DONE
        finally:
            self.stream_closed.set()


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A raw-socket client: sends exact bytes; reads replies with h11 as a strict parser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def expect(self, method: str = "GET") -> None:
        """Tell h11 a request went out (the bytes we really sent may be anything)."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        self.h11.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
        self.h11.send(h11.EndOfMessage())

    async def event(self, timeout: float = 3.0) -> Any:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(await asyncio.wait_for(self.reader.read(65536), timeout))
        return event

    async def reply(self, method: str = "GET", timeout: float = 3.0) -> Reply:
        self.expect(method)
        head, body = None, bytearray()
        while not isinstance(event := await self.event(timeout), h11.EndOfMessage):
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
        headers = [(k.decode(), v.decode("latin-1")) for k, v in head.headers]
        return Reply(head.status_code, headers, bytes(body))

    async def closed(self, timeout: float = 2.0) -> bool:
        """True if the server closes its side with nothing more to say."""
        try:
            return await asyncio.wait_for(self.reader.read(65536), timeout) == b""
        except (asyncio.TimeoutError, ConnectionError):
            return False

    def close(self, reset: bool = False) -> None:
        if reset:                                  # SO_LINGER 0: close sends RST, not FIN
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@dataclass
class Harness:
    server: HttpServer
    app: App
    clients: list[Client] = field(default_factory=list)

    async def client(self) -> Client:
        client = Client(*await asyncio.open_connection("127.0.0.1", self.server.port))
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def serving(limits: HttpLimits = LIMITS, cors: tuple[str, ...] = ("http://localhost",
                                                                        "http://127.0.0.1")):
    app = App()
    server = HttpServer(app, limits, cors_origins=cors)
    await server.start()
    harness = Harness(server, app)
    try:
        yield harness
    finally:
        await server.stop()
        for client in harness.clients:
            await client.aclose()


def assert_error(reply: Reply, status: int, closing: bool = True) -> dict[str, Any]:
    """The reply is an OpenAI-shaped JSON error with this status; returns the error object."""
    assert reply.status == status, reply
    assert reply.header("content-type") == "application/json"
    assert reply.header("server") and reply.header("server").startswith("local-swarm/")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (reply.header("connection") == "close") == closing
    return error


GET = b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n"


# =====================================================================================================
# Server: bad input
# =====================================================================================================

REJECTED = [case for case in CASES if case.status is not None]


def test_every_bad_input_gets_its_status_and_a_close(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="local_swarm")

    async def main() -> None:
        async with serving() as h:
            for case in REJECTED:
                client = await h.client()
                await client.send(case.raw)
                error = assert_error(await client.reply(), case.status)
                assert error["type"] == "invalid_request_error", case.name
                assert await client.closed(), case.name
                client.close()
            client = await h.client()                  # and the server still serves
            await client.send(GET)
            assert (await client.reply()).status == 200
    run(main())
    ours = [r for r in caplog.records if r.name == "local_swarm"]
    assert ours and not [r for r in ours if r.levelno >= logging.WARNING or r.exc_info]


def test_handler_errors_keep_or_close_the_connection() -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"GET /teapot HTTP/1.1\r\nHost: a\r\n\r\n")
            reply = await client.reply()
            assert assert_error(reply, 418, closing=False)["code"] == "teapot"
            assert reply.header("x-tea") == "1"
            for body in (b"{bad", b""):
                await client.send(b"POST /json HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
                                  % (len(body), body))
                assert assert_error(await client.reply(), 400, closing=False)["code"] == "invalid_json"
            await client.send(b"GET /fatal HTTP/1.1\r\nHost: a\r\n\r\n")
            assert_error(await client.reply(), 400)
            assert await client.closed()
    run(main())


def test_handler_exception_is_a_logged_500(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n" + GET)
            error = assert_error(await client.reply(), 500, closing=False)
            assert error["type"] == "server_error"
            assert (await client.reply()).status == 200        # same connection
            other = await h.client()                            # and a new one
            await other.send(GET)
            assert (await other.reply()).status == 200
    run(main())
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 1 and "a bug in a route" in str(failures[0].exc_info[1])


# =====================================================================================================
# Server: connections, pipelining, 100-continue, HEAD
# =====================================================================================================


def test_keep_alive_and_connection_close() -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            for path in (b"/one", b"/two", b"/three"):
                await client.send(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
                reply = await client.reply()
                assert reply.json()["path"] == path.decode() and reply.header("connection") is None
            await client.send(b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert (await client.reply()).header("connection") == "close"
            assert await client.closed()
    run(main())


def test_http10_closes_unless_keep_alive() -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert (await client.reply()).header("connection") == "keep-alive"
            await client.send(b"GET /b HTTP/1.0\r\n\r\n")
            reply = await client.reply()
            assert reply.json()["path"] == "/b" and reply.header("connection") == "close"
            assert await client.closed()
    run(main())


def test_pipelined_requests_answered_in_order() -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"GET /delay?ms=150 HTTP/1.1\r\nHost: a\r\n\r\n"
                              b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
                              + CHUNKED.replace(b"POST /", b"POST /chunked") + b"3\r\nabc\r\n0\r\n\r\n"
                              b"GET /delay?ms=0 HTTP/1.1\r\nHost: a\r\n\r\n")
            replies = [(await client.reply()).json() for _ in range(4)]
            assert [(r["path"], r["body"]) for r in replies] == \
                [("/delay", ""), ("/echo", "hi"), ("/chunked", "abc"), ("/delay", "")]
    run(main())


def test_pipelined_bodies_over_max_body_wait_and_are_all_answered() -> None:
    """Six pipelined 600-byte bodies with max_body 1000: the reader holds back (at most about
    max_body queued per connection) instead of buffering them all, and every one is answered."""
    async def main() -> None:
        async with serving(dataclasses.replace(LIMITS, max_body=1000)) as h:
            client = await h.client()
            body = b"x" * 600
            one = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 600\r\n\r\n" + body
            await client.send(b"GET /delay?ms=200 HTTP/1.1\r\nHost: a\r\n\r\n" + one * 6)
            replies = [(await client.reply()).json() for _ in range(7)]
            assert [r["body"] for r in replies] == [""] + ["x" * 600] * 6
    run(main())


def test_expect_100_continue() -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                              b"Content-Length: 5\r\n\r\n")
            interim = await asyncio.wait_for(client.reader.readexactly(25), 1.0)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await client.send(b"hello")
            assert (await client.reply()).json()["body"] == "hello"
            await client.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                              b"Content-Length: 5000\r\n\r\n")       # too big: no 100, a 413
            assert_error(await client.reply(), 413)
            assert await client.closed()
    run(main())


def test_100_continue_waits_for_earlier_replies() -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"GET /delay?ms=200 HTTP/1.1\r\nHost: a\r\n\r\n"
                              b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                              b"Content-Length: 2\r\n\r\n")
            seen = b""
            while b"100 Continue" not in seen:
                seen += await asyncio.wait_for(client.reader.read(65536), 2)
            assert seen.index(b"HTTP/1.1 200 OK") < seen.index(b"HTTP/1.1 100 Continue")
            await client.send(b"ok")
            rest = b""
            while not rest.endswith(b'"body":"ok"}'):
                rest += await asyncio.wait_for(client.reader.read(65536), 2)
    run(main())


def test_head_has_headers_and_no_body() -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"HEAD /text HTTP/1.1\r\nHost: a\r\n\r\n")
            reply = await client.reply("HEAD")
            assert (reply.status, reply.header("content-length"), reply.body) == (200, "11", b"")
            await client.send(b"HEAD /stream HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await client.reply("HEAD")).header("content-type") == "text/event-stream"
            await client.send(b"GET /stream?status=204 HTTP/1.1\r\nHost: a\r\n\r\n")
            reply = await client.reply()
            assert (reply.status, reply.body, reply.header("transfer-encoding")) == (204, b"", None)
            await client.send(b"GET /text HTTP/1.1\r\nHost: a\r\n\r\n")  # nothing stray in between
            assert (await client.reply()).body == b"hello world"
            assert h.app.yielded == 0                       # both streams closed, never started
            assert [stream.ag_frame for stream in h.app.streams] == [None, None]
            assert h.app.seen[:2] == ["HEAD /text", "HEAD /stream"]
    run(main())


def test_httpx_client() -> None:
    async def main() -> None:
        async with serving() as h:
            base = f"http://127.0.0.1:{h.server.port}"
            async with httpx.AsyncClient(base_url=base) as client:
                reply = await client.post("/json", json={"q": [1, 2]})
                assert reply.json() == {"got": {"q": [1, 2]}}
                assert reply.headers["server"].startswith("local-swarm/")
                head = await client.head("/text")
                assert head.headers["content-length"] == "11" and head.content == b""
                decoder, events = SSEDecoder(), []
                async with client.stream("GET", "/stream?n=4") as streamed:
                    assert streamed.headers["transfer-encoding"] == "chunked"
                    async for chunk in streamed.aiter_raw():
                        events += decoder.feed(chunk)
                assert [json.loads(e)["i"] for e in events[:-1]] == [0, 1, 2, 3]
                assert events[-1] == "[DONE]"
                error = await client.post("/json", content=b"nope")
                assert error.status_code == 400 and error.json()["error"]["code"] == "invalid_json"
    run(main())


def test_stream_to_http10_ends_with_the_connection() -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"GET /stream?n=2 HTTP/1.0\r\n\r\n")
            reply = await client.reply()
            assert reply.header("transfer-encoding") is None and reply.header("connection") == "close"
            assert SSEDecoder().feed(reply.body)[-1] == "[DONE]"
    run(main())


# =====================================================================================================
# Server: CORS
# =====================================================================================================


def test_options_preflight_allowed_origin() -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
                              b"Origin: http://localhost:5173\r\nAccess-Control-Request-Method: POST\r\n"
                              b"Access-Control-Request-Headers: content-type, x-custom, bad header\r\n\r\n")
            reply = await client.reply("OPTIONS")
            assert reply.status == 204 and reply.body == b""
            assert reply.header("access-control-allow-origin") == "http://localhost:5173"
            assert reply.header("access-control-allow-methods") == "GET, POST, HEAD, OPTIONS"
            assert reply.header("access-control-allow-headers") == \
                "Authorization, Content-Type, X-Api-Key, x-custom"
            assert reply.header("access-control-max-age") and reply.header("vary") == "Origin"
            assert h.app.seen == []                       # answered by the server itself
    run(main())


@pytest.mark.parametrize("origin,allowed", [
    ("http://localhost", True), ("http://127.0.0.1:8080", True), ("http://localhost:", False),
    ("http://evil.example", False), ("http://localhost.evil.example", False),
    ("http://localhost:80:80", False), ("https://localhost", False), ("http://localhost:\xb2", False),
])
def test_cors_origin_on_every_reply(origin: str, allowed: bool) -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            for request in (b"GET /echo", b"OPTIONS /v1/models", b"GET /teapot"):
                await client.send(request + b" HTTP/1.1\r\nHost: a\r\nOrigin: %s\r\n\r\n"
                                  % origin.encode())
                reply = await client.reply(request.split()[0].decode())
                assert (reply.header("access-control-allow-origin") == origin) == allowed
                assert (reply.header("access-control-allow-origin") is None) == (not allowed)
                assert reply.header("vary") == "Origin"
    run(main())


def test_cors_star_allows_any_origin() -> None:
    async def main() -> None:
        async with serving(cors=("*",)) as h:
            client = await h.client()
            await client.send(b"GET /echo HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example\r\n\r\n")
            assert (await client.reply()).header("access-control-allow-origin") == "https://app.example"
            await client.send(b"GET /echo HTTP/1.1\r\nHost: a\r\nOrigin: http://a\x01b\r\n\r\n")
            assert (await client.reply()).header("access-control-allow-origin") is None  # not echoed
            await client.send(GET)                        # no Origin: no CORS headers
            reply = await client.reply()
            assert reply.header("access-control-allow-origin") is None and reply.header("vary") is None
    run(main())


# =====================================================================================================
# Server: limits and deadlines
# =====================================================================================================


def test_header_deadline_runs_from_the_first_byte() -> None:
    async def main() -> None:
        async with serving(QUICK) as h:
            client = await h.client()
            started = time.monotonic()

            async def drip() -> None:                 # slowloris: a byte every 50 ms, forever
                await client.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
                with contextlib.suppress(ConnectionError):
                    while True:
                        await client.send(b"X")
                        await asyncio.sleep(0.05)
            dripping = asyncio.create_task(drip())
            assert_error(await client.reply(), 408)
            assert 0.25 < time.monotonic() - started < 3.0   # fired, not early
            dripping.cancel()
    run(main())


def test_body_deadline() -> None:
    async def main() -> None:
        async with serving(QUICK) as h:
            client = await h.client()
            started = time.monotonic()
            await client.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
            assert_error(await client.reply(), 408)
            assert 0.25 < time.monotonic() - started < 3.0   # fired, not early
            assert await client.closed()
            assert h.app.seen == []
    run(main())


def test_idle_keep_alive_closed_quietly() -> None:
    async def main() -> None:
        async with serving(QUICK) as h:
            client = await h.client()
            await client.send(GET)
            assert (await client.reply()).status == 200
            idle = time.monotonic()
            assert await client.closed()               # EOF with no bytes: no 408
            assert 0.25 < time.monotonic() - idle < 3.0   # fired, not early
            silent = await h.client()                  # a connection that never sends
            assert await silent.closed()
    run(main())


def test_slow_head_within_header_timeout_outlives_keepalive() -> None:
    limits = dataclasses.replace(LIMITS, keepalive_timeout=0.2, header_timeout=2.0)

    async def main() -> None:
        async with serving(limits) as h:
            client = await h.client()
            await client.send(b"GET /echo HTTP/1.1\r\n")
            await asyncio.sleep(0.5)
            await client.send(b"Host: a\r\n\r\n")
            assert (await client.reply()).status == 200
    run(main())


@pytest.mark.parametrize("body", [
    b"Content-Length: 1001\r\n\r\n" + b"x" * 1001,
    b"Transfer-Encoding: chunked\r\n\r\n3e9\r\n" + b"x" * 1001 + b"\r\n0\r\n\r\n",
    b"Transfer-Encoding: chunked\r\n\r\n" + (b"64\r\n" + b"x" * 100 + b"\r\n") * 20 + b"0\r\n\r\n",
], ids=["content-length", "one-big-chunk", "many-small-chunks"])
def test_body_too_big(body: bytes) -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"POST /echo HTTP/1.1\r\nHost: a\r\n" + body)
            assert_error(await client.reply(), 413)
            assert await client.closed()
            assert h.app.seen == []
    run(main())


def test_closing_reply_survives_unread_input() -> None:
    """A 413 sent while the client is still sending its body must reach it: the server half-closes
    and drains (lingers) instead of closing at once, which would reset the connection."""
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4000000\r\n\r\n")
            sent = 0

            async def body() -> None:
                nonlocal sent
                with contextlib.suppress(ConnectionError):
                    for _ in range(40):
                        await client.send(b"x" * 100_000)
                        sent += 1
            sending = asyncio.create_task(body())
            await until(lambda: sent or sending.done())    # the body is on its way
            assert_error(await client.reply(), 413)
            await sending
    run(main())


# =====================================================================================================
# Server: clients that leave, failures, load, stop
# =====================================================================================================


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_disconnect_cancels_a_slow_handler(reset: bool) -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"GET /sleep HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.wait_for(h.app.started.wait(), 2)
            client.close(reset)
            await asyncio.wait_for(h.app.cancelled.wait(), 1.0)
            assert h.app.cancelled.is_set()
    run(main())


@pytest.mark.parametrize("query", [b"n=1000&gap=0.02", b"n=1&then=stall"], ids=["flowing", "stalled"])
def test_disconnect_closes_a_stream(query: bytes) -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"GET /stream?%s HTTP/1.1\r\nHost: a\r\n\r\n" % query)
            client.expect()
            assert isinstance(await client.event(), h11.Response)
            assert isinstance(await client.event(), h11.Data)
            client.close()
            await asyncio.wait_for(h.app.stream_closed.wait(), 1.0)
            assert h.app.yielded < 1000
    run(main())


def test_stream_failure_cuts_the_reply_short(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with serving() as h:
            client = await h.client()
            await client.send(b"GET /stream?n=2&then=fail HTTP/1.1\r\nHost: a\r\n\r\n")
            with pytest.raises(h11.RemoteProtocolError):   # EOF before the last chunk
                await client.reply()
            assert h.app.stream_closed.is_set()
            other = await h.client()
            await other.send(GET)
            assert (await other.reply()).status == 200
    run(main())
    assert ["upstream broke" in str(r.exc_info[1]) for r in caplog.records if r.exc_info] == [True]


def test_fifty_concurrent_connections() -> None:
    async def one(h: Harness, i: int) -> str:
        client = await h.client()
        await client.send(b"POST /delay?ms=100 HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%d"
                          % (len(str(i)), i))
        body = (await client.reply()).json()["body"]
        client.close()
        return body

    async def main() -> None:
        async with serving() as h:
            started = time.monotonic()
            bodies = await asyncio.gather(*(one(h, i) for i in range(50)))
            assert bodies == [str(i) for i in range(50)]
            assert time.monotonic() - started < 4.0        # together: one by one takes 5 s
    run(main())


def test_stop_does_not_hang_on_slow_clients() -> None:
    async def main() -> None:
        app = App()
        server = HttpServer(app, LIMITS)
        await server.start()
        hog = Client(*await asyncio.open_connection("127.0.0.1", server.port))
        await hog.send(b"GET /stream?n=100000&size=60000 HTTP/1.1\r\nHost: a\r\n\r\n")  # never read
        partial = Client(*await asyncio.open_connection("127.0.0.1", server.port))
        await partial.send(b"GET / HTTP/1.1\r\nHo")
        sleeper = Client(*await asyncio.open_connection("127.0.0.1", server.port))
        await sleeper.send(b"GET /sleep HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(app.started.wait(), 2)
        looks: list[int] = []

        def hog_stalled() -> bool:     # its buffers are full: no event yielded between two looks
            looks.append(app.yielded)
            return len(looks) > 1 and 0 < looks[-2] == looks[-1]
        await until(hog_stalled)
        assert 0 < app.yielded < 100000
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 3.0           # bounded by STOP_GRACE, not by clients
        assert app.stream_closed.is_set() and app.cancelled.is_set()
        for client in (hog, partial, sleeper):
            await client.aclose()
    run(main())
