// The ckpt tool on real checkpoint files: inspect shows the kind and every tensor, verify
// passes a clean checkpoint and names each damaged range of a flipped one, and conversions
// sharded 3 -> full -> sharded 2 -> sharded 4 keep every value; on DCP directories PyTorch 2.13
// wrote (checkpoint/testdata/make_dcp_checkpoints.py): inspect shows the layout and chunks,
// verify passes them and refuses damaged copies naming file and tensor, convert to full keeps
// every value.
#include <sys/wait.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/dcp_reader.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/sharded_format.h"
#include "checkpoint/torch_load.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "optim_state/optim_state_dict.h"
#include "tools/python_testutil.h"

namespace fsdp::checkpoint {
namespace {

using ::fsdp::testing::IsOk;
using optim_state::OptimStateDict;
using optim_state::ParamKey;
using optim_state::StateValue;
using ::testing::HasSubstr;

std::string Tmp(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/ckpt_", name);
}

struct CkptRun {
  int exit_code;
  std::string output;
};

// Runs the ckpt binary with `args`; stdout and stderr together.
CkptRun Ckpt(const std::string& args) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const std::string bin =
      srcdir != nullptr ? absl::StrCat(srcdir, "/fsdp_cpp/tools/ckpt") : "tools/ckpt";
  FILE* p = popen(absl::StrCat(bin, " ", args, " 2>&1").c_str(), "r");
  CkptRun r{-1, ""};
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof(buf), p)) r.output.append(buf, n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::vector<std::pair<std::string, at::Tensor>> Model() {
  torch::manual_seed(0);
  return {{"layer.weight", torch::randn({32, 16})},
          {"layer.bias", torch::randn({16})},
          {"steps", torch::tensor(int64_t{5})}};
}

OptimStateDict Optim() {
  OptimStateDict d;
  optim_state::ParamState s;
  s.Set("exp_avg", StateValue(torch::randn({32, 16})));
  s.Set("step", StateValue(torch::tensor(4.0f)));
  s.Set("value1", StateValue(2.74));
  d.state.Set(ParamKey::Fqn("layer.weight"), s);
  optim_state::ParamGroup g;
  g.hyper_params.Set("lr", StateValue(0.01));
  g.params = {ParamKey::Fqn("layer.weight"), ParamKey::Fqn("layer.bias")};
  d.param_groups.push_back(g);
  return d;
}

void ExpectSameContents(const std::string& dir,
                        const std::vector<std::pair<std::string, at::Tensor>>& model,
                        const OptimStateDict& optim, bool sharded) {
  FullContents c;
  if (sharded) {
    auto reader = ShardedCheckpointReader::Open(dir);
    ASSERT_THAT(reader, IsOk());
    auto contents = ReadFullContents(**reader);
    ASSERT_THAT(contents, IsOk());
    c = *contents;
  } else {
    auto m = ReadModelStateDict(dir + "/model.pt");
    auto o = ReadOptimStateDict(dir + "/optim.pt");
    ASSERT_THAT(m, IsOk());
    ASSERT_THAT(o, IsOk());
    c.model = *m;
    c.optim = *o;
  }
  ASSERT_EQ(c.model.size(), model.size());
  for (size_t i = 0; i < model.size(); ++i) {
    EXPECT_EQ(c.model[i].first, model[i].first);
    EXPECT_TRUE(torch::equal(c.model[i].second, model[i].second)) << model[i].first;
  }
  EXPECT_EQ(optim_state::DiffOptimStateDicts(optim, c.optim), "") << dir;
}

TEST(Ckpt, InspectVerifyAndConvert) {
  const auto model = Model();
  const OptimStateDict optim = Optim();
  const std::string s3 = Tmp("s3"), full = Tmp("full"), s2 = Tmp("s2"), s4 = Tmp("s4");
  ASSERT_THAT(WriteShardedFromFull(s3, model, &optim, 3, 256), IsOk());

  CkptRun r = Ckpt("inspect " + s3);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("kind: sharded"));
  EXPECT_THAT(r.output, HasSubstr("world size: 3"));
  EXPECT_THAT(r.output, HasSubstr("layer.weight"));
  EXPECT_THAT(r.output, HasSubstr("exp_avg"));
  EXPECT_THAT(r.output, HasSubstr("[32, 16]"));
  EXPECT_THAT(r.output, HasSubstr("value1 = 2.74"));

  r = Ckpt("verify " + s3);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("OK"));

  r = Ckpt(absl::StrCat("convert --in=", s3, " --out=", full, " --to=full"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ExpectSameContents(full, model, optim, false);
  r = Ckpt("inspect " + full);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("kind: full"));

  r = Ckpt(absl::StrCat("convert --in=", full, " --out=", s2, " --to=sharded --world_size=2"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = Ckpt(absl::StrCat("convert --in=", s2, " --out=", s4,
                        " --to=sharded --world_size=4 --block_bytes=64"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ExpectSameContents(s4, model, optim, true);
  EXPECT_THAT(Ckpt("inspect " + s4).output, HasSubstr("world size: 4"));

  // Damage two blocks of rank 1's file.
  auto reader = ShardedCheckpointReader::Open(s4);
  ASSERT_THAT(reader, IsOk());
  const TensorRecord* t = (*reader)->metadata().FindTensor("model/layer.weight");
  const PieceRecord p = t->pieces[1];
  reader->reset();
  {
    std::fstream f(s4 + "/rank-1-of-4.safetensors",
                   std::ios::in | std::ios::out | std::ios::binary);
    for (int64_t at : {p.offset + 1, p.offset + 200}) {
      f.seekg(at);
      char c = 0;
      f.read(&c, 1);
      c ^= 0x40;
      f.seekp(at);
      f.write(&c, 1);
    }
  }
  r = Ckpt("verify " + s4);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_THAT(r.output,
              HasSubstr(absl::StrCat("BAD rank-1-of-4.safetensors bytes [", p.offset, ", ",
                                     p.offset + 64, ") tensor model/layer.weight")));
  EXPECT_THAT(r.output, HasSubstr(absl::StrCat("[", p.offset + 192, ", ", p.offset + 256, ")")));
  EXPECT_THAT(r.output, HasSubstr("2 bad range(s)"));

  // Conversions refuse a damaged input.
  r = Ckpt(absl::StrCat("convert --in=", s4, " --out=", Tmp("x"), " --to=full"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("checksum mismatch"));
  EXPECT_EQ(Ckpt("convert --in=" + s4).exit_code, 2);
  EXPECT_EQ(Ckpt("frobnicate").exit_code, 2);
  r = Ckpt("inspect " + Tmp("nonexistent"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("no such checkpoint directory"));
}

TEST(Ckpt, DcpDirectoriesOfPyTorch) {
  const std::string out = Tmp("dcp");
  ASSERT_THAT(RemoveTree(out), IsOk());
  const fsdp::testing::CommandResult made = fsdp::testing::RunCommand(
      absl::StrCat(fsdp::testing::PythonCommand(), " ",
                   fsdp::testing::Runfile("checkpoint/testdata/make_dcp_checkpoints.py"), " ", out,
                   " --single_process"));
  ASSERT_EQ(made.exit_code, 0) << made.output;
  const std::string dir = out + "/tutorial";

  CkptRun r = Ckpt("inspect " + dir);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("kind: dcp"));
  EXPECT_THAT(r.output, HasSubstr("layout: the DCP tutorial's"));
  EXPECT_THAT(r.output, HasSubstr("app.model.0.weight  Float (2, 3) 24 bytes, 1 chunk(s): "
                                  "[0,0]+[2,3]@__0_0.distcp"));
  EXPECT_THAT(r.output, HasSubstr("app.optim.param_groups.1.lr  bytes = 0.1"));

  r = Ckpt("verify " + dir);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr(": OK ("));
  r = Ckpt("verify " + out + "/damaged_dtype");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_THAT(r.output, HasSubstr("BAD "));
  EXPECT_THAT(r.output, HasSubstr("damaged_dtype/__0_0.distcp"));
  EXPECT_THAT(r.output, HasSubstr("tensor 'f32'"));
  r = Ckpt("verify " + out + "/damaged_hostile");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_THAT(r.output, HasSubstr("refusing to load global posix.system"));

  const std::string full = out + "/tutorial_full";
  r = Ckpt(absl::StrCat("convert --in=", dir, " --out=", full, " --to=full"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("converted dcp"));
  auto expected = TorchLoad(out + "/tutorial.expected.pt");
  ASSERT_THAT(expected, IsOk());
  const PyValue& values = *expected->Find("values");
  auto model = ReadModelStateDict(full + "/model.pt");
  ASSERT_THAT(model, IsOk());
  ASSERT_EQ(model->size(), 4u);
  for (const auto& [fqn, t] : *model) {
    EXPECT_TRUE(torch::equal(t, values.Find("app.model." + fqn)->as_tensor())) << fqn;
  }
  auto optim = ReadOptimStateDict(full + "/optim.pt");
  ASSERT_THAT(optim, IsOk());
  ASSERT_EQ(optim->param_groups.size(), 2u);
  EXPECT_EQ(optim->param_groups[1].hyper_params.Find("lr")->Get<double>(), 0.1);
  EXPECT_EQ(optim->param_groups[1].params.size(), 2u);
  const StateValue* avg = optim->state.Find(ParamKey::Fqn("2.weight"))->Find("exp_avg");
  ASSERT_NE(avg, nullptr);
  EXPECT_TRUE(torch::equal(avg->Get<at::Tensor>(),
                           values.Find("app.optim.state.2.weight.exp_avg")->as_tensor()));
}

// --to=dcp: a DCP directory as 2 ranks would write it, holding every value under torchtitan's
// keys (PyTorch's side of the format: //checkpoint:dcp_writer_test).
TEST(Ckpt, ConvertsToDcp) {
  const auto model = Model();
  const OptimStateDict optim = Optim();
  const std::string s3 = Tmp("dcp_s3"), out = Tmp("dcp_out");
  ASSERT_THAT(WriteShardedFromFull(s3, model, &optim, 3, 256), IsOk());
  CkptRun r = Ckpt(absl::StrCat("convert --in=", s3, " --out=", out, " --to=dcp --world_size=2"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("to dcp (world size 2)"));
  auto reader = dcp::DcpReader::Open(out);
  ASSERT_THAT(reader, IsOk());
  for (const auto& [fqn, t] : model) {
    auto got = (*reader)->ReadTensor("model." + fqn);
    ASSERT_THAT(got, IsOk());
    EXPECT_TRUE(torch::equal(*got, t)) << fqn;
  }
  auto exp_avg = (*reader)->ReadTensor("optimizer.state.layer.weight.exp_avg");
  ASSERT_THAT(exp_avg, IsOk());
  EXPECT_TRUE(torch::equal(
      *exp_avg,
      optim.state.Find(ParamKey::Fqn("layer.weight"))->Find("exp_avg")->Get<at::Tensor>()));
  auto value1 = (*reader)->ReadObject("optimizer.state.layer.weight.value1");
  ASSERT_THAT(value1, IsOk());
  EXPECT_EQ(value1->as_float(), 2.74);
  auto params = (*reader)->ReadObject("optimizer.param_groups.0.params");
  ASSERT_THAT(params, IsOk());
  EXPECT_EQ(params->DebugString(), "['layer.weight', 'layer.bias']");
  EXPECT_EQ(std::get<dcp::TensorStorageMetadata>(*(*reader)->metadata().Find("model.layer.weight"))
                .chunks.size(),
            2u);
  EXPECT_THAT(Ckpt(absl::StrCat("convert --in=", s3, " --out=", out, " --to=torch")).output,
              HasSubstr("--to must be full, sharded or dcp"));
}

}  // namespace
}  // namespace fsdp::checkpoint
