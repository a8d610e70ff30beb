"""The bf16 path, the one a GPU runs by default, end to end on the CPU (``--dtype bfloat16``; CPUs with native bf16
run it about twice as fast): a bf16 base with fp32 fast weights learns what it reads; answers of sessions of
different kinds decode together as they do alone; a served session saved in bf16 answers the same after a restart.

Greedy equality between batched and lone answers is promised in fp32 only: in bf16 a different matmul shape may
round a near tie the other way, so the batched answers here must equal the lone ones up to such a tie (on this
machine they are equal throughout).
"""

from __future__ import annotations

import concurrent.futures
from typing import get_args

import httpx
import pytest
import torch
from conftest import started_server
from test_decode import run_batch, streams, trained_sessions

import ttt
from server.settings import DtypeName, Settings
from ttt.decode import DecodeBatch
from ttt.model import DTYPES

pytestmark = pytest.mark.usefixtures("one_thread")

TIE = 0.25  # nats: a bf16 logit near 16 is exact to 0.0625-0.125


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, "cpu", "bfloat16")


def test_dtype_names_are_one_list_and_a_wrong_one_is_refused(tiny_model_dir):
    assert set(get_args(DtypeName)) == set(DTYPES)
    assert Settings(dtype="bfloat16").dtype == "bfloat16" and Settings().dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        Settings(dtype="float64")
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16"):
        ttt.load_engine(tiny_model_dir, "cpu", "fp8")
    assert ttt.load_engine(tiny_model_dir, "cpu", "auto").base.dtype == torch.float32  # the CPU's default


def read_twice(engine) -> tuple[float, float, object]:
    """Random tokens read twice, with a context shorter than them: (the first reading's mean loss before each
    update, the second's, the session). The second is lower only by what the fast weights hold from the first."""
    tokens = torch.randint(100, 5000, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    s = engine.create_session(
        {"fast": {"kind": "mlp", "mlp_hidden": 16}, "ingest": {"chunk_tokens": 16, "context_tokens": 16, "lr": 3e-2}}
    )
    s.append_tokens(tokens * 2)
    s.end_document()
    reports = []
    while (report := s.train_next_chunk()) is not None:
        reports.append(report)
    assert not any(r.rolled_back for r in reports)
    first, second = (sum(r.loss_before for r in half) / len(half) for half in (reports[1:6], reports[7:]))
    return first, second, s


def test_a_bf16_base_trains_fp32_fast_weights_that_learn_as_fp32_does(engine, tiny_model_dir):
    first, second, s = read_twice(engine)
    assert engine.base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in s.fast.parameters()} == {torch.float32}
    fp32_first, fp32_second, _ = read_twice(ttt.load_engine(tiny_model_dir, "cpu", "float32"))
    # measured: fp32 10.98 -> 10.35, bf16 10.98 -> 10.39 (the tiny random model learns random tokens slowly)
    assert second < first - 0.4 and fp32_second < fp32_first - 0.4
    assert abs(second - fp32_second) < 0.15 and abs(first - fp32_first) < 0.15


def assert_equal_but_for_a_near_tie(alone, row, tie: float = TIE) -> None:
    """Token for token, or so up to a token where the lone answer's top two were within ``tie`` nats (bf16 may round
    a near tie the other way in another matmul shape); the chosen tokens' logprobs alike up to there."""
    for a, b in zip(alone.logprobs, row.logprobs, strict=False):
        if a.token != b.token:
            (_, first), (_, second) = a.top[:2]
            assert first - second < tie, (alone.text, row.text)
            return
        assert a.logprob == pytest.approx(b.logprob, abs=tie)
    assert row.text == alone.text


def test_batched_bf16_answers_equal_answers_alone(engine):
    sessions = trained_sessions(engine)
    alone = streams(engine, sessions, max_tokens=12, top_logprobs=2)
    texts = ["".join(s) for s in alone]
    rows = streams(engine, sessions, max_tokens=12, top_logprobs=2)
    run_batch(DecodeBatch(engine.base.model, prefill_chunk=7), rows, join_at=[0, 0, 2, 5, 9])
    for a, b in zip(alone, rows, strict=True):
        assert_equal_but_for_a_near_tie(a, b)
    assert len(set(texts)) == len(texts)  # the sessions really answer differently


def test_a_bf16_server_serves_saves_and_reloads(tiny_model_dir, tmp_path):
    text = "In the beginning God created the heaven and the earth. And the earth was without form. " * 6
    question = {"messages": [{"role": "user", "content": "Who created the earth?"}], "temperature": 0}
    ids = ["bf-0", "bf-1", "bf-2"]

    def ask(client: httpx.Client, sid: str) -> str:
        r = client.post("/v1/chat/completions", json={"model": sid, "max_tokens": 8, **question})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    defaults = {"ingest": {"chunk_tokens": 32, "context_tokens": 32}}
    with started_server(tiny_model_dir, tmp_path, defaults, dtype="bfloat16") as server:
        assert server.state.engine.base.dtype == torch.bfloat16
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60) as client:
            for i, sid in enumerate(ids):
                assert client.post("/v1/sessions", json={"id": sid}).status_code == 201
                r = client.post(f"/v1/sessions/{sid}/documents", content=text[i * 7 :].encode())
                assert r.status_code == 200 and r.json()["tokens_ingested"] > 0, r.text
            with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:  # decoded together
                assert all(pool.map(lambda sid: ask(client, sid), ids))
            before = [ask(client, sid) for sid in ids]  # one at a time: the same shapes as after the restart
            for sid in ids:
                assert client.post(f"/v1/sessions/{sid}/save").status_code == 200
    with (
        started_server(tiny_model_dir, tmp_path, defaults, dtype="bfloat16") as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60) as client,
    ):
        assert [ask(client, sid) for sid in ids] == before  # one at a time now, and from disk
