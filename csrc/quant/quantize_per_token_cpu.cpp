// Symmetric per-row int8 quantization on the CPU (fastllm.ops.quantize_per_token,
// backend "cpu"): the same result as the reference, bit for bit, in one read of x for
// the row maximum and one for the quantization (the row is still in L1/L2 by then).
//
//   scale[r] = max_j |x[r, j]| / 127          (float32; 1.0 where that is not > 0)
//   q[r, j]  = clamp(round_half_even(x[r, j] / scale[r]), -127, 127)
//
// With `smooth` (float32 [cols], SmoothQuant's run-time factor) x[r, j] is first replaced
// by float(x[r, j]) / smooth[j], computed once into a row buffer.
//
// Rows are split over PyTorch's threads. The reference is fastllm/reference/quant.py.
#include <cstring>
#include <vector>

#include "cpu_utils.h"
#include "dtype.h"
#include "quant/quant.h"
#include "quant/quantize_row_cpu.h"

namespace fastllm {
namespace {

using cpu::CHUNK;
using quant_cpu::divide_f32;
using quant_cpu::quantize_f32;
using quant_cpu::scale_of;

// The same for 16-bit floats (bfloat16 and float16 both order like their bits).
FASTLLM_CPU_CLONES uint16_t absmax_bits_16(const uint16_t* x, int64_t n) {
  uint16_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t u = x[j] & 0x7fffu;
    m = u > m ? u : m;
  }
  return m;
}

// The row as float32: x itself, or converted (and divided by `smooth`) into `buf`.
const float* row_as_float(const void* row, DType dtype, int64_t cols, const float* smooth,
                          std::vector<float>& buf) {
  if (dtype == DType::kFloat32 && smooth == nullptr) return static_cast<const float*>(row);
  buf.resize(static_cast<size_t>(cols));
  float* y = buf.data();
  if (dtype == DType::kFloat32) {
    divide_f32(static_cast<const float*>(row), smooth, cols, y);
    return y;
  }
  cpu::load_row(row, dtype, cols, y);
  if (smooth != nullptr) divide_f32(y, smooth, cols, y);
  return y;
}

void quantize_row(const void* row, DType dtype, int64_t cols, const float* smooth, int8_t* q,
                  float* scale) {
  if (dtype != DType::kFloat32 && smooth == nullptr) {
    // 16-bit input: the maximum from the raw bits, then converted a chunk at a time
    const uint16_t* x = static_cast<const uint16_t*>(row);
    const uint16_t m = absmax_bits_16(x, cols);
    const bool bf16 = dtype == DType::kBFloat16;
    const float s = scale_of(bf16 ? cpu::bf16_to_float(m) : cpu::half_to_float(m));
    float buf[CHUNK];
    for (int64_t j0 = 0; j0 < cols; j0 += CHUNK) {
      const int64_t n = cols - j0 < CHUNK ? cols - j0 : CHUNK;
      cpu::load_row(x + j0, dtype, n, buf);
      quantize_f32(buf, n, s, q + j0);
    }
    *scale = s;
    return;
  }
  thread_local std::vector<float> buf;  // one row of float32, per thread
  const float* y = row_as_float(row, dtype, cols, smooth, buf);
  *scale = quant_cpu::quantize_row_f32(y, cols, q);
}

}  // namespace

const char* quantize_per_token_cpu(uintptr_t x, int x_dtype, int64_t rows, int64_t cols,
                                   int64_t stride_x_row, uintptr_t smooth, uintptr_t x_int8,
                                   uintptr_t scale, int threads) {
  const DType dtype = static_cast<DType>(x_dtype);
  if (!cpu::is_float_dtype(dtype)) {
    return "quantize_per_token_cpu: x dtype must be float32, float16 or bfloat16";
  }
  if (rows < 0 || cols < 0 || stride_x_row < 0) {  // rows may overlap (an expanded x)
    return "quantize_per_token_cpu: bad sizes (rows, cols and stride_x_row must be >= 0)";
  }
  const int64_t esize = dtype == DType::kFloat32 ? 4 : 2;
  const char* base = reinterpret_cast<const char*>(x);
  int8_t* q = reinterpret_cast<int8_t*>(x_int8);
  float* s = reinterpret_cast<float*>(scale);
  const float* sm = reinterpret_cast<const float*>(smooth);
  cpu::for_each_row(rows, cols, threads, [&](int64_t r) {
    quantize_row(base + r * stride_x_row * esize, dtype, cols, sm, q + r * cols, s + r);
  });
  return nullptr;
}

}  // namespace fastllm
