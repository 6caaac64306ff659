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
