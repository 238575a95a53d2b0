// Work: the handle of a collective issued asynchronously (ProcessGroup::*Async), as c10d's
// Work: the call returns at once and Wait() returns how the operation ended.
//
// Preconditions: the tensors given to the asynchronous call must not be read or written by the
// caller until Wait() has returned (the Work keeps them alive until the operation has ended,
// even if the caller drops them). Wait() may be called from one thread at a time, any number
// of times (later calls return the same status).
//
// Errors (from Wait()): those of the blocking call, with the same message (the operation, the
// rank and the group), plus:
//   * DEADLINE_EXCEEDED: the operation did not end within the timeout of its options, counted
//     from when it was issued (with a grace of a few seconds for the transport to report).
//     The group is then broken, as after any collective timeout.
//   * the code of an earlier asynchronous collective of the same group that failed: once one
//     fails the group is broken and the later ones fail without sending anything.
#ifndef FSDP_CPP_COMM_WORK_H_
#define FSDP_CPP_COMM_WORK_H_

#include <ATen/ATen.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"

namespace fsdp::comm {

class Work {
 public:
  // A Work that runs `op` later (internal::WorkQueue); `keep` stays alive until it has run.
  Work(std::string where, std::chrono::steady_clock::time_point deadline,
       std::vector<at::Tensor> keep);
  // A Work that has already ended with `status` (nothing to wait for).
  static std::shared_ptr<Work> Done(absl::Status status);

  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;

  // Blocks until the operation has ended (at most until its deadline plus a grace) and returns
  // its status.
  [[nodiscard]] absl::Status Wait();
  bool IsCompleted() const;
  // "all_gather_into_tensor (async) on rank 0 of group 'default' (size 2)".
  const std::string& where() const { return where_; }
  std::chrono::steady_clock::time_point deadline() const { return deadline_; }

  // Called once by whatever runs the operation.
  void Finish(absl::Status status);

 private:
  std::string where_;
  std::chrono::steady_clock::time_point deadline_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  absl::Status status_;
  std::vector<at::Tensor> keep_;
};

namespace internal {

// One thread that runs a group's asynchronous operations one after another, in the order they
// were issued (every rank issues them in the same order, so they pair up across ranks). After
// an operation fails with DEADLINE_EXCEEDED or UNAVAILABLE the group is broken: the later ones
// end with that error, annotated, without running.
class WorkQueue {
 public:
  WorkQueue() = default;
  // Runs what is queued (each bounded by its own deadline), then joins the thread.
  ~WorkQueue();
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // Queues `op` to run on the thread (started on first use); its status finishes `work`.
  void Enqueue(std::shared_ptr<Work> work, std::function<absl::Status()> op);

 private:
  void Run();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<std::shared_ptr<Work>, std::function<absl::Status()>>> queue_;
  bool stopping_ = false;
  absl::Status broken_;
  std::thread thread_;
};

}  // namespace internal
}  // namespace fsdp::comm

#endif  // FSDP_CPP_COMM_WORK_H_
