// libFuzzer target for the pickle machine of the torch.save reader (checkpoint/torch_load.h).
//
// torch_load_fuzz mutates whole files, where almost every change to data.pkl fails the zip
// CRC-32 check before the pickle is read. This target takes the pickle and the storage sizes and
// wraps them into a well-formed torch.save archive (correct CRCs), so each mutation reaches the
// unpickler, the allow-listed globals, tensor rebuilding and the PyValue conversion.
//
// Input: 1 byte N (storages, taken modulo 33), N little-endian uint16 storage sizes in bytes
// (clamped to kMaxStorageBytes), then the pickle. Storage k is the entry `archive/data/<k>`; its
// bytes are a fixed pattern. Seeds: checkpoint/testdata/fuzz_corpus/torch_load_pickle/ (the
// pickles of real torch.save files, written by checkpoint/fuzz/make_torch_load_corpus.sh).
// How to run: README.md here.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "checkpoint/torch_load.h"

namespace {

constexpr char kName[] = "fuzz-pickle.pt";
// Larger storages only slow each run down (up to 32 x 64 KiB to write and to check); they reach
// no other code.
constexpr size_t kMaxStorageBytes = 4096;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "torch_load_pickle_fuzz: %s\n", what.c_str());
  std::abort();
}

uint32_t Crc32(std::string_view s) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char byte : s) c = table[(c ^ byte) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

void Put(std::string* out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

// A stored (uncompressed) zip archive of `entries`, without zip64 records.
std::string Zip(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::string out, central;
  for (const auto& [name, data] : entries) {
    const uint64_t offset = out.size();
    const uint32_t crc = Crc32(data);
    Put(&out, 0x04034b50, 4);
    Put(&out, 20, 2);  // version needed
    Put(&out, 0, 2);   // flags
    Put(&out, 0, 2);   // stored
    Put(&out, 0, 4);   // time, date
    Put(&out, crc, 4);
    Put(&out, data.size(), 4);
    Put(&out, data.size(), 4);
    Put(&out, name.size(), 2);
    Put(&out, 0, 2);  // extra
    out += name;
    out += data;
    Put(&central, 0x02014b50, 4);
    Put(&central, 20, 2);
    Put(&central, 20, 2);
    Put(&central, 0, 2);
    Put(&central, 0, 2);
    Put(&central, 0, 4);
    Put(&central, crc, 4);
    Put(&central, data.size(), 4);
    Put(&central, data.size(), 4);
    Put(&central, name.size(), 2);
    Put(&central, 0, 2);  // extra
    Put(&central, 0, 2);  // comment
    Put(&central, 0, 2);  // disk
    Put(&central, 0, 2);  // internal attributes
    Put(&central, 0, 4);  // external attributes
    Put(&central, offset, 4);
    central += name;
  }
  const uint64_t cd_offset = out.size();
  out += central;
  Put(&out, 0x06054b50, 4);
  Put(&out, 0, 4);  // disks
  Put(&out, entries.size(), 2);
  Put(&out, entries.size(), 2);
  Put(&out, central.size(), 4);
  Put(&out, cd_offset, 4);
  Put(&out, 0, 2);  // comment
  return out;
}

void Walk(const fsdp::checkpoint::PyValue& v, int depth) {
  if (depth > fsdp::checkpoint::kMaxDepth + 1) Fail("a loaded value nests deeper than kMaxDepth");
  if (v.is_list() || v.is_tuple()) {
    for (const auto& item : v.items()) Walk(item, depth + 1);
  } else if (v.is_dict()) {
    for (const auto& [key, value] : v.as_dict().items) {
      Walk(key, depth + 1);
      Walk(value, depth + 1);
    }
  } else if (v.is_tensor()) {
    const at::Tensor& t = v.as_tensor();
    if (t.defined() && t.numel() > 0) {
      volatile int64_t sink = t.contiguous().numel();  // reads the view through its strides
      (void)sink;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  if (in.empty()) return 0;
  const size_t n = static_cast<uint8_t>(in[0]) % 33;
  if (in.size() < 1 + 2 * n) return 0;
  std::vector<std::pair<std::string, std::string>> entries;
  entries.emplace_back("archive/data.pkl", std::string(in.substr(1 + 2 * n)));
  for (size_t k = 0; k < n; ++k) {
    const size_t claimed = static_cast<uint8_t>(in[1 + 2 * k]) |
                           (static_cast<size_t>(static_cast<uint8_t>(in[2 + 2 * k])) << 8);
    const size_t bytes = std::min(claimed, kMaxStorageBytes);
    std::string storage(bytes, '\0');
    for (size_t b = 0; b < bytes; ++b) storage[b] = static_cast<char>(0x3F ^ (b * 7));
    entries.emplace_back("archive/data/" + std::to_string(k), std::move(storage));
  }
  entries.emplace_back("archive/version", "3\n");
  const std::string archive = Zip(entries);
  absl::StatusOr<fsdp::checkpoint::PyValue> loaded =
      fsdp::checkpoint::TorchLoadFromBytes(archive, kName);
  if (!loaded.ok()) {
    if (loaded.status().message().find(kName) == absl::string_view::npos) {
      Fail("error without the file's name: " + loaded.status().ToString());
    }
    return 0;
  }
  Walk(*loaded, 0);
  (void)loaded->DebugString();
  return 0;
}
