// FlashAttention-style prefill (fastllm.ops.attention, backend "cuda").
//
//   out[i] = sum_j softmax_j(logit(q_i . k_j)) v_j      over the keys row i may see
//   logit(x) = scale * x, or softcap * tanh(scale * x / softcap) with a softcap
//
// One thread block per (64 query rows, q head, sequence); 4 warps, each owning 16 rows.
// The block walks the 64-key tiles its rows can see (tiles wholly outside the causal /
// window band are skipped; only tiles crossing a band edge or the sequence end are masked
// elementwise). K/V tiles are double-buffered in shared memory through cp.async, read into
// mma.sync m16n8k16 fragments with ldmatrix, and the scores live only in registers: an online
// softmax keeps a running max and sum per row and rescales the fp32 accumulator. GQA reads
// k/v head h / (Hq / Hkv). The fragment layouts are written out in mma.cuh.
// The reference is fastllm/reference/attention.py.
#include <atomic>

#include "attention/attention.h"
#include "attention/mma.cuh"
#include "cuda_utils.cuh"

namespace fastllm {
namespace {

using namespace attn;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // query rows per block
constexpr int kBlockN = 64;           // keys per tile

template <int D>
struct PrefillSmem {
  // rows padded by 16 bytes so that the 8 row addresses of an ldmatrix hit distinct banks
  static constexpr int kStride = D + 8;
  static constexpr int kQ = kBlockM * kStride;
  static constexpr int kKV = kBlockN * kStride;
  static constexpr int kElems = kQ + 4 * kKV;  // Q, K[2], V[2]
};

// ROWS x D tile, row r from src + r * row_stride, rows >= valid zero-filled (src itself must
// be a valid address: the zero-filling copies name it and read nothing).
// Thread t copies column chunk t % (D / 8) of rows t / (D / 8) + i * kRowsPerPass, so that the
// per-row addresses step by a constant and need no registers of their own.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int valid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0 && ROWS % kRowsPerPass == 0,
                "tile must split evenly over the threads");
  const int r0 = threadIdx.x / kChunksPerRow, col = (threadIdx.x % kChunksPerRow) * 8;
  const uint32_t dst0 = smem_addr(dst + r0 * (D + 8) + col);
  const T* p = src + r0 * row_stride + col;
  const int64_t step = kRowsPerPass * row_stride;
#pragma unroll
  for (int i = 0; i < ROWS / kRowsPerPass; ++i) {
    const bool ok = r0 + i * kRowsPerPass < valid;
    cp_async_16(dst0 + i * kRowsPerPass * (D + 8) * static_cast<int>(sizeof(T)), ok ? p : src,
                ok ? 16 : 0);
    p += step;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) prefill_kernel(const PrefillArgs p) {
  using Smem = PrefillSmem<D>;
  constexpr int kStride = Smem::kStride;
  constexpr int kKSteps = D / 16;    // k-steps of S = Q K^T
  constexpr int kNT = kBlockN / 8;   // n-tiles of S
  constexpr int kDT = D / 8;         // n-tiles of O
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Smem::kQ;
  T* sV = sK + 2 * Smem::kKV;

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;

  int64_t q_start = 0, k_start = 0;
  int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
  int64_t q_batch = p.q_stride_b, k_batch = p.k_stride_b, v_batch = p.v_stride_b,
          o_batch = p.o_stride_b, lse_batch = p.lse_stride_b;
  if (p.cu_seqlens_q != 0) {
    const int* cu_q = reinterpret_cast<const int*>(p.cu_seqlens_q);
    const int* cu_k = reinterpret_cast<const int*>(p.cu_seqlens_k);
    // [cu[b], cu[b + 1]) clamped to the packed tensors, as the CPU kernel does: cu_seqlens
    // left unchecked (validate=False, torch.compile) give wrong rows, never an access out of
    // bounds
    auto segment = [](const int* cu, int b, int64_t total, int64_t& start, int& len) {
      const int64_t lo = cu[b] < 0 ? 0 : (cu[b] > total ? total : cu[b]);
      const int64_t hi = cu[b + 1] < lo ? lo : (cu[b + 1] > total ? total : cu[b + 1]);
      start = lo;
      len = static_cast<int>(hi - lo);
    };
    segment(cu_q, b, p.total_q, q_start, seqlen_q);
    segment(cu_k, b, p.total_k, k_start, seqlen_k);
    q_batch = k_batch = v_batch = o_batch = lse_batch = 0;
  }
  const int q0 = m_block * kBlockM;
  if (q0 >= seqlen_q) return;
  const int q_last = min(q0 + kBlockM, seqlen_q) - 1;
  const int hk = h / (p.heads_q / p.heads_kv);
  const long long shift = static_cast<long long>(seqlen_k) - seqlen_q;  // bottom-right alignment

  const T* q = reinterpret_cast<const T*>(p.q) + b * q_batch + q_start * p.q_stride_s +
               h * p.q_stride_h + static_cast<int64_t>(q0) * p.q_stride_s;
  const T* k = reinterpret_cast<const T*>(p.k) + b * k_batch + k_start * p.k_stride_s +
               hk * p.k_stride_h;
  const T* v = reinterpret_cast<const T*>(p.v) + b * v_batch + k_start * p.v_stride_s +
               hk * p.v_stride_h;

  // Keys the block needs: rows see nondecreasing ranges, so the union is [lo(q0), hi(q_last)).
  int lo_first, hi_first, lo_last, hi_last;
  key_range(q0 + shift, seqlen_k, p.window_left, p.window_right, lo_first, hi_first);
  key_range(q_last + shift, seqlen_k, p.window_left, p.window_right, lo_last, hi_last);
  const int n_min = lo_first / kBlockN;
  const int n_max = hi_last > lo_first ? (hi_last + kBlockN - 1) / kBlockN : n_min;

  // This thread's two rows (relative to the sequence) and the keys each may see.
  int lo[2], hi[2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
    key_range(q0 + warp * 16 + g + 8 * i + shift, seqlen_k, p.window_left, p.window_right, lo[i],
              hi[i]);

  const float scale_log2 = p.scale * kLog2e;
  const float softcap_scale = p.softcap > 0.0f ? p.scale / p.softcap : 0.0f;
  const float softcap_log2 = p.softcap * kLog2e;

  float acc[kDT][4];
#pragma unroll
  for (int t = 0; t < kDT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  if (n_max > n_min) {
    load_tile<T, kBlockM, D>(sQ, q, p.q_stride_s, seqlen_q - q0);
    {
      const int kb = n_min * kBlockN;
      load_tile<T, kBlockN, D>(sK, k + kb * p.k_stride_s, p.k_stride_s, seqlen_k - kb);
      load_tile<T, kBlockN, D>(sV, v + kb * p.v_stride_s, p.v_stride_s, seqlen_k - kb);
    }
    cp_async_commit();

    uint32_t qf[kKSteps][4];
    for (int n = n_min; n < n_max; ++n) {
      const int stage = (n - n_min) & 1;
      if (n + 1 < n_max) {  // prefetch the next tile into the other stage
        const int kb = (n + 1) * kBlockN;
        T* sK1 = sK + (stage ^ 1) * Smem::kKV;
        T* sV1 = sV + (stage ^ 1) * Smem::kKV;
        load_tile<T, kBlockN, D>(sK1, k + kb * p.k_stride_s, p.k_stride_s, seqlen_k - kb);
        load_tile<T, kBlockN, D>(sV1, v + kb * p.v_stride_s, p.v_stride_s, seqlen_k - kb);
      }
      cp_async_commit();  // possibly empty: keeps one group per iteration
      cp_async_wait<1>();  // tile n (and Q) landed for this thread...
      __syncthreads();     // ...and for every thread
      const T* sKs = sK + stage * Smem::kKV;
      const T* sVs = sV + stage * Smem::kKV;

      if (n == n_min) {
        // Q fragments stay in registers for the whole loop.
        // matrices: rows 0-7 / 8-15 (lane bit 3) x columns +0 / +8 (lane bit 4)
        const T* base = sQ + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride +
                        (lane >> 4) * 8;
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) ldmatrix_x4(qf[kk], base + kk * 16);
      }

      // S = Q K^T: B[d][key] = K[key][d], plain ldmatrix of K rows.
      // matrices: keys 0-7 / 8-15 (lane bit 4) x d +0 / +8 (lane bit 3)
      float s[kNT][4];
#pragma unroll
      for (int t = 0; t < kNT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
      {
        const T* base = sKs + ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
          for (int np = 0; np < kNT / 2; ++np) {
            uint32_t bf[4];
            ldmatrix_x4(bf, base + np * 16 * kStride + kk * 16);
            mma_16816<T>(s[2 * np], qf[kk], bf[0], bf[1]);
            mma_16816<T>(s[2 * np + 1], qf[kk], bf[2], bf[3]);
          }
        }
      }

      const int kb = n * kBlockN;
      const bool mask = kb < lo_last || kb + kBlockN > hi_first;
      scores_to_logits<kNT>(s, kb, lo, hi, mask, scale_log2, softcap_scale, softcap_log2);
      float alpha[2];
      online_softmax<kNT>(s, m, l, alpha);
#pragma unroll
      for (int t = 0; t < kDT; ++t) {
        acc[t][0] *= alpha[0];
        acc[t][1] *= alpha[0];
        acc[t][2] *= alpha[1];
        acc[t][3] *= alpha[1];
      }

      // inf/NaN values of keys some rows do not see (mma.cuh); `mask` is the same for the
      // whole block, so every thread reaches the barriers
      if (mask && tile_has_nonfinite<T, kBlockN, D, kThreads>(sVs)) {
        add_nonfinite<T, kDT>(acc, sVs, kb, kBlockN, lo, hi);
        __syncthreads();
        zero_nonfinite<T, kBlockN, D, kThreads>(sV + stage * Smem::kKV);
        __syncthreads();
      }

      // O += P V: P from the S accumulators (n-tiles 2j, 2j+1 make k-step j);
      // B[key][d] = V[key][d], ldmatrix.trans of V rows.
      // matrices: keys 0-7 / 8-15 (lane bit 3) x d +0 / +8 (lane bit 4)
      {
        const T* base = sVs + ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
#pragma unroll
        for (int j = 0; j < kBlockN / 16; ++j) {
          uint32_t pf[4];
          pf[0] = pack2<T>(s[2 * j][0], s[2 * j][1]);
          pf[1] = pack2<T>(s[2 * j][2], s[2 * j][3]);
          pf[2] = pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]);
          pf[3] = pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3]);
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t bf[4];
            ldmatrix_x4_trans(bf, base + j * 16 * kStride + dp * 16);
            mma_16816<T>(acc[2 * dp], pf, bf[0], bf[1]);
            mma_16816<T>(acc[2 * dp + 1], pf, bf[2], bf[3]);
          }
        }
      }
      __syncthreads();  // the next iteration's prefetch overwrites this stage
    }
    cp_async_wait<0>();
  }

  // Epilogue: normalize, stage the warp's 16 rows in its own rows of sQ (no other warp
  // touches them after the Q fragments were read), then 16-byte coalesced stores.
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] = quad_sum(l[i]);
    inv[i] = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
  }
  T* sO = sQ + warp * 16 * kStride;
#pragma unroll
  for (int t = 0; t < kDT; ++t) {
    const int col = t * 8 + 2 * c;
    *reinterpret_cast<uint32_t*>(sO + g * kStride + col) =
        pack2<T>(acc[t][0] * inv[0], acc[t][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(sO + (g + 8) * kStride + col) =
        pack2<T>(acc[t][2] * inv[1], acc[t][3] * inv[1]);
  }
  __syncwarp();
  T* o = reinterpret_cast<T*>(p.out) + b * o_batch + q_start * p.o_stride_s + h * p.o_stride_h;
  const int row0 = q0 + warp * 16;
#pragma unroll
  for (int i = 0; i < 16 * kDT / 32; ++i) {
    const int chunk = lane + 32 * i;
    const int r = chunk / kDT, col = (chunk % kDT) * 8;
    if (row0 + r < seqlen_q)
      *reinterpret_cast<uint4*>(o + static_cast<int64_t>(row0 + r) * p.o_stride_s + col) =
          *reinterpret_cast<const uint4*>(sO + r * kStride + col);
  }
  if (p.lse != 0 && c == 0) {
    float* lse = reinterpret_cast<float*>(p.lse) + b * lse_batch + h * p.lse_stride_h;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row0 + g + 8 * i;
      if (row < seqlen_q)
        lse[(q_start + row) * p.lse_stride_row] =
            l[i] > 0.0f ? (m[i] + log2f(l[i])) * kLn2 : -INFINITY;
    }
  }
}

template <typename T, int D>
const char* launch(const PrefillArgs& a, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_set{0};
  constexpr int smem = PrefillSmem<D>::kElems * static_cast<int>(sizeof(T));
  auto kernel = prefill_kernel<T, D>;
  if (const char* err = allow_smem(kernel, smem, smem_set)) return err;
  const dim3 grid((a.seqlen_q + kBlockM - 1) / kBlockM, a.heads_q, a.batch);
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return launch_status();
}

template <typename T>
const char* dispatch_head_dim(const PrefillArgs& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64: return launch<T, 64>(a, stream);
    case 128: return launch<T, 128>(a, stream);
    default: return "attention_prefill: head_dim must be 64 or 128";
  }
}

}  // namespace

const char* attention_prefill(const PrefillArgs& a, int dtype, uintptr_t stream) {
  if (a.batch == 0 || a.seqlen_q == 0 || a.heads_q == 0) return nullptr;
  if (a.heads_kv <= 0 || a.heads_q % a.heads_kv != 0)
    return "attention_prefill: heads_q must be a positive multiple of heads_kv";
  if (a.batch > 65535 || a.heads_q > 65535) return "attention_prefill: batch or heads above 65535";
  if ((a.cu_seqlens_q == 0) != (a.cu_seqlens_k == 0))
    return "attention_prefill: cu_seqlens_q and cu_seqlens_k must be given together";
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat16: return dispatch_head_dim<__half>(a, as_stream(stream));
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(a, as_stream(stream));
    default: return "attention_prefill: dtype must be float16 or bfloat16";
  }
}

}  // namespace fastllm
