"""The README's first command, `python local_swarm.py`, on Pythons that are not the test runner's:
one whose site-packages hold older, conflicting versions of the daemon's dependencies, and the
next minor versions of Python. The daemon must run on its build's packages alone (see isolate in
local_swarm.py), give its workers an environment made for them, and fail fast on a broken build.

Settings reach the daemon as LOCAL_SWARM_* variables (a layer users have too), so the command
itself stays exactly as the README writes it. Real builds, real workers, SmolLM2-135M."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import FIRST_START_TIMEOUT, NO_SETTINGS, ROOT, spawn_swarm

import local_swarm as ls

pytestmark = pytest.mark.e2e  # every test starts a real daemon on a real build

# What a laptop's Python may hold, installed with --no-deps exactly as listed. "reported": the
# machine of the report (typing_extensions 4.12 lacks the `sentinel` that the build's anyio
# imports; no httpx, no anyio), where the daemon mixed the two sets and blamed the workers after
# its start timeout. "older": older versions of everything the daemon uses, conflicting with each
# other too (httpcore 0.17 wants h11 >= 0.13), as real leftovers do.
CLUTTER = {
    "reported": ("typing_extensions==4.12.2", "pydantic==1.10.21", "Jinja2==3.1.2", "MarkupSafe"),
    "older": ("typing_extensions==4.12.2", "anyio==3.7.1", "httpx==0.24.1", "httpcore==0.17.3",
              "h11==0.12.0", "pydantic==1.10.21", "psutil==5.9.4", "sniffio", "idna", "certifi"),
}
SWARM_SETTINGS = {"LOCAL_SWARM_MODEL": "smollm2-135m", "LOCAL_SWARM_INSTANCES": "1",
                  "LOCAL_SWARM_THREADS": "1", "LOCAL_SWARM_CTX": "2048", "LOCAL_SWARM_PORT": "0"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def user_env(python_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: this one, with `python` from python_dir first on PATH,
    no settings file, and the swarm's settings as variables."""
    env = {**os.environ, **NO_SETTINGS, **SWARM_SETTINGS, **extra}
    if python_dir is not None:
        env["PATH"] = f"{python_dir}{os.pathsep}{env.get('PATH', '')}"
    env.pop("VIRTUAL_ENV", None)
    return env


def first_command(python: str, env: dict[str, str], what: str, timeout: float = FIRST_START_TIMEOUT):
    """`python local_swarm.py` in the repository, as the README says; waits for the banner."""
    return spawn_swarm([python, "local_swarm.py"], cwd=ROOT, env=env, timeout=timeout, what=what)


def chat(url: str) -> dict:
    reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": "local-swarm", "max_tokens": 8,
        "messages": [{"role": "user", "content": "Say hello."}]})
    assert reply.status_code == 200, reply.text
    return reply.json()


def listening(pid: int) -> set[tuple[str, int]]:
    proc = psutil.Process(pid)
    conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


@pytest.fixture(scope="module", params=sorted(CLUTTER))
def cluttered_python(request, tmp_path_factory) -> Path:
    """A venv of this Python whose site-packages hold one of CLUTTER; returns its bin folder."""
    venv = tmp_path_factory.mktemp(f"cluttered-{request.param}") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--only-binary=:all:", "--disable-pip-version-check", *CLUTTER[request.param]],
                   check=True, timeout=600)
    return bin_dir


@pytest.fixture
def shadows(tmp_path) -> dict[str, str]:
    """PYTHONPATH and a user site that hold a typing_extensions which breaks any importer."""
    bad = tmp_path / "pythonpath"
    bad.mkdir()
    (bad / "typing_extensions.py").write_text("raise ImportError('a PYTHONPATH copy was used')\n")
    user_base = tmp_path / "userbase"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    user_site = user_base / "lib" / version / "site-packages"
    user_site.mkdir(parents=True)
    (user_site / "typing_extensions.py").write_text("raise ImportError('the user site was used')\n")
    return {"PYTHONPATH": str(bad), "PYTHONUSERBASE": str(user_base)}


def test_first_command_on_a_python_with_conflicting_packages(cluttered_python, shadows):
    """The swarm answers a chat on a Python whose site-packages, PYTHONPATH and user site hold
    other versions of what the daemon uses (today's main died on `cannot import name 'sentinel'`
    inside its first worker probe, then blamed the workers after the start timeout)."""
    env = user_env(cluttered_python, **shadows)
    assert "4.12.2" in subprocess.run(
        ["python", "-c", "import importlib.metadata as m; print(m.version('typing_extensions'))"],
        env={**env, "PYTHONPATH": ""}, capture_output=True, text=True).stdout
    swarm = first_command("python", env, "the first command on a cluttered Python")
    try:
        answer = chat(swarm.url)
        assert answer["choices"][0]["message"]["content"].strip()
        assert httpx.get(swarm.url + "/health", timeout=10).status_code == 200
    finally:
        assert swarm.stop() == 0


def test_port_host_and_server_settings_in_the_environment_do_not_reach_the_workers():
    """llama-cpp-python's server reads PORT, HOST, CONFIG_FILE, MODEL, API_KEY... from the
    environment: a shell that sets them must not move the workers or open them to the network."""
    stray, wanted = free_port(), free_port()
    env = {**os.environ, **NO_SETTINGS, "PORT": str(stray), "HOST": "0.0.0.0",
           "CONFIG_FILE": "/nonexistent/config.json", "MODEL": "/nonexistent/model.gguf",
           "API_KEY": "not-the-swarms", "N_CTX": "64"}
    cmd = [sys.executable, "local_swarm.py", "--port", str(wanted), "--model", "smollm2-135m",
           "--instances", "2", "--threads", "1", "--ctx", "2048"]
    swarm = spawn_swarm(cmd, cwd=ROOT, env=env, timeout=FIRST_START_TIMEOUT)
    try:
        assert swarm.url == f"http://127.0.0.1:{wanted}"
        chat(swarm.url)
        workers = [d for d in swarm.health()["details"]]
        assert len(workers) == 2 and all(w["state"] in ("idle", "busy") for w in workers)
        for worker in workers:
            assert listening(worker["pid"]) == {("127.0.0.1", worker["port"])}
            assert worker["port"] != stray
    finally:
        assert swarm.stop() == 0


def test_a_broken_build_stops_the_start_in_seconds_with_its_cause(tmp_path):
    """A build whose site folder holds a broken httpx (every entry but httpx linked to the real
    build): the start ends within seconds, in one line that names the module and the fix."""
    hw = ls.detect_hardware()
    real = ls.ensure_build(ls.DEFAULT_BUILDS_DIR, hw)
    copy = ls.build_info(tmp_path / "builds", hw)
    copy.site.mkdir(parents=True)
    shutil.copy(real.dir / ls.BUILD_RECORD, copy.dir / ls.BUILD_RECORD)
    for entry in real.site.iterdir():
        if entry.name != "httpx":
            (copy.site / entry.name).symlink_to(entry)
    (copy.site / "httpx").mkdir()
    (copy.site / "httpx" / "__init__.py").write_text("from ._nowhere import Client\n")
    native = ls.ensure_native(real, hw, ls.DEFAULT_BUILDS_DIR)       # llama-server is fine
    (copy.dir / ls.NATIVE_DIR).symlink_to(native.dir)
    env = user_env(LOCAL_SWARM_BUILDS_DIR=str(tmp_path / "builds"))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "local_swarm.py"], cwd=ROOT, env=env, timeout=120,
                          capture_output=True, text=True)
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    assert "importing httpx failed with ModuleNotFoundError" in errors[0]
    assert f"delete {copy.dir} and start again" in errors[0]
    assert took < 60, f"the broken start took {took:.0f} s"


def other_python(version: str) -> str | None:
    """An interpreter of that minor version: on PATH, else pyenv's."""
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    found = [shutil.which(f"python{version}"),
             *sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"))]
    for python in filter(None, found):
        probe = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(map(int, version.split("."))
                                                                      )):
            return python
    return None


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_first_command_on_the_next_pythons(version):
    """Its own build for that Python (the compiled llama.cpp is reused when one exists), then a
    chat answered."""
    python = other_python(version)
    if python is None:
        warnings.warn(f"NOT TESTED: no Python {version} on this machine (PATH or pyenv)")
        pytest.skip(f"no Python {version} here: the first command is untested on it")
    swarm = first_command(python, user_env(), f"the first command on Python {version}")
    try:
        assert chat(swarm.url)["choices"][0]["message"]["content"] is not None
    finally:
        assert swarm.stop() == 0
    build = ls.build_info(ls.DEFAULT_BUILDS_DIR, ls.detect_hardware())
    key = build.key.replace(f"cp{sys.version_info.major}{sys.version_info.minor}",
                            "cp" + version.replace(".", ""))
    record = json.loads((ls.DEFAULT_BUILDS_DIR / key / ls.BUILD_RECORD).read_text())
    assert record["python_tag"] == "cp" + version.replace(".", "")
