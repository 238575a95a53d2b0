// See dcp_writer.h.
#include "checkpoint/dcp_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/dcp_layout.h"
#include "checkpoint/internal/file_bytes.h"
#include "checkpoint/internal/pickle_writer.h"
#include "checkpoint/internal/torch_dtype_names.h"
#include "checkpoint/internal/torch_save_archive.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint::dcp {
namespace {

constexpr char kMetadataModule[] = "torch.distributed.checkpoint.metadata";
// metadata.py's CURRENT_DCP_VERSION in PyTorch 2.13.
constexpr char kDcpVersion[] = "1.0.0";

absl::Status Errno(const char* what, const std::string& path) {
  return absl::InternalError(absl::StrCat("cannot ", what, " ", path, ": ", strerror(errno)));
}

using internal::PickleWriter;

// The dataclass `name`: NEWOBJ, then its state, a dict of n fields (each key then value,
// written by the caller between Begin and End), then BUILD.
void BeginDataclass(PickleWriter& p, const char* module, const char* name, size_t n) {
  p.NewObj(module, name);
  p.DictBegin(n);
}
void EndDataclass(PickleWriter& p, size_t n) {
  p.DictEnd(n);
  p.Build();
}

// `value`, written by `write`, or None.
template <typename T, typename Write>
void OrNone(PickleWriter& p, const std::optional<T>& value, Write write) {
  if (value) {
    write(*value);
  } else {
    p.None();
  }
}

absl::Status WriteTensorEntry(PickleWriter& p, const TensorStorageMetadata& t) {
  BeginDataclass(p, kMetadataModule, "TensorStorageMetadata", 3);
  p.Str("properties");
  // TensorProperties pickles its state as the tuple (dtype, layout, requires_grad,
  // _MEM_FORMAT_ENCODING, pin_memory) (its __getstate__).
  p.NewObj(kMetadataModule, "TensorProperties");
  p.TupleBegin(5);
  FSDP_ASSIGN_OR_RETURN(const std::string dtype, DtypeGlobal(t.properties.dtype));
  p.Global("torch", dtype.substr(sizeof("torch.") - 1));
  p.Global("torch.serialization", "_get_layout");
  p.TupleBegin(1);
  p.Str(t.properties.layout);
  p.TupleEnd(1);
  p.Reduce();
  p.Bool(t.properties.requires_grad);
  p.Global(kMetadataModule, "_MEM_FORMAT_ENCODING");
  p.TupleBegin(1);
  p.Int(static_cast<int64_t>(t.properties.memory_format));
  p.TupleEnd(1);
  p.Reduce();
  p.Bool(t.properties.pin_memory);
  p.TupleEnd(5);
  p.Build();
  p.Str("size");
  p.Size(t.size);
  p.Str("chunks");
  p.ListBegin(t.chunks.size());
  for (const ChunkStorageMetadata& c : t.chunks) {
    BeginDataclass(p, kMetadataModule, "ChunkStorageMetadata", 2);
    p.Str("offsets");
    p.Size(c.offsets);
    p.Str("sizes");
    p.Size(c.sizes);
    EndDataclass(p, 2);
  }
  p.ListEnd(t.chunks.size());
  EndDataclass(p, 3);
  return absl::OkStatus();
}

void WriteStorageEntry(PickleWriter& p, const MetadataIndex& index, const StorageInfo& s) {
  BeginDataclass(p, kMetadataModule, "MetadataIndex", 3);
  p.Str("fqn");
  p.Str(index.fqn);
  p.Str("offset");
  OrNone(p, index.offset, [&](const std::vector<int64_t>& o) { p.Size(o); });
  p.Str("index");
  OrNone(p, index.index, [&](int64_t i) { p.Int(i); });
  EndDataclass(p, 3);
  // _StorageInfo's __getstate__ leaves transform_descriptors out when there are none.
  BeginDataclass(p, "torch.distributed.checkpoint.filesystem", "_StorageInfo", 3);
  p.Str("relative_path");
  p.Str(s.relative_path);
  p.Str("offset");
  p.Int(s.offset);
  p.Str("length");
  p.Int(s.length);
  EndDataclass(p, 3);
}

void WriteStorageMeta(PickleWriter& p, const std::optional<StorageMeta>& meta) {
  if (!meta) {
    p.None();
    return;
  }
  BeginDataclass(p, kMetadataModule, "StorageMeta", 4);
  for (const auto& [name, value] :
       {std::pair{"checkpoint_id", &meta->checkpoint_id}, std::pair{"save_id", &meta->save_id},
        std::pair{"load_id", &meta->load_id}}) {
    p.Str(name);
    OrNone(p, *value, [&](const std::string& v) { p.Str(v); });
  }
  p.Str("modules");
  p.ListBegin(meta->modules.size());
  for (const std::string& m : meta->modules) p.Str(m);
  p.ListEnd(meta->modules.size());
  EndDataclass(p, 4);
}

// Appends one torch.save archive (data.pkl `pickle`, the storage of `tensor` if defined) to
// `fd`; its length.
absl::StatusOr<int64_t> AppendItem(int fd, std::string pickle, const at::Tensor& tensor,
                                   const std::string& name) {
  internal::Pickled pickled;
  pickled.pickle.assign(pickle.begin(), pickle.end());
  if (tensor.defined()) pickled.storages.push_back(tensor);
  return internal::AppendArchive(fd, pickled, internal::ArchiveRecords::kTorchSave, name);
}

// The chunk as a tensor whose storage holds exactly its elements (torch.save writes whole
// storages): an alias of a contiguous view's memory, else a contiguous copy.
absl::StatusOr<at::Tensor> MinimalStorage(const at::Tensor& data, const std::string& name) {
  if (!data.device().is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": the chunk is on ", data.device().str(), ", not the CPU"));
  }
  return CallTorch(name, [&] {
    const at::Tensor c = data.detach().contiguous();
    if (c.storage().nbytes() == c.nbytes() && c.storage_offset() == 0) return c;
    return at::from_blob(
        c.data_ptr(), c.sizes(), [keep = c](void*) {}, c.options());
  });
}

}  // namespace

absl::StatusOr<std::string> DtypeGlobal(at::ScalarType dtype) {
  for (const TorchDtypeName& t : kTorchDtypeNames) {
    if (t.dtype == dtype) return std::string(t.global);
  }
  return absl::InvalidArgumentError(absl::StrCat("dtype ", std::string(c10::toString(dtype)),
                                                 " cannot be stored in a DCP checkpoint"));
}

std::string DistcpFileName(int rank, int n) { return absl::StrCat("__", rank, "_", n, ".distcp"); }

absl::StatusOr<std::vector<WrittenItem>> WriteDistcpFile(const std::string& dir,
                                                         const std::string& name,
                                                         const std::vector<BytesToWrite>& bytes,
                                                         const std::vector<ChunkToWrite>& chunks) {
  const std::string path = absl::StrCat(dir, "/", name);
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("create", path);
  std::vector<WrittenItem> written;
  int64_t offset = 0;
  auto add = [&](WrittenItem item, std::string pickle, const at::Tensor& tensor,
                 const std::string& where) -> absl::Status {
    FSDP_ASSIGN_OR_RETURN(const int64_t length, AppendItem(fd, std::move(pickle), tensor, where));
    item.storage = StorageInfo{name, offset, length, {}};
    offset += length;
    written.push_back(std::move(item));
    return absl::OkStatus();
  };
  absl::Status status = [&]() -> absl::Status {
    for (const BytesToWrite& b : bytes) {
      const std::string where = absl::StrCat(path, " (bytes entry '", Printable(b.fqn), "')");
      FSDP_ASSIGN_OR_RETURN(std::string pickle, internal::TorchSaveValuePickle(b.value, where));
      FSDP_RETURN_IF_ERROR(add(WrittenItem{MetadataIndex{b.fqn, std::nullopt, std::nullopt}},
                               std::move(pickle), at::Tensor(), where));
    }
    for (const ChunkToWrite& c : chunks) {
      const std::vector<int64_t> sizes = c.data.sizes().vec();
      const std::string where = absl::StrCat(path, " (tensor '", Printable(c.fqn), "' chunk at ",
                                             ShapeString(c.offsets), ")");
      FSDP_ASSIGN_OR_RETURN(at::Tensor data, MinimalStorage(c.data, where));
      absl::StatusOr<std::string> pickle = internal::TorchSaveTensorPickle(data);
      FSDP_RETURN_IF_ERROR(pickle.status(), where);
      WrittenItem item{MetadataIndex{c.fqn, c.offsets, std::nullopt}};
      item.dtype = data.scalar_type();
      item.size = c.size;
      item.sizes = sizes;
      FSDP_RETURN_IF_ERROR(add(std::move(item), std::move(*pickle), data, where));
    }
    return absl::OkStatus();
  }();
  if (status.ok()) {
    CrashPoint(absl::StrCat("written ", name));
    if (fsync(fd) != 0) status = Errno("fsync", path);
  }
  if (close(fd) != 0 && status.ok()) status = Errno("close", path);
  FSDP_RETURN_IF_ERROR(status);
  CrashPoint(absl::StrCat("fsynced ", name));
  return written;
}

absl::StatusOr<Metadata> AssembleMetadata(
    const std::vector<WrittenItem>& items,
    std::map<std::string, std::vector<PathElement>> planner_data,
    const std::string& checkpoint_id) {
  Metadata m;
  for (const WrittenItem& item : items) {
    const std::string& fqn = item.index.fqn;
    const std::string where = absl::StrCat("entry '", Printable(fqn), "'");
    auto it = m.state_dict_metadata.find(fqn);
    MetadataIndex index = item.index;
    if (!item.index.offset) {
      if (it != m.state_dict_metadata.end()) {
        return absl::InvalidArgumentError(absl::StrCat(where, " is written twice"));
      }
      m.state_dict_metadata.emplace(fqn, BytesStorageMetadata{});
    } else {
      if (it == m.state_dict_metadata.end()) {
        TensorStorageMetadata t;
        t.properties.dtype = item.dtype;
        t.size = item.size;
        it = m.state_dict_metadata.emplace(fqn, std::move(t)).first;
      }
      auto* t = std::get_if<TensorStorageMetadata>(&it->second);
      if (t == nullptr || t->properties.dtype != item.dtype || t->size != item.size) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": its chunks disagree on its dtype or size (",
                         ShapeString(item.size), " vs the first chunk's)"));
      }
      index.index = static_cast<int64_t>(t->chunks.size());
      t->chunks.push_back(ChunkStorageMetadata{*item.index.offset, item.sizes});
    }
    if (!m.storage_data.emplace(index, item.storage).second) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": an item is written twice"));
    }
  }
  m.planner_data = std::move(planner_data);
  m.storage_meta = StorageMeta{checkpoint_id, RandomNonce(), std::nullopt, {}};
  m.version = kDcpVersion;
  FSDP_RETURN_IF_ERROR(ValidateMetadata(m, kMetadataFileName));
  return m;
}

absl::StatusOr<std::string> PickleMetadata(const Metadata& m, const std::string& file) {
  FSDP_RETURN_IF_ERROR(ValidateMetadata(m, file));
  PickleWriter p(/*memoize_all=*/false);
  BeginDataclass(p, kMetadataModule, "Metadata", 5);
  p.Str("state_dict_metadata");
  p.DictBegin(m.state_dict_metadata.size());
  for (const auto& [fqn, entry] : m.state_dict_metadata) {
    p.Str(fqn);
    if (const auto* t = std::get_if<TensorStorageMetadata>(&entry)) {
      FSDP_RETURN_IF_ERROR(WriteTensorEntry(p, *t),
                           absl::StrCat(file, ": tensor '", Printable(fqn), "'"));
    } else {
      p.NewObj(kMetadataModule, "BytesStorageMetadata");  // no fields: no BUILD
    }
  }
  p.DictEnd(m.state_dict_metadata.size());
  p.Str("planner_data");
  p.DictBegin(m.planner_data.size());
  for (const auto& [fqn, path] : m.planner_data) {
    p.Str(fqn);
    p.TupleBegin(path.size());
    for (const PathElement& e : path) {
      if (const std::string* s = std::get_if<std::string>(&e)) {
        p.Str(*s);
      } else {
        p.Int(std::get<int64_t>(e));
      }
    }
    p.TupleEnd(path.size());
  }
  p.DictEnd(m.planner_data.size());
  p.Str("storage_data");
  p.DictBegin(m.storage_data.size());
  for (const auto& [index, storage] : m.storage_data) WriteStorageEntry(p, index, storage);
  p.DictEnd(m.storage_data.size());
  p.Str("storage_meta");
  WriteStorageMeta(p, m.storage_meta);
  p.Str("version");
  OrNone(p, m.version, [&](const std::string& v) { p.Str(v); });
  EndDataclass(p, 5);
  return p.Finish();
}

absl::StatusOr<int64_t> WriteMetadataFile(const std::string& dir, const Metadata& metadata) {
  const std::string path = absl::StrCat(dir, "/", kMetadataFileName);
  FSDP_ASSIGN_OR_RETURN(std::string bytes, PickleMetadata(metadata, path));
  CrashPoint("before .metadata");
  FSDP_RETURN_IF_ERROR(WriteFileDurably(path, bytes));
  return static_cast<int64_t>(bytes.size());
}

absl::Status WriteWholeDcpCheckpoint(const std::string& dir, const WholeEntries& entries,
                                     int files) {
  if (files < 1) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": cannot split into ", files, " files"));
  }
  std::vector<std::vector<ChunkToWrite>> chunks(static_cast<size_t>(files));
  for (const auto& [fqn, tensor] : entries.tensors) {
    const std::vector<int64_t> shape = tensor.sizes().vec();
    const int64_t numel = tensor.numel();
    if (tensor.dim() == 0 || numel == 0) {
      chunks[0].push_back(ChunkToWrite{fqn, shape, std::vector<int64_t>(shape.size(), 0), tensor});
      continue;
    }
    const at::Tensor flat = tensor.detach().contiguous().view({-1});
    const int64_t per_file = (numel + files - 1) / files;
    for (int r = 0; r < files; ++r) {
      const int64_t begin = std::min<int64_t>(numel, r * per_file);
      const int64_t end = std::min<int64_t>(numel, begin + per_file);
      FSDP_ASSIGN_OR_RETURN(std::vector<ChunkStorageMetadata> boxes,
                            FlatRangeToBoxes(shape, begin, end));
      int64_t at = begin;
      for (const ChunkStorageMetadata& box : boxes) {
        int64_t n = 1;
        for (int64_t d : box.sizes) n *= d;
        chunks[static_cast<size_t>(r)].push_back(
            ChunkToWrite{fqn, shape, box.offsets, flat.narrow(0, at, n).view(box.sizes)});
        at += n;
      }
    }
  }
  FSDP_ASSIGN_OR_RETURN(std::string staging, CreateStagingDir(dir));
  absl::Status status = [&]() -> absl::Status {
    std::vector<WrittenItem> items;
    for (int r = 0; r < files; ++r) {
      FSDP_ASSIGN_OR_RETURN(std::vector<WrittenItem> written,
                            WriteDistcpFile(staging, DistcpFileName(r),
                                            r == 0 ? entries.bytes : std::vector<BytesToWrite>{},
                                            chunks[static_cast<size_t>(r)]));
      items.insert(items.end(), written.begin(), written.end());
    }
    FSDP_ASSIGN_OR_RETURN(Metadata m, AssembleMetadata(items, entries.planner_data, dir));
    FSDP_RETURN_IF_ERROR(WriteMetadataFile(staging, m).status());
    return CommitStagingDir(staging, dir);
  }();
  if (!status.ok()) (void)RemoveTree(staging);
  return status;
}

}  // namespace fsdp::checkpoint::dcp
