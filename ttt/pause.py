"""Pause points: where a long piece of device work (an ingest chunk) lets the thread running it do short,
urgent work first.

The server's scheduler decodes waiting answers at the pause points of a chunk in training, so an answer that
arrives meanwhile waits for one layer's forward or backward, not for the whole chunk (server/scheduler.py).
Without a handler (the Python API, the CLI) a pause point does nothing. A handler's own work never pauses.

Until the work first changes what it was given (``changing``: a chunk's first optimizer step, or its recording
in the session), its sessions are as they were before it started, so a handler may read them too (``changed``
says whether it still may).

A backward pauses too when its graph is cut (``Cuts``): each cut tensor stands for the graph below it as a
leaf of its own, and the backward goes through the pieces in reverse, one ``backward`` call each with a pause
point between them. The gradients are the same: each piece gets the gradient of its output in full first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_local = threading.local()  # .handler: the thread's pause handler, None outside ``pausing``; .changed: ``changing``


@contextmanager
def pausing(handler: Callable[[], None]) -> Iterator[None]:
    """Run ``handler()`` (without autograd) at every pause point this thread reaches in the block."""
    outer = getattr(_local, "handler", None), getattr(_local, "changed", False)
    _local.handler, _local.changed = handler, False
    try:
        yield
    finally:
        _local.handler, _local.changed = outer


def changing() -> None:
    """The work in the ``pausing`` block starts changing its sessions (weights, window, memory): from here to
    the block's end a handler must not read them (it would see them half trained)."""
    _local.changed = True


def changed() -> bool:
    """Whether the work in the ``pausing`` block has changed its sessions yet (``changing``)."""
    return getattr(_local, "changed", False)


def may_pause() -> bool:
    """A handler would run at a pause point now (work worth splitting finer, such as the loss, is split)."""
    return getattr(_local, "handler", None) is not None


def pause_point() -> None:
    handler = getattr(_local, "handler", None)
    if handler is None:
        return
    _local.handler = None  # the handler's own forwards reach pause points too: they run through
    try:
        with torch.no_grad():
            handler()
    finally:
        _local.handler = handler


class Cuts:
    """A graph cut into pieces whose backward runs one piece at a time, with a pause point between them."""

    def __init__(self) -> None:
        self._cuts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor of the graph below, leaf above)

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        """A leaf that stands for ``x`` in what is computed from it (``x`` itself when it needs no gradient)."""
        if not x.requires_grad:
            return x
        leaf = x.detach().requires_grad_()
        self._cuts.append((x, leaf))
        return leaf

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, piece by piece: the last cut first (its leaf then has its whole gradient)."""
        loss.backward()
        while self._cuts:
            x, leaf = self._cuts.pop()
            pause_point()
            if leaf.grad is not None:
                x.backward(leaf.grad)
