// Launchers of the attention kernels (no CUDA headers: included by the bindings).
//
// Pointers are device addresses as integers, strides are in elements, the head_dim
// stride is 1 and every other stride of q/k/v/out a multiple of 8 elements, every
// pointer 16-byte aligned (fastllm/native/attention.py checks all of it).
// Each launcher returns nullptr on success or a static error string.
#pragma once
#include <cstdint>

namespace fastllm {

// prefill.cu: softmax(q k^T * scale [softcapped, masked]) v over (batch, head).
//   padded: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], out [B, Sq, Hq, D]
//   varlen (cu_seqlens_q/k != 0, int32 [B + 1]): q [Tq, Hq, D], k/v [Tk, Hkv, D], out [Tq, Hq, D];
//     seqlen_q/k are then the maxima over the batch (they size the grid) and the batch strides
//     are ignored.
// Query row i of a sequence sees key j iff
//   j >= i + Sk - Sq - window_left   (window_left  >= 0; < 0: no bound)
//   j <= i + Sk - Sq + window_right  (window_right >= 0; < 0: no bound; causal: 0)
// A row that sees no key gets out = 0 and lse = -inf.
// lse (optional, float32): natural log-sum-exp of the scaled logits of each row, at
//   lse + b * lse_stride_b + h * lse_stride_h + (row offset in the packed q) * lse_stride_row.
struct PrefillArgs {
  uintptr_t q, k, v, out, lse;           // lse may be 0
  uintptr_t cu_seqlens_q, cu_seqlens_k;  // both 0 or both set
  int64_t total_q, total_k;  // varlen: rows of the packed q and k (the CPU kernel clamps to them)
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t lse_stride_b, lse_stride_h, lse_stride_row;
  int batch, heads_q, heads_kv, head_dim, seqlen_q, seqlen_k;
  float scale, softcap;  // softcap <= 0: off
  int window_left, window_right;
};
const char* attention_prefill(const PrefillArgs& args, int dtype, uintptr_t stream);

// attention_cpu.cpp: the same on host memory (float32/float16/bfloat16, any head_dim, no
// alignment rule), work split over `threads` OpenMP threads.
const char* attention_prefill_cpu(const PrefillArgs& args, int dtype, int threads);

// decode.cu: q [B, q_len, Hq, D] against a cache holding cache_seqlens[b] keys (the q_len new
// tokens included, as its last q_len positions).
//   contiguous (block_table == 0): k/v_cache [B, capacity, Hkv, D]
//   paged: k/v_cache [num_blocks, block_size, Hkv, D], block_table int32 [B, max_blocks]
//     (row stride block_table_stride), capacity = max_blocks * block_size
// Query token t of sequence b sits at position cache_seqlens[b] - q_len + t; it sees keys under
// the same window rule as prefill (window_right = 0 for causal). Lengths beyond capacity are
// clamped and out-of-range block ids read as zeros, so bad metadata cannot fault.
// num_splits > 1: each split writes fp32 partials (o_partial [splits, B, q_len, Hq, D],
// lse_partial [splits, B, q_len, Hq], contiguous) and a second kernel merges them into out
// [B, q_len, Hq, D] (strides o_stride_*). num_splits == 1 writes out directly.
struct DecodeArgs {
  uintptr_t q, k_cache, v_cache, out, cache_seqlens, block_table;
  uintptr_t o_partial, lse_partial;  // used when num_splits > 1
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;  // stride_b: per sequence, or per block when paged
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t block_table_stride;
  int batch, q_len, heads_q, heads_kv, head_dim;
  int capacity, block_size, num_blocks;  // block_size/num_blocks: paged only
  int num_splits;
  float scale, softcap;
  int window_left, window_right;
};
const char* attention_decode(const DecodeArgs& args, int dtype, uintptr_t stream);

// attention_cpu.cpp: the same on host memory (float32/float16/bfloat16, any head_dim, any
// q_len, one split; o_partial/lse_partial/num_splits unused), work split over `threads`
// OpenMP threads by (sequence, kv head).
const char* attention_decode_cpu(const DecodeArgs& args, int dtype, int threads);

}  // namespace fastllm
