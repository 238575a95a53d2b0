// The sharded checkpoint format (fsdp-cpp-sharded, version 1): its data model, the data files,
// metadata.json, and the offline readers (no process group) that the FSDP loader
// (sharded_checkpoint.h) and the ckpt tool build on.
//
// Directory layout:
//   DIR/metadata.json                 written last (by rank 0), describes everything
//   DIR/rank-<r>-of-<N>.safetensors   one data file per saving rank r of N
//
// A data file has safetensors' layout, so Python's `safetensors` can open it: an 8-byte
// little-endian header length H, a JSON header of H bytes (padded with spaces to a multiple of
// 8), then the raw little-endian bytes of its tensors end to end. The header is
//   {"<key>": {"dtype": "F32", "shape": [n], "data_offsets": [b, e]}, ...,
//    "__metadata__": {"format": "fsdp-cpp-sharded", "version": "1", "checkpoint_id": "<id>",
//                     "rank": "<r>", "world_size": "<N>"}}
// with offsets relative to the end of the header. Each stored tensor is a 1-D *piece*: elements
// [begin, end) of an original tensor flattened in row-major order. Keys are
// "model/<fqn>" (a parameter or buffer) and "optim/<fqn>/<state name>" (a positive-dimension
// optimizer state of a parameter); a file holds at most one piece of each key.
//
// metadata.json:
//   {"format": "fsdp-cpp-sharded", "version": 1, "kind": "sharded", "checkpoint_id": "<id>",
//    "world_size": N, "saved_with": {...informational: sharding strategy, use_orig_params,
//    units...}, "block_bytes": 1048576,
//    "files": [{"name": "rank-0-of-2.safetensors", "rank": 0, "size": <bytes>,
//               "header_bytes": 8 + H, "header_xxh64": "<16 hex>"}, ...],
//    "tensors": [{"key": "model/a.weight", "kind": "model", "fqn": "a.weight",
//                 "state": "" (optim: the state name), "shape": [4, 3], "dtype": "F32",
//                 "pieces": [{"file": 0, "begin": 0, "end": 6, "offset": <byte in file>,
//                             "bytes": 24, "xxh64": ["<16 hex>", ...]}, ...]}, ...],
//    "model_keys": [["a.weight", "a.weight"], ["tied.weight", "a.weight"], ...],
//    "optim": null | {"has_param_groups": true,
//        "state": [{"fqn": "a.weight", "values": [
//            {"name": "step", "value": {"type": "tensor", "dtype": "F32", "value": 3.0}},
//            {"name": "exp_avg", "tensor": "optim/a.weight/exp_avg"}, ...]}, ...],
//        "param_groups": [{"hyper_params": [{"name": "lr", "value": {"type": "float",
//                          "value": 0.01}}, ...], "params": ["a.weight", ...]}, ...]}}
//   * `model_keys` lists every key of the model's state dict in state_dict order with the
//     tensor that holds it (a parameter shared under several names is stored once).
//   * A piece's checksums are xxhash64 (seed 0) of consecutive `block_bytes`-sized blocks of its
//     bytes (the last block shorter), so that a reader that needs part of a piece reads and
//     verifies only the blocks it overlaps. A piece with "file": -1 holds zeros and has no
//     bytes (optimizer state of a range no saving rank held state for).
//   * The pieces of a tensor tile [0, numel) exactly (checked on reading).
//   * Non-tensor values (optimizer scalars, zero-dimension tensors such as Adam's `step`,
//     hyper-parameters) are JSON: {"type": "none"|"bool"|"int"|"float"|"str"|"tuple"|"list"|
//     "tensor", "value": ..., "dtype" (tensor)}; non-finite floats are the strings "nan",
//     "inf", "-inf".
//
// Errors of the readers (each message names the file and, where one is concerned, the tensor):
//   NOT_FOUND         metadata.json or a data file is missing;
//   INVALID_ARGUMENT  not this format (foreign JSON), unsupported version, a metadata.json
//                     whose contents are inconsistent (pieces that do not tile their tensor,
//                     out-of-range offsets, unknown dtypes, sizes that overflow);
//   DATA_LOSS         a data file shorter than metadata.json says (truncated), a damaged or
//                     foreign header (checksum / checkpoint id), a block whose xxhash differs
//                     (flipped bytes), metadata.json that is not valid JSON;
//   INTERNAL          a failing read (errno's text).
// Byte order: data is little-endian; this code assumes a little-endian host (x86-64, arm64).
// Sizes read from files are bounds-checked before anything is allocated: the reader allocates
// no more than the files' actual sizes (and what the caller asks for).
//
// The targets behind this header, each with a header of its own: sharded_metadata.h (the data
// model and its checks), sharded_metadata_json.h (metadata.json), sharded_reader.h (the
// reader), sharded_writer.h (the writers). This header includes them all, and adds
// DetectCheckpointKind.
#ifndef FSDP_CPP_CHECKPOINT_SHARDED_FORMAT_H_
#define FSDP_CPP_CHECKPOINT_SHARDED_FORMAT_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "checkpoint/sharded_metadata.h"       // IWYU pragma: export
#include "checkpoint/sharded_metadata_json.h"  // IWYU pragma: export
#include "checkpoint/sharded_reader.h"         // IWYU pragma: export
#include "checkpoint/sharded_writer.h"         // IWYU pragma: export

namespace fsdp::checkpoint {

enum class CheckpointKind { kFull, kSharded, kDcp };
// "full" / "sharded" / "dcp".
absl::string_view CheckpointKindName(CheckpointKind kind);

// Which kind of checkpoint DIR holds: kDcp if DIR/.metadata exists (torch.distributed.checkpoint,
// dcp_load.h), kSharded if DIR/metadata.json names this format, kFull if DIR/model.pt exists
// (and neither of the others). Errors: NOT_FOUND (no such directory, or neither
// file), INVALID_ARGUMENT (a metadata.json of another format).
[[nodiscard]] absl::StatusOr<CheckpointKind> DetectCheckpointKind(const std::string& dir);

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_SHARDED_FORMAT_H_
