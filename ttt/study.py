"""Study: context distillation on templated questions about a chunk's surprising spans (Cartridges 2025,
Knowledge Modules 2025).

While a chunk is still in the window, the base model WITH the window in context is the teacher: asked a
question about one of the chunk's surprising spans, it answers by reading the span there. The fast weights,
WITHOUT the window, are trained to match the teacher's next-token distribution on that answer (KL on its
top-k logits), so that later, when the span has left the window, the session answers as if it were still
there. The 135M default model cannot write usable questions itself (measured: 1 in 12 was a question about
the sentence), so the question is a template around the span: 'What does the text say about "<its first
words>"?', and the answer the teacher reads out is the span.

Shapes: N questions, L the longest prompt + answer, K teacher logits kept per position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import RollingContext, apply_rope
from .generate import chat_prompt


class ContextView:
    """A RollingContext seen by N rows at once, read-only: the teacher's forwards leave it as it was."""

    def __init__(self, context: RollingContext, rows: int):
        self.context, self.rows = context, rows

    @property
    def length(self) -> int:
        return self.context.length

    def extend(self, layer: int, k, v, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [N, kv_heads, T, head_dim] of the new tokens; the cached ones are shared by every row
        old_k, old_v = self.context.k[layer], self.context.v[layer]
        if old_k is not None:
            k = torch.cat([old_k.expand(self.rows, -1, -1, -1), k], dim=2)
            v = torch.cat([old_v.expand(self.rows, -1, -1, -1), v], dim=2)
        return apply_rope(k, cos, sin), v


@dataclass
class StudyBatch:
    """What the fast weights are trained to match, without the window in context."""

    inputs: torch.Tensor  # [N, L] prompt + answer tokens (0 past a row's end)
    positions: torch.Tensor  # [M, 2] (row, position) whose next token is an answer token
    top_ids: torch.Tensor  # [M, K] the teacher's likeliest next tokens there
    top_logp: torch.Tensor  # [M, K] their log-probabilities, renormalised over the K


def questions(tokenizer, spans: Sequence[list[int]], head_tokens: int = 8) -> list[tuple[list[int], list[int]]]:
    """(chat prompt ids, answer ids) per span: a question quoting the span's first words, answered by the span."""
    out = []
    for tokens in spans:
        head = tokenizer.decode(tokens[: min(head_tokens, max(1, len(tokens) // 2))]).strip()
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": f'What does the text say about "{head}"?'}])
        out.append((prompt, tokenizer(tokenizer.decode(tokens).strip(), add_special_tokens=False).input_ids))
    return out


@torch.no_grad()
def teacher(
    model, context: RollingContext | None, pairs: list[tuple[list[int], list[int]]], top_k: int, device
) -> StudyBatch:
    """The base model's top-k next-token distribution on each answer, with ``context`` (the window) before it."""
    length = max(len(p) + len(a) for p, a in pairs)
    inputs = torch.zeros(len(pairs), length, dtype=torch.long)
    positions = []
    for i, (prompt, answer) in enumerate(pairs):
        inputs[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        positions += [(i, j) for j in range(len(prompt) - 1, len(prompt) + len(answer) - 1)]
    inputs, positions = inputs.to(device), torch.tensor(positions, device=device)
    view = ContextView(context, len(pairs)) if context is not None and context.length else None
    h = model.run_layers(model.embed(inputs), 0, model.cfg.num_layers, None, view)  # [N, L, D]
    logits = model.logits(h[positions[:, 0], positions[:, 1]])  # [M, V]
    top = torch.topk(logits, top_k, dim=-1)
    return StudyBatch(inputs, positions, top.indices, torch.log_softmax(top.values, dim=-1))


def student_loss(model, hidden: torch.Tensor, batch: StudyBatch) -> torch.Tensor:
    """KL(teacher's top-k || student) per answer token, averaged: ``hidden`` [N, L, D] is the student's
    final hidden states on ``batch.inputs`` with no context."""
    logp = F.log_softmax(model.logits(hidden[batch.positions[:, 0], batch.positions[:, 1]]), dim=-1)  # [M, V]
    student = logp.gather(1, batch.top_ids)  # [M, K]
    return (batch.top_logp.exp() * (batch.top_logp - student)).sum(dim=1).mean()
