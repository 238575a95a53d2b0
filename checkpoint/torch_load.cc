// See torch_load.h. Layout of this file: byte helpers; the byte sources (a file,
// or bytes in memory); the zip directory; the pickle machine over arena-owned objects; the
// conversion of the machine's result into a PyValue tree; the public functions.
#include "checkpoint/torch_load.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <unordered_map>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/crc32.h"
#include "comm/status_macros.h"

// Storages are copied byte for byte into tensors, and torch.save writes little-endian data.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "TorchLoad needs a little-endian host");

namespace fsdp::checkpoint {

// ------------------------------------------------------------------------------------------
// PyValue

const std::vector<PyValue>& PyValue::items() const {
  if (is_tuple()) return as_tuple().items;
  return as_list().items;
}

const PyValue* PyValue::Find(std::string_view key) const {
  if (!is_dict()) return nullptr;
  for (const auto& [k, v] : as_dict().items) {
    if (k.is_str() && k.as_str() == key) return &v;
  }
  return nullptr;
}

const PyValue* PyValue::Find(int64_t key) const {
  if (!is_dict()) return nullptr;
  for (const auto& [k, v] : as_dict().items) {
    if (k.is_int() && k.as_int() == key) return &v;
  }
  return nullptr;
}

std::string PyValue::TypeName() const {
  static constexpr const char* kNames[] = {"None",  "bool", "int",   "float", "str",
                                           "bytes", "list", "tuple", "dict",  "Tensor"};
  return kNames[value_.index()];
}

std::string PyValue::DebugString() const {
  struct Printer {
    std::string operator()(const PyNone&) const { return "None"; }
    std::string operator()(bool b) const { return b ? "True" : "False"; }
    std::string operator()(int64_t i) const { return absl::StrCat(i); }
    std::string operator()(double d) const { return absl::StrCat(d); }
    std::string operator()(const std::string& s) const {
      return absl::StrCat("'", absl::CHexEscape(s), "'");
    }
    std::string operator()(const PyBytes& b) const {
      return absl::StrCat("b'", absl::CHexEscape(b.data), "'");
    }
    std::string operator()(const PyList& l) const { return absl::StrCat("[", Join(l.items), "]"); }
    std::string operator()(const PyTuple& t) const {
      return absl::StrCat("(", Join(t.items), t.items.size() == 1 ? ",)" : ")");
    }
    std::string operator()(const PyDict& d) const {
      std::vector<std::string> parts;
      for (const auto& [k, v] : d.items) {
        parts.push_back(absl::StrCat(k.DebugString(), ": ", v.DebugString()));
      }
      return absl::StrCat("{", absl::StrJoin(parts, ", "), "}");
    }
    std::string operator()(const at::Tensor& t) const {
      return absl::StrCat("tensor(", std::string(c10::toString(t.scalar_type())), ", [",
                          absl::StrJoin(t.sizes(), ", "), "])");
    }
    static std::string Join(const std::vector<PyValue>& items) {
      std::vector<std::string> parts;
      for (const PyValue& item : items) parts.push_back(item.DebugString());
      return absl::StrJoin(parts, ", ");
    }
  };
  return std::visit(Printer{}, value_);
}

namespace {

// ------------------------------------------------------------------------------------------
// Little-endian reads (the zip format and the pickle's binary ints).

uint64_t ReadLE(const char* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

// a + b <= limit without overflow.
bool FitsIn(uint64_t a, uint64_t b, uint64_t limit) { return a <= limit && b <= limit - a; }

// Printable form of text taken from the file, for messages.
std::string Printable(std::string_view s) {
  constexpr size_t kMax = 120;
  const std::string_view head = s.substr(0, kMax);
  std::string out = absl::CHexEscape(absl::string_view(head.data(), head.size()));
  if (s.size() > kMax) out += "...";
  return out;
}

// ------------------------------------------------------------------------------------------
// Byte sources.

class Source {
 public:
  virtual ~Source() = default;
  virtual uint64_t size() const = 0;
  // Reads exactly `n` bytes at `offset`; precondition: offset + n <= size().
  virtual absl::Status ReadAt(uint64_t offset, uint64_t n, void* dst) const = 0;
};

class BytesSource : public Source {
 public:
  explicit BytesSource(std::string_view bytes) : bytes_(bytes) {}
  uint64_t size() const override { return bytes_.size(); }
  absl::Status ReadAt(uint64_t offset, uint64_t n, void* dst) const override {
    if (n > 0) std::memcpy(dst, bytes_.data() + offset, n);
    return absl::OkStatus();
  }

 private:
  std::string_view bytes_;
};

class FileSource : public Source {
 public:
  static absl::StatusOr<std::unique_ptr<FileSource>> Open(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      const std::string msg = absl::StrCat(path, ": cannot open: ", std::strerror(err));
      if (err == ENOENT) return absl::NotFoundError(msg);
      if (err == EACCES) return absl::PermissionDeniedError(msg);
      return absl::UnknownError(msg);
    }
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
    }
    return std::unique_ptr<FileSource>(new FileSource(path, fd, static_cast<uint64_t>(st.st_size)));
  }
  ~FileSource() override { ::close(fd_); }
  uint64_t size() const override { return size_; }
  absl::Status ReadAt(uint64_t offset, uint64_t n, void* dst) const override {
    char* out = static_cast<char*>(dst);
    while (n > 0) {
      const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, 1u << 30));
      const ssize_t got = ::pread(fd_, out, chunk, static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) {
        return absl::UnknownError(absl::StrCat(path_, ": read failed: ", std::strerror(errno)));
      }
      if (got == 0) {
        return absl::DataLossError(absl::StrCat(path_, ": file ended at byte ", offset,
                                                " while reading (did it shrink?)"));
      }
      out += got;
      offset += static_cast<uint64_t>(got);
      n -= static_cast<uint64_t>(got);
    }
    return absl::OkStatus();
  }

 private:
  FileSource(std::string path, int fd, uint64_t size)
      : path_(std::move(path)), fd_(fd), size_(size) {}
  std::string path_;
  int fd_;
  uint64_t size_;
};

// ------------------------------------------------------------------------------------------
// The zip directory.

struct ZipEntry {
  std::string name;
  uint64_t header_offset = 0;
  uint64_t data_offset = 0;
  uint64_t size = 0;
  uint32_t crc = 0;
};

constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kEocdSig = 0x06054b50;
constexpr uint32_t kZip64EocdSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint64_t kEocdSize = 22;
constexpr uint64_t kCentralHeaderSize = 46;
constexpr uint64_t kLocalHeaderSize = 30;

class ZipReader {
 public:
  ZipReader(const Source& source, const std::string& file) : source_(source), file_(file) {}

  // Reads and checks the central directory and every local header.
  absl::Status Open() {
    const uint64_t size = source_.size();
    if (size >= 4) {
      char magic[4];
      FSDP_RETURN_IF_ERROR(source_.ReadAt(0, 4, magic));
      if (ReadLE(magic, 4) != kLocalHeaderSig) {
        if (static_cast<uint8_t>(magic[0]) == 0x80) {
          return absl::InvalidArgumentError(
              absl::StrCat(file_,
                           ": not a zip file: it starts with a pickle (torch.save's legacy format, "
                           "_use_new_zipfile_serialization=False, is not supported)"));
        }
        return absl::InvalidArgumentError(
            absl::StrCat(file_, ": not a zip file (torch.save writes zip archives)"));
      }
    }
    if (size < kEocdSize + 4) {
      return Loss(absl::StrCat("truncated: ", size, " bytes cannot hold a zip archive"));
    }
    // The end-of-central-directory record: the last 22 bytes plus a comment of up to 64 KiB;
    // the comment length must reach exactly to the end of the file.
    const uint64_t tail_size = std::min<uint64_t>(size, kEocdSize + 0xFFFF);
    std::string tail(tail_size, '\0');
    FSDP_RETURN_IF_ERROR(source_.ReadAt(size - tail_size, tail_size, tail.data()));
    std::optional<uint64_t> eocd_in_tail;
    for (uint64_t p = tail_size - kEocdSize + 1; p-- > 0;) {
      if (ReadLE(&tail[p], 4) == kEocdSig &&
          ReadLE(&tail[p + 20], 2) == tail_size - p - kEocdSize) {
        eocd_in_tail = p;
        break;
      }
    }
    if (!eocd_in_tail) {
      return Loss("no zip end-of-central-directory record (the file is truncated or corrupted)");
    }
    const char* eocd = &tail[*eocd_in_tail];
    const uint64_t eocd_offset = size - tail_size + *eocd_in_tail;
    uint64_t disk = ReadLE(eocd + 4, 2), cd_disk = ReadLE(eocd + 6, 2);
    uint64_t entries_on_disk = ReadLE(eocd + 8, 2), entries = ReadLE(eocd + 10, 2);
    uint64_t cd_size = ReadLE(eocd + 12, 4), cd_offset = ReadLE(eocd + 16, 4);
    uint64_t cd_limit = eocd_offset;  // the central directory ends before this
    // torch.save always writes the zip64 records (a locator just before the record above).
    if (eocd_offset >= 20) {
      char locator[20];
      FSDP_RETURN_IF_ERROR(source_.ReadAt(eocd_offset - 20, 20, locator));
      if (ReadLE(locator, 4) == kZip64LocatorSig) {
        const uint64_t record_offset = ReadLE(locator + 8, 8);
        if (!FitsIn(record_offset, 56, eocd_offset - 20)) {
          return Loss(absl::StrCat("zip64 end-of-central-directory record offset ", record_offset,
                                   " is outside the file"));
        }
        char record[56];
        FSDP_RETURN_IF_ERROR(source_.ReadAt(record_offset, 56, record));
        if (ReadLE(record, 4) != kZip64EocdSig) {
          return Loss(
              absl::StrCat("no zip64 end-of-central-directory record at byte ", record_offset));
        }
        disk = ReadLE(record + 16, 4);
        cd_disk = ReadLE(record + 20, 4);
        entries_on_disk = ReadLE(record + 24, 8);
        entries = ReadLE(record + 32, 8);
        cd_size = ReadLE(record + 40, 8);
        cd_offset = ReadLE(record + 48, 8);
        cd_limit = record_offset;
      }
    }
    if (disk != 0 || cd_disk != 0 || entries_on_disk != entries) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_, ": multi-disk zip archives are not supported"));
    }
    if (!FitsIn(cd_offset, cd_size, cd_limit)) {
      return Loss(absl::StrCat("zip central directory (", cd_size, " bytes at byte ", cd_offset,
                               ") is outside the file (", size, " bytes)"));
    }
    if (entries > cd_size / kCentralHeaderSize) {
      return Loss(
          absl::StrCat("zip directory claims ", entries, " entries in ", cd_size, " bytes"));
    }
    std::string cd(cd_size, '\0');
    FSDP_RETURN_IF_ERROR(source_.ReadAt(cd_offset, cd_size, cd.data()));
    uint64_t pos = 0;
    for (uint64_t i = 0; i < entries; ++i) {
      FSDP_RETURN_IF_ERROR(ParseCentralEntry(cd, &pos, cd_offset));
    }
    // Entries (local header through data) may neither overlap nor reach into the directory:
    // so the storages together never exceed the file's size.
    std::vector<const ZipEntry*> by_offset;
    for (const auto& [name, entry] : entries_) by_offset.push_back(&entry);
    std::sort(by_offset.begin(), by_offset.end(), [](const ZipEntry* a, const ZipEntry* b) {
      return a->header_offset < b->header_offset;
    });
    for (size_t i = 1; i < by_offset.size(); ++i) {
      if (by_offset[i]->header_offset < by_offset[i - 1]->data_offset + by_offset[i - 1]->size) {
        return Loss(absl::StrCat("zip entries ", Printable(by_offset[i - 1]->name), " and ",
                                 Printable(by_offset[i]->name), " overlap"));
      }
    }
    return absl::OkStatus();
  }

  const std::map<std::string, ZipEntry>& entries() const { return entries_; }

  const ZipEntry* Find(const std::string& name) const {
    auto it = entries_.find(name);
    return it == entries_.end() ? nullptr : &it->second;
  }

  // Reads an entry's bytes into `dst` (entry.size bytes) and checks its CRC-32. In chunks, each
  // checksummed right after it is read, while it is still in the CPU's cache.
  absl::Status Read(const ZipEntry& entry, void* dst) const {
    constexpr uint64_t kChunk = uint64_t{1} << 20;
    char* out = static_cast<char*>(dst);
    uint32_t crc = 0;
    for (uint64_t done = 0; done < entry.size; done += kChunk) {
      const uint64_t n = std::min(kChunk, entry.size - done);
      FSDP_RETURN_IF_ERROR(source_.ReadAt(entry.data_offset + done, n, out + done));
      crc = Crc32(crc, out + done, static_cast<size_t>(n));
    }
    if (crc != entry.crc) {
      return Loss(absl::StrCat("entry ", Printable(entry.name), " is corrupted (CRC-32 ",
                               absl::Hex(crc), ", the zip directory says ", absl::Hex(entry.crc),
                               ")"));
    }
    return absl::OkStatus();
  }

 private:
  absl::Status Loss(const std::string& what) const {
    return absl::DataLossError(absl::StrCat(file_, ": ", what));
  }

  absl::Status ParseCentralEntry(const std::string& cd, uint64_t* pos, uint64_t cd_offset) {
    if (!FitsIn(*pos, kCentralHeaderSize, cd.size())) {
      return Loss("zip central directory ends inside an entry");
    }
    const char* h = cd.data() + *pos;
    if (ReadLE(h, 4) != kCentralSig) {
      return Loss(
          absl::StrCat("bad zip central directory entry signature at byte ", cd_offset + *pos));
    }
    const uint64_t flags = ReadLE(h + 8, 2), method = ReadLE(h + 10, 2);
    const uint32_t crc = static_cast<uint32_t>(ReadLE(h + 16, 4));
    uint64_t compressed = ReadLE(h + 20, 4), uncompressed = ReadLE(h + 24, 4);
    const uint64_t name_len = ReadLE(h + 28, 2), extra_len = ReadLE(h + 30, 2),
                   comment_len = ReadLE(h + 32, 2);
    uint64_t header_offset = ReadLE(h + 42, 4);
    const uint64_t variable = name_len + extra_len + comment_len;
    if (!FitsIn(*pos + kCentralHeaderSize, variable, cd.size())) {
      return Loss("zip central directory ends inside an entry's name or extra field");
    }
    ZipEntry entry;
    entry.name = cd.substr(*pos + kCentralHeaderSize, name_len);
    const std::string_view extra(cd.data() + *pos + kCentralHeaderSize + name_len, extra_len);
    *pos += kCentralHeaderSize + variable;
    // zip64 extended information: 8-byte values for the fields saturated above, in order.
    for (size_t e = 0; e + 4 <= extra.size();) {
      const uint64_t id = ReadLE(&extra[e], 2), len = ReadLE(&extra[e + 2], 2);
      if (e + 4 + len > extra.size())
        return Loss(absl::StrCat("entry ", Printable(entry.name), ": bad extra field"));
      if (id == 1) {
        size_t f = e + 4;
        for (uint64_t* field : {&uncompressed, &compressed, &header_offset}) {
          if (*field != 0xFFFFFFFFu) continue;
          if (f + 8 > e + 4 + len) {
            return Loss(absl::StrCat("entry ", Printable(entry.name), ": short zip64 extra field"));
          }
          *field = ReadLE(&extra[f], 8);
          f += 8;
        }
      }
      e += 4 + len;
    }
    if (flags & 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_, ": zip entry ", Printable(entry.name),
                       " is encrypted, which torch.save never writes"));
    }
    if (method != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_, ": zip entry ", Printable(entry.name), " is compressed (method ",
                       method, "); torch.save writes stored (uncompressed) entries only"));
    }
    if (compressed != uncompressed) {
      return Loss(absl::StrCat("stored zip entry ", Printable(entry.name), " has sizes ",
                               compressed, " and ", uncompressed));
    }
    // The local header: its own name and extra field (torch.save pads data to 64 bytes there).
    if (!FitsIn(header_offset, kLocalHeaderSize, cd_offset)) {
      return Loss(absl::StrCat("entry ", Printable(entry.name), ": local header offset ",
                               header_offset, " is outside the file's entries"));
    }
    char local[kLocalHeaderSize];
    FSDP_RETURN_IF_ERROR(source_.ReadAt(header_offset, kLocalHeaderSize, local));
    if (ReadLE(local, 4) != kLocalHeaderSig) {
      return Loss(absl::StrCat("entry ", Printable(entry.name), ": no local header at byte ",
                               header_offset));
    }
    const uint64_t local_name_len = ReadLE(local + 26, 2), local_extra_len = ReadLE(local + 28, 2);
    const uint64_t data_offset =
        header_offset + kLocalHeaderSize + local_name_len + local_extra_len;
    if (local_name_len != name_len || !FitsIn(data_offset, uncompressed, cd_offset)) {
      return Loss(absl::StrCat("entry ", Printable(entry.name), " (", uncompressed,
                               " bytes at byte ", data_offset,
                               ") does not fit in the file before the zip directory"));
    }
    std::string local_name(name_len, '\0');
    FSDP_RETURN_IF_ERROR(
        source_.ReadAt(header_offset + kLocalHeaderSize, name_len, local_name.data()));
    if (local_name != entry.name) {
      return Loss(absl::StrCat("entry ", Printable(entry.name), ": local header names ",
                               Printable(local_name)));
    }
    entry.header_offset = header_offset;
    entry.data_offset = data_offset;
    entry.size = uncompressed;
    entry.crc = crc;
    const std::string name = entry.name;
    if (!entries_.emplace(name, std::move(entry)).second) {
      return Loss(absl::StrCat("zip entry ", Printable(name), " appears twice"));
    }
    return absl::OkStatus();
  }

  const Source& source_;
  const std::string& file_;
  std::map<std::string, ZipEntry> entries_;
};

// ------------------------------------------------------------------------------------------
// The pickle machine. Objects live in an arena owned by the machine and refer to each other
// by pointer, so memo references, shared and even cyclic structures cost nothing to destroy.

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
  kGlobal,
  kStorage
};

struct Obj;

// A dict's items and the positions of its str and int keys (for Python's replace-in-place).
struct DictData {
  std::vector<std::pair<Obj*, Obj*>> items;
  std::unordered_map<std::string, size_t> str_index;
  std::unordered_map<int64_t, size_t> int_index;  // int and bool keys
};

// Kept small (about 100 bytes): a hostile pickle can create one object per byte, as with
// Python's own unpickler.
struct Obj {
  explicit Obj(Kind k) : kind(k) {}
  Kind kind;
  bool b = false;
  union {
    int64_t i = 0;
    double f;
  };
  std::string s;                   // str, bytes, a global's "module.name", a storage's key
  std::vector<Obj*> items;         // list, tuple
  std::unique_ptr<DictData> dict;  // dict
  at::Tensor tensor;               // tensor, or a storage's 1-D base
};

const char* KindName(Kind k) {
  switch (k) {
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
    case Kind::kStorage:
      return "storage";
  }
  return "?";
}

struct StorageType {
  const char* name;
  at::ScalarType dtype;
};
constexpr StorageType kStorageTypes[] = {
    {"torch.FloatStorage", at::kFloat},
    {"torch.DoubleStorage", at::kDouble},
    {"torch.HalfStorage", at::kHalf},
    {"torch.BFloat16Storage", at::kBFloat16},
    {"torch.LongStorage", at::kLong},
    {"torch.IntStorage", at::kInt},
    {"torch.ShortStorage", at::kShort},
    {"torch.CharStorage", at::kChar},
    {"torch.ByteStorage", at::kByte},
    {"torch.BoolStorage", at::kBool},
    {"torch.ComplexFloatStorage", at::kComplexFloat},
    {"torch.ComplexDoubleStorage", at::kComplexDouble},
};

std::optional<at::ScalarType> StorageDtype(const std::string& global) {
  for (const StorageType& t : kStorageTypes) {
    if (global == t.name) return t.dtype;
  }
  return std::nullopt;
}

// Globals whose REDUCE the machine emulates (it never calls anything named in the file).
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

class Unpickler {
 public:
  Unpickler(std::string_view pickle, const std::string& file, const std::string& entry,
            const ZipReader& zip, const std::string& prefix)
      : data_(pickle), file_(file), entry_(entry), zip_(zip), prefix_(prefix) {}

  absl::StatusOr<Obj*> Run() {
    while (true) {
      if (pos_ >= data_.size()) return Truncated("before the STOP opcode");
      op_pos_ = pos_;
      const uint8_t op = static_cast<uint8_t>(data_[pos_++]);
      switch (op) {
        case 0x80: {  // PROTO
          FSDP_ASSIGN_OR_RETURN(uint64_t proto, Uint(1));
          if (proto > 5) return Bad(absl::StrCat("pickle protocol ", proto, " is unknown"));
          protocol_ = static_cast<int>(proto);
          break;
        }
        case 0x95: {  // FRAME: a length hint only
          FSDP_ASSIGN_OR_RETURN(uint64_t frame, Uint(8));
          if (frame > data_.size() - pos_) return Truncated("inside a FRAME");
          break;
        }
        case '}':
          Push(New(Kind::kDict));
          break;  // EMPTY_DICT
        case ']':
          Push(New(Kind::kList));
          break;  // EMPTY_LIST
        case ')':
          Push(New(Kind::kTuple));
          break;  // EMPTY_TUPLE
        case '(':
          marks_.push_back(stack_.size());
          break;  // MARK
        case 'N':
          Push(New(Kind::kNone));
          break;
        case 0x88:
        case 0x89: {  // NEWTRUE, NEWFALSE
          Obj* o = New(Kind::kBool);
          o->b = op == 0x88;
          Push(o);
          break;
        }
        case 'J': {  // BININT: 4-byte signed
          FSDP_ASSIGN_OR_RETURN(uint64_t v, Uint(4));
          PushInt(static_cast<int32_t>(static_cast<uint32_t>(v)));
          break;
        }
        case 'K':
        case 'M': {  // BININT1, BININT2: unsigned
          FSDP_ASSIGN_OR_RETURN(uint64_t v, Uint(op == 'K' ? 1 : 2));
          PushInt(static_cast<int64_t>(v));
          break;
        }
        case 0x8a:
        case 0x8b: {  // LONG1, LONG4: little-endian two's complement
          FSDP_ASSIGN_OR_RETURN(uint64_t n, Uint(op == 0x8a ? 1 : 4));
          if (op == 0x8b && n > 0x7FFFFFFFu) return Bad("LONG4 with a negative length");
          FSDP_ASSIGN_OR_RETURN(std::string_view bytes, Bytes(n));
          FSDP_ASSIGN_OR_RETURN(int64_t v, DecodeLong(bytes));
          PushInt(v);
          break;
        }
        case 'G': {  // BINFLOAT: big-endian double
          FSDP_ASSIGN_OR_RETURN(std::string_view bytes, Bytes(8));
          uint64_t bits = 0;
          for (char c : bytes) bits = (bits << 8) | static_cast<uint8_t>(c);
          Obj* o = New(Kind::kFloat);
          std::memcpy(&o->f, &bits, 8);
          Push(o);
          break;
        }
        case 'X':
        case 0x8c:
        case 0x8d:  // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
        case 'B':
        case 'C':
        case 0x8e: {  // BINBYTES, SHORT_BINBYTES, BINBYTES8
          const int width = (op == 'X' || op == 'B') ? 4 : (op == 0x8c || op == 'C') ? 1 : 8;
          FSDP_ASSIGN_OR_RETURN(uint64_t n, Uint(width));
          FSDP_ASSIGN_OR_RETURN(std::string_view bytes, Bytes(n));
          Obj* o = New((op == 'X' || op == 0x8c || op == 0x8d) ? Kind::kStr : Kind::kBytes);
          o->s = std::string(bytes);
          Push(o);
          break;
        }
        case 'q':
        case 'r': {  // BINPUT, LONG_BINPUT
          FSDP_ASSIGN_OR_RETURN(uint64_t index, Uint(op == 'q' ? 1 : 4));
          FSDP_ASSIGN_OR_RETURN(Obj * top, Top());
          memo_[index] = top;
          break;
        }
        case 0x94: {  // MEMOIZE
          FSDP_ASSIGN_OR_RETURN(Obj * top, Top());
          memo_[memo_.size()] = top;
          break;
        }
        case 'h':
        case 'j': {  // BINGET, LONG_BINGET
          FSDP_ASSIGN_OR_RETURN(uint64_t index, Uint(op == 'h' ? 1 : 4));
          auto it = memo_.find(index);
          if (it == memo_.end()) return Bad(absl::StrCat("memo index ", index, " was never set"));
          Push(it->second);
          break;
        }
        case '0': {  // POP
          FSDP_ASSIGN_OR_RETURN(Obj * unused, Pop());
          (void)unused;
          break;
        }
        case '1': {  // POP_MARK
          FSDP_ASSIGN_OR_RETURN(std::vector<Obj*> unused, PopToMark());
          break;
        }
        case '2': {  // DUP
          FSDP_ASSIGN_OR_RETURN(Obj * top, Top());
          Push(top);
          break;
        }
        case 't': {  // TUPLE
          FSDP_ASSIGN_OR_RETURN(std::vector<Obj*> items, PopToMark());
          Push(NewTuple(std::move(items)));
          break;
        }
        case 0x85:
        case 0x86:
        case 0x87: {  // TUPLE1..3
          const size_t n = op - 0x84;
          if (stack_.size() < n + CurrentMark()) return Bad("stack underflow");
          std::vector<Obj*> items(stack_.end() - n, stack_.end());
          stack_.resize(stack_.size() - n);
          Push(NewTuple(std::move(items)));
          break;
        }
        case 'a': {  // APPEND
          FSDP_ASSIGN_OR_RETURN(Obj * item, Pop());
          FSDP_ASSIGN_OR_RETURN(Obj * list, Top());
          if (list->kind != Kind::kList)
            return Bad(absl::StrCat("APPEND to a ", KindName(list->kind)));
          list->items.push_back(item);
          break;
        }
        case 'e': {  // APPENDS
          FSDP_ASSIGN_OR_RETURN(std::vector<Obj*> items, PopToMark());
          FSDP_ASSIGN_OR_RETURN(Obj * list, Top());
          if (list->kind != Kind::kList)
            return Bad(absl::StrCat("APPENDS to a ", KindName(list->kind)));
          list->items.insert(list->items.end(), items.begin(), items.end());
          break;
        }
        case 's': {  // SETITEM
          FSDP_ASSIGN_OR_RETURN(Obj * value, Pop());
          FSDP_ASSIGN_OR_RETURN(Obj * key, Pop());
          FSDP_ASSIGN_OR_RETURN(Obj * dict, Top());
          FSDP_RETURN_IF_ERROR(SetItem(dict, key, value));
          break;
        }
        case 'u': {  // SETITEMS
          FSDP_ASSIGN_OR_RETURN(std::vector<Obj*> items, PopToMark());
          if (items.size() % 2 != 0) return Bad("SETITEMS with an odd number of items");
          FSDP_ASSIGN_OR_RETURN(Obj * dict, Top());
          for (size_t k = 0; k < items.size(); k += 2) {
            FSDP_RETURN_IF_ERROR(SetItem(dict, items[k], items[k + 1]));
          }
          break;
        }
        case 'c': {  // GLOBAL: "module\nname\n"
          FSDP_ASSIGN_OR_RETURN(std::string module, Line());
          FSDP_ASSIGN_OR_RETURN(std::string name, Line());
          FSDP_ASSIGN_OR_RETURN(Obj * global, Global(module, name));
          Push(global);
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          FSDP_ASSIGN_OR_RETURN(Obj * name, Pop());
          FSDP_ASSIGN_OR_RETURN(Obj * module, Pop());
          if (module->kind != Kind::kStr || name->kind != Kind::kStr) {
            return Bad("STACK_GLOBAL without two strs");
          }
          FSDP_ASSIGN_OR_RETURN(Obj * global, Global(module->s, name->s));
          Push(global);
          break;
        }
        case 'R': {  // REDUCE
          FSDP_ASSIGN_OR_RETURN(Obj * args, Pop());
          FSDP_ASSIGN_OR_RETURN(Obj * callable, Pop());
          FSDP_ASSIGN_OR_RETURN(Obj * result, Reduce(callable, args));
          Push(result);
          break;
        }
        case 'b': {  // BUILD: only the attributes of an OrderedDict (a state dict's _metadata)
          FSDP_ASSIGN_OR_RETURN(Obj * state, Pop());
          FSDP_ASSIGN_OR_RETURN(Obj * inst, Top());
          (void)state;
          if (inst->kind != Kind::kDict) {
            return Bad(
                absl::StrCat("BUILD on a ", KindName(inst->kind),
                             " (only an OrderedDict's attributes are accepted, and dropped)"));
          }
          break;
        }
        case 'Q': {  // BINPERSID
          FSDP_ASSIGN_OR_RETURN(Obj * pid, Pop());
          FSDP_ASSIGN_OR_RETURN(Obj * storage, PersistentLoad(pid));
          Push(storage);
          break;
        }
        case '.': {  // STOP
          FSDP_ASSIGN_OR_RETURN(Obj * result, Pop());
          return result;
        }
        default:
          return Bad(
              absl::StrCat("unsupported pickle opcode 0x", absl::Hex(op),
                           (op >= 0x20 && op < 0x7f)
                               ? absl::StrCat(" ('", std::string(1, static_cast<char>(op)), "')")
                               : "",
                           "; torch.save does not write it"));
      }
    }
  }

 private:
  absl::Status Bad(const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(file_, ": ", entry_, " at byte ", op_pos_, ": ", what));
  }
  absl::Status Truncated(const std::string& where) const {
    return absl::DataLossError(absl::StrCat(file_, ": ", entry_, " ends at byte ", data_.size(),
                                            " ", where, " (truncated or corrupted)"));
  }

  Obj* New(Kind kind) {
    Obj* o = &arena_.emplace_back(kind);
    if (kind == Kind::kDict) o->dict = std::make_unique<DictData>();
    return o;
  }
  Obj* NewTuple(std::vector<Obj*> items) {
    Obj* o = New(Kind::kTuple);
    o->items = std::move(items);
    return o;
  }
  void Push(Obj* o) { stack_.push_back(o); }
  void PushInt(int64_t v) {
    Obj* o = New(Kind::kInt);
    o->i = v;
    Push(o);
  }
  size_t CurrentMark() const { return marks_.empty() ? 0 : marks_.back(); }
  absl::StatusOr<Obj*> Pop() {
    if (stack_.size() <= CurrentMark()) return Bad("stack underflow");
    Obj* o = stack_.back();
    stack_.pop_back();
    return o;
  }
  absl::StatusOr<Obj*> Top() {
    if (stack_.size() <= CurrentMark()) return Bad("stack underflow");
    return stack_.back();
  }
  absl::StatusOr<std::vector<Obj*>> PopToMark() {
    if (marks_.empty()) return Bad("no MARK on the stack");
    const size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<Obj*> items(stack_.begin() + mark, stack_.end());
    stack_.resize(mark);
    return items;
  }

  absl::StatusOr<uint64_t> Uint(int n) {
    if (data_.size() - pos_ < static_cast<size_t>(n))
      return Truncated("inside an opcode's argument");
    const uint64_t v = ReadLE(data_.data() + pos_, n);
    pos_ += n;
    return v;
  }
  absl::StatusOr<std::string_view> Bytes(uint64_t n) {
    if (n > data_.size() - pos_) {
      return Truncated(
          absl::StrCat("inside a ", n, "-byte argument of the opcode at byte ", op_pos_));
    }
    std::string_view out = data_.substr(pos_, n);
    pos_ += n;
    return out;
  }
  absl::StatusOr<std::string> Line() {
    const size_t end = data_.find('\n', pos_);
    if (end == std::string_view::npos) return Truncated("inside a GLOBAL's name");
    std::string line(data_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return line;
  }

  absl::StatusOr<int64_t> DecodeLong(std::string_view bytes) {
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

  absl::StatusOr<Obj*> Global(std::string module, const std::string& name) {
    if (protocol_ < 3 && module == "__builtin__") module = "builtins";  // fix_imports
    const std::string full = absl::StrCat(module, ".", name);
    if (!IsAllowedGlobal(full)) {
      return absl::InvalidArgumentError(
          absl::StrCat("refusing to load global ", Printable(full), " from ", file_, " (", entry_,
                       " at byte ", op_pos_,
                       "; only the globals torch.save writes for tensors and state "
                       "dicts are allowed)"));
    }
    Obj* o = New(Kind::kGlobal);
    o->s = full;
    return o;
  }

  absl::Status SetItem(Obj* dict, Obj* key, Obj* value) {
    if (dict->kind != Kind::kDict) return Bad(absl::StrCat("SETITEM on a ", KindName(dict->kind)));
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
      return Bad(absl::StrCat("unhashable dict key of type ", KindName(key->kind)));
    }
    dict->dict->items.emplace_back(key, value);
    return absl::OkStatus();
  }

  absl::StatusOr<Obj*> Reduce(Obj* callable, Obj* args) {
    if (callable->kind != Kind::kGlobal) {
      return Bad(absl::StrCat("REDUCE calls a ", KindName(callable->kind)));
    }
    if (args->kind != Kind::kTuple) {
      return Bad(absl::StrCat("REDUCE of ", callable->s, " with a ", KindName(args->kind),
                              " for arguments"));
    }
    const std::string& fn = callable->s;
    const std::vector<Obj*>& a = args->items;
    auto wrong_args = [&]() {
      std::vector<std::string> kinds;
      for (const Obj* o : a) kinds.push_back(KindName(o->kind));
      return Bad(
          absl::StrCat("unexpected arguments to ", fn, ": (", absl::StrJoin(kinds, ", "), ")"));
    };
    if (fn == "collections.OrderedDict") {
      if (!a.empty()) return wrong_args();
      return New(Kind::kDict);
    }
    if (fn == "torch.jit._pickle.restore_type_tag") {
      if (a.size() != 2 || a[1]->kind != Kind::kStr) return wrong_args();
      return a[0];
    }
    if (fn == "torch.Size") {
      if (a.size() != 1 || a[0]->kind != Kind::kTuple) return wrong_args();
      return NewTuple(a[0]->items);
    }
    if (fn == "builtins.bytes") {  // protocol 2's empty bytes
      if (!a.empty()) return wrong_args();
      return New(Kind::kBytes);
    }
    if (fn == "_codecs.encode") {  // protocol 2's bytes: encode(str, 'latin1')
      if (a.size() != 2 || a[0]->kind != Kind::kStr || a[1]->kind != Kind::kStr ||
          (a[1]->s != "latin1" && a[1]->s != "latin-1")) {
        return wrong_args();
      }
      FSDP_ASSIGN_OR_RETURN(std::string latin1, Latin1(a[0]->s));
      Obj* o = New(Kind::kBytes);
      o->s = std::move(latin1);
      return o;
    }
    if (fn == "torch._utils._rebuild_tensor_v2") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      if ((a.size() != 6 && a.size() != 7) || a[0]->kind != Kind::kStorage ||
          a[1]->kind != Kind::kInt || a[2]->kind != Kind::kTuple || a[3]->kind != Kind::kTuple ||
          a[4]->kind != Kind::kBool) {
        return wrong_args();
      }
      return RebuildTensor(a[0], a[1]->i, a[2]->items, a[3]->items, a[4]->b);
    }
    if (fn == "torch._tensor._rebuild_from_type_v2") {
      // (func, new_type, args, state): func(*args) as new_type, with state's attributes set on
      // the Python object. Only _rebuild_tensor_v2 as a plain tensor or a Parameter; the
      // attributes are Python's alone and are dropped (Python's weights_only load keeps them).
      if (a.size() != 4 || a[0]->kind != Kind::kGlobal || a[1]->kind != Kind::kGlobal ||
          a[2]->kind != Kind::kTuple || (a[3]->kind != Kind::kNone && a[3]->kind != Kind::kDict)) {
        return wrong_args();
      }
      if (a[0]->s != "torch._utils._rebuild_tensor_v2" ||
          (a[1]->s != "torch.Tensor" && a[1]->s != "torch.nn.parameter.Parameter")) {
        return Bad(absl::StrCat(fn, " of ", a[0]->s, " as ", a[1]->s,
                                ": only torch._utils._rebuild_tensor_v2 as torch.Tensor or "
                                "torch.nn.parameter.Parameter is allowed"));
      }
      return Reduce(a[0], a[2]);
    }
    if (fn == "torch._utils._rebuild_parameter" ||
        fn == "torch._utils._rebuild_parameter_with_state") {
      // (data, requires_grad, backward_hooks[, state])
      const size_t n = fn == "torch._utils._rebuild_parameter" ? 3 : 4;
      if (a.size() != n || a[0]->kind != Kind::kTensor || a[1]->kind != Kind::kBool) {
        return wrong_args();
      }
      Obj* o = New(Kind::kTensor);
      o->tensor = a[0]->tensor;
      FSDP_RETURN_IF_ERROR(SetRequiresGrad(o->tensor, a[1]->b));
      return o;
    }
    return Bad(absl::StrCat(fn, " cannot be called"));
  }

  absl::StatusOr<std::string> Latin1(const std::string& utf8) {
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
        return Bad("_codecs.encode of a str that is not latin-1");
      }
    }
    return out;
  }

  absl::Status SetRequiresGrad(at::Tensor& t, bool requires_grad) {
    if (!requires_grad) return absl::OkStatus();
    if (!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type())) {
      return Bad(absl::StrCat("requires_grad on a ", std::string(c10::toString(t.scalar_type())),
                              " tensor"));
    }
    return CallTorch(absl::StrCat(file_, ": requires_grad"), [&] { t.set_requires_grad(true); });
  }

  absl::StatusOr<Obj*> RebuildTensor(Obj* storage, int64_t offset, const std::vector<Obj*>& size,
                                     const std::vector<Obj*>& stride, bool requires_grad) {
    const std::string where = absl::StrCat("tensor on storage '", Printable(storage->s), "' (",
                                           prefix_, "data/", Printable(storage->s), ")");
    auto bad_view = [&](const std::string& why) {
      std::vector<std::string> sz, st;
      for (const Obj* o : size) sz.push_back(o->kind == Kind::kInt ? absl::StrCat(o->i) : "?");
      for (const Obj* o : stride) st.push_back(o->kind == Kind::kInt ? absl::StrCat(o->i) : "?");
      return absl::DataLossError(absl::StrCat(file_, ": ", where, ": view with offset ", offset,
                                              ", size [", absl::StrJoin(sz, ", "), "], stride [",
                                              absl::StrJoin(st, ", "), "] ", why));
    };
    constexpr size_t kMaxDims = 64;
    if (size.size() != stride.size() || size.size() > kMaxDims) {
      return bad_view("has mismatched or too many dimensions");
    }
    const int64_t numel = storage->tensor.numel();
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
    Obj* o = New(Kind::kTensor);
    FSDP_ASSIGN_OR_RETURN(o->tensor, CallTorch(absl::StrCat(file_, ": ", where), [&] {
                            return storage->tensor.as_strided(sizes, strides, offset);
                          }));
    FSDP_RETURN_IF_ERROR(SetRequiresGrad(o->tensor, requires_grad));
    return o;
  }

  // ('storage', storage_type, key, location, numel) -> the storage's 1-D base tensor, read
  // once per key from <prefix>data/<key>.
  absl::StatusOr<Obj*> PersistentLoad(Obj* pid) {
    if (pid->kind != Kind::kTuple || pid->items.size() != 5 || pid->items[0]->kind != Kind::kStr ||
        pid->items[0]->s != "storage" || pid->items[1]->kind != Kind::kGlobal ||
        pid->items[2]->kind != Kind::kStr || pid->items[3]->kind != Kind::kStr ||
        pid->items[4]->kind != Kind::kInt) {
      return Bad("persistent id is not ('storage', storage_type, key, location, numel)");
    }
    const std::optional<at::ScalarType> dtype = StorageDtype(pid->items[1]->s);
    if (!dtype) return Bad(absl::StrCat(pid->items[1]->s, " is not a storage type"));
    const std::string& key = pid->items[2]->s;
    const int64_t numel = pid->items[4]->i;
    const std::string entry_name = absl::StrCat(prefix_, "data/", key);
    const std::string where =
        absl::StrCat("storage '", Printable(key), "' (", Printable(entry_name), ")");
    auto cached = storages_.find(key);
    if (cached != storages_.end()) {
      Obj* s = cached->second;
      if (s->tensor.scalar_type() != *dtype || s->tensor.numel() != numel) {
        return absl::DataLossError(
            absl::StrCat(file_, ": ", where, " is used as ", pid->items[1]->s, " of ", numel,
                         " elements and as ", std::string(c10::toString(s->tensor.scalar_type())),
                         " of ", s->tensor.numel(), " elements"));
      }
      return s;
    }
    const ZipEntry* entry = zip_.Find(entry_name);
    if (entry == nullptr) {
      return absl::DataLossError(absl::StrCat(file_, ": ", where, " is missing from the archive"));
    }
    const uint64_t itemsize = c10::elementSize(*dtype);
    uint64_t nbytes = 0;
    if (numel < 0 || __builtin_mul_overflow(static_cast<uint64_t>(numel), itemsize, &nbytes) ||
        nbytes != entry->size) {
      return absl::DataLossError(absl::StrCat(
          file_, ": ", where, ": size mismatch: the pickle says ", numel, " elements of ",
          pid->items[1]->s, ", the entry holds ", entry->size, " bytes"));
    }
    // Only now, with the size checked against the archive, allocate.
    Obj* s = New(Kind::kStorage);
    s->s = key;
    FSDP_ASSIGN_OR_RETURN(s->tensor, CallTorch(absl::StrCat(file_, ": ", where), [&] {
                            return at::empty({numel}, at::TensorOptions().dtype(*dtype));
                          }));
    FSDP_RETURN_IF_ERROR(zip_.Read(*entry, s->tensor.data_ptr()));
    storages_[key] = s;
    return s;
  }

  std::string_view data_;
  const std::string& file_;
  const std::string& entry_;
  const ZipReader& zip_;
  const std::string& prefix_;
  size_t pos_ = 0;
  size_t op_pos_ = 0;
  int protocol_ = 0;
  std::vector<Obj*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Obj*> memo_;
  std::unordered_map<std::string, Obj*> storages_;
  std::deque<Obj> arena_;  // stable addresses
};

// ------------------------------------------------------------------------------------------
// Machine objects -> PyValue. Shared sub-objects are copied; `budget` (bytes) bounds the copies
// so that a small pickle of nested shared lists, or of one long str referenced many times,
// cannot expand into an enormous tree.

absl::StatusOr<PyValue> ToPyValue(const Obj* o, int depth, int64_t* budget,
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
  auto items = [&](const std::vector<Obj*>& in) -> absl::StatusOr<std::vector<PyValue>> {
    std::vector<PyValue> out;
    out.reserve(in.size());
    for (const Obj* item : in) {
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
    case Kind::kStorage:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat(file, ": the pickle leaves a bare ",
                                                 KindName(o->kind), " ", Printable(o->s),
                                                 " in the result (torch.save never does)"));
}

absl::StatusOr<PyValue> Load(const Source& source, const std::string& file) {
  ZipReader zip(source, file);
  FSDP_RETURN_IF_ERROR(zip.Open());
  // <prefix>/data.pkl, whatever the archive's top folder is called.
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
  const ZipEntry& pickle_entry = *pickles[0];
  const std::string prefix = pickle_entry.name.substr(0, pickle_entry.name.size() - 8);
  if (const ZipEntry* byteorder = zip.Find(prefix + "byteorder")) {
    if (byteorder->size > 16)
      return absl::DataLossError(absl::StrCat(file, ": bad byteorder entry"));
    std::string order(byteorder->size, '\0');
    FSDP_RETURN_IF_ERROR(zip.Read(*byteorder, order.data()));
    if (order != "little") {
      return absl::InvalidArgumentError(absl::StrCat(file, ": byte order '", Printable(order),
                                                     "' is not supported (only little-endian)"));
    }
  }
  std::string pickle(pickle_entry.size, '\0');  // size checked against the file
  FSDP_RETURN_IF_ERROR(zip.Read(pickle_entry, pickle.data()));
  Unpickler unpickler(pickle, file, pickle_entry.name, zip, prefix);
  FSDP_ASSIGN_OR_RETURN(const Obj* result, unpickler.Run());
  // A torch.save pickle's tree takes at most a few dozen times its bytes (a 2-byte memo
  // reference to a str copies the str); only sharing that torch.save never writes can exceed
  // this. The fixed part is kept small: found by fuzzing, 64 MiB of it let a 588-byte file of
  // doubly shared lists spend seconds of CPU before being refused.
  int64_t budget = 128 * static_cast<int64_t>(pickle.size()) + (int64_t{1} << 20);
  return ToPyValue(result, 0, &budget, file);
}

}  // namespace

absl::StatusOr<PyValue> TorchLoad(const std::string& path) {
  FSDP_ASSIGN_OR_RETURN(std::unique_ptr<FileSource> source, FileSource::Open(path));
  return Load(*source, path);
}

absl::StatusOr<PyValue> TorchLoadFromBytes(std::string_view bytes, const std::string& name) {
  BytesSource source(bytes);
  return Load(source, name);
}

}  // namespace fsdp::checkpoint
