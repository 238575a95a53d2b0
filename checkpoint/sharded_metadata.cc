// See sharded_metadata.h. The dtype names and small helpers, the checks of ValidateMetadata
// (files; each tensor's shape and pieces; the bytes claimed; references), and FinalizeMetadata.
#include "checkpoint/sharded_metadata.h"

#include <xxhash.h>

#include <algorithm>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "checkpoint/internal/sharded_helpers.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint {

std::string DataFileName(int rank, int world_size) {
  return absl::StrCat("rank-", rank, "-of-", world_size, ".safetensors");
}

namespace {

constexpr std::pair<const char*, at::ScalarType> kSafetensorsTypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool}};

}  // namespace

absl::StatusOr<std::string> SafetensorsDtype(at::ScalarType type) {
  for (const auto& [name, t] : kSafetensorsTypes) {
    if (type == t) return std::string(name);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("dtype ", c10::toString(type), " has no safetensors name"));
}

absl::StatusOr<at::ScalarType> ScalarTypeFromSafetensors(absl::string_view name) {
  for (const auto& [n, t] : kSafetensorsTypes) {
    if (name == n) return t;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", name, "\""));
}

uint64_t Xxh64(const void* data, size_t bytes) { return XXH64(data, bytes, 0); }

int64_t TensorRecord::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const TensorRecord* ShardedMetadata::FindTensor(const std::string& key) const {
  for (const TensorRecord& t : tensors) {
    if (t.key == key) return &t;
  }
  return nullptr;
}

namespace {

constexpr int64_t kMaxHeaderBytes = int64_t{256} << 20;
constexpr int64_t kMaxNumel = int64_t{1} << 56;

// Builds the INVALID_ARGUMENT errors of one validation, each opening with `where`.
struct Invalid {
  const std::string& where;
  absl::Status operator()(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", what));
  }
};

absl::Status ValidateFiles(const ShardedMetadata& m, const Invalid& bad) {
  std::set<std::string> names;
  for (const FileRecord& f : m.files) {
    if (f.name.empty() || f.name.find('/') != std::string::npos || f.name[0] == '.') {
      return bad(absl::StrCat("file name '", f.name, "' is not a plain file name"));
    }
    if (!names.insert(f.name).second) return bad(absl::StrCat("file '", f.name, "' listed twice"));
    if (f.header_bytes < 8 || f.header_bytes > kMaxHeaderBytes || f.size < f.header_bytes) {
      return bad(absl::StrCat("file '", f.name, "': header of ", f.header_bytes,
                              " bytes in a file of ", f.size, " bytes is out of bounds"));
    }
  }
  return absl::OkStatus();
}

// The tensor's shape, bounded; returns its element count.
absl::StatusOr<int64_t> ValidateShape(const TensorRecord& t, const std::string& tw,
                                      const Invalid& bad) {
  if (t.shape.size() > 64) return bad(absl::StrCat(tw, ": too many dimensions"));
  int64_t numel = 1;
  for (int64_t d : t.shape) {
    if (d < 0) return bad(absl::StrCat(tw, ": negative dimension ", d));
    if (d > 0 && numel > kMaxNumel / d) return bad(absl::StrCat(tw, ": shape too large"));
    numel *= d;
  }
  return numel;
}

// One stored piece (not zeros): its file, its size in bytes, its place and its checksums.
absl::Status ValidateStoredPiece(const ShardedMetadata& m, const TensorRecord& t,
                                 const PieceRecord& p, const std::string& pw, const Invalid& bad) {
  if (p.file < 0 || p.file >= static_cast<int>(m.files.size())) {
    return bad(absl::StrCat(pw, ": file index ", p.file, " is out of range"));
  }
  const FileRecord& f = m.files[static_cast<size_t>(p.file)];
  const int64_t es = ElementSize(t.dtype);
  if (p.bytes != (p.end - p.begin) * es) {
    return bad(absl::StrCat(pw, ": ", p.bytes, " bytes for ", p.end - p.begin, " elements of ", es,
                            " bytes"));
  }
  if (p.offset < f.header_bytes || p.offset > f.size || p.bytes > f.size - p.offset) {
    // (Not offset + bytes: the claims may be anything, and their sum overflow.)
    return bad(absl::StrCat(pw, ": ", p.bytes, " bytes at offset ", p.offset,
                            " lie outside the data of '", f.name, "' (", f.size, " bytes)"));
  }
  const int64_t blocks = (p.bytes + m.block_bytes - 1) / m.block_bytes;
  if (static_cast<int64_t>(p.block_xxh64.size()) != blocks) {
    return bad(absl::StrCat(pw, ": ", p.block_xxh64.size(), " checksums for ", blocks, " blocks"));
  }
  return absl::OkStatus();
}

// A tensor's key, shape and pieces, which must tile [0, numel).
absl::Status ValidateTensor(const ShardedMetadata& m, const TensorRecord& t, const Invalid& bad) {
  const std::string tw = absl::StrCat("tensor '", t.key, "'");
  const std::string expected_key =
      t.is_optim ? absl::StrCat("optim/", t.fqn, "/", t.state) : absl::StrCat("model/", t.fqn);
  if (t.key != expected_key) return bad(absl::StrCat(tw, " does not match its fqn/state"));
  FSDP_ASSIGN_OR_RETURN(const int64_t numel, ValidateShape(t, tw, bad));
  int64_t next = 0;
  for (const PieceRecord& p : t.pieces) {
    const std::string pw = absl::StrCat(tw, ": piece ", RangeText(p.begin, p.end));
    if (p.begin != next || p.end < p.begin || p.end > numel) {
      return bad(absl::StrCat(tw, ": pieces do not tile [0, ", numel, "): expected one at ", next,
                              ", found ", RangeText(p.begin, p.end)));
    }
    next = p.end;
    if (p.file == -1) {
      if (!t.is_optim || p.bytes != 0 || !p.block_xxh64.empty()) {
        return bad(absl::StrCat(pw, ": a zero piece must be optimizer state without bytes"));
      }
      continue;
    }
    FSDP_RETURN_IF_ERROR(ValidateStoredPiece(m, t, p, pw, bad));
  }
  if (next != numel) {
    return bad(absl::StrCat(tw, ": pieces cover [0, ", next, ") of [0, ", numel, ")"));
  }
  return absl::OkStatus();
}

// Sizes in metadata.json are claims that the reader allocates by. Each byte of a data file
// belongs to at most one piece, so the bytes of all pieces are at most the files' sizes (which
// the reader checks against the real files before reading); and zeros stand only for state of
// a stored parameter, with its shape, so they are no larger than it (found by
// sharded_data_fuzz: either made a few hundred bytes of metadata.json cost gigabytes).
absl::Status ValidateClaimedBytes(const ShardedMetadata& m, const Invalid& bad) {
  std::vector<std::tuple<int, int64_t, int64_t, const TensorRecord*>> extents;
  for (const TensorRecord& t : m.tensors) {
    bool zeros = false;
    for (const PieceRecord& p : t.pieces) {
      if (p.file == -1) zeros = true;
      if (p.file >= 0 && p.bytes > 0) extents.emplace_back(p.file, p.offset, p.bytes, &t);
    }
    if (!zeros) continue;
    const TensorRecord* param = m.FindTensor(absl::StrCat("model/", t.fqn));
    if (param == nullptr || param->numel() != t.numel()) {
      return bad(absl::StrCat("tensor '", t.key,
                              "' holds zeros (state no rank held) but is not shaped as the stored "
                              "parameter 'model/",
                              t.fqn, "'"));
    }
  }
  std::sort(extents.begin(), extents.end(), [](const auto& a, const auto& b) {
    return std::tie(std::get<0>(a), std::get<1>(a)) < std::tie(std::get<0>(b), std::get<1>(b));
  });
  for (size_t i = 1; i < extents.size(); ++i) {
    const auto& [file, offset, bytes, t] = extents[i];
    const auto& [prev_file, prev_offset, prev_bytes, prev_t] = extents[i - 1];
    if (file == prev_file && offset < prev_offset + prev_bytes) {
      return bad(absl::StrCat("tensor '", t->key, "': bytes ", RangeText(offset, offset + bytes),
                              " of '", m.files[static_cast<size_t>(file)].name,
                              "' overlap those of tensor '", prev_t->key, "'"));
    }
  }
  return absl::OkStatus();
}

// model_keys and the optimizer's tensor values name stored tensors of their kind.
absl::Status ValidateReferences(const ShardedMetadata& m, const Invalid& bad) {
  for (const auto& [key, stored] : m.model_keys) {
    const TensorRecord* t = m.FindTensor(absl::StrCat("model/", stored));
    if (t == nullptr) {
      return bad(absl::StrCat("model key '", key, "' refers to '", stored,
                              "', which is not a stored model tensor"));
    }
  }
  if (!m.has_optim) return absl::OkStatus();
  for (const OptimParamRecord& p : m.optim.state) {
    for (const OptimValueRecord& v : p.values) {
      if (!v.is_tensor) continue;
      const TensorRecord* t = m.FindTensor(v.tensor_key);
      if (t == nullptr || !t->is_optim) {
        return bad(absl::StrCat("optimizer state '", v.name, "' of '", p.fqn, "' refers to '",
                                v.tensor_key, "', which is not a stored optimizer tensor"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateMetadata(const ShardedMetadata& m, const std::string& where) {
  const Invalid bad{where};
  if (m.world_size < 1) return bad(absl::StrCat("world_size ", m.world_size, " is not positive"));
  if (m.block_bytes < 1 || m.block_bytes > (int64_t{1} << 40)) {
    return bad(absl::StrCat("block_bytes ", m.block_bytes, " is out of range"));
  }
  FSDP_RETURN_IF_ERROR(ValidateFiles(m, bad));
  std::set<std::string> keys;
  for (const TensorRecord& t : m.tensors) {
    if (!keys.insert(t.key).second) return bad(absl::StrCat("tensor '", t.key, "' listed twice"));
    FSDP_RETURN_IF_ERROR(ValidateTensor(m, t, bad));
  }
  FSDP_RETURN_IF_ERROR(ValidateClaimedBytes(m, bad));
  return ValidateReferences(m, bad);
}

absl::Status FinalizeMetadata(ShardedMetadata& m) {
  for (TensorRecord& t : m.tensors) {
    std::sort(t.pieces.begin(), t.pieces.end(),
              [](const PieceRecord& a, const PieceRecord& b) { return a.begin < b.begin; });
    if (!t.is_optim) continue;
    // Optimizer state of ranges that no rank held state for (use_orig_params: a slice that
    // got no gradient) is zeros, as FSDP fills it when flattening.
    std::vector<PieceRecord> filled;
    int64_t next = 0;
    for (PieceRecord& p : t.pieces) {
      if (p.begin > next) filled.push_back(PieceRecord{-1, next, p.begin, 0, 0, {}});
      next = std::max(next, p.end);
      filled.push_back(std::move(p));
    }
    if (next < t.numel()) filled.push_back(PieceRecord{-1, next, t.numel(), 0, 0, {}});
    t.pieces = std::move(filled);
  }
  return ValidateMetadata(m, "sharded checkpoint metadata being saved");
}

}  // namespace fsdp::checkpoint
