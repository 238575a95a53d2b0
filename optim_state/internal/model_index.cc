#include "optim_state/internal/model_index.h"

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp::optim_state::internal {

ModelIndex IndexModel(const FullyShardedDataParallel& fsdp) {
  ModelIndex m;
  for (const auto& unit : fsdp.units()) {
    if (unit.handle == nullptr) continue;
    FlatParamHandle* h = unit.handle;
    const size_t u = m.handles.size();
    m.handles.push_back(h);
    if (!h->use_orig_params()) {
      m.by_tensor[h->flat_param().unsafeGetTensorImpl()] = ParamRole{Role::kFlat, u, 0, ""};
    } else {
      for (size_t i = 0; i < h->params().size(); ++i) {
        m.by_tensor[h->params()[i].unsafeGetTensorImpl()] =
            ParamRole{Role::kOrig, u, i, h->infos()[i].fqns[0]};
      }
    }
  }
  m.unmanaged = fsdp.unmanaged_parameters();
  for (const auto& [fqn, t] : m.unmanaged) {
    m.by_tensor.emplace(t.unsafeGetTensorImpl(), ParamRole{Role::kUnmanaged, 0, 0, fqn});
  }
  return m;
}

std::vector<at::Tensor> OptimizerParams(const OptimizerAdapter& adapter) {
  std::vector<at::Tensor> out;
  for (auto& group : adapter.optimizer().param_groups()) {
    for (auto& p : group.params()) out.push_back(p);
  }
  return out;
}

absl::StatusOr<std::vector<ParamRole>> RolesOf(const ModelIndex& index,
                                               const std::vector<at::Tensor>& params,
                                               absl::string_view op) {
  std::vector<ParamRole> roles;
  roles.reserve(params.size());
  for (size_t id = 0; id < params.size(); ++id) {
    auto it = index.by_tensor.find(params[id].unsafeGetTensorImpl());
    if (it == index.by_tensor.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          op, ": the optimizer holds a parameter (ID ", id,
          ") that is neither a flat parameter, an original parameter of a unit, nor an "
          "unmanaged parameter of the model"));
    }
    roles.push_back(it->second);
  }
  return roles;
}

std::vector<std::string> FqnsOf(const ModelIndex& index, const ParamRole& role) {
  if (role.role != Role::kFlat) return {role.fqn};
  return HandleFqns(*index.handles[role.unit]);
}

std::vector<std::string> HandleFqns(const FlatParamHandle& h) {
  std::vector<std::string> fqns;
  for (const FlatParamInfo& info : h.infos()) fqns.push_back(info.fqns[0]);
  return fqns;
}

absl::Status CheckIdsInRange(const OptimStateDict& osd, size_t count, bool from_optim_input,
                             absl::string_view op) {
  auto check = [&](const ParamKey& key, const std::string& where) -> absl::Status {
    if (key.is_fqn()) {
      return absl::InvalidArgumentError(absl::StrCat(
          op, ": ", where, " ", key.ToString(),
          " is a parameter name; the optimizer's state dict is keyed by parameter IDs"));
    }
    if (key.id() < 0 || static_cast<size_t>(key.id()) >= count) {
      return absl::InvalidArgumentError(absl::StrCat(
          op, ": ", where, " ", key.id(), " is not a parameter ID of the ",
          from_optim_input ? "optim_input" : "optimizer", " (", count, " parameters)"));
    }
    return absl::OkStatus();
  };
  for (const auto& entry : osd.state) {
    FSDP_RETURN_IF_ERROR(check(entry.first, "state key"));
  }
  for (size_t g = 0; g < osd.param_groups.size(); ++g) {
    for (const ParamKey& key : osd.param_groups[g].params) {
      FSDP_RETURN_IF_ERROR(check(key, absl::StrCat("param_groups[", g, "] lists")));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckFqnKeyed(const OptimStateDict& full_osd, absl::string_view op) {
  for (const auto& entry : full_osd.state) {
    if (!entry.first.is_fqn()) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": state key ", entry.first.ToString(),
                       " is a parameter ID; a full optimizer state dict is keyed by FQNs"));
    }
  }
  return absl::OkStatus();
}

}  // namespace fsdp::optim_state::internal
