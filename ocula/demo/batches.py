"""Training and evaluation batches for the shapes demo, built with a Qwen2-VL processor.

Notable features:
- A sample becomes the conversation user: [image, question] -> assistant: answer, rendered with the
  processor's own chat template, so training sees exactly the prompt `ocula run` builds at inference.
- Labels are -100 everywhere except the answer tokens and the `<|im_end|>` that closes them: the model
  learns to answer and to stop, never to predict the prompt or the image placeholders.
- `warmup_samples`: one-shape scenes asked given question types in turn, the phases of the curriculum
  (scripts/train_demo.py). On one shape there is nothing to bind, so an attribute asked alone clicks in a
  few hundred steps; asked together from the start, the tiny vision tower learns colour and not shape.
- `focus_samples`: the full mix leaning on the questions that need finding a shape by what it is, on
  scenes of several shapes (the last phase of the default curriculum).
- `loss_fn` weighs every answer the same, whatever its length; `scored_positions` names the only positions whose
  logits it and `exact_match` read (for `logits_to_keep`).
- `exact_match` scores teacher-forced logits: every answer token (and `<|im_end|>`) being the argmax is
  the same event as greedy decoding producing exactly the answer, at the cost of one forward pass.
Works with any processor that has transformers' Qwen2-VL call signature (ocula's or transformers').
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ocula.demo import shapes


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # processor outputs: input_ids [B, S], pixel_values, image_grid_thw, ...
    labels: torch.Tensor  # [B, S] int64, -100 outside the answers; not shifted (label t is token t)
    samples: list[shapes.Sample]


def conversation(sample: shapes.Sample, with_answer: bool) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}
    if not with_answer:
        return [user]
    return [user, {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]}]


def make_batch(processor, samples: list[shapes.Sample]) -> Batch:
    """Right-padded prompt + answer sequences with labels on the answer tokens and the closing <|im_end|>."""
    texts = [processor.apply_chat_template(conversation(s, True), tokenize=False) for s in samples]
    inputs = processor(text=texts, images=[s.image() for s in samples], return_tensors="pt",
                       padding=True, padding_side="right")
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    lengths = inputs["attention_mask"].sum(1).tolist()
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        # the text ends with answer + "<|im_end|>" + "\n"; the answer never merges with the "\n" before it
        n = len(processor.tokenizer(sample.answer)["input_ids"]) + 1
        labels[row, length - 1 - n:length - 1] = ids[row, length - 1 - n:length - 1]
    return Batch(inputs=dict(inputs), labels=labels, samples=samples)


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """[K] the positions whose next token is labelled in some row: the only logits the loss and exact match
    read. Passed as `logits_to_keep`, the LM head and its softmax skip the image and question positions."""
    return (labels[:, 1:] != -100).any(0).nonzero()[:, 0]


def _aligned(logits: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor | None):
    """(logits, the token each predicts): all positions, or the `kept` ones the logits were computed at."""
    if kept is None:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels[:, kept + 1]


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, per_answer: bool = True,
            kept: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the labelled tokens. logits [B, S, V] (or [B, K, V] at `kept`), labels [B, S].

    per_answer: the mean over each answer's tokens, then over answers, so every question weighs the same;
    the plain token mean lets a 12-token caption outweigh a one-word colour or count sixfold."""
    logits, target = _aligned(logits, labels, kept)
    token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="none"
    ).view_as(target)
    counted = (target != -100).float()
    if not per_answer:
        return token.sum() / counted.sum()
    return ((token * counted).sum(1) / counted.sum(1).clamp(min=1)).sum() / (counted.sum(1) > 0).sum()


def exact_match(logits: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """[B] bool: every labelled token is the argmax of the logits one position before it."""
    logits, target = _aligned(logits, labels, kept)
    return ((logits.argmax(-1) == target) | (target == -100)).all(-1)


def train_samples(step: int, batch_size: int, offset: int = 0) -> list[shapes.Sample]:
    """The samples of one training step: consecutive train seeds, so a run is reproducible and never repeats."""
    start = shapes.TRAIN_SEEDS.start + offset + step * batch_size
    return [shapes.sample(seed) for seed in range(start, start + batch_size)]


WARMUP_OFFSET = 500_000_000  # warm-up seeds sit far from the mixed phase's, so no image is reused
WARMUP_TYPES = ("colour", "shape", "caption")  # on one shape: its colour, its kind, and both ("a red circle")
PHASE_TYPES = shapes.QUESTION_TYPES  # any type, on scenes of a chosen number of shapes


def warmup_samples(step: int, batch_size: int, qtypes: tuple[str, ...] = WARMUP_TYPES,
                   num_shapes: int = 1) -> list[shapes.Sample]:
    """Scenes of `num_shapes` shapes asked the question types `qtypes` in turn: the batch of curriculum step
    `step`."""
    seed = shapes.TRAIN_SEEDS.start + WARMUP_OFFSET + step * batch_size * 4  # ~1/3 of seeds qualify
    return _kept_samples(seed, batch_size, lambda i: qtypes[i % len(qtypes)],
                         lambda sample: len(sample.scene.shapes) == num_shapes)


FOCUS_OFFSET = 700_000_000  # seeds of the focus mix, apart from the other streams
# The focus mix asks the questions that need finding a shape by what it is ("What colour is the circle?",
# "How many red shapes are there?", "Where is the star?") three times as often as the rest, and keeps one
# scene in five with a single shape (where nothing needs finding).
FOCUS_TYPES = ("colour", "count", "position") * 3 + ("shape", "caption")


def focus_samples(step: int, batch_size: int) -> list[shapes.Sample]:
    """The batch of focus-mix step `step`: FOCUS_TYPES in turn, on scenes of 2 or 3 shapes (80%) or 1."""
    seed = shapes.TRAIN_SEEDS.start + FOCUS_OFFSET + step * batch_size * 2
    return _kept_samples(seed, batch_size, lambda i: FOCUS_TYPES[(step * batch_size + i) % len(FOCUS_TYPES)],
                         lambda sample: len(sample.scene.shapes) > 1 or sample.seed % 2 == 0)  # 1:2:2, not 1:1:1


def _kept_samples(seed: int, n: int, qtype: Callable[[int], str], keep: Callable[[shapes.Sample], bool]
                  ) -> list[shapes.Sample]:
    """The first `n` samples that `keep` accepts, walking consecutive seeds from `seed`; sample i (counting
    kept ones) is asked `qtype(i)`."""
    out: list[shapes.Sample] = []
    while len(out) < n:
        sample = shapes.sample(seed, qtype(len(out)))
        if keep(sample):
            out.append(sample)
        seed += 1
    return out


def heldout_samples(qtype: str, n: int) -> list[shapes.Sample]:
    """The first `n` held-out samples of one question type (the same images for every question type)."""
    return [shapes.sample(seed, qtype) for seed in shapes.HELDOUT_SEEDS[:n]]


@torch.no_grad()
def correct(model, processor, samples: list[shapes.Sample], batch_size: int = 50) -> list[bool]:
    """Whether the model's greedy answer to each sample is exactly right (teacher-forced, one pass per batch)."""
    was_training = model.training
    model.eval()
    flags: list[bool] = []
    for start in range(0, len(samples), batch_size):
        batch = make_batch(processor, samples[start:start + batch_size])
        kept = scored_positions(batch.labels)
        flags += exact_match(model(**batch.inputs, logits_to_keep=kept).logits, batch.labels, kept).tolist()
    model.train(was_training)
    return flags


def accuracy(model, processor, n: int = 500, batch_size: int = 50) -> dict[str, float]:
    """Exact-match accuracy per question type on the first `n` held-out images (teacher-forced, greedy-equal)."""
    return {qtype: sum(correct(model, processor, heldout_samples(qtype, n), batch_size)) / n
            for qtype in shapes.QUESTION_TYPES}
