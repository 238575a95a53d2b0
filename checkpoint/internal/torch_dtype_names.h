// The Python names of the dtypes the checkpoint readers take: each dtype's global as pickles
// name it ("torch.float32", DCP's .metadata) and its legacy storage class ("torch.FloatStorage",
// torch.save's persistent ids). No errors: a table and lookups.
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_DTYPE_NAMES_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_DTYPE_NAMES_H_

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace fsdp::checkpoint {

struct TorchDtypeName {
  at::ScalarType dtype;
  const char* global;   // "torch.float32"
  const char* storage;  // "torch.FloatStorage"
};

inline constexpr TorchDtypeName kTorchDtypeNames[] = {
    {at::kFloat, "torch.float32", "torch.FloatStorage"},
    {at::kDouble, "torch.float64", "torch.DoubleStorage"},
    {at::kHalf, "torch.float16", "torch.HalfStorage"},
    {at::kBFloat16, "torch.bfloat16", "torch.BFloat16Storage"},
    {at::kLong, "torch.int64", "torch.LongStorage"},
    {at::kInt, "torch.int32", "torch.IntStorage"},
    {at::kShort, "torch.int16", "torch.ShortStorage"},
    {at::kChar, "torch.int8", "torch.CharStorage"},
    {at::kByte, "torch.uint8", "torch.ByteStorage"},
    {at::kBool, "torch.bool", "torch.BoolStorage"},
    {at::kComplexFloat, "torch.complex64", "torch.ComplexFloatStorage"},
    {at::kComplexDouble, "torch.complex128", "torch.ComplexDoubleStorage"},
};

// The dtype whose global (`storage` false) or storage class (`storage` true) is `name`.
inline std::optional<at::ScalarType> DtypeNamed(const std::string& name, bool storage) {
  for (const TorchDtypeName& t : kTorchDtypeNames) {
    if (name == (storage ? t.storage : t.global)) return t.dtype;
  }
  return std::nullopt;
}

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_DTYPE_NAMES_H_
