#include "checkpoint/sharded_format.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <tuple>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/atomic_dir.h"
#include "comm/status_macros.h"
#include "nlohmann/json.hpp"

namespace fsdp::checkpoint {

using json = nlohmann::ordered_json;
using optim_state::ParamGroup;
using optim_state::StateSequence;
using optim_state::StateValue;

namespace {

constexpr int64_t kMaxHeaderBytes = int64_t{256} << 20;
constexpr int64_t kMaxNumel = int64_t{1} << 56;

std::string Hex(uint64_t v) { return absl::StrFormat("%016x", v); }

bool ParseHex(const std::string& s, uint64_t* out) {
  if (s.size() != 16) return false;
  return absl::SimpleHexAtoi(s, out);
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  return absl::StrCat(dir, "/", name);
}

int64_t ElementSize(at::ScalarType t) { return static_cast<int64_t>(c10::elementSize(t)); }

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

// ---------------------------------------------------------------- validation

std::string RangeText(int64_t b, int64_t e) { return absl::StrCat("[", b, ", ", e, ")"); }

absl::Status Validate(const ShardedMetadata& m, const std::string& where) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", what));
  };
  if (m.world_size < 1) return bad(absl::StrCat("world_size ", m.world_size, " is not positive"));
  if (m.block_bytes < 1 || m.block_bytes > (int64_t{1} << 40)) {
    return bad(absl::StrCat("block_bytes ", m.block_bytes, " is out of range"));
  }
  std::set<std::string> names;
  for (const FileRecord& f : m.files) {
    if (f.name.empty() || f.name.find('/') != std::string::npos || f.name[0] == '.') {
      return bad(absl::StrCat("file name '", f.name, "' is not a plain file name"));
    }
    if (!names.insert(f.name).second) return bad(absl::StrCat("file '", f.name, "' listed twice"));
    if (f.header_bytes < 8 || f.header_bytes > kMaxHeaderBytes || f.size < f.header_bytes) {
      return bad(absl::StrCat("file '", f.name, "': header of ", f.header_bytes,
                              " bytes in a file of ", f.size, " bytes is out of bounds"));
    }
  }
  std::set<std::string> keys;
  for (const TensorRecord& t : m.tensors) {
    const std::string tw = absl::StrCat("tensor '", t.key, "'");
    if (!keys.insert(t.key).second) return bad(absl::StrCat(tw, " listed twice"));
    const std::string expected_key =
        t.is_optim ? absl::StrCat("optim/", t.fqn, "/", t.state) : absl::StrCat("model/", t.fqn);
    if (t.key != expected_key) return bad(absl::StrCat(tw, " does not match its fqn/state"));
    if (t.shape.size() > 64) return bad(absl::StrCat(tw, ": too many dimensions"));
    int64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) return bad(absl::StrCat(tw, ": negative dimension ", d));
      if (d > 0 && numel > kMaxNumel / d) return bad(absl::StrCat(tw, ": shape too large"));
      numel *= d;
    }
    const int64_t es = ElementSize(t.dtype);
    int64_t next = 0;
    for (const PieceRecord& p : t.pieces) {
      const std::string pw = absl::StrCat(tw, ": piece ", RangeText(p.begin, p.end));
      if (p.begin != next || p.end < p.begin || p.end > numel) {
        return bad(absl::StrCat(tw, ": pieces do not tile [0, ", numel, "): expected one at ", next,
                                ", found ", RangeText(p.begin, p.end)));
      }
      next = p.end;
      if (p.file == -1) {
        if (!t.is_optim || p.bytes != 0 || !p.block_xxh64.empty()) {
          return bad(absl::StrCat(pw, ": a zero piece must be optimizer state without bytes"));
        }
        continue;
      }
      if (p.file < 0 || p.file >= static_cast<int>(m.files.size())) {
        return bad(absl::StrCat(pw, ": file index ", p.file, " is out of range"));
      }
      const FileRecord& f = m.files[static_cast<size_t>(p.file)];
      if (p.bytes != (p.end - p.begin) * es) {
        return bad(absl::StrCat(pw, ": ", p.bytes, " bytes for ", p.end - p.begin, " elements of ",
                                es, " bytes"));
      }
      if (p.offset < f.header_bytes || p.offset > f.size || p.bytes > f.size - p.offset) {
        // (Not offset + bytes: the claims may be anything, and their sum overflow.)
        return bad(absl::StrCat(pw, ": ", p.bytes, " bytes at offset ", p.offset,
                                " lie outside the data of '", f.name, "' (", f.size, " bytes)"));
      }
      const int64_t blocks = (p.bytes + m.block_bytes - 1) / m.block_bytes;
      if (static_cast<int64_t>(p.block_xxh64.size()) != blocks) {
        return bad(
            absl::StrCat(pw, ": ", p.block_xxh64.size(), " checksums for ", blocks, " blocks"));
      }
    }
    if (next != numel) {
      return bad(absl::StrCat(tw, ": pieces cover [0, ", next, ") of [0, ", numel, ")"));
    }
  }
  // Sizes in metadata.json are claims that the reader allocates by. Each byte of a data file
  // belongs to at most one piece, so the bytes of all pieces are at most the files' sizes (which
  // the reader checks against the real files before reading); and zeros stand only for state
  // of a stored parameter, with its shape, so they are no larger than it (found by
  // sharded_data_fuzz: either made a few hundred bytes of metadata.json cost gigabytes).
  std::vector<std::tuple<int, int64_t, int64_t, const TensorRecord*>> extents;
  for (const TensorRecord& t : m.tensors) {
    bool zeros = false;
    for (const PieceRecord& p : t.pieces) {
      if (p.file == -1) zeros = true;
      if (p.file >= 0 && p.bytes > 0) extents.emplace_back(p.file, p.offset, p.bytes, &t);
    }
    if (!zeros) continue;
    const TensorRecord* param = m.FindTensor(absl::StrCat("model/", t.fqn));
    if (param == nullptr || param->numel() != t.numel()) {
      return bad(absl::StrCat("tensor '", t.key,
                              "' holds zeros (state no rank held) but is not shaped as the stored "
                              "parameter 'model/",
                              t.fqn, "'"));
    }
  }
  std::sort(extents.begin(), extents.end(), [](const auto& a, const auto& b) {
    return std::tie(std::get<0>(a), std::get<1>(a)) < std::tie(std::get<0>(b), std::get<1>(b));
  });
  for (size_t i = 1; i < extents.size(); ++i) {
    const auto& [file, offset, bytes, t] = extents[i];
    const auto& [prev_file, prev_offset, prev_bytes, prev_t] = extents[i - 1];
    if (file == prev_file && offset < prev_offset + prev_bytes) {
      return bad(absl::StrCat("tensor '", t->key, "': bytes ", RangeText(offset, offset + bytes),
                              " of '", m.files[static_cast<size_t>(file)].name,
                              "' overlap those of tensor '", prev_t->key, "'"));
    }
  }
  for (const auto& [key, stored] : m.model_keys) {
    const TensorRecord* t = m.FindTensor(absl::StrCat("model/", stored));
    if (t == nullptr) {
      return bad(absl::StrCat("model key '", key, "' refers to '", stored,
                              "', which is not a stored model tensor"));
    }
  }
  if (m.has_optim) {
    for (const OptimParamRecord& p : m.optim.state) {
      for (const OptimValueRecord& v : p.values) {
        if (!v.is_tensor) continue;
        const TensorRecord* t = m.FindTensor(v.tensor_key);
        if (t == nullptr || !t->is_optim) {
          return bad(absl::StrCat("optimizer state '", v.name, "' of '", p.fqn, "' refers to '",
                                  v.tensor_key, "', which is not a stored optimizer tensor"));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------- small public helpers

std::string DataFileName(int rank, int world_size) {
  return absl::StrCat("rank-", rank, "-of-", world_size, ".safetensors");
}

absl::StatusOr<std::string> SafetensorsDtype(at::ScalarType type) {
  switch (type) {
    case at::kDouble:
      return std::string("F64");
    case at::kFloat:
      return std::string("F32");
    case at::kHalf:
      return std::string("F16");
    case at::kBFloat16:
      return std::string("BF16");
    case at::kLong:
      return std::string("I64");
    case at::kInt:
      return std::string("I32");
    case at::kShort:
      return std::string("I16");
    case at::kChar:
      return std::string("I8");
    case at::kByte:
      return std::string("U8");
    case at::kBool:
      return std::string("BOOL");
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("dtype ", c10::toString(type), " has no safetensors name"));
  }
}

absl::StatusOr<at::ScalarType> ScalarTypeFromSafetensors(absl::string_view name) {
  static const std::pair<const char*, at::ScalarType> kTypes[] = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}};
  for (const auto& [n, t] : kTypes) {
    if (name == n) return t;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", name, "\""));
}

uint64_t Xxh64(const void* data, size_t bytes) { return XXH64(data, bytes, 0); }

int64_t TensorRecord::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const TensorRecord* ShardedMetadata::FindTensor(const std::string& key) const {
  for (const TensorRecord& t : tensors) {
    if (t.key == key) return &t;
  }
  return nullptr;
}

absl::StatusOr<std::string> StateValueToJson(const StateValue& value) {
  FSDP_ASSIGN_OR_RETURN(json j, ValueJson(value));
  return j.dump();
}

absl::string_view CheckpointKindName(CheckpointKind kind) {
  return kind == CheckpointKind::kFull ? "full" : "sharded";
}

// ---------------------------------------------------------------- metadata.json

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
  json files = json::array();
  for (const FileRecord& f : m.files) {
    files.push_back(json{{"name", f.name},
                         {"rank", f.rank},
                         {"size", f.size},
                         {"header_bytes", f.header_bytes},
                         {"header_xxh64", Hex(f.header_xxh64)}});
  }
  j["files"] = std::move(files);
  json tensors = json::array();
  for (const TensorRecord& t : m.tensors) {
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
    tensors.push_back(json{{"key", t.key},
                           {"kind", t.is_optim ? "optim" : "model"},
                           {"fqn", t.fqn},
                           {"state", t.state},
                           {"shape", t.shape},
                           {"dtype", SafetensorsDtype(t.dtype).value_or("?")},
                           {"pieces", std::move(pieces)}});
  }
  j["tensors"] = std::move(tensors);
  json model_keys = json::array();
  for (const auto& [k, v] : m.model_keys) model_keys.push_back(json::array({k, v}));
  j["model_keys"] = std::move(model_keys);
  if (!m.has_optim) {
    j["optim"] = nullptr;
  } else {
    json state = json::array();
    for (const OptimParamRecord& p : m.optim.state) {
      json values = json::array();
      for (const OptimValueRecord& v : p.values) {
        if (v.is_tensor) {
          values.push_back(json{{"name", v.name}, {"tensor", v.tensor_key}});
        } else {
          values.push_back(json{{"name", v.name},
                                {"value", ValueJson(v.value).value_or(json{{"type", "none"}})}});
        }
      }
      state.push_back(json{{"fqn", p.fqn}, {"values", std::move(values)}});
    }
    json groups = json::array();
    for (const ParamGroup& g : m.optim.param_groups) {
      json hyper = json::array();
      for (const auto& [name, value] : g.hyper_params) {
        hyper.push_back(
            json{{"name", name}, {"value", ValueJson(value).value_or(json{{"type", "none"}})}});
      }
      json params = json::array();
      for (const auto& key : g.params) params.push_back(key.is_fqn() ? key.fqn() : "");
      groups.push_back(json{{"hyper_params", std::move(hyper)}, {"params", std::move(params)}});
    }
    j["optim"] = json{{"has_param_groups", m.optim.has_param_groups},
                      {"state", std::move(state)},
                      {"param_groups", std::move(groups)}};
  }
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
    const int64_t version = GetInt(j, "version", where);
    if (version != kShardedFormatVersion) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": format version ", version, " is not supported (this reader reads version ",
          kShardedFormatVersion, ")"));
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
    const json& files = GetArray(j, "files", where);
    for (size_t i = 0; i < files.size(); ++i) {
      const std::string fw = absl::StrCat(where, ": files[", i, "]");
      FileRecord f;
      f.name = GetStr(files[i], "name", fw);
      f.rank = static_cast<int>(GetInt(files[i], "rank", fw));
      f.size = GetInt(files[i], "size", fw);
      f.header_bytes = GetInt(files[i], "header_bytes", fw);
      if (!ParseHex(GetStr(files[i], "header_xxh64", fw), &f.header_xxh64)) {
        Bad(absl::StrCat(fw, ".header_xxh64 is not 16 hex digits"));
      }
      m.files.push_back(std::move(f));
    }
    const json& tensors = GetArray(j, "tensors", where);
    for (size_t i = 0; i < tensors.size(); ++i) {
      const json& tj = tensors[i];
      const std::string tw = absl::StrCat(where, ": tensors[", i, "]");
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
        const std::string pw = absl::StrCat(tw, ".pieces[", k, "]");
        PieceRecord p;
        const int64_t file = GetInt(pieces[k], "file", pw);
        if (file < -1 || file > (1 << 24)) Bad(absl::StrCat(pw, ": file index out of range"));
        p.file = static_cast<int>(file);
        p.begin = GetInt(pieces[k], "begin", pw);
        p.end = GetInt(pieces[k], "end", pw);
        p.offset = GetInt(pieces[k], "offset", pw);
        p.bytes = GetInt(pieces[k], "bytes", pw);
        const json& hashes = GetArray(pieces[k], "xxh64", pw);
        for (const json& h : hashes) {
          uint64_t v = 0;
          if (!h.is_string() || !ParseHex(h.get<std::string>(), &v)) {
            Bad(absl::StrCat(pw, ": a checksum is not 16 hex digits"));
          }
          p.block_xxh64.push_back(v);
        }
        t.pieces.push_back(std::move(p));
      }
      m.tensors.push_back(std::move(t));
    }
    const json& model_keys = GetArray(j, "model_keys", where);
    for (const json& kv : model_keys) {
      if (!kv.is_array() || kv.size() != 2 || !kv[0].is_string() || !kv[1].is_string()) {
        Bad(absl::StrCat(where, ": model_keys entries are [key, stored fqn]"));
      }
      m.model_keys.emplace_back(kv[0].get<std::string>(), kv[1].get<std::string>());
    }
    const json& optim = Field(j, "optim", where);
    m.has_optim = !optim.is_null();
    if (m.has_optim) {
      const std::string ow = absl::StrCat(where, ": optim");
      const json& hpg = Field(optim, "has_param_groups", ow);
      if (!hpg.is_boolean()) Bad(absl::StrCat(ow, ".has_param_groups is not a bool"));
      m.optim.has_param_groups = hpg.get<bool>();
      const json& state = GetArray(optim, "state", ow);
      for (size_t i = 0; i < state.size(); ++i) {
        const std::string sw = absl::StrCat(ow, ".state[", i, "]");
        OptimParamRecord p;
        p.fqn = GetStr(state[i], "fqn", sw);
        for (const json& v : GetArray(state[i], "values", sw)) {
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
        m.optim.state.push_back(std::move(p));
      }
      const json& groups = GetArray(optim, "param_groups", ow);
      for (size_t g = 0; g < groups.size(); ++g) {
        const std::string gw = absl::StrCat(ow, ".param_groups[", g, "]");
        ParamGroup group;
        for (const json& h : GetArray(groups[g], "hyper_params", gw)) {
          const std::string name = GetStr(h, "name", gw);
          group.hyper_params.Set(
              name, ValueFromJson(Field(h, "value", gw), absl::StrCat(gw, "['", name, "']")));
        }
        for (const json& p : GetArray(groups[g], "params", gw)) {
          if (!p.is_string()) Bad(absl::StrCat(gw, ".params holds a non-string"));
          group.params.push_back(optim_state::ParamKey::Fqn(p.get<std::string>()));
        }
        m.optim.param_groups.push_back(std::move(group));
      }
    }
  } catch (const BadMetadata& e) {
    return absl::InvalidArgumentError(e.message);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", e.what()));
  }
  FSDP_RETURN_IF_ERROR(Validate(m, where));
  return m;
}

absl::Status FinalizeMetadata(ShardedMetadata& m) {
  for (TensorRecord& t : m.tensors) {
    std::sort(t.pieces.begin(), t.pieces.end(),
              [](const PieceRecord& a, const PieceRecord& b) { return a.begin < b.begin; });
    if (!t.is_optim) continue;
    // Optimizer state of ranges that no rank held state for (use_orig_params: a slice that
    // got no gradient) is zeros, as FSDP fills it when flattening.
    std::vector<PieceRecord> filled;
    int64_t next = 0;
    for (PieceRecord& p : t.pieces) {
      if (p.begin > next) filled.push_back(PieceRecord{-1, next, p.begin, 0, 0, {}});
      next = std::max(next, p.end);
      filled.push_back(std::move(p));
    }
    if (next < t.numel()) filled.push_back(PieceRecord{-1, next, t.numel(), 0, 0, {}});
    t.pieces = std::move(filled);
  }
  return Validate(m, "sharded checkpoint metadata being saved");
}

// ---------------------------------------------------------------- data files

absl::StatusOr<WrittenFile> WriteDataFile(const std::string& path,
                                          const std::vector<PieceToWrite>& pieces,
                                          const std::map<std::string, std::string>& header_metadata,
                                          int64_t block_bytes) {
  if (block_bytes < 1) return absl::InvalidArgumentError("block_bytes must be positive");
  json header;
  std::set<std::string> keys;
  int64_t data_bytes = 0;
  std::vector<at::Tensor> contiguous;
  for (const PieceToWrite& p : pieces) {
    if (!keys.insert(p.key).second) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": key '", p.key, "' given twice"));
    }
    absl::StatusOr<std::string> dtype = SafetensorsDtype(p.data.scalar_type());
    if (!dtype.ok()) return Annotate(dtype.status(), absl::StrCat(path, ": '", p.key, "'"));
    at::Tensor c = p.data.detach().reshape({-1}).contiguous();
    const int64_t nbytes = c.numel() * ElementSize(c.scalar_type());
    header[p.key] = json{{"dtype", *dtype},
                         {"shape", json::array({c.numel()})},
                         {"data_offsets", json::array({data_bytes, data_bytes + nbytes})}};
    data_bytes += nbytes;
    contiguous.push_back(std::move(c));
  }
  json meta = json::object();
  for (const auto& [k, v] : header_metadata) meta[k] = v;
  header["__metadata__"] = std::move(meta);
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  std::string head(8, '\0');
  uint64_t len = text.size();
  for (int i = 0; i < 8; ++i)
    head[static_cast<size_t>(i)] = static_cast<char>((len >> (8 * i)) & 0xff);
  head += text;

  WrittenFile out;
  out.header_bytes = static_cast<int64_t>(head.size());
  out.header_xxh64 = Xxh64(head.data(), head.size());
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    return absl::InternalError(absl::StrCat("cannot create ", path, ": ", strerror(errno)));
  auto write_all = [&](const char* data, int64_t n) -> absl::Status {
    while (n > 0) {
      const ssize_t w = write(fd, data, static_cast<size_t>(n));
      if (w < 0) {
        if (errno == EINTR) continue;
        return absl::InternalError(absl::StrCat("cannot write ", path, ": ", strerror(errno)));
      }
      data += w;
      n -= w;
    }
    return absl::OkStatus();
  };
  absl::Status status = write_all(head.data(), static_cast<int64_t>(head.size()));
  int64_t offset = out.header_bytes;
  for (size_t i = 0; i < pieces.size() && status.ok(); ++i) {
    const at::Tensor& c = contiguous[i];
    const char* data = static_cast<const char*>(c.data_ptr());
    const int64_t nbytes = c.numel() * ElementSize(c.scalar_type());
    WrittenPiece wp;
    wp.key = pieces[i].key;
    wp.offset = offset;
    wp.bytes = nbytes;
    for (int64_t b = 0; b < nbytes; b += block_bytes) {
      wp.block_xxh64.push_back(
          Xxh64(data + b, static_cast<size_t>(std::min(block_bytes, nbytes - b))));
    }
    status = write_all(data, nbytes);
    offset += nbytes;
    out.pieces.push_back(std::move(wp));
    if (i + 1 == pieces.size() / 2) CrashPoint("data file half written");
  }
  if (status.ok()) {
    CrashPoint("data file written");
    if (fsync(fd) != 0) {
      status = absl::InternalError(absl::StrCat("cannot fsync ", path, ": ", strerror(errno)));
    }
  }
  if (close(fd) != 0 && status.ok()) {
    status = absl::InternalError(absl::StrCat("cannot close ", path, ": ", strerror(errno)));
  }
  if (!status.ok()) return status;
  CrashPoint("data file fsynced");
  out.size = offset;
  return out;
}

// ---------------------------------------------------------------- reader

ShardedCheckpointReader::~ShardedCheckpointReader() {
  for (int fd : fds_) {
    if (fd >= 0) close(fd);
  }
}

absl::StatusOr<std::unique_ptr<ShardedCheckpointReader>> ShardedCheckpointReader::Open(
    const std::string& dir) {
  std::unique_ptr<ShardedCheckpointReader> r(new ShardedCheckpointReader());
  r->dir_ = dir;
  const std::string path = JoinPath(dir, "metadata.json");
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat(path,
                                              ": no such file (not a sharded checkpoint, "
                                              "or a save that never completed)"));
    }
    return absl::InternalError(absl::StrCat("cannot open ", path, ": ", strerror(errno)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", strerror(errno)));
  }
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = read(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  close(fd);
  text.resize(done);
  r->stats_.bytes_read += static_cast<int64_t>(done);
  FSDP_ASSIGN_OR_RETURN(r->metadata_, MetadataFromJson(text, path));
  r->fds_.assign(r->metadata_.files.size(), -1);
  r->checked_.assign(r->metadata_.files.size(), false);
  return r;
}

absl::Status ShardedCheckpointReader::OpenFile(int file) {
  if (checked_[static_cast<size_t>(file)]) return absl::OkStatus();
  // A file that failed its checks before is opened and checked again (and reports the same
  // error); its earlier descriptor is closed first, not leaked (found by sharded_data_fuzz).
  if (fds_[static_cast<size_t>(file)] >= 0) {
    close(fds_[static_cast<size_t>(file)]);
    fds_[static_cast<size_t>(file)] = -1;
  }
  const FileRecord& f = metadata_.files[static_cast<size_t>(file)];
  const std::string path = JoinPath(dir_, f.name);
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat(path, ": no such file (the data file of rank ",
                                              f.rank, " of ", metadata_.world_size, ")"));
    }
    return absl::InternalError(absl::StrCat("cannot open ", path, ": ", strerror(errno)));
  }
  fds_[static_cast<size_t>(file)] = fd;
  ++stats_.files_opened;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", strerror(errno)));
  }
  if (st.st_size < f.size) {
    return absl::DataLossError(
        absl::StrCat(path, ": truncated: ", st.st_size, " bytes, metadata.json says ", f.size));
  }
  if (st.st_size > f.size) {
    return absl::DataLossError(absl::StrCat(path, ": ", st.st_size, " bytes, metadata.json says ",
                                            f.size, " (not the file this checkpoint wrote)"));
  }
  // The header: its length, then its checksum; a damaged one is diagnosed further.
  std::string head(static_cast<size_t>(f.header_bytes), '\0');
  FSDP_RETURN_IF_ERROR(PRead(file, 0, f.header_bytes, head.data()));
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i)
    len = (len << 8) | static_cast<unsigned char>(head[static_cast<size_t>(i)]);
  if (len != static_cast<uint64_t>(f.header_bytes - 8)) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", len,
                                            " disagrees with metadata.json (", f.header_bytes - 8,
                                            "): damaged or not this checkpoint's file"));
  }
  if (Xxh64(head.data(), head.size()) != f.header_xxh64) {
    json h = json::parse(head.begin() + 8, head.end(), nullptr, /*allow_exceptions=*/false);
    if (h.is_discarded() || !h.is_object()) {
      return absl::DataLossError(absl::StrCat(path, ": header JSON is damaged"));
    }
    if (h.contains("__metadata__") && h["__metadata__"].is_object() &&
        h["__metadata__"].contains("checkpoint_id") &&
        h["__metadata__"]["checkpoint_id"] != json(metadata_.checkpoint_id)) {
      return absl::DataLossError(absl::StrCat(
          path, ": belongs to another checkpoint (id ", h["__metadata__"]["checkpoint_id"].dump(),
          ", metadata.json's is \"", metadata_.checkpoint_id, "\")"));
    }
    return absl::DataLossError(absl::StrCat(path, ": header checksum mismatch (damaged)"));
  }
  checked_[static_cast<size_t>(file)] = true;
  return absl::OkStatus();
}

absl::Status ShardedCheckpointReader::PRead(int file, int64_t offset, int64_t bytes, char* out) {
  const int fd = fds_[static_cast<size_t>(file)];
  const std::string& name = metadata_.files[static_cast<size_t>(file)].name;
  while (bytes > 0) {
    const ssize_t n = pread(fd, out, static_cast<size_t>(bytes), offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(
          absl::StrCat("cannot read ", JoinPath(dir_, name), ": ", strerror(errno)));
    }
    if (n == 0) {
      return absl::DataLossError(
          absl::StrCat(JoinPath(dir_, name), ": truncated: nothing at byte ", offset));
    }
    stats_.bytes_read += n;
    out += n;
    offset += n;
    bytes -= n;
  }
  return absl::OkStatus();
}

absl::Status ShardedCheckpointReader::ReadRange(const TensorRecord& tensor, int64_t begin,
                                                int64_t end, at::Tensor& out) {
  const std::string what =
      absl::StrCat("reading '", tensor.key, "' elements ", RangeText(begin, end));
  if (begin < 0 || end < begin || end > tensor.numel()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": out of range of ", tensor.numel(), " elements"));
  }
  if (!out.defined() || !out.is_contiguous() || out.numel() != end - begin ||
      out.scalar_type() != tensor.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the output must be a contiguous ",
                                                   c10::toString(tensor.dtype), " tensor of ",
                                                   end - begin, " elements"));
  }
  const int64_t es = ElementSize(tensor.dtype);
  const int64_t bb = metadata_.block_bytes;
  char* dst = static_cast<char*>(out.data_ptr());
  for (const PieceRecord& p : tensor.pieces) {
    const int64_t ob = std::max(begin, p.begin);
    const int64_t oe = std::min(end, p.end);
    if (ob >= oe) continue;
    char* to = dst + (ob - begin) * es;
    if (p.file < 0) {
      std::memset(to, 0, static_cast<size_t>((oe - ob) * es));
      continue;
    }
    FSDP_RETURN_IF_ERROR(OpenFile(p.file), what);
    const std::string& name = metadata_.files[static_cast<size_t>(p.file)].name;
    // Bytes [rb, re) of the piece are wanted; they land at `to`. Block by block: a block the
    // range covers whole is read straight into its place in `out` and hashed there while it is
    // still in the cache; a block it covers in part (at most the first and the last) is read
    // into the scratch block and only its wanted part copied. Every block read is verified.
    const int64_t rb = (ob - p.begin) * es;
    const int64_t re = (oe - p.begin) * es;
    for (int64_t b = rb / bb; b * bb < re; ++b) {
      const int64_t block_begin = b * bb;
      const int64_t n = std::min(bb, p.bytes - block_begin);
      const bool whole = block_begin >= rb && block_begin + n <= re;
      char* into = whole ? to + (block_begin - rb) : Scratch(n);
      FSDP_RETURN_IF_ERROR(PRead(p.file, p.offset + block_begin, n, into), what);
      stats_.data_bytes_read += n;
      if (Xxh64(into, static_cast<size_t>(n)) != p.block_xxh64[static_cast<size_t>(b)]) {
        return absl::DataLossError(absl::StrCat(
            what, ": ", JoinPath(dir_, name), ": checksum mismatch in bytes ",
            RangeText(p.offset + block_begin, p.offset + block_begin + n), " (damaged)"));
      }
      if (!whole) {
        const int64_t from = std::max(rb, block_begin);
        const int64_t upto = std::min(re, block_begin + n);
        std::memcpy(to + (from - rb), into + (from - block_begin),
                    static_cast<size_t>(upto - from));
      }
    }
  }
  return absl::OkStatus();
}

char* ShardedCheckpointReader::Scratch(int64_t bytes) {
  // Grown to the largest partly read block (no more than a block of a piece whose file is
  // checked to hold it), uninitialised: it is always read into before use.
  if (scratch_bytes_ < bytes) {
    scratch_.reset(new char[static_cast<size_t>(bytes)]);
    scratch_bytes_ = bytes;
  }
  return scratch_.get();
}

absl::StatusOr<at::Tensor> ShardedCheckpointReader::ReadTensor(const TensorRecord& tensor) {
  // The tensor is allocated whole before it is read: first check the files that back its size
  // against their real sizes (its pieces' files; for zeros, those of the parameter it mirrors,
  // see Validate), so that metadata.json's claims alone never size an allocation.
  const TensorRecord* param = &tensor;
  for (const PieceRecord& p : tensor.pieces) {
    if (p.file == -1) param = metadata_.FindTensor(absl::StrCat("model/", tensor.fqn));
  }
  for (const TensorRecord* t : {&tensor, param}) {
    for (const PieceRecord& p : t->pieces) {
      if (p.file >= 0) {
        FSDP_RETURN_IF_ERROR(OpenFile(p.file), absl::StrCat("reading '", tensor.key, "'"));
      }
    }
  }
  at::Tensor out = at::empty({tensor.numel()}, at::TensorOptions().dtype(tensor.dtype));
  FSDP_RETURN_IF_ERROR(ReadRange(tensor, 0, tensor.numel(), out));
  return out.view(tensor.shape);
}

absl::StatusOr<std::vector<ShardedCheckpointReader::BadRange>> ShardedCheckpointReader::Verify() {
  std::vector<BadRange> bad;
  const int64_t bb = metadata_.block_bytes;
  for (size_t file = 0; file < metadata_.files.size(); ++file) {
    const FileRecord& f = metadata_.files[file];
    absl::Status opened = OpenFile(static_cast<int>(file));
    int64_t actual_size = f.size;
    if (!opened.ok()) {
      bad.push_back(BadRange{f.name, 0, f.size, "", std::string(opened.message())});
      if (fds_[file] < 0) continue;  // missing: nothing more to check
      struct stat st;
      if (fstat(fds_[file], &st) == 0) actual_size = st.st_size;
    }
    for (const TensorRecord& t : metadata_.tensors) {
      for (const PieceRecord& p : t.pieces) {
        if (p.file != static_cast<int>(file)) continue;
        std::string buffer;
        int64_t bad_begin = -1;
        auto flush = [&](int64_t upto) {
          if (bad_begin < 0) return;
          bad.push_back(
              BadRange{f.name, p.offset + bad_begin, upto - bad_begin, t.key, "checksum mismatch"});
          bad_begin = -1;
        };
        for (int64_t b = 0; b * bb < p.bytes; ++b) {
          const int64_t n = std::min(bb, p.bytes - b * bb);
          bool ok = p.offset + b * bb + n <= actual_size;
          if (ok) {
            buffer.resize(static_cast<size_t>(n));
            ok = PRead(static_cast<int>(file), p.offset + b * bb, n, buffer.data()).ok() &&
                 Xxh64(buffer.data(), static_cast<size_t>(n)) ==
                     p.block_xxh64[static_cast<size_t>(b)];
          }
          if (!ok && bad_begin < 0) bad_begin = b * bb;
          if (ok) flush(b * bb);
        }
        flush(p.bytes);
      }
    }
  }
  return bad;
}

// ---------------------------------------------------------------- whole checkpoints

absl::StatusOr<FullContents> ReadFullContents(ShardedCheckpointReader& reader) {
  const ShardedMetadata& m = reader.metadata();
  FullContents out;
  std::map<std::string, at::Tensor> model_tensors;
  for (const auto& [key, stored] : m.model_keys) {
    auto it = model_tensors.find(stored);
    if (it == model_tensors.end()) {
      FSDP_ASSIGN_OR_RETURN(at::Tensor t,
                            reader.ReadTensor(*m.FindTensor(absl::StrCat("model/", stored))));
      it = model_tensors.emplace(stored, t).first;
    }
    out.model.emplace_back(key, it->second);
  }
  out.has_optim = m.has_optim;
  if (!m.has_optim) return out;
  out.optim.has_param_groups = m.optim.has_param_groups;
  out.optim.param_groups = m.optim.param_groups;
  for (const OptimParamRecord& p : m.optim.state) {
    // full_optim_state_dict's order: positive-dimension tensors, zero-dimension tensors, then
    // the other values, each by name.
    std::vector<std::pair<std::string, StateValue>> pos, zero, other;
    for (const OptimValueRecord& v : p.values) {
      if (v.is_tensor) {
        FSDP_ASSIGN_OR_RETURN(at::Tensor t, reader.ReadTensor(*m.FindTensor(v.tensor_key)));
        pos.emplace_back(v.name, StateValue(t));
      } else if (const at::Tensor* t = v.value.GetIf<at::Tensor>()) {
        zero.emplace_back(v.name, StateValue(*t));
      } else {
        other.emplace_back(v.name, v.value);
      }
    }
    optim_state::ParamState state;
    for (auto* list : {&pos, &zero, &other}) {
      std::sort(list->begin(), list->end(),
                [](const auto& a, const auto& b) { return a.first < b.first; });
      for (auto& [name, value] : *list) state.Set(name, std::move(value));
    }
    out.optim.state.Set(optim_state::ParamKey::Fqn(p.fqn), std::move(state));
  }
  return out;
}

absl::Status WriteShardedFromFull(const std::string& dir,
                                  const std::vector<std::pair<std::string, at::Tensor>>& model,
                                  const optim_state::OptimStateDict* optim, int world_size,
                                  int64_t block_bytes) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size ", world_size, " is not positive"));
  }
  ShardedMetadata m;
  m.checkpoint_id = RandomNonce();
  m.world_size = world_size;
  m.saved_with["written_by"] = "WriteShardedFromFull (even element ranges)";
  m.block_bytes = block_bytes;
  std::vector<std::vector<PieceToWrite>> per_rank(static_cast<size_t>(world_size));
  auto add_tensor = [&](TensorRecord record, const at::Tensor& t) -> absl::Status {
    record.shape = t.sizes().vec();
    record.dtype = t.scalar_type();
    FSDP_RETURN_IF_ERROR(SafetensorsDtype(t.scalar_type()).status(), record.key);
    const at::Tensor flat = t.detach().reshape({-1});
    const int64_t n = flat.numel();
    for (int r = 0; r < world_size; ++r) {
      const int64_t b = n / world_size * r + std::min<int64_t>(r, n % world_size);
      const int64_t e = b + n / world_size + (r < n % world_size ? 1 : 0);
      if (e > b)
        per_rank[static_cast<size_t>(r)].push_back(PieceToWrite{record.key, flat.slice(0, b, e)});
    }
    m.tensors.push_back(std::move(record));
    return absl::OkStatus();
  };
  std::map<const c10::TensorImpl*, std::string> stored_as;
  for (const auto& [key, t] : model) {
    if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat("'", key, "' is undefined"));
    auto it = stored_as.find(t.unsafeGetTensorImpl());
    if (it != stored_as.end()) {
      m.model_keys.emplace_back(key, it->second);
      continue;
    }
    stored_as[t.unsafeGetTensorImpl()] = key;
    m.model_keys.emplace_back(key, key);
    TensorRecord r;
    r.key = absl::StrCat("model/", key);
    r.fqn = key;
    FSDP_RETURN_IF_ERROR(add_tensor(std::move(r), t));
  }
  if (optim != nullptr) {
    m.has_optim = true;
    m.optim.has_param_groups = optim->has_param_groups;
    m.optim.param_groups = optim->param_groups;
    for (const auto& [key, state] : optim->state) {
      if (!key.is_fqn()) {
        return absl::InvalidArgumentError(
            absl::StrCat("optimizer state key ", key.ToString(),
                         " is an ID; a sharded checkpoint is FQN-keyed"));
      }
      OptimParamRecord p;
      p.fqn = key.fqn();
      for (const auto& [name, value] : state) {
        OptimValueRecord v;
        v.name = name;
        const at::Tensor* t = value.GetIf<at::Tensor>();
        if (t != nullptr && t->defined() && t->dim() > 0) {
          v.is_tensor = true;
          v.tensor_key = absl::StrCat("optim/", p.fqn, "/", name);
          TensorRecord r;
          r.key = v.tensor_key;
          r.is_optim = true;
          r.fqn = p.fqn;
          r.state = name;
          FSDP_RETURN_IF_ERROR(add_tensor(std::move(r), *t));
        } else {
          FSDP_RETURN_IF_ERROR(ValueJson(value).status(),
                               absl::StrCat("optimizer state '", name, "' of '", p.fqn, "'"));
          v.value = value;
        }
        p.values.push_back(std::move(v));
      }
      m.optim.state.push_back(std::move(p));
    }
    for (const ParamGroup& g : m.optim.param_groups) {
      for (const auto& k : g.params) {
        if (!k.is_fqn()) {
          return absl::InvalidArgumentError(
              "param_groups list IDs; a sharded checkpoint is FQN-keyed");
        }
      }
    }
  }
  FSDP_ASSIGN_OR_RETURN(std::string staging, CreateStagingDir(dir));
  std::map<std::string, TensorRecord*> by_key;
  for (TensorRecord& t : m.tensors) by_key[t.key] = &t;
  for (int r = 0; r < world_size; ++r) {
    FileRecord f;
    f.name = DataFileName(r, world_size);
    f.rank = r;
    FSDP_ASSIGN_OR_RETURN(WrittenFile w,
                          WriteDataFile(JoinPath(staging, f.name), per_rank[static_cast<size_t>(r)],
                                        {{"format", std::string(kShardedFormatName)},
                                         {"version", absl::StrCat(kShardedFormatVersion)},
                                         {"checkpoint_id", m.checkpoint_id},
                                         {"rank", absl::StrCat(r)},
                                         {"world_size", absl::StrCat(world_size)}},
                                        block_bytes));
    f.size = w.size;
    f.header_bytes = w.header_bytes;
    f.header_xxh64 = w.header_xxh64;
    m.files.push_back(f);
    const auto& pieces = per_rank[static_cast<size_t>(r)];
    for (size_t i = 0; i < pieces.size(); ++i) {
      PieceRecord p;
      p.file = r;
      p.offset = w.pieces[i].offset;
      p.bytes = w.pieces[i].bytes;
      p.block_xxh64 = w.pieces[i].block_xxh64;
      TensorRecord* t = by_key[pieces[i].key];
      const int64_t n = t->numel();
      p.begin = n / world_size * r + std::min<int64_t>(r, n % world_size);
      p.end = p.begin + pieces[i].data.numel();
      t->pieces.push_back(std::move(p));
    }
  }
  FSDP_RETURN_IF_ERROR(FinalizeMetadata(m));
  FSDP_RETURN_IF_ERROR(WriteFileDurably(JoinPath(staging, "metadata.json"), MetadataToJson(m)));
  return CommitStagingDir(staging, dir);
}

// ---------------------------------------------------------------- kinds

absl::StatusOr<CheckpointKind> DetectCheckpointKind(const std::string& dir) {
  struct stat st;
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no such checkpoint directory"));
  }
  const std::string metadata = JoinPath(dir, "metadata.json");
  if (stat(metadata.c_str(), &st) == 0) {
    std::ifstream in(metadata, std::ios::binary);
    std::string head(4096, '\0');
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    head.resize(static_cast<size_t>(in.gcount()));
    if (head.find(absl::StrCat("\"format\": \"", kShardedFormatName, "\"")) == std::string::npos &&
        head.find(absl::StrCat("\"format\":\"", kShardedFormatName, "\"")) == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(metadata, ": not an ", kShardedFormatName, " checkpoint"));
    }
    return CheckpointKind::kSharded;
  }
  if (stat(JoinPath(dir, "model.pt").c_str(), &st) == 0) return CheckpointKind::kFull;
  return absl::NotFoundError(absl::StrCat(
      dir, ": neither a sharded checkpoint (metadata.json) nor a full one (model.pt)"));
}

}  // namespace fsdp::checkpoint
