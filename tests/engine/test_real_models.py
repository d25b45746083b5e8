"""The engine on the four real model families (tiny random checkpoints): `LLM` outputs equal the library's
`model.generate` on the processor's outputs of the same conversation.

Covered: greedy tokens alone and mixed in one batch of different lengths (with chunked prefill that splits
media across steps), raw logprobs against generate's logits, seeded sampling and n > 1 against
`generate(seed=...)`, Qwen2-VL video (M-RoPE with t > 1) and multi-image prompts, Idefics2's sliding window
on the paged path, prefix-cache hits on a repeated image + system prompt, the vision-embedding cache,
different images never sharing KV, preemption under a tiny KV pool, abort, the processed-media cache.
"""

from __future__ import annotations

import base64
import io

import pytest
import torch

from ocula import LLM, SamplingParams
from ocula.errors import RequestTooLargeError
from tests.checkpoints import make_image, make_video_frames

FAMILIES = ["qwen2_vl", "llava_onevision", "idefics2", "ovis2"]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def _llm(folder, **options) -> LLM:
    settings = {"device": "cpu", "max_num_seqs": 8, "max_model_len": 2048, "kv_cache_tokens": 8192,
                "block_size": 4, **options}
    return LLM(folder, **settings)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    folder = request.getfixturevalue(f"{request.param}_ckpt")
    return request.param, folder, _llm(folder)


def _user(*parts) -> list[dict]:
    content = [{"type": "image", "image": p} if not isinstance(p, str) else {"type": "text", "text": p}
               for p in parts]
    return [{"role": "user", "content": content}]


def _system(text: str, *parts) -> list[dict]:
    return [{"role": "system", "content": [{"type": "text", "text": text}]}, *_user(*parts)]


def _conversations() -> list[list[dict]]:
    return [
        _user(make_image(64, 48, seed=1), "What is in this picture?"),
        _user("Tell me a story about a cat and a dog in the garden."),
        _user(make_image(40, 80, seed=2), "Describe."),
        _user(make_image(50, 50, seed=3), "And this one, in a few words?", ),
    ]


def _library(llm: LLM, conversation, max_new_tokens=6, processor=None, **options) -> list[int]:
    processor = processor or llm.processor
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    out = llm.model.generate(**inputs, max_new_tokens=max_new_tokens, **options)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _trim_eos(tokens: list[int], llm: LLM) -> list[int]:
    """generate() pads finished rows; the engine stops at EOS (kept in the ids)."""
    eos = llm.engine.eos_token_ids
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


# ------------------------------------------------------------------------------------------ parity


def test_greedy_equals_generate_alone_and_batched(family):
    _, folder, llm = family
    convs = _conversations()
    expected = [_trim_eos(_library(llm, c, do_sample=False), llm) for c in convs]
    alone = [llm.chat(c, GREEDY, use_tqdm=False)[0] for c in convs]
    assert [o.outputs[0].token_ids for o in alone] == expected
    # one batch with a tight token budget: prefills are chunked (media split across steps) while others decode
    chunked = _llm(folder, max_num_batched_tokens=12, enable_prefix_caching=False)
    batched = chunked.chat(convs, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == expected
    assert [o.outputs[0].text for o in batched] == [o.outputs[0].text for o in alone]
    assert max(len(o.prompt_token_ids) for o in batched) > 3 * 12, "prompts must need several prefill chunks"


def test_logprobs_are_the_raw_model_distribution(family):
    _, _, llm = family
    conv = _conversations()[0]
    out = llm.chat(conv, SamplingParams(max_tokens=4, temperature=0.0, logprobs=2), use_tqdm=False)[0]
    inputs = llm.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
    ref = llm.model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    completion = out.outputs[0]
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        want = torch.log_softmax(ref.logits[step][0].float(), -1)
        assert len(entry) == 3 or (len(entry) == 2 and token in torch.topk(want, 2).indices.tolist())
        for tid, value in entry.items():
            assert value == pytest.approx(float(want[tid]), abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(completion.token_ids,
                                                                                    completion.logprobs)))


def test_seeded_sampling_and_n_equal_generate_with_seed(family):
    _, _, llm = family
    conv = _conversations()[2]
    params = SamplingParams(n=3, max_tokens=5, temperature=0.8, top_p=0.9, seed=7)
    out = llm.chat(conv, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for i, completion in enumerate(out.outputs):
        want = _library(llm, conv, max_new_tokens=5, do_sample=True, temperature=0.8, top_p=0.9, top_k=0,
                        seed=7 + i)
        assert completion.token_ids == _trim_eos(want, llm)
    again = llm.chat(conv, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_repetition_penalty_and_top_k_equal_generate(qwen2_vl_ckpt):
    llm = _llm(qwen2_vl_ckpt)
    conv = _conversations()[1]
    greedy = llm.chat(conv, SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.5),
                      use_tqdm=False)[0]
    want = _library(llm, conv, 8, do_sample=False, repetition_penalty=1.5)
    assert greedy.outputs[0].token_ids == _trim_eos(want, llm)
    sampled = llm.chat(conv, SamplingParams(max_tokens=8, temperature=1.3, top_k=5, repetition_penalty=1.2,
                                            seed=3), use_tqdm=False)[0]
    want = _library(llm, conv, 8, do_sample=True, temperature=1.3, top_k=5, repetition_penalty=1.2, seed=3)
    assert sampled.outputs[0].token_ids == _trim_eos(want, llm)


# ------------------------------------------------------------------------------------ family cases


def test_qwen2_vl_video_and_multi_image_prompts(qwen2_vl_ckpt):
    llm = _llm(qwen2_vl_ckpt)
    frames = make_video_frames(8, 56, 56)  # grid t = 4 > h / 2: M-RoPE positions after the video matter
    video_prompt = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    two_images = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and "
                  "<|vision_start|><|image_pad|><|vision_end|>: compare.<|im_end|>\n<|im_start|>assistant\n")
    images = [make_image(56, 28, seed=4), make_image(28, 84, seed=5)]
    prompts = [
        {"prompt": video_prompt, "multi_modal_data": {"video": frames}},
        {"prompt": two_images, "multi_modal_data": {"image": images}},
    ]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    library = [
        llm.processor(text=[video_prompt], videos=[frames], return_tensors="pt"),
        llm.processor(text=[two_images], images=images, return_tensors="pt"),
    ]
    for out, inputs in zip(outs, library):
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        ref = llm.model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, len(out.prompt_token_ids):]
        assert out.outputs[0].token_ids == _trim_eos(ref.tolist(), llm)


def test_llava_onevision_video_and_two_images_in_one_conversation(llava_onevision_ckpt):
    llm = _llm(llava_onevision_ckpt)
    frames = make_video_frames(4, 40, 40)
    conv = [{"role": "user", "content": [
        {"type": "image", "image": make_image(70, 40, seed=16)},
        {"type": "image", "image": make_image(30, 60, seed=17)},
        {"type": "video", "video": frames},
        {"type": "text", "text": "Compare them all."},
    ]}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == _trim_eos(_library(llm, conv, do_sample=False), llm)


def test_idefics2_sliding_window_on_the_paged_path(idefics2_ckpt):
    llm = _llm(idefics2_ckpt)
    window = llm.model.config.text_config.sliding_window
    conv = _user(make_image(40, 30, seed=6), "A long question " * 12)
    out = llm.chat(conv, SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) > 2 * window
    assert out.outputs[0].token_ids == _trim_eos(_library(llm, conv, 8, do_sample=False), llm)


def test_openai_style_messages_and_plain_strings(qwen2_vl_ckpt):
    llm = _llm(qwen2_vl_ckpt)
    image = make_image(48, 48, seed=8)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    openai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                           {"type": "text", "text": "What is it?"}]}]
    hf = _user(image, "What is it?")
    assert llm.chat(openai, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == \
        llm.chat(hf, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    text = llm.generate(["Once upon a time", "The weather"], GREEDY, use_tqdm=False)
    ids = llm.processor.tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    ref = llm.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert text[0].outputs[0].token_ids == _trim_eos(ref, llm)
    by_ids = llm.generate({"prompt_token_ids": ids[0].tolist()}, GREEDY, use_tqdm=False)[0]
    assert by_ids.outputs[0].token_ids == text[0].outputs[0].token_ids
    assert text[0].metrics.ttft is not None and text[0].outputs[0].finish_reason in ("length", "stop")


# ------------------------------------------------------------------------------------------ caches


def _count_vision_calls(llm: LLM, monkeypatch) -> list[int]:
    calls = []
    model = llm.engine.runner.model
    original = model.get_media_features

    def counted(**inputs):
        calls.append(1)
        return original(**inputs)

    monkeypatch.setattr(model, "get_media_features", counted)
    return calls


def test_prefix_cache_hit_on_a_repeated_image_and_system_prompt(qwen2_vl_ckpt, monkeypatch):
    llm = _llm(qwen2_vl_ckpt)
    calls = _count_vision_calls(llm, monkeypatch)
    image = make_image(64, 64, seed=9)
    system = "You are a careful describer of images."
    first = llm.chat(_system(system, image, "Please answer in one short line: colours?"), GREEDY,
                     use_tqdm=False)[0]
    second = llm.chat(_system(system, image, "Please answer in one short line: shapes?"), GREEDY,
                      use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    image_end = max(i for i, t in enumerate(second.prompt_token_ids) if t == llm.model.config.image_token_id)
    assert second.num_cached_tokens > image_end  # the system prompt and the whole image came from the cache
    assert len(calls) == 1  # and the vision tower ran once
    conv = _system(system, image, "Please answer in one short line: shapes?")
    assert second.outputs[0].token_ids == _trim_eos(_library(llm, conv, do_sample=False), llm)


def test_vision_cache_hit_when_the_text_before_the_image_differs(qwen2_vl_ckpt, monkeypatch):
    llm = _llm(qwen2_vl_ckpt)
    calls = _count_vision_calls(llm, monkeypatch)
    image = make_image(64, 64, seed=10)
    convs = [_system("Short answers.", image, "What?"),
             _system("Long, detailed answers please.", image, "Why?")]
    outs = [llm.chat(c, GREEDY, use_tqdm=False)[0] for c in convs]
    assert len(calls) == 1 and llm.engine.stats().encoder_cache_hits >= 1
    for conv, out in zip(convs, outs):
        assert out.outputs[0].token_ids == _trim_eos(_library(llm, conv, do_sample=False), llm)


def test_different_images_never_share_blocks(qwen2_vl_ckpt):
    llm = _llm(qwen2_vl_ckpt)
    a, b = make_image(64, 64, seed=11), make_image(64, 64, seed=12)  # same size: same placeholder ids
    convs = [_system("Same system prompt for both.", a, "Same question?"),
             _system("Same system prompt for both.", b, "Same question?")]
    outs = [llm.chat(c, GREEDY, use_tqdm=False)[0] for c in convs]
    ids = outs[1].prompt_token_ids
    assert ids == outs[0].prompt_token_ids  # identical token ids; only the pixels differ
    first_image = ids.index(llm.model.config.image_token_id)
    assert outs[1].num_cached_tokens <= first_image
    for conv, out in zip(convs, outs):
        assert out.outputs[0].token_ids == _trim_eos(_library(llm, conv, do_sample=False), llm)


def test_processed_media_cache_skips_resizing_a_repeated_image(family):
    from ocula import AutoProcessor

    _, folder, llm = family
    image = make_image(64, 48, seed=13)
    cache = llm.engine.media_cache
    llm.chat(_user(image, "One?"), GREEDY, use_tqdm=False)
    hits, entries = cache.hits, len(cache)
    out = llm.chat(_user(image, "Two?"), GREEDY, use_tqdm=False)[0]
    assert cache.hits == hits + 1 and len(cache) == entries
    fresh = AutoProcessor.from_pretrained(folder)  # the reference resizes the image itself
    want = _library(llm, _user(image, "Two?"), processor=fresh, do_sample=False)
    assert out.outputs[0].token_ids == _trim_eos(want, llm)


# ------------------------------------------------------------------------------- memory pressure


def test_preemption_under_a_tiny_kv_pool_gives_the_same_outputs(qwen2_vl_ckpt):
    roomy = _llm(qwen2_vl_ckpt)
    convs = _conversations()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = roomy.chat(convs, params, use_tqdm=False)
    prompts = sum(len(o.prompt_token_ids) for o in expected)
    tight = _llm(qwen2_vl_ckpt, kv_cache_tokens=prompts + 16, enable_prefix_caching=False)  # all prompts fit,
    outs = tight.chat(convs, params, use_tqdm=False)  # but not all of them with their 12 new tokens
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert tight.engine.stats().num_preemptions > 0


def test_abort_frees_blocks_and_too_large_requests_are_refused(qwen2_vl_ckpt):
    llm = _llm(qwen2_vl_ckpt, kv_cache_tokens=256)
    engine = llm.engine
    ids, media = llm._prepare_chat(_user(make_image(64, 48, seed=14), "Hi?"), {"add_generation_prompt": True})
    engine.add_request("x", ids, SamplingParams(max_tokens=50, temperature=0.0), media)
    engine.step()
    engine.step()
    assert engine.stats().kv_blocks_free < engine.stats().kv_blocks_total
    out = engine.abort("x")
    assert out.outputs[0].finish_reason == "abort"
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total and not engine.has_unfinished()
    with pytest.raises(RequestTooLargeError, match="KV blocks"):
        llm.generate("word " * 300, SamplingParams(max_tokens=4), use_tqdm=False)


def test_engine_media_items_key_on_pixels_and_layout():
    """The engine key covers what the processor derived (tokens, grid, rows), not the pixels alone, so the
    same image laid out differently never shares encoder-cache entries or prefix blocks."""
    from types import SimpleNamespace

    from ocula.engine.llm import engine_media_items
    from ocula.processing_utils import MediaItem as Report

    def processed(num_tokens, grid):
        report = Report("image", 0, 0, 5, num_tokens, 3, (0, 4), grid, "same-pixels")
        return SimpleNamespace(features={"input_ids": torch.zeros(1, 40)}, media=[report])

    base = engine_media_items(processed(16, (1, 8, 8)))[0]
    assert (base.offset, base.length) == (3, 16) and base.payload.item.content_hash == "same-pixels"
    assert base.hash == engine_media_items(processed(16, (1, 8, 8)))[0].hash
    assert base.hash != engine_media_items(processed(20, (1, 8, 8)))[0].hash
    assert base.hash != engine_media_items(processed(16, (1, 4, 16)))[0].hash


def test_kv_pool_sizing_and_progress_bar(qwen2_vl_ckpt, capsys):
    llm = LLM(qwen2_vl_ckpt, device="cpu", max_num_seqs=2, max_model_len=64, block_size=4)
    assert llm.engine.block_manager.num_blocks == 2 * 64 // 4  # memory is ample: capped at what 2 x 64 need
    runner = llm.engine.runner
    # the pool has one scratch block beyond the engine's 32 (padding rows of captured decode steps)
    assert runner.kv.k.shape == (runner.num_layers, 33, 4, runner.num_kv_heads, runner.head_dim)
    outs = llm.generate(["Hello", "Bye"], SamplingParams(max_tokens=2), use_tqdm=True)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2]
    assert "Processed prompts" in capsys.readouterr().err
    with pytest.raises(RequestTooLargeError, match="max_model_len"):
        llm.generate("word " * 80, use_tqdm=False)


def test_without_chunked_prefill_or_prefix_cache(qwen2_vl_ckpt):
    llm = _llm(qwen2_vl_ckpt, enable_chunked_prefill=False, enable_prefix_caching=False, max_model_len=512)
    assert llm.engine.config.max_num_batched_tokens == 512
    convs = _conversations()
    outs = llm.chat(convs, GREEDY, use_tqdm=False)
    for conv, out in zip(convs, outs):
        assert out.outputs[0].token_ids == _trim_eos(_library(llm, conv, do_sample=False), llm)
