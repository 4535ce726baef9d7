"""`fastllm.optimize(model, fuse=True)` (fastllm/fusion.py, fastllm/nn/fused.py): the fused
modules against the unfused ones on BERT-, GPT-2- and Llama-type models, the patterns that
must not match, state_dict, save/load, undo, training mode and torch.compile."""

import copy

import pytest
import torch
from conftest import rel_err, tiny_bert
from torch import nn

import fastllm
from fastllm import nn as fnn
from fastllm.nn.fused import (
    FusedDenseAct,
    FusedDenseResidualNorm,
    FusedGatedMLP,
    FusedMLP,
    FusedRMSNorm,
)

transformers = pytest.importorskip("transformers")


def _ids(vocab=100, shape=(3, 9), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _bert():
    return tiny_bert()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _pair(make, **kw):
    """(unfused, fused) w8a8 copies of the same float model, calibrated alike."""
    base = make()
    calib = [{"input_ids": _ids(seed=1)}]
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    fastllm.optimize(plain, linear="w8a8", calibration=calib, **kw)
    fastllm.optimize(fused, linear="w8a8", calibration=calib, fuse=True, **kw)
    return plain, fused


def _entries(model, kind):
    return {e.name: e for e in fastllm.report(model).layers if e.kind == kind}


def _out(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --- the patterns on real model structures --------------------------------------------------


def test_bert_blocks_fused_and_output_unchanged():
    plain, fused = _pair(_bert)
    layer = fused.encoder.layer[0]
    assert type(layer.intermediate) is FusedDenseAct and layer.intermediate.activation == "gelu"
    assert type(layer.output) is FusedDenseResidualNorm
    assert type(layer.attention.output) is FusedDenseResidualNorm
    assert type(layer.output.LayerNorm) is nn.LayerNorm  # one PyTorch kernel already
    ids = _ids()
    assert rel_err(_out(fused, ids), _out(plain, ids)) <= 1e-5
    fused_entries = _entries(fused, "fused")
    assert fused_entries["encoder.layer.1.intermediate"].action == "swapped"
    assert fused_entries["encoder.layer.1.intermediate"].reason == "gelu in the epilogue"
    # the pooler's tanh is not an epilogue activation; the attention projections are
    # called one by one by the attention code: both stay, with the reason
    assert "Tanh" in fused_entries["pooler"].reason
    assert fused_entries["encoder.layer.0.attention.self"].action == "skipped"
    rep = fastllm.report(fused)
    assert rep.options["fuse"] is True
    assert fused_entries["encoder.layer.0.output"].backend in ("cpu", "torch")
    assert fused_entries["pooler"].backend is None


def test_llama_gated_mlp_and_rms_norms():
    plain, fused = _pair(_llama)
    mlp = fused.model.layers[0].mlp
    assert type(mlp) is FusedGatedMLP and mlp.activation == "silu"
    assert mlp.roles["gate"] == "gate_proj" and mlp.roles["up"] == "up_proj"
    assert type(fused.model.layers[0].input_layernorm) is FusedRMSNorm
    assert type(fused.model.norm) is FusedRMSNorm
    # the children's buffers are views of the concatenated ones
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == (
        mlp.gate_up_weight.untyped_storage().data_ptr()
    )
    ids = _ids()
    assert rel_err(_out(fused, ids), _out(plain, ids)) <= 1e-4
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(plain.generate(ids, **gen), fused.generate(ids, **gen))


def test_gpt2_mlp_quantizes_for_the_next_gemm():
    plain, fused = _pair(_gpt2)
    mlp = fused.transformer.h[0].mlp
    assert type(mlp) is FusedMLP and mlp.activation == "gelu_tanh"  # gelu_new
    assert mlp.roles == {"up": "c_fc", "act": "act", "down": "c_proj"}
    ids = _ids()
    assert rel_err(_out(fused, ids), _out(plain, ids)) <= 1e-4


def test_state_dict_unchanged_by_fusion():
    plain, fused = _pair(_llama)
    a, b = plain.state_dict(), fused.state_dict()
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


def test_loading_into_the_children_updates_the_fused_gemm():
    plain, fused = _pair(_llama)
    other_plain, _ = _pair(_llama)
    with torch.no_grad():  # a different model: every int8 weight changed
        for m in other_plain.modules():
            if isinstance(m, fnn.Int8Linear):
                m.weight.copy_(torch.randint(-127, 128, m.weight.shape, dtype=torch.int8))
                m.weight_scale.mul_(1.5)
    fused.load_state_dict(other_plain.state_dict())
    ids = _ids()
    assert rel_err(_out(fused, ids), _out(other_plain, ids)) <= 1e-4
    moved = copy.deepcopy(fused).to("cpu", torch.float32)  # moved: the views are built again
    mlp = moved.model.layers[1].mlp
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == (
        mlp.gate_up_weight.untyped_storage().data_ptr()
    )
    assert mlp.gate_up_weight_scale.dtype == torch.float32
    assert rel_err(_out(moved, ids), _out(other_plain, ids)) <= 1e-4


def test_norms_only_without_int8_linears():
    base = _llama()
    model = fastllm.optimize(copy.deepcopy(base), fuse=True)
    assert type(model.model.layers[0].input_layernorm) is FusedRMSNorm
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert any("norms are fused" in n for n in fastllm.report(model).notes)
    ids = _ids()
    assert rel_err(_out(model, ids), _out(base, ids)) <= 1e-5
    w16 = fastllm.optimize(copy.deepcopy(_bert()), linear="w8a16", fuse=True)
    assert type(w16.encoder.layer[0].intermediate) is not FusedDenseAct
    reasons = [e.reason for e in _entries(w16, "fused").values() if e.action == "skipped"]
    assert reasons and all("w8a8" in r for r in reasons)


def test_filter_fn_and_keyword_calls():
    base = _bert()
    model = fastllm.optimize(
        copy.deepcopy(base),
        linear="w8a8",
        fuse=True,
        filter_fn=lambda name, m: not name.endswith("attention.output"),
    )
    entries = _entries(model, "fused")
    assert entries["encoder.layer.0.attention.output"].reason == "filtered out by filter_fn"
    out = model.encoder.layer[0].output
    h, r = torch.randn(2, 5, 112), torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(out(h, r), out(hidden_states=h, input_tensor=r))
        assert torch.equal(out(h, input_tensor=r), out(h, r))


def test_training_mode_runs_the_original_container():
    _, fused = _pair(_bert)
    block = fused.encoder.layer[0].output
    h, r = torch.randn(2, 5, 112), torch.randn(2, 5, 64)
    fused.train()
    assert block.training and block.dropout.training
    torch.manual_seed(3)
    with torch.no_grad():
        got = block(h, r)
    torch.manual_seed(3)
    with torch.no_grad():
        want = block.original(h, r)
    assert torch.equal(got, want)


def test_calling_again_keeps_the_fused_modules():
    _, fused = _pair(_llama)
    names = [e.name for e in fastllm.report(fused).layers if e.kind in ("fused", "norm")]
    fastllm.optimize(fused, linear="w8a8", fuse=True)
    again = [e.name for e in fastllm.report(fused).layers if e.kind in ("fused", "norm")]
    assert again == names  # recorded once
    assert type(fused.model.layers[0].mlp) is FusedGatedMLP
    # a model fused by another route (no report entries yet): its fused modules are "kept"
    fresh = copy.deepcopy(fused)
    del fresh._fastllm_report
    fastllm.optimize(fresh, fuse=True)
    kept = {e.kind for e in fastllm.report(fresh).layers if e.action == "kept"}
    assert kept >= {"fused", "norm"}


def test_error_while_fusing_restores_the_model():
    base = _llama()
    calib = [{"input_ids": _ids(seed=1)}]
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(name, m):
        if name == "model.layers.1.mlp":
            raise RuntimeError("no")
        return True

    with pytest.raises(RuntimeError, match="model.layers.1.mlp"):
        fastllm.optimize(model, linear="w8a8", calibration=calib, fuse=True, filter_fn=boom)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert type(model.model.layers[0].mlp.gate_proj) is nn.Linear
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


# --- save / load ----------------------------------------------------------------------------


def test_save_and_load_rebuild_the_fused_modules(tmp_path):
    plain, fused = _pair(_llama)
    fastllm.save(fused, tmp_path)
    loaded = fastllm.load(_llama(), tmp_path)
    assert type(loaded.model.layers[0].mlp) is FusedGatedMLP
    assert type(loaded.model.norm) is FusedRMSNorm
    ids = _ids()
    assert torch.equal(_out(loaded, ids), _out(fused, ids))


def test_save_pretrained_round_trip(tmp_path):
    _, fused = _pair(_bert)
    fused.save_pretrained(tmp_path)
    loaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    assert type(loaded.encoder.layer[0].intermediate) is FusedDenseAct
    assert loaded.config.quantization_config.fuse is True
    ids = _ids()
    assert torch.equal(_out(loaded, ids), _out(fused, ids))


def test_from_pretrained_with_fuse(tmp_path):
    base = _llama()
    base.save_pretrained(tmp_path)
    cfg = fastllm.hf.FastllmConfig(linear="w8a8", fuse=True, calibration=[_ids(seed=1)])
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    assert type(model.model.layers[0].mlp) is FusedGatedMLP
    with pytest.raises(ValueError, match="fuse must be True or False"):
        fastllm.hf.FastllmConfig(fuse="yes")


# --- fewer launches per decode step ----------------------------------------------------------


@pytest.mark.skipif(
    fastllm.backend.unavailable_reason("triton", torch.device("cpu")) is not None,
    reason="the triton backend (interpreter) is not available",
)
def test_decode_step_launches_per_layer():
    """One decode step of a 2-layer Llama on the triton backend: what a GPU would launch in
    a decoder layer (fastllm/bench/bench_launches.py), w8a8 without and with fuse."""
    from fastllm.bench.bench_launches import decode_step_launches

    cpu = torch.device("cpu")
    plain = decode_step_launches(2, False, cpu)
    fused = decode_step_launches(2, True, cpu)
    # each RMSNorm (pow, mean, add, rsqrt, mul, casts) becomes one kernel; the MLP's gate and
    # up GEMMs become one, with silu and the product in its epilogue
    assert fused["triton:_norm_kernel"] == 5 and plain["aten:rsqrt"] == 5
    assert fused["aten:rsqrt"] == 0 and fused["aten:silu"] == 0 and plain["aten:silu"] == 2
    assert fused["triton:_int8_dynamic_linear_kernel"] == 2
    assert plain["triton:_int8_dynamic_linear_kernel"] == 4
    assert fused["launches"] <= plain["launches"] - 2 * 12, (plain["launches"], fused["launches"])
