#include "checkpoint/internal/sharded_checkpoint_common.h"

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace fsdp::checkpoint::internal {

using optim_state::OptimizerAdapter;
using optim_state::StateValue;

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::string Where(absl::string_view op, const std::string& dir, const comm::ProcessGroup& g) {
  return absl::StrCat(op, "(", dir, ") (rank ", g.rank(), " of ", g.size(), ", group ", g.name(),
                      ")");
}

std::string TorchSize(c10::IntArrayRef shape) {
  return absl::StrCat("torch.Size([", absl::StrJoin(shape, ", "), "])");
}

std::vector<at::Tensor> OptimizerParams(const OptimizerAdapter& adapter) {
  std::vector<at::Tensor> out;
  for (auto& group : adapter.optimizer().param_groups()) {
    for (auto& p : group.params()) out.push_back(p);
  }
  return out;
}

absl::StatusOr<std::vector<ParamRole>> Roles(const FullyShardedDataParallel& fsdp,
                                             const std::vector<at::Tensor>& params) {
  absl::flat_hash_map<const c10::TensorImpl*, ParamRole> by_tensor;
  for (const auto& unit : fsdp.units()) {
    FlatParamHandle* h = unit.handle;
    if (h == nullptr) continue;
    if (!h->use_orig_params()) {
      by_tensor[h->flat_param().unsafeGetTensorImpl()] = ParamRole{Role::kFlat, h, 0, ""};
      continue;
    }
    for (size_t i = 0; i < h->params().size(); ++i) {
      by_tensor[h->params()[i].unsafeGetTensorImpl()] =
          ParamRole{Role::kOrig, h, i, h->infos()[i].fqns[0]};
    }
  }
  for (const auto& [fqn, t] : fsdp.unmanaged_parameters()) {
    by_tensor.emplace(t.unsafeGetTensorImpl(), ParamRole{Role::kUnmanaged, nullptr, 0, fqn});
  }
  std::vector<ParamRole> roles;
  for (size_t id = 0; id < params.size(); ++id) {
    auto it = by_tensor.find(params[id].unsafeGetTensorImpl());
    if (it == by_tensor.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the optimizer holds a parameter (ID ", id,
          ") that is neither a flat parameter, an original parameter of a unit, nor an "
          "unmanaged parameter of the model"));
    }
    roles.push_back(it->second);
  }
  return roles;
}

std::vector<std::string> FqnsOf(const ParamRole& role) {
  if (role.role != Role::kFlat) return {role.fqn};
  std::vector<std::string> out;
  for (const FlatParamInfo& info : role.handle->infos()) out.push_back(info.fqns[0]);
  return out;
}

bool IsPosDim(const StateValue& v) {
  const at::Tensor* t = v.GetIf<at::Tensor>();
  return t != nullptr && t->defined() && t->dim() > 0;
}

absl::Status AgreeOn(comm::ProcessGroup& group, const std::string& where,
                     const absl::Status& local) {
  const std::string mine = local.ok() ? ""
                                      : json{{"code", static_cast<int>(local.code())},
                                             {"message", std::string(local.message())}}
                                            .dump();
  absl::StatusOr<std::vector<std::string>> all = group.AllGatherObject(mine);
  if (!all.ok()) return Annotate(all.status(), absl::StrCat(where, ": agreeing on errors"));
  if (!local.ok()) return Annotate(local, where);
  for (size_t r = 0; r < all->size(); ++r) {
    if ((*all)[r].empty()) continue;
    json j = json::parse((*all)[r], nullptr, false);
    const auto code = j.is_discarded() ? absl::StatusCode::kInternal
                                       : static_cast<absl::StatusCode>(j["code"].get<int>());
    const std::string message = j.is_discarded() ? "?" : j["message"].get<std::string>();
    return absl::Status(code,
                        absl::StrCat(where, ": nothing done: rank ", r, " failed: ", message));
  }
  return absl::OkStatus();
}

}  // namespace fsdp::checkpoint::internal
