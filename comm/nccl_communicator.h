// NcclCommunicator: the collectives FSDP needs, on CUDA tensors, through NCCL.
//
// The CUDA counterpart of ProcessGroup (comm/process_group.h), with the same collectives and
// size rules: one communicator per rank process, bound to one CUDA device; every rank must make
// the same calls in the same order with tensors of matching size and dtype.
//   * AllGatherIntoTensor: `input` (numel n) from every rank lands, in rank order, in `output`
//     (numel n * size). `input` may be rank r's own chunk of `output` (in place).
//   * ReduceScatterTensor: `input` (numel n * size) is reduced element-wise across ranks; rank r
//     keeps chunk r in `output` (numel n). kAvg is NCCL's ncclAvg.
//   * AllReduce, Broadcast: in place on `tensor`.
//
// Streams: the communicator owns one CUDA stream (a blocking stream, so it is ordered with work
// on the legacy default stream, e.g. a plain cudaMemcpy). Each call enqueues its NCCL operation
// there and returns once the stream has finished it, so the result is ready when the call
// returns. The libtorch on this project's machines is CPU-only and has no CUDA streams of its
// own; work a caller queued on other streams must be finished before the call.
//
// Tensors: CUDA tensors on this communicator's device, contiguous, of dtype float, double,
// half, bfloat16, int32, int64 or uint8. Only their metadata and data pointer are used. A
// CPU-only libtorch cannot allocate CUDA memory nor run operators on CUDA tensors, and its
// at::from_blob cannot tell the device of a pointer; WrapDeviceMemory below wraps memory from
// cudaMalloc (or any allocator) as such a tensor.
//
// Preconditions: `store` is shared by all ranks (a c10d TCPStore, FileStore, ...); each rank
// uses its own device (NCCL does not allow two ranks of a communicator on one GPU); ranks
// create their communicators of a given name in the same order. A communicator is used by one
// thread at a time.
//
// Errors (every method returns a status; nothing throws). The message names the operation,
// this rank, the group name and size, and the device; NCCL failures add ncclGetErrorString and
// NCCL's last error text.
//   * INVALID_ARGUMENT: a rank outside [0, size), size < 1, a negative or absent device, no
//     store, a timeout that is not positive; a tensor that is undefined, not CUDA, on another device, not contiguous, of an
//     unsupported dtype, of mismatched size or dtype; kAvg on an integer dtype; a root outside
//     the group. Nothing was sent. NCCL's ncclInvalidArgument also maps here.
//   * FAILED_PRECONDITION: no usable CUDA device or driver (Create); the communicator was
//     aborted by an earlier timeout or error (every later call); ncclInvalidUsage.
//   * DEADLINE_EXCEEDED: the rendezvous, communicator setup or operation did not complete within
//     the timeout. The communicator is then aborted (ncclCommAbort) and unusable.
//   * UNAVAILABLE: NCCL reports a remote or system error (a peer died, a socket failed); the
//     communicator is aborted.
//   * INTERNAL: any other CUDA or NCCL failure; the communicator is aborted.
#ifndef FSDP_CPP_COMM_NCCL_COMMUNICATOR_H_
#define FSDP_CPP_COMM_NCCL_COMMUNICATOR_H_

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "comm/process_group.h"

#include <torch/csrc/distributed/c10d/Store.hpp>

// NCCL's and CUDA's handle types, declared here so that users of this header need neither
// nccl.h nor the CUDA headers (ncclComm_t is ncclComm*, cudaStream_t is CUstream_st*).
struct ncclComm;
struct CUstream_st;

namespace fsdp::comm {

// Wraps `data`, device memory on CUDA device `device` holding a contiguous array of `sizes`
// elements of `dtype`, as a CUDA at::Tensor (nothing is copied or allocated). `deleter`, if
// given, runs with `data` when the last reference to the tensor goes away.
// Errors: INVALID_ARGUMENT for a negative device or size, or a null `data` with elements.
[[nodiscard]] absl::StatusOr<at::Tensor> WrapDeviceMemory(
    void* data, at::IntArrayRef sizes, at::ScalarType dtype, int device,
    std::function<void(void*)> deleter = nullptr);

// The NCCL library's version code (NCCL_VERSION_CODE of the linked libnccl, e.g. 22809).
// Errors: INTERNAL if NCCL cannot report it.
[[nodiscard]] absl::StatusOr<int> NcclVersion();

class NcclCommunicator {
 public:
  // Creates this rank's member of an NCCL communicator of `size` ranks on CUDA device `device`.
  // Rank 0 creates the NCCL unique id and publishes it in `store` under a key prefixed with
  // `options.name` (and numbered, so that several communicators of one name can share a
  // store); the other ranks wait for it; then every rank joins the NCCL communicator. All of it
  // must finish within `options.timeout`, which is also the default timeout of every call.
  // Arguments are checked before CUDA is touched.
  // Errors: INVALID_ARGUMENT (bad rank, size, device, store or timeout), FAILED_PRECONDITION
  // (no CUDA device), DEADLINE_EXCEEDED, UNAVAILABLE, INTERNAL.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<NcclCommunicator>> Create(
      c10::intrusive_ptr<c10d::Store> store, int rank, int size, int device,
      const ProcessGroupOptions& options = {});

  // Finalizes and destroys the NCCL communicator (waiting at most the group timeout for
  // outstanding work, then aborting), and destroys the stream.
  ~NcclCommunicator();
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  const std::string& name() const { return options_.name; }
  std::chrono::milliseconds timeout() const { return options_.timeout; }
  // False once a timeout or error has aborted the communicator.
  bool usable() const { return comm_ != nullptr; }

  [[nodiscard]] absl::Status AllGatherIntoTensor(at::Tensor& output, const at::Tensor& input,
                                                 const CollectiveOptions& options = {});
  [[nodiscard]] absl::Status ReduceScatterTensor(at::Tensor& output, const at::Tensor& input,
                                                 ReduceOp op = ReduceOp::kSum,
                                                 const CollectiveOptions& options = {});
  // In place. kAvg: floating-point tensors only.
  [[nodiscard]] absl::Status AllReduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum,
                                       const CollectiveOptions& options = {});
  // In place: every rank's `tensor` becomes root's.
  [[nodiscard]] absl::Status Broadcast(at::Tensor& tensor, int root,
                                       const CollectiveOptions& options = {});

 private:
  NcclCommunicator(int rank, int size, int device, ProcessGroupOptions options);
  // The unique-id exchange through `store` and the NCCL communicator setup.
  absl::Status Init(c10d::Store& store);

  std::chrono::milliseconds Timeout(const CollectiveOptions& options) const;
  std::string Where(absl::string_view op) const;
  absl::Status CheckUsable(absl::string_view op) const;
  absl::Status CheckTensor(absl::string_view op, absl::string_view which,
                           const at::Tensor& t) const;
  // Enqueues one NCCL call (`launch` returns its ncclResult_t as an int) on the stream and
  // waits for it as described in the header comment.
  absl::Status Run(absl::string_view op, std::chrono::milliseconds timeout,
                   const std::function<int()>& launch);
  // Aborts the communicator (idempotent); later calls return FAILED_PRECONDITION.
  void Abort(absl::string_view why);

  int rank_;
  int size_;
  int device_;
  ProcessGroupOptions options_;
  ncclComm* comm_ = nullptr;
  CUstream_st* stream_ = nullptr;
  std::string abort_reason_;
};

}  // namespace fsdp::comm

#endif  // FSDP_CPP_COMM_NCCL_COMMUNICATOR_H_
