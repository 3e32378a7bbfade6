// pybind11 binding of the VQ screen scan (module astra_kernels._vq_screen, used by astra_kernels/vq.py).
// Tensors cross as data pointers validated by the Python layer; the GIL is released during the scan.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "screen.h"

namespace py = pybind11;

namespace {

template <typename P>
P* ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

}  // namespace

PYBIND11_MODULE(_vq_screen, m) {
  m.doc() = "Fused CPU screen scan of the VQ encoder (C++). Internal to astra_kernels.vq.";
  m.def(
      "screen_topk",
      [](uintptr_t S, bool bf16, int64_t rows, int64_t K, int64_t ld, uintptr_t cn, float alpha, int t,
         uintptr_t vals, uintptr_t idx, uintptr_t smax) {
        if (t < 1 || t > 8 || K < t || rows < 0 || ld < K) throw py::value_error("screen_topk: bad sizes");
        py::gil_scoped_release nogil;
        return astra::screen_topk(ptr<const void>(S), bf16, rows, K, ld, ptr<const float>(cn), alpha, t, ptr<float>(vals),
                           ptr<int64_t>(idx), ptr<float>(smax));
      },
      py::arg("S_ptr"), py::arg("bf16"), py::arg("rows"), py::arg("K"), py::arg("ld"), py::arg("cn_ptr"),
      py::arg("alpha"), py::arg("t"), py::arg("vals_ptr"), py::arg("idx_ptr"), py::arg("smax_ptr"),
      "Internal (astra_kernels.vq): fused t-smallest scan of cn + alpha * S per row, plus max |S|.");

  m.def(
      "small_group_topk",
      [](uintptr_t x, int64_t rows, int64_t ldx, uintptr_t cbp, int64_t G, int64_t K, int64_t DG, int t,
         int64_t ldo, uintptr_t vals, uintptr_t idx) {
        if (t < 1 || t > 8 || K < t || rows < 0 || G < 1 || DG < 1 || ldx < G * DG || ldo < rows)
          throw py::value_error("small_group_topk: bad sizes");
        py::gil_scoped_release nogil;
        return astra::small_group_topk(ptr<const float>(x), rows, ldx, ptr<const float>(cbp), G, K, DG, t, ldo,
                                       ptr<float>(vals), ptr<int64_t>(idx));
      },
      py::arg("x_ptr"), py::arg("rows"), py::arg("ldx"), py::arg("cbp_ptr"), py::arg("G"), py::arg("K"),
      py::arg("DG"), py::arg("t"), py::arg("ldo"), py::arg("vals_ptr"), py::arg("idx_ptr"),
      "Internal (astra_kernels.vq): fused small-group distance + t-smallest scan (no score matrix).");

  m.def("cpu_isa", &astra::cpu_isa, "The scans' instruction set here: 'avx512', 'avx2' or 'scalar'.");
  m.def("small_group_bf16_available", &astra::small_group_bf16_available,
        "Whether small_group_bf16_top2 runs on this CPU (AVX-512 with AVX512-BF16).");
  m.def(
      "small_group_bf16_top2",
      [](uintptr_t x, int64_t rows, int64_t ldx, uintptr_t cbb, uintptr_t cb32, uintptr_t consts, uintptr_t nres,
         int64_t ldn, int64_t G, int64_t K, int64_t DG, int64_t ldo, uintptr_t vals, uintptr_t idx) {
        if (!astra::small_group_bf16_available()) throw py::value_error("small_group_bf16_top2: needs AVX512-BF16");
        if (rows < 0 || G < 1 || K < 2 || DG < 1 || DG >= 128 || ldx < G * DG || ldo < rows || (nres && ldn < rows))
          throw py::value_error("small_group_bf16_top2: bad sizes");
        py::gil_scoped_release nogil;
        astra::small_group_bf16_top2(ptr<const float>(x), rows, ldx, ptr<const uint32_t>(cbb), ptr<const float>(cb32),
                                     ptr<const float>(consts), ptr<const float>(nres), ldn, G, K, DG, ldo,
                                     ptr<float>(vals), ptr<int64_t>(idx));
      },
      py::arg("x_ptr"), py::arg("rows"), py::arg("ldx"), py::arg("cbb_ptr"), py::arg("cb32_ptr"), py::arg("consts_ptr"),
      py::arg("nres_ptr"), py::arg("ldn"), py::arg("G"), py::arg("K"), py::arg("DG"), py::arg("ldo"),
      py::arg("vals_ptr"), py::arg("idx_ptr"),
      "Internal (astra_kernels.vq): small-group bf16 screen + fp32 re-rank of the candidates (best two).");

}
