"""`fastllm doctor`: what this machine has, and which backend can serve which op."""

from __future__ import annotations

import importlib
import os
import platform
import sys

import torch

from fastllm import backend, native


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError as e:
        return f"not installed ({e})"


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def _openmp_line() -> str:
    """How idle OpenMP threads wait. PyTorch's libgomp (whose pool fastllm's C++ kernels
    share) spins by default; on a machine shared with other jobs a descheduled thread then
    stalls every parallel region while its partner spins (bench/bench_runtimes.py
    --contended measures it). Read at start-up only: fastllm never sets it."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    spin = os.environ.get("GOMP_SPINCOUNT")
    if policy is None and spin is None:
        return (
            "OMP_WAIT_POLICY unset: idle threads spin before sleeping. On a machine shared "
            "with other jobs, start Python with OMP_WAIT_POLICY=PASSIVE (or GOMP_SPINCOUNT=0): "
            "measured on 2 shared cores, fastllm w8a8 1446 -> 264 ms"
        )
    return f"OMP_WAIT_POLICY={policy or 'unset'}, GOMP_SPINCOUNT={spin or 'unset'} (set by you)"


MALLOC_REMEDY = "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824"


def _malloc_line() -> str:
    """How freed tensors go back to the system. Eager PyTorch allocates every intermediate
    tensor afresh; glibc's malloc (the default on Linux) may hand freed blocks of a few MB
    back to the system, and then every page of the next such tensor is faulted in and zeroed
    again. Whether it does depends on the history of the heap: measured on MiniLM w8a8 (2
    threads), some processes took 3 page faults per forward and others 13,000-17,000, which
    cost 25-30 ms of a 50 ms forward (bench/bench_runtimes.py gives faults per call). Read
    at start-up only: fastllm never sets it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: nothing to say"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} preloaded (LD_PRELOAD, set by you)"
    ours = [
        f"{k}={os.environ[k]}"
        for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
        if k in os.environ
    ]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        ours.append(f"GLIBC_TUNABLES={tunables}")
    if ours:
        return f"glibc malloc, {', '.join(ours)} (set by you)"
    return (
        "glibc malloc with its defaults: freed tensors of a few MB may go back to the system "
        "and be page-faulted in again on the next forward (on MiniLM w8a8, 13,000-17,000 "
        f"faults and +25-30 ms per forward in some processes). Start Python with {MALLOC_REMEDY} "
        "(freed blocks under 32 MB stay in the process, up to 1 GB of them kept) or "
        "preload jemalloc/tcmalloc"
    )


def _transformers_line() -> str:
    """transformers' version, and whether fastllm's quantizer is in its registry (what
    from_pretrained of a fastllm checkpoint and `fastllm serve` need)."""
    try:
        import transformers
        from transformers.quantizers import auto  # registers fastllm's quantizer (on import)
    except ImportError as e:
        return f"not installed ({e}): the Hugging Face integration is off"
    from fastllm import hf_quantizer

    if hf_quantizer.registration_error is not None:
        state = f"fastllm quantizer NOT registered: {hf_quantizer.registration_error}"
    elif hf_quantizer.NAME in auto.AUTO_QUANTIZER_MAPPING:
        state = f'fastllm quantizer registered ("quant_method": "{hf_quantizer.NAME}")'
    else:
        state = "fastllm quantizer not registered (transformers loaded before fastllm?)"
    return f"{transformers.__version__}; {state}"


def _distributed_line() -> str:
    """The process-group backends tensor parallelism can use here."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed not available in this PyTorch build: no tensor parallelism"
    have = [
        name
        for name, ok in (("nccl", dist.is_nccl_available()), ("gloo", dist.is_gloo_available()))
        if ok
    ]
    return f"torch.distributed with {', '.join(have) or 'no'} backend(s) (tensor parallelism)"


def report() -> list[str]:
    lines = [
        f"fastllm      {importlib.import_module('fastllm').__version__}",
        f"python       {platform.python_version()} ({sys.executable})",
        f"torch        {torch.__version__} (built with CUDA {torch.version.cuda or 'none'})",
        f"triton       {_version('triton')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(
                f"gpu {i}        {torch.cuda.get_device_name(i)} (compute capability {major}.{minor})"
            )
    else:
        lines.append("gpu          none visible to PyTorch")

    if native.load_error() is not None:
        lines.append(f"fastllm._C   not available: {native.load_error()}")
    elif not native.with_cuda():
        lines.append("fastllm._C   built without CUDA kernels (no nvcc at build time)")
    else:
        C = native.module()
        lines.append(
            f"fastllm._C   built with CUDA kernels for {', '.join(native.cuda_archs())}; "
            f"CUDA runtime {_cuda_version(C.cuda_runtime_version())} (static), "
            f"driver {_cuda_version(C.cuda_driver_version())}, {C.cuda_device_count()} device(s)"
        )
    cpu_reason = backend.unavailable_reason("cpu", torch.device("cpu"))
    if cpu_reason is None:
        threads = (
            f"OpenMP, {torch.get_num_threads()} thread(s) (torch.get_num_threads())"
            if getattr(native.module(), "with_openmp", False)
            else "one thread (fastllm._C was built without OpenMP)"
        )
        from fastllm.native import cpu as native_cpu

        limits = ", ".join(
            f"{rows} rows from {elements:,} weight elements" if elements else f"{rows} otherwise"
            for elements, rows in native_cpu.SMALL_M_LIMITS
        )
        few_rows = (
            f"fastllm's AVX512-VNNI int8 matmul up to {limits}; torch._int_mm (oneDNN) above"
            if native_cpu.small_m_kernel()
            else "torch._int_mm (oneDNN) for every row count: this CPU has no AVX512-VNNI for "
            "fastllm's few-rows int8 matmul"
        )
        lines.append(f"cpu kernels  C++ in fastllm._C, {threads}; W8A8: {few_rows}")
    else:
        lines.append(f"cpu kernels  not available: {cpu_reason}")
    lines.append(f"openmp       {_openmp_line()}")
    lines.append(f"malloc       {_malloc_line()}")
    lines.append(f"transformers {_transformers_line()}")
    lines.append(f"distributed  {_distributed_line()}")
    forced = backend.forced_backend()
    lines.append(
        f"forced       {forced or 'no (FASTLLM_BACKEND unset): first backend that supports a call'}"
    )
    if backend.triton_interpreted():
        lines.append(
            "interpreter  TRITON_INTERPRET=1: Triton kernels run on the CPU (slow; for tests)"
        )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines.append("")
    lines.append(
        f"backends for {device.type} tensors (per op; first available wins, reference never automatic):"
    )
    for op in backend.ops():
        lines.append(f"  {op}")
        for name in backend.BACKENDS:
            if name not in backend.backends_of(op):
                lines.append(f"    {name:<10} -  no implementation")
                continue
            reason = backend.unavailable_reason(name, device)
            if reason is None and name in backend.UNVERIFIED:
                reason = f"only when forced: {backend.UNVERIFIED[name]}"
            lines.append(f"    {name:<10} {'ok' if reason is None else '-  ' + reason}")
    return lines


def main() -> int:
    print("\n".join(report()))
    return 0
