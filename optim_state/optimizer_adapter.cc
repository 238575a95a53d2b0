#include "optim_state/optimizer_adapter.h"

#include <c10/util/Type.h>
#include <c10/util/string_utils.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/status_macros.h"

namespace fsdp::optim_state {
namespace {

using torch::optim::OptimizerOptions;
using torch::optim::OptimizerParamState;

// ---------------------------------------------------------------------------------------
// Hyper-parameters

enum class HyperType {
  kNumber,      // held by LibTorch as a double
  kBool,        // held by LibTorch as a bool
  kBetas,       // held by LibTorch as a (double, double)
  kPythonOnly,  // not held by LibTorch: lives in the side table
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

StateValue Betas() { return StateValue::Tuple({0.9, 0.999}); }

// PyTorch 2.13's `defaults` dict of each optimizer, in order (what `state_dict()` puts in
// every param group before "params"); `filled_on_load` as its __setstate__'s setdefault calls.
const std::vector<HyperSpec>& HyperSpecs(OptimizerKind kind) {
  using T = HyperType;
  static const auto* adam = new std::vector<HyperSpec>{
      {"lr", T::kNumber, 1e-3, false},
      {"betas", T::kBetas, Betas(), false},
      {"eps", T::kNumber, 1e-8, false},
      {"weight_decay", T::kNumber, 0, false},
      {"amsgrad", T::kBool, false, true},
      {"maximize", T::kPythonOnly, false, true},
      {"foreach", T::kPythonOnly, StateValue::None(), true},
      {"capturable", T::kPythonOnly, false, true},
      {"differentiable", T::kPythonOnly, false, true},
      {"fused", T::kPythonOnly, StateValue::None(), true},
      {"decoupled_weight_decay", T::kPythonOnly, false, true},
  };
  // AdamW is Adam with decoupled_weight_decay=True (its __setstate__ forces True).
  static const auto* adamw = new std::vector<HyperSpec>{
      {"lr", T::kNumber, 1e-3, false},
      {"betas", T::kBetas, Betas(), false},
      {"eps", T::kNumber, 1e-8, false},
      {"weight_decay", T::kNumber, 1e-2, false},
      {"amsgrad", T::kBool, false, true},
      {"maximize", T::kPythonOnly, false, true},
      {"foreach", T::kPythonOnly, StateValue::None(), true},
      {"capturable", T::kPythonOnly, false, true},
      {"differentiable", T::kPythonOnly, false, true},
      {"fused", T::kPythonOnly, StateValue::None(), true},
      {"decoupled_weight_decay", T::kPythonOnly, true, true},
  };
  static const auto* sgd = new std::vector<HyperSpec>{
      {"lr", T::kNumber, 1e-3, false},
      {"momentum", T::kNumber, 0, false},
      {"dampening", T::kNumber, 0, false},
      {"weight_decay", T::kNumber, 0, false},
      {"nesterov", T::kBool, false, true},
      {"maximize", T::kPythonOnly, false, true},
      {"foreach", T::kPythonOnly, StateValue::None(), true},
      {"differentiable", T::kPythonOnly, false, true},
      // SGD(fused=None) by default, but __setstate__ fills in fused=False.
      {"fused", T::kPythonOnly, StateValue::None(), true, StateValue(false)},
  };
  static const auto* adagrad = new std::vector<HyperSpec>{
      {"lr", T::kNumber, 1e-2, false},
      {"lr_decay", T::kNumber, 0, false},
      {"eps", T::kNumber, 1e-10, false},
      {"weight_decay", T::kNumber, 0, false},
      {"initial_accumulator_value", T::kNumber, 0, false},
      {"foreach", T::kPythonOnly, StateValue::None(), true},
      {"maximize", T::kPythonOnly, false, true},
      {"differentiable", T::kPythonOnly, false, true},
      {"fused", T::kPythonOnly, StateValue::None(), true},
  };
  static const auto* rmsprop = new std::vector<HyperSpec>{
      {"lr", T::kNumber, 1e-2, false},
      {"momentum", T::kNumber, 0, true},
      {"alpha", T::kNumber, 0.99, false},
      {"eps", T::kNumber, 1e-8, false},
      {"centered", T::kBool, false, true},
      {"weight_decay", T::kNumber, 0, false},
      {"capturable", T::kPythonOnly, false, true},
      {"foreach", T::kPythonOnly, StateValue::None(), true},
      {"maximize", T::kPythonOnly, false, true},
      {"differentiable", T::kPythonOnly, false, true},
  };
  switch (kind) {
    case OptimizerKind::kAdam:
      return *adam;
    case OptimizerKind::kAdamW:
      return *adamw;
    case OptimizerKind::kSGD:
      return *sgd;
    case OptimizerKind::kAdagrad:
      return *adagrad;
    case OptimizerKind::kRMSprop:
      return *rmsprop;
  }
  return *adam;
}

const HyperSpec* FindHyperSpec(OptimizerKind kind, const std::string& name) {
  for (const HyperSpec& spec : HyperSpecs(kind)) {
    if (name == spec.name) return &spec;
  }
  return nullptr;
}

std::optional<double> AsNumber(const StateValue& v) {
  if (const auto* i = v.GetIf<int64_t>()) return static_cast<double>(*i);
  if (const auto* d = v.GetIf<double>()) return *d;
  return std::nullopt;
}

// LibTorch's value of a held hyper-parameter, as a double, bool or (double, double).
template <typename Options>
StateValue ReadAdamLike(const Options& o, const std::string& name) {
  if (name == "lr") return o.lr();
  if (name == "betas") return StateValue::Tuple({std::get<0>(o.betas()), std::get<1>(o.betas())});
  if (name == "eps") return o.eps();
  if (name == "weight_decay") return o.weight_decay();
  if (name == "amsgrad") return o.amsgrad();
  return StateValue::None();
}

StateValue ReadHeld(OptimizerKind kind, const OptimizerOptions& options, const std::string& name) {
  switch (kind) {
    case OptimizerKind::kAdam:
      return ReadAdamLike(static_cast<const torch::optim::AdamOptions&>(options), name);
    case OptimizerKind::kAdamW:
      return ReadAdamLike(static_cast<const torch::optim::AdamWOptions&>(options), name);
    case OptimizerKind::kSGD: {
      const auto& o = static_cast<const torch::optim::SGDOptions&>(options);
      if (name == "lr") return o.lr();
      if (name == "momentum") return o.momentum();
      if (name == "dampening") return o.dampening();
      if (name == "weight_decay") return o.weight_decay();
      if (name == "nesterov") return o.nesterov();
      break;
    }
    case OptimizerKind::kAdagrad: {
      const auto& o = static_cast<const torch::optim::AdagradOptions&>(options);
      if (name == "lr") return o.lr();
      if (name == "lr_decay") return o.lr_decay();
      if (name == "eps") return o.eps();
      if (name == "weight_decay") return o.weight_decay();
      if (name == "initial_accumulator_value") return o.initial_accumulator_value();
      break;
    }
    case OptimizerKind::kRMSprop: {
      const auto& o = static_cast<const torch::optim::RMSpropOptions&>(options);
      if (name == "lr") return o.lr();
      if (name == "momentum") return o.momentum();
      if (name == "alpha") return o.alpha();
      if (name == "eps") return o.eps();
      if (name == "centered") return o.centered();
      if (name == "weight_decay") return o.weight_decay();
      break;
    }
  }
  return StateValue::None();
}

// Sets a held hyper-parameter. Precondition: `value` passed CheckHyperValue for its spec.
template <typename Options>
void WriteAdamLike(Options& o, const std::string& name, const StateValue& value) {
  if (name == "betas") {
    const auto& items = value.Get<StateSequence>().items;
    o.betas(std::make_tuple(*AsNumber(items[0]), *AsNumber(items[1])));
  } else if (name == "amsgrad") {
    o.amsgrad(value.Get<bool>());
  } else if (name == "lr") {
    o.lr(*AsNumber(value));
  } else if (name == "eps") {
    o.eps(*AsNumber(value));
  } else if (name == "weight_decay") {
    o.weight_decay(*AsNumber(value));
  }
}

void WriteHeld(OptimizerKind kind, OptimizerOptions& options, const std::string& name,
               const StateValue& value) {
  switch (kind) {
    case OptimizerKind::kAdam:
      WriteAdamLike(static_cast<torch::optim::AdamOptions&>(options), name, value);
      return;
    case OptimizerKind::kAdamW:
      WriteAdamLike(static_cast<torch::optim::AdamWOptions&>(options), name, value);
      return;
    case OptimizerKind::kSGD: {
      auto& o = static_cast<torch::optim::SGDOptions&>(options);
      if (name == "nesterov") {
        o.nesterov(value.Get<bool>());
      } else if (name == "lr") {
        o.lr(*AsNumber(value));
      } else if (name == "momentum") {
        o.momentum(*AsNumber(value));
      } else if (name == "dampening") {
        o.dampening(*AsNumber(value));
      } else if (name == "weight_decay") {
        o.weight_decay(*AsNumber(value));
      }
      return;
    }
    case OptimizerKind::kAdagrad: {
      auto& o = static_cast<torch::optim::AdagradOptions&>(options);
      const double v = *AsNumber(value);
      if (name == "lr") o.lr(v);
      if (name == "lr_decay") o.lr_decay(v);
      if (name == "eps") o.eps(v);
      if (name == "weight_decay") o.weight_decay(v);
      if (name == "initial_accumulator_value") o.initial_accumulator_value(v);
      return;
    }
    case OptimizerKind::kRMSprop: {
      auto& o = static_cast<torch::optim::RMSpropOptions&>(options);
      if (name == "centered") {
        o.centered(value.Get<bool>());
        return;
      }
      const double v = *AsNumber(value);
      if (name == "lr") o.lr(v);
      if (name == "momentum") o.momentum(v);
      if (name == "alpha") o.alpha(v);
      if (name == "eps") o.eps(v);
      if (name == "weight_decay") o.weight_decay(v);
      return;
    }
  }
}

// OK if `value` has the type `spec` needs; else a message naming the entry.
absl::Status CheckHyperValue(const HyperSpec& spec, const StateValue& value,
                             const std::string& where, OptimizerKind kind) {
  switch (spec.type) {
    case HyperType::kNumber:
      if (AsNumber(value)) return absl::OkStatus();
      return absl::InvalidArgumentError(absl::StrCat(
          where, " must be a number, got ", value.TypeName(), " (", DebugString(value), ")"));
    case HyperType::kBool:
      if (value.Is<bool>()) return absl::OkStatus();
      return absl::InvalidArgumentError(absl::StrCat(
          where, " must be a bool, got ", value.TypeName(), " (", DebugString(value), ")"));
    case HyperType::kBetas: {
      const auto* seq = value.GetIf<StateSequence>();
      if (seq != nullptr && seq->items.size() == 2 && AsNumber(seq->items[0]) &&
          AsNumber(seq->items[1])) {
        return absl::OkStatus();
      }
      return absl::InvalidArgumentError(absl::StrCat(where, " must be a pair of numbers, got ",
                                                     value.TypeName(), " (", DebugString(value),
                                                     ")"));
    }
    case HyperType::kPythonOnly:
      if (std::string(spec.name) == "decoupled_weight_decay" && kind == OptimizerKind::kAdam) {
        // Python's Adam with decoupled_weight_decay=True is AdamW; LibTorch's Adam is not.
        const auto* b = value.GetIf<bool>();
        if (b == nullptr || *b) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, " is ", DebugString(value),
                           ", but LibTorch's Adam couples weight decay (decoupled_weight_decay="
                           "False); load it into AdamW"));
        }
      }
      if (std::string(spec.name) == "maximize") {
        const auto* b = value.GetIf<bool>();
        if (b == nullptr || *b) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, " is ", DebugString(value), ", but LibTorch's ",
                           OptimizerKindName(kind), " can only minimize (maximize=False)"));
        }
      }
      return absl::OkStatus();
  }
  return absl::OkStatus();
}

// `value` (LibTorch's double / tuple of doubles) written with the types of `like` (the
// group's loaded or default value): an int where Python had an int, a list where it had a
// list.
StateValue ConformTo(const StateValue& value, const StateValue* like) {
  if (like == nullptr) return value;
  if (const auto* d = value.GetIf<double>()) {
    if (like->Is<int64_t>() && std::isfinite(*d) && std::trunc(*d) == *d && std::abs(*d) < 9.2e18) {
      return static_cast<int64_t>(*d);
    }
    return value;
  }
  const auto* seq = value.GetIf<StateSequence>();
  const auto* like_seq = like->GetIf<StateSequence>();
  if (seq != nullptr && like_seq != nullptr && seq->items.size() == like_seq->items.size()) {
    StateSequence out{{}, like_seq->is_tuple};
    for (size_t i = 0; i < seq->items.size(); ++i) {
      out.items.push_back(ConformTo(seq->items[i], &like_seq->items[i]));
    }
    return StateValue(std::move(out));
  }
  return value;
}

// ---------------------------------------------------------------------------------------
// Per-parameter state

// Every state name of the five optimizers.
const std::vector<std::string>& AllStateNames() {
  static const auto* names = new std::vector<std::string>{
      "step", "exp_avg",    "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer",
      "sum",  "square_avg", "grad_avg"};
  return *names;
}

const std::vector<std::string>& StateNames(OptimizerKind kind) {
  static const auto* adam =
      new std::vector<std::string>{"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  static const auto* sgd = new std::vector<std::string>{"momentum_buffer"};
  static const auto* adagrad = new std::vector<std::string>{"step", "sum"};
  static const auto* rmsprop =
      new std::vector<std::string>{"step", "square_avg", "momentum_buffer", "grad_avg"};
  switch (kind) {
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW:
      return *adam;
    case OptimizerKind::kSGD:
      return *sgd;
    case OptimizerKind::kAdagrad:
      return *adagrad;
    case OptimizerKind::kRMSprop:
      return *rmsprop;
  }
  return *adam;
}

bool Contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

at::Tensor StepTensor(int64_t step) {
  return at::scalar_tensor(static_cast<double>(step), at::TensorOptions().dtype(at::kFloat));
}

void AddIfDefined(ParamState& out, const char* name, const at::Tensor& t) {
  if (t.defined()) out.Set(name, t);
}

// The state LibTorch holds for one parameter, in PyTorch's names and order.
ParamState TorchStateValues(OptimizerKind kind, const OptimizerParamState& state) {
  ParamState out;
  switch (kind) {
    case OptimizerKind::kAdam: {
      const auto& s = static_cast<const torch::optim::AdamParamState&>(state);
      out.Set("step", StepTensor(s.step()));
      AddIfDefined(out, "exp_avg", s.exp_avg());
      AddIfDefined(out, "exp_avg_sq", s.exp_avg_sq());
      AddIfDefined(out, "max_exp_avg_sq", s.max_exp_avg_sq());
      break;
    }
    case OptimizerKind::kAdamW: {
      const auto& s = static_cast<const torch::optim::AdamWParamState&>(state);
      out.Set("step", StepTensor(s.step()));
      AddIfDefined(out, "exp_avg", s.exp_avg());
      AddIfDefined(out, "exp_avg_sq", s.exp_avg_sq());
      AddIfDefined(out, "max_exp_avg_sq", s.max_exp_avg_sq());
      break;
    }
    case OptimizerKind::kSGD: {
      const auto& s = static_cast<const torch::optim::SGDParamState&>(state);
      AddIfDefined(out, "momentum_buffer", s.momentum_buffer());
      break;
    }
    case OptimizerKind::kAdagrad: {
      const auto& s = static_cast<const torch::optim::AdagradParamState&>(state);
      out.Set("step", StepTensor(s.step()));
      AddIfDefined(out, "sum", s.sum());
      break;
    }
    case OptimizerKind::kRMSprop: {
      const auto& s = static_cast<const torch::optim::RMSpropParamState&>(state);
      out.Set("step", StepTensor(s.step()));
      AddIfDefined(out, "square_avg", s.square_avg());
      AddIfDefined(out, "momentum_buffer", s.momentum_buffer());
      AddIfDefined(out, "grad_avg", s.grad_avg());
      break;
    }
  }
  return out;
}

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Checks and copies the state of one parameter being loaded. With `adopted` (the rvalue
// LoadStateDict), a tensor that already has the parameter's device and dtype is taken as it is
// unless another adopted tensor starts at the same address (then it is copied, so no two
// states share memory); `adopted` collects the addresses.
class ParamStateLoader {
 public:
  ParamStateLoader(OptimizerKind kind, int64_t id, const at::Tensor& param,
                   const ParamState& loaded, absl::flat_hash_set<const void*>* adopted)
      : kind_(kind), id_(id), param_(param), loaded_(loaded), adopted_(adopted) {}

  bool Has(const char* name) const { return loaded_.Contains(name); }
  bool HasAny(std::initializer_list<const char*> names) const {
    for (const char* n : names) {
      if (Has(n)) return true;
    }
    return false;
  }

  absl::Status Error(const std::string& name, const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter ", id_, ": state '", name, "' ", what));
  }

  absl::Status Require(std::initializer_list<const char*> names, const std::string& needs) const {
    for (const char* n : names) {
      if (!Has(n)) return Error(n, absl::StrCat("is missing (", needs, ")"));
    }
    return absl::OkStatus();
  }

  // A copy of tensor state `name`, cast to the parameter's dtype and device.
  absl::StatusOr<at::Tensor> Tensor(const char* name) const {
    const StateValue& v = *loaded_.Find(name);
    const auto* t = v.GetIf<at::Tensor>();
    if (t == nullptr || !t->defined()) {
      return Error(name,
                   absl::StrCat("must be a tensor, got ", v.TypeName(), " (", DebugString(v), ")"));
    }
    if (!t->is_floating_point()) {
      return Error(
          name, absl::StrCat("must be a floating-point tensor, got ", DtypeName(t->scalar_type())));
    }
    if (t->sizes() != param_.sizes()) {
      return Error(name,
                   absl::StrCat("has shape ", ShapeString(t->sizes()),
                                ", but the parameter has shape ", ShapeString(param_.sizes())));
    }
    const bool adopt = adopted_ != nullptr && t->device() == param_.device() &&
                       t->scalar_type() == param_.scalar_type() &&
                       adopted_->insert(t->data_ptr()).second;
    return t->detach().to(param_.device(), param_.scalar_type(), /*non_blocking=*/false,
                          /*copy=*/!adopt);
  }

  absl::StatusOr<at::Tensor> TensorIfPresent(const char* name) const {
    if (!Has(name)) return at::Tensor();
    return Tensor(name);
  }

  // `step` as LibTorch's int64: an int, a whole float or a one-element tensor holding one.
  absl::StatusOr<int64_t> Step() const {
    const StateValue& v = *loaded_.Find("step");
    std::optional<double> value = AsNumber(v);
    if (const auto* t = v.GetIf<at::Tensor>(); t != nullptr && t->defined() && t->numel() == 1) {
      value = t->detach().to(at::kCPU).to(at::kDouble).item<double>();
    }
    if (!value || !(*value >= 0) || std::trunc(*value) != *value || *value > 9.2e18) {
      return Error("step", absl::StrCat("must be a non-negative whole number (an int, a float "
                                        "or a one-element tensor), got ",
                                        DebugString(v)));
    }
    return static_cast<int64_t>(*value);
  }

  template <typename State>
  absl::StatusOr<std::unique_ptr<OptimizerParamState>> AdamLike(bool amsgrad) const {
    if (!HasAny({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})) return nullptr;
    const std::string needs =
        absl::StrCat(OptimizerKindName(kind_),
                     " keeps 'step', 'exp_avg', 'exp_avg_sq' and, with amsgrad, "
                     "'max_exp_avg_sq'");
    FSDP_RETURN_IF_ERROR(Require({"step", "exp_avg", "exp_avg_sq"}, needs));
    if (amsgrad) FSDP_RETURN_IF_ERROR(Require({"max_exp_avg_sq"}, needs));
    auto state = std::make_unique<State>();
    FSDP_ASSIGN_OR_RETURN(int64_t step, Step());
    FSDP_ASSIGN_OR_RETURN(at::Tensor exp_avg, Tensor("exp_avg"));
    FSDP_ASSIGN_OR_RETURN(at::Tensor exp_avg_sq, Tensor("exp_avg_sq"));
    FSDP_ASSIGN_OR_RETURN(at::Tensor max_exp_avg_sq, TensorIfPresent("max_exp_avg_sq"));
    state->step(step);
    state->exp_avg(exp_avg);
    state->exp_avg_sq(exp_avg_sq);
    state->max_exp_avg_sq(max_exp_avg_sq);
    return std::unique_ptr<OptimizerParamState>(std::move(state));
  }

  // LibTorch's state for the parameter (null if the dict has none of its names); entries
  // LibTorch cannot hold go to `extras`.
  absl::StatusOr<std::unique_ptr<OptimizerParamState>> Load(const OptimizerOptions& options,
                                                            ParamState* extras) const {
    // Precondition (checked by the caller): no other optimizer's state names.
    for (const auto& [name, value] : loaded_) {
      if (!Contains(AllStateNames(), name)) extras->Set(name, CloneStateValue(value));
    }
    switch (kind_) {
      case OptimizerKind::kAdam:
        return AdamLike<torch::optim::AdamParamState>(
            static_cast<const torch::optim::AdamOptions&>(options).amsgrad());
      case OptimizerKind::kAdamW:
        return AdamLike<torch::optim::AdamWParamState>(
            static_cast<const torch::optim::AdamWOptions&>(options).amsgrad());
      case OptimizerKind::kSGD: {
        if (!Has("momentum_buffer")) return nullptr;
        if (loaded_.Find("momentum_buffer")->IsNone()) {
          extras->Set("momentum_buffer", StateValue::None());
          return nullptr;
        }
        FSDP_ASSIGN_OR_RETURN(at::Tensor buffer, Tensor("momentum_buffer"));
        auto state = std::make_unique<torch::optim::SGDParamState>();
        state->momentum_buffer(buffer);
        return std::unique_ptr<OptimizerParamState>(std::move(state));
      }
      case OptimizerKind::kAdagrad: {
        if (!HasAny({"step", "sum"})) return nullptr;
        FSDP_RETURN_IF_ERROR(Require({"step", "sum"}, "Adagrad keeps 'step' and 'sum'"));
        FSDP_ASSIGN_OR_RETURN(int64_t step, Step());
        FSDP_ASSIGN_OR_RETURN(at::Tensor sum, Tensor("sum"));
        auto state = std::make_unique<torch::optim::AdagradParamState>();
        state->step(step);
        state->sum(sum);
        return std::unique_ptr<OptimizerParamState>(std::move(state));
      }
      case OptimizerKind::kRMSprop: {
        if (!HasAny({"step", "square_avg", "momentum_buffer", "grad_avg"})) return nullptr;
        const auto& o = static_cast<const torch::optim::RMSpropOptions&>(options);
        const std::string needs =
            "RMSprop keeps 'step', 'square_avg', with momentum 'momentum_buffer' and, "
            "centered, 'grad_avg'";
        FSDP_RETURN_IF_ERROR(Require({"step", "square_avg"}, needs));
        if (o.momentum() > 0) FSDP_RETURN_IF_ERROR(Require({"momentum_buffer"}, needs));
        if (o.centered()) FSDP_RETURN_IF_ERROR(Require({"grad_avg"}, needs));
        FSDP_ASSIGN_OR_RETURN(int64_t step, Step());
        FSDP_ASSIGN_OR_RETURN(at::Tensor square_avg, Tensor("square_avg"));
        FSDP_ASSIGN_OR_RETURN(at::Tensor momentum_buffer, TensorIfPresent("momentum_buffer"));
        FSDP_ASSIGN_OR_RETURN(at::Tensor grad_avg, TensorIfPresent("grad_avg"));
        auto state = std::make_unique<torch::optim::RMSpropParamState>();
        state->step(step);
        state->square_avg(square_avg);
        state->momentum_buffer(momentum_buffer);
        state->grad_avg(grad_avg);
        return std::unique_ptr<OptimizerParamState>(std::move(state));
      }
    }
    return nullptr;
  }

 private:
  OptimizerKind kind_;
  int64_t id_;
  const at::Tensor& param_;
  const ParamState& loaded_;
  absl::flat_hash_set<const void*>* adopted_;
};

void* TorchStateKey(const at::Tensor& param) {
  return param.unsafeGetTensorImpl();
}

HyperParams DefaultTemplate(OptimizerKind kind) {
  HyperParams out;
  for (const HyperSpec& spec : HyperSpecs(kind)) out.Set(spec.name, spec.python_default);
  return out;
}

}  // namespace

absl::string_view OptimizerKindName(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kAdam:
      return "Adam";
    case OptimizerKind::kAdamW:
      return "AdamW";
    case OptimizerKind::kSGD:
      return "SGD";
    case OptimizerKind::kAdagrad:
      return "Adagrad";
    case OptimizerKind::kRMSprop:
      return "RMSprop";
  }
  return "unknown";
}

absl::StatusOr<OptimizerAdapter> OptimizerAdapter::Create(torch::optim::Optimizer& optimizer) {
  std::optional<OptimizerKind> kind;
  if (dynamic_cast<torch::optim::Adam*>(&optimizer) != nullptr) {
    kind = OptimizerKind::kAdam;
  } else if (dynamic_cast<torch::optim::AdamW*>(&optimizer) != nullptr) {
    kind = OptimizerKind::kAdamW;
  } else if (dynamic_cast<torch::optim::SGD*>(&optimizer) != nullptr) {
    kind = OptimizerKind::kSGD;
  } else if (dynamic_cast<torch::optim::Adagrad*>(&optimizer) != nullptr) {
    kind = OptimizerKind::kAdagrad;
  } else if (dynamic_cast<torch::optim::RMSprop*>(&optimizer) != nullptr) {
    kind = OptimizerKind::kRMSprop;
  }
  if (!kind) {
    return absl::InvalidArgumentError(absl::StrCat(
        "OptimizerAdapter::Create: unsupported optimizer ", c10::demangle(typeid(optimizer).name()),
        "; supported are torch::optim::Adam, AdamW, SGD, Adagrad and RMSprop"));
  }
  return OptimizerAdapter(optimizer, *kind);
}

OptimizerAdapter::OptimizerAdapter(torch::optim::Optimizer& optimizer, OptimizerKind kind)
    : optimizer_(&optimizer), kind_(kind), default_template_(DefaultTemplate(kind)) {
  group_templates_.assign(optimizer.param_groups().size(), default_template_);
  RecordStateOrder();
}

std::vector<OptimizerAdapter::ParamRef> OptimizerAdapter::ParamRefs() const {
  // As `optim.state_dict()`: IDs count every position of every group; a tensor listed twice
  // keeps its first ID.
  std::vector<ParamRef> refs;
  absl::flat_hash_map<const c10::TensorImpl*, int64_t> ids;
  int64_t next = 0;
  const auto& groups = optimizer_->param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& params = groups[g].params();
    for (size_t j = 0; j < params.size(); ++j, ++next) {
      const int64_t id = ids.emplace(params[j].unsafeGetTensorImpl(), next).first->second;
      refs.push_back(ParamRef{g, params[j], id, TorchStateKey(params[j])});
    }
  }
  return refs;
}

const HyperParams& OptimizerAdapter::GroupTemplate(size_t group) const {
  return group < group_templates_.size() ? group_templates_[group] : default_template_;
}

bool OptimizerAdapter::HasState(StateKey key) const {
  const auto& state = optimizer_->state();
  auto it = state.find(key);
  return (it != state.end() && it->second != nullptr) || extras_.contains(key);
}

void OptimizerAdapter::RecordStateOrder() {
  for (const ParamRef& ref : ParamRefs()) {
    if (!in_state_order_.contains(ref.key) && HasState(ref.key)) {
      in_state_order_.insert(ref.key);
      state_order_.push_back(ref.key);
    }
  }
}

absl::Status OptimizerAdapter::Step() {
  const std::string context =
      absl::StrCat("OptimizerAdapter::Step (", OptimizerKindName(kind_), ")");
  // PyTorch 2.x's SGD keeps no state without momentum (1.13 stored momentum_buffer=None),
  // and neither does LibTorch's.
  FSDP_RETURN_IF_ERROR(CallTorch(context, [&] { optimizer_->step(); }));
  RecordStateOrder();
  return absl::OkStatus();
}

absl::StatusOr<OptimStateDict> OptimizerAdapter::StateDict() const {
  const std::string context =
      absl::StrCat("OptimizerAdapter::StateDict (", OptimizerKindName(kind_), ")");
  return CallTorch(context, [&]() -> OptimStateDict {
    OptimStateDict out;
    const std::vector<ParamRef> refs = ParamRefs();
    absl::flat_hash_map<StateKey, const ParamRef*> by_key;
    for (const ParamRef& ref : refs) by_key.emplace(ref.key, &ref);

    // Parameters with state: in the recorded order, then any that gained state unseen.
    std::vector<const ParamRef*> with_state;
    absl::flat_hash_set<StateKey> listed;
    for (StateKey key : state_order_) {
      auto it = by_key.find(key);
      if (it != by_key.end() && HasState(key) && listed.insert(key).second) {
        with_state.push_back(it->second);
      }
    }
    for (const ParamRef& ref : refs) {
      if (HasState(ref.key) && listed.insert(ref.key).second) with_state.push_back(&ref);
    }

    const auto& torch_state = optimizer_->state();
    for (const ParamRef* ref : with_state) {
      ParamState held;
      auto it = torch_state.find(ref->key);
      if (it != torch_state.end() && it->second != nullptr) {
        held = TorchStateValues(kind_, *it->second);
      }
      auto extras_it = extras_.find(ref->key);
      if (extras_it == extras_.end()) {
        out.state.Set(ParamKey::Id(ref->id), std::move(held));
        continue;
      }
      const ParamExtras& extras = extras_it->second;
      ParamState merged;
      for (const std::string& name : extras.order) {
        if (const StateValue* v = held.Find(name)) {
          merged.Set(name, *v);
        } else if (const StateValue* e = extras.values.Find(name)) {
          merged.Set(name, *e);
        }
      }
      for (const auto& [name, value] : held) {
        if (!merged.Contains(name)) merged.Set(name, value);
      }
      for (const auto& [name, value] : extras.values) {
        if (!merged.Contains(name)) merged.Set(name, value);
      }
      out.state.Set(ParamKey::Id(ref->id), std::move(merged));
    }

    const auto& groups = optimizer_->param_groups();
    size_t next_ref = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      ParamGroup group;
      for (const auto& [name, value] : GroupTemplate(g)) {
        const HyperSpec* spec = FindHyperSpec(kind_, name);
        if (spec != nullptr && spec->type != HyperType::kPythonOnly) {
          group.hyper_params.Set(name,
                                 ConformTo(ReadHeld(kind_, groups[g].options(), name), &value));
        } else {
          group.hyper_params.Set(name, value);
        }
      }
      for (size_t j = 0; j < groups[g].params().size(); ++j) {
        group.params.push_back(ParamKey::Id(refs[next_ref++].id));
      }
      out.param_groups.push_back(std::move(group));
    }
    return out;
  });
}

absl::Status OptimizerAdapter::LoadStateDict(const OptimStateDict& state_dict) {
  const std::string context = absl::StrCat("LoadStateDict (", OptimizerKindName(kind_), ")");
  return CallTorch(context, [&]() -> absl::Status {
    return Annotate(LoadImpl(state_dict, /*adopt=*/false), context);
  });
}

absl::Status OptimizerAdapter::LoadStateDict(OptimStateDict&& state_dict) {
  const std::string context = absl::StrCat("LoadStateDict (", OptimizerKindName(kind_), ")");
  return CallTorch(context, [&]() -> absl::Status {
    return Annotate(LoadImpl(state_dict, /*adopt=*/true), context);
  });
}

absl::Status OptimizerAdapter::LoadImpl(const OptimStateDict& state_dict, bool adopt) {
  absl::flat_hash_set<const void*> adopted;
  auto& groups = optimizer_->param_groups();
  const std::vector<ParamRef> refs = ParamRefs();

  // The dict's IDs -> the optimizer's parameters.
  absl::flat_hash_map<int64_t, const ParamRef*> id_map;
  std::vector<std::unique_ptr<OptimizerOptions>> new_options(groups.size());
  std::vector<HyperParams> new_templates(groups.size());
  if (state_dict.has_param_groups) {
    if (state_dict.param_groups.size() != groups.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "loaded state dict has a different number of parameter groups (",
          state_dict.param_groups.size(), " in the dict, ", groups.size(), " in the optimizer)"));
    }
    for (size_t g = 0; g < groups.size(); ++g) {
      if (state_dict.param_groups[g].params.size() != groups[g].params().size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "loaded state dict contains a parameter group that doesn't match the size of "
            "optimizer's group (group ",
            g, ": ", state_dict.param_groups[g].params.size(), " parameters in the dict, ",
            groups[g].params().size(), " in the optimizer)"));
      }
    }
    size_t next_ref = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      for (const ParamKey& key : state_dict.param_groups[g].params) {
        const ParamRef& ref = refs[next_ref++];
        if (!key.is_id()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "param_groups[", g, "] lists parameter ", key.ToString(),
              " by name; loading takes a dict keyed by parameter IDs (rekey it first)"));
        }
        if (!id_map.emplace(key.id(), &ref).second) {
          return absl::InvalidArgumentError(
              absl::StrCat("parameter ID ", key.id(), " appears more than once in param_groups"));
        }
      }
    }
  } else {
    for (const ParamRef& ref : refs) id_map.emplace(ref.id, &ref);
  }

  // Keys and state names first, so that another optimizer's dict is named as such.
  for (const auto& [key, loaded] : state_dict.state) {
    if (!key.is_id()) {
      return absl::InvalidArgumentError(
          absl::StrCat("state is keyed by parameter name ", key.ToString(),
                       "; loading takes a dict keyed by parameter IDs (rekey it first)"));
    }
    if (!id_map.contains(key.id())) {
      return absl::InvalidArgumentError(
          absl::StrCat("state has parameter ID ", key.id(), ", which is in no parameter group"));
    }
    const std::vector<std::string>& own = StateNames(kind_);
    for (const auto& [name, value] : loaded) {
      if (Contains(AllStateNames(), name) && !Contains(own, name)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "parameter ", key.id(), ": state '", name, "' is not state of ",
            OptimizerKindName(kind_), " (", OptimizerKindName(kind_), " keeps '",
            absl::StrJoin(own, "', '"), "'); is this another optimizer's state dict?"));
      }
    }
  }

  if (state_dict.has_param_groups) {
    // Hyper-parameters: checked and staged on copies of the groups' options.
    for (size_t g = 0; g < groups.size(); ++g) {
      new_options[g] = groups[g].options().clone();
      HyperParams& tmpl = new_templates[g];
      for (const auto& [name, value] : state_dict.param_groups[g].hyper_params) {
        const std::string where = absl::StrCat("param_groups[", g, "]['", name, "']");
        if (name == "params") {
          return absl::InvalidArgumentError(
              absl::StrCat(where, " must not be among the hyper-parameters"));
        }
        const HyperSpec* spec = FindHyperSpec(kind_, name);
        if (spec != nullptr) {
          FSDP_RETURN_IF_ERROR(CheckHyperValue(*spec, value, where, kind_));
          if (spec->type != HyperType::kPythonOnly) WriteHeld(kind_, *new_options[g], name, value);
        }
        tmpl.Set(name, CloneStateValue(value));
      }
      for (const HyperSpec& spec : HyperSpecs(kind_)) {
        if (tmpl.Contains(spec.name)) continue;
        if (!spec.filled_on_load) {
          return absl::InvalidArgumentError(absl::StrCat("param_groups[", g, "] has no '",
                                                         spec.name, "', which ",
                                                         OptimizerKindName(kind_), " needs"));
        }
        const StateValue& filled = spec.filled_value ? *spec.filled_value : spec.python_default;
        tmpl.Set(spec.name, filled);
        if (spec.type != HyperType::kPythonOnly) {
          WriteHeld(kind_, *new_options[g], spec.name, filled);
        }
      }
      // AdamW.__setstate__ sets decoupled_weight_decay=True whatever the dict says.
      if (kind_ == OptimizerKind::kAdamW) tmpl.Set("decoupled_weight_decay", true);
    }
  } else {
    for (size_t g = 0; g < groups.size(); ++g) {
      new_options[g] = groups[g].options().clone();
      new_templates[g] = GroupTemplate(g);
    }
  }

  // State: checked and copied into new LibTorch states and a new side table.
  ska::flat_hash_map<StateKey, std::unique_ptr<OptimizerParamState>> new_state;
  absl::flat_hash_map<StateKey, ParamExtras> new_extras;
  std::vector<StateKey> new_order;
  for (const auto& [key, loaded] : state_dict.state) {
    const ParamRef& ref = *id_map.at(key.id());
    ParamStateLoader loader(kind_, key.id(), ref.param, loaded, adopt ? &adopted : nullptr);
    ParamState extra_values;
    FSDP_ASSIGN_OR_RETURN(std::unique_ptr<OptimizerParamState> torch_state,
                          loader.Load(*new_options[ref.group], &extra_values));
    const bool held = torch_state != nullptr;
    const std::vector<std::string> held_names =
        held ? TorchStateValues(kind_, *torch_state).Keys() : std::vector<std::string>();
    if (held) new_state[ref.key] = std::move(torch_state);
    // A side-table entry for what LibTorch cannot hold, a different name order, or a
    // parameter whose state LibTorch cannot hold at all (also `{}`: Python keeps it).
    if (!held || !extra_values.empty() || loaded.Keys() != held_names) {
      new_extras[ref.key] = ParamExtras{loaded.Keys(), std::move(extra_values)};
    }
    new_order.push_back(ref.key);
  }
  if (kind_ == OptimizerKind::kAdagrad) {
    for (const ParamRef& ref : refs) {
      if (new_state.find(ref.key) != new_state.end()) continue;
      if (ref.param.numel() == 0) {
        // An empty parameter (with use_orig_params, a rank's slice of a parameter that lies
        // wholly on other ranks) has nothing to keep: FSDP's dicts give it no state, and it
        // gets LibTorch's initial one.
        auto initial = std::make_unique<torch::optim::AdagradParamState>();
        initial->step(0);
        initial->sum(torch::zeros_like(ref.param, at::MemoryFormat::Contiguous));
        new_state[ref.key] = std::move(initial);
        continue;
      }
      return absl::InvalidArgumentError(absl::StrCat(
          "parameter ", ref.id,
          ": state 'sum' is missing (Adagrad keeps 'step' and 'sum' for every parameter)"));
    }
  }

  // Commit: nothing below fails.
  if (state_dict.has_param_groups) {
    for (size_t g = 0; g < groups.size(); ++g) groups[g].set_options(std::move(new_options[g]));
  }
  group_templates_ = std::move(new_templates);
  optimizer_->state() = std::move(new_state);
  extras_ = std::move(new_extras);
  state_order_ = std::move(new_order);
  in_state_order_ = absl::flat_hash_set<StateKey>(state_order_.begin(), state_order_.end());
  return absl::OkStatus();
}

absl::Status OptimizerAdapter::SetExtraState(const at::Tensor& param, const std::string& name,
                                             StateValue value) {
  StateKey key = TorchStateKey(param);
  bool found = false;
  for (const auto& group : optimizer_->param_groups()) {
    for (const at::Tensor& p : group.params()) found = found || TorchStateKey(p) == key;
  }
  if (!found) {
    return absl::InvalidArgumentError(
        "SetExtraState: the tensor is not a parameter of this optimizer");
  }
  if (Contains(AllStateNames(), name)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SetExtraState: '", name, "' is optimizer state, kept by the optimizer itself"));
  }
  ParamExtras& extras = extras_[key];
  if (extras.order.empty()) {
    // Python appends to the state the optimizer already has.
    auto torch_it = optimizer_->state().find(key);
    if (torch_it != optimizer_->state().end() && torch_it->second != nullptr) {
      extras.order = TorchStateValues(kind_, *torch_it->second).Keys();
    }
    for (const auto& [existing, v] : extras.values) {
      if (!Contains(extras.order, existing)) extras.order.push_back(existing);
    }
  }
  if (!Contains(extras.order, name)) extras.order.push_back(name);
  extras.values.Set(name, std::move(value));
  RecordStateOrder();
  return absl::OkStatus();
}

const StateValue* OptimizerAdapter::FindExtraState(const at::Tensor& param,
                                                   const std::string& name) const {
  auto it = extras_.find(TorchStateKey(param));
  return it == extras_.end() ? nullptr : it->second.values.Find(name);
}

absl::Status OptimizerAdapter::SetExtraHyperParam(size_t group_index, const std::string& name,
                                                  StateValue value) {
  const size_t num_groups = optimizer_->param_groups().size();
  if (group_index >= num_groups) {
    return absl::InvalidArgumentError(absl::StrCat("SetExtraHyperParam: group ", group_index,
                                                   " out of range (the optimizer has ", num_groups,
                                                   ")"));
  }
  const std::string where =
      absl::StrCat("SetExtraHyperParam: param_groups[", group_index, "]['", name, "']");
  if (name == "params") {
    return absl::InvalidArgumentError(absl::StrCat(where, ": 'params' is not a hyper-parameter"));
  }
  const HyperSpec* spec = FindHyperSpec(kind_, name);
  if (spec != nullptr && spec->type != HyperType::kPythonOnly) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, " is held by LibTorch's ", OptimizerKindName(kind_), "Options; set it there"));
  }
  if (spec != nullptr) FSDP_RETURN_IF_ERROR(CheckHyperValue(*spec, value, where, kind_));
  while (group_templates_.size() < num_groups) group_templates_.push_back(default_template_);
  group_templates_[group_index].Set(name, std::move(value));
  return absl::OkStatus();
}

}  // namespace fsdp::optim_state
