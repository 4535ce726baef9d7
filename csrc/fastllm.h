// Shared declarations of fastllm._C: element types, runtime queries, and the
// bind_<family>(module) functions that csrc/bindings.cpp calls.
//
// Launchers take device pointers (uintptr_t), sizes and strides in elements and
// the CUDA stream as an integer handle, and return nullptr on success or a static
// error string (see check() below). Each family declares its launchers in
// csrc/<family>/<family>.h, which must include no CUDA or PyTorch header.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dtype.h"

namespace fastllm {

// Runtime information (runtime.cu).
int cuda_device_count();
int cuda_runtime_version();
int cuda_driver_version();

// Raises a Python RuntimeError when a launcher reports an error.
inline void check(const char* err) {
  if (err != nullptr) throw std::runtime_error(std::string("fastllm._C: ") + err);
}

void bind_quant(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_int8(pybind11::module_& m);
void bind_sparse(pybind11::module_& m);

}  // namespace fastllm
