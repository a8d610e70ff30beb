"""OpenAI's request and response shapes for chat and text completions: typed request models (what a request
may ask, with its limits; what we do not do is refused by name, never silently ignored) and the logprobs
formats of both APIs. The routes in ``server/http/`` stay thin over these."""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ttt.generate import MAX_STOP_CHARS, MAX_STOPS, MAX_TOP_LOGPROBS, TokenLogprob

INT64 = {"ge": -(2**63), "le": 2**63 - 1}  # torch seeds are 64-bit

# Parameters of OpenAI's APIs that this server does not implement: a request that sets one (to anything but
# the value that means "off") is refused with 400 naming it, rather than answered as if it had not asked.
UNSUPPORTED = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "parallel_tool_calls": "tool calling",
    "audio": "audio output",
    "modalities": "output modalities other than text",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "reasoning_effort": "reasoning models",
    "verbosity": "reasoning models",
    "suffix": "completions with a suffix",
    "best_of": "best_of above 1",
}
OFF_VALUES = {"modalities": (["text"],), "best_of": (1,), "response_format": ({"type": "text"},)}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What chat and text completions share. Unknown fields are refused (400 naming the field), but for the
    bookkeeping ones OpenAI's own clients may send, which are accepted and have no effect here."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a session id, or the base model's name for no session")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(
        None, description=f"at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters"
    )
    seed: int | None = Field(None, **INT64)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> added to its logit before sampling, -100 to 100"
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    response_format: dict | None = Field(None, description='only {"type": "text"}')
    # accepted, no effect: bookkeeping fields of OpenAI's platform
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            off = value is None or value in OFF_VALUES.get(name, ())
            if not off and (name in UNSUPPORTED or name == "response_format"):
                what = UNSUPPORTED.get(name) or f"response_format {value!r}"
                raise UnsupportedParameter(name, f"{name} is not supported by this server ({what})")
        # set to what means "off" (tools: null, modalities: ["text"], best_of: 1): nothing to do
        return {k: v for k, v in data.items() if not (k in UNSUPPORTED and (v is None or v in OFF_VALUES.get(k, ())))}

    def sampling(self) -> dict:
        """The ``SamplingParams`` fields this request sets (but max_tokens and logprobs, which differ by API)."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise UnsupportedParameter("logit_bias", f"logit_bias keys must be token ids, not {key!r}")
            bias[int(key)] = value
        return dict(
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop or [],
            seed=self.seed,
            logit_bias=bias,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


class UnsupportedParameter(ValueError):
    """A 400 whose ``param`` names the request field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="return each answer token's log-probability")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: the most likely alternatives at each token"
    )

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedParameter("top_logprobs", "top_logprobs needs logprobs: true")
        return self


class CompletionRequest(SamplingRequest):
    """The legacy text completion: no chat template; a session's window precedes the prompt as in chat."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, several texts (one choice each), token ids, or several lists of token ids"
    )
    max_tokens: int = Field(16, ge=0, description="0 with echo: only score the prompt")
    echo: bool = Field(False, description="return the prompt before the completion (and its logprobs)")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="log-probabilities of each token and its k most likely alternatives",
    )

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise UnsupportedParameter("prompt", "prompt must not be empty")
        return list(p)


# ---- logprobs in OpenAI's two formats ----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's table: printable Latin-1
    bytes stand for themselves, the others for the characters from U+0100 on, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class TokenText:
    """A token id's text and exact bytes (a byte-level BPE token may hold part of a character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._text)
        self.bytes = functools.lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _bytes(self, token: int) -> list[int]:
        piece, table = self.tokenizer.convert_ids_to_tokens(token), _byte_decoder()
        if isinstance(piece, str) and piece and all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(self.text(token).encode())  # not byte-level (or a special token): its text

    def chat_entry(self, lp: TokenLogprob) -> dict:
        """One token of a chat answer's ``logprobs.content``."""
        return {
            "token": self.text(lp.token),
            "logprob": lp.logprob,
            "bytes": self.bytes(lp.token),
            "top_logprobs": [{"token": self.text(t), "logprob": p, "bytes": self.bytes(t)} for t, p in lp.top],
        }

    def completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict:
        """The legacy ``logprobs`` object of ``entries``, their text starting at character ``offset``."""
        tokens = [self.text(lp.token) for lp in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [
                {self.text(t): p for t, p in lp.top} if lp.logprob is not None else None for lp in entries
            ],
            "text_offset": offsets,
        }
