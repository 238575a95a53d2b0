// LoadShardedCheckpoint (sharded_checkpoint.h): our format's reader as the source of the load's
// steps (internal/shard_load.h), or a DCP directory's (dcp_load.h).
#include <memory>
#include <utility>

#include "checkpoint/dcp_load.h"
#include "checkpoint/internal/shard_load.h"
#include "checkpoint/sharded_checkpoint.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint {
namespace {

class ShardedFormatSource final : public internal::ShardSource {
 public:
  explicit ShardedFormatSource(std::unique_ptr<ShardedCheckpointReader> reader)
      : reader_(std::move(reader)), file_(reader_->dir() + "/metadata.json") {}

  const ShardedMetadata& metadata() const override { return reader_->metadata(); }
  const std::string& metadata_file() const override { return file_; }
  absl::Status ReadRange(const TensorRecord& tensor, int64_t begin, int64_t end,
                         at::Tensor& out) override {
    return reader_->ReadRange(tensor, begin, end, out);
  }
  absl::StatusOr<at::Tensor> ReadTensor(const TensorRecord& tensor) override {
    return reader_->ReadTensor(tensor);
  }
  ReadStats stats() const override { return reader_->stats(); }

 private:
  std::unique_ptr<ShardedCheckpointReader> reader_;
  std::string file_;
};

}  // namespace

absl::StatusOr<LoadStats> LoadShardedCheckpoint(const std::string& dir,
                                                FullyShardedDataParallel& fsdp,
                                                optim_state::OptimizerAdapter* adapter,
                                                const LoadShardedOptions& options) {
  if (dcp::IsDcpCheckpoint(dir)) {
    return dcp::LoadDcpCheckpoint(dir, fsdp, adapter, options.dcp_layout);
  }
  return internal::LoadFromShardSource(
      dir,
      [&]() -> absl::StatusOr<std::unique_ptr<internal::ShardSource>> {
        FSDP_ASSIGN_OR_RETURN(std::unique_ptr<ShardedCheckpointReader> reader,
                              ShardedCheckpointReader::Open(dir));
        return std::unique_ptr<internal::ShardSource>(
            std::make_unique<ShardedFormatSource>(std::move(reader)));
      },
      fsdp, adapter);
}

}  // namespace fsdp::checkpoint
