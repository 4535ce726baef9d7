"""fastllm.backend: per-call choice, forcing, errors, tracing."""

import subprocess
import sys

import pytest
import torch
from conftest import HAS_GPU

import fastllm
from fastllm import backend

# CPU tensors go to the C++ kernels of fastllm._C where it is built, else to PyTorch
CPU_FIRST = "cpu" if backend.unavailable_reason("cpu", torch.device("cpu")) is None else "torch"


def test_cpu_call_is_served_by_the_cpu_order():
    fastllm.ops.quantize_per_token(torch.randn(2, 8))
    assert fastllm.last_backend("quantize_per_token") == CPU_FIRST


def test_cpu_backend_falls_back_to_torch_without_native_module(monkeypatch):
    real = backend.unavailable_reason

    def no_native(name, device=None):
        return "fastllm._C is not available (test)" if name == "cpu" else real(name, device)

    monkeypatch.setattr(backend, "unavailable_reason", no_native)
    fastllm.ops.quantize_per_token(torch.randn(2, 8))
    assert fastllm.last_backend("quantize_per_token") == "torch"
    with fastllm.use_backend("cpu"), pytest.raises(backend.BackendError, match="test"):
        fastllm.ops.quantize_per_token(torch.randn(2, 8))


def test_cpu_backend_takes_only_cpu_tensors():
    reason = backend.unavailable_reason("cpu", torch.device("cuda"))
    assert reason is not None and "CPU tensors" in reason


def test_trace_records_each_call():
    with backend.trace() as calls:
        fastllm.ops.quantize_per_token(torch.randn(2, 8))
        with fastllm.use_backend("reference"):
            fastllm.ops.quantize_per_token(torch.randn(2, 8))
    assert calls == [("quantize_per_token", CPU_FIRST), ("quantize_per_token", "reference")]


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only error")
def test_forced_cuda_on_cpu_tensor_raises(monkeypatch):
    monkeypatch.setenv("FASTLLM_BACKEND", "cuda")
    with pytest.raises(backend.BackendError, match="'cuda' is forced but cannot serve"):
        fastllm.ops.quantize_per_token(torch.randn(2, 8))


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with (
        fastllm.use_backend("triton"),
        pytest.raises(backend.BackendError, match="TRITON_INTERPRET"),
    ):
        fastllm.ops.quantize_per_token(torch.randn(2, 8))


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.setenv("FASTLLM_BACKEND", "reference")
    fastllm.ops.quantize_per_token(torch.randn(2, 8))
    assert fastllm.last_backend("quantize_per_token") == "reference"
    with fastllm.use_backend("torch"):  # the context manager wins over the variable
        fastllm.ops.quantize_per_token(torch.randn(2, 8))
    assert fastllm.last_backend("quantize_per_token") == "torch"


def test_unknown_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="'tpu'"):
        with fastllm.use_backend("tpu"):
            pass
    monkeypatch.setenv("FASTLLM_BACKEND", "tpu")
    with pytest.raises(backend.BackendError, match="FASTLLM_BACKEND='tpu'"):
        fastllm.ops.quantize_per_token(torch.randn(2, 8))


def test_unsupported_call_falls_back_per_call():
    calls = []

    @backend.register("_test_op", "torch", supports=lambda x: "x too large" if x > 1 else None)
    def _small(x):
        calls.append("torch")
        return x

    @backend.register("_test_op", "reference")
    def _ref(x):
        calls.append("reference")
        return x

    # reference is never chosen automatically: a call torch can't serve is an error
    assert backend.select("_test_op", torch.device("cpu"), 0) == "torch"
    with pytest.raises(backend.BackendError, match="x too large"):
        backend.select("_test_op", torch.device("cpu"), 2)
    with fastllm.use_backend("reference"):
        assert backend.select("_test_op", torch.device("cpu"), 2) == "reference"
    backend._REGISTRY.pop("_test_op")


def test_prefer_sets_a_backend_aside_only_in_the_automatic_choice(monkeypatch):
    monkeypatch.setattr(backend, "unavailable_reason", lambda name, device=None: None)
    backend.register(
        "_test_pref_op", "cpu", prefer=lambda x: "slower for x > 1" if x > 1 else None
    )(lambda x: "cpu")
    backend.register("_test_pref_op", "torch")(lambda x: "torch")
    try:
        cpu = torch.device("cpu")
        assert backend.select("_test_pref_op", cpu, 1) == "cpu"
        assert backend.select("_test_pref_op", cpu, 2) == "torch"
        with fastllm.use_backend("cpu"):  # forced: served even where it is not preferred
            assert backend.select("_test_pref_op", cpu, 2) == "cpu"
    finally:
        backend._REGISTRY.pop("_test_pref_op")


def test_imports_and_runs_without_triton():
    # `import fastllm` must work where triton is missing; doctor then says so
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastllm\n"
        "from fastllm import backend, doctor\n"
        "q, s = fastllm.ops.quantize_per_token(torch.randn(3, 5))\n"
        "cpu_ok = backend.unavailable_reason('cpu', torch.device('cpu')) is None\n"
        "assert fastllm.last_backend('quantize_per_token') == ('cpu' if cpu_ok else 'torch')\n"
        "assert 'not installed' in backend.unavailable_reason('triton', torch.device('cpu'))\n"
        "print('\\n'.join(doctor.report()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "triton is not installed" in out.stdout


def test_unverified_backend_serves_only_when_forced(monkeypatch):
    monkeypatch.setattr(backend, "unavailable_reason", lambda name, device=None: None)
    monkeypatch.setitem(backend.UNVERIFIED, "cuda", "not yet run on a GPU")
    backend.register("_test_gpu_op", "cuda")(lambda x: x)
    backend.register("_test_gpu_op", "torch")(lambda x: x)
    try:
        gpu = torch.device("cuda")
        assert backend.select("_test_gpu_op", gpu, 0) == "torch"
        with fastllm.use_backend("cuda"):
            assert backend.select("_test_gpu_op", gpu, 0) == "cuda"
        monkeypatch.delitem(backend.UNVERIFIED, "cuda")
        assert backend.select("_test_gpu_op", gpu, 0) == "cuda"
    finally:
        backend._REGISTRY.pop("_test_gpu_op")


def test_last_backend_and_trace_follow_the_context():
    # asyncio tasks run in copies of their parent's context: a trace open in the parent
    # collects the tasks' calls, and what a task records stays in the task
    import asyncio

    async def call(name):
        with fastllm.use_backend(name):
            fastllm.ops.quantize_per_token(torch.randn(2, 8))
        return fastllm.last_backend("quantize_per_token")

    async def main():
        return await asyncio.gather(call("torch"), call("reference"))

    with fastllm.use_backend("torch"):
        fastllm.ops.quantize_per_token(torch.randn(2, 8))
    with backend.trace() as calls:
        assert asyncio.run(main()) == ["torch", "reference"]
    assert sorted(calls) == [("quantize_per_token", "reference"), ("quantize_per_token", "torch")]
    assert fastllm.last_backend("quantize_per_token") == "torch"  # this context's own call


def test_triton_implementations_run_under_one_lock():
    seen = []

    def impl(x):
        seen.append(backend._TRITON_LOCK._is_owned())
        return x

    assert backend.register("_test_lock_op", "triton")(impl) is impl  # decorator: fn unchanged
    backend.register("_test_lock_op", "torch")(impl)
    try:
        backend.implementation("_test_lock_op", "triton")(1)
        backend.implementation("_test_lock_op", "torch")(1)
    finally:
        backend._REGISTRY.pop("_test_lock_op")
    assert seen == [True, False]


# --- the choice cached per call signature --------------------------------------------------


@pytest.fixture
def counted_op(monkeypatch):
    """A test op with cpu and torch implementations; the cpu one supports float32 only.
    Yields the list of (backend, dtype, device type) that `supports`/`prefer` were asked
    about: a cached choice asks nothing."""
    monkeypatch.setattr(backend, "unavailable_reason", lambda name, device=None: None)
    asked = []

    def supports(x):
        asked.append(("supports", x.dtype, x.device.type))
        return None if x.dtype == torch.float32 else f"cpu takes float32, got {x.dtype}"

    def prefer(x):
        asked.append(("prefer", x.dtype, x.device.type))
        return None

    backend.register("_test_cached_op", "cpu", supports=supports, prefer=prefer)(lambda x: x)
    backend.register("_test_cached_op", "torch")(lambda x: x)
    backend.register("_test_cached_op", "reference")(lambda x: x)
    yield asked
    backend._REGISTRY.pop("_test_cached_op")
    backend.clear_cache()


def test_choice_is_worked_out_once_per_signature(counted_op):
    cpu = torch.device("cpu")
    for _ in range(3):
        assert backend.select("_test_cached_op", cpu, torch.randn(2, 8)) == "cpu"
    assert len(counted_op) == 2  # supports and prefer, on the first call only
    # every call is still recorded
    with backend.trace() as calls:
        backend.select("_test_cached_op", cpu, torch.randn(2, 8))
        backend.select("_test_cached_op", cpu, torch.randn(2, 8))
    assert calls == [("_test_cached_op", "cpu")] * 2
    assert backend.last_backend("_test_cached_op") == "cpu"


def test_cached_choice_follows_dtype_shape_strides_and_device(counted_op):
    cpu = torch.device("cpu")
    assert backend.select("_test_cached_op", cpu, torch.randn(2, 8)) == "cpu"
    assert backend.select("_test_cached_op", cpu, torch.randn(2, 8).half()) == "torch"
    assert backend.select("_test_cached_op", cpu, torch.randn(2, 8)) == "cpu"
    n = len(counted_op)
    backend.select("_test_cached_op", cpu, torch.randn(3, 8))  # new shape: asked again
    backend.select("_test_cached_op", cpu, torch.randn(8, 2).t())  # same shape, new strides
    assert len(counted_op) == n + 4
    # another device: worked out again, never the CPU tensors' answer
    meta = torch.device("meta")
    backend.select("_test_cached_op", meta, torch.empty(2, 8, device="meta"))
    assert counted_op[-2:] == [
        ("supports", torch.float32, "meta"),
        ("prefer", torch.float32, "meta"),
    ]


def test_cached_choice_follows_the_forced_backend(counted_op, monkeypatch):
    cpu = torch.device("cpu")
    x = torch.randn(2, 8)
    assert backend.select("_test_cached_op", cpu, x) == "cpu"
    with fastllm.use_backend("torch"):
        assert backend.select("_test_cached_op", cpu, x) == "torch"
    monkeypatch.setenv("FASTLLM_BACKEND", "reference")
    assert backend.select("_test_cached_op", cpu, x) == "reference"
    monkeypatch.delenv("FASTLLM_BACKEND")
    assert backend.select("_test_cached_op", cpu, x) == "cpu"
    # a forced backend that cannot serve the call raises every time, with its reason
    for _ in range(2):
        with (
            fastllm.use_backend("cpu"),
            pytest.raises(backend.BackendError, match="cpu takes float32"),
        ):
            backend.select("_test_cached_op", cpu, x.half())


def test_cached_choice_follows_availability_and_the_registry(counted_op, monkeypatch):
    cpu = torch.device("cpu")
    x = torch.randn(2, 8)
    assert backend.select("_test_cached_op", cpu, x) == "cpu"
    monkeypatch.setattr(
        backend, "unavailable_reason", lambda name, device=None: "gone" if name == "cpu" else None
    )
    assert backend.select("_test_cached_op", cpu, x) == "torch"
    monkeypatch.setattr(backend, "unavailable_reason", lambda name, device=None: None)
    assert backend.select("_test_cached_op", cpu, x) == "cpu"
    monkeypatch.setitem(backend.UNVERIFIED, "cpu", "not verified (test)")
    assert backend.select("_test_cached_op", cpu, x) == "torch"
    monkeypatch.delitem(backend.UNVERIFIED, "cpu")
    # a new registration starts a new generation: the new cpu implementation rejects all
    backend.register("_test_cached_op", "cpu", supports=lambda x: "rejects all")(lambda x: x)
    assert backend.select("_test_cached_op", cpu, x) == "torch"


def test_scalars_key_by_type_and_value(counted_op):
    calls = []
    backend.register("_test_cached_op", "cpu", supports=lambda x, flag: calls.append(flag) or None)(
        lambda x, flag: x
    )
    cpu, x = torch.device("cpu"), torch.randn(2)
    for flag in (1, True, 1.0, 1, True):
        backend.select("_test_cached_op", cpu, x, flag)
    assert [type(f) for f in calls] == [int, bool, float]  # 1 == True == 1.0, yet 3 keys


def test_signature():
    x = torch.randn(4, 6)
    assert backend.signature((x, None, 3)) == backend.signature((torch.randn(4, 6), None, 3))
    assert backend.signature((x,)) != backend.signature((x.t().contiguous().t(),))
    assert backend.signature((1,)) != backend.signature((True,))
    assert backend.signature(((1, 0),)) != backend.signature(((True, 0),))
    assert backend.signature(((1, 0),)) != backend.signature(([1, 0],))
    # no description: tensor subclasses, sparse tensors, other objects
    assert backend.signature((torch.randn(3).to_sparse(),)) is None
    assert backend.signature((object(),)) is None
    assert backend.signature(([object()],)) is None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert backend.signature((torch.empty(3),)) is None


def test_choice_cache_is_bounded(counted_op, monkeypatch):
    monkeypatch.setattr(backend, "CACHE_SIZE", 8)
    cpu = torch.device("cpu")
    for n in range(1, 30):
        assert backend.select("_test_cached_op", cpu, torch.randn(n)) == "cpu"
        assert len(backend._choices) <= 8
    assert backend.select("_test_cached_op", cpu, torch.randn(3).half()) == "torch"
