// What a sharded save (sharded_checkpoint.h, async_checkpoint_saver.h) takes and reports, apart
// from the save itself so that the steps both share (internal/sharded_save_steps.h) can name
// them.
#ifndef FSDP_CPP_CHECKPOINT_SHARDED_SAVE_OPTIONS_H_
#define FSDP_CPP_CHECKPOINT_SHARDED_SAVE_OPTIONS_H_

#include <cstdint>
#include <map>
#include <string>

#include "checkpoint/sharded_format.h"

namespace fsdp::checkpoint {

struct SaveShardedOptions {
  // Size of the checksummed blocks (a partial reader reads whole blocks).
  int64_t block_bytes = kDefaultBlockBytes;
  // Stored in metadata.json's "user_metadata" (rank 0's map is used), committed with the
  // checkpoint; read back with ShardedCheckpointReader::Open(dir)->metadata().user_metadata.
  std::map<std::string, std::string> user_metadata;
};

struct SaveStats {
  int64_t bytes_written = 0;  // this rank's data file (rank 0: plus metadata.json)
  double seconds = 0;
};

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_SHARDED_SAVE_OPTIONS_H_
