#include "optim_state/internal/local_shard.h"

#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"
#include "optim_state/internal/flat_buffer.h"
#include "optim_state/internal/py_repr.h"
#include "optim_state/internal/status_context.h"

namespace fsdp::optim_state::internal {
namespace {

// A local part LocalPart may fill in place: the one FlattenShardedOptimStateDict already cut
// the source's first parameter into, if it has this size and dtype.
at::Tensor ReadyLocalPart(const PosSource& source, const PartialStates& partial, int64_t size) {
  for (const at::Tensor& t : source.values) {
    auto it = t.defined() ? partial.find(t.unsafeGetTensorImpl()) : partial.end();
    if (it == partial.end()) continue;
    const at::Tensor& ready = it->second.local_part;
    if (ready.defined() && ready.numel() == size && ready.scalar_type() == source.dtype) {
      return ready;
    }
    break;
  }
  return at::Tensor();
}

const PartialState* FindPartial(const PartialStates* partial, const at::Tensor& t) {
  if (partial == nullptr) return nullptr;
  auto it = partial->find(t.unsafeGetTensorImpl());
  return it == partial->end() ? nullptr : &it->second;
}

const at::Tensor* FindPos(const UnitFlat& unit, const std::string& name) {
  for (const auto& [n, t] : unit.pos) {
    if (n == name) return &t;
  }
  return nullptr;
}

absl::flat_hash_map<std::string, int64_t> FqnToId(const ModelIndex& index,
                                                  const std::vector<ParamRole>& roles) {
  absl::flat_hash_map<std::string, int64_t> fqn_to_id;
  for (size_t id = 0; id < roles.size(); ++id) {
    for (const std::string& fqn : FqnsOf(index, roles[id])) fqn_to_id.emplace(fqn, id);
  }
  return fqn_to_id;
}

// use_orig_params: original parameter `role` of its unit, this rank's slice of each state.
std::optional<ParamState> LocalOrigParamState(const ModelIndex& index, const ParamRole& role,
                                              const UnitFlat& unit) {
  const UnitFlat::Orig& p = unit.params[role.index];
  if (!p.present) return std::nullopt;
  const FlatParamHandle& h = *index.handles[role.unit];
  const ParamShard s = h.ShardOf(role.index, h.rank());
  if (h.sharded() && s.numel == 0) return std::nullopt;  // such a slice gets no gradient, no state
  ParamState st;
  for (const std::string& name : p.order) {
    const at::Tensor* t = FindPos(unit, name);
    if (t != nullptr) {
      at::Tensor slice = t->narrow(0, s.shard_offset, s.numel).clone();
      if (!h.sharded()) slice = slice.view(h.infos()[role.index].shape);
      st.Set(name, StateValue(slice));
    } else if (const StateValue* v = p.scalars.Find(name)) {
      st.Set(name, CloneStateValue(*v));
    }
  }
  return st;
}

// The state of the optimizer's tensor of `role`; nullopt where it gets none.
std::optional<ParamState> LocalParamState(
    const ModelIndex& index, const ParamRole& role, const std::vector<UnitFlat>& units,
    const absl::flat_hash_map<std::string, ParamState>& unmanaged) {
  if (role.role == Role::kUnmanaged) {
    auto it = unmanaged.find(role.fqn);
    if (it == unmanaged.end()) return std::nullopt;
    ParamState st;
    for (const auto& [name, value] : it->second) st.Set(name, CloneStateValue(value));
    return st;
  }
  const UnitFlat& unit = units[role.unit];
  if (!unit.has_state) return std::nullopt;
  if (role.role == Role::kOrig) return LocalOrigParamState(index, role, unit);
  ParamState st;
  for (const std::string& name : unit.order) {
    const at::Tensor* t = FindPos(unit, name);
    st.Set(name, t != nullptr ? StateValue(*t) : CloneStateValue(*unit.scalars.Find(name)));
  }
  return st;
}

// FQN-keyed param groups as this optimizer's IDs (each group's IDs sorted).
absl::StatusOr<std::vector<ParamGroup>> LocalParamGroups(
    const std::vector<ParamGroup>& param_groups,
    const absl::flat_hash_map<std::string, int64_t>& fqn_to_id, absl::string_view op) {
  std::vector<ParamGroup> out;
  for (size_t g = 0; g < param_groups.size(); ++g) {
    ParamGroup pg;
    for (const auto& [name, value] : param_groups[g].hyper_params) {
      pg.hyper_params.Set(name, CloneStateValue(value));
    }
    std::set<int64_t> ids;
    for (const ParamKey& key : param_groups[g].params) {
      if (!key.is_fqn()) {
        return absl::InvalidArgumentError(
            absl::StrCat(op, ": param_groups[", g, "] lists ", key.ToString(), ", not an FQN"));
      }
      auto it = fqn_to_id.find(key.fqn());
      if (it == fqn_to_id.end()) {
        return absl::InvalidArgumentError(absl::StrCat(op, ": param_groups[", g, "] lists ",
                                                       PyStr(key.fqn()),
                                                       ", which is not a parameter of this "
                                                       "optimizer"));
      }
      ids.insert(it->second);
    }
    for (int64_t id : ids) pg.params.push_back(ParamKey::Id(id));
    out.push_back(std::move(pg));
  }
  return out;
}

}  // namespace

at::Tensor LocalPart(const PosSource& source, const FlatParamHandle& h, int rank,
                     const PartialStates* partial, at::Tensor out) {
  const int64_t size = h.sharded() ? h.shard_numel() : h.numel();
  if (!out.defined() && partial != nullptr) out = ReadyLocalPart(source, *partial, size);
  if (!out.defined()) out = at::empty({size}, at::TensorOptions().dtype(source.dtype));
  std::vector<std::pair<int64_t, int64_t>> written;  // (offset, numel) in the shard
  for (size_t i = 0; i < source.values.size(); ++i) {
    const at::Tensor& t = source.values[i];
    if (!t.defined()) continue;
    const ParamShard s = h.ShardOf(i, rank);
    if (s.numel == 0) continue;
    at::Tensor dst = out.narrow(0, s.shard_offset, s.numel);
    if (const PartialState* p = FindPartial(partial, t)) {
      TORCH_CHECK(p->begin == s.param_offset && p->data.numel() == s.numel,
                  "internal: the part of '", h.infos()[i].fqns[0], "' cut for rank ", rank,
                  " does not match its shard");
      if (p->data.data_ptr() != dst.data_ptr()) dst.copy_(p->data);  // else already in place
    } else {
      dst.copy_(t.reshape({-1}).narrow(0, s.param_offset, s.numel));
    }
    written.emplace_back(s.shard_offset, s.numel);
  }
  ZeroOutside(out, std::move(written));
  return out;
}

absl::StatusOr<OptimStateDict> BuildLocalDict(
    const ModelIndex& index, const std::vector<ParamRole>& roles,
    const std::vector<UnitFlat>& units,
    const absl::flat_hash_map<std::string, ParamState>& unmanaged,
    const std::vector<ParamGroup>& param_groups, bool has_param_groups, absl::string_view op) {
  OptimStateDict out;
  for (size_t id = 0; id < roles.size(); ++id) {
    std::optional<ParamState> st = LocalParamState(index, roles[id], units, unmanaged);
    if (st.has_value()) out.state.Set(ParamKey::Id(static_cast<int64_t>(id)), *std::move(st));
  }
  out.has_param_groups = has_param_groups;
  FSDP_ASSIGN_OR_RETURN(out.param_groups,
                        LocalParamGroups(param_groups, FqnToId(index, roles), op));
  return out;
}

absl::StatusOr<OptimStateDict> ShardFullOptimState(const OptimStateDict& full_osd,
                                                   FullyShardedDataParallel& fsdp,
                                                   const std::vector<at::Tensor>& params,
                                                   absl::string_view op,
                                                   const PartialStates* partial) {
  FSDP_RETURN_IF_ERROR(CheckFqnKeyed(full_osd, op));
  const ModelIndex index = IndexModel(fsdp);
  FSDP_ASSIGN_OR_RETURN(std::vector<ParamRole> roles, RolesOf(index, params, op));
  std::vector<UnitFlat> units(index.handles.size());
  std::vector<bool> needed(index.handles.size(), false);
  for (const ParamRole& role : roles) {
    if (role.role != Role::kUnmanaged) needed[role.unit] = true;
  }
  for (size_t u = 0; u < units.size(); ++u) {
    if (!needed[u]) continue;
    const FlatParamHandle& h = *index.handles[u];
    FSDP_ASSIGN_OR_RETURN(units[u], FlattenUnitFor(op, full_osd.state, h));
    FSDP_RETURN_IF_ERROR(CallTorch(op, [&] {
      for (const PosSource& source : units[u].sources) {
        units[u].pos.emplace_back(source.name, LocalPart(source, h, h.rank(), partial));
      }
      units[u].sources.clear();
    }));
  }
  absl::flat_hash_map<std::string, ParamState> unmanaged;
  for (const auto& [fqn, t] : index.unmanaged) {
    if (const ParamState* st = full_osd.state.Find(ParamKey::Fqn(fqn))) unmanaged[fqn] = *st;
  }
  return CallTorchOr(op, [&] {
    return BuildLocalDict(index, roles, units, unmanaged, full_osd.param_groups,
                          full_osd.has_param_groups, op);
  });
}

}  // namespace fsdp::optim_state::internal
