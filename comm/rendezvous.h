// Rendezvous: building this process's ProcessGroup from torchrun-style environment variables,
// or from a shared file for single-host runs.
//
// Environment (as torchrun sets it):
//   RANK, WORLD_SIZE        this process's global rank and the number of ranks (required)
//   MASTER_ADDR, MASTER_PORT the TCPStore address (required); rank 0 hosts the store unless
//                            TORCHELASTIC_USE_AGENT_STORE=True says the launcher hosts it
//   LOCAL_RANK, LOCAL_WORLD_SIZE  rank on this host (optional, reported in RankInfo)
//   GLOO_SOCKET_IFNAME      interface the Gloo transport binds to (optional)
// The same binary thus runs unchanged on one host or many.
//
// The store's host must stay up while groups are created (this call, ProcessGroup::NewSubgroup).
// Once groups exist, the host's death reaches the others through their next collective, as an
// error status (LibTorch 2.x's TCPStore client has no thread of its own that the loss could
// disturb).
//
// Errors: INVALID_ARGUMENT naming a missing or malformed variable; DEADLINE_EXCEEDED when the
// other ranks do not arrive within the timeout; UNAVAILABLE when the store cannot be reached.
#ifndef FSDP_CPP_COMM_RENDEZVOUS_H_
#define FSDP_CPP_COMM_RENDEZVOUS_H_

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "comm/process_group.h"

namespace fsdp::comm {

struct RankInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr;
  int master_port = 0;
  bool launcher_hosts_store = false;
};

struct RendezvousOptions {
  // How long to wait for every rank to join; also the group's default collective timeout.
  std::chrono::milliseconds timeout = kDefaultGroupTimeout;
  std::string group_name = "default";
};

// Reads RankInfo from the environment. Errors: INVALID_ARGUMENT naming the variable.
[[nodiscard]] absl::StatusOr<RankInfo> RankInfoFromEnv();

// True when RANK and WORLD_SIZE are set (this process is one rank of a launched job).
bool LaunchedByLauncher();

// TCPStore rendezvous as described above.
[[nodiscard]] absl::StatusOr<std::shared_ptr<ProcessGroup>> InitProcessGroupFromEnv(
    const RendezvousOptions& options = {});

// Rendezvous through a c10d FileStore at `path` (all ranks on one host, no port needed).
// The file must not hold a previous run's state.
[[nodiscard]] absl::StatusOr<std::shared_ptr<ProcessGroup>> InitProcessGroupWithFile(
    const std::string& path, int rank, int world_size, const RendezvousOptions& options = {});

}  // namespace fsdp::comm

#endif  // FSDP_CPP_COMM_RENDEZVOUS_H_
