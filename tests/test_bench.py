"""`ttt bench` (bench/bench.py) on a tiny random Llama: timing plumbing, byte accounting, JSON and PNG."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import ttt
from bench.bench import KNOWN_SHAPES, Shape, timed_chat, token_ticks
from bench.common import DEFAULT_DOC, document_tokens
from clients import cli

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"ingest": {"chunk_tokens": 32, "context_tokens": 32}}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, "cpu")


@pytest.mark.parametrize("select", ["question", "surprise"])
def test_session_bytes_formula_matches_a_real_session(engine, select):
    session = engine.create_session({**SMALL, "recall": {"exact_select": select}})
    session.append_tokens(document_tokens(engine, DEFAULT_DOC, 96))
    while session.train_next_chunk() is not None:
        pass
    session.generate([{"role": "user", "content": "Hi"}], max_tokens=1)  # answers keep the prefix's K/V
    shape = Shape.of(engine.base.cfg)
    predicted = shape.session_bytes(session.config, 4)  # with the exact memory full
    read = session.config.recall.exact_tokens if session.config.recall.exact_select == "surprise" else 0
    unused = shape.kv_bytes(read - len(session._exact_before_window()), 4)
    # AdamW also keeps a 4-byte step counter per parameter tensor.
    assert 0 <= session.resident_bytes() - (predicted - unused) <= 4 * len(list(session.fast.parameters()))


def test_kv_cache_bytes_of_known_shapes():
    assert KNOWN_SHAPES["Llama-3-8B"].kv_bytes(131072, 2) == 2 * 32 * 8 * 128 * 131072 * 2  # 17.2 GB
    assert KNOWN_SHAPES["Llama-3-70B"].kv_bytes(1 << 20, 2) == 2 * 80 * 8 * 128 * (1 << 20) * 2  # 344 GB


def test_timed_chat_counts_every_decoded_token(engine):
    session = engine.create_session(SMALL)
    session.append_tokens(document_tokens(engine, DEFAULT_DOC, 64))
    messages = [{"role": "user", "content": "Tell me more."}]
    whole = session.generate(messages, max_tokens=7)
    timed = timed_chat(lambda: token_ticks(session.generate(messages, max_tokens=7, stream=True)))
    assert timed["answer_tokens"] == whole.completion_tokens >= 2
    assert timed["ttft_s"] > 0 and timed["decode_tokens_per_s"] > 0


def test_ttt_bench_cli_writes_json_and_plot(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    # The tiny model's context is 512 tokens: full attention fits 128 and 256 with a question, not 448.
    assert (
        cli.main(
            [
                "bench",
                "--model",
                str(tiny_model_dir),
                "--device",
                "cpu",
                "--out",
                str(out),
                "--tokens",
                "256",
                "128",
                "448",
                "--answer-tokens",
                "3",
                "--together",
                "3",
                "--session-config",
                json.dumps(SMALL),
            ]
        )
        == 0
    )
    res = json.loads((out / "bench.json").read_text())
    rows = res["chats"]
    assert [r["tokens"] for r in rows] == [128, 256, 448]
    assert [r["trained_tokens"] for r in rows] == [128, 256, 448]
    assert ["full_prefill" in r and "full_reuse" in r for r in rows] == [True, True, False]
    for r in rows:
        assert r["ttt"]["ttft_s"] > 0 and 1 <= r["ttt"]["answer_tokens"] <= 3
    kv = [r["bytes"]["kv_cache"] for r in rows]
    bound = (
        Shape.of(ttt.load_engine(tiny_model_dir, "cpu").base.cfg).session_bytes(ttt.SessionConfig.from_dict(SMALL), 4)
        + 4 * 6
    )  # AdamW's step counters
    assert kv[1] == 2 * kv[0] and all(r["bytes"]["ttt_session"] <= bound for r in rows)  # grows vs bounded
    assert res["ingest"]["ttt_tokens_per_s"] > 0 and res["ingest"]["prefill_tokens_per_s"] > 0
    assert set(res["known_shapes"]) == {"Llama-3-8B", "Llama-3-70B"}
    assert "git_revision" in res["meta"] and res["session_config"]["ingest"]["chunk_tokens"] == 32
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    together = res["answers_together"]
    assert together["answers"] == 3 and together["together_tokens"] > 0 and together["together_vs_alone"] > 0
    pauses = res["chunk_pauses"]
    # forward: 2 frozen layers, 1 fast, the loss in one piece; backward: the loss, the layer; measured after: 2
    assert pauses["chunks"] == 3 and pauses["pause_points_per_chunk"] == 8
    assert 0 < pauses["mean_stretch_s"] <= pauses["longest_stretch_s"] and pauses["paused_vs_plain"] > 0
    printed = capsys.readouterr().out
    assert "ingest: TTT" in printed and "Llama-3-8B" in printed and "answers together: 3 sessions" in printed
    assert "chunk pause points:" in printed


def test_passage_bench_runs_every_context_variant(tiny_model_dir, tmp_path):
    from bench import passage

    res = passage.main(
        [
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--tokens",
            "600",
            "--depth",
            "400",
            "--passages",
            "1",
        ]
    )
    assert set(res["variants"]) == set(passage.VARIANTS)
    assert all(len(v["gains"]) == 2 and v["tokens_per_s"] > 0 for v in res["variants"].values())
    assert (tmp_path / "passage.json").is_file()


def test_results_files_record_repo_relative_paths():
    from bench.common import ROOT, portable

    assert portable(ROOT / "bench" / "data" / "persuasion.txt") == "bench/data/persuasion.txt"
    assert portable([Path("runs/x")]) == ["runs/x"] and portable(3) == 3
    for path in (ROOT / "docs" / "results").rglob("*.json"):  # committed results hold no machine's paths
        strings = re.findall(r'"((?:[^"\\]|\\.)*)"', path.read_text())
        assert not [s for s in strings if s.startswith("/")], path
