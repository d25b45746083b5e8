"""Train the shapes demo model, a tiny Qwen2-VL, on procedurally generated images; save a checkpoint folder.

    python scripts/train_demo.py --out shapes-demo --threads 1   # the shipped model: 22 minutes, one thread
    ocula run --model shapes-demo --image examples/shapes.png "What is in the picture?"

Notable features:
- A two-phase curriculum: --colour-warmup steps of colour questions about one-shape scenes, then the full
  mix of question types (see ocula/demo/batches.py for why colour stays at chance without it).
- An endless stream of fresh training samples (consecutive train seeds), so there is no overfitting to a
  fixed set and a run is reproducible from its flags alone.
- AdamW with linear warmup and cosine decay; gradient clipping at 1.0.
- Labels only on the answers and the closing <|im_end|> (see ocula/demo/batches.py).
- A text progress bar, a held-out exact-match report every --eval-every steps, a loss curve PNG drawn with
  Pillow, and weights saved as model.safetensors next to the skeleton files (config, processor, tokenizer).
- `--backend transformers` trains the same architecture with transformers' classes (a cross-check).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ocula.demo import write_skeleton
from ocula.demo.batches import accuracy, colour_warmup_samples, loss_fn, make_batch, train_samples


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("shapes-demo"), help="checkpoint folder to write")
    p.add_argument("--steps", type=int, default=5500, help="all steps, the colour warmup included")
    p.add_argument("--colour-warmup", type=int, default=500, help="first steps: colour of one-shape scenes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="weight init seed")
    p.add_argument("--threads", type=int, default=2)
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


def lr_factor(step: int, args: argparse.Namespace) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))
    return warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def step_samples(step: int, args: argparse.Namespace) -> list:
    """The curriculum: colour-only one-shape scenes first, then the mix of every question type."""
    if step < args.colour_warmup:
        return colour_warmup_samples(step, args.batch_size)
    return train_samples(step - args.colour_warmup, args.batch_size)


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


def train(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train, evaluate and save; returns the trained model and its last held-out scores."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    AutoProcessor, AutoConfig, ModelClass = model_classes(args.backend)
    folder = write_skeleton(args.out)
    processor, config = AutoProcessor.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    model = ModelClass(config)
    init_weights(model)
    model.train()
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters", file=sys.stderr)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    losses, started, scores = [], time.time(), {}
    for step in range(args.steps):
        batch = make_batch(processor, step_samples(step, args))
        loss = loss_fn(model(**batch.inputs).logits, batch.labels)
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
    print(json.dumps({"out": str(args.out), "steps": args.steps, "colour_warmup": args.colour_warmup,
                      "lr": args.lr, "seed": args.seed, "accuracy": scores}, indent=2))


if __name__ == "__main__":
    main()
