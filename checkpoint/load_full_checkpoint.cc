#include "checkpoint/load_full_checkpoint.h"

#include <algorithm>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/full_checkpoint.h"
#include "comm/rank0_status.h"
#include "checkpoint/torch_load.h"
#include "comm/status_macros.h"
#include "fsdp/state_dict.h"
#include "optim_state/internal/model_index.h"
#include "optim_state/internal/scatter.h"

namespace fsdp::checkpoint {
namespace {

using optim_state::OptimStateDict;
using optim_state::StateValue;

// Reads one file's tensors unit by unit, for the hooks of LoadFullStateDict and the scatter:
// before each unit, the previous unit's storages are freed and this unit's are read. A storage
// that tensors of two units view is read for each (torch.save of a state dict never shares
// storage across units' parameters, PyTorch's FSDP full dicts hold copies).
class UnitReader {
 public:
  UnitReader(TorchStorages& storages,
             std::unordered_map<const FlatParamHandle*, std::vector<at::Tensor>> by_unit)
      : storages_(storages), by_unit_(std::move(by_unit)) {}

  // The first failed read is kept (the reads after it still run: the ranks keep going to a
  // point where they agree on it).
  absl::Status Before(const FlatParamHandle* handle) {
    storages_.Release(current_);
    current_ = by_unit_[handle];
    absl::Status read = storages_.Read(current_);
    if (!read.ok() && first_error_.ok()) first_error_ = read;
    return read;
  }
  void Finish() {
    storages_.Release(current_);
    current_.clear();
  }
  const absl::Status& first_error() const { return first_error_; }

 private:
  TorchStorages& storages_;
  std::unordered_map<const FlatParamHandle*, std::vector<at::Tensor>> by_unit_;
  std::vector<at::Tensor> current_;
  absl::Status first_error_;
};

// Unit of each FQN (null: no unit manages it).
std::unordered_map<std::string, const FlatParamHandle*> UnitOfFqn(FullyShardedDataParallel& fsdp) {
  std::unordered_map<std::string, const FlatParamHandle*> unit;
  for (const FullStateDictKey& key : FullStateDictLayout(fsdp)) unit[key.fqn] = key.handle;
  return unit;
}

void AddTensors(const StateValue& value, std::vector<at::Tensor>& out) {
  if (const at::Tensor* t = value.GetIf<at::Tensor>()) out.push_back(*t);
  if (const auto* seq = value.GetIf<optim_state::StateSequence>()) {
    for (const StateValue& item : seq->items) AddTensors(item, out);
  }
}

// Rank 0's files, read lazily (the pickles and small storages; the rest unit by unit).
struct Rank0Files {
  ModelStateDict model;
  OptimStateDict optim;
  std::unique_ptr<TorchStorages> model_storages;
  std::unique_ptr<TorchStorages> optim_storages;
};

// Rank 0's part: both pickles read, keys stripped and checked.
absl::Status ReadOnRank0(const std::string& dir, const FullyShardedDataParallel& fsdp,
                         bool read_optim, const KeyPrefixes& prefixes, Rank0Files& files) {
  const ModelNames names = ModelNames::Of(fsdp.module());
  const std::string model_path = dir + "/model.pt";
  FSDP_ASSIGN_OR_RETURN(LazyTorchLoad model, TorchLoadLazy(model_path));
  files.model_storages = std::move(model.storages);
  FSDP_ASSIGN_OR_RETURN(files.model, ModelStateDictOf(model.value, model_path));
  FSDP_ASSIGN_OR_RETURN(files.model,
                        StripKeyPrefixes(std::move(files.model), prefixes, names, model_path));
  if (!read_optim) return absl::OkStatus();
  const std::string optim_path = dir + "/optim.pt";
  FSDP_ASSIGN_OR_RETURN(LazyTorchLoad optim, TorchLoadLazy(optim_path));
  files.optim_storages = std::move(optim.storages);
  FSDP_ASSIGN_OR_RETURN(files.optim, OptimStateDictOf(optim.value, optim_path));
  FSDP_ASSIGN_OR_RETURN(files.optim,
                        StripKeyPrefixes(std::move(files.optim), prefixes, names, optim_path));
  return absl::OkStatus();
}

// The optimizer's part: optim.pt scattered unit by unit into each rank's local dict (nothing
// applied yet); every rank learns whether rank 0's reads worked.
absl::StatusOr<OptimStateDict> ScatterOptim(const Rank0Files& files, FullyShardedDataParallel& fsdp,
                                            const optim_state::OptimizerAdapter& adapter,
                                            const std::string& context) {
  comm::ProcessGroup& group = *fsdp.group();
  std::unique_ptr<UnitReader> reader;
  optim_state::internal::BeforeUnit before;
  if (group.rank() == 0) {
    const auto unit_of = UnitOfFqn(fsdp);
    std::unordered_map<const FlatParamHandle*, std::vector<at::Tensor>> by_unit;
    for (const auto& [key, state] : files.optim.state) {
      auto it = key.is_fqn() ? unit_of.find(key.fqn()) : unit_of.end();
      std::vector<at::Tensor>& tensors = by_unit[it == unit_of.end() ? nullptr : it->second];
      for (const auto& [name, value] : state) AddTensors(value, tensors);
    }
    reader = std::make_unique<UnitReader>(*files.optim_storages, std::move(by_unit));
    before = [&reader](const FlatParamHandle* h) { (void)reader->Before(h); };
  }
  absl::StatusOr<OptimStateDict> local = optim_state::internal::ScatterFullOptimState(
      files.optim, fsdp, optim_state::internal::OptimizerParams(adapter), absl::OkStatus(), nullptr,
      before);
  if (reader != nullptr) reader->Finish();
  if (!local.ok()) return Annotate(local.status(), absl::StrCat(context, ": optim.pt"));
  const std::string outcome =
      comm::EncodeStatus(reader != nullptr ? reader->first_error() : absl::OkStatus());
  absl::StatusOr<std::string> agreed = group.BroadcastObject(outcome, 0);
  if (!agreed.ok()) return Annotate(agreed.status(), context);
  FSDP_RETURN_IF_ERROR(comm::DecodeStatus(
      *agreed, absl::StrCat(context, ": optim.pt: nothing loaded, reading")));
  return local;
}

// The model's part: model.pt read unit by unit on rank 0 and applied once every unit arrived.
absl::Status LoadModel(const Rank0Files& files, FullyShardedDataParallel& fsdp,
                       const std::string& context) {
  LoadFullStateDictConfig config{.rank0_only = true};
  std::unique_ptr<UnitReader> reader;
  if (fsdp.group()->rank() == 0) {
    const auto unit_of = UnitOfFqn(fsdp);
    std::unordered_map<const FlatParamHandle*, std::vector<at::Tensor>> by_unit;
    for (const auto& [fqn, tensor] : files.model) {
      auto it = unit_of.find(fqn);
      by_unit[it == unit_of.end() ? nullptr : it->second].push_back(tensor);
    }
    reader = std::make_unique<UnitReader>(*files.model_storages, std::move(by_unit));
  }
  // Every rank sets it: it selects the staged load; only rank 0 calls it.
  config.before_unit = [&reader](const FlatParamHandle* h) { return reader->Before(h); };
  absl::Status loaded = LoadFullStateDict(fsdp, files.model, config);
  if (reader != nullptr) reader->Finish();
  return Annotate(loaded, absl::StrCat(context, ": model.pt"));
}

}  // namespace

absl::Status LoadFullCheckpoint(const std::string& dir, FullyShardedDataParallel& fsdp,
                                optim_state::OptimizerAdapter* adapter,
                                const LoadFullCheckpointOptions& options) {
  comm::ProcessGroup& group = *fsdp.group();
  const std::string context = absl::StrCat("LoadFullCheckpoint(", dir, ")");
  Rank0Files files;
  files.optim.has_param_groups = false;  // what ranks other than 0 pass to the scatter
  std::string outcome;                   // rank 0's failure (comm::EncodeStatus)
  if (group.rank() == 0) {
    outcome = comm::EncodeStatus(
        ReadOnRank0(dir, fsdp, adapter != nullptr, options.strip_key_prefixes, files));
  }
  absl::StatusOr<std::string> agreed = group.BroadcastObject(outcome, 0);
  if (!agreed.ok()) return Annotate(agreed.status(), context);
  FSDP_RETURN_IF_ERROR(comm::DecodeStatus(*agreed, context));
  OptimStateDict local;
  if (adapter != nullptr) {
    FSDP_ASSIGN_OR_RETURN(local, ScatterOptim(files, fsdp, *adapter, context));
  }
  FSDP_RETURN_IF_ERROR(LoadModel(files, fsdp, context));
  if (options.stats != nullptr && group.rank() == 0) {
    int64_t file_bytes = 0, max_live = 0;
    for (const TorchStorages* s : {files.model_storages.get(), files.optim_storages.get()}) {
      if (s == nullptr) continue;
      file_bytes += s->lazy_bytes();
      max_live = std::max(max_live, s->max_live_bytes());  // one file is streamed at a time
    }
    *options.stats = {file_bytes, max_live};
  }
  if (adapter != nullptr) {
    FSDP_RETURN_IF_ERROR(adapter->LoadStateDict(std::move(local)),
                         absl::StrCat(context, ": optim.pt"));
  }
  return absl::OkStatus();
}

}  // namespace fsdp::checkpoint
