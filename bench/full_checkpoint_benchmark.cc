// full_checkpoint_benchmark: a full checkpoint's save and load (DIR/model.pt + DIR/optim.pt,
// what PyTorch FSDP users write with torch.save) for BenchTransformer with Adam state at world
// size 2: SaveFullCheckpoint (checkpoint/save_full_checkpoint.h, streamed one unit at a time)
// and LoadFullCheckpoint, each beside PyTorch 2.13 doing the same on the model's twin in the
// same run: its time and rank 0's peak resident memory.
//
//   [FULL_CHECKPOINT_D_MODELS=512,1664] bazel run -c opt //bench:full_checkpoint_benchmark
//
// Sizes (FULL_CHECKPOINT_D_MODELS, default 512): d_model 512 is the 52.5M-parameter
// BenchTransformer (210 MB of weights, 420 MB of Adam state); d_model 1664 (dim_feedforward 4 x
// d_model) has 500M parameters: 2.0 GB of weights and 4.0 GB of Adam state, the full dict a rank 0
// must not hold; 1152 has 242M (0.97 GB + 1.9 GB). The files go to $TMPDIR (default /tmp) and are
// removed after each size.
//
// Cases, per size: BM_FullSave/d_model:D/world:2 and BM_FullLoad/d_model:D/world:2. The save case
// runs everything for its size: on both ranks, the job (FULL_SHARD, one unit per layer plus the
// root, Adam lr 1e-4 after one training step, gradients dropped); kIterations of a save then a
// load, each between barriers (rank 0's wall time, so that the slowest rank counts); the job is
// dropped; then bench/pytorch_full_checkpoint.py under torchrun, once with FSDP1 and once with
// FSDP2, while the C++ ranks hold nothing. The load case reports the loads.
//
// Counters (UseManualTime = our time per save or load):
//   peak_rss_rank0    rank 0's VmHWM during the operation (reset through /proc/self/clear_refs
//                     right before it, after malloc_trim): the whole process, its shards included.
//   base_rss_rank0    rank 0's VmRSS before the operations (model shards, Adam state).
//   full_state_bytes  the checkpoint's bytes: full weights + full Adam state.
//   pytorch_fsdp1_ms, pytorch_fsdp2_ms, pytorch_fsdp1_peak, pytorch_fsdp2_peak, pytorch_base_rss
//                     PyTorch's time and rank 0's VmHWM for the same operation (a whole Python
//                     process: interpreter, shards and Adam state included, as ours).
//   whole_load_ms, whole_load_peak  (load) the load before it streamed (rank 0 reads both files
//                     whole, then scatters), measured after each streamed load.
//   vs_pytorch        our time / the faster PyTorch API's (goal: <= 0.5).
//   mem_vs_pytorch    our peak_rss_rank0 / the lower of PyTorch's two peaks (goal: < 1).
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <sys/stat.h>
#include <torch/optim/adam.h>

#include <algorithm>
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
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_transformer.h"
#include "bench/pytorch_reference.h"
#include "bench/rank_harness.h"
#include "bench/rank_util.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/load_full_checkpoint.h"
#include "checkpoint/save_full_checkpoint.h"
#include "comm/launcher.h"
#include "comm/process_group.h"
#include "comm/rendezvous.h"
#include "comm/status_macros.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/state_dict.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::bench {
namespace {

constexpr int kLaunchedRanks = 2;
constexpr int64_t kIterations = 2;
constexpr int64_t kSeq = 8;  // the training step that creates Adam's state: 2 sequences of 8
constexpr int64_t kBatch = 2;

BenchTransformerConfig ConfigFor(int64_t d_model) {
  BenchTransformerConfig config;
  config.d_model = d_model;
  config.dim_feedforward = d_model == 512 ? 2048 : 4 * d_model;
  return config;
}

struct Job {
  std::shared_ptr<comm::ProcessGroup> group;
  BenchTransformer model{nullptr};
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::unique_ptr<torch::optim::Adam> adam;
  std::optional<optim_state::OptimizerAdapter> adapter;
  int64_t full_state_bytes = 0;
};

absl::StatusOr<std::unique_ptr<Job>> BuildJob(std::shared_ptr<comm::ProcessGroup> group,
                                              int64_t d_model) {
  auto job = std::make_unique<Job>();
  job->group = group;
  job->model = BenchTransformer(ConfigFor(d_model), /*seed=*/0);
  for (const at::Tensor& p : job->model->parameters()) job->full_state_bytes += 3 * p.nbytes();
  FsdpOptions options;
  options.nested = job->model->layer_slots();
  FSDP_ASSIGN_OR_RETURN(job->fsdp, FullyShardedDataParallel::Wrap(job->model, group, options));
  job->adam = std::make_unique<torch::optim::Adam>(job->fsdp->parameters(),
                                                   torch::optim::AdamOptions(1e-4));
  FSDP_ASSIGN_OR_RETURN(optim_state::OptimizerAdapter adapter,
                        optim_state::OptimizerAdapter::Create(*job->adam));
  job->adapter.emplace(std::move(adapter));
  FSDP_RETURN_IF_ERROR(CallTorch("training step", [&]() -> absl::Status {
    auto [src, tgt] = job->model->MakeBatch(kSeq, kBatch, /*seed=*/1 + group->rank());
    torch::Tensor loss = job->model->Loss(job->fsdp->forward(src, tgt.slice(0, 0, -1)), tgt);
    job->adam->zero_grad();
    loss.backward();
    FSDP_RETURN_IF_ERROR(job->adapter->Step());
    job->adam->zero_grad();  // drops the gradients, as the PyTorch side does
    return absl::OkStatus();
  }));
  return job;
}

// One operation's time (rank 0's, between barriers) and rank 0's peak RSS during it.
struct Measured {
  double seconds = 0;
  int64_t peak = 0;
};

template <typename Body>
absl::StatusOr<Measured> Measure(comm::ProcessGroup& group, Body body) {
  FSDP_RETURN_IF_ERROR(group.Barrier());
  ResetPeakRss();
  const auto start = std::chrono::steady_clock::now();
  FSDP_RETURN_IF_ERROR(body());
  FSDP_RETURN_IF_ERROR(group.Barrier());
  return Measured{std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
                  PeakRssBytes()};
}

struct SizeResult {
  std::vector<Measured> saves, loads;
  std::vector<Measured> whole_loads;  // WholeLoad, the load before it streamed
  int64_t base = 0;
  int64_t full_state_bytes = 0;
  // PyTorch: api -> {"save_ms", "save_peak", "load_ms", "load_peak", "base_rss"}.
  std::map<std::string, std::map<std::string, double>> pytorch;
};

// The files' directory, the same on every rank (named after this job's rendezvous port):
// $TMPDIR (or /tmp)/fsdp-fullckptbench-<port>.
std::string RunDir() {
  const char* tmp = std::getenv("TMPDIR");
  const char* port = std::getenv("MASTER_PORT");
  return absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/fsdp-fullckptbench-",
                      port != nullptr ? port : "run");
}

// The full load as it was before it streamed, for its figures beside the streamed one: rank 0
// TorchLoads both files whole, then the same scatter and LoadFullStateDict.
absl::Status WholeLoad(const std::string& dir, Job& job) {
  checkpoint::ModelStateDict model;
  optim_state::OptimStateDict optim;
  optim.has_param_groups = false;
  if (job.group->rank() == 0) {
    FSDP_ASSIGN_OR_RETURN(model, checkpoint::ReadModelStateDict(dir + "/model.pt"));
    FSDP_ASSIGN_OR_RETURN(optim, checkpoint::ReadOptimStateDict(dir + "/optim.pt"));
  }
  FSDP_ASSIGN_OR_RETURN(optim_state::OptimStateDict local,
                        optim_state::ScatterFullOptimStateDict(optim, *job.fsdp, *job.adapter));
  FSDP_RETURN_IF_ERROR(LoadFullStateDict(*job.fsdp, model, {.rank0_only = true}));
  return job.adapter->LoadStateDict(std::move(local));
}

absl::StatusOr<SizeResult> RunOurs(const RankGroups& groups, int64_t d_model) {
  SizeResult result;
  FSDP_ASSIGN_OR_RETURN(std::unique_ptr<Job> job, BuildJob(groups.world, d_model));
  comm::ProcessGroup& g = *job->group;
  if (job->group->rank() == 0) ::mkdir(RunDir().c_str(), 0755);
  const std::string dir = absl::StrCat(RunDir(), "/ours");
  result.full_state_bytes = job->full_state_bytes;
  ResetPeakRss();
  result.base = CurrentRssBytes();
  for (int64_t i = 0; i < kIterations; ++i) {
    FSDP_ASSIGN_OR_RETURN(Measured save, Measure(g, [&] {
                            return checkpoint::SaveFullCheckpoint(dir, *job->fsdp, &*job->adapter);
                          }));
    result.saves.push_back(save);
    FSDP_ASSIGN_OR_RETURN(Measured load, Measure(g, [&] {
                            return checkpoint::LoadFullCheckpoint(dir, *job->fsdp, &*job->adapter);
                          }));
    result.loads.push_back(load);
    FSDP_ASSIGN_OR_RETURN(Measured whole, Measure(g, [&] { return WholeLoad(dir, *job); }));
    result.whole_loads.push_back(whole);
  }
  job.reset();
  if (g.rank() == 0) FSDP_RETURN_IF_ERROR(checkpoint::RemoveTree(dir));
  FSDP_RETURN_IF_ERROR(g.Barrier());
  ResetPeakRss();
  return result;
}

absl::Status FollowCommand(const RankGroups& groups, const CommandWords& words) {
  return RunOurs(groups, words[1]).status();
}

absl::Status RunPyTorch(int64_t d_model, SizeResult& result) {
  for (const char* api : {"fsdp1", "fsdp2"}) {
    const BenchTransformerConfig config = ConfigFor(d_model);
    FSDP_ASSIGN_OR_RETURN(
        auto lines,
        RunPyTorchReference(
            "bench/pytorch_full_checkpoint.py", kLaunchedRanks,
            {absl::StrCat("--api=", api), absl::StrCat("--out_dir=", RunDir()),
             absl::StrCat("--d_model=", d_model), absl::StrCat("--ffn=", config.dim_feedforward),
             absl::StrCat("--iterations=", kIterations), absl::StrCat("--seq=", kSeq),
             absl::StrCat("--batch=", kBatch)},
            "PYTORCH_FULL_CKPT"));
    for (const char* key : {"save_ms", "save_peak", "load_ms", "load_peak", "base_rss"}) {
      FSDP_ASSIGN_OR_RETURN(result.pytorch[api][key], NumberField(lines.back(), key));
    }
  }
  return absl::OkStatus();
}

std::map<int64_t, SizeResult>* g_results = new std::map<int64_t, SizeResult>();

// Reports `op` ("save" or "load") of one size against PyTorch's.
void Report(benchmark::State& state, const SizeResult& r, const std::string& op) {
  const std::vector<Measured>& ours = op == "save" ? r.saves : r.loads;
  size_t i = 0;
  double total = 0;
  int64_t peak = 0;
  for (auto _ : state) {
    const Measured& m = ours.at(i++ % ours.size());
    state.SetIterationTime(m.seconds);
  }
  for (const Measured& m : ours) {
    total += m.seconds;
    peak = std::max(peak, m.peak);
  }
  const double ms = total / static_cast<double>(ours.size()) * 1e3;
  const auto bytes = [](double v) {
    return benchmark::Counter(v, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
  };
  state.counters["peak_rss_rank0"] = bytes(static_cast<double>(peak));
  state.counters["base_rss_rank0"] = bytes(static_cast<double>(r.base));
  state.counters["full_state_bytes"] = bytes(static_cast<double>(r.full_state_bytes));
  double best_ms = 1e300, best_peak = 1e300;
  for (const auto& [api, fields] : r.pytorch) {
    state.counters[absl::StrCat("pytorch_", api, "_ms")] = fields.at(op + "_ms");
    state.counters[absl::StrCat("pytorch_", api, "_peak")] = bytes(fields.at(op + "_peak"));
    state.counters["pytorch_base_rss"] = bytes(fields.at("base_rss"));
    best_ms = std::min(best_ms, fields.at(op + "_ms"));
    best_peak = std::min(best_peak, fields.at(op + "_peak"));
  }
  if (op == "load") {  // the load before it streamed, in the same run
    double whole_total = 0;
    int64_t whole_peak = 0;
    for (const Measured& m : r.whole_loads) {
      whole_total += m.seconds;
      whole_peak = std::max(whole_peak, m.peak);
    }
    state.counters["whole_load_ms"] = whole_total / static_cast<double>(r.whole_loads.size()) * 1e3;
    state.counters["whole_load_peak"] = bytes(static_cast<double>(whole_peak));
  }
  state.counters["vs_pytorch"] = ms / best_ms;
  state.counters["mem_vs_pytorch"] = static_cast<double>(peak) / best_peak;
}

void BM_FullSave(benchmark::State& state, const RankGroups* groups, int64_t d_model) {
  if (SkipAfterFailure(state)) return;
  absl::StatusOr<SizeResult> result = [&]() -> absl::StatusOr<SizeResult> {
    FSDP_RETURN_IF_ERROR(SendCommand({1, d_model}));
    FSDP_ASSIGN_OR_RETURN(SizeResult r, RunOurs(*groups, d_model));
    const absl::Status pytorch = RunPyTorch(d_model, r);
    FSDP_RETURN_IF_ERROR(checkpoint::RemoveTree(RunDir()));
    FSDP_RETURN_IF_ERROR(pytorch);
    return r;
  }();
  if (!result.ok()) return FailBenchmark(state, result.status());
  (*g_results)[d_model] = *std::move(result);
  Report(state, (*g_results)[d_model], "save");
}

void BM_FullLoad(benchmark::State& state, int64_t d_model) {
  if (SkipAfterFailure(state)) return;
  auto it = g_results->find(d_model);
  if (it == g_results->end()) {
    return FailBenchmark(state, absl::FailedPreconditionError("the save case did not run"));
  }
  Report(state, it->second, "load");
}

std::vector<int64_t> g_d_models = {512};

void RegisterCases(const RankGroups& groups) {
  for (int64_t d : g_d_models) {
    benchmark::RegisterBenchmark(absl::StrCat("BM_FullSave/d_model:", d, "/world:2").c_str(),
                                 [&groups, d](benchmark::State& s) { BM_FullSave(s, &groups, d); })
        ->Iterations(kIterations)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(absl::StrCat("BM_FullLoad/d_model:", d, "/world:2").c_str(),
                                 [d](benchmark::State& s) { BM_FullLoad(s, d); })
        ->Iterations(kIterations)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
}

// FULL_CHECKPOINT_D_MODELS ("512,1152"; default 512): the sizes, read on every rank.
absl::Status ReadSizes() {
  const char* env = std::getenv("FULL_CHECKPOINT_D_MODELS");
  if (env == nullptr || *env == '\0') return absl::OkStatus();
  g_d_models.clear();
  for (absl::string_view d : absl::StrSplit(env, ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(d, &v) || v <= 0 || v % 8 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("FULL_CHECKPOINT_D_MODELS: '", d, "' is not a positive multiple of 8"));
    }
    g_d_models.push_back(v);
  }
  return absl::OkStatus();
}

RankHarnessOptions Options() {
  RankHarnessOptions options;
  options.name = "full_checkpoint_benchmark";
  options.collective_timeout = std::chrono::minutes(20);
  // Gathered units are freed at once, as the PyTorch process frees them (rank_util.h).
  options.mmap_threshold_bytes = 1 << 20;
  return options;
}

}  // namespace
}  // namespace fsdp::bench

int main(int argc, char** argv) {
  if (absl::Status sizes = fsdp::bench::ReadSizes(); !sizes.ok()) {
    std::fprintf(stderr, "full_checkpoint_benchmark: %s\n", sizes.ToString().c_str());
    return 2;
  }
  return fsdp::bench::RankBenchmarkMain(argc, argv, fsdp::bench::kLaunchedRanks,
                                        fsdp::bench::Options(), fsdp::bench::RegisterCases,
                                        fsdp::bench::FollowCommand);
}
