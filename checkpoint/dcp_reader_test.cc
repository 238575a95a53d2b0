// DcpReader against DCP directories that PyTorch 2.13 writes (tools/python on
// testdata/make_dcp_checkpoints.py, once per test binary): a plain state dict saved in one
// process and FSDP2 model + Adam state saved from 2 ranks in torchtitan's layout. Every tensor
// (whole and random sub-regions, crossing chunk boundaries) and every bytes entry must equal,
// bit for bit, the values PyTorch wrote beside them; damaged copies are refused naming the
// file and the tensor or global; .metadata names only the globals of our allow-list.
#include "checkpoint/dcp_reader.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "checkpoint/file_testutil.h"
#include "checkpoint/torch_load.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tools/python_testutil.h"

namespace fsdp::checkpoint::dcp {
namespace {

using ::fsdp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::ReadFileBytes;

// Runs the script into a fresh directory; that directory, or empty with a failure.
std::string WriteCheckpoints() {
  const char* tmpdir = std::getenv("TEST_TMPDIR");
  const std::string out = std::string(tmpdir == nullptr ? "/tmp" : tmpdir) + "/dcp_files";
  std::filesystem::remove_all(out);
  const std::string script = fsdp::testing::Runfile("checkpoint/testdata/make_dcp_checkpoints.py");
  const fsdp::testing::CommandResult r =
      fsdp::testing::RunCommand(fsdp::testing::PythonCommand() + " '" + script + "' '" + out + "'");
  if (r.exit_code == 0) return out;
  ADD_FAILURE() << "make_dcp_checkpoints.py failed:\n" << r.output;
  return "";
}

// The script runs once per test binary.
const std::string& OutDir() {
  static const std::string* dir = new std::string(WriteCheckpoints());
  return *dir;
}

std::string PathOf(const std::string& name) { return OutDir() + "/" + name; }

bool SameBits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

// Python equality, floats and tensors bit for bit.
void ExpectSameValue(const PyValue& got, const PyValue& want, const std::string& where) {
  SCOPED_TRACE(where);
  ASSERT_EQ(got.TypeName(), want.TypeName()) << got.DebugString() << " vs " << want.DebugString();
  if (want.is_tensor()) {
    EXPECT_TRUE(SameBits(got.as_tensor(), want.as_tensor()));
  } else if (want.is_float()) {
    const double g = got.as_float(), w = want.as_float();
    EXPECT_EQ(std::memcmp(&g, &w, sizeof g), 0) << g << " vs " << w;
  } else if (want.is_list() || want.is_tuple()) {
    ASSERT_EQ(got.items().size(), want.items().size());
    for (size_t k = 0; k < want.items().size(); ++k) {
      ExpectSameValue(got.items()[k], want.items()[k], where + "[" + std::to_string(k) + "]");
    }
  } else if (want.is_dict()) {
    ASSERT_EQ(got.as_dict().items.size(), want.as_dict().items.size());
    for (size_t k = 0; k < want.as_dict().items.size(); ++k) {
      ExpectSameValue(got.as_dict().items[k].first, want.as_dict().items[k].first, where);
      ExpectSameValue(got.as_dict().items[k].second, want.as_dict().items[k].second, where);
    }
  } else {
    EXPECT_EQ(got.DebugString(), want.DebugString());
  }
}

class DcpReaderOnPyTorch : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_FALSE(OutDir().empty());
    absl::StatusOr<PyValue> expected = TorchLoad(PathOf(GetParam() + ".expected.pt"));
    ASSERT_TRUE(expected.ok()) << expected.status();
    expected_ = *std::move(expected);
    absl::StatusOr<std::unique_ptr<DcpReader>> reader = DcpReader::Open(PathOf(GetParam()));
    ASSERT_TRUE(reader.ok()) << reader.status();
    reader_ = *std::move(reader);
  }
  const PyValue& Want(const std::string& part, const std::string& fqn) {
    const PyValue* v = expected_.Find(part)->Find(fqn);
    EXPECT_NE(v, nullptr) << fqn;
    static const PyValue kNone;
    return v == nullptr ? kNone : *v;
  }

  PyValue expected_;
  std::unique_ptr<DcpReader> reader_;
};

TEST_P(DcpReaderOnPyTorch, EveryEntryReadsAsPyTorchWroteIt) {
  const Metadata& m = reader_->metadata();
  EXPECT_EQ(m.state_dict_metadata.size(), expected_.Find("values")->as_dict().items.size());
  int tensors = 0, bytes = 0;
  for (const auto& [fqn, entry] : m.state_dict_metadata) {
    SCOPED_TRACE(fqn);
    if (std::holds_alternative<TensorStorageMetadata>(entry)) {
      absl::StatusOr<at::Tensor> t = reader_->ReadTensor(fqn);
      ASSERT_TRUE(t.ok()) << t.status();
      ASSERT_TRUE(Want("values", fqn).is_tensor());
      EXPECT_TRUE(SameBits(*t, Want("values", fqn).as_tensor()))
          << *t << Want("values", fqn).as_tensor();
      ++tensors;
    } else {
      absl::StatusOr<std::string> raw = reader_->ReadBytes(fqn);
      ASSERT_TRUE(raw.ok()) << raw.status();
      EXPECT_EQ(*raw, Want("raw", fqn).as_bytes().data);
      absl::StatusOr<PyValue> value = reader_->ReadObject(fqn);
      ASSERT_TRUE(value.ok()) << value.status();
      ExpectSameValue(*value, Want("values", fqn), fqn);
      ++bytes;
    }
  }
  EXPECT_GT(tensors, 10);
  EXPECT_GT(bytes, 5);
}

// Random boxes of every tensor (a fixed seed), compared with the same box of the whole tensor;
// in the FSDP2 checkpoint many of them take rows from both ranks' chunks.
TEST_P(DcpReaderOnPyTorch, RandomRegionsEqualTheSameBoxOfTheWholeTensor) {
  std::mt19937 rng(2026);
  int multi_chunk = 0;
  for (const auto& [fqn, entry] : reader_->metadata().state_dict_metadata) {
    const auto* t = std::get_if<TensorStorageMetadata>(&entry);
    if (t == nullptr) continue;
    const at::Tensor& whole = Want("values", fqn).as_tensor();
    for (int trial = 0; trial < 12; ++trial) {
      std::vector<int64_t> offsets, sizes;
      at::Tensor want = whole;
      for (size_t d = 0; d < t->size.size(); ++d) {
        int64_t a = std::uniform_int_distribution<int64_t>(0, t->size[d])(rng);
        int64_t b = std::uniform_int_distribution<int64_t>(0, t->size[d])(rng);
        if (a > b) std::swap(a, b);
        offsets.push_back(a);
        sizes.push_back(b - a);
        want = want.narrow(static_cast<int64_t>(d), a, b - a);
      }
      const int64_t items_before = reader_->stats().items_read;
      absl::StatusOr<at::Tensor> got = reader_->ReadTensorRegion(fqn, offsets, sizes);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_TRUE(SameBits(*got, want))
          << fqn << " at " << ShapeString(offsets) << " sizes " << ShapeString(sizes);
      multi_chunk += reader_->stats().items_read - items_before > 1;
    }
  }
  if (GetParam() == "fsdp2") {
    EXPECT_GT(multi_chunk, 20);
  }
}

INSTANTIATE_TEST_SUITE_P(PyTorch213, DcpReaderOnPyTorch, ::testing::Values("plain", "fsdp2"),
                         [](const auto& info) { return info.param; });

// Only the chunks a region overlaps are read.
TEST(DcpReader, ReadsOnlyTheChunksARegionOverlaps) {
  ASSERT_FALSE(OutDir().empty());
  absl::StatusOr<std::unique_ptr<DcpReader>> reader = DcpReader::Open(PathOf("fsdp2"));
  ASSERT_TRUE(reader.ok()) << reader.status();
  DcpReader& r = **reader;
  const auto& w = std::get<TensorStorageMetadata>(*r.metadata().Find("model.2.weight"));
  ASSERT_EQ(w.chunks.size(), 2u);
  const StorageInfo* first = r.metadata().FindStorage("model.2.weight", w.chunks[0].offsets);
  ASSERT_NE(first, nullptr);
  ASSERT_TRUE(r.ReadTensorRegion("model.2.weight", {1, 0}, {2, 5}).ok());  // rows 1-2: rank 0's
  EXPECT_EQ(r.stats().items_read, 1);
  // The zip reader looks for its end record in the archive's last 64 KiB, which for an item
  // this small is all of it, then reads the directory, the pickle and the storage again.
  EXPECT_GT(r.stats().bytes_read, 0);
  EXPECT_LE(r.stats().bytes_read, 2 * first->length);
  ASSERT_TRUE(r.ReadTensorRegion("model.2.weight", {3, 1}, {2, 2}).ok());  // rows 3-4: both
  EXPECT_EQ(r.stats().items_read, 3);
}

// Every global the PyTorch-written .metadata files name is on our allow-list, and each entry
// of the list that is not a dtype appears in them.
TEST(DcpReader, MetadataGlobalsAreExactlyTheAllowList) {
  ASSERT_FALSE(OutDir().empty());
  const std::vector<std::string> allowed = AllowedMetadataGlobals();
  std::set<std::string> seen;
  for (const char* name : {"plain", "fsdp2"}) {
    for (absl::string_view line : absl::StrSplit(
             ReadFileBytes(PathOf(std::string(name) + ".globals.txt")), '\n', absl::SkipEmpty())) {
      seen.emplace(line);
    }
  }
  for (const std::string& g : seen) {
    EXPECT_TRUE(std::find(allowed.begin(), allowed.end(), g) != allowed.end()) << g;
  }
  for (const std::string& g : allowed) {
    const bool dtype =
        g.rfind("torch.", 0) == 0 && g.find('.', 6) == std::string::npos && g != "torch.Size";
    if (!dtype) {
      EXPECT_EQ(seen.count(g), 1u) << g << " is allowed but PyTorch does not write it";
    }
  }
}

struct Damage {
  std::string name;
  absl::StatusCode code;
  std::string file;   // in the message
  std::string thing;  // the tensor or global in the message
  bool at_open;       // refused by Open (else by reading "f32")
};

class DamagedDcp : public ::testing::TestWithParam<Damage> {};

TEST_P(DamagedDcp, IsRefusedNamingTheFileAndTheTensor) {
  ASSERT_FALSE(OutDir().empty());
  const Damage& d = GetParam();
  const std::string dir = PathOf("damaged_" + d.name);
  absl::StatusOr<std::unique_ptr<DcpReader>> reader = DcpReader::Open(dir);
  absl::Status status = reader.status();
  if (!d.at_open) {
    ASSERT_TRUE(reader.ok()) << reader.status();
    status = (*reader)->ReadTensor("f32").status();
    EXPECT_THAT((*reader)->ReadTensorRegion("f32", {0, 0}, {1, 1}).status(),
                StatusIs(d.code, AllOf(HasSubstr(d.file), HasSubstr(d.thing))));
  }
  EXPECT_THAT(status, StatusIs(d.code, AllOf(HasSubstr(dir + "/" + d.file), HasSubstr(d.thing))));
}

INSTANTIATE_TEST_SUITE_P(
    PyTorch213, DamagedDcp,
    ::testing::Values(
        Damage{"storage_offset", absl::StatusCode::kDataLoss, "__0_0.distcp", "'f32'", true},
        Damage{"chunk_outside", absl::StatusCode::kInvalidArgument, ".metadata",
               "tensor 'f32': chunk 0", true},
        Damage{"missing_file", absl::StatusCode::kNotFound, "__9_0.distcp", "tensor '", true},
        Damage{"hostile", absl::StatusCode::kInvalidArgument, ".metadata",
               "refusing to load global posix.system", true},
        Damage{"dtype", absl::StatusCode::kDataLoss, "__0_0.distcp", "tensor 'f32'", false},
        Damage{"shape", absl::StatusCode::kDataLoss, "__0_0.distcp", "tensor 'f32'", false}),
    [](const auto& info) { return info.param.name; });

// A .distcp cut short and a region outside its tensor.
TEST(DcpReader, TruncatedFileAndBadRegionAreRefused) {
  ASSERT_FALSE(OutDir().empty());
  const std::string dir = testing::FreshTestDir("dcp_truncated");
  std::filesystem::copy(PathOf("fsdp2"), dir);
  const std::string file = dir + "/__1_0.distcp";
  std::filesystem::resize_file(file, std::filesystem::file_size(file) - 100);
  EXPECT_THAT(DcpReader::Open(dir).status(),
              StatusIs(absl::StatusCode::kDataLoss,
                       AllOf(HasSubstr(file), HasSubstr("truncated"), HasSubstr("'optimizer."))));

  absl::StatusOr<std::unique_ptr<DcpReader>> reader = DcpReader::Open(PathOf("fsdp2"));
  ASSERT_TRUE(reader.ok()) << reader.status();
  DcpReader& r = **reader;
  EXPECT_THAT(
      r.ReadTensorRegion("model.0.weight", {4, 0}, {2, 6}).status(),
      StatusIs(absl::StatusCode::kInvalidArgument,
               AllOf(HasSubstr(".metadata"), HasSubstr("'model.0.weight'"), HasSubstr("(5, 6)"))));
  EXPECT_THAT(r.ReadTensorRegion("model.0.weight", {0}, {5}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'model.0.weight'")));
  EXPECT_THAT(r.ReadTensor("model.9.weight").status(),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("'model.9.weight'")));
  EXPECT_THAT(r.ReadBytes("model.0.weight").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'model.0.weight'")));
  EXPECT_THAT(
      r.ReadTensor("optimizer.param_groups.0.lr").status(),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'optimizer.param_groups.0.lr'")));
}

}  // namespace
}  // namespace fsdp::checkpoint::dcp
