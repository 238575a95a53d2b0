// Pieces that saving and loading sharded checkpoints share (sharded_checkpoint_save.cc,
// sharded_checkpoint_load.cc): which FSDP parameter each optimizer parameter is, agreement on
// errors across ranks, and message helpers. Not for use outside :sharded_checkpoint.
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_SHARDED_CHECKPOINT_COMMON_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_SHARDED_CHECKPOINT_COMMON_H_

#include <ATen/ATen.h>

#include <chrono>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "comm/process_group.h"
#include "comm/status_macros.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "nlohmann/json.hpp"
#include "optim_state/optimizer_adapter.h"

// FSDP_ASSIGN_OR_RETURN with a context prefixed to the error.
#define CKPT_ASSIGN_OR_RETURN(lhs, expr, context) \
  CKPT_ASSIGN_OR_RETURN_IMPL_(FSDP_STATUS_CONCAT_(ckpt_statusor_, __LINE__), lhs, expr, context)
#define CKPT_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr, context)            \
  auto statusor = (expr);                                                    \
  if (!statusor.ok()) return ::fsdp::Annotate(statusor.status(), (context)); \
  lhs = std::move(statusor).value()

namespace fsdp::checkpoint::internal {

using json = nlohmann::ordered_json;

// Seconds since `start`.
double Since(std::chrono::steady_clock::time_point start);
// "Op(dir) (rank r of n, group g)", the prefix of every message.
std::string Where(absl::string_view op, const std::string& dir, const comm::ProcessGroup& g);
// Python's repr of a shape: "torch.Size([2, 3])".
std::string TorchSize(c10::IntArrayRef shape);

// What an optimizer parameter is to FSDP: a unit's flat parameter, one original parameter of
// a use_orig_params unit, or a parameter no unit manages.
enum class Role { kFlat, kOrig, kUnmanaged };

struct ParamRole {
  Role role = Role::kUnmanaged;
  FlatParamHandle* handle = nullptr;  // kFlat, kOrig
  size_t index = 0;                   // kOrig
  std::string fqn;                    // kOrig, kUnmanaged
};

// The optimizer's parameters in ID order (its groups' lists, concatenated).
std::vector<at::Tensor> OptimizerParams(const optim_state::OptimizerAdapter& adapter);
// The role of each of `params`; INVALID_ARGUMENT for a tensor the model does not own.
absl::StatusOr<std::vector<ParamRole>> Roles(const FullyShardedDataParallel& fsdp,
                                             const std::vector<at::Tensor>& params);
// The FQNs an optimizer parameter stands for.
std::vector<std::string> FqnsOf(const ParamRole& role);
// A tensor state of positive dimension (exp_avg ...), stored as pieces; others go to metadata.
bool IsPosDim(const optim_state::StateValue& v);
// Every rank's status (code + message); the first failing rank's error on every rank.
absl::Status AgreeOn(comm::ProcessGroup& group, const std::string& where,
                     const absl::Status& local);

}  // namespace fsdp::checkpoint::internal

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_SHARDED_CHECKPOINT_COMMON_H_
