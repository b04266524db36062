// Fused LieRA kernels: W' = W + W * expm1_K(s * u@p) in one pass, and its backward.
// Torch-free: raw pointers, sizes, strides and a stream (see lie_launch.h).
//
// Occupancy: the forward is capped at 80 registers (3 blocks, 24 warps, 24 KB of loads in
// flight per SM), the backward at 128 (2 blocks); neither spills.
//
// Tiling (both kernels): a block of 256 threads = 16 column threads x 16 row threads.
// A column thread owns V = 16 bytes of a row (8 fp16/bf16 or 4 fp32 values, one
// 128-bit load when the row is contiguous and aligned), a row thread 2 rows, so a tile is
// 32 rows x TC = 16 V columns. The tile's p columns (fp32, all ranks) are staged in shared
// memory once per column tile, u rows once per row tile; the rank loop runs to the real r.
// Delta only ever exists in registers.
//
// Backward: one block owns a rectangle of column tiles x rows (fixed split counts, see
// backward_splits). Per tile, t = g * W * exp_{K-1} goes to shared memory; then each
// thread accumulates dp for (its ranks x its V columns) in registers over all the block's
// rows, and du for (one row x 4 ranks) over the tile's columns, added in a fixed order to
// the block's own du partial. A final small kernel sums the partials in a fixed order and
// casts them to the factors' dtypes. No atomics: bitwise reproducible on any GPU.
//
// FMA units, not tensor cores: the backward contracts the rank three times (Delta, du,
// dp), 3r FMAs per weight element, compute-bound above r ~ 10 in 16-bit on an H200. These
// kernels are the reference implementation; Triton runs the contractions on tensor cores
// (docs/cuda.md has the roofline argument).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <initializer_list>
#include <utility>

#include "lie_launch.h"
#include "lie_series.cuh"

namespace lie {
namespace {

constexpr int kThreads = 256;
constexpr int kColThreads = 16;
constexpr int kRowThreads = kThreads / kColThreads;
constexpr int kRowsPerThread = 2;
constexpr int kTileRows = kRowThreads * kRowsPerThread;  // 32
constexpr int kUStride = kMaxRank + 1;                   // odd: rows fall in different banks
constexpr int kFwdTilesPerBlock = 16;                    // forward: 512 rows reuse one p tile
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxSplits = 64;

template <typename T> constexpr int kVec = 16 / sizeof(T);
template <typename T> constexpr int kTileCols = kColThreads * kVec<T>;
// t tile row stride: +4 floats keeps a quarter warp's 128-bit row loads conflict-free
template <typename T> constexpr int kTStride = kTileCols<T> + 4;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f(float v) { return v; }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f(float v) { return v; }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) {
  return __float2bfloat16_rn(v);
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// f[j] = src[row_off + (col + j) * cs], 0 past M. On the vector path (unit column stride,
// 16-byte aligned rows, M % V == 0) the V values are one 128-bit load, all in or all out.
template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ src, int64_t row_off, int64_t cs,
                                         int64_t col, int64_t M, bool vec,
                                         float (&f)[kVec<T>]) {
  constexpr int V = kVec<T>;
  if (vec) {
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (col < M) raw = __ldg(reinterpret_cast<const uint4*>(src + row_off + col));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] = to_f(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] = col + j < M ? to_f(src[row_off + (col + j) * cs]) : 0.0f;
  }
}

// The storage bits of from_f<T>(v), zero-extended to 32 bits.
template <typename T> __device__ __forceinline__ uint32_t bits(float v);
template <> __device__ __forceinline__ uint32_t bits<float>(float v) { return __float_as_uint(v); }
template <> __device__ __forceinline__ uint32_t bits<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}
template <> __device__ __forceinline__ uint32_t bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// dst[row_off + col + j] = f[j] for the columns below M (dst rows are contiguous). The
// vector path packs 32-bit words and stores them with one st.global.v4: a plain uint4
// assignment here was split into four 32-bit stores, __stwb gave a strong store.
template <typename T>
__device__ __forceinline__ void store_row(T* __restrict__ dst, int64_t row_off, int64_t col,
                                          int64_t M, bool vec, const float (&f)[kVec<T>]) {
  constexpr int V = kVec<T>, kPerWord = V / 4;
  if (vec) {
    if (col >= M) return;
    uint32_t word[4];
#pragma unroll
    for (int q = 0; q < 4; ++q)
      word[q] = kPerWord == 1 ? bits<T>(f[q]) : bits<T>(f[2 * q]) | bits<T>(f[2 * q + 1]) << 16;
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst + row_off + col),
                 "r"(word[0]), "r"(word[1]), "r"(word[2]), "r"(word[3]) : "memory");
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (col + j < M) dst[row_off + col + j] = from_f<T>(f[j]);
  }
}

// p_s[k][c] = p[k, col0 + c] for k < r (zeros past M): coalesced along the row.
template <int TC>
__device__ __forceinline__ void stage_p(const LieProblem& pb, int64_t col0, float* p_s) {
  for (int i = threadIdx.x; i < pb.r * TC; i += kThreads) {
    const int k = i / TC, c = i % TC;
    p_s[i] = col0 + c < pb.M ? pb.p[k * pb.M + col0 + c] : 0.0f;
  }
}

// u_s[i][k] = u[row0 + i, k] for rows below row_end (zeros elsewhere).
__device__ __forceinline__ void stage_u(const LieProblem& pb, int64_t row0, int64_t row_end,
                                        float* u_s) {
  for (int i = threadIdx.x; i < kTileRows * pb.r; i += kThreads) {
    const int rr = i / pb.r, k = i % pb.r;
    u_s[rr * kUStride + k] = row0 + rr < row_end ? pb.u[(row0 + rr) * pb.r + k] : 0.0f;
  }
}

// x[i][j] = (u @ p)[tile row rl + i, tile column cl + j], rank loop bounded by r.
template <int V, int TC>
__device__ __forceinline__ void delta(const float* u_s, const float* p_s, int r, int rl, int cl,
                                      float (&x)[kRowsPerThread][V]) {
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) x[i][j] = 0.0f;
#pragma unroll 2
  for (int k = 0; k < r; ++k) {
    float pv[V];
#pragma unroll
    for (int q = 0; q < V; q += 4)
      *reinterpret_cast<float4*>(pv + q) = *reinterpret_cast<const float4*>(p_s + k * TC + cl + q);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const float uv = u_s[(rl + i) * kUStride + k];
#pragma unroll
      for (int j = 0; j < V; ++j) x[i][j] = fmaf(uv, pv[j], x[i][j]);
    }
  }
}

template <typename T, int ORDER>
__global__ void __launch_bounds__(kThreads, 3) fwd_kernel(LieProblem pb, T* __restrict__ out,
                                                       int64_t rows_per_block, bool vec) {
  constexpr int V = kVec<T>, TC = kTileCols<T>;
  __shared__ __align__(16) float p_s[kMaxRank * TC];
  __shared__ float u_s[kTileRows * kUStride];
  const int rl = threadIdx.x / kColThreads * kRowsPerThread, cl = threadIdx.x % kColThreads * V;
  const int64_t col0 = int64_t(blockIdx.x) * TC, col = col0 + cl;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t row_end = min64(pb.R, row_begin + rows_per_block);
  const T* w = static_cast<const T*>(pb.w);
  stage_p<TC>(pb, col0, p_s);
  for (int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
    float wv[kRowsPerThread][V], x[kRowsPerThread][V];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {  // loads in flight while Delta is formed
      const int64_t row = row0 + rl + i;
      if (row < row_end) load_row<T>(w, row * pb.sw.r, pb.sw.c, col, pb.M, vec, wv[i]);
    }
    __syncthreads();  // p_s staged; u_s free
    stage_u(pb, row0, row_end, u_s);
    __syncthreads();
    delta<V, TC>(u_s, p_s, int(pb.r), rl, cl, x);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t row = row0 + rl + i;
      if (row >= row_end) continue;
#pragma unroll
      for (int j = 0; j < V; ++j)
        wv[i][j] = lie_apply(wv[i][j], expm1_series<ORDER>(pb.scale * x[i][j]));
      store_row<T>(out, row * pb.M, col, pb.M, vec, wv[i]);
    }
  }
}

struct BwdGrid {
  int64_t col_splits, row_splits;
  int64_t tiles_per_split;  // column tiles per block
  int64_t rows_per_split;   // rows per block, a multiple of kTileRows
};

int elem_bytes(DType d) { return d == DType::kF32 ? 4 : 2; }
int tile_cols(DType d) { return kColThreads * 16 / elem_bytes(d); }

// Splits sized so that each partial set is at most W/16: col_splits * R * r * 4 <=
// R * M * elt / 16, likewise rows. Shape-only, so every GPU reduces in the same order.
BwdGrid bwd_grid(int64_t R, int64_t M, int64_t r, DType dtype) {
  const int64_t elt = elem_bytes(dtype);
  const int64_t col_tiles = ceil_div(M, tile_cols(dtype)), row_tiles = ceil_div(R, kTileRows);
  auto clamp = [](int64_t v, int64_t hi) { return v < 1 ? 1 : v > hi ? hi : v; };
  const int64_t sc = clamp(M * elt / (64 * r), col_tiles < kMaxSplits ? col_tiles : kMaxSplits);
  const int64_t sr = clamp(R * elt / (64 * r), row_tiles < kMaxSplits ? row_tiles : kMaxSplits);
  const int64_t tiles = ceil_div(col_tiles, sc), row_tiles_per = ceil_div(row_tiles, sr);
  return {ceil_div(col_tiles, tiles), ceil_div(row_tiles, row_tiles_per), tiles,
          row_tiles_per * kTileRows};
}

template <typename T, int ORDER>
__global__ void __launch_bounds__(kThreads, 2) bwd_kernel(LieProblem pb, const T* __restrict__ g,
                                                        Strides2 sg, T* __restrict__ dw,
                                                        BwdGrid gr, bool vec,
                                                        float* __restrict__ du_part,
                                                        float* __restrict__ dp_part) {
  constexpr int V = kVec<T>, TC = kTileCols<T>, TS = kTStride<T>;
  constexpr int kDpSlots = kMaxRank / kRowThreads;  // ranks rg, rg + 16, ... per thread
  constexpr int kDuSlots = kMaxRank / (kThreads / kTileRows);  // ranks warp, warp + 8, ...
  __shared__ __align__(16) float p_s[kMaxRank * TC];
  __shared__ __align__(16) float t_s[kTileRows * TS];
  __shared__ float u_s[kTileRows * kUStride];
  const int rg = threadIdx.x / kColThreads, rl = rg * kRowsPerThread;
  const int cl = threadIdx.x % kColThreads * V;
  const int du_row = threadIdx.x % kTileRows, du_k0 = threadIdx.x / kTileRows;
  const int r = int(pb.r);
  const T* w = static_cast<const T*>(pb.w);
  const int64_t row_begin = int64_t(blockIdx.y) * gr.rows_per_split;
  const int64_t row_end = min64(pb.R, row_begin + gr.rows_per_split);
  const int64_t ct_begin = int64_t(blockIdx.x) * gr.tiles_per_split;
  const int64_t ct_end = min64(ceil_div(pb.M, TC), ct_begin + gr.tiles_per_split);
  float* du_mine = du_part + int64_t(blockIdx.x) * pb.R * pb.r;
  float* dp_mine = dp_part + int64_t(blockIdx.y) * pb.r * pb.M;
  for (int64_t ct = ct_begin; ct < ct_end; ++ct) {
    const int64_t col0 = ct * TC, col = col0 + cl;
    float dp[kDpSlots][V] = {};
    __syncthreads();  // p_s free
    stage_p<TC>(pb, col0, p_s);
    for (int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
      float gv[kRowsPerThread][V], t[kRowsPerThread][V], x[kRowsPerThread][V];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int64_t row = row0 + rl + i;
#pragma unroll
        for (int j = 0; j < V; ++j) gv[i][j] = t[i][j] = 0.0f;
        if (row < row_end) {
          load_row<T>(g, row * sg.r, sg.c, col, pb.M, vec, gv[i]);
          load_row<T>(w, row * pb.sw.r, pb.sw.c, col, pb.M, vec, t[i]);
        }
      }
      __syncthreads();  // u_s and t_s free, p_s staged
      stage_u(pb, row0, row_end, u_s);
      __syncthreads();
      delta<V, TC>(u_s, p_s, r, rl, cl, x);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int64_t row = row0 + rl + i;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float y = pb.scale * x[i][j];
          t[i][j] *= gv[i][j] * dexp_series<ORDER>(y);
          gv[i][j] *= exp_series<ORDER>(y);
        }
        if (dw && row < row_end) store_row<T>(dw, row * pb.M, col, pb.M, vec, gv[i]);
#pragma unroll
        for (int q = 0; q < V; q += 4)
          *reinterpret_cast<float4*>(t_s + (rl + i) * TS + cl + q) =
              make_float4(t[i][q], t[i][q + 1], t[i][q + 2], t[i][q + 3]);
      }
      __syncthreads();
      // dp[k][cl + j] += sum_i u[i][k] t[i][cl + j] over the tile's rows
#pragma unroll 4
      for (int i = 0; i < kTileRows; ++i) {
        float tv[V];
#pragma unroll
        for (int q = 0; q < V; q += 4)
          *reinterpret_cast<float4*>(tv + q) =
              *reinterpret_cast<const float4*>(t_s + i * TS + cl + q);
#pragma unroll
        for (int m = 0; m < kDpSlots; ++m) {
          const int k = rg + m * kRowThreads;
          if (k < r) {
            const float uv = u_s[i * kUStride + k];
#pragma unroll
            for (int j = 0; j < V; ++j) dp[m][j] = fmaf(uv, tv[j], dp[m][j]);
          }
        }
      }
      // du[row][k] over the tile's columns, added to this block's partial in tile order
      float du[kDuSlots] = {};
#pragma unroll 2
      for (int c = 0; c < TC; c += 4) {
        const float4 tv = *reinterpret_cast<const float4*>(t_s + du_row * TS + c);
#pragma unroll
        for (int m = 0; m < kDuSlots; ++m) {
          const int k = du_k0 + m * (kThreads / kTileRows);
          if (k < r) {
            const float4 pv = *reinterpret_cast<const float4*>(p_s + k * TC + c);
            du[m] = fmaf(tv.x, pv.x, fmaf(tv.y, pv.y, fmaf(tv.z, pv.z, fmaf(tv.w, pv.w, du[m]))));
          }
        }
      }
      const int64_t row = row0 + du_row;
      if (row < row_end) {
#pragma unroll
        for (int m = 0; m < kDuSlots; ++m) {
          const int k = du_k0 + m * (kThreads / kTileRows);
          if (k < r) {
            float* dst = du_mine + row * pb.r + k;
            *dst = pb.scale * du[m] + (ct == ct_begin ? 0.0f : *dst);
          }
        }
      }
    }
#pragma unroll  // constant indices keep dp in registers
    for (int m = 0; m < kDpSlots; ++m) {
      const int k = rg + m * kRowThreads;
      if (k >= r) continue;
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (col + j < pb.M) dp_mine[k * pb.M + col + j] = pb.scale * dp[m][j];
    }
  }
}

__device__ __forceinline__ float sum_parts(const float* part, int64_t parts, int64_t n,
                                           int64_t i) {
  float s = 0.0f;
  for (int64_t j = 0; j < parts; ++j) s += part[j * n + i];
  return s;
}

template <typename T>
__device__ __forceinline__ void put(GradOut o, int64_t i, float v) {
  if (o.f32) static_cast<float*>(o.ptr)[i] = v;
  else static_cast<T*>(o.ptr)[i] = from_f<T>(v);
}

// du and dp: the partials summed in split order and cast, in one launch.
template <typename T>
__global__ void finish_kernel(const float* __restrict__ du_part, int64_t du_parts, int64_t du_n,
                              GradOut du, const float* __restrict__ dp_part, int64_t dp_parts,
                              int64_t dp_n, GradOut dp) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < du_n + dp_n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < du_n) put<T>(du, i, sum_parts(du_part, du_parts, du_n, i));
    else put<T>(dp, i - du_n, sum_parts(dp_part, dp_parts, dp_n, i - du_n));
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The 128-bit path: every operand row contiguous and 16-byte aligned.
bool vector_path(const LieProblem& pb,
                 std::initializer_list<std::pair<const void*, Strides2>> ops) {
  const int64_t v = 16 / elem_bytes(pb.dtype);
  for (const auto& [ptr, s] : ops)
    if (ptr && (s.c != 1 || s.r % v != 0 || !aligned16(ptr))) return false;
  return pb.M % v == 0;
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

BackwardSplits backward_splits(int64_t R, int64_t M, int64_t r, DType dtype) {
  const BwdGrid gr = bwd_grid(R, M, r, dtype);
  return {gr.col_splits, gr.row_splits};
}

int64_t backward_workspace(const LieProblem& pb) {
  const BwdGrid gr = bwd_grid(pb.R, pb.M, pb.r, pb.dtype);
  return pb.r * (gr.col_splits * pb.R + gr.row_splits * pb.M);
}

bool launch_forward(const LieProblem& pb, void* out, cudaStream_t stream) {
  const int64_t row_tiles = ceil_div(pb.R, kTileRows);
  int64_t tiles = ceil_div(row_tiles, kMaxGridY);  // grid y stays below its limit
  tiles = tiles > kFwdTilesPerBlock ? tiles : kFwdTilesPerBlock;
  const dim3 grid(ceil_div(pb.M, tile_cols(pb.dtype)), ceil_div(row_tiles, tiles));
  const bool vec = vector_path(pb, {{pb.w, pb.sw}, {out, {pb.M, 1}}});
  return dispatch(pb, [&](auto t, auto order) {
    using T = decltype(t);
    fwd_kernel<T, decltype(order)::value>
        <<<grid, kThreads, 0, stream>>>(pb, static_cast<T*>(out), tiles * kTileRows, vec);
  });
}

bool launch_backward(const LieProblem& pb, const void* g, Strides2 sg, GradOut du, GradOut dp,
                     void* dw, float* ws, cudaStream_t stream) {
  const BwdGrid gr = bwd_grid(pb.R, pb.M, pb.r, pb.dtype);
  float* du_part = ws;
  float* dp_part = ws + gr.col_splits * pb.R * pb.r;
  const bool vec = vector_path(pb, {{pb.w, pb.sw}, {g, sg}, {dw, {pb.M, 1}}});
  return dispatch(pb, [&](auto t, auto order) {
    using T = decltype(t);
    bwd_kernel<T, decltype(order)::value>
        <<<dim3(gr.col_splits, gr.row_splits), kThreads, 0, stream>>>(
            pb, static_cast<const T*>(g), sg, static_cast<T*>(dw), gr, vec, du_part, dp_part);
    const int64_t n = pb.r * (pb.R + pb.M);
    finish_kernel<T><<<int(ceil_div(n, 256) < 1024 ? ceil_div(n, 256) : 1024), 256, 0, stream>>>(
        du_part, gr.col_splits, pb.R * pb.r, du, dp_part, gr.row_splits, pb.r * pb.M, dp);
  });
}

}  // namespace lie
