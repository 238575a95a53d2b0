// OnDemandTcpStore: a c10d::Store for torchrun-style rendezvous that keeps no connection to a
// TCPStore hosted elsewhere between uses.
//
// Why: LibTorch 1.13's c10d::TCPStore opens, besides its request connection, a second
// connection served by a background thread (for watchKey). When the process hosting the store
// dies, that thread either spins on the closed socket (a whole core, until exit) or, when the
// connection is reset rather than closed, throws from the thread and std::terminate aborts this
// rank (seen under ASan in comm/multihost_failure_test: a surviving rank killed by SIGABRT
// instead of reporting the failure). Process groups need the store only while they are
// created, so this store opens a TCPStore on first use and `Disconnect()` closes it again;
// ProcessGroup::Create disconnects once the group is up. A group created later (NewSubgroup)
// reconnects for as long as its creation takes.
//
// On the rank that hosts the store (`TCPStoreOptions::isServer`) the TCPStore holding the
// server is kept for the life of this object: its connections go to this very process.
//
// Thread safety: calls may come from several threads; each uses the connection current when it
// starts, and `Disconnect()` lets calls in flight finish on theirs.
// Errors: as c10d::TCPStore (exceptions; c10::Error or std::system_error), including a failure
// to reconnect; `watchKey` is refused, since a watch would end silently at the next disconnect.
#ifndef FSDP_CPP_COMM_INTERNAL_ON_DEMAND_TCP_STORE_H_
#define FSDP_CPP_COMM_INTERNAL_ON_DEMAND_TCP_STORE_H_

#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace fsdp::comm::internal {

class OnDemandTcpStore final : public c10d::Store {
 public:
  // Connects (and, with `options.isServer`, starts the server) at once, so that a wrong
  // address or a port in use fails here. `options.waitWorkers` must be false.
  OnDemandTcpStore(std::string host, const c10d::TCPStoreOptions& options);
  ~OnDemandTcpStore() override;

  // Closes the connection to a store hosted by another process, if open; the next call opens a
  // new one. No effect on the hosting rank.
  void Disconnect();
  // Whether a connection is open now (always true on the hosting rank).
  bool connected() const;

  void set(const std::string& key, const std::vector<uint8_t>& value) override;
  std::vector<uint8_t> compareSet(const std::string& key,
                                  const std::vector<uint8_t>& current_value,
                                  const std::vector<uint8_t>& new_value) override;
  std::vector<uint8_t> get(const std::string& key) override;
  int64_t add(const std::string& key, int64_t value) override;
  bool deleteKey(const std::string& key) override;
  bool check(const std::vector<std::string>& keys) override;
  int64_t getNumKeys() override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;
  void setTimeout(const std::chrono::milliseconds& timeout) override;
  void watchKey(const std::string& key, c10d::WatchKeyCallback callback) override;

 private:
  // The connection (opened if closed) and the timeout current at the call.
  std::pair<c10::intrusive_ptr<c10d::TCPStore>, std::chrono::milliseconds> Connection();

  const std::string host_;
  const c10d::TCPStoreOptions options_;
  mutable std::mutex mu_;
  c10::intrusive_ptr<c10d::TCPStore> connection_;  // guarded by mu_
};

// Closes the connection of the OnDemandTcpStore under `store` (through any PrefixStores), if
// there is one; other stores are left alone.
void DisconnectStore(const c10::intrusive_ptr<c10d::Store>& store);

}  // namespace fsdp::comm::internal

#endif  // FSDP_CPP_COMM_INTERNAL_ON_DEMAND_TCP_STORE_H_
