// MixedPrecision: PyTorch FSDP's `MixedPrecision` (torch.distributed.fsdp.MixedPrecision), the
// dtypes a wrapped model computes, communicates and keeps its buffers in, while the sharded flat
// parameters, their gradients as the optimizer sees them and the optimizer state stay in the
// parameters' own dtype (float32: the "master" values every state dict holds).
//
//   * param_dtype: each unit's shard is cast to it before the all-gather, so forward and
//     backward run on gathered parameters of this dtype and produce gradients in it.
//   * reduce_dtype: gradients are cast to it for the reduce-scatter (NO_SHARD: all-reduce) and
//     the division around it, then cast back to the parameters' dtype. Unset with param_dtype
//     set, it is param_dtype (as PyTorch's).
//   * buffer_dtype: floating-point buffers are cast to it when the model is wrapped; state
//     dicts hold them in their original dtype.
//   * cast_root_forward_inputs: a unit that no other unit encloses (PyTorch's FSDP roots)
//     casts the floating-point tensors its forward receives to param_dtype;
//     cast_forward_inputs: every unit does.
// Unset fields leave that part in full precision, as in PyTorch. Parameters FSDP does not
// manage (ignored modules, or outside every unit) stay as they are, so the model must accept
// param_dtype activations meeting them, as in PyTorch.
//
// Errors (ValidateMixedPrecision, and FullyShardedDataParallel::Wrap through it):
// INVALID_ARGUMENT for a dtype that is not floating point, naming the field.
#ifndef FSDP_CPP_FSDP_MIXED_PRECISION_H_
#define FSDP_CPP_FSDP_MIXED_PRECISION_H_

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fsdp {

struct MixedPrecision {
  std::optional<at::ScalarType> param_dtype;
  std::optional<at::ScalarType> reduce_dtype;
  std::optional<at::ScalarType> buffer_dtype;
  bool cast_forward_inputs = false;
  bool cast_root_forward_inputs = true;

  // True when any dtype is set (PyTorch: FSDP was given a MixedPrecision).
  bool enabled() const {
    return param_dtype.has_value() || reduce_dtype.has_value() || buffer_dtype.has_value();
  }
  // The dtype gradients are reduced in: reduce_dtype, else param_dtype, else unset.
  std::optional<at::ScalarType> effective_reduce_dtype() const {
    return reduce_dtype.has_value() ? reduce_dtype : param_dtype;
  }
};

[[nodiscard]] absl::Status ValidateMixedPrecision(const MixedPrecision& mixed_precision);

// "bf16", "fp16", "fp32", "fp64" (and PyTorch's names "bfloat16", "float16", "half", "float32",
// "float", "float64", "double"), for flags. INVALID_ARGUMENT names the text otherwise.
[[nodiscard]] absl::StatusOr<at::ScalarType> ParseFloatDtype(absl::string_view text);

// A train-style flag value: "PARAM[,REDUCE[,BUFFER]]" (for example "bf16", "bf16,fp32",
// "bf16,bf16,bf16"); an empty field leaves that dtype unset, "" or "none" is no mixed precision.
[[nodiscard]] absl::StatusOr<MixedPrecision> ParseMixedPrecision(absl::string_view text);

// "param_dtype=bfloat16 reduce_dtype=float32 buffer_dtype=none", for logs and messages.
std::string DescribeMixedPrecision(const MixedPrecision& mixed_precision);

}  // namespace fsdp

#endif  // FSDP_CPP_FSDP_MIXED_PRECISION_H_
