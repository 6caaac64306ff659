#!/usr/bin/env python3
"""What federation adds to a request's wall time: swarm A answering alone (`"swarm": {"federate":
false}`) against A with its peer B voting too, the two arms alternated, for a long reply (both
replies run to --max-tokens) and a 1-token one (what the protocol itself costs: signing, the HTTP
call, B's vote endpoint, the reply's check). Prints medians, the ratio and the milliseconds added.

Two swarms on loopback (one worker each by default), each the other's static peer; beacons go to
their own port only and the federation listeners bind 127.0.0.1, so no packet leaves the machine.
On a machine with fewer cores than the two swarms' workers, B's generation competes with A's for
the CPU: that cost is part of what is measured.

Usage: python bench/federation.py [--model smollm2-135m] [--rounds 10] [--instances 1]
                                  [--max-tokens 32]
"""
from __future__ import annotations

import contextlib
import socket
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, med, running_swarm  # noqa: E402

SECRET = "bench-federation-secret-0123456789"
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
PEER_WAIT_S = 30                # B must show up in A's peer table within this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def federation_flags(own: int, other: int) -> list[str]:
    return ["--ctx", "2048", "--secret", SECRET, "--beacon-interval", "1",
            "--federation-host", "127.0.0.1", "--federation-port", str(own),
            "--federation-broadcast", f"127.0.0.1:{own}", "--peer", f"127.0.0.1:{other}"]


def wait_for_peer(client: httpx.Client, url: str) -> None:
    deadline = time.monotonic() + PEER_WAIT_S
    while not client.get(url + "/v1/federation/peers").json()["data"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the peer never showed up in the table")
        time.sleep(0.2)


def timed(client: httpx.Client, url: str, body: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    reply = client.post(url + "/v1/chat/completions", json=body)
    reply.raise_for_status()
    return time.perf_counter() - started, reply.json()["swarm"]


def measure(client: httpx.Client, url: str, rounds: int, max_tokens: int) -> dict:
    """Alternate local-only and federated requests; wall times and what the peers did."""
    body = {"messages": PROMPT, "max_tokens": max_tokens}
    local, federated, voted, peer_won = [], [], 0, 0
    for _ in range(rounds):
        seconds, swarm = timed(client, url, {**body, "swarm": {"federate": False}})
        assert "peers" not in swarm, swarm
        local.append(seconds)
        seconds, swarm = timed(client, url, body)
        federated.append(seconds)
        voted += sum(p["status"] == "voted" for p in swarm.get("peers", []))
        peer_won += swarm["winner"].startswith("peer:")
    return {"local": med(local), "federated": med(federated), "voted": voted, "won": peer_won}


def report(label: str, rounds: int, m: dict) -> None:
    local, federated = m["local"] * 1000, m["federated"] * 1000
    print(f"{label:<18} local {local:6.0f} ms   federated {federated:6.0f} ms   ratio "
          f"{federated / local:.2f}   added {federated - local:+.0f} ms   peer voted "
          f"{m['voted']}/{rounds}, its answer won {m['won']}")


def main() -> int:
    ap = base_parser(__doc__, rounds=10)
    ap.set_defaults(instances=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    pa, pb = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(running_swarm(args, *federation_flags(pa, pb),
                                              "--node-name", "a"))
        stack.enter_context(running_swarm(args, *federation_flags(pb, pa), "--node-name", "b"))
        with httpx.Client(timeout=600, trust_env=False) as client:
            wait_for_peer(client, a.url)
            timed(client, a.url, {"messages": PROMPT, "max_tokens": 4})          # warm both
            long = measure(client, a.url, args.rounds, args.max_tokens)
            short = measure(client, a.url, args.rounds, 1)
    print(f"model {args.model}, two swarms of {args.instances} worker(s) on loopback, "
          f"{args.rounds} rounds per arm alternated, medians")
    report(f"{args.max_tokens}-token reply", args.rounds, long)
    report("1-token reply", args.rounds, short)
    return 0


if __name__ == "__main__":
    sys.exit(main())
