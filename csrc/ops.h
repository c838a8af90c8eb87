// The native CPU ops of dqo_kernels, bound to Python in bindings.cpp.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <vector>

// Rows are independent in every op: at::parallel_for over rows with a grain of ~16k elements,
// which keeps thread start-up amortised on short rows.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1));
}

// csrc/dqo_scan.cpp: the fused DQO loss, forward values and closed-form gradients.
std::vector<torch::Tensor> dqo_scan_forward(
    torch::Tensor logp, torch::Tensor ref_logp, torch::Tensor behavior_logp,
    torch::Tensor values, torch::Tensor rewards, torch::Tensor mask,
    c10::optional<torch::Tensor> bootstrap, torch::Tensor row_scale, double beta, double gamma,
    double lam, double log_clip, bool is_policy, bool is_value, bool target_grad);

// csrc/logprobs.cpp: the two launchers of dqo_kernels/logprobs.py.
std::vector<torch::Tensor> lse_forward(torch::Tensor logits, torch::Tensor targets, int64_t v0,
                                       double inv_temp, bool want_ez);
torch::Tensor logits_grad(torch::Tensor logits, torch::Tensor targets, torch::Tensor lse,
                          torch::Tensor grad, int64_t v0, double inv_temp, torch::Tensor out,
                          c10::optional<torch::Tensor> grad_ent,
                          c10::optional<torch::Tensor> entropy);
// An uninitialised CPU tensor whose storage is advised to use transparent huge pages.
torch::Tensor empty_huge(std::vector<int64_t> sizes, at::ScalarType dtype);
