// Native CPU kernel of the fused DQO loss: forward values and closed-form gradients (the math:
// docs/math.md §3; the definition it is tested against: dqo_kernels/dqo_loss/naive.py).
//
// Per row, with l_t = logp_t - ref_t, the soft reward rt_t = r_t - beta l_t and rho = gamma lam:
//
//   backward:  h_t = a_t + m_t h_{t+1},  a_t = (1 - lam) V_t + lam rt_t,  m_t = rho,
//              G_t = rt_t + gamma h_{t+1},  delta_t = V_t - G_t,  h_T = bootstrap (or 0)
//   forward:   c_t = c_{t-1} + logp_t - beh_t,  w_t = exp(min(c_t, log C)),
//              L_pi = sum_t a_b/2 w_pi delta_t^2,  L_V = sum_t a_b/2 w_V delta_t^2,
//              dL/dlogp_t = beta e_t,  e_t = a_b w_pi delta_t (+ rho e_{t-1} with target_grad),
//              dL/dvalues_t = a_b w_V delta_t
//
// (h_t is (1 - lam) V_t + lam G_t.) Masked-out positions pass every recurrence through
// unchanged (a_t = 0, m_t = 1) and get 0 in every output. Accumulation is in double.
//
// Speed (fp32): 8 tokens at a time. Each recurrence is an affine map per token, h <- a + m h,
// and 8 of them compose in registers in three shift-and-combine steps (Hillis-Steele, as the
// Triton kernel's associative scan does); the chain from one group of 8 to the next is then one
// multiply-add, instead of one per token (a chain of dependent adds costs ~4 ns a token here,
// more than all the element-wise math of the token). fp64 runs the same math one token at a
// time.
//
// The row scale a_b of the loss aggregation is an input ([B], as for every backend), or, where
// the caller passes none, computed here from the mask (aggregation.py's row_scale; the fast
// path); the rows' losses are also summed here, so that a call needs no tensor op around it.
//
// With `check`, the same passes also look for what the Python data checks refuse (a non-finite
// input, a log-prob above `tol`, a reward off the mask, a cumulative log-weight above
// `log_limit`), conservatively: a row that may fail them is flagged, and the caller then runs
// the exact Python checks, which say what is wrong. The common case costs no extra pass.
#include "common.h"

namespace dqo {

// Aggregation codes of the C interface (_native/load.py's LOSS_AGG_CODES).
enum LossAgg : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2 };

// The scalars of one call; dqo_kernels/_native/load.py's DqoHyper mirrors it field by field.
struct DqoHyper {
  double beta, lam, gamma;
  double log_clip;     // log C; inf: no cap
  double logprob_tol;  // the data checks' log-prob tolerance
  double log_limit;    // the data checks' largest log-weight; inf: not checked
  double num_tokens;   // token-mean's global count; <= 0: the mask's count
  int32_t is_policy, is_value, target_grad;
  int32_t check;     // look for inputs that the data checks may refuse
  int32_t loss_agg;  // LossAgg; used only without a row_scale
};

// The buffers of one call, of the compute dtype and contiguous [B, T] unless noted;
// dqo_kernels/_native/load.py's DqoLossTensors mirrors it field by field.
struct DqoLossTensors {
  const void *logp, *ref_logp, *behavior_logp, *values, *rewards;
  const uint8_t* mask;
  const void* bootstrap;  // [B], or null: 0 after the last action
  const void* row_scale;  // [B], or null: computed from the mask and loss_agg
  void *returns, *weights, *td_error, *dlogp, *dvalues;
  void *policy_rows, *value_rows;  // [B]
  void *policy_loss, *value_loss;  // scalars: the rows' sums, in row order
};

template <typename T>
struct LossArgs {
  const T *logp, *ref, *beh, *values, *rewards;
  const uint8_t* mask;
  const T* boot;  // may be null (0 after the last action)
  const double* row_scale;  // [B]
  T *returns, *weights, *td, *dlogp, *dvalues;
  double *policy_rows, *value_rows;  // [B]
  int64_t T_len;
  double beta, gamma, lam, log_clip;
  bool is_policy, is_value, target_grad;
  bool check;
  double tol, log_limit;
  uint8_t* row_flagged;  // [B]: 1 if the row may fail a data check
};

// One row: its pointers (offset to the row) and what the passes carry along it.
template <typename T>
struct Row {
  const T *lp, *rf, *bh, *v, *rw;
  const uint8_t* mk;
  T *ret, *wt, *td, *dl, *dv;
  double scale;
  double h = 0, c = 0, e = 0, loss_pi = 0, loss_v = 0;  // the carries and the sums
  int bad = 0;
};

// x - x is 0 for a finite x, NaN for inf and NaN: a finiteness test that vectorises.
inline bool finite(double x) { return x - x == 0; }
inline i32x8 finite8(f32x8 x) { return x - x == splat8(0.0f); }

inline i32x8 mask8(const uint8_t* m) {  // 8 mask bytes as lane masks (-1: on)
  u8x8 m8;
  std::memcpy(&m8, m, sizeof m8);
  return __builtin_convertvector(m8, i32x8) != 0;
}
// 8 doubles as two 4-lane halves: AVX2's registers hold 4 doubles, and GCC spills a 64-byte
// vector type to the stack around every shuffle.
typedef double f64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

struct D8 {
  f64x4 lo, hi;  // lanes 0..3, 4..7
};
struct M8 {  // a lane mask of 8 doubles
  i64x4 lo, hi;
};
inline D8 splat(double x) { return {f64x4{} + x, f64x4{} + x}; }
inline D8 operator+(D8 a, D8 b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline D8 operator-(D8 a, D8 b) { return {a.lo - b.lo, a.hi - b.hi}; }
inline D8 operator*(D8 a, D8 b) { return {a.lo * b.lo, a.hi * b.hi}; }
inline D8 operator*(double a, D8 b) { return {a * b.lo, a * b.hi}; }
inline D8 operator+(D8 a, double b) { return {a.lo + b, a.hi + b}; }
inline D8 select(M8 m, D8 a, D8 b) { return {m.lo ? a.lo : b.lo, m.hi ? a.hi : b.hi}; }
inline M8 widen_mask(i32x8 m) {
  const i32x4 lo = __builtin_shufflevector(m, m, 0, 1, 2, 3);
  const i32x4 hi = __builtin_shufflevector(m, m, 4, 5, 6, 7);
  return {__builtin_convertvector(lo, i64x4), __builtin_convertvector(hi, i64x4)};
}
inline D8 widen(f32x8 x) {
  const f32x4 lo = __builtin_shufflevector(x, x, 0, 1, 2, 3);
  const f32x4 hi = __builtin_shufflevector(x, x, 4, 5, 6, 7);
  return {__builtin_convertvector(lo, f64x4), __builtin_convertvector(hi, f64x4)};
}
inline f32x8 narrow(D8 x) {
  const f32x4 lo = __builtin_convertvector(x.lo, f32x4);
  const f32x4 hi = __builtin_convertvector(x.hi, f32x4);
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7);
}
inline double lane(D8 x, int i) { return i < 4 ? x.lo[i] : x.hi[i - 4]; }

// Lane i takes lane i + K (DOWN) or i - K (up) of a 4-lane vector; lanes shifted in from
// outside take `fill`.
template <int K, bool DOWN>
inline f64x4 shift4(f64x4 x, f64x4 fill) {
  constexpr auto at = [](int i) -> int64_t {
    const int j = DOWN ? i + K : i - K;
    return (j >= 0 && j < 4) ? j : 4 + i;
  };
  return __builtin_shuffle(x, fill, i64x4{at(0), at(1), at(2), at(3)});
}

// The composition of 4 affine maps x <- A_i + M_i x: DOWN, over lanes i..3 (applied last lane
// first: the backward recurrence); up, over lanes 0..i (the forward one).
template <bool DOWN>
inline void compose4(f64x4& A, f64x4& M) {
  const f64x4 zero = f64x4{}, one = f64x4{} + 1.0;
  A += M * shift4<1, DOWN>(A, zero);
  M *= shift4<1, DOWN>(M, one);
  A += M * shift4<2, DOWN>(A, zero);
  M *= shift4<2, DOWN>(M, one);
}

// The same over 8 lanes: each half, then the later half's map into the earlier one.
template <bool DOWN>
inline void compose8(D8& A, D8& M) {
  compose4<DOWN>(A.lo, M.lo);
  compose4<DOWN>(A.hi, M.hi);
  if (DOWN) {  // lanes 0..3 continue with the whole of lanes 4..7
    A.lo += M.lo * A.hi[0];
    M.lo *= M.hi[0];
  } else {  // lanes 4..7 continue after the whole of lanes 0..3
    A.hi += M.hi * A.lo[3];
    M.hi *= M.lo[3];
  }
}

// compose8 where every multiplier is m: the composed multipliers are powers of m, known in
// advance (`powers`: powers8(m, DOWN)), and only the offsets need the shifts.
template <bool DOWN>
inline void compose8_const(D8& A, double m, const D8& powers) {
  const f64x4 zero = f64x4{};
  const double m2 = m * m;
  A.lo += m * shift4<1, DOWN>(A.lo, zero);
  A.hi += m * shift4<1, DOWN>(A.hi, zero);
  A.lo += m2 * shift4<2, DOWN>(A.lo, zero);
  A.hi += m2 * shift4<2, DOWN>(A.hi, zero);
  if (DOWN) {  // lane i < 4 has composed 4 - i maps: m^(4-i), the powers of lanes 4..7
    A.lo += powers.hi * A.hi[0];
  } else {  // lane 4 + i has composed i + 1 maps: m^(i+1), the powers of lanes 0..3
    A.hi += powers.lo * A.lo[3];
  }
}

// The composed multipliers of 8 maps of multiplier m: m^(8-i) (DOWN), m^(i+1) (up).
inline D8 powers8(double m, bool down) {
  double p[kLanes];
  double x = 1.0;
  for (int i = 0; i < kLanes; ++i) p[down ? kLanes - 1 - i : i] = x *= m;
  return {f64x4{p[0], p[1], p[2], p[3]}, f64x4{p[4], p[5], p[6], p[7]}};
}

// The hi half's lane i takes lane i + 1 of the 8, lane 7 takes `fill` (backward: h_{t+i+1}).
inline D8 next8(D8 x, double fill) {
  const f64x4 lo = __builtin_shuffle(x.lo, x.hi, i64x4{1, 2, 3, 4});
  const f64x4 hi = shift4<1, true>(x.hi, f64x4{} + fill);
  return {lo, hi};
}

// Backward pass, one token.
template <typename T>
inline void backward1(const LossArgs<T>& a, Row<T>& r, int64_t t) {
  const double x = r.lp[t], y = r.rf[t], rw = r.rw[t], vv = r.v[t];
  if (!r.mk[t]) {
    r.ret[t] = r.td[t] = 0;
    r.bad |= a.check && !(rw == 0);  // a reward off the mask (or NaN)
    return;
  }
  if (a.check) {  // comparisons are false for NaN: "!(x <= tol)" catches it too
    const double z = r.bh[t];
    r.bad |= !(x <= a.tol) | !(y <= a.tol) | !(z <= a.tol) | !finite(x) | !finite(y) |
             !finite(z) | !finite(vv) | !finite(rw);
  }
  const double rt = rw - a.beta * (x - y);
  const double g = rt + a.gamma * r.h;
  r.h = (1.0 - a.lam) * vv + a.lam * rt + a.gamma * a.lam * r.h;
  r.ret[t] = static_cast<T>(g);
  r.td[t] = static_cast<T>(vv - g);
}

// The 8 mask bytes of a group as one word: all off, all on, or mixed.
constexpr uint64_t kAllOn = 0x0101010101010101ull;
inline uint64_t mask_word(const uint8_t* m) {
  uint64_t w;
  std::memcpy(&w, m, sizeof w);
  return w;
}

// Backward pass, the 8 tokens t..t+7 of an fp32 row. Groups wholly on the mask (most of a
// response) compose with the constant multipliers rho^k, precomputed; groups wholly off it
// only pass the carry through.
inline void backward8(const LossArgs<float>& a, Row<float>& r, int64_t t, i32x8& bad8,
                      const D8& rho_down) {
  const f32x8 rw = load8(r.rw + t);
  const uint64_t word = mask_word(r.mk + t);
  if (word == 0) {
    store8(r.ret + t, splat8(0.0f));
    store8(r.td + t, splat8(0.0f));
    if (a.check) bad8 |= ~(rw == splat8(0.0f));  // a reward off the mask (or NaN)
    return;
  }
  const f32x8 x = load8(r.lp + t), y = load8(r.rf + t), vv = load8(r.v + t);
  const D8 rt = widen(rw) - a.beta * (widen(x) - widen(y));
  const D8 term = (1.0 - a.lam) * widen(vv) + a.lam * rt;
  const i32x8 on = mask8(r.mk + t);
  const M8 on64 = widen_mask(on);
  D8 A, M;
  if (word == kAllOn) {
    A = term;
    M = rho_down;
    compose8_const<true>(A, a.gamma * a.lam, rho_down);
  } else {
    A = select(on64, term, splat(0.0));
    M = select(on64, splat(a.gamma * a.lam), splat(1.0));
    compose8<true>(A, M);
  }
  const D8 h = A + M * splat(r.h);  // h_{t+i}
  const D8 g = rt + a.gamma * next8(h, r.h);  // G = rt + gamma h_{t+i+1}
  r.h = h.lo[0];
  store8(r.ret + t, narrow(select(on64, g, splat(0.0))));
  store8(r.td + t, narrow(select(on64, widen(vv) - g, splat(0.0))));
  if (a.check) {
    const f32x8 z = load8(r.bh + t), tol = splat8(a.tol);
    const i32x8 bad_on = ~(x <= tol) | ~(y <= tol) | ~(z <= tol) | ~finite8(x) | ~finite8(y) |
                         ~finite8(z) | ~finite8(vv) | ~finite8(rw);
    bad8 |= on ? bad_on : ~(rw == splat8(0.0f));
  }
}

// Forward pass, one token.
template <typename T>
inline void forward1(const LossArgs<T>& a, Row<T>& r, int64_t t) {
  if (!r.mk[t]) {
    r.wt[t] = r.dl[t] = r.dv[t] = 0;
    return;
  }
  r.c += static_cast<double>(r.lp[t]) - static_cast<double>(r.bh[t]);
  r.bad |= a.check && r.c > a.log_limit;  // exp(c) would overflow the compute dtype
  const double w = exp_acc(static_cast<T>(std::min(r.c, a.log_clip)));
  const double delta = r.td[t];
  const double g_pi = r.scale * (a.is_policy ? w : 1.0) * delta;
  const double g_v = r.scale * (a.is_value ? w : 1.0) * delta;
  r.loss_pi += 0.5 * g_pi * delta;
  r.loss_v += 0.5 * g_v * delta;
  r.e = a.target_grad ? g_pi + a.gamma * a.lam * r.e : g_pi;
  r.wt[t] = static_cast<T>(w);
  r.dv[t] = static_cast<T>(g_v);
  r.dl[t] = static_cast<T>(a.beta * r.e);
}

// Forward pass, the 8 tokens t..t+7 of an fp32 row; the losses are summed in acc_pi, acc_v.
inline void forward8(const LossArgs<float>& a, Row<float>& r, int64_t t, D8& acc_pi,
                     D8& acc_v, M8& over, const D8& rho_up) {
  const uint64_t word = mask_word(r.mk + t);
  if (word == 0) {
    store8(r.wt + t, splat8(0.0f));
    store8(r.dv + t, splat8(0.0f));
    store8(r.dl + t, splat8(0.0f));
    return;
  }
  const bool all_on = word == kAllOn;
  const i32x8 on = mask8(r.mk + t);
  const M8 on64 = widen_mask(on);
  D8 S = widen(load8(r.lp + t)) - widen(load8(r.bh + t));
  if (!all_on) S = select(on64, S, splat(0.0));
  compose8_const<false>(S, 1.0, splat(1.0));  // the prefix sum
  const D8 c = S + r.c;
  r.c = c.hi[3];
  if (a.check) {
    over.lo |= on64.lo & (c.lo > a.log_limit);
    over.hi |= on64.hi & (c.hi > a.log_limit);
  }
  const D8 capped = {c.lo < a.log_clip ? c.lo : f64x4{} + a.log_clip,
                     c.hi < a.log_clip ? c.hi : f64x4{} + a.log_clip};
  const f32x8 w = on ? exp_f32(narrow(capped)) : splat8(0.0f);
  const f32x8 delta = load8(r.td + t);  // 0 off the mask
  const f32x8 scale = splat8(static_cast<float>(r.scale));
  const f32x8 g_pi = scale * (a.is_policy ? w : splat8(1.0f)) * delta;
  const f32x8 g_v = scale * (a.is_value ? w : splat8(1.0f)) * delta;
  acc_pi = acc_pi + widen(g_pi * delta);
  acc_v = acc_v + widen(g_v * delta);
  store8(r.wt + t, w);
  store8(r.dv + t, g_v);
  if (!a.target_grad) {
    store8(r.dl + t, splat8(a.beta) * g_pi);
    return;
  }
  D8 A = widen(g_pi), M;  // e_t = g_t + rho e_{t-1}, on the mask (g_pi is 0 off it)
  if (all_on) {
    M = rho_up;
    compose8_const<false>(A, a.gamma * a.lam, rho_up);
  } else {
    M = select(on64, splat(a.gamma * a.lam), splat(1.0));
    compose8<false>(A, M);
  }
  const D8 e = A + M * splat(r.e);
  r.e = e.hi[3];
  store8(r.dl + t, narrow(select(on64, a.beta * e, splat(0.0))));
}

template <typename T>
void dqo_loss_row(const LossArgs<T>& args, int64_t b) {
  // A copy the compiler can keep in registers: through the reference, every store to an
  // output could alias the parameters, which would then be reloaded after each store.
  const LossArgs<T> a = args;
  const int64_t n = a.T_len, o = b * n;
  Row<T> r{a.logp + o, a.ref + o, a.beh + o, a.values + o, a.rewards + o, a.mask + o,
           a.returns + o, a.weights + o, a.td + o, a.dlogp + o, a.dvalues + o,
           a.row_scale[b]};
  r.h = a.boot ? static_cast<double>(a.boot[b]) : 0.0;
  r.bad = a.check && !finite(r.h);
  int64_t t = n;  // backward, last token first
  if constexpr (std::is_same_v<T, float>) {
    i32x8 bad8 = i32x8{};
    const D8 rho_down = powers8(a.gamma * a.lam, true);
    for (; t >= kLanes; t -= kLanes) backward8(a, r, t - kLanes, bad8, rho_down);
    for (int k = 0; k < kLanes; ++k) r.bad |= bad8[k] != 0;
  }
  while (t > 0) backward1(a, r, --t);
  t = 0;  // forward
  if constexpr (std::is_same_v<T, float>) {
    D8 acc_pi = splat(0.0), acc_v = splat(0.0);
    M8 over = {i64x4{}, i64x4{}};
    const D8 rho_up = powers8(a.gamma * a.lam, false);
    for (; t + kLanes <= n; t += kLanes) forward8(a, r, t, acc_pi, acc_v, over, rho_up);
    for (int k = 0; k < kLanes; ++k) {
      r.loss_pi += 0.5 * lane(acc_pi, k);
      r.loss_v += 0.5 * lane(acc_v, k);
      r.bad |= a.check && (k < 4 ? over.lo[k] : over.hi[k - 4]) != 0;
    }
  }
  for (; t < n; ++t) forward1(a, r, t);
  a.policy_rows[b] = r.loss_pi;
  a.value_rows[b] = r.loss_v;
  a.row_flagged[b] = r.bad != 0;
}

// The row scale a_b of the loss aggregation, from the mask (aggregation.py's row_scale).
inline std::vector<double> row_scales(const uint8_t* mask, int64_t B, int64_t T, int agg,
                                      double num_tokens) {
  std::vector<double> scale(static_cast<size_t>(B));
  double total = 0, n_seq = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t count = 0;
#pragma omp simd reduction(+ : count)
    for (int64_t t = 0; t < T; ++t) count += mask[b * T + t] != 0;
    scale[b] = static_cast<double>(count);
    total += scale[b];
    n_seq += count > 0;
  }
  n_seq = std::max(n_seq, 1.0);
  for (int64_t b = 0; b < B; ++b) {
    if (agg == kTokenMean) {
      scale[b] = 1.0 / std::max(num_tokens > 0 ? num_tokens : total, 1.0);
    } else if (agg == kSeqMeanTokenMean) {
      scale[b] = 1.0 / (n_seq * std::max(scale[b], 1.0));
    } else {
      scale[b] = 1.0 / n_seq;
    }
  }
  return scale;
}

// Fills the outputs; true if a row was flagged by the data checks.
template <typename T>
bool dqo_loss(const DqoLossTensors& t, const DqoHyper& h, int64_t B, int64_t T_len, int threads,
              int64_t min_work) {
  LossArgs<T> a;
  a.logp = static_cast<const T*>(t.logp);
  a.ref = static_cast<const T*>(t.ref_logp);
  a.beh = static_cast<const T*>(t.behavior_logp);
  a.values = static_cast<const T*>(t.values);
  a.rewards = static_cast<const T*>(t.rewards);
  a.mask = t.mask;
  a.boot = static_cast<const T*>(t.bootstrap);
  a.returns = static_cast<T*>(t.returns);
  a.weights = static_cast<T*>(t.weights);
  a.td = static_cast<T*>(t.td_error);
  a.dlogp = static_cast<T*>(t.dlogp);
  a.dvalues = static_cast<T*>(t.dvalues);
  a.T_len = T_len;
  a.beta = h.beta;
  a.gamma = h.gamma;
  a.lam = h.lam;
  a.log_clip = h.log_clip;
  a.tol = h.logprob_tol;
  a.log_limit = h.log_limit;
  a.is_policy = h.is_policy != 0;
  a.is_value = h.is_value != 0;
  a.target_grad = h.target_grad != 0;
  a.check = h.check != 0;
  std::vector<double> scale;
  if (t.row_scale != nullptr) {
    const T* given = static_cast<const T*>(t.row_scale);
    scale.assign(given, given + B);
  } else {
    scale = row_scales(a.mask, B, T_len, h.loss_agg, h.num_tokens);
  }
  a.row_scale = scale.data();
  std::vector<double> rows(static_cast<size_t>(2 * B));
  a.policy_rows = rows.data();
  a.value_rows = rows.data() + B;
  std::vector<uint8_t> row_flagged(static_cast<size_t>(B), 0);
  a.row_flagged = row_flagged.data();
  parallel_rows(B, T_len, threads, min_work, [&a](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) dqo_loss_row<T>(a, b);
  });
  T* policy_rows = static_cast<T*>(t.policy_rows);
  T* value_rows = static_cast<T*>(t.value_rows);
  double loss_pi = 0, loss_v = 0;  // in row order: the same sum for any thread count
  for (int64_t b = 0; b < B; ++b) {
    loss_pi += a.policy_rows[b];
    loss_v += a.value_rows[b];
    policy_rows[b] = static_cast<T>(a.policy_rows[b]);
    value_rows[b] = static_cast<T>(a.value_rows[b]);
  }
  *static_cast<T*>(t.policy_loss) = static_cast<T>(loss_pi);
  *static_cast<T*>(t.value_loss) = static_cast<T>(loss_v);
  return std::any_of(row_flagged.begin(), row_flagged.end(), [](uint8_t f) { return f != 0; });
}

}  // namespace dqo
