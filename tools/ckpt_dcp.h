// ckpt's commands on a torch.distributed.checkpoint (DCP) directory (checkpoint/dcp_reader.h,
// dcp_load.h): what `ckpt inspect` prints and what `ckpt verify` can check of one. Both write to
// stdout (problems too: each a "BAD" line) and return the command's exit status.
#ifndef FSDP_CPP_TOOLS_CKPT_DCP_H_
#define FSDP_CPP_TOOLS_CKPT_DCP_H_

#include <string>

namespace fsdp::checkpoint {

// The layout of model and optimizer state (or that none is known), then every entry: a tensor's
// key, dtype, global shape and chunks; a bytes entry's key and value. 0, or 1 if .metadata is
// refused.
int InspectDcp(const std::string& dir);

// What can be verified of a DCP directory (PyTorch writes no checksums of the data): .metadata
// parses (allow-listed globals only) and is consistent, every .distcp file it names exists and
// holds every storage range it places there, every stored item is a well-formed torch.save
// archive (zip CRC-32s) whose tensor has the chunk's dtype and shape, every bytes entry
// unpickles. Changed tensor bytes with the CRC-32 rewritten cannot be seen. 0 if all is well,
// 1 otherwise.
int VerifyDcp(const std::string& dir);

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_TOOLS_CKPT_DCP_H_
