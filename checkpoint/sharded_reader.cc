// See sharded_reader.h. Layout: Open (metadata.json), a data file's checks on first use,
// reads (ranges, whole tensors), Verify, and ReadFullContents.
#include "checkpoint/sharded_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "checkpoint/internal/sharded_helpers.h"
#include "checkpoint/sharded_metadata_json.h"
#include "comm/status_macros.h"
#include "nlohmann/json.hpp"

namespace fsdp::checkpoint {

using json = nlohmann::ordered_json;
using optim_state::StateValue;

ShardedCheckpointReader::~ShardedCheckpointReader() {
  for (int fd : fds_) {
    if (fd >= 0) close(fd);
  }
}

absl::StatusOr<std::unique_ptr<ShardedCheckpointReader>> ShardedCheckpointReader::Open(
    const std::string& dir) {
  std::unique_ptr<ShardedCheckpointReader> r(new ShardedCheckpointReader());
  r->dir_ = dir;
  const std::string path = JoinPath(dir, "metadata.json");
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat(path,
                                              ": no such file (not a sharded checkpoint, "
                                              "or a save that never completed)"));
    }
    return absl::InternalError(absl::StrCat("cannot open ", path, ": ", strerror(errno)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", strerror(errno)));
  }
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = read(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  close(fd);
  text.resize(done);
  r->stats_.bytes_read += static_cast<int64_t>(done);
  FSDP_ASSIGN_OR_RETURN(r->metadata_, MetadataFromJson(text, path));
  r->fds_.assign(r->metadata_.files.size(), -1);
  r->checked_.assign(r->metadata_.files.size(), false);
  return r;
}

absl::Status ShardedCheckpointReader::OpenFile(int file) {
  if (checked_[static_cast<size_t>(file)]) return absl::OkStatus();
  // A file that failed its checks before is opened and checked again (and reports the same
  // error); its earlier descriptor is closed first, not leaked (found by sharded_data_fuzz).
  if (fds_[static_cast<size_t>(file)] >= 0) {
    close(fds_[static_cast<size_t>(file)]);
    fds_[static_cast<size_t>(file)] = -1;
  }
  const FileRecord& f = metadata_.files[static_cast<size_t>(file)];
  const std::string path = JoinPath(dir_, f.name);
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat(path, ": no such file (the data file of rank ",
                                              f.rank, " of ", metadata_.world_size, ")"));
    }
    return absl::InternalError(absl::StrCat("cannot open ", path, ": ", strerror(errno)));
  }
  fds_[static_cast<size_t>(file)] = fd;
  ++stats_.files_opened;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", strerror(errno)));
  }
  if (st.st_size < f.size) {
    return absl::DataLossError(
        absl::StrCat(path, ": truncated: ", st.st_size, " bytes, metadata.json says ", f.size));
  }
  if (st.st_size > f.size) {
    return absl::DataLossError(absl::StrCat(path, ": ", st.st_size, " bytes, metadata.json says ",
                                            f.size, " (not the file this checkpoint wrote)"));
  }
  // The header: its length, then its checksum; a damaged one is diagnosed further.
  std::string head(static_cast<size_t>(f.header_bytes), '\0');
  FSDP_RETURN_IF_ERROR(PRead(file, 0, f.header_bytes, head.data()));
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i)
    len = (len << 8) | static_cast<unsigned char>(head[static_cast<size_t>(i)]);
  if (len != static_cast<uint64_t>(f.header_bytes - 8)) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", len,
                                            " disagrees with metadata.json (", f.header_bytes - 8,
                                            "): damaged or not this checkpoint's file"));
  }
  if (Xxh64(head.data(), head.size()) != f.header_xxh64) {
    json h = json::parse(head.begin() + 8, head.end(), nullptr, /*allow_exceptions=*/false);
    if (h.is_discarded() || !h.is_object()) {
      return absl::DataLossError(absl::StrCat(path, ": header JSON is damaged"));
    }
    if (h.contains("__metadata__") && h["__metadata__"].is_object() &&
        h["__metadata__"].contains("checkpoint_id") &&
        h["__metadata__"]["checkpoint_id"] != json(metadata_.checkpoint_id)) {
      return absl::DataLossError(absl::StrCat(
          path, ": belongs to another checkpoint (id ", h["__metadata__"]["checkpoint_id"].dump(),
          ", metadata.json's is \"", metadata_.checkpoint_id, "\")"));
    }
    return absl::DataLossError(absl::StrCat(path, ": header checksum mismatch (damaged)"));
  }
  checked_[static_cast<size_t>(file)] = true;
  return absl::OkStatus();
}

absl::Status ShardedCheckpointReader::PRead(int file, int64_t offset, int64_t bytes, char* out) {
  const int fd = fds_[static_cast<size_t>(file)];
  const std::string& name = metadata_.files[static_cast<size_t>(file)].name;
  while (bytes > 0) {
    const ssize_t n = pread(fd, out, static_cast<size_t>(bytes), offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(
          absl::StrCat("cannot read ", JoinPath(dir_, name), ": ", strerror(errno)));
    }
    if (n == 0) {
      return absl::DataLossError(
          absl::StrCat(JoinPath(dir_, name), ": truncated: nothing at byte ", offset));
    }
    stats_.bytes_read += n;
    out += n;
    offset += n;
    bytes -= n;
  }
  return absl::OkStatus();
}

absl::Status ShardedCheckpointReader::ReadRange(const TensorRecord& tensor, int64_t begin,
                                                int64_t end, at::Tensor& out) {
  const std::string what =
      absl::StrCat("reading '", tensor.key, "' elements ", RangeText(begin, end));
  if (begin < 0 || end < begin || end > tensor.numel()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": out of range of ", tensor.numel(), " elements"));
  }
  if (!out.defined() || !out.is_contiguous() || out.numel() != end - begin ||
      out.scalar_type() != tensor.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the output must be a contiguous ",
                                                   c10::toString(tensor.dtype), " tensor of ",
                                                   end - begin, " elements"));
  }
  const int64_t es = ElementSize(tensor.dtype);
  const int64_t bb = metadata_.block_bytes;
  char* dst = static_cast<char*>(out.data_ptr());
  for (const PieceRecord& p : tensor.pieces) {
    const int64_t ob = std::max(begin, p.begin);
    const int64_t oe = std::min(end, p.end);
    if (ob >= oe) continue;
    char* to = dst + (ob - begin) * es;
    if (p.file < 0) {
      std::memset(to, 0, static_cast<size_t>((oe - ob) * es));
      continue;
    }
    FSDP_RETURN_IF_ERROR(OpenFile(p.file), what);
    const std::string& name = metadata_.files[static_cast<size_t>(p.file)].name;
    // Bytes [rb, re) of the piece are wanted; they land at `to`. Block by block: a block the
    // range covers whole is read straight into its place in `out` and hashed there while it is
    // still in the cache; a block it covers in part (at most the first and the last) is read
    // into the scratch block and only its wanted part copied. Every block read is verified.
    const int64_t rb = (ob - p.begin) * es;
    const int64_t re = (oe - p.begin) * es;
    for (int64_t b = rb / bb; b * bb < re; ++b) {
      const int64_t block_begin = b * bb;
      const int64_t n = std::min(bb, p.bytes - block_begin);
      const bool whole = block_begin >= rb && block_begin + n <= re;
      char* into = whole ? to + (block_begin - rb) : Scratch(n);
      FSDP_RETURN_IF_ERROR(PRead(p.file, p.offset + block_begin, n, into), what);
      stats_.data_bytes_read += n;
      if (Xxh64(into, static_cast<size_t>(n)) != p.block_xxh64[static_cast<size_t>(b)]) {
        return absl::DataLossError(absl::StrCat(
            what, ": ", JoinPath(dir_, name), ": checksum mismatch in bytes ",
            RangeText(p.offset + block_begin, p.offset + block_begin + n), " (damaged)"));
      }
      if (!whole) {
        const int64_t from = std::max(rb, block_begin);
        const int64_t upto = std::min(re, block_begin + n);
        std::memcpy(to + (from - rb), into + (from - block_begin),
                    static_cast<size_t>(upto - from));
      }
    }
  }
  return absl::OkStatus();
}

char* ShardedCheckpointReader::Scratch(int64_t bytes) {
  // Grown to the largest partly read block (no more than a block of a piece whose file is
  // checked to hold it), uninitialised: it is always read into before use.
  if (scratch_bytes_ < bytes) {
    scratch_.reset(new char[static_cast<size_t>(bytes)]);
    scratch_bytes_ = bytes;
  }
  return scratch_.get();
}

absl::StatusOr<at::Tensor> ShardedCheckpointReader::ReadTensor(const TensorRecord& tensor) {
  // The tensor is allocated whole before it is read: first check the files that back its size
  // against their real sizes (its pieces' files; for zeros, those of the parameter it mirrors,
  // see Validate), so that metadata.json's claims alone never size an allocation.
  const TensorRecord* param = &tensor;
  for (const PieceRecord& p : tensor.pieces) {
    if (p.file == -1) param = metadata_.FindTensor(absl::StrCat("model/", tensor.fqn));
  }
  for (const TensorRecord* t : {&tensor, param}) {
    for (const PieceRecord& p : t->pieces) {
      if (p.file >= 0) {
        FSDP_RETURN_IF_ERROR(OpenFile(p.file), absl::StrCat("reading '", tensor.key, "'"));
      }
    }
  }
  at::Tensor out = at::empty({tensor.numel()}, at::TensorOptions().dtype(tensor.dtype));
  FSDP_RETURN_IF_ERROR(ReadRange(tensor, 0, tensor.numel(), out));
  return out.view(tensor.shape);
}

absl::StatusOr<std::vector<ShardedCheckpointReader::BadRange>> ShardedCheckpointReader::Verify() {
  std::vector<BadRange> bad;
  const int64_t bb = metadata_.block_bytes;
  for (size_t file = 0; file < metadata_.files.size(); ++file) {
    const FileRecord& f = metadata_.files[file];
    absl::Status opened = OpenFile(static_cast<int>(file));
    int64_t actual_size = f.size;
    if (!opened.ok()) {
      bad.push_back(BadRange{f.name, 0, f.size, "", std::string(opened.message())});
      if (fds_[file] < 0) continue;  // missing: nothing more to check
      struct stat st;
      if (fstat(fds_[file], &st) == 0) actual_size = st.st_size;
    }
    for (const TensorRecord& t : metadata_.tensors) {
      for (const PieceRecord& p : t.pieces) {
        if (p.file != static_cast<int>(file)) continue;
        std::string buffer;
        int64_t bad_begin = -1;
        auto flush = [&](int64_t upto) {
          if (bad_begin < 0) return;
          bad.push_back(
              BadRange{f.name, p.offset + bad_begin, upto - bad_begin, t.key, "checksum mismatch"});
          bad_begin = -1;
        };
        for (int64_t b = 0; b * bb < p.bytes; ++b) {
          const int64_t n = std::min(bb, p.bytes - b * bb);
          bool ok = p.offset + b * bb + n <= actual_size;
          if (ok) {
            buffer.resize(static_cast<size_t>(n));
            ok = PRead(static_cast<int>(file), p.offset + b * bb, n, buffer.data()).ok() &&
                 Xxh64(buffer.data(), static_cast<size_t>(n)) ==
                     p.block_xxh64[static_cast<size_t>(b)];
          }
          if (!ok && bad_begin < 0) bad_begin = b * bb;
          if (ok) flush(b * bb);
        }
        flush(p.bytes);
      }
    }
  }
  return bad;
}

// ---------------------------------------------------------------- whole checkpoints

absl::StatusOr<FullContents> ReadFullContents(ShardedCheckpointReader& reader) {
  const ShardedMetadata& m = reader.metadata();
  FullContents out;
  std::map<std::string, at::Tensor> model_tensors;
  for (const auto& [key, stored] : m.model_keys) {
    auto it = model_tensors.find(stored);
    if (it == model_tensors.end()) {
      FSDP_ASSIGN_OR_RETURN(at::Tensor t,
                            reader.ReadTensor(*m.FindTensor(absl::StrCat("model/", stored))));
      it = model_tensors.emplace(stored, t).first;
    }
    out.model.emplace_back(key, it->second);
  }
  out.has_optim = m.has_optim;
  if (!m.has_optim) return out;
  out.optim.has_param_groups = m.optim.has_param_groups;
  out.optim.param_groups = m.optim.param_groups;
  for (const OptimParamRecord& p : m.optim.state) {
    // full_optim_state_dict's order: positive-dimension tensors, zero-dimension tensors, then
    // the other values, each by name.
    std::vector<std::pair<std::string, StateValue>> pos, zero, other;
    for (const OptimValueRecord& v : p.values) {
      if (v.is_tensor) {
        FSDP_ASSIGN_OR_RETURN(at::Tensor t, reader.ReadTensor(*m.FindTensor(v.tensor_key)));
        pos.emplace_back(v.name, StateValue(t));
      } else if (const at::Tensor* t = v.value.GetIf<at::Tensor>()) {
        zero.emplace_back(v.name, StateValue(*t));
      } else {
        other.emplace_back(v.name, v.value);
      }
    }
    optim_state::ParamState state;
    for (auto* list : {&pos, &zero, &other}) {
      std::sort(list->begin(), list->end(),
                [](const auto& a, const auto& b) { return a.first < b.first; });
      for (auto& [name, value] : *list) state.Set(name, std::move(value));
    }
    out.optim.state.Set(optim_state::ParamKey::Fqn(p.fqn), std::move(state));
  }
  return out;
}

}  // namespace fsdp::checkpoint
