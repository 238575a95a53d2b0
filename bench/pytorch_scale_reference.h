// PyTorch 2.13's figures from bench/pytorch_scale.py (run under torchrun from rank 0 of a C++
// benchmark, through RunPyTorchReference), and the counters that set our case beside them: what
// scale_benchmark and checkpoint_benchmark's sharded save / load cases share.
//
// Preconditions: as RunPyTorchReference's (pytorch_reference.h); pytorch_scale.py and the
// scripts it imports come with this target's data.
// Errors: RunPyTorchReference's; INTERNAL when a PYTORCH_SCALE line lacks a field or a number.
#ifndef FSDP_CPP_BENCH_PYTORCH_SCALE_REFERENCE_H_
#define FSDP_CPP_BENCH_PYTORCH_SCALE_REFERENCE_H_

#include <benchmark/benchmark.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace fsdp::bench {

// One operation at one model width, by the faster of the wrappers that ran it.
struct PyTorchScaleFigure {
  int fsdp = 0;  // 1 or 2: which wrapper (FSDP1 or FSDP2)
  double ms = 0;
  double peak_rss_rank0 = 0;  // bytes, VmHWM during the calls
  double peak_rss_max = 0;    // bytes, the largest rank's
  double params = 0;
};

// (d_model, op) -> figure. Ops are pytorch_scale.py's: step, full, sharded, load, save,
// ckpt_load.
using PyTorchScaleFigures = std::map<std::pair<int64_t, std::string>, PyTorchScaleFigure>;

struct PyTorchScaleRequest {
  int world_size = 2;
  std::vector<int64_t> widths = {512};
  std::string ops;       // comma-separated; empty: all
  std::string wrappers;  // "fsdp1,fsdp2" by default
  int iterations = 2;
  std::string out_dir;  // dcp.save's directory goes under it (removed after)
};

[[nodiscard]] absl::StatusOr<PyTorchScaleFigures> RunPyTorchScale(
    const PyTorchScaleRequest& request);

// checkpoint_benchmark's sharded save (`save`) or same-size load beside PyTorch's dcp.save or
// dcp.load + set_state_dict of the default 52.5M model's FSDP2 state at `world_size` (both
// measured in one pytorch_scale.py run per world size, `iterations` calls each, kept for the
// process's life): peak_rss_rank0 and AddVsPyTorchCounters's counters.
[[nodiscard]] absl::Status AddDcpCounters(benchmark::State& state, bool save, int world_size,
                                          double our_seconds, int64_t our_peak_rss_rank0,
                                          int iterations, const std::string& out_dir);

// Counters of a case beside PyTorch's figure: pytorch_ms, pytorch_fsdp, vs_pytorch (our ms /
// PyTorch's), pytorch_peak_rss_rank0, pytorch_peak_rss_max and mem_vs_pytorch (our rank 0 peak
// RSS / PyTorch's rank 0 peak RSS).
void AddVsPyTorchCounters(benchmark::State& state, double our_ms, double our_peak_rss_rank0,
                          const PyTorchScaleFigure& pytorch);

}  // namespace fsdp::bench

#endif  // FSDP_CPP_BENCH_PYTORCH_SCALE_REFERENCE_H_
