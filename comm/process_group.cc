#include "comm/process_group.h"

#include <signal.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/status_macros.h"

namespace fsdp::comm {
namespace {

bool IsLoopback(const std::string& addr) {
  return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0;
}

std::shared_ptr<::gloo::transport::Device> MakeDevice(const ProcessGroupOptions& options) {
  if (!options.bind_address.empty()) {
    return c10d::ProcessGroupGloo::createDeviceForHostname(options.bind_address);
  }
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname) {
    return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  }
  if (IsLoopback(options.master_addr)) {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

c10d::ReduceOp ToC10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return c10d::ReduceOp::SUM;
    case ReduceOp::kMax:
      return c10d::ReduceOp::MAX;
    case ReduceOp::kMin:
      return c10d::ReduceOp::MIN;
  }
  return c10d::ReduceOp::SUM;
}

// Element-wise accumulation used by the reduce-scatter ring.
void Accumulate(at::Tensor& acc, const at::Tensor& other, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      acc.add_(other);
      break;
    case ReduceOp::kMax:
      at::maximum_out(acc, acc, other);
      break;
    case ReduceOp::kMin:
      at::minimum_out(acc, acc, other);
      break;
  }
}

// CollectiveImpl::kDefault is our ring, for all-gather and reduce-scatter alike. Measured by
// comm_benchmark (bench/README.md): from 16 MiB (FSDP's unit sizes) Gloo's own collectives are
// 1.4-5.5x slower (its all-gather goes through a temporary buffer, its reduce-scatter is an
// all-reduce, which moves twice the bytes); at 1-4 MiB either may win, depending on the load.
// And when a peer dies mid-all-gather, PyTorch 2.13's ProcessGroupGloo frees that temporary
// while Gloo's transport thread is still sending from it (AddressSanitizer: heap-use-after-free
// in gloo::transport::tcp::Pair::write, comm:failure_test at 4 ranks).
CollectiveImpl Resolve(CollectiveImpl impl) {
  return impl == CollectiveImpl::kDefault ? CollectiveImpl::kRing : impl;
}

constexpr int kInternalTagBase = 1 << 24;
// Reduce-scatter pipelines each ring step in pieces of this size.
constexpr int64_t kReduceScatterPieceBytes = 4 << 20;

// gloo::AllreduceOptions' default largest segment (gloo/allreduce.h, kMaxSegmentSize), which
// ProcessGroupGloo leaves as it is.
constexpr int64_t kGlooMaxSegmentBytes = 1 << 20;

// How many elements of a `total`-element buffer Gloo's ring all-reduce gives each rank's chunk
// (gloo/allreduce.cc, `ring`): the buffer is cut into a multiple of `size` segments, at least
// 2 * size and enough that none exceeds kGlooMaxSegmentBytes, each a whole number of elements
// long (the last ones shorter or empty); chunk c is segments [c * k, (c + 1) * k) for k
// segments per rank. The chunk can be longer than total / size: Gloo rounds the segment up.
int64_t GlooRingChunk(int64_t total, int64_t element_size, int size) {
  const int64_t bytes = total * element_size;
  const int64_t max_segment =
      element_size * std::max<int64_t>(1, kGlooMaxSegmentBytes / element_size);
  int64_t segments = std::max<int64_t>((bytes + max_segment - 1) / max_segment, 2 * size);
  segments = (segments + size - 1) / size * size;
  const int64_t segment_elements =
      ((bytes + segments - 1) / segments + element_size - 1) / element_size;
  return segments / size * segment_elements;
}

// What is left of a deadline, at least 1 ms (0 would mean "no timeout" to c10d).
std::chrono::milliseconds RemainingOrZero(std::chrono::steady_clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  return std::max(left, std::chrono::milliseconds(1));
}

// Where the chunks of the reduce-scatter ring lie in its input (see ReduceScatterRing): chunk g
// is [Begin(g), Begin(g) + Len(g)); its first OwnLen(g) elements are rank g's own output, the
// rest its overhang. Each ring step moves a chunk in pieces of at most `piece` elements.
struct RingChunks {
  int64_t n;      // elements of each rank's output
  int size;       // ranks
  int64_t total;  // n * size, the input
  int64_t chunk;  // elements per chunk: Gloo's, or n
  int64_t piece;  // elements per message

  int64_t Begin(int g) const { return std::min<int64_t>(g * chunk, total); }
  int64_t Len(int g) const { return std::min<int64_t>(chunk, total - Begin(g)); }
  int64_t OwnLen(int g) const { return std::clamp<int64_t>((g + 1) * n - Begin(g), 0, Len(g)); }
  // Rank g's overhang: [first, second) of the input, all past its own output.
  std::pair<int64_t, int64_t> Overhang(int g) const {
    return std::make_pair(Begin(g) + OwnLen(g), Begin(g) + Len(g));
  }
  // Chunk g's pieces, (begin, length) within the chunk; in the last step a piece never
  // straddles the end of the receiver's own part.
  std::vector<std::pair<int64_t, int64_t>> Pieces(int g, bool last_step) const {
    std::vector<std::pair<int64_t, int64_t>> pieces;
    const int64_t len = Len(g);
    const int64_t split = last_step ? OwnLen(g) : len;
    for (int64_t begin = 0; begin < len;) {
      const int64_t end = std::min(begin + piece, begin < split ? split : len);
      pieces.emplace_back(begin, end - begin);
      begin = end;
    }
    return pieces;
  }
  // The most pieces a chunk is cut into (one more than whole pieces, for the last step's
  // split); the same on every rank.
  int MaxPieces() const { return static_cast<int>((chunk + piece - 1) / piece) + 1; }
};

// Gloo's chunks when the order of a sum changes its result (more than 2 ranks, floating point,
// sum or average); otherwise simply n per rank, with no overhang.
RingChunks MakeRingChunks(const at::Tensor& in, int64_t n, int size, ReduceOp op) {
  const bool order_matters = size > 2 && at::isFloatingType(in.scalar_type()) &&
                             (op == ReduceOp::kSum || op == ReduceOp::kAvg);
  const int64_t total = n * size;
  return RingChunks{
      .n = n,
      .size = size,
      .total = total,
      .chunk = order_matters ? GlooRingChunk(total, in.element_size(), size) : n,
      .piece = std::max<int64_t>(1, kReduceScatterPieceBytes / in.element_size()),
  };
}

// Step `step` of the reduce-scatter ring on `rank`: sends `send_buf` (the partial sum of the
// chunk it holds) to rank - 1 while receiving the next chunk's partial sum from rank + 1, and
// adds this rank's input to each piece as it arrives. Receives land in `partial`; in the last
// step the chunk is this rank's own, whose own part lands in `out` and overhang in `partial`.
// Piece j of every step uses tag base_tag + j.
void RingStep(c10d::Backend& pg, const RingChunks& chunks, int rank, int step, const at::Tensor& in,
              at::Tensor& out, const at::Tensor& send_buf, at::Tensor& partial, ReduceOp op,
              int base_tag, std::chrono::steady_clock::time_point deadline) {
  const int size = chunks.size;
  const bool last_step = step == size - 2;
  const int to = (rank - 1 + size) % size;
  const int from = (rank + 1) % size;
  const int send_chunk = (rank + 1 + step) % size;
  const int recv_chunk = (rank + 2 + step) % size;  // == rank in the last step
  std::vector<c10::intrusive_ptr<c10d::Work>> sends, recvs;
  std::vector<at::Tensor> got;
  std::vector<std::vector<at::Tensor>> keep;
  const auto recv_pieces = chunks.Pieces(recv_chunk, last_step);
  const int64_t mine = last_step ? chunks.OwnLen(rank) : 0;
  for (size_t j = 0; j < recv_pieces.size(); ++j) {
    const auto [begin, len] = recv_pieces[j];
    // In the last step the own part lands in `out`, the overhang in scratch.
    at::Tensor dst;
    if (!last_step) {
      dst = partial.narrow(0, begin, len);
    } else if (begin < mine) {
      dst = out.narrow(0, chunks.Begin(rank) - rank * chunks.n + begin, len);
    } else {
      dst = partial.narrow(0, begin - mine, len);
    }
    got.push_back(dst);
    keep.push_back({dst});
    recvs.push_back(pg.recv(keep.back(), from, base_tag + static_cast<int>(j)));
  }
  const auto send_pieces = chunks.Pieces(send_chunk, last_step);
  for (size_t j = 0; j < send_pieces.size(); ++j) {
    keep.push_back({send_buf.narrow(0, send_pieces[j].first, send_pieces[j].second)});
    sends.push_back(pg.send(keep.back(), to, base_tag + static_cast<int>(j)));
  }
  const int64_t own_begin = chunks.Begin(recv_chunk);
  for (size_t j = 0; j < recv_pieces.size(); ++j) {
    recvs[j]->wait(RemainingOrZero(deadline));
    // received + own, as Gloo's out = own + received (the same: a + b == b + a).
    Accumulate(got[j], in.narrow(0, own_begin + recv_pieces[j].first, recv_pieces[j].second), op);
  }
  for (auto& work : sends) work->wait(RemainingOrZero(deadline));
}

// The last exchange: each element of a rank's overhang goes to the rank whose output holds
// it, received straight into that rank's `out`. (With chunk == n there are none.)
void ExchangeOverhangs(c10d::Backend& pg, const RingChunks& chunks, int rank, at::Tensor& out,
                       const at::Tensor& overhang, int tag,
                       std::chrono::steady_clock::time_point deadline) {
  const int64_t n = chunks.n;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  std::vector<std::vector<at::Tensor>> keep;
  for (int g = 0; g < chunks.size; ++g) {
    if (g == rank) continue;
    // What rank g's overhang holds of this rank's output.
    const auto [begin, end] = chunks.Overhang(g);
    const int64_t lo = std::max(begin, rank * n);
    const int64_t hi = std::min(end, (rank + 1) * n);
    if (hi > lo) {
      keep.push_back({out.narrow(0, lo - rank * n, hi - lo)});
      works.push_back(pg.recv(keep.back(), g, tag));
    }
  }
  const auto [begin, end] = chunks.Overhang(rank);
  for (int c = 0; c < chunks.size; ++c) {
    const int64_t lo = std::max(begin, c * n);
    const int64_t hi = std::min(end, (c + 1) * n);
    if (c == rank || hi <= lo) continue;
    keep.push_back({overhang.narrow(0, lo - begin, hi - lo)});
    works.push_back(pg.send(keep.back(), c, tag));
  }
  for (auto& work : works) work->wait(RemainingOrZero(deadline));
}

}  // namespace

ProcessGroup::ProcessGroup(c10::intrusive_ptr<c10d::Store> store,
                           c10::intrusive_ptr<c10d::Backend> pg, int rank, int size,
                           ProcessGroupOptions options, std::vector<int> global_ranks)
    : store_(std::move(store)),
      pg_(std::move(pg)),
      rank_(rank),
      size_(size),
      options_(std::move(options)),
      global_ranks_(std::move(global_ranks)) {}

ProcessGroup::~ProcessGroup() = default;

namespace {

// Gloo writes to its sockets with writev, which raises SIGPIPE once a peer has gone; by default
// that kills this rank instead of failing its collective (seen in comm:failure_test: a
// surviving rank "killed by signal 13"). Python ignores SIGPIPE from start-up, so PyTorch
// never meets this; a C++ program does. Ignored unless the program set its own handler.
void IgnoreSigpipeUnlessHandled() {
  struct sigaction current {};
  if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
    signal(SIGPIPE, SIG_IGN);
  }
}

}  // namespace

absl::StatusOr<std::shared_ptr<ProcessGroup>> ProcessGroup::Create(
    c10::intrusive_ptr<c10d::Store> store, int rank, int size, const ProcessGroupOptions& options) {
  IgnoreSigpipeUnlessHandled();
  if (size <= 0 || rank < 0 || rank >= size) {
    return absl::InvalidArgumentError(absl::StrCat("process group '", options.name, "': rank ",
                                                   rank, " is outside a group of size ", size));
  }
  if (!store) {
    return absl::InvalidArgumentError(
        absl::StrCat("process group '", options.name, "': no store given"));
  }
  auto pg = CallTorch(
      absl::StrCat("creating Gloo process group '", options.name, "' (rank ", rank, " of ", size,
                   ")"),
      [&]() -> c10::intrusive_ptr<c10d::Backend> {
        auto gloo_options = c10d::ProcessGroupGloo::Options::create(options.timeout);
        gloo_options->devices.push_back(MakeDevice(options));
        // Two worker threads: a collective and a pending send/recv can progress together.
        gloo_options->threads = 2;
        return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, gloo_options);
      });
  if (!pg.ok()) return pg.status();
  std::vector<int> global_ranks(size);
  for (int i = 0; i < size; ++i) global_ranks[i] = i;
  std::shared_ptr<ProcessGroup> group(
      new ProcessGroup(std::move(store), *std::move(pg), rank, size, options, global_ranks));
  // Gloo's constructor returns once this rank's own connections are up, not everyone's: a rank
  // could go on, finish and exit while a slower peer is still completing its handshake with it,
  // and that peer would fail with "Connection closed by peer". Seen once under ASan at load 19.
  // A barrier makes creation end together on every rank.
  FSDP_RETURN_IF_ERROR(group->Barrier());
  return group;
}

std::chrono::milliseconds ProcessGroup::Timeout(const CollectiveOptions& options) const {
  return options.timeout == kUseGroupTimeout ? options_.timeout : options.timeout;
}

std::string ProcessGroup::Where(absl::string_view op) const {
  const int global = global_ranks_[rank_];
  return absl::StrCat(op, " on rank ", rank_,
                      global != rank_ ? absl::StrCat(" (global ", global, ")") : "", " of group '",
                      options_.name, "' (size ", size_, ")");
}

absl::Status ProcessGroup::CheckTensor(absl::string_view op, const at::Tensor& t) const {
  if (!t.defined()) return absl::InvalidArgumentError(Where(op) + ": undefined tensor");
  if (!t.device().is_cpu()) {
    return absl::InvalidArgumentError(absl::StrCat(
        Where(op), ": the Gloo group takes CPU tensors, got one on ", t.device().str()));
  }
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(Where(op) + ": tensor is not contiguous");
  }
  return absl::OkStatus();
}

int ProcessGroup::NextTag() { return NextTags(1); }

int ProcessGroup::NextTags(int count) {
  if (tag_counter_ + count >= kInternalTagBase) tag_counter_ = 0;
  const int tag = kInternalTagBase + tag_counter_;
  tag_counter_ += count;
  return tag;
}

at::Tensor ProcessGroup::Scratch(int index, int64_t numel, const at::TensorOptions& options) {
  at::Tensor& buffer = scratch_[index];
  if (!buffer.defined() || buffer.numel() < numel || buffer.dtype() != options.dtype()) {
    buffer = at::empty({numel}, options);
  }
  return buffer.narrow(0, 0, numel);
}

absl::Status ProcessGroup::SendRecv(const at::Tensor& send, int dst, at::Tensor& recv, int src,
                                    int tag, std::chrono::steady_clock::time_point deadline) {
  std::vector<at::Tensor> send_list{send};
  std::vector<at::Tensor> recv_list{recv};
  auto send_work = pg_->send(send_list, dst, tag);
  auto recv_work = pg_->recv(recv_list, src, tag);
  recv_work->wait(RemainingOrZero(deadline));
  send_work->wait(RemainingOrZero(deadline));
  return absl::OkStatus();
}

absl::string_view CollectiveImplName(CollectiveImpl impl) {
  switch (impl) {
    case CollectiveImpl::kDefault:
      return "default";
    case CollectiveImpl::kRing:
      return "ring";
    case CollectiveImpl::kGloo:
      return "gloo";
  }
  return "unknown";
}

absl::StatusOr<bool> ProcessGroup::PrepareAllGather(absl::string_view op, const at::Tensor& output,
                                                    const at::Tensor& input, at::Tensor& out,
                                                    at::Tensor& in) const {
  FSDP_RETURN_IF_ERROR(CheckTensor(op, input));
  FSDP_RETURN_IF_ERROR(CheckTensor(op, output));
  const int64_t n = input.numel();
  if (output.numel() != n * size_ || output.scalar_type() != input.scalar_type()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(op), ": output must hold size * input.numel() = ", n * size_,
                     " elements of ", c10::toString(input.scalar_type()), ", got ", output.numel(),
                     " of ", c10::toString(output.scalar_type())));
  }
  out = output.view({-1});
  in = input.reshape({-1});
  if (size_ > 1 && n > 0) return false;
  out.copy_(in);
  return true;
}

absl::Status ProcessGroup::AllGatherIntoTensor(at::Tensor& output, const at::Tensor& input,
                                               const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "all_gather_into_tensor";
  at::Tensor out, in;
  FSDP_ASSIGN_OR_RETURN(const bool done, PrepareAllGather(kOp, output, input, out, in));
  if (done) return absl::OkStatus();
  const int64_t n = in.numel();
  const CollectiveImpl impl = Resolve(options.impl);
  const std::chrono::milliseconds timeout = Timeout(options);
  return CallTorch(Where(kOp), [&]() -> absl::Status {
    if (impl == CollectiveImpl::kGloo) {
      // opts.timeout bounds gloo::allgather itself, wait() the wait for it.
      IssueAllGatherGloo(out, in, timeout)->wait(timeout);
      return absl::OkStatus();
    }
    // One deadline for the whole ring, not one timeout per step.
    return AllGatherRing(out, in, n, NextTag(), std::chrono::steady_clock::now() + timeout);
  });
}

absl::StatusOr<std::shared_ptr<Work>> ProcessGroup::AllGatherIntoTensorAsync(
    at::Tensor output, at::Tensor input, const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "all_gather_into_tensor (async)";
  at::Tensor out, in;
  FSDP_ASSIGN_OR_RETURN(const bool done, PrepareAllGather(kOp, output, input, out, in));
  if (done) return Work::Done(absl::OkStatus());
  const int64_t n = in.numel();
  const std::chrono::milliseconds timeout = Timeout(options);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto work = std::make_shared<Work>(Where(kOp), deadline, std::vector<at::Tensor>{out, in});
  std::function<absl::Status()> op;
  if (Resolve(options.impl) == CollectiveImpl::kGloo) {
    // Issued here, in the caller's order; the thread waits for it.
    FSDP_ASSIGN_OR_RETURN(c10::intrusive_ptr<c10d::Work> gloo_work, CallTorch(Where(kOp), [&] {
                            return IssueAllGatherGloo(out, in, timeout);
                          }));
    op = [gloo_work, deadline]() -> absl::Status {
      gloo_work->wait(RemainingOrZero(deadline));
      return absl::OkStatus();
    };
  } else {
    op = [this, out, in, n, tag = NextTag(), deadline]() mutable -> absl::Status {
      return AllGatherRing(out, in, n, tag, deadline);
    };
  }
  if (work_queue_ == nullptr) work_queue_ = std::make_unique<internal::WorkQueue>();
  work_queue_->Enqueue(work, std::move(op));
  return work;
}

absl::Status ProcessGroup::AllGatherRing(at::Tensor& out, const at::Tensor& in, int64_t n, int tag,
                                         std::chrono::steady_clock::time_point deadline) {
  out.narrow(0, rank_ * n, n).copy_(in);
  const int next = (rank_ + 1) % size_;
  const int prev = (rank_ - 1 + size_) % size_;
  // Ring: at step s, pass on the chunk received at step s - 1 (own chunk first).
  for (int s = 0; s < size_ - 1; ++s) {
    const int send_chunk = (rank_ - s + size_) % size_;
    const int recv_chunk = (rank_ - s - 1 + size_) % size_;
    at::Tensor recv = out.narrow(0, recv_chunk * n, n);
    FSDP_RETURN_IF_ERROR(
        SendRecv(out.narrow(0, send_chunk * n, n), next, recv, prev, tag, deadline));
  }
  return absl::OkStatus();
}

c10::intrusive_ptr<c10d::Work> ProcessGroup::IssueAllGatherGloo(at::Tensor& out,
                                                                const at::Tensor& in,
                                                                std::chrono::milliseconds timeout) {
  // As bytes: Gloo's collectives take only some dtypes, and gathering only copies. Gloo reads
  // the input before it writes the output, so an input that is a view of its own chunk of the
  // output (FSDP's unsharded flat parameter) is fine.
  at::Tensor out_bytes = out.view(at::kByte);
  at::Tensor in_bytes = in.view(at::kByte);
  c10d::AllgatherOptions opts;
  opts.timeout = timeout;  // bounds gloo::allgather itself
  return pg_->_allgather_base(out_bytes, in_bytes, opts);
}

absl::Status ProcessGroup::ReduceScatterTensor(at::Tensor& output, const at::Tensor& input,
                                               ReduceOp op, const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "reduce_scatter_tensor";
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, input));
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, output));
  const int64_t n = output.numel();
  if (input.numel() != n * size_ || output.scalar_type() != input.scalar_type()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(kOp), ": input must hold size * output.numel() = ", n * size_,
                     " elements of ", c10::toString(output.scalar_type()), ", got ", input.numel(),
                     " of ", c10::toString(input.scalar_type())));
  }
  if (op == ReduceOp::kAvg && !at::isFloatingType(output.scalar_type())) {
    return absl::InvalidArgumentError(Where(kOp) + ": kAvg needs a floating-point tensor");
  }
  at::Tensor in = input.reshape({-1});
  at::Tensor out = output.view({-1});
  if (size_ == 1 || n == 0) {
    out.copy_(in.narrow(0, 0, n));
    return absl::OkStatus();
  }
  const CollectiveImpl impl = Resolve(options.impl);
  FSDP_RETURN_IF_ERROR(CallTorch(Where(kOp), [&]() -> absl::Status {
    return impl == CollectiveImpl::kGloo ? ReduceScatterGloo(out, in, op, Timeout(options))
                                         : ReduceScatterRing(out, in, n, op, Timeout(options));
  }));
  // Both sum for kAvg; the division is ours either way, so the two agree bit for bit.
  if (op == ReduceOp::kAvg) out.div_(size_);
  return absl::OkStatus();
}

absl::Status ProcessGroup::ReduceScatterRing(at::Tensor& out, const at::Tensor& in, int64_t n,
                                             ReduceOp op, std::chrono::milliseconds timeout) {
  // The ring of Gloo's all-reduce (gloo/allreduce.cc, `ring`), whose reduce-scatter half this
  // is, run so that every element is summed in the order Gloo sums it: rank r sends to r - 1
  // and receives from r + 1, and the partial sum of chunk c starts at rank c - 1 and gathers
  // c - 2, c - 3, ... on its way to rank c, which adds its own value last. Float sums of three
  // or more values depend on that order (PyTorch's reduce_scatter_tensor on Gloo is that
  // all-reduce, see ReduceScatterGloo), so with the same order the two agree bit for bit.
  //
  // Gloo's chunks are its own: `chunk` elements each (GlooRingChunk), which can exceed n when
  // Gloo's segments do not divide n. Rank g then ends with the sum of elements that belong to
  // later ranks' outputs ("the overhang" of its chunk); a last exchange sends each of those to
  // its rank. When the order cannot change the result (2 ranks: a + b == b + a; integers;
  // max and min), the chunks are simply ours (chunk == n) and there is no overhang.
  //
  // Each ring step is cut into pieces whose receives are all posted at once, so that adding
  // one piece overlaps receiving the next.
  const RingChunks chunks = MakeRingChunks(in, n, size_, op);
  // Tags: one per piece (reused by every step, as messages between two ranks arrive in order),
  // the last one for the overhang. The count is the same on every rank.
  const int max_pieces = chunks.MaxPieces();
  const int base_tag = NextTags(max_pieces + 1);
  const int overhang_tag = base_tag + max_pieces;

  at::Tensor partial = Scratch(0, chunks.chunk, in.options());
  at::Tensor spare = Scratch(1, chunks.chunk, in.options());
  const int first = (rank_ + 1) % size_;
  at::Tensor send_buf = in.narrow(0, chunks.Begin(first), chunks.Len(first));
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (int s = 0; s < size_ - 2; ++s) {
    RingStep(*pg_, chunks, rank_, s, in, out, send_buf, partial, op, base_tag, deadline);
    // The sum just formed is the next step's send buffer; receive into the other one.
    const int recv_chunk = (rank_ + 2 + s) % size_;
    send_buf = partial.narrow(0, 0, chunks.Len(recv_chunk));
    std::swap(partial, spare);
  }
  RingStep(*pg_, chunks, rank_, size_ - 2, in, out, send_buf, partial, op, base_tag, deadline);
  // This rank's overhang, now that the ring is done.
  const at::Tensor overhang = partial.narrow(0, 0, chunks.Len(rank_) - chunks.OwnLen(rank_));
  ExchangeOverhangs(*pg_, chunks, rank_, out, overhang, overhang_tag, deadline);
  return absl::OkStatus();
}

absl::Status ProcessGroup::ReduceScatterGloo(at::Tensor& out, const at::Tensor& in, ReduceOp op,
                                             std::chrono::milliseconds timeout) {
  // ProcessGroupGloo all-reduces a copy of `in` (so `in` is left as it was) and copies this
  // rank's chunk of it to `out`. The Work it returns ignores wait()'s timeout; the all-reduce
  // inside it has opts.timeout.
  at::Tensor input = in;
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = ToC10d(op);
  opts.timeout = timeout;
  pg_->_reduce_scatter_base(out, input, opts)->wait(timeout);
  return absl::OkStatus();
}

absl::Status ProcessGroup::AllReduce(at::Tensor& tensor, ReduceOp op,
                                     const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "all_reduce";
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, tensor));
  if (op == ReduceOp::kAvg && !at::isFloatingType(tensor.scalar_type())) {
    return absl::InvalidArgumentError(Where(kOp) + ": kAvg needs a floating-point tensor");
  }
  if (size_ > 1) {
    FSDP_RETURN_IF_ERROR(CallTorch(Where(kOp), [&] {
      std::vector<at::Tensor> tensors{tensor};
      c10d::AllreduceOptions opts;
      opts.reduceOp = ToC10d(op);
      opts.timeout = Timeout(options);
      pg_->allreduce(tensors, opts)->wait(Timeout(options));
    }));
  }
  if (op == ReduceOp::kAvg) tensor.div_(size_);
  return absl::OkStatus();
}

absl::Status ProcessGroup::Broadcast(at::Tensor& tensor, int root,
                                     const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "broadcast";
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, tensor));
  if (root < 0 || root >= size_) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(kOp), ": root ", root, " is outside the group"));
  }
  if (size_ == 1 || tensor.numel() == 0) return absl::OkStatus();
  return CallTorch(Where(kOp), [&] {
    std::vector<at::Tensor> tensors{tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = Timeout(options);
    pg_->broadcast(tensors, opts)->wait(Timeout(options));
  });
}

absl::Status ProcessGroup::Barrier(const CollectiveOptions& options) {
  if (size_ == 1) return absl::OkStatus();
  return CallTorch(Where("barrier"), [&] {
    c10d::BarrierOptions opts;
    opts.timeout = Timeout(options);
    pg_->barrier(opts)->wait(Timeout(options));
  });
}

absl::Status ProcessGroup::Send(const at::Tensor& tensor, int dst, int tag,
                                const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "send";
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, tensor));
  if (dst < 0 || dst >= size_ || dst == rank_ || tag < 0 || tag >= kInternalTagBase) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(kOp), ": bad destination ", dst, " or tag ", tag));
  }
  return CallTorch(absl::StrCat(Where(kOp), " to rank ", dst), [&] {
    std::vector<at::Tensor> tensors{tensor};
    pg_->send(tensors, dst, tag)->wait(Timeout(options));
  });
}

absl::Status ProcessGroup::Recv(at::Tensor& tensor, int src, int tag,
                                const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "recv";
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, tensor));
  if (src < 0 || src >= size_ || src == rank_ || tag < 0 || tag >= kInternalTagBase) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(kOp), ": bad source ", src, " or tag ", tag));
  }
  return CallTorch(absl::StrCat(Where(kOp), " from rank ", src), [&] {
    std::vector<at::Tensor> tensors{tensor};
    pg_->recv(tensors, src, tag)->wait(Timeout(options));
  });
}

namespace {

at::Tensor BytesView(const std::string& bytes) {
  return at::from_blob(const_cast<char*>(bytes.data()), {static_cast<int64_t>(bytes.size())},
                       at::kByte);
}

}  // namespace

absl::StatusOr<std::string> ProcessGroup::BroadcastObject(const std::string& bytes, int root,
                                                          const CollectiveOptions& options) {
  if (root < 0 || root >= size_) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where("broadcast_object"), ": root ", root, " is outside the group"));
  }
  at::Tensor length = at::empty({1}, at::kLong);
  length[0] = rank_ == root ? static_cast<int64_t>(bytes.size()) : 0;
  FSDP_RETURN_IF_ERROR(Broadcast(length, root, options), "broadcast_object (length)");
  if (rank_ == root) {
    at::Tensor data = BytesView(bytes);
    FSDP_RETURN_IF_ERROR(Broadcast(data, root, options), "broadcast_object (bytes)");
    return bytes;
  }
  std::string out(static_cast<size_t>(length.item<int64_t>()), '\0');
  at::Tensor data = BytesView(out);
  FSDP_RETURN_IF_ERROR(Broadcast(data, root, options), "broadcast_object (bytes)");
  return out;
}

absl::StatusOr<std::string> ProcessGroup::ScatterObject(const std::vector<std::string>& per_rank,
                                                        int root,
                                                        const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "scatter_object";
  if (root < 0 || root >= size_) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(kOp), ": root ", root, " is outside the group"));
  }
  // The root checks its input but the check's outcome must reach everyone, or the others
  // would wait for bytes that never come: a length of -1 signals the error.
  at::Tensor lengths = at::zeros({size_}, at::kLong);
  if (rank_ == root) {
    if (static_cast<int>(per_rank.size()) != size_) {
      lengths.fill_(-1);
    } else {
      for (int r = 0; r < size_; ++r) lengths[r] = static_cast<int64_t>(per_rank[r].size());
    }
  }
  FSDP_RETURN_IF_ERROR(Broadcast(lengths, root, options), absl::StrCat(kOp, " (lengths)"));
  if (lengths[0].item<int64_t>() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        Where(kOp), ": root ", root, " passed ",
        rank_ == root ? std::to_string(per_rank.size()) : std::string("a wrong number of"),
        " objects for a group of size ", size_));
  }
  const int tag = NextTag();
  if (rank_ == root) {
    for (int r = 0; r < size_; ++r) {
      if (r == root || per_rank[r].empty()) continue;
      FSDP_RETURN_IF_ERROR(CallTorch(absl::StrCat(Where(kOp), " to rank ", r), [&] {
        std::vector<at::Tensor> tensors{BytesView(per_rank[r])};
        pg_->send(tensors, r, tag)->wait(Timeout(options));
      }));
    }
    return per_rank[root];
  }
  std::string out(static_cast<size_t>(lengths[rank_].item<int64_t>()), '\0');
  if (!out.empty()) {
    FSDP_RETURN_IF_ERROR(CallTorch(absl::StrCat(Where(kOp), " from rank ", root), [&] {
      std::vector<at::Tensor> tensors{BytesView(out)};
      pg_->recv(tensors, root, tag)->wait(Timeout(options));
    }));
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> ProcessGroup::AllGatherObject(
    const std::string& bytes, const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "all_gather_object";
  at::Tensor my_length = at::full({1}, static_cast<int64_t>(bytes.size()), at::kLong);
  at::Tensor lengths = at::empty({size_}, at::kLong);
  FSDP_RETURN_IF_ERROR(AllGatherIntoTensor(lengths, my_length, options),
                       absl::StrCat(kOp, " (lengths)"));
  const int64_t max_length = lengths.max().item<int64_t>();
  at::Tensor padded = at::zeros({max_length}, at::kByte);
  if (!bytes.empty()) padded.narrow(0, 0, bytes.size()).copy_(BytesView(bytes));
  at::Tensor gathered = at::empty({max_length * size_}, at::kByte);
  FSDP_RETURN_IF_ERROR(AllGatherIntoTensor(gathered, padded, options),
                       absl::StrCat(kOp, " (bytes)"));
  std::vector<std::string> out(size_);
  const auto* data = reinterpret_cast<const char*>(gathered.data_ptr<uint8_t>());
  for (int r = 0; r < size_; ++r) {
    out[r].assign(data + r * max_length, static_cast<size_t>(lengths[r].item<int64_t>()));
  }
  return out;
}

absl::StatusOr<std::shared_ptr<ProcessGroup>> ProcessGroup::NewSubgroup(
    const std::vector<int>& ranks, std::optional<std::chrono::milliseconds> timeout) {
  const std::string listed = absl::StrJoin(ranks, ",");
  if (ranks.empty()) {
    return absl::InvalidArgumentError(Where("new_subgroup") + ": empty rank list");
  }
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (ranks[i] < 0 || ranks[i] >= size_ || (i > 0 && ranks[i] <= ranks[i - 1])) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where("new_subgroup"), ": ranks [", listed,
                       "] must be increasing, without repeats, within [0, ", size_, ")"));
    }
  }
  const int64_t id = subgroup_counter_++;
  int my_index = -1;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (ranks[i] == rank_) my_index = static_cast<int>(i);
  }
  if (my_index < 0) return std::shared_ptr<ProcessGroup>();
  ProcessGroupOptions options = options_;
  options.name = absl::StrCat(options_.name, "/subgroup", id, "[", listed, "]");
  if (timeout) options.timeout = *timeout;
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(
      absl::StrCat(options_.name, "/subgroup", id, "/"), store_);
  FSDP_ASSIGN_OR_RETURN(std::shared_ptr<ProcessGroup> group,
                        Create(prefixed, my_index, static_cast<int>(ranks.size()), options));
  for (size_t i = 0; i < ranks.size(); ++i) group->global_ranks_[i] = global_ranks_[ranks[i]];
  return group;
}

}  // namespace fsdp::comm
