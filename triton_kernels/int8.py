"""int8 matmuls in Triton (fastllm.ops.int8_linear, int8_dynamic_linear, int8_weight_only_linear).

W8A8, one kernel per call:

    acc[m, n] = sum_k x_int8[m, k] * w_int8[n, k]                      (int32, in registers)
    out[m, n] = cast(acc * x_scale[m] * w_scale[n] + bias[n], out dtype)   (the epilogue)

The int32 accumulator never leaves the registers: the epilogue scales it in float32,
adds the bias and stores the cast result.

W8A8 with dynamic activations (int8_dynamic_linear): for M <= 64 one kernel quantizes
each program's rows per token in registers (bit-identical to quantize_per_token) and runs
the same GEMM and epilogue; for larger M, quantize_per_token then the kernel above.

W8A16 (weight-only), for small M (decode): x stays fp16/bf16/fp32, each int8 weight tile
is converted to x's dtype in registers (exact: |w| <= 127), so each weight byte is read
once per M block. Where the (M, N) tiles are too few to fill the GPU, K is split across
programs (SPLIT_K); the partial sums go to a float32 workspace and a second small kernel
adds them up and applies the epilogue.

    out[m, n] = cast(sum_k x[m, k] * w_int8[n, k] * w_scale[n] + bias[n], x dtype)

Epilogue options (both W8A8 kernels), in float32 before the cast:

    y = act(acc * x_scale * w_scale + bias)      ACTIVATION: 0 none, 1 gelu, 2 gelu tanh, 3 silu
    y = act(gate) * up                           GATED: w = [w_gate; w_up] (2N, K); a program
                                                 holds both accumulators of its N columns
    y += residual[m, n]                          HAS_RESIDUAL

Layouts: x [M, K] and w [N, K] with unit stride on K; scales float32 contiguous; bias
[N] contiguous, any float dtype (added in float32). Every load is masked, so M, N and K
need not be multiples of the tiles.
Reference: fastllm/reference/int8.py.
"""

import torch
import triton
import triton.language as tl

from fastllm.backend import triton_interpreted
from fastllm.triton_kernels._compat import rint

_SM_COUNT: dict[int, int] = {}
_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx]


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# --- W8A8 ----------------------------------------------------------------------------

ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}


@triton.jit
def _activation(y, ACTIVATION: tl.constexpr):
    # the formulas of torch.nn.functional.gelu / gelu(approximate="tanh") / silu;
    # tanh(z) = 2 * sigmoid(2z) - 1 (tl has no tanh in every Triton version)
    if ACTIVATION == 1:
        y = y * 0.5 * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACTIVATION == 2:
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))
    elif ACTIVATION == 3:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _epilogue(
    acc, acc_up, xs, ws_ptr, bias_ptr, res_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n,
    N, stride_rm, stride_om,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    # scale, bias, activation, gate, residual, cast -- the int32 accumulators are never stored
    ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = _activation(out, ACTIVATION)
    if GATED:  # the up columns follow the N gate columns in w, w_scale and bias
        ws_up = tl.load(ws_ptr + N + offs_n, mask=mask_n, other=0.0)
        up = acc_up.to(tl.float32) * xs[:, None] * ws_up[None, :]
        if HAS_BIAS:
            up += tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out * up
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :]
        out += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_w8a8_linear_kernel(
    # pointers
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, res_ptr, out_ptr,
    # sizes (N: output columns; gated, w has 2N rows, the up rows up_offset elements on)
    M, N, K, up_offset,
    # strides
    stride_xm, stride_wn, stride_rm, stride_om,
    # meta-parameters
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped launch order: GROUP_M row blocks share the weight columns they read (L2 reuse)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_m)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # x tile [BLOCK_M, BLOCK_K], w tile read transposed as [BLOCK_K, BLOCK_N]
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_up = acc
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
        b = tl.load(w_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if GATED:
            b_up = tl.load(
                w_ptrs + up_offset,
                mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0,
            )
            acc_up = tl.dot(a, b_up, acc_up, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    _epilogue(
        acc, acc_up, xs, ws_ptr, bias_ptr, res_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n,
        N, stride_rm, stride_om, HAS_BIAS, ACTIVATION, GATED, HAS_RESIDUAL,
    )


def _w8a8_config(M: int, N: int, K: int, big_smem: bool = False) -> dict:
    if triton_interpreted():
        # few, large programs: the interpreter's cost is per program
        bm = min(max(triton.next_power_of_2(M), 16), 64)
        bn = min(max(triton.next_power_of_2(N), 16), 64)
        bk = min(max(triton.next_power_of_2(K), 32), 128)
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=1)
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if big_smem:  # sm_90 (228 KB of shared memory): wide tiles for wgmma
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def int8_w8a8_linear(
    x, x_scale, w, w_scale, bias, out_dtype, activation=None, gated=False, residual=None
):
    """x [M, K] int8, x_scale [M] float32, w [N, K] int8, w_scale [N] float32, bias [N] or
    None; unit stride on K, contiguous scales and bias -> [M, N] out_dtype. activation:
    None, "gelu", "gelu_tanh" or "silu"; gated: w holds [w_gate; w_up] (2N rows) and the
    output is act(gate) * up, [M, N]; residual: [M, N] with unit stride on N, or None."""
    M, K = x.shape
    N = w.shape[0] // 2 if gated else w.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    cfg = _w8a8_config(M, N, K, big_smem=_capability(x.device) >= (9, 0))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _int8_w8a8_linear_kernel[grid](
        x, x_scale, w, w_scale, bias if bias is not None else w_scale,
        residual if residual is not None else out, out,
        M, N, K, N * w.stride(0),
        x.stride(0), w.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation], GATED=gated,
        HAS_RESIDUAL=residual is not None,
        **cfg,
    )
    return out


# --- W8A8 with the per-token quantization fused in (small M) -----------------------------


@triton.jit
def _int8_dynamic_linear_kernel(
    # pointers
    x_ptr, w_ptr, ws_ptr, bias_ptr, res_ptr, out_ptr,
    # sizes (N: output columns; gated, w has 2N rows, the up rows up_offset elements on)
    M, N, K, up_offset,
    # strides
    stride_xm, stride_wn, stride_rm, stride_om,
    # meta-parameters
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Each program quantizes its BLOCK_M rows itself: a first pass over K for the row
    # maxima, then the GEMM loop quantizes every x tile in registers before the int8
    # dot. Same arithmetic as _quantize_per_token_kernel (div_rn, rint), so the result
    # is bit-identical to quantize_per_token followed by the W8A8 kernel. For small M
    # the extra reads of x (once per N block, from L2) cost less than a second launch.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = mask_m[:, None] & (k0 + offs_k[None, :] < K)
        x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    xs = tl.math.div_rn(amax, 127.0)
    xs = tl.where(xs > 0.0, xs, 1.0)

    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_up = acc
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        mask = mask_m[:, None] & (offs_k[None, :] < k_left)
        x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(rint(tl.math.div_rn(x, xs[:, None])), -127.0), 127.0)
        q = q.to(tl.int8)
        b = tl.load(w_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0)
        acc = tl.dot(q, b, acc, out_dtype=tl.int32)
        if GATED:
            b_up = tl.load(
                w_ptrs + up_offset,
                mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0,
            )
            acc_up = tl.dot(q, b_up, acc_up, out_dtype=tl.int32)
        w_ptrs += BLOCK_K

    _epilogue(
        acc, acc_up, xs, ws_ptr, bias_ptr, res_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n,
        N, stride_rm, stride_om, HAS_BIAS, ACTIVATION, GATED, HAS_RESIDUAL,
    )


FUSED_MAX_M = 64  # above this, quantizing once (a separate kernel) is cheaper


def int8_dynamic_linear(
    x, w, w_scale, bias, fused=None, activation=None, gated=False, residual=None
):
    """x [M, K] fp32/fp16/bf16, w [N, K] int8, w_scale [N] float32, bias [N] or None;
    unit stride on K -> [M, N] in x's dtype. fused=None: one kernel for M <= FUSED_MAX_M,
    else quantize_per_token and the W8A8 kernel. activation, gated, residual: as for
    int8_w8a8_linear."""
    M, K = x.shape
    N = w.shape[0] // 2 if gated else w.shape[0]
    if fused is None:
        fused = M <= FUSED_MAX_M
    if not fused:
        from fastllm.triton_kernels.quant import quantize_per_token

        x_int8, x_scale = quantize_per_token(x)
        return int8_w8a8_linear(
            x_int8, x_scale, w, w_scale, bias, x.dtype, activation, gated, residual
        )
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    bm = min(max(triton.next_power_of_2(M), 16), 64)
    if triton_interpreted():
        bn = min(max(triton.next_power_of_2(N), 16), 64)
        bk = min(max(triton.next_power_of_2(K), 32), 128)
        warps, stages = 4, 1
    else:
        bn, bk, warps, stages = 64, 128, 4, 3
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _int8_dynamic_linear_kernel[grid](
        x, w, w_scale, bias if bias is not None else w_scale,
        residual if residual is not None else out, out,
        M, N, K, N * w.stride(0),
        x.stride(0), w.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation], GATED=gated,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return out


# --- W8A16 (weight-only) --------------------------------------------------------------


@triton.jit
def _int8_w8a16_linear_kernel(
    # pointers
    x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, K_PER_SPLIT,
    # strides
    stride_xm, stride_wn, stride_om, stride_os,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,  # dot in float32 (the interpreter's bf16 dot is wrong)
    IEEE: tl.constexpr,  # float32 inputs: a full-precision dot, not tf32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_begin + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k_begin + offs_k)[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_left = k_end - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        elif IEEE:
            acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)  # int8 -> fp16/bf16 is exact
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
        out = acc * ws[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # float32 partial sums [SPLIT_K, M, N]; _splitk_epilogue_kernel finishes
        part_ptrs = (
            out_ptr + pid_k.to(tl.int64) * stride_os
            + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        )
        tl.store(part_ptrs, acc, mask=mask)


@triton.jit
def _splitk_epilogue_kernel(
    # pointers
    part_ptr, ws_ptr, bias_ptr, out_ptr,
    # sizes
    M, N,
    # strides
    stride_pm, stride_ps, stride_om,
    # meta-parameters
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + offs_n, mask=mask_n, other=0.0)
    out = acc * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


def _w8a16_config(M: int, N: int, K: int, device: torch.device, split_k: int | None) -> dict:
    interp = triton_interpreted()
    bm = min(max(triton.next_power_of_2(M), 16), 64)
    if interp:
        bn = min(max(triton.next_power_of_2(N), 16), 64)
        bk = min(max(triton.next_power_of_2(K), 16), 64)
        warps, stages = 4, 1
    else:
        bn, bk = (64, 128) if M <= 16 else (64, 64)
        warps, stages = 4, 4
    if split_k is None:
        # enough programs to fill the GPU about twice; each split keeps >= 4 K-tiles
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        want = triton.cdiv(2 * _sm_count(device), tiles)
        split_k = max(1, min(want, K // (4 * bk), 32))
    split_k = max(1, min(split_k, triton.cdiv(K, bk)))
    # each split covers whole K-tiles, so only the last split sees a ragged end
    k_per_split = triton.cdiv(triton.cdiv(K, bk), split_k) * bk
    split_k = triton.cdiv(K, k_per_split) if K > 0 else 1
    return dict(
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, K_PER_SPLIT=k_per_split,
        num_warps=warps, num_stages=stages,
    )


def int8_w8a16_linear(x, w, w_scale, bias, split_k=None):
    """x [M, K] fp32/fp16/bf16, w [N, K] int8, w_scale [N] float32, bias [N] or None;
    unit stride on K -> [M, N] in x's dtype. split_k=None picks the split from the shape."""
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    cfg = _w8a16_config(M, N, K, x.device, split_k)
    k_per_split = cfg.pop("K_PER_SPLIT")
    split = cfg["SPLIT_K"]
    bias_arg = bias if bias is not None else w_scale
    dst = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]), split)
    _int8_w8a16_linear_kernel[grid](
        x, w, w_scale, bias_arg, dst,
        M, N, K, k_per_split,
        x.stride(0), w.stride(0), dst.stride(-2), dst.stride(0) if split > 1 else 0,
        HAS_BIAS=bias is not None,
        UPCAST=triton_interpreted() and x.dtype == torch.bfloat16,
        IEEE=x.dtype == torch.float32,
        **cfg,
    )
    if split > 1:
        block_n = min(max(triton.next_power_of_2(N), 16), 1024)
        _splitk_epilogue_kernel[(triton.cdiv(N, block_n), M)](
            dst, w_scale, bias_arg, out,
            M, N,
            dst.stride(1), dst.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_N=block_n,
        )
    return out
