// LoadShardedCheckpoint's steps over any source (internal/shard_load.h): every rank reads and
// checks what its shards need, and only when all have does any change its model or optimizer.
#include "checkpoint/internal/shard_load.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <optional>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/internal/sharded_checkpoint_common.h"
#include "comm/status_macros.h"
#include "fsdp/state_dict.h"
#include "nlohmann/json.hpp"

namespace fsdp::checkpoint::internal {

using internal::AgreeOn;
using internal::FqnsOf;
using internal::json;
using internal::OptimizerParams;
using internal::ParamRole;
using internal::Role;
using internal::Roles;
using internal::Since;
using internal::TorchSize;
using internal::Where;
using optim_state::OptimizerAdapter;
using optim_state::OptimStateDict;
using optim_state::ParamGroup;
using optim_state::ParamKey;
using optim_state::ParamState;
using optim_state::StateValue;

namespace {

// Where the optimizer's state is read. A state tensor the optimizer already holds with the
// loaded one's shape and dtype is overwritten in place rather than read into a second buffer,
// so that a load holds the optimizer's state once, not twice (its state is twice the model's
// shard under Adam). Since nothing may change before every rank has read and checked
// everything, such a tensor's bytes are read and checked now into a scratch buffer, and read
// into place by Commit once all ranks have agreed, through the same open files.
class StateReads {
 public:
  explicit StateReads(ShardSource& source) : source_(source) {}

  // Elements [begin, begin + out.numel()) of `t` into `out` (contiguous): now, or, if `defer`,
  // read and checked now and read into `out` by Commit.
  absl::Status Read(const TensorRecord& t, int64_t begin, at::Tensor out, bool defer) {
    const int64_t end = begin + out.numel();
    if (!defer) return source_.ReadRange(t, begin, end, out);
    // Slices of at most kScratchBytes: a source reads a stored piece whole where it overlaps
    // the range (DCP's chunks), so the slices are large.
    const int64_t chunk = std::max<int64_t>(1, kScratchBytes / c10::elementSize(t.dtype));
    for (int64_t b = begin; b < end; b += chunk) {
      const int64_t n = std::min(chunk, end - b);
      const int64_t bytes = n * static_cast<int64_t>(c10::elementSize(t.dtype));
      if (!scratch_.defined() || scratch_.numel() < bytes) scratch_ = at::empty({bytes}, at::kByte);
      at::Tensor into = at::from_blob(scratch_.data_ptr(), {n}, at::TensorOptions().dtype(t.dtype));
      FSDP_RETURN_IF_ERROR(source_.ReadRange(t, b, b + n, into));
    }
    pending_.push_back(Pending{&t, begin, std::move(out)});
    return absl::OkStatus();
  }

  // Zeroes `out`: now, or (`defer`) in Commit.
  void Zero(at::Tensor out, bool defer) {
    if (!defer) {
      out.zero_();
      return;
    }
    pending_.push_back(Pending{nullptr, 0, std::move(out)});
  }

  // Every deferred read and zeroing, in the order they were asked for.
  absl::Status Commit() {
    scratch_ = at::Tensor();
    for (Pending& p : pending_) {
      if (p.tensor == nullptr) {
        p.out.zero_();
        continue;
      }
      FSDP_RETURN_IF_ERROR(source_.ReadRange(*p.tensor, p.begin, p.begin + p.out.numel(), p.out));
    }
    pending_.clear();
    return absl::OkStatus();
  }

 private:
  static constexpr int64_t kScratchBytes = int64_t{64} << 20;
  struct Pending {
    const TensorRecord* tensor;  // null: zero `out`
    int64_t begin;
    at::Tensor out;
  };
  ShardSource& source_;
  std::vector<Pending> pending_;
  at::Tensor scratch_;  // bytes
};

struct Plan {
  ShardedDict model;
  OptimStateDict optim;
};

// The optimizer's state before the load, which a failed load restores: its tensors are the
// optimizer's own (OptimizerAdapter::StateDict shares them), so they are also where StateReads
// reads in place.
struct Current {
  OptimStateDict dict;
  absl::flat_hash_set<const void*> taken;  // tensors chosen as a destination

  // State `name` of parameter `id` if the loaded value can be read straight into it: a
  // contiguous tensor of `param`'s shape, device and dtype, `dtype` being the loaded one's,
  // not chosen before. Else undefined.
  at::Tensor Destination(int64_t id, const std::string& name, const at::Tensor& param,
                         at::ScalarType dtype) {
    const ParamState* state = dict.state.Find(ParamKey::Id(id));
    const StateValue* value = state == nullptr ? nullptr : state->Find(name);
    const at::Tensor* t = value == nullptr ? nullptr : value->GetIf<at::Tensor>();
    if (t == nullptr || !t->defined() || !t->is_contiguous() || t->sizes() != param.sizes() ||
        t->scalar_type() != dtype || dtype != param.scalar_type() ||
        t->device() != param.device() || !taken.insert(t->data_ptr()).second) {
      return at::Tensor();
    }
    return t->detach();
  }
};

// "model key -> stored FQN" and the checkpoint's optimizer entries by the stored FQN they
// resolve to.
struct Names {
  std::map<std::string, std::string> stored;
  std::map<std::string, const OptimParamRecord*> optim;

  std::string Resolve(const std::string& fqn) const {
    auto it = stored.find(fqn);
    return it == stored.end() ? fqn : it->second;
  }
};

absl::Status BuildModel(FullyShardedDataParallel& fsdp, ShardSource& reader, const Names& names,
                        Plan& plan) {
  const ShardedMetadata& m = reader.metadata();
  // Views, not copies: every value is replaced by what is read.
  FSDP_ASSIGN_OR_RETURN(ShardedDict templ, ShardedStateDict(fsdp, /*views=*/true));
  std::vector<std::string> missing, errors;
  std::set<std::string> expected;
  for (auto& [fqn, value] : templ) {
    expected.insert(fqn);
    auto it = names.stored.find(fqn);
    if (it == names.stored.end()) {
      missing.push_back(absl::StrCat("\"", fqn, "\""));
      continue;
    }
    const TensorRecord* t = m.FindTensor(absl::StrCat("model/", it->second));
    LocalShard* shard = std::get_if<LocalShard>(&value);
    const at::Tensor& current = shard != nullptr ? shard->data : std::get<at::Tensor>(value);
    const std::vector<int64_t> shape =
        shard != nullptr ? shard->global_shape : current.sizes().vec();
    if (t->shape != shape) {
      errors.push_back(absl::StrCat(
          "size mismatch for ", fqn, ": copying a param with shape ", TorchSize(t->shape),
          " from checkpoint, the shape in current model is ", TorchSize(shape), "."));
      continue;
    }
    if (t->dtype != current.scalar_type()) {
      errors.push_back(absl::StrCat("dtype mismatch for ", fqn, ": copying a param with dtype ",
                                    c10::toString(t->dtype),
                                    " from checkpoint, the dtype in current model is ",
                                    c10::toString(current.scalar_type()), "."));
      continue;
    }
    if (shard != nullptr) {
      at::Tensor data = at::empty({shard->numel}, current.options());
      FSDP_RETURN_IF_ERROR(
          reader.ReadRange(*t, shard->flat_offset, shard->flat_offset + shard->numel, data));
      shard->data = data;
    } else {
      FSDP_ASSIGN_OR_RETURN(at::Tensor data, reader.ReadTensor(*t));
      value = data;
    }
  }
  std::vector<std::string> unexpected;
  for (const auto& [key, stored] : m.model_keys) {
    if (expected.count(key) == 0) unexpected.push_back(absl::StrCat("\"", key, "\""));
  }
  std::string message;
  if (!missing.empty()) {
    absl::StrAppend(&message, "Missing key(s) in state_dict: ", absl::StrJoin(missing, ", "), ". ");
  }
  if (!unexpected.empty()) {
    absl::StrAppend(&message, "Unexpected key(s) in state_dict: ", absl::StrJoin(unexpected, ", "),
                    ". ");
  }
  for (const std::string& e : errors) absl::StrAppend(&message, "\n\t", e);
  if (!message.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(reader.metadata_file(),
                     " does not fit the model: Error(s) in loading state_dict: ", message));
  }
  plan.model = std::move(templ);
  return absl::OkStatus();
}

// The positive-dimension state `name` of checkpoint entry `rec`, or null.
const OptimValueRecord* FindValue(const OptimParamRecord* rec, const std::string& name) {
  if (rec == nullptr) return nullptr;
  for (const OptimValueRecord& v : rec->values) {
    if (v.name == name) return &v;
  }
  return nullptr;
}

// Reads elements [begin, begin + numel) of the state tensor `v` of parameter `fqn` (of shape
// `shape`) into `out` (StateReads::Read).
absl::Status ReadState(ShardSource& reader, StateReads& reads, const OptimValueRecord& v,
                       const std::string& fqn, const std::vector<int64_t>& shape, int64_t begin,
                       at::Tensor out, bool defer) {
  const TensorRecord* t = reader.metadata().FindTensor(v.tensor_key);
  if (t->shape != shape) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer state '", v.name, "' of '", fqn,
                     "': Tensor optimizer state does not have same shape as its parameter: ",
                     TorchSize(t->shape), " ", TorchSize(shape)));
  }
  return reads.Read(*t, begin, std::move(out), defer);
}

absl::StatusOr<at::ScalarType> StateDtype(ShardSource& reader, const OptimValueRecord& v) {
  return reader.metadata().FindTensor(v.tensor_key)->dtype;
}

// A flat parameter's state `name` (`out`, this rank's shard, of the loaded dtype `dtype`):
// each original parameter's slice at its place, zeros elsewhere (only the elements no slice is
// read into are zeroed: padding, parameters without state).
absl::Status ReadFlatState(ShardSource& reader, StateReads& reads, const FlatParamHandle& h,
                           const std::vector<std::string>& fqns,
                           const std::vector<const OptimParamRecord*>& recs,
                           const std::string& name, at::ScalarType dtype, const at::Tensor& out,
                           bool defer) {
  std::vector<std::pair<int64_t, int64_t>> filled;  // [begin, end) read into `out`
  for (size_t i = 0; i < fqns.size(); ++i) {
    const OptimValueRecord* v = FindValue(recs[i], name);
    if (v == nullptr) continue;
    if (!v->is_tensor) continue;  // reported above
    FSDP_ASSIGN_OR_RETURN(at::ScalarType other, StateDtype(reader, *v));
    if (other != dtype) {
      return absl::InvalidArgumentError(absl::StrCat(
          "All unflattened parameters comprising a single flattened parameter must have "
          "positive-dimension tensor state with the same dtype but got dtypes {",
          c10::toString(dtype), ", ", c10::toString(other), "} for state ", name,
          " and unflattened parameter names [", absl::StrJoin(fqns, ", "), "]"));
    }
    const ParamShard ps = h.ShardOf(i, h.rank());
    if (ps.numel == 0) continue;
    FSDP_RETURN_IF_ERROR(ReadState(reader, reads, *v, fqns[i], h.infos()[i].shape, ps.param_offset,
                                   out.narrow(0, ps.shard_offset, ps.numel), defer));
    filled.emplace_back(ps.shard_offset, ps.shard_offset + ps.numel);
  }
  std::sort(filled.begin(), filled.end());
  int64_t next = 0;
  for (const auto& [b, e] : filled) {
    if (b > next) reads.Zero(out.narrow(0, next, b - next), defer);
    next = std::max(next, e);
  }
  if (next < out.numel()) reads.Zero(out.narrow(0, next, out.numel() - next), defer);
  return absl::OkStatus();
}

// The optimizer's parameter groups with the checkpoint's hyper-parameters, once each group's
// parameters are found to be the checkpoint's group's.
absl::Status BuildParamGroups(const OptimizerAdapter& adapter, const ShardedMetadata& m,
                              const Names& names, const std::vector<ParamRole>& roles,
                              OptimStateDict& osd) {
  const auto& groups = adapter.optimizer().param_groups();
  if (groups.size() != m.optim.param_groups.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the checkpoint has ", m.optim.param_groups.size(),
                     " parameter groups, the optimizer has ", groups.size()));
  }
  size_t id = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    ParamGroup out;
    out.hyper_params = m.optim.param_groups[g].hyper_params;
    std::set<std::string> ours, theirs;
    for (size_t k = 0; k < groups[g].params().size(); ++k, ++id) {
      out.params.push_back(ParamKey::Id(static_cast<int64_t>(id)));
      for (const std::string& fqn : FqnsOf(roles[id])) ours.insert(names.Resolve(fqn));
    }
    for (const ParamKey& key : m.optim.param_groups[g].params) {
      theirs.insert(names.Resolve(key.fqn()));
    }
    if (ours != theirs) {
      std::vector<std::string> only_ours, only_theirs;
      for (const auto& f : ours) {
        if (theirs.count(f) == 0) only_ours.push_back(f);
      }
      for (const auto& f : theirs) {
        if (ours.count(f) == 0) only_theirs.push_back(f);
      }
      return absl::InvalidArgumentError(absl::StrCat(
          "param_groups[", g, "] of the checkpoint does not match the optimizer's group ", g,
          ": only in the checkpoint [", absl::StrJoin(only_theirs, ", "),
          "], only in the optimizer [", absl::StrJoin(only_ours, ", "), "]"));
    }
    osd.param_groups.push_back(std::move(out));
  }
  return absl::OkStatus();
}

absl::Status BuildOptim(FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
                        ShardSource& reader, const Names& names, Current& current,
                        StateReads& reads, Plan& plan) {
  const ShardedMetadata& m = reader.metadata();
  if (!m.has_optim) {
    return absl::InvalidArgumentError(
        absl::StrCat(reader.metadata_file(), " holds no optimizer state"));
  }
  const std::vector<at::Tensor> params = OptimizerParams(adapter);
  FSDP_ASSIGN_OR_RETURN(std::vector<ParamRole> roles, Roles(fsdp, params));
  OptimStateDict& osd = plan.optim;
  for (size_t id = 0; id < params.size(); ++id) {
    const ParamRole& role = roles[id];
    const std::vector<std::string> fqns = FqnsOf(role);
    std::vector<const OptimParamRecord*> recs;
    bool any = false;
    for (const std::string& fqn : fqns) {
      auto it = names.optim.find(names.Resolve(fqn));
      recs.push_back(it == names.optim.end() ? nullptr : it->second);
      any = any || recs.back() != nullptr;
    }
    if (!any) continue;
    // State names in the order of the first parameter that has them.
    std::vector<std::string> order;
    for (const OptimParamRecord* rec : recs) {
      if (rec == nullptr) continue;
      for (const OptimValueRecord& v : rec->values) {
        if (std::find(order.begin(), order.end(), v.name) == order.end()) order.push_back(v.name);
      }
    }
    ParamState state;
    for (const std::string& name : order) {
      const OptimValueRecord* first = nullptr;
      for (const OptimParamRecord* rec : recs) {
        const OptimValueRecord* v = FindValue(rec, name);
        if (v == nullptr) continue;
        if (first == nullptr) first = v;
        if (v->is_tensor != first->is_tensor) {
          return absl::InvalidArgumentError(
              absl::StrCat("Differing optimizer state types for state ", name,
                           " and unflattened parameter "
                           "names [",
                           absl::StrJoin(fqns, ", "), "]"));
        }
      }
      if (!first->is_tensor) {
        state.Set(name, optim_state::CloneStateValue(first->value));
        continue;
      }
      FSDP_ASSIGN_OR_RETURN(at::ScalarType dtype, StateDtype(reader, *first));
      // The optimizer's own tensor (read into once all ranks agree), or a new one read now.
      at::Tensor into = current.Destination(static_cast<int64_t>(id), name, params[id], dtype);
      const bool defer = into.defined();
      at::Tensor out = defer ? into.view({-1})
                             : at::empty({params[id].numel()}, at::TensorOptions().dtype(dtype));
      if (role.role == Role::kUnmanaged) {
        FSDP_RETURN_IF_ERROR(
            ReadState(reader, reads, *first, fqns[0], params[id].sizes().vec(), 0, out, defer));
      } else if (role.role == Role::kOrig) {
        const FlatParamHandle& h = *role.handle;
        const ParamShard ps = h.ShardOf(role.index, h.rank());
        if (ps.numel != params[id].numel()) {
          return absl::InternalError(absl::StrCat("'", fqns[0], "' holds ", params[id].numel(),
                                                  " elements, its shard slice ", ps.numel));
        }
        FSDP_RETURN_IF_ERROR(ReadState(reader, reads, *first, fqns[0], h.infos()[role.index].shape,
                                       ps.param_offset, out, defer));
      } else {
        FSDP_RETURN_IF_ERROR(
            ReadFlatState(reader, reads, *role.handle, fqns, recs, name, dtype, out, defer));
      }
      state.Set(name, StateValue(out.view(params[id].sizes())));
    }
    osd.state.Set(ParamKey::Id(static_cast<int64_t>(id)), std::move(state));
  }

  osd.has_param_groups = m.optim.has_param_groups;
  if (!osd.has_param_groups) return absl::OkStatus();
  return BuildParamGroups(adapter, m, names, roles, osd);
}

}  // namespace

absl::StatusOr<LoadStats> LoadFromShardSource(const std::string& dir, const OpenShardSource& open,
                                              FullyShardedDataParallel& fsdp,
                                              OptimizerAdapter* adapter) {
  const auto start = std::chrono::steady_clock::now();
  at::NoGradGuard no_grad;
  comm::ProcessGroup& group = *fsdp.group();
  const std::string where = Where("LoadShardedCheckpoint", dir, group);

  // 1. Read and check everything this rank needs; change nothing.
  Plan plan;
  LoadStats stats;
  std::unique_ptr<ShardSource> reader;
  std::optional<StateReads> reads;
  Current current;
  absl::Status built = CallTorch(where, [&]() -> absl::Status {
    FSDP_ASSIGN_OR_RETURN(reader, open());
    reads.emplace(*reader);
    Names names;
    for (const auto& [key, stored] : reader->metadata().model_keys) names.stored[key] = stored;
    for (const OptimParamRecord& p : reader->metadata().optim.state) {
      names.optim[names.Resolve(p.fqn)] = &p;
    }
    FSDP_RETURN_IF_ERROR(BuildModel(fsdp, *reader, names, plan));
    if (adapter != nullptr) {
      FSDP_ASSIGN_OR_RETURN(current.dict, adapter->StateDict());
      FSDP_RETURN_IF_ERROR(BuildOptim(fsdp, *adapter, *reader, names, current, *reads, plan),
                           "optimizer");
    }
    return absl::OkStatus();
  });
  if (reader != nullptr) stats.read = reader->stats();
  FSDP_RETURN_IF_ERROR(AgreeOn(group, where, built));

  // 2. The optimizer (restored everywhere if any rank refuses), then the model. No copy is
  // needed to restore: LoadStateDict swaps the plan's tensors in (the rvalue LoadStateDict
  // takes them as they are), so the tensors `current` refers to are left as they were, also
  // those the plan shares with it, which nothing writes into before step 3.
  if (adapter != nullptr) {
    absl::Status loaded =
        CallTorch(where, [&]() { return adapter->LoadStateDict(std::move(plan.optim)); });
    absl::Status agreed = AgreeOn(group, where, loaded);
    if (!agreed.ok()) {
      if (loaded.ok()) (void)adapter->LoadStateDict(std::move(current.dict));
      return agreed;
    }
  }
  absl::Status model = LoadShardedStateDict(fsdp, plan.model);
  if (!model.ok()) {
    if (adapter != nullptr) (void)adapter->LoadStateDict(std::move(current.dict));
    return Annotate(model, where);
  }

  // 3. The optimizer state read into its own tensors: bytes this rank has read and checked
  // already, from the files it still holds open, so only an I/O error of the machine can fail
  // here, and then the load cannot be undone.
  current = Current();
  if (reads.has_value()) {
    absl::Status committed = CallTorch(where, [&]() { return reads->Commit(); });
    FSDP_RETURN_IF_ERROR(
        AgreeOn(group, where,
                Annotate(committed,
                         "reading the optimizer's state into place after every rank had "
                         "checked it (the model is loaded, the optimizer's state partly)")));
  }
  stats.seconds = Since(start);
  return stats;
}

}  // namespace fsdp::checkpoint::internal
