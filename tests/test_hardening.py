"""Hardening: input that used to reach the engine unchecked (and came back as 500 / INTERNAL) is refused
with a clear error at the door; one user cannot stall the server for others.

Each test here failed before its fix (issue 13's findings). The servers run the tiny random Llama on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from server.auth import KeyRing, hash_key
from ttt.config import FastWeightConfig
from ttt.engine import check_session_id
from ttt.generate import MAX_STOP_CHARS, MAX_STOPS, SamplingParams
from ttt.store import AdapterError, peft_session_config

pytestmark = pytest.mark.usefixtures("one_thread")

LORA_KEY = "base_model.model.model.layers.0.mlp.up_proj.lora_{}.weight"


# ---- values that used to pass the checks --------------------------------------------------------


@pytest.mark.parametrize("name", ["nl\n", "a\n", "ok\r\n"])
def test_ids_and_user_names_refuse_a_trailing_newline(name, tmp_path):
    with pytest.raises(ValueError):
        check_session_id(name)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({name: [hash_key("k")]}))
    with pytest.raises(ValueError):
        KeyRing(keys)


@pytest.mark.parametrize("spec", ["last_fraction:1e308", "last_fraction:nan", "last_fraction:0", "last_fraction:-1"])
def test_layer_fractions_outside_0_1_are_refused(spec):
    with pytest.raises(ValueError, match="fraction"):
        FastWeightConfig(layers=spec).layer_indices(30)


def _adapter(config: dict, b_shape=(4, 1)) -> tuple[dict, dict]:
    return ({"peft_type": "LORA", **config},
            {LORA_KEY.format("A"): torch.zeros(1, 4), LORA_KEY.format("B"): torch.zeros(b_shape)})


@pytest.mark.parametrize("config,b_shape,problem", [
    ({"r": [1]}, (4, 1), "r must be"),
    ({"r": True}, (4, 1), "r must be"),
    ({"r": 1}, (4,), "matrices"),
    ({"r": 1, "lora_alpha": "nan"}, (4, 1), "lora_alpha"),
    ({"r": 1, "lora_alpha": None}, (4, 1), "lora_alpha"),
    ({"r": 1, "lora_alpha": float("nan")}, (4, 1), "finite"),
])
def test_crafted_adapters_are_refused_as_invalid(config, b_shape, problem):
    with pytest.raises(AdapterError, match=problem):
        peft_session_config(*_adapter(config, b_shape))


def test_stop_strings_are_bounded():
    SamplingParams(stop=["x" * MAX_STOP_CHARS] * MAX_STOPS)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["x"] * (MAX_STOPS + 1))
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["x" * (MAX_STOP_CHARS + 1)])
