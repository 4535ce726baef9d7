"""fastllm.save / fastllm.load: bit-identical round trips, and errors that name the file and
the tensor without leaving a half-loaded model."""

import json
import os

import pytest
import torch
from torch import nn

import fastllm
from fastllm import serialize


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.lm_head = nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.lm_head(x + self.down(torch.relu(self.up(self.norm(x)))))


def _fresh(seed=1):
    torch.manual_seed(seed)
    return Net().eval()


CASES = {
    "w8a8+smoothquant": ({"linear": "w8a8"}, True),
    "w8a16": ({"linear": "w8a16"}, False),
    "2:4 wanda": ({"linear": "2:4"}, True),
    "2:4+w8a8": ({"linear": "2:4+w8a8"}, False),
    "block": ({"linear": "block", "block_size": (32, 32), "density": 0.3}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_bit_identical(tmp_path, case):
    kwargs, calibrate = CASES[case]
    model = _fresh(0)
    x = torch.randn(3, 5, 64)
    x[..., 7] *= 30
    fastllm.optimize(model, calibration=[x] if calibrate else None, **kwargs)
    with torch.no_grad():
        ref = model(x)
    fastllm.save(model, tmp_path)
    assert (tmp_path / "fastllm.json").is_file() and (tmp_path / "model.safetensors").is_file()

    loaded = fastllm.load(_fresh(1), tmp_path)  # other random weights: all come from the file
    with torch.no_grad():
        out = loaded(x)
    assert torch.equal(out, ref)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert {e.name for e in fastllm.report(loaded).swapped} == {"up", "down"}


def test_round_trip_transformer_encoder(tmp_path):
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
    enc.eval()
    x = torch.randn(2, 7, 32)
    fastllm.optimize(enc, linear="w8a16")
    with torch.no_grad():
        ref = enc(x)
    fastllm.save(enc, tmp_path)
    fresh = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
    loaded = fastllm.load(fresh.eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_round_trip_hf_from_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 9))
    fastllm.optimize(model, linear="w8a8", calibration=[ids])
    with torch.no_grad():
        ref = model(ids).logits
    fastllm.save(model, tmp_path)
    loaded = fastllm.load(cfg, tmp_path)
    assert loaded.config._attn_implementation == "fastllm"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    meta = json.loads((tmp_path / "fastllm.json").read_text())
    assert meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def _saved(tmp_path):
    model = _fresh(0)
    fastllm.optimize(model, linear="w8a16")
    fastllm.save(model, tmp_path)
    return tmp_path / "model.safetensors", tmp_path / "fastllm.json"


def _rewrite(weights, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))


def _assert_untouched(model, before, x, ref):
    assert [type(m) for m in model.modules()] == before
    assert not hasattr(model, "_fastllm_report")
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda t: t.pop("up.weight_scale"),
            r"model.safetensors: tensor 'up.weight_scale' is missing",
        ),
        (
            lambda t: t.__setitem__("down.weight", t["down.weight"][:, :100].contiguous()),
            r"tensor 'down.weight' has shape \(64, 100\); the model expects \(64, 128\)",
        ),
        (
            lambda t: t.__setitem__("up.bias", t["up.bias"].double()),
            r"tensor 'up.bias' has dtype F64; the model expects torch.float32",
        ),
        (
            lambda t: t.__setitem__("extra.thing", torch.zeros(3)),
            r"tensor 'extra.thing' is not in the rebuilt model",
        ),
    ],
)
def test_bad_file_names_file_and_tensor(tmp_path, damage, message):
    weights, _ = _saved(tmp_path)
    _rewrite(weights, damage)
    model = _fresh(2)
    before = [type(m) for m in model.modules()]
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
    with pytest.raises(ValueError, match=message):
        fastllm.load(model, tmp_path)
    _assert_untouched(model, before, x, ref)


def test_truncated_file(tmp_path):
    weights, _ = _saved(tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    header = serialize.read_header  # the last tensor in the file is the one cut short
    model = _fresh(2)
    before = [type(m) for m in model.modules()]
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '[\w.]+' is truncated"):
        fastllm.load(model, tmp_path)
    _assert_untouched(model, before, x, ref)
    weights.write_bytes(data[:20])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated"):
        header(weights)


def test_unknown_version_and_missing_files(tmp_path):
    _, meta_path = _saved(tmp_path)
    meta = json.loads(meta_path.read_text())
    meta["version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"fastllm.json: format version 99"):
        fastllm.load(_fresh(), tmp_path)
    meta_path.unlink()
    with pytest.raises(FileNotFoundError, match="fastllm.json"):
        fastllm.load(_fresh(), tmp_path)


def test_save_needs_optimized_and_load_needs_float(tmp_path):
    with pytest.raises(ValueError, match="not optimized"):
        fastllm.save(_fresh(), tmp_path)
    _saved(tmp_path)
    model = fastllm.optimize(_fresh(), linear="w8a16")
    with pytest.raises(ValueError, match="already optimized"):
        fastllm.load(model, tmp_path)
    with pytest.raises(TypeError, match="model_or_config"):
        fastllm.load("not a model", tmp_path)


def test_load_into_other_architecture(tmp_path):
    _saved(tmp_path)
    other = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"fastllm.json: layer 'up' is not in the given"):
        fastllm.load(other, tmp_path)
    assert isinstance(other[0], nn.Linear)
