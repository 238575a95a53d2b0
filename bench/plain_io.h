// The references checkpoint_benchmark times the checkpoint APIs against: plain write() +
// fsync() of as many bytes, and plain read() of a checkpoint's files, in kChunkBytes calls from
// one buffer touched once, so that no page fault lands in a timed call; and dropping files
// from the page cache for cold reads.
//
// Errors: INTERNAL with the call, the path and errno's text.
#ifndef FSDP_CPP_BENCH_PLAIN_IO_H_
#define FSDP_CPP_BENCH_PLAIN_IO_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fsdp::bench {

inline constexpr int64_t kChunkBytes = int64_t{16} << 20;  // reference I/O size per call

// INTERNAL "<what> <path>: <errno's text>".
absl::Status Errno(const std::string& what, const std::string& path);

// Writes `bytes` to a new file `path` with write() in kChunkBytes calls, then fsync().
absl::Status PlainWrite(const std::string& path, int64_t bytes);

// The regular files of `dir` in name order, with their sizes.
absl::StatusOr<std::vector<std::pair<std::string, int64_t>>> FilesOf(const std::string& dir);

// Drops the pages of every regular file under `path` (a file or directory) from the page cache.
absl::Status DropFromCache(const std::string& path);

// Reads `bytes` with read() from `files` taken as one stream, starting at `offset` (wrapping
// around at the end).
absl::Status PlainRead(const std::vector<std::pair<std::string, int64_t>>& files, int64_t offset,
                       int64_t bytes);

}  // namespace fsdp::bench

#endif  // FSDP_CPP_BENCH_PLAIN_IO_H_
