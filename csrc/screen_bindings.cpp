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

}
