// See dcp_reader.h.
#include "checkpoint/dcp_reader.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "checkpoint/internal/file_bytes.h"
#include "checkpoint/internal/sharded_helpers.h"
#include "checkpoint/internal/zip_reader.h"
#include "checkpoint/torch_load.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint::dcp {
namespace {

std::string Quoted(const std::string& fqn) { return absl::StrCat("'", Printable(fqn), "'"); }

// "tensor 'w' chunk at (3, 0)" / "bytes entry 'lr'", for messages.
std::string ItemName(const MetadataIndex& index) {
  if (!index.offset) return absl::StrCat("bytes entry ", Quoted(index.fqn));
  return absl::StrCat("tensor ", Quoted(index.fqn), " chunk at ", ShapeString(*index.offset));
}

std::string ByteRange(const StorageInfo& s) {
  return absl::StrCat("bytes [", s.offset, ", ", s.offset + s.length, ")");
}

// The box [offsets, offsets + sizes) lies in a tensor of shape `size`.
bool Inside(const std::vector<int64_t>& offsets, const std::vector<int64_t>& sizes,
            const std::vector<int64_t>& size) {
  bool inside = offsets.size() == size.size() && sizes.size() == size.size();
  for (size_t d = 0; inside && d < size.size(); ++d) {
    inside = offsets[d] >= 0 && sizes[d] >= 0 && offsets[d] <= size[d] &&
             sizes[d] <= size[d] - offsets[d];
  }
  return inside;
}

}  // namespace

DcpReader::~DcpReader() = default;

absl::StatusOr<std::unique_ptr<DcpReader>> DcpReader::Open(const std::string& dir) {
  std::unique_ptr<DcpReader> r(new DcpReader());
  r->dir_ = dir;
  FSDP_ASSIGN_OR_RETURN(r->metadata_, ReadMetadataFile(JoinPath(dir, kMetadataFileName)));
  FSDP_RETURN_IF_ERROR(r->CheckFiles());
  return r;
}

// Each file named once, with the entry that reaches furthest into it.
absl::Status DcpReader::CheckFiles() {
  std::map<std::string, const std::pair<const MetadataIndex, StorageInfo>*> furthest;
  for (const auto& entry : metadata_.storage_data) {
    auto [it, added] = furthest.emplace(entry.second.relative_path, &entry);
    const StorageInfo& s = entry.second;
    if (!added && s.offset + s.length > it->second->second.offset + it->second->second.length) {
      it->second = &entry;
    }
  }
  for (const auto& [name, entry] : furthest) {
    const std::string path = JoinPath(dir_, name);
    const StorageInfo& s = entry->second;
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      const std::string why =
          absl::StrCat(path, ": ", std::strerror(errno), " (", kMetadataFileName, " places ",
                       ItemName(entry->first), " there)");
      return errno == ENOENT ? absl::NotFoundError(why) : absl::UnknownError(why);
    }
    if (st.st_size < s.offset + s.length) {
      return absl::DataLossError(absl::StrCat(path, ": truncated: ", st.st_size, " bytes, but ",
                                              kMetadataFileName, " places ", ItemName(entry->first),
                                              " at ", ByteRange(s)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<const Source*> DcpReader::ItemFile(const StorageInfo& s, const std::string& name) {
  if (!s.transform_descriptors.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": stored through stream transforms (",
                                                   s.transform_descriptors.front(),
                                                   "), which this reader does not apply"));
  }
  auto it = files_.find(s.relative_path);
  if (it == files_.end()) {
    FSDP_ASSIGN_OR_RETURN(std::unique_ptr<FileSource> f,
                          FileSource::Open(JoinPath(dir_, s.relative_path)));
    it = files_.emplace(s.relative_path, std::move(f)).first;
  }
  const Source* file = it->second.get();
  // Checked at Open; checked again against the size the file has now.
  if (!FitsIn(static_cast<uint64_t>(s.offset), static_cast<uint64_t>(s.length), file->size())) {
    return absl::DataLossError(
        absl::StrCat(name, ": the file is truncated (", file->size(), " bytes)"));
  }
  ++stats_.items_read;
  return file;
}

absl::StatusOr<at::Tensor> DcpReader::ReadChunk(const std::string& fqn,
                                                const TensorStorageMetadata& t,
                                                const ChunkStorageMetadata& chunk) {
  const MetadataIndex index{fqn, chunk.offsets, std::nullopt};
  const StorageInfo* s = metadata_.FindStorage(fqn, chunk.offsets);  // validated: present
  const std::string path = JoinPath(dir_, s->relative_path);
  const std::string name = absl::StrCat(path, " (", ItemName(index), ", ", ByteRange(*s), ")");
  FSDP_ASSIGN_OR_RETURN(const Source* file, ItemFile(*s, name));
  SliceSource slice(*file, static_cast<uint64_t>(s->offset), static_cast<uint64_t>(s->length),
                    &stats_.bytes_read);
  FSDP_ASSIGN_OR_RETURN(PyValue value, TorchLoadFromSource(slice, name));
  if (!value.is_tensor()) {
    return absl::DataLossError(
        absl::StrCat(name, ": holds a ", value.TypeName(), ", not a tensor"));
  }
  const at::Tensor& loaded = value.as_tensor();
  if (loaded.scalar_type() != t.properties.dtype || loaded.sizes().vec() != chunk.sizes) {
    return absl::DataLossError(absl::StrCat(
        name, ": holds a ", std::string(c10::toString(loaded.scalar_type())), " tensor of shape ",
        ShapeString(loaded.sizes().vec()), ", ", kMetadataFileName, " says ",
        std::string(c10::toString(t.properties.dtype)), " of shape ", ShapeString(chunk.sizes)));
  }
  return loaded;
}

absl::StatusOr<at::Tensor> DcpReader::ReadTensorRegion(const std::string& fqn,
                                                       const std::vector<int64_t>& offsets,
                                                       const std::vector<int64_t>& sizes) {
  const std::string where =
      absl::StrCat(JoinPath(dir_, kMetadataFileName), ": tensor ", Quoted(fqn));
  const StorageMetadata* entry = metadata_.Find(fqn);
  if (entry == nullptr) return absl::NotFoundError(absl::StrCat(where, ": no such entry"));
  const auto* t = std::get_if<TensorStorageMetadata>(entry);
  if (t == nullptr) return absl::InvalidArgumentError(absl::StrCat(where, ": a bytes entry"));
  const size_t dims = t->size.size();
  if (!Inside(offsets, sizes, t->size)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": region at ", ShapeString(offsets), " of sizes ", ShapeString(sizes),
                     " is not inside its size ", ShapeString(t->size)));
  }
  FSDP_ASSIGN_OR_RETURN(at::Tensor out, CallTorch(where, [&] {
                          return at::empty(sizes, at::TensorOptions().dtype(t->properties.dtype));
                        }));
  if (out.numel() == 0) return out;
  // The chunks tile the tensor (ValidateMetadata), so the overlaps fill `out` exactly.
  for (const ChunkStorageMetadata& c : t->chunks) {
    std::vector<int64_t> lo(dims), hi(dims);
    bool overlaps = true;
    for (size_t d = 0; d < dims; ++d) {
      lo[d] = std::max(offsets[d], c.offsets[d]);
      hi[d] = std::min(offsets[d] + sizes[d], c.offsets[d] + c.sizes[d]);
      overlaps = overlaps && lo[d] < hi[d];
    }
    if (!overlaps) continue;
    FSDP_ASSIGN_OR_RETURN(at::Tensor chunk, ReadChunk(fqn, *t, c));
    FSDP_RETURN_IF_ERROR(CallTorch(where, [&] {
      at::Tensor src = chunk, dst = out;
      for (size_t d = 0; d < dims; ++d) {
        const auto dim = static_cast<int64_t>(d);
        src = src.narrow(dim, lo[d] - c.offsets[d], hi[d] - lo[d]);
        dst = dst.narrow(dim, lo[d] - offsets[d], hi[d] - lo[d]);
      }
      dst.copy_(src);
    }));
  }
  return out;
}

absl::StatusOr<at::Tensor> DcpReader::ReadTensor(const std::string& fqn) {
  const StorageMetadata* entry = metadata_.Find(fqn);
  const auto* t = entry == nullptr ? nullptr : std::get_if<TensorStorageMetadata>(entry);
  if (t == nullptr) return ReadTensorRegion(fqn, {}, {});  // its error
  return ReadTensorRegion(fqn, std::vector<int64_t>(t->size.size(), 0), t->size);
}

absl::StatusOr<const StorageInfo*> DcpReader::BytesStorage(const std::string& fqn) const {
  const std::string where =
      absl::StrCat(JoinPath(dir_, kMetadataFileName), ": bytes entry ", Quoted(fqn));
  const StorageMetadata* entry = metadata_.Find(fqn);
  if (entry == nullptr) return absl::NotFoundError(absl::StrCat(where, ": no such entry"));
  if (!std::holds_alternative<BytesStorageMetadata>(*entry)) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": a tensor, not bytes"));
  }
  return metadata_.FindStorage(fqn, std::nullopt);  // validated: present
}

absl::StatusOr<std::string> DcpReader::ReadBytes(const std::string& fqn) {
  FSDP_ASSIGN_OR_RETURN(const StorageInfo* s, BytesStorage(fqn));
  const std::string name = absl::StrCat(JoinPath(dir_, s->relative_path), " (bytes entry ",
                                        Quoted(fqn), ", ", ByteRange(*s), ")");
  FSDP_ASSIGN_OR_RETURN(const Source* file, ItemFile(*s, name));
  std::string bytes(static_cast<size_t>(s->length), '\0');
  FSDP_RETURN_IF_ERROR(file->ReadAt(static_cast<uint64_t>(s->offset), bytes.size(), bytes.data()),
                       name);
  stats_.bytes_read += s->length;
  return bytes;
}

absl::StatusOr<PyValue> DcpReader::ReadObject(const std::string& fqn) {
  FSDP_ASSIGN_OR_RETURN(std::string bytes, ReadBytes(fqn));
  const StorageInfo* s = metadata_.FindStorage(fqn, std::nullopt);
  return TorchLoadFromBytes(bytes, absl::StrCat(JoinPath(dir_, s->relative_path), " (bytes entry ",
                                                Quoted(fqn), ", ", ByteRange(*s), ")"));
}

}  // namespace fsdp::checkpoint::dcp
