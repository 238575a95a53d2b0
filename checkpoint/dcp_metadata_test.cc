// ParseMetadata and ValidateMetadata on .metadata files PyTorch 2.13 wrote (the checked-in
// seeds of dcp_metadata_fuzz, made by checkpoint/fuzz/make_dcp_corpus.sh): the data model's
// values, hostile and cut pickles refused naming the file and the global, and each check of
// ValidateMetadata failing on one change to a real file's metadata, naming the file and FQN.
#include "checkpoint/dcp_metadata.h"

#include <functional>
#include <string>

#include "checkpoint/file_testutil.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tools/python_testutil.h"

namespace fsdp::checkpoint::dcp {
namespace {

using ::fsdp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace std::string_literals;

std::string Seed(const std::string& name) {
  return testing::ReadFileBytes(fsdp::testing::Runfile(
      "checkpoint/testdata/fuzz_corpus/dcp_metadata/seed_" + name + ".metadata"));
}

Metadata ParsedSeed(const std::string& name) {
  absl::StatusOr<Metadata> m = ParseMetadata(Seed(name), name + "/.metadata");
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : Metadata();
}

TEST(DcpMetadata, ReadsFsdp2ModelAndAdamState) {
  const Metadata m = ParsedSeed("fsdp2");
  EXPECT_EQ(m.state_dict_metadata.size(), 36u);
  const auto& w = std::get<TensorStorageMetadata>(*m.Find("model.0.weight"));
  EXPECT_EQ(w.properties.dtype, at::kFloat);
  EXPECT_EQ(w.properties.layout, "torch.strided");
  EXPECT_EQ(w.properties.memory_format, MemoryFormat::kContiguous);
  EXPECT_THAT(w.size, ElementsAre(5, 6));
  ASSERT_EQ(w.chunks.size(), 2u);
  EXPECT_THAT(w.chunks[1].offsets, ElementsAre(3, 0));
  EXPECT_THAT(w.chunks[1].sizes, ElementsAre(2, 6));
  const StorageInfo* s = m.FindStorage("model.0.weight", w.chunks[1].offsets);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->relative_path, "__1_0.distcp");
  EXPECT_GT(s->length, 0);
  EXPECT_TRUE(s->transform_descriptors.empty());
  const auto& step = std::get<TensorStorageMetadata>(*m.Find("optimizer.state.0.weight.step"));
  EXPECT_TRUE(step.size.empty());
  ASSERT_EQ(step.chunks.size(), 1u);
  EXPECT_TRUE(std::holds_alternative<BytesStorageMetadata>(*m.Find("optimizer.param_groups.0.lr")));
  EXPECT_NE(m.FindStorage("optimizer.param_groups.0.lr", std::nullopt), nullptr);
  EXPECT_EQ(m.FindStorage("optimizer.param_groups.0.lr", std::vector<int64_t>{0}), nullptr);
  ASSERT_EQ(m.planner_data.count("model.0.weight"), 1u);
  EXPECT_THAT(m.planner_data.at("model.0.weight"),
              ElementsAre(PathElement("model"), PathElement("0.weight")));
  EXPECT_EQ(m.version, "1.0.0");
  ASSERT_TRUE(m.storage_meta.has_value());
  EXPECT_TRUE(m.storage_meta->checkpoint_id.has_value());
  EXPECT_TRUE(m.storage_meta->save_id.has_value());
  EXPECT_FALSE(m.storage_meta->load_id.has_value());
}

TEST(DcpMetadata, ReadsEveryDtypeOfThePlainStateDict) {
  const Metadata m = ParsedSeed("plain");
  const std::pair<const char*, at::ScalarType> kDtypes[] = {
      {"f32", at::kFloat}, {"f64", at::kDouble}, {"f16", at::kHalf}, {"bf16", at::kBFloat16},
      {"i64", at::kLong},  {"i32", at::kInt},    {"u8", at::kByte},  {"b", at::kBool}};
  for (const auto& [fqn, dtype] : kDtypes) {
    EXPECT_EQ(std::get<TensorStorageMetadata>(*m.Find(fqn)).properties.dtype, dtype) << fqn;
  }
  EXPECT_THAT(m.planner_data.at("nested.deeper.step"),
              ElementsAre(PathElement("nested"), PathElement("deeper"), PathElement("step")));
  EXPECT_TRUE(std::holds_alternative<BytesStorageMetadata>(*m.Find("nested.deeper.name")));
}

struct HostilePickle {
  std::string name;
  std::string pickle;
  std::string global;
};

class HostileMetadata : public ::testing::TestWithParam<HostilePickle> {};

TEST_P(HostileMetadata, IsRefusedNamingTheGlobalAndTheFile) {
  EXPECT_THAT(ParseMetadata(GetParam().pickle, "ckpt/.metadata"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("ckpt/.metadata"),
                             HasSubstr("refusing to load global " + GetParam().global))));
}

INSTANTIATE_TEST_SUITE_P(
    Pickles, HostileMetadata,
    ::testing::Values(
        // os.system('true'), protocol 4 (STACK_GLOBAL) and protocol 2 (GLOBAL).
        HostilePickle{"OsSystemProtocol4",
                      "\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R."s, "os.system"},
        HostilePickle{"PosixSystemProtocol2",
                      "\x80\x02"
                      "cposix\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R."s,
                      "posix.system"},
        HostilePickle{"BuiltinsEval",
                      "\x80\x02"
                      "c__builtin__\neval\nX\x01\x00\x00\x001\x85R."s,
                      "builtins.eval"},
        // A global of torch's own that dcp.save does not write.
        HostilePickle{"TorchLoad", "\x80\x04\x8c\x05torch\x8c\x04load\x93."s, "torch.load"}),
    [](const auto& info) { return info.param.name; });

// The hostile seed: a real .metadata whose planner_data holds an os.system call.
TEST(DcpMetadata, RefusesARealFileWithAHostileObject) {
  EXPECT_THAT(ParseMetadata(Seed("damaged_hostile"), "evil/.metadata"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("evil/.metadata"), HasSubstr("posix.system"))));
}

TEST(DcpMetadata, RefusesACutPickle) {
  const std::string seed = Seed("fsdp2");
  EXPECT_THAT(ParseMetadata(seed.substr(0, seed.size() / 2), "cut/.metadata"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("cut/.metadata")));
}

struct Change {
  std::string name;
  std::function<void(Metadata&)> apply;
  std::string what;  // in the message, beside the file
};

TensorStorageMetadata& Tensor(Metadata& m, const std::string& fqn) {
  return std::get<TensorStorageMetadata>(m.state_dict_metadata.at(fqn));
}
StorageInfo& Storage(Metadata& m, const std::string& fqn) {
  for (auto& [index, info] : m.storage_data) {
    if (index.fqn == fqn) return info;
  }
  return m.storage_data.begin()->second;
}

// Sets chunk k's sizes (or offsets) of tensor `fqn`.
std::function<void(Metadata&)> ChunkSizes(std::string fqn, size_t k, std::vector<int64_t> v) {
  return [=](Metadata& m) { Tensor(m, fqn).chunks[k].sizes = v; };
}
std::function<void(Metadata&)> ChunkOffsets(std::string fqn, size_t k, std::vector<int64_t> v) {
  return [=](Metadata& m) { Tensor(m, fqn).chunks[k].offsets = v; };
}

class InvalidMetadata : public ::testing::TestWithParam<Change> {};

TEST_P(InvalidMetadata, IsRefusedNamingTheFileAndTheEntry) {
  Metadata m = ParsedSeed("fsdp2");
  ASSERT_TRUE(ValidateMetadata(m, "ok/.metadata").ok());
  GetParam().apply(m);
  EXPECT_THAT(ValidateMetadata(m, "bad/.metadata"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("bad/.metadata"), HasSubstr(GetParam().what))));
}

INSTANTIATE_TEST_SUITE_P(
    OneChange, InvalidMetadata,
    ::testing::Values(
        Change{"ChunkOutsideTheTensor", ChunkSizes("model.0.weight", 1, {3, 6}),
               "tensor 'model.0.weight': chunk 1 (offsets (3, 0), sizes (3, 6)) reaches outside"},
        Change{"ChunkOfOtherDimensions", ChunkSizes("model.0.bias", 0, {3, 1}),
               "tensor 'model.0.bias': chunk 0"},
        Change{"NegativeOffset", ChunkOffsets("model.2.bias", 0, {-1}), "tensor 'model.2.bias'"},
        Change{"ChunksOverlap", ChunkSizes("model.2.weight", 0, {5, 5}),  // rows 0-4 and 4-6
               "tensor 'model.2.weight': chunks 0 and 1 overlap"},
        Change{"ChunksLeaveAGap", ChunkSizes("model.2.weight", 0, {3, 5}),
               "tensor 'model.2.weight': the chunks hold 30 of the 35 elements"},
        Change{"ScalarInTwoChunks",
               [](Metadata& m) {
                 auto& t = Tensor(m, "optimizer.state.0.weight.step");
                 t.chunks.push_back(t.chunks[0]);
               },
               "tensor 'optimizer.state.0.weight.step': a scalar saved in other than one chunk"},
        Change{"ChunkWithoutStorage",
               [](Metadata& m) {
                 m.storage_data.erase(MetadataIndex{"model.4.bias", std::vector<int64_t>{1}, {}});
               },
               "tensor 'model.4.bias': chunk at (1,) has no entry in storage_data"},
        Change{"BytesWithoutStorage",
               [](Metadata& m) {
                 m.storage_data.erase(MetadataIndex{"optimizer.param_groups.0.lr", {}, {}});
               },
               "bytes entry 'optimizer.param_groups.0.lr' has no entry in storage_data"},
        Change{"StorageOfNoEntry",
               [](Metadata& m) {
                 m.storage_data[MetadataIndex{"ghost", {}, {}}] = StorageInfo{"a", 0, 1};
               },
               "storage of 'ghost': no such entry"},
        Change{"StorageAtNoChunk",
               [](Metadata& m) {
                 m.storage_data[MetadataIndex{"model.0.bias", std::vector<int64_t>{1}, {}}] =
                     StorageInfo{"a", 0, 1};
               },
               "storage of 'model.0.bias' at (1,): the tensor has no chunk at that offset"},
        Change{"StorageShorterThanTheChunk",
               [](Metadata& m) { Storage(m, "model.0.bias").length = 11; },
               "tensor 'model.0.bias': chunk at (0,) is stored in 11 bytes of __0_0.distcp, "
               "fewer than its 12 bytes of data"},
        Change{"PathOutsideTheDirectory",
               [](Metadata& m) { Storage(m, "model.0.bias").relative_path = "../x.distcp"; },
               "storage of 'model.0.bias' at (0,): relative_path '../x.distcp' is not a file"},
        Change{"NegativeStorageOffset", [](Metadata& m) { Storage(m, "model.0.bias").offset = -5; },
               "storage of 'model.0.bias' at (0,) in __0_0.distcp: offset -5"},
        Change{"StorageEndOverflows",
               [](Metadata& m) { Storage(m, "model.0.bias").offset = INT64_MAX; },
               "storage of 'model.0.bias' at (0,) in __0_0.distcp: offset 9223372036854775807"}),
    [](const auto& info) { return info.param.name; });

TEST(DcpMetadata, AllowListIsSortedAndHasNoDuplicates) {
  const std::vector<std::string> names = AllowedMetadataGlobals();
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  EXPECT_EQ(std::adjacent_find(names.begin(), names.end()), names.end());
  EXPECT_EQ(
      std::count(names.begin(), names.end(), "torch.distributed.checkpoint.metadata.Metadata"), 1);
}

}  // namespace
}  // namespace fsdp::checkpoint::dcp
