#!/usr/bin/env python3
"""Does the swarm call tools right? Accuracy per arm on tool-use tasks with known outcomes.

The tasks (bench/tools_tasks.py) offer 1 to 6 tools and expect either one call (name and
arguments, each argument compared its own way) or a text answer; some are multi-turn, carrying an
earlier call and its result. Each arm sends every task once to a running swarm's
/v1/chat/completions with the task's `tools` and "tool_choice": "auto" (but in `textonly`), in
one request body:

  greedy   temperature 0,                   "swarm": {"votes": 1}
  sample   temperature omitted, seed/task,  "swarm": {"votes": 1, "anchor": false}   (one sample
                                                                   at the vote T)
  vote3    temperature omitted,             "swarm": {"votes": 3}
  vote5    temperature omitted,             "swarm": {"votes": 5}
  vote5s   temperature omitted,             "swarm": {"votes": 5, "anchor": false}
  free     temperature 0,                   "swarm": {"votes": 1, "constrain_calls": false}
  hint     temperature 0, HINT as a system message after the conversation
  textonly temperature 0, "tool_choice": "none" (replies in --out: what it says instead)

With the temperature omitted the swarm samples at its own vote temperature (--temperature sends
one instead), except its anchor: the first candidate decodes greedily and wins ties (vote3, vote5;
vote5s turns the anchor off: five samples, as before the anchor existed). A reply is correct when no call was expected and it has no tool_calls, or when its
first tool call (`choices[0].message.tool_calls[0]`) has the expected name and arguments. A reply
whose tool_calls have the wrong shape (null, no id, arguments not a JSON-object string,
finish_reason not "tool_calls") is printed and counted in the `shape` column, whatever its score.
With --stream the replies are streamed and the `tool_calls` deltas reassembled by index (the first
delta of a call carries its id, type and function.name; later ones argument fragments).

Per arm it prints accuracy, the accuracy on calls (name and arguments) and on the call name alone
(over the tasks that expect a call), the accuracy on tasks that expect text, shape errors, the
mean samples spent per task (`swarm.samples`, else `swarm.k`, else 1) and the mean wall time per
request. A request that fails counts as wrong, is reported in `errors`, and is left out of the
samples mean. `constrained` counts the candidates whose call the model began on its own and the
swarm finished under its call grammar (the `constrained` flag in `swarm.candidates`). `wrong tool`
counts the replies that call a tool where text was right, or another tool than the right one:
what an agent would run wrongly.

Usage:
  python bench/tools.py --url http://127.0.0.1:8000 [--arms greedy,vote5] [--limit 5] [--stream]
  python bench/tools.py --start          # start `python local_swarm.py --model ...` itself
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tools_tasks as tt  # noqa: E402
from common import (bench_main, checked_candidates, run_arms, samples_spent,  # noqa: E402
                    save_results)

MAX_TOKENS = 384                # a call, or a short answer; write_file content is the longest
MAX_STREAM_EVENTS = 10_000      # MAX_TOKENS tokens send a few hundred events; more is a runaway


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    votes: int
    greedy: bool                # temperature 0 (else omitted, or --temperature)
    seeded: bool                # a seed per task
    constrain: bool = True      # False: the swarm parses the model's own call text as it is
    anchor: bool = True         # False: no greedy first candidate ("swarm": {"anchor": false})
    hint: bool = False          # a system message after the conversation: HINT
    choice: str = "auto"        # tool_choice ("none": does the model answer in text at all?)


# What the `hint` arm adds after each conversation: can the model be told when not to call?
HINT = ("Call a tool only when the user's request needs it. If the question can be answered "
        "directly, or the tool results above already answer it, reply in plain text.")


ARMS = {a.name: a for a in (
    Arm("greedy", "greedy, 1 worker", 1, greedy=True, seeded=False),
    Arm("sample", "1 sample at T", 1, greedy=False, seeded=True, anchor=False),
    Arm("vote3", "vote k=3 at T", 3, greedy=False, seeded=False),
    Arm("vote5", "vote k=5 at T", 5, greedy=False, seeded=False),
    Arm("vote5s", "vote k=5, no anchor", 5, greedy=False, seeded=False, anchor=False),
    Arm("free", "greedy, unconstrained", 1, greedy=True, seeded=False, constrain=False),
    Arm("hint", "greedy, with HINT", 1, greedy=True, seeded=False, hint=True),
    Arm("textonly", "greedy, tool_choice none", 1, greedy=True, seeded=False, choice="none"),
)}
DEFAULT_ARMS = ("greedy", "sample", "vote3", "vote5")


@dataclass(frozen=True)
class Outcome:
    """One task under one arm. samples None: the request failed, so nothing is known."""

    id: str
    kind: str                   # "call" or "no_call"
    multi_turn: bool
    correct: bool
    name_ok: bool | None        # the first call names the expected tool (None: no call expected)
    called: str | None          # the first call's name (None: no call)
    detail: str
    shape: str | None           # the reply's tool_calls shape problems (None: none)
    samples: int | None
    wall_s: float
    error: str | None
    reply: str                  # content, then the tool calls as JSON
    constrained: int = 0        # candidates whose call the swarm finished under its call grammar
    candidates: list | None = None   # --explain: each candidate, checked (bench/selection.py)


# ============================================================================ requests


TASK_NUMBER = {t.id: i for i, t in enumerate(tt.TASKS)}     # seeds do not move with --limit


def request_body(arm: Arm, task: tt.ToolTask, args: argparse.Namespace) -> dict:
    messages = tt.messages_for(task) + ([{"role": "system", "content": HINT}] if arm.hint else [])
    body: dict[str, Any] = {"model": "local-swarm", "messages": messages,
                            "tools": tt.tools_for(task), "tool_choice": arm.choice,
                            "max_tokens": MAX_TOKENS, "swarm": {"votes": arm.votes}}
    if not arm.constrain:
        body["swarm"]["constrain_calls"] = False
    if not arm.anchor:
        body["swarm"]["anchor"] = False
    if arm.greedy:
        body["temperature"] = 0.0
    elif args.temperature is not None:
        body["temperature"] = args.temperature
    if arm.seeded:
        body["seed"] = args.seed + TASK_NUMBER[task.id]
    if args.stream:
        body["stream"] = True
    if getattr(args, "explain", False):
        body["swarm"]["explain"] = True
    return body


def post_whole(client: httpx.Client, url: str, body: dict) -> tuple[dict, list[str]]:
    """The reply of a non-streamed request, and no stream problems. Raises ValueError."""
    r = client.post(url + "/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise ValueError(f"HTTP {r.status_code}: {r.text[:200]}")
    return r.json(), []


def post_streamed(client: httpx.Client, url: str, body: dict) -> tuple[dict, list[str]]:
    """The reassembled reply of a streamed request, and the stream's shape problems.
    Raises ValueError for an HTTP error, an error event or an unreadable event."""
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise ValueError(f"HTTP {r.status_code}: {r.text[:200]}")
        chunks, done = parse_sse(r.iter_lines())
    reply, problems = reassemble(chunks)
    return reply, problems + ([] if done else ["the stream ended without data: [DONE]"])


def reply_summary(reply: dict) -> str:
    try:
        message = tt.reply_message(reply)
    except ValueError:
        return ""
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    if message.get("tool_calls") is not None:
        text += "\ntool_calls: " + json.dumps(message["tool_calls"])
    return text[:2000]


def run_task(client: httpx.Client, url: str, arm: Arm, task: tt.ToolTask,
             args: argparse.Namespace) -> Outcome:
    body = request_body(arm, task, args)
    post = post_streamed if args.stream else post_whole
    t0 = time.perf_counter()
    try:
        reply, stream_problems = post(client, url, body)
        wall = time.perf_counter() - t0
        verdict = tt.check(task, reply)
    except (httpx.HTTPError, ValueError) as exc:     # json errors are ValueErrors
        return Outcome(task.id, task.kind, task.multi_turn, False, None if task.expect is None
                       else False, None, "request failed", None, None, time.perf_counter() - t0,
                       str(exc)[:300], "")
    shape = "; ".join(stream_problems + ([verdict.shape] if verdict.shape else [])) or None
    name_ok = None if task.expect is None else verdict.called == task.expect.name
    return Outcome(task.id, task.kind, task.multi_turn, verdict.correct, name_ok, verdict.called,
                   verdict.detail, shape, samples_spent(reply), wall, None, reply_summary(reply),
                   constrained_calls(reply), checked_candidates(
                       reply, lambda c: tt.check(task, candidate_reply(c)).correct))


def candidate_reply(candidate: dict) -> dict:
    """An explained candidate (swarm.explain) as a whole reply of its own, for the checker."""
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
             for i, c in enumerate(candidate.get("calls") or ())]
    message: dict[str, Any] = {"role": "assistant", "content": candidate.get("content") or None}
    if calls:
        message["tool_calls"] = calls
    return {"choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if calls else "stop"}]}


def constrained_calls(reply: dict) -> int:
    """How many of the reply's candidates started a call that the swarm finished under its
    call grammar (the `constrained` flag of each `swarm.candidates` entry)."""
    swarm = reply.get("swarm") if isinstance(reply, dict) else None
    candidates = swarm.get("candidates") if isinstance(swarm, dict) else None
    return sum(bool(c.get("constrained")) for c in candidates or () if isinstance(c, dict))


def run_arm(client: httpx.Client, url: str, arm: Arm, tasks: list[tt.ToolTask],
            args: argparse.Namespace) -> list[Outcome]:
    outcomes = []
    for task in tasks:
        outcome = run_task(client, url, arm, task, args)
        outcomes.append(outcome)
        if args.verbose:
            mark = "ok " if outcome.correct else "BAD"
            print(f"  {arm.name:7} {mark} {task.id:16} {(outcome.error or outcome.detail)[:80]}",
                  flush=True)
        if outcome.shape:
            print(f"  {arm.name:7} shape error {task.id}: {outcome.shape[:200]}", flush=True)
    return outcomes


# ============================================================================ streams
# Pure functions over the SSE lines and the chat.completion.chunk events.


def parse_sse(lines: Iterable[str]) -> tuple[list[dict], bool]:
    """The events of an SSE body's `data:` lines, and whether `data: [DONE]` ended it.
    Raises ValueError for an event that is not a JSON object, an error event, or too many."""
    chunks: list[dict] = []
    for line in lines:
        if not line.startswith("data:"):
            continue                            # blank separators, comments, event: lines
        data = line[5:].strip()
        if data == "[DONE]":
            return chunks, True
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise ValueError(f"an event that is not an object: {data[:100]}")
        if "error" in chunk:
            raise ValueError(f"error event: {json.dumps(chunk['error'])[:200]}")
        chunks.append(chunk)
        if len(chunks) > MAX_STREAM_EVENTS:
            raise ValueError(f"more than {MAX_STREAM_EVENTS} events")
    return chunks, False


def _merge_call(calls: dict[int, dict], piece: Any, problems: list[str]) -> None:
    """Fold one `tool_calls` delta into `calls` (by index). The first delta of an index opens
    the call with its id, type and name; any delta may add an arguments fragment."""
    index = piece.get("index") if isinstance(piece, dict) else None
    if not isinstance(index, int) or isinstance(index, bool):
        problems.append("a tool_calls delta without an integer index")
        return
    fn = piece.get("function") if isinstance(piece.get("function"), dict) else {}
    if index not in calls:
        calls[index] = {"id": piece.get("id"), "type": piece.get("type"),
                        "function": {"name": fn.get("name"), "arguments": ""}}
    else:
        call = calls[index]
        for key, holder, new in (("id", call, piece.get("id")), ("type", call, piece.get("type")),
                                 ("name", call["function"], fn.get("name"))):
            if new is None or new == holder[key]:
                continue                        # absent, or repeated as it was
            problems.append(f"tool_calls[{index}] {key} " + (
                "not in its first delta" if holder[key] is None else f"changed to {new!r}"))
            holder[key] = new
    fragment = fn.get("arguments")
    if isinstance(fragment, str):
        calls[index]["function"]["arguments"] += fragment
    elif fragment is not None:
        problems.append(f"tool_calls[{index}] has an arguments fragment that is not a string")


def reassemble(chunks: list[dict]) -> tuple[dict, list[str]]:
    """A reply in the shape of a non-streamed one (choices[0].message with content and
    tool_calls, finish_reason: the last one sent, swarm: the last chunk's) and the problems
    seen while folding the deltas."""
    content: list[str] = []
    calls: dict[int, dict] = {}
    problems: list[str] = []
    finish, swarm = None, None
    for chunk in chunks:
        if isinstance(chunk.get("swarm"), dict):
            swarm = chunk["swarm"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            if isinstance(delta.get("content"), str):
                content.append(delta["content"])
            for piece in delta.get("tool_calls") or []:
                _merge_call(calls, piece, problems)
            if choice.get("finish_reason") is not None:
                finish = choice["finish_reason"]
    text = "".join(content)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    reply: dict[str, Any] = {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}
    if swarm is not None:
        reply["swarm"] = swarm
    return reply, problems


# ============================================================================ figures


def _share(items: list[Outcome], ok) -> float | None:
    return 100.0 * sum(bool(ok(o)) for o in items) / len(items) if items else None


def summarize(outcomes: list[Outcome]) -> dict:
    calls = [o for o in outcomes if o.kind == "call"]
    answered = [o.samples for o in outcomes if o.samples is not None]
    return {
        "tasks": len(outcomes),
        "correct": sum(o.correct for o in outcomes),
        "accuracy": _share(outcomes, lambda o: o.correct),
        "call": _share(calls, lambda o: o.correct),
        "call_name": _share(calls, lambda o: o.name_ok),
        "no_call": _share([o for o in outcomes if o.kind == "no_call"], lambda o: o.correct),
        "multi_turn": _share([o for o in outcomes if o.multi_turn], lambda o: o.correct),
        "shape_errors": sum(o.shape is not None for o in outcomes),
        "mean_samples": sum(answered) / len(answered) if answered else None,
        "mean_wall_s": sum(o.wall_s for o in outcomes) / len(outcomes) if outcomes else None,
        "errors": sum(o.error is not None for o in outcomes),
        "constrained": sum(o.constrained for o in outcomes),
        "wrong_tool": sum(wrong_tool(o) for o in outcomes),
    }


def wrong_tool(o: Outcome) -> bool:
    """A call where text was right, or a call to another tool than the right one: what an agent
    would run wrongly (a right tool with wrong arguments is not counted here)."""
    return o.called is not None and (o.kind == "no_call" or o.name_ok is False)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def print_table(summaries: dict[str, dict]) -> None:
    print(f"{'arm':8} {'label':18} {'correct':>7} {'accuracy':>8} {'call':>7} {'name':>7} "
          f"{'no-call':>7} {'multi':>7} {'shape':>5} {'samples':>7} {'wall/task':>9} "
          f"{'errors':>6} {'constrained':>11} {'wrong tool':>10}")
    for name, s in summaries.items():
        samples = "-" if s["mean_samples"] is None else f"{s['mean_samples']:.2f}"
        wall = "-" if s["mean_wall_s"] is None else f"{s['mean_wall_s']:.2f} s"
        print(f"{name:8} {ARMS[name].label:18} {s['correct']:>3d}/{s['tasks']:<3d} "
              f"{_pct(s['accuracy']):>8} {_pct(s['call']):>7} {_pct(s['call_name']):>7} "
              f"{_pct(s['no_call']):>7} {_pct(s['multi_turn']):>7} {s['shape_errors']:5d} "
              f"{samples:>7} {wall:>9} {s['errors']:6d} {s['constrained']:11d} "
              f"{s['wrong_tool']:10d}")


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
                   help=f"comma-separated subset of {list(ARMS)} (default {','.join(DEFAULT_ARMS)}; "
                   "'free' is greedy with the swarm's call grammar off, to measure what it adds)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N tasks of each group (call or text, one turn or multi-turn)")
    p.add_argument("--temperature", type=float, default=None, help="T of the sampled arms "
                   "(default: omitted, so the swarm samples at its vote temperature)")
    p.add_argument("--seed", type=int, default=1234, help="the sample arm's seed for task number "
                   "i (in the whole task list) is SEED + i")
    p.add_argument("--stream", action="store_true", help="stream the replies and reassemble them")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default="tools_results.json", help="JSON file of per-task outcomes")
    p.add_argument("--verbose", action="store_true", help="print each task's outcome")
    p.add_argument("--explain", action="store_true", help="save each candidate of a vote, its "
                   "text, calls, log-probabilities and whether it is right (bench/selection.py)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        p.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


def select_tasks(limit: int | None) -> list[tt.ToolTask]:
    """The first `limit` tasks of each group: (call or text) x (one turn or multi-turn)."""
    groups = {(t.kind, t.multi_turn) for t in tt.TASKS}
    chosen = {t.id for group in groups
              for t in [t for t in tt.TASKS if (t.kind, t.multi_turn) == group][:limit]}
    return [t for t in tt.TASKS if t.id in chosen]


def run(url: str, args: argparse.Namespace) -> dict[str, dict]:
    tasks = select_tasks(args.limit)
    url = url.rstrip("/")
    header = {"url": url, "temperature": args.temperature, "seed": args.seed,
              "stream": args.stream, "limit": args.limit}
    print(f"{len(tasks)} tasks ({sum(t.kind == 'call' for t in tasks)} expect a call, "
          f"{sum(t.kind == 'no_call' for t in tasks)} a text answer; "
          f"{sum(t.multi_turn for t in tasks)} multi-turn) against {url}"
          f"{' (streamed)' if args.stream else ''}", flush=True)
    summaries, results = run_arms(url, args, header, ARMS, tasks, run_arm, summarize)
    print_table(summaries)
    print(comparison(summaries))
    save_results(results, args.out)
    return summaries


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
