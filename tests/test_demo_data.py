"""The shapes demo world: deterministic samples, answers that agree with the pixels, disjoint splits, and a
tokenizer / checkpoint skeleton that transformers loads with the same ids and chat template."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ocula.demo import DEMO_SIZE, shapes, write_skeleton
from ocula.demo.batches import (
    FOCUS_TYPES,
    WARMUP_TYPES,
    exact_match,
    focus_samples,
    loss_fn,
    make_batch,
    scored_positions,
    train_samples,
    warmup_samples,
)
from ocula.demo.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer
from scripts import train_demo  # the repository root is on sys.path (conftest.py)

SEEDS = range(120)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def skeleton(tmp_path_factory):
    return write_skeleton(tmp_path_factory.mktemp("shapes-demo"))


# ------------------------------------------------------------------------------------ pixels -> scene


def _cell_view(a: np.ndarray, cell: int) -> np.ndarray:
    half = a.shape[0] // 2
    return a[(cell // 2) * half:(cell // 2 + 1) * half, (cell % 2) * half:(cell % 2 + 1) * half]


def _kind_from_mask(mask: np.ndarray) -> str:
    # fill ratio of the bounding box: square ~1, circle ~pi/4, triangle ~1/2, star ~0.42
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.88 else "circle" if fill > 0.65 else "triangle" if fill > 0.475 else "star"


def _colour_from_pixels(pixels: np.ndarray) -> str:
    mean = pixels.mean(0)
    return min(shapes.COLOURS, key=lambda c: np.square(mean - np.array(shapes.COLOURS[c])).sum())


def scene_from_pixels(sample: shapes.Sample) -> dict[int, tuple[str, str]]:
    """cell -> (kind, colour), read back from the rendered image alone."""
    a = np.asarray(sample.image()).astype(np.int64)
    mask = np.abs(a - np.array(sample.scene.background)).sum(-1) > 90
    found = {}
    for cell in range(4):
        m, pixels = _cell_view(mask, cell), _cell_view(a, cell)
        if m.sum() > 0:
            inner = m & (np.abs(pixels - np.array(sample.scene.background)).sum(-1) > 200)  # no edge blend
            found[cell] = (_kind_from_mask(m), _colour_from_pixels(pixels[inner if inner.any() else m]))
    return found


# ----------------------------------------------------------------------------------------------- tests


def test_samples_are_deterministic():
    for seed in (0, 7, 123456):
        a, b = shapes.sample(seed), shapes.sample(seed)
        assert a == b
        assert a.image().tobytes() == b.image().tobytes()
    assert shapes.sample(1).scene != shapes.sample(2).scene


def test_images_are_small_and_rgb():
    image = shapes.sample(3).image()
    assert image.mode == "RGB" and image.size == (112, 112)


def test_scene_matches_pixels():
    for seed in SEEDS:
        s = shapes.sample(seed)
        assert scene_from_pixels(s) == {x.cell: (x.kind, x.colour) for x in s.scene.shapes}, seed


def _expected_answer(question: str, found: dict[int, tuple[str, str]]) -> str:
    """Answer a generated question from the pixel-derived scene, independently of shapes.py's askers."""
    by_kind = {kind: (cell, colour) for cell, (kind, colour) in found.items()}
    if m := re.fullmatch(r"What shape is at the (.+)\?", question):
        return found[shapes.CELLS.index(m[1])][0]
    if question in ("What shape is this?", "What shape is in the picture?"):
        (kind, _), = found.values()
        return kind
    if m := re.fullmatch(r"What colou?r is the (\w+)\?", question):
        return by_kind[m[1]][1]
    if question == "How many shapes are there?":
        return str(len(found))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(colour == m[1] for _, colour in found.values()))
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return shapes.CELLS[by_kind[m[1]][0]]
    if m := re.fullmatch(r"Is the (\w+) (left or right of|above or below) the (\w+)\?", question):
        a, b = by_kind[m[1]][0], by_kind[m[3]][0]
        if m[2] == "left or right of":
            return "left" if a % 2 < b % 2 else "right"
        return "above" if a // 2 < b // 2 else "below"
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("qtype", ["shape", "colour", "count", "position"])
def test_answers_agree_with_pixels(qtype):
    for seed in SEEDS:
        s = shapes.sample(seed, qtype)
        assert s.answer == _expected_answer(s.question, scene_from_pixels(s)), (seed, s.question)


def test_caption_reads_the_scene():
    for seed in SEEDS:
        s = shapes.sample(seed, "caption")
        found = scene_from_pixels(s)
        named = re.findall(r"an? (\w+) (\w+)", s.answer)
        assert named == [(colour, kind) for _, (kind, colour) in sorted(found.items())], s.answer
    assert shapes.caption(shapes.example_scene()) == "a red circle left of a blue square"


def test_every_question_type_has_varied_answers():
    for qtype in shapes.QUESTION_TYPES:
        answers = {shapes.sample(seed, qtype).answer for seed in range(200)}
        assert len(answers) >= 3, (qtype, answers)


def test_splits_are_disjoint():
    assert shapes.TRAIN_SEEDS.stop <= shapes.HELDOUT_SEEDS.start
    train = {shapes.sample(seed).scene for seed in range(300)}
    heldout = {shapes.sample(seed).scene for seed in shapes.HELDOUT_SEEDS[:300]}
    assert not train & heldout


def test_warmup_asks_one_shape_scenes_for_colour_shape_and_caption():
    first, second = warmup_samples(0, 16), warmup_samples(1, 16)
    assert [s.seed for s in first] == [s.seed for s in warmup_samples(0, 16)]  # reproducible
    assert all(len(s.scene.shapes) == 1 for s in first + second)
    assert [s.qtype for s in first[:6]] == list(WARMUP_TYPES) * 2
    shape = lambda s: s.scene.shapes[0]
    expected = {"colour": lambda s: shape(s).colour, "shape": lambda s: shape(s).kind,
                "caption": lambda s: f"{'an' if shape(s).colour == 'orange' else 'a'} {shape(s).colour} {shape(s).kind}"}
    assert all(s.answer == expected[s.qtype](s) for s in first + second)
    seeds = {s.seed for s in first + second}
    assert len(seeds) == 32 and all(seed in shapes.TRAIN_SEEDS for seed in seeds)
    mixed = {s.seed for step in range(3) for s in train_samples(step, 16)}
    assert not seeds & mixed  # the two phases never share an image
    assert len({s.answer for s in first + second if s.qtype == "colour"}) >= 4


def test_focus_mix_asks_more_about_scenes_of_several_shapes():
    first = focus_samples(0, 44)
    assert [s.seed for s in first] == [s.seed for s in focus_samples(0, 44)]  # reproducible
    assert [s.qtype for s in first[:11]] == list(FOCUS_TYPES)
    steps = [focus_samples(step, 32) for step in range(11)]  # 32 turns of FOCUS_TYPES
    asked = {qtype: sum(s.qtype == qtype for step in steps for s in step) for qtype in shapes.QUESTION_TYPES}
    assert asked == {"shape": 32, "colour": 96, "count": 96, "position": 96, "caption": 32}
    sizes = [len(s.scene.shapes) for step in steps for s in step]
    assert 0.1 < sizes.count(1) / len(sizes) < 0.3 and sizes.count(2) > 2 * sizes.count(1)
    seeds = [s.seed for step in steps for s in step]
    assert len(set(seeds)) == len(seeds) and all(seed in shapes.TRAIN_SEEDS for seed in seeds)
    others = {s.seed for step in range(10) for s in train_samples(step, 32) + warmup_samples(step, 32)}
    assert not set(seeds) & others


def test_loss_weighs_every_answer_the_same():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 12)
    labels = torch.full((2, 9), -100)
    labels[0, 2:8] = torch.tensor([1, 2, 3, 4, 5, 6])  # a six-token caption
    labels[1, 5] = 7  # a one-token answer
    token = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(loss_fn(logits, labels, per_answer=False), token)
    rows = [torch.nn.functional.cross_entropy(logits[r, :-1], labels[r, 1:], ignore_index=-100) for r in range(2)]
    assert torch.allclose(loss_fn(logits, labels), (rows[0] + rows[1]) / 2)
    assert not torch.allclose(loss_fn(logits, labels), token)
    labels[1] = -100  # a row without labels counts for nothing
    assert torch.allclose(loss_fn(logits, labels), rows[0])


def test_loss_and_exact_match_at_the_scored_positions_only():
    """Logits kept at `scored_positions` score exactly like the full logits; a position left out would not."""
    import ocula
    from ocula import cli

    folder = Path(cli.DEFAULT_MODEL)
    model = ocula.Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    batch = make_batch(ocula.AutoProcessor.from_pretrained(folder), [shapes.sample(s, t) for s, t in
                                                                      [(0, "caption"), (1, "colour"), (2, "count")]])
    kept = scored_positions(batch.labels)
    assert 0 < len(kept) < batch.labels.shape[1] / 2
    with torch.no_grad():
        full, part = model(**batch.inputs).logits, model(**batch.inputs, logits_to_keep=kept).logits
    assert part.shape == (3, len(kept), full.shape[-1])
    for per_answer in (True, False):
        torch.testing.assert_close(loss_fn(part, batch.labels, per_answer, kept),
                                   loss_fn(full, batch.labels, per_answer))
    assert exact_match(part, batch.labels, kept).tolist() == exact_match(full, batch.labels).tolist()
    with pytest.raises(AssertionError):  # dropping the last scored position changes the loss
        torch.testing.assert_close(loss_fn(part[:, :-1], batch.labels, kept=kept[:-1]), loss_fn(full, batch.labels))


def test_background_tells_every_patch_where_it_is():
    empty = shapes.Scene(size=112, background=(240, 238, 236), shapes=())
    a = np.asarray(shapes.render(empty)).astype(np.int64)
    assert a[0, 0].tolist() == [240, 238, 236]
    assert abs(a[0, -1, 0] - (240 - shapes._GRADIENT)) <= 1 and a[0, -1, 1] == 238  # red fades to the right
    assert abs(a[-1, 0, 1] - (238 - shapes._GRADIENT)) <= 1 and a[-1, 0, 0] == 240  # green fades downwards
    assert (a[..., 2] == 236).all()
    patches = a.reshape(8, 14, 8, 14, 3).mean((1, 3)).round().reshape(64, 3)
    assert len({tuple(p) for p in patches.tolist()}) == 64  # no two 14-pixel patches look alike
    assert np.abs(a - np.array(empty.background)).sum(-1).max() < 90  # still far from any shape's colour


def test_tokenizer_round_trips_any_text(tokenizer):
    texts = ["What colour is the circle?", "a red circle left of a blue square", "How many shapes? 3",
             "Größe 🙂 日本語\n\ttabs  and  spaces", "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    assert len(tokenizer.encode("a red circle left of a blue square").ids) == 8  # whole words


def test_special_tokens_are_single_ids_in_qwen2_vl_order(tokenizer):
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert ids[-1] == tokenizer.get_vocab_size() - 1
    for token, i in zip(SPECIAL_TOKENS, ids):
        assert tokenizer.encode(token).ids == [i]
    assert 300 <= tokenizer.get_vocab_size() <= 600


def test_transformers_loads_the_tokenizer_with_the_same_ids(skeleton, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(skeleton)
    for text in ["Describe the picture.", "Größe 🙂 日本語\n\n  x", "<|im_start|>assistant\nred<|im_end|>"]:
        assert hf(text).input_ids == tokenizer.encode(text).ids
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"


def test_chat_template_renders_like_the_qwen2_vl_docs(skeleton):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(skeleton)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello, how are you?"}]},
        {"role": "assistant", "content": "Fine."},
        {"role": "user", "content": [{"type": "text", "text": "And these?"}, {"type": "image"}, {"type": "video"}]},
    ]
    text = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert hf.chat_template == CHAT_TEMPLATE
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Hello, how are you?<|im_end|>\n"
        "<|im_start|>assistant\nFine.<|im_end|>\n<|im_start|>user\nAnd these?"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_skeleton_builds_a_qwen2_vl_with_16_image_tokens(skeleton):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(skeleton)
    assert config.model_type == "qwen2_vl"
    assert config.text_config.vocab_size >= len(transformers.AutoTokenizer.from_pretrained(skeleton))
    processor = transformers.AutoProcessor.from_pretrained(skeleton)
    image = shapes.sample(0).image()
    batch = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[image], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int((batch["input_ids"] == config.image_token_id).sum()) == 16


def test_batches_label_only_the_answer_and_its_end(skeleton):
    transformers = pytest.importorskip("transformers")
    processor = transformers.AutoProcessor.from_pretrained(skeleton)
    samples = [shapes.sample(seed) for seed in range(6)]
    batch = make_batch(processor, samples)
    for row, sample in enumerate(samples):
        labelled = batch.labels[row][batch.labels[row] != -100]
        assert processor.tokenizer.decode(labelled) == sample.answer + "<|im_end|>"
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not ((batch.labels == image_token).any())


def test_training_is_reproducible_from_its_seed(tmp_path):
    """Same flags, same weights: both curriculum phases (one warmup step, one mixed step) replay exactly."""
    states = []
    for name in ("a", "b"):
        args = train_demo.parse_args(["--out", str(tmp_path / name), "--steps", "2", "--curriculum", "shape:1",
                                      "--batch-size", "2", "--eval-every", "0", "--eval-images", "1",
                                      "--threads", "1"])
        model, _ = train_demo.train(args)
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_curriculum_phases_come_in_order_then_the_full_mix():
    args = train_demo.parse_args(["--curriculum", "shape:2,colour+caption:1,position+count@3:1", "--batch-size", "4"])
    assert args.curriculum == [(("shape",), 1, 2), (("colour", "caption"), 1, 1), (("position", "count"), 3, 1)]
    phases = [train_demo.step_samples(step, args) for step in range(5)]
    assert all(s.qtype == "shape" and len(s.scene.shapes) == 1 for step in phases[:2] for s in step)
    assert [s.qtype for s in phases[2]] == ["colour", "caption"] * 2
    assert [s.qtype for s in phases[3]] == ["position", "count"] * 2
    assert all(len(s.scene.shapes) == 3 for s in phases[3])
    assert [s.seed for s in phases[4]] == [s.seed for s in train_samples(0, 4)]  # then the mix from its start
    between = train_demo.parse_args(["--curriculum", "shape:1,mix:2,colour@2:1", "--batch-size", "2"])
    assert between.curriculum == [(("shape",), 1, 1), ((), 0, 2), (("colour",), 2, 1)]
    steps = [train_demo.step_samples(step, between) for step in range(5)]
    assert [s.seed for s in steps[1] + steps[2]] == [s.seed for s in train_samples(0, 2) + train_samples(1, 2)]
    assert all(s.qtype == "colour" and len(s.scene.shapes) == 2 for s in steps[3])
    assert [s.seed for s in steps[4]] == [s.seed for s in train_samples(2, 2)]  # the mix goes on where it was
    assert train_demo.parse_args([]).curriculum == train_demo.parse_curriculum(train_demo.DEFAULT_CURRICULUM)
    focus = train_demo.parse_args(["--curriculum", "mix:1,focus:2", "--batch-size", "3"])
    assert focus.curriculum == [((), 0, 1), ((), -1, 2)]
    steps = [train_demo.step_samples(step, focus) for step in range(4)]
    assert [s.seed for s in steps[1] + steps[2]] == [s.seed for s in focus_samples(0, 3) + focus_samples(1, 3)]
    assert [s.seed for s in steps[3]] == [s.seed for s in train_samples(1, 3)]  # the mix after it
    for bad in ("position:10", "colour@4:10", "colour@2", "mix@2:10", "focus@2:10"):  # one-shape phases: shape / colour / caption only
        with pytest.raises(SystemExit):
            train_demo.parse_args(["--curriculum", bad])


def test_learning_rate_warms_up_again_at_the_restart():
    args = train_demo.parse_args(["--steps", "100", "--restart", "60:3e-4", "--lr", "1e-3", "--warmup", "5"])
    lrs = [train_demo.lr_factor(step, args) * args.lr for step in range(100)]
    assert lrs[0] < lrs[4] == pytest.approx(1e-3, rel=0.02)  # warmup, then the peak
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:60]))  # cosine down ...
    assert lrs[59] == pytest.approx(5e-5, rel=0.05)  # ... to the floor before the restart
    assert lrs[60] < lrs[64] == pytest.approx(3e-4, rel=0.05)  # the second cycle's own warmup and peak
    assert all(a >= b for a, b in itertools.pairwise(lrs[64:]))
    assert lrs[-1] == pytest.approx(1.5e-5, rel=0.05)
    one = train_demo.parse_args(["--steps", "100", "--restart", "", "--lr", "1e-3", "--warmup", "5"])
    assert one.restart is None
    lrs = [train_demo.lr_factor(step, one) * one.lr for step in range(100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:])) and lrs[-1] == pytest.approx(5e-5, rel=0.05)
    short = train_demo.parse_args(["--steps", "10", "--warmup", "1"])  # a run that ends before the restart
    plain = train_demo.parse_args(["--steps", "10", "--warmup", "1", "--restart", ""])
    assert [train_demo.lr_factor(step, short) for step in range(10)] == [
        train_demo.lr_factor(step, plain) for step in range(10)]
    with pytest.raises(SystemExit):
        train_demo.parse_args(["--restart", "60"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, model) after two steps of scripts/train_demo.py with transformers' classes."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("trained")
    args = train_demo.parse_args(["--out", str(folder), "--steps", "2", "--batch-size", "4", "--eval-images", "2",
                                  "--threads", "1", "--backend", "transformers"])
    model, scores = train_demo.train(args)
    assert set(scores) == set(shapes.QUESTION_TYPES)
    return folder, model.eval()


def test_train_script_saves_a_checkpoint_transformers_reloads(trained):
    transformers = pytest.importorskip("transformers")
    folder, model = trained
    assert (folder / "model.safetensors").exists() and (folder / "loss.png").exists()
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    batch = make_batch(transformers.AutoProcessor.from_pretrained(folder), [shapes.sample(0), shapes.sample(1)])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch.inputs).logits, model(**batch.inputs).logits)


def test_ocula_runs_the_demo_checkpoint_like_transformers(trained):
    transformers = pytest.importorskip("transformers")
    import ocula

    folder, model = trained
    samples = [shapes.sample(seed) for seed in range(3)]
    ours = make_batch(ocula.AutoProcessor.from_pretrained(folder), samples)
    theirs = make_batch(transformers.AutoProcessor.from_pretrained(folder), samples)
    assert torch.equal(ours.inputs["input_ids"], theirs.inputs["input_ids"])
    assert torch.equal(ours.labels, theirs.labels)
    torch.testing.assert_close(ours.inputs["pixel_values"], theirs.inputs["pixel_values"])
    loaded = ocula.AutoModelForImageTextToText.from_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ours.inputs).logits, model(**theirs.inputs).logits)


def test_size_flag_replaces_demo_size_fields():
    size = train_demo.parse_args(["--size", "text_layers=4,mrope_section=2/3/3,merge_size=4"]).size
    assert (size.text_layers, size.mrope_section, size.merge_size) == (4, (2, 3, 3), 4)
    assert train_demo.parse_args([]).size == DEMO_SIZE
    for bad in ("depth=3", "text_layers=", "mrope_section=8/8/8"):  # unknown field, no value, wrong rotary sum
        with pytest.raises(SystemExit):
            train_demo.parse_args(["--size", bad])


def test_training_can_start_from_a_checkpoint(tmp_path):
    """--init loads a checkpoint's weights: with a zero learning rate one step leaves them as they were."""
    from safetensors.torch import load_file

    from ocula import cli

    asset = Path(cli.DEFAULT_MODEL)
    args = train_demo.parse_args(["--out", str(tmp_path / "ft"), "--init", str(asset), "--steps", "1",
                                  "--lr", "0", "--batch-size", "2", "--eval-every", "0", "--eval-images", "1",
                                  "--threads", "1", "--workers", "0"])
    train_demo.train(args)
    before, after = load_file(str(asset / "model.safetensors")), load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_init_from_a_checkpoint_of_another_size_fails(tmp_path):
    """Same weight shapes, other heads: --init refuses instead of loading into the wrong architecture."""
    from ocula import cli

    args = train_demo.parse_args(["--out", str(tmp_path / "ft"), "--init", str(cli.DEFAULT_MODEL), "--steps", "1",
                                  "--size", "text_heads=4,text_kv_heads=2,mrope_section=4/6/6", "--workers", "0"])
    with pytest.raises(SystemExit, match="num_attention_heads.*num_key_value_heads.*rope_scaling"):
        train_demo.train(args)
