#!/usr/bin/env python3
"""What the worker kind costs: llama.cpp's own llama-server (`--worker native`) against
llama-cpp-python's server (`--worker python`), each started as a user would, one after the other,
on the same model and machine, in one run.

For each kind it measures, on prompts no worker has seen (each request's prompt is its own excerpt
of local_swarm.py's source, so nothing is served from a cache):
1. one greedy request: temperature 0, a ~2,000-token prompt, 64-token reply (whole);
2. a k=5 vote on the same kind of prompt: temperature omitted (the anchor greedy, four samples),
   `"swarm": {"votes": 5, "adaptive": false}`, so all five candidates run;
3. the default vote (adaptive: it stops at two candidates when they agree), and its samples;
4. four concurrent single-candidate chats (temperature 0, 128-token replies): aggregate tokens/s;
5. the whole swarm's memory once it has served all that: PSS of the daemon and its workers.
It prints each figure per kind (medians over --rounds), the vote/greedy ratios, and native/python
ratios. The python kind runs --python-instances workers (a k=5 vote needs five) of one thread;
the native kind runs its own plan (one llama-server whose slots share the cores).

Usage: python bench/engine.py [--model qwen2.5-coder-0.5b] [--rounds 2] [--kinds native,python]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, started_swarm  # noqa: E402

SOURCE = (ROOT / "local_swarm.py").read_text(encoding="utf-8")
CHARS_PER_TOKEN = 3.4            # Qwen2.5's tokenizer on this file, near enough to size prompts
ASK = "Explain in detail, step by step, what the following code does:\n\n"


class Prompts:
    """Excerpts of the source, each used once: no request finds its prompt in a cache."""

    def __init__(self, tokens: int) -> None:
        self.size = int(tokens * CHARS_PER_TOKEN)
        self.offset = 0

    def next(self) -> list[dict]:
        if self.offset + self.size > len(SOURCE):
            self.offset = 0
        text = SOURCE[self.offset:self.offset + self.size]
        self.offset += self.size
        return [{"role": "user", "content": ASK + text}]


def whole(client: httpx.Client, url: str, body: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    reply = client.post(url + "/v1/chat/completions", json=body)
    reply.raise_for_status()
    return time.perf_counter() - started, reply.json()


def concurrent_rate(url: str, prompts: Prompts, chats: int, tokens: int) -> float:
    """Tokens per second summed over `chats` single-candidate chats sent at once."""
    bodies = [{"messages": [{"role": "user", "content": f"Write a short story about robot "
                                                        f"number {i} learning to paint."}],
               "temperature": 0, "max_tokens": tokens, "swarm": {"affinity": False}}
              for i in range(chats)]
    started = time.perf_counter()
    with httpx.Client(timeout=900) as client, \
            concurrent.futures.ThreadPoolExecutor(chats) as pool:
        replies = list(pool.map(lambda b: whole(client, url, b)[1], bodies))
    seconds = time.perf_counter() - started
    return sum(r["usage"]["completion_tokens"] for r in replies) / seconds


def swarm_pss(daemon_pid: int) -> float:
    """MiB of PSS of the daemon and every process under it."""
    root = psutil.Process(daemon_pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def measure(kind: str, args: argparse.Namespace) -> dict:
    flags = ["--worker", kind, "--model", args.model, "--ctx", "8192"]
    if kind == "python":
        flags += ["--instances", str(args.python_instances), "--threads", "1"]
    command = [sys.executable, str(ROOT / "local_swarm.py"), "--port", "0", *flags]
    prompts = Prompts(args.prompt_tokens)
    out: dict = {"greedy": [], "vote5": [], "adaptive": [], "samples": [], "prompt_tokens": [],
                 "reply_tokens": []}
    pids: list[int] = []
    with started_swarm(command, pids) as url, httpx.Client(timeout=1800) as client:
        client.post(url + "/v1/chat/completions", json={  # warm up: load pages, first request
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
        for _ in range(args.rounds):
            base = {"max_tokens": args.reply_tokens, "swarm": {"affinity": False}}
            seconds, reply = whole(client, url, {**base, "messages": prompts.next(),
                                                 "temperature": 0})
            out["greedy"].append(seconds)
            out["prompt_tokens"].append(reply["usage"]["prompt_tokens"])
            out["reply_tokens"].append(reply["usage"]["completion_tokens"])
            seconds, reply = whole(client, url, {**base, "messages": prompts.next(),
                                                 "swarm": {"votes": 5, "adaptive": False,
                                                           "affinity": False}})
            out["vote5"].append(seconds)
            assert reply["swarm"]["samples"] == 5, reply["swarm"]
            seconds, reply = whole(client, url, {**base, "messages": prompts.next(),
                                                 "swarm": {"votes": 5, "affinity": False}})
            out["adaptive"].append(seconds)
            out["samples"].append(reply["swarm"]["samples"])
        out["concurrent"] = concurrent_rate(url, prompts, args.chats, 128)
        out["pss"] = swarm_pss(pids[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--kinds", default="native,python")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--reply-tokens", type=int, default=64)
    ap.add_argument("--chats", type=int, default=4)
    ap.add_argument("--python-instances", type=int, default=5)
    args = ap.parse_args()
    results = {kind: measure(kind, args) for kind in args.kinds.split(",")}
    med = statistics.median
    print(f"\nmodel {args.model}; {args.rounds} rounds; prompts ~{args.prompt_tokens} tokens, "
          f"replies {args.reply_tokens} tokens")
    print(f"{'kind':8} {'prompt':>7} {'reply':>6} {'greedy s':>9} {'k=5 s':>7} {'k=5/greedy':>11} "
          f"{'default s':>10} {'samples':>8} {'default/greedy':>15} {'4 chats tok/s':>14} "
          f"{'PSS MiB':>8}")
    for kind, r in results.items():
        g, v, a = med(r["greedy"]), med(r["vote5"]), med(r["adaptive"])
        print(f"{kind:8} {med(r['prompt_tokens']):7.0f} {med(r['reply_tokens']):6.0f} {g:9.1f} "
              f"{v:7.1f} {v / g:11.2f} {a:10.1f} {med(r['samples']):8.1f} {a / g:15.2f} "
              f"{r['concurrent']:14.1f} {r['pss']:8.0f}")
    if {"native", "python"} <= results.keys():
        n, p = results["native"], results["python"]
        print(f"native/python: greedy {med(n['greedy']) / med(p['greedy']):.2f}x the time, "
              f"k=5 vote {med(n['vote5']) / med(p['vote5']):.2f}x, "
              f"4 chats {n['concurrent'] / p['concurrent']:.2f}x the tokens/s, "
              f"memory {n['pss'] / p['pss']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
