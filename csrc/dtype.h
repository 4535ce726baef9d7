// Element-type codes shared by bindings and kernels, numbered as in
// fastllm/native/__init__.py (DTYPE_CODES).
#pragma once

namespace fastllm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3, kInt32 = 4 };

}  // namespace fastllm
