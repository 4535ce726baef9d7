// pybind11 module fastllm._C. No PyTorch and no CUDA headers in any bindings file:
// the Python layer (fastllm/native/) validates tensors and passes raw pointers,
// sizes, strides and the CUDA stream as integers.
//
// Each kernel family binds its launchers in csrc/<family>/bindings.cpp through a
// bind_<family>(m) function declared in fastllm.h; those bind nothing when the
// module is built without CUDA.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "fastllm.h"

namespace fastllm {
void bind_norm(pybind11::module_& m);  // csrc/norm/bindings.cpp
void bind_rope(pybind11::module_& m);  // csrc/rope/bindings.cpp
}  // namespace fastllm

#ifndef FASTLLM_CUDA_ARCHS
#define FASTLLM_CUDA_ARCHS ""
#endif

namespace {

std::vector<std::string> cuda_archs() {
  std::vector<std::string> out;
  std::string all = FASTLLM_CUDA_ARCHS, cur;
  for (char c : all + ";") {
    if (c != ';') {
      cur.push_back(c);
    } else if (!cur.empty()) {
      out.push_back("sm_" + cur);
      cur.clear();
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastllm native kernels (pointer-based; see fastllm/native/)";
#ifdef FASTLLM_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_device_count", &fastllm::cuda_device_count);
  m.def("cuda_runtime_version", &fastllm::cuda_runtime_version);
  m.def("cuda_driver_version", &fastllm::cuda_driver_version);
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cuda_archs", &cuda_archs, "CUDA architectures the kernels were compiled for");
#ifdef _OPENMP
  m.attr("with_openmp") = true;  // the C++ CPU kernels split rows over OpenMP threads
#else
  m.attr("with_openmp") = false;
#endif

  fastllm::bind_quant(m);
  fastllm::bind_attention(m);
  fastllm::bind_int8(m);
  fastllm::bind_sparse(m);
  fastllm::bind_norm(m);
  fastllm::bind_rope(m);
}
