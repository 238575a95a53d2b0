#include "checkpoint/crc32.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace fsdp::checkpoint {
namespace {

std::vector<unsigned char> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<unsigned char> out(n);
  for (auto& b : out) b = static_cast<unsigned char>(gen());
  return out;
}

uint32_t Zlib(uint32_t crc, const unsigned char* p, size_t n) {
  return static_cast<uint32_t>(crc32(crc, p, static_cast<uInt>(n)));
}

TEST(Crc32, GivesTheStandardCheckValue) {
  const std::string check = "123456789";
  EXPECT_EQ(Crc32(0, check.data(), check.size()), 0xCBF43926u);
  EXPECT_EQ(Crc32(0, nullptr, 0), 0u);
}

TEST(Crc32, AgreesWithZlibAtEveryLengthAndAlignment) {
  const std::vector<unsigned char> bytes = RandomBytes(4096, 1);
  for (size_t offset = 0; offset < 16; ++offset) {
    for (size_t n = 0; n + offset <= 1300; ++n) {
      ASSERT_EQ(Crc32(0, bytes.data() + offset, n), Zlib(0, bytes.data() + offset, n))
          << "offset " << offset << ", " << n << " bytes";
    }
  }
}

TEST(Crc32, ContinuesFromAPreviousValue) {
  const std::vector<unsigned char> bytes = RandomBytes(1 << 20, 2);
  const uint32_t whole = Zlib(0, bytes.data(), bytes.size());
  for (size_t split : {size_t{1}, size_t{63}, size_t{64}, size_t{300}, size_t{65537}}) {
    const uint32_t first = Crc32(0, bytes.data(), split);
    EXPECT_EQ(Crc32(first, bytes.data() + split, bytes.size() - split), whole) << "split " << split;
  }
  EXPECT_EQ(Crc32(0xDEADBEEFu, bytes.data(), bytes.size()),
            Zlib(0xDEADBEEFu, bytes.data(), bytes.size()));
}

TEST(Crc32, ChangesWhenAnyBitOfALargeBufferFlips) {
  std::vector<unsigned char> bytes = RandomBytes(3 << 20, 3);
  const uint32_t clean = Crc32(0, bytes.data(), bytes.size());
  EXPECT_EQ(clean, Zlib(0, bytes.data(), bytes.size()));
  for (size_t at : {size_t{0}, size_t{17}, size_t{1} << 20, bytes.size() - 1}) {
    bytes[at] ^= 0x10;
    EXPECT_NE(Crc32(0, bytes.data(), bytes.size()), clean) << "flipped byte " << at;
    bytes[at] ^= 0x10;
  }
}

}  // namespace
}  // namespace fsdp::checkpoint
