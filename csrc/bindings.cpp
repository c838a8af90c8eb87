// Python bindings of the native CPU ops (built by dqo_kernels/native.py).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dqo_scan_forward", &dqo_scan_forward, "Fused DQO loss forward + gradients (CPU)");
  m.def("lse_forward", &lse_forward, "Row logsumexp, target logit and E[z] of a logits slice");
  m.def("empty_huge", &empty_huge, "Uninitialised CPU tensor on transparent huge pages");
  m.def("logits_grad", &logits_grad, "g (onehot - softmax) / T of a logits slice (+ entropy)");
}
