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
