// Rotary embedding of q and the new keys, and the KV-cache append, on the CPU
// (fastllm.ops.rope_kv_append, backend "cpu"): one read of q, k_new, v_new and one write of
// q_out and of the cache rows, per token.
//
//   y[d] = x[d] * cos[d] + r[d] * sin[d]       d < R, r = rotate_half(x[:R]):
//                                              r[d] = -x[d + R/2] (d < R/2), x[d - R/2] else
//   y[d] = x[d]                                R <= d < D (partial rotary: passed through)
//
// With cos/sin of x's 16-bit dtype T (what transformers' LlamaRotaryEmbedding returns)
// each product and the sum are rounded to T, as the unfused PyTorch ops round them; with
// float32 cos/sin they are computed in float32 and rounded to T once. Contraction is off
// (setup.py: -ffp-contract=off), so float32 results equal PyTorch's mul-then-add bit for bit.
// Targets follow kv_cache_append: outside the cache or the block table, or a bad block id,
// the token's key and value are skipped. Reference: fastllm/reference/rope.py.
#include <cstring>
#include <vector>

#include "cpu_utils.h"
#include "dtype.h"
#include "rope/rope.h"

namespace fastllm {
namespace {

// v = float(T(v)): the value a tensor of dtype T would hold.
void round_to(DType dtype, float* v, int64_t n) {
  if (dtype == DType::kBFloat16) {
    for (int64_t j = 0; j < n; ++j) v[j] = cpu::bf16_to_float(cpu::float_to_bf16(v[j]));
  } else if (dtype == DType::kFloat16) {
    for (int64_t j = 0; j < n; ++j) v[j] = cpu::half_to_float(cpu::float_to_half(v[j]));
  }
}

// a = x[:R] * c, b = rotate_half(x[:R]) * s
FASTLLM_CPU_CLONES void products(const float* x, const float* c, const float* s, int64_t half,
                                 float* a, float* b) {
  for (int64_t j = 0; j < half; ++j) {
    a[j] = x[j] * c[j];
    b[j] = -x[j + half] * s[j];
  }
  for (int64_t j = half; j < 2 * half; ++j) {
    a[j] = x[j] * c[j];
    b[j] = x[j - half] * s[j];
  }
}

FASTLLM_CPU_CLONES void add_into(float* x, const float* a, const float* b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = a[j] + b[j];
}

struct Buffers {
  std::vector<float> c, s, x, a, b;
};

// Rotates the row src (D elements of dtype) and stores it at dst.
void rotate_row(const RopeArgs& p, DType dtype, bool round_steps, int64_t esize, Buffers& w,
                const char* src, char* dst) {
  const int64_t D = p.head_dim, R = p.rot_dim;
  cpu::load_row(src, dtype, D, w.x.data());
  products(w.x.data(), w.c.data(), w.s.data(), R / 2, w.a.data(), w.b.data());
  if (round_steps) {
    round_to(dtype, w.a.data(), R);
    round_to(dtype, w.b.data(), R);
  }
  add_into(w.x.data(), w.a.data(), w.b.data(), R);
  cpu::store_row(w.x.data(), R, dtype, dst);
  if (R < D) std::memcpy(dst + R * esize, src + R * esize, static_cast<size_t>((D - R) * esize));
}

// The cache row of token t of sequence b: (block or batch row, slot in it), or false.
bool target(const RopeArgs& p, int64_t b, int64_t t, int64_t* blk, int64_t* row) {
  const int64_t p0 = p.positions_int64 ? reinterpret_cast<const int64_t*>(p.positions)[b]
                                       : reinterpret_cast<const int32_t*>(p.positions)[b];
  if (p.slots) {
    if (p0 < 0 || p0 >= p.num_blocks * p.page_size) return false;
    *blk = p0 / p.page_size;
    *row = p0 % p.page_size;
    return true;
  }
  if (p0 >= p.capacity) return false;
  const int64_t pos = p0 + t;  // no overflow: p0 < capacity, 0 <= t < n_new
  if (pos < 0 || pos >= p.capacity) return false;
  if (p.block_table == 0) {
    *blk = b;
    *row = pos;
    return true;
  }
  const int64_t id =
      reinterpret_cast<const int32_t*>(p.block_table)[b * p.stride_btb + pos / p.page_size];
  if (id < 0 || id >= p.num_blocks) return false;
  *blk = id;
  *row = pos % p.page_size;
  return true;
}

void one_token(const RopeArgs& p, int64_t token) {
  const DType dtype = static_cast<DType>(p.dtype);
  const DType cos_dtype = static_cast<DType>(p.cos_dtype);
  const bool round_steps = cos_dtype != DType::kFloat32;
  const int64_t esize = dtype == DType::kFloat32 ? 4 : 2;
  const int64_t cesize = cos_dtype == DType::kFloat32 ? 4 : 2;
  const int64_t b = token / p.n_new, t = token % p.n_new;
  const int64_t D = p.head_dim, R = p.rot_dim;
  thread_local Buffers w;
  w.c.resize(static_cast<size_t>(R));
  w.s.resize(static_cast<size_t>(R));
  w.a.resize(static_cast<size_t>(R));
  w.b.resize(static_cast<size_t>(R));
  w.x.resize(static_cast<size_t>(D));
  const char* cos = reinterpret_cast<const char*>(p.cos);
  const char* sin = reinterpret_cast<const char*>(p.sin);
  cpu::load_row(cos + (b * p.stride_cb + t * p.stride_ct) * cesize, cos_dtype, R, w.c.data());
  cpu::load_row(sin + (b * p.stride_sb + t * p.stride_st) * cesize, cos_dtype, R,
                w.s.data());

  const char* q = reinterpret_cast<const char*>(p.q);
  char* q_out = reinterpret_cast<char*>(p.q_out);
  for (int64_t h = 0; h < p.hq; ++h) {
    rotate_row(p, dtype, round_steps, esize, w,
               q + (b * p.stride_qb + t * p.stride_qt + h * p.stride_qh) * esize,
               q_out + ((token * p.hq + h) * D) * esize);
  }

  int64_t blk, row;
  if (!target(p, b, t, &blk, &row)) return;
  const char* k = reinterpret_cast<const char*>(p.k_new);
  const char* v = reinterpret_cast<const char*>(p.v_new);
  char* kc = reinterpret_cast<char*>(p.k_cache);
  char* vc = reinterpret_cast<char*>(p.v_cache);
  for (int64_t h = 0; h < p.hkv; ++h) {
    rotate_row(p, dtype, round_steps, esize, w,
               k + (b * p.stride_kb + t * p.stride_kt + h * p.stride_kh) * esize,
               kc + (blk * p.stride_kcb + row * p.stride_kcs + h * p.stride_kch) * esize);
    std::memcpy(vc + (blk * p.stride_vcb + row * p.stride_vcs + h * p.stride_vch) * esize,
                v + (b * p.stride_vb + t * p.stride_vt + h * p.stride_vh) * esize,
                static_cast<size_t>(D * esize));
  }
}

}  // namespace

const char* rope_kv_append_cpu(const RopeArgs& a, int threads) {
  const DType dtype = static_cast<DType>(a.dtype), cos_dtype = static_cast<DType>(a.cos_dtype);
  if (!cpu::is_float_dtype(dtype)) {
    return "rope_kv_append_cpu: dtype must be float32, float16 or bfloat16";
  }
  if (cos_dtype != dtype && cos_dtype != DType::kFloat32) {
    return "rope_kv_append_cpu: cos/sin must have q's dtype or float32";
  }
  if (a.batch < 0 || a.n_new < 0 || a.hq < 0 || a.hkv < 0 || a.head_dim < 1 || a.rot_dim < 2 ||
      a.rot_dim % 2 != 0 || a.rot_dim > a.head_dim || a.page_size < 1 || a.num_blocks < 0) {
    return "rope_kv_append_cpu: bad sizes";
  }
  if (a.q == 0 || a.k_new == 0 || a.v_new == 0 || a.cos == 0 || a.sin == 0 || a.q_out == 0 ||
      a.k_cache == 0 || a.v_cache == 0 || a.positions == 0) {
    return "rope_kv_append_cpu: a required pointer is null";
  }
  const int64_t tokens = a.batch * a.n_new;
  cpu::for_each_row(tokens, (a.hq + 2 * a.hkv) * a.head_dim, threads,
                    [&](int64_t token) { one_token(a, token); });
  return nullptr;
}

}  // namespace fastllm
