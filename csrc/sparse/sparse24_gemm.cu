// 2:4 sparse matmul on the sparse tensor cores (fastllm.ops.sparse24_linear, cuda backend).
//
//   out[m, n] = cast(sum_k x[m, k] * W[n, k] + bias[n]),   W (N, K) 2:4 sparse
//
// W arrives compressed (fastllm/sparse/format.py): values [N, K/2] hold the two kept
// elements of each group of 4 along K in ascending k order, metadata int16 [N, K/16]
// holds per 16-column chunk one nibble per group (bits 0-1 first index, 2-3 second).
// W is the sparse A operand of mma.sp m16n8k32 (f16/bf16 -> f32) computing
// out^T = W x^T, so W's rows are the mma's M dimension and tokens its N dimension.
//
// Operands, per 16-row x 32-column step of W (PTX ISA, sparse mma.m16n8k32 f16/bf16),
// with g = lane / 4, t = lane % 4:
//   A: the compressed 16 x 16 tile of values, laid out like a dense m16n8k16 A
//      fragment: {row g, cols 2t..2t+1}, {row g+8, same}, {row g, cols 8+2t..},
//      {row g+8, cols 8+2t..} -- one ldmatrix.x4.
//   metadata: threads t = 0 and 1 of each quad (sparsity selector 0) hold, for
//      16-column chunk t of the step, row g's 16-bit word in bits 0-15 and row g+8's
//      in bits 16-31. That word is metadata[n, c] exactly as stored: no reorder step.
//      (Threads t = 2, 3 load the same words; the instruction ignores them.)
//   B: x rows are B's columns: {token g, k = 8j + 2t .. 8j + 2t + 1} for j = 0..3 --
//      one ldmatrix.x4 over four 8 x 8 blocks of the x tile.
//
// Tiling: a block computes BW rows of W x BT tokens; K goes through shared memory 64
// columns at a time (32 values = 64 bytes and 4 metadata words per W row, 128 bytes
// per x row) in a STAGES-deep cp.async ring; 16-byte chunks are XOR-swizzled so that
// ldmatrix reads are free of bank conflicts. Rows of W past N load a clamped valid
// row (never stored; it keeps the metadata valid, since all-zero nibbles are undefined
// for mma.sp); tokens past M are zero-filled without reading memory. K % 64 == 0 is required (fastllm/native/sparse.py falls back
// otherwise). Small M splits K (grid.z) into float32 partial sums in a workspace that
// mma::splitk_reduce adds in a fixed order. The reference is fastllm/reference/sparse.py.
#include "mma_utils.cuh"
#include "sparse/sparse.h"

namespace fastllm {
namespace {

using namespace mma;

constexpr int kBK = 64;  // columns of K per stage

template <int BW, int BT, int WW, int WT, int STAGES>
struct Tile {
  static constexpr int kThreads = WW * WT * 32;
  static constexpr int TW = BW / WW, TT = BT / WT;  // warp tile: W rows x tokens
  static constexpr int MI = TW / 16, NI = TT / 8;
  static constexpr int kStageV = BW * 64;   // values: 32 x 2 bytes per row
  static constexpr int kStageE = BW * 8;    // metadata: 4 x int16 per row
  static constexpr int kStageX = BT * 128;  // x: 64 x 2 bytes per token
  static constexpr int kStage = kStageV + kStageE + kStageX;
  static constexpr int kSmem = STAGES * kStage;
  static_assert(TW % 16 == 0 && TT % 8 == 0, "warp tile must be a multiple of 16 x 8");
  static_assert(kStage % 16 == 0, "stages must stay 16-byte aligned");
};

// 64-byte rows (4 chunks), chunk c of row r stored at c ^ ((r >> 1) & 3).
__device__ __forceinline__ uint32_t swz64(int row, int chunk) {
  return static_cast<uint32_t>(row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4));
}
// 128-byte rows (8 chunks), chunk c of row r stored at c ^ (r & 7).
__device__ __forceinline__ uint32_t swz128(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

template <typename T, int BW, int BT, int WW, int WT, int STAGES>
__global__ void __launch_bounds__(WW* WT * 32)
    sparse24_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ values, int64_t ldv,
                    const int16_t* __restrict__ meta, int64_t ldm, const void* __restrict__ bias,
                    int bias_code, T* __restrict__ out, int64_t ldo, float* __restrict__ ws, int M, int N,
                    int K, int ktiles_per_split) {
  using C = Tile<BW, BT, WW, WT, STAGES>;
  extern __shared__ __align__(128) uint8_t smem[];

  const int n0 = blockIdx.x * BW, m0 = blockIdx.y * BT, split = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ww = warp / WT, wt = warp % WT;
  const int g = lane >> 2, t = lane & 3;
  const int kt0 = split * ktiles_per_split;
  const int ntiles = max(0, min(kt0 + ktiles_per_split, K / kBK) - kt0);
  const uint32_t sbase = smem_addr(smem);

  auto load_tile = [&](int stage, int kt) {
    const uint32_t sv = sbase + stage * C::kStage, se = sv + C::kStageV, sx = se + C::kStageE;
#pragma unroll
    for (int i = 0; i < (BW * 4 + C::kThreads - 1) / C::kThreads; ++i) {
      const int idx = tid + i * C::kThreads;
      if (BW * 4 % C::kThreads == 0 || idx < BW * 4) {
        const int r = idx >> 2, c = idx & 3;
        const int64_t n = min(n0 + r, N - 1);
        cp_async16(sv + swz64(r, c), values + n * ldv + kt * (kBK / 2) + c * 8, 16u);
      }
    }
#pragma unroll
    for (int i = 0; i < (BW + C::kThreads - 1) / C::kThreads; ++i) {
      const int r = tid + i * C::kThreads;
      if (BW % C::kThreads == 0 || r < BW) {
        const int64_t n = min(n0 + r, N - 1);
        cp_async8(se + r * 8, meta + n * ldm + kt * (kBK / 16));
      }
    }
#pragma unroll
    for (int i = 0; i < (BT * 8 + C::kThreads - 1) / C::kThreads; ++i) {
      const int idx = tid + i * C::kThreads;
      if (BT * 8 % C::kThreads == 0 || idx < BT * 8) {
        const int r = idx >> 3, c = idx & 7;
        const bool ok = m0 + r < M;  // tokens past M: zero-filled, no global read
        cp_async16(sx + swz128(r, c), ok ? x + int64_t(m0 + r) * ldx + kt * kBK + c * 8 : x, ok ? 16u : 0u);
      }
    }
  };

  float acc[C::MI][C::NI][4];
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int j = 0; j < C::NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) load_tile(s, kt0 + s);
    cp_async_commit();
  }

  for (int i = 0; i < ntiles; ++i) {
    // Tile i has landed once at most STAGES - 2 groups are pending; the barrier also
    // guarantees that stage (i - 1) % STAGES, refilled next, is no longer being read.
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = i + STAGES - 1;
    if (next < ntiles) load_tile(next % STAGES, kt0 + next);
    cp_async_commit();

    const int stage = i % STAGES;
    const uint32_t sv = sbase + stage * C::kStage, sx = sv + C::kStageV + C::kStageE;
    const uint16_t* se = reinterpret_cast<const uint16_t*>(smem + stage * C::kStage + C::kStageV);
#pragma unroll
    for (int kk = 0; kk < kBK / 32; ++kk) {
      uint32_t a[C::MI][4], e[C::MI], b[C::NI][4];
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi) {
        const int r = ww * C::TW + mi * 16;
        ldmatrix_x4(a[mi], sv + swz64(r + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * kk + (lane >> 4)));
        const int c = 2 * kk + (t & 1);  // 16-column chunk of this thread's metadata word
        e[mi] = uint32_t(se[(r + g) * 4 + c]) | (uint32_t(se[(r + g + 8) * 4 + c]) << 16);
      }
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni) {
        const int r = wt * C::TT + ni * 8 + (lane & 7);
        ldmatrix_x4(b[ni], sx + swz128(r, kk * 4 + (lane >> 3)));
      }
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni) mma_sp_f16<T>(acc[mi][ni], a[mi], b[ni], e[mi]);
    }
  }
  cp_async_wait<0>();

  // Accumulator element e of tile (mi, ni): W row g + 8 * (e / 2), token 2t + e % 2.
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + ww * C::TW + mi * 16 + g + 8 * h;
      if (n >= N) continue;
      const float bn = (ws == nullptr && bias != nullptr) ? load_bias(bias, bias_code, n) : 0.0f;
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = m0 + wt * C::TT + ni * 8 + 2 * t + e;
          if (m >= M) continue;
          const float v = acc[mi][ni][2 * h + e];
          if (ws == nullptr) {
            out[int64_t(m) * ldo + n] = from_float<T>(v + bn);
          } else {
            ws[(int64_t(split) * M + m) * N + n] = v;
          }
        }
    }
}

template <typename T, int BW, int BT, int WW, int WT, int STAGES>
const char* launch(const T* x, int64_t ldx, const T* values, int64_t ldv, const int16_t* meta, int64_t ldm,
                   const void* bias, int bias_code, T* out, int64_t ldo, int M, int N, int K, int splits,
                   float* ws, cudaStream_t stream) {
  using C = Tile<BW, BT, WW, WT, STAGES>;
  auto kernel = sparse24_kernel<T, BW, BT, WW, WT, STAGES>;
  static std::atomic<uint64_t> smem_set{0};
  if (const char* err = allow_smem(kernel, C::kSmem, smem_set)) return err;
  const int ktiles = K / kBK;
  const int per_split = (ktiles + splits - 1) / splits;
  const int64_t gx = (int64_t(N) + BW - 1) / BW, gy = (int64_t(M) + BT - 1) / BT;
  if (gx > 2147483647LL || gy > 65535) return "sparse24_gemm: N or M too large for the grid";
  dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
  kernel<<<grid, C::kThreads, C::kSmem, stream>>>(x, ldx, values, ldv, meta, ldm, bias, bias_code, out, ldo,
                                                  splits > 1 ? ws : nullptr, M, N, K, per_split);
  const char* err = launch_status();
  if (err != nullptr || splits == 1) return err;
  return splitk_reduce<T>(ws, splits, M, N, nullptr, bias, bias_code, out, ldo, stream);
}

template <typename T>
const char* dispatch(uintptr_t x, int64_t ldx, uintptr_t values, int64_t ldv, uintptr_t meta, int64_t ldm,
                     uintptr_t bias, int bias_code, uintptr_t out, int64_t ldo, int M, int N, int K,
                     int splits, uintptr_t ws, cudaStream_t s) {
  auto X = reinterpret_cast<const T*>(x);
  auto V = reinterpret_cast<const T*>(values);
  auto E = reinterpret_cast<const int16_t*>(meta);
  auto B = reinterpret_cast<const void*>(bias);
  auto O = reinterpret_cast<T*>(out);
  auto WS = reinterpret_cast<float*>(ws);
  // Small M (decode): 64 W rows x 32 tokens, 4 warps of 16 x 32, 4 stages (34 KiB),
  // split-K for parallelism. Otherwise 128 x 128, 8 warps of 64 x 32, 3 stages (75 KiB).
  // (Tile shapes mirrored in fastllm/native/sparse.py.)
  if (M <= 32) return launch<T, 64, 32, 4, 1, 4>(X, ldx, V, ldv, E, ldm, B, bias_code, O, ldo, M, N, K, splits, WS, s);
  return launch<T, 128, 128, 2, 4, 3>(X, ldx, V, ldv, E, ldm, B, bias_code, O, ldo, M, N, K, splits, WS, s);
}

}  // namespace

const char* sparse24_gemm(uintptr_t x, int dtype, int64_t ldx, uintptr_t values, int64_t ldv,
                          uintptr_t metadata, int64_t ldm, uintptr_t bias, int bias_dtype,
                          uintptr_t out, int64_t ldo, int64_t M, int64_t N, int64_t K, int splits,
                          uintptr_t workspace, uintptr_t stream) {
  if (M == 0 || N == 0) return nullptr;
  if (M < 0 || N < 0 || K < 0 || M > 2147483647LL || N > 2147483647LL || K > 2147483647LL)
    return "sparse24_gemm: M, N and K must be in [0, 2^31)";
  if (K % kBK != 0 || ldx % 8 != 0 || ldv % 8 != 0 || ldm % 4 != 0 || (x | values) % 16 != 0 ||
      metadata % 8 != 0)
    return "sparse24_gemm: K must be a multiple of 64, ldx/ldv of 8, ldm of 4, x/values 16-byte and "
           "metadata 8-byte aligned";
  const int64_t ktiles = K / kBK;
  if (splits < 1 || splits > 65535 || (splits > 1 && workspace == 0) || (K > 0 && splits > ktiles))
    return "sparse24_gemm: splits must be in [1, K / 64] with a workspace when > 1";
  if (bias == 0) bias_dtype = -1;
  const cudaStream_t s = as_stream(stream);
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat16:
      return dispatch<__half>(x, ldx, values, ldv, metadata, ldm, bias, bias_dtype, out, ldo, m, n, k, splits,
                              workspace, s);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(x, ldx, values, ldv, metadata, ldm, bias, bias_dtype, out, ldo, m, n, k,
                                     splits, workspace, s);
    default: return "sparse24_gemm: x dtype must be float16 or bfloat16";
  }
}

}  // namespace fastllm
