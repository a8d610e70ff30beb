"""Which implementation a kernel call runs: Triton on CUDA tensors, the torch reference elsewhere.

``TTT_KERNELS`` overrides the choice for the whole process: ``torch`` (always the reference, e.g. to
rule out a kernel bug), ``triton`` (always Triton, also on CPU under ``TRITON_INTERPRET=1``: tests)
or ``auto`` (the default).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKEND_ENV = "TTT_KERNELS"
BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend() -> str:
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r}; choose from {', '.join(BACKENDS)}")
    return choice


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on ``tensors``."""
    choice = backend()
    if choice == "torch" or not triton_available():
        return False
    if choice == "triton":
        return True
    return all(t.is_cuda for t in tensors)
