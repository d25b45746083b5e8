"""Train the shapes demo model, a tiny Qwen2-VL, on procedurally generated images; save a checkpoint folder.

    python scripts/train_demo.py --out shapes-demo --seed 1   # the shipped model: 10000 steps, ~55 minutes on
                                                              # 2 AVX2 cores (0.33 s a step)
    ocula run --model shapes-demo --image examples/shapes.png "What is in the picture?"

Notable features:
- A curriculum (--curriculum): phases of one-shape scenes before the full mix of question types. A tiny
  vision tower learns one attribute at a time: asked colour and shape together from the start, it learns
  colour and never shape (still at chance after 3000 steps); asked shape alone it learns shape in ~250 steps.
  The default teaches shape (600 steps), then colour (400), then both with captions (400), then the full mix
  (6100), then the focus mix (2500, `focus`): colour, count and position questions three times as often,
  on scenes of two or three shapes four times in five. A phase may also ask any question type on scenes of
  2 or 3 shapes (`colour+position@2:1000`), and `mix` places the full mix between phases.
- Two learning-rate cycles (--restart 7500:3e-4): the focus phase warms up again to its own peak. Finding a
  shape by what it is ("the circle") comes late, once the vision tower is good, and needs a rate well above
  the tail of one long cycle (the four-head model shipped before: colour 82% -> 96% on 100 held-out images
  in 1500 focus steps). Where a run lands varies: the same first 7500 steps with last-bit differences in the
  loss sums reached colour 67%, not 82%, by step 7500.
- Every answer weighs the same in the loss (--loss answer): with the plain token mean a 12-token caption
  outweighs a one-word colour or count.
- `--size` changes the model's dimensions for experiments (`text_layers=4,mrope_section=2/3/3`; why the heads
  and bands matter: the comments on `DemoSize`). `--init` starts from a checkpoint of the same size.
- An endless stream of fresh training samples (consecutive train seeds), so there is no overfitting to a
  fixed set and a run is reproducible from its flags alone; batches are rendered and tokenized in a worker
  process (--workers 1), so the two cores of a small machine train and render at the same time.
- AdamW with linear warmup and cosine decay; gradient clipping at 1.0.
- Labels only on the answers and the closing <|im_end|> (see ocula/demo/batches.py).
- A text progress bar, a held-out exact-match report every --eval-every steps, a loss curve PNG drawn with
  Pillow, and weights saved as model.safetensors next to the skeleton files (config, processor, tokenizer).
- `--backend transformers` trains the same architecture with transformers' classes (a cross-check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ocula.demo import DEMO_SIZE, DemoSize, write_skeleton
from ocula.demo.batches import (
    PHASE_TYPES,
    WARMUP_TYPES,
    accuracy,
    focus_samples,
    loss_fn,
    make_batch,
    train_samples,
    warmup_samples,
)

DEFAULT_CURRICULUM = "shape:600,colour:400,colour+shape+caption:400,mix:6100,focus:2500"
DEFAULT_RESTART = "7500:3e-4"  # the focus phase's own learning-rate cycle
MIX, FOCUS = 0, -1  # the scene-size field of a `mix` / `focus` phase: neither asks a fixed number of shapes


def parse_curriculum(text: str) -> list[tuple[tuple[str, ...], int, int]]:
    """'shape:600,mix:2000,colour+count@2:400' -> [(("shape",), 1, 600), ((), 0, 2000), (("colour", "count"), 2, 400)].

    Each phase asks its question types in turn on scenes of one shape, or of `@N` shapes; `mix` is the full
    mix of every question type on every scene. Steps after the last phase are the full mix too."""
    phases = []
    for part in filter(None, text.split(",")):
        head, _, steps = part.partition(":")
        types, _, count = head.partition("@")
        if types in ("mix", "focus") and not count and steps.isdigit():
            phases.append(((), MIX if types == "mix" else FOCUS, int(steps)))
            continue
        qtypes = tuple(types.split("+"))
        allowed = WARMUP_TYPES if not count else PHASE_TYPES
        if not steps.isdigit() or not set(qtypes) <= set(allowed) or count not in ("", "1", "2", "3"):
            raise argparse.ArgumentTypeError(
                f"bad curriculum phase {part!r}: use e.g. 'shape:600,colour+shape:400,mix:3000,colour@2:300'")
        phases.append((qtypes, int(count or 1), int(steps)))
    return phases


def parse_size(text: str) -> DemoSize:
    """'text_layers=4,mrope_section=8/4/4' -> DEMO_SIZE with those fields replaced ('' -> DEMO_SIZE)."""
    fields = {f.name: f for f in dataclasses.fields(DemoSize)}
    changes = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in fields or not value:
            raise argparse.ArgumentTypeError(f"bad size field {part!r}: use NAME=VALUE with NAME one of {sorted(fields)}")
        default = getattr(DEMO_SIZE, name)
        if isinstance(default, tuple):
            changes[name] = tuple(int(v) for v in value.split("/"))
        else:
            changes[name] = type(default)(value)
    try:
        return dataclasses.replace(DEMO_SIZE, **changes)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("shapes-demo"), help="checkpoint folder to write")
    p.add_argument("--steps", type=int, default=10000, help="all steps, the curriculum included")
    p.add_argument("--curriculum", type=parse_curriculum, default=DEFAULT_CURRICULUM,
                   help="phases on one-shape scenes before the full mix, 'TYPES:STEPS,...' with TYPES one of "
                        "shape, colour, caption or several joined by '+' (default: %(default)s)")
    p.add_argument("--image-side", type=int, default=DEMO_SIZE.image_side,
                   help="the processor's pixel budget is this squared (112: 16 image tokens, 56: 4)")
    p.add_argument("--size", type=parse_size, default="",
                   help="model dimensions other than the shipped DemoSize, e.g. 'text_layers=4,mrope_section=8/4/4'")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--restart", type=parse_restart, default=DEFAULT_RESTART,
                   help="STEP:PEAK_LR, a second warmup and cosine cycle from that step ('' for one cycle; "
                        "default: %(default)s)")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--loss", choices=("answer", "token"), default="answer",
                   help="answer: every answer weighs the same; token: every answer token does")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="weight init seed")
    p.add_argument("--init", type=Path, help="start from this checkpoint's weights instead of random ones")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--workers", type=int, choices=(0, 1), default=1,
                   help="1: render and tokenize batches in a worker process, overlapping training; 0: inline")
    p.add_argument("--eval-every", type=int, default=1000, help="0: evaluate only at the end")
    p.add_argument("--eval-images", type=int, default=100, help="held-out images per question type")
    p.add_argument("--backend", choices=("ocula", "transformers"), default="ocula")
    return p.parse_args(argv)


def model_classes(backend: str):
    """(AutoProcessor, AutoConfig, Qwen2VLForConditionalGeneration) of the chosen library."""
    if backend == "transformers":
        import transformers as lib
    else:
        import ocula as lib
    return lib.AutoProcessor, lib.AutoConfig, lib.Qwen2VLForConditionalGeneration


@torch.no_grad()
def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Qwen2-VL's initialisation, done here so both backends start from the same distribution."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif hasattr(module, "weight") and isinstance(module.weight, torch.nn.Parameter) and module.weight.ndim == 1:
            module.weight.fill_(1.0)  # RMSNorm / LayerNorm
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def parse_restart(text: str) -> tuple[int, float] | None:
    """'6000:3e-4' -> (6000, 3e-4): the learning rate warms up again at that step to that peak; '' -> None."""
    if not text:
        return None
    step, _, lr = text.partition(":")
    try:
        return int(step), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad restart {text!r}: use STEP:PEAK_LR, e.g. '6000:3e-4'") from None


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """Linear warmup and cosine decay to --min-lr-ratio, over all steps or in two cycles split at --restart."""
    start, end, peak = 0, args.steps, 1.0
    if args.restart is not None:
        if step < args.restart[0]:
            end = min(args.restart[0], args.steps)
        else:
            start, peak = args.restart[0], args.restart[1] / args.lr
    span = max(1, end - start)
    warm = min(1.0, (step - start + 1) / args.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(step - start, span) / span))
    return peak * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def step_samples(step: int, args: argparse.Namespace) -> list:
    """The curriculum: its phases of one-shape scenes first, then the mix of every question type."""
    start, mixed = 0, 0  # mixed: full-mix steps so far, so the mix walks its own seeds in order
    for qtypes, num_shapes, steps in args.curriculum:
        if step < start + steps:
            if num_shapes == FOCUS:
                return focus_samples(step - start, args.batch_size)
            if num_shapes == MIX:
                return train_samples(mixed + step - start, args.batch_size)
            return warmup_samples(step, args.batch_size, qtypes, num_shapes)
        mixed += steps if num_shapes == MIX else 0
        start += steps
    return train_samples(mixed + step - start, args.batch_size)


class Batches(torch.utils.data.IterableDataset):
    """The batch of every step, in order; built in a worker process so rendering overlaps training."""

    def __init__(self, processor, args: argparse.Namespace):
        self.processor, self.args = processor, args

    def __iter__(self):
        for step in range(self.args.steps):
            yield make_batch(self.processor, step_samples(step, self.args))


def batches(processor, args: argparse.Namespace):
    if args.workers == 0:
        return iter(Batches(processor, args))
    return iter(torch.utils.data.DataLoader(Batches(processor, args), batch_size=None, num_workers=1,
                                            prefetch_factor=8))


def show_progress(step: int, total: int, loss: float, lr: float, started: float) -> None:
    done = (step + 1) / total
    elapsed = time.time() - started
    bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
    eta = elapsed / done - elapsed
    sys.stderr.write(f"\r[{bar}] {step + 1}/{total} loss {loss:.4f} lr {lr:.2e} {elapsed:.0f}s eta {eta:.0f}s")
    sys.stderr.flush()


def draw_loss_curve(losses: list[float], path: Path, width: int = 640, height: int = 360) -> None:
    """A log-scale training loss curve (raw in grey, smoothed in blue), drawn with Pillow alone."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 20, width - 20, height - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    logs = [math.log10(max(x, 1e-6)) for x in losses]
    lo, hi = min(logs), max(logs) + 1e-9

    def point(i: int, y: float) -> tuple[float, float]:
        return left + (right - left) * i / max(1, len(logs) - 1), bottom - (bottom - top) * (y - lo) / (hi - lo)

    draw.line([point(i, y) for i, y in enumerate(logs)], fill=(190, 190, 190))
    draw.line([point(i, y) for i, y in enumerate(_smooth(logs))], fill=(30, 60, 220), width=2)
    draw.text((left, bottom + 8), f"step 0 .. {len(losses)}", fill="black")
    draw.text((4, top), f"{10 ** hi:.3g}", fill="black")
    draw.text((4, bottom - 10), f"{10 ** lo:.3g}", fill="black")
    draw.text((left + 8, top + 6), "training loss (log scale)", fill="black")
    image.save(path)


def _smooth(values: list[float], beta: float = 0.98) -> list[float]:
    out, avg = [], values[0]
    for v in values:
        avg = beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def save_weights(model: torch.nn.Module, folder: Path, tied: bool) -> None:
    # tied lm_head shares the embedding's storage: like transformers, keep only the embedding
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def check_same_size(init: Path, folder: Path) -> None:
    """--init must name a checkpoint of the size being trained. Eight heads of 16 and four of 32 have weights of
    the same shapes, so loading alone would not notice a missing --size."""
    theirs, ours = (json.loads((f / "config.json").read_text()) for f in (init, folder))
    differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    if differ:
        raise SystemExit(f"--init {init}: its config.json differs from this run's in {', '.join(differ)}; "
                         "pass the --size it was trained with")


def train(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train, evaluate and save; returns the trained model and its last held-out scores."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    AutoProcessor, AutoConfig, ModelClass = model_classes(args.backend)
    folder = write_skeleton(args.out, dataclasses.replace(args.size, image_side=args.image_side))
    if args.init:
        check_same_size(args.init, folder)
    processor, config = AutoProcessor.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    model = ModelClass(config)
    init_weights(model)
    if args.init:
        model.load_state_dict(ModelClass.from_pretrained(args.init).state_dict())
    model.train()
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters", file=sys.stderr)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    losses, started, scores = [], time.time(), {}
    stream = batches(processor, args)
    for step in range(args.steps):
        batch = next(stream)
        # every position's logits, as in the run that made the shipped weights: keeping only the scored ones
        # (scored_positions, 5% faster) rounds the loss sums differently in the last bit, and the run drifts away
        loss = loss_fn(model(**batch.inputs).logits, batch.labels, per_answer=args.loss == "answer")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        show_progress(step, args.steps, _smooth(losses[-50:], 0.9)[-1], schedule.get_last_lr()[0], started)
        if step + 1 == args.steps or (args.eval_every and (step + 1) % args.eval_every == 0):
            scores = accuracy(model, processor, args.eval_images)
            print(f"\nstep {step + 1}: held-out exact match {json.dumps(scores)}", file=sys.stderr)
            save(model, config, folder, losses)  # a usable checkpoint at every evaluation
    return model, scores


def save(model: torch.nn.Module, config, folder: Path, losses: list[float]) -> None:
    save_weights(model, folder, tied=bool(getattr(config, "tie_word_embeddings", True)))
    draw_loss_curve(losses, folder / "loss.png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _, scores = train(args)
    print(json.dumps({"out": str(args.out), "steps": args.steps, "curriculum": args.curriculum,
                      "lr": args.lr, "seed": args.seed, "accuracy": scores}, indent=2))


if __name__ == "__main__":
    main()
