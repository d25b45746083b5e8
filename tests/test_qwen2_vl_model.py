"""Qwen2-VL model parity against transformers 5.23 on tiny random checkpoints (redrawn weights).

Inputs come from transformers' own processor, so only the model differs. Also pinned: the intended
M-RoPE divergence after a video (ocula follows the original Qwen2-VL rule), the static-cache path of the
model contract, configs of both layouts and from_pretrained's options.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import build_checkpoint, hf_model, hf_processor, make_image, make_video_frames

from ocula.errors import ConfigError, PlaceholderMismatchError, UnsupportedFeatureError
from ocula.layers.attention import DenseAttentionMetadata
from ocula.models.qwen2_vl.config import Qwen2VLConfig
from ocula.models.qwen2_vl.modeling import Qwen2VLForConditionalGeneration

ATOL = 1e-4


@pytest.fixture(scope="module")
def v5(tmp_path_factory):
    return build_checkpoint("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl_v5"))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return build_checkpoint("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl_hub"), layout="hub", seed=1)


@pytest.fixture(scope="module")
def processor(v5):
    return hf_processor(v5)


@pytest.fixture(scope="module")
def models(v5):
    return hf_model(v5), Qwen2VLForConditionalGeneration.from_pretrained(v5)


def _prompt(processor, *content: str, question: str = "Describe this image.") -> str:
    parts = [{"type": kind} for kind in content] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)


def _video():
    return make_video_frames(8, 56, 56)  # grid (4, 4, 4): t = 4 > h / 2 = w / 2 = 2


def _compare(ref, ours, inputs, labels: torch.Tensor | None = None):
    with torch.no_grad():
        expected = ref(**inputs, labels=labels)
        actual = ours(**inputs, labels=labels)
    torch.testing.assert_close(actual.logits[:, -1], expected.logits[:, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.logits, expected.logits, atol=ATOL, rtol=0)
    if labels is not None:
        torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=0)
    return actual


# ----------------------------------------------------------------------------------------------- parity


def test_text_only_logits_and_loss(processor, models):
    inputs = processor(text=["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :3] = -100
    _compare(*models, inputs, labels)


def test_one_image_logits_and_loss(processor, models):
    inputs = processor(text=[_prompt(processor, "image")], images=[make_image(90, 60)], return_tensors="pt")
    labels = torch.where(inputs["mm_token_type_ids"] == 0, inputs["input_ids"], -100)
    _compare(*models, inputs, labels)


def test_two_images_of_different_sizes(processor, models):
    images = [make_image(90, 60, seed=1), make_image(40, 120, seed=2)]
    inputs = processor(text=[_prompt(processor, "image", "image")], images=images, return_tensors="pt")
    assert inputs["image_grid_thw"].shape[0] == 2
    _compare(*models, inputs)


def test_backward_gradients_match(processor, v5):
    ref, ours = hf_model(v5), Qwen2VLForConditionalGeneration.from_pretrained(v5)
    ref.train(), ours.train()  # no dropout in Qwen2-VL: same numbers as eval
    inputs = processor(text=[_prompt(processor, "image")], images=[make_image(64, 64)], return_tensors="pt")
    labels = inputs["input_ids"].clone()
    ref(**inputs, labels=labels).loss.backward()
    ours(**inputs, labels=labels).loss.backward()
    ref_grads = {name: p.grad for name, p in ref.named_parameters() if p.grad is not None}
    our_grads = {name: p.grad for name, p in ours.named_parameters() if p.grad is not None}
    assert set(our_grads) == set(ref_grads)
    assert any(name.startswith("model.visual.blocks.0") for name in our_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_left_padded_batch_rows_equal_single_runs(processor, models):
    ref, ours = models
    texts = [_prompt(processor, "image", question="Hi"), _prompt(processor, "image", question="What is shown?")]
    images = [make_image(56, 56, seed=3), make_image(84, 56, seed=4)]
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    assert not bool(batch["attention_mask"].all())
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        actual = ours(**batch).logits
        expected = ref(**batch).logits
    torch.testing.assert_close(actual[real], expected[real], atol=ATOL, rtol=0)
    for row, (text, image) in enumerate(zip(texts, images)):
        single = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            alone = ours(**single).logits[0]
        torch.testing.assert_close(actual[row][real[row]], alone, atol=ATOL, rtol=0)


def test_hub_layout_matches_transformers(hub):
    processor = hf_processor(hub)
    inputs = processor(text=[_prompt(processor, "image")], images=[make_image(70, 50)], return_tensors="pt")
    _compare(hf_model(hub), Qwen2VLForConditionalGeneration.from_pretrained(hub), inputs)


def test_tied_embeddings(tmp_path, processor):
    folder = build_checkpoint("qwen2_vl", tmp_path / "tied", tie_word_embeddings=True, seed=2)
    ours = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    assert ours.lm_head.weight is ours.get_input_embeddings().weight
    inputs = processor(text=[_prompt(processor, "image")], images=[make_image(60, 60)], return_tensors="pt")
    _compare(hf_model(folder), ours, inputs)


def test_sliding_window_layers(tmp_path, processor):
    text = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    folder = build_checkpoint("qwen2_vl", tmp_path / "sliding", text_config=text, seed=3)
    ours = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    assert [layer.self_attn.sliding_window for layer in ours.model.language_model.layers] == [None, 4]
    batch = processor(text=["Hi there", "The man is riding a bicycle down the street"], padding=True,
                      padding_side="left", return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        actual, expected = ours(**batch).logits, hf_model(folder)(**batch).logits
    torch.testing.assert_close(actual[real], expected[real], atol=ATOL, rtol=0)


def test_bfloat16_load_runs(processor, v5, models):
    ours = Qwen2VLForConditionalGeneration.from_pretrained(v5, torch_dtype="bfloat16")
    assert ours.dtype == torch.bfloat16 and ours.model.visual.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    inputs = processor(text=[_prompt(processor, "image")], images=[make_image(60, 60)], return_tensors="pt")
    with torch.no_grad():
        low = ours(**inputs).logits
        full = models[1](**inputs).logits
    assert low.dtype == torch.bfloat16 and bool(low.isfinite().all())
    torch.testing.assert_close(low.float(), full, atol=0.15, rtol=0.05)


# ----------------------------------------------------------------------------------------------- video / M-RoPE


def original_rope_index(input_ids, mm_token_type_ids, grids: dict[int, torch.Tensor], merge: int):
    """The original Qwen2-VL rule (transformers 4.x), written independently: after a media item, text
    continues at (max over its t, h, w positions) + 1."""
    out = []
    grid_iters = {kind: iter(g.tolist()) for kind, g in grids.items()}
    for ids, types in zip(input_ids.tolist(), mm_token_type_ids.tolist()):
        t_row, h_row, w_row, nxt, i = [], [], [], 0, 0
        while i < len(ids):
            if types[i] == 0:
                t_row.append(nxt), h_row.append(nxt), w_row.append(nxt)
                nxt, i = nxt + 1, i + 1
                continue
            t, h, w = next(grid_iters[types[i]])
            h, w = h // merge, w // merge
            for ti in range(t):
                for hi in range(h):
                    for wi in range(w):
                        t_row.append(nxt + ti), h_row.append(nxt + hi), w_row.append(nxt + wi)
            i += t * h * w
            nxt += max(t, h, w)
        out.append([t_row, h_row, w_row])
    return torch.tensor(out).permute(1, 0, 2)  # [3, B, S]


def _video_inputs(processor, with_image: bool):
    content = ("image", "video") if with_image else ("video",)
    images = [make_image(56, 84, seed=5)] if with_image else None
    text = _prompt(processor, *content, question="What happens in this video?")
    return processor(text=[text], images=images, videos=[_video()], return_tensors="pt")


@pytest.mark.parametrize("with_image", [False, True], ids=["video", "image+video"])
def test_video_positions_follow_the_original_rule(processor, models, with_image):
    ref, ours = models
    inputs = _video_inputs(processor, with_image)
    grids = {k: inputs[f"{name}_grid_thw"] for k, name in ((1, "image"), (2, "video")) if f"{name}_grid_thw" in inputs}
    positions, delta = ours.get_position_ids(**inputs)
    expected = original_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], grids, 2)
    torch.testing.assert_close(positions, expected, atol=0, rtol=0)
    assert delta.tolist() == [int(expected.max()) + 1 - inputs["input_ids"].shape[1]]
    # transformers 5.23 restarts text at start + max(h, w) / merge: equal up to the end of the video only
    hf_positions, _ = ref.model.get_rope_index(**{k: inputs[k] for k in ("input_ids", "mm_token_type_ids")},
                                               image_grid_thw=inputs.get("image_grid_thw"),
                                               video_grid_thw=inputs["video_grid_thw"])
    after_video = int((inputs["mm_token_type_ids"][0] == 2).nonzero().max()) + 1
    assert torch.equal(positions[..., :after_video], hf_positions[..., :after_video])
    assert not torch.equal(positions[..., after_video:], hf_positions[..., after_video:])


@pytest.mark.parametrize("with_image", [False, True], ids=["video", "image+video"])
def test_video_logits(processor, models, with_image):
    ref, ours = models
    inputs = _video_inputs(processor, with_image)
    after_video = int((inputs["mm_token_type_ids"][0] == 2).nonzero().max()) + 1
    positions, _ = ours.get_position_ids(**inputs)
    with torch.no_grad():
        actual = ours(**inputs).logits
        hf_default = ref(**inputs).logits
        hf_same_positions = ref(**inputs, position_ids=positions).logits
    torch.testing.assert_close(actual, hf_same_positions, atol=ATOL, rtol=0)
    # the divergence shows only after the video
    torch.testing.assert_close(actual[:, :after_video], hf_default[:, :after_video], atol=ATOL, rtol=0)
    assert (actual[:, after_video:] - hf_default[:, after_video:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- contract


def test_static_cache_prefill_and_decode_match_forward(processor, models):
    _, ours = models
    texts = [_prompt(processor, "image", question="Hi"), _prompt(processor, "image", question="Count them.")]
    images = [make_image(56, 56, seed=6), make_image(56, 84, seed=7)]
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        full = ours(**batch).logits  # [B, S, V]
        features = ours.get_media_features(**batch)
        embeds = ours.embed_inputs(ids, features)
        media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        positions, delta = ours.get_position_ids(ids, mask, **media)
        cache = ours.new_kv_cache(ids.shape[0], ids.shape[1] + 2)
        seq = ids.shape[1] - 1  # prefill all but the last token, then decode it
        attn = DenseAttentionMetadata(cache, 0, mask[:, :seq].bool())
        prefill = ours.compute_logits(ours.forward_text(embeds[:, :seq], positions[..., :seq], attn))
        attn = DenseAttentionMetadata(cache, seq, mask.bool())
        step_positions = (delta + seq)[None, :, None].expand(3, -1, 1)  # text token: t + delta in all rows
        step = ours.compute_logits(ours.forward_text(embeds[:, seq:], step_positions, attn))
    torch.testing.assert_close(step_positions, positions[..., seq:], atol=0, rtol=0)
    torch.testing.assert_close(prefill[:, -1], full[:, seq - 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=ATOL, rtol=0)


def test_text_only_positions_skip_left_padding(processor, models):
    _, ours = models
    batch = processor(text=["Hi", "The cat sat on the mat"], padding=True, padding_side="left",
                      return_tensors="pt")
    positions, delta = ours.get_position_ids(batch["input_ids"], batch["attention_mask"])
    pads = (batch["attention_mask"] == 0).sum(1)
    assert delta.tolist() == (-pads).tolist()
    expected = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0) * batch["attention_mask"]
    assert torch.equal(positions, expected[None].expand(3, -1, -1))


def test_placeholder_mismatch_names_both_counts(processor, models):
    _, ours = models
    inputs = processor(text=[_prompt(processor, "image")], images=[make_image(56, 56)], return_tensors="pt")
    features = ours.get_media_features(**inputs)
    image_id = ours.config.image_token_id
    with pytest.raises(PlaceholderMismatchError, match=r"has 4 placeholder.* give 3"):
        ours.embed_inputs(inputs["input_ids"], {image_id: features[image_id][:3]})


def test_logits_to_keep(processor, models):
    _, ours = models
    inputs = processor(text=["Hello, how are you today?"], return_tensors="pt")
    with torch.no_grad():
        full = ours(**inputs).logits
        last = ours(**inputs, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- config / loading


def test_configs_of_both_layouts_agree(v5, hub):
    nested, flat = Qwen2VLConfig.from_pretrained(v5), Qwen2VLConfig.from_pretrained(hub)
    for config in (nested, flat):
        assert config.text_config.mrope_section == [2, 3, 3]
        assert config.text_config.rope_theta == 1000000.0
        assert config.text_config.layer_types == ["full_attention"] * 2
        assert config.vision_config.in_channels == 3 and config.vision_config.embed_dim == 32
        assert config.dtype == "float32"
    assert flat.vision_token_id == flat.extra["vision_token_id"]  # unknown keys kept, readable
    assert "initializer_range" in flat.extra
    again = Qwen2VLConfig.from_dict(nested.to_dict())
    assert again.text_config == nested.text_config and again.vision_config == nested.vision_config


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        Qwen2VLConfig.from_dict({"text_config": {"num_attention_heads": 4, "num_key_value_heads": 3,
                                                 "hidden_size": 64}})
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen2VLConfig.from_dict({"text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                                 "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 1]}}})
    with pytest.raises(UnsupportedFeatureError, match="rope_type"):
        Qwen2VLConfig.from_dict({"text_config": {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}})


def test_from_pretrained_options(v5):
    model = Qwen2VLForConditionalGeneration.from_pretrained(v5, device_map="cpu", attn_implementation="eager",
                                                            dtype="auto")
    assert model.device.type == "cpu" and model.dtype == torch.float32 and not model.training
    assert model.generation_config.eos_token_id is not None
    # like transformers 5: tying is skipped when the checkpoint holds two different tensors
    tied = Qwen2VLForConditionalGeneration.from_pretrained(v5, tie_word_embeddings=True)
    assert tied.config.tie_word_embeddings and tied.lm_head.weight is not tied.get_input_embeddings().weight
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        expected = hf_model(v5, tie_word_embeddings=True)(input_ids=ids).logits
        torch.testing.assert_close(tied(input_ids=ids).logits, expected, atol=ATOL, rtol=0)
    with pytest.raises(UnsupportedFeatureError, match="quantization_config"):
        Qwen2VLForConditionalGeneration.from_pretrained(v5, quantization_config={"load_in_4bit": True})
    with pytest.raises(ConfigError, match="not_a_field"):
        Qwen2VLForConditionalGeneration.from_pretrained(v5, not_a_field=1)


def test_left_padding_positions_match_transformers(qwen2_vl_ckpt):
    """Full logits of a left-padded batch, padding positions included, equal transformers'."""
    from ocula import AutoModelForImageTextToText, AutoProcessor
    from tests.checkpoints import hf_model

    processor = AutoProcessor.from_pretrained(qwen2_vl_ckpt, padding_side="left")
    conversations = [
        [{"role": "user", "content": "hello there how are you doing today my friend"}],
        [{"role": "user", "content": "hi"}],
    ]
    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        padding=True,
    )
    assert not bool(inputs["attention_mask"].all())
    with torch.no_grad():
        ours = AutoModelForImageTextToText.from_pretrained(qwen2_vl_ckpt)(**inputs).logits
        theirs = hf_model(qwen2_vl_ckpt)(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
