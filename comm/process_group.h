// ProcessGroup: the collectives FSDP needs, on real c10d process groups.
//
// A ProcessGroup is a set of ranks (separate OS processes, possibly on several hosts) that
// exchange tensors through a c10d backend: Gloo for CPU tensors. Every rank of the group must
// make the same collective calls in the same order, with tensors of matching size and dtype.
//
// Collectives work on flat, contiguous tensors (FlatParameter buffers):
//   * AllGatherIntoTensor: each rank contributes `input` (numel n); `output` (numel n * size)
//     receives every rank's input in rank order.
//   * ReduceScatterTensor: `input` (numel n * size) is reduced element-wise across ranks and
//     rank r keeps chunk r in `output` (numel n).
// Each of the two has two implementations (CollectiveImpl, chosen per call):
//   * kRing: ours, a ring over Gloo's point-to-point send/recv (LibTorch 1.13's Gloo had
//     neither collective). Each rank sends and receives (size - 1) / size of the buffer, which
//     is bandwidth-optimal; reduce-scatter pipelines each ring step in 4 MiB pieces. Its
//     reduce-scatter adds every element's values in the order Gloo's ring all-reduce does
//     (chunked as Gloo chunks the buffer), so its sums equal kGloo's, and PyTorch's
//     reduce_scatter_tensor on Gloo, bit for bit at any world size.
//   * kGloo: c10d::ProcessGroupGloo's own `_allgather_base` / `_reduce_scatter_base`
//     (LibTorch 2.x). Its all-gather is gloo::allgather (a ring) into a temporary buffer that
//     is then copied to `output`; its reduce-scatter is an all-reduce of a copy of the whole
//     input (2x the bytes of a ring reduce-scatter) of which each rank keeps its chunk.
//   * kDefault: kRing. It is the faster from 16 MiB (FSDP's unit sizes; comm_benchmark,
//     bench/README.md), and Gloo's all-gather is unsafe when a peer dies: PyTorch 2.13 frees
//     its temporary while Gloo's transport thread still sends from it (a heap-use-after-free
//     under AddressSanitizer). kGloo is there to be measured against.
//
// Errors (every method returns a status; nothing throws):
//   * INVALID_ARGUMENT: mismatched sizes or dtypes, non-contiguous or non-CPU tensors, a root
//     outside the group. Nothing was sent.
//   * DEADLINE_EXCEEDED: the operation did not complete within its timeout.
//   * UNAVAILABLE: a peer closed its connection (for example it died).
//   * INTERNAL: any other backend failure.
// The message always names the operation, this process's rank, and the group.
//
// Asynchronous all-gather (AllGatherIntoTensorAsync, what FSDP's prefetching issues): the call
// checks its tensors, takes the operation's place in the group's order and returns a Work
// (work.h) at once; the gather runs on the group's own communication thread, one operation
// after another in issue order, while the caller computes. Why a thread of ours and not
// ProcessGroupGloo's asynchronous `_allgather_base` alone: our ring is the faster (see kDefault)
// and the safe one when a peer dies, and it needs a thread to drive its steps. The ring's
// messages carry a tag taken when the call is issued, in the calling thread, so every rank
// pairs the same operations whatever runs meanwhile (blocking collectives of the caller use
// other tags, Gloo's collectives their own slots). With kGloo the c10d operation itself is
// issued in the calling thread (Gloo numbers its collectives when they are issued) and the
// thread only waits for it.
//
// After DEADLINE_EXCEEDED or UNAVAILABLE the group is broken (Gloo's connections are in an
// undefined state, as after a c10d timeout): the job should end. A peer that dies is seen as
// UNAVAILABLE when its connection closes under a pending operation, otherwise when the
// operation's timeout passes; the launcher stops the remaining ranks as soon as one fails.
// So that a dead peer is a status and not a SIGPIPE, Create() sets SIGPIPE to be ignored
// unless the program has installed a handler of its own (Python, hence PyTorch, does the same).
#ifndef FSDP_CPP_COMM_PROCESS_GROUP_H_
#define FSDP_CPP_COMM_PROCESS_GROUP_H_

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "comm/work.h"

namespace c10d {
class Backend;
class Work;
}  // namespace c10d

namespace fsdp::comm {

// The group's own default timeout applies when a call leaves `timeout` unset.
inline constexpr std::chrono::milliseconds kUseGroupTimeout{0};
inline constexpr std::chrono::milliseconds kDefaultGroupTimeout{std::chrono::minutes(5)};

// Which implementation runs AllGatherIntoTensor / ReduceScatterTensor (see the top).
enum class CollectiveImpl {
  kDefault,  // kRing (see the top)
  kRing,     // ours: a ring over Gloo send/recv
  kGloo,     // c10d::ProcessGroupGloo's _allgather_base / _reduce_scatter_base
};

// "default", "ring", "gloo" (test names, benchmark labels).
absl::string_view CollectiveImplName(CollectiveImpl impl);

// Per-call options of every collective, as c10d's Types.hpp option structs.
struct CollectiveOptions {
  std::chrono::milliseconds timeout = kUseGroupTimeout;
  // AllGatherIntoTensor and ReduceScatterTensor only; the other calls ignore it.
  CollectiveImpl impl = CollectiveImpl::kDefault;
};

enum class ReduceOp { kSum, kAvg, kMax, kMin };

struct ProcessGroupOptions {
  // Name used in error messages ("default", "subgroup[0,2]", ...).
  std::string name = "default";
  // Default timeout of every collective of this group (and of the rendezvous).
  std::chrono::milliseconds timeout = kDefaultGroupTimeout;
  // Address the Gloo transport binds to. Empty: GLOO_SOCKET_IFNAME if set, else loopback when
  // `master_addr` is a loopback address, else this host's resolved hostname.
  std::string bind_address;
  // The rendezvous address; used to pick the transport's interface (see above).
  std::string master_addr = "127.0.0.1";
};

class ProcessGroup {
 public:
  // Creates this rank's member of a group of `size` ranks that rendezvous through `store`.
  // Blocks until every rank has joined or `options.timeout` passes.
  // Errors: INVALID_ARGUMENT for a rank outside [0, size); DEADLINE_EXCEEDED, UNAVAILABLE.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<ProcessGroup>> Create(
      c10::intrusive_ptr<c10d::Store> store, int rank, int size,
      const ProcessGroupOptions& options = {});

  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& name() const { return options_.name; }
  std::chrono::milliseconds timeout() const { return options_.timeout; }
  // Global rank (in the group this one was split from, recursively) of each group rank.
  const std::vector<int>& global_ranks() const { return global_ranks_; }

  [[nodiscard]] absl::Status AllGatherIntoTensor(at::Tensor& output, const at::Tensor& input,
                                                 const CollectiveOptions& options = {});
  // AllGatherIntoTensor issued asynchronously (see the top): INVALID_ARGUMENT is returned
  // here, before anything is sent; collective errors come from the Work's Wait(), whose
  // deadline is the options' timeout counted from now. Do not touch `output` (nor `input`)
  // until Wait() has returned.
  [[nodiscard]] absl::StatusOr<std::shared_ptr<Work>> AllGatherIntoTensorAsync(
      at::Tensor output, at::Tensor input, const CollectiveOptions& options = {});
  [[nodiscard]] absl::Status ReduceScatterTensor(at::Tensor& output, const at::Tensor& input,
                                                 ReduceOp op = ReduceOp::kSum,
                                                 const CollectiveOptions& options = {});
  // In place. kAvg divides the sum by size() (floating-point tensors only).
  [[nodiscard]] absl::Status AllReduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum,
                                       const CollectiveOptions& options = {});
  // In place: every rank's `tensor` becomes root's.
  [[nodiscard]] absl::Status Broadcast(at::Tensor& tensor, int root,
                                       const CollectiveOptions& options = {});
  [[nodiscard]] absl::Status Barrier(const CollectiveOptions& options = {});

  // Point-to-point, blocking until done (a matching Recv/Send must be posted by the peer).
  [[nodiscard]] absl::Status Send(const at::Tensor& tensor, int dst, int tag,
                                  const CollectiveOptions& options = {});
  [[nodiscard]] absl::Status Recv(at::Tensor& tensor, int src, int tag,
                                  const CollectiveOptions& options = {});

  // Serialized objects (any size): root's `bytes` reach every rank. `bytes` is ignored on
  // ranks other than root.
  [[nodiscard]] absl::StatusOr<std::string> BroadcastObject(const std::string& bytes, int root,
                                                            const CollectiveOptions& options = {});
  // Root passes one string per rank (`per_rank.size() == size()`); rank r receives
  // `per_rank[r]`. Only each rank's own bytes travel to it. `per_rank` is ignored elsewhere.
  [[nodiscard]] absl::StatusOr<std::string> ScatterObject(const std::vector<std::string>& per_rank,
                                                          int root,
                                                          const CollectiveOptions& options = {});
  // All ranks' bytes, in rank order.
  [[nodiscard]] absl::StatusOr<std::vector<std::string>> AllGatherObject(
      const std::string& bytes, const CollectiveOptions& options = {});

  // Creates a group of the given ranks of this group (any subset, listed in increasing
  // order without repeats). Every rank of this group must call it with the same `ranks`, in the
  // same order relative to other NewSubgroup calls, as torch.distributed.new_group requires.
  // Returns nullptr on ranks that are not members.
  // Errors: INVALID_ARGUMENT for an empty, unsorted or out-of-range rank list.
  [[nodiscard]] absl::StatusOr<std::shared_ptr<ProcessGroup>> NewSubgroup(
      const std::vector<int>& ranks, std::optional<std::chrono::milliseconds> timeout = {});

 private:
  ProcessGroup(c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<c10d::Backend> pg,
               int rank, int size, ProcessGroupOptions options, std::vector<int> global_ranks);

  std::chrono::milliseconds Timeout(const CollectiveOptions& options) const;
  std::string Where(absl::string_view op) const;
  absl::Status CheckTensor(absl::string_view op, const at::Tensor& t) const;
  // The implementations behind AllGatherIntoTensor / ReduceScatterTensor, called with
  // checked, flat tensors, size() > 1 and n > 0.
  // Checks the tensors and flattens them into `out` / `in`; true when nothing travels (one
  // rank or an empty input: copied here).
  absl::StatusOr<bool> PrepareAllGather(absl::string_view op, const at::Tensor& output,
                                        const at::Tensor& input, at::Tensor& out,
                                        at::Tensor& in) const;
  absl::Status AllGatherRing(at::Tensor& out, const at::Tensor& in, int64_t n, int tag,
                             std::chrono::steady_clock::time_point deadline);
  c10::intrusive_ptr<c10d::Work> IssueAllGatherGloo(at::Tensor& out, const at::Tensor& in,
                                                    std::chrono::milliseconds timeout);
  absl::Status ReduceScatterRing(at::Tensor& out, const at::Tensor& in, int64_t n, ReduceOp op,
                                 std::chrono::milliseconds timeout);
  absl::Status ReduceScatterGloo(at::Tensor& out, const at::Tensor& in, ReduceOp op,
                                 std::chrono::milliseconds timeout);
  // One send and one receive posted together, then both awaited (the ring step).
  absl::Status SendRecv(const at::Tensor& send, int dst, at::Tensor& recv, int src, int tag,
                        std::chrono::steady_clock::time_point deadline);
  int NextTag();
  // `count` consecutive internal tags, the first returned.
  int NextTags(int count);
  // Scratch buffer `index` (0 or 1) of at least `numel` elements, kept between calls.
  at::Tensor Scratch(int index, int64_t numel, const at::TensorOptions& options);

  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::Backend> pg_;
  int rank_;
  int size_;
  ProcessGroupOptions options_;
  std::vector<int> global_ranks_;
  int64_t subgroup_counter_ = 0;
  int tag_counter_ = 0;
  at::Tensor scratch_[2];
  // Runs the asynchronous operations; last, so that it ends (joining its thread) first.
  std::unique_ptr<internal::WorkQueue> work_queue_;
};

}  // namespace fsdp::comm

#endif  // FSDP_CPP_COMM_PROCESS_GROUP_H_
