#include "optim_state/local_sharded_optim_state.h"

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/status_macros.h"
#include "optim_state/internal/flat_box.h"
#include "optim_state/internal/model_index.h"
#include "optim_state/internal/state_metadata.h"
#include "optim_state/internal/status_context.h"

namespace fsdp::optim_state {
namespace {

using internal::FlatBox;
using internal::ParamRole;
using internal::Role;

constexpr absl::string_view kOp = "LocalShardedOptimStateDict";

// `flat` (elements [begin, begin + flat.numel()) of a tensor of `shape`, flattened) as a
// sharded value: the boxes of that range, views of `flat`.
ShardedTensorValue PiecesOf(const at::Tensor& flat, const std::vector<int64_t>& shape,
                            int64_t begin) {
  ShardedTensorValue v;
  v.global_shape = shape;
  const std::vector<FlatBox> boxes = internal::BoxesOfRange(shape, begin, begin + flat.numel());
  if (boxes.empty()) {
    std::vector<int64_t> empty = shape;
    if (!empty.empty()) empty[0] = 0;
    v.local = flat.narrow(0, 0, 0).view(empty);
    v.offsets.assign(shape.size(), 0);
    return v;
  }
  for (size_t k = 0; k < boxes.size(); ++k) {
    at::Tensor local = flat.narrow(0, boxes[k].begin - begin, boxes[k].numel).view(boxes[k].sizes);
    if (k == 0) {
      v.local = std::move(local);
      v.offsets = boxes[k].offsets;
    } else {
      v.more_shards.push_back({std::move(local), boxes[k].offsets});
    }
  }
  return v;
}

// One original parameter's entry in FSDP1's order: positive-dimension states (each `slice`d to
// this parameter's part), then zero-dimension ones, then others, each group sorted by name.
template <typename Slice>
absl::StatusOr<ParamState> Entry(const ParamState& state, Slice&& slice) {
  const internal::NamesByKind names = internal::SortNames(state);
  ParamState entry;
  for (const std::string& name : names.pos) {
    FSDP_ASSIGN_OR_RETURN(ShardedTensorValue v, slice(name, state.Find(name)->Get<at::Tensor>()));
    entry.Set(name, StateValue(std::move(v)));
  }
  for (const auto* group : {&names.zero, &names.other}) {
    for (const std::string& name : *group) entry.Set(name, *state.Find(name));
  }
  return entry;
}

class LocalSharded {
 public:
  LocalSharded(FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter)
      : index_(internal::IndexModel(fsdp)), params_(internal::OptimizerParams(adapter)) {}

  absl::StatusOr<OptimStateDict> Run(const OptimStateDict& osd) {
    FSDP_ASSIGN_OR_RETURN(roles_, internal::RolesOf(index_, params_, kOp));
    FSDP_RETURN_IF_ERROR(internal::CheckIdsInRange(osd, params_.size(), false, kOp));
    OptimStateDict out;
    for (size_t id = 0; id < roles_.size(); ++id) {
      const ParamState* st = osd.state.Find(ParamKey::Id(static_cast<int64_t>(id)));
      if (st == nullptr) continue;
      FSDP_RETURN_IF_ERROR(
          internal::CallTorchOr(kOp, [&] { return AddEntries(roles_[id], *st, out); }));
    }
    out.has_param_groups = osd.has_param_groups;
    for (const ParamGroup& g : osd.param_groups) {
      ParamGroup group;
      group.hyper_params = g.hyper_params;
      for (const ParamKey& key : g.params) {
        for (const std::string& fqn :
             internal::FqnsOf(index_, roles_[static_cast<size_t>(key.id())])) {
          group.params.push_back(ParamKey::Fqn(fqn));
        }
      }
      out.param_groups.push_back(std::move(group));
    }
    return out;
  }

 private:
  absl::Status AddEntries(const ParamRole& role, const ParamState& st, OptimStateDict& out) {
    if (role.role == Role::kUnmanaged) {
      out.state.Set(ParamKey::Fqn(role.fqn), st);
      return absl::OkStatus();
    }
    const FlatParamHandle& h = *index_.handles[role.unit];
    if (role.role == Role::kOrig) {
      const FlatParamInfo& info = h.infos()[role.index];
      const ParamShard s = h.ShardOf(role.index, h.rank());
      FSDP_ASSIGN_OR_RETURN(
          ParamState entry,
          Entry(st,
                [&](const std::string&, const at::Tensor& t) -> absl::StatusOr<ShardedTensorValue> {
                  return PiecesOf(t.reshape({-1}), info.shape, s.param_offset);
                }));
      out.state.Set(ParamKey::Fqn(info.fqns[0]), std::move(entry));
      return absl::OkStatus();
    }
    const int64_t size = h.sharded() ? h.shard_numel() : h.numel();
    for (size_t i = 0; i < h.infos().size(); ++i) {
      const ParamShard s = h.ShardOf(i, h.rank());
      FSDP_ASSIGN_OR_RETURN(
          ParamState entry,
          Entry(st,
                [&](const std::string& name,
                    const at::Tensor& t) -> absl::StatusOr<ShardedTensorValue> {
                  if (t.dim() != 1 || t.numel() != size) {
                    return absl::InvalidArgumentError(absl::StrCat(
                        kOp, ": state '", name, "' of the flat parameter [", h.Describe(),
                        "] has shape [", absl::StrJoin(t.sizes(), ", "), "], not [", size, "]"));
                  }
                  return PiecesOf(t.narrow(0, s.shard_offset, s.numel), h.infos()[i].shape,
                                  s.param_offset);
                }));
      out.state.Set(ParamKey::Fqn(h.infos()[i].fqns[0]), std::move(entry));
    }
    return absl::OkStatus();
  }

  const internal::ModelIndex index_;
  const std::vector<at::Tensor> params_;
  std::vector<ParamRole> roles_;
};

}  // namespace

absl::StatusOr<OptimStateDict> LocalShardedOptimStateDict(FullyShardedDataParallel& fsdp,
                                                          const OptimizerAdapter& adapter,
                                                          const OptimStateDict* optim_state_dict) {
  OptimStateDict own;
  if (optim_state_dict == nullptr) {
    OPTIM_ASSIGN_OR_RETURN(own, adapter.StateDict(), std::string(kOp));
    optim_state_dict = &own;
  }
  return LocalSharded(fsdp, adapter).Run(*optim_state_dict);
}

}  // namespace fsdp::optim_state
