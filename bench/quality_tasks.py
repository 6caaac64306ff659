"""Tasks for bench/quality.py whose answers are checked by code, and the checkers.

Two kinds:
  - arithmetic: grade-school word problems of 1-3 steps. Each is written as a question template and
    a `compute` lambda whose default arguments are the numbers put into the question, so the
    stated answer can be re-derived (tests/test_quality_tasks.py asserts compute() == answer).
  - python: a small function to write, given its signature and docstring, checked by unit-test
    cases run in a separate, resource-limited Python process. Each has a reference solution that
    must pass its own cases.

Sections: task records, prompts, arithmetic checker, python checker, arithmetic data, python data.
Nothing here runs model code in this process.
"""
from __future__ import annotations

import ast
import inspect
import json
import math
import os
import re
import secrets
import signal
import string
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Callable

# ============================================================================ task records


@dataclass(frozen=True)
class ArithTask:
    """A word problem. `answer` is an int or an exact decimal string ("7.5")."""

    id: str
    template: str
    compute: Callable[..., Any]
    answer: int | str
    kind: str = "arithmetic"

    @property
    def numbers(self) -> dict[str, Any]:
        """The numbers in the question: the default arguments of `compute`."""
        return {name: p.default for name, p in inspect.signature(self.compute).parameters.items()}

    @property
    def question(self) -> str:
        return self.template.format(**self.numbers)


@dataclass(frozen=True)
class PyTask:
    """A function to write. `cases` are (args tuple, expected result); the first one is shown
    to the model as the docstring's example."""

    id: str
    name: str
    signature: str               # "def f(xs: list[int]) -> int:"
    doc: str
    cases: tuple[tuple[tuple, Any], ...]
    reference: str               # a solution that passes every case
    kind: str = "python"


@dataclass(frozen=True)
class Verdict:
    """The checker's decision. `extracted`: what was read from the reply (the number, or the
    code); `detail`: why it failed, or "ok"."""

    correct: bool
    detail: str
    extracted: str | None = None


def div(a: Any, b: Any) -> Fraction:
    """Exact division for `compute` lambdas (a float would make the answer check inexact)."""
    return Fraction(a) / Fraction(b)


# ============================================================================ prompts

ARITH_PROMPT = ("Solve the following problem. Work it out briefly, step by step, then end your "
                "reply with a last line of the form\nAnswer: <number>\n"
                "with the number only (no units).\n\nProblem: {question}")

PY_PROMPT = ("Complete the following Python function.\n\n```python\n{stub}\n```\n\n"
             "Reply with a single ```python code block that defines `{name}` (with any imports "
             "it needs). Do not include tests or example usage.")


def python_stub(task: PyTask) -> str:
    """The signature and a docstring holding the description and the first case as an example."""
    args, expected = task.cases[0]
    call = f"{task.name}({', '.join(repr(a) for a in args)})"
    doc = textwrap.fill(task.doc, 88, initial_indent="    ", subsequent_indent="    ")
    return f'{task.signature}\n    """\n{doc}\n\n    >>> {call}\n    {expected!r}\n    """'


def prompt_for(task: ArithTask | PyTask) -> str:
    if isinstance(task, ArithTask):
        return ARITH_PROMPT.format(question=task.question)
    return PY_PROMPT.format(stub=python_stub(task), name=task.name)


# ============================================================================ arithmetic checker
# Where the final number is read from, in order: the last "Answer:" marker (or "the answer is"),
# else the last "#### n", else the last \boxed{n}, else the last number anywhere. On the marker's
# line, an "=" means "take the last number of the line" ("Answer: 5 + 7 = 12"); otherwise the
# first number after the marker ("Answer: 12 apples"). Numbers keep a leading minus only when it
# is not a hyphen between words or digits; thousands separators must group by three ("1,234").

NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
ANSWER_MARKER = re.compile(r"\banswer\W{0,3}?(?:is\s*)?[:：]|\banswer\s+is\b", re.IGNORECASE)
HASH_MARKER = re.compile(r"####\s*([^\n]*)")
BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
NOISE = re.compile(r"[*$€£_`]|\\[()\[\]]")       # markdown emphasis, currency, LaTeX delimiters


def normalize_number(text: str) -> str:
    """'1,234.50' -> '1234.5', '12.0' -> '12', '-0' -> '0'. Raises ValueError if not a number."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation as exc:
        raise ValueError(f"not a number: {text!r}") from exc
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    return NUMBER.findall(NOISE.sub("", text))


def _after_marker(rest: str) -> str | None:
    line = rest.split("\n", 1)[0]
    on_line = _numbers(line)
    if on_line:
        return on_line[-1] if "=" in line else on_line[0]
    following = _numbers(rest)
    return following[0] if following else None


def extract_number(reply: str) -> str | None:
    """The reply's final answer as a normalised number string, or None if it has no number."""
    markers = list(ANSWER_MARKER.finditer(reply))
    found = _after_marker(reply[markers[-1].end():]) if markers else None
    if found is None:
        hashes = [n for m in HASH_MARKER.finditer(reply) for n in _numbers(m.group(1))[:1]]
        boxed = [n for m in BOXED.finditer(reply) for n in _numbers(m.group(1))[-1:]]
        anywhere = _numbers(reply)
        found = next((c[-1] for c in (hashes, boxed, anywhere) if c), None)
    return None if found is None else normalize_number(found)


def check_arithmetic(task: ArithTask, reply: str) -> Verdict:
    got = extract_number(reply)
    if got is None:
        return Verdict(False, "no number in the reply")
    if Fraction(got) == Fraction(str(task.answer)):
        return Verdict(True, "ok", got)
    return Verdict(False, f"got {got}, expected {task.answer}", got)


# ============================================================================ python checker
# Model code never runs in this process. One task = one `python -I -S -c HARNESS` child, in a
# fresh temporary directory, with an empty environment, its own session (so a timeout kills
# anything it spawned), CPU-time / address-space / file-size limits where `resource` exists, and
# stdin, stdout and stderr pointed at /dev/null once the job is read. The child sends back, on a
# private copy of stdout and behind a per-run nonce, the repr of each case's result (or the
# exception); the parent parses those reprs with ast.literal_eval and compares them itself.
# Comparison: Python ==, except that floats compare with a 1e-9 tolerance, list/tuple/set/dict
# must be of the expected type, and a bool is expected where the case expects a bool.

TIMEOUT_S = 5.0                  # wall-clock limit for one task's whole batch of cases
CPU_LIMIT_S = 5                  # RLIMIT_CPU: a busy loop is killed by SIGXCPU even if wall-time lags
MEMORY_LIMIT = 1 << 30           # RLIMIT_AS: 1 GiB of address space
FILE_LIMIT = 1 << 20             # RLIMIT_FSIZE: a file the code writes stops at 1 MiB
MAX_REPR = 10_000                # a result's repr beyond this counts as a wrong answer
MAX_OUTPUT = 4 << 20             # bytes of the child's reply that are read at most

FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

HARNESS = r'''
import ast, json, os, sys
job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
out = os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
try:
    import resource
    for what, value in ((resource.RLIMIT_CPU, job["cpu"]), (resource.RLIMIT_AS, job["mem"]),
                        (resource.RLIMIT_FSIZE, job["fsize"]), (resource.RLIMIT_CORE, 0)):
        try:
            hard = resource.getrlimit(what)[1]
            soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(what, (soft, hard))
        except (ValueError, OSError):
            pass
except ImportError:
    pass

def send(obj):
    os.write(out, (job["nonce"] + json.dumps(obj) + "\n").encode())

def describe(exc):
    try:
        return (type(exc).__name__ + ": " + str(exc))[:500]
    except BaseException:
        return type(exc).__name__

ns = {"__name__": "solution", "__builtins__": __builtins__}
try:
    exec(compile(job["code"], "<solution>", "exec"), ns)
    fn = ns.get(job["name"])
    if not callable(fn):
        raise NameError("no function named " + job["name"])
except BaseException as exc:
    send({"load_error": describe(exc)})
    os._exit(0)
results = []
for case in job["cases"]:
    try:
        got = fn(*ast.literal_eval(case))
        if isinstance(got, dict) and type(got) is not dict:
            got = dict(got)             # Counter, defaultdict, OrderedDict: a dict was asked for
        text = repr(got)
        results.append({"repr": text} if len(text) <= job["max_repr"] else {"error": "result too long"})
    except BaseException as exc:
        results.append({"error": describe(exc)})
send({"results": results})
os._exit(0)
'''


def extract_code(reply: str, name: str | None = None) -> str:
    """The last fenced code block of the reply (an unclosed last fence runs to the end), or the
    whole reply when it has no fence. With `name`, the last block that defines `name` is taken
    first: a usage example in a later block (which small models add, though told not to) does
    not hide the function."""
    blocks = [code for _, code in FENCE.findall(reply)]
    defining = [b for b in blocks if re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", b, re.M)
                ] if name else []
    return (defining or blocks or [reply])[-1]


def same(got: Any, expected: Any) -> bool:
    """Result comparison; see the section comment."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(expected, float) or isinstance(got, float):
        return (isinstance(got, (int, float)) and isinstance(expected, (int, float))
                and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9))
    if isinstance(expected, (list, tuple)):
        return (type(got) is type(expected) and len(got) == len(expected)
                and all(same(g, e) for g, e in zip(got, expected)))
    if isinstance(expected, dict):
        return (type(got) is dict and got.keys() == expected.keys()
                and all(same(got[k], expected[k]) for k in expected))
    if isinstance(expected, (set, frozenset)):
        return type(got) is type(expected) and got == expected
    return type(got) is not bool and got == expected


def _run_child(job: dict, timeout: float) -> tuple[str, int | None]:
    """Run the harness on `job`; returns (its stdout, exit code), or ("", None) on a timeout."""
    with tempfile.TemporaryDirectory(prefix="quality-") as cwd:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", HARNESS], cwd=cwd, env={},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            out, _ = proc.communicate(json.dumps(job).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return "", None
        _kill_group(proc)           # anything the code left running in its session
        return out[:MAX_OUTPUT].decode("utf-8", "replace"), proc.returncode


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_cases(code: str, name: str, cases: tuple, timeout: float = TIMEOUT_S) -> Verdict:
    """Define `name` from `code` in a child process and run every case; see the section comment."""
    nonce = secrets.token_hex(16)
    job = {"code": code, "name": name, "cases": [repr(args) for args, _ in cases],
           "nonce": nonce, "cpu": CPU_LIMIT_S, "mem": MEMORY_LIMIT, "fsize": FILE_LIMIT,
           "max_repr": MAX_REPR}
    out, code_rc = _run_child(job, timeout)
    if code_rc is None:
        return Verdict(False, f"timeout after {timeout:g} s", code)
    lines = [line[len(nonce):] for line in out.splitlines() if line.startswith(nonce)]
    if not lines:
        return Verdict(False, f"the process died (exit code {code_rc})", code)
    try:
        report = json.loads(lines[-1])
        if "load_error" in report:
            return Verdict(False, str(report["load_error"]), code)
        return _compare(list(report["results"]), cases, code)
    except (ValueError, KeyError, TypeError) as exc:
        return Verdict(False, f"unreadable report from the process ({exc})", code)


def _compare(results: list[dict], cases: tuple, code: str) -> Verdict:
    for i, (result, (args, expected)) in enumerate(zip(results, cases)):
        if "error" in result:
            return Verdict(False, f"case {i}: {result['error']}", code)
        try:
            got = ast.literal_eval(result["repr"])
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            return Verdict(False, f"case {i}: result {result['repr'][:80]} is not a literal", code)
        if not same(got, expected):
            return Verdict(False, f"case {i}: {args!r} gave {got!r}, expected {expected!r}"[:300],
                           code)
    if len(results) != len(cases):
        return Verdict(False, f"{len(results)} results for {len(cases)} cases", code)
    return Verdict(True, "ok", code)


def check_python(task: PyTask, reply: str, timeout: float = TIMEOUT_S) -> Verdict:
    return run_cases(extract_code(reply, task.name), task.name, task.cases, timeout)


def check(task: ArithTask | PyTask, reply: str) -> Verdict:
    """Is `reply` a correct answer to `task`?"""
    if isinstance(task, ArithTask):
        return check_arithmetic(task, reply)
    return check_python(task, reply)


def template_fields(template: str) -> set[str]:
    """The {names} a template uses (for the task-data test)."""
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


# ============================================================================ arithmetic data
# The numbers of a question are the default arguments of its compute lambda; compute() must
# equal the stated answer. Knowledge the question leaves implicit (legs of a cow, cents in a
# quarter, grams in a kilogram) appears as a constant in the lambda.

A = ArithTask
D = Decimal
ARITHMETIC: list[ArithTask] = [
    A("ar-01", "Tom has {a} apples. He buys {b} more apples. How many apples does Tom have now?",
      lambda a=23, b=19: a + b, 42),
    A("ar-02", "A bus has {a} passengers. At the first stop, {b} passengers get off and {c} get "
      "on. How many passengers are on the bus now?",
      lambda a=34, b=12, c=7: a - b + c, 29),
    A("ar-03", "Maria reads {a} pages every day. How many pages does she read in {b} days?",
      lambda a=15, b=12: a * b, 180),
    A("ar-04", "A baker makes {a} cookies and puts them into bags of {b} cookies each. How many "
      "bags does he fill?",
      lambda a=96, b=8: div(a, b), 12),
    A("ar-05", "A shirt costs ${a} and a pair of pants costs ${b}. How many dollars do {n} "
      "shirts and one pair of pants cost in total?",
      lambda a=18, b=35, n=2: n * a + b, 71),
    A("ar-06", "There are {a} students in a class. {b} of them are girls. How many boys are in "
      "the class?",
      lambda a=31, b=17: a - b, 14),
    A("ar-07", "A farmer has {a} chickens and {b} cows. How many legs do these animals have in "
      "total?",
      lambda a=12, b=7: a * 2 + b * 4, 52),
    A("ar-08", "Sam saves ${a} each week. How many weeks does it take him to save ${b}?",
      lambda a=12, b=156: div(b, a), 13),
    A("ar-09", "A rectangle is {a} cm long and {b} cm wide. What is its perimeter in cm?",
      lambda a=14, b=9: 2 * (a + b), 46),
    A("ar-10", "A rectangle is {a} m long and {b} m wide. What is its area in square meters?",
      lambda a=13, b=7: a * b, 91),
    A("ar-11", "Lisa had ${a}. She bought a book for ${b} and a pen for ${c}. How many dollars "
      "does she have left?",
      lambda a=50, b=17, c=4: a - b - c, 29),
    A("ar-12", "A box holds {a} pencils. How many pencils are in {b} boxes?",
      lambda a=24, b=6: a * b, 144),
    A("ar-13", "A train travels {a} km every hour. How many km does it travel in {b} hours?",
      lambda a=85, b=4: a * b, 340),
    A("ar-14", "Jake has {a} marbles. He gives {b} marbles to each of his {c} friends. How many "
      "marbles does Jake have left?",
      lambda a=60, b=7, c=5: a - b * c, 25),
    A("ar-15", "A pizza is cut into {a} slices. {b} friends each eat {c} slices. How many slices "
      "are left?",
      lambda a=12, b=3, c=3: a - b * c, 3),
    A("ar-16", "A school orders {a} boxes of markers with {b} markers in each box. The markers "
      "are shared equally among {c} classrooms. How many markers does each classroom get?",
      lambda a=9, b=12, c=4: div(a * b, c), 27),
    A("ar-17", "Emma is {a} years old. Her father is {b} times as old as she is. How old will "
      "her father be in {c} years?",
      lambda a=9, b=4, c=5: a * b + c, 41),
    A("ar-18", "A store sells pencils for {a} cents each. How many cents do {b} pencils cost?",
      lambda a=35, b=8: a * b, 280),
    A("ar-19", "An empty water tank holds {a} liters. It is filled at {b} liters per minute. "
      "How many minutes does it take to fill the tank?",
      lambda a=360, b=15: div(a, b), 24),
    A("ar-20", "Ben ran {a} km on Monday, {b} km on Tuesday and {c} km on Wednesday. How many "
      "km did he run in total?",
      lambda a=5, b=7, c=6: a + b + c, 18),
    A("ar-21", "A book has {a} pages. Anna has read {b} pages. If she reads {c} pages a day, how "
      "many more days does she need to finish the book?",
      lambda a=240, b=90, c=25: div(a - b, c), 6),
    A("ar-22", "Tickets cost ${a} for adults and ${b} for children. How many dollars do {c} "
      "adult tickets and {d} child tickets cost in total?",
      lambda a=12, b=7, c=2, d=3: a * c + b * d, 45),
    A("ar-23", "A garden has {a} rows of tomato plants with {b} plants in each row. {c} plants "
      "died. How many plants are left?",
      lambda a=8, b=15, c=13: a * b - c, 107),
    A("ar-24", "A car uses {a} liters of fuel for every 100 km. How many liters does it use "
      "for a trip of {b} km?",
      lambda a=6, b=450: div(a * b, 100), 27),
    A("ar-25", "Mia earns ${a} per hour. She works {b} hours a day for {c} days. How many "
      "dollars does she earn?",
      lambda a=11, b=6, c=5: a * b * c, 330),
    A("ar-26", "A class of {a} students goes on a trip. Each van carries at most {b} students. "
      "What is the smallest number of vans needed?",
      lambda a=50, b=8: -(-a // b), 7),
    A("ar-27", "A shop had {a} T-shirts. It sold {b} on Monday and twice as many on Tuesday. "
      "How many T-shirts are left?",
      lambda a=120, b=23: a - b - 2 * b, 51),
    A("ar-28", "Half of the {a} students in a school walk to school. Of the other students, "
      "{b} ride bikes. How many students neither walk nor ride bikes?",
      lambda a=240, b=70: div(a, 2) - b, 50),
    A("ar-29", "A recipe needs {a} cups of flour for {b} cakes. How many cups of flour are "
      "needed for {c} cakes?",
      lambda a=3, b=2, c=10: div(a * c, b), 15),
    A("ar-30", "A jacket costs ${a}. It is on sale for {b}% off. What is the sale price in "
      "dollars?",
      lambda a=80, b=25: a - div(a * b, 100), 60),
    A("ar-31", "Tom scored {a}, {b} and {c} points in three games. What was his average score "
      "per game?",
      lambda a=18, b=24, c=27: div(a + b + c, 3), 23),
    A("ar-32", "A pack of {a} juice boxes costs ${b}. How many dollars does one juice box cost?",
      lambda a=8, b=6: div(b, a), "0.75"),
    A("ar-33", "Apples cost ${p} per pound. How many dollars do {n} pounds of apples cost?",
      lambda p=D("1.25"), n=6: p * n, "7.5"),
    A("ar-34", "A bakery sold {a} muffins in the morning and {b} in the afternoon. Each muffin "
      "costs ${c}. How many dollars did the bakery make from muffins?",
      lambda a=45, b=38, c=3: (a + b) * c, 249),
    A("ar-35", "There are {a} red balls and {b} blue balls in a bag. How many more red balls "
      "than blue balls are there?",
      lambda a=47, b=29: a - b, 18),
    A("ar-36", "A library has {a} books. It buys {b} new books and gives away {c} old ones. "
      "How many books does it have now?",
      lambda a=1250, b=340, c=95: a + b - c, 1495),
    A("ar-37", "A spider has {l} legs. How many legs do {a} spiders have?",
      lambda l=8, a=13: l * a, 104),
    A("ar-38", "A factory makes {a} toys each working day. It works {c} days a week. How many "
      "toys does it make in {b} weeks?",
      lambda a=150, b=3, c=5: a * b * c, 2250),
    A("ar-39", "Lucy has {a} stickers. Her sister has {b} fewer stickers than Lucy. How many "
      "stickers do they have together?",
      lambda a=56, b=18: a + (a - b), 94),
    A("ar-40", "A rope is {a} meters long. It is cut into pieces that are each {b} meters long. "
      "How many pieces are there?",
      lambda a=45, b=5: div(a, b), 9),
    A("ar-41", "A farmer collects {a} eggs a day. He sells them in cartons of {b}. How many full "
      "cartons can he fill with the eggs from {c} days?",
      lambda a=30, b=12, c=7: (a * c) // b, 17),
    A("ar-42", "Peter bought {a} notebooks at ${b} each and paid with a ${c} bill. How many "
      "dollars of change did he get?",
      lambda a=4, b=3, c=20: c - a * b, 8),
    A("ar-43", "A swimming pool is {a} meters long. Kim swims {b} lengths of the pool. How many "
      "meters does she swim?",
      lambda a=25, b=16: a * b, 400),
    A("ar-44", "A cinema has {a} rows of {b} seats. {c} seats are taken. How many seats are "
      "empty?",
      lambda a=15, b=20, c=187: a * b - c, 113),
    A("ar-45", "Jenny's home is {a} km from her school. Every school day she walks to school and "
      "back home. How many km does she walk in {b} school days?",
      lambda a=2, b=5: 2 * a * b, 20),
    A("ar-46", "A bag of rice weighs {a} kg. A cook uses {b} grams of rice for each meal. How "
      "many meals can he make from the bag?",
      lambda a=5, b=250: div(a * 1000, b), 20),
    A("ar-47", "A phone costs ${a}. Sara pays ${b} now and the rest in {c} equal monthly "
      "payments. How many dollars is each monthly payment?",
      lambda a=540, b=120, c=6: div(a - b, c), 70),
    A("ar-48", "There are {a} cars in a parking lot. Each car has {w} wheels. Then {b} of the "
      "cars leave. How many wheels are on the cars still in the lot?",
      lambda a=35, w=4, b=9: (a - b) * w, 104),
    A("ar-49", "Anna is {a} years older than Ben. Ben is {b} years old. What will the sum of "
      "their ages be in {c} years?",
      lambda a=4, b=11, c=3: (b + a + c) + (b + c), 32),
    A("ar-50", "A store gets {a} boxes of oranges with {b} oranges in each box. It throws away "
      "{c} bad oranges and puts the rest into bags of {d}. How many bags does it fill?",
      lambda a=6, b=40, c=12, d=6: div(a * b - c, d), 38),
    A("ar-51", "A plane flies at {a} km per hour for {b} hours and then at {c} km per hour for "
      "{d} hours. How many km does it fly in total?",
      lambda a=600, b=2, c=450, d=3: a * b + c * d, 2550),
    A("ar-52", "A worker is paid ${a} per hour for the first {b} hours of a week and ${c} per "
      "hour for every hour after that. How many dollars does she earn in a week in which she "
      "works {d} hours?",
      lambda a=15, b=40, c=22, d=46: a * b + c * (d - b), 732),
    A("ar-53", "{n} friends share a bill of ${a} equally, and each of them also adds ${b} for "
      "the tip. How many dollars does each friend pay?",
      lambda n=3, a=84, b=4: div(a, n) + b, 32),
    A("ar-54", "A printer prints {a} pages per minute. How many minutes does it take to print "
      "{b} copies of a {c}-page report?",
      lambda a=20, b=15, c=12: div(b * c, a), 9),
    A("ar-55", "A tree is {a} cm tall and grows {b} cm every year. How tall will it be after {c} "
      "years, in cm?",
      lambda a=120, b=15, c=6: a + b * c, 210),
    A("ar-56", "Kevin has {a} coins. {b} of them are quarters and the rest are dimes. How many "
      "cents does he have in total?",
      lambda a=20, b=8: b * 25 + (a - b) * 10, 320),
    A("ar-57", "A theater sold {a} tickets. {b}% of them were child tickets. How many child "
      "tickets were sold?",
      lambda a=360, b=15: div(a * b, 100), 54),
    A("ar-58", "A number is doubled and then {a} is added. The result is {b}. What is the "
      "number?",
      lambda a=7, b=39: div(b - a, 2), 16),
    A("ar-59", "The sum of two numbers is {a} and their difference is {b}. What is the larger "
      "number?",
      lambda a=50, b=14: div(a + b, 2), 32),
    A("ar-60", "A cyclist rides {a} km in {b} hours. At the same speed, how many km does she "
      "ride in {c} hours?",
      lambda a=36, b=3, c=5: div(a * c, b), 60),
    A("ar-61", "Nina bought {a} packs of {b} pencils. She gave {c} pencils to her brother and "
      "lost {d}. How many pencils does she have now?",
      lambda a=3, b=12, c=8, d=5: a * b - c - d, 23),
    A("ar-62", "Milk costs ${p} a carton. How many dollars do {n} cartons cost?",
      lambda p=D("2.40"), n=5: p * n, 12),
]
del A, D


# ============================================================================ python data
# cases[0] is shown in the docstring as the example; the rest are hidden. Each reference must
# pass every case through the real checker (tests/test_quality_tasks.py).


def _py(name: str, signature: str, doc: str, cases: list, reference: str) -> PyTask:
    return PyTask(f"py-{name}", name, signature, doc, tuple(cases),
                  textwrap.dedent(reference).strip() + "\n")


PYTHON: list[PyTask] = [
    _py("sum_even", "def sum_even(nums: list[int]) -> int:",
        "Return the sum of the even numbers in nums (0 if there are none).",
        [(([1, 2, 3, 4],), 6), (([],), 0), (([1, 3, 5],), 0), (([-2, 3, -4],), -6),
         (([0, 10, 11],), 10)],
        """
        def sum_even(nums):
            return sum(n for n in nums if n % 2 == 0)
        """),
    _py("reverse_words", "def reverse_words(s: str) -> str:",
        "Return the words of s in reverse order, joined by single spaces. Words are separated "
        "by any amount of whitespace; leading and trailing whitespace is dropped.",
        [(("hello big world",), "world big hello"), (("one",), "one"), (("",), ""),
         (("  a   b  ",), "b a"), (("x y\tz",), "z y x")],
        """
        def reverse_words(s):
            return " ".join(reversed(s.split()))
        """),
    _py("is_palindrome", "def is_palindrome(s: str) -> bool:",
        "Return True if s reads the same forwards and backwards when case is ignored and every "
        "character that is not a letter is removed.",
        [(("A man, a plan, a canal: Panama",), True), (("hello",), False), (("",), True),
         (("Was it a car or a cat I saw?",), True), (("ab1ba",), True), (("abca",), False),
         (("No 'x' in Nixon",), True)],
        """
        def is_palindrome(s):
            letters = [c.lower() for c in s if c.isalpha()]
            return letters == letters[::-1]
        """),
    _py("count_vowels", "def count_vowels(s: str) -> int:",
        "Return how many vowels (a, e, i, o, u, upper or lower case) are in s.",
        [(("Hello World",), 3), (("",), 0), (("rhythm",), 0), (("AEIOUaeiou",), 10),
         (("Python Programming",), 4)],
        """
        def count_vowels(s):
            return sum(1 for c in s.lower() if c in "aeiou")
        """),
    _py("fizzbuzz", "def fizzbuzz(n: int) -> list[str]:",
        "Return a list of strings for the numbers 1 to n: 'FizzBuzz' for multiples of both 3 "
        "and 5, 'Fizz' for multiples of 3, 'Buzz' for multiples of 5, and the number itself "
        "(as a string) otherwise.",
        [((5,), ["1", "2", "Fizz", "4", "Buzz"]), ((0,), []), ((1,), ["1"]),
         ((15,), ["1", "2", "Fizz", "4", "Buzz", "Fizz", "7", "8", "Fizz", "Buzz", "11",
                  "Fizz", "13", "14", "FizzBuzz"])],
        """
        def fizzbuzz(n):
            out = []
            for i in range(1, n + 1):
                if i % 15 == 0:
                    out.append("FizzBuzz")
                elif i % 3 == 0:
                    out.append("Fizz")
                elif i % 5 == 0:
                    out.append("Buzz")
                else:
                    out.append(str(i))
            return out
        """),
    _py("run_length_encode", "def run_length_encode(s: str) -> str:",
        "Run-length encode s: each run of the same character becomes the character followed by "
        "the length of the run (the length is written even when it is 1).",
        [(("aaabcc",), "a3b1c2"), (("",), ""), (("a",), "a1"), (("abab",), "a1b1a1b1"),
         (("zzzzzzzzzzzz",), "z12"), (("aabbbaa",), "a2b3a2")],
        """
        def run_length_encode(s):
            out = []
            i = 0
            while i < len(s):
                j = i
                while j < len(s) and s[j] == s[i]:
                    j += 1
                out.append(s[i] + str(j - i))
                i = j
            return "".join(out)
        """),
    _py("second_largest", "def second_largest(nums: list[int]) -> int | None:",
        "Return the second largest distinct value in nums, or None if nums has fewer than two "
        "distinct values.",
        [(([3, 1, 3, 2],), 2), (([5],), None), (([],), None), (([7, 7, 7],), None),
         (([-1, -5, -3],), -3), (([10, 20],), 10)],
        """
        def second_largest(nums):
            distinct = sorted(set(nums))
            return distinct[-2] if len(distinct) >= 2 else None
        """),
    _py("factorial", "def factorial(n: int) -> int:",
        "Return n! (the product of 1..n) for n >= 0; factorial(0) is 1.",
        [((5,), 120), ((0,), 1), ((1,), 1), ((10,), 3628800), ((20,), 2432902008176640000)],
        """
        def factorial(n):
            result = 1
            for i in range(2, n + 1):
                result *= i
            return result
        """),
    _py("fibonacci", "def fibonacci(n: int) -> int:",
        "Return the n-th Fibonacci number, where fibonacci(0) == 0 and fibonacci(1) == 1.",
        [((7,), 13), ((0,), 0), ((1,), 1), ((2,), 1), ((30,), 832040), ((90,), 2880067194370816120)],
        """
        def fibonacci(n):
            a, b = 0, 1
            for _ in range(n):
                a, b = b, a + b
            return a
        """),
    _py("is_prime", "def is_prime(n: int) -> bool:",
        "Return True if n is a prime number. Numbers below 2 are not prime.",
        [((7,), True), ((1,), False), ((0,), False), ((-7,), False), ((2,), True), ((9,), False),
         ((97,), True), ((7919,), True), ((7917,), False)],
        """
        def is_prime(n):
            if n < 2:
                return False
            i = 2
            while i * i <= n:
                if n % i == 0:
                    return False
                i += 1
            return True
        """),
    _py("index_of_max", "def index_of_max(nums: list[int]) -> int:",
        "Return the index of the largest value in nums (the first such index if it occurs more "
        "than once), or -1 if nums is empty.",
        [(([3, 9, 2, 9],), 1), (([],), -1), (([5],), 0), (([-3, -1, -2],), 1), (([1, 2, 3],), 2)],
        """
        def index_of_max(nums):
            if not nums:
                return -1
            return nums.index(max(nums))
        """),
    _py("count_words", "def count_words(s: str) -> int:",
        "Return the number of words in s, where words are separated by any amount of whitespace.",
        [(("the quick brown fox",), 4), (("",), 0), (("   ",), 0), (("one",), 1),
         ((" a  b\nc ",), 3)],
        """
        def count_words(s):
            return len(s.split())
        """),
    _py("capitalize_words", "def capitalize_words(s: str) -> str:",
        "Return s with the first letter of each space-separated word in upper case and the rest "
        "of each word unchanged.",
        [(("hello world",), "Hello World"), (("",), ""), (("a",), "A"),
         (("python is fun",), "Python Is Fun"), (("already Upper case",), "Already Upper Case")],
        """
        def capitalize_words(s):
            return " ".join(w[:1].upper() + w[1:] for w in s.split(" "))
        """),
    _py("remove_duplicates", "def remove_duplicates(items: list) -> list:",
        "Return a new list with the duplicates removed from items, keeping the first occurrence "
        "of each value and the original order.",
        [(([3, 1, 3, 2, 1],), [3, 1, 2]), (([],), []), ((["a", "b", "a"],), ["a", "b"]),
         (([1, 1, 1],), [1]), (([5, 4, 3],), [5, 4, 3])],
        """
        def remove_duplicates(items):
            seen = set()
            out = []
            for x in items:
                if x not in seen:
                    seen.add(x)
                    out.append(x)
            return out
        """),
    _py("flatten", "def flatten(lists: list[list]) -> list:",
        "Flatten a list of lists by one level: return all the elements of the inner lists, in "
        "order, in one list.",
        [(([[1, 2], [3], []],), [1, 2, 3]), (([],), []), (([[]],), []),
         (([["a"], ["b", "c"]],), ["a", "b", "c"]), (([[1, [2]], [3]],), [1, [2], 3])],
        """
        def flatten(lists):
            return [x for inner in lists for x in inner]
        """),
    _py("char_frequency", "def char_frequency(s: str) -> dict[str, int]:",
        "Return a dict mapping each character of s to the number of times it occurs in s.",
        [(("banana",), {"b": 1, "a": 3, "n": 2}), (("",), {}), (("aA",), {"a": 1, "A": 1}),
         (("  x",), {" ": 2, "x": 1})],
        """
        def char_frequency(s):
            counts = {}
            for c in s:
                counts[c] = counts.get(c, 0) + 1
            return counts
        """),
    _py("is_anagram", "def is_anagram(a: str, b: str) -> bool:",
        "Return True if a and b are anagrams of each other, ignoring case and spaces.",
        [(("Listen", "Silent"), True), (("abc", "abd"), False), (("", ""), True),
         (("Dormitory", "dirty room"), True), (("aab", "abb"), False), (("abc", "abcc"), False)],
        """
        def is_anagram(a, b):
            def norm(s):
                return sorted(s.replace(" ", "").lower())
            return norm(a) == norm(b)
        """),
    _py("digit_sum", "def digit_sum(n: int) -> int:",
        "Return the sum of the decimal digits of n; the sign of a negative n is ignored.",
        [((1234,), 10), ((0,), 0), ((-56,), 11), ((9,), 9), ((1000001,), 2)],
        """
        def digit_sum(n):
            return sum(int(d) for d in str(abs(n)))
        """),
    _py("celsius_to_fahrenheit", "def celsius_to_fahrenheit(c: float) -> float:",
        "Convert a temperature from degrees Celsius to degrees Fahrenheit.",
        [((100,), 212.0), ((0,), 32.0), ((-40,), -40.0), ((37,), 98.6), ((-10.5,), 13.1)],
        """
        def celsius_to_fahrenheit(c):
            return c * 9 / 5 + 32
        """),
    _py("average", "def average(nums: list[float]) -> float:",
        "Return the arithmetic mean of nums, or 0.0 if nums is empty.",
        [(([1, 2, 3, 4],), 2.5), (([],), 0.0), (([5],), 5.0), (([-1, 1],), 0.0),
         (([0.5, 0.25],), 0.375)],
        """
        def average(nums):
            return sum(nums) / len(nums) if nums else 0.0
        """),
    _py("count_occurrences", "def count_occurrences(items: list, target) -> int:",
        "Return how many elements of items are equal to target.",
        [(([1, 2, 1, 3, 1], 1), 3), (([], 5), 0), ((["a", "b"], "c"), 0),
         (([[1], [1], 1], [1]), 2)],
        """
        def count_occurrences(items, target):
            return sum(1 for x in items if x == target)
        """),
    _py("merge_sorted", "def merge_sorted(a: list[int], b: list[int]) -> list[int]:",
        "Given two lists that are each sorted in ascending order, return one ascending sorted "
        "list holding all the elements of both (duplicates kept).",
        [(([1, 4, 6], [2, 3, 7]), [1, 2, 3, 4, 6, 7]), (([], []), []), (([1, 2], []), [1, 2]),
         (([], [0]), [0]), (([1, 1, 3], [1, 2]), [1, 1, 1, 2, 3])],
        """
        def merge_sorted(a, b):
            i = j = 0
            out = []
            while i < len(a) and j < len(b):
                if a[i] <= b[j]:
                    out.append(a[i])
                    i += 1
                else:
                    out.append(b[j])
                    j += 1
            return out + a[i:] + b[j:]
        """),
    _py("chunk", "def chunk(items: list, size: int) -> list[list]:",
        "Split items into consecutive lists of length size; the last list may be shorter. "
        "size is at least 1.",
        [(([1, 2, 3, 4, 5], 2), [[1, 2], [3, 4], [5]]), (([], 3), []),
         (([1, 2, 3], 3), [[1, 2, 3]]), (([1, 2], 5), [[1, 2]]), ((["a", "b"], 1), [["a"], ["b"]])],
        """
        def chunk(items, size):
            return [items[i:i + size] for i in range(0, len(items), size)]
        """),
    _py("is_sorted", "def is_sorted(nums: list[int]) -> bool:",
        "Return True if nums is sorted in non-decreasing order (an empty list is sorted).",
        [(([1, 2, 2, 5],), True), (([],), True), (([3, 1],), False), (([7],), True),
         (([1, 3, 2, 4],), False)],
        """
        def is_sorted(nums):
            return all(a <= b for a, b in zip(nums, nums[1:]))
        """),
    _py("binary_to_int", "def binary_to_int(bits: str) -> int:",
        "Return the value of the binary number written in bits (a non-empty string of 0s and 1s).",
        [(("1011",), 11), (("0",), 0), (("1",), 1), (("11111111",), 255), (("000100",), 4)],
        """
        def binary_to_int(bits):
            return int(bits, 2)
        """),
    _py("int_to_binary", "def int_to_binary(n: int) -> str:",
        "Return the binary representation of n >= 0 as a string of 0s and 1s, without a '0b' "
        "prefix or leading zeros ('0' for 0).",
        [((11,), "1011"), ((0,), "0"), ((1,), "1"), ((255,), "11111111"), ((1024,), "10000000000")],
        """
        def int_to_binary(n):
            return bin(n)[2:]
        """),
    _py("longest_word", "def longest_word(sentence: str) -> str:",
        "Return the longest space-separated word of sentence; if several words share the "
        "greatest length, return the first of them. Return '' for an empty sentence.",
        [(("I love programming in Python",), "programming"), (("",), ""), (("cat dog",), "cat"),
         (("a bb ccc dd",), "ccc"), (("one",), "one")],
        """
        def longest_word(sentence):
            best = ""
            for word in sentence.split():
                if len(word) > len(best):
                    best = word
            return best
        """),
    _py("caesar_shift", "def caesar_shift(text: str, k: int) -> str:",
        "Shift every letter of text k places forward in the alphabet, wrapping around from z to "
        "a, keeping its case; other characters are unchanged. k may be any non-negative integer.",
        [(("Hello, World!", 3), "Khoor, Zruog!"), (("", 5), ""), (("xyz", 3), "abc"),
         (("abc", 26), "abc"), (("Zz", 27), "Aa"), (("a-b", 1), "b-c")],
        """
        def caesar_shift(text, k):
            out = []
            for c in text:
                if "a" <= c <= "z":
                    out.append(chr((ord(c) - 97 + k) % 26 + 97))
                elif "A" <= c <= "Z":
                    out.append(chr((ord(c) - 65 + k) % 26 + 65))
                else:
                    out.append(c)
            return "".join(out)
        """),
    _py("all_unique", "def all_unique(s: str) -> bool:",
        "Return True if no character occurs more than once in s.",
        [(("abcde",), True), (("hello",), False), (("",), True), (("aA",), True), (("a a",), False)],
        """
        def all_unique(s):
            return len(set(s)) == len(s)
        """),
    _py("product", "def product(nums: list[int]) -> int:",
        "Return the product of the numbers in nums (1 for an empty list).",
        [(([2, 3, 4],), 24), (([],), 1), (([5],), 5), (([-2, 3],), -6), (([1, 0, 9],), 0)],
        """
        def product(nums):
            result = 1
            for n in nums:
                result *= n
            return result
        """),
    _py("count_positive", "def count_positive(nums: list[int]) -> int:",
        "Return how many numbers in nums are strictly greater than zero.",
        [(([1, -2, 3, 0],), 2), (([],), 0), (([0, 0],), 0), (([-1, -5],), 0), (([4, 5, 6],), 3)],
        """
        def count_positive(nums):
            return sum(1 for n in nums if n > 0)
        """),
    _py("running_sum", "def running_sum(nums: list[int]) -> list[int]:",
        "Return the running totals of nums: element i of the result is nums[0] + ... + nums[i].",
        [(([1, 2, 3, 4],), [1, 3, 6, 10]), (([],), []), (([5],), [5]), (([3, -3, 3],), [3, 0, 3])],
        """
        def running_sum(nums):
            out = []
            total = 0
            for n in nums:
                total += n
                out.append(total)
            return out
        """),
    _py("has_pair_with_sum", "def has_pair_with_sum(nums: list[int], target: int) -> bool:",
        "Return True if two elements of nums at different positions add up to target.",
        [(([1, 4, 6, 9], 10), True), (([], 0), False), (([5], 10), False), (([5, 5], 10), True),
         (([1, 2, 3], 7), False), (([-3, 8, 2], -1), True)],
        """
        def has_pair_with_sum(nums, target):
            seen = set()
            for n in nums:
                if target - n in seen:
                    return True
                seen.add(n)
            return False
        """),
    _py("rotate_right", "def rotate_right(items: list, k: int) -> list:",
        "Return items rotated k places to the right (the last k elements move to the front). "
        "k may be larger than the length of items; an empty list stays empty.",
        [(([1, 2, 3, 4, 5], 2), [4, 5, 1, 2, 3]), (([], 3), []), (([1, 2, 3], 0), [1, 2, 3]),
         (([1, 2, 3], 3), [1, 2, 3]), (([1, 2, 3], 4), [3, 1, 2])],
        """
        def rotate_right(items, k):
            if not items:
                return []
            k %= len(items)
            return items[-k:] + items[:-k] if k else list(items)
        """),
    _py("acronym", "def acronym(phrase: str) -> str:",
        "Return the upper-case first letters of the space-separated words of phrase.",
        [(("portable network graphics",), "PNG"), (("",), ""), (("Hello",), "H"),
         (("as soon  as possible",), "ASAP")],
        """
        def acronym(phrase):
            return "".join(w[0].upper() for w in phrase.split())
        """),
    _py("sum_numbers_in_string", "def sum_numbers_in_string(s: str) -> int:",
        "Return the sum of the whole numbers written in s, where a number is a maximal run of "
        "consecutive digits.",
        [(("a12b3c",), 15), (("",), 0), (("no digits",), 0), (("100 and 200",), 300),
         (("7",), 7), (("x1y1z10",), 12)],
        """
        def sum_numbers_in_string(s):
            import re
            return sum(int(m) for m in re.findall(r"[0-9]+", s))
        """),
    _py("count_uppercase", "def count_uppercase(s: str) -> int:",
        "Return how many upper-case letters are in s.",
        [(("Hello World",), 2), (("",), 0), (("abc",), 0), (("ABC def G",), 4), (("123!",), 0)],
        """
        def count_uppercase(s):
            return sum(1 for c in s if c.isupper())
        """),
    _py("find_missing", "def find_missing(nums: list[int]) -> int:",
        "nums holds every integer from 1 to n exactly once except one, in any order (so it has "
        "n - 1 elements). Return the missing integer.",
        [(([3, 1, 4],), 2), (([],), 1), (([1],), 2), (([2],), 1), (([5, 2, 3, 1],), 4)],
        """
        def find_missing(nums):
            n = len(nums) + 1
            return n * (n + 1) // 2 - sum(nums)
        """),
    _py("transpose", "def transpose(matrix: list[list[int]]) -> list[list[int]]:",
        "Return the transpose of a rectangular matrix given as a list of rows (an empty matrix "
        "gives []).",
        [(([[1, 2, 3], [4, 5, 6]],), [[1, 4], [2, 5], [3, 6]]), (([],), []), (([[7]],), [[7]]),
         (([[1], [2]],), [[1, 2]])],
        """
        def transpose(matrix):
            return [list(col) for col in zip(*matrix)]
        """),
    _py("diagonal_sum", "def diagonal_sum(matrix: list[list[int]]) -> int:",
        "Return the sum of the main diagonal (top-left to bottom-right) of a square matrix.",
        [(([[1, 2], [3, 4]],), 5), (([],), 0), (([[9]],), 9),
         (([[1, 0, 0], [0, 2, 0], [0, 0, -3]],), 0)],
        """
        def diagonal_sum(matrix):
            return sum(matrix[i][i] for i in range(len(matrix)))
        """),
    _py("word_lengths", "def word_lengths(s: str) -> list[int]:",
        "Return the lengths of the whitespace-separated words of s, in order.",
        [(("the cat sat",), [3, 3, 3]), (("",), []), (("a  bb   ccc",), [1, 2, 3]),
         (("hello",), [5])],
        """
        def word_lengths(s):
            return [len(w) for w in s.split()]
        """),
    _py("long_words", "def long_words(words: list[str], n: int) -> list[str]:",
        "Return the words (in their original order) whose length is greater than n.",
        [((["apple", "fig", "banana"], 3), ["apple", "banana"]), (([], 2), []),
         ((["a", "bb"], 5), []), ((["abc", "abcd"], 3), ["abcd"])],
        """
        def long_words(words, n):
            return [w for w in words if len(w) > n]
        """),
    _py("is_leap_year", "def is_leap_year(year: int) -> bool:",
        "Return True if year is a leap year in the Gregorian calendar: divisible by 4, except "
        "years divisible by 100 that are not divisible by 400.",
        [((2024,), True), ((2023,), False), ((1900,), False), ((2000,), True), ((2100,), False),
         ((1996,), True)],
        """
        def is_leap_year(year):
            return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        """),
    _py("min_max", "def min_max(nums: list[int]) -> tuple[int, int]:",
        "Return a tuple (smallest, largest) of the values in the non-empty list nums.",
        [(([3, 1, 4, 1, 5],), (1, 5)), (([7],), (7, 7)), (([-2, -9],), (-9, -2)),
         (([0, 0, 0],), (0, 0))],
        """
        def min_max(nums):
            return (min(nums), max(nums))
        """),
    _py("squares", "def squares(n: int) -> list[int]:",
        "Return the list of the squares of 1, 2, ..., n ([] when n is 0).",
        [((4,), [1, 4, 9, 16]), ((0,), []), ((1,), [1]), ((6,), [1, 4, 9, 16, 25, 36])],
        """
        def squares(n):
            return [i * i for i in range(1, n + 1)]
        """),
    _py("most_common_char", "def most_common_char(s: str) -> str:",
        "Return the character that occurs most often in the non-empty string s; if several "
        "characters tie, return the one whose first occurrence comes earliest in s.",
        [(("banana",), "a"), (("abc",), "a"), (("aabb",), "a"), (("abbba",), "b"),
         (("zzy",), "z"), (("xyy",), "y")],
        """
        def most_common_char(s):
            counts = {}
            for c in s:
                counts[c] = counts.get(c, 0) + 1
            best = max(counts.values())
            return next(c for c in s if counts[c] == best)
        """),
    _py("collapse_spaces", "def collapse_spaces(s: str) -> str:",
        "Return s with every run of spaces replaced by a single space and leading and trailing "
        "spaces removed.",
        [(("  hello    world ",), "hello world"), (("",), ""), (("   ",), ""), (("a b",), "a b"),
         (("x   y  z",), "x y z")],
        """
        def collapse_spaces(s):
            return " ".join(part for part in s.split(" ") if part)
        """),
    _py("count_primes_below", "def count_primes_below(n: int) -> int:",
        "Return how many prime numbers are strictly less than n.",
        [((10,), 4), ((0,), 0), ((2,), 0), ((3,), 1), ((100,), 25), ((1000,), 168)],
        """
        def count_primes_below(n):
            if n < 3:
                return 0
            sieve = [True] * n
            sieve[0] = sieve[1] = False
            for i in range(2, int(n ** 0.5) + 1):
                if sieve[i]:
                    sieve[i * i::i] = [False] * len(range(i * i, n, i))
            return sum(sieve)
        """),
    _py("camel_to_snake", "def camel_to_snake(name: str) -> str:",
        "Convert a camelCase name to snake_case: put an underscore before each upper-case "
        "letter and make it lower case. The first letter of name is lower case.",
        [(("helloWorld",), "hello_world"), (("x",), "x"), (("getHTTPCode",), "get_h_t_t_p_code"),
         (("already",), "already"), (("aB",), "a_b")],
        """
        def camel_to_snake(name):
            return "".join("_" + c.lower() if c.isupper() else c for c in name)
        """),
    _py("roman_to_int", "def roman_to_int(s: str) -> int:",
        "Return the value of the Roman numeral s (I=1, V=5, X=10, L=50, C=100, D=500, M=1000; "
        "a smaller numeral before a larger one is subtracted, as in IV=4).",
        [(("MCMXCIV",), 1994), (("III",), 3), (("IV",), 4), (("IX",), 9), (("LVIII",), 58),
         (("MMXXV",), 2025)],
        """
        def roman_to_int(s):
            values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
            total = 0
            for i, c in enumerate(s):
                v = values[c]
                if i + 1 < len(s) and values[s[i + 1]] > v:
                    total -= v
                else:
                    total += v
            return total
        """),
    _py("is_power_of_two", "def is_power_of_two(n: int) -> bool:",
        "Return True if n is a power of two (1, 2, 4, 8, ...); zero and negative numbers are not.",
        [((8,), True), ((1,), True), ((0,), False), ((-4,), False), ((6,), False),
         ((1024,), True), ((1023,), False)],
        """
        def is_power_of_two(n):
            return n > 0 and n & (n - 1) == 0
        """),
    _py("clamp", "def clamp(x: int, lo: int, hi: int) -> int:",
        "Return x limited to the range lo..hi: lo if x < lo, hi if x > hi, else x (lo <= hi).",
        [((15, 0, 10), 10), ((-5, 0, 10), 0), ((5, 0, 10), 5), ((0, 0, 0), 0), ((3, 3, 9), 3)],
        """
        def clamp(x, lo, hi):
            return max(lo, min(x, hi))
        """),
    _py("common_elements", "def common_elements(a: list[int], b: list[int]) -> list[int]:",
        "Return the values that occur in both a and b, each once, sorted in ascending order.",
        [(([4, 1, 2, 2], [2, 4, 6]), [2, 4]), (([], [1]), []), (([1, 2], [3, 4]), []),
         (([5, 5, 5], [5]), [5]), (([3, 1, 2], [2, 3, 1]), [1, 2, 3])],
        """
        def common_elements(a, b):
            return sorted(set(a) & set(b))
        """),
    _py("digits", "def digits(n: int) -> list[int]:",
        "Return the decimal digits of n >= 0 as a list of ints, most significant first.",
        [((1203,), [1, 2, 0, 3]), ((0,), [0]), ((7,), [7]), ((100,), [1, 0, 0])],
        """
        def digits(n):
            return [int(d) for d in str(n)]
        """),
    _py("balanced_brackets", "def balanced_brackets(s: str) -> bool:",
        "Return True if the brackets (), [] and {} in s are balanced and properly nested; "
        "other characters are ignored.",
        [(("{[()]}",), True), (("",), True), (("([)]",), False), (("((",), False),
         (("a(b)c[d]",), True), ((")(",), False), (("{}[]()",), True)],
        """
        def balanced_brackets(s):
            pairs = {")": "(", "]": "[", "}": "{"}
            stack = []
            for c in s:
                if c in "([{":
                    stack.append(c)
                elif c in pairs:
                    if not stack or stack.pop() != pairs[c]:
                        return False
            return not stack
        """),
    _py("median", "def median(nums: list[float]) -> float:",
        "Return the median of the non-empty list nums: the middle value once sorted, or the "
        "mean of the two middle values when the length is even.",
        [(([3, 1, 2],), 2), (([4, 1, 3, 2],), 2.5), (([5],), 5), (([1, 1, 1, 9],), 1.0),
         (([-1, -2],), -1.5)],
        """
        def median(nums):
            s = sorted(nums)
            mid = len(s) // 2
            return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
        """),
]

TASKS: list[ArithTask | PyTask] = [*ARITHMETIC, *PYTHON]
