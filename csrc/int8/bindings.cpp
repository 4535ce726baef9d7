// Bindings of the int8 matmul launchers (fastllm/native/int8.py calls them).
#include "fastllm.h"
#include "int8/int8.h"

namespace py = pybind11;

namespace fastllm {

void bind_int8(py::module_& m) {
  m.def(
      "int8_epilogue_cpu",
      [](uintptr_t acc, int64_t ld_acc, uintptr_t x_scale, uintptr_t w_scale, uintptr_t bias,
         int bias_dtype, uintptr_t out, int out_dtype, int64_t ld_out, int64_t M, int64_t N,
         int threads) {
        py::gil_scoped_release no_gil;
        check(int8_epilogue_cpu(acc, ld_acc, x_scale, w_scale, bias, bias_dtype, out, out_dtype,
                                ld_out, M, N, threads));
      },
      py::arg("acc"), py::arg("ld_acc"), py::arg("x_scale"), py::arg("w_scale"), py::arg("bias"),
      py::arg("bias_dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("ld_out"), py::arg("M"),
      py::arg("N"), py::arg("threads"));
  m.def(
      "int8_fused_epilogue_cpu",
      [](uintptr_t acc, int64_t ld_acc, uintptr_t x_scale, uintptr_t w_scale, uintptr_t bias,
         int bias_dtype, int act, int gated, uintptr_t residual, int residual_dtype,
         int64_t ld_res, uintptr_t out, int out_dtype, int64_t ld_out, int64_t M, int64_t N,
         int threads) {
        py::gil_scoped_release no_gil;
        check(int8_fused_epilogue_cpu(acc, ld_acc, x_scale, w_scale, bias, bias_dtype, act, gated,
                                      residual, residual_dtype, ld_res, out, out_dtype, ld_out, M,
                                      N, threads));
      },
      py::arg("acc"), py::arg("ld_acc"), py::arg("x_scale"), py::arg("w_scale"), py::arg("bias"),
      py::arg("bias_dtype"), py::arg("act"), py::arg("gated"), py::arg("residual"),
      py::arg("residual_dtype"), py::arg("ld_res"), py::arg("out"), py::arg("out_dtype"),
      py::arg("ld_out"), py::arg("M"), py::arg("N"), py::arg("threads"));
  m.def("int8_mm_cpu_available", &int8_mm_cpu_available);
  m.def(
      "int8_mm_cpu",
      [](uintptr_t x, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t acc, int64_t ld_acc,
         int64_t M, int64_t N, int64_t K, int threads) {
        py::gil_scoped_release no_gil;
        check(int8_mm_cpu(x, ldx, w, ldw, acc, ld_acc, M, N, K, threads));
      },
      py::arg("x"), py::arg("ldx"), py::arg("w"), py::arg("ldw"), py::arg("acc"),
      py::arg("ld_acc"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("threads"));
  m.def(
      "int8_w8a16_cpu",
      [](uintptr_t x, int x_dtype, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t w_scale,
         uintptr_t bias, int bias_dtype, uintptr_t out, int64_t ldo, int64_t M, int64_t N, int64_t K,
         int threads) {
        py::gil_scoped_release no_gil;
        check(int8_w8a16_cpu(x, x_dtype, ldx, w, ldw, w_scale, bias, bias_dtype, out, ldo, M, N, K,
                             threads));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ldx"), py::arg("w"), py::arg("ldw"),
      py::arg("w_scale"), py::arg("bias"), py::arg("bias_dtype"), py::arg("out"), py::arg("ldo"),
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("threads"));
#ifdef FASTLLM_WITH_CUDA
  m.def(
      "int8_w8a8_gemm",
      [](uintptr_t x, int64_t ldx, uintptr_t x_scale, uintptr_t w, int64_t ldw, uintptr_t w_scale,
         uintptr_t bias, int bias_dtype, uintptr_t out, int out_dtype, int64_t ldo, int64_t M,
         int64_t N, int64_t K, uintptr_t stream) {
        check(int8_w8a8_gemm(x, ldx, x_scale, w, ldw, w_scale, bias, bias_dtype, out, out_dtype, ldo,
                             M, N, K, stream));
      },
      py::arg("x"), py::arg("ldx"), py::arg("x_scale"), py::arg("w"), py::arg("ldw"),
      py::arg("w_scale"), py::arg("bias"), py::arg("bias_dtype"), py::arg("out"),
      py::arg("out_dtype"), py::arg("ldo"), py::arg("M"), py::arg("N"), py::arg("K"),
      py::arg("stream"));
  m.def(
      "int8_w8a16_gemm",
      [](uintptr_t x, int x_dtype, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t w_scale,
         uintptr_t bias, int bias_dtype, uintptr_t out, int64_t ldo, int64_t M, int64_t N, int64_t K,
         int splits, uintptr_t workspace, uintptr_t stream) {
        check(int8_w8a16_gemm(x, x_dtype, ldx, w, ldw, w_scale, bias, bias_dtype, out, ldo, M, N, K,
                              splits, workspace, stream));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ldx"), py::arg("w"), py::arg("ldw"),
      py::arg("w_scale"), py::arg("bias"), py::arg("bias_dtype"), py::arg("out"), py::arg("ldo"),
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("splits"), py::arg("workspace"),
      py::arg("stream"));
#endif
}

}  // namespace fastllm
