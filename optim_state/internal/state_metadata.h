// Optimizer-state values as metadata: what travels between ranks as one serialized JSON object
// (keys, state names, dtypes, scalar values, param_groups) while positive-dimension tensors
// move with tensor collectives. Also the tensor-kind tests that decide which is which.
// Preconditions: none. Errors: UNIMPLEMENTED for a value that cannot travel as metadata (a
// positive-dimension or sharded tensor, a zero-dimension tensor of a complex dtype), with the
// state name as context; INTERNAL "malformed metadata object" for bytes that are not JSON.
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_STATE_METADATA_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_STATE_METADATA_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "optim_state/optim_state_dict.h"

namespace fsdp::optim_state::internal {

using json = nlohmann::json;

// A defined tensor with one or more dimensions (moved by collectives, cut into shards).
bool IsPosDimTensor(const StateValue& v);
// A defined zero-dimension tensor (e.g. Adam's `step`: a scalar that travels as metadata).
bool IsZeroDimTensor(const StateValue& v);

// A scalar value (not a positive-dimension tensor) as JSON, and back.
absl::StatusOr<json> StateValueToJson(const StateValue& value);
StateValue StateValueFromJson(const json& j);

// A parameter's (or a group's hyper-parameter) values, all scalar, in order.
absl::StatusOr<json> ParamStateToJson(const ParamState& state);
ParamState ParamStateFromJson(const json& j);

// One parameter's state as metadata entries, in order: positive-dimension tensors as their name
// and dtype (and shape, `with_shape`), other values as their name and value. Errors are
// prefixed "<op>: state '<name>' of '<fqn>'".
absl::StatusOr<json> StateEntriesToJson(const ParamState& state, absl::string_view op,
                                        const std::string& fqn, bool with_shape);

// The names of `state`'s positive-dimension tensors, zero-dimension tensors and other values,
// each sorted.
struct NamesByKind {
  std::vector<std::string> pos, zero, other;
};
NamesByKind SortNames(const ParamState& state);

// A metadata object received from another rank.
absl::StatusOr<json> ParseMetadata(const std::string& bytes);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_STATE_METADATA_H_
