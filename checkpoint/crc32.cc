#include "checkpoint/crc32.h"

#include <zlib.h>

#include <climits>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fsdp::checkpoint {
namespace {

uint32_t ZlibCrc32(uint32_t crc, const unsigned char* p, size_t n) {
  // zlib takes lengths as uInt: feed it at most UINT_MAX bytes at a time.
  while (n > 0) {
    const size_t chunk = n < UINT_MAX ? n : UINT_MAX;
    crc = static_cast<uint32_t>(crc32(crc, p, static_cast<uInt>(chunk)));
    p += chunk;
    n -= chunk;
  }
  return crc;
}

#if defined(__x86_64__)

// Folding (Gopal et al., "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ
// Instruction", Intel, 2009): four 128-bit lanes hold the message's residue; each step
// multiplies a lane by x^512 mod P (as two 64-bit halves times precomputed constants) and adds
// the next 64 bytes. The lanes are then folded into one, and the CRC of that one lane followed
// by the bytes left over is the CRC of the whole message (folding keeps the residue mod P), so
// the end is computed by zlib's table code over at most 16 + 63 bytes. The constants are the
// bit-reflected x^(512+32) and x^(512-32) mod P (fold by four lanes) and x^(128+32),
// x^(128-32) mod P (fold by one lane), each times x for the reflected product.
// lane * (x^a, x^b) + next: `k` holds the two constants, one per 64-bit half of `lane`.
__attribute__((target("pclmul,sse4.1"))) inline __m128i Fold(__m128i lane, __m128i k,
                                                             __m128i next) {
  const __m128i lo = _mm_clmulepi64_si128(lane, k, 0x00);
  const __m128i hi = _mm_clmulepi64_si128(lane, k, 0x11);
  return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

__attribute__((target("pclmul,sse4.1"))) uint32_t FoldCrc32(uint32_t crc, const unsigned char* p,
                                                            size_t n) {
  const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);
  const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);
  auto load = [](const unsigned char* q) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  };
  __m128i x0 = load(p), x1 = load(p + 16), x2 = load(p + 32), x3 = load(p + 48);
  // The running state (the complement of `crc`) enters as the first four bytes' XOR.
  x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128(static_cast<int>(~crc)));
  p += 64;
  n -= 64;
  for (; n >= 64; p += 64, n -= 64) {
    x0 = Fold(x0, k1k2, load(p));
    x1 = Fold(x1, k1k2, load(p + 16));
    x2 = Fold(x2, k1k2, load(p + 32));
    x3 = Fold(x3, k1k2, load(p + 48));
  }
  __m128i x = Fold(x0, k3k4, x1);
  x = Fold(x, k3k4, x2);
  x = Fold(x, k3k4, x3);
  for (; n >= 16; p += 16, n -= 16) x = Fold(x, k3k4, load(p));
  alignas(16) unsigned char lane[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(lane), x);
  // The lane carries the whole state, so its CRC starts from a zero state (crc32's
  // 0xFFFFFFFF, which it complements), then the leftover bytes follow.
  const uint32_t c = ZlibCrc32(0xFFFFFFFFu, lane, sizeof(lane));
  return ZlibCrc32(c, p, n);
}

bool HasPclmul() {
  static const bool has = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return has;
}

#endif

}  // namespace

uint32_t Crc32(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
#if defined(__x86_64__)
  if (n >= 256 && HasPclmul()) return FoldCrc32(crc, p, n);
#endif
  return ZlibCrc32(crc, p, n);
}

}  // namespace fsdp::checkpoint
