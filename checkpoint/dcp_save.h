// Saving an FSDP job's state as a torch.distributed.checkpoint (DCP) directory that PyTorch
// 2.13 loads with dcp.load (into FSDP1, FSDP2 or plain modules, at any world size) and
// converts with format_utils.dcp_to_torch_save: the model state dict and the optimizer state
// dict as get_model_state_dict / get_optimizer_state_dict produce them, nested as torchtitan
// does ({"model": ..., "optimizer": ...}) or under the paths of another layout (dcp_layout.h):
//
//   model.<fqn>                       every parameter and buffer (a parameter shared under
//                                     several names is stored under each, as state_dict has it)
//   optimizer.state.<fqn>.<name>      positive-dimension state as chunks; zero-dimension tensors
//                                     (Adam's step) as 0-dim tensor entries; other values bytes
//   optimizer.param_groups.<g>.<hp>   each hyperparameter, and `params`, the group's FQNs (bytes)
//
//   FSDP_ASSIGN_OR_RETURN(SaveStats s, SaveDcpCheckpoint("/ckpt/step100", *fsdp, &adapter));
//
// SaveDcpCheckpoint (a collective over fsdp.group()): every rank writes __<rank>_0.distcp from
// its own flat shard (a flat parameter's piece of an original parameter is a flat range, cut
// into the fewest boxes, FlatRangeToBoxes, each written straight from the shard's memory);
// no tensor is gathered, only the small item lists travel to rank 0, which writes .metadata.
// A zero-dimension value is written by the lowest rank that has it, param_groups by rank 0.
// Committed atomically as SaveShardedCheckpoint is (a staging directory fsynced and swapped in:
// a crash at any instant leaves DIR the old or the new checkpoint, complete). Under HYBRID_SHARD
// the first replica saves and the others return its outcome. DCP holds no checksums: see
// dcp_reader.h for what a load can detect.
//
// WriteDcpFromFull: the same checkpoint from a full one (model state dict + FQN-keyed optimizer
// state dict, e.g. `ckpt convert --to=dcp`), by one process, written as a job of `world_size`
// ranks would (rank r's file holds the r-th of world_size even flat pieces of every tensor).
//
// Errors (each message names the operation, this rank and the file):
//   * the collection's (fsdp/state_dict.h, the adapter's StateDict);
//   * INVALID_ARGUMENT for a value DCP cannot hold (a dtype outside dcp_metadata's, a tensor in
//     a param group), an optimizer state dict keyed by IDs (WriteDcpFromFull), world_size < 1;
//   * INTERNAL for I/O failures, naming the file ("cannot write DIR.tmp-<id>/__1_0.distcp: File
//     too large"); on every rank "nothing saved: rank <r> failed: ..." when any rank failed,
//     DIR unchanged; collective errors as comm/process_group.h.
// Preconditions: as SaveShardedCheckpoint's (every rank calls with the same arguments, the
// model is idle, DIR on a filesystem every rank shares, its parent exists).
#ifndef FSDP_CPP_CHECKPOINT_DCP_SAVE_H_
#define FSDP_CPP_CHECKPOINT_DCP_SAVE_H_

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/dcp_layout.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/sharded_save_options.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint {

struct SaveDcpOptions {
  dcp::DcpLayout layout = dcp::TorchtitanLayout();
  // Files (name -> contents) rank 0 writes beside .metadata in the same commit, e.g. a
  // training program's progress; dcp.load ignores them.
  std::map<std::string, std::string> extra_files;
};

// Saves model (and optimizer, unless `adapter` is null) into DIR. See above.
[[nodiscard]] absl::StatusOr<SaveStats> SaveDcpCheckpoint(
    const std::string& dir, FullyShardedDataParallel& fsdp,
    const optim_state::OptimizerAdapter* adapter, const SaveDcpOptions& options = {});

// A full checkpoint (`optim` may be null) as DIR, atomically. See above.
[[nodiscard]] absl::Status WriteDcpFromFull(const std::string& dir, const ModelStateDict& model,
                                            const optim_state::OptimStateDict* optim,
                                            int world_size, const SaveDcpOptions& options = {});

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_DCP_SAVE_H_
