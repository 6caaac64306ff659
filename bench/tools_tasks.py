"""Tasks for bench/tools.py: tool-use conversations with the expected outcome, and the scorer.

Each task offers 1 to 6 tools (OpenAI `tools` format, coding-agent tools such as read_file or
run_command, and a few everyday ones such as get_weather) and expects either one call (a tool name
and its arguments) or no call (a text answer: a general question when only unrelated tools are
offered, or one the conversation already answers). Multi-turn tasks carry an earlier assistant
message with `tool_calls` (content null) and the `tool` message holding its result; the right next
step is then another call or a text answer.

A reply is correct when no call was expected and it has no tool_calls, or when a call was expected
and its first tool call has that name and arguments that match. Each expected argument says how it
is compared (see `Arg`); keys the expectation does not name may be present when the tool's schema
defines them and the value fits the schema (optional keys); unknown keys make the call wrong.
Independently of the score, a reply whose tool_calls have the wrong shape (null, missing id,
arguments not a JSON-object string, finish_reason not "tool_calls") is reported as a shape error.

Sections: argument matchers, task records, tools, schema fit, scoring, task builders, tasks.
Nothing here does I/O.
"""
from __future__ import annotations

import ast
import json
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

# ============================================================================ argument matchers
# How one expected argument is compared with the value the model sent:
#   exact  a string, equal after strip (identifiers, commands, URLs, versions)
#   path   a string, equal after strip, a leading "./" and a trailing "/" ("./src/" is "src")
#   ci     a string, equal after strip, case-insensitively (cities, titles, currency codes)
#   num    a JSON number (not a bool, not a string), numerically equal
#   flag   a JSON boolean, the same one
#   set    a list of strings, the same set after strip (order and duplicates do not matter)
#   text   any non-empty string (free text the model writes: a commit message, file content)
#   expr   an arithmetic expression with the same value ("12*7" is "7 * 12"; "^" is a power)

MAX_EXPR_CHARS = 200            # a calculator expression longer than this is not evaluated


def norm_path(path: str) -> str:
    path = path.strip()
    while path.startswith("./"):
        path = path[2:]
    return path.rstrip("/") if len(path) > 1 else path


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.BitXor: operator.pow}       # "^": a calculator's power
_FUNCS: dict[str, Callable[..., Any]] = {"sqrt": math.sqrt, "abs": abs}


def _eval(node: ast.AST) -> Any:
    """The value of an arithmetic AST node, in floats (so 9 ** 9 ** 9 overflows at once instead
    of computing a huge integer). Raises ValueError for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left), _eval(node.right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords):
        return _FUNCS[node.func.id](*(_eval(a) for a in node.args))
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


def eval_expression(text: Any) -> float | None:
    """The value of an arithmetic expression string; None when it is not one (or fails)."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        return None
    try:
        value = _eval(ast.parse(text.strip(), mode="eval").body)
        return float(value) if not isinstance(value, complex) and math.isfinite(value) else None
    except (SyntaxError, ValueError, TypeError, ArithmeticError):   # ZeroDivision, Overflow
        return None


def _same_number(a: Any, b: Any) -> bool:
    return (a is not None and b is not None
            and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


MATCHERS: dict[str, Callable[[Any, Any], bool]] = {
    "exact": lambda want, got: isinstance(got, str) and got.strip() == want,
    "path": lambda want, got: isinstance(got, str) and norm_path(got) == norm_path(want),
    "ci": lambda want, got: isinstance(got, str) and got.strip().casefold() == want.casefold(),
    "num": lambda want, got: _is_number(got) and _same_number(got, want),
    "flag": lambda want, got: got is want,
    "set": lambda want, got: (isinstance(got, list) and all(isinstance(x, str) for x in got)
                              and {x.strip() for x in got} == want),
    "text": lambda want, got: isinstance(got, str) and bool(got.strip()),
    "expr": lambda want, got: _same_number(eval_expression(got), eval_expression(want)),
}


@dataclass(frozen=True)
class Arg:
    """One expected argument: `how` names a MATCHERS entry, `value` is what it compares with."""

    how: str
    value: Any = None

    def __post_init__(self) -> None:
        assert self.how in MATCHERS, self.how

    def matches(self, got: Any) -> bool:
        return MATCHERS[self.how](self.value, got)

    def example(self) -> Any:
        """A value a correct call would send (what the tests build a right reply from)."""
        if self.how == "set":
            return sorted(self.value)
        return "some text" if self.how == "text" else self.value

    def __str__(self) -> str:
        return "any non-empty string" if self.how == "text" else f"{self.how} {self.value!r}"


def exact(value: str) -> Arg:
    return Arg("exact", value)


def path(value: str) -> Arg:
    return Arg("path", value)


def ci(value: str) -> Arg:
    return Arg("ci", value)


def num(value: float) -> Arg:
    return Arg("num", value)


def flag(value: bool) -> Arg:
    return Arg("flag", value)


def anyset(*values: str) -> Arg:
    return Arg("set", frozenset(values))


def text() -> Arg:
    return Arg("text")


def expr(expression: str) -> Arg:
    return Arg("expr", expression)


# ============================================================================ task records


@dataclass(frozen=True)
class Expect:
    """The expected call: a tool name and, per argument, how it is compared."""

    name: str
    args: dict[str, Arg]


@dataclass(frozen=True)
class ToolTask:
    """A conversation (without the system message, see `messages_for`), the names of the tools
    offered, and the expected call (None: a text answer is right)."""

    id: str
    messages: tuple[dict[str, Any], ...]
    tools: tuple[str, ...]
    expect: Expect | None

    @property
    def kind(self) -> str:
        return "no_call" if self.expect is None else "call"

    @property
    def multi_turn(self) -> bool:
        return any(m["role"] == "tool" for m in self.messages)


@dataclass(frozen=True)
class Verdict:
    """The scorer's decision. `called`: the first call's function name (None: no call);
    `detail`: "ok ..." or why it is wrong; `shape`: what is wrong with the reply's tool_calls
    shape (None: nothing), reported whether or not the answer is correct."""

    correct: bool
    detail: str
    called: str | None
    shape: str | None


# ============================================================================ tools


def _s(description: str) -> dict:
    return {"type": "string", "description": description}


def _fn(name: str, description: str, required: list[str], /, **props: dict) -> dict:
    return {"type": "function",
            "function": {"name": name, "description": description,
                         "parameters": {"type": "object", "properties": props,
                                        "required": required}}}


TOOLS: dict[str, dict] = {t["function"]["name"]: t for t in (
    _fn("read_file", "Read a text file and return its contents.", ["path"],
        path=_s("Path of the file, relative to the repository root unless absolute.")),
    _fn("write_file", "Create or overwrite a text file with the given content.",
        ["path", "content"], path=_s("Path of the file to write."),
        content=_s("The complete new content of the file.")),
    _fn("list_dir", "List the entries of a directory.", ["path"],
        path=_s("Path of the directory.")),
    _fn("delete_file", "Delete a file.", ["path"], path=_s("Path of the file to delete.")),
    _fn("run_command", "Run a shell command in the repository root and return its output.",
        ["command"], command=_s("The shell command line."),
        timeout_s={"type": "integer", "description": "Seconds before the command is killed "
                   "(default 60)."}),
    _fn("search_code", "Search the repository's files for a string.", ["query"],
        query=_s("The text to search for."),
        path=_s("A directory to search in (default: the whole repository).")),
    _fn("run_tests", "Run the project's test suite (or part of it) and report the results.", [],
        path=_s("A test file or directory (default: all tests)."),
        keyword=_s("Only run tests whose name contains this string.")),
    _fn("git_commit", "Create a git commit of the staged changes.", ["message"],
        message=_s("The commit message."),
        all={"type": "boolean", "description": "Stage all modified tracked files first."}),
    _fn("git_create_branch", "Create a new git branch and switch to it.", ["name"],
        name=_s("The branch name."),
        from_ref=_s("The branch or commit to start from (default: the current HEAD).")),
    _fn("create_issue", "Open an issue in the project's issue tracker.", ["title"],
        title=_s("The issue title."), body=_s("The issue description."),
        labels={"type": "array", "items": {"type": "string"}, "description": "Label names."}),
    _fn("install_package", "Install a Python package with pip.", ["name"],
        name=_s("The package name on PyPI."),
        version=_s("An exact version to install (default: the latest).")),
    _fn("http_get", "Fetch a URL with an HTTP GET request and return the response body.",
        ["url"], url=_s("The absolute URL.")),
    _fn("get_weather", "Get the current weather for a city.", ["city"],
        city=_s("The city name, e.g. 'London'."),
        unit={"type": "string", "enum": ["celsius", "fahrenheit"],
              "description": "Temperature unit (default celsius)."}),
    _fn("calculator", "Evaluate an arithmetic expression and return the result.",
        ["expression"], expression=_s("An arithmetic expression such as '2 * (3 + 4)'.")),
    _fn("convert_currency", "Convert an amount of money between currencies at today's rate.",
        ["amount", "from_currency", "to_currency"],
        amount={"type": "number", "description": "The amount to convert."},
        from_currency=_s("ISO 4217 code of the source currency, e.g. 'USD'."),
        to_currency=_s("ISO 4217 code of the target currency, e.g. 'EUR'.")),
    _fn("send_email", "Send an email.", ["to", "subject", "body"],
        to=_s("The recipient's email address."), subject=_s("The subject line."),
        body=_s("The message text.")),
    _fn("get_stock_price", "Get the latest price of a stock.", ["symbol"],
        symbol=_s("The ticker symbol, e.g. 'MSFT'.")),
)}

SYSTEM = ("You are a coding assistant with access to tools. Call a tool only when the user's "
          "request needs one; when no offered tool helps, or the conversation already holds "
          "the answer, reply in plain text.")


def messages_for(task: ToolTask) -> list[dict[str, Any]]:
    """The request's messages: the system message, then the task's conversation."""
    return [{"role": "system", "content": SYSTEM}, *task.messages]


def tools_for(task: ToolTask) -> list[dict]:
    return [TOOLS[name] for name in task.tools]


# ============================================================================ schema fit
# Just what these tools use: string, integer, number, boolean, arrays of them, and enum.

_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda x: isinstance(x, str),
    "integer": lambda x: _is_number(x) and float(x).is_integer(),
    "number": _is_number,
    "boolean": lambda x: isinstance(x, bool),
    "array": lambda x: isinstance(x, list),
    "object": lambda x: isinstance(x, dict),
}


def fits(schema: dict, value: Any) -> bool:
    """Whether `value` fits a property schema (type, enum, array items)."""
    if not _TYPES[schema["type"]](value):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if schema["type"] == "array" and "items" in schema:
        return all(fits(schema["items"], x) for x in value)
    return True


# ============================================================================ scoring


def reply_message(reply: Any) -> dict:
    """`choices[0].message`; raises ValueError when the reply has none."""
    try:
        message = reply["choices"][0]["message"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError("no choices[0].message in the reply") from exc
    if not isinstance(message, dict):
        raise ValueError("choices[0].message is not an object")
    return message


def _call_problem(call: Any) -> str | None:
    """What is wrong with one tool call's shape; None when nothing is."""
    if not isinstance(call, dict):
        return "is not an object"
    fn = call.get("function")
    if not isinstance(call.get("id"), str) or not call["id"]:
        return "has no id"
    if call.get("type") != "function":
        return f"has type {call.get('type')!r}, not 'function'"
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        return "has no function.name"
    if not isinstance(fn.get("arguments"), str):
        return "function.arguments is not a string (a JSON object encoded as a string)"
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return "function.arguments is not valid JSON"
    return None if isinstance(args, dict) else "function.arguments is not a JSON object"


def shape_problems(reply: dict) -> list[str]:
    """What is wrong with the shape of the reply's tool calls ([] when nothing is, or when
    the message has no `tool_calls` key)."""
    message = reply_message(reply)              # so choices[0] is an object
    choice = reply["choices"][0]
    if "tool_calls" not in message:
        return []
    calls = message["tool_calls"]
    if calls is None:
        return ["tool_calls is null (leave the key out when there is no call)"]
    if not isinstance(calls, list) or not calls:
        return ["tool_calls is not a non-empty list"]
    problems = [f"tool_calls[{i}] {p}" for i, c in enumerate(calls)
                if (p := _call_problem(c)) is not None]
    ids = [c.get("id") for c in calls if isinstance(c, dict)]
    if len(set(ids)) != len(ids):
        problems.append("tool_calls share an id")
    if choice.get("finish_reason") != "tool_calls":
        problems.append(f"finish_reason {choice.get('finish_reason')!r} with tool calls")
    return problems


def args_problem(expect: Expect, args: dict) -> str | None:
    """Why `args` do not match the expectation; None when they do."""
    properties = TOOLS[expect.name]["function"]["parameters"]["properties"]
    for key, want in expect.args.items():
        if key not in args:
            return f"no argument {key!r}"
        if not want.matches(args[key]):
            return f"{key}={args[key]!r}, expected {want}"
    for key, value in args.items():
        if key not in expect.args and key not in properties:
            return f"unknown argument {key!r}"
        if key not in expect.args and not fits(properties[key], value):
            return f"optional {key}={value!r} does not fit the schema"
    return None


def call_problem(expect: Expect, call: Any) -> str | None:
    """Why the call is not the expected one; None when it is."""
    fn = call.get("function") if isinstance(call, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name != expect.name:
        return f"called {name!r}, expected {expect.name!r}"
    try:
        args = json.loads(fn.get("arguments"))
    except (TypeError, ValueError):
        return "arguments are not a JSON string"
    if not isinstance(args, dict):
        return "arguments are not a JSON object"
    return args_problem(expect, args)


def first_call_name(calls: list) -> str | None:
    fn = calls[0].get("function") if isinstance(calls[0], dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else "?"


def check(task: ToolTask, reply: dict) -> Verdict:
    """Score a whole (non-streamed, or reassembled) reply. Raises ValueError when it has no
    choices[0].message."""
    message = reply_message(reply)
    shape = "; ".join(shape_problems(reply)) or None
    calls = message.get("tool_calls")
    calls = calls if isinstance(calls, list) else []
    if not calls:
        if task.expect is None:
            return Verdict(True, "ok: answered in text", None, shape)
        return Verdict(False, f"answered in text, expected {task.expect.name}", None, shape)
    name = first_call_name(calls)
    if task.expect is None:
        return Verdict(False, f"called {name}, expected a text answer", name, shape)
    problem = call_problem(task.expect, calls[0])
    return Verdict(problem is None, problem or f"ok: {name}", name, shape)


# ============================================================================ task builders


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def said(content: str) -> dict:
    return {"role": "assistant", "content": content}


def called(call_id: str, name: str, result: str, /, **args: Any) -> tuple[dict, dict]:
    """An earlier assistant turn that called `name(**args)`, and the tool's reply."""
    call = {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}
    return ({"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": result})


def call(name: str, /, **args: Arg) -> Expect:
    return Expect(name, args)


def t(id: str, tools: str, conversation: str | list, expect: Expect | None = None) -> ToolTask:
    """A task: `tools` are space-separated names; a str conversation is one user message."""
    messages = [user(conversation)] if isinstance(conversation, str) else conversation
    return ToolTask(id, tuple(messages), tuple(tools.split()), expect)


# ============================================================================ tasks

SINGLE_CALLS = [
    t("read-01", "read_file write_file list_dir", "Show me the contents of src/main.py.",
      call("read_file", path=path("src/main.py"))),
    t("read-02", "read_file", "Open config/settings.yaml and read it.",
      call("read_file", path=path("config/settings.yaml"))),
    t("read-03", "list_dir read_file search_code", "What does README.md say? Read it.",
      call("read_file", path=path("README.md"))),
    t("read-04", "read_file write_file list_dir run_command search_code git_commit",
      "Read the file docs/INSTALL.md.", call("read_file", path=path("docs/INSTALL.md"))),
    t("write-01", "write_file read_file",
      "Create a file named notes.txt containing the text 'buy milk'.",
      call("write_file", path=path("notes.txt"), content=text())),
    t("write-02", "write_file list_dir run_command",
      "Write a .gitignore file at the repository root that ignores __pycache__/ and *.pyc.",
      call("write_file", path=path(".gitignore"), content=text())),
    t("write-03", "write_file", "Save a hello-world Python script as scripts/hello.py.",
      call("write_file", path=path("scripts/hello.py"), content=text())),
    t("ls-01", "list_dir read_file", "List the files in the tests directory.",
      call("list_dir", path=path("tests"))),
    t("ls-02", "list_dir search_code read_file write_file", "What files are in src/utils?",
      call("list_dir", path=path("src/utils"))),
    t("ls-03", "list_dir", "Show me the entries of the /var/log directory.",
      call("list_dir", path=path("/var/log"))),
    t("delete-01", "delete_file list_dir read_file write_file run_command search_code",
      "Delete the file build/output.log.", call("delete_file", path=path("build/output.log"))),
    t("cmd-01", "run_command read_file", "Run `pytest -x` in the shell.",
      call("run_command", command=exact("pytest -x"))),
    t("cmd-02", "run_command git_commit", "Execute the command `git status`.",
      call("run_command", command=exact("git status"))),
    t("cmd-03", "run_command", "Run `npm install` with a timeout of 300 seconds.",
      call("run_command", command=exact("npm install"), timeout_s=num(300))),
    t("cmd-04", "run_command list_dir write_file",
      "Check which Python version is installed by running `python --version`.",
      call("run_command", command=exact("python --version"))),
    t("search-01", "search_code read_file list_dir", "Search the code for 'TODO'.",
      call("search_code", query=exact("TODO"))),
    t("search-02", "search_code read_file",
      "Find where parse_config is used, searching only in the src directory.",
      call("search_code", query=exact("parse_config"), path=path("src"))),
    t("search-03", "search_code run_command write_file git_commit create_issue",
      "Search the codebase for the string MAX_RETRIES.",
      call("search_code", query=exact("MAX_RETRIES"))),
    t("tests-01", "run_tests run_command read_file", "Run the tests in tests/test_api.py.",
      call("run_tests", path=path("tests/test_api.py"))),
    t("tests-02", "run_tests git_commit",
      "Run only the tests whose name contains 'login'.",
      call("run_tests", keyword=exact("login"))),
    t("commit-01", "git_commit run_command",
      "Commit the staged changes with the message 'Fix typo in README'.",
      call("git_commit", message=ci("Fix typo in README"))),
    t("commit-02", "git_commit write_file read_file",
      "Commit all modified files (stage them all first) with a short message saying that "
      "you updated the tests.",
      call("git_commit", message=text(), all=flag(True))),
    t("commit-03", "git_commit",
      "Commit my staged changes; they add input validation to the signup form. Write the "
      "message yourself.", call("git_commit", message=text())),
    t("branch-01", "git_create_branch git_commit run_command",
      "Create a new git branch called feature/login.",
      call("git_create_branch", name=exact("feature/login"))),
    t("branch-02", "git_create_branch", "Make a branch named hotfix-123 starting from main.",
      call("git_create_branch", name=exact("hotfix-123"), from_ref=exact("main"))),
    t("issue-01", "create_issue git_commit",
      "Open an issue titled 'Login page crashes on Safari' with the label bug.",
      call("create_issue", title=ci("Login page crashes on Safari"), labels=anyset("bug"))),
    t("issue-02", "create_issue search_code read_file",
      "File an issue with the title 'Add dark mode', the body 'Users want a dark theme for "
      "the dashboard.' and the labels enhancement and ui.",
      call("create_issue", title=ci("Add dark mode"), body=text(),
           labels=anyset("enhancement", "ui"))),
    t("issue-03", "create_issue run_command search_code list_dir",
      "Create an issue titled 'Update dependencies'.",
      call("create_issue", title=ci("Update dependencies"))),
    t("pkg-01", "install_package run_command", "Install the requests package.",
      call("install_package", name=exact("requests"))),
    t("pkg-02", "install_package", "Install numpy version 1.26.4.",
      call("install_package", name=exact("numpy"), version=exact("1.26.4"))),
    t("http-01", "http_get read_file",
      "Fetch https://api.github.com/repos/python/cpython for me.",
      call("http_get", url=exact("https://api.github.com/repos/python/cpython"))),
    t("weather-01", "get_weather", "What's the weather in Paris right now?",
      call("get_weather", city=ci("Paris"))),
    t("weather-02", "get_weather calculator", "What's the weather like in Tokyo, in celsius?",
      call("get_weather", city=ci("Tokyo"), unit=exact("celsius"))),
    t("weather-03", "get_weather send_email get_stock_price",
      "Is it raining in Berlin? Give me the temperature in fahrenheit.",
      call("get_weather", city=ci("Berlin"), unit=exact("fahrenheit"))),
    t("weather-04", "read_file get_weather run_command http_get",
      "How warm is it in Madrid today?", call("get_weather", city=ci("Madrid"))),
    t("calc-01", "calculator", "Use the calculator to compute 1234 * 5678.",
      call("calculator", expression=expr("1234 * 5678"))),
    t("calc-02", "calculator get_weather", "What is (17 + 25) * 3 / 7? Use the calculator.",
      call("calculator", expression=expr("(17 + 25) * 3 / 7"))),
    t("calc-03", "get_stock_price calculator convert_currency",
      "Calculate 2 to the power of 20 with the calculator.",
      call("calculator", expression=expr("2 ** 20"))),
    t("calc-04", "calculator", "What is 15% of 240? Use the calculator tool.",
      call("calculator", expression=expr("0.15 * 240"))),
    t("fx-01", "convert_currency calculator", "Convert 250 US dollars to euros.",
      call("convert_currency", amount=num(250), from_currency=ci("USD"), to_currency=ci("EUR"))),
    t("fx-02", "convert_currency get_stock_price get_weather",
      "How many Japanese yen is 99.5 British pounds? Convert it.",
      call("convert_currency", amount=num(99.5), from_currency=ci("GBP"),
           to_currency=ci("JPY"))),
    t("email-01", "send_email create_issue",
      "Send an email to alice@example.com with the subject 'Meeting moved' telling her the "
      "meeting is now at 3pm.",
      call("send_email", to=exact("alice@example.com"), subject=ci("Meeting moved"),
           body=text())),
    t("stock-01", "get_stock_price get_weather calculator",
      "What's the current stock price of Apple (ticker AAPL)?",
      call("get_stock_price", symbol=ci("AAPL"))),
]

SINGLE_TEXT = [
    t("text-01", "read_file list_dir", "What is the capital of France?"),
    t("text-02", "run_command search_code", "Explain what a Python decorator is in two sentences."),
    t("text-03", "get_weather", "Write a haiku about autumn leaves."),
    t("text-04", "http_get", "What does the HTTP status code 404 mean?"),
    t("text-05", "git_commit run_command", "Thanks, that's all for now!"),
    t("text-06", "get_weather send_email",
      [user("Hi, I'm Dana and I work in Lisbon."), said("Hi Dana! How can I help you today?"),
       user("What's my name?")]),
    t("text-07", "run_command read_file",
      "Here is a function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n"
      "What does add(2, 3) return?"),
    t("text-08", "calculator get_weather", "Translate 'good morning' into Spanish."),
    t("text-09", "get_weather read_file", "What is 2 + 2?"),
    t("text-10", "create_issue git_commit", "How do I reverse a list in Python?"),
    t("text-11", "run_command", "Don't run anything: just tell me what `ls -la` does."),
    t("text-12", "search_code read_file install_package",
      "In one sentence, what does this error mean: "
      "`ModuleNotFoundError: No module named 'yaml'`?"),
]

MULTI_CALLS = [
    t("multi-01", "list_dir read_file",
      [user("List the files in src, then open the one whose name starts with 'app'."),
       *called("call_1", "list_dir", '["__init__.py", "app.py", "models.py"]', path="src")],
      call("read_file", path=path("src/app.py"))),
    t("multi-02", "search_code read_file list_dir",
      [user("Find where the function load_settings is defined and show me that file."),
       *called("call_1", "search_code", "config/loader.py:12: def load_settings(path):",
               query="load_settings")],
      call("read_file", path=path("config/loader.py"))),
    t("multi-03", "run_command read_file",
      [user("Run `pytest tests/test_math.py` and, if a test fails, open the failing test file."),
       *called("call_1", "run_command",
               "FAILED tests/test_math.py::test_divide - ZeroDivisionError\n1 failed, 4 passed",
               command="pytest tests/test_math.py")],
      call("read_file", path=path("tests/test_math.py"))),
    t("multi-04", "get_weather",
      [user("What's the weather in Oslo and in Helsinki?"),
       *called("call_1", "get_weather", '{"temp": -3, "unit": "celsius", "conditions": "snow"}',
               city="Oslo")],
      call("get_weather", city=ci("Helsinki"))),
    t("multi-05", "get_weather create_issue",
      [user("Check the weather in Chicago in fahrenheit. If it is below 32 degrees, open an "
            "issue titled 'Freeze warning' with the label weather."),
       *called("call_1", "get_weather", '{"temp": 20, "unit": "fahrenheit", "conditions": '
               '"clear"}', city="Chicago", unit="fahrenheit")],
      call("create_issue", title=ci("Freeze warning"), labels=anyset("weather"))),
    t("multi-06", "read_file write_file",
      [user("Read the file VERSION, then write the next patch version back to it (only the "
            "version number)."),
       *called("call_1", "read_file", "1.4.2\n", path="VERSION")],
      call("write_file", path=path("VERSION"), content=exact("1.4.3"))),
    t("multi-07", "convert_currency calculator",
      [user("Convert 100 EUR to USD, then use the calculator to multiply the result by 3."),
       *called("call_1", "convert_currency", '{"amount": 108.5, "currency": "USD"}',
               amount=100, from_currency="EUR", to_currency="USD")],
      call("calculator", expression=expr("108.5 * 3"))),
    t("multi-08", "git_commit run_command",
      [user("Stage everything and commit it with the message 'Bump version', then run "
            "`git log -1` to show me the commit."),
       *called("call_1", "git_commit", "[main 1a2b3c4] Bump version\n 1 file changed",
               message="Bump version", all=True)],
      call("run_command", command=exact("git log -1"))),
]

MULTI_TEXT = [
    t("multi-text-01", "read_file list_dir",
      [user("Which port does the server use? Its config is in server.toml."),
       *called("call_1", "read_file", 'host = "0.0.0.0"\nport = 8080\n', path="server.toml")]),
    t("multi-text-02", "get_weather",
      [user("What's the weather in Rome?"),
       *called("call_1", "get_weather", '{"temp": 24, "unit": "celsius", "conditions": "sunny"}',
               city="Rome")]),
    t("multi-text-03", "calculator",
      [user("What's 48 * 365? Use the calculator."),
       *called("call_1", "calculator", "17520", expression="48 * 365")]),
    t("multi-text-04", "run_command run_tests",
      [user("Run the tests with `pytest -q` and tell me how many passed."),
       *called("call_1", "run_command", "........\n8 passed in 0.42s", command="pytest -q")]),
    t("multi-text-05", "get_weather send_email",
      [user("What's the weather in Dublin?"),
       *called("call_1", "get_weather", '{"temp": 11, "unit": "celsius", "conditions": '
               '"heavy rain"}', city="Dublin"),
       said("It is 11°C with heavy rain in Dublin."),
       user("So should I take an umbrella?")]),
]

TASKS: list[ToolTask] = [*SINGLE_CALLS, *SINGLE_TEXT, *MULTI_CALLS, *MULTI_TEXT]
