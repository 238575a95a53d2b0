#include "optim_state/fsdp_optim_state.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/status_macros.h"
#include "nlohmann/json.hpp"
#include "optim_state/optim_input.h"

namespace fsdp::optim_state {
namespace {

using json = nlohmann::json;

// FSDP_ASSIGN_OR_RETURN with a context prefixed to the error (as FSDP_RETURN_IF_ERROR's).
#define OPTIM_ASSIGN_OR_RETURN(lhs, expr, context) \
  OPTIM_ASSIGN_OR_RETURN_IMPL_(FSDP_STATUS_CONCAT_(optim_statusor_, __LINE__), lhs, expr, context)
#define OPTIM_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr, context)           \
  auto statusor = (expr);                                                    \
  if (!statusor.ok()) return ::fsdp::Annotate(statusor.status(), (context)); \
  lhs = std::move(statusor).value()

// CallTorch for functions that return an absl::StatusOr.
template <typename Fn>
auto CallTorchOr(absl::string_view context, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::exception& e) {
    return StatusFromException(e, context);
  }
}

// ---------------------------------------------------------------- the model and optimizer

enum class Role { kFlat, kOrig, kUnmanaged };

// What one tensor of the optimizer is to FSDP.
struct ParamRole {
  Role role = Role::kUnmanaged;
  size_t unit = 0;   // kFlat, kOrig: index into ModelIndex::handles
  size_t index = 0;  // kOrig: index of the original parameter in its handle
  std::string fqn;   // kOrig, kUnmanaged
};

struct ModelIndex {
  std::vector<FlatParamHandle*> handles;  // units that manage parameters, in pre-order
  absl::flat_hash_map<const c10::TensorImpl*, ParamRole> by_tensor;
  std::vector<std::pair<std::string, at::Tensor>> unmanaged;
};

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

// The optimizer's parameters in ID order (param_groups order).
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
  std::vector<std::string> fqns;
  for (const FlatParamInfo& info : index.handles[role.unit]->infos()) {
    fqns.push_back(info.fqns[0]);
  }
  return fqns;
}

std::vector<std::string> HandleFqns(const FlatParamHandle& h) {
  std::vector<std::string> fqns;
  for (const FlatParamInfo& info : h.infos()) fqns.push_back(info.fqns[0]);
  return fqns;
}

// ---------------------------------------------------------------- Python-like text

std::string PyStr(const std::string& s) { return absl::StrCat("'", s, "'"); }

std::string PyList(const std::vector<std::string>& items) {
  return absl::StrCat(
      "[",
      absl::StrJoin(items, ", ",
                    [](std::string* out, const std::string& s) { absl::StrAppend(out, PyStr(s)); }),
      "]");
}

std::string PyTuple(const std::vector<std::string>& items) {
  std::vector<std::string> quoted;
  for (const auto& s : items) quoted.push_back(PyStr(s));
  return absl::StrCat("(", absl::StrJoin(quoted, ", "), items.size() == 1 ? ",)" : ")");
}

std::string PySet(const std::vector<std::string>& reprs) {
  return absl::StrCat("{", absl::StrJoin(reprs, ", "), "}");
}

std::string TorchSize(at::IntArrayRef shape) {
  return absl::StrCat("torch.Size([", absl::StrJoin(shape, ", "), "])");
}

std::string TorchDtype(at::ScalarType t) { return absl::StrCat("torch.", DtypeName(t)); }

// Python's `tensor.item()` repr.
std::string ItemRepr(const at::Tensor& t) {
  if (t.scalar_type() == at::kBool) return t.item<bool>() ? "True" : "False";
  if (at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) {
    return absl::StrCat(t.item<int64_t>());
  }
  return DebugString(StateValue(t.item<double>()));
}

// ---------------------------------------------------------------- values as metadata

bool IsPosDimTensor(const StateValue& v) {
  const at::Tensor* t = v.GetIf<at::Tensor>();
  return t != nullptr && t->defined() && t->dim() > 0;
}
bool IsZeroDimTensor(const StateValue& v) {
  const at::Tensor* t = v.GetIf<at::Tensor>();
  return t != nullptr && t->defined() && t->dim() == 0;
}

// A scalar value (not a positive-dimension tensor) as JSON.
absl::StatusOr<json> ToJson(const StateValue& value) {
  if (value.IsNone()) return json{{"t", "none"}};
  if (const bool* b = value.GetIf<bool>()) return json{{"t", "bool"}, {"v", *b}};
  if (const int64_t* i = value.GetIf<int64_t>()) return json{{"t", "int"}, {"v", *i}};
  if (const double* d = value.GetIf<double>()) return json{{"t", "float"}, {"v", *d}};
  if (const std::string* s = value.GetIf<std::string>()) return json{{"t", "str"}, {"v", *s}};
  if (const StateSequence* seq = value.GetIf<StateSequence>()) {
    json items = json::array();
    for (const StateValue& item : seq->items) {
      FSDP_ASSIGN_OR_RETURN(json j, ToJson(item));
      items.push_back(std::move(j));
    }
    return json{{"t", seq->is_tuple ? "tuple" : "list"}, {"v", std::move(items)}};
  }
  if (IsZeroDimTensor(value)) {
    const at::Tensor& t = value.Get<at::Tensor>();
    json j{{"t", "tensor"}, {"dtype", static_cast<int>(t.scalar_type())}};
    if (t.scalar_type() == at::kBool) {
      j["v"] = t.item<bool>();
    } else if (at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) {
      j["v"] = t.item<int64_t>();
    } else if (at::isFloatingType(t.scalar_type())) {
      j["v"] = t.item<double>();
    } else {
      return absl::UnimplementedError(
          absl::StrCat("a zero-dimension tensor of dtype ", DtypeName(t.scalar_type())));
    }
    return j;
  }
  return absl::UnimplementedError(
      absl::StrCat("a value of type ", value.TypeName(), " cannot travel as metadata"));
}

StateValue FromJson(const json& j) {
  const std::string t = j.at("t").get<std::string>();
  if (t == "bool") return StateValue(j.at("v").get<bool>());
  if (t == "int") return StateValue(j.at("v").get<int64_t>());
  if (t == "float") return StateValue(j.at("v").get<double>());
  if (t == "str") return StateValue(j.at("v").get<std::string>());
  if (t == "tuple" || t == "list") {
    std::vector<StateValue> items;
    for (const json& item : j.at("v")) items.push_back(FromJson(item));
    return t == "tuple" ? StateValue::Tuple(std::move(items)) : StateValue::List(std::move(items));
  }
  if (t == "tensor") {
    const auto dtype = static_cast<at::ScalarType>(j.at("dtype").get<int>());
    const auto options = at::TensorOptions().dtype(dtype);
    if (dtype == at::kBool) return StateValue(at::scalar_tensor(j.at("v").get<bool>(), options));
    if (at::isIntegralType(dtype, /*includeBool=*/false)) {
      return StateValue(at::scalar_tensor(j.at("v").get<int64_t>(), options));
    }
    return StateValue(at::scalar_tensor(j.at("v").get<double>(), options));
  }
  return StateValue::None();
}

absl::StatusOr<json> ParamStateToJson(const ParamState& state) {
  json out = json::array();
  for (const auto& [name, value] : state) {
    OPTIM_ASSIGN_OR_RETURN(json v, ToJson(value), absl::StrCat("state '", name, "'"));
    out.push_back(json{{"name", name}, {"v", std::move(v)}});
  }
  return out;
}

ParamState ParamStateFromJson(const json& j) {
  ParamState out;
  for (const json& e : j) out.Set(e.at("name").get<std::string>(), FromJson(e.at("v")));
  return out;
}

absl::StatusOr<json> Parse(const std::string& bytes) {
  json j = json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InternalError("malformed metadata object");
  return j;
}

// ---------------------------------------------------------------- full_optim_state_dict

// The sorted names of `state`'s positive-dimension tensors, zero-dimension tensors and others.
struct NamesByKind {
  std::vector<std::string> pos, zero, other;
};
NamesByKind SortNames(const ParamState& state) {
  NamesByKind n;
  for (const auto& [name, value] : state) {
    (IsPosDimTensor(value) ? n.pos : IsZeroDimTensor(value) ? n.zero : n.other).push_back(name);
  }
  std::sort(n.pos.begin(), n.pos.end());
  std::sort(n.zero.begin(), n.zero.end());
  std::sort(n.other.begin(), n.other.end());
  return n;
}

StateValue CopyValue(const StateValue& v) { return CloneStateValue(v); }

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

// A buffer of `numel` elements of `dtype`: the front of `*buffer` when it is large enough, else
// a new one stored there.
at::Tensor ReuseBuffer(at::Tensor& buffer, int64_t numel, at::ScalarType dtype) {
  if (!buffer.defined() || buffer.scalar_type() != dtype || buffer.numel() < numel) {
    buffer = at::Tensor();  // frees the old one first
    buffer = at::empty({numel}, at::TensorOptions().dtype(dtype));
  }
  return buffer.narrow(0, 0, numel);
}

// `full` (numel elements) gathered from `local` (this rank's shard) over the handle's group,
// or taken as is without sharding. Undefined on ranks that receive nothing (plan.to_root).
absl::StatusOr<at::Tensor> GatherFlat(FlatParamHandle& h, const at::Tensor& local,
                                      const std::string& name, const GatherPlan& plan) {
  const std::string context =
      absl::StrCat("gathering optimizer state '", name, "' of flat parameter [", h.Describe(), "]");
  const int64_t expected = h.sharded() ? h.shard_numel() : h.numel();
  if (local.dim() != 1 || local.numel() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        context, ": state has shape ", TorchSize(local.sizes()), ", expected [", expected, "]"));
  }
  if (!h.sharded()) {
    if (plan.to_root && h.group()->rank() != 0) return at::Tensor();
    return plan.reuse != nullptr ? local : local.clone();
  }
  const at::Tensor shard = local.detach().contiguous();
  comm::ProcessGroup& group = *h.group();
  if (plan.to_root && group.rank() != 0) {
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
  return out.narrow(0, 0, h.numel());
}

// Every ID of `osd` ("state" keys and param_groups' "params") names one of `count` parameters.
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

// FullOptimStateDict; `on_managed` (if set) transforms each managed parameter's entry as soon
// as it is complete (ShardedOptimStateDict chunks it there, holding one unit's full state at
// most).
absl::StatusOr<OptimStateDict> FullImpl(FullyShardedDataParallel& fsdp,
                                        const OptimizerAdapter& adapter,
                                        const FullOptimStateDictOptions& options,
                                        const std::function<void(ParamState&)>& on_managed) {
  constexpr absl::string_view kOp = "FullOptimStateDict";
  std::shared_ptr<comm::ProcessGroup> group = options.group ? options.group : fsdp.group();
  const int rank = group->rank();
  const bool to_save = !options.rank0_only || rank == 0;
  const ModelIndex index = IndexModel(fsdp);
  OptimStateDict osd;
  if (options.optim_state_dict != nullptr) {
    osd = *options.optim_state_dict;
  } else {
    OPTIM_ASSIGN_OR_RETURN(osd, adapter.StateDict(), std::string(kOp));
  }
  std::vector<at::Tensor> params;
  if (options.optim_input.has_value()) {
    WarnOptimInputDeprecated();
    FSDP_RETURN_IF_ERROR(CheckOptimInput(*options.optim_input, kOp));
    params = options.optim_input->Params();
  } else {
    params = OptimizerParams(adapter);
  }
  FSDP_RETURN_IF_ERROR(CheckIdsInRange(osd, params.size(), options.optim_input.has_value(), kOp));
  FSDP_ASSIGN_OR_RETURN(std::vector<ParamRole> roles, RolesOf(index, params, kOp));
  // PyTorch 2.0 merges the ranks' keys when FSDP uses the original parameters: state of
  // parameters FSDP does not manage is then each rank's own (a model-parallel part may differ
  // by rank) and escapes the check that every rank holds rank 0's states.
  bool merge_keys = false;
  for (const FlatParamHandle* h : index.handles) merge_keys = merge_keys || h->use_orig_params();

  // This rank's keys: flat parameters and unmanaged parameters with state (ID order), with
  // their positive-dimension state names; original parameters with all their state.
  json keys = json::array();
  json orig = json::array();
  absl::flat_hash_map<std::string, int64_t> key_to_id;
  absl::flat_hash_map<const c10::TensorImpl*, int64_t> tensor_to_id;
  for (size_t id = 0; id < params.size(); ++id) {
    tensor_to_id[params[id].unsafeGetTensorImpl()] = static_cast<int64_t>(id);
    const ParamState* st = osd.state.Find(ParamKey::Id(static_cast<int64_t>(id)));
    if (st == nullptr) continue;
    const ParamRole& role = roles[id];
    if (role.role == Role::kOrig) {
      json entries = json::array();
      for (const auto& [name, value] : *st) {
        if (IsPosDimTensor(value)) {
          entries.push_back(json{
              {"name", name}, {"dtype", static_cast<int>(value.Get<at::Tensor>().scalar_type())}});
        } else {
          OPTIM_ASSIGN_OR_RETURN(json v, ToJson(value),
                                 absl::StrCat(kOp, ": state '", name, "' of '", role.fqn, "'"));
          entries.push_back(json{{"name", name}, {"v", std::move(v)}});
        }
      }
      orig.push_back(json{{"u", role.unit}, {"i", role.index}, {"state", std::move(entries)}});
      continue;
    }
    const std::string key = role.role == Role::kFlat ? absl::StrCat("unit:", role.unit)
                                                     : absl::StrCat("param:", role.fqn);
    key_to_id[key] = static_cast<int64_t>(id);
    keys.push_back(json{{"key", key}, {"fqns", FqnsOf(index, role)}, {"pos", SortNames(*st).pos}});
  }
  const json local{{"keys", std::move(keys)}, {"orig", std::move(orig)}};
  OPTIM_ASSIGN_OR_RETURN(std::vector<std::string> all_bytes, group->AllGatherObject(local.dump()),
                         absl::StrCat(kOp, ": exchanging optimizer state keys (rank ", rank,
                                      ", group ", group->name(), ")"));
  std::vector<json> all;
  for (const std::string& bytes : all_bytes) {
    OPTIM_ASSIGN_OR_RETURN(json j, Parse(bytes), std::string(kOp));
    all.push_back(std::move(j));
  }

  // Every rank must hold rank 0's states (1.13's check), reported identically on every rank.
  std::string missing_msg;
  for (size_t r = 0; r < all.size(); ++r) {
    absl::flat_hash_map<std::string, std::set<std::string>> theirs;
    for (const json& k : all[r]["keys"]) {
      theirs[k["key"].get<std::string>()] = k["pos"].get<std::set<std::string>>();
    }
    std::vector<std::string> missing;
    for (const json& k : all[0]["keys"]) {
      if (merge_keys && k["key"].get<std::string>().rfind("param:", 0) == 0) continue;
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
  if (!missing_msg.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        kOp, " (rank ", rank, ", group ", group->name(),
        "): FSDP currently requires each rank to have at least the optimizer states needed by "
        "rank 0's optimizer but some ranks are missing some of those states",
        missing_msg));
  }

  absl::flat_hash_map<std::string, ParamState> saved;  // FQN -> its full state (to_save)

  // With rank0_only only rank 0 receives the gathered state (when the handle's group is this
  // group, so that its rank 0 is ours). With `on_managed`, which keeps a copy of what it needs
  // right away, each state name's gathers share one buffer.
  std::vector<at::Tensor> gather_buffers;
  auto plan_for = [&](const FlatParamHandle& h, size_t name_index) {
    GatherPlan plan;
    plan.to_root = options.rank0_only && h.group().get() == group.get();
    if (on_managed) {
      if (gather_buffers.size() <= name_index) gather_buffers.resize(name_index + 1);
      plan.reuse = &gather_buffers[name_index];
    }
    return plan;
  };

  // Flat parameters and unmanaged parameters, in rank 0's order (merge_keys: unmanaged ones in
  // this rank's order).
  for (const json& k : all[merge_keys ? static_cast<size_t>(rank) : 0]["keys"]) {
    const int64_t id = key_to_id.at(k["key"].get<std::string>());
    const ParamState& st = *osd.state.Find(ParamKey::Id(id));
    const ParamRole& role = roles[static_cast<size_t>(id)];
    if (role.role == Role::kUnmanaged) {
      if (to_save) saved[role.fqn] = st;
      continue;
    }
    FlatParamHandle& h = *index.handles[role.unit];
    std::vector<ParamState> unflat(h.infos().size());
    size_t name_index = 0;
    for (const json& name_json : k["pos"]) {
      const std::string name = name_json.get<std::string>();
      OPTIM_ASSIGN_OR_RETURN(at::Tensor full,
                             CallTorchOr(kOp,
                                         [&] {
                                           return GatherFlat(h, st.Find(name)->Get<at::Tensor>(),
                                                             name, plan_for(h, name_index));
                                         }),
                             std::string(kOp));
      ++name_index;
      if (!to_save) continue;
      // Views of the gathered buffer, which nothing else holds (no copy); `on_managed` copies
      // what it keeps before the buffer is reused.
      FSDP_RETURN_IF_ERROR(CallTorch(kOp, [&] {
        for (size_t i = 0; i < h.infos().size(); ++i) {
          const FlatParamInfo& info = h.infos()[i];
          unflat[i].Set(name, full.narrow(0, info.offset, info.numel).view(info.shape));
        }
      }));
    }
    if (!to_save) continue;
    const NamesByKind names = SortNames(st);
    for (size_t i = 0; i < h.infos().size(); ++i) {
      for (const auto* list : {&names.zero, &names.other}) {
        for (const std::string& name : *list) unflat[i].Set(name, CopyValue(*st.Find(name)));
      }
      if (on_managed) on_managed(unflat[i]);
      saved[h.infos()[i].fqns[0]] = std::move(unflat[i]);
    }
  }

  // use_orig_params: per unit, the union over ranks of its parameters' states.
  struct OrigParamInfo {
    std::set<std::string> pos_names;
    std::map<std::string, StateValue> scalars;  // from the lowest rank that has them
  };
  struct OrigUnit {
    std::map<std::string, int> pos_dtypes;
    std::map<size_t, OrigParamInfo> params;
  };
  std::map<size_t, OrigUnit> orig_units;
  for (const json& rank_meta : all) {
    for (const json& e : rank_meta["orig"]) {
      OrigUnit& unit = orig_units[e["u"].get<size_t>()];
      OrigParamInfo& p = unit.params[e["i"].get<size_t>()];
      for (const json& s : e["state"]) {
        const std::string name = s["name"].get<std::string>();
        if (s.contains("dtype")) {
          unit.pos_dtypes.emplace(name, s["dtype"].get<int>());
          p.pos_names.insert(name);
        } else {
          p.scalars.emplace(name, FromJson(s["v"]));
        }
      }
    }
  }
  for (auto& [u, unit] : orig_units) {
    FlatParamHandle& h = *index.handles[u];
    size_t name_index = 0;
    for (const auto& [name, dtype] : unit.pos_dtypes) {
      at::Tensor local;
      FSDP_RETURN_IF_ERROR(CallTorch(kOp, [&]() -> absl::Status {
        local = at::zeros({h.sharded() ? h.shard_numel() : h.numel()},
                          at::TensorOptions().dtype(static_cast<at::ScalarType>(dtype)));
        for (size_t i = 0; i < h.params().size(); ++i) {
          auto it = tensor_to_id.find(h.params()[i].unsafeGetTensorImpl());
          if (it == tensor_to_id.end()) continue;
          const ParamState* st = osd.state.Find(ParamKey::Id(it->second));
          const StateValue* v = st == nullptr ? nullptr : st->Find(name);
          if (v == nullptr || !IsPosDimTensor(*v)) continue;
          const ParamShard s = h.ShardOf(i, h.rank());
          const at::Tensor& t = v->Get<at::Tensor>();
          if (t.numel() != s.numel) {
            return absl::InvalidArgumentError(
                absl::StrCat("state '", name, "' of '", h.infos()[i].fqns[0], "' has ", t.numel(),
                             " elements but this rank's slice of the parameter has ", s.numel));
          }
          local.narrow(0, s.shard_offset, s.numel).copy_(t.reshape({-1}));
        }
        return absl::OkStatus();
      }));
      OPTIM_ASSIGN_OR_RETURN(
          at::Tensor full,
          CallTorchOr(kOp, [&] { return GatherFlat(h, local, name, plan_for(h, name_index)); }),
          std::string(kOp));
      ++name_index;
      if (!to_save) continue;
      FSDP_RETURN_IF_ERROR(CallTorch(kOp, [&] {
        for (const auto& [i, p] : unit.params) {
          if (p.pos_names.count(name) == 0) continue;
          const FlatParamInfo& info = h.infos()[i];
          saved[info.fqns[0]].Set(name, full.narrow(0, info.offset, info.numel).view(info.shape));
        }
      }));
    }
    if (!to_save) continue;
    for (const auto& [i, p] : unit.params) {
      ParamState& out = saved[h.infos()[i].fqns[0]];
      for (bool zero : {true, false}) {
        for (const auto& [name, value] : p.scalars) {
          if (IsZeroDimTensor(value) == zero) out.Set(name, CopyValue(value));
        }
      }
      if (on_managed) on_managed(out);
    }
  }

  OptimStateDict result;
  if (!to_save) {
    result.has_param_groups = false;
    return result;
  }
  // State in this rank's ID order; param_groups with FQNs.
  for (size_t id = 0; id < params.size(); ++id) {
    for (const std::string& fqn : FqnsOf(index, roles[id])) {
      auto it = saved.find(fqn);
      if (it != saved.end()) result.state.Set(ParamKey::Fqn(fqn), std::move(it->second));
    }
  }
  result.has_param_groups = osd.has_param_groups;
  for (const ParamGroup& g : osd.param_groups) {
    ParamGroup out;
    out.hyper_params = g.hyper_params;
    for (const ParamKey& key : g.params) {
      for (const std::string& fqn : FqnsOf(index, roles[static_cast<size_t>(key.id())])) {
        out.params.push_back(ParamKey::Fqn(fqn));
      }
    }
    result.param_groups.push_back(std::move(out));
  }
  return result;
}

}  // namespace

absl::StatusOr<OptimStateDict> FullOptimStateDict(FullyShardedDataParallel& fsdp,
                                                  const OptimizerAdapter& adapter,
                                                  const FullOptimStateDictOptions& options) {
  return FullImpl(fsdp, adapter, options, nullptr);
}

absl::StatusOr<OptimStateDict> RekeyFullOptimStateDictToIds(const OptimStateDict& full_osd) {
  constexpr absl::string_view kOp = "RekeyFullOptimStateDictToIds";
  if (!full_osd.has_param_groups) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": the dict has no param_groups"));
  }
  absl::flat_hash_map<std::string, int64_t> ids;
  OptimStateDict out;
  for (const ParamGroup& g : full_osd.param_groups) {
    ParamGroup pg;
    pg.hyper_params = g.hyper_params;
    for (const ParamKey& key : g.params) {
      if (!key.is_fqn()) {
        return absl::InvalidArgumentError(
            absl::StrCat(kOp, ": param_groups list ", key.ToString(), ", not an FQN"));
      }
      const int64_t id = static_cast<int64_t>(ids.size());
      ids.emplace(key.fqn(), id);
      pg.params.push_back(ParamKey::Id(ids.at(key.fqn())));
    }
    out.param_groups.push_back(std::move(pg));
  }
  for (const auto& [key, state] : full_osd.state) {
    if (!key.is_fqn() || !ids.contains(key.fqn())) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, ": state key ", key.ToString(), " is not an FQN of param_groups"));
    }
    out.state.Set(ParamKey::Id(ids.at(key.fqn())), state);
  }
  return out;
}

namespace {

// ---------------------------------------------------------------- flattening a full dict

// One positive-dimension state of a unit before it is cut into shards: its name, dtype and
// each original parameter's tensor (of the parameter's shape; undefined where the parameter
// has no such state, which counts as zeros).
struct PosSource {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<at::Tensor> values;
};

// One unit's state in its flat layout, built from a full dict: `sources` as FlattenUnit
// checked them, then `pos`, this rank's local part of each (LocalPart).
struct UnitFlat {
  bool has_state = false;
  std::vector<PosSource> sources;
  std::vector<std::pair<std::string, at::Tensor>> pos;
  // Flat parameters: the unit's state names in order and its scalar states.
  std::vector<std::string> order;
  ParamState scalars;
  // use_orig_params: per original parameter.
  struct Orig {
    bool present = false;
    std::vector<std::string> order;
    ParamState scalars;
  };
  std::vector<Orig> params;
};

std::string ValuesRepr(const std::vector<const StateValue*>& values) {
  std::vector<std::string> reprs;
  for (const StateValue* v : values) reprs.push_back(DebugString(*v));
  return absl::StrCat("[", absl::StrJoin(reprs, ", "), "]");
}

// Checks each parameter's tensor state `name` (null where absent) against the unit's layout;
// the source its flat tensor is cut from (no copy).
absl::StatusOr<PosSource> CheckTensors(const std::string& name,
                                       const std::vector<const StateValue*>& values,
                                       const FlatParamHandle& h) {
  const std::vector<std::string> fqns = HandleFqns(h);
  std::vector<std::string> dtypes;
  PosSource out;
  out.name = name;
  for (const StateValue* v : values) {
    if (v == nullptr) continue;
    const std::string d = TorchDtype(v->Get<at::Tensor>().scalar_type());
    if (std::find(dtypes.begin(), dtypes.end(), d) == dtypes.end()) dtypes.push_back(d);
    out.dtype = v->Get<at::Tensor>().scalar_type();
  }
  if (dtypes.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "All unflattened parameters comprising a single flat parameter must have "
        "positive-dimension tensor state with the same dtype but got dtypes ",
        PySet(dtypes), " for state ", name, " and unflattened parameter names ", PyList(fqns)));
  }
  for (size_t i = 0; i < values.size(); ++i) {
    const FlatParamInfo& info = h.infos()[i];
    if (values[i] == nullptr) {
      if (info.shape.empty()) {
        return absl::InvalidArgumentError("Flattening a zero-dimension parameter is not supported");
      }
      out.values.emplace_back();
      continue;
    }
    const at::Tensor& t = values[i]->Get<at::Tensor>();
    if (t.sizes() != at::IntArrayRef(info.shape)) {
      return absl::InvalidArgumentError(
          absl::StrCat("Tensor optimizer state does not have same shape as its parameter: ",
                       TorchSize(t.sizes()), " ", TorchSize(info.shape)));
    }
    out.values.push_back(t);
  }
  return out;
}

absl::StatusOr<UnitFlat> FlattenUnit(const OrderedMap<ParamKey, ParamState>& full_state,
                                     const FlatParamHandle& h) {
  const std::vector<std::string> fqns = HandleFqns(h);
  std::vector<const ParamState*> states;
  bool any = false;
  for (const std::string& fqn : fqns) {
    states.push_back(full_state.Find(ParamKey::Fqn(fqn)));
    any = any || states.back() != nullptr;
  }
  UnitFlat out;
  if (!any) return out;
  out.has_state = true;

  if (h.use_orig_params()) {
    out.params.resize(fqns.size());
    std::vector<std::string> pos_names;  // first-seen order
    for (size_t i = 0; i < states.size(); ++i) {
      if (states[i] == nullptr) continue;
      UnitFlat::Orig& p = out.params[i];
      p.present = true;
      for (const auto& [name, value] : *states[i]) {
        p.order.push_back(name);
        if (IsPosDimTensor(value)) {
          if (std::find(pos_names.begin(), pos_names.end(), name) == pos_names.end()) {
            pos_names.push_back(name);
          }
        } else {
          p.scalars.Set(name, value);
        }
      }
    }
    for (const std::string& name : pos_names) {
      std::vector<const StateValue*> values;
      for (const ParamState* st : states) {
        const StateValue* v = st == nullptr ? nullptr : st->Find(name);
        values.push_back(v != nullptr && IsPosDimTensor(*v) ? v : nullptr);
      }
      FSDP_ASSIGN_OR_RETURN(PosSource source, CheckTensors(name, values, h));
      out.sources.push_back(std::move(source));
    }
    return out;
  }

  // Flat parameter: every original parameter with state has the same state names.
  const ParamState* first = nullptr;
  for (const ParamState* st : states) {
    if (st == nullptr) continue;
    if (first == nullptr) {
      first = st;
      continue;
    }
    std::set<std::string> a, b;
    for (const auto& e : *first) a.insert(e.first);
    for (const auto& e : *st) b.insert(e.first);
    if (a != b) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Differing optimizer state names for the unflattened parameters: ", PyList(fqns)));
    }
  }
  for (const auto& entry : *first) {
    const std::string& name = entry.first;
    out.order.push_back(name);
    std::vector<const StateValue*> values, non_null;
    for (const ParamState* st : states) {
      values.push_back(st == nullptr ? nullptr : st->Find(name));
      if (values.back() != nullptr) non_null.push_back(values.back());
    }
    bool pos = true, zero = true, non_tensor = true;
    std::set<std::string> types;
    for (const StateValue* v : non_null) {
      pos = pos && IsPosDimTensor(*v);
      zero = zero && IsZeroDimTensor(*v);
      non_tensor = non_tensor && !v->Is<at::Tensor>();
      types.insert(v->TypeName());
    }
    if (types.size() != 1 || !(pos || zero || non_tensor)) {
      return absl::InvalidArgumentError(
          absl::StrCat("Differing optimizer state types for state ", name, ", values ",
                       ValuesRepr(non_null), ", and unflattened parameter names ", PyList(fqns)));
    }
    if (pos) {
      FSDP_ASSIGN_OR_RETURN(PosSource source, CheckTensors(name, values, h));
      out.sources.push_back(std::move(source));
    } else if (zero) {
      std::vector<std::string> value_reprs, dtype_reprs;
      auto add = [](std::vector<std::string>& set, std::string s) {
        if (std::find(set.begin(), set.end(), s) == set.end()) set.push_back(std::move(s));
      };
      for (const StateValue* v : values) {
        add(value_reprs, v == nullptr ? "None" : ItemRepr(v->Get<at::Tensor>()));
        add(dtype_reprs, v == nullptr ? "None" : TorchDtype(v->Get<at::Tensor>().scalar_type()));
      }
      if (non_null.size() != values.size() || value_reprs.size() != 1 || dtype_reprs.size() != 1) {
        return absl::InvalidArgumentError(absl::StrCat(
            "All unflattened parameters comprising a single flat parameter must have scalar "
            "state with the same value and dtype but got values ",
            PySet(value_reprs), " and dtypes ", PySet(dtype_reprs), " for state ", name,
            " and unflattened parameter names ", PyList(fqns)));
      }
      out.scalars.Set(name, StateValue(non_null[0]->Get<at::Tensor>().to(at::kCPU).clone()));
    } else {
      std::vector<std::string> value_reprs;
      bool same = non_null.size() == values.size();
      for (const StateValue* v : values) {
        const std::string r = v == nullptr ? "None" : DebugString(*v);
        if (std::find(value_reprs.begin(), value_reprs.end(), r) == value_reprs.end()) {
          value_reprs.push_back(r);
        }
        if (v != nullptr && !(*v == *non_null[0])) same = false;
      }
      if (!same) {
        return absl::InvalidArgumentError(absl::StrCat(
            "All unflattened parameters comprising a single flat parameter must have scalar "
            "state with the same value and dtype but got values ",
            PySet(value_reprs), " for state ", name, " and  unflattened parameter names ",
            PyList(fqns)));
      }
      out.scalars.Set(name, *non_null[0]);
    }
  }
  return out;
}

// FlattenShardedOptimStateDict's stand-ins: elements [begin, begin + data.numel()) of an
// original parameter's flattened state, this rank's part of it, already cut out of the
// gathered pieces. Keyed by the stand-in tensor of the parameter's shape that the full dict
// holds in its place (its values are not read).
struct PartialState {
  int64_t begin = 0;
  at::Tensor data;
  // The unit's local part that `data` is a view of (already zero outside the parameters'
  // parts), which LocalPart then fills in place; undefined if `data` stands alone.
  at::Tensor local_part;
};
using PartialStates = absl::flat_hash_map<const c10::TensorImpl*, PartialState>;

// Zeros the elements of the 1-D `t` outside the given (offset, numel) ranges.
void ZeroOutside(const at::Tensor& t, std::vector<std::pair<int64_t, int64_t>> ranges) {
  std::sort(ranges.begin(), ranges.end());
  int64_t next = 0;
  for (const auto& [offset, numel] : ranges) {
    if (offset > next) t.narrow(0, next, offset - next).zero_();
    next = std::max(next, offset + numel);
  }
  if (next < t.numel()) t.narrow(0, next, t.numel() - next).zero_();
}

// Rank `rank`'s part of a unit's flat state: its padded shard, or the whole unpadded flat
// tensor without sharding. Copies into `out` (allocated if undefined) only the part of each
// parameter's state that lies in that shard, then zeros the rest (padding, parameters without
// state, gaps): the unit's whole flat tensor is never built.
at::Tensor LocalPart(const PosSource& source, const FlatParamHandle& h, int rank,
                     const PartialStates* partial, at::Tensor out = at::Tensor()) {
  const int64_t size = h.sharded() ? h.shard_numel() : h.numel();
  if (!out.defined() && partial != nullptr) {
    for (const at::Tensor& t : source.values) {
      auto it = t.defined() ? partial->find(t.unsafeGetTensorImpl()) : partial->end();
      if (it == partial->end()) continue;
      const at::Tensor& ready = it->second.local_part;
      if (ready.defined() && ready.numel() == size && ready.scalar_type() == source.dtype) {
        out = ready;
      }
      break;
    }
  }
  if (!out.defined()) out = at::empty({size}, at::TensorOptions().dtype(source.dtype));
  std::vector<std::pair<int64_t, int64_t>> written;  // (offset, numel) in the shard
  for (size_t i = 0; i < source.values.size(); ++i) {
    const at::Tensor& t = source.values[i];
    if (!t.defined()) continue;
    const ParamShard s = h.ShardOf(i, rank);
    if (s.numel == 0) continue;
    at::Tensor dst = out.narrow(0, s.shard_offset, s.numel);
    const PartialState* p = nullptr;
    if (partial != nullptr) {
      auto it = partial->find(t.unsafeGetTensorImpl());
      if (it != partial->end()) p = &it->second;
    }
    if (p != nullptr) {
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

// The dict this rank's optimizer loads, from its units' local parts (`units`, by unit
// index), unmanaged parameters' states (by FQN) and FQN-keyed param groups.
absl::StatusOr<OptimStateDict> BuildLocalDict(
    const ModelIndex& index, const std::vector<ParamRole>& roles,
    const std::vector<UnitFlat>& units,
    const absl::flat_hash_map<std::string, ParamState>& unmanaged,
    const std::vector<ParamGroup>& param_groups, bool has_param_groups, absl::string_view op) {
  OptimStateDict out;
  absl::flat_hash_map<std::string, int64_t> fqn_to_id;
  for (size_t id = 0; id < roles.size(); ++id) {
    const ParamRole& role = roles[id];
    for (const std::string& fqn : FqnsOf(index, role)) fqn_to_id.emplace(fqn, id);
    const ParamKey key = ParamKey::Id(static_cast<int64_t>(id));
    if (role.role == Role::kUnmanaged) {
      auto it = unmanaged.find(role.fqn);
      if (it == unmanaged.end()) continue;
      ParamState st;
      for (const auto& [name, value] : it->second) st.Set(name, CloneStateValue(value));
      out.state.Set(key, std::move(st));
      continue;
    }
    const UnitFlat& unit = units[role.unit];
    if (!unit.has_state) continue;
    auto find_pos = [&unit](const std::string& name) -> const at::Tensor* {
      for (const auto& [n, t] : unit.pos) {
        if (n == name) return &t;
      }
      return nullptr;
    };
    ParamState st;
    if (role.role == Role::kFlat) {
      for (const std::string& name : unit.order) {
        const at::Tensor* t = find_pos(name);
        st.Set(name, t != nullptr ? StateValue(*t) : CloneStateValue(*unit.scalars.Find(name)));
      }
    } else {
      const UnitFlat::Orig& p = unit.params[role.index];
      if (!p.present) continue;
      const FlatParamHandle& h = *index.handles[role.unit];
      const ParamShard s = h.ShardOf(role.index, h.rank());
      if (h.sharded() && s.numel == 0) continue;  // such a slice gets no gradient, no state
      for (const std::string& name : p.order) {
        const at::Tensor* t = find_pos(name);
        if (t != nullptr) {
          at::Tensor slice = t->narrow(0, s.shard_offset, s.numel).clone();
          if (!h.sharded()) slice = slice.view(h.infos()[role.index].shape);
          st.Set(name, StateValue(slice));
        } else if (const StateValue* v = p.scalars.Find(name)) {
          st.Set(name, CloneStateValue(*v));
        }
      }
    }
    out.state.Set(key, std::move(st));
  }
  out.has_param_groups = has_param_groups;
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
    out.param_groups.push_back(std::move(pg));
  }
  return out;
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

}  // namespace

namespace {

// ShardFullOptimStateDict under the name `kOp`.
// `params`: the optimizer's parameters in ID order.
// `partial`: FlattenShardedOptimStateDict's stand-ins in `full_osd` (null: none).
absl::StatusOr<OptimStateDict> ShardFullImpl(const OptimStateDict& full_osd,
                                             FullyShardedDataParallel& fsdp,
                                             const std::vector<at::Tensor>& params,
                                             absl::string_view kOp,
                                             const PartialStates* partial = nullptr) {
  FSDP_RETURN_IF_ERROR(CheckFqnKeyed(full_osd, kOp));
  const ModelIndex index = IndexModel(fsdp);
  FSDP_ASSIGN_OR_RETURN(std::vector<ParamRole> roles, RolesOf(index, params, kOp));
  std::vector<UnitFlat> units(index.handles.size());
  std::vector<bool> needed(index.handles.size(), false);
  for (const ParamRole& role : roles) {
    if (role.role != Role::kUnmanaged) needed[role.unit] = true;
  }
  for (size_t u = 0; u < units.size(); ++u) {
    if (!needed[u]) continue;
    const FlatParamHandle& h = *index.handles[u];
    auto flat = CallTorchOr(kOp, [&] { return FlattenUnit(full_osd.state, h); });
    if (!flat.ok()) {
      return absl::Status(flat.status().code(), absl::StrCat(kOp, ": ", flat.status().message()));
    }
    units[u] = *std::move(flat);
    FSDP_RETURN_IF_ERROR(CallTorch(kOp, [&] {
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
  return CallTorchOr(kOp, [&] {
    return BuildLocalDict(index, roles, units, unmanaged, full_osd.param_groups,
                          full_osd.has_param_groups, kOp);
  });
}

}  // namespace

absl::StatusOr<OptimStateDict> ShardFullOptimStateDict(const OptimStateDict& full_osd,
                                                       FullyShardedDataParallel& fsdp,
                                                       const OptimizerAdapter& adapter) {
  return ShardFullImpl(full_osd, fsdp, OptimizerParams(adapter), "ShardFullOptimStateDict");
}

absl::StatusOr<OptimStateDict> ShardFullOptimStateDict(const OptimStateDict& full_osd,
                                                       FullyShardedDataParallel& fsdp,
                                                       const OptimInput& optim_input) {
  constexpr absl::string_view kOp = "ShardFullOptimStateDict";
  WarnOptimInputDeprecated();
  FSDP_RETURN_IF_ERROR(CheckOptimInput(optim_input, kOp));
  return ShardFullImpl(full_osd, fsdp, optim_input.Params(), kOp);
}

absl::StatusOr<OptimStateDict> ShardFullOptimStateDict(const OptimStateDict& full_osd,
                                                       FullyShardedDataParallel& fsdp) {
  return ShardFullImpl(full_osd, fsdp, fsdp.parameters(), "ShardFullOptimStateDict");
}

namespace {

// Rank 0's side of the scatter: everything but positive-dimension tensors as one object.
absl::StatusOr<json> ScatterMetadata(const OptimStateDict& full_osd, const ModelIndex& index,
                                     std::vector<UnitFlat>& units,
                                     std::vector<ParamState>& unmanaged_states) {
  constexpr absl::string_view kOp = "ScatterFullOptimStateDict";
  FSDP_RETURN_IF_ERROR(CheckFqnKeyed(full_osd, kOp));
  json meta;
  json units_json = json::array();
  for (size_t u = 0; u < index.handles.size(); ++u) {
    const FlatParamHandle& h = *index.handles[u];
    auto flat = CallTorchOr(kOp, [&] { return FlattenUnit(full_osd.state, h); });
    if (!flat.ok()) {
      return absl::Status(flat.status().code(), absl::StrCat(kOp, ": ", flat.status().message()));
    }
    units[u] = *std::move(flat);
    const UnitFlat& unit = units[u];
    json pos = json::array();
    for (const PosSource& source : unit.sources) {
      pos.push_back(json{{"name", source.name}, {"dtype", static_cast<int>(source.dtype)}});
    }
    OPTIM_ASSIGN_OR_RETURN(json scalars, ParamStateToJson(unit.scalars), std::string(kOp));
    json params = json::array();
    for (const UnitFlat::Orig& p : unit.params) {
      OPTIM_ASSIGN_OR_RETURN(json ps, ParamStateToJson(p.scalars), std::string(kOp));
      params.push_back(
          json{{"present", p.present}, {"order", p.order}, {"scalars", std::move(ps)}});
    }
    units_json.push_back(json{{"has", unit.has_state},
                              {"order", unit.order},
                              {"pos", std::move(pos)},
                              {"scalars", std::move(scalars)},
                              {"params", std::move(params)}});
  }
  meta["units"] = std::move(units_json);
  json unmanaged = json::array();
  for (const auto& [fqn, t] : index.unmanaged) {
    const ParamState* st = full_osd.state.Find(ParamKey::Fqn(fqn));
    if (st == nullptr) continue;
    unmanaged_states.push_back(*st);
    json entries = json::array();
    for (const auto& [name, value] : *st) {
      if (IsPosDimTensor(value)) {
        const at::Tensor& v = value.Get<at::Tensor>();
        entries.push_back(json{{"name", name},
                               {"dtype", static_cast<int>(v.scalar_type())},
                               {"shape", v.sizes().vec()}});
      } else {
        OPTIM_ASSIGN_OR_RETURN(json v, ToJson(value),
                               absl::StrCat(kOp, ": state '", name, "' of '", fqn, "'"));
        entries.push_back(json{{"name", name}, {"v", std::move(v)}});
      }
    }
    unmanaged.push_back(json{{"fqn", fqn}, {"state", std::move(entries)}});
  }
  meta["unmanaged"] = std::move(unmanaged);
  meta["has_param_groups"] = full_osd.has_param_groups;
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
  meta["param_groups"] = std::move(groups);
  return meta;
}

absl::StatusOr<OptimStateDict> ScatterImpl(const OptimStateDict& full_osd,
                                           FullyShardedDataParallel& fsdp,
                                           const std::vector<at::Tensor>& params,
                                           absl::Status input_status,
                                           std::shared_ptr<comm::ProcessGroup> group) {
  constexpr absl::string_view kOp = "ScatterFullOptimStateDict";
  if (group == nullptr) group = fsdp.group();
  const int rank = group->rank();
  const std::string where = absl::StrCat(" (rank ", rank, ", group ", group->name(), ")");
  const ModelIndex index = IndexModel(fsdp);
  // Roles are checked after the broadcast so that every rank takes part in it.
  absl::StatusOr<std::vector<ParamRole>> roles =
      input_status.ok() ? RolesOf(index, params, kOp)
                        : absl::StatusOr<std::vector<ParamRole>>(input_status);

  std::vector<UnitFlat> units(index.handles.size());
  std::vector<ParamState> unmanaged_full;  // rank 0
  std::string bytes;
  if (rank == 0) {
    absl::StatusOr<json> meta = ScatterMetadata(full_osd, index, units, unmanaged_full);
    if (!meta.ok()) {
      bytes = json{{"error", std::string(meta.status().message())},
                   {"code", static_cast<int>(meta.status().code())}}
                  .dump();
    } else {
      bytes = meta->dump();
    }
  }
  OPTIM_ASSIGN_OR_RETURN(std::string received, group->BroadcastObject(bytes, 0),
                         absl::StrCat(kOp, where, ": broadcasting metadata"));
  OPTIM_ASSIGN_OR_RETURN(json meta, Parse(received), std::string(kOp));
  if (meta.contains("error")) {
    return absl::Status(static_cast<absl::StatusCode>(meta["code"].get<int>()),
                        absl::StrCat("rank 0: ", meta["error"].get<std::string>()));
  }
  if (!roles.ok()) return roles.status();

  // Positive-dimension state of units: rank 0 sends each rank its shard.
  const json& units_json = meta["units"];
  at::Tensor send_buffer;  // rank 0
  for (size_t u = 0; u < index.handles.size(); ++u) {
    FlatParamHandle& h = *index.handles[u];
    const json& uj = units_json[u];
    UnitFlat& unit = units[u];
    if (rank != 0) {
      unit.has_state = uj["has"].get<bool>();
      unit.order = uj["order"].get<std::vector<std::string>>();
      unit.scalars = ParamStateFromJson(uj["scalars"]);
      for (const json& p : uj["params"]) {
        unit.params.push_back(UnitFlat::Orig{p["present"].get<bool>(),
                                             p["order"].get<std::vector<std::string>>(),
                                             ParamStateFromJson(p["scalars"])});
      }
    }
    for (size_t k = 0; k < uj["pos"].size(); ++k) {
      const std::string name = uj["pos"][k]["name"].get<std::string>();
      const auto dtype = static_cast<at::ScalarType>(uj["pos"][k]["dtype"].get<int>());
      const std::string context = absl::StrCat(kOp, where, ": sending optimizer state '", name,
                                               "' of flat parameter [", h.Describe(), "]");
      const auto opts = at::TensorOptions().dtype(dtype);
      at::Tensor mine;
      if (!h.sharded()) {
        FSDP_RETURN_IF_ERROR(CallTorch(context, [&] {
          mine =
              rank == 0 ? LocalPart(unit.sources[k], h, 0, nullptr) : at::empty({h.numel()}, opts);
        }));
        FSDP_RETURN_IF_ERROR(group->Broadcast(mine, 0), context);
      } else {
        // A scatter: rank 0 cuts each rank's shard (into one reused buffer) and sends it to
        // that rank only (point to point, in rank order; every rank walks the same units and
        // states, so the pairs match up).
        constexpr int kScatterTag = 0x5CA7;
        if (rank == 0) {
          for (int target = 1; target < group->size(); ++target) {
            at::Tensor shard;
            FSDP_RETURN_IF_ERROR(CallTorch(context, [&] {
              shard = LocalPart(unit.sources[k], h, target, nullptr,
                                ReuseBuffer(send_buffer, h.shard_numel(), dtype));
            }));
            FSDP_RETURN_IF_ERROR(group->Send(shard, target, kScatterTag),
                                 absl::StrCat(context, " to rank ", target));
          }
          FSDP_RETURN_IF_ERROR(
              CallTorch(context, [&] { mine = LocalPart(unit.sources[k], h, 0, nullptr); }));
        } else {
          mine = at::empty({h.shard_numel()}, opts);
          FSDP_RETURN_IF_ERROR(group->Recv(mine, 0, kScatterTag), context);
        }
      }
      unit.pos.emplace_back(name, mine);
    }
  }

  // Unmanaged parameters: every rank gets the whole state.
  absl::flat_hash_map<std::string, ParamState> unmanaged;
  size_t j = 0;
  for (const json& e : meta["unmanaged"]) {
    const std::string fqn = e["fqn"].get<std::string>();
    ParamState st;
    for (const json& s : e["state"]) {
      const std::string name = s["name"].get<std::string>();
      if (!s.contains("dtype")) {
        st.Set(name, FromJson(s["v"]));
        continue;
      }
      at::Tensor t =
          rank == 0
              ? unmanaged_full[j].Find(name)->Get<at::Tensor>().contiguous().clone()
              : at::empty(
                    s["shape"].get<std::vector<int64_t>>(),
                    at::TensorOptions().dtype(static_cast<at::ScalarType>(s["dtype"].get<int>())));
      FSDP_RETURN_IF_ERROR(
          group->Broadcast(t, 0),
          absl::StrCat(kOp, where, ": sending optimizer state '", name, "' of '", fqn, "'"));
      st.Set(name, StateValue(t));
    }
    unmanaged[fqn] = std::move(st);
    ++j;
  }

  std::vector<ParamGroup> groups;
  for (const json& g : meta["param_groups"]) {
    ParamGroup pg;
    pg.hyper_params = ParamStateFromJson(g["hyper"]);
    for (const json& fqn : g["params"]) pg.params.push_back(ParamKey::Fqn(fqn.get<std::string>()));
    groups.push_back(std::move(pg));
  }
  return CallTorchOr(kOp, [&] {
    return BuildLocalDict(index, *roles, units, unmanaged, groups,
                          meta["has_param_groups"].get<bool>(), kOp);
  });
}

}  // namespace

absl::StatusOr<OptimStateDict> ScatterFullOptimStateDict(
    const OptimStateDict& full_osd, FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    std::shared_ptr<comm::ProcessGroup> group) {
  return ScatterImpl(full_osd, fsdp, OptimizerParams(adapter), absl::OkStatus(), std::move(group));
}

absl::StatusOr<OptimStateDict> ScatterFullOptimStateDict(
    const OptimStateDict& full_osd, FullyShardedDataParallel& fsdp, const OptimInput& optim_input,
    std::shared_ptr<comm::ProcessGroup> group) {
  WarnOptimInputDeprecated();
  return ScatterImpl(full_osd, fsdp, optim_input.Params(),
                     CheckOptimInput(optim_input, "ScatterFullOptimStateDict"), std::move(group));
}

absl::StatusOr<OptimStateDict> ShardedOptimStateDict(FullyShardedDataParallel& fsdp,
                                                     const OptimizerAdapter& adapter,
                                                     std::shared_ptr<comm::ProcessGroup> group,
                                                     const OptimStateDict* optim_state_dict) {
  constexpr absl::string_view kOp = "ShardedOptimStateDict";
  if (group == nullptr) group = fsdp.group();
  const int64_t rank = group->rank();
  const int64_t world_size = group->size();
  // torch.chunk along dim 0, as 1.13's _create_chunk_sharded_tensor.
  auto chunk_state = [rank, world_size](ParamState& state) {
    ParamState chunked;
    for (const auto& [name, value] : state) {
      if (!IsPosDimTensor(value)) {
        chunked.Set(name, value);
        continue;
      }
      const at::Tensor& t = value.Get<at::Tensor>();
      const int64_t dim0 = t.size(0);
      const int64_t chunk = (dim0 + world_size - 1) / world_size;
      const int64_t begin = std::min(dim0, chunk * rank);
      const int64_t end = std::min(dim0, begin + chunk);
      ShardedTensorValue sharded;
      sharded.local = t.narrow(0, begin, end - begin).clone();
      sharded.global_shape = t.sizes().vec();
      sharded.offsets.assign(t.dim(), 0);
      sharded.offsets[0] = begin;
      chunked.Set(name, StateValue(std::move(sharded)));
    }
    state = std::move(chunked);
  };
  absl::StatusOr<OptimStateDict> dict = CallTorchOr(kOp, [&] {
    return FullImpl(fsdp, adapter,
                    {.rank0_only = false, .group = group, .optim_state_dict = optim_state_dict},
                    chunk_state);
  });
  if (!dict.ok()) return ::fsdp::Annotate(dict.status(), kOp);
  return dict;
}

absl::StatusOr<OptimStateDict> FlattenShardedOptimStateDict(
    const OptimStateDict& sharded_osd, FullyShardedDataParallel& fsdp,
    const OptimizerAdapter& adapter, std::shared_ptr<comm::ProcessGroup> group) {
  constexpr absl::string_view kOp = "FlattenShardedOptimStateDict";
  if (group == nullptr) group = fsdp.group();
  const int rank = group->rank();
  const std::string where = absl::StrCat(" (rank ", rank, ", group ", group->name(), ")");
  FSDP_RETURN_IF_ERROR(CheckFqnKeyed(sharded_osd, kOp));
  const ModelIndex index = IndexModel(fsdp);

  // Groups of parameters whose sharded states are gathered together: each unit (its original
  // parameters), then each parameter FSDP does not manage here (a dict saved under another
  // wrapping may hold it sharded; it is loaded whole, as this model keeps it).
  const size_t num_units = index.handles.size();
  auto group_fqns = [&index, num_units](size_t u) -> std::vector<std::string> {
    if (u < num_units) return HandleFqns(*index.handles[u]);
    return {index.unmanaged[u - num_units].first};
  };
  auto describe = [&index, num_units](size_t u) -> std::string {
    if (u < num_units) return absl::StrCat("flat parameter [", index.handles[u]->Describe(), "]");
    return absl::StrCat("unmanaged parameter '", index.unmanaged[u - num_units].first, "'");
  };
  // This rank's pieces of the sharded states, per group.
  json pieces = json::array();
  for (size_t u = 0; u < num_units + index.unmanaged.size(); ++u) {
    const std::vector<std::string> fqns = group_fqns(u);
    for (size_t i = 0; i < fqns.size(); ++i) {
      const ParamState* st = sharded_osd.state.Find(ParamKey::Fqn(fqns[i]));
      if (st == nullptr) continue;
      for (const auto& [name, value] : *st) {
        const ShardedTensorValue* v = value.GetIf<ShardedTensorValue>();
        if (v == nullptr) continue;
        if (v->offsets.size() != v->global_shape.size() ||
            v->local.dim() != static_cast<int64_t>(v->global_shape.size())) {
          return absl::InvalidArgumentError(
              absl::StrCat(kOp, where, ": state '", name, "' of '", fqns[i],
                           "' is a sharded tensor whose local shard, offsets and global shape "
                           "disagree in rank"));
        }
        for (size_t d = 0; d < v->offsets.size(); ++d) {
          if (v->offsets[d] < 0 || v->offsets[d] + v->local.size(d) > v->global_shape[d]) {
            return absl::InvalidArgumentError(
                absl::StrCat(kOp, where, ": state '", name, "' of '", fqns[i],
                             "': the local shard lies outside the global shape"));
          }
        }
        pieces.push_back(json{{"u", u},
                              {"i", i},
                              {"name", name},
                              {"dtype", static_cast<int>(v->local.scalar_type())},
                              {"global", v->global_shape},
                              {"offsets", v->offsets},
                              {"local", v->local.sizes().vec()}});
      }
    }
  }
  OPTIM_ASSIGN_OR_RETURN(std::vector<std::string> all_bytes, group->AllGatherObject(pieces.dump()),
                         absl::StrCat(kOp, where, ": exchanging shard metadata"));
  std::vector<json> all;
  for (const std::string& bytes : all_bytes) {
    OPTIM_ASSIGN_OR_RETURN(json j, Parse(bytes), std::string(kOp));
    all.push_back(std::move(j));
  }

  // Per (unit, state name), in sorted order on every rank: one all-gather of every rank's
  // pieces, packed and padded to the largest rank's total.
  std::map<std::pair<size_t, std::string>, std::vector<std::vector<json>>> groups;
  for (size_t r = 0; r < all.size(); ++r) {
    for (const json& p : all[r]) {
      auto& per_rank = groups[{p["u"].get<size_t>(), p["name"].get<std::string>()}];
      per_rank.resize(all.size());
      per_rank[r].push_back(p);
    }
  }
  OrderedMap<ParamKey, ParamState> state = sharded_osd.state;
  // Each managed parameter's gathered state becomes a stand-in of its shape in `state` and
  // this rank's part of it in `partial`: the gathered buffer is unpacked straight into the
  // parts this rank's shard needs, and no parameter's full tensor is built (except for pieces
  // that are not whole rows, below). Both buffers are reused across states.
  PartialStates partial;
  at::Tensor send_buffer, gather_buffer;
  for (const auto& [unit_and_name, per_rank] : groups) {
    const auto& [u, name] = unit_and_name;
    const std::vector<std::string> fqns = group_fqns(u);
    auto numel_of = [](const json& p) {
      int64_t n = 1;
      for (const json& d : p["local"]) n *= d.get<int64_t>();
      return n;
    };
    int64_t max_total = 0;
    at::ScalarType dtype = at::kFloat;
    for (const auto& rank_pieces : per_rank) {
      int64_t total = 0;
      for (const json& p : rank_pieces) {
        total += numel_of(p);
        dtype = static_cast<at::ScalarType>(p["dtype"].get<int>());
      }
      max_total = std::max(max_total, total);
    }
    const auto opts = at::TensorOptions().dtype(dtype);
    at::Tensor gathered;
    FSDP_RETURN_IF_ERROR(
        CallTorch(
            kOp,
            [&]() -> absl::Status {
              at::Tensor mine = ReuseBuffer(send_buffer, max_total, dtype);
              int64_t off = 0;
              for (const json& p : per_rank[static_cast<size_t>(rank)]) {
                const std::string& fqn = fqns[p["i"].get<size_t>()];
                const at::Tensor& local =
                    state.Find(ParamKey::Fqn(fqn))->Find(name)->Get<ShardedTensorValue>().local;
                if (local.scalar_type() != dtype) {
                  return absl::InvalidArgumentError(
                      absl::StrCat("state '", name, "' of the ", describe(u),
                                   " has sharded tensors of different dtypes"));
                }
                const int64_t n = local.numel();
                mine.narrow(0, off, n).copy_(local.reshape({-1}));
                off += n;
              }
              if (off < max_total) mine.narrow(0, off, max_total - off).zero_();
              gathered = ReuseBuffer(gather_buffer,
                                     max_total * static_cast<int64_t>(per_rank.size()), dtype);
              FSDP_RETURN_IF_ERROR(group->AllGatherIntoTensor(gathered, mine));
              return absl::OkStatus();
            }),
        absl::StrCat(kOp, where, ": gathering state '", name, "' of ", describe(u)));
    // Each parameter's pieces, in rank order (a later piece overwrites an earlier one).
    struct Piece {
      const json* meta;
      int64_t gathered_offset;
    };
    std::map<size_t, std::vector<Piece>> by_param;
    for (size_t r = 0; r < per_rank.size(); ++r) {
      int64_t off = static_cast<int64_t>(r) * max_total;
      for (const json& p : per_rank[r]) {
        by_param[p["i"].get<size_t>()].push_back(Piece{&p, off});
        off += numel_of(p);
      }
    }
    FSDP_RETURN_IF_ERROR(CallTorch(kOp, [&] {
      at::Tensor local_part;  // this (unit, state)'s, once a parameter needs it
      for (const auto& [i, pieces] : by_param) {
        ParamState* param_state = state.Find(ParamKey::Fqn(fqns[i]));
        if (param_state == nullptr) continue;  // this rank's dict has no state for it
        const auto global = (*pieces[0].meta)["global"].get<std::vector<int64_t>>();
        // A piece of whole rows (offsets and sizes beyond dimension 0 span the parameter, as
        // ShardedOptimStateDict's chunks do) is one range of the flattened parameter.
        bool rows = u < num_units;
        for (const Piece& piece : pieces) {
          const auto local_shape = (*piece.meta)["local"].get<std::vector<int64_t>>();
          const auto offsets = (*piece.meta)["offsets"].get<std::vector<int64_t>>();
          rows = rows && local_shape.size() == global.size() && !global.empty() &&
                 (*piece.meta)["global"].get<std::vector<int64_t>>() == global;
          for (size_t d = 1; rows && d < global.size(); ++d) {
            rows = offsets[d] == 0 && local_shape[d] == global[d];
          }
        }
        if (rows) {
          const FlatParamHandle& h = *index.handles[u];
          int64_t row_numel = 1;
          for (size_t d = 1; d < global.size(); ++d) row_numel *= global[d];
          const ParamShard s = h.ShardOf(i, h.rank());
          // Straight into this rank's local part of the unit, where LocalPart will want it.
          if (!local_part.defined()) {
            local_part = at::empty({h.sharded() ? h.shard_numel() : h.numel()}, opts);
          }
          PartialState part{s.param_offset, local_part.narrow(0, s.shard_offset, s.numel),
                            local_part};
          std::vector<std::pair<int64_t, int64_t>> copied;  // (offset, numel) in part.data
          for (const Piece& piece : pieces) {
            const int64_t begin = (*piece.meta)["offsets"][0].get<int64_t>() * row_numel;
            const int64_t n = numel_of(*piece.meta);
            const int64_t lo = std::max(begin, s.param_offset);
            const int64_t hi = std::min(begin + n, s.param_offset + s.numel);
            if (hi <= lo) continue;
            part.data.narrow(0, lo - s.param_offset, hi - lo)
                .copy_(gathered.narrow(0, piece.gathered_offset + lo - begin, hi - lo));
            copied.emplace_back(lo - s.param_offset, hi - lo);
          }
          ZeroOutside(part.data, std::move(copied));
          // The stand-in: the parameter's shape and dtype, one element of storage.
          at::Tensor stand_in = at::zeros({1}, opts).expand(global);
          partial.emplace(stand_in.unsafeGetTensorImpl(), std::move(part));
          param_state->Set(name, StateValue(std::move(stand_in)));
          continue;
        }
        // Other pieces (or an unmanaged parameter's state, loaded whole): the full tensor.
        at::Tensor full = at::zeros(global, opts);
        for (const Piece& piece : pieces) {
          const auto local_shape = (*piece.meta)["local"].get<std::vector<int64_t>>();
          const auto offsets = (*piece.meta)["offsets"].get<std::vector<int64_t>>();
          at::Tensor region = full;
          for (size_t d = 0; d < offsets.size(); ++d) {
            region = region.narrow(static_cast<int64_t>(d), offsets[d], local_shape[d]);
          }
          region.copy_(
              gathered.narrow(0, piece.gathered_offset, numel_of(*piece.meta)).view(local_shape));
        }
        param_state->Set(name, StateValue(std::move(full)));
      }
    }));
  }
  OptimStateDict full_osd;
  full_osd.state = std::move(state);
  full_osd.param_groups = sharded_osd.param_groups;
  full_osd.has_param_groups = sharded_osd.has_param_groups;
  return ShardFullImpl(full_osd, fsdp, OptimizerParams(adapter), kOp, &partial);
}

}  // namespace fsdp::optim_state
