"""What a session answers from, and how: every answer reads the exact spans and the window (``answer_prefix``)
before its prompt, under a snapshot of the fast weights; ``generate`` (chat), ``complete`` (no template) and
``score`` (mean NLL of a text). ``Session`` inherits these; the state they read is the session's (config, window,
pending tokens, span memory, fast weights, lock, version)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .generate import PrefixCache, SamplingParams, TokenLogprob, TokenStream
from .ingest import forward_hidden, next_token_nll


@dataclass
class Generation:
    """A finished answer."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per answer token, when asked (top_logprobs)
    echo_logprobs: list[TokenLogprob] = field(default_factory=list)  # per prompt token, for an echoed completion


class Answering:
    """The answer side of ``Session`` (a mixin: it adds no state of its own, only the prefix cache it keeps in
    ``_answer_prefix``)."""

    def recent_tokens(self) -> list[int]:
        """The window: the last ``context_tokens`` tokens of the document, trained or not (answers read it after
        the exact spans: ``answer_prefix``)."""
        n = self.config.ingest.context_tokens
        return (self.window + self.pending)[-n:] if n else []

    def exact_tokens(self) -> list[int]:
        """The exact spans every answer reads (memory.py): the best kept spans that have left the window."""
        with self.lock:
            window_start = self.stats.tokens_ingested + len(self.pending) - len(self.recent_tokens())
            return self.memory.exact_tokens(before=window_start)

    def answer_prefix(self) -> list[int]:
        """What every answer reads before its prompt: the exact spans, then the window (its last tokens that fit
        the model's context; ``Engine.prompt`` cuts further to leave room for the prompt and the answer)."""
        with self.lock:
            return (self.exact_tokens() + self.recent_tokens())[-(self.engine.base.cfg.max_position_embeddings - 1) :]

    def generate(self, messages: list[dict], *, stream: bool = False, **sampling) -> Generation | TokenStream:
        """Answer chat ``messages`` ([{"role": ..., "content": ...}]) from the fast weights and recent window.

        ``sampling``: the ``SamplingParams`` fields (``max_tokens`` 256, ``temperature`` 0 = greedy, ``top_p``,
        ``stop``, ``seed``, ``top_logprobs``, ``logit_bias``, penalties). With ``stream=True`` returns a
        ``TokenStream``: iterate it for text deltas; its ``finish_reason`` and token counts are set at the end.
        Never changes the weights.
        """
        return self._answer(self.engine.chat_ids(messages), SamplingParams(**sampling), stream)

    def complete(
        self, prompt: str | list[int], *, max_tokens: int = 16, echo: bool = False, stream: bool = False, **sampling
    ) -> Generation | TokenStream:
        """Continue ``prompt`` (text or token ids; no chat template) after the answer prefix, as ``generate``.

        ``echo``: also score the prompt, with ``top_logprobs`` set (``echo_logprobs``: the prompt's own tokens,
        each given the prefix and the tokens before it, as ``score``); ``max_tokens=0`` decodes nothing.
        """
        ids = self.engine.text_ids(prompt)
        params = SamplingParams(max_tokens, **sampling)
        return self._answer(ids, params, stream, echo=len(ids) if echo else 0)

    def _answer(self, ids: list[int], params: SamplingParams, stream: bool, echo: int = 0):
        with self.lock:
            # A snapshot (a few MB): the answer stays consistent even if an ingest runs meanwhile.
            fast = copy.deepcopy(self.fast).requires_grad_(False)
            prefix = self.answer_prefix()
            cache = self._prefix_cache(prefix)
        return self.engine.answer(ids, params, fast, prefix, stream, cache, echo)

    def _prefix_cache(self, prefix: list[int]) -> PrefixCache | None:
        """The answer prefix's keys/values under the current weights: computed at the first answer after a
        change, then reused by every answer until the next change (``version``). Call with the lock held."""
        if not prefix:
            return None
        if self._answer_prefix is None or self._answer_prefix[0] != self.version:
            self._answer_prefix = self.version, PrefixCache.build(self.engine.base.model, self.fast, prefix)
        return self._answer_prefix[1]

    @torch.no_grad()
    def score(self, text: str) -> float:
        """Mean NLL (nats/token) of ``text`` after the answer prefix (exact spans + window), under the fast
        weights; no update."""
        base = self.engine.base
        ids = base.tokenizer(text, add_special_tokens=False).input_ids
        with self.lock:
            exact, window = self.exact_tokens(), self.recent_tokens()
            cfg = self.config.ingest
            total, count = 0.0, 0
            # Long texts go in chunks, each after the exact spans and the preceding context_tokens (as in ingest).
            for start in range(0, len(ids), cfg.chunk_tokens):
                context = exact + ((window + ids[:start])[-cfg.context_tokens :] if cfg.context_tokens else [])
                piece = ids[start : start + cfg.chunk_tokens]
                if len(context) + len(piece) < 2:
                    continue
                tokens = torch.tensor([context + piece], device=base.device)
                nll = next_token_nll(
                    base.model, forward_hidden(base.model, self.fast, tokens), tokens, max(len(context) - 1, 0)
                )
                total += nll.sum().item()
                count += nll.numel()
        if count == 0:
            raise ValueError("text too short to score (needs 2 tokens, or 1 after a window)")
        return total / count
