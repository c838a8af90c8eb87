// The C++ kernel of fused_dqo_loss alone, in ns a token: no Python, no autograd, one thread.
// For work on csrc/dqo_loss.cpp (run it under `perf record` to see where a change goes):
//
//   c++ -O3 -std=c++17 -ffp-contract=fast -fno-trapping-math -mavx2 -mfma -mf16c -pthread \
//       -Wno-psabi -Icsrc benchmarks/dqo_loss_kernel.cpp -o /tmp/dqo_loss_kernel \
//       && /tmp/dqo_loss_kernel
//
// (the flags of dqo_kernels/_native/build.py's AVX2 build). Arguments: B T [check=1] [lam=0.95].
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "common.h"
#include "dqo_loss.cpp"

int main(int argc, char** argv) {
  const int64_t B = argc > 1 ? std::atoll(argv[1]) : 2, T = argc > 2 ? std::atoll(argv[2]) : 32768;
  const int check = argc > 3 ? std::atoi(argv[3]) : 1;
  const double lam = argc > 4 ? std::atof(argv[4]) : 0.95;
  const int64_t N = B * T;
  std::vector<float> lp(N), rf(N), v(N), r(N, 0.f), out(5 * N), rows(2 * B), loss(2);
  std::vector<uint8_t> m(N, 1);
  for (int64_t i = 0; i < N; ++i) {
    lp[i] = -1.f - static_cast<float>(i % 7) * 0.1f;
    rf[i] = -1.2f;
    v[i] = static_cast<float>(i % 13) * 0.1f;
    m[i] = i % T >= T / 8;  // a prompt, then the response
  }
  dqo::DqoLossTensors t{};
  t.logp = lp.data();
  t.ref_logp = t.behavior_logp = rf.data();
  t.values = v.data();
  t.rewards = r.data();
  t.mask = m.data();
  t.returns = out.data();
  t.weights = out.data() + N;
  t.td_error = out.data() + 2 * N;
  t.dlogp = out.data() + 3 * N;
  t.dvalues = out.data() + 4 * N;
  t.policy_rows = rows.data();
  t.value_rows = rows.data() + B;
  t.policy_loss = loss.data();
  t.value_loss = loss.data() + 1;
  dqo::DqoHyper h{};  // token-mean, bootstrap 0, row scale from the mask
  h.beta = 0.1;
  h.lam = lam;
  h.gamma = 1.0;
  h.log_clip = 0.0;
  h.logprob_tol = 1e-3;
  h.log_limit = 88.7;
  h.is_policy = h.is_value = 1;
  h.check = check;
  const int reps = static_cast<int>(std::max<int64_t>(1, 20000000 / N));
  for (int round = 0; round < 3; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < reps; ++k) dqo::dqo_loss<float>(t, h, B, T, 1, 1 << 30);
    const double ns = std::chrono::duration<double, std::nano>(
        std::chrono::steady_clock::now() - t0).count() / reps;
    std::printf("[%lld, %lld] check=%d: %.1f us a call, %.2f ns a token\n",
                static_cast<long long>(B), static_cast<long long>(T), check, ns / 1e3, ns / N);
  }
}
