// Shared pieces of the C++ CPU kernels (csrc/<family>/*_cpu.cpp): element conversions,
// the per-ISA clones of the hot loops, and the loop over rows on PyTorch's threads.
//
// The kernels are plain loops written so that the compiler vectorizes them: no
// intrinsics, and work split into chunks of CHUNK elements that live in a local buffer.
// Floating-point contraction is off (setup.py passes -ffp-contract=off), so every ISA
// clone rounds exactly like the scalar code and like PyTorch's own elementwise ops.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "dtype.h"

namespace fastllm {
namespace cpu {

// Each hot loop is compiled for AVX-512, for AVX2 and for baseline x86-64; the loader
// picks the best one for the CPU at hand (GCC on x86-64 Linux). Elsewhere: one build.
// (setup.py defines FASTLLM_CPU_NO_CLONES when the compiler cannot build them.)
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(FASTLLM_CPU_NO_CLONES)
#define FASTLLM_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLLM_CPU_CLONES
#endif

constexpr int64_t CHUNK = 256;  // elements per local buffer (1 KiB of floats)

// The element types the CPU kernels take for float tensors.
inline bool is_float_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Exact: every half is a float.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7fffu;
  if (mag >= 0x7c00u) return bits_float(sign | 0x7f800000u | ((mag & 0x3ffu) << 13));  // inf, NaN
  if (mag >= 0x0400u) return bits_float(sign | ((mag << 13) + (112u << 23)));  // normal: rebias
  const float v = static_cast<float>(mag) * 5.9604644775390625e-08f;  // subnormal: mag * 2^-24
  return sign ? -v : v;
}

// Round to nearest even, overflow to inf, NaN stays NaN.
inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (mag >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf (and inf)
  if (mag < 0x38800000u) {
    // below 2^-14: a subnormal half (or zero). Adding 0.5 puts the value's bits that a
    // half keeps (multiples of 2^-24) at the bottom of the float's mantissa, and the
    // float addition rounds to nearest even on the way.
    const float v = bits_float(mag) + 0.5f;
    return sign | static_cast<uint16_t>(float_bits(v) - float_bits(0.5f));
  }
  // normal: rebias the exponent (127 -> 15), then round away the low 13 mantissa bits,
  // to even on a tie; a carry out of the mantissa bumps the exponent, as it should.
  mag += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((mag >> 13) & 1u);
  return sign | static_cast<uint16_t>(mag >> 13);
}

// Inlined into the caller, so compiled for the caller's clone (a function whose hot loop
// calls them is the one to mark FASTLLM_CPU_CLONES).
#if defined(__GNUC__)
#define FASTLLM_INLINE inline __attribute__((always_inline))
#else
#define FASTLLM_INLINE inline
#endif

// dst[0, n) = src[0, n) for float32 rows: whole vectors copied in registers, then the
// rest (a short memcpy call per row costs more than the copy itself).
[[maybe_unused]] FASTLLM_INLINE void copy_floats(const float* src, int64_t n, float* dst) {
  constexpr int64_t V = 16;
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    float chunk[V];
    std::memcpy(chunk, src + j, sizeof chunk);
    std::memcpy(dst + j, chunk, sizeof chunk);
  }
  for (; j < n; ++j) dst[j] = src[j];
}

// dst[j] = float(src[j]) for a row of float32/float16/bfloat16 (exact).
[[maybe_unused]] FASTLLM_INLINE void load_row_inline(const void* src, DType dtype, int64_t n,
                                                     float* dst) {
  if (dtype == DType::kFloat32) {
    copy_floats(static_cast<const float*>(src), n, dst);
  } else if (dtype == DType::kBFloat16) {
    const uint16_t* x = static_cast<const uint16_t*>(src);
    for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_float(x[j]);
  } else {
    const uint16_t* x = static_cast<const uint16_t*>(src);
    for (int64_t j = 0; j < n; ++j) dst[j] = half_to_float(x[j]);
  }
}

// dst[j] = src[j] cast to float32/float16/bfloat16 (round to nearest even).
[[maybe_unused]] FASTLLM_INLINE void store_row_inline(const float* src, int64_t n, DType dtype,
                                                      void* dst) {
  if (dtype == DType::kFloat32) {
    copy_floats(src, n, static_cast<float*>(dst));
  } else if (dtype == DType::kBFloat16) {
    uint16_t* y = static_cast<uint16_t*>(dst);
    for (int64_t j = 0; j < n; ++j) y[j] = float_to_bf16(src[j]);
  } else {
    uint16_t* y = static_cast<uint16_t*>(dst);
    for (int64_t j = 0; j < n; ++j) y[j] = float_to_half(src[j]);
  }
}

// The same as functions of their own, for callers that are not clones.
[[maybe_unused]] FASTLLM_CPU_CLONES static void load_row(const void* src, DType dtype, int64_t n,
                                                         float* dst) {
  load_row_inline(src, dtype, n, dst);
}

[[maybe_unused]] FASTLLM_CPU_CLONES static void store_row(const float* src, int64_t n, DType dtype,
                                                          void* dst) {
  store_row_inline(src, n, dtype, dst);
}

// Work below this many elements runs on the calling thread: starting the other threads
// costs more than it saves.
constexpr int64_t MIN_PARALLEL_ELEMENTS = 1 << 15;

// f(row) for row in [0, rows), split in contiguous blocks over `threads` OpenMP threads
// (the same OpenMP runtime as PyTorch's, which loads first under the same soname).
template <class F>
void for_each_row(int64_t rows, int64_t elements_per_row, int threads, F&& f) {
#if defined(_OPENMP)
  if (threads > 1 && rows > 1 && rows * elements_per_row >= MIN_PARALLEL_ELEMENTS) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
#else
  (void)threads;
  (void)elements_per_row;
#endif
  for (int64_t r = 0; r < rows; ++r) f(r);
}

}  // namespace cpu
}  // namespace fastllm
