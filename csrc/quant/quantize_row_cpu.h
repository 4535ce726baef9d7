// The per-row int8 quantization arithmetic of the CPU kernels, in one place: the
// quantization op (quantize_per_token_cpu.cpp) and the norms that emit their output
// quantized (norm_cpu.cpp) use these, so the two agree bit for bit.
//
//   scale = max_j |z[j]| / 127            (1.0 where that is not > 0)
//   q[j]  = clamp(round_half_even(z[j] / scale), -127, 127)   (IEEE division, no reciprocal)
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu_utils.h"

namespace fastllm {
namespace quant_cpu {

// max |x| as a bit pattern: non-negative floats order like their bits, and an integer
// max vectorizes where a float one (NaN rules) does not. A NaN wins, as in PyTorch.
[[maybe_unused]] FASTLLM_CPU_CLONES static uint32_t absmax_bits_f32(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    std::memcpy(&u, x + j, sizeof u);
    u &= 0x7fffffffu;
    m = u > m ? u : m;
  }
  return m;
}

// q = clamp(round(x / s)); the IEEE division, as the reference does it. Written so that
// GCC vectorizes it without mask juggling: the NaN test kept as a flag, the clamps as
// min/max, the rounding as rint (round half to even in the default rounding mode; one
// vcvtps2dq): the loop alone about twice as fast as clamping before a magic-number
// rounding (960 x 384 on one AVX-512 core: 105 -> 54 us), the same bits.
[[maybe_unused]] FASTLLM_CPU_CLONES static void quantize_f32(const float* x, int64_t n, float s,
                                                             int8_t* q) {
  for (int64_t j = 0; j < n; ++j) {
    float v = x[j] / s;
    const bool number = v == v;  // NaN (unspecified by the op) -> 0, never undefined behaviour
    v = v < 127.0f ? v : 127.0f;
    v = v > -127.0f ? v : -127.0f;
    const int32_t i = static_cast<int32_t>(__builtin_rintf(v));  // |v| <= 127: exact
    q[j] = number ? static_cast<int8_t>(i) : int8_t{0};
  }
}

// y = x / s elementwise (SmoothQuant's run-time factor, one per column); y may be x.
[[maybe_unused]] FASTLLM_CPU_CLONES static void divide_f32(const float* x, const float* s,
                                                           int64_t n, float* y) {
  for (int64_t j = 0; j < n; ++j) y[j] = x[j] / s[j];
}

inline float scale_of(float amax) {
  const float s = amax / 127.0f;
  return s > 0.0f ? s : 1.0f;  // all-zero row, an amax so small it underflows, or NaN
}

// The whole of it for one float32 row: q and the returned scale.
inline float quantize_row_f32(const float* z, int64_t n, int8_t* q) {
  const float s = scale_of(cpu::bits_float(absmax_bits_f32(z, n)));
  quantize_f32(z, n, s, q);
  return s;
}

}  // namespace quant_cpu
}  // namespace fastllm
