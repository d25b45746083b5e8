"""Idefics2 model parity against transformers 5.23 on the tiny random checkpoints (redrawn weights).

The checkpoint has everything on: image splitting, the perceiver resampler (grouped kv heads), a Mistral
decoder whose sliding window (32) is shorter than the prompts. Inputs come from transformers' processor, so
only the model differs. Pinned: logits (all positions, padding included) <= 1e-4, loss and every gradient
<= 1e-5, greedy tokens identical (left-padded batches, past the sliding window), both layouts, the vision
tower's bucketed positions, the perceiver's padding mask, and the model contract used by generate().
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from checkpoints import hf_model, hf_processor, make_image

from ocula.errors import PlaceholderMismatchError
from ocula.layers.attention import DenseAttentionMetadata
from ocula.models.idefics2.config import Idefics2Config
from ocula.models.idefics2.modeling import Idefics2ForConditionalGeneration
from ocula.models.idefics2.processing import Idefics2Processor
from ocula.models.idefics2.vision import bucketed_position_ids, patch_mask_from_pixels

ATOL = 1e-4


@pytest.fixture(scope="module")
def processor(idefics2_ckpt):
    return hf_processor(idefics2_ckpt)


@pytest.fixture(scope="module")
def models(idefics2_ckpt):
    return hf_model(idefics2_ckpt), Idefics2ForConditionalGeneration.from_pretrained(idefics2_ckpt)


def _chat(processor, *turns: tuple[str, list[str]], generation: bool = True) -> str:
    messages = [
        {
            "role": role,
            "content": [{"type": "image"} if p == "<image>" else {"type": "text", "text": p} for p in parts],
        }
        for role, parts in turns
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=generation)


def _labels(inputs, image_token_id: int) -> torch.Tensor:
    """The transformers docs' recipe: padding and image tokens do not count."""
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    labels[labels == image_token_id] = -100
    return labels


def _compare(ref, ours, inputs, labels: torch.Tensor | None = None):
    with torch.no_grad():
        expected = ref(**inputs, labels=labels)
        actual = ours(**inputs, labels=labels)
    torch.testing.assert_close(actual.logits[:, -1], expected.logits[:, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.logits, expected.logits, atol=ATOL, rtol=0)
    if labels is not None:
        torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=0)
    return actual


# ----------------------------------------------------------------------------------------------- forward


def test_text_only(processor, models):
    inputs = processor(text=["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    _compare(*models, inputs, _labels(inputs, models[1].image_token_id))


def test_one_image(processor, models):
    prompt = _chat(processor, ("user", ["<image>", "Describe this image."]))
    inputs = processor(text=prompt, images=[make_image(90, 60)], return_tensors="pt")
    assert inputs["input_ids"].shape[1] > 32  # longer than the sliding window
    _compare(*models, inputs, _labels(inputs, models[1].image_token_id))


def test_two_images_multi_turn(processor, models):
    prompt = _chat(processor, ("user", ["What is the difference?", "<image>", "<image>"]),
                   ("assistant", ["One is red."]), ("user", ["And now?"]))  # fmt: skip
    images = [make_image(90, 60, seed=1), make_image(30, 50, seed=2)]
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    _compare(*models, inputs, _labels(inputs, models[1].image_token_id))


def test_left_padded_batch_of_different_sizes_and_counts(processor, models):
    """Padding images (all zeros) are dropped; padding pixels and padding tokens are masked."""
    images = [[make_image(40, 30, seed=1), make_image(70, 50, seed=2)], [make_image(30, 60, seed=3)]]
    text = ["<image>Describe this<image> image please.", "What is shown?<image>"]
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    assert inputs["attention_mask"][1, 0] == 0
    _compare(*models, inputs, _labels(inputs, models[1].image_token_id))


def test_splitting_off(idefics2_ckpt, models):
    processor = hf_processor(idefics2_ckpt, do_image_splitting=False)
    inputs = processor(images=[[make_image(50, 40)], [make_image(20, 45)]], text=["<image>A", "B<image>"],
                       return_tensors="pt", padding=True)  # fmt: skip
    assert inputs["pixel_values"].shape[1] == 1
    _compare(*models, inputs)


def test_hub_layout(idefics2_ckpt_hub):
    processor = hf_processor(idefics2_ckpt_hub)
    inputs = processor(images=[make_image(64, 48)], text="<image>What is it?", return_tensors="pt")
    _compare(
        hf_model(idefics2_ckpt_hub),
        Idefics2ForConditionalGeneration.from_pretrained(idefics2_ckpt_hub),
        inputs,
    )


def test_loss_and_gradients(processor, models):
    ref, ours = models
    images = [[make_image(40, 30, seed=1)], [make_image(70, 50, seed=2), make_image(28, 28, seed=3)]]
    inputs = processor(images=images, text=["<image>A cat.", "Two<image> boats<image>"], return_tensors="pt",
                       padding=True)  # fmt: skip
    labels = _labels(inputs, ours.image_token_id)
    expected, actual = ref(**inputs, labels=labels).loss, ours(**inputs, labels=labels).loss
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    ref.zero_grad(), ours.zero_grad()
    expected.backward(), actual.backward()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, ref_params[name].grad, atol=1e-5, rtol=0, msg=name)
    ref.zero_grad(), ours.zero_grad()


# ----------------------------------------------------------------------------------------------- generation


def test_greedy_generation_left_padded(processor, models):
    ref, ours = models
    images = [[make_image(40, 30, seed=1), make_image(70, 50, seed=2)], [make_image(30, 60, seed=3)]]
    text = ["<image>Describe this<image> image please.", "What is shown in the picture? Tell me<image>"]
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    expected = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=8, do_sample=False), expected)


def test_greedy_generation_text_only(processor, models):
    ref, ours = models
    inputs = processor(text=["Hello, how are", "The cat sat on the mat and looked"], return_tensors="pt",
                       padding=True)  # fmt: skip
    expected = ref.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=6, do_sample=False), expected)


def test_contract_positions_and_cached_prefill(processor, models):
    _, ours = models
    inputs = processor(images=[[make_image(40, 40)], []], text=["<image>Hi there", "Hello"], return_tensors="pt",
                       padding=True)  # fmt: skip
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions, delta = ours.get_position_ids(ids, mask)
    num_pad = (mask == 0).sum(-1)
    assert torch.equal(delta, -num_pad)
    assert positions[1, -1] == ids.shape[1] - 1 - num_pad[1] and positions[1, 0] == 0
    with torch.no_grad():
        features = ours.get_media_features(inputs["pixel_values"], inputs["pixel_attention_mask"])
        embeds = ours.embed_inputs(ids, features)
        cache = ours.new_kv_cache(2, ids.shape[1] + 4)
        hidden = ours.forward_text(embeds, positions, DenseAttentionMetadata(cache, 0, mask.bool()))
        plain = ours(**inputs, position_ids=positions).logits
    torch.testing.assert_close(ours.compute_logits(hidden)[:, -1], plain[:, -1], atol=ATOL, rtol=0)


def test_placeholder_mismatch_raises(processor, models):
    inputs = processor(images=[make_image(40, 40)], text="<image>Hi", return_tensors="pt")
    inputs["input_ids"][0, 2] = 5  # one <image> token fewer
    with pytest.raises(PlaceholderMismatchError, match="placeholder tokens"):
        models[1](**inputs)


# ----------------------------------------------------------------------------------------------- parts


def test_vision_tower_bucketed_positions(models):
    """Images of odd patch grids inside a padded canvas: the position ids and the tower output."""
    ref, ours = models
    pixel_mask = torch.zeros(3, 56, 56, dtype=torch.long)
    for i, (h, w) in enumerate([(56, 56), (28, 42), (14, 56)]):
        pixel_mask[i, :h, :w] = 1
    patch_mask = patch_mask_from_pixels(pixel_mask, 14)
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0)) * pixel_mask[:, None]
    embeddings = ref.model.vision_model.embeddings
    position_ids = bucketed_position_ids(patch_mask, 4)
    with torch.no_grad():
        expected_embeds = embeddings(pixels, patch_mask)
        actual_embeds = ours.model.vision_model.embeddings(pixels, position_ids)
        torch.testing.assert_close(actual_embeds, expected_embeds, atol=1e-6, rtol=0)
        expected = ref.model.vision_model(pixels, patch_attention_mask=patch_mask).last_hidden_state
        torch.testing.assert_close(ours.model.vision_model(pixels, patch_mask), expected, atol=ATOL, rtol=0)
    assert position_ids[1].reshape(4, 4)[:2, :3].tolist() == [[0, 1, 2], [8, 9, 10]]  # 2x3 patches stretched


def test_connector_with_padding_patches(models):
    ref, ours = models
    hidden = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    patch_mask = torch.ones(2, 16, dtype=torch.bool)
    patch_mask[1, 6:] = False
    with torch.no_grad():
        expected = ref.model.connector(hidden, attention_mask=patch_mask)
        torch.testing.assert_close(ours.model.connector(hidden, patch_mask), expected, atol=ATOL, rtol=0)


def test_config_defaults_and_perceiver_fix_up():
    from transformers import Idefics2Config as HFConfig

    ours, ref = Idefics2Config.from_dict({}), HFConfig()
    for name in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "sliding_window", "vocab_size",
                 "max_position_embeddings", "rms_norm_eps", "pad_token_id", "head_dim"):  # fmt: skip
        assert getattr(ours.text_config, name) == getattr(ref.text_config, name), name
    assert ours.text_config.rope_theta == ref.text_config.rope_parameters["rope_theta"]
    for name in ("hidden_size", "patch_size", "image_size", "num_hidden_layers"):
        assert getattr(ours.vision_config, name) == getattr(ref.vision_config, name), name
    assert ours.perceiver_config.resampler_n_latents == 64 and ours.image_token_id == 32001
    # hub configs leave the perceiver's width out: it follows the text model, like transformers
    small = Idefics2Config.from_dict({"text_config": {"hidden_size": 256, "rms_norm_eps": 1e-4},
                                      "perceiver_config": {"model_type": "idefics2"}})  # fmt: skip
    assert (small.perceiver_config.hidden_size, small.perceiver_config.rms_norm_eps) == (256, 1e-4)


def test_per_crop_media_items_give_the_batch_features(idefics2_ckpt, models):
    """What the engine does: each reported crop encoded on its own fills its own placeholder run."""
    ours = models[1]
    processor = Idefics2Processor.from_pretrained(idefics2_ckpt)
    images = [[make_image(40, 30, seed=1), make_image(70, 50, seed=2)], [make_image(30, 60, seed=3)]]
    out = processor.process(
        images=images, text=["<image>A<image>", "B <image>"], padding=True, return_tensors="pt"
    )
    ids = out.features["input_ids"]
    with torch.no_grad():
        batch = ours.get_media_features(out.features["pixel_values"], out.features["pixel_attention_mask"])
        rows = iter(batch[ours.image_token_id].split(processor.image_seq_len))  # in token order = crop order
        for item in out.media:
            alone = ours.get_media_features(**processor.media_inputs(out.features, item))[item.token_id]
            assert torch.equal(
                ids[item.sample, item.offset : item.offset + item.num_tokens],
                torch.full((item.num_tokens,), ours.image_token_id),
            )
            torch.testing.assert_close(alone, next(rows), atol=1e-5, rtol=0)


def test_base_model_and_inputs_embeds(processor, models):
    ref, ours = models
    inputs = processor(images=[make_image(50, 40)], text="<image>What is this?", return_tensors="pt")
    with torch.no_grad():
        expected = ref.model(**inputs)
        actual = ours.model(**inputs)
        torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)
        torch.testing.assert_close(
            actual.image_hidden_states, expected.image_hidden_states, atol=ATOL, rtol=0
        )
        embeds = ours.get_input_embeddings()(
            inputs["input_ids"]
        )  # the <image> slots found by their embedding
        pixels = {k: inputs[k] for k in ("pixel_values", "pixel_attention_mask")}
        logits = ours(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **pixels).logits
    torch.testing.assert_close(logits, ref(**inputs).logits.detach(), atol=ATOL, rtol=0)


def test_numpy_images_end_to_end(idefics2_ckpt, processor, models):
    """ocula's processor on numpy arrays + ocula's model = transformers on the same pixels as PIL images."""

    ref, ours = models
    images = [make_image(60, 45, seed=8), make_image(33, 70, seed=9)]
    prompt = _chat(processor, ("user", ["<image>", "Compare with", "<image>"]))
    expected = processor(images=images, text=prompt, return_tensors="pt")
    ocula_processor = Idefics2Processor.from_pretrained(idefics2_ckpt)
    actual = ocula_processor(images=[np.array(i) for i in images], text=prompt, return_tensors="pt")
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    out = ours.generate(**actual, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref.generate(**expected, max_new_tokens=6, do_sample=False))


def test_idefics2_8b_config_gives_the_checkpoint_names_and_shapes():
    """The hub config of HuggingFaceM4/idefics2-8b (remote-code sub-config types, no perceiver width), on meta."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    hub = {
        "architectures": ["Idefics2ForConditionalGeneration"], "image_token_id": 32001, "torch_dtype": "float32",
        "perceiver_config": {"model_type": "idefics2", "resampler_depth": 3, "resampler_head_dim": 96,
                             "resampler_n_heads": 16, "resampler_n_latents": 64, "num_key_value_heads": 4},
        "text_config": {"model_type": "mistral", "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
                        "sliding_window": 4096, "vocab_size": 32003, "pad_token_id": 0},
        "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "idefics2",
                          "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
    }  # fmt: skip
    with torch.device("meta"):
        ref = AutoModelForImageTextToText.from_config(AutoConfig.for_model("idefics2", **copy.deepcopy(hub)))
        ours = Idefics2ForConditionalGeneration(
            Idefics2Config.from_dict({**copy.deepcopy(hub), "model_type": "idefics2"})
        )
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert ours.config.text_config.sliding_window == 4096 and ours.config.perceiver_config.hidden_size == 4096
