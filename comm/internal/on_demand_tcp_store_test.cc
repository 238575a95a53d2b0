// OnDemandTcpStore against a real TCPStore server in this process: data survives a disconnect,
// the next call reconnects, and DisconnectStore finds the store under PrefixStores.
#include "comm/internal/on_demand_tcp_store.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include <chrono>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::comm::internal {
namespace {

using ::testing::HasSubstr;

std::vector<uint8_t> Bytes(const std::string& s) { return {s.begin(), s.end()}; }

c10d::TCPStoreOptions Options(bool is_server, uint16_t port) {
  c10d::TCPStoreOptions options;
  options.port = port;  // 0 on the server: any free port
  options.isServer = is_server;
  options.waitWorkers = false;
  options.timeout = std::chrono::seconds(20);
  return options;
}

uint16_t PortOf(c10d::TCPStore& store) { return store.getPort(); }

TEST(OnDemandTcpStore, ReconnectsAfterDisconnectAndKeepsTheData) {
  auto server = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", Options(true, 0));
  auto client = c10::make_intrusive<OnDemandTcpStore>("127.0.0.1", Options(false, PortOf(*server)));
  EXPECT_TRUE(client->connected());
  client->set("a", Bytes("1"));
  client->Disconnect();
  EXPECT_FALSE(client->connected());
  EXPECT_EQ(client->get("a"), Bytes("1"));  // reconnects
  EXPECT_TRUE(client->connected());
  EXPECT_EQ(client->add("n", 2), 2);
  EXPECT_TRUE(client->check({"a", "n"}));
  client->Disconnect();
  EXPECT_EQ(client->add("n", 3), 5);
  EXPECT_TRUE(client->deleteKey("a"));
  EXPECT_FALSE(client->check({"a"}));
}

TEST(OnDemandTcpStore, TheHostingStoreStaysConnected) {
  auto host = c10::make_intrusive<OnDemandTcpStore>("127.0.0.1", Options(true, 0));
  host->set("k", Bytes("v"));
  host->Disconnect();
  EXPECT_TRUE(host->connected());
  EXPECT_EQ(host->get("k"), Bytes("v"));
}

TEST(OnDemandTcpStore, WaitTimesOutWithTheStoresTimeout) {
  auto server = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", Options(true, 0));
  auto client = c10::make_intrusive<OnDemandTcpStore>("127.0.0.1", Options(false, PortOf(*server)));
  client->setTimeout(std::chrono::milliseconds(200));
  client->Disconnect();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THROW(client->wait({"never"}), std::exception);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(OnDemandTcpStore, RefusesWatchKey) {
  auto server = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", Options(true, 0));
  auto client = c10::make_intrusive<OnDemandTcpStore>("127.0.0.1", Options(false, PortOf(*server)));
  try {
    client->watchKey("w", [](c10::optional<std::string>, c10::optional<std::string>) {});
    ADD_FAILURE() << "watchKey was accepted";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("does not support watchKey (key 'w')"));
  }
}

TEST(DisconnectStore, FindsTheStoreUnderPrefixStores) {
  auto server = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", Options(true, 0));
  auto client = c10::make_intrusive<OnDemandTcpStore>("127.0.0.1", Options(false, PortOf(*server)));
  auto inner = c10::make_intrusive<c10d::PrefixStore>("a", client);
  auto outer = c10::make_intrusive<c10d::PrefixStore>("b", inner);
  outer->set("k", Bytes("v"));
  DisconnectStore(outer);
  EXPECT_FALSE(client->connected());
  EXPECT_EQ(server->get("a/b/k"), Bytes("v"));
  // Any other store is left alone.
  DisconnectStore(c10::make_intrusive<c10d::PrefixStore>("c", server));
  EXPECT_EQ(server->get("a/b/k"), Bytes("v"));
}

}  // namespace
}  // namespace fsdp::comm::internal
