// Launchers of the quantization kernels (no CUDA headers: included by bindings).
#pragma once
#include <cstdint>

namespace fastllm {

// quantize_per_token.cu: x [rows, cols] (row stride stride_x_row, unit column stride)
// -> x_int8 [rows, cols] contiguous, scale [rows] float32.
const char* quantize_per_token(uintptr_t x, int x_dtype, int64_t rows, int64_t cols,
                               int64_t stride_x_row, uintptr_t x_int8, uintptr_t scale,
                               uintptr_t stream);

// quantize_per_token_cpu.cpp: the same on host memory, of x / smooth (float32 [cols])
// when smooth is not 0; rows split over `threads` OpenMP threads.
const char* quantize_per_token_cpu(uintptr_t x, int x_dtype, int64_t rows, int64_t cols,
                                   int64_t stride_x_row, uintptr_t smooth, uintptr_t x_int8,
                                   uintptr_t scale, int threads);

}  // namespace fastllm
