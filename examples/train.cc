// train: the main job. Trains one of the reference models under FSDP on N ranks.
//
//   train [--model=nested|transformer|dummy] [--nested_dims=2.x|1.13] [--world_size=N] [--steps=K]
//         [--optimizer=adam|adamw|sgd|adagrad|rmsprop] [--lr=0.01] [--param_groups=1|2]
//         [--wrap=wrap|wrap_alt|wrap_root|none]
//         [--sharding_strategy=full_shard|shard_grad_op|no_shard|hybrid_shard|hybrid_shard_zero2]
//         [--shard_group_size=K]
//         [--use_orig_params] [--save=DIR] [--state_dict_type=full|sharded|dcp] [--load=DIR]
//         [--strip_key_prefixes=pytorch,...] [--clip_grad_norm=MAX_NORM] [--grad_accum=K]
//         [--mixed_precision=bf16|fp16[,REDUCE[,BUFFER]]] [--deferred_init]
//         [--backward_prefetch=none|backward_pre|backward_post] [--forward_prefetch]
//         [--limit_all_gathers=true|false]
//
// Without RANK/WORLD_SIZE in the environment it launches --world_size local ranks of itself
// (comm::Launch); with them it is one rank of a job started by a torchrun-style launcher, on
// one host or several. Rank 0 prints one line per step, "step=<i> loss=<loss, %.9g>", followed
// by throughput and each rank's resident memory.
//
// --model=nested reproduces PyTorch's _step_model on NestedModel: manual_seed(0) when training
// starts, then per step one randn({8, 5}) batch (the same on every rank), loss = output.sum(),
// backward, optimizer step; --nested_dims=1.13 builds PyTorch 1.13's NestedModel instead of
// 2.x's (block0 and block1 differ). --wrap: `wrap` and `wrap_alt` are the PyTorch test's wrappings
// (no root unit), `wrap_root` is `wrap` under a root unit; `none` makes the whole model one unit.
// --model=transformer is TransformerWithSharedParams (one unit per layer plus the root),
// --model=dummy TestDummyModel (one unit). Optimizers use PyTorch's defaults with --lr; SGD has
// momentum 0.9.
#include <sys/resource.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/key_prefixes.h"
#include "comm/launcher.h"
#include "comm/rendezvous.h"
#include "comm/status_macros.h"
#include "examples/char_dataset.h"
#include "examples/loss_curve.h"
#include "examples/train_checkpoint.h"
#include "examples/train_options.h"
#include "fsdp/clip_grad_norm.h"
#include "fsdp/deferred_init.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/hybrid_shard.h"
#include "fsdp/mixed_precision.h"
#include "models/char_lm.h"
#include "models/nested_model.h"
#include "models/simple_models.h"
#include "models/transformer.h"
#include "optim_state/optimizer_adapter.h"

ABSL_FLAG(std::string, model, "lm",
          "lm (character-level transformer language model on the shipped text), nested, "
          "transformer or dummy.");
ABSL_FLAG(std::string, nested_dims, "2.x",
          "nested: whose NestedModel, PyTorch 2.x's (block0 = BlockB(5, 3)) or 1.13's "
          "(BlockB(5, 7)).");
ABSL_FLAG(int, world_size, 2, "Ranks to launch when not started by a launcher.");
ABSL_FLAG(int, steps, 240, "Training steps.");
ABSL_FLAG(std::string, optimizer, "adam", "adam, adamw, sgd, adagrad or rmsprop.");
ABSL_FLAG(double, lr, 0, "Learning rate (0: 0.001 for lm, 0.01 for the other models).");
ABSL_FLAG(int, param_groups, 1, "1, or 2 for NestedModel's param_group0/param_group1.");
ABSL_FLAG(std::string, wrap, "",
          "FSDP units. nested: wrap (default), wrap_alt, wrap_root (wrap under a root unit) or "
          "none; lm and transformer: layers "
          "(default: one unit per transformer layer plus the root) or none (one unit).");
ABSL_FLAG(std::string, sharding_strategy, "full_shard",
          "full_shard, shard_grad_op, no_shard, hybrid_shard or hybrid_shard_zero2.");
ABSL_FLAG(int, shard_group_size, 0,
          "hybrid_shard*: ranks per shard group; the world is (world / K) replicas of K-rank "
          "shard groups, as PyTorch's init_device_mesh((world // K, K)).");
ABSL_FLAG(bool, use_orig_params, false, "The optimizer sees the original parameters.");
ABSL_FLAG(std::string, save, "", "Write a checkpoint to this directory at the end.");
ABSL_FLAG(std::string, state_dict_type, "",
          "Checkpoint kind for --save: full (model.pt + optim.pt, what PyTorch FSDP users save) "
          "or sharded (metadata.json + one file per rank; loads at any world size) or dcp "
          "(torch.distributed.checkpoint's .metadata + __<rank>_0.distcp, torchtitan's layout, "
          "which PyTorch's dcp.load reads). Default: sharded with --demo, full otherwise.");
ABSL_FLAG(bool, async_save, false,
          "With --state_dict_type=sharded: save in the background (checkpoint/"
          "async_checkpoint_saver.h, as dcp.async_save with use_async_staging): the next step's "
          "forward and backward overlap the copy of the state, its optimizer step waits for "
          "that copy, and training goes on while it is written.");
ABSL_FLAG(std::string, load, "", "Start from the checkpoint in this directory.");
ABSL_FLAG(std::string, strip_key_prefixes, "",
          "--load of a full checkpoint saved from a wrapped PyTorch model: key prefixes the "
          "wrappers added, removed before the keys are matched to the model. Comma-separated: "
          "pytorch (DDP's module., torch.compile's _orig_mod., checkpoint_wrapper's and FSDP1's "
          "wrapper levels), PREFIX. (removed from the start of keys), .LEVEL. (removed wherever "
          "it stands in a key). Default: none, every key must name a parameter or buffer.");
ABSL_FLAG(int, grad_accum, 1,
          "Micro-batches per optimizer step, each loss divided by their number; all but the "
          "last backward run under FSDP's no_sync (no communication).");
ABSL_FLAG(double, clip_grad_norm, 0,
          "Clip the gradients to this total norm (2-norm over every rank's shards, FSDP's "
          "clip_grad_norm_) before each optimizer step; 0: no clipping.");
ABSL_FLAG(std::string, mixed_precision, "",
          "PARAM[,REDUCE[,BUFFER]] dtypes (bf16, fp16, fp32) of FSDP's MixedPrecision: compute "
          "in PARAM, reduce gradients in REDUCE (default PARAM), keep buffers in BUFFER; "
          "parameters, optimizer state and checkpoints stay float32. Empty: full precision.");
ABSL_FLAG(std::string, backward_prefetch, "backward_pre",
          "none, backward_pre or backward_post: FSDP's backward_prefetch (when backward gathers "
          "the next unit's parameters ahead, while this unit computes).");
ABSL_FLAG(bool, forward_prefetch, false,
          "FSDP's forward_prefetch: each unit's forward gathers the next unit's parameters ahead.");
ABSL_FLAG(bool, limit_all_gathers, true,
          "FSDP's limit_all_gathers: at most two prefetched all-gathers in flight.");
ABSL_FLAG(bool, deferred_init, false,
          "Move the model to the meta device and let FSDP materialise it unit by unit "
          "(GPT-2-style values seeded by each tensor's name); parameters outside every unit "
          "(--model=nested --wrap=wrap or wrap_alt) are refused by name.");
ABSL_FLAG(int, timeout_s, 600, "Launcher and collective timeout, seconds.");
ABSL_FLAG(int, save_at_step, 0,
          "With --save: write the checkpoint after this many steps (counted from step 0) and "
          "train on; 0 saves at the end.");
ABSL_FLAG(int, resume_world_size, 0,
          "After the run, launch a second job at this world size that loads the --save "
          "checkpoint (saved at --save_at_step) and trains to the same last step, then compare "
          "its losses with the first run's. 0: no second job.");
ABSL_FLAG(std::string, resume_wrap, "none", "--wrap of the resumed job.");
ABSL_FLAG(bool, demo, false,
          "The main job (README command 1): unless given, --save=<where bazel run was started>/"
          "train_out/checkpoint, --save_at_step=--steps/2 and --resume_world_size=3.");
ABSL_FLAG(std::string, loss_log, "", "Rank 0 writes 'step loss' lines to this file.");
ABSL_FLAG(std::string, text_file, "", "lm: train on this text instead of the shipped play.");
ABSL_FLAG(int, context, 64, "lm: characters per training sequence.");
ABSL_FLAG(int, global_batch, 24, "lm: sequences per step over all ranks (split evenly).");
ABSL_FLAG(int, d_model, 128, "lm: model width.");
ABSL_FLAG(int, num_layers, 4, "lm: transformer layers.");
ABSL_FLAG(int, nhead, 4, "lm: attention heads.");

namespace {

using fsdp::ShardingStrategy;
using fsdp::examples::Group;
using fsdp::examples::MakeOptimizer;
using fsdp::examples::ParseBackwardPrefetch;
using fsdp::examples::ParseStrategy;

// Resident set size of this process, in MiB (from /proc/self/statm).
double ResidentMiB() {
  std::ifstream statm("/proc/self/statm");
  long pages_total = 0, pages_resident = 0;
  statm >> pages_total >> pages_resident;
  return pages_resident * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1 << 20);
}

// One model with its FSDP wrapper and how to run a step on it.
struct Job {
  std::shared_ptr<torch::nn::Module> module;
  std::unique_ptr<fsdp::FullyShardedDataParallel> fsdp;
  std::function<torch::Tensor(int step)> step_loss;  // forward on step's batch, returns the loss
  std::function<void()> skip_batch;                  // draws the next batch and drops it (resuming)
  int64_t items_per_step = 0;                        // tokens or samples, for throughput
  std::vector<Group> groups;                         // the optimizer's parameter groups
  bool data_parallel = false;   // ranks see different batches: report the mean loss
  int64_t parameter_count = 0;  // of the unwrapped model, each shared tensor once
};

int64_t CountParameters(const torch::nn::Module& module) {
  int64_t count = 0;
  for (const auto& item : fsdp::models::NamedParametersWithoutDuplicates(module)) {
    count += item.value().numel();
  }
  return count;
}

// --wrap for the transformers: true for one unit per layer ("layers", the default).
absl::StatusOr<bool> PerLayerWrap() {
  const std::string wrap = absl::GetFlag(FLAGS_wrap);
  if (wrap.empty() || wrap == "layers") return true;
  if (wrap == "none") return false;
  return absl::InvalidArgumentError(absl::StrCat("--wrap=", wrap, " is not one of layers, none"));
}

// --deferred_init's values, a function of each tensor's name (fsdp::FqnSeededInit): biases
// zero, other 1-D tensors (norm weights) one, matrices normal(0, 0.02), as GPT-2 initialises.
void GptStyleInit(const std::string& fqn, at::Tensor& t, at::Generator& gen) {
  if (!t.is_floating_point() || absl::EndsWith(fqn, "bias")) {
    t.zero_();
  } else if (t.dim() <= 1) {
    t.fill_(1.0);
  } else {
    t.normal_(0.0, 0.02, gen);
  }
}

// A Job of `net` under FSDP: its parameter count (unwrapped), the wrapper and the module. With
// --deferred_init the model goes to the meta device first (LibTorch's constructors allocate, so
// this model was whole once; a model too large for a rank is built module by module with
// fsdp::MakeMeta instead, as bench/deferred_init_benchmark.cc does) and Wrap materialises it.
template <typename Model>
absl::StatusOr<Job> WrapIntoJob(Model net, std::shared_ptr<fsdp::comm::ProcessGroup> group,
                                fsdp::FsdpOptions options) {
  Job job;
  job.parameter_count = CountParameters(*net);
  if (absl::GetFlag(FLAGS_deferred_init)) {
    fsdp::ToMeta(*net);
    options.param_init_fn = fsdp::FqnSeededInit(*net, GptStyleInit);
  }
  FSDP_ASSIGN_OR_RETURN(job.fsdp, fsdp::FullyShardedDataParallel::Wrap(net, group, options));
  job.module = net.ptr();
  return job;
}

// --model=nested: NestedModel of --nested_dims, wrapped as --wrap says, optionally with
// PyTorch's test's two parameter groups.
absl::StatusOr<Job> BuildNestedJob(std::shared_ptr<fsdp::comm::ProcessGroup> group,
                                   fsdp::FsdpOptions options) {
  const std::string dims = absl::GetFlag(FLAGS_nested_dims);
  if (dims != "2.x" && dims != "1.13") {
    return absl::InvalidArgumentError(
        absl::StrCat("--nested_dims=", dims, " is not one of 2.x, 1.13"));
  }
  fsdp::models::NestedModel net(dims == "2.x" ? fsdp::models::NestedModelDims::kPyTorch2
                                              : fsdp::models::NestedModelDims::kPyTorch1_13);
  const std::string wrap = absl::GetFlag(FLAGS_wrap).empty() ? "wrap" : absl::GetFlag(FLAGS_wrap);
  if (wrap == "wrap" || wrap == "wrap_root") {
    options.nested = net->wrap_slots();
    options.wrap_root = wrap == "wrap_root";
  } else if (wrap == "wrap_alt") {
    options.nested = net->wrap_alt_slots();
    options.wrap_root = false;
  } else if (wrap != "none") {
    return absl::InvalidArgumentError(
        absl::StrCat("--wrap=", wrap, " is not one of wrap, wrap_alt, wrap_root, none"));
  }
  FSDP_ASSIGN_OR_RETURN(Job job, WrapIntoJob(net, group, options));
  fsdp::FullyShardedDataParallel* f = job.fsdp.get();
  if (absl::GetFlag(FLAGS_param_groups) == 2) {
    // PyTorch's test: block1's parameters, then block2's and block0's with weight decay
    // 0.9; the root's own bias is in neither group.
    std::vector<torch::Tensor> group1 = f->parameters(net->block2.ptr().get());
    for (const torch::Tensor& p : f->parameters(net->block0.module().get())) {
      group1.push_back(p);
    }
    job.groups = {{f->parameters(net->block1.module().get()), std::nullopt},
                  {std::move(group1), 0.9}};
  }
  job.step_loss = [f, net](int) {
    torch::Tensor input = net->get_input();
    return net->get_loss(input, f->forward(input));
  };
  job.skip_batch = [net] { net->get_input(); };
  job.items_per_step = 8;
  return job;
}

// --model=transformer: TransformerWithSharedParams, one unit per layer unless --wrap=none.
absl::StatusOr<Job> BuildTransformerJob(std::shared_ptr<fsdp::comm::ProcessGroup> group,
                                        fsdp::FsdpOptions options) {
  fsdp::models::TransformerWithSharedParams net(/*rank=*/0);
  FSDP_ASSIGN_OR_RETURN(const bool per_layer, PerLayerWrap());
  if (per_layer) options.nested = net->layer_slots();
  FSDP_ASSIGN_OR_RETURN(Job job, WrapIntoJob(net, group, options));
  fsdp::FullyShardedDataParallel* f = job.fsdp.get();
  job.step_loss = [f, net](int) {
    auto input = net->get_input();  // the same on every rank (seeded with rank 0's seed)
    return net->get_loss(input, f->forward(input.first, input.second));
  };
  job.skip_batch = [] {};  // get_input seeds itself: every step has the same batch
  job.items_per_step = 8;  // target tokens per step
  return job;
}

// --model=dummy: TestDummyModel as one unit.
absl::StatusOr<Job> BuildDummyJob(std::shared_ptr<fsdp::comm::ProcessGroup> group,
                                  const fsdp::FsdpOptions& options) {
  fsdp::models::TestDummyModel net;
  FSDP_ASSIGN_OR_RETURN(Job job, WrapIntoJob(net, group, options));
  fsdp::FullyShardedDataParallel* f = job.fsdp.get();
  job.step_loss = [f, net](int) { return f->forward(net->get_input()).sum(); };
  job.skip_batch = [net] { net->get_input(); };
  job.items_per_step = 8;
  return job;
}

// --model=lm's text: --text_file, or the shipped play.
absl::StatusOr<std::string> TrainingText() {
  const std::string path = absl::GetFlag(FLAGS_text_file);
  if (path.empty()) return std::string(fsdp::examples::DefaultTrainingText());
  std::ifstream in(path, std::ios::binary);
  std::stringstream contents;
  contents << in.rdbuf();
  if (!in) return absl::NotFoundError(absl::StrCat("--text_file=", path, ": cannot read it"));
  return contents.str();
}

// --model=lm: the character-level language model on the text; each rank of `group` trains on
// its share of every --global_batch; FSDP shards over `fsdp_group` (`group`, or under
// HYBRID_SHARD a shard group of it).
absl::StatusOr<Job> BuildLmJob(std::shared_ptr<fsdp::comm::ProcessGroup> group,
                               std::shared_ptr<fsdp::comm::ProcessGroup> fsdp_group,
                               fsdp::FsdpOptions options) {
  FSDP_ASSIGN_OR_RETURN(std::string text, TrainingText());
  FSDP_ASSIGN_OR_RETURN(
      fsdp::examples::CharDataset dataset,
      fsdp::examples::CharDataset::Create(std::move(text), absl::GetFlag(FLAGS_context)));
  const int64_t global_batch = absl::GetFlag(FLAGS_global_batch);
  if (global_batch % group->size() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--global_batch=", global_batch, " is not a multiple of the world size ",
                     group->size(), ": every rank trains on an equal share"));
  }
  const int64_t d_model = absl::GetFlag(FLAGS_d_model);
  fsdp::models::CharLMConfig config{.vocab_size = dataset.vocab_size(),
                                    .context = dataset.context(),
                                    .d_model = d_model,
                                    .nhead = absl::GetFlag(FLAGS_nhead),
                                    .num_layers = absl::GetFlag(FLAGS_num_layers),
                                    .dim_feedforward = 4 * d_model};
  FSDP_ASSIGN_OR_RETURN(fsdp::models::CharTransformerLM net,
                        fsdp::CallTorch("building the language model",
                                        [&] { return fsdp::models::CharTransformerLM(config); }));
  FSDP_ASSIGN_OR_RETURN(const bool per_layer, PerLayerWrap());
  if (per_layer) options.nested = net->layer_slots();
  FSDP_ASSIGN_OR_RETURN(Job job, WrapIntoJob(net, std::move(fsdp_group), options));
  fsdp::FullyShardedDataParallel* f = job.fsdp.get();
  auto data = std::make_shared<fsdp::examples::CharDataset>(std::move(dataset));
  const int rank = group->rank(), world_size = group->size();
  job.step_loss = [f, net, data, global_batch, rank, world_size](int step) {
    auto batch = data->Batch(/*seed=*/0, step, global_batch, rank, world_size);
    TORCH_CHECK(batch.ok(), std::string(batch.status().message()));
    torch::Tensor logits = f->forward(batch->first);
    return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                                batch->second.reshape({-1}));
  };
  job.skip_batch = [] {};                               // batches are functions of the step
  job.items_per_step = global_batch * data->context();  // tokens
  job.data_parallel = true;
  return job;
}

absl::StatusOr<Job> BuildJob(std::shared_ptr<fsdp::comm::ProcessGroup> group) {
  FSDP_ASSIGN_OR_RETURN(ShardingStrategy strategy,
                        ParseStrategy(absl::GetFlag(FLAGS_sharding_strategy)));
  fsdp::FsdpOptions options{.sharding_strategy = strategy,
                            .use_orig_params = absl::GetFlag(FLAGS_use_orig_params)};
  FSDP_ASSIGN_OR_RETURN(options.mixed_precision,
                        fsdp::ParseMixedPrecision(absl::GetFlag(FLAGS_mixed_precision)));
  FSDP_ASSIGN_OR_RETURN(options.backward_prefetch,
                        ParseBackwardPrefetch(absl::GetFlag(FLAGS_backward_prefetch)));
  options.forward_prefetch = absl::GetFlag(FLAGS_forward_prefetch);
  options.limit_all_gathers = absl::GetFlag(FLAGS_limit_all_gathers);
  // The group FSDP shards over: all ranks, or with hybrid_shard* a shard group of
  // --shard_group_size ranks, replicated over the others.
  std::shared_ptr<fsdp::comm::ProcessGroup> fsdp_group = group;
  if (fsdp::IsHybrid(strategy)) {
    FSDP_ASSIGN_OR_RETURN(
        fsdp::HybridShardGroups groups,
        fsdp::MakeHybridShardGroups(*group, absl::GetFlag(FLAGS_shard_group_size)));
    fsdp_group = groups.shard;
    options.replicate_group = groups.replicate;
  } else if (absl::GetFlag(FLAGS_shard_group_size) != 0) {
    return absl::InvalidArgumentError(
        "--shard_group_size is for --sharding_strategy=hybrid_shard*");
  }
  const std::string model = absl::GetFlag(FLAGS_model);
  if (model == "nested") return BuildNestedJob(std::move(fsdp_group), std::move(options));
  if (model == "transformer") {
    return BuildTransformerJob(std::move(fsdp_group), std::move(options));
  }
  if (model == "dummy") return BuildDummyJob(std::move(fsdp_group), options);
  if (model == "lm") return BuildLmJob(std::move(group), std::move(fsdp_group), std::move(options));
  return absl::InvalidArgumentError(
      absl::StrCat("--model=", model, " is not one of lm, nested, transformer, dummy"));
}

std::string StateDictType() {
  const std::string type = absl::GetFlag(FLAGS_state_dict_type);
  if (!type.empty()) return type;
  return absl::GetFlag(FLAGS_demo) ? "sharded" : "full";
}

double LearningRate() {
  if (absl::GetFlag(FLAGS_lr) != 0) return absl::GetFlag(FLAGS_lr);
  return absl::GetFlag(FLAGS_model) == "lm" ? 0.001 : 0.01;
}

// This rank's process group from the launcher's environment; local ranks share the machine's
// cores: one intra-op thread each unless cores are spare.
absl::StatusOr<std::shared_ptr<fsdp::comm::ProcessGroup>> JoinJob() {
  FSDP_ASSIGN_OR_RETURN(std::shared_ptr<fsdp::comm::ProcessGroup> group,
                        fsdp::comm::InitProcessGroupFromEnv(
                            {.timeout = std::chrono::seconds(absl::GetFlag(FLAGS_timeout_s))}));
  const char* local_world = std::getenv("LOCAL_WORLD_SIZE");
  const int local_ranks = local_world != nullptr ? std::max(1, std::atoi(local_world)) : 1;
  torch::set_num_threads(
      std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / local_ranks));
  return group;
}

// The flags checked before the model is built.
absl::Status CheckJobFlags() {
  if (StateDictType() != "full" && StateDictType() != "sharded" && StateDictType() != "dcp") {
    return absl::InvalidArgumentError(
        absl::StrCat("--state_dict_type=", StateDictType(), " is not one of full, sharded, dcp"));
  }
  if (absl::GetFlag(FLAGS_async_save) && StateDictType() != "sharded") {
    return absl::InvalidArgumentError("--async_save needs --state_dict_type=sharded");
  }
  if (absl::StatusOr<fsdp::checkpoint::KeyPrefixes> strip =
          fsdp::checkpoint::ParseKeyPrefixes(absl::GetFlag(FLAGS_strip_key_prefixes));
      !strip.ok()) {
    return fsdp::Annotate(strip.status(), "--strip_key_prefixes");
  }
  const int param_groups = absl::GetFlag(FLAGS_param_groups);
  if (param_groups != 1 && (param_groups != 2 || absl::GetFlag(FLAGS_model) != "nested")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--param_groups=", param_groups, ": only 1, or 2 with --model=nested"));
  }
  return absl::OkStatus();
}

// --load: the steps done by the run that saved the checkpoint (0 without --load).
absl::StatusOr<int> LoadIfAsked(fsdp::comm::ProcessGroup& group, Job& job,
                                fsdp::optim_state::OptimizerAdapter& adapter) {
  const std::string dir = absl::GetFlag(FLAGS_load);
  if (dir.empty()) return 0;
  const auto start = std::chrono::steady_clock::now();
  auto loaded = fsdp::examples::LoadTrainCheckpoint(dir, absl::GetFlag(FLAGS_strip_key_prefixes),
                                                    group, *job.fsdp, adapter);
  if (!loaded.ok()) return fsdp::Annotate(loaded.status(), absl::StrCat("--load=", dir));
  const int first_step = *loaded;
  if (group.rank() == 0) {
    absl::PrintF("train: loaded %s (%d steps done) in %.2f s; resuming at step %d\n", dir,
                 first_step,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
                 first_step);
  }
  return first_step;
}

// How the training loop runs, from the flags checked after the model is built.
struct LoopSettings {
  int steps;
  std::string save_dir;
  int save_at;
  int grad_accum;
  double clip_grad_norm;
};

absl::StatusOr<LoopSettings> ReadLoopSettings() {
  LoopSettings settings{.steps = absl::GetFlag(FLAGS_steps),
                        .save_dir = absl::GetFlag(FLAGS_save),
                        .save_at = absl::GetFlag(FLAGS_save_at_step),
                        .grad_accum = absl::GetFlag(FLAGS_grad_accum),
                        .clip_grad_norm = absl::GetFlag(FLAGS_clip_grad_norm)};
  if (settings.save_at < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--save_at_step=", settings.save_at, " is negative"));
  }
  if (settings.grad_accum < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--grad_accum=", settings.grad_accum, " is not positive"));
  }
  if (settings.clip_grad_norm < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--clip_grad_norm=", settings.clip_grad_norm, " is negative"));
  }
  return settings;
}

// Step `step`'s forward and backward: --grad_accum micro-batches, each loss / K; all but the
// last under no_sync, so the last backward reduces their sum. Returns the summed loss.
absl::StatusOr<torch::Tensor> ForwardBackward(Job& job, torch::optim::Optimizer& optimizer,
                                              int step, int grad_accum) {
  return fsdp::CallTorch(absl::StrCat("step ", step), [&] {
    optimizer.zero_grad();
    torch::Tensor loss = at::zeros({1}, at::kDouble);
    for (int m = 0; m < grad_accum; ++m) {
      std::optional<fsdp::NoSyncGuard> no_sync;
      if (m + 1 < grad_accum) no_sync.emplace(*job.fsdp);
      torch::Tensor micro = job.step_loss(step * grad_accum + m);
      if (grad_accum > 1) micro = micro / grad_accum;
      micro.backward();
      loss += micro.detach().reshape({1}).to(at::kDouble);
    }
    return loss;
  });
}

// Rank 0's progress line with every rank's resident memory (a collective), and the loss log.
absl::Status ReportStep(fsdp::comm::ProcessGroup& group, const Job& job, int step, double loss,
                        double seconds, std::ofstream& loss_log) {
  at::Tensor rss = at::full({1}, ResidentMiB(), at::kDouble);
  at::Tensor all_rss = at::empty({group.size()}, at::kDouble);
  FSDP_RETURN_IF_ERROR(group.AllGatherIntoTensor(all_rss, rss), "gathering memory figures");
  if (group.rank() != 0) return absl::OkStatus();
  std::string memory;
  for (int r = 0; r < group.size(); ++r) {
    absl::StrAppendFormat(&memory, "%s%.0f", r == 0 ? "" : ",", all_rss[r].item<double>());
  }
  absl::PrintF("step=%d loss=%.9g %s_per_s=%.1f rss_mib=[%s]\n", step, loss,
               job.data_parallel ? "tokens" : "items", job.items_per_step / seconds, memory);
  std::fflush(stdout);
  if (loss_log.is_open()) loss_log << step << " " << absl::StrFormat("%.9g", loss) << "\n";
  return absl::OkStatus();
}

// One optimizer step (clipped with --clip_grad_norm); returns the loss, averaged over ranks
// when they train on different data.
absl::StatusOr<double> TrainStep(fsdp::comm::ProcessGroup& group, Job& job,
                                 torch::optim::Optimizer& optimizer,
                                 fsdp::optim_state::OptimizerAdapter& adapter,
                                 const LoopSettings& settings, int step, std::ofstream& loss_log,
                                 fsdp::checkpoint::AsyncCheckpointSaver* async_saver) {
  const auto start = std::chrono::steady_clock::now();
  FSDP_ASSIGN_OR_RETURN(torch::Tensor loss,
                        ForwardBackward(job, optimizer, step, settings.grad_accum));
  if (settings.clip_grad_norm > 0) {
    FSDP_RETURN_IF_ERROR(fsdp::ClipGradNorm(*job.fsdp, settings.clip_grad_norm).status(),
                         absl::StrCat("clipping the gradients of step ", step));
  }
  if (async_saver != nullptr) {
    // Forward and backward overlapped the background save's copy; the step must not.
    FSDP_RETURN_IF_ERROR(fsdp::examples::SynchronizeTrainStaging(*async_saver, group, step));
  }
  FSDP_RETURN_IF_ERROR(adapter.Step(), absl::StrCat("optimizer step ", step));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (job.data_parallel) {
    FSDP_RETURN_IF_ERROR(group.AllReduce(loss, fsdp::comm::ReduceOp::kAvg), "averaging the loss");
  }
  const double value = loss.item<double>();
  FSDP_RETURN_IF_ERROR(ReportStep(group, job, step, value, seconds, loss_log));
  return value;
}

absl::Status RunRank() {
  FSDP_ASSIGN_OR_RETURN(std::shared_ptr<fsdp::comm::ProcessGroup> group, JoinJob());
  FSDP_RETURN_IF_ERROR(CheckJobFlags());
  FSDP_ASSIGN_OR_RETURN(Job job, BuildJob(group));
  if (job.groups.empty()) job.groups = {{job.fsdp->parameters(), std::nullopt}};
  FSDP_ASSIGN_OR_RETURN(std::unique_ptr<torch::optim::Optimizer> optimizer,
                        MakeOptimizer(absl::GetFlag(FLAGS_optimizer), LearningRate(), job.groups));
  FSDP_ASSIGN_OR_RETURN(fsdp::optim_state::OptimizerAdapter adapter,
                        fsdp::optim_state::OptimizerAdapter::Create(*optimizer));
  FSDP_ASSIGN_OR_RETURN(const int first_step, LoadIfAsked(*group, job, adapter));
  const int rank = group->rank();
  if (rank == 0) {
    absl::PrintF(
        "train: model=%s (%d parameters) world_size=%d strategy=%s use_orig_params=%d "
        "optimizer=%s units=%d%s\n",
        absl::GetFlag(FLAGS_model), job.parameter_count, group->size(),
        absl::GetFlag(FLAGS_sharding_strategy), absl::GetFlag(FLAGS_use_orig_params),
        absl::GetFlag(FLAGS_optimizer), static_cast<int>(job.fsdp->units().size()),
        job.fsdp->options().mixed_precision.enabled()
            ? " " + fsdp::DescribeMixedPrecision(job.fsdp->options().mixed_precision)
            : "");
  }
  std::ofstream loss_log;
  if (const std::string path = absl::GetFlag(FLAGS_loss_log); !path.empty() && rank == 0) {
    loss_log.open(path, std::ios::trunc);
    if (!loss_log) return absl::InternalError(absl::StrCat("--loss_log=", path, ": cannot write"));
  }
  torch::manual_seed(0);
  // A resumed run draws (and drops) the batches the saved run already used.
  const int skip = first_step * std::max(1, absl::GetFlag(FLAGS_grad_accum));
  for (int batch = 0; batch < skip; ++batch) job.skip_batch();
  FSDP_ASSIGN_OR_RETURN(const LoopSettings settings, ReadLoopSettings());
  std::unique_ptr<fsdp::checkpoint::AsyncCheckpointSaver> async_saver;
  if (absl::GetFlag(FLAGS_async_save)) {
    FSDP_ASSIGN_OR_RETURN(async_saver, fsdp::checkpoint::AsyncCheckpointSaver::Create(
                                           *job.fsdp, {.use_async_staging = true}));
  }
  const auto run_start = std::chrono::steady_clock::now();
  double last_loss = 0;
  for (int step = first_step; step < first_step + settings.steps; ++step) {
    FSDP_ASSIGN_OR_RETURN(last_loss, TrainStep(*group, job, *optimizer, adapter, settings, step,
                                               loss_log, async_saver.get()));
    if (!settings.save_dir.empty() && settings.save_at > 0 && step + 1 == settings.save_at) {
      FSDP_RETURN_IF_ERROR(fsdp::examples::SaveTrainCheckpoint(settings.save_dir, StateDictType(),
                                                               step + 1, *group, *job.fsdp, adapter,
                                                               async_saver.get()));
    }
  }
  if (rank == 0) {
    const double total =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
    absl::PrintF("train: done, %d steps in %.2f s, final loss %.9g\n", settings.steps, total,
                 last_loss);
  }
  if (!settings.save_dir.empty() && settings.save_at == 0) {
    FSDP_RETURN_IF_ERROR(fsdp::examples::SaveTrainCheckpoint(
        settings.save_dir, StateDictType(), first_step + settings.steps, *group, *job.fsdp, adapter,
        async_saver.get()));
  }
  if (async_saver != nullptr) {
    FSDP_RETURN_IF_ERROR(fsdp::examples::WaitForTrainCheckpoint(*async_saver, *group));
  }
  return absl::OkStatus();
}

// (step, loss) pairs of a --loss_log file.
std::vector<std::pair<double, double>> ReadLossLog(const std::string& path) {
  std::vector<std::pair<double, double>> points;
  std::ifstream in(path);
  double step = 0, loss = 0;
  while (in >> step >> loss) points.emplace_back(step, loss);
  return points;
}

absl::Status LaunchJob(const std::vector<std::string>& args, int world_size) {
  fsdp::comm::LaunchOptions options;
  options.world_size = world_size;
  options.timeout = std::chrono::seconds(absl::GetFlag(FLAGS_timeout_s));
  options.output = fsdp::comm::RankOutput::kRank0Raw;
  return fsdp::comm::Launch(args, options);
}

// The whole demonstration: train, save at --save_at_step, train on to the end; then a second
// job at --resume_world_size with --resume_wrap loads the checkpoint and trains the same last
// steps; their losses are compared and drawn beside the checkpoint.
absl::Status RunWithResume(std::vector<std::string> args) {
  const std::string dir = absl::GetFlag(FLAGS_save);
  const int save_at = absl::GetFlag(FLAGS_save_at_step);
  const int steps = absl::GetFlag(FLAGS_steps);
  const int resume_world_size = absl::GetFlag(FLAGS_resume_world_size);
  if (dir.empty() || save_at <= 0 || save_at >= steps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--resume_world_size needs --save=DIR and 0 < --save_at_step < --steps (got --save='", dir,
        "', --save_at_step=", save_at, ", --steps=", steps, ")"));
  }
  if (!absl::GetFlag(FLAGS_load).empty()) {
    return absl::InvalidArgumentError("--resume_world_size and --load cannot be combined");
  }
  FSDP_RETURN_IF_ERROR(fsdp::examples::CreateParentDir(dir));
  const std::filesystem::path parent = std::filesystem::absolute(dir).parent_path();
  const std::string straight_log = (parent / "losses_uninterrupted.txt").string();
  const std::string resumed_log = (parent / "losses_resumed.txt").string();
  const int world_size = absl::GetFlag(FLAGS_world_size);
  const std::string wrap = absl::GetFlag(FLAGS_wrap).empty() ? "layers" : absl::GetFlag(FLAGS_wrap);
  const std::string resume_wrap = absl::GetFlag(FLAGS_resume_wrap);

  std::printf("train: part 1 of 2: %d ranks, wrap=%s, %d steps, saving at step %d\n", world_size,
              wrap.c_str(), steps, save_at);
  std::fflush(stdout);
  std::vector<std::string> first = args;
  first.push_back("--resume_world_size=0");
  first.push_back("--loss_log=" + straight_log);
  FSDP_RETURN_IF_ERROR(LaunchJob(first, world_size), "part 1");

  std::printf("\ntrain: part 2 of 2: %d ranks, wrap=%s, loading %s and training steps %d-%d\n",
              resume_world_size, resume_wrap.c_str(), dir.c_str(), save_at, steps - 1);
  std::fflush(stdout);
  std::vector<std::string> second = args;
  for (const std::string& flag : std::vector<std::string>{
           "--resume_world_size=0", "--save=", "--save_at_step=0", "--load=" + dir,
           "--wrap=" + resume_wrap, "--steps=" + std::to_string(steps - save_at),
           "--loss_log=" + resumed_log}) {
    second.push_back(flag);
  }
  FSDP_RETURN_IF_ERROR(LaunchJob(second, resume_world_size), "part 2 (resumed)");

  const auto straight = ReadLossLog(straight_log);
  const auto resumed = ReadLossLog(resumed_log);
  if (straight.size() != static_cast<size_t>(steps) ||
      resumed.size() != static_cast<size_t>(steps - save_at)) {
    return absl::InternalError(absl::StrCat("the loss logs ", straight_log, " and ", resumed_log,
                                            " hold ", straight.size(), " and ", resumed.size(),
                                            " steps; expected ", steps, " and ", steps - save_at));
  }
  double max_difference = 0;
  std::printf("\ntrain: the resumed job against the uninterrupted one\n");
  std::printf("  step  uninterrupted      resumed   |difference|\n");
  for (size_t i = 0; i < resumed.size(); ++i) {
    const auto& [step, loss] = resumed[i];
    const double reference = straight[save_at + i].second;
    const double difference = std::abs(loss - reference);
    max_difference = std::max(max_difference, difference);
    if (i < 3 || i + 3 >= resumed.size() || i % 10 == 0) {
      std::printf("  %4.0f  %13.6f  %11.6f  %.2e\n", step, reference, loss, difference);
    }
  }
  std::printf("  largest difference over %zu resumed steps: %.2e (loss went %.4f -> %.4f)\n",
              resumed.size(), max_difference, straight.front().second, straight.back().second);

  const std::string png = (parent / "loss_curve.png").string();
  fsdp::examples::LossSeries first_series{
      .label = absl::StrCat("uninterrupted (", world_size, " ranks, wrap=", wrap, ")"),
      .rgb = 0x1f77b4,
      .thickness = 5,
      .points = straight};
  fsdp::examples::LossSeries second_series{
      .label = absl::StrCat("resumed (", resume_world_size, " ranks, wrap=", resume_wrap, ")"),
      .rgb = 0xd62728,
      .points = resumed};
  FSDP_RETURN_IF_ERROR(fsdp::examples::WriteLossCurvePng(
      png, {first_series, second_series},
      {.title =
           absl::StrCat("fsdp-cpp train --model=", absl::GetFlag(FLAGS_model), ": loss per step"),
       .marker_step = save_at - 0.5,
       .marker_label = "checkpoint"}));
  std::printf("\ntrain: summary\n");
  std::printf("  checkpoint:  %s (saved after step %d)\n", dir.c_str(), save_at - 1);
  std::printf("  inspect it:  bazel run //tools:ckpt -- inspect %s\n", dir.c_str());
  std::printf("  loss curve:  %s\n", png.c_str());
  std::printf("  loss logs:   %s, %s\n", straight_log.c_str(), resumed_log.c_str());
  return absl::OkStatus();
}

}  // namespace

// --demo: fills in the flags of the whole demonstration that were not given.
void ApplyDemoDefaults(std::vector<std::string>& args) {
  if (!absl::GetFlag(FLAGS_demo)) return;
  auto set = [&](const std::string& name, const std::string& value) {
    args.push_back(absl::StrCat("--", name, "=", value));
  };
  if (absl::GetFlag(FLAGS_save).empty()) {
    const char* cwd = std::getenv("BUILD_WORKING_DIRECTORY");  // set by `bazel run`
    const std::string root = cwd != nullptr ? cwd : std::filesystem::current_path().string();
    absl::SetFlag(&FLAGS_save, root + "/train_out/checkpoint");
    set("save", absl::GetFlag(FLAGS_save));
  }
  if (absl::GetFlag(FLAGS_save_at_step) == 0) {
    absl::SetFlag(&FLAGS_save_at_step, std::max(1, absl::GetFlag(FLAGS_steps) / 2));
    set("save_at_step", std::to_string(absl::GetFlag(FLAGS_save_at_step)));
  }
  if (absl::GetFlag(FLAGS_resume_world_size) == 0) {
    absl::SetFlag(&FLAGS_resume_world_size, 3);
    set("resume_world_size", "3");
  }
  if (absl::GetFlag(FLAGS_state_dict_type).empty()) set("state_dict_type", "sharded");
  set("demo", "false");
}

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (!fsdp::comm::LaunchedByLauncher()) {
    std::vector<std::string> args(argv, argv + argc);
    args[0] = "/proc/self/exe";
    ApplyDemoDefaults(args);
    const absl::Status status = absl::GetFlag(FLAGS_resume_world_size) > 0
                                    ? RunWithResume(args)
                                    : LaunchJob(args, absl::GetFlag(FLAGS_world_size));
    if (!status.ok()) {
      std::fprintf(stderr, "train: %s\n", std::string(status.message()).c_str());
      return 1;
    }
    return 0;
  }
  const absl::Status status = RunRank();
  if (!status.ok()) {
    std::fprintf(stderr, "train (rank %s): %s\n", std::getenv("RANK"),
                 std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
