"""LLaVA-OneVision model against transformers 5.23 on tiny random checkpoints (redrawn weights).

The SigLIP tower against `SiglipVisionModel`; logits (last position <= 1e-4, every real position too),
loss and gradients, greedy tokens, and the generate() contract (a left-padded mixed batch whose rows equal
their single-row runs), for single images, multi-image samples, images across turns, video and text only,
in both checkpoint layouts.
"""

from __future__ import annotations

import pytest
import torch

from ocula.errors import PlaceholderMismatchError
from ocula.models.llava_onevision.config import LlavaOnevisionConfig
from ocula.models.llava_onevision.modeling import LlavaOnevisionForConditionalGeneration
from ocula.models.llava_onevision.processing import LlavaOnevisionProcessor
from ocula.models.vision.siglip import SiglipVisionConfig, SiglipVisionTransformer
from tests.checkpoints import hf_model, make_image, make_video_frames, redraw_

# ------------------------------------------------------------------------------------------------- SigLIP

SIGLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 60,
    "patch_size": 14,
    "vision_use_head": False,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


@pytest.fixture(scope="module")
def towers():
    from transformers import SiglipVisionConfig as RefConfig
    from transformers import SiglipVisionModel

    ref = SiglipVisionModel(RefConfig(**SIGLIP)).eval()
    redraw_(ref, seed=3)
    ours = SiglipVisionTransformer(SiglipVisionConfig(**SIGLIP)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@torch.no_grad()
def test_siglip_tower(towers):
    ours, ref = towers
    pixels = torch.randn(3, 3, 60, 60, generator=torch.Generator().manual_seed(0))
    expected = ref(pixels, output_hidden_states=True)
    torch.testing.assert_close(ours(pixels), expected.last_hidden_state, atol=1e-5, rtol=0)
    for layers in ([-1], [0], [1, -2], [-2, -1]):
        for got, index in zip(ours.hidden_states(pixels, layers), layers):
            torch.testing.assert_close(got, expected.hidden_states[index], atol=1e-5, rtol=0)


@torch.no_grad()
def test_siglip_patch_mask_hook(towers):
    """Masked (padding) patches never change the real patches' outputs; position_ids pick embeddings."""
    ours, _ = towers
    pixels = torch.randn(1, 3, 60, 60, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, 12:] = False  # the last row of patches is padding
    noisy = pixels.clone()
    noisy[..., 42:, :] += 5.0
    a, b = ours(pixels, patch_attention_mask=mask), ours(noisy, patch_attention_mask=mask)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert not torch.allclose(ours(pixels)[:, :12], ours(noisy)[:, :12])
    positions = torch.arange(16).flip(0)[None]
    assert not torch.allclose(ours(pixels, position_ids=positions), ours(pixels))


# ------------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def setup(llava_onevision_ckpt):
    processor = LlavaOnevisionProcessor.from_pretrained(llava_onevision_ckpt)
    return (
        processor,
        LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_ckpt),
        hf_model(llava_onevision_ckpt),
    )


def _image_turn(image, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


CONVERSATIONS = {
    "single": [_image_turn(make_image(100, 70), "What is shown?")],
    "large_downsampled": [_image_turn(make_image(1000, 900, seed=1), "Describe it.")],
    "tall": [_image_turn(make_image(59, 400, seed=2), "Describe it.")],
    "two_images": [{"role": "user", "content": [
        {"type": "image", "image": make_image(40, 130, "L", seed=3)},
        {"type": "image", "image": make_image(300, 200, "RGBA", seed=4)},
        {"type": "text", "text": "Compare them."}]}],
    "across_turns": [_image_turn(make_image(100, 70), "What?"),
                     {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
                     _image_turn(make_image(50, 90, seed=5), "And this one?")],
    "video": [{"role": "user", "content": [{"type": "video", "video": make_video_frames(4, 50, 40)},
                                           {"type": "text", "text": "What happens?"}]}],
    "text": [{"role": "user", "content": [{"type": "text", "text": "Hello, how are you?"}]}],
}  # fmt: skip


def _inputs(processor, conversation, **kwargs):
    return processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        **kwargs,
    )


def _assert_logits(ours, ref, mask):
    torch.testing.assert_close(ours[:, -1], ref[:, -1], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CONVERSATIONS))
@torch.no_grad()
def test_logits_and_greedy(setup, case):
    processor, ours, ref = setup
    inputs = _inputs(processor, CONVERSATIONS[case])
    _assert_logits(ours(**inputs).logits, ref(**inputs).logits, inputs["attention_mask"])
    greedy = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(ours.generate(**inputs, **greedy), ref.generate(**inputs, **greedy))


@torch.no_grad()
def test_mixed_left_padded_batch(setup):
    processor, ours, ref = setup
    batch = [
        CONVERSATIONS["across_turns"],
        CONVERSATIONS["text"],
        CONVERSATIONS["two_images"],
        CONVERSATIONS["single"],
    ]
    inputs = _inputs(processor, batch, padding=True, padding_side="left")
    assert inputs["batch_num_images"].tolist() == [2, 2, 1]
    _assert_logits(ours(**inputs).logits, ref(**inputs).logits, inputs["attention_mask"])
    greedy = {"max_new_tokens": 5, "do_sample": False}
    out = ours.generate(**inputs, **greedy)
    assert torch.equal(out, ref.generate(**inputs, **greedy))
    for row, conversation in enumerate(batch):
        single = ours.generate(**_inputs(processor, conversation), **greedy)
        assert torch.equal(single[0, -5:], out[row, -5:]), row


def test_loss_and_gradients(setup):
    processor, ours, ref = setup
    inputs = _inputs(processor, CONVERSATIONS["single"])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, -100)
    a, b = ours(**inputs, labels=labels), ref(**inputs, labels=labels)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)
    a.loss.backward()
    b.loss.backward()
    pairs = [
        (ours.model.multi_modal_projector.linear_1.weight, ref.model.multi_modal_projector.linear_1.weight),
        (ours.model.image_newline, ref.model.image_newline),
        (
            ours.model.vision_tower.embeddings.patch_embedding.weight,
            ref.model.vision_tower.embeddings.patch_embedding.weight,
        ),
    ]
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)
    ours.zero_grad()
    ref.zero_grad()


@torch.no_grad()
def test_hub_layout(llava_onevision_ckpt_hub, setup):
    processor, _, ref = setup
    hub = LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_ckpt_hub)
    inputs = _inputs(
        LlavaOnevisionProcessor.from_pretrained(llava_onevision_ckpt_hub), CONVERSATIONS["single"]
    )
    assert torch.equal(inputs["input_ids"], _inputs(processor, CONVERSATIONS["single"])["input_ids"])
    torch.testing.assert_close(hub(**inputs).logits, ref(**inputs).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_feature_layer_list_and_tied_embeddings(make_ckpt):
    folder = make_ckpt("llava_onevision", vision_feature_layer=[0, -1], tie_word_embeddings=True)
    processor = LlavaOnevisionProcessor.from_pretrained(folder)
    ours, ref = LlavaOnevisionForConditionalGeneration.from_pretrained(folder), hf_model(folder)
    assert ours.config.feature_layers == [0, -1]
    assert ours.lm_head.weight is ours.get_input_embeddings().weight
    for case in ("single", "video"):
        inputs = _inputs(processor, CONVERSATIONS[case])
        _assert_logits(ours(**inputs).logits, ref(**inputs).logits, inputs["attention_mask"])


@torch.no_grad()
def test_item_inputs_encode_one_item(setup):
    """Each image / video encoded alone (what an engine caches per item) equals its slice of the batch."""
    processor, ours, _ = setup
    batch = [CONVERSATIONS["two_images"], CONVERSATIONS["single"], CONVERSATIONS["video"]]
    inputs = _inputs(processor, batch, padding=True, padding_side="left")
    features = ours.get_media_features(**inputs)
    for token_id, modality, count in (
        (processor.image_token_id, "image", 3),
        (processor.video_token_id, "video", 1),
    ):
        items = [
            ours.get_media_features(**ours.item_inputs(inputs, modality, i))[token_id] for i in range(count)
        ]
        torch.testing.assert_close(torch.cat(items), features[token_id], atol=1e-5, rtol=0)
    assert [
        len(ours.get_media_features(**ours.item_inputs(inputs, "image", i))[processor.image_token_id])
        for i in range(3)
    ] == [17, 17, 70]


@torch.no_grad()
def test_placeholder_mismatch(setup):
    processor, ours, _ = setup
    inputs = _inputs(processor, CONVERSATIONS["single"])
    ids = inputs["input_ids"].clone()
    ids[ids == processor.image_token_id] = 0
    ids[0, :3] = processor.image_token_id
    with pytest.raises(PlaceholderMismatchError, match="3 placeholder tokens"):
        ours(**{**inputs, "input_ids": ids})


@torch.no_grad()
def test_bf16_load_runs(llava_onevision_ckpt, setup):
    processor = setup[0]
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_ckpt, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    inputs = _inputs(processor, CONVERSATIONS["two_images"]).to(model.device, torch.bfloat16)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_config_from_both_spellings(llava_onevision_ckpt_hub):
    config = LlavaOnevisionConfig.from_pretrained(llava_onevision_ckpt_hub)
    assert config.image_token_index == config.image_token_id and config.text_config.rope_theta == 1000000.0
    assert config.vision_config.image_size == 60 and len(config.image_grid_pinpoints) == 36
    default = LlavaOnevisionConfig.from_dict({})
    assert default.vision_config.hidden_size == 1152 and default.vision_config.num_hidden_layers == 26
