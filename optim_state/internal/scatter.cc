#include "optim_state/internal/scatter.h"

#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"
#include "optim_state/internal/flat_buffer.h"
#include "optim_state/internal/flatten_unit.h"
#include "optim_state/internal/local_shard.h"
#include "optim_state/internal/model_index.h"
#include "optim_state/internal/state_metadata.h"
#include "optim_state/internal/status_context.h"

namespace fsdp::optim_state::internal {
namespace {

constexpr absl::string_view kOp = "ScatterFullOptimStateDict";
// Rank 0's point-to-point messages of each rank's shard.
constexpr int kScatterTag = 0x5CA7;

// ---------------------------------------------------------------- rank 0: the metadata

absl::StatusOr<json> UnitMetadata(const UnitFlat& unit) {
  json pos = json::array();
  for (const PosSource& source : unit.sources) {
    pos.push_back(json{{"name", source.name}, {"dtype", static_cast<int>(source.dtype)}});
  }
  OPTIM_ASSIGN_OR_RETURN(json scalars, ParamStateToJson(unit.scalars), std::string(kOp));
  json params = json::array();
  for (const UnitFlat::Orig& p : unit.params) {
    OPTIM_ASSIGN_OR_RETURN(json ps, ParamStateToJson(p.scalars), std::string(kOp));
    params.push_back(json{{"present", p.present}, {"order", p.order}, {"scalars", std::move(ps)}});
  }
  return json{{"has", unit.has_state},
              {"order", unit.order},
              {"pos", std::move(pos)},
              {"scalars", std::move(scalars)},
              {"params", std::move(params)}};
}

// Unmanaged parameters' state: tensors as name, dtype and shape (broadcast later), the rest as
// values. `unmanaged_states` collects the states, in the same order.
absl::StatusOr<json> UnmanagedMetadata(const OptimStateDict& full_osd, const ModelIndex& index,
                                       std::vector<ParamState>& unmanaged_states) {
  json unmanaged = json::array();
  for (const auto& [fqn, t] : index.unmanaged) {
    const ParamState* st = full_osd.state.Find(ParamKey::Fqn(fqn));
    if (st == nullptr) continue;
    unmanaged_states.push_back(*st);
    FSDP_ASSIGN_OR_RETURN(json entries, StateEntriesToJson(*st, kOp, fqn, /*with_shape=*/true));
    unmanaged.push_back(json{{"fqn", fqn}, {"state", std::move(entries)}});
  }
  return unmanaged;
}

absl::StatusOr<json> ParamGroupsMetadata(const OptimStateDict& full_osd) {
  json groups = json::array();
  for (const ParamGroup& g : full_osd.param_groups) {
    OPTIM_ASSIGN_OR_RETURN(json hyper, ParamStateToJson(g.hyper_params), std::string(kOp));
    std::vector<std::string> fqns;
    for (const ParamKey& key : g.params) {
      if (!key.is_fqn()) {
        return absl::InvalidArgumentError(
            absl::StrCat(kOp, ": param_groups list ", key.ToString(), ", not an FQN"));
      }
      fqns.push_back(key.fqn());
    }
    groups.push_back(json{{"hyper", std::move(hyper)}, {"params", fqns}});
  }
  return groups;
}

// Rank 0's side of the scatter: everything but positive-dimension tensors as one object.
absl::StatusOr<json> ScatterMetadata(const OptimStateDict& full_osd, const ModelIndex& index,
                                     std::vector<UnitFlat>& units,
                                     std::vector<ParamState>& unmanaged_states) {
  FSDP_RETURN_IF_ERROR(CheckFqnKeyed(full_osd, kOp));
  json units_json = json::array();
  for (size_t u = 0; u < index.handles.size(); ++u) {
    FSDP_ASSIGN_OR_RETURN(units[u], FlattenUnitFor(kOp, full_osd.state, *index.handles[u]));
    FSDP_ASSIGN_OR_RETURN(json unit, UnitMetadata(units[u]));
    units_json.push_back(std::move(unit));
  }
  json meta;
  meta["units"] = std::move(units_json);
  FSDP_ASSIGN_OR_RETURN(meta["unmanaged"], UnmanagedMetadata(full_osd, index, unmanaged_states));
  meta["has_param_groups"] = full_osd.has_param_groups;
  FSDP_ASSIGN_OR_RETURN(meta["param_groups"], ParamGroupsMetadata(full_osd));
  return meta;
}

// ---------------------------------------------------------------- every rank

void UnitFromMetadata(const json& uj, UnitFlat& unit) {
  unit.has_state = uj["has"].get<bool>();
  unit.order = uj["order"].get<std::vector<std::string>>();
  unit.scalars = ParamStateFromJson(uj["scalars"]);
  for (const json& p : uj["params"]) {
    unit.params.push_back(UnitFlat::Orig{p["present"].get<bool>(),
                                         p["order"].get<std::vector<std::string>>(),
                                         ParamStateFromJson(p["scalars"])});
  }
}

std::vector<ParamGroup> ParamGroupsFromMetadata(const json& groups_json) {
  std::vector<ParamGroup> groups;
  for (const json& g : groups_json) {
    ParamGroup pg;
    pg.hyper_params = ParamStateFromJson(g["hyper"]);
    for (const json& fqn : g["params"]) pg.params.push_back(ParamKey::Fqn(fqn.get<std::string>()));
    groups.push_back(std::move(pg));
  }
  return groups;
}

class Scatter {
 public:
  Scatter(FullyShardedDataParallel& fsdp, std::shared_ptr<comm::ProcessGroup> group,
          const BeforeUnit& before_unit)
      : before_unit_(before_unit),
        group_(std::move(group)),
        rank_(group_->rank()),
        where_(absl::StrCat(" (rank ", rank_, ", group ", group_->name(), ")")),
        index_(IndexModel(fsdp)),
        units_(index_.handles.size()) {}

  absl::StatusOr<OptimStateDict> Run(const OptimStateDict& full_osd,
                                     const std::vector<at::Tensor>& params,
                                     absl::Status input_status) {
    // Roles are checked after the broadcast so that every rank takes part in it.
    absl::StatusOr<std::vector<ParamRole>> roles =
        input_status.ok() ? RolesOf(index_, params, kOp)
                          : absl::StatusOr<std::vector<ParamRole>>(input_status);
    FSDP_ASSIGN_OR_RETURN(json meta, BroadcastMetadata(full_osd));
    if (!roles.ok()) return roles.status();
    FSDP_RETURN_IF_ERROR(ScatterUnits(meta["units"]));
    if (rank_ == 0 && before_unit_) before_unit_(nullptr);
    FSDP_ASSIGN_OR_RETURN(auto unmanaged, BroadcastUnmanaged(meta["unmanaged"]));
    const std::vector<ParamGroup> groups = ParamGroupsFromMetadata(meta["param_groups"]);
    return CallTorchOr(kOp, [&] {
      return BuildLocalDict(index_, *roles, units_, unmanaged, groups,
                            meta["has_param_groups"].get<bool>(), kOp);
    });
  }

 private:
  // Rank 0's metadata (or its error) on every rank.
  absl::StatusOr<json> BroadcastMetadata(const OptimStateDict& full_osd) {
    std::string bytes;
    if (rank_ == 0) {
      absl::StatusOr<json> meta = ScatterMetadata(full_osd, index_, units_, unmanaged_full_);
      if (!meta.ok()) {
        bytes = json{{"error", std::string(meta.status().message())},
                     {"code", static_cast<int>(meta.status().code())}}
                    .dump();
      } else {
        bytes = meta->dump();
      }
    }
    OPTIM_ASSIGN_OR_RETURN(std::string received, group_->BroadcastObject(bytes, 0),
                           absl::StrCat(kOp, where_, ": broadcasting metadata"));
    OPTIM_ASSIGN_OR_RETURN(json meta, ParseMetadata(received), std::string(kOp));
    if (meta.contains("error")) {
      return absl::Status(static_cast<absl::StatusCode>(meta["code"].get<int>()),
                          absl::StrCat("rank 0: ", meta["error"].get<std::string>()));
    }
    return meta;
  }

  // Positive-dimension state of units: rank 0 sends each rank its shard.
  absl::Status ScatterUnits(const json& units_json) {
    for (size_t u = 0; u < index_.handles.size(); ++u) {
      const json& uj = units_json[u];
      if (rank_ != 0) UnitFromMetadata(uj, units_[u]);
      if (rank_ == 0 && before_unit_ && !uj["pos"].empty()) before_unit_(index_.handles[u]);
      for (size_t k = 0; k < uj["pos"].size(); ++k) {
        const std::string name = uj["pos"][k]["name"].get<std::string>();
        const auto dtype = static_cast<at::ScalarType>(uj["pos"][k]["dtype"].get<int>());
        FSDP_ASSIGN_OR_RETURN(at::Tensor mine, ScatterState(u, k, name, dtype));
        units_[u].pos.emplace_back(name, mine);
      }
    }
    return absl::OkStatus();
  }

  // This rank's part of unit `u`'s `k`-th positive-dimension state.
  absl::StatusOr<at::Tensor> ScatterState(size_t u, size_t k, const std::string& name,
                                          at::ScalarType dtype) {
    FlatParamHandle& h = *index_.handles[u];
    const std::string context = absl::StrCat(kOp, where_, ": sending optimizer state '", name,
                                             "' of flat parameter [", h.Describe(), "]");
    const auto opts = at::TensorOptions().dtype(dtype);
    at::Tensor mine;
    if (!h.sharded()) {
      FSDP_RETURN_IF_ERROR(CallTorch(context, [&] {
        mine = rank_ == 0 ? LocalPart(units_[u].sources[k], h, 0, nullptr)
                          : at::empty({h.numel()}, opts);
      }));
      FSDP_RETURN_IF_ERROR(group_->Broadcast(mine, 0), context);
      return mine;
    }
    if (rank_ != 0) {
      mine = at::empty({h.shard_numel()}, opts);
      FSDP_RETURN_IF_ERROR(group_->Recv(mine, 0, kScatterTag), context);
      return mine;
    }
    // A scatter: rank 0 cuts each rank's shard (into one reused buffer) and sends it to that
    // rank only (point to point, in rank order; every rank walks the same units and states, so
    // the pairs match up).
    const PosSource& source = units_[u].sources[k];
    for (int target = 1; target < group_->size(); ++target) {
      at::Tensor shard;
      FSDP_RETURN_IF_ERROR(CallTorch(context, [&] {
        shard = LocalPart(source, h, target, nullptr,
                          ReuseBuffer(send_buffer_, h.shard_numel(), dtype));
      }));
      FSDP_RETURN_IF_ERROR(group_->Send(shard, target, kScatterTag),
                           absl::StrCat(context, " to rank ", target));
    }
    FSDP_RETURN_IF_ERROR(CallTorch(context, [&] { mine = LocalPart(source, h, 0, nullptr); }));
    return mine;
  }

  // Unmanaged parameters: every rank gets the whole state.
  absl::StatusOr<absl::flat_hash_map<std::string, ParamState>> BroadcastUnmanaged(
      const json& unmanaged_json) {
    absl::flat_hash_map<std::string, ParamState> unmanaged;
    size_t j = 0;
    for (const json& e : unmanaged_json) {
      const std::string fqn = e["fqn"].get<std::string>();
      ParamState st;
      for (const json& s : e["state"]) {
        const std::string name = s["name"].get<std::string>();
        if (!s.contains("dtype")) {
          st.Set(name, StateValueFromJson(s["v"]));
          continue;
        }
        at::Tensor t = rank_ == 0
                           ? unmanaged_full_[j].Find(name)->Get<at::Tensor>().contiguous().clone()
                           : at::empty(s["shape"].get<std::vector<int64_t>>(),
                                       at::TensorOptions().dtype(
                                           static_cast<at::ScalarType>(s["dtype"].get<int>())));
        FSDP_RETURN_IF_ERROR(
            group_->Broadcast(t, 0),
            absl::StrCat(kOp, where_, ": sending optimizer state '", name, "' of '", fqn, "'"));
        st.Set(name, StateValue(t));
      }
      unmanaged[fqn] = std::move(st);
      ++j;
    }
    return unmanaged;
  }

  const BeforeUnit& before_unit_;
  const std::shared_ptr<comm::ProcessGroup> group_;
  const int rank_;
  const std::string where_;
  const ModelIndex index_;
  std::vector<UnitFlat> units_;
  std::vector<ParamState> unmanaged_full_;  // rank 0
  at::Tensor send_buffer_;                  // rank 0
};

}  // namespace

absl::StatusOr<OptimStateDict> ScatterFullOptimState(const OptimStateDict& full_osd,
                                                     FullyShardedDataParallel& fsdp,
                                                     const std::vector<at::Tensor>& params,
                                                     absl::Status input_status,
                                                     std::shared_ptr<comm::ProcessGroup> group,
                                                     const BeforeUnit& before_unit) {
  if (group == nullptr) group = fsdp.group();
  return Scatter(fsdp, std::move(group), before_unit)
      .Run(full_osd, params, std::move(input_status));
}

}  // namespace fsdp::optim_state::internal
