// Bindings of the norm launchers.
#include "fastllm.h"
#include "norm/norm.h"

namespace py = pybind11;

namespace fastllm {

void bind_norm(py::module_& m) {
  m.def(
      "norm_cpu",
      [](uintptr_t x, int x_dtype, int64_t rows, int64_t cols, int64_t stride_x_row,
         uintptr_t residual, int64_t stride_r_row, uintptr_t weight, uintptr_t bias, double eps,
         int rms, int quantize, uintptr_t smooth, uintptr_t y, uintptr_t x_int8, uintptr_t scale,
         uintptr_t residual_out, int threads) {
        py::gil_scoped_release no_gil;
        check(norm_cpu(x, x_dtype, rows, cols, stride_x_row, residual, stride_r_row, weight,
                       bias, eps, rms, quantize, smooth, y, x_int8, scale, residual_out,
                       threads));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("stride_x_row"), py::arg("residual"), py::arg("stride_r_row"), py::arg("weight"),
      py::arg("bias"), py::arg("eps"), py::arg("rms"), py::arg("quantize"), py::arg("smooth"),
      py::arg("y"), py::arg("x_int8"), py::arg("scale"), py::arg("residual_out"),
      py::arg("threads"));
}

}  // namespace fastllm
