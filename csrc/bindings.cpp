// pybind11 bindings of fastllm._C. No PyTorch and no CUDA headers here: the
// Python layer (fastllm/native/) validates tensors and passes raw pointers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "fastllm.h"

#ifndef FASTLLM_CUDA_ARCHS
#define FASTLLM_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

#ifdef FASTLLM_WITH_CUDA
void check(const char* err) {
  if (err != nullptr) throw std::runtime_error(std::string("fastllm._C: ") + err);
}
#endif

std::vector<std::string> cuda_archs() {
  std::vector<std::string> out;
  std::string all = FASTLLM_CUDA_ARCHS, cur;
  for (char c : all) {
    if (c == ';') {
      if (!cur.empty()) out.push_back("sm_" + cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) out.push_back("sm_" + cur);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastllm native kernels (pointer-based; see fastllm/native/)";
#ifdef FASTLLM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cuda_archs", &cuda_archs, "CUDA architectures the kernels were compiled for");

#ifdef FASTLLM_WITH_CUDA
  m.def("cuda_device_count", &fastllm::cuda_device_count);
  m.def("cuda_runtime_version", &fastllm::cuda_runtime_version);
  m.def("cuda_driver_version", &fastllm::cuda_driver_version);
  m.def(
      "quantize_per_token",
      [](uintptr_t x, int x_dtype, int64_t rows, int64_t cols, int64_t stride_x_row,
         uintptr_t x_int8, uintptr_t scale, uintptr_t stream) {
        check(fastllm::quantize_per_token(x, x_dtype, rows, cols, stride_x_row, x_int8, scale,
                                          stream));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("stride_x_row"), py::arg("x_int8"), py::arg("scale"), py::arg("stream"));
#endif
}
