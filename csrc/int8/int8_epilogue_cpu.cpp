// The W8A8 epilogue on the CPU (fastllm.ops.int8_linear and int8_dynamic_linear,
// backend "cpu", after torch._int_mm): one pass over the int32 accumulator.
//
//   out[m, n] = cast(float(acc[m, n]) * x_scale[m] * w_scale[n] + bias[n])
//
// in that order of float32 operations, the order of the torch backend's in-place ops,
// so the two agree bit for bit. For a float32 output, out may be acc's own memory
// (same address and row stride): each chunk of a row is read before it is written.
// Rows are split over PyTorch's threads. The reference is fastllm/reference/int8.py.
//
// int8_fused_epilogue_cpu adds, in float32 and in this order, an activation, the gated
// form (the accumulator holds [gate | up] columns: y = act(gate) * up) and a residual:
//
//   y[m, n] = act(float(acc[m, n]) * x_scale[m] * w_scale[n] + bias[n])   [* up[m, n]]
//   out[m, n] = cast(y[m, n] + float(residual[m, n]))
//
// The scaling and the residual add are the torch backend's float32 operations; the
// activations are PyTorch's functions (gelu exact and tanh form, silu) computed by the
// vectorizable approximations below, within 4e-7 relative of the exact values (ATen's
// vectorized polynomials are within a few ulps too: the two may differ in the 7th digit).
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_utils.h"
#include "dtype.h"
#include "int8/int8.h"

namespace fastllm {
namespace {

using cpu::CHUNK;

// out = float(acc) * xs * ws (+ bias), n <= CHUNK. acc is copied into a local buffer
// first: out may be the same memory.
FASTLLM_CPU_CLONES void scale_chunk(const int32_t* acc, float xs, const float* ws,
                                    const float* bias, int64_t n, float* out) {
  int32_t a[CHUNK];
  std::memcpy(a, acc, static_cast<size_t>(n) * sizeof(int32_t));
  if (bias != nullptr) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(a[j]) * xs * ws[j] + bias[j];
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(a[j]) * xs * ws[j];
  }
}

enum Activation { kNone = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

// The activations are built from exp_approx alone (no libm call), so that the compiler
// vectorizes their loops in every ISA clone. Each is written in a form without
// cancellation, so that it keeps its relative accuracy in the tails:
//   gelu(x)      = x / 2 * erfc(-x / sqrt 2)            (erfc(-z) = 2 - erfc(z) for z < 0)
//   gelu_tanh(x) = x * sigmoid(2 * beta * (x + kappa x^3))   (= x / 2 * (1 + tanh(...)))
//   silu(x)      = x / (1 + exp(-x))
// Measured against those forms in float64 over x in [-14, 14]: silu within 2e-7 relative;
// gelu and gelu_tanh within 3e-6 for |x| <= 5, and beyond, where the results are below
// 1e-10 in magnitude, within 3e-5 (the float32 rounding of the exponent's argument). NaN gives NaN, +inf gives +inf and -inf gives NaN (-inf * 0), as the
// formulas do.

// Contraction into fused multiply-adds is allowed from here to activate(): the
// activations are approximations anyway, and the clones with FMA need fewer instructions.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// e^x, 1-2 ulp for x in [-87.3, 88]: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two
// so that n ln2 is exact), e^r by its Taylor series to r^7 (remainder < 6e-9), times 2^n
// built in the exponent bits. x is clamped to that range (e^x saturates at 1.6e38 and
// 1.2e-38 instead of overflowing).
inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n == n ? n : 0.0f) + 127) << 23;  // NaN: p is NaN
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// erfc(z) for z >= 0: t e^(P(t) - z^2), t = 1 / (1 + z / 2), P a degree-10 polynomial
// fitted (least squares in float64, over z in [0, 10]) to log(erfc(z) / t) + z^2;
// relative error below 2e-6 (from rounding z^2 in float32 at large z), 2e-7 for z < 1.
// z is clamped to 10 (erfc(10) = 2e-45 is 0 for every use here).
inline float erfc_nonneg(float z) {
  z = z > 10.0f ? 10.0f : z;
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = -0.1508316546678543f;
  p = p * t + 1.0258708000183105f;
  p = p * t + -2.930896759033203f;
  p = p * t + 4.457876205444336f;
  p = p * t + -3.768522262573242f;
  p = p * t + 1.809384822845459f;
  p = p * t + -0.774333655834198f;
  p = p * t + 0.24375788867473602f;
  p = p * t + 0.3512669503688812f;
  p = p * t + 1.00201416015625f;
  p = p * t + -1.2655866146087646f;
  return t * exp_approx(p - z * z);
}

FASTLLM_CPU_CLONES void activate(float* v, int64_t n, int act) {
  switch (act) {
    case kGelu:
      for (int64_t j = 0; j < n; ++j) {
        const float x = v[j];
        const float e = erfc_nonneg((x < 0.0f ? -x : x) * 0.70710678118654752f);
        const float y = 0.5f * x * (x < 0.0f ? e : 2.0f - e);
        v[j] = x == -INFINITY ? NAN : y;
      }
      break;
    case kGeluTanh: {
      const float beta2 = 2.0f * 0.79788456080286536f, kappa = 0.044715f;
      for (int64_t j = 0; j < n; ++j) {
        const float x = v[j];
        const float y = x / (1.0f + exp_approx(-beta2 * (x + kappa * x * x * x)));
        v[j] = x == -INFINITY ? NAN : y;
      }
      break;
    }
    case kSilu:
      for (int64_t j = 0; j < n; ++j) {
        const float x = v[j];
        const float y = x / (1.0f + exp_approx(-x));
        v[j] = x == -INFINITY ? NAN : y;
      }
      break;
    default:
      break;
  }
}
#pragma GCC pop_options

}  // namespace

const char* int8_fused_epilogue_cpu(uintptr_t acc, int64_t ld_acc, uintptr_t x_scale,
                                    uintptr_t w_scale, uintptr_t bias, int bias_dtype, int act,
                                    int gated, uintptr_t residual, int residual_dtype,
                                    int64_t ld_res, uintptr_t out, int out_dtype, int64_t ld_out,
                                    int64_t M, int64_t N, int threads) {
  const DType odt = static_cast<DType>(out_dtype);
  const DType bdt = static_cast<DType>(bias_dtype);
  const DType rdt = static_cast<DType>(residual_dtype);
  const int64_t cols = gated ? 2 * N : N;  // accumulator columns: [gate | up] when gated
  if (!cpu::is_float_dtype(odt)) {
    return "int8_fused_epilogue_cpu: out dtype must be float32, float16 or bfloat16";
  }
  if (bias != 0 && !cpu::is_float_dtype(bdt)) {
    return "int8_fused_epilogue_cpu: bias dtype must be float32, float16 or bfloat16";
  }
  if (residual != 0 && (!cpu::is_float_dtype(rdt) || ld_res < N)) {
    return "int8_fused_epilogue_cpu: residual must be float32/float16/bfloat16, ld_res >= N";
  }
  if (act < kNone || act > kSilu) return "int8_fused_epilogue_cpu: unknown activation code";
  if (M < 0 || N < 0 || ld_acc < cols || ld_out < N) {
    return "int8_fused_epilogue_cpu: bad sizes (M, N >= 0, ld_acc >= N (2N gated), ld_out >= N)";
  }
  if (out == acc && (odt != DType::kFloat32 || gated || ld_out != ld_acc)) {
    return "int8_fused_epilogue_cpu: only a float32, non-gated output with the accumulator's "
           "row stride may overwrite it";
  }
  const int32_t* a = reinterpret_cast<const int32_t*>(acc);
  const float* xs = reinterpret_cast<const float*>(x_scale);
  const float* ws = reinterpret_cast<const float*>(w_scale);

  std::vector<float> bias_f;  // the bias as float32, once per call
  if (bias != 0) {
    bias_f.resize(static_cast<size_t>(cols));
    cpu::load_row(reinterpret_cast<const void*>(bias), bdt, cols, bias_f.data());
  }
  const float* b = bias != 0 ? bias_f.data() : nullptr;
  const size_t res_elem = rdt == DType::kFloat32 ? 4 : 2;
  const size_t out_elem = odt == DType::kFloat32 ? 4 : 2;

  cpu::for_each_row(M, cols, threads, [&](int64_t m) {
    const int32_t* a_row = a + m * ld_acc;
    char* o_row = reinterpret_cast<char*>(out) + static_cast<size_t>(m * ld_out) * out_elem;
    float v[CHUNK];
    float u[CHUNK];
    for (int64_t j0 = 0; j0 < N; j0 += CHUNK) {
      const int64_t n = N - j0 < CHUNK ? N - j0 : CHUNK;
      scale_chunk(a_row + j0, xs[m], ws + j0, b ? b + j0 : nullptr, n, v);
      activate(v, n, act);
      if (gated) {
        scale_chunk(a_row + N + j0, xs[m], ws + N + j0, b ? b + N + j0 : nullptr, n, u);
        for (int64_t j = 0; j < n; ++j) v[j] *= u[j];
      }
      if (residual != 0) {
        const char* r_row = reinterpret_cast<const char*>(residual) +
                            static_cast<size_t>(m * ld_res + j0) * res_elem;
        cpu::load_row(r_row, rdt, n, u);
        for (int64_t j = 0; j < n; ++j) v[j] += u[j];
      }
      if (odt == DType::kFloat32) {
        std::memcpy(o_row + static_cast<size_t>(j0) * 4, v, static_cast<size_t>(n) * 4);
      } else {
        cpu::store_row(v, n, odt, o_row + static_cast<size_t>(j0) * 2);
      }
    }
  });
  return nullptr;
}

const char* int8_epilogue_cpu(uintptr_t acc, int64_t ld_acc, uintptr_t x_scale, uintptr_t w_scale,
                              uintptr_t bias, int bias_dtype, uintptr_t out, int out_dtype,
                              int64_t ld_out, int64_t M, int64_t N, int threads) {
  const DType odt = static_cast<DType>(out_dtype);
  const DType bdt = static_cast<DType>(bias_dtype);
  if (!cpu::is_float_dtype(odt)) {
    return "int8_epilogue_cpu: out dtype must be float32, float16 or bfloat16";
  }
  if (bias != 0 && !cpu::is_float_dtype(bdt)) {
    return "int8_epilogue_cpu: bias dtype must be float32, float16 or bfloat16";
  }
  if (M < 0 || N < 0 || ld_acc < N || ld_out < N) {
    return "int8_epilogue_cpu: bad sizes (M, N >= 0, ld_acc >= N, ld_out >= N)";
  }
  if (odt != DType::kFloat32 && out == acc) {
    return "int8_epilogue_cpu: only a float32 output may overwrite the accumulator";
  }
  if (odt == DType::kFloat32 && out == acc && ld_out != ld_acc) {
    return "int8_epilogue_cpu: an in-place output needs the accumulator's row stride";
  }
  const int32_t* a = reinterpret_cast<const int32_t*>(acc);
  const float* xs = reinterpret_cast<const float*>(x_scale);
  const float* ws = reinterpret_cast<const float*>(w_scale);

  std::vector<float> bias_f;  // the bias as float32, once per call
  if (bias != 0) {
    bias_f.resize(static_cast<size_t>(N));
    cpu::load_row(reinterpret_cast<const void*>(bias), bdt, N, bias_f.data());
  }
  const float* b = bias != 0 ? bias_f.data() : nullptr;

  cpu::for_each_row(M, N, threads, [&](int64_t m) {
    const int32_t* a_row = a + m * ld_acc;
    if (odt == DType::kFloat32) {
      float* o_row = reinterpret_cast<float*>(out) + m * ld_out;
      for (int64_t j0 = 0; j0 < N; j0 += CHUNK) {
        const int64_t n = N - j0 < CHUNK ? N - j0 : CHUNK;
        scale_chunk(a_row + j0, xs[m], ws + j0, b ? b + j0 : nullptr, n, o_row + j0);
      }
      return;
    }
    uint16_t* o_row = reinterpret_cast<uint16_t*>(out) + m * ld_out;
    float v[CHUNK];
    for (int64_t j0 = 0; j0 < N; j0 += CHUNK) {
      const int64_t n = N - j0 < CHUNK ? N - j0 : CHUNK;
      scale_chunk(a_row + j0, xs[m], ws + j0, b ? b + j0 : nullptr, n, v);
      cpu::store_row(v, n, odt, o_row + j0);
    }
  });
  return nullptr;
}

}  // namespace fastllm
