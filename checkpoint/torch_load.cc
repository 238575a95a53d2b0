// See torch_load.h. Layout of this file: torch.save's side of the pickle machine (pickle.h):
// its allow-list of globals, what REDUCE of each makes (tensors rebuilt on storages, the
// containers and bytes of protocol 2), storages read from the zip archive as persistent ids;
// then the conversion of the machine's result into a PyValue tree; the public functions.
#include "checkpoint/torch_load.h"

#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/internal/file_bytes.h"
#include "checkpoint/internal/torch_dtype_names.h"
#include "checkpoint/internal/zip_reader.h"
#include "checkpoint/pickle.h"
#include "comm/status_macros.h"

// Storages are copied byte for byte into tensors, and torch.save writes little-endian data.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "TorchLoad needs a little-endian host");

namespace fsdp::checkpoint {

// TorchLoadLazy's access to TorchStorages.
class TorchStoragesBuilder {
 public:
  // A 1-D tensor of `numel` elements on a storage without memory, recorded as `entry`'s.
  static at::Tensor Unread(TorchStorages& storages, const ZipEntry& entry, int64_t numel,
                           at::ScalarType dtype);
  // Reads `t`'s storage now, for good: it is no longer one of the lazy ones.
  static absl::Status ReadNow(TorchStorages& storages, const at::Tensor& t);
  static absl::StatusOr<LazyTorchLoad> Load(const std::string& path);
};

namespace {

using pickle::Kind;
using pickle::KindName;
using pickle::Object;
using pickle::Unpickler;

// ------------------------------------------------------------------------------------------
// The globals torch.save writes.

std::optional<at::ScalarType> StorageDtype(const std::string& global) {
  return DtypeNamed(global, /*storage=*/true);
}

// Globals whose REDUCE the client emulates (it never calls anything named in the file).
bool IsAllowedGlobal(const std::string& name) {
  static const char* const kCallables[] = {
      "collections.OrderedDict",
      "torch._utils._rebuild_tensor_v2",
      "torch._utils._rebuild_parameter",
      "torch._utils._rebuild_parameter_with_state",
      "torch.Size",
      "_codecs.encode",
      "builtins.bytes",
      // LibTorch's torch::pickle_save tags typed dicts and lists with their TorchScript type:
      // restore_type_tag(obj, "Dict[str, Tensor]") returns obj. We keep obj, ignore the tag.
      "torch.jit._pickle.restore_type_tag",
      // A tensor whose Python object carries attributes (PyTorch 2.x's FSDP1 full state dict
      // marks each tensor `_has_been_cloned`): _rebuild_from_type_v2(_rebuild_tensor_v2,
      // torch.Tensor, args, {attributes}). The two types are only ever its argument.
      "torch._tensor._rebuild_from_type_v2",
      "torch.Tensor",
      "torch.nn.parameter.Parameter",
  };
  for (const char* allowed : kCallables) {
    if (name == allowed) return true;
  }
  return StorageDtype(name).has_value();
}

// The type name of storage objects: a storage's `s` is its key, its `tensor` the 1-D base.
constexpr char kStorage[] = "storage";

bool IsStorage(const Object& o) { return o.kind == Kind::kObject && o.type_name == kStorage; }

// ------------------------------------------------------------------------------------------
// torch.save's side of the pickle machine.

class TorchSaveClient : public pickle::UnpicklerClient {
 public:
  // `lazy`: TorchLoadLazy's storages, which the big ones are left to.
  TorchSaveClient(const ZipReader& zip, const std::string& prefix, TorchStorages* lazy)
      : zip_(zip), prefix_(prefix), lazy_(lazy) {}

  absl::string_view Writer() const override { return "torch.save"; }

  absl::StatusOr<Object*> Global(Unpickler& machine, const std::string& name) override {
    if (!IsAllowedGlobal(name)) {
      return machine.RefuseGlobal(name,
                                  "the globals torch.save writes for tensors and state dicts");
    }
    return machine.NewGlobal(name);
  }

  // BUILD: only the attributes of an OrderedDict (a state dict's _metadata), dropped.
  absl::Status Build(Unpickler& machine, Object& instance, Object& state) override {
    if (instance.kind != Kind::kDict) {
      return machine.Bad(
          absl::StrCat("BUILD on a ", KindName(instance),
                       " (only an OrderedDict's attributes are accepted, and dropped)"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Object*> Reduce(Unpickler& machine, const Object& callable,
                                 const std::vector<Object*>& args) override;
  absl::StatusOr<Object*> PersistentLoad(Unpickler& machine, Object& pid) override;

 private:
  absl::Status WrongArgs(Unpickler& machine, const std::string& fn,
                         const std::vector<Object*>& args) const;
  absl::StatusOr<Object*> RebuildFromType(Unpickler& machine, const std::string& fn,
                                          const std::vector<Object*>& args);
  absl::StatusOr<Object*> RebuildParameter(Unpickler& machine, const std::string& fn,
                                           const std::vector<Object*>& args);
  absl::StatusOr<Object*> RebuildTensor(Unpickler& machine, const Object& storage, int64_t offset,
                                        const std::vector<Object*>& size,
                                        const std::vector<Object*>& stride, bool requires_grad);
  absl::StatusOr<Object*> EncodeLatin1(Unpickler& machine, const std::string& fn,
                                       const std::vector<Object*>& args);
  absl::Status SetRequiresGrad(Unpickler& machine, at::Tensor& t, bool requires_grad);

  const ZipReader& zip_;
  const std::string& prefix_;
  TorchStorages* const lazy_;
  std::unordered_map<std::string, Object*> storages_;
};

absl::Status TorchSaveClient::WrongArgs(Unpickler& machine, const std::string& fn,
                                        const std::vector<Object*>& args) const {
  std::vector<std::string> kinds;
  for (const Object* o : args) kinds.push_back(KindName(*o));
  return machine.Bad(
      absl::StrCat("unexpected arguments to ", fn, ": (", absl::StrJoin(kinds, ", "), ")"));
}

absl::StatusOr<Object*> TorchSaveClient::Reduce(Unpickler& machine, const Object& callable,
                                                const std::vector<Object*>& a) {
  const std::string& fn = callable.s;
  if (fn == "collections.OrderedDict") {
    if (!a.empty()) return WrongArgs(machine, fn, a);
    return machine.New(Kind::kDict);
  }
  if (fn == "torch.jit._pickle.restore_type_tag") {
    if (a.size() != 2 || a[1]->kind != Kind::kStr) return WrongArgs(machine, fn, a);
    return a[0];
  }
  if (fn == "torch.Size") {
    if (a.size() != 1 || a[0]->kind != Kind::kTuple) return WrongArgs(machine, fn, a);
    return machine.NewTuple(a[0]->items);
  }
  if (fn == "builtins.bytes") {  // protocol 2's empty bytes
    if (!a.empty()) return WrongArgs(machine, fn, a);
    return machine.New(Kind::kBytes);
  }
  if (fn == "_codecs.encode") return EncodeLatin1(machine, fn, a);
  if (fn == "torch._utils._rebuild_tensor_v2") {
    // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    if ((a.size() != 6 && a.size() != 7) || !IsStorage(*a[0]) || a[1]->kind != Kind::kInt ||
        a[2]->kind != Kind::kTuple || a[3]->kind != Kind::kTuple || a[4]->kind != Kind::kBool) {
      return WrongArgs(machine, fn, a);
    }
    return RebuildTensor(machine, *a[0], a[1]->i, a[2]->items, a[3]->items, a[4]->b);
  }
  if (fn == "torch._tensor._rebuild_from_type_v2") return RebuildFromType(machine, fn, a);
  if (fn == "torch._utils._rebuild_parameter" ||
      fn == "torch._utils._rebuild_parameter_with_state") {
    return RebuildParameter(machine, fn, a);
  }
  return machine.Bad(absl::StrCat(fn, " cannot be called"));
}

// Protocol 2's bytes: encode(str, 'latin1'), the str holding each byte as one code point.
absl::StatusOr<Object*> TorchSaveClient::EncodeLatin1(Unpickler& machine, const std::string& fn,
                                                      const std::vector<Object*>& a) {
  if (a.size() != 2 || a[0]->kind != Kind::kStr || a[1]->kind != Kind::kStr ||
      (a[1]->s != "latin1" && a[1]->s != "latin-1")) {
    return WrongArgs(machine, fn, a);
  }
  const std::string& utf8 = a[0]->s;
  std::string out;
  for (size_t k = 0; k < utf8.size();) {
    const uint8_t c = static_cast<uint8_t>(utf8[k]);
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
      k += 1;
    } else if ((c & 0xE0) == 0xC0 && k + 1 < utf8.size() && c <= 0xC3) {
      out.push_back(static_cast<char>(((c & 0x1F) << 6) | (utf8[k + 1] & 0x3F)));
      k += 2;
    } else {
      return machine.Bad("_codecs.encode of a str that is not latin-1");
    }
  }
  Object* o = machine.New(Kind::kBytes);
  o->s = std::move(out);
  return o;
}

// (func, new_type, args, state): func(*args) as new_type, with state's attributes set on the
// Python object. Only _rebuild_tensor_v2 as a plain tensor or a Parameter; the attributes are
// Python's alone and are dropped (Python's weights_only load keeps them).
absl::StatusOr<Object*> TorchSaveClient::RebuildFromType(Unpickler& machine, const std::string& fn,
                                                         const std::vector<Object*>& a) {
  if (a.size() != 4 || a[0]->kind != Kind::kGlobal || a[1]->kind != Kind::kGlobal ||
      a[2]->kind != Kind::kTuple || (a[3]->kind != Kind::kNone && a[3]->kind != Kind::kDict)) {
    return WrongArgs(machine, fn, a);
  }
  if (a[0]->s != "torch._utils._rebuild_tensor_v2" ||
      (a[1]->s != "torch.Tensor" && a[1]->s != "torch.nn.parameter.Parameter")) {
    return machine.Bad(absl::StrCat(fn, " of ", a[0]->s, " as ", a[1]->s,
                                    ": only torch._utils._rebuild_tensor_v2 as torch.Tensor or "
                                    "torch.nn.parameter.Parameter is allowed"));
  }
  return Reduce(machine, *a[0], a[2]->items);
}

// (data, requires_grad, backward_hooks[, state])
absl::StatusOr<Object*> TorchSaveClient::RebuildParameter(Unpickler& machine, const std::string& fn,
                                                          const std::vector<Object*>& a) {
  const size_t n = fn == "torch._utils._rebuild_parameter" ? 3 : 4;
  if (a.size() != n || a[0]->kind != Kind::kTensor || a[1]->kind != Kind::kBool) {
    return WrongArgs(machine, fn, a);
  }
  Object* o = machine.New(Kind::kTensor);
  o->tensor = a[0]->tensor;
  FSDP_RETURN_IF_ERROR(SetRequiresGrad(machine, o->tensor, a[1]->b));
  return o;
}

absl::Status TorchSaveClient::SetRequiresGrad(Unpickler& machine, at::Tensor& t,
                                              bool requires_grad) {
  if (!requires_grad) return absl::OkStatus();
  if (!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type())) {
    return machine.Bad(absl::StrCat("requires_grad on a ",
                                    std::string(c10::toString(t.scalar_type())), " tensor"));
  }
  return CallTorch(absl::StrCat(machine.file(), ": requires_grad"),
                   [&] { t.set_requires_grad(true); });
}

absl::StatusOr<Object*> TorchSaveClient::RebuildTensor(Unpickler& machine, const Object& storage,
                                                       int64_t offset,
                                                       const std::vector<Object*>& size,
                                                       const std::vector<Object*>& stride,
                                                       bool requires_grad) {
  const std::string& file = machine.file();
  const std::string where = absl::StrCat("tensor on storage '", Printable(storage.s), "' (",
                                         prefix_, "data/", Printable(storage.s), ")");
  auto bad_view = [&](const std::string& why) {
    std::vector<std::string> sz, st;
    for (const Object* o : size) sz.push_back(o->kind == Kind::kInt ? absl::StrCat(o->i) : "?");
    for (const Object* o : stride) st.push_back(o->kind == Kind::kInt ? absl::StrCat(o->i) : "?");
    return absl::DataLossError(absl::StrCat(file, ": ", where, ": view with offset ", offset,
                                            ", size [", absl::StrJoin(sz, ", "), "], stride [",
                                            absl::StrJoin(st, ", "), "] ", why));
  };
  constexpr size_t kMaxDims = 64;
  if (size.size() != stride.size() || size.size() > kMaxDims) {
    return bad_view("has mismatched or too many dimensions");
  }
  const int64_t numel = storage.tensor.numel();
  std::vector<int64_t> sizes, strides;
  bool empty = false;
  int64_t count = 1;
  for (size_t d = 0; d < size.size(); ++d) {
    if (size[d]->kind != Kind::kInt || stride[d]->kind != Kind::kInt || size[d]->i < 0 ||
        stride[d]->i < 0) {
      return bad_view("has a size or stride that is not a non-negative int");
    }
    sizes.push_back(size[d]->i);
    strides.push_back(stride[d]->i);
    if (size[d]->i == 0)
      empty = true;
    else if (__builtin_mul_overflow(count, size[d]->i, &count))
      return bad_view("has too many elements");
  }
  if (offset < 0 || offset > numel)
    return bad_view(absl::StrCat("starts outside the storage's ", numel, " elements"));
  if (!empty) {
    int64_t last = offset;  // index of the view's last element
    for (size_t d = 0; d < sizes.size(); ++d) {
      int64_t step = 0;
      if (__builtin_mul_overflow(sizes[d] - 1, strides[d], &step) ||
          __builtin_add_overflow(last, step, &last)) {
        return bad_view("overflows");
      }
    }
    if (last >= numel) {
      return bad_view(
          absl::StrCat("reaches element ", last, " of a storage of ", numel, " elements"));
    }
  }
  // A zero-dimension tensor is a scalar state that checks compare by value before any unit is
  // read: it is read now.
  if (lazy_ != nullptr && sizes.empty()) {
    FSDP_RETURN_IF_ERROR(TorchStoragesBuilder::ReadNow(*lazy_, storage.tensor));
  }
  Object* o = machine.New(Kind::kTensor);
  FSDP_ASSIGN_OR_RETURN(o->tensor, CallTorch(absl::StrCat(file, ": ", where), [&] {
                          return storage.tensor.as_strided(sizes, strides, offset);
                        }));
  FSDP_RETURN_IF_ERROR(SetRequiresGrad(machine, o->tensor, requires_grad));
  return o;
}

// ('storage', storage_type, key, location, numel) -> the storage's 1-D base tensor, read
// once per key from <prefix>data/<key>.
absl::StatusOr<Object*> TorchSaveClient::PersistentLoad(Unpickler& machine, Object& pid) {
  const std::vector<Object*>& p = pid.items;
  if (pid.kind != Kind::kTuple || p.size() != 5 || p[0]->kind != Kind::kStr ||
      p[0]->s != "storage" || p[1]->kind != Kind::kGlobal || p[2]->kind != Kind::kStr ||
      p[3]->kind != Kind::kStr || p[4]->kind != Kind::kInt) {
    return machine.Bad("persistent id is not ('storage', storage_type, key, location, numel)");
  }
  const std::optional<at::ScalarType> dtype = StorageDtype(p[1]->s);
  if (!dtype) return machine.Bad(absl::StrCat(p[1]->s, " is not a storage type"));
  const std::string& file = machine.file();
  const std::string& key = p[2]->s;
  const int64_t numel = p[4]->i;
  const std::string entry_name = absl::StrCat(prefix_, "data/", key);
  const std::string where =
      absl::StrCat("storage '", Printable(key), "' (", Printable(entry_name), ")");
  auto cached = storages_.find(key);
  if (cached != storages_.end()) {
    Object* s = cached->second;
    if (s->tensor.scalar_type() != *dtype || s->tensor.numel() != numel) {
      return absl::DataLossError(absl::StrCat(file, ": ", where, " is used as ", p[1]->s, " of ",
                                              numel, " elements and as ",
                                              std::string(c10::toString(s->tensor.scalar_type())),
                                              " of ", s->tensor.numel(), " elements"));
    }
    return s;
  }
  const ZipEntry* entry = zip_.Find(entry_name);
  if (entry == nullptr) {
    return absl::DataLossError(absl::StrCat(file, ": ", where, " is missing from the archive"));
  }
  const uint64_t itemsize = c10::elementSize(*dtype);
  uint64_t nbytes = 0;
  if (numel < 0 || __builtin_mul_overflow(static_cast<uint64_t>(numel), itemsize, &nbytes) ||
      nbytes != entry->size) {
    return absl::DataLossError(absl::StrCat(file, ": ", where, ": size mismatch: the pickle says ",
                                            numel, " elements of ", p[1]->s, ", the entry holds ",
                                            entry->size, " bytes"));
  }
  // Only now, with the size checked against the archive, allocate.
  Object* s = machine.NewObject(kStorage);
  s->s = key;
  if (lazy_ != nullptr) {
    FSDP_ASSIGN_OR_RETURN(s->tensor, CallTorch(absl::StrCat(file, ": ", where), [&] {
                            return TorchStoragesBuilder::Unread(*lazy_, *entry, numel, *dtype);
                          }));
  } else {
    FSDP_ASSIGN_OR_RETURN(s->tensor, CallTorch(absl::StrCat(file, ": ", where), [&] {
                            return at::empty({numel}, at::TensorOptions().dtype(*dtype));
                          }));
    FSDP_RETURN_IF_ERROR(zip_.Read(*entry, s->tensor.data_ptr()));
  }
  storages_[key] = s;
  return s;
}

// ------------------------------------------------------------------------------------------
// Machine objects -> PyValue. Shared sub-objects are copied; `budget` (bytes) bounds the copies
// so that a small pickle of nested shared lists, or of one long str referenced many times,
// cannot expand into an enormous tree.

absl::StatusOr<PyValue> ToPyValue(const Object* o, int depth, int64_t* budget,
                                  const std::string& file) {
  if (depth > kMaxDepth) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": values nested deeper than ", kMaxDepth, " levels (or a cycle)"));
  }
  *budget -= static_cast<int64_t>(sizeof(PyValue));
  if (o->kind == Kind::kStr || o->kind == Kind::kBytes) *budget -= o->s.size();
  if (*budget < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": the pickle's shared objects expand to too many values"));
  }
  auto items = [&](const std::vector<Object*>& in) -> absl::StatusOr<std::vector<PyValue>> {
    std::vector<PyValue> out;
    out.reserve(in.size());
    for (const Object* item : in) {
      FSDP_ASSIGN_OR_RETURN(PyValue v, ToPyValue(item, depth + 1, budget, file));
      out.push_back(std::move(v));
    }
    return out;
  };
  switch (o->kind) {
    case Kind::kNone:
      return PyValue();
    case Kind::kBool:
      return PyValue(o->b);
    case Kind::kInt:
      return PyValue(o->i);
    case Kind::kFloat:
      return PyValue(o->f);
    case Kind::kStr:
      return PyValue(o->s);
    case Kind::kBytes:
      return PyValue(PyBytes{o->s});
    case Kind::kTensor:
      return PyValue(o->tensor);
    case Kind::kList: {
      FSDP_ASSIGN_OR_RETURN(std::vector<PyValue> v, items(o->items));
      return PyValue(PyList{std::move(v)});
    }
    case Kind::kTuple: {
      FSDP_ASSIGN_OR_RETURN(std::vector<PyValue> v, items(o->items));
      return PyValue(PyTuple{std::move(v)});
    }
    case Kind::kDict: {
      PyDict dict;
      dict.items.reserve(o->dict->items.size());
      for (const auto& [k, v] : o->dict->items) {
        FSDP_ASSIGN_OR_RETURN(PyValue key, ToPyValue(k, depth + 1, budget, file));
        FSDP_ASSIGN_OR_RETURN(PyValue value, ToPyValue(v, depth + 1, budget, file));
        dict.items.emplace_back(std::move(key), std::move(value));
      }
      return PyValue(std::move(dict));
    }
    case Kind::kGlobal:
    case Kind::kObject:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat(file, ": the pickle leaves a bare ", KindName(*o),
                                                 " ", Printable(o->s),
                                                 " in the result (torch.save never does)"));
}

// ------------------------------------------------------------------------------------------
// The archive: <prefix>/data.pkl, its byte order, the pickle run.

absl::StatusOr<const ZipEntry*> FindDataPkl(const ZipReader& zip, const std::string& file) {
  std::vector<const ZipEntry*> pickles;
  for (const auto& [name, entry] : zip.entries()) {
    const size_t slash = name.find('/');
    if (slash != std::string::npos && name.substr(slash) == "/data.pkl") pickles.push_back(&entry);
  }
  if (pickles.size() != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": ",
                     pickles.empty() ? "no <archive>/data.pkl entry: not a torch.save file"
                                     : "more than one <archive>/data.pkl entry"));
  }
  return pickles[0];
}

absl::Status CheckLittleEndian(const ZipReader& zip, const std::string& prefix,
                               const std::string& file) {
  const ZipEntry* byteorder = zip.Find(prefix + "byteorder");
  if (byteorder == nullptr) return absl::OkStatus();
  if (byteorder->size > 16) return absl::DataLossError(absl::StrCat(file, ": bad byteorder entry"));
  std::string order(byteorder->size, '\0');
  FSDP_RETURN_IF_ERROR(zip.Read(*byteorder, order.data()));
  if (order != "little") {
    return absl::InvalidArgumentError(absl::StrCat(file, ": byte order '", Printable(order),
                                                   "' is not supported (only little-endian)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<PyValue> LoadZip(const ZipReader& zip, const std::string& file,
                                TorchStorages* lazy) {
  // <prefix>/data.pkl, whatever the archive's top folder is called.
  FSDP_ASSIGN_OR_RETURN(const ZipEntry* pickle_entry, FindDataPkl(zip, file));
  const std::string prefix = pickle_entry->name.substr(0, pickle_entry->name.size() - 8);
  FSDP_RETURN_IF_ERROR(CheckLittleEndian(zip, prefix, file));
  std::string pickle(pickle_entry->size, '\0');  // size checked against the file
  FSDP_RETURN_IF_ERROR(zip.Read(*pickle_entry, pickle.data()));
  TorchSaveClient client(zip, prefix, lazy);
  Unpickler unpickler(pickle, file, pickle_entry->name, client);
  FSDP_ASSIGN_OR_RETURN(const Object* result, unpickler.Run());
  // A torch.save pickle's tree takes at most a few dozen times its bytes (a 2-byte memo
  // reference to a str copies the str); only sharing that torch.save never writes can exceed
  // this. The fixed part is kept small: found by fuzzing, 64 MiB of it let a 588-byte file of
  // doubly shared lists spend seconds of CPU before being refused.
  int64_t budget = 128 * static_cast<int64_t>(pickle.size()) + (int64_t{1} << 20);
  return ToPyValue(result, 0, &budget, file);
}

absl::StatusOr<PyValue> Load(const Source& source, const std::string& file) {
  ZipReader zip(source, file);
  FSDP_RETURN_IF_ERROR(zip.Open());
  return LoadZip(zip, file, nullptr);
}

}  // namespace

TorchStorages::~TorchStorages() = default;

absl::Status TorchStorages::Read(const std::vector<at::Tensor>& tensors) {
  absl::Status first;
  for (const at::Tensor& t : tensors) {
    if (!t.defined()) continue;
    c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
    auto it = records_.find(impl);
    if (it == records_.end() || it->second.live) continue;
    const ZipEntry& entry = *it->second.entry;
    at::DataPtr data = c10::GetCPUAllocator()->allocate(entry.size);
    absl::Status read = zip_->Read(entry, data.get());
    if (!read.ok()) {
      std::memset(data.get(), 0, entry.size);
      if (first.ok()) first = std::move(read);
    }
    impl->set_data_ptr_noswap(std::move(data));
    it->second.live = true;
    live_bytes_ += static_cast<int64_t>(entry.size);
    max_live_bytes_ = std::max(max_live_bytes_, live_bytes_);
  }
  return first;
}

void TorchStorages::Release(const std::vector<at::Tensor>& tensors) {
  for (const at::Tensor& t : tensors) {
    if (!t.defined()) continue;
    c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
    auto it = records_.find(impl);
    if (it == records_.end() || !it->second.live) continue;
    impl->set_data_ptr_noswap(at::DataPtr(nullptr, at::Device(at::kCPU)));
    it->second.live = false;
    live_bytes_ -= static_cast<int64_t>(it->second.entry->size);
  }
}

at::Tensor TorchStoragesBuilder::Unread(TorchStorages& storages, const ZipEntry& entry,
                                        int64_t numel, at::ScalarType dtype) {
  c10::Storage storage(c10::Storage::use_byte_size_t(), entry.size,
                       at::DataPtr(nullptr, at::Device(at::kCPU)), /*allocator=*/nullptr,
                       /*resizable=*/false);
  at::Tensor t = at::empty({0}, at::TensorOptions().dtype(dtype)).set_(storage, 0, {numel}, {1});
  storages.records_[storage.unsafeGetStorageImpl()] = {&entry, false};
  storages.lazy_bytes_ += static_cast<int64_t>(entry.size);
  return t;
}

absl::Status TorchStoragesBuilder::ReadNow(TorchStorages& storages, const at::Tensor& t) {
  auto it = storages.records_.find(t.storage().unsafeGetStorageImpl());
  if (it == storages.records_.end()) return absl::OkStatus();
  const int64_t max_live = storages.max_live_bytes_;  // not one of the lazy reads
  FSDP_RETURN_IF_ERROR(storages.Read({t}));
  storages.max_live_bytes_ = max_live;
  const auto size = static_cast<int64_t>(it->second.entry->size);
  storages.live_bytes_ -= size;
  storages.lazy_bytes_ -= size;
  storages.records_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<LazyTorchLoad> TorchStoragesBuilder::Load(const std::string& path) {
  std::unique_ptr<TorchStorages> storages(new TorchStorages());
  storages->path_ = path;
  FSDP_ASSIGN_OR_RETURN(storages->source_, FileSource::Open(path));
  storages->zip_ = std::make_unique<ZipReader>(*storages->source_, storages->path_);
  FSDP_RETURN_IF_ERROR(storages->zip_->Open());
  FSDP_ASSIGN_OR_RETURN(PyValue value, LoadZip(*storages->zip_, path, storages.get()));
  return LazyTorchLoad{std::move(value), std::move(storages)};
}

absl::StatusOr<LazyTorchLoad> TorchLoadLazy(const std::string& path) {
  return TorchStoragesBuilder::Load(path);
}

absl::StatusOr<PyValue> TorchLoad(const std::string& path) {
  FSDP_ASSIGN_OR_RETURN(std::unique_ptr<FileSource> source, FileSource::Open(path));
  return Load(*source, path);
}

absl::StatusOr<PyValue> TorchLoadFromSource(const Source& source, const std::string& name) {
  return Load(source, name);
}

absl::StatusOr<PyValue> TorchLoadFromBytes(std::string_view bytes, const std::string& name) {
  BytesSource source(bytes);
  return Load(source, name);
}

}  // namespace fsdp::checkpoint
