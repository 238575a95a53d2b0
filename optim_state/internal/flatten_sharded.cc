#include "optim_state/internal/flatten_sharded.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"
#include "optim_state/internal/flat_buffer.h"
#include "optim_state/internal/local_shard.h"
#include "optim_state/internal/model_index.h"
#include "optim_state/internal/state_metadata.h"
#include "optim_state/internal/status_context.h"

namespace fsdp::optim_state::internal {
namespace {

constexpr absl::string_view kOp = "FlattenShardedOptimStateDict";

int64_t NumelOf(const json& piece) {
  int64_t n = 1;
  for (const json& d : piece["local"]) n *= d.get<int64_t>();
  return n;
}

// A rank's piece of a parameter's state and where it lies in the gathered buffer.
struct Piece {
  const json* meta;
  int64_t gathered_offset;
};

// Per (group index, state name): each rank's pieces.
using PiecesByState = std::map<std::pair<size_t, std::string>, std::vector<std::vector<json>>>;

// A piece of whole rows (offsets and sizes beyond dimension 0 span the parameter, as
// ShardedOptimStateDict's chunks do) is one range of the flattened parameter.
bool AllWholeRows(const std::vector<Piece>& pieces, const std::vector<int64_t>& global) {
  bool rows = true;
  for (const Piece& piece : pieces) {
    const auto local_shape = (*piece.meta)["local"].get<std::vector<int64_t>>();
    const auto offsets = (*piece.meta)["offsets"].get<std::vector<int64_t>>();
    rows = rows && local_shape.size() == global.size() && !global.empty() &&
           (*piece.meta)["global"].get<std::vector<int64_t>>() == global;
    for (size_t d = 1; rows && d < global.size(); ++d) {
      rows = offsets[d] == 0 && local_shape[d] == global[d];
    }
  }
  return rows;
}

// The full tensor of the parameter's shape, assembled from its pieces.
at::Tensor AssembleFull(const std::vector<Piece>& pieces, const at::Tensor& gathered,
                        const std::vector<int64_t>& global, const at::TensorOptions& opts) {
  at::Tensor full = at::zeros(global, opts);
  for (const Piece& piece : pieces) {
    const auto local_shape = (*piece.meta)["local"].get<std::vector<int64_t>>();
    const auto offsets = (*piece.meta)["offsets"].get<std::vector<int64_t>>();
    at::Tensor region = full;
    for (size_t d = 0; d < offsets.size(); ++d) {
      region = region.narrow(static_cast<int64_t>(d), offsets[d], local_shape[d]);
    }
    region.copy_(gathered.narrow(0, piece.gathered_offset, NumelOf(*piece.meta)).view(local_shape));
  }
  return full;
}

// Checks one sharded value of this rank's dict: its local shard, offsets and global shape agree
// and lie within the global shape.
absl::Status CheckShardedValue(const ShardedTensorValue& v, const std::string& name,
                               const std::string& fqn, const std::string& where) {
  if (v.offsets.size() != v.global_shape.size() ||
      v.local.dim() != static_cast<int64_t>(v.global_shape.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, where, ": state '", name, "' of '", fqn,
                     "' is a sharded tensor whose local shard, offsets and global shape "
                     "disagree in rank"));
  }
  for (size_t d = 0; d < v.offsets.size(); ++d) {
    if (v.offsets[d] < 0 || v.offsets[d] + v.local.size(d) > v.global_shape[d]) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, where, ": state '", name, "' of '", fqn,
                       "': the local shard lies outside the global shape"));
    }
  }
  return absl::OkStatus();
}

class FlattenSharded {
 public:
  FlattenSharded(const OptimStateDict& sharded_osd, FullyShardedDataParallel& fsdp,
                 std::shared_ptr<comm::ProcessGroup> group)
      : sharded_osd_(sharded_osd),
        fsdp_(fsdp),
        group_(group ? std::move(group) : fsdp.group()),
        rank_(group_->rank()),
        where_(absl::StrCat(" (rank ", rank_, ", group ", group_->name(), ")")),
        index_(IndexModel(fsdp)),
        num_units_(index_.handles.size()) {}

  absl::StatusOr<OptimStateDict> Run(const OptimizerAdapter& adapter) {
    FSDP_RETURN_IF_ERROR(CheckFqnKeyed(sharded_osd_, kOp));
    FSDP_ASSIGN_OR_RETURN(json pieces, LocalPieces());
    FSDP_ASSIGN_OR_RETURN(std::vector<json> all, ExchangePieces(pieces));
    state_ = sharded_osd_.state;
    for (const auto& [unit_and_name, per_rank] : GroupPieces(all)) {
      FSDP_RETURN_IF_ERROR(GatherState(unit_and_name.first, unit_and_name.second, per_rank));
    }
    OptimStateDict full_osd;
    full_osd.state = std::move(state_);
    full_osd.param_groups = sharded_osd_.param_groups;
    full_osd.has_param_groups = sharded_osd_.has_param_groups;
    return ShardFullOptimState(full_osd, fsdp_, OptimizerParams(adapter), kOp, &partial_);
  }

 private:
  // Groups of parameters whose sharded states are gathered together: each unit (its original
  // parameters), then each parameter FSDP does not manage here (a dict saved under another
  // wrapping may hold it sharded; it is loaded whole, as this model keeps it).
  size_t NumGroups() const { return num_units_ + index_.unmanaged.size(); }
  std::vector<std::string> GroupFqns(size_t u) const {
    if (u < num_units_) return HandleFqns(*index_.handles[u]);
    return {index_.unmanaged[u - num_units_].first};
  }
  std::string Describe(size_t u) const {
    if (u < num_units_) return absl::StrCat("flat parameter [", index_.handles[u]->Describe(), "]");
    return absl::StrCat("unmanaged parameter '", index_.unmanaged[u - num_units_].first, "'");
  }

  // This rank's pieces of the sharded states, per group.
  absl::StatusOr<json> LocalPieces() const {
    json pieces = json::array();
    for (size_t u = 0; u < NumGroups(); ++u) {
      const std::vector<std::string> fqns = GroupFqns(u);
      for (size_t i = 0; i < fqns.size(); ++i) {
        const ParamState* st = sharded_osd_.state.Find(ParamKey::Fqn(fqns[i]));
        if (st == nullptr) continue;
        for (const auto& [name, value] : *st) {
          const ShardedTensorValue* v = value.GetIf<ShardedTensorValue>();
          if (v == nullptr) continue;
          FSDP_RETURN_IF_ERROR(CheckShardedValue(*v, name, fqns[i], where_));
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
    return pieces;
  }

  absl::StatusOr<std::vector<json>> ExchangePieces(const json& pieces) const {
    OPTIM_ASSIGN_OR_RETURN(std::vector<std::string> all_bytes,
                           group_->AllGatherObject(pieces.dump()),
                           absl::StrCat(kOp, where_, ": exchanging shard metadata"));
    std::vector<json> all;
    for (const std::string& bytes : all_bytes) {
      OPTIM_ASSIGN_OR_RETURN(json j, ParseMetadata(bytes), std::string(kOp));
      all.push_back(std::move(j));
    }
    return all;
  }

  static PiecesByState GroupPieces(const std::vector<json>& all) {
    PiecesByState groups;
    for (size_t r = 0; r < all.size(); ++r) {
      for (const json& p : all[r]) {
        auto& per_rank = groups[{p["u"].get<size_t>(), p["name"].get<std::string>()}];
        per_rank.resize(all.size());
        per_rank[r].push_back(p);
      }
    }
    return groups;
  }

  // Every rank's pieces of (u, name), each rank's packed and padded to the largest rank's
  // total `max_total`, in one buffer (reused across states).
  absl::StatusOr<at::Tensor> AllGatherPieces(size_t u, const std::string& name,
                                             const std::vector<std::vector<json>>& per_rank,
                                             int64_t max_total, at::ScalarType dtype) {
    const std::vector<std::string> fqns = GroupFqns(u);
    at::Tensor gathered;
    FSDP_RETURN_IF_ERROR(
        CallTorch(
            kOp,
            [&]() -> absl::Status {
              at::Tensor mine = ReuseBuffer(send_buffer_, max_total, dtype);
              int64_t off = 0;
              for (const json& p : per_rank[static_cast<size_t>(rank_)]) {
                const std::string& fqn = fqns[p["i"].get<size_t>()];
                const at::Tensor& local =
                    state_.Find(ParamKey::Fqn(fqn))->Find(name)->Get<ShardedTensorValue>().local;
                if (local.scalar_type() != dtype) {
                  return absl::InvalidArgumentError(
                      absl::StrCat("state '", name, "' of the ", Describe(u),
                                   " has sharded tensors of different dtypes"));
                }
                const int64_t n = local.numel();
                mine.narrow(0, off, n).copy_(local.reshape({-1}));
                off += n;
              }
              if (off < max_total) mine.narrow(0, off, max_total - off).zero_();
              gathered = ReuseBuffer(gather_buffer_,
                                     max_total * static_cast<int64_t>(per_rank.size()), dtype);
              FSDP_RETURN_IF_ERROR(group_->AllGatherIntoTensor(gathered, mine));
              return absl::OkStatus();
            }),
        absl::StrCat(kOp, where_, ": gathering state '", name, "' of ", Describe(u)));
    return gathered;
  }

  // Gathers (u, name) and unpacks each parameter's pieces, in rank order (a later piece
  // overwrites an earlier one).
  absl::Status GatherState(size_t u, const std::string& name,
                           const std::vector<std::vector<json>>& per_rank) {
    int64_t max_total = 0;
    at::ScalarType dtype = at::kFloat;
    for (const auto& rank_pieces : per_rank) {
      int64_t total = 0;
      for (const json& p : rank_pieces) {
        total += NumelOf(p);
        dtype = static_cast<at::ScalarType>(p["dtype"].get<int>());
      }
      max_total = std::max(max_total, total);
    }
    FSDP_ASSIGN_OR_RETURN(at::Tensor gathered,
                          AllGatherPieces(u, name, per_rank, max_total, dtype));
    std::map<size_t, std::vector<Piece>> by_param;
    for (size_t r = 0; r < per_rank.size(); ++r) {
      int64_t off = static_cast<int64_t>(r) * max_total;
      for (const json& p : per_rank[r]) {
        by_param[p["i"].get<size_t>()].push_back(Piece{&p, off});
        off += NumelOf(p);
      }
    }
    const std::vector<std::string> fqns = GroupFqns(u);
    const auto opts = at::TensorOptions().dtype(dtype);
    return CallTorch(kOp, [&] {
      at::Tensor local_part;  // this (unit, state)'s, once a parameter needs it
      for (const auto& [i, pieces] : by_param) {
        ParamState* param_state = state_.Find(ParamKey::Fqn(fqns[i]));
        if (param_state == nullptr) continue;  // this rank's dict has no state for it
        const auto global = (*pieces[0].meta)["global"].get<std::vector<int64_t>>();
        if (u < num_units_ && AllWholeRows(pieces, global)) {
          at::Tensor stand_in =
              UnpackRows(*index_.handles[u], i, pieces, gathered, global, opts, local_part);
          param_state->Set(name, StateValue(std::move(stand_in)));
          continue;
        }
        // Other pieces (or an unmanaged parameter's state, loaded whole): the full tensor.
        param_state->Set(name, StateValue(AssembleFull(pieces, gathered, global, opts)));
      }
    });
  }

  // Whole-row pieces of parameter `i` of unit `h`: straight into this rank's local part of the
  // unit (allocated on first use), where LocalPart will want it, recorded in `partial_` under
  // the stand-in returned (the parameter's shape and dtype, one element of storage).
  at::Tensor UnpackRows(const FlatParamHandle& h, size_t i, const std::vector<Piece>& pieces,
                        const at::Tensor& gathered, const std::vector<int64_t>& global,
                        const at::TensorOptions& opts, at::Tensor& local_part) {
    int64_t row_numel = 1;
    for (size_t d = 1; d < global.size(); ++d) row_numel *= global[d];
    const ParamShard s = h.ShardOf(i, h.rank());
    if (!local_part.defined()) {
      local_part = at::empty({h.sharded() ? h.shard_numel() : h.numel()}, opts);
    }
    PartialState part{s.param_offset, local_part.narrow(0, s.shard_offset, s.numel), local_part};
    std::vector<std::pair<int64_t, int64_t>> copied;  // (offset, numel) in part.data
    for (const Piece& piece : pieces) {
      const int64_t begin = (*piece.meta)["offsets"][0].get<int64_t>() * row_numel;
      const int64_t n = NumelOf(*piece.meta);
      const int64_t lo = std::max(begin, s.param_offset);
      const int64_t hi = std::min(begin + n, s.param_offset + s.numel);
      if (hi <= lo) continue;
      part.data.narrow(0, lo - s.param_offset, hi - lo)
          .copy_(gathered.narrow(0, piece.gathered_offset + lo - begin, hi - lo));
      copied.emplace_back(lo - s.param_offset, hi - lo);
    }
    ZeroOutside(part.data, std::move(copied));
    at::Tensor stand_in = at::zeros({1}, opts).expand(global);
    partial_.emplace(stand_in.unsafeGetTensorImpl(), std::move(part));
    return stand_in;
  }

  const OptimStateDict& sharded_osd_;
  FullyShardedDataParallel& fsdp_;
  const std::shared_ptr<comm::ProcessGroup> group_;
  const int rank_;
  const std::string where_;
  const ModelIndex index_;
  const size_t num_units_;
  // The dict being rebuilt: each managed parameter's gathered state becomes a stand-in of its
  // shape here and this rank's part of it in `partial_`, so that no parameter's full tensor is
  // built (except for pieces that are not whole rows). Both buffers are reused across states.
  OrderedMap<ParamKey, ParamState> state_;
  PartialStates partial_;
  at::Tensor send_buffer_, gather_buffer_;
};

}  // namespace

absl::StatusOr<OptimStateDict> FlattenShardedOptimState(const OptimStateDict& sharded_osd,
                                                        FullyShardedDataParallel& fsdp,
                                                        const OptimizerAdapter& adapter,
                                                        std::shared_ptr<comm::ProcessGroup> group) {
  return FlattenSharded(sharded_osd, fsdp, std::move(group)).Run(adapter);
}

}  // namespace fsdp::optim_state::internal
