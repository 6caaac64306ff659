"""What the benches share: the swarm they start (as a user would, via the tests' launcher, or from
a command line by its ready line), their common flags, the samples a reply spent, and the median."""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = re.compile(r"ready on (http://[\d.]+:\d+)/v1")
START_TIMEOUT_S = 1800          # a first start may build llama.cpp and download the model
STOP_TIMEOUT_S = 30

if TYPE_CHECKING:
    from conftest import SwarmProcess


def base_parser(doc: str, rounds: int) -> argparse.ArgumentParser:
    """--model, --instances and --rounds, with this bench's default round count."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=rounds)
    return ap


@contextlib.contextmanager
def running_swarm(args: argparse.Namespace, *flags: str) -> Iterator[SwarmProcess]:
    """`python local_swarm.py --model M --instances N --threads 1 FLAGS`; on a failure the daemon's
    last log lines are printed, and the swarm is always stopped."""
    sys.path.insert(0, str(ROOT / "tests"))     # only benches that use it need pytest and psutil
    from conftest import start_swarm
    swarm = start_swarm("--model", args.model, "--instances", str(args.instances), "--threads", "1",
                        *flags)
    try:
        yield swarm
    except Exception:
        print("".join(swarm.output[-40:]), file=sys.stderr)     # the daemon's side of a failure
        raise
    finally:
        swarm.stop()


def med(xs) -> float:
    return statistics.median(xs)


def samples_spent(reply: dict) -> int:
    """`swarm.samples` (candidates launched, adaptive and early finish included), else `swarm.k`,
    else the number of `swarm.candidates`, else 1 (a plain single answer)."""
    swarm = reply.get("swarm")
    if isinstance(swarm, dict):
        for key in ("samples", "k"):
            if isinstance(swarm.get(key), int) and not isinstance(swarm.get(key), bool):
                return swarm[key]
        if isinstance(swarm.get("candidates"), list):
            return len(swarm["candidates"])
    return 1


def checked_candidates(reply: dict, correct) -> list | None:
    """The reply's explained candidates (swarm.explain), each with whether it is right
    (`correct(candidate)`); None when the reply has none."""
    swarm = reply.get("swarm") if isinstance(reply, dict) else None
    candidates = swarm.get("candidates") if isinstance(swarm, dict) else None
    if not candidates or not all(isinstance(c, dict) and "content" in c for c in candidates):
        return None
    return [{**c, "correct": bool(correct(c))} for c in candidates]


@contextlib.contextmanager
def started_swarm(command: list[str], pids: list[int] | None = None,
                  timeout: float = START_TIMEOUT_S) -> Iterator[str]:
    """Run `command` (a daemon), yield the base URL of its "ready on URL/v1" line, SIGTERM it
    after; the daemon's pid is appended to `pids` when given. Raises RuntimeError when it exits
    or prints no ready line within `timeout` s."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if pids is not None:
        pids.append(proc.pid)
    tail: deque[str] = deque(maxlen=40)     # the daemon's last lines, for a failed start
    urls: list[str] = []
    ready = threading.Event()

    def pump() -> None:              # keeps reading so the daemon never blocks on a full pipe
        for line in proc.stdout:
            tail.append(line)
            if not urls:                         # show the start (a first one builds llama.cpp)
                print(line, end="", file=sys.stderr, flush=True)
            if not urls and (m := READY_LINE.search(line)):
                urls.append(m.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        ready.wait(timeout)
        if not urls:
            raise RuntimeError("the swarm did not start:\n" + "".join(tail))
        yield urls[0]
    finally:
        _stop(proc)
        reader.join(5)              # EOF once the daemon (and its workers) are gone
        if not reader.is_alive():
            proc.stdout.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_arms(url: str, args: argparse.Namespace, header: dict, arms: dict, tasks: list,
             run_arm: Callable, summarize: Callable) -> tuple[dict[str, dict], dict]:
    """Run the arms named in args.arms over `tasks`, one after another on one HTTP client
    (args.timeout per request), printing each arm's time. Returns the summaries per arm and the
    results to save: `header`, the start time, and per arm its settings, summary and outcomes."""
    import httpx
    results: dict = {**header, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "arms": {}}
    summaries = {}
    with httpx.Client(timeout=args.timeout) as client:
        for name in args.arms:
            t0 = time.perf_counter()
            outcomes = run_arm(client, url, arms[name], tasks, args)
            summaries[name] = summarize(outcomes)
            results["arms"][name] = {"arm": asdict(arms[name]), "summary": summaries[name],
                                     "tasks": [asdict(o) for o in outcomes]}
            print(f"arm {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return summaries, results


def save_results(results: dict, out: str) -> None:
    Path(out).write_text(json.dumps(results, indent=1))
    print(f"per-task outcomes: {out}")


def bench_main(args: argparse.Namespace, run: Callable[[str, argparse.Namespace], object]) -> int:
    """Run the bench against args.url, or against a swarm started for it (args.model)."""
    if args.url:
        run(args.url, args)
        return 0
    command = [sys.executable, str(ROOT / "local_swarm.py"), "--model", args.model, "--port", "0"]
    with started_swarm(command) as url:
        run(url, args)
    return 0
