"""bench/kernels.py at toy sizes: the cases report peak memory, time and a loss on which the implementations
agree; ratios are against the baseline row; a case fails into a row of a fresh process, not a crash.
(Cases run in this process here: a fresh interpreter per case costs seconds each.)"""

from __future__ import annotations

import json
import math

import pytest

from bench import kernels as bench

pytestmark = pytest.mark.usefixtures("one_thread")


def loss_spec(impl: str) -> dict:
    return dict(bench="loss", vocab=3000, hidden=32, tokens=200, impl=impl, device="cpu", dtype="float32", repeats=1)


def test_loss_cases():
    rows = [loss_spec(impl) | bench.loss_case(loss_spec(impl)) for impl in ("naive", "chunked")]
    naive, chunked = rows
    assert math.isclose(naive["loss"], chunked["loss"], rel_tol=1e-5)
    for r in rows:
        r["peak_mib"] = r.pop("peak_bytes") / 2**20
    assert naive["seconds"] > 0 and chunked["seconds"] > 0
    bench.add_ratios(rows, lambda r: r["impl"] == "naive", lambda r: ())
    assert naive["mem_ratio"] == 1 and chunked["mem_ratio"] == naive["peak_mib"] / chunked["peak_mib"]


def test_child_errors_become_rows():
    row = bench.run_child(dict(loss_spec("chunked"), impl="bogus"))
    assert "KeyError" in row["error"] and row["impl"] == "bogus"


def test_ingest_case(capsys):
    spec = dict(bench="ingest_step", mode="recompute", tokens=24, fast_layers=1, device="cpu", dtype="float32")
    spec["repeats"] = 1
    bench.main(["--child", json.dumps(spec)])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(row["loss"]) and row["seconds"] > 0 and row["peak_bytes"] >= 0
