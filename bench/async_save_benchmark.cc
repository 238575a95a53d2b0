// async_save_benchmark: what training loses per sharded save, synchronous
// (SaveShardedCheckpoint) against asynchronous (AsyncCheckpointSaver, checkpoint/
// async_checkpoint_saver.h) with the copy in Save() and with asynchronous staging, and against
// PyTorch 2.13's dcp.async_save both ways, for the 52.5M-parameter BenchTransformer with Adam
// state (630 MB of checkpoint) under FULL_SHARD on 2 ranks.
//
//   bazel run -c opt //bench:async_save_benchmark [-- --out_dir=/some/dir]
//
// One case, BM_AsyncSave/world:2; per iteration, on both ranks, each part between barriers so
// that the slowest rank counts (rank 0's wall times, means over the iterations):
//   1. SaveShardedCheckpoint into a fresh directory (the synchronous save: the reference);
//   2. copy in the call: AsyncCheckpointSaver::Save (its time: copy_blocked_ms) then one
//      training step, timed together; then Wait() (copy_wait_ms: the write still left);
//   3. asynchronous staging (use_async_staging): Save (staging_blocked_ms), forward and
//      backward, SynchronizeStaging() (staging_wait_ms: the copy not yet done when the step
//      needs the state), the optimizer step, timed together; then Wait() (staging_write_wait_ms);
//   4. one training step with no save in flight (step_ms).
// Counters:
//   sync_ms            the synchronous save; step_ms the plain step.
//   *_step_extra_ms    (save + its step) - step_ms: what training loses per save all told,
//                      including the background copy's and write's competition for the cores
//                      (2 ranks on 2 cores here: the background work has no idle core).
//   copy_vs_sync       copy_blocked_ms / sync_ms.
//   staging_lost_ms    staging_blocked_ms + staging_wait_ms: the time training waits for the
//                      save inside our calls (the case's manual time);
//   staging_vs_sync    staging_lost_ms / sync_ms (goal: <= 0.1).
//   staging_copy_ms    the background copy's duration (slower than memcpy_ms while it competes
//                      with forward and backward).
//   memcpy_ms          staged_bytes copied between two faulted-in buffers: the copy's limit.
//   pytorch_*          PyTorch 2.13 on the same model's twin under FSDP2, the same bytes,
//                      measured the same way in the same run (bench/pytorch_async_save.py, run
//                      under torchrun by rank 0 while the other rank waits): sync_ms (dcp.save),
//                      blocked_ms and step_extra_ms (dcp.async_save, default stager),
//                      staging_blocked_ms, staging_wait_ms, staging_step_extra_ms
//                      (DefaultStager(StagingOptions(use_async_staging=True))).
//   vs_pytorch         staging_lost_ms / PyTorch's (staging_blocked_ms + staging_wait_ms)
//                      (goal: < 1); copy_vs_pytorch: copy_blocked_ms / pytorch_blocked_ms.
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
  std::unique_ptr<checkpoint::AsyncCheckpointSaver> copying;  // copy in Save()
  std::unique_ptr<checkpoint::AsyncCheckpointSaver> staging;  // use_async_staging
  // The memcpy reference: as many bytes as Save() stages, between two buffers faulted in once.
  at::Tensor copy_from, copy_to;
};
int g_staging_threads = 1;  // --staging_threads

absl::Status ForwardBackward(Job& job) {
  return CallTorch("forward and backward", [&] {
    auto [src, tgt] = job.model->MakeBatch(kSeq, kBatch, /*seed=*/1 + job.group->rank());
    torch::Tensor loss = job.model->Loss(job.fsdp->forward(src, tgt.slice(0, 0, -1)), tgt);
    job.adam->zero_grad();
    loss.backward();
  });
}

absl::Status TrainStep(Job& job) {
  FSDP_RETURN_IF_ERROR(ForwardBackward(job));
  return job.adapter->Step();
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
  FSDP_ASSIGN_OR_RETURN(job->copying, checkpoint::AsyncCheckpointSaver::Create(
                                          *job->fsdp, {.staging_threads = g_staging_threads}));
  FSDP_ASSIGN_OR_RETURN(job->staging, checkpoint::AsyncCheckpointSaver::Create(
                                          *job->fsdp, {.staging_threads = g_staging_threads,
                                                       .use_async_staging = true}));
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

// Seconds of one iteration (rank 0's), named as the counters.
struct Times {
  double sync = 0, step = 0, memcpy = 0;
  double copy_blocked = 0, copy_with_step = 0, copy_wait = 0;
  double staging_blocked = 0, staging_wait = 0, staging_with_step = 0, staging_copy = 0,
         staging_write_wait = 0;
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

// Part 3: a save with asynchronous staging and the step it overlaps.
absl::Status StagedSaveAndStep(Job& job, const std::string& dir, Times& t) {
  FSDP_ASSIGN_OR_RETURN(checkpoint::AsyncSaveStats started, job.staging->Save(dir, &*job.adapter));
  t.staging_blocked = started.blocked_seconds;
  FSDP_RETURN_IF_ERROR(ForwardBackward(job));
  FSDP_ASSIGN_OR_RETURN(checkpoint::AsyncSaveStats staged, job.staging->SynchronizeStaging());
  t.staging_wait = staged.blocked_seconds;
  t.staging_copy = staged.copy_seconds;
  t.staged_bytes = staged.staged_bytes;
  return job.adapter->Step();
}

absl::StatusOr<Times> RunIteration(Job& job, const std::string& run_dir) {
  ProcessGroup& g = *job.group;
  const std::string dirs[] = {run_dir + "/sync", run_dir + "/copy", run_dir + "/staging"};
  for (const std::string& dir : dirs) FSDP_RETURN_IF_ERROR(RemoveOnRank0(g, dir));
  Times t;
  FSDP_ASSIGN_OR_RETURN(
      t.sync, Timed(g, [&] {
        return checkpoint::SaveShardedCheckpoint(dirs[0], *job.fsdp, &*job.adapter).status();
      }));
  FSDP_ASSIGN_OR_RETURN(t.copy_with_step, Timed(g, [&]() -> absl::Status {
                          FSDP_ASSIGN_OR_RETURN(checkpoint::AsyncSaveStats stats,
                                                job.copying->Save(dirs[1], &*job.adapter));
                          t.copy_blocked = stats.blocked_seconds;
                          return TrainStep(job);
                        }));
  FSDP_ASSIGN_OR_RETURN(t.copy_wait, Timed(g, [&] { return job.copying->Wait().status(); }));
  FSDP_ASSIGN_OR_RETURN(t.staging_with_step,
                        Timed(g, [&] { return StagedSaveAndStep(job, dirs[2], t); }));
  FSDP_ASSIGN_OR_RETURN(t.staging_write_wait,
                        Timed(g, [&] { return job.staging->Wait().status(); }));
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

// Means over `times` of each field.
Times Mean(const std::vector<Times>& times) {
  Times m;
  const double n = static_cast<double>(times.size());
  for (const Times& t : times) {
    for (auto [sum, x] : std::initializer_list<std::pair<double*, double>>{
             {&m.sync, t.sync},
             {&m.step, t.step},
             {&m.memcpy, t.memcpy},
             {&m.copy_blocked, t.copy_blocked},
             {&m.copy_with_step, t.copy_with_step},
             {&m.copy_wait, t.copy_wait},
             {&m.staging_blocked, t.staging_blocked},
             {&m.staging_wait, t.staging_wait},
             {&m.staging_with_step, t.staging_with_step},
             {&m.staging_copy, t.staging_copy},
             {&m.staging_write_wait, t.staging_write_wait}}) {
      *sum += x / n;
    }
    m.staged_bytes = t.staged_bytes;
  }
  return m;
}

// PyTorch's figures in the same run (pytorch_* counters).
absl::Status AddPyTorchCounters(benchmark::State& state, size_t iterations, double lost_ms,
                                double copy_blocked_ms) {
  using Fields = std::map<std::string, std::string>;
  FSDP_ASSIGN_OR_RETURN(
      std::vector<Fields> pytorch,
      RunPyTorchReference("bench/pytorch_async_save.py", kLaunchedRanks,
                          {absl::StrCat("--out_dir=", g_state->run_dir, "/pytorch"),
                           absl::StrCat("--iterations=", iterations), absl::StrCat("--seq=", kSeq),
                           absl::StrCat("--batch=", kBatch)},
                          "PYTORCH_ASYNC_SAVE"));
  std::map<std::string, double> ms;
  for (const char* name : {"sync_ms", "blocked_ms", "step_extra_ms", "wait_ms", "step_ms",
                           "staging_blocked_ms", "staging_wait_ms", "staging_step_extra_ms"}) {
    FSDP_ASSIGN_OR_RETURN(ms[name], NumberField(pytorch.back(), name));
    state.counters[absl::StrCat("pytorch_", name)] = ms[name];
  }
  state.counters["vs_pytorch"] = lost_ms / (ms["staging_blocked_ms"] + ms["staging_wait_ms"]);
  state.counters["copy_vs_pytorch"] = copy_blocked_ms / ms["blocked_ms"];
  return absl::OkStatus();
}

void BM_AsyncSave(benchmark::State& state, const RankGroups* groups) {
  if (SkipAfterFailure(state)) return;
  absl::StatusOr<std::vector<Times>> times = [&]() -> absl::StatusOr<std::vector<Times>> {
    FSDP_RETURN_IF_ERROR(SendCommand({1, static_cast<int64_t>(state.max_iterations)}));
    return RunCase(*groups, static_cast<int64_t>(state.max_iterations));
  }();
  if (!times.ok()) return FailBenchmark(state, times.status());
  size_t i = 0;
  for (auto _ : state) {
    const Times& t = times->at(i++);
    state.SetIterationTime(t.staging_blocked + t.staging_wait);
  }
  const Times m = Mean(*times);
  const double lost = m.staging_blocked + m.staging_wait;
  auto& c = state.counters;
  c["sync_ms"] = m.sync * 1e3;
  c["step_ms"] = m.step * 1e3;
  c["copy_blocked_ms"] = m.copy_blocked * 1e3;
  c["copy_vs_sync"] = m.copy_blocked / m.sync;
  c["copy_step_extra_ms"] = (m.copy_with_step - m.step) * 1e3;
  c["copy_wait_ms"] = m.copy_wait * 1e3;
  c["staging_blocked_ms"] = m.staging_blocked * 1e3;
  c["staging_wait_ms"] = m.staging_wait * 1e3;
  c["staging_lost_ms"] = lost * 1e3;
  c["staging_vs_sync"] = lost / m.sync;
  c["staging_step_extra_ms"] = (m.staging_with_step - m.step) * 1e3;
  c["staging_copy_ms"] = m.staging_copy * 1e3;
  c["staging_write_wait_ms"] = m.staging_write_wait * 1e3;
  c["first_staging_copy_ms"] = times->front().staging_copy * 1e3;
  c["memcpy_ms"] = m.memcpy * 1e3;
  c["staging_threads"] = g_staging_threads;
  c["staged_bytes"] =
      benchmark::Counter(static_cast<double>(m.staged_bytes), benchmark::Counter::kDefaults,
                         benchmark::Counter::kIs1024);
  const absl::Status pytorch =
      AddPyTorchCounters(state, times->size(), lost * 1e3, m.copy_blocked * 1e3);
  if (!pytorch.ok()) return FailBenchmark(state, pytorch);
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
