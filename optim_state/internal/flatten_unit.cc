#include "optim_state/internal/flatten_unit.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"
#include "optim_state/internal/model_index.h"
#include "optim_state/internal/py_repr.h"
#include "optim_state/internal/state_metadata.h"
#include "optim_state/internal/status_context.h"

namespace fsdp::optim_state::internal {
namespace {

// Appends `s` to `set` unless it is there (first-seen order, as Python's set reprs here).
void AddOnce(std::vector<std::string>& set, std::string s) {
  if (std::find(set.begin(), set.end(), s) == set.end()) set.push_back(std::move(s));
}

// Checks each parameter's tensor state `name` (null where absent) against the unit's layout;
// the source its flat tensor is cut from (no copy).
absl::StatusOr<PosSource> CheckTensors(const std::string& name,
                                       const std::vector<const StateValue*>& values,
                                       const FlatParamHandle& h) {
  // Distinct dtypes in first-seen order; their reprs are written only for the error.
  std::vector<at::ScalarType> seen;
  PosSource out;
  out.name = name;
  for (const StateValue* v : values) {
    if (v == nullptr) continue;
    out.dtype = v->Get<at::Tensor>().scalar_type();
    if (std::find(seen.begin(), seen.end(), out.dtype) == seen.end()) seen.push_back(out.dtype);
  }
  if (seen.size() != 1) {
    std::vector<std::string> dtypes;
    for (at::ScalarType t : seen) dtypes.push_back(TorchDtype(t));
    return absl::InvalidArgumentError(
        absl::StrCat("All unflattened parameters comprising a single flat parameter must have "
                     "positive-dimension tensor state with the same dtype but got dtypes ",
                     PySet(dtypes), " for state ", name, " and unflattened parameter names ",
                     PyList(HandleFqns(h))));
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

// use_orig_params: each parameter's state order and scalars, and a source per
// positive-dimension state name (first-seen order).
absl::Status FlattenOrigParams(const std::vector<const ParamState*>& states,
                               const FlatParamHandle& h, UnitFlat& out) {
  out.params.resize(states.size());
  std::vector<std::string> pos_names;
  for (size_t i = 0; i < states.size(); ++i) {
    if (states[i] == nullptr) continue;
    UnitFlat::Orig& p = out.params[i];
    p.present = true;
    for (const auto& [name, value] : *states[i]) {
      p.order.push_back(name);
      if (IsPosDimTensor(value)) {
        AddOnce(pos_names, name);
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
  return absl::OkStatus();
}

// Flat parameter: every original parameter with state has the same state names. The first
// parameter that has state.
absl::StatusOr<const ParamState*> CheckSameStateNames(const std::vector<const ParamState*>& states,
                                                      const FlatParamHandle& h) {
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
      return absl::InvalidArgumentError(
          absl::StrCat("Differing optimizer state names for the unflattened parameters: ",
                       PyList(HandleFqns(h))));
    }
  }
  return first;
}

// Whether every parameter has the zero-dimension CPU tensor state with one dtype and the very
// same bits: then FlattenZeroDimState's check passes without writing a repr.
bool SameZeroDimTensors(const std::vector<const StateValue*>& values) {
  if (values.empty()) return false;
  for (const StateValue* v : values) {
    if (v == nullptr) return false;
  }
  const at::Tensor& first = values[0]->Get<at::Tensor>();
  if (!first.is_cpu()) return false;
  for (const StateValue* v : values) {
    const at::Tensor& t = v->Get<at::Tensor>();
    if (!t.is_cpu() || t.scalar_type() != first.scalar_type() ||
        std::memcmp(t.const_data_ptr(), first.const_data_ptr(), first.element_size()) != 0) {
      return false;
    }
  }
  return true;
}

// Whether `a` and `b` have one Python type (TypeName; tuples and lists share a variant).
bool SameType(const StateValue& a, const StateValue& b) {
  if (a.variant().index() != b.variant().index()) return false;
  return !a.Is<StateSequence>() || a.TypeName() == b.TypeName();
}

enum class StateKind { kPosDimTensor, kZeroDimTensor, kNonTensor };

// The one kind of value every parameter's state `name` has.
absl::StatusOr<StateKind> KindOf(const std::string& name,
                                 const std::vector<const StateValue*>& non_null,
                                 const FlatParamHandle& h) {
  bool pos = true, zero = true, non_tensor = true, one_type = !non_null.empty();
  for (const StateValue* v : non_null) {
    pos = pos && IsPosDimTensor(*v);
    zero = zero && IsZeroDimTensor(*v);
    non_tensor = non_tensor && !v->Is<at::Tensor>();
    one_type = one_type && SameType(*v, *non_null[0]);
  }
  if (!one_type || !(pos || zero || non_tensor)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Differing optimizer state types for state ", name, ", values ", ValuesRepr(non_null),
        ", and unflattened parameter names ", PyList(HandleFqns(h))));
  }
  return pos ? StateKind::kPosDimTensor : zero ? StateKind::kZeroDimTensor : StateKind::kNonTensor;
}

// A zero-dimension tensor state every parameter has with one value and dtype: that value.
absl::StatusOr<StateValue> FlattenZeroDimState(const std::string& name,
                                               const std::vector<const StateValue*>& values,
                                               const std::vector<const StateValue*>& non_null,
                                               const FlatParamHandle& h) {
  if (SameZeroDimTensors(values)) return StateValue(values[0]->Get<at::Tensor>().clone());
  std::vector<std::string> value_reprs, dtype_reprs;
  for (const StateValue* v : values) {
    AddOnce(value_reprs, v == nullptr ? "None" : ItemRepr(v->Get<at::Tensor>()));
    AddOnce(dtype_reprs, v == nullptr ? "None" : TorchDtype(v->Get<at::Tensor>().scalar_type()));
  }
  if (non_null.size() != values.size() || value_reprs.size() != 1 || dtype_reprs.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "All unflattened parameters comprising a single flat parameter must have scalar "
        "state with the same value and dtype but got values ",
        PySet(value_reprs), " and dtypes ", PySet(dtype_reprs), " for state ", name,
        " and unflattened parameter names ", PyList(HandleFqns(h))));
  }
  return StateValue(non_null[0]->Get<at::Tensor>().to(at::kCPU).clone());
}

// A non-tensor state every parameter has with one value: that value.
absl::StatusOr<StateValue> FlattenNonTensorState(const std::string& name,
                                                 const std::vector<const StateValue*>& values,
                                                 const std::vector<const StateValue*>& non_null,
                                                 const FlatParamHandle& h) {
  bool same = non_null.size() == values.size();
  for (const StateValue* v : values) {
    if (v != nullptr && !(*v == *non_null[0])) same = false;
  }
  if (!same) {
    std::vector<std::string> value_reprs;
    for (const StateValue* v : values)
      AddOnce(value_reprs, v == nullptr ? "None" : DebugString(*v));
    return absl::InvalidArgumentError(absl::StrCat(
        "All unflattened parameters comprising a single flat parameter must have scalar "
        "state with the same value and dtype but got values ",
        PySet(value_reprs), " for state ", name, " and  unflattened parameter names ",
        PyList(HandleFqns(h))));
  }
  return *non_null[0];
}

// Flat parameter: state `name` of every original parameter, as one source or one scalar.
absl::Status FlattenFlatState(const std::string& name, const std::vector<const ParamState*>& states,
                              const FlatParamHandle& h, UnitFlat& out) {
  out.order.push_back(name);
  std::vector<const StateValue*> values, non_null;
  for (const ParamState* st : states) {
    values.push_back(st == nullptr ? nullptr : st->Find(name));
    if (values.back() != nullptr) non_null.push_back(values.back());
  }
  FSDP_ASSIGN_OR_RETURN(StateKind kind, KindOf(name, non_null, h));
  switch (kind) {
    case StateKind::kPosDimTensor: {
      FSDP_ASSIGN_OR_RETURN(PosSource source, CheckTensors(name, values, h));
      out.sources.push_back(std::move(source));
      return absl::OkStatus();
    }
    case StateKind::kZeroDimTensor: {
      FSDP_ASSIGN_OR_RETURN(StateValue value, FlattenZeroDimState(name, values, non_null, h));
      out.scalars.Set(name, std::move(value));
      return absl::OkStatus();
    }
    case StateKind::kNonTensor: {
      FSDP_ASSIGN_OR_RETURN(StateValue value, FlattenNonTensorState(name, values, non_null, h));
      out.scalars.Set(name, std::move(value));
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<UnitFlat> FlattenUnit(const OrderedMap<ParamKey, ParamState>& full_state,
                                     const FlatParamHandle& h) {
  std::vector<const ParamState*> states;
  bool any = false;
  for (const std::string& fqn : HandleFqns(h)) {
    states.push_back(full_state.Find(ParamKey::Fqn(fqn)));
    any = any || states.back() != nullptr;
  }
  UnitFlat out;
  if (!any) return out;
  out.has_state = true;
  if (h.use_orig_params()) {
    FSDP_RETURN_IF_ERROR(FlattenOrigParams(states, h, out));
    return out;
  }
  FSDP_ASSIGN_OR_RETURN(const ParamState* first, CheckSameStateNames(states, h));
  for (const auto& entry : *first) {
    FSDP_RETURN_IF_ERROR(FlattenFlatState(entry.first, states, h, out));
  }
  return out;
}

absl::StatusOr<UnitFlat> FlattenUnitFor(absl::string_view op,
                                        const OrderedMap<ParamKey, ParamState>& full_state,
                                        const FlatParamHandle& h) {
  auto flat = CallTorchOr(op, [&] { return FlattenUnit(full_state, h); });
  if (!flat.ok()) {
    return absl::Status(flat.status().code(), absl::StrCat(op, ": ", flat.status().message()));
  }
  return flat;
}

}  // namespace fsdp::optim_state::internal
