// See dcp_metadata.h. This file: lookups, ValidateMetadata and reading the file; the pickle
// side is dcp_metadata_pickle.cc.
#include "checkpoint/dcp_metadata.h"

#include <algorithm>
#include <memory>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/internal/file_bytes.h"
#include "checkpoint/internal/zip_reader.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint::dcp {
namespace {

struct Checker {
  const std::string& file;

  absl::Status Bad(const std::string& fqn, const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": tensor '", Printable(fqn), "': ", what));
  }

  absl::Status Chunk(const std::string& fqn, const TensorStorageMetadata& t, size_t k,
                     int64_t* volume) const {
    const ChunkStorageMetadata& c = t.chunks[k];
    const std::string where = absl::StrCat("chunk ", k, " (offsets ", ShapeString(c.offsets),
                                           ", sizes ", ShapeString(c.sizes), ")");
    if (c.offsets.size() != t.size.size() || c.sizes.size() != t.size.size()) {
      return Bad(fqn, absl::StrCat(where, " has another number of dimensions than the size ",
                                   ShapeString(t.size)));
    }
    *volume = 1;
    for (size_t d = 0; d < t.size.size(); ++d) {
      if (c.offsets[d] < 0 || c.sizes[d] < 0 || c.offsets[d] > t.size[d] ||
          c.sizes[d] > t.size[d] - c.offsets[d]) {
        return Bad(fqn, absl::StrCat(where, " reaches outside the size ", ShapeString(t.size)));
      }
      *volume *= c.sizes[d];  // bounded by the tensor's element count, checked first
    }
    return absl::OkStatus();
  }

  // Sorted by their first offset, a chunk is compared only with those that start before it
  // ends in dimension 0 (no other one for dim-0 sharding, as FSDP's).
  absl::Status Disjoint(const std::string& fqn, const TensorStorageMetadata& t) const {
    std::vector<size_t> order(t.chunks.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](size_t a, size_t b) { return t.chunks[a].offsets[0] < t.chunks[b].offsets[0]; });
    for (size_t i = 0; i < order.size(); ++i) {
      const ChunkStorageMetadata& a = t.chunks[order[i]];
      for (size_t j = i + 1; j < order.size(); ++j) {
        const ChunkStorageMetadata& b = t.chunks[order[j]];
        if (b.offsets[0] >= a.offsets[0] + a.sizes[0]) break;
        bool overlap = true;
        for (size_t d = 0; d < t.size.size() && overlap; ++d) {
          overlap = std::max(a.offsets[d], b.offsets[d]) <
                    std::min(a.offsets[d] + a.sizes[d], b.offsets[d] + b.sizes[d]);
        }
        if (overlap) {
          return Bad(fqn, absl::StrCat("chunks ", order[i], " and ", order[j], " overlap"));
        }
      }
    }
    return absl::OkStatus();
  }

  // Chunks within the size, pairwise disjoint, covering it whole.
  absl::Status Tensor(const std::string& fqn, const TensorStorageMetadata& t) const {
    int64_t numel = 1;
    for (int64_t s : t.size) {
      if (s < 0 || __builtin_mul_overflow(numel, s, &numel)) {
        return Bad(fqn, absl::StrCat("size ", ShapeString(t.size), " is negative or too large"));
      }
    }
    int64_t bytes = 0;
    if (__builtin_mul_overflow(numel, static_cast<int64_t>(c10::elementSize(t.properties.dtype)),
                               &bytes)) {
      return Bad(fqn, absl::StrCat("size ", ShapeString(t.size), " is too large"));
    }
    int64_t covered = 0;
    for (size_t k = 0; k < t.chunks.size(); ++k) {
      int64_t volume = 0;
      FSDP_RETURN_IF_ERROR(Chunk(fqn, t, k, &volume));
      covered += volume;  // each at most numel, disjointness checked below
      if (covered > numel) break;
    }
    if (t.size.empty()) {
      if (t.chunks.size() != 1) return Bad(fqn, "a scalar saved in other than one chunk");
      return absl::OkStatus();
    }
    FSDP_RETURN_IF_ERROR(Disjoint(fqn, t));
    if (covered != numel) {
      return Bad(fqn, absl::StrCat("the chunks hold ", covered, " of the ", numel,
                                   " elements of size ", ShapeString(t.size)));
    }
    return absl::OkStatus();
  }

  // A chunk has storage, and unless transformed (compressed) at least its data's bytes: a
  // torch.save item holds them whole, so the tensors a reader allocates never exceed what the
  // files hold.
  absl::Status ChunkStorage(const std::string& fqn, const TensorStorageMetadata& t,
                            const ChunkStorageMetadata& c, const StorageInfo* s) const {
    const std::string where = absl::StrCat("chunk at ", ShapeString(c.offsets));
    if (s == nullptr) return Bad(fqn, absl::StrCat(where, " has no entry in storage_data"));
    int64_t bytes = static_cast<int64_t>(c10::elementSize(t.properties.dtype));
    for (int64_t n : c.sizes) bytes *= n;  // within the tensor's bytes, checked before
    if (s->transform_descriptors.empty() && s->length < bytes) {
      return Bad(fqn, absl::StrCat(where, " is stored in ", s->length, " bytes of ",
                                   Printable(s->relative_path), ", fewer than its ", bytes,
                                   " bytes of data"));
    }
    return absl::OkStatus();
  }

  absl::Status Storage(const MetadataIndex& index, const StorageInfo& s, const Metadata& m) const {
    const std::string where =
        absl::StrCat(file, ": storage of '", Printable(index.fqn), "'",
                     index.offset ? absl::StrCat(" at ", ShapeString(*index.offset)) : "");
    const StorageMetadata* entry = m.Find(index.fqn);
    if (entry == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": no such entry in state_dict_metadata"));
    }
    if (const auto* t = std::get_if<TensorStorageMetadata>(entry)) {
      const bool is_chunk =
          index.offset && std::any_of(t->chunks.begin(), t->chunks.end(),
                                      [&](const auto& c) { return c.offsets == *index.offset; });
      if (!is_chunk) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": the tensor has no chunk at that offset"));
      }
    } else if (index.offset) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": an offset for a bytes entry"));
    }
    const std::string& p = s.relative_path;
    if (p.empty() || p == "." || p == ".." || p.find('/') != std::string::npos ||
        p.find('\0') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": relative_path '", Printable(p), "' is not a file in the checkpoint directory"));
    }
    if (s.offset < 0 || s.length < 0 || s.offset > INT64_MAX - s.length) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " in ", Printable(p), ": offset ", s.offset, ", length ", s.length));
    }
    return absl::OkStatus();
  }
};

}  // namespace

const StorageMetadata* Metadata::Find(const std::string& fqn) const {
  auto it = state_dict_metadata.find(fqn);
  return it == state_dict_metadata.end() ? nullptr : &it->second;
}

const StorageInfo* Metadata::FindStorage(const std::string& fqn,
                                         const std::optional<std::vector<int64_t>>& offsets) const {
  auto it = storage_data.find(MetadataIndex{fqn, offsets, std::nullopt});
  return it == storage_data.end() ? nullptr : &it->second;
}

absl::Status ValidateMetadata(const Metadata& m, const std::string& file) {
  const Checker check{file};
  // The entries first, so that a damaged chunk is named as such, not as storage at no chunk.
  for (const auto& [fqn, entry] : m.state_dict_metadata) {
    if (const auto* t = std::get_if<TensorStorageMetadata>(&entry)) {
      FSDP_RETURN_IF_ERROR(check.Tensor(fqn, *t));
    }
  }
  for (const auto& [index, info] : m.storage_data) {
    FSDP_RETURN_IF_ERROR(check.Storage(index, info, m));
  }
  for (const auto& [fqn, entry] : m.state_dict_metadata) {
    if (const auto* t = std::get_if<TensorStorageMetadata>(&entry)) {
      for (const ChunkStorageMetadata& c : t->chunks) {
        FSDP_RETURN_IF_ERROR(check.ChunkStorage(fqn, *t, c, m.FindStorage(fqn, c.offsets)));
      }
    } else if (m.FindStorage(fqn, std::nullopt) == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": bytes entry '", Printable(fqn), "' has no entry in storage_data"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Metadata> ReadMetadataFile(const std::string& path) {
  FSDP_ASSIGN_OR_RETURN(std::unique_ptr<FileSource> source, FileSource::Open(path));
  std::string bytes(source->size(), '\0');
  FSDP_RETURN_IF_ERROR(source->ReadAt(0, bytes.size(), bytes.data()));
  return ParseMetadata(bytes, path);
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

}  // namespace fsdp::checkpoint::dcp
