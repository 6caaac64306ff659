"""Worker pool mechanics with small in-process fake workers (fail on cue); the real workers are
exercised in test_e2e.py."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

import local_swarm as ls
from conftest import until


class FakeWorker:
    """A scripted ls.Worker: what the protocol names, plus cues to fail on (die() ends its
    "process" as a crash would)."""

    takes_prompt = False                    # chat bodies, as llama_cpp.server gets them
    shares_prompt = False                   # one choice per request

    def __init__(self, index, fail_start=0, tokens=("Hel", "lo"), die_after=None):
        self.name = f"worker-{index}"
        self.group = self.name
        self.port = 1000 + index
        self.log_path = Path("/nonexistent")
        self.pid = None
        self.exit_code = None
        self._ended = None                  # an asyncio.Event set when the "process" ends
        self.fail_start = fail_start
        self.tokens = tokens
        self.die_after = die_after          # die after yielding this many chunks
        self.starts = 0
        self.gate = None                    # an asyncio.Event a stream waits on, when set
        self.mute = False                   # alive but not answering pings
        self.refuse = None                  # an HTTP status to answer chats with, when set
        self.completion = ()                # what a raw completion (/v1/completions) yields
        self.completion_finish = "stop"     # and how it ends ("length": max_tokens cut it)
        self.name_logprobs = {}             # a tool name's log-probability when it is scored

    async def start(self):
        self.starts += 1
        self.pid, self.exit_code, self._ended = 4242, None, asyncio.Event()
        if self.fail_start > 0:
            self.fail_start -= 1
            self.die(1)

    def die(self, code=-9):
        self.exit_code = code
        self._ended.set()

    def exited(self):
        return self._ended is None or self._ended.is_set()

    async def wait_exit(self):
        if self._ended is None:
            return None
        await self._ended.wait()
        return self.exit_code

    async def wait_ready(self, timeout):
        if self.exited():
            raise ls.WorkerError(f"{self.name} exited while loading")

    async def ping(self):
        return not self.exited() and not self.mute

    def prompt_seconds(self, chars):
        return None                         # requests take no turns on it

    async def count_tokens(self, text, timeout=None):
        if self.gate is not None and text == "":
            await self.gate.wait()                  # busy: the model lock is held
        if self.exited():
            raise ls.WorkerError("dead")
        return len(text.split())

    async def stream_chat(self, body, timeout, route="/v1/chat/completions"):
        self.chats = getattr(self, "chats", 0) + 1
        self.requests = getattr(self, "requests", []) + [(route, body)]
        if route == "/v1/completions" and scored_name(body) is not None:
            yield name_score_chunk(self.name_logprobs, body)
            return
        if route == "/v1/completions":
            for tok in self.completion:
                yield {"choices": [{"text": tok, "finish_reason": None}]}
            yield {"choices": [{"text": "", "finish_reason": self.completion_finish}]}
            return
        if self.refuse is not None:
            raise ls.WorkerError(f"{self.name} answered {self.refuse}: template error",
                                 status=self.refuse)
        if self.gate is not None:
            await self.gate.wait()
        for i, tok in enumerate(self.tokens):
            if self.die_after is not None and i >= self.die_after:
                self.die_after = None
                self.die()
                raise ls.WorkerError(f"{self.name}: stream broken")
            yield {"choices": [{"delta": {"content": tok}, "finish_reason": None}]}
        yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}

    async def stop(self, grace=0):
        if not self.exited():
            self.die(0)


def scored_name(body):
    """The tool name a completion scores (a grammar that holds it to '<name>"'), else None."""
    grammar = body.get("grammar") or ""
    prefix = 'root ::= "'
    if not grammar.startswith(prefix) or "\n" in grammar:
        return None
    held = json.loads(grammar[len("root ::= "):])
    return held[:held.index('"')]                   # the name, then what ends it ('", "')


def name_score_chunk(name_logprobs, body):
    """The one chunk a scored name gets: its text and log-probability (-20 when not given)."""
    name = scored_name(body)
    return {"choices": [{"index": 0, "text": name, "finish_reason": "stop",
                         "logprobs": {"content": [{"logprob": name_logprobs.get(name, -20.0)}]}}]}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


QUICK_RESTART = ls.PoolTimings(restart_backoff=(0.01,))    # a dead worker is back at once
SLOW_RESTART = ls.PoolTimings(restart_backoff=(5.0,))      # ... not within the test


async def started_pool(workers, queue_size=4, timings=None):
    pool = ls.WorkerPool(workers, queue_size=queue_size, start_timeout=1, timings=timings)
    await pool.start()
    await pool.wait_any_ready(2)
    await asyncio.sleep(0)
    return pool


def test_leases_are_exclusive_and_released():
    async def go():
        pool = await started_pool([FakeWorker(1), FakeWorker(2)])
        async with pool.lease() as a, pool.lease() as b:
            assert a is not b
            assert pool.healthy() == 2 and pool.waiting() == 0
            assert [d["state"] for d in pool.describe()] == ["busy", "busy"]
        assert [d["state"] for d in pool.describe()] == ["idle", "idle"]
        await pool.stop()
    run(go())


def test_waiters_are_served_in_order_and_full_queue_gets_429():
    async def go():
        pool = await started_pool([FakeWorker(1)], queue_size=2)
        order = []

        async def user(i):
            async with pool.lease():
                order.append(i)
                await asyncio.sleep(0.01)

        async with pool.lease():
            tasks = [asyncio.create_task(user(i)) for i in range(2)]
            await asyncio.sleep(0.01)
            assert pool.waiting() == 2
            with pytest.raises(ls.HTTPError) as info:
                async with pool.lease():
                    pass
            assert info.value.status == 429 and info.value.code == "queue_full"
            retry_after = dict(info.value.headers)["Retry-After"]
            assert 1 <= int(retry_after) <= 60
        await asyncio.gather(*tasks)
        assert order == [0, 1]
        await pool.stop()
    run(go())


def test_cancelled_waiter_does_not_leak_the_worker():
    async def go():
        pool = await started_pool([FakeWorker(1)])
        async with pool.lease():
            waiter = asyncio.create_task(pool.lease().__aenter__())
            await asyncio.sleep(0.01)
            waiter.cancel()
        await asyncio.sleep(0.01)
        async with pool.lease() as w:          # would hang if the cancelled waiter held it
            assert w.name == "worker-1"
        await pool.stop()
    run(go())


def test_crashed_worker_is_restarted_and_stale_lease_ignored():
    async def go():
        w = FakeWorker(1)
        pool = await started_pool([w], timings=QUICK_RESTART)
        cm = pool.lease()
        await cm.__aenter__()
        w.die()
        await asyncio.sleep(0.1)                 # supervisor restarts it
        assert w.starts == 2 and pool.describe()[0]["state"] == "idle"
        async with pool.lease():
            await cm.__aexit__(None, None, None)  # the dead lease ends: must not free the new one
            assert pool.describe()[0]["state"] == "busy"
        assert pool.describe()[0]["restarts"] == 1
        await pool.stop()
    run(go())


def test_a_worker_that_died_in_its_lease_is_restarted_straight_to_a_waiting_request():
    async def go():
        w = FakeWorker(1)
        pool = await started_pool([w], timings=QUICK_RESTART)
        second = pool.lease()
        async with pool.lease():
            waiter = asyncio.create_task(second.__aenter__())
            await asyncio.sleep(0.01)
            w.die()
        assert pool.describe()[0]["state"] == "dead"        # the release saw it before the
        assert await asyncio.wait_for(waiter, 2) is w       # supervisor: dead, then dead again
        assert w.starts == 2 and pool.describe()[0]["state"] == "busy"
        await second.__aexit__(None, None, None)
        assert pool.describe()[0]["state"] == "idle"
        await pool.stop()
    run(go())


def test_failed_request_sends_worker_to_probe_before_reuse():
    async def go():
        w = FakeWorker(1)
        pool = await started_pool([w])
        with pytest.raises(ls.WorkerError):
            async with pool.lease():
                raise ls.WorkerError("refused once")
        assert pool.describe()[0]["state"] == "checking"
        await asyncio.sleep(0.01)
        assert pool.describe()[0]["state"] == "idle"       # it answered the probe
        await pool.stop()
    run(go())


def test_failed_worker_that_does_not_answer_is_stopped_for_restart():
    async def go():
        w = FakeWorker(1)
        pool = await started_pool([w], timings=QUICK_RESTART)
        w.mute = True
        with pytest.raises(ls.WorkerError):
            async with pool.lease():
                raise ls.WorkerError("connection reset")
        for _ in range(100):                       # probe_attempts pings, then the restart
            if w.starts == 2:
                break
            await asyncio.sleep(0.05)
        assert w.starts == 2 and pool.describe()[0]["restarts"] == 1
        await pool.stop()
    run(go())


def test_worker_failing_to_start_is_retried_with_backoff():
    async def go():
        w = FakeWorker(1, fail_start=2)
        pool = ls.WorkerPool([w], queue_size=4, start_timeout=1,
                             timings=ls.PoolTimings(restart_backoff=(0.01, 0.02)))
        assert pool.status() == "initializing"
        await pool.start()
        await pool.wait_any_ready(2)
        assert w.starts == 3 and pool.status() == "healthy"
        await pool.stop()
        assert pool.describe()[0]["state"] == "stopped"
    run(go())


class NeverReadyWorker(FakeWorker):
    """Starts, but its model never finishes loading."""

    async def wait_ready(self, timeout):
        await asyncio.Event().wait()


def test_wait_started_waits_for_every_worker_and_reports_each_once():
    async def go():
        seen = []
        workers = [FakeWorker(1), FakeWorker(2, fail_start=1), FakeWorker(3)]
        pool = ls.WorkerPool(workers, queue_size=4, start_timeout=1, on_ready=seen.append,
                             timings=QUICK_RESTART)
        await pool.start()
        assert await pool.wait_started(5) == 3
        assert sorted(w.name for w in seen) == ["worker-1", "worker-2", "worker-3"]
        workers[0].die()                          # a restart is not reported as ready again
        await asyncio.sleep(0.1)
        assert len(seen) == 3 and workers[0].starts == 2
        await pool.stop()
    run(go())


def test_wait_started_gives_up_on_a_hopeless_worker_and_times_out_on_a_slow_one():
    async def go():
        hopeless = ls.WorkerPool([FakeWorker(1), FakeWorker(2, fail_start=99)], 4, 1,
                                 timings=QUICK_RESTART)
        await hopeless.start()
        started = time.monotonic()
        assert await hopeless.wait_started(30) == 1     # worker-2 failed every start: settled
        assert time.monotonic() - started < 5
        await hopeless.stop()
        slow = ls.WorkerPool([FakeWorker(1), NeverReadyWorker(2)], 4, 60, timings=QUICK_RESTART)
        await slow.start()
        assert await slow.wait_started(0.3) == 1        # the deadline passed with one ready
        await slow.stop()
        none = ls.WorkerPool([NeverReadyWorker(1)], 4, 60, timings=QUICK_RESTART)
        await none.start()
        with pytest.raises(ls.WorkerError, match="no worker became ready"):
            await none.wait_started(0.3)
        await none.stop()
    run(go())


def test_status_degraded_when_one_of_two_is_down():
    async def go():
        a, b = FakeWorker(1), FakeWorker(2)
        pool = await started_pool([a, b], timings=SLOW_RESTART)
        b.die()
        await asyncio.sleep(0.01)
        assert pool.status() == "degraded" and pool.healthy() == 1
        await pool.stop()
    run(go())


def test_stop_fails_waiters_with_503():
    async def go():
        pool = await started_pool([FakeWorker(1)])
        async with pool.lease():
            waiter = asyncio.create_task(pool.lease().__aenter__())
            await asyncio.sleep(0.01)
            await pool.stop()
            with pytest.raises(ls.HTTPError) as info:
                await waiter
            assert info.value.status == 503
    run(go())


# -- slot states: the transition table ----------------------------------------------------------------

S = ls.SlotState
LEGAL_MOVES = [(start, to) for start in S for to in S if to in ls.SLOT_MOVES[start]]
ILLEGAL_MOVES = [(start, to) for start in S for to in S if to not in ls.SLOT_MOVES[start]]


def state_id(state):
    return state.value


def test_slot_states_show_as_before_and_each_has_a_row():
    assert [s.value for s in S] == ["starting", "idle", "busy", "checking", "draining", "dead",
                                    "stopped"]
    assert set(ls.SLOT_MOVES) == set(S)


@pytest.mark.parametrize("start,to", LEGAL_MOVES, ids=state_id)
def test_every_move_in_the_table_is_made(start, to):
    slot = ls.WorkerSlot(FakeWorker(1), state=start)
    ls.WorkerPool._move(slot, to)
    assert slot.state is to


@pytest.mark.parametrize("start,to", ILLEGAL_MOVES, ids=state_id)
def test_every_move_outside_the_table_is_rejected_and_changes_nothing(start, to):
    slot = ls.WorkerSlot(FakeWorker(1), state=start)
    with pytest.raises(ls.IllegalSlotMove, match=f"^worker-1: {start.value} -> {to.value}$"):
        ls.WorkerPool._move(slot, to)
    assert slot.state is start


@pytest.mark.parametrize("start,to", [
    (S.IDLE, S.CHECKING),          # only a failed lease is probed
    (S.IDLE, S.DRAINING),          # only an abandoned lease drains
    (S.IDLE, S.IDLE),              # a free worker is handed out once, not twice
    (S.DEAD, S.IDLE),              # a dead worker comes back only through a restart
    (S.DEAD, S.BUSY),
    (S.STARTING, S.CHECKING),
    (S.CHECKING, S.DRAINING),
    (S.STOPPED, S.STARTING),       # a stopped pool stays stopped
    (S.STOPPED, S.DEAD),
], ids=state_id)
def test_moves_the_pool_never_makes_are_not_in_the_table(start, to):
    assert to not in ls.SLOT_MOVES[start]


def test_any_slot_can_be_stopped_and_any_live_one_can_die():
    assert all(S.STOPPED in moves for moves in ls.SLOT_MOVES.values())
    assert all(S.DEAD in ls.SLOT_MOVES[state] for state in S if state is not S.STOPPED)


# -- the Worker protocol -----------------------------------------------------------------------------

def real_worker(tmp_path, launcher=ls.launch_process):
    spec = ls.WorkerSpec(index=1, model=tmp_path / "m.gguf", model_id="m", n_ctx=256, threads=1,
                         threads_batch=1, gpu_layers=0, site=tmp_path, env={}, log_dir=tmp_path)
    return ls.LlamaCppPythonWorker(spec, client=None, launcher=launcher)


def native_spec(tmp_path, **changes):
    spec = ls.WorkerSpec(index=1, model=tmp_path / "m.gguf", model_id="m", n_ctx=256, threads=2,
                         threads_batch=2, gpu_layers=0, site=tmp_path, env={}, log_dir=tmp_path,
                         binary=tmp_path / "llama-server", slots=3, kv_tokens=768)
    return ls.dataclasses.replace(spec, **changes)


def test_the_real_workers_and_the_fake_have_every_member_the_protocol_names(tmp_path):
    members = sorted(name for name in vars(ls.Worker) if not name.startswith("_"))
    assert members == ["count_tokens", "exited", "group", "log_path", "name", "pid", "ping",
                       "port", "prompt_seconds", "shares_prompt", "start", "stop", "stream_chat",
                       "takes_prompt", "wait_exit", "wait_ready"]
    native = ls.NativeWorker(ls.NativeServer(native_spec(tmp_path), client=None), 2)
    for worker in (real_worker(tmp_path), native, FakeWorker(1)):
        assert [m for m in members if not hasattr(worker, m)] == [], type(worker).__name__


def test_wait_exit_returns_the_exit_code_of_the_workers_process(tmp_path):
    async def exits_with_3(argv, env, log_path):
        return await ls.launch_process([sys.executable, "-c", "raise SystemExit(3)"],
                                       dict(os.environ), log_path)

    async def go():
        worker = real_worker(tmp_path, exits_with_3)
        assert worker.exited() and await worker.wait_exit() is None     # never started
        await worker.start()
        assert await worker.wait_exit() == 3 and worker.exited()
        await worker.stop()
    run(go())


# -- the native kind: slots of one llama-server -----------------------------------------------------

def test_native_argv_shares_one_kv_cache_among_the_slots_and_caps_each_at_the_context(tmp_path):
    argv = ls.native_argv(native_spec(tmp_path), 4321)
    assert argv[0] == str(tmp_path / "llama-server")
    pairs = dict(zip(argv[1::], argv[2::]))
    assert pairs["--port"] == "4321" and pairs["--host"] == "127.0.0.1"
    assert pairs["--parallel"] == "3" and pairs["--ctx-size"] == "768"
    assert pairs["--kv-unified-per-slot"] == "256" and "--kv-unified" in argv
    assert pairs["--threads"] == "2" and pairs["--n-gpu-layers"] == "0"
    assert "--jinja" not in argv            # it parses no calls: the swarm does
    gpu = ls.native_argv(native_spec(tmp_path, gpu_layers=-1), 1)
    assert dict(zip(gpu, gpu[1:]))["--n-gpu-layers"] == "all"


def test_an_embedding_server_serves_embeddings_each_input_in_one_batch(tmp_path):
    argv = ls.native_argv(native_spec(tmp_path, embedding="mean", role="embedder"), 1)
    pairs = dict(zip(argv, argv[1:]))
    assert "--embeddings" in argv and pairs["--pooling"] == "mean"
    assert pairs["--batch-size"] == pairs["--ubatch-size"] == "256"       # the context
    own = ls.native_argv(native_spec(tmp_path, embedding=""), 1)
    assert "--embeddings" in own and "--pooling" not in own               # the model's own
    assert "--embeddings" not in ls.native_argv(native_spec(tmp_path), 1)
    server = ls.NativeServer(native_spec(tmp_path, role="embedder"), None)
    assert server.name == "embedder-1"


def test_native_argv_under_the_lifeline_runs_the_same_command_as_its_child(tmp_path):
    plain = ls.native_argv(native_spec(tmp_path), 4321)
    wrapped = ls.native_argv(native_spec(tmp_path), 4321, lifeline=True)
    assert wrapped[:4] == [sys.executable, "-I", "-S", "-c"] and wrapped[5:] == plain


def test_the_slots_of_one_server_start_one_process_and_restart_it_once(tmp_path):
    """Three slots start: one process. It dies: every slot sees it, and their restarts start one
    new process, which all three adopt."""
    launched = []

    async def launcher(argv, env, log_path):
        launched.append(argv)
        return await ls.launch_process([sys.executable, "-c", "import time; time.sleep(30)"],
                                       dict(os.environ), log_path)

    async def go():
        server = ls.NativeServer(native_spec(tmp_path), client=None, launcher=launcher,
                                 lifeline=False)
        slots = [ls.NativeWorker(server, i) for i in (1, 2, 3)]
        assert [w.name for w in slots] == ["worker-1.1", "worker-1.2", "worker-1.3"]
        assert {w.group for w in slots} == {"worker-1"}
        await asyncio.gather(*(w.start() for w in slots))
        assert len(launched) == 1 and len({w.pid for w in slots}) == 1
        first = slots[0].pid
        os.kill(first, 9)
        assert [await w.wait_exit() for w in slots] == [-9, -9, -9]
        await asyncio.gather(*(w.start() for w in slots))
        assert len(launched) == 2 and {w.pid for w in slots} != {first}
        assert len({w.pid for w in slots}) == 1 and not any(w.exited() for w in slots)
        await slots[1].stop()
        assert all(w.exited() for w in slots)
    run(go())


def test_a_native_slot_learns_its_prompt_rate_from_the_timings_of_its_generations(
        tmp_path, monkeypatch):
    """llama-server's last chunk says how many prompt tokens it evaluated (prompt_n; cache_n came
    from its cache) and how long that took: the process's rate in prompt characters per second,
    which says how long a prompt would take to evaluate anew. Short evaluations say little."""
    timings = []

    async def fake_sse(client, url, name, body, timeout, last=None):
        yield {"choices": [{"index": 0, "text": "ok", "finish_reason": None}]}
        yield {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
               "timings": timings.pop(0)}
    monkeypatch.setattr(ls, "stream_sse", fake_sse)

    async def generate(worker, prompt):
        async with ls.contextlib.aclosing(worker.stream_chat({"prompt": prompt}, 5)) as chunks:
            return [c async for c in chunks]

    async def go():
        slot = ls.NativeWorker(ls.NativeServer(native_spec(tmp_path), client=None), 1)
        assert slot.prompt_seconds(400) == 400 / ls.PROMPT_RATE_GUESS      # nothing measured
        timings.append({"prompt_n": 8, "cache_n": 0, "prompt_ms": 1000.0})   # too short
        assert len(await generate(slot, "x" * 32)) == 2
        assert slot.server.prompt_rate is None
        # half of an 800-character prompt (100 of 200 tokens) evaluated in 0.5 s: 800 chars/s
        timings.append({"prompt_n": 100, "cache_n": 100, "prompt_ms": 500.0})
        await generate(slot, "x" * 800)
        assert slot.server.prompt_rate == pytest.approx(800.0)
        assert slot.prompt_seconds(1600) == pytest.approx(2.0)
        timings.append({"prompt_n": 200, "cache_n": 0, "prompt_ms": 2000.0})   # 400 chars/s
        await generate(slot, "x" * 800)
        assert slot.server.prompt_rate == pytest.approx(600.0)             # the mean of both
    run(go())


def test_both_kinds_sample_as_llama_cpp_does_unless_the_request_says_otherwise(
        tmp_path, monkeypatch):
    """What a request leaves unset goes to either kind as llama.cpp's server samples (no repeat
    penalty: llama-cpp-python's own default of 1.1 would apply otherwise); what it sets wins."""
    sent = []

    async def fake_sse(client, url, name, body, timeout, last=None):
        sent.append(body)
        yield {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
    monkeypatch.setattr(ls, "stream_sse", fake_sse)

    async def go():
        native = ls.NativeWorker(ls.NativeServer(native_spec(tmp_path), client=None), 1)
        for worker in (real_worker(tmp_path), native):
            for body in ({"prompt": "x"}, {"prompt": "x", "repeat_penalty": 1.2, "top_k": 5}):
                async with ls.contextlib.aclosing(worker.stream_chat(body, 5)) as chunks:
                    [c async for c in chunks]
        assert sent[0] == sent[2] == {"prompt": "x", "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                                      "repeat_penalty": 1.0}
        assert sent[1] == sent[3] == {"prompt": "x", "top_k": 5, "top_p": 0.95, "min_p": 0.05,
                                      "repeat_penalty": 1.2}
    run(go())


def test_the_pool_estimates_prompt_time_only_where_requests_take_turns():
    async def go():
        pool = await started_pool([FakeWorker(1), FakeWorker(2)])
        assert pool.prompt_seconds(1000) is None        # each worker its own process
        await pool.stop()
    run(go())


@pytest.mark.skipif(os.name != "posix", reason="the test kills with POSIX signals")
def test_the_lifeline_ends_its_child_when_the_daemon_end_of_the_pipe_closes(tmp_path):
    """Where the OS has no parent-death signal, the lifeline ties the native process to the
    daemon: its stdin is the daemon's pipe, and when that closes (the daemon is gone, however it
    died) the child is killed."""
    import psutil

    async def go():
        argv = [sys.executable, "-I", "-S", "-c", ls.NATIVE_LIFELINE, sys.executable, "-c",
                "import time; time.sleep(60)"]
        proc = await ls.launch_process(argv, dict(os.environ), tmp_path / "lifeline.log")
        await until(lambda: psutil.Process(proc.pid).children())
        child = psutil.Process(proc.pid).children()[0]
        proc.stdin.close()                  # what the kernel does when the daemon dies
        assert await proc.wait() == 0
        await until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE)
    run(go())


class RaisingPingWorker(FakeWorker):
    """Ready checks that raise what a broken install raises inside the daemon, not a network
    error (the ImportError a mixed typing_extensions gave inside httpx)."""

    async def wait_ready(self, timeout):
        raise ImportError("cannot import name 'sentinel' from 'typing_extensions'")


@pytest.mark.parametrize("wait", ["wait_any_ready", "wait_started"])
def test_a_fault_in_the_daemons_own_code_ends_the_start_at_once(wait):
    async def go():
        pool = ls.WorkerPool([RaisingPingWorker(1), FakeWorker(2, fail_start=99)], queue_size=4,
                             start_timeout=300)
        await pool.start()
        started = time.monotonic()
        with pytest.raises(ls.StartupError) as info:
            await getattr(pool, wait)(300)
        assert time.monotonic() - started < 5          # not the 300 s start timeout
        message = str(info.value)
        assert "local-swarm's own code, not in a worker" in message
        assert "ImportError: cannot import name 'sentinel'" in message
        assert isinstance(info.value.__cause__, ImportError)
        await pool.stop()
    run(go())


def test_a_request_while_no_worker_is_ready_gets_503_with_retry_after_at_once():
    async def go():
        pool = ls.WorkerPool([NeverReadyWorker(1), NeverReadyWorker(2)], queue_size=4,
                             start_timeout=300)
        await pool.start()
        with pytest.raises(ls.HTTPError) as info:
            async with pool.lease():
                pass
        exc = info.value
        assert exc.status == 503 and exc.code == "swarm_starting"
        assert "starting" in exc.message and "2 workers are still loading" in exc.message
        assert ("Retry-After", str(ls.STARTING_RETRY_AFTER)) in exc.headers
        assert pool.waiting() == 0                     # refused, not queued
        await pool.stop()
    run(go())


def test_last_error_line_is_the_cause_of_a_traceback():
    log = ("INFO: starting\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
           "    import llama_cpp.server\nModuleNotFoundError: No module named 'llama_cpp.server'\n")
    assert ls.last_error_line(log) == "ModuleNotFoundError: No module named 'llama_cpp.server'"
    assert ls.last_error_line("error loading model: bad magic\n") == ""


# -- the worker HTTP client (httpx over asyncio streams) ------------------------------------------

async def _serve_once(reply: bytes, hold: float = 0.0):
    """A loopback server that reads a request head, sends `reply`, waits `hold`, then closes."""
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(hold)
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_worker_client_reads_and_reuses_connections():
    import httpx

    async def go():
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        server, port = await _serve_once(reply * 1, hold=0.5)
        async with ls.worker_client() as client:
            r = await client.get(f"http://127.0.0.1:{port}/")
            assert (r.status_code, r.text) == (200, "ok")
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{ls.free_port()}/")
        server.close()
    run(go())


@pytest.mark.parametrize("reply,hold,error", [
    (b"", 2.0, "ReadTimeout"),                                             # says nothing
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 0.0, "RemoteProtocolError"),  # cut short
])
def test_worker_client_maps_socket_failures_to_httpx_errors(reply, hold, error):
    import httpx

    async def go():
        server, port = await _serve_once(reply, hold)
        async with ls.worker_client() as client:
            with pytest.raises(getattr(httpx, error)):
                await client.get(f"http://127.0.0.1:{port}/", timeout=0.3)
        server.close()
    run(go())


def test_start_up_gives_up_when_every_worker_keeps_failing(tmp_path):
    async def go():
        workers = [FakeWorker(1, fail_start=99), FakeWorker(2, fail_start=99)]
        workers[0].log_path = tmp_path / "worker-1.log"
        workers[0].log_path.write_text("error loading model: bad magic\n")
        pool = ls.WorkerPool(workers, queue_size=4, start_timeout=1, timings=QUICK_RESTART)
        await pool.start()
        with pytest.raises(ls.WorkerError) as info:
            await pool.wait_any_ready(30)
        assert "bad magic" in str(info.value)
        await pool.stop()
        workers[0].log_path.write_text("Traceback (most recent call last):\n"
                                       "ImportError: libllama.so: cannot open shared object\n")
        assert str(pool._none_ready()).startswith(
            "no worker became ready: ImportError: libllama.so: cannot open shared object;")
    run(go())


def test_worker_log_dirs_of_dead_daemons_are_pruned(tmp_path):
    import os
    dead = tmp_path / "999999999"
    dead.mkdir()
    alive = tmp_path / str(os.getppid())
    alive.mkdir()
    mine = ls.worker_log_dir(tmp_path)
    assert mine == tmp_path / str(os.getpid())
    assert not dead.exists() and alive.exists()


def test_worker_client_drops_a_kept_alive_connection_the_server_closed():
    """uvicorn closes idle keep-alive connections after 5 s; the next call must open a new one,
    not fail with a broken pipe (which would send a healthy worker to be restarted)."""
    async def go():
        served = []

        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            served.append(1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()                      # keep-alive promised, then closed: like idle expiry
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        async with ls.worker_client() as client:
            for _ in range(3):
                assert (await client.post(url, content=b"x" * 100)).text == "ok"
                await asyncio.sleep(0.05)
        assert len(served) == 3
        server.close()
    run(go())
