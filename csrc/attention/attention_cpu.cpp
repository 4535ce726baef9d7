// Attention on the CPU (fastllm.ops.attention and decode_attention, backend "cpu"): the
// same contract as the CUDA prefill kernel (PrefillArgs in attention/attention.h: padded
// or varlen, GQA, bottom-right aligned causal and window masks, softcap, log-sum-exp),
// for float32/float16/bfloat16 tensors in host memory, computed in float32.
//
// Built for many short sequences (a padded batch of sentences as varlen segments),
// where PyTorch pays a call per sequence: here one call covers the batch. Tasks are
// (sequence, block of BLOCK_Q query rows, q head), or all the q heads of the block when
// blocks alone keep the threads busy, spread over PyTorch's OpenMP threads.
// A task copies its queries, its keys (transposed) and its values to float32 buffers
// padded to whole register tiles, then
//
//   S = Q K^T                                   (register-tiled loop nest)
//   S = scale * S, -inf outside each row's keys; softcap * tanh(S / softcap) if softcap > 0
//   P = exp(S - rowmax S),  O = (P V) / rowsum P,  lse = rowmax S + log(rowsum P)
//
// Decode (DecodeArgs, the CUDA decode contract with one split): a task is one sequence
// and kv head with the q_len x group query rows that share it; its keys are copied as
// rows (S^T = K Q^T) and paged caches are read through the block table.
//
// A row that sees no key gets out = 0 and lse = -inf. The reference is
// fastllm/reference/attention.py.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "cpu_utils.h"
#include "dtype.h"

namespace fastllm {
namespace {

constexpr int64_t BLOCK_Q = 64;  // query rows per task: the K/V copies serve all of them

// p[j] = exp(x[j] - m) for x[j] <= m, as exp(r) * 2^k with x - m = k ln2 + r, |r| <= ln2/2:
// a degree-7 Taylor polynomial (relative error below 1e-8 there), the power of two built
// in the exponent bits. Underflow (x - m < -87) gives 0.
FASTLLM_INLINE void exp_shifted(const float* x, float m, int64_t n, float* p) {
  for (int64_t j = 0; j < n; ++j) {
    float t = x[j] - m;
    const bool tiny = t < -87.0f;
    t = tiny ? -87.0f : t;
    const float k = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(t/ln2)
    const float r = (t - k * 0.693145751953125f) - k * 1.428606765330187e-06f;  // ln2 hi + lo
    float e = 1.0f / 5040.0f;
    e = e * r + 1.0f / 720.0f;
    e = e * r + 1.0f / 120.0f;
    e = e * r + 1.0f / 24.0f;
    e = e * r + 1.0f / 6.0f;
    e = e * r + 0.5f;
    e = e * r + 1.0f;
    e = e * r + 1.0f;
    const int32_t ki = static_cast<int32_t>(k);  // in [-126, 0]
    const float two_k = cpu::bits_float(static_cast<uint32_t>(ki + 127) << 23);
    p[j] = tiny ? 0.0f : e * two_k;
  }
}

// Reductions in LANES independent lanes (a vector loop; a single float accumulator
// would have to keep the sequential order), folded at the end.
constexpr int LANES = 16;

FASTLLM_INLINE float sum_of(const float* x, int64_t n) {
  float lanes[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES) {
    for (int l = 0; l < LANES; ++l) lanes[l] += x[j + l];
  }
  float total = 0.0f;
  for (; j < n; ++j) total += x[j];
  for (int l = 0; l < LANES; ++l) total += lanes[l];
  return total;
}

FASTLLM_INLINE float max_of(const float* x, int64_t n) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float lanes[LANES];
  for (int l = 0; l < LANES; ++l) lanes[l] = neg_inf;
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES) {
    for (int l = 0; l < LANES; ++l) lanes[l] = x[j + l] > lanes[l] ? x[j + l] : lanes[l];
  }
  float m = neg_inf;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  for (int l = 0; l < LANES; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

constexpr int64_t TILE_R = 4;   // rows of a micro-kernel tile
constexpr int64_t TILE_C = 16;  // columns: one AVX-512 vector, two AVX2 ones

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One row piece of a tile as a GCC/Clang vector: one AVX-512 register, two AVX2 ones or
// four SSE ones, whichever the clone is compiled for. Loads and stores go through memcpy
// (unaligned moves).
typedef float TileRow __attribute__((vector_size(TILE_C * sizeof(float))));

// C [R, C] = A [R, K] @ B [K, C] (row-major, row strides K, C and C), TILE_R x TILE_C at a
// time with the tile in registers: per k, one row piece of B times TILE_R scalars of A.
// R and C are multiples of the tile (the buffers are zero-padded to them).
FASTLLM_INLINE void matmul_tiles(const float* a, const float* b, int64_t R, int64_t K,
                                 int64_t C, float* c) {
  static_assert(TILE_R == 4, "the loop below holds four rows");
  for (int64_t i0 = 0; i0 < R; i0 += TILE_R) {
    const float* a0 = a + i0 * K;
    for (int64_t j0 = 0; j0 < C; j0 += TILE_C) {
      TileRow c0 = {}, c1 = {}, c2 = {}, c3 = {};
      for (int64_t k = 0; k < K; ++k) {
        TileRow bk;
        std::memcpy(&bk, b + k * C + j0, sizeof bk);
        c0 += bk * a0[k];
        c1 += bk * a0[K + k];
        c2 += bk * a0[2 * K + k];
        c3 += bk * a0[3 * K + k];
      }
      float* out = c + i0 * C + j0;
      std::memcpy(out, &c0, sizeof c0);
      std::memcpy(out + C, &c1, sizeof c1);
      std::memcpy(out + 2 * C, &c2, sizeof c2);
      std::memcpy(out + 3 * C, &c3, sizeof c3);
    }
  }
}

// s[j] = scale * s[j] where lo <= first + j < hi, -inf elsewhere (the row's mask)
FASTLLM_INLINE void mask_and_scale(float* s, int64_t n, int64_t first, int64_t lo,
                                   int64_t hi, float scale) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const int64_t key = first + j;
    s[j] = key >= lo && key < hi ? s[j] * scale : neg_inf;
  }
}

// the cache lines of `bytes` bytes from p, for the next head's task (addresses as integers:
// p may lie past the tensor, which a prefetch does not touch)
FASTLLM_INLINE void prefetch_row(const char* p, int64_t bytes) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(start + static_cast<uintptr_t>(off)));
  }
}

FASTLLM_INLINE void zero(float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = 0.0f;
}

FASTLLM_INLINE void scale_row(float* x, int64_t n, float f) {
  for (int64_t j = 0; j < n; ++j) x[j] *= f;
}

// One row of scores s (keys first .. first + n - 1; the row sees [lo, hi), lo < hi) to
// probabilities p (may be s itself): masked, scaled, softcapped, exp(s - max). Returns
// the row's log-sum-exp and sets *inv to 1 / sum p.
FASTLLM_INLINE float softmax_row(float* s, int64_t n, int64_t first, int64_t lo, int64_t hi,
                                 float scale, float softcap, float* p, float* inv) {
  mask_and_scale(s, n, first, lo, hi, scale);
  if (softcap > 0.0f) {
    for (int64_t j = lo - first; j < hi - first; ++j) s[j] = softcap * std::tanh(s[j] / softcap);
  }
  const float m = max_of(s, n);
  exp_shifted(s, m, n, p);  // masked keys: exp(-inf) = 0
  const float sum = sum_of(p, n);
  *inv = 1.0f / sum;
  return m + std::log(sum);
}

// The tiled P V multiplies every key of a task by every row's p, and p = 0 times an inf or
// NaN value is NaN: a masked key whose value is not finite (a recycled cache block, an
// overflowed token) would poison rows that do not see it. So when a task's values are not
// all finite, each row's output is recomputed over its own keys only, o = sum p[j] v[j]
// for lo <= j < hi (IEEE rules there: a key the row sees with an inf value gives inf).
FASTLLM_INLINE bool all_finite(const float* x, int64_t n) {
  int bad = 0;  // no early exit: the loop vectorizes (NaN fails the comparison too)
  for (int64_t i = 0; i < n; ++i) bad |= !(std::fabs(x[i]) <= std::numeric_limits<float>::max());
  return bad == 0;
}

// o[0..D) = sum over j in [lo, hi) of p[j] * v[j * dp + d]
FASTLLM_INLINE void pv_row(const float* p, const float* v, int64_t dp, int64_t lo, int64_t hi,
                           int64_t D, float* o) {
  for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
  for (int64_t j = lo; j < hi; ++j) {
    for (int64_t d = 0; d < D; ++d) o[d] += p[j] * v[j * dp + d];
  }
}

// One range of keys [lo, hi) per query row, from the window rule of attention.h.
FASTLLM_INLINE void key_range(int64_t pos, int64_t seqlen_k, int window_left, int window_right,
                              int64_t& lo, int64_t& hi) {
  lo = window_left >= 0 ? pos - window_left : 0;
  hi = window_right >= 0 ? pos + window_right + 1 : seqlen_k;
  lo = lo < 0 ? 0 : lo;
  hi = hi > seqlen_k ? seqlen_k : hi;
}

struct Task {
  int64_t b, h, q0;  // sequence, (first) q head, first query row of the block
};

struct Scratch {  // per thread, reused across tasks
  std::vector<float> q, kt, v, s, o, row, inv, p;
};

FASTLLM_CPU_CLONES void run_task(const PrefillArgs& a, DType dtype, const Task& t, int64_t len_q,
                                 int64_t len_k, int64_t tok_q, int64_t tok_k, Scratch& w) {
  const int64_t D = a.head_dim;
  const int64_t kv_head = t.h / (a.heads_q / a.heads_kv);
  const int64_t rows = len_q - t.q0 < BLOCK_Q ? len_q - t.q0 : BLOCK_Q;
  const int64_t shift = len_k - len_q;  // bottom-right alignment
  const size_t esize = dtype == DType::kFloat32 ? 4 : 2;
  const char* qb = reinterpret_cast<const char*>(a.q);
  const char* kb = reinterpret_cast<const char*>(a.k);
  const char* vb = reinterpret_cast<const char*>(a.v);
  char* ob = reinterpret_cast<char*>(a.out);
  float* lse = reinterpret_cast<float*>(a.lse);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // the keys any row of this block sees: [first, first + n)
  int64_t first = len_k, last = 0;
  for (int64_t i = t.q0; i < t.q0 + rows; ++i) {
    int64_t lo, hi;
    key_range(i + shift, len_k, a.window_left, a.window_right, lo, hi);
    if (lo < hi) {
      first = lo < first ? lo : first;
      last = hi > last ? hi : last;
    }
  }
  const int64_t n = last > first ? last - first : 0;
  // padded sizes of the tiles: rows to TILE_R, keys and head_dim to TILE_C
  const int64_t rp = round_up(rows, TILE_R), np = round_up(n > 0 ? n : 1, TILE_C);
  const int64_t dp = round_up(D, TILE_C);
  // the buffers are written where the data goes and zeroed only in their padding (for a
  // short sequence, zeroing them whole was a visible part of the task)
  w.q.resize(static_cast<size_t>(rp * dp));
  w.kt.resize(static_cast<size_t>(dp * np));
  w.v.resize(static_cast<size_t>(np * dp));
  w.s.resize(static_cast<size_t>(rp * np));
  w.o.resize(static_cast<size_t>(rp * dp));
  w.row.resize(static_cast<size_t>(dp));
  w.inv.resize(static_cast<size_t>(rp));

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t q_off =
        t.b * a.q_stride_b + (tok_q + t.q0 + r) * a.q_stride_s + t.h * a.q_stride_h;
    if (t.h + 1 < a.heads_q) prefetch_row(qb + (q_off + a.q_stride_h) * esize, D * esize);
    cpu::load_row_inline(qb + q_off * esize, dtype, D, w.q.data() + r * dp);
    zero(w.q.data() + r * dp + D, dp - D);
  }
  zero(w.q.data() + rows * dp, (rp - rows) * dp);
  const int64_t k_off = t.b * a.k_stride_b + tok_k * a.k_stride_s + kv_head * a.k_stride_h;
  const int64_t v_off = t.b * a.v_stride_b + tok_k * a.v_stride_s + kv_head * a.v_stride_h;
  const bool next_kv = kv_head + 1 < a.heads_kv;
  for (int64_t j = 0; j < n; ++j) {
    if (next_kv) {
      prefetch_row(kb + (k_off + (first + j) * a.k_stride_s + a.k_stride_h) * esize, D * esize);
      prefetch_row(vb + (v_off + (first + j) * a.v_stride_s + a.v_stride_h) * esize, D * esize);
    }
    cpu::load_row_inline(kb + (k_off + (first + j) * a.k_stride_s) * esize, dtype, D,
                         w.row.data());
    for (int64_t d = 0; d < D; ++d) w.kt[d * np + j] = w.row[d];  // K transposed
    float* v_row = w.v.data() + j * dp;
    cpu::load_row_inline(vb + (v_off + (first + j) * a.v_stride_s) * esize, dtype, D, v_row);
    zero(v_row + D, dp - D);
  }
  for (int64_t d = 0; d < D; ++d) zero(w.kt.data() + d * np + n, np - n);
  zero(w.kt.data() + D * np, (dp - D) * np);
  zero(w.v.data() + n * dp, (np - n) * dp);

  matmul_tiles(w.q.data(), w.kt.data(), rp, dp, np, w.s.data());  // q . k for every pair
  for (int64_t r = 0; r < rp; ++r) {
    float* s = w.s.data() + r * np;
    int64_t lo = 0, hi = 0;
    if (r < rows) key_range(t.q0 + r + shift, len_k, a.window_left, a.window_right, lo, hi);
    float row_lse = neg_inf;
    if (lo >= hi) {  // no key (or a padding row of the tile): p = 0, out = 0
      for (int64_t j = 0; j < np; ++j) s[j] = 0.0f;
      w.inv[r] = 0.0f;
    } else {
      row_lse = softmax_row(s, np, first, lo, hi, a.scale, a.softcap, s, &w.inv[r]);
    }
    if (lse != nullptr && r < rows) {
      lse[t.b * a.lse_stride_b + t.h * a.lse_stride_h + (tok_q + t.q0 + r) * a.lse_stride_row] =
          row_lse;
    }
  }
  matmul_tiles(w.s.data(), w.v.data(), rp, np, dp, w.o.data());  // p . v
  const bool finite = all_finite(w.v.data(), n * dp);
  for (int64_t r = 0; r < rows; ++r) {
    float* o = w.o.data() + r * dp;
    if (!finite) {
      int64_t lo, hi;
      key_range(t.q0 + r + shift, len_k, a.window_left, a.window_right, lo, hi);
      pv_row(w.s.data() + r * np, w.v.data(), dp, lo - first, lo < hi ? hi - first : lo - first,
             D, o);
    }
    scale_row(o, D, w.inv[r]);
    const int64_t o_off =
        t.b * a.o_stride_b + (tok_q + t.q0 + r) * a.o_stride_s + t.h * a.o_stride_h;
    cpu::store_row_inline(o, D, dtype, ob + o_off * esize);
  }
}

// One decode task: sequence b, kv head kvh, and the q_len x group query rows that share
// it (row r: token r / group, q head kvh * group + r % group), against the cache's first
// len_k keys. Keys are copied as rows (S^T = K Q^T needs no transpose), values as rows.
FASTLLM_CPU_CLONES void run_decode_task(const DecodeArgs& a, DType dtype, int64_t b, int64_t kvh,
                                        Scratch& w) {
  const int64_t D = a.head_dim, group = a.heads_q / a.heads_kv;
  const int64_t R = static_cast<int64_t>(a.q_len) * group;
  const int32_t* seqlens = reinterpret_cast<const int32_t*>(a.cache_seqlens);
  int64_t len_k = seqlens[b];
  len_k = len_k < 0 ? 0 : (len_k > a.capacity ? a.capacity : len_k);
  const size_t esize = dtype == DType::kFloat32 ? 4 : 2;
  const char* qb = reinterpret_cast<const char*>(a.q);
  const char* kb = reinterpret_cast<const char*>(a.k_cache);
  const char* vb = reinterpret_cast<const char*>(a.v_cache);
  char* ob = reinterpret_cast<char*>(a.out);
  const int32_t* table = reinterpret_cast<const int32_t*>(a.block_table);

  auto row_range = [&](int64_t r, int64_t& lo, int64_t& hi) {
    const int64_t pos = len_k - a.q_len + r / group;  // the query token's cache position
    key_range(pos, len_k, a.window_left, a.window_right, lo, hi);
  };
  int64_t first = len_k, last = 0;
  for (int64_t r = 0; r < R; ++r) {
    int64_t lo, hi;
    row_range(r, lo, hi);
    if (lo < hi) {
      first = lo < first ? lo : first;
      last = hi > last ? hi : last;
    }
  }
  const int64_t n = last > first ? last - first : 0;
  const int64_t n4 = round_up(n > 0 ? n : 1, TILE_R), rc = round_up(R, TILE_C);
  const int64_t rp = round_up(R, TILE_R), dp = round_up(D, TILE_C);
  w.kt.assign(static_cast<size_t>(n4 * D), 0.0f);  // K rows [n4, D]
  w.v.assign(static_cast<size_t>(n4 * dp), 0.0f);  // V rows [n, dp]
  w.q.assign(static_cast<size_t>(D * rc), 0.0f);   // Q^T [D, rc]
  w.s.resize(static_cast<size_t>(n4 * rc));        // S^T [n4, rc]
  w.o.resize(static_cast<size_t>(rp * dp));
  w.row.resize(static_cast<size_t>(n4 > D ? n4 : D));
  w.inv.assign(static_cast<size_t>(rp), 0.0f);
  std::vector<float>& p = w.p;  // P [rp, n]
  p.assign(static_cast<size_t>(rp * (n > 0 ? n : 1)), 0.0f);

  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = r / group, h = kvh * group + r % group;
    cpu::load_row_inline(qb + (b * a.q_stride_b + t * a.q_stride_s + h * a.q_stride_h) * esize,
                         dtype, D, w.row.data());
    for (int64_t d = 0; d < D; ++d) w.q[d * rc + r] = w.row[d];
  }
  for (int64_t j = 0; j < n; ++j) {
    const int64_t key = first + j;
    int64_t k_off, v_off;
    if (table != nullptr) {  // paged: the block holding this key; a bad block id reads zeros
      const int64_t id = table[b * a.block_table_stride + key / a.block_size];
      if (id < 0 || id >= a.num_blocks) continue;
      const int64_t slot = key % a.block_size;
      k_off = id * a.k_stride_b + slot * a.k_stride_s + kvh * a.k_stride_h;
      v_off = id * a.v_stride_b + slot * a.v_stride_s + kvh * a.v_stride_h;
    } else {
      k_off = b * a.k_stride_b + key * a.k_stride_s + kvh * a.k_stride_h;
      v_off = b * a.v_stride_b + key * a.v_stride_s + kvh * a.v_stride_h;
    }
    cpu::load_row_inline(kb + k_off * esize, dtype, D, w.kt.data() + j * D);
    cpu::load_row_inline(vb + v_off * esize, dtype, D, w.v.data() + j * dp);
  }

  matmul_tiles(w.kt.data(), w.q.data(), n4, D, rc, w.s.data());  // S^T = K Q^T
  for (int64_t r = 0; r < R; ++r) {
    int64_t lo, hi;
    row_range(r, lo, hi);
    if (lo >= hi) continue;  // no key: p = 0, out = 0
    float* s = w.row.data();
    for (int64_t j = 0; j < n; ++j) s[j] = w.s[j * rc + r];
    softmax_row(s, n, first, lo, hi, a.scale, a.softcap, p.data() + r * n, &w.inv[r]);
  }
  matmul_tiles(p.data(), w.v.data(), rp, n, dp, w.o.data());  // O = P V
  const bool finite = all_finite(w.v.data(), n * dp);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = r / group, h = kvh * group + r % group;
    float* o = w.o.data() + r * dp;
    if (!finite) {
      int64_t lo, hi;
      row_range(r, lo, hi);
      pv_row(p.data() + r * n, w.v.data(), dp, lo - first, lo < hi ? hi - first : lo - first,
             D, o);
    }
    scale_row(o, D, w.inv[r]);
    cpu::store_row_inline(o, D, dtype,
                          ob + (b * a.o_stride_b + t * a.o_stride_s + h * a.o_stride_h) * esize);
  }
}

// task(i, scratch) for i < n_tasks, over `threads` OpenMP threads (tasks of unequal size:
// handed out one at a time), each thread with its own scratch buffers.
template <class F>
void run_tasks(int64_t n_tasks, int64_t work, int threads, F&& task) {
#if defined(_OPENMP)
  if (threads > 1 && n_tasks > 1 && work >= cpu::MIN_PARALLEL_ELEMENTS) {
#pragma omp parallel num_threads(threads)
    {
      Scratch w;
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n_tasks; ++i) task(i, w);
    }
    return;
  }
#else
  (void)threads;
  (void)work;
#endif
  Scratch w;
  for (int64_t i = 0; i < n_tasks; ++i) task(i, w);
}

// Packed rows that no sequence covers (cu_seqlens that stop short of total_q, or that were
// not validated) get out = 0 and lse = -inf, as rows without keys do, so that the caller
// need not fill the whole output first. `segment` clamps each sequence's rows.
template <class Segment>
void fill_uncovered_rows(const PrefillArgs& a, DType dtype, const int32_t* cu_q,
                         Segment&& segment) {
  std::vector<char> covered(static_cast<size_t>(a.total_q), 0);
  for (int64_t b = 0; b < a.batch; ++b) {
    int64_t start, len;
    segment(cu_q, b, a.total_q, start, len);
    std::memset(covered.data() + start, 1, static_cast<size_t>(len));
  }
  const size_t esize = dtype == DType::kFloat32 ? 4 : 2;
  char* ob = reinterpret_cast<char*>(a.out);
  float* lse = reinterpret_cast<float*>(a.lse);
  for (int64_t t = 0; t < a.total_q; ++t) {
    if (covered[t]) continue;
    for (int64_t h = 0; h < a.heads_q; ++h) {
      std::memset(ob + (t * a.o_stride_s + h * a.o_stride_h) * esize, 0, a.head_dim * esize);
      if (lse != nullptr) {
        lse[h * a.lse_stride_h + t * a.lse_stride_row] = -std::numeric_limits<float>::infinity();
      }
    }
  }
}

}  // namespace

const char* attention_prefill_cpu(const PrefillArgs& a, int dtype_code, int threads) {
  const DType dtype = static_cast<DType>(dtype_code);
  if (!cpu::is_float_dtype(dtype)) {
    return "attention_prefill_cpu: dtype must be float32, float16 or bfloat16";
  }
  if (a.batch < 0 || a.heads_q <= 0 || a.heads_kv <= 0 || a.heads_q % a.heads_kv != 0 ||
      a.head_dim <= 0) {
    return "attention_prefill_cpu: bad sizes (heads_q a multiple of heads_kv, head_dim > 0)";
  }
  const bool varlen = a.cu_seqlens_q != 0;
  const int32_t* cu_q = reinterpret_cast<const int32_t*>(a.cu_seqlens_q);
  const int32_t* cu_k = reinterpret_cast<const int32_t*>(a.cu_seqlens_k);

  // Sequence b's rows of the packed q and k: [cu[b], cu[b + 1]) clamped to the packed
  // tensors, so that cu_seqlens that were not validated (validate=False, or under
  // torch.compile) can give wrong results but never a read or write out of bounds.
  auto segment = [](const int32_t* cu, int64_t b, int64_t total, int64_t& start, int64_t& len) {
    const int64_t lo = cu[b] < 0 ? 0 : (cu[b] > total ? total : cu[b]);
    const int64_t hi = cu[b + 1] < lo ? lo : (cu[b + 1] > total ? total : cu[b + 1]);
    start = lo;
    len = hi - lo;
  };
  // tasks: (sequence, block of query rows, heads); sequences without queries have none.
  // With blocks enough to keep every thread busy, a task takes all the heads of its
  // block: the heads of a token lie side by side in memory, so one task reads whole
  // rows of q, k and v instead of each thread a slice of every row.
  std::vector<Task> blocks;  // head 0 of each block
  for (int64_t b = 0; b < a.batch; ++b) {
    int64_t tok_q = 0, len_q = a.seqlen_q;
    if (varlen) segment(cu_q, b, a.total_q, tok_q, len_q);
    for (int64_t q0 = 0; q0 < len_q; q0 += BLOCK_Q) blocks.push_back({b, 0, q0});
  }
  const int64_t group =
      static_cast<int64_t>(blocks.size()) >= 4 * static_cast<int64_t>(threads) ? a.heads_q : 1;
  std::vector<Task> tasks;
  for (const Task& block : blocks) {
    for (int64_t h = 0; h < a.heads_q; h += group) tasks.push_back({block.b, h, block.q0});
  }
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  auto task = [&](int64_t i, Scratch& w) {
    const Task& t = tasks[i];
    int64_t tok_q = 0, len_q = a.seqlen_q, tok_k = 0, len_k = a.seqlen_k;
    if (varlen) {
      segment(cu_q, t.b, a.total_q, tok_q, len_q);
      segment(cu_k, t.b, a.total_k, tok_k, len_k);
    }
    // packed tensors: the batch stride is 0 and the token offset carries the sequence
    PrefillArgs p = a;
    if (varlen) p.q_stride_b = p.k_stride_b = p.v_stride_b = p.o_stride_b = p.lse_stride_b = 0;
    for (int64_t h = t.h; h < t.h + group; ++h) {
      run_task(p, dtype, {t.b, h, t.q0}, len_q, len_k, tok_q, tok_k, w);
    }
  };
  const int64_t work = n_tasks * group * BLOCK_Q * a.head_dim;
  run_tasks(n_tasks, work, threads, task);
  if (varlen) fill_uncovered_rows(a, dtype, cu_q, segment);
  return nullptr;
}

const char* attention_decode_cpu(const DecodeArgs& a, int dtype_code, int threads) {
  const DType dtype = static_cast<DType>(dtype_code);
  if (!cpu::is_float_dtype(dtype)) {
    return "attention_decode_cpu: dtype must be float32, float16 or bfloat16";
  }
  if (a.batch < 0 || a.q_len < 0 || a.heads_q <= 0 || a.heads_kv <= 0 ||
      a.heads_q % a.heads_kv != 0 || a.head_dim <= 0 || a.capacity < 0 ||
      (a.block_table != 0 && a.block_size <= 0)) {
    return "attention_decode_cpu: bad sizes";
  }
  const int64_t n_tasks = static_cast<int64_t>(a.batch) * a.heads_kv;
  auto task = [&](int64_t i, Scratch& w) {
    run_decode_task(a, dtype, i / a.heads_kv, i % a.heads_kv, w);
  };
  const int64_t work = n_tasks * static_cast<int64_t>(a.capacity) * a.head_dim;
  run_tasks(n_tasks, work, threads, task);
  return nullptr;
}

}  // namespace fastllm
