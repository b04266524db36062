// Host build of lie_series.cuh: prints "order x exp_K expm1_K dexp_K" for every order
// and a grid of x, so tests/test_cuda.py can compare it with a float64 reference.
#include <cstdio>

#include "lie_series.cuh"

int main() {
  for (int order = lie::kExact; order <= lie::kMaxOrder; ++order) {
    lie::dispatch_order(order, [&](auto k) {
      constexpr int K = decltype(k)::value;
      for (int i = 0; i <= 60; ++i) {
        const float x = -3.0f + 0.1f * i;
        std::printf("%d %.9g %.9g %.9g %.9g\n", K, x, lie::exp_series<K>(x),
                    lie::expm1_series<K>(x), lie::dexp_series<K>(x));
      }
    });
  }
  return 0;
}
