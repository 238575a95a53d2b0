#include "checkpoint/internal/file_bytes.h"

#include "absl/strings/escaping.h"

namespace fsdp::checkpoint {

uint64_t ReadLE(const char* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

std::string Printable(std::string_view s) {
  constexpr size_t kMax = 120;
  const std::string_view head = s.substr(0, kMax);
  std::string out = absl::CHexEscape(absl::string_view(head.data(), head.size()));
  if (s.size() > kMax) out += "...";
  return out;
}

}  // namespace fsdp::checkpoint
