// libFuzzer target for MetadataFromJson, the reader of a sharded checkpoint's metadata.json
// (checkpoint/sharded_format.h). ShardedCheckpointReader::Open reads the file whole and hands it
// to this function, which parses and validates everything Open checks.
//
// Any input must end in metadata or an error status, never in a crash, a sanitizer report, a
// leak, an allocation beyond the input's size or a hang. Beyond that the target checks what a
// caller relies on:
//   * an error is INVALID_ARGUMENT or DATA_LOSS and names the file;
//   * accepted metadata is what the header promises: every piece within its tensor and its
//     file's claimed size, pieces tiling [0, numel), one checksum per block, model_keys and
//     optimizer tensor references resolving;
//   * accepted metadata written back (MetadataToJson) reads again, and writing that gives the
//     same text (the writer and the reader agree on the format).
// Seeds: checkpoint/testdata/fuzz_corpus/sharded_metadata/ (metadata.json of real checkpoints
// and the regression inputs of findings). How to run it: checkpoint/fuzz/README.md.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "checkpoint/fuzz/fuzz_checks.h"
#include "checkpoint/sharded_format.h"

namespace {

using fsdp::checkpoint::fuzz::BadRefusal;

using fsdp::checkpoint::MetadataFromJson;
using fsdp::checkpoint::MetadataToJson;
using fsdp::checkpoint::PieceRecord;
using fsdp::checkpoint::ShardedMetadata;
using fsdp::checkpoint::TensorRecord;

constexpr char kWhere[] = "fuzz-ckpt/metadata.json";

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "sharded_metadata_fuzz: %s\n", what.c_str());
  std::abort();
}

// What Validate promises about accepted metadata, checked independently of it.
void CheckInvariants(const ShardedMetadata& m) {
  if (m.world_size < 1) Fail("accepted a world_size below 1");
  if (m.block_bytes < 1) Fail("accepted a non-positive block_bytes");
  for (const auto& f : m.files) {
    if (f.header_bytes < 8 || f.size < f.header_bytes) {
      Fail(absl::StrCat("accepted file '", f.name, "' with header ", f.header_bytes, " of size ",
                        f.size));
    }
  }
  for (const TensorRecord& t : m.tensors) {
    const int64_t numel = t.numel();
    if (numel < 0) Fail(absl::StrCat("accepted '", t.key, "' with a negative numel"));
    if (m.FindTensor(t.key) != &t) Fail(absl::StrCat("FindTensor('", t.key, "') is another"));
    int64_t next = 0;
    for (const PieceRecord& p : t.pieces) {
      if (p.begin != next || p.end < p.begin || p.end > numel) {
        Fail(absl::StrCat("accepted pieces of '", t.key, "' that do not tile it"));
      }
      next = p.end;
      if (p.file < 0) continue;
      if (p.file >= static_cast<int>(m.files.size())) Fail("accepted a piece of no file");
      const auto& f = m.files[static_cast<size_t>(p.file)];
      if (p.offset < f.header_bytes || p.bytes < 0 || p.offset > f.size ||
          p.bytes > f.size - p.offset) {
        Fail(absl::StrCat("accepted a piece of '", t.key, "' outside its file"));
      }
      const int64_t blocks = (p.bytes + m.block_bytes - 1) / m.block_bytes;
      if (static_cast<int64_t>(p.block_xxh64.size()) != blocks) {
        Fail(absl::StrCat("accepted a piece of '", t.key, "' with a wrong number of checksums"));
      }
    }
    if (next != numel) Fail(absl::StrCat("accepted pieces of '", t.key, "' that leave a gap"));
  }
  for (const auto& [key, stored] : m.model_keys) {
    if (m.FindTensor(absl::StrCat("model/", stored)) == nullptr) {
      Fail(absl::StrCat("accepted model key '", key, "' without its tensor"));
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<ShardedMetadata> m = MetadataFromJson(text, kWhere);
  if (!m.ok()) {
    if (const std::optional<std::string> bad = BadRefusal(m.status(), kWhere)) Fail(*bad);
    return 0;
  }
  CheckInvariants(*m);
  // The writer's text of accepted metadata reads back, and is a fixed point from then on (the
  // first pass may normalise: non-string saved_with values, non-finite floats, dtype rounding).
  const std::string once = MetadataToJson(*m);
  absl::StatusOr<ShardedMetadata> again = MetadataFromJson(once, kWhere);
  if (!again.ok())
    Fail("accepted metadata, written back, is refused: " + again.status().ToString());
  const std::string twice = MetadataToJson(*again);
  if (twice != once)
    Fail("metadata written, read and written again changes:\n" + once + "\n" + twice);
  return 0;
}
