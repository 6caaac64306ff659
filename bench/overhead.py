#!/usr/bin/env python3
"""What the daemon adds on top of a worker, measured in one run.

Starts a swarm (default: 2 workers), then sends the same requests alternately straight to one
worker and through the daemon (which, with the other worker kept busy or idle, lands on a worker
of the same build and model). Prints, per mode, medians and the ratios:

  - streamed tokens/s through the daemon / direct          (target >= 0.97)
  - added time to first token, median                      (target <= 5 ms)
  - daemon CPU time per relayed token                      (target <= 50 us): the daemon's CPU for
    a long streamed reply minus that for a 1-token reply, divided by the extra tokens (the fixed
    per-request cost, printed too, is not a per-token cost)
  - whole (non-streamed) reply time, daemon / direct
  - memory: summed PSS of daemon + workers vs one worker alone (weights are mmapped and shared)

Usage: python bench/overhead.py [--model smollm2-135m] [--rounds 8] [--max-tokens 96]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, med, running_swarm  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon."}]
CLIENT = httpx.Client(timeout=300)      # keep-alive on both paths: connection set-up is not measured


def stream_once(url: str, body: dict) -> dict:
    """One streamed request: time to first content token, token count, tokens/s after the first."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with CLIENT.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                tokens += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": first - t0, "tokens": tokens,
            "tps": (tokens - 1) / (end - first) if tokens > 1 else 0.0, "total": end - t0}


def floor_cpu_per_token(port: int, body: dict) -> float:
    """CPU per token of the cheapest possible asyncio reader of the same worker stream (raw
    socket, no parsing): what one wake-up per token costs on this machine, the floor under any
    asyncio relay's per-token figure."""
    import asyncio

    async def read_all() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = json.dumps({**body, "stream": True}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: w\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(data), data))
        tokens = 0
        while (chunk := await reader.read(65536)) and not chunk.endswith(b"0\r\n\r\n"):
            tokens += chunk.count(b'"content"')
        writer.close()
        return tokens

    me = psutil.Process()
    cpu0 = cpu_seconds(me)
    tokens = asyncio.run(read_all())
    return (cpu_seconds(me) - cpu0) / max(1, tokens)


def whole_once(url: str, body: dict) -> float:
    t0 = time.perf_counter()
    CLIENT.post(url + "/v1/chat/completions", json=body).raise_for_status()
    return time.perf_counter() - t0


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of all the process's threads: nanosecond schedstat on Linux (cpu_times() ticks
    at 10 ms, too coarse for a per-token figure), else psutil."""
    tasks = Path(f"/proc/{proc.pid}/task")
    if tasks.is_dir():
        return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks.iterdir()) / 1e9
    return sum(proc.cpu_times()[:2])


def pss(pid: int) -> int:
    return psutil.Process(pid).memory_full_info().pss


def main() -> int:
    ap = base_parser(__doc__, rounds=8)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--ttft-rounds", type=int, default=40, help="alternated 3-token requests "
                    "for the time-to-first-token comparison")
    args = ap.parse_args()

    with running_swarm(args, "--ctx", "2048") as swarm:
        details = swarm.health()["details"]
        worker_url = f"http://127.0.0.1:{details[0]['port']}"
        daemon = psutil.Process(swarm.proc.pid)
        body = {"messages": PROMPT, "max_tokens": args.max_tokens, "temperature": 0, "seed": 1}
        stream_once(worker_url, body), stream_once(swarm.url, body)          # warm both paths
        direct, proxied, cpu_per_token, cpu_fixed, floor = [], [], [], [], []
        whole_direct, whole_proxied = [], []
        short = {**body, "max_tokens": 1}
        cpu = lambda: cpu_seconds(daemon)                   # noqa: E731
        for _ in range(args.rounds):
            direct.append(stream_once(worker_url, body))
            cpu0 = cpu()
            proxied.append(stream_once(swarm.url, body))
            cpu1 = cpu()
            one = stream_once(swarm.url, short)
            cpu2 = cpu()
            cpu_fixed.append(cpu2 - cpu1)
            cpu_per_token.append(((cpu1 - cpu0) - (cpu2 - cpu1)) / max(1, proxied[-1]["tokens"] - one["tokens"]))
            whole_direct.append(whole_once(worker_url, body))
            whole_proxied.append(whole_once(swarm.url, body))
            floor.append(floor_cpu_per_token(details[0]["port"], body))

        ttft_pairs = []
        for _ in range(args.ttft_rounds):
            quick = {**body, "max_tokens": 3}
            ttft_pairs.append((stream_once(worker_url, quick)["ttft"],
                               stream_once(swarm.url, quick)["ttft"]))

        pids = [w["pid"] for w in swarm.health()["details"]]
        total_pss = pss(swarm.proc.pid) + sum(pss(p) for p in pids)
        one_worker = psutil.Process(pids[0]).memory_info().rss     # what it maps alone

        print(f"model {args.model}, {args.instances} workers, {args.rounds} rounds alternated, "
              f"{med([d['tokens'] for d in direct])} tokens per reply")
        print(f"streamed tokens/s      direct {med([d['tps'] for d in direct]):8.1f}   "
              f"daemon {med([p['tps'] for p in proxied]):8.1f}   ratio "
              f"{med([p['tps'] for p in proxied]) / med([d['tps'] for d in direct]):.3f}  (target >= 0.97)")
        added = [(p - d) * 1000 for d, p in ttft_pairs]
        print(f"time to first token    direct {med([d for d, _ in ttft_pairs]) * 1000:7.1f} ms "
              f"daemon {med([p for _, p in ttft_pairs]) * 1000:7.1f} ms  added median "
              f"{med(added):.2f} ms over {len(ttft_pairs)} pairs  (target <= 5 ms)")
        print(f"daemon CPU per token   {med(cpu_per_token) * 1e6:.1f} us  (target <= 50 us); "
              f"per request (1-token reply) {med(cpu_fixed) * 1e3:.2f} ms")
        print(f"  floor on this machine: a bare asyncio socket reading the same stream, "
              f"{med(floor) * 1e6:.1f} us per token; daemon / floor {med(cpu_per_token) / med(floor):.2f}")
        print(f"whole reply            (worker asked for a whole reply; the daemon always streams "
              "from workers so a hang-up cancels)\n"
              f"                       direct {med(whole_direct) * 1000:7.1f} ms "
              f"daemon {med(whole_proxied) * 1000:7.1f} ms  ratio "
              f"{med(whole_proxied) / med(whole_direct):.3f}")
        print(f"memory (PSS)           daemon {pss(swarm.proc.pid) / 2**20:.0f} MiB, one worker "
              f"{one_worker / 2**20:.0f} MiB (RSS), swarm total {total_pss / 2**20:.0f} MiB = "
              f"{total_pss / one_worker:.2f} x one worker for {len(pids)} workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
