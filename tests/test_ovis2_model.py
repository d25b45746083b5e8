"""Ovis2 model parity against transformers 5.23 on tiny random checkpoints (redrawn weights, hidden_stride 2).

Inputs come from transformers' own processor, so only the model differs: image features, logits (all real
positions and the last), the loss and greedy tokens. Also pinned: an odd patch-grid side (transformers
crashes there) against an independent computation, the other tokenize functions, and the Auto classes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checkpoints import hf_model, hf_processor, make_image

from ocula import AutoModelForImageTextToText
from ocula.errors import PlaceholderMismatchError
from ocula.models.ovis2.modeling import Ovis2ForConditionalGeneration, merge_neighbours
from ocula.models.ovis2.processing import Ovis2Processor

ATOL = 1e-4


@pytest.fixture(scope="module", params=["v5", "hub"])
def setup(request, ovis2_ckpt, ovis2_ckpt_hub):
    folder = ovis2_ckpt if request.param == "v5" else ovis2_ckpt_hub
    return hf_processor(folder), hf_model(folder), Ovis2ForConditionalGeneration.from_pretrained(folder)


def _prompt(*turns) -> str:
    """turns: (role, n_images, text) -> the rendered chat (the real Ovis2 template, system prompt first)."""
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    for role, images, words in turns:
        text += f"<|im_start|>{role}\n" + "<image>\n" * images + f"{words}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def _compare(ref, ours, inputs, labels=None):
    with torch.no_grad():
        expected, actual = ref(**inputs, labels=labels), ours(**inputs, labels=labels)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual.logits[:, -1], expected.logits[:, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.logits[real], expected.logits[real], atol=ATOL, rtol=0)
    if labels is not None:
        torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=0)


def _generate_same(ref, ours, inputs, n=6):
    with torch.no_grad():
        expected = ref.generate(**inputs, max_new_tokens=n, do_sample=False)
        actual = ours.generate(**inputs, max_new_tokens=n, do_sample=False)
    assert actual.tolist() == expected.tolist()


# ----------------------------------------------------------------------------------------------- parity


def test_image_features(setup):
    processor, ref, ours = setup
    pixels = processor.image_processor([make_image(300, 100), make_image(30, 30)], return_tensors="pt")
    with torch.no_grad():
        expected = ref.get_image_features(pixels["pixel_values"])
        actual = ours.get_image_features(pixels["pixel_values"])
    assert actual.pooler_output.shape == (10, 9, 64)
    for name in ("pooler_output", "visual_indicator_features", "last_hidden_state"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=1e-5, rtol=0)


def test_one_image_logits_loss_and_tokens(setup):
    processor, ref, ours = setup
    inputs = processor(
        text=[_prompt(("user", 1, "Describe this image."))], images=[make_image(90, 60)], return_tensors="pt"
    )
    labels = inputs["input_ids"].clone()
    labels[:, :5] = -100
    _compare(ref, ours, inputs, labels)
    _generate_same(ref, ours, inputs)


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (16, 12)])  # wide, tall, tiny
def test_tiled_images(setup, size):
    processor, ref, ours = setup
    inputs = processor(
        text=[_prompt(("user", 1, "What is shown in the picture?"))],
        images=[make_image(*size, seed=size[0])],
        use_covering_area_grid=False,
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape[0] > 1  # thumbnail + tiles
    _compare(ref, ours, inputs)


def test_several_images_multi_turn_and_left_padded_batch(setup):
    processor, ref, ours = setup
    texts = [
        _prompt(("user", 2, "Count them."), ("assistant", 0, "Two."), ("user", 1, "And now?")),
        _prompt(("user", 0, "Hello, how are you today?")),
    ]
    images = [make_image(200, 60, seed=1), make_image(50, 70, seed=2), make_image(84, 84, seed=3)]
    inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    assert not inputs["attention_mask"][1, 0]  # the second row is left-padded
    _compare(ref, ours, inputs)
    _generate_same(ref, ours, inputs)


def test_text_only(setup):
    processor, ref, ours = setup
    inputs = processor(
        text=["The quick brown fox <IMG_START> jumps.", "Hi"],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    labels = inputs["input_ids"].clone()
    labels[1] = -100  # a padded row's first label would be predicted from a padding position
    _compare(ref, ours, inputs, labels)
    _generate_same(ref, ours, inputs)


def test_crop_to_patches_off(make_ckpt):
    folder = make_ckpt("ovis2", processor={"crop_to_patches": False}, seed=2)
    processor, ref = hf_processor(folder), hf_model(folder)
    ours = AutoModelForImageTextToText.from_pretrained(folder)
    assert isinstance(ours, Ovis2ForConditionalGeneration)
    inputs = processor(
        text=[_prompt(("user", 1, "Describe this image."))],
        images=[make_image(300, 100)],
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape[0] == 1
    _compare(ref, ours, inputs)
    _generate_same(ref, ours, inputs)


@pytest.mark.parametrize("function", ["st_argmax", "gumbel_argmax"])
def test_other_tokenize_functions(make_ckpt, function):
    folder = make_ckpt("ovis2", vision_config={"tokenize_function": function})
    ref, ours = hf_model(folder), Ovis2ForConditionalGeneration.from_pretrained(folder)
    pixels = hf_processor(folder).image_processor([make_image(120, 60)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.manual_seed(3)  # gumbel noise: the same draws on both sides
        expected = ref.get_image_features(pixels).pooler_output
        torch.manual_seed(3)
        actual = ours.get_image_features(pixels).pooler_output
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ odd grid


def _independent_features(ref, pixels: torch.Tensor, stride: int) -> torch.Tensor:
    """transformers' tower and head around a window merge written out patch by patch (zero-padded)."""
    tower = ref.model.vision_tower
    hidden = tower.transformer(pixels).last_hidden_state  # [N, g * g, d]
    count, length, dim = hidden.shape
    side = int(length**0.5)
    tokens = -(-side // stride)
    merged = torch.zeros(count, tokens * tokens, stride * stride * dim)
    for row in range(tokens * stride):
        for col in range(tokens * stride):
            if row < side and col < side:
                slot = (row % stride) * stride + col % stride
                token = (row // stride) * tokens + col // stride
                merged[:, token, slot * dim : (slot + 1) * dim] = hidden[:, row * side + col]
    probs = tower.head_norm(tower.head_linear(merged)).softmax(-1)
    table = ref.model.visual_embeddings_table.weight
    return F.pad(probs, (0, table.shape[0] - probs.shape[-1])) @ table


def test_odd_patch_grid_side(make_ckpt):
    # 98 / 14 = 7 patches per side: padded to 8, merged 2x2 -> 16 visual tokens per tile.
    folder = make_ckpt(
        "ovis2", vision_config={"image_size": 98}, processor={"size": {"height": 98, "width": 98}}
    )
    ref, ours = hf_model(folder), Ovis2ForConditionalGeneration.from_pretrained(folder)
    processor = Ovis2Processor.from_pretrained(folder, image_seq_length=16)
    inputs = processor(
        text=[_prompt(("user", 1, "Describe this image."))], images=[make_image(220, 90)], return_tensors="pt"
    )
    with torch.no_grad():
        expected = _independent_features(ref, inputs["pixel_values"], stride=2)
        actual = ours.get_image_features(inputs["pixel_values"]).pooler_output
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
        # the whole model against transformers' decoder fed with independently merged embeddings
        embeds = ref.get_input_embeddings()(inputs["input_ids"])
        atoms = inputs["input_ids"] == ref.config.image_token_id
        embeds[atoms] = expected.flatten(0, 1)
        indicators = ref.model.visual_embeddings_table.weight[-5:]
        for i, token in enumerate(ref.config.visual_indicator_token_ids):
            embeds[inputs["input_ids"] == token] = indicators[i]
        want = ref(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        got = ours(**inputs).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_merge_neighbours_even_side_matches_plain_windows():
    hidden = torch.randn(2, 36, 3)
    merged = merge_neighbours(hidden, 2)  # [2, 9, 12]
    grid = hidden.view(2, 3, 2, 3, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(2, 9, 12)
    assert torch.equal(merged, grid)


def test_placeholder_mismatch_raises(setup):
    processor, _, ours = setup
    inputs = processor(text=[_prompt(("user", 1, "Hi"))], images=[make_image(40, 40)], return_tensors="pt")
    with pytest.raises(PlaceholderMismatchError):
        ours(input_ids=inputs["input_ids"][:, :-20], pixel_values=inputs["pixel_values"])


# ---------------------------------------------------------------------------------------- engine view


def test_span_features_match_the_library_path(ovis2_ckpt):
    """Per-item span features (what the engine caches) embed exactly like transformers' atom features,
    also for a chunk that starts inside a span."""
    ours = Ovis2ForConditionalGeneration.from_pretrained(ovis2_ckpt)
    processor = Ovis2Processor.from_pretrained(ovis2_ckpt)
    images = [make_image(300, 100, seed=1), make_image(40, 40, seed=2), make_image(60, 200, seed=3)]
    out = processor.process(
        images=images,
        text=["<image> and <image>", "Hi <image>!"],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    ids, pixels = out.features["input_ids"], out.features["pixel_values"]
    with torch.no_grad():
        expected = ours.embed_inputs(ids, ours.get_media_features(pixels))
        for item in out.media:  # one item at a time, as the engine's encoder cache sees them
            tiles = pixels[item.rows[0] : item.rows[1]]
            rows = ours.get_media_features(tiles, grids=[item.grid_thw])[ours.config.image_token_id]
            assert rows.shape[0] == item.num_tokens
            span = ids[item.sample : item.sample + 1, item.offset : item.offset + item.num_tokens]
            got = ours.embed_inputs(span, {ours.config.image_token_id: rows})
            torch.testing.assert_close(
                got[0], expected[item.sample, item.offset : item.offset + item.num_tokens]
            )
            half = item.num_tokens // 2 + 1  # a chunk boundary inside the span; rows keyed by its first token
            got = ours.embed_inputs(span[:, half:], {int(span[0, half]): rows[half:]})
            torch.testing.assert_close(
                got[0], expected[item.sample, item.offset + half : item.offset + item.num_tokens]
            )
        with pytest.raises(PlaceholderMismatchError):
            ours.get_media_features(pixels, grids=[[1, 1]])
