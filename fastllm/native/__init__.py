"""Loading fastllm._C and passing tensors to it as raw pointers.

fastllm._C includes no PyTorch headers (see setup.py): the launchers here check
what the kernels assume (device, dtype, unit stride on the last dimension),
then pass `data_ptr()`s, sizes, strides and the current CUDA stream as integers.
"""

from __future__ import annotations

import importlib.util
import os
import threading

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3, torch.int32: 4}

_module = None
_error: str | None = None
_loaded = False
_lock = threading.Lock()


def _load() -> None:
    global _module, _error, _loaded
    if _loaded:
        return
    with _lock:  # a thread arriving while another loads waits for the outcome
        if _loaded:
            return
        path = os.environ.get("FASTLLM_NATIVE_LIB")
        try:
            if path:  # another build of _C, e.g. the AddressSanitizer one of `make asan`
                spec = importlib.util.spec_from_file_location("fastllm._C", path)
                if spec is None:
                    raise ImportError(f"FASTLLM_NATIVE_LIB={path!r} is not a loadable module")
                _C = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(_C)
            else:
                from fastllm import _C
        except ImportError as e:  # not built (no compiler) or built for another Python
            _error = str(e)
        else:
            _module = _C
        _loaded = True  # only now: module or error is set


def module():
    """fastllm._C, or raises ImportError with the reason it could not be loaded."""
    _load()
    if _module is None:
        raise ImportError(f"fastllm._C is not available: {_error}")
    return _module


def load_error() -> str | None:
    _load()
    return _error


def with_cuda() -> bool:
    _load()
    return _module is not None and bool(_module.with_cuda)


def cuda_archs() -> list[str]:
    _load()
    return list(_module.cuda_archs()) if _module is not None else []


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]
