// See sharded_metadata_json.h. Layout: JSON field access that throws BadMetadata (caught at
// MetadataFromJson's edge); state values as JSON; metadata.json's text, part by part; its
// parsing, part by part; the public functions.
#include "checkpoint/sharded_metadata_json.h"

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "comm/status_macros.h"
#include "nlohmann/json.hpp"

namespace fsdp::checkpoint {

using json = nlohmann::ordered_json;
using optim_state::ParamGroup;
using optim_state::StateSequence;
using optim_state::StateValue;

namespace {

std::string Hex(uint64_t v) { return absl::StrFormat("%016x", v); }

bool ParseHex(const std::string& s, uint64_t* out) {
  if (s.size() != 16) return false;
  return absl::SimpleHexAtoi(s, out);
}

// Thrown inside the JSON parsing code only, turned into INVALID_ARGUMENT at its edge.
struct BadMetadata {
  std::string message;
};

[[noreturn]] void Bad(const std::string& message) { throw BadMetadata{message}; }

const json& Field(const json& j, const char* name, const std::string& where) {
  if (!j.is_object()) Bad(absl::StrCat(where, " is not a JSON object"));
  auto it = j.find(name);
  if (it == j.end()) Bad(absl::StrCat(where, " has no \"", name, "\""));
  return *it;
}

int64_t GetInt(const json& j, const char* name, const std::string& where) {
  const json& v = Field(j, name, where);
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      Bad(absl::StrCat(where, ".", name, " is out of range"));
    }
    return static_cast<int64_t>(u);
  }
  if (!v.is_number_integer()) Bad(absl::StrCat(where, ".", name, " is not an integer"));
  return v.get<int64_t>();
}

std::string GetStr(const json& j, const char* name, const std::string& where) {
  const json& v = Field(j, name, where);
  if (!v.is_string()) Bad(absl::StrCat(where, ".", name, " is not a string"));
  return v.get<std::string>();
}

const json& GetArray(const json& j, const char* name, const std::string& where) {
  const json& v = Field(j, name, where);
  if (!v.is_array()) Bad(absl::StrCat(where, ".", name, " is not an array"));
  return v;
}

// ---------------------------------------------------------------- state values as JSON

json FloatJson(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  return d;
}

double FloatFromJson(const json& v, const std::string& where) {
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    if (s == "nan") return std::numeric_limits<double>::quiet_NaN();
    if (s == "inf") return std::numeric_limits<double>::infinity();
    if (s == "-inf") return -std::numeric_limits<double>::infinity();
  }
  if (!v.is_number()) Bad(absl::StrCat(where, " is not a number"));
  return v.get<double>();
}

absl::StatusOr<json> ValueJson(const StateValue& value) {
  if (value.IsNone()) return json{{"type", "none"}};
  if (const bool* b = value.GetIf<bool>()) return json{{"type", "bool"}, {"value", *b}};
  if (const int64_t* i = value.GetIf<int64_t>()) return json{{"type", "int"}, {"value", *i}};
  if (const double* d = value.GetIf<double>()) {
    return json{{"type", "float"}, {"value", FloatJson(*d)}};
  }
  if (const std::string* s = value.GetIf<std::string>()) {
    return json{{"type", "str"}, {"value", *s}};
  }
  if (const StateSequence* seq = value.GetIf<StateSequence>()) {
    json items = json::array();
    for (const StateValue& item : seq->items) {
      FSDP_ASSIGN_OR_RETURN(json j, ValueJson(item));
      items.push_back(std::move(j));
    }
    return json{{"type", seq->is_tuple ? "tuple" : "list"}, {"value", std::move(items)}};
  }
  if (const at::Tensor* t = value.GetIf<at::Tensor>()) {
    if (!t->defined() || t->dim() != 0) {
      return absl::InvalidArgumentError(
          "only zero-dimension tensors are stored as values (positive-dimension ones as pieces)");
    }
    FSDP_ASSIGN_OR_RETURN(std::string dtype, SafetensorsDtype(t->scalar_type()));
    json j{{"type", "tensor"}, {"dtype", dtype}};
    if (t->scalar_type() == at::kBool) {
      j["value"] = t->item<bool>();
    } else if (at::isIntegralType(t->scalar_type(), /*includeBool=*/false)) {
      j["value"] = t->item<int64_t>();
    } else {
      j["value"] = FloatJson(t->item<double>());
    }
    return j;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("a ", value.TypeName(), " cannot be stored in a sharded checkpoint"));
}

StateValue ValueFromJson(const json& j, const std::string& where, int depth = 0) {
  if (depth > 64) Bad(absl::StrCat(where, " nests too deeply"));
  const std::string type = GetStr(j, "type", where);
  if (type == "none") return StateValue::None();
  const json& v = Field(j, "value", where);
  if (type == "bool") {
    if (!v.is_boolean()) Bad(absl::StrCat(where, ".value is not a bool"));
    return StateValue(v.get<bool>());
  }
  if (type == "int") return StateValue(GetInt(j, "value", where));
  if (type == "float") return StateValue(FloatFromJson(v, where + ".value"));
  if (type == "str") {
    if (!v.is_string()) Bad(absl::StrCat(where, ".value is not a string"));
    return StateValue(v.get<std::string>());
  }
  if (type == "tuple" || type == "list") {
    if (!v.is_array()) Bad(absl::StrCat(where, ".value is not an array"));
    std::vector<StateValue> items;
    for (size_t i = 0; i < v.size(); ++i) {
      items.push_back(ValueFromJson(v[i], absl::StrCat(where, "[", i, "]"), depth + 1));
    }
    return type == "tuple" ? StateValue::Tuple(std::move(items))
                           : StateValue::List(std::move(items));
  }
  if (type == "tensor") {
    absl::StatusOr<at::ScalarType> dtype = ScalarTypeFromSafetensors(GetStr(j, "dtype", where));
    if (!dtype.ok()) Bad(absl::StrCat(where, ": ", dtype.status().message()));
    const auto options = at::TensorOptions().dtype(*dtype);
    if (*dtype == at::kBool) {
      if (!v.is_boolean()) Bad(absl::StrCat(where, ".value is not a bool"));
      return StateValue(at::scalar_tensor(v.get<bool>(), options));
    }
    if (at::isIntegralType(*dtype, /*includeBool=*/false)) {
      return StateValue(at::scalar_tensor(GetInt(j, "value", where), options));
    }
    return StateValue(at::scalar_tensor(FloatFromJson(v, where + ".value"), options));
  }
  Bad(absl::StrCat(where, ": unknown value type \"", type, "\""));
}

// ---------------------------------------------------------------- metadata.json's text

json FilesJson(const std::vector<FileRecord>& files) {
  json out = json::array();
  for (const FileRecord& f : files) {
    out.push_back(json{{"name", f.name},
                       {"rank", f.rank},
                       {"size", f.size},
                       {"header_bytes", f.header_bytes},
                       {"header_xxh64", Hex(f.header_xxh64)}});
  }
  return out;
}

json TensorsJson(const std::vector<TensorRecord>& tensors) {
  json out = json::array();
  for (const TensorRecord& t : tensors) {
    json pieces = json::array();
    for (const PieceRecord& p : t.pieces) {
      json hashes = json::array();
      for (uint64_t h : p.block_xxh64) hashes.push_back(Hex(h));
      pieces.push_back(json{{"file", p.file},
                            {"begin", p.begin},
                            {"end", p.end},
                            {"offset", p.offset},
                            {"bytes", p.bytes},
                            {"xxh64", std::move(hashes)}});
    }
    out.push_back(json{{"key", t.key},
                       {"kind", t.is_optim ? "optim" : "model"},
                       {"fqn", t.fqn},
                       {"state", t.state},
                       {"shape", t.shape},
                       {"dtype", SafetensorsDtype(t.dtype).value_or("?")},
                       {"pieces", std::move(pieces)}});
  }
  return out;
}

json OptimJson(const OptimRecord& optim) {
  json state = json::array();
  for (const OptimParamRecord& p : optim.state) {
    json values = json::array();
    for (const OptimValueRecord& v : p.values) {
      if (v.is_tensor) {
        values.push_back(json{{"name", v.name}, {"tensor", v.tensor_key}});
      } else {
        values.push_back(
            json{{"name", v.name}, {"value", ValueJson(v.value).value_or(json{{"type", "none"}})}});
      }
    }
    state.push_back(json{{"fqn", p.fqn}, {"values", std::move(values)}});
  }
  json groups = json::array();
  for (const ParamGroup& g : optim.param_groups) {
    json hyper = json::array();
    for (const auto& [name, value] : g.hyper_params) {
      hyper.push_back(
          json{{"name", name}, {"value", ValueJson(value).value_or(json{{"type", "none"}})}});
    }
    json params = json::array();
    for (const auto& key : g.params) params.push_back(key.is_fqn() ? key.fqn() : "");
    groups.push_back(json{{"hyper_params", std::move(hyper)}, {"params", std::move(params)}});
  }
  return json{{"has_param_groups", optim.has_param_groups},
              {"state", std::move(state)},
              {"param_groups", std::move(groups)}};
}

// ---------------------------------------------------------------- metadata.json parsed
// Each step throws BadMetadata (Bad) for what it refuses.

// version, kind, checkpoint_id, world_size, saved_with, user_metadata, block_bytes.
void ReadHeaderFields(const json& j, const std::string& where, ShardedMetadata& m) {
  const int64_t version = GetInt(j, "version", where);
  if (version != kShardedFormatVersion) {
    Bad(absl::StrCat(where, ": format version ", version,
                     " is not supported (this reader reads version ", kShardedFormatVersion, ")"));
  }
  if (GetStr(j, "kind", where) != "sharded") Bad(absl::StrCat(where, ": kind is not sharded"));
  m.checkpoint_id = GetStr(j, "checkpoint_id", where);
  const int64_t ws = GetInt(j, "world_size", where);
  if (ws < 1 || ws > (1 << 24)) Bad(absl::StrCat(where, ": world_size ", ws, " out of range"));
  m.world_size = static_cast<int>(ws);
  if (j.contains("saved_with") && j["saved_with"].is_object()) {
    for (const auto& [k, v] : j["saved_with"].items()) {
      m.saved_with[k] = v.is_string() ? v.get<std::string>() : v.dump();
    }
  }
  if (j.contains("user_metadata")) {
    if (!j["user_metadata"].is_object())
      Bad(absl::StrCat(where, ": user_metadata is not an object"));
    for (const auto& [k, v] : j["user_metadata"].items()) {
      if (!v.is_string()) {
        Bad(absl::StrCat(where, ": user_metadata[\"", k, "\"] is not a string"));
      }
      m.user_metadata[k] = v.get<std::string>();
    }
  }
  m.block_bytes = GetInt(j, "block_bytes", where);
}

FileRecord FileFromJson(const json& fj, const std::string& fw) {
  FileRecord f;
  f.name = GetStr(fj, "name", fw);
  f.rank = static_cast<int>(GetInt(fj, "rank", fw));
  f.size = GetInt(fj, "size", fw);
  f.header_bytes = GetInt(fj, "header_bytes", fw);
  if (!ParseHex(GetStr(fj, "header_xxh64", fw), &f.header_xxh64)) {
    Bad(absl::StrCat(fw, ".header_xxh64 is not 16 hex digits"));
  }
  return f;
}

PieceRecord PieceFromJson(const json& pj, const std::string& pw) {
  PieceRecord p;
  const int64_t file = GetInt(pj, "file", pw);
  if (file < -1 || file > (1 << 24)) Bad(absl::StrCat(pw, ": file index out of range"));
  p.file = static_cast<int>(file);
  p.begin = GetInt(pj, "begin", pw);
  p.end = GetInt(pj, "end", pw);
  p.offset = GetInt(pj, "offset", pw);
  p.bytes = GetInt(pj, "bytes", pw);
  const json& hashes = GetArray(pj, "xxh64", pw);
  for (const json& h : hashes) {
    uint64_t v = 0;
    if (!h.is_string() || !ParseHex(h.get<std::string>(), &v)) {
      Bad(absl::StrCat(pw, ": a checksum is not 16 hex digits"));
    }
    p.block_xxh64.push_back(v);
  }
  return p;
}

TensorRecord TensorFromJson(const json& tj, const std::string& tw) {
  TensorRecord t;
  t.key = GetStr(tj, "key", tw);
  const std::string kind = GetStr(tj, "kind", tw);
  if (kind != "model" && kind != "optim") Bad(absl::StrCat(tw, ": unknown kind ", kind));
  t.is_optim = kind == "optim";
  t.fqn = GetStr(tj, "fqn", tw);
  t.state = GetStr(tj, "state", tw);
  const json& shape = GetArray(tj, "shape", tw);
  if (shape.size() > 64) Bad(absl::StrCat(tw, ": too many dimensions"));
  for (const json& d : shape) {
    if (!d.is_number_integer()) Bad(absl::StrCat(tw, ": shape has a non-integer"));
    t.shape.push_back(d.get<int64_t>());
  }
  absl::StatusOr<at::ScalarType> dtype = ScalarTypeFromSafetensors(GetStr(tj, "dtype", tw));
  if (!dtype.ok()) Bad(absl::StrCat(tw, " ('", t.key, "'): ", dtype.status().message()));
  t.dtype = *dtype;
  const json& pieces = GetArray(tj, "pieces", tw);
  for (size_t k = 0; k < pieces.size(); ++k) {
    t.pieces.push_back(PieceFromJson(pieces[k], absl::StrCat(tw, ".pieces[", k, "]")));
  }
  return t;
}

std::vector<std::pair<std::string, std::string>> ModelKeysFromJson(const json& j,
                                                                   const std::string& where) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const json& kv : GetArray(j, "model_keys", where)) {
    if (!kv.is_array() || kv.size() != 2 || !kv[0].is_string() || !kv[1].is_string()) {
      Bad(absl::StrCat(where, ": model_keys entries are [key, stored fqn]"));
    }
    out.emplace_back(kv[0].get<std::string>(), kv[1].get<std::string>());
  }
  return out;
}

OptimParamRecord OptimParamFromJson(const json& sj, const std::string& sw) {
  OptimParamRecord p;
  p.fqn = GetStr(sj, "fqn", sw);
  for (const json& v : GetArray(sj, "values", sw)) {
    OptimValueRecord r;
    r.name = GetStr(v, "name", sw);
    if (v.contains("tensor")) {
      r.is_tensor = true;
      r.tensor_key = GetStr(v, "tensor", sw);
    } else {
      r.value = ValueFromJson(Field(v, "value", sw), absl::StrCat(sw, "['", r.name, "']"));
    }
    p.values.push_back(std::move(r));
  }
  return p;
}

ParamGroup ParamGroupFromJson(const json& gj, const std::string& gw) {
  ParamGroup group;
  for (const json& h : GetArray(gj, "hyper_params", gw)) {
    const std::string name = GetStr(h, "name", gw);
    group.hyper_params.Set(
        name, ValueFromJson(Field(h, "value", gw), absl::StrCat(gw, "['", name, "']")));
  }
  for (const json& p : GetArray(gj, "params", gw)) {
    if (!p.is_string()) Bad(absl::StrCat(gw, ".params holds a non-string"));
    group.params.push_back(optim_state::ParamKey::Fqn(p.get<std::string>()));
  }
  return group;
}

OptimRecord OptimFromJson(const json& optim, const std::string& ow) {
  OptimRecord out;
  const json& hpg = Field(optim, "has_param_groups", ow);
  if (!hpg.is_boolean()) Bad(absl::StrCat(ow, ".has_param_groups is not a bool"));
  out.has_param_groups = hpg.get<bool>();
  const json& state = GetArray(optim, "state", ow);
  for (size_t i = 0; i < state.size(); ++i) {
    out.state.push_back(OptimParamFromJson(state[i], absl::StrCat(ow, ".state[", i, "]")));
  }
  const json& groups = GetArray(optim, "param_groups", ow);
  for (size_t g = 0; g < groups.size(); ++g) {
    out.param_groups.push_back(
        ParamGroupFromJson(groups[g], absl::StrCat(ow, ".param_groups[", g, "]")));
  }
  return out;
}

// The whole document, after its format is known to be this one.
ShardedMetadata MetadataFromDocument(const json& j, const std::string& where) {
  ShardedMetadata m;
  ReadHeaderFields(j, where, m);
  const json& files = GetArray(j, "files", where);
  for (size_t i = 0; i < files.size(); ++i) {
    m.files.push_back(FileFromJson(files[i], absl::StrCat(where, ": files[", i, "]")));
  }
  const json& tensors = GetArray(j, "tensors", where);
  for (size_t i = 0; i < tensors.size(); ++i) {
    m.tensors.push_back(TensorFromJson(tensors[i], absl::StrCat(where, ": tensors[", i, "]")));
  }
  m.model_keys = ModelKeysFromJson(j, where);
  const json& optim = Field(j, "optim", where);
  m.has_optim = !optim.is_null();
  if (m.has_optim) m.optim = OptimFromJson(optim, absl::StrCat(where, ": optim"));
  return m;
}

}  // namespace

std::string MetadataToJson(const ShardedMetadata& m) {
  json j;
  j["format"] = std::string(kShardedFormatName);
  j["version"] = kShardedFormatVersion;
  j["kind"] = "sharded";
  j["checkpoint_id"] = m.checkpoint_id;
  j["world_size"] = m.world_size;
  j["saved_with"] = json::object();
  for (const auto& [k, v] : m.saved_with) j["saved_with"][k] = v;
  if (!m.user_metadata.empty()) {
    j["user_metadata"] = json::object();
    for (const auto& [k, v] : m.user_metadata) j["user_metadata"][k] = v;
  }
  j["block_bytes"] = m.block_bytes;
  j["files"] = FilesJson(m.files);
  j["tensors"] = TensorsJson(m.tensors);
  json model_keys = json::array();
  for (const auto& [k, v] : m.model_keys) model_keys.push_back(json::array({k, v}));
  j["model_keys"] = std::move(model_keys);
  j["optim"] = m.has_optim ? OptimJson(m.optim) : json(nullptr);
  return j.dump(1);
}

absl::StatusOr<ShardedMetadata> MetadataFromJson(absl::string_view text, const std::string& where) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::DataLossError(absl::StrCat(where, ": not valid JSON (damaged or truncated)"));
  }
  if (!j.is_object() || !j.contains("format") || !j["format"].is_string() ||
      j["format"].get<std::string>() != kShardedFormatName) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": not an ", kShardedFormatName,
                                                   " checkpoint (no \"format\": \"",
                                                   kShardedFormatName, "\")"));
  }
  ShardedMetadata m;
  try {
    m = MetadataFromDocument(j, where);
  } catch (const BadMetadata& e) {
    return absl::InvalidArgumentError(e.message);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", e.what()));
  }
  FSDP_RETURN_IF_ERROR(ValidateMetadata(m, where));
  return m;
}

absl::StatusOr<std::string> StateValueToJson(const StateValue& value) {
  FSDP_ASSIGN_OR_RETURN(json j, ValueJson(value));
  return j.dump();
}

}  // namespace fsdp::checkpoint
