// libFuzzer target for TorchLoadFromBytes, the torch.save reader (checkpoint/torch_load.h).
//
// Any input must end in a value or an error status, never in a crash, a sanitizer report, a
// leak, an allocation beyond the file's size or a hang. Beyond that the target checks what a
// caller relies on: an error names the file, and a loaded value can be walked and printed.
// Seeds: checkpoint/testdata/fuzz_corpus/torch_load/ (real torch.save files and the regression
// inputs of findings so far). How to run it: checkpoint/fuzz/README.md.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "checkpoint/torch_load.h"

namespace {

constexpr char kName[] = "fuzz-input.pt";

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "torch_load_fuzz: %s\n", what.c_str());
  std::abort();
}

// Touches every value of a loaded tree (tensors: their bytes), so that a view reaching outside
// its storage or a malformed container shows up under the sanitizers.
void Walk(const fsdp::checkpoint::PyValue& v, int depth) {
  if (depth > fsdp::checkpoint::kMaxDepth + 1) Fail("a loaded value nests deeper than kMaxDepth");
  if (v.is_list() || v.is_tuple()) {
    for (const auto& item : v.items()) Walk(item, depth + 1);
  } else if (v.is_dict()) {
    for (const auto& [key, value] : v.as_dict().items) {
      Walk(key, depth + 1);
      Walk(value, depth + 1);
    }
  } else if (v.is_tensor()) {
    const at::Tensor& t = v.as_tensor();
    if (t.defined() && t.numel() > 0) {
      // contiguous() reads every element of the view through its strides.
      volatile int64_t sink = t.contiguous().numel();
      (void)sink;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<fsdp::checkpoint::PyValue> loaded =
      fsdp::checkpoint::TorchLoadFromBytes(bytes, kName);
  if (!loaded.ok()) {
    if (loaded.status().message().find(kName) == absl::string_view::npos) {
      Fail("error without the file's name: " + loaded.status().ToString());
    }
    return 0;
  }
  Walk(*loaded, 0);
  (void)loaded->DebugString();
  return 0;
}
