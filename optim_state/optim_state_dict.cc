#include "optim_state/optim_state_dict.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace fsdp::optim_state {
namespace {

std::string PythonString(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  out.push_back('\'');
  return out;
}

// Python's repr of a float: always shows it is a float ("0.0", "1e-08").
std::string PythonFloat(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  std::string s = absl::StrFormat("%.17g", v);
  // Prefer the shortest form that reads back to the same double.
  for (int precision = 1; precision < 17; ++precision) {
    std::string shorter = absl::StrFormat("%.*g", precision, v);
    if (std::strtod(shorter.c_str(), nullptr) == v) {
      s = shorter;
      break;
    }
  }
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string TensorString(const at::Tensor& t) {
  if (!t.defined()) return "tensor(undefined)";
  std::string values;
  const int64_t n = t.numel();
  const int64_t shown = std::min<int64_t>(n, 8);
  if (shown > 0) {
    at::Tensor flat = t.detach().reshape({-1}).slice(0, 0, shown).to(at::kCPU);
    std::vector<std::string> parts;
    const bool floating = t.is_floating_point();
    at::Tensor as_double = flat.to(at::kDouble);
    auto accessor = as_double.accessor<double, 1>();
    for (int64_t i = 0; i < shown; ++i) {
      const double v = accessor[i];
      parts.push_back(floating ? PythonFloat(v) : absl::StrCat(static_cast<int64_t>(v)));
    }
    values = absl::StrJoin(parts, ", ");
    if (n > shown) absl::StrAppend(&values, ", ...");
  }
  if (t.dim() == 0) {
    return absl::StrCat("tensor(", values, ", dtype=", DtypeName(t.scalar_type()), ")");
  }
  return absl::StrCat("tensor([", values, "], shape=", ShapeString(t.sizes()),
                      ", dtype=", DtypeName(t.scalar_type()), ")");
}

bool WithinTolerance(double expected, double actual, Tolerance tol) {
  if (std::isnan(expected) || std::isnan(actual)) return std::isnan(expected) && std::isnan(actual);
  if (expected == actual) return true;  // also equal infinities
  return std::abs(actual - expected) <= tol.atol + tol.rtol * std::abs(expected);
}

std::string DiffTensors(const at::Tensor& expected, const at::Tensor& actual, Tolerance tol) {
  if (!expected.defined() || !actual.defined()) {
    if (expected.defined() == actual.defined()) return "";
    return absl::StrCat("expected ", TensorString(expected), ", got ", TensorString(actual));
  }
  if (expected.scalar_type() != actual.scalar_type()) {
    return absl::StrCat("dtype ", DtypeName(actual.scalar_type()), ", expected ",
                        DtypeName(expected.scalar_type()));
  }
  if (expected.sizes() != actual.sizes()) {
    return absl::StrCat("shape ", ShapeString(actual.sizes()), ", expected ",
                        ShapeString(expected.sizes()));
  }
  if (expected.numel() == 0) return "";
  at::Tensor e = expected.detach().to(at::kCPU).reshape({-1});
  at::Tensor a = actual.detach().to(at::kCPU).reshape({-1});
  if (!expected.is_floating_point()) {
    if (at::equal(e, a)) return "";
    at::Tensor differs = (e != a).nonzero();
    const int64_t i = differs[0][0].item<int64_t>();
    return absl::StrCat("values differ at flat index ", i, ": ", a[i].item<double>(), ", expected ",
                        e[i].item<double>());
  }
  at::Tensor ed = e.to(at::kDouble);
  at::Tensor ad = a.to(at::kDouble);
  auto ea = ed.accessor<double, 1>();
  auto aa = ad.accessor<double, 1>();
  for (int64_t i = 0; i < ed.numel(); ++i) {
    if (!WithinTolerance(ea[i], aa[i], tol)) {
      const double max_diff = (ed - ad).abs().nan_to_num(0.0).max().item<double>();
      return absl::StrCat("values differ at flat index ", i, ": ", PythonFloat(aa[i]),
                          ", expected ", PythonFloat(ea[i]), " (max |difference| ",
                          PythonFloat(max_diff), ")");
    }
  }
  return "";
}

std::string WithPath(const std::string& path, const std::string& diff) {
  if (diff.empty()) return diff;
  return path.empty() ? diff : absl::StrCat(path, ": ", diff);
}

// Diff of two values at `path`.
std::string DiffAt(const std::string& path, const StateValue& expected, const StateValue& actual,
                   Tolerance tol) {
  if (expected.variant().index() != actual.variant().index()) {
    return WithPath(
        path, absl::StrCat("a ", actual.TypeName(), " (", DebugString(actual), "), expected a ",
                           expected.TypeName(), " (", DebugString(expected), ")"));
  }
  return std::visit(
      [&](const auto& e) -> std::string {
        using T = std::decay_t<decltype(e)>;
        const T& a = actual.Get<T>();
        if constexpr (std::is_same_v<T, NoneValue>) {
          return "";
        } else if constexpr (std::is_same_v<T, double>) {
          if (WithinTolerance(e, a, tol)) return "";
          return WithPath(path, absl::StrCat(PythonFloat(a), ", expected ", PythonFloat(e)));
        } else if constexpr (std::is_same_v<T, at::Tensor>) {
          return WithPath(path, DiffTensors(e, a, tol));
        } else if constexpr (std::is_same_v<T, StateSequence>) {
          if (e.is_tuple != a.is_tuple || e.items.size() != a.items.size()) {
            return WithPath(
                path, absl::StrCat(DebugString(actual), ", expected ", DebugString(expected)));
          }
          for (size_t i = 0; i < e.items.size(); ++i) {
            std::string d = DiffAt(absl::StrCat(path, "[", i, "]"), e.items[i], a.items[i], tol);
            if (!d.empty()) return d;
          }
          return "";
        } else if constexpr (std::is_same_v<T, ShardedTensorValue>) {
          if (e.global_shape != a.global_shape || e.offsets != a.offsets) {
            return WithPath(
                path, absl::StrCat("sharded tensor of global shape ", ShapeString(a.global_shape),
                                   " at offsets ", ShapeString(a.offsets), ", expected ",
                                   ShapeString(e.global_shape), " at ", ShapeString(e.offsets)));
          }
          if (e.more_shards.size() != a.more_shards.size()) {
            return WithPath(path, absl::StrCat(1 + a.more_shards.size(), " local shards, expected ",
                                               1 + e.more_shards.size()));
          }
          for (size_t i = 0; i < e.more_shards.size(); ++i) {
            const std::string shard_path = absl::StrCat(path, ".more_shards[", i, "]");
            if (e.more_shards[i].offsets != a.more_shards[i].offsets) {
              return WithPath(shard_path,
                              absl::StrCat("at offsets ", ShapeString(a.more_shards[i].offsets),
                                           ", expected ", ShapeString(e.more_shards[i].offsets)));
            }
            std::string diff = DiffTensors(e.more_shards[i].local, a.more_shards[i].local, tol);
            if (!diff.empty()) return WithPath(absl::StrCat(shard_path, ".local"), diff);
          }
          return WithPath(absl::StrCat(path, ".local"), DiffTensors(e.local, a.local, tol));
        } else {
          if (e == a) return "";
          return WithPath(path,
                          absl::StrCat(DebugString(actual), ", expected ", DebugString(expected)));
        }
      },
      expected.variant());
}

std::string KeysString(const std::vector<std::string>& keys) {
  std::vector<std::string> quoted;
  for (const auto& k : keys) quoted.push_back(PythonString(k));
  return absl::StrCat("[", absl::StrJoin(quoted, ", "), "]");
}

std::string ParamKeysString(const std::vector<ParamKey>& keys) {
  std::vector<std::string> parts;
  for (const auto& k : keys) parts.push_back(k.ToString());
  return absl::StrCat("[", absl::StrJoin(parts, ", "), "]");
}

// Diff of two name -> value maps (param state or hyper-parameters) at `path`.
std::string DiffNamedValues(const std::string& path,
                            const OrderedMap<std::string, StateValue>& expected,
                            const OrderedMap<std::string, StateValue>& actual, Tolerance tol) {
  if (expected.Keys() != actual.Keys()) {
    return absl::StrCat(path, ": keys ", KeysString(actual.Keys()), ", expected ",
                        KeysString(expected.Keys()));
  }
  for (size_t i = 0; i < expected.size(); ++i) {
    const auto& [name, value] = expected.at_index(i);
    std::string d = DiffAt(absl::StrCat(path, "[", PythonString(name), "]"), value,
                           actual.at_index(i).second, tol);
    if (!d.empty()) return d;
  }
  return "";
}

std::string NamedValuesString(const OrderedMap<std::string, StateValue>& values) {
  std::vector<std::string> parts;
  for (const auto& [name, value] : values) {
    parts.push_back(absl::StrCat(PythonString(name), ": ", DebugString(value)));
  }
  return absl::StrJoin(parts, ", ");
}

}  // namespace

std::string ParamKey::ToString() const {
  return is_id() ? absl::StrCat(id()) : PythonString(fqn());
}

StateValue StateValue::Tuple(std::vector<StateValue> items) {
  return StateValue(StateSequence{std::move(items), /*is_tuple=*/true});
}

StateValue StateValue::List(std::vector<StateValue> items) {
  return StateValue(StateSequence{std::move(items), /*is_tuple=*/false});
}

std::string StateValue::TypeName() const {
  return std::visit(
      [](const auto& v) -> std::string {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, NoneValue>) return "NoneType";
        if constexpr (std::is_same_v<T, bool>) return "bool";
        if constexpr (std::is_same_v<T, int64_t>) return "int";
        if constexpr (std::is_same_v<T, double>) return "float";
        if constexpr (std::is_same_v<T, std::string>) return "str";
        if constexpr (std::is_same_v<T, at::Tensor>) return "Tensor";
        if constexpr (std::is_same_v<T, StateSequence>) return v.is_tuple ? "tuple" : "list";
        if constexpr (std::is_same_v<T, ShardedTensorValue>) return "ShardedTensor";
      },
      value_);
}

StateValue CloneStateValue(const StateValue& value) {
  if (const auto* t = value.GetIf<at::Tensor>()) {
    return t->defined() ? StateValue(t->detach().clone()) : value;
  }
  if (const auto* seq = value.GetIf<StateSequence>()) {
    StateSequence copy{{}, seq->is_tuple};
    for (const StateValue& item : seq->items) copy.items.push_back(CloneStateValue(item));
    return StateValue(std::move(copy));
  }
  if (const auto* sharded = value.GetIf<ShardedTensorValue>()) {
    ShardedTensorValue copy = *sharded;
    if (copy.local.defined()) copy.local = copy.local.detach().clone();
    for (ShardedTensorValue::Shard& shard : copy.more_shards) {
      if (shard.local.defined()) shard.local = shard.local.detach().clone();
    }
    return StateValue(std::move(copy));
  }
  return value;
}

OptimStateDict CloneOptimStateDict(const OptimStateDict& dict) {
  OptimStateDict copy;
  copy.has_param_groups = dict.has_param_groups;
  copy.param_groups = dict.param_groups;  // hyper-parameters hold no tensors in practice
  for (ParamGroup& group : copy.param_groups) {
    HyperParams cloned;
    for (const auto& [name, value] : group.hyper_params) cloned.Set(name, CloneStateValue(value));
    group.hyper_params = std::move(cloned);
  }
  for (const auto& [key, state] : dict.state) {
    ParamState cloned;
    for (const auto& [name, value] : state) cloned.Set(name, CloneStateValue(value));
    copy.state.Set(key, std::move(cloned));
  }
  return copy;
}

std::string DiffStateValues(const StateValue& expected, const StateValue& actual,
                            Tolerance tolerance) {
  return DiffAt("", expected, actual, tolerance);
}

std::string DiffOptimStateDicts(const OptimStateDict& expected, const OptimStateDict& actual,
                                Tolerance tolerance) {
  if (expected.state.Keys() != actual.state.Keys()) {
    return absl::StrCat("state: keys ", ParamKeysString(actual.state.Keys()), ", expected ",
                        ParamKeysString(expected.state.Keys()));
  }
  for (size_t i = 0; i < expected.state.size(); ++i) {
    const auto& [key, state] = expected.state.at_index(i);
    std::string d = DiffNamedValues(absl::StrCat("state[", key.ToString(), "]"), state,
                                    actual.state.at_index(i).second, tolerance);
    if (!d.empty()) return d;
  }
  if (expected.has_param_groups != actual.has_param_groups) {
    return absl::StrCat("has_param_groups is ", actual.has_param_groups, ", expected ",
                        expected.has_param_groups);
  }
  if (expected.param_groups.size() != actual.param_groups.size()) {
    return absl::StrCat("param_groups: ", actual.param_groups.size(), " groups, expected ",
                        expected.param_groups.size());
  }
  for (size_t g = 0; g < expected.param_groups.size(); ++g) {
    const ParamGroup& e = expected.param_groups[g];
    const ParamGroup& a = actual.param_groups[g];
    const std::string path = absl::StrCat("param_groups[", g, "]");
    std::string d = DiffNamedValues(path, e.hyper_params, a.hyper_params, tolerance);
    if (!d.empty()) return d;
    if (e.params != a.params) {
      return absl::StrCat(path, "['params']: ", ParamKeysString(a.params), ", expected ",
                          ParamKeysString(e.params));
    }
  }
  return "";
}

bool operator==(const StateValue& a, const StateValue& b) { return DiffStateValues(a, b).empty(); }

bool operator==(const OptimStateDict& a, const OptimStateDict& b) {
  return DiffOptimStateDicts(a, b).empty();
}

std::string DebugString(const StateValue& value) {
  return std::visit(
      [](const auto& v) -> std::string {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, NoneValue>) {
          return "None";
        } else if constexpr (std::is_same_v<T, bool>) {
          return v ? "True" : "False";
        } else if constexpr (std::is_same_v<T, int64_t>) {
          return absl::StrCat(v);
        } else if constexpr (std::is_same_v<T, double>) {
          return PythonFloat(v);
        } else if constexpr (std::is_same_v<T, std::string>) {
          return PythonString(v);
        } else if constexpr (std::is_same_v<T, at::Tensor>) {
          return TensorString(v);
        } else if constexpr (std::is_same_v<T, StateSequence>) {
          std::vector<std::string> parts;
          for (const StateValue& item : v.items) parts.push_back(DebugString(item));
          std::string inner = absl::StrJoin(parts, ", ");
          if (v.is_tuple) return absl::StrCat("(", inner, v.items.size() == 1 ? ",)" : ")");
          return absl::StrCat("[", inner, "]");
        } else {
          std::string more;
          for (const ShardedTensorValue::Shard& shard : v.more_shards) {
            absl::StrAppend(&more, ", (", TensorString(shard.local), ", ",
                            ShapeString(shard.offsets), ")");
          }
          return absl::StrCat("ShardedTensor(local=", TensorString(v.local),
                              ", global_shape=", ShapeString(v.global_shape),
                              ", offsets=", ShapeString(v.offsets),
                              more.empty() ? "" : absl::StrCat(", more_shards=[", more.substr(2), "]"),
                              ")");
        }
      },
      value.variant());
}

std::string DebugString(const OptimStateDict& dict) {
  std::vector<std::string> states;
  for (const auto& [key, state] : dict.state) {
    states.push_back(absl::StrCat(key.ToString(), ": {", NamedValuesString(state), "}"));
  }
  std::string out = absl::StrCat("{'state': {", absl::StrJoin(states, ", "), "}");
  if (dict.has_param_groups) {
    std::vector<std::string> groups;
    for (const ParamGroup& group : dict.param_groups) {
      std::string hyper = NamedValuesString(group.hyper_params);
      groups.push_back(absl::StrCat("{", hyper, hyper.empty() ? "" : ", ",
                                    "'params': ", ParamKeysString(group.params), "}"));
    }
    absl::StrAppend(&out, ", 'param_groups': [", absl::StrJoin(groups, ", "), "]");
  }
  absl::StrAppend(&out, "}");
  return out;
}

std::ostream& operator<<(std::ostream& os, const ParamKey& key) { return os << key.ToString(); }

std::ostream& operator<<(std::ostream& os, const StateValue& value) {
  return os << DebugString(value);
}

std::ostream& operator<<(std::ostream& os, const OptimStateDict& dict) {
  return os << DebugString(dict);
}

std::string DtypeName(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kLong:
      return "int64";
    case at::kInt:
      return "int32";
    case at::kShort:
      return "int16";
    case at::kChar:
      return "int8";
    case at::kByte:
      return "uint8";
    case at::kBool:
      return "bool";
    case at::kComplexFloat:
      return "complex64";
    case at::kComplexDouble:
      return "complex128";
    default:
      return c10::toString(type);
  }
}

}  // namespace fsdp::optim_state
