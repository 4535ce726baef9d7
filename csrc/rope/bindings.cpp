// Bindings of the rope_kv_append launcher.
#include <pybind11/stl.h>

#include <vector>

#include "fastllm.h"
#include "rope/rope.h"

namespace py = pybind11;

namespace fastllm {

void bind_rope(py::module_& m) {
  // pointers: q, k_new, v_new, cos, sin, q_out, k_cache, v_cache, positions, block_table;
  // ints: the int fields of RopeArgs in declaration order, from dtype to stride_btb.
  m.def(
      "rope_kv_append_cpu",
      [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& ints, int threads) {
        if (ptrs.size() != 10 || ints.size() != 33) {
          check("rope_kv_append_cpu: expected 10 pointers and 33 integers");
        }
        const int64_t* i = ints.data();
        RopeArgs a{ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], ptrs[6], ptrs[7],
                   ptrs[8], ptrs[9], static_cast<int>(i[0]), static_cast<int>(i[1]),
                   i[2], i[3], i[4], i[5], i[6], i[7],
                   i[8], i[9], i[10], i[11], i[12], i[13], i[14], i[15], i[16],
                   i[17], i[18], i[19], i[20],
                   i[21], i[22], i[23], i[24], i[25], i[26],
                   static_cast<int>(i[27]), static_cast<int>(i[28]),
                   i[29], i[30], i[31], i[32]};
        py::gil_scoped_release no_gil;
        check(rope_kv_append_cpu(a, threads));
      },
      py::arg("ptrs"), py::arg("ints"), py::arg("threads"));
}

}  // namespace fastllm
