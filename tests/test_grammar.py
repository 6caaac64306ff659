"""GBNF grammars for tool calls and JSON (section "Tool calls", grammars).

Three layers: the text itself (deterministic, well-formed, each tool's name tied to its own
arguments); what it accepts, checked by a small GBNF recognizer below against tables of strings;
and llama.cpp itself, in a subprocess with the build's site folder on PYTHONPATH (libllama never
loads into pytest): every grammar of this file must compile, and SmolLM2-135M sampling under a few
of them must produce JSON that fits the schema."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import local_swarm as ls

READ = {"type": "object", "properties": {"path": {"type": "string"},
                                         "lines": {"type": "array", "items": {"type": "integer"},
                                                   "maxItems": 3}},
        "required": ["path"]}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]},
                                            "days": {"type": "integer"}},
           "required": ["city", "days"]}
TOOLS = {"read.file": READ, "get-weather2": WEATHER, "noop": {}}
NODE = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                                         "tag": {"const": "x"}}}
SCHEMAS = {                           # name: (schema, accepted texts, rejected texts)
    "json_object": (None, ['{}', '{"a": [1, 2.5e3, null, true]}', '{\n  "k": {"z": "\\u00e9"}}'],
                    ['[]', '"s"', ' {}', '{} ', '{"a":1,}', '{"a":  1}']),
    "enum_integer_array": (
        {"type": "object", "properties": {"color": {"enum": ["red", "green"]},
                                          "n": {"type": "integer"},
                                          "tags": {"type": "array", "items": {"type": "string"},
                                                   "minItems": 1, "maxItems": 2}},
         "required": ["color", "n"], "additionalProperties": False},
        ['{"color": "red", "n": -3}', '{"color":"green","n":0,"tags":["a","b"]}',
         '{\n  "color": "red",\n  "n": 10,\n  "tags": ["\\"q\\""]\n}'],
        ['{"n": 1, "color": "red"}', '{"color": "blue", "n": 1}', '{"color": "red", "n": 1.5}',
         '{"color": "red", "n": 01}', '{"color": "red", "n": 1, "tags": []}',
         '{"color": "red", "n": 1, "tags": ["a", "b", "c"]}', '{"color": "red"}',
         '{"color": "red", "n": 1, "x": 2}']),
    "all_optional": (
        {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"},
                                          "c": {"type": "number"}}},
        ['{}', '{"a": true}', '{"b": null}', '{"c": 1e5}', '{"a": false, "c": -0.5}',
         '{"a": true, "b": null, "c": 2}'],
        ['{"b": null, "a": true}', '{"a": true,}', '{, "a": true}', '{"c": 1.}', '{"c": .5}']),
    "types_and_strings": (
        {"type": ["string", "null"], "minLength": 2, "maxLength": 3},
        ['"ab"', '"abc"', '"a\\n"', 'null'], ['"a"', '"abcd"', '""', '"a\nb"', '1']),
    "any_of_and_map": (
        {"anyOf": [{"type": "integer"}, {"type": "object",
                                         "additionalProperties": {"type": "boolean"}}]},
        ['7', '{}', '{"x": true, "y": false}'], ['"7"', '{"x": 1}', '1.5']),
    "recursive_ref": (
        {"$ref": "#/$defs/Node", "$defs": {"Node": NODE}},
        ['{}', '{"kids": []}', '{"kids": [{"tag": "x"}, {"kids": [{}]}], "tag": "x"}'],
        ['{"tag": "y"}', '{"kids": [1]}']),
    "self_alias_ref": (       # A = A | string: the inner A becomes "any value", not left recursion
        {"$ref": "#/definitions/A",
         "definitions": {"A": {"anyOf": [{"$ref": "#/definitions/A"}, {"type": "string"}]}}},
        ['"s"', '1', '[]'], ['x']),
    "all_of_and_unknown": (
        {"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                   {"properties": {"b": {"format": "date-time", "x-weird": 1}}}]},
        ['{"a": 1}', '{"a": 1, "b": [1, {}]}'], ['{"b": 1}']),
}


# ---- a GBNF recognizer for the subset the grammars use ----------------------------------------------
# Parses "name ::= body" lines into a small AST and computes, for a node and a start position, the
# set of positions where a match can end (memoized per rule). Enough for grammars without left
# recursion, which is what llama.cpp accepts too.

TOKEN_RE = re.compile(r'\s*("(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[a-zA-Z0-9-]+|\{\d+(?:,\d*)?\}|[()|?*+])')
ESCAPE_RE = re.compile(r'\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)')


def unescape(text: str) -> str:
    def one(m):
        code = m.group(1)
        if code[0] in "xu" and len(code) > 1:
            return chr(int(code[1:], 16))
        return {"n": "\n", "r": "\r", "t": "\t"}.get(code, code)
    return ESCAPE_RE.sub(one, text)


def parse_class(token: str):
    body = token[1:-1]
    negated = body.startswith("^")
    chars = list(unescape(body[1:] if negated else body))
    ranges, i = [], 0
    while i < len(chars):
        if i + 2 < len(chars) and chars[i + 1] == "-":
            ranges.append((chars[i], chars[i + 2]))
            i += 3
        else:
            ranges.append((chars[i], chars[i]))
            i += 1
    return ("class", negated, ranges)


def parse_alternatives(tokens: list[str], pos: int):
    alternatives, sequence = [], []
    while pos < len(tokens) and tokens[pos] != ")":
        token = tokens[pos]
        pos += 1
        if token == "|":
            alternatives.append(("seq", sequence))
            sequence = []
        elif token == "(":
            node, pos = parse_alternatives(tokens, pos)
            sequence.append(node)
            pos += 1                                   # the ")"
        elif token in "?*+" or token.startswith("{"):
            sequence[-1] = ("rep", sequence[-1], *repetition(token))
        elif token.startswith('"'):
            sequence.append(("lit", unescape(token[1:-1])))
        elif token.startswith("["):
            sequence.append(parse_class(token))
        else:
            sequence.append(("ref", token))
    alternatives.append(("seq", sequence))
    return ("alt", alternatives), pos


def repetition(token: str):
    if token in "?*+":
        return {"?": (0, 1), "*": (0, None), "+": (1, None)}[token]
    low, _, high = token[1:-1].partition(",")
    return int(low), (int(low) if "," not in token else (int(high) if high else None))


def parse_grammar(text: str) -> dict:
    rules = {}
    for line in text.splitlines():
        name, _, body = line.partition(" ::= ")
        tokens = TOKEN_RE.findall(body)
        rules[name], end = parse_alternatives(tokens, 0)
        assert end == len(tokens), line
    return rules


class Recognizer:
    def __init__(self, grammar: str):
        self.rules = parse_grammar(grammar)

    def accepts(self, text: str) -> bool:
        self.text, self.memo = text, {}
        return len(text) in self.ends(("ref", "root"), 0)

    def ends(self, node, i: int) -> set[int]:
        kind = node[0]
        if kind == "lit":
            return {i + len(node[1])} if self.text.startswith(node[1], i) else set()
        if kind == "class":
            return {i + 1} if i < len(self.text) and self.in_class(node, self.text[i]) else set()
        if kind == "ref":
            key = (node[1], i)
            if key not in self.memo:
                self.memo[key] = self.ends(self.rules[node[1]], i)
            return self.memo[key]
        if kind == "alt":
            return set().union(*(self.ends(alt, i) for alt in node[1]))
        if kind == "seq":
            positions = {i}
            for item in node[1]:
                positions = set().union(*(self.ends(item, p) for p in positions))
            return positions
        return self.repeat(node, i)

    def repeat(self, node, i: int) -> set[int]:
        _, item, low, high = node
        current, result, count = {i}, ({i} if low == 0 else set()), 0
        while current and (high is None or count < high):
            current = set().union(*(self.ends(item, p) for p in current))
            count += 1
            if high is None and count > low:
                current -= result          # already reached: no need to go on from there
            if count >= low:
                result |= current
        return result

    @staticmethod
    def in_class(node, char: str) -> bool:
        _, negated, ranges = node
        return any(a <= char <= b for a, b in ranges) != negated


def rule_bodies(grammar: str) -> dict[str, str]:
    return dict(line.split(" ::= ", 1) for line in grammar.splitlines())


def all_grammars() -> dict[str, str]:
    """Every grammar this file checks, by a readable name (all are compiled by llama.cpp)."""
    grammars = {f"schema {name}": ls.schema_grammar(schema) for name, (schema, _, _) in SCHEMAS.items()}
    for family in ("qwen", "chatml", "", "gemma", "llama3", "mistral"):
        for parallel in (True, False):
            grammars[f"calls {family or 'default'} parallel={parallel}"] = ls.call_grammar(
                TOOLS, family, parallel)
    grammars["calls only weather"] = ls.call_grammar(TOOLS, "qwen", only="get-weather2")
    return grammars


# ---- the text -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(all_grammars()))
def test_grammar_text_is_well_formed(name):
    grammar = all_grammars()[name]
    bodies = rule_bodies(grammar)
    assert grammar.startswith("root ::= ") and grammar.endswith("\n")
    assert all(re.fullmatch(r"[a-z0-9-]+", rule) for rule in bodies), list(bodies)
    used = {ref for body in bodies.values() for ref in ls.gbnf_references(body)}
    assert used <= set(bodies), used - set(bodies)
    assert set(bodies) - used <= {"root"}              # nothing defined and left unused
    Recognizer(grammar)                                # the recognizer parses every rule


def test_grammars_are_deterministic():
    assert all_grammars() == all_grammars()
    reordered = dict(reversed(list(TOOLS.items())))
    assert ls.call_grammar(reordered, "qwen") != ls.call_grammar(TOOLS, "qwen")   # order is the tools'


def test_each_tool_name_goes_with_its_own_arguments():
    bodies = rule_bodies(ls.call_grammar(TOOLS, "qwen"))
    assert bodies["call"] == "call-0 | call-1 | call-2"
    for index, name in enumerate(TOOLS):
        refs = set(ls.gbnf_references(bodies[f"call-{index}"]))
        assert refs == {"ws", f"args-{index}"}
        assert ls.json_literal(name) in bodies[f"call-{index}"]
    assert bodies["args-2"] == "object"                  # {} = any object
    assert '"\\"path\\""' in bodies["args-0"] and "city" not in bodies["args-0"]


def test_missing_or_odd_parameters_mean_any_object():
    bodies = rule_bodies(ls.call_grammar({"a": None, "b": ["not", "a", "schema"], "c": {}}, "qwen"))
    assert [bodies[f"args-{i}"] for i in range(3)] == ["object"] * 3
    assert rule_bodies(ls.schema_grammar({}))["root"] == "object"


def test_property_and_definition_names_are_sanitized():
    schema = {"properties": {"file.path": {"type": "object", "properties": {"x y": {"type": "array"}}},
                             "File-Path": {"type": "array", "items": {"type": "string"}}},
              "$defs": {"My.Def_1": {"type": "object"}}, "required": ["file.path"]}
    schema["properties"]["ref"] = {"$ref": "#/$defs/My.Def_1"}
    bodies = rule_bodies(ls.schema_grammar(schema))
    assert {"root-file-path", "root-file-path-2", "root-file-path-x-y", "root-ref-my-def-1"} <= set(bodies)
    assert ls.gbnf_rule_name("...") == "x" and ls.gbnf_rule_name("Read.File_2") == "read-file-2"


def test_only_restricts_to_one_tool():
    grammar = ls.call_grammar(TOOLS, "qwen", only="get-weather2")
    bodies = rule_bodies(grammar)
    assert bodies["call"] == "call-0"
    assert "get-weather2" in bodies["call-0"] and "read.file" not in grammar
    with pytest.raises(ValueError):
        ls.call_grammar(TOOLS, "qwen", only="missing")
    with pytest.raises(ValueError):
        ls.call_grammar({}, "qwen")


def test_gbnf_literal_escapes():
    assert ls.gbnf_literal('a"b\\c\n\x01é') == '"a\\"b\\\\c\\n\\x01é"'
    assert ls.json_literal({"k": ["v"]}) == '"{\\"k\\": [\\"v\\"]}"'


# ---- what the grammars accept ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_grammar_accepts_exactly(name):
    schema, good, bad = SCHEMAS[name]
    recognizer = Recognizer(ls.schema_grammar(schema))
    assert [text for text in good if not recognizer.accepts(text)] == []
    assert [text for text in bad if recognizer.accepts(text)] == []


def test_whitespace_is_bounded():
    recognizer = Recognizer(ls.schema_grammar(None))
    assert recognizer.accepts('{\n' + " " * 20 + '"a": 1}')
    assert not recognizer.accepts('{\n' + " " * 21 + '"a": 1}')
    assert not recognizer.accepts('{\n\n"a": 1}') and not recognizer.accepts('{  "a": 1}')


def call(name, args, key="arguments"):
    return json.dumps({"name": name, key: args})


HERMES = "<tool_call>\n{}\n</tool_call>"
READ_CALL, WEATHER_CALL = call("read.file", {"path": "a.txt"}), call("get-weather2", {"city": "Oslo", "days": 2})
CALLS = [   # (family, parallel, text, accepted)
    ("qwen", False, HERMES.format(READ_CALL), True),
    ("qwen", False, HERMES.format(call("noop", {"any": [1]})), True),
    ("qwen", False, HERMES.format(call("read.file", {"path": "a", "lines": [1, 2, 3]})), True),
    ("qwen", False, HERMES.format(call("read.file", {"path": "a", "lines": [1, 2, 3, 4]})), False),
    ("qwen", False, HERMES.format(call("read.file", {"city": "Oslo", "days": 2})), False),   # B's args
    ("qwen", False, HERMES.format(call("get-weather2", {"path": "a.txt"})), False),
    ("qwen", False, HERMES.format(call("delete", {})), False),
    ("qwen", False, HERMES.format(READ_CALL) + "\n" + HERMES.format(WEATHER_CALL), False),
    ("qwen", True, HERMES.format(READ_CALL) + "\n" + HERMES.format(WEATHER_CALL), True),
    ("qwen", True, "\n".join([HERMES.format(READ_CALL)] * ls.MAX_GRAMMAR_CALLS), True),
    ("qwen", True, "\n".join([HERMES.format(READ_CALL)] * (ls.MAX_GRAMMAR_CALLS + 1)), False),
    ("chatml", True, HERMES.format(json.dumps({"name": "noop", "arguments": {}}, indent=2)), True),
    ("gemma", True, HERMES.format(READ_CALL), True),                  # unknown family: Hermes
    ("qwen", True, HERMES.format(READ_CALL) + "\n", False),
    ("qwen", True, READ_CALL, False),
    ("llama3", True, call("read.file", {"path": "a"}, "parameters"), True),
    ("llama3", True, call("read.file", {"path": "a"}, "parameters") + "\n" + call("noop", {}, "parameters"),
     True),
    ("llama3", False, call("read.file", {"path": "a"}, "parameters") + "\n" + call("noop", {}, "parameters"),
     False),
    ("llama3", True, READ_CALL, False),                               # "arguments" is not llama3's
    ("mistral", True, f"[TOOL_CALLS][{READ_CALL}, {WEATHER_CALL}]", True),
    ("mistral", False, f"[TOOL_CALLS][{READ_CALL}]", True),
    ("mistral", False, f"[TOOL_CALLS][{READ_CALL}, {WEATHER_CALL}]", False),
    ("mistral", True, "[TOOL_CALLS][]", False),
    ("mistral", True, READ_CALL, False),
]


@pytest.mark.parametrize("family, parallel, text, accepted", CALLS)
def test_call_grammar_accepts_exactly(family, parallel, text, accepted):
    assert Recognizer(ls.call_grammar(TOOLS, family, parallel)).accepts(text) is accepted


def test_only_grammar_refuses_other_tools():
    recognizer = Recognizer(ls.call_grammar(TOOLS, "qwen", only="get-weather2"))
    assert recognizer.accepts(HERMES.format(WEATHER_CALL))
    assert not recognizer.accepts(HERMES.format(READ_CALL))


# ---- llama.cpp -------------------------------------------------------------------------------------

COMPILE_SCRIPT = """
import json, sys
import llama_cpp as L
model_path, jobs = sys.argv[1], json.load(open(sys.argv[2]))
L.llama_backend_init()
params = L.llama_model_default_params()
params.vocab_only = True
model = L.llama_model_load_from_file(model_path.encode(), params)
vocab = L.llama_model_get_vocab(model)
compiled = []
for text in jobs:
    sampler = L.llama_sampler_init_grammar(vocab, text.encode(), b"root")   # NULL when it fails
    compiled.append(bool(sampler))
    if sampler:
        L.llama_sampler_free(sampler)
print(json.dumps(compiled))
"""

GENERATE_SCRIPT = """
import json, sys
from llama_cpp import Llama, LlamaGrammar
model_path, jobs = sys.argv[1], json.load(open(sys.argv[2]))
llm = Llama(model_path, n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
out = []
for job in jobs:
    reply = llm.create_completion(job["prompt"], grammar=LlamaGrammar.from_string(job["grammar"]),
                                  max_tokens=job["max_tokens"], temperature=0.8, seed=job["seed"])
    out.append({"text": reply["choices"][0]["text"], "finish": reply["choices"][0]["finish_reason"]})
print(json.dumps(out))
"""


@pytest.fixture(scope="session")
def llama_site() -> Path:
    """The llama-cpp-python build's site folder: the one in $LOCAL_SWARM_TEST_BUILDS (a builds
    folder made by another checkout) when set, else the daemon's own (llama_builds/ next to
    local_swarm.py), built now when missing exactly as the daemon's first start builds it."""
    hw = ls.detect_hardware()
    given = os.environ.get("LOCAL_SWARM_TEST_BUILDS")
    if given:
        if not ls.build_ready(Path(given), hw):
            pytest.fail(f"$LOCAL_SWARM_TEST_BUILDS={given} holds no current build {ls.build_key(hw)}")
        return ls.build_info(Path(given), hw).site
    return ls.ensure_build(ls.DEFAULT_BUILDS_DIR, hw).site


def run_llama(site: Path, script: str, model: Path, jobs: list, tmp_path: Path, timeout: float = 300):
    """Run `script` MODEL JOBS.json under the build; returns its JSON answer (last stdout line)."""
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps(jobs), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", script, str(model), str(jobs_file)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.e2e  # the real llama.cpp build and SmolLM2
def test_llama_cpp_compiles_every_grammar(llama_site, smol_model_path, tmp_path):
    grammars = all_grammars()
    broken = {"undefined rule": "root ::= nothing-here\n", "left recursion": "root ::= root \"a\" | \"a\"\n"}
    compiled, stderr = run_llama(llama_site, COMPILE_SCRIPT, smol_model_path,
                                 list(grammars.values()) + list(broken.values()), tmp_path)
    assert compiled[len(grammars):] == [False, False], "the check does not detect failures"
    failed = [name for name, ok in zip(grammars, compiled) if not ok]
    assert failed == [], stderr[-3000:]


def prompt(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def fits_weather(args: dict) -> bool:
    return (set(args) <= {"city", "unit", "days"} and {"city", "days"} <= set(args)
            and isinstance(args["city"], str) and len(args["city"]) <= 12
            and type(args["days"]) is int and args.get("unit", "c") in ("c", "f"))


def fits_enum_integer_array(value: dict) -> bool:
    tags = value.get("tags", ["t"])
    return (set(value) <= {"color", "n", "tags"} and value["color"] in ("red", "green")
            and type(value["n"]) is int and isinstance(tags, list) and 1 <= len(tags) <= 2
            and all(isinstance(tag, str) for tag in tags))


@pytest.mark.e2e  # the real llama.cpp build and SmolLM2
def test_smollm2_output_fits_the_grammar(llama_site, smol_model_path, tmp_path):
    tools = {"read.file": {"type": "object", "properties": {"path": {"type": "string", "maxLength": 16}},
                           "required": ["path"]}, "get-weather2": WEATHER}
    jobs = [
        {"grammar": ls.call_grammar(tools, "qwen", parallel=False), "max_tokens": 80, "seed": 1,
         "prompt": prompt("What is the weather in Paris for 3 days? Use a tool.")},
        {"grammar": ls.schema_grammar(SCHEMAS["enum_integer_array"][0]), "max_tokens": 120, "seed": 2,
         "prompt": prompt("Give a color, a number and tags as JSON.")},
        {"grammar": ls.schema_grammar(None), "max_tokens": 120, "seed": 3,
         "prompt": prompt("Describe a cat as a JSON object with two short fields.")},
    ]
    replies, _ = run_llama(llama_site, GENERATE_SCRIPT, smol_model_path, jobs, tmp_path)
    texts = [reply["text"] for reply in replies]
    assert [reply["finish"] for reply in replies] == ["stop"] * 3, texts
    assert texts[0].startswith("<tool_call>\n") and texts[0].endswith("\n</tool_call>"), texts[0]
    called = json.loads(texts[0][len("<tool_call>\n"):-len("\n</tool_call>")])
    assert set(called) == {"name", "arguments"}
    if called["name"] == "get-weather2":
        assert fits_weather(called["arguments"]), called
    else:
        assert called["name"] == "read.file" and set(called["arguments"]) == {"path"}, called
    assert fits_enum_integer_array(json.loads(texts[1])), texts[1]
    assert isinstance(json.loads(texts[2]), dict), texts[2]
