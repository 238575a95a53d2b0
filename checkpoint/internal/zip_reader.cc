// See zip_reader.h. The zip format's records as torch.save writes them: local headers with
// their data, the central directory, the zip64 end record and its locator, the end record.
#include "checkpoint/internal/zip_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/crc32.h"
#include "checkpoint/internal/file_bytes.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint {
namespace {

constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kEocdSig = 0x06054b50;
constexpr uint32_t kZip64EocdSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint64_t kEocdSize = 22;
constexpr uint64_t kCentralHeaderSize = 46;
constexpr uint64_t kLocalHeaderSize = 30;

// Where the end record and the zip64 end record hold the directory's location: (offset,
// width) of disk, cd_disk, entries_on_disk, entries, cd_size, cd_offset.
constexpr ZipField kEocdFields[6] = {{4, 2}, {6, 2}, {8, 2}, {10, 2}, {12, 4}, {16, 4}};
constexpr ZipField kZip64EocdFields[6] = {{16, 4}, {20, 4}, {24, 8}, {32, 8}, {40, 8}, {48, 8}};

}  // namespace

// ------------------------------------------------------------------------------------------
// Byte sources.

absl::Status BytesSource::ReadAt(uint64_t offset, uint64_t n, void* dst) const {
  if (n > 0) std::memcpy(dst, bytes_.data() + offset, n);
  return absl::OkStatus();
}

absl::Status SliceSource::ReadAt(uint64_t offset, uint64_t n, void* dst) const {
  if (bytes_read_ != nullptr) *bytes_read_ += static_cast<int64_t>(n);
  return base_.ReadAt(offset_ + offset, n, dst);
}

absl::StatusOr<std::unique_ptr<FileSource>> FileSource::Open(const std::string& path) {
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

FileSource::~FileSource() { ::close(fd_); }

absl::Status FileSource::ReadAt(uint64_t offset, uint64_t n, void* dst) const {
  char* out = static_cast<char*>(dst);
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, 1u << 30));
    const ssize_t got = ::pread(fd_, out, chunk, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      return absl::UnknownError(absl::StrCat(path_, ": read failed: ", std::strerror(errno)));
    }
    if (got == 0) {
      return absl::DataLossError(
          absl::StrCat(path_, ": file ended at byte ", offset, " while reading (did it shrink?)"));
    }
    out += got;
    offset += static_cast<uint64_t>(got);
    n -= static_cast<uint64_t>(got);
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------------------------------------
// The zip directory.

absl::Status ZipReader::Open() {
  FSDP_RETURN_IF_ERROR(CheckZipMagic());
  FSDP_ASSIGN_OR_RETURN(const DirectoryLocation where, FindDirectory());
  if (where.disk != 0 || where.cd_disk != 0 || where.entries_on_disk != where.entries) {
    return absl::InvalidArgumentError(
        absl::StrCat(file_, ": multi-disk zip archives are not supported"));
  }
  if (!FitsIn(where.cd_offset, where.cd_size, where.cd_limit)) {
    return Loss(absl::StrCat("zip central directory (", where.cd_size, " bytes at byte ",
                             where.cd_offset, ") is outside the file (", source_.size(),
                             " bytes)"));
  }
  if (where.entries > where.cd_size / kCentralHeaderSize) {
    return Loss(absl::StrCat("zip directory claims ", where.entries, " entries in ", where.cd_size,
                             " bytes"));
  }
  std::string cd(where.cd_size, '\0');
  FSDP_RETURN_IF_ERROR(source_.ReadAt(where.cd_offset, where.cd_size, cd.data()));
  uint64_t pos = 0;
  for (uint64_t i = 0; i < where.entries; ++i) {
    FSDP_RETURN_IF_ERROR(ParseCentralEntry(cd, &pos, where.cd_offset));
  }
  return CheckEntriesDisjoint();
}

const ZipEntry* ZipReader::Find(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

absl::Status ZipReader::Read(const ZipEntry& entry, void* dst) const {
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

absl::Status ZipReader::Loss(const std::string& what) const {
  return absl::DataLossError(absl::StrCat(file_, ": ", what));
}

// A file that does not start as a zip archive is refused before its size is looked at, and a
// pickle at the start is torch.save's legacy format.
absl::Status ZipReader::CheckZipMagic() const {
  if (source_.size() < 4) return absl::OkStatus();
  char magic[4];
  FSDP_RETURN_IF_ERROR(source_.ReadAt(0, 4, magic));
  if (ReadLE(magic, 4) == kLocalHeaderSig) return absl::OkStatus();
  if (static_cast<uint8_t>(magic[0]) == 0x80) {
    return absl::InvalidArgumentError(
        absl::StrCat(file_,
                     ": not a zip file: it starts with a pickle (torch.save's legacy format, "
                     "_use_new_zipfile_serialization=False, is not supported)"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(file_, ": not a zip file (torch.save writes zip archives)"));
}

ZipReader::DirectoryLocation ZipReader::ReadLocation(const char* record,
                                                     const ZipField (&fields)[6],
                                                     uint64_t cd_limit) {
  uint64_t v[6];
  for (int i = 0; i < 6; ++i) v[i] = ReadLE(record + fields[i].offset, fields[i].width);
  return {v[0], v[1], v[2], v[3], v[4], v[5], cd_limit};
}

// The end-of-central-directory record: the last 22 bytes plus a comment of up to 64 KiB; the
// comment length must reach exactly to the end of the file.
absl::StatusOr<ZipReader::DirectoryLocation> ZipReader::FindDirectory() const {
  const uint64_t size = source_.size();
  if (size < kEocdSize + 4) {
    return Loss(absl::StrCat("truncated: ", size, " bytes cannot hold a zip archive"));
  }
  const uint64_t tail_size = std::min<uint64_t>(size, kEocdSize + 0xFFFF);
  std::string tail(tail_size, '\0');
  FSDP_RETURN_IF_ERROR(source_.ReadAt(size - tail_size, tail_size, tail.data()));
  std::optional<uint64_t> eocd_in_tail;
  for (uint64_t p = tail_size - kEocdSize + 1; p-- > 0;) {
    if (ReadLE(&tail[p], 4) == kEocdSig && ReadLE(&tail[p + 20], 2) == tail_size - p - kEocdSize) {
      eocd_in_tail = p;
      break;
    }
  }
  if (!eocd_in_tail) {
    return Loss("no zip end-of-central-directory record (the file is truncated or corrupted)");
  }
  const char* eocd = &tail[*eocd_in_tail];
  const uint64_t eocd_offset = size - tail_size + *eocd_in_tail;
  DirectoryLocation where = ReadLocation(eocd, kEocdFields, eocd_offset);
  FSDP_RETURN_IF_ERROR(ReadZip64Record(eocd_offset, where));
  return where;
}

// torch.save always writes the zip64 records (a locator just before the end record); where
// they are, their 8-byte fields replace the end record's.
absl::Status ZipReader::ReadZip64Record(uint64_t eocd_offset, DirectoryLocation& where) const {
  if (eocd_offset < 20) return absl::OkStatus();
  char locator[20];
  FSDP_RETURN_IF_ERROR(source_.ReadAt(eocd_offset - 20, 20, locator));
  if (ReadLE(locator, 4) != kZip64LocatorSig) return absl::OkStatus();
  const uint64_t record_offset = ReadLE(locator + 8, 8);
  if (!FitsIn(record_offset, 56, eocd_offset - 20)) {
    return Loss(absl::StrCat("zip64 end-of-central-directory record offset ", record_offset,
                             " is outside the file"));
  }
  char record[56];
  FSDP_RETURN_IF_ERROR(source_.ReadAt(record_offset, 56, record));
  if (ReadLE(record, 4) != kZip64EocdSig) {
    return Loss(absl::StrCat("no zip64 end-of-central-directory record at byte ", record_offset));
  }
  where = ReadLocation(record, kZip64EocdFields, record_offset);
  return absl::OkStatus();
}

// Entries (local header through data) may neither overlap nor reach into the directory: so the
// storages together never exceed the file's size.
absl::Status ZipReader::CheckEntriesDisjoint() const {
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

absl::Status ZipReader::ParseCentralEntry(const std::string& cd, uint64_t* pos,
                                          uint64_t cd_offset) {
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
    return absl::InvalidArgumentError(absl::StrCat(file_, ": zip entry ", Printable(entry.name),
                                                   " is encrypted, which torch.save never writes"));
  }
  if (method != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(file_, ": zip entry ", Printable(entry.name), " is compressed (method ",
                     method, "); torch.save writes stored (uncompressed) entries only"));
  }
  if (compressed != uncompressed) {
    return Loss(absl::StrCat("stored zip entry ", Printable(entry.name), " has sizes ", compressed,
                             " and ", uncompressed));
  }
  entry.header_offset = header_offset;
  entry.size = uncompressed;
  entry.crc = crc;
  FSDP_ASSIGN_OR_RETURN(entry.data_offset, LocalDataOffset(entry, cd_offset));
  const std::string name = entry.name;
  if (!entries_.emplace(name, std::move(entry)).second) {
    return Loss(absl::StrCat("zip entry ", Printable(name), " appears twice"));
  }
  return absl::OkStatus();
}

// The local header repeats the entry's name and has an extra field of its own (torch.save pads
// data to 64 bytes there): the data starts after both, and must end before the directory.
absl::StatusOr<uint64_t> ZipReader::LocalDataOffset(const ZipEntry& entry,
                                                    uint64_t cd_offset) const {
  const uint64_t header_offset = entry.header_offset;
  if (!FitsIn(header_offset, kLocalHeaderSize, cd_offset)) {
    return Loss(absl::StrCat("entry ", Printable(entry.name), ": local header offset ",
                             header_offset, " is outside the file's entries"));
  }
  char local[kLocalHeaderSize];
  FSDP_RETURN_IF_ERROR(source_.ReadAt(header_offset, kLocalHeaderSize, local));
  if (ReadLE(local, 4) != kLocalHeaderSig) {
    return Loss(
        absl::StrCat("entry ", Printable(entry.name), ": no local header at byte ", header_offset));
  }
  const uint64_t name_len = entry.name.size();
  const uint64_t local_name_len = ReadLE(local + 26, 2), local_extra_len = ReadLE(local + 28, 2);
  const uint64_t data_offset = header_offset + kLocalHeaderSize + local_name_len + local_extra_len;
  if (local_name_len != name_len || !FitsIn(data_offset, entry.size, cd_offset)) {
    return Loss(absl::StrCat("entry ", Printable(entry.name), " (", entry.size, " bytes at byte ",
                             data_offset, ") does not fit in the file before the zip directory"));
  }
  std::string local_name(name_len, '\0');
  FSDP_RETURN_IF_ERROR(
      source_.ReadAt(header_offset + kLocalHeaderSize, name_len, local_name.data()));
  if (local_name != entry.name) {
    return Loss(absl::StrCat("entry ", Printable(entry.name), ": local header names ",
                             Printable(local_name)));
  }
  return data_offset;
}

}  // namespace fsdp::checkpoint
