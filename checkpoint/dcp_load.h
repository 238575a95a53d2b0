// A torch.distributed.checkpoint (DCP) directory, as PyTorch's dcp.save (FileSystemWriter)
// writes it, loaded into an FSDP model and its optimizer, or read whole offline.
//
// LoadShardedCheckpoint (sharded_checkpoint.h) calls LoadDcpCheckpoint for a directory with a
// `.metadata` file, so `train --load` takes either. The load has our own format's guarantees
// (see sharded_checkpoint.h), by the same steps (internal/shard_load.h): any world size,
// wrapping, use_orig_params or sharding strategy; each rank reads only the saved chunks that
// overlap the flat ranges its shards hold (a range is cut into DCP boxes by dcp_layout.h's
// FlatRangeToBoxes, each chunk is read once and its overlaps copied into place); everything is
// read and checked on every rank before any rank changes its model or optimizer; errors are
// agreed across ranks; PyTorch's texts for missing and unexpected keys and size mismatches.
//
// What is read, under the layout (dcp_layout.h: torchtitan's {"model", "optimizer"}, the DCP
// tutorial's {"app": {"model", "optim"}}, detected, or named in `layout`):
//   * the model's keys (parameters and buffers; entries outside both paths are ignored, as
//     dcp.load ignores what the state dict it fills does not ask for);
//   * state.<fqn>.<name>: positive-dimension tensors read in ranges as the model's; 0-dim
//     tensors (Adam's `step`) and bytes entries (a non-tensor value) read whole on every rank;
//   * param_groups.<g>.<hp> and .params (bytes entries: pickled values, the group's FQNs).
// What a DCP load can detect: DCP writes no checksums (see dcp_reader.h): a damaged .metadata
// (refused by its checks), a missing or truncated .distcp file, an item that is not a
// well-formed torch.save archive (its zip CRC-32s), a chunk of another dtype or shape than
// .metadata says; not changed bytes inside a tensor whose CRC-32 was rewritten, nor a .distcp
// swapped for another save's file of the same layout.
//
// Errors (each naming the file, and the tensor or key concerned):
//   the reader's (dcp_reader.h: NOT_FOUND, INVALID_ARGUMENT, DATA_LOSS), and dcp_layout.h's
//   (no layout fits, a layout that cannot be read, malformed optimizer keys); INVALID_ARGUMENT
//   for a model key that is a bytes entry, an optimizer value that is not a state value, a
//   group's `params` that is not a list of FQNs, and every error of LoadShardedCheckpoint.
#ifndef FSDP_CPP_CHECKPOINT_DCP_LOAD_H_
#define FSDP_CPP_CHECKPOINT_DCP_LOAD_H_

#include <string>

#include "absl/status/statusor.h"
#include "checkpoint/dcp_layout.h"
#include "checkpoint/sharded_load_options.h"
#include "checkpoint/sharded_reader.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint::dcp {

// True if DIR holds a `.metadata` file (a DCP directory).
bool IsDcpCheckpoint(const std::string& dir);

// Loads DIR into the model (and the optimizer, unless `adapter` is null); a collective over
// fsdp.group(). `layout`: a ParseDcpLayout spec, empty to detect it.
[[nodiscard]] absl::StatusOr<LoadStats> LoadDcpCheckpoint(const std::string& dir,
                                                          FullyShardedDataParallel& fsdp,
                                                          optim_state::OptimizerAdapter* adapter,
                                                          const std::string& layout = "");

// The whole model state dict (keys sorted) and the FQN-keyed optimizer state dict (as FSDP's
// full_optim_state_dict has it) of DIR, offline; the layout used in `*used` if not null.
[[nodiscard]] absl::StatusOr<FullContents> ReadDcpFullContents(const std::string& dir,
                                                               const std::string& layout = "",
                                                               DcpLayout* used = nullptr);

}  // namespace fsdp::checkpoint::dcp

#endif  // FSDP_CPP_CHECKPOINT_DCP_LOAD_H_
