// SlotList and SlotSequential: containers whose children are fsdp::ModuleSlots.
//
// They stand in for Python's nn.ModuleList and nn.Sequential in the reference models
// (models/nested_model.h, models/simple_models.h, models/transformer.h). Children are
// registered under "0", "1", ... exactly as Python names them, so a parameter of the second
// child is reported as "<container>.1.<name>", and every child is called through its slot so
// that FSDP can wrap any single child (Python's `model.block2[1] = FSDP(model.block2[1])`)
// without renaming anything. LibTorch's torch::nn::Sequential calls its children directly,
// which is why these exist.
//
//   SlotSequential seq;
//   seq->push_back(torch::nn::Linear(8, 16));
//   seq->push_back(torch::nn::ReLU());
//   fsdp::ModuleSlot& first = seq->slot(0);          // wrappable
//   auto linear = seq->child_as<torch::nn::LinearImpl>(0);
//   torch::Tensor y = seq->forward(x);               // chains slot(0), slot(1), ...
//
// Preconditions: every child's forward returns a torch::Tensor (ModuleSlot's requirement);
// SlotSequential's children also take a single tensor. Errors: index out of range and a
// child of the wrong type throw c10::Error (LibTorch's convention for module misuse).
#ifndef FSDP_CPP_MODELS_SLOT_CONTAINERS_H_
#define FSDP_CPP_MODELS_SLOT_CONTAINERS_H_

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstddef>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fsdp/module_slot.h"

namespace fsdp::models {

// The module held by `slot` as its concrete type, e.g. SlotAs<BlockBImpl>(model->block1).
// Throws c10::Error if the slot is empty or holds another type.
template <typename ModuleType>
std::shared_ptr<ModuleType> SlotAs(const fsdp::ModuleSlot& slot) {
  auto typed = std::dynamic_pointer_cast<ModuleType>(slot.module());
  TORCH_CHECK(typed != nullptr, "the slot is empty or holds a module of another type");
  return typed;
}

// nn.ModuleList with slots: children registered as "0", "1", ...; no forward of its own.
class SlotListImpl : public torch::nn::Module {
 public:
  SlotListImpl() = default;

  // Registers `module` under the next index and returns its slot. Slots never move, so the
  // reference stays valid for the container's lifetime.
  template <typename ModuleType>
  fsdp::ModuleSlot& push_back(torch::nn::ModuleHolder<ModuleType> module) {
    return push_back(module.ptr());
  }

  template <typename ModuleType>
  fsdp::ModuleSlot& push_back(std::shared_ptr<ModuleType> module) {
    const std::string name = std::to_string(slots_.size());
    slots_.emplace_back(register_module(name, std::move(module)));
    return slots_.back();
  }

  size_t size() const { return slots_.size(); }

  fsdp::ModuleSlot& slot(size_t index) {
    TORCH_CHECK(index < slots_.size(), "slot index ", index, " out of range for ", name(),
                " of size ", slots_.size());
    return slots_[index];
  }

  // Every slot, in index order (e.g. FSDP's per-layer units: FsdpOptions::nested).
  std::vector<fsdp::ModuleSlot*> slots() {
    std::vector<fsdp::ModuleSlot*> all;
    for (fsdp::ModuleSlot& s : slots_) all.push_back(&s);
    return all;
  }

  // The child at `index` as its concrete type (throws if it is another type).
  template <typename ModuleType>
  std::shared_ptr<ModuleType> child_as(size_t index) {
    return SlotAs<ModuleType>(slot(index));
  }

 private:
  std::deque<fsdp::ModuleSlot> slots_;
};
TORCH_MODULE(SlotList);

// nn.Sequential with slots: forward feeds each child's output to the next child's slot.
class SlotSequentialImpl : public SlotListImpl {
 public:
  SlotSequentialImpl() = default;

  torch::Tensor forward(torch::Tensor x) {
    for (size_t i = 0; i < size(); ++i) {
      x = slot(i).forward(std::move(x));
    }
    return x;
  }
};
TORCH_MODULE(SlotSequential);

}  // namespace fsdp::models

#endif  // FSDP_CPP_MODELS_SLOT_CONTAINERS_H_
