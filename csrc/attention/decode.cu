// Split-KV decode against a contiguous or paged KV cache
// (fastllm.ops.decode_attention, backend "cuda").
//
// The rows of one thread block are the (new token, q head) pairs that share one kv head:
// row r = t * group + j is token t of the q_len new ones and q head hk * group + j
// (group = Hq / Hkv), 16 rows per block (more rows: more blocks, grid dimension "m").
// So every K/V element a block reads serves all of the GQA group at once, on mma.sync.
//
// The keys a block's rows can see are cut into 64-key tiles, the tiles into num_splits
// contiguous runs (grid y), one per block. Inside a block the 4 warps take 16 keys each of
// every tile, each with its own online softmax; the warps are merged through shared memory at
// the end. With one split the block writes the output; with more, fp32 partial outputs and
// their log-sum-exp go to a workspace that decode_merge_kernel reduces:
//   out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M),   M = max_s lse_s.
// The split count comes from shapes only (the launcher), and a split with no keys writes
// lse = -inf, so nothing here depends on data on the host: the pair can be graph-captured.
#include <atomic>

#include "attention/attention.h"
#include "attention/mma.cuh"
#include "cuda_utils.cuh"

namespace fastllm {
namespace {

using namespace attn;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16;                 // (token, head) rows per block
constexpr int kBlockN = 16 * kWarps;      // keys per tile, 16 per warp
constexpr int kMergeWarps = 4;

template <int D>
struct DecodeSmem {
  static constexpr int kStride = D + 8;  // 16-byte row padding (conflict-free ldmatrix)
  static constexpr int kQ = kRows * kStride;
  static constexpr int kKV = kBlockN * kStride;
  static constexpr int kElems = kQ + 4 * kKV;  // Q, K[2], V[2]
  // end-of-loop merge of the warps, over the K/V stages: acc [warps][16][D + 4] fp32, then
  // m and l [warps][16]
  static constexpr int kRedStride = D + 4;
  static constexpr int kRedFloats = kWarps * kRows * kRedStride + 2 * kWarps * kRows;
};

// One 64-key tile of K and of V (keys kb.., kv head hk of sequence b) into shared memory;
// keys >= n_keys and keys whose block id is outside [0, num_blocks) are zero-filled.
// Thread t copies column chunk t % (D / 8) of rows t / (D / 8) + i * kRowsPerPass; the
// position of each key (a block-table lookup when paged) is found once for K and V.
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(T* sk, T* sv, const DecodeArgs& p, const T* k_cache,
                                             const T* v_cache, const int* block_table, int b,
                                             int hk, int kb, int n_keys) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0 && kBlockN % kRowsPerPass == 0,
                "tile must split evenly over the threads");
  const int r0 = threadIdx.x / kChunksPerRow, col = (threadIdx.x % kChunksPerRow) * 8;
  const uint32_t sk0 = smem_addr(sk + r0 * (D + 8) + col);
  const uint32_t sv0 = smem_addr(sv + r0 * (D + 8) + col);
  const int64_t k_head = hk * p.k_stride_h + col, v_head = hk * p.v_stride_h + col;
#pragma unroll
  for (int i = 0; i < kBlockN / kRowsPerPass; ++i) {
    const int key = kb + r0 + i * kRowsPerPass;
    bool ok = key < n_keys;
    int64_t k_off = 0, v_off = 0;
    if (ok) {
      if (block_table != nullptr) {
        const int blk = block_table[key / p.block_size];
        const int in_blk = key % p.block_size;
        ok = blk >= 0 && blk < p.num_blocks;
        k_off = blk * p.k_stride_b + in_blk * p.k_stride_s + k_head;
        v_off = blk * p.v_stride_b + in_blk * p.v_stride_s + v_head;
      } else {
        k_off = b * p.k_stride_b + key * p.k_stride_s + k_head;
        v_off = b * p.v_stride_b + key * p.v_stride_s + v_head;
      }
    }
    const uint32_t shift = i * kRowsPerPass * (D + 8) * static_cast<int>(sizeof(T));
    cp_async_16(sk0 + shift, ok ? k_cache + k_off : k_cache, ok ? 16 : 0);
    cp_async_16(sv0 + shift, ok ? v_cache + v_off : v_cache, ok ? 16 : 0);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeArgs p, int m_blocks) {
  using Smem = DecodeSmem<D>;
  constexpr int kStride = Smem::kStride;
  constexpr int kKSteps = D / 16;
  constexpr int kDT = D / 8;
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Smem::kQ;
  T* sV = sK + 2 * Smem::kKV;

  const int mb = blockIdx.x % m_blocks;
  const int hk = (blockIdx.x / m_blocks) % p.heads_kv;
  const int b = blockIdx.x / m_blocks / p.heads_kv;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;

  const int group = p.heads_q / p.heads_kv;
  const int rows_total = p.q_len * group;
  const int row0 = mb * kRows;
  const int row_last = min(row0 + kRows, rows_total) - 1;
  int n_keys = reinterpret_cast<const int*>(p.cache_seqlens)[b];
  n_keys = max(0, min(n_keys, p.capacity));
  const long long pos0 = static_cast<long long>(n_keys) - p.q_len;  // position of token 0

  // Keys of the block's rows: union [lo(first row), hi(last row)); its tiles split evenly.
  int lo_first, hi_first, lo_last, hi_last;
  key_range(pos0 + row0 / group, n_keys, p.window_left, p.window_right, lo_first, hi_first);
  key_range(pos0 + row_last / group, n_keys, p.window_left, p.window_right, lo_last, hi_last);
  const int n_min = lo_first / kBlockN;
  const int n_max = hi_last > lo_first ? (hi_last + kBlockN - 1) / kBlockN : n_min;
  const int per_split = (n_max - n_min + p.num_splits - 1) / p.num_splits;
  const int t_begin = min(n_min + split * per_split, n_max);
  const int t_end = min(t_begin + per_split, n_max);

  int lo[2], hi[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = min(row0 + g + 8 * i, rows_total - 1);  // padding rows copy a real one
    key_range(pos0 + r / group, n_keys, p.window_left, p.window_right, lo[i], hi[i]);
  }

  const float scale_log2 = p.scale * kLog2e;
  const float softcap_scale = p.softcap > 0.0f ? p.scale / p.softcap : 0.0f;
  const float softcap_log2 = p.softcap * kLog2e;
  const T* k_cache = reinterpret_cast<const T*>(p.k_cache);
  const T* v_cache = reinterpret_cast<const T*>(p.v_cache);
  const int* block_table = p.block_table == 0
                               ? nullptr
                               : reinterpret_cast<const int*>(p.block_table) +
                                     static_cast<int64_t>(b) * p.block_table_stride;

  float acc[kDT][4];
#pragma unroll
  for (int t = 0; t < kDT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  if (t_end > t_begin) {
    // Q rows: (token t, head hk * group + j) for r = t * group + j; padding rows zero-filled.
    const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_stride_b;
    for (int chunk = threadIdx.x; chunk < kRows * kDT; chunk += kThreads) {
      const int r = chunk / kDT, col = (chunk % kDT) * 8;
      const int row = row0 + r;
      const bool ok = row < rows_total;
      const int t = row / group, h = hk * group + row % group;
      const T* src = ok ? q + t * p.q_stride_s + h * p.q_stride_h + col : q;
      cp_async_16(sQ + r * kStride + col, src, ok ? 16 : 0);
    }
    load_kv_tile<T, D>(sK, sV, p, k_cache, v_cache, block_table, b, hk, t_begin * kBlockN,
                       n_keys);
    cp_async_commit();

    uint32_t qf[kKSteps][4];
    for (int n = t_begin; n < t_end; ++n) {
      const int stage = (n - t_begin) & 1;
      if (n + 1 < t_end) {
        const int kb = (n + 1) * kBlockN;
        load_kv_tile<T, D>(sK + (stage ^ 1) * Smem::kKV, sV + (stage ^ 1) * Smem::kKV, p, k_cache,
                           v_cache, block_table, b, hk, kb, n_keys);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      // this warp's 16 keys of the tile
      const T* sKw = sK + stage * Smem::kKV + warp * 16 * kStride;
      const T* sVw = sV + stage * Smem::kKV + warp * 16 * kStride;

      if (n == t_begin) {  // every warp holds the same 16 Q rows
        const T* base = sQ + ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) ldmatrix_x4(qf[kk], base + kk * 16);
      }

      // S (16 rows x 16 keys) = Q K^T; layouts as in prefill.cu
      float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
      {
        const T* base = sKw + ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
          uint32_t bf[4];
          ldmatrix_x4(bf, base + kk * 16);
          mma_16816<T>(s[0], qf[kk], bf[0], bf[1]);
          mma_16816<T>(s[1], qf[kk], bf[2], bf[3]);
        }
      }
      const int kb = n * kBlockN;
      const bool mask = kb < lo_last || kb + kBlockN > hi_first;
      scores_to_logits<2>(s, kb + warp * 16, lo, hi, mask, scale_log2, softcap_scale,
                          softcap_log2);
      float alpha[2];
      online_softmax<2>(s, m, l, alpha);
#pragma unroll
      for (int t = 0; t < kDT; ++t) {
        acc[t][0] *= alpha[0];
        acc[t][1] *= alpha[0];
        acc[t][2] *= alpha[1];
        acc[t][3] *= alpha[1];
      }
      // inf/NaN values of keys some rows do not see (mma.cuh); `mask` is the same for the
      // whole block, so every thread reaches the barriers
      if (mask && tile_has_nonfinite<T, kBlockN, D, kThreads>(sV + stage * Smem::kKV)) {
        add_nonfinite<T, kDT>(acc, sVw, kb + warp * 16, 16, lo, hi);
        __syncthreads();
        zero_nonfinite<T, kBlockN, D, kThreads>(sV + stage * Smem::kKV);
        __syncthreads();
      }
      {
        uint32_t pf[4];
        pf[0] = pack2<T>(s[0][0], s[0][1]);
        pf[1] = pack2<T>(s[0][2], s[0][3]);
        pf[2] = pack2<T>(s[1][0], s[1][1]);
        pf[3] = pack2<T>(s[1][2], s[1][3]);
        const T* base = sVw + ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, base + dp * 16);
          mma_16816<T>(acc[2 * dp], pf, bf[0], bf[1]);
          mma_16816<T>(acc[2 * dp + 1], pf, bf[2], bf[3]);
        }
      }
      __syncthreads();
    }
    cp_async_wait<0>();
  }

  // Merge the 4 warps (each saw a quarter of every tile) through shared memory, over the
  // K/V stages: every warp passed the loop's last barrier, so nobody reads them any more.
  static_assert(Smem::kRedFloats * 4 <= 4 * Smem::kKV * static_cast<int>(sizeof(T)),
                "merge buffer must fit in the K/V stages");
  float* red = reinterpret_cast<float*>(sK);
  float* red_m = red + kWarps * kRows * Smem::kRedStride;
  float* red_l = red_m + kWarps * kRows;
#pragma unroll
  for (int i = 0; i < 2; ++i) l[i] = quad_sum(l[i]);
  if (c == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      red_m[warp * kRows + g + 8 * i] = m[i];
      red_l[warp * kRows + g + 8 * i] = l[i];
    }
  }
  float* red_w = red + warp * kRows * Smem::kRedStride;
#pragma unroll
  for (int t = 0; t < kDT; ++t) {
    const int col = t * 8 + 2 * c;
    *reinterpret_cast<float2*>(red_w + g * Smem::kRedStride + col) = make_float2(acc[t][0], acc[t][1]);
    *reinterpret_cast<float2*>(red_w + (g + 8) * Smem::kRedStride + col) =
        make_float2(acc[t][2], acc[t][3]);
  }
  __syncthreads();

  const int heads_q = p.heads_q;
  for (int idx = threadIdx.x; idx < kRows * (D / 4); idx += kThreads) {
    const int r = idx / (D / 4), col = (idx % (D / 4)) * 4;
    const int row = row0 + r;
    if (row >= rows_total) continue;
    float mw[kWarps], mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      mw[w] = red_m[w * kRows + r];
      mx = fmaxf(mx, mw[w]);
    }
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float sum = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(mw[w] - mx);
        sum += red_l[w * kRows + r] * f;
        const float4 x = *reinterpret_cast<const float4*>(red + (w * kRows + r) * Smem::kRedStride + col);
        o.x += f * x.x;
        o.y += f * x.y;
        o.z += f * x.z;
        o.w += f * x.w;
      }
      const float inv = 1.0f / sum;  // sum >= 1: the warp holding the max contributes 2^0
      o.x *= inv;
      o.y *= inv;
      o.z *= inv;
      o.w *= inv;
    }
    const int t = row / group, h = hk * group + row % group;
    if (p.num_splits == 1) {
      T* out = reinterpret_cast<T*>(p.out) + b * p.o_stride_b + t * p.o_stride_s +
               h * p.o_stride_h + col;
      uint2 packed = make_uint2(pack2<T>(o.x, o.y), pack2<T>(o.z, o.w));
      *reinterpret_cast<uint2*>(out) = packed;
    } else {
      const int64_t prow =
          ((static_cast<int64_t>(split) * p.batch + b) * p.q_len + t) * heads_q + h;
      *reinterpret_cast<float4*>(reinterpret_cast<float*>(p.o_partial) + prow * D + col) = o;
      if (col == 0)
        reinterpret_cast<float*>(p.lse_partial)[prow] =
            mx == -INFINITY ? -INFINITY : (mx + log2f(sum)) * kLn2;
    }
  }
}

// One warp per output row (b, t, h): combine the splits' partials by their log-sum-exp.
template <typename T>
__global__ void __launch_bounds__(32 * kMergeWarps)
    decode_merge_kernel(const DecodeArgs p, int64_t rows) {
  constexpr int kMaxVec = 8;  // head_dim <= 256
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int D = p.head_dim;
  const float* lse = reinterpret_cast<const float*>(p.lse_partial);
  const float* part = reinterpret_cast<const float*>(p.o_partial);

  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, lse[s * rows + row]);
  float acc[kMaxVec] = {};
  float sum = 0.0f;
  if (mx != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = __expf(lse[s * rows + row] - mx);
      sum += w;
      const float* src = part + (s * rows + row) * D;
#pragma unroll
      for (int i = 0; i < kMaxVec; ++i) {
        const int d = lane + 32 * i;
        if (d < D) acc[i] += w * src[d];
      }
    }
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  const int h = static_cast<int>(row % p.heads_q);
  const int t = static_cast<int>((row / p.heads_q) % p.q_len);
  const int b = static_cast<int>(row / p.heads_q / p.q_len);
  T* out = reinterpret_cast<T*>(p.out) + b * p.o_stride_b + t * p.o_stride_s + h * p.o_stride_h;
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int d = lane + 32 * i;
    if (d < D) out[d] = static_cast<T>(acc[i] * inv);
  }
}

template <typename T, int D>
const char* launch(const DecodeArgs& a, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_set{0};
  constexpr int smem = DecodeSmem<D>::kElems * static_cast<int>(sizeof(T));
  auto kernel = decode_kernel<T, D>;
  if (const char* err = allow_smem(kernel, smem, smem_set)) return err;
  const int64_t rows_total = static_cast<int64_t>(a.q_len) * (a.heads_q / a.heads_kv);
  const int m_blocks = static_cast<int>((rows_total + kRows - 1) / kRows);
  const int64_t blocks = static_cast<int64_t>(a.batch) * a.heads_kv * m_blocks;
  if (blocks > 2147483647LL) return "attention_decode: too many thread blocks";
  kernel<<<dim3(static_cast<unsigned>(blocks), a.num_splits), kThreads, smem, stream>>>(a,
                                                                                         m_blocks);
  if (const char* err = launch_status()) return err;
  if (a.num_splits > 1) {
    const int64_t rows = static_cast<int64_t>(a.batch) * a.q_len * a.heads_q;
    const int64_t merge_blocks = (rows + kMergeWarps - 1) / kMergeWarps;
    if (merge_blocks > 2147483647LL) return "attention_decode: too many rows to merge";
    decode_merge_kernel<T><<<static_cast<unsigned>(merge_blocks), 32 * kMergeWarps, 0, stream>>>(
        a, rows);
    return launch_status();
  }
  return nullptr;
}

template <typename T>
const char* dispatch_head_dim(const DecodeArgs& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64: return launch<T, 64>(a, stream);
    case 128: return launch<T, 128>(a, stream);
    default: return "attention_decode: head_dim must be 64 or 128";
  }
}

}  // namespace

const char* attention_decode(const DecodeArgs& a, int dtype, uintptr_t stream) {
  if (a.batch == 0 || a.q_len == 0 || a.heads_q == 0) return nullptr;
  if (a.heads_kv <= 0 || a.heads_q % a.heads_kv != 0)
    return "attention_decode: heads_q must be a positive multiple of heads_kv";
  if (a.q_len > 16) return "attention_decode: q_len must be at most 16";
  if (a.num_splits < 1 || a.num_splits > 65535)
    return "attention_decode: num_splits must be in [1, 65535]";
  if (a.num_splits > 1 && (a.o_partial == 0 || a.lse_partial == 0))
    return "attention_decode: num_splits > 1 needs the o_partial and lse_partial workspace";
  if (a.block_table != 0 && (a.block_size <= 0 || a.num_blocks <= 0))
    return "attention_decode: a paged cache needs block_size and num_blocks > 0";
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat16: return dispatch_head_dim<__half>(a, as_stream(stream));
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(a, as_stream(stream));
    default: return "attention_decode: dtype must be float16 or bfloat16";
  }
}

}  // namespace fastllm
