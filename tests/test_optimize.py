"""fastllm.optimize on plain PyTorch models: the module swap, its rules, the report."""

import pytest
import torch
from conftest import cpu_default, rel_err
from torch import nn

import fastllm
from fastllm.optimize import LINEAR_KINDS, LINEAR_OPTIONS, FusedTransformerEncoderLayer


class MLP(nn.Module):
    def __init__(self, d=64, hidden=128, out=32):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, d)
        self.lm_head = nn.Linear(d, out, bias=False)

    def forward(self, x):
        return self.lm_head(x + self.down(self.act(self.up(x))))


def _swapped(model):
    return {e.name: e.after for e in fastllm.report(model).swapped}


@pytest.mark.parametrize(
    "kind, cls, max_err",
    [
        ("w8a8", "Int8Linear", 0.05),
        ("w8a16", "Int8Linear", 0.01),
        ("2:4", "Sparse24Linear", None),
        ("block", "BlockSparseLinear", None),
        ("2:4+w8a8", "Sparse24Linear", None),
    ],
)
def test_mlp_linear_kinds(kind, cls, max_err):
    model = MLP().eval()
    x = torch.randn(3, 7, 64)
    ref = model(x)
    opts = {"block_size": (32, 32)} if kind == "block" else {}
    out_model = fastllm.optimize(model, linear=kind, **opts)
    assert out_model is model
    assert _swapped(model) == {"up": cls, "down": cls}
    assert isinstance(model.lm_head, nn.Linear)  # kept in float by default
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if max_err is not None:
        assert rel_err(out, ref) < max_err
    rep = fastllm.report(model)
    served = {e.name: e.backend for e in rep.layers}
    expected = cpu_default("int8_dynamic_linear") if kind == "w8a8" else "torch"
    assert served["up"] == expected and served["down"] == expected
    skipped = {e.name: e.reason for e in rep.skipped}
    assert "kept in float" in skipped["lm_head"]
    assert "no calibration batches" in rep.calibration or kind == "w8a16"


def test_sparse_layers_are_sparse():
    model = MLP().eval()
    fastllm.optimize(model, linear="block", block_size=(32, 32), density=0.25)
    assert model.up.density == pytest.approx(0.25)
    fastllm.optimize(m2 := MLP().eval(), linear="2:4")
    w = m2.up.values  # (out, in/2): half the weights are stored
    assert w.shape == (128, 32)


def test_skip_filter_and_unsupported_shape():
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.Linear(64, 64))
    fastllm.optimize(
        model,
        linear="block",
        block_size=(64, 64),
        skip=("3",),
        filter_fn=lambda name, m: name != "2",
    )
    rep = fastllm.report(model)
    reasons = {e.name: e.reason for e in rep.skipped}
    assert "shape unsupported" in reasons["0"]  # 96 is not a multiple of 64
    assert reasons["2"] == "filtered out by filter_fn"
    assert "kept in float" in reasons["3"]
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2, 3))


def test_idempotent():
    model = MLP().eval()
    x = torch.randn(2, 5, 64)
    fastllm.optimize(model, linear="w8a16")
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    modules = [type(m) for m in model.modules()]
    with torch.no_grad():
        first = model(x)
    fastllm.optimize(model, linear="w8a16")
    assert [type(m) for m in model.modules()] == modules
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(state[k], after[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(x), first)
    rep = fastllm.report(model)
    assert {e.name for e in rep.layers if e.action == "swapped"} == {"up", "down"}
    assert any("called again" in n for n in rep.notes)
    assert any("no float linear layer left" in n for n in rep.notes)
    assert rep.calibration == "w8a16 needs no calibration"


def test_nothing_to_swap():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    assert fastllm.optimize(model, linear="w8a8") is model
    rep = fastllm.report(model)
    assert rep.layers == []
    assert any("nothing to swap" in n for n in rep.notes)


def test_bad_options():
    with pytest.raises(ValueError, match="density") as e:
        fastllm.optimize(MLP(), linear="block", densty=0.3)
    for name in LINEAR_OPTIONS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="w8a8") as e:
        fastllm.optimize(MLP(), linear="int4")
    for kind in LINEAR_KINDS:
        assert kind in str(e.value)
    with pytest.raises(ValueError, match="density"):
        fastllm.optimize(MLP(), linear="block", density=1.5)
    with pytest.raises(ValueError, match="linear=None"):
        fastllm.optimize(MLP(), density=0.3)
    with pytest.raises(ValueError, match="backend"):
        fastllm.optimize(MLP(), backend="gpu")
    with pytest.raises(ValueError, match="calibration"):
        fastllm.optimize(MLP(), linear="w8a8", smoothquant=True)
    with pytest.raises(ValueError, match="not optimized"):
        fastllm.report(MLP())


def test_linear_config_object():
    cfg = fastllm.LinearConfig("block", density=0.5, block_size=(32, 32))
    model = MLP().eval()
    fastllm.optimize(model, linear=cfg)
    assert model.up.block_size == (32, 32)


def test_calibration_smoothquant_and_wanda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(4, 16, 64)
    x[..., 3] *= 40  # an outlier channel
    ref = model(x)
    fastllm.optimize(model, linear="w8a8", calibration=[x[:2], x[2:]])
    rep = fastllm.report(model)
    assert "SmoothQuant" in rep.calibration and "2 batches" in rep.calibration
    with torch.no_grad():
        assert rel_err(model(x), ref) < 0.05

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    fastllm.optimize(model, linear="2:4", calibration=[x])
    rep = fastllm.report(model)
    assert "Wanda" in rep.calibration and rep.options["method"] == "wanda"


def test_force_backend():
    model = MLP().eval()
    fastllm.optimize(model, linear="w8a16", backend="reference")
    with fastllm.backend.trace() as calls, torch.no_grad():
        model(torch.randn(2, 64))
    assert calls and {b for _, b in calls} == {"reference"}
    assert fastllm.backend.forced_backend() is None  # restored after the forward


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_attention(batch_first):
    layer = nn.TransformerEncoderLayer(64, 4, 96, dropout=0.0, batch_first=batch_first)
    enc = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(3, 11, 64) if batch_first else torch.randn(11, 3, 64)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[0, 8:] = True
    pad[2, 5:] = True
    with torch.no_grad():
        ref = enc(x)
        ref_pad = enc(x, src_key_padding_mask=pad)
        fastllm.optimize(enc)
        with fastllm.backend.trace() as calls:
            out = enc(x)
        out_pad = enc(x, src_key_padding_mask=pad)
    assert ("attention", "torch") in calls  # dense batches: SDPA in one call
    served = {e.name: e.backend for e in fastllm.report(enc).layers if e.kind == "attention"}
    assert served == {f"layers.{i}.self_attn": "PyTorch SDPA (masked path)" for i in (0, 1)}
    with torch.no_grad():
        enc(x)
    served = {e.name: e.backend for e in fastllm.report(enc).layers if e.kind == "attention"}
    assert served == {f"layers.{i}.self_attn": "attention:torch" for i in (0, 1)}
    assert all(isinstance(m, FusedTransformerEncoderLayer) for m in enc.layers)
    assert type(enc.layers[0].self_attn).__name__ == "FusedMultiheadAttention"
    assert rel_err(out, ref) < 1e-5
    valid = ~pad if batch_first else ~pad.T
    assert rel_err(out_pad[valid], ref_pad[valid]) < 1e-5


def test_encoder_linear_only_skips_fast_path():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 1)
    enc.eval()
    x = torch.randn(2, 9, 64)
    ref = enc(x)
    fastllm.optimize(enc, attention=False, linear="w8a16")
    with fastllm.backend.trace() as calls, torch.no_grad():
        out = enc(x)
    assert ("int8_weight_only_linear", "torch") in calls
    assert rel_err(out, ref) < 0.02


def test_multihead_attention_module():
    mha = nn.MultiheadAttention(48, 6, batch_first=True).eval()
    model = nn.ModuleDict({"attn": mha})
    q = torch.randn(2, 10, 48)
    ref, _ = mha(q, q, q, need_weights=False)
    fastllm.optimize(model)
    out, _ = model["attn"](q, q, q, need_weights=False)
    assert rel_err(out, ref) < 1e-5
    assert _swapped(model) == {"attn": "FusedMultiheadAttention"}


def test_compile_fullgraph_encoder():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2)
    enc.eval()
    fastllm.optimize(enc, linear="w8a16")
    x = torch.randn(2, 9, 64)
    torch._dynamo.reset()
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), enc(x))


# --- all or nothing: a failure leaves the model as it was ------------------------------------


class NormMLP(nn.Module):
    """LayerNorm -> up -> GELU -> down (+ residual) -> lm_head: SmoothQuant folds into `norm`."""

    def __init__(self, d=64, hidden=128, out=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.lm_head = nn.Linear(d, out, bias=False)

    def forward(self, x):
        return self.lm_head(x + self.down(nn.functional.gelu(self.up(self.norm(x)))))


def _state(model):
    """What a failed optimize must leave unchanged: module types, parameters and buffers
    (bitwise), training flags and hooks of every module, the report."""
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "hooks": [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()],
        "report": getattr(model, "_fastllm_report", None),
    }


def _assert_unchanged(model, before, x):
    after = _state(model)
    assert after["types"] == before["types"]
    assert list(after["tensors"]) == list(before["tensors"])
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["report"] is before["report"]
    with torch.no_grad():
        assert torch.equal(model(x), before["output"])


def _snapshot(model, x):
    state = _state(model)
    with torch.no_grad():
        state["output"] = model(x)
    return state


@pytest.mark.parametrize(
    "kind, cls, calibrate",
    [
        ("w8a8", "Int8Linear", True),  # SmoothQuant rescaled norm and weights in place
        ("w8a16", "Int8Linear", False),
        ("2:4", "Sparse24Linear", True),
        ("block", "BlockSparseLinear", False),
    ],
)
def test_error_building_one_layer_restores_model(monkeypatch, kind, cls, calibrate):
    model = NormMLP().eval()
    x = torch.randn(2, 5, 64)
    x[..., 3] *= 30  # an outlier channel: SmoothQuant moves it into the weights
    before = _snapshot(model, x)
    module = getattr(fastllm.nn, cls)
    build = module.from_linear.__func__
    built = []

    def from_linear(klass, linear, **kw):  # the second layer ("down") fails
        built.append(linear)
        if len(built) == 2:
            raise RuntimeError("injected")
        return build(klass, linear, **kw)

    monkeypatch.setattr(module, "from_linear", classmethod(from_linear))
    opts = {"block_size": (32, 32)} if kind == "block" else {}
    with pytest.raises(RuntimeError) as e:
        fastllm.optimize(model, linear=kind, calibration=[x] if calibrate else None, **opts)
    msg = str(e.value)
    assert msg.startswith(f"fastllm.optimize failed at layer 'down' (building {cls} {kind}): ")
    assert "RuntimeError: injected" in msg and "left as it was" in msg
    assert str(e.value.__cause__) == "injected"
    _assert_unchanged(model, before, x)


def test_error_in_calibration_forward_restores_model():
    model = NormMLP().train()
    model.up.eval()  # mixed training flags (optimize runs the model in eval mode) come back
    x = torch.randn(2, 5, 64)
    before = _snapshot(model, x)
    bad = torch.randn(2, 5, 48)  # the wrong width: fails in the first layer, `norm`
    with pytest.raises(RuntimeError, match=r"at layer 'norm' \(calibration forward pass for "
                       "SmoothQuant\\): RuntimeError: "):  # fmt: skip
        fastllm.optimize(model, linear="w8a8", calibration=[x, bad])
    _assert_unchanged(model, before, x)


class _RefusesDown(nn.Module):
    """A model whose __setattr__ refuses a fastllm module for `down`: a failure in the
    middle of swapping, after `attn` and `up` were swapped."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def __setattr__(self, name, value):
        if name == "down" and type(value).__module__.startswith("fastllm"):
            raise TypeError("down must stay a torch.nn.Linear")
        super().__setattr__(name, value)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.down(torch.relu(self.up(h)))


def test_error_while_swapping_restores_model():
    model = _RefusesDown().eval()
    x = torch.randn(2, 6, 64)
    before = _snapshot(model, x)
    with pytest.raises(RuntimeError) as e:
        fastllm.optimize(model, linear="w8a16")
    assert str(e.value).startswith(
        "fastllm.optimize failed at layer 'down' (swapping in Int8Linear): "
        "TypeError: down must stay a torch.nn.Linear"
    )
    assert isinstance(e.value.__cause__, TypeError)
    _assert_unchanged(model, before, x)


def test_error_in_encoder_step_restores_model_and_its_report(monkeypatch):
    """A model optimized once (attention), then a second optimize failing at its last step
    (the encoder-layer guard): swaps, use_nested_tensor and the first report come back."""
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2, enable_nested_tensor=True
    ).eval()
    enc.use_nested_tensor = True
    fastllm.optimize(enc, attention=False, linear="w8a16", skip=("linear1", "linear2"),
                     backend="torch")  # fmt: skip
    rep = fastllm.report(enc)
    notes, layers = list(rep.notes), list(rep.layers)
    hooks = enc._fastllm_backend_hooks
    x = torch.randn(2, 7, 64)
    before = _snapshot(enc, x)
    nested = enc.use_nested_tensor

    def fail(layer):
        raise RuntimeError("injected")

    monkeypatch.setattr(FusedTransformerEncoderLayer, "from_layer", fail)
    with pytest.raises(
        RuntimeError, match=r"at layer 'layers.0' \(swapping in FusedTransformerEncoderLayer\)"
    ):
        fastllm.optimize(enc, linear="w8a16", backend="reference")
    _assert_unchanged(enc, before, x)
    assert enc.use_nested_tensor == nested
    assert fastllm.report(enc).notes == notes and fastllm.report(enc).layers == layers
    assert enc._fastllm_backend_hooks is hooks


def test_calibration_unused_is_reported():
    x = torch.randn(2, 5, 64)
    cases = [
        ({"linear": "w8a16"}, "w8a16 needs no calibration: the calibration batches were not used"),
        ({"linear": "w8a8", "smoothquant": False}, "smoothquant=False"),
        ({"linear": "2:4", "method": "magnitude"}, "method='magnitude'"),
        ({"linear": None}, "linear=None"),
    ]
    for opts, says in cases:
        model = fastllm.optimize(MLP().eval(), calibration=[x], **opts)
        calibration = fastllm.report(model).calibration
        assert says in calibration and calibration.endswith("the calibration batches were not used")
    model = fastllm.optimize(MLP().eval(), linear="w8a8", calibration=[x])
    assert "not used" not in fastllm.report(model).calibration


# --- transformers models -------------------------------------------------------------------


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def test_calibration_with_tokenizer_batch_encoding():
    """A tokenizer's output (BatchEncoding: a Mapping, not a dict) is passed as model(**batch)."""
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama()
    ids = torch.randint(3, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    assert not isinstance(batch, dict)
    with torch.no_grad():
        ref = model(**batch).logits
    fastllm.optimize(model, linear="w8a8", calibration=[batch])
    rep = fastllm.report(model)
    assert "SmoothQuant" in rep.calibration and "1 batches" in rep.calibration
    assert _swapped(model)["model.layers.0.mlp.down_proj"] == "Int8Linear"
    with torch.no_grad():
        out = model(**batch).logits
    assert rel_err(out[0], ref[0]) < 0.1 and rel_err(out[1, 3:], ref[1, 3:]) < 0.1


def test_hf_error_in_calibration_restores_attention_and_conv1d():
    """GPT-2: its attention implementation is switched and its Conv1D layers become
    nn.Linear before calibration; a batch that fails brings both back."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 128, (2, 8))
    before = _state(model)
    with torch.no_grad():
        before["output"] = model(input_ids=ids).logits
    attn = model.config._attn_implementation
    bad = {"input_ids": torch.full((1, 4), 500)}  # out of the vocabulary: fails in `wte`
    with pytest.raises(RuntimeError) as e:
        fastllm.optimize(model, linear="w8a8", calibration=[{"input_ids": ids}, bad])
    assert str(e.value).startswith(
        "fastllm.optimize failed at layer 'transformer.wte' (calibration forward pass for "
        "SmoothQuant): IndexError: "
    )
    assert model.config._attn_implementation == attn != "fastllm"
    assert all(
        model.config._attn_implementation == m.config._attn_implementation
        for m in model.modules() if hasattr(m, "config")
    )  # fmt: skip
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    after = _state(model)
    assert after["types"] == before["types"] and after["hooks"] == before["hooks"]
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before["output"])
