// LoadShardedCheckpoint of DCP directories PyTorch 2.13 wrote (checkpoint/testdata/
// make_dcp_checkpoints.py, once per test binary: FSDP2 model + Adam from 2 ranks in torchtitan's
// layout) into our FSDP job of the same model at world sizes 2 and 3 (flat shards cutting the
// weights mid-row): the loaded model and optimizer state equal what PyTorch saved bit for bit.
// Damaged directories (a truncated or missing .distcp, .metadata with out-of-range offsets or
// naming a missing file, a hostile pickle, another model's checkpoint) are refused on every rank
// naming the file and the tensor or global, and leave model and optimizer as they were, bit for
// bit. ReadDcpFullContents reads the same values offline.
#include "checkpoint/dcp_load.h"

#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint_testutil.h"
#include "checkpoint/file_testutil.h"
#include "checkpoint/sharded_checkpoint.h"
#include "checkpoint/torch_load.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tools/python_testutil.h"

namespace fsdp::checkpoint::dcp {
namespace {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::IsRankProcess;
using ::testing::HasSubstr;
namespace ckpt = ::fsdp::checkpoint::testing;

// make_dcp_checkpoints.py's FSDP2 model: Linear(6, 5), ReLU, Linear(5, 7), ReLU, Linear(7, 1),
// named as torch.nn.Sequential names them.
class MlpImpl : public torch::nn::Module {
 public:
  MlpImpl()
      : a(register_module("0", torch::nn::Linear(6, 5))),
        b(register_module("2", torch::nn::Linear(5, 7))),
        c(register_module("4", torch::nn::Linear(7, 1))) {}
  torch::Tensor forward(torch::Tensor x) {
    return c->forward(torch::relu(b->forward(torch::relu(a->forward(x)))));
  }
  torch::nn::Linear a, b, c;
};
TORCH_MODULE(Mlp);

// The FSDP wrapper owns the model.
struct Job {
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::unique_ptr<torch::optim::Adam> optim;
  std::unique_ptr<optim_state::OptimizerAdapter> adapter;
};

// Wrapped at the root only (one flat parameter cut across the weights), one Adam step taken
// on values that differ from the checkpoint's.
std::unique_ptr<Job> MakeJob(comm::ProcessGroup& group) {
  auto job = std::make_unique<Job>();
  torch::manual_seed(7);
  auto fsdp = FullyShardedDataParallel::Wrap(Mlp(), ckpt::Borrow(group), {});
  EXPECT_THAT(fsdp, IsOk());
  if (!fsdp.ok()) return nullptr;
  job->fsdp = std::move(*fsdp);
  job->optim = std::make_unique<torch::optim::Adam>(job->fsdp->parameters(),
                                                    torch::optim::AdamOptions(0.01));
  auto adapter = optim_state::OptimizerAdapter::Create(*job->optim);
  EXPECT_THAT(adapter, IsOk());
  if (!adapter.ok()) return nullptr;
  job->adapter = std::make_unique<optim_state::OptimizerAdapter>(std::move(*adapter));
  job->fsdp->forward(torch::randn({3, 6})).sum().backward();
  EXPECT_THAT(job->adapter->Step(), IsOk());
  return job;
}

bool SameBits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

// The script's output directory (run once by the test process; rank processes find it there).
std::string OutDir() { return ckpt::TmpDir("dcp_load_files"); }

void WriteCheckpoints() {
  static bool written = false;  // once per test binary
  if (written) return;
  written = true;
  std::filesystem::remove_all(OutDir());
  const std::string script = fsdp::testing::Runfile("checkpoint/testdata/make_dcp_checkpoints.py");
  const fsdp::testing::CommandResult r = fsdp::testing::RunCommand(
      fsdp::testing::PythonCommand() + " '" + script + "' '" + OutDir() + "'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // Damage of our own to the FSDP2 directory: a truncated and a missing .distcp file.
  for (const char* name : {"truncated", "missing"}) {
    const std::string dir = absl::StrCat(OutDir(), "/fsdp2_", name);
    std::filesystem::copy(OutDir() + "/fsdp2", dir);
  }
  const std::string cut = OutDir() + "/fsdp2_truncated/__1_0.distcp";
  ASSERT_EQ(truncate(cut.c_str(), static_cast<off_t>(std::filesystem::file_size(cut) - 100)), 0);
  ASSERT_EQ(unlink((OutDir() + "/fsdp2_missing/__0_0.distcp").c_str()), 0);
}

// What PyTorch saved: DCP's flattened keys -> values.
const PyValue& Expected() {
  static const PyValue* values = [] {
    auto loaded = TorchLoad(OutDir() + "/fsdp2.expected.pt");
    EXPECT_THAT(loaded, IsOk());
    return new PyValue(loaded.ok() ? *std::move(loaded) : PyValue());
  }();
  return *values->Find("values");
}

void ExpectSavedState(Job& job) {
  auto model = FullStateDict(*job.fsdp, {.rank0_only = false});
  ASSERT_THAT(model, IsOk());
  for (const auto& [fqn, tensor] : *model) {
    const PyValue* saved = Expected().Find("model." + fqn);
    ASSERT_NE(saved, nullptr) << fqn;
    EXPECT_TRUE(SameBits(tensor, saved->as_tensor())) << fqn;
  }
  auto optim = optim_state::FullOptimStateDict(*job.fsdp, *job.adapter, {.rank0_only = false});
  ASSERT_THAT(optim, IsOk());
  size_t compared = 0;
  for (const auto& [key, state] : optim->state) {
    for (const auto& [name, value] : state) {
      const PyValue* saved =
          Expected().Find(absl::StrCat("optimizer.state.", key.fqn(), ".", name));
      ASSERT_NE(saved, nullptr) << key.fqn() << " " << name;
      ASSERT_TRUE(value.Is<at::Tensor>()) << key.fqn() << " " << name;
      EXPECT_TRUE(SameBits(value.Get<at::Tensor>(), saved->as_tensor())) << key.fqn() << name;
      ++compared;
    }
  }
  EXPECT_EQ(compared, 18u);  // 6 parameters x step, exp_avg, exp_avg_sq
  EXPECT_EQ(optim->param_groups.at(0).hyper_params.Find("lr")->Get<double>(), 0.01);
}

TEST(DcpLoad, PyTorchFsdp2CheckpointLoadsBitForBitAtWorldSizes2And3) {
  if (!IsRankProcess()) WriteCheckpoints();
  for (int ws : {2, 3}) {
    ckpt::RunPhase(ws, ws, [&](comm::ProcessGroup& group) {
      auto job = MakeJob(group);
      ASSERT_NE(job, nullptr);
      // At 3, the layout named rather than detected.
      const LoadShardedOptions options{.dcp_layout = ws == 3 ? "model=model,optim=optimizer" : ""};
      auto loaded =
          LoadShardedCheckpoint(OutDir() + "/fsdp2", *job->fsdp, job->adapter.get(), options);
      ASSERT_THAT(loaded, IsOk());
      EXPECT_GT(loaded->read.bytes_read, 0);
      ExpectSavedState(*job);
    });
  }
  if (IsRankProcess()) return;
  // Offline, whole.
  DcpLayout layout;
  auto full = ReadDcpFullContents(OutDir() + "/fsdp2", "", &layout);
  ASSERT_THAT(full, IsOk());
  EXPECT_EQ(layout.name, "torchtitan");
  ASSERT_EQ(full->model.size(), 6u);
  for (const auto& [fqn, tensor] : full->model) {
    EXPECT_TRUE(SameBits(tensor, Expected().Find("model." + fqn)->as_tensor())) << fqn;
  }
  EXPECT_EQ(full->optim.state.size(), 6u);
  ASSERT_EQ(full->optim.param_groups.size(), 1u);
  EXPECT_EQ(full->optim.param_groups[0].params.size(), 6u);
}

struct Damage {
  std::string dir;
  absl::StatusCode code;
  std::vector<std::string> substrings;
  std::string layout = "";  // LoadShardedOptions::dcp_layout
};

TEST(DcpLoad, DamagedCheckpointsAreRefusedOnEveryRankAndChangeNothing) {
  using C = absl::StatusCode;
  const std::vector<Damage> damages = {
      {"fsdp2_truncated",
       C::kDataLoss,
       {"fsdp2_truncated/__1_0.distcp", "truncated", "'optimizer."}},
      {"fsdp2_missing", C::kNotFound, {"fsdp2_missing/__0_0.distcp", "places tensor '"}},
      {"damaged_storage_offset", C::kDataLoss, {"damaged_storage_offset/__0_0.distcp", "'f32'"}},
      {"damaged_missing_file", C::kNotFound, {"damaged_missing_file/__9_0.distcp", "tensor '"}},
      {"damaged_hostile",
       C::kInvalidArgument,
       {"damaged_hostile/.metadata", "refusing to load global posix.system"}},
      {"plain", C::kInvalidArgument, {"plain/.metadata", "no known layout"}},
      {"tutorial",
       C::kInvalidArgument,
       {"tutorial/.metadata does not fit the model", "Missing key(s) in state_dict: \"4.weight\"",
        "size mismatch for 0.weight: copying a param with shape torch.Size([2, 3]) from "
        "checkpoint, the shape in current model is torch.Size([5, 6])."}},
      // An intact checkpoint under a layout named wrongly: the model finds none of its keys.
      {"fsdp2",
       C::kInvalidArgument,
       {"fsdp2/.metadata does not fit the model", "Missing key(s) in state_dict: \"0.weight\""},
       "tutorial"},
      {"fsdp2", C::kInvalidArgument, {"DCP layout \"app.model\""}, "app.model"},
  };
  if (!IsRankProcess()) WriteCheckpoints();
  ckpt::RunPhase(1, 2, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(group);
    ASSERT_NE(job, nullptr);
    for (const Damage& d : damages) {
      SCOPED_TRACE(d.dir + " " + d.layout);
      std::vector<at::Tensor> before;
      for (const at::Tensor& p : job->fsdp->parameters()) before.push_back(p.detach().clone());
      auto optim_before = job->adapter->StateDict();
      ASSERT_THAT(optim_before, IsOk());
      const optim_state::OptimStateDict saved = optim_state::CloneOptimStateDict(*optim_before);
      auto loaded = LoadShardedCheckpoint(OutDir() + "/" + d.dir, *job->fsdp, job->adapter.get(),
                                          {.dcp_layout = d.layout});
      EXPECT_THAT(loaded, ::fsdp::testing::StatusIs(d.code, HasSubstr("LoadShardedCheckpoint")));
      for (const std::string& s : d.substrings)
        EXPECT_THAT(loaded, ::fsdp::testing::StatusIs(d.code, HasSubstr(s)));
      const std::vector<at::Tensor> after = job->fsdp->parameters();
      ASSERT_EQ(after.size(), before.size());
      for (size_t i = 0; i < after.size(); ++i) EXPECT_TRUE(SameBits(after[i], before[i])) << i;
      auto optim_after = job->adapter->StateDict();
      ASSERT_THAT(optim_after, IsOk());
      EXPECT_EQ(optim_state::DiffOptimStateDicts(saved, *optim_after), "");
    }
  });
}

}  // namespace
}  // namespace fsdp::checkpoint::dcp
