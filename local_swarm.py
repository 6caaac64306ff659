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
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
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
    """A worker failed: it died, refused, or broke a stream. `status` is the worker's HTTP status
    when it answered with an error (a 4xx there means the request itself was bad)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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
    cors_origins: tuple[str, ...] = ("http://localhost", "http://127.0.0.1")
    http: HttpLimits = field(default_factory=HttpLimits)


# =====================================================================================================
# HTTP/1.1 and SSE protocol
# =====================================================================================================
# (http helper)


# =====================================================================================================
# HTTP server
# =====================================================================================================
# (http helper)


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
# A worker is one llama.cpp server process on 127.0.0.1. The daemon talks to it through a narrow
# interface (start, wait_ready, stream_chat, count_tokens, stop) so that another server binary built
# from the same llama.cpp source can be plugged in by writing one more class with these methods.
# Rules: a worker serves one request at a time (the pool guarantees it); we always ask it to stream,
# because llama-cpp-python cancels a streamed generation when we hang up but not a whole one;
# a worker process must never outlive the daemon (PR_SET_PDEATHSIG on Linux, plus a stdin pipe
# whose EOF ends the worker everywhere).

WORKER_READY_POLL = 0.25          # seconds between readiness probes while a worker loads its model
WORKER_STOP_GRACE = 3.0           # SIGTERM, then SIGKILL after this; shutdown must finish within 5 s
WORKER_LOG_TAIL = 20              # lines of a crashed worker's log shown in the daemon's log
PR_SET_PDEATHSIG = 1              # prctl option: signal the child when its parent thread dies

# Runs llama_cpp.server as __main__ (exactly `python -m llama_cpp.server ARGS`), after starting a
# thread that ends the process when the daemon's end of the stdin pipe closes (daemon gone, any OS).
WORKER_BOOTSTRAP = (
    "import os, runpy, sys, threading\n"
    "def _watch():\n"
    "    try:\n"
    "        while sys.stdin.buffer.read(4096):\n"
    "            pass\n"
    "    finally:\n"
    "        os._exit(0)\n"
    "threading.Thread(target=_watch, daemon=True).start()\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)


@dataclass(frozen=True)
class WorkerSpec:
    """How to start one worker."""

    index: int
    model: Path
    model_id: str
    n_ctx: int
    threads: int
    threads_batch: int
    gpu_layers: int
    env: dict[str, str]
    log_dir: Path
    python: str = sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the worker binds it right after)."""
    import socket
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _set_parent_death_signal() -> None:
    """In the child before exec (Linux): get SIGKILL when the daemon dies, even by SIGKILL."""
    import ctypes
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def launch_process(argv: Sequence[str], env: dict[str, str], log_path: Path
                         ) -> asyncio.subprocess.Process:
    """Start a child whose stdout/stderr go to log_path and whose stdin is our lifeline."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
            preexec_fn=_set_parent_death_signal if sys.platform.startswith("linux") else None)


Launcher = Callable[[Sequence[str], dict[str, str], Path], Awaitable[asyncio.subprocess.Process]]


def tail_lines(path: Path, n: int) -> str:
    """The last n lines of a text file ("" if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return b"\n".join(fh.read().splitlines()[-n:]).decode("utf-8", "replace")
    except OSError:
        return ""


class LlamaCppPythonWorker:
    """One `python -m llama_cpp.server` process and the HTTP calls the swarm makes to it."""

    def __init__(self, spec: WorkerSpec, client: Any, launcher: Launcher = launch_process) -> None:
        self.spec = spec
        self.client = client                  # an httpx.AsyncClient shared by the pool
        self.launcher = launcher
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0

    @property
    def name(self) -> str:
        return f"worker-{self.spec.index}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.spec.log_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def argv(self) -> list[str]:
        """The command line: llama_cpp.server with every knob explicit (FIELD_NOTES: the defaults
        oversubscribe the CPU and interrupt streams)."""
        s = self.spec
        return [s.python, "-c", WORKER_BOOTSTRAP,
                "--model", str(s.model), "--model_alias", s.model_id,
                "--host", "127.0.0.1", "--port", str(self.port),
                "--n_ctx", str(s.n_ctx), "--n_threads", str(s.threads),
                "--n_threads_batch", str(s.threads_batch), "--n_gpu_layers", str(s.gpu_layers),
                "--interrupt_requests", "False"]

    async def start(self) -> None:
        """Spawn the process on a fresh port; returns before the model is loaded."""
        self.port = free_port()
        self.started_at = time.monotonic()
        self.process = await self.launcher(self.argv(), self.spec.env, self.log_path)
        log.debug("%s: pid %s on port %d", self.name, self.process.pid, self.port)

    def exited(self) -> bool:
        return self.process is None or self.process.returncode is not None

    async def wait_ready(self, timeout: float) -> None:
        """Poll GET /v1/models until it answers 200. Raises WorkerError if the process exits or
        the deadline passes (with the tail of the worker's log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited():
                raise WorkerError(f"{self.name} exited while loading:\n"
                                  f"{tail_lines(self.log_path, WORKER_LOG_TAIL)}")
            if await self._answers():
                return
            await asyncio.sleep(WORKER_READY_POLL)
        raise WorkerError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    async def _answers(self) -> bool:
        import httpx
        try:
            reply = await self.client.get(self.url + "/v1/models", timeout=2.0)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    async def count_tokens(self, text: str) -> int:
        """Tokens in text by the worker's own tokenizer (special tokens parsed, BOS added)."""
        data = await self._post_json("/extras/tokenize/count", {"input": text})
        return int(data["count"])

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx
        try:
            reply = await self.client.post(self.url + path, json=body, timeout=30.0)
        except httpx.HTTPError as exc:
            raise WorkerError(f"{self.name}: {path}: {exc!r}") from exc
        if reply.status_code != 200:
            raise WorkerError(f"{self.name}: {path} answered {reply.status_code}: "
                              f"{reply.text[:300]}", status=reply.status_code)
        return reply.json()

    async def stream_chat(self, body: dict[str, Any], timeout: float) -> AsyncIterator[dict]:
        """POST a streaming chat request; yield each chunk (a dict) until [DONE].

        Raises WorkerError if the worker refuses, breaks the stream or ends it without [DONE].
        Closing this generator closes the connection, which stops the worker's generation.
        """
        import httpx
        body = {**body, "stream": True}
        try:
            async with self.client.stream("POST", self.url + "/v1/chat/completions", json=body,
                                          timeout=httpx.Timeout(timeout, connect=5.0)) as reply:
                if reply.status_code != 200:
                    text = (await reply.aread()).decode("utf-8", "replace")
                    raise WorkerError(f"{self.name} answered {reply.status_code}: {text[:300]}",
                                      status=reply.status_code)
                decoder = SSEDecoder()
                async for raw in reply.aiter_raw():
                    for data in decoder.feed(raw):
                        if data == "[DONE]":
                            return
                        yield json.loads(data)
        except httpx.HTTPError as exc:
            raise WorkerError(f"{self.name}: stream broken: {exc!r}") from exc
        except json.JSONDecodeError as exc:
            raise WorkerError(f"{self.name}: bad chunk: {exc}") from exc
        raise WorkerError(f"{self.name}: stream ended without [DONE]")

    async def stop(self, grace: float = WORKER_STOP_GRACE) -> None:
        """SIGTERM, wait up to grace seconds, then SIGKILL; always reaps the process."""
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()



# =====================================================================================================
# Worker pool
# =====================================================================================================
# The pool owns the workers: it starts them, restarts a crashed one with backoff, and leases each to
# one request at a time. Requests that find every worker busy wait in a bounded line; past its bound
# they get 429 with Retry-After (a client error the client can act on, never a 5xx that editors
# retry at once). A lease is released exactly once; a worker that died while leased comes back
# through its supervisor, never through the dead lease.

RESTART_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)   # seconds before restart k of a crashing worker
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1, 60             # bounds of the Retry-After estimate (seconds)


@dataclass
class WorkerSlot:
    """The pool's mutable record of one worker. state: starting | idle | busy | dead | stopped."""

    worker: Any
    state: str = "starting"
    lease_id: int = 0
    restarts: int = 0
    served: int = 0
    ready_once: bool = False


class WorkerPool:
    """N workers, their supervisors, and the line of requests waiting for one."""

    def __init__(self, workers: Sequence[Any], queue_size: int, start_timeout: float) -> None:
        self.slots = [WorkerSlot(w) for w in workers]
        self.queue_size = queue_size
        self.start_timeout = start_timeout
        self._waiters: list[asyncio.Future] = []
        self._tasks: list[asyncio.Task] = []
        self._lease_ids = 0
        self._stopping = False
        self._service_time = 5.0              # moving average of lease duration, for Retry-After
        self.on_ready: Callable[[Any], None] = lambda worker: None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker's supervisor. Returns at once; readiness shows in healthy()."""
        for slot in self.slots:
            self._tasks.append(asyncio.create_task(self._supervise(slot), name=slot.worker.name))

    async def wait_any_ready(self, timeout: float) -> None:
        """Wait until one worker is ready; raises WorkerError if none is within timeout."""
        deadline = time.monotonic() + timeout
        while not any(s.ready_once for s in self.slots):
            if time.monotonic() > deadline or all(t.done() for t in self._tasks):
                raise WorkerError("no worker became ready; see the worker logs")
            await asyncio.sleep(WORKER_READY_POLL)

    async def stop(self) -> None:
        """Stop supervisors and every worker process (SIGTERM, then SIGKILL); fail the waiters."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.worker.stop() for s in self.slots), return_exceptions=True)
        for slot in self.slots:
            slot.state = "stopped"
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(HTTPError(503, "the swarm is shutting down", "server_error",
                                            code="shutting_down"))
        self._waiters.clear()

    async def _supervise(self, slot: WorkerSlot) -> None:
        """Keep one worker running: start, wait ready, hand out, and restart after a crash."""
        worker = slot.worker
        while not self._stopping:
            slot.state = "starting"
            try:
                await worker.start()
                await worker.wait_ready(self.start_timeout)
            except (WorkerError, OSError) as exc:
                log.error("%s failed to start: %s", worker.name, exc)
                await worker.stop()
            else:
                self._mark_ready(slot)
                code = await worker.process.wait()
                if self._stopping:
                    return
                log.error("%s exited with code %s; restarting. Last log lines:\n%s", worker.name,
                          code, tail_lines(worker.log_path, WORKER_LOG_TAIL))
            slot.state = "dead"
            await asyncio.sleep(RESTART_BACKOFF[min(slot.restarts, len(RESTART_BACKOFF) - 1)])
            slot.restarts += 1

    def _mark_ready(self, slot: WorkerSlot) -> None:
        first = not slot.ready_once
        slot.ready_once = True
        log.info("%s ready (pid %s, port %d) in %.1f s", slot.worker.name, slot.worker.pid,
                 slot.worker.port, time.monotonic() - slot.worker.started_at)
        if first:
            self.on_ready(slot.worker)
        self._hand_out(slot)

    # -- leasing --------------------------------------------------------------------------------

    def _hand_out(self, slot: WorkerSlot) -> None:
        """Give a free worker to the oldest live waiter, else mark it idle."""
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                self._lease_to(slot)
                fut.set_result((slot, slot.lease_id))
                return
        slot.state = "idle"

    def _lease_to(self, slot: WorkerSlot) -> None:
        self._lease_ids += 1
        slot.state = "busy"
        slot.lease_id = self._lease_ids

    def _retry_after(self) -> int:
        busy = max(1, self.healthy())
        estimate = self._service_time * (len(self._waiters) + 1) / busy
        return int(min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, estimate)))

    async def _acquire(self) -> tuple[WorkerSlot, int]:
        """Wait for a worker. Raises HTTPError 429 when the waiting line is full."""
        if self._stopping:
            raise HTTPError(503, "the swarm is shutting down", "server_error", code="shutting_down")
        for slot in self.slots:
            if slot.state == "idle":
                self._lease_to(slot)
                return slot, slot.lease_id
        if sum(not f.done() for f in self._waiters) >= self.queue_size:
            raise HTTPError(429, f"all {len(self.slots)} workers are busy and {self.queue_size} "
                            "requests are waiting; retry later", "rate_limit_error",
                            code="queue_full", headers=[("Retry-After", str(self._retry_after()))])
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(*fut.result())      # handed a worker just as we were cancelled
            raise

    def _release(self, slot: WorkerSlot, lease_id: int) -> None:
        if slot.state != "busy" or slot.lease_id != lease_id:
            return                                 # died and restarted meanwhile: not ours now
        slot.served += 1
        if slot.worker.exited():
            slot.state = "dead"                    # the supervisor restarts it
        else:
            self._hand_out(slot)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Any]:
        """`async with pool.lease() as worker:` exclusive use of one ready worker."""
        slot, lease_id = await self._acquire()
        started = time.monotonic()
        try:
            yield slot.worker
        finally:
            self._service_time = 0.8 * self._service_time + 0.2 * (time.monotonic() - started)
            self._release(slot, lease_id)

    # -- reporting ------------------------------------------------------------------------------

    def healthy(self) -> int:
        return sum(s.state in ("idle", "busy") for s in self.slots)

    def waiting(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def status(self) -> str:
        """healthy (all workers up), degraded (some or none up after start), initializing."""
        if not any(s.ready_once for s in self.slots):
            return "initializing"
        return "healthy" if self.healthy() == len(self.slots) else "degraded"

    def describe(self) -> list[dict[str, Any]]:
        return [{"id": s.worker.name, "state": s.state, "pid": s.worker.pid,
                 "port": s.worker.port, "restarts": s.restarts, "served": s.served}
                for s in self.slots]



# =====================================================================================================
# Chat API
# =====================================================================================================
# Rules: validate every field a client sends before it reaches a worker (types and ranges: llama.cpp
# has crashed on crafted numbers); answer what cannot succeed with a 4xx before any byte of a 200
# (a 5xx or an error inside a 200 stream makes editors retry forever); count tokens with the
# worker's tokenizer, never by length; retry a request on another worker when its worker died
# before anything reached the client.

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
MAX_MESSAGES = 4096                 # messages in one request
MAX_STOP = 4                        # stop sequences (OpenAI's limit)
MAX_TOKENS_LIMIT = 1 << 20          # a max_tokens beyond any context we could serve
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter"}


def _invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> HTTPError:
    return HTTPError(400, message, "invalid_request_error", code=code, param=param)


def _check_number(body: dict, name: str, lo: float, hi: float, integer: bool = False) -> Any:
    """The field's value if present and in [lo, hi]; None if absent or null. Raises 400."""
    value = body.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise _invalid(f"'{name}' must be {what} between {lo} and {hi}", name)
    return value


def _check_bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(f"'{name}' must be a boolean", name)
    return value


def message_text(content: Any, where: str) -> str:
    """Content as a string: a string, null (""), or a list of text parts joined by newlines."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _invalid(f"{where}.content must be a string, null or a list of parts", where)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("text", part.get("refusal")), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _invalid(f"{where}.content[{i}]: only text parts are supported (got {kind!r})",
                           f"{where}.content", code="unsupported_content")
        texts.append(part.get("text", part.get("refusal")))
    return "\n".join(texts)


def normalize_message(msg: Any, i: int) -> dict[str, Any]:
    """One message in the form every chat template renders: role and string content, plus
    tool_calls / tool_call_id / name where present. Raises HTTPError 400."""
    where = f"messages[{i}]"
    if not isinstance(msg, dict) or msg.get("role") not in ROLES:
        raise _invalid(f"{where} must be an object with a role in {sorted(ROLES)}", where)
    role = {"developer": "system", "function": "tool"}.get(msg["role"], msg["role"])
    out: dict[str, Any] = {"role": role, "content": message_text(msg.get("content"), where)}
    if role == "assistant" and msg.get("tool_calls"):
        if not isinstance(msg["tool_calls"], list):
            raise _invalid(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
        out["tool_calls"] = msg["tool_calls"]
    for key in ("tool_call_id", "name"):
        if isinstance(msg.get(key), str):
            out[key] = msg[key]
    return out


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request. `sampling` holds only fields the worker understands."""

    messages: tuple[dict[str, Any], ...]
    stream: bool
    include_usage: bool
    sampling: dict[str, Any]
    tools: tuple[dict[str, Any], ...] = ()
    model: str | None = None


def _parse_stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(x, str) and x for x in stop)):
        raise _invalid(f"'stop' must be a string or a list of up to {MAX_STOP} non-empty strings",
                       "stop")
    return stop


def _parse_sampling(body: dict) -> dict[str, Any]:
    fields = {
        "temperature": _check_number(body, "temperature", 0.0, 2.0),
        "top_p": _check_number(body, "top_p", 0.0, 1.0),
        "max_tokens": (_check_number(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT, True)
                       or _check_number(body, "max_tokens", 1, MAX_TOKENS_LIMIT, True)),
        "seed": _check_number(body, "seed", *SEED_RANGE, integer=True),
        "presence_penalty": _check_number(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _check_number(body, "frequency_penalty", -2.0, 2.0),
        "stop": _parse_stop(body),
    }
    return {k: v for k, v in fields.items() if v is not None}


def _parse_tools(body: dict) -> tuple[dict[str, Any], ...]:
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise _invalid("'tools' must be a list of {type: 'function', function: {name, ...}}",
                       "tools")
    return tuple(tools)


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a /v1/chat/completions body. Raises HTTPError 400 naming the bad field."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise _invalid(f"'messages' must be a non-empty list of at most {MAX_MESSAGES} messages",
                       "messages")
    if body.get("n", 1) != 1:
        raise _invalid("only n=1 is supported", "n", code="unsupported_value")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("'stream_options' must be an object", "stream_options")
    model = body.get("model")
    return ChatRequest(
        messages=tuple(normalize_message(m, i) for i, m in enumerate(messages)),
        stream=_check_bool(body, "stream"),
        include_usage=_check_bool(options or {}, "include_usage"),
        sampling=_parse_sampling(body), tools=_parse_tools(body),
        model=model if isinstance(model, str) else None)


class PromptRenderer:
    """Renders messages with the model's own chat template (jinja2, sandboxed, the way
    llama-cpp-python does), so the prompt can be counted by the worker's tokenizer before a
    generation starts. Without a template or jinja2 it joins the contents: a lower bound."""

    def __init__(self, template: str | None, bos: str = "", eos: str = "") -> None:
        self.bos, self.eos = bos, eos
        self._template = self._compile(template) if template else None

    @staticmethod
    def _compile(template: str) -> Any:
        try:
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            log.warning("jinja2 is not importable: prompt lengths are counted without the template")
            return None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent)
        try:
            return env.from_string(template)
        except jinja2.TemplateError as exc:
            log.warning("the model's chat template does not compile (%s); counting without it", exc)
            return None

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] = ()) -> str:
        """The prompt text the worker will see (or the joined contents as a fallback)."""
        if self._template is not None:
            try:
                return self._template.render(
                    messages=list(messages), tools=list(tools) or None, add_generation_prompt=True,
                    bos_token=self.bos, eos_token=self.eos, raise_exception=_template_raise,
                    strftime_now=lambda fmt: time.strftime(fmt))
            except Exception as exc:       # a template is third-party code: any failure falls back
                log.debug("chat template failed (%s); counting the joined contents", exc)
        return "\n".join(m["content"] for m in messages)


def _template_raise(message: str) -> None:
    raise ValueError(message)


@dataclass
class Generation:
    """What one request produced; filled in as tokens arrive."""

    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    worker: str = ""
    attempts: int = 0
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class ChatService:
    """Turns a ChatRequest into worker calls and OpenAI-shaped replies."""

    def __init__(self, pool: WorkerPool, renderer: PromptRenderer, model_id: str, n_ctx: int,
                 cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.renderer = renderer
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.cfg = cfg
        self.clock = clock

    async def _count_prompt(self, worker: Any, req: ChatRequest) -> int:
        """Prompt tokens by the worker's tokenizer; 400 context_length_exceeded if too long."""
        count = await worker.count_tokens(self.renderer.render(req.messages, req.tools))
        if count >= self.n_ctx:
            raise HTTPError(400, f"This model's maximum context length is {self.n_ctx} tokens. "
                            f"However, your messages resulted in {count} tokens. Please reduce "
                            "the length of the messages.", code="context_length_exceeded",
                            param="messages")
        return count

    def _worker_body(self, req: ChatRequest) -> dict[str, Any]:
        body = {"messages": list(req.messages), **req.sampling}
        if req.tools:
            body["tools"] = list(req.tools)
        return body

    async def generate(self, req: ChatRequest, gen: Generation, live: bool) -> AsyncIterator[str]:
        """Yield "" once the request is accepted (worker leased, prompt counted), then each text
        delta. A worker failure is retried on another worker unless `live` deltas already went
        to the client. Raises HTTPError before acceptance; WorkerError when retries run out."""
        accepted = False
        while True:
            gen.attempts += 1
            try:
                async with self.pool.lease() as worker:
                    gen.worker = worker.name
                    if not accepted:
                        gen.prompt_tokens = await self._count_prompt(worker, req)
                        accepted = True
                        yield ""
                    async for delta in self._stream_from(worker, req, gen):
                        yield delta
                    gen.completion_tokens = await self._count_completion(worker, gen.text)
                    return
            except WorkerError as exc:
                if exc.status is not None and 400 <= exc.status < 500:
                    raise HTTPError(400, f"the worker refused the request: {exc}",
                                    code="invalid_request") from exc
                if (live and gen.text) or gen.attempts > self.cfg.max_retries:
                    raise
                gen.text, gen.first_token_at = "", None
                log.warning("%s; retrying on another worker (attempt %d)", exc, gen.attempts + 1)

    async def _stream_from(self, worker: Any, req: ChatRequest, gen: Generation
                           ) -> AsyncIterator[str]:
        async for chunk in worker.stream_chat(self._worker_body(req), self.cfg.request_timeout):
            choice = (chunk.get("choices") or [{}])[0]
            text = choice.get("delta", {}).get("content")
            if text:
                if gen.first_token_at is None:
                    gen.first_token_at = time.monotonic()
                gen.text += text
                yield text
            if choice.get("finish_reason") in FINISH_REASONS:
                gen.finish_reason = choice["finish_reason"]

    async def _count_completion(self, worker: Any, text: str) -> int:
        if not text:
            return 0
        return max(0, await worker.count_tokens(text) - await worker.count_tokens(""))

    def reply_model(self, req: ChatRequest) -> str:
        return req.model if req.model in (SWARM_MODEL_ID, self.model_id) else self.model_id

    async def complete(self, req: ChatRequest) -> tuple[dict[str, Any], Generation]:
        """A whole (non-streamed) chat.completion object."""
        gen = Generation()
        async for _ in self.generate(req, gen, live=False):
            pass
        reply = {"id": new_completion_id(), "object": "chat.completion", "created": int(self.clock()),
                 "model": self.reply_model(req),
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                              "logprobs": None, "finish_reason": gen.finish_reason}],
                 "usage": gen.usage()}
        return reply, gen

    async def open_stream(self, req: ChatRequest, gen: Generation) -> AsyncIterator[bytes]:
        """Accept the request (raising HTTPError if it cannot be served), then return the SSE
        byte stream of chat.completion.chunk events."""
        deltas = self.generate(req, gen, live=True)
        try:
            await deltas.__anext__()              # leased and counted, or raised
        except BaseException:
            await deltas.aclose()
            raise
        return self._sse(req, gen, deltas)

    async def _sse(self, req: ChatRequest, gen: Generation, deltas: AsyncIterator[str]
                   ) -> AsyncIterator[bytes]:
        frame = ChunkFrame(new_completion_id(), int(self.clock()), self.reply_model(req),
                           req.include_usage)
        try:
            yield frame.role()
            async for text in deltas:
                yield frame.content(text)
            yield frame.finish(gen.finish_reason)
            if req.include_usage:
                yield frame.usage(gen.usage())
        except WorkerError as exc:
            log.error("stream broken after output began: %s", exc)
            yield sse_json(HTTPError(502, f"the worker failed mid-stream: {exc}", "server_error",
                                     code="worker_failed").body())
        finally:
            await deltas.aclose()
        yield SSE_DONE


def new_completion_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


class ChunkFrame:
    """Pre-serialised pieces of chat.completion.chunk events: each token costs one json.dumps
    of its text and a few byte joins (the per-token path must stay cheap)."""

    def __init__(self, cid: str, created: int, model: str, include_usage: bool) -> None:
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        self.head = json.dumps(head, separators=(",", ":"))[:-1]
        self.usage_field = ',"usage":null' if include_usage else ""
        self.content_pre = (b"data: " + self.head.encode()
                            + b',"choices":[{"index":0,"delta":{"content":')
        self.content_post = (b'},"logprobs":null,"finish_reason":null}]'
                             + self.usage_field.encode() + b"}\n\n")

    def _event(self, choices: list, extra: str = "") -> bytes:
        body = self.head + ',"choices":' + json.dumps(choices, separators=(",", ":"))
        return ("data: " + body + (extra or self.usage_field) + "}\n\n").encode()

    def role(self) -> bytes:
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def content(self, text: str) -> bytes:
        return self.content_pre + json.dumps(text).encode() + self.content_post

    def finish(self, reason: str) -> bytes:
        return self._event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def usage(self, usage: dict[str, int]) -> bytes:
        return self._event([], ',"usage":' + json.dumps(usage, separators=(",", ":")))



# =====================================================================================================
# Server wiring
# =====================================================================================================
# SwarmApp routes requests to the chat service and the status views; Swarm builds and owns every
# service (HTTP server, worker pool, HTTP client) for one run, and stops them in reverse order.

PUBLIC_PATHS = {"/health", "/v1/health"}        # answered without the API key
SHUTDOWN_DEADLINE = 5.0                         # every worker gone within this after a signal


def check_api_key(request: Request, api_key: str | None) -> None:
    """Raise 401 unless the request carries the key (Bearer or X-Api-Key); constant-time."""
    if not api_key or request.path in PUBLIC_PATHS:
        return
    auth = request.header("authorization") or ""
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else (request.header("x-api-key") or "")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise HTTPError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                        "authentication_error", code="invalid_api_key")


class SwarmApp:
    """The API: one handler for the HTTP server, routing by method and path."""

    def __init__(self, cfg: Config, pool: WorkerPool, chat: ChatService, model_id: str) -> None:
        self.cfg = cfg
        self.pool = pool
        self.chat = chat
        self.model_id = model_id
        self.started = time.time()
        self.routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("GET", "/v1/models"): self.models,
            ("GET", "/health"): self.health,
            ("GET", "/v1/health"): self.health,
            ("POST", "/v1/chat/completions"): self.chat_completions,
        }

    async def handle(self, request: Request) -> Response:
        started = time.monotonic()
        response = await self._dispatch(request)
        if log.isEnabledFor(logging.DEBUG) and response.stream is None:
            log.debug("%s %s -> %d (%d bytes) in %.1f ms", request.method, request.path,
                      response.status, len(response.body), (time.monotonic() - started) * 1000)
        return response

    async def _dispatch(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        route = self.routes.get((method, request.path))
        if route is None:
            return self._no_route(request, method)
        check_api_key(request, self.cfg.api_key)
        return await route(request)

    def _no_route(self, request: Request, method: str) -> Response:
        if request.path.startswith("/v1/models/") and method == "GET":
            check_api_key(request, self.cfg.api_key)
            return self.model_entry(request.path[len("/v1/models/"):])
        allowed = sorted(m for m, path in self.routes if path == request.path)
        if allowed:
            raise HTTPError(405, f"{request.method} is not allowed on {request.path}",
                            code="method_not_allowed", headers=[("Allow", ", ".join(allowed))])
        raise HTTPError(404, f"no route {request.path}", code="not_found")

    def _model_object(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": int(self.started),
                "owned_by": "local-swarm"}

    async def models(self, request: Request) -> Response:
        return Response.json({"object": "list", "data": [
            self._model_object(SWARM_MODEL_ID), self._model_object(self.model_id)]})

    def model_entry(self, model_id: str) -> Response:
        if model_id not in (SWARM_MODEL_ID, self.model_id):
            raise HTTPError(404, f"The model '{model_id}' does not exist", code="model_not_found",
                            param="model")
        return Response.json(self._model_object(model_id))

    async def health(self, request: Request) -> Response:
        healthy, total = self.pool.healthy(), len(self.pool.slots)
        return Response.json({
            "status": self.pool.status(), "version": VERSION, "model": self.model_id,
            "workers": {"healthy": healthy, "total": total}, "healthy_workers": healthy,
            "total_workers": total, "queued": self.pool.waiting(),
            "uptime_s": round(time.time() - self.started, 1), "details": self.pool.describe()})

    async def chat_completions(self, request: Request) -> Response:
        req = parse_chat_request(request.json())
        try:
            if not req.stream:
                reply, gen = await self.chat.complete(req)
                self._log_generation(req, gen)
                return Response.json(reply)
            gen = Generation()
            stream = await self.chat.open_stream(req, gen)
        except WorkerError as exc:
            raise HTTPError(503, f"no worker could answer: {exc}", "server_error",
                            code="workers_unavailable", headers=[("Retry-After", "5")]) from exc
        return Response.sse(self._logged(stream, req, gen))

    async def _logged(self, stream: AsyncIterator[bytes], req: ChatRequest, gen: Generation
                      ) -> AsyncIterator[bytes]:
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()
            self._log_generation(req, gen)

    def _log_generation(self, req: ChatRequest, gen: Generation) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        now = time.monotonic()
        ttft = (gen.first_token_at - gen.started) * 1000 if gen.first_token_at else float("nan")
        log.debug("chat %s %d msgs -> %s: %d+%d tokens, ttft %.0f ms, total %.0f ms, %s, "
                  "attempts %d: %r", "stream" if req.stream else "whole", len(req.messages),
                  gen.finish_reason, gen.prompt_tokens, gen.completion_tokens, ttft,
                  (now - gen.started) * 1000, gen.worker, gen.attempts, gen.text[:80])


class Swarm:
    """One run of the daemon: HTTP client, workers, pool, chat service and HTTP server."""

    def __init__(self, cfg: Config, build: BuildInfo, model: ModelInfo, plan: Plan,
                 launcher: Launcher = launch_process) -> None:
        self.cfg = cfg
        self.build = build
        self.model = model
        self.plan = plan
        self.launcher = launcher
        self.client: Any = None
        self.pool: WorkerPool | None = None
        self.server: HttpServer | None = None

    @property
    def model_id(self) -> str:
        return self.model.path.stem

    def _worker_specs(self) -> list[WorkerSpec]:
        log_dir = self.cfg.cache_dir / "logs"
        return [WorkerSpec(index=i, model=self.model.path, model_id=self.model_id,
                           n_ctx=self.plan.ctx, threads=self.plan.threads,
                           threads_batch=self.plan.threads_batch, gpu_layers=self.plan.gpu_layers,
                           env=site_env(self.build), log_dir=log_dir)
                for i in range(1, self.plan.instances + 1)]

    async def start(self) -> None:
        """Listen at once (health says "initializing"), then start the workers."""
        import httpx
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None,
                                                            max_keepalive_connections=64))
        workers = [LlamaCppPythonWorker(spec, self.client, self.launcher)
                   for spec in self._worker_specs()]
        self.pool = WorkerPool(workers, self.cfg.queue_size, self.cfg.worker_start_timeout)
        renderer = PromptRenderer(self.model.chat_template, self.model.bos_token,
                                  self.model.eos_token)
        chat = ChatService(self.pool, renderer, self.model_id, self.plan.ctx, self.cfg)
        app = SwarmApp(self.cfg, self.pool, chat, self.model_id)
        self.server = HttpServer(app.handle, self.cfg.http, self.cfg.host, self.cfg.port,
                                 self.cfg.cors_origins)
        await self.server.start()
        await self.pool.start()

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        return f"http://{host}:{self.server.port if self.server else self.cfg.port}"

    async def stop(self) -> None:
        """Close the listener and connections, then stop every worker; bounded by
        SHUTDOWN_DEADLINE (worker stop escalates to SIGKILL inside it)."""
        if self.server:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.stop(), 1.0)
        if self.pool:
            await self.pool.stop()
        if self.client:
            await self.client.aclose()


def banner(swarm: Swarm) -> str:
    """The one block printed when the swarm is ready: where it is and how to use it."""
    p = swarm.plan
    return "\n".join([
        f"local-swarm {VERSION} ready on {swarm.url}/v1",
        f"  model    {swarm.model_id} ({swarm.model.path})",
        f"  workers  {p.instances} x {p.threads} threads, context {p.ctx} tokens",
        f"  try      curl {swarm.url}/v1/chat/completions -H 'Content-Type: application/json' "
        "-d '{\"model\":\"local-swarm\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}'",
        "  editors  base URL " + swarm.url + "/v1, model local-swarm, any API key"
        + (" (the one you set)" if swarm.cfg.api_key else ""),
    ])


async def serve(swarm: Swarm) -> int:
    """Run until SIGINT/SIGTERM. Returns the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await swarm.start()
        waiter = asyncio.create_task(swarm.pool.wait_any_ready(swarm.cfg.worker_start_timeout * 2))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            waiter.result()                        # raises WorkerError if none started
            print(banner(swarm), flush=True)
            await stop.wait()
        waiter.cancel()
        stopper.cancel()
        log.info("shutting down")
        return 0
    finally:
        await swarm.stop()



# =====================================================================================================
# CLI
# =====================================================================================================
# Flags override the plan; LOCAL_SWARM_API_KEY stands in for --api-key so the key stays out of `ps`.

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="local_swarm.py", description="One OpenAI-compatible endpoint backed by a swarm of "
        "local llama.cpp workers. With no flags: build llama.cpp for this machine (once), find or "
        "fetch a model, start the workers the hardware allows, serve on 127.0.0.1:8000.")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "doctor"],
                        help="serve (default) runs the swarm; doctor prints the hardware, the "
                        "build key and the plan, and starts nothing")
    parser.add_argument("--model", help="a .gguf path, or a known id to fetch (qwen2.5-coder-0.5b, "
                        "smollm2-135m, qwen2.5-coder-1.5b); default: the first model found "
                        "locally, else qwen2.5-coder-0.5b")
    parser.add_argument("--instances", type=int, help="number of workers (default: from RAM, "
                        "cores and the model size)")
    parser.add_argument("--ctx", type=int, help="context size of each worker in tokens (default: "
                        "from memory and the model's trained context)")
    parser.add_argument("--threads", type=int, help="threads per worker (default: physical cores "
                        "divided among the workers)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                        "127.0.0.1: this machine only; 0.0.0.0 exposes it to the network, set "
                        "--api-key then)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; "
                        "0 picks a free one and prints it)")
    parser.add_argument("--api-key", default=os.environ.get("LOCAL_SWARM_API_KEY"),
                        help="require this key (Bearer or X-Api-Key) on every route but /health; "
                        "also read from LOCAL_SWARM_API_KEY")
    parser.add_argument("--queue-size", type=int, default=64, help="requests that may wait for "
                        "a busy worker before new ones get 429 (default 64)")
    parser.add_argument("--cors-origin", action="append", dest="cors_origins",
                        help="an allowed browser Origin (repeatable; '*' allows all; default "
                        "http://localhost and http://127.0.0.1 on any port)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="debug shows each request and reply in brief, with timings")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """A Config from parsed flags; raises SystemExit(2) on values out of range."""
    for name in ("instances", "ctx", "threads", "queue_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    extra = {"cors_origins": tuple(args.cors_origins)} if args.cors_origins else {}
    return Config(host=args.host, port=args.port, api_key=args.api_key or None, model=args.model,
                  instances=args.instances, ctx=args.ctx, threads=args.threads,
                  log_level=args.log_level, queue_size=args.queue_size, **extra)


def doctor(cfg: Config) -> int:
    """Print hardware, build key and plan; start nothing, download nothing."""
    hw = detect_hardware()
    path = local_model(cfg.model, cfg.cache_dir)
    model = model_info(path) if path else None
    print(doctor_report(hw, cfg.builds_dir, plan(hw, model, cfg.instances, cfg.ctx, cfg.threads),
                        model))
    return 0


def run(cfg: Config) -> int:
    """Build (once), resolve the model, plan, and serve until a signal."""
    hw = detect_hardware()
    build = ensure_build(cfg.builds_dir, hw, progress=print_progress)
    add_site_to_path(build)
    model = model_info(resolve_model(cfg.model, cfg.cache_dir, progress=print_progress))
    the_plan = plan(hw, model, cfg.instances, cfg.ctx, cfg.threads)
    for reason in the_plan.reasons:
        log.info("plan: %s", reason)
    return asyncio.run(serve(Swarm(cfg, build, model, the_plan)))


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    logging.basicConfig(level=cfg.log_level.upper(), format=LOG_FORMAT)
    try:
        return doctor(cfg) if args.command == "doctor" else run(cfg)
    except (BuildError, ModelError, WorkerError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
