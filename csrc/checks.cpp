#include "checks.h"

namespace fused_moe {

std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += concat(i ? ", " : "", t.size(i));
  return s + "]";
}

void Arg::dtype_in(std::initializer_list<ScalarType> allowed) const {
  for (ScalarType a : allowed)
    if (t.scalar_type() == a) return;
  std::string want;
  int i = 0;
  for (ScalarType a : allowed) want += concat(i++ ? " or " : "", torch::headeronly::toString(a));
  fail(op, ": ", name, " must be ", want, ", got ",
       torch::headeronly::toString(t.scalar_type()));
}

void Arg::shape_is(std::initializer_list<int64_t> sizes) const {
  bool ok = t.dim() == static_cast<int64_t>(sizes.size());
  int64_t i = 0;
  for (int64_t s : sizes) {
    if (ok && s >= 0 && t.size(i) != s) ok = false;
    ++i;
  }
  if (ok) return;
  std::string want = "[";
  i = 0;
  for (int64_t s : sizes) {
    want += i++ ? ", " : "";
    want += s >= 0 ? std::to_string(s) : std::string("*");
  }
  fail(op, ": ", name, " must have shape ", want + "]", ", got ", shape_str(t));
}

void Arg::same_device(const Tensor& ref, const char* ref_name) const {
  const bool same = t.is_cuda() == ref.is_cuda() &&
                    (!t.is_cuda() || t.get_device_index() == ref.get_device_index());
  FUSED_MOE_CHECK(same, op, ": ", name, " must be on the device of ", ref_name, " (",
                  ref.is_cuda() ? "cuda:" + std::to_string(ref.get_device_index()) : "cpu",
                  "), got ",
                  t.is_cuda() ? "cuda:" + std::to_string(t.get_device_index()) : "cpu");
}

void Arg::values_in(int64_t lo, int64_t hi, bool rising_from_lo) const {
  if (t.is_cuda()) return;
  const bool is64 = t.scalar_type() == ScalarType::Long;
  const void* data = t.data_ptr();
  auto at = [&](int64_t i) -> int64_t {
    return is64 ? static_cast<const int64_t*>(data)[i] : static_cast<const int32_t*>(data)[i];
  };
  for (int64_t i = 0; i < t.numel(); ++i) {
    const int64_t v = at(i);
    FUSED_MOE_CHECK(v >= lo && v < hi, op, ": ", name, " must be in [", lo, ", ", hi, "), got ",
                    v, " at flat index ", i);
    if (!rising_from_lo) continue;
    const int64_t prev = i ? at(i - 1) : lo;
    FUSED_MOE_CHECK(v >= prev && (i || v == lo), op, ": ", name, " must rise from ", lo,
                    ", got ", name, "[", i, "]=", v, (i ? " after " : ""),
                    (i ? std::to_string(prev) : std::string()));
  }
}

void Arg::expect(std::initializer_list<ScalarType> dtypes, std::initializer_list<int64_t> sizes,
                 const Tensor* ref, const char* ref_name) const {
  dtype_in(dtypes);
  shape_is(sizes);
  if (ref) same_device(*ref, ref_name);
}

}  // namespace fused_moe
