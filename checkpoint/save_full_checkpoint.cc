#include "checkpoint/save_full_checkpoint.h"

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/internal/full_checkpoint_pickle.h"
#include "comm/rank0_status.h"
#include "checkpoint/internal/torch_save_archive.h"
#include "comm/status_macros.h"
#include "fsdp/state_dict.h"
#include "optim_state/internal/full_gather.h"

namespace fsdp::checkpoint {
namespace {

using internal::ArchiveWriter;
using internal::Pickled;
using optim_state::internal::DeferredGather;

constexpr int kUnitTag = 0x5AF1;  // a unit's shards sent to rank 0

// Where storage i of an archive comes from: its own tensor (step -1: unmanaged values, scalar
// state), or gather `step` of the file's plan (`index`: the parameter within the unit, for
// model.pt).
struct Piece {
  int step = -1;
  size_t index = 0;
};

// One file's plan: the gathers in the order every rank runs them (model.pt: indices into
// fsdp.units(); optim.pt: into the deferred gathers), and on rank 0 each storage's piece.
struct FilePlan {
  std::vector<int> steps;
  std::vector<Piece> pieces;
};

std::string EncodeSteps(const FilePlan& plan) { return absl::StrJoin(plan.steps, ","); }

absl::StatusOr<std::vector<int>> DecodeSteps(absl::string_view encoded) {
  std::vector<int> steps;
  if (encoded.empty()) return steps;
  for (absl::string_view part : absl::StrSplit(encoded, ',')) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v)) return absl::InternalError("a malformed save plan");
    steps.push_back(v);
  }
  return steps;
}

// The pieces of `pickled` and the steps they need, in the pickle's order: `source(storage)`
// says which gather target (unit or deferred gather) a placeholder stands for, and the index
// within it. Consecutive storages of one target share one gather.
template <typename SourceFn>
FilePlan PlanFile(const Pickled& pickled, SourceFn source) {
  FilePlan plan;
  for (const at::Tensor& storage : pickled.storages) {
    Piece& piece = plan.pieces.emplace_back();
    if (!internal::IsPlaceholder(storage)) continue;
    const auto [target, index] = source(storage);
    if (plan.steps.empty() || plan.steps.back() != target) plan.steps.push_back(target);
    piece.step = static_cast<int>(plan.steps.size()) - 1;
    piece.index = index;
  }
  return plan;
}

// Rank 0's writes run behind the gathers on one background thread, so that a unit's write
// overlaps the next unit's gather. Run waits for the task before it, so that at most two units'
// gathered state are held at once: the one being written and the one being gathered. Tasks keep
// their errors where the caller reads them after Wait (the archive writers), never throw.
class WriteBehind {
 public:
  WriteBehind() = default;
  WriteBehind(const WriteBehind&) = delete;
  WriteBehind& operator=(const WriteBehind&) = delete;
  ~WriteBehind() { Wait(); }

  void Run(std::function<void()> task) {
    Wait();
    thread_ = std::thread(std::move(task));
  }
  void Wait() {
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::thread thread_;
};

class StreamingSave {
 public:
  StreamingSave(const std::string& dir, FullyShardedDataParallel& fsdp,
                const optim_state::OptimizerAdapter* adapter,
                const SaveFullCheckpointOptions& options)
      : dir_(dir),
        fsdp_(fsdp),
        adapter_(adapter),
        options_(options),
        group_(*fsdp.group()),
        replicas_(fsdp.options().replicate_group.get()),
        writes_(group_.rank() == 0 && (replicas_ == nullptr || replicas_->rank() == 0)),
        context_(absl::StrCat("SaveFullCheckpoint(", dir, ")")) {
    for (const auto& unit : fsdp.units()) units_.push_back(unit.handle);
  }

  absl::Status Run() {
    FSDP_RETURN_IF_ERROR(DeferOptimGathers());
    std::string plan;
    if (group_.rank() == 0) {
      absl::Status planned = PlanOnRank0();
      FSDP_ASSIGN_OR_RETURN(std::string failure, AcrossReplicas(comm::EncodeStatus(planned)));
      plan = failure.empty() ? absl::StrCat(EncodeSteps(model_plan_), ";", EncodeSteps(optim_plan_))
                             : absl::StrCat("!", failure);
    }
    absl::StatusOr<std::string> agreed = group_.BroadcastObject(plan, 0);
    if (!agreed.ok()) return Annotate(agreed.status(), context_);
    if (agreed->rfind('!', 0) == 0) return comm::DecodeStatus(agreed->substr(1), context_);
    FSDP_RETURN_IF_ERROR(DecodePlans(*agreed), context_);
    FSDP_RETURN_IF_ERROR(StreamModel(), context_);
    if (adapter_ != nullptr) FSDP_RETURN_IF_ERROR(StreamOptim(), context_);
    behind_.Wait();
    std::string outcome;
    if (group_.rank() == 0) {
      FSDP_ASSIGN_OR_RETURN(
          outcome,
          AcrossReplicas(writes_ ? comm::EncodeStatus(CommitOnRank0()) : std::string()));
    }
    agreed = group_.BroadcastObject(outcome, 0);
    if (!agreed.ok()) return Annotate(agreed.status(), context_);
    return comm::DecodeStatus(*agreed, context_);
  }

 private:
  // Rank 0 of the shard group: under HYBRID_SHARD every replica holds the same state and only
  // the first replica's rank 0 writes; its status (encoded) reaches the other replicas' rank 0.
  absl::StatusOr<std::string> AcrossReplicas(const std::string& status) {
    if (replicas_ == nullptr) return status;
    absl::StatusOr<std::string> agreed = replicas_->BroadcastObject(status, 0);
    if (!agreed.ok()) return Annotate(agreed.status(), context_);
    return agreed;
  }

  // Every rank: the optimizer's full dict with its gathers recorded, not run (the key
  // exchange and checks are collectives).
  absl::Status DeferOptimGathers() {
    if (adapter_ == nullptr) return absl::OkStatus();
    absl::StatusOr<optim_state::OptimStateDict> optim =
        optim_state::internal::GatherFullOptimStateDict(
            fsdp_, *adapter_,
            {.rank0_only = true,
             .deferred = &gathers_,
             .placeholder = [](int64_t numel, at::ScalarType dtype) {
               return internal::PlaceholderTensor(numel, dtype);
             }});
    if (!optim.ok()) return Annotate(optim.status(), context_);
    optim_ = *std::move(optim);
    return absl::OkStatus();
  }

  // Every rank: the plans rank 0 broadcast ("<model steps>;<optim steps>").
  absl::Status DecodePlans(const std::string& plans) {
    const std::vector<std::string> parts = absl::StrSplit(plans, ';');
    if (parts.size() != 2) return absl::InternalError("a malformed save plan");
    FSDP_ASSIGN_OR_RETURN(model_plan_.steps, DecodeSteps(parts[0]));
    FSDP_ASSIGN_OR_RETURN(optim_plan_.steps, DecodeSteps(parts[1]));
    return absl::OkStatus();
  }

  // Rank 0: both pickles (placeholders for every gathered value), the plans, the staging
  // directory and model.pt's writer.
  absl::Status PlanOnRank0() {
    ModelStateDict model;
    std::unordered_map<const c10::StorageImpl*, std::pair<int, size_t>> model_sources;
    std::unordered_map<const FlatParamHandle*, std::unordered_map<size_t, at::Tensor>> stand_ins;
    for (FullStateDictKey& key : FullStateDictLayout(fsdp_)) {
      if (key.handle != nullptr) {
        at::Tensor& stand_in = stand_ins[key.handle][key.index];
        if (!stand_in.defined()) {
          const FlatParamInfo& info = key.handle->infos()[key.index];
          stand_in = internal::PlaceholderTensor(info.numel, key.handle->flat_param().scalar_type())
                         .view(info.shape);
          const int unit = UnitIndex(key.handle);
          model_sources[stand_in.storage().unsafeGetStorageImpl()] = {unit, key.index};
        }
        key.value = stand_in;
      }
      model.emplace_back(std::move(key.fqn), std::move(key.value));
    }
    FSDP_ASSIGN_OR_RETURN(model_pickled_, internal::PickleModel(model, dir_ + "/model.pt"));
    model_plan_ = PlanFile(model_pickled_, [&](const at::Tensor& t) {
      return model_sources.at(t.storage().unsafeGetStorageImpl());
    });
    if (adapter_ != nullptr) FSDP_RETURN_IF_ERROR(PlanOptimOnRank0());
    if (writes_) {
      FSDP_ASSIGN_OR_RETURN(staging_, CreateStagingDir(dir_));
    }
    return absl::OkStatus();
  }

  absl::Status PlanOptimOnRank0() {
    FSDP_ASSIGN_OR_RETURN(optim_pickled_, internal::PickleOptim(optim_, dir_ + "/optim.pt"));
    std::unordered_map<const c10::StorageImpl*, int> by_storage;
    for (size_t g = 0; g < gathers_.size(); ++g) {
      if (gathers_[g].placeholder.defined()) {
        by_storage[gathers_[g].placeholder.storage().unsafeGetStorageImpl()] = static_cast<int>(g);
      }
    }
    optim_plan_ = PlanFile(optim_pickled_, [&](const at::Tensor& t) {
      return std::pair<int, size_t>(by_storage.at(t.storage().unsafeGetStorageImpl()), 0);
    });
    // Gathers whose values no key refers to still run (every rank runs every gather), last.
    std::vector<bool> planned(gathers_.size(), false);
    for (int g : optim_plan_.steps) planned[static_cast<size_t>(g)] = true;
    for (size_t g = 0; g < gathers_.size(); ++g) {
      if (!planned[g]) optim_plan_.steps.push_back(static_cast<int>(g));
    }
    optim_ = {};  // the placeholders' dict is no longer needed
    return absl::OkStatus();
  }

  int UnitIndex(const FlatParamHandle* handle) const {
    for (size_t u = 0; u < units_.size(); ++u) {
      if (units_[u] == handle) return static_cast<int>(u);
    }
    return -1;
  }

  // Unit `h`'s padded full flat parameter on rank 0 of this group (undefined elsewhere): the
  // other ranks send it their shards, half the bytes of GatherFullFlat's all-gather, whose
  // result only rank 0 would use. A unit of another group, or unsharded now, is
  // GatherFullFlat's.
  absl::StatusOr<at::Tensor> GatherUnit(FlatParamHandle& h) {
    if (!h.sharded() || h.is_unsharded() || h.group().get() != &group_) return h.GatherFullFlat();
    const at::Tensor shard = h.flat_param().detach();
    const auto context = [&](const char* dir, int r) {
      return absl::StrCat("gathering flat parameter [", h.Describe(), "] ", dir, " rank ", r);
    };
    if (group_.rank() != 0) {
      FSDP_RETURN_IF_ERROR(group_.Send(shard, 0, kUnitTag), context("to", 0));
      return at::Tensor();
    }
    at::Tensor out;
    const int64_t n = h.shard_numel();
    FSDP_RETURN_IF_ERROR(CallTorch(context("on", 0), [&] {
      out = at::empty({h.padded_numel()}, shard.options());
      out.narrow(0, 0, n).copy_(shard);
    }));
    for (int r = 1; r < group_.size(); ++r) {
      at::Tensor part = out.narrow(0, r * n, n);
      FSDP_RETURN_IF_ERROR(group_.Recv(part, r, kUnitTag), context("from", r));
    }
    return out;
  }

  // Runs the plan's steps in order; on the writing rank `write(i, piece, gathered)` writes each
  // storage once its step has run, behind the next step's gather (WriteBehind). Gathers fail on
  // every rank alike (a broken group); write errors stay in rank 0's writer. On failure no write
  // is left running.
  template <typename GatherFn, typename WriteFn>
  absl::Status RunSteps(const FilePlan& plan, GatherFn gather, WriteFn write) {
    absl::Status status = GatherAndHandOver(plan, gather, write);
    if (!status.ok()) behind_.Wait();
    return status;
  }

  template <typename GatherFn, typename WriteFn>
  absl::Status GatherAndHandOver(const FilePlan& plan, GatherFn gather, WriteFn write) {
    at::Tensor gathered;
    size_t next = 0;   // the next step to run
    size_t first = 0;  // the first piece not yet handed to the writer
    // Pieces [first, end) go to the writer with the value gathered for them.
    auto hand_over = [&](size_t end) {
      if (writes_ && first < end) {
        behind_.Run([write, gathered, first, end, &plan] {
          for (size_t i = first; i < end; ++i) write(i, plan.pieces[i], gathered);
        });
      }
      first = end;
    };
    for (size_t i = 0; i < plan.pieces.size(); ++i) {
      const Piece& piece = plan.pieces[i];
      if (piece.step >= 0 && static_cast<size_t>(piece.step) == next) {
        hand_over(i);
        gathered = at::Tensor();
        FSDP_ASSIGN_OR_RETURN(gathered, gather(plan.steps[next]));
        ++next;
      }
    }
    hand_over(plan.pieces.size());
    gathered = at::Tensor();
    for (; next < plan.steps.size(); ++next)
      FSDP_RETURN_IF_ERROR(gather(plan.steps[next]).status());
    return absl::OkStatus();
  }

  // The writer of file `name` (null where this rank does not write), shared with the tasks
  // that run behind.
  using SharedWriter = std::shared_ptr<absl::StatusOr<std::unique_ptr<ArchiveWriter>>>;
  SharedWriter OpenOnRank0(const std::string& name, const Pickled& pickled) {
    if (!writes_) return std::make_shared<absl::StatusOr<std::unique_ptr<ArchiveWriter>>>(nullptr);
    return std::make_shared<absl::StatusOr<std::unique_ptr<ArchiveWriter>>>(ArchiveWriter::Create(
        absl::StrCat(staging_, "/", name), internal::ArchiveRecords::kPickleSave, pickled.pickle,
        /*durable=*/true));
  }

  // Writes storage i: `bytes` of `data`, or the storage's own tensor when data is null.
  static void Write(ArchiveWriter* writer, const Pickled& pickled, size_t i, const char* data,
                    size_t bytes) {
    if (writer == nullptr) return;
    const at::Tensor& storage = pickled.storages[i];
    if (data == nullptr) {
      data = static_cast<const char*>(internal::StorageData(storage));
      bytes = internal::StorageBytes(storage);
    } else if (bytes != internal::StorageBytes(storage)) {
      data = nullptr;  // cannot happen: the layout and the gather disagree
    }
    if (data == nullptr && bytes > 0) {
      writer->Fail(absl::InternalError(absl::StrCat("storage ", i, " does not match its layout")));
      return;
    }
    writer->WriteStorage(i, data, bytes).IgnoreError();  // kept in the writer, reported by Finish
  }

  absl::Status StreamModel() {
    SharedWriter writer = OpenOnRank0("model.pt", model_pickled_);
    ArchiveWriter* w = writer->ok() ? writer->value().get() : nullptr;
    FSDP_RETURN_IF_ERROR(RunSteps(
        model_plan_, [&](int unit) { return GatherUnit(*units_[static_cast<size_t>(unit)]); },
        [this, w](size_t i, const Piece& piece, const at::Tensor& flat) {
          if (piece.step < 0) return Write(w, model_pickled_, i, nullptr, 0);
          const FlatParamHandle& h = *units_[static_cast<size_t>(model_plan_.steps[piece.step])];
          const FlatParamInfo& info = h.infos()[piece.index];
          const size_t elem = flat.element_size();
          Write(w, model_pickled_, i,
                static_cast<const char*>(flat.data_ptr()) + info.offset * elem,
                static_cast<size_t>(info.numel) * elem);
        }));
    if (!writes_) {
      model_pickled_ = {};
      return absl::OkStatus();
    }
    // Finished (fsynced) behind the optimizer's first gathers.
    behind_.Run([this, writer] {
      model_status_ = writer->ok() ? (**writer)->Finish().status() : writer->status();
      model_pickled_ = {};
    });
    return absl::OkStatus();
  }

  absl::Status StreamOptim() {
    SharedWriter writer = OpenOnRank0("optim.pt", optim_pickled_);
    ArchiveWriter* w = writer->ok() ? writer->value().get() : nullptr;
    FSDP_RETURN_IF_ERROR(RunSteps(
        optim_plan_,
        [&](int g) {
          return optim_state::internal::RunDeferredGather(gathers_[static_cast<size_t>(g)]);
        },
        [this, w](size_t i, const Piece& piece, const at::Tensor& buffer) {
          // Tasks run in order: model.pt's outcome is known. After its failure nothing more is
          // written.
          if (!model_status_.ok()) return;
          if (piece.step < 0) return Write(w, optim_pickled_, i, nullptr, 0);
          Write(w, optim_pickled_, i, static_cast<const char*>(buffer.data_ptr()),
                static_cast<size_t>(buffer.numel()) * buffer.element_size());
        }));
    if (!writes_) {
      optim_pickled_ = {};
      return absl::OkStatus();
    }
    behind_.Run([this, writer] {
      if (!writer->ok()) {
        optim_status_ = writer->status();
      } else if (model_status_.ok()) {
        optim_status_ = (**writer)->Finish().status();
      }
      optim_pickled_ = {};
    });
    return absl::OkStatus();
  }

  // Rank 0: the files' outcome, the extra files and the commit; the staging directory removed
  // on any failure.
  absl::Status CommitOnRank0() {
    absl::Status status = model_status_;
    if (status.ok()) status = optim_status_;
    for (const auto& [name, contents] : options_.extra_files) {
      if (status.ok()) status = WriteFileDurably(staging_ + "/" + name, contents);
    }
    if (status.ok()) status = CommitStagingDir(staging_, dir_);
    if (!status.ok()) RemoveTree(staging_).IgnoreError();
    return status;
  }

  const std::string dir_;
  FullyShardedDataParallel& fsdp_;
  const optim_state::OptimizerAdapter* adapter_;
  const SaveFullCheckpointOptions& options_;
  comm::ProcessGroup& group_;
  comm::ProcessGroup* const replicas_;  // HYBRID_SHARD's replicate group, else null
  const bool writes_;                   // this rank writes the files
  const std::string context_;

  std::vector<FlatParamHandle*> units_;  // fsdp.units()' handles, by unit index
  optim_state::OptimStateDict optim_;    // with placeholders (rank 0)
  std::vector<DeferredGather> gathers_;
  Pickled model_pickled_;
  Pickled optim_pickled_;
  FilePlan model_plan_;
  FilePlan optim_plan_;
  std::string staging_;
  absl::Status model_status_;  // set behind (WriteBehind), read after Wait
  absl::Status optim_status_;
  WriteBehind behind_;  // last: its destructor waits for the tasks that use the members above
};

}  // namespace

absl::Status SaveFullCheckpoint(const std::string& dir, FullyShardedDataParallel& fsdp,
                                const optim_state::OptimizerAdapter* adapter,
                                const SaveFullCheckpointOptions& options) {
  return StreamingSave(dir, fsdp, adapter, options).Run();
}

}  // namespace fsdp::checkpoint
