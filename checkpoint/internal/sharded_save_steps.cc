// The steps of a sharded save (sharded_save_steps.h): each rank collects its pieces, rank 0
// assembles the metadata, the directory is committed atomically.
#include "checkpoint/internal/sharded_save_steps.h"

#include <ATen/core/grad_mode.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <new>
#include <set>
#include <thread>
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

using optim_state::OptimizerAdapter;
using optim_state::OptimStateDict;
using optim_state::ParamGroup;
using optim_state::ParamKey;
using optim_state::ParamState;

namespace {

using MetadataStep = std::function<absl::Status(const std::vector<json>& all, SaveStats& stats)>;

absl::Status CollectModel(FullyShardedDataParallel& fsdp, int rank, LocalSave& out) {
  // Views: a synchronous save writes them while the model is idle, an asynchronous one copies
  // them into its staging buffers first.
  FSDP_ASSIGN_OR_RETURN(ShardedDict dict, ShardedStateDict(fsdp, /*views=*/true));
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
        out.piece_infos.push_back(PieceInfo{fqn, "", t.shape});
      }
    } else {
      t.shape = data.sizes().vec();
      if (rank == 0 && data.numel() > 0) {
        out.pieces.push_back(PieceToWrite{t.key, data});
        out.ranges.emplace_back(0, data.numel());
        out.piece_infos.push_back(PieceInfo{fqn, "", t.shape});
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
          out.optim_scalars.push_back(OptimScalar{fqns[i], name, value});
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
          out.piece_infos.push_back(PieceInfo{fqns[i], name, shape});
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
    out.group_fqns.push_back(fqns.get<std::vector<std::string>>());
    out.groups.push_back(json{{"hyper_params", std::move(hyper)}, {"params", std::move(fqns)}});
    out.param_groups.push_back(g);
  }
  return absl::OkStatus();
}

// Rank 0: metadata.json from every rank's description.
absl::StatusOr<ShardedMetadata> Assemble(const LocalSave& mine, const std::vector<json>& all,
                                         const std::string& id, int world_size,
                                         int64_t block_bytes) {
  ShardedMetadata m;
  m.checkpoint_id = id;
  m.world_size = world_size;
  m.block_bytes = block_bytes;
  m.saved_with = mine.saved_with;
  m.model_keys = mine.model_keys;
  m.tensors = mine.model_tensors;
  m.has_optim = mine.has_optim;
  const bool has_optim = mine.has_optim;
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

// Rank 0 makes the staging directory and names the checkpoint; every rank learns both.
absl::StatusOr<std::pair<std::string, std::string>> PlanStagingDir(const std::string& dir,
                                                                   comm::ProcessGroup& group,
                                                                   const absl::Status& precheck,
                                                                   const std::string& where) {
  json plan;
  if (group.rank() == 0) {
    const std::string id = RandomNonce();
    absl::StatusOr<std::string> staging = precheck.ok() ? CreateStagingDir(dir, id) : precheck;
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
  return std::make_pair(plan["staging"].get<std::string>(), plan["id"].get<std::string>());
}

// This rank's data file in `staging`, described for rank 0 (file, pieces, optimizer values).
absl::StatusOr<json> WriteOwnFile(const std::string& staging, const std::string& id,
                                  comm::ProcessGroup& group, const LocalSave& local,
                                  const SaveShardedOptions& options, SaveStats& stats) {
  const int rank = group.rank();
  const int world_size = group.size();
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
  return json{{"file",
               {{"size", written.size},
                {"header_bytes", written.header_bytes},
                {"header_xxh64", written.header_xxh64}}},
              {"pieces", std::move(pieces)},
              {"optim", local.has_optim ? local.optim : json::array()},
              {"groups", local.has_optim ? local.groups : json(nullptr)}};
}

// Rank 0: the first failing rank's error, else `finish` (the metadata written into `staging`)
// and the directory committed; "" when saved. The staging directory is removed on failure.
std::string CommitOnRank0(const std::string& dir, const std::string& staging,
                          const std::vector<std::string>& all_bytes, const MetadataStep& finish,
                          SaveStats& stats) {
  std::string result;
  std::vector<json> all;
  for (size_t r = 0; r < all_bytes.size(); ++r) {
    all.push_back(json::parse(all_bytes[r]));
    if (all.back().contains("error") && result.empty()) {
      result = absl::StrCat("rank ", r, " failed: ", all.back()["error"].get<std::string>());
    }
  }
  if (result.empty()) {
    absl::Status committed = [&]() -> absl::Status {
      FSDP_RETURN_IF_ERROR(finish(all, stats));
      return CommitStagingDir(staging, dir);
    }();
    if (!committed.ok()) result = committed.ToString();
  }
  if (!result.empty()) (void)RemoveTree(staging);
  return result;
}

}  // namespace

absl::StatusOr<LocalSave> CollectLocalSave(FullyShardedDataParallel& fsdp,
                                           const OptimizerAdapter* adapter, int rank) {
  at::NoGradGuard no_grad;
  LocalSave local;
  local.saved_with["sharding_strategy"] =
      std::string(ShardingStrategyName(fsdp.options().sharding_strategy));
  local.saved_with["use_orig_params"] = fsdp.options().use_orig_params ? "true" : "false";
  std::vector<std::string> units;
  for (const auto& u : fsdp.units()) units.push_back(absl::StrCat("'", u.module_prefix, "'"));
  local.saved_with["units"] = absl::StrJoin(units, ", ");
  FSDP_RETURN_IF_ERROR(CallTorch("collecting the pieces to save", [&]() -> absl::Status {
    FSDP_RETURN_IF_ERROR(CollectModel(fsdp, rank, local), "collecting the model's pieces");
    local.has_optim = adapter != nullptr;
    if (adapter != nullptr) {
      FSDP_RETURN_IF_ERROR(CollectOptim(fsdp, *adapter, rank, local),
                           "collecting the optimizer's pieces");
    }
    return absl::OkStatus();
  }));
  return local;
}

namespace {

// One thread's share of the staging copy: elements [begin, end) of piece `piece`.
struct CopyRange {
  size_t piece;
  int64_t begin, end;
};

// Cuts the pieces (flattened, `numel` elements each) into `threads` runs of about equal bytes.
std::vector<std::vector<CopyRange>> SplitCopy(const std::vector<at::Tensor>& flat, int threads) {
  int64_t total = 0;
  for (const at::Tensor& t : flat) total += t.nbytes();
  const int64_t share = (total + threads - 1) / threads;
  std::vector<std::vector<CopyRange>> runs(static_cast<size_t>(threads));
  size_t run = 0;
  int64_t room = share;  // bytes the current run still takes
  for (size_t i = 0; i < flat.size(); ++i) {
    const int64_t item = static_cast<int64_t>(flat[i].element_size());
    int64_t begin = 0;
    while (begin < flat[i].numel()) {
      if (room < item && run + 1 < runs.size()) {
        ++run;
        room = share;
      }
      const int64_t left = flat[i].numel() - begin;
      const int64_t n =
          run + 1 == runs.size() ? left : std::min(left, std::max<int64_t>(room / item, 1));
      runs[run].push_back(CopyRange{i, begin, begin + n});
      room -= n * item;
      begin += n;
    }
  }
  return runs;
}

// One mapping for all the staging buffers, in transparent huge pages where the kernel gives
// them (THP "madvise" mode): the first save faults its buffers in 2 MiB at a time instead of
// 4 KiB, and every save copies through fewer TLB entries.
at::Tensor MapArena(int64_t bytes) {
  constexpr int64_t kHugePage = 2 << 20;
  const size_t length = static_cast<size_t>((bytes + kHugePage - 1) / kHugePage * kHugePage);
  void* p = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  (void)::madvise(p, length, MADV_HUGEPAGE);  // advice: without THP, ordinary pages
  return at::from_blob(
      p, {bytes}, [length](void* q) { ::munmap(q, length); }, at::TensorOptions(at::kByte));
}

// `buffers` reshaped for `pieces` (one arena, each piece 64-byte aligned), unless they fit.
void SizeBuffers(const std::vector<PieceToWrite>& pieces, std::vector<at::Tensor>& buffers) {
  bool fits = buffers.size() == pieces.size();
  for (size_t i = 0; fits && i < pieces.size(); ++i) {
    fits = buffers[i].scalar_type() == pieces[i].data.scalar_type() &&
           buffers[i].numel() == pieces[i].data.numel();
  }
  if (fits) return;
  buffers.clear();  // frees the old arena first
  std::vector<int64_t> offsets;
  int64_t bytes = 0;
  for (const PieceToWrite& piece : pieces) {
    offsets.push_back(bytes);
    bytes += (static_cast<int64_t>(piece.data.nbytes()) + 63) / 64 * 64;
  }
  const at::Tensor arena = MapArena(std::max<int64_t>(bytes, 1));
  for (size_t i = 0; i < pieces.size(); ++i) {
    const at::Tensor& data = pieces[i].data;
    buffers.push_back(
        arena.narrow(0, offsets[i], static_cast<int64_t>(data.nbytes())).view(data.scalar_type()));
  }
}

}  // namespace

absl::Status StageLocalSave(LocalSave& local, std::vector<at::Tensor>& buffers, int threads) {
  if (threads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("staging the pieces: threads must be at least 1, not ", threads));
  }
  std::vector<at::Tensor> flat(local.pieces.size());
  FSDP_RETURN_IF_ERROR(CallTorch("staging the pieces", [&] {
    at::NoGradGuard no_grad;
    SizeBuffers(local.pieces, buffers);
    for (size_t i = 0; i < local.pieces.size(); ++i) {
      flat[i] = local.pieces[i].data.detach().reshape({-1});
    }
  }));
  const std::vector<std::vector<CopyRange>> runs = SplitCopy(flat, threads);
  std::vector<absl::Status> outcome(runs.size());
  auto copy_run = [&](size_t r) {
    outcome[r] = CallTorch("staging the pieces", [&] {
      at::NoGradGuard no_grad;  // grad mode is per thread
      for (const CopyRange& c : runs[r]) {
        buffers[c.piece]
            .narrow(0, c.begin, c.end - c.begin)
            .copy_(flat[c.piece].narrow(0, c.begin, c.end - c.begin));
      }
    });
  };
  std::vector<std::thread> helpers;
  for (size_t r = 1; r < runs.size(); ++r) helpers.emplace_back(copy_run, r);
  copy_run(0);
  for (std::thread& t : helpers) t.join();
  for (const absl::Status& s : outcome) FSDP_RETURN_IF_ERROR(s);
  for (size_t i = 0; i < local.pieces.size(); ++i) local.pieces[i].data = buffers[i];
  return absl::OkStatus();
}

absl::StatusOr<SaveStats> CommitCollectiveSave(
    const std::string& dir, const std::string& where, comm::ProcessGroup& group,
    const absl::Status& local_status, const absl::Status& precheck, const WriteOwn& write_own,
    const FinishOnRank0& finish, std::chrono::steady_clock::time_point start) {
  FSDP_ASSIGN_OR_RETURN(auto plan, PlanStagingDir(dir, group, precheck, where));
  const auto& [staging, id] = plan;

  // Each rank writes its own file; a rank that failed before says so instead.
  SaveStats stats;
  absl::Status status = local_status;
  json description;
  if (status.ok()) {
    status = CallTorch(where, [&]() -> absl::Status {
      FSDP_ASSIGN_OR_RETURN(description, write_own(staging, id, stats));
      return absl::OkStatus();
    });
  }
  if (!status.ok()) description = json{{"error", std::string(status.ToString())}};

  // Rank 0 gathers the descriptions, writes the metadata and commits.
  CKPT_ASSIGN_OR_RETURN(std::vector<std::string> all_bytes,
                        group.AllGatherObject(description.dump()),
                        absl::StrCat(where, ": gathering the piece lists"));
  std::string result;
  if (group.rank() == 0) {
    result = CommitOnRank0(
        dir, staging, all_bytes,
        [&](const std::vector<json>& all, SaveStats& s) { return finish(staging, id, all, s); },
        stats);
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

absl::StatusOr<SaveStats> WriteShardGroup(const std::string& dir, comm::ProcessGroup& group,
                                          const absl::StatusOr<LocalSave>& local,
                                          const SaveShardedOptions& options,
                                          std::chrono::steady_clock::time_point start) {
  const absl::Status precheck = options.block_bytes < 1
                                    ? absl::InvalidArgumentError("block_bytes must be positive")
                                    : absl::OkStatus();
  return CommitCollectiveSave(
      dir, Where("SaveShardedCheckpoint", dir, group), group, local.status(), precheck,
      [&](const std::string& staging, const std::string& id, SaveStats& stats) {
        return WriteOwnFile(staging, id, group, *local, options, stats);
      },
      [&](const std::string& staging, const std::string& id, const std::vector<json>& all,
          SaveStats& stats) -> absl::Status {
        FSDP_ASSIGN_OR_RETURN(
            ShardedMetadata m,
            Assemble(*local, all, id, static_cast<int>(all.size()), options.block_bytes));
        m.user_metadata = options.user_metadata;
        const std::string text = MetadataToJson(m);
        stats.bytes_written += static_cast<int64_t>(text.size());
        CrashPoint("before metadata.json");
        return WriteFileDurably(absl::StrCat(staging, "/metadata.json"), text);
      },
      start);
}

absl::StatusOr<SaveStats> SaveAcrossReplicas(
    comm::ProcessGroup* replicas, const std::string& where,
    const std::function<absl::StatusOr<SaveStats>()>& save) {
  if (replicas == nullptr) return save();
  // HYBRID_SHARD: every replica holds the same shards, so the first one writes the checkpoint
  // and the others learn how it went (two groups writing one directory would clash).
  absl::StatusOr<SaveStats> saved = replicas->rank() == 0 ? save() : SaveStats{};
  CKPT_ASSIGN_OR_RETURN(std::string outcome,
                        replicas->BroadcastObject(saved.ok() ? "" : saved.status().ToString(), 0),
                        absl::StrCat(where, ": hearing from the replica that saved"));
  if (saved.ok() && !outcome.empty()) {
    return absl::InternalError(absl::StrCat(where, ": the replica that saved failed: ", outcome));
  }
  return saved;
}

}  // namespace fsdp::checkpoint::internal
