"""bench/tools_tasks.py (the tool-use tasks and their scorer) and bench/tools.py's plumbing (stream
reassembly, and a whole run against a small fake OpenAI server on 127.0.0.1:0). No model and no
swarm are started."""
from __future__ import annotations

import json
import sys
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from conftest import serving

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import tools  # noqa: E402
import tools_tasks as tt  # noqa: E402

CALLS = [t for t in tt.TASKS if t.expect is not None]
TEXTS = [t for t in tt.TASKS if t.expect is None]


def schema_of(name: str) -> dict:
    return tt.TOOLS[name]["function"]["parameters"]


def tool_call(name: str, args: dict | str, call_id: str = "call_x") -> dict:
    arguments = args if isinstance(args, str) else json.dumps(args)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def reply_with(calls: list | None = None, content: str | None = None,
               finish: str | None = None) -> dict:
    message: dict = {"role": "assistant", "content": content}
    if calls is not None:
        message["tool_calls"] = calls
    finish = finish or ("tool_calls" if calls else "stop")
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def right_args(task: tt.ToolTask) -> dict:
    return {key: want.example() for key, want in task.expect.args.items()}


# ============================================================================ task data


def test_enough_tasks_of_each_kind_with_unique_ids():
    assert len(tt.TASKS) >= 48
    assert len(TEXTS) >= 10 and len(CALLS) >= 30
    multi = Counter(t.kind for t in tt.TASKS if t.multi_turn)
    assert multi["call"] >= 4 and multi["no_call"] >= 4
    ids = [t.id for t in tt.TASKS]
    assert len(set(ids)) == len(ids)
    assert {len(t.tools) for t in tt.TASKS} == {1, 2, 3, 4, 5, 6}
    # every tool is offered somewhere, and every matcher is used
    assert {name for t in tt.TASKS for name in t.tools} == set(tt.TOOLS)
    assert {a.how for t in CALLS for a in t.expect.args.values()} == set(tt.MATCHERS)


@pytest.mark.parametrize("name", sorted(tt.TOOLS))
def test_tools_are_valid_openai_function_tools(name):
    tool = tt.TOOLS[name]
    assert set(tool) == {"type", "function"} and tool["type"] == "function"
    fn = tool["function"]
    assert fn["name"] == name and name.isidentifier() and fn["description"]
    params = fn["parameters"]
    assert params["type"] == "object" and isinstance(params["properties"], dict)
    assert set(params["required"]) <= set(params["properties"])
    assert len(set(params["required"])) == len(params["required"])
    for prop in params["properties"].values():
        assert prop["type"] in tt._TYPES and prop["description"]
        assert all(tt.fits({"type": prop["type"]}, v) for v in prop.get("enum", []))
        if prop["type"] == "array":
            assert prop["items"]["type"] in tt._TYPES


def test_tool_schemas_pass_a_json_schema_validator():
    import jsonschema
    for tool in tt.TOOLS.values():
        jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])
    for task in CALLS:
        jsonschema.validate(right_args(task), schema_of(task.expect.name))


@pytest.mark.parametrize("task", CALLS, ids=lambda t: t.id)
def test_expected_call_fits_the_offered_tool(task):
    assert len(set(task.tools)) == len(task.tools) and set(task.tools) <= set(tt.TOOLS)
    assert task.expect.name in task.tools
    schema = schema_of(task.expect.name)
    assert set(schema["required"]) <= set(task.expect.args)
    assert set(task.expect.args) <= set(schema["properties"])
    for key, want in task.expect.args.items():
        assert isinstance(want, tt.Arg)
        assert tt.fits(schema["properties"][key], want.example()), (key, want)
        assert want.matches(want.example()), (key, want)


@pytest.mark.parametrize("task", tt.TASKS, ids=lambda t: t.id)
def test_messages_are_well_formed(task):
    messages = tt.messages_for(task)
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
    assert messages[-1]["role"] in ("user", "tool")          # the model's turn comes next
    open_ids: list[str] = []
    for m in messages[1:]:
        assert m["role"] in ("user", "assistant", "tool")
        if m["role"] == "tool":
            assert set(m) == {"role", "tool_call_id", "content"}
            assert m["tool_call_id"] in open_ids and isinstance(m["content"], str)
            open_ids.remove(m["tool_call_id"])
            continue
        assert not open_ids, "a call is left without its tool message"
        if m["role"] == "assistant" and "tool_calls" in m:
            assert m["content"] is None and m["tool_calls"]
            for c in m["tool_calls"]:
                assert tt._call_problem(c) is None
                assert c["function"]["name"] in task.tools
                args = json.loads(c["function"]["arguments"])
                schema = schema_of(c["function"]["name"])
                assert set(schema["required"]) <= set(args)
                assert all(tt.fits(schema["properties"][k], v) for k, v in args.items())
                open_ids.append(c["id"])
        else:
            assert isinstance(m["content"], str) and m["content"].strip()
    assert not open_ids
    assert task.multi_turn == any(m["role"] == "tool" for m in messages)
    json.dumps(messages)                    # sendable as is


# ============================================================================ scorer


@pytest.mark.parametrize("task", CALLS, ids=lambda t: t.id)
def test_the_expected_call_scores_correct_and_a_wrong_one_does_not(task):
    args = right_args(task)
    verdict = tt.check(task, reply_with([tool_call(task.expect.name, args)]))
    assert verdict.correct and verdict.shape is None, verdict
    assert verdict.called == task.expect.name

    other = next((n for n in task.tools if n != task.expect.name), "no_such_tool")
    assert not tt.check(task, reply_with([tool_call(other, args)])).correct
    assert not tt.check(task, reply_with(content="I would call a tool here.")).correct
    for key, want in task.expect.args.items():       # each argument wrong in turn
        bad = tt.check(task, reply_with([tool_call(task.expect.name, {**args, key: WRONG[
            want.how](want.example())})]))
        assert not bad.correct and key in bad.detail, (key, bad)
        missing = {k: v for k, v in args.items() if k != key}
        assert not tt.check(task, reply_with([tool_call(task.expect.name, missing)])).correct


WRONG = {"exact": lambda v: v + "x", "path": lambda v: v + "x", "ci": lambda v: v + "x",
         "num": lambda v: v + 1, "flag": lambda v: not v, "set": lambda v: v + ["other"],
         "text": lambda v: "  ", "expr": lambda v: f"({v}) + 1"}


@pytest.mark.parametrize("task", TEXTS, ids=lambda t: t.id)
def test_text_is_right_where_no_call_is_expected_and_a_call_is_wrong(task):
    assert tt.check(task, reply_with(content="Here is my answer.")).correct
    name = task.tools[0]
    args = {k: "x" for k in schema_of(name)["required"]}
    verdict = tt.check(task, reply_with([tool_call(name, args)]))
    assert not verdict.correct and verdict.called == name


@pytest.mark.parametrize("arg, got, same", [
    (tt.exact("pytest -x"), " pytest -x\n", True), (tt.exact("pytest -x"), "pytest  -x", False),
    (tt.exact("main"), "Main", False), (tt.exact("1"), 1, False),
    (tt.path("src"), "./src/", True), (tt.path("src/app.py"), "src/app.py/", True),
    (tt.path("/var/log"), "/var/log/", True), (tt.path("/"), "/", True),
    (tt.path("src/app.py"), "app.py", False), (tt.path("tests"), "/tests", False),
    (tt.ci("Paris"), "PARIS ", True), (tt.ci("Paris"), "Paris, France", False),
    (tt.num(250), 250.0, True), (tt.num(99.5), 99.5, True), (tt.num(250), "250", False),
    (tt.num(1), True, False), (tt.num(300), 301, False),
    (tt.flag(True), True, True), (tt.flag(True), 1, False), (tt.flag(True), "true", False),
    (tt.anyset("ui", "enhancement"), ["enhancement", "ui"], True),
    (tt.anyset("ui", "enhancement"), ["ui", " enhancement", "ui"], True),
    (tt.anyset("bug"), ["bug", "ui"], False), (tt.anyset("bug"), "bug", False),
    (tt.anyset("bug"), [["bug"]], False),
    (tt.text(), "Update tests", True), (tt.text(), " \n", False), (tt.text(), None, False),
    (tt.expr("1234 * 5678"), "5678*1234", True), (tt.expr("2 ** 20"), "2^20", True),
    (tt.expr("0.15 * 240"), "240 * 15 / 100", True), (tt.expr("0.15 * 240"), "36", True),
    (tt.expr("0.15 * 240"), "15% of 240", False), (tt.expr("2 ** 20"), "2 ** 21", False),
    (tt.expr("1"), "__import__('os').getcwd()", False), (tt.expr("1"), 1, False),
])
def test_argument_matchers(arg, got, same):
    assert arg.matches(got) is same


@pytest.mark.parametrize("text, value", [
    ("1 + 2 * 3", 7.0), ("(1 + 2) * 3", 9.0), ("-4 + +2", -2.0), ("7 // 2", 3.0), ("7 % 4", 3.0),
    ("sqrt(16) + abs(-2)", 6.0), ("2^10", 1024.0),
    ("1/0", None), ("9 ** 9 ** 9", None), ("(-8) ** 0.5", None), ("x + 1", None),
    ("pow(9, 99999999)", None), ("1" * 300, None), ("", None), (None, None),
])
def test_eval_expression_is_arithmetic_only_and_bounded(text, value):
    assert tt.eval_expression(text) == value


FIX = next(t for t in tt.TASKS if t.id == "cmd-03")          # run_command, optional timeout_s
WEATHER = next(t for t in tt.TASKS if t.id == "weather-01")   # unit optional, an enum


@pytest.mark.parametrize("task, args, correct", [
    (FIX, {"command": "npm install", "timeout_s": 300}, True),
    (FIX, {"command": "npm install", "timeout_s": 300.0}, True),
    (FIX, {"command": "npm install"}, False),                                 # missing key
    (FIX, {"command": "npm install", "timeout_s": 300, "cwd": "."}, False),   # unknown key
    (WEATHER, {"city": "Paris", "unit": "celsius"}, True),        # optional key that fits
    (WEATHER, {"city": "Paris", "unit": "kelvin"}, False),        # optional key, not in the enum
    (WEATHER, {"city": "paris"}, True),
])
def test_extra_and_missing_keys(task, args, correct):
    assert tt.check(task, reply_with([tool_call(task.expect.name, args)])).correct is correct


def test_only_the_first_call_counts():
    right = tool_call("get_weather", {"city": "Paris"}, "call_1")
    wrong = tool_call("get_weather", {"city": "Lyon"}, "call_2")
    assert tt.check(WEATHER, reply_with([right, wrong])).correct
    assert not tt.check(WEATHER, reply_with([wrong, right])).correct


@pytest.mark.parametrize("calls, finish, problem", [
    (None, "stop", "tool_calls is null"),
    ([], "stop", "not a non-empty list"),
    ([{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
     "tool_calls", "tool_calls[0] has no id"),
    ([tool_call("get_weather", "{}") | {"type": "tool"}], "tool_calls", "type 'tool'"),
    ([{"id": "c", "type": "function", "function": {"name": "get_weather",
                                                   "arguments": {"city": "Paris"}}}],
     "tool_calls", "arguments is not a string"),
    ([tool_call("get_weather", '{"city": "Par')], "tool_calls", "not valid JSON"),
    ([tool_call("get_weather", '["Paris"]')], "tool_calls", "not a JSON object"),
    ([tool_call("get_weather", {"city": "Paris"})], "stop", "finish_reason 'stop'"),
    ([tool_call("get_weather", {"city": "Paris"}, "a"), tool_call("get_weather", {"city": "Rome"}, "a")],
     "tool_calls", "share an id"),
])
def test_shape_errors_are_reported(calls, finish, problem):
    message: dict = {"role": "assistant", "content": None, "tool_calls": calls}
    reply = {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}
    verdict = tt.check(WEATHER, reply)
    assert verdict.shape is not None and problem in verdict.shape, verdict.shape


def test_a_shape_error_does_not_change_the_score():
    no_id = {"type": "function", "function": {"name": "get_weather",
                                              "arguments": '{"city": "Paris"}'}}
    verdict = tt.check(WEATHER, reply_with([no_id]))
    assert verdict.correct and "no id" in verdict.shape
    text_task = TEXTS[0]
    verdict = tt.check(text_task, reply_with(None, "Paris."))
    assert verdict.correct and verdict.shape is None
    null_calls = {"choices": [{"message": {"role": "assistant", "content": "Paris.",
                                           "tool_calls": None}, "finish_reason": "stop"}]}
    verdict = tt.check(text_task, null_calls)
    assert verdict.correct and "null" in verdict.shape
    # arguments sent as an object cannot be read as JSON text: wrong, and a shape error
    as_object = {"id": "c", "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    verdict = tt.check(WEATHER, reply_with([as_object]))
    assert not verdict.correct and verdict.shape


@pytest.mark.parametrize("reply", [{}, {"choices": []}, {"choices": [{}]}, {"choices": ["x"]},
                                   {"choices": [{"message": "x"}]}, []])
def test_a_reply_without_a_message_raises_value_error(reply):
    with pytest.raises(ValueError):
        tt.check(WEATHER, reply)


# ============================================================================ streams


def chunk(delta: dict | None = None, finish: str | None = None, **extra) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}


CALL_STREAM = [
    chunk({"role": "assistant", "content": None}),
    chunk({"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_10", "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city": '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"Rome"}'}}]}),
    chunk({}, "tool_calls", swarm={"samples": 3, "k": 3}),
]


def test_reassemble_rebuilds_calls_from_deltas():
    reply, problems = tools.reassemble(CALL_STREAM)
    assert problems == []
    message = reply["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        tool_call("get_weather", '{"city": "Paris"}', "call_9"),
        tool_call("get_weather", '{"city": "Rome"}', "call_10")]
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    assert tools.samples_spent(reply) == 3
    verdict = tt.check(WEATHER, reply)
    assert verdict.correct and verdict.shape is None


def test_reassemble_text_and_a_wrong_finish_reason():
    reply, problems = tools.reassemble([chunk({"role": "assistant", "content": ""}),
                                        chunk({"content": "It is "}), chunk({"content": "sunny."}),
                                        chunk({}, "stop")])
    assert problems == [] and reply["choices"][0]["message"] == {"role": "assistant",
                                                                "content": "It is sunny."}
    assert "tool_calls" not in reply["choices"][0]["message"]
    reply, _ = tools.reassemble([*CALL_STREAM[:-1], chunk({}, "stop")])
    assert "finish_reason 'stop'" in tt.check(WEATHER, reply).shape


@pytest.mark.parametrize("pieces, problem", [
    ([{"id": "a", "type": "function", "function": {"name": "f"}}], "without an integer index"),
    ([{"index": 0, "id": "a", "type": "function", "function": {"name": "f"}},
      {"index": 0, "id": "b", "function": {"arguments": "{}"}}], "id changed to 'b'"),
    ([{"index": 0, "type": "function", "function": {"name": "f"}},
      {"index": 0, "id": "a", "function": {"arguments": "{}"}}], "id not in its first delta"),
    ([{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": {}}}],
     "not a string"),
])
def test_reassemble_reports_bad_deltas(pieces, problem):
    _, problems = tools.reassemble([chunk({"tool_calls": [p]}) for p in pieces])
    assert any(problem in p for p in problems), problems


def test_a_name_repeated_in_later_deltas_is_fine():
    pieces = [{"index": 0, "id": "a", "type": "function", "function": {"name": "f"}},
              {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}}]
    reply, problems = tools.reassemble([chunk({"tool_calls": [p]}) for p in pieces])
    assert problems == [] and reply["choices"][0]["message"]["tool_calls"][0]["function"] == \
        {"name": "f", "arguments": "{}"}


def test_parse_sse():
    lines = ["", ": keep-alive", 'data: {"a": 1}', "", "data:{\"b\": 2}", "data: [DONE]",
             'data: {"c": 3}']
    assert tools.parse_sse(lines) == ([{"a": 1}, {"b": 2}], True)
    assert tools.parse_sse(['data: {"a": 1}']) == ([{"a": 1}], False)
    for bad in (["data: {oops"], ["data: [1]"], ['data: {"error": {"message": "boom"}}']):
        with pytest.raises(ValueError):
            tools.parse_sse(bad)


# ============================================================================ bench plumbing
# The fake server answers per arm (recognised from the body):
#   greedy (T=0):   the expected call, or text; no `swarm` object
#   sample:         always text; `swarm.samples` 1
#   vote3:          HTTP 500 for read-01; otherwise right; `swarm.samples` 3
#   vote5:          right, but calls lack their id (shape errors); `swarm.samples` 5
# Streamed requests get the same reply as SSE chunks, arguments split in two fragments.

TASK_BY_FIRST_USER = {t.messages[0]["content"]: t for t in tt.TASKS}


def fake_reply(body: dict) -> tuple[int, dict]:
    task = TASK_BY_FIRST_USER[body["messages"][1]["content"]]
    votes = body["swarm"]["votes"]
    text_only = votes == 1 and "temperature" not in body
    if votes == 3 and task.id == "read-01":
        return 500, {"error": {"message": "boom", "type": "server_error"}}
    calls = None
    if task.expect is not None and not text_only:
        calls = [tool_call(task.expect.name, right_args(task), f"call_{task.id}")]
        if votes == 5:
            del calls[0]["id"]
    reply = reply_with(calls, None if calls else "An answer in text.")
    reply["swarm"] = None if votes == 1 and not text_only else {"samples": votes, "k": votes}
    if reply["swarm"] is None:
        del reply["swarm"]
    return 200, reply


def sse_body(reply: dict) -> bytes:
    message = reply["choices"][0]["message"]
    events = [chunk({"role": "assistant", "content": message["content"]})]
    for i, c in enumerate(message.get("tool_calls") or []):
        args = c["function"]["arguments"]
        head = {"index": i, "type": "function", "function": {"name": c["function"]["name"],
                                                             "arguments": args[:5]}}
        if "id" in c:
            head["id"] = c["id"]
        events += [chunk({"tool_calls": [head]}),
                   chunk({"tool_calls": [{"index": i, "function": {"arguments": args[5:]}}]})]
    events.append(chunk({}, reply["choices"][0]["finish_reason"],
                        **({"swarm": reply["swarm"]} if "swarm" in reply else {})))
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + \
        b"data: [DONE]\n\n"


class FakeHandler(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        status, reply = fake_reply(body)
        streamed = body.get("stream") and status == 200
        data = sse_body(reply) if streamed else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/event-stream" if streamed else "application/json")
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


@pytest.mark.parametrize("stream", [False, True])
def test_bench_reports_what_the_server_returned(fake_server, tmp_path, capsys, stream):
    url, bodies = fake_server
    out = tmp_path / "results.json"
    argv = ["--url", url, "--limit", "2", "--out", str(out)] + (["--stream"] if stream else [])
    assert tools.main(argv) == 0
    printed = capsys.readouterr().out
    tasks = tools.select_tasks(2)
    assert [t.id for t in tasks] == ["read-01", "read-02", "text-01", "text-02", "multi-01",
                                     "multi-02", "multi-text-01", "multi-text-02"]

    expected = {  # arm: correct, accuracy, call, name, no-call, multi, shape, samples, errors,
                  # wrong tool (wall/task and constrained are not checked here)
        "greedy": ("8/8", "100.0%", "100.0%", "100.0%", "100.0%", "100.0%", "0", "1.00", "0", "0"),
        "sample": ("4/8", "50.0%", "0.0%", "0.0%", "100.0%", "50.0%", "0", "1.00", "0", "0"),
        "vote3": ("7/8", "87.5%", "75.0%", "75.0%", "100.0%", "100.0%", "0", "3.00", "1", "0"),
        "vote5": ("8/8", "100.0%", "100.0%", "100.0%", "100.0%", "100.0%", "4", "5.00", "0", "0"),
    }
    for name, want in expected.items():
        line = next(l for l in printed.splitlines() if l.startswith(name + " ") and "%" in l)
        fields = line.split()
        assert fields[-13:-5] == list(want[:8]) and fields[-3] == want[8], line
        assert fields[-1] == want[9], line
    assert "k=5 minus one sample: +50.0 points; k=5 minus greedy: +0.0 points" in printed
    assert printed.count("shape error") == 4 and "vote5   shape error read-01" in printed

    # what was sent: 8 tasks x 4 arms, in arm order, with the tools and each arm's controls
    assert len(bodies) == 32
    by_arm = [bodies[i:i + 8] for i in range(0, 32, 8)]
    for body, task in zip(bodies, tasks * 4):
        assert body["tools"] == [tt.TOOLS[n] for n in task.tools]
        assert body["tool_choice"] == "auto" and body["messages"][1:] == list(task.messages)
        assert body.get("stream", False) is stream
    assert all(b["temperature"] == 0 and "seed" not in b and b["swarm"] == {"votes": 1}
               for b in by_arm[0])
    assert all("temperature" not in b and b["swarm"] == {"votes": 1, "anchor": False}
               for b in by_arm[1])
    assert len({b["seed"] for b in by_arm[1]}) == 8
    assert all("temperature" not in b and "seed" not in b and b["swarm"] == {"votes": 3}
               for b in by_arm[2])
    assert all(b["swarm"] == {"votes": 5} for b in by_arm[3])

    results = json.loads(out.read_text())
    assert results["stream"] is stream and list(results["arms"]) == list(tools.DEFAULT_ARMS)
    vote3 = {t["id"]: t for t in results["arms"]["vote3"]["tasks"]}
    assert vote3["read-01"]["error"].startswith("HTTP 500") and vote3["read-01"]["samples"] is None
    assert vote3["multi-01"]["correct"] and vote3["multi-01"]["called"] == "read_file"
    sample = {t["id"]: t for t in results["arms"]["sample"]["tasks"]}
    assert sample["read-02"]["detail"] == "answered in text, expected read_file"
    assert sample["read-02"]["name_ok"] is False and sample["text-01"]["name_ok"] is None
    vote5 = {t["id"]: t for t in results["arms"]["vote5"]["tasks"]}
    assert "has no id" in vote5["multi-02"]["shape"]


def test_temperature_flag_and_seeds():
    args = tools.parse_args(["--url", "http://x", "--seed", "100", "--temperature", "0.9"])
    task = tt.TASKS[5]
    body = tools.request_body(tools.ARMS["sample"], task, args)
    assert body["seed"] == 105 and body["temperature"] == 0.9
    assert tools.request_body(tools.ARMS["greedy"], task, args)["temperature"] == 0.0
    assert tools.request_body(tools.ARMS["vote5"], task, args)["temperature"] == 0.9


def test_wrong_tool_counts_calls_an_agent_would_run_wrongly():
    def outcome(kind, name_ok, called):
        return tools.Outcome("t", kind, False, False, name_ok, called, "", None, 1, 1.0, None, "")
    cases = [outcome("no_call", None, "read_file"),      # a call where text was right
             outcome("call", False, "get_weather"),      # another tool than the right one
             outcome("call", True, "read_file"),         # the right tool (arguments aside)
             outcome("call", False, None),               # text where a call was right
             outcome("no_call", None, None)]
    assert [tools.wrong_tool(o) for o in cases] == [True, True, False, False, False]
    assert tools.summarize(cases)["wrong_tool"] == 2

