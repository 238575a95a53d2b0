#include "optim_state/internal/flatten_sharded.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/status_macros.h"
#include "optim_state/internal/flat_box.h"
#include "optim_state/internal/flat_buffer.h"
#include "optim_state/internal/local_shard.h"
#include "optim_state/internal/model_index.h"
#include "optim_state/internal/piece_exchange.h"
#include "optim_state/internal/state_metadata.h"
#include "optim_state/internal/status_context.h"

namespace fsdp::optim_state::internal {
namespace {

constexpr absl::string_view kOp = "FlattenShardedOptimStateDict";

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// One box of a rank's sharded values: of parameter `i` of group `u`, state `name`; its first
// element in the parameter's flattening (`flat`, -1 when it is not one range) and its index in
// the holding rank's own tensors (`k`).
struct PieceMeta {
  size_t u = 0, i = 0;
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> global, offsets, local;
  int64_t flat = -1;
  size_t k = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : local) n *= d;
    return n;
  }
};
using RankPieces = std::vector<PieceMeta>;

// Pieces as exchanged: the state names once, then per piece the integers
// [u, i, name index, dtype, flat, k, ndim, global..., offsets..., local...], a flat array that
// encodes and parses far faster than an object per piece.
json EncodePieces(const RankPieces& pieces) {
  std::vector<std::string> names;
  std::vector<int64_t> ints;
  for (const PieceMeta& p : pieces) {
    auto it = std::find(names.begin(), names.end(), p.name);
    if (it == names.end()) it = names.insert(names.end(), p.name);
    const int64_t ndim = static_cast<int64_t>(p.global.size());
    ints.insert(ints.end(),
                {static_cast<int64_t>(p.u), static_cast<int64_t>(p.i), it - names.begin(),
                 static_cast<int64_t>(p.dtype), p.flat, static_cast<int64_t>(p.k), ndim});
    for (const auto* v : {&p.global, &p.offsets, &p.local})
      ints.insert(ints.end(), v->begin(), v->end());
  }
  return json{{"names", names}, {"ints", ints}};
}

RankPieces DecodePieces(const json& j) {
  const auto names = j["names"].get<std::vector<std::string>>();
  const auto ints = j["ints"].get<std::vector<int64_t>>();
  RankPieces pieces;
  for (size_t at = 0; at + 7 <= ints.size();) {
    PieceMeta p;
    p.u = static_cast<size_t>(ints[at]);
    p.i = static_cast<size_t>(ints[at + 1]);
    p.name = names.at(static_cast<size_t>(ints[at + 2]));
    p.dtype = static_cast<at::ScalarType>(ints[at + 3]);
    p.flat = ints[at + 4];
    p.k = static_cast<size_t>(ints[at + 5]);
    const auto ndim = static_cast<ptrdiff_t>(ints[at + 6]);
    auto next = ints.begin() + static_cast<ptrdiff_t>(at) + 7;
    for (auto* v : {&p.global, &p.offsets, &p.local}) {
      v->assign(next, next + ndim);
      next += ndim;
    }
    at = static_cast<size_t>(next - ints.begin());
    pieces.push_back(std::move(p));
  }
  return pieces;
}

// A rank's piece of a parameter's state and where it lies in the gathered buffer.
struct Piece {
  const PieceMeta* meta;
  int64_t gathered_offset;
};

// Per (group index, state name): each rank's pieces.
using PiecesByState = std::map<std::pair<size_t, std::string>, std::vector<RankPieces>>;

// A piece of whole rows (offsets and sizes beyond dimension 0 span the parameter, as
// ShardedOptimStateDict's chunks do) is one range of the flattened parameter.
bool AllWholeRows(const std::vector<Piece>& pieces, const std::vector<int64_t>& global) {
  bool rows = true;
  for (const Piece& piece : pieces) {
    const std::vector<int64_t>& local_shape = piece.meta->local;
    const std::vector<int64_t>& offsets = piece.meta->offsets;
    rows = rows && local_shape.size() == global.size() && !global.empty() &&
           piece.meta->global == global;
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
    const std::vector<int64_t>& local_shape = piece.meta->local;
    const std::vector<int64_t>& offsets = piece.meta->offsets;
    at::Tensor region = full;
    for (size_t d = 0; d < offsets.size(); ++d) {
      region = region.narrow(static_cast<int64_t>(d), offsets[d], local_shape[d]);
    }
    region.copy_(gathered.narrow(0, piece.gathered_offset, piece.meta->numel()).view(local_shape));
  }
  return full;
}

// The boxes of a sharded value: its local shard, then its further ones.
std::vector<std::pair<const at::Tensor*, const std::vector<int64_t>*>> Boxes(
    const ShardedTensorValue& v) {
  std::vector<std::pair<const at::Tensor*, const std::vector<int64_t>*>> boxes{
      {&v.local, &v.offsets}};
  for (const ShardedTensorValue::Shard& s : v.more_shards) boxes.emplace_back(&s.local, &s.offsets);
  return boxes;
}

// Checks one sharded value of this rank's dict: each local shard, its offsets and the global
// shape agree and lie within the global shape, which is the parameter's (`shape`).
absl::Status CheckShardedValue(const ShardedTensorValue& v, const std::string& name,
                               const std::string& fqn, const std::string& where,
                               const std::vector<int64_t>& shape) {
  for (const auto& [local, offsets] : Boxes(v)) {
    if (offsets->size() != v.global_shape.size() ||
        local->dim() != static_cast<int64_t>(v.global_shape.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, where, ": state '", name, "' of '", fqn,
                       "' is a sharded tensor whose local shard, offsets and global shape "
                       "disagree in rank"));
    }
    for (size_t d = 0; d < offsets->size(); ++d) {
      if ((*offsets)[d] < 0 || (*offsets)[d] + local->size(d) > v.global_shape[d]) {
        return absl::InvalidArgumentError(
            absl::StrCat(kOp, where, ": state '", name, "' of '", fqn,
                         "': the local shard lies outside the global shape"));
      }
    }
  }
  if (v.global_shape != shape) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, where, ": state '", name, "' of '", fqn, "' has global shape ",
                     ShapeText(v.global_shape), ", but the parameter has shape ", ShapeText(shape),
                     " (a dict of another model?)"));
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
    state_ = sharded_osd_.state;
    absl::Status local = CheckFqnKeyed(sharded_osd_, kOp);
    if (local.ok()) local = LocalPieces();
    // Every rank learns whether all dicts were accepted and whether each rank's pieces are its
    // own shards already (then nothing moves).
    FSDP_ASSIGN_OR_RETURN(const bool exchange, Agree(local, local.ok() && !CoversOwnShards()));
    if (exchange) {
      FSDP_ASSIGN_OR_RETURN(std::vector<json> all, ExchangeMetadata());
      FillMissingEntries(all);
      std::vector<RankPieces> all_pieces;
      for (const json& r : all) all_pieces.push_back(DecodePieces(r["pieces"]));
      FSDP_RETURN_IF_ERROR(MovePieces(all_pieces));
    } else {
      FSDP_RETURN_IF_ERROR(CallTorch(kOp, [&] { UseOwnPieces(); }));
    }
    OptimStateDict full_osd;
    full_osd.state = std::move(state_);
    full_osd.param_groups = peer_groups_.has_value() ? *peer_groups_ : sharded_osd_.param_groups;
    full_osd.has_param_groups = peer_groups_.has_value() || sharded_osd_.has_param_groups;
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
  std::vector<int64_t> ShapeOf(size_t u, size_t i) const {
    if (u < num_units_) return index_.handles[u]->infos()[i].shape;
    return index_.unmanaged[u - num_units_].second.sizes().vec();
  }
  std::string Describe(size_t u) const {
    if (u < num_units_) return absl::StrCat("flat parameter [", index_.handles[u]->Describe(), "]");
    return absl::StrCat("unmanaged parameter '", index_.unmanaged[u - num_units_].first, "'");
  }

  // The elements of (u, i)'s flattening that `rank` loads: its shard's part of the parameter,
  // or all of it (NO_SHARD, unmanaged parameters).
  FlatRange Wanted(size_t u, size_t i, int rank) const {
    if (u >= num_units_) return {0, index_.unmanaged[u - num_units_].second.numel()};
    const ParamShard s = index_.handles[u]->ShardOf(i, rank);
    return {s.param_offset, s.numel};
  }

  FlatRange OwnWanted(size_t u, size_t i) const {
    return Wanted(u, i, u < num_units_ ? index_.handles[u]->rank() : 0);
  }

  // This rank's pieces of the sharded states, per group, one entry per box (`flat`: its first
  // element in the flattening, -1 when it is not one range); own_[k] is entry k's tensor.
  absl::Status LocalPieces() {
    absl::flat_hash_set<std::string> known;
    for (size_t u = 0; u < NumGroups(); ++u) {
      const std::vector<std::string> fqns = GroupFqns(u);
      for (size_t i = 0; i < fqns.size(); ++i) {
        known.insert(fqns[i]);
        const ParamState* st = sharded_osd_.state.Find(ParamKey::Fqn(fqns[i]));
        if (st == nullptr) continue;
        for (const auto& [name, value] : *st) {
          const ShardedTensorValue* v = value.GetIf<ShardedTensorValue>();
          if (v == nullptr) continue;
          FSDP_RETURN_IF_ERROR(CheckShardedValue(*v, name, fqns[i], where_, ShapeOf(u, i)));
          for (const auto& [local, offsets] : Boxes(*v)) {
            const std::optional<int64_t> flat =
                FlatBeginOfBox(v->global_shape, *offsets, local->sizes().vec());
            pieces_.push_back(PieceMeta{u, i, name, local->scalar_type(), v->global_shape, *offsets,
                                        local->sizes().vec(), flat.value_or(-1), own_.size()});
            own_.push_back(*local);
          }
        }
      }
    }
    for (const auto& [key, st] : sharded_osd_.state) {
      if (known.contains(key.fqn())) continue;
      for (const auto& [name, value] : st) {
        if (value.Is<ShardedTensorValue>()) {
          return absl::InvalidArgumentError(
              absl::StrCat(kOp, where_, ": the dict holds sharded state '", name, "' of '",
                           key.fqn(), "', which is not a parameter of this model"));
        }
      }
    }
    return absl::OkStatus();
  }

  // Whether this rank's pieces of every (parameter, state) it holds are exactly the part of
  // its shard that it loads, one range after another.
  // LocalPieces lists the boxes of one (parameter, state) one after another.
  bool CoversOwnShards() const {
    std::vector<std::pair<int64_t, int64_t>> ranges;
    for (size_t first = 0; first < pieces_.size();) {
      const PieceMeta& p = pieces_[first];
      size_t end = first;
      ranges.clear();
      for (; end < pieces_.size() && pieces_[end].u == p.u && pieces_[end].i == p.i &&
             pieces_[end].name == p.name;
           ++end) {
        if (pieces_[end].flat < 0) return false;
        const int64_t n = pieces_[end].numel();
        if (n != 0) ranges.emplace_back(pieces_[end].flat, n);
      }
      std::sort(ranges.begin(), ranges.end());
      const FlatRange want = OwnWanted(p.u, p.i);
      int64_t next = want.begin;
      for (const auto& [b, n] : ranges) {
        if (b != next) return false;
        next += n;
      }
      if (next != want.begin + want.numel) return false;
      first = end;
    }
    return true;
  }

  // [this rank failed, this rank needs others' pieces] of every rank, so that all decide alike:
  // an error anywhere fails every rank before anything moves.
  absl::StatusOr<bool> Agree(const absl::Status& mine, bool needs_exchange) const {
    std::vector<float> flags = {mine.ok() ? 0.f : 1.f, needs_exchange ? 1.f : 0.f};
    at::Tensor all = at::empty({2 * group_->size()}, at::kFloat);
    FSDP_RETURN_IF_ERROR(group_->AllGatherIntoTensor(all, at::tensor(flags)),
                         absl::StrCat(kOp, where_, ": agreeing on the dicts"));
    if (!mine.ok()) return mine;
    std::vector<int> failed;
    bool exchange = false;
    for (int r = 0; r < group_->size(); ++r) {
      if (all[2 * r].item<float>() != 0) failed.push_back(r);
      exchange = exchange || all[2 * r + 1].item<float>() != 0;
    }
    if (!failed.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, where_, ": rank(s) ", absl::StrJoin(failed, ", "),
                       " of the group refused their dict; nothing was loaded"));
    }
    return exchange;
  }

  // Every rank's pieces, entries (state names in order, scalar values, and the dtype and global
  // shape of sharded ones) and param_groups, as one object each.
  absl::StatusOr<std::vector<json>> ExchangeMetadata() const {
    json entries = json::array();
    for (const auto& [key, st] : sharded_osd_.state) {
      json names = json::array(), scalars = json::object(), sharded = json::object();
      for (const auto& [name, value] : st) {
        names.push_back(name);
        if (const ShardedTensorValue* v = value.GetIf<ShardedTensorValue>()) {
          sharded[name] = json{{"dtype", static_cast<int>(v->local.scalar_type())},
                               {"global", v->global_shape}};
        } else if (!IsPosDimTensor(value)) {
          absl::StatusOr<json> j = StateValueToJson(value);
          if (j.ok()) scalars[name] = *std::move(j);
        }
      }
      entries.push_back(
          json{{"fqn", key.fqn()}, {"names", names}, {"scalars", scalars}, {"sharded", sharded}});
    }
    json groups = json::array();
    for (const ParamGroup& g : sharded_osd_.param_groups) {
      absl::StatusOr<json> hyper = ParamStateToJson(g.hyper_params);
      if (!hyper.ok()) break;
      json fqns = json::array();
      for (const ParamKey& k : g.params) fqns.push_back(k.is_fqn() ? k.fqn() : k.ToString());
      groups.push_back(json{{"hyper", *std::move(hyper)}, {"params", std::move(fqns)}});
    }
    const bool has_groups = sharded_osd_.has_param_groups && !sharded_osd_.param_groups.empty() &&
                            groups.size() == sharded_osd_.param_groups.size();
    const json mine{{"pieces", EncodePieces(pieces_)},
                    {"entries", std::move(entries)},
                    {"groups", has_groups ? groups : json::array()},
                    {"has_groups", has_groups}};
    OPTIM_ASSIGN_OR_RETURN(std::vector<std::string> all_bytes, group_->AllGatherObject(mine.dump()),
                           absl::StrCat(kOp, where_, ": exchanging shard metadata"));
    std::vector<json> all;
    for (const std::string& bytes : all_bytes) {
      OPTIM_ASSIGN_OR_RETURN(json j, ParseMetadata(bytes), std::string(kOp));
      all.push_back(std::move(j));
    }
    return all;
  }

  // A rank whose dict lacks a parameter's entry (it held no piece of it, or no dict at all) takes
  // the entry of the lowest rank that has one: its scalars, and empty sharded values that the
  // pieces then fill. Param groups likewise, for a dict without them.
  void FillMissingEntries(const std::vector<json>& all) {
    for (size_t r = 0; r < all.size(); ++r) {
      for (const json& e : all[r]["entries"]) {
        const ParamKey key = ParamKey::Fqn(e["fqn"].get<std::string>());
        if (state_.Contains(key)) continue;
        ParamState st;
        for (const json& n : e["names"]) {
          const std::string name = n.get<std::string>();
          if (e["sharded"].contains(name)) {
            const json& sh = e["sharded"][name];
            ShardedTensorValue v;
            v.global_shape = sh["global"].get<std::vector<int64_t>>();
            std::vector<int64_t> empty = v.global_shape;
            if (!empty.empty()) empty[0] = 0;
            v.local = at::empty(empty, at::TensorOptions().dtype(
                                           static_cast<at::ScalarType>(sh["dtype"].get<int>())));
            v.offsets.assign(v.global_shape.size(), 0);
            st.Set(name, StateValue(std::move(v)));
          } else if (e["scalars"].contains(name)) {
            st.Set(name, StateValueFromJson(e["scalars"][name]));
          }
        }
        state_.Set(key, std::move(st));
      }
    }
    if (sharded_osd_.has_param_groups && !sharded_osd_.param_groups.empty()) return;
    for (const json& r : all) {
      if (!r["has_groups"].get<bool>()) continue;
      std::vector<ParamGroup> groups;
      for (const json& g : r["groups"]) {
        ParamGroup pg;
        pg.hyper_params = ParamStateFromJson(g["hyper"]);
        for (const json& f : g["params"]) pg.params.push_back(ParamKey::Fqn(f.get<std::string>()));
        groups.push_back(std::move(pg));
      }
      peer_groups_ = std::move(groups);
      return;
    }
  }

  // Sets (u, i)'s state `name` to a stand-in whose part in this rank's shard is
  // local_part[shard offset, + numel) (see UnpackRows).
  void SetStandIn(size_t u, size_t i, const std::string& name, const at::Tensor& local_part) {
    const FlatParamHandle& h = *index_.handles[u];
    const ParamShard s = h.ShardOf(i, h.rank());
    at::Tensor stand_in = at::zeros({1}, local_part.options()).expand(h.infos()[i].shape);
    partial_.emplace(
        stand_in.unsafeGetTensorImpl(),
        PartialState{s.param_offset, local_part.narrow(0, s.shard_offset, s.numel), local_part});
    state_.Find(ParamKey::Fqn(h.infos()[i].fqns[0]))->Set(name, StateValue(std::move(stand_in)));
  }

  int64_t LocalPartSize(size_t u) const {
    const FlatParamHandle& h = *index_.handles[u];
    return h.sharded() ? h.shard_numel() : h.numel();
  }

  // The pieces of `u`'s state `name` as a view of one tensor, when they lie in it exactly where
  // this rank's shard of the flat state would (a dict LocalShardedOptimStateDict took of an
  // optimizer of this layout): that shard itself, with no copy. Undefined otherwise.
  // Only when the pieces cover every parameter's part of the shard: the view's other elements
  // (padding) are zeroed in place later, and must be no piece's.
  at::Tensor ViewOfOwnShard(size_t u, const std::vector<size_t>& own) const {
    const FlatParamHandle& h = *index_.handles[u];
    int64_t uncovered = 0;
    for (size_t i = 0; i < h.infos().size(); ++i) uncovered += h.ShardOf(i, h.rank()).numel;
    at::Tensor base;
    for (size_t k : own) {
      const PieceMeta& p = pieces_[k];
      const at::Tensor& t = own_[k];
      uncovered -= t.numel();
      if (t.numel() == 0) continue;
      const size_t i = p.i;
      const FlatRange want = OwnWanted(u, i);
      const int64_t shard_offset = h.ShardOf(i, h.rank()).shard_offset + p.flat - want.begin;
      const int64_t start = t.storage_offset() - shard_offset;
      if (!base.defined()) {
        if (start < 0 || !t.is_contiguous() ||
            (start + LocalPartSize(u)) * t.element_size() >
                static_cast<int64_t>(t.storage().nbytes())) {
          return at::Tensor();
        }
        base = t.as_strided({LocalPartSize(u)}, {1}, start);
      } else if (!t.is_contiguous() || !t.storage().is_alias_of(base.storage()) ||
                 start != base.storage_offset() || t.scalar_type() != base.scalar_type()) {
        return at::Tensor();
      }
    }
    return uncovered == 0 ? base : at::Tensor();
  }

  // Same layout: each state's local part is this rank's own pieces (viewed in place where they
  // already form it, else copied together); no communication.
  void UseOwnPieces() {
    std::map<std::pair<size_t, std::string>, std::vector<size_t>> by_state;
    for (size_t k = 0; k < pieces_.size(); ++k) {
      by_state[{pieces_[k].u, pieces_[k].name}].push_back(k);
    }
    for (const auto& [key, own] : by_state) {
      const auto& [u, name] = key;
      const auto opts = at::TensorOptions().dtype(own_[own[0]].scalar_type());
      at::Tensor part = u < num_units_ ? ViewOfOwnShard(u, own) : at::Tensor();
      const bool in_place = part.defined();
      if (!in_place) {
        part = u < num_units_ ? at::empty({LocalPartSize(u)}, opts)
                              : at::empty({index_.unmanaged[u - num_units_].second.numel()}, opts);
      }
      std::set<size_t> params;
      for (size_t k : own) {
        const size_t i = pieces_[k].i;
        params.insert(i);
        if (in_place || own_[k].numel() == 0) continue;
        int64_t at = pieces_[k].flat;
        if (u < num_units_) {
          const FlatParamHandle& h = *index_.handles[u];
          at += h.ShardOf(i, h.rank()).shard_offset - Wanted(u, i, h.rank()).begin;
        }
        part.narrow(0, at, own_[k].numel()).copy_(own_[k].reshape({-1}));
      }
      if (u >= num_units_) {
        const auto& [fqn, t] = index_.unmanaged[u - num_units_];
        state_.Find(ParamKey::Fqn(fqn))->Set(name, StateValue(part.view(t.sizes())));
        continue;
      }
      for (size_t i : params) SetStandIn(u, i, name, part);
    }
  }

  // Whether the exchange must take the all-gather path: a piece that is not one range of its
  // parameter's flattening, or a unit sharded over another group than the call's.
  bool NeedsGather(const std::vector<RankPieces>& all) const {
    for (size_t u = 0; u < num_units_; ++u) {
      const FlatParamHandle& h = *index_.handles[u];
      if (h.sharded() && h.world_size() != group_->size()) return true;
    }
    for (const RankPieces& r : all) {
      for (const PieceMeta& p : r) {
        if (p.flat < 0) return true;
      }
    }
    return false;
  }

  const std::string& FqnOf(size_t u, size_t i) const {
    if (u < num_units_) return index_.handles[u]->infos()[i].fqns[0];
    return index_.unmanaged[u - num_units_].first;
  }

  // One (parameter, state) of the exchange.
  struct Key {
    size_t u, i;
    std::string name;
    at::ScalarType dtype;
  };

  // Every rank's pieces as ranges of their keys (this rank's with their tensors).
  absl::Status FlatPiecesOf(const std::vector<RankPieces>& all, std::vector<Key>& keys,
                            std::vector<FlatPiece>& flat) const {
    std::map<std::tuple<size_t, size_t, std::string>, size_t> key_of;
    for (size_t r = 0; r < all.size(); ++r) {
      for (const PieceMeta& p : all[r]) {
        const size_t u = p.u, i = p.i;
        const std::string name = p.name;
        const auto dtype = p.dtype;
        auto [it, added] = key_of.emplace(std::make_tuple(u, i, name), keys.size());
        if (added) keys.push_back(Key{u, i, name, dtype});
        if (keys[it->second].dtype != dtype) {
          return absl::InvalidArgumentError(
              absl::StrCat(kOp, where_, ": state '", name, "' of the ", Describe(u),
                           " has sharded tensors of different dtypes"));
        }
        at::Tensor data;
        if (static_cast<int>(r) == rank_) data = own_[p.k].reshape({-1});
        flat.push_back(FlatPiece{it->second, static_cast<int>(r), p.flat, p.numel(), data});
      }
    }
    return absl::OkStatus();
  }

  // Where each key's wanted range lands on this rank: its place in the unit's local part (one
  // per unit and state), or an unmanaged parameter's whole tensor.
  std::vector<at::Tensor> Destinations(
      const std::vector<Key>& keys, std::map<std::pair<size_t, std::string>, at::Tensor>& parts) {
    std::vector<at::Tensor> dst(keys.size());
    for (size_t k = 0; k < keys.size(); ++k) {
      const Key& key = keys[k];
      const auto opts = at::TensorOptions().dtype(key.dtype);
      const FlatRange want = OwnWanted(key.u, key.i);
      if (key.u >= num_units_) {
        dst[k] = at::empty({want.numel}, opts);
        continue;
      }
      at::Tensor& part = parts[{key.u, key.name}];
      if (!part.defined()) part = at::empty({LocalPartSize(key.u)}, opts);
      const FlatParamHandle& h = *index_.handles[key.u];
      dst[k] = part.narrow(0, h.ShardOf(key.i, h.rank()).shard_offset, want.numel);
    }
    return dst;
  }

  // Another layout: each rank receives, pairwise, only the parts of other ranks' pieces that
  // its shards need (ExchangeFlatPieces); NeedsGather's cases take the all-gather path.
  absl::Status MovePieces(const std::vector<RankPieces>& all) {
    if (NeedsGather(all)) {
      for (const auto& [unit_and_name, per_rank] : GroupPieces(all)) {
        FSDP_RETURN_IF_ERROR(GatherState(unit_and_name.first, unit_and_name.second, per_rank));
      }
      return absl::OkStatus();
    }
    std::vector<Key> keys;
    std::vector<FlatPiece> flat;
    FSDP_RETURN_IF_ERROR(FlatPiecesOf(all, keys, flat));
    std::map<std::pair<size_t, std::string>, at::Tensor> parts;  // managed: per (unit, state)
    FSDP_ASSIGN_OR_RETURN(std::vector<at::Tensor> dst,
                          CallTorch(kOp, [&] { return Destinations(keys, parts); }));
    std::vector<std::vector<std::pair<int64_t, int64_t>>> written(keys.size());
    FSDP_RETURN_IF_ERROR(
        ExchangeFlatPieces(
            *group_, flat, [&](size_t k, int rank) { return Wanted(keys[k].u, keys[k].i, rank); },
            dst, written),
        absl::StrCat(kOp, where_, ": exchanging pieces"));
    return CallTorch(kOp, [&] {
      for (size_t k = 0; k < keys.size(); ++k) {
        const Key& key = keys[k];
        ZeroOutside(dst[k], std::move(written[k]));
        ParamState* st = state_.Find(ParamKey::Fqn(FqnOf(key.u, key.i)));
        if (st == nullptr) continue;
        if (key.u >= num_units_) {
          st->Set(key.name, StateValue(dst[k].view(ShapeOf(key.u, key.i))));
        } else {
          SetStandIn(key.u, key.i, key.name, parts[{key.u, key.name}]);
        }
      }
    });
  }

  static PiecesByState GroupPieces(const std::vector<RankPieces>& all) {
    PiecesByState groups;
    for (size_t r = 0; r < all.size(); ++r) {
      for (const PieceMeta& p : all[r]) {
        auto& per_rank = groups[{p.u, p.name}];
        per_rank.resize(all.size());
        per_rank[r].push_back(p);
      }
    }
    return groups;
  }

  // Every rank's pieces of (u, name), each rank's packed and padded to the largest rank's
  // total `max_total`, in one buffer (reused across states).
  absl::StatusOr<at::Tensor> AllGatherPieces(size_t u, const std::string& name,
                                             const std::vector<RankPieces>& per_rank,
                                             int64_t max_total, at::ScalarType dtype) {
    const std::vector<std::string> fqns = GroupFqns(u);
    at::Tensor gathered;
    FSDP_RETURN_IF_ERROR(
        CallTorch(kOp,
                  [&]() -> absl::Status {
                    at::Tensor mine = ReuseBuffer(send_buffer_, max_total, dtype);
                    int64_t off = 0;
                    for (const PieceMeta& p : per_rank[static_cast<size_t>(rank_)]) {
                      const at::Tensor& local = own_[p.k];
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
                    gathered = ReuseBuffer(
                        gather_buffer_, max_total * static_cast<int64_t>(per_rank.size()), dtype);
                    FSDP_RETURN_IF_ERROR(group_->AllGatherIntoTensor(gathered, mine));
                    return absl::OkStatus();
                  }),
        absl::StrCat(kOp, where_, ": gathering state '", name, "' of ", Describe(u)));
    return gathered;
  }

  // Gathers (u, name) and unpacks each parameter's pieces, in rank order (a later piece
  // overwrites an earlier one).
  absl::Status GatherState(size_t u, const std::string& name,
                           const std::vector<RankPieces>& per_rank) {
    int64_t max_total = 0;
    at::ScalarType dtype = at::kFloat;
    for (const auto& rank_pieces : per_rank) {
      int64_t total = 0;
      for (const PieceMeta& p : rank_pieces) {
        total += p.numel();
        dtype = p.dtype;
      }
      max_total = std::max(max_total, total);
    }
    FSDP_ASSIGN_OR_RETURN(at::Tensor gathered,
                          AllGatherPieces(u, name, per_rank, max_total, dtype));
    std::map<size_t, std::vector<Piece>> by_param;
    for (size_t r = 0; r < per_rank.size(); ++r) {
      int64_t off = static_cast<int64_t>(r) * max_total;
      for (const PieceMeta& p : per_rank[r]) {
        by_param[p.i].push_back(Piece{&p, off});
        off += p.numel();
      }
    }
    const std::vector<std::string> fqns = GroupFqns(u);
    const auto opts = at::TensorOptions().dtype(dtype);
    return CallTorch(kOp, [&] {
      at::Tensor local_part;  // this (unit, state)'s, once a parameter needs it
      for (const auto& [i, pieces] : by_param) {
        ParamState* param_state = state_.Find(ParamKey::Fqn(fqns[i]));
        if (param_state == nullptr) continue;  // this rank's dict has no state for it
        const auto global = pieces[0].meta->global;
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
      const int64_t begin = piece.meta->offsets[0] * row_numel;
      const int64_t n = piece.meta->numel();
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
  // This rank's pieces (metadata, and each one's tensor); param groups taken from a peer.
  RankPieces pieces_;
  std::vector<at::Tensor> own_;
  std::optional<std::vector<ParamGroup>> peer_groups_;
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
