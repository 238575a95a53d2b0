#include "checkpoint/full_checkpoint.h"

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/ivalue.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/internal/torch_save_archive.h"
#include "checkpoint/torch_load.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint {
namespace {

using internal::Pickled;
using optim_state::OptimStateDict;
using optim_state::ParamKey;
using optim_state::StateSequence;
using optim_state::StateValue;

c10::IValue KeyToIValue(const ParamKey& key) {
  return key.is_id() ? c10::IValue(key.id()) : c10::IValue(key.fqn());
}

absl::Status Errno(const char* what, const std::string& path) {
  return absl::InternalError(absl::StrCat("cannot ", what, " ", path, ": ", strerror(errno)));
}

std::string BaseName(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Writes the zip archive of `pickled` (as torch::pickle_save lays it out) to `path`, created or
// truncated; with `durable`, fsyncs it, passing the crash points WriteFileDurably passes.
absl::Status WriteArchive(const Pickled& pickled, const std::string& path, bool durable) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("create", path);
  absl::Status status =
      internal::AppendArchive(fd, pickled, internal::ArchiveRecords::kPickleSave, path).status();
  if (status.ok() && durable) {
    CrashPoint(absl::StrCat("written ", BaseName(path)));
    if (fsync(fd) != 0) status = Errno("fsync", path);
  }
  if (close(fd) != 0 && status.ok()) status = Errno("close", path);
  if (status.ok() && durable) CrashPoint(absl::StrCat("fsynced ", BaseName(path)));
  return status;
}

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

static absl::StatusOr<Pickled> PickleModel(const ModelStateDict& state, const std::string& path) {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::TensorType::get());
  for (const auto& [fqn, tensor] : state) dict.insert(fqn, tensor.detach().contiguous());
  return internal::PickleIValue(c10::IValue(dict), path);
}

absl::Status WriteModelStateDict(const ModelStateDict& state, const std::string& path) {
  FSDP_ASSIGN_OR_RETURN(Pickled pickled, PickleModel(state, path));
  return WriteArchive(pickled, path, /*durable=*/false);
}

absl::StatusOr<ModelStateDict> ReadModelStateDict(const std::string& path) {
  FSDP_ASSIGN_OR_RETURN(PyValue value, TorchLoad(path));
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

static absl::StatusOr<Pickled> PickleOptim(const OptimStateDict& state, const std::string& path) {
  c10::impl::GenericDict state_dict(c10::AnyType::get(), c10::AnyType::get());
  for (const auto& [key, param_state] : state.state) {
    c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
    for (const auto& [name, value] : param_state) {
      FSDP_ASSIGN_OR_RETURN(
          c10::IValue converted,
          internal::StateValueToIValue(
              value, absl::StrCat(path, ": state[", key.ToString(), "][", name, "]")));
      entry.insert(name, std::move(converted));
    }
    state_dict.insert(KeyToIValue(key), c10::IValue(entry));
  }
  c10::impl::GenericDict top(c10::StringType::get(), c10::AnyType::get());
  top.insert("state", c10::IValue(state_dict));
  if (state.has_param_groups) {
    c10::impl::GenericList groups(c10::AnyType::get());
    for (size_t g = 0; g < state.param_groups.size(); ++g) {
      const auto& group = state.param_groups[g];
      c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
      for (const auto& [name, value] : group.hyper_params) {
        FSDP_ASSIGN_OR_RETURN(
            c10::IValue converted,
            internal::StateValueToIValue(
                value, absl::StrCat(path, ": param_groups[", g, "][", name, "]")));
        entry.insert(name, std::move(converted));
      }
      c10::impl::GenericList params(c10::AnyType::get());
      for (const ParamKey& key : group.params) params.push_back(KeyToIValue(key));
      entry.insert("params", c10::IValue(params));
      groups.push_back(c10::IValue(entry));
    }
    top.insert("param_groups", c10::IValue(groups));
  }
  return internal::PickleIValue(c10::IValue(top), path);
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
