// RMSNorm and LayerNorm on the CPU (fastllm.ops.rms_norm / layer_norm, backend "cpu"),
// with the residual add before and the per-token int8 quantization after fused in: one
// read of x (and residual) and one write of the output per row, the row kept in a
// float32 buffer in between.
//
//   h = T(x + r)                                    (the new residual; T = x's dtype)
//   rms:   y = T(w * T(h * 1/sqrt(mean(h*h) + eps)))        (LlamaRMSNorm)
//   layer: y = T((h - mean) * 1/sqrt(var + eps) * w + b)    (F.layer_norm)
//   quantized: z = float(y) / smooth; scale = amax|z| / 127 (1.0 where not > 0);
//              q = clamp(round_half_even(z / scale), -127, 127)
//
// The quantization is quantize_per_token_cpu's own code (quant/quantize_row_cpu.h), so the
// fused result equals norm followed by quantize_per_token bit for bit.
// Sums run in float32 over 16 lanes (vectorizable without reassociation flags). The
// reference is fastllm/reference/norm.py.
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_utils.h"
#include "dtype.h"
#include "norm/norm.h"
#include "quant/quantize_row_cpu.h"

namespace fastllm {
namespace {

constexpr int LANES = 16;

FASTLLM_CPU_CLONES float sum_f32(const float* x, int64_t n) {
  float acc[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += x[j + l];
  for (; j < n; ++j) acc[j % LANES] += x[j];
  float s = 0.0f;
  for (int l = 0; l < LANES; ++l) s += acc[l];
  return s;
}

FASTLLM_CPU_CLONES float sum_sq_f32(const float* x, float c, int64_t n) {
  float acc[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; ++l) {
      const float d = x[j + l] - c;
      acc[l] += d * d;
    }
  for (; j < n; ++j) {
    const float d = x[j] - c;
    acc[j % LANES] += d * d;
  }
  float s = 0.0f;
  for (int l = 0; l < LANES; ++l) s += acc[l];
  return s;
}

FASTLLM_CPU_CLONES void add_f32(float* x, const float* r, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] += r[j];
}

// v = float(T(v)): the value a tensor of dtype T would hold.
void round_to(DType dtype, float* v, int64_t n) {
  if (dtype == DType::kBFloat16) {
    for (int64_t j = 0; j < n; ++j) v[j] = cpu::bf16_to_float(cpu::float_to_bf16(v[j]));
  } else if (dtype == DType::kFloat16) {
    for (int64_t j = 0; j < n; ++j) v[j] = cpu::half_to_float(cpu::float_to_half(v[j]));
  }
}

FASTLLM_CPU_CLONES void scale_f32(float* v, float s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) v[j] *= s;
}

FASTLLM_CPU_CLONES void mul_f32(float* v, const float* w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) v[j] *= w[j];
}

FASTLLM_CPU_CLONES void layer_f32(float* v, float mean, float rstd, const float* w,
                                  const float* b, int64_t n) {
  if (b == nullptr) {
    for (int64_t j = 0; j < n; ++j) v[j] = (v[j] - mean) * rstd * w[j];
  } else {
    for (int64_t j = 0; j < n; ++j) v[j] = (v[j] - mean) * rstd * w[j] + b[j];
  }
}

struct Args {
  const char* x;
  const char* r;
  int64_t sx, sr, cols;
  DType dtype;
  int64_t esize;
  const float* w;  // float32 copies of weight and bias (exact)
  const float* b;
  const float* smooth;
  float eps;
  bool rms, quantize;
  char* y;
  int8_t* q;
  float* scale;
  char* r_out;
};

void norm_row(const Args& a, int64_t row) {
  const int64_t n = a.cols;
  thread_local std::vector<float> buf, rbuf;
  buf.resize(static_cast<size_t>(n));
  float* h = buf.data();
  cpu::load_row(a.x + row * a.sx * a.esize, a.dtype, n, h);
  if (a.r != nullptr) {
    rbuf.resize(static_cast<size_t>(n));
    cpu::load_row(a.r + row * a.sr * a.esize, a.dtype, n, rbuf.data());
    add_f32(h, rbuf.data(), n);
    round_to(a.dtype, h, n);  // the sum as a tensor of dtype T holds it
    cpu::store_row(h, n, a.dtype, a.r_out + row * n * a.esize);
  }
  if (a.rms) {
    const float var = sum_sq_f32(h, 0.0f, n) / static_cast<float>(n);
    scale_f32(h, 1.0f / std::sqrt(var + a.eps), n);
    round_to(a.dtype, h, n);
    mul_f32(h, a.w, n);
  } else {
    const float mean = sum_f32(h, n) / static_cast<float>(n);
    const float var = sum_sq_f32(h, mean, n) / static_cast<float>(n);
    layer_f32(h, mean, 1.0f / std::sqrt(var + a.eps), a.w, a.b, n);
  }
  if (!a.quantize) {
    cpu::store_row(h, n, a.dtype, a.y + row * n * a.esize);
    return;
  }
  round_to(a.dtype, h, n);  // y as the unfused op would hand it to quantize_per_token
  if (a.smooth != nullptr) quant_cpu::divide_f32(h, a.smooth, n, h);
  a.scale[row] = quant_cpu::quantize_row_f32(h, n, a.q + row * n);
}

}  // namespace

const char* norm_cpu(uintptr_t x, int x_dtype, int64_t rows, int64_t cols, int64_t stride_x_row,
                     uintptr_t residual, int64_t stride_r_row, uintptr_t weight, uintptr_t bias,
                     double eps, int rms, int quantize, uintptr_t smooth, uintptr_t y,
                     uintptr_t x_int8, uintptr_t scale, uintptr_t residual_out, int threads) {
  const DType dtype = static_cast<DType>(x_dtype);
  if (!cpu::is_float_dtype(dtype)) {
    return "norm_cpu: x dtype must be float32, float16 or bfloat16";
  }
  if (rows < 0 || cols < 1 || stride_x_row < 0 || stride_r_row < 0) {
    return "norm_cpu: bad sizes (rows >= 0, cols >= 1 and strides >= 0 expected)";
  }
  if (weight == 0 || (quantize ? (x_int8 == 0 || scale == 0) : y == 0) ||
      (residual != 0 && residual_out == 0)) {
    return "norm_cpu: a required pointer is null";
  }
  const int64_t esize = dtype == DType::kFloat32 ? 4 : 2;
  std::vector<float> w(static_cast<size_t>(cols)), b;
  cpu::load_row(reinterpret_cast<const void*>(weight), dtype, cols, w.data());
  if (bias != 0) {
    b.resize(static_cast<size_t>(cols));
    cpu::load_row(reinterpret_cast<const void*>(bias), dtype, cols, b.data());
  }
  const Args a{reinterpret_cast<const char*>(x),
               reinterpret_cast<const char*>(residual),
               stride_x_row,
               stride_r_row,
               cols,
               dtype,
               esize,
               w.data(),
               bias != 0 ? b.data() : nullptr,
               reinterpret_cast<const float*>(smooth),
               static_cast<float>(eps),
               rms != 0,
               quantize != 0,
               reinterpret_cast<char*>(y),
               reinterpret_cast<int8_t*>(x_int8),
               reinterpret_cast<float*>(scale),
               reinterpret_cast<char*>(residual_out)};
  cpu::for_each_row(rows, cols, threads, [&](int64_t r) { norm_row(a, r); });
  return nullptr;
}

}  // namespace fastllm
