"""The command line: --help, doctor, and flags turned into a Config."""
from __future__ import annotations

import subprocess
import sys

import pytest

import local_swarm as ls
from conftest import ROOT


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "local_swarm.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


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
