// Key prefixes that PyTorch's wrappers add to checkpoint keys, stripped so that a full
// checkpoint saved from a wrapped PyTorch model loads into the unwrapped C++ model.
//
// A PyTorch model wrapped by DistributedDataParallel, torch.compile, checkpoint_wrapper or
// FSDP1 names its parameters through the wrapper: "module.block0.weight" (DDP),
// "_orig_mod.block0.weight" (torch.compile), "block2._checkpoint_wrapped_module.0.weight"
// (checkpoint_wrapper on block2), "block1._fsdp_wrapped_module.weight" (FSDP1's
// named_parameters()). A checkpoint keyed by those names (model.state_dict() of a DDP or
// compiled model, an optimizer state dict keyed by named_parameters()) names no parameter of
// the C++ model. StripKeyPrefixes rewrites its keys to the model's own names and checks that
// every key then names a parameter (or buffer) of the model:
//
//   FSDP_ASSIGN_OR_RETURN(KeyPrefixes prefixes, ParseKeyPrefixes("pytorch"));
//   const ModelNames names = ModelNames::Of(model);
//   FSDP_ASSIGN_OR_RETURN(ModelStateDict state,
//                         StripKeyPrefixes(std::move(state), prefixes, names, "ckpt/model.pt"));
//
// Two kinds of prefix:
//   * leading: removed from the start of a key only; a wrapper of the whole model (DDP's
//     "module."). Several may stand in a row ("module.module."), each is removed.
//   * level: a wrapper's attribute removed wherever it stands as whole components of a key,
//     the start included; a wrapper of any module ("_checkpoint_wrapped_module.").
// For each key: a key that already names a parameter (buffer) of the model is kept as it is
// (so a model with its own child called "module" keeps it); otherwise every level is removed,
// then leading prefixes one at a time until the key names one or none is left to remove.
//
// Preconditions: the optimizer state dict is keyed by FQNs (full_optim_state_dict's layout;
// optim_state/rekey.h turns an ID-keyed one into that). Keys of a model state dict are matched
// against the model's parameters and buffers, those of an optimizer state dict (its "state"
// and every group's "params") against its parameters.
//
// Errors (all INVALID_ARGUMENT, each naming `file`, nothing returned on error):
//   * a key that names no parameter (or buffer) after stripping: the first such key in the
//     file's order ("state" before "param_groups"), with what it became and the prefixes that
//     were stripped;
//   * two keys that become the same name ("module.bias" and "bias");
//   * a parameter-ID key in an optimizer state dict;
//   * a prefix that is empty, does not end with '.', or has an empty component ("a..b.").
// ParseKeyPrefixes: INVALID_ARGUMENT naming the item it cannot read.
#ifndef FSDP_CPP_CHECKPOINT_KEY_PREFIXES_H_
#define FSDP_CPP_CHECKPOINT_KEY_PREFIXES_H_

#include <torch/nn/module.h>

#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "checkpoint/full_checkpoint.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint {

// Which prefixes to strip; each ends with '.' ("module.", "_orig_mod.").
struct KeyPrefixes {
  std::vector<std::string> leading;
  std::vector<std::string> levels;

  bool empty() const { return leading.empty() && levels.empty(); }
};

// PyTorch's well-known wrappers:
//   leading "module."                     DistributedDataParallel, DataParallel
//   level   "_orig_mod."                  torch.compile's OptimizedModule (of the model or of
//                                         any submodule)
//   level   "_checkpoint_wrapped_module." checkpoint_wrapper / apply_activation_checkpointing,
//                                         offload_wrapper
//   level   "_fsdp_wrapped_module."       FSDP1's FullyShardedDataParallel (named_parameters()
//                                         outside summon_full_params, use_orig_params=True)
KeyPrefixes PyTorchKeyPrefixes();

// A comma-separated list of: "pytorch" (PyTorchKeyPrefixes()), "PREFIX." (leading, e.g.
// "net."), ".LEVEL." (a level, e.g. "._my_wrapped_module."). "" is no prefix (keys must name
// the model's parameters exactly). Repeated entries are kept once.
[[nodiscard]] absl::StatusOr<KeyPrefixes> ParseKeyPrefixes(absl::string_view spec);

// The list in ParseKeyPrefixes' syntax ("module.,._orig_mod."), or "none".
std::string KeyPrefixesToString(const KeyPrefixes& prefixes);

// The names keys must match.
struct ModelNames {
  absl::flat_hash_set<std::string> parameters;
  absl::flat_hash_set<std::string> buffers;

  // Every name `model` registers a parameter or buffer under (recursively; a shared tensor
  // under each of its names). FSDP never renames, so a wrapped model's module gives the
  // unwrapped model's names.
  static ModelNames Of(const torch::nn::Module& model);
};

// The dict with every key rewritten to a name in `names` (see above), in the same order.
// `file` is named in errors.
[[nodiscard]] absl::StatusOr<ModelStateDict> StripKeyPrefixes(ModelStateDict dict,
                                                              const KeyPrefixes& prefixes,
                                                              const ModelNames& names,
                                                              absl::string_view file);
[[nodiscard]] absl::StatusOr<optim_state::OptimStateDict> StripKeyPrefixes(
    optim_state::OptimStateDict dict, const KeyPrefixes& prefixes, const ModelNames& names,
    absl::string_view file);

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_KEY_PREFIXES_H_
