// CRC-32 as zip (and zlib's crc32(), Python's zlib.crc32) defines it: the reflected polynomial
// 0xEDB88320, initial value and final XOR 0xFFFFFFFF. The checkpoint readers verify every zip
// entry of a torch.save file with it, so it runs over every byte a full load reads; on x86-64
// CPUs with PCLMULQDQ (checked at run time) it folds 64 bytes per step with carry-less
// multiplications (about 10x zlib's table-driven crc32 here), elsewhere it is zlib's crc32.
#ifndef FSDP_CPP_CHECKPOINT_CRC32_H_
#define FSDP_CPP_CHECKPOINT_CRC32_H_

#include <cstddef>
#include <cstdint>

namespace fsdp::checkpoint {

// The CRC-32 of `crc`'s data followed by the `n` bytes at `data`: Crc32(0, ...) starts a new
// one, and Crc32(Crc32(0, a, na), b, nb) == Crc32 of a then b (as zlib's crc32()).
uint32_t Crc32(uint32_t crc, const void* data, size_t n);

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_CRC32_H_
