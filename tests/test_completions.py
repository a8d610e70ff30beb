"""Text completions, logprobs, logit bias and penalties: the engine (``Session.complete``, ``SamplingParams``)
and the HTTP door (``POST /v1/completions``, chat ``logprobs``) against independent computations on the tiny
random Llama: a plain forward's log-softmax, ``Session.score``, and the greedy path without the new options.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_http import QUESTION, check_error, http, running
from texts import book

import ttt
from ttt.generate import SamplingParams, adjust_logits

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "And God said, Let there be light: and there was light."


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def read(engine):
    """A session that read some text: its answers have a window (and exact spans) before the prompt."""
    session = engine.create_session({"ingest": {"chunk_tokens": 32, "context_tokens": 32}})
    session.append_text(book(0, 1500))
    session.end_document()
    while session.train_next_chunk() is not None:
        pass
    return session


def forward_logprobs(engine, fast, ids: list[int]) -> torch.Tensor:
    """log-softmax of a plain causal forward over ``ids`` [T] -> [T, V] (row t predicts ids[t + 1])."""
    with torch.no_grad():
        logits = engine.base.model(torch.tensor([ids]), fast.adapters() if fast is not None else None)[0]
    return torch.log_softmax(logits.float(), -1)


# ---- the engine ---------------------------------------------------------------------------------


def test_echo_scores_equal_session_score(read, engine):
    ids = engine.base.tokenizer(TEXT, add_special_tokens=False).input_ids
    assert len(ids) <= read.config.ingest.chunk_tokens  # one chunk: score and the answer prefix see the same context
    done = read.complete(TEXT, echo=True, max_tokens=0, top_logprobs=0)
    assert [e.token for e in done.echo_logprobs] == ids and done.completion_tokens == 0
    mean_nll = -sum(e.logprob for e in done.echo_logprobs) / len(ids)
    assert mean_nll == pytest.approx(read.score(TEXT), abs=1e-4)


def test_logprobs_equal_a_plain_forward(engine):
    """Base model, no window: the first prompt token has no logprob; the rest, and each generated token's, are the
    plain forward's log-softmax; top_logprobs are its top k, greedy picks the first of them."""
    done = engine.complete(TEXT, echo=True, max_tokens=6, top_logprobs=3)
    prompt = engine.base.tokenizer(TEXT, add_special_tokens=False).input_ids
    out = [e.token for e in done.logprobs]
    logp = forward_logprobs(engine, None, prompt + out)
    entries = done.echo_logprobs + done.logprobs
    assert entries[0].logprob is None and entries[0].token == prompt[0]
    for t, e in enumerate(entries[1:], start=1):
        assert e.logprob == pytest.approx(logp[t - 1, e.token].item(), abs=1e-4)
        top_p, top_i = logp[t - 1].topk(3)
        assert [i for i, _ in e.top] == top_i.tolist()
        assert [p for _, p in e.top] == pytest.approx(top_p.tolist(), abs=1e-4)
    for e in done.logprobs:  # greedy
        assert e.token == e.top[0][0]
    assert engine.base.tokenizer.decode(out) == done.text or done.finish_reason == "stop"


def test_generated_logprobs_under_the_fast_weights_and_window(read, engine):
    done = read.complete(TEXT, max_tokens=5, top_logprobs=2)
    prefix, fast = read.reading(TEXT)  # the window and its spans, or its spans alone under the base model
    ids = prefix + engine.base.tokenizer(TEXT, add_special_tokens=False).input_ids
    out = [e.token for e in done.logprobs]
    logp = forward_logprobs(engine, fast, ids + out)
    for j, e in enumerate(done.logprobs):
        assert e.logprob == pytest.approx(logp[len(ids) - 1 + j, e.token].item(), abs=1e-4)


def test_logit_bias_forces_and_forbids_tokens(engine):
    forced = engine.base.tokenizer(" light", add_special_tokens=False).input_ids[0]
    done = engine.generate(QUESTION, max_tokens=4, logit_bias={forced: 100.0})
    assert engine.base.tokenizer(done.text, add_special_tokens=False).input_ids == [forced] * 4
    plain = engine.generate(QUESTION, max_tokens=1, top_logprobs=0)
    banned = plain.logprobs[0].token
    other = engine.generate(QUESTION, max_tokens=1, top_logprobs=0, logit_bias={banned: -100.0})
    assert other.logprobs[0].token != banned


def test_penalties_follow_openais_formula():
    logits = torch.zeros(10)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 2.0})
    counts = torch.zeros(10)
    counts[1], counts[2] = 1, 4
    out = adjust_logits(logits, p, p.bias_vector(10, "cpu"), counts)
    expected = torch.zeros(10)
    expected[1], expected[2], expected[3] = -0.75, -1.5, 2.0
    assert torch.equal(out, expected) and torch.equal(logits, torch.zeros(10))  # the input is untouched


def test_a_repetition_penalty_changes_a_repeating_answer(engine):
    plain = engine.generate(QUESTION, max_tokens=24, top_logprobs=0)
    tokens = [e.token for e in plain.logprobs]
    assert len(set(tokens)) < len(tokens), "the tiny model repeats itself greedily"
    penalised = engine.generate(QUESTION, max_tokens=24, top_logprobs=0, frequency_penalty=2.0, presence_penalty=2.0)
    assert len({e.token for e in penalised.logprobs}) > len(set(tokens))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_logprobs": 21},
        {"top_logprobs": -1},
        {"logit_bias": {1: 101.0}},
        {"logit_bias": {i: 1.0 for i in range(301)}},
        {"logit_bias": {10**9: 1.0}},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
    ],
)
def test_bad_sampling_options(engine, kwargs):
    with pytest.raises(ValueError):
        engine.generate(QUESTION, max_tokens=1, **kwargs)


def test_max_tokens_zero_only_with_echo(engine):
    with pytest.raises(ValueError, match="echo"):
        engine.complete(TEXT, max_tokens=0)
    with pytest.raises(ValueError, match="token ids"):
        engine.complete([1, 2, 10**9], max_tokens=1)


# ---- the HTTP door ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """An open server with session "reader" that read some text."""
    with running(tiny_model_dir, tmp_path_factory.mktemp("completions") / "data") as server:
        with http(server) as api:
            assert api.post("/v1/sessions", json={"id": "reader"}).status_code == 201
            r = api.post(
                "/v1/sessions/reader/documents", content=book(0, 1500).encode(), headers={"content-type": "text/plain"}
            )
            assert r.status_code == 200
        yield server


def on_server(server, fn):
    """``fn(session "reader")`` on the server's device thread."""
    registry = server.state.registry
    return server.state.scheduler.run(("local", "reader"), lambda: fn(registry.get("local", "reader")))


def test_completion_echo_scores_equal_session_score(served):
    with http(served) as api:
        r = api.post(
            "/v1/completions", json={"model": "reader", "prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 1}
        )
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == TEXT and r.json()["object"] == "text_completion"
    assert -sum(lp["token_logprobs"]) / len(lp["token_logprobs"]) == pytest.approx(
        on_server(served, lambda s: s.score(TEXT)), abs=1e-4
    )
    for token, offset, top in zip(lp["tokens"], lp["text_offset"], lp["top_logprobs"], strict=True):
        assert choice["text"][offset : offset + len(token)] == token and len(top) == 1


def test_completions_of_several_prompts_and_token_ids(served, tiny_model_dir):
    ids = served.state.engine.base.tokenizer(TEXT, add_special_tokens=False).input_ids
    with http(served) as api:
        by_text = api.post(
            "/v1/completions",
            json={"model": "reader", "prompt": [TEXT, "In the beginning"], "max_tokens": 5, "temperature": 0},
        ).json()
        by_ids = api.post(
            "/v1/completions", json={"model": "reader", "prompt": [ids], "max_tokens": 5, "temperature": 0}
        ).json()
    assert [c["index"] for c in by_text["choices"]] == [0, 1]
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    expected = on_server(served, lambda s: s.complete(TEXT, max_tokens=5).text)
    assert by_text["choices"][0]["text"] == expected
    assert by_text["usage"]["prompt_tokens"] > 2 * len(ids)  # both prompts, each after the window


def test_streamed_completion_equals_the_whole_one(served):
    body = {"model": "reader", "prompt": TEXT, "max_tokens": 8, "temperature": 0, "echo": True, "logprobs": 2}
    with http(served) as api:
        whole = api.post("/v1/completions", json=body).json()["choices"][0]
        with api.stream(
            "POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        ) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    pieces = [c for e in events for c in e["choices"]]
    assert "".join(c["text"] for c in pieces) == whole["text"]
    tokens = [t for c in pieces if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert tokens == whole["logprobs"]["tokens"]
    offsets = [o for c in pieces if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]
    assert pieces[-1]["finish_reason"] == whole["finish_reason"] and events[-1]["usage"]["completion_tokens"] > 0


def test_chat_logprobs_in_openais_shape(served):
    body = {
        "model": "reader",
        "messages": QUESTION,
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    with http(served) as api:
        whole = api.post("/v1/chat/completions", json=body).json()["choices"][0]
        with api.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    content = whole["logprobs"]["content"]
    assert len(content) == 6 or whole["finish_reason"] == "stop"
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy
        assert bytes(entry["bytes"]).decode(errors="replace") == entry["token"] or "\ufffd" in entry["token"]
    assert bytes(b for e in content for b in e["bytes"]).decode() == whole["message"]["content"]
    streamed = [e for ev in events for c in ev["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert streamed == content
    expected = on_server(served, lambda s: s.generate(QUESTION, max_tokens=6, top_logprobs=2))
    assert [e["logprob"] for e in content] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)


def test_the_openai_client_gets_logprobs(served):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.http_port}/v1", api_key="x", max_retries=0)
    chat = client.chat.completions.create(
        model="reader", messages=QUESTION, max_tokens=3, temperature=0, logprobs=True, top_logprobs=1
    )
    assert chat.choices[0].logprobs.content[0].top_logprobs[0].token
    legacy = client.completions.create(model="reader", prompt=TEXT, max_tokens=2, temperature=0, logprobs=1, echo=True)
    assert legacy.choices[0].text.startswith(TEXT) and legacy.choices[0].logprobs.token_logprobs[0] is not None


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"unheard_of": 1}, "unheard_of"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"light": 1}}, "logit_bias"),
    ],
)
def test_what_is_not_implemented_is_refused_by_name(served, extra, param):
    with http(served) as api:
        err = check_error(
            api.post("/v1/chat/completions", json={"model": "reader", "messages": QUESTION, **extra}), 400
        )
    assert err["param"] == param and param in err["message"]


def test_what_clients_send_by_default_is_accepted(served):
    body = {
        "model": "reader",
        "messages": QUESTION,
        "max_tokens": 1,
        "user": "u1",
        "metadata": {"a": "b"},
        "store": False,
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "tools": None,
        "n": 1,
    }
    with http(served) as api:
        assert api.post("/v1/chat/completions", json=body).status_code == 200
        r = api.post("/v1/completions", json={"model": "reader", "prompt": TEXT, "best_of": 1, "max_tokens": 1})
        assert r.status_code == 200
        check_error(api.post("/v1/completions", json={"model": "reader", "prompt": TEXT, "suffix": "x"}), 400)
        check_error(api.post("/v1/completions", json={"model": "reader", "prompt": TEXT, "max_tokens": 0}), 400)
        check_error(api.post("/v1/completions", json={"model": "reader", "prompt": [1, 10**9]}), 400)


def test_base_model_completions_equal_the_engines(served):
    engine = served.state.engine
    with http(served) as api:
        r = api.post(
            "/v1/completions",
            json={"model": engine.base.name, "prompt": TEXT, "max_tokens": 4, "temperature": 0, "logprobs": 0},
        )
    choice = r.json()["choices"][0]
    direct = served.state.scheduler.run(("local", None), lambda: engine.complete(TEXT, max_tokens=4, top_logprobs=0))
    assert choice["text"] == direct.text
    assert choice["logprobs"]["token_logprobs"] == pytest.approx([e.logprob for e in direct.logprobs], abs=1e-5)
    assert choice["logprobs"]["text_offset"][0] == len(TEXT)  # offsets count from the prompt's start


def test_logprobs_end_where_a_stop_string_cuts_the_answer(engine):
    whole = engine.complete(TEXT, max_tokens=16, top_logprobs=0)
    assert len(whole.text) > 6
    stop = whole.text[len(whole.text) // 2 : len(whole.text) // 2 + 3]
    cut = engine.complete(TEXT, max_tokens=16, top_logprobs=0, stop=[stop])
    shown = "".join(engine.base.tokenizer.decode([e.token]) for e in cut.logprobs)
    assert cut.text == whole.text[: whole.text.index(stop)]
    assert shown.startswith(cut.text) and len(cut.logprobs) < len(whole.logprobs)
