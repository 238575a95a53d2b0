#include "optim_state/optimizer_adapter.h"

#include <c10/util/Type.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <memory>
#include <optional>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/status_macros.h"
#include "optim_state/internal/hyper_params.h"
#include "optim_state/internal/optimizer_family.h"
#include "optim_state/internal/param_state_loader.h"

namespace fsdp::optim_state {
namespace {

using internal::Contains;
using internal::FamilyOf;
using internal::HyperSpec;
using internal::HyperType;
using torch::optim::OptimizerOptions;
using torch::optim::OptimizerParamState;

void* TorchStateKey(const at::Tensor& param) { return param.unsafeGetTensorImpl(); }

// Checks group `g`'s loaded hyper-parameters and stages them: held ones on `options` (a copy
// of the group's), all of them in `tmpl`, with what Python's __setstate__ fills in for those
// missing.
absl::Status StageGroupHyperParams(OptimizerKind kind, size_t g, const HyperParams& loaded,
                                   OptimizerOptions& options, HyperParams& tmpl) {
  for (const auto& [name, value] : loaded) {
    const std::string where = absl::StrCat("param_groups[", g, "]['", name, "']");
    if (name == "params") {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " must not be among the hyper-parameters"));
    }
    const HyperSpec* spec = internal::FindHyperSpec(kind, name);
    if (spec != nullptr) {
      FSDP_RETURN_IF_ERROR(internal::CheckHyperValue(*spec, value, where, kind));
      if (spec->type != HyperType::kPythonOnly) internal::WriteHeld(kind, options, name, value);
    }
    tmpl.Set(name, CloneStateValue(value));
  }
  for (const HyperSpec& spec : FamilyOf(kind).hyper_specs) {
    if (tmpl.Contains(spec.name)) continue;
    if (!spec.filled_on_load) {
      return absl::InvalidArgumentError(absl::StrCat("param_groups[", g, "] has no '", spec.name,
                                                     "', which ", OptimizerKindName(kind),
                                                     " needs"));
    }
    const StateValue& filled = spec.filled_value ? *spec.filled_value : spec.python_default;
    tmpl.Set(spec.name, filled);
    if (spec.type != HyperType::kPythonOnly) internal::WriteHeld(kind, options, spec.name, filled);
  }
  // AdamW.__setstate__ sets decoupled_weight_decay=True whatever the dict says.
  if (kind == OptimizerKind::kAdamW) tmpl.Set("decoupled_weight_decay", true);
  return absl::OkStatus();
}

}  // namespace

struct OptimizerAdapter::StagedLoad {
  std::vector<std::unique_ptr<OptimizerOptions>> options;
  std::vector<HyperParams> templates;
  ska::flat_hash_map<StateKey, std::unique_ptr<OptimizerParamState>> state;
  absl::flat_hash_map<StateKey, ParamExtras> extras;
  std::vector<StateKey> order;
  // The rvalue LoadStateDict's adopted tensors' addresses.
  absl::flat_hash_set<const void*> adopted;
};

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
    : optimizer_(&optimizer), kind_(kind), default_template_(internal::DefaultHyperParams(kind)) {
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

ParamState OptimizerAdapter::SavedState(const ParamRef& ref) const {
  ParamState held;
  const auto& torch_state = optimizer_->state();
  auto it = torch_state.find(ref.key);
  if (it != torch_state.end() && it->second != nullptr) {
    held = FamilyOf(kind_).state_values(*it->second);
  }
  auto extras_it = extras_.find(ref.key);
  if (extras_it == extras_.end()) return held;
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
  return merged;
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
    for (const ParamRef* ref : with_state) out.state.Set(ParamKey::Id(ref->id), SavedState(*ref));

    const auto& groups = optimizer_->param_groups();
    size_t next_ref = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      ParamGroup group;
      for (const auto& [name, value] : GroupTemplate(g)) {
        const HyperSpec* spec = internal::FindHyperSpec(kind_, name);
        if (spec != nullptr && spec->type != HyperType::kPythonOnly) {
          group.hyper_params.Set(
              name,
              internal::ConformTo(internal::ReadHeld(kind_, groups[g].options(), name), &value));
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
  const std::vector<ParamRef> refs = ParamRefs();
  FSDP_ASSIGN_OR_RETURN(IdMap id_map, MapLoadedIds(state_dict, refs));
  // Keys and state names first, so that another optimizer's dict is named as such.
  FSDP_RETURN_IF_ERROR(CheckLoadedKeys(state_dict, id_map));
  StagedLoad staged;
  FSDP_RETURN_IF_ERROR(StageHyperParams(state_dict, staged));
  FSDP_RETURN_IF_ERROR(StageState(state_dict, id_map, adopt, staged));
  if (kind_ == OptimizerKind::kAdagrad)
    FSDP_RETURN_IF_ERROR(StageMissingAdagradState(refs, staged));
  Commit(staged, state_dict.has_param_groups);
  return absl::OkStatus();
}

// The dict's IDs -> the optimizer's parameters: by position within groups of matching sizes
// (without param_groups, the optimizer's own IDs).
absl::StatusOr<OptimizerAdapter::IdMap> OptimizerAdapter::MapLoadedIds(
    const OptimStateDict& state_dict, const std::vector<ParamRef>& refs) const {
  IdMap id_map;
  if (!state_dict.has_param_groups) {
    for (const ParamRef& ref : refs) id_map.emplace(ref.id, &ref);
    return id_map;
  }
  const auto& groups = optimizer_->param_groups();
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
        return absl::InvalidArgumentError(
            absl::StrCat("param_groups[", g, "] lists parameter ", key.ToString(),
                         " by name; loading takes a dict keyed by parameter IDs (rekey it first)"));
      }
      if (!id_map.emplace(key.id(), &ref).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("parameter ID ", key.id(), " appears more than once in param_groups"));
      }
    }
  }
  return id_map;
}

// Every state key is an ID of a group, and no state name is another optimizer's.
absl::Status OptimizerAdapter::CheckLoadedKeys(const OptimStateDict& state_dict,
                                               const IdMap& id_map) const {
  const std::vector<std::string>& own = FamilyOf(kind_).state_names;
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
    for (const auto& [name, value] : loaded) {
      if (Contains(internal::AllStateNames(), name) && !Contains(own, name)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "parameter ", key.id(), ": state '", name, "' is not state of ",
            OptimizerKindName(kind_), " (", OptimizerKindName(kind_), " keeps '",
            absl::StrJoin(own, "', '"), "'); is this another optimizer's state dict?"));
      }
    }
  }
  return absl::OkStatus();
}

// Hyper-parameters: checked and staged on copies of the groups' options (without
// param_groups, the groups' own).
absl::Status OptimizerAdapter::StageHyperParams(const OptimStateDict& state_dict,
                                                StagedLoad& staged) const {
  const auto& groups = optimizer_->param_groups();
  staged.options.resize(groups.size());
  staged.templates.resize(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    staged.options[g] = groups[g].options().clone();
    if (!state_dict.has_param_groups) {
      staged.templates[g] = GroupTemplate(g);
      continue;
    }
    FSDP_RETURN_IF_ERROR(StageGroupHyperParams(kind_, g, state_dict.param_groups[g].hyper_params,
                                               *staged.options[g], staged.templates[g]));
  }
  return absl::OkStatus();
}

// State: checked and copied into new LibTorch states and a new side table.
absl::Status OptimizerAdapter::StageState(const OptimStateDict& state_dict, const IdMap& id_map,
                                          bool adopt, StagedLoad& staged) const {
  const internal::OptimizerFamily& family = FamilyOf(kind_);
  for (const auto& [key, loaded] : state_dict.state) {
    const ParamRef& ref = *id_map.at(key.id());
    internal::ParamStateLoader loader(key.id(), ref.param, loaded,
                                      adopt ? &staged.adopted : nullptr);
    // Entries LibTorch has no field for go to the side table.
    ParamState extra_values;
    for (const auto& [name, value] : loaded) {
      if (!Contains(internal::AllStateNames(), name)) {
        extra_values.Set(name, CloneStateValue(value));
      }
    }
    FSDP_ASSIGN_OR_RETURN(std::unique_ptr<OptimizerParamState> torch_state,
                          family.load(loader, *staged.options[ref.group], &extra_values));
    const bool held = torch_state != nullptr;
    const std::vector<std::string> held_names =
        held ? family.state_values(*torch_state).Keys() : std::vector<std::string>();
    if (held) staged.state[ref.key] = std::move(torch_state);
    // A side-table entry for what LibTorch cannot hold, a different name order, or a
    // parameter whose state LibTorch cannot hold at all (also `{}`: Python keeps it).
    if (!held || !extra_values.empty() || loaded.Keys() != held_names) {
      staged.extras[ref.key] = ParamExtras{loaded.Keys(), std::move(extra_values)};
    }
    staged.order.push_back(ref.key);
  }
  return absl::OkStatus();
}

// Adagrad keeps state for every parameter.
absl::Status OptimizerAdapter::StageMissingAdagradState(const std::vector<ParamRef>& refs,
                                                        StagedLoad& staged) const {
  for (const ParamRef& ref : refs) {
    if (staged.state.find(ref.key) != staged.state.end()) continue;
    if (ref.param.numel() == 0) {
      // An empty parameter (with use_orig_params, a rank's slice of a parameter that lies
      // wholly on other ranks) has nothing to keep: FSDP's dicts give it no state, and it
      // gets LibTorch's initial one.
      auto initial = std::make_unique<torch::optim::AdagradParamState>();
      initial->step(0);
      initial->sum(torch::zeros_like(ref.param, at::MemoryFormat::Contiguous));
      staged.state[ref.key] = std::move(initial);
      continue;
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "parameter ", ref.id,
        ": state 'sum' is missing (Adagrad keeps 'step' and 'sum' for every parameter)"));
  }
  return absl::OkStatus();
}

// Nothing here fails.
void OptimizerAdapter::Commit(StagedLoad& staged, bool has_param_groups) {
  auto& groups = optimizer_->param_groups();
  if (has_param_groups) {
    for (size_t g = 0; g < groups.size(); ++g) groups[g].set_options(std::move(staged.options[g]));
  }
  group_templates_ = std::move(staged.templates);
  optimizer_->state() = std::move(staged.state);
  extras_ = std::move(staged.extras);
  state_order_ = std::move(staged.order);
  in_state_order_ = absl::flat_hash_set<StateKey>(state_order_.begin(), state_order_.end());
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
  if (Contains(internal::AllStateNames(), name)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SetExtraState: '", name, "' is optimizer state, kept by the optimizer itself"));
  }
  ParamExtras& extras = extras_[key];
  if (extras.order.empty()) {
    // Python appends to the state the optimizer already has.
    auto torch_it = optimizer_->state().find(key);
    if (torch_it != optimizer_->state().end() && torch_it->second != nullptr) {
      extras.order = FamilyOf(kind_).state_values(*torch_it->second).Keys();
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
  const HyperSpec* spec = internal::FindHyperSpec(kind_, name);
  if (spec != nullptr && spec->type != HyperType::kPythonOnly) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, " is held by LibTorch's ", OptimizerKindName(kind_), "Options; set it there"));
  }
  if (spec != nullptr) FSDP_RETURN_IF_ERROR(internal::CheckHyperValue(*spec, value, where, kind_));
  while (group_templates_.size() < num_groups) group_templates_.push_back(default_template_);
  group_templates_[group_index].Set(name, std::move(value));
  return absl::OkStatus();
}

}  // namespace fsdp::optim_state
