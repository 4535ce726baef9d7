"""fastllm: fused attention, int8 and sparse kernels for transformer inference in PyTorch.

    import fastllm
    x_int8, scale = fastllm.ops.quantize_per_token(x)

Backends are chosen per call (see fastllm.backend); `fastllm doctor` says which
are available on this machine.
"""

from fastllm import backend, ops
from fastllm.backend import BackendError, last_backend, use_backend

__version__ = "0.1.0"

__all__ = ["BackendError", "__version__", "backend", "last_backend", "ops", "use_backend"]
