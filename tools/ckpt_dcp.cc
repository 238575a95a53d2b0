#include "tools/ckpt_dcp.h"

#include <iostream>
#include <memory>
#include <variant>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/dcp_layout.h"
#include "checkpoint/dcp_reader.h"

namespace fsdp::checkpoint {
namespace {

using dcp::BytesStorageMetadata;
using dcp::DcpReader;
using dcp::TensorStorageMetadata;

absl::StatusOr<std::unique_ptr<DcpReader>> OpenOrPrint(const std::string& dir) {
  auto reader = DcpReader::Open(dir);
  if (!reader.ok()) std::cout << "BAD " << reader.status().message() << "\n";
  return reader;
}

}  // namespace

int InspectDcp(const std::string& dir) {
  auto reader = OpenOrPrint(dir);
  if (!reader.ok()) return 1;
  const dcp::Metadata& m = (*reader)->metadata();
  std::cout << "kind: dcp (torch.distributed.checkpoint)\n";
  if (m.version.has_value()) std::cout << "version: " << *m.version << "\n";
  auto layout = dcp::DetectDcpLayout(m, absl::StrCat(dir, "/", dcp::kMetadataFileName));
  std::cout << "layout: "
            << (layout.ok() ? layout->Describe()
                            : "none known (name one to load it: model=PATH,optim=PATH)")
            << "\n";
  int64_t total = 0;
  for (const auto& [key, entry] : m.state_dict_metadata) {
    if (const auto* t = std::get_if<TensorStorageMetadata>(&entry)) {
      int64_t numel = 1;
      for (int64_t s : t->size) numel *= s;
      const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(t->properties.dtype));
      total += bytes;
      std::cout << key << "  " << c10::toString(t->properties.dtype) << " "
                << dcp::ShapeString(t->size) << " " << bytes << " bytes, " << t->chunks.size()
                << " chunk(s):";
      for (const dcp::ChunkStorageMetadata& c : t->chunks) {
        const dcp::StorageInfo* s = m.FindStorage(key, c.offsets);
        std::cout << " [" << absl::StrJoin(c.offsets, ",") << "]+[" << absl::StrJoin(c.sizes, ",")
                  << "]@" << (s != nullptr ? s->relative_path : "?");
      }
      std::cout << "\n";
      continue;
    }
    auto value = (*reader)->ReadObject(key);
    std::cout << key << "  bytes = "
              << (value.ok() ? value->DebugString()
                             : absl::StrCat("BAD ", value.status().message()))
              << "\n";
  }
  std::cout << "tensor bytes: " << total << "\n";
  return 0;
}

int VerifyDcp(const std::string& dir) {
  auto reader = OpenOrPrint(dir);  // .metadata's checks, every file's presence and length
  if (!reader.ok()) return 1;
  int bad = 0;
  int64_t items = 0;
  for (const auto& [key, entry] : (*reader)->metadata().state_dict_metadata) {
    absl::Status s;
    if (const auto* t = std::get_if<TensorStorageMetadata>(&entry)) {
      for (const dcp::ChunkStorageMetadata& c : t->chunks) {
        s.Update((*reader)->ReadTensorRegion(key, c.offsets, c.sizes).status());
        ++items;
      }
    } else {
      s = (*reader)->ReadObject(key).status();
      ++items;
    }
    if (!s.ok()) {
      std::cout << "BAD " << s.message() << "\n";
      ++bad;
    }
  }
  if (bad > 0) {
    std::cout << dir << ": " << bad << " bad entr" << (bad == 1 ? "y" : "ies") << "\n";
    return 1;
  }
  std::cout << dir << ": OK (" << items << " items, " << (*reader)->stats().bytes_read
            << " bytes read; DCP stores no checksums of tensor data: only structure, zip CRC-32s, "
               "dtypes and shapes checked)\n";
  return 0;
}

}  // namespace fsdp::checkpoint
