"""First run: the settings layers (file < LOCAL_SWARM_* variables < flags), the settings file, and
the setup questions, in-process and through a real pseudo-terminal as a user meets them."""
from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path

import pytest

import local_swarm as ls
from conftest import READY_LINE, ROOT

SETUP_PROMPT_TIMEOUT = 90          # hardware probes and the model search come before the first question
DAEMON_START_TIMEOUT = 300


# ---- settings layers ----------------------------------------------------------------------------


def args(*argv: str):
    return ls.build_parser().parse_args(list(argv))


def test_flags_beat_variables_beat_the_file_beat_defaults():
    saved = {"port": 1111, "instances": 2, "mode": "fastest", "ctx": 4096}
    environ = {"LOCAL_SWARM_PORT": "2222", "LOCAL_SWARM_INSTANCES": "3",
               "LOCAL_SWARM_ADAPTIVE": "no", "LOCAL_SWARM_CORS_ORIGINS": "http://a, http://b"}
    cfg = ls.config_from_args(args("--port", "3333"), environ, saved)
    assert cfg.port == 3333                     # flag over variable over file
    assert cfg.instances == 3                   # variable over file
    assert cfg.mode == "fastest" and cfg.ctx == 4096   # file over default
    assert cfg.adaptive is False and cfg.cors_origins == ("http://a", "http://b")
    assert cfg.votes is None and cfg.host == "127.0.0.1"   # nothing set: Config's default
    assert ls.config_from_args(args(), {}, {}) == ls.Config()


def test_merge_settings_later_layers_win_and_keep_the_rest():
    merged = ls.merge_settings({"port": 1, "model": "m"}, {"port": 2}, {"instances": 4})
    assert merged == {"port": 2, "model": "m", "instances": 4}


def test_a_flag_left_out_lets_the_file_speak():
    # store_false flags default to None, so a saved "adaptive": false is not overwritten by True
    cfg = ls.config_from_args(args(), {}, {"adaptive": False, "affinity": False})
    assert cfg.adaptive is False and cfg.affinity is False
    assert ls.config_from_args(args("--no-adaptive"), {}, {}).adaptive is False


# ---- the settings table: each setting declared once ----------------------------------------------

NOT_SETTINGS = {"http", "worker_start_timeout", "request_timeout", "max_retries", "vote_deadline"}


def kinds(hint) -> set:
    """The types a Config annotation allows, None left out (tuple[str, ...] -> tuple)."""
    parts = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return {typing.get_origin(part) or part for part in parts} - {type(None)}


def test_every_setting_is_a_config_field_of_its_kind_and_the_rest_are_internal():
    hints = typing.get_type_hints(ls.Config)
    for setting in ls.SETTINGS:
        assert setting.kind in kinds(hints[setting.name]), setting.name
    assert set(hints) - set(ls.SETTINGS_BY_NAME) == NOT_SETTINGS
    assert len(ls.SETTINGS_BY_NAME) == len(ls.SETTINGS)           # no name twice


def test_every_setting_has_a_flag_a_variable_and_a_file_key():
    for setting in ls.SETTINGS:
        assert setting.env == "LOCAL_SWARM_" + setting.name.upper()
        assert setting.option.startswith("--") and setting.help
        assert setting.name in ls.SETTINGS_BY_NAME                # the file key
    options = [setting.option for setting in ls.SETTINGS]
    assert len(set(options)) == len(options)
    assert ls.SECRET_SETTINGS == ("api_key", "secret")
    assert ls.SETTINGS_BY_NAME["secret"].env == ls.SECRET_ENV      # what federation's messages say
    for name in ls.SECRET_SETTINGS:                                # each says to prefer its variable
        assert ls.SETTINGS_BY_NAME[name].env in ls.SETTINGS_BY_NAME[name].help
    assert f"up to {ls.DEFAULT_MAX_VOTES};" in ls.SETTINGS_BY_NAME["votes"].help


def layer_values(setting) -> tuple:
    """Three valid values for a setting, for the file, a variable and a flag, each differing
    from the one below it (the file's from Config's default)."""
    default = getattr(ls.Config(), setting.name)
    if setting.kind is bool:
        return (not default, default, not default)   # a flag only turns its default around
    if setting.choices:
        others = [c for c in setting.choices if c != default] + [default]
        return others[0], others[1], others[2 % len(others)]
    samples = {int: (2, 3, 4), float: (0.5, 1.0, 1.5), tuple: (("h1:1",), ("h2:2",), ("h3:3",)),
               Path: (Path("/a"), Path("/b"), Path("/c"))}
    if setting.name.endswith("_url"):
        return "http://a", "http://b", "http://c"
    return samples.get(setting.kind, ("a", "b", "c"))


def as_flag(setting, value) -> list[str]:
    if setting.kind is bool:
        return [setting.option]
    return [setting.option, value[0] if setting.kind is tuple else str(value)]


def as_variable(setting, value) -> str:
    if setting.kind is bool:
        return "true" if value else "false"
    return ",".join(value) if setting.kind is tuple else str(value)


def as_file_value(setting, value):
    if setting.kind is tuple:
        return list(value)
    return str(value) if setting.kind is Path else value


@pytest.mark.parametrize("setting", ls.SETTINGS, ids=lambda s: s.name)
def test_each_setting_from_each_layer_and_the_later_layer_wins(setting, tmp_path):
    saved, env, flag = layer_values(setting)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({setting.name: as_file_value(setting, saved)}))
    from_file = ls.read_settings_file(path)
    environ = {setting.env: as_variable(setting, env)}
    flags = args(*as_flag(setting, flag))

    def value(*layers):
        return getattr(ls.config_from_args(*layers), setting.name)
    assert value(args(), {}, {}) == getattr(ls.Config(), setting.name)   # nothing: the default
    assert value(args(), {}, from_file) == saved                         # the file over it
    assert value(args(), environ, from_file) == env                     # a variable over the file
    assert value(flags, environ, from_file) == flag                      # a flag over all


def test_the_cache_dir_is_also_read_from_its_old_variable(tmp_path):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    assert ls.settings_from_env({"LOCAL_SWARM_CACHE": old}) == {"cache_dir": Path(old)}
    assert ls.settings_from_env({"LOCAL_SWARM_CACHE": old, "LOCAL_SWARM_CACHE_DIR": new}) == \
        {"cache_dir": Path(new)}
    # the builds follow the cache unless set (for an installed copy: see default_builds_dir)
    assert ls.Config(cache_dir=tmp_path).builds_dir == ls.default_builds_dir(ls.HERE, tmp_path)
    assert ls.Config(cache_dir=tmp_path, builds_dir=Path("/b")).builds_dir == Path("/b")


def test_download_sites_must_be_web_addresses(tmp_path):
    with pytest.raises(ls.SettingsError, match="LOCAL_SWARM_HF_URL.*http:// or https://"):
        ls.settings_from_env({"LOCAL_SWARM_HF_URL": "huggingface.co"})
    path = tmp_path / "config.json"
    path.write_text('{"pypi_url": "ftp://mirror"}')
    with pytest.raises(ls.SettingsError, match='key "pypi_url": must be an http'):
        ls.read_settings_file(path)


def test_doctor_shows_where_each_setting_comes_from_and_hides_secrets(tmp_path):
    layers = ls.setting_layers(args("--port", "1", "--secret", "s3"),
                               {"LOCAL_SWARM_API_KEY": "k3y", "LOCAL_SWARM_BUILDS_DIR": "/c"},
                               {"model": "m"})
    assert layers.given == {"port", "secret", "api_key", "builds_dir"}
    assert layers.config() == ls.Config(port=1, secret="s3", api_key="k3y", builds_dir=Path("/c"),
                                        model="m")
    report = ls.settings_report(tmp_path / "config.json", layers)
    assert f"{tmp_path / 'config.json'}: model m" in report
    assert "from the environment: api_key (set), builds_dir /c" in report
    assert "from flags: port 1, secret (set)" in report
    assert "s3" not in report and "k3y" not in report


@pytest.mark.parametrize("text, fragments", [
    ('{"instances": 0}', ['key "instances"', "must be at least 1"]),
    ('{"instancs": 2}', ['key "instancs"', "unknown setting", "instances"]),
    ('{"port": "8000"}', ['key "port"', "must be a whole number"]),
    ('{"port": 70000}', ['key "port"', "between 0 and 65535"]),
    ('{"adaptive": 1}', ['key "adaptive"', "true or false"]),
    ('{"mode": "best"}', ['key "mode"', "vote, fastest"]),
    ('{"cors_origins": "http://a"}', ['key "cors_origins"', "a list of strings"]),
    ('{"vote_temperature": 3}', ['key "vote_temperature"', "between 0 and 2"]),
    ('{"model": ""}', ['key "model"', "must not be empty"]),
    ('{"port": 8000,}', ["not valid JSON"]),
    ('[8000]', ["must hold a JSON object"]),
])
def test_file_values_are_checked_like_flags_and_errors_name_file_and_key(tmp_path, text, fragments):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ls.SettingsError) as caught:
        ls.read_settings_file(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_file_values_convert_and_null_means_unset(tmp_path):
    path = tmp_path / "sub" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"vote_temperature": 1, "cors_origins": ["*"], "builds_dir": "b",
                                "instances": None, "adaptive": False}))
    values = ls.read_settings_file(path)
    assert values == {"vote_temperature": 1.0, "cors_origins": ("*",),
                      "builds_dir": path.parent / "b", "adaptive": False}
    assert ls.read_settings_file(tmp_path / "missing.json") == {}


@pytest.mark.parametrize("name, value, fragment", [
    ("LOCAL_SWARM_INSTANCES", "two", "must be a whole number"),
    ("LOCAL_SWARM_PORT", "70000", "between 0 and 65535"),
    ("LOCAL_SWARM_AFFINITY", "maybe", "must be one of 1, true"),
    ("LOCAL_SWARM_LOG_LEVEL", "loud", "must be one of debug"),
    ("LOCAL_SWARM_VOTE_TEMPERATURE", "hot", "must be a number"),
])
def test_bad_variables_are_errors_naming_the_variable(name, value, fragment):
    with pytest.raises(ls.SettingsError) as caught:
        ls.settings_from_env({name: value})
    assert name in str(caught.value) and fragment in str(caught.value)


def test_variables_convert_and_empty_ones_are_unset():
    values = ls.settings_from_env({"LOCAL_SWARM_MODEL": "smollm2-135m", "LOCAL_SWARM_CTX": " 2048 ",
                                   "LOCAL_SWARM_AFFINITY": "On", "LOCAL_SWARM_HOST": "",
                                   "LOCAL_SWARM_BUILDS_DIR": "/x/builds", "OTHER": "1"})
    assert values == {"model": "smollm2-135m", "ctx": 2048, "affinity": True,
                      "builds_dir": Path("/x/builds")}


def test_settings_path_flag_then_variable_then_xdg_then_home(tmp_path):
    home = tmp_path / "home"
    assert ls.settings_path("f.json", {"LOCAL_SWARM_CONFIG": "v.json"}, home) == Path("f.json")
    assert ls.settings_path(None, {"LOCAL_SWARM_CONFIG": "v.json", "XDG_CONFIG_HOME": "/x"},
                            home) == Path("v.json")
    assert ls.settings_path(None, {"XDG_CONFIG_HOME": "/x"}, home) == \
        Path("/x/local-swarm/config.json")
    assert ls.settings_path(None, {}, home) == home / ".config" / "local-swarm" / "config.json"


def test_save_settings_keeps_other_keys_and_is_private(tmp_path):
    path = tmp_path / "conf" / "config.json"
    ls.save_settings(path, {"api_key": "secret", "port": 1})
    saved = ls.save_settings(path, {"port": 2, "model": "smollm2-135m"})
    assert saved == {"api_key": "secret", "port": 2, "model": "smollm2-135m"}
    assert ls.read_settings_file(path) == saved
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]   # no staging file left


def test_builds_go_next_to_a_source_copy_and_to_the_cache_for_an_installed_one(tmp_path):
    assert ls.default_builds_dir(tmp_path / "src", tmp_path / "cache") == \
        tmp_path / "src" / "llama_builds"
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    assert ls.default_builds_dir(site, tmp_path / "cache") == tmp_path / "cache" / "llama_builds"


# ---- the questions, in-process ------------------------------------------------------------------


def scripted(answers: list):
    """A Prompter whose reads pop `answers` (an exception instance is raised instead), recording
    everything shown."""
    shown: list[str] = []

    def read(prompt: str) -> str:
        shown.append(prompt)
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer
    return ls.Prompter(read=read, write=shown.append), shown


def test_ask_takes_the_default_on_enter_and_asks_again_after_a_bad_answer():
    prompter, shown = scripted(["", "x", "0", "7"])
    assert prompter.ask("Workers", "3", ls._positive) == 3
    assert prompter.ask("Workers", "3", ls._positive) == 7
    assert shown.count("Workers [3]: ") == 4
    assert shown.count("  type a whole number, at least 1") == 2


def test_ask_gives_up_after_its_attempts():
    prompter = ls.Prompter(read=lambda prompt: "", write=lambda text: None, attempts=1)
    with pytest.raises(ls.SetupCancelled, match="no acceptable answer"):
        prompter.ask("Workers", "none", ls._positive)


@pytest.fixture()
def model_dir(tmp_path, smol_model_path) -> Path:
    """A ./models folder holding SmolLM2 (a symlink: a real GGUF header to plan with)."""
    models = tmp_path / "work" / "models"
    models.mkdir(parents=True)
    (models / smol_model_path.name).symlink_to(smol_model_path)
    return models


def test_run_setup_asks_model_workers_port(tmp_path, model_dir):
    cfg = ls.Config(cache_dir=tmp_path / "cache")
    hw = ls.detect_hardware()
    prompter, shown = scripted(["9", "", "", "70000", "0"])
    answers = ls.run_setup(prompter, cfg, hw, given=(), starting=False, search_dirs=[model_dir])
    local = str(model_dir / "SmolLM2-135M-Instruct.Q4_1.gguf")
    recommended = ls.native_plan(hw, ls.model_info(local)).instances     # the default kind
    assert recommended == ls.NATIVE_SLOTS
    assert answers == {"model": local, "instances": recommended, "port": 0}
    assert "  1) SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB, in " + str(model_dir) in shown
    assert any(line.startswith("  2) download qwen2.5-coder-0.5b") and "default" in line
               for line in shown)
    assert shown.count("Model [1]: ") == 2 and any("type a number from 1 to 4" in s for s in shown)
    assert f"Workers [{recommended}]: " in shown
    assert any("type a port number" in s for s in shown)


def test_the_workers_question_recommends_the_plan_of_the_python_kind(tmp_path, model_dir):
    cfg = ls.Config(cache_dir=tmp_path / "cache", worker="python")
    hw = ls.detect_hardware()
    prompter, shown = scripted(["1", "", "0"])
    answers = ls.run_setup(prompter, cfg, hw, given=(), starting=False, search_dirs=[model_dir])
    local = str(model_dir / "SmolLM2-135M-Instruct.Q4_1.gguf")
    recommended = ls.plan(hw, ls.model_info(local)).instances
    assert answers["instances"] == recommended and f"Workers [{recommended}]: " in shown
    assert any("each is one llama.cpp process" in line for line in shown)


def test_run_setup_skips_what_a_flag_gives_and_a_download_is_estimated(tmp_path):
    cfg = ls.Config(cache_dir=tmp_path / "cache", model="qwen2.5-coder-1.5b")
    prompter, shown = scripted(["2"])
    answers = ls.run_setup(prompter, cfg, ls.detect_hardware(), given={"model", "port"},
                           starting=False, search_dirs=[])
    assert answers == {"instances": 2}
    assert any("estimated: the model is not downloaded yet" in s for s in shown)


@pytest.mark.parametrize("interrupt, status", [(EOFError(), 1), (KeyboardInterrupt(), 130)])
def test_run_setup_end_of_input_or_ctrl_c_cancels(tmp_path, interrupt, status):
    prompter, _ = scripted([interrupt])
    with pytest.raises(ls.SetupCancelled) as caught:
        ls.run_setup(prompter, ls.Config(cache_dir=tmp_path), ls.detect_hardware(), given=(),
                     starting=False, search_dirs=[])
    assert caught.value.status == status and "nothing was saved" in str(caught.value)


def test_a_busy_port_is_refused_only_when_the_swarm_starts_next():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        notes: list[str] = []
        with pytest.raises(ValueError, match="in use"):
            ls._port_parser("127.0.0.1", True, notes.append)(str(port))
        assert ls._port_parser("127.0.0.1", False, notes.append)(str(port)) == port
        assert notes and "in use" in notes[0]


def test_default_model_choice_follows_what_a_start_would_serve(tmp_path):
    cache = tmp_path / "cache"
    fetched_smol = cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    own = tmp_path / "mine.gguf"
    choices = ls.model_choices([fetched_smol, own], cache)
    assert [c.value for c in choices] == ["smollm2-135m", str(own), "qwen2.5-coder-0.5b",
                                          "qwen2.5-coder-1.5b"]
    assert ls.default_model_choice(choices, cache, None) == 1     # smollm2 only when named
    assert ls.default_model_choice(choices, cache, "smollm2-135m") == 0   # the saved one
    only_smol = ls.model_choices([fetched_smol], cache)
    assert only_smol[ls.default_model_choice(only_smol, cache, None)].value == "qwen2.5-coder-0.5b"


@pytest.mark.parametrize("command, exists, given, terminal, yes, asks", [
    ("serve", False, set(), True, False, True),
    ("serve", True, set(), True, False, False),        # settings saved already
    ("serve", False, {"model"}, True, False, False),   # a model named by a flag or variable
    ("serve", False, {"port"}, True, False, True),     # other settings: still asked the rest
    ("serve", False, set(), False, False, False),      # not a terminal
    ("serve", False, set(), True, True, False),        # --yes
    ("doctor", False, set(), True, False, False),
])
def test_first_run_asks_only_in_a_terminal_without_settings(command, exists, given, terminal,
                                                            yes, asks):
    assert ls.first_run(command, exists, given, terminal, yes) is asks


def test_a_bad_settings_file_stops_the_start_with_one_clear_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"instances": -1}')
    result = subprocess.run([sys.executable, str(ROOT / "local_swarm.py"), "doctor"],
                            env={**os.environ, "LOCAL_SWARM_CONFIG": str(path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f'settings file {path}, key "instances": must be at least 1' in result.stderr
    assert "Traceback" not in result.stderr


# ---- through a pseudo-terminal ------------------------------------------------------------------


class Terminal:
    """local_swarm.py run with a pseudo-terminal as its controlling terminal (stdin, stdout and
    stderr), as from a shell: Ctrl-C typed there sends SIGINT, Ctrl-D ends the input."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        pid, fd = pty.fork()
        if pid == 0:   # the child: become the command
            try:
                os.chdir(cwd)
                # as a shell does for a foreground command: a test run in the background (nohup,
                # `&` in a script) inherits SIGINT ignored, and then Ctrl-C would do nothing
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(sys.executable, [sys.executable, str(ROOT / "local_swarm.py"), *argv],
                          env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.text, self.at, self.status = pid, fd, "", 0, None

    def _read(self, timeout: float) -> bool:
        """Read what is there within timeout; False once the terminal is closed (child gone)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:    # EIO: the child has exited and closed the terminal
            return False
        self.text += data.decode("utf-8", errors="replace")
        return bool(data)

    def expect(self, pattern: str, timeout: float = SETUP_PROMPT_TIMEOUT) -> re.Match:
        """Wait for pattern in the output after the previous match; fail with the output."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.text, self.at)
            if match:
                self.at = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.5)):
                raise AssertionError(f"no {pattern!r} in the output:\n{self.text}")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def enter(self, line: str = "") -> None:
        self.type(line + "\r")        # Enter sends CR; the terminal turns it into a newline

    def wait(self, timeout: float = 30) -> int:
        """The exit status (as subprocess reports it), reading output until then."""
        deadline = time.monotonic() + timeout
        while self.status is None and time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            else:
                self._read(0.2)
        assert self.status is not None, f"still running after {timeout} s:\n{self.text}"
        drained = time.monotonic() + 5
        while self._read(0.1) and time.monotonic() < drained:
            pass
        return self.status

    def close(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture()
def user(tmp_path, model_dir):
    """A user's machine in tmp_path: home, config and cache folders of its own, a ./models
    folder with SmolLM2 in the working folder, and no LOCAL_SWARM_* variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOCAL_SWARM_", "HF_", "XDG_")) and k not in
           ("LLAMA_CACHE", "OLLAMA_MODELS")}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg"),
               LOCAL_SWARM_CACHE=str(tmp_path / "cache"), TERM="dumb")
    config = tmp_path / "xdg" / "local-swarm" / "config.json"
    terminals: list[Terminal] = []

    def run(*argv: str, extra: dict | None = None) -> Terminal:
        terminals.append(Terminal(list(argv), {**env, **(extra or {})}, model_dir.parent))
        return terminals[-1]
    yield run, env, config, model_dir
    for terminal in terminals:
        terminal.close()


def test_setup_in_a_terminal_saves_the_answers_and_doctor_reads_them(user):
    run, env, config, model_dir = user
    term = run("setup")
    term.expect(r"1\) SmolLM2-135M-Instruct\.Q4_1\.gguf")
    term.expect(r"Model \[1\]: ")
    term.enter("5")
    term.expect("type a number from 1 to 4")
    term.expect(r"Model \[1\]: ")
    term.enter()
    recommended = term.expect(r"recommended: (\d+)\.").group(1)
    term.expect(rf"Workers \[{recommended}\]: ")
    term.enter("lots")
    term.expect("type a whole number, at least 1")
    term.enter("1")
    term.expect(r"Port on 127\.0\.0\.1 \(0: any free port\) \[8000\]: ")
    term.enter("99999")
    term.expect("type a port number from 0 to 65535")
    term.enter("0")
    term.expect("Saved " + re.escape(str(config)))
    assert term.wait() == 0
    assert json.loads(config.read_text()) == {
        "model": str(model_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"), "instances": 1, "port": 0}

    doctor = subprocess.run([sys.executable, str(ROOT / "local_swarm.py"), "doctor"], env=env,
                            cwd=model_dir.parent, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert doctor.returncode == 0, doctor.stderr
    assert "Plan:      1 llama-server x 1 slot" in doctor.stdout
    assert f"Settings:  {config}: model {model_dir}" in doctor.stdout


def test_first_start_in_a_terminal_asks_refuses_a_busy_port_and_ctrl_c_saves_nothing(user):
    run, _, config, _ = user
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        term = run("--threads", "1")
        term.expect(r"Model \[1\]: ")
        term.enter()
        term.expect(r"Workers \[\d+\]: ")
        term.enter("1")
        term.expect(r"\[8000\]: ")
        term.enter(str(port))
        term.expect(f"port {port} is in use on 127.0.0.1; type another, or 0")
        term.expect(r"\[8000\]: ")
        term.type("\x03")                     # Ctrl-C
        assert term.wait() == 130
    assert "setup cancelled; nothing was saved" in term.text
    assert "Traceback" not in term.text and not config.exists()


def test_ctrl_d_at_a_question_cancels_cleanly(user):
    run, _, config, _ = user
    term = run("setup")
    term.expect(r"Model \[1\]: ")
    term.type("\x04")                         # Ctrl-D: end of input
    assert term.wait() == 1
    assert "nothing was saved" in term.text and "Traceback" not in term.text
    assert not config.exists()


def test_yes_never_asks_even_in_a_terminal(user):
    run, _, config, model_dir = user
    term = run("setup", "--yes", "--port", "0")
    assert term.wait(timeout=SETUP_PROMPT_TIMEOUT) == 0   # no input was ever typed
    saved = json.loads(config.read_text())
    assert saved["model"] == str(model_dir / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "port" not in saved                # given by a flag: not asked, not saved
    assert saved["instances"] >= 1


def test_the_next_start_reads_the_file_without_asking(user):
    """The settings a first run saved (here written as setup writes them) are served by the
    next start in a terminal, which asks nothing; the ready lines and the banner show them."""
    run, _, config, model_dir = user
    ls.save_settings(config, {"model": str(model_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                              "instances": 1, "port": 0, "ctx": 2048, "threads": 1})
    term = run()
    try:
        term.expect(READY_LINE.pattern, timeout=DAEMON_START_TIMEOUT)
        term.expect(r"opencode .*\n")
    finally:
        os.kill(term.pid, signal.SIGTERM)
    assert term.wait() == 0
    assert "Model [" not in term.text and "Workers [" not in term.text
    assert re.search(r"worker 1/1 ready in \d+\.\d s", term.text)
    assert "workers   1/1 ready (1 llama-server x 1 slot, 1 thread), context 2048 tokens" in term.text
    assert "model     SmolLM2-135M-Instruct.Q4_1" in term.text


def test_a_start_without_a_terminal_never_asks_and_writes_nothing(user):
    """stdin not a terminal, no settings file, no model named: the defaults apply (the model
    found in ./models), LOCAL_SWARM_* variables are honoured, and nothing waits for input."""
    _, env, config, model_dir = user
    env = {**env, "LOCAL_SWARM_INSTANCES": "1", "LOCAL_SWARM_PORT": "0", "LOCAL_SWARM_CTX": "2048"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "local_swarm.py"), "--threads", "1"],
                            env=env, cwd=model_dir.parent, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while not any(READY_LINE.search(line) for line in list(lines)):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(10)
    text = "".join(lines)
    assert "Model [" not in text and "Workers [" not in text and "Port on" not in text
    assert "workers   1/1 ready" in text and "SmolLM2-135M-Instruct" in text
    assert not config.exists()
