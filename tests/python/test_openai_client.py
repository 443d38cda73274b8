"""The OpenAI-compatible API through the official `openai` Python package, against the real
gateway binary and the real SmolLM2 model."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI


@pytest.fixture(scope="module")
def client(gateway) -> OpenAI:
    return OpenAI(base_url=f"{gateway}/v1", api_key="not-needed-without-API_KEYS", max_retries=0, timeout=120)


QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]


def test_streaming_chat_completion(client):
    stream = client.chat.completions.create(
        model="v1", messages=QUESTION, stream=True, max_tokens=24, temperature=0,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == "v1" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert "Berlin" in text
    assert with_choices[-1].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens >= len([c for c in with_choices if c.choices[0].delta.content])


def test_non_streaming_chat_completion(client):
    completion = client.chat.completions.create(model="v1", messages=QUESTION, max_tokens=24, temperature=0)
    assert completion.object == "chat.completion"
    assert "Berlin" in completion.choices[0].message.content
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0


def test_length_finish_and_system_messages(client):
    completion = client.chat.completions.create(
        model="v1", max_completion_tokens=3, temperature=0,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Describe the sea."}],
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3


COUNT = "1, 2, 3, 4, 5, 6, 7,"


def test_streaming_text_completion(client):
    stream = client.completions.create(model="v1", prompt=COUNT, stream=True, max_tokens=6, temperature=0,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "text_completion" and c.model == "v1" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].text for c in with_choices)
    assert text.startswith(" 8, 9"), text
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices


def test_non_streaming_text_completion_matches_the_stream(client):
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="v1", prompt=COUNT, stream=True, max_tokens=6, temperature=0) if c.choices)
    completion = client.completions.create(model="v1", prompt=COUNT, max_tokens=6, temperature=0)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == streamed
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 6


def test_text_completion_refuses_what_it_cannot_do(client):
    for extra in ({"n": 2}, {"echo": True}, {"logprobs": 2}, {"suffix": "end"}):
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="v1", prompt=COUNT, max_tokens=4, **extra)
        assert refused.value.status_code in (400, 422), extra
        assert refused.value.body["type"] == "invalid_request_error", extra
    with pytest.raises(openai.APIStatusError) as listed:
        client.completions.create(model="v1", prompt=[COUNT], max_tokens=4)
    assert listed.value.status_code in (400, 422)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="v9", prompt=COUNT)


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["v1", "v2"]


def test_errors_come_back_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="v9", messages=QUESTION)
    assert missing.value.body["code"] == "model_not_found"
    assert missing.value.body["type"] == "not_found_error"
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.chat.completions.create(model="v1", messages=QUESTION, temperature=5)
    assert "temperature" in bad.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="v1", messages=[])
