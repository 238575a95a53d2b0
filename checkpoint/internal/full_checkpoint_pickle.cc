#include "checkpoint/internal/full_checkpoint_pickle.h"

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/ivalue.h>

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint::internal {
namespace {

using optim_state::OptimStateDict;
using optim_state::ParamKey;

c10::IValue KeyToIValue(const ParamKey& key) {
  return key.is_id() ? c10::IValue(key.id()) : c10::IValue(key.fqn());
}

}  // namespace

absl::StatusOr<Pickled> PickleModel(const std::vector<std::pair<std::string, at::Tensor>>& state,
                                    const std::string& path) {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::TensorType::get());
  for (const auto& [fqn, tensor] : state) dict.insert(fqn, tensor.detach().contiguous());
  return PickleIValue(c10::IValue(dict), path);
}

absl::StatusOr<Pickled> PickleOptim(const OptimStateDict& state, const std::string& path) {
  c10::impl::GenericDict state_dict(c10::AnyType::get(), c10::AnyType::get());
  for (const auto& [key, param_state] : state.state) {
    c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
    for (const auto& [name, value] : param_state) {
      FSDP_ASSIGN_OR_RETURN(c10::IValue converted,
                            StateValueToIValue(value, absl::StrCat(path, ": state[", key.ToString(),
                                                                   "][", name, "]")));
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
            StateValueToIValue(value, absl::StrCat(path, ": param_groups[", g, "][", name, "]")));
        entry.insert(name, std::move(converted));
      }
      c10::impl::GenericList params(c10::AnyType::get());
      for (const ParamKey& key : group.params) params.push_back(KeyToIValue(key));
      entry.insert("params", c10::IValue(params));
      groups.push_back(c10::IValue(entry));
    }
    top.insert("param_groups", c10::IValue(groups));
  }
  return PickleIValue(c10::IValue(top), path);
}

}  // namespace fsdp::checkpoint::internal
