// Native CPU kernel of the fused DQO loss: forward values and closed-form gradients (the math:
// SPEC.md section 3; the definition it is tested against: dqo_kernels/dqo_scan_reference.py).
//
// One row is a sequential recurrence, so rows are the unit of parallelism. Per row: a backward
// pass for the lambda-return G and the residual delta = V - G, then a forward pass for the
// truncated importance weights w_t = exp(min(c_t, log C)), the losses, the gradients
//   dL/dlogp_t = beta a w_pi delta,   dL/dvalues_t = a w_V delta
// and, with target_grad, the forward discounted scan e_t = a w delta + gamma lambda e_{t-1}.
// Masked-out positions are skipped by both recurrences. Accumulation is in double.
//
// With `check`, the same passes also look for what the Python data checks refuse (a non-finite
// input, a log-prob above `tol`, a reward off the mask, a cumulative log-weight above
// `log_limit`), conservatively: a row that may fail them is flagged, and the caller then runs
// the exact Python checks, which say what is wrong. The common case costs no extra pass.
#include "common.h"

namespace dqo {

template <typename T>
struct ScanArgs {
  const T *logp, *ref, *beh, *values, *rewards;
  const uint8_t* mask;
  const T *boot, *row_scale;  // boot may be null (0 after the last action)
  T *returns, *weights, *td, *dlogp, *dvalues, *policy_rows, *value_rows;
  int64_t T_len;
  double beta, gamma, lam, log_clip;
  bool is_policy, is_value, target_grad;
  bool check;
  double tol, log_limit;
  uint8_t* row_flagged;  // [B]: 1 if the row may fail a data check
};

template <typename T>
void dqo_scan_rows(const ScanArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t n = a.T_len;
  const double rho = a.gamma * a.lam;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t o = b * n;
    // Backward: h carries (1 - lam) V_next + lam G_next, so G_t = rt_t + gamma h.
    double h = a.boot ? static_cast<double>(a.boot[b]) : 0.0;
    bool flagged = a.check && !std::isfinite(h);
    for (int64_t t = n - 1; t >= 0; --t) {
      const int64_t i = o + t;
      if (!a.mask[i]) {
        a.returns[i] = 0;
        a.td[i] = 0;
        flagged |= a.check && !(a.rewards[i] == 0);  // a reward off the mask (or NaN)
        continue;
      }
      const double v = a.values[i];
      if (a.check) {  // comparisons false for NaN: "!(x <= tol)" catches it too
        const double lp = a.logp[i], rf = a.ref[i], bh = a.beh[i], rw = a.rewards[i];
        flagged |= !(lp <= a.tol) || !(rf <= a.tol) || !(bh <= a.tol) || !std::isfinite(lp) ||
                   !std::isfinite(rf) || !std::isfinite(bh) || !std::isfinite(v) ||
                   !std::isfinite(rw);
      }
      const double l = static_cast<double>(a.logp[i]) - static_cast<double>(a.ref[i]);
      const double g = static_cast<double>(a.rewards[i]) - a.beta * l + a.gamma * h;
      h = (1.0 - a.lam) * v + a.lam * g;
      a.returns[i] = static_cast<T>(g);
      a.td[i] = static_cast<T>(v - g);
    }
    // Forward: importance weights, losses, gradients.
    const double scale = a.row_scale[b];
    double c = 0.0, e = 0.0, loss_pi = 0.0, loss_v = 0.0;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t i = o + t;
      if (!a.mask[i]) {
        a.weights[i] = 0;
        a.dlogp[i] = 0;
        a.dvalues[i] = 0;
        continue;
      }
      c += static_cast<double>(a.logp[i]) - static_cast<double>(a.beh[i]);
      flagged |= a.check && c > a.log_limit;  // exp(c) would overflow the compute dtype
      const double w = std::exp(std::min(c, a.log_clip));
      const double w_pi = a.is_policy ? w : 1.0;
      const double w_v = a.is_value ? w : 1.0;
      const double delta = static_cast<double>(a.td[i]);
      const double g_pi = scale * w_pi * delta;
      loss_pi += 0.5 * g_pi * delta;
      loss_v += 0.5 * scale * w_v * delta * delta;
      e = a.target_grad ? g_pi + rho * e : g_pi;
      a.weights[i] = static_cast<T>(w);
      a.dlogp[i] = static_cast<T>(a.beta * e);
      a.dvalues[i] = static_cast<T>(scale * w_v * delta);
    }
    a.policy_rows[b] = static_cast<T>(loss_pi);
    a.value_rows[b] = static_cast<T>(loss_v);
    a.row_flagged[b] = flagged;
  }
}

// True if a row was flagged by the data checks.
template <typename T>
bool dqo_scan(const void* const* in, void* const* out, int64_t B, int64_t T_len,
              const double* hyper, const int* flags, int threads, int64_t min_work) {
  ScanArgs<T> a;
  a.logp = static_cast<const T*>(in[0]);
  a.ref = static_cast<const T*>(in[1]);
  a.beh = static_cast<const T*>(in[2]);
  a.values = static_cast<const T*>(in[3]);
  a.rewards = static_cast<const T*>(in[4]);
  a.mask = static_cast<const uint8_t*>(in[5]);
  a.boot = static_cast<const T*>(in[6]);
  a.row_scale = static_cast<const T*>(in[7]);
  a.returns = static_cast<T*>(out[0]);
  a.weights = static_cast<T*>(out[1]);
  a.td = static_cast<T*>(out[2]);
  a.dlogp = static_cast<T*>(out[3]);
  a.dvalues = static_cast<T*>(out[4]);
  a.policy_rows = static_cast<T*>(out[5]);
  a.value_rows = static_cast<T*>(out[6]);
  a.T_len = T_len;
  a.beta = hyper[0];
  a.gamma = hyper[1];
  a.lam = hyper[2];
  a.log_clip = hyper[3];
  a.is_policy = flags[0] != 0;
  a.is_value = flags[1] != 0;
  a.target_grad = flags[2] != 0;
  a.check = flags[3] != 0;
  a.tol = hyper[4];
  a.log_limit = hyper[5];
  std::vector<uint8_t> row_flagged(static_cast<size_t>(B), 0);
  a.row_flagged = row_flagged.data();
  parallel_rows(B, T_len, threads, min_work,
                [&a](int64_t begin, int64_t end) { dqo_scan_rows<T>(a, begin, end); });
  return std::any_of(row_flagged.begin(), row_flagged.end(), [](uint8_t f) { return f != 0; });
}

}  // namespace dqo
