// W8A16 matmul for small M (decode): fastllm.ops.int8_weight_only_linear, cuda backend.
//
//   out[m, n] = cast(w_scale[n] * sum_k x[m, k] * float(w[n, k]) + bias[n]),   M <= 64
//
// Memory-bound on the int8 weight, which is read exactly once with 16-byte loads that
// bypass L1, straight into registers (no shared memory). The product runs on the
// tensor cores with the operands swapped, out^T = w x^T: w is the 16-row A operand of
// mma.m16n8k16 (int8 converted to f16/bf16 in registers, exactly), x the 8-column B
// operand, fp32 accumulation; the per-channel scale is applied once at the end.
//
// Each warp owns 16 * R rows of w. Per 64-wide chunk of K, thread (g = lane / 4,
// t = lane % 4) loads the 16 bytes w[row g (and g + 8)][t*16 .. t*16+15] and the 16
// x values x[token g][t*16 .. t*16+15]. The mma's k index is a permutation of the
// chunk's columns that both operands share: in step s (0..3), the thread's A/B pairs
// (logical k = 2t, 2t+1 and 2t+8, 2t+9) are physical columns t*16 + s*4 + {0,1} and
// t*16 + s*4 + {2,3}. A dot product does not depend on the order of its terms, so any
// permutation applied to both operands is exact; this one makes every load 16 bytes.
//
// Split-K: grid.y = splits; each split takes a range of 64-column chunks and, when
// splits > 1, writes float32 partial sums to workspace [splits, M, N] that
// mma::splitk_reduce sums in a fixed order (deterministic) before scale, bias and cast.
// Requirements (checked by fastllm/native/int8.py): K % 16 == 0, ldw % 16 == 0,
// ldx % 8 == 0, x and w 16-byte aligned.
#include "int8/int8.h"
#include "mma_utils.cuh"

namespace fastllm {
namespace {

using namespace mma;

constexpr int kWarps = 4;

template <int MT>
struct Shape {
  static constexpr int R = MT <= 2 ? 2 : 1;  // 16-row tiles of w per warp (mirrored in native/int8.py)
  static constexpr int kRowsPerBlock = kWarps * 16 * R;
};

// Read-only for the kernel's lifetime, so plain asm: the compiler may issue these loads
// early (the unrolled loop keeps two chunks in flight).
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Four int8 (byte i = element i) -> two packed 16-bit floats: lo = (e0, e1), hi = (e2, e3).
// Exact: the biased byte u = s + 128 goes into the mantissa of a float whose exponent
// makes it equal to (magic + u), and subtracting (magic + 128) leaves s.
template <typename T>
__device__ __forceinline__ void dequant4(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t u = w ^ 0x80808080u;
  if constexpr (MmaType<T>::kBF16) {
    // float32: 0x4B000000 | u = 2^23 + u; then one cvt packs two floats into bf16x2.
    const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - 8388736.0f;
    const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - 8388736.0f;
    const float f2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - 8388736.0f;
    const float f3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - 8388736.0f;
    lo = pack2<T>(f0, f1);
    hi = pack2<T>(f2, f3);
  } else {
    // float16: 0x6400 | u = 1024 + u, two at a time; subtract 1152 = 1024 + 128.
    const uint32_t l = __byte_perm(u, 0x64646464u, 0x4140);
    const uint32_t h = __byte_perm(u, 0x64646464u, 0x4342);
    const __half2 bias = __float2half2_rn(1152.0f);
    __half2 a = __hsub2(*reinterpret_cast<const __half2*>(&l), bias);
    __half2 b = __hsub2(*reinterpret_cast<const __half2*>(&h), bias);
    lo = *reinterpret_cast<uint32_t*>(&a);
    hi = *reinterpret_cast<uint32_t*>(&b);
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * 32, 1)
    w8a16_kernel(const T* __restrict__ x, int64_t ldx, const int8_t* __restrict__ w, int64_t ldw,
                 const float* __restrict__ w_scale, const void* __restrict__ bias, int bias_code,
                 T* __restrict__ out, int64_t ldo, float* __restrict__ ws, int M, int N, int K,
                 int chunks_per_split) {
  constexpr int R = Shape<MT>::R;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = (blockIdx.x * kWarps + warp) * 16 * R;
  if (row0 >= N) return;  // no block-wide synchronization below
  const int split = blockIdx.y;
  const int chunks = (K + 63) / 64;
  const int c0 = split * chunks_per_split, c1 = min(c0 + chunks_per_split, chunks);

  // Rows past N and tokens past M read a clamped valid row and are never stored.
  const int8_t* wrow[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      wrow[r][h] = w + int64_t(min(row0 + r * 16 + g + 8 * h, N - 1)) * ldw;
  const T* xrow[MT];
  bool xok[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    xok[j] = j * 8 + g < M;
    xrow[j] = x + int64_t(min(j * 8 + g, M - 1)) * ldx;
  }

  float acc[R][MT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][j][e] = 0.0f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll(MT >= 8 ? 1 : 2)
  for (int c = c0; c < c1; ++c) {
    const int k = c * 64;
    const bool kok = k + t * 16 < K;  // K % 16 == 0: a thread's 16 columns are all in or all out
    // Out-of-range pieces load columns 0..15 of their row instead (valid, as K >= 16
    // whenever a chunk exists; no branch) and are zeroed.
    const int kl = kok ? k + t * 16 : 0;
    uint4 wv[R][2], xv[MT][2];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wv[r][h] = load_stream(wrow[r][h] + kl);
        if (!kok) wv[r][h] = zero;
      }
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const uint4* p = reinterpret_cast<const uint4*>(xrow[j] + kl);
      xv[j][0] = __ldg(p);
      xv[j][1] = __ldg(p + 1);
      if (!(kok && xok[j])) xv[j][0] = xv[j][1] = zero;
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      uint32_t a[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        dequant4<T>(word(wv[r][0], s), a[r][0], a[r][2]);  // row g: k pairs (s*4+0,1), (s*4+2,3)
        dequant4<T>(word(wv[r][1], s), a[r][1], a[r][3]);  // row g + 8
      }
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        // x elements s*4 .. s*4+3 of the thread's 16 are words 2s, 2s+1 of xv[j]
        const uint32_t b[2] = {word(xv[j][s >> 1], (2 * s) & 3), word(xv[j][s >> 1], (2 * s + 1) & 3)};
#pragma unroll
        for (int r = 0; r < R; ++r) mma_f16<T>(acc[r][j], a[r], b);
      }
    }
  }

  // Accumulator element e of tile (r, j): w row g + 8 * (e / 2), token 2t + e % 2.
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = row0 + r * 16 + g + 8 * h;
      if (n >= N) continue;
      float scale = 1.0f, b = 0.0f;
      if (ws == nullptr) {
        scale = w_scale[n];
        if (bias != nullptr) b = load_bias(bias, bias_code, n);
      }
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = j * 8 + 2 * t + e;
          if (m >= M) continue;
          const float v = acc[r][j][2 * h + e];
          if (ws == nullptr) {
            out[int64_t(m) * ldo + n] = from_float<T>(v * scale + b);
          } else {
            ws[(int64_t(split) * M + m) * N + n] = v;
          }
        }
    }
}

template <typename T, int MT>
const char* launch(const T* x, int64_t ldx, const int8_t* w, int64_t ldw, const float* wsc,
                   const void* bias, int bias_code, T* out, int64_t ldo, int M, int N, int K, int splits,
                   float* ws, cudaStream_t stream) {
  const int chunks = (K + 63) / 64;
  const int per_split = (chunks + splits - 1) / splits;
  const int64_t blocks = (int64_t(N) + Shape<MT>::kRowsPerBlock - 1) / Shape<MT>::kRowsPerBlock;
  if (blocks > 2147483647LL) return "int8_w8a16_gemm: N too large";
  dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  w8a16_kernel<T, MT><<<grid, kWarps * 32, 0, stream>>>(x, ldx, w, ldw, wsc, bias, bias_code, out, ldo,
                                                       splits > 1 ? ws : nullptr, M, N, K, per_split);
  const char* err = launch_status();
  if (err != nullptr || splits == 1) return err;
  return splitk_reduce<T>(ws, splits, M, N, wsc, bias, bias_code, out, ldo, stream);
}

template <typename T>
const char* dispatch(uintptr_t x, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t wsc, uintptr_t bias,
                     int bias_code, uintptr_t out, int64_t ldo, int M, int N, int K, int splits,
                     uintptr_t ws, cudaStream_t s) {
  auto X = reinterpret_cast<const T*>(x);
  auto W = reinterpret_cast<const int8_t*>(w);
  auto S = reinterpret_cast<const float*>(wsc);
  auto B = reinterpret_cast<const void*>(bias);
  auto O = reinterpret_cast<T*>(out);
  auto WS = reinterpret_cast<float*>(ws);
  if (M <= 8) return launch<T, 1>(X, ldx, W, ldw, S, B, bias_code, O, ldo, M, N, K, splits, WS, s);
  if (M <= 16) return launch<T, 2>(X, ldx, W, ldw, S, B, bias_code, O, ldo, M, N, K, splits, WS, s);
  if (M <= 32) return launch<T, 4>(X, ldx, W, ldw, S, B, bias_code, O, ldo, M, N, K, splits, WS, s);
  return launch<T, 8>(X, ldx, W, ldw, S, B, bias_code, O, ldo, M, N, K, splits, WS, s);
}

}  // namespace

const char* int8_w8a16_gemm(uintptr_t x, int x_dtype, int64_t ldx, uintptr_t w, int64_t ldw,
                            uintptr_t w_scale, uintptr_t bias, int bias_dtype, uintptr_t out,
                            int64_t ldo, int64_t M, int64_t N, int64_t K, int splits,
                            uintptr_t workspace, uintptr_t stream) {
  if (M == 0 || N == 0) return nullptr;
  if (M < 0 || M > 64) return "int8_w8a16_gemm: M must be in [1, 64]";
  if (N < 0 || K < 0 || N > 2147483647LL || K > 2147483647LL) return "int8_w8a16_gemm: N, K out of range";
  if (K % 16 != 0 || ldw % 16 != 0 || ldx % 8 != 0 || (x | w) % 16 != 0)
    return "int8_w8a16_gemm: K and ldw must be multiples of 16, ldx of 8, x and w 16-byte aligned";
  const int64_t chunks = (K + 63) / 64;
  if (splits < 1 || splits > 65535 || (splits > 1 && workspace == 0) || (K > 0 && splits > chunks))
    return "int8_w8a16_gemm: splits must be in [1, ceil(K / 64)] with a workspace when > 1";
  if (bias == 0) bias_dtype = -1;
  const cudaStream_t s = as_stream(stream);
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  switch (static_cast<DType>(x_dtype)) {
    case DType::kFloat16:
      return dispatch<__half>(x, ldx, w, ldw, w_scale, bias, bias_dtype, out, ldo, m, n, k, splits, workspace, s);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(x, ldx, w, ldw, w_scale, bias, bias_dtype, out, ldo, m, n, k, splits,
                                     workspace, s);
    default: return "int8_w8a16_gemm: x dtype must be float16 or bfloat16";
  }
}

}  // namespace fastllm
