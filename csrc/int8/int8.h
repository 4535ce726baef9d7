// Launchers of the int8 matmul kernels (no CUDA headers: included by bindings).
//
// Pointers are device addresses, sizes and leading dimensions are in elements, and
// `stream` is a cudaStream_t. Each returns nullptr on success or a static error string.
// dtype codes are those of dtype.h; bias_dtype is -1 when there is no bias.
#pragma once
#include <cstdint>

namespace fastllm {

// w8a8_gemm.cu: out[m, n] = cast((sum_k x[m, k] * w[n, k]) * x_scale[m] * w_scale[n] + bias[n])
// x [M, K] int8 (row stride ldx), w [N, K] int8 (row stride ldw), x_scale [M] and
// w_scale [N] float32, bias [N] float32/float16/bfloat16 or none, out [M, N] (row
// stride ldo) float32/float16/bfloat16. Requires K, ldx and ldw multiples of 16 and
// 16-byte aligned x and w (16-byte loads); the caller checks.
const char* int8_w8a8_gemm(uintptr_t x, int64_t ldx, uintptr_t x_scale, uintptr_t w, int64_t ldw,
                           uintptr_t w_scale, uintptr_t bias, int bias_dtype, uintptr_t out,
                           int out_dtype, int64_t ldo, int64_t M, int64_t N, int64_t K,
                           uintptr_t stream);

// w8a16_gemv.cu: out[m, n] = cast(w_scale[n] * sum_k x[m, k] * w[n, k] + bias[n]) for
// M <= 64, x and out float16/bfloat16 (same dtype). K, ldw multiples of 16, ldx a
// multiple of 8, x and w 16-byte aligned. With splits > 1 the partial sums go to
// workspace [splits, M, N] float32 and a second kernel reduces them.
const char* int8_w8a16_gemm(uintptr_t x, int x_dtype, int64_t ldx, uintptr_t w, int64_t ldw,
                            uintptr_t w_scale, uintptr_t bias, int bias_dtype, uintptr_t out,
                            int64_t ldo, int64_t M, int64_t N, int64_t K, int splits,
                            uintptr_t workspace, uintptr_t stream);

// int8_epilogue_cpu.cpp (host memory, no stream): out[m, n] = cast(float(acc[m, n]) *
// x_scale[m] * w_scale[n] + bias[n]) for the int32 accumulator acc [M, N] (row stride
// ld_acc) of torch._int_mm. A float32 out may be acc itself (same row stride). Rows are
// split over `threads` OpenMP threads.
const char* int8_epilogue_cpu(uintptr_t acc, int64_t ld_acc, uintptr_t x_scale, uintptr_t w_scale,
                              uintptr_t bias, int bias_dtype, uintptr_t out, int out_dtype,
                              int64_t ld_out, int64_t M, int64_t N, int threads);

// int8_epilogue_cpu.cpp: the epilogue above with, in float32, an activation `act` (0 none,
// 1 gelu, 2 gelu tanh, 3 silu), the gated form (gated != 0: acc [M, 2N] holds gate
// columns then up columns; out[m, n] = act(gate) * up) and a residual [M, N] (row stride
// ld_res, float32/float16/bfloat16, or 0) added last. A float32, non-gated out may be acc.
const char* int8_fused_epilogue_cpu(uintptr_t acc, int64_t ld_acc, uintptr_t x_scale,
                                    uintptr_t w_scale, uintptr_t bias, int bias_dtype, int act,
                                    int gated, uintptr_t residual, int residual_dtype,
                                    int64_t ld_res, uintptr_t out, int out_dtype, int64_t ld_out,
                                    int64_t M, int64_t N, int threads);

// int8_mm_cpu.cpp (host memory): acc[m, n] = sum_k x[m, k] * w[n, k] in int32, exactly
// torch._int_mm(x, w.T), for x [M, K] and w [N, K] int8 (row strides ldx, ldw) into acc
// [M, N] (row stride ld_acc); any sizes. Needs AVX512-VNNI (int8_mm_cpu_available; without
// it the call returns an error). Output columns are split over `threads` OpenMP threads.
bool int8_mm_cpu_available();
const char* int8_mm_cpu(uintptr_t x, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t acc,
                        int64_t ld_acc, int64_t M, int64_t N, int64_t K, int threads);

// w8a16_cpu.cpp (host memory): out[m, n] = cast(w_scale[n] * sum_k x[m, k] * w[n, k] +
// bias[n]) with x and out float32/float16/bfloat16 (one dtype), any M, N, K; output
// channels split over `threads` OpenMP threads.
const char* int8_w8a16_cpu(uintptr_t x, int x_dtype, int64_t ldx, uintptr_t w, int64_t ldw,
                           uintptr_t w_scale, uintptr_t bias, int bias_dtype, uintptr_t out,
                           int64_t ldo, int64_t M, int64_t N, int64_t K, int threads);

}  // namespace fastllm
