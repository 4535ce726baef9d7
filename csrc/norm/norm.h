// Launchers of the norm kernels (no CUDA or PyTorch headers: included by bindings).
#pragma once
#include <cstdint>

namespace fastllm {

// norm_cpu.cpp: RMSNorm (rms != 0) or LayerNorm of x [rows, cols] (row stride
// stride_x_row, unit column stride), after adding residual (0: none; row stride
// stride_r_row; the sum is written to residual_out [rows, cols] contiguous). weight and
// bias (0: none) are [cols] of x's dtype, smooth (0: none) float32 [cols].
// quantize == 0: y [rows, cols] contiguous, x's dtype; else x_int8 [rows, cols]
// contiguous and scale [rows] float32. Rows split over `threads` OpenMP threads.
const char* norm_cpu(uintptr_t x, int x_dtype, int64_t rows, int64_t cols, int64_t stride_x_row,
                     uintptr_t residual, int64_t stride_r_row, uintptr_t weight, uintptr_t bias,
                     double eps, int rms, int quantize, uintptr_t smooth, uintptr_t y,
                     uintptr_t x_int8, uintptr_t scale, uintptr_t residual_out, int threads);

}  // namespace fastllm
