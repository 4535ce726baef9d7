// Device helpers of the attention kernels: cp.async, ldmatrix, mma.sync m16n8k16,
// and the score transform + online softmax shared by prefill.cu and decode.cu.
//
// Fragment layouts of mma.m16n8k16 (16-bit A/B, fp32 C/D), with g = lane / 4 and
// c = lane % 4 ("thread in group"), from the PTX ISA:
//   A (16x16, row-major), 4 x b32, each two consecutive columns (low half = lower column):
//     a0 = A[g][2c..2c+1]   a1 = A[g+8][2c..2c+1]   a2 = A[g][2c+8..]   a3 = A[g+8][2c+8..]
//   B (16x8, indexed B[k][n]), 2 x b32:
//     b0 = B[2c..2c+1][g]   b1 = B[2c+8..2c+9][g]
//   C (16x8, fp32), 4 floats:
//     c0,c1 = C[g][2c..2c+1]   c2,c3 = C[g+8][2c..2c+1]
// ldmatrix.m8n8.x4: lanes 8i..8i+7 give the 8 row addresses (16 bytes each) of matrix i;
// register i of lane l receives M_i[l/4][2(l%4)..2(l%4)+1] (.trans: M_i[2(l%4)..+1][l/4],
// i.e. two elements of one column).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastllm {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills the destination (and reads nothing).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  cp_async_16(smem_addr(dst), src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// d += a * b on one 16x8x16 tile, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one b32 of two 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffff, v, 1);
  return v + __shfl_xor_sync(0xffffffff, v, 2);
}

// Scores of one warp's 16 x (8 * NT) tile -> logits in log2 units, masked to -inf.
// s[t][e] belongs to query row g + 8 * (e / 2) of the warp and key key0 + 8 t + 2c + e % 2.
// Row i of the two (i = e / 2) may see keys lo[i] <= key < hi[i].
template <int NT>
__device__ __forceinline__ void scores_to_logits(float (&s)[NT][4], int key0, const int (&lo)[2],
                                                 const int (&hi)[2], bool mask, float scale_log2,
                                                 float softcap_scale, float softcap_log2) {
  const int c = threadIdx.x % 4;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[t][e];
      // softcap_scale > 0: softcap * tanh(scale * raw / softcap), then to log2 units
      x = softcap_scale > 0.0f ? tanh_approx(x * softcap_scale) * softcap_log2 : x * scale_log2;
      if (mask) {
        const int key = key0 + 8 * t + 2 * c + (e & 1);
        if (key < lo[e >> 1] || key >= hi[e >> 1]) x = -INFINITY;
      }
      s[t][e] = x;
    }
  }
}

// One online-softmax step for the two rows a thread holds: updates the running max m
// (log2 units; -inf before any key), turns s into probabilities exp2(s - m), adds their
// thread-local row sums to l (reduced over the quad only at the end) and returns the factor
// by which the accumulator must be rescaled.
template <int NT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float (&m)[2], float (&l)[2],
                                               float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = m[i];
#pragma unroll
    for (int t = 0; t < NT; ++t) mx = fmaxf(mx, fmaxf(s[t][2 * i], s[t][2 * i + 1]));
    mx = quad_max(mx);
    // a row that has seen only masked keys keeps m = -inf; subtract 0 instead so that
    // exp2 gives 0 rather than NaN
    const float ref = mx == -INFINITY ? 0.0f : mx;
    alpha[i] = exp2f(m[i] - ref);
    m[i] = mx;
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      s[t][2 * i] = exp2f(s[t][2 * i] - ref);
      s[t][2 * i + 1] = exp2f(s[t][2 * i + 1] - ref);
      sum += s[t][2 * i] + s[t][2 * i + 1];
    }
    l[i] = l[i] * alpha[i] + sum;
  }
}

// --- inf/NaN values of keys a row does not see -----------------------------------------
// In a masked tile a row's p is 0 for the keys it does not see, and the mma would still
// multiply those keys' values: 0 * inf = NaN. So a masked tile whose V holds an inf or NaN
// (checked for every masked tile, rare in practice: a recycled cache block, an empty
// allocation) takes a slow path: each accumulator element first gets the non-finite values
// of the keys its row sees added to it (inf + -inf = NaN, as IEEE sums them; a seen key
// whose p underflowed to 0 gives inf here where p * inf would be NaN: non-finite either
// way), then those values are set to 0 in shared memory for the mma.

template <typename T>
struct ExponentBits;  // all exponent bits set: inf or NaN
template <>
struct ExponentBits<__half> {
  static constexpr uint32_t kMask = 0x7c00u;
};
template <>
struct ExponentBits<__nv_bfloat16> {
  static constexpr uint32_t kMask = 0x7f80u;
};

template <typename T>
__device__ __forceinline__ bool nonfinite_bits(uint32_t bits16) {
  constexpr uint32_t e = ExponentBits<T>::kMask;
  return (bits16 & e) == e;
}

// Any inf/NaN among the ROWS x D values of a tile in shared memory (row stride D + 8).
// Every thread of the block calls it: it ends in a barrier.
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ bool tile_has_nonfinite(const T* tile) {
  constexpr int kChunksPerRow = D / 8;
  bool bad = false;
  for (int i = threadIdx.x; i < ROWS * kChunksPerRow; i += THREADS) {
    const uint4 x = *reinterpret_cast<const uint4*>(tile + (i / kChunksPerRow) * (D + 8) +
                                                    (i % kChunksPerRow) * 8);
    const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) bad |= nonfinite_bits<T>(w[j]) || nonfinite_bits<T>(w[j] >> 16);
  }
  return __syncthreads_or(bad) != 0;
}

// Sets the inf/NaN values of the tile to 0 (the caller synchronizes before and after).
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ void zero_nonfinite(T* tile) {
  for (int i = threadIdx.x; i < ROWS * D; i += THREADS) {
    uint16_t* x = reinterpret_cast<uint16_t*>(tile + (i / D) * (D + 8) + i % D);
    if (nonfinite_bits<T>(*x)) *x = 0;
  }
}

// Adds to the accumulator fragment (rows g and g + 8 of the warp, columns 8 t + 2c + e) the
// inf/NaN values among keys [key0, key0 + n_keys) of the tile (key key0 + r at tile row r,
// row stride D + 8) that the row sees: lo[i] <= key < hi[i].
template <typename T, int DT>
__device__ __forceinline__ void add_nonfinite(float (&acc)[DT][4], const T* tile, int key0,
                                              int n_keys, const int (&lo)[2], const int (&hi)[2]) {
  constexpr int kStride = 8 * DT + 8;
  const int c = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int from = max(lo[i], key0), to = min(hi[i], key0 + n_keys);
    for (int key = from; key < to; ++key) {
      const T* row = tile + (key - key0) * kStride + 2 * c;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const T x = row[8 * t + e];
          if (nonfinite_bits<T>(*reinterpret_cast<const uint16_t*>(&x)))
            acc[t][2 * i + e] += static_cast<float>(x);
        }
      }
    }
  }
}

// Clamp of a 64-bit key bound into [0, n].
__device__ __forceinline__ int clamp_key(long long x, int n) {
  return static_cast<int>(x < 0 ? 0 : (x > n ? n : x));
}

// Keys [lo, hi) that query position `pos` may see among n keys; window_left/right < 0:
// unbounded on that side (causal is window_right = 0).
__device__ __forceinline__ void key_range(long long pos, int n, int window_left, int window_right,
                                          int& lo, int& hi) {
  lo = window_left < 0 ? 0 : clamp_key(pos - window_left, n);
  hi = window_right < 0 ? n : clamp_key(pos + window_right + 1, n);
}

}  // namespace attn
}  // namespace fastllm
