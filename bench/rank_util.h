// Helpers shared by the multi-rank benchmarks in bench/: resident-memory readings from
// /proc/self and re-executing the benchmark binary as N rank processes.
//
// Peak memory. Linux keeps a process's peak resident set size in /proc/self/status (VmHWM);
// writing "5" to /proc/self/clear_refs resets it to the current RSS, so a benchmark can read
// the peak of one case alone. On a kernel without that, ResetPeakRss returns false and the
// peak covers everything since the process started.
#ifndef FSDP_CPP_BENCH_RANK_UTIL_H_
#define FSDP_CPP_BENCH_RANK_UTIL_H_

#include <cstdint>
#include <string>

namespace fsdp::bench {

// VmRSS / VmHWM of this process in bytes; -1 if /proc/self/status cannot be read.
int64_t CurrentRssBytes();
int64_t PeakRssBytes();
// Returns freed heap memory to the kernel (glibc malloc_trim), so that one case's freed
// buffers do not count as the next case's resident memory, then resets VmHWM to the current
// RSS. Returns false if the kernel refused the reset.
bool ResetPeakRss();

// CPU seconds of this process, all its threads, so far (CLOCK_PROCESS_CPUTIME_ID), and its
// minor page faults so far (getrusage): on a busy machine a step's CPU time is steadier than
// its wall time, and the faults count the fresh pages it touched.
double ProcessCpuSeconds();
int64_t MinorPageFaults();

// Makes glibc serve every allocation of at least `bytes` with its own mmap, returned to the
// kernel when freed (mallopt M_MMAP_THRESHOLD, which also turns off glibc's dynamic threshold).
// By default glibc raises the threshold to the size of each large block freed, so after FSDP
// frees a gathered unit (32 MiB here) later blocks of that size come from the heap and stay
// resident once freed: peak RSS then counts memory the program no longer holds. Returns false
// if glibc refused.
bool MmapAllocationsFrom(int64_t bytes);

// Not a rank yet: runs this very binary (same arguments) as `world_size` ranks through
// comm::Launch, printing rank 0's output as is, with OMP_NUM_THREADS=1 unless set (as torchrun
// does for several ranks on one host). Returns the process exit code; `name` prefixes errors.
int LaunchSelfAsRanks(int argc, char** argv, int world_size, const std::string& name);

}  // namespace fsdp::bench

#endif  // FSDP_CPP_BENCH_RANK_UTIL_H_
