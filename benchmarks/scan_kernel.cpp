// The C++ kernel of fused_dqo_loss alone, in ns a token: no Python, no autograd, one thread.
// For work on csrc/dqo_scan.cpp (run it under `perf record` to see where a change goes):
//
//   c++ -O3 -std=c++17 -ffp-contract=fast -fno-trapping-math -mavx2 -mfma -mf16c -pthread \
//       -Wno-psabi -Icsrc benchmarks/scan_kernel.cpp -o /tmp/scan_kernel && /tmp/scan_kernel
//
// (the flags of dqo_kernels/native.py's AVX2 build). Arguments: B T [check=1] [lam=0.95].
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "common.h"
#include "dqo_scan.cpp"

int main(int argc, char** argv) {
  const int64_t B = argc > 1 ? std::atoll(argv[1]) : 2, T = argc > 2 ? std::atoll(argv[2]) : 32768;
  const int check = argc > 3 ? std::atoi(argv[3]) : 1;
  const double lam = argc > 4 ? std::atof(argv[4]) : 0.95;
  const int64_t N = B * T;
  std::vector<float> lp(N), rf(N), v(N), r(N, 0.f), out(5 * N), loss(2);
  std::vector<uint8_t> m(N, 1);
  for (int64_t i = 0; i < N; ++i) {
    lp[i] = -1.f - static_cast<float>(i % 7) * 0.1f;
    rf[i] = -1.2f;
    v[i] = static_cast<float>(i % 13) * 0.1f;
    m[i] = i % T >= T / 8;  // a prompt, then the response
  }
  const void* in[7] = {lp.data(), rf.data(), rf.data(), v.data(), r.data(), m.data(), nullptr};
  void* o[7] = {out.data(), out.data() + N, out.data() + 2 * N, out.data() + 3 * N,
                out.data() + 4 * N, loss.data(), loss.data() + 1};
  double hyper[7] = {0.1, 1.0, lam, 0.0, 1e-3, 88.7, 0.0};
  int flags[5] = {1, 1, 0, check, 0};
  const int reps = static_cast<int>(std::max<int64_t>(1, 20000000 / N));
  for (int round = 0; round < 3; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < reps; ++k) dqo::dqo_scan<float>(in, o, B, T, hyper, flags, 1, 1 << 30);
    const double ns = std::chrono::duration<double, std::nano>(
        std::chrono::steady_clock::now() - t0).count() / reps;
    std::printf("[%lld, %lld] check=%d: %.1f us a call, %.2f ns a token\n",
                static_cast<long long>(B), static_cast<long long>(T), check, ns / 1e3, ns / N);
  }
}
