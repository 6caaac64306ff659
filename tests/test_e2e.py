"""End to end: the daemon as a user runs it, two real llama.cpp workers on SmolLM2-135M, real sockets.
Clients: httpx and the openai SDK."""
from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import struct
import subprocess
import threading
import time

import httpx
import openai
import psutil
import pytest

from conftest import ROOT, TEST_MODEL, start_swarm

pytestmark = pytest.mark.e2e  # every test runs real daemons (see conftest)

HELLO = [{"role": "user", "content": "Say hello in one word."}]


def sdk(swarm, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=swarm.url + "/v1", api_key=kw.pop("api_key", "unused"),
                         max_retries=0, timeout=120, **kw)


# -- routes ----------------------------------------------------------------------------------------

def test_models_lists_swarm_and_model(swarm):
    ids = [m.id for m in sdk(swarm).models.list().data]
    assert ids[0] == "local-swarm"
    assert len(ids) == 2 and "smol" in ids[1].lower()


def chromium_flags(profile) -> list[str]:
    """Headless Debian chromium (.ci/run installs it), with no traffic beyond loopback."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "the status page test needs a chromium: apt-get install chromium (Debian)"
    return [path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}",
            "--virtual-time-budget=5000"]


def test_status_page_in_a_headless_browser_lists_the_workers_and_the_last_vote(swarm, tmp_path):
    """The page at / renders in a real browser: its script fetches the status and lists every
    worker and the vote just answered; a screenshot of it is a real PNG (kept under tmp_path)."""
    sdk(swarm).chat.completions.create(model="local-swarm", messages=HELLO, max_tokens=4)
    flags = chromium_flags(tmp_path / "profile")
    dom = subprocess.run([*flags, "--dump-dom", swarm.url + "/"], capture_output=True,
                         text=True, timeout=120).stdout
    workers = [d["id"] for d in swarm.health()["details"]]
    body = dom[dom.index('<tbody id="workers">'):dom.index('<tbody id="votes">')]
    assert all(f"<td>{worker}</td>" in body for worker in workers), dom[:2000]
    votes = dom[dom.index('<tbody id="votes">'):]
    assert "none yet" not in votes.split("</tbody>")[0] and "<td>vote</td>" in votes
    assert swarm.url + "/v1" in dom                                  # how to connect
    shot = tmp_path / "status.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1100,800", swarm.url + "/"],
                   capture_output=True, timeout=120, check=True)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_models_and_props_give_the_context_for_clients_that_probe(swarm):
    """The context each conversation gets (--ctx 2048) and the model's trained context, in
    /v1/models entries and in llama.cpp's GET /props."""
    models = httpx.get(swarm.url + "/v1/models").json()["data"]
    assert all(m["context_length"] == 2048 for m in models)
    assert all(m["meta"]["n_ctx_train"] >= 2048 for m in models)
    props = httpx.get(swarm.url + "/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 2048
    assert props["total_slots"] == 2 and props["chat_template"]


def test_health_reports_workers_and_version(swarm):
    for path in ("/health", "/v1/health"):
        body = httpx.get(swarm.url + path).json()
        assert body["status"] == "healthy"
        assert body["workers"] == {"healthy": 2, "total": 2}
        assert body["version"] and body["model"]


# -- chat ------------------------------------------------------------------------------------------

def test_chat_whole_reply_with_worker_counted_usage(swarm):
    reply = sdk(swarm).chat.completions.create(model="local-swarm", messages=HELLO, max_tokens=12,
                                               temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == "local-swarm"
    assert 0 < reply.usage.completion_tokens <= 12
    # the prompt is the rendered chat template: SmolLM2's adds a default system prompt,
    # so the count is far above a length/4 guess of the user's text
    assert reply.usage.prompt_tokens > 15
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_metrics_show_the_swarms_figures_and_llama_servers_own(swarm):
    sdk(swarm).chat.completions.create(model="x", messages=HELLO, max_tokens=2, temperature=0)
    text = httpx.get(swarm.url + "/metrics").text
    assert 'local_swarm_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "local_swarm_vote_candidates_count" in text and "local_swarm_up 1" in text
    own = 'llamacpp:prompt_tokens_total{worker="worker-1"}'
    assert (own in text) is (swarm.kind == "native")     # llama-cpp-python's server has none


def test_completions_through_the_openai_sdk_whole_and_streamed(swarm):
    client = sdk(swarm)
    whole = client.completions.create(model="local-swarm", prompt="The capital of France is",
                                      max_tokens=5, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert 0 < whole.usage.completion_tokens <= 5 and whole.usage.prompt_tokens >= 4
    pieces = list(client.completions.create(model="local-swarm", prompt="The capital of France is",
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(p.choices[0].text for p in pieces if p.choices)
    assert text == whole.choices[0].text                       # greedy: the same words
    assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_embeddings_through_the_openai_sdk_from_the_chat_models_own_process(swarm):
    """Native: a llama-server of its own, started when first asked, gives unit vectors in
    which two sentences that say the same are closer than an unrelated one; base64 carries the
    same floats. Python kind: a 400 that says why."""
    client = sdk(swarm)
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.",
             "Quarterly revenue grew by ten percent."]
    if swarm.kind == "python":
        with pytest.raises(openai.BadRequestError, match="native"):
            client.embeddings.create(model="local-swarm", input=texts)
        return
    reply = client.embeddings.create(model="local-swarm", input=texts, encoding_format="float")
    a, b, c = (d.embedding for d in reply.data)
    dot = lambda x, y: sum(i * j for i, j in zip(x, y))    # noqa: E731
    assert len(a) == 576 and abs(dot(a, a) - 1) < 1e-3     # SmolLM2-135M's width, unit length
    assert dot(a, b) > dot(a, c) + 0.1
    assert reply.usage.prompt_tokens > 10
    raw = httpx.post(swarm.url + "/v1/embeddings", timeout=60,
                     json={"input": texts[0], "encoding_format": "base64"}).json()
    floats = struct.unpack(f"<{len(a)}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(x - y) for x, y in zip(floats, a)) < 1e-6
    with pytest.raises(openai.BadRequestError):                   # longer than EMBED_CTX
        client.embeddings.create(model="local-swarm", input="word " * 3000)
    assert len(client.embeddings.create(model="x", input="still serving").data) == 1


def test_llama_cpps_completion_route_streams_in_its_own_shape(swarm):
    with httpx.stream("POST", swarm.url + "/completion", timeout=120, json={
            "prompt": "The capital of France is", "n_predict": 4, "stream": True,
            "temperature": 0}) as reply:
        assert reply.status_code == 200
        chunks = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
    assert chunks[-1]["stop"] is True and all(c["stop"] is False for c in chunks[:-1])
    assert "".join(c["content"] for c in chunks) and chunks[-1]["tokens_predicted"] <= 4


def test_a_completion_longer_than_the_context_is_400(swarm):
    r = httpx.post(swarm.url + "/v1/completions", timeout=60, json={
        "prompt": "lorem ipsum dolor " * 1200, "max_tokens": 4, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_a_suffix_for_a_model_without_fim_tokens_is_400(swarm):
    """SmolLM2 has no fill-in-the-middle tokens (llama-server says so); the python kind cannot
    fill in the middle at all: a clear 400 either way, never a 5xx."""
    r = httpx.post(swarm.url + "/v1/completions", timeout=60, json={
        "prompt": "def add(a, b):\n    return ", "suffix": "\n", "max_tokens": 4})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert ("not supported by this model" in message) if swarm.kind == "native" \
        else ("native worker kind" in message)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_come_from_the_workers_through_the_openai_sdk(swarm, stream):
    client = sdk(swarm)
    kw = dict(model="x", messages=HELLO, max_tokens=4, temperature=0, logprobs=True,
              top_logprobs=2)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        content = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        entries = content[-1].content
    else:
        entries = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert 1 <= len(entries) <= 4
    assert all(e.logprob <= 0 and len(e.top_logprobs) <= 2 for e in entries)
    assert entries[0].top_logprobs and entries[0].top_logprobs[0].logprob >= entries[0].logprob


def test_logit_bias_reaches_the_workers(swarm):
    """A +100 bias on one token makes every generated token that one, on either kind: the
    swarm passes OpenAI's logit_bias (token id -> bias) through."""
    port = swarm.health()["details"][0]["port"]
    if swarm.kind == "native":
        ids = httpx.post(f"http://127.0.0.1:{port}/tokenize", json={"content": " banana"}).json()
        token = ids["tokens"][-1]
    else:
        ids = httpx.post(f"http://127.0.0.1:{port}/extras/tokenize",
                         json={"input": " banana"}).json()
        token = ids["tokens"][-1]
    reply = sdk(swarm).chat.completions.create(model="x", messages=HELLO, max_tokens=4,
                                               temperature=0, logit_bias={str(token): 100})
    text = reply.choices[0].message.content
    assert "banana" in text and text.count("banana") >= 3, text


def test_max_tokens_gives_length_and_exact_count(swarm):
    reply = sdk(swarm).chat.completions.create(
        model="local-swarm", max_tokens=5, temperature=0,
        messages=[{"role": "user", "content": "Count from one to fifty in words."}])
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_stream_deltas_match_whole_reply(swarm):
    client = sdk(swarm)
    kw = dict(model="local-swarm", messages=HELLO, max_tokens=16, temperature=0, seed=7)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len({c.id for c in chunks}) == 1


def test_stream_include_usage_last_chunk(swarm):
    chunks = list(sdk(swarm).chat.completions.create(
        model="local-swarm", messages=HELLO, max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_framing(swarm):
    with httpx.stream("POST", swarm.url + "/v1/chat/completions", timeout=60,
                      json={"messages": HELLO, "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["transfer-encoding"] == "chunked"
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e and not e.startswith(":")]   # ":" = keep-alive
    assert events[-1] == "data: [DONE]"
    for event in events[:-1]:
        assert event.startswith("data: ")
        assert json.loads(event[6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("content", [None, [{"type": "text", "text": "Say hi."}],
                                     [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]])
def test_content_shapes_render_on_a_template_that_concatenates(swarm, content):
    messages = [{"role": "system", "content": content}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None}, {"role": "user", "content": "Again"}]
    r = httpx.post(swarm.url + "/v1/chat/completions", timeout=60,
                   json={"messages": messages, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def test_tools_present_still_stream(swarm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    chunks = list(sdk(swarm).chat.completions.create(model="local-swarm", messages=HELLO,
                                                     max_tokens=8, stream=True, tools=tools))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert all(c.choices[0].delta.tool_calls is None or isinstance(c.choices[0].delta.tool_calls, list)
               for c in chunks if c.choices)


# -- errors ----------------------------------------------------------------------------------------

BAD_BODIES = [
    (b"{not json", "invalid_json", None),
    (b"[]", "invalid_value", None),
    (b'{"messages": []}', "invalid_value", "messages"),
    (b'{"messages": "hi"}', "invalid_value", "messages"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "invalid_value", "messages[0]"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "invalid_value", "messages[0]"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "unsupported_content",
     "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', "invalid_value", "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "invalid_value", "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "invalid_value", "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}', "invalid_value", "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": true}', "invalid_value", "top_p"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": [1]}', "invalid_value", "stop"),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": 1.5}', "invalid_value", "seed"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 17}', "invalid_value", "n"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "invalid_value", "stream"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"x": 1}]}', "invalid_value", "tools"),
]


@pytest.mark.parametrize("body,code,param", BAD_BODIES)
def test_bad_bodies_get_400_in_openai_shape(swarm, body, code, param):
    r = httpx.post(swarm.url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["code"] == code and error["param"] == param


def test_unknown_route_and_method(swarm):
    r = httpx.get(swarm.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(swarm.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert httpx.get(swarm.url + "/v1/models/local-swarm").json()["id"] == "local-swarm"
    assert httpx.get(swarm.url + "/v1/models/gpt-9").status_code == 404


def test_context_overflow_is_400_before_generation(swarm):
    long_text = "The quick brown fox jumps over the lazy dog. " * 300     # ~3,000 tokens > 2048
    chats_before = worker_chat_calls(swarm)
    with pytest.raises(openai.BadRequestError) as info:
        sdk(swarm).chat.completions.create(model="local-swarm", stream=True,
                                           messages=[{"role": "user", "content": long_text}])
    assert info.value.code == "context_length_exceeded"
    assert "2048" in info.value.message and "tokens" in info.value.message
    assert worker_chat_calls(swarm) == chats_before       # refused on the count: no generation
    assert sdk(swarm).chat.completions.create(model="x", messages=HELLO, max_tokens=2,
                                              temperature=0).choices      # one candidate
    assert worker_chat_calls(swarm) == chats_before + 1   # (the log really records chats)


def worker_logs(swarm) -> list:
    """The log files of the daemon's worker processes."""
    import local_swarm as ls
    return sorted((ls.config_from_args().cache_dir / "logs" / str(swarm.proc.pid))
                  .glob("worker-*.log"))


def worker_chat_calls(swarm) -> int:
    """Generations the daemon's workers have been asked for, from their access logs (a chat on
    a python worker, a rendered prompt's completion on llama-server)."""
    route = GENERATION_LOG_LINE[swarm.kind]
    return sum(p.read_text(errors="replace").count(route) for p in worker_logs(swarm))


GENERATION_LOG_LINE = {"python": "POST /v1/chat/completions",
                       "native": "processing task, is_child = 0"}


def test_concurrent_requests_all_answered(swarm):
    results: list[int] = []

    def one(i):
        r = httpx.post(swarm.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": f"Say the number {i}."}], "max_tokens": 6})
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6


@pytest.mark.parametrize("swarm", ["native"], indirect=True)
def test_requests_continuing_one_long_prompt_take_turns_on_the_slot_that_holds_it(swarm):
    """llama-server keeps a prompt in one slot. Two requests sent at once that continue the same
    long conversation: the second waits for the slot holding its prompt (PromptTurns) instead
    of evaluating the whole prompt again on the other slot, so neither evaluates more than its
    new message."""
    opening = (ROOT / "local_swarm.py").read_text()[:5000]        # about 1,500 tokens
    client = sdk(swarm)
    history = [{"role": "user", "content": "Summarize this code:\n" + opening}]
    first = client.chat.completions.create(model="x", messages=history, max_tokens=4,
                                           temperature=0)
    history.append({"role": "assistant", "content": first.choices[0].message.content})
    log = worker_logs(swarm)[0]
    seen = len(log.read_text(errors="replace"))
    replies = []

    def ask(i):
        replies.append(client.chat.completions.create(model="x", max_tokens=4, temperature=0,
                                                      messages=history + [{
                                                          "role": "user",
                                                          "content": f"Question {i}: what next?"}]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 2 and first.usage.prompt_tokens > 1000
    evaluated = [int(n) for n in re.findall(r"prompt eval time =\s+[\d.]+ ms /\s+(\d+) tokens",
                                            log.read_text(errors="replace")[seen:])]
    assert len(evaluated) == 2 and max(evaluated) < 100, evaluated
    assert any("waiting for a request holding the same" in line for line in swarm.output)


# -- worker failure and shutdown (own swarms) ------------------------------------------------------

def _worker_pids(s) -> list[int]:
    return [d["pid"] for d in s.health()["details"]]


PROCESSES = {"native": 1, "python": 2}      # with --instances 2: one llama-server, or two


@pytest.mark.parametrize("kind", PROCESSES)
def test_worker_killed_mid_request_is_retried_and_restarted(kind):
    """A worker process killed mid-request: the request is retried (on the other python worker,
    or on llama-server once it is back) and answered, and the process is restarted once."""
    s = start_swarm("--worker", kind, "--model", TEST_MODEL, "--instances", "2", "--threads", "1",
                    "--ctx", "1024")
    try:
        busy_pid: list[int] = []

        def kill_the_busy_worker():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not busy_pid:
                for d in s.health()["details"]:
                    if d["state"] == "busy":
                        busy_pid.append(d["pid"])
                        psutil.Process(d["pid"]).kill()
                        return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_the_busy_worker)
        killer.start()
        r = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Write a long story about a cat."}],
            "max_tokens": 200})
        killer.join()
        assert busy_pid, "no worker was seen busy"
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and s.health()["workers"]["healthy"] < 2:
            time.sleep(0.5)
        health = s.health()
        assert health["workers"]["healthy"] == 2
        assert busy_pid[0] not in _worker_pids(s)
        restarted = {d["pid"] for d in health["details"] if d["restarts"]}
        assert len(restarted) == 1 and sum(d["restarts"] > 1 for d in health["details"]) == 0
    finally:
        s.stop()


@pytest.mark.parametrize("kind", PROCESSES)
def test_sigterm_stops_every_worker_within_5s(kind):
    s = start_swarm("--worker", kind, "--model", TEST_MODEL, "--instances", "2", "--threads", "1",
                    "--ctx", "512")
    pids = s.worker_pids()
    assert len(pids) == PROCESSES[kind]
    started = time.monotonic()
    assert s.stop(signal.SIGTERM, timeout=10) == 0
    _wait_gone(pids, started + 5)


def test_sigterm_stops_the_embedding_process_too():
    s = start_swarm("--model", TEST_MODEL, "--instances", "1", "--threads", "1", "--ctx", "512")
    before = set(s.worker_pids())
    r = httpx.post(s.url + "/v1/embeddings", json={"input": "x"}, timeout=120)
    assert r.status_code == 200, r.text
    embedder = [p for p in s.worker_pids() if p not in before and "--embeddings" in
                psutil.Process(p).cmdline()]
    assert len(embedder) == 1
    started = time.monotonic()
    assert s.stop(signal.SIGTERM, timeout=10) == 0
    _wait_gone(list(before) + embedder, started + 5)


@pytest.mark.parametrize("kind", PROCESSES)
def test_sigkill_of_daemon_takes_workers_down(kind):
    """The daemon killed outright (no handler runs): its workers go too. llama-server has no
    thread watching a pipe, as llama_cpp.server does: PR_SET_PDEATHSIG takes it down on Linux."""
    s = start_swarm("--worker", kind, "--model", TEST_MODEL, "--instances", "2", "--threads", "1",
                    "--ctx", "512")
    pids = s.worker_pids()
    assert len(pids) == PROCESSES[kind]
    s.stop(signal.SIGKILL)
    _wait_gone(pids, time.monotonic() + 5)


def _wait_gone(pids: list[int], deadline: float) -> None:
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and
                                              psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                              for p in pids):
        time.sleep(0.05)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"workers still alive: {alive}"


def test_api_key_required_except_health():
    s = start_swarm("--model", TEST_MODEL, "--instances", "1", "--threads", "1", "--ctx", "512",
                    env={"LOCAL_SWARM_API_KEY": "sekret"})
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": "wrong"}).status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": "sekret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            sdk(s, api_key="nope").models.list()
        assert sdk(s, api_key="sekret").chat.completions.create(
            model="local-swarm", messages=HELLO, max_tokens=2).choices
    finally:
        s.stop()


# -- consensus ------------------------------------------------------------------------------------

def test_default_request_is_voted_and_reports_the_vote(swarm):
    r = httpx.post(swarm.url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "What is 2 + 2? Reply with the number."}],
        "max_tokens": 8})
    assert r.status_code == 200
    body = r.json()
    vote = body["swarm"]
    assert vote["mode"] == "vote" and vote["k"] == 2 and vote["samples"] >= 2
    assert vote["strategy"] in ("majority", "central")
    assert len(vote["candidates"]) == vote["samples"] - vote["failed"] - vote["cancelled"]
    workers = {d["id"] for d in swarm.health()["details"]}     # worker-N, or worker-1.N slots
    assert {c["worker"] for c in vote["candidates"]} <= workers and len(workers) == 2
    assert 0 < vote["confidence"] <= 1 and sum(c["winner"] for c in vote["candidates"]) == 1
    winner = next(c for c in vote["candidates"] if c["winner"])
    assert winner["worker"] == vote["winner"] == r.headers["x-swarm-winner"]
    assert r.headers["x-swarm-k"] == "2" and r.headers["x-swarm-strategy"] == vote["strategy"]
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == winner["tokens"]


def test_streamed_vote_carries_the_swarm_object_on_its_last_chunk(swarm):
    with httpx.stream("POST", swarm.url + "/v1/chat/completions", timeout=120, json={
            "messages": HELLO, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["x-swarm-mode"] == "vote" and r.headers["x-swarm-k"] == "2"
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line[6:]) for line in lines]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert chunks[-1]["swarm"]["k"] == 2 and "swarm" not in chunks[-2]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()


def test_n_choices_are_the_votes_candidates_through_the_openai_sdk(swarm):
    """n=2 on two workers: both candidates come back as choices, the vote's winner first,
    whole and streamed (each choice's deltas under its index); n=3 is more than the workers."""
    client = sdk(swarm)
    kw = dict(model="local-swarm", messages=HELLO, max_tokens=6, n=2)
    raw = client.chat.completions.with_raw_response.create(**kw)
    reply = raw.parse()
    assert [c.index for c in reply.choices] == [0, 1] and all(
        c.message.content is not None for c in reply.choices)
    vote = json.loads(raw.text)["swarm"]
    assert len(vote["candidates"]) == 2 and vote["k"] == 2
    winner = next(c for c in vote["candidates"] if c["winner"])
    others = [c["tokens"] for c in vote["candidates"] if not c["winner"]]
    assert reply.usage.completion_tokens == winner["tokens"] + sum(others)
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(texts) == [0, 1] and all(t.strip() for t in texts.values())
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{**kw, "n": 3})
    assert info.value.body["param"] == "n"
    comp = client.completions.create(model="local-swarm", prompt="The sky is", max_tokens=4, n=2,
                                     seed=3, temperature=0.9)
    assert [c.index for c in comp.choices] == [0, 1] and all(c.text for c in comp.choices)


def test_fastest_mode_and_temperature_zero_answer_from_one_worker(swarm):
    for extra in ({"swarm": {"mode": "fastest"}}, {"temperature": 0}):
        body = httpx.post(swarm.url + "/v1/chat/completions", timeout=120, json={
            "messages": HELLO, "max_tokens": 4, **extra}).json()
        assert body["swarm"]["k"] == 1 and body["swarm"]["strategy"] == "single"
