"""`AsyncLLMEngine`: the engine stepped by a background asyncio task, streaming outputs per request.

    engine = AsyncLLMEngine(LLMEngine(runner, config, tokenizer))
    async for out in engine.generate("id", prompt_ids, SamplingParams(max_tokens=64)):
        print(out.outputs[0].text)

Notable features:
- `engine.step()` runs in one worker thread, so the event loop stays free to accept requests and stream;
  requests and aborts are queued and applied between steps on the loop, so the engine is never touched
  by two threads at once;
- validation errors (prompt too long, bad media ranges) are raised by `generate` before anything is queued;
- cancelling the consuming task, or closing the generator early (`aclose`, leaving an `async with
  contextlib.aclosing(...)`), aborts the request and frees its KV blocks at the next step boundary;
- an exception inside a step is delivered to every waiting stream rather than hanging them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from ocula.engine.engine import LLMEngine
from ocula.engine.outputs import RequestOutput
from ocula.engine.request import MediaItem, Request
from ocula.engine.sampling_params import SamplingParams
from ocula.errors import ConfigError, OculaError


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._adds: list[Request] = []
        self._aborts: list[str] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocula-engine")
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
        media: list[MediaItem] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs (cumulative text / ids) until it finishes."""
        if request_id in self._streams:
            raise ConfigError(f"request id {request_id!r} is already running; use a unique id")
        request = self.engine.make_request(request_id, prompt_token_ids, params, media)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._adds.append(request)
        self._start()
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._aborts.append(request_id)
                self._notify()

    def abort(self, request_id: str) -> None:
        """Abort at the next step boundary; a live stream receives the final "abort" output."""
        self._aborts.append(request_id)
        self._notify()

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    # ---- background loop -----------------------------------------------------------------------

    def _start(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._notify()

    def _notify(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as exc:  # noqa: BLE001 - delivered to the streams instead of lost
                self._fail_all(exc)
                continue
            for output in outputs:
                self._deliver(output)
            await asyncio.sleep(0)  # let the consumers run between steps

    def _apply_pending(self) -> None:
        adds, self._adds = self._adds, []
        for request in adds:
            stream = self._streams.get(request.request_id)
            if stream is None:  # the consumer has gone already
                continue
            try:
                self.engine.add(request)
            except OculaError as exc:  # e.g. an id still running in the engine: tell that stream only
                stream.put_nowait(exc)
        aborts, self._aborts = self._aborts, []
        for request_id in aborts:
            output = self.engine.abort(request_id)
            if output is not None:
                self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is not None:
            stream.put_nowait(output)

    def _fail_all(self, exc: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.put_nowait(exc)
            self.engine.abort(request_id)
