"""Checkpoint resolution, lazy safetensors (single and sharded) and strict weight loading."""

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ocula.errors import CheckpointNotFoundError, ConfigError, WeightsError
from ocula.loading import SafetensorsCheckpoint, load_weights, read_json, resolve_checkpoint


class Rotary(nn.Module):
    def __init__(self, dim: int = 4):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)

    def _init_non_persistent(self, device):
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))


class Tiny(nn.Module):
    def __init__(self, tie_in_init: bool = False):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.rotary = Rotary()
        self.register_buffer("steps", torch.zeros(3, dtype=torch.long))
        self.head = nn.Linear(4, 10, bias=False)
        if tie_in_init:
            self.head.weight = self.embed.weight


def weights(gen_seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(gen_seed)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),
        "proj.weight": torch.randn(4, 4, generator=g),
        "proj.bias": torch.randn(4, generator=g),
        "steps": torch.tensor([1, 2, 3]),
        "head.weight": torch.randn(10, 4, generator=g),
    }


def meta_model(**kw) -> Tiny:
    with torch.device("meta"):
        return Tiny(**kw)


def write(folder, tensors, shards: int = 1):
    folder.mkdir(exist_ok=True)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names, weight_map = list(tensors), {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shards", [1, 3])
def test_checkpoint_keys_shapes_get(tmp_path, shards):
    w = weights()
    ckpt = SafetensorsCheckpoint(write(tmp_path / "m", w, shards))
    assert sorted(ckpt.keys()) == sorted(w)
    assert ckpt.shape("proj.weight") == (4, 4)
    torch.testing.assert_close(ckpt.get("head.weight"), w["head.weight"], rtol=0, atol=0)


def test_any_single_safetensors_file(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "m" / "weights.safetensors"))
    assert SafetensorsCheckpoint(tmp_path / "m").keys() == ["a"]


def test_load_sharded_exact_values_and_init_hook(tmp_path):
    w = weights()
    model = meta_model()
    report = load_weights(model, SafetensorsCheckpoint(write(tmp_path / "m", w, 2)))
    state = model.state_dict()
    for k, v in w.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert model.steps.dtype == torch.long
    expected = 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4))
    torch.testing.assert_close(model.rotary.inv_freq, expected)
    assert sorted(report.loaded) == sorted(w)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def test_dtype_bf16_keeps_integer_buffers(tmp_path):
    w = weights()
    model = meta_model()
    load_weights(model, SafetensorsCheckpoint(write(tmp_path / "m", w)), dtype=torch.bfloat16)
    assert model.proj.weight.dtype == torch.bfloat16 and isinstance(model.proj.weight, nn.Parameter)
    torch.testing.assert_close(model.proj.weight, w["proj.weight"].to(torch.bfloat16), rtol=0, atol=0)
    assert model.steps.dtype == torch.long


def test_tied_weights_share_one_parameter(tmp_path):
    w = weights()
    del w["head.weight"]
    model = meta_model()
    ckpt = SafetensorsCheckpoint(write(tmp_path / "m", w))
    report = load_weights(model, ckpt, tied={"head.weight": "embed.weight"})
    assert model.head.weight is model.embed.weight
    assert report.tied == ["head.weight"]
    assert len(list(model.parameters())) == 3  # no duplicated tensor


def test_tied_at_construction_follow_the_loaded_tensor(tmp_path):
    w = weights()
    del w["head.weight"]
    model = meta_model(tie_in_init=True)
    load_weights(model, SafetensorsCheckpoint(write(tmp_path / "m", w)))
    assert model.head.weight is model.embed.weight
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_tied_dst_present_in_checkpoint_is_kept(tmp_path):
    w = weights()
    model = meta_model()
    load_weights(model, SafetensorsCheckpoint(write(tmp_path / "m", w)), tied={"head.weight": "embed.weight"})
    assert model.head.weight is not model.embed.weight
    torch.testing.assert_close(model.head.weight, w["head.weight"], rtol=0, atol=0)


def test_rename_rules_apply_in_order_and_ignore(tmp_path):
    w = {("old." + k if "." in k else k): v for k, v in weights().items()}
    w["old.rotary.inv_freq"] = torch.ones(2)
    model = meta_model()
    rename = [(r"^old\.", "mid."), (r"^mid\.proj\.", "proj."), (r"^mid\.", "")]
    report = load_weights(
        model, SafetensorsCheckpoint(write(tmp_path / "m", w)), rename=rename, ignore=[r"inv_freq$"]
    )
    assert report.ignored == ["old.rotary.inv_freq"]
    torch.testing.assert_close(model.proj.bias, weights()["proj.bias"], rtol=0, atol=0)


class CountingCheckpoint:
    """Records every tensor handed out, to check that loading keeps no second copy alive."""

    def __init__(self, inner):
        self.inner, self.handed_out, self.reads = inner, [], []

    def __iter__(self):
        return iter(self.inner.keys())

    def shape(self, key):
        return self.inner.shape(key)

    def get(self, key):
        self.reads.append(key)
        tensor = self.inner.get(key)
        self.handed_out.append(weakref.ref(tensor))
        return tensor


def test_one_read_per_key_and_no_second_copy_kept(tmp_path):
    model = meta_model()
    ckpt = CountingCheckpoint(SafetensorsCheckpoint(write(tmp_path / "m", weights())))
    load_weights(model, ckpt, dtype=torch.bfloat16)
    gc.collect()
    assert sorted(ckpt.reads) == sorted(weights())
    # the float32 originals were converted and dropped; only the int buffer (not cast) is still alive
    alive = [ref() for ref in ckpt.handed_out if ref() is not None]
    assert len(alive) == 1 and alive[0] is model.steps
    assert len({p.data_ptr() for p in model.parameters()}) == 4


def test_missing_unexpected_misshapen_are_reported(tmp_path):
    w = weights()
    del w["proj.bias"]
    w["head.weight"] = torch.randn(9, 4)
    w["extra.weight"] = torch.randn(2)
    model = meta_model()
    with pytest.raises(WeightsError) as info:
        load_weights(model, SafetensorsCheckpoint(write(tmp_path / "m", w)))
    err = info.value
    assert "proj.bias" in err.missing and "head.weight" in err.missing
    assert err.unexpected == ["extra.weight"]
    assert err.mismatched == ["head.weight: checkpoint (9, 4) vs model (10, 4)"]
    assert "(9, 4)" in str(err) and "extra.weight" in str(err)


def test_long_error_lists_are_truncated():
    model = meta_model()
    with pytest.raises(WeightsError) as info:
        load_weights(model, {f"junk.{i}": torch.zeros(1) for i in range(50)})
    assert "and 38 more" in str(info.value) and len(info.value.unexpected) == 50


def test_no_weights_and_missing_shard(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="No safetensors"):
        SafetensorsCheckpoint(tmp_path / "empty")
    folder = write(tmp_path / "m", weights(), 2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00002"):
        SafetensorsCheckpoint(folder)


def test_corrupt_safetensors_is_typed(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="corrupt"):
        SafetensorsCheckpoint(tmp_path / "m")


def test_read_json(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "bad.json").write_text('{"a": ')
    assert read_json(tmp_path, "config.json") == {"a": 1}
    assert read_json(tmp_path, "absent.json") is None
    with pytest.raises(ConfigError, match="bad.json"):
        read_json(tmp_path, "bad.json")


def test_resolve_local_and_typos(tmp_path, monkeypatch):
    assert resolve_checkpoint(tmp_path) == tmp_path
    assert resolve_checkpoint(str(tmp_path)) == tmp_path
    with pytest.raises(CheckpointNotFoundError, match="typos"):
        resolve_checkpoint(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="folder"):
        resolve_checkpoint(tmp_path / "f.json")


def test_resolve_hub_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="not in the local hub cache"):
        resolve_checkpoint("ocula-test/definitely-not-cached", cache_dir=tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="not in the local hub cache"):
        monkeypatch.delenv("HF_HUB_OFFLINE")
        resolve_checkpoint("ocula-test/definitely-not-cached", cache_dir=tmp_path, local_files_only=True)


def test_resolve_hub_id_from_cache(tmp_path):
    # A hub cache laid out as huggingface_hub writes it: refs/main -> snapshots/<commit>/
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snap / "config.json").write_text("{}")
    assert resolve_checkpoint("org/tiny", cache_dir=tmp_path, local_files_only=True) == snap


def test_resolve_without_huggingface_hub(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(CheckpointNotFoundError, match="pip install huggingface_hub"):
        resolve_checkpoint("org/not-a-folder")
