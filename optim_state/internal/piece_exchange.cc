#include "optim_state/internal/piece_exchange.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp::optim_state::internal {
namespace {

// Point-to-point messages of the exchange (below the group's internal tags).
constexpr int kExchangeTag = 0x5A1D;

// One overlap: elements [src, src + numel) of piece `piece` into [dst, dst + numel) of
// dst[key].
struct Segment {
  size_t piece;
  size_t key;
  int64_t src;
  int64_t dst;
  int64_t numel;
};

// The partner of `rank` in round `round` of a round-robin over `m` (even) places; >= the
// group's size means none.
int Partner(int rank, int round, int m) {
  if (rank == m - 1) return round;
  if (rank == round) return m - 1;
  return ((2 * round - rank) % (m - 1) + (m - 1)) % (m - 1);
}

at::Tensor Bytes(const at::Tensor& t) { return t.view(at::kByte); }

class Exchange {
 public:
  Exchange(comm::ProcessGroup& group, const std::vector<FlatPiece>& pieces,
           const std::vector<at::Tensor>& dst,
           std::vector<std::vector<std::pair<int64_t, int64_t>>>& written)
      : group_(group), pieces_(pieces), dst_(dst), written_(written) {}

  void Plan(const std::function<FlatRange(size_t, int)>& want) {
    const int me = group_.rank(), n = group_.size();
    to_.assign(n, {});
    from_.assign(n, {});
    for (size_t p = 0; p < pieces_.size(); ++p) {
      const FlatPiece& piece = pieces_[p];
      for (int q = 0; q < n; ++q) {
        if (piece.rank != me && q != me) continue;
        const FlatRange w = want(piece.key, q);
        const int64_t lo = std::max(piece.begin, w.begin);
        const int64_t hi = std::min(piece.begin + piece.numel, w.begin + w.numel);
        if (hi <= lo) continue;
        const Segment s{p, piece.key, lo - piece.begin, lo - w.begin, hi - lo};
        (piece.rank == me ? to_[q] : from_[piece.rank]).push_back(s);
      }
    }
  }

  absl::Status Run() {
    const int me = group_.rank(), n = group_.size();
    FSDP_RETURN_IF_ERROR(CallTorch("ExchangeFlatPieces", [&] {
      for (const Segment& s : to_[me]) Unpack(s, pieces_[s.piece].data.narrow(0, s.src, s.numel));
    }));
    const int m = n % 2 == 0 ? n : n + 1;
    for (int round = 0; round < m - 1; ++round) {
      const int peer = Partner(me, round, m);
      if (peer >= n || (to_[peer].empty() && from_[peer].empty())) continue;
      FSDP_RETURN_IF_ERROR(CallTorch("ExchangeFlatPieces", [&] { return Pair(peer); }),
                           absl::StrCat("rank ", me, " <-> rank ", peer));
    }
    return absl::OkStatus();
  }

 private:
  int64_t ElementSize(const Segment& s, bool sending) const {
    return sending ? pieces_[s.piece].data.element_size() : dst_[s.key].element_size();
  }

  void Unpack(const Segment& s, const at::Tensor& from) {
    at::Tensor to = dst_[s.key].narrow(0, s.dst, s.numel);
    if (to.data_ptr() != from.data_ptr()) to.copy_(from);
    written_[s.key].emplace_back(s.dst, s.numel);
  }

  // The bytes to send `peer`: the one segment's piece itself, else packed.
  at::Tensor Outgoing(int peer) {
    const std::vector<Segment>& segs = to_[peer];
    if (segs.size() == 1) {
      return Bytes(pieces_[segs[0].piece].data.narrow(0, segs[0].src, segs[0].numel));
    }
    int64_t total = 0;
    for (const Segment& s : segs) total += s.numel * ElementSize(s, true);
    at::Tensor out = Scratch(send_, total);
    int64_t off = 0;
    for (const Segment& s : segs) {
      at::Tensor b = Bytes(pieces_[s.piece].data.narrow(0, s.src, s.numel));
      out.narrow(0, off, b.numel()).copy_(b);
      off += b.numel();
    }
    return out;
  }

  absl::Status Pair(int peer) {
    const bool direct_in = from_[peer].size() == 1;
    at::Tensor incoming;
    if (direct_in) {
      const Segment& s = from_[peer][0];
      incoming = Bytes(dst_[s.key].narrow(0, s.dst, s.numel));
    } else if (!from_[peer].empty()) {
      int64_t total = 0;
      for (const Segment& s : from_[peer]) total += s.numel * ElementSize(s, false);
      incoming = Scratch(recv_, total);
    }
    at::Tensor outgoing = to_[peer].empty() ? at::Tensor() : Outgoing(peer);
    auto send = [&]() -> absl::Status {
      return outgoing.defined() ? group_.Send(outgoing, peer, kExchangeTag) : absl::OkStatus();
    };
    auto recv = [&]() -> absl::Status {
      return incoming.defined() ? group_.Recv(incoming, peer, kExchangeTag) : absl::OkStatus();
    };
    // The lower rank sends first, the higher receives first: blocking calls meet.
    if (group_.rank() < peer) {
      FSDP_RETURN_IF_ERROR(send());
      FSDP_RETURN_IF_ERROR(recv());
    } else {
      FSDP_RETURN_IF_ERROR(recv());
      FSDP_RETURN_IF_ERROR(send());
    }
    if (direct_in) {
      const Segment& s = from_[peer][0];
      written_[s.key].emplace_back(s.dst, s.numel);
      return absl::OkStatus();
    }
    int64_t off = 0;
    for (const Segment& s : from_[peer]) {
      const int64_t bytes = s.numel * ElementSize(s, false);
      at::Tensor to = Bytes(dst_[s.key].narrow(0, s.dst, s.numel));
      to.copy_(incoming.narrow(0, off, bytes));
      written_[s.key].emplace_back(s.dst, s.numel);
      off += bytes;
    }
    return absl::OkStatus();
  }

  // The front `bytes` of a byte buffer kept across rounds.
  static at::Tensor Scratch(at::Tensor& buffer, int64_t bytes) {
    if (!buffer.defined() || buffer.numel() < bytes) {
      buffer = at::Tensor();
      buffer = at::empty({bytes}, at::kByte);
    }
    return buffer.narrow(0, 0, bytes);
  }

  comm::ProcessGroup& group_;
  const std::vector<FlatPiece>& pieces_;
  const std::vector<at::Tensor>& dst_;
  std::vector<std::vector<std::pair<int64_t, int64_t>>>& written_;
  std::vector<std::vector<Segment>> to_, from_;  // per peer; to_[rank()]: local copies
  at::Tensor send_, recv_;
};

}  // namespace

absl::Status ExchangeFlatPieces(comm::ProcessGroup& group, const std::vector<FlatPiece>& pieces,
                                const std::function<FlatRange(size_t key, int rank)>& want,
                                const std::vector<at::Tensor>& dst,
                                std::vector<std::vector<std::pair<int64_t, int64_t>>>& written) {
  Exchange exchange(group, pieces, dst, written);
  exchange.Plan(want);
  return exchange.Run();
}

}  // namespace fsdp::optim_state::internal
