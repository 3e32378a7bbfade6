// pybind11 binding of the CPU attention kernel (module astra_kernels._attention_cpu, used by
// astra_kernels/attention.py). Tensors cross as data pointers and strides validated by the Python layer; the GIL
// is released while it runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "attention_cpu.h"

namespace py = pybind11;

PYBIND11_MODULE(_attention_cpu, m) {
  m.doc() = "Flash-style fp32 attention on the CPU (C++, AVX-512). Internal to astra_kernels.attention.";
  m.attr("MAX_QUERY_STRIDE") = astra::kMaxQueryStride;
  m.def("available", &astra::attention_available, "Whether attention_f32 runs on this CPU (AVX-512 F).");
  m.def(
      "attention_f32",
      [](uintptr_t q, int64_t sqb, int64_t sqh, int64_t sqt, uintptr_t k, int64_t skb, int64_t skh, int64_t skn,
         uintptr_t v, int64_t svb, int64_t svh, int64_t svn, uintptr_t bias, int64_t sbb, uintptr_t qpos,
         uintptr_t kpos, bool keys_sorted, int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t N, int64_t D,
         float scale, uintptr_t out, int64_t sob, int64_t soh, int64_t sot, uintptr_t lse, int threads) {
        if (!astra::attention_available()) throw py::value_error("attention_f32: needs AVX-512");
        if (B < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || Tq < 1 || N < 1 || D < 1 || threads < 1 || !q || !k || !v ||
            !out || !lse || ((qpos == 0) != (kpos == 0)))
          throw py::value_error("attention_f32: bad sizes or pointers");
        if (sqt < 0 || sqt > astra::kMaxQueryStride)
          throw py::value_error("attention_f32: the query token stride exceeds MAX_QUERY_STRIDE (int32 gather "
                                "offsets); pass a contiguous q");
        astra::AttentionArgs a{reinterpret_cast<const float*>(q), sqb, sqh, sqt,
                               reinterpret_cast<const float*>(k), skb, skh, skn,
                               reinterpret_cast<const float*>(v), svb, svh, svn,
                               reinterpret_cast<const float*>(bias), sbb,
                               reinterpret_cast<const int32_t*>(qpos), reinterpret_cast<const int32_t*>(kpos),
                               keys_sorted, B, Hq, Hkv, Tq, N, D, scale,
                               reinterpret_cast<float*>(out), sob, soh, sot, reinterpret_cast<float*>(lse), threads};
        py::gil_scoped_release nogil;
        astra::attention_f32(a);
      },
      py::arg("q_ptr"), py::arg("sqb"), py::arg("sqh"), py::arg("sqt"), py::arg("k_ptr"), py::arg("skb"),
      py::arg("skh"), py::arg("skn"), py::arg("v_ptr"), py::arg("svb"), py::arg("svh"), py::arg("svn"),
      py::arg("bias_ptr"), py::arg("sbb"), py::arg("qpos_ptr"), py::arg("kpos_ptr"), py::arg("keys_sorted"),
      py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Tq"), py::arg("N"), py::arg("D"), py::arg("scale"),
      py::arg("out_ptr"), py::arg("sob"), py::arg("soh"), py::arg("sot"), py::arg("lse_ptr"), py::arg("threads"),
      "Internal (astra_kernels.attention): one attention over one key segment, fp32 (see csrc/attention_cpu.h).");
}
