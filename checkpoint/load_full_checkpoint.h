// Loads a full checkpoint (DIR/model.pt + DIR/optim.pt, checkpoint/full_checkpoint.h: ours, or
// what a PyTorch user saves with torch.save) into an FSDP job of any world size, wrapping,
// sharding strategy and use_orig_params, with the key prefixes PyTorch's wrappers add stripped
// on request (checkpoint/key_prefixes.h):
//
//   FSDP_ASSIGN_OR_RETURN(KeyPrefixes strip, ParseKeyPrefixes("pytorch"));
//   FSDP_RETURN_IF_ERROR(LoadFullCheckpoint("ckpt", *fsdp, &adapter,
//                                           {.strip_key_prefixes = strip}));
//
// A collective over fsdp.group(). The files are streamed: rank 0 reads both pickles (the
// small scalars with them) and checks every key against the model's names (parameters and
// buffers for model.pt, parameters for optim.pt) and every rank learns whether that worked.
// Then the optimizer state is scattered from rank 0 unit by unit
// (optim_state::ScatterFullOptimStateDict's scatter; rank 0 reads each unit's records just
// before sending them and frees them after), and the model state likewise (fsdp::
// LoadFullStateDict, rank0_only, staged); so rank 0 holds at most its own shards plus one
// unit's full state of one file, never a whole dict. Every rank keeps what it receives aside
// (its own shards) and nothing is applied until every record arrived and passed its CRC-32
// check: a record that cannot be read (the file was cut or changed while being loaded) leaves
// the model and the optimizer as they were on every rank.
//
// Preconditions: every rank calls it with the same arguments; the model is idle; optim.pt is
// FQN-keyed (FSDP's full_optim_state_dict layout) with the optimizer's parameter groups.
//
// Errors, on every rank:
//   * rank 0's reading of the pickles and key checking, with its code (INVALID_ARGUMENT /
//     DATA_LOSS from TorchLoad for unreadable files, NOT_FOUND for a missing one;
//     INVALID_ARGUMENT naming the file and the first key that names nothing in the model, see
//     key_prefixes.h), prefixed "LoadFullCheckpoint(DIR): rank 0: ". Nothing is loaded.
//   * those of ScatterFullOptimStateDict (optim.pt against the optimizer's groups, shapes,
//     dtypes), found before any record is read: nothing is loaded.
//   * a record of optim.pt that cannot be read (DATA_LOSS for a CRC-32 mismatch or a file that
//     shrank, naming the file and the record): "...: optim.pt: nothing loaded, reading: rank
//     0: FILE: ..."; nothing is loaded.
//   * those of LoadFullStateDict's checks (nothing loaded); a record of model.pt that cannot
//     be read ("...: model.pt: LoadFullStateDict...: nothing loaded: rank 0: FILE: ...",
//     DATA_LOSS): nothing is loaded.
//   * those of OptimizerAdapter::LoadStateDict (e.g. maximize=True), which leave the model
//     loaded and the optimizer as it was.
//   * collective errors (the group is broken: end the job).
#ifndef FSDP_CPP_CHECKPOINT_LOAD_FULL_CHECKPOINT_H_
#define FSDP_CPP_CHECKPOINT_LOAD_FULL_CHECKPOINT_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "checkpoint/key_prefixes.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint {

// What rank 0 held of the files' tensors (their storages' bytes).
struct LoadFullCheckpointStats {
  int64_t file_bytes = 0;      // in both files
  int64_t max_live_bytes = 0;  // in memory at once: one unit's, model's or optimizer's
};

struct LoadFullCheckpointOptions {
  // Removed from the keys of both files before they are matched to the model. None by
  // default: every key must be one of the model's names.
  KeyPrefixes strip_key_prefixes;
  // Filled on rank 0 when given (after a load that read the files).
  LoadFullCheckpointStats* stats = nullptr;
};

// `adapter` null: only model.pt is read and loaded.
[[nodiscard]] absl::Status LoadFullCheckpoint(const std::string& dir,
                                              FullyShardedDataParallel& fsdp,
                                              optim_state::OptimizerAdapter* adapter,
                                              const LoadFullCheckpointOptions& options = {});

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_LOAD_FULL_CHECKPOINT_H_
