"""What a session answers from, and how: every answer reads the window and the exact spans (``reading``:
those related to the question right before it, or the most surprising before the window) before its prompt,
under a snapshot of the fast weights, or the spans related to its question alone under the base model
(``notes_alone``); ``generate`` (chat), ``complete`` (no template) and ``score`` (mean NLL of a text).
``Session`` inherits these; the state they read is the session's (config, window, pending tokens, span memory,
fast weights, lock, version)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .fast_weights import FastWeights
from .generate import PrefixCache, SamplingParams, TokenLogprob, TokenStream
from .ingest import forward_hidden, next_token_nll
from .memory import Span, tokens_of


@dataclass
class Generation:
    """A finished answer."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per answer token, when asked (top_logprobs)
    echo_logprobs: list[TokenLogprob] = field(default_factory=list)  # per prompt token, for an echoed completion


@dataclass
class HeldPrefix:
    """The keys/values of every answer's prefix under one state of the fast weights (``weights_version``), and
    whether an answer has read them: those built ahead (``warm_prefix``) and never read stop the warming."""

    weights_version: int
    cache: PrefixCache
    read: bool


class Answering:
    """The answer side of ``Session`` (a mixin: it adds no state of its own, only the prefix cache it keeps in
    ``_answer_prefix``, a ``HeldPrefix`` or None)."""

    def recent_tokens(self) -> list[int]:
        """The window answers read: the last ``context_tokens`` trained tokens, then those read since. So between
        two trained chunks the window only grows, and the answers' cached keys/values of it are extended, not
        rebuilt (``_prefix_cache``). A session that has read as many as the window holds and not trained them yet
        (ingest behind the stream) reads them from a start that moves on by half the window at a time (the last n
        to 1.5 n of them): a start that moved at every piece read would rebuild the keys/values at every piece."""
        n = self.config.ingest.context_tokens
        if not n:
            return []
        if len(self.pending) < n:
            return self.window[-n:] + self.pending
        stride = max(1, n // 2)
        return self.pending[(len(self.pending) - n) // stride * stride :]

    def exact_tokens(self) -> list[int]:
        """The most surprising kept spans that have left the window, within ``exact_tokens`` (memory.py): what
        every answer reads before the window with ``exact_select="surprise"``."""
        with self.lock:
            return self.memory.exact_tokens(before=self._window_start())

    def notes(self, query: str, budget: int | None = None) -> list[int]:
        """The tokens of the spans ``noted`` for ``query``: what an answer to it reads right before its prompt."""
        return tokens_of(self.noted(query, budget))

    def noted(self, query: str, budget: int | None = None) -> list[Span]:
        """The kept spans related to ``query`` that have left the window, within ``exact_tokens`` (and
        ``budget``), in document order, with ``exact_select="question"`` (memory.py; none with "surprise")."""
        recall = self.config.recall
        if recall.exact_select != "question":
            return []
        budget = recall.exact_tokens if budget is None else min(budget, recall.exact_tokens)
        with self.lock:
            return self.memory.noted(query, self._window_start(), budget, self.engine.base.tokenizer.decode)

    def _window_start(self) -> int:
        """The stream index of the window's first token: what starts there is read in the window itself."""
        return self.stats.tokens_ingested + len(self.pending) - len(self.recent_tokens())

    def answer_prefix(self, query: str = "") -> list[int]:
        """What an answer to ``query`` reads before its prompt (``reading``)."""
        return self.reading(query)[0]

    def reading(self, query: str = "") -> tuple[list[int], FastWeights | None]:
        """What an answer to ``query`` reads before its prompt, and the fast weights it reads with (None: the base
        model): the window, after the most surprising spans or followed by the spans related to ``query``
        (``exact_select``), under the fast weights; or those spans alone under the base model (``notes_alone``).
        Its last tokens that fit the model's context (``Engine.prompt`` cuts further to leave room for the
        prompt and the answer)."""
        with self.lock:
            notes = self.notes(query)
            tokens, fast = (notes, None) if self._notes_alone(notes) else (self._before_prompt() + notes, self.fast)
            return tokens[-(self.engine.base.cfg.max_position_embeddings - 1) :], fast

    def _notes_alone(self, notes: list[int]) -> bool:
        """Whether an answer that found ``notes`` reads them alone, with the base model (``notes_alone``). On the
        book of ``ttt recall`` the fast weights (next-token learning of 64 chunks) pulled answers toward its
        frequent names ("Charles" for the rector "Dr Shirley", whose span the notes held) and the window's 512
        unrelated tokens distracted: the notes alone under the base model ranked 5 more statements and 4 more
        questions first of 45, the stories as before (docs/recall.md, thirteenth session)."""
        return bool(notes) and self.config.recall.notes_alone

    def _before_prompt(self) -> list[int]:
        """The part of every answer's prefix that does not depend on the question (its keys/values are cached:
        ``_prefix_cache``): the window, after the most surprising spans with ``exact_select="surprise"``; its
        last tokens that fit the model's context."""
        tokens = self._exact_before_window() + self.recent_tokens()
        return tokens[-(self.engine.base.cfg.max_position_embeddings - 1) :]

    def _exact_before_window(self) -> list[int]:
        return self.exact_tokens() if self.config.recall.tokens_before_window else []

    def generate(self, messages: list[dict], *, stream: bool = False, **sampling) -> Generation | TokenStream:
        """Answer chat ``messages`` ([{"role": ..., "content": ...}]) from the fast weights and recent window.

        ``sampling``: the ``SamplingParams`` fields (``max_tokens`` 256, ``temperature`` 0 = greedy, ``top_p``,
        ``stop``, ``seed``, ``top_logprobs``, ``logit_bias``, penalties). With ``stream=True`` returns a
        ``TokenStream``: iterate it for text deltas; its ``finish_reason`` and token counts are set at the end.
        Never changes the weights.
        """
        ids = self.engine.chat_ids(messages)  # bad messages: ValueError here
        asked = [m["content"] for m in messages if m["role"] == "user"]
        return self._answer(ids, SamplingParams(**sampling), stream, query=asked[-1] if asked else "")

    def complete(
        self, prompt: str | list[int], *, max_tokens: int = 16, echo: bool = False, stream: bool = False, **sampling
    ) -> Generation | TokenStream:
        """Continue ``prompt`` (text or token ids; no chat template) after the answer prefix, as ``generate``.

        ``echo``: also score the prompt, with ``top_logprobs`` set (``echo_logprobs``: the prompt's own tokens,
        each given the prefix and the tokens before it, as ``score``); ``max_tokens=0`` decodes nothing.
        """
        ids = self.engine.text_ids(prompt)
        params = SamplingParams(max_tokens, **sampling)
        query = prompt if isinstance(prompt, str) else self.engine.base.tokenizer.decode(ids)
        return self._answer(ids, params, stream, echo=len(ids) if echo else 0, query=query)

    def _answer(self, ids: list[int], params: SamplingParams, stream: bool, echo: int = 0, query: str = ""):
        with self.lock:
            # the notes come out of the window's room, never the prompt's or the answer's
            notes = self.notes(query, self.engine.base.cfg.max_position_embeddings - params.max_tokens - len(ids))
            if self._notes_alone(notes):
                fast, prefix, cache = None, [], None
                self.engine.answer_prefixes["notes_alone"] += 1
            else:
                # A snapshot (a few MB): the answer stays consistent even if an ingest runs meanwhile.
                fast = copy.deepcopy(self.fast).requires_grad_(False)
                prefix = self._before_prompt()
                cache, found = self._prefix_cache(prefix)
                if cache is not None:
                    self.engine.answer_prefixes[found] += 1
        return self.engine.answer(notes + ids, params, fast, prefix, stream, cache, echo)

    def _prefix_cache(self, prefix: list[int], read: bool = True) -> tuple[PrefixCache | None, str]:
        """The answer prefix's keys/values under the current weights: computed at the first answer after the
        weights changed (``weights_version``) or ahead of it (``warm_prefix``), extended by the tokens read since
        (the window grows between trained chunks), reused as it is otherwise. ``read``: an answer reads them.
        Returns them and how they were found: "ready", "extended" or "built" (None, "" for an empty prefix).
        Call with the lock held."""
        if not prefix:
            return None, ""
        model, held = self.engine.base.model, self._answer_prefix
        cache = held.cache if held is not None else PrefixCache([], [], [])
        n = len(cache.tokens)
        if held is None or held.weights_version != self.weights_version or not n or prefix[:n] != cache.tokens:
            cache, found = PrefixCache.build(model, self.fast, prefix), "built"
        elif len(prefix) > n:
            cache, found = cache.extended(model, self.fast, prefix[n:]), "extended"
        else:
            found = "ready"
        self._answer_prefix = HeldPrefix(self.weights_version, cache, read)
        return cache, found

    @property
    def talked_to(self) -> bool:
        """The answers' prefix is worth keeping up to date ahead of the questions (``warm_prefix``): an answer read
        the one cached under the weights before these (the session is asked while it reads), or it is of these."""
        held = self._answer_prefix
        return held is not None and (held.read or held.weights_version == self.weights_version)

    def warm_prefix(self) -> bool:
        """Bring the answers' prefix up to date before anyone asks, if the session is ``talked_to``: rebuilt under
        weights a trained chunk has just changed, extended by the tokens read since. A question then prefills only
        its own prompt (the window's keys/values under new weights, and those of the tokens read since, were most
        of its wait under ingest load). One kept up to date but not read before the weights change again stops the
        warming until an answer reads one again, so a session that only reads pays for one chunk of it at most.
        Returns whether it computed anything."""
        with self.lock:
            if not self.talked_to:
                return False
            held, prefix = self._answer_prefix, self._before_prompt()
            current = held.weights_version == self.weights_version
            if current and held.cache.tokens == prefix:
                return False
            if self._prefix_cache(prefix, read=current and held.read)[0] is None:
                self._answer_prefix = None  # nothing to read before a prompt (an empty window)
            return True

    @torch.no_grad()
    def score(self, text: str) -> float:
        """Mean NLL (nats/token) of ``text`` after what an answer to it reads (``reading``: the window and the
        exact spans under the fast weights, or the spans related to ``text`` alone under the base model); no
        update."""
        base = self.engine.base
        ids = base.tokenizer(text, add_special_tokens=False).input_ids
        with self.lock:
            notes = self.notes(text)
            if self._notes_alone(notes):
                before, window, fast = [], [], None
            else:
                before, window, fast = self._exact_before_window(), self.recent_tokens(), self.fast
            cfg = self.config.ingest
            total, count = 0.0, 0
            # Long texts go in chunks, each after the preceding context_tokens (as in ingest) and the exact spans.
            for start in range(0, len(ids), cfg.chunk_tokens):
                recent = (window + ids[:start])[-cfg.context_tokens :] if cfg.context_tokens else []
                context = before + recent + notes
                piece = ids[start : start + cfg.chunk_tokens]
                if len(context) + len(piece) < 2:
                    continue
                tokens = torch.tensor([context + piece], device=base.device)
                nll = next_token_nll(
                    base.model, forward_hidden(base.model, fast, tokens), tokens, max(len(context) - 1, 0)
                )
                total += nll.sum().item()
                count += nll.numel()
        if count == 0:
            raise ValueError("text too short to score (needs 2 tokens, or 1 after a window)")
        return total / count
