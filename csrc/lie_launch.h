// Torch-free launchers of the fused LieRA kernels (raw pointers, sizes, strides, a stream).
//
// All work on the (R, M) unfolding of W with u (R, r) and p (r, M), fp32 math:
//   forward:  out = W + W * expm1_K(scale * u@p)              (out contiguous)
//   backward: t = g * W * exp_{K-1}(scale * u@p)
//             du = scale * t @ p^T,  dp = scale * u^T @ t,  dw = g * exp_K(...) if dw
// u and p are fp32 and contiguous (the binding up-casts them: they are tiny). Backward
// partials go to a workspace with fixed split counts that depend on the shape only, and
// are summed in a fixed order, so the gradients are bitwise reproducible on any GPU.
// Offsets are int64 throughout. Return false for an unsupported order or rank.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace lie {

enum class DType { kF32, kF16, kBF16 };

constexpr int kMaxRank = 32;

struct Strides2 { int64_t r, c; };

struct LieProblem {
  int64_t R, M, r;
  const void* w; Strides2 sw;  // W's dtype, any strides
  const float* u;              // (R, r) contiguous
  const float* p;              // (r, M) contiguous
  float scale;
  int order;  // kExact (-1) or 0..kMaxOrder
  DType dtype;
};

// Fixed reduction splits of the backward: col_splits blocks share each du row, row_splits
// blocks each dp column. Partials take 4 * r * (col_splits * R + row_splits * M) bytes:
// at most 1/8 of W's bytes whenever R and M are >= 64 * r / sizeof(W element).
struct BackwardSplits { int64_t col_splits, row_splits; };
BackwardSplits backward_splits(int64_t R, int64_t M, int64_t r, DType dtype);

// Floats of workspace the backward needs (du and dp partials).
int64_t backward_workspace(const LieProblem& pb);

bool launch_forward(const LieProblem& pb, void* out, cudaStream_t stream);

// Where the backward writes a factor's gradient: contiguous, fp32 or W's dtype.
struct GradOut { void* ptr; bool f32; };

// g: grad with strides sg; du (R, r) and dp (r, M) contiguous; dw (contiguous, W's
// dtype) is written when non-null; ws: backward_workspace floats.
bool launch_backward(const LieProblem& pb, const void* g, Strides2 sg, GradOut du, GradOut dp,
                     void* dw, float* ws, cudaStream_t stream);

}  // namespace lie
