// PyTorch's texts for values in error messages: the reprs Python would print for strings,
// lists, tuples, sets, torch.Size, dtypes and tensor items, so that our errors read as PyTorch's
// do (tests compare them with PyTorch's own). Shared by the optimizer-state targets that write
// such errors (fsdp_optim_state's pieces, rekey, optimizer_adapter).
// No preconditions; nothing fails (ItemRepr calls item(), so its tensor must have one element).
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_PY_REPR_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_PY_REPR_H_

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "optim_state/optim_state_dict.h"

namespace fsdp::optim_state::internal {

// 'text' (quoted as PyTorch's messages quote names; not escaped).
std::string PyStr(const std::string& s);
// ['a', 'b'].
std::string PyList(const std::vector<std::string>& items);
// ('a', 'b'), and ('a',) for one item.
std::string PyTuple(const std::vector<std::string>& items);
// {r1, r2} from items already written as reprs.
std::string PySet(const std::vector<std::string>& reprs);
// [r1, r2] of the values' DebugString reprs.
std::string ValuesRepr(const std::vector<const StateValue*>& values);
// torch.Size([2, 3]).
std::string TorchSize(at::IntArrayRef shape);
// [2, 3]: a shape as our own messages write it.
std::string ShapeString(at::IntArrayRef shape);
// torch.float32.
std::string TorchDtype(at::ScalarType t);
// Python's `tensor.item()` repr: True, 3, 2.5.
std::string ItemRepr(const at::Tensor& t);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_PY_REPR_H_
