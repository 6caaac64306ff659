#!/usr/bin/env python3
"""What a vote costs in wall time, and what conversation affinity saves, measured in one run.

1. Vote vs one request: the same prompt answered whole with a k-vote (k = the workers) and with one
   candidate (`"swarm": {"mode": "fastest"}`), alternated; prints medians and the ratio.
2. Second-turn time to first token of a ~3,000-token conversation (a long system prompt + a question,
   then a second question), streamed, in two arms alternated, each on a fresh conversation:
   - affinity: turn 2 goes to the worker that served turn 1, whose KV cache still holds the prefix;
   - without: every worker's cache is overwritten between the turns (a short unrelated request sent
     straight to each worker), which is what turn 2 meets when it lands on another worker or the
     worker served someone else meanwhile. Prints medians and the speed-up (target >= 3x).

Usage: python bench/latency.py [--model smollm2-135m] [--rounds 5] [--instances 2]
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, med, running_swarm  # noqa: E402

CLIENT = httpx.Client(timeout=600)
QUESTION = [{"role": "user", "content": "In one sentence, what is this document about?"}]


def long_system_prompt(tag: str, words: int) -> str:
    """A unique ~3,000-token system prompt (a tag first, so conversations share no prefix)."""
    body = " ".join(f"Section {i}: the {tag} component handles request number {i * 7 % 1000} "
                    f"and logs its status." for i in range(words // 12))
    return f"[{tag}] You are a careful assistant. Reference document follows.\n{body}"


PROMPT_TOKENS: list[int] = []        # turn 2's prompt size, from the swarm's usage chunk


def ttft(url: str, body: dict) -> tuple[float, str]:
    """Stream a request; time to its first content delta, and the whole text."""
    started, first, parts = time.perf_counter(), None, []
    with CLIENT.stream("POST", url + "/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                PROMPT_TOKENS.append(chunk["usage"]["prompt_tokens"])
            delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if delta:
                first = first or time.perf_counter()
                parts.append(delta)
    return (first or time.perf_counter()) - started, "".join(parts)


def whole(url: str, body: dict) -> float:
    started = time.perf_counter()
    CLIENT.post(url + "/v1/chat/completions", json=body).raise_for_status()
    return time.perf_counter() - started


def evict_all(swarm) -> None:
    """Overwrite every worker's cached prompt with a short unrelated one (straight to the worker)."""
    for worker in swarm.health()["details"]:
        CLIENT.post(f"http://127.0.0.1:{worker['port']}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1}).raise_for_status()


def second_turn(swarm, affinity: bool, tag: str, words: int) -> float:
    """Time to first token of turn 2 of a fresh conversation."""
    messages = [{"role": "system", "content": long_system_prompt(tag, words)}, *QUESTION]
    opts = {"mode": "fastest", "affinity": affinity}
    _, answer = ttft(swarm.url, {"messages": messages, "max_tokens": 24, "swarm": opts})
    if not affinity:
        evict_all(swarm)
    turn2 = messages + [{"role": "assistant", "content": answer},
                        {"role": "user", "content": "Now name one section number it mentions."}]
    seconds, _ = ttft(swarm.url, {"messages": turn2, "max_tokens": 8, "swarm": opts})
    return seconds


def main() -> int:
    ap = base_parser(__doc__, rounds=3)
    ap.add_argument("--prompt-words", type=int, default=1300,
                    help="size of the long system prompt (1300 words: about 3,000 tokens)")
    args = ap.parse_args()
    with running_swarm(args, "--ctx", "8192") as swarm:
        prompt = {"messages": [{"role": "user", "content": "Name three colours of the rainbow."}],
                  "max_tokens": 48, "temperature": 0.7}
        voted, single = [], []
        for _ in range(args.rounds):
            voted.append(whole(swarm.url, prompt))
            single.append(whole(swarm.url, {**prompt, "swarm": {"mode": "fastest"}}))
        warm, cold = [], []
        for i in range(args.rounds):
            warm.append(second_turn(swarm, True, f"warm{i}-{os.getpid()}", args.prompt_words))
            cold.append(second_turn(swarm, False, f"cold{i}-{os.getpid()}", args.prompt_words))
        print(f"model {args.model}, {args.instances} workers, {args.rounds} rounds alternated")
        print(f"whole reply, 48 tokens   one candidate {med(single) * 1000:7.0f} ms   "
              f"{args.instances}-vote {med(voted) * 1000:7.0f} ms   ratio {med(voted) / med(single):.2f}")
        print(f"second turn of a {med(PROMPT_TOKENS[1::2]):.0f}-token conversation, time to first "
              f"token: with affinity "
              f"{med(warm) * 1000:.0f} ms, without {med(cold) * 1000:.0f} ms, "
              f"speed-up {med(cold) / med(warm):.1f}x (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
