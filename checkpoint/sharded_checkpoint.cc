#include "checkpoint/sharded_checkpoint.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/atomic_dir.h"
#include "comm/status_macros.h"
#include "fsdp/state_dict.h"
#include "nlohmann/json.hpp"

namespace fsdp::checkpoint {
namespace {

using json = nlohmann::ordered_json;

// FSDP_ASSIGN_OR_RETURN with a context prefixed to the error.
#define CKPT_ASSIGN_OR_RETURN(lhs, expr, context) \
  CKPT_ASSIGN_OR_RETURN_IMPL_(FSDP_STATUS_CONCAT_(ckpt_statusor_, __LINE__), lhs, expr, context)
#define CKPT_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr, context)            \
  auto statusor = (expr);                                                    \
  if (!statusor.ok()) return ::fsdp::Annotate(statusor.status(), (context)); \
  lhs = std::move(statusor).value()

using optim_state::OptimizerAdapter;
using optim_state::OptimStateDict;
using optim_state::ParamGroup;
using optim_state::ParamKey;
using optim_state::ParamState;
using optim_state::StateValue;

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::string Where(absl::string_view op, const std::string& dir, const comm::ProcessGroup& g) {
  return absl::StrCat(op, "(", dir, ") (rank ", g.rank(), " of ", g.size(), ", group ", g.name(),
                      ")");
}

std::string TorchSize(c10::IntArrayRef shape) {
  return absl::StrCat("torch.Size([", absl::StrJoin(shape, ", "), "])");
}

// ---------------------------------------------------------------- the optimizer's parameters

enum class Role { kFlat, kOrig, kUnmanaged };

struct ParamRole {
  Role role = Role::kUnmanaged;
  FlatParamHandle* handle = nullptr;  // kFlat, kOrig
  size_t index = 0;                   // kOrig
  std::string fqn;                    // kOrig, kUnmanaged
};

std::vector<at::Tensor> OptimizerParams(const OptimizerAdapter& adapter) {
  std::vector<at::Tensor> out;
  for (auto& group : adapter.optimizer().param_groups()) {
    for (auto& p : group.params()) out.push_back(p);
  }
  return out;
}

absl::StatusOr<std::vector<ParamRole>> Roles(const FullyShardedDataParallel& fsdp,
                                             const std::vector<at::Tensor>& params) {
  absl::flat_hash_map<const c10::TensorImpl*, ParamRole> by_tensor;
  for (const auto& unit : fsdp.units()) {
    FlatParamHandle* h = unit.handle;
    if (h == nullptr) continue;
    if (!h->use_orig_params()) {
      by_tensor[h->flat_param().unsafeGetTensorImpl()] = ParamRole{Role::kFlat, h, 0, ""};
      continue;
    }
    for (size_t i = 0; i < h->params().size(); ++i) {
      by_tensor[h->params()[i].unsafeGetTensorImpl()] =
          ParamRole{Role::kOrig, h, i, h->infos()[i].fqns[0]};
    }
  }
  for (const auto& [fqn, t] : fsdp.unmanaged_parameters()) {
    by_tensor.emplace(t.unsafeGetTensorImpl(), ParamRole{Role::kUnmanaged, nullptr, 0, fqn});
  }
  std::vector<ParamRole> roles;
  for (size_t id = 0; id < params.size(); ++id) {
    auto it = by_tensor.find(params[id].unsafeGetTensorImpl());
    if (it == by_tensor.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the optimizer holds a parameter (ID ", id,
          ") that is neither a flat parameter, an original parameter of a unit, nor an "
          "unmanaged parameter of the model"));
    }
    roles.push_back(it->second);
  }
  return roles;
}

// The FQNs an optimizer parameter stands for.
std::vector<std::string> FqnsOf(const ParamRole& role) {
  if (role.role != Role::kFlat) return {role.fqn};
  std::vector<std::string> out;
  for (const FlatParamInfo& info : role.handle->infos()) out.push_back(info.fqns[0]);
  return out;
}

bool IsPosDim(const StateValue& v) {
  const at::Tensor* t = v.GetIf<at::Tensor>();
  return t != nullptr && t->defined() && t->dim() > 0;
}

// ---------------------------------------------------------------- agreement

// Every rank's status (code + message); the first failing rank's error on every rank.
absl::Status AgreeOn(comm::ProcessGroup& group, const std::string& where,
                     const absl::Status& local) {
  const std::string mine = local.ok() ? ""
                                      : json{{"code", static_cast<int>(local.code())},
                                             {"message", std::string(local.message())}}
                                            .dump();
  absl::StatusOr<std::vector<std::string>> all = group.AllGatherObject(mine);
  if (!all.ok()) return Annotate(all.status(), absl::StrCat(where, ": agreeing on errors"));
  if (!local.ok()) return Annotate(local, where);
  for (size_t r = 0; r < all->size(); ++r) {
    if ((*all)[r].empty()) continue;
    json j = json::parse((*all)[r], nullptr, false);
    const auto code = j.is_discarded() ? absl::StatusCode::kInternal
                                       : static_cast<absl::StatusCode>(j["code"].get<int>());
    const std::string message = j.is_discarded() ? "?" : j["message"].get<std::string>();
    return absl::Status(code,
                        absl::StrCat(where, ": nothing done: rank ", r, " failed: ", message));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------- save

struct LocalSave {
  std::vector<PieceToWrite> pieces;
  std::vector<std::pair<int64_t, int64_t>> ranges;  // element range of each piece
  std::vector<TensorRecord> model_tensors;          // descriptors (no pieces)
  std::vector<std::pair<std::string, std::string>> model_keys;
  json optim;   // [{"fqn", "values": [{"name", "tensor": {"dtype","shape"}} | {"name","value"}]}]
  json groups;  // rank 0's param_groups, FQN lists
};

absl::Status CollectModel(FullyShardedDataParallel& fsdp, int rank, LocalSave& out) {
  FSDP_ASSIGN_OR_RETURN(ShardedDict dict, ShardedStateDict(fsdp));
  std::unordered_map<const c10::TensorImpl*, std::string> stored;
  for (const auto& [fqn, value] : dict) {
    const at::Tensor& data = std::holds_alternative<LocalShard>(value)
                                 ? std::get<LocalShard>(value).data
                                 : std::get<at::Tensor>(value);
    auto it = stored.find(data.unsafeGetTensorImpl());
    if (it != stored.end()) {
      out.model_keys.emplace_back(fqn, it->second);
      continue;
    }
    stored.emplace(data.unsafeGetTensorImpl(), fqn);
    out.model_keys.emplace_back(fqn, fqn);
    TensorRecord t;
    t.key = absl::StrCat("model/", fqn);
    t.fqn = fqn;
    t.dtype = data.scalar_type();
    if (const LocalShard* shard = std::get_if<LocalShard>(&value)) {
      t.shape = shard->global_shape;
      if (shard->numel > 0 && (shard->world_size > 1 || rank == 0)) {
        out.pieces.push_back(PieceToWrite{t.key, shard->data});
        out.ranges.emplace_back(shard->flat_offset, shard->flat_offset + shard->numel);
      }
    } else {
      t.shape = data.sizes().vec();
      if (rank == 0 && data.numel() > 0) {
        out.pieces.push_back(PieceToWrite{t.key, data});
        out.ranges.emplace_back(0, data.numel());
      }
    }
    out.model_tensors.push_back(std::move(t));
  }
  return absl::OkStatus();
}

absl::Status CollectOptim(FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter, int rank,
                          LocalSave& out) {
  FSDP_ASSIGN_OR_RETURN(OptimStateDict osd, adapter.StateDict());
  const std::vector<at::Tensor> params = OptimizerParams(adapter);
  FSDP_ASSIGN_OR_RETURN(std::vector<ParamRole> roles, Roles(fsdp, params));
  out.optim = json::array();
  for (size_t id = 0; id < params.size(); ++id) {
    const ParamState* st = osd.state.Find(ParamKey::Id(static_cast<int64_t>(id)));
    if (st == nullptr) continue;
    const ParamRole& role = roles[id];
    const std::vector<std::string> fqns = FqnsOf(role);
    for (size_t i = 0; i < fqns.size(); ++i) {
      // Which elements of this original parameter the state tensors hold, and where.
      int64_t param_offset = 0, state_offset = 0, numel = 0;
      std::vector<int64_t> shape;
      bool write = true;
      if (role.role == Role::kUnmanaged) {
        shape = params[id].sizes().vec();
        numel = params[id].numel();
        write = rank == 0;
      } else {
        const size_t index = role.role == Role::kFlat ? i : role.index;
        const FlatParamHandle& h = *role.handle;
        const ParamShard ps = h.ShardOf(index, h.rank());
        shape = h.infos()[index].shape;
        param_offset = ps.param_offset;
        state_offset = role.role == Role::kFlat ? ps.shard_offset : 0;
        numel = ps.numel;
        write = h.sharded() || rank == 0;
      }
      json values = json::array();
      for (const auto& [name, value] : *st) {
        if (!IsPosDim(value)) {
          CKPT_ASSIGN_OR_RETURN(std::string v, StateValueToJson(value),
                                absl::StrCat("optimizer state '", name, "' of '", fqns[i], "'"));
          values.push_back(json{{"name", name}, {"value", json::parse(v)}});
          continue;
        }
        const at::Tensor flat = value.Get<at::Tensor>().detach().reshape({-1});
        if (state_offset + numel > flat.numel()) {
          return absl::InvalidArgumentError(
              absl::StrCat("optimizer state '", name, "' of '", fqns[i], "' has ", flat.numel(),
                           " elements; its parameter's slice needs [", state_offset, ", ",
                           state_offset + numel, ")"));
        }
        CKPT_ASSIGN_OR_RETURN(std::string dtype, SafetensorsDtype(flat.scalar_type()),
                              absl::StrCat("optimizer state '", name, "' of '", fqns[i], "'"));
        values.push_back(json{{"name", name}, {"tensor", {{"dtype", dtype}, {"shape", shape}}}});
        if (write && numel > 0) {
          const std::string key = absl::StrCat("optim/", fqns[i], "/", name);
          out.pieces.push_back(PieceToWrite{key, flat.narrow(0, state_offset, numel)});
          out.ranges.emplace_back(param_offset, param_offset + numel);
        }
      }
      out.optim.push_back(json{{"fqn", fqns[i]}, {"values", std::move(values)}});
    }
  }
  out.groups = json::array();
  if (!osd.has_param_groups) {
    out.groups = nullptr;
    return absl::OkStatus();
  }
  size_t id = 0;
  for (const ParamGroup& g : osd.param_groups) {
    json hyper = json::array();
    for (const auto& [name, value] : g.hyper_params) {
      CKPT_ASSIGN_OR_RETURN(std::string v, StateValueToJson(value),
                            absl::StrCat("hyper-parameter '", name, "'"));
      hyper.push_back(json{{"name", name}, {"value", json::parse(v)}});
    }
    json fqns = json::array();
    for (size_t k = 0; k < g.params.size(); ++k, ++id) {
      if (id >= roles.size()) return absl::InternalError("param_groups list more parameters");
      for (const std::string& fqn : FqnsOf(roles[id])) fqns.push_back(fqn);
    }
    out.groups.push_back(json{{"hyper_params", std::move(hyper)}, {"params", std::move(fqns)}});
  }
  return absl::OkStatus();
}

// Rank 0: metadata.json from every rank's description.
absl::StatusOr<ShardedMetadata> Assemble(const LocalSave& mine, const std::vector<json>& all,
                                         const std::string& id, int world_size,
                                         const FullyShardedDataParallel& fsdp, bool has_optim,
                                         int64_t block_bytes) {
  ShardedMetadata m;
  m.checkpoint_id = id;
  m.world_size = world_size;
  m.block_bytes = block_bytes;
  m.saved_with["sharding_strategy"] =
      std::string(ShardingStrategyName(fsdp.options().sharding_strategy));
  m.saved_with["use_orig_params"] = fsdp.options().use_orig_params ? "true" : "false";
  std::vector<std::string> units;
  for (const auto& u : fsdp.units()) units.push_back(absl::StrCat("'", u.module_prefix, "'"));
  m.saved_with["units"] = absl::StrJoin(units, ", ");
  m.model_keys = mine.model_keys;
  m.tensors = mine.model_tensors;
  m.has_optim = has_optim;
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < m.tensors.size(); ++i) index[m.tensors[i].key] = i;
  if (has_optim) {
    // Union over ranks in rank order: an FQN's entry and each value from the lowest rank that
    // has it.
    std::map<std::string, size_t> param_index;
    for (const json& rank_json : all) {
      for (const json& p : rank_json["optim"]) {
        const std::string fqn = p["fqn"].get<std::string>();
        auto it = param_index.find(fqn);
        if (it == param_index.end()) {
          it = param_index.emplace(fqn, m.optim.state.size()).first;
          m.optim.state.push_back(OptimParamRecord{fqn, {}});
        }
        OptimParamRecord& rec = m.optim.state[it->second];
        for (const json& v : p["values"]) {
          const std::string name = v["name"].get<std::string>();
          bool seen = false;
          for (const auto& existing : rec.values) seen = seen || existing.name == name;
          if (seen) continue;
          OptimValueRecord r;
          r.name = name;
          if (v.contains("tensor")) {
            r.is_tensor = true;
            r.tensor_key = absl::StrCat("optim/", fqn, "/", name);
            TensorRecord t;
            t.key = r.tensor_key;
            t.is_optim = true;
            t.fqn = fqn;
            t.state = name;
            t.shape = v["tensor"]["shape"].get<std::vector<int64_t>>();
            FSDP_ASSIGN_OR_RETURN(
                t.dtype, ScalarTypeFromSafetensors(v["tensor"]["dtype"].get<std::string>()));
            index[t.key] = m.tensors.size();
            m.tensors.push_back(std::move(t));
          } else {
            // Parse through the reader's own decoding (one definition of the encoding).
            ShardedMetadata tmp;
            json doc = json::parse(MetadataToJson(tmp));
            doc["optim"] =
                json{{"has_param_groups", false},
                     {"state", json::array({json{{"fqn", "x"}, {"values", json::array({v})}}})},
                     {"param_groups", json::array()}};
            FSDP_ASSIGN_OR_RETURN(ShardedMetadata decoded,
                                  MetadataFromJson(doc.dump(), "optimizer value"));
            r.value = decoded.optim.state[0].values[0].value;
          }
          rec.values.push_back(std::move(r));
        }
      }
    }
    const json& groups = all[0]["groups"];
    m.optim.has_param_groups = !groups.is_null();
    if (m.optim.has_param_groups) {
      ShardedMetadata tmp;
      json doc = json::parse(MetadataToJson(tmp));
      doc["optim"] =
          json{{"has_param_groups", true}, {"state", json::array()}, {"param_groups", groups}};
      FSDP_ASSIGN_OR_RETURN(ShardedMetadata decoded, MetadataFromJson(doc.dump(), "param_groups"));
      m.optim.param_groups = decoded.optim.param_groups;
    }
  }
  for (size_t r = 0; r < all.size(); ++r) {
    const json& f = all[r]["file"];
    m.files.push_back(FileRecord{DataFileName(static_cast<int>(r), world_size), static_cast<int>(r),
                                 f["size"].get<int64_t>(), f["header_bytes"].get<int64_t>(),
                                 f["header_xxh64"].get<uint64_t>()});
    for (const json& p : all[r]["pieces"]) {
      const std::string key = p["key"].get<std::string>();
      auto it = index.find(key);
      if (it == index.end()) {
        return absl::InternalError(
            absl::StrCat("rank ", r, " wrote '", key, "', which rank 0 does not describe"));
      }
      PieceRecord piece;
      piece.file = static_cast<int>(r);
      piece.begin = p["begin"].get<int64_t>();
      piece.end = p["end"].get<int64_t>();
      piece.offset = p["offset"].get<int64_t>();
      piece.bytes = p["bytes"].get<int64_t>();
      piece.block_xxh64 = p["xxh64"].get<std::vector<uint64_t>>();
      m.tensors[it->second].pieces.push_back(std::move(piece));
    }
  }
  FSDP_RETURN_IF_ERROR(FinalizeMetadata(m));
  return m;
}

// The save of one shard group (all of the ranks without HYBRID_SHARD).
absl::StatusOr<SaveStats> SaveShardGroup(const std::string& dir, FullyShardedDataParallel& fsdp,
                                         const OptimizerAdapter* adapter,
                                         const SaveShardedOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  at::NoGradGuard no_grad;
  comm::ProcessGroup& group = *fsdp.group();
  const int rank = group.rank();
  const int world_size = group.size();
  const std::string where = Where("SaveShardedCheckpoint", dir, group);

  // 1. Rank 0 makes the staging directory and names the checkpoint.
  json plan;
  if (rank == 0) {
    const std::string id = RandomNonce();
    absl::StatusOr<std::string> staging =
        options.block_bytes < 1 ? absl::InvalidArgumentError("block_bytes must be positive")
                                : CreateStagingDir(dir, id);
    plan = staging.ok() ? json{{"staging", *staging}, {"id", id}, {"error", ""}}
                        : json{{"error", std::string(staging.status().ToString())}};
  }
  CKPT_ASSIGN_OR_RETURN(std::string plan_bytes, group.BroadcastObject(plan.dump(), 0),
                        absl::StrCat(where, ": sharing the staging directory"));
  plan = json::parse(plan_bytes);
  if (!plan["error"].get<std::string>().empty()) {
    return absl::InternalError(absl::StrCat(
        where,
        ": rank 0 could not create the staging directory: ", plan["error"].get<std::string>()));
  }
  const std::string staging = plan["staging"].get<std::string>();
  const std::string id = plan["id"].get<std::string>();

  // 2. Each rank writes its own pieces.
  LocalSave local;
  SaveStats stats;
  json description;
  absl::Status status = CallTorch(where, [&]() -> absl::Status {
    FSDP_RETURN_IF_ERROR(CollectModel(fsdp, rank, local), "collecting the model's pieces");
    if (adapter != nullptr) {
      FSDP_RETURN_IF_ERROR(CollectOptim(fsdp, *adapter, rank, local),
                           "collecting the optimizer's pieces");
    }
    FSDP_ASSIGN_OR_RETURN(
        WrittenFile written,
        WriteDataFile(absl::StrCat(staging, "/", DataFileName(rank, world_size)), local.pieces,
                      {{"format", std::string(kShardedFormatName)},
                       {"version", absl::StrCat(kShardedFormatVersion)},
                       {"checkpoint_id", id},
                       {"rank", absl::StrCat(rank)},
                       {"world_size", absl::StrCat(world_size)}},
                      options.block_bytes));
    stats.bytes_written = written.size;
    json pieces = json::array();
    for (size_t i = 0; i < written.pieces.size(); ++i) {
      const WrittenPiece& w = written.pieces[i];
      pieces.push_back(json{{"key", w.key},
                            {"begin", local.ranges[i].first},
                            {"end", local.ranges[i].second},
                            {"offset", w.offset},
                            {"bytes", w.bytes},
                            {"xxh64", w.block_xxh64}});
    }
    description = json{{"file",
                        {{"size", written.size},
                         {"header_bytes", written.header_bytes},
                         {"header_xxh64", written.header_xxh64}}},
                       {"pieces", std::move(pieces)},
                       {"optim", adapter != nullptr ? local.optim : json::array()},
                       {"groups", adapter != nullptr ? local.groups : json(nullptr)}};
    return absl::OkStatus();
  });
  if (!status.ok()) description = json{{"error", std::string(status.ToString())}};

  // 3. Rank 0 gathers the piece lists, writes metadata.json and commits.
  CKPT_ASSIGN_OR_RETURN(std::vector<std::string> all_bytes,
                        group.AllGatherObject(description.dump()),
                        absl::StrCat(where, ": gathering the piece lists"));
  std::string result;
  if (rank == 0) {
    std::vector<json> all;
    for (size_t r = 0; r < all_bytes.size(); ++r) {
      all.push_back(json::parse(all_bytes[r]));
      if (all.back().contains("error") && result.empty()) {
        result = absl::StrCat("rank ", r, " failed: ", all.back()["error"].get<std::string>());
      }
    }
    if (result.empty()) {
      absl::Status committed = [&]() -> absl::Status {
        FSDP_ASSIGN_OR_RETURN(ShardedMetadata m, Assemble(local, all, id, world_size, fsdp,
                                                          adapter != nullptr, options.block_bytes));
        m.user_metadata = options.user_metadata;
        const std::string text = MetadataToJson(m);
        stats.bytes_written += static_cast<int64_t>(text.size());
        CrashPoint("before metadata.json");
        FSDP_RETURN_IF_ERROR(WriteFileDurably(absl::StrCat(staging, "/metadata.json"), text));
        return CommitStagingDir(staging, dir);
      }();
      if (!committed.ok()) result = committed.ToString();
    }
    if (!result.empty()) (void)RemoveTree(staging);
  }
  CKPT_ASSIGN_OR_RETURN(std::string final_result, group.BroadcastObject(result, 0),
                        absl::StrCat(where, ": sharing the outcome"));
  if (!final_result.empty()) {
    const absl::StatusCode code = status.ok() ? absl::StatusCode::kInternal : status.code();
    return absl::Status(code, absl::StrCat(where, ": nothing saved: ", final_result));
  }
  stats.seconds = Since(start);
  return stats;
}

}  // namespace

absl::StatusOr<SaveStats> SaveShardedCheckpoint(const std::string& dir,
                                                FullyShardedDataParallel& fsdp,
                                                const OptimizerAdapter* adapter,
                                                const SaveShardedOptions& options) {
  const std::shared_ptr<comm::ProcessGroup>& replicas = fsdp.options().replicate_group;
  if (replicas == nullptr) return SaveShardGroup(dir, fsdp, adapter, options);
  // HYBRID_SHARD: every replica holds the same shards, so the first one writes the checkpoint
  // and the others learn how it went (two groups writing one directory would clash).
  absl::StatusOr<SaveStats> saved =
      replicas->rank() == 0 ? SaveShardGroup(dir, fsdp, adapter, options) : SaveStats{};
  const std::string where = Where("SaveShardedCheckpoint", dir, *fsdp.group());
  CKPT_ASSIGN_OR_RETURN(std::string outcome,
                        replicas->BroadcastObject(saved.ok() ? "" : saved.status().ToString(), 0),
                        absl::StrCat(where, ": hearing from the replica that saved"));
  if (saved.ok() && !outcome.empty()) {
    return absl::InternalError(absl::StrCat(where, ": the replica that saved failed: ", outcome));
  }
  return saved;
}

// ---------------------------------------------------------------- load

namespace {

struct Plan {
  ShardedDict model;
  OptimStateDict optim;
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

absl::Status BuildModel(FullyShardedDataParallel& fsdp, ShardedCheckpointReader& reader,
                        const Names& names, Plan& plan) {
  const ShardedMetadata& m = reader.metadata();
  FSDP_ASSIGN_OR_RETURN(ShardedDict templ, ShardedStateDict(fsdp));
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
    return absl::InvalidArgumentError(absl::StrCat(
        reader.dir(),
        "/metadata.json does not fit the model: Error(s) in loading state_dict: ", message));
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
// `shape`) into `out`.
absl::Status ReadState(ShardedCheckpointReader& reader, const OptimValueRecord& v,
                       const std::string& fqn, const std::vector<int64_t>& shape, int64_t begin,
                       at::Tensor out) {
  const TensorRecord* t = reader.metadata().FindTensor(v.tensor_key);
  if (t->shape != shape) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer state '", v.name, "' of '", fqn,
                     "': Tensor optimizer state does not have same shape as its parameter: ",
                     TorchSize(t->shape), " ", TorchSize(shape)));
  }
  return reader.ReadRange(*t, begin, begin + out.numel(), out);
}

absl::StatusOr<at::ScalarType> StateDtype(ShardedCheckpointReader& reader,
                                          const OptimValueRecord& v) {
  return reader.metadata().FindTensor(v.tensor_key)->dtype;
}

// A flat parameter's state `name` (`numel` elements of `dtype`, this rank's shard): each
// original parameter's slice at its place, zeros elsewhere (only the elements no slice is read
// into are zeroed: padding, parameters without state).
absl::StatusOr<at::Tensor> ReadFlatState(ShardedCheckpointReader& reader, const FlatParamHandle& h,
                                         const std::vector<std::string>& fqns,
                                         const std::vector<const OptimParamRecord*>& recs,
                                         const std::string& name, at::ScalarType dtype,
                                         int64_t numel) {
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(dtype));
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
    FSDP_RETURN_IF_ERROR(ReadState(reader, *v, fqns[i], h.infos()[i].shape, ps.param_offset,
                                   out.narrow(0, ps.shard_offset, ps.numel)));
    filled.emplace_back(ps.shard_offset, ps.shard_offset + ps.numel);
  }
  std::sort(filled.begin(), filled.end());
  int64_t next = 0;
  for (const auto& [b, e] : filled) {
    if (b > next) out.narrow(0, next, b - next).zero_();
    next = std::max(next, e);
  }
  if (next < out.numel()) out.narrow(0, next, out.numel() - next).zero_();
  return out;
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
                        ShardedCheckpointReader& reader, const Names& names, Plan& plan) {
  const ShardedMetadata& m = reader.metadata();
  if (!m.has_optim) {
    return absl::InvalidArgumentError(
        absl::StrCat(reader.dir(), "/metadata.json holds no optimizer state"));
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
      const auto options = at::TensorOptions().dtype(dtype);
      if (role.role == Role::kUnmanaged) {
        at::Tensor out = at::empty({params[id].numel()}, options);
        FSDP_RETURN_IF_ERROR(ReadState(reader, *first, fqns[0], params[id].sizes().vec(), 0, out));
        state.Set(name, StateValue(out.view(params[id].sizes())));
        continue;
      }
      const FlatParamHandle& h = *role.handle;
      if (role.role == Role::kOrig) {
        const ParamShard ps = h.ShardOf(role.index, h.rank());
        at::Tensor out = at::empty({ps.numel}, options);
        FSDP_RETURN_IF_ERROR(
            ReadState(reader, *first, fqns[0], h.infos()[role.index].shape, ps.param_offset, out));
        if (out.numel() != params[id].numel()) {
          return absl::InternalError(absl::StrCat("'", fqns[0], "' holds ", params[id].numel(),
                                                  " elements, its shard slice ", out.numel()));
        }
        state.Set(name, StateValue(out.view(params[id].sizes())));
        continue;
      }
      FSDP_ASSIGN_OR_RETURN(at::Tensor out,
                            ReadFlatState(reader, h, fqns, recs, name, dtype, params[id].numel()));
      state.Set(name, StateValue(out.view(params[id].sizes())));
    }
    osd.state.Set(ParamKey::Id(static_cast<int64_t>(id)), std::move(state));
  }

  osd.has_param_groups = m.optim.has_param_groups;
  if (!osd.has_param_groups) return absl::OkStatus();
  return BuildParamGroups(adapter, m, names, roles, osd);
}

}  // namespace

absl::StatusOr<LoadStats> LoadShardedCheckpoint(const std::string& dir,
                                                FullyShardedDataParallel& fsdp,
                                                OptimizerAdapter* adapter) {
  const auto start = std::chrono::steady_clock::now();
  at::NoGradGuard no_grad;
  comm::ProcessGroup& group = *fsdp.group();
  const std::string where = Where("LoadShardedCheckpoint", dir, group);

  // 1. Read and check everything this rank needs; change nothing.
  Plan plan;
  LoadStats stats;
  std::unique_ptr<ShardedCheckpointReader> reader;
  absl::Status built = CallTorch(where, [&]() -> absl::Status {
    FSDP_ASSIGN_OR_RETURN(reader, ShardedCheckpointReader::Open(dir));
    Names names;
    for (const auto& [key, stored] : reader->metadata().model_keys) names.stored[key] = stored;
    for (const OptimParamRecord& p : reader->metadata().optim.state) {
      names.optim[names.Resolve(p.fqn)] = &p;
    }
    FSDP_RETURN_IF_ERROR(BuildModel(fsdp, *reader, names, plan));
    if (adapter != nullptr) {
      FSDP_RETURN_IF_ERROR(BuildOptim(fsdp, *adapter, *reader, names, plan), "optimizer");
    }
    return absl::OkStatus();
  });
  if (reader != nullptr) stats.read = reader->stats();
  FSDP_RETURN_IF_ERROR(AgreeOn(group, where, built));

  // 2. The optimizer (restored everywhere if any rank refuses), then the model.
  OptimStateDict snapshot;
  if (adapter != nullptr) {
    absl::Status loaded = CallTorch(where, [&]() -> absl::Status {
      // No copy is needed to restore: LoadStateDict swaps new state tensors in, so the tensors
      // `snapshot` refers to are left as they are. The plan's tensors were read for this load
      // alone: the optimizer takes them as they are (the rvalue LoadStateDict), as it takes
      // the snapshot's back if this load is undone.
      FSDP_ASSIGN_OR_RETURN(snapshot, adapter->StateDict());
      return adapter->LoadStateDict(std::move(plan.optim));
    });
    absl::Status agreed = AgreeOn(group, where, loaded);
    if (!agreed.ok()) {
      if (loaded.ok()) (void)adapter->LoadStateDict(std::move(snapshot));
      return agreed;
    }
  }
  absl::Status model = LoadShardedStateDict(fsdp, plan.model);
  if (!model.ok()) {
    if (adapter != nullptr) (void)adapter->LoadStateDict(std::move(snapshot));
    return Annotate(model, where);
  }
  stats.seconds = Since(start);
  return stats;
}

}  // namespace fsdp::checkpoint
