// Bindings of the 2:4 sparse launchers (fastllm/native/sparse.py calls them).
#include "fastllm.h"
#include "sparse/sparse.h"

namespace py = pybind11;

namespace fastllm {

void bind_sparse(py::module_& m) {
#ifdef FASTLLM_WITH_CUDA
  m.def(
      "sparse24_gemm",
      [](uintptr_t x, int dtype, int64_t ldx, uintptr_t values, int64_t ldv, uintptr_t metadata,
         int64_t ldm, uintptr_t bias, int bias_dtype, uintptr_t out, int64_t ldo, int64_t M,
         int64_t N, int64_t K, int splits, uintptr_t workspace, uintptr_t stream) {
        check(sparse24_gemm(x, dtype, ldx, values, ldv, metadata, ldm, bias, bias_dtype, out, ldo, M,
                            N, K, splits, workspace, stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("ldx"), py::arg("values"), py::arg("ldv"),
      py::arg("metadata"), py::arg("ldm"), py::arg("bias"), py::arg("bias_dtype"), py::arg("out"),
      py::arg("ldo"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("splits"),
      py::arg("workspace"), py::arg("stream"));
#else
  (void)m;
#endif
}

}  // namespace fastllm
