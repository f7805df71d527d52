// FlashAttention-2 (Dao, 2023: "FlashAttention-2: Faster Attention with Better Parallelism and
// Work Partitioning") forward and backward on tensor cores, fp16/bf16 in, fp32 accumulation.
// Saved for the backward: out and the logsumexp (batch, heads, seqlen) (packed: (heads, total_q)),
// never the T x T matrix.
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
//
// Options (FlashAttention 2.8's dense ones; semantics: gptfast/ops/attention.py), and which are
// template parameters:
// - GQA/MQA and seqlen_q != seqlen_k are index math in every kernel: query head h reads kv head
//   h / (heads / heads_k), and the bottom-right aligned masks shift each row by seqlen_k - seqlen_q.
//   Under GQA the dK/dV kernel writes per-query-head dK, dV and the host sums each group (no
//   atomics: deterministic, and K/V are never repeated in memory).
// - One compile-time flag, kHasModifiers, splits each kernel in two. The plain instantiation
//   (false) takes a causal or full mask (any right window side: one compare per element of a
//   boundary block, as before the options) and compiles to the same main loop, registers and
//   occupancy as before them (ptxas -v: forward 128/168/238 registers at head dims 64/128/256 on
//   sm_80 and sm_90). The other (true) adds, as runtime branches on uniform parameters: a bounded
//   left window side, softcap, ALiBi and dropout. Why not a flag per option: 2^4 x the kernels would
//   multiply the build (2 cores) for calls that are rare and often combine options; and why not
//   runtime branches in one instantiation: the left side alone raised the sm_90 forward at head
//   dim 64 from 128 to 134 registers (3 CTAs per SM instead of 4), and the modifiers' registers
//   (tanh, the bias, Philox state) would cost every plain call. Each kernel skips the blocks its
//   window cannot see: a per-block range of key blocks (forward, dQ) or query blocks (dK/dV).
// - The packed variable-length layout (gptfast/ops/varlen.py) is a runtime branch of every kernel,
//   not an instantiation: with p.cu_seqlens_q set, locate() maps a CTA of the (heads, total / 64 +
//   batch) grid to its sequence by a binary search over the prefix sums (device memory, no host
//   synchronisation, no max_seqlen needed) and from then on the kernel runs the dense code on that
//   sequence's lengths and row offsets; blocks past a sequence's end exit at once, so the work is
//   sum_b Tq_b * Tk_b. Dropout and ALiBi use the sequence index as the batch index, so equal
//   lengths give the dense batch bit for bit. Cost on the dense path (ptxas -v, sm_80/sm_90):
//   no spills anywhere; the plain forward 128/168/238-239 registers (was 128/167-168/238).
// - Dropout regenerates gptfast/ops/_philox.py's mask bit for bit (Philox 4x32-10, a pure
//   function of (b, h, row, column)), so any tiling draws the same bits and the backward never
//   stores the mask; kept probabilities are scaled by 1 / (1 - p) before the P V product. The key
//   (seed, offset) is read from the rng_state tensor in device memory where the words are drawn
//   (Dropout::words), not passed by value: nothing goes through the host, so CUDA-graph capture and
//   torch.compile work and a replay draws with the tensor's current key. Cost (ptxas -v, sm_80/sm_90):
//   plain kernels unchanged, no spills; modified forward at head dim 128 244/246 -> 248/252
//   registers, modified dQ 140-170 -> 148-180 (sm_80), others within +-6.
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

// --- the problem of a CTA: dense batch entry or packed sequence -------------------------------

// What one CTA works on: query head h of sequence (batch entry) b, its 64-row block `block` (of
// query rows: forward, dQ; of key rows: dK/dV), the sequence's lengths, and where its rows start
// among all sequences' rows (batch * seqlen flattened, or the packed rows) and in lse/delta.
struct Problem {
  int b, h, block;
  int Tq, Tk;
  int64_t q_row0, k_row0;  // index of row 0 of the sequence in out, dq (q_row0) and dk, dv (k_row0)
  int64_t stat0;           // lse/delta index of its query row 0 for head h
};

// Dense grid: (batch * heads, blocks). Packed grid: (heads, varlen_blocks(total, batch)), see
// attention.h; `by_keys`: the blocks count key rows (dK/dV). `reversed`: the last block first
// (longest causal rows first: better tail balance). Returns false for a packed grid's block
// without rows (exit at once: nothing to store there, and every row belongs to another block).
__device__ __forceinline__ bool locate(const AttentionParams& p, bool by_keys, bool reversed, Problem& s) {
  const int y = reversed ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
  if (p.cu_seqlens_q == nullptr) {
    s.b = blockIdx.x / p.heads, s.h = blockIdx.x % p.heads, s.block = y;
    s.Tq = p.seqlen_q, s.Tk = p.seqlen_k;
    s.q_row0 = static_cast<int64_t>(s.b) * p.seqlen_q, s.k_row0 = static_cast<int64_t>(s.b) * p.seqlen_k;
    s.stat0 = static_cast<int64_t>(blockIdx.x) * p.seqlen_q;
    return true;
  }
  const int* cu = by_keys ? p.cu_seqlens_k : p.cu_seqlens_q;
  int lo = 0, hi = p.batch;  // the last b with first block cu[b] / 64 + b <= y (b = 0: 0 <= y)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (cu[mid] / 64 + mid <= y) lo = mid;
    else hi = mid;
  }
  s.b = lo, s.h = blockIdx.x, s.block = y - (cu[lo] / 64 + lo);
  const int q0 = p.cu_seqlens_q[lo], k0 = p.cu_seqlens_k[lo];
  s.Tq = p.cu_seqlens_q[lo + 1] - q0, s.Tk = p.cu_seqlens_k[lo + 1] - k0;
  s.q_row0 = q0, s.k_row0 = k0;
  s.stat0 = static_cast<int64_t>(s.h) * p.seqlen_q + q0;
  return s.block * 64 < (by_keys ? s.Tk : s.Tq);
}

// Row 0 of head h of the sequence in an input with strides (batch, row, head).
__device__ __forceinline__ const uint16_t* seq_ptr(const AttentionParams& p, const void* base, int64_t batch_stride,
                                                   int64_t row_stride, int64_t head_stride, int b, int64_t row0,
                                                   int h) {
  const int64_t off = p.cu_seqlens_q == nullptr ? b * batch_stride : row0 * row_stride;
  return reinterpret_cast<const uint16_t*>(base) + off + h * head_stride;
}

// --- mask and score modifiers ----------------------------------------------------------------

// The window's left side: unbounded at compile time in the plain kernels (the host sends a
// bounded left side to the kHasModifiers ones), so that their mask is today's causal one.
template <bool kHasModifiers> __device__ __forceinline__ int window_left(const AttentionParams& p) {
  return kHasModifiers ? p.window_left : kWindowUnbounded;
}

// Query row i (shifted by seqlen_k - seqlen_q) sees key column j: the window of AttentionParams.
template <bool kHasModifiers>
__device__ __forceinline__ bool visible(const AttentionParams& p, int i_shifted, int j) {
  if constexpr (kHasModifiers) return j <= i_shifted + p.window_right && j >= i_shifted - p.window_left;
  return j <= i_shifted + p.window_right;
}

// The score in log2 units (kHasModifiers): log2(e) * s with s = scale * acc, softcapped
// (s = softcap * tanh(s / softcap); *t gets the tanh for the backward's 1 - t^2), minus ALiBi's
// slope * |i + seqlen_k - seqlen_q - j| (slope_log2 = log2(e) * slope, 0 without ALiBi): the order
// of gptfast/ops/attention.py's _scores.
__device__ __forceinline__ float modified_score(const AttentionParams& p, float acc, float slope_log2, int dist,
                                                float* t) {
  float x;
  if (p.softcap_log2 != 0.f) {
    const float th = tanhf(acc * p.softcap_scale);
    *t = th;
    x = th * p.softcap_log2;
  } else {
    *t = 0.f;
    x = acc * p.scale_log2;
  }
  return x - slope_log2 * fabsf(static_cast<float>(dist));
}

__device__ __forceinline__ float alibi_slope_log2(const AttentionParams& p, int b, int h) {
  return p.alibi_slopes == nullptr ? 0.f : p.alibi_slopes[b * p.alibi_batch_stride + h] * kLog2e;
}

// Philox 4x32-10 (Salmon et al., SC'11), exactly gptfast/ops/_philox.py's: ten rounds of
// (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)), the key
// bumped by the Weyl constants between rounds.
__device__ __forceinline__ void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(kM0, c[0]), lo0 = kM0 * c[0];
    const uint32_t hi1 = __umulhi(kM1, c[2]), lo1 = kM1 * c[2];
    c[0] = hi1 ^ c[1] ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c[3] ^ k1;
    c[3] = lo0;
    k0 += kW0;
    k1 += kW1;
  }
}

// The dropout mask of one (batch, head): _philox.py's layout. Score (i, j) is kept iff word j % 4
// of Philox((offset / 4 + j / 4 as two words, i, b * heads + h), seed) is >= the threshold.
// (seed, offset) are read from device memory (AttentionParams::dropout_key) where the words are
// drawn, never passed by value: a captured CUDA graph replays with whatever the tensor holds then.
struct Dropout {
  // Only the head index is held in a register: the rest is read from the kernel parameters
  // (constant memory) and the 16-byte key (global memory, an L1 hit after the first draw) where
  // it is used, which keeps the forward at head dim 128 free of spills.
  const AttentionParams& p;
  uint32_t subsequence;  // b * heads + h

  __device__ __forceinline__ Dropout(const AttentionParams& params, int bh)
      : p(params), subsequence(static_cast<uint32_t>(bh)) {}

  // The four words of row i, columns 4 * group .. 4 * group + 3.
  __device__ __forceinline__ void words(uint32_t (&w)[4], int i, int group) const {
    const uint64_t seed = p.dropout_key[0], offset = p.dropout_key[1];
    const uint64_t n = (offset >> 2) + static_cast<uint64_t>(group);
    w[0] = static_cast<uint32_t>(n);
    w[1] = static_cast<uint32_t>(n >> 32);
    w[2] = static_cast<uint32_t>(i);
    w[3] = subsequence;
    philox4x32_10(w, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  }
  // The factor of a score whose word is w[m % 4]: 1 / (1 - p) kept, 0 dropped (selects, not an
  // indexed register array, which would go to local memory).
  __device__ __forceinline__ float factor(const uint32_t (&w)[4], int m) const {
    const uint32_t r = (m & 2) ? ((m & 1) ? w[3] : w[2]) : ((m & 1) ? w[1] : w[0]);
    return r >= p.dropout_threshold ? p.dropout_scale : 0.f;
  }
};

// --- forward ----------------------------------------------------------------------------------

template <int kHeadDim> struct FwdConfig {
  // 16 rows x kHeadDim fp32 of O per warp: 128 registers at 256, so the score tile shrinks there
  // to stay clear of spills.
  static constexpr int kBlockN = kHeadDim == 256 ? 32 : 64;
  static constexpr int kThreads = 128;
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kPitch * 2;
  static constexpr int kModifierBlocks = kHeadDim == 64 ? 3 : 2;  // see modified_attention_fwd_kernel
};

// The forward of one CTA; the two kernels below differ in their launch bounds only.
template <typename T, int kHeadDim, bool kHasModifiers>
__device__ __forceinline__ void attention_fwd(const AttentionParams& p) {
  using Cfg = FwdConfig<kHeadDim>;
  constexpr int kBlockN = Cfg::kBlockN, kPitch = Cfg::kPitch, kThreads = Cfg::kThreads;
  constexpr int kNT = kBlockN / 8;   // score n-tiles per warp
  constexpr int kDT = kHeadDim / 8;  // output n-tiles per warp
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sK = sQ + kBlockM * kPitch;
  uint16_t* sV = sK + kBlockN * kPitch;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  Problem s;
  if (!locate(p, false, true, s)) return;  // longest causal rows first: better tail balance
  const int b = s.b, h = s.h, bh = b * p.heads + h;  // bh: the dropout's subsequence
  const int hk = h / (p.heads / p.heads_k);  // the kv head of query head h (GQA/MQA)
  const int m0 = s.block * kBlockM;
  const int Tq = s.Tq, Tk = s.Tk, shift = Tk - Tq;
  const uint16_t* q = seq_ptr(p, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, s.q_row0, h);
  const uint16_t* k = seq_ptr(p, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, s.k_row0, hk);
  const uint16_t* v = seq_ptr(p, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, s.k_row0, hk);

  // Key blocks any row of this block can see: columns [m0 + shift - left, m0 + 63 + shift + right].
  const int n_lo = kHasModifiers ? max(0, m0 + shift - window_left<kHasModifiers>(p)) : 0;
  const int n_hi = min(Tk, m0 + kBlockM + shift + p.window_right);  // exclusive
  const int j_begin = n_lo / kBlockN;
  const int j_end = n_hi > n_lo ? (n_hi + kBlockN - 1) / kBlockN : j_begin;  // none: out 0, lse -inf

  load_tile<kBlockM, kHeadDim, kThreads>(sQ, q, p.q_row_stride, m0, Tq, p.head_dim);
  load_tile<kBlockN, kHeadDim, kThreads>(sK, k, p.k_row_stride, j_begin * kBlockN, Tk, p.head_dim);
  cp_async_commit();
  load_tile<kBlockN, kHeadDim, kThreads>(sV, v, p.v_row_stride, j_begin * kBlockN, Tk, p.head_dim);
  cp_async_commit();

  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  // Row statistics for rows g and g + 8 of this warp, in log2 units of the scaled scores.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // partial: this thread's columns only, reduced at the end
  const int row_a = m0 + warp * 16 + g;
  float slope_log2 = 0.f;
  if constexpr (kHasModifiers) slope_log2 = alibi_slope_log2(p, b, h);

  for (int j = j_begin; j < j_end; ++j) {
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
    if (j + 1 < j_end) load_tile<kBlockN, kHeadDim, kThreads>(sK, k, p.k_row_stride, n0 + kBlockN, Tk, p.head_dim);
    cp_async_commit();  // possibly empty: keeps the group count uniform for wait<1>

    // Online softmax. Masked scores are -inf; a row whose scores are all masked so far keeps
    // max -inf and uses 0 as its offset, so that no -inf - -inf NaN appears. Blocks inside every
    // row's window (and inside seqlen_k) skip the mask.
    const bool need_mask = n0 + kBlockN > Tk || n0 + kBlockN - 1 > m0 + shift + p.window_right ||
                           (kHasModifiers && n0 < m0 + kBlockM - 1 + shift - window_left<kHasModifiers>(p));
    float blk_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + nt * 8 + 2 * t + (e & 1);
        const int row = row_a + (e >> 1) * 8;
        float x;
        if constexpr (kHasModifiers) {
          float th;
          x = modified_score(p, s[nt][e], slope_log2, row + shift - col, &th);
        } else {
          x = s[nt][e] * p.scale_log2;
        }
        if (need_mask) {
          if (col >= Tk || !visible<kHasModifiers>(p, row + shift, col)) x = -INFINITY;
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
    if constexpr (kHasModifiers) {
      if (p.dropout) {
        // The normaliser sums the undropped P (lse is dropout's too); P V gets P * keep / (1 - p).
        // Columns 2t, 2t + 1 of each n-tile share one Philox group (words 2t % 4, + 1).
        const Dropout drop(p, bh);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          const int c0 = n0 + nt * 8 + 2 * t;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            uint32_t w[4];
            drop.words(w, row_a + r * 8, c0 >> 2);
            s[nt][2 * r] *= drop.factor(w, c0);
            s[nt][2 * r + 1] *= drop.factor(w, c0 + 1);
          }
        }
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
    if (j + 1 < j_end) load_tile<kBlockN, kHeadDim, kThreads>(sV, v, p.v_row_stride, n0 + kBlockN, Tk, p.head_dim);
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
    if (row < Tq) {
      T* out = reinterpret_cast<T*>(p.out) + ((s.q_row0 + row) * H + h) * D;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        const int col = dt * 8 + 2 * t;
        if (col < D) *reinterpret_cast<uint32_t*>(out + col) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
      }
      if (t == 0) {
        p.lse[s.stat0 + row] = l == 0.f ? -INFINITY : row_max[r] * kLn2 + logf(l);
      }
    }
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128) attention_fwd_kernel(const AttentionParams p) {
  attention_fwd<T, kHeadDim, false>(p);
}

// The kHasModifiers forward ("modified_" + the plain name, which gptfast/_build.py's spill check
// matches). Left to its own occupancy target, ptxas spilled it at head dim 128 (8 bytes at 168
// registers, sm_80): the minimum of CTAs per SM lets it use what the modifiers need
// (FwdConfig::kModifierBlocks: 3 at head dim 64, as its plain kernel gets; 2 above).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128, FwdConfig<kHeadDim>::kModifierBlocks)
    modified_attention_fwd_kernel(const AttentionParams p) {
  attention_fwd<T, kHeadDim, true>(p);
}

// --- backward ---------------------------------------------------------------------------------

// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] in fp32: one warp per (b, i, h) row.
template <typename T>
__global__ void attention_bwd_delta_kernel(const AttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // Packed: one batch entry of total_q rows (delta (heads, total_q), as the dense (1, heads, T)).
  const int64_t rows = (p.cu_seqlens_q == nullptr ? static_cast<int64_t>(p.batch) * p.seqlen_q : p.seqlen_q) * p.heads;
  if (row >= rows) return;
  const int h = static_cast<int>(row % p.heads);
  const int i = static_cast<int>((row / p.heads) % p.seqlen_q);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.heads) * p.seqlen_q));
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
  if (lane == 0) p.delta[(static_cast<int64_t>(b) * p.heads + h) * p.seqlen_q + i] = acc;
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
__device__ __forceinline__ void load_row_stats(float* sLse, float* sDelta, const AttentionParams& p,
                                               const Problem& s, int m0) {
  for (int i = threadIdx.x; i < kBlockM; i += blockDim.x) {
    const int row = m0 + i;
    float lse = INFINITY, delta = 0.f;
    if (row < s.Tq) {
      const float l = p.lse_in[s.stat0 + row];
      lse = l == -INFINITY ? INFINITY : l * kLog2e;
      delta = p.delta[s.stat0 + row];
    }
    sLse[i] = lse;
    sDelta[i] = delta;
  }
}

// The backward's per-element step, shared by both kernels: from the score accumulator `acc` of
// (query row qrow, key kv) and dP = dO . v, returns dS = P (dP * keep - delta) (* (1 - t^2) under
// softcap) and sets *pd = P * keep (keep: 1 / (1 - p) kept, 0 dropped; 1 without dropout), with
// P = exp2(score_log2 - lse_log2) recomputed from the forward's logsumexp.
template <bool kHasModifiers>
__device__ __forceinline__ float backward_element(const AttentionParams& p, float acc, float dp, bool valid,
                                                  float lse_log2, float delta, float slope_log2, int dist,
                                                  float keep, float* pd) {
  if constexpr (!kHasModifiers) {
    const float pe = valid ? fast_exp2(acc * p.scale_log2 - lse_log2) : 0.f;
    *pd = pe;
    return pe * (dp - delta);
  } else {
    float th;
    const float x = modified_score(p, acc, slope_log2, dist, &th);
    const float pe = valid ? fast_exp2(x - lse_log2) : 0.f;
    *pd = pe * keep;
    const float ds = pe * (dp * keep - delta);
    return p.softcap_log2 != 0.f ? ds * (1.f - th * th) : ds;
  }
}

// dK, dV for 64 key rows (blockIdx.y) of one (batch, query head) (blockIdx.x); dQ with atomics
// when p.dq_accum is set. Warp w owns key rows 16 * (w % 4) .. +15 and, for dK/dV, head-dim half
// w / 4. Under GQA each query head writes its own dK/dV rows (dk, dv have `heads` heads).
template <typename T, int kHeadDim, bool kDouble, bool kHasModifiers>
__device__ __forceinline__ void attention_bwd_dkdv(const AttentionParams& p) {
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
  Problem s;
  if (!locate(p, true, false, s)) return;
  const int b = s.b, h = s.h, bh = b * p.heads + h;
  const int n0 = s.block * 64;
  const int Tq = s.Tq, Tk = s.Tk, shift = Tk - Tq, H = p.heads, D = p.head_dim;
  const int hk = h / (H / p.heads_k);
  const uint16_t* q = seq_ptr(p, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, s.q_row0, h);
  const uint16_t* k = seq_ptr(p, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, s.k_row0, hk);
  const uint16_t* v = seq_ptr(p, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, s.k_row0, hk);
  const uint16_t* dout = seq_ptr(p, p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, s.q_row0, h);

  load_tile<64, kHeadDim, kThreads>(sK, k, p.k_row_stride, n0, Tk, D);
  load_tile<64, kHeadDim, kThreads>(sV, v, p.v_row_stride, n0, Tk, D);
  cp_async_commit();

  float dk[kDT][4], dv[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  }
  // Query blocks that see any key of this block: rows [n0 - shift - right, n0 + 63 - shift + left]
  // (causal: rows before this block's first key, shifted, see none of it).
  const int m_lo = max(0, n0 - shift - p.window_right);
  const int m_hi = kHasModifiers ? min(Tq, n0 + 64 - shift + window_left<kHasModifiers>(p)) : Tq;  // exclusive
  const int m_begin = m_lo / kBlockM;
  const int m_blocks = m_hi > m_lo ? (m_hi + kBlockM - 1) / kBlockM : m_begin;  // none: dK = dV = 0
  const int kv_a = n0 + r * 16 + g;  // this thread's key rows: kv_a and kv_a + 8
  float slope_log2 = 0.f;
  if constexpr (kHasModifiers) slope_log2 = alibi_slope_log2(p, b, h);

  auto load_q_do = [&](int mb, uint16_t* dst_q, uint16_t* dst_do) {
    load_tile<kBlockM, kHeadDim, kThreads>(dst_q, q, p.q_row_stride, mb * kBlockM, Tq, D);
    load_tile<kBlockM, kHeadDim, kThreads>(dst_do, dout, p.do_row_stride, mb * kBlockM, Tq, D);
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
    load_row_stats(sLse, sDelta, p, s, m0);
    if (kDouble) cp_async_wait<1>();  // this block's Q/dO (and K/V) have landed
    else cp_async_wait<0>();
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T for key rows of strip r, query columns 32c .. 32c+31.
    // Unrolled by 4 only: with 128 registers of dK/dV live, a full unroll spilled at 256.
    float st[4][4], dpt[4][4];
    two_score_products<T, kHeadDim, 4>(st, sK, sQ, dpt, sV, sdO, r * 16, c * 32, lane);
    // P^T = exp2(scale_log2 * S^T - lse_log2[query]);  dS^T = P^T * (dP^T - delta[query]); with
    // modifiers, backward_element's. Dropout: the thread's scores (key kv, queries 2t, 2t + 1)
    // are words kv % 4 of two Philox calls (one per query row) for each key row.
    const Dropout drop(p, bh);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = c * 32 + nt * 8 + 2 * t + (e & 1);
        const int qrow = m0 + ql, kv = kv_a + (e >> 1) * 8;
        const bool valid = qrow < Tq && kv < Tk && visible<kHasModifiers>(p, qrow + shift, kv);
        float keep = 1.f;
        if constexpr (kHasModifiers) {
          if (p.dropout) {
            uint32_t w[4];
            drop.words(w, qrow, kv >> 2);
            keep = drop.factor(w, kv);
          }
        }
        float pd;
        dpt[nt][e] = backward_element<kHasModifiers>(p, st[nt][e], dpt[nt][e], valid, sLse[ql], sDelta[ql],
                                                     slope_log2, qrow + shift - kv, keep, &pd);
        st[nt][e] = pd;
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
      float* dq_rows = p.dq_accum + (s.q_row0 * H + h) * D;
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
            if (qrow < Tq && col < D) atomicAdd(dq_rows + static_cast<int64_t>(qrow) * H * D + col, acc[nt][e] * p.scale);
          }
        }
      }
    }
    __syncthreads();  // the next query block overwrites sQ, sdO, sPt, sdSt
  }

  // A key block no query row sees (a window, Tq < Tk causal) ran no iteration: its K/V copy is
  // still in flight, and must land before the CTA exits.
  cp_async_wait<0>();
  // dK = scale * dS^T Q (the scores were scaled); dV = P^T dO.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int kv = kv_a + half * 8;
    if (kv >= Tk) continue;
    const int64_t off = ((s.k_row0 + kv) * H + h) * D;
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

// The backward kernels, plain and with score modifiers (named as the forward's).
template <typename T, int kHeadDim, bool kDouble>
__global__ void __launch_bounds__(256, 1) attention_bwd_dkdv_kernel(const AttentionParams p) {
  attention_bwd_dkdv<T, kHeadDim, kDouble, false>(p);
}
template <typename T, int kHeadDim, bool kDouble>
__global__ void __launch_bounds__(256, 1) modified_attention_bwd_dkdv_kernel(const AttentionParams p) {
  attention_bwd_dkdv<T, kHeadDim, kDouble, true>(p);
}

// Deterministic dQ: 64 query rows (blockIdx.y, longest first) of one (batch, head) per CTA, looping
// over key blocks in a fixed order (K and V double-buffered up to head dim 128). Warp w owns query rows 16 * (w % 4) .. +15; for S/dP key
// columns 32 * (w / 4) .. +31, for dQ head-dim half w / 4.
template <typename T, int kHeadDim, bool kDouble, bool kHasModifiers>
__device__ __forceinline__ void attention_bwd_dq(const AttentionParams& p) {
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
  Problem s;
  if (!locate(p, false, true, s)) return;  // longest rows first
  const int b = s.b, h = s.h, bh = b * p.heads + h;
  const int m0 = s.block * kBlockM;
  const int Tq = s.Tq, Tk = s.Tk, shift = Tk - Tq, H = p.heads, D = p.head_dim;
  const int hk = h / (H / p.heads_k);
  const uint16_t* q = seq_ptr(p, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, s.q_row0, h);
  const uint16_t* k = seq_ptr(p, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, s.k_row0, hk);
  const uint16_t* v = seq_ptr(p, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, s.k_row0, hk);
  const uint16_t* dout = seq_ptr(p, p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, s.q_row0, h);

  load_tile<kBlockM, kHeadDim, kThreads>(sQ, q, p.q_row_stride, m0, Tq, D);
  load_tile<kBlockM, kHeadDim, kThreads>(sdO, dout, p.do_row_stride, m0, Tq, D);
  cp_async_commit();
  load_row_stats(sLse, sDelta, p, s, m0);

  float dq[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  // Key blocks any row of this block can see (as in the forward).
  const int n_lo = kHasModifiers ? max(0, m0 + shift - window_left<kHasModifiers>(p)) : 0;
  const int n_hi = min(Tk, m0 + kBlockM + shift + p.window_right);  // exclusive
  const int j_begin = n_lo / 64;
  const int n_blocks = n_hi > n_lo ? (n_hi + 63) / 64 : j_begin;  // one past the last block
  const int q_a = r * 16 + g;  // local query rows q_a and q_a + 8
  float slope_log2 = 0.f;
  if constexpr (kHasModifiers) slope_log2 = alibi_slope_log2(p, b, h);

  auto load_k_v = [&](int j, uint16_t* dst_k, uint16_t* dst_v) {
    load_tile<64, kHeadDim, kThreads>(dst_k, k, p.k_row_stride, j * 64, Tk, D);
    load_tile<64, kHeadDim, kThreads>(dst_v, v, p.v_row_stride, j * 64, Tk, D);
    cp_async_commit();
  };
  if (kDouble && j_begin < n_blocks) load_k_v(j_begin, sK0, sV0);

  for (int j = j_begin; j < n_blocks; ++j) {
    const int n0 = j * 64;
    const bool odd = kDouble && ((j - j_begin) & 1);
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
    const Dropout drop(p, bh);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int kl = c * 32 + nt * 8 + 2 * t;
      // Dropout: keys 2t, 2t + 1 of a row share one Philox group (words kl % 4, + 1).
      uint32_t w[2][4];
      if constexpr (kHasModifiers) {
        if (p.dropout) {
          drop.words(w[0], m0 + q_a, (n0 + kl) >> 2);
          drop.words(w[1], m0 + q_a + 8, (n0 + kl) >> 2);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = q_a + (e >> 1) * 8;
        const int qrow = m0 + ql, kv = n0 + kl + (e & 1);
        const bool valid = qrow < Tq && kv < Tk && visible<kHasModifiers>(p, qrow + shift, kv);
        float keep = 1.f;
        if constexpr (kHasModifiers) {
          if (p.dropout) keep = drop.factor(w[e >> 1], kv);
        }
        float pd;
        dp[nt][e] = backward_element<kHasModifiers>(p, s[nt][e], dp[nt][e], valid, sLse[ql], sDelta[ql], slope_log2,
                                                    qrow + shift - kv, keep, &pd);
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
  cp_async_wait<0>();  // rows that see no key block ran no iteration: Q/dO are still in flight

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int qrow = m0 + q_a + half * 8;
    if (qrow >= Tq) continue;
    T* dq_row = reinterpret_cast<T*>(p.dq) + ((s.q_row0 + qrow) * H + h) * D;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      const int col = c * kHalf + dt * 8 + 2 * t;
      if (col < D) *reinterpret_cast<uint32_t*>(dq_row + col) = pack2<T>(dq[dt][2 * half] * p.scale, dq[dt][2 * half + 1] * p.scale);
    }
  }
}

template <typename T, int kHeadDim, bool kDouble>
__global__ void __launch_bounds__(256, 1) attention_bwd_dq_kernel(const AttentionParams p) {
  attention_bwd_dq<T, kHeadDim, kDouble, false>(p);
}
template <typename T, int kHeadDim, bool kDouble>
__global__ void __launch_bounds__(256, 1) modified_attention_bwd_dq_kernel(const AttentionParams p) {
  attention_bwd_dq<T, kHeadDim, kDouble, true>(p);
}

// dq = dq_accum in the element type (the atomics path).
template <typename T>
__global__ void attention_bwd_dq_convert_kernel(const float* __restrict__ acc, T* __restrict__ dq, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dq[i] = from_float<T>(acc[i]);
  }
}

// The grid of 64-row blocks over `seqlen` rows (seqlen_q or seqlen_k) of every (batch, head);
// packed: of every head over all sequences (locate()).
dim3 launch_grid(const AttentionParams& p, int seqlen) {
  if (p.cu_seqlens_q == nullptr) return dim3(p.batch * p.heads, ceil_div(seqlen, 64));
  return dim3(p.heads, static_cast<unsigned>(varlen_blocks(seqlen, p.batch)));
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
      return BOOL_SWITCH(p.has_modifiers, kHasModifiers, [&] {
        using Cfg = FwdConfig<kHeadDim>;
        auto kernel = kHasModifiers ? modified_attention_fwd_kernel<elem_t, kHeadDim>
                                    : attention_fwd_kernel<elem_t, kHeadDim>;
        cudaError_t err = set_smem(kernel, Cfg::kSmemBytes);
        if (err != cudaSuccess) return err;
        const dim3 grid = launch_grid(p, p.seqlen_q);
        kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
        return cudaGetLastError();
      });
    });
  });
}

namespace {
// The dK/dV kernel, then dQ (conversion of the atomics' buffer, or the deterministic kernel).
template <typename T, int kHeadDim, bool kDouble, bool kHasModifiers>
cudaError_t launch_backward_main(const AttentionParams& p, cudaStream_t stream) {
  using Cfg = BwdConfig<kHeadDim>;
  constexpr int kSmem = Cfg::template smem_bytes<kDouble>();
  auto dkdv = kHasModifiers ? modified_attention_bwd_dkdv_kernel<T, kHeadDim, kDouble>
                            : attention_bwd_dkdv_kernel<T, kHeadDim, kDouble>;
  cudaError_t e = set_smem(dkdv, kSmem);
  if (e != cudaSuccess) return e;
  dkdv<<<launch_grid(p, p.seqlen_k), Cfg::kThreads, kSmem, stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  if (p.dq_accum != nullptr) {
    const int64_t n = total_rows_q(p) * p.heads * p.head_dim;
    const int blocks = static_cast<int>(n / 256 + 1 < 65536 ? n / 256 + 1 : 65536);
    attention_bwd_dq_convert_kernel<T><<<blocks, 256, 0, stream>>>(p.dq_accum, reinterpret_cast<T*>(p.dq), n);
    return cudaGetLastError();
  }
  auto dq = kHasModifiers ? modified_attention_bwd_dq_kernel<T, kHeadDim, kDouble>
                          : attention_bwd_dq_kernel<T, kHeadDim, kDouble>;
  e = set_smem(dq, kSmem);
  if (e != cudaSuccess) return e;
  dq<<<launch_grid(p, p.seqlen_q), Cfg::kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}
}  // namespace

cudaError_t attention_backward_launch(const AttentionParams& p, cudaStream_t stream) {
  return FP16_SWITCH(p.is_bf16, [&] {
    const int64_t rows = total_rows_q(p) * p.heads;
    attention_bwd_delta_kernel<elem_t><<<ceil_div(rows, 8), 256, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    return HEADDIM_SWITCH(p.head_dim, [&] {
      return BOOL_SWITCH(p.has_modifiers, kHasModifiers, [&] {
        using Cfg = BwdConfig<kHeadDim>;
        if constexpr (Cfg::kCanDouble) {
          if (Cfg::kSmemBytesDouble <= p.max_smem_per_block) {
            return launch_backward_main<elem_t, kHeadDim, true, kHasModifiers>(p, stream);
          }
        }
        return launch_backward_main<elem_t, kHeadDim, false, kHasModifiers>(p, stream);
      });
    });
  });
}

}  // namespace cuda
}  // namespace gptfast
