"""What the benches share: the swarm they start (as a user would, via the tests' launcher), their
common flags, and the median."""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import SwarmProcess, start_swarm  # noqa: E402


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
