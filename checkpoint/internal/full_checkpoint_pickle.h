// The pickles (data.pkl) of a full checkpoint's two files: model.pt's dict of FQN -> tensor and
// optim.pt's {"state": {key: {name: value}}, "param_groups": [...]}, as torch.save's reader
// sees them (torch_save_archive.h). Their tensors may be placeholders.
// Errors: INVALID_ARGUMENT naming `path` and the entry for a value a full checkpoint cannot
// hold (a sharded tensor); LibTorch's exception text ("serializing PATH").
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_FULL_CHECKPOINT_PICKLE_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_FULL_CHECKPOINT_PICKLE_H_

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoint/internal/torch_save_archive.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint::internal {

// checkpoint::ModelStateDict (full_checkpoint.h).
[[nodiscard]] absl::StatusOr<Pickled> PickleModel(
    const std::vector<std::pair<std::string, at::Tensor>>& state, const std::string& path);
[[nodiscard]] absl::StatusOr<Pickled> PickleOptim(const optim_state::OptimStateDict& state,
                                                  const std::string& path);

}  // namespace fsdp::checkpoint::internal

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_FULL_CHECKPOINT_PICKLE_H_
