// The zip reader of the torch.save reader (torch_load.h): the byte sources it reads from (a
// file, or bytes in memory) and the directory of a zip archive of stored (uncompressed)
// entries, as torch.save writes them, zip64 records included.
//
// Every size and offset read from the archive is checked against the archive's size before
// anything is allocated, and entries may neither overlap nor reach into the directory, so the
// entries together never claim more bytes than the file holds.
//
// Errors (each message names the file, and the entry where one is concerned):
//   NOT_FOUND / PERMISSION_DENIED / UNKNOWN  FileSource::Open cannot open the file; a read fails.
//   INVALID_ARGUMENT  not a zip file (a pickle: torch.save's legacy format), not a regular file,
//                     a multi-disk archive, an encrypted or compressed entry.
//   DATA_LOSS         a directory, record or local header outside the file or inconsistent,
//                     overlapping or duplicate entries, an entry whose CRC-32 differs, a file
//                     that shrank while being read.
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_ZIP_READER_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_ZIP_READER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fsdp::checkpoint {

// Bytes to read at offsets.
class Source {
 public:
  virtual ~Source() = default;
  virtual uint64_t size() const = 0;
  // Reads exactly `n` bytes at `offset`; precondition: offset + n <= size().
  virtual absl::Status ReadAt(uint64_t offset, uint64_t n, void* dst) const = 0;
};

// Bytes in memory; they must outlive the source.
class BytesSource : public Source {
 public:
  explicit BytesSource(std::string_view bytes) : bytes_(bytes) {}
  uint64_t size() const override { return bytes_.size(); }
  absl::Status ReadAt(uint64_t offset, uint64_t n, void* dst) const override;

 private:
  std::string_view bytes_;
};

// A regular file, read with pread; its size is taken once, at Open.
class FileSource : public Source {
 public:
  static absl::StatusOr<std::unique_ptr<FileSource>> Open(const std::string& path);
  ~FileSource() override;
  uint64_t size() const override { return size_; }
  absl::Status ReadAt(uint64_t offset, uint64_t n, void* dst) const override;

 private:
  FileSource(std::string path, int fd, uint64_t size)
      : path_(std::move(path)), fd_(fd), size_(size) {}
  std::string path_;
  int fd_;
  uint64_t size_;
};

// The window [offset, offset + size) of another source (a torch.save archive stored inside a
// larger file, as DCP's .distcp files hold one per item), counting the bytes read through it
// into *bytes_read when given. `base` must outlive it; precondition: the window lies within it.
class SliceSource : public Source {
 public:
  SliceSource(const Source& base, uint64_t offset, uint64_t size, int64_t* bytes_read = nullptr)
      : base_(base), offset_(offset), size_(size), bytes_read_(bytes_read) {}
  uint64_t size() const override { return size_; }
  absl::Status ReadAt(uint64_t offset, uint64_t n, void* dst) const override;

 private:
  const Source& base_;
  uint64_t offset_;
  uint64_t size_;
  int64_t* bytes_read_;
};

// A little-endian field of a zip record: its offset in the record and its width in bytes.
struct ZipField {
  int offset;
  int width;
};

struct ZipEntry {
  std::string name;
  uint64_t header_offset = 0;
  uint64_t data_offset = 0;
  uint64_t size = 0;
  uint32_t crc = 0;
};

// The entries of a zip archive. `source` and `file` (the archive's name in messages) must
// outlive the reader.
class ZipReader {
 public:
  ZipReader(const Source& source, const std::string& file) : source_(source), file_(file) {}

  // Reads and checks the central directory and every local header.
  absl::Status Open();

  const std::map<std::string, ZipEntry>& entries() const { return entries_; }

  // The entry called `name`, or null.
  const ZipEntry* Find(const std::string& name) const;

  // Reads an entry's bytes into `dst` (entry.size bytes) and checks its CRC-32. In chunks, each
  // checksummed right after it is read, while it is still in the CPU's cache.
  absl::Status Read(const ZipEntry& entry, void* dst) const;

 private:
  // Where the central directory is, as the end records say.
  struct DirectoryLocation {
    uint64_t disk, cd_disk, entries_on_disk, entries;
    uint64_t cd_size, cd_offset;
    uint64_t cd_limit;  // the central directory ends before this
  };

  static DirectoryLocation ReadLocation(const char* record, const ZipField (&fields)[6],
                                        uint64_t cd_limit);
  absl::Status Loss(const std::string& what) const;
  absl::Status CheckZipMagic() const;
  absl::StatusOr<DirectoryLocation> FindDirectory() const;
  absl::Status ReadZip64Record(uint64_t eocd_offset, DirectoryLocation& location) const;
  absl::Status CheckEntriesDisjoint() const;
  absl::Status ParseCentralEntry(const std::string& cd, uint64_t* pos, uint64_t cd_offset);
  absl::StatusOr<uint64_t> LocalDataOffset(const ZipEntry& entry, uint64_t cd_offset) const;

  const Source& source_;
  const std::string& file_;
  std::map<std::string, ZipEntry> entries_;
};

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_ZIP_READER_H_
