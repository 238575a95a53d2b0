// Between the two ways a piece of a tensor can be named: a range [begin, end) of its row-major
// flattening (how FSDP's flat shards cut a parameter) and a box, offsets and sizes per
// dimension (how PyTorch's ShardedTensor and DTensor name a local shard). A range is the union
// of at most 2 x rank - 1 boxes, each of them one contiguous range again; a box is one range
// only when every dimension after its first non-unit one is whole.
// Preconditions: `shape` has no negative size; offsets and sizes lie inside it. Errors: none.
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_FLAT_BOX_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_FLAT_BOX_H_

#include <cstdint>
#include <optional>
#include <vector>

namespace fsdp::optim_state::internal {

struct FlatBox {
  int64_t begin = 0;  // its first element in the flattening
  int64_t numel = 0;
  std::vector<int64_t> offsets;
  std::vector<int64_t> sizes;
};

// The boxes whose union is [begin, end) of the flattening of `shape`, in order (none when the
// range is empty).
std::vector<FlatBox> BoxesOfRange(const std::vector<int64_t>& shape, int64_t begin, int64_t end);

// The first element of the box in the flattening when the box is one contiguous range (an
// empty box is: 0); nullopt when it is not.
std::optional<int64_t> FlatBeginOfBox(const std::vector<int64_t>& shape,
                                      const std::vector<int64_t>& offsets,
                                      const std::vector<int64_t>& sizes);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_FLAT_BOX_H_
