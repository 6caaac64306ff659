"""Chat API: request validation, message normalisation, chunk framing, auth and routing,
as pure functions (the same paths run against real workers in test_e2e.py)."""
from __future__ import annotations

import json

import pytest

import local_swarm as ls


def body(**kw):
    return {"messages": [{"role": "user", "content": "hi"}], **kw}


@pytest.mark.parametrize("extra,sampling", [
    ({}, {}),
    ({"temperature": 0}, {"temperature": 0}),
    ({"temperature": 1.5, "top_p": 0.9}, {"temperature": 1.5, "top_p": 0.9}),
    ({"max_tokens": 10}, {"max_tokens": 10}),
    ({"max_completion_tokens": 7, "max_tokens": 10}, {"max_tokens": 7}),
    ({"stop": "\n"}, {"stop": ["\n"]}),
    ({"stop": ["a", "b"]}, {"stop": ["a", "b"]}),
    ({"seed": 42}, {"seed": 42}),
    ({"top_k": 20, "min_p": 0.1, "repeat_penalty": 1.1},          # llama.cpp's own fields
     {"top_k": 20, "min_p": 0.1, "repeat_penalty": 1.1}),
    ({"logit_bias": {"15043": -100, "7": 2.5}}, {"logit_bias": {"15043": -100.0, "7": 2.5}}),
    ({"logit_bias": {}}, {}),
    ({"temperature": None, "user": "x", "logprobs": False, "metadata": {"a": "b"}}, {}),
])
def test_sampling_fields_pass_validation(extra, sampling):
    assert ls.parse_chat_request(body(**extra)).sampling == sampling


@pytest.mark.parametrize("extra,param", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.1}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": 10 ** 30}, "max_tokens"), ({"seed": 2 ** 70}, "seed"),
    ({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"), ({"stop": 3}, "stop"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"stream": 1}, "stream"),
    ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"min_p": 2}, "min_p"),
    ({"repeat_penalty": 0}, "repeat_penalty"), ({"repeat_penalty": "1.1"}, "repeat_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"), ({"logit_bias": {"5": True}}, "logit_bias"),
    ({"stream_options": []}, "stream_options"),
    ({"stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 1.5}, "n"), ({"tools": {"a": 1}}, "tools"),
    ({"swarm": {"explain": "yes"}}, "swarm.explain"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": 3}}]}, "tools"),
])
def test_bad_fields_name_the_param(extra, param):
    with pytest.raises(ls.HTTPError) as info:
        ls.parse_chat_request(body(**extra))
    assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize("msg,expected", [
    ({"role": "user", "content": "x"}, {"role": "user", "content": "x"}),
    ({"role": "assistant", "content": None}, {"role": "assistant", "content": ""}),
    ({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
     {"role": "user", "content": "a\nb"}),
    ({"role": "developer", "content": "rules"}, {"role": "system", "content": "rules"}),
    ({"role": "tool", "content": "42", "tool_call_id": "call_1"},
     {"role": "tool", "content": "42", "tool_call_id": "call_1"}),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function",
         "function": {"name": "read", "arguments": '{"path": "a"}'}}]},
     {"role": "assistant", "content": "", "tool_calls": [
         {"id": "c", "type": "function", "function": {"name": "read", "arguments": {"path": "a"}}}]}),
    ({"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "ls", "arguments": ""}}]},
     {"role": "assistant", "content": "", "tool_calls": [
         {"id": "call_0", "type": "function", "function": {"name": "ls", "arguments": {}}}]}),
])
def test_messages_normalised_for_templates(msg, expected):
    assert ls.normalize_message(msg, 0) == expected


@pytest.mark.parametrize("payload", [None, 3, "x", [], {"messages": None}, {"messages": [3]},
                                     {"messages": [{"content": "no role"}]}])
def test_bad_shapes_are_400(payload):
    with pytest.raises(ls.HTTPError) as info:
        ls.parse_chat_request(payload)
    assert info.value.status == 400 and info.value.body()["error"]["type"] == "invalid_request_error"


def test_include_usage_and_stream_flags():
    req = ls.parse_chat_request(body(stream=True, stream_options={"include_usage": True}))
    assert req.stream and req.include_usage


def test_chunk_frames_are_valid_openai_chunks():
    frame = ls.ChunkFrame("chatcmpl-1", 123, "m", include_usage=True)
    events = [frame.role(), frame.content('he said "hi"\n'), frame.finish("length"),
              frame.usage({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})]
    parsed = []
    for raw in events:
        assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
        parsed.append(json.loads(raw[6:]))
    assert all(p["id"] == "chatcmpl-1" and p["object"] == "chat.completion.chunk" for p in parsed)
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert parsed[1]["choices"][0]["delta"]["content"] == 'he said "hi"\n'
    assert parsed[2]["choices"][0]["finish_reason"] == "length"
    assert parsed[3]["choices"] == [] and parsed[3]["usage"]["total_tokens"] == 5
    assert [p["usage"] for p in parsed[:3]] == [None] * 3


def test_chunk_frames_without_usage_have_no_usage_field():
    frame = ls.ChunkFrame("c", 1, "m", include_usage=False)
    assert "usage" not in json.loads(frame.content("x")[6:])


SMOL_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_prompt_renderer_uses_the_template():
    r = ls.PromptRenderer(SMOL_TEMPLATE)
    out = r.render([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_renderer_falls_back_on_broken_template():
    r = ls.PromptRenderer("{{ raise_exception('no system role') }}")
    assert r.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb"
    assert ls.PromptRenderer("{% for %}").render([{"role": "user", "content": "a"}]) == "a"


class Req:
    def __init__(self, path="/v1/models", **headers):
        self.path = path
        self._h = {k.replace("_", "-"): v for k, v in headers.items()}

    def header(self, name, default=None):
        return self._h.get(name, default)


@pytest.mark.parametrize("headers,ok", [
    ({}, False), ({"authorization": "Bearer k1"}, True), ({"authorization": "bearer k1"}, True),
    ({"authorization": "Bearer k2"}, False), ({"authorization": "k1"}, False),
    ({"x_api_key": "k1"}, True), ({"x_api_key": "k1x"}, False),
])
def test_api_key_checks(headers, ok):
    if ok:
        ls.check_api_key(Req(**headers), "k1")
    else:
        with pytest.raises(ls.HTTPError) as info:
            ls.check_api_key(Req(**headers), "k1")
        assert info.value.status == 401 and info.value.type == "authentication_error"


def test_health_is_public_and_no_key_means_open():
    ls.check_api_key(Req("/health"), "k1")
    ls.check_api_key(Req("/v1/health"), "k1")
    ls.check_api_key(Req("/v1/models"), None)


# -- tools, tool_choice, response_format --------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "read", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}


@pytest.mark.parametrize("extra,choice,only,parallel", [
    ({}, "none", None, True),
    ({"tools": [TOOL]}, "auto", None, True),
    ({"tools": [TOOL], "tool_choice": "none"}, "none", None, True),
    ({"tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False},
     "required", None, False),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "read"}}},
     "function", "read", True),
])
def test_tool_choice_parsed(extra, choice, only, parallel):
    use = ls.parse_chat_request(body(**extra)).tool_use
    assert (use.choice, use.only, use.parallel) == (choice, only, parallel)
    assert use.active == (choice != "none") and use.forced == (choice in ("required", "function"))


@pytest.mark.parametrize("extra,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "write"}}},
     "tool_choice"),
    ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": []}}]}, "tools"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
     "response_format.json_schema"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]},
     "messages[0].tool_calls[0]"),
])
def test_bad_tool_fields_are_400(extra, param):
    with pytest.raises(ls.HTTPError) as info:
        ls.parse_chat_request(body(**extra))
    assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize("fmt,schema", [
    (None, None), ({"type": "text"}, None), ({"type": "json_object"}, {}),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}},
     {"type": "object"}),
])
def test_response_format_parsed(fmt, schema):
    extra = {} if fmt is None else {"response_format": fmt}
    assert ls.parse_chat_request(body(**extra)).response_schema == schema


@pytest.mark.parametrize("schema,problem", [
    ({"type": "hiccup"}, "schema.type must be one of"),
    ({"type": []}, "schema.type"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "schema.properties.a.type"),
    ({"properties": []}, "schema.properties must be an object"),
    ({"required": "a"}, "schema.required"),
    ({"enum": []}, "schema.enum"),
    ({"anyOf": [{"type": "string"}, 3]}, "schema.anyOf[1] must be an object or a boolean"),
    ({"type": "array", "items": {"type": "x"}}, "schema.items.type"),
    ({"maxLength": -1}, "schema.maxLength"),
    ({"$ref": 3}, "schema.$ref"),
])
def test_a_response_format_schema_that_is_not_json_schema_is_400(schema, problem):
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    with pytest.raises(ls.HTTPError) as info:
        ls.parse_chat_request(body(response_format=fmt))
    assert info.value.status == 400 and problem in info.value.message


@pytest.mark.parametrize("schema", [
    {}, {"type": ["string", "null"]}, {"type": "object", "properties": {"a": True},
                                       "additionalProperties": False, "title": "T"},
    {"$defs": {"x": {"type": "integer"}}, "items": [{"$ref": "#/$defs/x"}], "x-vendor": 1},
])
def test_valid_schemas_pass(schema):
    assert ls.schema_problem(schema) is None


def test_tools_become_an_instruction_for_templates_without_tools():
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "read a"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c", "type": "function", "function": {"name": "read",
                                                               "arguments": {"path": "a"}}}]},
               {"role": "tool", "content": "42", "tool_call_id": "c"}]
    out = ls.messages_with_tool_text(history, [TOOL])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(TOOL) in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content":
                      '<tool_call>\n{"name": "read", "arguments": {"path": "a"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    assert history[3]["role"] == "tool"                       # the request is not changed


@pytest.mark.parametrize("extra,asked", [
    ({}, None), ({"logprobs": False}, None), ({"logprobs": True}, 0),
    ({"logprobs": True, "top_logprobs": 3}, 3),
])
def test_logprobs_asked(extra, asked):
    assert ls.parse_chat_request(body(**extra)).logprobs == asked


def test_chunk_entries_from_either_workers_shape():
    native = {"logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "top_logprobs": [
        {"token": "Hi", "logprob": -0.1}, {"token": "Hello", "logprob": -2.5}]}]}}
    assert ls.chunk_entries(native, 1) == [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                                            "top_logprobs": [{"token": "Hi", "logprob": -0.1,
                                                              "bytes": [72, 105]}]}]
    legacy = {"logprobs": {"tokens": ["a"], "token_logprobs": [-1.0],
                           "top_logprobs": [{"a": -1.0, "b": -2.0}]}}
    [entry] = ls.chunk_entries(legacy, 2)
    assert entry["token"] == "a" and [t["token"] for t in entry["top_logprobs"]] == ["a", "b"]

