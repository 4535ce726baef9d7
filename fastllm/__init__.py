"""fastllm: fused attention, int8 and sparse kernels for transformer inference in PyTorch.

    import fastllm
    x_int8, scale = fastllm.ops.quantize_per_token(x)
    model = fastllm.optimize(model, linear="w8a8")     # swap a model's layers in place

Backends are chosen per call (see fastllm.backend); `fastllm doctor` says which
are available on this machine.
"""

from fastllm import backend, nn, ops, quant, sparse
from fastllm.backend import BackendError, last_backend, use_backend
from fastllm.hf_quantizer import register_on_import as _register_on_import
from fastllm.optimize import LinearConfig, optimize, report
from fastllm.serialize import load, save

# save_pretrained/from_pretrained of fastllm models: fastllm's quantizer is registered with
# transformers when transformers loads its registries (this imports nothing now)
_register_on_import()

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "LinearConfig",
    "__version__",
    "backend",
    "last_backend",
    "load",
    "nn",
    "ops",
    "optimize",
    "quant",
    "report",
    "save",
    "sparse",
    "use_backend",
]
