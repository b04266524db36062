// Host build of lie_series.cuh: prints "order x exp_K expm1_K dexp_K W'(1.5) W'(inf)
// W'(-inf)" (W' = lie_apply(W, expm1_K(x))) for every order and a grid of x including 0,
// so tests/test_cuda.py can compare it with a float64 reference.
#include <cstdio>

#include "lie_series.cuh"

int main() {
  for (int order = lie::kExact; order <= lie::kMaxOrder; ++order) {
    lie::dispatch_order(order, [&](auto k) {
      constexpr int K = decltype(k)::value;
      for (int i = 0; i <= 60; ++i) {
        const float x = i == 30 ? 0.0f : -3.0f + 0.1f * i;
        const float e = lie::expm1_series<K>(x), inf = INFINITY;
        std::printf("%d %.9g %.9g %.9g %.9g %.9g %.9g %.9g\n", K, x, lie::exp_series<K>(x), e,
                    lie::dexp_series<K>(x), lie::lie_apply(1.5f, e), lie::lie_apply(inf, e),
                    lie::lie_apply(-inf, e));
      }
    });
  }
  return 0;
}
