"""The tiny checkpoints load in transformers, and the v5 and hub layouts of one checkpoint agree exactly."""

import json

import pytest
import torch

from tests.checkpoints import (
    FAMILIES,
    build_checkpoint,
    chat_template,
    hf_model,
    hf_processor,
    make_image,
    make_video_frames,
    token_id,
    write_mp4,
)

HAS_VIDEO = {"qwen2_vl", "llava_onevision"}
IMAGE_MARK = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava_onevision": "<image>",
    "idefics2": "<image>",
    "ovis2": "<image>",
}
VIDEO_MARK = {"qwen2_vl": "<|vision_start|><|video_pad|><|vision_end|>", "llava_onevision": "<video>"}


def _processor_inputs(family: str, image_seed: int = 1) -> dict:
    """One prompt with an image (and a video where the family has one)."""
    text = f"Describe {IMAGE_MARK[family]} this picture."
    inputs = {
        "images": [make_image(150, 90, seed=image_seed)]
    }  # several tiles / crops where the family tiles
    if family in HAS_VIDEO:
        text += f" And {VIDEO_MARK[family]} the video."
        inputs["videos"] = [make_video_frames(4, 40, 36, seed=2)]
    return {"text": [text], "return_tensors": "pt", **inputs}


def _run(folder, family):
    processor = hf_processor(folder)
    batch = processor(**_processor_inputs(family))
    with torch.no_grad():
        logits = hf_model(folder)(**batch).logits
    return batch, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_layouts_agree(family, make_ckpt):
    v5, v5_logits = _run(make_ckpt(family, "v5"), family)
    hub, hub_logits = _run(make_ckpt(family, "hub"), family)
    assert sorted(v5.keys()) == sorted(hub.keys())
    for key in v5:
        torch.testing.assert_close(v5[key], hub[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(v5_logits, hub_logits, rtol=0, atol=0)
    # Not flat: the redrawn weights make the logits spread, and the image changes them.
    assert v5_logits.std() > 0.1
    image_id = token_id(make_ckpt(family, "v5"), _placeholder(family))
    assert (v5["input_ids"] == image_id).sum() > 0
    other = hf_processor(make_ckpt(family, "v5"))(**_processor_inputs(family, image_seed=5))
    assert torch.equal(other["input_ids"], v5["input_ids"])
    with torch.no_grad():
        other_logits = hf_model(make_ckpt(family, "v5"))(**other).logits
    assert (other_logits[:, -1] - v5_logits[:, -1]).abs().max() > 1e-3


def _placeholder(family: str) -> str:
    return {
        "qwen2_vl": "<|image_pad|>",
        "llava_onevision": "<image>",
        "idefics2": "<image>",
        "ovis2": "<IMG_ATOM>",
    }[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_files_of_each_layout(family, make_ckpt):
    v5 = {p.name for p in make_ckpt(family, "v5").iterdir()}
    hub = {p.name for p in make_ckpt(family, "hub").iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
    } <= v5
    assert {"preprocessor_config.json", "chat_template.json", "tokenizer.json"} <= hub
    assert "chat_template.jinja" not in hub
    assert ("video_preprocessor_config.json" in hub) == (family in HAS_VIDEO)
    tok_config = json.loads((make_ckpt(family, "hub") / "tokenizer_config.json").read_text())
    assert "additional_special_tokens" in tok_config and "extra_special_tokens" not in tok_config
    template = json.loads((make_ckpt(family, "hub") / "chat_template.json").read_text())["chat_template"]
    assert template == chat_template(family)


def test_config_token_ids_match_tokenizer(qwen2_vl_ckpt):
    config = json.loads((qwen2_vl_ckpt / "config.json").read_text())
    assert config["image_token_id"] == token_id(qwen2_vl_ckpt, "<|image_pad|>")
    assert config["video_token_id"] == token_id(qwen2_vl_ckpt, "<|video_pad|>")
    assert config["vision_start_token_id"] == token_id(qwen2_vl_ckpt, "<|vision_start|>")


def test_qwen2_vl_hub_is_flat_with_old_weight_names(qwen2_vl_ckpt_hub):
    from safetensors import safe_open

    config = json.loads((qwen2_vl_ckpt_hub / "config.json").read_text())
    assert "text_config" not in config and config["rope_scaling"]["type"] == "mrope"
    with safe_open(str(qwen2_vl_ckpt_hub / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert any(k.startswith("visual.") for k in keys)
    assert not any(k.startswith(("model.language_model", "model.visual")) for k in keys)


def test_tied_and_sharded_variants(make_ckpt):
    tied = make_ckpt("qwen2_vl", "v5", tie_word_embeddings=True)
    model = hf_model(tied)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    sharded = make_ckpt("qwen2_vl", "hub", shards=True)
    assert (sharded / "model.safetensors.index.json").exists()
    batch = hf_processor(sharded)(**_processor_inputs("qwen2_vl"))
    with torch.no_grad():
        a = hf_model(sharded)(**batch).logits
        b = hf_model(make_ckpt("qwen2_vl", "v5"))(**batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_deterministic_from_seed(tmp_path):
    from safetensors.torch import load_file

    a = load_file(str(build_checkpoint("qwen2_vl", tmp_path / "a") / "model.safetensors"))
    b = load_file(str(build_checkpoint("qwen2_vl", tmp_path / "b") / "model.safetensors"))
    c = load_file(str(build_checkpoint("qwen2_vl", tmp_path / "c", seed=1) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_write_mp4_decodes(tmp_path):
    import av

    path = write_mp4(tmp_path / "clip.mp4", n_frames=6, w=32, h=24, fps=4)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (24, 32, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_same_in_both_layouts(family, make_ckpt):
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
    ]
    prompts = [
        hf_processor(make_ckpt(family, layout)).apply_chat_template(conversation, add_generation_prompt=True)
        for layout in ("v5", "hub")
    ]
    assert prompts[0] == prompts[1]
    assert IMAGE_MARK[family] in prompts[0] and "What is this?" in prompts[0]


def test_llava_onevision_feature_layer_list(make_ckpt):
    folder = make_ckpt("llava_onevision", "v5", vision_feature_layer=[-2, -1])
    batch = hf_processor(folder)(**_processor_inputs("llava_onevision"))
    model = hf_model(folder)
    assert model.config.vision_feature_layer == [-2, -1]
    assert (
        model.model.multi_modal_projector.linear_1.in_features == 2 * model.config.vision_config.hidden_size
    )
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_idefics2_image_splitting_switch(make_ckpt):
    on = hf_processor(make_ckpt("idefics2", "v5"))(**_processor_inputs("idefics2"))
    off_folder = make_ckpt("idefics2", "hub", processor={"do_image_splitting": False})
    off = hf_processor(off_folder)(**_processor_inputs("idefics2"))
    assert on["pixel_values"].shape[1] == 5 and off["pixel_values"].shape[1] == 1
    image_id = token_id(off_folder, "<image>")
    assert (on["input_ids"] == image_id).sum() == 5 * (off["input_ids"] == image_id).sum()


def test_idefics2_sliding_window_is_active(make_ckpt):
    """The prompt is longer than the window, so a model that ignores it gives other logits."""
    batch = hf_processor(make_ckpt("idefics2", "v5"))(**_processor_inputs("idefics2"))
    windowed = hf_model(make_ckpt("idefics2", "v5"))
    assert batch["input_ids"].shape[1] > windowed.config.text_config.sliding_window
    full = hf_model(make_ckpt("idefics2", "v5", text_config={"sliding_window": None}))
    with torch.no_grad():
        a, b = windowed(**batch).logits, full(**batch).logits
    window = windowed.config.text_config.sliding_window
    torch.testing.assert_close(a[:, :window], b[:, :window])
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


def test_legacy_llama_tokenizer_json_in_hub_layout(idefics2_ckpt, idefics2_ckpt_hub):
    """transformers gives the same ids from both files; a plain `tokenizers` load of the hub one does not."""
    from tokenizers import Tokenizer

    text = "User:<image>Hi there.<end_of_utterance>\nAssistant: yes"
    ids = hf_processor(idefics2_ckpt).tokenizer(text).input_ids
    assert hf_processor(idefics2_ckpt_hub).tokenizer(text).input_ids == ids
    assert ids[0] == token_id(idefics2_ckpt, "<s>")
    assert Tokenizer.from_file(str(idefics2_ckpt / "tokenizer.json")).encode(text).ids == ids
    assert Tokenizer.from_file(str(idefics2_ckpt_hub / "tokenizer.json")).encode(text).ids != ids


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P"])
def test_make_image_modes(mode):
    image = make_image(33, 21, mode=mode, seed=3)
    assert image.mode == mode and image.size == (33, 21)
    assert image.tobytes() == make_image(33, 21, mode=mode, seed=3).tobytes()
    assert image.tobytes() != make_image(33, 21, mode=mode, seed=4).tobytes()


def test_video_file_through_the_oracle(tmp_path, qwen2_vl_ckpt):
    from tests.checkpoints import hf_load_video

    frames, metadata = hf_load_video(write_mp4(tmp_path / "clip.mp4", n_frames=8, w=64, h=48, fps=4))
    assert frames.shape == (8, 48, 64, 3)
    batch = hf_processor(qwen2_vl_ckpt)(
        text=[VIDEO_MARK["qwen2_vl"]],
        videos=[frames],
        return_tensors="pt",
        videos_kwargs={"video_metadata": [metadata]},
    )
    assert batch["video_grid_thw"].tolist() == [[4, 4, 4]]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_v5_in_memory_weight_names_load_the_same(family, make_ckpt):
    from safetensors import safe_open

    folder = make_ckpt(family, "v5", save_original_format=False)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert any(k.startswith("model.language_model.") for k in f.keys())  # noqa: SIM118 (not a dict)
    batch = hf_processor(folder)(**_processor_inputs(family))
    with torch.no_grad():
        a = hf_model(folder)(**batch).logits
        b = hf_model(make_ckpt(family, "hub"))(**batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
