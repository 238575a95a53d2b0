// SGD (optimizer_family.h). PyTorch 2.x's SGD keeps no state without momentum (1.13 stored
// momentum_buffer=None), and neither does LibTorch's; a loaded None is kept aside.
#include <torch/optim/sgd.h>

#include "comm/status_macros.h"
#include "optim_state/internal/optimizer_family.h"

namespace fsdp::optim_state::internal {
namespace {

std::vector<HyperSpec> SgdHyperSpecs() {
  std::vector<HyperSpec> specs =
      WithPythonOnlyFlags({Number("lr", 1e-3), Number("momentum", 0), Number("dampening", 0),
                           Number("weight_decay", 0), Flag("nesterov")},
                          {"maximize", "foreach", "differentiable", "fused"});
  // SGD(fused=None) by default, but __setstate__ fills in fused=False.
  specs.back().filled_value = StateValue(false);
  return specs;
}

HeldField SgdField(OptimizerOptions& options, const std::string& name) {
  auto& o = static_cast<torch::optim::SGDOptions&>(options);
  return FindField(name, "lr", &o.lr(), "momentum", &o.momentum(), "dampening", &o.dampening(),
                   "weight_decay", &o.weight_decay(), "nesterov", &o.nesterov());
}

ParamState SgdStateValues(const OptimizerParamState& state) {
  return DefinedTensors("momentum_buffer",
                        static_cast<const torch::optim::SGDParamState&>(state).momentum_buffer());
}

absl::StatusOr<std::unique_ptr<OptimizerParamState>> LoadSgd(const ParamStateLoader& loader,
                                                             const OptimizerOptions& options,
                                                             ParamState* extras) {
  if (!loader.Has("momentum_buffer")) return nullptr;
  if (loader.loaded().Find("momentum_buffer")->IsNone()) {
    extras->Set("momentum_buffer", StateValue::None());
    return nullptr;
  }
  auto state = std::make_unique<torch::optim::SGDParamState>();
  FSDP_RETURN_IF_ERROR(loader.TensorsInto("momentum_buffer", state->momentum_buffer()));
  return std::unique_ptr<OptimizerParamState>(std::move(state));
}

}  // namespace

const OptimizerFamily& SgdFamily() {
  static const auto* family = new OptimizerFamily{
      .hyper_specs = SgdHyperSpecs(),
      .state_names = {"momentum_buffer"},
      .field = &SgdField,
      .state_values = &SgdStateValues,
      .load = &LoadSgd,
  };
  return *family;
}

}  // namespace fsdp::optim_state::internal
