// The DCP writer against our reader and against PyTorch 2.13: a checkpoint of several dtypes,
// tensors cut into chunks written to two files (views of a larger flat buffer among them), a
// scalar, an empty tensor and non-tensor values reads back bit-equal through DcpReader, and
// through PyTorch's FileSystemReader, dcp_to_torch_save and dcp.load
// (testdata/check_dcp_written.py); every item has torch.save's records and data.pkl.
#include "checkpoint/dcp_writer.h"

#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "checkpoint/dcp_reader.h"
#include "checkpoint/file_testutil.h"
#include "checkpoint/full_checkpoint.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tools/python_testutil.h"

namespace fsdp::checkpoint::dcp {
namespace {

using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

bool SameBits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

// What the test writes: whole tensors by FQN, cut into chunks over two files.
struct Written {
  std::string dir;
  std::map<std::string, at::Tensor> tensors;
};

// Rows [begin, end) of `t` as a chunk.
ChunkToWrite Rows(const std::string& fqn, const at::Tensor& t, int64_t begin, int64_t end) {
  std::vector<int64_t> offsets(static_cast<size_t>(t.dim()), 0);
  offsets[0] = begin;
  return ChunkToWrite{fqn, t.sizes().vec(), offsets, t.narrow(0, begin, end - begin)};
}

Written WriteTestCheckpoint(const std::string& name) {
  Written w;
  w.dir = testing::FreshTestDir(name);
  std::filesystem::create_directories(w.dir);
  at::manual_seed(3);
  // "a.w" lives in a flat buffer, as a flat shard's parameters do.
  const at::Tensor flat = at::randn({50});
  w.tensors["a.w"] = flat.narrow(0, 5, 35).view({5, 7});
  w.tensors["a.b"] = at::randn({3, 2, 4}, at::kDouble);
  w.tensors["h"] = at::randn({9}).to(at::kBFloat16);
  w.tensors["i"] = at::arange(-6, 6, at::kLong).view({3, 4});
  w.tensors["flags"] = at::tensor({1, 0, 1}).to(at::kBool);
  w.tensors["state.a.w.step"] = at::scalar_tensor(4.0f);
  w.tensors["empty"] = at::zeros({0, 3});
  std::vector<ChunkToWrite> rank0 = {
      Rows("a.w", w.tensors["a.w"], 0, 2),
      Rows("a.b", w.tensors["a.b"], 0, 3),
      Rows("h", w.tensors["h"], 0, 4),
      Rows("i", w.tensors["i"], 0, 1),
      ChunkToWrite{"state.a.w.step", {}, {}, w.tensors["state.a.w.step"]},
      Rows("empty", w.tensors["empty"], 0, 0)};
  // A chunk that is not a row range: columns 3.. of rows 2-4.
  const at::Tensor aw = w.tensors["a.w"];
  std::vector<ChunkToWrite> rank1 = {
      ChunkToWrite{"a.w", {5, 7}, {2, 0}, aw.narrow(0, 2, 3).narrow(1, 0, 3)},
      ChunkToWrite{"a.w", {5, 7}, {2, 3}, aw.narrow(0, 2, 3).narrow(1, 3, 4)},
      Rows("h", w.tensors["h"], 4, 9), Rows("i", w.tensors["i"], 1, 3),
      Rows("flags", w.tensors["flags"], 0, 3)};
  std::vector<BytesToWrite> bytes = {{"g.0.lr", optim_state::StateValue(0.01)},
                                     {"g.0.betas", optim_state::StateValue::Tuple({0.9, 0.999})},
                                     {"g.0.foreach", optim_state::StateValue::None()},
                                     {"g.0.amsgrad", optim_state::StateValue(false)},
                                     {"g.0.params", optim_state::StateValue::List({"a.w", "a.b"})},
                                     {"n", optim_state::StateValue(int64_t{7})},
                                     {"s", optim_state::StateValue("hi")}};
  absl::StatusOr<std::vector<WrittenItem>> items0 =
      WriteDistcpFile(w.dir, DistcpFileName(0), bytes, rank0);
  absl::StatusOr<std::vector<WrittenItem>> items1 =
      WriteDistcpFile(w.dir, DistcpFileName(1), {}, rank1);
  EXPECT_TRUE(items0.ok()) << items0.status();
  EXPECT_TRUE(items1.ok()) << items1.status();
  if (!items0.ok() || !items1.ok()) return w;
  std::vector<WrittenItem> all = *items0;
  all.insert(all.end(), items1->begin(), items1->end());
  std::map<std::string, std::vector<PathElement>> planner;
  for (const auto& [fqn, t] : w.tensors) planner[fqn] = {fqn};
  planner["a.w"] = {"a", "w"};
  planner["a.b"] = {"a", "b"};
  for (const BytesToWrite& b : bytes) planner[b.fqn] = {b.fqn};
  planner["g.0.lr"] = {"g", int64_t{0}, "lr"};
  planner["g.0.betas"] = {"g", int64_t{0}, "betas"};
  absl::StatusOr<Metadata> m = AssembleMetadata(all, planner, w.dir);
  EXPECT_TRUE(m.ok()) << m.status();
  if (m.ok()) {
    EXPECT_TRUE(WriteMetadataFile(w.dir, *m).ok());
  }
  return w;
}

TEST(DcpWriter, OurReaderReadsWhatWeWrite) {
  const Written w = WriteTestCheckpoint("dcp_writer_ours");
  absl::StatusOr<std::unique_ptr<DcpReader>> reader = DcpReader::Open(w.dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  for (const auto& [fqn, t] : w.tensors) {
    absl::StatusOr<at::Tensor> got = (*reader)->ReadTensor(fqn);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(SameBits(*got, t)) << fqn;
  }
  absl::StatusOr<PyValue> betas = (*reader)->ReadObject("g.0.betas");
  ASSERT_TRUE(betas.ok()) << betas.status();
  EXPECT_EQ(betas->DebugString(), "(0.9, 0.999)");
  absl::StatusOr<PyValue> params = (*reader)->ReadObject("g.0.params");
  ASSERT_TRUE(params.ok()) << params.status();
  EXPECT_EQ(params->DebugString(), "['a.w', 'a.b']");
  const Metadata& m = (*reader)->metadata();
  EXPECT_EQ(m.version, "1.0.0");
  ASSERT_EQ(m.planner_data.at("g.0.lr").size(), 3u);
  EXPECT_EQ(std::get<int64_t>(m.planner_data.at("g.0.lr")[1]), 0);
  // The chunks of a.w: rows 0-1 from file 0, then the two boxes of file 1, in that order.
  const auto& aw = std::get<TensorStorageMetadata>(*m.Find("a.w"));
  ASSERT_EQ(aw.chunks.size(), 3u);
  EXPECT_EQ(aw.chunks[2].offsets, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(m.FindStorage("a.w", std::vector<int64_t>{2, 3})->relative_path, "__1_0.distcp");
}

TEST(DcpWriter, PyTorchReadsWhatWeWrite) {
  const Written w = WriteTestCheckpoint("dcp_writer_pytorch");
  ModelStateDict expected(w.tensors.begin(), w.tensors.end());
  const std::string expected_path = w.dir + ".expected.pt";
  ASSERT_TRUE(WriteModelStateDict(expected, expected_path).ok());
  const fsdp::testing::PythonLines out = fsdp::testing::RunPythonScriptLines(
      "checkpoint/testdata/check_dcp_written.py " + w.dir + " " + expected_path,
      {"items", "mismatch", "tensor", "loaded", "value"});
  ASSERT_EQ(out.result.exit_code, 0) << out.result.output;
  const std::vector<std::string> want = {
      "items 18 records_equal 18",
      "tensor a.b equal",
      "tensor a.w equal",
      "tensor empty equal",
      "tensor flags equal",
      "value g.0.amsgrad False",
      "value g.0.betas (0.9, 0.999)",
      "value g.0.foreach None",
      "value g.0.lr 0.01",
      "value g.0.params ['a.w', 'a.b']",
      "tensor h equal",
      "tensor i equal",
      "value n 7",
      "value s 'hi'",
      "tensor state.a.w.step equal",
      "loaded a.b equal",
      "loaded a.w equal",
      "loaded empty equal",
      "loaded flags equal",
      "loaded h equal",
      "loaded i equal",
      "loaded state.a.w.step equal",
  };
  EXPECT_EQ(out.lines, want) << out.result.output;
}

TEST(DcpWriter, RefusesInconsistentItems) {
  WrittenItem a{MetadataIndex{"w", std::vector<int64_t>{0}, std::nullopt},
                StorageInfo{"__0_0.distcp", 0, 10, {}},
                at::kFloat,
                {4},
                {2}};
  WrittenItem b = a;
  b.index.offset = std::vector<int64_t>{2};
  b.size = {5};
  EXPECT_THAT(AssembleMetadata({a, b}, {}, "d").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("entry 'w'")));
  // Chunks that leave a gap are refused by the validation.
  b.size = {4};
  b.index.offset = std::vector<int64_t>{3};
  b.sizes = {1};
  EXPECT_THAT(AssembleMetadata({a, b}, {}, "d").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'w'")));
}

TEST(DcpWriter, WriteErrorNamesTheFile) {
  const std::string dir = testing::FreshTestDir("dcp_writer_missing") + "/no/such/dir";
  EXPECT_THAT(WriteDistcpFile(dir, DistcpFileName(2), {}, {}).status(),
              StatusIs(absl::StatusCode::kInternal, HasSubstr(dir + "/__2_0.distcp")));
}

TEST(DcpWriter, WholeCheckpointIsCommittedAtomically) {
  const std::string dir = testing::FreshTestDir("dcp_writer_whole");
  WholeEntries entries;
  entries.tensors = {{"model.w", at::randn({5, 3})}};
  entries.bytes = {{"optimizer.param_groups.0.lr", optim_state::StateValue(0.5)}};
  entries.planner_data = {
      {"model.w", {"model", "w"}},
      {"optimizer.param_groups.0.lr", {"optimizer", "param_groups", int64_t{0}, "lr"}}};
  // As 2 ranks would save it: elements [0, 8) (rows 0-1, then row 2's first two) and [8, 15).
  ASSERT_TRUE(WriteWholeDcpCheckpoint(dir, entries, 2).ok());
  absl::StatusOr<std::unique_ptr<DcpReader>> reader = DcpReader::Open(dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  const auto& chunks =
      std::get<TensorStorageMetadata>(*(*reader)->metadata().Find("model.w")).chunks;
  ASSERT_EQ(chunks.size(), 4u);
  EXPECT_EQ(chunks[1].offsets, (std::vector<int64_t>{2, 0}));
  EXPECT_EQ(chunks[1].sizes, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ((*reader)->metadata().FindStorage("model.w", chunks[2].offsets)->relative_path,
            "__1_0.distcp");
  absl::StatusOr<at::Tensor> w = (*reader)->ReadTensor("model.w");
  ASSERT_TRUE(w.ok());
  EXPECT_TRUE(SameBits(*w, entries.tensors[0].second));
  // An unstorable value fails before the directory changes: the old checkpoint stays.
  WholeEntries bad = entries;
  bad.tensors[0].second = at::zeros({2});
  bad.bytes.push_back({"x", optim_state::StateValue(optim_state::ShardedTensorValue{})});
  EXPECT_THAT(WriteWholeDcpCheckpoint(dir, bad),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bytes entry 'x'")));
  reader = DcpReader::Open(dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  w = (*reader)->ReadTensor("model.w");
  ASSERT_TRUE(w.ok());
  EXPECT_TRUE(SameBits(*w, entries.tensors[0].second));
}

}  // namespace
}  // namespace fsdp::checkpoint::dcp
