// libFuzzer target for ParseMetadata, the reader of a DCP directory's .metadata pickle
// (checkpoint/dcp_metadata.h), which DcpReader::Open applies to the file's bytes.
//
// Any input must end in metadata or an error status, never in a crash, a sanitizer report, a
// leak, an allocation beyond a small multiple of the input's size or a hang. Beyond that:
//   * an error is INVALID_ARGUMENT or DATA_LOSS and names the file;
//   * accepted metadata keeps what the header promises, checked here independently of
//     ValidateMetadata: every chunk lies within its tensor and the chunks' element counts add
//     up to the tensor's, every chunk and bytes entry has its storage entry (a chunk's no
//     shorter than its data), and every storage entry names a plain file name with a
//     non-negative offset and length.
// Seeds: checkpoint/testdata/fuzz_corpus/dcp_metadata/ (.metadata files PyTorch 2.13 wrote,
// make_dcp_corpus.sh). How to run it: checkpoint/fuzz/README.md.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "checkpoint/dcp_metadata.h"
#include "checkpoint/fuzz/fuzz_checks.h"

namespace {

using fsdp::checkpoint::fuzz::BadRefusal;

namespace dcp = fsdp::checkpoint::dcp;

constexpr char kWhere[] = "fuzz-dcp/.metadata";

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "dcp_metadata_fuzz: %s\n", what.c_str());
  std::abort();
}

void CheckTensor(const std::string& fqn, const dcp::TensorStorageMetadata& t,
                 const dcp::Metadata& m) {
  __int128 numel = 1;
  for (int64_t s : t.size) {
    if (s < 0) Fail(absl::StrCat("accepted '", fqn, "' of negative size"));
    numel *= s;
    if (numel > INT64_MAX) Fail(absl::StrCat("accepted '", fqn, "' of too many elements"));
  }
  __int128 covered = 0;
  for (const dcp::ChunkStorageMetadata& c : t.chunks) {
    if (c.offsets.size() != t.size.size() || c.sizes.size() != t.size.size()) {
      Fail(absl::StrCat("accepted a chunk of '", fqn, "' of other dimensions"));
    }
    __int128 volume = 1;
    for (size_t d = 0; d < t.size.size(); ++d) {
      if (c.offsets[d] < 0 || c.sizes[d] < 0 ||
          static_cast<__int128>(c.offsets[d]) + c.sizes[d] > t.size[d]) {
        Fail(absl::StrCat("accepted a chunk of '", fqn, "' outside it"));
      }
      volume *= c.sizes[d];
    }
    covered += volume;
    const dcp::StorageInfo* s = m.FindStorage(fqn, c.offsets);
    if (s == nullptr) Fail(absl::StrCat("accepted a chunk of '", fqn, "' without storage"));
    if (s->transform_descriptors.empty() &&
        s->length < volume * static_cast<int64_t>(c10::elementSize(t.properties.dtype))) {
      Fail(absl::StrCat("accepted a chunk of '", fqn, "' stored in fewer bytes than its data"));
    }
  }
  if (covered != numel) Fail(absl::StrCat("accepted chunks of '", fqn, "' not covering it"));
}

void CheckInvariants(const dcp::Metadata& m) {
  for (const auto& [fqn, entry] : m.state_dict_metadata) {
    if (const auto* t = std::get_if<dcp::TensorStorageMetadata>(&entry)) {
      CheckTensor(fqn, *t, m);
    } else if (m.FindStorage(fqn, std::nullopt) == nullptr) {
      Fail(absl::StrCat("accepted bytes entry '", fqn, "' without storage"));
    }
  }
  for (const auto& [index, info] : m.storage_data) {
    if (m.Find(index.fqn) == nullptr) Fail("accepted storage of no entry");
    if (info.relative_path.empty() || info.relative_path.find('/') != std::string::npos ||
        info.relative_path == "..") {
      Fail("accepted relative_path '" + info.relative_path + "'");
    }
    if (info.offset < 0 || info.length < 0 || info.offset > INT64_MAX - info.length) {
      Fail("accepted a storage range out of bounds");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view pickle(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<dcp::Metadata> m = dcp::ParseMetadata(pickle, kWhere);
  if (!m.ok()) {
    if (const std::optional<std::string> bad = BadRefusal(m.status(), kWhere)) Fail(*bad);
    return 0;
  }
  CheckInvariants(*m);
  return 0;
}
