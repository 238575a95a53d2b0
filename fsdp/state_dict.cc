#include "fsdp/state_dict.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <unordered_map>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/rank0_status.h"
#include "comm/status_macros.h"

namespace fsdp {

int64_t LocalShard::global_numel() const {
  int64_t n = 1;
  for (int64_t d : global_shape) n *= d;
  return n;
}

namespace {

// One state_dict key of the model.
struct ModelEntry {
  std::string fqn;
  at::Tensor tensor;  // the registered tensor
  bool is_buffer = false;
  // The dtype state dicts hold an unmanaged tensor in (a buffer: its dtype before mixed
  // precision's buffer_dtype).
  at::ScalarType state_dtype = at::kFloat;
  // The unit that manages this parameter, if any, and the parameter's index in
  // it.
  FlatParamHandle* handle = nullptr;
  size_t index = 0;
  std::string unit_prefix;

  const FlatParamInfo& info() const { return handle->infos()[index]; }
  std::vector<int64_t> shape() const {
    return handle != nullptr ? info().shape : tensor.sizes().vec();
  }
  at::ScalarType dtype() const {
    return handle != nullptr ? handle->flat_param().scalar_type() : state_dtype;
  }
  // A copy of an unmanaged tensor as state dicts hold it.
  at::Tensor StateValue() const {
    return tensor.detach().to(state_dtype, /*non_blocking=*/false, /*copy=*/true);
  }
};

struct ManagedSlot {
  FlatParamHandle* handle;
  size_t index;
  std::string unit_prefix;
};
using ManagedMap = std::unordered_map<const c10::TensorImpl*, ManagedSlot>;

// torch's state_dict order: a module's parameters, then its buffers, then each
// child under its name. Like torch's state_dict (and unlike named_parameters),
// a module registered under several names is visited under each, and a tensor
// registered under several names is listed under each.
void WalkStateDict(torch::nn::Module& module, const std::string& prefix,
                   const ManagedMap& managed, std::vector<ModelEntry>& out) {
  for (const auto& param : module.named_parameters(/*recurse=*/false)) {
    ModelEntry entry;
    entry.fqn = absl::StrCat(prefix, param.key());
    entry.tensor = param.value();
    auto it = managed.find(param.value().unsafeGetTensorImpl());
    if (it != managed.end()) {
      entry.handle = it->second.handle;
      entry.index = it->second.index;
      entry.unit_prefix = it->second.unit_prefix;
    }
    out.push_back(std::move(entry));
  }
  for (const auto& buffer : module.named_buffers(/*recurse=*/false)) {
    ModelEntry entry;
    entry.fqn = absl::StrCat(prefix, buffer.key());
    entry.tensor = buffer.value();
    entry.is_buffer = true;
    out.push_back(std::move(entry));
  }
  for (const auto& child : module.named_children()) {
    WalkStateDict(*child.value(), absl::StrCat(prefix, child.key(), "."),
                  managed, out);
  }
}

std::vector<ModelEntry> ModelEntries(FullyShardedDataParallel& fsdp) {
  ManagedMap managed;
  for (const auto& unit : fsdp.units()) {
    if (unit.handle == nullptr) continue;
    for (size_t i = 0; i < unit.handle->params().size(); ++i) {
      managed[unit.handle->params()[i].unsafeGetTensorImpl()] =
          ManagedSlot{unit.handle, i, unit.module_prefix};
    }
  }
  std::vector<ModelEntry> out;
  WalkStateDict(fsdp.module(), "", managed, out);
  for (ModelEntry& entry : out) {
    entry.state_dtype = entry.is_buffer ? fsdp.StateDictDtype(entry.tensor)
                                        : entry.tensor.scalar_type();
  }
  return out;
}

std::string Where(absl::string_view op, const comm::ProcessGroup& group) {
  return absl::StrCat(op, " (rank ", group.rank(), " of ", group.size(),
                      ", group ", group.name(), ")");
}

// The module's class name, as Python's `self.__class__.__name__` (no
// namespaces).
std::string ClassName(const torch::nn::Module& module) {
  const std::string& name = module.name();
  const size_t colon = name.rfind("::");
  return colon == std::string::npos ? name : name.substr(colon + 2);
}

std::string TorchSize(c10::IntArrayRef shape) {
  return absl::StrCat("torch.Size([", absl::StrJoin(shape, ", "), "])");
}

std::string TorchDtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return "torch.float32";
    case at::kDouble:
      return "torch.float64";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kLong:
      return "torch.int64";
    case at::kInt:
      return "torch.int32";
    case at::kShort:
      return "torch.int16";
    case at::kChar:
      return "torch.int8";
    case at::kByte:
      return "torch.uint8";
    case at::kBool:
      return "torch.bool";
    default:
      return c10::toString(type);
  }
}

std::string Quoted(const std::vector<std::string>& keys) {
  return absl::StrJoin(keys, ", ",
                       [](std::string* out, const std::string& key) {
                         absl::StrAppend(out, "\"", key, "\"");
                       });
}

// Checks of one present key's tensor against the model: PyTorch's size mismatch
// text, then our dtype text. "" when it fits.
std::string CheckTensor(const std::string& fqn, const at::Tensor& value,
                        const std::vector<int64_t>& shape,
                        at::ScalarType dtype) {
  if (!value.defined()) {
    return absl::StrCat(
        "While copying the parameter named \"", fqn,
        "\", expected a defined tensor from checkpoint but received an "
        "undefined one.");
  }
  if (value.sizes() != c10::IntArrayRef(shape)) {
    return absl::StrCat("size mismatch for ", fqn,
                        ": copying a param with shape ",
                        TorchSize(value.sizes()),
                        " from checkpoint, the shape in current model is ",
                        TorchSize(shape), ".");
  }
  if (value.scalar_type() != dtype) {
    return absl::StrCat("dtype mismatch for ", fqn,
                        ": copying a param with dtype ",
                        TorchDtype(value.scalar_type()),
                        " from checkpoint, the dtype in current model is ",
                        TorchDtype(dtype), ".");
  }
  return "";
}

// Matches `dict` against the model's keys as torch's strict load_state_dict
// does, and checks each present value with `check(entry, value)`. Returns ""
// and fills `values` (one per model entry) when everything fits, else PyTorch's
// message: missing keys, unexpected keys, then the per-key errors in model
// order.
template <typename Value, typename Check>
std::string Validate(const std::vector<ModelEntry>& entries,
                     const std::vector<std::pair<std::string, Value>>& dict,
                     const std::string& class_name,
                     std::vector<const Value*>& values, Check check) {
  std::unordered_map<std::string, const Value*> by_key;
  std::vector<std::string> duplicates;
  for (const auto& [key, value] : dict) {
    if (!by_key.emplace(key, &value).second) duplicates.push_back(key);
  }
  std::unordered_set<std::string> expected;
  std::vector<std::string> missing;
  std::vector<std::string> per_key;
  values.assign(entries.size(), nullptr);
  for (size_t i = 0; i < entries.size(); ++i) {
    const ModelEntry& entry = entries[i];
    expected.insert(entry.fqn);
    auto it = by_key.find(entry.fqn);
    if (it == by_key.end()) {
      missing.push_back(entry.fqn);
      continue;
    }
    values[i] = it->second;
    std::string error = check(entry, *it->second);
    if (!error.empty()) per_key.push_back(std::move(error));
  }
  std::vector<std::string> unexpected;
  for (const auto& [key, value] : dict) {
    if (!expected.count(key)) unexpected.push_back(key);
  }
  std::vector<std::string> messages;
  if (!missing.empty()) {
    messages.push_back(
        absl::StrCat("Missing key(s) in state_dict: ", Quoted(missing), ". "));
  }
  if (!unexpected.empty()) {
    messages.push_back(absl::StrCat(
        "Unexpected key(s) in state_dict: ", Quoted(unexpected), ". "));
  }
  if (!duplicates.empty()) {
    messages.push_back(absl::StrCat(
        "Duplicate key(s) in state_dict: ", Quoted(duplicates), ". "));
  }
  for (std::string& error : per_key) messages.push_back(std::move(error));
  if (messages.empty()) return "";
  return absl::StrCat("Error(s) in loading state_dict for ", class_name,
                      ":\n\t", absl::StrJoin(messages, "\n\t"));
}

// Every rank learns whether any rank refused its input, so that either all
// ranks load or none changes anything. `local_error` is "" when this rank's
// input is fine.
absl::Status Agree(comm::ProcessGroup& group, const std::string& where,
                   const std::string& local_error) {
  if (group.size() > 1) {
    absl::StatusOr<std::vector<std::string>> all =
        group.AllGatherObject(local_error);
    if (!all.ok()) {
      return Annotate(
          all.status(),
          absl::StrCat(where, ": agreeing on the state dict's checks"));
    }
    if (local_error.empty()) {
      for (size_t r = 0; r < all->size(); ++r) {
        if (!(*all)[r].empty()) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, ": nothing loaded because rank ", r,
                           " refused its state dict: ", (*all)[r]));
        }
      }
    }
  }
  if (!local_error.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", local_error));
  }
  return absl::OkStatus();
}

// Where this rank's shard lies in a sharded unit's unpadded flat values: its
// first element and how many (the padding excluded).
std::pair<int64_t, int64_t> OwnRange(const FlatParamHandle& handle) {
  const int64_t begin =
      static_cast<int64_t>(handle.rank()) * handle.shard_numel();
  return {begin,
          std::clamp<int64_t>(handle.numel() - begin, 0, handle.shard_numel())};
}

// Writes a unit's full unpadded flat values: this rank's shard (NO_SHARD:
// everything) into the flat parameter, and, if the unit is gathered, the full
// parameters too.
void WriteFullFlat(FlatParamHandle& handle, const at::Tensor& full) {
  at::Tensor flat = handle.flat_param().detach();
  if (!handle.sharded()) {
    flat.copy_(full);
    return;
  }
  const auto [begin, valid] = OwnRange(handle);
  if (valid > 0) flat.narrow(0, 0, valid).copy_(full.narrow(0, begin, valid));
  if (handle.is_unsharded()) {
    for (size_t i = 0; i < handle.params().size(); ++i) {
      const FlatParamInfo& info = handle.infos()[i];
      handle.params()[i].detach().copy_(
          full.narrow(0, info.offset, info.numel).view(info.shape));
    }
  }
}

// One unit's values as LoadFullStateDict's staged mode keeps them until all
// arrived: the whole where WriteFullFlat needs it, else this rank's shard.
struct StagedUnit {
  FlatParamHandle* handle;
  at::Tensor full;
  at::Tensor shard;
};

StagedUnit Stage(FlatParamHandle& handle, const at::Tensor& full) {
  if (!handle.sharded() || handle.is_unsharded()) return {&handle, full, {}};
  const auto [begin, valid] = OwnRange(handle);
  return {&handle, {}, full.narrow(0, begin, valid).clone()};
}

void Apply(const StagedUnit& unit) {
  if (unit.full.defined()) {
    WriteFullFlat(*unit.handle, unit.full);
  } else if (unit.shard.numel() > 0) {
    unit.handle->flat_param().detach().narrow(0, 0, unit.shard.numel()).copy_(unit.shard);
  }
}

// Rank 0's outcome of the before_unit calls, on every rank.
absl::Status AgreeOnRank0(comm::ProcessGroup& group, const std::string& where,
                          const absl::Status& status) {
  absl::StatusOr<std::string> agreed =
      group.BroadcastObject(group.rank() == 0 ? comm::EncodeStatus(status) : std::string(), 0);
  if (!agreed.ok()) {
    return Annotate(agreed.status(), absl::StrCat(where, ": agreeing on rank 0's reads"));
  }
  return comm::DecodeStatus(*agreed, absl::StrCat(where, ": nothing loaded"));
}

// LoadFullStateDict with config.before_unit (rank0_only): every value kept
// aside, applied once all arrived and rank 0's reads succeeded.
absl::Status LoadStaged(FullyShardedDataParallel& fsdp, const std::string& where,
                        const std::vector<ModelEntry>& entries,
                        const std::vector<const at::Tensor*>& values,
                        const LoadFullStateDictConfig& config) {
  comm::ProcessGroup& group = *fsdp.group();
  const bool root = group.rank() == 0;
  absl::Status read;  // rank 0: the first failed before_unit
  auto before = [&](const FlatParamHandle* handle) {
    absl::Status s = config.before_unit(handle);
    if (!s.ok() && read.ok()) read = std::move(s);
  };
  std::vector<StagedUnit> units;
  std::vector<std::pair<const ModelEntry*, at::Tensor>> unmanaged;
  FSDP_RETURN_IF_ERROR(CallTorch(where, [&]() -> absl::Status {
    for (const auto& unit : fsdp.units()) {
      FlatParamHandle* handle = unit.handle;
      if (handle == nullptr) continue;
      at::Tensor full = at::empty({handle->numel()}, handle->flat_param().options());
      if (root) {
        before(handle);
        for (size_t i = 0; i < entries.size(); ++i) {
          if (entries[i].handle != handle) continue;
          const FlatParamInfo& info = entries[i].info();
          full.narrow(0, info.offset, info.numel).copy_(values[i]->reshape({-1}));
        }
      }
      FSDP_RETURN_IF_ERROR(group.Broadcast(full, /*root=*/0),
                           absl::StrCat(where, ": broadcasting the values of flat parameter [",
                                        handle->Describe(), "]"));
      units.push_back(Stage(*handle, full));
    }
    if (root) before(nullptr);
    for (size_t i = 0; i < entries.size(); ++i) {
      const ModelEntry& entry = entries[i];
      if (entry.handle != nullptr) continue;
      at::Tensor value =
          root ? values[i]->contiguous().clone()
               : at::empty(entry.tensor.sizes(), entry.tensor.options().dtype(entry.dtype()));
      FSDP_RETURN_IF_ERROR(group.Broadcast(value, /*root=*/0),
                           absl::StrCat(where, ": broadcasting ", entry.fqn));
      unmanaged.emplace_back(&entry, std::move(value));
    }
    return absl::OkStatus();
  }));
  FSDP_RETURN_IF_ERROR(AgreeOnRank0(group, where, read));
  return CallTorch(where, [&] {
    for (const StagedUnit& unit : units) Apply(unit);
    for (const auto& [entry, value] : unmanaged) {
      entry->tensor.detach().copy_(value);
    }
  });
}

}  // namespace

std::vector<FullStateDictKey> FullStateDictLayout(FullyShardedDataParallel& fsdp) {
  std::vector<FullStateDictKey> keys;
  std::unordered_map<const c10::TensorImpl*, at::Tensor> unmanaged;
  for (const ModelEntry& entry : ModelEntries(fsdp)) {
    FullStateDictKey& key = keys.emplace_back();
    key.fqn = entry.fqn;
    key.handle = entry.handle;
    key.index = entry.index;
    if (entry.handle != nullptr) continue;
    at::Tensor& value = unmanaged[entry.tensor.unsafeGetTensorImpl()];
    if (!value.defined()) value = entry.StateValue();
    key.value = value;
  }
  return keys;
}

absl::StatusOr<StateDict> FullStateDict(FullyShardedDataParallel& fsdp,
                                        const FullStateDictConfig& config) {
  at::NoGradGuard no_grad;
  const comm::ProcessGroup& group = *fsdp.group();
  const std::string where = Where("FullStateDict", group);
  const bool keep = !config.rank0_only || group.rank() == 0;
  StateDict out;
  absl::Status status = CallTorch(where, [&]() -> absl::Status {
    std::vector<FullStateDictKey> keys;
    if (keep) keys = FullStateDictLayout(fsdp);
    // Unit by unit: gather, keep copies of the original parameters (rank 0 only
    // with rank0_only; one per parameter, shared by its FQNs), drop the gathered
    // flat tensor.
    for (const auto& unit : fsdp.units()) {
      if (unit.handle == nullptr) continue;
      absl::StatusOr<at::Tensor> flat = unit.handle->GatherFullFlat();
      if (!flat.ok()) return Annotate(flat.status(), where);
      std::unordered_map<size_t, at::Tensor> copies;
      for (FullStateDictKey& key : keys) {
        if (key.handle != unit.handle) continue;
        at::Tensor& copy = copies[key.index];
        if (!copy.defined()) {
          const FlatParamInfo& info = unit.handle->infos()[key.index];
          copy = flat->narrow(0, info.offset, info.numel).view(info.shape).clone();
        }
        key.value = copy;
      }
    }
    for (FullStateDictKey& key : keys) {
      at::Tensor value = std::move(key.value);
      if (config.offload_to_cpu && !value.device().is_cpu())
        value = value.to(at::kCPU);
      out.emplace_back(std::move(key.fqn), std::move(value));
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return out;
}

absl::Status LoadFullStateDict(FullyShardedDataParallel& fsdp,
                               const StateDict& state_dict,
                               const LoadFullStateDictConfig& config) {
  at::NoGradGuard no_grad;
  comm::ProcessGroup& group = *fsdp.group();
  const std::string where = Where(
      config.rank0_only ? "LoadFullStateDict(rank0_only)" : "LoadFullStateDict",
      group);
  const bool has_dict = !config.rank0_only || group.rank() == 0;
  const std::vector<ModelEntry> entries = ModelEntries(fsdp);

  // 1. Check everything (every rank), and agree, before changing anything.
  std::vector<const at::Tensor*> values;
  std::string error;
  if (has_dict) {
    error = Validate(entries, state_dict, ClassName(fsdp.module()), values,
                     [](const ModelEntry& entry, const at::Tensor& value) {
                       return CheckTensor(entry.fqn, value, entry.shape(),
                                          entry.dtype());
                     });
  } else if (!state_dict.empty()) {
    error = absl::StrCat(
        "with rank0_only, ranks other than 0 pass an empty state dict; got ",
        state_dict.size(), " entries");
  }
  FSDP_RETURN_IF_ERROR(Agree(group, where, error));
  if (config.before_unit) {
    if (!config.rank0_only) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": before_unit needs rank0_only"));
    }
    return LoadStaged(fsdp, where, entries, values, config);
  }

  // 2. Load: each unit from its full flat values (broadcast from rank 0 with
  // rank0_only), then the unmanaged parameters and buffers.
  return CallTorch(where, [&]() -> absl::Status {
    for (const auto& unit : fsdp.units()) {
      FlatParamHandle* handle = unit.handle;
      if (handle == nullptr) continue;
      at::Tensor full =
          at::empty({handle->numel()}, handle->flat_param().options());
      if (has_dict) {
        // In state_dict order, so that a shared parameter takes its last name's
        // value.
        for (size_t i = 0; i < entries.size(); ++i) {
          if (entries[i].handle != handle) continue;
          const FlatParamInfo& info = entries[i].info();
          full.narrow(0, info.offset, info.numel)
              .copy_(values[i]->reshape({-1}));
        }
      }
      if (config.rank0_only) {
        FSDP_RETURN_IF_ERROR(
            group.Broadcast(full, /*root=*/0),
            absl::StrCat(where, ": broadcasting the values of flat parameter [",
                         handle->Describe(), "]"));
      }
      WriteFullFlat(*handle, full);
    }
    for (size_t i = 0; i < entries.size(); ++i) {
      const ModelEntry& entry = entries[i];
      if (entry.handle != nullptr) continue;
      at::Tensor value;
      if (config.rank0_only) {
        value = has_dict
                    ? values[i]->contiguous()
                    : at::empty(entry.tensor.sizes(),
                                entry.tensor.options().dtype(entry.dtype()));
        FSDP_RETURN_IF_ERROR(group.Broadcast(value, /*root=*/0),
                             absl::StrCat(where, ": broadcasting ", entry.fqn));
      } else {
        value = *values[i];
      }
      entry.tensor.detach().copy_(value);
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<ShardedDict> ShardedStateDict(FullyShardedDataParallel& fsdp,
                                             bool views) {
  at::NoGradGuard no_grad;
  const std::string where = Where("ShardedStateDict", *fsdp.group());
  ShardedDict out;
  absl::Status status = CallTorch(where, [&] {
    std::unordered_map<const c10::TensorImpl*, ShardedValue> values;
    for (const ModelEntry& entry : ModelEntries(fsdp)) {
      const c10::TensorImpl* impl = entry.tensor.unsafeGetTensorImpl();
      auto it = values.find(impl);
      if (it == values.end()) {
        if (entry.handle == nullptr) {
          at::Tensor value = views ? entry.tensor.detach().to(entry.state_dtype)
                                   : entry.StateValue();
          it = values.emplace(impl, ShardedValue(std::move(value))).first;
        } else {
          const FlatParamHandle& handle = *entry.handle;
          const FlatParamInfo& info = entry.info();
          const ParamShard local = handle.ShardOf(entry.index, handle.rank());
          LocalShard shard;
          shard.data = handle.flat_param().detach().narrow(0, local.shard_offset,
                                                           local.numel);
          if (!views) shard.data = shard.data.clone();
          shard.global_shape = info.shape;
          shard.flat_offset = local.param_offset;
          shard.numel = local.numel;
          shard.rank = handle.rank();
          shard.world_size = handle.world_size();
          shard.unit_prefix = entry.unit_prefix;
          shard.offset_in_flat_param = info.offset;
          shard.flat_param_numel = handle.numel();
          shard.shard_offset = local.shard_offset;
          it = values.emplace(impl, ShardedValue(std::move(shard))).first;
        }
      }
      out.emplace_back(entry.fqn, it->second);
    }
  });
  if (!status.ok()) return status;
  return out;
}

namespace {

std::string CheckSharded(const ModelEntry& entry, const ShardedValue& value) {
  if (entry.handle == nullptr) {
    const at::Tensor* tensor = std::get_if<at::Tensor>(&value);
    if (tensor == nullptr) {
      return absl::StrCat(
          entry.fqn, ": expected a full tensor (FSDP does not shard this ",
          entry.is_buffer ? "buffer" : "parameter", "), got a LocalShard.");
    }
    return CheckTensor(entry.fqn, *tensor, entry.shape(), entry.dtype());
  }
  const LocalShard* shard = std::get_if<LocalShard>(&value);
  if (shard == nullptr) {
    return absl::StrCat(entry.fqn, ": expected a LocalShard (FSDP unit '",
                        entry.unit_prefix,
                        "' shards this parameter), got a full tensor.");
  }
  const std::vector<int64_t> shape = entry.shape();
  if (shard->global_shape != shape) {
    return absl::StrCat("size mismatch for ", entry.fqn,
                        ": copying a param with shape ",
                        TorchSize(shard->global_shape),
                        " from checkpoint, the shape in current model is ",
                        TorchSize(shape), ".");
  }
  if (!shard->data.defined()) {
    return absl::StrCat(
        "While copying the parameter named \"", entry.fqn,
        "\", expected a defined tensor from checkpoint but received an "
        "undefined one.");
  }
  if (shard->data.scalar_type() != entry.dtype()) {
    return absl::StrCat("dtype mismatch for ", entry.fqn,
                        ": copying a param with dtype ",
                        TorchDtype(shard->data.scalar_type()),
                        " from checkpoint, the dtype in current model is ",
                        TorchDtype(entry.dtype()), ".");
  }
  if (shard->data.numel() != shard->numel) {
    return absl::StrCat(entry.fqn, ": the local shard's data holds ",
                        shard->data.numel(), " elements but its numel is ",
                        shard->numel, ".");
  }
  const FlatParamHandle& handle = *entry.handle;
  const ParamShard local = handle.ShardOf(entry.index, handle.rank());
  if (shard->world_size != handle.world_size() ||
      shard->rank != handle.rank() ||
      shard->flat_offset != local.param_offset || shard->numel != local.numel) {
    return absl::StrCat(
        "layout mismatch for ", entry.fqn, ": the checkpoint holds shard ",
        shard->rank, " of ", shard->world_size, ", elements [",
        shard->flat_offset, ", ", shard->flat_offset + shard->numel,
        ") of the flattened parameter; this model's shard ", handle.rank(),
        " of ", handle.world_size(), " holds [", local.param_offset, ", ",
        local.param_offset + local.numel,
        "). A sharded state dict loads only into the same world size and "
        "wrapping "
        "(resharding is not supported yet).");
  }
  return "";
}

}  // namespace

absl::Status LoadShardedStateDict(FullyShardedDataParallel& fsdp,
                                  const ShardedDict& state_dict) {
  at::NoGradGuard no_grad;
  comm::ProcessGroup& group = *fsdp.group();
  const std::string where = Where("LoadShardedStateDict", group);
  const std::vector<ModelEntry> entries = ModelEntries(fsdp);
  std::vector<const ShardedValue*> values;
  const std::string error = Validate(
      entries, state_dict, ClassName(fsdp.module()), values, CheckSharded);
  FSDP_RETURN_IF_ERROR(Agree(group, where, error));

  return CallTorch(where, [&]() -> absl::Status {
    // In state_dict order, so that a shared parameter takes its last name's
    // value.
    for (size_t i = 0; i < entries.size(); ++i) {
      const ModelEntry& entry = entries[i];
      if (entry.handle == nullptr) {
        entry.tensor.detach().copy_(std::get<at::Tensor>(*values[i]));
        continue;
      }
      const LocalShard& shard = std::get<LocalShard>(*values[i]);
      const ParamShard local =
          entry.handle->ShardOf(entry.index, entry.handle->rank());
      if (local.numel == 0) continue;
      entry.handle->flat_param()
          .detach()
          .narrow(0, local.shard_offset, local.numel)
          .copy_(shard.data.reshape({-1}));
    }
    // Gathered units hold full parameters built from the old shards: gather
    // them anew (every rank has the same units gathered, so this is a matching
    // collective).
    for (const auto& unit : fsdp.units()) {
      FlatParamHandle* handle = unit.handle;
      if (handle == nullptr || !handle->sharded() || !handle->is_unsharded())
        continue;
      handle->Reshard();
      FSDP_RETURN_IF_ERROR(handle->Unshard(), where);
    }
    return absl::OkStatus();
  });
}

}  // namespace fsdp
