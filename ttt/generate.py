"""Answering: chat template, sampling and token streaming from a session's fast weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .fast_weights import FastWeights
from .model import KVCache, Transformer


@dataclass
class PrefixCache:
    """Rotated keys and values of the tokens a session's answers start with (its window).

    Computed once per state of the session, so that a chat prefills only its own prompt: the time to first
    token stops depending on the window (and never depended on the document).
    """

    tokens: list[int]
    k: list[torch.Tensor]  # per layer [1, kv_heads, P, head_dim]
    v: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def build(cls, model: Transformer, fast: FastWeights | None, tokens: list[int]) -> PrefixCache:
        weight = model.embed_tokens.weight
        cache = KVCache(model.cfg, 1, len(tokens), weight.device, weight.dtype)
        adapters = fast.adapters() if fast is not None else None
        model.run_layers(model.embed(torch.tensor([tokens], device=weight.device)), 0, model.cfg.num_layers,
                         adapters, cache)  # no LM head: only the keys and values are wanted
        return cls(list(tokens), cache.k, cache.v)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's count; the length bounds the per-token stop search


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if len(self.stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


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
    """One token id from logits [V] (fp32)."""
    if p.temperature == 0:
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
    """Iterator over text deltas of one answer; ``finish_reason`` and token counts are set once it ends.

    finish_reason: "stop" (end-of-turn token or a stop string) or "length" (max_tokens reached).
    """

    def __init__(self, model: Transformer, fast: FastWeights | None, tokenizer, prompt: list[int],
                 params: SamplingParams, stop_ids: set[int], prefix: PrefixCache | None = None):
        self.model, self.fast, self.tokenizer = model, fast, tokenizer
        self.prompt, self.params, self.stop_ids = prompt, params, stop_ids
        # Reused only when the prompt really starts with its tokens (the window may have been cut to fit).
        fits = prefix is not None and len(prefix.tokens) < len(prompt) and prompt[: len(prefix.tokens)] == prefix.tokens
        self.prefix = prefix if fits else None
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self._it = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

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

    @torch.no_grad()
    def _run(self) -> Iterator[str]:
        model, p = self.model, self.params
        device = model.embed_tokens.weight.device
        gen = torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
        cache = KVCache(model.cfg, 1, len(self.prompt) + p.max_tokens, device, model.embed_tokens.weight.dtype)
        if self.prefix is not None:
            cache.length = len(self.prefix.tokens)
            for layer, (k, v) in enumerate(zip(self.prefix.k, self.prefix.v, strict=True)):
                cache.k[layer][:, :, : cache.length] = k
                cache.v[layer][:, :, : cache.length] = v
        adapters = self.fast.adapters() if self.fast is not None else None
        logits = model(torch.tensor([self.prompt[cache.length :]], device=device), adapters, cache)[0, -1]
        out: list[int] = []
        shown = 0
        while True:
            tok = sample_next(logits, p, gen)
            if tok in self.stop_ids:
                self.finish_reason = "stop"
                break
            out.append(tok)
            self.completion_tokens = len(out)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            # text[:shown] held no stop string: only a stop that ends after it can be new
            hit = min((i for i in (text.find(s, max(0, shown - len(s) + 1)) for s in p.stop) if i >= 0), default=-1)
            if hit >= 0:
                self.text = text[:hit]
                if hit > shown:
                    yield text[shown:hit]
                self.finish_reason = "stop"
                return
            self.text = text
            safe = self._safe_len(text)
            if safe > shown:
                yield text[shown:safe]
                shown = safe
            if len(out) >= p.max_tokens:
                self.finish_reason = "length"
                break
            logits = model(torch.tensor([[tok]], device=device), adapters, cache)[0, -1]
        if len(self.text) > shown:
            yield self.text[shown:]


def stop_token_ids(tokenizer, model_path) -> set[int]:
    """End-of-turn ids: the tokenizer's eos plus generation_config.json's eos_token_id."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gc = model_path / "generation_config.json"
    if gc.is_file():
        eos = json.loads(gc.read_text()).get("eos_token_id")
        ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    return ids
