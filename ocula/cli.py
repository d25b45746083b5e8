"""The `ocula` command line: run | chat | serve | batch | bench.

- `ocula run [--model PATH] [--image FILE_OR_URL ...] [--video FILE] "prompt"` streams one answer; with no
  --model it uses the tiny shapes model that ships inside the package (no download).
- `ocula chat [--model PATH]`: a multi-turn chat on the terminal; `/image PATH` attaches an image to the
  next message, `/video PATH` a video, `/reset` clears the history, `/exit` (or end of input) quits.
- `ocula serve MODEL`: the OpenAI-compatible HTTP server (docs/serving.md), bound to 127.0.0.1 by default.
- `ocula batch INPUT.jsonl OUTPUT.jsonl`: every input line through the engine; results are appended line
  by line as they finish, so a crash loses nothing and a rerun skips the ids already done; a bad line is
  reported (stderr and an `error` record) without stopping the others.
- `ocula bench`: the engine benchmark of the source repository's `benchmarks/` folder.

`--dtype --device --max-model-len --max-num-seqs --enforce-eager` are accepted by every command that loads a model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "shapes-qwen2-vl"


def _add_model_args(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        parser.add_argument("model", help="checkpoint folder or hub id")
    else:
        parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder or hub id")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:0, ...")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest prompt + answer, in tokens")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="engine commands: no CUDA graphs for decode steps on a GPU")


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- loading ----------------------------------------------------------------------------------------------


def check_model(model: str) -> None:
    if Path(model) == DEFAULT_MODEL and not DEFAULT_MODEL.is_dir():
        from .errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(
            f"The bundled shapes model is not installed at {DEFAULT_MODEL}. Pass --model with a checkpoint "
            "folder or hub id (e.g. --model Qwen/Qwen2-VL-2B-Instruct), or reinstall ocula with its assets."
        )


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(processor, model) for the library path, with progress on stderr."""
    from .auto import AutoModelForImageTextToText, AutoProcessor

    check_model(args.model)
    start = time.monotonic()
    log(f"ocula: loading {args.model} ...")
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=args.dtype,  # checked there
                                                        device=args.device)
    log(f"ocula: loaded in {time.monotonic() - start:.1f} s")
    return processor, model


def load_engine(args: argparse.Namespace) -> tuple[Any, Any]:
    """(LLMEngine, processor) built by the engine's offline API, with progress on stderr."""
    from .engine.llm import LLM

    check_model(args.model)
    start = time.monotonic()
    log(f"ocula: loading {args.model} into the engine ...")
    options = {"dtype": args.dtype, "device": args.device, "max_num_seqs": args.max_num_seqs,
               "enforce_eager": args.enforce_eager}
    if args.max_model_len is not None:
        options["max_model_len"] = args.max_model_len
    llm = LLM(args.model, **options)
    log(f"ocula: ready in {time.monotonic() - start:.1f} s")
    return llm.engine, llm.processor


# ---- run / chat ------------------------------------------------------------------------------------------


def _conversation(prompt: str, images: list[str], video: str | None) -> list[dict]:
    content: list[dict] = [{"type": "image", "url": image} for image in images]
    if video:
        content.append({"type": "video", "path": video})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def generate_streamed(processor: Any, model: Any, conversation: list[dict], args: argparse.Namespace) -> str:
    """Generate the assistant's answer to `conversation`, printing it as it comes; return its text."""
    from .generation import TextStreamer

    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    ).to(model.device)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    ids = model.generate(**inputs, max_new_tokens=args.max_tokens, streamer=streamer, **sampling)
    new = ids[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new, skip_special_tokens=True)


def cmd_run(args: argparse.Namespace) -> int:
    processor, model = load_model(args)
    generate_streamed(processor, model, _conversation(args.prompt, args.image or [], args.video), args)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .errors import OculaError

    processor, model = load_model(args)
    session = ChatSession()
    interactive = sys.stdin.isatty()
    log("ocula chat: /image PATH attaches an image, /video PATH a video, /reset clears, /exit quits")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        message = session.handle(line.strip())
        if message == "exit":
            return 0
        if isinstance(message, list):
            print("ocula> ", end="", flush=True)
            try:
                answer = generate_streamed(processor, model, message, args)
            except OculaError as error:  # a bad attachment drops that turn, not the whole session
                print(flush=True)
                log(f"ocula: error: {error} (message dropped; attach another file or go on)")
                session.drop_last()
                continue
            print(flush=True)
            session.reply(answer)


class ChatSession:
    """The history of a terminal chat and the media attached to the next message."""

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.pending: list[dict] = []

    def handle(self, line: str) -> list[dict] | str | None:
        """A command's effect (None), "exit", or the conversation to answer."""
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit"):
            return "exit"
        if command in ("/image", "/video"):
            return self._attach(command[1:], rest.strip())
        if command == "/reset":
            self.history, self.pending = [], []
            log("(history cleared)")
            return None
        if not line:
            return None
        content = self.pending + [{"type": "text", "text": line}]
        self.history.append({"role": "user", "content": content})
        self.pending = []
        return self.history

    def _attach(self, kind: str, path: str) -> None:
        if not path:
            log(f"usage: /{kind} PATH")
        elif not (path.startswith(("http://", "https://")) or Path(path).expanduser().is_file()):
            log(f"no such file: {path}")
        else:
            key = "url" if kind == "image" else "path"
            self.pending.append({"type": kind, key: str(Path(path).expanduser()) if key == "path" else path})
            log(f"({kind} attached to your next message)")

    def drop_last(self) -> None:
        """Forget the last user message (it could not be answered)."""
        if self.history and self.history[-1]["role"] == "user":
            self.history.pop()

    def reply(self, text: str) -> None:
        self.history.append({"role": "assistant", "content": [{"type": "text", "text": text}]})


# ---- serve ---------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .engine.async_engine import AsyncLLMEngine
    from .server.app import ServerConfig, create_app
    from .server.chat import MediaLimits
    from .server.security import MediaPolicy

    engine, processor = load_engine(args)
    config = ServerConfig(
        served_model_name=args.served_model_name or args.model,
        api_key=args.api_key,
        max_request_bytes=args.max_request_mb * 1024 * 1024,
        max_pending_requests=args.max_pending_requests,
        max_model_len=engine.config.max_model_len,
        policy=MediaPolicy(allowed_local_path=args.allowed_local_media_path,
                           allow_private_urls=args.allow_private_media_urls),
        limits=MediaLimits(max_image_pixels=args.max_image_pixels, max_video_frames=args.max_video_frames,
                           max_video_pixels=args.max_video_pixels,
                           max_prompt_tokens=args.max_prompt_tokens),
        processor_kwargs=args.mm_processor_kwargs,
    )
    app = create_app(AsyncLLMEngine(engine), processor, config)
    log(f"ocula: serving {config.served_model_name!r} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_serve_args(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--served-model-name", default=None, help="model name clients send (default: MODEL)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--allowed-local-media-path", default=None, help="folder file:// media may come from")
    serve.add_argument("--allow-private-media-urls", action="store_true",
                       help="let image/video URLs reach loopback and private networks")
    serve.add_argument("--max-request-mb", type=int, default=32, help="largest request body, in MiB")
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest decoded image")
    serve.add_argument("--max-video-frames", type=int, default=32, help="most frames sampled per video")
    serve.add_argument("--max-video-pixels", type=int, default=64 * 1024 * 1024,
                       help="decoded pixels of one video, all frames together (fewer frames when larger)")
    serve.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (media included)")
    serve.add_argument("--mm-processor-kwargs", type=json.loads, default={},
                       help='processor options as JSON, e.g. \'{"max_pixels": 1003520}\'')
    serve.add_argument("--max-pending-requests", type=int, default=256, help="requests in flight before 503")
    serve.add_argument("--log-level", default="info")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:  # else uvicorn fails deep in socket.bind with an OverflowError
        raise argparse.ArgumentTypeError(f"port {value} is outside 0-65535")
    return value


# ---- batch / bench -------------------------------------------------------------------------------------


@dataclass
class BatchJob:
    line: int
    id: str
    messages: list[Any]                 # OpenAI ChatMessage objects
    sampling: dict[str, Any]            # SamplingParams fields given on the line


def cmd_batch(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .server.chat import ChatPreparer
    from .server.security import MediaPolicy

    if not args.input.is_file():
        raise ConfigError(f"No input file {args.input}: give a JSONL file with one request per line.")
    done = finished_ids(args.output, args.retry_errors)
    jobs, bad = read_jobs(args.input, done)
    log(f"ocula batch: {len(jobs)} to run, {len(done)} already done, {len(bad)} bad line(s)")
    with args.output.open("a", encoding="utf-8") as out:
        _end_partial_line(args.output, out)
        for record in bad:
            _write(out, record)
        if jobs:
            engine, processor = load_engine(args)
            # a local tool: local files and private URLs are the user's own
            preparer = ChatPreparer(processor, MediaPolicy(allowed_local_path=Path("/"), allow_private_urls=True))
            run_jobs(engine, preparer, jobs, out, args)
    return 0


def run_jobs(engine: Any, preparer: Any, jobs: list[BatchJob], out, args: argparse.Namespace) -> None:
    """Keep the engine fed (2 x max_num_seqs requests queued) and write each result as it finishes."""
    from .engine.sampling_params import SamplingParams
    from .errors import OculaError
    from .server.chat import to_engine_media

    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    queue, progress = list(reversed(jobs)), Progress(len(jobs))
    while queue or engine.has_unfinished():
        while queue and len(engine.requests) < 2 * args.max_num_seqs:
            job = queue.pop()
            try:
                prepared = preparer.prepare(job.messages)
                params = SamplingParams(**{**defaults, **job.sampling})
                engine.add_request(job.id, prepared.prompt_token_ids, params, to_engine_media(prepared.processed))
            except (OculaError, ValueError) as error:
                _write(out, {"id": job.id, "error": str(error)}, progress, f"line {job.line}: {error}")
        for output in engine.step():
            if output.finished:
                _write(out, _result(output), progress)
    progress.close()


def read_jobs(path: Path, done: set[str]) -> tuple[list[BatchJob], list[dict]]:
    """Jobs of the input file not yet done, and error records for the lines that cannot run."""
    jobs, bad, seen = [], [], set(done)
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                job = parse_job(json.loads(line), number, path.parent)
            except (ValueError, TypeError, KeyError) as error:
                log(f"ocula batch: line {number}: {error}")
                bad.append({"id": f"line-{number}", "line": number, "error": f"bad input line: {error}"})
                continue
            if job.id not in seen:
                seen.add(job.id)
                jobs.append(job)
    return jobs, [b for b in bad if b["id"] not in done]


SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "n")


def parse_job(record: dict, number: int, base: Path) -> BatchJob:
    """{"id", "messages": [OpenAI messages]} or {"id", "prompt", "images": [...], "video": ...}."""
    from .server.protocol import ChatMessage

    if not isinstance(record, dict):
        raise TypeError("each line must be a JSON object")
    if "messages" in record:
        messages = [_localize(m, base) for m in record["messages"]]
    elif "prompt" in record:
        messages = [_prompt_message(record, base)]
    else:
        raise ValueError("a line needs 'messages' or 'prompt'")
    return BatchJob(number, str(record.get("id", f"line-{number}")), [ChatMessage.model_validate(m) for m in messages],
                    {k: record[k] for k in SAMPLING_KEYS if k in record})


def _prompt_message(record: dict, base: Path) -> dict:
    images = record.get("images") or ([record["image"]] if record.get("image") else [])
    images = [images] if isinstance(images, str) else images  # "images": "cat.png" means one image
    if not isinstance(images, list):
        raise TypeError(f"'images' must be a list of paths or URLs, got {images!r}")
    content = [{"type": "image_url", "image_url": {"url": _media_url(i, base)}} for i in images]
    if record.get("video"):
        content.append({"type": "video_url", "video_url": {"url": _media_url(record["video"], base)}})
    return {"role": "user", "content": content + [{"type": "text", "text": str(record["prompt"])}]}


def _localize(message: dict, base: Path) -> dict:
    """Plain paths in OpenAI image_url / video_url parts become file:// URLs (relative to the input)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image_url", "video_url") and isinstance(part.get(kind), dict):
            part = {**part, kind: {**part[kind], "url": _media_url(part[kind].get("url", ""), base)}}
        parts.append(part)
    return {**message, "content": parts}


def _media_url(source: str, base: Path) -> str:
    if not isinstance(source, str):
        raise TypeError(f"a media path or URL must be a string, got {source!r}")
    if source.startswith(("http://", "https://", "data:", "file://")):
        return source
    return (base / Path(source).expanduser()).resolve().as_uri()


def finished_ids(path: Path, retry_errors: bool = False) -> set[str]:
    """Ids with a record from an earlier run (a torn last line does not count; nor, when retrying, errors)."""
    done: set[str] = set()
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "id" in record and not (retry_errors and "error" in record):
            done.add(str(record["id"]))
    return done


def _end_partial_line(path: Path, out) -> None:
    """A crash may have torn the last line: start the next record on a fresh line."""
    if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        out.write("\n")


def _result(output: Any) -> dict:
    record = {"id": output.request_id}
    choices = output.outputs
    record.update({"text": choices[0].text, "finish_reason": choices[0].finish_reason})
    if len(choices) > 1:
        record["texts"] = [c.text for c in choices]
    completion = sum(len(c.token_ids) for c in choices)
    record["usage"] = {"prompt_tokens": len(output.prompt_token_ids), "completion_tokens": completion}
    return record


def _write(out, record: dict, progress: Progress | None = None, problem: str | None = None) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
    if problem:
        log(f"ocula batch: {problem}")
    if progress is not None:
        progress.update()


class Progress:
    """tqdm when installed, else a one-line counter on stderr."""

    def __init__(self, total: int):
        self.total, self.count = total, 0
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            print(f"\r{self.count}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.suite}.py"
    if not script.is_file():
        from .errors import UnsupportedFeatureError

        raise UnsupportedFeatureError(
            f"No benchmark at {script}: the benchmarks live in ocula's source repository; run this command "
            "from a source checkout (pip install -e .)."
        )
    sys.path[:0] = [str(script.parent), str(script.parent.parent)]  # the scripts import `common`
    module = importlib.import_module(args.suite)
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    module.main(bench_args)
    return 0


# ---- parser --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocula", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="answer one prompt about images or a video")
    _add_model_args(run)
    run.add_argument("prompt")
    run.add_argument("--image", action="append", help="image file or URL (repeatable)")
    run.add_argument("--video", default=None, help="video file")
    _add_sampling_args(run)
    run.set_defaults(func=cmd_run)

    chat = commands.add_parser("chat", help="multi-turn chat in the terminal (/image PATH attaches)")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model_args(serve, positional=True)
    _add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    batch = commands.add_parser("batch", help="offline batch: INPUT.jsonl -> OUTPUT.jsonl (resumable)")
    batch.add_argument("input", type=Path)
    batch.add_argument("output", type=Path)
    _add_model_args(batch)
    _add_sampling_args(batch)
    batch.add_argument("--retry-errors", action="store_true", help="rerun the ids whose record is an error")
    batch.set_defaults(func=cmd_batch)

    bench = commands.add_parser("bench", help="the engine benchmark (source checkout)")
    bench.add_argument("--suite", default="bench_qwen2_vl", help="script name under benchmarks/")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        from .errors import OculaError

        if isinstance(error, OculaError):
            print(f"ocula: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
