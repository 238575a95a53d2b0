// What a sharded load (sharded_checkpoint.h: LoadShardedCheckpoint, of our format or of a
// torch.distributed.checkpoint directory) takes and reports, apart from the load itself so that
// the steps its formats share (internal/shard_load.h) can name them.
#ifndef FSDP_CPP_CHECKPOINT_SHARDED_LOAD_OPTIONS_H_
#define FSDP_CPP_CHECKPOINT_SHARDED_LOAD_OPTIONS_H_

#include <string>

#include "checkpoint/sharded_reader.h"

namespace fsdp::checkpoint {

struct LoadShardedOptions {
  // A DCP directory's layout of model and optimizer state (dcp_layout.h's ParseDcpLayout:
  // "torchtitan", "tutorial" or "model=PATH,optim=PATH"); empty: detected from its keys.
  // Ignored for our own format.
  std::string dcp_layout;
};

struct LoadStats {
  // This rank's reads: of our format metadata.json, headers and data blocks; of a DCP
  // directory the .distcp items read (bytes_read = data_bytes_read; .metadata not counted).
  // Each byte counts once: optimizer state read into the optimizer's own tensors is read a
  // second time (checked, then into place; sharded_checkpoint.h), which is not counted.
  ReadStats read;
  double seconds = 0;
};

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_SHARDED_LOAD_OPTIONS_H_
