"""Hardware detection, build keys and CMake arguments, the worker plan, and ensure_build.

Probes are fed from tables of tool outputs; builds run real pip against a tiny fake sdist (an
in-tree PEP 517 backend that prints ninja-like steps and records CMAKE_ARGS), never llama.cpp.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import local_swarm as ls  # noqa: E402

PY = f"cp{sys.version_info.major}{sys.version_info.minor}"
GiB = 2**30
NATIVE_OFF = ["-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF"]
AVX2_ARGS = list(ls.LEVEL_CMAKE_ARGS["avx2"])
SSE42_ARGS = ["-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_BMI2=OFF", "-DGGML_FMA=OFF",
              "-DGGML_F16C=OFF"]


# ---- detect_hardware from tables of tool outputs ----------------------------------------------------

CPUINFO_AVX2 = textwrap.dedent("""\
    processor\t: 0
    vendor_id\t: AuthenticAMD
    model name\t: AMD EPYC 7B13
    physical id\t: 0
    core id\t: 0
    flags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2 avx512f

    processor\t: 1
    model name\t: AMD EPYC 7B13
    physical id\t: 0
    core id\t: 1
    flags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2 avx512f
    """)
CPUINFO_OLD = "processor\t: 0\nmodel name\t: Intel Xeon E5-2670\nflags\t\t: fpu sse4_2 avx\n"
CPUINFO_NO_BMI2 = "processor\t: 0\nmodel name\t: Odd VM\nflags\t\t: sse4_2 avx avx2 fma f16c\n"
CPUINFO_ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n"
NVIDIA_SMI = {"nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits":
              "NVIDIA GeForce RTX 4090, 24564\n"}
NVCC = {"nvcc --version": "Cuda compilation tools, release 12.4\n"}
ROCMINFO = textwrap.dedent("""\
    *******
    Agent 1
    *******
      Name:                    AMD Ryzen 9 7950X
      Marketing Name:          AMD Ryzen 9 7950X
    *******
    Agent 2
    *******
      Name:                    gfx1100
      Uuid:                    GPU-abc
      Marketing Name:          AMD Radeon RX 7900 XTX
    """)
ROCMINFO_CPU_ONLY = "  Name:                    AMD Ryzen 9 7950X\n  Marketing Name:          AMD Ryzen\n"
VULKAN_GPU = textwrap.dedent("""\
    Devices:
    ========
    GPU0:
    \tapiVersion         = 1.3.255
    \tdeviceType         = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU
    \tdeviceName         = AMD Radeon RX 6600
    GPU1:
    \tdeviceType         = PHYSICAL_DEVICE_TYPE_CPU
    \tdeviceName         = llvmpipe (LLVM 15.0.6, 256 bits)
    """)
VULKAN_LLVMPIPE = ("GPU0:\n\tdeviceType = PHYSICAL_DEVICE_TYPE_CPU\n"
                   "\tdeviceName = llvmpipe (LLVM 15.0.6, 256 bits)\n")


class Tools:
    """A fake `run`: answers from a table keyed by the joined argv; None (missing) otherwise."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self.calls: list[str] = []

    def __call__(self, argv):
        self.calls.append(" ".join(argv))
        return self.table.get(" ".join(argv))


def files(table: dict[str, str]):
    return lambda path: table.get(path)


# (case, os, machine, cpuinfo, tools, backend, level, key suffix, cmake args, gpu name, vram)
DETECT_CASES = [
    ("x86 avx2, no GPU", "linux", "x86_64", CPUINFO_AVX2, {},
     "cpu", "avx2", "linux-x86_64-{py}-cpu-avx2", NATIVE_OFF + AVX2_ARGS, "", 0),
    ("x86 without avx2", "linux", "x86_64", CPUINFO_OLD, {},
     "cpu", "sse42", "linux-x86_64-{py}-cpu-sse42", NATIVE_OFF + SSE42_ARGS, "", 0),
    ("avx2 without bmi2 is not the avx2 level", "linux", "x86_64", CPUINFO_NO_BMI2, {},
     "cpu", "sse42", "linux-x86_64-{py}-cpu-sse42", NATIVE_OFF + SSE42_ARGS, "", 0),
    ("nvidia GPU + nvcc", "linux", "x86_64", CPUINFO_AVX2, {**NVIDIA_SMI, **NVCC},
     "cuda", "avx2", "linux-x86_64-{py}-cuda-avx2", NATIVE_OFF + ["-DGGML_CUDA=on"] + AVX2_ARGS,
     "NVIDIA GeForce RTX 4090", 24564 * 2**20),
    ("nvidia GPU without nvcc", "linux", "x86_64", CPUINFO_AVX2, NVIDIA_SMI,
     "cpu", "avx2", "linux-x86_64-{py}-cpu-avx2", NATIVE_OFF + AVX2_ARGS, "", 0),
    ("nvcc without GPU", "linux", "x86_64", CPUINFO_AVX2, NVCC,
     "cpu", "avx2", "linux-x86_64-{py}-cpu-avx2", NATIVE_OFF + AVX2_ARGS, "", 0),
    ("apple silicon", "darwin", "arm64", None,
     {"sysctl -n machdep.cpu.brand_string": "Apple M2 Pro\n"},
     "metal", "", "darwin-arm64-{py}-metal", NATIVE_OFF + ["-DGGML_METAL=on"], "Apple M2 Pro GPU", 0),
    ("intel mac", "darwin", "x86_64", None,
     {"sysctl -n machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9880H\n",
      "sysctl -n machdep.cpu.features": "FPU SSE4.2 AVX1.0 FMA F16C\n",
      "sysctl -n machdep.cpu.leaf7_features": "BMI1 AVX2 BMI2\n"},
     "cpu", "avx2", "darwin-x86_64-{py}-cpu-avx2", NATIVE_OFF + AVX2_ARGS, "", 0),
    ("rocm", "linux", "x86_64", CPUINFO_AVX2,
     {"rocminfo": ROCMINFO, "hipconfig --version": "6.1.0\n"},
     "rocm", "avx2", "linux-x86_64-{py}-rocm-avx2", NATIVE_OFF + ["-DGGML_HIP=on"] + AVX2_ARGS,
     "AMD Radeon RX 7900 XTX", 0),
    ("rocminfo lists only the CPU", "linux", "x86_64", CPUINFO_AVX2,
     {"rocminfo": ROCMINFO_CPU_ONLY, "hipconfig --version": "6.1.0\n"},
     "cpu", "avx2", "linux-x86_64-{py}-cpu-avx2", NATIVE_OFF + AVX2_ARGS, "", 0),
    ("vulkan", "linux", "x86_64", CPUINFO_OLD,
     {"vulkaninfo --summary": VULKAN_GPU, "glslc --version": "shaderc v2023.8\n"},
     "vulkan", "sse42", "linux-x86_64-{py}-vulkan-sse42",
     NATIVE_OFF + ["-DGGML_VULKAN=on"] + SSE42_ARGS, "AMD Radeon RX 6600", 0),
    ("vulkan software renderer only", "linux", "x86_64", CPUINFO_AVX2,
     {"vulkaninfo --summary": VULKAN_LLVMPIPE, "glslc --version": "shaderc\n"},
     "cpu", "avx2", "linux-x86_64-{py}-cpu-avx2", NATIVE_OFF + AVX2_ARGS, "", 0),
    ("linux arm64", "linux", "aarch64", CPUINFO_ARM, {},
     "cpu", "", "linux-aarch64-{py}-cpu", NATIVE_OFF, "", 0),
    ("windows, nothing known", "win32", "AMD64", None, {},
     "cpu", "sse42", "windows-x86_64-{py}-cpu-sse42", NATIVE_OFF + SSE42_ARGS, "", 0),
    ("nothing readable", "linux", "x86_64", None, {},
     "cpu", "sse42", "linux-x86_64-{py}-cpu-sse42", NATIVE_OFF + SSE42_ARGS, "", 0),
]


@pytest.mark.parametrize("case,os_name,machine,cpuinfo,tools,backend,level,key,args,gpu,vram",
                         DETECT_CASES, ids=[c[0] for c in DETECT_CASES])
def test_detect_hardware_table(case, os_name, machine, cpuinfo, tools, backend, level, key, args,
                               gpu, vram):
    proc = {"/proc/cpuinfo": cpuinfo} if cpuinfo else {}
    hw = ls.detect_hardware(run=Tools(tools), read_text=files(proc), os_name=os_name,
                            machine=machine)
    assert hw.backend == backend
    assert ls.cpu_level(hw) == level
    assert ls.build_key(hw) == key.format(py=PY)
    assert ls.cmake_args(hw) == args
    assert hw.gpu_name == gpu
    assert hw.vram_bytes == vram
    assert hw.python_tag == PY


def test_detect_reads_cpu_model_and_flags():
    hw = ls.detect_hardware(run=Tools({}), read_text=files({"/proc/cpuinfo": CPUINFO_AVX2}),
                            os_name="linux", machine="x86_64")
    assert hw.cpu_model == "AMD EPYC 7B13"
    assert {"avx2", "fma", "f16c", "bmi2", "avx512f"} <= hw.cpu_flags
    assert hw.physical_cores >= 1 and hw.logical_cores >= 1 and hw.ram_total > 0


def test_unusable_gpu_and_toolkit_are_reported_as_notes():
    no_nvcc = ls.detect_hardware(run=Tools(NVIDIA_SMI), read_text=files({}), os_name="linux",
                                 machine="x86_64")
    no_gpu = ls.detect_hardware(run=Tools(NVCC), read_text=files({}), os_name="linux",
                                machine="x86_64")
    assert any("no CUDA toolkit" in note for note in no_nvcc.notes)
    assert any("lists no GPU" in note for note in no_gpu.notes)


def test_every_tool_is_a_short_probe():
    tools = Tools({})
    ls.detect_hardware(run=tools, read_text=files({}), os_name="linux", machine="x86_64")
    assert "nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits" in tools.calls
    assert "rocminfo" in tools.calls and "vulkaninfo --summary" in tools.calls
    assert ls.run_tool(["definitely-not-a-tool-xyz"]) is None
    assert ls.run_tool([sys.executable, "-c", "import sys; sys.exit(3)"]) is None
    assert ls.run_tool([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2) is None
    assert ls.run_tool([sys.executable, "-c", "print('hi')"]) == "hi\n"


def test_stdlib_fallbacks_without_psutil():
    meminfo = "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    8192000 kB\n"
    hw = ls.detect_hardware(run=Tools({}), os_name="linux", machine="x86_64", ps=None,
                            read_text=files({"/proc/cpuinfo": CPUINFO_AVX2, "/proc/meminfo": meminfo}))
    assert (hw.physical_cores, hw.ram_total, hw.ram_available) == (2, 16384000 * 1024, 8192000 * 1024)
    mac = ls.detect_hardware(run=Tools({"sysctl -n hw.physicalcpu": "8\n", "sysctl -n hw.memsize": "17179869184\n"}),
                             read_text=files({}), os_name="darwin", machine="arm64", ps=None)
    assert (mac.physical_cores, mac.ram_total) == (8, 16 * GiB)


# ---- plan -------------------------------------------------------------------------------------------


def hardware(cores=2, ram=24 * GiB, backend="cpu", vram=0, arch="x86_64") -> ls.Hardware:
    return ls.Hardware(os="linux", arch=arch, python_tag=PY, cpu_model="test", cpu_flags=frozenset(),
                       physical_cores=cores, logical_cores=cores, ram_total=ram, ram_available=ram,
                       backend=backend, vram_bytes=vram)


def model(size, n_layer, n_head_kv, head_dim, ctx, name="m") -> ls.ModelInfo:
    return ls.ModelInfo(path=Path(f"/models/{name}.gguf"), size_bytes=size, sha256=None, name=name,
                        arch="llama", context_length=ctx, n_layer=n_layer, n_embd=n_head_kv * head_dim,
                        n_head=n_head_kv, n_head_kv=n_head_kv, head_dim=head_dim,
                        has_tool_template=False, chat_template_family="chatml")


SMOLLM2 = model(98_362_432, 30, 3, 64, 8192, "smollm2")
QWEN05 = model(491_400_064, 24, 2, 64, 32768, "qwen05")
QWEN15 = model(1_117_320_768, 28, 2, 128, 32768, "qwen15")

# (case, hardware, model, flags, instances, threads, ctx, gpu_layers, words in the reasons)
PLAN_CASES = [
    ("2 cores, 24 GB, SmolLM2", hardware(2, 24 * GiB), SMOLLM2, {}, 2, 1, 8192, 0,
     ["one per physical core", "trained context 8192"]),
    ("8 cores, 16 GB, qwen 0.5b: roomy context", hardware(8, 16 * GiB), QWEN05, {}, 8, 1, 16384, 0,
     ["context 16384"]),
    ("16 cores: capped at 8 workers x 2 threads", hardware(16, 64 * GiB), QWEN05, {}, 8, 2, 16384, 0,
     ["max 8"]),
    ("tiny RAM: one worker, over budget", hardware(4, 1 * GiB), QWEN05, {}, 1, 4, 8192, 0,
     ["does not fit", "warning"]),
    ("memory bound: 3 workers", hardware(8, 2 * GiB), SMOLLM2, {}, 3, 2, 8192, 0,
     ["as many as fit in memory"]),
    ("--instances overrides and oversubscribes", hardware(2, 24 * GiB), SMOLLM2, {"cfg_instances": 4},
     4, 1, 8192, 0, ["set by --instances", "oversubscribe"]),
    ("--threads overrides", hardware(2, 24 * GiB), SMOLLM2, {"cfg_threads": 2}, 2, 2, 8192, 0,
     ["set by --threads", "oversubscribe"]),
    ("--ctx overrides, past the trained context", hardware(2, 24 * GiB), SMOLLM2, {"cfg_ctx": 16384},
     2, 1, 16384, 0, ["set by --ctx", "over the model's trained 8192"]),
    ("--instances over the budget", hardware(2, 2 * GiB), QWEN05, {"cfg_instances": 6}, 6, 1, 8192, 0,
     ["warning: 6 workers need", "over the"]),
    ("cuda, 24 GB VRAM: weights per worker", hardware(16, 64 * GiB, "cuda", 24 * GiB), QWEN15, {},
     8, 2, 8192, -1, ["VRAM", "own weights"]),
    ("cuda, 4 GB VRAM: VRAM bound", hardware(16, 64 * GiB, "cuda", 4 * GiB), QWEN15, {},
     1, 2, 8192, -1, ["as many as fit in GPU memory"]),
    ("metal: unified memory, shared weights", hardware(8, 16 * GiB, "metal", 0, "arm64"), QWEN05, {},
     8, 1, 16384, -1, ["available RAM"]),
]


@pytest.mark.parametrize("case,hw,info,flags,instances,threads,ctx,gpu_layers,words", PLAN_CASES,
                         ids=[c[0] for c in PLAN_CASES])
def test_plan_table(case, hw, info, flags, instances, threads, ctx, gpu_layers, words):
    result = ls.plan(hw, info, **flags)
    assert (result.instances, result.threads, result.ctx, result.gpu_layers) == \
        (instances, threads, ctx, gpu_layers)
    assert result.threads_batch == result.threads
    text = " | ".join(result.reasons)
    for word in words:
        assert word in text


def test_plan_numbers_follow_the_documented_rule():
    hw, info = hardware(2, 24 * GiB), SMOLLM2
    result = ls.plan(hw, info)
    assert ls.kv_bytes_per_token(info) == 2 * 30 * 3 * 64 * 2
    assert result.kv_bytes_per_worker == 8192 * ls.kv_bytes_per_token(info)
    assert result.memory_budget == int(24 * GiB * 0.70)
    assert result.weights_bytes == info.size_bytes
    assert not any("warning" in reason for reason in result.reasons)


# ---- doctor, worker environment, isolation, small helpers ----------------------------------------------------------------


def test_doctor_report_says_what_it_found(tmp_path):
    hw = dataclasses.replace(hardware(2, 24 * GiB), notes=("CUDA toolkit (nvcc) found but no GPU",))
    key = ls.build_key(hw)
    report = ls.doctor_report(hw, key, ls.plan(hw, SMOLLM2), SMOLLM2, builds_dir=tmp_path)
    assert key in report and "not built yet" in report
    assert f"llama-server in {tmp_path / key / 'native'}: not built" in report
    assert "2 workers x 1 thread" in report and "one per physical core" in report
    assert "CUDA toolkit" in report and "smollm2" in report
    make_current_build(tmp_path, hw)
    assert "ready" in ls.doctor_report(hw, key, None, None, builds_dir=tmp_path)
    assert "none found yet" in ls.doctor_report(hw, key, None, None, builds_dir=tmp_path)


def test_doctor_on_this_machine():
    """`python -c` the way a user would: detect this machine and print the report."""
    code = ("import local_swarm as ls; hw = ls.detect_hardware(); "
            "print(ls.doctor_report(hw, ls.build_key(hw), None, None))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    hw = ls.detect_hardware()
    assert f"Build:     {ls.build_key(hw)}" in done.stdout
    assert f"Cores:     {hw.physical_cores} physical" in done.stdout and "GiB total" in done.stdout


@pytest.mark.parametrize("name, kept", [
    ("PORT", False), ("HOST", False), ("CONFIG_FILE", False), ("MODEL", False), ("API_KEY", False),
    ("N_CTX", False), ("port", False), ("PYTHONPATH", False), ("PYTHONHOME", False),
    ("VIRTUAL_ENV", False), ("LOCAL_SWARM_API_KEY", False), ("LLAMA_ARG_PORT", False),
    ("PATH", True), ("HOME", True), ("LANG", True), ("LC_ALL", True), ("TMPDIR", True),
    ("CUDA_VISIBLE_DEVICES", True), ("HIP_VISIBLE_DEVICES", True), ("GGML_VK_VISIBLE_DEVICES", True),
    ("OMP_NUM_THREADS", True), ("LD_LIBRARY_PATH", True), ("SystemRoot", True),
])
def test_a_worker_gets_only_what_it_needs_of_the_environment(name, kept):
    assert (name in ls.worker_env({name: "x", "PATH": "/bin"})) is kept
    assert ls.worker_env({name: "x"}).get(name) == ("x" if kept else None)


def fake_site(tmp_path: Path) -> Path:
    """A site folder with a marked typing_extensions, and a module that breaks on import."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "typing_extensions.py").write_text("WHERE = 'site'\n")
    (site / "broken_dep.py").write_text("raise ImportError(\"cannot import name 'sentinel'\")\n")
    return site


def test_isolated_interpreter_sees_the_site_folder_and_the_standard_library_only(tmp_path):
    """What the daemon's second run and each worker see, whatever the user's Python holds: not
    PYTHONPATH, not the user site, not site-packages (jsonschema and pytest are installed here),
    not the current folder; the site folder first and the arguments as given."""
    site = fake_site(tmp_path)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "typing_extensions.py").write_text("WHERE = 'shadow'\n")
    script = tmp_path / "daemon.py"
    script.write_text(textwrap.dedent("""\
        import importlib.util, json, sys, typing_extensions
        print(json.dumps({"argv": sys.argv, "where": typing_extensions.WHERE,
                          "first": sys.path[0], "flags": [sys.flags.isolated, sys.flags.no_site],
                          "found": [n for n in ("jsonschema", "pytest", "local_swarm")
                                    if importlib.util.find_spec(n)]}))
        """))
    argv = ls.isolated_argv(sys.executable, site, ls.DAEMON_BOOTSTRAP, [str(script), "--port", "0"])
    env = {**os.environ, "PYTHONPATH": str(shadow), "PYTHONUSERBASE": str(shadow)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=shadow, env=env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {"argv": [str(script), "--port", "0"], "where": "site", "first": str(site),
                    "flags": [1, 1], "found": []}


def test_check_site_names_the_broken_module_and_the_fix(tmp_path, monkeypatch):
    info = dataclasses.replace(ls.build_info(tmp_path, hardware()), site=fake_site(tmp_path))
    with pytest.raises(ls.BuildError, match="not on the build's site folder"):
        ls.check_site(info, modules=("typing_extensions",))
    monkeypatch.setattr(sys, "path", [str(info.site), *sys.path])
    monkeypatch.delitem(sys.modules, "typing_extensions", raising=False)
    ls.check_site(info, modules=("typing_extensions",))
    with pytest.raises(ls.BuildError) as broken:
        ls.check_site(info, modules=("broken_dep",))
    message = str(broken.value)
    assert "\n" not in message and "importing broken_dep failed with ImportError" in message
    assert f"delete {info.dir} and start again" in message
    with pytest.raises(ls.BuildError, match="imported json from .*, not from the build's site"):
        ls.check_site(info, modules=("json",))


@pytest.mark.parametrize("text,step", [
    ("  [93/193] /usr/bin/g++ -c a.cpp\n  [94/193] /usr/bin/g++ -c b.cpp\n", "[94/193]"),
    ("-- Configuring done\n", ""),
    ("[1/5] x\n[12/15] y", "[12/15]"),
])
def test_last_build_step(text, step):
    assert ls._last_build_step(text) == step


@pytest.mark.parametrize("present,log,words,absent", [
    ({"cc", "c++"}, "", [], ["missing"]),
    (set(), "", ["a C compiler and a C++ compiler", "build-essential"], []),
    ({"gcc"}, "", ["a C++ compiler", "apt-get"], ["a C compiler and"]),
    ({"cc", "c++"}, "/bin/sh: 1: cmake: not found", ["cmake"], []),
])
def test_toolchain_hint(present, log, words, absent):
    hint = ls._toolchain_hint("linux", log, which=lambda name: f"/usr/bin/{name}" if name in present else None)
    for word in words:
        assert word in hint
    for word in absent:
        assert word not in hint


# ---- ensure_build -----------------------------------------------------------------------------------


def make_current_build(builds_dir: Path, hw: ls.Hardware) -> ls.BuildInfo:
    """A finished build folder, as ensure_build would leave it."""
    info = ls.build_info(builds_dir, hw)
    (info.site / "llama_cpp").mkdir(parents=True)
    (info.site / "llama_cpp" / "__init__.py").write_text("")
    (info.dir / "build.json").write_text(json.dumps({
        "key": info.key, "cmake_args": list(info.cmake_args), "wheel": "llama_cpp_python-x.whl",
        "llama_cpp_python": ls.LLAMA_CPP_PYTHON_VERSION, "python_tag": hw.python_tag}))
    return info


FAKE_PIP = textwrap.dedent("""\
    # A stand-in for pip: records each call next to itself and makes the files pip would make.
    import json, os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    here = Path(__file__).parent
    with open(here / "calls.jsonl", "a") as log:
        log.write(json.dumps({"args": args, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS"),
                              "PARALLEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL")}) + "\\n")
    def after(flag):
        return args[args.index(flag) + 1]
    if args[0] == os.environ.get("FAKE_PIP_HANG"):
        # Like a compile cut short: half its output written, a grandchild (cmake, cc) that ignores
        # SIGTERM, then a hang; pids.json says who is running.
        import signal, subprocess
        out = Path(after("-w") if args[0] == "wheel" else after("--target"))
        (out / "llama_cpp").mkdir(parents=True, exist_ok=True)
        (out / "llama_cpp" / "__init__.py").write_text("# half")
        (out / "llama_cpp_python-0.3.36-py3-none-any.whl").write_bytes(b"half")
        grandchild = subprocess.Popen(["sleep", "300"],
                                      preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
        (here / "pids.tmp").write_text(json.dumps({"pip": os.getpid(), "grandchild": grandchild.pid}))
        os.replace(here / "pids.tmp", here / "pids.json")
        time.sleep(300)
    elif args[0] == "download":
        Path(after("-d"), "llama_cpp_python-0.3.36.tar.gz").write_bytes(b"sdist")
    elif args[0] == "wheel":
        time.sleep(float(os.environ.get("FAKE_PIP_SLEEP", "0")))
        print("[1/2] fake compile", flush=True)
        Path(after("-w")).mkdir(parents=True, exist_ok=True)
        Path(after("-w"), "llama_cpp_python-0.3.36-py3-none-any.whl").write_bytes(b"wheel")
    elif args[0] == "install":
        Path(after("--target"), "llama_cpp").mkdir(parents=True)
        Path(after("--target"), "llama_cpp", "__init__.py").write_text("")
    """)


def fake_tool(tmp_path, name, source, pick=lambda call: call):
    """A Python stand-in for a build tool: (its argv, the calls it got so far, each through
    `pick`). The script appends each call to calls.jsonl beside it."""
    script = tmp_path / f"fake{name}" / f"{name}.py"
    script.parent.mkdir()
    script.write_text(source)
    calls = script.parent / "calls.jsonl"
    return (sys.executable, str(script)), lambda: [pick(json.loads(line)) for line in
                                                   calls.read_text().splitlines()] \
        if calls.exists() else []


@pytest.fixture
def fake_pip(tmp_path):
    return fake_tool(tmp_path, "pip", FAKE_PIP)


def test_reuse_never_calls_pip(tmp_path):
    hw = hardware()
    made = make_current_build(tmp_path / "builds", hw)
    marker = tmp_path / "pip-was-called"
    pip = (sys.executable, "-c", f"open({str(marker)!r}, 'w'); raise SystemExit('pip must not run')")
    info = ls.ensure_build(tmp_path / "builds", hw, progress=lambda line: None, pip=pip)
    assert not marker.exists()
    assert info.key == made.key and info.site == made.site
    assert info.wheel == made.dir / "wheels" / "llama_cpp_python-x.whl"
    assert (info.backend, info.gpu, info.cmake_args) == ("cpu", False, made.cmake_args)


@pytest.mark.parametrize("change", [
    {"cmake_args": ["-DGGML_NATIVE=OFF", "-DGGML_CUDA=on"]},
    {"llama_cpp_python": "0.3.1"},
    {"python_tag": "cp27"},
])
def test_rebuild_when_the_record_differs(tmp_path, fake_pip, change):
    pip, calls = fake_pip
    hw = hardware(cores=3)
    info = make_current_build(tmp_path / "builds", hw)
    record = json.loads((info.dir / "build.json").read_text())
    (info.dir / "build.json").write_text(json.dumps({**record, **change}))
    built = ls.ensure_build(tmp_path / "builds", hw, progress=lambda line: None, pip=pip)
    kinds = [call["args"][0] for call in calls()]
    assert kinds == ["download", "wheel", "install"]
    wheel_call = calls()[1]
    assert wheel_call["CMAKE_ARGS"] == " ".join(ls.cmake_args(hw))
    assert wheel_call["PARALLEL"] == "3"
    assert "--no-cache-dir" in wheel_call["args"]
    assert calls()[2]["args"][-2:] == ["httpx", "psutil"]
    assert json.loads((info.dir / "build.json").read_text())["cmake_args"] == ls.cmake_args(hw)
    assert built.wheel == info.dir / "wheels" / "llama_cpp_python-0.3.36-py3-none-any.whl"
    assert (tmp_path / "builds" / "sdist" / "llama_cpp_python-0.3.36.tar.gz").read_bytes() == b"sdist"


@pytest.mark.parametrize("wheel, other_args, reused", [
    ("llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl", None, True),
    ("llama_cpp_python-0.3.36-cp312-cp312-linux_x86_64.whl", None, False),   # tied to its Python
    ("llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl", ["-DGGML_CUDA=on"], False),
])
def test_another_pythons_compiled_wheel_is_reused(tmp_path, fake_pip, wheel, other_args, reused):
    """A second Python on the same machine installs the llama.cpp compiled for the first one
    (the wheel is Python-free): no download, no compile; only its own site folder."""
    pip, calls = fake_pip
    hw = hardware()
    other = make_current_build(tmp_path / "builds", dataclasses.replace(hw, python_tag="cp312"))
    record = json.loads((other.dir / "build.json").read_text())
    (other.dir / "build.json").write_text(json.dumps(
        {**record, "wheel": wheel, **({"cmake_args": other_args} if other_args else {})}))
    (other.dir / "wheels").mkdir()
    (other.dir / "wheels" / wheel).write_bytes(b"compiled once")
    lines = []
    built = ls.ensure_build(tmp_path / "builds", hw, progress=lines.append, pip=pip)
    kinds = [call["args"][0] for call in calls()]
    record = json.loads((built.dir / "build.json").read_text())
    assert built.dir != other.dir and record["python_tag"] == hw.python_tag
    if reused:
        assert kinds == ["install"]
        assert built.wheel == built.dir / "wheels" / wheel
        assert built.wheel.read_bytes() == b"compiled once"
        assert record["wheel_compiled_for"] == other.key
        assert any("already compiled" in line and other.key in line for line in lines)
    else:
        assert kinds == ["download", "wheel", "install"]
        assert record["wheel_compiled_for"] is None


def test_two_starts_at_once_build_once(tmp_path, fake_pip, monkeypatch):
    pip, calls = fake_pip
    monkeypatch.setenv("FAKE_PIP_SLEEP", "1.0")
    hw, lines, results = hardware(), [], []

    def start():
        results.append(ls.ensure_build(tmp_path / "b", hw, progress=lines.append, pip=pip))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [call["args"][0] for call in calls()].count("wheel") == 1
    assert len(results) == 2 and results[0] == results[1]
    assert any("waiting" in line for line in lines)


# ---- a build cut short leaves no process behind --------------------------------------------------

# A daemon's first start reduced to its build: ensure_build in the main thread with the fake pip.
BUILD_SCRIPT = textwrap.dedent("""\
    import json, sys
    root, builds, pip = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.path.insert(0, root)
    import local_swarm as ls
    hw = ls.Hardware(os="linux", arch="x86_64", python_tag=f"cp{sys.version_info.major}"
                     f"{sys.version_info.minor}", cpu_model="test", cpu_flags=frozenset(),
                     physical_cores=2, logical_cores=2, ram_total=2**30, ram_available=2**30,
                     backend="cpu", vram_bytes=0)
    ls.ensure_build(builds, hw, pip=pip, progress_every=0.1)
    """)


def gone(pid: int) -> bool:
    """True when pid has exited (a zombie waiting for init to reap it has exited too)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def hanging_pip(fake_pip, monkeypatch):
    """The fake pip, set to hang in a step; yields (pip argv, the step's pids once running).
    Whatever a failed test leaves running is killed afterwards."""
    pip, _ = fake_pip
    pids_file = Path(pip[1]).parent / "pids.json"

    def pids() -> dict[str, int]:
        return json.loads(pids_file.read_text()) if pids_file.exists() else {}

    yield pip, pids
    for pid in pids().values():
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


def start_build_daemon(tmp_path: Path, pip, hang: str) -> subprocess.Popen:
    script = tmp_path / "first_start.py"
    script.write_text(BUILD_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(ROOT), str(tmp_path / "builds"),
                             json.dumps(list(pip))], env=dict(os.environ, FAKE_PIP_HANG=hang),
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("step", ["wheel", "install"])
def test_ctrl_c_ends_the_steps_process_group_and_the_next_start_builds(tmp_path, hanging_pip,
                                                                      monkeypatch, step):
    pip, pids = hanging_pip
    hw, builds = hardware(), tmp_path / "builds"
    info = make_current_build(builds, hw)          # an older build, so site/ already exists
    record = json.loads((info.dir / "build.json").read_text())
    (info.dir / "build.json").write_text(json.dumps({**record, "llama_cpp_python": "0.3.1"}))
    monkeypatch.setenv("FAKE_PIP_HANG", step)
    pressed = []

    def ctrl_c_once_running(line):
        if pids() and not pressed:
            pressed.append(line)
            raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        ls.ensure_build(builds, hw, progress=ctrl_c_once_running, pip=pip, progress_every=0.1)
    assert set(pids()) == {"pip", "grandchild"}
    assert wait_for(lambda: all(gone(pid) for pid in pids().values()))
    assert signal.getsignal(signal.SIGTERM) is handler       # restored
    assert not (info.dir / "build.json").exists() and not ls.build_ready(builds, hw)
    monkeypatch.delenv("FAKE_PIP_HANG")
    built = ls.ensure_build(builds, hw, progress=lambda line: None, pip=pip)
    assert ls.build_ready(builds, hw)
    assert (built.site / "llama_cpp" / "__init__.py").read_text() == ""
    assert built.wheel.read_bytes() == b"wheel" and not (info.dir / "site.tmp").exists()


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM from outside is a POSIX thing")
def test_sigterm_during_the_first_start_ends_the_build_and_the_next_start_builds(tmp_path,
                                                                                hanging_pip):
    pip, pids = hanging_pip
    daemon = start_build_daemon(tmp_path, pip, hang="wheel")
    try:
        assert wait_for(lambda: bool(pids()))
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=10)
    finally:
        daemon.kill()
    assert daemon.returncode == 128 + signal.SIGTERM, err
    assert "stopped; the next start builds it again" in err
    assert wait_for(lambda: all(gone(pid) for pid in pids().values()))
    hw, builds = hardware(), tmp_path / "builds"
    assert not ls.build_ready(builds, hw)
    built = ls.ensure_build(builds, hw, progress=lambda line: None, pip=pip)
    assert ls.build_ready(builds, hw) and built.wheel.read_bytes() == b"wheel"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_sigkill_of_the_daemon_takes_pip_down(tmp_path, hanging_pip):
    """Nothing can run after SIGKILL: PR_SET_PDEATHSIG ends pip, but its children (here the
    grandchild) outlive it; the hanging_pip fixture kills that one."""
    pip, pids = hanging_pip
    daemon = start_build_daemon(tmp_path, pip, hang="wheel")
    try:
        assert wait_for(lambda: bool(pids()))
        daemon.kill()
        daemon.communicate(timeout=10)
    finally:
        daemon.kill()
    assert wait_for(lambda: gone(pids()["pip"]))
    assert not gone(pids()["grandchild"])


# ---- a real pip build of a tiny fake sdist -----------------------------------------------------------

BACKEND = textwrap.dedent('''\
    """A PEP 517 backend standing in for scikit-build-core: no compiler, no network."""
    import base64, hashlib, os, sys, time, zipfile
    NAME, VERSION, FAIL = "llama_cpp_python", "0.3.36", {fail}
    DIST = f"{{NAME}}-{{VERSION}}.dist-info"
    META = f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\nProvides-Extra: server\\n"

    def get_requires_for_build_wheel(config_settings=None):
        return []

    def prepare_metadata_for_build_wheel(directory, config_settings=None):
        os.makedirs(os.path.join(directory, DIST))
        with open(os.path.join(directory, DIST, "METADATA"), "w") as f:
            f.write(META)
        return DIST

    def build_wheel(directory, config_settings=None, metadata_directory=None):
        for n in range(1, 11):
            print(f"[{{n}}/10] compiling unit {{n}}", flush=True)
            time.sleep(0.08)
        if FAIL:
            for n in range(40):
                print(f"fake error line {{n}}", flush=True)
            sys.exit(1)
        files = {{"llama_cpp/__init__.py": "__version__ = '0.3.36'\\n",
                 "llama_cpp/cmake_args.txt": os.environ.get("CMAKE_ARGS", ""),
                 f"{{DIST}}/METADATA": META,
                 f"{{DIST}}/WHEEL": "Wheel-Version: 1.0\\nGenerator: fake\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}}
        name = f"{{NAME}}-{{VERSION}}-py3-none-any.whl"
        record = []
        with zipfile.ZipFile(os.path.join(directory, name), "w") as whl:
            for path, text in files.items():
                data = text.encode()
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                record.append(f"{{path}},sha256={{digest}},{{len(data)}}")
                whl.writestr(path, data)
            whl.writestr(f"{{DIST}}/RECORD", "\\n".join(record + [f"{{DIST}}/RECORD,,"]) + "\\n")
        return name
    ''')
PYPROJECT = textwrap.dedent("""\
    [build-system]
    requires = []
    build-backend = "fake_backend"
    backend-path = ["."]

    [project]
    name = "llama_cpp_python"
    version = "0.3.36"
    """)


def write_sdist(folder: Path, fail: bool = False) -> Path:
    """llama_cpp_python-0.3.36.tar.gz whose in-tree backend builds a pure-Python wheel."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "llama_cpp_python-0.3.36.tar.gz"
    members = {"pyproject.toml": PYPROJECT, "fake_backend.py": BACKEND.format(fail=fail),
               "PKG-INFO": "Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.3.36\n"}
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            data = text.encode()
            entry = tarfile.TarInfo(f"llama_cpp_python-0.3.36/{name}")
            entry.size = len(data)
            archive.addfile(entry, io.BytesIO(data))
    return path


@pytest.mark.e2e  # real pip
def test_real_pip_downloads_builds_and_installs(tmp_path):
    index = tmp_path / "index"
    write_sdist(index)
    hw, lines = hardware(cores=2), []
    builds = tmp_path / "builds"
    options = ("--no-index", "--find-links", str(index), "--disable-pip-version-check")
    info = ls.ensure_build(builds, hw, progress=lines.append, pip_options=options,
                           extra_packages=(), progress_every=0.25)
    assert (builds / "sdist" / "llama_cpp_python-0.3.36.tar.gz").is_file()
    assert (info.site / "llama_cpp" / "cmake_args.txt").read_text() == " ".join(ls.cmake_args(hw))
    record = json.loads((info.dir / "build.json").read_text())
    assert record["key"] == ls.build_key(hw) == info.key
    assert record["cmake_args"] == ls.cmake_args(hw)
    assert (record["llama_cpp_python"], record["python_tag"]) == ("0.3.36", PY)
    assert record["wheel"] == info.wheel.name and info.wheel.is_file()
    assert record["seconds"] > 0 and record["built_at"]
    assert not (info.dir / "site.tmp").exists()
    log = (info.dir / "build.log").read_text()
    assert "[10/10] compiling unit 10" in log
    text = "\n".join(lines)
    for phase in ("downloading", "compiling llama.cpp", "installing", "ready in"):
        assert phase in text
    assert "step [" in text   # a periodic line quoted the compiler's progress
    assert re.search(r"^  compiling llama\.cpp: \d+ s(, step \[\d+/10\])?$", text, re.M)   # elapsed
    again = ls.ensure_build(builds, hw, progress=lines.append, pip=("false",))
    assert again == info


def test_a_missing_pip_is_a_build_error(tmp_path):
    with pytest.raises(ls.BuildError, match="cannot run"):
        ls.ensure_build(tmp_path, hardware(), progress=lambda line: None,
                        pip=(str(tmp_path / "no-such-python"), "-m", "pip"))
    assert not list((tmp_path / "sdist").iterdir())   # no half-made download left behind


@pytest.mark.e2e  # real pip
def test_failed_build_raises_with_log_tail(tmp_path):
    builds = tmp_path / "builds"
    write_sdist(builds / "sdist", fail=True)
    hw = hardware()
    with pytest.raises(ls.BuildError) as caught:
        ls.ensure_build(builds, hw, progress=lambda line: None,
                        pip_options=("--no-index", "--disable-pip-version-check"), extra_packages=())
    message = str(caught.value)
    log_path = builds / ls.build_key(hw) / "build.log"
    assert "compiling llama.cpp failed" in message
    assert str(log_path) in message
    assert "fake error line 39" in message   # the log's tail is quoted
    assert "fake error line 0\n" not in message   # ... only the tail
    assert not (builds / ls.build_key(hw) / "build.json").exists()
    assert not ls.build_ready(builds, hw)


# ---- ensure_native: llama.cpp's own llama-server ------------------------------------------------


def test_native_cmake_args_are_the_wheels_hardware_flags_plus_the_server_switches():
    avx2 = dataclasses.replace(hardware(), cpu_flags=frozenset(ls.AVX2_LEVEL_FLAGS))
    assert ls.native_cmake_args(avx2) == [   # the hand run that built llama-server here
        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", *AVX2_ARGS, "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF",
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN"]
    cuda = ls.native_cmake_args(hardware(backend="cuda"))
    assert "-DGGML_CUDA=on" in cuda and SSE42_ARGS[0] in cuda
    assert not [arg for arg in cuda if "LLAVA" in arg]
    mac = dataclasses.replace(hardware(backend="metal", arch="arm64"), os="darwin")
    assert ls.native_cmake_args(mac)[-1] == "-DCMAKE_INSTALL_RPATH=@loader_path"


FAKE_CMAKE = textwrap.dedent("""\
    # A stand-in for cmake: records each call next to itself; configuring checks the extracted
    # source, building writes bin/llama-server and a library with its symlink, or fails
    # (FAKE_CMAKE_FAIL) or hangs (FAKE_CMAKE_HANG, after writing its pid to pid.txt).
    import json, os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    here = Path(__file__).parent
    with open(here / "calls.jsonl", "a") as log:
        log.write(json.dumps({"args": args}) + "\\n")
    if args[0] != "--build":
        source = Path(args[args.index("-S") + 1])
        assert (source / "tools" / "server" / "server.cpp").read_text() == "int main() {}\\n"
        Path(args[args.index("-B") + 1]).mkdir(parents=True)
        print("-- Configuring done", flush=True)
        sys.exit(0)
    print("[1/2] Building CXX object tools/server/server.cpp.o", flush=True)
    if os.environ.get("FAKE_CMAKE_FAIL"):
        for n in range(40):
            print(f"fake compiler error {n}", flush=True)
        sys.exit(2)
    if os.environ.get("FAKE_CMAKE_HANG"):
        (here / "pid.txt").write_text(str(os.getpid()))
        time.sleep(300)
    bin = Path(args[1]) / "bin"
    bin.mkdir(parents=True, exist_ok=True)
    (bin / "llama-server").write_text("#!/bin/sh\\necho fake llama-server\\n")
    (bin / "libllama.so.0.5.0").write_bytes(b"fake library")
    os.symlink("libllama.so.0.5.0", bin / "libllama.so.0")
    (bin / "notes.txt").write_text("not part of the server")
    print("[2/2] Linking CXX executable bin/llama-server", flush=True)
    """)


def write_native_sdist(builds: Path, extra: dict[str, str] | None = None) -> Path:
    """The sdist in builds/sdist, holding a tiny vendor/llama.cpp (and `extra` members)."""
    top = "llama_cpp_python-0.3.36"
    members = {f"{top}/pyproject.toml": PYPROJECT,
               f"{top}/vendor/llama.cpp/CMakeLists.txt": "project(llama.cpp)\n",
               f"{top}/vendor/llama.cpp/tools/server/server.cpp": "int main() {}\n",
               f"{top}/llama_cpp/__init__.py": "", **(extra or {})}
    (builds / "sdist").mkdir(parents=True, exist_ok=True)
    path = builds / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(text.encode()), 0o644
            archive.addfile(entry, io.BytesIO(text.encode()))
    return path


@pytest.fixture
def fake_cmake(tmp_path):
    """(cmake argv, the arguments of the calls it got so far)."""
    return fake_tool(tmp_path, "cmake", FAKE_CMAKE, lambda call: call["args"])


NEVER = (sys.executable, "-c", "raise SystemExit('must not run')")


def native_build(builds: Path, hw: ls.Hardware, cmake, **kw) -> ls.NativeBuild:
    """ensure_native with the given cmake, and a pip that must not run (the sdist is there)."""
    kw.setdefault("progress", lambda line: None)
    return ls.ensure_native(ls.build_info(builds, hw), hw, builds, cmake=cmake, pip=NEVER, **kw)


def test_native_build_compiles_once_then_reuses(tmp_path, fake_cmake):
    cmake, calls = fake_cmake
    builds, hw, lines = tmp_path / "builds", hardware(cores=3), []
    write_native_sdist(builds)
    build = ls.build_info(builds, hw)
    assert ls.native_ready(build, hw) is None
    native = native_build(builds, hw, cmake, progress=lines.append, progress_every=0.05)
    assert native == ls.NativeBuild(dir=build.dir / "native",
                                    binary=build.dir / "native" / "llama-server",
                                    cmake_args=tuple(ls.native_cmake_args(hw)))
    assert native == ls.native_ready(build, hw)
    configure, compile_ = calls()
    work = (build.dir / "native-work").resolve()
    assert configure[:4] == ["-S", str(work / "src"), "-B", str(work / "build")]
    assert configure[4:] == (["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja')}"]
                             if shutil.which("ninja") else []) + ls.native_cmake_args(hw) + [
        f"-DCMAKE_{lang}_FLAGS=-ffile-prefix-map={work / 'src'}=llama.cpp "
        f"-ffile-prefix-map={work / 'build'}=build" for lang in ("C", "CXX")]
    assert compile_ == ["--build", str(work / "build"), "--target", "llama-server", "--config",
                        "Release", "-j", "3"]
    assert sorted(path.name for path in native.dir.iterdir()) == [
        "libllama.so.0", "libllama.so.0.5.0", "llama-server", "native.json"]
    assert os.readlink(native.dir / "libllama.so.0") == "libllama.so.0.5.0"   # a symlink still
    record = json.loads((native.dir / "native.json").read_text())
    assert record["cmake_args"] == ls.native_cmake_args(hw) and record["compiled_for"] == build.key
    assert record["llama_cpp_python"] == ls.LLAMA_CPP_PYTHON_VERSION and record["seconds"] >= 0
    assert sorted(path.name for path in build.dir.iterdir()) == ["native", "native-build.log"]
    assert "[2/2] Linking CXX executable" in (build.dir / "native-build.log").read_text()
    text = "\n".join(lines)
    assert "compiling llama-server" in text and "ready in" in text
    assert ls.native_ready(build, hw) == native_build(builds, hw, NEVER) == native
    assert len(calls()) == 2                                   # the second call compiled nothing
    assert f"llama-server in {native.dir}: ready" in ls.doctor_report(hw, build.key, None, None,
                                                                      builds_dir=builds)


@pytest.mark.parametrize("change", [
    {"cmake_args": ["-DGGML_NATIVE=OFF"]}, {"llama_cpp_python": "0.3.1"}, "no binary"])
def test_native_build_is_rebuilt_when_its_record_differs(tmp_path, fake_cmake, change):
    cmake, calls = fake_cmake
    builds, hw = tmp_path / "builds", hardware()
    write_native_sdist(builds)
    native = native_build(builds, hw, cmake)
    if change == "no binary":
        native.binary.unlink()
    else:
        record = json.loads((native.dir / "native.json").read_text())
        (native.dir / "native.json").write_text(json.dumps({**record, **change}))
    assert ls.native_ready(ls.build_info(builds, hw), hw) is None
    assert native_build(builds, hw, cmake) == native and len(calls()) == 4
    assert native.binary.read_text().startswith("#!/bin/sh")


@pytest.mark.parametrize("other_backend, copied", [("cpu", True), ("vulkan", False)])
def test_another_keys_native_build_is_copied_not_compiled(tmp_path, fake_cmake, other_backend,
                                                           copied):
    """llama-server does not depend on Python: a second Python's key copies the first one's."""
    cmake, calls = fake_cmake
    builds, hw = tmp_path / "builds", hardware()
    write_native_sdist(builds)
    first = native_build(builds, dataclasses.replace(hw, python_tag="cp312", backend=other_backend),
                         cmake)
    lines: list[str] = []
    second = native_build(builds, hw, NEVER if copied else cmake, progress=lines.append)
    assert second.dir != first.dir and second == ls.native_ready(ls.build_info(builds, hw), hw)
    record = json.loads((second.dir / "native.json").read_text())
    if copied:
        assert len(calls()) == 2 and record["compiled_for"] == first.dir.parent.name
        assert any("already compiled" in line for line in lines)
        assert os.readlink(second.dir / "libllama.so.0") == "libllama.so.0.5.0"
        assert record["key"] == ls.build_key(hw)
    else:
        assert len(calls()) == 4 and record["compiled_for"] == ls.build_key(hw)


def test_failed_native_compile_raises_with_log_tail_and_leaves_no_record(tmp_path, fake_cmake,
                                                                        monkeypatch):
    cmake, _ = fake_cmake
    builds, hw = tmp_path / "builds", hardware()
    write_native_sdist(builds)
    native = native_build(builds, hw, cmake)
    record = json.loads((native.dir / "native.json").read_text())
    (native.dir / "native.json").write_text(json.dumps({**record, "llama_cpp_python": "0.3.1"}))
    monkeypatch.setenv("FAKE_CMAKE_FAIL", "1")
    with pytest.raises(ls.BuildError) as caught:
        native_build(builds, hw, cmake)
    message, log = str(caught.value), native.dir.parent / "native-build.log"
    assert "compiling llama-server failed (exit status 2)" in message and str(log) in message
    assert "fake compiler error 39" in message and "fake compiler error 0\n" not in message
    assert not (native.dir / "native.json").exists()
    assert ls.native_ready(ls.build_info(builds, hw), hw) is None
    assert not (native.dir.parent / "native-work").exists()
    assert not (native.dir.parent / "native.tmp").exists()


def test_ctrl_c_during_the_native_compile_ends_it_and_the_next_start_builds(tmp_path, fake_cmake,
                                                                           monkeypatch):
    cmake, _ = fake_cmake
    builds, hw = tmp_path / "builds", hardware()
    write_native_sdist(builds)
    pid_file = Path(cmake[1]).parent / "pid.txt"
    monkeypatch.setenv("FAKE_CMAKE_HANG", "1")

    def ctrl_c_once_running(line):
        if pid_file.exists() and not pressed:
            pressed.append(line)
            raise KeyboardInterrupt

    pressed: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        native_build(builds, hw, cmake, progress=ctrl_c_once_running, progress_every=0.1)
    assert wait_for(lambda: gone(int(pid_file.read_text())))
    folder = ls.build_info(builds, hw).dir
    assert not (folder / "native-work").exists() and not (folder / "native").exists()
    monkeypatch.delenv("FAKE_CMAKE_HANG")
    assert native_build(builds, hw, cmake).binary.is_file()


@pytest.mark.parametrize("member", [
    "llama_cpp_python-0.3.36/vendor/llama.cpp/../../../escaped.txt",
    "/llama_cpp_python-0.3.36/vendor/llama.cpp/absolute.txt"])
def test_native_source_extraction_refuses_members_escaping_the_target(tmp_path, fake_cmake,
                                                                      member):
    cmake, calls = fake_cmake
    builds, hw = tmp_path / "builds", hardware()
    write_native_sdist(builds, {member: "evil"})
    with pytest.raises(ls.BuildError, match="points outside its folder"):
        native_build(builds, hw, cmake)
    assert calls() == [] and not list(tmp_path.rglob("escaped.txt"))
    assert not (ls.build_info(builds, hw).dir / "native-work").exists()


def test_native_source_extraction_refuses_links(tmp_path):
    sdist = tmp_path / "s.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        link = tarfile.TarInfo("top/vendor/llama.cpp/CMakeLists.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(ls.BuildError, match="is a link"):
        ls._extract_llama_cpp(sdist, tmp_path / "out")
    assert not (tmp_path / "out" / "CMakeLists.txt").exists()


FAKE_TOOLS_PIP = textwrap.dedent("""\
    # pip installing cmake and ninja: each a shell script that runs the fake cmake (ninja: true).
    import json, sys
    from pathlib import Path
    args, here = sys.argv[1:], Path(__file__).parent
    with open(here / "pip-calls.jsonl", "a") as log:
        log.write(json.dumps(args) + "\\n")
    target = Path(args[args.index("--target") + 1])
    for path, text in {"cmake/data/bin/cmake": f'exec {sys.executable} {here / "cmake.py"} "$@"',
                       "bin/ninja": "exit 0"}.items():
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        (target / path).write_text("#!/bin/sh\\n" + text + "\\n")
        (target / path).chmod(0o755)
    """)


@pytest.fixture
def no_cmake_on_path(tmp_path, fake_cmake, monkeypatch):
    """PATH without cmake, ninja or compilers ($CC and $CXX name them); yields (pip argv, the
    calls pip got) for a pip that installs the fake cmake."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("CC", "/usr/bin/cc")
    monkeypatch.setenv("CXX", "/usr/bin/c++")
    script = Path(fake_cmake[0][1]).parent / "pip.py"
    script.write_text(FAKE_TOOLS_PIP)
    calls = script.parent / "pip-calls.jsonl"
    yield (sys.executable, str(script)), lambda: [json.loads(line) for line in
                                                  calls.read_text().splitlines()] \
        if calls.exists() else []


@pytest.mark.skipif(os.name != "posix", reason="the fake tools are shell scripts")
def test_without_cmake_on_path_pip_installs_cmake_and_ninja_once(tmp_path, fake_cmake,
                                                                no_cmake_on_path):
    pip, pip_calls = no_cmake_on_path
    _, calls = fake_cmake
    builds, hw = tmp_path / "builds", hardware()
    write_native_sdist(builds)
    build = ls.build_info(builds, hw)
    native = ls.ensure_native(build, hw, builds, progress=lambda line: None, pip=pip)
    tools = builds / "tools"
    assert pip_calls() == [["install", "--target", str(tools.with_name(f"tools.{os.getpid()}.tmp")),
                            "cmake", "ninja"]]
    assert calls()[0][4:7] == ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tools / 'bin' / 'ninja'}"]
    assert native.binary.is_file() and not list(builds.glob("tools.*"))
    record = json.loads((native.dir / "native.json").read_text())
    (native.dir / "native.json").write_text(json.dumps({**record, "cmake_args": []}))
    ls.ensure_native(build, hw, builds, progress=lambda line: None, pip=pip)
    assert len(pip_calls()) == 1 and len(calls()) == 4    # the tools were installed once


NATIVE_SERVE_TIMEOUT = 120   # seconds for llama-server to load SmolLM2-135M on a loaded 2-core box


@pytest.mark.e2e  # compiles llama-server (~5 min on 2 cores) unless llama_builds/ holds it already
def test_real_native_build_serves_two_completions_from_one_request(smol_model_path, tmp_path):
    """ensure_native for this machine into the real llama_builds/, then the binary itself on
    SmolLM2-135M: /health turns 200, and one /v1/completions request with n=2 gets two choices."""
    hw, lines = ls.detect_hardware(), []
    build = ls.build_info(ls.DEFAULT_BUILDS_DIR, hw)
    native = ls.ensure_native(build, hw, ls.DEFAULT_BUILDS_DIR, progress=lines.append,
                              progress_every=60)
    print("\n" + "\n".join(lines))
    assert native == ls.native_ready(build, hw)
    assert ls.find_path_references(native.dir, {str(ROOT), str(build.dir.resolve())}) == []
    port, log = ls.free_port(), tmp_path / "llama-server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(native.binary), "-m", str(smol_model_path), "--host",
                                   "127.0.0.1", "--port", str(port), "-np", "2", "-c", "2048",
                                   "-t", "2"], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: server.poll() is not None or health(url) == 200,
                        NATIVE_SERVE_TIMEOUT), log.read_text()[-3000:]
        assert server.poll() is None, log.read_text()[-3000:]
        reply = httpx.post(url + "/v1/completions", timeout=NATIVE_SERVE_TIMEOUT, json={
            "prompt": "Once upon a time", "max_tokens": 8, "n": 2, "temperature": 0.8})
        assert reply.status_code == 200, reply.text
        choices = reply.json()["choices"]
        assert sorted(choice["index"] for choice in choices) == [0, 1]
        assert all(isinstance(choice["text"], str) for choice in choices)
    finally:
        server.kill()
        server.wait()


def health(url: str) -> int:
    """GET /health's status, 0 while nothing answers."""
    try:
        return httpx.get(url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0
