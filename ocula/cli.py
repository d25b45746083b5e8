"""The `ocula` command line: run | chat | serve | batch | bench.

`run` answers one prompt about images / a video and streams the answer; with no --model it uses the tiny
shapes model that ships inside the package, so it works on a fresh machine with no download.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "shapes-qwen2-vl"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder or hub id")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest prompt + answer, in tokens")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together")


def _conversation(prompt: str, images: list[str], video: str | None) -> list[dict]:
    content: list[dict] = [{"type": "image", "url": image} for image in images]
    if video:
        content.append({"type": "video", "path": video})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from .auto import AutoModelForImageTextToText, AutoProcessor
    from .generation import TextStreamer

    processor = AutoProcessor.from_pretrained(args.model)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, device=args.device)
    inputs = processor.apply_chat_template(
        _conversation(args.prompt, args.image or [], args.video),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    ).to(model.device)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(**inputs, max_new_tokens=args.max_tokens, streamer=streamer,
                   do_sample=args.temperature > 0, temperature=args.temperature or None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocula", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="answer one prompt about images or a video")
    _add_model_args(run)
    run.add_argument("prompt")
    run.add_argument("--image", action="append", help="image file or URL (repeatable)")
    run.add_argument("--video", default=None, help="video file")
    run.add_argument("--max-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float, default=0.0)
    run.set_defaults(func=cmd_run)
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
