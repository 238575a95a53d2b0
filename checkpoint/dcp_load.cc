#include "checkpoint/dcp_load.h"

#include <sys/stat.h>

#include <algorithm>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/dcp_reader.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/internal/shard_load.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint::dcp {
namespace {

using optim_state::ParamGroup;
using optim_state::ParamKey;
using optim_state::StateValue;

int64_t Numel(const std::vector<int64_t>& sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

// The part of `t` in the box [lo, lo + n) of the tensor's coordinates, `t` holding the box at
// `origin`.
at::Tensor Narrow(at::Tensor t, const std::vector<int64_t>& origin, const std::vector<int64_t>& lo,
                  const std::vector<int64_t>& n) {
  for (size_t d = 0; d < lo.size(); ++d) {
    t = t.narrow(static_cast<int64_t>(d), lo[d] - origin[d], n[d]);
  }
  return t;
}

// The checkpoint in the sharded format's data model, the DCP key of each of its tensors, and
// reads through DcpReader.
class DcpShardSource final : public internal::ShardSource {
 public:
  static absl::StatusOr<std::unique_ptr<DcpShardSource>> Open(const std::string& dir,
                                                              const std::string& layout_spec) {
    auto source = std::unique_ptr<DcpShardSource>(new DcpShardSource());
    FSDP_ASSIGN_OR_RETURN(source->reader_, DcpReader::Open(dir));
    source->file_ = absl::StrCat(dir, "/", kMetadataFileName);
    const Metadata& md = source->reader_->metadata();
    if (layout_spec.empty()) {
      FSDP_ASSIGN_OR_RETURN(source->layout_, DetectDcpLayout(md, source->file_));
    } else {
      FSDP_ASSIGN_OR_RETURN(source->layout_, ParseDcpLayout(layout_spec));
    }
    FSDP_ASSIGN_OR_RETURN(DcpStateKeys keys, SplitDcpKeys(md, source->layout_, source->file_));
    FSDP_RETURN_IF_ERROR(source->AddModel(keys));
    FSDP_RETURN_IF_ERROR(source->AddOptim(keys));
    return source;
  }

  const ShardedMetadata& metadata() const override { return m_; }
  const std::string& metadata_file() const override { return file_; }
  const DcpLayout& layout() const { return layout_; }
  ReadStats stats() const override {
    return {.bytes_read = reader_->stats().bytes_read,
            .data_bytes_read = reader_->stats().bytes_read,
            .files_opened = 0};
  }

  absl::StatusOr<at::Tensor> ReadTensor(const TensorRecord& tensor) override {
    return reader_->ReadTensor(dcp_keys_.at(tensor.key));
  }

  // Each saved chunk that overlaps a box of the range is read once, and its overlap with each
  // box copied into the box's slice of `out`.
  absl::Status ReadRange(const TensorRecord& tensor, int64_t begin, int64_t end,
                         at::Tensor& out) override {
    const std::string& key = dcp_keys_.at(tensor.key);
    FSDP_ASSIGN_OR_RETURN(std::vector<ChunkStorageMetadata> boxes,
                          FlatRangeToBoxes(tensor.shape, begin, end));
    if (out.numel() != end - begin) {
      return absl::InternalError(
          absl::StrCat(key, ": reading ", end - begin, " elements into ", out.numel()));
    }
    std::vector<at::Tensor> views;
    int64_t at = 0;
    for (const ChunkStorageMetadata& box : boxes) {
      const int64_t n = Numel(box.sizes);
      views.push_back(out.narrow(0, at, n).view(box.sizes));
      at += n;
    }
    const auto& t = std::get<TensorStorageMetadata>(*reader_->metadata().Find(key));
    const size_t dims = tensor.shape.size();
    for (const ChunkStorageMetadata& chunk : t.chunks) {
      at::Tensor data;  // read on its first overlap
      for (size_t b = 0; b < boxes.size(); ++b) {
        std::vector<int64_t> lo(dims), n(dims);
        bool overlaps = true;
        for (size_t d = 0; d < dims && overlaps; ++d) {
          lo[d] = std::max(chunk.offsets[d], boxes[b].offsets[d]);
          const int64_t hi =
              std::min(chunk.offsets[d] + chunk.sizes[d], boxes[b].offsets[d] + boxes[b].sizes[d]);
          n[d] = hi - lo[d];
          overlaps = n[d] > 0;
        }
        if (!overlaps) continue;
        if (!data.defined()) {
          FSDP_ASSIGN_OR_RETURN(data, reader_->ReadTensorRegion(key, chunk.offsets, chunk.sizes));
        }
        Narrow(views[b], boxes[b].offsets, lo, n).copy_(Narrow(data, chunk.offsets, lo, n));
      }
    }
    return absl::OkStatus();
  }

  // A bytes entry decoded as a state value.
  absl::StatusOr<StateValue> ReadValue(const std::string& key) {
    FSDP_ASSIGN_OR_RETURN(PyValue value, reader_->ReadObject(key));
    return StateValueFromPyValue(value, absl::StrCat(file_, ": ", key));
  }

 private:
  DcpShardSource() = default;

  const TensorStorageMetadata* TensorEntry(const std::string& key) const {
    return std::get_if<TensorStorageMetadata>(reader_->metadata().Find(key));
  }

  void AddTensor(const std::string& record_key, const std::string& dcp_key, const std::string& fqn,
                 const std::string& state, const TensorStorageMetadata& t) {
    TensorRecord r;
    r.key = record_key;
    r.is_optim = !state.empty();
    r.fqn = fqn;
    r.state = state;
    r.shape = t.size;
    r.dtype = t.properties.dtype;
    m_.tensors.push_back(std::move(r));
    dcp_keys_[record_key] = dcp_key;
  }

  absl::Status AddModel(const DcpStateKeys& keys) {
    for (const auto& [fqn, key] : keys.model) {
      const TensorStorageMetadata* t = TensorEntry(key);
      if (t == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat(file_, ": model entry \"", key, "\" is a bytes entry, not a tensor"));
      }
      AddTensor(absl::StrCat("model/", fqn), key, fqn, "", *t);
      m_.model_keys.emplace_back(fqn, fqn);
    }
    return absl::OkStatus();
  }

  absl::Status AddOptim(const DcpStateKeys& keys) {
    m_.has_optim = !keys.optim_state.empty() || !keys.param_groups.empty();
    for (const auto& [fqn, names] : keys.optim_state) {
      OptimParamRecord rec{fqn, {}};
      for (const auto& [name, key] : names) {
        OptimValueRecord v;
        v.name = name;
        const TensorStorageMetadata* t = TensorEntry(key);
        if (t != nullptr && !t->size.empty()) {
          v.is_tensor = true;
          v.tensor_key = absl::StrCat("optim/", fqn, "/", name);
          AddTensor(v.tensor_key, key, fqn, name, *t);
        } else if (t != nullptr) {  // 0-dim, e.g. Adam's step: read whole on every rank
          FSDP_ASSIGN_OR_RETURN(at::Tensor value, reader_->ReadTensor(key));
          v.value = StateValue(value);
        } else {
          FSDP_ASSIGN_OR_RETURN(v.value, ReadValue(key));
        }
        rec.values.push_back(std::move(v));
      }
      m_.optim.state.push_back(std::move(rec));
    }
    m_.optim.has_param_groups = !keys.param_groups.empty();
    for (const auto& entries : keys.param_groups) {
      ParamGroup group;
      for (const auto& [hp, key] : entries) {
        FSDP_ASSIGN_OR_RETURN(StateValue value, ReadValue(key));
        if (hp != "params") {
          group.hyper_params.Set(hp, std::move(value));
          continue;
        }
        const auto* list = value.GetIf<optim_state::StateSequence>();
        for (size_t i = 0; list != nullptr && i < list->items.size(); ++i) {
          const auto* fqn = list->items[i].GetIf<std::string>();
          if (fqn == nullptr) list = nullptr;
          if (fqn != nullptr) group.params.push_back(ParamKey::Fqn(*fqn));
        }
        if (list == nullptr) {
          return absl::InvalidArgumentError(
              absl::StrCat(file_, ": ", key, " is not a list of parameter names"));
        }
      }
      m_.optim.param_groups.push_back(std::move(group));
    }
    return absl::OkStatus();
  }

  std::unique_ptr<DcpReader> reader_;
  std::string file_;
  DcpLayout layout_;
  ShardedMetadata m_;
  std::map<std::string, std::string> dcp_keys_;  // TensorRecord key -> DCP key
};

}  // namespace

bool IsDcpCheckpoint(const std::string& dir) {
  struct stat st;
  return stat(absl::StrCat(dir, "/", kMetadataFileName).c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

absl::StatusOr<LoadStats> LoadDcpCheckpoint(const std::string& dir, FullyShardedDataParallel& fsdp,
                                            optim_state::OptimizerAdapter* adapter,
                                            const std::string& layout) {
  return internal::LoadFromShardSource(
      dir,
      [&]() -> absl::StatusOr<std::unique_ptr<internal::ShardSource>> {
        FSDP_ASSIGN_OR_RETURN(std::unique_ptr<DcpShardSource> source,
                              DcpShardSource::Open(dir, layout));
        return std::unique_ptr<internal::ShardSource>(std::move(source));
      },
      fsdp, adapter);
}

absl::StatusOr<FullContents> ReadDcpFullContents(const std::string& dir, const std::string& layout,
                                                 DcpLayout* used) {
  FSDP_ASSIGN_OR_RETURN(std::unique_ptr<DcpShardSource> source, DcpShardSource::Open(dir, layout));
  if (used != nullptr) *used = source->layout();
  const ShardedMetadata& m = source->metadata();
  FullContents out;
  for (const auto& [key, stored] : m.model_keys) {
    FSDP_ASSIGN_OR_RETURN(at::Tensor t, source->ReadTensor(*m.FindTensor("model/" + stored)));
    out.model.emplace_back(key, std::move(t));
  }
  out.has_optim = m.has_optim;
  for (const OptimParamRecord& rec : m.optim.state) {
    optim_state::ParamState state;
    for (const OptimValueRecord& v : rec.values) {
      if (!v.is_tensor) {
        state.Set(v.name, optim_state::CloneStateValue(v.value));
        continue;
      }
      FSDP_ASSIGN_OR_RETURN(at::Tensor t, source->ReadTensor(*m.FindTensor(v.tensor_key)));
      state.Set(v.name, StateValue(std::move(t)));
    }
    out.optim.state.Set(ParamKey::Fqn(rec.fqn), std::move(state));
  }
  out.optim.param_groups = m.optim.param_groups;
  out.optim.has_param_groups = m.optim.has_param_groups;
  return out;
}

}  // namespace fsdp::checkpoint::dcp
