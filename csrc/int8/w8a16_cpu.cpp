// W8A16 on the CPU (fastllm.ops.int8_weight_only_linear, backend "cpu"): float
// activations times int8 weights, for the few rows of a decode step.
//
//   out[m, n] = cast((sum_k float(x[m, k]) * float(w[n, k])) * w_scale[n] + bias[n])
//
// Decode is bound by reading the weight: each weight byte is read once, converted to
// float32 in registers (16 at a time), and used for up to ROWS rows of x at once (for one
// row of x, COLS weight rows share each load of x), so the matmul moves a quarter of a
// float32 weight's bytes. Output channels are split over
// PyTorch's OpenMP threads. The reference is fastllm/reference/int8.py.
#include <vector>

#include "cpu_utils.h"
#include "dtype.h"
#include "int8/int8.h"

namespace fastllm {
namespace {

constexpr int64_t LANES = 16;
constexpr int64_t ROWS = 4;  // rows of x per pass over a weight row
// LANES floats as one GCC/Clang vector (one AVX-512 register, two AVX2 ones, ...), at any
// float-aligned address: a vector type may alias its element type.
typedef float Floats
    __attribute__((vector_size(LANES * sizeof(float)), aligned(alignof(float))));

// The LANES floats at p, read as one vector (no copy: a reference into memory).
inline const Floats& at(const float* p) { return *reinterpret_cast<const Floats*>(p); }

inline float hsum(const Floats& v) {
  float s = 0.0f;
  for (int64_t l = 0; l < LANES; ++l) s += v[l];
  return s;
}

constexpr int64_t CHUNK = 256;  // weights converted to float32 at a time (a local buffer)

// out[j] = float(w[j]), j < n: a loop the compiler vectorizes (sign-extend, convert)
FASTLLM_CPU_CLONES void widen(const int8_t* w, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(w[j]);
}

// dots[r] = sum_k x[r * K + k] * float(w[k]) for ROWS rows of x: each chunk of the weight
// row converted once into a local buffer, used by every row.
FASTLLM_CPU_CLONES void dot_rows(const float* x, const int8_t* w, int64_t K, float* dots) {
  static_assert(ROWS == 4, "four accumulators below");
  alignas(64) float wf[CHUNK];
  Floats a0 = {}, a1 = {}, a2 = {}, a3 = {};
  float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;  // the last K % LANES columns
  for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
    const int64_t n = K - k0 < CHUNK ? K - k0 : CHUNK;
    widen(w + k0, n, wf);
    const int64_t nv = n / LANES * LANES;
    const float* x0 = x + k0;
    for (int64_t j = 0; j < nv; j += LANES) {
      const Floats& wv = at(wf + j);
      a0 += at(x0 + j) * wv;
      a1 += at(x0 + K + j) * wv;
      a2 += at(x0 + 2 * K + j) * wv;
      a3 += at(x0 + 3 * K + j) * wv;
    }
    for (int64_t j = nv; j < n; ++j) {
      t0 += x0[j] * wf[j];
      t1 += x0[K + j] * wf[j];
      t2 += x0[2 * K + j] * wf[j];
      t3 += x0[3 * K + j] * wf[j];
    }
  }
  dots[0] = hsum(a0) + t0;
  dots[1] = hsum(a1) + t1;
  dots[2] = hsum(a2) + t2;
  dots[3] = hsum(a3) + t3;
}

// dots[c] = sum_k x[k] * float(w[c * ldw + k]) for `cols` (<= COLS) weight rows and one row
// of x: the same sums in the same order as dot_rows, per row, but COLS accumulators share
// each load of x (one accumulator per call left a chain of dependent adds: K = N = 4096,
// 2 threads, 1.30 ms against 0.86). Missing rows repeat the last one (computed, dropped).
constexpr int64_t COLS = 4;
FASTLLM_CPU_CLONES void dot_cols(const float* x, const int8_t* w, int64_t ldw, int64_t cols,
                                 int64_t K, float* dots) {
  static_assert(COLS == 4, "four accumulators below");
  alignas(64) float wf[COLS][CHUNK];
  Floats a0 = {}, a1 = {}, a2 = {}, a3 = {};
  float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
    const int64_t n = K - k0 < CHUNK ? K - k0 : CHUNK;
    for (int64_t c = 0; c < COLS; ++c) {  // inlined: a call to widen per row cost 15%
      const int8_t* wc = w + (c < cols ? c : cols - 1) * ldw + k0;
      for (int64_t j = 0; j < n; ++j) wf[c][j] = static_cast<float>(wc[j]);
    }
    const int64_t nv = n / LANES * LANES;
    const float* x0 = x + k0;
    for (int64_t j = 0; j < nv; j += LANES) {
      const Floats& xv = at(x0 + j);
      a0 += xv * at(wf[0] + j);
      a1 += xv * at(wf[1] + j);
      a2 += xv * at(wf[2] + j);
      a3 += xv * at(wf[3] + j);
    }
    for (int64_t j = nv; j < n; ++j) {
      t0 += x0[j] * wf[0][j];
      t1 += x0[j] * wf[1][j];
      t2 += x0[j] * wf[2][j];
      t3 += x0[j] * wf[3][j];
    }
  }
  dots[0] = hsum(a0) + t0;
  dots[1] = hsum(a1) + t1;
  dots[2] = hsum(a2) + t2;
  dots[3] = hsum(a3) + t3;
}

}  // namespace

const char* int8_w8a16_cpu(uintptr_t x, int x_dtype, int64_t ldx, uintptr_t w, int64_t ldw,
                           uintptr_t w_scale, uintptr_t bias, int bias_dtype, uintptr_t out,
                           int64_t ldo, int64_t M, int64_t N, int64_t K, int threads) {
  const DType xdt = static_cast<DType>(x_dtype);
  const DType bdt = static_cast<DType>(bias_dtype);
  if (!cpu::is_float_dtype(xdt)) {
    return "int8_w8a16_cpu: x dtype must be float32, float16 or bfloat16";
  }
  if (bias != 0 && !cpu::is_float_dtype(bdt)) {
    return "int8_w8a16_cpu: bias dtype must be float32, float16 or bfloat16";
  }
  if (M < 0 || N < 0 || K < 0 || ldx < K || ldw < K || ldo < N) {
    return "int8_w8a16_cpu: bad sizes (M, N, K >= 0, ldx and ldw >= K, ldo >= N)";
  }
  if (M == 0 || N == 0) return nullptr;
  const size_t esize = xdt == DType::kFloat32 ? 4 : 2;
  // x as float32 once ([M, K], zero rows up to a multiple of ROWS), the bias as float32
  const int64_t m_pad = M == 1 ? 1 : (M + ROWS - 1) / ROWS * ROWS;
  std::vector<float> xf(static_cast<size_t>(m_pad * K), 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    cpu::load_row(reinterpret_cast<const char*>(x) + m * ldx * esize, xdt, K, xf.data() + m * K);
  }
  std::vector<float> bf;
  if (bias != 0) {
    bf.resize(static_cast<size_t>(N));
    cpu::load_row(reinterpret_cast<const void*>(bias), bdt, N, bf.data());
  }
  const int8_t* wp = reinterpret_cast<const int8_t*>(w);
  const float* ws = reinterpret_cast<const float*>(w_scale);
  char* ob = reinterpret_cast<char*>(out);

  // blocks of output channels; each writes its [M, block] piece of out
  constexpr int64_t BLOCK_N = 64;
  const int64_t blocks = (N + BLOCK_N - 1) / BLOCK_N;
  cpu::for_each_row(blocks, BLOCK_N * K, threads, [&](int64_t blk) {
    const int64_t n0 = blk * BLOCK_N, n1 = n0 + BLOCK_N < N ? n0 + BLOCK_N : N;
    float acc[BLOCK_N * ROWS];
    float dots[ROWS > COLS ? ROWS : COLS];
    auto put = [&](int64_t r, int64_t n, float dot) {
      const float v = dot * ws[n];
      acc[r * BLOCK_N + (n - n0)] = bias != 0 ? v + bf[n] : v;
    };
    for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
      const int64_t rows = M - m0 < ROWS ? M - m0 : ROWS;
      if (M == 1) {  // one row of x: COLS weight rows at a time
        for (int64_t n = n0; n < n1; n += COLS) {
          const int64_t cols = n1 - n < COLS ? n1 - n : COLS;
          dot_cols(xf.data(), wp + n * ldw, ldw, cols, K, dots);
          for (int64_t c = 0; c < cols; ++c) put(0, n + c, dots[c]);
        }
      } else {
        for (int64_t n = n0; n < n1; ++n) {
          dot_rows(xf.data() + m0 * K, wp + n * ldw, K, dots);
          for (int64_t r = 0; r < rows; ++r) put(r, n, dots[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        cpu::store_row(acc + r * BLOCK_N, n1 - n0, xdt, ob + ((m0 + r) * ldo + n0) * esize);
      }
    }
  });
  return nullptr;
}

}  // namespace fastllm
