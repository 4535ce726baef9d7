"""`fastllm doctor` tells the truth about this machine."""

import subprocess
import sys

import torch

from fastllm import doctor, native


def test_doctor_reports_what_is_here():
    text = "\n".join(doctor.report())
    assert torch.__version__ in text
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in text
    else:
        assert "gpu          none visible to PyTorch" in text
        if native.with_cuda():
            assert "cuda       -  PyTorch sees no CUDA GPU" in text
    if native.load_error() is None:
        assert "cpu kernels  C++ in fastllm._C" in text
        assert "W8A8: " in text and "int8 matmul" in text
    if native.load_error() is None and native.with_cuda():
        assert "sm_" in text
    assert "quantize_per_token" in text


def test_cli_runs():
    out = subprocess.run(
        [sys.executable, "-m", "fastllm", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "backends for" in out.stdout


def test_doctor_says_whether_transformers_knows_fastllm():
    text = "\n".join(doctor.report())
    try:
        import transformers
    except ImportError:
        assert "transformers not installed" in text
        return
    assert f"transformers {transformers.__version__}; fastllm quantizer registered" in text
    assert "distributed  torch.distributed with" in text


def test_doctor_says_how_openmp_threads_wait(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert "OMP_WAIT_POLICY=PASSIVE" in "\n".join(doctor.report())
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert "openmp       OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=unset (set by you)" in "\n".join(
        doctor.report()
    )


def test_doctor_says_how_freed_memory_goes_back(monkeypatch):
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert "malloc       not glibc" in "\n".join(doctor.report())
        return
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(k, raising=False)
    assert doctor.MALLOC_REMEDY in "\n".join(doctor.report())
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    text = "\n".join(doctor.report())
    assert "malloc       glibc malloc, MALLOC_TRIM_THRESHOLD_=1073741824 (set by you)" in text
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert "malloc       jemalloc preloaded" in "\n".join(doctor.report())
