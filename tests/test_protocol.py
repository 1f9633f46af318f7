"""The server's request models (herd/serve/protocol.py): what they accept, and the OpenAI-shaped
error each refusal becomes (status, the field named in `param`, a message that says what is wrong)."""

import pytest

from herd.serve.protocol import (ApiError, ChatChunk, ChatRequest, ChunkChoice, CompletionRequest, Delta, Message,
                                 parse)

MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("fields, param, message", [
    ({"n": 9}, "n", "'n' must be in [1, 8], got 9"),
    ({"n": True}, "n", "'n' must be an integer, got true"),
    ({"max_tokens": 0}, "max_tokens", "'max_tokens' must be in [1, inf], got 0"),
    ({"max_tokens": 1e308}, "max_tokens", "'max_tokens' must be an integer, got 1e+308"),
    ({"max_tokens": "10"}, "max_tokens", "'max_tokens' must be an integer, got \"10\""),
    ({"temperature": "hot"}, "temperature", "'temperature' must be a number, got \"hot\""),
    ({"temperature": 2.5}, "temperature", "'temperature' must be in [0, 2], got 2.5"),
    ({"top_p": 0}, "top_p", "'top_p' must be in (0, 1], got 0"),
    ({"seed": 2 ** 70}, "seed", "'seed' must be in [-9223372036854775808, 18446744073709551616)"),
    ({"stop": [""]}, "stop", "'stop' must be a non-empty string or a list of at most 4 of them"),
    ({"stop": list("abcde")}, "stop", "at most 4"),
    ({"logprobs": "yes"}, "logprobs", "'logprobs' must be true or false"),
    ({"top_logprobs": 3}, "top_logprobs", "'top_logprobs' needs 'logprobs': true"),
    ({"presence_penalty": 2.5}, "presence_penalty", "'presence_penalty' must be in [-2, 2], got 2.5"),
    ({"frequency_penalty": "lots"}, "frequency_penalty", "'frequency_penalty' must be a number"),
    ({"repetition_penalty": 0}, "repetition_penalty", "'repetition_penalty' must be in (0, 10], got 0"),
    ({"logit_bias": {"1": 500}}, "logit_bias", "'logit_bias' values must be numbers in [-100, 100], got 500"),
    ({"logit_bias": {"one": 5}}, "logit_bias", "'logit_bias' keys must be token ids"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", "'logit_bias' has 1025 entries; at most 1024"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls", "false is not supported"),
    ({"tool_choice": "always"}, "tool_choice", "'tool_choice' must be 'auto', 'none', 'required'"),
    ({"tools": {"a": 1}}, "tools", "'tools' must be a list of tool definitions"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with 'stream': true"),
    ({"response_format": {"type": "yaml"}}, "response_format",
     "'response_format' type must be 'text', 'json_object' or 'json_schema', got \"yaml\""),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}, "response_format",
     "'response_format' json_schema must be an object with a 'schema' object"),
    ({"frobnicate": 1, "x": 2}, "frobnicate", "'frobnicate' is not supported; nor 1 more field(s)"),
    ({"messages": []}, "messages", "'messages' must be a non-empty list of messages"),
    ({"messages": "hi"}, "messages", "'messages' must be a non-empty list of messages"),
])
def test_chat_request_refusals_name_the_field(fields, param, message):
    with pytest.raises(ApiError) as e:
        parse(ChatRequest, {"messages": MSGS, **fields})
    assert e.value.status == 400 and e.value.param == param and message in e.value.message


def test_a_chat_request_is_typed_and_keeps_what_was_left_out_unset():
    r = parse(ChatRequest, {"model": "m", "messages": MSGS, "temperature": 1, "stop": "END", "n": 2})
    assert r.temperature == 1.0 and r.stop == ["END"] and r.n == 2
    assert r.top_p is None and r.max_tokens is None and r.tool_choice == "auto"  # the server's defaults apply


@pytest.mark.parametrize("fields, param", [
    ({"prompt": ""}, "prompt"), ({"prompt": [True]}, "prompt"), ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"), ({}, "prompt"),
])
def test_completion_request_refusals(fields, param):
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, fields)
    assert e.value.status == 400 and e.value.param == param


def test_a_batch_of_one_prompt_is_that_prompt():
    assert parse(CompletionRequest, {"prompt": ["x"]}).prompt == "x"
    assert parse(CompletionRequest, {"prompt": [[1, 2]]}).prompt == [1, 2]


def test_response_bodies_have_openais_shape():
    assert Message(content="hi").model_dump() == {"role": "assistant", "content": "hi"}
    chunk = ChatChunk(id="c", created=1, model="m", choices=[ChunkChoice(index=0, delta=Delta(content="x"))])
    assert chunk.model_dump() == {"id": "c", "created": 1, "model": "m", "object": "chat.completion.chunk",
                                  "choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": None,
                                               "finish_reason": None}]}
