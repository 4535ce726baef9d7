// Bindings of the attention launchers (fastllm/native/attention.py calls them).
#include <pybind11/stl.h>

#include <array>

#include "attention/attention.h"
#include "fastllm.h"

namespace py = pybind11;

namespace fastllm {

namespace {
using Strides = std::array<int64_t, 3>;

PrefillArgs prefill_args(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                         uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k, int64_t total_q,
                         int64_t total_k, Strides q_strides,
                         Strides k_strides, Strides v_strides, Strides o_strides,
                         Strides lse_strides, int batch, int heads_q, int heads_kv, int head_dim,
                         int seqlen_q, int seqlen_k, float scale, float softcap, int window_left,
                         int window_right) {
  PrefillArgs a{};
  a.q = q;
  a.k = k;
  a.v = v;
  a.out = out;
  a.lse = lse;
  a.cu_seqlens_q = cu_seqlens_q;
  a.cu_seqlens_k = cu_seqlens_k;
  a.total_q = total_q;
  a.total_k = total_k;
  a.q_stride_b = q_strides[0], a.q_stride_s = q_strides[1], a.q_stride_h = q_strides[2];
  a.k_stride_b = k_strides[0], a.k_stride_s = k_strides[1], a.k_stride_h = k_strides[2];
  a.v_stride_b = v_strides[0], a.v_stride_s = v_strides[1], a.v_stride_h = v_strides[2];
  a.o_stride_b = o_strides[0], a.o_stride_s = o_strides[1], a.o_stride_h = o_strides[2];
  a.lse_stride_b = lse_strides[0], a.lse_stride_h = lse_strides[1];
  a.lse_stride_row = lse_strides[2];
  a.batch = batch;
  a.heads_q = heads_q;
  a.heads_kv = heads_kv;
  a.head_dim = head_dim;
  a.seqlen_q = seqlen_q;
  a.seqlen_k = seqlen_k;
  a.scale = scale;
  a.softcap = softcap;
  a.window_left = window_left;
  a.window_right = window_right;
  return a;
}

DecodeArgs decode_args(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out,
                       uintptr_t cache_seqlens, uintptr_t block_table, uintptr_t o_partial,
                       uintptr_t lse_partial, Strides q_strides, Strides k_strides,
                       Strides v_strides, Strides o_strides, int64_t block_table_stride, int batch,
                       int q_len, int heads_q, int heads_kv, int head_dim, int capacity,
                       int block_size, int num_blocks, int num_splits, float scale, float softcap,
                       int window_left, int window_right) {
  DecodeArgs a{};
  a.q = q;
  a.k_cache = k_cache;
  a.v_cache = v_cache;
  a.out = out;
  a.cache_seqlens = cache_seqlens;
  a.block_table = block_table;
  a.o_partial = o_partial;
  a.lse_partial = lse_partial;
  a.q_stride_b = q_strides[0], a.q_stride_s = q_strides[1], a.q_stride_h = q_strides[2];
  a.k_stride_b = k_strides[0], a.k_stride_s = k_strides[1], a.k_stride_h = k_strides[2];
  a.v_stride_b = v_strides[0], a.v_stride_s = v_strides[1], a.v_stride_h = v_strides[2];
  a.o_stride_b = o_strides[0], a.o_stride_s = o_strides[1], a.o_stride_h = o_strides[2];
  a.block_table_stride = block_table_stride;
  a.batch = batch;
  a.q_len = q_len;
  a.heads_q = heads_q;
  a.heads_kv = heads_kv;
  a.head_dim = head_dim;
  a.capacity = capacity;
  a.block_size = block_size;
  a.num_blocks = num_blocks;
  a.num_splits = num_splits;
  a.scale = scale;
  a.softcap = softcap;
  a.window_left = window_left;
  a.window_right = window_right;
  return a;
}
// Binds `name` with the keyword arguments of prefill_args, then `last` (the CUDA stream,
// or the CPU thread count): launch(args, dtype, last) runs the kernel.
template <class Launch>
void def_prefill(py::module_& m, const char* name, const char* doc, const char* last,
                 Launch launch) {
  m.def(
      name,
      [launch](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
               uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k, int64_t total_q, int64_t total_k,
               Strides q_strides, Strides k_strides, Strides v_strides, Strides o_strides,
               Strides lse_strides,
               int batch, int heads_q, int heads_kv, int head_dim, int seqlen_q, int seqlen_k,
               float scale, float softcap, int window_left, int window_right, int dtype,
               uintptr_t last_value) {
        const PrefillArgs a = prefill_args(
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, total_q, total_k, q_strides,
            k_strides, v_strides, o_strides, lse_strides, batch, heads_q, heads_kv, head_dim, seqlen_q, seqlen_k, scale,
            softcap, window_left, window_right);
        launch(a, dtype, last_value);
      },
      doc, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
      py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("total_q"), py::arg("total_k"),
      py::arg("q_strides"),
      py::arg("k_strides"), py::arg("v_strides"), py::arg("o_strides"), py::arg("lse_strides"),
      py::arg("batch"), py::arg("heads_q"), py::arg("heads_kv"), py::arg("head_dim"),
      py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("scale"), py::arg("softcap"),
      py::arg("window_left"), py::arg("window_right"), py::arg("dtype"), py::arg(last));
}

// The same for decode_args.
template <class Launch>
void def_decode(py::module_& m, const char* name, const char* doc, const char* last,
                Launch launch) {
  m.def(
      name,
      [launch](uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out,
               uintptr_t cache_seqlens, uintptr_t block_table, uintptr_t o_partial,
               uintptr_t lse_partial, Strides q_strides, Strides k_strides, Strides v_strides,
               Strides o_strides, int64_t block_table_stride, int batch, int q_len, int heads_q,
               int heads_kv, int head_dim, int capacity, int block_size, int num_blocks,
               int num_splits, float scale, float softcap, int window_left, int window_right,
               int dtype, uintptr_t last_value) {
        const DecodeArgs a = decode_args(
            q, k_cache, v_cache, out, cache_seqlens, block_table, o_partial, lse_partial,
            q_strides, k_strides, v_strides, o_strides, block_table_stride, batch, q_len, heads_q,
            heads_kv, head_dim, capacity, block_size, num_blocks, num_splits, scale, softcap,
            window_left, window_right);
        launch(a, dtype, last_value);
      },
      doc, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("out"),
      py::arg("cache_seqlens"), py::arg("block_table"), py::arg("o_partial"),
      py::arg("lse_partial"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
      py::arg("o_strides"), py::arg("block_table_stride"), py::arg("batch"), py::arg("q_len"),
      py::arg("heads_q"), py::arg("heads_kv"), py::arg("head_dim"), py::arg("capacity"),
      py::arg("block_size"), py::arg("num_blocks"), py::arg("num_splits"), py::arg("scale"),
      py::arg("softcap"), py::arg("window_left"), py::arg("window_right"), py::arg("dtype"),
      py::arg(last));
}

}  // namespace

void bind_attention(py::module_& m) {
  def_prefill(m, "attention_prefill_cpu", "attention on the CPU; see csrc/attention/attention.h",
              "threads", [](const PrefillArgs& a, int dtype, uintptr_t threads) {
                py::gil_scoped_release no_gil;
                check(attention_prefill_cpu(a, dtype, static_cast<int>(threads)));
              });
  def_decode(m, "attention_decode_cpu", "decode on the CPU; see csrc/attention/attention.h",
             "threads", [](const DecodeArgs& a, int dtype, uintptr_t threads) {
               py::gil_scoped_release no_gil;
               check(attention_decode_cpu(a, dtype, static_cast<int>(threads)));
             });
#ifdef FASTLLM_WITH_CUDA
  def_prefill(m, "attention_prefill",
              "FlashAttention-style prefill; see csrc/attention/attention.h", "stream",
              [](const PrefillArgs& a, int dtype, uintptr_t stream) {
                check(attention_prefill(a, dtype, stream));
              });
  def_decode(m, "attention_decode",
             "split-KV decode against a contiguous or paged cache; see csrc/attention/attention.h",
             "stream", [](const DecodeArgs& a, int dtype, uintptr_t stream) {
               check(attention_decode(a, dtype, stream));
             });
#endif
}

}  // namespace fastllm
