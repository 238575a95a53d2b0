#include "checkpoint/internal/torch_save_archive.h"

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

absl::Status Errno(const char* what, const std::string& path) {
  return absl::InternalError(absl::StrCat("cannot ", what, " ", path, ": ", strerror(errno)));
}

std::string BaseName(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

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

// The pickle is torch::pickle_save's first step (tensors appear in it as references to their
// storages); only the TorchScript type tags are left out.
absl::StatusOr<Pickled> Pickle(const c10::IValue& value, const std::string& path) {
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

ArchiveWriter::ArchiveWriter(std::string path, int fd, bool durable)
    : path_(std::move(path)), fd_(fd), durable_(durable) {}

ArchiveWriter::~ArchiveWriter() {
  // An unfinished archive (an error, or a caller that stopped): the zip writer's destructor
  // would finish it; its bytes go nowhere once fd_ is closed and io_ holds an error.
  if (io_.ok()) io_ = absl::CancelledError("archive abandoned");
  zip_.reset();
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<std::unique_ptr<ArchiveWriter>> ArchiveWriter::Create(const std::string& path,
                                                                     bool durable) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("create", path);
  std::unique_ptr<ArchiveWriter> writer(new ArchiveWriter(path, fd, durable));
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
      left -= static_cast<size_t>(w);
    }
    return n;
  };
  FSDP_RETURN_IF_ERROR(writer->Torch("writing", [&] {
    writer->zip_ = std::make_unique<caffe2::serialize::PyTorchStreamWriter>(write_all);
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
  return Torch("writing", [&] { zip_->writeRecord(absl::StrCat("data/", index), data, nbytes); });
}

absl::Status ArchiveWriter::Finish(const std::vector<char>& pickle) {
  FSDP_RETURN_IF_ERROR(Torch("writing", [&] {
    zip_->writeRecord("data.pkl", pickle.data(), pickle.size());
    zip_->writeEndOfFile();
  }));
  absl::Status status = io_;
  if (status.ok() && durable_) {
    CrashPoint(absl::StrCat("written ", BaseName(path_)));
    if (fsync(fd_) != 0) status = Errno("fsync", path_);
  }
  if (close(fd_) != 0 && status.ok()) status = Errno("close", path_);
  fd_ = -1;
  if (status.ok() && durable_) CrashPoint(absl::StrCat("fsynced ", BaseName(path_)));
  if (!status.ok()) io_ = status;
  return status;
}

absl::Status WriteArchive(const Pickled& pickled, const std::string& path, bool durable) {
  FSDP_ASSIGN_OR_RETURN(std::unique_ptr<ArchiveWriter> writer,
                        ArchiveWriter::Create(path, durable));
  for (size_t i = 0; i < pickled.storages.size(); ++i) {
    const at::Tensor& t = pickled.storages[i];
    FSDP_RETURN_IF_ERROR(writer->WriteStorage(i, StorageData(t), StorageBytes(t)));
  }
  return writer->Finish(pickled.pickle);
}

}  // namespace fsdp::checkpoint::internal
