// See pickle.h. The opcodes by family, each family one step: framing, empty values, scalars,
// strings, the memo, the stack and its marks, tuples, filling containers, globals, and the opcodes
// whose meaning is the client's (REDUCE, BUILD, NEWOBJ, BINPERSID).
#include "checkpoint/pickle.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <initializer_list>

#include "absl/strings/str_cat.h"
#include "checkpoint/internal/file_bytes.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint::pickle {
namespace {

// Pickle opcodes (Python's Lib/pickletools.py names them).
enum Opcode : uint8_t {
  kMark = '(',
  kStop = '.',
  kPop = '0',
  kPopMark = '1',
  kDup = '2',
  kBinInt = 'J',
  kBinInt1 = 'K',
  kBinInt2 = 'M',
  kNone = 'N',
  kBinPersId = 'Q',
  kReduce = 'R',
  kBinUnicode = 'X',
  kAppend = 'a',
  kBuild = 'b',
  kGlobal = 'c',
  kAppends = 'e',
  kBinGet = 'h',
  kLongBinGet = 'j',
  kEmptyList = ']',
  kBinPut = 'q',
  kLongBinPut = 'r',
  kSetItem = 's',
  kTuple = 't',
  kSetItems = 'u',
  kEmptyDict = '}',
  kEmptyTuple = ')',
  kBinFloat = 'G',
  kBinBytes = 'B',
  kShortBinBytes = 'C',
  kProto = 0x80,
  kNewObj = 0x81,
  kTuple1 = 0x85,
  kTuple2 = 0x86,
  kTuple3 = 0x87,
  kNewTrue = 0x88,
  kNewFalse = 0x89,
  kLong1 = 0x8a,
  kLong4 = 0x8b,
  kShortBinUnicode = 0x8c,
  kBinUnicode8 = 0x8d,
  kBinBytes8 = 0x8e,
  kNewObjEx = 0x92,
  kStackGlobal = 0x93,
  kMemoize = 0x94,
  kFrame = 0x95,
};

}  // namespace

const char* KindName(const Object& o) {
  switch (o.kind) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return "bool";
    case Kind::kInt:
      return "int";
    case Kind::kFloat:
      return "float";
    case Kind::kStr:
      return "str";
    case Kind::kBytes:
      return "bytes";
    case Kind::kList:
      return "list";
    case Kind::kTuple:
      return "tuple";
    case Kind::kDict:
      return "dict";
    case Kind::kTensor:
      return "Tensor";
    case Kind::kGlobal:
      return "global";
    case Kind::kObject:
      return o.type_name != nullptr ? o.type_name : "object";
  }
  return "?";
}

absl::StatusOr<Object*> UnpicklerClient::NewObj(Unpickler& machine, const Object& cls,
                                                const std::vector<Object*>& args,
                                                const Object* kwargs) {
  return machine.Bad(absl::StrCat("NEWOBJ of ", cls.s, " is not taken"));
}

Unpickler::Unpickler(std::string_view pickle, std::string file, std::string entry,
                     UnpicklerClient& client)
    : data_(pickle), file_(std::move(file)), entry_(std::move(entry)), client_(client) {}

absl::StatusOr<Object*> Unpickler::Run() {
  while (true) {
    if (pos_ >= data_.size()) return Truncated("before the STOP opcode");
    op_pos_ = pos_;
    const uint8_t op = static_cast<uint8_t>(data_[pos_++]);
    if (op == kStop) return Pop();
    FSDP_RETURN_IF_ERROR(Step(op));
  }
}

absl::Status Unpickler::Step(uint8_t op) {
  using Family = absl::Status (Unpickler::*)(uint8_t);
  // Each opcode's family; the opcodes not listed are unsupported.
  static const std::array<Family, 256> kFamilies = [] {
    std::array<Family, 256> table{};
    auto add = [&table](std::initializer_list<uint8_t> ops, Family family) {
      for (uint8_t op : ops) table[op] = family;
    };
    add({kProto, kFrame}, &Unpickler::FramingOp);
    add({kNone, kEmptyDict, kEmptyList, kEmptyTuple}, &Unpickler::EmptyValueOp);
    add({kNewTrue, kNewFalse, kBinInt, kBinInt1, kBinInt2, kLong1, kLong4, kBinFloat},
        &Unpickler::ScalarOp);
    add({kBinUnicode, kShortBinUnicode, kBinUnicode8, kBinBytes, kShortBinBytes, kBinBytes8},
        &Unpickler::StringOp);
    add({kBinPut, kLongBinPut, kMemoize, kBinGet, kLongBinGet}, &Unpickler::MemoOp);
    add({kMark, kPop, kPopMark, kDup}, &Unpickler::StackOp);
    add({kTuple, kTuple1, kTuple2, kTuple3}, &Unpickler::TupleOp);
    add({kAppend, kAppends, kSetItem, kSetItems}, &Unpickler::FillContainerOp);
    add({kGlobal, kStackGlobal}, &Unpickler::GlobalOp);
    add({kReduce, kBuild, kBinPersId, kNewObj, kNewObjEx}, &Unpickler::ClientOp);
    return table;
  }();
  const Family family = kFamilies[op];
  if (family == nullptr) return Unsupported(op);
  return (this->*family)(op);
}

absl::Status Unpickler::FramingOp(uint8_t op) {
  if (op == kProto) {
    FSDP_ASSIGN_OR_RETURN(uint64_t proto, Uint(1));
    if (proto > 5) return Bad(absl::StrCat("pickle protocol ", proto, " is unknown"));
    protocol_ = static_cast<int>(proto);
    return absl::OkStatus();
  }
  // FRAME: a length hint only.
  FSDP_ASSIGN_OR_RETURN(uint64_t frame, Uint(8));
  if (frame > data_.size() - pos_) return Truncated("inside a FRAME");
  return absl::OkStatus();
}

// NONE, EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE.
absl::Status Unpickler::EmptyValueOp(uint8_t op) {
  const Kind kind = op == kNone        ? Kind::kNone
                    : op == kEmptyDict ? Kind::kDict
                    : op == kEmptyList ? Kind::kList
                                       : Kind::kTuple;
  Push(New(kind));
  return absl::OkStatus();
}

absl::Status Unpickler::ScalarOp(uint8_t op) {
  switch (op) {
    case kNewTrue:
    case kNewFalse: {
      Object* o = New(Kind::kBool);
      o->b = op == kNewTrue;
      Push(o);
      return absl::OkStatus();
    }
    case kBinInt: {  // 4-byte signed
      FSDP_ASSIGN_OR_RETURN(uint64_t v, Uint(4));
      PushInt(static_cast<int32_t>(static_cast<uint32_t>(v)));
      return absl::OkStatus();
    }
    case kBinInt1:
    case kBinInt2: {  // unsigned
      FSDP_ASSIGN_OR_RETURN(uint64_t v, Uint(op == kBinInt1 ? 1 : 2));
      PushInt(static_cast<int64_t>(v));
      return absl::OkStatus();
    }
    case kLong1:
    case kLong4: {  // little-endian two's complement
      FSDP_ASSIGN_OR_RETURN(uint64_t n, Uint(op == kLong1 ? 1 : 4));
      if (op == kLong4 && n > 0x7FFFFFFFu) return Bad("LONG4 with a negative length");
      FSDP_ASSIGN_OR_RETURN(std::string_view bytes, Bytes(n));
      FSDP_ASSIGN_OR_RETURN(int64_t v, DecodeLong(bytes));
      PushInt(v);
      return absl::OkStatus();
    }
    default: {  // BINFLOAT: big-endian double
      FSDP_ASSIGN_OR_RETURN(std::string_view bytes, Bytes(8));
      uint64_t bits = 0;
      for (char c : bytes) bits = (bits << 8) | static_cast<uint8_t>(c);
      Object* o = New(Kind::kFloat);
      std::memcpy(&o->f, &bits, 8);
      Push(o);
      return absl::OkStatus();
    }
  }
}

// BINUNICODE, SHORT_BINUNICODE, BINUNICODE8 (str); BINBYTES, SHORT_BINBYTES, BINBYTES8.
absl::Status Unpickler::StringOp(uint8_t op) {
  const int width = (op == kBinUnicode || op == kBinBytes)             ? 4
                    : (op == kShortBinUnicode || op == kShortBinBytes) ? 1
                                                                       : 8;
  FSDP_ASSIGN_OR_RETURN(uint64_t n, Uint(width));
  FSDP_ASSIGN_OR_RETURN(std::string_view bytes, Bytes(n));
  const bool is_str = op == kBinUnicode || op == kShortBinUnicode || op == kBinUnicode8;
  Object* o = New(is_str ? Kind::kStr : Kind::kBytes);
  o->s = std::string(bytes);
  Push(o);
  return absl::OkStatus();
}

absl::Status Unpickler::MemoOp(uint8_t op) {
  if (op == kBinPut || op == kLongBinPut) {
    FSDP_ASSIGN_OR_RETURN(uint64_t index, Uint(op == kBinPut ? 1 : 4));
    FSDP_ASSIGN_OR_RETURN(Object * top, Top());
    memo_[index] = top;
    return absl::OkStatus();
  }
  if (op == kMemoize) {
    FSDP_ASSIGN_OR_RETURN(Object * top, Top());
    memo_[memo_.size()] = top;
    return absl::OkStatus();
  }
  // BINGET, LONG_BINGET
  FSDP_ASSIGN_OR_RETURN(uint64_t index, Uint(op == kBinGet ? 1 : 4));
  auto it = memo_.find(index);
  if (it == memo_.end()) return Bad(absl::StrCat("memo index ", index, " was never set"));
  Push(it->second);
  return absl::OkStatus();
}

absl::Status Unpickler::StackOp(uint8_t op) {
  switch (op) {
    case kMark:
      marks_.push_back(stack_.size());
      return absl::OkStatus();
    case kPop:
      return Pop().status();
    case kPopMark:
      return PopToMark().status();
    default: {  // DUP
      FSDP_ASSIGN_OR_RETURN(Object * top, Top());
      Push(top);
      return absl::OkStatus();
    }
  }
}

// TUPLE (the items since the MARK), TUPLE1..3.
absl::Status Unpickler::TupleOp(uint8_t op) {
  std::vector<Object*> items;
  if (op == kTuple) {
    FSDP_ASSIGN_OR_RETURN(items, PopToMark());
  } else {
    const size_t n = op - kTuple1 + 1;
    if (stack_.size() < n + CurrentMark()) return Bad("stack underflow");
    items.assign(stack_.end() - n, stack_.end());
    stack_.resize(stack_.size() - n);
  }
  Push(NewTuple(std::move(items)));
  return absl::OkStatus();
}

absl::Status Unpickler::FillContainerOp(uint8_t op) {
  if (op == kAppend || op == kAppends) {
    std::vector<Object*> items;
    if (op == kAppend) {
      FSDP_ASSIGN_OR_RETURN(Object * item, Pop());
      items.push_back(item);
    } else {
      FSDP_ASSIGN_OR_RETURN(items, PopToMark());
    }
    FSDP_ASSIGN_OR_RETURN(Object * list, Top());
    if (list->kind != Kind::kList) {
      return Bad(absl::StrCat(op == kAppend ? "APPEND" : "APPENDS", " to a ", KindName(*list)));
    }
    list->items.insert(list->items.end(), items.begin(), items.end());
    return absl::OkStatus();
  }
  if (op == kSetItem) {
    FSDP_ASSIGN_OR_RETURN(Object * value, Pop());
    FSDP_ASSIGN_OR_RETURN(Object * key, Pop());
    FSDP_ASSIGN_OR_RETURN(Object * dict, Top());
    return SetItem(dict, key, value);
  }
  // SETITEMS
  FSDP_ASSIGN_OR_RETURN(std::vector<Object*> items, PopToMark());
  if (items.size() % 2 != 0) return Bad("SETITEMS with an odd number of items");
  FSDP_ASSIGN_OR_RETURN(Object * dict, Top());
  for (size_t k = 0; k < items.size(); k += 2) {
    FSDP_RETURN_IF_ERROR(SetItem(dict, items[k], items[k + 1]));
  }
  return absl::OkStatus();
}

absl::Status Unpickler::GlobalOp(uint8_t op) {
  if (op == kGlobal) {  // "module\nname\n"
    FSDP_ASSIGN_OR_RETURN(std::string module, Line());
    FSDP_ASSIGN_OR_RETURN(std::string name, Line());
    FSDP_ASSIGN_OR_RETURN(Object * global, Global(module, name));
    Push(global);
    return absl::OkStatus();
  }
  // STACK_GLOBAL
  FSDP_ASSIGN_OR_RETURN(Object * name, Pop());
  FSDP_ASSIGN_OR_RETURN(Object * module, Pop());
  if (module->kind != Kind::kStr || name->kind != Kind::kStr) {
    return Bad("STACK_GLOBAL without two strs");
  }
  FSDP_ASSIGN_OR_RETURN(Object * global, Global(module->s, name->s));
  Push(global);
  return absl::OkStatus();
}

// The opcodes whose meaning is the client's.
absl::Status Unpickler::ClientOp(uint8_t op) {
  switch (op) {
    case kReduce: {
      FSDP_ASSIGN_OR_RETURN(Object * args, Pop());
      FSDP_ASSIGN_OR_RETURN(Object * callable, Pop());
      FSDP_ASSIGN_OR_RETURN(Object * result, Reduce(callable, args));
      Push(result);
      return absl::OkStatus();
    }
    case kBuild: {
      FSDP_ASSIGN_OR_RETURN(Object * state, Pop());
      FSDP_ASSIGN_OR_RETURN(Object * instance, Top());
      return client_.Build(*this, *instance, *state);
    }
    case kBinPersId: {
      FSDP_ASSIGN_OR_RETURN(Object * pid, Pop());
      FSDP_ASSIGN_OR_RETURN(Object * loaded, client_.PersistentLoad(*this, *pid));
      Push(loaded);
      return absl::OkStatus();
    }
    default: {  // NEWOBJ, NEWOBJ_EX
      if (!client_.TakesNewObj()) return Unsupported(op);
      Object* kwargs = nullptr;
      if (op == kNewObjEx) {
        FSDP_ASSIGN_OR_RETURN(kwargs, Pop());
      }
      FSDP_ASSIGN_OR_RETURN(Object * args, Pop());
      FSDP_ASSIGN_OR_RETURN(Object * cls, Pop());
      FSDP_ASSIGN_OR_RETURN(Object * result, NewObj(cls, args, kwargs));
      Push(result);
      return absl::OkStatus();
    }
  }
}

absl::Status Unpickler::Unsupported(uint8_t op) const {
  return Bad(absl::StrCat("unsupported pickle opcode 0x", absl::Hex(op),
                          (op >= 0x20 && op < 0x7f)
                              ? absl::StrCat(" ('", std::string(1, static_cast<char>(op)), "')")
                              : "",
                          "; ", client_.Writer(), " does not write it"));
}

// ------------------------------------------------------------------------------------------
// Objects, errors, the stack and the input.

Object* Unpickler::New(Kind kind) {
  Object* o = &arena_.emplace_back(kind);
  if (kind == Kind::kDict) o->dict = std::make_unique<DictData>();
  return o;
}

Object* Unpickler::NewTuple(std::vector<Object*> items) {
  Object* o = New(Kind::kTuple);
  o->items = std::move(items);
  return o;
}

Object* Unpickler::NewGlobal(const std::string& name) {
  Object* o = New(Kind::kGlobal);
  o->s = name;
  return o;
}

Object* Unpickler::NewObject(const char* type_name) {
  Object* o = New(Kind::kObject);
  o->type_name = type_name;
  return o;
}

absl::Status Unpickler::Bad(absl::string_view what) const {
  return absl::InvalidArgumentError(
      absl::StrCat(file_, ": ", entry_, " at byte ", op_pos_, ": ", what));
}

absl::Status Unpickler::RefuseGlobal(const std::string& name, absl::string_view allowed) const {
  return absl::InvalidArgumentError(absl::StrCat("refusing to load global ", Printable(name),
                                                 " from ", file_, " (", entry_, " at byte ",
                                                 op_pos_, "; only ", allowed, " are allowed)"));
}

absl::Status Unpickler::Truncated(const std::string& where) const {
  return absl::DataLossError(absl::StrCat(file_, ": ", entry_, " ends at byte ", data_.size(), " ",
                                          where, " (truncated or corrupted)"));
}

void Unpickler::PushInt(int64_t v) {
  Object* o = New(Kind::kInt);
  o->i = v;
  Push(o);
}

absl::StatusOr<Object*> Unpickler::Pop() {
  if (stack_.size() <= CurrentMark()) return Bad("stack underflow");
  Object* o = stack_.back();
  stack_.pop_back();
  return o;
}

absl::StatusOr<Object*> Unpickler::Top() {
  if (stack_.size() <= CurrentMark()) return Bad("stack underflow");
  return stack_.back();
}

absl::StatusOr<std::vector<Object*>> Unpickler::PopToMark() {
  if (marks_.empty()) return Bad("no MARK on the stack");
  const size_t mark = marks_.back();
  marks_.pop_back();
  std::vector<Object*> items(stack_.begin() + mark, stack_.end());
  stack_.resize(mark);
  return items;
}

absl::StatusOr<uint64_t> Unpickler::Uint(int n) {
  if (data_.size() - pos_ < static_cast<size_t>(n)) return Truncated("inside an opcode's argument");
  const uint64_t v = ReadLE(data_.data() + pos_, n);
  pos_ += n;
  return v;
}

absl::StatusOr<std::string_view> Unpickler::Bytes(uint64_t n) {
  if (n > data_.size() - pos_) {
    return Truncated(
        absl::StrCat("inside a ", n, "-byte argument of the opcode at byte ", op_pos_));
  }
  std::string_view out = data_.substr(pos_, n);
  pos_ += n;
  return out;
}

absl::StatusOr<std::string> Unpickler::Line() {
  const size_t end = data_.find('\n', pos_);
  if (end == std::string_view::npos) return Truncated("inside a GLOBAL's name");
  std::string line(data_.substr(pos_, end - pos_));
  pos_ = end + 1;
  return line;
}

absl::StatusOr<int64_t> Unpickler::DecodeLong(std::string_view bytes) const {
  if (bytes.empty()) return 0;
  const size_t n = bytes.size();
  // Bytes beyond the eighth must only extend the sign of the eighth.
  const size_t low = std::min<size_t>(n, 8);
  const bool negative = static_cast<uint8_t>(bytes[low - 1]) & 0x80;
  for (size_t k = 8; k < n; ++k) {
    if (static_cast<uint8_t>(bytes[k]) != (negative ? 0xFF : 0x00)) {
      return Bad("an int beyond 64 bits (not supported)");
    }
  }
  uint64_t v = ReadLE(bytes.data(), static_cast<int>(low));
  if (negative && low < 8) v |= ~uint64_t{0} << (8 * low);
  return static_cast<int64_t>(v);
}

// ------------------------------------------------------------------------------------------
// What the client decides, around the checks that hold for every client.

absl::StatusOr<Object*> Unpickler::Global(std::string module, const std::string& name) {
  if (protocol_ < 3 && module == "__builtin__") module = "builtins";  // fix_imports
  return client_.Global(*this, absl::StrCat(module, ".", name));
}

absl::Status Unpickler::SetItem(Object* dict, Object* key, Object* value) {
  if (dict->kind != Kind::kDict) return Bad(absl::StrCat("SETITEM on a ", KindName(*dict)));
  // Python's dict semantics for the key types of state dicts: an equal key is replaced in
  // place. (1 == True, as in Python.) Other key types are kept as they come.
  if (key->kind == Kind::kStr) {
    auto [it, inserted] = dict->dict->str_index.emplace(key->s, dict->dict->items.size());
    if (!inserted) {
      dict->dict->items[it->second].second = value;
      return absl::OkStatus();
    }
  } else if (key->kind == Kind::kInt || key->kind == Kind::kBool) {
    const int64_t k = key->kind == Kind::kInt ? key->i : key->b;
    auto [it, inserted] = dict->dict->int_index.emplace(k, dict->dict->items.size());
    if (!inserted) {
      dict->dict->items[it->second].second = value;
      return absl::OkStatus();
    }
  } else if (key->kind == Kind::kList || key->kind == Kind::kDict) {
    return Bad(absl::StrCat("unhashable dict key of type ", KindName(*key)));
  }
  dict->dict->items.emplace_back(key, value);
  return absl::OkStatus();
}

absl::StatusOr<Object*> Unpickler::Reduce(Object* callable, Object* args) {
  if (callable->kind != Kind::kGlobal) {
    return Bad(absl::StrCat("REDUCE calls a ", KindName(*callable)));
  }
  if (args->kind != Kind::kTuple) {
    return Bad(
        absl::StrCat("REDUCE of ", callable->s, " with a ", KindName(*args), " for arguments"));
  }
  return client_.Reduce(*this, *callable, args->items);
}

absl::StatusOr<Object*> Unpickler::NewObj(Object* cls, Object* args, const Object* kwargs) {
  if (cls->kind != Kind::kGlobal) return Bad(absl::StrCat("NEWOBJ of a ", KindName(*cls)));
  if (args->kind != Kind::kTuple) {
    return Bad(absl::StrCat("NEWOBJ of ", cls->s, " with a ", KindName(*args), " for arguments"));
  }
  if (kwargs != nullptr && kwargs->kind != Kind::kDict) {
    return Bad(absl::StrCat("NEWOBJ_EX of ", cls->s, " with a ", KindName(*kwargs),
                            " for keyword arguments"));
  }
  return client_.NewObj(*this, *cls, args->items, kwargs);
}

}  // namespace fsdp::checkpoint::pickle
