// Fused LieRA kernels: W' = W + W * expm1_K(s * u@p) in one pass, and its backward.
// Torch-free: raw pointers, sizes, strides and a stream (see lie_launch.h).
//
// Tiling: a block owns TC = 128 columns (one per thread, coalesced along the
// contiguous dim) and TR = 16 rows at a time. The u rows of a tile sit in shared
// memory; each thread forms its 16 Delta values with rank-many FMAs, so Delta
// only ever exists in registers. Ranks up to kMaxRank (= 32) are supported.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lie_launch.h"
#include "lie_series.cuh"

namespace lie {
namespace {

constexpr int TC = 128;
constexpr int TR = 16;
constexpr int kMaxRank = 32;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f(float v) { return v; }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f(float v) { return v; }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float at(const void* base, int64_t i) {
  return to_f(static_cast<const T*>(base)[i]);
}

// u rows [row0, row0+TR) x all ranks into shared memory (zeros outside).
template <typename T>
__device__ void load_u_tile(const LieProblem& pb, int64_t row0, float (*us)[kMaxRank]) {
  for (int i = threadIdx.x; i < TR * kMaxRank; i += TC) {
    const int rr = i / kMaxRank, k = i % kMaxRank;
    const int64_t row = row0 + rr;
    us[rr][k] = (row < pb.R && k < pb.r) ? at<T>(pb.u, row * pb.su.r + k * pb.su.c) : 0.0f;
  }
}

// p column `col` (all ranks) into registers.
template <typename T>
__device__ __forceinline__ void load_p_col(const LieProblem& pb, int64_t col,
                                           float (&pc)[kMaxRank]) {
#pragma unroll
  for (int k = 0; k < kMaxRank; ++k)
    pc[k] = (k < pb.r && col < pb.M) ? at<T>(pb.p, k * pb.sp.r + col * pb.sp.c) : 0.0f;
}

// x[i] = (u @ p)[row0 + i, col] for the TR rows of the tile. The rank loop is not
// unrolled and p is read per k (coalesced, cached): fully unrolled, ptxas hoisted all
// 16 x 32 shared-memory u values into registers and spilled.
template <typename T>
__device__ __forceinline__ void delta_rows(const LieProblem& pb, int64_t col,
                                           const float (*us)[kMaxRank], float (&x)[TR]) {
#pragma unroll
  for (int i = 0; i < TR; ++i) x[i] = 0.0f;
  const bool in = col < pb.M;
#pragma unroll 2
  for (int k = 0; k < pb.r; ++k) {
    const float pk = in ? at<T>(pb.p, k * pb.sp.r + col * pb.sp.c) : 0.0f;
#pragma unroll
    for (int i = 0; i < TR; ++i) x[i] = fmaf(us[i][k], pk, x[i]);
  }
}

template <typename T, int ORDER>
__global__ void __launch_bounds__(TC) fwd_kernel(LieProblem pb, T* __restrict__ out) {
  __shared__ float us[TR][kMaxRank];
  const int64_t col = int64_t(blockIdx.x) * TC + threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.y) * TR;
  float x[TR];
  load_u_tile<T>(pb, row0, us);
  __syncthreads();
  delta_rows<T>(pb, col, us, x);
  if (col >= pb.M) return;
#pragma unroll
  for (int i = 0; i < TR; ++i) {
    const int64_t row = row0 + i;
    if (row < pb.R) {
      const float w = at<T>(pb.w, row * pb.sw.r + col * pb.sw.c);
      out[row * pb.M + col] = from_f<T>(w + w * expm1_series<ORDER>(pb.scale * x[i]));
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// One block: TC columns x `tiles` row tiles. dp for its columns accumulates in
// registers over all its rows (stored once into dp_part[blockIdx.y]); du for each
// row tile is reduced over the block's columns (warp shuffles, then the 4 warps in
// shared memory) into du_part[blockIdx.x]. No atomics: fixed-order sums later.
// Min 2 blocks/SM lets ptxas use up to 255 registers: with the default cap of 128
// the order-1 instance spilled 20 bytes (dp and p columns are 64 registers).
template <typename T, int ORDER>
__global__ void __launch_bounds__(TC, 2) bwd_kernel(LieProblem pb, const T* __restrict__ g,
                                                 Strides2 sg, T* __restrict__ dw, int tiles,
                                                 float* __restrict__ du_part,
                                                 float* __restrict__ dp_part) {
  __shared__ float us[TR][kMaxRank];
  __shared__ float red[TC / 32][TR][kMaxRank];
  const int64_t col = int64_t(blockIdx.x) * TC + threadIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float pc[kMaxRank], dp[kMaxRank] = {};
  load_p_col<T>(pb, col, pc);
  for (int tile = 0; tile < tiles; ++tile) {
    const int64_t row0 = (int64_t(blockIdx.y) * tiles + tile) * TR;
    if (row0 >= pb.R) break;
    float x[TR], t[TR];
    __syncthreads();  // us and red are reused across tiles
    load_u_tile<T>(pb, row0, us);
    __syncthreads();
    delta_rows<T>(pb, col, us, x);
#pragma unroll
    for (int i = 0; i < TR; ++i) {
      const int64_t row = row0 + i;
      t[i] = 0.0f;
      if (row < pb.R && col < pb.M) {
        const float y = pb.scale * x[i];
        const float gv = to_f(g[row * sg.r + col * sg.c]);
        const float wv = at<T>(pb.w, row * pb.sw.r + col * pb.sw.c);
        t[i] = gv * wv * dexp_series<ORDER>(y);
        if (dw) dw[row * pb.M + col] = from_f<T>(gv * exp_series<ORDER>(y));
      }
    }
#pragma unroll
    for (int k = 0; k < kMaxRank; ++k) {
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        dp[k] = fmaf(us[i][k], t[i], dp[k]);
        const float s = warp_sum(t[i] * pc[k]);
        if (lane == 0) red[warp][i][k] = s;
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < TR * kMaxRank; j += TC) {
      const int i = j / kMaxRank, k = j % kMaxRank;
      const int64_t row = row0 + i;
      if (row < pb.R && k < pb.r) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < TC / 32; ++w) s += red[w][i][k];
        du_part[(int64_t(blockIdx.x) * pb.R + row) * pb.r + k] = s * pb.scale;
      }
    }
  }
  if (col >= pb.M) return;
#pragma unroll  // constant indices keep dp in registers (a runtime bound would spill it)
  for (int k = 0; k < kMaxRank; ++k)
    if (k < pb.r) dp_part[(int64_t(blockIdx.y) * pb.r + k) * pb.M + col] = dp[k] * pb.scale;
}

// out[i] = sum_j part[j * n + i], j in order: the deterministic reduction of partials.
template <typename T>
__global__ void sum_parts_kernel(const float* __restrict__ part, int64_t parts, int64_t n,
                                 T* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int64_t j = 0; j < parts; ++j) s += part[j * n + i];
    out[i] = from_f<T>(s);
  }
}

struct BwdGrid { int64_t col_blocks, row_blocks; int tiles; };

BwdGrid bwd_grid(const LieProblem& pb) {
  const int64_t col_blocks = (pb.M + TC - 1) / TC, row_tiles = (pb.R + TR - 1) / TR;
  // about 1024 blocks in flight; each block walks `tiles` row tiles
  int64_t row_blocks = (1024 + col_blocks - 1) / col_blocks;
  row_blocks = row_blocks < row_tiles ? row_blocks : row_tiles;
  const int tiles = int((row_tiles + row_blocks - 1) / row_blocks);
  return {col_blocks, (row_tiles + tiles - 1) / tiles, tiles};
}

template <typename F>
bool dispatch(const LieProblem& pb, F&& f) {
  if (pb.r < 1 || pb.r > kMaxRank) return false;
  return dispatch_order(pb.order, [&](auto order) {
    switch (pb.dtype) {
      case DType::kF32: f(float{}, order); break;
      case DType::kF16: f(__half{}, order); break;
      case DType::kBF16: f(__nv_bfloat16{}, order); break;
    }
  });
}

}  // namespace

int64_t backward_workspace(const LieProblem& pb) {
  const BwdGrid gr = bwd_grid(pb);
  return gr.col_blocks * pb.R * pb.r + gr.row_blocks * pb.r * pb.M;
}

bool launch_forward(const LieProblem& pb, void* out, cudaStream_t stream) {
  const dim3 grid((pb.M + TC - 1) / TC, (pb.R + TR - 1) / TR);
  return dispatch(pb, [&](auto t, auto order) {
    using T = decltype(t);
    fwd_kernel<T, decltype(order)::value><<<grid, TC, 0, stream>>>(pb, static_cast<T*>(out));
  });
}

bool launch_backward(const LieProblem& pb, const void* g, Strides2 sg, void* du, void* dp,
                     void* dw, float* ws, cudaStream_t stream) {
  const BwdGrid gr = bwd_grid(pb);
  float* du_part = ws;
  float* dp_part = ws + gr.col_blocks * pb.R * pb.r;
  return dispatch(pb, [&](auto t, auto order) {
    using T = decltype(t);
    bwd_kernel<T, decltype(order)::value>
        <<<dim3(gr.col_blocks, gr.row_blocks), TC, 0, stream>>>(
            pb, static_cast<const T*>(g), sg, static_cast<T*>(dw), gr.tiles, du_part, dp_part);
    sum_parts_kernel<T><<<256, 256, 0, stream>>>(du_part, gr.col_blocks, pb.R * pb.r,
                                                 static_cast<T*>(du));
    sum_parts_kernel<T><<<256, 256, 0, stream>>>(dp_part, gr.row_blocks, pb.r * pb.M,
                                                 static_cast<T*>(dp));
  });
}

}  // namespace lie
