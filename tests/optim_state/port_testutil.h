// The helpers of PyTorch's test/distributed/fsdp/test_fsdp_optim_state.py in C++, for the
// case-for-case port in this directory. The port follows the file as pytorch/pytorch has it at
// commit 01d6a04a74d58fc3e75cfdaa5dcd26b056e6c34c (PyTorch 2.x: 1.13's tests, 2.0's
// optim_state_dict tests, NestedModel with block0 = BlockB(5, 3), block1 = BlockB(3, 7)).
//
//   Python                              here
//   _init_nested_model                  InitNested (NestedModel, `wrap` / `wrap_alt`, groups)
//   _init_transformer_model             InitTransformer (TransformerWithSharedParams)
//   _step_model                         StepModel (torch.manual_seed(0), then K iterations)
//   _broadcast_full_osd                 BroadcastFullOsd (rank 0 saves with torch.save's format
//                                       to a real file, the others load it)
//   _check_same_state / _param_groups   ExpectSameState / ExpectSameParamGroups (keys equal) and
//                                       ExpectSameStateByFqn (FSDP's FQN keys vs IDs)
//   _gather_state_dict                  GatherShardedValues
//   dist.new_group(even ranks)          HalvedGroup
//
// Differences from Python: tensors live on the CPU and ranks talk over Gloo (Python's tests
// put them on CUDA, over NCCL); at world size 3, which PyTorch's CI never runs, losses are
// compared within a derived tolerance (LossTolerance) instead of exactly.
#ifndef FSDP_CPP_TESTS_OPTIM_STATE_PORT_TESTUTIL_H_
#define FSDP_CPP_TESTS_OPTIM_STATE_PORT_TESTUTIL_H_

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/mixed_precision.h"
#include "optim_state/optim_input.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"
#include "optim_state/state_dict_type.h"

namespace fsdp::optim_state::port {

enum class ModelClass { kNested, kTransformer };

// What _init_*_model returns: the model (wrapped or not), its optimizer and the optimizer
// input it was built from.
struct Setup {
  std::shared_ptr<torch::nn::Module> module;
  std::unique_ptr<FullyShardedDataParallel> fsdp;  // null when not wrapped
  // Draws Python's get_input (from the global generator), runs the model, returns get_loss.
  std::function<at::Tensor()> loss;
  OptimInput optim_input;
  std::unique_ptr<torch::optim::Optimizer> optim;
  std::unique_ptr<OptimizerAdapter> adapter;
  // The optimizer's parameter IDs -> the parameter's FQN in the model (for a flat parameter,
  // its first original parameter's).
  std::vector<std::string> id_to_fqn;
};

struct InitOptions {
  bool wrap = true;
  bool wrap_alt = false;  // NestedModel.wrap_alt instead of NestedModel.wrap
  // The FSDP group; the caller keeps it alive as long as the setup.
  std::shared_ptr<comm::ProcessGroup> group;
  bool use_multiple_param_groups = false;
  bool use_diff_optim_inputs = false;  // odd ranks reverse their optimizer input
  bool use_orig_params = false;
  double lr = 0.01;
  // Beyond Python's file: the FSDP options the optimizer-state suite also runs under.
  MixedPrecision mixed_precision;
  ShardingStrategy sharding_strategy = ShardingStrategy::kFullShard;
  std::shared_ptr<comm::ProcessGroup> replicate_group;  // HYBRID_SHARD's; `group` shards
};

// _init_nested_model: NestedModel (wrap: NestedModel.wrap, or .wrap_alt; the root is never a
// unit), Adam over model.parameters() or the two groups ([block1], [block2, block0] with
// weight_decay 0.9), reversed on odd ranks with use_diff_optim_inputs.
absl::StatusOr<Setup> InitNested(const InitOptions& options);
// _init_transformer_model: TransformerWithSharedParams (deterministic; wrapped: one unit per
// layer and the root), Adam over its parameters. Groups and differing inputs are refused, as
// in Python (NotImplementedError there).
absl::StatusOr<Setup> InitTransformer(const InitOptions& options);
absl::StatusOr<Setup> Init(ModelClass model_class, const InitOptions& options);

// _step_model: torch::manual_seed(0), then `num_iters` times zero_grad, forward, backward,
// step (through the adapter). Returns the losses.
absl::StatusOr<std::vector<double>> StepModel(Setup& setup, int num_iters);

// The ranks r % 2 == 0 of `group` as a new group (every rank calls; null on odd ranks).
absl::StatusOr<std::shared_ptr<comm::ProcessGroup>> HalvedGroup(comm::ProcessGroup& group);

// How FsdpParamNames names a flat parameter: by its first original parameter's FQN, or as
// `<unit prefix>_flat_param` (what a named optimizer keys it by).
enum class FlatParamName { kFirstFqn, kUnitPrefixFlatParam };

// Each tensor FSDP hands the optimizer -> its name: an original or unmanaged parameter's FQN,
// a flat parameter's as `flat_param_name` says.
absl::flat_hash_map<const c10::TensorImpl*, std::string> FsdpParamNames(
    const FullyShardedDataParallel& fsdp, FlatParamName flat_param_name);

// A non-owning shared_ptr to a group RunInRanks owns.
std::shared_ptr<comm::ProcessGroup> Borrow(comm::ProcessGroup& group);

// _broadcast_full_osd: rank 0 of `group` writes `osd` with WriteOptimStateDict (torch.save's
// format) to a file named after `tag` under TEST_TMPDIR; after a barrier every rank reads it.
absl::StatusOr<OptimStateDict> BroadcastFullOsd(const OptimStateDict& osd,
                                                comm::ProcessGroup& group, const std::string& tag);

// _gather_state_dict: every ShardedTensorValue replaced by its whole tensor (an all-reduce of
// each rank's piece placed at its offsets). A collective over `group`.
absl::StatusOr<OptimStateDict> GatherShardedValues(const OptimStateDict& osd,
                                                   comm::ProcessGroup& group);

// Python's comparisons (float32):
//   _are_equal_states (check_same_param_keys=False): torch.isclose's defaults;
inline constexpr Tolerance kIsClose{1e-5, 1e-8};
//   _check_same_state (check_same_param_keys=True): assertEqual's defaults for float32;
inline constexpr Tolerance kAssertEqualFloat32{1.3e-6, 1e-5};
//   losses: `l1 == l2`, exact.

// Losses, relative: 0 (Python's exact `l1 == l2`) at world sizes that are powers of two, a
// derived bound at others (see the .cc, with the measured worst differences).
double LossTolerance(int world_size);

// _check_same_param_groups: as many groups, each with the same hyper-parameter names and
// values, and (check_same_param_keys) the same "params".
void ExpectSameParamGroups(const OptimStateDict& actual, const OptimStateDict& expected,
                           bool check_same_param_keys);
// _check_same_state(check_same_param_keys=True): the same keys, and each parameter's state the
// same names and values (within `tolerance`).
void ExpectSameState(const OptimStateDict& actual, const OptimStateDict& expected,
                     Tolerance tolerance = kAssertEqualFloat32);
// _check_same_state(check_same_param_keys=False) for an FQN-keyed FSDP dict against an
// ID-keyed unwrapped optimizer's dict, matched through `expected_id_to_fqn` (stronger than
// Python's isomorphism check); param_groups' "params" compared as sets of FQNs.
void ExpectSameStateByFqn(const OptimStateDict& actual, const OptimStateDict& expected,
                          const std::vector<std::string>& expected_id_to_fqn,
                          Tolerance tolerance = kIsClose);
void ExpectSameParamGroupsByFqn(const OptimStateDict& actual, const OptimStateDict& expected,
                                const std::vector<std::string>& expected_id_to_fqn);

// _OSDCommMethod: how the first model's dict reaches the second model's ranks.
enum class OsdCommMethod { kBroadcastObjectList, kScatterFullOsd, kFlattenShardedOsd };

struct LoadOptimStateArgs {
  ModelClass model_class = ModelClass::kNested;
  bool use_multiple_param_groups = false;
  bool halve_world_size = false;
  OsdCommMethod osd_comm_method = OsdCommMethod::kBroadcastObjectList;
  bool use_diff_optim_inputs = false;
  bool use_optim_input = false;
  int num_iters = 3;
  // new_model_kwargs: the second model's wrapping and FSDP options.
  bool wrap_alt = false;
  bool use_orig_params = false;
  // Beyond Python's file: both models under this MixedPrecision, and the first one (only)
  // HYBRID_SHARD over shard groups of this many ranks of `group` (0: FULL_SHARD).
  MixedPrecision mixed_precision;
  int first_model_shard_group_size = 0;
};

// _test_load_optim_state: (1) trains a wrapped model over `group` for K iterations and takes
// its full (rank0_only, as Python's default) or sharded optimizer state dict (with optim or
// optim_input); (2) builds a second wrapped model over `group` or its even ranks
// (halve_world_size), with wrap_alt and differing optimizer inputs as asked, and trains it; (3)
// loads the first dict and the second model's own dict for the second model (shard after a
// broadcast through a file, scatter from rank 0, or flatten) and checks that both equal the
// second optimizer's own state dict, with the same IDs; (4) loads one and trains K more
// iterations. gtest assertions; every rank calls it.
void TestLoadOptimState(comm::ProcessGroup& group, const LoadOptimStateArgs& args);

// _test_load_optim_state_with_optim_state_dict: the same through GetOptimStateDict /
// OptimStateDictToLoad under `settings` (PyTorch 2.0's optim_state_dict /
// optim_state_dict_to_load with set_state_dict_type). As Python, new-model options
// (wrap_alt, use_orig_params, differing inputs) apply to the second model only.
void TestLoadOptimStateWithOptimStateDict(comm::ProcessGroup& group,
                                          const StateDictSettings& settings,
                                          const LoadOptimStateArgs& args);

// Python's `osd1 == osd2` (assertEqual of two state dicts): "" if equal, else the first
// difference. Python dicts compare without regard to order, so "state" keys, state names and
// hyper-parameter names may come in any order; lists ("param_groups", "params") may not.
std::string PyDictDiff(const OptimStateDict& expected, const OptimStateDict& actual);

// Records LibTorch warnings (TORCH_WARN) while installed with
// c10::WarningUtils::WarningHandlerGuard.
class WarningCapture : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override;
  const std::vector<std::string>& messages() const { return messages_; }

 private:
  std::vector<std::string> messages_;
};

}  // namespace fsdp::optim_state::port

#endif  // FSDP_CPP_TESTS_OPTIM_STATE_PORT_TESTUTIL_H_
