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
using optim_state::StateSequence;
using optim_state::StateValue;

absl::StatusOr<c10::IValue> ToIValue(const StateValue& value, const std::string& where) {
  if (value.IsNone()) return c10::IValue();
  if (const bool* b = value.GetIf<bool>()) return c10::IValue(*b);
  if (const int64_t* i = value.GetIf<int64_t>()) return c10::IValue(*i);
  if (const double* d = value.GetIf<double>()) return c10::IValue(*d);
  if (const std::string* s = value.GetIf<std::string>()) return c10::IValue(*s);
  if (const at::Tensor* t = value.GetIf<at::Tensor>()) return c10::IValue(*t);
  if (const StateSequence* seq = value.GetIf<StateSequence>()) {
    std::vector<c10::IValue> items;
    for (const StateValue& item : seq->items) {
      FSDP_ASSIGN_OR_RETURN(c10::IValue converted, ToIValue(item, where));
      items.push_back(std::move(converted));
    }
    if (seq->is_tuple) return c10::IValue(c10::ivalue::Tuple::create(std::move(items)));
    c10::impl::GenericList list(c10::AnyType::get());
    for (auto& item : items) list.push_back(std::move(item));
    return c10::IValue(list);
  }
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": a ", value.TypeName(), " has no place in a full checkpoint"));
}

c10::IValue KeyToIValue(const ParamKey& key) {
  return key.is_id() ? c10::IValue(key.id()) : c10::IValue(key.fqn());
}

}  // namespace

absl::StatusOr<Pickled> PickleModel(const std::vector<std::pair<std::string, at::Tensor>>& state,
                                    const std::string& path) {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::TensorType::get());
  for (const auto& [fqn, tensor] : state) dict.insert(fqn, tensor.detach().contiguous());
  return Pickle(c10::IValue(dict), path);
}

absl::StatusOr<Pickled> PickleOptim(const OptimStateDict& state, const std::string& path) {
  c10::impl::GenericDict state_dict(c10::AnyType::get(), c10::AnyType::get());
  for (const auto& [key, param_state] : state.state) {
    c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
    for (const auto& [name, value] : param_state) {
      FSDP_ASSIGN_OR_RETURN(
          c10::IValue converted,
          ToIValue(value, absl::StrCat(path, ": state[", key.ToString(), "][", name, "]")));
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
            ToIValue(value, absl::StrCat(path, ": param_groups[", g, "][", name, "]")));
        entry.insert(name, std::move(converted));
      }
      c10::impl::GenericList params(c10::AnyType::get());
      for (const ParamKey& key : group.params) params.push_back(KeyToIValue(key));
      entry.insert("params", c10::IValue(params));
      groups.push_back(c10::IValue(entry));
    }
    top.insert("param_groups", c10::IValue(groups));
  }
  return Pickle(c10::IValue(top), path);
}

}  // namespace fsdp::checkpoint::internal
