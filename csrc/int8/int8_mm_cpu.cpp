// int8 x int8 -> int32 matmul for decode steps and short prompts, on CPUs with AVX512-VNNI
// (the cpu backend's W8A8 ops; fastllm/native/cpu.py chooses it over torch._int_mm up to a
// row count that grows with the weight).
//
//   acc[m, n] = sum_k x[m, k] * w[n, k]        (exact: the same int32 as torch._int_mm)
//
// Why: oneDNN's _int_mm reorders the whole weight on every call when M > 1 (measured on a
// 2-core Zen 4, one thread: K = N = 4096 takes 0.40 ms at M = 1 and 5.8 ms at M = 2), so a
// batch of two decodes fifteen times slower than one. Here the weight is read straight
// from its [N, K] rows, once per tile of ROWS rows of x.
//
// Unlike the other CPU kernels this one is written with intrinsics: the product it needs,
// vpdpbusd (64 byte products summed four at a time into 16 int32 lanes), multiplies
// unsigned by signed bytes, which plain loops over two int8 arrays do not compile to.
// So each weight byte is flipped to unsigned (w + 128, an xor of its sign bit) and the
// 128 * sum_k x[m, k] that adds is taken off at the end (one pass over x per call). Every
// sum wraps modulo 2^32 (vpdpbusd does not saturate), so the difference is exact whenever
// the true result fits an int32 (K <= 133,144 for |x|, |w| <= 127: the ops' limit).
// A tile of ROWS rows of x and COLS weight rows keeps its ROWS * COLS accumulators in
// registers over all of K (64 bytes per step, a masked load for the tail), then folds each
// to its sum. Output columns are split over OpenMP threads, so each thread reads its own
// part of the weight.
#include <cstdint>
#include <vector>

#include "cpu_utils.h"
#include "int8/int8.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTLLM_INT8_MM_VNNI 1
#endif

namespace fastllm {

#ifdef FASTLLM_INT8_MM_VNNI
namespace {

constexpr int ROWS = 4;  // rows of x per tile
constexpr int COLS = 4;  // weight rows (output columns) per tile

#define FASTLLM_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

// acc += the sums of four products of unsigned a and signed b bytes, per int32 lane
// (vpdpbusd), in place: around the intrinsic GCC 12 copies the accumulators to other
// registers and some to the stack on every step (M = 16, K = N = 4096, 2 threads: 1.04 ms
// against 0.71 ms with this).
FASTLLM_VNNI __attribute__((always_inline)) inline void dpbusd(__m512i& acc, __m512i a,
                                                               __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// [sum a, sum b, sum c, sum d] of four vectors of 16 int32 lanes (wrapping adds).
FASTLLM_VNNI inline __m128i sum4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  // each 128-bit lane now holds partial sums [a, b, c, d] (ab: a0 b0 a1 b1, cd likewise)
  const __m512i abcd =
      _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd),
                                        _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// 64 bytes of K at k into the accumulators (m: the bytes to load; the others load as 0,
// and the weight's flip to 128, times an x byte of 0: nothing).
template <int R>
FASTLLM_VNNI __attribute__((always_inline)) inline void step(__m512i (&a)[R][COLS],
                                                             const int8_t* const (&xr)[R],
                                                             const int8_t* const (&wc)[COLS],
                                                             int64_t k, __mmask64 m) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i wv[COLS];
#pragma GCC unroll 8
  for (int j = 0; j < COLS; ++j)
    wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, wc[j] + k), flip);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512i xv = _mm512_maskz_loadu_epi8(m, xr[r] + k);
#pragma GCC unroll 8
    for (int j = 0; j < COLS; ++j) dpbusd(a[r][j], wv[j], xv);
  }
}

// acc[r * ld_acc + j] for the rows x cols tile at x (rows of x) and w (weight rows), less
// x_comp[r] = 128 * sum_k x[r, k] (what the flip added). rows <= R, cols <= COLS; missing
// rows/columns repeat the last one (their sums are computed and dropped).
template <int R>
FASTLLM_VNNI void tile(const int8_t* x, int64_t ldx, const uint32_t* x_comp, int rows,
                       const int8_t* w, int64_t ldw, int cols, int64_t K, int32_t* acc,
                       int64_t ld_acc) {
  const int8_t* xr[R] = {};
  for (int r = 0; r < R; ++r) xr[r] = x + (r < rows ? r : rows - 1) * ldx;
  const int8_t* wc[COLS] = {};
  for (int j = 0; j < COLS; ++j) wc[j] = w + (j < cols ? j : cols - 1) * ldw;
  __m512i a[R][COLS];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < COLS; ++j) a[r][j] = _mm512_setzero_si512();
  const int64_t full = K / 64 * 64;
  for (int64_t k = 0; k < full; k += 64) step<R>(a, xr, wc, k, ~__mmask64{0});
  if (full < K) step<R>(a, xr, wc, full, (__mmask64{1} << (K - full)) - 1);
  static_assert(COLS == 4, "sum4 folds four columns");
  // every row folded with constant indices (a runtime index would keep `a` in memory)
  alignas(16) uint32_t s[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    _mm_store_si128(reinterpret_cast<__m128i*>(s[r]), sum4(a[r][0], a[r][1], a[r][2], a[r][3]));
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j)
      acc[r * ld_acc + j] = static_cast<int32_t>(s[r][j] - x_comp[r]);
}

FASTLLM_VNNI void int8_mm_vnni(const int8_t* x, int64_t ldx, const int8_t* w, int64_t ldw,
                               int32_t* out, int64_t ld_out, int64_t M, int64_t N, int64_t K,
                               int threads) {
  std::vector<uint32_t> x_comp(static_cast<size_t>(M));
  for (int64_t r = 0; r < M; ++r) {
    uint32_t sum = 0;
    for (int64_t k = 0; k < K; ++k)
      sum += static_cast<uint32_t>(static_cast<int32_t>(x[r * ldx + k]));
    x_comp[r] = sum << 7;
  }
  const int64_t col_tiles = (N + COLS - 1) / COLS;
  cpu::for_each_row(col_tiles, M * K * COLS, threads, [&](int64_t t) {
    const int64_t n0 = t * COLS;
    const int cols = static_cast<int>(N - n0 < COLS ? N - n0 : COLS);
    for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
      const int rows = static_cast<int>(M - m0 < ROWS ? M - m0 : ROWS);
      const int8_t* xt = x + m0 * ldx;
      int32_t* o = out + m0 * ld_out + n0;
      // one or two rows left: a tile of their own, not four copies
      if (rows == 1)
        tile<1>(xt, ldx, x_comp.data() + m0, 1, w + n0 * ldw, ldw, cols, K, o, ld_out);
      else if (rows == 2)
        tile<2>(xt, ldx, x_comp.data() + m0, 2, w + n0 * ldw, ldw, cols, K, o, ld_out);
      else
        tile<ROWS>(xt, ldx, x_comp.data() + m0, rows, w + n0 * ldw, ldw, cols, K, o, ld_out);
    }
  });
}

}  // namespace
#endif

bool int8_mm_cpu_available() {
#ifdef FASTLLM_INT8_MM_VNNI
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
  }();
  return has;
#else
  return false;
#endif
}

const char* int8_mm_cpu(uintptr_t x, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t out,
                        int64_t ld_out, int64_t M, int64_t N, int64_t K, int threads) {
  if (M < 0 || N < 0 || K < 0) return "int8_mm_cpu: negative size";
  if (!int8_mm_cpu_available()) return "int8_mm_cpu: this CPU has no AVX512-VNNI";
#ifdef FASTLLM_INT8_MM_VNNI
  if (M == 0 || N == 0) return nullptr;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) reinterpret_cast<int32_t*>(out)[m * ld_out + n] = 0;
    return nullptr;
  }
  int8_mm_vnni(reinterpret_cast<const int8_t*>(x), ldx, reinterpret_cast<const int8_t*>(w), ldw,
               reinterpret_cast<int32_t*>(out), ld_out, M, N, K, threads);
#endif
  return nullptr;
}

}  // namespace fastllm
