// Launcher of the rope_kv_append CPU kernel (no CUDA or PyTorch headers: included by
// bindings).
#pragma once
#include <cstdint>

namespace fastllm {

// The tensors of one call, as pointers and strides in elements (unit stride on head_dim
// everywhere). q [batch, n_new, hq, D], k_new / v_new [batch, n_new, hkv, D] and cos / sin
// [batch, n_new, rot_dim] (stride 0 on batch broadcasts one row of cos/sin) are read; q_out
// [batch, n_new, hq, D] contiguous is written. The slot form is batch = T, n_new = 1.
struct RopeArgs {
  uintptr_t q, k_new, v_new, cos, sin, q_out, k_cache, v_cache, positions, block_table;
  int dtype;      // q, k, v, caches and q_out (DType code)
  int cos_dtype;  // cos and sin: the dtype of q, or float32
  int64_t batch, n_new, hq, hkv, head_dim, rot_dim;
  int64_t stride_qb, stride_qt, stride_qh;
  int64_t stride_kb, stride_kt, stride_kh;
  int64_t stride_vb, stride_vt, stride_vh;
  int64_t stride_cb, stride_ct, stride_sb, stride_st;
  int64_t stride_kcb, stride_kcs, stride_kch;
  int64_t stride_vcb, stride_vcs, stride_vch;
  // targets: slots != 0: positions[b] is a flat slot of the cache viewed as
  // [num_blocks * page_size]; else positions[b] + t is a position below `capacity`, row of
  // cache b (block_table == 0) or of block block_table[b * stride_btb + pos / page_size].
  int positions_int64, slots;
  int64_t num_blocks, page_size, capacity, stride_btb;
};

// rope_cpu.cpp: q_out = rope(q); k_cache/v_cache rows = (rope(k_new), v_new) where the
// target is inside the cache (others skipped). Tokens split over `threads` OpenMP threads.
const char* rope_kv_append_cpu(const RopeArgs& a, int threads);

}  // namespace fastllm
