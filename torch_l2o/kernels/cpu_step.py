r"""The fused learned step on the CPU: one compiled C++ loop per network configuration.

A fused step backend (:mod:`torch_l2o.kernels.fused`) for CPU tensors, serving what
:mod:`~torch_l2o.kernels.triton_learned` serves on CUDA: ``"pa"`` (L2O-PA, -PA-GRU,
-PA-MR with ``attend="window"``; also the study L2O-PA-FR's step, which Triton does not
serve), ``"dm"`` (L2O-DM, GSO's blocks), ``"rnnprop"``;
exactly these network classes, float32 or float64 iterates, the built-in elementwise
proxes with strengths that are numbers or tensors of the iterates' dtype (one per instance,
``(B, 1)``, or one per coordinate: a LASSO path's ``lam`` per instance, an unpenalized
intercept), ``lr`` a number or a broadcastable tensor. Anything else declines to the
PyTorch reference. Per coordinate the loop reads ``g``, ``y``,
``x`` and the network's state once, runs features, recurrent cells, PA-MR's attention,
FFN blocks and LayerNorms, heads and the prox-gradient step, and writes ``x``, ``y``
and the state once. A tile of coordinates shares one SIMD register (16 with AVX-512, 8
with AVX2, 4 otherwise), every intermediate stays in registers or L1, and a tile's state
rows are read and written with plain vector loads and stores, transposed in registers
(gathers and scatters had cost 15-40 % of a step). The reference instead streams
``(N, 4H)`` gate matrices through memory.

With the PA networks' ``hold_fixed`` (the default) a coordinate at a fixed point of the
prox-gradient map keeps its iterates and state (:func:`~torch_l2o.optim.functional.pa_update`):
the loop lists the other coordinates per chunk of 1024 and steps only them, their state
rows read and written by index (a contiguous run of a tile's width still moves as whole
vectors). The test is rounded op by op as the reference rounds it (no fused multiply-adds:
converged float32 coordinates sit on exact fixed points, and the loop must hold exactly
the reference's). On sparse problems 80-90 % of the coordinates are held late in a run,
and the step costs 4-6x less. The same library computes per-instance reductions in one
pass each: the watchdog's prox-gradient residual (:func:`prox_residuals`; with the
watchdog's records, best point and verdict for a group of one tensor,
:func:`watch_records`) and the scaled inputs' ``1 / sigma``.

It computes the reference's mathematics, not its bits: the same formulas in float32
(the step in the iterates' dtype) with Cephes-style ``exp``/``tanh`` (~1 ulp), fused
multiply-adds, other summation orders, and PA-MR's attention re-associated
(``q . (W_k k + b_k) = (W_k^T q) . k + q . b_k``, ``sum_j a_j (W_v k_j + b_v) =
W_v sum_j a_j k_j + b_v sum_j a_j``: half the work). Per step it agrees with the
reference to ~1e-6 relative (``tests/test_cpu_step.py``). Denormals flush to zero
inside the network (saturated gates produce them, at 20x the cost), not in the step.

Why not ``torch.compile`` of the update functions, the first approach measured (one
thread, PA, us per element and step): eager 0.73-0.98, the whole update compiled
0.76-1.0, compiled in cache-sized chunks 0.5-0.7 (the LSTM stays a oneDNN call, or
becomes matmuls and gate loops with a Sleef ``tanh`` 5x slower than MKL's), after
7-11 s of compilation per architecture. This loop: 0.12-0.34 us for the five
architectures at 10^4-10^6 coordinates (Adam: 0.001-0.007; Zen 4, one thread,
``python benchmarks/cpu_step_timing.py``), after 0.9-2.1 s of ``g++``,
once per machine and configuration (kind, cell, layers, hidden size, window, heads:
dtype, prox, ``lr`` and ``step`` are arguments, nothing recompiles). Libraries are
cached under ``$TORCH_L2O_CACHE`` (default ``~/.cache/torch_l2o``); without a C++
compiler (``$CXX``, ``c++``, ``g++``, ``clang++``) every call declines, with one warning.

Every size: the loop is faster than the reference from one coordinate (one step of
PA-MR on 34 coordinates 0.18 ms against 0.58 ms, on 16,000 2.3 ms against 20 ms, two
threads), so small problems (a real data set of 30 features) gain the most; the price is
one compilation per machine and configuration. Threads: up to
``torch.get_num_threads()`` (OpenMP), one per 512 coordinates (a thread then has ~100 us
of work, against ~10 us to start it).

On by default, because it is correct (tested per step and over 50-step runs), 2-14x
faster than the reference (more at larger sizes) and its one-time compilation costs
about a second. Off: :func:`set_cpu_step_backend` ``("reference")``, the environment
variable ``TORCH_L2O_CPU_STEP=reference``, or ``use_fused(False)``. Under
``TRITON_INTERPRET=1`` (the test suite's Triton interpreter) it declines unless
requested by name, ``use_fused("cpu")``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from . import fused
from .fused import lr_operands, packed_weights, prox_strengths, register_step_backend, requested, step_constants
from .triton_step import interpret_mode

__all__ = ["compile_library", "cpu_learned_step", "prox_residuals", "secant_sums", "set_cpu_step_backend",
           "watch_records"]

NAME = "cpu"
MAX_HIDDEN = 128  # the tile keeps O(hidden) vectors on the stack
KINDS = {"pa": 0, "dm": 1, "rnnprop": 2}
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_THREAD_CHUNK = 512  # coordinates per OpenMP thread, at least (~100 us of work against ~10 us to start a thread)
MARCH = "native"  # -march: the widest vectors of this machine (the tests also build narrower ones)

_SOURCE = r"""
// torch_l2o fused learned step (CPU). Configuration macros: KIND (0 pa, 1 dm, 2 rnnprop),
// LSTM (1) or GRU (0), LAYERS, HID, MR (PA-MR window attention + FFN), WIN, HEADS, GRADX,
// SCALED (the PA networks' inputs="scaled").
#include <stdint.h>
#include <math.h>
#include <float.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

// Coordinates per tile, one lane each: one vector register (vectors wider than the
// machine's are split by the compiler and spill: on AVX2, 16 lanes ran 1.7x slower than
// the PyTorch reference)
#if defined(__AVX512F__)
#define T 16
#elif defined(__AVX__)
#define T 8
#else
#define T 4
#endif
typedef float vf __attribute__((vector_size(4 * T)));
typedef int32_t vi __attribute__((vector_size(4 * T)));

static inline vf splat(float a) { vf v = {}; return v + a; }
// NaN-preserving where torch propagates NaN (clamp, relu)
static inline vf vrelu(vf a) { return a < 0.0f ? splat(0.0f) : a; }
static inline vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }

// Cephes expf, branch-free (~1 ulp; below -87.3 it returns FLT_MIN-sized values, not 0)
static inline vf vexp(vf x) {
  x = x < -87.3365447505f ? splat(-87.3365447505f) : x;
  x = x > 88.3762626647949f ? splat(88.3762626647949f) : x;
  vf fx = x * 1.44269504088896341f + 0.5f;
  vf fl = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
  fl = fl > fx ? fl - 1.0f : fl;  // floor: round to nearest
  x = x - fl * 0.693359375f + fl * 2.12194440e-4f;
  vf y = ((((1.9875691500E-4f * x + 1.3981999507E-3f) * x + 8.3334519073E-3f) * x + 4.1665795894E-2f) * x
          + 1.6666665459E-1f) * x + 5.0000001201E-1f;
  y = y * (x * x) + x + 1.0f;
  vi e = (__builtin_convertvector(fl, vi) + 127) << 23;  // 2^fl; +inf past the range
  return y * (vf)e;
}
static inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }
// Cephes tanhf: odd polynomial below 0.625 (keeps relative accuracy near 0), else 1 - 2 / (e^2|x| + 1)
static inline vf vtanh(vf x) {
  vf ax = vabs(x), s = x * x;
  vf small = ((((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s + 1.33314422036e-1f) * s
              - 3.33332819422e-1f) * s * x + x;
  vf big = 1.0f - 2.0f / (vexp(ax + ax) + 1.0f);
  big = (vf)((vi)big | ((vi)x & (int32_t)0x80000000));
  return ax < 0.625f ? small : big;
}
// e^x - 1 for ELU: a series near 0, where e^x - 1 cancels
static inline vf vexpm1(vf x) {
  vf p = x * (1.0f + x * (0.5f + x * (1.0f / 6 + x * (1.0f / 24 + x * (1.0f / 120 + x * (1.0f / 720
             + x * (1.0f / 5040)))))));
  return vabs(x) < 0.25f ? p : vexp(x) - 1.0f;
}
static inline vf vsqrt(vf x) { vf r; for (int t = 0; t < T; t++) r[t] = sqrtf(x[t]); return r; }

// out[j] = b[j] + sum_k W[j, k] in[k], W row-major (OUT, IN): 8 outputs per pass share each input
template <int OUT, int IN>
static inline void matvec(const float* __restrict W, const float* __restrict b, const vf* __restrict in,
                          vf* __restrict out) {
  constexpr int J8 = OUT - OUT % 8;
  for (int j = 0; j < J8; j += 8) {
    vf acc[8];
    for (int u = 0; u < 8; u++) acc[u] = splat(b[j + u]);
    for (int k = 0; k < IN; k++) {
      vf xk = in[k];
      for (int u = 0; u < 8; u++) acc[u] += W[(j + u) * IN + k] * xk;
    }
    for (int u = 0; u < 8; u++) out[j + u] = acc[u];
  }
  for (int j = J8; j < OUT; j++) {
    vf acc = splat(b[j]);
    for (int k = 0; k < IN; k++) acc += W[j * IN + k] * in[k];
    out[j] = acc;
  }
}

// Rows of `width` floats, row rows[t] of lane t at src + rows[t] * stride (one per coordinate)
// <-> `width` vectors; lanes >= cnt read as 0 and are not written (their rows[t] must be valid).
#if defined(__AVX512F__)
#include <immintrin.h>
// A 16 x 16 block transposed in registers: four butterfly stages, each swapping the
// off-diagonal d x d blocks of rows i and i + d (d = 8, 4, 2, 1) with two-source
// permutes. Plain loads and stores plus this cost a fraction of gathers and scatters
// (on Zen 4 they took 40 % of a PA-MR step, whose window is 7 x 16 floats a coordinate).
#define L2O_IDX(f) _mm512_setr_epi32(f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7), f(8), f(9), f(10), f(11), \
                                     f(12), f(13), f(14), f(15))
template <int D> static inline void butterfly(vf* r) {
#define LO(c) (((c) & D) ? 16 + (c) - D : (c))
#define HI(c) (((c) & D) ? 16 + (c) : (c) + D)
  const __m512i lo = L2O_IDX(LO), hi = L2O_IDX(HI);
#undef LO
#undef HI
#pragma GCC unroll 16
  for (int i = 0; i < T; i++) {
    if (i & D) continue;
    const __m512 a = (__m512)r[i], b = (__m512)r[i + D];
    r[i] = (vf)_mm512_permutex2var_ps(a, lo, b);
    r[i + D] = (vf)_mm512_permutex2var_ps(a, hi, b);
  }
}
static inline void transpose16(vf* r) { butterfly<8>(r); butterfly<4>(r); butterfly<2>(r); butterfly<1>(r); }
static inline __mmask16 first(int n) { return n >= T ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
static inline void load_t(const float* src, const int64_t* rows, int64_t stride, int width, int cnt, vf* dst) {
  for (int c = 0; c < width; c += T) {
    const __mmask16 cols = first(width - c);
    vf r[T];
#pragma GCC unroll 16
    for (int t = 0; t < T; t++)
      r[t] = (vf)_mm512_maskz_loadu_ps(t < cnt ? cols : (__mmask16)0, src + rows[t] * stride + c);
    transpose16(r);
#pragma GCC unroll 16
    for (int u = 0; u < T; u++)
      if (c + u < width) dst[c + u] = r[u];
  }
}
static inline void store_t(float* dst, const int64_t* rows, int64_t stride, int width, int cnt, const vf* src) {
  for (int c = 0; c < width; c += T) {
    const __mmask16 cols = first(width - c);
    vf r[T];
#pragma GCC unroll 16
    for (int u = 0; u < T; u++) r[u] = c + u < width ? src[c + u] : splat(0.0f);
    transpose16(r);
#pragma GCC unroll 16
    for (int t = 0; t < T; t++)
      _mm512_mask_storeu_ps(dst + rows[t] * stride + c, t < cnt ? cols : (__mmask16)0, (__m512)r[t]);
  }
}
#else
static inline void load_t(const float* src, const int64_t* rows, int64_t stride, int width, int cnt, vf* dst) {
  for (int u = 0; u < width; u++) dst[u] = splat(0.0f);
  for (int t = 0; t < cnt; t++)
    for (int u = 0; u < width; u++) dst[u][t] = src[rows[t] * stride + u];
}
static inline void store_t(float* dst, const int64_t* rows, int64_t stride, int width, int cnt, const vf* src) {
  for (int t = 0; t < cnt; t++)
    for (int u = 0; u < width; u++) dst[rows[t] * stride + u] = src[u][t];
}
#endif

#define IN0 (KIND == 2 ? HID : 2)

struct Args {  // mirrored by cpu_step.py's _Args
  int64_t n;                                  // coordinates of this tensor
  void* y; const void* g; void* x;            // iterate dtype (R)
  const void* lr; int64_t lr_div; double lr_scalar;  // R tensor indexed i / lr_div, or a number
  float* h; float* c; int64_t lstride;        // (LAYERS, *, HID) at this tensor's first coordinate
  float* m; float* v;                         // RNNProp's moments
  float* win; int64_t filled;                 // PA-MR's window (*, WIN - 1, HID) and its fill
  const float* w;                             // packed weights
  int64_t prox; double s0, s1;                // KERNEL_PROX code and strengths
  double aux0, aux1, aux2;                    // dm: p, e^-p, e^p; rnnprop: 1 - b1^(k+1), 1 - b2^(k+1)
  double ln_eps;
  int64_t nthreads;
  const float* fs; int64_t fs_div;           // SCALED: 1 / sigma per instance, indexed i / fs_div
  int64_t hold;                               // pa: coordinates with x = y = T y keep iterates and state
  const void* s0p; int64_t s0_div;            // a strength per instance or coordinate (R tensor indexed
  const void* s1p; int64_t s1_div;            // i / div) in place of the number s0 / s1, or NULL
  float* tm;                                  // FR: FISTA's t per coordinate (equal over an instance)
};

// Packed weights, in order (see _pack in cpu_step.py):
//   rnnprop: W_inp (HID, 2), b_inp
//   per layer: LSTM [W_ih | W_hh] (4 HID, IN + HID), b_ih + b_hh;
//              GRU  [W_ih | W_hh] rows r, z (2 HID, IN + HID), W_in (HID, IN), W_hn (HID, HID),
//                   b_ih + b_hh rows r, z, b_in, b_hn (r multiplies W_hn h + b_hn)
//   pa: W_hidden (HID, HID), b_hidden, w_p, w_a, b_p, b_a; then MR: W_q, W_k, W_v, b_q, b_k, b_v,
//       W_out, b_out, FFN W_0, b_0, W_1, b_1, LayerNorm w_0, b_0, w_1, b_1
//   dm, rnnprop: w_out (HID), b_out
template <int IN>
static inline const float* cell(const float* w, const vf* inp, vf* h, vf* c) {
  constexpr int K = IN + HID;
  vf xh[K];
  for (int k = 0; k < IN; k++) xh[k] = inp[k];
  for (int k = 0; k < HID; k++) xh[IN + k] = h[k];
#if LSTM  // gates i, f, g, o
  const float* W = w; w += 4 * HID * K;
  const float* b = w; w += 4 * HID;
  vf gates[4 * HID];
  matvec<4 * HID, K>(W, b, xh, gates);
  for (int u = 0; u < HID; u++) {
    vf cn = vsigmoid(gates[HID + u]) * c[u] + vsigmoid(gates[u]) * vtanh(gates[2 * HID + u]);
    c[u] = cn;
    h[u] = vsigmoid(gates[3 * HID + u]) * vtanh(cn);
  }
#else  // gates r, z, n
  const float* W = w; w += 2 * HID * K;
  const float* Win = w; w += HID * IN;
  const float* Whn = w; w += HID * HID;
  const float* b = w; w += 2 * HID;
  const float* bin = w; w += HID;
  const float* bhn = w; w += HID;
  vf rz[2 * HID], xn[HID], hn[HID];
  matvec<2 * HID, K>(W, b, xh, rz);
  matvec<HID, IN>(Win, bin, inp, xn);
  matvec<HID, HID>(Whn, bhn, h, hn);
  for (int u = 0; u < HID; u++) {
    vf r = vsigmoid(rz[u]), z = vsigmoid(rz[HID + u]);
    vf nn = vtanh(xn[u] + r * hn[u]);
    h[u] = (1.0f - z) * nn + z * h[u];
  }
#endif
  return w;
}

// The tile's lanes in the iterates' dtype R: V holds T of them (vf, or vd for float64)
typedef double vd __attribute__((vector_size(8 * T)));
typedef int64_t vl __attribute__((vector_size(8 * T)));
template <typename R> struct Lanes { typedef vf V; };
template <> struct Lanes<double> { typedef vd V; };
static inline vd vabs(vd a) { return (vd)((vl)a & 0x7fffffffffffffffLL); }
template <typename V, typename R> static inline V vsplat(R a) { V v = {}; return v + a; }
// p[0 .. cnt) into lanes (the rest 0) and back: one vector move for a whole tile
template <typename V, typename R> static inline V load_lanes(const R* p, int cnt) {
  typedef V U __attribute__((aligned(sizeof(R)), may_alias));  // unaligned, and aliasing R
  V v = {};
  if (cnt == T) v = *(const U*)p;
  else for (int t = 0; t < cnt; t++) v[t] = p[t];
  return v;
}
template <typename V, typename R> static inline void store_lanes(R* p, int cnt, V v) {
  typedef V U __attribute__((aligned(sizeof(R)), may_alias));
  if (cnt == T) *(U*)p = v;
  else for (int t = 0; t < cnt; t++) p[t] = v[t];
}
// The state rows of a later tile into cache: the tile reads them with masked loads, strided
// per coordinate; without this a step ran 7-15 % slower (PA, PA-GRU, PA-MR at 1e5 on Zen 4)
static inline void prefetch(const float* p, int64_t floats) {
  for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(p + i, 1, 3);
}
// p[(n0 + t) / div] per lane, a per-instance value: one division per tile (the index moves
// on by one at each multiple of div), not one per lane
template <typename V, typename R> static inline V per_lane(const R* p, int64_t div, int64_t n0, int cnt) {
  V v = {};
  int64_t i = n0 / div, next = (i + 1) * div;
  for (int t = 0; t < cnt; t++) {
    if (n0 + t == next) { i++; next += div; }
    v[t] = p[i];
  }
  return v;
}
// The prox-gradient point rounded op by op as the reference rounds it, without fused
// multiply-adds: whether a coordinate is a fixed point (x = y = prox_{s r}(y - s g), held)
// must be decided exactly as the reference decides it, and converged float32 coordinates
// do sit on exact fixed points (the network's dot products keep their FMAs).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
// torch_l2o.prox on the tile's lanes, codes of KERNEL_PROX (the switch outside, the lanes inside)
template <typename R, typename V>
static inline V prox_lanes(int64_t code, V z, V t, V s0, V s1) {
  const V zero = vsplat<V>(R(0)), one = vsplat<V>(R(1));
  switch (code) {
    case 1: {  // l1: sign(z) max(|z| - t lam, 0)
      V m = vabs(z) - t * s0;
      m = m < zero ? zero : m;
      return (z > zero ? one : (z < zero ? -one : z)) * m;
    }
    case 2: return z < zero ? zero : z;  // nonneg
    case 3: { V u = z - t * s0; return u < zero ? zero : u; }  // nonneg_l1
    case 4: {  // elastic_net
      V m = vabs(z) - t * s0;
      m = m < zero ? zero : m;
      return ((z > zero ? one : (z < zero ? -one : z)) * m) / (one + t * s1);
    }
    case 5: return z / (one + t * s0);  // l2sq
    case 6: { V u = z < s0 ? s0 : z; return u > s1 ? s1 : u; }  // box: s0, s1 = lo, hi
    default: return z;  // none
  }
}
// prox_{t r}(y - t g)
template <typename R, typename V>
static inline V prox_point(int64_t code, V y, V g, V t, V s0, V s1) { return prox_lanes<R>(code, y - t * g, t, s0, s1); }
#pragma GCC pop_options

// The lanes' values of p at coordinates rows[0 .. cnt) (the rest 0), and back
template <typename V, typename R> static inline V gather_lanes(const R* p, const int64_t* rows, int cnt) {
  V v = {};
  for (int t = 0; t < cnt; t++) v[t] = p[rows[t]];
  return v;
}
template <typename V, typename R> static inline void scatter_lanes(R* p, const int64_t* rows, int cnt, V v) {
  for (int t = 0; t < cnt; t++) p[rows[t]] = v[t];
}
template <typename V, typename R> static inline V per_row(const R* p, int64_t div, const int64_t* rows, int cnt) {
  V v = {};
  for (int t = 0; t < cnt; t++) v[t] = p[rows[t] / div];
  return v;
}
// A prox strength on the lanes: the number s, or the R tensor p indexed i / div at the
// coordinates n0 + t (contig) or rows[t]
template <typename V, typename R>
static inline V strength(const void* p, int64_t div, double s, bool contig, int64_t n0, const int64_t* rows, int cnt) {
  return !p ? vsplat<V>((R)s) : contig ? per_lane<V>((const R*)p, div, n0, cnt) : per_row<V>((const R*)p, div, rows, cnt);
}

// One tile: lane t steps coordinate rows[t] (t < cnt; later entries repeat a valid row).
// `contig`: rows[t] = rows[0] + t, so g, y, x move as whole vectors; otherwise (the pa
// kind's held coordinates left out) lane by lane. ahead[0 .. nahead): a later tile's rows,
// whose state is prefetched.
template <typename R>
static void tile(const Args& a, const int64_t* rows, int cnt, bool contig, const int64_t* ahead, int nahead) {
  const int64_t n0 = rows[0];
  R* y = (R*)a.y;
  const R* g = (const R*)a.g;
  R* x = (R*)a.x;
#if defined(__SSE__)
  // Denormals flush to zero in the network: saturated gates make them, and each costs a
  // microcode assist (measured: 20x slower steps). The step itself rounds as the caller does.
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040);
#define RESTORE_CSR() _mm_setcsr(csr)
#else
#define RESTORE_CSR()
#endif
  typedef typename Lanes<R>::V V;
  const V gR = contig ? load_lanes<V>(g + n0, cnt) : gather_lanes<V>(g, rows, cnt);
  const V yR = contig ? load_lanes<V>(y + n0, cnt) : gather_lanes<V>(y, rows, cnt);
  const V lrv = !a.lr ? vsplat<V>((R)a.lr_scalar)
                : contig ? per_lane<V>((const R*)a.lr, a.lr_div, n0, cnt) : per_row<V>((const R*)a.lr, a.lr_div, rows, cnt);
  const V s0v = strength<V, R>(a.s0p, a.s0_div, a.s0, contig, n0, rows, cnt);
  const V s1v = strength<V, R>(a.s1p, a.s1_div, a.s1, contig, n0, rows, cnt);
  vf gv = __builtin_convertvector(gR, vf), yv = __builtin_convertvector(yR, vf);
  for (int t = 0; t < nahead; t++) {  // the state of a later tile
    for (int l = 0; l < LAYERS; l++) {
      prefetch(a.h + l * a.lstride + ahead[t] * HID, HID);
#if LSTM
      prefetch(a.c + l * a.lstride + ahead[t] * HID, HID);
#endif
    }
#if MR && WIN > 1
    prefetch(a.win + ahead[t] * (WIN - 1) * HID, (WIN - 1) * HID);
#endif
  }
  const float* w = a.w;
  vf inp[IN0];
#if SCALED  // the PA networks' scale-free [s g, y] / sigma, 1 / sigma per instance computed before
  {
    vf lv = __builtin_convertvector(lrv, vf);
    vf iv = contig ? per_lane<vf>(a.fs, a.fs_div, n0, cnt) : per_row<vf>(a.fs, a.fs_div, rows, cnt);
    inp[0] = (gv * lv) * iv; inp[1] = yv * iv;
  }
#elif KIND == 0 || GRADX  // [g, y]
  inp[0] = gv; inp[1] = yv;
#elif KIND == 1  // L2O-DM's preprocessing: (log|g| / p, sign g) if |g| >= e^-p, else (-1, e^p g)
  {
    const float p = (float)a.aux0, lo = (float)a.aux1, hi = (float)a.aux2;
    vf ag = vabs(gv);
    vf lg = ag < lo ? splat(lo) : ag;
    for (int t = 0; t < T; t++) lg[t] = logf(lg[t]);
    vf sg = gv > 0.0f ? splat(1.0f) : (gv < 0.0f ? splat(-1.0f) : gv);
    inp[0] = ag >= lo ? lg / p : splat(-1.0f);
    inp[1] = ag >= lo ? sg : hi * gv;
  }
#else  // RNNProp: bias-corrected moments (beta 0.95), then ELU(Linear(2, HID))
  {
    float* mp = a.m + n0; float* vp = a.v + n0;  // contiguous: only the pa kind holds coordinates
    vf mv = load_lanes<vf>(mp, cnt), vv = load_lanes<vf>(vp, cnt);
    mv = 0.95f * mv + (float)(1 - 0.95) * gv;
    vv = 0.95f * vv + ((float)(1 - 0.95) * gv) * gv;
    store_lanes(mp, cnt, mv);
    store_lanes(vp, cnt, vv);
    vf den = vsqrt(vv / (float)a.aux1) + 1e-8f;
    vf f[2] = {gv / den, (mv / (float)a.aux0) / den};
    const float* Wi = w; w += HID * 2;
    const float* bi = w; w += HID;
    matvec<HID, 2>(Wi, bi, f, inp);
    for (int u = 0; u < HID; u++) inp[u] = inp[u] > 0.0f ? inp[u] : vexpm1(inp[u]);
  }
#endif
  vf h[HID], c[HID], o[HID];
  for (int l = 0; l < LAYERS; l++) {
    float* hp = a.h + l * a.lstride;
    load_t(hp, rows, HID, HID, cnt, h);
#if LSTM
    float* cp = a.c + l * a.lstride;
    load_t(cp, rows, HID, HID, cnt, c);
#endif
    w = l == 0 ? cell<IN0>(w, inp, h, c) : cell<HID>(w, o, h, c);
    store_t(hp, rows, HID, HID, cnt, h);
#if LSTM
    store_t(cp, rows, HID, HID, cnt, c);
#endif
    for (int u = 0; u < HID; u++) o[u] = h[u];
  }
#if KIND == 0
  const float* hw = w;  // the heads
  w += HID * HID + 3 * HID + 2;
#if MR
  {
    constexpr int DH = HID / HEADS;
    const float* Wq = w; const float* Wk = Wq + HID * HID; const float* Wv = Wk + HID * HID;
    const float* bq = Wv + HID * HID; const float* bk = bq + HID; const float* bv = bk + HID;
    const float* Wo = bv + HID; const float* bo = Wo + HID * HID;
    const float* Wf = bo + HID;  // FFN i: W at Wf + i (HID^2 + HID), b after it
    const float* ln = Wf + 2 * (HID * HID + HID);  // LayerNorm i: w at ln + 2 i HID, b after it
    vf q[HID];
    matvec<HID, HID>(Wq, bq, o, q);
    vf qk[HEADS][HID], qb[HEADS];  // score of key k for head hh: (qk[hh] . k + qb[hh]) / sqrt(DH)
    for (int hh = 0; hh < HEADS; hh++) {
      qb[hh] = splat(0.0f);
      for (int k = 0; k < HID; k++) qk[hh][k] = splat(0.0f);
      for (int i = hh * DH; i < (hh + 1) * DH; i++) {
        qb[hh] += q[i] * bk[i];
        for (int k = 0; k < HID; k++) qk[hh][k] += Wk[i * HID + k] * q[i];
      }
    }
    const float scale = (float)sqrt((double)DH);
    vf keys[WIN][HID];  // oldest first, the current output last
#if WIN > 1
    float* wp = a.win;
    load_t(wp, rows, (WIN - 1) * HID, (WIN - 1) * HID, cnt, keys[0]);  // keys[0 .. WIN - 2], contiguous
#endif
    for (int k = 0; k < HID; k++) keys[WIN - 1][k] = o[k];
    vf s[WIN][HEADS], mx[HEADS];
    for (int hh = 0; hh < HEADS; hh++) mx[hh] = splat(-INFINITY);
    for (int j = 0; j < WIN; j++) {
      if (j < WIN - 1 - a.filled) continue;  // an empty slot: masked out
      for (int hh = 0; hh < HEADS; hh++) {
        vf acc = qb[hh];
        for (int k = 0; k < HID; k++) acc += qk[hh][k] * keys[j][k];
        s[j][hh] = acc / scale;
        mx[hh] = s[j][hh] > mx[hh] ? s[j][hh] : mx[hh];
      }
    }
    vf kbar[HEADS][HID], asum[HEADS];  // sum_j a_j k_j and sum_j a_j, per head
    for (int hh = 0; hh < HEADS; hh++) {
      vf den = splat(0.0f);
      for (int j = 0; j < WIN; j++) {
        if (j < WIN - 1 - a.filled) continue;
        s[j][hh] = vexp(s[j][hh] - mx[hh]);
        den += s[j][hh];
      }
      asum[hh] = splat(0.0f);
      for (int k = 0; k < HID; k++) kbar[hh][k] = splat(0.0f);
      for (int j = 0; j < WIN; j++) {
        if (j < WIN - 1 - a.filled) continue;
        vf aj = s[j][hh] / den;
        asum[hh] += aj;
        for (int k = 0; k < HID; k++) kbar[hh][k] += aj * keys[j][k];
      }
    }
    vf u[HID];
    for (int i = 0; i < HID; i++) {
      vf acc = bv[i] * asum[i / DH];
      for (int k = 0; k < HID; k++) acc += Wv[i * HID + k] * kbar[i / DH][k];
      u[i] = acc;
    }
#if WIN > 1  // the window drops its oldest output and appends the current one
    store_t(wp, rows, (WIN - 1) * HID, (WIN - 1) * HID, cnt, keys[1]);
#endif
    vf v[HID];
    matvec<HID, HID>(Wo, bo, u, v);
    for (int blk = 0; blk < 2; blk++) {  // v = LayerNorm(v + ReLU(W v + b)); dropout is off
      const float* Wb = Wf + blk * (HID * HID + HID);
      const float* lw = ln + 2 * blk * HID;
      vf f[HID];
      matvec<HID, HID>(Wb, Wb + HID * HID, v, f);
      vf mean = splat(0.0f), var = splat(0.0f);
      for (int k = 0; k < HID; k++) { f[k] = v[k] + vrelu(f[k]); mean += f[k]; }
      mean = mean / (float)HID;
      for (int k = 0; k < HID; k++) { f[k] = f[k] - mean; var += f[k] * f[k]; }
      vf rstd = 1.0f / vsqrt(var / (float)HID + (float)a.ln_eps);
      for (int k = 0; k < HID; k++) v[k] = f[k] * rstd * lw[k] + lw[HID + k];
    }
    for (int k = 0; k < HID; k++) o[k] = v[k];
  }
#endif
  vf z[HID];  // p = 2 sigmoid(w_p . z + b_p), a = 2 sigmoid(w_a . z + b_a), z = ReLU(W o + b)
  matvec<HID, HID>(hw, hw + HID * HID, o, z);
  vf pp = splat(hw[HID * HID + 3 * HID]), aa = splat(hw[HID * HID + 3 * HID + 1]);
  for (int k = 0; k < HID; k++) {
    vf zk = vrelu(z[k]);
    pp += hw[HID * HID + HID + k] * zk;
    aa += hw[HID * HID + 2 * HID + k] * zk;
  }
  pp = 2.0f * vsigmoid(pp);
  aa = 2.0f * vsigmoid(aa);
#if FR  // L2O-PA-FR: the network scales FISTA's momentum (t - 1) / t+, t+ = (1 + sqrt(1 + 4 t^2)) / 2
  {
    vf tv = contig ? load_lanes<vf>(a.tm + n0, cnt) : gather_lanes<vf>(a.tm, rows, cnt);
    vf tn = (1.0f + vsqrt(1.0f + 4.0f * tv * tv)) / 2.0f;
    aa = aa * ((tv - 1.0f) / tn);
    if (contig) store_lanes(a.tm + n0, cnt, tn); else scatter_lanes(a.tm, rows, cnt, tn);
  }
#endif
  RESTORE_CSR();
  // t = lr p; x+ = prox_t(y - t g); y+ = x+ + a (x+ - x)
  const V tt = lrv * __builtin_convertvector(pp, V);
  const V xn = prox_point<R>(a.prox, yR, gR, tt, s0v, s1v);
  const V xo = contig ? load_lanes<V>(x + n0, cnt) : gather_lanes<V>(x, rows, cnt);
  const V yn = xn + __builtin_convertvector(aa, V) * (xn - xo);
  if (contig) {
    store_lanes(x + n0, cnt, xn);
    store_lanes(y + n0, cnt, yn);
  } else {
    scatter_lanes(x, rows, cnt, xn);
    scatter_lanes(y, rows, cnt, yn);
  }
#else
  const float* wo = w;
  vf out = splat(wo[HID]);
  for (int k = 0; k < HID; k++) out += wo[k] * o[k];
#if KIND == 1
  out = -(0.1f * out);  // the reference steps along -m(g): y - t (-out)
#else
  out = 0.1f * vtanh(out);
#endif
  RESTORE_CSR();
  store_lanes(y + n0, cnt, prox_point<R>(a.prox, yR, __builtin_convertvector(out, V), lrv, s0v, s1v));
#endif
}

// The pa kind with `hold`: a coordinate with x = y = prox_{s r}(y - s g) (computed as the
// reference computes it) keeps its iterates and state, so its network is not run. Per
// chunk the others are listed, then stepped in tiles of T by index (contiguous runs of T
// still move as vectors). On sparse problems 80-90 % of the coordinates are held late in a run.
#define HOLD_CHUNK 1024
template <typename R>
static void run_held(const Args& a) {
  typedef typename Lanes<R>::V V;
  const R* y = (const R*)a.y;
  const R* g = (const R*)a.g;
  const R* x = (const R*)a.x;
  const int64_t chunks = (a.n + HOLD_CHUNK - 1) / HOLD_CHUNK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(a.nthreads) if (a.nthreads > 1)
  for (int64_t ci = 0; ci < chunks; ci++) {
    const int64_t lo = ci * HOLD_CHUNK, hi = lo + HOLD_CHUNK < a.n ? lo + HOLD_CHUNK : a.n;
    int64_t act[HOLD_CHUNK];
    int na = 0;
    for (int64_t i0 = lo; i0 < hi; i0 += T) {
      const int cnt = hi - i0 < T ? (int)(hi - i0) : T;
      const V yv = load_lanes<V>(y + i0, cnt), xv = load_lanes<V>(x + i0, cnt), gv = load_lanes<V>(g + i0, cnt);
      const V lrv = a.lr ? per_lane<V>((const R*)a.lr, a.lr_div, i0, cnt) : vsplat<V>((R)a.lr_scalar);
      const V tv = prox_point<R>(a.prox, yv, gv, lrv, strength<V, R>(a.s0p, a.s0_div, a.s0, true, i0, nullptr, cnt),
                                 strength<V, R>(a.s1p, a.s1_div, a.s1, true, i0, nullptr, cnt));
      for (int t = 0; t < cnt; t++)
        if (!(tv[t] == yv[t] && xv[t] == yv[t])) act[na++] = i0 + t;
    }
    for (int j = 0; j < na; j += T) {
      const int cnt = na - j < T ? na - j : T;
      int64_t rows[T];
      for (int t = 0; t < T; t++) rows[t] = act[j + (t < cnt ? t : 0)];
      const int later = na - (j + 2 * T), nahead = later <= 0 ? 0 : (later < T ? later : T);
      tile<R>(a, rows, cnt, cnt == T && rows[T - 1] - rows[0] == T - 1, act + j + 2 * T, nahead);
    }
  }
}

template <typename R>
static void run(const Args& a) {
#if KIND == 0
  if (a.hold) {
    run_held<R>(a);
    return;
  }
#endif
  const int64_t tiles = (a.n + T - 1) / T;
#pragma omp parallel for schedule(static) num_threads(a.nthreads) if (a.nthreads > 1)
  for (int64_t i = 0; i < tiles; i++) {
    const int64_t n0 = i * T;
    const int cnt = a.n - n0 < T ? (int)(a.n - n0) : T;
    int64_t rows[T], ahead[T];
    for (int t = 0; t < T; t++) rows[t] = n0 + (t < cnt ? t : 0);
    const int64_t later = a.n - (n0 + 2 * T);  // the tile after next
    const int nahead = later <= 0 ? 0 : (later < T ? (int)later : T);
    for (int t = 0; t < nahead; t++) ahead[t] = n0 + 2 * T + t;
    tile<R>(a, rows, cnt, true, ahead, nahead);
  }
}

// Per-instance reductions the step needs besides the tile loop, one pass each over the
// a.n coordinates of one tensor, `per` coordinates an instance (out[a.n / per]):
// the watchdog's squared prox-gradient residual |prox_{s r}(y - s g) - y|^2, summed in double
// as the reference sums it (torch_l2o.optim.watchdog), and the scaled inputs' 1 / sigma,
// sigma = RMS max(|y|, |s g|) (torch_l2o.optim.functional._input_scale; 0 for sigma = 0)
template <typename R>
static double residual(const Args& a, int64_t lo, int64_t hi) {  // over coordinates lo..hi-1
  typedef typename Lanes<R>::V V;
  const R* y = (const R*)a.y;
  const R* g = (const R*)a.g;
  double acc = 0.0;
  for (int64_t i0 = lo; i0 < hi; i0 += T) {
    const int cnt = hi - i0 < T ? (int)(hi - i0) : T;
    const V yv = load_lanes<V>(y + i0, cnt), gv = load_lanes<V>(g + i0, cnt);
    const V lrv = a.lr ? per_lane<V>((const R*)a.lr, a.lr_div, i0, cnt) : vsplat<V>((R)a.lr_scalar);
    const V r = prox_point<R>(a.prox, yv, gv, lrv, strength<V, R>(a.s0p, a.s0_div, a.s0, true, i0, nullptr, cnt),
                              strength<V, R>(a.s1p, a.s1_div, a.s1, true, i0, nullptr, cnt)) - yv;
    for (int t = 0; t < cnt; t++) acc += (double)r[t] * (double)r[t];
  }
  return acc;
}
template <typename R>
static void residuals(const Args& a, int64_t per, double* out) {
  for (int64_t b = 0; b * per < a.n; b++) out[b] = residual<R>(a, b * per, (b + 1) * per);
}
template <typename R>
static void scales(const Args& a, int64_t per, float* out) {
  const R* y = (const R*)a.y;
  const R* g = (const R*)a.g;
  for (int64_t b = 0; b * per < a.n; b++) {
    double acc = 0.0;
    for (int64_t i = b * per; i < (b + 1) * per; i++) {
      const float s = a.lr ? (float)((const R*)a.lr)[i / a.lr_div] : (float)a.lr_scalar;
      const float ay = fabsf((float)y[i]), ag = fabsf((float)g[i] * s);
      const float m = ay > ag ? ay : ag;
      acc += (double)m * (double)m;
    }
    const float sigma = (float)sqrt(acc / (double)per);
    out[b] = sigma > 0.0f ? 1.0f / (sigma > FLT_MIN ? sigma : FLT_MIN) : 0.0f;
  }
}

// The watchdog's per-instance bookkeeping for a group of one tensor, after the residual
// above (torch_l2o.optim.watchdog._records defines it, in numpy and torch): G = sqrt(G2) / s
// (NaN -> inf, inf -> DBL_MAX, as torch.nan_to_num), the running minimum, its mark and the
// steps since it halved updated in place, the best point copied where G is a new minimum,
// fresh[b] set where the instance diverges or stalls now, handed[b] where it hands off now
// (G <= handoff G0). Returns the number of instances off the learned step (fallen back or
// handed off), before or now. Rounded op by op as numpy rounds (no contraction).
struct Watch {  // mirrored by cpu_step.py's _Watch
  const double* step; double step_scalar;     // s per instance, or one number (step == NULL)
  double* wd_min; double* wd_mark; const double* wd_G0; int64_t* since;
  const uint8_t* off; uint8_t* fresh; void* best;
  double kappa, jump_floor, stall_floor; int64_t patience;
  uint8_t* handed; double handoff;            // handed off to FISTA-restart (in/out); at G <= handoff G0 (0: never)
};
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename R>
static int64_t watch(const Args& a, int64_t per, const Watch& w) {
  int64_t count = 0;
  for (int64_t b = 0; b * per < a.n; b++) {
    double G = sqrt(residual<R>(a, b * per, (b + 1) * per)) / (w.step ? w.step[b] : w.step_scalar);
    G = G != G ? INFINITY : (G > DBL_MAX ? DBL_MAX : G);
    const bool off = w.off[b] != 0 || w.handed[b] != 0;
    const double up = w.kappa * w.wd_min[b], floor = w.jump_floor * w.wd_G0[b];
    const bool jump = G > (up > floor ? up : floor);
    const bool better = G < w.wd_min[b] && !(off || jump);
    if (better) {
      w.wd_min[b] = G;
      memcpy((R*)w.best + b * per, (const R*)a.y + b * per, sizeof(R) * per);
    }
    const bool halved = w.wd_min[b] <= 0.5 * w.wd_mark[b];
    if (halved) w.wd_mark[b] = w.wd_min[b];
    w.since[b] = halved ? 0 : w.since[b] + 1;
    const bool stall = w.since[b] >= w.patience && w.wd_min[b] > w.stall_floor * w.wd_G0[b];
    w.fresh[b] = (jump || stall) && !off;
    if (w.handoff > 0 && !off && !w.fresh[b] && G <= w.handoff * w.wd_G0[b]) w.handed[b] = 1;
    count += off || w.fresh[b] || w.handed[b];
  }
  return count;
}
#pragma GCC pop_options

// The secant step size's reductions (torch_l2o.optim.stepsize.secant) in one pass: per
// instance |y - y_prev|^2, |g - g_prev|^2, |g|^2 and |g_prev|^2 in double (out[4 b + 0..3],
// differences taken in double as the reference takes them); y and g are copied to ny, ng
// (the next step's y_prev and g_prev).
template <typename R>
static void secant_sums(const R* y, const R* g, const R* yp, const R* gp, R* ny, R* ng, int64_t n, int64_t per,
                        double* out) {
  for (int64_t b = 0; b * per < n; b++) {
    double dy = 0.0, dg = 0.0, g2 = 0.0, gp2 = 0.0;
    for (int64_t i = b * per; i < (b + 1) * per; i++) {
      const double u = (double)y[i] - (double)yp[i], v = (double)g[i] - (double)gp[i];
      dy += u * u;
      dg += v * v;
      g2 += (double)g[i] * (double)g[i];
      gp2 += (double)gp[i] * (double)gp[i];
      ny[i] = y[i];
      ng[i] = g[i];
    }
    out[4 * b] = dy;
    out[4 * b + 1] = dg;
    out[4 * b + 2] = g2;
    out[4 * b + 3] = gp2;
  }
}

extern "C" void l2o_step_f32(const Args* a) { run<float>(*a); }
extern "C" void l2o_step_f64(const Args* a) { run<double>(*a); }
extern "C" void l2o_residuals_f32(const Args* a, int64_t per, double* out) { residuals<float>(*a, per, out); }
extern "C" void l2o_residuals_f64(const Args* a, int64_t per, double* out) { residuals<double>(*a, per, out); }
extern "C" void l2o_scales_f32(const Args* a, int64_t per, float* out) { scales<float>(*a, per, out); }
extern "C" void l2o_scales_f64(const Args* a, int64_t per, float* out) { scales<double>(*a, per, out); }
extern "C" int64_t l2o_watch_f32(const Args* a, int64_t per, const Watch* w) { return watch<float>(*a, per, *w); }
extern "C" int64_t l2o_watch_f64(const Args* a, int64_t per, const Watch* w) { return watch<double>(*a, per, *w); }
#define SECANT(R, S) \
  extern "C" void l2o_secant_##S(const void* y, const void* g, const void* yp, const void* gp, void* ny, void* ng, \
                                 int64_t n, int64_t per, double* out) { \
    secant_sums<R>((const R*)y, (const R*)g, (const R*)yp, (const R*)gp, (R*)ny, (R*)ng, n, per, out); \
  }
SECANT(float, f32)
SECANT(double, f64)
extern "C" int64_t l2o_args_size(void) { return (int64_t)sizeof(Args); }
extern "C" int64_t l2o_lanes(void) { return T; }
"""


class _Args(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64 if kind == "i" else ctypes.c_double if kind == "d" else ctypes.c_void_p)
                for name, kind in (
                    ("n", "i"), ("y", "p"), ("g", "p"), ("x", "p"), ("lr", "p"), ("lr_div", "i"), ("lr_scalar", "d"),
                    ("h", "p"), ("c", "p"), ("lstride", "i"), ("m", "p"), ("v", "p"), ("win", "p"), ("filled", "i"),
                    ("w", "p"), ("prox", "i"), ("s0", "d"), ("s1", "d"), ("aux0", "d"), ("aux1", "d"), ("aux2", "d"),
                    ("ln_eps", "d"), ("nthreads", "i"), ("fs", "p"), ("fs_div", "i"), ("hold", "i"),
                    ("s0p", "p"), ("s0_div", "i"), ("s1p", "p"), ("s1_div", "i"), ("tm", "p"))]


class _Watch(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64 if kind == "i" else ctypes.c_double if kind == "d" else ctypes.c_void_p)
                for name, kind in (
                    ("step", "p"), ("step_scalar", "d"), ("wd_min", "p"), ("wd_mark", "p"), ("wd_G0", "p"),
                    ("since", "p"), ("off", "p"), ("fresh", "p"), ("best", "p"), ("kappa", "d"),
                    ("jump_floor", "d"), ("stall_floor", "d"), ("patience", "i"), ("handed", "p"),
                    ("handoff", "d"))]


# ---------------------------------------------------------------- switch


_BACKEND = "reference" if os.environ.get("TORCH_L2O_CPU_STEP", "compile") in ("reference", "eager") else "compile"


def set_cpu_step_backend(backend: str) -> str:
    """Choose how learned steps on CPU tensors run without autograd (in place, and on
    copies for the safeguard's proposals and validation); returns the previous choice.

    ``"compile"`` (default): the fused C++ loop of this module, compiled on first use.
    ``"reference"`` (``"eager"`` is the same): the update functions' PyTorch code.
    The counterpart of :func:`torch_l2o.kernels.set_cpu_backend` (the prox step alone).
    """
    global _BACKEND
    if backend not in ("reference", "eager", "compile"):
        raise ValueError(f"cpu step backend must be 'reference' (or 'eager') or 'compile', got {backend!r}")
    prev, _BACKEND = _BACKEND, "reference" if backend == "eager" else backend
    return prev


# ---------------------------------------------------------------- compilation


_LIBS: dict[tuple, Any] = {}
_LOCK = threading.Lock()
_WARNED = False


def _cache_dir() -> str:
    root = os.environ.get("TORCH_L2O_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch_l2o")
    path = os.path.join(root, "cpu_step")
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = os.path.join(tempfile.gettempdir(), f"torch_l2o_cpu_step_{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(path, exist_ok=True)
    return path


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _machine() -> str:
    """What ``-march=native`` depends on: a cached library is only reused on the same CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def compile_library(defines: dict[str, int]) -> Any:
    """The loaded library for one configuration (``-D`` macros), built on first use and
    cached on disk; ``None`` (with one warning) when it cannot be built."""
    key = tuple(sorted(defines.items()))
    with _LOCK:
        if key in _LIBS:
            return _LIBS[key]
        _LIBS[key] = lib = _build(defines)
        return lib


def _build(defines: dict[str, int]) -> Any:
    global _WARNED
    cxx = _compiler()
    if cxx is None:
        err = "no C++ compiler found (set CXX)"
    else:
        dflags = [f"-D{k}={v}" for k, v in sorted(defines.items())]
        base = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=gnu++17", "-shared", "-fPIC", "-w"]
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
        cache = _cache_dir()
        err = ""
        # -march=native: the machine's widest vectors; OpenMP for threads. Each is dropped if the compiler lacks it.
        for extra in ([f"-march={MARCH}", "-fopenmp"], [f"-march={MARCH}"], []):
            flags = base + extra + dflags
            digest = hashlib.sha256("\0".join([_SOURCE, cxx, version, _machine(), *flags]).encode()).hexdigest()[:24]
            path = os.path.join(cache, f"l2o_step_{digest}.so")
            if not os.path.exists(path):
                fd, src = tempfile.mkstemp(suffix=".cpp", dir=cache)
                with os.fdopen(fd, "w") as f:
                    f.write(_SOURCE)
                tmp = path + f".{os.getpid()}.tmp"
                try:
                    proc = subprocess.run([cxx, *flags, src, "-o", tmp], capture_output=True, text=True, check=False)
                finally:
                    os.unlink(src)
                if proc.returncode != 0:
                    err = proc.stderr[-2000:]
                    continue
                os.replace(tmp, path)  # atomic: a concurrent process sees the whole library or none
            try:
                lib = ctypes.CDLL(path)
            except OSError as e:
                err = str(e)
                continue
            try:
                lib.l2o_args_size.restype = ctypes.c_int64
                if lib.l2o_args_size() != ctypes.sizeof(_Args):
                    err = "argument layout mismatch"
                    continue
                for fn in (lib.l2o_step_f32, lib.l2o_step_f64):
                    fn.argtypes, fn.restype = [ctypes.POINTER(_Args)], None
                for fn in (lib.l2o_residuals_f32, lib.l2o_residuals_f64, lib.l2o_scales_f32, lib.l2o_scales_f64):
                    fn.argtypes, fn.restype = [ctypes.POINTER(_Args), ctypes.c_int64, ctypes.c_void_p], None
                for fn in (lib.l2o_secant_f32, lib.l2o_secant_f64):
                    fn.argtypes, fn.restype = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctypes.c_void_p], None
                for fn in (lib.l2o_watch_f32, lib.l2o_watch_f64):
                    fn.argtypes, fn.restype = [ctypes.POINTER(_Args), ctypes.c_int64, ctypes.POINTER(_Watch)], ctypes.c_int64
            except AttributeError as e:  # a library from other source (benchmarks/cpu_step_timing.py --against)
                err = str(e)
                continue
            return lib
    if not _WARNED:
        _WARNED = True
        warnings.warn(f"torch_l2o: the CPU fused learned step could not be compiled, the PyTorch reference runs "
                      f"instead ({err.strip()[:500]})", RuntimeWarning, stacklevel=4)
    return None


# ---------------------------------------------------------------- networks


_CONFIGS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _config(kind: str, net: nn.Module) -> dict[str, int] | None:
    """The kernel's configuration for this network, or ``None`` if it does not compute its
    forward; cached per network and mode (the constructor's choices do not change)."""
    hit = _CONFIGS.get(net)
    if hit is None or hit[0] != (kind, net.training):
        hit = ((kind, net.training), _config_uncached(kind, net))
        _CONFIGS[net] = hit
    return hit[1]


def _config_uncached(kind: str, net: nn.Module) -> dict[str, int] | None:
    from ..nets import DMNet, PAFRNet, PAGRUNet, PAMRNet, PANet, RNNPropNet

    t = type(net)
    if not ((kind == "pa" and t in (PANet, PAGRUNet, PAMRNet, PAFRNet)) or (kind == "dm" and t is DMNet)
            or (kind == "rnnprop" and t is RNNPropNet)):
        return None
    rnn = net.rnn
    if type(rnn) not in (nn.LSTM, nn.GRU) or not rnn.bias or rnn.bidirectional or getattr(rnn, "proj_size", 0):
        return None
    hid = rnn.hidden_size
    if hid > MAX_HIDDEN or (net.training and rnn.dropout > 0 and rnn.num_layers > 1):
        return None
    if rnn.input_size != (hid if t is RNNPropNet else 2):
        return None
    cfg = {"KIND": KINDS[kind], "LSTM": int(type(rnn) is nn.LSTM), "LAYERS": rnn.num_layers, "HID": hid, "MR": 0,
           "WIN": 1, "HEADS": 1, "GRADX": 0, "SCALED": int(kind == "pa" and net.inputs == "scaled"),
           "FR": int(t is PAFRNet)}
    if t is PAMRNet:
        attn = net.attn
        # attention across coordinates is not coordinate-wise; dropout is active in training mode
        if net.attend != "window" or (net.training and net.dropout > 0) or attn.in_proj_bias is None:
            return None
        if attn.out_proj.bias is None or any(n.weight is None or n.bias is None or tuple(n.normalized_shape) != (hid,)
                                             or n.eps != net.norms[0].eps for n in net.norms):
            return None
        cfg.update(MR=1, WIN=net.window, HEADS=attn.num_heads)
    elif t is DMNet:
        cfg["GRADX"] = int(net.inputs == "grad_x")
    elif t is RNNPropNet and net.inp.out_features != hid:
        return None
    return cfg


def _gru(w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, h: int) -> list[Tensor]:
    return [torch.cat([w_ih[:2 * h], w_hh[:2 * h]], 1), w_ih[2 * h:], w_hh[2 * h:], b_ih[:2 * h] + b_hh[:2 * h],
            b_ih[2 * h:], b_hh[2 * h:]]


def _pack(net: nn.Module, cfg: dict[str, int]) -> Tensor:
    """The weights in the kernel's order (the comment above ``cell`` in the source)."""
    rnn, h = net.rnn, cfg["HID"]
    parts: list[Tensor] = []
    if cfg["KIND"] == 2:
        parts += [net.inp.weight, net.inp.bias]
    for layer in range(rnn.num_layers):
        w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        parts += [torch.cat([w_ih, w_hh], 1), b_ih + b_hh] if cfg["LSTM"] else _gru(w_ih, w_hh, b_ih, b_hh, h)
    if cfg["KIND"] == 0:
        hd = net.heads
        parts += [hd.hidden.weight, hd.hidden.bias, hd.p.weight, hd.a.weight, hd.p.bias, hd.a.bias]
        if cfg["MR"]:
            attn = net.attn
            parts += [*attn.in_proj_weight.split(h), *attn.in_proj_bias.split(h), attn.out_proj.weight,
                      attn.out_proj.bias]
            parts += [t for lin in net.ffn for t in (lin.weight, lin.bias)]
            parts += [t for norm in net.norms for t in (norm.weight, norm.bias)]
    else:
        parts += [net.out.weight, net.out.bias]
    return torch.cat([p.detach().float().reshape(-1) for p in parts]).contiguous()


_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------- the backend


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _serving() -> bool:
    """Whether the loop may run now (the step is asked through :func:`fused_step`, which
    applies ``use_fused`` itself; the reductions below ask here)."""
    wanted = fused._ENABLED is True or requested() == NAME
    return _BACKEND == "compile" and wanted and not (interpret_mode() and requested() != NAME) \
        and not torch.compiler.is_compiling()


def _served(ts: list) -> bool:
    """Whether the loop serves tensor lists ``ts`` (``[ys, gs, ...]``): CPU, one float
    dtype, one shape per position, contiguous."""
    ys = ts[0]
    dtype = ys[0].dtype
    if dtype not in DTYPES or any(len(t) != len(ys) for t in ts):
        return False
    return all(t.device.type == "cpu" and t.dtype == dtype and t.shape == group[0].shape and t.is_contiguous()
               for group in zip(*ts) for t in group)


def _operands(ts: list, lr: Any) -> list | None:
    """``lr_operands`` of tensor lists ``ts`` that the loop serves (:func:`_served`);
    ``None`` otherwise."""
    if not _served(ts):
        return None
    return lr_operands(lr, ts[0], ts[0][0].dtype)  # the reference computes lr * p in the iterates' dtype


def _strengths(slots: list) -> dict:
    """``_Args`` fields of one tensor's strength slots from
    :func:`~torch_l2o.kernels.fused.prox_strengths` (the caller keeps ``slots``, and with
    them the tensors the pointers point into, for the call)."""
    out = {}
    for i, (num, t, div) in enumerate(slots):
        out[f"s{i}"] = num
        if t is not None:
            out.update({f"s{i}p": t.data_ptr(), f"s{i}_div": div})
    return out


def _instance_sums(ys, inst: int, width: tuple, call) -> Tensor:
    """Per-instance float64 sums ``(inst, *width)`` over the tensors ``ys``: ``call(i, y,
    out_ptr)`` writes tensor ``i``'s into ``out_ptr``."""
    out = torch.zeros(inst, *width, dtype=torch.float64)
    part = out if len(ys) == 1 else torch.empty(inst, *width, dtype=torch.float64)
    for i, y in enumerate(ys):
        if y.numel():
            call(i, y, part.data_ptr())
            if part is not out:
                out += part
    return out


def _instance_count(y: Tensor, k: int) -> int:
    n = 1
    for d in y.shape[:k]:
        n *= d
    return n


def prox_residuals(ys, gs, lrs, prox: str, params: Any, instance_dims: int) -> Tensor | None:
    r"""Per instance, :math:`\sum |\operatorname{prox}_{s r}(y - s g) - y|^2` over the tensors
    (float64, shape ``(instances,)``), in one pass of the loop's prox: the watchdog's
    residual (:func:`torch_l2o.optim.watchdog.check`, whose PyTorch expression takes ~10
    passes); ``None`` declines (the caller computes it in PyTorch)."""
    if not _serving() or not ys:
        return None
    code = prox_strengths(prox, params, ys)
    lr_ops = _operands([list(ys), list(gs)], list(lrs)) if code is not None else None
    lib = _helpers() if lr_ops is not None else None
    if lib is None:
        return None
    inst = _instance_count(ys[0], instance_dims)
    fn = lib.l2o_residuals_f32 if ys[0].dtype == torch.float32 else lib.l2o_residuals_f64

    def call(i, y, out):
        lr_t, div, lr_s = lr_ops[i]
        args = _Args(n=y.numel(), y=y.data_ptr(), g=gs[i].data_ptr(), lr=_ptr(lr_t), lr_div=div, lr_scalar=lr_s,
                     prox=code[0], **_strengths(code[1][i]))
        fn(ctypes.byref(args), y.numel() // inst, out)

    return _instance_sums(ys, inst, (), call)


def watch_records(y: Tensor, g: Tensor, lr: Any, prox: str, params: Any, instance_dims: int, rec: dict,
                  best: Tensor, rule: tuple[float, float, float, int], handoff: float = 0.0
                  ) -> tuple[int, Tensor] | None:
    """The watchdog's step for a group of one tensor in one call of the loop's library: the
    residual, the records ``rec`` (``wd_min``, ``wd_mark``, ``wd_G0``, ``wd_since``,
    ``watchdog``, ``handoff``) updated in place as :func:`torch_l2o.optim.watchdog._records`
    updates them, ``best`` overwritten where an instance reached a new minimum. ``rule``:
    ``(kappa, jump_floor, stall_floor, patience)``; ``handoff``: the relative residual of a
    handoff (0: none). Returns the number of instances off the learned step (before or now)
    and the mask of those falling back now; ``None`` declines (records untouched).
    On a small problem the PyTorch/numpy path costs ~150 us a step, more than the step."""
    if not _serving():
        return None
    code = prox_strengths(prox, params, [y])
    lr_ops = _operands([[y], [g]], [lr]) if code is not None else None
    lib = _helpers() if lr_ops is not None else None
    if lib is None or not y.numel() or not (best.dtype == y.dtype and best.shape == y.shape and best.is_contiguous()):
        return None
    inst = _instance_count(y, instance_dims)
    wd = [rec[key] for key in ("wd_min", "wd_mark", "wd_G0", "wd_since", "watchdog", "handoff")]
    for t, dt in zip(wd, (torch.float64,) * 3 + (torch.int64, torch.bool, torch.bool)):
        # a state_dict round trip may have cast the records to the parameters' dtype
        if t.dtype != dt or t.device.type != "cpu" or t.numel() != inst or not t.is_contiguous():
            return None
    step, scalar = None, 0.0
    if isinstance(lr, Tensor):
        if lr.numel() == 1:
            scalar = float(lr)
        elif lr.numel() == inst:
            step = lr.detach().to(torch.float64).contiguous()
        else:
            return None
    else:
        scalar = float(lr)
    fresh = torch.empty(rec["watchdog"].shape, dtype=torch.bool)
    (lr_t, div, lr_s), = lr_ops
    kappa, jump_floor, stall_floor, patience = rule
    args = _Args(n=y.numel(), y=y.data_ptr(), g=g.data_ptr(), lr=_ptr(lr_t), lr_div=div, lr_scalar=lr_s,
                 prox=code[0], **_strengths(code[1][0]))
    w = _Watch(step=_ptr(step), step_scalar=scalar, wd_min=wd[0].data_ptr(), wd_mark=wd[1].data_ptr(),
               wd_G0=wd[2].data_ptr(), since=wd[3].data_ptr(), off=wd[4].data_ptr(), fresh=fresh.data_ptr(),
               best=best.data_ptr(), kappa=kappa, jump_floor=jump_floor, stall_floor=stall_floor,
               patience=patience, handed=wd[5].data_ptr(), handoff=handoff)
    fn = lib.l2o_watch_f32 if y.dtype == torch.float32 else lib.l2o_watch_f64
    return int(fn(ctypes.byref(args), y.numel() // inst, ctypes.byref(w))), fresh


def secant_sums(ys, gs, ys_prev, gs_prev, instance_dims: int):
    """The secant estimate's per-instance sums in one pass over the tensors: a float64
    ``(instances, 4)`` tensor of ``|y - y_prev|^2``, ``|g - g_prev|^2``, ``|g|^2``,
    ``|g_prev|^2`` (jointly over the tensors), and new copies of ``ys`` and ``gs`` (the
    next ``y_prev``, ``g_prev``); ``None`` declines (the caller computes them in PyTorch,
    ~15 passes over the iterates in float64: 15 ms a step at 1024 x 500)."""
    if not _serving() or not ys or (torch.is_grad_enabled() and any(g.requires_grad for g in gs)):
        return None
    if not _served([list(ys), list(gs), list(ys_prev), list(gs_prev)]):
        return None
    lib = _helpers()
    if lib is None:
        return None
    inst = _instance_count(ys[0], instance_dims)
    fn = lib.l2o_secant_f32 if ys[0].dtype == torch.float32 else lib.l2o_secant_f64
    new_ys, new_gs = [torch.empty_like(y) for y in ys], [torch.empty_like(g) for g in gs]

    def call(i, y, out):
        fn(y.data_ptr(), gs[i].data_ptr(), ys_prev[i].data_ptr(), gs_prev[i].data_ptr(), new_ys[i].data_ptr(),
           new_gs[i].data_ptr(), y.numel(), y.numel() // inst, out)

    return _instance_sums(ys, inst, (4,), call), new_ys, new_gs


# A library for the reductions alone (any configuration holds them; this one compiles fastest)
_HELPERS = {"KIND": 0, "LSTM": 0, "LAYERS": 1, "HID": 1, "MR": 0, "WIN": 1, "HEADS": 1, "GRADX": 0, "SCALED": 0, "FR": 0}
_HELPER_LIB: list = []


def _helpers() -> Any:
    """The library of the reductions (loaded once; ``compile_library`` per call costs a lock)."""
    if not _HELPER_LIB:
        lib = compile_library(_HELPERS)
        if lib is None:
            return None
        _HELPER_LIB.append(lib)
    return _HELPER_LIB[0]


def _parameters(net: nn.Module) -> list[Tensor]:
    """``list(net.parameters())`` without its module names: 9-19 us a step less for PA-GRU
    and PA-MR (a small problem's whole step costs ~300 us)."""
    out, stack = [], [net]
    while stack:
        m = stack.pop()
        out.extend(p for p in m._parameters.values() if p is not None)
        stack.extend(c for c in m._modules.values() if c is not None)
    return out


def cpu_learned_step(kind: str, net: nn.Module, state: dict, ys, gs, xs, *, lr: Any, prox: str,
                     params: Any, step: int, instance_dims: int = 0) -> dict | None:
    """The fused step backend (see :mod:`torch_l2o.kernels.fused`); ``None`` declines."""
    if kind not in KINDS or not ys or not _serving():
        return None
    n_total = sum(y.numel() for y in ys)
    cfg = _config(kind, net)
    if cfg is None:
        return None
    code = prox_strengths(prox, params, ys)
    if code is None or (kind == "rnnprop" and prox != "none"):
        return None
    prox_code, strengths = code
    dtype = ys[0].dtype
    lr_ops = _operands([list(ys), list(gs), list(xs)], lr)
    if lr_ops is None:
        return None
    weights = _parameters(net)
    # float32 CPU weights, checked when they are packed (a cast or a move changes the
    # storage, so the packed copy's key): a step with the same weights skips the walk
    w = packed_weights(_PACKED, net, lambda n: _pack(n, cfg) if all(
        p.dtype == torch.float32 and p.device.type == "cpu" for p in weights) else None,
        extra=tuple(cfg.items()), params=weights)
    if w is None:
        return None
    grad = torch.is_grad_enabled()
    if grad and any(p.requires_grad for p in weights):
        return None
    names = ("h", "c") if cfg["LSTM"] else ("h",)
    names += ("m", "v") if kind == "rnnprop" else ()
    names += ("window",) if cfg["MR"] and cfg["WIN"] > 1 else ()
    names += ("t",) if cfg["FR"] else ()
    L, H, W = cfg["LAYERS"], cfg["HID"], cfg["WIN"]
    shapes = {"h": (L, n_total, H), "c": (L, n_total, H), "m": (n_total,), "v": (n_total,), "t": (n_total,),
              "window": (n_total, W - 1, H)}
    for k in names:
        v = state.get(k)
        if v is None or v.dtype != torch.float32 or v.device.type != "cpu" or tuple(v.shape) != shapes[k]:
            return None
        if grad and v.requires_grad:
            return None
    filled = state.get("filled") if cfg["MR"] and W > 1 else None
    if cfg["MR"] and W > 1 and (filled is None or filled.numel() != 1):
        return None
    lib = compile_library(cfg)
    if lib is None:
        return None

    # Updated in place; a strided entry (PA-MR's window after a reference step is a slice)
    # is first copied into its own storage, which the new state then holds.
    new = dict(state)
    for k in names:
        new[k] = state[k].contiguous()
    h, c = new["h"], new.get("c")
    m, v, win, tm = new.get("m"), new.get("v"), new.get("window"), new.get("t")
    aux = step_constants(kind, net, step)
    fn = lib.l2o_step_f32 if dtype == torch.float32 else lib.l2o_step_f64
    threads = torch.get_num_threads()
    hold = int(kind == "pa" and getattr(net, "hold_fixed", False))  # every kernel prox is elementwise
    inst = _instance_count(ys[0], instance_dims)
    off = 0
    for y, g, x, (lr_t, div, lr_s), f in zip(ys, gs, xs, lr_ops, strengths):
        n = y.numel()
        if n:
            inv = None
            if cfg["SCALED"]:  # 1 / sigma per instance of this tensor, one pass (the reference's reduction)
                inv = torch.empty(inst, dtype=torch.float32)
                scale = lib.l2o_scales_f32 if dtype == torch.float32 else lib.l2o_scales_f64
                scale(ctypes.byref(_Args(n=n, y=y.data_ptr(), g=g.data_ptr(), lr=_ptr(lr_t), lr_div=div,
                                         lr_scalar=lr_s)), n // inst, inv.data_ptr())
            args = _Args(
                n=n, y=y.data_ptr(), g=g.data_ptr(), x=x.data_ptr(), lr=_ptr(lr_t), lr_div=div, lr_scalar=lr_s,
                h=h.data_ptr() + 4 * off * H, c=c.data_ptr() + 4 * off * H if c is not None else None,
                lstride=n_total * H, m=m.data_ptr() + 4 * off if m is not None else None,
                v=v.data_ptr() + 4 * off if v is not None else None,
                win=win.data_ptr() + 4 * off * (W - 1) * H if win is not None else None,
                filled=int(filled) if filled is not None else 0, w=w.data_ptr(), prox=prox_code, **_strengths(f),
                aux0=aux[0], aux1=aux[1], aux2=aux[2], ln_eps=float(net.norms[0].eps) if cfg["MR"] else 1e-5,
                nthreads=max(1, min(threads, n // _THREAD_CHUNK)), fs=_ptr(inv),
                fs_div=n // inv.numel() if inv is not None else 1, hold=hold,
                tm=tm.data_ptr() + 4 * off if tm is not None else None)
            fn(ctypes.byref(args))
        off += n
    if filled is not None:
        new["filled"] = torch.clamp(filled + 1, max=W - 1)
    return new


register_step_backend(NAME, cpu_learned_step)
