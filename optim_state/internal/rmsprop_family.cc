// RMSprop (optimizer_family.h).
#include <torch/optim/rmsprop.h>

#include "comm/status_macros.h"
#include "optim_state/internal/optimizer_family.h"

namespace fsdp::optim_state::internal {
namespace {

HeldField RmspropField(OptimizerOptions& options, const std::string& name) {
  auto& o = static_cast<torch::optim::RMSpropOptions&>(options);
  return FindField(name, "lr", &o.lr(), "momentum", &o.momentum(), "alpha", &o.alpha(), "eps",
                   &o.eps(), "centered", &o.centered(), "weight_decay", &o.weight_decay());
}

ParamState RmspropStateValues(const OptimizerParamState& state) {
  const auto& s = static_cast<const torch::optim::RMSpropParamState&>(state);
  return DefinedTensors("step", StepTensor(s.step()), "square_avg", s.square_avg(),
                        "momentum_buffer", s.momentum_buffer(), "grad_avg", s.grad_avg());
}

absl::StatusOr<std::unique_ptr<OptimizerParamState>> LoadRmsprop(const ParamStateLoader& loader,
                                                                 const OptimizerOptions& options,
                                                                 ParamState* extras) {
  if (!loader.HasAny({"step", "square_avg", "momentum_buffer", "grad_avg"})) return nullptr;
  const auto& o = static_cast<const torch::optim::RMSpropOptions&>(options);
  const std::string needs =
      "RMSprop keeps 'step', 'square_avg', with momentum 'momentum_buffer' and, "
      "centered, 'grad_avg'";
  FSDP_RETURN_IF_ERROR(loader.Require({"step", "square_avg"}, needs));
  if (o.momentum() > 0) FSDP_RETURN_IF_ERROR(loader.Require({"momentum_buffer"}, needs));
  if (o.centered()) FSDP_RETURN_IF_ERROR(loader.Require({"grad_avg"}, needs));
  auto state = std::make_unique<torch::optim::RMSpropParamState>();
  FSDP_ASSIGN_OR_RETURN(state->step(), loader.Step());
  FSDP_RETURN_IF_ERROR(loader.TensorsInto("square_avg", state->square_avg(), "momentum_buffer",
                                          state->momentum_buffer(), "grad_avg", state->grad_avg()));
  return std::unique_ptr<OptimizerParamState>(std::move(state));
}

}  // namespace

const OptimizerFamily& RmspropFamily() {
  static const auto* family = new OptimizerFamily{
      .hyper_specs = WithPythonOnlyFlags(
          {Number("lr", 1e-2), Number("momentum", 0, /*filled_on_load=*/true),
           Number("alpha", 0.99), Number("eps", 1e-8), Flag("centered"), Number("weight_decay", 0)},
          {"capturable", "foreach", "maximize", "differentiable"}),
      .state_names = {"step", "square_avg", "momentum_buffer", "grad_avg"},
      .field = &RmspropField,
      .state_values = &RmspropStateValues,
      .load = &LoadRmsprop,
  };
  return *family;
}

}  // namespace fsdp::optim_state::internal
