// Where a model's and an optimizer's state stand among the keys of a torch.distributed.checkpoint
// (DCP) directory, and how a flat range of a tensor maps onto DCP's chunks (boxes). What both
// reading (dcp_load) and writing DCP from an FSDP job share.
//
// dcp.save flattens the nested state dict it is given (torch/distributed/checkpoint/
// _nested_dict.py, _traverse.py: dict keys and list indices joined by '.'; a list holding no
// dict or tensor is one value) and records each key's path in .metadata's planner_data. The
// dicts of get_model_state_dict / get_optimizer_state_dict (PyTorch 2.13), nested under a path P,
// flatten to:
//   P_model.<fqn>                          a parameter or buffer (tensor)
//   P_optim.state.<fqn>.<name>             optimizer state (tensor; `step` a 0-dim tensor)
//   P_optim.param_groups.<g>.<hp>          a group's hyperparameter (bytes: a pickled value)
//   P_optim.param_groups.<g>.params        the group's FQN list (bytes)
// with P_model, P_optim = "model", "optimizer" (torchtitan's {"model": ..., "optimizer": ...}),
// "app.model", "app.optim" (the DCP tutorial's {"app": {"model": ..., "optim": ...}}, an
// AppState's state_dict()), or paths the caller names. State names hold no '.', so the last one
// of an optimizer state key separates the FQN from the name even without planner_data.
//
// A flat element range [begin, end) of a row-major tensor is, in DCP's terms, a set of boxes
// (ChunkStorageMetadata: offsets, sizes). FlatRangeToBoxes cuts it into the fewest boxes that are
// each a contiguous piece of it, in flat order (a box fixes a prefix of the indices, takes a
// range of one dimension and the whole of every later one): a box's row-major contents are then
// a plain slice of the flat range, read or written without a gather or scatter. At most 2d - 1
// boxes for d dimensions. (Boxes free to interleave can be fewer: [1, 9) of a 3 x 4 tensor is
// rows 0-1 x columns 1-3 and rows 1-2 x column 0, but neither is a slice of the range.) A flat
// FSDP shard's piece of a parameter is such a range.
//
// Errors (INVALID_ARGUMENT, each naming `file` where there is one):
//   ParseDcpLayout     a spec it cannot read (naming it).
//   DetectDcpLayout    no known layout fits (no key under "model." nor "app.model."), listing the
//                      checkpoint's top-level keys and how to name a layout.
//   SplitDcpKeys       a key under the optimizer's path that is neither state.<fqn>.<name> nor
//                      param_groups.<g>.<hp>; group indices that are not 0..n-1.
//   FlatRangeToBoxes   begin > end, begin < 0 or end beyond the tensor's element count.
#ifndef FSDP_CPP_CHECKPOINT_DCP_LAYOUT_H_
#define FSDP_CPP_CHECKPOINT_DCP_LAYOUT_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "checkpoint/dcp_metadata.h"

namespace fsdp::checkpoint::dcp {

// The paths of the model's and the optimizer's state dicts in the nested dict dcp.save took.
struct DcpLayout {
  std::string name;                     // "torchtitan", "tutorial" or "custom", for messages
  std::vector<std::string> model_path;  // empty: the model's FQNs are top-level keys
  std::vector<std::string> optim_path;  // empty: no optimizer state in this layout

  // "model." / "app.model." (empty for an empty path): what every model key starts with.
  std::string ModelPrefix() const;
  std::string OptimPrefix() const;
  bool has_optimizer() const { return !optim_path.empty(); }
  // "torchtitan's {"model", "optimizer"}", or the paths, for messages.
  std::string Describe() const;
};

DcpLayout TorchtitanLayout();  // {"model": ..., "optimizer": ...}
DcpLayout TutorialLayout();    // {"app": {"model": ..., "optim": ...}}

// "torchtitan", "tutorial", or "model=A.B,optim=C.D" (dotted paths; "model=,optim=" would be a
// bare model state dict without optimizer: an empty optim path means none).
absl::StatusOr<DcpLayout> ParseDcpLayout(absl::string_view spec);

// The first known layout (torchtitan's, then the tutorial's) with at least one key under its
// model path. `file` (the .metadata path) names the checkpoint in the error.
absl::StatusOr<DcpLayout> DetectDcpLayout(const Metadata& metadata, const std::string& file);

// A flattened key and its planner_data path.
struct DcpKey {
  std::string key;
  std::vector<PathElement> path;
};

DcpKey DcpModelKey(const DcpLayout& layout, absl::string_view fqn);
DcpKey DcpOptimStateKey(const DcpLayout& layout, absl::string_view fqn, absl::string_view name);
// `hyper_param` "params" is the group's FQN list.
DcpKey DcpParamGroupKey(const DcpLayout& layout, int64_t group, absl::string_view hyper_param);

// A checkpoint's keys sorted by what they hold under `layout`.
struct DcpStateKeys {
  std::map<std::string, std::string> model;                               // fqn -> key
  std::map<std::string, std::map<std::string, std::string>> optim_state;  // fqn -> name -> key
  std::vector<std::map<std::string, std::string>> param_groups;           // group -> hp -> key
  std::vector<std::string> other;  // keys under neither path (a load ignores them)
};

// Uses each key's planner_data path when .metadata has one, its text otherwise.
absl::StatusOr<DcpStateKeys> SplitDcpKeys(const Metadata& metadata, const DcpLayout& layout,
                                          const std::string& file);

// The fewest boxes of `shape`, each a contiguous piece of the flat row-major range [begin, end),
// covering exactly it, in flat order (see the top). A 0-dim tensor's [0, 1) is one box with
// empty offsets and sizes; an empty range none.
absl::StatusOr<std::vector<ChunkStorageMetadata>> FlatRangeToBoxes(
    const std::vector<int64_t>& shape, int64_t begin, int64_t end);

}  // namespace fsdp::checkpoint::dcp

#endif  // FSDP_CPP_CHECKPOINT_DCP_LAYOUT_H_
