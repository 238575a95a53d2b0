#include "optim_state/internal/hyper_params.h"

#include <cmath>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "optim_state/internal/param_state_loader.h"

namespace fsdp::optim_state::internal {
namespace {

// "<where> must be <what>, got <type> (<repr>)".
absl::Status WrongType(const std::string& where, const char* what, const StateValue& value) {
  return absl::InvalidArgumentError(absl::StrCat(where, " must be ", what, ", got ",
                                                 value.TypeName(), " (", DebugString(value), ")"));
}

// A bool that must be False: Python's maximize (LibTorch cannot maximize), Adam's
// decoupled_weight_decay (Python's Adam with it is AdamW; LibTorch's Adam is not).
absl::Status CheckPythonOnlyValue(const HyperSpec& spec, const StateValue& value,
                                  const std::string& where, OptimizerKind kind) {
  const std::string name = spec.name;
  const bool must_be_false =
      name == "maximize" || (name == "decoupled_weight_decay" && kind == OptimizerKind::kAdam);
  if (!must_be_false) return absl::OkStatus();
  const auto* b = value.GetIf<bool>();
  if (b != nullptr && !*b) return absl::OkStatus();
  if (name == "maximize") {
    return absl::InvalidArgumentError(absl::StrCat(where, " is ", DebugString(value),
                                                   ", but LibTorch's ", OptimizerKindName(kind),
                                                   " can only minimize (maximize=False)"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(where, " is ", DebugString(value),
                   ", but LibTorch's Adam couples weight decay (decoupled_weight_decay="
                   "False); load it into AdamW"));
}

}  // namespace

const HyperSpec* FindHyperSpec(OptimizerKind kind, const std::string& name) {
  for (const HyperSpec& spec : FamilyOf(kind).hyper_specs) {
    if (name == spec.name) return &spec;
  }
  return nullptr;
}

HyperParams DefaultHyperParams(OptimizerKind kind) {
  HyperParams out;
  for (const HyperSpec& spec : FamilyOf(kind).hyper_specs) out.Set(spec.name, spec.python_default);
  return out;
}

StateValue ReadHeld(OptimizerKind kind, const torch::optim::OptimizerOptions& options,
                    const std::string& name) {
  // The family's field lookup hands out writable pointers; here they are only read.
  const HeldField f =
      FamilyOf(kind).field(const_cast<torch::optim::OptimizerOptions&>(options), name);
  if (f.number != nullptr) return *f.number;
  if (f.flag != nullptr) return *f.flag;
  if (f.betas != nullptr) return StateValue::Tuple({std::get<0>(*f.betas), std::get<1>(*f.betas)});
  return StateValue::None();
}

void WriteHeld(OptimizerKind kind, torch::optim::OptimizerOptions& options, const std::string& name,
               const StateValue& value) {
  const HeldField f = FamilyOf(kind).field(options, name);
  if (f.number != nullptr) {
    *f.number = *AsNumber(value);
  } else if (f.flag != nullptr) {
    *f.flag = value.Get<bool>();
  } else if (f.betas != nullptr) {
    const auto& items = value.Get<StateSequence>().items;
    *f.betas = std::make_tuple(*AsNumber(items[0]), *AsNumber(items[1]));
  }
}

absl::Status CheckHyperValue(const HyperSpec& spec, const StateValue& value,
                             const std::string& where, OptimizerKind kind) {
  switch (spec.type) {
    case HyperType::kNumber:
      if (AsNumber(value)) return absl::OkStatus();
      return WrongType(where, "a number", value);
    case HyperType::kBool:
      if (value.Is<bool>()) return absl::OkStatus();
      return WrongType(where, "a bool", value);
    case HyperType::kBetas: {
      const auto* seq = value.GetIf<StateSequence>();
      if (seq != nullptr && seq->items.size() == 2 && AsNumber(seq->items[0]) &&
          AsNumber(seq->items[1])) {
        return absl::OkStatus();
      }
      return WrongType(where, "a pair of numbers", value);
    }
    case HyperType::kPythonOnly:
      return CheckPythonOnlyValue(spec, value, where, kind);
  }
  return absl::OkStatus();
}

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

}  // namespace fsdp::optim_state::internal
