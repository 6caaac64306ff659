"""bench/quality_tasks.py (the task data and its checkers) and bench/quality.py's plumbing, the
latter against a small fake OpenAI server on 127.0.0.1:0. No model and no swarm are started."""
from __future__ import annotations

import json
import sys
import time
from decimal import Decimal
from fractions import Fraction
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from conftest import serving

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import quality  # noqa: E402
from common import started_swarm  # noqa: E402
import quality_tasks as qt  # noqa: E402

# ============================================================================ task data


def test_enough_tasks_with_unique_ids():
    assert len(qt.ARITHMETIC) >= 50 and len(qt.PYTHON) >= 40
    assert len(qt.TASKS) >= 100
    ids = [t.id for t in qt.TASKS]
    assert len(set(ids)) == len(ids)
    assert len({t.name for t in qt.PYTHON}) == len(qt.PYTHON)
    assert len({t.question for t in qt.ARITHMETIC}) == len(qt.ARITHMETIC)


@pytest.mark.parametrize("task", qt.ARITHMETIC, ids=lambda t: t.id)
def test_arithmetic_answer_follows_from_the_question(task):
    # every number of the question is an argument of compute, and compute uses no other input
    assert qt.template_fields(task.template) == set(task.numbers)
    value = task.compute()
    assert isinstance(value, (int, Fraction, Decimal)) and not isinstance(value, bool)
    assert Fraction(value) == Fraction(str(task.answer)), (value, task.answer)
    assert "{" not in task.question and "}" not in task.question
    # the stated answer, written as asked, passes the real checker; one more does not
    assert qt.check(task, f"Some working.\nAnswer: {task.answer}").correct
    assert not qt.check(task, f"Answer: {Decimal(str(task.answer)) + 1}").correct


def test_python_tasks_are_well_formed():
    for task in qt.PYTHON:
        assert task.signature.startswith(f"def {task.name}(") and task.signature.endswith(":")
        assert len(task.cases) >= 4, task.id
        assert all(isinstance(args, tuple) for args, _ in task.cases), task.id
        assert len({repr(args) for args, _ in task.cases}) == len(task.cases), task.id
        # no constant function passes
        assert len({repr(expected) for _, expected in task.cases}) >= 2, task.id
        prompt = qt.prompt_for(task)
        assert task.signature in prompt and f">>> {task.name}(" in prompt


def test_every_reference_solution_passes_the_real_checker():
    failures = {t.id: v.detail for t in qt.PYTHON
                if not (v := qt.run_cases(t.reference, t.name, t.cases)).correct}
    assert failures == {}


@pytest.mark.parametrize("task", qt.PYTHON[::9], ids=lambda t: t.id)
def test_a_reference_sent_as_a_model_reply_passes(task):
    reply = f"Here is the function:\n\n```python\n{task.reference}```\n\nIt works because..."
    verdict = qt.check(task, reply)
    assert verdict.correct, verdict.detail
    assert verdict.extracted == task.reference


# ============================================================================ python checker

SUM_EVEN = next(t for t in qt.PYTHON if t.name == "sum_even")


@pytest.mark.parametrize("code, detail", [
    ("def sum_even(nums):\n    return sum(nums)\n", "case 0"),                   # wrong
    ("def sum_even(nums):\n    raise ValueError('no')\n", "ValueError: no"),     # raises
    ("def sum_even(nums):\n    return True\n", "gave True"),                     # bool for int
    ("def sum_even(nums):\n    return (n for n in nums)\n", "not a literal"),
    ("def total(nums):\n    return 0\n", "no function named sum_even"),
    ("def sum_even(nums) return 0\n", "SyntaxError"),
    ("import sys\nsys.exit(0)\n", "SystemExit"),
    ("x = [0] * 10 ** 10\n", "MemoryError"),                                     # RLIMIT_AS
    ("def sum_even(nums):\n    return int(input())\n", "EOFError"),              # stdin closed
    ("import os\ndef sum_even(nums):\n    os._exit(3)\n", "died (exit code 3)"),
])
def test_a_bad_solution_fails(code, detail):
    verdict = qt.run_cases(code, SUM_EVEN.name, SUM_EVEN.cases)
    assert not verdict.correct
    assert detail in verdict.detail


def test_a_solution_that_loops_forever_is_stopped_by_the_timeout():
    t0 = time.monotonic()
    verdict = qt.run_cases("def sum_even(nums):\n    while True:\n        pass\n",
                           SUM_EVEN.name, SUM_EVEN.cases, timeout=1.0)
    assert not verdict.correct and "timeout" in verdict.detail
    assert time.monotonic() - t0 < 4


def test_printing_does_not_confuse_the_checker():
    code = ("print('noise ' * 10000)\nimport sys\nsys.stderr.write('more')\n"
            "def sum_even(nums):\n    print('{\"results\": []}')\n"
            "    return sum(n for n in nums if n % 2 == 0)\n")
    assert qt.run_cases(code, SUM_EVEN.name, SUM_EVEN.cases).correct


def test_cases_cannot_leak_state_between_calls():
    # each case gets fresh arguments: mutating them does not change the next case's input
    code = "def sum_even(nums):\n    total = sum(n for n in nums if n % 2 == 0)\n" \
           "    nums.append(2)\n    return total\n"
    assert qt.run_cases(code, SUM_EVEN.name, SUM_EVEN.cases).correct


@pytest.mark.parametrize("got, expected, same", [
    (6, 6, True), (6.0, 6, True), (98.60000000000001, 98.6, True), (98.7, 98.6, False),
    (True, True, True), (1, True, False), (True, 1, False), (None, None, True), (0, None, False),
    ([1, 2], [1, 2], True), ((1, 2), [1, 2], False), ([1, 2], (1, 2), False),
    ({"a": 1}, {"a": 1}, True), ({"a": 1.0}, {"a": 1}, True), ({"a": 1}, {"a": 2}, False),
    ("1", 1, False), ([[1, 4]], [[1, 4]], True),
])
def test_result_comparison(got, expected, same):
    assert qt.same(got, expected) is same


def test_a_counter_counts_as_a_dict():
    task = next(t for t in qt.PYTHON if t.name == "char_frequency")
    code = "from collections import Counter\ndef char_frequency(s):\n    return Counter(s)\n"
    assert qt.run_cases(code, task.name, task.cases).correct


@pytest.mark.parametrize("reply, code", [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
    ("text\n```py\na = 1\n```\nmore\n```python\nb = 2\n```\nbye", "b = 2\n"),   # the last block
    ("```\nc = 3\n```", "c = 3\n"),
    ("```python\nd = 4\n", "d = 4\n"),                          # cut off before the closing fence
    ("def g():\n    pass", "def g():\n    pass"),                # no fence: the whole reply
])
def test_extract_code(reply, code):
    assert qt.extract_code(reply) == code


def test_extract_code_prefers_the_block_defining_the_function():
    reply = ("```python\ndef sum_even(nums):\n    return 0\n```\nUsage:\n"
             "```python\nprint(sum_even([2]))\n```")
    assert qt.extract_code(reply, "sum_even").startswith("def sum_even(")
    assert qt.extract_code(reply, "other") == "print(sum_even([2]))\n"


# ============================================================================ arithmetic checker


@pytest.mark.parametrize("reply, number", [
    ("5 + 7 = 12\nAnswer: 12", "12"),
    ("Answer: 12 apples", "12"),
    ("**Answer:** 1,495", "1495"),
    ("**Answer**: $7.50", "7.5"),
    ("Answer: 12.0", "12"),
    ("Answer: -3", "-3"),
    ("answer: 5 + 7 = 12", "12"),                     # '=' on the line: its last number
    ("Answer: 12 (because 3 x 4 = 12)", "12"),
    ("Answer:\n42", "42"),                             # the number on the next line
    ("First 3 then 4.\nThe answer is 25.", "25"),
    ("Answer: 10\nWait, that is wrong. Answer: 11", "11"),   # the last marker wins
    ("We get 3 + 4.\n#### 7", "7"),
    ("so the total is $\\boxed{2,550}$ km", "2550"),
    ("The result is \\boxed{18}. I used 2 steps.", "18"),   # boxed beats a later number
    ("She has 3 bags with 4 in each, 12 in all.", "12"),  # no marker: the last number
    ("Total: 1,234,567 people", "1234567"),
    ("The price is 0.75 dollars.", "0.75"),
    ("3, 4, 5 and finally 6", "6"),
    ("It is 2-3 times bigger: 10", "10"),
    ("Answer: 0.50", "0.5"),
    ("No numbers here.", None),
    ("", None),
])
def test_extract_number(reply, number):
    assert qt.extract_number(reply) == number


def test_hyphens_are_not_minus_signs():
    assert qt.extract_number("pages 10-15") == "15"
    assert qt.extract_number("The temperature is -5 degrees") == "-5"


def test_arithmetic_check_compares_values_not_strings():
    task = next(t for t in qt.ARITHMETIC if t.answer == "7.5")
    assert qt.check(task, "Answer: 7.50").correct
    assert qt.check(task, "Answer: $7.5").correct
    assert not qt.check(task, "Answer: 75").correct
    assert not qt.check(task, "I do not know.").correct


# ============================================================================ bench plumbing
# The fake server finds the task from the prompt and answers per arm (recognised from the body):
#   greedy (T=0):           right for the first task of each kind only; no `swarm` object
#   sample (T>0, votes 1):  right for arithmetic, wrong for python; `swarm: {}` (no k)
#   vote3:                  HTTP 500 for ar-03, right otherwise; `swarm.candidates` of 3
#   vote5:                  right for all; `swarm.k` 5 (and 5 candidates)

PROMPTS = {qt.prompt_for(t): t for t in qt.TASKS}


def fake_reply(body: dict) -> tuple[int, dict]:
    task = PROMPTS[body["messages"][0]["content"]]
    votes = body["swarm"]["votes"]
    if body["temperature"] == 0:
        right, swarm = task.id in ("ar-01", "py-sum_even"), None
    elif votes == 1:
        right, swarm = task.kind == "arithmetic", {}
    elif votes == 3:
        if task.id == "ar-03":
            return 500, {"error": {"message": "boom", "type": "server_error"}}
        right, swarm = True, {"candidates": [{"content": "x"}] * 3}
    else:
        right, swarm = True, {"k": 5, "candidates": [{"content": "x"}] * 5}
    if task.kind == "arithmetic":
        text = f"Let me work it out.\nAnswer: {task.answer if right else 999999}"
    else:
        code = task.reference if right else f"def {task.name}(*args):\n    return None\n"
        text = f"```python\n{code}```"
    reply = {"id": "x", "object": "chat.completion", "model": "fake",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": "stop"}]}
    if swarm is not None:
        reply["swarm"] = swarm
    return 200, reply


class FakeHandler(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        status, reply = fake_reply(body)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    FakeHandler.bodies = []
    with serving(FakeHandler) as url:
        yield url, FakeHandler.bodies


def test_bench_reports_what_the_server_returned(fake_server, tmp_path, capsys):
    url, bodies = fake_server
    out = tmp_path / "results.json"
    assert quality.main(["--url", url, "--limit", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    expected = {  # arm: accuracy, arithmetic, python, samples, errors
        "greedy": ("33.3%", "33.3%", "33.3%", "1.00", "0"),
        "sample": ("50.0%", "100.0%", "0.0%", "1.00", "0"),
        "vote3": ("83.3%", "66.7%", "100.0%", "3.00", "1"),
        "vote5": ("100.0%", "100.0%", "100.0%", "5.00", "0"),
    }
    for name, (acc, arith, py, samples, errors) in expected.items():
        line = next(l for l in printed.splitlines() if l.startswith(name + " ") and "%" in l)
        fields = line.split()
        assert fields[-8:-3] == ["6", acc, arith, py, samples], line
        assert fields[-1] == errors, line
    assert "k=5 minus one sample: +50.0 points; k=5 minus greedy: +66.7 points" in printed

    # what was sent: 6 tasks x 4 arms, in arm order, each arm's controls passed through
    assert len(bodies) == 24
    by_arm = [bodies[i:i + 6] for i in range(0, 24, 6)]
    assert all(b["temperature"] == 0 and "seed" not in b and b["swarm"] == {"votes": 1}
               for b in by_arm[0])
    assert all(b["temperature"] == 0.7 and b["swarm"] == {"votes": 1} for b in by_arm[1])
    assert len({b["seed"] for b in by_arm[1]}) == 6
    assert all(b["temperature"] == 0.7 and "seed" not in b and b["swarm"] == {"votes": 3}
               for b in by_arm[2])
    assert all(b["swarm"] == {"votes": 5} and "seed" not in b for b in by_arm[3])
    assert [PROMPTS[b["messages"][0]["content"]].id for b in by_arm[0]] == \
        ["ar-01", "ar-02", "ar-03", "py-sum_even", "py-reverse_words", "py-is_palindrome"]

    results = json.loads(out.read_text())
    assert list(results["arms"]) == ["greedy", "sample", "vote3", "vote5"]
    vote3 = {t["id"]: t for t in results["arms"]["vote3"]["tasks"]}
    assert vote3["ar-03"]["error"].startswith("HTTP 500") and vote3["ar-03"]["samples"] is None
    assert vote3["ar-01"]["correct"] and vote3["ar-01"]["samples"] == 3
    greedy = {t["id"]: t for t in results["arms"]["greedy"]["tasks"]}
    assert greedy["ar-02"]["extracted"] == "999999" and not greedy["ar-02"]["correct"]
    assert "gave None" in greedy["py-reverse_words"]["detail"]
    assert results["arms"]["vote5"]["summary"]["accuracy"] == 100.0


def test_arms_subset_and_missing_comparison(fake_server, tmp_path, capsys):
    url, bodies = fake_server
    quality.main(["--url", url, "--limit", "1", "--arms", "vote5", "--out",
                  str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert len(bodies) == 2 and "k=5 minus one sample: n/a" in printed


def test_explain_asks_for_the_candidates_and_checks_each(fake_server, tmp_path):
    url, bodies = fake_server
    out = tmp_path / "r.json"
    quality.main(["--url", url, "--limit", "1", "--arms", "greedy,vote5", "--explain", "--out",
                  str(out)])
    assert all(b["swarm"]["explain"] is True for b in bodies)
    arms = json.loads(out.read_text())["arms"]
    assert all(t["candidates"] is None for t in arms["greedy"]["tasks"])    # no swarm object
    [cands] = [t["candidates"] for t in arms["vote5"]["tasks"] if t["id"] == "ar-01"]
    assert len(cands) == 5 and all(c["correct"] is False for c in cands)     # "x" is wrong


def test_seeds_do_not_move_with_limit():
    args = quality.parse_args(["--url", "http://x", "--seed", "100"])
    task = qt.PYTHON[2]
    assert quality.request_body(quality.ARMS["sample"], task, args)["seed"] == \
        100 + qt.TASKS.index(task)


@pytest.mark.parametrize("reply, samples", [
    ({}, 1), ({"swarm": {}}, 1), ({"swarm": {"k": 5}}, 5), ({"swarm": {"candidates": [1, 2, 3]}}, 3),
    ({"swarm": {"k": 3, "candidates": [1]}}, 3), ({"swarm": "odd"}, 1), ({"swarm": {"k": True}}, 1),
])
def test_samples_spent(reply, samples):
    assert quality.samples_spent(reply) == samples


def test_start_reads_the_ready_line_and_stops_the_daemon():
    script = ("import sys, time\nprint('building...')\n"
              "print('local-swarm 0.2.0 ready on http://127.0.0.1:45678/v1', flush=True)\n"
              "time.sleep(60)\n")
    with started_swarm([sys.executable, "-c", script], timeout=20) as url:
        assert url == "http://127.0.0.1:45678"
    with pytest.raises(RuntimeError, match="did not start"):
        with started_swarm([sys.executable, "-c", "print('no luck')"], timeout=20):
            pass
