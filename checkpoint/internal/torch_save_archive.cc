// See torch_save_archive.h.
#include "checkpoint/internal/torch_save_archive.h"

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <caffe2/serialize/inline_container.h>
#include <fcntl.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "checkpoint/atomic_dir.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint::internal {
namespace {

using optim_state::StateSequence;
using optim_state::StateValue;

absl::Status Errno(const char* what, const std::string& path) {
  return absl::InternalError(absl::StrCat("cannot ", what, " ", path, ": ", strerror(errno)));
}

std::string BaseName(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

absl::StatusOr<c10::IValue> StateValueToIValue(const StateValue& value, const std::string& where) {
  if (value.IsNone()) return c10::IValue();
  if (const bool* b = value.GetIf<bool>()) return c10::IValue(*b);
  if (const int64_t* i = value.GetIf<int64_t>()) return c10::IValue(*i);
  if (const double* d = value.GetIf<double>()) return c10::IValue(*d);
  if (const std::string* s = value.GetIf<std::string>()) return c10::IValue(*s);
  if (const at::Tensor* t = value.GetIf<at::Tensor>()) return c10::IValue(*t);
  if (const StateSequence* seq = value.GetIf<StateSequence>()) {
    std::vector<c10::IValue> items;
    for (const StateValue& item : seq->items) {
      FSDP_ASSIGN_OR_RETURN(c10::IValue converted, StateValueToIValue(item, where));
      items.push_back(std::move(converted));
    }
    if (seq->is_tuple) return c10::IValue(c10::ivalue::Tuple::create(std::move(items)));
    c10::impl::GenericList list(c10::AnyType::get());
    for (auto& item : items) list.push_back(std::move(item));
    return c10::IValue(list);
  }
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": a ", value.TypeName(), " has no place in a torch.save file"));
}

at::Tensor PlaceholderTensor(int64_t numel, at::ScalarType dtype) {
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes,
                       c10::DataPtr(nullptr, c10::Device(c10::kCPU)), /*allocator=*/nullptr,
                       /*resizable=*/false);
  return at::empty({0}, at::TensorOptions().dtype(dtype)).set_(storage, 0, {numel}, {1});
}

bool IsPlaceholder(const at::Tensor& tensor) {
  return tensor.storage().data() == nullptr && tensor.storage().nbytes() > 0;
}

// The pickle is torch::pickle_save's first step; only the TorchScript type tags are left out
// (torch.jit._pickle.restore_type_tag, which torch.load(weights_only=True) refuses).
absl::StatusOr<Pickled> PickleIValue(const c10::IValue& value, const std::string& path) {
  return CallTorch(absl::StrCat("serializing ", path), [&] {
    Pickled out;
    torch::jit::Pickler pickler(
        [&](const char* bytes, size_t n) { out.pickle.insert(out.pickle.end(), bytes, bytes + n); },
        /*tensor_table=*/nullptr, /*type_renamer=*/nullptr, /*memoized_class_types=*/nullptr,
        /*get_tensor_id=*/nullptr, /*tag_aggregates=*/false);
    pickler.protocol();
    pickler.pushIValue(value);
    pickler.stop();
    out.storages = pickler.tensorData();
    return out;
  });
}

const void* StorageData(const at::Tensor& tensor) { return tensor.storage().data(); }
size_t StorageBytes(const at::Tensor& tensor) { return tensor.storage().nbytes(); }

ArchiveWriter::ArchiveWriter(std::string path, int fd, bool owns_fd, bool durable,
                             ArchiveRecords records, std::vector<char> pickle)
    : path_(std::move(path)),
      fd_(fd),
      owns_fd_(owns_fd),
      durable_(durable),
      records_(records),
      pickle_(std::move(pickle)) {}

ArchiveWriter::~ArchiveWriter() {
  // An unfinished archive (an error, or a caller that stopped): the zip writer's destructor
  // would finish it; its bytes go nowhere once io_ holds an error.
  if (io_.ok()) io_ = absl::CancelledError("archive abandoned");
  zip_.reset();
  if (owns_fd_ && fd_ >= 0) close(fd_);
}

absl::StatusOr<std::unique_ptr<ArchiveWriter>> ArchiveWriter::Create(const std::string& path,
                                                                     ArchiveRecords records,
                                                                     std::vector<char> pickle,
                                                                     bool durable) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("create", path);
  return Start(std::unique_ptr<ArchiveWriter>(
      new ArchiveWriter(path, fd, /*owns_fd=*/true, durable, records, std::move(pickle))));
}

absl::StatusOr<std::unique_ptr<ArchiveWriter>> ArchiveWriter::Append(int fd,
                                                                     const std::string& path,
                                                                     ArchiveRecords records,
                                                                     std::vector<char> pickle) {
  return Start(std::unique_ptr<ArchiveWriter>(new ArchiveWriter(
      path, fd, /*owns_fd=*/false, /*durable=*/false, records, std::move(pickle))));
}

absl::StatusOr<std::unique_ptr<ArchiveWriter>> ArchiveWriter::Start(
    std::unique_ptr<ArchiveWriter> writer) {
  // The zip writer must never see a short write (it would throw from its destructor), so the
  // first failure is kept in io_ and later bytes are dropped.
  ArchiveWriter* self = writer.get();
  auto write_all = [self](const void* data, size_t n) -> size_t {
    const char* p = static_cast<const char*>(data);
    size_t left = n;
    while (self->io_.ok() && left > 0) {
      const ssize_t w = write(self->fd_, p, left);
      if (w < 0) {
        if (errno == EINTR) continue;
        self->io_ = Errno("write", self->path_);
        break;
      }
      p += w;
      self->written_ += w;
      left -= static_cast<size_t>(w);
    }
    return n;
  };
  FSDP_RETURN_IF_ERROR(writer->Torch("writing", [&] {
    writer->zip_ = std::make_unique<caffe2::serialize::PyTorchStreamWriter>(write_all);
    if (writer->records_ == ArchiveRecords::kTorchSave) {
      const std::vector<char>& pickle = writer->pickle_;
      writer->zip_->writeRecord("data.pkl", pickle.data(), pickle.size());
      writer->zip_->writeRecord(".format_version", "1", 1);
      writer->zip_->writeRecord(".storage_alignment", "64", 2);
      writer->zip_->writeRecord("byteorder", "little", 6);
    }
  }));
  return writer;
}

absl::Status ArchiveWriter::Torch(const char* what, const std::function<void()>& fn) {
  absl::Status status = CallTorch(absl::StrCat(what, " ", path_), [&]() -> absl::Status {
    fn();
    return absl::OkStatus();
  });
  if (io_.ok() && !status.ok()) io_ = status;
  return io_;
}

void ArchiveWriter::Fail(absl::Status status) {
  if (io_.ok()) io_ = std::move(status);
}

absl::Status ArchiveWriter::WriteStorage(size_t index, const void* data, size_t nbytes) {
  if (!io_.ok()) return io_;
  FSDP_RETURN_IF_ERROR(
      Torch("writing", [&] { zip_->writeRecord(absl::StrCat("data/", index), data, nbytes); }));
  // Starts the record's writeback now, so that Finish's fsync waits for the last records only
  // (a hint: its errors surface at fsync).
  if (durable_) sync_file_range(fd_, 0, 0, SYNC_FILE_RANGE_WRITE);
  return absl::OkStatus();
}

absl::Status ArchiveWriter::CloseOwnedFile() {
  absl::Status status = io_;
  if (status.ok() && durable_) {
    CrashPoint(absl::StrCat("written ", BaseName(path_)));
    if (fsync(fd_) != 0) status = Errno("fsync", path_);
  }
  if (close(fd_) != 0 && status.ok()) status = Errno("close", path_);
  fd_ = -1;
  if (status.ok() && durable_) CrashPoint(absl::StrCat("fsynced ", BaseName(path_)));
  return status;
}

absl::StatusOr<int64_t> ArchiveWriter::Finish() {
  absl::Status status = Torch("writing", [&] {
    if (records_ == ArchiveRecords::kPickleSave) {
      zip_->writeRecord("data.pkl", pickle_.data(), pickle_.size());
    }
    zip_->writeEndOfFile();
  });
  if (owns_fd_) status = CloseOwnedFile();
  if (!status.ok()) {
    if (io_.ok()) io_ = status;
    return status;
  }
  return written_;
}

namespace {

absl::StatusOr<int64_t> WriteWhole(absl::StatusOr<std::unique_ptr<ArchiveWriter>> writer,
                                   const Pickled& pickled) {
  FSDP_RETURN_IF_ERROR(writer.status());
  for (size_t i = 0; i < pickled.storages.size(); ++i) {
    const at::Tensor& t = pickled.storages[i];
    FSDP_RETURN_IF_ERROR((*writer)->WriteStorage(i, StorageData(t), StorageBytes(t)));
  }
  return (*writer)->Finish();
}

}  // namespace

absl::Status WriteArchive(const Pickled& pickled, const std::string& path, bool durable) {
  return WriteWhole(
             ArchiveWriter::Create(path, ArchiveRecords::kPickleSave, pickled.pickle, durable),
             pickled)
      .status();
}

absl::StatusOr<int64_t> AppendArchive(int fd, const Pickled& pickled, ArchiveRecords records,
                                      const std::string& path) {
  return WriteWhole(ArchiveWriter::Append(fd, path, records, pickled.pickle), pickled);
}

}  // namespace fsdp::checkpoint::internal
