"""Engine = one frozen base model shared by many sessions. The public Python API starts here."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from .answers import Generation
from .config import SessionConfig
from .generate import PrefixCache, SamplingParams, TokenStream, chat_prompt, stop_token_ids
from .model import BaseModel, load_base_model
from .session import Session

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_session_id(session_id: str) -> str:
    """Session ids name folders on disk: a plain name, never a path."""
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id) or ".." in session_id:
        raise ValueError(
            "session id must be 1-128 characters of letters, digits, '_', '-', '.', starting with a letter or digit"
        )
    return session_id


class Engine:
    """The base model shared by every session. Sessions are plain objects: keep the ones you need."""

    def __init__(self, base: BaseModel):
        self.base = base
        self._stop_ids = stop_token_ids(base.tokenizer, base.path)
        # how every session's answers found their window's keys/values: "ready" (kept up to date ahead of the
        # question, or unchanged), "extended" (by tokens read since), "built" (the weights changed): what a
        # question waits for under ingest; "notes_alone": none read, the question's notes instead (served as
        # /metrics ttt_answer_prefixes_total)
        self.answer_prefixes: Counter[str] = Counter()

    def create_session(self, config: SessionConfig | dict | None = None, session_id: str | None = None) -> Session:
        """A new session with fresh fast weights. ``config`` is a SessionConfig or a partial dict of one."""
        if not isinstance(config, SessionConfig):
            config = SessionConfig.from_dict(config)
        if session_id is not None:
            check_session_id(session_id)
        return Session(self, config, session_id)

    def load_session(self, path: str | os.PathLike) -> Session:
        """Load a session saved with ``Session.save``. Refuses a session trained on another base model."""
        from .store import load_session

        return load_session(self, path)

    def import_peft(self, folder: str | os.PathLike, session_id: str | None = None) -> Session:
        """A new session from a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors).

        Its layers, targets and rank become the session's FastWeightConfig; the optimizer starts fresh.
        """
        from .peft import import_peft

        if session_id is not None:
            check_session_id(session_id)
        names = ("adapter_config.json", "adapter_model.safetensors")
        return import_peft(self, {n: (Path(folder) / n).read_bytes() for n in names}, session_id)

    def generate(self, messages: list[dict], **kwargs) -> Generation | TokenStream:
        """Answer from the base model alone (no fast weights, no window); arguments as ``Session.generate``."""
        stream = kwargs.pop("stream", False)
        return self.answer(self.chat_ids(messages), SamplingParams(**kwargs), None, [], stream)

    def complete(
        self, prompt: str | list[int], *, max_tokens: int = 16, echo: bool = False, stream: bool = False, **kwargs
    ) -> Generation | TokenStream:
        """Continue ``prompt`` (text or token ids, no chat template) from the base model alone; arguments as
        ``Session.complete``."""
        ids = self.text_ids(prompt)
        params = SamplingParams(max_tokens, **kwargs)
        return self.answer(ids, params, None, [], stream, echo=len(ids) if echo else 0)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of chat ``messages`` through the chat template (ValueError for bad messages)."""
        return chat_prompt(self.base.tokenizer, messages)

    def text_ids(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a completion prompt: text (no special tokens added) or ids, checked against the vocabulary."""
        if isinstance(prompt, str):
            ids = self.base.tokenizer(prompt, add_special_tokens=False).input_ids
        else:
            ids = list(prompt)
            vocab = self.base.cfg.vocab_size
            if any(not isinstance(i, int) or not 0 <= i < vocab for i in ids):
                raise ValueError(f"token ids must be integers in [0, {vocab})")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def prompt(self, prompt: list[dict] | list[int], params: SamplingParams, window: list[int] = ()) -> list[int]:
        """Token ids to decode from: as much of ``window`` as fits, then the prompt (chat messages go through the
        chat template; a list of ints is used as it is).

        Raises ValueError for bad messages or when the prompt and max_tokens exceed the context.
        """
        vocab = self.base.cfg.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids below {vocab}")
        ids = list(prompt) if prompt and isinstance(prompt[0], int) else self.chat_ids(prompt)
        room = self.base.cfg.max_position_embeddings - params.max_tokens - len(ids)
        if room < 0:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceed the model's "
                f"{self.base.cfg.max_position_embeddings}-token context"
            )
        return (list(window[-room:]) if room else []) + ids

    def answer(
        self,
        prompt: list[int],
        params: SamplingParams,
        fast,
        window: list[int],
        stream: bool,
        prefix: PrefixCache | None = None,
        echo: int = 0,
    ):
        """The shared decoding path: ``window`` tokens (their keys/values from ``prefix`` when it holds
        them), then the ``prompt`` ids, then sampled tokens; ``echo``: score the prompt's last ``echo`` tokens."""
        if params.max_tokens == 0 and not echo:
            raise ValueError("max_tokens must be >= 1 (0 only with echo: a completion that scores its prompt)")
        ids = self.prompt(prompt, params, window)
        ts = TokenStream(self.base.model, fast, self.base.tokenizer, ids, params, self._stop_ids, prefix, echo)
        if stream:
            return ts
        text = "".join(ts)
        return Generation(text, ts.finish_reason, ts.prompt_tokens, ts.completion_tokens, ts.logprobs, ts.echo_logprobs)


def load_engine(
    model_path: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None
) -> Engine:
    """Load a base model (a local Hugging Face folder; None = the embedded SmolLM2-135M-Instruct).

    ``device``: "cuda", "cpu", ... (default: CUDA when available). ``dtype``: "float32" or "bfloat16"
    (default: bf16 on CUDA, fp32 on CPU; a CPU with native bf16, AVX512-BF16 or AMX, runs bf16 about twice as fast).
    """
    return Engine(load_base_model(model_path, device, dtype))
