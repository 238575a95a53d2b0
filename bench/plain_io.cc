#include "bench/plain_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"

namespace fsdp::bench {
namespace {

// A kChunkBytes buffer of non-zero bytes, touched once so no page fault lands in a timed call.
std::vector<char>& IoBuffer() {
  static std::vector<char> buffer = [] {
    std::vector<char> b(static_cast<size_t>(kChunkBytes));
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<char>(i * 131 + 7);
    return b;
  }();
  return buffer;
}

}  // namespace

absl::Status Errno(const std::string& what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

absl::Status PlainWrite(const std::string& path, int64_t bytes) {
  const std::vector<char>& buffer = IoBuffer();
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot open", path);
  int64_t left = bytes;
  while (left > 0) {
    const ssize_t n = ::write(fd, buffer.data(), static_cast<size_t>(std::min(left, kChunkBytes)));
    if (n < 0) {
      if (errno == EINTR) continue;
      ::close(fd);
      return Errno("cannot write", path);
    }
    left -= n;
  }
  if (::fsync(fd) != 0) {
    ::close(fd);
    return Errno("cannot fsync", path);
  }
  if (::close(fd) != 0) return Errno("cannot close", path);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::pair<std::string, int64_t>>> FilesOf(const std::string& dir) {
  std::vector<std::pair<std::string, int64_t>> files;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    if (!entry.is_regular_file()) continue;
    files.emplace_back(entry.path().string(), static_cast<int64_t>(entry.file_size()));
  }
  if (error) return absl::InternalError(absl::StrCat("cannot list ", dir, ": ", error.message()));
  std::sort(files.begin(), files.end());
  return files;
}

absl::Status DropFromCache(const std::string& path) {
  std::vector<std::string> files;
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) {
    for (const auto& entry : std::filesystem::directory_iterator(path, error)) {
      if (entry.is_regular_file()) files.push_back(entry.path().string());
    }
  } else {
    files.push_back(path);
  }
  if (error) return absl::InternalError(absl::StrCat("cannot list ", path, ": ", error.message()));
  for (const std::string& file : files) {
    const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Errno("cannot open", file);
    const int rc = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
    if (rc != 0) {
      errno = rc;
      return Errno("posix_fadvise(DONTNEED) failed on", file);
    }
  }
  return absl::OkStatus();
}

absl::Status PlainRead(const std::vector<std::pair<std::string, int64_t>>& files, int64_t offset,
                       int64_t bytes) {
  int64_t total = 0;
  for (const auto& [path, size] : files) total += size;
  if (total == 0) return absl::InternalError("nothing to read");
  std::vector<char>& buffer = IoBuffer();
  offset %= total;
  size_t index = 0;
  while (offset >= files[index].second) offset -= files[index++].second;
  int64_t left = bytes;
  while (left > 0) {
    const auto& [path, size] = files[index];
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Errno("cannot open", path);
    if (::lseek(fd, offset, SEEK_SET) < 0) {
      ::close(fd);
      return Errno("cannot seek", path);
    }
    int64_t in_file = std::min(left, size - offset);
    while (in_file > 0) {
      const ssize_t n =
          ::read(fd, buffer.data(), static_cast<size_t>(std::min(in_file, kChunkBytes)));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        ::close(fd);
        return Errno("cannot read", path);
      }
      in_file -= n;
      left -= n;
    }
    ::close(fd);
    offset = 0;
    index = (index + 1) % files.size();
  }
  return absl::OkStatus();
}

}  // namespace fsdp::bench
