// async_save_benchmark: how long a sharded save holds training up, synchronous
// (SaveShardedCheckpoint) against asynchronous (AsyncCheckpointSaver, checkpoint/
// async_checkpoint_saver.h), for the 52.5M-parameter BenchTransformer with Adam state (630 MB
// of checkpoint) under FULL_SHARD on 2 ranks.
//
//   bazel run -c opt //bench:async_save_benchmark [-- --out_dir=/some/dir]
//
// One case, BM_AsyncSave/world:2; per iteration, on both ranks, each part between barriers so
// that the slowest rank counts:
//   1. SaveShardedCheckpoint into a fresh directory (the synchronous save: the reference);
//   2. AsyncCheckpointSaver::Save into another (the time it blocks: the case's time), then one
//      training step while the background thread writes, then Wait() (the time still left);
//   3. one training step with no save in flight.
// The save directories of the previous iteration are removed before the clock starts.
//
// Counters (rank 0's wall time, means over the iterations; UseManualTime = part 2's blocking):
//   sync_ms             the synchronous save.
//   vs_sync             blocked time / synchronous save (goal: <= 0.1).
//   staged_bytes        bytes Save() copied into its staging buffers on rank 0.
//   copy_ms             the part of the blocked time that copied them (the rest collects the
//                       pieces and the optimizer's state, and waits at the barriers).
//   step_ms             a training step with no save in flight.
//   step_during_save_ms the step right after Save() returned, while the write goes on (the
//                       write's cost to training on a machine with few cores).
//   wait_ms             Wait() after that step: what the background write still needed.
//   pytorch_blocked_ms, pytorch_sync_ms  PyTorch 2.13's dcp.async_save blocking time and dcp.save
//                       time for the same model's twin under FSDP2, the same bytes, measured
//                       the same way in the same run (bench/pytorch_async_save.py, run by rank
//                       0 under torchrun while the other rank waits);
//   vs_pytorch          blocked time / PyTorch's (goal: < 1).
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <sys/stat.h>
#include <torch/optim/adam.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "bench/bench_transformer.h"
#include "bench/pytorch_reference.h"
#include "bench/rank_harness.h"
#include "bench/rank_util.h"
#include "checkpoint/async_checkpoint_saver.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/sharded_checkpoint.h"
#include "comm/launcher.h"
#include "comm/process_group.h"
#include "comm/rendezvous.h"
#include "comm/status_macros.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::bench {
namespace {

using comm::ProcessGroup;
using optim_state::OptimizerAdapter;

constexpr int kLaunchedRanks = 2;
constexpr int64_t kIterations = 3;
constexpr int64_t kSeq = 8;
constexpr int64_t kBatch = 2;

struct Job {
  std::shared_ptr<ProcessGroup> group;
  BenchTransformer model{nullptr};
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::unique_ptr<torch::optim::Adam> adam;
  std::optional<OptimizerAdapter> adapter;
  std::unique_ptr<checkpoint::AsyncCheckpointSaver> saver;
  // The memcpy reference: as many bytes as Save() stages, between two buffers faulted in once.
  at::Tensor copy_from, copy_to;
};
int g_staging_threads = 1;  // --staging_threads

absl::Status TrainStep(Job& job) {
  return CallTorch("training step", [&]() -> absl::Status {
    auto [src, tgt] = job.model->MakeBatch(kSeq, kBatch, /*seed=*/1 + job.group->rank());
    torch::Tensor loss = job.model->Loss(job.fsdp->forward(src, tgt.slice(0, 0, -1)), tgt);
    job.adam->zero_grad();
    loss.backward();
    return job.adapter->Step();
  });
}

absl::StatusOr<std::unique_ptr<Job>> BuildJob(std::shared_ptr<ProcessGroup> group) {
  auto job = std::make_unique<Job>();
  job->group = group;
  job->model = BenchTransformer(BenchTransformerConfig{}, /*seed=*/0);
  FsdpOptions options;
  options.nested = job->model->layer_slots();
  FSDP_ASSIGN_OR_RETURN(job->fsdp, FullyShardedDataParallel::Wrap(job->model, group, options));
  job->adam = std::make_unique<torch::optim::Adam>(job->fsdp->parameters(),
                                                   torch::optim::AdamOptions(1e-4));
  FSDP_ASSIGN_OR_RETURN(OptimizerAdapter adapter, OptimizerAdapter::Create(*job->adam));
  job->adapter.emplace(std::move(adapter));
  FSDP_ASSIGN_OR_RETURN(job->saver, checkpoint::AsyncCheckpointSaver::Create(
                                        *job->fsdp, {.staging_threads = g_staging_threads}));
  FSDP_RETURN_IF_ERROR(TrainStep(*job));  // creates the Adam state
  return job;
}

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// `body` between two barriers; its wall time on this rank, barriers included.
template <typename Body>
absl::StatusOr<double> Timed(ProcessGroup& group, Body body) {
  FSDP_RETURN_IF_ERROR(group.Barrier());
  const auto start = std::chrono::steady_clock::now();
  FSDP_RETURN_IF_ERROR(body());
  FSDP_RETURN_IF_ERROR(group.Barrier());
  return Since(start);
}

struct Times {
  double sync = 0, blocked = 0, collect = 0, copy = 0, step_during = 0, wait = 0, step = 0;
  double memcpy = 0;
  int64_t staged_bytes = 0;
};

// The copy's physical limit in the same run: staged_bytes copied between two buffers that are
// already faulted in (as the staging buffers are from the second save on), on every rank at
// once, one thread each.
absl::StatusOr<double> TimeMemcpy(Job& job, int64_t bytes) {
  FSDP_RETURN_IF_ERROR(CallTorch("memcpy reference", [&] {
    if (!job.copy_to.defined() || job.copy_to.nbytes() != static_cast<size_t>(bytes)) {
      job.copy_from = at::ones({bytes}, at::kByte);
      job.copy_to = at::empty({bytes}, at::kByte);
      job.copy_to.copy_(job.copy_from);
    }
  }));
  return Timed(*job.group, [&] {
    return CallTorch("memcpy reference", [&] { job.copy_to.copy_(job.copy_from); });
  });
}

absl::Status RemoveOnRank0(ProcessGroup& group, const std::string& dir) {
  if (group.rank() == 0) FSDP_RETURN_IF_ERROR(checkpoint::RemoveTree(dir));
  return group.Barrier();
}

absl::StatusOr<Times> RunIteration(Job& job, const std::string& run_dir) {
  ProcessGroup& g = *job.group;
  const std::string sync_dir = run_dir + "/sync";
  const std::string async_dir = run_dir + "/async";
  FSDP_RETURN_IF_ERROR(RemoveOnRank0(g, sync_dir));
  FSDP_RETURN_IF_ERROR(RemoveOnRank0(g, async_dir));
  Times t;
  FSDP_ASSIGN_OR_RETURN(
      t.sync, Timed(g, [&] {
        return checkpoint::SaveShardedCheckpoint(sync_dir, *job.fsdp, &*job.adapter).status();
      }));
  FSDP_ASSIGN_OR_RETURN(t.blocked, Timed(g, [&]() -> absl::Status {
                          FSDP_ASSIGN_OR_RETURN(checkpoint::AsyncSaveStats stats,
                                                job.saver->Save(async_dir, &*job.adapter));
                          t.staged_bytes = stats.staged_bytes;
                          t.collect = stats.collect_seconds;
                          t.copy = stats.copy_seconds;
                          return absl::OkStatus();
                        }));
  FSDP_ASSIGN_OR_RETURN(t.step_during, Timed(g, [&] { return TrainStep(job); }));
  FSDP_ASSIGN_OR_RETURN(t.wait, Timed(g, [&] { return job.saver->Wait().status(); }));
  FSDP_ASSIGN_OR_RETURN(t.step, Timed(g, [&] { return TrainStep(job); }));
  FSDP_ASSIGN_OR_RETURN(t.memcpy, TimeMemcpy(job, t.staged_bytes));
  return t;
}

struct RankState {
  std::unique_ptr<Job> job;
  std::string run_dir;
};
RankState* g_state = nullptr;

absl::StatusOr<std::vector<Times>> RunCase(const RankGroups& groups, int64_t iterations) {
  RankState& state = *g_state;
  if (state.job == nullptr) {
    FSDP_ASSIGN_OR_RETURN(state.job, BuildJob(groups.world));
  }
  std::vector<Times> all;
  for (int64_t i = 0; i < iterations; ++i) {
    FSDP_ASSIGN_OR_RETURN(Times t, RunIteration(*state.job, state.run_dir));
    all.push_back(t);
  }
  return all;
}

absl::Status FollowCommand(const RankGroups& groups, const CommandWords& words) {
  return RunCase(groups, words[1]).status();
}

void BM_AsyncSave(benchmark::State& state, const RankGroups* groups) {
  if (SkipAfterFailure(state)) return;
  absl::StatusOr<std::vector<Times>> times = [&]() -> absl::StatusOr<std::vector<Times>> {
    FSDP_RETURN_IF_ERROR(SendCommand({1, static_cast<int64_t>(state.max_iterations)}));
    return RunCase(*groups, static_cast<int64_t>(state.max_iterations));
  }();
  if (!times.ok()) return FailBenchmark(state, times.status());
  Times mean, later;  // over all iterations; over the second and later (reused buffers)
  size_t i = 0;
  for (auto _ : state) state.SetIterationTime(times->at(i++).blocked);
  const double n_later = static_cast<double>(times->size() - 1);
  for (size_t k = 0; k < times->size(); ++k) {
    const Times& t = (*times)[k];
    mean.sync += t.sync / times->size();
    mean.blocked += t.blocked / times->size();
    mean.collect += t.collect / times->size();
    mean.copy += t.copy / times->size();
    mean.step_during += t.step_during / times->size();
    mean.wait += t.wait / times->size();
    mean.step += t.step / times->size();
    mean.memcpy += t.memcpy / times->size();
    mean.staged_bytes = t.staged_bytes;
    if (k == 0) continue;
    later.sync += t.sync / n_later;
    later.blocked += t.blocked / n_later;
    later.copy += t.copy / n_later;
  }
  state.counters["sync_ms"] = mean.sync * 1e3;
  state.counters["vs_sync"] = mean.blocked / mean.sync;
  state.counters["first_blocked_ms"] = times->front().blocked * 1e3;
  state.counters["first_copy_ms"] = times->front().copy * 1e3;
  if (times->size() > 1) {
    state.counters["later_blocked_ms"] = later.blocked * 1e3;
    state.counters["later_copy_ms"] = later.copy * 1e3;
    state.counters["later_vs_sync"] = later.blocked / later.sync;
  }
  state.counters["collect_ms"] = mean.collect * 1e3;
  state.counters["memcpy_ms"] = mean.memcpy * 1e3;
  state.counters["vs_memcpy"] = later.copy / mean.memcpy;
  state.counters["staging_threads"] = g_staging_threads;
  state.counters["staged_bytes"] =
      benchmark::Counter(static_cast<double>(mean.staged_bytes), benchmark::Counter::kDefaults,
                         benchmark::Counter::kIs1024);
  state.counters["copy_ms"] = mean.copy * 1e3;
  state.counters["step_ms"] = mean.step * 1e3;
  state.counters["step_during_save_ms"] = mean.step_during * 1e3;
  state.counters["wait_ms"] = mean.wait * 1e3;
  absl::StatusOr<std::vector<std::map<std::string, std::string>>> pytorch =
      RunPyTorchReference("bench/pytorch_async_save.py", kLaunchedRanks,
                          {absl::StrCat("--out_dir=", g_state->run_dir, "/pytorch"),
                           absl::StrCat("--iterations=", times->size()),
                           absl::StrCat("--seq=", kSeq), absl::StrCat("--batch=", kBatch)},
                          "PYTORCH_ASYNC_SAVE");
  absl::StatusOr<double> blocked =
      pytorch.ok() ? NumberField(pytorch->back(), "blocked_ms") : pytorch.status();
  absl::StatusOr<double> sync =
      pytorch.ok() ? NumberField(pytorch->back(), "sync_ms") : pytorch.status();
  if (!blocked.ok() || !sync.ok()) {
    return FailBenchmark(state, blocked.ok() ? sync.status() : blocked.status());
  }
  state.counters["pytorch_blocked_ms"] = *blocked;
  state.counters["pytorch_sync_ms"] = *sync;
  state.counters["vs_pytorch"] = mean.blocked * 1e3 / *blocked;
}

void RegisterCases(const RankGroups& groups) {
  benchmark::RegisterBenchmark("BM_AsyncSave/world:2",
                               [&groups](benchmark::State& state) { BM_AsyncSave(state, &groups); })
      ->Iterations(kIterations)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

int RunRank(int argc, char** argv) {
  RankState state;
  const char* tmp = std::getenv("TMPDIR");
  std::string out_dir = tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i > 0 && arg.rfind("--out_dir=", 0) == 0) {
      out_dir = arg.substr(10);
    } else if (i > 0 && arg.rfind("--staging_threads=", 0) == 0) {
      g_staging_threads = std::atoi(arg.substr(18).c_str());
    } else {
      args.push_back(argv[i]);
    }
  }
  // Every rank uses the same directory, named after this job's rendezvous port.
  const char* port = std::getenv("MASTER_PORT");
  state.run_dir = absl::StrCat(out_dir, "/fsdp-asyncbench-", port != nullptr ? port : "run");
  ::mkdir(state.run_dir.c_str(), 0755);
  g_state = &state;
  RankHarnessOptions options;
  options.name = "async_save_benchmark";
  const int exit_code = RunRankHarness(static_cast<int>(args.size()), args.data(), options,
                                       RegisterCases, FollowCommand);
  state.job.reset();
  g_state = nullptr;
  (void)checkpoint::RemoveTree(state.run_dir);
  return exit_code;
}

}  // namespace
}  // namespace fsdp::bench

int main(int argc, char** argv) {
  if (!fsdp::comm::LaunchedByLauncher()) {
    return fsdp::bench::LaunchSelfAsRanks(argc, argv, fsdp::bench::kLaunchedRanks,
                                          "async_save_benchmark");
  }
  return fsdp::bench::RunRank(argc, argv);
}
