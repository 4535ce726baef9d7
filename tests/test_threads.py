"""fastllm called from several threads at once, as a server does: every op gives each
thread what a serial call gives, `last_backend` and `trace` see only their own thread,
the native module loads once however many threads ask for it first, and calls of the
triton backend never overlap.

The Triton interpreter (TRITON_INTERPRET=1, the triton backend on a CPU) is not
thread-safe by itself: the op tests run the reference, torch and cpu backends only, and
one test runs interpreted Triton from several threads on purpose, to check that fastllm
serializes its triton calls.
"""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import HAS_GPU, available_backends

import fastllm
from fastllm import backend
from fastllm.sparse import compress_24, prune, to_block_sparse

THREADS = 8
ROUNDS = 3  # calls per thread: each thread's calls interleave with the others'
CPU = torch.device("cpu")
NOT_TRITON = ("reference", "torch", "cpu")


def _in_threads(work, n: int = THREADS) -> list:
    """work(i) in n threads started together; their results, or the first error raised."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def run(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# --- every op, 8 threads, against serial calls --------------------------------------------------


def _linear_inputs(i: int, N: int = 24, K: int = 64):
    x = torch.randn(3 + i, K)
    w = torch.randn(N, K)
    w_int8, w_scale = fastllm.ops.quantize_per_channel(w)
    return x, w, w_int8, w_scale, torch.randn(N)


def _quantize_per_token(i):
    return fastllm.ops.quantize_per_token, (torch.randn(5 + i, 40),), {}


def _quantize_per_channel(i):
    return fastllm.ops.quantize_per_channel, (torch.randn(24, 33 + i),), {}


def _int8_linear(i):
    x, _, w_int8, w_scale, bias = _linear_inputs(i)
    x_int8, x_scale = fastllm.ops.quantize_per_token(x)
    args = (x_int8, x_scale, w_int8, w_scale, bias)
    return fastllm.ops.int8_linear, args, {"out_dtype": torch.float32}


def _int8_dynamic_linear(i):
    x, _, w_int8, w_scale, bias = _linear_inputs(i)
    return fastllm.ops.int8_dynamic_linear, (x, w_int8, w_scale, bias), {}


def _int8_weight_only_linear(i):
    x, _, w_int8, w_scale, bias = _linear_inputs(i)
    return fastllm.ops.int8_weight_only_linear, (x, w_int8, w_scale, bias), {}


def _sparse24_linear(i):
    x, w, _, _, bias = _linear_inputs(i)
    values, metadata = compress_24(w, prune(w))
    return fastllm.ops.sparse24_linear, (x, values, metadata, bias), {}


def _block_sparse_linear(i):
    x, w, _, _, bias = _linear_inputs(i)
    bsw = to_block_sparse(w, prune(w, "block", block_size=(8, 16), density=0.5), (8, 16))
    return fastllm.ops.block_sparse_linear, (x, bsw, bias), {}


def _attention(i):
    q, k, v = (
        torch.randn(2, 7 + i, 4, 16),
        torch.randn(2, 9 + i, 2, 16),
        torch.randn(2, 9 + i, 2, 16),
    )
    return fastllm.ops.attention, (q, k, v), {"causal": True}


def _attention_varlen(i):
    lengths = torch.tensor([0, 3 + i, 1, 6])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, h, 16) for h in (4, 2, 2))
    kw = dict(causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    return fastllm.ops.attention, (q, k, v), kw


def _decode_attention(i):
    q = torch.randn(3, 1, 4, 16)
    k, v = torch.randn(3, 20, 2, 16), torch.randn(3, 20, 2, 16)
    seqlens = torch.tensor([5 + i, 20, 1], dtype=torch.int32)
    return fastllm.ops.decode_attention, (q, k, v, seqlens), {}


def _decode_attention_paged(i):
    q = torch.randn(2, 2, 4, 16)
    k, v = torch.randn(6, 4, 2, 16), torch.randn(6, 4, 2, 16)
    table = torch.tensor([[5, 0, 3], [1, 4, 2]], dtype=torch.int32)
    seqlens = torch.tensor([9 + i % 3, 4], dtype=torch.int32)
    return fastllm.ops.decode_attention, (q, k, v, seqlens), {"block_table": table}


def _kv_cache_append(i):
    k_cache, v_cache = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    k_new, v_new = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    positions = torch.tensor([i, 9 - i], dtype=torch.int64)

    def append(k_new, v_new, k_cache, v_cache, positions):
        k_cache, v_cache = k_cache.clone(), v_cache.clone()  # each call its own cache
        fastllm.ops.kv_cache_append(k_new, v_new, k_cache, v_cache, positions)
        return k_cache, v_cache

    return append, (k_new, v_new, k_cache, v_cache, positions), {}


CALLS = {
    "quantize_per_token": _quantize_per_token,
    "quantize_per_channel": _quantize_per_channel,
    "int8_linear": _int8_linear,
    "int8_dynamic_linear": _int8_dynamic_linear,
    "int8_weight_only_linear": _int8_weight_only_linear,
    "sparse24_linear": _sparse24_linear,
    "block_sparse_linear": _block_sparse_linear,
    "attention": _attention,
    "attention_varlen": _attention_varlen,
    "decode_attention": _decode_attention,
    "decode_attention_paged": _decode_attention_paged,
    "kv_cache_append": _kv_cache_append,
}


def _op(case: str) -> str:
    return case.removesuffix("_varlen").removesuffix("_paged")


def _cases():
    return [
        (case, name)
        for case in CALLS
        for name in available_backends(_op(case), CPU)
        if name in NOT_TRITON
    ]


def _flat(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.parametrize("case, name", _cases())
def test_op_from_8_threads_matches_serial_calls(case, name):
    # each thread its own inputs; the op must keep nothing between calls that another
    # thread's call could change (scratch buffers, lazily built tables)
    calls = [CALLS[case](i) for i in range(THREADS)]
    with fastllm.use_backend(name):
        serial = [_flat(fn(*args, **kw)) for fn, args, kw in calls]

    def work(i):
        fn, args, kw = calls[i]
        outs = []
        with fastllm.use_backend(name), backend.trace() as seen:
            for _ in range(ROUNDS):
                outs.append(_flat(fn(*args, **kw)))
        return outs, seen

    for i, (outs, seen) in enumerate(_in_threads(work)):
        for out in outs:
            assert len(out) == len(serial[i])
            for a, b in zip(out, serial[i]):
                assert torch.equal(a, b), (case, name, i)
        assert seen and {b for _, b in seen} == {name}, seen


# --- last_backend and trace: per thread ----------------------------------------------------------


def test_last_backend_and_trace_are_per_thread():
    # thread 0 forces torch while thread 1 forces reference; their calls alternate
    # (barrier), and each reads only its own
    x = torch.randn(4, 16)
    turn = threading.Barrier(2)
    forced = ("torch", "reference")

    def work(i):
        seen_last = []
        with fastllm.use_backend(forced[i]), backend.trace() as calls:
            for _ in range(4):
                for who in (0, 1):  # one call at a time: thread 0, then thread 1
                    if who == i:
                        fastllm.ops.quantize_per_token(x)
                    turn.wait()
                seen_last.append(fastllm.last_backend("quantize_per_token"))
        return calls, seen_last

    for i, (calls, seen_last) in enumerate(_in_threads(work, 2)):
        assert calls == [("quantize_per_token", forced[i])] * 4
        assert seen_last == [forced[i]] * 4


def test_a_new_thread_starts_with_nothing_recorded_or_forced():
    with fastllm.use_backend("reference"):
        fastllm.ops.quantize_per_token(torch.randn(2, 8))
        (last, forced), *_ = _in_threads(
            lambda i: (fastllm.last_backend("quantize_per_token"), backend.forced_backend()), 1
        )
    assert last is None and forced is None
    assert fastllm.last_backend("quantize_per_token") == "reference"


def test_trace_sees_no_other_thread():
    with backend.trace() as calls:
        _in_threads(lambda i: fastllm.ops.quantize_per_token(torch.randn(2, 8)))
    assert calls == []


def test_copied_context_shares_the_trace_not_the_record():
    # a thread started with a copy of this context (asyncio.to_thread does that): a trace
    # open here collects its calls, and its last_backend does not overwrite this one's
    import contextvars

    with fastllm.use_backend("torch"):
        fastllm.ops.quantize_per_token(torch.randn(2, 8))
    with backend.trace() as calls:
        context = contextvars.copy_context()

        def child():
            with fastllm.use_backend("reference"):
                fastllm.ops.quantize_per_token(torch.randn(2, 8))
            return fastllm.last_backend("quantize_per_token")

        got = []
        t = threading.Thread(target=lambda: got.append(context.run(child)))
        t.start()
        t.join()
    assert got == ["reference"]
    assert calls == [("quantize_per_token", "reference")]
    assert fastllm.last_backend("quantize_per_token") == "torch"


# --- loading the native module ---------------------------------------------------------------------

# A fresh interpreter in which importing fastllm._C takes 0.3 s (an import hook sleeps),
# so that 8 threads surely arrive while the first one is still loading it. `work(i)` runs
# in thread i; the script prints the list of what each returned (or raised).
_SLOW_IMPORT = textwrap.dedent(
    """
    import importlib.abc, sys, threading, time

    class SlowNative(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fastllm._C":
                time.sleep(0.3)
            return None

    sys.meta_path.insert(0, SlowNative())
    import torch, fastllm
    from fastllm import native
    assert "fastllm._C" not in sys.modules
    """
)
_IN_8_THREADS = textwrap.dedent(
    """
    barrier = threading.Barrier(8)
    results = [None] * 8

    def run(i):
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as e:
            results[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(results)
    """
)


def _slow_native_run(work: str) -> str:
    if fastllm.native.load_error() is not None:
        pytest.skip(f"fastllm._C is not built here ({fastllm.native.load_error()})")
    code = _SLOW_IMPORT + textwrap.dedent(work) + _IN_8_THREADS
    env = {k: v for k, v in os.environ.items() if k not in ("FASTLLM_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_first_op_calls_from_8_threads_load_the_native_module_once():
    # before the guard in fastllm.backend, threads that came while the first was loading
    # fastllm._C saw no module and no error: ImportError("fastllm._C is not available: None")
    work = """
        x = torch.randn(4, 16)

        def work(i):
            fastllm.ops.quantize_per_token(x)
            return fastllm.last_backend("quantize_per_token")
        """
    assert _slow_native_run(work) == str(["cpu"] * 8)


def test_native_module_from_8_threads():
    work = """
        def work(i):
            return native.module() is not None and native.load_error() is None
        """
    assert _slow_native_run(work) == str([True] * 8)


# --- triton: calls never overlap ----------------------------------------------------------------


def test_triton_implementations_never_overlap():
    # every registered triton implementation runs under one lock (an RLock: one may call
    # another op); the other backends run concurrently
    active, most = [0], {"triton": 0, "torch": 0}
    lock = threading.Lock()

    def impl(name):
        def run(x):
            with lock:
                active[0] += 1
                most[name] = max(most[name], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1
            return x

        return run

    backend.register("_test_overlap", "triton")(impl("triton"))
    backend.register("_test_overlap", "torch")(impl("torch"))
    try:
        for name in ("triton", "torch"):
            active[0] = 0
            _in_threads(backend.implementation("_test_overlap", name))
    finally:
        backend._REGISTRY.pop("_test_overlap")
    assert most == {"triton": 1, "torch": THREADS}


@pytest.mark.skipif(HAS_GPU, reason="the interpreter stands in for a GPU's first compile")
@pytest.mark.skipif(
    backend.unavailable_reason("triton", CPU) is not None, reason="triton is not available"
)
def test_interpreted_triton_from_threads():
    # The interpreter patches triton.language while a kernel runs: two kernels interpreted
    # at once break each other ("Did you forget to add @triton.jit ?"), most times when the
    # threads switch as often as they can. Under fastllm's lock they never overlap.
    xs = [torch.randn(16, 64) for _ in range(THREADS)]
    with fastllm.use_backend("reference"):
        expected = [fastllm.ops.quantize_per_token(x) for x in xs]

    def work(i):
        with fastllm.use_backend("triton"):
            return [fastllm.ops.quantize_per_token(xs[i]) for _ in range(ROUNDS)]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        results = [_in_threads(work) for _ in range(2)]
    finally:
        sys.setswitchinterval(interval)
    for trial in results:
        for i, outs in enumerate(trial):
            for q, scale in outs:
                assert torch.equal(q, expected[i][0]) and torch.equal(scale, expected[i][1])


@pytest.mark.gpu
def test_triton_first_compile_from_8_threads():
    # the first call of a kernel compiles it: 8 threads hit it together with a cold cache
    from fastllm.triton_kernels import quant

    kernels = [v for v in vars(quant).values() if hasattr(v, "device_caches")]
    assert kernels
    for k in kernels:
        k.device_caches.clear()
    xs = [torch.randn(5 + i, 96, device="cuda", dtype=torch.bfloat16) for i in range(THREADS)]
    with fastllm.use_backend("reference"):
        expected = [fastllm.ops.quantize_per_token(x) for x in xs]

    def work(i):
        with fastllm.use_backend("triton"):
            out = fastllm.ops.quantize_per_token(xs[i])
        torch.cuda.synchronize()
        return out

    for (q, scale), (q_ref, scale_ref) in zip(_in_threads(work), expected):
        assert (q.int() - q_ref.int()).abs().max() <= 1
        assert torch.allclose(scale, scale_ref, rtol=1e-6)


# --- a transformers model shared by threads ----------------------------------------------------


def test_generate_from_4_threads_on_one_model():
    # one model, four requests at once (left-padded batches of different prompts)
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    fastllm.optimize(model)
    prompts = []
    for i in range(4):
        ids = torch.randint(3, 128, (2, 6 + i))
        mask = torch.ones_like(ids)
        mask[0, : 2 + i] = 0
        prompts.append((ids.masked_fill(mask == 0, 0), mask))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)

    def generate(i):
        with torch.no_grad(), backend.trace() as calls:
            out = model.generate(input_ids=prompts[i][0], attention_mask=prompts[i][1], **kw)
        return out, calls

    serial = [generate(i)[0] for i in range(4)]
    for i, (out, calls) in enumerate(_in_threads(generate, 4)):
        assert torch.equal(out, serial[i])
        # this thread's trace: its own prefill and decode steps, no other thread's
        assert [op for op, _ in calls] == ["attention"] * 2 + ["decode_attention"] * 6
