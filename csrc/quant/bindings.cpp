// Bindings of the quantization launchers.
#include "fastllm.h"
#include "quant/quant.h"

namespace py = pybind11;

namespace fastllm {

void bind_quant(py::module_& m) {
  m.def(
      "quantize_per_token_cpu",
      [](uintptr_t x, int x_dtype, int64_t rows, int64_t cols, int64_t stride_x_row,
         uintptr_t smooth, uintptr_t x_int8, uintptr_t scale, int threads) {
        py::gil_scoped_release no_gil;
        check(quantize_per_token_cpu(x, x_dtype, rows, cols, stride_x_row, smooth, x_int8, scale,
                                     threads));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("stride_x_row"), py::arg("smooth"), py::arg("x_int8"), py::arg("scale"),
      py::arg("threads"));
#ifdef FASTLLM_WITH_CUDA
  m.def(
      "quantize_per_token",
      [](uintptr_t x, int x_dtype, int64_t rows, int64_t cols, int64_t stride_x_row,
         uintptr_t x_int8, uintptr_t scale, uintptr_t stream) {
        check(quantize_per_token(x, x_dtype, rows, cols, stride_x_row, x_int8, scale, stream));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("stride_x_row"), py::arg("x_int8"), py::arg("scale"), py::arg("stream"));
#endif
}

}  // namespace fastllm
