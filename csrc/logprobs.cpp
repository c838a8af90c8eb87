// Native CPU kernels of the two log-prob launchers (the math: dqo_kernels/logprobs/; the
// definitions they are tested against: dqo_kernels/logprobs/naive.py).
//
//   lse_forward:  lse_n = logsumexp_j z_nj,  zt_n = z_{n,y_n - v0} (0 if y_n is outside this
//                 column slice),  ez_n = sum_j softmax(z_n)_j z_nj,  with z = logits / T.
//   logits_grad:  dz_nj = g_n (onehot_j(y_n - v0) - p_nj) - g^H_n p_nj (z_nj - (lse_n - H_n)),
//                 dlogits = dz / T,  p = exp(z - lse).
//
// Rows are independent and run in parallel; inside a row, passes over the vocabulary 8 lanes at
// a time (common.h's f32x8 and exp_f32). A row is first converted to the compute dtype (fp32,
// fp64 for fp64) in a per-thread buffer, so that fp16 and bf16 logits are read once and the
// passes after the first run from cache.
#include <limits>

#include "common.h"

namespace dqo {

template <typename acc_t>
using acc_of = std::conditional_t<std::is_same_v<acc_t, double>, double, float>;

// The row of `src` as acc_t: a pointer into src itself when it already is acc_t.
template <typename scalar_t, typename acc_t>
const acc_t* row_as_acc(const scalar_t* src, int64_t V, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    buf.resize(V);
    acc_t* dst = buf.data();
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) dst[j] = to_float(src[j]);
    return dst;
  }
}

// The passes over one row x[0, V) in acc_t: fp32 rows 8 lanes at a time, then a scalar tail
// with the same math (fp64 rows: all scalar, std::exp).
template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t V) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    f32x8 vm = splat8(m);
    for (; j + kLanes <= V; j += kLanes) {
      const f32x8 v = load8(x + j);
      vm = v > vm ? v : vm;
    }
    m = hmax8(vm);
  }
  for (; j < V; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// sum_j exp(z_j - m) and, with WANT_EZ, sum_j exp(z_j - m) z_j (0 * -inf taken as 0).
template <bool WANT_EZ, typename acc_t>
void row_sum_exp(const acc_t* x, int64_t V, acc_t inv_temp, acc_t m, acc_t& s, acc_t& sez) {
  s = 0;
  sez = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    f32x8 vs{}, vez{};
    for (; j + kLanes <= V; j += kLanes) {
      const f32x8 z = load8(x + j) * inv_temp, e = exp_f32(z - m);
      vs += e;
      if constexpr (WANT_EZ) vez += e > 0 ? e * z : f32x8{};
    }
    s = hsum8(vs);
    sez = hsum8(vez);
  }
  for (; j < V; ++j) {
    const acc_t z = x[j] * inv_temp, e = exp_acc(z - m);
    s += e;
    if constexpr (WANT_EZ) sez += e > 0 ? e * z : acc_t(0);
  }
}

// d_j = (-g p_j - gh p_j (z_j - mean_z)) / T with p = exp(z - lse); d may be x (in place).
template <bool HAS_ENT, typename acc_t>
void row_grad(const acc_t* x, acc_t* d, int64_t V, acc_t inv_temp, acc_t lse, acc_t g, acc_t gh,
              acc_t mean_z) {
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; j + kLanes <= V; j += kLanes) {
      const f32x8 z = load8(x + j) * inv_temp, p = exp_f32(z - lse);
      f32x8 dz = p * -g;
      if constexpr (HAS_ENT) dz -= p > 0 ? p * (z - mean_z) * gh : f32x8{};
      store8(d + j, dz * inv_temp);
    }
  }
  for (; j < V; ++j) {
    const acc_t z = x[j] * inv_temp, p = exp_acc(z - lse);
    acc_t dz = -g * p;
    if constexpr (HAS_ENT) dz -= p > 0 ? gh * p * (z - mean_z) : acc_t(0);
    d[j] = dz * inv_temp;
  }
}

template <typename scalar_t, typename acc_t, bool WANT_EZ>
void lse_rows(const scalar_t* logits, int64_t stride, const int64_t* targets, int64_t V,
              int64_t v0, acc_t inv_temp, acc_t* lse, acc_t* zt, acc_t* ez, int64_t begin,
              int64_t end) {
  std::vector<acc_t> buf;
  for (int64_t n = begin; n < end; ++n) {
    const acc_t* x = row_as_acc<scalar_t, acc_t>(logits + n * stride, V, buf);
    acc_t m = row_max(x, V) * inv_temp;
    if (!std::isfinite(m)) m = 0;  // a row of -inf: keep exp() finite (lse = -inf)
    acc_t s, sez;
    row_sum_exp<WANT_EZ>(x, V, inv_temp, m, s, sez);
    lse[n] = m + std::log(s);
    const int64_t y = targets[n] - v0;
    zt[n] = (y >= 0 && y < V) ? x[y] * inv_temp : acc_t(0);
    if constexpr (WANT_EZ) ez[n] = sez / s;
  }
}

template <typename scalar_t, typename out_t, typename acc_t, bool HAS_ENT>
void grad_rows(const scalar_t* logits, int64_t stride, const int64_t* targets, const acc_t* lse,
               const acc_t* grad, const acc_t* grad_ent, const acc_t* entropy, int64_t V,
               int64_t v0, acc_t inv_temp, out_t* out, int64_t out_stride, int64_t begin,
               int64_t end) {
  std::vector<acc_t> buf, dbuf;
  for (int64_t n = begin; n < end; ++n) {
    const acc_t* x = row_as_acc<scalar_t, acc_t>(logits + n * stride, V, buf);
    acc_t* d;  // the gradient row in acc_t: straight into out when out is acc_t
    if constexpr (std::is_same_v<out_t, acc_t>) {
      d = out + n * out_stride;  // may alias x (in-place backward)
    } else {
      dbuf.resize(V);
      d = dbuf.data();
    }
    const acc_t gh = HAS_ENT ? grad_ent[n] : acc_t(0);
    const acc_t mean_z = HAS_ENT ? lse[n] - entropy[n] : acc_t(0);  // E_p[z] = lse - H
    row_grad<HAS_ENT>(x, d, V, inv_temp, lse[n], grad[n], gh, mean_z);
    const int64_t y = targets[n] - v0;
    if (y >= 0 && y < V) d[y] += grad[n] * inv_temp;
    if constexpr (!std::is_same_v<out_t, acc_t>) {
      out_t* o = out + n * out_stride;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) o[j] = from_float<out_t>(d[j]);
    }
  }
}

template <typename scalar_t>
void lse_forward(const void* logits, int64_t stride, const int64_t* targets, int64_t N,
                 int64_t V, int64_t v0, double inv_temp, void* lse, void* zt, void* ez,
                 int threads, int64_t min_work) {
  using acc_t = acc_of<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(logits);
  auto *l = static_cast<acc_t*>(lse), *t = static_cast<acc_t*>(zt), *e = static_cast<acc_t*>(ez);
  const acc_t it = static_cast<acc_t>(inv_temp);
  parallel_rows(N, V, threads, min_work, [&](int64_t begin, int64_t end) {
    if (e) {
      lse_rows<scalar_t, acc_t, true>(x, stride, targets, V, v0, it, l, t, e, begin, end);
    } else {
      lse_rows<scalar_t, acc_t, false>(x, stride, targets, V, v0, it, l, t, e, begin, end);
    }
  });
}

template <typename scalar_t, typename out_t>
void logits_grad(const void* logits, int64_t stride, const int64_t* targets, const void* lse,
                 const void* grad, const void* grad_ent, const void* entropy, int64_t N,
                 int64_t V, int64_t v0, double inv_temp, void* out, int64_t out_stride,
                 int threads, int64_t min_work) {
  using acc_t = acc_of<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(logits);
  const auto *l = static_cast<const acc_t*>(lse), *g = static_cast<const acc_t*>(grad);
  const auto *gh = static_cast<const acc_t*>(grad_ent), *h = static_cast<const acc_t*>(entropy);
  auto* o = static_cast<out_t*>(out);
  const acc_t it = static_cast<acc_t>(inv_temp);
  parallel_rows(N, V, threads, min_work, [&](int64_t begin, int64_t end) {
    if (gh) {
      grad_rows<scalar_t, out_t, acc_t, true>(x, stride, targets, l, g, gh, h, V, v0, it, o,
                                              out_stride, begin, end);
    } else {
      grad_rows<scalar_t, out_t, acc_t, false>(x, stride, targets, l, g, gh, h, V, v0, it, o,
                                               out_stride, begin, end);
    }
  });
}

}  // namespace dqo
