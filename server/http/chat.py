"""OpenAI's endpoints: the models, chat completions and (legacy) completions, each answer a row of the batch."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from server.http.answers import MAX_TOKENS_DEFAULT, Answers, Event, answerer, include_usage, model_session, usage
from server.http.common import finite, ready, user_of
from server.openai_protocol import ChatRequest, CompletionRequest, TokenText, UnsupportedParameter
from ttt.generate import SamplingParams

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
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    text = TokenText(state.engine.base.tokenizer)

    def logprobs(entries) -> dict | None:
        return {"content": [text.chat_entry(e) for e in entries], "refusal": None} if body.logprobs else None

    if not body.stream:
        (stream,) = await run.result()
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": stream.text},
                    "logprobs": logprobs(stream.logprobs),
                    "finish_reason": stream.finish_reason,
                }
            ],
            "usage": usage([stream]),
        }

    def chunk(choice: dict, **extra) -> dict:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [choice] if choice else [],
            **extra,
        }

    def events(event: Event) -> list[dict]:
        if event.done is not None:
            return [
                chunk(
                    {
                        "index": 0,
                        "delta": {},
                        "logprobs": logprobs(event.logprobs),
                        "finish_reason": event.done.finish_reason,
                    }
                )
            ]
        return [
            chunk(
                {
                    "index": 0,
                    "delta": {"content": event.text},
                    "logprobs": logprobs(event.logprobs),
                    "finish_reason": None,
                }
            )
        ]

    first = chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
    return run.stream(events, [first], chunk({}, usage=None) if include_usage(body) else None)


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
    run = Answers(
        request,
        (user, sid),
        [(lambda ids=ids: answer(ids, echo=body.echo, stream=True, **sampling)) for ids in prompts],
    )
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    text = TokenText(engine.base.tokenizer)
    originals = [p if isinstance(p, str) else engine.base.tokenizer.decode(p) for p in body.prompts()]

    def choice(index: int, piece: str, entries, offset: int, finish: str | None) -> dict:
        logprobs = text.completion_logprobs(entries, offset) if body.logprobs is not None else None
        return {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": finish}

    def reply(choices: list[dict], **extra) -> dict:  # the whole answer and each streamed piece alike
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            **extra,
        }

    if not body.stream:
        streams = await run.result()
        choices = []
        for i, st in enumerate(streams):
            echoed = originals[i] if body.echo else ""
            offset = 0 if body.echo else len(originals[i])
            choices.append(choice(i, echoed + st.text, st.echo_logprobs + st.logprobs, offset, st.finish_reason))
        return reply(choices, usage=usage(streams))

    # where each choice's next token starts in its text (OpenAI's offsets count from the prompt's start)
    offsets = [0 if body.echo else len(o) for o in originals]

    def events(event: Event) -> list[dict]:
        i = event.index
        piece = originals[i] if event.echo else event.text or ""
        out = choice(i, piece, event.logprobs, offsets[i], event.done.finish_reason if event.done else None)
        offsets[i] += sum(len(text.text(e.token)) for e in event.logprobs)
        return [reply([out])]

    return run.stream(events, [], reply([], usage=None) if include_usage(body) else None)
