"""What makes a session recall what it read after it left the window: surprising spans, kept and rehearsed.

Next-token prediction on a text read once stores its surface, not its facts (measured: a planted fact read
once and out of the window is recalled no better than by the window alone). A chunk's honest score already
tells which of its tokens the session did not expect (their NLL before the update: *surprise*); the spans
around those tokens are what a later question is most likely to need and least likely to be learned by one
step. A ``SpanMemory`` keeps the most surprising spans seen so far within a fixed token budget (memory stays
flat in document length), and they are used two ways:
  * **exact**: up to ``exact_tokens`` of them are read verbatim by every answer (as SR-TTT's exact cache of
    high-surprise tokens): by default those that share the rarest words with the question, right before it
    (``notes``: a question names what it asks about); or the most surprising ones before the window
    (``exact_select="surprise"``);
  * **replay**: after each chunk's step, one more step on a batch of spans, the chunk's new ones plus older ones
    drawn from the pool (spaced repetition, as Titans' surprise-driven memory), each span on its own (no context),
    so the fast weights learn the span itself and not its neighbourhood.

Shapes: T tokens in a chunk, N spans in a replay batch, L the longest of them.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from .config import RecallConfig
from .ingest import forward_hidden, restore, snapshot, token_nll, update
from .study import student_loss

SENTENCE_END = (".", "!", "?", ";", ":")
AFTER_PEAK = 3  # tokens kept after a span's most surprising one (a value's last digits, its full stop)
MIN_SPAN_TOKENS = 4  # shorter "sentences" (a lone line break, a chunk's cut first token) are not kept
MIN_PIECE_TOKENS = 8  # what is left of a sentence beside its spans is taken only from this long
WORD_REACH = 6  # tokens a span may grow by past AFTER_PEAK to end its last word
# notes: only spans at least this times as related as the best one of theirs (the question's, the hop's): fewer
# strays. On the question's own matches it is what the book needs (12 + 8 spans: 13 -> 15 of 45 by statement; no
# answer of 72 stories or 20 needles by statement or question changed, greedy needles 11 -> 11 of 20)
RELATED_CUT = 0.5
# words that name nothing: a span sharing only these with a question is not about it
COMMON_WORDS = frozenset(
    str.split(
        "a about after again all also am an and any are as at be been before being but by can could did do does "
        "doing for from had has have having he her here hers him his how i if in into is it its me my no not of on "
        "one or our out over she so some such than that the their them then there these they this those to too "
        "under up very was we were what when where which while who whom whose why will with would you your"
    )
)


@dataclass
class Span:
    """A piece of the document, verbatim, with how surprising it was and where it was read."""

    tokens: list[int]
    score: float  # the sum of its most surprising tokens' NLL (nats), when it was read (``select_spans``)
    position: int  # the index of its first token in the session's stream of trained tokens


@dataclass(frozen=True)
class TokenMarks:
    """What ``select_spans`` needs to know of each vocabulary entry ([V] bool each; V covers the tokenizer and
    the model's, possibly padded, vocabulary)."""

    ends: torch.Tensor  # its text ends a sentence or a line (without closing quotes: . ! ? ; : or a newline)
    joins: torch.Tensor  # its text goes on with the word before it (starts with a letter, a digit, - or ')


@functools.lru_cache(maxsize=4)
def token_marks(tokenizer, vocab_size: int) -> TokenMarks:
    """The ``TokenMarks`` of a tokenizer, computed once."""
    size = max(len(tokenizer), vocab_size)
    ends, joins = torch.zeros(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool)
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        ends[i] = "\n" in text or text.rstrip(" \"')").endswith(SENTENCE_END)
        joins[i] = text[:1].isalnum() or text[:1] in ("-", "'")
    return TokenMarks(ends, joins)


def pieces(
    tokens: Sequence[int], surprise: torch.Tensor, joins: torch.Tensor, start: int, stop: int, length: int
) -> list[tuple[int, int]]:
    """Spans of the sentence ``tokens[start:stop]``, as (lo, hi) pairs: the ``length`` tokens around its most
    surprising one (keeping what comes before it: a fact's key usually precedes its value; ``AFTER_PEAK`` tokens
    after it, more to finish its word), then the same in what is left on either side, down to pieces of
    ``MIN_PIECE_TOKENS``. A long sentence states several facts; cut once around its peak it kept one ("daughter of
    James Stevenson" lost to "(who died 1800)" later in the same sentence)."""
    found, todo = [], [(start, stop)]
    while todo:
        a, b = todo.pop()
        if b - a < (MIN_SPAN_TOKENS if (a, b) == (start, stop) else MIN_PIECE_TOKENS):
            continue
        peak = a + int(surprise[a:b].argmax())
        hi = min(b, peak + 1 + AFTER_PEAK)
        reach = min(b, hi + WORD_REACH, peak + length)  # never past the peak's own span
        while hi < reach and joins[tokens[hi]]:  # "eight-and-" + "thirty"
            hi += 1
        lo = max(a, hi - length)
        hi = min(b, lo + length)
        found.append((lo, hi))
        todo += [(a, lo), (hi, b)]
    return found


def select_spans(
    tokens: Sequence[int], surprise: torch.Tensor, marks: TokenMarks, cfg: RecallConfig, position: int
) -> list[Span]:
    """The chunk's most surprising spans: its sentences, a long one cut into ``pieces`` of at most
    ``cfg.span_tokens`` around its peaks.

    Surprising two ways: ``cfg.spans_per_chunk`` by their peaks (score: the summed surprise of their
    ``cfg.peak_tokens`` most surprising tokens: a name, a number), then ``cfg.dense_spans_per_chunk`` more by
    their density (the mean surprise of their most surprising half, times ``cfg.peak_tokens``: the same scale).
    A short fact ("Mary went to the kitchen.") never has as many peaks as a long sentence; by density it does
    (measured: 6 of 120 story facts kept by peaks alone, 57 by density; but density alone keeps fewer needles).

    ``tokens`` [T] and ``surprise`` [T] (NLL of each token before the update; 0 where unscored); ``position`` is
    the stream index of ``tokens[0]``.
    """
    bounds = (torch.nonzero(marks.ends[torch.as_tensor(tokens)]).flatten() + 1).tolist()
    starts = [0] + [b for b in bounds if b < len(tokens)]
    stops = [*starts[1:], len(tokens)]
    candidates = []
    for a, b in zip(starts, stops, strict=True):
        for k, (lo, hi) in enumerate(pieces(tokens, surprise, marks.joins, a, b, cfg.span_tokens)):
            peaks = torch.topk(surprise[lo:hi], min(cfg.peak_tokens, hi - lo)).values.sum().item()
            dense = torch.topk(surprise[lo:hi], (hi - lo + 1) // 2).values.mean().item() * cfg.peak_tokens
            if peaks > 0:  # by density only a sentence's first span: the rest of a long one is not a short fact
                candidates.append((Span(list(tokens[lo:hi]), peaks, position + lo), dense, k == 0))
    candidates.sort(key=lambda c: -c[0].score)
    by_peaks, rest = candidates[: cfg.spans_per_chunk], candidates[cfg.spans_per_chunk :]
    firsts = sorted((c for c in rest if c[2]), key=lambda c: -c[1])
    by_density = [Span(sp.tokens, dense, sp.position) for sp, dense, _ in firsts]
    return sorted([sp for sp, _, _ in by_peaks] + by_density[: cfg.dense_spans_per_chunk], key=lambda sp: -sp.score)


class SpanMemory:
    """The most surprising spans read so far, at most ``cfg.pool_tokens`` tokens in all: by descending score,
    each span that still fits is kept."""

    def __init__(self, cfg: RecallConfig):
        self.cfg = cfg
        self.spans: list[Span] = []  # by descending score
        self._words: dict[int, set[str]] = {}  # span position -> its words (``notes`` reads them at every answer)

    def add(self, spans: Sequence[Span]) -> list[Span]:
        """Keep ``spans`` if they rank within the budget; returns those kept."""
        self.spans = sorted([*self.spans, *spans], key=lambda sp: -sp.score)
        kept, total = [], 0
        for sp in self.spans:
            if total + len(sp.tokens) <= self.cfg.pool_tokens:
                kept.append(sp)
                total += len(sp.tokens)
        self.spans = kept
        self._words = {sp.position: self._words[sp.position] for sp in kept if sp.position in self._words}
        return [sp for sp in spans if any(sp is k for k in kept)]

    def exact_tokens(self, before: int) -> list[int]:
        """The most surprising spans that end before stream index ``before`` (where the window starts: what the
        window holds is read there already) within ``cfg.exact_tokens``, in document order, as one token list."""
        gone = [sp for sp in self.spans if sp.position + len(sp.tokens) <= before]
        return tokens_of(in_order(gone, self.cfg.exact_tokens))

    def notes(self, query: str, before: int, budget: int, decode) -> list[int]:
        """The tokens of the spans ``noted`` for ``query``, as one list."""
        return tokens_of(self.noted(query, before, budget, decode))

    def noted(self, query: str, before: int, budget: int, decode) -> list[Span]:
        """The kept spans that end before stream index ``before`` and share words with ``query``, the most related
        first, then those one hop further, within ``budget`` tokens, in document order.

        Related = the summed rarity (log(1 + spans / spans holding the word)) of the words a span shares with the
        query, common words aside; only those at least ``RELATED_CUT`` times as related as the best. One hop
        further: the spans sharing words with the most related span (not the query's), as related to those by
        the same cut: "Where is the milk?" finds "Mary picked up the milk." and then "Mary went to the garden."
        (36 stories, scratch run with density-scored spans: two-fact stories 0.42 with the hop, 0.00 without;
        needles the same). ``decode`` turns a span's tokens into text."""
        spans = [sp for sp in self.spans if sp.position + len(sp.tokens) <= before]
        asked = words(query)
        if not spans or not asked or budget <= 0:
            return []
        held = [self._words_of(sp, decode) for sp in spans]
        first = related(asked, held, spans, RELATED_CUT)
        if not first:
            return []
        second = related(held[first[0]] - asked, held, spans, RELATED_CUT, skip=set(first))
        return in_order([spans[i] for i in first + second], budget)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The spans as flat tensors (for a checkpoint); ``load_tensors`` reads them back."""
        return {
            "span_tokens": torch.tensor([t for sp in self.spans for t in sp.tokens], dtype=torch.int64),
            "span_lengths": torch.tensor([len(sp.tokens) for sp in self.spans], dtype=torch.int64),
            "span_positions": torch.tensor([sp.position for sp in self.spans], dtype=torch.int64),
            "span_scores": torch.tensor([sp.score for sp in self.spans], dtype=torch.float64),
        }

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._words = {}
        if "span_tokens" not in tensors:  # a checkpoint from before span memories: none kept
            self.spans = []
            return
        pieces = torch.split(tensors["span_tokens"], tensors["span_lengths"].tolist())
        self.spans = [
            Span(p.tolist(), score, position)
            for p, score, position in zip(
                pieces, tensors["span_scores"].tolist(), tensors["span_positions"].tolist(), strict=True
            )
        ]

    def _words_of(self, span: Span, decode) -> set[str]:
        """``words`` of a kept span's text, computed once (positions are unique: each token is read once)."""
        if span.position not in self._words:
            self._words[span.position] = words(decode(span.tokens))
        return self._words[span.position]

    def replay_batch(self, new: Sequence[Span], seed: int) -> list[Span]:
        """The chunk's new spans plus up to ``cfg.replay_spans`` older ones drawn at random (seeded)."""
        older = [sp for sp in self.spans if not any(sp is n for n in new)]
        drawn = random.Random(seed).sample(older, min(self.cfg.replay_spans, len(older)))
        return [*new, *drawn]


def related(
    asked: set[str], held: Sequence[set[str]], spans: Sequence[Span], cut: float, skip: Collection[int] = ()
) -> list[int]:
    """Indices of the spans (``held``: each one's words) sharing words with ``asked``, ``skip`` aside, the most
    related first (the summed rarity of the shared words; ties: the more surprising first), only those at least
    ``cut`` times as related as the best of them."""
    holders = {w: sum(w in h for h in held) for w in asked}
    scored = [
        (sum(math.log1p(len(held) / holders[w]) for w in asked & h), i)
        for i, h in enumerate(held)
        if asked & h and i not in skip
    ]
    best = max((r for r, _ in scored), default=0.0)
    ranked = sorted((r for r in scored if r[0] >= cut * best), key=lambda r: (-r[0], -spans[r[1]].score))
    return [i for _, i in ranked]


def in_order(ranked: Sequence[Span], budget: int) -> list[Span]:
    """The first of ``ranked`` that fit ``budget`` tokens (each span whole or not at all), in document order."""
    chosen, total = [], 0
    for sp in ranked:
        if total + len(sp.tokens) <= budget:
            chosen.append(sp)
            total += len(sp.tokens)
    return sorted(chosen, key=lambda sp: sp.position)


def tokens_of(spans: Sequence[Span]) -> list[int]:
    """The spans' tokens as one list, in the order given."""
    return [t for sp in spans for t in sp.tokens]


def words(text: str) -> set[str]:
    """The words of ``text`` that can name something: lower case, letters and digits, common words aside."""
    return set(re.findall(r"[a-z0-9]+", text.lower())) - COMMON_WORDS


def span_batch(spans: Sequence[Span], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [N, L] and targets [N, L] (-100 past a span's end and at its first token: nothing predicts it)."""
    length = max(len(sp.tokens) for sp in spans)
    inputs = torch.zeros(len(spans), length, dtype=torch.long)
    targets = torch.full((len(spans), length), -100, dtype=torch.long)
    for i, sp in enumerate(spans):
        inputs[i, : len(sp.tokens)] = torch.tensor(sp.tokens)
        targets[i, : len(sp.tokens) - 1] = torch.tensor(sp.tokens[1:])
    return inputs.to(device), targets.to(device)


def rehearse(
    model, fast, optimizer, spans: Sequence[Span], study, ingest_cfg, recall_cfg: RecallConfig
) -> float | None:
    """``recall_cfg.replay_steps`` steps on ``spans`` (next-token prediction, each span alone) plus, when ``study``
    (a ``study.StudyBatch``) is given, its distillation loss. Returns the loss after the steps (measured when
    ``ingest_cfg.measure_loss_after``, else the last step's), or None when anything went non-finite: then every
    step of this call is undone, as a chunk's are."""
    params = [p for p in fast.parameters() if p.requires_grad]
    for group in optimizer.param_groups:
        group["lr"] = recall_cfg.replay_lr or ingest_cfg.lr
    saved = snapshot(params, optimizer)
    try:
        for step in range(recall_cfg.replay_steps):
            loss = _rehearsal_loss(model, fast, spans, study, ingest_cfg)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite rehearsal loss at step {step}")
            loss.backward()
            _, why, _ = update(params, optimizer, ingest_cfg, step)
            if why is not None:
                raise FloatingPointError(why)
        if ingest_cfg.measure_loss_after:  # finite weights can still make the loss non-finite
            with torch.no_grad():
                loss = _rehearsal_loss(model, fast, spans, study, ingest_cfg)
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss after the rehearsal")
        return loss.item()
    except FloatingPointError:
        restore(params, optimizer, saved)
        return None
    except BaseException:  # out of memory, interrupted, ...: nothing half done stays
        restore(params, optimizer, saved)
        raise
    finally:
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = ingest_cfg.lr


def _rehearsal_loss(model, fast, spans: Sequence[Span], study, ingest_cfg) -> torch.Tensor:
    """Mean NLL over the spans' tokens (each span alone) plus the study batch's distillation loss."""
    device = next(fast.parameters()).device
    loss = torch.zeros((), device=device)
    if spans:
        inputs, targets = span_batch(spans, device)
        h = forward_hidden(model, fast, inputs, None, None, ingest_cfg.activation_checkpointing)
        loss = loss + token_nll(model, h, targets).sum() / (targets != -100).sum()  # token_nll is 0 at -100
    if study is not None:
        h = forward_hidden(model, fast, study.inputs, None, None, ingest_cfg.activation_checkpointing)
        loss = loss + student_loss(model, h, study)
    return loss
