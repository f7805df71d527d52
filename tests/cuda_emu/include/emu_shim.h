// CPU emulation of the CUDA features used by csrc/cuda/*.cu, for numerical tests without a GPU
// (tests/test_cuda_emulated.py). Plain C++20, no CUDA toolkit: the stand-in cuda_*.h headers next
// to this file include it instead.
//
// Execution model: the blocks of a launch are spread over two OS threads; the CUDA threads of a
// block are ucontext coroutines on that OS thread, run round-robin and switched only at
// __syncthreads (block barrier) and at warp collectives (__shfl_xor_sync, mma.sync), which wait
// for their whole warp. Between two switches a CUDA thread runs alone, so intra-block
// interleavings are coarse: correctness of the synchronisation is checked by the race detector
// below, not by hoping for an unlucky schedule.
//
// Checks (each finding is counted in g_report; the test fails on any):
// - shared memory race detector: a shadow word per 2 bytes records the last writer and reader(s)
//   in the current barrier epoch; read-after-write, write-after-read and write-after-write by
//   different threads of the block without a __syncthreads in between are races, and so is any
//   access to the destination of a cp.async that has not been waited for;
// - cp.async copies are deferred to the latest point cp.async.wait_group allows (wrong group
//   counting reads stale or NaN data); shared memory starts filled with 0xFF (NaN in fp32, fp16
//   and bf16), as uninitialised shared memory would give garbage;
// - bounds and alignment of shared-memory accesses, of cp.async sources, 32-bit global stores
//   and atomics (against the buffers the driver registered); warp collectives in divergent or
//   partial warps; deadlocks; launch configurations; > 48 KB dynamic shared memory without
//   cudaFuncSetAttribute.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---------------- vector types, runtime types ----------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }

typedef int cudaError_t;
enum : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef void* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }  // int64_t (CUDA's 64-bit overloads)
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
// tanhf, erff, expf are the host's (glibc, <= 1 ulp); CUDA's are within 2 ulp.
// CUDA's fast division (2 ulp for |b| in [2^-126, 2^126], 0 beyond): exact here (gated_ffn.cu's SiLU).
inline float __fdividef(float a, float b) { return std::fabs(b) > 0x1p126f ? a * 0.f : a / b; }
// The upper 32 bits of the 64-bit product of two uint32 (the attention dropout's Philox rounds).
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

// ---------------- 16-bit float types (bit layouts as in CUDA) ------------------------------------
struct __half { uint16_t x; };
struct alignas(4) __half2 { __half x, y; };
struct __nv_bfloat16 { uint16_t x; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };

inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // IEEE round to nearest even
  __half r;
  std::memcpy(&r.x, &h, 2);
  return r;
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, 2);
  return static_cast<float>(v);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays (quiet) NaN
    r.x = 0x7fc0;
    return r;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  r.x = static_cast<uint16_t>(u >> 16);
  return r;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float emu_h2f(uint16_t x, bool bf) {
  return bf ? __bfloat162float(__nv_bfloat16{x}) : __half2float(__half{x});
}

// ---------------- findings ---------------------------------------------------------------------
struct EmuReport {
  std::mutex mu;
  std::map<std::string, long> counts;  // message -> occurrences
  void add(const std::string& m) {
    std::lock_guard<std::mutex> l(mu);
    counts[m]++;
  }
};
inline EmuReport g_report;
inline std::string emu_fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
inline std::string emu_fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// Global buffers registered by the driver (bounds of cp.async sources, 32-bit stores, atomics).
struct EmuBuf { const char* p; size_t n; };
inline std::vector<EmuBuf> g_bufs;
inline bool emu_in_global(const void* p, size_t n) {
  if (g_bufs.empty()) return true;
  const char* c = static_cast<const char*>(p);
  for (auto& b : g_bufs)
    if (c >= b.p && c + n <= b.p + b.n) return true;
  return false;
}

// ---------------- block runtime ------------------------------------------------------------------
enum { ST_RUN = 0, ST_BLOCKBAR = 1, ST_WARPBAR = 2, ST_DONE = 3 };

struct EmuCopy { void* dst; const void* src; int bytes; };
struct EmuShadow {
  uint32_t w_epoch = 0, r_epoch = 0;
  int16_t w_tid = -1, r_tid = -1, pending = -1;  // r_tid -2: several readers
};

struct EmuThread {
  ucontext_t ctx;
  char* stack = nullptr;
  int state = ST_RUN;
  uint64_t coll_seq = 0;  // warp collectives executed
  std::vector<EmuCopy> open_group;
  std::deque<std::vector<EmuCopy>> groups;
};

struct EmuWarp {
  int arrived = 0;
  int phase[32] = {0};
  // exchange slots, double buffered by per-lane phase
  uint32_t a[2][32][4];
  uint32_t b[2][32][2];
  float f[2][32];
  const uint16_t* p[2][32];  // ldmatrix row addresses
};

constexpr size_t kEmuStack = 256 * 1024;
constexpr size_t kEmuGuard = 4096;
constexpr size_t kEmuStaticCap = 16 * 1024;  // static __shared__ arrays of one block

struct EmuBlock {
  int n = 0;
  std::vector<EmuThread> th;
  std::vector<EmuWarp> warps;
  ucontext_t sched;
  int cur = 0;
  int block_arrived = 0;
  uint32_t epoch = 1;
  // Layout: [dynamic smem | guard | static __shared__ arrays | guard], one shadow per 2 bytes.
  std::vector<unsigned char> store;
  unsigned char* smem = nullptr;  // dynamic shared memory
  size_t smem_bytes = 0;
  unsigned char* static_base = nullptr;
  size_t static_used = 0;
  std::vector<std::pair<int, size_t>> static_slots;  // declaration line -> offset
  size_t total = 0;
  std::vector<EmuShadow> shadow;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  const char* kname = "";
};
inline thread_local EmuBlock* g_blk = nullptr;
inline thread_local int emu_site = 0;  // call-site line of the current load helper

inline unsigned char* emu_smem() { return g_blk->smem; }
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(static_cast<const unsigned char*>(p) - g_blk->smem);
}

inline void emu_yield() { swapcontext(&g_blk->th[g_blk->cur].ctx, &g_blk->sched); }

inline void __syncthreads() {
  EmuBlock* B = g_blk;
  B->th[B->cur].state = ST_BLOCKBAR;
  B->block_arrived++;
  int done = 0;
  for (auto& t : B->th) done += t.state == ST_DONE;
  if (B->block_arrived + done == B->n) {
    if (done) g_report.add(emu_fmt("[%s] __syncthreads with %d exited threads", B->kname, done));
    for (auto& t : B->th)
      if (t.state == ST_BLOCKBAR) t.state = ST_RUN;
    B->block_arrived = 0;
    B->epoch++;
    return;
  }
  emu_yield();
}

inline void emu_warp_barrier() {
  EmuBlock* B = g_blk;
  const int tid = B->cur, w = tid / 32;
  EmuWarp& W = B->warps[w];
  B->th[tid].state = ST_WARPBAR;
  B->th[tid].coll_seq++;
  W.arrived++;
  const int lanes = std::min(32, B->n - w * 32);
  if (lanes != 32) g_report.add(emu_fmt("[%s] warp collective in a partial warp", B->kname));
  if (W.arrived == lanes) {
    for (int l = 0; l < lanes; ++l) {
      EmuThread& t = B->th[w * 32 + l];
      if (t.coll_seq != B->th[tid].coll_seq)
        g_report.add(emu_fmt("[%s] warp collectives out of step (divergent warp)", B->kname));
      t.state = ST_RUN;
    }
    W.arrived = 0;
    return;
  }
  emu_yield();
}

// ---------------- shared memory: bounds and race detector ---------------------------------------
inline bool emu_is_smem(const void* p) {
  EmuBlock* B = g_blk;
  if (!B) return false;
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= B->smem && c < B->smem + B->total;
}
inline void emu_race(const char* kind, size_t off, int other, int site) {
  EmuBlock* B = g_blk;
  const int me = B->cur;
  const bool same_warp = other >= 0 && other / 32 == me / 32;
  g_report.add(emu_fmt("[%s] RACE %s at line %d (smem offset ~%zu, other thread: %s)", B->kname, kind, site,
                       off / 1024 * 1024, other == -2 ? "several" : (same_warp ? "same warp" : "other warp")));
}
inline bool emu_check_bounds(const void* p, int bytes, int site, const char* what) {
  EmuBlock* B = g_blk;
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const bool in_dyn = c >= B->smem && c + bytes <= B->smem + B->smem_bytes;
  const bool in_static = c >= B->static_base && c + bytes <= B->static_base + B->static_used;
  if (!in_dyn && !in_static) {
    g_report.add(emu_fmt("[%s] OUT OF BOUNDS smem %s at line %d (offset %ld, %zu B dynamic)", B->kname, what, site,
                         static_cast<long>(c - B->smem), B->smem_bytes));
    return false;
  }
  if (reinterpret_cast<uintptr_t>(c) % bytes != 0 && bytes <= 16)
    g_report.add(emu_fmt("[%s] MISALIGNED smem %s of %d bytes at line %d", B->kname, what, bytes, site));
  return true;
}
inline void emu_sh_read(const void* p, int bytes, int site) {
  EmuBlock* B = g_blk;
  if (!emu_check_bounds(p, bytes, site, "read")) return;
  const size_t off = static_cast<const unsigned char*>(p) - B->smem;
  const int me = B->cur;
  for (size_t u = off / 2; u < (off + bytes + 1) / 2; ++u) {
    EmuShadow& s = B->shadow[u];
    if (s.pending >= 0) emu_race("read of an in-flight cp.async destination", off, s.pending, site);
    if (s.w_epoch == B->epoch && s.w_tid != me) emu_race("read-after-write (no barrier)", off, s.w_tid, site);
    if (s.r_epoch == B->epoch) {
      if (s.r_tid != me) s.r_tid = -2;
    } else {
      s.r_epoch = B->epoch;
      s.r_tid = static_cast<int16_t>(me);
    }
  }
}
inline void emu_sh_write(const void* p, int bytes, int site, bool async_issue = false) {
  EmuBlock* B = g_blk;
  if (!emu_check_bounds(p, bytes, site, "write")) return;
  const size_t off = static_cast<const unsigned char*>(p) - B->smem;
  const int me = B->cur;
  for (size_t u = off / 2; u < (off + bytes + 1) / 2; ++u) {
    EmuShadow& s = B->shadow[u];
    if (s.pending >= 0) emu_race("write to an in-flight cp.async destination", off, s.pending, site);
    if (s.w_epoch == B->epoch && s.w_tid != me) emu_race("write-after-write (no barrier)", off, s.w_tid, site);
    if (s.r_epoch == B->epoch && s.r_tid != me) emu_race("write-after-read (no barrier)", off, s.r_tid, site);
    s.w_epoch = B->epoch;
    s.w_tid = static_cast<int16_t>(me);
    if (async_issue) s.pending = static_cast<int16_t>(me);
  }
}
inline void emu_copy_complete(const EmuCopy& c) {
  EmuBlock* B = g_blk;
  if (c.bytes) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
  const size_t off = static_cast<unsigned char*>(c.dst) - B->smem;
  for (size_t u = off / 2; u < (off + 16) / 2; ++u) {
    EmuShadow& s = B->shadow[u];
    s.pending = -1;
    s.w_epoch = B->epoch;
    s.w_tid = static_cast<int16_t>(B->cur);
  }
}

// 32-bit loads (shared: race-checked; global: bounds-checked), 16-bit shared loads, 32-bit stores.
inline uint32_t emu_ld32(const void* p) {
  if (emu_is_smem(p)) emu_sh_read(p, 4, emu_site);
  else if (!emu_in_global(p, 4)) g_report.add(emu_fmt("OUT OF BOUNDS global 32-bit load (site %d)", emu_site));
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint16_t emu_rd16(const uint16_t* p) {
  if (g_blk) emu_sh_read(p, 2, emu_site);
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
struct EmuStore32 {
  void* p;
  const EmuStore32& operator=(uint32_t v) const {
    if (p) std::memcpy(p, &v, 4);
    return *this;
  }
};
inline EmuStore32 emu_st32(void* p, int line) {
  if (emu_is_smem(p)) {
    emu_sh_write(p, 4, line);
  } else if (!emu_in_global(p, 4)) {
    g_report.add(emu_fmt("[%s] OUT OF BOUNDS global 32-bit store at line %d", g_blk ? g_blk->kname : "?", line));
    return EmuStore32{nullptr};
  }
  if (reinterpret_cast<uintptr_t>(p) % 4) g_report.add(emu_fmt("MISALIGNED 32-bit store at line %d", line));
  return EmuStore32{p};
}

// 16-byte global loads and stores (uint4): bounds against the registered buffers, 16-byte alignment.
inline void emu_check_global128(const void* p, const char* what, int line) {
  const char* k = g_blk ? g_blk->kname : "?";
  if (emu_is_smem(p)) g_report.add(emu_fmt("[%s] 16-byte %s of shared memory at line %d: not emulated", k, what, line));
  else if (!emu_in_global(p, 16))
    g_report.add(emu_fmt("[%s] OUT OF BOUNDS global 16-byte %s at line %d (call site %d)", k, what, line, emu_site));
  if (reinterpret_cast<uintptr_t>(p) % 16)
    g_report.add(emu_fmt("[%s] MISALIGNED global 16-byte %s at line %d (call site %d)", k, what, line, emu_site));
}
inline uint4 emu_ld128(const void* p, int line = __builtin_LINE()) {
  emu_check_global128(p, "load", line);
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
struct EmuStore128 {
  void* p;
  const EmuStore128& operator=(const uint4& v) const {
    if (p) std::memcpy(p, &v, 16);
    return *this;
  }
};
inline EmuStore128 emu_st128(void* p, int line) {
  emu_check_global128(p, "store", line);
  return EmuStore128{emu_in_global(p, 16) ? p : nullptr};
}

// Checked element of shared memory: reads and writes go through the race detector.
template <class T>
struct EmuShRef {
  T* p;
  int line;
  operator T() const {
    emu_sh_read(p, sizeof(T), line);
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
  }
  const EmuShRef& operator=(const T& v) const {
    emu_sh_write(p, sizeof(T), line);
    std::memcpy(p, &v, sizeof(T));
    return *this;
  }
  const EmuShRef& operator=(const EmuShRef& o) const { return *this = static_cast<T>(o); }
  const EmuShRef& operator+=(const T& v) const { return *this = static_cast<T>(*this) + v; }
};
// Pointer into shared memory (float* sLse, or a static __shared__ array passed to a helper).
template <class T>
struct EmuShPtr {
  T* p;
  int line = -1;
  EmuShPtr(T* q, int l = -1) : p(q), line(l) {}
  EmuShRef<T> operator[](int64_t i) const { return EmuShRef<T>{p + i, line}; }
  EmuShPtr operator+(int64_t i) const { return EmuShPtr(p + i, line); }
};
// Static __shared__ arrays: one storage per block, placed at the first thread's declaration.
inline void* emu_static_smem(size_t bytes, size_t align, int line) {
  EmuBlock* B = g_blk;
  for (auto& [l, off] : B->static_slots)
    if (l == line) return B->static_base + off;
  const size_t off = (B->static_used + align - 1) / align * align;
  if (off + bytes > kEmuStaticCap) {
    g_report.add(emu_fmt("[%s] static __shared__ arrays exceed the emulator's %zu B", B->kname, kEmuStaticCap));
    abort();
  }
  B->static_slots.emplace_back(line, off);
  B->static_used = off + bytes;
  return B->static_base + off;
}
template <class T, int N>
struct EmuShArr {
  T* p;
  int line;
  explicit EmuShArr(int l) : p(static_cast<T*>(emu_static_smem(sizeof(T) * N, alignof(T), l))), line(l) {}
  EmuShArr(T* q, int l) : p(q), line(l) {}
  EmuShRef<T> operator[](int64_t i) const {
    if (i < 0 || i >= N) g_report.add(emu_fmt("OUT OF BOUNDS index of a __shared__ array at line %d", line));
    return EmuShRef<T>{p + i, line};
  }
  operator EmuShPtr<T>() const { return EmuShPtr<T>(p, line); }
};
template <class T, int N, int M>
struct EmuShArr2 {
  T* p;
  int line;
  explicit EmuShArr2(int l) : p(static_cast<T*>(emu_static_smem(sizeof(T) * N * M, alignof(T), l))), line(l) {}
  EmuShArr<T, M> operator[](int64_t i) const {
    if (i < 0 || i >= N) g_report.add(emu_fmt("OUT OF BOUNDS index of a __shared__ array at line %d", line));
    return EmuShArr<T, M>(p + i * M, line);
  }
};

// ---------------- cp.async -----------------------------------------------------------------------
inline void emu_cp_async(void* dst, const void* src, int src_bytes) {
  EmuBlock* B = g_blk;
  if (src_bytes != 0 && src_bytes != 16) g_report.add("cp.async with src-size not in {0, 16}");
  if (reinterpret_cast<uintptr_t>(dst) % 16)
    g_report.add(emu_fmt("[%s] MISALIGNED cp.async dst (site %d)", B->kname, emu_site));
  if (src_bytes && reinterpret_cast<uintptr_t>(src) % 16)
    g_report.add(emu_fmt("[%s] MISALIGNED cp.async src (site %d)", B->kname, emu_site));
  if (src_bytes && !emu_in_global(src, 16))
    g_report.add(emu_fmt("[%s] OUT OF BOUNDS cp.async global source (site %d)", B->kname, emu_site));
  if (!emu_check_bounds(dst, 16, emu_site, "cp.async dst")) return;
  emu_sh_write(dst, 16, emu_site, true);
  B->th[B->cur].open_group.push_back(EmuCopy{dst, src, src_bytes});
}
inline void emu_cp_commit() {
  EmuThread& t = g_blk->th[g_blk->cur];
  t.groups.push_back(std::move(t.open_group));
  t.open_group.clear();
}
// The copies land as late as the wait allows: only groups beyond the newest n are completed.
inline void emu_cp_wait(int n) {
  EmuThread& t = g_blk->th[g_blk->cur];
  while (static_cast<int>(t.groups.size()) > n) {
    for (auto& c : t.groups.front()) emu_copy_complete(c);
    t.groups.pop_front();
  }
}

// ---------------- warp collectives ---------------------------------------------------------------
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  EmuBlock* B = g_blk;
  if (mask != 0xffffffffu) g_report.add("shfl with a partial mask");
  const int tid = B->cur, lane = tid % 32;
  EmuWarp& W = B->warps[tid / 32];
  const int ph = W.phase[lane];
  W.f[ph][lane] = v;
  emu_warp_barrier();
  const float r = W.f[ph][lane ^ lane_mask];
  W.phase[lane] ^= 1;
  return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: gathers the 32 lanes' fragments with the
// layout of the PTX ISA ("Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A (16x16): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C/D:       d0,d1 = D[g][2t..2t+1], d2,d3 = D[g+8][2t..2t+1]
// The products are summed exactly (double) and rounded once to fp32: the tensor cores' own
// accumulation order and rounding are not modelled.
template <bool BF>
inline void emu_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  EmuBlock* B = g_blk;
  const int tid = B->cur, lane = tid % 32;
  EmuWarp& W = B->warps[tid / 32];
  const int ph = W.phase[lane];
  for (int i = 0; i < 4; ++i) W.a[ph][lane][i] = a[i];
  W.b[ph][lane][0] = b[0];
  W.b[ph][lane][1] = b[1];
  emu_warp_barrier();
  float A[16][16], Bm[16][8];
  auto lo = [](uint32_t r) { return static_cast<uint16_t>(r & 0xffff); };
  auto hi = [](uint32_t r) { return static_cast<uint16_t>(r >> 16); };
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* ra = W.a[ph][l];
    A[g][2 * t] = emu_h2f(lo(ra[0]), BF), A[g][2 * t + 1] = emu_h2f(hi(ra[0]), BF);
    A[g + 8][2 * t] = emu_h2f(lo(ra[1]), BF), A[g + 8][2 * t + 1] = emu_h2f(hi(ra[1]), BF);
    A[g][2 * t + 8] = emu_h2f(lo(ra[2]), BF), A[g][2 * t + 9] = emu_h2f(hi(ra[2]), BF);
    A[g + 8][2 * t + 8] = emu_h2f(lo(ra[3]), BF), A[g + 8][2 * t + 9] = emu_h2f(hi(ra[3]), BF);
    const uint32_t* rb = W.b[ph][l];
    Bm[2 * t][g] = emu_h2f(lo(rb[0]), BF), Bm[2 * t + 1][g] = emu_h2f(hi(rb[0]), BF);
    Bm[2 * t + 8][g] = emu_h2f(lo(rb[1]), BF), Bm[2 * t + 9][g] = emu_h2f(hi(rb[1]), BF);
  }
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
    double s = 0;
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A[row][k]) * Bm[k][col];
    d[e] = static_cast<float>(static_cast<double>(d[e]) + s);
  }
  W.phase[lane] ^= 1;
}

// ldmatrix.sync.aligned.m8n8.{x2,x4}[.trans].shared.b16: lane l supplies the address of row l % 8
// of matrix l / 8 (16 bytes, 16-byte aligned, in shared memory; for x2 only lanes 0..15 count).
// Every lane gets, per matrix i, the register holding M_i[g][2t..2t+1] (g = lane / 4,
// t = lane % 4), or with .trans M_i[2t][g] and M_i[2t+1][g]; the low half is the first element.
template <int N, bool kTrans>
inline void emu_ldmatrix(uint32_t (&r)[N], const uint16_t* row) {
  EmuBlock* B = g_blk;
  const int tid = B->cur, lane = tid % 32;
  EmuWarp& W = B->warps[tid / 32];
  const int ph = W.phase[lane];
  W.p[ph][lane] = row;
  emu_warp_barrier();
  if (lane < 8 * N) {
    if (!emu_is_smem(row)) g_report.add(emu_fmt("[%s] ldmatrix row address outside shared memory (site %d)",
                                                B->kname, emu_site));
    else if ((reinterpret_cast<const unsigned char*>(row) - B->smem) % 16 != 0)
      g_report.add(emu_fmt("[%s] ldmatrix row address not 16-byte aligned (site %d)", B->kname, emu_site));
  }
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < N; ++i) {
    const uint16_t* const* rows = &W.p[ph][8 * i];
    const uint16_t lo = kTrans ? emu_rd16(rows[2 * t] + g) : emu_rd16(rows[g] + 2 * t);
    const uint16_t hi = kTrans ? emu_rd16(rows[2 * t + 1] + g) : emu_rd16(rows[g] + 2 * t + 1);
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  W.phase[lane] ^= 1;
}

// ex2.approx.ftz.f32: exact exp2 here (the hardware is within ~2 ulp), subnormal results flushed.
inline float emu_ex2(float x) {
  float y = exp2f(x);
  if (std::fpclassify(y) == FP_SUBNORMAL) y = 0.f;
  return y;
}

inline float atomicAdd(float* p, float v) {
  if (!emu_in_global(p, 4)) {
    g_report.add(emu_fmt("[%s] OUT OF BOUNDS atomicAdd", g_blk ? g_blk->kname : "?"));
    return 0;
  }
  return std::atomic_ref<float>(*p).fetch_add(v);
}

// ---------------- runtime API stand-ins ----------------------------------------------------------
inline std::mutex g_attr_mu;
inline std::map<const void*, int> g_smem_attr;
inline thread_local cudaError_t g_last_error = cudaSuccess;
inline int g_emu_sms = 2, g_emu_occupancy = 2;  // the emulated "device"
template <class K>
cudaError_t cudaFuncSetAttribute(K k, cudaFuncAttribute, int v) {
  std::lock_guard<std::mutex> l(g_attr_mu);
  if (v > 232448) return cudaErrorInvalidValue;  // sm_90: at most 227 KB dynamic smem per block
  g_smem_attr[reinterpret_cast<const void*>(k)] = v;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  if (!emu_in_global(p, n)) {
    g_report.add(emu_fmt("OUT OF BOUNDS cudaMemsetAsync of %zu B", n));
    return cudaErrorInvalidValue;
  }
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = g_emu_sms;
  return cudaSuccess;
}
template <class K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = g_emu_occupancy;
  return cudaSuccess;
}

// ---------------- launches -----------------------------------------------------------------------
struct EmuCfg {
  dim3 grid, block;
  size_t smem;
  EmuCfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

inline void emu_run_grid(const char* kname, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* arg);

// kernel<<<cfg>>>(args) is rewritten to emu_launch_impl("kernel", kernel, EmuCfg(cfg), args).
template <typename... P, typename... A>
void emu_launch_impl(const char* kname, void (*k)(P...), EmuCfg cfg, A... args) {
  const unsigned nthreads = cfg.block.x * cfg.block.y * cfg.block.z;
  if (nthreads == 0 || nthreads > 1024 || cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 ||
      cfg.grid.y > 65535 || cfg.grid.z > 65535) {
    g_report.add(emu_fmt("[%s] invalid launch configuration", kname));
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (cfg.smem > 48 * 1024) {
    std::lock_guard<std::mutex> l(g_attr_mu);
    auto it = g_smem_attr.find(reinterpret_cast<const void*>(k));
    if (it == g_smem_attr.end() || static_cast<size_t>(it->second) < cfg.smem) {
      g_report.add(emu_fmt("[%s] launch with %zu B dynamic smem without cudaFuncSetAttribute", kname, cfg.smem));
      g_last_error = cudaErrorInvalidValue;
      return;
    }
  }
  struct Pack {
    void (*k)(P...);
    std::tuple<A...> args;
  } pack{k, std::tuple<A...>(args...)};
  emu_run_grid(kname, cfg.grid, cfg.block, cfg.smem,
               [](void* a) {
                 Pack* pk = static_cast<Pack*>(a);
                 std::apply([&](auto&... x) { pk->k(x...); }, pk->args);
               },
               &pack);
}

// ---------------- scheduler (one definition: include this header in one translation unit) -------
inline void emu_entry() {
  EmuBlock* B = g_blk;
  B->body(B->body_arg);
  EmuThread& t = B->th[B->cur];
  size_t pend = t.open_group.size();
  for (auto& gr : t.groups) pend += gr.size();
  if (pend) g_report.add(emu_fmt("[%s] thread exits with %zu cp.async copies not waited for", B->kname, pend));
  t.open_group.clear();
  t.groups.clear();
  t.state = ST_DONE;
  if (B->block_arrived > 0) {  // the others wait at a barrier this thread will never reach
    int done = 0;
    for (auto& x : B->th) done += x.state == ST_DONE;
    if (B->block_arrived + done == B->n) {
      g_report.add(emu_fmt("[%s] __syncthreads completed by exited threads", B->kname));
      for (auto& x : B->th)
        if (x.state == ST_BLOCKBAR) x.state = ST_RUN;
      B->block_arrived = 0;
      B->epoch++;
    }
  }
  swapcontext(&t.ctx, &B->sched);
  abort();  // never resumed
}

inline void emu_run_block(EmuBlock* B) {
  const int n = B->n;
  for (int i = 0; i < n; ++i) {
    EmuThread& t = B->th[i];
    t.state = ST_RUN;
    t.coll_seq = 0;
    t.open_group.clear();
    t.groups.clear();
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kEmuStack;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, emu_entry, 0);
  }
  for (auto& w : B->warps) {
    w.arrived = 0;
    for (int l = 0; l < 32; ++l) w.phase[l] = 0;
  }
  B->block_arrived = 0;
  B->epoch = 1;
  B->static_used = 0;
  B->static_slots.clear();
  std::fill(B->shadow.begin(), B->shadow.end(), EmuShadow{});
  std::memset(B->store.data(), 0xff, B->store.size());  // uninitialised = NaN in every format
  const dim3 bd = blockDim;
  while (true) {
    bool any = false, all_done = true;
    for (int i = 0; i < n; ++i) {
      if (B->th[i].state == ST_RUN) {
        any = true;
        B->cur = i;
        threadIdx = dim3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y));
        swapcontext(&B->sched, &B->th[i].ctx);
      }
      if (B->th[i].state != ST_DONE) all_done = false;
    }
    if (all_done) break;
    if (!any) {
      g_report.add(emu_fmt("[%s] DEADLOCK (threads wait at barriers that cannot complete)", B->kname));
      break;
    }
  }
}

inline void emu_run_grid(const char* kname, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* arg) {
  const int nthreads = block.x * block.y * block.z;
  const long nblocks = static_cast<long>(grid.x) * grid.y * grid.z;
  std::atomic<long> next{0};
  const int nworkers = static_cast<int>(std::min<long>(2, nblocks));
  auto work = [&]() {
    EmuBlock blk;
    EmuBlock* B = &blk;
    B->th.resize(nthreads);
    for (auto& t : B->th) t.stack = static_cast<char*>(malloc(kEmuStack));
    B->n = nthreads;
    B->warps.assign((nthreads + 31) / 32, EmuWarp{});
    const size_t dyn = (smem + 15) / 16 * 16;
    B->total = dyn + kEmuGuard + kEmuStaticCap + kEmuGuard;
    B->store.assign(B->total + 16, 0);
    B->smem = B->store.data();
    while (reinterpret_cast<uintptr_t>(B->smem) % 16) B->smem++;
    B->smem_bytes = smem;
    B->static_base = B->smem + dyn + kEmuGuard;
    B->shadow.assign(B->total / 2 + 8, EmuShadow{});
    B->body = body;
    B->body_arg = arg;
    B->kname = kname;
    g_blk = B;
    blockDim = block;
    gridDim = grid;
    for (long b; (b = next.fetch_add(1)) < nblocks;) {
      blockIdx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<long>(grid.x) * grid.y));
      emu_run_block(B);
    }
    g_blk = nullptr;
    for (auto& t : B->th) free(t.stack);
  };
  std::vector<std::thread> ws;
  for (int i = 0; i < nworkers; ++i) ws.emplace_back(work);
  for (auto& w : ws) w.join();
}

// ---------------- C API shared by the drivers ----------------------------------------------------
#define EMU_API extern "C" __attribute__((visibility("default"), used))
EMU_API void emu_register(const void* p, size_t n) { g_bufs.push_back({static_cast<const char*>(p), n}); }
EMU_API void emu_clear_registry() { g_bufs.clear(); }
EMU_API void emu_set_device(int sms, int occupancy) { g_emu_sms = sms, g_emu_occupancy = occupancy; }
// Findings since the last call, one per line with its count; clears them.
EMU_API int emu_report(char* buf, int n) {
  std::string s;
  {
    std::lock_guard<std::mutex> l(g_report.mu);
    for (auto& [m, c] : g_report.counts) s += emu_fmt("%8ld x %s\n", c, m.c_str());
    g_report.counts.clear();
  }
  snprintf(buf, n, "%s", s.c_str());
  return static_cast<int>(s.size());
}
