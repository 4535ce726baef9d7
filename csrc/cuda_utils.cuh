// Helpers shared by the CUDA sources.
#pragma once
#include <cuda_bf16.h>
#include <atomic>
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype.h"

namespace fastllm {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Returns the launch error, if any, as a static string.
inline const char* launch_status() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Raises a kernel's dynamic shared-memory limit past 48 KiB, once per device (bit d of
// `done` for device d < 64). `done` must be distinct per kernel: a function-local
// static of the launching template.
template <typename Kernel>
inline const char* allow_smem(Kernel kernel, int bytes, std::atomic<uint64_t>& done) {
  if (bytes <= 48 * 1024) return nullptr;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return nullptr;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  done.fetch_or(bit, std::memory_order_relaxed);
  return nullptr;
}

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace fastllm
