// The native CPU ops of dqo_kernels, registered with torch's dispatcher as
// torch.ops.dqo_kernels.*: the only file the build compiles.
//
// One translation unit, not one per op, and no torch/extension.h (pybind11 and the whole C++
// frontend): parsing headers is nearly all of the compile time, minutes per file on a busy
// machine, so each .cpp compiled on its own would pay it again. The ops stay in their own files
// for reading; native.py hashes every file of csrc/ into the build flags so that an edit of an
// included file still rebuilds.
#include <torch/library.h>

#include "dqo_scan.cpp"
#include "logprobs.cpp"

// Schemas are inferred from the signatures (Tensor, Tensor?, float, int, bool, ScalarType).
TORCH_LIBRARY(dqo_kernels, m) {
  m.def("dqo_scan_forward", &dqo_scan_forward);  // fused DQO loss forward + gradients
  m.def("lse_forward", &lse_forward);            // row logsumexp, target logit, E[z] of a slice
  m.def("logits_grad", &logits_grad);            // g (onehot - softmax) / T of a slice (+ entropy)
  m.def("empty_huge", &empty_huge);              // uninitialised tensor on transparent huge pages
}
