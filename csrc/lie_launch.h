// Torch-free launchers of the fused LieRA kernels (raw pointers, sizes, strides, a stream).
//
// All work on the (R, M) unfolding of W with u (R, r) and p (r, M), fp32 math:
//   forward:  out = W + W * expm1_K(scale * u@p)              (out contiguous)
//   backward: t = g * W * exp_{K-1}(scale * u@p)
//             du = scale * t @ p^T,  dp = scale * u^T @ t,  dw = g * exp_K(...) if dw
// Backward partials go to workspace buffers and are summed in a fixed order,
// so the gradients are deterministic. Return false for an unsupported order.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace lie {

enum class DType { kF32, kF16, kBF16 };

struct Strides2 { int64_t r, c; };

struct LieProblem {
  int64_t R, M, r;
  const void* w; Strides2 sw;
  const void* u; Strides2 su;
  const void* p; Strides2 sp;
  float scale;
  int order;  // kExact (-1) or 0..kMaxOrder
  DType dtype;
};

// Floats of workspace the backward needs (du and dp partials).
int64_t backward_workspace(const LieProblem& pb);

bool launch_forward(const LieProblem& pb, void* out, cudaStream_t stream);

// g: grad with strides sg; du (R, r) and dp (r, M) are written in W's dtype (contiguous);
// dw (contiguous, W's dtype) is written when non-null; ws: backward_workspace floats.
bool launch_backward(const LieProblem& pb, const void* g, Strides2 sg, void* du, void* dp,
                     void* dw, float* ws, cudaStream_t stream);

}  // namespace lie
