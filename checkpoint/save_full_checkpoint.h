// Saves a full checkpoint of an FSDP job (DIR/model.pt + DIR/optim.pt, checkpoint/
// full_checkpoint.h: what PyTorch FSDP users write with torch.save of FSDP.state_dict() and
// FSDP.optim_state_dict() under FULL_STATE_DICT; Python's torch.load(weights_only=True) reads
// it) by streaming: the files are written one FSDP unit at a time, so that no rank ever holds
// the whole state dict.
//
//   FSDP_RETURN_IF_ERROR(SaveFullCheckpoint("ckpt", *fsdp, &adapter));
//
// How. The keys, shapes, dtypes and storages of both dicts are known before any value is
// gathered (FullStateDictLayout; FullOptimStateDict with its gathers deferred), so rank 0 first
// pickles both dicts with placeholders for the gathered tensors. Then, for each storage of the
// archive in the pickle's order, the unit it belongs to is gathered to rank 0 (the model's
// parameters one unit's flat parameter at a time, the other ranks sending their shards to rank 0;
// the optimizer's state one flat parameter and state name at a time, as FullOptimStateDict's
// rank0_only gathers them) and rank 0 writes that record to the file and drops it. Rank 0 writes
// on a background thread, one unit behind the gathers, so that a unit's write (CRC-32 and copy
// into the page cache) overlaps the next unit's gather; each record's writeback starts as it is
// written, so that the closing fsync waits for the last records only. The files are byte for byte what WriteFullCheckpoint writes
// for FullStateDict(rank0_only) and FullOptimStateDict(rank0_only) of the same state.
//
// Memory bound: rank 0 holds at most its own shards, the unmanaged parameters' and buffers'
// copies (as FullStateDict makes them) and two flat parameters' full values (one unit's
// parameters, or one of its state names) at a time: the one being written and the next being
// gathered; the other ranks their shards (and, for a unit not sharded over fsdp.group() or
// unsharded at the call, that unit's parameters, an all-gather as FullStateDict does).
//
// HYBRID_SHARD: each replica's shard group runs the gathers, the first replica's rank 0 writes
// (the replicas hold the same state) and its outcome reaches every rank.
//
// Atomic: both files (and `extra_files`) go into a staging directory that replaces DIR in one
// rename (checkpoint/atomic_dir.h); a failed or interrupted save leaves DIR as it was.
//
// Preconditions: a collective over fsdp.group(): every rank calls it with the same arguments;
// the model is idle; the optimizer (if `adapter`) is over fsdp.parameters() as
// FullOptimStateDict requires; DIR's parent exists on rank 0.
//
// Errors, on every rank (the writer's prefixed "SaveFullCheckpoint(DIR): rank 0: "):
//   * FullOptimStateDict's (optim_state/fsdp_optim_state.h), before anything is written;
//   * INTERNAL naming the file (DIR.tmp-<nonce>/model.pt or optim.pt) and errno's text when rank
//     0 cannot create, write, fsync or commit it (e.g. "File too large", "No space left on
//     device"); the staging directory is removed and DIR is left as it was;
//   * collective errors (the group is broken: end the job).
#ifndef FSDP_CPP_CHECKPOINT_SAVE_FULL_CHECKPOINT_H_
#define FSDP_CPP_CHECKPOINT_SAVE_FULL_CHECKPOINT_H_

#include <map>
#include <string>

#include "absl/status/status.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint {

struct SaveFullCheckpointOptions {
  // name -> contents, written beside the two files in the same commit (e.g. a training
  // program's progress file).
  std::map<std::string, std::string> extra_files;
};

// `adapter` null: only model.pt is written.
[[nodiscard]] absl::Status SaveFullCheckpoint(const std::string& dir,
                                              FullyShardedDataParallel& fsdp,
                                              const optim_state::OptimizerAdapter* adapter,
                                              const SaveFullCheckpointOptions& options = {});

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_SAVE_FULL_CHECKPOINT_H_
