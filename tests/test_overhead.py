"""What keeps a call cheap (fastllm/ops/_eager.py, the choice cache of fastllm/backend.py)
changes no result and no error: checks cached per call signature still raise for every
bad argument, value checks run on every call, the direct path gives what the dispatcher
gives and steps aside wherever the dispatcher does more (autograd, profiler, dispatch
modes, compile), and a decode step still compiles, and on a GPU replays in a CUDA graph."""

import importlib
from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICE, rel_err

import fastllm
from fastllm import backend, ops
from fastllm.ops import _eager

int8_ops = importlib.import_module("fastllm.ops.int8")
attention_ops = importlib.import_module("fastllm.ops.attention")


def _weight(N=24, K=40, device="cpu"):
    return ops.quantize_per_channel(torch.randn(N, K, device=device))


def _cache(B=2, S=16, H=2, D=16, dtype=torch.float32):
    return torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, S, H, D, dtype=dtype)


def _error(call) -> tuple[type, str]:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return info.type, str(info.value)


# --- cached checks: the same errors, on every call -----------------------------------------


def test_bad_argument_after_a_good_call_of_the_same_shape_still_raises():
    w, s = _weight()
    x = torch.randn(3, 40)
    q = torch.randn(2, 1, 4, 16)
    kc, vc = _cache()
    lens = torch.tensor([5, 9])
    kn = torch.randn(2, 1, 2, 16)
    pos = torch.tensor([3, 4])
    good = [
        lambda: ops.int8_dynamic_linear(x, w, s),
        lambda: ops.int8_weight_only_linear(x, w, s),
        lambda: ops.decode_attention(q, kc, vc, lens),
        lambda: ops.decode_attention(q, kc, vc, lens, num_splits=1),
        lambda: ops.decode_attention(q, kc, vc, lens, window=(1, 0)),
        lambda: ops.kv_cache_append(kn, kn, kc, vc, pos),
    ]
    # each like one of the good calls but for one dtype, stride, type (1 for True, True for
    # 1: equal in Python, so a cache keyed on values alone would let them through) or value
    bad = {
        "w_scale has dtype torch.float16": lambda: ops.int8_dynamic_linear(x, w, s.half()),
        "x has dtype torch.int8": lambda: ops.int8_weight_only_linear(x.to(torch.int8), w, s),
        "w_int8 has dtype torch.float32": lambda: ops.int8_weight_only_linear(x, w.float(), s),
        "causal must be a bool": lambda: ops.decode_attention(q, kc, vc, lens, causal=1),
        "num_splits must be an int": lambda: ops.decode_attention(q, kc, vc, lens, num_splits=True),
        "window left bound must be an int": lambda: ops.decode_attention(
            q, kc, vc, lens, window=(True, 0)
        ),
        "expected a unit stride on head_dim": lambda: ops.kv_cache_append(
            kn, kn, kc, torch.randn(2, 16, 2, 32)[..., ::2], pos
        ),
        # value checks read the values on every call
        "cache_seqlens[1] = 17 is outside": lambda: ops.decode_attention(
            q, kc, vc, torch.tensor([5, 17])
        ),
        "slot_mapping_or_positions[0] = 16": lambda: ops.kv_cache_append(
            kn, kn, kc, vc, torch.tensor([16, 4])
        ),
    }
    for call in good:
        call()
    for expected, call in bad.items():
        first = _error(call)
        assert expected in first[1], (expected, first)
        for call_again in good:
            call_again()
        assert _error(call) == first  # and again, after the good calls: same error


def _inputs():
    w, s = _weight()
    kc, vc = _cache()
    return SimpleNamespace(
        x=torch.randn(3, 40),
        w=w,
        s=s,
        q=torch.randn(2, 1, 4, 16),
        kc=kc,
        vc=vc,
        lens=torch.tensor([5, 9]),
        kn=torch.randn(2, 1, 2, 16),
        pos=torch.tensor([3, 4]),
    )


# op, its bad positional arguments, and its cached check with the rest of the public
# function's defaults
CHECKED = {
    "int8_dynamic_linear": (int8_ops._check_dynamic, (None, None)),
    "int8_weight_only_linear": (int8_ops._check_weight_only, (None,)),
    "int8_linear": (int8_ops._check_int8_linear, (None,)),
    "decode_attention": (attention_ops._check_decode, (None, None, True, None, None, None)),
    "kv_cache_append": (attention_ops._check_append, (None,)),
}


@pytest.mark.parametrize(
    "op, bad",
    [
        ("int8_dynamic_linear", lambda t: (t.x, t.w, t.s.double())),
        ("int8_dynamic_linear", lambda t: (t.x, t.w[:, :39], t.s)),
        ("int8_weight_only_linear", lambda t: (t.x, t.w, t.s[:5])),
        ("int8_linear", lambda t: (t.x.to(torch.int8), t.s[:2], t.w, t.s)),
        ("decode_attention", lambda t: (t.q, t.kc, t.vc[:, :8], t.lens)),
        ("decode_attention", lambda t: (t.q, t.kc, t.vc, t.lens[:1])),
        ("kv_cache_append", lambda t: (t.kn, t.kn[:1], t.kc, t.vc, t.pos)),
    ],
)
def test_cached_checks_raise_what_the_checks_raise(op, bad):
    t = _inputs()
    errors = [_error(lambda: getattr(ops, op)(*bad(t))) for _ in range(3)]
    assert errors[0] == errors[1] == errors[2]
    cached, defaults = CHECKED[op]
    assert _error(lambda: cached.__wrapped__(*bad(t), *defaults)) == errors[0]


def test_checks_are_run_once_per_signature(monkeypatch):
    calls = []
    real = int8_ops._check_weight

    def counting(*args):  # the check inside int8_weight_only_linear's cached one
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(int8_ops, "_check_weight", counting)
    int8_ops._check_weight_only.cache_clear()
    w, s = _weight()
    for _ in range(3):
        ops.int8_weight_only_linear(torch.randn(3, 40), w, s)
    assert len(calls) == 1
    ops.int8_weight_only_linear(torch.randn(4, 40), w, s)  # a new shape: checked
    ops.int8_weight_only_linear(torch.randn(3, 40).half(), w, s)  # a new dtype: checked
    assert len(calls) == 3
    int8_ops._check_weight_only.cache_clear()


def test_check_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_eager, "CACHE_SIZE", 4)
    w, s = _weight()
    for m in range(1, 12):
        ops.int8_weight_only_linear(torch.randn(m, 40), w, s)
    assert ops.int8_weight_only_linear(torch.randn(2, 40), w, s).shape == (2, 24)
    with pytest.raises(TypeError, match="w_scale has dtype"):
        ops.int8_weight_only_linear(torch.randn(2, 40), w, s.half())


# --- the direct path: the dispatcher's result, and the dispatcher wherever it does more ------


def _op_calls():
    w, s = _weight()
    x = torch.randn(3, 40)
    q = torch.randn(2, 1, 4, 16)
    kc, vc = _cache()
    lens = torch.tensor([5, 9])
    return {
        "quantize_per_token": lambda: ops.quantize_per_token(x),
        "int8_linear": lambda: ops.int8_linear(*ops.quantize_per_token(x), w, s, out_dtype="fp32"),
        "int8_dynamic_linear": lambda: ops.int8_dynamic_linear(x, w, s),
        "int8_weight_only_linear": lambda: ops.int8_weight_only_linear(x, w, s),
        "decode_attention": lambda: ops.decode_attention(q, kc, vc, lens),
        "attention": lambda: ops.attention(q, kc, vc, causal=True),
    }


def test_direct_path_gives_the_dispatcher_result(monkeypatch):
    calls = _op_calls()
    direct = {name: call() for name, call in calls.items()}
    monkeypatch.setattr(_eager, "_DIRECT", False)
    for name, call in calls.items():
        torch.testing.assert_close(call(), direct[name], rtol=0, atol=0, msg=name)


def test_direct_path_is_taken_in_eager_mode_only():
    x = torch.randn(2, 8)
    assert _eager.direct(x, None)
    assert not _eager.direct(None)
    assert not _eager.direct(torch.empty(2, device="meta"))
    assert not _eager.direct(torch.nn.Parameter(torch.randn(2)))  # requires grad
    with torch.no_grad():
        assert _eager.direct(torch.nn.Parameter(torch.randn(2)))
    assert not _eager.direct(torch.randn(3).to_sparse())
    with torch.profiler.profile():
        assert not _eager.direct(x)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert not _eager.direct(x)
    inside = []
    torch.vmap(lambda t: inside.append(_eager.direct(t)) or t)(torch.randn(2, 3))
    assert inside == [False]
    with torch.inference_mode():
        assert _eager.direct(x)


def test_dispatch_modes_and_the_profiler_still_see_the_fastllm_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    calls = _op_calls()
    with Log():
        for call in calls.values():
            call()
    for name in calls:
        assert any(f"fastllm.{name}" in f for f in seen), (name, seen)
    with torch.profiler.profile() as prof:
        calls["int8_dynamic_linear"]()
    assert any("fastllm::int8_dynamic_linear" in e.key for e in prof.key_averages())


def test_inputs_that_require_grad_keep_the_custom_op_error():
    w, s = _weight()
    x = torch.randn(3, 40, requires_grad=True)
    y = ops.int8_weight_only_linear(x, w, s)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        y.sum().backward()


def test_kv_cache_append_bumps_the_version_counters():
    kc, vc = _cache()
    k_version, v_version = kc._version, vc._version
    kn = torch.randn(2, 1, 2, 16)
    ops.kv_cache_append(kn, kn, kc, vc, torch.tensor([3, 4]))
    assert kc._version > k_version and vc._version > v_version
    torch.testing.assert_close(kc[0, 3], kn[0, 0], rtol=0, atol=0)
    with torch.inference_mode():
        ki, vi = _cache()
        ops.kv_cache_append(kn, kn, ki, vi, torch.tensor([3, 4]))  # no version counter
    torch.testing.assert_close(ki[1, 4], kn[1, 0], rtol=0, atol=0)


# --- a decode step: compiled with warm caches, and in a CUDA graph -------------------------


def _decode_step(layer, q, k_new, v_new, kc, vc, positions, lens):
    # q: [B, 1, Hq, D]; k_new/v_new: [B, 1, Hkv, D]; caches [B, S, Hkv, D]
    ops.kv_cache_append(k_new, v_new, kc, vc, positions)
    out = ops.decode_attention(q, kc, vc, lens)
    return layer(out.flatten(2))  # [B, 1, Hq * D] -> [B, 1, out_features]


def _decode_inputs(B, S, Hq, Hkv, D, dtype, device):
    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    q, k_new, v_new = rand(B, 1, Hq, D), rand(B, 1, Hkv, D), rand(B, 1, Hkv, D)
    kc, vc = rand(B, S, Hkv, D), rand(B, S, Hkv, D)
    positions = torch.randint(0, S - 1, (B,), device=device, dtype=torch.int32)
    return q, k_new, v_new, kc, vc, positions, positions + 1


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_decode_step_compiles_fullgraph_with_warm_caches(mode):
    from fastllm.nn import Int8Linear

    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(4 * 16, 24), mode=mode)
    inputs = _decode_inputs(2, 12, 4, 2, 16, torch.float32, "cpu")
    eager_caches = [t.clone() for t in inputs[3:5]]
    step = lambda *a: _decode_step(layer, *a)  # noqa: E731
    with torch.no_grad():
        eager = step(*inputs[:3], *eager_caches, *inputs[5:])  # the caches are now warm
        compiled = torch.compile(step, fullgraph=True, backend="eager")(*inputs)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(inputs[3], eager_caches[0], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_decode_step_replays_in_a_cuda_graph(mode):
    # kv_cache_append + decode_attention + Int8Linear, captured once, replayed with new
    # inputs: each replay matches an eager step on copies of the same caches
    from fastllm.nn import Int8Linear

    torch.manual_seed(0)
    B, S, Hq, Hkv, D = 4, 256, 8, 2, 64
    dtype = torch.bfloat16
    layer = Int8Linear.from_linear(torch.nn.Linear(Hq * D, 512), mode=mode).to(DEVICE, dtype)
    static = _decode_inputs(B, S, Hq, Hkv, D, dtype, DEVICE)
    caches = static[3:5]
    with torch.no_grad():
        # warm-up on a side stream (Triton compiles, the caches fill), as capture wants
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                _decode_step(layer, *static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with backend.trace() as captured, torch.cuda.graph(graph):
            out = _decode_step(layer, *static)
        for _ in range(3):
            new = _decode_inputs(B, S, Hq, Hkv, D, dtype, DEVICE)
            before = [c.clone() for c in caches]
            for dst, src in zip(static[:3] + static[5:], new[:3] + new[5:]):
                dst.copy_(src)
            graph.replay()
            ref = _decode_step(layer, *static[:3], *before, *static[5:])
            torch.cuda.synchronize()
            assert rel_err(out, ref) < 2e-2
            for c, b in zip(caches, before):
                torch.testing.assert_close(c, b, rtol=0, atol=0)  # the replay appended the same
    assert {op for op, _ in captured} == {
        "kv_cache_append",
        "decode_attention",
        "int8_dynamic_linear" if mode == "w8a8" else "int8_weight_only_linear",
    }


# --- threads: one cache, each context its own forcing ------------------------------------------


def test_threads_share_the_caches_but_not_the_forcing():
    import threading

    w, s = _weight()
    barrier = threading.Barrier(4)
    seen, errors = {}, []

    def work(i):
        try:
            name = ("reference", "torch", None, None)[i]
            x = torch.randn(3, 40)
            barrier.wait()
            for _ in range(20):
                with fastllm.use_backend(name):
                    out = ops.int8_weight_only_linear(x, w, s)
                    got = fastllm.last_backend("int8_weight_only_linear")
                    if name is not None and got != name:
                        errors.append((i, got))
            seen[i] = (got, out)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert seen[0][0] == "reference" and seen[1][0] == "torch"
    assert (
        seen[2][0]
        == seen[3][0]
        == backend.select(
            "int8_weight_only_linear", torch.device("cpu"), torch.randn(3, 40), w, s, None
        )
    )
