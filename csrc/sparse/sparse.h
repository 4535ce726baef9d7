// Launchers of the 2:4 sparse kernels (no CUDA headers: included by bindings).
#pragma once
#include <cstdint>

namespace fastllm {

// sparse24_gemm.cu: out[m, n] = cast(sum_k x[m, k] * W[n, k] + bias[n]) with W (N, K) 2:4
// sparse in the compressed format of fastllm/sparse/format.py: values [N, K/2] (row
// stride ldv) of x's dtype (float16/bfloat16), metadata int16 [N, K/16] (row stride
// ldm). x [M, K] (row stride ldx), out [M, N] (row stride ldo), x's dtype; bias [N] of
// any float dtype or none (bias_dtype -1). Requires K % 64 == 0, ldx and ldv multiples
// of 8, ldm a multiple of 4, x and values 16-byte and metadata 8-byte aligned.
// splits > 1 (small M only) writes float32 partial sums to workspace [splits, M, N].
const char* sparse24_gemm(uintptr_t x, int dtype, int64_t ldx, uintptr_t values, int64_t ldv,
                          uintptr_t metadata, int64_t ldm, uintptr_t bias, int bias_dtype,
                          uintptr_t out, int64_t ldo, int64_t M, int64_t N, int64_t K, int splits,
                          uintptr_t workspace, uintptr_t stream);

}  // namespace fastllm
