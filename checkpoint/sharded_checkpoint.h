// Sharded checkpoints of an FSDP model and its optimizer: every rank writes its own part
// straight from its flat-parameter shard, and a job of any world size, wrapping,
// use_orig_params setting or sharding strategy loads it, each rank reading only the byte ranges
// its shard needs. The format is in sharded_format.h (metadata.json + one safetensors-layout
// data file per rank, xxhash64 per block).
//
//   FSDP_ASSIGN_OR_RETURN(SaveStats saved, SaveShardedCheckpoint("/ckpt/step100", *fsdp,
//   &adapter));
//   ... later, in a job of any size ...
//   FSDP_ASSIGN_OR_RETURN(LoadStats loaded, LoadShardedCheckpoint("/ckpt/step100", *fsdp,
//   &adapter));
//
// What is stored, keyed by the unwrapped model's FQNs (so that nothing depends on the saving
// job's layout):
//   * the model: every parameter and buffer of the state dict. A parameter an FSDP unit manages
//     is written as the pieces its ranks hold (rank r: its slice of the flattened parameter);
//     buffers and parameters no unit manages are written whole by rank 0; NO_SHARD units by
//     rank 0. A parameter shared under several names is stored once (model_keys maps each
//     name to it).
//   * the optimizer (if an adapter is given): for every original parameter with state, each
//     positive-dimension state (exp_avg, momentum_buffer, ...) as pieces in the same way (the
//     flat state's slice of each original parameter; with use_orig_params each parameter's own
//     slice); zero-dimension tensors (Adam's `step`, with their dtype) and other values
//     (ints, floats, None, tuples, extras such as value1=2.74) in metadata.json, from the
//     lowest rank that has them; param_groups with FQN lists. That is the content of FSDP's
//     full_optim_state_dict, without gathering it: no tensor collective is made, only small
//     objects (piece lists) travel.
//
// Save (a collective over fsdp.group()): rank 0 creates DIR.tmp-<nonce> (removing leftovers of
// interrupted saves), every rank writes and fsyncs rank-<r>-of-<N>.safetensors there, the piece
// lists are gathered, rank 0 writes metadata.json last and swaps the directory in atomically
// (atomic_dir.h). A crash at any instant leaves DIR as the old or the new checkpoint, complete.
// The directory must be on a filesystem every rank shares. Under HYBRID_SHARD the first
// replica's shard group saves (its shards are every replica's) and the others wait for its
// result, which they return too; every replica loads.
//
// Load (a collective over fsdp.group() only to agree on errors): every rank reads
// metadata.json, then for each of its units the element ranges of each original parameter that
// its shard holds (NO_SHARD: all), and builds its flat shards and its optimizer's local state
// dict (keyed by its optimizer's IDs, as OptimizerAdapter::LoadStateDict takes it: a flat
// parameter's state flattened in its layout and cut to this shard, zeros where an original
// parameter has no state; with use_orig_params each parameter's slice). Each block read is
// verified against its xxhash. Only when every rank has built and validated everything does
// any rank change its model or optimizer: first the optimizer (its previous state restored on
// every rank if any rank's load fails), then the model (LoadShardedStateDict, which agrees
// again). Nothing is loaded partially.
// Memory: the loaded model shards are held beside the model's until they are copied in; the
// optimizer's state is not held twice: a state tensor the optimizer already has with the
// loaded shape and dtype is read and checked into a scratch buffer (at most 64 MiB) with the
// rest, and read into place (as dcp.load reads into the state dict's tensors) only after the
// model is loaded, from the files still open. So a dict from OptimizerAdapter::StateDict()
// taken before the load sees the loaded values (clone it to keep a snapshot), and only an I/O
// error of the machine while re-reading bytes already checked fails after something changed:
// then every rank returns that error, the model loaded and the optimizer's state partly.
//
// Errors (every message names the operation, this rank, and the file / tensor / FQN):
//   * the reader's (sharded_format.h): NOT_FOUND for a missing metadata.json or data file,
//     DATA_LOSS for truncated files, damaged headers or blocks, INVALID_ARGUMENT for a foreign
//     or inconsistent metadata.json or an unsupported version;
//   * INVALID_ARGUMENT when the checkpoint does not fit the model: PyTorch's texts
//     "Missing key(s) in state_dict: ...", "Unexpected key(s) in state_dict: ...",
//     "size mismatch for X: copying a param with shape torch.Size([..]) from checkpoint, the
//     shape in current model is torch.Size([..])." and a dtype mismatch; for the optimizer: a
//     checkpoint without optimizer state, param_groups that do not match the optimizer's
//     ("param_groups[g] of the checkpoint lists ... the optimizer's group g holds ..."), state
//     whose shape differs from its parameter's, and OptimizerAdapter::LoadStateDict's errors
//     (e.g. Adam state loaded into SGD);
//   * when another rank failed: the same code, "nothing loaded: rank <r> failed: <its message>";
//   * INTERNAL for I/O failures while saving (naming the path); collective errors
//     (DEADLINE_EXCEEDED / UNAVAILABLE) as in comm/process_group.h.
// Preconditions: as fsdp/state_dict.h (every rank calls with the same arguments, the model is
// idle); the optimizer holds fsdp.parameters() (or groups of them), CPU tensors.
#ifndef FSDP_CPP_CHECKPOINT_SHARDED_CHECKPOINT_H_
#define FSDP_CPP_CHECKPOINT_SHARDED_CHECKPOINT_H_

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/sharded_format.h"
#include "checkpoint/sharded_load_options.h"
#include "checkpoint/sharded_save_options.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint {

// Saves model (and optimizer, unless `adapter` is null) into DIR. See above.
[[nodiscard]] absl::StatusOr<SaveStats> SaveShardedCheckpoint(
    const std::string& dir, FullyShardedDataParallel& fsdp,
    const optim_state::OptimizerAdapter* adapter, const SaveShardedOptions& options = {});

// Loads DIR into the model (and the optimizer, unless `adapter` is null). See above. A DIR with a
// `.metadata` file is a torch.distributed.checkpoint directory, loaded by dcp_load.h with the
// same guarantees (options.dcp_layout names its layout).
[[nodiscard]] absl::StatusOr<LoadStats> LoadShardedCheckpoint(
    const std::string& dir, FullyShardedDataParallel& fsdp, optim_state::OptimizerAdapter* adapter,
    const LoadShardedOptions& options = {});

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_SHARDED_CHECKPOINT_H_
