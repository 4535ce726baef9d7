"""The native module: importable, with its CPU kernels, and every CUDA source compiles
where nvcc is present."""

import shutil
import subprocess
from pathlib import Path

import pytest

from fastllm import native

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))


def test_native_module_loads():
    assert native.load_error() is None, native.load_error()
    if shutil.which("nvcc"):
        assert native.with_cuda(), "nvcc is present but fastllm._C was built without CUDA"
        assert native.cuda_archs() and all(a.startswith("sm_") for a in native.cuda_archs())


def test_native_module_has_cpu_kernels():
    # the C++ CPU kernels are built with every _C; g++ has OpenMP (libgomp)
    C = native.module()
    for name in ("quantize_per_token_cpu", "int8_epilogue_cpu", "attention_prefill_cpu"):
        assert hasattr(C, name), name
    if shutil.which("g++"):
        assert C.with_openmp, "fastllm._C was built without OpenMP: CPU kernels on one thread"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("src", CU_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cuda_source_compiles(src, tmp_path):
    archs = ["80", "90a"]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd = [
        "nvcc",
        "-O3",
        "-std=c++17",
        "-Xcompiler",
        "-fPIC",
        "--expt-relaxed-constexpr",
        f"-I{ROOT / 'csrc'}",
        *flags,
        "-c",
        str(src),
        "-o",
        str(tmp_path / "out.o"),
    ]
    print(" ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"nvcc failed on {src.name}:\n{out.stderr}"
