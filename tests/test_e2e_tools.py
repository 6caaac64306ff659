"""End to end: tool calls, tool_choice and response_format from real llama.cpp workers on
Qwen2.5-Coder-0.5B-Instruct (its template renders tools; its calls come back as text that the
swarm parses, and as grammar-constrained text where a call is required or the model starts one)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import openai
import pytest

from conftest import TOOLS_MODEL, start_swarm

pytestmark = pytest.mark.e2e  # every test runs a real Qwen swarm

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
READ = {"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the project and return its text",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                   "required": ["path"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def post(qwen, **body) -> dict:
    reply = httpx.post(qwen.url + "/v1/chat/completions", timeout=300,
                       json={"model": "local-swarm", "temperature": 0, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def only_call(reply: dict) -> tuple[str, dict]:
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert isinstance(call["function"]["arguments"], str)
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def test_auto_call_is_parsed_into_tool_calls(qwen_swarm):
    name, args = only_call(post(qwen_swarm, messages=ASK_WEATHER, tools=[WEATHER, READ]))
    assert name == "get_weather" and args["city"].lower() == "paris"


def test_a_question_needing_no_tool_gets_text(qwen_swarm):
    reply = post(qwen_swarm, messages=[{"role": "user", "content":
                                        "Write a Python one-liner that reverses a string s."}],
                 tools=[WEATHER], max_tokens=80)
    message = reply["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"]
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_to_a_tool_not_offered_is_not_turned_into_an_offered_one(qwen_swarm, stream):
    """Asked to translate, the 0.5B model starts a call named "good morning". get_weather is
    likely in its place (odds about 0.45) but names another thing: the reply stays the model's
    text, where the call grammar alone would have written get_weather(...) letter by letter."""
    body = {"messages": [{"role": "user", "content": "Translate 'good morning' to French"}],
            "tools": [WEATHER, READ], "max_tokens": 120}
    if stream:
        with httpx.stream("POST", qwen_swarm.url + "/v1/chat/completions", timeout=300,
                          json={"model": "local-swarm", "temperature": 0, "stream": True,
                                **body}) as reply:
            events = [json.loads(line[6:]) for line in reply.iter_lines()
                      if line.startswith("data: {")]
        deltas = [e["choices"][0]["delta"] for e in events if e.get("choices")]
        assert not any("tool_calls" in d for d in deltas)
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert "".join(d.get("content") or "" for d in deltas).strip()
        return
    choice = post(qwen_swarm, **body)["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")


def test_required_forces_a_valid_call_even_for_small_talk(qwen_swarm):
    name, args = only_call(post(qwen_swarm, tools=[READ], tool_choice="required",
                                messages=[{"role": "user", "content": "Hello! How are you?"}]))
    assert name == "read_file" and set(args) == {"path"} and isinstance(args["path"], str)


def test_named_choice_calls_that_function(qwen_swarm):
    name, args = only_call(post(qwen_swarm, messages=ASK_WEATHER, tools=[WEATHER, READ],
                                tool_choice={"type": "function",
                                             "function": {"name": "read_file"}}))
    assert name == "read_file" and isinstance(args["path"], str)


def test_tool_choice_none_never_calls(qwen_swarm):
    reply = post(qwen_swarm, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none",
                 max_tokens=60)
    assert "tool_calls" not in reply["choices"][0]["message"]
    assert reply["choices"][0]["finish_reason"] != "tool_calls"


def test_parallel_tool_calls_false_gives_one_call(qwen_swarm):
    reply = post(qwen_swarm, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                 messages=[{"role": "user", "content": "Weather in Paris, Rome and Oslo?"}])
    assert len(reply["choices"][0]["message"]["tool_calls"]) == 1


def test_streamed_call_deltas_field_by_field(qwen_swarm):
    body = {"model": "local-swarm", "temperature": 0, "stream": True, "messages": ASK_WEATHER,
            "tools": [WEATHER], "stream_options": {"include_usage": True}}
    with httpx.stream("POST", qwen_swarm.url + "/v1/chat/completions", json=body,
                      timeout=300) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant"
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls and all(isinstance(c, list) and len(c) == 1 for c in calls)
    first = calls[0][0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather" and first["function"]["arguments"] == ""
    for later in calls[1:]:
        assert later[0]["index"] == 0 and set(later[0]) == {"index", "function"}
        assert set(later[0]["function"]) == {"arguments"}
    args = json.loads("".join(c[0]["function"]["arguments"] for c in calls))
    assert args["city"].lower() == "paris"
    assert not any("tool_call>" in (d.get("content") or "") for d in deltas)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "tool_calls" and all(f is None for f in finish[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_openai_sdk_round_trips_a_call_and_its_result(qwen_swarm):
    client = openai.OpenAI(base_url=qwen_swarm.url + "/v1", api_key="unused", max_retries=0,
                           timeout=300)
    messages = list(ASK_WEATHER)
    first = client.chat.completions.create(model="local-swarm", messages=messages,
                                           tools=[WEATHER], temperature=0)
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"city": "Paris", "temperature_c": 31,
                                            "sky": "sunny"})})
    again = client.chat.completions.create(model="local-swarm", messages=messages,
                                           tools=[WEATHER], temperature=0, max_tokens=80)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert isinstance(again.choices[0].message.tool_calls or [], list)
    # The 0.5B model tends to call again rather than use the result (greedy and without a
    # repeat penalty it writes its call again as text even with calls ruled out); asked about
    # the result with calls ruled out, it answers from it, which proves the result reached its
    # prompt.
    asked = messages + [{"role": "user", "content": "Using the tool's result, tell me the "
                                                    "temperature in Paris in one sentence."}]
    answer = client.chat.completions.create(model="local-swarm", messages=asked,
                                            tools=[WEATHER], tool_choice="none", temperature=0,
                                            max_tokens=80)
    assert answer.choices[0].message.tool_calls is None
    assert "31" in answer.choices[0].message.content


def test_voted_calls_report_a_majority(qwen_swarm):
    reply = post(qwen_swarm, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                 temperature=0.7, swarm={"votes": 2})
    name, _ = only_call(reply)
    swarm = reply["swarm"]
    assert name == "get_weather" and swarm["strategy"] == "majority"
    assert swarm["samples"] == 2 and len(swarm["candidates"]) == 2


@pytest.mark.parametrize("fmt", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "person", "schema": {
        "type": "object", "properties": {"name": {"type": "string"},
                                         "age": {"type": "integer"}},
        "required": ["name", "age"]}}},
])
def test_response_format_gives_json(qwen_swarm, fmt):
    reply = post(qwen_swarm, response_format=fmt, max_tokens=120, messages=[
        {"role": "user", "content": "Invent a person. Reply in JSON with name and age."}])
    value = json.loads(reply["choices"][0]["message"]["content"])
    assert isinstance(value, dict)
    if fmt["type"] == "json_schema":
        assert isinstance(value["name"], str) and isinstance(value["age"], int)


def test_a_suffix_fills_in_the_middle_with_the_models_own_fim_tokens(qwen_swarm):
    """Qwen2.5-Coder has FIM tokens: with a suffix the swarm asks llama-server's /infill, whose
    prompt is <|fim_prefix|>PREFIX<|fim_suffix|>SUFFIX<|fim_middle|>; the openai SDK gets the
    middle as a completion."""
    client = openai.OpenAI(base_url=qwen_swarm.url + "/v1", api_key="x", max_retries=0,
                           timeout=300)
    reply = client.completions.create(model="local-swarm", prompt="def add(a, b):\n    return ",
                                      suffix="\n\nprint(add(1, 2))\n", max_tokens=8,
                                      temperature=0)
    middle = reply.choices[0].text
    assert "a" in middle and "b" in middle, middle
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 0
    pieces = list(client.completions.create(
        model="local-swarm", prompt="def add(a, b):\n    return ",
        suffix="\n\nprint(add(1, 2))\n", max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == middle   # greedy: the same
    assert pieces[-1].usage.completion_tokens == reply.usage.completion_tokens



def test_llama_cpps_infill_route_with_other_files_as_context(qwen_swarm):
    """A client configured for llama.cpp (Continue's llama.cpp provider, minuet-ai.nvim) posts
    /infill with the prefix, the suffix and other files; it gets llama.cpp's own shape, and the
    other files reach the prompt (it is longer by them)."""
    def infill(extra):
        reply = httpx.post(qwen_swarm.url + "/infill", timeout=300, json={
            "input_prefix": "from util import ", "input_suffix": "\n\nprint(GREETING)\n",
            "input_extra": extra, "n_predict": 6, "temperature": 0})
        assert reply.status_code == 200, reply.text
        return reply.json()
    alone = infill([])
    body = infill([{"filename": "util.py", "text": "GREETING = 'hello'\n" * 20}])
    assert body["stop"] is True and body["content"] and 0 < body["tokens_predicted"] <= 6
    assert body["tokens_evaluated"] >= alone["tokens_evaluated"] + 20 * 5


def _version_task():
    """bench/tools' multi-06: VERSION (1.4.2) was read; the next step writes 1.4.3 back."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import tools_tasks as tt
    task = next(t for t in tt.TASKS if t.id == "multi-06")
    return tt.messages_for(task), tt.tools_for(task)


@pytest.mark.parametrize("stream", [False, True])
def test_the_loop_guard_turns_a_second_read_into_the_next_step(qwen_swarm, stream):
    """Greedy, the 0.5B model reads VERSION again though its text is in the conversation (the
    guard off shows it); with the guard on it is asked again with the note, and writes 1.4.3."""
    # max_tokens bounds each answer, as bench/tools does: unbounded, the model writes calls after
    # calls (the next read, then writes of 1.4.2 ...) until the context is full
    messages, tools = _version_task()
    off = post(qwen_swarm, messages=messages, tools=tools, max_tokens=200,
               swarm={"loop_guard": False})
    assert only_call(off) == ("read_file", {"path": "VERSION"})
    client = openai.OpenAI(base_url=qwen_swarm.url + "/v1", api_key="x")
    if stream:
        chunks = list(client.chat.completions.create(
            model="local-swarm", messages=messages, tools=tools, temperature=0, stream=True,
            max_tokens=200))
        calls = [c.function for chunk in chunks for d in [chunk.choices[0].delta] if chunk.choices
                 for c in d.tool_calls or ()]
        assert [c.name for c in calls if c.name] == ["write_file"]
        args = json.loads("".join(c.arguments or "" for c in calls))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:
        reply = client.chat.completions.create(model="local-swarm", messages=messages,
                                               tools=tools, temperature=0, max_tokens=200)
        [call] = reply.choices[0].message.tool_calls
        assert call.function.name == "write_file"
        args = json.loads(call.function.arguments)
        swarm = reply.model_extra["swarm"]
        assert [(c["repeat"], c["again"], c["winner"]) for c in swarm["candidates"]] == \
            [(True, False, False), (False, True, True)]
    assert args["path"] == "VERSION" and args["content"].strip() == "1.4.3"


def test_a_default_vote_whose_anchor_rereads_votes_again_on_the_note(qwen_swarm):
    """The default request: the greedy anchor repeats the read, so no sample is drawn from that
    loop (they wait for the anchor's prompt, and are not sent); the vote runs on the note."""
    messages, tools = _version_task()
    reply = httpx.post(qwen_swarm.url + "/v1/chat/completions", timeout=600,
                       json={"model": "local-swarm", "messages": messages, "tools": tools,
                             "max_tokens": 200})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    name, args = only_call(body)
    assert name == "write_file" and args["content"].strip() == "1.4.3"
    first = [c for c in body["swarm"]["candidates"] if not c["again"]]
    assert [(c["greedy"], c["repeat"]) for c in first] == [(True, True)]
    assert all(not c["repeat"] for c in body["swarm"]["candidates"] if c["again"])


def test_calls_that_compute_the_same_number_vote_as_one():
    """bench/tools' calc-04 ("What is 15% of 240?"): the 0.5B model's samples write the
    calculator's expression in several ways (`0.15 * 240`, `15 * (240 / 100)`, `15/100 * 240`),
    and those of one value are one group of the vote. Keyed by spelling, this test's first seed
    voted [1, 1, 1, 1, 1] (the anchor's `15 / 240` wins such a tie); by value, [3, 1, 1] for 36.
    Through the default 8-slot daemon seeds 1-4 each gave such a group, and 36 won all four."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import tools_tasks as tt
    task = next(t for t in tt.TASKS if t.id == "calc-04")
    swarm5 = start_swarm("--model", TOOLS_MODEL, "--instances", "5", "--threads", "1",
                         "--ctx", "2048")                       # five slots: a vote of 5
    try:
        mixed = sum(_calc_vote(swarm5, task, tt, seed) for seed in (1, 2, 3))
    finally:
        swarm5.stop()
    assert mixed >= 1, "no vote had two spellings of one value to group"


def _calc_vote(swarm5, task, tt, seed: int) -> bool:
    """One default vote of 5 on calc-04: its groups are the candidates' calls by value (checked
    with Python's own arithmetic); True when a group holds two spellings of one value."""
    reply = httpx.post(swarm5.url + "/v1/chat/completions", timeout=600, json={
        "model": "local-swarm", "messages": tt.messages_for(task), "tools": tt.tools_for(task),
        "max_tokens": 100, "seed": seed, "swarm": {"votes": 5, "explain": True}})
    assert reply.status_code == 200, reply.text
    swarm = reply.json()["swarm"]
    groups: dict[tuple, list[str]] = {}
    for c in swarm["candidates"]:
        if [call["name"] for call in c["calls"]] != ["calculator"]:      # text, or another
            key, spelled = ("other", json.dumps(c["calls"]) if c["calls"] else ""), ""
        else:
            args = dict(c["calls"][0]["arguments"])
            spelled = str(args.pop("expression", ""))
            arithmetic = re.fullmatch(r"[\d.+\-*/() ]*[*/+(][\d.+\-*/() ]*", spelled)
            value = round(eval(spelled, {"__builtins__": {}}), 9) if arithmetic else spelled
            key = (value, json.dumps(args, sort_keys=True))
        groups.setdefault(key, []).append(spelled)
    assert sorted(swarm["votes"], reverse=True) == \
        sorted((len(g) for g in groups.values()), reverse=True), (swarm["votes"], groups)
    return any(len(set(g)) > 1 for g in groups.values())
