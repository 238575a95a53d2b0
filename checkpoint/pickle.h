// The pickle machine that readers of Python pickles build on: torch.save's data.pkl
// (torch_load.h) and DCP's .metadata. It runs the opcodes of pickle protocols 2 to 5 that plain
// data is written with, over objects it owns, and never imports or calls anything the pickle
// names. What a global stands for, what REDUCE, NEWOBJ and BUILD of it make and what a
// persistent id refers to are the client's to say (UnpicklerClient): each reader brings its own
// allow-list of globals and builds its own objects, and the machine refuses everything else.
//
// Objects live in an arena owned by the Unpickler and refer to each other by pointer, so memo
// references, shared and even cyclic structures cost nothing to destroy; they live as long as
// the Unpickler. A hostile pickle can create about one object per byte, as with Python's own
// unpickler, so objects are kept small.
//
// Preconditions: the client outlives the Unpickler, the pickle's bytes outlive Run().
// Errors (every message names the file, the pickle's entry and the byte of the opcode):
//   INVALID_ARGUMENT  an opcode the machine does not run ("unsupported pickle opcode 0x.. ('c');
//                     <writer> does not write it", NEWOBJ included unless the client takes it);
//                     stack underflow, a MARK missing, a memo index never set, an int beyond
//                     64 bits, an unknown protocol, APPEND / SETITEM on the wrong type, an
//                     unhashable dict key, REDUCE of something not a global or without a tuple;
//                     whatever the client refuses (a global outside its allow-list, in
//                     Unpickler::RefuseGlobal's words "refusing to load global ...").
//   DATA_LOSS         the pickle ends before STOP or inside an opcode's argument.
#ifndef FSDP_CPP_CHECKPOINT_PICKLE_H_
#define FSDP_CPP_CHECKPOINT_PICKLE_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fsdp::checkpoint::pickle {

enum class Kind {
  kNone,
  kBool,
  kInt,
  kFloat,
  kStr,
  kBytes,
  kList,
  kTuple,
  kDict,
  kTensor,
  kGlobal,  // a global the client let through: `s` is "module.name"
  kObject,  // an object of the client's own (e.g. a storage, a dataclass): see Object
};

struct Object;

// A dict's items and the positions of its str and int keys (for Python's replace-in-place).
struct DictData {
  std::vector<std::pair<Object*, Object*>> items;
  std::unordered_map<std::string, size_t> str_index;
  std::unordered_map<int64_t, size_t> int_index;  // int and bool keys
};

struct Object {
  explicit Object(Kind k) : kind(k) {}
  Kind kind;
  bool b = false;
  union {
    int64_t i = 0;
    double f;
  };
  std::string s;                   // str, bytes, a global's "module.name"; a client's choice
  std::vector<Object*> items;      // list, tuple; a client's choice
  std::unique_ptr<DictData> dict;  // dict; a client's choice (e.g. an object's attributes)
  at::Tensor tensor;               // tensor; a client's choice
  // kObject: the type's name in messages ("storage"); the client may compare the pointer to
  // recognise its own objects.
  const char* type_name = nullptr;
};

// Python's name of an object's type for messages: "None", "bool", ..., "Tensor", "global", or
// a client object's type_name.
const char* KindName(const Object& o);

class Unpickler;

// What a reader decides; the Unpickler calls it while running the opcode concerned, so that
// Unpickler::Bad names that opcode's byte.
class UnpicklerClient {
 public:
  virtual ~UnpicklerClient() = default;

  // Who writes the pickles this client reads ("torch.save"), for the machine's "unsupported
  // pickle opcode ...; <writer> does not write it".
  virtual absl::string_view Writer() const = 0;

  // GLOBAL / STACK_GLOBAL of `name`, "module.qualname" (protocol 2's __builtin__ already read as
  // builtins). Returns what the global stands for: Unpickler::NewGlobal(name) for a callable or
  // class that REDUCE / NEWOBJ / BUILD or the client's later steps recognise, any other object
  // for a value (e.g. torch.float32), or Unpickler::RefuseGlobal for a name outside the
  // client's allow-list.
  virtual absl::StatusOr<Object*> Global(Unpickler& machine, const std::string& name) = 0;

  // REDUCE: `callable` (a kGlobal, checked) called with `args` (a tuple's items, checked).
  virtual absl::StatusOr<Object*> Reduce(Unpickler& machine, const Object& callable,
                                         const std::vector<Object*>& args) = 0;

  // BUILD: `state` set on `instance`, which stays on the stack.
  virtual absl::Status Build(Unpickler& machine, Object& instance, Object& state) = 0;

  // BINPERSID: the object a persistent id stands for.
  virtual absl::StatusOr<Object*> PersistentLoad(Unpickler& machine, Object& pid) = 0;

  // Whether NEWOBJ / NEWOBJ_EX are run (cls.__new__(cls, *args, **kwargs), as protocol 2+
  // pickles dataclasses); if not, they are refused as unsupported opcodes.
  virtual bool TakesNewObj() const { return false; }
  // NEWOBJ (kwargs null) / NEWOBJ_EX: `cls` a kGlobal, `args` a tuple's items, `kwargs` a dict
  // (checked). Called only when TakesNewObj().
  virtual absl::StatusOr<Object*> NewObj(Unpickler& machine, const Object& cls,
                                         const std::vector<Object*>& args, const Object* kwargs);
};

class Unpickler {
 public:
  // `file` and `entry` name the pickle in messages.
  Unpickler(std::string_view pickle, std::string file, std::string entry, UnpicklerClient& client);
  Unpickler(const Unpickler&) = delete;
  Unpickler& operator=(const Unpickler&) = delete;

  // Runs the pickle to its STOP; the result lives as long as this Unpickler.
  absl::StatusOr<Object*> Run();

  // For clients: new objects in the arena.
  Object* New(Kind kind);
  Object* NewTuple(std::vector<Object*> items);
  Object* NewGlobal(const std::string& name);
  Object* NewObject(const char* type_name);

  // INVALID_ARGUMENT "FILE: ENTRY at byte N: what", N the current opcode's byte.
  absl::Status Bad(absl::string_view what) const;
  // INVALID_ARGUMENT "refusing to load global NAME from FILE (ENTRY at byte N; only `allowed`
  // are allowed)".
  absl::Status RefuseGlobal(const std::string& name, absl::string_view allowed) const;

  const std::string& file() const { return file_; }
  const std::string& entry() const { return entry_; }
  // The PROTO opcode's protocol (0 before it).
  int protocol() const { return protocol_; }

 private:
  // One opcode (not STOP); each family of opcodes is one step.
  absl::Status Step(uint8_t op);
  absl::Status FramingOp(uint8_t op);
  absl::Status EmptyValueOp(uint8_t op);
  absl::Status ScalarOp(uint8_t op);
  absl::Status StringOp(uint8_t op);
  absl::Status MemoOp(uint8_t op);
  absl::Status StackOp(uint8_t op);
  absl::Status TupleOp(uint8_t op);
  absl::Status FillContainerOp(uint8_t op);
  absl::Status GlobalOp(uint8_t op);
  absl::Status ClientOp(uint8_t op);
  absl::Status Unsupported(uint8_t op) const;

  absl::Status Truncated(const std::string& where) const;
  void Push(Object* o) { stack_.push_back(o); }
  void PushInt(int64_t v);
  size_t CurrentMark() const { return marks_.empty() ? 0 : marks_.back(); }
  absl::StatusOr<Object*> Pop();
  absl::StatusOr<Object*> Top();
  absl::StatusOr<std::vector<Object*>> PopToMark();
  absl::StatusOr<uint64_t> Uint(int n);
  absl::StatusOr<std::string_view> Bytes(uint64_t n);
  absl::StatusOr<std::string> Line();
  absl::StatusOr<int64_t> DecodeLong(std::string_view bytes) const;
  absl::StatusOr<Object*> Global(std::string module, const std::string& name);
  absl::Status SetItem(Object* dict, Object* key, Object* value);
  absl::StatusOr<Object*> Reduce(Object* callable, Object* args);
  absl::StatusOr<Object*> NewObj(Object* cls, Object* args, const Object* kwargs);

  std::string_view data_;
  std::string file_;
  std::string entry_;
  UnpicklerClient& client_;
  size_t pos_ = 0;
  size_t op_pos_ = 0;
  int protocol_ = 0;
  std::vector<Object*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Object*> memo_;
  std::deque<Object> arena_;  // stable addresses
};

}  // namespace fsdp::checkpoint::pickle

#endif  // FSDP_CPP_CHECKPOINT_PICKLE_H_
