// The native CPU ops of dqo_kernels, registered as torch.ops.dqo_kernels.* in module.cpp.
#pragma once

// ATen's core headers only, not torch/extension.h (the C++ frontend and pybind11): the ops are
// registered with the dispatcher (module.cpp), and these headers parse several times faster.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

// Rows are independent in every op: at::parallel_for over rows with a grain of ~16k elements,
// which keeps thread start-up amortised on short rows.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1));
}

// csrc/dqo_scan.cpp: the fused DQO loss, forward values and closed-form gradients.
std::vector<at::Tensor> dqo_scan_forward(
    at::Tensor logp, at::Tensor ref_logp, at::Tensor behavior_logp,
    at::Tensor values, at::Tensor rewards, at::Tensor mask,
    c10::optional<at::Tensor> bootstrap, at::Tensor row_scale, double beta, double gamma,
    double lam, double log_clip, bool is_policy, bool is_value, bool target_grad);

// csrc/logprobs.cpp: the two launchers of dqo_kernels/logprobs.py.
std::vector<at::Tensor> lse_forward(at::Tensor logits, at::Tensor targets, int64_t v0,
                                       double inv_temp, bool want_ez);
at::Tensor logits_grad(at::Tensor logits, at::Tensor targets, at::Tensor lse,
                          at::Tensor grad, int64_t v0, double inv_temp, at::Tensor out,
                          c10::optional<at::Tensor> grad_ent,
                          c10::optional<at::Tensor> entropy);
// An uninitialised CPU tensor whose storage is advised to use transparent huge pages.
at::Tensor empty_huge(at::IntArrayRef sizes, at::ScalarType dtype);
