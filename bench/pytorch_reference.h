// PyTorch 2.13 as a benchmark's reference: runs one of bench/'s Python scripts under torchrun on
// this machine (from rank 0 of a benchmark, while the other C++ ranks wait for their next
// command) and returns what it measured, so that a case reports our time beside PyTorch's from
// the same run.
//
// Preconditions: the binary runs under `bazel run` or `bazel test` and lists the script and
// "//third_party:python" in its data (through //tools:python_testutil).
// Errors: INTERNAL naming the command and carrying its output when the script fails or prints
// no line starting with `marker`.
#ifndef FSDP_CPP_BENCH_PYTORCH_REFERENCE_H_
#define FSDP_CPP_BENCH_PYTORCH_REFERENCE_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fsdp::bench {

// The `key=value` fields of each output line of `python -m torch.distributed.run --standalone
// --nproc_per_node=<nproc> <script> <args...>` that starts with `marker` ("PYTORCH_STEP"), in
// order. The scripts take `--threads` and get this process's intra-op thread count.
[[nodiscard]] absl::StatusOr<std::vector<std::map<std::string, std::string>>> RunPyTorchReference(
    absl::string_view script, int nproc, const std::vector<std::string>& args,
    absl::string_view marker);

// The field `key` of `fields` as a number. Errors: INTERNAL naming the marker and the key.
[[nodiscard]] absl::StatusOr<double> NumberField(const std::map<std::string, std::string>& fields,
                                                 const std::string& key);

}  // namespace fsdp::bench

#endif  // FSDP_CPP_BENCH_PYTORCH_REFERENCE_H_
