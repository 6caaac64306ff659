"""The chat path over small in-process fake workers (fail on cue): one generation on a leased
worker (retries, context checks, refusals, calls finished under the grammar), the vote runner
(majority, anchor, early finish, adaptive growth, affinity) and the reply writer (whole replies and
SSE). The real workers are exercised in test_e2e.py and test_e2e_tools.py."""
from __future__ import annotations

import asyncio
import time
import json

import pytest

import local_swarm as ls
from conftest import until
from test_workers import FakeWorker as PoolFakeWorker
from test_workers import (QUICK_RESTART, SLOW_RESTART, NeverReadyWorker, name_score_chunk, run,
                          scored_name, started_pool)


class FakeWorker(PoolFakeWorker):
    """The pool tests' scripted worker, whose stream lets other tasks run after each chunk as a
    real worker's network reads do: a candidate holds its worker while it generates, so the
    candidates of one vote land on different workers."""

    async def stream_chat(self, body, timeout, route="/v1/chat/completions"):
        async for chunk in super().stream_chat(body, timeout, route):
            yield chunk
            await asyncio.sleep(0)


# -- chat service over fake workers: retries --------------------------------------------------------

def chat_service(pool, n_ctx=100, **cfg):
    """A ChatService over fake workers; mode "fastest" (one candidate) unless cfg says."""
    cfg = {"mode": "fastest", **cfg}
    return ls.ChatService(pool, ls.PromptRenderer(None), "fake-model", n_ctx, ls.Config(**cfg))


def request(stream=False, text="hi there", **extra):
    return ls.parse_chat_request({"messages": [{"role": "user", "content": text}],
                                  "stream": stream, **extra})


def test_whole_reply_retried_on_another_worker_after_midway_death():
    async def go():
        a, b = FakeWorker(1, die_after=1), FakeWorker(2)
        pool = await started_pool([a, b], timings=SLOW_RESTART)
        reply, gen, _ = await chat_service(pool).complete(request())
        assert reply["choices"][0]["message"]["content"] == "Hello"
        assert gen.attempts == 2 and gen.worker == "worker-2"
        await pool.stop()
    run(go())


def test_stream_not_retried_once_content_was_sent():
    async def go():
        pool = await started_pool([FakeWorker(1, die_after=1), FakeWorker(2)],
                                   timings=SLOW_RESTART)
        gen = ls.Generation()
        stream, _ = await chat_service(pool).open_stream(request(stream=True), gen)
        events = [e async for e in stream]
        assert b'"content":"Hel"' in events[1]
        assert b'"worker_failed"' in events[-2] and events[-1] == ls.SSE_DONE
        assert gen.attempts == 1
        await pool.stop()
    run(go())


def test_context_overflow_refused_before_generation():
    async def go():
        w = FakeWorker(1)
        w.gate = asyncio.Event()                 # a generation would hang here
        pool = await started_pool([w])
        with pytest.raises(ls.HTTPError) as info:
            await chat_service(pool, n_ctx=5).complete(request(text="one two three four five six"))
        assert info.value.status == 400 and info.value.code == "context_length_exceeded"
        assert pool.describe()[0]["state"] == "idle"
        await pool.stop()
    run(go())


@pytest.mark.parametrize("status", [422, 500])
def test_a_worker_answering_an_error_is_not_retried_and_gives_400(status):
    """A live worker that answers this request with an error (a template that cannot render it)
    would answer the same on every worker: 400 at once, never a 5xx that editors retry."""
    async def go():
        a, b = FakeWorker(1), FakeWorker(2)
        a.refuse = b.refuse = status
        pool = await started_pool([a, b])
        with pytest.raises(ls.HTTPError) as info:
            await chat_service(pool).complete(request())
        assert info.value.status == 400 and info.value.code == "worker_rejected"
        assert getattr(a, "chats", 0) + getattr(b, "chats", 0) == 1
        assert [d["state"] for d in pool.describe()] == ["idle", "idle"]
        await pool.stop()
    run(go())


def test_retries_run_out_into_worker_error():
    async def go():
        workers = [FakeWorker(1, die_after=0), FakeWorker(2, die_after=0)]
        pool = await started_pool(workers, timings=QUICK_RESTART)
        svc = chat_service(pool, max_retries=1)
        with pytest.raises(ls.WorkerError):
            await svc.complete(request())
        await pool.stop()
    run(go())


# -- the API while no worker is ready ---------------------------------------------------------------

def test_health_is_503_while_initializing_and_200_once_a_worker_is_ready():
    async def go():
        gate = asyncio.Event()

        class GatedWorker(FakeWorker):
            async def wait_ready(self, timeout):
                await gate.wait()

        pool = ls.WorkerPool([GatedWorker(1), NeverReadyWorker(2)], queue_size=4,
                             start_timeout=300)
        cfg = ls.Config(api_key="k")
        app = ls.SwarmApp(cfg, pool, chat_service(pool), "m")
        await pool.start()
        for path in ("/health", "/v1/health"):
            reply = await app.handle(ls.Request("GET", path, path, "HTTP/1.1", (), b""))
            assert reply.status == 503 and ("Retry-After", "5") in reply.headers
            assert json.loads(reply.body)["status"] == "initializing"
        for stream in (False, True):          # refused before any byte of a 200 stream
            body = json.dumps({"messages": [{"role": "user", "content": "hi"}],
                               "stream": stream}).encode()
            chat = ls.Request("POST", "/v1/chat/completions", "/v1/chat/completions",
                              "HTTP/1.1", (("x-api-key", "k"),), body)
            with pytest.raises(ls.HTTPError) as info:
                await app.handle(chat)
            assert info.value.status == 503 and info.value.code == "swarm_starting"
        gate.set()
        await pool.wait_any_ready(5)
        reply = await app.handle(ls.Request("GET", "/health", "/health", "HTTP/1.1", (), b""))
        assert reply.status == 200 and json.loads(reply.body)["status"] == "degraded"
        await pool.stop()
    run(go())


def test_with_an_api_key_unknown_routes_are_401_before_404():
    """Without the key no route is told apart from another (llama-server answers the same):
    401 on unknown paths and wrong methods too; with it, 404 and 405 as usual."""
    async def go():
        pool = await started_pool([FakeWorker(1)])
        app = ls.SwarmApp(ls.Config(api_key="k"), pool, chat_service(pool), "m")

        async def status(method, path, key=None):
            headers = (("x-api-key", key),) if key else ()
            try:
                return (await app.handle(ls.Request(method, path, path, "HTTP/1.1", headers,
                                                    b""))).status
            except ls.HTTPError as exc:
                return exc.status
        assert [await status("GET", "/nope"), await status("POST", "/v1/models"),
                await status("GET", "/v1/models/x")] == [401, 401, 401]
        assert [await status("GET", "/nope", "k"), await status("POST", "/v1/models", "k"),
                await status("GET", "/v1/models/x", "k")] == [404, 405, 404]
        assert await status("GET", "/health") == 200
        await pool.stop()
    run(go())


def test_models_and_props_tell_clients_the_context():
    async def go():
        pool = await started_pool([FakeWorker(1), FakeWorker(2)])
        info = ls.ModelInfo(path=ls.Path("/m/tiny.gguf"), size_bytes=1000, sha256=None,
                            name="tiny", arch="llama", context_length=8192, n_layer=2, n_embd=8,
                            n_head=1, n_head_kv=1, head_dim=8, has_tool_template=False,
                            chat_template_family="", chat_template="{{ x }}")
        app = ls.SwarmApp(ls.Config(), pool, chat_service(pool, n_ctx=100), "m", model=info)

        async def get(path):
            reply = await app.handle(ls.Request("GET", path, path, "HTTP/1.1", (), b""))
            return json.loads(reply.body)
        models = (await get("/v1/models"))["data"]
        assert [m["id"] for m in models] == ["local-swarm", "m"]
        assert all(m["context_length"] == 100 and m["meta"]["n_ctx"] == 100
                   and m["meta"]["n_ctx_train"] == 8192 for m in models)
        assert (await get("/v1/models/m"))["context_length"] == 100
        props = await get("/props")
        assert props["default_generation_settings"]["n_ctx"] == 100
        assert props["total_slots"] == 2 and props["n_ctx_train"] == 8192
        assert props["model_path"] == "tiny.gguf" and props["chat_template"] == "{{ x }}"
        await pool.stop()
    run(go())


async def keyed_app():
    """A voting SwarmApp on two fake workers, API key "k", and a caller for it: the Response,
    or the status of the HTTPError raised (key=None sends no key)."""
    pool = await started_pool([FakeWorker(1, tokens=("4",)), FakeWorker(2, tokens=("4",))])
    app = ls.SwarmApp(ls.Config(api_key="k"), pool, chat_service(pool, mode="vote"), "m")

    async def call(method, path, body=b"", key="k"):
        headers = (("x-api-key", key),) if key else ()
        try:
            return await app.handle(ls.Request(method, path, path, "HTTP/1.1", headers, body))
        except ls.HTTPError as exc:
            return exc.status
    return pool, call


def test_metrics_count_requests_and_votes_in_prometheus_text():
    async def go():
        pool, call = await keyed_app()
        chat = json.dumps({"messages": [{"role": "user", "content": "2+2?"}],
                           "swarm": {"votes": 2, "adaptive": False}}).encode()
        assert (await call("POST", "/v1/chat/completions", chat)).status == 200
        assert await call("GET", "/nope/secret-path") == 404
        assert await call("GET", "/metrics", key=None) == 401         # behind the key
        reply = await call("GET", "/metrics")
        assert reply.status == 200 and reply.headers[0][1].startswith("text/plain; version=0.0.4")
        text = reply.body.decode()
        assert 'local_swarm_requests_total{route="/v1/chat/completions",status="200"} 1' in text
        assert 'local_swarm_requests_total{route="other",status="404"} 1' in text
        assert "secret-path" not in text                              # no client text as label
        assert 'local_swarm_vote_candidates_bucket{le="2"} 1' in text
        assert 'local_swarm_vote_confidence_bucket{le="1"} 1' in text
        assert "local_swarm_answer_seconds_count 1" in text
        assert 'local_swarm_workers{state="idle"} 2' in text and "local_swarm_queue_depth 0" in text
        assert "local_swarm_peers" not in text                        # federation off
        for line in text.splitlines():                                # the exposition grammar
            assert line.startswith("# HELP ") or line.startswith("# TYPE ") or \
                ls.re.fullmatch(r'[a-zA-Z_:][\w:]*(\{[^}]*\})? [-+\w.]+', line), line
        await pool.stop()
    run(go())


def test_status_page_is_public_and_its_data_lists_workers_and_the_last_votes_behind_the_key():
    async def go():
        pool, call = await keyed_app()
        page = await call("GET", "/", key=None)
        assert page.status == 200 and dict(page.headers)["Content-Type"].startswith("text/html")
        html = page.body.decode()
        assert ls.SWARM_STATUS_PATH in html and "<script" in html
        assert not ls.re.search(r'(src|href)="(https?:)?//', html)      # no external assets
        assert await call("GET", ls.SWARM_STATUS_PATH, key=None) == 401
        chat = json.dumps({"messages": [{"role": "user", "content": "2+2?"}],
                           "swarm": {"votes": 2, "adaptive": False}}).encode()
        assert (await call("POST", "/v1/chat/completions", chat)).status == 200
        status = json.loads((await call("GET", ls.SWARM_STATUS_PATH)).body)
        assert [w["id"] for w in status["details"]] == ["worker-1", "worker-2"]
        [vote] = status["votes"]
        assert vote["k"] == 2 and vote["candidates"] == 2 and vote["votes"] == [2]
        assert vote["winner"] in ("worker-1", "worker-2") and vote["confidence"] == 1.0
        assert status["peers"] is None and status["api_key"] is True
        assert status["status"] == "healthy" and status["model"] == "m"
        await pool.stop()
    run(go())


def test_worker_metrics_get_a_worker_label_and_their_help_once():
    llama = ("# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
             "# TYPE llamacpp:prompt_tokens_total counter\n"
             "llamacpp:prompt_tokens_total 120\n"
             'llamacpp:x{slot="1"} 2\n')
    lines = ls.worker_metric_lines([("worker-1", llama), ("worker-2", llama)])
    assert lines.count("# TYPE llamacpp:prompt_tokens_total counter") == 1
    assert 'llamacpp:prompt_tokens_total{worker="worker-1"} 120' in lines
    assert 'llamacpp:prompt_tokens_total{worker="worker-2"} 120' in lines
    assert 'llamacpp:x{worker="worker-2",slot="1"} 2' in lines


# -- consensus over fake workers -------------------------------------------------------------------

def voters(*answers, gated=()):
    """Fake workers, one per answer text; those whose index is in `gated` wait on a gate."""
    workers = [FakeWorker(i + 1, tokens=(text,)) for i, text in enumerate(answers)]
    for i in gated:
        workers[i].gate = asyncio.Event()
    return workers


def test_majority_vote_picks_the_agreed_answer_and_reports_it():
    async def go():
        pool = await started_pool(voters("The answer is 41.", "So the answer is 42.",
                                         "The answer is 42."))
        svc = chat_service(pool, mode="vote", adaptive=False)
        reply, gen, swarm = await svc.complete(request(text="6 x 7?", swarm={"votes": 3}))
        assert "42" in reply["choices"][0]["message"]["content"]
        assert reply["swarm"] is swarm and swarm["strategy"] == "majority"
        assert swarm["k"] == 3 and swarm["samples"] == 3 and sorted(swarm["votes"]) == [1, 2]
        assert swarm["confidence"] == pytest.approx(2 / 3, abs=1e-3)
        assert sum(c["winner"] for c in swarm["candidates"]) == 1
        assert swarm["winner"] in ("worker-2", "worker-3")
        await pool.stop()
    run(go())


def test_the_anchor_candidate_decodes_greedily_and_wins_a_split_vote():
    """A request that leaves temperature to the swarm: candidate 0 runs at temperature 0 and
    wins a 1-1 split; with an explicit temperature or "anchor": false every candidate samples."""
    async def go():
        workers = voters("Answer: 5", "Answer: 9")
        pool = await started_pool(workers)
        svc = chat_service(pool, mode="vote", adaptive=False)

        def temperatures():
            return {w.name: w.requests[-1][1]["temperature"] for w in workers}

        reply, _, swarm = await svc.complete(request(swarm={"votes": 2}))
        temps = temperatures()
        assert sorted(temps.values()) == [0.0, 0.7]
        greedy_worker = next(name for name, t in temps.items() if t == 0.0)
        assert swarm["winner"] == greedy_worker
        assert [c["greedy"] for c in swarm["candidates"] if c["winner"]] == [True]
        expected = {"worker-1": "Answer: 5", "worker-2": "Answer: 9"}[greedy_worker]
        assert reply["choices"][0]["message"]["content"] == expected
        for extra in ({"swarm": {"votes": 2, "anchor": False}},
                      {"temperature": 0.7, "swarm": {"votes": 2}}):
            _, _, swarm = await svc.complete(request(**extra))
            assert sorted(temperatures().values()) == [0.7, 0.7], extra
            assert not any(c["greedy"] for c in swarm["candidates"])
        await pool.stop()
    run(go())


def test_early_finish_cancels_the_straggler():
    async def go():
        workers = voters("Answer: 7", "Answer: 7", "Answer: 7", gated=(2,))
        pool = await started_pool(workers)
        svc = chat_service(pool, mode="vote", adaptive=False)
        plan = ls.VotePlan(mode="vote", k=3, adaptive=False, temperature=0.7, affinity=False)
        prepared = svc.preparer.prepare(request(text="3 + 4?"))
        assert prepared.prompt == "3 + 4?" and prepared.checked
        ballot = await svc.votes.vote(prepared, plan)
        assert len(ballot.entries) == 2 and ballot.cancelled == 1
        assert ls.swarm_report(ballot)["confidence"] == 1.0
        await asyncio.sleep(0.01)
        # the straggler's worker may still be evaluating the prompt: it drains before reuse
        assert [d["state"] for d in pool.describe()] == ["idle", "idle", "draining"]
        workers[2].gate.set()                    # its model lock comes free
        await asyncio.sleep(0.01)
        assert [d["state"] for d in pool.describe()] == ["idle"] * 3
        await pool.stop()
    run(go())


def test_a_drained_worker_that_never_frees_is_probed_and_restarted():
    async def go():
        w = FakeWorker(1)
        w.gate = asyncio.Event()

        async def stuck(text, timeout=None):
            raise ls.WorkerError("worker-1: /extras/tokenize/count: ReadTimeout")
        pool = await started_pool([w], timings=ls.PoolTimings(drain_timeout=0.01))
        task = asyncio.create_task(chat_service(pool).complete(request()))
        await asyncio.sleep(0.01)
        w.count_tokens, w.mute = stuck, True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if w.starts == 2:
                break
        assert w.starts == 2                     # probed, did not answer, restarted
        await pool.stop()
    run(go())


@pytest.mark.parametrize("answers,samples", [
    (("Answer: 5", "Answer: 5", "Answer: 9"), 2),      # the first two agree: stop at 2
    (("Answer: 5", "Answer: 9", "Answer: 5"), 3),      # they disagree: one more
])
def test_adaptive_vote_adds_candidates_only_while_they_disagree(answers, samples):
    async def go():
        pool = await started_pool(voters(*answers))
        svc = chat_service(pool, mode="vote", adaptive=True)
        _, _, swarm = await svc.complete(request(swarm={"votes": 3}))
        assert swarm["samples"] == samples
        await pool.stop()
    run(go())


def test_a_failing_worker_is_dropped_from_the_vote():
    async def go():
        workers = voters("Answer: 3", "Answer: 3", "Answer: 3")
        workers[0].die_after = 0
        pool = await started_pool(workers, timings=SLOW_RESTART)
        svc = chat_service(pool, mode="vote", adaptive=False, max_retries=0)
        reply, _, swarm = await svc.complete(request(swarm={"votes": 3}))
        assert swarm["failed"] == 1 and len(swarm["candidates"]) == 2
        assert reply["choices"][0]["message"]["content"] == "Answer: 3"
        await pool.stop()
    run(go())


def test_temperature_zero_sends_one_request_unless_forced():
    async def go():
        pool = await started_pool(voters("a", "a", "a"))
        svc = chat_service(pool, mode="vote")
        _, _, swarm = await svc.complete(request(temperature=0, swarm={"votes": 3}))
        assert swarm["strategy"] == "single" and swarm["k"] == 1
        _, _, swarm = await svc.complete(request(temperature=0,
                                                 swarm={"votes": 3, "force_vote": True}))
        assert swarm["k"] == 3 and swarm["strategy"] != "single"
        await pool.stop()
    run(go())


def test_streamed_vote_sends_keepalives_then_the_winner(monkeypatch):
    monkeypatch.setattr(ls, "KEEPALIVE_EVERY", 0.02)

    async def go():
        workers = voters("The answer is 8 apples.", "The answer is 8 apples.", gated=(0, 1))
        pool = await started_pool(workers)
        svc = chat_service(pool, mode="vote", adaptive=False)
        gen = ls.Generation()
        stream, plan = await svc.open_stream(request(stream=True, swarm={"votes": 2},
                                                     stream_options={"include_usage": True}), gen)
        assert plan.k == 2
        events = []
        async for event in stream:
            events.append(event)
            if event.startswith(b": ") and len(events) == 3:
                for w in workers:
                    w.gate.set()
        assert events[1].startswith(b": voting")
        chunks = [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "The answer is 8 apples."
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
        assert chunks[-1]["swarm"]["strategy"] == "majority" and "swarm" not in chunks[-2]
        assert events[-1] == ls.SSE_DONE and gen.text == text
        await pool.stop()
    run(go())


def test_next_turn_goes_to_the_worker_that_served_the_last():
    async def go():
        pool = await started_pool(voters("x", "y", "z"))
        svc = chat_service(pool)                         # one candidate: the affinity is visible
        first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        async with pool.lease(), pool.lease():          # only worker-3 is free for turn 1
            _, gen1, _ = await svc.complete(ls.parse_chat_request({"messages": first}))
        assert gen1.worker == "worker-3"
        turn2 = first + [{"role": "assistant", "content": "z"}, {"role": "user", "content": "more"}]
        _, gen2, _ = await svc.complete(ls.parse_chat_request({"messages": turn2}))
        assert gen2.worker == "worker-3"
        _, gen3, _ = await svc.complete(ls.parse_chat_request(
            {"messages": turn2, "swarm": {"affinity": False}}))
        assert gen3.worker == "worker-1"                 # without affinity: the first idle one
        await pool.stop()
    run(go())


# -- consensus on workers that share a prompt (llama-server's slots) --------------------------------

class FakeProcess:
    """The shared side of fake llama-server slots: what it was asked (each request's body, and
    how many of its requests were streaming at once), the greedy text and the sampled texts it
    hands out in order, and an optional gate the sampled streams wait on."""

    def __init__(self, greedy="Answer: 5", samples=("Answer: 5",) * 8):
        self.greedy, self.samples = greedy, list(samples)
        self.requests, self.open, self.most_open, self.closed = [], 0, 0, 0
        self.gate = None
        self.refuse = None
        self.call, self.continued, self.continuing = "", [], 0
        self.name_logprobs, self.scored = {}, []
        self.per_char = 0.0             # seconds a prompt character takes to evaluate anew
        self.greedy_logprob = -0.25     # each greedy token's log-probability (samples: -0.25)


class FakeSlot(FakeWorker):
    """One slot of a FakeProcess: takes rendered prompts on /v1/completions, and answers `n`
    choices in one stream whose chunks interleave (each with its index and a log-probability)."""

    takes_prompt = True
    shares_prompt = True

    def __init__(self, process, slot):
        super().__init__(slot)
        self.process = process
        self.name, self.group = f"worker-1.{slot}", "worker-1"

    def prompt_seconds(self, chars):
        return chars * self.process.per_char

    async def stream_chat(self, body, timeout, route="/v1/completions"):
        proc = self.process
        proc.requests.append(body)
        if proc.refuse is not None:
            raise ls.WorkerError(f"{self.name} answered {proc.refuse}", status=proc.refuse)
        n = body.get("n", 1)
        if scored_name(body) is not None:         # a tool name scored
            proc.scored.append(scored_name(body))
            yield name_score_chunk(proc.name_logprobs, body)
            return
        if "grammar" in body:                     # a call finished under the call grammar
            proc.continued.append(proc.open + proc.continuing)   # what else was streaming then
            proc.continuing += 1
            try:
                for piece in chunks_of(proc.call):
                    yield {"choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                    await asyncio.sleep(0)
                yield {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
            finally:
                proc.continuing -= 1
            return
        texts = [proc.greedy] if body["temperature"] == 0 else \
            [proc.samples.pop(0) for _ in range(n)]
        proc.open += 1
        proc.most_open = max(proc.most_open, proc.open)
        try:
            if proc.gate is not None and body["temperature"] > 0:
                await proc.gate.wait()
            logprob = proc.greedy_logprob if body["temperature"] == 0 else -0.25
            for i, text in enumerate(texts):
                yield {"choices": [{"index": i, "text": text, "finish_reason": None,
                                    "logprobs": {"content": [{"logprob": logprob}]}}]}
                await asyncio.sleep(0)
                yield {"choices": [{"index": i, "text": "", "finish_reason": "stop"}]}
                await asyncio.sleep(0)
        finally:
            proc.open -= 1
            proc.closed += 1


async def slot_pool(process, slots=6):
    return await started_pool([FakeSlot(process, i) for i in range(1, slots + 1)])


def slot_service(pool, **cfg):
    """A ChatService whose prompts are rendered by a (tiny) chat template, as workers that take
    prompts need: the prompt is the messages' contents."""
    renderer = ls.PromptRenderer("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return ls.ChatService(pool, renderer, "fake-model", 100, ls.Config(**{"mode": "vote", **cfg}))


def test_a_vote_on_shared_prompt_slots_is_the_anchor_then_one_request_for_the_samples():
    """k=5, anchored: the greedy anchor alone, then the four samples as one request with n=4
    that starts once the anchor is done (its slot then holds the prompt), all on one process;
    every candidate carries its log-probabilities."""
    async def go():
        proc = FakeProcess(samples=["Answer: 9", "Answer: 5", "Answer: 9", "Answer: 5"])
        pool = await slot_pool(proc)
        svc = slot_service(pool, adaptive=False)
        reply, gen, swarm = await svc.complete(request(swarm={"votes": 5}))
        assert [(b["temperature"], b.get("n", 1)) for b in proc.requests] == [(0.0, 1), (0.7, 4)]
        assert proc.most_open == 1                 # the samples waited for the anchor
        assert all(b["prompt"] == "hi there" and b["logprobs"] == 1 for b in proc.requests)
        assert swarm["samples"] == 5 and sorted(swarm["votes"]) == [2, 3]     # undecided at 4
        assert reply["choices"][0]["message"]["content"] == "Answer: 5"
        assert [c["greedy"] for c in swarm["candidates"]].count(True) == 1
        assert gen.logprobs == [-0.25]
        assert {c["mean_logprob"] for c in swarm["candidates"]} == {-0.25}
        assert {c["confidence"] for c in swarm["candidates"]} == {round(ls.math.exp(-0.25), 4)}
        assert [d["state"] for d in pool.describe()] == ["idle"] * 6
        await pool.stop()
    run(go())


@pytest.mark.parametrize("logprob,sure", [(-0.01, True), (-0.2, False)])
def test_a_sure_anchor_ends_an_adaptive_vote_before_its_samples_are_sent(logprob, sure):
    """The greedy anchor's tokens at probability 0.99 (at least ANCHOR_SURE): the vote ends with
    it, and the samples, which wait for its prompt, are never sent; at 0.82 they are."""
    async def go():
        proc = FakeProcess(samples=["Answer: 5"] * 8)
        proc.greedy_logprob = logprob
        pool = await slot_pool(proc)
        reply, _, swarm = await slot_service(pool).complete(request(swarm={"votes": 5}))
        assert reply["choices"][0]["message"]["content"] == "Answer: 5"
        sent = [(b["temperature"], b.get("n", 1)) for b in proc.requests]
        if sure:
            assert sent == [(0.0, 1)] and swarm["samples"] == 1 and swarm["cancelled"] == 0
            assert swarm["candidates"][0]["confidence"] == round(ls.math.exp(logprob), 4)
        else:
            assert sent[0] == (0.0, 1) and len(sent) > 1 and swarm["samples"] > 1
        await pool.stop()
    run(go())


def test_explain_shows_each_candidates_text_and_log_probabilities():
    async def go():
        proc = FakeProcess(samples=["Answer: 9", "Answer: 5"])
        pool = await slot_pool(proc)
        svc = slot_service(pool, adaptive=False)
        _, _, plain = await svc.complete(request(swarm={"votes": 3}))
        assert not any("content" in c or "logprobs" in c for c in plain["candidates"])
        proc.samples = ["Answer: 9", "Answer: 5"]
        _, _, swarm = await svc.complete(request(swarm={"votes": 3, "explain": True}))
        assert sorted(c["content"] for c in swarm["candidates"]) == \
            ["Answer: 5", "Answer: 5", "Answer: 9"]
        assert all(c["logprobs"] == [-0.25] and c["calls"] == [] for c in swarm["candidates"])
        await pool.stop()
    run(go())


def test_n_choices_are_the_votes_candidates_winner_first_whole_and_streamed():
    """n=3 runs three candidates however early the vote is decided, and answers each as a
    choice: the winner (the majority's) as choice 0, the usage counting every choice; a stream
    sends each choice under its own index, with its own role and finish chunks."""
    async def go():
        proc = FakeProcess(samples=["Answer: 9", "Answer: 5", "Answer: 9", "Answer: 9"])
        proc.greedy = "Answer: 9"
        pool = await slot_pool(proc)
        svc = slot_service(pool)
        reply, _, swarm = await svc.complete(request(n=3, swarm={"votes": 2}))
        texts = [c["message"]["content"] for c in reply["choices"]]
        assert [c["index"] for c in reply["choices"]] == [0, 1, 2] and swarm["samples"] == 3
        assert texts[0] == "Answer: 9" and sorted(texts) == ["Answer: 5", "Answer: 9", "Answer: 9"]
        one, _, _ = await svc.complete(request(swarm={"votes": 1}))   # the greedy "Answer: 9"
        assert len(one["choices"]) == 1
        winner = one["usage"]["completion_tokens"]                    # the tokenizer's count
        assert reply["usage"]["completion_tokens"] == winner + 2     # + one chunk each other
        proc.samples = ["Answer: 5", "Answer: 9"]
        stream, _ = await svc.open_stream(request(stream=True, n=3, swarm={"votes": 2},
                                                  stream_options={"include_usage": True}),
                                          ls.Generation())
        chunks = sse_payloads([e async for e in stream])
        by_index = {}
        for chunk in chunks:
            for choice in chunk["choices"]:
                by_index.setdefault(choice["index"], []).append(choice)
        assert sorted(by_index) == [0, 1, 2]
        for deltas in by_index.values():
            assert deltas[0]["delta"]["role"] == "assistant" and deltas[-1]["finish_reason"]
        text = {i: "".join(d["delta"].get("content") or "" for d in ds) for i, ds in by_index.items()}
        assert text[0] == "Answer: 9" and sorted(text.values()) == ["Answer: 5", "Answer: 9",
                                                                     "Answer: 9"]
        assert chunks[-1]["usage"]["completion_tokens"] == winner + 2 and "swarm" in chunks[-1]
        await pool.stop()
    run(go())


def test_n_above_the_swarms_workers_is_a_400():
    async def go():
        pool = await slot_pool(FakeProcess(samples=[]), slots=2)
        with pytest.raises(ls.HTTPError) as info:
            await slot_service(pool).complete(request(n=3))
        assert info.value.status == 400 and info.value.param == "n"
        await pool.stop()
    run(go())


def test_asked_logprobs_are_the_winners_tokens_in_the_reply_whole_and_streamed():
    async def go():
        proc = FakeProcess(samples=["Answer: 5"] * 8)
        pool = await slot_pool(proc)
        svc = slot_service(pool, adaptive=False)
        reply, _, _ = await svc.complete(request(swarm={"votes": 3}))
        assert reply["choices"][0]["logprobs"] is None                 # not asked
        reply, _, _ = await svc.complete(request(swarm={"votes": 3}, logprobs=True,
                                                 top_logprobs=2))
        [entry] = reply["choices"][0]["logprobs"]["content"]
        assert entry["logprob"] == -0.25 and entry["top_logprobs"] == []
        assert proc.requests[-1]["logprobs"] == 2                      # the workers were asked
        stream, _ = await svc.open_stream(request(stream=True, logprobs=True), ls.Generation())
        chunks = sse_payloads([e async for e in stream])
        finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finish[-1]["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.25
        await pool.stop()
    run(go())


def test_an_unanchored_vote_on_shared_prompt_slots_is_one_request():
    async def go():
        proc = FakeProcess()
        pool = await slot_pool(proc)
        svc = slot_service(pool, adaptive=False)
        _, _, swarm = await svc.complete(request(temperature=0.8, swarm={"votes": 5}))
        assert [(b["temperature"], b["n"]) for b in proc.requests] == [(0.8, 5)]
        assert swarm["samples"] == 5 and swarm["votes"][0] >= 3
        await pool.stop()
    run(go())


def test_an_adaptive_vote_on_shared_prompt_slots_adds_a_batch_while_candidates_disagree():
    async def go():
        proc = FakeProcess(samples=["Answer: 9", "Answer: 5", "Answer: 5", "Answer: 5"])
        pool = await slot_pool(proc)
        svc = slot_service(pool, adaptive=True)
        _, _, swarm = await svc.complete(request(swarm={"votes": 5}))
        sent = [(b["temperature"], b.get("n", 1)) for b in proc.requests]
        assert sent[:2] == [(0.0, 1), (0.7, 1)] and len(sent) == 3 and sent[2][1] >= 1
        assert swarm["samples"] == 2 + sent[2][1]
        await pool.stop()
    run(go())


def test_a_decided_vote_closes_the_stream_of_its_unfinished_samples(monkeypatch):
    """Three of five agree before the others finish: the vote ends, the batch's stream is
    closed (which stops every choice in it) and its slots go back to the pool."""
    async def go():
        proc = FakeProcess()
        pool = await slot_pool(proc)
        svc = slot_service(pool, adaptive=False)
        plan = ls.VotePlan(mode="vote", k=5, adaptive=False, temperature=0.7, affinity=False)
        prepared = svc.preparer.prepare(request())
        original = FakeSlot.stream_chat

        async def slow_tail(self, body, timeout, route="/v1/completions"):
            async for chunk in original(self, body, timeout, route):
                yield chunk
                if chunk["choices"][0]["index"] >= 3:
                    await asyncio.Event().wait()      # choices 3 and 4 never finish
        monkeypatch.setattr(FakeSlot, "stream_chat", slow_tail)
        ballot = await svc.votes.vote(prepared, plan)
        assert len(ballot.entries) == 3 and ballot.cancelled == 2
        assert proc.open == 0 and proc.closed == 1
        await until(lambda: all(d["state"] == "idle" for d in pool.describe()))
        await pool.stop()
    run(go())


def test_candidates_beyond_the_idle_slots_go_in_a_batch_of_their_own():
    async def go():
        proc = FakeProcess(samples=[f"Answer: {i}" for i in range(5)])   # undecided
        pool = await slot_pool(proc, slots=3)
        svc = slot_service(pool, adaptive=False)
        plan = ls.VotePlan(mode="vote", k=5, adaptive=False, temperature=0.7, affinity=False)
        async with pool.lease():                  # another request holds one slot
            task = asyncio.create_task(svc.votes.vote(svc.preparer.prepare(request()), plan))
            await until(lambda: proc.requests)
        ballot = await task
        sizes = [b["n"] for b in proc.requests]     # the rest as slots come free
        assert sizes[0] == 2 and sum(sizes) == 5 and len(ballot.entries) == 5
        await pool.stop()
    run(go())


def test_a_batch_the_worker_refuses_refuses_the_request_and_a_broken_one_fails_its_candidates(
        monkeypatch):
    async def go():
        proc = FakeProcess()
        pool = await slot_pool(proc)
        svc = slot_service(pool, adaptive=False)
        proc.refuse = 400
        with pytest.raises(ls.HTTPError) as refused:
            await svc.complete(request(temperature=0.7, swarm={"votes": 3}))
        assert refused.value.status == 400
        proc.refuse = None

        async def breaks(self, body, timeout, route="/v1/completions"):
            raise ls.WorkerError("worker-1: stream broken")
            yield                                  # an async generator
        monkeypatch.setattr(FakeSlot, "stream_chat", breaks)
        with pytest.raises(ls.WorkerError, match="all 3 candidates failed"):
            await svc.complete(request(temperature=0.7, swarm={"votes": 3}))
        await pool.stop()
    run(go())


# -- turns on a shared prompt ------------------------------------------------------------------------

PREFIX = "the opening of a long conversation, " * 3     # 108 characters


def test_shared_prefix_is_the_longest_common_prefix():
    cases = [("", "", 0), ("abc", "", 0), ("abc", "abd", 2), ("abc", "abcdef", 3),
             ("xbc", "abc", 0), (PREFIX + "1", PREFIX + "2", len(PREFIX))]
    for a, b, expected in cases:
        assert ls.shared_prefix(a, b) == ls.shared_prefix(b, a) == expected


def test_turns_wait_for_a_costly_shared_prefix_one_request_at_a_time():
    """At 1 s per character evaluated anew, any shared character is worth a wait: the second
    and third requests take turns after the first, one at a time; an unrelated prompt, or one
    whose shared prefix is cheap to evaluate again, goes at once."""
    async def go():
        turns = ls.PromptTurns(lambda chars: float(chars), least=2.0)
        first = await turns.take(PREFIX + "1")
        second = asyncio.create_task(turns.take(PREFIX + "2"))
        third = asyncio.create_task(turns.take(PREFIX + "3"))
        other = await asyncio.wait_for(turns.take("something else"), 1)
        cheap = await asyncio.wait_for(turns.take(PREFIX[:1] + "x"), 1)   # 1 s < 2 s
        await asyncio.sleep(0.01)
        assert not second.done() and not third.done()
        first.end()
        done, waiting = await asyncio.wait({second, third}, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.01)
        assert len(done) == 1 and not waiting.pop().done()     # one at a time
        done.pop().result().end()
        await asyncio.wait_for(asyncio.gather(second, third), 1)
        for turn in (second.result(), third.result(), other, cheap):
            turn.end()
            turn.end()                                 # a second end does nothing
        assert turns._turns == []
    run(go())


def test_a_turn_is_waited_for_no_longer_than_evaluating_the_prefix_again_would_take():
    async def go():
        turns = ls.PromptTurns(lambda chars: 0.05, least=0.01)
        holder = await turns.take(PREFIX + "1")        # never ends
        started = time.monotonic()
        late = await asyncio.wait_for(turns.take(PREFIX + "2"), 2)
        assert 0.05 <= time.monotonic() - started < 1
        waiting = asyncio.create_task(turns.take(PREFIX + "3"))
        await asyncio.sleep(0.01)
        waiting.cancel()                                   # cancelled: it takes no turn
        await asyncio.gather(waiting, return_exceptions=True)
        assert turns._turns == [holder, late]
    run(go())


def test_no_turns_where_the_workers_do_not_share_prompts():
    async def go():
        turns = ls.PromptTurns(lambda chars: None)
        held = await turns.take(PREFIX + "1")
        beside = await asyncio.wait_for(turns.take(PREFIX + "2"), 1)   # no wait for `held`
        assert turns._turns == [held, beside]
        held.end()
    run(go())


def test_requests_sharing_a_costly_prompt_prefix_take_turns_on_shared_prompt_slots():
    """A vote and a single answer whose prompts share a prefix that is slow to evaluate again:
    the single answer waits until the whole vote (anchor, then samples) is done, while an
    unrelated request runs beside the vote at once. Where the prefix is quick to evaluate
    again, nothing waits."""
    async def go():
        proc = FakeProcess(samples=["Answer: 5"] * 8)
        proc.per_char = 1.0
        proc.gate = asyncio.Event()                 # holds the sampled streams
        pool = await slot_pool(proc)
        svc = slot_service(pool, adaptive=False)
        vote = asyncio.create_task(svc.complete(request(text=PREFIX + "1", swarm={"votes": 3})))
        await until(lambda: proc.open == 1 and proc.requests[-1]["temperature"] > 0)
        single = asyncio.create_task(svc.complete(request(text=PREFIX + "2", temperature=0)))
        other = asyncio.create_task(svc.complete(request(text="unrelated", temperature=0.5,
                                                         swarm={"votes": 1})))
        await until(lambda: proc.open == 2)         # the unrelated one runs beside the vote
        await asyncio.sleep(0.01)
        assert [b["prompt"] for b in proc.requests] == [PREFIX + "1"] * 2 + ["unrelated"]
        proc.gate.set()
        await asyncio.gather(vote, single, other)
        assert [b["prompt"] for b in proc.requests][3:] == [PREFIX + "2"]
        proc.per_char = 0.0                         # quick to evaluate again: no turns
        proc.gate.clear()
        held = asyncio.create_task(svc.complete(request(text=PREFIX + "3", temperature=0.5,
                                                        swarm={"votes": 1})))
        await until(lambda: proc.open == 1)
        await asyncio.wait_for(svc.complete(request(text=PREFIX + "4", temperature=0)), 1)
        proc.gate.set()
        await held
        await pool.stop()
    run(go())


# -- chat service over fake workers: tool calls ------------------------------------------------------

QWEN_LIKE = ("{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}"
             "{% endfor %}</tools> <tool_call><|im_end|>\n{% endif %}"
             "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
             "{% endfor %}{{ '<|im_start|>assistant\\n' }}")
READ_TOOL = {"type": "function", "function": {
    "name": "read_file", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                   "required": ["path"]}}}
CALL_TEXT = '<tool_call>\n{"name": "read_file", "arguments": {"path": "a.txt"}}\n</tool_call>'
WRITE_TOOL = {"type": "function", "function": {
    "name": "write_file", "description": "Write a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"},
                                                   "content": {"type": "string"}},
                   "required": ["path", "content"]}}}


def tool_service(pool, **cfg):
    cfg = {"mode": "fastest", **cfg}
    return ls.ChatService(pool, ls.PromptRenderer(QWEN_LIKE), "fake-model", 10_000,
                          ls.Config(**cfg))


def tool_request(stream=False, **extra):
    return request(stream=stream, text="read a.txt", **{"tools": [READ_TOOL], **extra})


def chunks_of(text, size=3):
    return tuple(text[i:i + size] for i in range(0, len(text), size))


def sse_payloads(events):
    return [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]


def test_calls_the_samples_of_one_request_start_are_finished_once_that_request_is_done():
    """On shared-prompt slots, a sample that starts a call is finished under the grammar only
    when the whole n-choice request is done: its slots then hold the prompt, which a
    continuation sent while they were busy would evaluate again on another slot."""
    async def go():
        wrong = "Let me look.\n" + CALL_TEXT.replace("read_file", "read_package_json")
        proc = FakeProcess(greedy=wrong, samples=[wrong, "I cannot.", wrong])
        proc.call = CALL_TEXT
        proc.name_logprobs = {"read_package_json": -0.5, "read_file": -1.0}
        pool = await slot_pool(proc)
        svc = ls.ChatService(pool, ls.PromptRenderer(QWEN_LIKE), "fake-model", 10_000,
                             ls.Config(mode="vote", adaptive=False))
        reply, _, swarm = await svc.complete(tool_request(swarm={"votes": 4}))
        assert [b.get("n", 1) for b in proc.requests if "grammar" not in b] == [1, 3]
        assert proc.continued == [0, 0, 0]        # the anchor's, then the two samples' calls,
                                                  # one after another
        assert reply["choices"][0]["finish_reason"] == "tool_calls"
        assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "read_file"
        assert sum(c["constrained"] for c in swarm["candidates"]) == 3
        await pool.stop()
    run(go())


def test_a_call_the_model_starts_is_finished_under_the_grammar_and_returned_as_tool_calls():
    async def go():
        w = FakeWorker(1, tokens=chunks_of("Let me look.\n" + CALL_TEXT.replace(
            "read_file", "read_package_json")))
        w.completion = chunks_of(CALL_TEXT)
        w.name_logprobs = {"read_package_json": -0.5, "read_file": -1.0}   # odds e^-0.5
        pool = await started_pool([w])
        reply, gen, _ = await tool_service(pool).complete(tool_request())
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Let me look."
        [call] = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 5
        assert call["function"]["name"] == "read_file"
        assert json.loads(call["function"]["arguments"]) == {"path": "a.txt"}
        (chat_route, chat_body), *scoring, (route, body) = w.requests
        assert chat_route == "/v1/chat/completions" and chat_body["tools"] == [READ_TOOL]
        assert [scored_name(b) for _, b in scoring] == ["read_package_json", "read_file"]
        assert all(b["prompt"].endswith('Let me look.\n<tool_call>\n{"name": "')
                   for _, b in scoring)
        assert route == "/v1/completions" and "read_file" in body["grammar"]
        assert body["prompt"].endswith("<|im_start|>assistant\nLet me look.\n")
        await pool.stop()
    run(go())


GIT_CALL = CALL_TEXT.replace('"read_file", "arguments": {"path": "a.txt"}',
                             '"git_status", "arguments": {}')


@pytest.mark.parametrize("read_file", [-6.0, -0.5])
def test_a_call_to_a_tool_not_offered_and_not_like_an_offered_one_stays_text(read_file):
    """The model writes a call to git_status, which is not offered; read_file, the only tool,
    is far less likely in its place (odds e^-5.8), or likely (e^-0.3) but named for another
    thing: no call is forced on it, the reply stays its text."""
    async def go():
        w = FakeWorker(1, tokens=chunks_of("Running it.\n" + GIT_CALL))
        w.completion = chunks_of(CALL_TEXT)
        w.name_logprobs = {"git_status": -0.2, "read_file": read_file}
        pool = await started_pool([w])
        reply, gen, _ = await tool_service(pool).complete(tool_request())
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
        assert choice["message"]["content"] == "Running it.\n" + GIT_CALL
        assert gen.unmatched_call == "git_status" and not gen.constrained
        assert not any("grammar" in b and not scored_name(b) for _, b in w.requests)
        await pool.stop()
    run(go())


@pytest.mark.parametrize("written,stays", [
    ('{"name": "read_file", "arguments": {}}', True),              # closed without its path
    ('{"name": "read_file"}', True),                               # no arguments at all
    ('{"name": "read_file", "arguments": {"file": "a.txt"}}', False),  # under another name
    ('{"name": "read_file", "arguments": {"path": 3}}', False),    # wrote it, wrongly: fixed
    ('{"name": "read_file", "arguments": {"pa', False),            # cut off: finished
])
def test_a_required_argument_the_model_left_out_is_not_invented(written, stays):
    """The model closes a call to read_file without the path it requires: the grammar would
    invent one, so the reply stays text. A path written wrongly or under another name, or a
    call cut off before its end, is finished under the grammar as before."""
    async def go():
        w = FakeWorker(1, tokens=chunks_of("Sure.\n<tool_call>\n" + written))
        w.completion = chunks_of(CALL_TEXT)
        pool = await started_pool([w])
        reply, gen, _ = await tool_service(pool).complete(tool_request())
        choice = reply["choices"][0]
        if stays:
            assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
            assert gen.unmatched_call == "read_file" and not gen.constrained
            assert not any("grammar" in b for _, b in w.requests)
        else:
            assert choice["message"]["tool_calls"][0]["function"]["arguments"] == \
                '{"path":"a.txt"}' and gen.constrained
        await pool.stop()
    run(go())


def test_unwritten_required_reads_only_whole_calls_to_offered_tools():
    tools = ls.tool_specs([READ_TOOL, WRITE_TOOL])
    text = 'x {"name": "write_file", "parameters": {"path": "a"}}'
    assert ls.unwritten_required(text, text.index("write_file"), tools) == ["content"]
    text = '{"name": "other", "arguments": {}}'
    assert ls.unwritten_required(text, text.index("other"), tools) == []
    text = '{"name": "write_file", "arguments": "{\\"path\\": \\"a\\"}"}'   # a JSON string
    assert ls.unwritten_required(text, text.index("write_file"), tools) == ["content"]


def test_a_valid_call_as_the_model_wrote_it_needs_no_second_request():
    async def go():
        w = FakeWorker(1, tokens=chunks_of("Let me look.\n" + CALL_TEXT))
        pool = await started_pool([w])
        reply, gen, _ = await tool_service(pool).complete(tool_request())
        assert reply["choices"][0]["finish_reason"] == "tool_calls" and not gen.constrained
        assert [route for route, _ in w.requests] == ["/v1/chat/completions"]
        await pool.stop()
    run(go())


def test_a_call_to_an_offered_tool_with_bad_arguments_is_finished_for_that_tool():
    """The name is an offered tool's, its arguments do not fit: the grammar rewrites the call
    for that tool alone (no other name can come out), with no names scored."""
    async def go():
        bad = CALL_TEXT.replace('{"path": "a.txt"}', '{"file": 3}')
        w = FakeWorker(1, tokens=chunks_of(bad))
        w.completion = chunks_of(CALL_TEXT)
        pool = await started_pool([w])
        service = ls.ChatService(pool, ls.PromptRenderer(QWEN_LIKE), "fake-model", 10_000,
                                 ls.Config(mode="fastest"))
        reply, gen, _ = await service.complete(tool_request(tools=[READ_TOOL, WRITE_TOOL]))
        assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "read_file"
        (_, _), (route, body) = w.requests
        assert route == "/v1/completions" and "read_file" in body["grammar"]
        assert "write_file" not in body["grammar"] and gen.constrained
        await pool.stop()
    run(go())


def test_prose_with_parentheses_is_no_call_and_needs_no_second_request():
    text = "Call read_file(path) to see it; f(x) = 2x.\n{\"city\": \"Paris\"}"
    async def go():
        w = FakeWorker(1, tokens=chunks_of(text))
        pool = await started_pool([w])
        reply, _, _ = await tool_service(pool).complete(tool_request())
        message = reply["choices"][0]["message"]
        assert message == {"role": "assistant", "content": text}
        assert reply["choices"][0]["finish_reason"] == "stop" and len(w.requests) == 1
        await pool.stop()
    run(go())


def test_streamed_call_is_deltas_in_the_shape_clients_validate():
    async def go():
        w = FakeWorker(1, tokens=chunks_of(CALL_TEXT))
        w.completion = chunks_of(CALL_TEXT)
        pool = await started_pool([w])
        gen = ls.Generation()
        stream, _ = await tool_service(pool).open_stream(
            tool_request(stream=True, stream_options={"include_usage": True}), gen)
        chunks = sse_payloads([e async for e in stream])
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert not any(d.get("content") for d in deltas)          # no call text as content
        calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
        first = calls[0][0]
        assert first["index"] == 0 and first["id"].startswith("call_")
        assert first["type"] == "function" and first["function"]["name"] == "read_file"
        assert all(set(c[0]) == {"index", "function"} for c in calls[1:])
        args = "".join(c[0]["function"]["arguments"] for c in calls)
        assert json.loads(args) == {"path": "a.txt"}
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "tool_calls" and chunks[-1]["choices"] == []
        assert "usage" in chunks[-1] and "swarm" in chunks[-1]
        await pool.stop()
    run(go())


@pytest.mark.parametrize("text,content,names", [
    ("Let me look.\n" + CALL_TEXT, "Let me look.", ["read_file"]),
    ("Let me look.\n" + CALL_TEXT + "\n<tool_call>\n{", "Let me look.", ["read_file"]),
    ("I cannot (really).", "I cannot (really).", []),
])
def test_a_streamed_reply_without_the_call_grammar_sends_no_call_text_as_content(
        text, content, names):
    """With the call grammar off, a call's text is held back as it streams and parsed at the
    end: the client gets the prose as content and the calls as tool_calls, never the call's
    text (a broken call beside a good one included); a reply without calls streams whole."""
    async def go():
        w = FakeWorker(1, tokens=chunks_of(text))
        pool = await started_pool([w])
        stream, _ = await tool_service(pool).open_stream(
            tool_request(stream=True, swarm={"constrain_calls": False}), ls.Generation())
        chunks = sse_payloads([e async for e in stream])
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("content") or "" for d in deltas).strip() == content
        assert [d["tool_calls"][0]["function"]["name"] for d in deltas
                if d.get("tool_calls") and "name" in d["tool_calls"][0]["function"]] == names
        assert [route for route, _ in w.requests] == ["/v1/chat/completions"]   # no grammar
        await pool.stop()
    run(go())


def test_tool_choice_none_sends_no_tools_and_parses_nothing():
    async def go():
        w = FakeWorker(1, tokens=chunks_of(CALL_TEXT))
        pool = await started_pool([w])
        reply, _, _ = await tool_service(pool).complete(tool_request(tool_choice="none"))
        assert reply["choices"][0]["message"] == {"role": "assistant", "content": CALL_TEXT}
        [(_, body)] = w.requests
        assert "tools" not in body and "grammar" not in body
        await pool.stop()
    run(go())


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "read_file"}}])
def test_required_and_named_choices_constrain_the_whole_reply(choice):
    async def go():
        w = FakeWorker(1, tokens=chunks_of(CALL_TEXT))
        pool = await started_pool([w])
        reply, _, _ = await tool_service(pool).complete(tool_request(tool_choice=choice))
        assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "read_file"
        [(route, body)] = w.requests
        assert route == "/v1/chat/completions" and "read_file" in body["grammar"]
        await pool.stop()
    run(go())


def test_a_vote_over_calls_takes_the_majority_call():
    other = CALL_TEXT.replace("a.txt", "b.txt")
    async def go():
        workers = [FakeWorker(1, tokens=chunks_of(other)), FakeWorker(2, tokens=(CALL_TEXT,)),
                   FakeWorker(3, tokens=(CALL_TEXT,))]
        for w in workers:
            w.completion = w.tokens
        pool = await started_pool(workers)
        svc = tool_service(pool, mode="vote", votes=3, adaptive=False)
        reply, _, swarm = await svc.complete(tool_request())
        call = reply["choices"][0]["message"]["tool_calls"][0]
        assert json.loads(call["function"]["arguments"]) == {"path": "a.txt"}
        assert swarm["strategy"] == "majority" and swarm["votes"][0] == 2
        await pool.stop()
    run(go())


def test_constrain_calls_off_parses_the_models_own_text():
    invented = CALL_TEXT.replace("read_file", "read_package_json")
    async def go():
        w = FakeWorker(1, tokens=chunks_of(invented))
        pool = await started_pool([w])
        reply, _, _ = await tool_service(pool).complete(
            tool_request(swarm={"constrain_calls": False}))
        assert reply["choices"][0]["message"] == {"role": "assistant", "content": invented}
        assert [route for route, _ in w.requests] == ["/v1/chat/completions"]
        await pool.stop()
    run(go())


@pytest.mark.parametrize("body,cfg,anchor,temps", [
    ({}, {}, True, (0.0, 0.7, 0.7)),                                  # temperature left to the swarm
    ({"temperature": 0.9}, {}, False, (0.9, 0.9, 0.9)),               # the client chose
    ({"swarm": {"anchor": False}}, {}, False, (0.7, 0.7, 0.7)),       # the request opts out
    ({}, {"anchor": False}, False, (0.7, 0.7, 0.7)),                  # --no-anchor
    ({"swarm": {"anchor": True}}, {"anchor": False}, True, (0.0, 0.7, 0.7)),  # request beats flag
])
def test_vote_plan_anchor(body, cfg, anchor, temps):
    req = ls.parse_chat_request({"messages": [{"role": "user", "content": "hi"}],
                                 "swarm": {"votes": 3, **body.pop("swarm", {})}, **body})
    plan = ls.vote_plan(req, ls.Config(**cfg), healthy=3, instances=3)
    assert plan.anchor is anchor and plan.k == 3
    assert tuple(plan.temperature_of(i) for i in range(3)) == temps


def test_anchor_option_must_be_a_boolean():
    with pytest.raises(ls.HTTPError) as err:
        ls.parse_chat_request({"messages": [{"role": "user", "content": "hi"}],
                               "swarm": {"anchor": "yes"}})
    assert err.value.status == 400 and err.value.param == "swarm.anchor"


ANSWERED_READ = [{"role": "user", "content": "read a.txt"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "call_1", "type": "function", "function": {
                         "name": "read_file", "arguments": '{"path": "a.txt"}'}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "42"}]


def answered_read_request(*more_messages):
    """A 3-vote request whose conversation ends on the result of read_file(a.txt) (then
    `more_messages`); calls are parsed from the text as written (no grammar), without the loop
    guard (these tests are of the vote's ranking)."""
    return ls.parse_chat_request({"messages": ANSWERED_READ + list(more_messages),
                                  "tools": [READ_TOOL], "temperature": 0.7,
                                  "swarm": {"votes": 3, "constrain_calls": False,
                                            "loop_guard": False}})


def test_a_candidate_that_repeats_the_answered_call_loses_to_one_that_moves_on():
    """The conversation ends on the result of read_file(a.txt). Two candidates call it again,
    one answers in text: the answer wins, though the repeat has the larger group."""
    async def go():
        workers = [FakeWorker(1, tokens=chunks_of(CALL_TEXT)),
                   FakeWorker(2, tokens=chunks_of(CALL_TEXT)),
                   FakeWorker(3, tokens=("It says 42.",))]
        pool = await started_pool(workers)
        svc = tool_service(pool, mode="vote", adaptive=False)
        req = answered_read_request()
        reply, _, swarm = await svc.complete(req)
        assert reply["choices"][0]["message"]["content"] == "It says 42."
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert sorted(c["repeat"] for c in swarm["candidates"]) == [False, True, True]

        # the same calls after a user turn are no repeat: the bigger group wins again
        req = answered_read_request({"role": "assistant", "content": "It says 42."},
                                    {"role": "user", "content": "read it again"})
        reply, _, swarm = await svc.complete(req)
        assert reply["choices"][0]["finish_reason"] == "tool_calls"
        assert not any(c["repeat"] for c in swarm["candidates"])
        await pool.stop()
    run(go())


class RepeatOnce(FakeWorker):
    """Calls read_file(a.txt) again on its first chat, answers in text after that."""

    async def stream_chat(self, body, timeout, route="/v1/chat/completions"):
        self.tokens = chunks_of(CALL_TEXT) if getattr(self, "chats", 0) == 0 else ("It says 42.",)
        async for chunk in super().stream_chat(body, timeout, route):
            yield chunk


def test_two_agreeing_repeats_do_not_end_an_adaptive_vote():
    """Adaptive votes stop once the first two agree, unless what they agree on is a repeat: then
    the rest of the budget is spent, and the candidate that moves on wins."""
    async def go():
        workers = [RepeatOnce(1), RepeatOnce(2), FakeWorker(3, tokens=("It says 42.",))]
        pool = await started_pool(workers)
        svc = tool_service(pool, mode="vote", adaptive=True)
        req = answered_read_request()
        reply, _, swarm = await svc.complete(req)
        assert swarm["samples"] == 3 and swarm["cancelled"] == 0
        assert [c["repeat"] for c in swarm["candidates"]][:2] == [True, True]
        assert reply["choices"][0]["message"]["content"] == "It says 42."
        await pool.stop()
    run(go())


class Looper(FakeWorker):
    """Calls read_file(a.txt) again (a repeat, after ANSWERED_READ) unless the conversation ends
    on the loop guard's note; then says `after_note`."""

    after_note = ("It says 42.",)

    async def stream_chat(self, body, timeout, route="/v1/chat/completions"):
        last = body["messages"][-1]
        noted = last["role"] == "system" and "Do not call read_file again" in last["content"]
        self.tokens = self.after_note if noted else chunks_of(CALL_TEXT)
        async for chunk in super().stream_chat(body, timeout, route):
            yield chunk


def guarded_request(stream=False, **extra):
    """The conversation of ANSWERED_READ, read_file offered, calls parsed as written."""
    swarm = {"constrain_calls": False, **extra.pop("swarm", {})}
    return ls.parse_chat_request({"messages": ANSWERED_READ, "tools": [READ_TOOL],
                                  "stream": stream, "swarm": swarm, **extra})


def sent_notes(workers):
    """The loop guard's notes the workers were sent."""
    return [body["messages"][-1]["content"] for w in workers for _, body in
            getattr(w, "requests", []) if body["messages"][-1]["role"] == "system"]


def test_the_loop_guard_asks_one_worker_again_with_a_note_and_its_answer_wins():
    async def go():
        workers = [Looper(1)]
        pool = await started_pool(workers)
        reply, _, swarm = await tool_service(pool).complete(guarded_request(temperature=0))
        assert reply["choices"][0]["message"] == {"role": "assistant", "content": "It says 42."}
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert [(c["repeat"], c["again"], c["winner"]) for c in swarm["candidates"]] == \
            [(True, False, False), (False, True, True)]
        assert sent_notes(workers) == [ls.LOOP_NOTE.format(
            calls='read_file({"path":"a.txt"})', names="read_file")]
        assert swarm["samples"] == 2
        await pool.stop()
    run(go())


def test_the_loop_guard_streams_the_note_answer_after_the_first_ones_text():
    async def go():
        pool = await started_pool([Looper(1)])
        gen = ls.Generation()
        stream, _ = await tool_service(pool).open_stream(
            guarded_request(stream=True, temperature=0, stream_options={"include_usage": True}),
            gen)
        payloads = sse_payloads([e async for e in stream])
        deltas = [p["choices"][0]["delta"] for p in payloads if p["choices"]]
        assert "".join(d.get("content") or "" for d in deltas) == "It says 42."
        assert not any("tool_calls" in d for d in deltas)
        finish = [p["choices"][0]["finish_reason"] for p in payloads if p["choices"]]
        assert finish[-1] == "stop"
        usage = payloads[-1]["usage"]
        assert usage["completion_tokens"] > 0
        assert [c["again"] for c in payloads[-1]["swarm"]["candidates"]] == [False, True]
        await pool.stop()
    run(go())


@pytest.mark.parametrize("off", [{"swarm": {"loop_guard": False}}, {"cfg": {"loop_guard": False}}])
def test_the_loop_guard_can_be_turned_off_by_request_or_setting(off):
    async def go():
        workers = [Looper(1)]
        pool = await started_pool(workers)
        svc = tool_service(pool, **off.get("cfg", {}))
        reply, _, swarm = await svc.complete(guarded_request(temperature=0, **{
            k: v for k, v in off.items() if k != "cfg"}))
        assert reply["choices"][0]["finish_reason"] == "tool_calls"
        assert len(swarm["candidates"]) == 1 and sent_notes(workers) == []
        await pool.stop()
    run(go())


def test_a_repeat_stands_when_the_note_answer_repeats_too():
    async def go():
        workers = [Looper(1)]
        workers[0].after_note = chunks_of(CALL_TEXT)
        pool = await started_pool(workers)
        reply, _, swarm = await tool_service(pool).complete(guarded_request(temperature=0))
        assert reply["choices"][0]["finish_reason"] == "tool_calls"
        assert [(c["again"], c["winner"]) for c in swarm["candidates"]] == \
            [(False, True), (True, False)]
        await pool.stop()
    run(go())


def test_the_loop_guard_leaves_the_repeat_when_the_template_refuses_a_late_system_message():
    strict = ("{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
              "{{ raise_exception('System message must be first') }}{% endif %}"
              "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{{ '<|im_start|>assistant\\n' }}")
    async def go():
        workers = [Looper(1)]
        pool = await started_pool(workers)
        svc = ls.ChatService(pool, ls.PromptRenderer(strict), "fake-model", 10_000,
                             ls.Config(mode="fastest"))
        reply, _, swarm = await svc.complete(guarded_request(temperature=0))
        assert reply["choices"][0]["finish_reason"] == "tool_calls"
        assert len(workers[0].requests) == 1 and len(swarm["candidates"]) == 1
        await pool.stop()
    run(go())


@pytest.mark.parametrize("votes", [1, 3])
def test_a_note_that_would_overflow_the_context_leaves_the_repeat_not_an_error(votes):
    """The request fits; with the note it would not. The loop guard gives up (the repeat is the
    answer), where a 400 would tell the client its own request was too long."""
    async def go():
        workers = [Looper(i) for i in range(1, votes + 1)]
        pool = await started_pool(workers)
        req = guarded_request(swarm={"votes": votes})
        prompt = ls.RequestPreparer(ls.PromptRenderer(QWEN_LIKE), 10_000).prepare(req).prompt
        n_ctx = len(prompt.split()) + 10                 # the note has more than 10 words
        svc = ls.ChatService(pool, ls.PromptRenderer(QWEN_LIKE), "fake-model", n_ctx,
                             ls.Config(mode="vote", adaptive=False))
        reply, _, swarm = await svc.complete(req)
        assert reply["choices"][0]["finish_reason"] == "tool_calls"
        assert not any(c["again"] for c in swarm["candidates"]) and sent_notes(workers) == []
        await pool.stop()
    run(go())


def test_an_anchored_vote_whose_anchor_repeats_votes_again_on_the_note():
    """The default request (temperature omitted): the greedy anchor repeats, so the vote runs
    again on the request with the note; the first vote's repeats join it (they rank last). On
    workers that share a prompt the first vote's samples are never sent (the e2e test)."""
    async def go():
        workers = [Looper(i) for i in (1, 2, 3)]
        pool = await started_pool(workers)
        svc = tool_service(pool, mode="vote", adaptive=False)
        reply, _, swarm = await svc.complete(guarded_request(swarm={"votes": 3}))
        assert reply["choices"][0]["message"]["content"] == "It says 42."
        first = [c for c in swarm["candidates"] if not c["again"]]
        assert all(c["repeat"] for c in first) and sum(c["greedy"] for c in first) == 1
        again = [c for c in swarm["candidates"] if c["again"]]
        assert len(again) == 3 and not any(c["repeat"] for c in again)
        assert len(sent_notes(workers)) == 3
        await pool.stop()
    run(go())


def test_a_vote_whose_largest_group_repeats_votes_again_on_the_note():
    """No anchor (temperature set): two of three candidates repeat and one moves on. The
    repeats lead, so the vote is in the loop: it runs again on the note, whose answers win."""
    class Stray(Looper):
        after_note = ("It says 42.",)

        async def stream_chat(self, body, timeout, route="/v1/chat/completions"):
            async for chunk in super().stream_chat(body, timeout, route):
                if chunk["choices"][0]["delta"].get("content") == CALL_TEXT[:3]:
                    chunk = {"choices": [{"delta": {"content": "Let me see."},
                                          "finish_reason": None}]}
                elif "content" in chunk["choices"][0]["delta"] and \
                        chunk["choices"][0]["delta"]["content"] != "It says 42.":
                    continue
                yield chunk

    async def go():
        workers = [Looper(1), Looper(2), Stray(3)]
        pool = await started_pool(workers)
        svc = tool_service(pool, mode="vote", adaptive=False)
        reply, _, swarm = await svc.complete(guarded_request(temperature=0.7, swarm={"votes": 3}))
        assert reply["choices"][0]["message"]["content"] == "It says 42."
        first = [c for c in swarm["candidates"] if not c["again"]]
        assert [c["repeat"] for c in first] == [True, True]        # the stray one is dropped
        assert len([c for c in swarm["candidates"] if c["again"]]) == 3
        assert swarm["samples"] == 6
        await pool.stop()
    run(go())


def test_a_reply_that_restates_the_answered_call_before_a_new_one_keeps_only_the_new():
    """Small models replay their plan: read_file(a.txt) again (its result ends the conversation),
    then the next step. An agent would read the file twice, or commit twice; the replay goes."""
    write = '<tool_call>\n{"name": "write_file", "arguments": {"path": "b.txt", "content": "42"}}' \
            '\n</tool_call>'
    async def go():
        pool = await started_pool([FakeWorker(1, tokens=chunks_of(CALL_TEXT + "\n" + write))])
        req = guarded_request(temperature=0, tools=[READ_TOOL, WRITE_TOOL])
        reply, _, swarm = await tool_service(pool).complete(req)
        calls = reply["choices"][0]["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["write_file"]
        assert swarm["candidates"][0]["repeat"] is False
        await pool.stop()
    run(go())


def test_a_second_call_cut_off_by_max_tokens_leaves_no_fragment_in_the_content():
    async def go():
        w = FakeWorker(1, tokens=chunks_of("Let me look.\n" + CALL_TEXT))
        w.completion = chunks_of(CALL_TEXT + '\n<tool_call>\n{"name": "read_file", "argu')
        w.completion_finish = "length"
        pool = await started_pool([w])
        reply, _, _ = await tool_service(pool).complete(tool_request())
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Let me look."
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["read_file"]
        await pool.stop()
    run(go())


# -- the parts: a request prepared once, an attempt on a leased worker, peers behind PeerVoters ----

class CountingRenderer(ls.PromptRenderer):
    """A renderer that counts its renders."""

    renders = 0

    def render(self, messages, tools=()):
        self.renders += 1
        return super().render(messages, tools)


def record_counts(workers):
    """The texts the workers are asked to count, in order (their count_tokens, wrapped)."""
    counted = []
    for w in workers:
        async def count(text, timeout=None, original=w.count_tokens):
            counted.append(text)
            return await original(text, timeout)
        w.count_tokens = count
    return counted


def test_a_vote_prepares_its_request_once_and_counts_only_the_winner():
    async def go():
        workers = voters("Answer: 7 apples", "Answer: 7 apples", "Answer: 9 pears")
        counted = record_counts(workers)
        pool = await started_pool(workers)
        renderer = CountingRenderer(None)
        svc = ls.ChatService(pool, renderer, "fake-model", 100,
                             ls.Config(mode="vote", adaptive=False))
        reply, _, swarm = await svc.complete(request(swarm={"votes": 3}))
        assert renderer.renders == 1
        assert sorted(counted) == ["", "Answer: 7 apples", "hi there"]   # the winner, its prompt
        assert reply["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        winner = next(c for c in swarm["candidates"] if c["winner"])
        assert winner["tokens"] == 3                     # counted: the usage's
        assert [c["tokens"] for c in swarm["candidates"] if not c["winner"]] == [1, 1]   # chunks
        await pool.stop()
    run(go())


def test_one_workers_reply_and_a_vote_report_the_same_swarm_fields():
    async def go():
        pool = await started_pool(voters("Answer: 7", "Answer: 7"))
        svc = chat_service(pool, mode="vote", adaptive=False)
        _, _, single = await svc.complete(request(temperature=0))
        _, _, voted = await svc.complete(request(swarm={"votes": 2}))
        assert single["strategy"] == "single" and voted["strategy"] == "majority"
        assert single.keys() == voted.keys()
        assert single["candidates"][0].keys() == voted["candidates"][0].keys()
        assert single["candidates"][0]["greedy"] is True
        assert single["candidates"][0]["repeat"] is False
        await pool.stop()
    run(go())


class WatchedWorker(FakeWorker):
    """Counts its streams still open: a closed attempt must close its worker's stream at once."""

    open_streams = 0

    async def stream_chat(self, body, timeout, route="/v1/chat/completions"):
        self.open_streams += 1
        try:
            async for chunk in super().stream_chat(body, timeout, route):
                yield chunk
        finally:
            self.open_streams -= 1


def test_an_attempt_holds_its_worker_until_its_deltas_end_or_it_is_closed():
    async def go():
        w = WatchedWorker(1, tokens=("a", "b", "c"))
        pool = await started_pool([w])
        generator = ls.Generator(pool, ls.Config(), 100)
        prepared = ls.RequestPreparer(ls.PromptRenderer(None), 100).prepare(request())

        def state():
            return pool.describe()[0]["state"]

        attempt = await generator.start(prepared)
        assert state() == "busy"
        await attempt.aclose()                           # never read: nothing ran on the worker
        assert state() == "idle"
        attempt = await generator.start(prepared, live=True)
        deltas = attempt.deltas()
        assert await deltas.__anext__() == "a" and w.open_streams == 1
        with pytest.raises(RuntimeError):
            attempt.deltas()                             # read once
        await deltas.aclose()
        assert w.open_streams == 0 and state() == "draining"   # it may still be generating
        await asyncio.sleep(0.01)
        assert state() == "idle"
        gen = await (await generator.start(prepared, {"seed": 5})).run()
        assert gen.text == "abc" and gen.counted and gen.usage()["completion_tokens"] == 1
        assert w.requests[-1][1]["seed"] == 5 and state() == "idle"
        await pool.stop()
    run(go())


class FakePeers:
    """PeerVoters in process: peer name -> its answer (text, weight), the exception it fails
    with, or None for a peer that never answers."""

    def __init__(self, answers, wait):
        self.answers, self.wait, self.tasks = answers, wait, []

    def voters(self):
        return list(self.answers)

    def ask_all(self, req, temperature, started):
        asks = [ls.PeerAsk("node-" + name, name, "10.0.0.9",
                           asyncio.create_task(self._answer(name, outcome, started)))
                for name, outcome in self.answers.items()]
        self.tasks += [ask.task for ask in asks]
        return asks

    async def _answer(self, name, outcome, started):
        await asyncio.sleep(0)
        if outcome is None:
            await asyncio.Event().wait()
        if isinstance(outcome, Exception):
            raise outcome
        text, weight = outcome
        gen = ls.Generation(parts=[text], worker="peer:" + name, attempts=1, started=started,
                            prompt_tokens=2, completion_tokens=3, counted=True)
        return ls.Candidate(worker=gen.worker, text=text, finish_reason="stop", latency=0.01,
                            tokens=3, weight=weight), gen

    def answer_wait(self, started):
        return self.wait


def test_the_vote_runner_adds_the_peers_answers_and_records_each_fate():
    async def go():
        pool = await started_pool(voters("Answer: 5", "Answer: 9"))
        peers = FakePeers({"beta": ("Answer: 9", 2.0), "liar": ls.PeerError("bad signature"),
                           "mute": None}, wait=0.05)
        svc = ls.ChatService(pool, ls.PromptRenderer(None), "fake-model", 100,
                             ls.Config(mode="vote", adaptive=False), peers=peers)
        reply, _, swarm = await svc.complete(request(swarm={"votes": 2}))
        assert reply["choices"][0]["message"]["content"] == "Answer: 9"
        fates = {p["name"]: p for p in swarm["peers"]}
        assert fates["beta"] == {"node": "node-beta", "name": "beta", "host": "10.0.0.9",
                                 "status": "voted", "weight": 2.0, "latency_ms": 10.0}
        assert fates["liar"]["status"] == "dropped" and fates["liar"]["reason"] == "bad signature"
        assert fates["mute"]["status"] == "dropped" and "no answer within" in fates["mute"]["reason"]
        assert all(task.done() for task in peers.tasks)   # the mute peer's question cancelled
        peer = next(c for c in swarm["candidates"] if c["worker"] == "peer:beta")
        assert peer["tokens"] == 3 and peer["weight"] == 2.0 and swarm["k"] == 2
        _, _, swarm = await svc.complete(request(swarm={"votes": 2, "federate": False}))
        assert "peers" not in swarm and len(peers.tasks) == 3    # not asked again
        await pool.stop()
    run(go())

# -- raw completions (/v1/completions) ---------------------------------------------------------------

def completion_app(workers, **cfg):
    async def make():
        pool = await started_pool(workers)
        return pool, ls.SwarmApp(ls.Config(**cfg), pool, chat_service(pool), "m")
    return make()


async def post(app, path, body):
    request = ls.Request("POST", path, path, "HTTP/1.1", (), json.dumps(body).encode())
    return await app.handle(request)


def test_a_completion_is_one_workers_text_in_openais_shape():
    async def go():
        w = FakeWorker(1)
        w.completion, w.completion_finish = ("def", " add", "(a, b)"), "length"
        other = FakeWorker(2)
        pool, app = await completion_app([w, other])
        reply = json.loads((await post(app, "/v1/completions", {
            "model": "local-swarm", "prompt": "# add two numbers\n", "max_tokens": 3,
            "temperature": 0.2})).body)
        assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-")
        assert reply["model"] == "local-swarm"
        [choice] = reply["choices"]
        assert choice == {"text": "def add(a, b)", "index": 0, "logprobs": None,
                          "finish_reason": "length"}
        assert reply["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
        (route, body), = w.requests
        assert route == "/v1/completions" and body["prompt"] == "# add two numbers\n"
        assert body["max_tokens"] == 3 and body["temperature"] == 0.2 and "n" not in body
        assert not getattr(other, "requests", [])                  # one worker: never voted
        await pool.stop()
    run(go())


def test_a_streamed_completion_sends_each_piece_then_its_finish_and_usage():
    async def go():
        w = FakeWorker(1)
        w.completion = ("x", " = ", "1")
        pool, app = await completion_app([w])
        reply = await post(app, "/v1/completions", {
            "prompt": ["a", "b"], "stream": True, "stream_options": {"include_usage": True}})
        events = [e async for e in reply.stream]
        assert events[-1] == ls.SSE_DONE
        chunks = sse_payloads(events)
        assert all(c["object"] == "text_completion" for c in chunks)
        texts = [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks
                 if c["choices"] and c["choices"][0]["text"]]
        assert texts == [(0, "x"), (0, " = "), (0, "1"), (1, "x"), (1, " = "), (1, "1")]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes.count("stop") == 2 and chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == 6
        assert [b["prompt"] for _, b in w.requests] == ["a", "b"]
        await pool.stop()
    run(go())


def test_n_completions_per_prompt_each_its_own_seed_and_index():
    async def go():
        w = FakeWorker(1)
        w.completion = ("x",)
        pool, app = await completion_app([w])
        reply = json.loads((await post(app, "/v1/completions", {
            "prompt": ["a", "b"], "n": 2, "seed": 7, "temperature": 0.8})).body)
        assert [(c["index"], c["text"]) for c in reply["choices"]] == \
            [(0, "x"), (1, "x"), (2, "x"), (3, "x")]
        assert [(b["prompt"], b["seed"]) for _, b in w.requests] == \
            [("a", 7), ("a", 8), ("b", 7), ("b", 8)]
        assert all("n" not in b for _, b in w.requests)
        stream = await post(app, "/v1/completions", {"prompt": "a", "n": 3, "stream": True})
        chunks = sse_payloads([e async for e in stream.stream])
        finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
        assert finished == [0, 1, 2]
        await pool.stop()
    run(go())


@pytest.mark.parametrize("body,param", [
    ({"prompt": [1, 2]}, "prompt"), ({}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"), ({"prompt": ["x"] * 5, "n": 16}, "n"),
    ({"prompt": "x", "best_of": 3}, "best_of"), ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "suffix": 3}, "suffix"), ({"prompt": "x", "temperature": 9}, "temperature"),
])
def test_completion_fields_it_cannot_honour_are_400(body, param):
    with pytest.raises(ls.HTTPError) as info:
        ls.parse_completion_request(body)
    assert info.value.status == 400 and info.value.param == param


def test_a_suffix_on_workers_that_cannot_fill_in_the_middle_is_400_before_any_generation():
    async def go():
        w = FakeWorker(1)
        pool, app = await completion_app([w])
        with pytest.raises(ls.HTTPError) as info:
            await post(app, "/v1/completions", {"prompt": "a", "suffix": "b", "stream": True})
        assert info.value.status == 400 and info.value.param == "suffix"
        assert not getattr(w, "requests", []) and pool.describe()[0]["state"] == "idle"
        await pool.stop()
    run(go())


def test_a_completion_goes_to_the_worker_that_completed_the_same_prefix():
    """Python workers are processes of their own: the next keystroke goes to the one whose
    cache holds the file's prefix, whichever the pool would pick otherwise."""
    async def go():
        a, b = FakeWorker(1), FakeWorker(2)
        a.completion = b.completion = ("x",)
        pool, app = await completion_app([a, b])
        await post(app, "/v1/completions", {"prompt": "def f():"})           # the first idle
        async with pool.lease((a.name,)):                                     # a is busy
            await post(app, "/v1/completions", {"prompt": "import os"})      # so b
        for prompt in ("import os\n", "def f():\n", "import os\n\n", "def f():\n  r"):
            await post(app, "/v1/completions", {"prompt": prompt})
        by = {w.name: [body["prompt"] for _, body in getattr(w, "requests", [])] for w in (a, b)}
        assert by == {a.name: ["def f():", "def f():\n", "def f():\n  r"],
                      b.name: ["import os", "import os\n", "import os\n\n"]}
        await pool.stop()
    run(go())


def test_a_completion_goes_ahead_of_the_chats_waiting_for_a_worker():
    async def go():
        w = FakeWorker(1, tokens=("chat",))
        w.completion = ("done",)
        pool, app = await completion_app([w], queue_size=8)
        order = []
        async with pool.lease():                           # the only worker is busy
            chat = asyncio.create_task(app.chat.complete(request()))
            await until(lambda: pool.waiting() == 1)
            done = asyncio.create_task(post(app, "/v1/completions", {"prompt": "p"}))
            await until(lambda: pool.waiting() == 2)
            chat.add_done_callback(lambda _: order.append("chat"))
            done.add_done_callback(lambda _: order.append("completion"))
        await asyncio.gather(chat, done)
        assert order == ["completion", "chat"]
        await pool.stop()
    run(go())


class EvaluatingSlot(FakeWorker):
    """A llama-server slot that evaluates each prompt (until `evaluated` is set) before its first
    token, as a real one does whether or not the client is still there; it notes each request's
    prompt when sent and when its stream was closed."""

    shares_prompt = takes_prompt = True

    def __init__(self, i, log):
        super().__init__(i)
        self.log, self.evaluated = log, asyncio.Event()

    def prompt_seconds(self, chars):
        return chars * 0.1          # "abc" takes 0.3 s to evaluate again

    async def stream_chat(self, body, timeout, route="/v1/completions"):
        self.log.append(("sent", body["prompt"]))
        try:
            await self.evaluated.wait()
            for text in ("x", "y"):
                yield {"choices": [{"index": 0, "text": text, "finish_reason": None}]}
                await asyncio.sleep(0)
            yield {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        finally:
            self.log.append(("closed", body["prompt"]))


def test_a_keystroke_abandoned_before_its_first_token_lets_its_prompt_finish_for_the_next():
    """The client of "abc" leaves while the worker evaluates it: the worker's request runs on
    to its first token (its slot then holds "abc"), and only then is it closed; "abcd", sent
    meanwhile, waits its turn for it rather than going to another slot to evaluate "abc" again.
    A request left after its first token is closed at once."""
    async def go():
        log = []
        slots = [EvaluatingSlot(1, log), EvaluatingSlot(2, log)]
        pool, app = await completion_app(slots)
        first = asyncio.create_task(post(app, "/v1/completions", {"prompt": "abc",
                                                                  "stream": True}))
        await until(lambda: log == [("sent", "abc")])
        first.cancel()                                   # the next keystroke
        await asyncio.gather(first, return_exceptions=True)
        second = asyncio.create_task(post(app, "/v1/completions", {"prompt": "abcd"}))
        for _ in range(20):
            await asyncio.sleep(0)
        assert log == [("sent", "abc")]                  # waiting its turn, not sent
        for slot in slots:
            slot.evaluated.set()
        reply = json.loads((await second).body)
        assert reply["choices"][0]["text"] == "xy"
        assert log[:3] == [("sent", "abc"), ("closed", "abc"), ("sent", "abcd")]
        stream = await post(app, "/v1/completions", {"prompt": "zz", "stream": True})
        events = stream.stream.__aiter__()
        assert b'"text":"x"' in await events.__anext__()
        await events.aclose()                            # left after its first token
        await until(lambda: log[-1] == ("closed", "zz"))
        await pool.stop()
    run(go())


def test_legacy_logprobs_from_either_workers_shape():
    native = {"logprobs": {"content": [
        {"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "a", "logprob": -0.5}]},
        {"token": "bc", "logprob": -1.0, "top_logprobs": []}]}}
    assert ls.legacy_logprobs(native, 3) == {
        "tokens": ["a", "bc"], "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"a": -0.5}, {}], "text_offset": [3, 4]}
    legacy = {"logprobs": {"tokens": ["x"], "token_logprobs": [-2.0], "top_logprobs": [None],
                           "text_offset": [0]}}
    assert ls.legacy_logprobs(legacy, 0)["token_logprobs"] == [-2.0]
    assert ls.legacy_logprobs({"logprobs": None}, 0) is None


def test_llama_cpps_own_completion_route_answers_in_its_shape():
    async def go():
        w = FakeWorker(1)
        w.completion = ("x", " = ", "1")
        pool, app = await completion_app([w])
        whole = json.loads((await post(app, "/completion", {"prompt": "a", "n_predict": 3,
                                                            "top_k": 5})).body)
        assert whole["content"] == "x = 1" and whole["stop"] is True
        assert whole["stop_type"] == "eos" and whole["tokens_predicted"] == 3
        (route, body), = w.requests
        assert route == "/v1/completions" and body["max_tokens"] == 3 and body["top_k"] == 5
        reply = await post(app, "/completion", {"prompt": "a", "stream": True})
        events = [e async for e in reply.stream]
        chunks = [json.loads(e[6:]) for e in events]
        assert [c["content"] for c in chunks] == ["x", " = ", "1", ""]
        assert [c["stop"] for c in chunks] == [False, False, False, True]
        await pool.stop()
    run(go())


@pytest.mark.parametrize("path,body,param", [
    ("/completion", {"prompt": ""}, "prompt"), ("/completion", {"prompt": 3}, "prompt"),
    ("/completion", {"prompt": "a", "n_predict": -2}, "n_predict"),
    ("/completion", {"prompt": "a", "input_extra": [{"text": "x"}]}, "input_extra"),
    ("/infill", {"input_prefix": "a", "input_suffix": 3}, "input_suffix"),
    ("/infill", {"input_prefix": "a", "input_extra": [{"filename": "f"}]}, "input_extra"),
    ("/infill", {"input_prefix": "a", "temperature": -1}, "temperature"),
])
def test_llama_cpp_routes_validate_their_fields(path, body, param):
    with pytest.raises(ls.HTTPError) as info:
        ls.parse_llama_completion(body, infill=path == "/infill")
    assert info.value.status == 400 and info.value.param == param


def test_infill_sends_llama_server_the_prefix_suffix_extra_and_typed_middle():
    req = ls.parse_llama_completion({"input_prefix": "def f(", "input_suffix": ")\n",
                                     "input_extra": [{"filename": "a.py", "text": "X = 1"}],
                                     "prompt": "x", "n_predict": 8}, infill=True)
    slot = type("Slot", (), {"shares_prompt": True})()
    service = ls.CompletionService(None, ls.Config(), "m", 100, None, None)
    route, body = service._worker_request(req, req.prompts[0], slot)
    assert route == "/infill" and body["input_prefix"] == "def f(" and body["prompt"] == "x"
    assert body["input_suffix"] == ")\n" and body["n_predict"] == 8
    assert body["input_extra"] == [{"filename": "a.py", "text": "X = 1"}]


def test_a_completion_longer_than_the_context_is_400_before_any_generation():
    async def go():
        w = FakeWorker(1)
        w.completion = ("never",)
        pool, app = await completion_app([w])               # the context is 100 tokens
        for stream in (False, True):
            with pytest.raises(ls.HTTPError) as info:
                await post(app, "/v1/completions", {"prompt": "word " * 150, "stream": stream})
            assert info.value.status == 400 and info.value.code == "context_length_exceeded"
            assert info.value.param == "prompt" and "150 tokens" in info.value.message
        assert not any(route == "/v1/completions" for route, _ in getattr(w, "requests", []))
        await pool.stop()
    run(go())



# -- embeddings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    ({}, "input"), ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [1, 2]}, "input"),
    ({"input": ["a", ""]}, "input"), ({"input": ["a"] * 257}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 64}, "dimensions"),
])
def test_embedding_fields_it_cannot_honour_are_400(body, param):
    with pytest.raises(ls.HTTPError) as info:
        ls.parse_embedding_request(body)
    assert info.value.status == 400 and info.value.param == param


def test_base64_embeddings_are_little_endian_float32():
    vector = [0.5, -1.25, 3.0]
    encoded = ls.encode_embedding(vector, "base64")
    assert list(ls.struct.unpack("<3f", ls.base64.b64decode(encoded))) == vector
    assert ls.encode_embedding(vector, "float") == vector


class FakeEmbedder:
    """An embedding process: started on demand, answers llama-server's /v1/embeddings shape in
    an order of its own; `too_large` answers as llama-server does to an over-long input."""

    name, url, client = "embedder-1", "http://fake", None

    def __init__(self):
        self.starts, self.running, self.too_large = 0, False, False

    def exited(self):
        return not self.running

    async def start(self):
        self.starts += 1
        self.running = True

    async def wait_ready(self, timeout):
        pass

    async def stop(self):
        self.running = False


def test_embeddings_start_their_process_once_and_keep_the_inputs_order(monkeypatch):
    server = FakeEmbedder()

    async def post_json(client, base, path, name, body, timeout):
        assert path == "/v1/embeddings"
        if server.too_large:
            raise ls.WorkerError("embedder-1: /v1/embeddings answered 500: input (3001 tokens) "
                                 "is too large to process", status=500)
        rows = [{"index": i, "embedding": [float(len(t)), 1.0]} for i, t in enumerate(body["input"])]
        return {"data": rows[::-1], "usage": {"prompt_tokens": 7, "total_tokens": 7}}
    monkeypatch.setattr(ls, "post_json", post_json)

    async def go():
        service = ls.EmbeddingService(server, "emb", 5, 5)
        reply = await service.embed(ls.parse_embedding_request({"input": ["a", "bbb"]}))
        assert [(d["index"], d["embedding"]) for d in reply["data"]] == [(0, [1.0, 1.0]),
                                                                         (1, [3.0, 1.0])]
        assert reply["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and reply["model"] == "emb"
        await service.embed(ls.parse_embedding_request({"input": "x"}))
        assert server.starts == 1                          # started once, when first asked
        server.running = False                             # it exited: the next request restarts
        await service.embed(ls.parse_embedding_request({"input": "x"}))
        assert server.starts == 2
        server.too_large = True
        with pytest.raises(ls.HTTPError) as info:
            await service.embed(ls.parse_embedding_request({"input": "x"}))
        assert info.value.status == 400 and info.value.param == "input"
        with pytest.raises(ls.HTTPError) as info:                       # the python kind
            await ls.EmbeddingService(None, "m", 5, 5).embed(
                ls.parse_embedding_request({"input": "x"}))
        assert info.value.status == 400
    run(go())
