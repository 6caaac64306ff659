#!/usr/bin/env python3
"""Does voting make the answers better? Accuracy per arm on tasks checked by code.

The tasks (bench/quality_tasks.py) are grade-school word problems with known answers and small
Python functions with unit tests, sized for Qwen2.5-Coder-0.5B-Instruct. Each arm sends every task
once to a running swarm's /v1/chat/completions, as one request body:

  greedy   temperature 0,             "swarm": {"votes": 1}
  sample   temperature T, seed/task,  "swarm": {"votes": 1}   (what one vote costs and scores)
  vote3    temperature T,             "swarm": {"votes": 3}
  vote5    temperature T,             "swarm": {"votes": 5}
  vote5a   temperature omitted,       "swarm": {"votes": 5}   (the swarm's anchor: its first
                                                                candidate greedy; not by default)

The vote arms carry no seed: k samples drawn with one seed would be k copies of one answer.
Arms run one after another over all tasks (not interleaved), so no arm finds its prompt already
cached by another. Per arm it prints accuracy (and by kind), the mean samples spent per task
(the reply's top-level `swarm.k`, or len(`swarm.candidates`), else 1) and the mean wall time per
request; then k=5 minus one sample and k=5 minus greedy, in points. A request that fails counts as
a wrong answer, is reported in the `errors` column, and is left out of the samples mean.

Usage:
  python bench/quality.py --url http://127.0.0.1:8000 [--arms greedy,vote5] [--limit 5]
  python bench/quality.py --start          # start `python local_swarm.py --model ...` itself
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_tasks as qt  # noqa: E402
from common import (bench_main, checked_candidates, run_arms, samples_spent,  # noqa: E402
                    save_results)

MAX_TOKENS = {"arithmetic": 400, "python": 512}


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    votes: int
    sampled: bool               # temperature T (else 0)
    seeded: bool                # a seed per task
    anchored: bool = False      # temperature omitted: the swarm samples at its vote temperature,
                                # its first candidate greedy (the anchor); T must match the swarm's


ARMS = {a.name: a for a in (
    Arm("greedy", "greedy, 1 worker", 1, sampled=False, seeded=False),
    Arm("sample", "1 sample at T", 1, sampled=True, seeded=True),
    Arm("vote3", "vote k=3 at T", 3, sampled=True, seeded=False),
    Arm("vote5", "vote k=5 at T", 5, sampled=True, seeded=False),
    Arm("vote5a", "vote k=5, anchored", 5, sampled=True, seeded=False, anchored=True),
)}
DEFAULT_ARMS = ("greedy", "sample", "vote3", "vote5")


@dataclass(frozen=True)
class Outcome:
    """One task under one arm. samples None: the request failed, so nothing is known."""

    id: str
    kind: str
    correct: bool
    detail: str
    extracted: str | None
    samples: int | None
    wall_s: float
    error: str | None
    reply: str
    candidates: list | None = None   # --explain: each candidate, checked (bench/selection.py)


# ============================================================================ requests


TASK_NUMBER = {t.id: i for i, t in enumerate(qt.TASKS)}     # seeds do not move with --limit


def request_body(arm: Arm, task: Any, args: argparse.Namespace) -> dict:
    body = {"model": "local-swarm",
            "messages": [{"role": "user", "content": qt.prompt_for(task)}],
            "temperature": args.temperature if arm.sampled else 0.0,
            "max_tokens": MAX_TOKENS[task.kind],
            "swarm": {"votes": arm.votes}}
    if arm.anchored:
        del body["temperature"]
    if arm.seeded:
        body["seed"] = args.seed + TASK_NUMBER[task.id]
    if getattr(args, "explain", False):
        body["swarm"]["explain"] = True
    return body


def reply_text(reply: dict) -> str:
    """The first choice's content; raises ValueError when the reply has none."""
    try:
        content = reply["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError("no choices[0].message in the reply") from exc
    return content if isinstance(content, str) else ""


def run_task(client: httpx.Client, url: str, arm: Arm, task: Any, args: argparse.Namespace
             ) -> Outcome:
    body = request_body(arm, task, args)
    t0 = time.perf_counter()
    try:
        r = client.post(url + "/v1/chat/completions", json=body)
        wall = time.perf_counter() - t0
        if r.status_code != 200:
            raise ValueError(f"HTTP {r.status_code}: {r.text[:200]}")
        reply = r.json()
        text = reply_text(reply)
    except (httpx.HTTPError, ValueError) as exc:   # json errors are ValueErrors
        return Outcome(task.id, task.kind, False, "request failed", None, None,
                       time.perf_counter() - t0, str(exc)[:300], "")
    verdict = qt.check(task, text)
    return Outcome(task.id, task.kind, verdict.correct, verdict.detail,
                   verdict.extracted, samples_spent(reply), wall, None, text,
                   checked_candidates(reply, lambda c: qt.check(task, c["content"]).correct))


def run_arm(client: httpx.Client, url: str, arm: Arm, tasks: list, args: argparse.Namespace
            ) -> list[Outcome]:
    outcomes = []
    for task in tasks:
        outcome = run_task(client, url, arm, task, args)
        outcomes.append(outcome)
        if args.verbose:
            mark = "ok " if outcome.correct else "BAD"
            print(f"  {arm.name:7} {mark} {task.id:28} {outcome.detail[:70]}", flush=True)
    return outcomes


# ============================================================================ figures


def summarize(outcomes: list[Outcome]) -> dict:
    def acc(items: list[Outcome]) -> float | None:
        return 100.0 * sum(o.correct for o in items) / len(items) if items else None

    answered = [o.samples for o in outcomes if o.samples is not None]
    return {
        "tasks": len(outcomes),
        "correct": sum(o.correct for o in outcomes),
        "accuracy": acc(outcomes),
        "by_kind": {kind: acc([o for o in outcomes if o.kind == kind])
                    for kind in ("arithmetic", "python")},
        "mean_samples": sum(answered) / len(answered) if answered else None,
        "mean_wall_s": sum(o.wall_s for o in outcomes) / len(outcomes) if outcomes else None,
        "errors": sum(o.error is not None for o in outcomes),
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def print_table(summaries: dict[str, dict]) -> None:
    print(f"{'arm':8} {'label':18} {'tasks':>5} {'accuracy':>9} {'arith':>7} {'python':>7} "
          f"{'samples':>7} {'wall/task':>9} {'errors':>6}")
    for name, s in summaries.items():
        samples = "-" if s["mean_samples"] is None else f"{s['mean_samples']:.2f}"
        wall = "-" if s["mean_wall_s"] is None else f"{s['mean_wall_s']:.2f} s"
        print(f"{name:8} {ARMS[name].label:18} {s['tasks']:5d} {_pct(s['accuracy']):>9} "
              f"{_pct(s['by_kind']['arithmetic']):>7} {_pct(s['by_kind']['python']):>7} "
              f"{samples:>7} {wall:>9} {s['errors']:6d}")


def comparison(summaries: dict[str, dict]) -> str:
    def diff(a: str, b: str) -> str:
        if a not in summaries or b not in summaries:
            return "n/a"
        return f"{summaries[a]['accuracy'] - summaries[b]['accuracy']:+.1f} points"

    return (f"k=5 minus one sample: {diff('vote5', 'sample')}; "
            f"k=5 minus greedy: {diff('vote5', 'greedy')}")


# ============================================================================ CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running swarm, e.g. http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start a swarm, stop it at the end")
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="the model --start serves")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma-separated subset of {list(ARMS)} (default {','.join(DEFAULT_ARMS)})")
    p.add_argument("--limit", type=int, default=None, help="first N tasks of each kind")
    p.add_argument("--temperature", type=float, default=0.7, help="T of the sampled arms")
    p.add_argument("--seed", type=int, default=1234, help="the sample arm's seed for task number "
                   "i (in the whole task list) is SEED + i")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default="quality_results.json", help="JSON file of per-task outcomes")
    p.add_argument("--verbose", action="store_true", help="print each task's outcome")
    p.add_argument("--explain", action="store_true", help="save each candidate of a vote, its "
                   "text, log-probabilities and whether it is right (for bench/selection.py)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        p.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


def select_tasks(limit: int | None) -> list:
    return [*qt.ARITHMETIC[:limit], *qt.PYTHON[:limit]]


def run(url: str, args: argparse.Namespace) -> dict[str, dict]:
    tasks = select_tasks(args.limit)
    url = url.rstrip("/")
    header = {"url": url, "temperature": args.temperature, "seed": args.seed, "limit": args.limit}
    print(f"{len(tasks)} tasks ({sum(t.kind == 'arithmetic' for t in tasks)} arithmetic, "
          f"{sum(t.kind == 'python' for t in tasks)} python) against {url}", flush=True)
    summaries, results = run_arms(url, args, header, ARMS, tasks, run_arm, summarize)
    print_table(summaries)
    print(comparison(summaries))
    save_results(results, args.out)
    return summaries


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
