// FlashAttention-2 (Dao, 2023: "FlashAttention-2: Faster Attention with Better Parallelism and
// Work Partitioning") forward and backward on tensor cores, fp16/bf16 in, fp32 accumulation.
// Saved for the backward: out and the logsumexp (batch, heads, seqlen), never the T x T matrix.
//
// Why inline PTX mma.sync (m16n8k16) and not WMMA or CuTe: the online softmax must rescale the
// accumulators row by row and turn the score accumulators into the next product's A operand in
// registers. mma.sync's fragment layout is specified by the PTX ISA (WMMA's is opaque, which
// would force a round trip of every score tile through shared memory), and it needs no template
// library (CuTe/CUTLASS would dominate build time on the 2-core CI machine). The same instruction
// runs on sm_80 and sm_90; Hopper's wgmma (sm_90a) is the known next step for H100/H200.
//
// Fragment layout of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4; each 32-bit register holds two consecutive-k 16-bit elements:
//   A (16x16, row major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8, k x n):       b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16x8, fp32):        c0,c1 = C[g][2t], C[g][2t+1]; c2,c3 = C[g+8][2t], C[g+8][2t+1]
// Two adjacent C tiles (n = 16 columns) therefore hold exactly the A fragment of a k = 16 step,
// which is how the probabilities P go from the QK^T accumulators into the PV product unchanged.
//
// Tiles live in shared memory with rows padded by 8 elements (16 bytes): the eight 16-byte rows
// of each ldmatrix then fall in distinct bank groups (no conflicts). Global -> shared copies are
// 16-byte cp.async with zero-fill for rows past seqlen and columns past head_dim, so the padded
// instantiations (head dims 64, 128, 256) compute with zeros in the padding and never store it.
//
// Forward: one CTA of 4 warps per (64 query rows, batch*head); each warp owns 16 query rows and
//   keeps its O accumulator (16 x kHeadDim fp32) in registers; K_j and V_j stream through shared
//   memory, V_j's copy overlapping the QK^T and softmax of block j, K_{j+1}'s the PV of block j.
// Backward (three kernels): delta = rowsum(dO * O); then one CTA of 8 warps per 64 key rows loops
//   over query blocks (Q and dO double-buffered up to head dim 128: the next block's copy overlaps
//   this block's products), recomputes P from the saved logsumexp, accumulates dK and dV in
//   registers and (default) adds its dQ contribution with fp32 atomics; in deterministic mode a second
//   kernel per 64 query rows recomputes P and dS and accumulates dQ in registers instead, so no
//   float addition depends on scheduling order.
#include <cfloat>
#include <cmath>

#include "attention.h"
#include "common.cuh"
#include "static_switch.h"

namespace gptfast {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kBlockM = 64;  // query rows per forward CTA and per backward step

// --- fragments and tensor-core instructions --------------------------------------------------

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
// memcpy, not a pointer cast, for the bit moves: type-punned pointer accesses are undefined
// behaviour (a CPU emulation of this file compiled with g++ -O2 computed zeros from them);
// memcpy of registers compiles to plain moves.
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// D = A * B + D, 16x8x16, fp32 accumulators.
template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                                               const uint32_t (&b)[2]);
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                             const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                                    const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Fragments come out of shared memory with ldmatrix: each 8x8 16-bit matrix is 8 row addresses
// (16 bytes each) supplied by 8 lanes, lane l giving row l % 8 of matrix l / 8, and every lane
// receives the 32-bit register (row g, columns 2t..2t+1) of each matrix, or with .trans the
// register (rows 2t..2t+1, column g): exactly the mma.m16n8k16 fragment layout above. One
// instruction replaces four 32-bit loads (A, B^T) or eight 16-bit loads (the transposed reads).
// Shared-memory tiles are arrays of raw 16-bit elements, row-major with a pitch of `ld` elements
// (a multiple of 8: every row address is 16-byte aligned, as ldmatrix requires).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// x2: lanes 0..15 supply the addresses; the others' are ignored (but computed in range).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const uint16_t* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const uint16_t* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// A = X[r0 .. r0+15][c0 .. c0+15]: matrices (rows, cols) (r0, c0) -> a0, (r0+8, c0) -> a1,
// (r0, c0+8) -> a2, (r0+8, c0+8) -> a3.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* X, int ld, int r0, int c0, int lane) {
  ldmatrix_x4(a, X + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + c0 + (lane >> 4) * 8);
}

// A[m][k] = X[k0 + k][m0 + m], read transposed: X's 8x8 blocks (k0, m0) -> a0, (k0, m0+8) -> a1,
// (k0+8, m0) -> a2, (k0+8, m0+8) -> a3.
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const uint16_t* X, int ld, int m0, int k0,
                                             int lane) {
  ldmatrix_x4_trans(a, X + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8);
}

// B[k][n] = X[n0 + n][k0 + k]: the rows of X are B's columns (K in Q K^T); blocks (n0, k0) -> b0,
// (n0, k0+8) -> b1.
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[2], const uint16_t* X, int ld, int n0, int k0,
                                            int lane) {
  ldmatrix_x2(b, X + (n0 + (lane & 7)) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// B[k][n] = X[k0 + k][n0 + n]: X is B itself, row-major (V in P V), read transposed; blocks
// (k0, n0) -> b0, (k0+8, n0) -> b1.
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[2], const uint16_t* X, int ld, int k0, int n0,
                                            int lane) {
  ldmatrix_x2_trans(b, X + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0);
}

// --- global -> shared copies ------------------------------------------------------------------

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Rows [row0, row0 + kRows) of one head (base points at its row 0), head_dim columns, into a
// kRows x kHeadDim tile with pitch kHeadDim + 8. Out-of-range rows and columns become zeros.
template <int kRows, int kHeadDim, int kThreads>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* base, int64_t row_stride, int row0,
                                          int seqlen, int head_dim) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int row = row0 + r;
    const bool valid = row < seqlen && col < head_dim;
    const uint16_t* src = valid ? base + row * row_stride + col : base;
    cp_async_16(tile + r * (kHeadDim + 8) + col, src, valid);
  }
}

template <typename T>
__device__ __forceinline__ const uint16_t* head_ptr(const void* base, int64_t batch_stride, int64_t head_stride,
                                                    int b, int h) {
  return reinterpret_cast<const uint16_t*>(base) + b * batch_stride + h * head_stride;
}

// --- forward ----------------------------------------------------------------------------------

template <int kHeadDim> struct FwdConfig {
  // 16 rows x kHeadDim fp32 of O per warp: 128 registers at 256, so the score tile shrinks there
  // to stay clear of spills.
  static constexpr int kBlockN = kHeadDim == 256 ? 32 : 64;
  static constexpr int kThreads = 128;
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kPitch * 2;
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128) attention_fwd_kernel(const AttentionParams p) {
  using Cfg = FwdConfig<kHeadDim>;
  constexpr int kBlockN = Cfg::kBlockN, kPitch = Cfg::kPitch, kThreads = Cfg::kThreads;
  constexpr int kNT = kBlockN / 8;   // score n-tiles per warp
  constexpr int kDT = kHeadDim / 8;  // output n-tiles per warp
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sK = sQ + kBlockM * kPitch;
  uint16_t* sV = sK + kBlockN * kPitch;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int m_block = gridDim.y - 1 - blockIdx.y;  // longest causal rows first: better tail balance
  const int m0 = m_block * kBlockM;
  const int T_ = p.seqlen;
  const uint16_t* q = head_ptr<T>(p.q, p.q_batch_stride, p.q_head_stride, b, h);
  const uint16_t* k = head_ptr<T>(p.k, p.k_batch_stride, p.k_head_stride, b, h);
  const uint16_t* v = head_ptr<T>(p.v, p.v_batch_stride, p.v_head_stride, b, h);

  const int n_end = p.causal ? min(T_, m0 + kBlockM) : T_;
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;

  load_tile<kBlockM, kHeadDim, kThreads>(sQ, q, p.q_row_stride, m0, T_, p.head_dim);
  load_tile<kBlockN, kHeadDim, kThreads>(sK, k, p.k_row_stride, 0, T_, p.head_dim);
  cp_async_commit();
  load_tile<kBlockN, kHeadDim, kThreads>(sV, v, p.v_row_stride, 0, T_, p.head_dim);
  cp_async_commit();

  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  // Row statistics for rows g and g + 8 of this warp, in log2 units of the scaled scores.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // partial: this thread's columns only, reduced at the end
  const int row_a = m0 + warp * 16 + g;

  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kBlockN;
    cp_async_wait<1>();  // Q and K_j have landed (V_j may still be in flight)
    __syncthreads();

    float s[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[4];
      load_a(a, sQ, kPitch, warp * 16, kk * 16, lane);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        uint32_t bf[2];
        load_b_rows(bf, sK, kPitch, nt * 8, kk * 16, lane);
        mma16816<T>(s[nt], a, bf);
      }
    }
    __syncthreads();  // every warp is done with sK: K_{j+1} may overwrite it
    if (j + 1 < n_blocks) load_tile<kBlockN, kHeadDim, kThreads>(sK, k, p.k_row_stride, n0 + kBlockN, T_, p.head_dim);
    cp_async_commit();  // possibly empty: keeps the group count uniform for wait<1>

    // Online softmax. Masked scores are -inf; a row whose scores are all masked so far keeps
    // max -inf and uses 0 as its offset, so that no -inf - -inf NaN appears.
    const bool need_mask = n0 + kBlockN > T_ || (p.causal && n0 + kBlockN - 1 > m0);
    float blk_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (need_mask) {
          const int col = n0 + nt * 8 + 2 * t + (e & 1);
          const int row = row_a + (e >> 1) * 8;
          if (col >= T_ || (p.causal && col > row)) x = -INFINITY;
        }
        s[nt][e] = x;
        blk_max[e >> 1] = fmaxf(blk_max[e >> 1], x);
      }
    }
    float offset[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // The 4 threads of a quad (same g) hold one row between them.
      blk_max[r] = fmaxf(blk_max[r], __shfl_xor_sync(0xffffffffu, blk_max[r], 1));
      blk_max[r] = fmaxf(blk_max[r], __shfl_xor_sync(0xffffffffu, blk_max[r], 2));
      const float new_max = fmaxf(row_max[r], blk_max[r]);
      offset[r] = new_max == -INFINITY ? 0.f : new_max;
      alpha[r] = fast_exp2(row_max[r] - offset[r]);  // 0 while the row was empty
      row_max[r] = new_max;
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = fast_exp2(s[nt][e] - offset[e >> 1]);  // NaN scores stay NaN
        s[nt][e] = pe;
        row_sum[e >> 1] += pe;
      }
    }
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    cp_async_wait<1>();  // V_j has landed (K_{j+1} may still be in flight)
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        uint32_t bf[2];
        load_b_cols(bf, sV, kPitch, kk * 16, dt * 8, lane);
        mma16816<T>(o[dt], a, bf);
      }
    }
    __syncthreads();  // every warp is done with sV
    if (j + 1 < n_blocks) load_tile<kBlockN, kHeadDim, kThreads>(sV, v, p.v_row_stride, n0 + kBlockN, T_, p.head_dim);
    cp_async_commit();
  }
  cp_async_wait<0>();

  const int H = p.heads, D = p.head_dim;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    // A row with no unmasked key: out 0, lse -inf (the contract). `l == 0` and not `l > 0`, so
    // that a NaN sum stays NaN instead of turning into zeros.
    const float inv = l == 0.f ? 0.f : 1.f / l;
    const int row = row_a + r * 8;
    if (row < T_) {
      T* out = reinterpret_cast<T*>(p.out) + ((static_cast<int64_t>(b) * T_ + row) * H + h) * D;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        const int col = dt * 8 + 2 * t;
        if (col < D) *reinterpret_cast<uint32_t*>(out + col) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
      }
      if (t == 0) {
        p.lse[static_cast<int64_t>(bh) * T_ + row] = l == 0.f ? -INFINITY : row_max[r] * kLn2 + logf(l);
      }
    }
  }
}

// --- backward ---------------------------------------------------------------------------------

// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] in fp32: one warp per (b, i, h) row.
template <typename T>
__global__ void attention_bwd_delta_kernel(const AttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seqlen * p.heads;
  if (row >= rows) return;
  const int h = static_cast<int>(row % p.heads);
  const int i = static_cast<int>((row / p.heads) % p.seqlen);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.heads) * p.seqlen));
  const T* o = reinterpret_cast<const T*>(p.out_in) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.do_batch_stride + i * p.do_row_stride + h * p.do_head_stride;
  float acc = 0.f;
  for (int d = lane * 8; d < p.head_dim; d += 32 * 8) {  // 16-byte loads: head_dim % 8 == 0
    const uint4 ov = *reinterpret_cast<const uint4*>(o + d);
    const uint4 dv = *reinterpret_cast<const uint4*>(dout + d);
    T oe[8], de[8];  // see pack2: memcpy, not a type-punned pointer
    memcpy(oe, &ov, sizeof(ov));
    memcpy(de, &dv, sizeof(dv));
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_float(oe[e]) * to_float(de[e]);
  }
  acc = warp_sum(acc);
  if (lane == 0) p.delta[(static_cast<int64_t>(b) * p.heads + h) * p.seqlen + i] = acc;
}

// The two score-sized products of both backward kernels, over the head dim:
//   acc1 += A1[a0 .. a0+15] B1[b0 .. b0+31]^T   and   acc2 += A2[a0 ..] B2[b0 ..]^T
// (16 rows x 32 columns per warp; dK/dV kernel: S^T = K Q^T, dP^T = V dO^T; dQ kernel: S = Q K^T,
// dP = dO V^T). kUnroll bounds the unroll of the head-dim loop (registers, see the callers).
template <typename T, int kHeadDim, int kUnroll>
__device__ __forceinline__ void two_score_products(float (&acc1)[4][4], const uint16_t* A1, const uint16_t* B1,
                                                   float (&acc2)[4][4], const uint16_t* A2, const uint16_t* B2,
                                                   int a0, int b0, int lane) {
  constexpr int kPitch = kHeadDim + 8;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc1[i][e] = acc2[i][e] = 0.f;
  }
#pragma unroll kUnroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    uint32_t a[4], bf[2];
    load_a(a, A1, kPitch, a0, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      load_b_rows(bf, B1, kPitch, b0 + nt * 8, kk * 16, lane);
      mma16816<T>(acc1[nt], a, bf);
    }
    load_a(a, A2, kPitch, a0, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      load_b_rows(bf, B2, kPitch, b0 + nt * 8, kk * 16, lane);
      mma16816<T>(acc2[nt], a, bf);
    }
  }
}

// 64 key rows per dK/dV CTA (and per step of the dQ kernel), 64 query rows per step.
template <int kHeadDim> struct BwdConfig {
  static constexpr int kThreads = 256;
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kPPitch = kBlockM + 8;
  // K, V, Q, dO tiles; P^T and dS^T (or dS) tiles; logsumexp and delta of the query block.
  static constexpr int kSmemBytes = 4 * 64 * kPitch * 2 + 2 * 64 * kPPitch * 2 + 2 * kBlockM * 4;
  // Both kernels can double-buffer the tiles they stream (dK/dV: Q and dO; dQ: K and V), so that
  // the next block's copy overlaps this one's products; the second pair sits after everything
  // else. That variant is compiled up to head dim 128 (120.5 KiB, within sm_80/sm_90's opt-in
  // limits) and chosen at launch when the device allows it: sm_86/89/120 allow 99 KiB per block,
  // where head dim 128 runs single-buffered (86.5 KiB) and 256 (150.5 KiB) cannot run at all.
  static constexpr bool kCanDouble = kHeadDim <= 128;
  static constexpr int kSmemBytesDouble = kSmemBytes + 2 * 64 * kPitch * 2;
  template <bool kDouble> static constexpr int smem_bytes() { return kDouble ? kSmemBytesDouble : kSmemBytes; }
};

// Loads the query block's logsumexp (pre-multiplied by log2 e) and delta into shared memory.
// Rows past seqlen, and rows with lse = -inf (no unmasked key), get +inf: their P is exp2(-inf) = 0.
__device__ __forceinline__ void load_row_stats(float* sLse, float* sDelta, const AttentionParams& p, int bh, int m0) {
  for (int i = threadIdx.x; i < kBlockM; i += blockDim.x) {
    const int row = m0 + i;
    float lse = INFINITY, delta = 0.f;
    if (row < p.seqlen) {
      const float l = p.lse_in[static_cast<int64_t>(bh) * p.seqlen + row];
      lse = l == -INFINITY ? INFINITY : l * kLog2e;
      delta = p.delta[static_cast<int64_t>(bh) * p.seqlen + row];
    }
    sLse[i] = lse;
    sDelta[i] = delta;
  }
}

// dK, dV for 64 key rows (blockIdx.y) of one (batch, head) (blockIdx.x); dQ with atomics when
// p.dq_accum is set. Warp w owns key rows 16 * (w % 4) .. +15 and, for dK/dV, head-dim half w / 4.
template <typename T, int kHeadDim, bool kDouble>
__global__ void __launch_bounds__(256, 1) attention_bwd_dkdv_kernel(const AttentionParams p) {
  using Cfg = BwdConfig<kHeadDim>;
  constexpr int kPitch = Cfg::kPitch, kPPitch = Cfg::kPPitch, kThreads = Cfg::kThreads;
  constexpr int kHalf = kHeadDim / 2;
  constexpr int kDT = kHalf / 8;  // dK/dV n-tiles per warp
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sV = sK + 64 * kPitch;
  uint16_t* sQ0 = sV + 64 * kPitch;
  uint16_t* sdO0 = sQ0 + 64 * kPitch;
  uint16_t* sPt = sdO0 + 64 * kPitch;   // P^T  (key row, query column), 16-bit
  uint16_t* sdSt = sPt + 64 * kPPitch;  // dS^T (key row, query column), 16-bit
  float* sLse = reinterpret_cast<float*>(sdSt + 64 * kPPitch);
  float* sDelta = sLse + kBlockM;
  // Second Q/dO buffers (kDouble), after everything else (16-byte aligned).
  uint16_t* sQ1 = reinterpret_cast<uint16_t*>(smem + Cfg::kSmemBytes);
  uint16_t* sdO1 = sQ1 + 64 * kPitch;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r = warp % 4, c = warp / 4;
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int n_block = blockIdx.y, n0 = n_block * 64;
  const int T_ = p.seqlen, H = p.heads, D = p.head_dim;
  const uint16_t* q = head_ptr<T>(p.q, p.q_batch_stride, p.q_head_stride, b, h);
  const uint16_t* k = head_ptr<T>(p.k, p.k_batch_stride, p.k_head_stride, b, h);
  const uint16_t* v = head_ptr<T>(p.v, p.v_batch_stride, p.v_head_stride, b, h);
  const uint16_t* dout = head_ptr<T>(p.dout, p.do_batch_stride, p.do_head_stride, b, h);

  load_tile<64, kHeadDim, kThreads>(sK, k, p.k_row_stride, n0, T_, D);
  load_tile<64, kHeadDim, kThreads>(sV, v, p.v_row_stride, n0, T_, D);
  cp_async_commit();

  float dk[kDT][4], dv[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  }
  // Causal: query rows below the first key of this block see none of it (kBlockM == kBlockN).
  const int m_begin = p.causal ? n_block : 0;
  const int m_blocks = (T_ + kBlockM - 1) / kBlockM;
  const int kv_a = n0 + r * 16 + g;  // this thread's key rows: kv_a and kv_a + 8

  auto load_q_do = [&](int mb, uint16_t* dst_q, uint16_t* dst_do) {
    load_tile<kBlockM, kHeadDim, kThreads>(dst_q, q, p.q_row_stride, mb * kBlockM, T_, D);
    load_tile<kBlockM, kHeadDim, kThreads>(dst_do, dout, p.do_row_stride, mb * kBlockM, T_, D);
    cp_async_commit();
  };
  if (kDouble && m_begin < m_blocks) load_q_do(m_begin, sQ0, sdO0);

  for (int mb = m_begin; mb < m_blocks; ++mb) {
    const int m0 = mb * kBlockM;
    const bool odd = kDouble && ((mb - m_begin) & 1);
    uint16_t* sQ = odd ? sQ1 : sQ0;
    uint16_t* sdO = odd ? sdO1 : sdO0;
    if (kDouble) {
      // The other buffer was last read in the previous iteration, before its final barrier.
      if (mb + 1 < m_blocks) load_q_do(mb + 1, odd ? sQ0 : sQ1, odd ? sdO0 : sdO1);
      else cp_async_commit();  // empty group: wait<1> below still means "this block's copy"
    } else {
      load_q_do(mb, sQ, sdO);
    }
    load_row_stats(sLse, sDelta, p, bh, m0);
    if (kDouble) cp_async_wait<1>();  // this block's Q/dO (and K/V) have landed
    else cp_async_wait<0>();
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T for key rows of strip r, query columns 32c .. 32c+31.
    // Unrolled by 4 only: with 128 registers of dK/dV live, a full unroll spilled at 256.
    float st[4][4], dpt[4][4];
    two_score_products<T, kHeadDim, 4>(st, sK, sQ, dpt, sV, sdO, r * 16, c * 32, lane);
    // P^T = exp2(scale_log2 * S^T - lse_log2[query]);  dS^T = P^T * (dP^T - delta[query]).
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = c * 32 + nt * 8 + 2 * t + (e & 1);
        const int qrow = m0 + ql, kv = kv_a + (e >> 1) * 8;
        const bool valid = qrow < T_ && kv < T_ && !(p.causal && kv > qrow);
        const float pe = valid ? fast_exp2(st[nt][e] * p.scale_log2 - sLse[ql]) : 0.f;
        st[nt][e] = pe;
        dpt[nt][e] = pe * (dpt[nt][e] - sDelta[ql]);
      }
      const int col = c * 32 + nt * 8 + 2 * t;
      uint16_t* pt = sPt + (r * 16 + g) * kPPitch + col;
      uint16_t* dst = sdSt + (r * 16 + g) * kPPitch + col;
      *reinterpret_cast<uint32_t*>(pt) = pack2<T>(st[nt][0], st[nt][1]);
      *reinterpret_cast<uint32_t*>(pt + 8 * kPPitch) = pack2<T>(st[nt][2], st[nt][3]);
      *reinterpret_cast<uint32_t*>(dst) = pack2<T>(dpt[nt][0], dpt[nt][1]);
      *reinterpret_cast<uint32_t*>(dst + 8 * kPPitch) = pack2<T>(dpt[nt][2], dpt[nt][3]);
    }
    __syncthreads();

    // dV += P^T dO and dK += dS^T Q, for key strip r and head-dim half c. Not unrolled over kk:
    // the inner loop has 2 * kDT independent products already, and unrolling both made ptxas
    // spill at head dim 256 (28 bytes, sm_80) while holding 128 registers of dK/dV.
#pragma unroll 1
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t a[4], bf[2];
      load_a(a, sPt, kPPitch, r * 16, kk * 16, lane);
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        load_b_cols(bf, sdO, kPitch, kk * 16, c * kHalf + dt * 8, lane);
        mma16816<T>(dv[dt], a, bf);
      }
      load_a(a, sdSt, kPPitch, r * 16, kk * 16, lane);
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        load_b_cols(bf, sQ, kPitch, kk * 16, c * kHalf + dt * 8, lane);
        mma16816<T>(dk[dt], a, bf);
      }
    }

    if (p.dq_accum != nullptr) {
      // dQ[query strip r, half c] += scale * dS K, 32 columns at a time (16 accumulators) and
      // added to the fp32 buffer with atomics: every key block contributes to every query row.
      float* dq_rows = p.dq_accum + (static_cast<int64_t>(b) * T_ * H + h) * D;
#pragma unroll 1
      for (int chunk = 0; chunk < kHalf / 32; ++chunk) {
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < 64 / 16; ++kk) {
          uint32_t a[4], bf[2];
          load_a_trans(a, sdSt, kPPitch, r * 16, kk * 16, lane);  // A[query][key] = dS^T[key][query]
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            load_b_cols(bf, sK, kPitch, kk * 16, c * kHalf + chunk * 32 + nt * 8, lane);
            mma16816<T>(acc[nt], a, bf);
          }
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int qrow = m0 + r * 16 + g + (e >> 1) * 8;
            const int col = c * kHalf + chunk * 32 + nt * 8 + 2 * t + (e & 1);
            if (qrow < T_ && col < D) atomicAdd(dq_rows + static_cast<int64_t>(qrow) * H * D + col, acc[nt][e] * p.scale);
          }
        }
      }
    }
    __syncthreads();  // the next query block overwrites sQ, sdO, sPt, sdSt
  }

  // dK = scale * dS^T Q (the scores were scaled); dV = P^T dO.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int kv = kv_a + half * 8;
    if (kv >= T_) continue;
    const int64_t off = ((static_cast<int64_t>(b) * T_ + kv) * H + h) * D;
    T* dk_row = reinterpret_cast<T*>(p.dk) + off;
    T* dv_row = reinterpret_cast<T*>(p.dv) + off;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      const int col = c * kHalf + dt * 8 + 2 * t;
      if (col >= D) continue;
      *reinterpret_cast<uint32_t*>(dk_row + col) = pack2<T>(dk[dt][2 * half] * p.scale, dk[dt][2 * half + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_row + col) = pack2<T>(dv[dt][2 * half], dv[dt][2 * half + 1]);
    }
  }
}

// Deterministic dQ: 64 query rows (blockIdx.y, longest first) of one (batch, head) per CTA, looping
// over key blocks in a fixed order (K and V double-buffered up to head dim 128). Warp w owns query rows 16 * (w % 4) .. +15; for S/dP key
// columns 32 * (w / 4) .. +31, for dQ head-dim half w / 4.
template <typename T, int kHeadDim, bool kDouble>
__global__ void __launch_bounds__(256, 1) attention_bwd_dq_kernel(const AttentionParams p) {
  using Cfg = BwdConfig<kHeadDim>;
  constexpr int kPitch = Cfg::kPitch, kPPitch = Cfg::kPPitch, kThreads = Cfg::kThreads;
  constexpr int kHalf = kHeadDim / 2;
  constexpr int kDT = kHalf / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* sK0 = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sV0 = sK0 + 64 * kPitch;
  uint16_t* sQ = sV0 + 64 * kPitch;
  uint16_t* sdO = sQ + 64 * kPitch;
  uint16_t* sdS = sdO + 64 * kPitch;  // dS (query row, key column), 16-bit
  float* sLse = reinterpret_cast<float*>(sdS + 2 * 64 * kPPitch);
  float* sDelta = sLse + kBlockM;
  uint16_t* sK1 = reinterpret_cast<uint16_t*>(smem + Cfg::kSmemBytes);  // kDouble
  uint16_t* sV1 = sK1 + 64 * kPitch;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r = warp % 4, c = warp / 4;
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kBlockM;
  const int T_ = p.seqlen, H = p.heads, D = p.head_dim;
  const uint16_t* q = head_ptr<T>(p.q, p.q_batch_stride, p.q_head_stride, b, h);
  const uint16_t* k = head_ptr<T>(p.k, p.k_batch_stride, p.k_head_stride, b, h);
  const uint16_t* v = head_ptr<T>(p.v, p.v_batch_stride, p.v_head_stride, b, h);
  const uint16_t* dout = head_ptr<T>(p.dout, p.do_batch_stride, p.do_head_stride, b, h);

  load_tile<kBlockM, kHeadDim, kThreads>(sQ, q, p.q_row_stride, m0, T_, D);
  load_tile<kBlockM, kHeadDim, kThreads>(sdO, dout, p.do_row_stride, m0, T_, D);
  cp_async_commit();
  load_row_stats(sLse, sDelta, p, bh, m0);

  float dq[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  const int n_end = p.causal ? min(T_, m0 + kBlockM) : T_;
  const int n_blocks = (n_end + 63) / 64;
  const int q_a = r * 16 + g;  // local query rows q_a and q_a + 8

  auto load_k_v = [&](int j, uint16_t* dst_k, uint16_t* dst_v) {
    load_tile<64, kHeadDim, kThreads>(dst_k, k, p.k_row_stride, j * 64, T_, D);
    load_tile<64, kHeadDim, kThreads>(dst_v, v, p.v_row_stride, j * 64, T_, D);
    cp_async_commit();
  };
  if (kDouble && n_blocks > 0) load_k_v(0, sK0, sV0);

  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * 64;
    const bool odd = kDouble && (j & 1);
    uint16_t* sK = odd ? sK1 : sK0;
    uint16_t* sV = odd ? sV1 : sV0;
    if (kDouble) {
      // The other buffer was last read in the previous iteration, before its final barrier.
      if (j + 1 < n_blocks) load_k_v(j + 1, odd ? sK0 : sK1, odd ? sV0 : sV1);
      else cp_async_commit();  // empty group: wait<1> below still means "this block's copy"
      cp_async_wait<1>();
    } else {
      load_k_v(j, sK, sV);
      cp_async_wait<0>();
    }
    __syncthreads();

    // S = Q K^T and dP = dO V^T for query rows of strip r, key columns 32c .. 32c+31.
    float s[4][4], dp[4][4];
    two_score_products<T, kHeadDim, kHeadDim / 16>(s, sQ, sK, dp, sdO, sV, r * 16, c * 32, lane);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int kl = c * 32 + nt * 8 + 2 * t;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = q_a + (e >> 1) * 8;
        const int qrow = m0 + ql, kv = n0 + kl + (e & 1);
        const bool valid = qrow < T_ && kv < T_ && !(p.causal && kv > qrow);
        const float pe = valid ? fast_exp2(s[nt][e] * p.scale_log2 - sLse[ql]) : 0.f;
        dp[nt][e] = pe * (dp[nt][e] - sDelta[ql]);
      }
      uint16_t* dst = sdS + q_a * kPPitch + kl;
      *reinterpret_cast<uint32_t*>(dst) = pack2<T>(dp[nt][0], dp[nt][1]);
      *reinterpret_cast<uint32_t*>(dst + 8 * kPPitch) = pack2<T>(dp[nt][2], dp[nt][3]);
    }
    __syncthreads();

#pragma unroll
    for (int kk = 0; kk < 64 / 16; ++kk) {
      uint32_t a[4], bf[2];
      load_a(a, sdS, kPPitch, r * 16, kk * 16, lane);
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        load_b_cols(bf, sK, kPitch, kk * 16, c * kHalf + dt * 8, lane);
        mma16816<T>(dq[dt], a, bf);
      }
    }
    __syncthreads();  // the next key block overwrites sK, sV, sdS
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int qrow = m0 + q_a + half * 8;
    if (qrow >= T_) continue;
    T* dq_row = reinterpret_cast<T*>(p.dq) + ((static_cast<int64_t>(b) * T_ + qrow) * H + h) * D;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      const int col = c * kHalf + dt * 8 + 2 * t;
      if (col < D) *reinterpret_cast<uint32_t*>(dq_row + col) = pack2<T>(dq[dt][2 * half] * p.scale, dq[dt][2 * half + 1] * p.scale);
    }
  }
}

// dq = dq_accum in the element type (the atomics path).
template <typename T>
__global__ void attention_bwd_dq_convert_kernel(const float* __restrict__ acc, T* __restrict__ dq, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dq[i] = from_float<T>(acc[i]);
  }
}

template <typename Kernel>
cudaError_t set_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace

int attention_smem_bytes(int head_dim, int kernel) {
  return HEADDIM_SWITCH(head_dim, [&] {
    using Cfg = BwdConfig<kHeadDim>;
    if (kernel == 0) return FwdConfig<kHeadDim>::kSmemBytes;
    if (kernel == 1) return Cfg::kSmemBytes;
    return Cfg::kCanDouble ? Cfg::kSmemBytesDouble : -1;
  });
}

cudaError_t attention_forward_launch(const AttentionParams& p, cudaStream_t stream) {
  return FP16_SWITCH(p.is_bf16, [&] {
    return HEADDIM_SWITCH(p.head_dim, [&] {
      using Cfg = FwdConfig<kHeadDim>;
      auto kernel = attention_fwd_kernel<elem_t, kHeadDim>;
      cudaError_t err = set_smem(kernel, Cfg::kSmemBytes);
      if (err != cudaSuccess) return err;
      const dim3 grid(p.batch * p.heads, ceil_div(p.seqlen, kBlockM));
      kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

namespace {
// The dK/dV kernel, then dQ (conversion of the atomics' buffer, or the deterministic kernel).
template <typename T, int kHeadDim, bool kDouble>
cudaError_t launch_backward_main(const AttentionParams& p, cudaStream_t stream) {
  using Cfg = BwdConfig<kHeadDim>;
  constexpr int kSmem = Cfg::template smem_bytes<kDouble>();
  const dim3 grid(p.batch * p.heads, ceil_div(p.seqlen, 64));
  auto dkdv = attention_bwd_dkdv_kernel<T, kHeadDim, kDouble>;
  cudaError_t e = set_smem(dkdv, kSmem);
  if (e != cudaSuccess) return e;
  dkdv<<<grid, Cfg::kThreads, kSmem, stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  if (p.dq_accum != nullptr) {
    const int64_t n = static_cast<int64_t>(p.batch) * p.seqlen * p.heads * p.head_dim;
    const int blocks = static_cast<int>(n / 256 + 1 < 65536 ? n / 256 + 1 : 65536);
    attention_bwd_dq_convert_kernel<T><<<blocks, 256, 0, stream>>>(p.dq_accum, reinterpret_cast<T*>(p.dq), n);
    return cudaGetLastError();
  }
  auto dq = attention_bwd_dq_kernel<T, kHeadDim, kDouble>;
  e = set_smem(dq, kSmem);
  if (e != cudaSuccess) return e;
  dq<<<grid, Cfg::kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}
}  // namespace

cudaError_t attention_backward_launch(const AttentionParams& p, cudaStream_t stream) {
  return FP16_SWITCH(p.is_bf16, [&] {
    const int64_t rows = static_cast<int64_t>(p.batch) * p.seqlen * p.heads;
    attention_bwd_delta_kernel<elem_t><<<ceil_div(rows, 8), 256, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    return HEADDIM_SWITCH(p.head_dim, [&] {
      using Cfg = BwdConfig<kHeadDim>;
      if constexpr (Cfg::kCanDouble) {
        if (Cfg::kSmemBytesDouble <= p.max_smem_per_block) return launch_backward_main<elem_t, kHeadDim, true>(p, stream);
      }
      return launch_backward_main<elem_t, kHeadDim, false>(p, stream);
    });
  });
}

}  // namespace cuda
}  // namespace gptfast
