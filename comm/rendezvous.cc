#include "comm/rendezvous.h"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp::comm {
namespace {

absl::StatusOr<int> IntFromEnv(const char* name, std::optional<int> fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    if (fallback) return *fallback;
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable ", name, " is not set (torchrun-style rendezvous "
                     "needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"));
  }
  int parsed = 0;
  if (!absl::SimpleAtoi(value, &parsed) || parsed < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable ", name, "='", value,
                     "' is not a non-negative integer"));
  }
  return parsed;
}

}  // namespace

bool LaunchedByLauncher() {
  return std::getenv("RANK") != nullptr && std::getenv("WORLD_SIZE") != nullptr;
}

absl::StatusOr<RankInfo> RankInfoFromEnv() {
  RankInfo info;
  FSDP_ASSIGN_OR_RETURN(info.rank, IntFromEnv("RANK", std::nullopt));
  FSDP_ASSIGN_OR_RETURN(info.world_size, IntFromEnv("WORLD_SIZE", std::nullopt));
  FSDP_ASSIGN_OR_RETURN(info.local_rank, IntFromEnv("LOCAL_RANK", info.rank));
  FSDP_ASSIGN_OR_RETURN(info.local_world_size,
                        IntFromEnv("LOCAL_WORLD_SIZE", info.world_size));
  FSDP_ASSIGN_OR_RETURN(info.master_port, IntFromEnv("MASTER_PORT", std::nullopt));
  const char* addr = std::getenv("MASTER_ADDR");
  if (addr == nullptr || *addr == '\0') {
    return absl::InvalidArgumentError(
        "environment variable MASTER_ADDR is not set (torchrun-style rendezvous needs RANK, "
        "WORLD_SIZE, MASTER_ADDR and MASTER_PORT)");
  }
  info.master_addr = addr;
  if (info.world_size < 1 || info.rank >= info.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("RANK=", info.rank,
                                                   " is outside WORLD_SIZE=", info.world_size));
  }
  if (info.master_port < 1 || info.master_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("MASTER_PORT=", info.master_port, " is not a TCP port"));
  }
  const char* agent = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  info.launcher_hosts_store =
      agent != nullptr && absl::AsciiStrToLower(std::string(agent)) == "true";
  return info;
}

absl::StatusOr<std::shared_ptr<ProcessGroup>> InitProcessGroupFromEnv(
    const RendezvousOptions& options) {
  FSDP_ASSIGN_OR_RETURN(RankInfo info, RankInfoFromEnv());
  const std::string where =
      absl::StrCat("rendezvous of rank ", info.rank, " of ", info.world_size, " at ",
                   info.master_addr, ":", info.master_port);
  auto store = CallTorch(where, [&]() -> c10::intrusive_ptr<c10d::Store> {
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<uint16_t>(info.master_port);
    store_options.isServer = info.rank == 0 && !info.launcher_hosts_store;
    store_options.numWorkers = info.world_size;
    store_options.waitWorkers = false;
    store_options.timeout = options.timeout;
    return c10::make_intrusive<c10d::TCPStore>(info.master_addr, store_options);
  });
  if (!store.ok()) return store.status();
  ProcessGroupOptions pg_options;
  pg_options.name = options.group_name;
  pg_options.timeout = options.timeout;
  pg_options.master_addr = info.master_addr;
  auto group = ProcessGroup::Create(*std::move(store), info.rank, info.world_size, pg_options);
  if (!group.ok()) return Annotate(group.status(), where);
  return group;
}

absl::StatusOr<std::shared_ptr<ProcessGroup>> InitProcessGroupWithFile(
    const std::string& path, int rank, int world_size, const RendezvousOptions& options) {
  auto store = CallTorch(absl::StrCat("opening FileStore ", path),
                         [&]() -> c10::intrusive_ptr<c10d::Store> {
                           return c10::make_intrusive<c10d::FileStore>(path, world_size);
                         });
  if (!store.ok()) return store.status();
  ProcessGroupOptions pg_options;
  pg_options.name = options.group_name;
  pg_options.timeout = options.timeout;
  return ProcessGroup::Create(*std::move(store), rank, world_size, pg_options);
}

}  // namespace fsdp::comm
