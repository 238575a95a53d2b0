// multihost_failure_job: a small training-like job for
// comm/multihost_failure_test.cc.
//
// Started once per rank with torchrun's variables (RANK, WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT, optionally GLOO_SOCKET_IFNAME); rank 0 hosts the
// TCPStore. Each step every rank all-reduces a tensor of ones, checks the sum
// and prints "rank R step S". Collectives time out after
// --timeout_ms, so a dead or hung peer cannot hang the job.
//
// When a collective fails, the rank finds out which peers are gone: it marks
// itself as "detected" in the store and waits --detect_ms for every other rank
// to do the same; a rank that does not (dead, or stopped and not answering) is
// named. If the store cannot be reached at all, its host, rank 0, is named. It
// then prints
//   "rank R: failed at step S: <error>; not responding: rank(s) X, Y"
// and exits with code 1 (rank 0, the store's host, a collective timeout later,
// so that peers still detecting can reach the store). --detect_ms should exceed
// --timeout_ms: peers notice a failure up to one collective timeout apart.
// After --steps steps it exits 0.
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/rendezvous.h"
#include "comm/status_macros.h"

ABSL_FLAG(int, steps, 100000, "Steps to run before exiting 0.");
ABSL_FLAG(int, step_ms, 50, "Pause between steps.");
ABSL_FLAG(int, timeout_ms, 4000, "Rendezvous and collective timeout.");
ABSL_FLAG(int, detect_ms, 6000,
          "How long a failed rank waits for its peers to report.");

namespace {

using fsdp::CallTorch;

std::string Key(int rank) {
  return absl::StrCat("multihost_failure_job/detected/", rank);
}

// The ranks that do not report within `wait` (see the file comment).
absl::StatusOr<std::vector<int>> MissingRanks(const fsdp::comm::RankInfo& info,
                                              std::chrono::milliseconds wait) {
  c10::intrusive_ptr<c10d::TCPStore> store;
  FSDP_RETURN_IF_ERROR(CallTorch("connect to the store", [&] {
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(info.master_port);
    options.isServer = false;
    options.waitWorkers = false;
    options.timeout = wait;
    store = c10::make_intrusive<c10d::TCPStore>(info.master_addr, options);
  }));
  FSDP_RETURN_IF_ERROR(CallTorch("report to the store", [&] {
    store->set(Key(info.rank), {uint8_t{1}});
  }));
  const auto deadline = std::chrono::steady_clock::now() + wait;
  std::vector<int> missing;
  while (true) {
    missing.clear();
    for (int r = 0; r < info.world_size; ++r) {
      bool present = false;
      FSDP_RETURN_IF_ERROR(CallTorch(
          "check the store", [&] { present = store->check({Key(r)}); }));
      if (!present) missing.push_back(r);
    }
    if (missing.empty() || std::chrono::steady_clock::now() >= deadline)
      return missing;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::chrono::milliseconds timeout(absl::GetFlag(FLAGS_timeout_ms));
  absl::StatusOr<fsdp::comm::RankInfo> info = fsdp::comm::RankInfoFromEnv();
  if (!info.ok()) {
    std::fprintf(stderr, "%s\n", info.status().ToString().c_str());
    return 2;
  }
  auto group = fsdp::comm::InitProcessGroupFromEnv({.timeout = timeout});
  if (!group.ok()) {
    std::fprintf(stderr, "rank %d: rendezvous failed: %s\n", info->rank,
                 group.status().ToString().c_str());
    return 1;
  }
  const int steps = absl::GetFlag(FLAGS_steps);
  for (int step = 0; step < steps; ++step) {
    at::Tensor t = at::ones({1024});
    absl::Status s = (*group)->AllReduce(t, fsdp::comm::ReduceOp::kSum,
                                         {.timeout = timeout});
    if (s.ok() && t[0].item<float>() != info->world_size) {
      s = absl::InternalError(
          absl::StrCat("all-reduce gave ", t[0].item<float>()));
    }
    if (!s.ok()) {
      absl::StatusOr<std::vector<int>> missing = MissingRanks(
          *info, std::chrono::milliseconds(absl::GetFlag(FLAGS_detect_ms)));
      std::string who;
      if (!missing.ok()) {
        who = absl::StrCat("rank(s) 0 (the store's host at ", info->master_addr,
                           ":", info->master_port, ": ",
                           missing.status().message(), ")");
      } else if (missing->empty()) {
        who = "none";
      } else {
        who = absl::StrCat("rank(s) ", absl::StrJoin(*missing, ", "));
      }
      std::printf("rank %d: failed at step %d: %s; not responding: %s\n",
                  info->rank, step, s.ToString().c_str(), who.c_str());
      std::fflush(stdout);
      // Rank 0 hosts the store: it stays a collective timeout longer, for the
      // peers whose collective failed later than its own.
      if (info->rank == 0) std::this_thread::sleep_for(timeout);
      // The group's destructor may wait on the dead peers' connections: leave
      // at once.
      std::_Exit(1);
    }
    std::printf("rank %d step %d\n", info->rank, step);
    std::fflush(stdout);
    std::this_thread::sleep_for(
        std::chrono::milliseconds(absl::GetFlag(FLAGS_step_ms)));
  }
  return 0;
}
