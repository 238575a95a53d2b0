// OptimStateDict: an optimizer state dict as a value, mirroring what PyTorch's
// `optim.state_dict()` returns:
//
//   {"state": {key: {name: value, ...}, ...},
//    "param_groups": [{hyper-parameter: value, ..., "params": [key, ...]}, ...]}
//
// Keys (`ParamKey`) are parameter IDs (ints, as `optim.state_dict()` numbers parameters in
// param_groups order) or fully qualified names (FSDP's full / sharded dicts, named
// optimizers). Values (`StateValue`) are what PyTorch puts there: None, bool, int, float, str,
// tensors (positive-dimension or zero-dimension, e.g. Adam's `step`), tuples and lists (e.g.
// `betas`), and, for sharded dicts, this rank's piece of a sharded tensor
// (`ShardedTensorValue`). Every mapping keeps insertion order as Python's dict does, since
// PyTorch's state dicts are compared and pickled in that order.
//
// Tensors are held by reference (at::Tensor is a handle): copying a dict copies handles, not
// data. `CloneOptimStateDict` makes a deep copy.
#ifndef FSDP_CPP_OPTIM_STATE_OPTIM_STATE_DICT_H_
#define FSDP_CPP_OPTIM_STATE_OPTIM_STATE_DICT_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace fsdp::optim_state {

// A parameter's key in an optimizer state dict: an integer ID or an FQN.
class ParamKey {
 public:
  static ParamKey Id(int64_t id) { return ParamKey(Key(id)); }
  static ParamKey Fqn(std::string fqn) { return ParamKey(Key(std::move(fqn))); }

  bool is_id() const { return std::holds_alternative<int64_t>(key_); }
  bool is_fqn() const { return !is_id(); }
  // Preconditions: is_id() (resp. is_fqn()).
  int64_t id() const { return std::get<int64_t>(key_); }
  const std::string& fqn() const { return std::get<std::string>(key_); }
  // "3" for an ID, "'a.weight'" for an FQN (Python's repr).
  std::string ToString() const;

  friend bool operator==(const ParamKey& a, const ParamKey& b) { return a.key_ == b.key_; }
  friend bool operator!=(const ParamKey& a, const ParamKey& b) { return !(a == b); }
  // IDs before FQNs; IDs numerically, FQNs lexicographically.
  friend bool operator<(const ParamKey& a, const ParamKey& b) { return a.key_ < b.key_; }
  template <typename H>
  friend H AbslHashValue(H h, const ParamKey& k) {
    return H::combine(std::move(h), k.key_);
  }

 private:
  using Key = std::variant<int64_t, std::string>;
  explicit ParamKey(Key key) : key_(std::move(key)) {}
  Key key_;
};

// Python's None.
struct NoneValue {
  friend bool operator==(NoneValue, NoneValue) { return true; }
};

class StateValue;

// A Python tuple (`is_tuple`) or list of values, e.g. Adam's `betas` (a tuple).
struct StateSequence {
  std::vector<StateValue> items;
  bool is_tuple = true;
};

// This rank's pieces of a tensor sharded across ranks (PyTorch's ShardedTensor and its local
// shards): `local` holds elements [offsets[d], offsets[d] + local.size(d)) of each dimension d
// of a tensor of shape `global_shape`; `more_shards`, this rank's further pieces of the same
// tensor, each described the same way (empty for FSDP1's dim-0 chunks; a flat-shard slice of
// a parameter, LocalShardedOptimStateDict's, is up to 2 x rank - 1 such boxes).
struct ShardedTensorValue {
  at::Tensor local;
  std::vector<int64_t> global_shape;
  std::vector<int64_t> offsets;
  struct Shard {
    at::Tensor local;
    std::vector<int64_t> offsets;
  };
  std::vector<Shard> more_shards;
};

// One value of a state dict: None, bool, int, float, str, tensor, tuple/list or sharded tensor.
class StateValue {
 public:
  using Variant = std::variant<NoneValue, bool, int64_t, double, std::string, at::Tensor,
                               StateSequence, ShardedTensorValue>;

  StateValue() : value_(NoneValue{}) {}  // None
  StateValue(NoneValue v) : value_(v) {}
  StateValue(bool v) : value_(v) {}
  StateValue(int v) : value_(static_cast<int64_t>(v)) {}
  StateValue(int64_t v) : value_(v) {}
  StateValue(double v) : value_(v) {}
  StateValue(const char* v) : value_(std::string(v)) {}
  StateValue(std::string v) : value_(std::move(v)) {}
  StateValue(at::Tensor v) : value_(std::move(v)) {}
  StateValue(StateSequence v) : value_(std::move(v)) {}
  StateValue(ShardedTensorValue v) : value_(std::move(v)) {}

  static StateValue None() { return StateValue(); }
  static StateValue Tuple(std::vector<StateValue> items);
  static StateValue List(std::vector<StateValue> items);

  template <typename T>
  bool Is() const {
    return std::holds_alternative<T>(value_);
  }
  // Precondition: Is<T>().
  template <typename T>
  const T& Get() const {
    return std::get<T>(value_);
  }
  // Null unless Is<T>().
  template <typename T>
  const T* GetIf() const {
    return std::get_if<T>(&value_);
  }
  bool IsNone() const { return Is<NoneValue>(); }
  const Variant& variant() const { return value_; }

  // Python's name of the value's type: "NoneType", "bool", "int", "float", "str", "Tensor",
  // "tuple", "list", "ShardedTensor". For messages.
  std::string TypeName() const;

 private:
  Variant value_;
};

// A mapping that keeps insertion order (as Python's dict): assigning to an existing key keeps
// its position. Lookups are hashed.
template <typename K, typename V>
class OrderedMap {
 public:
  using Entry = std::pair<K, V>;
  using const_iterator = typename std::vector<Entry>::const_iterator;

  OrderedMap() = default;
  OrderedMap(std::initializer_list<Entry> entries) {
    for (const Entry& e : entries) Set(e.first, e.second);
  }

  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  const_iterator begin() const { return entries_.begin(); }
  const_iterator end() const { return entries_.end(); }
  const std::vector<Entry>& entries() const { return entries_; }
  // The i-th entry in insertion order. Precondition: i < size().
  const Entry& at_index(size_t i) const { return entries_[i]; }

  bool Contains(const K& key) const { return index_.contains(key); }
  const V* Find(const K& key) const {
    auto it = index_.find(key);
    return it == index_.end() ? nullptr : &entries_[it->second].second;
  }
  V* Find(const K& key) {
    auto it = index_.find(key);
    return it == index_.end() ? nullptr : &entries_[it->second].second;
  }
  // Inserts at the end, or replaces the value in place if `key` is present.
  V& Set(K key, V value) {
    auto it = index_.find(key);
    if (it != index_.end()) return entries_[it->second].second = std::move(value);
    index_.emplace(key, entries_.size());
    entries_.emplace_back(std::move(key), std::move(value));
    return entries_.back().second;
  }
  // Removes `key`; returns whether it was present. O(size).
  bool Erase(const K& key) {
    auto it = index_.find(key);
    if (it == index_.end()) return false;
    entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(it->second));
    index_.clear();
    for (size_t i = 0; i < entries_.size(); ++i) index_.emplace(entries_[i].first, i);
    return true;
  }
  std::vector<K> Keys() const {
    std::vector<K> keys;
    keys.reserve(entries_.size());
    for (const Entry& e : entries_) keys.push_back(e.first);
    return keys;
  }

 private:
  std::vector<Entry> entries_;
  absl::flat_hash_map<K, size_t> index_;
};

// One parameter's state: name -> value ("step", "exp_avg", ...).
using ParamState = OrderedMap<std::string, StateValue>;
// A parameter group's hyper-parameters ("lr", "betas", ...), without "params".
using HyperParams = OrderedMap<std::string, StateValue>;

// One entry of "param_groups": its hyper-parameters, then "params" (Python lists "params"
// last in `optim.state_dict()`).
struct ParamGroup {
  HyperParams hyper_params;
  std::vector<ParamKey> params;
};

struct OptimStateDict {
  // Only parameters that have state appear, in the order they gained it.
  OrderedMap<ParamKey, ParamState> state;
  std::vector<ParamGroup> param_groups;
  // False for a dict without a "param_groups" entry (FSDP accepts such dicts).
  bool has_param_groups = true;
};

// A deep copy: every tensor (also inside sequences and sharded values) is cloned.
OptimStateDict CloneOptimStateDict(const OptimStateDict& dict);
StateValue CloneStateValue(const StateValue& value);

// Comparison tolerance for floats and floating-point tensors: |actual - expected| <=
// atol + rtol * |expected|. The default is exact.
struct Tolerance {
  double rtol = 0.0;
  double atol = 0.0;
};

// "" if `actual` matches `expected`, else a description of the first difference with its
// path, e.g. `state[3]['exp_avg']: ...`. Matching is strict about structure: types (int vs
// float, tuple vs list, tensor dtypes), key order, tensor shapes, has_param_groups; numbers
// and floating-point tensor values within `tolerance` (NaN matches NaN); other tensors exactly.
std::string DiffStateValues(const StateValue& expected, const StateValue& actual,
                            Tolerance tolerance = {});
std::string DiffOptimStateDicts(const OptimStateDict& expected, const OptimStateDict& actual,
                                Tolerance tolerance = {});

// Exact equality (DiffStateValues / DiffOptimStateDicts with the default tolerance).
bool operator==(const StateValue& a, const StateValue& b);
inline bool operator!=(const StateValue& a, const StateValue& b) { return !(a == b); }
bool operator==(const OptimStateDict& a, const OptimStateDict& b);
inline bool operator!=(const OptimStateDict& a, const OptimStateDict& b) { return !(a == b); }

// Python-like text: `{'state': {0: {'step': tensor(3.0, dtype=float32), 'exp_avg':
// tensor([...], shape=[4, 3], dtype=float32)}}, 'param_groups': [{'lr': 0.01, ...,
// 'params': [0, 1]}]}`. Tensors show at most 8 values.
std::string DebugString(const StateValue& value);
std::string DebugString(const OptimStateDict& dict);
std::ostream& operator<<(std::ostream& os, const ParamKey& key);
std::ostream& operator<<(std::ostream& os, const StateValue& value);
std::ostream& operator<<(std::ostream& os, const OptimStateDict& dict);

// Python's name of a dtype ("float32", "int64", ...).
std::string DtypeName(at::ScalarType type);

}  // namespace fsdp::optim_state

#endif  // FSDP_CPP_OPTIM_STATE_OPTIM_STATE_DICT_H_
