// Deferred initialisation: a model whose parameters and buffers are meta tensors (shapes and
// dtypes, no storage) that FullyShardedDataParallel::Wrap materialises one unit at a time, as
// PyTorch FSDP1 does for a model built under `with torch.device("meta")`.
//
// Building a meta model in C++. LibTorch has no default-device context, so a module is made meta
// in one of two ways:
//   * your own modules register meta tensors directly, and allocate nothing:
//       weight = register_parameter("weight", torch::empty({out, in}, torch::kMeta));
//   * LibTorch's built-in modules (Linear, Embedding, LayerNorm, Conv*, BatchNorm*, ...) allocate
//     and initialise their tensors in their constructors; MakeMeta frees them right away:
//       fc = register_module("fc", fsdp::MakeMeta(torch::nn::Linear(4096, 4096)));
//     Build the model module by module this way and no more than one module is ever allocated.
// Meta tensors keep their identity when materialised (modules hold their tensors as members, so
// FSDP fills the same TensorImpl with CPU storage instead of registering new tensors).
//
// Materialisation (FsdpOptions::param_init_fn, FSDP1's `_materialize_with_param_init_fn` and
// `_materialize_meta_module`). Units are wrapped inside-out (a post-order walk, as FSDP1's
// auto-wrap builds them); a unit whose managed parameters, or the buffers of the modules under
// it, include a meta tensor is materialised before it is flattened and sharded. Its modules are
// taken breadth-first from the unit's module, stopping at other units and ignored modules. With
// a param_init_fn it is called on each of them (parameterless ones too); it must allocate what is
// meta (ToEmpty) and initialise it. Without one, each module that holds parameters or buffers of
// its own is ToEmpty'd and reset: LibTorch modules that have reset_parameters(), or your modules
// that implement fsdp::ResetsParameters.
//
// Errors (from Wrap, INVALID_ARGUMENT): a module to reset without a param_init_fn that has no
// known reset_parameters() (naming its FQN and type); a param_init_fn that throws, leaves a meta
// tensor or changes a tensor's shape or dtype (naming the FQN); a meta tensor in an ignored module
// or outside every unit (FSDP does not materialise those; naming the FQN).
#ifndef FSDP_CPP_FSDP_DEFERRED_INIT_H_
#define FSDP_CPP_FSDP_DEFERRED_INIT_H_

#include <torch/nn/module.h>

#include <functional>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace fsdp {

// PyTorch FSDP's `param_init_fn`: called on one module at a time (see above).
using ParamInitFn = std::function<void(torch::nn::Module&)>;

// Implement this in your own modules to be materialised without a param_init_fn (PyTorch's
// `reset_parameters()` contract: initialise this module's own parameters and buffers only).
class ResetsParameters {
 public:
  virtual ~ResetsParameters() = default;
  virtual void reset_parameters() = 0;
};

// Replaces every parameter's and buffer's storage under `module` (recursively) with none: they
// become meta tensors of the same shape, dtype and identity.
void ToMeta(torch::nn::Module& module);

// ToMeta on a module holder, returned for registration: MakeMeta(torch::nn::Linear(4, 3)).
template <typename Holder>
Holder MakeMeta(Holder holder) {
  ToMeta(*holder);
  return holder;
}

// PyTorch's `module.to_empty(device="cpu", recurse=...)`: every parameter and buffer gets fresh,
// uninitialised CPU storage of its shape and dtype (identity and requires_grad kept).
void ToEmpty(torch::nn::Module& module, bool recurse = false);

// A hash of `fqn` (h = h * 131 + byte, mod 2^31 - 1) that seeds FqnSeededInit's generators; the
// tests' Python twin computes the same.
uint64_t FqnSeed(const std::string& fqn);

// How FqnSeededInit fills one tensor: `tensor` (allocated, uninitialised) of `fqn` from `gen`.
using TensorInitFn =
    std::function<void(const std::string& fqn, at::Tensor& tensor, at::Generator& gen)>;

// A param_init_fn whose values are a function of each tensor's FQN alone, so they are the same on
// every rank and whatever order units are materialised in: it ToEmpty's the module it is given and
// calls `init` on each of its own parameters and buffers with a CPU generator seeded by
// FqnSeed(fqn) + seed. FQNs are those under `root` at the time of the call (the model to wrap).
ParamInitFn FqnSeededInit(torch::nn::Module& root, TensorInitFn init, uint64_t seed = 0);

// Whether any parameter or buffer directly held by `module` is a meta tensor.
bool HoldsMetaTensors(const torch::nn::Module& module);

// The reset_parameters() of `module` if LibTorch's module type has one or it implements
// ResetsParameters; INVALID_ARGUMENT naming `fqn` and the type otherwise.
[[nodiscard]] absl::Status ResetParameters(torch::nn::Module& module, const std::string& fqn);

namespace internal {

// A module under a unit, with its FQN prefix ("" for the root, "block1." ...).
struct NamedModule {
  torch::nn::Module* module;
  std::string prefix;
};

// The modules FSDP1 materialises for a unit at `unit`: breadth-first from it, not entering
// `stop` (other units' and ignored modules).
std::vector<NamedModule> ModulesToMaterialize(const NamedModule& unit,
                                              const std::unordered_set<torch::nn::Module*>& stop);

// Materialises one unit if `managed` (its parameters, FQN first) or a buffer of `modules`
// (ModulesToMaterialize's) is meta: `init` on each module, or ToEmpty + ResetParameters; then
// checks that no managed tensor is meta and none changed shape or dtype.
[[nodiscard]] absl::Status MaterializeUnit(
    const std::vector<NamedModule>& modules,
    const std::vector<std::pair<std::string, at::Tensor>>& managed, const ParamInitFn& init);

// INVALID_ARGUMENT naming the first meta parameter or buffer under `root` that is not in
// `covered` (what the units materialise).
[[nodiscard]] absl::Status CheckNoMetaOutsideUnits(
    const torch::nn::Module& root, const std::unordered_set<const c10::TensorImpl*>& covered);

}  // namespace internal
}  // namespace fsdp

#endif  // FSDP_CPP_FSDP_DEFERRED_INIT_H_
