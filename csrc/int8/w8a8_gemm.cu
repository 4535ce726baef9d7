// W8A8 GEMM with the dequantization epilogue fused (fastllm.ops.int8_linear, cuda backend).
//
//   out[m, n] = cast(float(sum_k x[m, k] * w[n, k]) * x_scale[m] * w_scale[n] + bias[n])
//
// x [M, K] int8 (per-token scales), w [N, K] int8 (per-channel scales), int32
// accumulation on the tensor cores (mma.sync m16n8k32 s8.s8.s32). The int32 tile never
// leaves registers: scales, bias and the cast to float32/float16/bfloat16 are applied to
// the accumulator fragments, and that is the only write to memory.
//
// Tiling: a block computes a BM x BN tile of out; K goes through shared memory 64 bytes
// at a time in a STAGES-deep cp.async ring. Each shared row is 64 int8 = four 16-byte
// chunks; chunk c of row r is stored at chunk c ^ ((r >> 1) & 3), so that the eight rows
// an ldmatrix phase reads hit eight different 16-byte bank groups.
//
// Edges: rows past M or N and the K tail are zero-filled by cp.async (src-size 0, no
// global read); whole 16-byte chunks need K % 16 == 0 (the launcher in
// fastllm/native/int8.py checks it and falls back otherwise).
// The reference is fastllm/reference/int8.py.
#include "int8/int8.h"
#include "mma_utils.cuh"

namespace fastllm {
namespace {

using namespace mma;

constexpr int kBK = 64;  // int8 elements of K per stage (one 64-byte shared row)

__device__ __forceinline__ uint32_t swz64(int row, int chunk) {
  return static_cast<uint32_t>(row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4));
}

template <typename T>
struct Pair;
template <>
struct Pair<float> {
  using type = float2;
  static __device__ __forceinline__ type make(float a, float b) { return make_float2(a, b); }
};
template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

template <int BM, int BN, int WM, int WN, int STAGES>
struct Tile {
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int TM = BM / WM, TN = BN / WN;  // warp tile
  static constexpr int MI = TM / 16, NI = TN / 8;   // mma tiles per warp
  static constexpr int kStageA = BM * kBK, kStageB = BN * kBK;
  static constexpr int kSmem = STAGES * (kStageA + kStageB);
  static_assert(TM % 16 == 0 && TN % 16 == 0, "warp tile must be a multiple of 16 x 16");
};

template <int BM, int BN, int WM, int WN, int STAGES, typename OutT>
__global__ void __launch_bounds__(WM* WN * 32)
    w8a8_gemm_kernel(const int8_t* __restrict__ x, int64_t ldx, const float* __restrict__ x_scale,
                     const int8_t* __restrict__ w, int64_t ldw, const float* __restrict__ w_scale,
                     const void* __restrict__ bias, int bias_code, OutT* __restrict__ out, int64_t ldo,
                     int M, int N, int K) {
  using C = Tile<BM, BN, WM, WN, STAGES>;
  extern __shared__ __align__(128) uint8_t smem[];

  // Grouped rasterization: GROUP consecutive row tiles sweep the column tiles together,
  // so the w tiles they share are still in L2.
  constexpr int kGroup = 8;
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int pid = blockIdx.x, width = kGroup * tiles_n;
  const int first_m = (pid / width) * kGroup;
  const int gsize = min(tiles_m - first_m, kGroup);
  const int m0 = (first_m + (pid % width) % gsize) * BM;
  const int n0 = ((pid % width) / gsize) * BN;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int ktiles = (K + kBK - 1) / kBK;
  const uint32_t sbase = smem_addr(smem);

  auto load_tile = [&](int stage, int kt) {
    const uint32_t sa = sbase + stage * (C::kStageA + C::kStageB), sb = sa + C::kStageA;
    const int k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < (BM * 4 + C::kThreads - 1) / C::kThreads; ++i) {
      const int idx = tid + i * C::kThreads;
      if (BM * 4 % C::kThreads == 0 || idx < BM * 4) {
        const int r = idx >> 2, c = idx & 3, k = k0 + c * 16;
        const bool ok = k < K && m0 + r < M;  // else zero-filled, no global read
        cp_async16(sa + swz64(r, c), ok ? x + int64_t(m0 + r) * ldx + k : x, ok ? 16u : 0u);
      }
    }
#pragma unroll
    for (int i = 0; i < (BN * 4 + C::kThreads - 1) / C::kThreads; ++i) {
      const int idx = tid + i * C::kThreads;
      if (BN * 4 % C::kThreads == 0 || idx < BN * 4) {
        const int r = idx >> 2, c = idx & 3, k = k0 + c * 16;
        const bool ok = k < K && n0 + r < N;  // else zero-filled, no global read
        cp_async16(sb + swz64(r, c), ok ? w + int64_t(n0 + r) * ldw + k : w, ok ? 16u : 0u);
      }
    }
  };

  int acc[C::MI][C::NI][4];
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int j = 0; j < C::NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    // Tile kt has landed once at most STAGES - 2 groups are pending; the barrier makes
    // it visible to all threads and guarantees that the stage overwritten next (read
    // in iteration kt - 1) is no longer being read.
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < ktiles) load_tile(next % STAGES, next);
    cp_async_commit();

    const uint32_t sa = sbase + (kt % STAGES) * (C::kStageA + C::kStageB), sb = sa + C::kStageA;
#pragma unroll
    for (int kk = 0; kk < kBK / 32; ++kk) {
      uint32_t a[C::MI][4], b[C::NI][2];
#pragma unroll
      for (int i = 0; i < C::MI; ++i) {
        // matrices: rows 0-7 / 8-15 of k 0-15, then rows 0-7 / 8-15 of k 16-31
        const int r = wm * C::TM + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(a[i], sa + swz64(r, 2 * kk + (lane >> 4)));
      }
#pragma unroll
      for (int j = 0; j < C::NI; j += 2) {
        // matrices: cols 0-7 of k 0-15 / k 16-31, then cols 8-15 of k 0-15 / k 16-31
        const int r = wn * C::TN + j * 8 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t q[4];
        ldmatrix_x4(q, sb + swz64(r, 2 * kk + ((lane >> 3) & 1)));
        b[j][0] = q[0];
        b[j][1] = q[1];
        b[j + 1][0] = q[2];
        b[j + 1][1] = q[3];
      }
#pragma unroll
      for (int i = 0; i < C::MI; ++i)
#pragma unroll
        for (int j = 0; j < C::NI; ++j) mma_s8(acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();  // only empty groups remain; leave none in flight

  // Epilogue: accumulator element e of tile (i, j) is row g + 8 * (e / 2), column
  // 2 * t + e % 2 of that 16 x 8 tile.
  const int g = lane >> 2, t = lane & 3;
  float ws[C::NI][2], bs[C::NI][2];
#pragma unroll
  for (int j = 0; j < C::NI; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int n = n0 + wn * C::TN + j * 8 + 2 * t + e;
      ws[j][e] = n < N ? w_scale[n] : 0.0f;
      bs[j][e] = (n < N && bias != nullptr) ? load_bias(bias, bias_code, n) : 0.0f;
    }
  const bool pair_store = (ldo & 1) == 0;
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + wm * C::TM + i * 16 + g + 8 * h;
      if (m >= M) continue;
      const float xs = x_scale[m];
      OutT* row = out + int64_t(m) * ldo;
#pragma unroll
      for (int j = 0; j < C::NI; ++j) {
        const int n = n0 + wn * C::TN + j * 8 + 2 * t;
        const float v0 = __int2float_rn(acc[i][j][2 * h]) * xs * ws[j][0] + bs[j][0];
        const float v1 = __int2float_rn(acc[i][j][2 * h + 1]) * xs * ws[j][1] + bs[j][1];
        if (pair_store && n + 1 < N) {
          *reinterpret_cast<typename Pair<OutT>::type*>(row + n) = Pair<OutT>::make(v0, v1);
        } else {
          if (n < N) row[n] = from_float<OutT>(v0);
          if (n + 1 < N) row[n + 1] = from_float<OutT>(v1);
        }
      }
    }
}

template <int BM, int BN, int WM, int WN, int STAGES, typename OutT>
const char* launch(const int8_t* x, int64_t ldx, const float* xs, const int8_t* w, int64_t ldw,
                   const float* wsc, const void* bias, int bias_code, OutT* out, int64_t ldo, int M,
                   int N, int K, cudaStream_t stream) {
  using C = Tile<BM, BN, WM, WN, STAGES>;
  auto kernel = w8a8_gemm_kernel<BM, BN, WM, WN, STAGES, OutT>;
  static std::atomic<uint64_t> smem_set{0};
  if (const char* err = allow_smem(kernel, C::kSmem, smem_set)) return err;
  const int64_t tiles = int64_t((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  if (tiles > 2147483647LL) return "int8_w8a8_gemm: too many tiles";
  kernel<<<static_cast<unsigned>(tiles), C::kThreads, C::kSmem, stream>>>(
      x, ldx, xs, w, ldw, wsc, bias, bias_code, out, ldo, M, N, K);
  return launch_status();
}

template <typename OutT>
const char* dispatch(uintptr_t x, int64_t ldx, uintptr_t xs, uintptr_t w, int64_t ldw, uintptr_t wsc,
                     uintptr_t bias, int bias_code, uintptr_t out, int64_t ldo, int M, int N, int K,
                     cudaStream_t stream) {
  auto X = reinterpret_cast<const int8_t*>(x);
  auto W = reinterpret_cast<const int8_t*>(w);
  auto XS = reinterpret_cast<const float*>(xs);
  auto WS = reinterpret_cast<const float*>(wsc);
  auto B = reinterpret_cast<const void*>(bias);
  auto O = reinterpret_cast<OutT*>(out);
  // Small M (decode, small batches): 32 x 64 tiles, 4 warps, so that N alone gives
  // enough blocks. Otherwise 128 x 128 tiles, 8 warps of 64 x 32, 4 stages (64 KiB).
  if (M <= 32) return launch<32, 64, 2, 2, 4, OutT>(X, ldx, XS, W, ldw, WS, B, bias_code, O, ldo, M, N, K, stream);
  return launch<128, 128, 2, 4, 4, OutT>(X, ldx, XS, W, ldw, WS, B, bias_code, O, ldo, M, N, K, stream);
}

}  // namespace

const char* int8_w8a8_gemm(uintptr_t x, int64_t ldx, uintptr_t x_scale, uintptr_t w, int64_t ldw,
                           uintptr_t w_scale, uintptr_t bias, int bias_dtype, uintptr_t out,
                           int out_dtype, int64_t ldo, int64_t M, int64_t N, int64_t K,
                           uintptr_t stream) {
  if (M == 0 || N == 0) return nullptr;
  if (M < 0 || N < 0 || K < 0 || M > 2147483647LL || N > 2147483647LL || K > 2147483647LL)
    return "int8_w8a8_gemm: M, N and K must be in [0, 2^31)";
  if (K % 16 != 0 || ldx % 16 != 0 || ldw % 16 != 0 || (x | w) % 16 != 0)
    return "int8_w8a8_gemm: K, the row strides and the x/w addresses must be multiples of 16";
  if (bias == 0) bias_dtype = -1;
  const cudaStream_t s = as_stream(stream);
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  switch (static_cast<DType>(out_dtype)) {
    case DType::kFloat32: return dispatch<float>(x, ldx, x_scale, w, ldw, w_scale, bias, bias_dtype, out, ldo, m, n, k, s);
    case DType::kFloat16: return dispatch<__half>(x, ldx, x_scale, w, ldw, w_scale, bias, bias_dtype, out, ldo, m, n, k, s);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(x, ldx, x_scale, w, ldw, w_scale, bias, bias_dtype, out, ldo, m, n, k, s);
    default: return "int8_w8a8_gemm: out dtype must be float32, float16 or bfloat16";
  }
}

}  // namespace fastllm
