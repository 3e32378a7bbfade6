// Standalone codec self-test (no Python). Built with -DASTRA_SANITIZE=ON it runs under
// AddressSanitizer + UBSan (tests/test_codec_sanitizers.py builds and runs it):
//   round trips for every width and dtype, hand-checked bytes, the CRC32C check value, and a
//   mutation fuzzer over unpack (truncations, bit flips, byte splices, random frames) that must
//   only ever raise CodecError. Exit status 0 on success; prints "codec_selftest: OK ...".
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "codec.h"

using namespace astra;

static uint64_t rng_state = 0x243F6A8885A308D3ull;
static uint64_t rnd() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "CHECK failed at line %d: %s\n", __LINE__, #cond); \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

static std::vector<uint8_t> pack_vec(const std::vector<int32_t>& codes, int bits, std::vector<int64_t> shape) {
  const Header h = make_header(bits, static_cast<int>(shape.size()), shape.data());
  // Exact-size buffer: ASan catches any write past the frame.
  std::vector<uint8_t> f(h.frame_nbytes);
  CHECK(pack(codes.data(), DType::I32, h, f.data(), f.size()) == h.frame_nbytes);
  return f;
}

static std::vector<int32_t> unpack_vec(const std::vector<uint8_t>& f) {
  // Copy to an exact-size heap block so reads past the end are caught.
  uint8_t* buf = static_cast<uint8_t*>(std::malloc(f.size() ? f.size() : 1));
  std::memcpy(buf, f.data(), f.size());
  std::vector<int32_t> out;
  try {
    const Header h = parse_header(buf, f.size());
    out.resize(h.numel);
    unpack(buf, f.size(), h, out.data());
  } catch (...) {
    std::free(buf);
    throw;
  }
  std::free(buf);
  return out;
}

template <typename T>
static void roundtrip_typed(int bits, uint64_t n, DType dt) {
  std::vector<T> codes(n);
  for (auto& c : codes) c = static_cast<T>(rnd() & ((uint64_t(1) << bits) - 1));
  const int64_t shape[1] = {int64_t(n)};
  const Header h = make_header(bits, 1, shape);
  std::vector<uint8_t> f(h.frame_nbytes);
  pack(codes.data(), dt, h, f.data(), f.size());
  const auto back = unpack_vec(f);
  CHECK(back.size() == n);
  for (uint64_t i = 0; i < n; ++i) CHECK(back[i] == int32_t(codes[i]));
}

int main() {
  // CRC32C check value.
  const char* nine = "123456789";
  CHECK(crc32c_update(0, reinterpret_cast<const uint8_t*>(nine), 9) == 0xE3069283u);

  // Hand-checked payload: [1, 2, 3] at 10 bits -> 01 08 30 00.
  {
    const auto f = pack_vec({1, 2, 3}, 10, {3});
    CHECK(f.size() == 16 + 4);
    const uint8_t want[4] = {0x01, 0x08, 0x30, 0x00};
    CHECK(std::memcmp(f.data() + 16, want, 4) == 0);
    CHECK(std::memcmp(f.data(), kMagic, 4) == 0 && f[4] == 1 && f[5] == 10 && f[6] == 1 && f[7] == 0);
  }

  // Round trips: every width, every dtype, many lengths (tails of every size, empty).
  int trips = 0;
  for (int bits = 1; bits <= 16; ++bits) {
    for (uint64_t n : {0ull, 1ull, 2ull, 3ull, 7ull, 8ull, 9ull, 15ull, 16ull, 17ull, 31ull, 33ull, 100ull, 513ull, 4099ull}) {
      roundtrip_typed<int32_t>(bits, n, DType::I32);
      roundtrip_typed<int64_t>(bits, n, DType::I64);
      roundtrip_typed<uint32_t>(bits, n, DType::U32);
      if (bits <= 15) roundtrip_typed<int16_t>(bits, n, DType::I16);
      roundtrip_typed<uint16_t>(bits, n, DType::U16);
      if (bits <= 8) roundtrip_typed<uint8_t>(bits, n, DType::U8);
      if (bits <= 7) roundtrip_typed<int8_t>(bits, n, DType::I8);
      trips += 5;
    }
  }

  // Out-of-range codes are rejected.
  for (int bits = 1; bits <= 16; ++bits) {
    std::vector<int32_t> c(37, 0);
    c[29] = 1 << bits;
    bool threw = false;
    try { pack_vec(c, bits, {37}); } catch (const CodecError&) { threw = true; }
    CHECK(threw);
    c[29] = -1;
    threw = false;
    try { pack_vec(c, bits, {37}); } catch (const CodecError&) { threw = true; }
    CHECK(threw);
  }

  // Mutation fuzzer over unpack: every outcome must be a clean decode or a CodecError.
  long fuzzed = 0, rejected = 0;
  std::vector<std::vector<uint8_t>> seeds;
  for (int bits : {1, 3, 8, 10, 13, 16}) {
    for (std::vector<int64_t> shape : {std::vector<int64_t>{}, {0}, {5}, {64, 1}, {17, 3}, {2, 3, 4}}) {
      uint64_t numel = 1;
      for (auto d : shape) numel *= uint64_t(d);
      std::vector<int32_t> c(numel);
      for (auto& v : c) v = int32_t(rnd() & ((1u << bits) - 1));
      seeds.push_back(pack_vec(c, bits, shape));
    }
  }
  for (int it = 0; it < 200000; ++it) {
    std::vector<uint8_t> f = seeds[rnd() % seeds.size()];
    switch (rnd() % 6) {
      case 0: f.resize(rnd() % (f.size() + 1)); break;                           // truncate
      case 1: if (!f.empty()) f[rnd() % f.size()] ^= uint8_t(1u << (rnd() % 8)); break;  // bit flip
      case 2: if (!f.empty()) f[rnd() % f.size()] = uint8_t(rnd()); break;       // byte replace
      case 3: { int k = 1 + rnd() % 8; while (k--) f.push_back(uint8_t(rnd())); break; }  // trailing
      case 4: { f.resize(rnd() % 64); for (auto& b : f) b = uint8_t(rnd()); if (f.size() >= 5 && rnd() % 2) { std::memcpy(f.data(), kMagic, 4); f[4] = 1; } break; }  // random
      case 5: if (f.size() > 12) { f[8 + rnd() % 4] = uint8_t(rnd()); } break;  // shape field
    }
    ++fuzzed;
    try {
      unpack_vec(f);
    } catch (const CodecError&) {
      ++rejected;
    }
  }
  std::printf("codec_selftest: OK (%d round trips, %ld fuzzed frames, %ld rejected)\n", trips, fuzzed, rejected);
  return 0;
}
