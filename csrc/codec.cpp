// ASTRA bit-stream codec. Wire format: docs/wire-format.md.
//
// Speed: codes are processed in byte-aligned groups (8 codes -> `bits` bytes, or 4 codes ->
// bits/2 bytes for even widths) with the width a template constant, so every shift is an immediate
// and each group is one wide store / load. The range check is fused into the packing loop as an OR
// reduction (no second pass); the offending index is only searched for when the check fails.
// CRC32C uses the SSE4.2 crc32 instruction when the CPU has it (checked at run time), else a
// slicing-by-8 table.
#include "codec.h"

#include <array>
#include <cstring>
#include <sstream>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#define ASTRA_X86 1
#endif

namespace astra {
namespace {

using u128 = unsigned __int128;

// ---------------------------------------------------------------------------------------------
// CRC32C
// ---------------------------------------------------------------------------------------------
struct CrcTables {
  uint32_t t[8][256];
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : (c >> 1);
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};

const CrcTables& crc_tables() {
  static const CrcTables tables;
  return tables;
}

uint32_t crc_sw(uint32_t crc, const uint8_t* p, size_t n) {
  const auto& T = crc_tables().t;
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    v ^= crc;
    crc = T[7][v & 0xFF] ^ T[6][(v >> 8) & 0xFF] ^ T[5][(v >> 16) & 0xFF] ^ T[4][(v >> 24) & 0xFF] ^
          T[3][(v >> 32) & 0xFF] ^ T[2][(v >> 40) & 0xFF] ^ T[1][(v >> 48) & 0xFF] ^ T[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ T[0][(crc ^ *p++) & 0xFF];
  return crc;
}

#ifdef ASTRA_X86
__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t crc, const uint8_t* p, size_t n) {
  // One dependency chain, unrolled by four: ~8 bytes per 3 cycles, far above what packing needs.
  uint64_t c = crc;
  while (n >= 32) {
    uint64_t v0, v1, v2, v3;
    std::memcpy(&v0, p, 8);
    std::memcpy(&v1, p + 8, 8);
    std::memcpy(&v2, p + 16, 8);
    std::memcpy(&v3, p + 24, 8);
    c = _mm_crc32_u64(c, v0);
    c = _mm_crc32_u64(c, v1);
    c = _mm_crc32_u64(c, v2);
    c = _mm_crc32_u64(c, v3);
    p += 32;
    n -= 32;
  }
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}

bool have_sse42() {
  static const bool ok = __builtin_cpu_supports("sse4.2");
  return ok;
}
#endif

uint32_t crc_raw(uint32_t crc, const uint8_t* p, size_t n) {
#ifdef ASTRA_X86
  if (have_sse42()) return crc_hw(crc, p, n);
#endif
  return crc_sw(crc, p, n);
}

// ---------------------------------------------------------------------------------------------
// Packing kernels
// ---------------------------------------------------------------------------------------------
template <typename T>
inline uint64_t as_u64(T v) {
  if constexpr (std::is_signed<T>::value)
    return static_cast<uint64_t>(static_cast<int64_t>(v));  // negatives become huge -> caught
  else
    return static_cast<uint64_t>(v);
}

// Layout of a byte-aligned group of codes for width B.
template <int B>
struct Group {
  static constexpr bool kSmall = B <= 8;             // 8 codes in a u64
  static constexpr bool kEven = !kSmall && B % 2 == 0;  // 4 codes in a u64
  static constexpr int kCodes = kEven ? 4 : 8;
  static constexpr int kBytes = kCodes * B / 8;
  static constexpr bool kWide = !kSmall && !kEven;  // 8 codes in a u128
  using Acc = typename std::conditional<kWide, u128, uint64_t>::type;
  static constexpr int kAccBytes = sizeof(Acc);
};

// Packs n codes; writes exactly ceil(n*B/8) bytes to out (never past out_end, the payload's end). Returns the
// OR of all codes (as u64) for the range check.
template <int B, typename T>
uint64_t pack_payload(const T* in, uint64_t n, uint8_t* out, uint8_t* out_end) {
  using G = Group<B>;
  using Acc = typename G::Acc;
  constexpr uint64_t kMask = (uint64_t(1) << B) - 1;
  uint64_t seen = 0;
  uint64_t i = 0;
  // Main loop: full-width (overlapping) stores while there is room for them.
  for (; i + G::kCodes <= n && out + G::kAccBytes <= out_end; i += G::kCodes) {
    Acc acc = 0;
#pragma GCC unroll 8
    for (int j = 0; j < G::kCodes; ++j) {
      const uint64_t c = as_u64(in[i + j]);
      seen |= c;
      acc |= static_cast<Acc>(c & kMask) << (j * B);
    }
    std::memcpy(out, &acc, G::kAccBytes);
    out += G::kBytes;
  }
  // Tail: bit accumulator, starts byte aligned.
  uint64_t acc = 0;
  int nb = 0;
  for (; i < n; ++i) {
    const uint64_t c = as_u64(in[i]);
    seen |= c;
    acc |= (c & kMask) << nb;
    nb += B;
    while (nb >= 8) {
      *out++ = static_cast<uint8_t>(acc);
      acc >>= 8;
      nb -= 8;
    }
  }
  if (nb > 0) *out++ = static_cast<uint8_t>(acc);
  return seen;
}

template <int B>
void unpack_payload(const uint8_t* in, const uint8_t* in_end, uint64_t n, int32_t* out) {
  using G = Group<B>;
  using Acc = typename G::Acc;
  constexpr uint64_t kMask = (uint64_t(1) << B) - 1;
  uint64_t i = 0;
  for (; i + G::kCodes <= n && in + G::kAccBytes <= in_end; i += G::kCodes) {
    Acc acc;
    std::memcpy(&acc, in, G::kAccBytes);
#pragma GCC unroll 8
    for (int j = 0; j < G::kCodes; ++j) out[i + j] = static_cast<int32_t>(static_cast<uint64_t>(acc >> (j * B)) & kMask);
    in += G::kBytes;
  }
  uint64_t acc = 0;
  int nb = 0;
  for (; i < n; ++i) {
    while (nb < B) {
      acc |= static_cast<uint64_t>(*in++) << nb;
      nb += 8;
    }
    out[i] = static_cast<int32_t>(acc & kMask);
    acc >>= B;
    nb -= B;
  }
}

template <typename T>
uint64_t pack_typed(int bits, const T* in, uint64_t n, uint8_t* out, uint8_t* end) {
  switch (bits) {
#define ASTRA_CASE(B) \
  case B:             \
    return pack_payload<B, T>(in, n, out, end);
    ASTRA_CASE(1) ASTRA_CASE(2) ASTRA_CASE(3) ASTRA_CASE(4) ASTRA_CASE(5) ASTRA_CASE(6) ASTRA_CASE(7)
    ASTRA_CASE(8) ASTRA_CASE(9) ASTRA_CASE(10) ASTRA_CASE(11) ASTRA_CASE(12) ASTRA_CASE(13)
    ASTRA_CASE(14) ASTRA_CASE(15) ASTRA_CASE(16)
#undef ASTRA_CASE
  }
  throw CodecError("bits must be in 1..16");
}

void unpack_any(int bits, const uint8_t* in, const uint8_t* end, uint64_t n, int32_t* out) {
  switch (bits) {
#define ASTRA_CASE(B)                     \
  case B:                                 \
    unpack_payload<B>(in, end, n, out); \
    return;
    ASTRA_CASE(1) ASTRA_CASE(2) ASTRA_CASE(3) ASTRA_CASE(4) ASTRA_CASE(5) ASTRA_CASE(6) ASTRA_CASE(7)
    ASTRA_CASE(8) ASTRA_CASE(9) ASTRA_CASE(10) ASTRA_CASE(11) ASTRA_CASE(12) ASTRA_CASE(13)
    ASTRA_CASE(14) ASTRA_CASE(15) ASTRA_CASE(16)
#undef ASTRA_CASE
  }
  throw CodecError("bits must be in 1..16");
}

template <typename T>
[[noreturn]] void report_out_of_range(const T* in, uint64_t n, int bits) {
  const uint64_t limit = uint64_t(1) << bits;
  for (uint64_t i = 0; i < n; ++i) {
    if (as_u64(in[i]) >= limit) {
      std::ostringstream os;
      os << "code out of range at flat index " << i << ": " << +in[i] << " is not in [0, " << limit
         << ") for bits=" << bits;
      throw CodecError(os.str());
    }
  }
  throw CodecError("code out of range");  // unreachable: the OR check saw one
}

template <typename T>
void pack_checked(const T* in, const Header& h, uint8_t* payload, uint8_t* end) {
  const uint64_t seen = pack_typed<T>(h.bits, in, h.numel, payload, end);
  if (seen >> h.bits) report_out_of_range(in, h.numel, h.bits);
}

inline void put_u32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v);
  p[1] = uint8_t(v >> 8);
  p[2] = uint8_t(v >> 16);
  p[3] = uint8_t(v >> 24);
}
inline uint32_t get_u32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

// numel * bits, payload and frame sizes from validated dims; throws on overflow.
void finish_sizes(Header& h) {
  uint64_t numel = 1;
  for (int d = 0; d < h.ndim; ++d) {
    if (__builtin_mul_overflow(numel, uint64_t(h.dims[d]), &numel) || numel > kMaxPayloadBits) {
      // A zero dim later on still makes numel 0; only reject if no dim is zero.
      bool any_zero = false;
      for (int e = 0; e < h.ndim; ++e) any_zero |= h.dims[e] == 0;
      if (any_zero) {
        numel = 0;
        break;
      }
      throw CodecError("shape too large: the number of codes overflows the frame format");
    }
  }
  const uint64_t nbits = numel * uint64_t(h.bits);
  if (numel > kMaxPayloadBits / 16 || nbits > kMaxPayloadBits)
    throw CodecError("shape too large: the number of codes overflows the frame format");
  h.numel = numel;
  h.header_nbytes = header_nbytes(h.ndim);
  h.payload_nbytes = (nbits + 7) / 8;
  h.frame_nbytes = h.header_nbytes + h.payload_nbytes;
}

}  // namespace

uint32_t crc32c_update(uint32_t crc, const uint8_t* data, size_t n) {
  return ~crc_raw(~crc, data, n);
}

Header make_header(int bits, int ndim, const int64_t* shape) {
  if (bits < kMinBits || bits > kMaxBits)
    throw CodecError("bits must be in 1..16, got " + std::to_string(bits));
  if (ndim < 0 || ndim > kMaxNdim)
    throw CodecError("codes may have at most 8 dimensions, got " + std::to_string(ndim));
  Header h;
  h.bits = bits;
  h.ndim = ndim;
  for (int d = 0; d < ndim; ++d) {
    if (shape[d] < 0 || shape[d] > int64_t(UINT32_MAX))
      throw CodecError("dimension " + std::to_string(d) + " of size " + std::to_string(shape[d]) +
                       " does not fit the frame format (uint32)");
    h.dims[d] = static_cast<uint32_t>(shape[d]);
  }
  finish_sizes(h);
  return h;
}

size_t pack(const void* codes, DType dt, const Header& h, uint8_t* out, size_t out_cap) {
  if (out_cap < h.frame_nbytes)
    throw CodecError("output buffer too small: need " + std::to_string(h.frame_nbytes) + " bytes, have " +
                     std::to_string(out_cap));
  std::memcpy(out, kMagic, 4);
  out[4] = kVersion;
  out[5] = static_cast<uint8_t>(h.bits);
  out[6] = static_cast<uint8_t>(h.ndim);
  out[7] = 0;
  for (int d = 0; d < h.ndim; ++d) put_u32(out + kFixedHeader + 4 * d, h.dims[d]);
  uint8_t* payload = out + h.header_nbytes;
  // The wide stores of the main loop write up to 16 bytes at once, zeros past the group: bounded by the frame's
  // end (never out_cap, the caller's bytes past the frame are not ours), the last groups go through the tail.
  uint8_t* end = out + h.frame_nbytes;
  switch (dt) {
    case DType::U8: pack_checked(static_cast<const uint8_t*>(codes), h, payload, end); break;
    case DType::I8: pack_checked(static_cast<const int8_t*>(codes), h, payload, end); break;
    case DType::I16: pack_checked(static_cast<const int16_t*>(codes), h, payload, end); break;
    case DType::U16: pack_checked(static_cast<const uint16_t*>(codes), h, payload, end); break;
    case DType::I32: pack_checked(static_cast<const int32_t*>(codes), h, payload, end); break;
    case DType::U32: pack_checked(static_cast<const uint32_t*>(codes), h, payload, end); break;
    case DType::I64: pack_checked(static_cast<const int64_t*>(codes), h, payload, end); break;
    default: throw CodecError("unsupported code dtype");
  }
  const size_t crc_off = h.header_nbytes - kCrcBytes;
  uint32_t crc = crc32c_update(0, out, crc_off);
  crc = crc32c_update(crc, payload, h.payload_nbytes);
  put_u32(out + crc_off, crc);
  return h.frame_nbytes;
}

Header parse_header(const uint8_t* f, size_t n) {
  const size_t min_header = header_nbytes(0);
  if (n < min_header)
    throw CodecError("truncated frame: " + std::to_string(n) + " bytes, a header needs at least " +
                     std::to_string(min_header));
  if (std::memcmp(f, kMagic, 4) != 0) throw CodecError("bad magic: not an ASTRA code frame");
  if (f[4] != kVersion)
    throw CodecError("unsupported frame version " + std::to_string(f[4]) + " (this codec reads version " +
                     std::to_string(kVersion) + ")");
  Header h;
  h.bits = f[5];
  h.ndim = f[6];
  if (h.bits < kMinBits || h.bits > kMaxBits)
    throw CodecError("corrupt header: bits=" + std::to_string(h.bits) + " is outside 1..16");
  if (h.ndim > kMaxNdim) throw CodecError("corrupt header: ndim=" + std::to_string(h.ndim) + " exceeds 8");
  if (f[7] != 0) throw CodecError("corrupt header: reserved flags byte is " + std::to_string(f[7]) + ", expected 0");
  const size_t hn = header_nbytes(h.ndim);
  if (n < hn)
    throw CodecError("truncated frame: header announces " + std::to_string(h.ndim) + " dims (" +
                     std::to_string(hn) + " header bytes) but the frame has " + std::to_string(n));
  for (int d = 0; d < h.ndim; ++d) h.dims[d] = get_u32(f + kFixedHeader + 4 * d);
  finish_sizes(h);
  if (n < h.frame_nbytes)
    throw CodecError("truncated frame: header announces " + std::to_string(h.payload_nbytes) +
                     " payload bytes, only " + std::to_string(n - hn) + " present");
  if (n > h.frame_nbytes)
    throw CodecError("trailing bytes: frame is " + std::to_string(n) + " bytes, header announces " +
                     std::to_string(h.frame_nbytes));
  return h;
}

void unpack(const uint8_t* f, size_t n, const Header& h, int32_t* out) {
  if (n != h.frame_nbytes) throw CodecError("frame size does not match its header");
  const uint8_t* payload = f + h.header_nbytes;
  const size_t crc_off = h.header_nbytes - kCrcBytes;
  uint32_t crc = crc32c_update(0, f, crc_off);
  crc = crc32c_update(crc, payload, h.payload_nbytes);
  const uint32_t stored = get_u32(f + crc_off);
  if (crc != stored) {
    std::ostringstream os;
    os << "CRC mismatch: frame is corrupt (stored 0x" << std::hex << stored << ", computed 0x" << crc << ")";
    throw CodecError(os.str());
  }
  const uint64_t used_bits = h.numel * uint64_t(h.bits);
  if (used_bits % 8) {
    const uint8_t last = payload[h.payload_nbytes - 1];
    if (last >> (used_bits % 8)) throw CodecError("corrupt frame: non-zero padding bits after the last code");
  }
  unpack_any(h.bits, payload, f + n, h.numel, out);
}

}  // namespace astra
