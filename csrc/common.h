// Shared pieces of the native CPU kernels: element types, a vectorisable exp, row threading.
//
// No torch headers: the kernels see raw pointers and sizes, and dqo_kernels/_native/load.py
// calls them through ctypes. Parsing ATen's headers was nearly all of the old build's time
// (tens of seconds on a quiet machine, over 15 CPU-minutes on a throttled one); this file and
// the two kernels compile in about a second.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

namespace dqo {

// Storage types of torch's half dtypes, as raw 16-bit patterns.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// Dtype codes of the C interface (_native/load.py's DTYPE_CODES).
enum Dtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(bf16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(f16 x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);  // F16C in the AVX2 clone, a libgcc call elsewhere
}

template <typename T> T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) {
  // round to nearest even, as torch rounds; NaN stays a quiet NaN
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return bf16{static_cast<uint16_t>(x != x ? nan : rounded)};  // branch-free: vectorises
}
template <> inline f16 from_float<f16>(float x) {
  const _Float16 h = static_cast<_Float16>(x);
  f16 out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}

// 8 floats as one GCC vector (AVX2's ymm register; two SSE registers in a baseline build): the
// hot loops over the vocabulary are written with these so that their vectorisation does not
// hang on the auto-vectoriser (which spills `omp simd` reductions to the stack every step).
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));
constexpr int64_t kLanes = 8;

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);  // unaligned
  return v;
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }
inline f32x8 splat8(float x) { return f32x8{} + x; }
inline float hsum8(f32x8 v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax8(f32x8 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline int32_t to_i32(float x) { return static_cast<int32_t>(x); }
inline i32x8 to_i32(f32x8 x) { return __builtin_convertvector(x, i32x8); }
inline float bits_to_f32(int32_t x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline f32x8 bits_to_f32(i32x8 x) { return reinterpret_cast<f32x8&>(x); }

// exp in fp32, for one float or 8 at once, branch-free. Cephes' expf: exp(x) = 2^n exp(r),
// n = round(x / ln 2), |r| <= ln2/2, exp(r) by a degree-7 polynomial; within 1 ulp of exp on
// [-86.5, 88.7] (measured on every 256th float there). Below -86.5 it returns 0 (true values
// < 2.7e-38, far below a softmax's rounding), above ln(FLT_MAX) +inf, and NaN stays NaN.
template <typename F>
inline F exp_f32(F x) {
  const F lo = F{} - 86.5f, hi = F{} + 88.8f;
  F xc = x < lo ? lo : x;  // a NaN compares false: it stays in xc
  xc = xc > hi ? hi : xc;
  F n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  n = n == n ? n : F{};  // NaN: keep the int conversion below defined; r carries the NaN
  F r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F e = p * r * r + r + 1.0f;
  // 2^n as 2 * 2^(n-1), so that n = 128 (x near ln FLT_MAX) has a finite exponent field
  const F y = e * bits_to_f32((to_i32(n) + 126) << 23) * 2.0f;
  return x < lo ? F{} : y;
}
inline double exp_acc(double x) { return std::exp(x); }
inline float exp_acc(float x) { return exp_f32<float>(x); }

// Rows are independent in every op: run fn(begin, end) over [0, rows) on up to `threads`
// threads, each taking at least `min_work` elements (thread start-up costs ~20 us; below that
// one thread is faster). Plain threads that are joined, not a spinning pool: on a busy machine
// idle workers must not burn the cores the other processes need.
//
// An exception in a worker (std::bad_alloc of a row buffer) must not reach std::terminate: it
// is caught there, every thread is joined, and it is rethrown on the calling thread, where
// module.cpp turns it into a status code.
template <typename F>
void parallel_rows(int64_t rows, int64_t row_len, int threads, int64_t min_work, F fn) {
  const int64_t work = rows * std::max<int64_t>(row_len, 1);
  int64_t k = std::min<int64_t>({static_cast<int64_t>(std::max(threads, 1)), rows,
                                 work / std::max<int64_t>(min_work, 1)});
  if (k <= 1) {
    fn(int64_t(0), rows);
    return;
  }
  const int64_t chunk = (rows + k - 1) / k;
  std::atomic<bool> failed{false};
  auto guarded = [&fn, &failed](int64_t begin, int64_t end) {
    try {
      fn(begin, end);
    } catch (...) {
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(k));  // no reallocation while threads run
  int64_t begin = chunk;  // the calling thread takes [0, chunk)
  try {
    for (; begin < rows; begin += chunk) {
      pool.emplace_back(guarded, begin, std::min(rows, begin + chunk));
    }
  } catch (const std::system_error&) {  // no more threads: the caller does the rest
    guarded(begin, rows);
  }
  guarded(int64_t(0), std::min(rows, chunk));
  for (auto& t : pool) t.join();
  if (failed) throw std::runtime_error("a worker thread failed");
}

}  // namespace dqo
