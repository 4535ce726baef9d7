// Symmetric per-row int8 quantization (fastllm.ops.quantize_per_token).
//
//   scale[r] = max_j |x[r, j]| / 127          (float32; 1.0 where that is 0)
//   q[r, j]  = clamp(rint(x[r, j] / scale[r]), -127, 127)
//
// One thread block per row: a block-wide max reduction, then a second pass over
// the row (served from L2/L1 for the row sizes of transformer activations).
// x rows may be strided (stride_x_row); the last dimension is contiguous.
// The reference is fastllm/reference/quant.py.
#include "cuda_utils.cuh"
#include "quant/quant.h"

namespace fastllm {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float block_max(float v) {
  __shared__ float warp_max[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? warp_max[lane] : 0.0f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    if (lane == 0) warp_max[0] = v;
  }
  __syncthreads();
  return warp_max[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_per_token_kernel(const T* __restrict__ x, int64_t cols, int64_t stride_x_row,
                              int8_t* __restrict__ q, float* __restrict__ scale) {
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * stride_x_row;
  int8_t* q_row = q + row * cols;

  float amax = 0.0f;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) amax = fmaxf(amax, fabsf(to_float(x_row[j])));
  amax = block_max(amax);

  float s = __fdiv_rn(amax, 127.0f);
  if (!(s > 0.0f)) s = 1.0f;  // all-zero row (or an amax so small the scale underflows)
  if (threadIdx.x == 0) scale[row] = s;

  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    float v = rintf(__fdiv_rn(to_float(x_row[j]), s));
    q_row[j] = static_cast<int8_t>(fminf(fmaxf(v, -127.0f), 127.0f));
  }
}

template <typename T>
const char* launch(uintptr_t x, int64_t rows, int64_t cols, int64_t stride_x_row, uintptr_t q,
                   uintptr_t scale, uintptr_t stream) {
  if (rows == 0) return nullptr;
  if (rows > 2147483647LL) return "quantize_per_token: more than 2^31-1 rows";
  quantize_per_token_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const T*>(x), cols, stride_x_row, reinterpret_cast<int8_t*>(q),
      reinterpret_cast<float*>(scale));
  return launch_status();
}

}  // namespace

const char* quantize_per_token(uintptr_t x, int x_dtype, int64_t rows, int64_t cols,
                               int64_t stride_x_row, uintptr_t x_int8, uintptr_t scale,
                               uintptr_t stream) {
  switch (static_cast<DType>(x_dtype)) {
    case DType::kFloat32: return launch<float>(x, rows, cols, stride_x_row, x_int8, scale, stream);
    case DType::kFloat16: return launch<__half>(x, rows, cols, stride_x_row, x_int8, scale, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(x, rows, cols, stride_x_row, x_int8, scale, stream);
    default: return "quantize_per_token: x dtype must be float32, float16 or bfloat16";
  }
}

}  // namespace fastllm
