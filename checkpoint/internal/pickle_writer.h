// Python pickles written from C++, opcode for opcode as CPython's pickler (protocol 2) writes
// them: what DCP's files hold (.metadata's dataclasses, and each .distcp item's data.pkl, so
// that our items equal torch.save's). No errors but INVALID_ARGUMENT for a value a Python
// torch.save item cannot hold here (a tensor inside a bytes value, a sharded tensor).
//
// With `memoize_all`, every object Python memoizes is memoized in the same order (strings,
// non-empty tuples, lists, dicts, globals, REDUCE and NEWOBJ results): the bytes are Python's.
// Without, only globals are (each written once), which keeps large pickles small.
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_PICKLE_WRITER_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_PICKLE_WRITER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint::internal {

class PickleWriter {
 public:
  explicit PickleWriter(bool memoize_all);

  void Global(const std::string& module, const std::string& name);
  void None();
  void Bool(bool b);
  void Int(int64_t v);
  void Float(double v);
  void Str(const std::string& s);
  // A tuple of n items: TupleBegin(n), the items, TupleEnd(n) (as Python: TUPLE1-3 or MARK ...
  // TUPLE, the empty tuple unmemoized).
  void TupleBegin(size_t n);
  void TupleEnd(size_t n);
  // A list or dict of n items (a dict's item is its key then its value).
  void ListBegin(size_t n);
  void ListEnd(size_t n);
  void DictBegin(size_t n);
  void DictEnd(size_t n);
  void Reduce();  // callable, args tuple -> result
  void BinPersId();
  // cls.__new__(cls) as copyreg pickles a dataclass, then Build() after its state.
  void NewObj(const std::string& module, const std::string& name);
  void Build();
  // torch.Size(shape).
  void Size(const std::vector<int64_t>& shape);
  std::string Finish();

 private:
  void Memo();
  void Le(uint64_t v, int bytes);
  void ContainerBegin(char empty, size_t n);
  void ContainerEnd(char batch, char single, size_t n);

  bool memoize_all_;
  uint32_t next_memo_ = 0;
  std::string out_;
  std::map<std::string, uint32_t> globals_;
};

// torch.save's data.pkl of `t` as Python writes it (torch._utils._rebuild_tensor_v2 over the
// persistent storage ('storage', <dtype>Storage, '0', 'cpu', numel)); `t`'s storage must hold
// exactly its elements, from offset 0.
[[nodiscard]] absl::StatusOr<std::string> TorchSaveTensorPickle(const at::Tensor& t);

// torch.save's data.pkl of a plain value (None, bool, int, float, str, tuples and lists).
[[nodiscard]] absl::StatusOr<std::string> TorchSaveValuePickle(const optim_state::StateValue& value,
                                                               const std::string& where);

}  // namespace fsdp::checkpoint::internal

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_PICKLE_WRITER_H_
