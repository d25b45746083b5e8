"""Chat template rendering and tokenization against transformers, with the four families' real templates.

Conversations cover text only, images, videos, several images, multi-turn with a system prompt,
add_generation_prompt, continue_final_message and batches; both the transformers 5 folder layout and the
older hub layout (chat_template.json, additional_special_tokens, added_tokens_decoder).
"""

from __future__ import annotations

import copy
from datetime import datetime

import jinja2
import numpy as np
import pytest
import transformers
from checkpoints import FAMILIES, build_tokenizer, chat_template
from PIL import Image
from test_tokenization import to_hub_tokenizer_layout
from transformers.utils.chat_template_utils import render_jinja_template

from ocula.chat_template import render_chat_template
from ocula.tokenization import Tokenizer

IMAGE = {"type": "image"}
VIDEO = {"type": "video"}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _user(*content) -> dict:
    return {"role": "user", "content": list(content)}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [_text(text)]}


CONVERSATIONS = {
    "text": [_user(_text("Hello, who are you?"))],
    "image": [_user(IMAGE, _text("What is in this image?"))],
    "text_then_image": [_user(_text("Look:"), IMAGE)],
    "video": [_user(VIDEO, _text("Describe the video."))],
    "two_images": [_user(IMAGE, IMAGE, _text("Compare them."))],
    "multi_turn": [
        {"role": "system", "content": [_text("You are a terse assistant.")]},
        _user(IMAGE, _text("What is it?")),
        _assistant("A cat."),
        _user(_text("And the colour?")),
    ],
    "ends_with_assistant": [_user(IMAGE, _text("Describe it.")), _assistant("It shows")],
}
# Which conversations each real template can render (Ovis2's and Idefics2's have no video support).
SKIP = {"ovis2": {"video"}, "idefics2": {"video"}}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[tuple[str, str], tuple]:
    """(family, layout) -> (transformers tokenizer, ocula tokenizer) built from the same folder."""
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for family in FAMILIES:
        folder = root / family
        build_tokenizer(family, folder)
        out[family, "v5"] = (
            transformers.AutoTokenizer.from_pretrained(folder),
            Tokenizer.from_pretrained(folder),
        )
        hub = root / f"{family}_hub"
        build_tokenizer(family, hub)
        to_hub_tokenizer_layout(hub)
        # transformers' tokenizer does not read chat_template.json (its processor does): give it the template.
        ref = transformers.AutoTokenizer.from_pretrained(hub, chat_template=chat_template(family))
        out[family, "hub"] = ref, Tokenizer.from_pretrained(hub)
    return out


def _cases(family: str) -> list[str]:
    return [name for name in CONVERSATIONS if name not in SKIP.get(family, set())]


def _call(tok, chat, **kw):
    """apply_chat_template's result, or the type of the error it raised (both sides must agree)."""
    try:
        out = tok.apply_chat_template(copy.deepcopy(chat), **kw)
    except (ValueError, TypeError, jinja2.TemplateError) as error:
        return next(
            kind.__name__ for kind in (ValueError, TypeError, jinja2.TemplateError) if isinstance(error, kind)
        )
    if isinstance(out, (str, list)):
        return out
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in out.items()}


@pytest.mark.parametrize("layout", ["v5", "hub"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rendered_and_tokenized_match(tokenizers, family, layout):
    ref, ours = tokenizers[family, layout]
    assert ours.chat_template == chat_template(family)
    for name in _cases(family):
        chat = CONVERSATIONS[name]
        for kw in (
            {"tokenize": False},
            {"tokenize": False, "add_generation_prompt": True},
            {"add_generation_prompt": True},
            {"return_dict": False},
        ):
            assert _call(ours, chat, **kw) == _call(ref, chat, **kw), (name, kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_continue_final_message(tokenizers, family):
    ref, ours = tokenizers[family, "v5"]
    chat = CONVERSATIONS["ends_with_assistant"]
    for kw in ({"tokenize": False}, {}):
        expected = _call(ref, chat, continue_final_message=True, **kw)
        assert _call(ours, chat, continue_final_message=True, **kw) == expected
    assert isinstance(expected, dict) and "It shows" in ours.decode(expected["input_ids"])
    with pytest.raises(ValueError, match="exclusive"):
        ours.apply_chat_template(chat, continue_final_message=True, add_generation_prompt=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_with_padding(tokenizers, family, side):
    ref, ours = tokenizers[family, "v5"]
    batch = [CONVERSATIONS["multi_turn"], CONVERSATIONS["image"], CONVERSATIONS["text"]]
    kw = {
        "add_generation_prompt": True,
        "padding": True,
        "return_tensors": "pt",
        "tokenizer_kwargs": {"padding_side": side},
    }
    r, o = ref.apply_chat_template(batch, **kw), ours.apply_chat_template(batch, **kw)
    for key in ("input_ids", "attention_mask"):
        assert o[key].dtype == r[key].dtype
        assert o[key].tolist() == r[key].tolist()
    assert ours.apply_chat_template(batch, tokenize=False) == ref.apply_chat_template(batch, tokenize=False)


def test_qwen2_vl_add_vision_id(tokenizers):
    ref, ours = tokenizers["qwen2_vl", "v5"]
    chat = [_user(IMAGE, VIDEO, IMAGE, _text("Which differ?"))]
    kw = {"tokenize": False, "add_generation_prompt": True, "add_vision_id": True}
    rendered = ours.apply_chat_template(chat, **kw)
    assert rendered == ref.apply_chat_template(chat, **kw)
    assert "Picture 2: " in rendered and "Video 1: " in rendered


def test_media_objects_and_none_values_render_like_transformers(tokenizers):
    ref, ours = tokenizers["qwen2_vl", "v5"]
    image = Image.new("RGB", (4, 4))
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "video", "video": np.zeros(3)},
                _text("Hi"),
            ],
            "tool_calls": None,
        }
    ]
    assert ours.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)


def test_assistant_masks_from_generation_blocks(tokenizers):
    ref, ours = tokenizers["llava_onevision", "v5"]
    chat = CONVERSATIONS["multi_turn"] + [_assistant("Orange and white.")]
    kw = {"return_dict": True, "return_assistant_tokens_mask": True}
    r, o = ref.apply_chat_template(chat, **kw), ours.apply_chat_template(chat, **kw)
    assert o["input_ids"] == r["input_ids"]
    assert o["assistant_masks"] == r["assistant_masks"]
    assert sum(o["assistant_masks"]) > 0
    for side in ("left", "right"):
        batch_kw = {"padding": True, "return_tensors": "pt", "tokenizer_kwargs": {"padding_side": side}, **kw}
        rb = ref.apply_chat_template([chat, chat[:3]], **batch_kw)
        ob = ours.apply_chat_template([chat, chat[:3]], **batch_kw)
        assert ob["input_ids"].tolist() == rb["input_ids"].tolist()
        assert ob["assistant_masks"].tolist() == rb["assistant_masks"].tolist()


# -------------------------------------------------------------------------------- render_chat_template


def _both(template: str, chats: list, **kw):
    ours = render_chat_template(template, chats, **kw)
    theirs, _ = render_jinja_template(conversations=copy.deepcopy(chats), chat_template=template, **kw)
    return ours, theirs


def test_tojson_keeps_non_ascii_and_accepts_options():
    template = (
        "{{ messages[0]['content'] | tojson }}|{{ tools | tojson(indent=2) }}|"
        "{{ messages[0] | tojson(sort_keys=True, separators=(',', ':')) }}"
    )
    chats = [[{"role": "user", "content": "café 日本 <b>&</b>"}]]
    tools = [{"type": "function", "function": {"name": "größe", "parameters": {"z": 1, "a": [1, 2]}}}]
    ours, theirs = _both(template, chats, tools=tools)
    assert ours == theirs
    assert "日本" in ours[0] and "größe" in ours[0]


def test_template_helpers_and_loop_controls():
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m.role }}{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}"
        "|{{ ns.n }}|{{ strftime_now('%Y') }}|{{ dict(a=1) }}|{{ bos_token }}|{{ documents | length }}"
        "{% generation %}[{{ add_generation_prompt }}]{% endgeneration %}"
    )
    chats = [
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "v"},
        ]
    ]
    docs = [{"title": "t", "text": "x"}]
    ours, theirs = _both(template, chats, add_generation_prompt=True, documents=docs, bos_token="<s>")
    assert ours == theirs
    assert f"|{datetime.now().year}|" in ours[0]


def test_generation_ranges_match_transformers():
    template = (
        "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
        "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    chats = [
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "ok"},
        ]
    ]
    (texts, ranges) = render_chat_template(template, chats, return_assistant_tokens_mask=True)
    theirs = render_jinja_template(
        conversations=chats, chat_template=template, return_assistant_tokens_mask=True
    )
    assert (texts, ranges) == theirs
    assert [texts[0][a:b] for a, b in ranges[0]] == ["hello there", "ok"]


def test_raise_exception_and_sandbox():
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [[{"role": "user"}]])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{% set ns = namespace() %}{% set ns._x = 1 %}", [[{"role": "user"}]])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.append(1) }}", [[{"role": "user"}]])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template(
            "{{ ''.__class__.__mro__ }}x{{ messages.__class__.__subclasses__() }}", [[{"role": "u"}]]
        )


def test_continue_final_message_variants():
    template = "{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}"
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]]
    ours, theirs = _both(template, chats, continue_final_message=True)
    assert ours == theirs == ["user: hi\nassistant: Sure,"]
    thinking = [[*chats[0][:1], {"role": "assistant", "content": "x", "reasoning_content": "hmm"}]]
    with pytest.raises(ValueError, match="never reads"):
        render_chat_template(template, thinking, continue_final_message="reasoning_content")
    with pytest.raises(ValueError, match="empty"):
        render_chat_template(template, [[]], continue_final_message=True)
