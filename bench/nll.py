"""Per-chunk NLL of a token sequence under the three memories compared by `ttt eval` and `ttt sweep`.

Chunk i holds tokens [i * chunk, (i + 1) * chunk); its score is the mean NLL (nats/token) of those tokens,
each predicted from everything the memory keeps before it (chunk 0's first token has no predecessor and is
not scored). All three yield one float per chunk, in order, so a caller can show progress:
  * ``window_nll``: the base model with only the recent window (the same rolling context a session uses);
  * ``ttt_nll``: a session's honest score, ``loss_before``: the chunk is scored, then trained on;
  * ``full_nll``: the base model attending to the whole prefix, up to ``max_context`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

import ttt
from ttt.cache import RollingContext
from ttt.ingest import forward_hidden, next_token_nll, token_nll


@torch.no_grad()
def window_nll(engine: ttt.Engine, ids: list[int], chunk: int, context: int, sink: int) -> Iterator[float]:
    """No TTT: the base model sees each chunk after the same window of ``context`` tokens a session keeps."""
    model = engine.base.model
    sink = min(sink, context // 2)  # as Session._context
    ctx = RollingContext(model.cfg.num_layers, context - 1 - sink, sink)
    carry: list[int] = []  # the previous chunk's last token predicts this chunk's first
    for i in range(0, len(ids), chunk):
        inputs = torch.tensor([carry + ids[i : i + chunk]], device=engine.base.device)
        yield next_token_nll(model, forward_hidden(model, None, inputs, ctx), inputs).mean().item()
        ctx.commit(drop_last=1)
        carry = ids[i + chunk - 1 : i + chunk]


def ttt_nll(engine: ttt.Engine, ids: list[int], config: dict | None = None) -> Iterator[float]:
    """TTT: a new session (``config`` as in ``Engine.create_session``) reads ``ids``; each chunk's loss_before."""
    session = engine.create_session(config)
    session.append_tokens(ids)
    session.end_document()
    while (report := session.train_next_chunk()) is not None:
        yield report.loss_before


@torch.no_grad()
def full_nll(engine: ttt.Engine, ids: list[int], chunk: int, max_context: int | None = None) -> Iterator[float]:
    """Full attention: each token sees all tokens before it, at most ``max_context`` (default: the model's context).

    Chunks that end within the first ``max_context`` tokens share one forward; each later chunk gets its own
    forward over the ``max_context`` tokens that end with it.
    """
    model, device = engine.base.model, engine.base.device
    cap = min(max_context or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings)
    if cap < chunk:
        raise ValueError(f"max_context ({cap}) must hold at least one chunk ({chunk} tokens)")
    shared = None  # (h [1, T, D], x [1, T]) of ids[:cap], computed when first needed
    for start in range(0, len(ids), chunk):
        end = min(start + chunk, len(ids))
        lo = max(0, end - cap)  # first token in this chunk's context
        if lo == 0:
            if shared is None:
                x = torch.tensor([ids[:cap]], device=device)
                shared = forward_hidden(model, None, x), x
            h, x = shared
        else:
            x = torch.tensor([ids[lo:end]], device=device)
            h = forward_hidden(model, None, x)
        first = max(start, 1)  # token 0 has no predecessor
        # hidden state j - lo - 1 predicts token j; logits one chunk at a time (a whole 8K-token one is 1.6 GB)
        yield token_nll(model, h[:, first - lo - 1 : end - lo - 1], x[:, first - lo : end - lo]).mean().item()
