// Model state dicts of FSDP models, as PyTorch FSDP's FULL_STATE_DICT and
// SHARDED_STATE_DICT.
//
// Purpose. Save and restore the parameters and buffers of a model wrapped by
// FullyShardedDataParallel under the names (FQNs) of the unwrapped model:
//   * FullStateDict / LoadFullStateDict: every parameter and buffer as a full
//   tensor, in
//     torch's state_dict order (each module's parameters, then its buffers,
//     then its children recursively). A checkpoint of this form is what
//     torch.save(model.state_dict()) of the unwrapped model holds, so it moves
//     between world sizes, wrappings and programs.
//   * ShardedStateDict / LoadShardedStateDict: every rank keeps only its own
//   part. A parameter
//     that an FSDP unit manages becomes a LocalShard, this rank's slice of the
//     flattened parameter (as FSDP's flat parameter cuts it); parameters FSDP
//     does not manage (outside every unit, or in ignored modules) and buffers
//     are full tensors. Loading needs the same world size and wrapping;
//     LocalShard carries the global shape and the slice's offset in the
//     flattened parameter so that a later resharding step can rebuild any other
//     layout.
//
//   FSDP_ASSIGN_OR_RETURN(auto dict, fsdp::FullStateDict(*model, {.rank0_only =
//   true}));
//   ...
//   FSDP_RETURN_IF_ERROR(fsdp::LoadFullStateDict(*model, dict, {.rank0_only =
//   true}));
//
// Preconditions (all functions): every rank of the FSDP model's group calls the
// function with the same config, in the same order relative to other
// collectives (each is a collective unless said otherwise); the model is idle
// (not between a forward and its backward) — as in PyTorch, which asserts an
// IDLE training state. Loading works whether units are currently sharded or
// gathered: a following forward uses the loaded values. Loading does not touch
// gradients or optimizer state.
//
// Errors (absl::Status; nothing throws — LibTorch exceptions are caught and
// mapped):
//   * INVALID_ARGUMENT from the loads, decided before anything is changed (the
//   model is left
//     exactly as it was), with PyTorch's load_state_dict texts under
//     "Error(s) in loading state_dict for <Module>:":
//       'Missing key(s) in state_dict: "a", "b". '
//       'Unexpected key(s) in state_dict: "c". '
//       'size mismatch for X: copying a param with shape torch.Size([7, 6])
//       from checkpoint,
//        the shape in current model is torch.Size([6, 7]).'
//     and our own for what torch does not refuse: a dtype mismatch, an
//     undefined tensor, a key given twice, a LocalShard whose layout (world
//     size, rank, slice of the flattened parameter) differs from this model's,
//     a full tensor where a shard is expected or the reverse, a non-empty dict
//     on a rank other than 0 under rank0_only. The ranks agree before anything
//     changes: if any rank refuses its input, every rank returns
//     INVALID_ARGUMENT (naming the refusing rank) and no rank changes its
//     model.
//   * DEADLINE_EXCEEDED / UNAVAILABLE / INTERNAL from the collectives (see
//     comm/process_group.h), annotated with the unit's FQNs. After those the
//     group is broken and a load may have been applied partly: end the job.
//   Every message starts with the operation, this rank and the group.
#ifndef FSDP_CPP_FSDP_STATE_DICT_H_
#define FSDP_CPP_FSDP_STATE_DICT_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "fsdp/fully_sharded_data_parallel.h"

namespace fsdp {

// (FQN, tensor) in torch's state_dict order.
using StateDict = std::vector<std::pair<std::string, at::Tensor>>;

// PyTorch's torch.distributed.fsdp.FullStateDictConfig.
struct FullStateDictConfig {
  // Tensors end on the CPU. Gloo FSDP keeps everything on the CPU already, so
  // this changes nothing today; kept for parity with PyTorch (which needs it to
  // save GPU memory).
  bool offload_to_cpu = false;
  // Only rank 0 returns the dict; the other ranks take part in the gathers unit
  // by unit and drop each unit's values at once, so they never hold more than
  // one unit's full parameters.
  bool rank0_only = false;
};

// FULL_STATE_DICT: every parameter and buffer under each FQN it is registered
// with (a shared parameter appears under each of its names, as one tensor), as
// full tensors that are copies (later training does not change them). A
// collective (one all-gather per sharded unit). With rank0_only, ranks other
// than 0 return an empty list.
[[nodiscard]] absl::StatusOr<StateDict> FullStateDict(
    FullyShardedDataParallel& fsdp, const FullStateDictConfig& config = {});

// FULL_STATE_DICT's keys without their values gathered, for writers that stream the dict unit
// by unit (checkpoint/save_full_checkpoint.h): FullStateDict's keys in its order, each with the
// unit that manages it (`handle`, the parameter's index in it; FullStateDict's value is a copy
// of that slice of the unit's GatherFullFlat()) or, for an unmanaged parameter or buffer, the
// value FullStateDict gives (a copy; one per tensor, shared by its FQNs). Not a collective.
struct FullStateDictKey {
  std::string fqn;
  FlatParamHandle* handle = nullptr;
  size_t index = 0;
  at::Tensor value;  // unmanaged only
};
[[nodiscard]] std::vector<FullStateDictKey> FullStateDictLayout(
    FullyShardedDataParallel& fsdp);

struct LoadFullStateDictConfig {
  // Only rank 0 passes the dict; the other ranks pass an empty one and receive
  // rank 0's values unit by unit (one broadcast per unit, unmanaged parameter
  // and buffer).
  bool rank0_only = false;
  // For a dict whose tensors are read from a file unit by unit
  // (checkpoint/load_full_checkpoint.h), with rank0_only: rank 0 calls it
  // before it reads a unit's values (the unit's handle; null before the
  // parameters and buffers no unit manages, which come last). Then every rank
  // keeps what it receives aside (its own shard of each unit; the whole where
  // the unit is unsharded or gathered) and changes the model only after the
  // last value arrived and the ranks learned rank 0's outcome: if a call
  // failed (its unit is sent as the dict then holds, e.g. zeros), every rank
  // returns that error (its code, "nothing loaded: rank 0: " and its message)
  // with the model unchanged. INVALID_ARGUMENT without rank0_only.
  std::function<absl::Status(const FlatParamHandle*)> before_unit;
};

// Loads a full state dict (as FullStateDict returns, or torch's state_dict of
// the unwrapped model): keys must be exactly the model's FQNs, with each
// tensor's shape and dtype. Each unit writes its shard into its flat parameter
// (NO_SHARD: the whole) and, if the unit is gathered, its full parameters;
// unmanaged parameters and buffers are copied directly. A shared parameter
// given under several names takes the value of its last name in state_dict
// order (as torch's load_state_dict). Every rank must pass the same values
// (identical replicas).
[[nodiscard]] absl::Status LoadFullStateDict(
    FullyShardedDataParallel& fsdp, const StateDict& state_dict,
    const LoadFullStateDictConfig& config = {});

// One rank's part of one parameter that an FSDP unit manages (PyTorch: a
// ShardedTensor with one local shard). The parameter, flattened in row-major
// order to global_numel() elements, is laid into the unit's flat parameter at
// `offset_in_flat_param`; the flat parameter (padded to `world_size` equal
// shards) is cut into `world_size` shards and shard `rank` holds elements
// [flat_offset, flat_offset + numel) of the flattened parameter, stored in
// `data`. The slices of all ranks of one FQN tile [0, global_numel()) without
// overlap (some may be empty), so any other layout can be rebuilt from them.
// Under NO_SHARD world_size is 1 and the one slice is the whole parameter.
struct LocalShard {
  at::Tensor data;                    // 1-D, `numel` elements (a copy)
  std::vector<int64_t> global_shape;  // the original parameter's shape
  int64_t flat_offset =
      0;               // first element of the slice in the flattened parameter
  int64_t numel = 0;   // elements in the slice (0: this rank holds none)
  int rank = 0;        // which shard of the flat parameter this slice lies in
  int world_size = 1;  // how many shards the flat parameter is cut into
  // Where the parameter sits in its FSDP unit (for resharding and diagnostics).
  std::string unit_prefix;  // FQN prefix of the unit's module ("" for the root)
  int64_t offset_in_flat_param =
      0;  // the parameter's offset in the unit's unpadded flat tensor
  int64_t flat_param_numel = 0;  // the unit's unpadded flat tensor's numel
  int64_t shard_offset = 0;      // the slice's offset in shard `rank`

  int64_t global_numel() const;
};

// A sharded state dict value: a LocalShard for a parameter an FSDP unit
// manages, a full tensor (a copy) for any other parameter and for buffers.
using ShardedValue = std::variant<at::Tensor, LocalShard>;
using ShardedDict = std::vector<std::pair<std::string, ShardedValue>>;

// SHARDED_STATE_DICT: every FQN in torch's state_dict order with this rank's
// value. Not a collective: each rank reads its own shards.
//
// Layout note: PyTorch 1.13's SHARDED_STATE_DICT chunks each gathered parameter
// along dim 0 (ChunkShardingSpec); we keep FSDP's own flat-parameter slices
// instead (no communication to save), and carry global shape and flat offsets
// so that a converter can produce either.
//
// `views`: the values are views of the live model (its flat shards, parameters
// and buffers) instead of copies, for a caller that reads or copies them before
// anything changes the model (an optimizer step, a forward pass, a load): the
// sharded checkpoint's save, which would otherwise copy every byte twice.
[[nodiscard]] absl::StatusOr<ShardedDict> ShardedStateDict(
    FullyShardedDataParallel& fsdp, bool views = false);

// Loads a sharded state dict saved by a model of the same world size and
// wrapping, on the same rank. Keys, shapes and dtypes are checked as
// LoadFullStateDict does; each LocalShard must be exactly this rank's slice
// (world size, rank, flat_offset, numel), else INVALID_ARGUMENT naming the FQN
// and both layouts. A collective (agreement, and a re-gather of units that are
// currently gathered).
[[nodiscard]] absl::Status LoadShardedStateDict(FullyShardedDataParallel& fsdp,
                                                const ShardedDict& state_dict);

}  // namespace fsdp

#endif  // FSDP_CPP_FSDP_STATE_DICT_H_
