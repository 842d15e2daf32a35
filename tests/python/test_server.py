"""The OpenAI-compatible server, end to end: the official ``openai`` client (and raw httpx where a
client would not send what is tested) against a live uvicorn on a loopback socket, serving the
bundled family's three experts, compressed once for the module, through the engine.

Answers are cross-checked against an independent path: greedy completions equal what
``meswitch.serve.engine.generate`` (one sequence through a separate ``MultiExpertModel``) writes for
the same prompt, and the prompt token counts equal those of the expert's own tokenizer and
chat template (transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from meswitch.compress import CompressionSettings, compress
from meswitch.family import EXPERTS, family_dir

FAMILY = family_dir()
BASE = FAMILY / "base"
KEY = "test-key-1234"
CHAT_PROMPT = [{"role": "user", "content": "do you like hiking in the mountains?"}]
MATH_QUESTION = "Tara has 12 shells. Tara finds 9 more shells. How many shells does Tara have now?"
CODE_PROMPT = "def read_config(path):\n    \"\"\"Read the JSON config file at path and return it as a dict.\"\"\"\n"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """The three experts compressed once (2-bit, as ``meswitch serve`` does), plus artifacts for run-time adds."""
    root = tmp_path_factory.mktemp("server")
    out = {}
    for name in EXPERTS:
        out[name] = root / f"{name}.meswitch"
        compress(BASE, FAMILY / name, out[name], settings=CompressionSettings(bits=2), progress=False)
    for key, name in (("code2", "code2"), ("base-named", "base")):  # the code expert again, under other names
        out[key] = root / f"{key}.meswitch"
        compress(BASE, FAMILY / "code", out[key], settings=CompressionSettings(bits=2), progress=False, name=name)
    # an expert of another base: the math expert's weights stand in for a different base model
    out["foreign"] = root / "foreign.meswitch"
    compress(FAMILY / "math", FAMILY / "code", out["foreign"], settings=CompressionSettings(bits=2), progress=False,
             name="foreign")
    return out


class LiveServer:
    """uvicorn serving the app on a real loopback socket, in a background thread."""

    def __init__(self, service) -> None:
        from meswitch.serve.server.launch import bind, url_of, uvicorn_server

        self.service = service
        self.sock = bind("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = uvicorn_server(service.app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the server did not stop"
        self.service.close()
        self.sock.close()


@pytest.fixture(scope="module")
def live(artifacts):
    from meswitch.serve.server.launch import open_service

    service = open_service(BASE, [artifacts[name] for name in EXPERTS], host_budget="64MB", kv_cache_bytes=8 << 20,
                           max_running=16, api_key=KEY, report=lambda line: None)
    server = LiveServer(service)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def raw(live):
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def hf_tokenizer(artifacts):
    """Each expert's own tokenizer, loaded by transformers (an independent path from the server's)."""
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(artifacts[name] / "expert") for name in EXPERTS}


def _end_ids(tokenizer) -> set[int]:
    """The bundled chat expert's end tokens, named by hand: its EOS and the ``<|end|>`` its template ends turns with."""
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end != tokenizer.unk_token_id
    return {tokenizer.eos_token_id, end}


def _samples(text: str) -> dict[str, float]:
    """The samples of a Prometheus exposition (read by prometheus_client's parser), keyed
    ``name{label="value",...}`` with the labels sorted."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.fixture(scope="module")
def reference(artifacts):
    """An independent path: one sequence at a time through its own multi-expert model."""
    from meswitch.serve import MultiExpertModel

    return MultiExpertModel(BASE, {name: artifacts[name] for name in EXPERTS}, kv_cache_bytes=8 << 20)


def _engine_idle(live, timeout: float = 20) -> dict:
    """The engine's stats once nothing runs or waits (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = live.service.engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]:
            return stats
        assert time.monotonic() < deadline, f"the engine did not become idle: {stats}"
        time.sleep(0.05)


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert error["param"] == param, error
    return error


# -- the endpoints -----------------------------------------------------------------------------


def test_models_lists_each_expert_auto_and_base(client):
    ids = [model.id for model in client.models.list()]
    assert ids == ["chat", "code", "math", "auto", "base"]


def test_health_and_metrics_need_no_key(live):
    health = httpx.get(f"{live.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["experts"] == ["chat", "code", "math"]
    metrics = httpx.get(f"{live.url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "meswitch_kv_blocks_total" in metrics.text


def test_chat_uses_the_experts_chat_template(client, hf_tokenizer):
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=CHAT_PROMPT, max_tokens=12,
                                                           temperature=0)
    reply = raw.parse()
    assert raw.headers["x-meswitch-expert"] == "chat" and reply.model == "chat"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason in ("stop", "length")
    tokenizer = hf_tokenizer["chat"]
    assert tokenizer.chat_template  # chat_template.jinja, carried in the artifact
    templated = tokenizer.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True)
    assert templated.endswith("<|assistant|>")
    assert reply.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert 1 <= reply.usage.completion_tokens <= 12


def test_chat_without_a_template_uses_the_plain_format_and_matches_the_reference(client, hf_tokenizer, reference):
    from meswitch.serve.engine.generate import generate

    reply = client.chat.completions.create(model="math", messages=[{"role": "user", "content": MATH_QUESTION}],
                                           max_completion_tokens=24, temperature=0)
    tokenizer = hf_tokenizer["math"]
    assert not getattr(tokenizer, "chat_template", None)
    assert reply.usage.prompt_tokens == len(tokenizer(MATH_QUESTION + "\n")["input_ids"])
    expected = generate(reference, "math", MATH_QUESTION + "\n", max_tokens=24)
    assert reply.choices[0].message.content == expected and expected.strip()


def test_completion_matches_the_reference(client, reference):
    from meswitch.serve.engine.generate import generate

    raw = client.completions.with_raw_response.create(model="code", prompt=CODE_PROMPT, max_tokens=20, temperature=0)
    reply = raw.parse()
    assert raw.headers["x-meswitch-expert"] == "code" and reply.model == "code" and reply.object == "text_completion"
    assert reply.choices[0].text == generate(reference, "code", CODE_PROMPT, max_tokens=20)
    base = client.completions.create(model="base", prompt="The river runs past the old mill and", max_tokens=8,
                                     temperature=0)
    assert base.model == "base"
    assert base.choices[0].text == generate(reference, None, "The river runs past the old mill and", max_tokens=8)


def test_completion_with_token_ids_and_several_prompts(client, hf_tokenizer):
    tokenizer = hf_tokenizer["math"]
    ids = tokenizer(MATH_QUESTION + "\n")["input_ids"]
    by_ids = client.completions.create(model="math", prompt=ids, max_tokens=10, temperature=0)
    by_text = client.completions.create(model="math", prompt=MATH_QUESTION + "\n", max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = client.completions.create(model="math", prompt=[MATH_QUESTION + "\n", "Sam has 4 apples.\n"],
                                     max_tokens=10, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == by_text.choices[0].text
    assert both.usage.prompt_tokens == by_text.usage.prompt_tokens + len(tokenizer("Sam has 4 apples.\n")["input_ids"])


def test_seeded_sampling_repeats_and_other_seeds_differ(client, reference):
    from meswitch.serve.engine.generate import generate

    prompt = "<|user|>tell me about your day<|end|>\n<|assistant|>"

    def sample(seed: int) -> str:
        reply = client.completions.create(model="chat", prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.9,
                                          seed=seed, extra_body={"top_k": 40, "ignore_eos": True})
        assert reply.usage.completion_tokens == 16
        return reply.choices[0].text

    seeded = {seed: sample(seed) for seed in (7, 8, 9, 10)}
    assert sample(7) == seeded[7]
    # 16 tokens drawn from the filtered distribution: four seeds agreeing would mean the seed is ignored
    assert len(set(seeded.values())) == 4, seeded
    # the seed seeds the draws themselves: without filters, the same draws as an independent sampler
    unfiltered = client.completions.create(model="chat", prompt=prompt, max_tokens=12, temperature=0.8, seed=3)
    assert unfiltered.choices[0].text == generate(reference, "chat", prompt, max_tokens=12, temperature=0.8, seed=3)


def test_a_stop_string_ends_the_text_just_before_it(client):
    full = client.completions.create(model="code", prompt=CODE_PROMPT, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    for stop in ("\n", full[12:16]):  # a newline, and four characters from the middle of the text
        assert stop in full[1:], (stop, full)
        stopped = client.completions.create(model="code", prompt=CODE_PROMPT, max_tokens=40, temperature=0,
                                            stop=["never written", stop], extra_body={"ignore_eos": True})
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == full[:full.index(stop)]
    long = client.completions.create(model="code", prompt=CODE_PROMPT, max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 5 and long.choices[0].finish_reason == "length"


def test_a_chat_reply_ends_with_its_turn(client, hf_tokenizer, reference):
    """The bundled chat expert ends a turn with ``<|end|>``, which is not its EOS: the reply stops there
    (finish_reason "stop"), without the next turns it would otherwise go on to invent."""
    from meswitch.serve.engine.generate import generate

    tokenizer = hf_tokenizer["chat"]
    templated = tokenizer.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True)
    expected = generate(reference, "chat", templated, max_tokens=200, stop_token_ids=_end_ids(tokenizer))
    reply = client.chat.completions.create(model="chat", messages=CHAT_PROMPT, max_tokens=200, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and reply.usage.completion_tokens < 200
    assert choice.message.content == expected and expected.strip()
    assert "<|" not in choice.message.content  # special tokens are never shown
    # past its end of turn the expert writes more (the next turns): the reply is a strict prefix of that
    on = client.chat.completions.create(model="chat", messages=CHAT_PROMPT, temperature=0,
                                        max_tokens=reply.usage.completion_tokens + 30, extra_body={"ignore_eos": True})
    assert on.choices[0].finish_reason == "length"
    assert on.choices[0].message.content.startswith(choice.message.content)
    assert on.choices[0].message.content[len(choice.message.content):].strip()

    # a client's own stop string naming the special token ends the reply at it too
    stopped = client.chat.completions.create(model="chat", messages=CHAT_PROMPT, max_tokens=200, temperature=0,
                                             stop=["<|end|>"], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == expected
    streamed = client.chat.completions.create(model="chat", messages=CHAT_PROMPT, max_tokens=200, temperature=0,
                                              stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


# -- streaming ---------------------------------------------------------------------------------


def test_chat_stream_is_openai_chunks_ending_in_done(client, raw):
    stream = client.chat.completions.create(model="chat", messages=CHAT_PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    assert stream.response.headers["x-meswitch-expert"] == "chat"
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == "chat" and c.id == chunks[0].id for c in chunks)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="chat", messages=CHAT_PROMPT, max_tokens=16, temperature=0)
    assert streamed == whole.choices[0].message.content

    # the wire format itself: data lines of JSON, then data: [DONE]
    body = {"model": "math", "messages": [{"role": "user", "content": MATH_QUESTION}], "max_tokens": 6,
            "temperature": 0, "stream": True}
    with raw.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert set(first) == {"id", "object", "created", "model", "choices"}  # no usage unless asked for
    assert first["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] in ("stop", "length")


def test_completion_stream_matches_the_whole_answer(client):
    whole = client.completions.create(model="code", prompt=CODE_PROMPT, max_tokens=20, temperature=0)
    stream = client.completions.create(model="code", prompt=CODE_PROMPT, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert all(c.object == "text_completion" and c.model == "code" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_client_leaving_mid_stream_frees_its_slot_and_kv_blocks(client, live):
    _engine_idle(live)
    stream = client.completions.create(model="math", prompt=MATH_QUESTION, max_tokens=400, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for received, _ in enumerate(stream, start=1):
        if received == 3:
            break
    stats = live.service.engine.stats()
    assert stats["running"] + stats["waiting"] == 1 and stats["kv_blocks_free"] < stats["kv_blocks_total"]
    stream.close()  # the connection closes with ~390 tokens still to come
    stats = _engine_idle(live)
    assert stats["tokens_generated_total"].get("math", 0) < 400
    finished = httpx.get(f"{live.url}/metrics", timeout=10).text
    assert 'meswitch_requests_finished_total{expert="math",finish_reason="cancelled"}' in finished


def test_a_client_leaving_a_plain_request_cancels_it(live):
    _engine_idle(live)
    body = {"model": "code", "prompt": CODE_PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{live.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    stats = _engine_idle(live)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    metrics = httpx.get(f"{live.url}/metrics", timeout=10).text
    assert 'meswitch_requests_finished_total{expert="code",finish_reason="cancelled"}' in metrics


# -- routing ------------------------------------------------------------------------------------


def test_auto_routes_math_to_math_and_code_to_code(client):
    math = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": MATH_QUESTION}], max_tokens=4, temperature=0)
    assert math.headers["x-meswitch-expert"] == "math" and math.parse().model == "math"
    code = client.completions.with_raw_response.create(model="auto", prompt=CODE_PROMPT, max_tokens=4, temperature=0)
    assert code.headers["x-meswitch-expert"] == "code" and code.parse().model == "code"


def test_auto_below_the_threshold_goes_to_the_fallback(client, live):
    router = live.service.router
    query = "compute the total"  # the bundled router is unsure (0.63 < its threshold 0.80)
    routed = router.route(query)
    assert routed.fallback and routed.expert == router.fallback == "chat"  # the general expert, not the base
    reply = client.completions.with_raw_response.create(model="auto", prompt=query, max_tokens=3, temperature=0)
    assert reply.headers["x-meswitch-expert"] == "chat" and reply.parse().model == "chat"


# -- experts at run time -------------------------------------------------------------------------


def test_experts_are_added_and_removed_at_run_time(client, raw, artifacts):
    added = raw.post("/v1/experts", json={"path": str(artifacts["code2"])})
    assert added.status_code == 201 and added.json()["id"] == "code2"
    assert "code2" in [m.id for m in client.models.list()]
    reply = client.completions.create(model="code2", prompt=CODE_PROMPT, max_tokens=6, temperature=0)
    same = client.completions.create(model="code", prompt=CODE_PROMPT, max_tokens=6, temperature=0)
    assert reply.model == "code2" and reply.choices[0].text == same.choices[0].text  # the same expert, renamed

    assert "already served" in _error(raw.post("/v1/experts", json={"path": str(artifacts["code2"])}), 409,
                                      "path")["message"]
    assert "may not be named 'base'" in _error(raw.post("/v1/experts", json={"path": str(artifacts["base-named"])}),
                                               400, "path")["message"]
    assert "manifest.json" in _error(raw.post("/v1/experts", json={"path": str(BASE)}), 400, "path")["message"]
    assert "base" in _error(raw.post("/v1/experts", json={"path": str(artifacts["foreign"])}), 400,
                            "path")["message"]
    _error(raw.post("/v1/experts", json={}), 400, "path")

    # refused while a request uses it
    stream = client.completions.create(model="code2", prompt=CODE_PROMPT, max_tokens=300, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    assert "1 request(s) use it" in _error(raw.delete("/v1/experts/code2"), 409)["message"]
    stream.close()
    removed = raw.delete("/v1/experts/code2")  # at once: the store drains the engine's last hold
    assert removed.status_code == 200 and removed.json()["deleted"] is True, removed.text
    assert "code2" not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="code2", prompt="x", max_tokens=2)
    _error(raw.delete("/v1/experts/code2"), 404)
    _error(raw.delete("/v1/experts/base"), 400)


def test_expert_changes_need_the_key(live, artifacts):
    assert httpx.post(f"{live.url}/v1/experts", json={"path": str(artifacts["code2"])}, timeout=10).status_code == 401
    assert httpx.delete(f"{live.url}/v1/experts/math", timeout=10).status_code == 401


# -- bad input ---------------------------------------------------------------------------------


def test_unknown_model_is_404_with_an_openai_error(client, raw):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=CHAT_PROMPT)
    assert caught.value.code == "model_not_found"
    error = _error(raw.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert "'nope' does not exist" in error["message"] and "chat, code, math, auto, base" in error["message"]


def test_wrong_or_missing_key_is_401(live):
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{live.url}/v1/models", headers=headers, timeout=10)
        assert _error(response, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(("body", "param", "text"), [
    ({"model": "chat", "messages": CHAT_PROMPT, "temperature": 5}, "temperature", "less than or equal to 2"),
    ({"model": "chat", "messages": CHAT_PROMPT, "top_p": 0}, "top_p", "greater than 0"),
    ({"model": "chat", "messages": CHAT_PROMPT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": "chat", "messages": CHAT_PROMPT, "n": 2}, "n", "only n=1"),
    ({"model": "chat", "messages": CHAT_PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": "chat", "messages": CHAT_PROMPT, "top_k": -1}, "top_k", "greater than or equal to 0"),
    ({"model": "chat", "messages": CHAT_PROMPT, "logprobs": True}, "logprobs", "not implement logprobs"),
    ({"model": "chat", "messages": CHAT_PROMPT, "tools": []}, "tools", "unknown field"),
    ({"model": "chat", "messages": []}, "messages", "at least 1"),
    ({"model": "chat", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "'user'"),
    ({"model": "chat"}, "messages", "Field required"),
    ({"messages": CHAT_PROMPT}, "model", "Field required"),
    ({"model": "chat", "messages": CHAT_PROMPT, "temperature": "hot"}, "temperature", "valid number"),
])
def test_invalid_chat_fields_are_400_naming_the_field(raw, body, param, text):
    error = _error(raw.post("/v1/chat/completions", json=body), 400, param)
    assert error["message"].startswith(f"{param}: ") and text in error["message"], error


@pytest.mark.parametrize(("body", "param", "text"), [
    ({"model": "math", "prompt": ""}, "prompt", "empty"),
    ({"model": "math", "prompt": []}, "prompt", "empty list"),
    ({"model": "math", "prompt": [1, 99999]}, "prompt", "token id 99999"),
    ({"model": "math", "prompt": "x", "echo": True}, "echo", "not implement echo"),
    ({"model": "auto", "prompt": [1, 2, 3]}, "prompt", "one text prompt"),
])
def test_invalid_completion_fields_are_400_naming_the_field(raw, body, param, text):
    error = _error(raw.post("/v1/completions", json=body), 400, param)
    assert text in error["message"], error


def test_malformed_json_is_400(raw):
    error = _error(raw.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [',
                            headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in error["message"]
    error = _error(raw.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}),
                   400)
    assert "JSON object" in error["message"]


def test_a_prompt_longer_than_the_context_is_400(client, raw, live):
    long_prompt = "one two three four five six seven eight nine ten " * 80  # > 512 tokens
    error = _error(raw.post("/v1/completions", json={"model": "math", "prompt": long_prompt}), 400, "prompt")
    assert error["code"] == "context_length_exceeded" and "512" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": long_prompt}])
    with pytest.raises(openai.BadRequestError) as caught:  # a short prompt, but prompt + 600 > 512
        client.completions.create(model="math", prompt=MATH_QUESTION, max_tokens=600)
    assert caught.value.code == "context_length_exceeded"


def test_unknown_path_and_method_are_openai_errors(raw):
    _error(raw.get("/v1/nothing"), 404)
    _error(raw.get("/v1/chat/completions"), 405)


# -- many clients at once -----------------------------------------------------------------------


def test_concurrent_requests_to_different_experts(client, live):
    jobs = [("chat", None), ("math", None), ("code", None), ("base", None), ("auto", "math"), ("auto", "code")] * 2

    def run(job: tuple[str, str | None]) -> tuple[str, int, str]:
        model, kind = job
        if kind == "math" or model == "math":
            messages = [{"role": "user", "content": MATH_QUESTION}]
        elif kind == "code" or model == "code":
            messages = [{"role": "user", "content": CODE_PROMPT}]
        else:
            messages = CHAT_PROMPT
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True})
        return reply.model, reply.usage.completion_tokens, reply.choices[0].message.content

    alone = {job: run(job) for job in dict.fromkeys(jobs)}  # each request by itself, one after another
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    for job, result in zip(jobs, together):
        model, kind = job
        assert result == alone[job] and result[0] == (kind or model) and result[1] == 12, (job, result, alone[job])
    assert len({alone[job][2] for job in alone}) >= 4  # the experts answer differently
    _engine_idle(live)


@contextmanager
def _held_up(monkeypatch, owner, attribute: str, applies=lambda *args: True) -> Iterator[threading.Event]:
    """Calls of the real ``owner.attribute`` (those its arguments make ``applies`` true for) wait
    until the block ends; yields an event set once such a call waits."""
    entered, release = threading.Event(), threading.Event()
    real = getattr(owner, attribute)

    def held(*args, **kwargs):
        if applies(*args):
            entered.set()
            assert release.wait(60), "never released"
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, held)
    try:
        yield entered
    finally:
        release.set()


def _other_experts_are_served(live, quick) -> None:
    """The event loop is free: /health answers and a request for the math expert completes."""
    assert httpx.get(f"{live.url}/health", timeout=10).json()["status"] == "ok"
    reply = quick.completions.create(model="math", prompt=MATH_QUESTION, max_tokens=3, temperature=0)
    assert reply.model == "math" and reply.usage.completion_tokens >= 1


@pytest.fixture(scope="module")
def quick(live):
    """A client that gives up after 20 s (a request stuck behind a blocked event loop fails)."""
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=20)


def test_adding_an_expert_blocks_no_request_for_another(live, quick, artifacts, monkeypatch):
    """The store opening and checking a new artifact (held up here, in the real store) delays no
    request for other experts; a second add of the same name is refused at once."""
    store = live.service.app.state.meswitch.catalog.store
    headers = {"Authorization": f"Bearer {KEY}"}
    path = {"path": str(artifacts["code2"])}
    with ThreadPoolExecutor(max_workers=1) as pool:
        with _held_up(monkeypatch, store, "add") as entered:
            adding = pool.submit(httpx.post, f"{live.url}/v1/experts", json=path, headers=headers, timeout=90)
            assert entered.wait(30), "the add did not reach the store"
            _other_experts_are_served(live, quick)
            assert [m.id for m in quick.models.list()] == ["chat", "code", "math", "auto", "base"]
            again = httpx.post(f"{live.url}/v1/experts", json=path, headers=headers, timeout=20)
            assert _error(again, 409, "path")["code"] == "expert_changing"
            assert not adding.done()
        added = adding.result(timeout=60)
    assert added.status_code == 201 and added.json()["id"] == "code2"
    assert httpx.delete(f"{live.url}/v1/experts/code2", headers=headers, timeout=20).status_code == 200


def test_removing_an_expert_blocks_no_request_for_another(client, raw, live, quick, artifacts, monkeypatch):
    """While the store frees an expert (held up here), other experts are served, the expert being
    removed is not (404), and a second DELETE of it is refused at once."""
    assert raw.post("/v1/experts", json={"path": str(artifacts["code2"])}).status_code == 201
    store = live.service.app.state.meswitch.catalog.store
    headers = {"Authorization": f"Bearer {KEY}"}
    with ThreadPoolExecutor(max_workers=1) as pool:
        with _held_up(monkeypatch, store, "remove") as entered:
            removing = pool.submit(httpx.delete, f"{live.url}/v1/experts/code2", headers=headers, timeout=90)
            assert entered.wait(30), "the removal did not reach the store"
            _other_experts_are_served(live, quick)
            with pytest.raises(openai.NotFoundError):
                quick.completions.create(model="code2", prompt=CODE_PROMPT, max_tokens=3)
            again = httpx.delete(f"{live.url}/v1/experts/code2", headers=headers, timeout=20)
            assert _error(again, 409)["code"] == "expert_changing"
            assert not removing.done()
        assert removing.result(timeout=60).status_code == 200
    assert "code2" not in [m.id for m in client.models.list()]


def test_a_tokenizer_is_first_read_off_the_event_loop(client, raw, live, quick, artifacts, tmp_path, monkeypatch):
    """An expert's first request reads its tokenizer from disk on a worker thread: while that read
    (transformers' own) is held up, the event loop serves other experts; the request then completes."""
    import transformers

    copy = tmp_path / "code2.meswitch"  # a directory no tokenizer was read from yet
    shutil.copytree(artifacts["code2"], copy)
    assert raw.post("/v1/experts", json={"path": str(copy)}).status_code == 201
    expected = client.completions.create(model="code", prompt=CODE_PROMPT, max_tokens=4, temperature=0)

    def reads_copy(directory, *args) -> bool:
        return str(directory).startswith(str(copy))

    with ThreadPoolExecutor(max_workers=1) as pool:
        with _held_up(monkeypatch, transformers.AutoTokenizer, "from_pretrained", reads_copy) as entered:
            first = pool.submit(client.completions.create, model="code2", prompt=CODE_PROMPT, max_tokens=4,
                                temperature=0)
            assert entered.wait(30), "the tokenizer was not read"
            _other_experts_are_served(live, quick)
            assert not first.done()
        assert first.result(timeout=60).choices[0].text == expected.choices[0].text
    _engine_idle(live)
    removed = raw.delete("/v1/experts/code2")
    assert removed.status_code == 200, removed.text


def test_a_busy_tokenizer_blocks_no_request_for_another_expert(client, live, quick):
    """Requests tokenize on worker threads: while the chat expert's tokenizer is taken (its lock held
    here), the event loop serves the math expert and /health, and the chat request waits, then finishes."""
    tokenizer = live.service.engine.tokenizer("chat")
    expected = client.completions.create(model="chat", prompt="<|user|>hi<|end|>\n<|assistant|>", max_tokens=6,
                                         temperature=0).choices[0].text
    with ThreadPoolExecutor(max_workers=2) as pool:
        with tokenizer.lock:
            waiting = pool.submit(client.completions.create, model="chat", prompt="<|user|>hi<|end|>\n<|assistant|>",
                                  max_tokens=6, temperature=0)
            chatting = pool.submit(client.chat.completions.create, model="chat", messages=CHAT_PROMPT, max_tokens=4)
            time.sleep(0.3)
            _other_experts_are_served(live, quick)
            assert not waiting.done() and not chatting.done()
        assert waiting.result(timeout=60).choices[0].text == expected
        assert chatting.result(timeout=60).choices[0].finish_reason in ("stop", "length")


def test_metrics_count_requests_tokens_and_latency(client, raw, live):
    """Each counter read before and after this test's own requests rises by exactly what they did."""
    _engine_idle(live)
    before = _samples(httpx.get(f"{live.url}/metrics", timeout=10).text)
    for _ in range(2):
        client.chat.completions.create(model="chat", messages=CHAT_PROMPT, max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    math = client.completions.create(model="math", prompt=MATH_QUESTION, max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    list(client.completions.create(model="code", prompt=CODE_PROMPT, max_tokens=7, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True}))
    routed = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": MATH_QUESTION}],
                                            max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    assert routed.model == "math"
    _error(raw.post("/v1/completions", json={"model": "math", "prompt": ""}), 400, "prompt")
    _engine_idle(live)
    samples = _samples(httpx.get(f"{live.url}/metrics", timeout=10).text)

    def increase(name: str) -> float:
        return samples[name] - before.get(name, 0.0)

    assert increase('meswitch_requests_total{endpoint="chat",expert="chat"}') == 2
    assert increase('meswitch_requests_finished_total{expert="chat",finish_reason="length"}') == 2
    assert increase('meswitch_generation_tokens_total{expert="chat"}') == 6
    assert increase('meswitch_requests_total{endpoint="completions",expert="math"}') == 1
    assert increase('meswitch_requests_total{endpoint="chat",expert="math"}') == 1
    assert increase('meswitch_generation_tokens_total{expert="math"}') == 5 + 2
    math_prompts = math.usage.prompt_tokens + routed.usage.prompt_tokens
    assert increase('meswitch_prompt_tokens_total{expert="math"}') == math_prompts
    assert increase('meswitch_time_to_first_token_seconds_count{expert="code"}') == 1
    assert increase('meswitch_inter_token_latency_seconds_count{expert="code"}') == 6  # no gap before the first
    assert increase('meswitch_request_duration_seconds_count{expert="code"}') == 1
    assert increase('meswitch_routed_total{expert="math",fallback="false"}') == 1
    assert increase('meswitch_request_errors_total{status="400"}') == 1
    assert samples["meswitch_requests_waiting"] == samples["meswitch_requests_running"] == 0
    for expert in ("chat", "math", "code"):  # every claim and hold ended with its request
        assert samples[f'meswitch_expert_requests{{expert="{expert}"}}'] == 0
        assert samples[f'meswitch_expert_holders{{expert="{expert}"}}'] == 0
        assert samples[f'meswitch_expert_loads_total{{expert="{expert}"}}'] >= 1
    host = live.service.store.memory_report()["tiers"]["host"]
    assert samples['meswitch_store_budget_bytes{tier="host"}'] == host["budget_bytes"] == 64 * 10**6
    assert 0 < samples['meswitch_store_bytes{tier="host"}'] <= host["budget_bytes"]
    assert samples["meswitch_store_hits_total"] + samples["meswitch_store_misses_total"] >= 1
    assert "meswitch_store_evictions_total" in samples
    assert samples["meswitch_kv_blocks_free"] <= samples["meswitch_kv_blocks_total"]


# -- the command line -----------------------------------------------------------------------------


def test_device_budget_is_refused_without_a_device_tier(capsys):
    from meswitch.cli import main

    assert main(["serve", "--device-budget", "10GB"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "device tier needs a CUDA build and a CUDA device" in error


def test_a_port_in_use_is_a_one_line_error_before_anything_loads(capsys, tmp_path, monkeypatch):
    import socket

    from meswitch.cli import main

    monkeypatch.setenv("MESWITCH_CACHE_DIR", str(tmp_path / "cache"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    error = capsys.readouterr().err
    assert error == f"meswitch serve: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert not (tmp_path / "cache").exists()  # nothing was compressed


def test_bundled_family_is_compressed_once_and_keyed_by_its_content(tmp_path):
    from meswitch.serve.server.bundled import bundled_artifacts, family_key

    lines: list[str] = []
    base, first = bundled_artifacts(tmp_path, report=lines.append)
    assert base == BASE and [p.name for p in first] == [f"{n}.meswitch" for n in EXPERTS]
    assert sum("compressing" in line for line in lines) == 3
    lines.clear()
    assert bundled_artifacts(tmp_path, report=lines.append)[1] == first
    assert sum("cached" in line for line in lines) == 3
    changed = tmp_path / "family"
    shutil.copytree(FAMILY, changed)
    assert family_key(changed, EXPERTS) == family_key(FAMILY, EXPERTS)
    (changed / "math" / "generation_config.json").write_text("{}")
    assert family_key(changed, EXPERTS) != family_key(FAMILY, EXPERTS)


def test_meswitch_serve_with_no_arguments(tmp_path, subprocess_env):
    """The bundled family from a fresh cache, any free port; one request; SIGTERM stops it cleanly."""
    env = subprocess_env({"MESWITCH_CACHE_DIR": str(tmp_path / "cache"), "MESWITCH_PORT": "0",
                          "OMP_NUM_THREADS": "1"})
    process = subprocess.Popen([sys.executable, "-m", "meswitch.cli", "serve"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        lines = []
        deadline = time.monotonic() + 120
        url = None
        while url is None:
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(line)
            if line.startswith("serving ") and " at http://" in line:
                url = line.split(" at ", 1)[1].split("/v1", 1)[0]
        assert "compressing" in "".join(lines)
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        reply = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": MATH_QUESTION}], max_tokens=8)
        assert reply.model == "math" and reply.usage.completion_tokens >= 1
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, "".join(lines) + output
        assert "Traceback" not in output and "stopped" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list((tmp_path / "cache").glob("family-*/math.meswitch/manifest.json"))
    assert os.listdir(tmp_path / "cache")
