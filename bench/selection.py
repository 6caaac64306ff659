#!/usr/bin/env python3
"""Which selection rule picks the right candidate? Offline, on votes saved by the benches.

bench/quality.py and bench/tools.py with `--explain` save every candidate of each vote: its text
(and calls), its tokens' log-probabilities, whether it was the greedy anchor or the winner, and
whether it is right by the task's own checker. This script replays each vote under several rules
and prints, per results file and arm, how often each rule's pick is right, against the anchor
(the greedy candidate of the same vote: a paired comparison, free of run-to-run noise), with the
paired counts (tasks only the rule gets right / only the anchor):

  anchor      the greedy candidate (temperature 0)
  swarm       what the swarm picked (the reply's winner)
  majority    the largest group of equal answers (answer_key: the final number, the last code
              block, the calls); ties go to the anchor's group, then to the higher mean logprob
  mean        the highest mean token log-probability
  window      the highest lowest-window mean (the least confident WINDOW tokens, DeepConf's
              "lowest group confidence")
  weighted    majority where each candidate weighs exp(its mean log-probability)
  deepconf    majority over the more confident half by `window` (DeepConf's filter, then vote)
  sure3       majority when at least 3 agree, else the anchor
  oracle      right if any candidate is (the headroom)

Usage: python bench/selection.py quality_results.json [tools_results.json ...]
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import local_swarm as ls  # noqa: E402

WINDOW = 16          # tokens in DeepConf's sliding window (their traces are long; ours are short)
Candidate = dict[str, Any]


def answer_key(c: Candidate) -> str:
    """The answer a candidate gives, as the swarm's majority compares them: its calls' calls_key
    (canonical, arithmetic by value), else the key of its text."""
    if c.get("calls"):
        return ls.calls_key(ls.ToolCall(x["name"], x["arguments"]).canonical()
                            for x in c["calls"])
    return "text:" + ls.answer_key(c.get("content") or "")


def mean_logprob(c: Candidate) -> float:
    xs = c.get("logprobs") or []
    return statistics.fmean(xs) if xs else -math.inf


def window_logprob(c: Candidate, window: int = WINDOW) -> float:
    """The lowest mean log-probability over `window` consecutive tokens (all, when fewer)."""
    low = ls.lowest_window_mean(c.get("logprobs") or [], window)
    return -math.inf if low is None else low


def anchor_index(cands: list[Candidate]) -> int:
    return next((i for i, c in enumerate(cands) if c.get("greedy")), 0)


def _majority(cands: list[Candidate], among: list[int], weight: Callable[[Candidate], float]
              ) -> int:
    groups: dict[str, list[int]] = {}
    for i in among:
        groups.setdefault(answer_key(cands[i]), []).append(i)
    anchor = anchor_index(cands)

    def rank(members: list[int]) -> tuple:
        return (sum(weight(cands[i]) for i in members), anchor in members,
                max(mean_logprob(cands[i]) for i in members))
    best = max(groups.values(), key=rank)
    return anchor if anchor in best else max(best, key=lambda i: mean_logprob(cands[i]))


def pick_majority(cands: list[Candidate]) -> int:
    return _majority(cands, list(range(len(cands))), lambda c: 1.0)


def pick_weighted(cands: list[Candidate]) -> int:
    return _majority(cands, list(range(len(cands))), lambda c: math.exp(mean_logprob(c)))


def pick_deepconf(cands: list[Candidate]) -> int:
    order = sorted(range(len(cands)), key=lambda i: window_logprob(cands[i]), reverse=True)
    return _majority(cands, order[:max(1, (len(cands) + 1) // 2)], lambda c: 1.0)


def pick_sure3(cands: list[Candidate]) -> int:
    i = pick_majority(cands)
    agree = sum(answer_key(c) == answer_key(cands[i]) for c in cands)
    return i if agree >= 3 else anchor_index(cands)


RULES: dict[str, Callable[[list[Candidate]], int]] = {
    "anchor": anchor_index,
    "swarm": lambda cands: next((i for i, c in enumerate(cands) if c.get("winner")), 0),
    "majority": pick_majority,
    "mean": lambda cands: max(range(len(cands)), key=lambda i: mean_logprob(cands[i])),
    "window": lambda cands: max(range(len(cands)), key=lambda i: window_logprob(cands[i])),
    "weighted": pick_weighted,
    "deepconf": pick_deepconf,
    "sure3": pick_sure3,
}


def replay(tasks: list[dict]) -> dict[str, list[bool]]:
    """Per rule, whether its pick is right on each task that has explained candidates; and
    `oracle`: whether any candidate is."""
    voted = [t["candidates"] for t in tasks if t.get("candidates")]
    rows = {name: [bool(c[rule(c)]["correct"]) for c in voted] for name, rule in RULES.items()}
    rows["oracle"] = [any(x["correct"] for x in c) for c in voted]
    return rows


def report(name: str, rows: dict[str, list[bool]]) -> list[str]:
    base = rows["anchor"]
    n = len(base)
    lines = [f"{name}: {n} voted tasks",
             f"  {'rule':9} {'right':>7} {'accuracy':>8} {'vs anchor':>9} {'only rule':>9} "
             f"{'only anchor':>11}"]
    for rule, right in rows.items():
        gained = sum(r and not b for r, b in zip(right, base))
        lost = sum(b and not r for r, b in zip(right, base))
        share = 100.0 * sum(right) / n if n else 0.0
        diff = 100.0 * (sum(right) - sum(base)) / n if n else 0.0
        lines.append(f"  {rule:9} {sum(right):>3}/{n:<3} {share:7.1f}% {diff:+8.1f}  "
                     f"{gained:>9} {lost:>11}")
    return lines


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for path in argv:
        results = json.loads(Path(path).read_text())
        for arm, data in results.get("arms", {}).items():
            rows = replay(data.get("tasks", []))
            if rows["anchor"]:
                print("\n".join(report(f"{path} / {arm}", rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
