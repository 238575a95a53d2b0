// SaveDcpCheckpoint and WriteDcpFromFull (dcp_save.h): the sharded save's collection and
// collective commit (internal/sharded_save_steps.h), each rank's pieces written as DCP items.
#include "checkpoint/dcp_save.h"

#include <ATen/core/grad_mode.h>

#include <chrono>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/dcp_writer.h"
#include "checkpoint/internal/sharded_checkpoint_common.h"
#include "checkpoint/internal/sharded_save_steps.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint {
namespace {

using dcp::DcpKey;
using dcp::PathElement;
using internal::json;
using internal::LocalSave;
using optim_state::StateValue;

// What one rank writes, and the nested path of every key.
struct RankItems {
  std::vector<dcp::BytesToWrite> bytes;
  std::vector<dcp::ChunkToWrite> chunks;
  std::map<std::string, std::vector<PathElement>> paths;
};

// The flat range [begin, end) of a tensor of `shape`, held by `flat` (its elements in order),
// as chunks: each box a view of `flat`.
absl::Status AddFlatRange(const DcpKey& key, const std::vector<int64_t>& shape,
                          const at::Tensor& flat, int64_t begin, int64_t end, RankItems& out) {
  FSDP_ASSIGN_OR_RETURN(std::vector<dcp::ChunkStorageMetadata> boxes,
                        dcp::FlatRangeToBoxes(shape, begin, end));
  int64_t at = 0;
  for (const dcp::ChunkStorageMetadata& box : boxes) {
    int64_t n = 1;
    for (int64_t d : box.sizes) n *= d;
    out.chunks.push_back(
        dcp::ChunkToWrite{key.key, shape, box.offsets, flat.narrow(0, at, n).view(box.sizes)});
    at += n;
  }
  out.paths[key.key] = key.path;
  return absl::OkStatus();
}

// "fqn\nname": a zero-dimension or non-tensor optimizer value's identity across ranks.
std::string ScalarId(const internal::OptimScalar& s) { return absl::StrCat(s.fqn, "\n", s.name); }

// Rank 0's: each group's hyperparameters and its FQN list, as bytes entries.
void AddParamGroups(const LocalSave& local, const dcp::DcpLayout& layout, RankItems& out) {
  for (size_t g = 0; g < local.param_groups.size(); ++g) {
    const auto group = static_cast<int64_t>(g);
    for (const auto& [name, value] : local.param_groups[g].hyper_params) {
      const DcpKey key = dcp::DcpParamGroupKey(layout, group, name);
      out.bytes.push_back(dcp::BytesToWrite{key.key, value});
      out.paths[key.key] = key.path;
    }
    std::vector<StateValue> fqns(local.group_fqns[g].begin(), local.group_fqns[g].end());
    const DcpKey key = dcp::DcpParamGroupKey(layout, group, "params");
    out.bytes.push_back(dcp::BytesToWrite{key.key, StateValue::List(std::move(fqns))});
    out.paths[key.key] = key.path;
  }
}

// This rank's items. `scalar_writer` says which rank writes each scalar (the lowest having it).
absl::StatusOr<RankItems> ItemsOf(const LocalSave& local, const dcp::DcpLayout& layout, int rank,
                                  const std::map<std::string, int>& scalar_writer) {
  RankItems out;
  std::map<std::string, std::vector<std::string>> aliases;  // stored FQN -> every name
  for (const auto& [name, stored] : local.model_keys) aliases[stored].push_back(name);
  for (size_t i = 0; i < local.pieces.size(); ++i) {
    const internal::PieceInfo& info = local.piece_infos[i];
    const at::Tensor flat = local.pieces[i].data.reshape({-1});
    const auto [begin, end] = local.ranges[i];
    if (!info.state.empty()) {
      FSDP_RETURN_IF_ERROR(AddFlatRange(dcp::DcpOptimStateKey(layout, info.fqn, info.state),
                                        info.shape, flat, begin, end, out));
      continue;
    }
    for (const std::string& name : aliases[info.fqn]) {
      FSDP_RETURN_IF_ERROR(
          AddFlatRange(dcp::DcpModelKey(layout, name), info.shape, flat, begin, end, out));
    }
  }
  if (rank == 0) {  // tensors without elements have no piece: one empty chunk each
    for (const TensorRecord& t : local.model_tensors) {
      if (t.numel() != 0) continue;
      const at::Tensor empty = at::empty(t.shape, at::TensorOptions().dtype(t.dtype));
      for (const std::string& name : aliases[t.fqn]) {
        const DcpKey key = dcp::DcpModelKey(layout, name);
        out.chunks.push_back(
            dcp::ChunkToWrite{key.key, t.shape, std::vector<int64_t>(t.shape.size(), 0), empty});
        out.paths[key.key] = key.path;
      }
    }
  }
  for (const internal::OptimScalar& s : local.optim_scalars) {
    if (scalar_writer.at(ScalarId(s)) != rank) continue;
    const DcpKey key = dcp::DcpOptimStateKey(layout, s.fqn, s.name);
    out.paths[key.key] = key.path;
    if (const at::Tensor* t = s.value.GetIf<at::Tensor>()) {
      out.chunks.push_back(dcp::ChunkToWrite{key.key, {}, {}, t->detach().reshape({})});
    } else {
      out.bytes.push_back(dcp::BytesToWrite{key.key, s.value});
    }
  }
  if (rank == 0 && local.has_optim) AddParamGroups(local, layout, out);
  return out;
}

json PathToJson(const std::vector<PathElement>& path) {
  json out = json::array();
  for (const PathElement& e : path) {
    if (const std::string* s = std::get_if<std::string>(&e)) {
      out.push_back(*s);
    } else {
      out.push_back(std::get<int64_t>(e));
    }
  }
  return out;
}

// What rank 0 needs of this rank's file: every item and its path.
json Describe(const std::vector<dcp::WrittenItem>& written, const RankItems& items) {
  json list = json::array();
  for (const dcp::WrittenItem& w : written) {
    json item{{"fqn", w.index.fqn},
              {"file", w.storage.relative_path},
              {"offset", w.storage.offset},
              {"length", w.storage.length}};
    if (w.index.offset) {
      item["offsets"] = *w.index.offset;
      item["sizes"] = w.sizes;
      item["size"] = w.size;
      item["dtype"] = static_cast<int>(w.dtype);
    }
    list.push_back(std::move(item));
  }
  json paths = json::object();
  for (const auto& [key, path] : items.paths) paths[key] = PathToJson(path);
  return json{{"items", std::move(list)}, {"paths", std::move(paths)}};
}

// Rank 0: .metadata from every rank's description, into `staging`.
absl::Status FinishMetadata(const std::string& dir, const std::string& staging,
                            const std::vector<json>& all, const SaveDcpOptions& options,
                            SaveStats& stats) {
  for (const auto& [name, contents] : options.extra_files) {
    FSDP_RETURN_IF_ERROR(WriteFileDurably(absl::StrCat(staging, "/", name), contents));
  }
  std::vector<dcp::WrittenItem> items;
  std::map<std::string, std::vector<PathElement>> paths;
  for (const json& rank : all) {
    for (const json& i : rank["items"]) {
      dcp::WrittenItem w;
      w.index.fqn = i["fqn"].get<std::string>();
      w.storage = dcp::StorageInfo{
          i["file"].get<std::string>(), i["offset"].get<int64_t>(), i["length"].get<int64_t>(), {}};
      if (i.contains("offsets")) {
        w.index.offset = i["offsets"].get<std::vector<int64_t>>();
        w.sizes = i["sizes"].get<std::vector<int64_t>>();
        w.size = i["size"].get<std::vector<int64_t>>();
        w.dtype = static_cast<at::ScalarType>(i["dtype"].get<int>());
      }
      items.push_back(std::move(w));
    }
    for (const auto& [key, path] : rank["paths"].items()) {
      std::vector<PathElement>& p = paths[key];
      p.clear();
      for (const json& e : path) {
        if (e.is_string()) {
          p.emplace_back(e.get<std::string>());
        } else {
          p.emplace_back(e.get<int64_t>());
        }
      }
    }
  }
  FSDP_ASSIGN_OR_RETURN(dcp::Metadata m, dcp::AssembleMetadata(items, std::move(paths), dir));
  FSDP_ASSIGN_OR_RETURN(const int64_t bytes, dcp::WriteMetadataFile(staging, m));
  stats.bytes_written += bytes;
  return absl::OkStatus();
}

// Which rank writes each scalar optimizer value: the lowest that has it (a rank whose slice of
// a parameter is empty may have no state for it). Every rank takes part, failed or not.
absl::StatusOr<std::map<std::string, int>> ScalarWriters(comm::ProcessGroup& group,
                                                         const absl::StatusOr<LocalSave>& local,
                                                         const std::string& where) {
  json mine = json::array();
  if (local.ok()) {
    for (const internal::OptimScalar& s : local->optim_scalars) mine.push_back(ScalarId(s));
  }
  CKPT_ASSIGN_OR_RETURN(std::vector<std::string> all, group.AllGatherObject(mine.dump()),
                        absl::StrCat(where, ": sharing which ranks hold scalar state"));
  std::map<std::string, int> writer;
  for (size_t r = 0; r < all.size(); ++r) {
    for (const json& id : json::parse(all[r])) {
      writer.emplace(id.get<std::string>(), static_cast<int>(r));
    }
  }
  return writer;
}

absl::StatusOr<SaveStats> SaveShardGroup(const std::string& dir, FullyShardedDataParallel& fsdp,
                                         const optim_state::OptimizerAdapter* adapter,
                                         const SaveDcpOptions& options,
                                         std::chrono::steady_clock::time_point start) {
  comm::ProcessGroup& group = *fsdp.group();
  const int rank = group.rank();
  const std::string where = internal::Where("SaveDcpCheckpoint", dir, group);
  const absl::StatusOr<LocalSave> local = internal::CollectLocalSave(fsdp, adapter, rank);
  FSDP_ASSIGN_OR_RETURN(auto writers, ScalarWriters(group, local, where));
  absl::StatusOr<RankItems> items = absl::UnknownError("not collected");
  if (!local.ok()) {
    items = local.status();
  } else {
    at::NoGradGuard no_grad;
    absl::StatusOr<absl::StatusOr<RankItems>> made =
        CallTorch(where, [&] { return ItemsOf(*local, options.layout, rank, writers); });
    if (made.ok()) {
      items = std::move(*made);
    } else {
      items = made.status();
    }
  }
  return internal::CommitCollectiveSave(
      dir, where, group, items.status(), absl::OkStatus(),
      [&](const std::string& staging, const std::string&,
          SaveStats& stats) -> absl::StatusOr<json> {
        FSDP_ASSIGN_OR_RETURN(
            std::vector<dcp::WrittenItem> written,
            dcp::WriteDistcpFile(staging, dcp::DistcpFileName(rank), items->bytes, items->chunks));
        for (const dcp::WrittenItem& w : written) stats.bytes_written += w.storage.length;
        return Describe(written, *items);
      },
      [&](const std::string& staging, const std::string&, const std::vector<json>& all,
          SaveStats& stats) { return FinishMetadata(dir, staging, all, options, stats); },
      start);
}

}  // namespace

absl::StatusOr<SaveStats> SaveDcpCheckpoint(const std::string& dir, FullyShardedDataParallel& fsdp,
                                            const optim_state::OptimizerAdapter* adapter,
                                            const SaveDcpOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  return internal::SaveAcrossReplicas(
      fsdp.options().replicate_group.get(),
      internal::Where("SaveDcpCheckpoint", dir, *fsdp.group()),
      [&] { return SaveShardGroup(dir, fsdp, adapter, options, start); });
}

absl::Status WriteDcpFromFull(const std::string& dir, const ModelStateDict& model,
                              const optim_state::OptimStateDict* optim, int world_size,
                              const SaveDcpOptions& options) {
  const dcp::DcpLayout& layout = options.layout;
  dcp::WholeEntries entries;
  auto add_tensor = [&](const DcpKey& key, const at::Tensor& t) {
    entries.tensors.emplace_back(key.key, t);
    entries.planner_data[key.key] = key.path;
  };
  auto add_bytes = [&](const DcpKey& key, StateValue v) {
    entries.bytes.push_back(dcp::BytesToWrite{key.key, std::move(v)});
    entries.planner_data[key.key] = key.path;
  };
  for (const auto& [fqn, tensor] : model) add_tensor(dcp::DcpModelKey(layout, fqn), tensor);
  if (optim != nullptr) {
    const std::string where = absl::StrCat("WriteDcpFromFull(", dir, ")");
    for (const auto& [key, state] : optim->state) {
      if (key.is_id()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": the optimizer state is keyed by parameter IDs (", key.ToString(),
                         "); DCP's is by FQN (rekey it first)"));
      }
      for (const auto& [name, value] : state) {
        const DcpKey k = dcp::DcpOptimStateKey(layout, key.fqn(), name);
        if (const at::Tensor* t = value.GetIf<at::Tensor>()) {
          add_tensor(k, *t);
        } else {
          add_bytes(k, value);
        }
      }
    }
    for (size_t g = 0; g < optim->param_groups.size(); ++g) {
      const auto group = static_cast<int64_t>(g);
      for (const auto& [name, value] : optim->param_groups[g].hyper_params) {
        add_bytes(dcp::DcpParamGroupKey(layout, group, name), value);
      }
      std::vector<StateValue> fqns;
      for (const optim_state::ParamKey& p : optim->param_groups[g].params) {
        fqns.emplace_back(p.is_id() ? StateValue(p.id()) : StateValue(p.fqn()));
      }
      add_bytes(dcp::DcpParamGroupKey(layout, group, "params"), StateValue::List(std::move(fqns)));
    }
  }
  return dcp::WriteWholeDcpCheckpoint(dir, entries, world_size);
}

}  // namespace fsdp::checkpoint
