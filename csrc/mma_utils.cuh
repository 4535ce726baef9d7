// PTX wrappers shared by the tensor-core matmul kernels (csrc/int8, csrc/sparse):
// cp.async, ldmatrix, mma.sync / mma.sp, the output cast, and the split-K reduction.
//
// Fragment layouts follow the PTX ISA ("Matrix fragments for mma.m16n8k*"): with
// g = lane / 4 and t = lane % 4, a thread holds rows g and g + 8 of A and column g of B.
#pragma once
#include <cstdint>

#include "cuda_utils.cuh"

namespace fastllm {
namespace mma {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes < 16 zero-fills the rest (0: no global read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices (8 rows of 16 bytes each); lane l gives the address of row
// l % 8 of matrix l / 8, and receives in r[i] the 4 bytes (row l / 4, bytes 4*(l%4)..)
// of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The mma wrappers are plain (not volatile) asm: pure functions of their register
// operands, so the compiler may interleave them with independent loads. Everything that
// touches memory (cp.async, ldmatrix) stays volatile, ordered by the barriers.

// d += a * b, m16n8k32, s8 x s8 -> s32.
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T>
struct MmaType;
template <>
struct MmaType<__half> {
  static constexpr bool kBF16 = false;
};
template <>
struct MmaType<__nv_bfloat16> {
  static constexpr bool kBF16 = true;
};

// d += a * b, m16n8k16, f16/bf16 -> f32.
template <typename T>
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (MmaType<T>::kBF16) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// d += A * b with a 2:4-sparse A, m16n8k32, f16/bf16 -> f32, sparsity selector 0 (the
// only one allowed for this shape: threads t = 0, 1 of each quad give the metadata).
// The ordered-metadata form (PTX 8.5, CUDA 12.5) requires the two indices of each
// group in ascending order, which the compressed format guarantees.
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define FASTLLM_MMA_SP "mma.sp::ordered_metadata"
#else
#define FASTLLM_MMA_SP "mma.sp"
#endif
template <typename T>
__device__ __forceinline__ void mma_sp_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                           uint32_t e) {
  if constexpr (MmaType<T>::kBF16) {
    asm(FASTLLM_MMA_SP
                 ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e));
  } else {
    asm(FASTLLM_MMA_SP
                 ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e));
  }
}

// float -> output element, rounding to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two float32 -> a packed pair of 16-bit floats (low half = lo), one cvt instruction.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (MmaType<T>::kBF16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// A bias element of any float dtype (code as in dtype.h; the pointer may be null).
__device__ __forceinline__ float load_bias(const void* bias, int code, int64_t i) {
  switch (code) {
    case static_cast<int>(DType::kFloat32): return static_cast<const float*>(bias)[i];
    case static_cast<int>(DType::kFloat16): return __half2float(static_cast<const __half*>(bias)[i]);
    case static_cast<int>(DType::kBFloat16):
      return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[i]);
    default: return 0.0f;
  }
}

// out[m, n] = cast(sum_s ws[s, m, n] * scale[n] + bias[n]) for split-K partial sums
// ws [splits, M, N] float32; scale may be null (1). Summed in split order: deterministic.
template <typename OutT>
__global__ void __launch_bounds__(256)
    splitk_reduce_kernel(const float* __restrict__ ws, int splits, int64_t M, int64_t N,
                         const float* __restrict__ scale, const void* __restrict__ bias,
                         int bias_code, OutT* __restrict__ out, int64_t ldo) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i - m * N;
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) acc += ws[s * total + i];
    if (scale != nullptr) acc *= scale[n];
    if (bias != nullptr) acc += load_bias(bias, bias_code, n);
    out[m * ldo + n] = from_float<OutT>(acc);
  }
}

template <typename OutT>
inline const char* splitk_reduce(const float* ws, int splits, int64_t M, int64_t N, const float* scale,
                                 const void* bias, int bias_code, OutT* out, int64_t ldo,
                                 cudaStream_t stream) {
  const int64_t total = M * N;
  int64_t blocks = (total + 255) / 256;
  if (blocks > 65536) blocks = 65536;
  splitk_reduce_kernel<OutT><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      ws, splits, M, N, scale, bias, bias_code, out, ldo);
  return launch_status();
}

}  // namespace mma
}  // namespace fastllm
