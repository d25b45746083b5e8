"""Exact-match accuracy of a shapes demo checkpoint, per question type, on held-out images.

    python scripts/eval_demo.py shapes-demo                 # 500 held-out images per question type
    python scripts/eval_demo.py shapes-demo --generate      # decode with generate() instead

Notable features:
- Held-out images come from seeds no training step or tokenizer merge ever saw (shapes.HELDOUT_SEEDS).
- Default scoring is teacher-forced: the answer is right when each of its tokens and the closing
  <|im_end|> is the argmax, which is exactly when greedy decoding returns the answer; one forward pass per
  batch instead of a decode loop.
- `--generate` runs the real greedy `generate()` on left-padded prompts and compares the decoded text, an
  end-to-end check of the library's generation path.
- `--errors` sorts the wrong generated answers on scenes of several shapes: an attribute of another shape
  in the scene (the model saw it but did not pick the shape the question names) or one not in the scene.
- Targets: >= 95% on shape and colour, >= 90% on count and position; the exit status is 1 when missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ocula.demo import shapes
from ocula.demo.batches import conversation, correct, heldout_samples

TARGETS = {"shape": 0.95, "colour": 0.95, "count": 0.90, "position": 0.90}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--images", type=int, default=500, help="held-out images per question type")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--generate", action="store_true", help="score generate() output instead of logits")
    p.add_argument("--errors", action="store_true",
                   help="also sort the wrong generated answers on 2- and 3-shape scenes (see error_kind)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", choices=("ocula", "transformers"), default="ocula")
    return p.parse_args(argv)


def load(folder: Path, backend: str):
    if backend == "transformers":
        import transformers as lib
    else:
        import ocula as lib
    processor = lib.AutoProcessor.from_pretrained(folder)
    model = lib.AutoModelForImageTextToText.from_pretrained(folder)
    return processor, model.eval()


@torch.no_grad()
def generated_answers(model, processor, samples: list[shapes.Sample]) -> list[str]:
    prompts = [processor.apply_chat_template(conversation(s, False), add_generation_prompt=True) for s in samples]
    inputs = processor(text=prompts, images=[s.image() for s in samples], return_tensors="pt",
                       padding=True, padding_side="left")
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def answered(model, processor, samples: list[shapes.Sample], batch_size: int, generate: bool) -> list[bool]:
    if not generate:
        return correct(model, processor, samples, batch_size)
    flags = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        flags += [a.strip() == s.answer for a, s in zip(generated_answers(model, processor, chunk), chunk)]
    return flags


def report(model, processor, n: int, batch_size: int, generate: bool) -> dict[str, dict[str, float]]:
    """{question type: {"all": accuracy, "1 shape": ..., "2 shapes": ..., "3 shapes": ...}}."""
    scores = {}
    for qtype in shapes.QUESTION_TYPES:
        samples = heldout_samples(qtype, n)
        flags = answered(model, processor, samples, batch_size, generate)
        row = {"all": sum(flags) / n}
        for count in (1, 2, 3):
            picked = [f for f, s in zip(flags, samples) if len(s.scene.shapes) == count]
            row[f"{count} shape{'s' * (count > 1)}"] = round(sum(picked) / max(1, len(picked)), 4)
        scores[qtype] = row
    return scores


def error_kind(sample: shapes.Sample, answer: str) -> str:
    """How a generated answer relates to the scene: "right"; "another shape's" when it is the colour, kind or
    cell of a shape in the scene (a shape the question did not ask about); "not in the scene" otherwise
    (counts, relations and captions: "wrong")."""
    answer = answer.strip()
    if answer == sample.answer:
        return "right"
    present = {
        "colour": {s.colour for s in sample.scene.shapes},
        "shape": {s.kind for s in sample.scene.shapes},
        "position": {shapes.CELLS[s.cell] for s in sample.scene.shapes},
    }.get(sample.qtype)
    if present is None or (sample.qtype == "position" and sample.answer not in shapes.CELLS):
        return "wrong"
    return "another shape's" if answer in present else "not in the scene"


def errors(model, processor, n: int, batch_size: int) -> dict[str, dict[str, int]]:
    """{question type: {error kind: count}} over the generated answers on 2- and 3-shape held-out scenes."""
    out = {}
    for qtype in shapes.QUESTION_TYPES:
        samples = [s for s in heldout_samples(qtype, n) if len(s.scene.shapes) > 1]
        kinds: dict[str, int] = {}
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            for sample, answer in zip(chunk, generated_answers(model, processor, chunk)):
                kind = error_kind(sample, answer)
                kinds[kind] = kinds.get(kind, 0) + 1
        out[qtype] = kinds
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    processor, model = load(args.checkpoint, args.backend)
    scores = report(model, processor, args.images, args.batch_size, args.generate)
    missed = {q: t for q, t in TARGETS.items() if scores[q]["all"] < t}
    result = {"images_per_type": args.images, "accuracy": scores, "missed_targets": missed}
    if args.errors:
        result["multi_shape_answers"] = errors(model, processor, args.images, args.batch_size)
    print(json.dumps(result, indent=2))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
