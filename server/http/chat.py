"""OpenAI's endpoints: the models, chat completions and (legacy) completions, each answer a row of the batch."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from server.http.answers import MAX_TOKENS_DEFAULT, Answers, Event, answerer, include_usage, model_session, usage
from server.http.common import finite, ready, user_of
from server.openai_protocol import ChatRequest, CompletionRequest, TokenText, UnsupportedParameter
from ttt.generate import SamplingParams, TokenStream

router = APIRouter()


# ---- models ----


@router.get("/v1/models")
def list_models(request: Request):
    """The base model and the caller's sessions (each with the base model as parent)."""
    state, user = ready(request), user_of(request)
    base = state.engine.base.name
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "ttt", "parent": None}]
    for s in finite(state.sessions.list(user)):
        data.append(
            {"id": s["id"], "object": "model", "created": int(s["created_at"]), "owned_by": user, "parent": base}
        )
    return {"object": "list", "data": data}


# ---- chat ----


class ChatReply:
    """The OpenAI shapes of one chat answer: whole, or as the chunks of its stream."""

    def __init__(self, body: ChatRequest, text: TokenText):
        self.body, self.text = body, text
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _shape(self, kind: str, choices: list[dict], **extra) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
            **extra,
        }

    def logprobs(self, entries) -> dict | None:
        return {"content": [self.text.chat_entry(e) for e in entries], "refusal": None} if self.body.logprobs else None

    def whole(self, stream: TokenStream) -> dict:
        message = {"role": "assistant", "content": stream.text}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": self.logprobs(stream.logprobs),
            "finish_reason": stream.finish_reason,
        }
        return self._shape("chat.completion", [choice], usage=usage([stream]))

    def chunk(self, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return self._shape("chat.completion.chunk", [choice])

    def events(self, event: Event) -> list[dict]:
        if event.done is not None:
            return [self.chunk({}, self.logprobs(event.logprobs), event.done.finish_reason)]
        return [self.chunk({"content": event.text}, self.logprobs(event.logprobs))]

    def usage_chunk(self) -> dict | None:
        return self._shape("chat.completion.chunk", [], usage=None) if include_usage(self.body) else None


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    state = ready(request)
    user, sid = user_of(request), model_session(state, body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    sampling = dict(
        body.sampling(),
        max_tokens=body.max_completion_tokens or body.max_tokens or MAX_TOKENS_DEFAULT,
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    answer = await answerer(state, user, sid, "generate")  # an unknown session: 404 first
    # Bad messages, sampling settings or a prompt too long: a 400 before the answer is queued. The chat
    # template and the tokenizer run off the event loop: a long prompt must not stall other requests.
    await asyncio.to_thread(state.engine.prompt, messages, SamplingParams(**sampling))
    run = Answers(request, (user, sid), [lambda: answer(messages, stream=True, **sampling)])
    reply = ChatReply(body, TokenText(state.engine.base.tokenizer))
    if not body.stream:
        (stream,) = await run.result()
        return reply.whole(stream)
    return run.stream(reply.events, [reply.chunk({"role": "assistant", "content": ""})], reply.usage_chunk())


class CompletionReply:
    """The OpenAI shapes of a completion request's answers, one choice per prompt: whole, or streamed."""

    def __init__(self, body: CompletionRequest, text: TokenText, originals: list[str]):
        self.body, self.text, self.originals = body, text, originals
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        # where each choice's next token starts in its text (OpenAI's offsets count from the prompt's start)
        self.offsets = [0 if body.echo else len(o) for o in originals]

    def _shape(self, choices: list[dict], **extra) -> dict:  # the whole answer and each streamed piece alike
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
            **extra,
        }

    def choice(self, index: int, piece: str, entries, offset: int, finish: str | None) -> dict:
        logprobs = self.text.completion_logprobs(entries, offset) if self.body.logprobs is not None else None
        return {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": finish}

    def whole(self, streams: list[TokenStream]) -> dict:
        choices, echo = [], self.body.echo
        for i, st in enumerate(streams):
            echoed, offset = (self.originals[i], 0) if echo else ("", len(self.originals[i]))
            choices.append(self.choice(i, echoed + st.text, st.echo_logprobs + st.logprobs, offset, st.finish_reason))
        return self._shape(choices, usage=usage(streams))

    def events(self, event: Event) -> list[dict]:
        i = event.index
        piece = self.originals[i] if event.echo else event.text or ""
        out = self.choice(i, piece, event.logprobs, self.offsets[i], event.done.finish_reason if event.done else None)
        self.offsets[i] += sum(len(self.text.text(e.token)) for e in event.logprobs)
        return [self._shape([out])]

    def usage_chunk(self) -> dict | None:
        return self._shape([], usage=None) if include_usage(self.body) else None


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    """Text completion without a chat template (lm-evaluation-harness's ``local-completions``): each prompt
    after the session's window, as in chat; ``echo`` with ``logprobs`` scores the prompt itself."""
    state = ready(request)
    user, sid = user_of(request), model_session(state, body.model)
    sampling = dict(body.sampling(), max_tokens=body.max_tokens, top_logprobs=body.logprobs)
    params = SamplingParams(**sampling)
    engine = state.engine

    def check() -> list[list[int]]:
        ids = [engine.text_ids(p) for p in body.prompts()]
        for one in ids:
            engine.prompt(one, params)  # too long for the context: 400 now
        if body.max_tokens == 0 and not body.echo:
            raise UnsupportedParameter("max_tokens", "max_tokens 0 needs echo: true")
        return ids

    answer = await answerer(state, user, sid, "complete")
    prompts = await asyncio.to_thread(check)
    makers = [(lambda ids=ids: answer(ids, echo=body.echo, stream=True, **sampling)) for ids in prompts]
    run = Answers(request, (user, sid), makers)
    originals = [p if isinstance(p, str) else engine.base.tokenizer.decode(p) for p in body.prompts()]
    reply = CompletionReply(body, TokenText(engine.base.tokenizer), originals)
    if not body.stream:
        return reply.whole(await run.result())
    return run.stream(reply.events, [], reply.usage_chunk())
