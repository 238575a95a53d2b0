#include "checkpoint/full_checkpoint.h"

#include "absl/strings/str_cat.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/internal/full_checkpoint_pickle.h"
#include "checkpoint/internal/torch_save_archive.h"
#include "checkpoint/torch_load.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint {
namespace {

using internal::Pickled;
using internal::PickleModel;
using internal::PickleOptim;
using internal::WriteArchive;
using optim_state::OptimStateDict;
using optim_state::ParamKey;
using optim_state::StateValue;

absl::StatusOr<ParamKey> KeyFromPyValue(const PyValue& key, const std::string& where) {
  if (key.is_int()) return ParamKey::Id(key.as_int());
  if (key.is_str()) return ParamKey::Fqn(key.as_str());
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": a parameter key must be an int or a str, not ", key.TypeName()));
}

}  // namespace

absl::StatusOr<StateValue> StateValueFromPyValue(const PyValue& value, const std::string& where) {
  if (value.is_none()) return StateValue::None();
  if (value.is_bool()) return StateValue(value.as_bool());
  if (value.is_int()) return StateValue(value.as_int());
  if (value.is_float()) return StateValue(value.as_float());
  if (value.is_str()) return StateValue(value.as_str());
  if (value.is_tensor()) return StateValue(value.as_tensor());
  if (value.is_tuple() || value.is_list()) {
    std::vector<StateValue> items;
    for (const PyValue& item : value.items()) {
      FSDP_ASSIGN_OR_RETURN(StateValue converted, StateValueFromPyValue(item, where));
      items.push_back(std::move(converted));
    }
    return value.is_tuple() ? StateValue::Tuple(std::move(items))
                            : StateValue::List(std::move(items));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": a ", value.TypeName(), " is not an optimizer state value"));
}

absl::Status WriteModelStateDict(const ModelStateDict& state, const std::string& path) {
  FSDP_ASSIGN_OR_RETURN(Pickled pickled, PickleModel(state, path));
  return WriteArchive(pickled, path, /*durable=*/false);
}

absl::StatusOr<ModelStateDict> ReadModelStateDict(const std::string& path) {
  FSDP_ASSIGN_OR_RETURN(PyValue value, TorchLoad(path));
  return ModelStateDictOf(value, path);
}

absl::StatusOr<ModelStateDict> ModelStateDictOf(const PyValue& value, const std::string& path) {
  if (!value.is_dict()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": a model state dict is a dict, this file holds a ", value.TypeName()));
  }
  ModelStateDict out;
  for (const auto& [key, tensor] : value.as_dict().items) {
    if (!key.is_str() || !tensor.is_tensor()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": entry ", key.DebugString(), " is not a str -> tensor entry (",
                       key.TypeName(), " -> ", tensor.TypeName(), ")"));
    }
    out.emplace_back(key.as_str(), tensor.as_tensor());
  }
  return out;
}

absl::Status WriteOptimStateDict(const OptimStateDict& state, const std::string& path) {
  FSDP_ASSIGN_OR_RETURN(Pickled pickled, PickleOptim(state, path));
  return WriteArchive(pickled, path, /*durable=*/false);
}

absl::Status WriteFullCheckpoint(const std::string& dir, const ModelStateDict& model,
                                 const OptimStateDict* optim,
                                 const std::map<std::string, std::string>& extra_files) {
  FSDP_ASSIGN_OR_RETURN(Pickled model_pickled, PickleModel(model, dir + "/model.pt"));
  Pickled optim_pickled;
  if (optim != nullptr) {
    FSDP_ASSIGN_OR_RETURN(optim_pickled, PickleOptim(*optim, dir + "/optim.pt"));
  }
  FSDP_ASSIGN_OR_RETURN(std::string staging, CreateStagingDir(dir));
  FSDP_RETURN_IF_ERROR(WriteArchive(model_pickled, staging + "/model.pt", /*durable=*/true));
  if (optim != nullptr) {
    FSDP_RETURN_IF_ERROR(WriteArchive(optim_pickled, staging + "/optim.pt", /*durable=*/true));
  }
  for (const auto& [name, contents] : extra_files) {
    FSDP_RETURN_IF_ERROR(WriteFileDurably(staging + "/" + name, contents));
  }
  return CommitStagingDir(staging, dir);
}

absl::StatusOr<OptimStateDict> ReadOptimStateDict(const std::string& path) {
  FSDP_ASSIGN_OR_RETURN(PyValue value, TorchLoad(path));
  return OptimStateDictOf(value, path);
}

absl::StatusOr<OptimStateDict> OptimStateDictOf(const PyValue& value, const std::string& path) {
  const PyValue* state = value.Find("state");
  if (!value.is_dict() || state == nullptr || !state->is_dict()) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": an optimizer state dict is a dict with a \"state\" dict; this file holds ",
        value.DebugString().substr(0, 200)));
  }
  OptimStateDict out;
  for (const auto& [key, entry] : state->as_dict().items) {
    const std::string where = absl::StrCat(path, ": state[", key.DebugString(), "]");
    FSDP_ASSIGN_OR_RETURN(ParamKey param_key, KeyFromPyValue(key, where));
    if (!entry.is_dict()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " is a ", entry.TypeName(), ", not a dict of state values"));
    }
    optim_state::ParamState param_state;
    for (const auto& [name, item] : entry.as_dict().items) {
      if (!name.is_str()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": state names are str"));
      }
      FSDP_ASSIGN_OR_RETURN(
          StateValue converted,
          StateValueFromPyValue(item, absl::StrCat(where, "[", name.as_str(), "]")));
      param_state.Set(name.as_str(), std::move(converted));
    }
    out.state.Set(std::move(param_key), std::move(param_state));
  }
  const PyValue* groups = value.Find("param_groups");
  out.has_param_groups = groups != nullptr;
  if (groups == nullptr) return out;
  if (!groups->is_list()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": \"param_groups\" is a ", groups->TypeName(), ", not a list"));
  }
  for (size_t g = 0; g < groups->items().size(); ++g) {
    const PyValue& group = groups->items()[g];
    const std::string where = absl::StrCat(path, ": param_groups[", g, "]");
    if (!group.is_dict()) {
      return absl::InvalidArgumentError(absl::StrCat(where, " is not a dict"));
    }
    optim_state::ParamGroup parsed;
    bool has_params = false;
    for (const auto& [name, item] : group.as_dict().items) {
      if (!name.is_str()) return absl::InvalidArgumentError(absl::StrCat(where, ": keys are str"));
      if (name.as_str() == "params") {
        if (!item.is_list()) {
          return absl::InvalidArgumentError(absl::StrCat(where, "[\"params\"] is not a list"));
        }
        for (const PyValue& key : item.items()) {
          FSDP_ASSIGN_OR_RETURN(ParamKey param_key, KeyFromPyValue(key, where));
          parsed.params.push_back(std::move(param_key));
        }
        has_params = true;
        continue;
      }
      FSDP_ASSIGN_OR_RETURN(
          StateValue converted,
          StateValueFromPyValue(item, absl::StrCat(where, "[", name.as_str(), "]")));
      parsed.hyper_params.Set(name.as_str(), std::move(converted));
    }
    if (!has_params) {
      return absl::InvalidArgumentError(absl::StrCat(where, " has no \"params\""));
    }
    out.param_groups.push_back(std::move(parsed));
  }
  return out;
}

}  // namespace fsdp::checkpoint
