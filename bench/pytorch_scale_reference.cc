#include "bench/pytorch_scale_reference.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "bench/pytorch_reference.h"
#include "comm/status_macros.h"

namespace fsdp::bench {

absl::StatusOr<PyTorchScaleFigures> RunPyTorchScale(const PyTorchScaleRequest& request) {
  std::vector<std::string> args = {absl::StrCat("--out_dir=", request.out_dir),
                                   absl::StrCat("--widths=", absl::StrJoin(request.widths, ",")),
                                   absl::StrCat("--iterations=", request.iterations)};
  if (!request.ops.empty()) args.push_back(absl::StrCat("--ops=", request.ops));
  if (!request.wrappers.empty()) args.push_back(absl::StrCat("--wrappers=", request.wrappers));
  FSDP_ASSIGN_OR_RETURN(auto lines, RunPyTorchReference("bench/pytorch_scale.py",
                                                        request.world_size, args, "PYTORCH_SCALE"));
  PyTorchScaleFigures figures;
  for (const auto& fields : lines) {
    PyTorchScaleFigure figure;
    FSDP_ASSIGN_OR_RETURN(const double width, NumberField(fields, "width"));
    FSDP_ASSIGN_OR_RETURN(figure.ms, NumberField(fields, "ms"));
    FSDP_ASSIGN_OR_RETURN(figure.peak_rss_rank0, NumberField(fields, "peak_rss_rank0"));
    FSDP_ASSIGN_OR_RETURN(figure.peak_rss_max, NumberField(fields, "peak_rss_max"));
    FSDP_ASSIGN_OR_RETURN(figure.params, NumberField(fields, "params"));
    auto op = fields.find("op");
    auto impl = fields.find("impl");
    if (op == fields.end() || impl == fields.end()) {
      return absl::InternalError("PyTorch's reference printed a PYTORCH_SCALE line without op=");
    }
    figure.fsdp = impl->second == "fsdp1" ? 1 : 2;
    auto [it, inserted] =
        figures.emplace(std::make_pair(static_cast<int64_t>(width), op->second), figure);
    if (!inserted && figure.ms < it->second.ms) it->second = figure;
  }
  return figures;
}

absl::Status AddDcpCounters(benchmark::State& state, bool save, int world_size, double our_seconds,
                            int64_t our_peak_rss_rank0, int iterations,
                            const std::string& out_dir) {
  static auto* runs = new std::map<int, absl::StatusOr<PyTorchScaleFigures>>();
  auto it = runs->find(world_size);
  if (it == runs->end()) {
    PyTorchScaleRequest request;
    request.world_size = world_size;
    request.widths = {512};
    request.ops = "save,ckpt_load";
    request.wrappers = "fsdp2";
    request.iterations = iterations;
    request.out_dir = out_dir;
    it = runs->emplace(world_size, RunPyTorchScale(request)).first;
  }
  if (!it->second.ok()) return it->second.status();
  const std::string op = save ? "save" : "ckpt_load";
  auto figure = it->second->find({512, op});
  if (figure == it->second->end()) {
    return absl::InternalError(absl::StrCat("PyTorch's reference printed no ", op, " line"));
  }
  state.counters["peak_rss_rank0"] =
      benchmark::Counter(static_cast<double>(our_peak_rss_rank0), benchmark::Counter::kDefaults,
                         benchmark::Counter::kIs1024);
  AddVsPyTorchCounters(state, our_seconds * 1e3, static_cast<double>(our_peak_rss_rank0),
                       figure->second);
  return absl::OkStatus();
}

void AddVsPyTorchCounters(benchmark::State& state, double our_ms, double our_peak_rss_rank0,
                          const PyTorchScaleFigure& pytorch) {
  const auto bytes = [](double value) {
    return benchmark::Counter(value, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
  };
  state.counters["pytorch_ms"] = pytorch.ms;
  state.counters["pytorch_fsdp"] = pytorch.fsdp;
  state.counters["vs_pytorch"] = our_ms / pytorch.ms;
  state.counters["pytorch_peak_rss_rank0"] = bytes(pytorch.peak_rss_rank0);
  state.counters["pytorch_peak_rss_max"] = bytes(pytorch.peak_rss_max);
  if (pytorch.peak_rss_rank0 > 0) {
    state.counters["mem_vs_pytorch"] = our_peak_rss_rank0 / pytorch.peak_rss_rank0;
  }
}

}  // namespace fsdp::bench
