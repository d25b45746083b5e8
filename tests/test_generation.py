"""generate(), the sampler, stopping and streamers.

A tiny random decoder implementing the model contract (1-D or 3-row positions, a fake "image" input)
is checked against a naive full-recompute loop; the sampler and the streamers against transformers'
own processors and streamers; Qwen2-VL parity against transformers' generate on the tiny checkpoint.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from typing import ClassVar

import pytest
import torch
from torch import nn

from ocula.errors import ConfigError, RequestTooLargeError, UnsupportedFeatureError
from ocula.generation import (
    GenerationConfig,
    GenerationMixin,
    MaxTimeCriteria,
    StopStringCriteria,
    TextIteratorStreamer,
    TextStreamer,
)
from ocula.layers.sampler import SamplingTensors, new_seen_mask, select_tokens

VOCAB, HIDDEN, HEADS, LAYERS = 61, 32, 4, 2
IMAGE_ID, PAD_ID = 3, 0


# ----------------------------------------------------------------------------------------------------------
# A tiny decoder implementing the model contract
# ----------------------------------------------------------------------------------------------------------


class FakeCache:
    def __init__(self, batch: int, max_len: int):
        shape = (LAYERS, batch, HEADS, max_len, HIDDEN // HEADS)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D], positions [B, S]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = positions.float()[:, None, :, None] * inv_freq  # [B, 1, S, half]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class TinyDecoder(GenerationMixin, nn.Module):
    """Pre-norm decoder; `mrope=True` reports positions as 3 identical rows like Qwen2-VL's M-RoPE."""

    def __init__(self, seed: int = 0, mrope: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.mrope = mrope
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.image_proj = nn.Linear(4, HIDDEN)
        self.qkv = nn.ModuleList(nn.Linear(HIDDEN, 3 * HIDDEN) for _ in range(LAYERS))
        self.out = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, 64), nn.GELU(), nn.Linear(64, HIDDEN)) for _ in range(LAYERS)
        )
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB)
        self._redraw()
        self.generation_config = GenerationConfig()

    def _redraw(self):
        """Scaled normal weights, zero biases, a wide lm_head: varied, input-dependent greedy tokens."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1 / math.sqrt(module.in_features))
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight)
        nn.init.normal_(self.lm_head.weight)

    # -- the contract --
    def get_media_features(self, fake_pixels=None, **ignored):
        return {} if fake_pixels is None else {IMAGE_ID: self.image_proj(fake_pixels)}

    def embed_inputs(self, input_ids, media_features=None):
        embeds = self.embed(input_ids)
        for token_id, features in (media_features or {}).items():
            embeds = embeds.clone()
            embeds[input_ids == token_id] = features.to(embeds.dtype)
        return embeds

    def get_position_ids(self, input_ids, attention_mask, **media):
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        delta = positions.max(dim=-1).values + 1 - input_ids.shape[1]
        if self.mrope:
            positions = positions[None].expand(3, -1, -1)
        return positions, delta

    def new_kv_cache(self, batch_size, max_len, dtype=None, device=None):
        return FakeCache(batch_size, max_len)

    def forward_text(self, inputs_embeds, position_ids, attn):
        if self.mrope:
            assert position_ids.dim() == 3 and bool((position_ids == position_ids[0]).all())
            position_ids = position_ids[0]
        seq = inputs_embeds.shape[1]
        end = attn.start + seq
        causal = torch.ones(seq, end, dtype=torch.bool).tril(diagonal=attn.start)
        mask = causal[None] & attn.key_mask[:, None, :end]  # [B, S, start + S]

        def kv(layer, k, v):
            attn.cache.k[layer, :, :, attn.start : end] = k
            attn.cache.v[layer, :, :, attn.start : end] = v
            return attn.cache.k[layer, :, :, :end], attn.cache.v[layer, :, :, :end]

        return self._layers(inputs_embeds, position_ids, mask, kv)

    def compute_logits(self, hidden):
        return self.lm_head(self.norm(hidden))

    # -- the naive reference --
    def full_logits(self, input_ids, attention_mask):
        seq = input_ids.shape[1]
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
        hidden = self._layers(self.embed(input_ids), positions, mask, lambda layer, k, v: (k, v))
        return self.compute_logits(hidden)

    def _layers(self, x, positions, mask, kv):
        batch, seq = x.shape[:2]
        bias = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[:, None]
        for layer in range(LAYERS):
            q, k, v = self.qkv[layer](x).view(batch, seq, 3, HEADS, -1).permute(2, 0, 3, 1, 4)  # [B, H, S, D]
            k_all, v_all = kv(layer, rope(k, positions), v)
            weights = (rope(q, positions) @ k_all.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(
                -1
            )
            x = x + self.out[layer]((weights @ v_all).transpose(1, 2).reshape(batch, seq, HIDDEN))
            x = x + self.mlp[layer](x)
        return x


def naive_greedy(model, input_ids, attention_mask, max_new, eos=None, pad=PAD_ID):
    """transformers' loop without a cache: recompute everything every step."""
    ids, mask = input_ids.clone(), attention_mask.clone()
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new):
        token = model.full_logits(ids, mask)[:, -1].argmax(-1)
        if eos is not None:
            token = torch.where(unfinished, token, pad)
            unfinished &= token != eos
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if not unfinished.any():
            break
    return ids


def prompt(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, length), generator=generator)


@pytest.fixture(scope="module")
def model():
    return TinyDecoder(seed=0).eval()


# ----------------------------------------------------------------------------------------------------------
# Greedy decoding with the fake model
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mrope", [False, True])
def test_greedy_matches_full_recompute(mrope):
    model = TinyDecoder(seed=0, mrope=mrope).eval()
    ids = prompt(7)
    out = model.generate(ids, max_new_tokens=10)
    with torch.no_grad():
        expected = naive_greedy(model, ids, torch.ones_like(ids), 10)
    assert out.shape == (1, 17)
    assert torch.equal(out, expected)
    assert len(set(out[0, 7:].tolist())) > 2  # the weights are not degenerate


def test_left_padded_batch_rows_equal_single_runs(model):
    short, long = prompt(4, seed=2), prompt(7, seed=3)
    ids = torch.cat([torch.cat([torch.full((1, 3), PAD_ID), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    batch = model.generate(ids, mask, max_new_tokens=8)
    assert torch.equal(batch[0, 3:], model.generate(short, max_new_tokens=8)[0])
    assert torch.equal(batch[1], model.generate(long, max_new_tokens=8)[0])
    with torch.no_grad():
        assert torch.equal(batch, naive_greedy(model, ids, mask, 8))


def test_attention_mask_inferred_from_pad_token(model):
    short = prompt(4, seed=2)
    ids = torch.cat([torch.full((1, 2), PAD_ID), short], 1)
    inferred = model.generate(ids, max_new_tokens=5, pad_token_id=PAD_ID)
    assert torch.equal(inferred[0, 2:], model.generate(short, max_new_tokens=5)[0])


def test_media_inputs_reach_the_model(model):
    ids = prompt(6)
    ids[0, 1:3] = IMAGE_ID
    pixels = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    with_image = model.generate(ids, max_new_tokens=6, fake_pixels=pixels)
    with torch.no_grad():
        features = model.get_media_features(fake_pixels=pixels)
        embeds = model.embed_inputs(ids, features)
    assert not torch.equal(with_image, model.generate(ids, max_new_tokens=6))
    assert torch.equal(embeds[0, 1:3], features[IMAGE_ID])


def test_eos_stops_row_and_pads_with_pad_token(model):
    ids = torch.cat([prompt(5, seed=4), prompt(5, seed=6)])
    free = model.generate(ids, max_new_tokens=8)
    eos = int(free[0, 7])  # row 0 emits it by its 3rd new token
    first = free[0, 5:].tolist().index(eos)
    assert eos not in free[1, 5:].tolist() or free[1, 5:].tolist().index(eos) > first
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD_ID)
    with torch.no_grad():
        expected = naive_greedy(model, ids, torch.ones_like(ids), 8, eos=eos, pad=PAD_ID)
    assert torch.equal(out, expected)
    assert out[0, 6 + first :].eq(PAD_ID).all() and int(out[0, 5 + first]) == eos


def test_early_exit_when_all_rows_finish_and_eos_list(model):
    ids = prompt(5, seed=4)
    free = model.generate(ids, max_new_tokens=8)
    eos = int(free[0, 6])
    first = free[0, 5:].tolist().index(eos)
    out = model.generate(ids, max_new_tokens=8, eos_token_id=[VOCAB - 1, eos])
    assert torch.equal(out, free[:, : 6 + first])


def test_min_new_tokens_masks_eos(model):
    ids = prompt(5, seed=4)
    free = model.generate(ids, max_new_tokens=8)
    eos = int(free[0, 5])
    assert model.generate(ids, max_new_tokens=8, eos_token_id=eos).shape[1] == 6
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos, min_new_tokens=3)
    assert eos not in out[0, 5:8].tolist()


def test_default_max_length_is_20_new_tokens_and_model_config_applies():
    model = TinyDecoder(seed=0).eval()
    ids = prompt(5)
    assert model.generate(ids).shape == (1, 25)
    assert model.generate(ids, max_length=9).shape == (1, 9)
    model.generation_config = GenerationConfig(max_new_tokens=3)
    assert model.generate(ids).shape == (1, 8)
    assert model.generate(ids, max_new_tokens=4).shape == (1, 9)  # call time wins
    model.generation_config = GenerationConfig()
    with pytest.raises(RequestTooLargeError):
        model.generate(ids, max_length=5)


def test_return_dict_scores_and_logits(model):
    ids = prompt(6)
    out = model.generate(
        ids, max_new_tokens=4, return_dict_in_generate=True, output_scores=True, output_logits=True
    )
    assert out.sequences.shape == (1, 10) and len(out.scores) == 4 and len(out.logits) == 4
    with torch.no_grad():
        full = model.full_logits(out.sequences, torch.ones_like(out.sequences))
    for step in range(4):
        torch.testing.assert_close(out.logits[step], full[:, 5 + step], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[:, 6:], torch.stack([s.argmax(-1) for s in out.scores], 1))


def test_greedy_ignores_sampling_parameters(model):
    ids = prompt(6)
    greedy = model.generate(ids, max_new_tokens=6)
    assert torch.equal(
        greedy, model.generate(ids, max_new_tokens=6, do_sample=False, temperature=0.1, top_k=2)
    )


def test_repetition_penalty_matches_naive_reference(model):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    ids = torch.cat([torch.full((1, 2), PAD_ID), prompt(5)], 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    out = model.generate(ids, mask, max_new_tokens=6, repetition_penalty=1.7)
    processor = RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=torch.tensor([2]))
    seq, m = ids.clone(), mask.clone()
    with torch.no_grad():
        for _ in range(6):
            token = processor(seq, model.full_logits(seq, m)[:, -1].float()).argmax(-1)
            seq, m = torch.cat([seq, token[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(out, seq)
    assert not torch.equal(out, model.generate(ids, mask, max_new_tokens=6))


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------


def _transformers_warpers(temperature, top_k, top_p, penalty, ignore):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    return LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=ignore),
            TemperatureLogitsWarper(temperature),
            TopKLogitsWarper(top_k),
            TopPLogitsWarper(top_p),
        ]
    )


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.9), (1.3, 5, 1.0), (1.0, 0, 0.5)])
def test_sampler_equals_transformers_processors(temperature, top_k, top_p):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(3, VOCAB, generator=generator) * 3
    input_ids = torch.randint(0, VOCAB, (3, 9), generator=generator)
    ignore = torch.tensor([0, 2, 4])
    params = SamplingTensors.uniform(
        3, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=1.3
    )
    seen = new_seen_mask(input_ids, VOCAB, ignore)
    tokens, scores = select_tokens(logits, params, seen, torch.Generator().manual_seed(11))
    processors = _transformers_warpers(temperature, top_k or VOCAB, top_p, 1.3, ignore)
    expected = processors(input_ids, logits.clone())
    assert torch.equal(scores, expected)
    expected_tokens = torch.multinomial(expected.softmax(-1), 1, generator=torch.Generator().manual_seed(11))
    assert torch.equal(tokens, expected_tokens[:, 0])
    assert (scores == float("-inf")).any()


def test_sampler_per_row_generators_equal_single_rows():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(9))
    params = SamplingTensors.uniform(2, do_sample=True, temperature=2.0)
    tokens, _ = select_tokens(logits, params, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    for row, seed in enumerate((1, 2)):
        single, _ = select_tokens(
            logits[row : row + 1], params, generator=torch.Generator().manual_seed(seed)
        )
        assert int(tokens[row]) == int(single[0])


def test_sampler_per_row_parameters_equal_single_rows():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(8)) * 3
    rows = [
        {"do_sample": True, "temperature": 0.5, "top_k": 7, "top_p": 0.8},
        {"do_sample": False, "temperature": 0.5},
        {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    ]
    _, scores = select_tokens(logits, SamplingTensors.from_rows(rows))
    for i, row in enumerate(rows):
        _, single = select_tokens(logits[i : i + 1], SamplingTensors.from_rows([row]))
        assert torch.equal(scores[i : i + 1], single)


def test_sampling_with_seed_is_reproducible_and_uses_global_rng_like_transformers(model):
    ids = prompt(6)
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "top_k": 0}
    first = model.generate(ids, seed=123, **kwargs)
    assert torch.equal(first, model.generate(ids, seed=123, **kwargs))
    assert not torch.equal(first, model.generate(ids, seed=124, **kwargs))
    torch.manual_seed(123)
    assert torch.equal(first, model.generate(ids, **kwargs))
    generator = torch.Generator().manual_seed(123)
    assert torch.equal(first, model.generate(ids, generator=generator, **kwargs))


def test_num_return_sequences(model):
    ids = torch.cat([prompt(5, seed=2), prompt(5, seed=3)])
    out = model.generate(ids, max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=0, top_k=0)
    assert out.shape == (6, 10)
    assert torch.equal(out[:3, :5], ids[:1].expand(3, -1)) and torch.equal(out[3:, :5], ids[1:].expand(3, -1))
    assert len({tuple(row) for row in out[:3, 5:].tolist()}) > 1
    with pytest.raises(ConfigError, match="do_sample"):
        model.generate(ids, max_new_tokens=5, num_return_sequences=2)


def test_invalid_options_raise_typed_errors(model):
    ids = prompt(4)
    with pytest.raises(ConfigError, match="temperature"):
        model.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(UnsupportedFeatureError, match="num_beams"):
        model.generate(ids, max_new_tokens=2, num_beams=4)
    with pytest.raises(ConfigError, match="tokenizer"):
        model.generate(ids, max_new_tokens=2, stop_strings=["x"])


# ----------------------------------------------------------------------------------------------------------
# Generation config
# ----------------------------------------------------------------------------------------------------------


def test_generation_config_from_file_and_priority(tmp_path):
    data = {
        "do_sample": True,
        "temperature": 0.01,
        "top_k": 1,
        "eos_token_id": [5, 6],
        "transformers_version": "x",
    }
    (tmp_path / "generation_config.json").write_text(json.dumps(data))
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config.do_sample and config.eos_ids() == [5, 6] and config.top_p is None
    assert config.extra == {"transformers_version": "x"} and config.transformers_version == "x"
    assert GenerationConfig.from_pretrained(tmp_path / "missing").to_dict() == {}
    model = TinyDecoder(seed=0).eval()
    model.generation_config = config
    ids = prompt(5)
    # top_k=1 from the file: sampling is greedy in effect; do_sample=False at call time is greedy too.
    greedy = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=5, seed=3), greedy)
    assert torch.equal(
        model.generate(ids, generation_config=GenerationConfig(max_new_tokens=5), seed=3), greedy
    )


# ----------------------------------------------------------------------------------------------------------
# Stop strings, max_time, streamers (a character tokenizer: one id per character)
# ----------------------------------------------------------------------------------------------------------


class CharTokenizer:
    """Token i decodes to PIECES[i]."""

    PIECES: ClassVar[list[str]] = [
        "<pad>",
        "a",
        "b",
        " ",
        "st",
        "op",
        "opera",
        "las",
        "topper",
        "stop",
        "at",
        "\n",
        "好",
        "x",
    ]

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        pieces = [self.PIECES[i] for i in ids]
        if skip_special_tokens:
            pieces = [p for p in pieces if p != "<pad>"]
        return "".join(pieces)

    def encode(self, pieces):
        return [self.PIECES.index(p) for p in pieces]


@pytest.mark.parametrize(
    "pieces,expected",
    [
        (["st", "op"], True),
        (["stop"], True),
        (["st", "opera"], True),
        (["las", "topper"], True),
        (["x", "stop"], True),
        (["stop", "at"], False),
        (["st", "op", "at"], False),
        (["st", "opera", "at"], False),
        (["a", "b"], False),
    ],
)
def test_stop_string_matches_like_transformers(pieces, expected):
    tokenizer = CharTokenizer()
    criterion = StopStringCriteria(tokenizer, ["stop", "zz"])
    ids = torch.tensor([tokenizer.encode(["a"] * 3 + pieces)])
    assert bool(criterion(ids)[0]) is expected


def test_stop_strings_in_generate(model):
    ids = prompt(5, seed=4)
    free = model.generate(ids, max_new_tokens=8)

    class IdTokenizer:  # each id decodes to "<id>", so a stop string can name a token pair
        def decode(self, ids, **kwargs):
            return "".join(f"<{i}>" for i in ids)

    pair = free[0, 6:8].tolist()
    end = next(j for j in range(5, 8) if free[0, j - 1 : j + 1].tolist() == pair)
    out = model.generate(
        ids, max_new_tokens=8, stop_strings=f"<{pair[0]}><{pair[1]}>", tokenizer=IdTokenizer()
    )
    assert torch.equal(out, free[:, : end + 1])


def test_max_time_and_user_stopping_criteria(model):
    ids = prompt(5)
    out = model.generate(
        ids, max_new_tokens=8, stopping_criteria=[MaxTimeCriteria(0.0, initial_timestamp=0.0)]
    )
    assert out.shape == (1, 6)
    out = model.generate(ids, max_new_tokens=8, stopping_criteria=lambda seq, scores: seq.shape[1] >= 8)
    assert out.shape == (1, 8)
    assert model.generate(ids, max_new_tokens=8, max_time=0.0).shape == (1, 6)


STREAM_STEPS = [[1, 3], [4], [5], [3], [12], [2], [11], [4], [6], [3, 1]]


def _stream(streamer_cls, **kwargs) -> list[str]:
    released = []

    class Capture(streamer_cls):
        def on_finalized_text(self, text, stream_end=False):
            released.append((text, stream_end))

    streamer = Capture(CharTokenizer(), **kwargs)
    streamer.put(torch.tensor([[1, 2, 3]]))
    for step in STREAM_STEPS:
        streamer.put(torch.tensor(step))
    streamer.end()
    return released


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_text_streamer_releases_like_transformers(skip_prompt):
    from transformers.generation.streamers import TextStreamer as HFTextStreamer

    assert _stream(TextStreamer, skip_prompt=skip_prompt) == _stream(HFTextStreamer, skip_prompt=skip_prompt)


def test_text_streamer_prints_and_iterator_streamer_iterates():
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        streamer = TextStreamer(CharTokenizer(), skip_prompt=True)
        streamer.put(torch.tensor([[1]]))
        for step in STREAM_STEPS:
            streamer.put(torch.tensor(step))
        streamer.end()
    expected = CharTokenizer().decode([i for step in STREAM_STEPS for i in step])
    assert buffer.getvalue() == expected + "\n"
    iterator = TextIteratorStreamer(CharTokenizer(), skip_prompt=True, timeout=5)
    iterator.put(torch.tensor([[1]]))
    for step in STREAM_STEPS:
        iterator.put(torch.tensor(step))
    iterator.end()
    assert "".join(iterator) == expected


def test_generate_streams_prompt_then_each_token(model):
    ids = prompt(5)
    puts = []

    class Recorder(TextStreamer):
        def put(self, value):
            puts.append(value.clone())

        def end(self):
            puts.append("end")

    out = model.generate(ids, max_new_tokens=4, streamer=Recorder(None))
    assert torch.equal(puts[0], ids) and puts[-1] == "end"
    assert [int(p) for p in puts[1:-1]] == out[0, 5:].tolist()


# ----------------------------------------------------------------------------------------------------------
# The real tokenizer of the tiny Qwen2-VL checkpoint: stop strings and streamers against transformers
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(qwen2_vl_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen2_vl_ckpt))


def test_stop_strings_equal_transformers_criterion(hf_tokenizer):
    from transformers.generation.stopping_criteria import StopStringCriteria as HFStopStringCriteria

    stops = [" the", "ca", "e.", "ou", "s a"]
    text = "The cat sat on the mat and looked out of the window at the birds. Could you see a car? ouch"
    plain_vocab = len(hf_tokenizer) - len(hf_tokenizer.added_tokens_decoder)
    random_ids = torch.randint(0, plain_vocab, (6, 25), generator=torch.Generator().manual_seed(0))
    rows = [torch.tensor([hf_tokenizer.encode(text)])] + list(random_ids.split(1))
    ours, theirs = StopStringCriteria(hf_tokenizer, stops), HFStopStringCriteria(hf_tokenizer, stops)
    hits = 0
    for row in rows:
        for end in range(1, row.shape[1] + 1):
            expected = bool(theirs(row[:, :end], None)[0])
            assert bool(ours(row[:, :end])[0]) is expected, hf_tokenizer.decode(row[0, :end])
            hits += expected
    assert hits >= 10


def test_text_streamer_with_real_tokenizer_equals_transformers(hf_tokenizer):
    from transformers.generation.streamers import TextStreamer as HFTextStreamer

    ids = hf_tokenizer.encode("Hello, how are you today?\nI am fine, thank you. The cat sat on the mat.")

    def released(cls):
        out = []

        class Capture(cls):
            def on_finalized_text(self, text, stream_end=False):
                out.append(text)

        streamer = Capture(hf_tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.put(torch.tensor([ids[:3]]))
        for token in ids[3:]:
            streamer.put(torch.tensor([token]))
        streamer.end()
        return out

    assert released(TextStreamer) == released(HFTextStreamer)


# ----------------------------------------------------------------------------------------------------------
# Qwen2-VL: ocula's generate against transformers' generate on the tiny checkpoint
# ----------------------------------------------------------------------------------------------------------


class HFContract(GenerationMixin):
    """transformers' Qwen2-VL behind ocula's model contract, recomputing the whole sequence every step.

    Checks generate() itself (positions after media, rope delta, padding, stopping, RNG use) against
    transformers' generate while ocula's own model is not at hand; the "cache" keeps embeddings and
    positions instead of keys and values.
    """

    def __init__(self, hf):
        self.hf, self.generation_config = hf, hf.generation_config.to_dict()

    def get_media_features(self, pixel_values=None, image_grid_thw=None, **ignored):
        if pixel_values is None:
            return {}
        features = self.hf.model.get_image_features(pixel_values, image_grid_thw).pooler_output
        return {self.hf.config.image_token_id: torch.cat(features)}

    def embed_inputs(self, input_ids, media_features=None):
        embeds = self.hf.model.get_input_embeddings()(input_ids)
        for token_id, features in (media_features or {}).items():
            embeds = embeds.masked_scatter((input_ids == token_id)[..., None], features)
        return embeds

    def get_position_ids(
        self, input_ids, attention_mask, image_grid_thw=None, mm_token_type_ids=None, **ignored
    ):
        if image_grid_thw is not None:
            positions, _ = self.hf.model.get_rope_index(
                input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
            )
        else:
            positions = (
                (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[None].repeat(3, 1, 1)
            )
        # The token at cache index S (the first generated one) continues after the largest position.
        delta = positions.amax(dim=(0, 2)) + 1 - input_ids.shape[1]
        return positions, delta

    def new_kv_cache(self, batch_size, max_len, dtype=None, device=None):
        hidden = self.hf.config.text_config.hidden_size
        return {
            "embeds": torch.zeros(batch_size, max_len, hidden),
            "positions": torch.zeros(3, batch_size, max_len),
        }

    def forward_text(self, inputs_embeds, position_ids, attn):
        end = attn.start + inputs_embeds.shape[1]
        attn.cache["embeds"][:, attn.start : end] = inputs_embeds
        attn.cache["positions"][:, :, attn.start : end] = position_ids
        out = self.hf.model.language_model(
            inputs_embeds=attn.cache["embeds"][:, :end],
            position_ids=attn.cache["positions"][:, :, :end].long(),
            attention_mask=attn.key_mask[:, :end].long(),
        )
        return out.last_hidden_state[:, attn.start : end]

    def compute_logits(self, hidden):
        return self.hf.lm_head(hidden)


@pytest.fixture(scope="module")
def qwen_parts(qwen2_vl_ckpt):
    from tests.checkpoints import hf_model, hf_processor

    processor = hf_processor(qwen2_vl_ckpt)
    processor.tokenizer.padding_side = "left"
    return hf_model(qwen2_vl_ckpt), processor


@pytest.fixture(scope="module", params=["transformers_behind_contract", "ocula"])
def qwen(request, qwen2_vl_ckpt, qwen_parts):
    """(model under test, transformers model, transformers processor) on the same tiny checkpoint."""
    theirs, processor = qwen_parts
    if request.param == "ocula":
        modeling = pytest.importorskip("ocula.models.qwen2_vl.modeling")
        ours = modeling.Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_ckpt, dtype=torch.float32)
    else:
        ours = HFContract(theirs)
    return ours, theirs, processor


def _messages(text: str, image: bool) -> list[dict]:
    from tests.checkpoints import make_image

    content = ([{"type": "image", "image": make_image(64, 48, seed=3)}] if image else []) + [
        {"type": "text", "text": text}
    ]
    return [{"role": "user", "content": content}]


def _inputs(processor, conversations: list[list[dict]]):
    return processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True},
    )  # fmt: skip


def _both(qwen, inputs, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    ours, theirs, _ = qwen
    torch.manual_seed(0)
    expected = theirs.generate(**inputs, **kwargs)
    torch.manual_seed(0)
    return ours.generate(**inputs, **kwargs), expected


@pytest.mark.parametrize("image", [False, True])
def test_qwen2_vl_greedy_equals_transformers(qwen, image):
    inputs = _inputs(qwen[2], [_messages("Describe this image in one sentence.", image)])
    ours, expected = _both(qwen, inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, expected)


def test_qwen2_vl_left_padded_batch_rows_equal_single_runs(qwen):
    conversations = [
        _messages("What is shown?", True),
        _messages("Hello, how are you today? Count them.", False),
    ]
    inputs = _inputs(qwen[2], conversations)
    ours, expected = _both(qwen, inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, expected)
    for row, conversation in enumerate(conversations):
        single = _inputs(qwen[2], [conversation])
        alone = qwen[0].generate(**single, max_new_tokens=10, do_sample=False)
        width = alone.shape[1]
        generated = ours[row, inputs["input_ids"].shape[1] :]
        assert torch.equal(
            generated[: width - single["input_ids"].shape[1]], alone[0, single["input_ids"].shape[1] :]
        )


def test_qwen2_vl_sampling_equals_transformers_with_the_same_seed(qwen):
    inputs = _inputs(qwen[2], [_messages("What is shown?", True)])
    kwargs = {"max_new_tokens": 10, "do_sample": True, "temperature": 1.3, "top_k": 40, "top_p": 0.95}
    ours, expected = _both(qwen, inputs, **kwargs)
    assert torch.equal(ours, expected)
    assert torch.equal(
        qwen[0].generate(**inputs, seed=5, **kwargs), qwen[0].generate(**inputs, seed=5, **kwargs)
    )


def test_qwen2_vl_stop_strings_and_eos_equal_transformers(qwen):
    ours_model, _, processor = qwen
    inputs = _inputs(processor, [_messages("Describe this image in one sentence.", True)])
    free = ours_model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)
    new_text = processor.tokenizer.decode(free[0, inputs["input_ids"].shape[1] :])
    stop = new_text[len(new_text) // 2 : len(new_text) // 2 + 2]
    kwargs = {
        "max_new_tokens": 12,
        "do_sample": False,
        "stop_strings": [stop],
        "tokenizer": processor.tokenizer,
    }
    ours, expected = _both(qwen, inputs, **kwargs)
    assert torch.equal(ours, expected) and ours.shape[1] < free.shape[1]
    eos = int(free[0, -4])
    ours, expected = _both(qwen, inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, expected)


def test_qwen2_vl_streamer_and_scores(qwen):
    ours_model, theirs, processor = qwen
    inputs = _inputs(processor, [_messages("What is shown?", True)])
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, timeout=30)
    out = ours_model.generate(
        **inputs, max_new_tokens=8, do_sample=False, streamer=streamer, return_dict_in_generate=True,
        output_scores=True, output_logits=True,
    )  # fmt: skip
    prompt_len = inputs["input_ids"].shape[1]
    assert "".join(streamer) == processor.tokenizer.decode(out.sequences[0, prompt_len:])
    expected = theirs.generate(
        **inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True,
        output_logits=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected.sequences)
    for ours_step, their_step in zip(out.logits, expected.logits, strict=True):
        torch.testing.assert_close(ours_step, their_step, rtol=1e-4, atol=1e-4)


def test_qwen2_vl_video_generate_equals_own_full_forward(qwen_parts, qwen2_vl_ckpt):
    """After a video ocula's M-RoPE positions follow the original Qwen2-VL (not transformers 5.23), so the
    decode positions (cache index + delta) are checked against ocula's own full-sequence forward instead."""
    modeling = pytest.importorskip("ocula.models.qwen2_vl.modeling")
    from tests.checkpoints import make_video_frames

    model = modeling.Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_ckpt, dtype=torch.float32)
    processor = qwen_parts[1]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    frames = make_video_frames(8, 56, 56)  # grid (4, 4, 4): t > h / merge, where the two rules differ
    inputs = dict(processor(text=[text], videos=[frames], return_tensors="pt"))
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    seq, eos = dict(inputs), model.generation_config.eos_ids()
    with torch.no_grad():
        for _ in range(6):
            token = (
                model(**seq)
                .logits[:, -1]
                .index_fill(-1, torch.tensor(eos), -math.inf)
                .argmax(-1, keepdim=True)
            )
            seq["input_ids"] = torch.cat([seq["input_ids"], token], 1)
            for key in ("attention_mask", "mm_token_type_ids"):
                seq[key] = torch.cat([seq[key], torch.full_like(seq[key][:, :1], key == "attention_mask")], 1)
    assert torch.equal(out, seq["input_ids"])


def test_generate_refuses_a_misspelled_keyword(qwen2_vl_ckpt):
    """A typo must not be swallowed as a 'media input' (transformers raises on unused model kwargs too)."""
    from ocula import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(qwen2_vl_ckpt)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ConfigError, match="max_new_token"):
        model.generate(ids, max_new_token=3)
