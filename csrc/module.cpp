// The C interface of dqo_kernels' native CPU ops, built by dqo_kernels/_native/build.py and
// loaded by dqo_kernels/_native/load.py with ctypes: the only file the build compiles (the
// kernels are included, one translation unit).
//
// Callers pass contiguous CPU buffers (row-strided logits aside) that their launchers have
// checked; every function returns 0, or a nonzero status that load.py turns into an exception
// (no C++ exception crosses this boundary). Structs passed by pointer (dqo_loss.cpp's DqoHyper
// and DqoLossTensors) are mirrored by ctypes Structures in load.py, which checks their sizes.
#include <cstdint>

#include "common.h"
#include "dqo_loss.cpp"
#include "logprobs.cpp"

namespace {

constexpr int kOk = 0, kBadDtype = 1, kFailed = 2, kDataCheck = 3;

template <typename F>
int guarded(F fn) {
  try {
    return fn();
  } catch (...) {  // std::bad_alloc for a row buffer, mostly
    return kFailed;
  }
}

}  // namespace

extern "C" {

// Bumped whenever a signature or a struct below changes; load.py refuses a library of another
// version.
int dqo_abi_version() { return 4; }

// The size of the struct load.py mirrors as _STRUCTS[which] (-1: no such struct).
int dqo_struct_size(int which) {
  switch (which) {
    case 0:
      return static_cast<int>(sizeof(dqo::DqoHyper));
    case 1:
      return static_cast<int>(sizeof(dqo::DqoLossTensors));
    default:
      return -1;
  }
}

// The fused DQO loss of [B, T] buffers of the compute dtype `dtype` (fp32 or fp64): forward
// values, per-row and summed losses, closed-form gradients (dqo_loss.cpp).
// kDataCheck: done, and a row may fail the data checks (dqo_loss.cpp).
int dqo_loss_forward(int dtype, const dqo::DqoLossTensors* tensors, const dqo::DqoHyper* hyper,
                     int64_t B, int64_t T, int threads, int64_t min_work) {
  return guarded([&] {
    bool flagged;
    if (dtype == dqo::kFloat32) {
      flagged = dqo::dqo_loss<float>(*tensors, *hyper, B, T, threads, min_work);
    } else if (dtype == dqo::kFloat64) {
      flagged = dqo::dqo_loss<double>(*tensors, *hyper, B, T, threads, min_work);
    } else {
      return kBadDtype;
    }
    return flagged ? kDataCheck : kOk;
  });
}

// lse, zt, ez: [N] in the compute dtype (fp64 for fp64 logits, else fp32); ez may be null.
int dqo_lse_forward(int dtype, const void* logits, int64_t stride, const int64_t* targets,
                    int64_t N, int64_t V, int64_t v0, double inv_temp, void* lse, void* zt,
                    void* ez, int threads, int64_t min_work) {
  return guarded([&] {
    switch (dtype) {
      case dqo::kFloat32:
        dqo::lse_forward<float>(logits, stride, targets, N, V, v0, inv_temp, lse, zt, ez,
                                threads, min_work);
        return kOk;
      case dqo::kFloat64:
        dqo::lse_forward<double>(logits, stride, targets, N, V, v0, inv_temp, lse, zt, ez,
                                 threads, min_work);
        return kOk;
      case dqo::kFloat16:
        dqo::lse_forward<dqo::f16>(logits, stride, targets, N, V, v0, inv_temp, lse, zt, ez,
                                   threads, min_work);
        return kOk;
      case dqo::kBFloat16:
        dqo::lse_forward<dqo::bf16>(logits, stride, targets, N, V, v0, inv_temp, lse, zt, ez,
                                    threads, min_work);
        return kOk;
      default:
        return kBadDtype;
    }
  });
}

// out: [N, V] rows of out_stride, of the logits' dtype or the compute dtype; it may be the
// logits themselves. grad_ent and entropy are both null or both given.
int dqo_logits_grad(int dtype, const void* logits, int64_t stride, const int64_t* targets,
                    const void* lse, const void* grad, const void* grad_ent,
                    const void* entropy, int64_t N, int64_t V, int64_t v0, double inv_temp,
                    int out_dtype, void* out, int64_t out_stride, int threads,
                    int64_t min_work) {
  return guarded([&] {
#define DQO_GRAD(scalar_t, out_t)                                                          \
  dqo::logits_grad<scalar_t, out_t>(logits, stride, targets, lse, grad, grad_ent, entropy, N, \
                                    V, v0, inv_temp, out, out_stride, threads, min_work)
    if (dtype == dqo::kFloat32 && out_dtype == dqo::kFloat32) {
      DQO_GRAD(float, float);
    } else if (dtype == dqo::kFloat64 && out_dtype == dqo::kFloat64) {
      DQO_GRAD(double, double);
    } else if (dtype == dqo::kFloat16 && out_dtype == dqo::kFloat16) {
      DQO_GRAD(dqo::f16, dqo::f16);
    } else if (dtype == dqo::kFloat16 && out_dtype == dqo::kFloat32) {
      DQO_GRAD(dqo::f16, float);
    } else if (dtype == dqo::kBFloat16 && out_dtype == dqo::kBFloat16) {
      DQO_GRAD(dqo::bf16, dqo::bf16);
    } else if (dtype == dqo::kBFloat16 && out_dtype == dqo::kFloat32) {
      DQO_GRAD(dqo::bf16, float);
    } else {
      return kBadDtype;
    }
#undef DQO_GRAD
    return kOk;
  });
}

}  // extern "C"
