#include "checkpoint/load_full_checkpoint.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/internal/rank0_status.h"
#include "comm/status_macros.h"
#include "fsdp/state_dict.h"
#include "optim_state/fsdp_optim_state.h"

namespace fsdp::checkpoint {
namespace {

using optim_state::OptimStateDict;

// Rank 0's part: both files read, keys stripped and checked.
absl::Status ReadOnRank0(const std::string& dir, const FullyShardedDataParallel& fsdp,
                         bool read_optim, const KeyPrefixes& prefixes, ModelStateDict& model,
                         OptimStateDict& optim) {
  const ModelNames names = ModelNames::Of(fsdp.module());
  const std::string model_path = dir + "/model.pt";
  FSDP_ASSIGN_OR_RETURN(model, ReadModelStateDict(model_path));
  FSDP_ASSIGN_OR_RETURN(model, StripKeyPrefixes(std::move(model), prefixes, names, model_path));
  if (!read_optim) return absl::OkStatus();
  const std::string optim_path = dir + "/optim.pt";
  FSDP_ASSIGN_OR_RETURN(optim, ReadOptimStateDict(optim_path));
  FSDP_ASSIGN_OR_RETURN(optim, StripKeyPrefixes(std::move(optim), prefixes, names, optim_path));
  return absl::OkStatus();
}

}  // namespace

absl::Status LoadFullCheckpoint(const std::string& dir, FullyShardedDataParallel& fsdp,
                                optim_state::OptimizerAdapter* adapter,
                                const LoadFullCheckpointOptions& options) {
  comm::ProcessGroup& group = *fsdp.group();
  const std::string context = absl::StrCat("LoadFullCheckpoint(", dir, ")");
  ModelStateDict model;
  OptimStateDict optim;
  optim.has_param_groups = false;  // what ranks other than 0 pass to the scatter
  std::string outcome;             // rank 0's failure (internal::EncodeStatus)
  if (group.rank() == 0) {
    outcome = internal::EncodeStatus(
        ReadOnRank0(dir, fsdp, adapter != nullptr, options.strip_key_prefixes, model, optim));
  }
  absl::StatusOr<std::string> agreed = group.BroadcastObject(outcome, 0);
  if (!agreed.ok()) return Annotate(agreed.status(), context);
  FSDP_RETURN_IF_ERROR(internal::DecodeStatus(*agreed, context));
  OptimStateDict local;
  if (adapter != nullptr) {
    absl::StatusOr<OptimStateDict> scattered =
        optim_state::ScatterFullOptimStateDict(optim, fsdp, *adapter);
    if (!scattered.ok()) return Annotate(scattered.status(), absl::StrCat(context, ": optim.pt"));
    local = *std::move(scattered);
  }
  FSDP_RETURN_IF_ERROR(LoadFullStateDict(fsdp, model, {.rank0_only = true}),
                       absl::StrCat(context, ": model.pt"));
  if (adapter != nullptr) {
    FSDP_RETURN_IF_ERROR(adapter->LoadStateDict(std::move(local)),
                         absl::StrCat(context, ": optim.pt"));
  }
  return absl::OkStatus();
}

}  // namespace fsdp::checkpoint
