"""Recall probe: facts planted at several depths of a long document, asked back after reading it.

A fact is a sentence "The secret code of the <adjective> <animal> is <5 digits>." inserted at a line start at a
given depth of filler text. After the document is read, each memory is asked for every fact two ways:
  * score: the total NLL of the fact's sentence with its right value vs ``wrong_values`` random wrong ones
    (same digit count, so the same tokens but the value's); correct when the right value is the likeliest;
  * generate: a greedy chat answer to "What is the secret code of ...?"; correct when it contains the value.
Memories: ``ttt`` (the session's fast weights + its window, what Session.score / Session.generate compute),
``window`` (the base model with the same window, no TTT: the control) and ``full`` (the base model with the
whole document in context, as far as the model's context allows). Each memory's context is run once per
document into a KV cache and reused for every question (tests check this equals Session.score/generate).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import ttt
from ttt.generate import chat_prompt, stop_token_ids
from ttt.model import KVCache

ADJECTIVES = ("amber", "blue", "crimson", "dusty", "golden", "hidden", "ivory", "jade", "lunar", "misty", "olive",
              "quiet", "rusty", "silver", "violet", "wild")
ANIMALS = ("badger", "crane", "falcon", "gecko", "heron", "ibis", "jackal", "koala", "lynx", "marten", "newt",
           "otter", "puffin", "raven", "stoat", "walrus")
MEMORIES = ("window", "ttt", "full")
PROBES = ("score", "generate")
QUESTION_ROOM = 128  # KV-cache tokens kept free after a prefix: a question or a fact sentence plus the answer


@dataclass
class RecallConfig:
    lengths: tuple[int, ...] = (1024, 2048)  # document lengths in tokens, facts included
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)  # where facts sit, as a fraction of the document
    facts_per_depth: int = 2  # consecutive facts at each depth (different keys)
    wrong_values: int = 4  # score probe: chance is 1 / (wrong_values + 1)
    answer_tokens: int = 24  # generate probe: greedy tokens per answer (the model often restates the question first)
    seed: int = 0


@dataclass
class Fact:
    key: str  # "the amber heron"
    value: str  # "48213"
    wrong: list[str]  # values of the same length for the score probe
    depth: float  # requested depth (fraction of the document)
    position: int = 0  # token index where the sentence starts in the document

    def sentence(self, value: str | None = None) -> str:
        return f"The secret code of {self.key} is {value or self.value}."

    def question(self) -> list[dict]:
        return [{"role": "user", "content": f"What is the secret code of {self.key}? Answer with the number only."}]


def make_facts(cfg: RecallConfig, rng: random.Random) -> list[Fact]:
    """``facts_per_depth`` facts per depth, with distinct keys and distinct 5-digit values."""
    n = len(cfg.depths) * cfg.facts_per_depth
    pairs = [(a, b) for a in ADJECTIVES for b in ANIMALS]
    if n > len(pairs):
        raise ValueError(f"at most {len(pairs)} facts per document")
    keys = rng.sample(pairs, n)
    values = [str(v) for v in rng.sample(range(10000, 100000), n * (cfg.wrong_values + 1))]
    return [
        Fact(f"the {a} {b}", values[i], values[n + i * cfg.wrong_values : n + (i + 1) * cfg.wrong_values],
             cfg.depths[i // cfg.facts_per_depth])
        for i, (a, b) in enumerate(keys)
    ]


def plant(tokenizer, filler: list[int], facts: list[Fact], length: int) -> list[int]:
    """A ``length``-token document: filler tokens with each depth's facts inserted at the next line start.

    Sets each fact's ``position``. Facts of one depth are consecutive, one per line.
    """
    pieces = [tokenizer(f.sentence() + "\n", add_special_tokens=False).input_ids for f in facts]
    room = length - sum(map(len, pieces))
    if room < len(facts) or len(filler) < room:
        raise ValueError(f"a {length}-token document cannot hold {len(facts)} facts with {len(filler)} filler tokens")
    filler = filler[:room]
    newline_after = [i + 1 for i, t in enumerate(filler) if tokenizer.decode([t]).endswith("\n")]
    doc, taken = [], 0
    for fact, piece in zip(facts, pieces, strict=True):
        target = round(fact.depth * room)
        at = next((i for i in newline_after if i >= target), target)  # a line start, else exactly there
        at = max(at, taken)
        doc += filler[taken:at]
        taken = at
        fact.position = len(doc)
        doc += piece
    return doc + filler[taken:]


class PrefixedLM:
    """A model (base + optional fast weights) with a ``prefix`` read once into a KV cache.

    ``nll``, ``stream`` and ``greedy`` continue from the prefix; each call rewinds the cache to it, so questions
    never see one another. ``room`` keeps only the prefix's last tokens (as Engine.prompt does with a window);
    ``capacity`` (default: the prefix plus a question) bounds the prefix plus question that ``extend`` can reach.
    """

    def __init__(self, engine: ttt.Engine, prefix: list[int], fast=None, room: int | None = None,
                 capacity: int | None = None):
        base = engine.base
        self.model, self.device, self.tokenizer = base.model, base.device, base.tokenizer
        self.adapters = fast.adapters() if fast is not None else None
        self.stop_ids = stop_token_ids(base.tokenizer, base.path)
        prefix = prefix[max(0, len(prefix) - room) :] if room is not None else list(prefix)
        capacity = capacity or min(len(prefix) + QUESTION_ROOM, base.cfg.max_position_embeddings)
        self.cache = KVCache(base.cfg, 1, capacity, base.device, base.dtype)
        self.prefix: list[int] = []
        self.start = 0  # tokens of the prefix in the cache
        self.extend(prefix)

    @torch.no_grad()
    def extend(self, ids: list[int]) -> None:
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

    @torch.no_grad()
    def nll(self, text: str) -> tuple[float, int]:
        """Total NLL (nats) of ``text``'s tokens after the prefix, and how many tokens were scored."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if self.prefix:
            logits, targets = self._forward(self.prefix[-1:] + ids[:-1], rewind=True), ids
        else:  # nothing predicts the first token
            logits, targets = self._forward(ids, rewind=True)[:-1], ids[1:]
        nll = F.cross_entropy(logits, torch.tensor(targets, device=self.device), reduction="sum")
        return nll.item(), len(targets)

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


def ask(lm: PrefixedLM, fact: Fact, cfg: RecallConfig) -> dict:
    """Both probes of one fact on one memory."""
    nll_right, _ = lm.nll(fact.sentence())
    nll_wrong = [lm.nll(fact.sentence(v))[0] for v in fact.wrong]
    answer = lm.greedy(fact.question(), cfg.answer_tokens)
    return {
        "score": nll_right < min(nll_wrong),
        "generate": fact.value in answer,
        "nll_right": nll_right,
        "nll_wrong": nll_wrong,
        "answer": answer,
    }


def memories(engine: ttt.Engine, session: ttt.Session, doc: list[int]) -> dict[str, PrefixedLM]:
    """The three memories after ``session`` has read ``doc``; full attention keeps what fits with an answer."""
    window = session.recent_tokens()
    return {
        "ttt": PrefixedLM(engine, window, session.fast),
        "window": PrefixedLM(engine, window),
        "full": PrefixedLM(engine, doc, room=engine.base.cfg.max_position_embeddings - QUESTION_ROOM),
    }


def run_recall(
    engine: ttt.Engine,
    filler: list[int],
    cfg: RecallConfig,
    session_config: dict | None = None,
    step: Callable[[], None] = lambda: None,
) -> Iterator[dict]:
    """For each document length: plant facts, let a new session read the document, probe every memory.

    Yields one record per (length, fact). ``step`` is called after every trained chunk and every probed fact.
    """
    rng = random.Random(cfg.seed)
    for length in cfg.lengths:
        facts = make_facts(cfg, rng)
        doc = plant(engine.base.tokenizer, filler, facts, length)
        session = engine.create_session(session_config)
        session.append_tokens(doc)
        session.end_document()
        while session.train_next_chunk() is not None:
            step()
        window_start = length - len(session.recent_tokens())
        lms = memories(engine, session, doc)
        for fact in facts:
            record = {"length": length, "depth": fact.depth, "position": fact.position, "key": fact.key,
                      "value": fact.value, "in_window": fact.position >= window_start,
                      "in_full_context": fact.position >= length - len(lms["full"].prefix)}
            for name, lm in lms.items():
                record[name] = ask(lm, fact, cfg)
            step()
            yield record


def accuracy(records: list[dict], lengths, depths) -> dict[str, dict[str, list[list[float | None]]]]:
    """accuracy[memory][probe][depth index][length index]: the fraction of facts recalled (None: no facts)."""
    out: dict[str, dict[str, list[list[float | None]]]] = {}
    for memory in MEMORIES:
        out[memory] = {}
        for probe in PROBES:
            grid = []
            for d in depths:
                row = []
                for n in lengths:
                    hits = [r[memory][probe] for r in records if r["depth"] == d and r["length"] == n]
                    row.append(sum(hits) / len(hits) if hits else None)
                grid.append(row)
            out[memory][probe] = grid
    return out
