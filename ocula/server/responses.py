"""Engine outputs -> OpenAI chat completions: one JSON object, or SSE chunks of text deltas.

Notable features:
- the engine's outputs are cumulative (text and ids so far, per choice); the stream sends each choice's
  new text only, a first chunk with the assistant role per choice, and a last one with its finish reason;
- `stream_options.include_usage` adds a final chunk with empty `choices` and the usage;
- logprobs: the engine's raw log-probabilities (sampled token + top k) in OpenAI's per-token layout;
- `close()` closes the engine stream, which aborts the request when it has not finished.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from ocula.server.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
    completion_id,
    now,
)


class CompletionStream:
    """One chat request on the engine: start it, then read it whole or as SSE events."""

    def __init__(self, engine: Any, body: ChatCompletionRequest, tokenizer: Any, prompt_token_ids: list[int],
                 params: Any, media: list):
        self.request_id = completion_id()
        self.created = now()
        self.body = body
        self.tokenizer = tokenizer
        self.final_output: Any = None
        self._gen = engine.generate(self.request_id, prompt_token_ids, params, media)
        self._sent_text = [0] * params.n
        self._sent_tokens = [0] * params.n

    async def start(self) -> Any:
        """The first output; the engine's validation errors (too long, bad media ranges) surface here."""
        output = await anext(self._gen)
        self._track(output)
        return output

    async def final(self, output: Any) -> Any:
        while not output.finished:
            output = await anext(self._gen)
        self._track(output)
        return output

    async def events(self, output: Any) -> AsyncIterator[str]:
        """SSE `data:` lines from the first output to the last (and the usage chunk when asked)."""
        roles = [ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(self.body.n)]
        yield self._chunk(roles)
        while True:
            choices = [c for c in (self._delta(c) for c in output.outputs) if c is not None]
            if choices:
                yield self._chunk(choices)
            if output.finished:
                break
            output = await anext(self._gen)
            self._track(output)
        if self.body.include_usage:
            yield self._chunk([], usage(output))

    async def close(self) -> None:
        await self._gen.aclose()

    def _track(self, output: Any) -> None:
        if output.finished:
            self.final_output = output

    def _delta(self, completion: Any) -> ChunkChoice | None:
        """This choice's news since the last chunk (None when there is none yet)."""
        i = completion.index
        text = completion.text[self._sent_text[i]:]
        self._sent_text[i] = max(self._sent_text[i], len(completion.text))
        logprobs = None
        if completion.logprobs is not None and len(completion.logprobs) > self._sent_tokens[i]:
            # sent with the text of the same tokens, or alone while their text is held back
            logprobs = self.logprobs(completion, self._sent_tokens[i])
            self._sent_tokens[i] = len(completion.logprobs)
        if not text and completion.finish_reason is None and logprobs is None:
            return None
        delta = Delta(content=text) if text else Delta()
        return ChunkChoice(index=i, delta=delta, finish_reason=completion.finish_reason, logprobs=logprobs)

    def _chunk(self, choices: list[ChunkChoice], usage_: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.body.model,
                                    choices=choices, usage=usage_)
        return f"data: {json.dumps(chunk.model_dump(exclude_none=True), ensure_ascii=False)}\n\n"

    def logprobs(self, completion: Any, start: int = 0) -> ChoiceLogprobs:
        k = self.body.top_logprobs or 0
        content = []
        for token_id, entry in zip(completion.token_ids[start:], completion.logprobs[start:]):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            content.append(TokenLogprob(**self._token(token_id, entry[token_id]),
                                        top_logprobs=[TopLogprob(**self._token(t, v)) for t, v in top]))
        return ChoiceLogprobs(content=content)

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}


def usage(output: Any) -> Usage:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in output.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": output.num_cached_tokens})


def build_completion(stream: CompletionStream, output: Any) -> ChatCompletion:
    choices = [
        Choice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
               logprobs=stream.logprobs(c) if c.logprobs is not None else None)
        for c in output.outputs
    ]
    return ChatCompletion(id=stream.request_id, created=stream.created, model=stream.body.model,
                          choices=choices, usage=usage(output))
