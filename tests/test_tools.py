"""Tool calls: parsing per model family, what must stay text, the schema check, the canonical form,
and the streaming CallScanner, as tables over pure functions (no sockets, no workers)."""
from __future__ import annotations

import json
import time

import pytest

import local_swarm as ls

OPENAI_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["C", "F"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "read_file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"], "additionalProperties": False}}},
    {"function": {"name": "list_files"}},                       # type missing, no parameters
    {"type": "retrieval", "function": {"name": "not_a_function"}},
]
TOOLS = ls.tool_specs(OPENAI_TOOLS)

PARIS = ls.ToolCall("get_weather", {"city": "Paris"})
ROME = ls.ToolCall("get_weather", {"city": "Rome", "unit": "C"})
READ = ls.ToolCall("read_file", {"path": "src/main.py"})
LIST = ls.ToolCall("list_files", {})

W_PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
W_ROME = '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}'
R_MAIN = '{"name": "read_file", "arguments": {"path": "src/main.py"}}'


def test_tool_specs():
    assert TOOLS == {
        "get_weather": OPENAI_TOOLS[0]["function"]["parameters"],
        "read_file": OPENAI_TOOLS[1]["function"]["parameters"],
        "list_files": {},
    }
    assert ls.tool_specs([{"type": "function"}, {"function": {"name": ""}}, "junk"]) == {}


# -- parsing: each family --------------------------------------------------------------------------

@pytest.mark.parametrize("text,content,calls", [
    # Qwen / Hermes
    (f"<tool_call>\n{W_PARIS}\n</tool_call>", "", [PARIS]),
    (f"Let me check.\n<tool_call>\n{W_PARIS}\n</tool_call>", "Let me check.", [PARIS]),
    (f"<tool_call>\n{W_PARIS}\n</tool_call>\n<tool_call>\n{W_ROME}\n</tool_call>", "", [PARIS, ROME]),
    (f"<tool_call>\n{W_PARIS}\n</tool_call>\n<tool_call>\n{R_MAIN}", "", [PARIS, READ]),  # no close
    ("<tool_call>\n" + W_PARIS, "", [PARIS]),
    ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>',
     "", [PARIS]),                                                        # arguments as a string
    ('<tool_call>{"name": "list_files"}</tool_call>', "", [LIST]),        # no arguments: {}
    (f"<tool_call>\n{W_PARIS}\n{W_ROME}\n</tool_call>", "", [PARIS, ROME]),
    # Llama 3.x
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
    (W_PARIS, "", [PARIS]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
    (f"<|python_tag|>{W_PARIS}; {W_ROME}", "", [PARIS, ROME]),
    (f"{W_PARIS};{R_MAIN}", "", [PARIS, READ]),
    (f"{W_PARIS}\n{R_MAIN}", "", [PARIS, READ]),
    ('{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
    # Mistral
    (f"[TOOL_CALLS][{W_PARIS}, {R_MAIN}]", "", [PARIS, READ]),
    (f"[TOOL_CALLS] [{W_PARIS}]", "", [PARIS]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [PARIS]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]read_file[ARGS]'
     '{"path": "src/main.py"}', "", [PARIS, READ]),
    ('[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}', "", [PARIS]),
    # fenced blocks
    (f"```json\n{W_PARIS}\n```", "", [PARIS]),
    (f"Here:\n```\n{W_PARIS}\n```\nThat gets it.", "Here:\n\nThat gets it.", [PARIS]),
    (f"```json\n[{W_PARIS}, {R_MAIN}]\n```", "", [PARIS, READ]),
    (f"```json\n{W_PARIS}", "", [PARIS]),                                  # cut off: no closing fence
    ('```json\n{\n  "name": "read_file",\n  "arguments": {"path": "src/main.py"}\n}\n```',
     "", [READ]),
    # bare objects and lists, the OpenAI shape
    (f"I will look it up: {W_PARIS}", "I will look it up:", [PARIS]),
    (f"[{W_PARIS}, {W_ROME}]", "", [PARIS, ROME]),
    ('{"type": "function", "function": {"name": "read_file", "arguments": "{\\"path\\": \\"src/main.py\\"}"}}',
     "", [READ]),
    # prose before and after, several formats in one reply
    (f"First the weather.\n{W_PARIS}\nThen the file.\n<tool_call>\n{R_MAIN}\n</tool_call>\nOK.",
     "First the weather.\n\nThen the file.\n\nOK.", [PARIS, READ]),
])
def test_parse_families(text, content, calls):
    assert ls.parse_tool_calls(text, TOOLS) == (content, calls)


def test_parse_keeps_strings_exactly():
    text = '{"name": "read_file", "arguments": {"path": "  C:\\\\dir\\\\é file.py "}}'
    _, calls = ls.parse_tool_calls(text, TOOLS)
    assert calls == [ls.ToolCall("read_file", {"path": "  C:\\dir\\é file.py "})]


# -- parsing: what must stay text ------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "call read_file(path) to see it",
    "f(x) = 2x, so get_weather(Paris) is not a call",
    "read_file('src/main.py')",
    '{"city": "Paris"}',
    '{"name": "Bob", "age": 3}',
    '{"name": "Bob", "arguments": {}}',
    '{"name": "delete_everything", "arguments": {"path": "/"}}',             # not offered
    '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>',
    '[TOOL_CALLS]delete_everything[ARGS]{}',
    '{"name": "get_weather", "arguments": {}}',                               # missing required key
    '{"name": "get_weather", "arguments": {"city": 3}}',                      # wrong type
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "K"}}',   # not in the enum
    '{"name": "read_file", "arguments": {"path": "a", "mode": "w"}}',         # additionalProperties
    '{"name": "get_weather", "arguments": {"city": "Paris"}',                 # malformed: unclosed
    "{'name': 'get_weather', 'arguments': {'city': 'Paris'}}",                # not JSON
    '{"name": "get_weather", "arguments": {"city": NaN}}',
    '{"name": "get_weather", "arguments": "not json"}',
    '{"name": "get_weather", "arguments": ["Paris"]}',
    '{"name": "get_weather"}',                                                # bare: no arguments
    '{"name": "get_weather", "arguments": {"city": "Paris"}, "extra": 1}',    # bare: extra key
    '{"name": "get_weather", "arguments": {"city": "Paris"}, "parameters": {}}',
    '{"function": "get_weather", "arguments": {"city": "Paris"}}',
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}',   # nested
    f"[{W_PARIS}, 3]",                                                        # a list: all or none
    f"[TOOL_CALLS][{W_PARIS}, {{\"name\": \"nope\", \"arguments\": {{}}}}]",
    f"```python\ncall = {W_PARIS}\n```",
    f"```python\n{W_PARIS}\n```",
    f"```\nrequests.post(url, json={W_PARIS})\n```",
    f"```json\n{W_PARIS}\nand then some\n```",
    "Use the <tool_call> tag to call a tool.",
    "[TOOL_CALLS] none",
    pytest.param("{" * 5000 + "}" * 10, id="braces"),
    pytest.param('{"a":' * 2000 + W_PARIS, id="call-inside-unterminated-json"),
    pytest.param('{"x": [' + W_PARIS + '], oops}', id="call-inside-broken-json"),
    pytest.param('{"name": "list_files", "arguments": ' + '{"a":' * 100 + "1" + "}" * 101,
                 id="arguments-too-deep"),
])
def test_parse_stays_text(text):
    assert ls.parse_tool_calls(text, TOOLS) == (text.strip(), [])


@pytest.mark.parametrize("text", [
    '{"a":' * 100000,                              # a reply stuck in a loop, cut off
    '{"a":' * 100000 + "x" + "}" * 10,              # ... broken off
    ('{"a":' * 500 + "1" + "}" * 500 + "\n") * 200,  # deep but whole values, many of them
    '[{"a":' * 50000,
    "[TOOL_CALLS]" * 50000,
    "<tool_call>{" * 50000,
], ids=["unterminated", "broken", "whole", "lists", "mistral-markers", "hermes-markers"])
def test_parse_degenerate_reply_is_one_pass(text):
    began = time.perf_counter()
    assert ls.parse_tool_calls(text + "\n" + W_PARIS, TOOLS)[1] in ([], [PARIS])
    assert time.perf_counter() - began < 2.0


def test_parse_call_after_broken_json():
    text = '{"note": "see", ' + W_PARIS + "}"
    assert ls.parse_tool_calls(text, TOOLS) == ('{"note": "see", }', [PARIS])


def test_parse_skips_code_then_finds_call():
    text = f"```python\nx = {W_ROME}\n```\n{W_PARIS}"
    assert ls.parse_tool_calls(text, TOOLS) == (f"```python\nx = {W_ROME}\n```", [PARIS])


def test_parse_invalid_call_stays_next_to_valid_one():
    bad = '{"name": "read_file", "arguments": {}}'
    assert ls.parse_tool_calls(f"{W_PARIS}\n{bad}", TOOLS) == (bad, [PARIS])


def test_parse_without_tools():
    assert ls.parse_tool_calls(f"  {W_PARIS}  ", {}) == (W_PARIS, [])


@pytest.mark.parametrize("text,content,calls", [
    (f"<tool_call>\n{W_PARIS}\n</tool_call>\n<tool_call>\n{W_ROME}\n</tool_call>", "", [PARIS]),
    (f"[TOOL_CALLS][{R_MAIN}, {W_PARIS}]", "", [READ]),
    (f"A.\n{W_PARIS}\nB.\n{W_ROME}", "A.\n\nB.", [PARIS]),
])
def test_parse_not_parallel_keeps_first_and_cuts_the_rest(text, content, calls):
    assert ls.parse_tool_calls(text, TOOLS, parallel=False) == (content, calls)


# -- schema check -----------------------------------------------------------------------------------

OBJ = {"type": "object", "properties": {"n": {"type": "integer"}, "tags": {
    "type": "array", "items": {"type": "string"}}}, "required": ["n"], "additionalProperties": False}


@pytest.mark.parametrize("schema,value,ok", [
    ({}, {"anything": [1, None]}, True),
    ({}, 3, True),
    (True, 3, True),
    (False, 3, False),
    ({"type": "string"}, "x", True),
    ({"type": "string"}, 1, False),
    ({"type": "number"}, 1, True),
    ({"type": "number"}, 1.5, True),
    ({"type": "number"}, True, False),          # bool is not a number
    ({"type": "integer"}, 2, True),
    ({"type": "integer"}, 2.0, True),           # JSON Schema: 2.0 is an integer
    ({"type": "integer"}, 2.5, False),
    ({"type": "integer"}, False, False),
    ({"type": "boolean"}, False, True),
    ({"type": "boolean"}, 0, False),
    ({"type": "null"}, None, True),
    ({"type": "null"}, 0, False),
    ({"type": "array"}, [], True),
    ({"type": "array"}, {}, False),
    ({"type": "object"}, {}, True),
    ({"type": "object"}, [], False),
    ({"type": ["string", "null"]}, None, True),
    ({"type": ["string", "null"]}, 1, False),
    ({"type": "whatever"}, 0, True),            # an unknown type name accepts
    ({"enum": ["a", "b"]}, "b", True),
    ({"enum": ["a", "b"]}, "c", False),
    ({"enum": [1, 2]}, 2.0, True),
    ({"enum": [1, 2]}, True, False),            # true is not 1 in JSON
    ({"enum": [{"a": [1]}]}, {"a": [1]}, True),
    ({"const": "x"}, "x", True),
    ({"const": "x"}, "y", False),
    ({"const": None}, None, True),
    (OBJ, {"n": 1}, True),
    (OBJ, {"n": 1, "tags": ["a", "b"]}, True),
    (OBJ, {}, False),
    (OBJ, {"n": "1"}, False),
    (OBJ, {"n": 1, "tags": ["a", 2]}, False),
    (OBJ, {"n": 1, "other": 1}, False),
    ({"properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "integer"}},
     {"a": "x", "b": 1}, True),
    ({"properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "integer"}},
     {"a": "x", "b": "y"}, False),
    ({"additionalProperties": False, "patternProperties": {"^x": {}}}, {"x1": 1}, True),
    ({"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "boolean"}}, "required": ["b"]}}}, {"a": {"b": True}}, True),
    ({"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "boolean"}}, "required": ["b"]}}}, {"a": {"b": "yes"}}, False),
    ({"items": [{"type": "string"}, {"type": "integer"}]}, ["a", 1, None], True),
    ({"items": [{"type": "string"}, {"type": "integer"}]}, ["a", "b"], False),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, 3, True),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, 3.5, False),
    ({"oneOf": [{"type": "string"}, {"type": "number"}]}, 3, True),
    ({"allOf": [{"type": "number"}, {"enum": [1, 2]}]}, 2, True),
    ({"allOf": [{"type": "number"}, {"enum": [1, 2]}]}, 3, False),
    ({"type": "string", "minLength": 5, "$ref": "#/x", "format": "uri"}, "a", True),  # ignored
    ({"required": ["a"]}, "not an object", True),   # object keywords apply to objects only
    ({"required": [["a"], 1]}, {}, True),           # malformed schemas: ignored, never raise
    ({"type": [{}, "string"]}, 1, True),
    ({"type": 5, "properties": [], "items": 3, "anyOf": {}, "enum": "ab"}, "a", True),
    ({"items": {"type": "string"}}, "not a list", True),
])
def test_check_arguments(schema, value, ok):
    reason = ls.check_arguments(schema, value)
    assert (reason is None) == ok, reason


@pytest.mark.parametrize("schema,value,reason", [
    (OBJ, {}, "arguments: missing required 'n'"),
    (OBJ, {"n": 1, "tags": ["a", 2]}, "arguments.tags[1]: expected string, got integer"),
    (OBJ, {"n": 1, "x": 0}, "arguments: unexpected 'x'"),
    ({"type": "number"}, True, "arguments: expected number, got boolean"),
])
def test_check_arguments_reasons(schema, value, reason):
    assert ls.check_arguments(schema, value) == reason


# -- canonical form ---------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [
    (ls.ToolCall("f", {"a": 1, "b": 2}), ls.ToolCall("f", {"b": 2, "a": 1})),
    (ls.ToolCall("f", {"n": 2}), ls.ToolCall("f", {"n": 2.0})),
    (ls.ToolCall("f", {"o": {"y": [1.0, {"q": 1, "p": 2}], "x": 0}}),
     ls.ToolCall("f", {"o": {"x": 0.0, "y": [1, {"p": 2, "q": 1}]}})),
])
def test_canonical_equal(a, b):
    assert a.canonical() == b.canonical()


@pytest.mark.parametrize("a,b", [
    (ls.ToolCall("f", {"a": 1}), ls.ToolCall("f", {"a": 2})),
    (ls.ToolCall("f", {"a": 1}), ls.ToolCall("g", {"a": 1})),
    (ls.ToolCall("f", {"a": 1}), ls.ToolCall("f", {"a": True})),
    (ls.ToolCall("f", {"a": 1}), ls.ToolCall("f", {"a": "1"})),
    (ls.ToolCall("f", {"a": 2.5}), ls.ToolCall("f", {"a": 2})),
    (ls.ToolCall("f", {"p": "a.py"}), ls.ToolCall("f", {"p": "a.py "})),
    (ls.ToolCall("f", {"p": "A.py"}), ls.ToolCall("f", {"p": "a.py"})),
    (ls.ToolCall("f", {"a": [1, 2]}), ls.ToolCall("f", {"a": [2, 1]})),
])
def test_canonical_different(a, b):
    assert a.canonical() != b.canonical()


def test_canonical_and_arguments_json():
    call = ls.ToolCall("read_file", {"path": "é/b.py", "n": 2.0})
    assert call.canonical() == '{"arguments":{"n":2,"path":"é/b.py"},"name":"read_file"}'
    assert call.arguments_json() == '{"path":"é/b.py","n":2.0}'
    assert json.loads(call.arguments_json()) == call.arguments


# -- streaming: CallScanner -------------------------------------------------------------------------

def chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def scan(text: str, size: int) -> tuple[str, int | None, list[str]]:
    """Feed `text` in pieces of `size`; (everything shown, start, what each feed returned)."""
    scanner = ls.CallScanner(TOOLS)
    outs = [scanner.feed(piece) for piece in chunks(text, size)]
    outs.append(scanner.flush())
    return "".join(outs), scanner.start, outs


PROSE = [
    "Hello! The weather in Paris is mild.",
    "Compare a < b and [1, 2] with x[0].\nNext line {not json}\n  indented",
    "Use <b>bold</b> or <|im_end|> tokens.\n[link](http://x) and [TOOL_CALL] typo",
    '{"city": "Paris"}\nand {"name": "Bob"} mid-line',
    '[1, 2, 3]\n[{"a": 1}]\n{\n  "title": "x"\n}',
    "```python\ndef f(x):\n    return {'name': x}\n```\nDone.",
    '```python\n{"name": "read_file", "arguments": {"path": "a"}}\n<tool_call>\n```\nafter',
    "```\nprint(1)\n```\n",
    '```json\n{"city": "Paris"}\n```',
    "~~~\ncode\n~~~\ntext",
    "",
    "\n\n",
    "Ends with a partial marker <tool_c",
    "Ends with an open brace\n{",
]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
@pytest.mark.parametrize("text", PROSE)
def test_scanner_prose_passes_through(text, size):
    shown, start, _ = scan(text, size)
    assert (shown, start) == (text, None)


CALLS = [
    ("Let me check.\n<tool_call>\n" + W_PARIS + "\n</tool_call>", "Let me check.\n"),
    ("Sure <tool_call>" + W_PARIS, "Sure "),
    (W_PARIS, ""),
    ("  " + W_PARIS, "  "),
    ("\n\n" + W_PARIS, "\n\n"),
    ('{\n  "name": "get_weather",\n  "arguments": {"city": "Paris"}\n}', ""),
    ("[" + W_PARIS + "]", ""),
    ('{"type": "function", "function": {"name": "f"}}', ""),
    ("I will call it.\n" + W_PARIS, "I will call it.\n"),
    ('{"name": "invented_tool", "arguments": {}}', ""),            # names are not checked here
    ("Here:\n```json\n" + W_PARIS + "\n```", "Here:\n"),
    ("```\n\n  " + W_PARIS + "\n```", ""),
    ("x\n  ```json\n[" + W_PARIS + "]\n```", "x\n  "),
    ("[TOOL_CALLS][" + W_PARIS + "]", ""),
    ("Calling: [TOOL_CALLS]get_weather[ARGS]{}", "Calling: "),
    ("<|python_tag|>" + W_PARIS, ""),
    ("```python\nx = 1\n```\n" + W_PARIS, "```python\nx = 1\n```\n"),
    ('{"city": "Paris"}\n' + W_PARIS, '{"city": "Paris"}\n'),
]


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
@pytest.mark.parametrize("text,prose", CALLS)
def test_scanner_finds_call_start(text, prose, size):
    scanner = ls.CallScanner(TOOLS)
    shown = "".join(scanner.feed(piece) for piece in chunks(text, size))
    assert scanner.start == len(prose)
    assert text[:scanner.start] == prose
    assert shown == prose
    assert scanner.feed("more") == "" and scanner.flush() == ""


@pytest.mark.parametrize("text,held", [
    ("Hi <tool_c", "<tool_c"),
    ("Hi\n{", "{"),
    ('Hi\n{ "na', '{ "na'),
    ("Hi\n```js", "```js"),          # the info line is not finished
    ("Hi\n```json\n", "```json\n"),  # the content has not shown yet
    ("Hi [TOOL", "[TOOL"),
])
def test_scanner_holds_possible_start(text, held):
    scanner = ls.CallScanner(TOOLS)
    assert "".join(scanner.feed(c) for c in text) == text[:-len(held)]
    assert scanner.start is None
    assert scanner.flush() == held


def test_scanner_code_fence_is_not_held():
    scanner = ls.CallScanner(TOOLS)
    assert scanner.feed("```python\n") == "```python\n"
    assert scanner.feed("x = {") == "x = {"
    assert scanner.feed('"name": 1}\n{"name"') == '"name": 1}\n{"name"'   # inside code: all prose
    assert scanner.feed("\n```\n{") == "\n```\n"                            # closed: scanning again
    assert scanner.feed('"name"') == ""
    assert scanner.start is None                       # held: a call needs its arguments key
    assert scanner.feed(': "read", "arguments"') == ""
    assert scanner.start == len('```python\nx = {"name": 1}\n{"name"\n```\n')


def test_scanner_plain_fence_with_code_is_released():
    scanner = ls.CallScanner(TOOLS)
    assert scanner.feed("```\n") == ""
    assert scanner.feed("  ") == ""
    assert scanner.feed("print(1)\n") == "```\n  print(1)\n"


def test_scanner_hold_is_bounded():
    text = "{" + " " * (ls.SCAN_HOLD_LIMIT + 10) + "x"
    scanner = ls.CallScanner(TOOLS)
    shown = "".join(scanner.feed(c) for c in text[:-1])
    assert 0 < len(shown) and len(text) - 1 - len(shown) <= ls.SCAN_HOLD_LIMIT
    assert shown + scanner.feed("x") + scanner.flush() == text


def test_scanner_long_prose_is_linear_enough():
    text = ("word [x] <y> " * 2000 + "\n") * 5
    shown, start, outs = scan(text, 4)
    assert (shown, start) == (text, None)
    assert max(len(out) for out in outs) < 64


@pytest.mark.parametrize("pad", range(0, 48))
def test_parse_call_longer_than_decode_window(pad):
    """The first decode sees DECODE_WINDOW characters; whatever token the cut falls in, the call
    is decoded whole."""
    tokens = [True, False, None, 12345, -1.5e3, "\u00e9x \\ \"q\"", {"k": "v"}, [], "s" * 9]
    args = {"pad": "p" * pad, "items": tokens * (ls.DECODE_WINDOW // 40)}
    call = ls.ToolCall("list_files", args)
    text = json.dumps({"name": "list_files", "arguments": args}, ensure_ascii=pad % 2 == 0)
    assert len(text) > ls.DECODE_WINDOW
    for reply in (text, f"<tool_call>\n{text}\n</tool_call>", f"```json\n{text}\n```"):
        content, calls = ls.parse_tool_calls(reply, TOOLS)
        assert (content, [c.canonical() for c in calls]) == ("", [call.canonical()])


@pytest.mark.parametrize("text,start", [
    ('{"name": "my-package", "version": "1.0.0"}\n', None),          # package.json is no call
    ('```json\n{\n  "name": "my-package",\n  "private": true\n}\n```\n', None),
    ('{"name": "read_package_json", "arguments": {}}', 0),           # an invented tool still is
    ('{"name": "get", "parameters": {"a": 1}}', 0),
    ('{"name": "' + "x" * 80 + '", "arguments": {}}', None),          # no tool has such a name
])
def test_scanner_needs_a_name_then_arguments(text, start):
    for step in (1, 7, len(text)):
        scanner = ls.CallScanner(TOOLS)
        shown = "".join(scanner.feed(text[i:i + step]) for i in range(0, len(text), step))
        assert scanner.start == start
        assert shown + scanner.flush() == (text if start is None else text[:start])


def _assistant(*calls):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
        for i, (name, args) in enumerate(calls)]}


USER = {"role": "user", "content": "look"}
TOOL_RESULT = {"role": "tool", "tool_call_id": "call_0", "content": "ok"}
READ_A = ("read_file", {"path": "a.txt"})
LIST_SRC = ("list_dir", {"path": "src"})


@pytest.mark.parametrize("messages,answered", [
    # ends on the results of the last assistant turn: its calls
    ([USER, _assistant(READ_A), TOOL_RESULT], [READ_A]),
    ([USER, _assistant(READ_A, LIST_SRC), TOOL_RESULT, TOOL_RESULT], [READ_A, LIST_SRC]),
    # an earlier turn's calls are not the ones the conversation ends on
    ([USER, _assistant(LIST_SRC), TOOL_RESULT, _assistant(READ_A), TOOL_RESULT], [READ_A]),
    # a user or assistant message last: nothing was just answered
    ([USER, _assistant(READ_A), TOOL_RESULT, USER], []),
    ([USER, _assistant(READ_A)], []),
    ([USER], []),
    # arguments that are not a JSON object cannot be compared
    ([USER, _assistant(("read_file", "not json")), TOOL_RESULT], []),
])
def test_answered_calls(messages, answered):
    normalized = ls.parse_chat_request({"messages": [
        {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
            c["function"]["arguments"]) if isinstance(c["function"]["arguments"], dict)
            else c["function"]["arguments"]}} for c in m["tool_calls"]]}
        if m.get("tool_calls") else m for m in messages]}).messages
    expected = {ls.ToolCall(name, args).canonical() for name, args in answered}
    assert ls.answered_calls(normalized) == expected


WRITE_B = ("write_file", {"path": "b.txt", "content": "42"})


@pytest.mark.parametrize("calls,kept", [
    ([READ_A, WRITE_B], [WRITE_B]),              # the plan restated: the answered step goes
    ([WRITE_B, READ_A, LIST_SRC], [WRITE_B, LIST_SRC]),
    ([READ_A], [READ_A]),                         # a repeat alone stays (the loop guard's case)
    ([READ_A, READ_A], [READ_A, READ_A]),
    ([("read_file", {"path": "b.txt"}), WRITE_B], [("read_file", {"path": "b.txt"}), WRITE_B]),
    ([], []),
])
def test_without_replays_drops_answered_calls_beside_new_ones(calls, kept):
    answered = frozenset({ls.ToolCall(*READ_A).canonical()})
    got = ls.without_replays([ls.ToolCall(*c) for c in calls], answered)
    assert [(c.name, c.arguments) for c in got] == kept


def test_the_loop_note_names_the_calls_and_their_tools_once():
    note = ls.loop_note([ls.ToolCall(*READ_A), ls.ToolCall("read_file", {"path": "b"}),
                         ls.ToolCall(*LIST_SRC)])
    assert note["role"] == "system"
    assert 'read_file({"path":"a.txt"}), read_file({"path":"b"}), list_dir({"path":"src"})' \
        in note["content"]
    assert "Do not call read_file or list_dir again" in note["content"]


@pytest.mark.parametrize("content,kept", [
    # a call cut off by max_tokens, closed or broken calls to tools not offered, broken JSON
    ("Let me look.\n<tool_call>\n{\"name\": \"read_fi", "Let me look."),
    ("<tool_call>\n{\"name\": \"x\", \"arguments\": {}}\n</tool_call>", ""),
    ("[TOOL_CALLS][{\"name\": \"rea", ""),
    ("<tool_call>\n{", ""),
    ("<tool_call>\n{}\n</tool_call>", ""),
    ("{}", ""),
    ("Reading it.\n\n{}\n\nDone.", "Reading it.\n\nDone."),
    ("```json\n{\"name\": \"nope\", \"arguments\": {}}\n```", ""),
    ("First:\n{\"name\": \"nope\", \"arguments\": {\"a\": 1}}\nthen more.",
     "First:\n\nthen more."),
    ("<|python_tag|>{\"name\": \"nope\", \"parameters\": {}} and that", "and that"),
    # prose and code stay
    ("No call here (really).", None),
    ("", None),
    ("Set it like {\"name\": \"x\"} in the file.", None),        # not at a line start
    ('{"a": 1}', None),                                            # JSON, not call-shaped
    ("```python\nd = {\n}\n```", None),                           # code keeps its braces
    ("```python\nprint('{\"name\": 1}')\n```\nok", None),
])
def test_without_call_text(content, kept):
    assert ls.without_call_text(content) == (content if kept is None else kept)


def test_a_reply_with_calls_keeps_only_its_prose_as_content():
    text = ('I will read it.\n<tool_call>\n{"name": "read_file", "arguments": {"path": "a"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "git_status", "arguments": {}}\n</tool_call>\n{}')
    gen = ls.Generation(parts=[text])
    ls.settle_calls(ls.ToolUse(specs=TOOLS, choice="auto"), gen)
    assert [c.name for c in gen.calls] == ["read_file"] and gen.finish_reason == "tool_calls"
    assert gen.content == "I will read it." and gen.message()["content"] == "I will read it."


@pytest.mark.parametrize("a,b,similar", [
    ("read_package_json", "read_file", True), ("show_file", "read_file", True),
    ("git_status", "get_weather", False), ("run_git_status", "bash", False),
    ("readFile", "read_file", True), ("functions.read", "read", True), ("ls", "list", False),
])
def test_similar_names_share_a_word(a, b, similar):
    assert ls.similar_names(a, b) is similar


@pytest.mark.parametrize("text,start,named", [
    ('<tool_call>\n{"name": "git_status", "arguments": {}}', 0, ("git_status", 22)),
    ('Sure.\n```json\n{"name":"x.y", "arguments": {}}', 6, ("x.y", 23)),
    ('<tool_call>\n{"arguments": {}}', 0, None),
])
def test_started_call_name(text, start, named):
    assert ls.started_call_name(text, start) == named

