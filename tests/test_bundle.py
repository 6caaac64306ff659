"""`bundle DIR`: a folder that runs with no network on a machine of the same OS, arch and Python.

Unit tests cover the pieces (what goes in the wheelhouse, the offline build's pip setup, path
independence). The end-to-end tests make one bundle of the real build with SmolLM2-135M, copy it
to another path, delete the original, and run the copy as a user would (`python local_swarm.py`,
no model flag) with a fresh HOME and cache, inside a network namespace with nothing but loopback
(`unshare -n`); requests reach it from inside that namespace (`nsenter`). The slow test removes the
copy's built site folder first, so the daemon compiles llama.cpp from the bundled source with the
bundled wheels, offline.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, SwarmProcess, spawn_swarm
from test_hardware import (fake_cmake, hardware, make_current_build, native_build,  # noqa: F401
                           no_cmake_on_path, write_native_sdist, write_sdist)

import local_swarm as ls

TARGET_FLAGS = ("--instances", "1", "--ctx", "2048", "--threads", "1", "--port", "0")
SERVE_TIMEOUT = 300           # a start that reuses the bundled build takes seconds
OFFLINE_BUILD_TIMEOUT = 2400  # compiling llama.cpp: ~5 min on 2 free cores, more when shared
BUILD_TIME = re.compile(r"llama\.cpp build \S+: ready in ((?:\d+ h )?(?:\d+ min )?\d+ (?:s|min))$",
                        re.MULTILINE)   # format_duration's "42 s", "4 min 05 s", "1 h 02 min"


# ---- the wheelhouse ---------------------------------------------------------------------------------


def dist_info(site: Path, name: str, version: str, folder: str | None = None) -> Path:
    """A minimal installed distribution: <folder>.dist-info with METADATA and RECORD."""
    info = site / (folder or f"{name.replace('-', '_')}-{version}.dist-info")
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n"
                                   + "A long description.\n" * 100)
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    return info


def test_site_requirements_pin_every_distribution_but_llama_cpp_python(tmp_path):
    site = tmp_path / "site"
    dist_info(site, "numpy", "2.4.6")
    dist_info(site, "PyYAML", "6.0.4")
    dist_info(site, "typing_extensions", "4.16.0")
    dist_info(site, "llama_cpp_python", "0.3.36")
    dist_info(site, "Llama.CPP-Python", "0.3.35", folder="other-0.3.35.dist-info")  # same name
    (site / "numpy").mkdir()
    assert ls.site_requirements(site) == ["numpy==2.4.6", "PyYAML==6.0.4",
                                          "typing_extensions==4.16.0"]


def sdist_with(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            data = text.encode()
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            archive.addfile(entry, io.BytesIO(data))
    return path


def test_sdist_build_requirements_come_from_the_top_level_pyproject(tmp_path):
    sdist = sdist_with(tmp_path / "p-1.tar.gz", {
        "p-1/vendor/llama.cpp/pyproject.toml": '[build-system]\nrequires = ["poetry-core"]\n',
        "p-1/pyproject.toml": '[build-system]\nrequires = ["scikit-build-core[pyproject]>=0.9.2"]\n'})
    assert ls.sdist_build_requirements(sdist) == ["scikit-build-core[pyproject]>=0.9.2"]
    with pytest.raises(ls.BuildError, match="no usable pyproject"):
        ls.sdist_build_requirements(sdist_with(tmp_path / "q.tar.gz", {"q-1/setup.py": ""}))
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ls.BuildError, match="cannot read"):
        ls.sdist_build_requirements(tmp_path / "broken.tar.gz")


def test_wheelhouse_holds_the_site_the_build_backend_and_the_build_tools(tmp_path):
    site = tmp_path / "site"
    dist_info(site, "httpx", "0.28.1")
    dist_info(site, "llama_cpp_python", "0.3.36")
    sdist = sdist_with(tmp_path / "s.tar.gz", {
        "s-1/pyproject.toml": '[build-system]\nrequires = ["scikit-build-core>=0.9.2"]\n'})
    assert ls.wheelhouse_requirements(site, sdist) == [
        "httpx==0.28.1", "scikit-build-core>=0.9.2", "cmake", "ninja", "pip"]


# ---- path independence ------------------------------------------------------------------------------


def test_site_is_made_relocatable(tmp_path):
    builder = "/opt/builder/python"
    site = tmp_path / "site"
    info = dist_info(site, "llama_cpp_python", "0.3.36")
    (info / "direct_url.json").write_text(json.dumps({"url": f"file://{builder}/x.whl"}))
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/direct_url.json,sha256=x,9\n"
                                 f"../../bin/tool,sha256=y,1\n{info.name}/RECORD,,\n")
    (site / "bin").mkdir()
    (site / "bin" / "tool").write_text(f"#!{builder}/bin/python\nimport tool\n")
    (site / "distutils-precedence.pth").write_text(f"{builder}/lib\n")
    (site / "llama_cpp").mkdir()
    (site / "llama_cpp" / "__init__.py").write_text("# uses no absolute path\n")
    assert len(ls.find_path_references(site, [builder])) == 3
    ls.make_site_relocatable(site)
    assert ls.find_path_references(site, [builder]) == []
    assert not (site / "bin").exists() and not list(site.glob("*.pth"))
    assert (info / "RECORD").read_text() == (f"{info.name}/METADATA,,\n../../bin/tool,sha256=y,1\n"
                                             f"{info.name}/RECORD,,\n")
    assert (site / "llama_cpp" / "__init__.py").is_file()


def test_path_references_skip_archives_and_models_but_not_binaries(tmp_path):
    needle = "/home/builder/llama_builds"
    for name in ("a.whl", "b.tar.gz", "m.gguf", "lib.so", "empty.txt", "x.pyc"):
        (tmp_path / name).write_bytes(b"" if name == "empty.txt" else b"\0\1" + needle.encode() + b"\0")
    (tmp_path / "link.txt").symlink_to(tmp_path / "lib.so")
    assert ls.find_path_references(tmp_path, [needle, ""]) == [tmp_path / "lib.so", tmp_path / "x.pyc"]


def test_bundle_needles_leave_out_short_paths(tmp_path):
    build = ls.build_info(tmp_path / "builds", hardware())
    needles = ls._bundle_needles(tmp_path / "dest", build, tmp_path / "builds", Path("/root"))
    assert str(tmp_path / "dest") in needles and str(build.dir) in needles
    assert str(ls.HERE) in needles and "/root" not in needles


# ---- the offline build ------------------------------------------------------------------------------


BAD_PIP_TIMEOUT = "not-a-number"     # pip exits at start: "option timeout: invalid floating-point"


@pytest.mark.e2e  # real pip
def test_offline_build_uses_the_wheelhouse_and_no_pip_configuration(tmp_path, monkeypatch):
    """A real pip builds the fake sdist (tests/test_hardware.py) in a builds folder that has a
    wheelhouse. pip's configuration here is one pip refuses to start with (a timeout that is not
    a number), from both a config file and the environment: the build succeeds only because the
    offline job drops both. (Not require-virtualenv: CI may well run inside a virtualenv.)"""
    builds = tmp_path / "builds"
    write_sdist(builds / "sdist")
    (builds / "wheelhouse").mkdir()
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\ntimeout = {BAD_PIP_TIMEOUT}\n"
                      "index-url = http://127.0.0.1:9/simple\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.setenv("PIP_TIMEOUT", BAD_PIP_TIMEOUT)
    lines: list[str] = []
    info = ls.ensure_build(builds, hardware(), progress=lines.append, extra_packages=())
    assert (info.site / "llama_cpp" / "cmake_args.txt").is_file()
    assert not list(info.site.glob("*.dist-info/direct_url.json"))   # the site is relocatable
    log = (info.dir / "build.log").read_text()
    assert f"--no-index --find-links {builds / 'wheelhouse'}" in log
    assert "offline, from the bundled source" in "\n".join(lines)


@pytest.mark.e2e  # real pip
def test_without_a_wheelhouse_pip_configuration_applies(tmp_path, monkeypatch):
    """The control for the test above: the same build with no wheelhouse obeys pip's config."""
    builds = tmp_path / "builds"
    write_sdist(builds / "sdist")
    monkeypatch.setenv("PIP_TIMEOUT", BAD_PIP_TIMEOUT)
    with pytest.raises(ls.BuildError, match="invalid floating-point value"):
        ls.ensure_build(builds, hardware(), progress=lambda line: None, extra_packages=())


@pytest.mark.skipif(os.name != "posix", reason="the fake tools are shell scripts")
def test_offline_native_build_installs_cmake_and_ninja_from_the_wheelhouse(tmp_path, fake_cmake,
                                                                           no_cmake_on_path):
    """A bundle on a machine without cmake: ensure_native takes the offline job, so pip installs
    cmake and ninja from the wheelhouse alone, and the native build compiles with them."""
    pip, pip_calls = no_cmake_on_path
    builds, hw, lines = tmp_path / "builds", hardware(), []
    write_native_sdist(builds)
    (builds / "wheelhouse").mkdir()
    native = ls.ensure_native(ls.build_info(builds, hw), hw, builds, progress=lines.append, pip=pip)
    assert native.binary.is_file()
    (install,) = pip_calls()
    assert install[:2] == ["install", "--target"] and install[3:5] == ["cmake", "ninja"]
    assert install[5:] == ["--no-index", "--find-links", str(builds / "wheelhouse"),
                           "--disable-pip-version-check"]
    assert "offline, from the bundled source" in "\n".join(lines)


def test_a_bundle_copies_the_current_native_build(tmp_path, fake_cmake):
    """_copy_build takes <key>/native (binary, libraries, symlinks as symlinks, its record) when
    it is current, and leaves out the native build's log; a stale one is left out."""
    cmake, _ = fake_cmake
    builds, hw = tmp_path / "builds", hardware()
    build = make_current_build(builds, hw)
    write_native_sdist(builds)
    native = native_build(builds, hw, cmake)
    copy = tmp_path / "bundle" / "llama_builds"
    ls._copy_build(build, copy, hw)
    copied = copy / build.key / "native"
    assert sorted(path.name for path in copied.iterdir()) == sorted(
        path.name for path in native.dir.iterdir())
    assert os.readlink(copied / "libllama.so.0") == "libllama.so.0.5.0"
    assert not (copy / build.key / "native-build.log").exists()
    assert ls.native_ready(ls.build_info(copy, hw), hw) is not None
    record = json.loads((native.dir / "native.json").read_text())
    (native.dir / "native.json").write_text(json.dumps({**record, "llama_cpp_python": "0.3.1"}))
    ls._copy_build(build, tmp_path / "stale" / "llama_builds", hw)
    assert not (tmp_path / "stale" / "llama_builds" / build.key / "native").exists()


def test_bundle_for_another_python_refuses_to_build(tmp_path):
    builds = tmp_path / "builds"
    (builds / "wheelhouse").mkdir(parents=True)
    (builds / "bundle.json").write_text(json.dumps(
        {"os": "linux", "arch": "x86_64", "python_tag": "cp27"}))
    pip = (sys.executable, "-c", "raise SystemExit('pip must not run')")
    with pytest.raises(ls.BuildError, match="made for linux x86_64 with Python cp27"):
        ls.ensure_build(builds, hardware(), progress=lambda line: None, pip=pip)


def test_missing_compiler_is_said_before_anything_runs(tmp_path, monkeypatch):
    builds = tmp_path / "builds"
    (builds / "wheelhouse").mkdir(parents=True)
    make_current_build(builds, hardware(backend="vulkan"))   # the build the bundle holds
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    pip = (sys.executable, "-c", "raise SystemExit('pip must not run')")
    with pytest.raises(ls.BuildError) as caught:
        ls.ensure_build(builds, hardware(), progress=lambda line: None, pip=pip)
    message = str(caught.value)
    assert "needs a C compiler and a C++ compiler" in message
    assert f"builds here are for {ls.build_key(hardware(backend='vulkan'))}" in message
    assert "apt-get install build-essential" in message
    monkeypatch.setenv("CC", "/opt/cc")
    with pytest.raises(ls.BuildError, match="needs a C\\+\\+ compiler,"):
        ls.ensure_build(builds, hardware(), progress=lambda line: None, pip=pip)


# ---- models and the command line --------------------------------------------------------------------


def test_a_known_id_is_served_from_the_bundled_copy(tmp_path, smol_model_path):
    bundled = tmp_path / "models"
    bundled.mkdir()

    def no_fetch(*_):
        raise AssertionError("must not download")

    with pytest.raises(AssertionError, match="must not download"):
        ls.resolve_model("smollm2-135m", tmp_path / "cache", fetch=no_fetch, bundled=bundled)
    (bundled / smol_model_path.name).symlink_to(smol_model_path)
    assert ls.resolve_model("smollm2-135m", tmp_path / "cache", fetch=no_fetch,
                            bundled=bundled) == bundled / smol_model_path.name


def test_split_models_are_copied_whole(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for n in (1, 2):
        (source / f"m-0000{n}-of-00002.gguf").write_bytes(b"GGUF")
    (source / "other.gguf").write_bytes(b"GGUF")
    copies = ls._copy_model(source / "m-00001-of-00002.gguf", tmp_path / "models")
    assert [path.name for path in copies] == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    blob = source / "sha256-abc"
    blob.write_bytes(b"GGUF")
    assert ls._copy_model(blob, tmp_path / "models") == [tmp_path / "models" / "sha256-abc.gguf"]


@pytest.mark.parametrize("argv", [["bundle"], ["doctor", "somewhere"], ["serve", "x"]])
def test_bundle_needs_a_folder_and_only_bundle_takes_one(argv):
    proc = subprocess.run([sys.executable, str(ROOT / "local_swarm.py"), *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "bundle needs a folder" in proc.stderr


def test_bundle_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ls.BuildError, match="not an empty folder"):
        ls._bundle_staging(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ---- end to end: make, move, run offline ------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory, smol_model_path) -> Path:
    """A bundle of this machine's build and SmolLM2-135M, made by the CLI as a user would, then
    copied to another path (cp -a) with the original deleted, so nothing can refer to it."""
    root = tmp_path_factory.mktemp("bundle")
    made = root / "made-here"
    proc = subprocess.run([sys.executable, str(ROOT / "local_swarm.py"), "bundle", str(made),
                           "--model", "smollm2-135m"], capture_output=True, text=True,
                          cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"bundle written to {made}" in proc.stdout
    copy = root / "moved" / "swarm"
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", str(made), str(copy)], check=True)
    shutil.rmtree(made)
    return copy


def test_bundle_layout(bundle_copy, smol_model_path):
    builds = bundle_copy / "llama_builds"
    key = json.loads((builds / "bundle.json").read_text())["build_key"]
    site = builds / key / "site"
    assert (bundle_copy / "local_swarm.py").is_file() and (builds / key / "build.json").is_file()
    assert (site / "llama_cpp" / "__init__.py").is_file()
    assert (builds / "sdist" / f"llama_cpp_python-{ls.LLAMA_CPP_PYTHON_VERSION}.tar.gz").is_file()
    assert (bundle_copy / "models" / smol_model_path.name).stat().st_size == \
        smol_model_path.stat().st_size
    wheels = {ls._canonical_name(path.name.split("-")[0]) for path in (builds / "wheelhouse").glob("*.whl")}
    installed = {ls._canonical_name(pin.split("==")[0]) for pin in ls.site_requirements(site)}
    assert {"numpy", "fastapi", "uvicorn", "httpx", "psutil", "pydantic-core"} <= installed
    assert installed | {"scikit-build-core", "packaging", "pathspec", "cmake", "ninja", "pip"} <= wheels
    assert "llama-cpp-python" not in wheels   # built per key: the source is shipped instead
    here = ls.build_info(ls.DEFAULT_BUILDS_DIR, ls.detect_hardware())
    native = builds / key / "native"        # `bundle` builds llama-server: the default kind runs it
    assert (native / "llama-server").is_file() and (native / "native.json").is_file()
    assert sorted(path.name for path in native.iterdir()) == sorted(
        path.name for path in (here.dir / "native").iterdir())
    assert not list((builds / key).glob("*.log"))
    assert not (site / "bin").exists() and not list(site.glob("*.dist-info/direct_url.json"))
    assert not list(bundle_copy.parent.parent.glob("*.partial"))


def test_bundle_names_no_path_of_the_machine_it_was_made_on(bundle_copy):
    build = ls.build_info(ls.DEFAULT_BUILDS_DIR, ls.detect_hardware())
    needles = {str(bundle_copy.parent.parent / "made-here"), str(ROOT), str(build.dir),
               str(build.dir.resolve()), str(ls.config_from_args().cache_dir)}
    assert ls.find_path_references(bundle_copy, needles) == []


# A machine with no network: a namespace with only loopback, a fresh HOME and cache, none of this
# machine's pip settings, started from an unrelated folder (so ./models is of no help either).

def start_offline(bundle: Path, home: Path, timeout: float) -> SwarmProcess:
    """`python local_swarm.py` of the bundle in a new network namespace (loopback up, nothing
    else); returns once the ready banner shows, with proc.pid the daemon itself (sh execs it)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "LOCAL_SWARM_CACHE": str(home / "swarm-cache"), "LANG": "C.UTF-8"}
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable,
           str(bundle / "local_swarm.py"), *TARGET_FLAGS]
    return spawn_swarm(cmd, cwd=home, env=env, timeout=timeout, what="offline swarm")


CHAT_IN_NAMESPACE = textwrap.dedent("""\
    import json, subprocess, sys, urllib.request
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
    body = json.dumps({"model": "local-swarm", "max_tokens": 16,
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()
    request = urllib.request.Request(sys.argv[1] + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
    print(json.dumps({"links": links, "reply": reply}))
    """)


def chat_inside(swarm: SwarmProcess) -> dict:
    """A chat request sent from inside the daemon's network namespace; also lists its links."""
    proc = subprocess.run(["nsenter", f"--net=/proc/{swarm.proc.pid}/ns/net", sys.executable,
                           "-c", CHAT_IN_NAMESPACE, swarm.url], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_answers_offline(swarm: SwarmProcess, bundle: Path) -> None:
    seen = chat_inside(swarm)
    assert [line.split(":")[1].strip() for line in seen["links"]] == ["lo"]   # no other interface
    message = seen["reply"]["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].strip()
    assert seen["reply"]["usage"]["completion_tokens"] > 0
    banner = "".join(swarm.output)
    assert f"({bundle / 'models'}/" in banner   # the bundled model, found with no --model flag


def test_bundle_copy_serves_with_no_network(bundle_copy, tmp_path):
    swarm = start_offline(bundle_copy, tmp_path / "home", SERVE_TIMEOUT)
    try:
        assert_answers_offline(swarm, bundle_copy)
        assert "compiling llama.cpp" not in "".join(swarm.output)   # the bundled build was used
    finally:
        assert swarm.stop() == 0
    assert not (tmp_path / "home" / "swarm-cache" / "models").exists()   # nothing was downloaded


@pytest.mark.slow
def test_bundle_builds_from_source_with_no_network(bundle_copy, tmp_path):
    """The bundle on a machine whose build it lacks: the site folder is removed, so the first
    start compiles llama.cpp from the bundled sdist with the bundled wheels, inside the namespace."""
    target = tmp_path / "target"
    subprocess.run(["cp", "-a", str(bundle_copy), str(target)], check=True)
    key = json.loads((target / "llama_builds" / "bundle.json").read_text())["build_key"]
    shutil.rmtree(target / "llama_builds" / key / "site")
    swarm = start_offline(target, tmp_path / "home", OFFLINE_BUILD_TIMEOUT)
    try:
        output = "".join(swarm.output)
        assert "offline, from the bundled source and wheels" in output
        assert "compiling llama.cpp" in output
        took = BUILD_TIME.search(output)
        assert took, output[-3000:]
        print(f"\noffline build from the bundled sdist: {took.group(1)}")
        assert_answers_offline(swarm, target)
    finally:
        assert swarm.stop() == 0
    site = target / "llama_builds" / key / "site"
    assert (site / "llama_cpp" / "__init__.py").is_file()
    assert not (site / "bin").exists() and not list(site.glob("*.dist-info/direct_url.json"))
