"""Asking a memory about what was read: the probes of ``ttt recall`` and ``ttt eval``.

A memory is the base model (optionally with a session's fast weights) after a prefix of tokens, read once into
a KV cache (``PrefixedLM``). The six memories compared:
  * ``none``: the base model with nothing read (the control: what it guesses without the document);
  * ``window``: the base model with the session's recent window only (no TTT);
  * ``ttt``: what a session answers from: its fast weights and its answer prefix (window + exact spans, those
    related to the question asked), exactly what ``Session.generate`` uses;
  * ``weights``: the session's fast weights alone, nothing in context;
  * ``full``: the base model with the whole document in context, as far as the model's context allows;
  * ``evidence``: the base model with only the passages around the item's own facts (``around``): the ceiling of
    a memory that kept and found exactly what the question needs (per item, not per document).
Each ``Item`` (bench/items.py) is asked three ways: ``statement`` and ``qa`` compare the likelihood of the
right answer with that of each wrong one (a tie is a miss), ``generate`` checks a greedy chat answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

import ttt
from ttt.cache import KVCache
from ttt.generate import chat_prompt, stop_token_ids

from .items import Item

PROBES = ("statement", "qa", "generate")
EVIDENCE_BEFORE, EVIDENCE_AFTER = 64, 192  # tokens read around each of an item's facts by the ``evidence`` memory
QUESTION_ROOM = 128  # KV-cache tokens kept free after a prefix: a question or a fact sentence plus the answer


class PrefixedLM:
    """A model (base + optional fast weights) with a ``prefix`` read once into a KV cache.

    ``nll``, ``stream`` and ``greedy`` continue from the prefix; each call rewinds the cache to it, so questions
    never see one another. ``room`` keeps only the prefix's last tokens (as Engine.prompt does with a window);
    ``capacity`` (default: the prefix plus a question) bounds the prefix plus question that ``extend`` can reach.
    """

    def __init__(
        self, engine: ttt.Engine, prefix: Sequence[int], fast=None, room: int | None = None, capacity: int | None = None
    ):
        base = engine.base
        self.model, self.device, self.tokenizer = base.model, base.device, base.tokenizer
        self.adapters = fast.adapters() if fast is not None else None
        self.stop_ids = stop_token_ids(base.tokenizer, base.path)
        prefix = list(prefix[max(0, len(prefix) - room) :] if room is not None else prefix)
        capacity = capacity or min(len(prefix) + QUESTION_ROOM, base.cfg.max_position_embeddings)
        self.cache = KVCache(base.cfg, 1, capacity, base.device, base.dtype)
        self.prefix: list[int] = []
        self.start = 0  # tokens of the prefix in the cache
        self.extend(prefix)

    @torch.no_grad()
    def extend(self, ids: Sequence[int]) -> None:
        """Read more of the prefix. The prefix's last token stays out of the cache: it is fed with each
        continuation, so that it predicts the continuation's first token."""
        if not ids:
            return
        self.cache.length = self.start
        feed = self.prefix[-1:] + list(ids[:-1])
        if feed:
            self.model(torch.tensor([feed], device=self.device), self.adapters, self.cache)
        self.prefix += ids
        self.start = self.cache.length

    def _forward(self, ids: list[int], rewind: bool) -> torch.Tensor:
        if rewind:
            self.cache.length = self.start  # later writes overwrite the previous question's keys and values
        return self.model(torch.tensor([ids], device=self.device), self.adapters, self.cache)[0]  # [T, V]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.no_grad()
    def nll_after(self, context: list[int], targets: list[list[int]]) -> list[float]:
        """Total NLL (nats) of each of ``targets`` after the prefix and then ``context`` (read once for all)."""
        if not self.prefix and not context:
            raise ValueError("nothing before the targets: give a context")
        feed = self.prefix[-1:] + context
        last = self._forward(feed, rewind=True)[-1]  # predicts each target's first token
        middle = self.cache.length
        out = []
        for target in targets:
            logits = (
                torch.cat([last[None], self._forward(target[:-1], rewind=False)]) if len(target) > 1 else last[None]
            )
            self.cache.length = middle
            out.append(F.cross_entropy(logits, torch.tensor(target, device=self.device), reduction="sum").item())
        return out

    def nll(self, text: str) -> tuple[float, int]:
        """Total NLL (nats) of ``text``'s tokens after the prefix, and how many tokens were scored."""
        ids = self.encode(text)
        head, target = (ids[:1], ids[1:]) if not self.prefix else ([], ids)
        return self.nll_after(head, [target])[0], len(target)

    @torch.no_grad()
    def stream(self, messages: list[dict], max_tokens: int) -> Iterator[int]:
        """Greedy chat-answer token ids after the prefix, as they are decoded (stops at an end-of-turn token)."""
        logits = self._forward(self.prefix[-1:] + chat_prompt(self.tokenizer, messages), rewind=True)[-1]
        for i in range(max_tokens):
            tok = int(logits.argmax())
            if tok in self.stop_ids:
                return
            yield tok
            if i + 1 < max_tokens:
                logits = self._forward([tok], rewind=False)[-1]

    def greedy(self, messages: list[dict], max_tokens: int) -> str:
        """The greedy chat answer after the prefix (what Session.generate gives at temperature 0)."""
        return self.tokenizer.decode(list(self.stream(messages, max_tokens)), skip_special_tokens=True)


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def contains(answer: str, value: str) -> bool:
    """Whether ``answer`` states ``value``: the same words in order, ignoring case and punctuation."""
    return f" {_normal(value)} " in f" {_normal(answer)} "


class SessionLM:
    """The ``ttt`` memory: what a session reads before a prompt, and with which weights, depends on what is asked
    (``Session.reading``), so each query gets the ``PrefixedLM`` of its own prefix (the last one is kept:
    queries that read the same prefix share it)."""

    def __init__(self, engine: ttt.Engine, session: ttt.Session, room: int):
        self.engine, self.session, self.room = engine, session, room
        self.last: tuple[tuple[list[int], object], PrefixedLM] | None = None

    def __call__(self, query: str) -> PrefixedLM:
        prefix, fast = self.session.reading(query)
        if self.last is None or self.last[0] != (prefix, fast):
            self.last = (prefix, fast), PrefixedLM(self.engine, prefix, fast, room=self.room)
        return self.last[1]


def ask(memory: PrefixedLM | SessionLM, item: Item, answer_tokens: int = 16) -> dict:
    """All three probes of one item on one memory (a session's reads what the statement's head, or the
    question, asks about)."""
    reading = memory if isinstance(memory, SessionLM) else lambda query: memory
    out: dict = {}
    candidates = [item.answer, *item.wrong]
    if item.cloze is not None:
        head = item.statement(item.answer)[0]
        lm = reading(head)
        nll = lm.nll_after(lm.encode(head), [lm.encode(item.statement(c)[1]) for c in candidates])
        out["statement"] = nll[0] < min(nll[1:])
        out["statement_nll"] = nll
    lm = reading(item.question)
    messages = [{"role": "user", "content": item.question}]
    prompt = chat_prompt(lm.tokenizer, messages)
    nll = lm.nll_after(prompt, [lm.encode(c) for c in candidates])
    out["qa"] = nll[0] < min(nll[1:])
    out["qa_nll"] = nll
    out["answer"] = lm.greedy(messages, answer_tokens)
    out["generate"] = contains(out["answer"], item.answer)
    return out


def memories(
    engine: ttt.Engine,
    doc: Sequence[int],
    names: Sequence[str],
    session: ttt.Session | None = None,
    context_tokens: int = 512,
) -> dict[str, PrefixedLM | SessionLM]:
    """The memories ``names`` after reading ``doc`` (``session``: the one that read it, for "ttt" and "weights");
    "window" sees the last ``context_tokens`` tokens; each keeps the last tokens of its prefix that fit with a
    question (as ``Engine.prompt`` does)."""
    room = engine.base.cfg.max_position_embeddings - QUESTION_ROOM
    makers = {
        "none": lambda: PrefixedLM(engine, []),
        "window": lambda: PrefixedLM(
            engine, doc[max(0, len(doc) - context_tokens) :] if context_tokens else [], room=room
        ),
        "ttt": lambda: SessionLM(engine, session, room),
        "weights": lambda: PrefixedLM(engine, [], session.fast),
        "full": lambda: PrefixedLM(engine, doc, room=room),
    }
    return {name: makers[name]() for name in names}


def around(doc: Sequence[int], positions: Sequence[int]) -> list[int]:
    """The tokens of ``doc`` from ``EVIDENCE_BEFORE`` before to ``EVIDENCE_AFTER`` after each of ``positions``,
    overlapping passages merged, in document order."""
    spans: list[list[int]] = []
    for at in sorted(positions):
        lo, hi = max(0, at - EVIDENCE_BEFORE), min(len(doc), at + EVIDENCE_AFTER)
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    return [t for lo, hi in spans for t in doc[lo:hi]]


def coverage(session: ttt.Session, doc: Sequence[int], item: Item) -> dict[str, bool]:
    """Where a session's memory of ``doc`` stands on ``item``, to tell a miss of the memory from one of the model:
    ``kept``, its span pool holds a span that states the answer inside the passages ``around`` the item's facts;
    ``read_statement`` / ``read_qa``, what the statement's head / the question reads holds the answer there (such
    a span among its notes, or the passage in the window). ``doc`` is all the session read, from its start."""
    decode = session.engine.base.tokenizer.decode
    passages = [(at - EVIDENCE_BEFORE, at + EVIDENCE_AFTER) for at in item.positions]

    def states(span) -> bool:
        inside = any(lo < span.position + len(span.tokens) and span.position < hi for lo, hi in passages)
        return inside and contains(decode(span.tokens), item.answer)

    window = len(doc) - len(session.recent_tokens())
    in_window = any(contains(decode(doc[max(lo, window) : hi]), item.answer) for lo, hi in passages if hi > window)
    out = {"kept": any(states(sp) for sp in session.memory.spans)}
    asked = {"qa": item.question} | ({"statement": item.statement(item.answer)[0]} if item.cloze else {})
    for probe, query in asked.items():
        out[f"read_{probe}"] = in_window or any(states(sp) for sp in session.noted(query))
    return out


def accuracy(records: list[dict], memory: str, probe: str, **where) -> float | None:
    """The fraction of ``records`` (matching ``where``) that ``memory`` got right by ``probe``; None if none."""
    hits = [
        r[memory][probe]
        for r in records
        if memory in r and probe in r[memory] and all(r.get(k) == v for k, v in where.items())
    ]
    return sum(hits) / len(hits) if hits else None
