"""Usage as a person would meet it: wrong types and bad files give typed errors, never deep tracebacks.

Each test pins one defect found by driving the library, the `LLM` API and the command line by hand:
- wrong-typed sampling fields (a JSON line's "temperature": "hot") raised a bare TypeError that killed a
  whole `ocula batch` run;
- a video given to a processor without a video processor (Ovis2) raised AttributeError;
- `text=5` to a processor raised "'int' object is not iterable";
- `--dtype float13` raised AttributeError and `--device cuda` without a GPU an AssertionError;
- one corrupt `/image` attachment ended an `ocula chat` session;
- `"images": "cat.png"` in a batch line was read as the images "c", "a", "t", ...; `"images": [5]` crashed;
- `LLM.generate(5)` and out-of-vocabulary `prompt_token_ids` raised TypeError / IndexError;
- `model(**inputs, output_hidden_states=True)` ran and returned an output without `.hidden_states`;
- a JSON `response_format` was silently ignored by the server; a failed hub download printed "..";
- Qwen2-VL `num_frames=0` or `1` raised ZeroDivisionError; a 1-pixel-wide image split by Idefics2 too;
- `ocula serve --port 99999` died with an OverflowError from socket.bind;
- `Qwen2VLForConditionalGeneration.from_pretrained(<a LLaVA-OV folder>)` blamed mrope_section;
- `do_rescale=False` with [0, 1] float images (the documented use) gave pixel values 255 times too large.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from ocula import AutoProcessor, SamplingParams, cli
from ocula.errors import ConfigError
from ocula.modeling_utils import resolve_device
from tests.checkpoints import make_image, make_video_frames


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("usage") / "shapes.png"
    make_image(56, 84, seed=4).save(path)
    return path


@pytest.mark.parametrize(
    "fields",
    [{"temperature": "hot"}, {"max_tokens": 2.5}, {"n": True}, {"seed": "1"}, {"top_p": None},
     {"stop": 5}, {"stop": [1]}, {"stop_token_ids": 3}],
)
def test_sampling_params_wrong_types_raise_config_error(fields):
    name = next(iter(fields))
    with pytest.raises(ConfigError, match=f"SamplingParams: {name}="):
        SamplingParams(**fields)


def test_sampling_params_accept_numpy_scalars_and_stop_none():
    params = SamplingParams(seed=np.int64(3), temperature=np.float32(0.5), max_tokens=np.int32(4), stop=None)
    assert params.seed == 3 and params.stop == []


def test_processor_without_video_support_refuses_videos(ovis2_ckpt):
    processor = AutoProcessor.from_pretrained(ovis2_ckpt)
    with pytest.raises(ConfigError, match="takes no videos"):
        processor(text="What happens?", videos=[make_video_frames(2, 28, 28)], return_tensors="pt")


@pytest.mark.parametrize("text", [5, [5], ["ok", None]])
def test_processor_wrong_text_type_is_a_config_error(qwen2_vl_ckpt, text):
    processor = AutoProcessor.from_pretrained(qwen2_vl_ckpt)
    with pytest.raises(ConfigError, match="text must be a string or a list of strings"):
        processor(text=text, return_tensors="pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", 0])
def test_cuda_device_without_cuda_is_a_config_error(device):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device(device)


def test_unknown_device_string_is_a_config_error():
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cli_bad_dtype_exits_with_the_typed_message(qwen2_vl_ckpt, capsys):
    assert cli.main(["run", "--model", str(qwen2_vl_ckpt), "--dtype", "float13", "hi"]) == 2
    assert "float13" in capsys.readouterr().err


def test_chat_survives_a_corrupt_attachment(qwen2_vl_ckpt, png, tmp_path, monkeypatch, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    script = f"/image {corrupt}\nWhat is it?\n/image {png}\nAnd this one?\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert cli.main(["chat", "--model", str(qwen2_vl_ckpt), "--max-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "Cannot decode image" in captured.err and "message dropped" in captured.err
    assert captured.out.count("ocula> ") == 2  # the second question was still answered


def test_chat_session_drops_only_the_failed_user_turn():
    session = cli.ChatSession()
    session.handle("first")
    session.reply("answer")
    session.handle("second")
    session.drop_last()
    assert [m["role"] for m in session.history] == ["user", "assistant"]


def test_batch_reports_wrong_types_per_line(qwen2_vl_ckpt, png, tmp_path):
    (tmp_path / png.name).write_bytes(png.read_bytes())
    lines = [
        {"id": "one-image-as-string", "prompt": "What is shown?", "images": png.name, "max_tokens": 2},
        {"id": "image-not-a-path", "prompt": "x", "images": [5]},
        {"id": "hot", "prompt": "x", "temperature": "hot"},
        {"id": "fine", "prompt": "Hello", "max_tokens": 2},
    ]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["batch", str(source), str(output), "--model", str(qwen2_vl_ckpt)]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    assert by_id["line-2"]["error"] == "bad input line: a media path or URL must be a string, got 5"
    assert "temperature='hot' must be a number" in by_id["hot"]["error"]
    assert by_id["fine"]["usage"]["completion_tokens"] == 2
    one = by_id["one-image-as-string"]
    assert "text" in one and one["usage"]["prompt_tokens"] > 20  # the image's tokens are in the prompt


@pytest.fixture(scope="module")
def llm(qwen2_vl_ckpt):
    from ocula import LLM

    return LLM(qwen2_vl_ckpt, max_model_len=128, kv_cache_tokens=256, max_num_seqs=2)


@pytest.mark.parametrize(
    "prompt, match",
    [(5, "a prompt must be a string or a dict"), (None, "a prompt must be a string or a dict"),
     ({"prompt_token_ids": [10**6]}, r"prompt_token_ids must be ints in \[0, "),
     ({"prompt_token_ids": [-1, 3]}, "prompt_token_ids must be ints"),
     ({"prompt_token_ids": ["a"]}, "prompt_token_ids must be ints")],
)
def test_llm_generate_rejects_bad_prompts_with_config_errors(llm, prompt, match):
    with pytest.raises(ConfigError, match=match):
        llm.generate(prompt, use_tqdm=False)


def test_llm_generate_takes_a_tuple_and_tensor_token_ids(llm):
    params = SamplingParams(max_tokens=2, temperature=0.0)
    outs = llm.generate(("Hello", {"prompt_token_ids": torch.tensor([5, 6, 7])}), params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2]
    assert outs[1].prompt_token_ids == [5, 6, 7]


def test_forward_refuses_hidden_states_instead_of_dropping_them(idefics2_ckpt):
    from ocula import AutoModelForImageTextToText
    from ocula.errors import UnsupportedFeatureError

    model = AutoModelForImageTextToText.from_pretrained(idefics2_ckpt)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert model(input_ids=ids, output_hidden_states=False, use_cache=True, return_dict=True).logits.shape[1] == 4
    for option in ("output_hidden_states", "output_attentions"):
        with pytest.raises(UnsupportedFeatureError, match=f"{option}=True"):
            model(input_ids=ids, **{option: True})


@pytest.mark.parametrize("fmt, refused", [({"type": "json_object"}, True), ({"type": "json_schema"}, True),
                                          ({"type": "text"}, False), (None, False)])
def test_server_refuses_json_response_format_instead_of_ignoring_it(fmt, refused):
    from ocula.errors import UnsupportedFeatureError
    from ocula.server.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": fmt}
    )
    if refused:
        with pytest.raises(UnsupportedFeatureError, match="response_format"):
            request.to_sampling_params(8)
    else:
        assert request.to_sampling_params(8).max_tokens == 8


def test_hub_download_failure_is_one_readable_line(monkeypatch):
    import huggingface_hub

    from ocula.errors import CheckpointNotFoundError
    from ocula.loading.hub import resolve_checkpoint

    def no_network(*args, local_files_only=False, **kwargs):
        raise OSError("Name or service not known\nAn error happened. Please check your internet connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointNotFoundError) as caught:
        resolve_checkpoint("someone/some-model")
    message = str(caught.value)
    assert "\n" not in message and ".." not in message and "internet connection. Check the id" in message


@pytest.mark.parametrize("num_frames", [0, 1])
def test_qwen2_vl_video_with_too_few_frames_is_a_media_error(qwen2_vl_ckpt, num_frames):
    from ocula.errors import MediaError

    processor = AutoProcessor.from_pretrained(qwen2_vl_ckpt)
    frames = make_video_frames(4, 28, 28)
    with pytest.raises(MediaError, match="fewer than temporal_patch_size"):
        processor(text=processor.video_token + "?", videos=[frames], num_frames=num_frames, do_sample_frames=True)


@pytest.mark.parametrize("size", [(1, 1), (1, 50)])
def test_idefics2_image_too_small_to_split_is_a_media_error(idefics2_ckpt, size):
    from PIL import Image

    from ocula.errors import MediaError

    processor = AutoProcessor.from_pretrained(idefics2_ckpt)
    with pytest.raises(MediaError, match="cannot be split into quarters"):
        processor(images=Image.new("RGB", size), text="<image>hi", return_tensors="pt")
    processor.image_processor.do_image_splitting = False  # then any size works
    assert processor(images=Image.new("RGB", size), text="<image>hi", return_tensors="pt")["pixel_values"].ndim == 5


def test_serve_port_out_of_range_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["serve", "some/model", "--port", "99999"])
    assert caught.value.code == 2 and "outside 0-65535" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["serve", "some/model", "--port", "8001"]).port == 8001


def test_family_class_on_another_familys_checkpoint_names_the_mismatch(llava_onevision_ckpt):
    from ocula import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    with pytest.raises(ConfigError, match="model_type='llava_onevision' checkpoint but Qwen2VLConfig"):
        Qwen2VLForConditionalGeneration.from_pretrained(llava_onevision_ckpt)
    with pytest.raises(ConfigError, match="AutoModelForImageTextToText"):
        Qwen2VLConfig.from_pretrained(llava_onevision_ckpt)


def test_do_rescale_false_with_unit_floats_matches_transformers(qwen2_vl_ckpt):
    from tests.checkpoints import hf_processor

    image = np.asarray(make_image(90, 60, seed=2), dtype=np.float32).transpose(2, 0, 1) / 255  # [3, H, W] in [0, 1]
    text = "<|vision_start|><|image_pad|><|vision_end|>What is it?"
    ours = AutoProcessor.from_pretrained(qwen2_vl_ckpt)(images=image, text=text, do_rescale=False, return_tensors="pt")
    theirs = hf_processor(qwen2_vl_ckpt)(images=image, text=text, do_rescale=False, return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])


def test_do_rescale_false_with_mixed_float_and_uint8_images_is_refused(qwen2_vl_ckpt):
    from ocula.errors import UnsupportedFeatureError

    processor = AutoProcessor.from_pretrained(qwen2_vl_ckpt)
    processor.image_processor.do_rescale = False
    image = np.asarray(make_image(56, 56))
    text = "<|vision_start|><|image_pad|><|vision_end|>" * 2
    with pytest.raises(UnsupportedFeatureError, match="ambiguous"):
        processor(images=[image.astype(np.float32) / 255, image], text=text)
