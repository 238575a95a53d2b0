// ParamStateLoader: the checks and copies every optimizer family's loader
// (optimizer_family.h) makes on one parameter's loaded state: which names it has, tensors of
// the parameter's shape and floating-point dtype (copied, cast to the parameter's dtype and
// device, or adopted as they are), `step` as a non-negative whole number.
// Preconditions: `param` and `loaded` outlive the loader; every name asked for is present
// (Has / Require first).
// Errors: INVALID_ARGUMENT "parameter <id>: state '<name>' ..." (missing, not a tensor, not
// floating-point, wrong shape, a `step` that is not a non-negative whole number).
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_PARAM_STATE_LOADER_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_PARAM_STATE_LOADER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::optim_state::internal {

// An int or float value as a double; nullopt for anything else.
std::optional<double> AsNumber(const StateValue& v);

// Checks and copies the state of one parameter being loaded. With `adopted` (the rvalue
// LoadStateDict), a tensor that already has the parameter's device and dtype is taken as it is
// unless another adopted tensor starts at the same address (then it is copied, so no two
// states share memory); `adopted` collects the addresses.
class ParamStateLoader {
 public:
  ParamStateLoader(int64_t id, const at::Tensor& param, const ParamState& loaded,
                   absl::flat_hash_set<const void*>* adopted)
      : id_(id), param_(param), loaded_(loaded), adopted_(adopted) {}

  const ParamState& loaded() const { return loaded_; }
  bool Has(const char* name) const { return loaded_.Contains(name); }
  bool HasAny(std::initializer_list<const char*> names) const;

  // "parameter <id>: state '<name>' <what>".
  absl::Status Error(const std::string& name, const std::string& what) const;
  // Each of `names` is present; else "... is missing (<needs>)".
  absl::Status Require(std::initializer_list<const char*> names, const std::string& needs) const;

  // A copy of tensor state `name`, cast to the parameter's dtype and device.
  absl::StatusOr<at::Tensor> Tensor(const char* name) const;
  // Tensor(name), or an undefined tensor where the dict has no `name`.
  absl::StatusOr<at::Tensor> TensorIfPresent(const char* name) const;
  // `step` as LibTorch's int64: an int, a whole float or a one-element tensor holding one.
  absl::StatusOr<int64_t> Step() const;
  // TensorIfPresent of each name, in order, into its field: name, field, name, field, ...
  absl::Status TensorsInto() const { return absl::OkStatus(); }
  template <typename... Rest>
  absl::Status TensorsInto(const char* name, at::Tensor& field, Rest&&... rest) const {
    absl::StatusOr<at::Tensor> t = TensorIfPresent(name);
    if (!t.ok()) return t.status();
    field = *std::move(t);
    return TensorsInto(std::forward<Rest>(rest)...);
  }

 private:
  int64_t id_;
  const at::Tensor& param_;
  const ParamState& loaded_;
  absl::flat_hash_set<const void*>* adopted_;
};

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_PARAM_STATE_LOADER_H_
