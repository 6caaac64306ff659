#!/usr/bin/env python3
"""Autocomplete through the swarm against the same llama-server asked directly: time to first token.

A typing session replays a source file keystroke by keystroke: every --interval ms the prefix grows
by one character and a streamed /v1/completions request for it is sent (`max_tokens` --tokens,
temperature 0, as an editor's tab completion sends it), and the previous request, if it is still
running, is cancelled by closing its connection (what an editor does on the next keystroke). Time
to first token (TTFT) is from sending a request to its first non-empty text; a request cancelled
before its first token has none and is counted as `cut` (and, in the "cut too" columns, at the
time it had waited: a lower bound on its TTFT).

The two targets take turns, session by session, in one run: the swarm's /v1/completions, and
/v1/completions of the swarm's own llama-server (its port from the swarm's /health), so both see
the same machine, model, cache and load (one request for the first prefix warms the cache
before the sessions start, so that neither target pays for the cold start). Beside them, unless --no-vote, a chat vote runs without
pause against the swarm (a default request: the anchor and the samples), as when an agent works
in the same editor. The swarm's overhead is the ratio of its TTFT to the worker's (median and
p95); the issue's target is at most 1.1x.

Usage:
  python bench/autocomplete.py --url http://127.0.0.1:8000 [--sessions 4] [--keys 60]
  python bench/autocomplete.py --start --model qwen2.5-coder-0.5b
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, bench_main, save_results  # noqa: E402

SOURCE = ROOT / "bench" / "selection.py"     # the file the session types (any code will do)
CHAT = {"messages": [{"role": "user", "content":
                      "Write a Python function that checks whether a string is a palindrome, "
                      "with a docstring and two doctests."}], "max_tokens": 160}


@dataclass
class Keystroke:
    target: str                  # "swarm" or "worker"
    session: int
    chars: int                   # prefix length
    ttft_ms: float | None        # None: cut (cancelled before its first token) or failed
    status: int | None = None    # the HTTP status, None when cut before the reply's head
    error: str | None = None
    cut_ms: float | None = None  # cut: how long it had waited for its first token


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def summarize(strokes: list[Keystroke]) -> dict:
    """TTFT median and p95 over the requests that got a first token, and over all but the failed
    ones with a cut request counted at how long it had waited (a lower bound on its TTFT: a
    target that leaves keystrokes without a completion is not let off for it)."""
    firsts = [s.ttft_ms for s in strokes if s.ttft_ms is not None]
    waits = firsts + [s.cut_ms for s in strokes if s.ttft_ms is None and s.cut_ms is not None]
    return {"requests": len(strokes), "first_tokens": len(firsts),
            "cut": sum(s.cut_ms is not None for s in strokes),
            "errors": sum(s.error is not None for s in strokes),
            "median_ms": round(statistics.median(firsts), 1) if firsts else None,
            "p95_ms": round(percentile(firsts, 95), 1) if firsts else None,
            "median_all_ms": round(statistics.median(waits), 1) if waits else None,
            "p95_all_ms": round(percentile(waits, 95), 1) if waits else None}


async def one_request(client, url: str, prefix: str, tokens: int, stroke: Keystroke) -> None:
    """One streamed completion, read to its end; its TTFT goes into `stroke`. Cancelling the
    task closes the connection (the server sees the client go)."""
    body = {"model": "local-swarm", "prompt": prefix, "max_tokens": tokens, "temperature": 0,
            "stream": True}
    started = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as reply:
            stroke.status = reply.status_code
            if reply.status_code != 200:
                stroke.error = (await reply.aread()).decode()[:200]
                return
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                if stroke.ttft_ms is None and choices[0].get("text"):
                    stroke.ttft_ms = (time.perf_counter() - started) * 1000
    except asyncio.CancelledError:
        if stroke.ttft_ms is None:
            stroke.cut_ms = (time.perf_counter() - started) * 1000
        raise
    except Exception as exc:          # noqa: BLE001 - a failed request is reported, not fatal
        stroke.error = repr(exc)[:200]


async def session(client, target: str, url: str, number: int, text: str, start: int, keys: int,
                  interval: float, tokens: int) -> list[Keystroke]:
    """One typing session: `keys` keystrokes from text[:start], each cancelling the last."""
    strokes: list[Keystroke] = []
    task: asyncio.Task | None = None
    for chars in range(start, start + keys):
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        stroke = Keystroke(target, number, chars, None)
        strokes.append(stroke)
        task = asyncio.create_task(one_request(client, url, text[:chars], tokens, stroke))
        await asyncio.sleep(interval)
    if task is not None:
        await asyncio.gather(task, return_exceptions=True)     # the last one runs to its end
    return strokes


async def chat_load(client, url: str, stop: asyncio.Event, done: list[float]) -> None:
    """Default (voted) chat requests one after another until `stop`; each one's seconds."""
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reply = await client.post(url + "/v1/chat/completions", json=CHAT)
            if reply.status_code == 200:
                done.append(time.perf_counter() - started)
        except Exception:             # noqa: BLE001 - the load is best effort
            await asyncio.sleep(1)


def worker_url(swarm: str) -> str:
    """The swarm's own llama-server: the port of its first slot in /health."""
    import httpx
    details = httpx.get(swarm + "/health", timeout=10).json()["details"]
    return f"http://127.0.0.1:{details[0]['port']}"


async def run_async(url: str, args: argparse.Namespace) -> dict:
    import httpx
    text = SOURCE.read_text()
    direct = args.worker_url or worker_url(url)
    targets = {"swarm": url, "worker": direct}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    strokes: list[Keystroke] = []
    stop, chats = asyncio.Event(), []
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        warm = Keystroke("warm-up", -1, args.offset, None)       # the file's start in the cache,
        await one_request(client, direct, text[:args.offset], args.tokens, warm)  # for either
        load = None if args.no_vote else asyncio.create_task(chat_load(client, url, stop, chats))
        if load is not None:
            await asyncio.sleep(args.warmup)              # the vote is under way
        for number in range(args.sessions):
            start = args.offset + number * args.keys      # a fresh stretch of the file each time
            order = ("swarm", "worker") if number % 2 == 0 else ("worker", "swarm")
            for target in order:
                strokes += await session(client, target, targets[target], number, text, start,
                                         args.keys, args.interval / 1000, args.tokens)
        stop.set()
        if load is not None:
            await load
    summary = {target: summarize([s for s in strokes if s.target == target]) for target in targets}
    return {"swarm": url, "worker": direct, "args": vars(args), "summary": summary,
            "chat_votes": len(chats), "chat_vote_s": round(statistics.median(chats), 1)
            if chats else None, "strokes": [asdict(s) for s in strokes]}


def report(results: dict) -> None:
    summary = results["summary"]
    print(f"{'target':8} {'requests':>8} {'first tokens':>12} {'cut':>4} {'errors':>6} "
          f"{'median TTFT':>12} {'p95 TTFT':>9} {'median, cut too':>16} {'p95, cut too':>13}")
    nan = float("nan")
    for target, s in summary.items():
        print(f"{target:8} {s['requests']:>8} {s['first_tokens']:>12} {s['cut']:>4} "
              f"{s['errors']:>6} {s['median_ms'] or nan:>10.1f}ms {s['p95_ms'] or nan:>7.1f}ms "
              f"{s['median_all_ms'] or nan:>14.1f}ms {s['p95_all_ms'] or nan:>11.1f}ms")
    swarm, worker = summary["swarm"], summary["worker"]
    for suffix, what in (("", "first tokens"), ("_all", "cut ones too")):
        if swarm[f"median{suffix}_ms"] and worker[f"median{suffix}_ms"]:
            print(f"swarm / worker ({what}): median "
                  f"{swarm[f'median{suffix}_ms'] / worker[f'median{suffix}_ms']:.2f}x, p95 "
                  f"{swarm[f'p95{suffix}_ms'] / worker[f'p95{suffix}_ms']:.2f}x")
    if results["chat_votes"]:
        print(f"beside it: {results['chat_votes']} chat votes, median {results['chat_vote_s']} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running swarm (native kind), e.g. http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start a swarm, stop it at the end")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="the model --start serves")
    ap.add_argument("--worker-url", help="the llama-server to compare with (default: the "
                    "swarm's own, from its /health)")
    ap.add_argument("--sessions", type=int, default=4, help="typing sessions per target")
    ap.add_argument("--keys", type=int, default=60, help="keystrokes per session")
    ap.add_argument("--offset", type=int, default=400,
                    help="characters of the file already typed when the first session begins")
    ap.add_argument("--interval", type=float, default=250, help="ms between keystrokes")
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens of each completion")
    ap.add_argument("--warmup", type=float, default=3, help="s the vote runs before typing")
    ap.add_argument("--no-vote", action="store_true", help="no chat vote beside the typing")
    ap.add_argument("--out", default="autocomplete_results.json")
    args = ap.parse_args()

    def run(url: str, args: argparse.Namespace) -> None:
        results = asyncio.run(run_async(url, args))
        report(results)
        save_results(results, args.out)
    return bench_main(args, run)


if __name__ == "__main__":
    sys.exit(main())
