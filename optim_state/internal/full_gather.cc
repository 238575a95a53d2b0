#include "optim_state/internal/full_gather.h"

#include <ATen/ATen.h>

#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/status_macros.h"
#include "optim_state/internal/flat_buffer.h"
#include "optim_state/internal/model_index.h"
#include "optim_state/internal/py_repr.h"
#include "optim_state/internal/state_metadata.h"
#include "optim_state/internal/status_context.h"

namespace fsdp::optim_state::internal {
namespace {

constexpr absl::string_view kOp = "FullOptimStateDict";
constexpr int kGatherTag = 0x6A7;  // GatherFlat's point-to-point messages

// How GatherFlat gathers one flat state.
struct GatherPlan {
  // Gather to rank 0 of the handle's group only (point to point); other ranks get nothing.
  // Otherwise all-gather to every rank.
  bool to_root = false;
  // If set, the gathered buffer lives in *reuse (grown as needed) and the result is a view of
  // it that the next gather with the same buffer overwrites; else a fresh buffer the caller
  // owns. Under NO_SHARD the result is then `local` itself (the optimizer's tensor), else a
  // copy of it.
  at::Tensor* reuse = nullptr;
};

// Whether this rank receives what GatherFlat gathers.
bool Receives(const FlatParamHandle& h, const GatherPlan& plan) {
  return !plan.to_root || h.group()->rank() == 0;
}

// The buffer GatherFlat fills: the handle's padded numel when sharded, else its numel.
int64_t GatheredNumel(const FlatParamHandle& h) {
  return h.sharded() ? h.padded_numel() : h.numel();
}

// The whole gathered buffer (GatheredNumel elements, padding included) of `local` (this rank's
// shard) over the handle's group, or `local` itself (a copy unless plan.reuse) without
// sharding. Undefined on ranks that receive nothing (plan.to_root).
absl::StatusOr<at::Tensor> GatherFlatBuffer(FlatParamHandle& h, const at::Tensor& local,
                                            const std::string& name, const GatherPlan& plan) {
  const std::string context =
      absl::StrCat("gathering optimizer state '", name, "' of flat parameter [", h.Describe(), "]");
  const int64_t expected = h.sharded() ? h.shard_numel() : h.numel();
  if (local.dim() != 1 || local.numel() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        context, ": state has shape ", TorchSize(local.sizes()), ", expected [", expected, "]"));
  }
  if (!h.sharded()) {
    if (!Receives(h, plan)) return at::Tensor();
    return plan.reuse != nullptr ? local : local.clone();
  }
  const at::Tensor shard = local.detach().contiguous();
  comm::ProcessGroup& group = *h.group();
  if (!Receives(h, plan)) {
    // Every rank but the root sends its shard; the root receives them in rank order.
    FSDP_RETURN_IF_ERROR(group.Send(shard, 0, kGatherTag), absl::StrCat(context, " to rank 0"));
    return at::Tensor();
  }
  at::Tensor out = plan.reuse != nullptr
                       ? ReuseBuffer(*plan.reuse, h.padded_numel(), shard.scalar_type())
                       : at::empty({h.padded_numel()}, shard.options());
  if (plan.to_root) {
    const int64_t n = h.shard_numel();
    out.narrow(0, 0, n).copy_(shard);
    for (int r = 1; r < group.size(); ++r) {
      at::Tensor part = out.narrow(0, r * n, n);
      FSDP_RETURN_IF_ERROR(group.Recv(part, r, kGatherTag),
                           absl::StrCat(context, " from rank ", r));
    }
  } else {
    FSDP_RETURN_IF_ERROR(group.AllGatherIntoTensor(out, shard), context);
  }
  return out;
}

// use_orig_params: one original parameter's slice of this rank's shard and its state tensor.
struct StateSlice {
  ParamShard shard;
  at::Tensor state;
  std::string fqn;
};

// use_orig_params: this rank's flat shard of state `name` of unit `h` from its original
// parameters' slices (zeros where a slice has no such state).
absl::StatusOr<at::Tensor> LocalShardOf(const FlatParamHandle& h, const std::string& name,
                                        at::ScalarType dtype,
                                        const std::vector<StateSlice>& slices) {
  at::Tensor local =
      at::zeros({h.sharded() ? h.shard_numel() : h.numel()}, at::TensorOptions().dtype(dtype));
  for (const StateSlice& slice : slices) {
    const at::Tensor& t = slice.state;
    const ParamShard& s = slice.shard;
    if (t.numel() != s.numel) {
      return absl::InvalidArgumentError(
          absl::StrCat("state '", name, "' of '", slice.fqn, "' has ", t.numel(),
                       " elements but this rank's slice of the parameter has ", s.numel));
    }
    local.narrow(0, s.shard_offset, s.numel).copy_(t.reshape({-1}));
  }
  return local;
}

// An original parameter's part of a gathered flat state, in the parameter's shape: a view of
// the gathered buffer, which nothing else holds (no copy).
at::Tensor ParamView(const at::Tensor& full, const FlatParamInfo& info) {
  return full.narrow(0, info.offset, info.numel).view(info.shape);
}

// use_orig_params: one unit's state as the union over ranks of its parameters' states.
struct OrigParamInfo {
  std::set<std::string> pos_names;
  std::map<std::string, StateValue> scalars;  // from the lowest rank that has them
};
struct OrigUnit {
  std::map<std::string, int> pos_dtypes;
  std::map<size_t, OrigParamInfo> params;
};

class FullGather {
 public:
  FullGather(FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
             const FullGatherRequest& request)
      : adapter_(adapter),
        request_(request),
        group_(request.group ? request.group : fsdp.group()),
        rank_(group_->rank()),
        to_save_(!request.rank0_only || rank_ == 0),
        index_(IndexModel(fsdp)) {}

  absl::StatusOr<OptimStateDict> Run() {
    FSDP_RETURN_IF_ERROR(ReadOptimizer());
    FSDP_ASSIGN_OR_RETURN(json local, LocalKeys());
    FSDP_RETURN_IF_ERROR(ExchangeKeys(local));
    FSDP_RETURN_IF_ERROR(CheckRanksHoldRank0States());
    FSDP_RETURN_IF_ERROR(GatherKeyedParams());
    for (const auto& [u, unit] : CollectOrigUnits()) {
      FSDP_RETURN_IF_ERROR(GatherOrigUnit(u, unit));
    }
    return Assemble();
  }

 private:
  // The optimizer's dict, its parameters in ID order and what each is to FSDP.
  absl::Status ReadOptimizer() {
    if (request_.optim_state_dict != nullptr) {
      osd_ = request_.optim_state_dict;
    } else {
      OPTIM_ASSIGN_OR_RETURN(own_osd_, adapter_.StateDict(), std::string(kOp));
      osd_ = &own_osd_;
    }
    if (request_.optim_input != nullptr) {
      WarnOptimInputDeprecated();
      FSDP_RETURN_IF_ERROR(CheckOptimInput(*request_.optim_input, kOp));
      params_ = request_.optim_input->Params();
    } else {
      params_ = OptimizerParams(adapter_);
    }
    FSDP_RETURN_IF_ERROR(
        CheckIdsInRange(*osd_, params_.size(), request_.optim_input != nullptr, kOp));
    FSDP_ASSIGN_OR_RETURN(roles_, RolesOf(index_, params_, kOp));
    // PyTorch 2.0 merges the ranks' keys when FSDP uses the original parameters: state of
    // parameters FSDP does not manage is then each rank's own (a model-parallel part may differ
    // by rank) and escapes the check that every rank holds rank 0's states.
    for (const FlatParamHandle* h : index_.handles)
      merge_keys_ = merge_keys_ || h->use_orig_params();
    return absl::OkStatus();
  }

  // This rank's keys: flat parameters and unmanaged parameters with state (ID order), with
  // their positive-dimension state names; original parameters with all their state.
  absl::StatusOr<json> LocalKeys() {
    json keys = json::array();
    json orig = json::array();
    for (size_t id = 0; id < params_.size(); ++id) {
      tensor_to_id_[params_[id].unsafeGetTensorImpl()] = static_cast<int64_t>(id);
      const ParamState* st = osd_->state.Find(ParamKey::Id(static_cast<int64_t>(id)));
      if (st == nullptr) continue;
      const ParamRole& role = roles_[id];
      if (role.role == Role::kOrig) {
        FSDP_ASSIGN_OR_RETURN(json entries, StateEntriesToJson(*st, kOp, role.fqn, false));
        orig.push_back(json{{"u", role.unit}, {"i", role.index}, {"state", std::move(entries)}});
        continue;
      }
      const std::string key = role.role == Role::kFlat ? absl::StrCat("unit:", role.unit)
                                                       : absl::StrCat("param:", role.fqn);
      key_to_id_[key] = static_cast<int64_t>(id);
      keys.push_back(
          json{{"key", key}, {"fqns", FqnsOf(index_, role)}, {"pos", SortNames(*st).pos}});
    }
    return json{{"keys", std::move(keys)}, {"orig", std::move(orig)}};
  }

  absl::Status ExchangeKeys(const json& local) {
    OPTIM_ASSIGN_OR_RETURN(std::vector<std::string> all_bytes,
                           group_->AllGatherObject(local.dump()),
                           absl::StrCat(kOp, ": exchanging optimizer state keys (rank ", rank_,
                                        ", group ", group_->name(), ")"));
    for (const std::string& bytes : all_bytes) {
      OPTIM_ASSIGN_OR_RETURN(json j, ParseMetadata(bytes), std::string(kOp));
      all_.push_back(std::move(j));
    }
    return absl::OkStatus();
  }

  // Every rank must hold rank 0's states (1.13's check), reported identically on every rank.
  absl::Status CheckRanksHoldRank0States() const {
    std::string missing_msg;
    for (size_t r = 0; r < all_.size(); ++r) {
      absl::flat_hash_map<std::string, std::set<std::string>> theirs;
      for (const json& k : all_[r]["keys"]) {
        theirs[k["key"].get<std::string>()] = k["pos"].get<std::set<std::string>>();
      }
      std::vector<std::string> missing;
      for (const json& k : all_[0]["keys"]) {
        if (merge_keys_ && k["key"].get<std::string>().rfind("param:", 0) == 0) continue;
        auto it = theirs.find(k["key"].get<std::string>());
        bool ok = it != theirs.end();
        for (const json& name : k["pos"]) ok = ok && it->second.count(name.get<std::string>()) > 0;
        if (!ok) missing.push_back(PyTuple(k["fqns"].get<std::vector<std::string>>()));
      }
      if (!missing.empty()) {
        absl::StrAppend(&missing_msg, "\nRank ", r, " is missing states for the parameters: [",
                        absl::StrJoin(missing, ", "), "]");
      }
    }
    if (missing_msg.empty()) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        kOp, " (rank ", rank_, ", group ", group_->name(),
        "): FSDP currently requires each rank to have at least the optimizer states needed by "
        "rank 0's optimizer but some ranks are missing some of those states",
        missing_msg));
  }

  // One flat state gathered (GatherFlatBuffer, cut to the handle's numel) from the shard
  // `local` makes; with request_.deferred, recorded there instead and answered with a view of a
  // placeholder.
  absl::StatusOr<at::Tensor> Gather(FlatParamHandle& h,
                                    std::function<absl::StatusOr<at::Tensor>()> local,
                                    at::ScalarType dtype, const std::string& name,
                                    const GatherPlan& plan) {
    return CallTorchOr(kOp, [&]() -> absl::StatusOr<at::Tensor> {
      at::Tensor full;
      if (request_.deferred != nullptr) {
        DeferredGather& d = request_.deferred->emplace_back();
        d.handle = &h;
        d.name = name;
        d.to_root = plan.to_root;
        d.local = std::move(local);
        if (Receives(h, plan)) d.placeholder = request_.placeholder(GatheredNumel(h), dtype);
        full = d.placeholder;
      } else {
        FSDP_ASSIGN_OR_RETURN(at::Tensor shard, local());
        FSDP_ASSIGN_OR_RETURN(full, GatherFlatBuffer(h, shard, name, plan));
      }
      return full.defined() ? full.narrow(0, 0, h.numel()) : full;
    });
  }

  // With rank0_only only rank 0 receives the gathered state (when the handle's group is this
  // group, so that its rank 0 is ours). With `on_managed`, which keeps a copy of what it needs
  // right away, each state name's gathers share one buffer.
  GatherPlan PlanFor(const FlatParamHandle& h, size_t name_index) {
    GatherPlan plan;
    plan.to_root = request_.rank0_only && h.group().get() == group_.get();
    if (request_.on_managed) {
      if (gather_buffers_.size() <= name_index) gather_buffers_.resize(name_index + 1);
      plan.reuse = &gather_buffers_[name_index];
    }
    return plan;
  }

  // Flat parameters and unmanaged parameters, in rank 0's order (merge_keys: unmanaged ones in
  // this rank's order).
  absl::Status GatherKeyedParams() {
    for (const json& k : all_[merge_keys_ ? static_cast<size_t>(rank_) : 0]["keys"]) {
      const int64_t id = key_to_id_.at(k["key"].get<std::string>());
      const ParamState& st = *osd_->state.Find(ParamKey::Id(id));
      const ParamRole& role = roles_[static_cast<size_t>(id)];
      if (role.role == Role::kUnmanaged) {
        if (to_save_) saved_[role.fqn] = st;
        continue;
      }
      FSDP_RETURN_IF_ERROR(GatherFlatParam(*index_.handles[role.unit], st, k["pos"]));
    }
    return absl::OkStatus();
  }

  // One flat parameter's state: each positive-dimension state gathered and unflattened, then
  // its scalars copied into every original parameter's entry.
  absl::Status GatherFlatParam(FlatParamHandle& h, const ParamState& st, const json& pos_names) {
    std::vector<ParamState> unflat(h.infos().size());
    size_t name_index = 0;
    for (const json& name_json : pos_names) {
      const std::string name = name_json.get<std::string>();
      const at::Tensor local = st.Find(name)->Get<at::Tensor>();
      OPTIM_ASSIGN_OR_RETURN(at::Tensor full,
                             Gather(
                                 h, [local]() -> absl::StatusOr<at::Tensor> { return local; },
                                 local.scalar_type(), name, PlanFor(h, name_index)),
                             std::string(kOp));
      ++name_index;
      if (!to_save_) continue;
      // `on_managed` copies what it keeps before the buffer is reused.
      FSDP_RETURN_IF_ERROR(CallTorch(kOp, [&] {
        for (size_t i = 0; i < h.infos().size(); ++i) {
          unflat[i].Set(name, ParamView(full, h.infos()[i]));
        }
      }));
    }
    if (!to_save_) return absl::OkStatus();
    const NamesByKind names = SortNames(st);
    for (size_t i = 0; i < h.infos().size(); ++i) {
      for (const auto* list : {&names.zero, &names.other}) {
        for (const std::string& name : *list) unflat[i].Set(name, CloneStateValue(*st.Find(name)));
      }
      if (request_.on_managed) request_.on_managed(unflat[i]);
      saved_[h.infos()[i].fqns[0]] = std::move(unflat[i]);
    }
    return absl::OkStatus();
  }

  // use_orig_params: per unit, the union over ranks of its parameters' states.
  std::map<size_t, OrigUnit> CollectOrigUnits() const {
    std::map<size_t, OrigUnit> orig_units;
    for (const json& rank_meta : all_) {
      for (const json& e : rank_meta["orig"]) {
        OrigUnit& unit = orig_units[e["u"].get<size_t>()];
        OrigParamInfo& p = unit.params[e["i"].get<size_t>()];
        for (const json& s : e["state"]) {
          const std::string name = s["name"].get<std::string>();
          if (s.contains("dtype")) {
            unit.pos_dtypes.emplace(name, s["dtype"].get<int>());
            p.pos_names.insert(name);
          } else {
            p.scalars.emplace(name, StateValueFromJson(s["v"]));
          }
        }
      }
    }
    return orig_units;
  }

  // use_orig_params: this rank's slices of state `name` of unit `h`'s original parameters
  // (ParamShard and the optimizer's tensor), from which LocalShardOf builds its flat shard.
  std::vector<StateSlice> LocalSlices(const FlatParamHandle& h, const std::string& name) const {
    std::vector<StateSlice> slices;
    for (size_t i = 0; i < h.params().size(); ++i) {
      auto it = tensor_to_id_.find(h.params()[i].unsafeGetTensorImpl());
      if (it == tensor_to_id_.end()) continue;
      const ParamState* st = osd_->state.Find(ParamKey::Id(it->second));
      const StateValue* v = st == nullptr ? nullptr : st->Find(name);
      if (v == nullptr || !IsPosDimTensor(*v)) continue;
      slices.push_back({h.ShardOf(i, h.rank()), v->Get<at::Tensor>(), h.infos()[i].fqns[0]});
    }
    return slices;
  }

  absl::Status GatherOrigUnit(size_t u, const OrigUnit& unit) {
    FlatParamHandle& h = *index_.handles[u];
    size_t name_index = 0;
    for (const auto& [name, dtype] : unit.pos_dtypes) {
      const auto type = static_cast<at::ScalarType>(dtype);
      OPTIM_ASSIGN_OR_RETURN(at::Tensor full,
                             Gather(
                                 h,
                                 [&h, name, type, slices = LocalSlices(h, name)] {
                                   return LocalShardOf(h, name, type, slices);
                                 },
                                 type, name, PlanFor(h, name_index)),
                             std::string(kOp));
      ++name_index;
      if (!to_save_) continue;
      FSDP_RETURN_IF_ERROR(CallTorch(kOp, [&] {
        for (const auto& [i, p] : unit.params) {
          if (p.pos_names.count(name) == 0) continue;
          saved_[h.infos()[i].fqns[0]].Set(name, ParamView(full, h.infos()[i]));
        }
      }));
    }
    if (!to_save_) return absl::OkStatus();
    for (const auto& [i, p] : unit.params) {
      ParamState& out = saved_[h.infos()[i].fqns[0]];
      for (bool zero : {true, false}) {
        for (const auto& [name, value] : p.scalars) {
          if (IsZeroDimTensor(value) == zero) out.Set(name, CloneStateValue(value));
        }
      }
      if (request_.on_managed) request_.on_managed(out);
    }
    return absl::OkStatus();
  }

  // State in this rank's ID order; param_groups with FQNs.
  OptimStateDict Assemble() {
    OptimStateDict result;
    if (!to_save_) {
      result.has_param_groups = false;
      return result;
    }
    for (size_t id = 0; id < params_.size(); ++id) {
      for (const std::string& fqn : FqnsOf(index_, roles_[id])) {
        auto it = saved_.find(fqn);
        if (it != saved_.end()) result.state.Set(ParamKey::Fqn(fqn), std::move(it->second));
      }
    }
    result.has_param_groups = osd_->has_param_groups;
    for (const ParamGroup& g : osd_->param_groups) {
      ParamGroup out;
      out.hyper_params = g.hyper_params;
      for (const ParamKey& key : g.params) {
        for (const std::string& fqn : FqnsOf(index_, roles_[static_cast<size_t>(key.id())])) {
          out.params.push_back(ParamKey::Fqn(fqn));
        }
      }
      result.param_groups.push_back(std::move(out));
    }
    return result;
  }

  const OptimizerAdapter& adapter_;
  const FullGatherRequest& request_;
  const std::shared_ptr<comm::ProcessGroup> group_;
  const int rank_;
  const bool to_save_;
  const ModelIndex index_;

  OptimStateDict own_osd_;
  const OptimStateDict* osd_ = nullptr;
  std::vector<at::Tensor> params_;
  std::vector<ParamRole> roles_;
  bool merge_keys_ = false;

  absl::flat_hash_map<std::string, int64_t> key_to_id_;
  absl::flat_hash_map<const c10::TensorImpl*, int64_t> tensor_to_id_;
  std::vector<json> all_;                               // every rank's keys
  absl::flat_hash_map<std::string, ParamState> saved_;  // FQN -> its full state (to_save)
  std::vector<at::Tensor> gather_buffers_;              // per state name, with on_managed
};

}  // namespace

absl::StatusOr<at::Tensor> RunDeferredGather(const DeferredGather& gather) {
  return CallTorchOr(kOp, [&]() -> absl::StatusOr<at::Tensor> {
    FSDP_ASSIGN_OR_RETURN(at::Tensor local, gather.local());
    return GatherFlatBuffer(*gather.handle, local, gather.name, {.to_root = gather.to_root});
  });
}

absl::StatusOr<OptimStateDict> GatherFullOptimStateDict(FullyShardedDataParallel& fsdp,
                                                        const OptimizerAdapter& adapter,
                                                        const FullGatherRequest& request) {
  return FullGather(fsdp, adapter, request).Run();
}

}  // namespace fsdp::optim_state::internal
