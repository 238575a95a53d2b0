// Full checkpoint files, as a PyTorch FSDP user saves them: DIR/model.pt (a FULL_STATE_DICT
// model state dict, FQN -> tensor) and DIR/optim.pt (the full optimizer state dict, FQN-keyed
// as FSDP's full_optim_state_dict lays it out), in torch.save's zip format. Python's torch.load
// reads what we write, with weights_only=True (torch::pickle_save's format without its
// TorchScript type tags, which weights_only refuses); we read both our
// files and Python's torch.save files (checkpoint/torch_load.h; nothing is executed).
//
// WriteFullCheckpoint writes DIR/model.pt and DIR/optim.pt as a pair, atomically: both go into a
// fresh staging directory that replaces DIR in one rename (checkpoint/atomic_dir.h), so a crash
// at any instant leaves DIR holding the old pair or the new one, never a mix.
//
// Errors: INTERNAL when a file cannot be written (naming it, with errno's text);
// INVALID_ARGUMENT / DATA_LOSS from TorchLoad for unreadable files; INVALID_ARGUMENT when a
// file's contents are not a model state dict (a dict of str -> tensor) or an optimizer state
// dict ({"state": {...}, "param_groups": [...]}), naming the file and the offending entry.
#ifndef FSDP_CPP_CHECKPOINT_FULL_CHECKPOINT_H_
#define FSDP_CPP_CHECKPOINT_FULL_CHECKPOINT_H_

#include <ATen/ATen.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/py_value.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint {

using ModelStateDict = std::vector<std::pair<std::string, at::Tensor>>;

[[nodiscard]] absl::Status WriteModelStateDict(const ModelStateDict& state,
                                               const std::string& path);
[[nodiscard]] absl::StatusOr<ModelStateDict> ReadModelStateDict(const std::string& path);

// Sharded tensor values are refused (a full dict holds whole tensors).
[[nodiscard]] absl::Status WriteOptimStateDict(const optim_state::OptimStateDict& state,
                                               const std::string& path);
[[nodiscard]] absl::StatusOr<optim_state::OptimStateDict> ReadOptimStateDict(
    const std::string& path);

// The same from a value TorchLoad (or TorchLoadLazy) read from `path` (named in messages).
[[nodiscard]] absl::StatusOr<ModelStateDict> ModelStateDictOf(const PyValue& value,
                                                              const std::string& path);
[[nodiscard]] absl::StatusOr<optim_state::OptimStateDict> OptimStateDictOf(const PyValue& value,
                                                                           const std::string& path);

// DIR/model.pt (+ DIR/optim.pt unless `optim` is null), atomically (see above), with
// `extra_files` (name -> contents, e.g. a training program's progress file) in the same
// commit. Every value is converted and pickled before anything is written; the tensors' bytes
// are then streamed from the tensors into the files (no copy of a whole file in memory), which
// are torch::pickle_save's but for its type tags. The parent of DIR must exist.
// A value read from a pickle as an optimizer state value (None, bool, int, float, str, tensor,
// tuples and lists of them); INVALID_ARGUMENT naming `where` for anything else (a dict...).
[[nodiscard]] absl::StatusOr<optim_state::StateValue> StateValueFromPyValue(
    const PyValue& value, const std::string& where);

[[nodiscard]] absl::Status WriteFullCheckpoint(
    const std::string& dir, const ModelStateDict& model, const optim_state::OptimStateDict* optim,
    const std::map<std::string, std::string>& extra_files = {});

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_FULL_CHECKPOINT_H_
