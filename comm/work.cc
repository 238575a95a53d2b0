#include "comm/work.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp::comm {
namespace {

// How long Wait() waits past the deadline for the operation itself to notice it: c10d's
// waits end at the deadline, and a thread reporting it may take a moment on a loaded machine.
constexpr std::chrono::seconds kReportGrace{5};

}  // namespace

Work::Work(std::string where, std::chrono::steady_clock::time_point deadline,
           std::vector<at::Tensor> keep)
    : where_(std::move(where)), deadline_(deadline), keep_(std::move(keep)) {}

std::shared_ptr<Work> Work::Done(absl::Status status) {
  auto work =
      std::make_shared<Work>("", std::chrono::steady_clock::now(), std::vector<at::Tensor>{});
  work->Finish(std::move(status));
  return work;
}

void Work::Finish(absl::Status status) {
  std::vector<at::Tensor> release;
  {
    std::lock_guard<std::mutex> lock(mu_);
    status_ = std::move(status);
    done_ = true;
    release.swap(keep_);
  }
  cv_.notify_all();
}

bool Work::IsCompleted() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

absl::Status Work::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_until(lock, deadline_ + kReportGrace, [this] { return done_; })) {
    // The operation still runs and still holds its tensors (keep_): they stay valid.
    return absl::DeadlineExceededError(
        absl::StrCat(where_, ": did not complete within its timeout (still running)"));
  }
  return status_;
}

namespace internal {

WorkQueue::~WorkQueue() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void WorkQueue::Enqueue(std::shared_ptr<Work> work, std::function<absl::Status()> op) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.emplace_back(std::move(work), std::move(op));
    if (!thread_.joinable()) thread_ = std::thread([this] { Run(); });
  }
  cv_.notify_all();
}

void WorkQueue::Run() {
  for (;;) {
    std::pair<std::shared_ptr<Work>, std::function<absl::Status()>> next;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      next = std::move(queue_.front());
      queue_.pop_front();
    }
    absl::Status status;
    if (!broken_.ok()) {
      status = Annotate(broken_, absl::StrCat(next.first->where(),
                                              ": not run, an earlier asynchronous collective "
                                              "of the group failed"));
    } else {
      status = CallTorch(next.first->where(), next.second);
      if (absl::IsDeadlineExceeded(status) || absl::IsUnavailable(status)) broken_ = status;
    }
    next.first->Finish(std::move(status));
  }
}

}  // namespace internal
}  // namespace fsdp::comm
