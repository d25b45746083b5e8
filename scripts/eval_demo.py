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
- `--probe` asks where the model loses the shape a colour question names: a linear probe reads "circle" /
  "square" / ... from the hidden state after each decoder layer, at the question's last word and where the
  answer is written. A model that answers "What colour is the circle?" right carries the kind to the answer
  (~90% there) or finds the colour at the word and copies that on: a second probe reads the answer, the
  named shape's colour, at the same two places, on scenes of several shapes. Two more read, where the
  answer to "What shape is at the top left?" is written, the row and column asked (a model that carries only
  the row confuses the shapes of a row), and, at every image token of a shape, the row and column of its cell
  and the shape's kind.
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
from ocula.demo.batches import conversation, correct, heldout_samples, make_batch

TARGETS = {"shape": 0.95, "colour": 0.95, "count": 0.90, "position": 0.90}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--images", type=int, default=500, help="held-out images per question type")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--generate", action="store_true", help="score generate() output instead of logits")
    p.add_argument("--errors", action="store_true",
                   help="also sort the wrong generated answers on 2- and 3-shape scenes (see error_kind)")
    p.add_argument("--probe", action="store_true",
                   help="also probe each decoder layer for the shape a colour question names and for its colour, for "
                        "the place a shape question asks, and for each image token's place "
                        "(see kind_probe, colour_probe, place_probe, cell_probe)")
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


@torch.no_grad()
def layer_states(model, processor, samples: list[shapes.Sample], batch_size: int = 50):
    """Yield (batch, [layers + 1, B, S, D]) for each batch of `samples`: the decoder's input and each layer's
    output, taken with forward hooks."""
    layers = model.model.language_model.layers
    captured: list[torch.Tensor] = []
    hooks = [layers[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))]
    hooks += [layer.register_forward_hook(lambda module, args, out: captured.append(
        out[0] if isinstance(out, tuple) else out)) for layer in layers]
    try:
        for start in range(0, len(samples), batch_size):
            batch = make_batch(processor, samples[start:start + batch_size])
            captured.clear()
            model(**batch.inputs)
            yield batch, torch.stack(captured)
    finally:
        for hook in hooks:
            hook.remove()


def hidden_states(model, processor, samples: list[shapes.Sample], batch_size: int = 50
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """([layers + 1, N, D] hidden states where the answer is written, the same at the question's last word
    (the token before "?")): the decoder's input and each layer's output."""
    mark = processor.tokenizer.convert_tokens_to_ids("?")
    answer, word = [], []
    for batch, states in layer_states(model, processor, samples, batch_size):
        rows = torch.arange(len(batch.samples))
        first = (batch.labels != -100).int().argmax(1)  # the first answer token; it is predicted one before
        last_word = torch.stack([(row == mark).nonzero().max() - 1 for row in batch.inputs["input_ids"]])
        answer.append(states[:, rows, first - 1])
        word.append(states[:, rows, last_word])
    return torch.cat(answer, 1), torch.cat(word, 1)


def cell_probe(model, processor, n: int = 300, train: int = 200, batch_size: int = 50) -> dict[str, list[float]]:
    """{"row": [...], "column": [...], "kind": [...]}: how well an image token's place (top or bottom half, left
    or right half; chance 0.5) and the kind of the shape it shows (chance 0.25) are read linearly from the
    decoder's input and each layer's output, on the image tokens of the cells that hold a shape; fitted on the
    tokens of the first `train` held-out images, scored on the rest. With 2 x 2 image tokens to a shape each
    token shows a quarter of it, and finding "the circle" by its tokens' keys needs the kind in each one.

    Qwen2-VL's vision tower has only relative rotary positions, so the decoder's input knows a token's place
    only from what the image shows there; the decoder's causal attention then tells a token how many image
    tokens come before it, which gives the row (a threshold on that count) far more easily than the column."""
    samples = heldout_samples("shape", n)
    image_token = model.config.image_token_id
    found = []  # (hidden states [layers + 1, D], row, column, kind, image index) of each image token of a shape
    image = 0
    for batch, hidden in layer_states(model, processor, samples, batch_size):
        for b, (sample, ids, (_, h, _)) in enumerate(zip(batch.samples, batch.inputs["input_ids"],
                                                         batch.inputs["image_grid_thw"].tolist())):
            side = h // processor.image_processor.merge_size  # image tokens per row (and column)
            kinds = {shape.cell: shapes.KINDS.index(shape.kind) for shape in sample.scene.shapes}
            for k, position in enumerate((ids == image_token).nonzero()[:, 0].tolist()):
                row, col = 2 * (k // side) // side, 2 * (k % side) // side
                cell = 2 * row + col
                if cell in kinds:
                    found.append((hidden[:, b, position], row, col, kinds[cell], image))
            image += 1
    states, rows, cols, kinds, images = zip(*found)
    x = torch.stack(states, 1)
    fit = sum(i < train for i in images)  # tokens come in image order: the first `fit` are the training images'
    return {"row": per_layer_probe(x, torch.tensor(rows), fit, 2),
            "column": per_layer_probe(x, torch.tensor(cols), fit, 2),
            "kind": per_layer_probe(x, torch.tensor(kinds), fit, len(shapes.KINDS))}


def linear_probe(x: torch.Tensor, y: torch.Tensor, train: int, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a softmax-regression probe fitted on the first `train` rows of x [N, D]."""
    mean, std = x[:train].mean(0), x[:train].std(0) + 1e-5
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(x[:train] @ weight, y[:train]) + 1e-3 * weight.square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return ((x[train:] @ weight).argmax(1) == y[train:]).float().mean().item()


def per_layer_probe(states: torch.Tensor, y: torch.Tensor, train: int, classes: int) -> list[float]:
    """linear_probe's held-out accuracy on each layer of states [layers + 1, N, D], to three places."""
    return [round(linear_probe(h, y, train, classes), 3) for h in states]


def kind_probe(model, processor, n: int = 600, train: int = 400) -> dict[str, list[float]]:
    """{"at the word": [...], "at the answer": [...]}: how well the kind a colour question names is read
    linearly from the decoder's input and each layer's output (chance 0.25), fitted on `train` held-out
    colour questions and scored on the rest."""
    samples = heldout_samples("colour", n)
    kinds = torch.tensor([shapes.KINDS.index(s.question.rstrip("?").split()[-1]) for s in samples])
    return _probe_word_and_answer(model, processor, samples, kinds, train, len(shapes.KINDS))


def colour_probe(model, processor, n: int = 1400, train: int = 600) -> dict[str, list[float]]:
    """{"at the word": [...], "at the answer": [...]}: how well the named shape's colour, the answer, is read
    linearly at the same two places, on the colour questions of scenes of several shapes among the first `n`
    held-out images (no shape is found without a lookup there); fitted on `train`, scored on the rest."""
    samples = [s for s in heldout_samples("colour", n) if len(s.scene.shapes) > 1]
    names = sorted(shapes.COLOURS)
    colours = torch.tensor([names.index(s.answer) for s in samples])
    return _probe_word_and_answer(model, processor, samples, colours, train, len(names))


def place_probe(model, processor, n: int = 500, train: int = 300) -> dict[str, list[float]]:
    """{"row": [...], "column": [...]}: how well the place a shape question asks about ("What shape is at the
    top left?": top, left) is read linearly where the answer is written, from the decoder's input and each
    layer's output (chance 0.5); fitted on `train` such questions among the held-out ones, scored on the rest.

    The answer position must fetch both words from the question before it can pick the shape there; a model
    that carries only one of them confuses the shapes of a row (or of a column)."""
    samples = [s for s in heldout_samples("shape", 2 * n) if " at the " in s.question][:n]
    asked = [next(shape for shape in s.scene.shapes if shape.kind == s.answer) for s in samples]
    answer, _ = hidden_states(model, processor, samples)
    return {"row": per_layer_probe(answer, torch.tensor([shape.row for shape in asked]), train, 2),
            "column": per_layer_probe(answer, torch.tensor([shape.col for shape in asked]), train, 2)}


def _probe_word_and_answer(model, processor, samples, labels: torch.Tensor, train: int, classes: int
                           ) -> dict[str, list[float]]:
    answer, word = hidden_states(model, processor, samples)
    return {"at the word": per_layer_probe(word, labels, train, classes),
            "at the answer": per_layer_probe(answer, labels, train, classes)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    processor, model = load(args.checkpoint, args.backend)
    scores = report(model, processor, args.images, args.batch_size, args.generate)
    missed = {q: t for q, t in TARGETS.items() if scores[q]["all"] < t}
    result = {"images_per_type": args.images, "accuracy": scores, "missed_targets": missed}
    if args.errors:
        result["multi_shape_answers"] = errors(model, processor, args.images, args.batch_size)
    if args.probe:
        result["asked_kind_probe"] = kind_probe(model, processor)
        result["named_colour_probe"] = colour_probe(model, processor)
        result["asked_place_probe"] = place_probe(model, processor)
        result["image_token_cell_probe"] = cell_probe(model, processor)
    print(json.dumps(result, indent=2))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
