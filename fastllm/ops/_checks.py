"""Input checks shared by the ops. Errors name the argument, what it got and what
was expected."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_finite(x) -> bool:
    """Whether the number x is finite (NaN is not). Written as comparisons, not
    math.isfinite, so that it also traces on the symbolic float that torch.compile(
    dynamic=True) makes of a module's float attribute (an attention scale, an eps)."""
    return -math.inf < x < math.inf


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(name: str, t, *, dtypes=None, min_dim: int = 0, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {_names(dtypes)}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "expected all tensors on one device"
            )


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x viewed as [rows, last_dim] with a unit stride on the last dimension
    (copies only when no such view exists)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


# --- sparse and int8 ops -------------------------------------------------------------------


def contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors as every backend of the sparse and int8 ops reads them: contiguous
    (None stays None; a tensor that already is comes back as it is). The registered ops
    apply it, so that a direct torch.ops.fastllm call reads views like the public functions."""
    return tuple([None if t is None else t.contiguous() for t in tensors])


# The int8 GEMMs sum K products of int8 values in an int32 accumulator. With values in
# [-127, 127] (what quantize_per_token and quantize_per_channel give) a sum reaches
# K * 127**2, which stays within 2**31 - 1 up to K = 133,144. (-128 would lower it to 131,071.)
INT8_MAX_K = (2**31 - 1) // 127**2


def check_int8_k(K: int, max_k: int = INT8_MAX_K) -> None:
    """K (in_features) is small enough for the exact int32 accumulator of an int8 GEMM
    (a 2:4 weight sums only K/2 products per output: max_k = 2 * INT8_MAX_K)."""
    if K > max_k:
        raise ValueError(
            f"K = {K} is too large for the int32 accumulator of the int8 kernels: sums of "
            f"int8 products (up to 127 * 127 each) can pass 2**31 - 1; expected K <= {max_k} "
            "(split the layer along K, or use a float or W8A16 path)"
        )
