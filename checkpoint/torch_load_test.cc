// TorchLoad against files written by Python's torch.save (PyTorch 2.13 run as
// tools/python on testdata/make_torch_save_files.py, once per test binary): every value
// is compared with the JSON description the script writes alongside; then damaged, hostile
// and foreign files, each refused with a clear error and without large allocations.
#include "checkpoint/torch_load.h"

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <ctime>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "checkpoint/file_testutil.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tools/python_testutil.h"

namespace fsdp::checkpoint {
namespace {

using json = nlohmann::json;
using ::fsdp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::ReadFileBytes;

// The directory the script wrote into (empty, with a failure, if it failed).
const std::string& FilesDir() {
  static const std::string* dir = [] {
    const char* srcdir = std::getenv("TEST_SRCDIR");
    const char* tmpdir = std::getenv("TEST_TMPDIR");
    if (srcdir == nullptr || tmpdir == nullptr) {
      ADD_FAILURE() << "TEST_SRCDIR and TEST_TMPDIR must be set (run under bazel test)";
      return new std::string();
    }
    const std::string script =
        std::string(srcdir) + "/fsdp_cpp/checkpoint/testdata/make_torch_save_files.py";
    const std::string out = std::string(tmpdir) + "/torch_save_files";
    const std::string err = std::string(tmpdir) + "/make_torch_save_files.stderr";
    const std::string command = fsdp::testing::PythonCommand() + " '" + script + "' '" + out + "' 2>'" + err + "'";
    if (std::system(command.c_str()) != 0) {
      ADD_FAILURE() << "`" << command << "` failed:\n" << ReadFileBytes(err);
      return new std::string();
    }
    return new std::string(out);
  }();
  return *dir;
}

std::string PathOf(const std::string& name) { return FilesDir() + "/" + name; }

const json& Expected() {
  static const json* expected = new json(json::parse(ReadFileBytes(PathOf("expected.json"))));
  return *expected;
}

double ParseHexFloat(const std::string& hex) { return std::strtod(hex.c_str(), nullptr); }

at::ScalarType DtypeFromName(const std::string& name) {
  static const std::map<std::string, at::ScalarType> kDtypes = {
      {"float32", at::kFloat},     {"float64", at::kDouble}, {"float16", at::kHalf},
      {"bfloat16", at::kBFloat16}, {"int8", at::kChar},      {"int16", at::kShort},
      {"int32", at::kInt},         {"int64", at::kLong},     {"uint8", at::kByte},
      {"bool", at::kBool}};
  auto it = kDtypes.find(name);
  EXPECT_NE(it, kDtypes.end()) << "unknown dtype " << name;
  return it == kDtypes.end() ? at::kFloat : it->second;
}

// Compares a loaded value with the script's description. `storages` maps the script's
// storage ids to the data pointers of the loaded storages, to check sharing both ways.
void ExpectMatches(const PyValue& value, const json& want, const std::string& path,
                   std::map<int64_t, const void*>* storages) {
  SCOPED_TRACE(path);
  const std::string type = want.at("t").get<std::string>();
  if (type == "none") {
    EXPECT_TRUE(value.is_none()) << value.DebugString();
  } else if (type == "bool") {
    ASSERT_TRUE(value.is_bool()) << value.DebugString();
    EXPECT_EQ(value.as_bool(), want.at("v").get<bool>());
  } else if (type == "int") {
    ASSERT_TRUE(value.is_int()) << value.DebugString();
    if (want.at("v").is_number_unsigned()) {
      EXPECT_EQ(static_cast<uint64_t>(value.as_int()), want.at("v").get<uint64_t>());
    } else {
      EXPECT_EQ(value.as_int(), want.at("v").get<int64_t>());
    }
  } else if (type == "float") {
    ASSERT_TRUE(value.is_float()) << value.DebugString();
    const double expected = ParseHexFloat(want.at("v").get<std::string>());
    EXPECT_EQ(value.as_float(), expected);
    EXPECT_EQ(std::signbit(value.as_float()), std::signbit(expected));
  } else if (type == "str") {
    ASSERT_TRUE(value.is_str()) << value.DebugString();
    EXPECT_EQ(value.as_str(), want.at("v").get<std::string>());
  } else if (type == "bytes") {
    ASSERT_TRUE(value.is_bytes()) << value.DebugString();
    EXPECT_EQ(absl::BytesToHexString(value.as_bytes().data), want.at("v").get<std::string>());
  } else if (type == "list" || type == "tuple") {
    ASSERT_TRUE(type == "list" ? value.is_list() : value.is_tuple()) << value.DebugString();
    const auto& items = value.items();
    ASSERT_EQ(items.size(), want.at("items").size());
    for (size_t i = 0; i < items.size(); ++i) {
      ExpectMatches(items[i], want.at("items")[i], absl::StrCat(path, "[", i, "]"), storages);
    }
  } else if (type == "dict") {
    ASSERT_TRUE(value.is_dict()) << value.DebugString();
    const auto& items = value.as_dict().items;
    ASSERT_EQ(items.size(), want.at("items").size());
    for (size_t i = 0; i < items.size(); ++i) {
      const std::string key = items[i].first.DebugString();
      ExpectMatches(items[i].first, want.at("items")[i][0], absl::StrCat(path, " key ", i),
                    storages);
      ExpectMatches(items[i].second, want.at("items")[i][1], absl::StrCat(path, "[", key, "]"),
                    storages);
    }
  } else if (type == "tensor") {
    ASSERT_TRUE(value.is_tensor()) << value.DebugString();
    const at::Tensor& t = value.as_tensor();
    EXPECT_EQ(t.scalar_type(), DtypeFromName(want.at("dtype").get<std::string>()));
    EXPECT_EQ(t.sizes().vec(), want.at("shape").get<std::vector<int64_t>>());
    EXPECT_EQ(t.strides().vec(), want.at("stride").get<std::vector<int64_t>>());
    EXPECT_EQ(t.storage_offset(), want.at("offset").get<int64_t>());
    EXPECT_EQ(t.requires_grad(), want.at("requires_grad").get<bool>());
    EXPECT_EQ(static_cast<int64_t>(t.storage().nbytes() / t.element_size()),
              want.at("storage_numel").get<int64_t>());
    const int64_t storage_id = want.at("storage").get<int64_t>();
    const void* data = t.storage().data();
    auto [it, inserted] = storages->emplace(storage_id, data);
    EXPECT_EQ(it->second, data) << "tensors sharing a storage in Python do not share here";
    if (inserted) {
      for (const auto& [other_id, other_data] : *storages) {
        if (other_id != storage_id) {
          EXPECT_NE(other_data, data) << "storages merged";
        }
      }
    }
    const at::Tensor flat = t.detach().reshape({-1});
    const json& values = want.at("values");
    ASSERT_EQ(flat.numel(), static_cast<int64_t>(values.size()));
    if (at::isFloatingType(t.scalar_type())) {
      const at::Tensor d = flat.to(at::kDouble).contiguous();
      for (int64_t i = 0; i < flat.numel(); ++i) {
        EXPECT_EQ(d[i].item<double>(), ParseHexFloat(values[i].get<std::string>())) << "at " << i;
      }
    } else {
      const at::Tensor l = flat.to(at::kLong).contiguous();
      for (int64_t i = 0; i < flat.numel(); ++i) {
        EXPECT_EQ(l[i].item<int64_t>(), values[i].get<int64_t>()) << "at " << i;
      }
    }
  } else {
    FAIL() << "unknown expected type " << type;
  }
}

// A refusal for damage: DATA_LOSS or INVALID_ARGUMENT, naming the file.
template <typename T>
::testing::AssertionResult IsRefused(const T& result, const std::string& file) {
  absl::Status status;
  if constexpr (std::is_same_v<T, absl::Status>) {
    status = result;
  } else {
    status = result.status();
  }
  if ((status.code() == absl::StatusCode::kDataLoss ||
       status.code() == absl::StatusCode::kInvalidArgument) &&
      std::string(status.message()).find(file) != std::string::npos) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "status is " << status.ToString();
}

// ------------------------------------------------------------------------------------------
// PyValue itself

TEST(PyValue, HoldsWhatItIsGiven) {
  EXPECT_TRUE(PyValue().is_none());
  EXPECT_TRUE(PyValue("text").is_str());  // not a bool
  EXPECT_EQ(PyValue("text").as_str(), "text");
  EXPECT_EQ(PyValue(3).as_int(), 3);
  EXPECT_TRUE(PyValue(true).as_bool());
  EXPECT_EQ(PyValue(0.5).as_float(), 0.5);
  EXPECT_EQ(PyValue(PyBytes{"\x01"}).as_bytes().data, "\x01");
  EXPECT_EQ(PyValue(at::ones({2})).as_tensor().numel(), 2);
  const PyValue dict = PyDict{{{"a", PyTuple{{1, 2.5, PyValue()}}}, {7, PyList{{"x", false}}}}};
  ASSERT_NE(dict.Find("a"), nullptr);
  EXPECT_EQ(dict.Find("a")->items().size(), 3u);
  EXPECT_EQ(dict.Find(int64_t{7})->items()[0].as_str(), "x");
  EXPECT_EQ(dict.Find("b"), nullptr);
  EXPECT_EQ(dict.Find(int64_t{8}), nullptr);
  EXPECT_EQ(PyValue(1).Find("a"), nullptr);
  EXPECT_EQ(dict.TypeName(), "dict");
  EXPECT_EQ(dict.DebugString(), "{'a': (1, 2.5, None), 7: ['x', False]}");
  EXPECT_EQ(PyValue(PyTuple{{1}}).DebugString(), "(1,)");
}

// ------------------------------------------------------------------------------------------
// Files written by torch.save

class TorchLoadPythonFileTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TorchLoadPythonFileTest, MatchesWhatPythonSaved) {
  ASSERT_FALSE(FilesDir().empty());
  FSDP_ASSERT_OK_AND_ASSIGN(PyValue value, TorchLoad(PathOf(GetParam() + ".pt")));
  std::map<int64_t, const void*> storages;
  ExpectMatches(value, Expected().at(GetParam()), GetParam(), &storages);
}

TEST_P(TorchLoadPythonFileTest, LoadsTheSameFromBytes) {
  ASSERT_FALSE(FilesDir().empty());
  const std::string bytes = ReadFileBytes(PathOf(GetParam() + ".pt"));
  FSDP_ASSERT_OK_AND_ASSIGN(PyValue value, TorchLoadFromBytes(bytes, GetParam()));
  std::map<int64_t, const void*> storages;
  ExpectMatches(value, Expected().at(GetParam()), GetParam(), &storages);
}

INSTANTIATE_TEST_SUITE_P(Files, TorchLoadPythonFileTest,
                         ::testing::Values("values_p2", "values_p4", "adam_p2", "adam_p4",
                                           "model_p2", "model_p4", "rezipped", "zip64_extras",
                                           "with_byteorder", "without_byteorder", "with_attributes"),
                         [](const auto& info) { return info.param; });

class TorchLoadProtocolTest : public ::testing::TestWithParam<int> {
 protected:
  std::string Path(const std::string& stem) const {
    return PathOf(absl::StrCat(stem, "_p", GetParam(), ".pt"));
  }
};

TEST_P(TorchLoadProtocolTest, ViewsShareOneStorage) {
  FSDP_ASSERT_OK_AND_ASSIGN(PyValue value, TorchLoad(Path("values")));
  const PyValue* shared = value.Find("shared");
  ASSERT_NE(shared, nullptr);
  at::Tensor base = shared->Find("base")->as_tensor();
  const at::Tensor strided = shared->Find("strided")->as_tensor();  // matrix[1:, ::2]
  const at::Tensor element = shared->Find("element")->as_tensor();  // base[17]
  EXPECT_EQ(element.dim(), 0);
  EXPECT_EQ(element.storage_offset(), 17);
  base[8].fill_(-100.0);  // matrix[1][2] == strided[0][1]
  EXPECT_EQ(strided[0][1].item<float>(), -100.0f);
  EXPECT_EQ(shared->Find("transposed")->as_tensor()[2][1].item<float>(), -100.0f);
}

TEST_P(TorchLoadProtocolTest, AdamStateDictHasPyTorchsLayout) {
  FSDP_ASSERT_OK_AND_ASSIGN(PyValue value, TorchLoad(Path("adam")));
  const PyValue* state = value.Find("state");
  const PyValue* groups = value.Find("param_groups");
  ASSERT_NE(state, nullptr);
  ASSERT_NE(groups, nullptr);
  ASSERT_NE(state->Find(int64_t{3}), nullptr);
  const PyValue* step = state->Find(int64_t{0})->Find("step");
  ASSERT_NE(step, nullptr);
  EXPECT_EQ(step->as_tensor().item<float>(), 2.0f);
  EXPECT_EQ(state->Find(int64_t{0})->Find("max_exp_avg_sq")->as_tensor().sizes().vec(),
            (std::vector<int64_t>{3, 4}));
  const PyValue& group = groups->items().at(0);
  const PyValue* betas = group.Find("betas");
  ASSERT_TRUE(betas != nullptr && betas->is_tuple());
  EXPECT_EQ(betas->items().at(0).as_float(), 0.8);
  EXPECT_TRUE(group.Find("amsgrad")->as_bool());
  EXPECT_EQ(group.Find("params")->items().size(), 4u);
}

TEST_P(TorchLoadProtocolTest, ModelStateDictKeepsKeyOrder) {
  FSDP_ASSERT_OK_AND_ASSIGN(PyValue value, TorchLoad(Path("model")));
  std::vector<std::string> keys;
  for (const auto& [k, v] : value.as_dict().items) keys.push_back(k.as_str());
  EXPECT_THAT(keys,
              ::testing::ElementsAre("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                     "1.running_var", "1.num_batches_tracked", "2.weight"));
  EXPECT_EQ(value.Find("1.num_batches_tracked")->as_tensor().scalar_type(), at::kLong);
}

INSTANTIATE_TEST_SUITE_P(Protocols, TorchLoadProtocolTest, ::testing::Values(2, 4),
                         [](const auto& info) { return absl::StrCat("Protocol", info.param); });

// ------------------------------------------------------------------------------------------
// Refused files

// Loads `path` in a child process whose address space may grow by at most 512 MiB, so that a
// reader that believed a size claimed by the file would fail there (or be killed) instead of
// passing. Returns the child's status.
absl::Status LoadWithMemoryLimit(const std::string& path) {
  int fds[2];
  if (pipe(fds) != 0) return absl::InternalError("pipe");
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    std::ifstream statm("/proc/self/statm");
    uint64_t pages = 0;
    statm >> pages;
    const rlim_t limit = pages * sysconf(_SC_PAGESIZE) + (rlim_t{512} << 20);
    struct rlimit rl = {limit, limit};
    setrlimit(RLIMIT_AS, &rl);
    const absl::Status status = TorchLoad(path).status();
    const std::string out = absl::StrCat(static_cast<int>(status.code()), " ", status.message());
    (void)!write(fds[1], out.data(), out.size());
    _exit(0);
  }
  close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof(buf))) > 0) out.append(buf, n);
  close(fds[0]);
  int wstatus = 0;
  waitpid(pid, &wstatus, 0);
  if (!WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0 || out.empty()) {
    return absl::InternalError(absl::StrCat("the loading child died (wait status ", wstatus, ")"));
  }
  const size_t space = out.find(' ');
  return absl::Status(static_cast<absl::StatusCode>(std::stoi(out.substr(0, space))),
                      out.substr(space + 1));
}

struct RefusedCase {
  std::string file;
  absl::StatusCode code;
  std::string message;
};

void PrintTo(const RefusedCase& c, std::ostream* os) { *os << c.file; }

class TorchLoadRefusesTest : public ::testing::TestWithParam<RefusedCase> {};

TEST_P(TorchLoadRefusesTest, WithAClearErrorAndNoBigAllocation) {
  ASSERT_FALSE(FilesDir().empty());
  const std::string path = PathOf(GetParam().file);
  EXPECT_THAT(LoadWithMemoryLimit(path),
              StatusIs(GetParam().code, AllOf(HasSubstr(path), HasSubstr(GetParam().message))));
  // And the same in this process.
  EXPECT_THAT(TorchLoad(path),
              StatusIs(GetParam().code, AllOf(HasSubstr(path), HasSubstr(GetParam().message))));
}

INSTANTIATE_TEST_SUITE_P(
    Files, TorchLoadRefusesTest,
    ::testing::Values(
        RefusedCase{"forbidden_global_p2.pt", absl::StatusCode::kInvalidArgument,
                    "refusing to load global posix.system from"},
        RefusedCase{"forbidden_global_p4.pt", absl::StatusCode::kInvalidArgument,
                    "refusing to load global posix.system from"},
        RefusedCase{"compressed.pt", absl::StatusCode::kInvalidArgument,
                    "zip entry values_p2/data.pkl is compressed (method 8)"},
        RefusedCase{"legacy.pt", absl::StatusCode::kInvalidArgument, "legacy format"},
        RefusedCase{"expected.json", absl::StatusCode::kInvalidArgument, "not a zip file"},
        RefusedCase{"huge_numel.pt", absl::StatusCode::kDataLoss,
                    "storage '0' (huge/data/0): size mismatch: the pickle says 1099511627776 "
                    "elements of torch.FloatStorage, the entry holds 40 bytes"},
        RefusedCase{"view_outside.pt", absl::StatusCode::kDataLoss,
                    "reaches element 1001 of a storage of 10 elements"},
        RefusedCase{"missing_storage.pt", absl::StatusCode::kDataLoss,
                    "storage '7' (missing/data/7) is missing from the archive"},
        RefusedCase{"huge_string.pt", absl::StatusCode::kDataLoss,
                    "hstr/data.pkl ends at byte 11 inside a 4294967280-byte argument"},
        RefusedCase{"deep_nesting.pt", absl::StatusCode::kInvalidArgument,
                    "values nested deeper than 256 levels (or a cycle)"},
        RefusedCase{"cycle.pt", absl::StatusCode::kInvalidArgument,
                    "values nested deeper than 256 levels (or a cycle)"},
        RefusedCase{"shared_doubling.pt", absl::StatusCode::kInvalidArgument,
                    "the pickle's shared objects expand to too many values"},
        RefusedCase{"big_endian.pt", absl::StatusCode::kInvalidArgument,
                    "byte order 'big' is not supported"},
        RefusedCase{"rebuild_from_type_other_func.pt", absl::StatusCode::kInvalidArgument,
                    "_rebuild_from_type_v2 of collections.OrderedDict as torch.Tensor: only "
                    "torch._utils._rebuild_tensor_v2"},
        RefusedCase{"unsupported_opcode.pt", absl::StatusCode::kInvalidArgument,
                    "op/data.pkl at byte 3: unsupported pickle opcode 0x69 ('i')"}),
    [](const auto& info) {
      std::string name = info.param.file.substr(0, info.param.file.find('.'));
      name.erase(std::remove(name.begin(), name.end(), '_'), name.end());
      return name;
    });

// Found by //checkpoint/fuzz:torch_load_fuzz (a 588-byte variant of shared_doubling.pt, kept as
// testdata/fuzz_corpus/torch_load/regress_slow_shared_expansion.pt): lists shared twice per
// level spent seconds of CPU copying values before the expansion budget refused them. Now a
// small file is refused after little work (the old budget took over 4 s here, unsanitized).
TEST(TorchLoadHostile, SharedExpansionIsRefusedQuickly) {
  ASSERT_FALSE(FilesDir().empty());
  const char* srcdir = std::getenv("TEST_SRCDIR");
  ASSERT_NE(srcdir, nullptr);
  for (const std::string& path :
       {PathOf("shared_doubling.pt"), std::string(srcdir) +
                                          "/fsdp_cpp/checkpoint/testdata/fuzz_corpus/torch_load/"
                                          "regress_slow_shared_expansion.pt"}) {
    const std::clock_t start = std::clock();
    EXPECT_THAT(TorchLoad(path), StatusIs(absl::StatusCode::kInvalidArgument,
                                          AllOf(HasSubstr(path), HasSubstr("expand to too many"))));
    const double cpu_seconds = static_cast<double>(std::clock() - start) / CLOCKS_PER_SEC;
    EXPECT_LT(cpu_seconds, 1.0) << path;
  }
}

TEST(TorchLoadForbiddenGlobal, NothingRuns) {
  ASSERT_FALSE(FilesDir().empty());
  for (const char* file : {"forbidden_global_p2.pt", "forbidden_global_p4.pt"}) {
    EXPECT_FALSE(TorchLoad(PathOf(file)).ok());
  }
  EXPECT_FALSE(std::ifstream(PathOf("pwned")).good()) << "the pickled command ran";
}

TEST(TorchLoadMissingFile, IsNotFound) {
  EXPECT_THAT(TorchLoad("/nonexistent/x.pt"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("/nonexistent/x.pt")));
}

// Every proper prefix of a real file is refused (no crash, no partial value).
TEST(TorchLoadDamage, RefusesEveryTruncation) {
  ASSERT_FALSE(FilesDir().empty());
  const std::string bytes = ReadFileBytes(PathOf("values_p4.pt"));
  ASSERT_GT(bytes.size(), 1000u);
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_TRUE(
        IsRefused(TorchLoadFromBytes(std::string_view(bytes).substr(0, n), "cut.pt"), "cut.pt"))
        << "prefix of " << n << " bytes";
  }
}

// Every single flipped byte anywhere in a real file is either refused, or harmless (a byte
// nobody reads: timestamps, padding, the local headers' unused sizes): then the value is the
// original one, since a CRC-32 guards every entry.
TEST(TorchLoadDamage, FlippedBytesAreRefusedOrHarmless) {
  ASSERT_FALSE(FilesDir().empty());
  const std::string original = ReadFileBytes(PathOf("values_p2.pt"));
  FSDP_ASSERT_OK_AND_ASSIGN(PyValue want, TorchLoadFromBytes(original, "flip.pt"));
  int refused = 0;
  for (size_t i = 0; i < original.size(); ++i) {
    std::string bytes = original;
    bytes[i] = static_cast<char>(bytes[i] ^ 0x5A);
    absl::StatusOr<PyValue> got = TorchLoadFromBytes(bytes, "flip.pt");
    if (!got.ok()) {
      ++refused;
      EXPECT_TRUE(IsRefused(got, "flip.pt")) << "byte " << i;
      continue;
    }
    std::map<int64_t, const void*> storages;
    ExpectMatches(*got, Expected().at("values_p2"), absl::StrCat("flipped byte ", i), &storages);
  }
  EXPECT_GT(refused, static_cast<int>(original.size() / 2));
}

// Flips in the zip directory's fields that matter: signatures, CRCs, sizes, offsets, names.
TEST(TorchLoadDamage, RefusesADamagedZipDirectory) {
  ASSERT_FALSE(FilesDir().empty());
  const std::string original = ReadFileBytes(PathOf("values_p2.pt"));
  const size_t central = original.find(std::string("PK\x01\x02", 4));
  ASSERT_NE(central, std::string::npos);
  // Offsets within a central directory entry: signature, CRC, sizes, local header offset, name.
  for (size_t field : {0, 16, 20, 24, 42, 46}) {
    std::string bytes = original;
    bytes[central + field] = static_cast<char>(bytes[central + field] ^ 0x01);
    EXPECT_THAT(TorchLoadFromBytes(bytes, "dir.pt"),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr("dir.pt")))
        << "field at " << field;
  }
}

// The directory claims sizes far beyond the file: refused before anything is allocated.
TEST(TorchLoadDamage, RefusesHugeClaimedSizes) {
  ASSERT_FALSE(FilesDir().empty());
  const std::string original = ReadFileBytes(PathOf("values_p2.pt"));
  const size_t central = original.find(std::string("PK\x01\x02", 4));
  ASSERT_NE(central, std::string::npos);
  {  // data.pkl (the first entry) claims 2 GiB - 1.
    std::string bytes = original;
    for (size_t field : {20, 24}) bytes.replace(central + field, 4, "\xff\xff\xff\x7f", 4);
    EXPECT_THAT(TorchLoadFromBytes(bytes, "big_entry.pt"),
                StatusIs(absl::StatusCode::kDataLoss,
                         AllOf(HasSubstr("big_entry.pt"), HasSubstr("values_p2/data.pkl"),
                               HasSubstr("does not fit in the file"))));
  }
  {  // The zip64 record claims a central directory of 2^40 bytes.
    std::string bytes = original;
    const size_t record = bytes.find(std::string("PK\x06\x06", 4));
    ASSERT_NE(record, std::string::npos);
    bytes.replace(record + 40, 8, std::string("\x00\x00\x00\x00\x00\x01\x00\x00", 8));
    EXPECT_THAT(TorchLoadFromBytes(bytes, "big_dir.pt"),
                StatusIs(absl::StatusCode::kDataLoss,
                         AllOf(HasSubstr("big_dir.pt"), HasSubstr("outside the file"))));
  }
}

}  // namespace
}  // namespace fsdp::checkpoint
