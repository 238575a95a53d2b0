// ParseMetadata (dcp_metadata.h): dcp.save's side of the pickle machine (its allow-list of
// globals, NEWOBJ + BUILD of the dataclasses, REDUCE of torch.Size, the layout, the memory
// format enum and pathlib paths), then the machine's objects turned into the data model, each
// field's type checked.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/dcp_metadata.h"
#include "checkpoint/internal/file_bytes.h"
#include "checkpoint/internal/torch_dtype_names.h"
#include "checkpoint/pickle.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint::dcp {
namespace {

using pickle::Kind;
using pickle::KindName;
using pickle::Object;
using pickle::Unpickler;

// The dataclasses dcp.save pickles (NEWOBJ with no arguments, then BUILD); an object's
// type_name points at its entry here.
constexpr const char* kDataclasses[] = {
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
};

// Callables REDUCE runs (emulated).
constexpr char kSize[] = "torch.Size";
constexpr char kGetLayout[] = "torch.serialization._get_layout";
constexpr char kMemFormat[] = "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING";
constexpr char kPosixPath[] = "pathlib.PosixPath";

// Type names of the client's value objects.
constexpr char kDtype[] = "torch.dtype";
constexpr char kMemoryFormatValue[] = "_MEM_FORMAT_ENCODING";

const char* DataclassName(const std::string& name) {
  for (const char* d : kDataclasses) {
    if (name == d) return d;
  }
  return nullptr;
}

class MetadataClient : public pickle::UnpicklerClient {
 public:
  absl::string_view Writer() const override { return "dcp.save"; }

  absl::StatusOr<Object*> Global(Unpickler& machine, const std::string& name) override {
    if (const std::optional<at::ScalarType> dtype = DtypeNamed(name, /*storage=*/false)) {
      Object* o = machine.NewObject(kDtype);
      o->i = static_cast<int64_t>(*dtype);
      o->s = name;
      return o;
    }
    if (DataclassName(name) != nullptr || name == kSize || name == kGetLayout ||
        name == kMemFormat || name == kPosixPath) {
      return machine.NewGlobal(name);
    }
    return machine.RefuseGlobal(name, "the globals dcp.save writes into .metadata");
  }

  absl::StatusOr<Object*> Reduce(Unpickler& machine, const Object& callable,
                                 const std::vector<Object*>& a) override {
    const std::string& fn = callable.s;
    if (fn == kSize) {
      if (a.size() != 1 || a[0]->kind != Kind::kTuple) return WrongArgs(machine, fn, a);
      return machine.NewTuple(a[0]->items);
    }
    if (fn == kGetLayout) {  // _get_layout("torch.strided"): kept as the name
      if (a.size() != 1 || a[0]->kind != Kind::kStr) return WrongArgs(machine, fn, a);
      return a[0];
    }
    if (fn == kMemFormat) {
      if (a.size() != 1 || a[0]->kind != Kind::kInt || a[0]->i < 0 || a[0]->i > 2) {
        return WrongArgs(machine, fn, a);
      }
      Object* o = machine.NewObject(kMemoryFormatValue);
      o->i = a[0]->i;
      return o;
    }
    if (fn == kPosixPath) return JoinPath(machine, fn, a);
    return machine.Bad(absl::StrCat(fn, " cannot be called"));
  }

  bool TakesNewObj() const override { return true; }

  absl::StatusOr<Object*> NewObj(Unpickler& machine, const Object& cls,
                                 const std::vector<Object*>& args, const Object* kwargs) override {
    const char* type = DataclassName(cls.s);
    if (type == nullptr || !args.empty() || (kwargs != nullptr && !kwargs->dict->items.empty())) {
      return machine.Bad(absl::StrCat(cls.s, ".__new__ with arguments, or not a dataclass"));
    }
    return machine.NewObject(type);
  }

  // The state is kept by reference (items[0]), so a BUILD costs nothing however large it is.
  absl::Status Build(Unpickler& machine, Object& instance, Object& state) override {
    if (instance.kind != Kind::kObject || instance.type_name == nullptr ||
        DataclassName(instance.type_name) != instance.type_name) {
      return machine.Bad(absl::StrCat("BUILD on a ", KindName(instance)));
    }
    if (!instance.items.empty()) {
      return machine.Bad(absl::StrCat("a second BUILD of a ", instance.type_name));
    }
    if (state.kind != Kind::kDict && state.kind != Kind::kTuple) {
      return machine.Bad(
          absl::StrCat("BUILD of a ", instance.type_name, " from a ", KindName(state)));
    }
    instance.items.push_back(&state);
    return absl::OkStatus();
  }

  absl::StatusOr<Object*> PersistentLoad(Unpickler& machine, Object&) override {
    return machine.Bad("a persistent id (dcp.save's .metadata has none)");
  }

 private:
  static absl::Status WrongArgs(Unpickler& machine, const std::string& fn,
                                const std::vector<Object*>& args) {
    std::vector<std::string> kinds;
    for (const Object* o : args) kinds.push_back(KindName(*o));
    return machine.Bad(
        absl::StrCat("unexpected arguments to ", fn, ": (", absl::StrJoin(kinds, ", "), ")"));
  }

  // PosixPath(*parts) as text: parts joined by '/', an absolute part restarting the path.
  static absl::StatusOr<Object*> JoinPath(Unpickler& machine, const std::string& fn,
                                          const std::vector<Object*>& a) {
    std::string path;
    for (const Object* part : a) {
      if (part->kind != Kind::kStr) return WrongArgs(machine, fn, a);
      if (!part->s.empty() && part->s[0] == '/') {
        path = part->s;
      } else if (!part->s.empty()) {
        if (!path.empty() && path.back() != '/') path += '/';
        path += part->s;
      }
    }
    Object* o = machine.New(Kind::kStr);
    o->s = path.empty() ? "." : path;
    return o;
  }
};

// ------------------------------------------------------------------------------------------
// Machine objects -> the data model.

class Converter {
 public:
  explicit Converter(const std::string& file) : file_(file) {}

  absl::StatusOr<Metadata> ToMetadata(const Object& root);

 private:
  absl::Status Bad(const std::string& where, const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(file_, ": ", where, ": ", what));
  }
  absl::StatusOr<const Object*> State(const Object* o, const char* type,
                                      const std::string& where) const;
  // A dataclass's field: its value, or null when absent (the class default).
  static const Object* Field(const Object& state, const char* name);
  absl::StatusOr<std::vector<int64_t>> Shape(const Object* o, const std::string& where) const;
  absl::StatusOr<std::optional<std::string>> OptionalStr(const Object* o,
                                                         const std::string& where) const;
  absl::StatusOr<std::vector<std::string>> StrList(const Object* o, const std::string& where) const;
  absl::StatusOr<int64_t> Int(const Object* o, const std::string& where) const;
  absl::StatusOr<StorageMetadata> Entry(const Object* o, const std::string& fqn) const;
  absl::StatusOr<TensorProperties> Properties(const Object* o, const std::string& where) const;
  absl::StatusOr<ChunkStorageMetadata> Chunk(const Object* o, const std::string& where) const;
  absl::Status StorageData(const Object* o, Metadata& m) const;
  absl::Status PlannerData(const Object* o, Metadata& m) const;
  absl::StatusOr<StorageMeta> ToStorageMeta(const Object* o) const;

  const std::string& file_;
};

std::string Short(const char* type) {
  std::string s(type);
  const size_t dot = s.rfind('.');
  return dot == std::string::npos ? s : s.substr(dot + 1);
}

absl::StatusOr<const Object*> Converter::State(const Object* o, const char* type,
                                               const std::string& where) const {
  if (o->kind != Kind::kObject || o->type_name != DataclassName(type)) {
    return Bad(where, absl::StrCat("expected a ", Short(type), ", found a ", KindName(*o)));
  }
  if (o->items.empty()) return static_cast<const Object*>(nullptr);  // no BUILD: defaults
  const Object* state = o->items[0];
  if (state->kind != Kind::kDict && type != kDataclasses[2]) {
    return Bad(where, absl::StrCat(Short(type), " built from a ", KindName(*state)));
  }
  return state;
}

const Object* Converter::Field(const Object& state, const char* name) {
  for (const auto& [k, v] : state.dict->items) {
    if (k->kind == Kind::kStr && k->s == name) return v;
  }
  return nullptr;
}

absl::StatusOr<std::vector<int64_t>> Converter::Shape(const Object* o,
                                                      const std::string& where) const {
  if (o == nullptr || o->kind != Kind::kTuple) {
    return Bad(where, absl::StrCat("expected a torch.Size, found ",
                                   o == nullptr ? "nothing" : KindName(*o)));
  }
  std::vector<int64_t> shape;
  for (const Object* d : o->items) {
    if (d->kind != Kind::kInt) {
      return Bad(where, absl::StrCat("a torch.Size holding a ", KindName(*d)));
    }
    shape.push_back(d->i);
  }
  return shape;
}

absl::StatusOr<int64_t> Converter::Int(const Object* o, const std::string& where) const {
  if (o == nullptr || o->kind != Kind::kInt) {
    return Bad(where,
               absl::StrCat("expected an int, found ", o == nullptr ? "nothing" : KindName(*o)));
  }
  return o->i;
}

absl::StatusOr<std::optional<std::string>> Converter::OptionalStr(const Object* o,
                                                                  const std::string& where) const {
  if (o == nullptr || o->kind == Kind::kNone) return std::optional<std::string>();
  if (o->kind != Kind::kStr) {
    return Bad(where, absl::StrCat("expected a str or None, found a ", KindName(*o)));
  }
  return std::optional<std::string>(o->s);
}

absl::StatusOr<std::vector<std::string>> Converter::StrList(const Object* o,
                                                            const std::string& where) const {
  std::vector<std::string> out;
  if (o == nullptr || o->kind == Kind::kNone) return out;
  if (o->kind != Kind::kList && o->kind != Kind::kTuple) {
    return Bad(where, absl::StrCat("expected a list of str, found a ", KindName(*o)));
  }
  for (const Object* s : o->items) {
    if (s->kind != Kind::kStr) return Bad(where, "expected a list of str");
    out.push_back(s->s);
  }
  return out;
}

// TensorProperties' state: (dtype, layout, requires_grad, _MEM_FORMAT_ENCODING, pin_memory).
absl::StatusOr<TensorProperties> Converter::Properties(const Object* o,
                                                       const std::string& where) const {
  FSDP_ASSIGN_OR_RETURN(const Object* state, State(o, kDataclasses[2], where));
  TensorProperties p;
  if (state == nullptr) return p;
  const std::vector<Object*>& f = state->items;
  if (state->kind != Kind::kTuple || f.size() != 5 || f[0]->kind != Kind::kObject ||
      f[0]->type_name != kDtype || f[1]->kind != Kind::kStr || f[2]->kind != Kind::kBool ||
      f[3]->kind != Kind::kObject || f[3]->type_name != kMemoryFormatValue ||
      f[4]->kind != Kind::kBool) {
    return Bad(where,
               "TensorProperties' state is not (dtype, layout, requires_grad, "
               "_MEM_FORMAT_ENCODING, pin_memory)");
  }
  p.dtype = static_cast<at::ScalarType>(f[0]->i);
  p.layout = f[1]->s;
  p.requires_grad = f[2]->b;
  p.memory_format = static_cast<MemoryFormat>(f[3]->i);
  p.pin_memory = f[4]->b;
  return p;
}

absl::StatusOr<ChunkStorageMetadata> Converter::Chunk(const Object* o,
                                                      const std::string& where) const {
  FSDP_ASSIGN_OR_RETURN(const Object* state, State(o, kDataclasses[3], where));
  if (state == nullptr) return Bad(where, "a ChunkStorageMetadata without fields");
  ChunkStorageMetadata c;
  FSDP_ASSIGN_OR_RETURN(c.offsets, Shape(Field(*state, "offsets"), where + " offsets"));
  FSDP_ASSIGN_OR_RETURN(c.sizes, Shape(Field(*state, "sizes"), where + " sizes"));
  return c;
}

absl::StatusOr<StorageMetadata> Converter::Entry(const Object* o, const std::string& fqn) const {
  const std::string where = absl::StrCat("entry '", Printable(fqn), "'");
  if (o->kind == Kind::kObject && o->type_name == kDataclasses[4]) {
    return StorageMetadata(BytesStorageMetadata{});
  }
  FSDP_ASSIGN_OR_RETURN(const Object* state, State(o, kDataclasses[1], where));
  if (state == nullptr) return Bad(where, "a TensorStorageMetadata without fields");
  TensorStorageMetadata t;
  const Object* props = Field(*state, "properties");
  if (props == nullptr) return Bad(where, "a TensorStorageMetadata without properties");
  FSDP_ASSIGN_OR_RETURN(t.properties, Properties(props, where + " properties"));
  FSDP_ASSIGN_OR_RETURN(t.size, Shape(Field(*state, "size"), where + " size"));
  const Object* chunks = Field(*state, "chunks");
  if (chunks == nullptr || chunks->kind != Kind::kList) {
    return Bad(where, "chunks is not a list");
  }
  for (size_t k = 0; k < chunks->items.size(); ++k) {
    FSDP_ASSIGN_OR_RETURN(ChunkStorageMetadata c,
                          Chunk(chunks->items[k], absl::StrCat(where, " chunk ", k)));
    t.chunks.push_back(std::move(c));
  }
  return StorageMetadata(std::move(t));
}

absl::Status Converter::StorageData(const Object* o, Metadata& m) const {
  if (o == nullptr || o->kind != Kind::kDict) {
    return Bad("storage_data", "not a dict (FileSystemReader needs one)");
  }
  for (const auto& [k, v] : o->dict->items) {
    FSDP_ASSIGN_OR_RETURN(const Object* key, State(k, kDataclasses[5], "storage_data key"));
    if (key == nullptr) return Bad("storage_data key", "a MetadataIndex without fields");
    MetadataIndex index;
    const Object* fqn = Field(*key, "fqn");
    if (fqn == nullptr || fqn->kind != Kind::kStr) {
      return Bad("storage_data key", "a MetadataIndex without a str fqn");
    }
    index.fqn = fqn->s;
    const std::string where = absl::StrCat("storage of '", Printable(index.fqn), "'");
    if (const Object* off = Field(*key, "offset"); off != nullptr && off->kind != Kind::kNone) {
      FSDP_ASSIGN_OR_RETURN(index.offset, Shape(off, where + " offset"));
    }
    if (const Object* i = Field(*key, "index"); i != nullptr && i->kind != Kind::kNone) {
      FSDP_ASSIGN_OR_RETURN(index.index, Int(i, where + " index"));
    }
    FSDP_ASSIGN_OR_RETURN(const Object* info, State(v, kDataclasses[7], where));
    if (info == nullptr) return Bad(where, "a _StorageInfo without fields");
    StorageInfo s;
    const Object* path = Field(*info, "relative_path");
    if (path == nullptr || path->kind != Kind::kStr) return Bad(where, "no str relative_path");
    s.relative_path = path->s;
    FSDP_ASSIGN_OR_RETURN(s.offset, Int(Field(*info, "offset"), where + " offset"));
    FSDP_ASSIGN_OR_RETURN(s.length, Int(Field(*info, "length"), where + " length"));
    FSDP_ASSIGN_OR_RETURN(s.transform_descriptors,
                          StrList(Field(*info, "transform_descriptors"), where));
    if (!m.storage_data.emplace(std::move(index), std::move(s)).second) {
      return Bad(where, "a chunk's storage is listed twice");
    }
  }
  return absl::OkStatus();
}

absl::Status Converter::PlannerData(const Object* o, Metadata& m) const {
  if (o == nullptr || o->kind == Kind::kNone) return absl::OkStatus();
  if (o->kind != Kind::kDict) return Bad("planner_data", "not a dict or None");
  for (const auto& [k, v] : o->dict->items) {
    if (k->kind != Kind::kStr || (v->kind != Kind::kTuple && v->kind != Kind::kList)) {
      return Bad("planner_data", "not a dict of str to a tuple (a key's path)");
    }
    std::vector<PathElement> path;
    for (const Object* e : v->items) {
      if (e->kind == Kind::kStr) {
        path.emplace_back(e->s);
      } else if (e->kind == Kind::kInt) {
        path.emplace_back(e->i);
      } else {
        return Bad(absl::StrCat("planner_data of '", Printable(k->s), "'"),
                   absl::StrCat("a path element that is a ", KindName(*e)));
      }
    }
    m.planner_data[k->s] = std::move(path);
  }
  return absl::OkStatus();
}

absl::StatusOr<StorageMeta> Converter::ToStorageMeta(const Object* o) const {
  FSDP_ASSIGN_OR_RETURN(const Object* state, State(o, kDataclasses[6], "storage_meta"));
  StorageMeta s;
  if (state == nullptr) return s;
  FSDP_ASSIGN_OR_RETURN(s.checkpoint_id,
                        OptionalStr(Field(*state, "checkpoint_id"), "storage_meta"));
  FSDP_ASSIGN_OR_RETURN(s.save_id, OptionalStr(Field(*state, "save_id"), "storage_meta"));
  FSDP_ASSIGN_OR_RETURN(s.load_id, OptionalStr(Field(*state, "load_id"), "storage_meta"));
  FSDP_ASSIGN_OR_RETURN(s.modules, StrList(Field(*state, "modules"), "storage_meta modules"));
  return s;
}

absl::StatusOr<Metadata> Converter::ToMetadata(const Object& root) {
  FSDP_ASSIGN_OR_RETURN(const Object* state, State(&root, kDataclasses[0], "the pickle's value"));
  if (state == nullptr) return Bad("Metadata", "no fields");
  Metadata m;
  const Object* entries = Field(*state, "state_dict_metadata");
  if (entries == nullptr || entries->kind != Kind::kDict) {
    return Bad("state_dict_metadata", "not a dict");
  }
  for (const auto& [k, v] : entries->dict->items) {
    if (k->kind != Kind::kStr) {
      return Bad("state_dict_metadata", absl::StrCat("a key that is a ", KindName(*k)));
    }
    FSDP_ASSIGN_OR_RETURN(StorageMetadata entry, Entry(v, k->s));
    m.state_dict_metadata.insert_or_assign(k->s, std::move(entry));
  }
  FSDP_RETURN_IF_ERROR(StorageData(Field(*state, "storage_data"), m));
  FSDP_RETURN_IF_ERROR(PlannerData(Field(*state, "planner_data"), m));
  if (const Object* sm = Field(*state, "storage_meta"); sm != nullptr && sm->kind != Kind::kNone) {
    FSDP_ASSIGN_OR_RETURN(m.storage_meta, ToStorageMeta(sm));
  }
  FSDP_ASSIGN_OR_RETURN(m.version, OptionalStr(Field(*state, "version"), "version"));
  return m;
}

}  // namespace

absl::StatusOr<Metadata> ParseMetadata(std::string_view pickle, const std::string& file) {
  MetadataClient client;
  Unpickler machine(pickle, file, kMetadataFileName, client);
  FSDP_ASSIGN_OR_RETURN(const Object* root, machine.Run());
  FSDP_ASSIGN_OR_RETURN(Metadata m, Converter(file).ToMetadata(*root));
  FSDP_RETURN_IF_ERROR(ValidateMetadata(m, file));
  return m;
}

std::vector<std::string> AllowedMetadataGlobals() {
  std::vector<std::string> names(std::begin(kDataclasses), std::end(kDataclasses));
  for (const TorchDtypeName& d : kTorchDtypeNames) names.push_back(d.global);
  for (const char* n : {kSize, kGetLayout, kMemFormat, kPosixPath}) names.push_back(n);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace fsdp::checkpoint::dcp
