#include "comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp::comm {
namespace {

using Clock = std::chrono::steady_clock;

std::optional<ncclDataType_t> NcclType(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ncclFloat32;
    case at::kDouble:
      return ncclFloat64;
    case at::kHalf:
      return ncclFloat16;
    case at::kBFloat16:
      return ncclBfloat16;
    case at::kInt:
      return ncclInt32;
    case at::kLong:
      return ncclInt64;
    case at::kByte:
      return ncclUint8;
    default:
      return std::nullopt;
  }
}

ncclRedOp_t NcclOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAvg:
      return ncclAvg;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

absl::StatusCode CodeOf(ncclResult_t result) {
  switch (result) {
    case ncclInvalidArgument:
      return absl::StatusCode::kInvalidArgument;
    case ncclInvalidUsage:
      return absl::StatusCode::kFailedPrecondition;
    case ncclRemoteError:
    case ncclSystemError:
      return absl::StatusCode::kUnavailable;
    default:
      return absl::StatusCode::kInternal;
  }
}

// `comm` may be null; it must not have been destroyed or aborted yet.
absl::Status NcclError(ncclResult_t result, ncclComm_t comm, absl::string_view where) {
  const char* last = ncclGetLastError(comm);
  return absl::Status(CodeOf(result),
                      absl::StrCat(where, ": NCCL error: ", ncclGetErrorString(result),
                                   last != nullptr && *last != '\0' ? absl::StrCat(" (", last, ")")
                                                                    : ""));
}

absl::Status CudaError(cudaError_t error, absl::string_view call, absl::string_view where) {
  return absl::InternalError(absl::StrCat(where, ": ", call, " failed: ", cudaGetErrorName(error),
                                          ": ", cudaGetErrorString(error)));
}

// Sleeps a little longer on each call, from 10 us up to 1 ms, while polling.
class Backoff {
 public:
  void Wait() {
    std::this_thread::sleep_for(std::chrono::microseconds(delay_us_));
    delay_us_ = std::min(delay_us_ * 2, 1000);
  }

 private:
  int delay_us_ = 10;
};

// Polls a non-blocking communicator until its pending call (setup, an enqueue, finalize) is
// no longer in progress. Returns the final state, or nullopt when `deadline` passed first.
std::optional<ncclResult_t> AwaitComm(ncclComm_t comm, Clock::time_point deadline) {
  Backoff backoff;
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t query = ncclCommGetAsyncError(comm, &state);
    if (query != ncclSuccess) return query;
    if (state != ncclInProgress) return state;
    if (Clock::now() >= deadline) return std::nullopt;
    backoff.Wait();
  }
}

// Makes `device` current for its lifetime and restores the previous device afterwards.
class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  ~ScopedDevice() {
    if (previous_ >= 0 && previous_ != device_) cudaSetDevice(previous_);
  }

  absl::Status Set(int device, absl::string_view where) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    device_ = device;
    if (previous_ == device) return absl::OkStatus();
    const cudaError_t error = cudaSetDevice(device);
    if (error != cudaSuccess) {
      previous_ = -1;
      return CudaError(error, absl::StrCat("cudaSetDevice(", device, ")"), where);
    }
    return absl::OkStatus();
  }

 private:
  int previous_ = -1;
  int device_ = -1;
};

// Communicators of one name are numbered in creation order, so that each gets its own store key.
int64_t NextSequenceNumber(const std::string& name) {
  static std::mutex mu;
  static auto* counters = new std::map<std::string, int64_t>();
  std::lock_guard<std::mutex> lock(mu);
  return (*counters)[name]++;
}

std::chrono::milliseconds Remaining(Clock::time_point deadline) {
  return std::max(std::chrono::milliseconds(1),
                  std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
}

bool Overlap(const at::Tensor& a, const at::Tensor& b) {
  const auto* a_begin = static_cast<const char*>(a.data_ptr());
  const auto* b_begin = static_cast<const char*>(b.data_ptr());
  const auto* a_end = a_begin + a.nbytes();
  const auto* b_end = b_begin + b.nbytes();
  return a_begin < b_end && b_begin < a_end;
}

}  // namespace

absl::StatusOr<at::Tensor> WrapDeviceMemory(void* data, at::IntArrayRef sizes,
                                            at::ScalarType dtype, int device,
                                            std::function<void(void*)> deleter) {
  if (device < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("WrapDeviceMemory: device ", device, " is negative"));
  }
  int64_t numel = 1;
  for (int64_t size : sizes) {
    if (size < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("WrapDeviceMemory: negative size in ", c10::str(sizes)));
    }
    numel *= size;
  }
  if (data == nullptr && numel > 0) {
    return absl::InvalidArgumentError("WrapDeviceMemory: null data for a non-empty tensor");
  }
  return CallTorch(absl::StrCat("WrapDeviceMemory on cuda:", device), [&] {
    const at::Device cuda(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    // An explicit target device: a CPU-only libtorch cannot look up a pointer's device.
    auto maker = at::for_blob(data, sizes);
    maker.options(at::TensorOptions().dtype(dtype).device(cuda)).target_device(cuda);
    if (deleter) maker.deleter(std::move(deleter));
    return maker.make_tensor();
  });
}

absl::StatusOr<int> NcclVersion() {
  int version = 0;
  const ncclResult_t result = ncclGetVersion(&version);
  if (result != ncclSuccess) return NcclError(result, nullptr, "ncclGetVersion");
  return version;
}

NcclCommunicator::NcclCommunicator(int rank, int size, int device, ProcessGroupOptions options)
    : rank_(rank), size_(size), device_(device), options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(
    c10::intrusive_ptr<c10d::Store> store, int rank, int size, int device,
    const ProcessGroupOptions& options) {
  const std::string where = absl::StrCat("creating NCCL communicator '", options.name,
                                         "' (rank ", rank, " of ", size, ", cuda:", device, ")");
  if (size < 1 || rank < 0 || rank >= size) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": rank ", rank, " is outside a group of size ", size));
  }
  if (device < 0) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": device ", device, " is negative"));
  }
  if (!store) return absl::InvalidArgumentError(absl::StrCat(where, ": no store given"));
  if (options.timeout <= std::chrono::milliseconds::zero()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": the timeout must be positive"));
  }
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        where, ": no usable CUDA device (cudaGetDeviceCount: ",
        error == cudaSuccess ? "0 devices" : cudaGetErrorString(error), ")"));
  }
  if (device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": this process sees only ", count, " CUDA device(s)"));
  }
  std::unique_ptr<NcclCommunicator> communicator(
      new NcclCommunicator(rank, size, device, options));
  FSDP_RETURN_IF_ERROR(communicator->Init(*store), where);
  return communicator;
}

absl::Status NcclCommunicator::Init(c10d::Store& store) {
  const Clock::time_point deadline = Clock::now() + options_.timeout;
  ScopedDevice scoped_device;
  FSDP_RETURN_IF_ERROR(scoped_device.Set(device_, "init"));

  // The unique id travels through the store: rank 0 creates it, everyone else waits for it.
  const std::string key = absl::StrCat("fsdp_nccl/", options_.name, "/",
                                       NextSequenceNumber(options_.name), "/unique_id");
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (rank_ == 0) {
    const ncclResult_t result = ncclGetUniqueId(&id);
    if (result != ncclSuccess) return NcclError(result, nullptr, "ncclGetUniqueId");
    const auto* bytes = reinterpret_cast<const uint8_t*>(&id);
    FSDP_RETURN_IF_ERROR(
        CallTorch(absl::StrCat("publishing the NCCL id under '", key, "'"),
                  [&] { store.set(key, std::vector<uint8_t>(bytes, bytes + sizeof(id))); }));
  } else {
    auto value = CallTorch(absl::StrCat("waiting for rank 0's NCCL id under '", key, "'"), [&] {
      store.wait({key}, Remaining(deadline));
      return store.get(key);
    });
    if (!value.ok()) return value.status();
    if (value->size() != sizeof(id)) {
      return absl::InternalError(absl::StrCat("the NCCL id under '", key, "' has ",
                                              value->size(), " bytes, not ", sizeof(id)));
    }
    std::memcpy(&id, value->data(), sizeof(id));
  }

  // A blocking stream: ordered with the legacy default stream (see the header).
  cudaStream_t stream = nullptr;
  if (const cudaError_t error = cudaStreamCreate(&stream); error != cudaSuccess) {
    return CudaError(error, "cudaStreamCreate", "init");
  }
  stream_ = stream;

  // Non-blocking setup, so that a rank that never arrives turns into a timeout, not a hang.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  config.commName = options_.name.c_str();
  ncclComm_t comm = nullptr;
  ncclResult_t result = ncclCommInitRankConfig(&comm, size_, id, rank_, &config);
  if (comm != nullptr && (result == ncclSuccess || result == ncclInProgress)) {
    const std::optional<ncclResult_t> state = AwaitComm(comm, deadline);
    if (!state.has_value()) {
      ncclCommAbort(comm);
      return absl::DeadlineExceededError(absl::StrCat(
          "ncclCommInitRankConfig: not every rank joined within ", options_.timeout.count(),
          " ms"));
    }
    result = *state;
  }
  if (result != ncclSuccess) {
    absl::Status status = NcclError(result, comm, "ncclCommInitRankConfig");
    if (comm != nullptr) ncclCommAbort(comm);
    return status;
  }
  comm_ = comm;
  return absl::OkStatus();
}

NcclCommunicator::~NcclCommunicator() {
  ScopedDevice scoped_device;
  (void)scoped_device.Set(device_, "destroy");
  if (comm_ != nullptr) {
    // Let outstanding work drain (bounded by the timeout), then free; abort otherwise.
    const Clock::time_point deadline = Clock::now() + options_.timeout;
    ncclResult_t result = ncclCommFinalize(comm_);
    if (result == ncclSuccess || result == ncclInProgress) {
      result = AwaitComm(comm_, deadline).value_or(ncclInProgress);
    }
    if (result == ncclSuccess) {
      ncclCommDestroy(comm_);
    } else {
      ncclCommAbort(comm_);
    }
    comm_ = nullptr;
  }
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

std::chrono::milliseconds NcclCommunicator::Timeout(const CollectiveOptions& options) const {
  return options.timeout == kUseGroupTimeout ? options_.timeout : options.timeout;
}

std::string NcclCommunicator::Where(absl::string_view op) const {
  return absl::StrCat(op, " on rank ", rank_, " of NCCL group '", options_.name, "' (size ",
                      size_, ", cuda:", device_, ")");
}

absl::Status NcclCommunicator::CheckUsable(absl::string_view op) const {
  if (comm_ != nullptr) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat(Where(op), ": the communicator was aborted earlier: ", abort_reason_));
}

absl::Status NcclCommunicator::CheckTensor(absl::string_view op, absl::string_view which,
                                           const at::Tensor& t) const {
  if (!t.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(Where(op), ": ", which, " is undefined"));
  }
  if (!t.device().is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat(
        Where(op), ": ", which, " must be a CUDA tensor, got one on ", t.device().str()));
  }
  if (t.device().index() != device_) {
    return absl::InvalidArgumentError(absl::StrCat(Where(op), ": ", which, " is on ",
                                                   t.device().str(), ", not cuda:", device_));
  }
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(Where(op), ": ", which,
                                                   " is not contiguous"));
  }
  if (!NcclType(t.scalar_type()).has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(op), ": ", which, " has dtype ", c10::toString(t.scalar_type()),
                     "; NCCL takes float, double, half, bfloat16, int32, int64 or uint8"));
  }
  if (t.numel() > 0 && t.data_ptr() == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(Where(op), ": ", which, " has no data"));
  }
  return absl::OkStatus();
}

void NcclCommunicator::Abort(absl::string_view why) {
  if (comm_ == nullptr) return;
  ncclCommAbort(comm_);
  comm_ = nullptr;
  abort_reason_ = std::string(why);
}

absl::Status NcclCommunicator::Run(absl::string_view op, std::chrono::milliseconds timeout,
                                   const std::function<int()>& launch) {
  FSDP_RETURN_IF_ERROR(CheckUsable(op));
  const std::string where = Where(op);
  const Clock::time_point deadline = Clock::now() + timeout;
  ScopedDevice scoped_device;
  FSDP_RETURN_IF_ERROR(scoped_device.Set(device_, where));
  const auto fail = [&](absl::Status status) {
    Abort(status.message());
    return status;
  };
  const auto timed_out = [&](absl::string_view what) {
    return fail(absl::DeadlineExceededError(absl::StrCat(
        where, ": ", what, " within ", timeout.count(), " ms; the communicator was aborted")));
  };

  // Enqueue. A non-blocking communicator may need polling before the work is on the stream.
  ncclResult_t result = static_cast<ncclResult_t>(launch());
  if (result == ncclInProgress) {
    const std::optional<ncclResult_t> state = AwaitComm(comm_, deadline);
    if (!state.has_value()) return timed_out("NCCL did not enqueue the operation");
    result = *state;
  }
  if (result != ncclSuccess) {
    absl::Status status = NcclError(result, comm_, where);
    // A rejected argument leaves the communicator intact; anything else may not.
    if (result == ncclInvalidArgument) return status;
    return fail(std::move(status));
  }

  // Wait for the stream, watching for NCCL's asynchronous errors (a peer that died).
  Backoff backoff;
  while (true) {
    const cudaError_t error = cudaStreamQuery(stream_);
    if (error == cudaSuccess) return absl::OkStatus();
    if (error != cudaErrorNotReady) return fail(CudaError(error, "cudaStreamQuery", where));
    ncclResult_t state = ncclSuccess;
    const ncclResult_t query = ncclCommGetAsyncError(comm_, &state);
    if (query != ncclSuccess) return fail(NcclError(query, comm_, where));
    if (state != ncclSuccess && state != ncclInProgress) {
      return fail(NcclError(state, comm_, where));
    }
    if (Clock::now() >= deadline) return timed_out("the operation did not complete");
    backoff.Wait();
  }
}

absl::Status NcclCommunicator::AllGatherIntoTensor(at::Tensor& output, const at::Tensor& input,
                                                   const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "all_gather_into_tensor";
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, "input", input));
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, "output", output));
  const int64_t n = input.numel();
  if (output.numel() != n * size_ || output.scalar_type() != input.scalar_type()) {
    return absl::InvalidArgumentError(absl::StrCat(
        Where(kOp), ": output must hold size * input.numel() = ", n * size_, " elements of ",
        c10::toString(input.scalar_type()), ", got ", output.numel(), " of ",
        c10::toString(output.scalar_type())));
  }
  if (n == 0) return CheckUsable(kOp);
  // NCCL's only allowed overlap: the input is this rank's own chunk of the output.
  const char* own_chunk = static_cast<const char*>(output.data_ptr()) + rank_ * input.nbytes();
  if (Overlap(input, output) && input.data_ptr() != own_chunk) {
    return absl::InvalidArgumentError(absl::StrCat(
        Where(kOp), ": input overlaps output other than as this rank's chunk of it"));
  }
  const ncclDataType_t type = *NcclType(input.scalar_type());
  return Run(kOp, Timeout(options), [&] {
    return static_cast<int>(ncclAllGather(input.data_ptr(), output.data_ptr(),
                                          static_cast<size_t>(n), type, comm_, stream_));
  });
}

absl::Status NcclCommunicator::ReduceScatterTensor(at::Tensor& output, const at::Tensor& input,
                                                   ReduceOp op,
                                                   const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "reduce_scatter_tensor";
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, "input", input));
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, "output", output));
  const int64_t n = output.numel();
  if (input.numel() != n * size_ || output.scalar_type() != input.scalar_type()) {
    return absl::InvalidArgumentError(absl::StrCat(
        Where(kOp), ": input must hold size * output.numel() = ", n * size_, " elements of ",
        c10::toString(output.scalar_type()), ", got ", input.numel(), " of ",
        c10::toString(input.scalar_type())));
  }
  if (op == ReduceOp::kAvg && !at::isFloatingType(output.scalar_type())) {
    return absl::InvalidArgumentError(Where(kOp) + ": kAvg needs a floating-point tensor");
  }
  if (n == 0) return CheckUsable(kOp);
  // NCCL's only allowed overlap: the output is this rank's own chunk of the input.
  const char* own_chunk = static_cast<const char*>(input.data_ptr()) + rank_ * output.nbytes();
  if (Overlap(input, output) && output.data_ptr() != own_chunk) {
    return absl::InvalidArgumentError(absl::StrCat(
        Where(kOp), ": output overlaps input other than as this rank's chunk of it"));
  }
  const ncclDataType_t type = *NcclType(input.scalar_type());
  return Run(kOp, Timeout(options), [&] {
    return static_cast<int>(ncclReduceScatter(input.data_ptr(), output.data_ptr(),
                                              static_cast<size_t>(n), type, NcclOp(op), comm_,
                                              stream_));
  });
}

absl::Status NcclCommunicator::AllReduce(at::Tensor& tensor, ReduceOp op,
                                         const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "all_reduce";
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, "tensor", tensor));
  if (op == ReduceOp::kAvg && !at::isFloatingType(tensor.scalar_type())) {
    return absl::InvalidArgumentError(Where(kOp) + ": kAvg needs a floating-point tensor");
  }
  if (tensor.numel() == 0) return CheckUsable(kOp);
  const ncclDataType_t type = *NcclType(tensor.scalar_type());
  return Run(kOp, Timeout(options), [&] {
    return static_cast<int>(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(),
                                          static_cast<size_t>(tensor.numel()), type, NcclOp(op),
                                          comm_, stream_));
  });
}

absl::Status NcclCommunicator::Broadcast(at::Tensor& tensor, int root,
                                         const CollectiveOptions& options) {
  constexpr absl::string_view kOp = "broadcast";
  FSDP_RETURN_IF_ERROR(CheckTensor(kOp, "tensor", tensor));
  if (root < 0 || root >= size_) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(kOp), ": root ", root, " is outside the group"));
  }
  if (tensor.numel() == 0) return CheckUsable(kOp);
  const ncclDataType_t type = *NcclType(tensor.scalar_type());
  return Run(kOp, Timeout(options), [&] {
    return static_cast<int>(ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(),
                                          static_cast<size_t>(tensor.numel()), type, root, comm_,
                                          stream_));
  });
}

}  // namespace fsdp::comm
