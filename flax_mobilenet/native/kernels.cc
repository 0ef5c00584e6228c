// The depthwise convolution on the CPU as XLA FFI custom calls: forward, input gradient and
// kernel gradient, NHWC, one pass over each operand and no padded copy.
//
// XLA's CPU backend computes a depthwise layer either as a grouped convolution (a slow generic
// loop) or, in flax_mobilenet's "shifted" form, as k*k separate fusions and reductions that each
// read or write a full-size activation. Here each output
// channel block is summed in registers over its taps (forward, input gradient) or over an output
// row (kernel gradient), channels innermost so that the compiler vectorises the channel loop.
//
// Built by flax_mobilenet/native/library.py with the system C++ compiler against the XLA FFI
// headers that jaxlib ships (jax.ffi.include_dir()).
//
// Sums are deterministic: work is split into a fixed number of blocks that depends on the shape
// only, never on which thread runs which block, and partial sums are added in a fixed order.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ------------------------------------------------------------------ vectors and registers

// This build's widest vector and how many registers of it the CPU has. GCC's vector extension
// lowers a vector wider than a register through the stack, a load and a store around every
// multiply-add: with 16-float tiles on an AVX2 CPU the dense kernel ran several times slower than
// XLA's dot. So the register tiles below are arrays of vectors at most a register wide, as many
// as fit in the register file.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorBytes = 32;
constexpr int kVectorRegisters = 16;
#endif

// N values of T as NV vectors V of L lanes each.
template <typename T, int N>
struct Lanes {
  static constexpr int L = std::min<int>(N, kVectorBytes / sizeof(T));
  static constexpr int NV = N / L;
  typedef T V __attribute__((vector_size(sizeof(T) * L)));
};

// Rows of a tile whose rows are NV vectors of sums each, one operand vector shared by the rows
// (NV registers) and one broadcast value a row (1): the most that fit in registers, at most 8.
constexpr int TileRows(int nv) { return std::min(8, (kVectorRegisters - nv - 1) / nv); }

// ------------------------------------------------------------------ writing outputs

constexpr int kWriteChunk = 64;  // values computed, then written out together

// Streaming stores write whole cache lines to memory without first reading them into the cache
// (an ordinary store reads each line it writes). The kernels' outputs are activation-sized arrays
// written once: n values from `src` to `out`, streamed where out is aligned to a cache line
// (both the eval and the training step ran shorter: `python -m bench`). Same values either way.
template <typename T>
inline void WriteOut(T* __restrict out, const T* __restrict src, int n) {
  int e = 0;
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(out) & 63) == 0) {
    if constexpr (std::is_same<T, float>::value) {
      for (; e + 16 <= n; e += 16) _mm512_stream_ps(out + e, _mm512_loadu_ps(src + e));
    } else if constexpr (std::is_same<T, double>::value) {
      for (; e + 8 <= n; e += 8) _mm512_stream_pd(out + e, _mm512_loadu_pd(src + e));
    }
  }
#elif defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(out) & 31) == 0) {
    if constexpr (std::is_same<T, float>::value) {
      for (; e + 8 <= n; e += 8) _mm256_stream_ps(out + e, _mm256_loadu_ps(src + e));
    } else if constexpr (std::is_same<T, double>::value) {
      for (; e + 4 <= n; e += 4) _mm256_stream_pd(out + e, _mm256_loadu_pd(src + e));
    }
  }
#endif
  for (; e < n; ++e) out[e] = src[e];
}

// Orders this thread's streaming stores before what follows (the end of its share of a parallel
// loop, after which another thread may read the output).
inline void StreamFence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// ------------------------------------------------------------------ parallel loop on XLA's pool

// body(b) for b in [0, blocks), on the calling thread and the XLA CPU intra-op thread pool.
// The caller claims blocks too, and waits only for blocks that another thread has claimed, so a
// helper task that starts late (its thread busy with another op) finds nothing to do and exits:
// no deadlock whatever the pool is doing. The state lives as long as the last helper holding it.
struct Blocks {
  std::function<void(int64_t)> body;
  int64_t count = 0;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;

  void Work() {
    int64_t mine = 0;
    for (int64_t b; (b = next.fetch_add(1)) < count; ++mine) body(b);
    if (mine == 0) return;
    StreamFence();
    std::lock_guard<std::mutex> lock(mu);
    done += mine;
    if (done == count) cv.notify_all();
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> body) {
  if (count <= 0) return;
  auto state = std::make_shared<Blocks>();
  state->body = std::move(body);
  state->count = count;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Work(); });
  state->Work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->count; });
}

// ------------------------------------------------------------------ shapes

struct Shape {
  int64_t n, h, w, c;   // input
  int64_t k, s, p;      // kernel size, stride, padding (the same on both sides, as PyTorch pads)
  int64_t ho, wo;       // output

  // Taps [first, last) of one output coordinate `o` that land inside an input of size `size`.
  void TapRange(int64_t o, int64_t size, int64_t* first, int64_t* last) const {
    const int64_t origin = o * s - p;
    *first = std::max<int64_t>(0, -origin);
    *last = std::min<int64_t>(k, size - origin);
  }
};

// Channel blocks: CB channels summed in registers. 64 floats (8 AVX2 or 4 AVX-512 registers) keep
// enough independent multiply-adds in flight; 16 and then 1 take the remainder.
template <int CB, typename F>
inline int64_t ForBlocks(int64_t c, int64_t channels, F&& f) {
  for (; c + CB <= channels; c += CB) f(std::integral_constant<int, CB>{}, c);
  return c;
}

template <typename F>
inline void ForChannelBlocks(int64_t channels, F&& f) {
  int64_t c = 0;
  c = ForBlocks<64>(c, channels, f);
  c = ForBlocks<16>(c, channels, f);
  ForBlocks<1>(c, channels, f);
}

// ------------------------------------------------------------------ forward

// The activation after a BatchNorm, by code (ACT 0: none, 1: relu, 2: relu6; flax_mobilenet.native
// ACTIVATION_CODES).
template <int ACT, typename T>
inline T Activate(T v) {
  if (ACT == 0) return v;
  v = std::max(v, T(0));
  return ACT == 2 ? std::min(v, T(6)) : v;
}

// The activation's code (0, 1, 2) as a template argument: run(std::integral_constant<int, ACT>), or
// `unknown` as the error for any other code.
template <typename Run>
ffi::Error ForActivation(int64_t activation, const char* unknown, Run&& run) {
  switch (activation) {
    case 0: run(std::integral_constant<int, 0>{}); break;
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    default: return ffi::Error::InvalidArgument(unknown);
  }
  return ffi::Error::Success();
}

// What the forward does with each output channel block's sums: store them as they are, or (eval
// mode) as act(sum * mul + add), BatchNorm's multiply-add and the activation, so that no separate
// pass reads the convolution's output back.
template <typename T>
struct Store {
  void operator()(T* __restrict out, const T* acc, int64_t c, int cb) const { WriteOut(out + c, acc, cb); }
};

template <int ACT, typename T>
struct StoreAffine {
  const T* __restrict mul;
  const T* __restrict add;
  void operator()(T* __restrict out, const T* acc, int64_t c, int cb) const {
    T values[kWriteChunk];  // cb <= 64: a channel block
    for (int e = 0; e < cb; ++e) values[e] = Activate<ACT>(acc[e] * mul[c + e] + add[c + e]);
    WriteOut(out + c, values, cb);
  }
};

// run(StoreAffine<ACT>) for the activation's code (`unknown`: the error for any other code).
template <typename T, typename Run>
ffi::Error RunAffine(int64_t activation, const T* mul, const T* add, const char* unknown, Run&& run) {
  return ForActivation(activation, unknown, [&](auto act) { run(StoreAffine<decltype(act)::value, T>{mul, add}); });
}

// y[n, oh, ow, c] = sum_{i, j} x[n, oh*s - p + i, ow*s - p + j, c] * k[i, j, c], taps in row-major
// order (as the "shifted" form adds them), for one output row (n, oh).
template <typename T, typename S>
void ForwardRow(const Shape& d, const T* __restrict x, const T* __restrict k, T* __restrict y, int64_t row, const S& store) {
  const int64_t n = row / d.ho, oh = row % d.ho;
  int64_t i0, i1;
  d.TapRange(oh, d.h, &i0, &i1);
  for (int64_t ow = 0; ow < d.wo; ++ow) {
    int64_t j0, j1;
    d.TapRange(ow, d.w, &j0, &j1);
    T* __restrict out = y + (row * d.wo + ow) * d.c;
    // Index of x[n, oh*s - p, ow*s - p, 0], which may lie in the padding: only taps inside are read.
    const int64_t origin = ((n * d.h + oh * d.s - d.p) * d.w + ow * d.s - d.p) * d.c;
    ForChannelBlocks(d.c, [&](auto cb, int64_t c) {
      constexpr int CB = decltype(cb)::value;
      T acc[CB] = {};
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          const T* xp = x + origin + (i * d.w + j) * d.c + c;
          const T* kp = k + (i * d.k + j) * d.c + c;
          for (int e = 0; e < CB; ++e) acc[e] += xp[e] * kp[e];
        }
      }
      store(out, acc, c, CB);
    });
  }
}

// ------------------------------------------------------------------ fewer than 64 channels

// Below 64 channels a pixel has no 64-channel block, and ForwardRow sums each 16-channel block as
// one chain of k*k dependent multiply-adds, loading x and the kernel for each (InputGradRow too,
// with integer divisions besides): the 112 x 112 x 32 layer that both models start with ran far
// below memory speed. Here one block of NB vectors of channels has its 3 x 3 taps in registers for a whole
// row, and PW pixels are summed together (independent chains, one load per multiply-add). Each
// sum has the same terms in the same order as ForwardRow's (InputGradRow's); the float32 outputs
// are bit-identical.
constexpr int kRowTapsPixels = 4;

// Whether a layer's forward, and at stride 1 its input gradient, go through RowTapsLine: 3 x 3
// taps, fewer than 64 channels, whole vectors of them.
template <typename T>
bool RowTapsFits(const Shape& d) {
  return d.k == 3 && d.c < 64 && d.c % (kVectorBytes / sizeof(T)) == 0;
}

// PW pixels: pixel q's sum is over taps (i, j) in [i0, i1) x [j0, j1), row-major, of
// src[q * step + i * di + j * dj] * taps[i][j]; written to out + q * out_step, channel c.
template <int K, int NB, int PW, typename T, typename V, typename S>
inline void RowTapsPixels(const T* __restrict src, const V (&taps)[K][K][NB], int64_t i0, int64_t i1, int64_t j0,
                          int64_t j1, int64_t di, int64_t dj, int64_t step, T* __restrict out, int64_t out_step,
                          int64_t c, const S& store) {
  constexpr int L = sizeof(V) / sizeof(T);
  V acc[PW][NB];
  for (int q = 0; q < PW; ++q)
    for (int b = 0; b < NB; ++b) acc[q][b] = V{};
#pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
    if (i < i0 || i >= i1) continue;
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) {
      if (j < j0 || j >= j1) continue;
      const T* sp = src + i * di + j * dj;
#pragma GCC unroll 8
      for (int q = 0; q < PW; ++q) {
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          V sv;
          std::memcpy(&sv, sp + q * step + b * L, sizeof(V));
          acc[q][b] += sv * taps[i][j][b];
        }
      }
    }
  }
  for (int q = 0; q < PW; ++q) {
    T sums[NB * L];
    for (int b = 0; b < NB; ++b) std::memcpy(sums + b * L, &acc[q][b], sizeof(V));
    store(out + q * out_step, sums, c, NB * L);
  }
}

// One row of `cols` outputs, channels [c, c + NB vectors): output column o reads src(o) (a
// pointer that may lie outside the source: only the taps in range are read) over tap rows
// [i0, i1) and columns jrange(o); columns [lo, hi) have all K, and PW of them go together.
template <int K, int NB, typename T, typename Src, typename Cols, typename Out, typename S>
inline void RowTapsLine(const T* __restrict k, int64_t channels, int64_t c, int64_t i0, int64_t i1, int64_t di,
                        int64_t dj, int64_t step, int64_t cols, int64_t lo, int64_t hi, Src&& src, Cols&& jrange,
                        Out&& out, const S& store) {
  typedef T V __attribute__((vector_size(kVectorBytes)));
  constexpr int L = kVectorBytes / sizeof(T);
  V taps[K][K][NB];
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j)
      for (int b = 0; b < NB; ++b) std::memcpy(&taps[i][j][b], k + (i * K + j) * channels + c + b * L, sizeof(V));
  auto edge = [&](int64_t o) {
    int64_t j0, j1;
    jrange(o, &j0, &j1);
    RowTapsPixels<K, NB, 1>(src(o), taps, i0, i1, j0, j1, di, dj, step, out(o), channels, c, store);
  };
  for (int64_t o = 0; o < lo; ++o) edge(o);
  int64_t o = lo;
  for (; o + kRowTapsPixels <= hi; o += kRowTapsPixels)
    RowTapsPixels<K, NB, kRowTapsPixels>(src(o), taps, i0, i1, 0, K, di, dj, step, out(o), channels, c, store);
  for (; o < hi; ++o) RowTapsPixels<K, NB, 1>(src(o), taps, i0, i1, 0, K, di, dj, step, out(o), channels, c, store);
  for (o = hi; o < cols; ++o) edge(o);
}

// Blocks of 2 vectors of channels, then of 1: line(NB, c) for each. (On AVX2 a pair's 18 taps
// do not all fit in registers; blocks of 1 vector ran no faster there: `python -m bench.kernels`.)
template <typename T, typename Line>
inline void RowTapsBlocks(int64_t channels, Line&& line) {
  constexpr int L = kVectorBytes / sizeof(T);
  int64_t c = 0;
  for (; c + 2 * L <= channels; c += 2 * L) line(std::integral_constant<int, 2>{}, c);
  for (; c + L <= channels; c += L) line(std::integral_constant<int, 1>{}, c);
}

// ForwardRow's output row (n, oh), for a layer that RowTapsFits.
template <typename T, typename S>
void RowTapsForwardRow(const Shape& d, const T* __restrict x, const T* __restrict k, T* __restrict y, int64_t row,
                       const S& store) {
  const int64_t n = row / d.ho, oh = row % d.ho;
  int64_t i0, i1;
  d.TapRange(oh, d.h, &i0, &i1);
  // Columns [lo, hi) have all 3 taps of the row inside x.
  const int64_t lo = std::min(d.wo, (d.p + d.s - 1) / d.s);
  const int64_t hi = d.w + d.p < 3 ? lo : std::max(lo, std::min(d.wo, (d.w + d.p - 3) / d.s + 1));
  RowTapsBlocks<T>(d.c, [&](auto nb, int64_t c) {
    RowTapsLine<3, decltype(nb)::value>(
        k, d.c, c, i0, i1, d.w * d.c, d.c, d.s * d.c, d.wo, lo, hi,
        [&](int64_t ow) { return x + ((n * d.h + oh * d.s - d.p) * d.w + ow * d.s - d.p) * d.c + c; },
        [&](int64_t ow, int64_t* j0, int64_t* j1) { d.TapRange(ow, d.w, j0, j1); },
        [&](int64_t ow) { return y + (row * d.wo + ow) * d.c; }, store);
  });
}

// InputGradRow's input row (n, ih) at stride 1, for a layer that RowTapsFits: dx[n, ih, iw] sums
// g[n, ih + p - i, iw + p - j] * k[i, j] over the taps inside g, i then j increasing.
template <typename T>
void RowTapsInputGradRow(const Shape& d, const T* __restrict g, const T* __restrict k, T* __restrict dx, int64_t row) {
  const int64_t n = row / d.h, ih = row % d.h;
  // Taps with 0 <= o + p - t < size: t in [o + p - size + 1, o + p + 1), within [0, 3).
  auto range = [&](int64_t o, int64_t size, int64_t* t0, int64_t* t1) {
    *t0 = std::max<int64_t>(0, o + d.p - size + 1);
    *t1 = std::min<int64_t>(3, o + d.p + 1);
  };
  int64_t i0, i1;
  range(ih, d.ho, &i0, &i1);
  // Columns [lo, hi) have all 3 taps inside g's row.
  const int64_t lo = std::min(d.w, std::max<int64_t>(0, 2 - d.p));
  const int64_t hi = std::max(lo, std::min(d.w, d.wo - d.p));
  RowTapsBlocks<T>(d.c, [&](auto nb, int64_t c) {
    RowTapsLine<3, decltype(nb)::value>(
        k, d.c, c, i0, i1, -d.wo * d.c, -d.c, d.c, d.w, lo, hi,
        [&](int64_t iw) { return g + ((n * d.ho + ih + d.p) * d.wo + iw + d.p) * d.c + c; },
        [&](int64_t iw, int64_t* j0, int64_t* j1) { range(iw, d.wo, j0, j1); },
        [&](int64_t iw) { return dx + (row * d.w + iw) * d.c; }, Store<T>{});
  });
}

// The forward's rows on the pool: RowTapsForwardRow where it fits, else ForwardRow.
template <typename T, typename S>
void ForwardRows(ffi::ThreadPool& pool, const Shape& d, const T* x, const T* k, T* y, const S& store) {
  if (RowTapsFits<T>(d)) {
    ParallelFor(pool, d.n * d.ho, [&](int64_t row) { RowTapsForwardRow(d, x, k, y, row, store); });
  } else {
    ParallelFor(pool, d.n * d.ho, [&](int64_t row) { ForwardRow(d, x, k, y, row, store); });
  }
}

// ------------------------------------------------------------------ input gradient

// dx[n, ih, iw, c] = sum of g[n, oh, ow, c] * k[i, j, c] over the taps with oh*s - p + i = ih and
// ow*s - p + j = iw: a gather, so each input element is written once, for one input row (n, ih).
template <typename T>
void InputGradRow(const Shape& d, const T* __restrict g, const T* __restrict k, T* __restrict dx, int64_t row) {
  const int64_t n = row / d.h, ih = row % d.h;
  for (int64_t iw = 0; iw < d.w; ++iw) {
    T* __restrict out = dx + (row * d.w + iw) * d.c;
    ForChannelBlocks(d.c, [&](auto cb, int64_t c) {
      constexpr int CB = decltype(cb)::value;
      T acc[CB] = {};
      for (int64_t i = 0; i < d.k; ++i) {
        const int64_t t = ih + d.p - i;  // = oh * s
        if (t < 0 || t % d.s != 0 || t / d.s >= d.ho) continue;
        const T* grow = g + (n * d.ho + t / d.s) * d.wo * d.c;
        for (int64_t j = 0; j < d.k; ++j) {
          const int64_t u = iw + d.p - j;  // = ow * s
          if (u < 0 || u % d.s != 0 || u / d.s >= d.wo) continue;
          const T* gp = grow + (u / d.s) * d.c + c;
          const T* kp = k + (i * d.k + j) * d.c + c;
          for (int e = 0; e < CB; ++e) acc[e] += gp[e] * kp[e];
        }
      }
      WriteOut(out + c, acc, CB);
    });
  }
}

// ------------------------------------------------------------------ kernel gradient

// partial[i, j, c] += sum over ow of x[n, oh*s - p + i, ow*s - p + j, c] * g[n, oh, ow, c], for one
// output row (n, oh): the sum over the row is held in registers and added to the partial once.
template <typename T>
void KernelGradRow(const Shape& d, const T* __restrict x, const T* __restrict g, T* __restrict partial, int64_t row) {
  const int64_t n = row / d.ho, oh = row % d.ho;
  int64_t i0, i1;
  d.TapRange(oh, d.h, &i0, &i1);
  const T* grow = g + row * d.wo * d.c;
  for (int64_t i = i0; i < i1; ++i) {
    const T* xrow = x + (n * d.h + oh * d.s - d.p + i) * d.w * d.c;
    for (int64_t j = 0; j < d.k; ++j) {
      // Output columns whose tap j lands inside the row: 0 <= ow*s - p + j < w.
      const int64_t ow0 = std::max<int64_t>(0, (d.p - j + d.s - 1) / d.s);
      const int64_t ow1 = std::min<int64_t>(d.wo, (d.w - 1 + d.p - j) / d.s + 1);
      if (ow0 >= ow1) continue;
      T* __restrict dk = partial + (i * d.k + j) * d.c;
      ForChannelBlocks(d.c, [&](auto cb, int64_t c) {
        constexpr int CB = decltype(cb)::value;
        T acc[CB] = {};
        for (int64_t ow = ow0; ow < ow1; ++ow) {
          const T* xp = xrow + (ow * d.s - d.p + j) * d.c + c;
          const T* gp = grow + ow * d.c + c;
          for (int e = 0; e < CB; ++e) acc[e] += xp[e] * gp[e];
        }
        for (int e = 0; e < CB; ++e) dk[c + e] += acc[e];
      });
    }
  }
}

// Rows of the kernel gradient per partial sum: a fixed number of partials (a function of the
// shape alone) keeps the result independent of the thread count and of the schedule.
constexpr int64_t kKernelGradPartials = 32;

// ------------------------------------------------------------------ 1x1 convolution's kernel gradient

// out[a, b] = sum_p x[p, a] * g[p, b]: the kernel gradient of a 1x1 convolution, x its input and g
// the cotangent of its output, pixels flattened. Its output is small (channels in by channels
// out) and its sum long (every pixel of the batch): XLA's CPU dot runs it well below its peak.
// Here each tile of AT x BT outputs is summed in registers over a
// chunk of rows that stays in L2, the tiles of a chunk taking turns.
constexpr int64_t kOuterChunk = 256;

template <int AT, int BT, typename T>
inline void OuterTile(const T* __restrict x, const T* __restrict g, int64_t A, int64_t B, int64_t r0, int64_t r1,
                      int64_t a0, int64_t b0, T* __restrict out) {
  // BT columns as NV vectors (GCC's vector extension: the compiler keeps the AT x NV sums in registers).
  typedef Lanes<T, BT> W;
  typedef typename W::V V;
  V acc[AT][W::NV];
  for (int i = 0; i < AT; ++i)
    for (int v = 0; v < W::NV; ++v) acc[i][v] = V{};
  for (int64_t p = r0; p < r1; ++p) {
    const T* xp = x + p * A + a0;
    V gv[W::NV];
    for (int v = 0; v < W::NV; ++v) std::memcpy(&gv[v], g + p * B + b0 + v * W::L, sizeof(V));
#pragma GCC unroll 8
    for (int i = 0; i < AT; ++i)
      for (int v = 0; v < W::NV; ++v) acc[i][v] += gv[v] * xp[i];
  }
  for (int i = 0; i < AT; ++i)
    for (int v = 0; v < W::NV; ++v)
      for (int j = 0; j < W::L; ++j) out[(a0 + i) * B + b0 + v * W::L + j] += acc[i][v][j];
}

// Tiles of BT output columns (16, 8, then 1 for the remainder), each over rows of AT x (as many
// as fit in registers, then 1).
template <int BT, typename T>
inline int64_t OuterColumns(const T* x, const T* g, int64_t A, int64_t B, int64_t r0, int64_t r1, int64_t b, T* out) {
  constexpr int AT = TileRows(Lanes<T, BT>::NV);
  for (; b + BT <= B; b += BT) {
    int64_t a = 0;
    for (; a + AT <= A; a += AT) OuterTile<AT, BT>(x, g, A, B, r0, r1, a, b, out);
    for (; a < A; ++a) OuterTile<1, BT>(x, g, A, B, r0, r1, a, b, out);
  }
  return b;
}

template <typename T>
void OuterRows(const T* x, const T* g, int64_t A, int64_t B, int64_t first, int64_t last, T* out) {
  for (int64_t r0 = first; r0 < last; r0 += kOuterChunk) {
    const int64_t r1 = std::min(last, r0 + kOuterChunk);
    int64_t b = OuterColumns<16>(x, g, A, B, r0, r1, 0, out);
    b = OuterColumns<8>(x, g, A, B, r0, r1, b, out);
    OuterColumns<1>(x, g, A, B, r0, r1, b, out);
  }
}

// ------------------------------------------------------------------ dense convolution (few input channels)

// y[n, oh, ow, :] = sum_{i, j, c} x[n, oh*s - p + i, ow*s - p + j, c] * w[i, j, c, :], zero outside x:
// a convolution with groups 1 whose patch (k*k*C values) is short, as the stem's 3x3 over 3 input
// channels (27) or a 1x1 layer. XLA computes the stem by writing the patches out and multiplying
// (`layers.PatchConv`), and BatchNorm reads each layer's output back in a pass of its own.
// Here each output pixel's patch is gathered into a small buffer (or, for a 1x1 layer, read in
// place), PB pixels x DB output channels are summed in registers over it, and eval-mode BatchNorm
// and the activation can be applied as they are written. All of w is read for every PB pixels:
// it has to stay in cache (flax_mobilenet.native.heuristics.DENSE_NATIVE_MAX).
struct DenseShape {
  int64_t n, h, w, c;  // input
  int64_t k, s, p;     // kernel size, stride, padding
  int64_t ho, wo, d;   // output, d channels

  int64_t Taps() const { return k * k * c; }
  bool InPlace() const { return k == 1 && s == 1 && p == 0; }
};

// Pixels summed together (independent sums in flight): as many as fit in registers with 16
// output channels each.
template <typename T>
constexpr int64_t kDensePixels = TileRows(Lanes<T, 16>::NV);
constexpr int64_t kDenseTask = 256;    // pixels per task of the parallel loop

// The patch of output pixel `pixel` (flattened n, oh, ow) into `out` (Taps() values, zero where
// a tap lies in the padding), in w's (i, j, c) order.
template <typename T>
inline void GatherPatch(const DenseShape& d, const T* __restrict x, int64_t pixel, T* __restrict out) {
  const int64_t ow = pixel % d.wo, oh = (pixel / d.wo) % d.ho, n = pixel / (d.wo * d.ho);
  const int64_t ih0 = oh * d.s - d.p, iw0 = ow * d.s - d.p;
  if (ih0 >= 0 && ih0 + d.k <= d.h && iw0 >= 0 && iw0 + d.k <= d.w) {
    // Inside: each kernel row's taps are contiguous in x.
    for (int64_t i = 0; i < d.k; ++i)
      std::memcpy(out + i * d.k * d.c, x + ((n * d.h + ih0 + i) * d.w + iw0) * d.c, sizeof(T) * d.k * d.c);
    return;
  }
  for (int64_t i = 0; i < d.k; ++i) {
    const int64_t ih = oh * d.s - d.p + i;
    for (int64_t j = 0; j < d.k; ++j) {
      const int64_t iw = ow * d.s - d.p + j;
      T* __restrict dst = out + (i * d.k + j) * d.c;
      if (ih < 0 || ih >= d.h || iw < 0 || iw >= d.w) {
        std::fill(dst, dst + d.c, T(0));
      } else {
        std::memcpy(dst, x + ((n * d.h + ih) * d.w + iw) * d.c, sizeof(T) * d.c);
      }
    }
  }
}

// Output channels [d0, d0 + DB) of PB pixels whose patches lie `taps` apart from `patches`,
// summed in registers (GCC's vector extension). A wider tile tried on AVX-512, one 32-float vector
// a pixel, ran 2-3x slower, probably through the stack as above; as two vectors it is untried.
template <int PB, int DB, typename T, typename S>
inline void DenseTile(const T* __restrict patches, int64_t taps, const T* __restrict w, int64_t D, int64_t d0,
                      T* __restrict y, const S& store) {
  typedef Lanes<T, DB> W;
  typedef typename W::V V;
  V acc[PB][W::NV];
  for (int q = 0; q < PB; ++q)
    for (int v = 0; v < W::NV; ++v) acc[q][v] = V{};
  for (int64_t t = 0; t < taps; ++t) {
    V wv[W::NV];
    for (int v = 0; v < W::NV; ++v) std::memcpy(&wv[v], w + t * D + d0 + v * W::L, sizeof(V));
#pragma GCC unroll 8
    for (int q = 0; q < PB; ++q)
      for (int v = 0; v < W::NV; ++v) acc[q][v] += wv[v] * patches[q * taps + t];
  }
  for (int q = 0; q < PB; ++q) {
    T sums[DB];
    for (int v = 0; v < W::NV; ++v) std::memcpy(sums + v * W::L, &acc[q][v], sizeof(V));
    store(y + q * D, sums, d0, DB);
  }
}

// All output channels of PB pixels, 16 at a time, then 8, then one.
template <int PB, typename T, typename S>
inline void DensePixels(const T* patches, int64_t taps, const T* w, int64_t D, T* y, const S& store) {
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) DenseTile<PB, 16>(patches, taps, w, D, d0, y, store);
  for (; d0 + 8 <= D; d0 += 8) DenseTile<PB, 8>(patches, taps, w, D, d0, y, store);
  for (; d0 < D; ++d0) DenseTile<PB, 1>(patches, taps, w, D, d0, y, store);
}

// Output pixels [first, last), PB at a time, then one at a time.
template <typename T, typename S>
void DenseRange(const DenseShape& d, const T* __restrict x, const T* __restrict w, T* __restrict y, int64_t first,
                int64_t last, T* __restrict buffer, const S& store) {
  const int64_t taps = d.Taps();
  auto patches = [&](int64_t pixel, int64_t count) -> const T* {
    if (d.InPlace()) return x + pixel * d.c;
    for (int64_t q = 0; q < count; ++q) GatherPatch(d, x, pixel + q, buffer + q * taps);
    return buffer;
  };
  int64_t pixel = first;
  constexpr int64_t PB = kDensePixels<T>;
  for (; pixel + PB <= last; pixel += PB) DensePixels<PB>(patches(pixel, PB), taps, w, d.d, y + pixel * d.d, store);
  for (; pixel < last; ++pixel) DensePixels<1>(patches(pixel, 1), taps, w, d.d, y + pixel * d.d, store);
}

template <typename T, typename S>
void DenseForward(ffi::ThreadPool& pool, const DenseShape& d, const T* x, const T* w, T* y, const S& store) {
  const int64_t pixels = d.n * d.ho * d.wo;
  const int64_t tasks = (pixels + kDenseTask - 1) / kDenseTask;
  ParallelFor(pool, tasks, [&](int64_t b) {
    std::vector<T> buffer(d.InPlace() ? 0 : kDensePixels<T> * d.Taps());
    DenseRange(d, x, w, y, b * kDenseTask, std::min(pixels, (b + 1) * kDenseTask), buffer.data(), store);
  });
}

// ------------------------------------------------------------------ FFI handlers

// The layer's shape from the dimensions of its input side (x, or dx), its kernel (k, k, C) and
// its output side (y, or the cotangent g), checked: `mismatch` is the error when they disagree.
template <typename Dims>
ffi::Error LayerShape(Dims in, Dims kernel, Dims out, int64_t stride, int64_t padding, const char* mismatch, Shape* d) {
  *d = Shape{in[0], in[1], in[2], in[3], kernel[0], stride, padding, out[1], out[2]};
  if (d->k < 1 || d->s < 1 || d->p < 0 || d->ho < 1 || d->wo < 1 ||
      d->ho != (d->h + 2 * d->p - d->k) / d->s + 1 || d->wo != (d->w + 2 * d->p - d->k) / d->s + 1) {
    return ffi::Error::InvalidArgument("depthwise: inconsistent shapes, stride or padding");
  }
  if (kernel[1] != d->k || kernel[2] != d->c || out[0] != d->n || out[3] != d->c) return ffi::Error::InvalidArgument(mismatch);
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<DT, 4> x, ffi::Buffer<DT, 3> k, ffi::ResultBuffer<DT, 4> y,
                   int64_t stride, int64_t padding) {
  Shape d;
  if (auto e = LayerShape(x.dimensions(), k.dimensions(), y->dimensions(), stride, padding,
                          "depthwise forward: kernel or output shape does not match the input", &d);
      e.failure())
    return e;
  const auto* xp = x.typed_data();
  const auto* kp = k.typed_data();
  auto* yp = y->typed_data();
  ForwardRows(pool, d, xp, kp, yp, Store<ffi::NativeType<DT>>{});
  return ffi::Error::Success();
}

// The forward with eval-mode BatchNorm and its activation applied as each output is written.
template <ffi::DataType DT>
ffi::Error ForwardAffine(ffi::ThreadPool pool, ffi::Buffer<DT, 4> x, ffi::Buffer<DT, 3> k, ffi::Buffer<DT, 1> mul,
                         ffi::Buffer<DT, 1> add, ffi::ResultBuffer<DT, 4> y, int64_t stride, int64_t padding,
                         int64_t activation) {
  using T = ffi::NativeType<DT>;
  Shape d;
  if (auto e = LayerShape(x.dimensions(), k.dimensions(), y->dimensions(), stride, padding,
                          "depthwise forward: kernel or output shape does not match the input", &d);
      e.failure())
    return e;
  if (mul.dimensions()[0] != d.c || add.dimensions()[0] != d.c)
    return ffi::Error::InvalidArgument("depthwise forward: BatchNorm's multiply and add need one value per channel");
  const auto* xp = x.typed_data();
  const auto* kp = k.typed_data();
  auto* yp = y->typed_data();
  return RunAffine<T>(activation, mul.typed_data(), add.typed_data(), "depthwise forward: unknown activation code", [&](auto store) {
    ForwardRows(pool, d, xp, kp, yp, store);
  });
}

template <ffi::DataType DT>
ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<DT, 4> g, ffi::Buffer<DT, 3> k, ffi::ResultBuffer<DT, 4> dx,
                     int64_t stride, int64_t padding) {
  Shape d;
  if (auto e = LayerShape(dx->dimensions(), k.dimensions(), g.dimensions(), stride, padding,
                          "depthwise input gradient: kernel or cotangent shape does not match", &d);
      e.failure())
    return e;
  const auto* gp = g.typed_data();
  const auto* kp = k.typed_data();
  auto* dxp = dx->typed_data();
  if (RowTapsFits<ffi::NativeType<DT>>(d) && d.s == 1) {
    ParallelFor(pool, d.n * d.h, [&](int64_t row) { RowTapsInputGradRow(d, gp, kp, dxp, row); });
  } else {
    ParallelFor(pool, d.n * d.h, [&](int64_t row) { InputGradRow(d, gp, kp, dxp, row); });
  }
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<DT, 4> x, ffi::Buffer<DT, 4> g, ffi::ResultBuffer<DT, 3> dk,
                      int64_t stride, int64_t padding) {
  using T = ffi::NativeType<DT>;
  Shape d;
  if (auto e = LayerShape(x.dimensions(), dk->dimensions(), g.dimensions(), stride, padding,
                          "depthwise kernel gradient: input, cotangent or kernel shape does not match", &d);
      e.failure())
    return e;
  const int64_t rows = d.n * d.ho, taps = d.k * d.k * d.c;
  const int64_t parts = std::min(rows, kKernelGradPartials);
  std::vector<T> partial(parts * taps, T(0));
  const auto* xp = x.typed_data();
  const auto* gp = g.typed_data();
  ParallelFor(pool, parts, [&](int64_t b) {
    for (int64_t row = rows * b / parts; row < rows * (b + 1) / parts; ++row)
      KernelGradRow(d, xp, gp, partial.data() + b * taps, row);
  });
  T* out = dk->typed_data();
  std::copy(partial.begin(), partial.begin() + taps, out);
  for (int64_t b = 1; b < parts; ++b)
    for (int64_t t = 0; t < taps; ++t) out[t] += partial[b * taps + t];
  return ffi::Error::Success();
}

// x^T g over the rows (pixels) of x (P, A) and g (P, B): split into a fixed number of partial sums
// (kKernelGradPartials, as the depthwise kernel gradient), added in order.
template <ffi::DataType DT>
ffi::Error PixelOuter(ffi::ThreadPool pool, ffi::Buffer<DT, 2> x, ffi::Buffer<DT, 2> g, ffi::ResultBuffer<DT, 2> out) {
  using T = ffi::NativeType<DT>;
  const int64_t P = x.dimensions()[0], A = x.dimensions()[1], B = g.dimensions()[1];
  if (g.dimensions()[0] != P || out->dimensions()[0] != A || out->dimensions()[1] != B)
    return ffi::Error::InvalidArgument("1x1 kernel gradient: x (P, A), g (P, B) and the output (A, B) do not match");
  const int64_t parts = std::max<int64_t>(1, std::min(P, kKernelGradPartials));
  std::vector<T> partial(parts * A * B, T(0));
  const auto* xp = x.typed_data();
  const auto* gp = g.typed_data();
  ParallelFor(pool, parts, [&](int64_t b) { OuterRows(xp, gp, A, B, P * b / parts, P * (b + 1) / parts, partial.data() + b * A * B); });
  T* o = out->typed_data();
  std::copy(partial.begin(), partial.begin() + A * B, o);
  for (int64_t b = 1; b < parts; ++b)
    for (int64_t t = 0; t < A * B; ++t) o[t] += partial[b * A * B + t];
  return ffi::Error::Success();
}

// The dense convolution's shape from x (N, H, W, C), w (k, k, C, D) and y (N, Ho, Wo, D), checked.
template <typename Dims>
ffi::Error DenseLayerShape(Dims in, Dims kernel, Dims out, int64_t stride, int64_t padding, DenseShape* d) {
  *d = DenseShape{in[0], in[1], in[2], in[3], kernel[0], stride, padding, out[1], out[2], kernel[3]};
  if (d->k < 1 || d->s < 1 || d->p < 0 || d->ho < 1 || d->wo < 1 ||
      d->ho != (d->h + 2 * d->p - d->k) / d->s + 1 || d->wo != (d->w + 2 * d->p - d->k) / d->s + 1)
    return ffi::Error::InvalidArgument("dense convolution: inconsistent shapes, stride or padding");
  if (kernel[1] != d->k || kernel[2] != d->c || out[0] != d->n || out[3] != d->d)
    return ffi::Error::InvalidArgument("dense convolution: kernel (k, k, C, D) or output (N, Ho, Wo, D) does not match the input");
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error DenseConv(ffi::ThreadPool pool, ffi::Buffer<DT, 4> x, ffi::Buffer<DT, 4> w, ffi::ResultBuffer<DT, 4> y,
                     int64_t stride, int64_t padding) {
  DenseShape d;
  if (auto e = DenseLayerShape(x.dimensions(), w.dimensions(), y->dimensions(), stride, padding, &d); e.failure()) return e;
  DenseForward(pool, d, x.typed_data(), w.typed_data(), y->typed_data(), Store<ffi::NativeType<DT>>{});
  return ffi::Error::Success();
}

// The dense convolution with eval-mode BatchNorm and its activation applied as each output is written.
template <ffi::DataType DT>
ffi::Error DenseConvAffine(ffi::ThreadPool pool, ffi::Buffer<DT, 4> x, ffi::Buffer<DT, 4> w, ffi::Buffer<DT, 1> mul,
                           ffi::Buffer<DT, 1> add, ffi::ResultBuffer<DT, 4> y, int64_t stride, int64_t padding,
                           int64_t activation) {
  using T = ffi::NativeType<DT>;
  DenseShape d;
  if (auto e = DenseLayerShape(x.dimensions(), w.dimensions(), y->dimensions(), stride, padding, &d); e.failure()) return e;
  if (mul.dimensions()[0] != d.d || add.dimensions()[0] != d.d)
    return ffi::Error::InvalidArgument("dense convolution: BatchNorm's multiply and add need one value per output channel");
  return RunAffine<T>(activation, mul.typed_data(), add.typed_data(), "dense convolution: unknown activation code",
                      [&](auto store) { DenseForward(pool, d, x.typed_data(), w.typed_data(), y->typed_data(), store); });
}

// ------------------------------------------------------------------ BatchNorm's backward sums

// sum(g') and sum(g' * (x - mean)) per channel in one read of g and x, where g' is g where the
// activation passes the gradient (ACT 0: all, 1: relu, 2: relu6; the mask recomputed from x,
// `Passes` below). Rows are cut into blocks (at most kSumBlocks, at least kRun rows each: a function
// of the shape alone, so the result does not depend on the threads), each summed in runs of kRun
// rows in T and the runs added in double; the blocks are added in order.
constexpr int64_t kSumBlocks = 32;
constexpr int64_t kRun = 64;

// The rows' split into blocks for the per-channel reductions below.
struct RowBlocks {
  int64_t rows, count;
  explicit RowBlocks(int64_t rows) : rows(rows), count(std::clamp<int64_t>(rows / kRun, 1, kSumBlocks)) {}
  int64_t First(int64_t b) const { return rows * b / count; }
  int64_t Size(int64_t b) const { return First(b + 1) - First(b); }
};

// The pre-activation of training-mode BatchNorm, (x - mean) * mul + bias with mul = scale / std,
// as one multiply-add (as XLA's fused form computes it too), and whether activation ACT lets the
// gradient through there: the backward recomputes this mask from x instead of reading the output
// back. Normalise, sums and input gradient all call this one function, so the mask is the exact
// derivative of the output the forward wrote.
template <typename T>
inline T PreActivation(T x, T mean, T mul, T bias) {
  return std::fma(x - mean, mul, bias);
}

template <int ACT, typename T>
inline bool Passes(T a) {
  return ACT == 0 || (ACT == 1 ? a > T(0) : (a > T(0)) & (a < T(6)));
}

// out[r * c + k] = value(r, k) for rows [first, last) of c channels: an elementwise pass's
// output, computed kWriteChunk values at a time and written with WriteOut.
template <typename T, typename F>
inline void WriteRows(T* __restrict out, int64_t first, int64_t last, int64_t c, F&& value) {
  T values[kWriteChunk];
  for (int64_t r = first; r < last; ++r) {
    for (int64_t k0 = 0; k0 < c; k0 += kWriteChunk) {
      const int n = int(std::min<int64_t>(kWriteChunk, c - k0));
      for (int e = 0; e < n; ++e) values[e] = value(r, k0 + e);
      WriteOut(out + r * c + k0, values, n);
    }
  }
}

// y = act(PreActivation(x)): the normalisation in training mode, once the batch statistics are
// known. Rows (pixels) [first, last) of c channels.
template <int ACT, typename T>
void NormaliseRows(const T* __restrict x, const T* __restrict mean, const T* __restrict mul, const T* __restrict bias,
                   T* __restrict y, int64_t first, int64_t last, int64_t c) {
  WriteRows(y, first, last, c, [&](int64_t r, int64_t k) {
    return Activate<ACT>(PreActivation(x[r * c + k], mean[k], mul[k], bias[k]));
  });
}

// The rows of an elementwise pass, split into tasks of about kElementwiseTask values.
constexpr int64_t kElementwiseTask = 1 << 16;

template <typename F>
void ForRows(ffi::ThreadPool& pool, int64_t rows, int64_t c, F&& rows_fn) {
  const int64_t per_task = std::max<int64_t>(1, kElementwiseTask / std::max<int64_t>(c, 1));
  const int64_t tasks = (rows + per_task - 1) / per_task;
  ParallelFor(pool, tasks, [&](int64_t b) { rows_fn(b * per_task, std::min(rows, (b + 1) * per_task)); });
}

template <ffi::DataType DT>
ffi::Error Normalise(ffi::ThreadPool pool, ffi::BufferR4<DT> x, ffi::BufferR1<DT> mean, ffi::BufferR1<DT> mul,
                     ffi::BufferR1<DT> bias, ffi::ResultBufferR4<DT> y, int64_t activation) {
  using T = ffi::NativeType<DT>;
  auto xd = x.dimensions();
  const int64_t c = xd[3], rows = xd[0] * xd[1] * xd[2];
  if (mean.dimensions()[0] != c || mul.dimensions()[0] != c || bias.dimensions()[0] != c || y->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("batch norm normalise: shapes do not match");
  const T *xp = x.typed_data(), *mp = mean.typed_data(), *up = mul.typed_data(), *bp = bias.typed_data();
  T* yp = y->typed_data();
  return ForActivation(activation, "batch norm normalise: unknown activation code", [&](auto act) {
    ForRows(pool, rows, c, [&](int64_t first, int64_t last) { NormaliseRows<decltype(act)::value>(xp, mp, up, bp, yp, first, last, c); });
  });
}

// Per-channel sums of the backward, over rows [first, last): sum(g') and sum(g' * (x - mean)),
// g' = g where the activation passes (the mask recomputed from x). Float sums over runs of kRun
// rows, added into the block's double sums.
template <int ACT, typename T>
void BackwardSumsBlock(const T* __restrict g, const T* __restrict x, const T* __restrict mean, const T* __restrict mul,
                       const T* __restrict bias, int64_t first, int64_t last, int64_t c, double* __restrict sum,
                       double* __restrict dot, T* __restrict run_sum, T* __restrict run_dot) {
  for (int64_t start = first; start < last; start += kRun) {
    const int64_t end = std::min(last, start + kRun);
    std::fill(run_sum, run_sum + c, T(0));
    std::fill(run_dot, run_dot + c, T(0));
    for (int64_t r = start; r < end; ++r) {
      const T* gr = g + r * c;
      const T* xr = x + r * c;
      for (int64_t k = 0; k < c; ++k) {
        const T grad = Passes<ACT>(PreActivation(xr[k], mean[k], mul[k], bias[k])) ? gr[k] : T(0);
        run_sum[k] += grad;
        run_dot[k] += grad * (xr[k] - mean[k]);
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      sum[k] += run_sum[k];
      dot[k] += run_dot[k];
    }
  }
}

template <ffi::DataType DT>
ffi::Error BackwardSums(ffi::ThreadPool pool, ffi::BufferR4<DT> g, ffi::BufferR4<DT> x, ffi::BufferR1<DT> mean,
                        ffi::BufferR1<DT> mul, ffi::BufferR1<DT> bias, ffi::ResultBufferR1<DT> sum_g,
                        ffi::ResultBufferR1<DT> sum_gx, int64_t activation) {
  using T = ffi::NativeType<DT>;
  auto xd = x.dimensions();
  const int64_t c = xd[3], rows = xd[0] * xd[1] * xd[2];
  if (g.element_count() != x.element_count() || mean.dimensions()[0] != c || mul.dimensions()[0] != c ||
      bias.dimensions()[0] != c || sum_g->dimensions()[0] != c || sum_gx->dimensions()[0] != c)
    return ffi::Error::InvalidArgument("batch norm backward sums: shapes do not match");
  const RowBlocks blocks(rows);
  std::vector<double> sums(blocks.count * c, 0.0), dots(blocks.count * c, 0.0);
  const T *gp = g.typed_data(), *xp = x.typed_data(), *mp = mean.typed_data(), *up = mul.typed_data(), *bp = bias.typed_data();
  auto error = ForActivation(activation, "batch norm backward sums: unknown activation code", [&](auto act) {
    ParallelFor(pool, blocks.count, [&](int64_t b) {
      std::vector<T> run(2 * c);
      BackwardSumsBlock<decltype(act)::value>(gp, xp, mp, up, bp, blocks.First(b), blocks.First(b + 1), c, sums.data() + b * c,
                                              dots.data() + b * c, run.data(), run.data() + c);
    });
  });
  if (error.failure()) return error;
  T* sum_result = sum_g->typed_data();
  T* dot_result = sum_gx->typed_data();
  for (int64_t k = 0; k < c; ++k) {
    double sum = 0, dot = 0;
    for (int64_t b = 0; b < blocks.count; ++b) {
      sum += sums[b * c + k];
      dot += dots[b * c + k];
    }
    sum_result[k] = T(sum);
    dot_result[k] = T(dot);
  }
  return ffi::Error::Success();
}

// The input gradient of training-mode BatchNorm and its activation, the standard form:
//   dx = mul * (g' - sum(g')/n - xhat * sum(g' xhat)/n) + d_mean/n + d_var * 2/n * (x - mean),
// xhat = (x - mean) * rstd, with the per-channel terms precomputed as the rows of `terms` (kDxTerms
// x c): mean, mul, bias, rstd, sum(g')/n, sum(g' xhat)/n, d_mean/n, 2 d_var/n. The mask is
// recomputed from x, so the pass reads g and x only.
constexpr int64_t kDxTerms = 8;

template <int ACT, typename T>
void InputGradRows(const T* __restrict g, const T* __restrict x, const T* __restrict terms, T* __restrict dx,
                   int64_t first, int64_t last, int64_t c) {
  const T *mean = terms, *mul = terms + c, *bias = terms + 2 * c, *rstd = terms + 3 * c;
  const T *g_bias = terms + 4 * c, *g_scale = terms + 5 * c, *g_mean = terms + 6 * c, *g_var = terms + 7 * c;
  WriteRows(dx, first, last, c, [&](int64_t r, int64_t k) {
    const T xv = x[r * c + k], centred = xv - mean[k];
    const T grad = Passes<ACT>(PreActivation(xv, mean[k], mul[k], bias[k])) ? g[r * c + k] : T(0);
    return mul[k] * (grad - g_bias[k] - centred * rstd[k] * g_scale[k]) + (g_mean[k] + g_var[k] * centred);
  });
}

template <ffi::DataType DT>
ffi::Error BackwardInput(ffi::ThreadPool pool, ffi::BufferR4<DT> g, ffi::BufferR4<DT> x, ffi::BufferR2<DT> terms,
                         ffi::ResultBufferR4<DT> dx, int64_t activation) {
  using T = ffi::NativeType<DT>;
  auto xd = x.dimensions();
  const int64_t c = xd[3], rows = xd[0] * xd[1] * xd[2];
  if (g.element_count() != x.element_count() || dx->element_count() != x.element_count() ||
      terms.dimensions()[0] != kDxTerms || terms.dimensions()[1] != c)
    return ffi::Error::InvalidArgument("batch norm input gradient: shapes do not match");
  const T *gp = g.typed_data(), *xp = x.typed_data(), *tp = terms.typed_data();
  T* dp = dx->typed_data();
  return ForActivation(activation, "batch norm input gradient: unknown activation code", [&](auto act) {
    ForRows(pool, rows, c, [&](int64_t first, int64_t last) { InputGradRows<decltype(act)::value>(gp, xp, tp, dp, first, last, c); });
  });
}

// ------------------------------------------------------------------ BatchNorm's statistics

// Per-channel mean and biased variance in one read of x. Each run of kRun rows (in cache) is read
// twice, in T: its sum, giving an approximate mean a, then the deviations from a and their
// squares. The run's exact mean and sum of squared deviations follow as a + s/m and q - s*s/m (the
// corrected two-pass algorithm: a's rounding, large when the mean is far from 0, cancels). The
// runs are merged into their block's mean and sum of squared deviations in double (Chan et al.'s
// pairwise update), and the blocks (split as in BackwardSums) are merged in order.
template <typename T>
void StatisticsBlock(const T* __restrict x, int64_t first, int64_t last, int64_t c, double* __restrict mean,
                     double* __restrict m2, T* __restrict approx, T* __restrict dev, T* __restrict square) {
  double n = 0;
  for (int64_t start = first; start < last; start += kRun) {
    const int64_t end = std::min(last, start + kRun);
    const double m = double(end - start);
    std::fill(approx, approx + c, T(0));
    std::fill(dev, dev + c, T(0));
    std::fill(square, square + c, T(0));
    for (int64_t r = start; r < end; ++r) {
      const T* xr = x + r * c;
      for (int64_t k = 0; k < c; ++k) approx[k] += xr[k];
    }
    for (int64_t k = 0; k < c; ++k) approx[k] /= T(m);
    for (int64_t r = start; r < end; ++r) {
      const T* xr = x + r * c;
      for (int64_t k = 0; k < c; ++k) {
        const T d = xr[k] - approx[k];
        dev[k] += d;
        square[k] += d * d;
      }
    }
    const double total = n + m, weight = m / total, cross = n * m / total;
    for (int64_t k = 0; k < c; ++k) {
      const double s = double(dev[k]);
      const double delta = double(approx[k]) + s / m - mean[k];
      mean[k] += delta * weight;
      m2[k] += (double(square[k]) - s * s / m) + delta * delta * cross;
    }
    n = total;
  }
}

template <ffi::DataType DT>
ffi::Error Statistics(ffi::ThreadPool pool, ffi::BufferR4<DT> x, ffi::ResultBufferR1<DT> mean_out,
                      ffi::ResultBufferR1<DT> var_out) {
  using T = ffi::NativeType<DT>;
  auto xd = x.dimensions();
  const int64_t c = xd[3], rows = xd[0] * xd[1] * xd[2];
  if (rows == 0 || mean_out->dimensions()[0] != c || var_out->dimensions()[0] != c)
    return ffi::Error::InvalidArgument("batch norm statistics: empty input or result shapes do not match");
  const RowBlocks blocks(rows);
  std::vector<double> means(blocks.count * c, 0.0), m2s(blocks.count * c, 0.0);
  const T* xp = x.typed_data();
  ParallelFor(pool, blocks.count, [&](int64_t b) {
    std::vector<T> run(3 * c);
    StatisticsBlock(xp, blocks.First(b), blocks.First(b + 1), c, means.data() + b * c, m2s.data() + b * c, run.data(), run.data() + c,
                    run.data() + 2 * c);
  });
  T* mean_result = mean_out->typed_data();
  T* var_result = var_out->typed_data();
  for (int64_t k = 0; k < c; ++k) {
    double n = 0, mean = 0, m2 = 0;
    for (int64_t b = 0; b < blocks.count; ++b) {
      const double m = double(blocks.Size(b)), total = n + m;
      const double delta = means[b * c + k] - mean;
      mean += delta * m / total;
      m2 += m2s[b * c + k] + delta * delta * n * m / total;
      n = total;
    }
    mean_result[k] = T(mean);
    var_result[k] = T(m2 / n);
  }
  return ffi::Error::Success();
}

}  // namespace

#define FLAX_MOBILENET_DEPTHWISE_HANDLERS(SUFFIX, DT)                                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseForward##SUFFIX, Forward<DT>,                                     \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR3<DT>>()                                             \
                                    .Ret<ffi::BufferR4<DT>>()                                             \
                                    .Attr<int64_t>("stride")                                               \
                                    .Attr<int64_t>("padding"));                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseForwardAffine##SUFFIX, ForwardAffine<DT>,                         \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR3<DT>>()                                             \
                                    .Arg<ffi::BufferR1<DT>>()                                             \
                                    .Arg<ffi::BufferR1<DT>>()                                             \
                                    .Ret<ffi::BufferR4<DT>>()                                             \
                                    .Attr<int64_t>("stride")                                               \
                                    .Attr<int64_t>("padding")                                              \
                                    .Attr<int64_t>("activation"));                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseInputGrad##SUFFIX, InputGrad<DT>,                                 \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR3<DT>>()                                             \
                                    .Ret<ffi::BufferR4<DT>>()                                             \
                                    .Attr<int64_t>("stride")                                               \
                                    .Attr<int64_t>("padding"));                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseKernelGrad##SUFFIX, KernelGrad<DT>,                               \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Ret<ffi::BufferR3<DT>>()                                             \
                                    .Attr<int64_t>("stride")                                               \
                                    .Attr<int64_t>("padding"));

#define FLAX_MOBILENET_POINTWISE_HANDLERS(SUFFIX, DT)                                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(PointwiseKernelGrad##SUFFIX, PixelOuter<DT>,                                \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR2<DT>>()                                             \
                                    .Arg<ffi::BufferR2<DT>>()                                             \
                                    .Ret<ffi::BufferR2<DT>>());

FLAX_MOBILENET_POINTWISE_HANDLERS(F32, ffi::F32)
FLAX_MOBILENET_POINTWISE_HANDLERS(F64, ffi::F64)

FLAX_MOBILENET_DEPTHWISE_HANDLERS(F32, ffi::F32)
FLAX_MOBILENET_DEPTHWISE_HANDLERS(F64, ffi::F64)

#define FLAX_MOBILENET_DENSE_HANDLERS(SUFFIX, DT)                                                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseConv##SUFFIX, DenseConv<DT>,                                            \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Ret<ffi::BufferR4<DT>>()                                             \
                                    .Attr<int64_t>("stride")                                               \
                                    .Attr<int64_t>("padding"));                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseConvAffine##SUFFIX, DenseConvAffine<DT>,                                \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR1<DT>>()                                             \
                                    .Arg<ffi::BufferR1<DT>>()                                             \
                                    .Ret<ffi::BufferR4<DT>>()                                             \
                                    .Attr<int64_t>("stride")                                               \
                                    .Attr<int64_t>("padding")                                              \
                                    .Attr<int64_t>("activation"));

FLAX_MOBILENET_DENSE_HANDLERS(F32, ffi::F32)
FLAX_MOBILENET_DENSE_HANDLERS(F64, ffi::F64)

#define FLAX_MOBILENET_BATCH_NORM_HANDLERS(SUFFIX, DT)                                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormBackwardSums##SUFFIX, BackwardSums<DT>,                            \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR1<DT>>()                                             \
                                    .Arg<ffi::BufferR1<DT>>()                                             \
                                    .Arg<ffi::BufferR1<DT>>()                                             \
                                    .Ret<ffi::BufferR1<DT>>()                                             \
                                    .Ret<ffi::BufferR1<DT>>()                                             \
                                    .Attr<int64_t>("activation"));                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormNormalise##SUFFIX, Normalise<DT>,                                  \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR1<DT>>()                                             \
                                    .Arg<ffi::BufferR1<DT>>()                                             \
                                    .Arg<ffi::BufferR1<DT>>()                                             \
                                    .Ret<ffi::BufferR4<DT>>()                                             \
                                    .Attr<int64_t>("activation"));                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormBackwardInput##SUFFIX, BackwardInput<DT>,                          \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Arg<ffi::BufferR2<DT>>()                                             \
                                    .Ret<ffi::BufferR4<DT>>()                                             \
                                    .Attr<int64_t>("activation"));                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormStatistics##SUFFIX, Statistics<DT>,                                \
                                ffi::Ffi::Bind()                                                           \
                                    .Ctx<ffi::ThreadPool>()                                                \
                                    .Arg<ffi::BufferR4<DT>>()                                             \
                                    .Ret<ffi::BufferR1<DT>>()                                             \
                                    .Ret<ffi::BufferR1<DT>>());

FLAX_MOBILENET_BATCH_NORM_HANDLERS(F32, ffi::F32)
FLAX_MOBILENET_BATCH_NORM_HANDLERS(F64, ffi::F64)

// The build's register file, for the Python side's choices (flax_mobilenet.native.vector_registers).
extern "C" int VectorRegisters() { return kVectorRegisters; }
