// Torch binding of the fused LieRA kernels: checks, stream, device guard, op registry.
//
// Ops (namespace lie_kernels_cuda):
//   forward(weight, u, p, order, scale) -> W'                         (CUDA)
//   backward(grad, weight, u, p, order, scale, need_dw) -> (dw, du, dp); dw is empty
//     when not asked for; du/dp come back in u's/p's dtypes           (CUDA)
//   backward_splits(R, M, r, dtype) -> [col_splits, row_splits, workspace floats]
//     the backward's fixed reduction splits (host only, no device needed)
// weight/grad may be any 2-D-viewable strided tensors; u and p have W's dtype or, for a
// 16-bit W, fp32; the kernels read them as fp32 (up-cast here: they are tiny).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "lie_launch.h"
#include "lie_series.cuh"  // kMaxOrder (plain C++ outside nvcc)

namespace {

lie::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return lie::DType::kF32;
    case at::kHalf: return lie::DType::kF16;
    case at::kBFloat16: return lie::DType::kBF16;
    default: TORCH_CHECK(false, "weight dtype must be float32, float16 or bfloat16, got ", t);
  }
}

at::Tensor as_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2, name, " must have at least 2 dims, got ", t.sizes());
  return t.reshape({t.size(0), -1});  // a view when the strides allow, else a copy
}

// u or p as the kernels read it: fp32, contiguous.
at::Tensor factor_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

lie::LieProblem problem(const at::Tensor& w2, const at::Tensor& u, const at::Tensor& p,
                        const at::Tensor& u32, const at::Tensor& p32, int64_t order,
                        double scale) {
  TORCH_CHECK(w2.is_cuda(), "weight must be a CUDA tensor, got ", w2.device());
  for (auto [name, t] : {std::pair{"u", &u}, std::pair{"p", &p}}) {
    TORCH_CHECK(t->device() == w2.device(), name, " must be on ", w2.device(), ", got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == w2.scalar_type() || t->scalar_type() == at::kFloat,
                name, " must have dtype ", w2.scalar_type(), " or float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 2, name, " must be 2-D, got ", t->sizes());
  }
  TORCH_CHECK(u.size(0) == w2.size(0) && p.size(0) == u.size(1) && p.size(1) == w2.size(1),
              "expected u (", w2.size(0), ", r) and p (r, ", w2.size(1), "), got u ",
              u.sizes(), " and p ", p.sizes());
  TORCH_CHECK(u.size(1) >= 1 && u.size(1) <= lie::kMaxRank, "rank must be 1..",
              lie::kMaxRank, ", got ", u.size(1));
  TORCH_CHECK(order >= -1 && order <= lie::kMaxOrder, "order must be -1 (exact) or 0..",
              lie::kMaxOrder, ", got ", order);
  return {w2.size(0), w2.size(1), u.size(1),
          w2.data_ptr(), {w2.stride(0), w2.stride(1)},
          u32.data_ptr<float>(), p32.data_ptr<float>(),
          float(scale), int(order), dtype_of(w2.scalar_type())};
}

at::Tensor forward(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& p,
                   int64_t order, double scale) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w2 = as_2d(weight, "weight");
  const at::Tensor u32 = factor_f32(u), p32 = factor_f32(p);
  const auto pb = problem(w2, u, p, u32, p32, order, scale);
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  TORCH_CHECK(lie::launch_forward(pb, out.data_ptr(), at::cuda::getCurrentCUDAStream()),
              "lie_kernels_cuda.forward: unsupported order ", order);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u,
    const at::Tensor& p, int64_t order, double scale, bool need_dw) {
  const c10::cuda::CUDAGuard guard(weight.device());
  TORCH_CHECK(grad.sizes() == weight.sizes() && grad.scalar_type() == weight.scalar_type() &&
              grad.device() == weight.device(), "grad must match weight's shape, dtype and "
              "device: expected ", weight.sizes(), " ", weight.scalar_type(), ", got ",
              grad.sizes(), " ", grad.scalar_type());
  const at::Tensor w2 = as_2d(weight, "weight"), g2 = as_2d(grad, "grad");
  const at::Tensor u32 = factor_f32(u), p32 = factor_f32(p);
  const auto pb = problem(w2, u, p, u32, p32, order, scale);
  at::Tensor du = at::empty(u.sizes(), u.options()), dp = at::empty(p.sizes(), p.options());
  at::Tensor dw = need_dw ? at::empty(weight.sizes(), weight.options())
                          : at::empty({0}, weight.options());
  at::Tensor ws = at::empty({lie::backward_workspace(pb)}, weight.options().dtype(at::kFloat));
  TORCH_CHECK(lie::launch_backward(pb, g2.data_ptr(), {g2.stride(0), g2.stride(1)},
                                   {du.data_ptr(), du.scalar_type() == at::kFloat},
                                   {dp.data_ptr(), dp.scalar_type() == at::kFloat},
                                   need_dw ? dw.data_ptr() : nullptr, ws.data_ptr<float>(),
                                   at::cuda::getCurrentCUDAStream()),
              "lie_kernels_cuda.backward: unsupported order ", order);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dw, du, dp};
}

std::vector<int64_t> backward_splits(int64_t R, int64_t M, int64_t r, at::ScalarType dtype) {
  TORCH_CHECK(R >= 1 && M >= 1 && r >= 1, "expected R, M, r >= 1, got ", R, ", ", M, ", ", r);
  const lie::DType d = dtype_of(dtype);
  const lie::BackwardSplits s = lie::backward_splits(R, M, r, d);
  lie::LieProblem pb{};
  pb.R = R; pb.M = M; pb.r = r; pb.dtype = d;
  return {s.col_splits, s.row_splits, lie::backward_workspace(pb)};
}

}  // namespace

TORCH_LIBRARY(lie_kernels_cuda, m) {
  m.def("forward(Tensor weight, Tensor u, Tensor p, int order, float scale) -> Tensor");
  m.def("backward(Tensor grad, Tensor weight, Tensor u, Tensor p, int order, float scale, "
        "bool need_dw) -> (Tensor, Tensor, Tensor)");
  m.def("backward_splits(int R, int M, int r, ScalarType dtype) -> int[]", &backward_splits);
}

TORCH_LIBRARY_IMPL(lie_kernels_cuda, CUDA, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
