// The steps of a sharded save (sharded_checkpoint.h), apart so that a synchronous save runs them
// back to back and an asynchronous one (async_checkpoint_saver.h) runs the first in the
// training thread and the rest on a thread of its own:
//
//   1. CollectLocalSave: this rank's pieces (views of its flat shards, buffers, optimizer
//      state), the scalar optimizer values and param_groups, and what metadata.json says about
//      the saving job. Reads the model and the optimizer: they must be idle.
//   2. (async only) StageLocalSave: copies every piece into buffers the caller keeps between
//      saves, so that training may change the model while the pieces are written.
//   3. WriteShardGroup: the collective part over one shard group: rank 0 makes the staging
//      directory, every rank writes and fsyncs its data file, rank 0 gathers the piece lists,
//      writes metadata.json and commits; every rank returns the same outcome. A rank whose
//      step 1 or 2 failed takes part all the same, so that nobody waits for it, and the save
//      fails on every rank naming it.
//   4. SaveAcrossReplicas: under HYBRID_SHARD the first replica runs step 3 and the others
//      learn its outcome.
// Not for use outside :sharded_checkpoint and :async_checkpoint_saver.
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_SHARDED_SAVE_STEPS_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_SHARDED_SAVE_STEPS_H_

#include <ATen/ATen.h>

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/sharded_save_options.h"
#include "checkpoint/sharded_writer.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "nlohmann/json.hpp"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint::internal {

// What a piece is: the model's `fqn` (state empty) or its optimizer state `state`, a tensor of
// `shape`.
struct PieceInfo {
  std::string fqn;
  std::string state;
  std::vector<int64_t> shape;
};

// A zero-dimension or non-tensor optimizer value of parameter `fqn`.
struct OptimScalar {
  std::string fqn;
  std::string name;
  optim_state::StateValue value;
};

// What one rank contributes to a save.
struct LocalSave {
  std::vector<PieceToWrite> pieces;
  std::vector<std::pair<int64_t, int64_t>> ranges;  // element range of each piece
  std::vector<PieceInfo> piece_infos;               // what each piece is
  std::vector<TensorRecord> model_tensors;          // descriptors (no pieces)
  std::vector<std::pair<std::string, std::string>> model_keys;
  bool has_optim = false;
  // [{"fqn", "values": [{"name", "tensor": {"dtype","shape"}} | {"name","value"}]}]
  nlohmann::ordered_json optim;
  nlohmann::ordered_json groups;  // param_groups with FQN lists; null without param_groups
  // The same as values (DCP stores each as an entry of its own).
  std::vector<OptimScalar> optim_scalars;
  std::vector<optim_state::ParamGroup> param_groups;  // params: the optimizer's IDs
  std::vector<std::vector<std::string>> group_fqns;   // each group's parameters' FQNs
  // metadata.json's "saved_with": the saving job's strategy, use_orig_params and units.
  std::map<std::string, std::string> saved_with;
};

// Step 1. `adapter` may be null (model only). Errors: the model's ShardedStateDict's, the
// adapter's StateDict's, INVALID_ARGUMENT for optimizer state that does not fit its parameter.
[[nodiscard]] absl::StatusOr<LocalSave> CollectLocalSave(
    FullyShardedDataParallel& fsdp, const optim_state::OptimizerAdapter* adapter, int rank);

// Step 2. `buffers` holds one tensor per piece from the previous save; a buffer is reused when
// its piece has the same dtype and length (the usual case: the same job saving again), else
// replaced. Afterwards `local.pieces` refer to `buffers` only. The bytes are copied by
// `threads` threads (this one and threads - 1 others), each an equal share of the total.
[[nodiscard]] absl::Status StageLocalSave(LocalSave& local, std::vector<at::Tensor>& buffers,
                                          int threads = 1);

// Step 3, collective over `group` (the shard group). `local` is step 1's (and 2's) outcome on
// this rank. Errors: as SaveShardedCheckpoint's; "nothing saved: rank <r> failed: ..." on
// every rank when any rank failed.
[[nodiscard]] absl::StatusOr<SaveStats> WriteShardGroup(
    const std::string& dir, comm::ProcessGroup& group, const absl::StatusOr<LocalSave>& local,
    const SaveShardedOptions& options, std::chrono::steady_clock::time_point start);

// Step 3's skeleton, for any format: rank 0 makes the staging directory (unless its `precheck`
// failed); every rank whose `local_status` is OK runs `write_own`, whose JSON description
// travels to rank 0; rank 0 runs `finish` on every rank's description (writing the metadata
// into the staging directory) and commits it, or removes it if any rank failed; every rank
// returns the outcome ("<where>: nothing saved: rank <r> failed: ...").
using WriteOwn = std::function<absl::StatusOr<nlohmann::ordered_json>(
    const std::string& staging, const std::string& id, SaveStats& stats)>;
using FinishOnRank0 =
    std::function<absl::Status(const std::string& staging, const std::string& id,
                               const std::vector<nlohmann::ordered_json>& all, SaveStats& stats)>;
[[nodiscard]] absl::StatusOr<SaveStats> CommitCollectiveSave(
    const std::string& dir, const std::string& where, comm::ProcessGroup& group,
    const absl::Status& local_status, const absl::Status& precheck, const WriteOwn& write_own,
    const FinishOnRank0& finish, std::chrono::steady_clock::time_point start);

// Step 4: `save` runs on the first replica (replicas->rank() == 0), whose outcome every replica
// returns. `replicas` null: `save` runs everywhere.
[[nodiscard]] absl::StatusOr<SaveStats> SaveAcrossReplicas(
    comm::ProcessGroup* replicas, const std::string& where,
    const std::function<absl::StatusOr<SaveStats>()>& save);

}  // namespace fsdp::checkpoint::internal

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_SHARDED_SAVE_STEPS_H_
