"""Answering: chat template, sampling and token streaming from a session's fast weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .decode import DecodeBatch
from .fast_weights import FastWeights
from .model import Transformer


@dataclass
class PrefixCache:
    """Rotated keys and values of the tokens a session's answers start with (its window).

    Computed once per state of the session's weights (and extended as the document grows), so that a chat
    prefills only its own prompt: the time to first token stops depending on the window (and never depended on
    the document).
    """

    tokens: list[int]
    k: list[torch.Tensor]  # per layer [1, kv_heads, P, head_dim]
    v: list[torch.Tensor]

    @classmethod
    def build(cls, model: Transformer, fast: FastWeights | None, tokens: list[int]) -> PrefixCache:
        return cls([], [], []).extended(model, fast, tokens)

    @torch.no_grad()
    def extended(self, model: Transformer, fast: FastWeights | None, tokens: list[int]) -> PrefixCache:
        """These keys/values followed by those of ``tokens``: only the new tokens run (``fast`` must be the weights
        these were computed under)."""
        weight = model.embed_tokens.weight
        held = len(self.tokens)
        cache = KVCache(model.cfg, 1, held + len(tokens), weight.device, weight.dtype)
        for layer, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            cache.k[layer][:, :, :held], cache.v[layer][:, :, :held] = k, v
        cache.length = held
        adapters = fast.adapters() if fast is not None else None
        model.run_layers(
            model.embed(torch.tensor([tokens], device=weight.device)), 0, model.cfg.num_layers, adapters, cache
        )  # no LM head: only the keys and values are wanted
        return PrefixCache(self.tokens + list(tokens), cache.k, cache.v)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's count; the length bounds the per-token stop search
MAX_TOP_LOGPROBS, MAX_LOGIT_BIAS = 20, 300  # OpenAI's caps


@dataclass
class SamplingParams:
    """How to pick each token. ``logit_bias`` (token id -> added to its logit, -100 to 100) and the penalties
    (OpenAI's: subtract ``presence_penalty`` once and ``frequency_penalty`` per earlier occurrence of a token in
    the answer) change what is sampled; ``top_logprobs`` (None: none recorded; 0 to 20) records each token's
    log-probability under the model (before temperature, top_p, bias and penalties) and its k most likely
    alternatives."""

    max_tokens: int = 256  # 0: decode nothing (a completion that only echoes and scores its prompt)
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        self.stop = [s for s in stops if s]
        if len(self.stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or any(not -100 <= b <= 100 for b in self.logit_bias.values()):
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens, each biased by -100 to 100")
        if any(t < 0 for t in self.logit_bias):
            raise ValueError("logit_bias keys must be token ids >= 0")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be between -2 and 2")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0

    def bias_vector(self, vocab: int, device) -> torch.Tensor:
        """``logit_bias`` as a dense [V] tensor (fp32)."""
        bias = torch.zeros(vocab, device=device)
        if self.logit_bias:
            ids = list(self.logit_bias)
            bias[torch.tensor(ids, device=device)] = torch.tensor([self.logit_bias[i] for i in ids], device=device)
        return bias


@dataclass
class TokenLogprob:
    """One token's log-probability under the model and its ``k`` most likely alternatives (id, logprob)."""

    token: int
    logprob: float | None  # None: nothing came before the token (the first of a prompt with no window)
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int, rows: int = 256) -> list[TokenLogprob]:
    """``logits`` [T, V] are the predictions for ``tokens`` [T]: each one's logprob and the top ``k`` (in blocks
    of ``rows``, so that a long prompt never holds a [T, V] fp32 copy)."""
    out = []
    for start in range(0, len(tokens), rows):
        logp = torch.log_softmax(logits[start : start + rows].float(), dim=-1)
        block = tokens[start : start + rows]
        chosen = logp.gather(1, torch.tensor(block, device=logp.device)[:, None])[:, 0].tolist()
        top_p, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        out += [
            TokenLogprob(t, lp, list(zip(ids, ps, strict=True)))
            for t, lp, ids, ps in zip(block, chosen, top_i.tolist(), top_p.tolist(), strict=True)
        ]
    return out


def adjust_logits(logits: torch.Tensor, p: SamplingParams, bias: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``logits`` [V] plus ``bias`` [V] (``p.bias_vector``) minus OpenAI's presence and frequency penalties for
    ``counts`` [V] (how often each token is in the answer so far)."""
    return logits + bias - (p.presence_penalty * (counts > 0) + p.frequency_penalty * counts)


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` through the model's chat template, ending with the assistant's turn."""
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError("each message needs a role (system, user or assistant) and a string content")
    if not messages:
        raise ValueError("messages must not be empty")
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a base model without a template: plain "role: content" lines
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    # The template writes special tokens as text; the tokenizer maps them back to their ids.
    return tokenizer(text, add_special_tokens=False).input_ids


def sample_next(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token id from logits [V] (fp32). Temperatures below 1e-5 are greedy: dividing by them overflows."""
    if p.temperature < 1e-5:
        return int(logits.argmax())
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


class TokenStream:
    """One answer: iterate it for text deltas; ``finish_reason`` and token counts are set once it ends.

    finish_reason: "stop" (end-of-turn token or a stop string) or "length" (max_tokens reached).
    ``logprobs``: one TokenLogprob per answer token when ``params.top_logprobs`` is set, appended as the tokens
    are sampled; ``echo_logprobs``: the same for the prompt's last ``echo`` tokens (scored in its prefill).

    It is also a row of ``decode.DecodeBatch``, which feeds it its prompt's logits (``prefilled``) and then
    one next-token distribution per step (``accept``); iterating a stream on its own runs a batch of one.
    """

    def __init__(
        self,
        model: Transformer,
        fast: FastWeights | None,
        tokenizer,
        prompt: list[int],
        params: SamplingParams,
        stop_ids: set[int],
        prefix: PrefixCache | None = None,
        echo: int = 0,
    ):
        self.model, self.fast, self.tokenizer = model, fast, tokenizer
        self.prompt, self.params, self.stop_ids = prompt, params, stop_ids
        # Reused only when the prompt really starts with its tokens (the window may have been cut to fit), and
        # short of the echoed tokens and the one before them, whose logits the echo needs.
        keep = min(len(prefix.tokens), len(prompt) - echo - 1) if prefix is not None else 0
        fits = prefix is not None and keep > 0 and prompt[:keep] == prefix.tokens[:keep]
        self.prefix, self.filled = (prefix, keep) if fits else (None, 0)  # filled: tokens with keys/values
        self.echo = echo
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self.logprobs: list[TokenLogprob] = []
        self.echo_logprobs: list[TokenLogprob] = []
        self.next_input: int | None = None  # the sampled token the next decode step feeds
        self._out: list[int] = []
        self._shown = 0  # characters of text handed out as deltas
        self._deltas: list[str] = []
        device = model.embed_tokens.weight.device
        self._gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        self._bias = self._counts = None  # [V] each, made at the first token when the params adjust logits
        self._it: Iterator[str] | None = None

    @property
    def scores_prompt(self) -> bool:
        """Whether the prefill's logits of every prompt position are wanted (echo with logprobs)."""
        return bool(self.echo) and self.params.top_logprobs is not None

    def take(self) -> list[str]:
        """The text deltas produced since the last call (non-empty strings)."""
        deltas, self._deltas = self._deltas, []
        return deltas

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._it is None:
            self._it = self._run()
        return next(self._it)

    def _run(self) -> Iterator[str]:
        batch = DecodeBatch(self.model, max_rows=1, prefill_chunk=max(1, len(self.prompt)))
        batch.join(self)
        while self.finish_reason is None:
            batch.step()
            yield from self.take()
        yield from self.take()

    def _safe_len(self, text: str) -> int:
        """How much of ``text`` can be shown: not a trailing partial character, nor a possible stop-string start."""
        n = len(text.rstrip("\ufffd"))
        held = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, n), 0, -1):
                if text[:n].endswith(s[:k]):
                    held = max(held, k)
                    break
        return n - held

    def prefilled(self, piece: list[int], logits: torch.Tensor) -> None:
        """The keys/values of ``piece`` (the next prompt tokens) are stored; ``logits`` [T, V] are its
        predictions (only the last row's unless ``scores_prompt``). After the last piece: the first token."""
        start = self.filled
        self.filled += len(piece)
        if self.scores_prompt:
            self._score_echo(logits, start)
        if self.filled < len(self.prompt):
            return
        if self.params.max_tokens == 0:
            self._finish("length")
        else:
            self.accept(logits[-1])

    def accept(self, logits: torch.Tensor) -> None:
        """Sample the next token from ``logits`` [V] (the model's, fp32); end the answer or queue the token."""
        p = self.params
        if p.adjusts_logits and self._bias is None:
            self._bias, self._counts = p.bias_vector(logits.shape[-1], logits.device), torch.zeros_like(logits)
        adjusted = adjust_logits(logits.float(), p, self._bias, self._counts) if p.adjusts_logits else logits
        tok = sample_next(adjusted, p, self._gen)
        if p.top_logprobs is not None and (tok not in self.stop_ids or self.echo):
            # an echoed completion also reports the end-of-turn token it sampled (as the legacy API does:
            # a scorer reading "the prompt's logprobs, then one sampled token" must find that token)
            self.logprobs += token_logprobs(logits[None], [tok], p.top_logprobs)
        if tok in self.stop_ids:
            return self._finish("stop")
        if self._counts is not None:
            self._counts[tok] += 1
        out = self._out
        out.append(tok)
        self.completion_tokens = len(out)
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        shown = self._shown
        # text[:shown] held no stop string: only a stop that ends after it can be new
        hit = min((i for i in (text.find(s, max(0, shown - len(s) + 1)) for s in p.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.text = text[:hit]
            # logprobs of the tokens that begin at or after the stop string are not part of the answer
            self.logprobs = [
                lp
                for j, lp in enumerate(self.logprobs)
                if len(self.tokenizer.decode(out[:j], skip_special_tokens=True)) < hit
            ]
            return self._finish("stop")
        self.text = text
        safe = self._safe_len(text)
        if safe > shown:
            self._deltas.append(text[shown:safe])
            self._shown = safe
        if len(out) >= p.max_tokens:
            return self._finish("length")
        self.next_input = tok

    def _finish(self, reason: str) -> None:
        """End the answer: what the stop-string check held back is shown now."""
        self.finish_reason, self.next_input = reason, None
        if len(self.text) > self._shown:
            self._deltas.append(self.text[self._shown :])
            self._shown = len(self.text)

    def _score_echo(self, logits: torch.Tensor, start: int) -> None:
        """Logprobs of the echoed prompt tokens this piece predicts; ``logits`` [T, V] are its rows, from
        position ``start`` (row j predicts position start + j + 1)."""
        first = len(self.prompt) - self.echo  # the first echoed token's position
        k = self.params.top_logprobs or 0
        if first == 0 and start == 0:  # nothing before it: no logprob (as OpenAI's first prompt token)
            self.echo_logprobs.append(TokenLogprob(self.prompt[0], None, []))
        lo, hi = max(first, start + 1), min(len(self.prompt), self.filled + 1)
        if lo < hi:
            self.echo_logprobs += token_logprobs(logits[lo - 1 - start : hi - 1 - start], self.prompt[lo:hi], k)


def stop_token_ids(tokenizer, model_path) -> set[int]:
    """End-of-turn ids: the tokenizer's eos plus generation_config.json's eos_token_id."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gc = model_path / "generation_config.json"
    if gc.is_file():
        eos = json.loads(gc.read_text()).get("eos_token_id")
        ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    return ids
