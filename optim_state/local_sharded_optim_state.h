// LocalShardedOptimStateDict: a SHARDED_STATE_DICT optimizer state dict made of this rank's own
// flat-shard pieces, with no communication and no copy (as FSDP2's get_optimizer_state_dict,
// whose values are views of each rank's DTensor shards).
//
//   FSDP_ASSIGN_OR_RETURN(OptimStateDict osd, LocalShardedOptimStateDict(*fsdp, adapter));
//   ... save osd's pieces; later, in a job of any world size, wrapping or use_orig_params ...
//   FSDP_ASSIGN_OR_RETURN(OptimStateDict local, FlattenShardedOptimStateDict(osd, *fsdp, adapter));
//
// What a user sees is FSDP1's sharded dict (fsdp_optim_state.h, ShardedOptimStateDict): "state"
// keyed by the unwrapped model's FQNs, each managed original parameter's entry in FSDP1's order
// (positive-dimension states, zero-dimension ones, others; each group of names sorted), its
// positive-dimension states as ShardedTensorValues with the parameter's global shape, scalars
// (`step`) as the optimizer holds them, unmanaged parameters' state as it is, param_groups
// listing FQNs. Only the form of the sharded values differs, and why: FSDP1 chunks each state
// along dimension 0, which this rank does not hold (its flat shard cuts parameters at any
// element), so that form needs FSDP1's gather of the whole state and a copy (24-31x FSDP2's
// time, bench/README.md). Here a value holds the elements of the parameter that lie in this
// rank's flat shard, elements [a, b) of the parameter flattened, as the boxes (offsets and
// sizes, `local` and `more_shards`) that make up that range: at most 2 x rank - 1 of them
// (a partial row, whole rows, a partial row for a matrix), each one a view of the optimizer's
// flat state. A rank whose slice of a parameter is empty holds one empty box ([0, ...] at
// offset 0). So the dict shares memory with the optimizer: a later step changes it (clone it,
// CloneOptimStateDict, to keep a snapshot).
//
// Loading. FlattenShardedOptimStateDict (and OptimStateDictToLoad under SHARDED_STATE_DICT)
// takes both forms. At the layout that made the dict, every rank finds its pieces are its
// shard and nothing moves but one agreement of a few bytes; each state's loaded tensor is then
// the pieces' own storage where they form this rank's shard in place (no copy). At another
// world size, wrapping or use_orig_params, each rank receives from each other rank only the
// parts of its pieces that its shard needs (pairwise, fsdp_optim_state.h). A rank may pass an
// empty dict (it held no pieces): it takes the entries' scalars and param_groups of the
// lowest rank that has them.
//
// Under use_orig_params, a parameter whose slice on this rank is empty and that has no state
// there (it got no gradient) has no entry on this rank, as the optimizer holds none; FSDP1's
// sharded dict gives every rank every entry (through its gather).
//
// Preconditions: those of fsdp_optim_state.h (an optimizer over fsdp.parameters(), the
// adapter made for it, CPU tensors). Not a collective: each rank calls it alone.
// Errors (INVALID_ARGUMENT, prefixed "LocalShardedOptimStateDict: "): the optimizer holds a
// tensor FSDP does not know; an ID of `optim_state_dict` past the optimizer's parameters; a
// flat parameter's positive-dimension state that is not 1-D of its shard's size (naming the
// unit's FQNs and the state); the adapter's errors.
#ifndef FSDP_CPP_OPTIM_STATE_LOCAL_SHARDED_OPTIM_STATE_H_
#define FSDP_CPP_OPTIM_STATE_LOCAL_SHARDED_OPTIM_STATE_H_

#include "absl/status/statusor.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state {

// `optim_state_dict`: PyTorch 2.0's `optim_state_dict=` (the optimizer's own ID-keyed dict,
// used in place of adapter.StateDict()); null: adapter.StateDict().
[[nodiscard]] absl::StatusOr<OptimStateDict> LocalShardedOptimStateDict(
    FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    const OptimStateDict* optim_state_dict = nullptr);

}  // namespace fsdp::optim_state

#endif  // FSDP_CPP_OPTIM_STATE_LOCAL_SHARDED_OPTIM_STATE_H_
