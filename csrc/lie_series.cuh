// The truncated exponential series, shared by the CUDA kernels and a host build.
//
//   exp_K(y)   = sum_{k=0..K} y^k / k!     (K = kExact: the exact exp)
//   expm1_K(y) = exp_K(y) - 1,  d/dy exp_K = exp_{K-1}
//
// Horner on the nesting of lie_kernels/series.py:
//   S_m(y) = 1 + y/m (1 + y/(m+1) ( ... (1 + y/K))),  exp_K = S_1,  expm1_K = y S_2
#pragma once
#include <cmath>
#include <type_traits>

#ifdef __CUDACC__
#define LIE_HD __host__ __device__ __forceinline__
#else
#define LIE_HD inline
#endif

namespace lie {

constexpr int kExact = -1;
constexpr int kMaxOrder = 8;

// S_M(y) for ORDER >= M, innermost term first.
template <int ORDER, int M>
LIE_HD float nested(float y) {
  float s = 1.0f + y * (1.0f / ORDER);
#pragma unroll
  for (int k = ORDER - 1; k >= M; --k) s = 1.0f + y * s * (1.0f / k);
  return s;
}

template <int ORDER>
LIE_HD float exp_series(float y) {
  if constexpr (ORDER == kExact) return expf(y);
  else if constexpr (ORDER == 0) return 1.0f;
  else return nested<ORDER, 1>(y);
}

template <int ORDER>
LIE_HD float expm1_series(float y) {
  if constexpr (ORDER == kExact) return expm1f(y);
  else if constexpr (ORDER == 0) return 0.0f;
  else if constexpr (ORDER == 1) return y;
  else return y * nested<ORDER, 2>(y);
}

// d/dy exp_K(y) = exp_{K-1}(y); the exact exp is its own derivative.
template <int ORDER>
LIE_HD float dexp_series(float y) {
  if constexpr (ORDER == kExact) return expf(y);
  else if constexpr (ORDER == 0) return 0.0f;
  else return exp_series<ORDER - 1>(y);
}

// W' = W + W * e with e = expm1_K(y), and exactly W where e == 0: an infinite W stays
// itself at Delta = 0 (inf + inf * 0 would be NaN), at every order.
LIE_HD float lie_apply(float w, float e) { return e == 0.0f ? w : fmaf(w, e, w); }

// Calls f(std::integral_constant<int, K>) for the runtime order (kExact, 0..kMaxOrder).
template <typename F>
inline bool dispatch_order(int order, F&& f) {
  switch (order) {
#define LIE_CASE(K) case K: f(std::integral_constant<int, K>{}); return true;
    LIE_CASE(-1) LIE_CASE(0) LIE_CASE(1) LIE_CASE(2) LIE_CASE(3) LIE_CASE(4)
    LIE_CASE(5) LIE_CASE(6) LIE_CASE(7) LIE_CASE(8)
#undef LIE_CASE
    default: return false;
  }
}

}  // namespace lie
