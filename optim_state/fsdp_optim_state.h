// PyTorch FSDP's optimizer-state dicts for fsdp::FullyShardedDataParallel and a LibTorch
// optimizer seen through an OptimizerAdapter (optimizer_adapter.h):
//
//   FullOptimStateDict         FSDP.full_optim_state_dict(model, optim, rank0_only, group)
//   ShardFullOptimStateDict    FSDP.shard_full_optim_state_dict(full_osd, model, optim=optim)
//   ScatterFullOptimStateDict  FSDP.scatter_full_optim_state_dict(full_osd, model, optim=optim)
//   ShardedOptimStateDict      FSDP.sharded_optim_state_dict(model, optim, group)
//   FlattenShardedOptimStateDict  FSDP.flatten_sharded_optim_state_dict(sharded, model, optim)
//   RekeyFullOptimStateDictToIds  the full dict keyed by parameter IDs, as torch.optim over
//                              the unwrapped model with the same parameter groups numbers them
//
//   FSDP_ASSIGN_OR_RETURN(OptimStateDict full, FullOptimStateDict(*fsdp, adapter));
//   ... (rank 0 saves `full`; later, in a job of any world size) ...
//   FSDP_ASSIGN_OR_RETURN(OptimStateDict local, ScatterFullOptimStateDict(full, *fsdp, adapter));
//   FSDP_RETURN_IF_ERROR(adapter.LoadStateDict(local));
//
// Keys. As in PyTorch 1.13 (torch/distributed/fsdp/_optim_utils.py, _optim_state_dict), the
// full dict's "state" is keyed by parameter FQNs (the unwrapped model's names; a shared
// parameter under its first name) and each param group's "params" lists FQNs: a flat
// parameter's entry in the optimizer becomes the FQNs of all its original parameters, in
// layout order. (1.13's docstring speaks of parameter IDs, its code writes FQNs; we follow the
// code.) RekeyFullOptimStateDictToIds gives the ID-keyed form of an unwrapped optimizer.
//
// Layout of one original parameter's entry in the full dict, as 1.13 writes it: its
// positive-dimension tensor state (the flat parameter's state unflattened to the parameter's
// shape, padding dropped), in name order, then the flat parameter's zero-dimension tensor
// state (e.g. Adam's `step`), in name order, then its other values, in name order. State of
// parameters FSDP does not manage is carried as the optimizer holds it.
//
// use_orig_params. The optimizer holds each original parameter's 1-D slice of this rank's
// shard (no state where a rank's slice is empty and got no gradient). FullOptimStateDict
// gathers each unit's slices with one collective per unit and state name and gives every
// original parameter that has state on some rank its own entry (scalars from the lowest rank
// that has them); Shard/Scatter give each rank its slices back. (1.13 itself does not gather
// in this mode; later PyTorch does, as here.)
//
// Cost. Positive-dimension state moves with tensor collectives only: one all-gather per flat
// parameter (or unit) and state name when gathering (with rank0_only, when the handle's group
// is the call's group, each rank sends its shard to rank 0 only, point to point); when
// scattering, rank 0 sends each other rank its own shard of each flat parameter and state
// name (1.13 broadcasts every shard to every rank; each rank here receives only 1/N).
// Serialized objects carry only metadata (keys, state names, dtypes, scalar values,
// param_groups). With rank0_only, ranks other than 0 hold nothing gathered beyond their shard.
// Shards are cut straight from each original parameter's state (only the part that lies in
// the shard is copied); a unit's whole flat state is never built. The full dict's tensors of
// one unit and state name are views of one gathered buffer (they share its storage; nothing
// else refers to it, so the dict stays a snapshot of the optimizer's state).
//
// Preconditions: every rank of the group calls these collectives with the same model wrapping
// (the same units in the same order) and an optimizer over `fsdp.parameters()` (or parameter
// groups of its parameters, in any order per rank); the adapter was created for that
// optimizer; CPU tensors.
#ifndef FSDP_CPP_OPTIM_STATE_FSDP_OPTIM_STATE_H_
#define FSDP_CPP_OPTIM_STATE_FSDP_OPTIM_STATE_H_

#include <memory>
#include <optional>

#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optim_input.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state {

struct FullOptimStateDictOptions {
  // Only rank 0 returns the dict; other ranks return an empty one (no state, no
  // param_groups, has_param_groups == false).
  bool rank0_only = true;
  // The group to agree on keys over; null means fsdp.group(). Flat parameters are gathered
  // over their own handle's group.
  std::shared_ptr<comm::ProcessGroup> group;
  // PyTorch 1.13's deprecated `optim_input` (optim_input.h): which tensor each of the
  // optimizer's parameter IDs is, read from these parameters (groups) instead of the
  // optimizer's own param_groups. Warns (TORCH_WARN) that it is deprecated.
  std::optional<OptimInput> optim_input;
  // PyTorch 2.0's `optim_state_dict=` argument: the optimizer's own dict (ID-keyed, as
  // OptimizerAdapter::StateDict returns it, possibly edited) used in place of
  // adapter.StateDict(). Null: adapter.StateDict(). Must outlive the call.
  const OptimStateDict* optim_state_dict = nullptr;
};

// FSDP.full_optim_state_dict: the optimizer state of the unwrapped model, keyed by FQN. A
// collective: every rank calls it.
// Errors:
//   * INVALID_ARGUMENT "FullOptimStateDict: the optimizer holds a parameter that is neither a
//     flat parameter, an original parameter of a unit, nor an unmanaged parameter of the model";
//   * FAILED_PRECONDITION with PyTorch's text "FSDP currently requires each rank to have at
//     least the optimizer states needed by rank 0's optimizer but some ranks are missing some
//     of those states", then per rank "Rank <r> is missing states for the parameters:
//     [('fqn', ...), ...]" (returned on every rank);
//   * UNIMPLEMENTED for a scalar state value that is a tuple/list/sharded tensor under
//     use_orig_params (it would have to travel as metadata);
//   * INVALID_ARGUMENT "<where> <id> is not a parameter ID of the optimizer|optim_input (<n>
//     parameters)" for an ID of the optimizer's dict past the parameters (possible with
//     optim_input or optim_state_dict), "... is a parameter name ..." for an FQN key there;
//     "Optimizer input should not be empty" (PyTorch's text) for an empty optim_input;
// Under use_orig_params, as PyTorch 2.0 (which merges the ranks' keys then), the state of
// parameters FSDP does not manage is each rank's own and is not checked against rank 0's.
//   * the adapter's and the collectives' errors, with context.
[[nodiscard]] absl::StatusOr<OptimStateDict> FullOptimStateDict(
    FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    const FullOptimStateDictOptions& options = {});

// The FQN-keyed full dict (as FullOptimStateDict returns it) re-keyed by parameter IDs: the
// i-th FQN across param_groups' "params" becomes ID i, in "state" and "param_groups". This is
// the dict torch.optim over the unwrapped model (same groups, same order) produces.
// Errors: INVALID_ARGUMENT for a dict without param_groups, a key that is already an ID, a
// state FQN in no group.
[[nodiscard]] absl::StatusOr<OptimStateDict> RekeyFullOptimStateDictToIds(
    const OptimStateDict& full_osd);

// FSDP.shard_full_optim_state_dict: the dict this rank's optimizer loads (keyed by this
// optimizer's parameter IDs): each flat parameter's unflattened states flattened in its layout
// (zeros for original parameters without state), padded, and cut to this rank's shard; with
// use_orig_params each original parameter's slice; unmanaged parameters' state as it is.
// Param groups list this optimizer's IDs for the FQNs they name (a dict without param_groups
// gives one without). Local: no communication. Parameters of the model that the optimizer
// does not hold are skipped (1.13 fails on them with a KeyError).
// Errors (INVALID_ARGUMENT, PyTorch's texts where it has them, prefixed
// "ShardFullOptimStateDict: "):
//   * a state key that is an ID (the full dict is FQN-keyed);
//   * "Differing optimizer state names for the unflattened parameters: [...]";
//   * "Differing optimizer state types for state <name>, values [...], and unflattened
//     parameter names [...]";
//   * "All unflattened parameters comprising a single flat parameter must have
//     positive-dimension tensor state with the same dtype but got dtypes {...} for state
//     <name> and unflattened parameter names [...]";
//   * "Tensor optimizer state does not have same shape as its parameter: torch.Size([...])
//     torch.Size([...])";
//   * "All unflattened parameters comprising a single flat parameter must have scalar
//     state with the same value and dtype but got values {...} and dtypes {...} for state
//     <name> and unflattened parameter names [...]" (zero-dimension tensors; for other scalars
//     "... but got values {...} for state <name> and  unflattened parameter names [...]");
//   * "param_groups[<g>] lists '<fqn>', which is not a parameter of this optimizer".
[[nodiscard]] absl::StatusOr<OptimStateDict> ShardFullOptimStateDict(
    const OptimStateDict& full_osd, FullyShardedDataParallel& fsdp,
    const OptimizerAdapter& adapter);
// FSDP.shard_full_optim_state_dict(full_osd, model, optim_input=...): keyed by the IDs the
// optimizer constructed from `optim_input` would give. Warns that optim_input is deprecated.
// Errors: as above; "Optimizer input should not be empty" for an empty optim_input.
[[nodiscard]] absl::StatusOr<OptimStateDict> ShardFullOptimStateDict(
    const OptimStateDict& full_osd, FullyShardedDataParallel& fsdp,
    const OptimInput& optim_input);
// FSDP.shard_full_optim_state_dict(full_osd, model) (neither optim nor optim_input): as PyTorch,
// the optimizer is taken to be over fsdp.parameters() in that order.
[[nodiscard]] absl::StatusOr<OptimStateDict> ShardFullOptimStateDict(
    const OptimStateDict& full_osd, FullyShardedDataParallel& fsdp);

// FSDP.scatter_full_optim_state_dict: as ShardFullOptimStateDict, but only rank 0 needs the
// full dict (`full_osd` is ignored elsewhere; pass an empty one). Rank 0 flattens it,
// broadcasts the metadata as one object and sends each rank its shard of each
// positive-dimension state (point to point). A collective over `group` (null:
// fsdp.group()).
// Errors: those of ShardFullOptimStateDict, found on rank 0 and returned on every rank (with
// "rank 0: " in the message); UNIMPLEMENTED for hyper-parameters or scalar states that are
// sharded tensors; collective errors.
[[nodiscard]] absl::StatusOr<OptimStateDict> ScatterFullOptimStateDict(
    const OptimStateDict& full_osd, FullyShardedDataParallel& fsdp,
    const OptimizerAdapter& adapter, std::shared_ptr<comm::ProcessGroup> group = nullptr);
// FSDP.scatter_full_optim_state_dict(full_osd, model, optim_input=..., group): keyed by the IDs
// `optim_input` gives (per rank). Warns that optim_input is deprecated. An empty optim_input
// ("Optimizer input should not be empty") is reported after the collective, on that rank.
[[nodiscard]] absl::StatusOr<OptimStateDict> ScatterFullOptimStateDict(
    const OptimStateDict& full_osd, FullyShardedDataParallel& fsdp, const OptimInput& optim_input,
    std::shared_ptr<comm::ProcessGroup> group = nullptr);

// FSDP.sharded_optim_state_dict (1.13): FullOptimStateDict's dict on every rank, with each
// managed parameter's positive-dimension state replaced by this rank's chunk of it along
// dimension 0 (torch.chunk into world-size chunks of ceil(dim0 / world size) rows, as 1.13's
// _create_chunk_sharded_tensor): a ShardedTensorValue with the global shape and the chunk's
// offsets; ranks past the last chunk hold an empty local tensor ([0, ...], offset dim0).
// Unmanaged parameters' state and scalars are as in the full dict. A collective over `group`
// (null: fsdp.group()). As 1.13, every rank gathers each flat parameter's full state and
// chunks it at once, so a rank holds at most one unit's full state beyond its chunks.
// Errors: FullOptimStateDict's, prefixed "ShardedOptimStateDict: ".
// `optim_state_dict`: as FullOptimStateDictOptions::optim_state_dict.
[[nodiscard]] absl::StatusOr<OptimStateDict> ShardedOptimStateDict(
    FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    std::shared_ptr<comm::ProcessGroup> group = nullptr,
    const OptimStateDict* optim_state_dict = nullptr);

// FSDP.flatten_sharded_optim_state_dict: the dict this rank's optimizer loads from a sharded
// dict (as ShardedOptimStateDict makes it, possibly saved by another world size: any pieces
// with consistent offsets). Each unit's ShardedTensorValues are gathered with one all-gather
// per unit and state name (every rank's pieces packed into one buffer; metadata as one
// object), then flattened and cut as ShardFullOptimStateDict does. A collective over `group`.
// State of a parameter this model does not manage that the dict holds sharded (saved under a
// wrapping where a unit managed it, e.g. NestedModel's `wrap` loaded into `wrap_alt`) is
// gathered the same way and loaded whole, as the optimizer keeps it; PyTorch 2.0 leaves such
// state a ShardedTensor, which its optimizer cannot use.
// Errors: INVALID_ARGUMENT for an ID key, a sharded value whose local shard, offsets and
// global shape disagree or lie outside the global shape, pieces of different dtypes; then
// ShardFullOptimStateDict's errors, prefixed "FlattenShardedOptimStateDict: "; collective
// errors.
[[nodiscard]] absl::StatusOr<OptimStateDict> FlattenShardedOptimStateDict(
    const OptimStateDict& sharded_osd, FullyShardedDataParallel& fsdp,
    const OptimizerAdapter& adapter, std::shared_ptr<comm::ProcessGroup> group = nullptr);

}  // namespace fsdp::optim_state

#endif  // FSDP_CPP_OPTIM_STATE_FSDP_OPTIM_STATE_H_
