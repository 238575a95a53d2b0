// Helpers for bytes taken from a checkpoint file, shared by the zip reader, the pickle machine
// and the torch.save reader: little-endian integers, an overflow-free bounds check, and text
// from the file made printable for error messages. No errors: pure functions.
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_FILE_BYTES_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_FILE_BYTES_H_

#include <cstdint>
#include <string>
#include <string_view>

namespace fsdp::checkpoint {

// The `n`-byte (n <= 8) little-endian unsigned integer at `p`; precondition: `p` holds n bytes.
uint64_t ReadLE(const char* p, int n);

// a + b <= limit without overflow.
inline bool FitsIn(uint64_t a, uint64_t b, uint64_t limit) { return a <= limit && b <= limit - a; }

// Printable form of text taken from the file, for messages: C escapes, cut after 120 bytes.
std::string Printable(std::string_view s);

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_FILE_BYTES_H_
