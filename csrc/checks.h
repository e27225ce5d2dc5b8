// Input checks shared by every op: each failure names the op, the argument,
// what it got and what was expected, and raises RuntimeError in Python.
#pragma once

#include <cstdio>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

namespace fused_moe {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Messages are built from strings and numbers without iostreams: a stream
// formats numbers through the process's locale facets, and a failure path
// should not depend on how the library and the host's libstdc++ agree on them.
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
template <typename T>
std::enable_if_t<std::is_arithmetic_v<T>> append(std::string& s, T v) {
  if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
    s += buf;
  } else {
    s += std::to_string(v);
  }
}

template <typename... Args>
std::string concat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw std::runtime_error(concat(args...));
}

#define FUSED_MOE_CHECK(cond, ...) \
  do {                             \
    if (!(cond)) ::fused_moe::fail(__VA_ARGS__); \
  } while (0)

std::string shape_str(const Tensor& t);

// One argument of one op, for messages like
// "fused_moe.permute: topk_ids must be int32, got Float".
struct Arg {
  const char* op;
  const char* name;
  const Tensor& t;

  void dtype_in(std::initializer_list<ScalarType> allowed) const;
  void dtype_is(ScalarType expected) const { dtype_in({expected}); }
  // sizes[i] < 0 accepts any size in that dimension.
  void shape_is(std::initializer_list<int64_t> sizes) const;
  // Both of the above, and on the device of `ref` when one is given. Strides
  // are never an error: ops.cpp reads views in place or copies them.
  void expect(std::initializer_list<ScalarType> dtypes, std::initializer_list<int64_t> sizes,
              const Tensor* ref = nullptr, const char* ref_name = nullptr) const;
  void same_device(const Tensor& ref, const char* ref_name) const;
  // Every value of an int32/int64 tensor in [lo, hi), and with rising_from_lo
  // also non-decreasing from t[0] == lo. Checked on the CPU only: on the GPU
  // it would cost a host sync, so the CUDA kernels treat an out-of-range id
  // as a slot on another rank and clamp offsets instead.
  void values_in(int64_t lo, int64_t hi, bool rising_from_lo = false) const;
};

}  // namespace fused_moe
