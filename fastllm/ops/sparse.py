"""Sparse linear ops: y = x Wᵀ + b with W compressed (formats: fastllm/sparse/format.py).

Backend implementations receive normalized arguments and return y. The registered ops
check shapes, dtypes and devices (the same checks as the public functions, so a direct
torch.ops.fastllm call is checked too) and normalize the layout (`contiguous`,
`kernel_index`): every backend reads strided views right. Index *values* are checked
only by the public block_sparse_linear (crow and col; see its `validate`), never by the
ops: every backend reads unchecked crow, col and 2:4 metadata within bounds (clamped
or masked), so bad ones give wrong numbers, never an access outside a tensor.

``sparse24_linear`` impl(x2, values, metadata, bias) -> y
    x2        [M, K]          float32/float16/bfloat16 or int8, stride(1) == 1 (rows may
                              be strided: use x2.stride(0)), M >= 1
    values    [N, K/2]        x2's dtype, contiguous, N >= 1, K a multiple of 4, K >= 4
    metadata  [N, ceil(K/16)] int16, contiguous, the nibble layout of format.py
    bias      [N] or None     x2's dtype, contiguous; always None for int8
    y         [M, N]          new contiguous tensor, x2's dtype; int32 (the exact
                              accumulator) for int8 x2
    All on one device. A backend registers as
    ``@backend.register("sparse24_linear", name, supports=fn)`` with
    ``fn(x2, values, metadata, bias) -> None | reason``, like fastllm/ops/quant.py.

``block_sparse_linear`` impl(x2, crow, col, blocks, bias, N) -> y
    x2        [M, K]          float32/float16/bfloat16, stride(1) == 1, M >= 1, K >= 1
    crow      [N/bn + 1]      int32, contiguous;   col [nnz] int32, contiguous; any
                              values (read through clamp_block_indices or masked)
    blocks    [nnz, bn, bk]   x2's dtype, contiguous; N % bn == 0, K % bk == 0
    bias      [N] or None     x2's dtype, contiguous
    y         [M, N]          new contiguous tensor, x2's dtype; N >= 1

``torch`` backend, chosen by measurement on a 2-core x86 CPU under heavy load
(PyTorch 2.13, float32, N = K = 4096, 1 thread, median of 7; absolute times are
inflated by the load, and an earlier 2-thread run gave the same ranking):

    2:4      decompress + F.linear   vs  CSR matmul (int32 indices from the metadata)
             M=1   205 vs 329 ms;   M=16   537 vs 299 ms;   M=256   201 vs 457 ms
             Both are dominated by unpacking the metadata; CSR wins only around M=16
             and has no bf16/fp16 kernel on the CPU. Kept: decompress + F.linear.
    block    to_dense + F.linear     vs  torch.sparse_bsr_tensor(...) @ xᵀ (64x64 tiles)
             density 0.1:  M=1   162 vs  1.3 ms;  M=16  200 vs   5.5 ms;  M=256   184 vs   91 ms
             density 0.5:  M=1   176 vs   19 ms;  M=16  352 vs   171 ms;  M=256  1136 vs 1224 ms
             density 0.9:  M=1   545 vs   64 ms;  M=16  642 vs   374 ms;  M=256  1100 vs 2292 ms
             Kept: BSR matmul for float32 square tiles when M <= 64 or density <= 0.3,
             else to_dense + F.linear (also for bf16/fp16, which the CPU BSR matmul
             lacks, and non-square tiles, which MKL rejects).
On a GPU the torch backend (a fallback behind triton) decompresses and calls F.linear.
"""

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from fastllm import backend, reference
from fastllm.native import sparse as native_sparse
from fastllm.ops._checks import (
    FLOAT_DTYPES,
    INT8_MAX_K,
    check_int8_k,
    check_tensor,
    contiguous,
    rows_view,
)
from fastllm.ops._index import kernel_index, value_checks_wanted
from fastllm.sparse.format import (
    BlockSparseWeight,
    block_sparse_to_dense,
    check_24,
    check_block_indices,
    check_block_sparse,
    clamp_block_indices,
    decompress_24_unchecked,
)

# --- sparse24_linear backends ----------------------------------------------------------


@backend.register("sparse24_linear", "reference")
def _sparse24_reference(x2, values, metadata, bias):
    return reference.sparse24_linear(x2, values, metadata, bias)


def _int8_matmul(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x2.device.type == "cpu":
        return x2.to(torch.int32) @ w.to(torch.int32).t()
    # float64 holds every int8 x int8 sum exactly (|sum| < 2**53)
    return (x2.double() @ w.double().t()).to(torch.int32)


@backend.register("sparse24_linear", "torch")
def _sparse24_torch(x2, values, metadata, bias):
    w = decompress_24_unchecked(values, metadata)
    if x2.dtype == torch.int8:
        return _int8_matmul(x2, w)
    return F.linear(x2, w, bias)


@backend.register("sparse24_linear", "triton")
def _sparse24_triton(x2, values, metadata, bias):
    from fastllm.triton_kernels.sparse import sparse24_linear

    return sparse24_linear(x2, values, metadata, bias)


backend.register("sparse24_linear", "cuda", supports=native_sparse.supports_sparse24)(
    native_sparse.sparse24_linear
)


# --- block_sparse_linear backends ------------------------------------------------------


@backend.register("block_sparse_linear", "reference")
def _block_reference(x2, crow, col, blocks, bias, N):
    nnz, bn, bk = blocks.shape
    crow, col = clamp_block_indices(crow, col, nnz, x2.shape[1] // bk)
    bsw = BlockSparseWeight(crow, col, blocks, (N, x2.shape[1]), (bn, bk))
    return reference.block_sparse_linear(x2, bsw, bias)


@backend.register("block_sparse_linear", "torch")
def _block_torch(x2, crow, col, blocks, bias, N):
    M, K = x2.shape
    nnz, bn, bk = blocks.shape
    density = nnz / max((N // bn) * (K // bk), 1)
    use_bsr = x2.device.type == "cpu" and x2.dtype == torch.float32 and bn == bk
    if use_bsr and (M <= 64 or density <= 0.3):  # MKL's BSR matmul takes square tiles only
        # check_invariants=False trusts the indices: MKL reads them unchecked
        crow, col = clamp_block_indices(crow, col, nnz, K // bk)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse BSR support is in beta"
            w = torch.sparse_bsr_tensor(crow, col, blocks, (N, K), check_invariants=False)
            y = (w @ x2.t()).t()
        if bias is not None:
            y = y + bias
        return y.contiguous()
    return F.linear(x2, block_sparse_to_dense(crow, col, blocks, N, K), bias)


def _block_triton_supports(x2, crow, col, blocks, bias, N):
    _, bn, bk = blocks.shape
    for name, b in (("bn", bn), ("bk", bk)):
        if b < 16 or b & (b - 1):
            return f"block size {name} = {b}; the Triton kernel needs a power of 2 >= 16"
    return None


@backend.register("block_sparse_linear", "triton", supports=_block_triton_supports)
def _block_triton(x2, crow, col, blocks, bias, N):
    from fastllm.triton_kernels.sparse import block_sparse_linear

    return block_sparse_linear(x2, crow, col, blocks, bias, N)


# --- checks shared by the public functions and the registered ops -------------------------


def _check_bias(bias, N: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    check_tensor("bias", bias, dtypes=(x.dtype,), dim=1)
    if bias.shape[0] != N:
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({N},)")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def _check_x(x: torch.Tensor, K: int, dtypes) -> None:
    check_tensor("x", x, dtypes=dtypes, min_dim=1)
    if x.shape[-1] != K:
        raise ValueError(
            f"x has {x.shape[-1]} features (last dim of {tuple(x.shape)}); the weight has K = {K}"
        )


def _check_sparse24(x, values, metadata, bias) -> tuple[int, int]:
    """Types, shapes, dtypes and devices of sparse24_linear's arguments -> (N, K)."""
    K = check_24(values, metadata)
    _check_x(x, K, FLOAT_DTYPES + (torch.int8,))
    if values.dtype != x.dtype:
        raise TypeError(f"values has dtype {values.dtype} but x has {x.dtype}; expected the same")
    if values.device != x.device:
        raise ValueError(f"values is on {values.device} but x is on {x.device}")
    N = values.shape[0]
    if x.dtype == torch.int8:
        if bias is not None:
            raise ValueError("bias must be None for int8 x (the result is the int32 accumulator)")
        check_int8_k(K, 2 * INT8_MAX_K)  # a 2:4 row sums K/2 products
    _check_bias(bias, N, x)
    return N, K


def _check_block(x, weight_bsr: BlockSparseWeight, bias, validate: bool | None) -> tuple[int, int]:
    """Types, shapes, dtypes and devices of block_sparse_linear's arguments, and the index
    values where `value_checks_wanted(validate, ...)` -> (N, K)."""
    N, K = check_block_sparse(weight_bsr, contents=False)
    _check_x(x, K, FLOAT_DTYPES)
    if weight_bsr.blocks.dtype != x.dtype:
        raise TypeError(
            f"weight_bsr.blocks has dtype {weight_bsr.blocks.dtype} but x has {x.dtype}; "
            "expected the same"
        )
    if weight_bsr.blocks.device != x.device:
        raise ValueError(f"weight_bsr is on {weight_bsr.blocks.device} but x is on {x.device}")
    _check_bias(bias, N, x)
    if value_checks_wanted(validate, weight_bsr.crow_indices):
        check_block_indices(weight_bsr)
    return N, K


def _zeros(x: torch.Tensor, N: int, bias, dtype) -> torch.Tensor:
    """The answer for an empty x or weight: (..., N) zeros, plus the bias."""
    y = torch.zeros((*x.shape[:-1], N), dtype=dtype, device=x.device)
    return y + bias if bias is not None else y


# The public functions call the registered ops through torch.ops: the same op as the
# custom_op objects below, without their Python wrapper's cost per call (~18 us on a CPU).
_OPS = torch.ops.fastllm

# --- registered ops --------------------------------------------------------------------


@torch.library.custom_op("fastllm::sparse24_linear", mutates_args=())
def _sparse24_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    metadata: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 - torch 2.4 schema inference
) -> torch.Tensor:
    check_tensor("x", x, dim=2)
    _check_sparse24(x, values, metadata, bias)
    args = (rows_view(x), *contiguous(values, metadata, bias))
    name = backend.select("sparse24_linear", x.device, *args)
    return backend.implementation("sparse24_linear", name)(*args)


@_sparse24_linear_op.register_fake
def _(x, values, metadata, bias):
    dtype = torch.int32 if x.dtype == torch.int8 else x.dtype
    return x.new_empty((x.shape[0], values.shape[0]), dtype=dtype)


@torch.library.custom_op("fastllm::block_sparse_linear", mutates_args=())
def _block_sparse_linear_op(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    blocks: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 - torch 2.4 schema inference
    N: int,
) -> torch.Tensor:
    check_tensor("x", x, dim=2)
    block_size = tuple(blocks.shape[1:]) if blocks.dim() == 3 else None
    bsw = BlockSparseWeight(crow_indices, col_indices, blocks, (N, x.shape[1]), block_size)
    _check_block(x, bsw, bias, validate=False)
    if x.numel() == 0 or N == 0:
        return _zeros(x, N, bias, x.dtype)
    crow, col = kernel_index(crow_indices), kernel_index(col_indices)
    args = (rows_view(x), crow, col, *contiguous(blocks, bias), N)
    name = backend.select("block_sparse_linear", x.device, *args)
    return backend.implementation("block_sparse_linear", name)(*args)


@_block_sparse_linear_op.register_fake
def _(x, crow_indices, col_indices, blocks, bias, N):
    return x.new_empty((x.shape[0], N))


# --- public functions ------------------------------------------------------------------


def sparse24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    metadata: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x Wᵀ + bias with W (N, K) in the compressed 2:4 format (fastllm.sparse.format).

    Args:
        x: (..., K) float32, float16 or bfloat16 — or int8 (then y is the exact int32
            accumulator and bias must be None), any strides.
        values: (N, K/2), x's dtype.  metadata: (N, ceil(K/16)) int16.  Any strides.
        bias: (N,) in x's dtype, or None.

    Returns (..., N) in x's dtype (int32 for int8 x). Raises TypeError for wrong types
    or dtypes, ValueError for shapes that do not match (metadata vs values included),
    K not a multiple of 4, mixed devices, or int8 x with K > 266,288 (each output sums
    K/2 int8 products, which could overflow the int32 accumulator beyond that).
    The metadata values are not checked (fastllm.sparse.decompress_24 checks them):
    every backend reads any metadata within bounds, bad nibbles give wrong numbers.
    """
    N, K = _check_sparse24(x, values, metadata, bias)
    if x.numel() == 0 or N == 0 or K == 0:
        return _zeros(x, N, bias, torch.int32 if x.dtype == torch.int8 else x.dtype)
    y = _OPS.sparse24_linear(rows_view(x), values, metadata, bias)
    return y.view(*x.shape[:-1], N)


def block_sparse_linear(
    x: torch.Tensor,
    weight_bsr: BlockSparseWeight,
    bias: torch.Tensor | None = None,
    *,
    validate: bool | None = None,
) -> torch.Tensor:
    """y = x Wᵀ + bias with W (N, K) block-sparse (fastllm.sparse.BlockSparseWeight).

    Args:
        x: (..., K) float32, float16 or bfloat16, any strides.
        weight_bsr: BlockSparseWeight with blocks in x's dtype (its tensors may be views).
        bias: (N,) in x's dtype, or None.
        validate: check the index contents (crow rising from 0 to nnz, columns in range
            and ascending per block-row): True always, False never, None (default) for
            CPU tensors only, as on a GPU the check costs a device sync. Never while
            torch.compile traces.

    Returns (..., N) in x's dtype. Raises TypeError/ValueError for wrong types, dtypes
    or shapes, and ValueError for bad index contents when they are checked. Unchecked
    indices are read clamped (fastllm.sparse.format.clamp_block_indices; the Triton
    kernel masks them): bad ones give wrong numbers, never a read out of bounds.
    """
    if not isinstance(weight_bsr, BlockSparseWeight):
        raise TypeError(
            f"weight_bsr must be a fastllm.sparse.BlockSparseWeight, got {type(weight_bsr).__name__}"
        )
    N, K = _check_block(x, weight_bsr, bias, validate)
    if x.numel() == 0 or N == 0 or K == 0:
        return _zeros(x, N, bias, x.dtype)
    y = _OPS.block_sparse_linear(rows_view(x), *weight_bsr[:3], bias, N)
    return y.view(*x.shape[:-1], N)
