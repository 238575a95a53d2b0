// LocalShardedOptimStateDict against FSDP2's get_optimizer_state_dict, live: PyTorch 2.13's
// fully_shard (fsdp_peer.py under torchrun, CPU/Gloo) and our FSDP train NestedModel (the
// `wrap` units) from the same seeds on the same batches at world size 2, where both are exact
// in float32. FSDP2 dumps its sharded optimizer state dict (each rank's DTensor local shards at
// their global offsets) with dcp.save (fsdp_peer.py --save_format=dcp); ReadDcpFullContents
// puts each state back at its global indices. Then, on our ranks:
//   * every element our local dict's boxes hold equals the element at the same global index of
//     FSDP2's state, bit for bit, and the boxes of both ranks together cover every element of
//     every state exactly once (counted per element, summed over the ranks);
//   * the state keys (FQNs), each parameter's state names, `step` (bit for bit) and the
//     param_groups (each hyper-parameter, the FQNs listed) are FSDP2's.
// RMSprop: its update is the same sequence of operations in LibTorch and torch.optim, so the
// state can be asked bit for bit (Adam's moving averages round differently: mul_/add_ in
// LibTorch, lerp_ in torch.optim; README "Checked against PyTorch 2.13 itself").
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/dcp_load.h"
#include "comm/multiprocess_testutil.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "optim_state/local_sharded_optim_state.h"
#include "optim_state/optimizer_adapter.h"
#include "tools/python_testutil.h"

namespace fsdp {
namespace {

namespace os = ::fsdp::optim_state;
namespace ft = ::fsdp::testing;

constexpr int kWorldSize = 2;
constexpr int kSteps = 3;
constexpr double kLr = 0.01;

// examples/train's --model=nested --wrap=wrap job: manual_seed(0), then per step one batch
// (the same on every rank), loss, backward, an RMSprop step through the adapter.
struct Job {
  models::NestedModel net;
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::optional<os::OptimizerAdapter> adapter;
};

void Train(comm::ProcessGroup& group, Job& job) {
  FsdpOptions options;
  options.nested = job.net->wrap_slots();
  options.wrap_root = false;
  auto shared = std::shared_ptr<comm::ProcessGroup>(&group, [](comm::ProcessGroup*) {});
  FSDP_ASSERT_OK_AND_ASSIGN(job.fsdp, FullyShardedDataParallel::Wrap(job.net, shared, options));
  job.optimizer = std::make_unique<torch::optim::RMSprop>(job.fsdp->parameters(),
                                                          torch::optim::RMSpropOptions(kLr));
  FSDP_ASSERT_OK_AND_ASSIGN(job.adapter, os::OptimizerAdapter::Create(*job.optimizer));
  torch::manual_seed(0);
  for (int step = 0; step < kSteps; ++step) {
    job.optimizer->zero_grad();
    torch::Tensor input = job.net->get_input();
    job.net->get_loss(input, job.fsdp->forward(input)).backward();
    FSDP_ASSERT_OK(job.adapter->Step());
  }
}

bool SameBits(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         a.reshape({-1}).view(at::kByte).equal(b.reshape({-1}).view(at::kByte));
}

// The box [offsets, offsets + sizes) of `full`.
at::Tensor Box(at::Tensor full, const std::vector<int64_t>& offsets, at::IntArrayRef sizes) {
  for (size_t d = 0; d < offsets.size(); ++d) {
    full = full.narrow(static_cast<int64_t>(d), offsets[d], sizes[d]);
  }
  return full;
}

// Our sharded value's boxes against FSDP2's whole state `theirs`; `count` (theirs' shape, int)
// gains 1 at every element a box holds.
void CheckBoxes(const std::string& what, const os::ShardedTensorValue& v, const at::Tensor& theirs,
                at::Tensor& count) {
  EXPECT_EQ(at::IntArrayRef(v.global_shape), theirs.sizes()) << what;
  if (at::IntArrayRef(v.global_shape) != theirs.sizes()) return;
  std::vector<std::pair<const at::Tensor*, const std::vector<int64_t>*>> boxes{
      {&v.local, &v.offsets}};
  for (const auto& s : v.more_shards) boxes.emplace_back(&s.local, &s.offsets);
  for (const auto& [local, offsets] : boxes) {
    EXPECT_TRUE(SameBits(*local, Box(theirs, *offsets, local->sizes())))
        << what << " at offsets " << at::IntArrayRef(*offsets) << ": " << *local << " vs "
        << Box(theirs, *offsets, local->sizes());
    Box(count, *offsets, local->sizes()).add_(1);
  }
}

std::set<std::string> Names(const os::ParamState& state) {
  std::set<std::string> names;
  for (const auto& [name, value] : state) names.insert(name);
  return names;
}

// The state of `ours` against FSDP2's (`theirs`): keys, names, `step`, every box's elements,
// and each element held by exactly one rank (a collective). Returns this rank's boxes.
int64_t CheckState(comm::ProcessGroup& group, const os::OptimStateDict& ours,
                   const os::OptimStateDict& theirs) {
  // Keys and state names.
  std::set<std::string> our_keys, their_keys;
  for (const auto& [key, st] : ours.state) our_keys.insert(key.fqn());
  for (const auto& [key, st] : theirs.state) their_keys.insert(key.fqn());
  EXPECT_EQ(our_keys, their_keys);

  // Every box's elements, and how often each element is held (summed over the ranks below).
  std::map<std::string, at::Tensor> counts;  // "<fqn>/<name>"
  int64_t boxes = 0;
  for (const auto& [key, st] : ours.state) {
    const os::ParamState* their_st = theirs.state.Find(key);
    if (their_st == nullptr) continue;
    EXPECT_EQ(Names(st), Names(*their_st)) << key.fqn();
    for (const auto& [name, value] : st) {
      const os::StateValue* their_value = their_st->Find(name);
      if (their_value == nullptr || !their_value->Is<at::Tensor>()) continue;
      const at::Tensor& t = their_value->Get<at::Tensor>();
      const std::string what = absl::StrCat(key.fqn(), " ", name, ", rank ", group.rank());
      if (const os::ShardedTensorValue* v = value.GetIf<os::ShardedTensorValue>()) {
        at::Tensor& count = counts[absl::StrCat(key.fqn(), "/", name)];
        count = at::zeros(t.sizes(), at::kInt);
        CheckBoxes(what, *v, t, count);
        boxes += 1 + static_cast<int64_t>(v->more_shards.size());
      } else {
        EXPECT_TRUE(value.Is<at::Tensor>()) << what;  // `step`
        if (!value.Is<at::Tensor>()) continue;
        EXPECT_TRUE(SameBits(value.Get<at::Tensor>(), t))
            << what << ": " << value.Get<at::Tensor>() << " vs " << t;
      }
    }
  }
  for (auto& [what, count] : counts) {
    at::Tensor flat = count.reshape({-1}).clone();
    EXPECT_THAT(group.AllReduce(flat, comm::ReduceOp::kSum), ft::IsOk());
    EXPECT_TRUE(flat.eq(1).all().item<bool>())
        << what << ": elements held by no rank or by several: " << flat;
  }
  return boxes;
}

// param_groups: every hyper-parameter FSDP2 names, with its value; the FQNs listed.
void CheckParamGroups(const os::OptimStateDict& ours, const os::OptimStateDict& theirs) {
  ASSERT_EQ(ours.param_groups.size(), theirs.param_groups.size());
  for (size_t g = 0; g < ours.param_groups.size(); ++g) {
    const auto& mine = ours.param_groups[g];
    const auto& their = theirs.param_groups[g];
    EXPECT_EQ(Names(mine.hyper_params), Names(their.hyper_params)) << "param_groups[" << g << "]";
    for (const auto& [name, value] : their.hyper_params) {
      const os::StateValue* v = mine.hyper_params.Find(name);
      if (v != nullptr) {
        EXPECT_TRUE(*v == value) << "param_groups[" << g << "] " << name;
      }
    }
    std::set<std::string> mine_params, their_params;
    for (const os::ParamKey& k : mine.params) mine_params.insert(k.ToString());
    for (const os::ParamKey& k : their.params) their_params.insert(k.ToString());
    EXPECT_EQ(mine_params, their_params) << "param_groups[" << g << "]";
  }
}

TEST(LocalShardedOptimStateDictPeer, BoxesHoldFsdp2sElementsBitForBit) {
  const std::string dir = ::testing::TempDir() + "fsdp2_dcp";
  if (!ft::IsRankProcess()) {
    const ft::CommandResult py = ft::RunCommand(absl::StrCat(
        ft::PythonCommand(), " ", ft::Runfile("tests/pytorch_peer/fsdp_peer.py"),
        " --nproc_per_node=", kWorldSize, " --models_dir=", ft::Runfile("models/testdata"),
        " --fsdp=2 --model=nested --wrap=wrap --optimizer=rmsprop --lr=", kLr, " --steps=", kSteps,
        " --save_format=dcp --save_dir=", dir));
    ASSERT_EQ(py.exit_code, 0) << py.output;
  }
  ft::RunInRanks(kWorldSize, [dir](comm::ProcessGroup& group) {
    Job job;
    ASSERT_NO_FATAL_FAILURE(Train(group, job));
    FSDP_ASSERT_OK_AND_ASSIGN(os::OptimStateDict ours,
                              os::LocalShardedOptimStateDict(*job.fsdp, *job.adapter));
    FSDP_ASSERT_OK_AND_ASSIGN(checkpoint::FullContents fsdp2,
                              checkpoint::dcp::ReadDcpFullContents(dir));
    ASSERT_TRUE(fsdp2.has_optim);
    const int64_t boxes = CheckState(group, ours, fsdp2.optim);
    EXPECT_GT(boxes, 0);
    CheckParamGroups(ours, fsdp2.optim);
    std::printf("rank %d: %ld boxes, checked bit for bit against FSDP2\n", group.rank(),
                static_cast<long>(boxes));
  });
}

}  // namespace
}  // namespace fsdp
