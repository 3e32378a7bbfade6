// ASTRA bit-stream codec: packs integer codes into framed, CRC-protected bit-streams.
// Normative wire format: docs/wire-format.md. No Python, no torch: raw pointers only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace astra {

// Thrown for every malformed input (bad codes, bad frames). Python sees ValueError.
struct CodecError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

constexpr uint8_t kMagic[4] = {0x41, 0x53, 0x54, 0x51};  // "ASTQ"
constexpr uint8_t kVersion = 1;
constexpr int kMaxNdim = 8;
constexpr int kMinBits = 1;
constexpr int kMaxBits = 16;
constexpr size_t kFixedHeader = 8;  // magic, version, bits, ndim, flags
constexpr size_t kCrcBytes = 4;
// Caps numel * bits so that every size computation fits comfortably in 64 bits.
constexpr uint64_t kMaxPayloadBits = uint64_t(1) << 60;

// Element type of the code tensor handed to pack().
enum class DType : int { U8 = 0, I8 = 1, I16 = 2, U16 = 3, I32 = 4, U32 = 5, I64 = 6 };

struct Header {
  int bits = 0;
  int ndim = 0;
  uint32_t dims[kMaxNdim] = {};
  uint64_t numel = 0;
  size_t header_nbytes = 0;
  uint64_t payload_nbytes = 0;
  uint64_t frame_nbytes = 0;
};

inline size_t header_nbytes(int ndim) { return kFixedHeader + 4 * size_t(ndim) + kCrcBytes; }

// Validates bits/shape, returns numel and the payload / frame sizes. Throws CodecError.
Header make_header(int bits, int ndim, const int64_t* shape);

// CRC32C (Castagnoli), standard init/final xor handled by the caller-visible helper:
// crc32c_update(0, ...) starts a fresh CRC; chaining passes the previous return value.
uint32_t crc32c_update(uint32_t crc, const uint8_t* data, size_t n);

// Packs `hdr.numel` codes of type `dt` into `out` (capacity `out_cap`, at least hdr.frame_nbytes); writes
// out[0, hdr.frame_nbytes) only.
// Throws CodecError (naming the first offending index and value) if a code is outside [0, 2^bits).
// Returns the number of bytes written (= hdr.frame_nbytes).
size_t pack(const void* codes, DType dt, const Header& hdr, uint8_t* out, size_t out_cap);

// Parses and validates the header of `frame` (n bytes): magic, version, bits, ndim, flags, and that
// n equals exactly header + payload. Does not check the CRC or padding (unpack does). Throws CodecError.
Header parse_header(const uint8_t* frame, size_t n);

// Full validation (header, CRC, zero padding bits) and decode into out[0, hdr.numel) as int32.
void unpack(const uint8_t* frame, size_t n, const Header& hdr, int32_t* out);

}  // namespace astra
