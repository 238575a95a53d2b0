// The pickle machine with a client of the test's own, as a second reader (DCP's .metadata) will
// use it: hand-built pickles of plain data; the client's allow-list refusing a global by name;
// a global standing for a value; NEWOBJ + BUILD of a dataclass-like object; persistent ids;
// opcodes the client does not take, misuse of REDUCE, truncation.
#include "checkpoint/pickle.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::checkpoint::pickle {
namespace {

using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;
using namespace std::string_literals;

constexpr char kMeta[] = "Meta";
constexpr char kStored[] = "stored";

// Allows collections.OrderedDict (REDUCE), test.Meta (NEWOBJ, then BUILD from a dict of
// attributes) and torch.float32 (a value: the str "float32"); persistent ids are strs.
class TestClient : public UnpicklerClient {
 public:
  explicit TestClient(bool takes_newobj = true) : takes_newobj_(takes_newobj) {}

  absl::string_view Writer() const override { return "the test"; }

  absl::StatusOr<Object*> Global(Unpickler& machine, const std::string& name) override {
    if (name == "torch.float32") {
      Object* dtype = machine.New(Kind::kStr);
      dtype->s = "float32";
      return dtype;
    }
    if (name == "collections.OrderedDict" || name == "test.Meta") return machine.NewGlobal(name);
    return machine.RefuseGlobal(name, "the test's globals");
  }

  absl::StatusOr<Object*> Reduce(Unpickler& machine, const Object& callable,
                                 const std::vector<Object*>& args) override {
    if (callable.s == "collections.OrderedDict" && args.empty()) return machine.New(Kind::kDict);
    return machine.Bad(absl::StrCat(callable.s, " cannot be called"));
  }

  bool TakesNewObj() const override { return takes_newobj_; }

  absl::StatusOr<Object*> NewObj(Unpickler& machine, const Object& cls,
                                 const std::vector<Object*>& args, const Object* kwargs) override {
    if (cls.s != "test.Meta" || !args.empty()) return machine.Bad("not a Meta()");
    Object* meta = machine.NewObject(kMeta);
    meta->dict = std::make_unique<DictData>();
    return meta;
  }

  absl::Status Build(Unpickler& machine, Object& instance, Object& state) override {
    if (instance.kind != Kind::kObject || instance.type_name != kMeta ||
        state.kind != Kind::kDict) {
      return machine.Bad(absl::StrCat("BUILD on a ", KindName(instance)));
    }
    instance.dict->items = state.dict->items;
    return absl::OkStatus();
  }

  absl::StatusOr<Object*> PersistentLoad(Unpickler& machine, Object& pid) override {
    if (pid.kind != Kind::kStr) return machine.Bad("persistent id is not a str");
    Object* stored = machine.NewObject(kStored);
    stored->s = pid.s;
    return stored;
  }

 private:
  bool takes_newobj_;
};

// Runs pickles through a TestClient; the machine (which owns the objects) lives as long as the
// test.
class UnpicklerTest : public ::testing::Test {
 protected:
  absl::StatusOr<Object*> Unpickle(const std::string& pickle, bool takes_newobj = true) {
    pickle_ = pickle;
    client_ = std::make_unique<TestClient>(takes_newobj);
    machine_ = std::make_unique<Unpickler>(pickle_, "test.pkl", "data.pkl", *client_);
    return machine_->Run();
  }
  // The result of a pickle that must load.
  const Object& Loaded(const std::string& pickle) {
    absl::StatusOr<Object*> result = Unpickle(pickle);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? **result : *machine_->New(Kind::kNone);
  }
  const Unpickler& machine() const { return *machine_; }

 private:
  std::string pickle_;
  std::unique_ptr<TestClient> client_;
  std::unique_ptr<Unpickler> machine_;
};

// The str key `key` of a dict-holding object, or null.
const Object* Find(const Object& o, const std::string& key) {
  for (const auto& [k, v] : o.dict->items) {
    if (k->kind == Kind::kStr && k->s == key) return v;
  }
  return nullptr;
}

TEST_F(UnpicklerTest, PlainDataProtocol4) {
  // {'a': [1, 2.5, 'x'], 'b': (True, None)}
  const std::string pickle =
      "\x80\x04}(\x8c\x01"
      "a](K\x01G@\x04\x00\x00\x00\x00\x00\x00\x8c\x01xe"
      "\x8c\x01"
      "b\x88N\x86u."s;
  const Object& result = Loaded(pickle);
  ASSERT_EQ(result.kind, Kind::kDict);
  ASSERT_EQ(result.dict->items.size(), 2u);
  const Object* a = Find(result, "a");
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(a->kind, Kind::kList);
  ASSERT_EQ(a->items.size(), 3u);
  EXPECT_EQ(a->items[0]->i, 1);
  EXPECT_EQ(a->items[1]->f, 2.5);
  EXPECT_EQ(a->items[2]->s, "x");
  const Object* b = Find(result, "b");
  ASSERT_NE(b, nullptr);
  ASSERT_EQ(b->kind, Kind::kTuple);
  ASSERT_EQ(b->items.size(), 2u);
  EXPECT_TRUE(b->items[0]->b);
  EXPECT_EQ(b->items[1]->kind, Kind::kNone);
  EXPECT_EQ(machine().protocol(), 4);
}

TEST_F(UnpicklerTest, TheClientsAllowListRefusesAGlobalByName) {
  const std::string pickle(
      "\x80\x02"
      "cposix\nsystem\n)R.");
  EXPECT_THAT(Unpickle(pickle),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("refusing to load global posix.system from test.pkl (data.pkl "
                                 "at byte 2; only the test's globals are allowed)")));
}

TEST_F(UnpicklerTest, AGlobalStandsForTheClientsValue) {
  const std::string pickle(
      "\x80\x02"
      "ctorch\nfloat32\n.");
  const Object& result = Loaded(pickle);
  EXPECT_EQ(result.s, "float32");
}

TEST_F(UnpicklerTest, ReduceOfAnAllowedGlobal) {
  // collections.OrderedDict() with one item set.
  const std::string pickle =
      "\x80\x02"
      "ccollections\nOrderedDict\n)RX\x01\x00\x00\x00kK\x07s."s;
  const Object& result = Loaded(pickle);
  ASSERT_EQ(result.kind, Kind::kDict);
  const Object* k = Find(result, "k");
  ASSERT_NE(k, nullptr);
  EXPECT_EQ(k->i, 7);
}

TEST_F(UnpicklerTest, NewObjAndBuildOfADataclass) {
  // test.Meta() with __dict__ {'name': 'w', 'dtype': torch.float32}, as protocol 4 pickles a
  // dataclass: STACK_GLOBAL, EMPTY_TUPLE, NEWOBJ, then BUILD with the attributes.
  const std::string pickle(
      "\x80\x04\x8c\x04test\x8c\x04Meta\x93)\x81}(\x8c\x04name\x8c\x01w"
      "\x8c\x05"
      "dtypectorch\nfloat32\nub.");
  const Object& result = Loaded(pickle);
  ASSERT_STREQ(KindName(result), "Meta");
  const Object* name = Find(result, "name");
  const Object* dtype = Find(result, "dtype");
  ASSERT_NE(name, nullptr);
  ASSERT_NE(dtype, nullptr);
  EXPECT_EQ(name->s, "w");
  EXPECT_EQ(dtype->s, "float32");
}

TEST_F(UnpicklerTest, NewObjIsUnsupportedUnlessTheClientTakesIt) {
  const std::string pickle("\x80\x04\x8c\x04test\x8c\x04Meta\x93)\x81.");
  EXPECT_THAT(Unpickle(pickle, /*takes_newobj=*/false),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("data.pkl at byte 16: unsupported pickle opcode 0x81; the test "
                                 "does not write it")));
}

TEST_F(UnpicklerTest, PersistentIdsAreTheClients) {
  const std::string pickle = "\x80\x02X\x03\x00\x00\x00keyQ."s;
  const Object& result = Loaded(pickle);
  EXPECT_STREQ(KindName(result), "stored");
  EXPECT_EQ(result.s, "key");
}

TEST_F(UnpicklerTest, ReduceOfAValueIsRefused) {
  const std::string pickle("\x80\x02N)R.");
  EXPECT_THAT(Unpickle(pickle), StatusIs(absl::StatusCode::kInvalidArgument,
                                         HasSubstr("data.pkl at byte 4: REDUCE calls a None")));
}

TEST_F(UnpicklerTest, TruncatedPickleIsDataLoss) {
  const std::string pickle("\x80\x02]");
  EXPECT_THAT(Unpickle(pickle),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr("test.pkl: data.pkl ends at byte 3 before the STOP opcode")));
}

}  // namespace
}  // namespace fsdp::checkpoint::pickle
