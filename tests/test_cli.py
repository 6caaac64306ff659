"""The command line: --help, doctor, and flags turned into a Config."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import local_swarm as ls
from conftest import FIRST_START_TIMEOUT, NO_SETTINGS, READY_LINE, ROOT, spawn_swarm


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "local_swarm.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **NO_SETTINGS}, stdin=subprocess.DEVNULL)


def test_help_explains_every_flag():
    out = run_cli("--help").stdout
    for flag in ("--model", "--instances", "--port", "--host", "--ctx", "--threads", "--api-key",
                 "--log-level", "doctor"):
        assert flag in out


def test_doctor_prints_hardware_key_and_plan_and_starts_nothing(tmp_path):
    model = tmp_path / "models"
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    hw = ls.detect_hardware()
    assert ls.build_key(hw) in result.stdout
    assert "Cores:" in result.stdout and "RAM:" in result.stdout
    assert not model.exists()


def test_doctor_with_a_model_shows_the_plan(smol_model_path):
    result = run_cli("doctor", "--model", str(smol_model_path), "--instances", "3")
    assert result.returncode == 0, result.stderr
    assert "Plan:      1 llama-server x 3 slots" in result.stdout
    result = run_cli("doctor", "--model", str(smol_model_path), "--instances", "3",
                     "--worker", "python")
    assert "Plan:      3 workers" in result.stdout


def test_bad_model_path_is_one_clear_error(tmp_path):
    result = run_cli("doctor", "--model", str(tmp_path / "nope.gguf"))
    assert result.returncode == 1
    assert "model file not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["--instances", "0"], ["--ctx", "-5"], ["--port", "x"],
                                  ["--log-level", "loud"], ["serve", "extra"]])
def test_bad_flags_exit_2_without_traceback(argv):
    result = run_cli(*argv)
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_flags_become_config():
    args = ls.build_parser().parse_args(["--instances", "3", "--ctx", "4096", "--threads", "2",
                                         "--host", "0.0.0.0", "--port", "9000", "--api-key", "k",
                                         "--cors-origin", "*"])
    cfg = ls.config_from_args(args)
    assert (cfg.instances, cfg.ctx, cfg.threads, cfg.host, cfg.port, cfg.api_key) == \
        (3, 4096, 2, "0.0.0.0", 9000, "k")
    assert cfg.cors_origins == ("*",)
    default = ls.config_from_args(ls.build_parser().parse_args([]))
    assert default.host == "127.0.0.1" and default.api_key is None


def test_the_parser_has_each_settings_flag_as_its_row_says():
    parser = ls.build_parser()
    actions = {action.dest: action for action in parser._actions}
    groups = {action.dest: group.title for group in parser._action_groups
              for action in group._group_actions}
    for setting in ls.SETTINGS:
        action = actions[setting.name]
        assert action.option_strings == [setting.option] and action.help == setting.help
        assert action.default is None                     # left out: the layers below speak
        assert groups[setting.name] == (setting.group or "options")
        if setting.kind is bool:
            assert action.nargs == 0 and action.const is not setting.option.startswith("--no-")
        else:
            assert action.metavar == setting.metavar and action.type in (setting.kind, None)
            assert tuple(action.choices or ()) == setting.choices
            assert isinstance(action, argparse._AppendAction) == (setting.kind is tuple)
    non_settings = {a.dest for a in parser._actions} - set(ls.SETTINGS_BY_NAME)
    assert non_settings == {"help", "command", "dir", "config", "yes"}


def test_help_lists_every_setting_with_its_value_and_the_variables():
    out = "".join(ls.build_parser().format_help().split())    # argparse wraps lines (and words
    for setting in ls.SETTINGS:                                   # at hyphens)
        shown = setting.metavar or ("{" + ",".join(setting.choices) + "}" if setting.choices
                                    else setting.name.upper())
        assert (setting.option if setting.kind is bool else setting.option + shown) in out
        assert "".join(setting.help.split()) in out
    assert "LOCAL_SWARM_<NAME>" in out and "Flagswinovervariables,variablesoverthefile" in out


# ---- progress lines and the banner ---------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (42.4, "42 s"), (59.6, "1 min 00 s"),
                                           (245, "4 min 05 s"), (3725, "1 h 02 min"), (-3, "0 s")])
def test_durations_read_as_a_person_would_say_them(seconds, text):
    assert ls.format_duration(seconds) == text


def test_build_and_worker_progress_lines():
    assert ls.build_progress_line("compiling llama.cpp", 130, "[62/193]") == \
        "  compiling llama.cpp: 2 min 10 s, step [62/193]"
    assert ls.build_progress_line("installing", 20) == "  installing: 20 s"
    assert ls.worker_ready_line(2, 5, 12.34) == "worker 2/5 ready in 12.3 s"


def test_download_line_has_bytes_share_speed_and_eta():
    now = [0.0]
    meter = ls._Meter("qwen part 1/6", 600_000_000, lambda line: None, clock=lambda: now[0])
    meter.add(3_000_000)
    now[0] = 2.0
    assert meter.line(2.0) == "  qwen part 1/6: 3.0/600.0 MB (0%), 1.5 MB/s, ETA 6 min 38 s"
    unknown = ls._Meter("x", 0, lambda line: None, clock=lambda: 1.0)
    assert unknown.line(1.0).startswith("  x: 0.0 MB, ")


SMOL_PLAN = ls.Plan(instances=5, threads=1, threads_batch=1, ctx=8192, kv_bytes_per_worker=0,
                    weights_bytes=0, memory_budget=0, gpu_layers=0, reasons=())


def banner_for(cfg: ls.Config, ready: int = 5) -> str:
    return ls.banner_text(cfg, "http://127.0.0.1:8123", ls.client_url(cfg.host, 8123), "qwen",
                          Path("/m/qwen.gguf"), SMOL_PLAN, ready)


def test_banner_says_where_what_how_it_votes_and_how_to_connect_an_editor():
    text = banner_for(ls.Config(api_key="s3cret-key"))
    lines = text.splitlines()
    assert READY_LINE.search(lines[0]).group(1) == "http://127.0.0.1:8123"
    assert "  model     qwen (/m/qwen.gguf)" in lines
    assert "  workers   5/5 ready (5 workers x 1 thread), context 8192 tokens" in lines
    assert any(line.startswith("  votes     k=5 candidates per request, mode vote (adaptive")
               for line in lines)
    assert ('  connect   base URL http://127.0.0.1:8123/v1, model "local-swarm", API key the one '
            "you set (--api-key or LOCAL_SWARM_API_KEY)") in lines
    opencode = json.loads(next(l for l in lines if "opencode" in l).split(": ", 1)[1])
    assert opencode["provider"]["local-swarm"]["options"]["baseURL"] == "http://127.0.0.1:8123/v1"
    assert opencode["model"] == "local-swarm/local-swarm"
    assert "apiBase: http://127.0.0.1:8123/v1" in text
    assert "s3cret-key" not in text                       # the key is never printed
    assert text.count("ready on") == 1


def test_banner_votes_line_follows_mode_votes_and_ready_workers():
    assert "k=3 candidates" in banner_for(ls.Config(votes=3))
    assert "k=2 candidates" in banner_for(ls.Config(), ready=2)     # capped by ready workers
    assert "all k every time" in banner_for(ls.Config(adaptive=False))
    assert "mode fastest: one worker streams" in banner_for(ls.Config(mode="fastest"))
    assert "k=1: one candidate per request, no vote" in banner_for(ls.Config(votes=1))
    assert "API key none needed" in banner_for(ls.Config())


def test_a_wildcard_listen_address_is_shown_as_one_to_connect_to():
    assert ls.client_url("0.0.0.0", 80) == "http://127.0.0.1:80/v1"
    assert ls.client_url("::", 80) == "http://[::1]:80/v1"
    assert ls.client_url("192.168.1.5", 80) == "http://192.168.1.5:80/v1"


def test_a_started_swarm_prints_a_line_per_ready_worker_then_one_banner(swarm):
    text = "".join(swarm.output)
    for n in (1, 2):
        assert re.search(rf"^worker {n}/2 ready in \d+\.\d s$", text, re.M), text
    assert text.count("ready on http://") == 1
    banner = text[text.index("ready on http://"):]
    plan = {"native": "1 llama-server x 2 slots, 1 thread", "python": "2 workers x 1 thread"}
    assert f"workers   2/2 ready ({plan[swarm.kind]}), context 2048 tokens" in banner
    assert re.search(r"votes     k=2 candidates per request, mode vote", banner)
    assert "worker 2/2 ready" in text[:text.index("ready on http://")]   # ready lines come first


# ---- pip install ----------------------------------------------------------------------------------


@pytest.mark.e2e  # a venv and a real pip install
def test_pip_install_gives_a_local_swarm_command(tmp_path, smol_model_path):
    """`pip install .` into a fresh virtual environment (no system packages): `local-swarm` is
    on its PATH, an installed copy keeps its builds in the cache, not in site-packages, and it
    serves (on the build's packages, not the venv's: see isolate)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "local_swarm.py", "README.md"):
        shutil.copy(ROOT / name, src / name)   # a copy: pip writes build/ and *.egg-info there
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    install = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", str(src)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_SWARM_")}
    env.update(HOME=str(tmp_path / "home"), LOCAL_SWARM_CACHE=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "xdg"), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    env.pop("PYTHONPATH", None)
    command = shutil.which("local-swarm", path=str(bin_dir))
    assert command, list(bin_dir.iterdir())

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([command, *argv], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
    helped = run("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: local-swarm")
    doctor = run("doctor")
    assert doctor.returncode == 0, doctor.stderr
    key = ls.build_key(ls.detect_hardware())
    assert f"Build:     {key} in {tmp_path / 'cache' / 'llama_builds' / key}" in doctor.stdout
    assert "site-packages" not in doctor.stdout
    swarm = spawn_swarm([command, "--builds-dir", str(ROOT / "llama_builds"), "--model",
                         str(smol_model_path), "--instances", "1", "--threads", "1", "--ctx",
                         "2048", "--port", "0"], cwd=tmp_path, env=env,
                        timeout=FIRST_START_TIMEOUT, what="the installed local-swarm")
    try:
        reply = httpx.post(swarm.url + "/v1/chat/completions", timeout=120, json={
            "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 200, reply.text
    finally:
        assert swarm.stop() == 0
