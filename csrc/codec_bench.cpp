// Codec benchmark timer, bound as astra_kernels._codec.bench (used by bench/ only): the pure C++
// pack + unpack time, apart from the binding overhead.
#include "codec_bench.h"

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "codec.h"

namespace py = pybind11;

void register_bench(py::module_ m) {
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
