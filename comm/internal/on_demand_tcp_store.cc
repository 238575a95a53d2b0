#include "comm/internal/on_demand_tcp_store.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include <utility>

namespace fsdp::comm::internal {

OnDemandTcpStore::OnDemandTcpStore(std::string host, const c10d::TCPStoreOptions& options)
    : c10d::Store(options.timeout), host_(std::move(host)), options_(options) {
  TORCH_CHECK(!options.waitWorkers, "OnDemandTcpStore: waitWorkers must be false");
  connection_ = c10::make_intrusive<c10d::TCPStore>(host_, options_);
}

OnDemandTcpStore::~OnDemandTcpStore() = default;

void OnDemandTcpStore::Disconnect() {
  c10::intrusive_ptr<c10d::TCPStore> closing;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (options_.isServer) return;
    closing = std::move(connection_);
  }
  // Destroyed outside the lock: ~TCPStore joins its thread.
}

bool OnDemandTcpStore::connected() const {
  std::lock_guard<std::mutex> lock(mu_);
  return connection_.defined();
}

std::pair<c10::intrusive_ptr<c10d::TCPStore>, std::chrono::milliseconds>
OnDemandTcpStore::Connection() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!connection_) {
    c10d::TCPStoreOptions options = options_;
    options.isServer = false;
    options.timeout = timeout_;
    connection_ = c10::make_intrusive<c10d::TCPStore>(host_, options);
  }
  return {connection_, timeout_};
}

void OnDemandTcpStore::set(const std::string& key, const std::vector<uint8_t>& value) {
  Connection().first->set(key, value);
}

std::vector<uint8_t> OnDemandTcpStore::compareSet(const std::string& key,
                                                  const std::vector<uint8_t>& current_value,
                                                  const std::vector<uint8_t>& new_value) {
  return Connection().first->compareSet(key, current_value, new_value);
}

std::vector<uint8_t> OnDemandTcpStore::get(const std::string& key) {
  return Connection().first->get(key);
}

int64_t OnDemandTcpStore::add(const std::string& key, int64_t value) {
  return Connection().first->add(key, value);
}

bool OnDemandTcpStore::deleteKey(const std::string& key) { return Connection().first->deleteKey(key); }

bool OnDemandTcpStore::check(const std::vector<std::string>& keys) {
  return Connection().first->check(keys);
}

int64_t OnDemandTcpStore::getNumKeys() { return Connection().first->getNumKeys(); }

void OnDemandTcpStore::wait(const std::vector<std::string>& keys) {
  auto [connection, timeout] = Connection();
  connection->wait(keys, timeout);
}

void OnDemandTcpStore::wait(const std::vector<std::string>& keys,
                            const std::chrono::milliseconds& timeout) {
  Connection().first->wait(keys, timeout);
}

void OnDemandTcpStore::setTimeout(const std::chrono::milliseconds& timeout) {
  std::lock_guard<std::mutex> lock(mu_);
  timeout_ = timeout;
  if (connection_) connection_->setTimeout(timeout);
}

void OnDemandTcpStore::watchKey(const std::string& key, c10d::WatchKeyCallback /*callback*/) {
  TORCH_CHECK(false, "OnDemandTcpStore does not support watchKey (key '", key,
              "'): its connection closes once a process group is created");
}

void DisconnectStore(const c10::intrusive_ptr<c10d::Store>& store) {
  c10::intrusive_ptr<c10d::Store> current = store;
  while (current) {
    if (auto* on_demand = dynamic_cast<OnDemandTcpStore*>(current.get())) {
      on_demand->Disconnect();
      return;
    }
    auto* prefixed = dynamic_cast<c10d::PrefixStore*>(current.get());
    if (prefixed == nullptr) return;
    current = prefixed->getUnderlyingStore();
  }
}

}  // namespace fsdp::comm::internal
