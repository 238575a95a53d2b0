// The pairwise exchange behind FlattenShardedOptimStateDict: pieces of parameters' flattened
// state held by some ranks go to the ranks whose shards they overlap, and only there. Every
// pair of ranks meets once (a round-robin schedule: N - 1 rounds at even N, N at odd N, each
// rank in at most one pair per round); a pair with nothing to move sends nothing. What one
// rank sends another is packed into one message (or sent straight from the piece when it is
// one segment, and received straight into its destination likewise).
// Preconditions: a collective over `group`: every rank passes the same `pieces` (same order,
// the same numel per piece) and a `want` that answers alike on every rank; pieces of one key
// share a dtype, that of dst[key]; CPU tensors.
// Errors: the group's Send / Recv errors with "rank <r> <-> rank <q>" context; LibTorch's
// exceptions as INTERNAL.
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_PIECE_EXCHANGE_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_PIECE_EXCHANGE_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "comm/process_group.h"

namespace fsdp::optim_state::internal {

// Elements [begin, begin + numel) of a parameter state's flattening (`key` names which).
struct FlatPiece {
  size_t key = 0;
  int rank = 0;  // the rank that holds it
  int64_t begin = 0;
  int64_t numel = 0;
  at::Tensor data;  // 1-D, contiguous, on `rank` only (undefined elsewhere)
};

struct FlatRange {
  int64_t begin = 0;
  int64_t numel = 0;
};

// Copies every overlap of a piece with want(key, group.rank()) into dst[key] (at its offset
// from that range's begin), receiving what other ranks hold and sending them what they want.
// `written[key]` gains the (offset, numel) ranges of dst[key] that were written.
absl::Status ExchangeFlatPieces(comm::ProcessGroup& group, const std::vector<FlatPiece>& pieces,
                                const std::function<FlatRange(size_t key, int rank)>& want,
                                const std::vector<at::Tensor>& dst,
                                std::vector<std::vector<std::pair<int64_t, int64_t>>>& written);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_PIECE_EXCHANGE_H_
