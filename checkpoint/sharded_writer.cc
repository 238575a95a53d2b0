// See sharded_writer.h. Layout: one data file (its header, then its pieces written and
// checksummed block by block); a whole checkpoint from whole tensors (each split into even
// element ranges, one per rank file), step by step.
#include "checkpoint/sharded_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/internal/sharded_helpers.h"
#include "checkpoint/sharded_metadata_json.h"
#include "comm/status_macros.h"
#include "nlohmann/json.hpp"

namespace fsdp::checkpoint {

using json = nlohmann::ordered_json;
using optim_state::ParamGroup;

namespace {

// ---------------------------------------------------------------- data files

// The file's header (8-byte length, then the JSON padded to a multiple of 8) and each piece's
// elements as one contiguous tensor, in order.
absl::StatusOr<std::string> DataFileHeader(const std::string& path,
                                           const std::vector<PieceToWrite>& pieces,
                                           const std::map<std::string, std::string>& metadata,
                                           std::vector<at::Tensor>& contiguous) {
  json header;
  std::set<std::string> keys;
  int64_t data_bytes = 0;
  for (const PieceToWrite& p : pieces) {
    if (!keys.insert(p.key).second) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": key '", p.key, "' given twice"));
    }
    absl::StatusOr<std::string> dtype = SafetensorsDtype(p.data.scalar_type());
    if (!dtype.ok()) return Annotate(dtype.status(), absl::StrCat(path, ": '", p.key, "'"));
    at::Tensor c = p.data.detach().reshape({-1}).contiguous();
    const int64_t nbytes = c.numel() * ElementSize(c.scalar_type());
    header[p.key] = json{{"dtype", *dtype},
                         {"shape", json::array({c.numel()})},
                         {"data_offsets", json::array({data_bytes, data_bytes + nbytes})}};
    data_bytes += nbytes;
    contiguous.push_back(std::move(c));
  }
  json meta = json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  header["__metadata__"] = std::move(meta);
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  std::string head(8, '\0');
  uint64_t len = text.size();
  for (int i = 0; i < 8; ++i)
    head[static_cast<size_t>(i)] = static_cast<char>((len >> (8 * i)) & 0xff);
  head += text;
  return head;
}

absl::Status WriteAll(int fd, const std::string& path, const char* data, int64_t n) {
  while (n > 0) {
    const ssize_t w = write(fd, data, static_cast<size_t>(n));
    if (w < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("cannot write ", path, ": ", strerror(errno)));
    }
    data += w;
    n -= w;
  }
  return absl::OkStatus();
}

// Writes the pieces after the header, each piece's checksums computed block by block, into
// out.pieces; returns the file's size, or the first write error.
absl::StatusOr<int64_t> WritePieces(int fd, const std::string& path,
                                    const std::vector<PieceToWrite>& pieces,
                                    const std::vector<at::Tensor>& contiguous, int64_t block_bytes,
                                    WrittenFile& out) {
  int64_t offset = out.header_bytes;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const at::Tensor& c = contiguous[i];
    const char* data = static_cast<const char*>(c.data_ptr());
    const int64_t nbytes = c.numel() * ElementSize(c.scalar_type());
    WrittenPiece wp;
    wp.key = pieces[i].key;
    wp.offset = offset;
    wp.bytes = nbytes;
    for (int64_t b = 0; b < nbytes; b += block_bytes) {
      wp.block_xxh64.push_back(
          Xxh64(data + b, static_cast<size_t>(std::min(block_bytes, nbytes - b))));
    }
    const absl::Status status = WriteAll(fd, path, data, nbytes);
    offset += nbytes;
    out.pieces.push_back(std::move(wp));
    if (i + 1 == pieces.size() / 2) CrashPoint("data file half written");
    if (!status.ok()) return status;
  }
  return offset;
}

// ---------------------------------------------------------------- whole checkpoints

// WriteShardedFromFull's checkpoint as it is assembled: the metadata, and each rank's pieces.
struct EvenSplit {
  ShardedMetadata m;
  std::vector<std::vector<PieceToWrite>> per_rank;
};

// The first element of rank r's range of n elements: the first n % world_size ranges are one
// element longer.
int64_t EvenRangeBegin(int64_t n, int world_size, int r) {
  return n / world_size * r + std::min<int64_t>(r, n % world_size);
}

absl::Status AddEvenlySplitTensor(EvenSplit& plan, TensorRecord record, const at::Tensor& t) {
  const int world_size = plan.m.world_size;
  record.shape = t.sizes().vec();
  record.dtype = t.scalar_type();
  FSDP_RETURN_IF_ERROR(SafetensorsDtype(t.scalar_type()).status(), record.key);
  const at::Tensor flat = t.detach().reshape({-1});
  const int64_t n = flat.numel();
  for (int r = 0; r < world_size; ++r) {
    const int64_t b = EvenRangeBegin(n, world_size, r);
    const int64_t e = b + n / world_size + (r < n % world_size ? 1 : 0);
    if (e > b) {
      plan.per_rank[static_cast<size_t>(r)].push_back(
          PieceToWrite{record.key, flat.slice(0, b, e)});
    }
  }
  plan.m.tensors.push_back(std::move(record));
  return absl::OkStatus();
}

// Model tensors, each stored once under the first key that holds it.
absl::Status AddModel(EvenSplit& plan,
                      const std::vector<std::pair<std::string, at::Tensor>>& model) {
  std::map<const c10::TensorImpl*, std::string> stored_as;
  for (const auto& [key, t] : model) {
    if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat("'", key, "' is undefined"));
    auto it = stored_as.find(t.unsafeGetTensorImpl());
    if (it != stored_as.end()) {
      plan.m.model_keys.emplace_back(key, it->second);
      continue;
    }
    stored_as[t.unsafeGetTensorImpl()] = key;
    plan.m.model_keys.emplace_back(key, key);
    TensorRecord r;
    r.key = absl::StrCat("model/", key);
    r.fqn = key;
    FSDP_RETURN_IF_ERROR(AddEvenlySplitTensor(plan, std::move(r), t));
  }
  return absl::OkStatus();
}

// One parameter's optimizer state: positive-dimension tensors stored, the rest as values.
absl::StatusOr<OptimParamRecord> AddOptimParam(EvenSplit& plan, const std::string& fqn,
                                               const optim_state::ParamState& state) {
  OptimParamRecord p;
  p.fqn = fqn;
  for (const auto& [name, value] : state) {
    OptimValueRecord v;
    v.name = name;
    const at::Tensor* t = value.GetIf<at::Tensor>();
    if (t != nullptr && t->defined() && t->dim() > 0) {
      v.is_tensor = true;
      v.tensor_key = absl::StrCat("optim/", p.fqn, "/", name);
      TensorRecord r;
      r.key = v.tensor_key;
      r.is_optim = true;
      r.fqn = p.fqn;
      r.state = name;
      FSDP_RETURN_IF_ERROR(AddEvenlySplitTensor(plan, std::move(r), *t));
    } else {
      FSDP_RETURN_IF_ERROR(StateValueToJson(value).status(),
                           absl::StrCat("optimizer state '", name, "' of '", p.fqn, "'"));
      v.value = value;
    }
    p.values.push_back(std::move(v));
  }
  return p;
}

absl::Status AddOptim(EvenSplit& plan, const optim_state::OptimStateDict& optim) {
  ShardedMetadata& m = plan.m;
  m.has_optim = true;
  m.optim.has_param_groups = optim.has_param_groups;
  m.optim.param_groups = optim.param_groups;
  for (const auto& [key, state] : optim.state) {
    if (!key.is_fqn()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "optimizer state key ", key.ToString(), " is an ID; a sharded checkpoint is FQN-keyed"));
    }
    FSDP_ASSIGN_OR_RETURN(OptimParamRecord p, AddOptimParam(plan, key.fqn(), state));
    m.optim.state.push_back(std::move(p));
  }
  for (const ParamGroup& g : m.optim.param_groups) {
    for (const auto& k : g.params) {
      if (!k.is_fqn()) {
        return absl::InvalidArgumentError(
            "param_groups list IDs; a sharded checkpoint is FQN-keyed");
      }
    }
  }
  return absl::OkStatus();
}

// Rank r's data file into `staging`, and its file and pieces into the metadata.
absl::Status WriteRankFile(EvenSplit& plan, const std::string& staging, int r) {
  ShardedMetadata& m = plan.m;
  const int world_size = m.world_size;
  FileRecord f;
  f.name = DataFileName(r, world_size);
  f.rank = r;
  const auto& pieces = plan.per_rank[static_cast<size_t>(r)];
  FSDP_ASSIGN_OR_RETURN(WrittenFile w,
                        WriteDataFile(JoinPath(staging, f.name), pieces,
                                      {{"format", std::string(kShardedFormatName)},
                                       {"version", absl::StrCat(kShardedFormatVersion)},
                                       {"checkpoint_id", m.checkpoint_id},
                                       {"rank", absl::StrCat(r)},
                                       {"world_size", absl::StrCat(world_size)}},
                                      m.block_bytes));
  f.size = w.size;
  f.header_bytes = w.header_bytes;
  f.header_xxh64 = w.header_xxh64;
  m.files.push_back(f);
  std::map<std::string, TensorRecord*> by_key;
  for (TensorRecord& t : m.tensors) by_key[t.key] = &t;
  for (size_t i = 0; i < pieces.size(); ++i) {
    PieceRecord p;
    p.file = r;
    p.offset = w.pieces[i].offset;
    p.bytes = w.pieces[i].bytes;
    p.block_xxh64 = w.pieces[i].block_xxh64;
    TensorRecord* t = by_key[pieces[i].key];
    p.begin = EvenRangeBegin(t->numel(), world_size, r);
    p.end = p.begin + pieces[i].data.numel();
    t->pieces.push_back(std::move(p));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<WrittenFile> WriteDataFile(const std::string& path,
                                          const std::vector<PieceToWrite>& pieces,
                                          const std::map<std::string, std::string>& header_metadata,
                                          int64_t block_bytes) {
  if (block_bytes < 1) return absl::InvalidArgumentError("block_bytes must be positive");
  std::vector<at::Tensor> contiguous;
  FSDP_ASSIGN_OR_RETURN(const std::string head,
                        DataFileHeader(path, pieces, header_metadata, contiguous));
  WrittenFile out;
  out.header_bytes = static_cast<int64_t>(head.size());
  out.header_xxh64 = Xxh64(head.data(), head.size());
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    return absl::InternalError(absl::StrCat("cannot create ", path, ": ", strerror(errno)));
  absl::Status status = WriteAll(fd, path, head.data(), static_cast<int64_t>(head.size()));
  int64_t size = 0;
  if (status.ok()) {
    absl::StatusOr<int64_t> written = WritePieces(fd, path, pieces, contiguous, block_bytes, out);
    if (written.ok()) {
      size = *written;
    } else {
      status = written.status();
    }
  }
  if (status.ok()) {
    CrashPoint("data file written");
    if (fsync(fd) != 0) {
      status = absl::InternalError(absl::StrCat("cannot fsync ", path, ": ", strerror(errno)));
    }
  }
  if (close(fd) != 0 && status.ok()) {
    status = absl::InternalError(absl::StrCat("cannot close ", path, ": ", strerror(errno)));
  }
  if (!status.ok()) return status;
  CrashPoint("data file fsynced");
  out.size = size;
  return out;
}

absl::Status WriteShardedFromFull(const std::string& dir,
                                  const std::vector<std::pair<std::string, at::Tensor>>& model,
                                  const optim_state::OptimStateDict* optim, int world_size,
                                  int64_t block_bytes) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size ", world_size, " is not positive"));
  }
  EvenSplit plan;
  plan.m.checkpoint_id = RandomNonce();
  plan.m.world_size = world_size;
  plan.m.saved_with["written_by"] = "WriteShardedFromFull (even element ranges)";
  plan.m.block_bytes = block_bytes;
  plan.per_rank.resize(static_cast<size_t>(world_size));
  FSDP_RETURN_IF_ERROR(AddModel(plan, model));
  if (optim != nullptr) FSDP_RETURN_IF_ERROR(AddOptim(plan, *optim));
  FSDP_ASSIGN_OR_RETURN(std::string staging, CreateStagingDir(dir));
  for (int r = 0; r < world_size; ++r) FSDP_RETURN_IF_ERROR(WriteRankFile(plan, staging, r));
  FSDP_RETURN_IF_ERROR(FinalizeMetadata(plan.m));
  FSDP_RETURN_IF_ERROR(
      WriteFileDurably(JoinPath(staging, "metadata.json"), MetadataToJson(plan.m)));
  return CommitStagingDir(staging, dir);
}

}  // namespace fsdp::checkpoint
