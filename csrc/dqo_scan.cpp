// Native CPU kernel of the fused DQO loss (see dqo_kernels/dqo_scan_reference.py for the math).
//
// One row is a sequential recurrence, so rows are the unit of parallelism (at::parallel_for,
// OpenMP underneath). Per row: a backward pass for the lambda-return and the residual, then a
// forward pass for the truncated importance weights, the losses, the closed-form gradients and,
// with target_grad, the forward discounted scan of SPEC 3.8. Accumulation is in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace {

template <typename scalar_t>
void dqo_scan_rows(
    const at::TensorAccessor<scalar_t, 2>& logp, const at::TensorAccessor<scalar_t, 2>& ref,
    const at::TensorAccessor<scalar_t, 2>& beh, const at::TensorAccessor<scalar_t, 2>& values,
    const at::TensorAccessor<scalar_t, 2>& rewards, const at::TensorAccessor<bool, 2>& mask,
    const scalar_t* boot, const scalar_t* row_scale, at::TensorAccessor<scalar_t, 2> returns,
    at::TensorAccessor<scalar_t, 2> weights, at::TensorAccessor<scalar_t, 2> td,
    at::TensorAccessor<scalar_t, 2> dlogp, at::TensorAccessor<scalar_t, 2> dvalues,
    scalar_t* policy_rows, scalar_t* value_rows, int64_t T, double beta, double gamma,
    double lam, double log_clip, bool is_policy, bool is_value, bool target_grad,
    int64_t begin, int64_t end) {
  const double rho = gamma * lam;
  for (int64_t b = begin; b < end; ++b) {
    // Backward: H carries (1 - lam) * V_next + lam * G_next, so G_t = rt_t + gamma * H.
    double h = boot ? static_cast<double>(boot[b]) : 0.0;
    for (int64_t t = T - 1; t >= 0; --t) {
      if (!mask[b][t]) {
        returns[b][t] = 0;
        td[b][t] = 0;
        continue;
      }
      const double v = values[b][t];
      const double l = static_cast<double>(logp[b][t]) - static_cast<double>(ref[b][t]);
      const double g = static_cast<double>(rewards[b][t]) - beta * l + gamma * h;
      h = (1.0 - lam) * v + lam * g;
      returns[b][t] = static_cast<scalar_t>(g);
      td[b][t] = static_cast<scalar_t>(v - g);
    }
    // Forward: importance weights, losses, gradients.
    const double a = row_scale[b];
    double c = 0.0, e = 0.0, loss_pi = 0.0, loss_v = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      if (!mask[b][t]) {
        weights[b][t] = 0;
        dlogp[b][t] = 0;
        dvalues[b][t] = 0;
        continue;
      }
      c += static_cast<double>(logp[b][t]) - static_cast<double>(beh[b][t]);
      const double w = std::exp(std::min(c, log_clip));
      const double w_pi = is_policy ? w : 1.0;
      const double w_v = is_value ? w : 1.0;
      const double delta = static_cast<double>(td[b][t]);
      const double g_pi = a * w_pi * delta;
      loss_pi += 0.5 * g_pi * delta;
      loss_v += 0.5 * a * w_v * delta * delta;
      e = target_grad ? g_pi + rho * e : g_pi;
      weights[b][t] = static_cast<scalar_t>(w);
      dlogp[b][t] = static_cast<scalar_t>(beta * e);
      dvalues[b][t] = static_cast<scalar_t>(a * w_v * delta);
    }
    policy_rows[b] = static_cast<scalar_t>(loss_pi);
    value_rows[b] = static_cast<scalar_t>(loss_v);
  }
}

}  // namespace

std::vector<at::Tensor> dqo_scan_forward(
    at::Tensor logp, at::Tensor ref_logp, at::Tensor behavior_logp,
    at::Tensor values, at::Tensor rewards, at::Tensor mask,
    c10::optional<at::Tensor> bootstrap, at::Tensor row_scale, double beta, double gamma,
    double lam, double log_clip, bool is_policy, bool is_value, bool target_grad) {
  TORCH_CHECK(logp.device().is_cpu(), "dqo_scan_forward: CPU tensors only");
  TORCH_CHECK(logp.dim() == 2, "dqo_scan_forward: logp must be [B, T]");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "dqo_scan_forward: mask must be bool");
  const auto dtype = logp.scalar_type();
  for (const auto& x : {ref_logp, behavior_logp, values, rewards}) {
    TORCH_CHECK(x.scalar_type() == dtype && x.sizes() == logp.sizes(),
                "dqo_scan_forward: float inputs must share logp's dtype and shape");
  }
  TORCH_CHECK(mask.sizes() == logp.sizes(), "dqo_scan_forward: mask must match logp's shape");
  const int64_t B = logp.size(0), T = logp.size(1);
  at::Tensor boot;
  if (bootstrap.has_value()) {
    boot = bootstrap->contiguous();
    TORCH_CHECK(boot.scalar_type() == dtype && boot.numel() == B,
                "dqo_scan_forward: bootstrap must be [B] with logp's dtype");
  }
  auto scale = row_scale.to(dtype).contiguous();
  TORCH_CHECK(scale.numel() == B, "dqo_scan_forward: row_scale must be [B]");
  auto opts = logp.options();
  auto returns = at::empty({B, T}, opts), weights = at::empty({B, T}, opts);
  auto td = at::empty({B, T}, opts), dlogp = at::empty({B, T}, opts);
  auto dvalues = at::empty({B, T}, opts);
  auto policy_rows = at::empty({B}, opts), value_rows = at::empty({B}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "dqo_scan_forward", [&] {
    auto lp = logp.accessor<scalar_t, 2>();
    auto rf = ref_logp.accessor<scalar_t, 2>();
    auto bh = behavior_logp.accessor<scalar_t, 2>();
    auto vl = values.accessor<scalar_t, 2>();
    auto rw = rewards.accessor<scalar_t, 2>();
    auto mk = mask.accessor<bool, 2>();
    const scalar_t* bt = boot.defined() ? boot.data_ptr<scalar_t>() : nullptr;
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    auto ret = returns.accessor<scalar_t, 2>();
    auto wt = weights.accessor<scalar_t, 2>();
    auto tda = td.accessor<scalar_t, 2>();
    auto dl = dlogp.accessor<scalar_t, 2>();
    auto dv = dvalues.accessor<scalar_t, 2>();
    scalar_t* pr = policy_rows.data_ptr<scalar_t>();
    scalar_t* vr = value_rows.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
      dqo_scan_rows<scalar_t>(lp, rf, bh, vl, rw, mk, bt, sc, ret, wt, tda, dl, dv, pr, vr, T,
                              beta, gamma, lam, log_clip, is_policy, is_value, target_grad,
                              begin, end);
    });
  });
  return {policy_rows, value_rows, returns, weights, td, dlogp, dvalues};
}
