// ckpt: inspect, verify and convert fsdp-cpp checkpoints offline (no process group).
//
//   ckpt inspect DIR      kind, world size, and a table of every tensor (FQN, optimizer state
//                         name, shape, dtype, bytes, pieces) and non-tensor optimizer values;
//                         DCP (torch.distributed.checkpoint): the layout, every tensor with
//                         dtype, shape and chunks, every bytes entry's value (ckpt_dcp.h)
//   ckpt verify DIR       sharded: reads every block and checks its xxhash64, printing each
//                         bad range (file, byte range, tensor); full: reads both files whole
//                         (zip CRCs); DCP: what can be checked without checksums (ckpt_dcp.h).
//                         Exit status 1 if anything is bad.
//   ckpt convert --in=DIR --out=DIR2 --to=full|sharded|dcp [--world_size=M] [--block_bytes=B]
//                         sharded N -> full, full -> sharded M, sharded N -> sharded M, and a
//                         DCP directory (model + optimizer, layout detected) to either; any of
//                         them -> dcp M (a torch.distributed.checkpoint directory in torchtitan's
//                         layout, __0_0.distcp .. __<M-1>_0.distcp, that PyTorch's dcp.load
//                         reads; checkpoint/dcp_save.h's WriteDcpFromFull). A
//                         sharded output splits each tensor into M even element ranges, one
//                         per rank file (not the layout an M-rank FULL_SHARD job writes, which
//                         follows its flat parameters; any job loads either). Written
//                         atomically (DIR2 is replaced in one rename).
//
// Exit status: 0 success, 1 a failure (message on stderr), 2 bad usage.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/dcp_load.h"
#include "checkpoint/dcp_save.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/sharded_format.h"
#include "optim_state/optim_state_dict.h"
#include "tools/ckpt_dcp.h"

namespace fsdp::checkpoint {
namespace {

constexpr char kUsage[] =
    "usage: ckpt inspect DIR\n"
    "       ckpt verify DIR\n"
    "       ckpt convert --in=DIR --out=DIR2 --to=full|sharded|dcp [--world_size=M] "
    "[--block_bytes=B]\n";

int Fail(const absl::Status& status) {
  std::cerr << "ckpt: " << status << "\n";
  return 1;
}

std::string Shape(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string Dtype(at::ScalarType t) { return SafetensorsDtype(t).value_or(c10::toString(t)); }

bool Exists(const std::string& path) { return std::ifstream(path).good(); }

// The whole contents of a checkpoint of either kind.
absl::StatusOr<FullContents> ReadAny(const std::string& dir, CheckpointKind* kind) {
  absl::StatusOr<CheckpointKind> k = DetectCheckpointKind(dir);
  if (!k.ok()) return k.status();
  *kind = *k;
  if (*k == CheckpointKind::kDcp) return dcp::ReadDcpFullContents(dir);
  if (*k == CheckpointKind::kSharded) {
    auto reader = ShardedCheckpointReader::Open(dir);
    if (!reader.ok()) return reader.status();
    return ReadFullContents(**reader);
  }
  FullContents out;
  auto model = ReadModelStateDict(dir + "/model.pt");
  if (!model.ok()) return model.status();
  out.model = std::move(*model);
  if (Exists(dir + "/optim.pt")) {
    auto optim = ReadOptimStateDict(dir + "/optim.pt");
    if (!optim.ok()) return optim.status();
    out.has_optim = true;
    out.optim = std::move(*optim);
  }
  return out;
}

void PrintRow(const std::vector<std::string>& cells) {
  static const int widths[] = {40, 16, 16, 6, 12, 6};
  std::string line;
  for (size_t i = 0; i < cells.size(); ++i) {
    std::string c = cells[i];
    if (i + 1 < cells.size() && c.size() < static_cast<size_t>(widths[i])) {
      c.resize(static_cast<size_t>(widths[i]), ' ');
    }
    absl::StrAppend(&line, c, i + 1 < cells.size() ? " " : "");
  }
  std::cout << line << "\n";
}

int Inspect(const std::string& dir) {
  absl::StatusOr<CheckpointKind> kind = DetectCheckpointKind(dir);
  if (!kind.ok()) return Fail(kind.status());
  if (*kind == CheckpointKind::kDcp) return InspectDcp(dir);
  if (*kind == CheckpointKind::kSharded) {
    auto reader = ShardedCheckpointReader::Open(dir);
    if (!reader.ok()) return Fail(reader.status());
    const ShardedMetadata& m = (*reader)->metadata();
    std::cout << "kind: sharded\nworld size: " << m.world_size
              << "\ncheckpoint id: " << m.checkpoint_id << "\n";
    for (const auto& [k, v] : m.saved_with) std::cout << "saved with " << k << ": " << v << "\n";
    int64_t total = 0;
    PrintRow({"FQN", "state", "shape", "dtype", "bytes", "pieces"});
    for (const TensorRecord& t : m.tensors) {
      int64_t bytes = 0;
      for (const PieceRecord& p : t.pieces) bytes += p.bytes;
      total += bytes;
      PrintRow({t.fqn, t.is_optim ? t.state : "-", Shape(t.shape), Dtype(t.dtype),
                absl::StrCat(bytes), absl::StrCat(t.pieces.size())});
    }
    for (const auto& [key, stored] : m.model_keys) {
      if (key != stored) std::cout << key << " shares the tensor of " << stored << "\n";
    }
    if (m.has_optim) {
      for (const OptimParamRecord& p : m.optim.state) {
        for (const OptimValueRecord& v : p.values) {
          if (!v.is_tensor) {
            std::cout << p.fqn << " " << v.name << " = " << optim_state::DebugString(v.value)
                      << "\n";
          }
        }
      }
      std::cout << "param_groups: " << m.optim.param_groups.size() << "\n";
    }
    std::cout << "tensor bytes: " << total << " in " << m.files.size() << " files\n";
    return 0;
  }
  FullContents c;
  CheckpointKind k;
  auto contents = ReadAny(dir, &k);
  if (!contents.ok()) return Fail(contents.status());
  std::cout << "kind: full\n";
  int64_t total = 0;
  PrintRow({"FQN", "state", "shape", "dtype", "bytes"});
  for (const auto& [fqn, t] : contents->model) {
    total += t.numel() * static_cast<int64_t>(t.element_size());
    PrintRow({fqn, "-", Shape(t.sizes()), Dtype(t.scalar_type()),
              absl::StrCat(t.numel() * static_cast<int64_t>(t.element_size()))});
  }
  for (const auto& [key, state] : contents->optim.state) {
    for (const auto& [name, value] : state) {
      const at::Tensor* t = value.GetIf<at::Tensor>();
      if (t != nullptr && t->dim() > 0) {
        total += t->numel() * static_cast<int64_t>(t->element_size());
        PrintRow({key.is_fqn() ? key.fqn() : key.ToString(), name, Shape(t->sizes()),
                  Dtype(t->scalar_type()),
                  absl::StrCat(t->numel() * static_cast<int64_t>(t->element_size()))});
      } else {
        std::cout << key.ToString() << " " << name << " = " << optim_state::DebugString(value)
                  << "\n";
      }
    }
  }
  if (contents->has_optim) {
    std::cout << "param_groups: " << contents->optim.param_groups.size() << "\n";
  }
  std::cout << "tensor bytes: " << total << "\n";
  return 0;
}

int Verify(const std::string& dir) {
  absl::StatusOr<CheckpointKind> kind = DetectCheckpointKind(dir);
  if (!kind.ok()) return Fail(kind.status());
  if (*kind == CheckpointKind::kDcp) return VerifyDcp(dir);
  if (*kind == CheckpointKind::kFull) {
    CheckpointKind k;
    auto contents = ReadAny(dir, &k);
    if (!contents.ok()) return Fail(contents.status());
    std::cout << dir << ": OK (full checkpoint read whole)\n";
    return 0;
  }
  auto reader = ShardedCheckpointReader::Open(dir);
  if (!reader.ok()) return Fail(reader.status());
  auto bad = (*reader)->Verify();
  if (!bad.ok()) return Fail(bad.status());
  for (const auto& b : *bad) {
    std::cout << "BAD " << b.file << " bytes [" << b.offset << ", " << b.offset + b.bytes << ")"
              << (b.tensor.empty() ? "" : absl::StrCat(" tensor ", b.tensor)) << ": " << b.problem
              << "\n";
  }
  if (!bad->empty()) {
    std::cout << dir << ": " << bad->size() << " bad range(s)\n";
    return 1;
  }
  std::cout << dir << ": OK (" << (*reader)->stats().bytes_read << " bytes checked)\n";
  return 0;
}

int Convert(const std::map<std::string, std::string>& flags) {
  for (const char* required : {"in", "out", "to"}) {
    if (flags.count(required) == 0) {
      std::cerr << "ckpt convert: --" << required << " is required\n" << kUsage;
      return 2;
    }
  }
  const std::string to = flags.at("to");
  if (to != "full" && to != "sharded" && to != "dcp") {
    std::cerr << "ckpt convert: --to must be full, sharded or dcp\n";
    return 2;
  }
  int world_size = 1;
  if (flags.count("world_size") && !absl::SimpleAtoi(flags.at("world_size"), &world_size)) {
    std::cerr << "ckpt convert: --world_size must be an integer\n";
    return 2;
  }
  int64_t block_bytes = kDefaultBlockBytes;
  if (flags.count("block_bytes") && !absl::SimpleAtoi(flags.at("block_bytes"), &block_bytes)) {
    std::cerr << "ckpt convert: --block_bytes must be an integer\n";
    return 2;
  }
  CheckpointKind kind;
  auto contents = ReadAny(flags.at("in"), &kind);
  if (!contents.ok()) return Fail(contents.status());
  const optim_state::OptimStateDict* optim = contents->has_optim ? &contents->optim : nullptr;
  absl::Status s =
      to == "full" ? WriteFullCheckpoint(flags.at("out"), contents->model, optim)
      : to == "dcp"
          ? WriteDcpFromFull(flags.at("out"), contents->model, optim, world_size)
          : WriteShardedFromFull(flags.at("out"), contents->model, optim, world_size, block_bytes);
  if (!s.ok()) return Fail(s);
  std::cout << "converted " << CheckpointKindName(kind) << " " << flags.at("in") << " to " << to
            << (to != "full" ? absl::StrCat(" (world size ", world_size, ")") : "") << " "
            << flags.at("out") << "\n";
  return 0;
}

}  // namespace
}  // namespace fsdp::checkpoint

int main(int argc, char** argv) {
  using namespace fsdp::checkpoint;  // NOLINT
  if (argc < 2) {
    std::cerr << kUsage;
    return 2;
  }
  const std::string command = argv[1];
  std::map<std::string, std::string> flags;
  std::vector<std::string> args;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (absl::StartsWith(a, "--")) {
      const size_t eq = a.find('=');
      if (eq == std::string::npos) {
        std::cerr << "ckpt: flags are --name=value: " << a << "\n" << kUsage;
        return 2;
      }
      flags[a.substr(2, eq - 2)] = a.substr(eq + 1);
    } else {
      args.push_back(a);
    }
  }
  if ((command == "inspect" || command == "verify") && args.size() == 1 && flags.empty()) {
    return command == "inspect" ? Inspect(args[0]) : Verify(args[0]);
  }
  if (command == "convert" && args.empty()) return Convert(flags);
  std::cerr << kUsage;
  return 2;
}
