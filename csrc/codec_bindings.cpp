// pybind11 bindings of the codec (module astra_kernels._codec). Tensors cross as (data pointer, size) pairs validated by the Python
// layer (astra_kernels/codec.py), so the extension needs no libtorch and works with any torch build.
// The GIL is released while bytes are processed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "codec.h"
#include "codec_bench.h"

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

  register_bench(m.def_submodule("bench", "Codec benchmark timers (bench/ only)."));
}
