"""The OpenAI-compatible server: a real uvicorn server on a free loopback port, driven by the `openai` client.

Answers are compared with the same prompt run alone and greedily (the reference), usage numbers with the
processor's token count; errors with their status codes; a disconnect must free the request's KV blocks.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from ocula.server.app import ServerConfig, create_app
from ocula.server.protocol import ChatMessage
from ocula.server.security import MediaPolicy
from tests.checkpoints import make_image, write_mp4

MODEL = "tiny-qwen2-vl"
KEY = "test-key"
MAX_REQUEST_BYTES = 2_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_uri(image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> list[dict]:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


IMAGE_A = data_uri(make_image(64, 48, seed=1))
IMAGE_B = data_uri(make_image(40, 72, seed=2), "JPEG")


class Served:
    """A running server, the engine behind it and a greedy single-run reference (the library's generate)."""

    def __init__(self, ckpt: Path):
        from ocula.engine.async_engine import AsyncLLMEngine

        self.engine, self.processor, self.reference_ids = build_engine(ckpt)
        config = ServerConfig(served_model_name=MODEL, api_key=KEY, max_request_bytes=MAX_REQUEST_BYTES,
                              max_model_len=self.engine.config.max_model_len)
        self.app = create_app(AsyncLLMEngine(self.engine), self.processor, config)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> Served:
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=60)

    def prepared(self, messages: list[dict]):
        return self.app.state.server.preparer.prepare([ChatMessage.model_validate(m) for m in messages])

    def reference(self, messages: list[dict], max_tokens: int) -> tuple[str, int, int]:
        """(text, prompt tokens, completion tokens) of the greedy single run."""
        prepared = self.prepared(messages)
        ids = self.reference_ids(prepared, max_tokens)
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        return text.rstrip("\ufffd"), len(prepared.prompt_token_ids), len(ids)

    def idle(self, timeout_s: float = 20.0) -> bool:
        """True once the engine has no running or waiting sequence and every KV block is free."""
        for _ in range(int(timeout_s / 0.05)):
            stats = self.engine.stats()
            if not stats.num_running and not stats.num_waiting and stats.kv_blocks_free == stats.kv_blocks_total:
                return True
            time.sleep(0.05)
        return False


def build_engine(ckpt: Path):
    """(LLMEngine on the checkpoint, its processor, reference(prepared, max_tokens) -> greedy ids of the
    library's generate() on a separately loaded copy of the model)."""
    from ocula import AutoModelForImageTextToText
    from ocula.engine.llm import LLM

    llm = LLM(ckpt, dtype="float32", device="cpu", max_model_len=1024, max_num_seqs=32, kv_cache_tokens=16384)
    model = AutoModelForImageTextToText.from_pretrained(ckpt)

    def reference(prepared, max_tokens: int) -> list[int]:
        features = prepared.processed.features
        ids = model.generate(**features, max_new_tokens=max_tokens, do_sample=False)
        return [int(i) for i in ids[0, features["input_ids"].shape[1]:]]

    return llm.engine, llm.processor, reference


@pytest.fixture(scope="module")
def served(qwen2_vl_ckpt):
    served = Served(qwen2_vl_ckpt).start()
    yield served
    served.stop()


# ---- answers --------------------------------------------------------------------------------------------


def test_chat_with_data_uri_image_equals_greedy_single_run(served):
    messages = user(image_part(IMAGE_A), "What is shown in the picture?")
    response = served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                       temperature=0)
    text, prompt_tokens, completion_tokens = served.reference(messages, 8)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason in ("stop", "length")
    assert response.model == MODEL and response.object == "chat.completion"
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == completion_tokens
    assert response.usage.total_tokens == prompt_tokens + completion_tokens
    assert prompt_tokens > 12  # the image's placeholder tokens are counted


def test_streaming_deltas_concatenate_to_the_answer_with_usage(served):
    messages = user(image_part(IMAGE_A), "Describe this image in one sentence.")
    stream = served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    text, prompt_tokens, completion_tokens = served.reference(messages, 10)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_two_images_and_a_system_prompt(served):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                *user(image_part(IMAGE_A), image_part(IMAGE_B), "How many objects can you see?")]
    response = served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                       temperature=0)
    text, prompt_tokens, _ = served.reference(messages, 6)
    assert response.choices[0].message.content == text
    assert response.usage.prompt_tokens == prompt_tokens
    assert len(served.prepared(messages).processed.media) == 2


def test_video_url_with_frames_capped(served, tmp_path):
    video = write_mp4(tmp_path / "clip.mp4", n_frames=10, w=56, h=56)
    uri = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    messages = user({"type": "video_url", "video_url": {"url": uri}}, "What happens in this video?")
    limits = served.app.state.server.preparer.limits
    limits.max_video_frames = 4
    try:
        response = served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=5,
                                                           temperature=0)
        text, prompt_tokens, _ = served.reference(messages, 5)
        (item,) = served.prepared(messages).processed.media
    finally:
        limits.max_video_frames = 32
    assert item.modality == "video" and item.grid_thw[0] == 2  # 4 frames kept, 2 per temporal patch
    assert response.choices[0].message.content == text and response.usage.prompt_tokens == prompt_tokens


def test_n_choices_are_indexed_and_counted(served):
    response = served.client().chat.completions.create(
        model=MODEL, messages=user("Hello, how are you today?"), max_tokens=5, n=2, temperature=1.0, seed=3,
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.message.content is not None for c in response.choices)
    generated = response.usage.completion_tokens
    assert 2 <= generated <= 10 and response.usage.total_tokens == response.usage.prompt_tokens + generated
    again = served.client().chat.completions.create(
        model=MODEL, messages=user("Hello, how are you today?"), max_tokens=5, n=2, temperature=1.0, seed=3,
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]


def test_stop_string_cuts_the_answer(served):
    messages = user("The quick brown fox jumps over the lazy dog.")
    full, _, _ = served.reference(messages, 12)
    stop = next((full[i:i + 2] for i in range(2, len(full) - 2) if full[i:i + 2].strip()), None)
    assert stop is not None, f"the reference answer {full!r} is too short to pick a stop string"
    response = served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                       temperature=0, stop=[stop])
    assert response.choices[0].message.content == full[:full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_logprobs_follow_openai_layout(served):
    response = served.client().chat.completions.create(model=MODEL, messages=user("Count them."),
                                                       max_tokens=4, temperature=0, logprobs=True,
                                                       top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0.0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the top token


def test_streamed_logprobs_cover_every_token(served):
    stream = served.client().chat.completions.create(model=MODEL, messages=user("Count them."), max_tokens=6,
                                                     temperature=0, logprobs=True, top_logprobs=1, stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens
    assert all(e.logprob <= 0.0 and len(e.top_logprobs) == 1 for e in entries)


# ---- other routes ---------------------------------------------------------------------------------------


def test_models_health_and_metrics(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{served.base}/health").status_code == 200
    served.client().chat.completions.create(model=MODEL, messages=user("Hello"), max_tokens=2)
    metrics = httpx.get(f"{served.base}/metrics").text
    for name in ("ocula_requests_total{status=\"200\"}", "ocula_generation_tokens_total",
                 "ocula_num_requests_waiting", "ocula_kv_cache_usage_ratio", "ocula_prefix_cache_hit_rate",
                 "ocula_encoder_cache_hit_rate", "ocula_time_to_first_token_seconds_bucket",
                 "ocula_e2e_request_latency_seconds_count"):
        assert name in metrics, name


# ---- errors ---------------------------------------------------------------------------------------------


def _error(served, call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call(served.client())
    body = info.value.body
    assert isinstance(body, dict) and {"message", "type", "code"} <= set(body), body
    return info.value


def test_errors_have_openai_shape_and_status(served):
    def chat(messages, model=MODEL, **kw):
        return lambda c: c.chat.completions.create(model=model, messages=messages, max_tokens=2, **kw)

    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really a png").decode()
    assert _error(served, chat(user(image_part(corrupt), "hi"))).status_code == 400
    assert _error(served, chat(user("hi"), model="gpt-4o")).status_code == 404
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
    huge = "data:image/png;base64," + "A" * MAX_REQUEST_BYTES
    assert _error(served, chat(user(image_part(huge), "hi"))).status_code == 413
    too_long = user("hello " * 2000)
    assert _error(served, chat(too_long)).status_code == 413
    no_room = _error(served, lambda c: c.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=1020))
    assert no_room.status_code == 400 and no_room.body["code"] == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in no_room.message and no_room.body["param"] == "max_tokens"
    fits = served.client().chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=8)
    assert fits.choices[0].message.content is not None
    refused = _error(served, chat(user(image_part("file:///etc/hostname"), "hi")))
    assert refused.status_code == 400 and "--allowed-local-media-path" in refused.message
    assert _error(served, chat(user("hi"), temperature=-1)).status_code == 400
    malformed = httpx.post(f"{served.base}/v1/chat/completions", content=b"{not json",
                           headers={"Authorization": f"Bearer {KEY}"})
    assert malformed.status_code == 400 and "error" in malformed.json()
    assert httpx.get(f"{served.base}/v1/nothing").json()["error"]["code"] == "not_found"


def test_overload_is_503(served):
    server = served.app.state.server
    server.config.max_pending_requests = 0
    try:
        error = _error(served, lambda c: c.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2))
        assert error.status_code == 503
    finally:
        server.config.max_pending_requests = 256


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    png = base64.b64decode(IMAGE_A.split(",", 1)[1])

    def do_GET(self):
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args):
        pass


def test_private_urls_refused_unless_allowed_and_local_files_only_inside_the_folder(served, tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/redirect"
    policy = served.app.state.server.preparer.policy
    create = served.client().chat.completions.create
    try:
        error = _error(served, lambda c: c.chat.completions.create(model=MODEL, messages=user(image_part(url), "hi"),
                                                                   max_tokens=2))
        assert error.status_code == 400 and "--allow-private-media-urls" in error.message
        policy.allow_private_urls = True
        via_url = create(model=MODEL, messages=user(image_part(url), "hi"), max_tokens=4, temperature=0)
        (tmp_path / "a.png").write_bytes(_ImageHandler.png)
        policy.allowed_local_path = tmp_path.resolve()
        via_file = create(model=MODEL, messages=user(image_part((tmp_path / "a.png").as_uri()), "hi"),
                          max_tokens=4, temperature=0)
        via_data = create(model=MODEL, messages=user(image_part(IMAGE_A), "hi"), max_tokens=4, temperature=0)
        assert via_url.choices[0].message.content == via_data.choices[0].message.content
        assert via_file.choices[0].message.content == via_data.choices[0].message.content
        outside = _error(served, lambda c: c.chat.completions.create(
            model=MODEL, messages=user(image_part((tmp_path / ".." / "x.png").as_uri()), "hi"), max_tokens=2))
        assert outside.status_code == 400
    finally:
        policy.allow_private_urls, policy.allowed_local_path = False, None
        httpd.shutdown()


# ---- disconnects and concurrency -------------------------------------------------------------------------


def test_disconnect_mid_stream_aborts_and_frees_blocks(served):
    assert served.idle()
    body = {"model": MODEL, "messages": user("Tell me a long story about the lake."), "max_tokens": 400,
            "temperature": 0, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as client, client.stream(
        "POST", f"{served.base}/v1/chat/completions", json=body, headers=headers
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or not line for line in got)
        assert served.engine.stats().num_running == 1
    assert served.idle(), served.engine.stats()
    assert served.app.state.server.metrics.in_flight == 0


def test_disconnect_while_waiting_for_a_whole_answer_aborts_it(served):
    assert served.idle()
    metrics = served.app.state.server.metrics
    closed = metrics.requests[499]
    body = json.dumps({"model": MODEL, "messages": user("Tell me a long story about the boat."), "max_tokens": 960,
                       "temperature": 0, "n": 4, "ignore_eos": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as conn:
        conn.sendall(head + body)
        deadline = time.monotonic() + 30
        while not served.engine.stats().num_running:  # the request is decoding: hang up mid-answer
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    assert served.idle(), served.engine.stats()
    deadline = time.monotonic() + 10
    while metrics.requests[499] != closed + 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metrics.requests[499] == closed + 1 and metrics.in_flight == 0


def test_32_concurrent_streams_each_equal_their_single_run(served):
    prompts = [f"Question {i}: what is {i} plus {i % 7}?" for i in range(32)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.chat.completions.create(model=MODEL, messages=user(prompt), max_tokens=6,
                                                      temperature=0, stream=True)
        parts, finished = [], False
        async for chunk in stream:
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finished = finished or choice.finish_reason is not None
        assert finished
        return "".join(parts)

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*[one(client, p) for p in prompts])

    answers = asyncio.run(main())
    assert answers == [served.reference(user(p), 6)[0] for p in prompts]
    assert served.idle()


# ---- media policy (no server needed) -----------------------------------------------------------------------


def test_media_policy_refuses_private_addresses_and_escapes_from_the_folder(tmp_path):
    from ocula.errors import MediaError
    from ocula.server.security import MediaPolicyError, is_public, read_media

    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "::ffff:127.0.0.1",
                    "fd00::1", "0.0.0.0", "100.64.0.1"):
        assert not is_public(address), address
    assert is_public("8.8.8.8") and is_public("2001:4860:4860::8888")

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(b"x")
    (allowed / "escape.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "secret.png").write_bytes(b"y")
    policy = MediaPolicy(allowed_local_path=allowed)
    assert read_media((allowed / "ok.png").as_uri(), policy) == (allowed / "ok.png").resolve()
    for url in ((allowed / "escape.png").as_uri(), f"file://{allowed}/../secret.png", "/etc/hostname",
                "ftp://example.com/a.png"):
        with pytest.raises(MediaPolicyError):
            read_media(url, policy)
    with pytest.raises(MediaPolicyError):
        read_media("http://localhost:1/a.png", MediaPolicy())
    with pytest.raises(MediaError):
        read_media("data:image/png;base64," + "A" * 100, MediaPolicy(max_bytes=10))


def test_oversized_image_error_names_the_server_flag():
    from ocula.errors import MediaTooLargeError
    from ocula.server.chat import ChatPreparer, MediaLimits

    buffer = io.BytesIO()
    make_image(64, 64).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    preparer = ChatPreparer(processor=None, policy=MediaPolicy(), limits=MediaLimits(max_image_pixels=1000))
    with pytest.raises(MediaTooLargeError, match="--max-image-pixels"):
        preparer.load_image(url)
