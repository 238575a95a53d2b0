// One description per LibTorch optimizer: what an OptimizerAdapter needs to know of it to speak
// PyTorch 2.13's state dicts. Each family has its own file (adam_family.cc for Adam and AdamW,
// sgd_family.cc, adagrad_family.cc, rmsprop_family.cc); the adapter and hyper_params.h use
// only this table.
//   * hyper_specs: PyTorch's `defaults` dict, in order (what `state_dict()` puts in every param
//     group before "params"), which LibTorch holds and how, and what Python's __setstate__
//     fills in when a loaded group lacks it;
//   * state_names: the per-parameter state names PyTorch keeps, in PyTorch's order;
//   * field: where LibTorch's options hold a held hyper-parameter;
//   * state_values: LibTorch's per-parameter state in PyTorch's names and order;
//   * load: LibTorch's state for one parameter from a loaded dict's entry.
// Preconditions: `options` and `state` are of the family's LibTorch types.
// Errors (load): ParamStateLoader's (param_state_loader.h), "... is missing (<what the
// optimizer keeps>)".
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_OPTIMIZER_FAMILY_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_OPTIMIZER_FAMILY_H_

#include <torch/optim/optimizer.h>

#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/statusor.h"
#include "optim_state/internal/param_state_loader.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_kind.h"

namespace fsdp::optim_state::internal {

using torch::optim::OptimizerOptions;
using torch::optim::OptimizerParamState;

enum class HyperType {
  kNumber,      // held by LibTorch as a double
  kBool,        // held by LibTorch as a bool
  kBetas,       // held by LibTorch as a (double, double)
  kPythonOnly,  // not held by LibTorch: lives in the adapter's side table
};

struct HyperSpec {
  const char* name;
  HyperType type;
  StateValue python_default;
  // Whether Python's __setstate__ fills it in when a loaded group lacks it.
  bool filled_on_load;
  // What it fills in, where that is not `python_default`.
  std::optional<StateValue> filled_value = std::nullopt;
};

// Where LibTorch's options hold one hyper-parameter: the one pointer its HyperType names (all
// null for a name the options do not hold).
struct HeldField {
  double* number = nullptr;
  bool* flag = nullptr;
  std::tuple<double, double>* betas = nullptr;
};

struct OptimizerFamily {
  std::vector<HyperSpec> hyper_specs;
  std::vector<std::string> state_names;
  HeldField (*field)(torch::optim::OptimizerOptions& options, const std::string& name);
  ParamState (*state_values)(const torch::optim::OptimizerParamState& state);
  // Null where the loaded entry has none of the family's state names; entries LibTorch cannot
  // hold are the caller's, except what the family itself keeps aside in `extras` (SGD's
  // momentum_buffer=None).
  absl::StatusOr<std::unique_ptr<torch::optim::OptimizerParamState>> (*load)(
      const ParamStateLoader& loader, const torch::optim::OptimizerOptions& options,
      ParamState* extras);
};

const OptimizerFamily& FamilyOf(OptimizerKind kind);

// Rows of a family's hyper_specs, so that each reads as PyTorch's `defaults`: a number and a
// bool LibTorch holds (a bool is False by default and filled in on load); a value only Python
// has, filled in on load;
HyperSpec Number(const char* name, StateValue python_default, bool filled_on_load = false);
HyperSpec Flag(const char* name);
HyperSpec PythonOnly(const char* name, StateValue python_default);
// `held` followed by PyTorch's flags no LibTorch optimizer holds, in the order named, with
// Python's defaults: maximize=False, foreach=None, capturable=False, differentiable=False,
// fused=None.
std::vector<HyperSpec> WithPythonOnlyFlags(std::vector<HyperSpec> held,
                                           std::initializer_list<const char*> flags);

// Every state name of the five optimizers.
const std::vector<std::string>& AllStateNames();

bool Contains(const std::vector<std::string>& names, const std::string& name);

// The families, one per file.
const OptimizerFamily& AdamFamily();
const OptimizerFamily& AdamWFamily();
const OptimizerFamily& SgdFamily();
const OptimizerFamily& AdagradFamily();
const OptimizerFamily& RmspropFamily();

// Helpers the families share, so that each family's description reads as a list of names and
// fields: `step` as PyTorch's float32 tensor;
at::Tensor StepTensor(int64_t step);

// LibTorch's tensor states given as name, tensor, name, tensor, ...: under their PyTorch
// names, in order, those that are defined.
inline void AddDefinedTensors(ParamState&) {}
template <typename... Rest>
void AddDefinedTensors(ParamState& out, const char* name, const at::Tensor& t,
                       const Rest&... rest) {
  if (t.defined()) out.Set(name, t);
  AddDefinedTensors(out, rest...);
}
template <typename... NamesAndTensors>
ParamState DefinedTensors(const NamesAndTensors&... names_and_tensors) {
  ParamState out;
  AddDefinedTensors(out, names_and_tensors...);
  return out;
}

// The field `name` among the options' fields given as name, field, name, field, ... (all null
// if it is none of them).
inline HeldField Held(double* field) { return {.number = field}; }
inline HeldField Held(bool* field) { return {.flag = field}; }
inline HeldField Held(std::tuple<double, double>* field) { return {.betas = field}; }
inline HeldField FindField(const std::string&) { return {}; }
template <typename Field, typename... Rest>
HeldField FindField(const std::string& name, const char* candidate, Field* field, Rest... rest) {
  if (name == candidate) return Held(field);
  return FindField(name, rest...);
}

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_OPTIMIZER_FAMILY_H_
