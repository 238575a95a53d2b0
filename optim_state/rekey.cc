#include "optim_state/rekey.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/status_macros.h"
#include "fsdp/flat_param.h"
#include "optim_state/internal/model_index.h"
#include "optim_state/internal/py_repr.h"

namespace fsdp::optim_state {
namespace {

// The tensors an optimizer may hold, in the model's walk order, each with its
// names (more than one only for a flat parameter).
using ParamNames = std::vector<std::pair<const c10::TensorImpl*, std::vector<std::string>>>;

ParamNames NamesOf(const FullyShardedDataParallel& fsdp) {
  ParamNames out;
  for (const auto& unit : fsdp.units()) {
    const FlatParamHandle* h = unit.handle;
    if (h == nullptr) continue;
    if (!h->use_orig_params()) {
      std::vector<std::string> names;
      for (const FlatParamInfo& info : h->infos()) names.push_back(info.fqns[0]);
      out.emplace_back(h->flat_param().unsafeGetTensorImpl(), std::move(names));
    } else {
      for (size_t i = 0; i < h->params().size(); ++i) {
        out.emplace_back(h->params()[i].unsafeGetTensorImpl(),
                         std::vector<std::string>{h->infos()[i].fqns[0]});
      }
    }
  }
  for (const auto& [fqn, t] : fsdp.unmanaged_parameters()) {
    out.emplace_back(t.unsafeGetTensorImpl(), std::vector<std::string>{fqn});
  }
  return out;
}

ParamNames NamesOf(const torch::nn::Module& model) {
  ParamNames out;
  absl::flat_hash_map<const c10::TensorImpl*, bool> seen;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    const c10::TensorImpl* impl = item.value().unsafeGetTensorImpl();
    if (!seen.emplace(impl, true).second) continue;  // shared: first name only
    out.emplace_back(impl, std::vector<std::string>{item.key()});
  }
  return out;
}

absl::Status Error(const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat("RekeyOptimStateDict: ", message));
}

// 1.13's _get_param_to_param_name: one name per tensor, or its RuntimeError.
absl::StatusOr<absl::flat_hash_map<const c10::TensorImpl*, std::string>> ParamToName(
    const ParamNames& names) {
  absl::flat_hash_map<const c10::TensorImpl*, std::string> out;
  for (const auto& [impl, list] : names) {
    if (list.size() > 1) {
      return Error(absl::StrCat("Each parameter should only map to one parameter name but got ",
                                list.size(), ": ", internal::PyList(list)));
    }
    out.emplace(impl, list[0]);
  }
  return out;
}

std::vector<const c10::TensorImpl*> Impls(const std::vector<at::Tensor>& params) {
  std::vector<const c10::TensorImpl*> out;
  for (const at::Tensor& p : params) out.push_back(p.unsafeGetTensorImpl());
  return out;
}

absl::StatusOr<OptimStateDict> Rekey(const OptimStateDict& osd, OptimStateKeyType key_type,
                                     const ParamNames& names,
                                     const std::vector<const c10::TensorImpl*>& params) {
  bool any_id = false, any_name = false;
  for (const auto& [key, state] : osd.state) (key.is_id() ? any_id : any_name) = true;
  if (any_id && any_name) {
    std::vector<std::string> keys;
    for (const auto& [key, state] : osd.state) keys.push_back(key.ToString());
    return Error(
        absl::StrCat("Invalid parameter keys: dict_keys([", absl::StrJoin(keys, ", "), "])"));
  }
  if ((key_type == OptimStateKeyType::kParamName && !any_id) ||
      (key_type == OptimStateKeyType::kParamId && !any_name)) {
    return osd;
  }
  absl::flat_hash_map<const c10::TensorImpl*, std::string> param_to_name;
  {
    auto result = ParamToName(names);
    if (!result.ok()) return result.status();
    param_to_name = *std::move(result);
  }
  // ID -> name for the optimizer's parameters; name -> ID for those of them in
  // the model.
  absl::flat_hash_map<int64_t, std::string> id_to_name;
  absl::flat_hash_map<std::string, int64_t> name_to_id;
  for (size_t id = 0; id < params.size(); ++id) {
    auto it = param_to_name.find(params[id]);
    if (it == param_to_name.end()) {
      if (key_type == OptimStateKeyType::kParamName) {
        return Error(
            absl::StrCat("the optimizer's parameter ID ", id, " is not a parameter of the model"));
      }
      continue;  // 1.13 drops optimizer parameters without a name when mapping
                 // names to IDs
    }
    id_to_name.emplace(static_cast<int64_t>(id), it->second);
    name_to_id.emplace(it->second, static_cast<int64_t>(id));
  }
  auto convert = [&](const ParamKey& key) -> absl::StatusOr<ParamKey> {
    if (key_type == OptimStateKeyType::kParamName) {
      auto it = key.is_id() ? id_to_name.find(key.id()) : id_to_name.end();
      if (it == id_to_name.end()) return absl::NotFoundError("");
      return ParamKey::Fqn(it->second);
    }
    auto it = key.is_fqn() ? name_to_id.find(key.fqn()) : name_to_id.end();
    if (it == name_to_id.end()) return absl::NotFoundError("");
    return ParamKey::Id(it->second);
  };

  OptimStateDict out;
  out.has_param_groups = osd.has_param_groups;
  for (const auto& [key, state] : osd.state) {
    auto converted = convert(key);
    if (!converted.ok()) {
      return Error(
          absl::StrCat("state key ", key.ToString(), " is not a parameter of the optimizer"));
    }
    out.state.Set(*converted, state);
  }
  for (size_t g = 0; g < osd.param_groups.size(); ++g) {
    ParamGroup group;
    group.hyper_params = osd.param_groups[g].hyper_params;
    for (const ParamKey& key : osd.param_groups[g].params) {
      auto converted = convert(key);
      if (!converted.ok()) {
        return Error(absl::StrCat("param_groups[", g, "] lists ", key.ToString(),
                                  ", which is not a parameter of the optimizer"));
      }
      group.params.push_back(*converted);
    }
    std::sort(group.params.begin(), group.params.end());
    out.param_groups.push_back(std::move(group));
  }
  return out;
}

}  // namespace

absl::StatusOr<OptimStateDict> RekeyOptimStateDict(const OptimStateDict& osd,
                                                   OptimStateKeyType key_type,
                                                   const FullyShardedDataParallel& fsdp,
                                                   const OptimizerAdapter& adapter) {
  return Rekey(osd, key_type, NamesOf(fsdp), Impls(internal::OptimizerParams(adapter)));
}

absl::StatusOr<OptimStateDict> RekeyOptimStateDict(const OptimStateDict& osd,
                                                   OptimStateKeyType key_type,
                                                   const torch::nn::Module& model,
                                                   const OptimizerAdapter& adapter) {
  return Rekey(osd, key_type, NamesOf(model), Impls(internal::OptimizerParams(adapter)));
}

absl::StatusOr<OptimStateDict> RekeyOptimStateDict(const OptimStateDict& osd,
                                                   OptimStateKeyType key_type,
                                                   const FullyShardedDataParallel& fsdp,
                                                   const OptimInput& optim_input) {
  WarnOptimInputDeprecated();
  FSDP_RETURN_IF_ERROR(CheckOptimInput(optim_input, "RekeyOptimStateDict"));
  return Rekey(osd, key_type, NamesOf(fsdp), Impls(optim_input.Params()));
}

absl::StatusOr<OptimStateDict> RekeyOptimStateDict(const OptimStateDict& osd,
                                                   OptimStateKeyType key_type,
                                                   const torch::nn::Module& model,
                                                   const OptimInput& optim_input) {
  WarnOptimInputDeprecated();
  FSDP_RETURN_IF_ERROR(CheckOptimInput(optim_input, "RekeyOptimStateDict"));
  return Rekey(osd, key_type, NamesOf(model), Impls(optim_input.Params()));
}

}  // namespace fsdp::optim_state
