// checkpoint_benchmark: saving and loading checkpoints of a 52.5M-parameter transformer with
// Adam state, each timed against plainly writing (write + fsync) or reading (read) the same
// bytes on the same filesystem in the same run.
//
//   bazel run -c opt //bench:checkpoint_benchmark [-- --out_dir=/some/dir --benchmark_filter=...]
//
// Cases, in the order they run (grouped by world size so each model is built once):
//   SaveSharded/world:N        SaveShardedCheckpoint (checkpoint/sharded_checkpoint.h) of model
//                              and optimizer at world size N into a fresh directory (the
//                              previous iteration's is removed before the clock starts).
//                              Reference: every rank of the group writes as many bytes as it
//                              wrote (its data file; rank 0 also metadata.json) to a new file
//                              with write() and fsync(), all ranks at once.
//   SaveDcp/world:N            SaveDcpCheckpoint (checkpoint/dcp_save.h): the same model and
//                              optimizer as a torch.distributed.checkpoint directory that
//                              PyTorch's dcp.load reads (N = 4, 2), with SaveSharded's reference.
//   LoadDcp/world:N            LoadShardedCheckpoint of that DCP directory (saved untimed first)
//                              into the same world-N job, alternating with the load of our own
//                              world-N checkpoint (vs_same_size_load: DCP's time / ours), with
//                              LoadSharded's reference.
//   LoadSharded/from:S/world:N LoadShardedCheckpoint of the world-S checkpoint into the world-N
//                              model and optimizer (S != N: a resharded load). Reference: every
//                              rank reads as many bytes as it read (LoadStats::read.bytes_read)
//                              with read() from the checkpoint's files (rank r starts where rank
//                              r-1's bytes end in the files taken in name order), all at once.
//   SaveFull/world:N           a full checkpoint as examples/train saves one, PyTorch-FSDP
//                              style: FullStateDict(rank0_only) and FullOptimStateDict
//                              (rank0_only), then rank 0's WriteFullCheckpoint
//                              (checkpoint/full_checkpoint.h: model.pt and optim.pt in torch.save
//                              format, serialized first, then written and fsynced in a staging
//                              directory swapped in atomically); rank 0's outcome is broadcast.
//                              Reference: rank 0 writes the bytes of model.pt + optim.pt with
//                              write() and fsync().
//   LoadFull/world:N           rank 0 reads model.pt and optim.pt (TorchLoad), then
//                              LoadFullStateDict(rank0_only), ScatterFullOptimStateDict and
//                              OptimizerAdapter::LoadStateDict, as examples/train loads one.
//                              Reference: rank 0 reads the two files with read().
// World sizes: N = 4 (all ranks), 2 (ranks {0, 1}), 3 (ranks {0, 1, 2}); resharded loads
// 4 -> 2 and 2 -> 3 (the grid); full save and load at 4 and 2.
//
// Counters (rank 0's wall time per call, from a barrier before to a barrier after the call, so
// the slowest rank counts; UseManualTime):
//   vs_write           API time per call / reference time per call (goal: <= 1.5).
//   vs_same_size_load  (resharded loads, LoadDcp) time per call / time of loading the world-N
//                      checkpoint into the same world-N model, the two loads alternating in
//                      the same case after one untimed same-size load (goal: <= 1.2).
//   ref_ms             the reference's time per call.
//   ckpt_bytes         bytes written (saves) or read (loads) per call, all ranks together;
//                      also SetBytesProcessed, so bytes_per_second is the API's throughput.
//   api_cpu_ms,        CPU time per call of the API and of the reference, summed over the
//   ref_cpu_ms         group's processes (all their threads): on a busy machine, where wall
//                      time includes waiting for a core, this shows the work each one does.
//   vs_write_cpu,      the same ratios as vs_write and vs_same_size_load, of CPU time (all
//   vs_same_size_load_cpu  ranks): steadier than wall time on a shared machine. For saves the
//                      reference's CPU time is the write() copy into the page cache only.
//   vs_pytorch,        (sharded saves and same-size loads at world sizes 2 and 4) API time /
//   mem_vs_pytorch     PyTorch's dcp.save / dcp.load of the twin's FSDP2 state, and rank 0's
//                      peak RSS (peak_rss_rank0) / PyTorch's (pytorch_scale_reference.h).
//   p2_snapshot_ms,    (same-size sharded loads) rank 0's time for the parts of the loader's
//   p2_optim_load_ms,  second phase, done alone right after on the same model: the
//   p2_model_load_ms   optimizer snapshot (StateDict + CloneOptimStateDict), LoadStateDict of
//                      a dict of that size, and LoadShardedStateDict of this rank's shards.
//                      What is left of a load's time is reading, checking and building.
// Reads: by default from the page cache: the files were written moments before in the same run
// (and the reference reads the same files right after the API did), so loads are measured
// against a memory-speed read; saves against the disk's write + fsync. With --cold_reads, rank
// 0 drops the checkpoint's files from the page cache (posix_fadvise DONTNEED, untimed) before
// every timed load and every reference read, so both read from the disk.
//
// The model: BenchTransformer (bench_transformer.h; 52.5M parameters), FULL_SHARD with one
// unit per transformer layer plus the root, Adam(lr 1e-4) after one real training step (forward,
// backward, OptimizerAdapter::Step): 210 MB of parameters and 420 MB of exp_avg / exp_avg_sq,
// so a checkpoint holds about 630 MB.
//
// How it runs: as comm_benchmark, the binary re-executes itself as 4 ranks (rank_util.h's
// LaunchSelfAsRanks; OMP_NUM_THREADS=1 unless set). Rank 0 runs Google Benchmark; before each
// case it broadcasts a command (case, world size, source world size, iterations) on the full
// group; the members of the case's group (re)build the model when the world size changes (the
// other ranks free theirs), then run the timed calls and the reference. A load whose source
// checkpoint this run has not written yet (a --benchmark_filter left out its save) is preceded
// by an untimed save at the source world size. Every case runs a fixed number of iterations
// (kSaveIterations / kLoadIterations) so that the whole binary finishes in a few minutes.
//
// Flags besides Google Benchmark's:
//   --out_dir=DIR  (default $TMPDIR, else /tmp) rank 0 creates DIR/fsdp-ckbench-<nonce> for the
//                  checkpoints and reference files and removes it at the end. All ranks must
//                  see DIR (they run on one host here).
//   --cold_reads   loads and reference reads from the disk, not the page cache (see above).
// Errors skip the case and every later one with the status message, and the
// binary exits non-zero.
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <torch/optim/adam.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "bench/adam_job.h"
#include "bench/bench_transformer.h"
#include "bench/plain_io.h"
#include "bench/pytorch_scale_reference.h"
#include "bench/rank_harness.h"
#include "bench/rank_util.h"
#include "bench/timed_calls.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/dcp_save.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/sharded_checkpoint.h"
#include "comm/launcher.h"
#include "comm/process_group.h"
#include "comm/rendezvous.h"
#include "comm/status_macros.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/state_dict.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::bench {
namespace {

using comm::ProcessGroup;
using optim_state::OptimizerAdapter;
using optim_state::OptimStateDict;

constexpr int kLaunchedRanks = 4;
constexpr int64_t kSaveIterations = 2;
constexpr int64_t kLoadIterations = 3;
constexpr int64_t kWriteReferenceReps = 2;
constexpr int64_t kReadReferenceReps = 3;
constexpr std::chrono::milliseconds kCollectiveTimeout = std::chrono::minutes(5);
constexpr std::chrono::milliseconds kJobTimeout = std::chrono::minutes(60);

enum class Op : int64_t {
  kQuit = 0,
  kSaveSharded = 1,
  kLoadSharded = 2,
  kSaveFull = 3,
  kLoadFull = 4,
  kMakeSharded = 5,  // untimed save of a missing source checkpoint
  kMakeFull = 6,
  kSetOutDir = 7,  // the run's directory follows as an object broadcast
  kSaveDcp = 8,
  kLoadDcp = 9,
  kMakeDcp = 10,  // untimed DCP save of the state LoadDcp reads
};

struct Command {
  Op op = Op::kQuit;
  int64_t world_size = 0;
  int64_t source_world = 0;  // loads: the saving world size
  int64_t iterations = 0;

  CommandWords Words() const {
    return {static_cast<int64_t>(op), world_size, source_world, iterations};
  }
  static Command From(const CommandWords& w) { return {static_cast<Op>(w[0]), w[1], w[2], w[3]}; }
};

// One world size's model and optimizer, on the members of its group.
using Setup = AdamJob;

struct RankContext {
  const RankGroups* groups = nullptr;
  std::unique_ptr<Setup> setup;
  std::string out_dir;        // rank 0: where the run directory is made (--out_dir)
  std::string run_dir;        // every rank, once the first case has made it
  bool made_run_dir = false;  // rank 0, which removes it at the end
  bool cold_reads = false;
};

RankContext* g_context = nullptr;

std::shared_ptr<ProcessGroup> GroupFor(const RankContext& context, int64_t world_size) {
  return context.groups->ForSize(world_size);
}

std::string ShardedDir(const RankContext& context, int64_t world_size) {
  return absl::StrCat(context.run_dir, "/sharded-w", world_size);
}
std::string FullDir(const RankContext& context) { return context.run_dir + "/full"; }
std::string DcpDir(const RankContext& context, int64_t world_size) {
  return absl::StrCat(context.run_dir, "/dcp-w", world_size);
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// Builds the model on `group`, wraps it, and takes one Adam step so the state exists.
absl::StatusOr<std::unique_ptr<Setup>> BuildSetup(std::shared_ptr<ProcessGroup> group) {
  auto setup = std::make_unique<Setup>();
  FSDP_RETURN_IF_ERROR(InitAdamJob(*setup, group, BenchTransformerConfig{}, /*seq=*/16));
  return setup;
}

// ---- the APIs under test ----

absl::StatusOr<int64_t> SaveSharded(Setup& setup, const std::string& dir) {
  FSDP_ASSIGN_OR_RETURN(checkpoint::SaveStats stats,
                        checkpoint::SaveShardedCheckpoint(dir, *setup.fsdp, &*setup.adapter));
  return stats.bytes_written;
}

// A DCP directory (torchtitan's layout), every rank writing its own file from its shards.
absl::StatusOr<int64_t> SaveDcp(Setup& setup, const std::string& dir) {
  FSDP_ASSIGN_OR_RETURN(checkpoint::SaveStats stats,
                        checkpoint::SaveDcpCheckpoint(dir, *setup.fsdp, &*setup.adapter));
  return stats.bytes_written;
}

absl::StatusOr<int64_t> LoadSharded(Setup& setup, const std::string& dir) {
  FSDP_ASSIGN_OR_RETURN(checkpoint::LoadStats stats,
                        checkpoint::LoadShardedCheckpoint(dir, *setup.fsdp, &*setup.adapter));
  return stats.read.bytes_read;
}

// A full save as examples/train makes one: gather to rank 0, which writes model.pt and optim.pt
// as a pair atomically (WriteFullCheckpoint); everyone learns rank 0's outcome.
absl::Status SaveFull(Setup& setup, const std::string& dir) {
  FSDP_ASSIGN_OR_RETURN(StateDict model_state, FullStateDict(*setup.fsdp, {.rank0_only = true}));
  optim_state::FullOptimStateDictOptions optim_options;
  optim_options.rank0_only = true;
  FSDP_ASSIGN_OR_RETURN(OptimStateDict optim, optim_state::FullOptimStateDict(
                                                  *setup.fsdp, *setup.adapter, optim_options));
  absl::Status status = absl::OkStatus();
  if (setup.group->rank() == 0) status = checkpoint::WriteFullCheckpoint(dir, model_state, &optim);
  FSDP_ASSIGN_OR_RETURN(std::string outcome,
                        setup.group->BroadcastObject(std::string(status.message()), 0));
  if (!outcome.empty()) return absl::InternalError(outcome);
  return absl::OkStatus();
}

absl::Status LoadFull(Setup& setup, const std::string& dir) {
  StateDict model_state;
  OptimStateDict optim;
  optim.has_param_groups = false;
  absl::Status status = absl::OkStatus();
  if (setup.group->rank() == 0) {
    status = [&]() -> absl::Status {
      FSDP_ASSIGN_OR_RETURN(model_state, checkpoint::ReadModelStateDict(dir + "/model.pt"));
      FSDP_ASSIGN_OR_RETURN(optim, checkpoint::ReadOptimStateDict(dir + "/optim.pt"));
      return absl::OkStatus();
    }();
  }
  FSDP_ASSIGN_OR_RETURN(std::string outcome,
                        setup.group->BroadcastObject(std::string(status.message()), 0));
  if (!outcome.empty()) return absl::InvalidArgumentError(outcome);
  FSDP_RETURN_IF_ERROR(LoadFullStateDict(*setup.fsdp, model_state, {.rank0_only = true}));
  FSDP_ASSIGN_OR_RETURN(OptimStateDict local,
                        optim_state::ScatterFullOptimStateDict(optim, *setup.fsdp, *setup.adapter));
  return setup.adapter->LoadStateDict(std::move(local));
}

struct CaseResult {
  std::vector<double> api_seconds;  // per call
  double reference_seconds = 0;
  double same_size_seconds = 0;  // resharded loads
  int64_t bytes = 0;             // per call, all ranks
  double api_cpu = 0;            // CPU seconds per call, all ranks
  double reference_cpu = 0;
  double same_size_cpu = 0;
  // Same-size sharded loads: rank 0's seconds for the loader's second phase done alone.
  double snapshot_seconds = 0;
  double optim_load_seconds = 0;
  double model_load_seconds = 0;
  int64_t peak_rss = 0;  // this rank's VmHWM during the API's calls (saves, same-size loads)
};

absl::Status EnsureSetup(RankContext& context, const std::shared_ptr<ProcessGroup>& group) {
  if (context.setup != nullptr && context.setup->world_size == group->size()) {
    return absl::OkStatus();
  }
  context.setup.reset();  // frees the other world size's model first
  FSDP_ASSIGN_OR_RETURN(context.setup, BuildSetup(group));
  return absl::OkStatus();
}

// Rank 0 removes `dir`; the group waits for it.
absl::Status RemoveOnRank0(ProcessGroup& group, const std::string& dir) {
  if (group.rank() == 0) FSDP_RETURN_IF_ERROR(checkpoint::RemoveTree(dir));
  return absl::OkStatus();
}

// With --cold_reads, rank 0 drops `path`'s files from the page cache; the group waits for it.
absl::Status MaybeDropOnRank0(const RankContext& context, ProcessGroup& group,
                              const std::string& path) {
  if (context.cold_reads && group.rank() == 0) FSDP_RETURN_IF_ERROR(DropFromCache(path));
  return absl::OkStatus();
}

// The loader's second phase (LoadShardedCheckpoint's step 2) done alone on the same model and
// optimizer, each part timed between barriers: the optimizer's snapshot (StateDict +
// CloneOptimStateDict), OptimizerAdapter::LoadStateDict of a dict that size, and
// LoadShardedStateDict of this rank's shards. Rank 0's times go into `result`.
absl::Status TimeLoaderPhases(Setup& setup, CaseResult& result) {
  ProcessGroup& g = *setup.group;
  double unused = 0;
  OptimStateDict snapshot;
  FSDP_ASSIGN_OR_RETURN(std::vector<double> snap,
                        TimeCalls(
                            g, 1,
                            [&]() -> absl::Status {
                              FSDP_ASSIGN_OR_RETURN(OptimStateDict current,
                                                    setup.adapter->StateDict());
                              snapshot = optim_state::CloneOptimStateDict(current);
                              return absl::OkStatus();
                            },
                            [] { return absl::OkStatus(); }, &unused));
  FSDP_ASSIGN_OR_RETURN(std::vector<double> optim,
                        TimeCalls(
                            g, 1, [&] { return setup.adapter->LoadStateDict(snapshot); },
                            [] { return absl::OkStatus(); }, &unused));
  FSDP_ASSIGN_OR_RETURN(ShardedDict shards, ShardedStateDict(*setup.fsdp));
  FSDP_ASSIGN_OR_RETURN(std::vector<double> model,
                        TimeCalls(
                            g, 1, [&] { return LoadShardedStateDict(*setup.fsdp, shards); },
                            [] { return absl::OkStatus(); }, &unused));
  result.snapshot_seconds = Mean(snap);
  result.optim_load_seconds = Mean(optim);
  result.model_load_seconds = Mean(model);
  return absl::OkStatus();
}

// One case on one member of its group: what the steps of each kind of case share.
struct CaseRun {
  RankContext& context;
  const Command& command;
  Setup& setup;
  ProcessGroup& g;
  std::string plain;  // this rank's reference file
  CaseResult result;
  int64_t my_bytes = 0;  // bytes this rank wrote or read per call
  struct {
    double api = 0, ref = 0, same = 0;
  } cpu;
};

// Every case's end: the bytes of all ranks per call, and CPU seconds per call summed over the
// group. Returns the exclusive prefix sum of the ranks' bytes (where rank r's reference read
// starts).
absl::StatusOr<int64_t> SumBytes(CaseRun& run) {
  FSDP_ASSIGN_OR_RETURN(auto sum_prefix, SumAndPrefix(run.g, run.my_bytes));
  run.result.bytes = sum_prefix.first;
  return sum_prefix.second;
}

absl::StatusOr<CaseResult> Finish(CaseRun& run) {
  FSDP_ASSIGN_OR_RETURN(run.result.api_cpu, SumOverGroup(run.g, run.cpu.api));
  FSDP_ASSIGN_OR_RETURN(run.result.reference_cpu, SumOverGroup(run.g, run.cpu.ref));
  FSDP_ASSIGN_OR_RETURN(run.result.same_size_cpu, SumOverGroup(run.g, run.cpu.same));
  return run.result;
}

// A save into `dir` (removed before each call), against plain writes of the bytes each rank
// wrote.
template <typename Save>
absl::StatusOr<CaseResult> RunTimedSave(CaseRun& run, const std::string& dir, Save save) {
  ProcessGroup& g = run.g;
  ResetPeakRss();
  FSDP_ASSIGN_OR_RETURN(run.result.api_seconds,
                        TimeCalls(
                            g, run.command.iterations,
                            [&]() -> absl::Status {
                              FSDP_ASSIGN_OR_RETURN(run.my_bytes, save(run.setup, dir));
                              return absl::OkStatus();
                            },
                            [&] { return RemoveOnRank0(g, dir); }, &run.cpu.api));
  run.result.peak_rss = PeakRssBytes();
  FSDP_RETURN_IF_ERROR(SumBytes(run).status());
  FSDP_ASSIGN_OR_RETURN(
      std::vector<double> reference,
      TimeCalls(
          g, kWriteReferenceReps, [&] { return PlainWrite(run.plain, run.my_bytes); },
          [&] { return checkpoint::RemoveTree(run.plain); }, &run.cpu.ref));
  FSDP_RETURN_IF_ERROR(checkpoint::RemoveTree(run.plain));
  run.result.reference_seconds = Mean(reference);
  return Finish(run);
}

absl::StatusOr<CaseResult> RunSaveSharded(CaseRun& run) {
  return RunTimedSave(run, ShardedDir(run.context, run.command.world_size), SaveSharded);
}

// SaveDcp/world:N, beside SaveSharded/world:N: the same model and state, PyTorch's format.
absl::StatusOr<CaseResult> RunSaveDcp(CaseRun& run) {
  return RunTimedSave(run, DcpDir(run.context, run.command.world_size), SaveDcp);
}

// The resharded load and the same-size load alternate, after one untimed same-size load:
// whichever ran first would otherwise pay for faulting in the memory that every later load
// reuses.
template <typename Load, typename Drop>
absl::Status TimeAlternatingLoads(CaseRun& run, const std::string& same, Load load,
                                  Drop drop_source) {
  auto drop_same = [&] { return MaybeDropOnRank0(run.context, run.g, same); };
  FSDP_RETURN_IF_ERROR(LoadSharded(run.setup, same).status());
  std::vector<double> same_size;
  double api_cpu = 0, same_cpu = 0;
  for (int64_t i = 0; i < run.command.iterations; ++i) {
    double c = 0;
    FSDP_ASSIGN_OR_RETURN(std::vector<double> api, TimeCalls(run.g, 1, load, drop_source, &c));
    run.result.api_seconds.push_back(api[0]);
    api_cpu += c;
    FSDP_ASSIGN_OR_RETURN(
        std::vector<double> other,
        TimeCalls(
            run.g, 1, [&] { return LoadSharded(run.setup, same).status(); }, drop_same, &c));
    same_size.push_back(other[0]);
    same_cpu += c;
  }
  const double n = static_cast<double>(std::max<int64_t>(run.command.iterations, 1));
  run.cpu.api = api_cpu / n;
  run.cpu.same = same_cpu / n;
  run.result.same_size_seconds = Mean(same_size);
  return absl::OkStatus();
}

// A load of `dir` into the case's job. With `alternate`, alternating with our own format's
// same-size load (vs_same_size_load); else alone, then its phases timed.
absl::StatusOr<CaseResult> RunLoadFrom(CaseRun& run, const std::string& dir, bool alternate) {
  ProcessGroup& g = run.g;
  const std::string same = ShardedDir(run.context, run.command.world_size);
  auto drop_source = [&] { return MaybeDropOnRank0(run.context, g, dir); };
  auto load = [&]() -> absl::Status {
    FSDP_ASSIGN_OR_RETURN(run.my_bytes, LoadSharded(run.setup, dir));
    return absl::OkStatus();
  };
  if (!alternate) {
    ResetPeakRss();
    FSDP_ASSIGN_OR_RETURN(run.result.api_seconds,
                          TimeCalls(g, run.command.iterations, load, drop_source, &run.cpu.api));
    run.result.peak_rss = PeakRssBytes();
  } else {
    FSDP_RETURN_IF_ERROR(TimeAlternatingLoads(run, same, load, drop_source));
  }
  FSDP_ASSIGN_OR_RETURN(const int64_t prefix, SumBytes(run));
  FSDP_ASSIGN_OR_RETURN(auto files, FilesOf(dir));
  FSDP_ASSIGN_OR_RETURN(
      std::vector<double> reference,
      TimeCalls(
          g, kReadReferenceReps, [&] { return PlainRead(files, prefix, run.my_bytes); },
          drop_source, &run.cpu.ref));
  run.result.reference_seconds = Mean(reference);
  if (!alternate) FSDP_RETURN_IF_ERROR(TimeLoaderPhases(run.setup, run.result));
  return Finish(run);
}

absl::StatusOr<CaseResult> RunLoadSharded(CaseRun& run) {
  return RunLoadFrom(run, ShardedDir(run.context, run.command.source_world),
                     run.command.source_world != run.command.world_size);
}

// LoadDcp/world:N: the same state as a DCP directory (SaveDcp's), loaded alternately with our
// format's: vs_same_size_load is DCP's load time over ours.
absl::StatusOr<CaseResult> RunLoadDcp(CaseRun& run) {
  return RunLoadFrom(run, DcpDir(run.context, run.command.world_size), /*alternate=*/true);
}

// Rank 0's files of the full checkpoint in `dir` (none on other ranks), their bytes added to
// run.my_bytes.
absl::StatusOr<std::vector<std::pair<std::string, int64_t>>> CountFullFiles(
    CaseRun& run, const std::string& dir) {
  std::vector<std::pair<std::string, int64_t>> files;
  if (run.g.rank() == 0) {
    FSDP_ASSIGN_OR_RETURN(files, FilesOf(dir));
    for (const auto& [path, size] : files) run.my_bytes += size;
  }
  return files;
}

absl::StatusOr<CaseResult> RunSaveFull(CaseRun& run) {
  ProcessGroup& g = run.g;
  const std::string dir = FullDir(run.context);
  FSDP_ASSIGN_OR_RETURN(run.result.api_seconds,
                        TimeCalls(
                            g, run.command.iterations, [&] { return SaveFull(run.setup, dir); },
                            [&] { return RemoveOnRank0(g, dir); }, &run.cpu.api));
  FSDP_RETURN_IF_ERROR(CountFullFiles(run, dir).status());
  FSDP_RETURN_IF_ERROR(SumBytes(run).status());
  FSDP_ASSIGN_OR_RETURN(
      std::vector<double> reference,
      TimeCalls(
          g, kWriteReferenceReps,
          [&] { return g.rank() == 0 ? PlainWrite(run.plain, run.my_bytes) : absl::OkStatus(); },
          [&] { return checkpoint::RemoveTree(run.plain); }, &run.cpu.ref));
  FSDP_RETURN_IF_ERROR(checkpoint::RemoveTree(run.plain));
  run.result.reference_seconds = Mean(reference);
  return Finish(run);
}

absl::StatusOr<CaseResult> RunLoadFull(CaseRun& run) {
  ProcessGroup& g = run.g;
  const std::string dir = FullDir(run.context);
  auto drop = [&] { return MaybeDropOnRank0(run.context, g, dir); };
  FSDP_ASSIGN_OR_RETURN(
      run.result.api_seconds,
      TimeCalls(
          g, run.command.iterations, [&] { return LoadFull(run.setup, dir); }, drop, &run.cpu.api));
  FSDP_ASSIGN_OR_RETURN(auto files, CountFullFiles(run, dir));
  FSDP_RETURN_IF_ERROR(SumBytes(run).status());
  FSDP_ASSIGN_OR_RETURN(
      std::vector<double> reference,
      TimeCalls(
          g, kReadReferenceReps,
          [&] { return g.rank() == 0 ? PlainRead(files, 0, run.my_bytes) : absl::OkStatus(); },
          drop, &run.cpu.ref));
  run.result.reference_seconds = Mean(reference);
  return Finish(run);
}

// Every member of the command's group runs this; non-members free their model and return.
absl::StatusOr<CaseResult> RunCase(RankContext& context, const Command& command) {
  std::shared_ptr<ProcessGroup> group = GroupFor(context, command.world_size);
  if (group == nullptr) {
    context.setup.reset();
    return CaseResult{};
  }
  FSDP_RETURN_IF_ERROR(EnsureSetup(context, group));
  CaseRun run{context, command, *context.setup, *group,
              absl::StrCat(context.run_dir, "/plain-r", group->rank())};
  switch (command.op) {
    case Op::kMakeSharded:
      FSDP_RETURN_IF_ERROR(
          SaveSharded(run.setup, ShardedDir(context, command.world_size)).status());
      return run.result;
    case Op::kMakeFull:
      FSDP_RETURN_IF_ERROR(SaveFull(run.setup, FullDir(context)));
      return run.result;
    case Op::kSaveSharded:
      return RunSaveSharded(run);
    case Op::kSaveDcp:
      return RunSaveDcp(run);
    case Op::kMakeDcp:
      FSDP_RETURN_IF_ERROR(SaveDcp(run.setup, DcpDir(context, command.world_size)).status());
      return run.result;
    case Op::kLoadDcp:
      return RunLoadDcp(run);
    case Op::kLoadSharded:
      return RunLoadSharded(run);
    case Op::kSaveFull:
      return RunSaveFull(run);
    case Op::kLoadFull:
      return RunLoadFull(run);
    case Op::kQuit:
    case Op::kSetOutDir:
      break;
  }
  return absl::InvalidArgumentError("checkpoint_benchmark: not a case");
}

// Ranks other than 0: the command's case, or the run directory rank 0 made.
absl::Status FollowCommand(const RankGroups& groups, const CommandWords& words) {
  RankContext& context = *g_context;
  context.groups = &groups;
  const Command command = Command::From(words);
  if (command.op == Op::kSetOutDir) {
    FSDP_ASSIGN_OR_RETURN(context.run_dir, groups.world->BroadcastObject("", 0));
    return absl::OkStatus();
  }
  return RunCase(context, command).status();
}

// Rank 0: sends `command` and runs its part.
absl::StatusOr<CaseResult> Dispatch(RankContext& context, const Command& command) {
  FSDP_RETURN_IF_ERROR(SendCommand(command.Words()));
  return RunCase(context, command);
}

// Rank 0: makes sure the world-`world_size` sharded checkpoint exists.
absl::Status EnsureSharded(RankContext& context, int64_t world_size) {
  if (Exists(ShardedDir(context, world_size) + "/metadata.json")) return absl::OkStatus();
  return Dispatch(context, Command{Op::kMakeSharded, world_size, world_size, 1}).status();
}

// Rank 0, before the first case: creates the run directory under --out_dir and tells every
// rank.
absl::Status SetUpRunDir(RankContext& context) {
  const std::string& out_dir = context.out_dir;
  std::error_code error;
  std::filesystem::create_directories(out_dir, error);
  if (error) {
    return absl::InternalError(absl::StrCat("--out_dir=", out_dir, ": ", error.message()));
  }
  const std::string dir = absl::StrCat(out_dir, "/fsdp-ckbench-", checkpoint::RandomNonce());
  if (::mkdir(dir.c_str(), 0755) != 0) return Errno("cannot create", dir);
  context.run_dir = dir;
  context.made_run_dir = true;
  FSDP_RETURN_IF_ERROR(SendCommand(Command{Op::kSetOutDir, 0, 0, 0}.Words()));
  return context.groups->world->BroadcastObject(dir, 0).status();
}

// Sharded saves and same-size loads at world sizes 2 and 4, beside PyTorch's dcp.save /
// dcp.load of the same model's FSDP2 state; a failure of PyTorch's run fails the case.
void AddPyTorchCounters(benchmark::State& state, Op op, int64_t source_world, int64_t world_size,
                        double api_seconds, const CaseResult& result) {
  const bool save = op == Op::kSaveSharded;
  const bool same_size_load = op == Op::kLoadSharded && source_world == world_size;
  if (!(save || same_size_load) || (world_size != 2 && world_size != 4)) return;
  absl::Status status = AddDcpCounters(state, save, static_cast<int>(world_size), api_seconds,
                                       result.peak_rss, kSaveIterations, g_context->run_dir);
  if (!status.ok()) FailBenchmark(state, status);
}

void BM_Checkpoint(benchmark::State& state, Op op, int64_t source_world, int64_t world_size) {
  RankContext& context = *g_context;
  if (SkipAfterFailure(state)) return;
  if (GroupFor(context, world_size) == nullptr || GroupFor(context, source_world) == nullptr) {
    state.SkipWithError(absl::StrCat("no group of ", world_size, " ranks").c_str());
    return;
  }
  absl::StatusOr<CaseResult> result = [&]() -> absl::StatusOr<CaseResult> {
    if (context.run_dir.empty()) FSDP_RETURN_IF_ERROR(SetUpRunDir(context));
    if (op == Op::kLoadSharded) {
      FSDP_RETURN_IF_ERROR(EnsureSharded(context, source_world));
      if (source_world != world_size) FSDP_RETURN_IF_ERROR(EnsureSharded(context, world_size));
    }
    if (op == Op::kLoadDcp) {
      FSDP_RETURN_IF_ERROR(EnsureSharded(context, world_size));
      if (!Exists(DcpDir(context, world_size) + "/.metadata")) {
        FSDP_RETURN_IF_ERROR(
            Dispatch(context, Command{Op::kMakeDcp, world_size, world_size, 1}).status());
      }
    }
    if (op == Op::kLoadFull && !Exists(FullDir(context) + "/optim.pt")) {
      const Command make{Op::kMakeFull, world_size, world_size, 1};
      FSDP_RETURN_IF_ERROR(Dispatch(context, make).status());
    }
    return Dispatch(
        context, Command{op, world_size, source_world, static_cast<int64_t>(state.max_iterations)});
  }();
  if (!result.ok()) return FailBenchmark(state, result.status());
  size_t i = 0;
  for (auto _ : state) state.SetIterationTime(result->api_seconds.at(i++));
  const double api = Mean(result->api_seconds);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * result->bytes);
  state.counters["vs_write"] = api / result->reference_seconds;
  state.counters["ref_ms"] = result->reference_seconds * 1e3;
  state.counters["ckpt_bytes"] =
      benchmark::Counter(static_cast<double>(result->bytes), benchmark::Counter::kDefaults,
                         benchmark::Counter::kIs1024);
  state.counters["api_cpu_ms"] = result->api_cpu * 1e3;
  state.counters["ref_cpu_ms"] = result->reference_cpu * 1e3;
  if (result->reference_cpu > 0) {
    state.counters["vs_write_cpu"] = result->api_cpu / result->reference_cpu;
  }
  if (result->snapshot_seconds > 0) {
    state.counters["p2_snapshot_ms"] = result->snapshot_seconds * 1e3;
    state.counters["p2_optim_load_ms"] = result->optim_load_seconds * 1e3;
    state.counters["p2_model_load_ms"] = result->model_load_seconds * 1e3;
  }
  if (result->same_size_seconds > 0) {
    state.counters["vs_same_size_load"] = api / result->same_size_seconds;
    state.counters["same_size_ms"] = result->same_size_seconds * 1e3;
    if (result->same_size_cpu > 0) {
      state.counters["vs_same_size_load_cpu"] = result->api_cpu / result->same_size_cpu;
    }
  }
  AddPyTorchCounters(state, op, source_world, world_size, api, *result);
}

void Register(const std::string& name, Op op, int64_t source_world, int64_t world_size,
              int64_t iterations) {
  benchmark::RegisterBenchmark(
      name.c_str(),
      [=](benchmark::State& state) { BM_Checkpoint(state, op, source_world, world_size); })
      ->Iterations(iterations)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

// DCP saves (checkpoint/dcp_save.h) and loads at world sizes 4 and 2, after the sharded save at
// the same world size (the same model and state).
void RegisterDcpSave(int64_t world) {
  if (world == 3) return;
  Register(absl::StrCat("BM_SaveDcp/world:", world), Op::kSaveDcp, world, world, kSaveIterations);
  Register(absl::StrCat("BM_LoadDcp/world:", world), Op::kLoadDcp, world, world, kLoadIterations);
}

void RegisterCases(const RankGroups& groups) {
  g_context->groups = &groups;
  // World 4, then 2, then 3: the model is rebuilt only when the world size changes.
  for (int64_t world : {4, 2, 3}) {
    Register(absl::StrCat("BM_SaveSharded/world:", world), Op::kSaveSharded, world, world,
             kSaveIterations);
    RegisterDcpSave(world);
    Register(absl::StrCat("BM_LoadSharded/from:", world, "/world:", world), Op::kLoadSharded, world,
             world, kLoadIterations);
    const int64_t resharded_from = world == 2 ? 4 : world == 3 ? 2 : 0;
    if (resharded_from != 0) {
      Register(absl::StrCat("BM_LoadSharded/from:", resharded_from, "/world:", world),
               Op::kLoadSharded, resharded_from, world, kLoadIterations);
    }
    if (world != 3) {
      Register(absl::StrCat("BM_SaveFull/world:", world), Op::kSaveFull, world, world,
               kSaveIterations);
      Register(absl::StrCat("BM_LoadFull/world:", world), Op::kLoadFull, world, world,
               kLoadIterations);
    }
  }
}

int RunRank(int argc, char** argv) {
  RankContext context;
  // --out_dir and --cold_reads are ours; everything else goes to Google Benchmark.
  const char* tmp = std::getenv("TMPDIR");
  context.out_dir = tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i > 0 && arg.rfind("--out_dir=", 0) == 0) {
      context.out_dir = arg.substr(10);
    } else if (i > 0 && arg == "--cold_reads") {
      context.cold_reads = true;
    } else {
      args.push_back(argv[i]);
    }
  }
  RankHarnessOptions options;
  options.name = "checkpoint_benchmark";
  options.collective_timeout = kCollectiveTimeout;
  options.command_timeout = kJobTimeout;
  options.subgroup_sizes = {2, 3};
  g_context = &context;
  const int exit_code = RunRankHarness(static_cast<int>(args.size()), args.data(), options,
                                       RegisterCases, FollowCommand);
  g_context = nullptr;
  context.groups = nullptr;  // they ended with RunRankHarness
  // The rank that made the run directory removes it, also after a failure.
  if (context.made_run_dir) {
    if (absl::Status s = checkpoint::RemoveTree(context.run_dir); !s.ok()) {
      std::fprintf(stderr, "checkpoint_benchmark: cleaning up: %s\n", s.ToString().c_str());
    }
  }
  return exit_code;
}

}  // namespace
}  // namespace fsdp::bench

int main(int argc, char** argv) {
  if (!fsdp::comm::LaunchedByLauncher()) {
    return fsdp::bench::LaunchSelfAsRanks(argc, argv, fsdp::bench::kLaunchedRanks,
                                          "checkpoint_benchmark");
  }
  return fsdp::bench::RunRank(argc, argv);
}
