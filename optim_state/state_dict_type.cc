#include "optim_state/state_dict_type.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "comm/status_macros.h"
#include "fsdp/flat_param.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/local_sharded_optim_state.h"

namespace fsdp::optim_state {

std::string StateDictTypeName(StateDictType type) {
  return type == StateDictType::kFullStateDict ? "FULL_STATE_DICT"
                                               : "SHARDED_STATE_DICT";
}

StateDictSettings SetStateDictType(StateDictSettings& settings,
                                   StateDictType type) {
  StateDictSettings previous = settings;
  settings.state_dict_type = type;
  return previous;
}

StateDictSettings SetStateDictType(StateDictSettings& settings,
                                   const FullOptimStateDictConfig& config) {
  StateDictSettings previous = settings;
  settings.state_dict_type = StateDictType::kFullStateDict;
  settings.full_optim_config = config;
  return previous;
}

StateDictSettings SetStateDictType(StateDictSettings& settings,
                                   const ShardedOptimStateDictConfig& config) {
  StateDictSettings previous = settings;
  settings.state_dict_type = StateDictType::kShardedStateDict;
  settings.sharded_optim_config = config;
  return previous;
}

namespace {

absl::StatusOr<OptimStateDict> GetImpl(FullyShardedDataParallel& fsdp,
                                       const OptimizerAdapter& adapter,
                                       const StateDictSettings& settings,
                                       const OptimStateDict* osd,
                                       std::shared_ptr<comm::ProcessGroup> group) {
  if (settings.state_dict_type == StateDictType::kFullStateDict) {
    return FullOptimStateDict(fsdp, adapter,
                              {.rank0_only = settings.full_optim_config.rank0_only,
                               .group = group,
                               .optim_state_dict = osd});
  }
  if (settings.sharded_optim_config.local_shards) {
    return LocalShardedOptimStateDict(fsdp, adapter, osd);
  }
  return ShardedOptimStateDict(fsdp, adapter, std::move(group), osd);
}


// This rank's names of the optimizer's tensors, as a named optimizer keys them.
absl::StatusOr<std::vector<std::string>> LocalNames(
    const FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    absl::string_view op) {
  absl::flat_hash_map<const c10::TensorImpl*, std::string> names;
  for (const auto& unit : fsdp.units()) {
    const FlatParamHandle* h = unit.handle;
    if (h == nullptr) continue;
    if (!h->use_orig_params()) {
      names.emplace(h->flat_param().unsafeGetTensorImpl(),
                    absl::StrCat(unit.module_prefix, "_flat_param"));
    } else {
      for (size_t i = 0; i < h->params().size(); ++i) {
        names.emplace(h->params()[i].unsafeGetTensorImpl(),
                      h->infos()[i].fqns[0]);
      }
    }
  }
  for (const auto& [fqn, t] : fsdp.unmanaged_parameters()) {
    names.emplace(t.unsafeGetTensorImpl(), fqn);
  }
  std::vector<std::string> out;
  for (auto& group : adapter.optimizer().param_groups()) {
    for (auto& p : group.params()) {
      auto it = names.find(p.unsafeGetTensorImpl());
      if (it == names.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            op, ": the optimizer holds a parameter (ID ",
            out.size(), ") FSDP does not know"));
      }
      out.push_back(it->second);
    }
  }
  return out;
}

OptimStateDict IdsToNames(const OptimStateDict& osd,
                          const std::vector<std::string>& names) {
  auto name = [&](const ParamKey& key) {
    return key.is_id() && key.id() >= 0 &&
                   static_cast<size_t>(key.id()) < names.size()
               ? ParamKey::Fqn(names[static_cast<size_t>(key.id())])
               : key;
  };
  OptimStateDict out;
  out.has_param_groups = osd.has_param_groups;
  for (const auto& [key, state] : osd.state) out.state.Set(name(key), state);
  for (const ParamGroup& g : osd.param_groups) {
    ParamGroup group;
    group.hyper_params = g.hyper_params;
    for (const ParamKey& key : g.params) group.params.push_back(name(key));
    out.param_groups.push_back(std::move(group));
  }
  return out;
}

// A named optimizer's dict (keys are this rank's parameter names) keyed by IDs instead.
absl::StatusOr<OptimStateDict> NamesToIds(const OptimStateDict& osd,
                                          const std::vector<std::string>& names) {
  absl::flat_hash_map<std::string, int64_t> ids;
  for (size_t i = 0; i < names.size(); ++i) ids.emplace(names[i], static_cast<int64_t>(i));
  auto id = [&](const ParamKey& key, const std::string& where) -> absl::StatusOr<ParamKey> {
    if (key.is_id()) return key;
    auto it = ids.find(key.fqn());
    if (it == ids.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "GetOptimStateDict: the named optimizer's dict has ", where, " ", key.ToString(),
          ", which names none of the optimizer's parameters"));
    }
    return ParamKey::Id(it->second);
  };
  OptimStateDict out;
  out.has_param_groups = osd.has_param_groups;
  for (const auto& [key, state] : osd.state) {
    FSDP_ASSIGN_OR_RETURN(ParamKey k, id(key, "state key"));
    out.state.Set(k, state);
  }
  for (size_t g = 0; g < osd.param_groups.size(); ++g) {
    ParamGroup group;
    group.hyper_params = osd.param_groups[g].hyper_params;
    for (const ParamKey& key : osd.param_groups[g].params) {
      FSDP_ASSIGN_OR_RETURN(ParamKey k, id(key, absl::StrCat("param_groups[", g, "] key")));
      group.params.push_back(k);
    }
    out.param_groups.push_back(std::move(group));
  }
  return out;
}

}  // namespace

absl::StatusOr<OptimStateDict> GetOptimStateDict(
    FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    const StateDictSettings& settings,
    std::shared_ptr<comm::ProcessGroup> group) {
  return GetImpl(fsdp, adapter, settings, nullptr, std::move(group));
}

absl::StatusOr<OptimStateDict> GetOptimStateDict(
    FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    const StateDictSettings& settings, const OptimStateDict& optim_state_dict,
    std::shared_ptr<comm::ProcessGroup> group) {
  // PyTorch 2.0's _is_named_optimizer: the dict is a named optimizer's if its first state key
  // is a name.
  const bool named = !optim_state_dict.state.empty() &&
                     optim_state_dict.state.at_index(0).first.is_fqn();
  if (!named) return GetImpl(fsdp, adapter, settings, &optim_state_dict, std::move(group));
  FSDP_ASSIGN_OR_RETURN(std::vector<std::string> names,
                        LocalNames(fsdp, adapter, "GetOptimStateDict"));
  FSDP_ASSIGN_OR_RETURN(OptimStateDict by_id, NamesToIds(optim_state_dict, names));
  return GetImpl(fsdp, adapter, settings, &by_id, std::move(group));
}

absl::StatusOr<OptimStateDict> OptimStateDictToLoad(
    FullyShardedDataParallel& fsdp, OptimizerAdapter& adapter,
    const OptimStateDict& osd, const StateDictSettings& settings,
    const OptimStateDictToLoadOptions& options) {
  OptimStateDict local;
  if (settings.state_dict_type == StateDictType::kShardedStateDict) {
    FSDP_ASSIGN_OR_RETURN(
        local, FlattenShardedOptimStateDict(osd, fsdp, adapter, options.group));
  } else if (settings.full_optim_config.rank0_only) {
    FSDP_ASSIGN_OR_RETURN(
        local, ScatterFullOptimStateDict(osd, fsdp, adapter, options.group));
  } else {
    FSDP_ASSIGN_OR_RETURN(local, ShardFullOptimStateDict(osd, fsdp, adapter));
  }
  std::vector<std::string> names;
  if (options.is_named_optimizer) {
    FSDP_ASSIGN_OR_RETURN(names, LocalNames(fsdp, adapter, "OptimStateDictToLoad"));
  }
  if (options.load_directly) {
    if (settings.state_dict_type == StateDictType::kShardedStateDict &&
        settings.sharded_optim_config.local_shards) {
      OptimStateDict adopted = local;  // tensor handles: the optimizer takes the tensors
      FSDP_RETURN_IF_ERROR(adapter.LoadStateDict(std::move(adopted)), "OptimStateDictToLoad");
    } else {
      FSDP_RETURN_IF_ERROR(adapter.LoadStateDict(local), "OptimStateDictToLoad");
    }
  }
  if (options.is_named_optimizer) return IdsToNames(local, names);
  return local;
}

}  // namespace fsdp::optim_state
