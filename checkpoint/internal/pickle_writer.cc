// See pickle_writer.h. CPython's choices mirrored here: Lib/pickle.py's _Pickler (save_long,
// save_tuple, _batch_appends, _batch_setitems, memoize).
#include "checkpoint/internal/pickle_writer.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "checkpoint/internal/torch_dtype_names.h"

namespace fsdp::checkpoint::internal {
namespace {

namespace op {
constexpr char kProto = '\x80', kGlobal = 'c', kBinPut = 'q', kLongBinPut = 'r', kBinGet = 'h',
               kLongBinGet = 'j', kMark = '(', kEmptyTuple = ')', kTuple = 't', kEmptyDict = '}',
               kSetItem = 's', kSetItems = 'u', kEmptyList = ']', kAppend = 'a', kAppends = 'e',
               kNone = 'N', kTrue = '\x88', kFalse = '\x89', kBinInt1 = 'K', kBinInt2 = 'M',
               kBinInt = 'J', kLong1 = '\x8a', kBinFloat = 'G', kBinUnicode = 'X', kReduce = 'R',
               kNewObj = '\x81', kBuild = 'b', kBinPersId = 'Q', kStop = '.';
constexpr char kTupleN[] = {'\0', '\x85', '\x86', '\x87'};  // TUPLE1..TUPLE3
}  // namespace op

}  // namespace

PickleWriter::PickleWriter(bool memoize_all) : memoize_all_(memoize_all) {
  out_ += {op::kProto, '\x02'};
}

void PickleWriter::Le(uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out_ += static_cast<char>((v >> (8 * i)) & 0xff);
}

void PickleWriter::Memo() {
  if (!memoize_all_) return;
  const uint32_t index = next_memo_++;
  if (index < 256) {
    out_ += {op::kBinPut, static_cast<char>(index)};
  } else {
    out_ += op::kLongBinPut;
    Le(index, 4);
  }
}

void PickleWriter::Global(const std::string& module, const std::string& name) {
  const std::string key = absl::StrCat(module, "\n", name);
  auto it = globals_.find(key);
  if (it != globals_.end()) {
    if (it->second < 256) {
      out_ += {op::kBinGet, static_cast<char>(it->second)};
    } else {
      out_ += op::kLongBinGet;
      Le(it->second, 4);
    }
    return;
  }
  absl::StrAppend(&out_, std::string(1, op::kGlobal), key, "\n");
  const uint32_t index = next_memo_;
  globals_.emplace(key, index);
  if (memoize_all_) {
    Memo();
  } else {  // only globals are memoized: their own count
    ++next_memo_;
    if (index < 256) {
      out_ += {op::kBinPut, static_cast<char>(index)};
    } else {
      out_ += op::kLongBinPut;
      Le(index, 4);
    }
  }
}

void PickleWriter::None() { out_ += op::kNone; }
void PickleWriter::Bool(bool b) { out_ += b ? op::kTrue : op::kFalse; }

void PickleWriter::Int(int64_t v) {
  if (v >= 0 && v < 256) {
    out_ += {op::kBinInt1, static_cast<char>(v)};
  } else if (v >= 0 && v < 65536) {
    out_ += op::kBinInt2;
    Le(static_cast<uint64_t>(v), 2);
  } else if (v >= INT32_MIN && v <= INT32_MAX) {
    out_ += op::kBinInt;
    Le(static_cast<uint32_t>(static_cast<int32_t>(v)), 4);
  } else {
    // encode_long: the fewest little-endian two's-complement bytes.
    int n = 8;
    const auto u = static_cast<uint64_t>(v);
    while (n > 1) {
      const uint8_t top = (u >> (8 * (n - 1))) & 0xff;
      const uint8_t next_sign = (u >> (8 * (n - 2) + 7)) & 1;
      if ((top == 0x00 && next_sign == 0) || (top == 0xff && next_sign == 1)) {
        --n;
      } else {
        break;
      }
    }
    out_ += {op::kLong1, static_cast<char>(n)};
    Le(u, n);
  }
}

void PickleWriter::Float(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  out_ += op::kBinFloat;
  for (int i = 7; i >= 0; --i) out_ += static_cast<char>((bits >> (8 * i)) & 0xff);
}

void PickleWriter::Str(const std::string& s) {
  out_ += op::kBinUnicode;
  Le(s.size(), 4);
  out_ += s;
  Memo();
}

void PickleWriter::TupleBegin(size_t n) {
  if (n == 0) {
    out_ += op::kEmptyTuple;
  } else if (n > 3) {
    out_ += op::kMark;
  }
}

void PickleWriter::TupleEnd(size_t n) {
  if (n == 0) return;
  out_ += n > 3 ? op::kTuple : op::kTupleN[n];
  Memo();
}

// An empty list or dict, memoized, then its n items: as _batch_appends / _batch_setitems, in
// one batch after a MARK (n > 1) or with the single-item opcode.
void PickleWriter::ContainerBegin(char empty, size_t n) {
  out_ += empty;
  Memo();
  if (n > 1) out_ += op::kMark;
}

void PickleWriter::ContainerEnd(char batch, char single, size_t n) {
  if (n > 1) out_ += batch;
  if (n == 1) out_ += single;
}

void PickleWriter::ListBegin(size_t n) { ContainerBegin(op::kEmptyList, n); }
void PickleWriter::ListEnd(size_t n) { ContainerEnd(op::kAppends, op::kAppend, n); }
void PickleWriter::DictBegin(size_t n) { ContainerBegin(op::kEmptyDict, n); }
void PickleWriter::DictEnd(size_t n) { ContainerEnd(op::kSetItems, op::kSetItem, n); }

void PickleWriter::Reduce() {
  out_ += op::kReduce;
  Memo();
}

void PickleWriter::BinPersId() { out_ += op::kBinPersId; }

void PickleWriter::NewObj(const std::string& module, const std::string& name) {
  Global(module, name);
  out_ += {op::kEmptyTuple, op::kNewObj};
  Memo();
}

void PickleWriter::Build() { out_ += op::kBuild; }

void PickleWriter::Size(const std::vector<int64_t>& shape) {
  Global("torch", "Size");
  TupleBegin(1);
  TupleBegin(shape.size());
  for (int64_t d : shape) Int(d);
  TupleEnd(shape.size());
  TupleEnd(1);
  Reduce();
}

std::string PickleWriter::Finish() {
  out_ += op::kStop;
  return std::move(out_);
}

absl::StatusOr<std::string> TorchSaveTensorPickle(const at::Tensor& t) {
  const char* storage = nullptr;
  for (const TorchDtypeName& d : kTorchDtypeNames) {
    if (d.dtype == t.scalar_type()) storage = d.storage;
  }
  if (storage == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a ", std::string(c10::toString(t.scalar_type())), " tensor cannot be stored"));
  }
  const std::string storage_name(storage);
  PickleWriter p(/*memoize_all=*/true);
  p.Global("torch._utils", "_rebuild_tensor_v2");
  p.TupleBegin(6);
  p.TupleBegin(5);  // the persistent id
  p.Str("storage");
  p.Global("torch", storage_name.substr(sizeof("torch.") - 1));
  p.Str("0");
  p.Str("cpu");
  p.Int(t.numel());
  p.TupleEnd(5);
  p.BinPersId();
  p.Int(t.storage_offset());
  for (const auto& dims : {t.sizes(), t.strides()}) {
    p.TupleBegin(dims.size());
    for (int64_t d : dims) p.Int(d);
    p.TupleEnd(dims.size());
  }
  p.Bool(false);                           // requires_grad
  p.Global("collections", "OrderedDict");  // backward hooks
  p.TupleBegin(0);
  p.TupleEnd(0);
  p.Reduce();
  p.TupleEnd(6);
  p.Reduce();
  return p.Finish();
}

namespace {

absl::Status PushValue(PickleWriter& p, const optim_state::StateValue& v,
                       const std::string& where) {
  if (v.IsNone()) {
    p.None();
  } else if (const bool* b = v.GetIf<bool>()) {
    p.Bool(*b);
  } else if (const int64_t* i = v.GetIf<int64_t>()) {
    p.Int(*i);
  } else if (const double* d = v.GetIf<double>()) {
    p.Float(*d);
  } else if (const std::string* s = v.GetIf<std::string>()) {
    p.Str(*s);
  } else if (const auto* seq = v.GetIf<optim_state::StateSequence>()) {
    const size_t n = seq->items.size();
    seq->is_tuple ? p.TupleBegin(n) : p.ListBegin(n);
    for (const optim_state::StateValue& item : seq->items) {
      absl::Status s = PushValue(p, item, where);
      if (!s.ok()) return s;
    }
    seq->is_tuple ? p.TupleEnd(n) : p.ListEnd(n);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": a ", v.TypeName(), " cannot be stored as a bytes entry"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> TorchSaveValuePickle(const optim_state::StateValue& value,
                                                 const std::string& where) {
  PickleWriter p(/*memoize_all=*/true);
  absl::Status s = PushValue(p, value, where);
  if (!s.ok()) return s;
  return p.Finish();
}

}  // namespace fsdp::checkpoint::internal
