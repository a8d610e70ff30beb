"""lm-evaluation-harness as a client: its ``local-completions`` and ``local-chat-completions`` models score a
session over HTTP with two small tasks from ``tests/data/lm_eval`` (a multiple-choice loglikelihood task and a
generate_until task; no hub download), and each item's number equals what the Python API computes directly.

Reference for loglikelihoods: a plain causal forward with the session's fast weights over its answer prefix,
then the context and continuation tokens split as lm-eval splits them. Tolerance: 1e-3 nats per item.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_http import running

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"
SESSION = "reader"  # lm-eval changes its payload for model names with "5", "o1", "o3" or "o4": keep it plain
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    from test_http import http
    from texts import book

    with running(tiny_model_dir, tmp_path_factory.mktemp("lm-eval") / "data") as server:
        with http(server) as api:
            assert api.post("/v1/sessions", json={"id": SESSION}).status_code == 201
            r = api.post(
                f"/v1/sessions/{SESSION}/documents",
                content=book(0, 1500).encode(),
                headers={"content-type": "text/plain"},
            )
            assert r.status_code == 200
        yield server


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Nothing from a hub: datasets reads the task files from the repository (paths relative to its root)."""
    monkeypatch.chdir(ROOT)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def evaluate(server, model: str, endpoint: str, task: str, tokenizer_dir: Path, **extra) -> list[dict]:
    """lm-eval's per-item samples of ``task`` against ``endpoint`` of ``server``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = dict(
        model=SESSION,
        base_url=f"http://127.0.0.1:{server.http_port}/v1/{endpoint}",
        num_concurrent=1,
        max_retries=1,
        tokenizer=str(tokenizer_dir),
        tokenizer_backend="huggingface",
        **extra,
    )
    results = simple_evaluate(
        model=model,
        model_args=args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
        apply_chat_template=model.endswith("chat-completions"),
        batch_size=1,
    )
    return results["samples"][task]


def session_view(server):
    """What the served session's answer to a prompt reads before it, and a copy of the weights it reads with
    (None: the base model), read on the device thread (``Session.reading``: the window, then the kept spans the
    prompt names, or those spans alone)."""
    registry = server.state.registry
    session = server.state.scheduler.run(("local", SESSION), lambda: registry.get("local", SESSION))

    def reading(prompt: str) -> tuple[list[int], object]:
        return server.state.scheduler.run(("local", SESSION), lambda: copy.deepcopy(session.reading(prompt)))

    return reading


def reference_loglikelihood(server, tokenizer, reading, context: str, continuation: str) -> float:
    """log p(continuation | prefix, context), tokens split as lm-eval does (trailing spaces move to the
    continuation; the continuation is what the whole string adds to the context's tokens); of the prefix, what
    fits the model's context before the prompt and one answer token (``Engine.prompt``)."""
    n = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - n], context[len(context) - n :] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    prefix, fast = reading(tokenizer.decode(whole))  # the server decodes the prompt's ids to choose the spans
    model = server.state.engine.base.model
    room = model.cfg.max_position_embeddings - 1 - len(whole)  # as much of the prefix as fits (max_tokens 1)
    ids = prefix[-room:] + whole
    with torch.no_grad():
        adapters = fast.adapters() if fast is not None else None
        logp = torch.log_softmax(model(torch.tensor([ids]), adapters)[0].float(), -1)
    start = len(ids) - len(whole) + len(ctx)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_lm_eval_scores_a_session_like_the_python_api(served, offline, tiny_model_dir):
    tokenizer = served.state.engine.base.tokenizer
    reading = session_view(served)
    samples = evaluate(served, "local-completions", "completions", "ttt_genesis_mc", tiny_model_dir)
    assert len(samples) == 6
    for sample in samples:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            loglikelihood = response[0][0]
            expected = reference_loglikelihood(served, tokenizer, reading, context, continuation)
            assert loglikelihood == pytest.approx(expected, abs=TOLERANCE), (context, continuation)


@pytest.mark.parametrize(
    "model,endpoint", [("local-completions", "completions"), ("local-chat-completions", "chat/completions")]
)
def test_lm_eval_generations_equal_the_python_api(served, offline, tiny_model_dir, model, endpoint):
    samples = evaluate(served, model, endpoint, "ttt_genesis_gen", tiny_model_dir)
    assert len(samples) == 4
    registry = served.state.registry
    for sample in samples:
        context, gen_kwargs = sample["arguments"][0]
        if endpoint != "completions":  # lm-eval hands the chat messages over as JSON text
            context = json.loads(context[0] if isinstance(context, tuple) else context)
        until, max_tokens = gen_kwargs["until"], gen_kwargs["max_gen_toks"]

        def direct(s):
            if endpoint == "completions":
                return s.complete(context, max_tokens=max_tokens, stop=until[:4]).text
            return s.generate(context, max_tokens=max_tokens, stop=until[:4]).text

        expected = served.state.scheduler.run(("local", SESSION), lambda: direct(registry.get("local", SESSION)))
        assert sample["resps"][0][0] == expected, (context, sample["resps"])


def test_recall_needles_exported_as_an_lm_eval_task(served, offline, tiny_model_dir, tmp_path):
    """``ttt recall --export-lm-eval``: ingest the exported document into a session, then lm-eval scores its
    needles as the Python API does."""
    from test_http import http

    from clients import cli

    out = tmp_path / "exported"
    argv = [
        "recall",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--lengths",
        "384",
        "--depths",
        "200",
        "--needles-per-depth",
        "2",
        "--stories",
        "0",
        "--no-book",
        "--export-lm-eval",
        str(out),
    ]
    assert cli.main(argv) == 0
    document = (out / "recall_0_384.txt").read_text(encoding="utf-8")
    with http(served) as api:
        r = api.post(
            f"/v1/sessions/{SESSION}/documents", content=document.encode(), headers={"content-type": "text/plain"}
        )
        assert r.status_code == 200
    tokenizer = served.state.engine.base.tokenizer
    reading = session_view(served)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = dict(
        model=SESSION,
        base_url=f"http://127.0.0.1:{served.http_port}/v1/completions",
        num_concurrent=1,
        max_retries=1,
        tokenizer=str(tiny_model_dir),
        tokenizer_backend="huggingface",
    )
    results = simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["recall_0_384"],
        task_manager=TaskManager(include_path=str(out)),
        log_samples=True,
        batch_size=1,
    )
    samples = results["samples"]["recall_0_384"]
    assert len(samples) == 2
    for sample in samples:
        assert len(sample["arguments"]) == 6  # the true value and five wrong ones
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            expected = reference_loglikelihood(served, tokenizer, reading, context, continuation)
            assert response[0][0] == pytest.approx(expected, abs=TOLERANCE)
