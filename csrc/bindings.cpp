// pybind11 bindings of the codec. Tensors cross as (data pointer, size) pairs validated by the Python
// layer (astra_kernels/codec.py), so the extension needs no libtorch and works with any torch build.
// The GIL is released while bytes are processed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <vector>

#include "codec.h"
#include "screen.h"

namespace py = pybind11;

namespace {

astra::Header header_for(int bits, const std::vector<int64_t>& shape) {
  return astra::make_header(bits, static_cast<int>(shape.size()), shape.data());
}

template <typename P>
P* ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

py::tuple shape_tuple(const astra::Header& h) {
  py::tuple t(h.ndim);
  for (int d = 0; d < h.ndim; ++d) t[d] = py::int_(h.dims[d]);
  return t;
}

}  // namespace

PYBIND11_MODULE(_codec, m) {
  m.doc() = "ASTRA bit-stream codec (C++). Use astra_kernels.pack_codes / unpack_codes.";
  py::register_exception<astra::CodecError>(m, "CodecError", PyExc_ValueError);
  m.attr("MAGIC") = py::bytes(reinterpret_cast<const char*>(astra::kMagic), 4);
  m.attr("VERSION") = astra::kVersion;
  m.attr("MAX_NDIM") = astra::kMaxNdim;

  m.def(
      "frame_layout",
      [](int bits, const std::vector<int64_t>& shape) {
        const auto h = header_for(bits, shape);
        return py::make_tuple(h.header_nbytes, h.payload_nbytes, h.frame_nbytes);
      },
      py::arg("bits"), py::arg("shape"), "(header_nbytes, payload_nbytes, frame_nbytes) for a code tensor.");

  m.def(
      "pack",
      [](uintptr_t codes, int dtype, const std::vector<int64_t>& shape, int bits, uintptr_t out, size_t out_cap) {
        const auto h = header_for(bits, shape);
        py::gil_scoped_release nogil;
        return astra::pack(ptr<const void>(codes), static_cast<astra::DType>(dtype), h, ptr<uint8_t>(out), out_cap);
      },
      py::arg("codes_ptr"), py::arg("dtype"), py::arg("shape"), py::arg("bits"), py::arg("out_ptr"),
      py::arg("out_cap"));

  m.def(
      "parse_header",
      [](uintptr_t frame, size_t n) {
        const auto h = astra::parse_header(ptr<const uint8_t>(frame), n);
        return py::make_tuple(h.bits, shape_tuple(h));
      },
      py::arg("frame_ptr"), py::arg("nbytes"), "Validate a frame's header and size; return (bits, shape).");

  m.def(
      "unpack",
      [](uintptr_t frame, size_t n, uintptr_t out, uint64_t out_numel) {
        py::gil_scoped_release nogil;
        const auto h = astra::parse_header(ptr<const uint8_t>(frame), n);
        if (h.numel != out_numel) throw astra::CodecError("output buffer does not match the frame's shape");
        astra::unpack(ptr<const uint8_t>(frame), n, h, ptr<int32_t>(out));
      },
      py::arg("frame_ptr"), py::arg("nbytes"), py::arg("out_ptr"), py::arg("out_numel"));

  m.def(
      "crc32c",
      [](uintptr_t data, size_t n, uint32_t crc) {
        py::gil_scoped_release nogil;
        return astra::crc32c_update(crc, ptr<const uint8_t>(data), n);
      },
      py::arg("data_ptr"), py::arg("nbytes"), py::arg("crc") = 0);

  m.def(
      "screen_topk",
      [](uintptr_t S, bool bf16, int64_t rows, int64_t K, int64_t ld, uintptr_t cn, float alpha, int t,
         uintptr_t vals, uintptr_t idx, uintptr_t smax) {
        if (t < 1 || t > 8 || K < t || rows < 0 || ld < K) throw astra::CodecError("screen_topk: bad sizes");
        py::gil_scoped_release nogil;
        return astra::screen_topk(ptr<const void>(S), bf16, rows, K, ld, ptr<const float>(cn), alpha, t, ptr<float>(vals),
                           ptr<int64_t>(idx), ptr<float>(smax));
      },
      py::arg("S_ptr"), py::arg("bf16"), py::arg("rows"), py::arg("K"), py::arg("ld"), py::arg("cn_ptr"),
      py::arg("alpha"), py::arg("t"), py::arg("vals_ptr"), py::arg("idx_ptr"), py::arg("smax_ptr"),
      "Internal (astra_kernels.vq): fused t-smallest scan of cn + alpha * S per row, plus max |S|.");

  m.def(
      "time_roundtrip",
      [](uint64_t numel, int bits, int iters) {
        // Pure codec time (no Python, no allocation): mean nanoseconds of pack + unpack of `numel`
        // codes, measured in C++. Used by bench/ to report codec time apart from binding overhead.
        if (iters < 1) throw astra::CodecError("iters must be >= 1");
        const int64_t shape[1] = {static_cast<int64_t>(numel)};
        const auto h = astra::make_header(bits, 1, shape);
        std::vector<int32_t> codes(numel), back(numel);
        uint64_t x = 0x9E3779B97F4A7C15ull;
        for (auto& c : codes) {
          x ^= x << 13; x ^= x >> 7; x ^= x << 17;
          c = static_cast<int32_t>(x & ((1u << bits) - 1));
        }
        std::vector<uint8_t> frame(h.frame_nbytes);
        py::gil_scoped_release nogil;
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) {
          astra::pack(codes.data(), astra::DType::I32, h, frame.data(), frame.size());
          const auto h2 = astra::parse_header(frame.data(), frame.size());
          astra::unpack(frame.data(), frame.size(), h2, back.data());
        }
        const auto t1 = std::chrono::steady_clock::now();
        if (back != codes) throw std::runtime_error("round trip mismatch");
        return std::chrono::duration<double, std::nano>(t1 - t0).count() / iters;
      },
      py::arg("numel"), py::arg("bits"), py::arg("iters"));
}
