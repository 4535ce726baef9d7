// Interface between the pybind11 bindings (plain C++, no CUDA or PyTorch headers)
// and the CUDA launchers. Tensors arrive as device pointers (uintptr_t), sizes and
// strides in elements, and the CUDA stream as an integer handle.
//
// Every launcher returns nullptr on success or a static error string; the bindings
// turn that into a Python RuntimeError.
#pragma once
#include <cstdint>

namespace fastllm {

// Element types, numbered as in fastllm/native/__init__.py (DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3, kInt32 = 4 };

// Runtime information (runtime.cu).
int cuda_device_count();
int cuda_runtime_version();
int cuda_driver_version();

// quant/quantize_per_token.cu
const char* quantize_per_token(uintptr_t x, int x_dtype, int64_t rows, int64_t cols,
                               int64_t stride_x_row, uintptr_t x_int8, uintptr_t scale,
                               uintptr_t stream);

}  // namespace fastllm
