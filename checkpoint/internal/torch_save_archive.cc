// See torch_save_archive.h.
#include "checkpoint/internal/torch_save_archive.h"

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint::internal {

using optim_state::StateSequence;
using optim_state::StateValue;

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

// Unlike pickle_save, dicts and lists carry no TorchScript type tag
// (torch.jit._pickle.restore_type_tag), which torch.load(weights_only=True) refuses.
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

absl::StatusOr<int64_t> AppendArchive(int fd, const Pickled& pickled, ArchiveRecords records,
                                      const std::string& path) {
  absl::Status io = absl::OkStatus();
  int64_t written = 0;
  auto write_all = [&](const void* data, size_t n) -> size_t {
    const char* p = static_cast<const char*>(data);
    size_t left = n;
    while (io.ok() && left > 0) {
      const ssize_t w = write(fd, p, left);
      if (w < 0) {
        if (errno == EINTR) continue;
        io = absl::InternalError(absl::StrCat("cannot write ", path, ": ", strerror(errno)));
        break;
      }
      p += w;
      written += w;
      left -= static_cast<size_t>(w);
    }
    return n;
  };
  absl::Status status = CallTorch(absl::StrCat("writing ", path), [&]() -> absl::Status {
    caffe2::serialize::PyTorchStreamWriter writer(write_all);
    if (records == ArchiveRecords::kPickleSave) {
      torch::jit::writeArchiveAndTensors("data", pickled.pickle.data(), pickled.pickle.size(),
                                         pickled.storages, writer);
    } else {
      writer.writeRecord("data.pkl", pickled.pickle.data(), pickled.pickle.size());
      writer.writeRecord(".format_version", "1", 1);
      writer.writeRecord(".storage_alignment", "64", 2);
      writer.writeRecord("byteorder", "little", 6);
      for (size_t i = 0; i < pickled.storages.size(); ++i) {
        const at::Tensor& s = pickled.storages[i];
        writer.writeRecord(absl::StrCat("data/", i), s.storage().data(), s.storage().nbytes());
      }
    }
    writer.writeEndOfFile();
    return absl::OkStatus();
  });
  FSDP_RETURN_IF_ERROR(status);
  FSDP_RETURN_IF_ERROR(io);
  return written;
}

}  // namespace fsdp::checkpoint::internal
