// Native CPU kernels of the two log-prob launchers (the math: dqo_kernels/logprobs.py; the
// definitions they are tested against: dqo_kernels/logprobs_reference.py).
//
//   lse_forward:  lse_n = logsumexp_j z_nj,  zt_n = z_{n,y_n - v0} (0 if y_n is outside this
//                 column slice),  ez_n = sum_j softmax(z_n)_j z_nj,  with z = logits / T.
//   logits_grad:  dz_nj = g_n (onehot_j(y_n - v0) - p_nj) - g^H_n p_nj (z_nj - (lse_n - H_n)),
//                 dlogits = dz / T,  p = exp(z - lse).
//
// Rows are independent: at::parallel_for over rows, and inside a row vectorised passes over the
// vocabulary (at::vec, Sleef's exp with 1-ulp error when built for AVX2). A row is first
// converted to the compute dtype (fp32, fp64 for fp64) in a per-thread buffer, so that fp16 and
// bf16 logits are read once and the passes after the first run from cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include <sys/mman.h>

#include "ops.h"

namespace {

using at::vec::Vectorized;

// The row of ``src`` as acc_t: a pointer into src itself when it already is acc_t.
template <typename scalar_t, typename acc_t>
const acc_t* row_as_acc(const scalar_t* src, int64_t V, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    buf.resize(V);
    at::vec::convert(src, buf.data(), V);
    return buf.data();
  }
}

template <typename acc_t>
acc_t row_max(const acc_t* z, int64_t V) {
  using Vec = Vectorized<acc_t>;
  Vec vm(-std::numeric_limits<acc_t>::infinity());
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(z + j));
  acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                           vm);
  for (; j < V; ++j) m = std::max(m, z[j]);
  return m;
}

template <typename scalar_t, typename acc_t>
void lse_rows(const scalar_t* logits, int64_t stride, const int64_t* targets, int64_t V,
              int64_t v0, acc_t inv_temp, acc_t* lse, acc_t* zt, acc_t* ez, int64_t begin,
              int64_t end) {
  using Vec = Vectorized<acc_t>;
  std::vector<acc_t> buf;
  const Vec vit(inv_temp), vzero(0);
  for (int64_t n = begin; n < end; ++n) {
    const acc_t* x = row_as_acc<scalar_t, acc_t>(logits + n * stride, V, buf);
    acc_t m = row_max(x, V) * inv_temp;
    if (!std::isfinite(m)) m = 0;  // a row of -inf: keep exp() finite (lse = -inf)
    const Vec vm(m);
    Vec vs(0), vez(0);
    int64_t j = 0;
    for (; j + Vec::size() <= V; j += Vec::size()) {
      const Vec z = Vec::loadu(x + j) * vit;
      const Vec e = (z - vm).exp();
      vs = vs + e;
      if (ez) vez = vez + e * Vec::blendv(vzero, z, e > vzero);  // 0 * -inf is 0 here
    }
    acc_t s = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), vs);
    acc_t sez = ez ? at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), vez) : acc_t(0);
    for (; j < V; ++j) {
      const acc_t z = x[j] * inv_temp, e = std::exp(z - m);
      s += e;
      if (ez && e > 0) sez += e * z;
    }
    lse[n] = m + std::log(s);
    const int64_t y = targets[n] - v0;
    zt[n] = (y >= 0 && y < V) ? x[y] * inv_temp : acc_t(0);
    if (ez) ez[n] = sez / s;
  }
}

template <typename scalar_t, typename out_t, typename acc_t>
void grad_rows(const scalar_t* logits, int64_t stride, const int64_t* targets, const acc_t* lse,
               const acc_t* grad, const acc_t* grad_ent, const acc_t* entropy, int64_t V,
               int64_t v0, acc_t inv_temp, out_t* out, int64_t out_stride, int64_t begin,
               int64_t end) {
  using Vec = Vectorized<acc_t>;
  std::vector<acc_t> buf, dbuf;
  const Vec vit(inv_temp), vzero(0);
  for (int64_t n = begin; n < end; ++n) {
    const acc_t* x = row_as_acc<scalar_t, acc_t>(logits + n * stride, V, buf);
    acc_t* d;  // the gradient row in acc_t: straight into out when out is acc_t
    if constexpr (std::is_same_v<out_t, acc_t>) {
      d = out + n * out_stride;  // may alias x (in-place backward): read before write below
    } else {
      dbuf.resize(V);
      d = dbuf.data();
    }
    const acc_t l = lse[n], g = grad[n];
    const acc_t gh = grad_ent ? grad_ent[n] : acc_t(0);
    const acc_t mean_z = grad_ent ? l - entropy[n] : acc_t(0);  // E_p[z] = lse - H
    const Vec vl(l), vng(-g), vgh(gh), vmean(mean_z);
    int64_t j = 0;
    for (; j + Vec::size() <= V; j += Vec::size()) {
      const Vec z = Vec::loadu(x + j) * vit;
      const Vec p = (z - vl).exp();
      Vec dz = p * vng;
      if (grad_ent) dz = dz - Vec::blendv(vzero, p * (z - vmean), p > vzero) * vgh;
      (dz * vit).store(d + j);
    }
    for (; j < V; ++j) {
      const acc_t z = x[j] * inv_temp, p = std::exp(z - l);
      acc_t dz = -g * p;
      if (grad_ent && p > 0) dz -= gh * p * (z - mean_z);
      d[j] = dz * inv_temp;
    }
    const int64_t y = targets[n] - v0;
    if (y >= 0 && y < V) d[y] += g * inv_temp;
    if constexpr (!std::is_same_v<out_t, acc_t>) {
      at::vec::convert(d, out + n * out_stride, V);
    }
  }
}

// posix_memalign'd storage, freed with free().
void free_aligned(void* p) { std::free(p); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1,
              name, ": expected a CPU [N, V] tensor with unit column stride, got sizes ",
              t.sizes(), " strides ", t.strides());
}

}  // namespace

std::vector<at::Tensor> lse_forward(at::Tensor logits, at::Tensor targets, int64_t v0,
                                       double inv_temp, bool want_ez) {
  check_rows(logits, "logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  targets = targets.to(at::kLong).contiguous();
  auto opts = logits.options().dtype(acc);
  auto lse = at::empty({N}, opts), zt = at::empty({N}, opts);
  auto ez = at::empty({want_ez ? N : 0}, opts);  // a list of tensors holds no undefined one
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lse_forward",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* y = targets.data_ptr<int64_t>();
    acc_t *l = lse.data_ptr<acc_t>(), *t = zt.data_ptr<acc_t>();
    acc_t* e = want_ez ? ez.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      lse_rows<scalar_t, acc_t>(x, logits.stride(0), y, V, v0, static_cast<acc_t>(inv_temp), l,
                                t, e, begin, end);
    });
  });
  return {lse, zt, ez};
}

at::Tensor logits_grad(at::Tensor logits, at::Tensor targets, at::Tensor lse,
                          at::Tensor grad, int64_t v0, double inv_temp, at::Tensor out,
                          c10::optional<at::Tensor> grad_ent,
                          c10::optional<at::Tensor> entropy) {
  check_rows(logits, "logits");
  check_rows(out, "out");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(out.sizes() == logits.sizes(), "out: expected sizes ", logits.sizes(), ", got ",
              out.sizes());
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool has_ent = grad_ent.has_value() && grad_ent->defined();
  targets = targets.to(at::kLong).contiguous();
  lse = lse.to(acc).contiguous();
  grad = grad.to(acc).contiguous();
  at::Tensor ge, ent;
  if (has_ent) {
    ge = grad_ent->to(acc).contiguous();
    ent = entropy.value().to(acc).contiguous();
  }
  TORCH_CHECK(out.scalar_type() == logits.scalar_type() || out.scalar_type() == acc,
              "out: expected dtype ", logits.scalar_type(), " or ", acc, ", got ",
              out.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logits_grad",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* y = targets.data_ptr<int64_t>();
    const acc_t *l = lse.data_ptr<acc_t>(), *g = grad.data_ptr<acc_t>();
    const acc_t* gh = has_ent ? ge.data_ptr<acc_t>() : nullptr;
    const acc_t* h = has_ent ? ent.data_ptr<acc_t>() : nullptr;
    const acc_t it = static_cast<acc_t>(inv_temp);
    if (out.scalar_type() == acc) {
      acc_t* o = out.data_ptr<acc_t>();
      at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
        grad_rows<scalar_t, acc_t, acc_t>(x, logits.stride(0), y, l, g, gh, h, V, v0, it, o,
                                          out.stride(0), begin, end);
      });
    } else {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
        grad_rows<scalar_t, scalar_t, acc_t>(x, logits.stride(0), y, l, g, gh, h, V, v0, it, o,
                                             out.stride(0), begin, end);
      });
    }
  });
  return out;
}

at::Tensor empty_huge(at::IntArrayRef sizes, at::ScalarType dtype) {
  // A fresh multi-MB buffer costs a page fault and a kernel zero-fill per 4 KiB page on first
  // write, which took longer than the softmax gradient itself (benchmarks/NOTES.md). Huge pages
  // (2 MiB) cut the faults 512-fold where THP is in "madvise" mode, as torch's own
  // THP_MEM_ALLOC_ENABLE=1 does for every tensor.
  const auto opts = at::TensorOptions().dtype(dtype);
  int64_t numel = 1;
  for (auto n : sizes) numel *= n;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < 2 * kHuge) return at::empty(sizes, opts);
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, rounded) != 0) return at::empty(sizes, opts);
#ifdef MADV_HUGEPAGE
  madvise(p, rounded, MADV_HUGEPAGE);  // advice only: without THP it changes nothing
#endif
  return at::from_blob(p, sizes, free_aligned, opts);
}
