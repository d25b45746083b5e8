"""Tokenizer parity with transformers' AutoTokenizer (the oracle) on tiny trained BPE tokenizers.

Folders: a Qwen2-style byte-level BPE and a Llama-style metaspace/byte-fallback BPE saved by transformers 5,
plus pre-v5 hub-style folders (Prepend normalizer, `additional_special_tokens`, `added_tokens_decoder`,
`special_tokens_map.json`, template in tokenizer_config.json) where the plain `tokenizers` load gives
other ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from checkpoints import FAMILIES, build_tokenizer
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, trainers

from ocula.errors import ConfigError
from ocula.tokenization import Tokenizer

CORPUS = [
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
    "What is in this image? Describe the picture and the video in detail.",
    "The quick brown fox jumps over the lazy dog. Numbers 12345 and 67890.",
    "Ünïcödé text: café, naïve, 日本語, emoji 🙂, tabs\tand\nnewlines.",
    "user assistant system You are a helpful assistant. it's we'll they're don't",
] * 3
QWEN_EXTRA = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAMA_EXTRA = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "Hello world!",
    " Hello  world ",
    "<image>Hi there<image> yes",
    "a<|im_start|>user\nWhat?<|im_end|>\n",
    "café 日本語 🙂\t\n x",
    "",
    "  ",
    "<s>Hello</s> <unk> don't",
    "Describe<fake_token_around_image><image><fake_token_around_image> it",
    "zzzz qqqq ~~~",
]


def _train(model: models.Model, pre_tokenizer, **trainer_kwargs) -> tuple[dict, list[tuple[str, str]]]:
    tok = BackendTokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False, **trainer_kwargs)
    )
    data = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["merges"]]
    return data["vocab"], merges


def build_qwen2(folder: Path) -> Path:
    """A Qwen2Tokenizer saved by transformers 5 (extra_special_tokens list, chat_template.jinja)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab, merges = _train(
        models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False), initial_alphabet=alphabet
    )
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=QWEN_EXTRA)
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def build_llama(folder: Path) -> Path:
    """A LlamaTokenizer (byte fallback, BOS added) saved by transformers 5."""
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    vocab, merges = _train(
        models.BPE(byte_fallback=True, unk_token="<unk>"), pre_tokenizers.Metaspace(), special_tokens=specials
    )
    tok = transformers.LlamaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=True, extra_special_tokens=LLAMA_EXTRA
    )
    tok.save_pretrained(folder)
    return folder


def _legacy_llama_json(data: dict) -> dict:
    """tokenizer.json as older converters wrote it for Llama: Prepend+Replace normalizer, no pre-tokenizer."""
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    data["pre_tokenizer"] = None
    data["model"]["unk_token"] = "<unk>"
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    return data


def build_legacy_llama(src: Path, folder: Path, legacy: bool) -> Path:
    """A pre-v5 hub-style Llama folder (like idefics2-8b) built from the same vocab and merges."""
    folder.mkdir(parents=True, exist_ok=True)
    data = _legacy_llama_json(json.loads((src / "tokenizer.json").read_text()))
    (folder / "tokenizer.json").write_text(json.dumps(data))
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in data["added_tokens"]}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": LLAMA_EXTRA,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": legacy,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<unk>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    bos = {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    tokens_map = {
        "additional_special_tokens": LLAMA_EXTRA,
        "bos_token": bos,
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens_map))
    return folder


def build_legacy_llama_without_decoder(src: Path, folder: Path) -> Path:
    """Older still: no `added_tokens_decoder`, so special_tokens_map.json decides (its pad token wins)."""
    shutil.copytree(src, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokens_map = json.loads((folder / "special_tokens_map.json").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({**tokens_map, "pad_token": "</s>"}))
    return folder


def build_legacy_qwen2(src: Path, folder: Path) -> Path:
    """A pre-v5 hub-style Qwen2 folder: additional_special_tokens, added_tokens_decoder, template in config"""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
    data = json.loads((src / "tokenizer.json").read_text())
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in data["added_tokens"]}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": QWEN_EXTRA,
        "bos_token": None,
        "chat_template": QWEN_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def to_hub_tokenizer_layout(folder: Path) -> None:
    """Rewrite a transformers 5 tokenizer folder in place the way pre-v5 hub folders hold it."""
    template = folder / "chat_template.jinja"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = config.pop("extra_special_tokens", [])
    config.pop("backend", None)
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    qwen2, llama = build_qwen2(root / "qwen2"), build_llama(root / "llama")
    return {
        "qwen2": qwen2,
        "llama": llama,
        "legacy_llama": build_legacy_llama(llama, root / "legacy_llama", legacy=False),
        "legacy_llama_true": build_legacy_llama(llama, root / "legacy_llama_true", legacy=True),
        "legacy_qwen2": build_legacy_qwen2(qwen2, root / "legacy_qwen2"),
        "legacy_llama_map": build_legacy_llama_without_decoder(
            root / "legacy_llama", root / "legacy_llama_map"
        ),
    }


KINDS = ["qwen2", "llama", "legacy_llama", "legacy_llama_true", "legacy_qwen2", "legacy_llama_map"]


@pytest.fixture(scope="module")
def pairs(folders) -> dict[str, tuple]:
    return {
        k: (transformers.AutoTokenizer.from_pretrained(f), Tokenizer.from_pretrained(f))
        for k, f in folders.items()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_ids_match_transformers(pairs, kind):
    ref, ours = pairs[kind]
    for text in TEXTS:
        for add in (True, False):
            assert (
                ours(text, add_special_tokens=add)["input_ids"]
                == ref(text, add_special_tokens=add)["input_ids"]
            )
        assert ours.encode(text) == ref.encode(text)
        assert ours.tokenize(text) == ref.tokenize(text)


def test_legacy_llama_differs_from_plain_tokenizers_load(folders, pairs):
    """The trap: a Prepend normalizer adds "▁" after every added token; transformers only at the start."""
    plain = BackendTokenizer.from_file(str(folders["legacy_llama"] / "tokenizer.json"))
    ref, ours = pairs["legacy_llama"]
    text = "<image>Hi there<image> yes"
    assert plain.encode(text).ids != ref(text)["input_ids"]
    assert ours(text)["input_ids"] == ref(text)["input_ids"]


def test_tokenizer_class_from_config_json_model_type(folders, tmp_path):
    folder = tmp_path / "no_class"
    shutil.copytree(folders["legacy_llama"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["tokenizer_class"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps({"model_type": "idefics2"}))
    ref, ours = transformers.AutoTokenizer.from_pretrained(folder), Tokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert ours(text)["input_ids"] == ref(text)["input_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_and_vocab(pairs, kind):
    ref, ours = pairs[kind]
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_tokens == ref.all_special_tokens
    assert ours.all_special_ids == ref.all_special_ids
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token")
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id")
    assert (len(ours), ours.vocab_size, ours.padding_side) == (len(ref), ref.vocab_size, ref.padding_side)
    assert ours.get_vocab() == ref.get_vocab()
    tokens = ["<|im_end|>", "<image>", "▁Hello", "Hello", "zzzz-not-a-token"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    ids = list(range(0, len(ref), 7)) + ref.all_special_ids
    for skip in (False, True):
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=skip) == ref.convert_ids_to_tokens(
            ids, skip_special_tokens=skip
        )


@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches(pairs, kind):
    ref, ours = pairs[kind]
    batch = [ref(text)["input_ids"] for text in TEXTS]
    for skip in (False, True):
        for clean in (None, True, False):
            kw = {"skip_special_tokens": skip, "clean_up_tokenization_spaces": clean}
            assert ours.batch_decode(batch, **kw) == ref.batch_decode(batch, **kw)
    assert ours.decode(torch.tensor(batch[0])) == ref.decode(torch.tensor(batch[0]))
    assert ours.decode(np.array(batch[2]), skip_special_tokens=True) == ref.decode(
        batch[2], skip_special_tokens=True
    )


@pytest.mark.parametrize("kind", ["qwen2", "llama", "legacy_llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_matches(pairs, kind, side):
    ref, ours = pairs[kind]
    if ref.pad_token is None:
        ref.pad_token = ref.eos_token  # the usual fix, on both
    if ours.pad_token is None:
        ours.pad_token = ours.eos_token
    texts = TEXTS[:5]
    for padding in (True, "longest"):
        r = ref(texts, padding=padding, padding_side=side, return_tensors="pt")
        o = ours(texts, padding=padding, padding_side=side, return_tensors="pt")
        assert set(o.keys()) == set(r.keys())
        for key in r:
            assert o[key].dtype == r[key].dtype
            torch.testing.assert_close(o[key], r[key], rtol=0, atol=0)
    r = ref(
        texts, padding="max_length", max_length=12, truncation=True, padding_side=side, return_tensors="np"
    )
    o = ours(
        texts, padding="max_length", max_length=12, truncation=True, padding_side=side, return_tensors="np"
    )
    assert isinstance(o["input_ids"], np.ndarray)
    np.testing.assert_array_equal(o["input_ids"], r["input_ids"])
    np.testing.assert_array_equal(o["attention_mask"], r["attention_mask"])


def test_unbatched_lists_tensors_truncation_and_pad(pairs):
    ref, ours = pairs["llama"]
    text = "Hello world! This is a tiny corpus"
    assert dict(ours(text)) == dict(ref(text))
    assert (
        ours(text, truncation=True, max_length=4)["input_ids"]
        == ref(text, truncation=True, max_length=4)["input_ids"]
    )
    assert (
        ours(text, return_tensors="pt")["input_ids"].shape
        == ref(text, return_tensors="pt")["input_ids"].shape
    )
    assert "attention_mask" not in ours(text, return_attention_mask=False)
    rows = {"input_ids": [[5, 6, 7], [8]]}
    ref.pad_token = ref.unk_token
    ours.pad_token = ours.unk_token
    for side in ("left", "right"):
        assert dict(ours.pad(rows, padding_side=side)) == dict(ref.pad(rows, padding_side=side))
    assert dict(ours.pad(rows, pad_to_multiple_of=4)) == dict(ref.pad(rows, pad_to_multiple_of=4))


def test_padding_errors_are_actionable(folders):
    ours = Tokenizer.from_pretrained(folders["llama"], pad_token=None)
    assert ours.pad_token is None
    with pytest.raises(ValueError, match="no pad token"):
        ours(["a", "bb cc"], padding=True)
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "bb cc dd"], return_tensors="pt")


def test_from_pretrained_overrides(folders):
    ours = Tokenizer.from_pretrained(folders["qwen2"], padding_side="left", pad_token="<|im_end|>")
    assert ours.padding_side == "left"
    assert ours.pad_token_id == ours.convert_tokens_to_ids("<|im_end|>")
    kw = {"split_special_tokens": True, "truncation_side": "left"}
    ref, ours = (
        transformers.AutoTokenizer.from_pretrained(folders["qwen2"], **kw),
        Tokenizer.from_pretrained(folders["qwen2"], **kw),
    )
    for text in TEXTS:
        assert (
            ours(text, truncation=True, max_length=5)["input_ids"]
            == ref(text, truncation=True, max_length=5)["input_ids"]
        )


def test_missing_tokenizer_json_raises(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_chat_template_sources(folders, tmp_path):
    assert Tokenizer.from_pretrained(folders["qwen2"]).chat_template == QWEN_TEMPLATE  # chat_template.jinja
    assert (
        Tokenizer.from_pretrained(folders["legacy_qwen2"]).chat_template == QWEN_TEMPLATE
    )  # tokenizer_config
    folder = tmp_path / "json_template"
    shutil.copytree(folders["llama"], folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    assert Tokenizer.from_pretrained(folder).chat_template == "{{ messages[0]['content'] }}"
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **json.loads((folder / "tokenizer_config.json").read_text()),
                "chat_template": [
                    {"name": "default", "template": "D"},
                    {"name": "tool_use", "template": "T"},
                ],
            }
        )
    )
    ours = Tokenizer.from_pretrained(folder)
    assert ours.chat_template == {"default": "D", "tool_use": "T"}
    assert ours.get_chat_template() == "D"
    assert ours.get_chat_template(tools=[{"type": "function"}]) == "T"
    assert ours.get_chat_template("tool_use") == "T"


def _plain(out):
    """Strings and lists as they are; an encoding as a dict of lists."""
    if isinstance(out, (str, list)):
        return out
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in out.items()}


@pytest.mark.parametrize("kind", ["qwen2", "legacy_qwen2", "legacy_llama"])
def test_apply_chat_template_matches(pairs, kind):
    ref, ours = pairs[kind]
    template = ref.chat_template or QWEN_TEMPLATE
    chat = [{"role": "user", "content": "Hi <image> there"}, {"role": "assistant", "content": "Hello!"}]
    batch = [chat, chat[:1]]
    for kw in (
        {},
        {"add_generation_prompt": True},
        {"tokenize": False},
        {"return_dict": False},
        {"return_tensors": "pt"},
        {"continue_final_message": True, "tokenize": False},
    ):
        r = ref.apply_chat_template(chat, chat_template=template, **kw)
        o = ours.apply_chat_template(chat, chat_template=template, **kw)
        assert _plain(o) == _plain(r)
    if ref.pad_token is not None:
        r = ref.apply_chat_template(batch, chat_template=template, padding=True, return_tensors="pt")
        o = ours.apply_chat_template(batch, chat_template=template, padding=True, return_tensors="pt")
        assert o["input_ids"].tolist() == r["input_ids"].tolist()
        assert o["attention_mask"].tolist() == r["attention_mask"].tolist()


def test_processor_bos_rule(pairs):
    """Processors add special tokens unless the rendered prompt already starts with BOS (transformers)."""
    ref, ours = pairs["legacy_llama"]
    assert ours.add_special_tokens_for_prompt("User: hi") is True
    assert ours.add_special_tokens_for_prompt(["<s>User: hi", "User: x"]) is False
    prompt = "User:<image>hi<end_of_utterance>\nAssistant:"
    add = ours.add_special_tokens_for_prompt(prompt)
    assert ours(prompt, add_special_tokens=add)["input_ids"] == ref(prompt)["input_ids"]
    assert pairs["qwen2"][1].add_special_tokens_for_prompt("<|im_start|>user") is True  # no BOS at all


@pytest.mark.parametrize("layout", ["v5", "hub"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_tokenizers_match(tmp_path, family, layout):
    """The four families' tokenizers (tests/checkpoints.py) in both folder layouts."""
    build_tokenizer(family, tmp_path)
    if layout == "hub":
        to_hub_tokenizer_layout(tmp_path)
    ref, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_ids == ref.all_special_ids
    assert (len(ours), ours.padding_side, ours.pad_token_id) == (len(ref), ref.padding_side, ref.pad_token_id)
    texts = TEXTS + ["<image>\n<IMG_START><IMG_ATOM>ok<|vision_start|><|image_pad|><|vision_end|>"]
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"]
        ids = ref(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for side in ("left", "right"):
        r = ref(texts, padding=True, truncation=True, max_length=9, padding_side=side, return_tensors="pt")
        o = ours(texts, padding=True, truncation=True, max_length=9, padding_side=side, return_tensors="pt")
        assert o["input_ids"].tolist() == r["input_ids"].tolist()
        assert o["attention_mask"].tolist() == r["attention_mask"].tolist()


def test_named_special_tokens_flagged_non_special_in_files(tmp_path):
    """transformers makes every listed special token special, whatever added_tokens_decoder says."""
    build_tokenizer("qwen2_vl", tmp_path)
    to_hub_tokenizer_layout(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for token in config["added_tokens_decoder"].values():
        if token["content"] in ("<|image_pad|>", "<|vision_start|>"):
            token["special"] = False
    config["additional_special_tokens"].remove("<|vision_start|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path)
    ids = ref("a<|vision_start|><|image_pad|>b<|im_end|>")["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert "<|vision_start|>" in ours.decode(ids, skip_special_tokens=True)


def test_setting_special_tokens(folders):
    ref = transformers.AutoTokenizer.from_pretrained(folders["llama"])
    ours = Tokenizer.from_pretrained(folders["llama"])
    ref.pad_token, ours.pad_token = ref.eos_token, ours.eos_token
    assert (ours.pad_token_id, ours.all_special_tokens) == (ref.pad_token_id, ref.all_special_tokens)
    ref.pad_token, ours.pad_token = "<pad>", "<pad>"  # not added to the vocabulary: the unk id
    assert (ours.pad_token_id, len(ours), ours.all_special_ids) == (
        ref.pad_token_id,
        len(ref),
        ref.all_special_ids,
    )
