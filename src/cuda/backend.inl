// The cuda backend. Every kernel maps one item (a query's head in the forward and the per-sample
// gradients, a row of value in the deterministic grad_value) onto a group of lanes that splits the
// head's D channels, so a corner row is read or written by neighbouring lanes at once.
//
// grad_value, deterministically: instead of scattering every sample into four rows with float
// atomics (whose order, and so whose rounding, varies run to run), the samples are bucketed by
// their top-left corner, sorted by bucket with a stable radix sort (ties keep sample order), and
// each row of grad_value is then the sum over the four buckets whose samples touch it, in that
// fixed order: every element written once, by one group, with no atomics at all.
//
// Points per level and discrete sampling (SPEC, the v2 attention): a head's K samples are its
// levels' P_l in turn, so the kernels walk each level's own count from the level table; a
// discrete sample reads one pixel, which the kernels hold as its top-left corner with weight 1,
// and every loop over corners stops after that one, so its neighbours are never read or written.
//
// This file is the whole backend, device code and host side, and is compiled twice: by nvcc in
// cuda.cu (the CUDA runtime, CUB's radix sort, triple-chevron launches), and by the host compiler
// in tests/cuda_emulation/, over an emulated runtime that runs every thread of a warp in lockstep
// on the CPU, so the kernels' index math and shuffles are tested where no GPU is. The includer
// provides the runtime API, CUB's DeviceRadixSort and DoubleBuffer, __nv_bfloat16 and __half,
// MSDA_CUDA_NAMESPACE and MSDA_CUDA_LAUNCH(kernel, blocks, threads, stream, args...).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bilinear.h"
#include "plan.h"

namespace MSDA_CUDA_NAMESPACE {
using namespace ::msda::cuda;  // plan.h and bilinear.h (a no-op where this is msda::cuda itself)
namespace {

// Channels one lane keeps in registers per pass over a head's samples; heads with more than
// lanes * kChannelsPerLane channels take several passes.
constexpr int kChannelsPerLane = 4;

// ---- storage and math types (SPEC "Precision": bf16/f16 are storage, math in f32) ----

template <class V>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};

__device__ __forceinline__ float load(const float* p, std::int64_t i) { return __ldg(p + i); }
__device__ __forceinline__ double load(const double* p, std::int64_t i) { return __ldg(p + i); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, std::int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load(const __half* p, std::int64_t i) { return __half2float(p[i]); }

__device__ __forceinline__ void store(float* p, std::int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store(double* p, std::int64_t i, double x) { p[i] = x; }
__device__ __forceinline__ void store(__nv_bfloat16* p, std::int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store(__half* p, std::int64_t i, float x) { p[i] = __float2half_rn(x); }

// The per-sample tensors come in value's dtype or f32 (4 mixes per value dtype): one runtime
// switch, uniform across the grid, instead of four times the kernel instantiations.
template <class A>
__device__ __forceinline__ A load_real(const void* p, DType t, std::int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<A>(static_cast<const float*>(p)[i]);
    case DType::f64: return static_cast<A>(static_cast<const double*>(p)[i]);
    case DType::bf16: return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case DType::f16: return static_cast<A>(__half2float(static_cast<const __half*>(p)[i]));
  }
  return A(0);
}

template <class A>
__device__ __forceinline__ void store_real(void* p, DType t, std::int64_t i, A x) {
  switch (t) {
    case DType::f32: static_cast<float*>(p)[i] = static_cast<float>(x); return;
    case DType::f64: static_cast<double*>(p)[i] = static_cast<double>(x); return;
    case DType::bf16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(x)); return;
    case DType::f16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(x)); return;
  }
}

// Coordinate arithmetic rounded operation by operation, as the reference computes it: nvcc (and
// GCC on AArch64) would otherwise contract x*W - 0.5 into one fused multiply-add, whose single
// rounding picks other corners than the CPU at pixel boundaries. The emulation's translation
// unit is built with -ffp-contract=off for the same reason.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
#else
inline double mul_rn(double a, double b) { return a * b; }
inline double add_rn(double a, double b) { return a + b; }
inline double sub_rn(double a, double b) { return a - b; }
inline double div_rn(double a, double b) { return a / b; }
#endif

template <class A>
__device__ __forceinline__ A exp_of(A x) {
  if constexpr (sizeof(A) == 4)
    return expf(x);
  else
    return exp(x);
}

// A sum over the lanes of a group (a power of two dividing the warp). The butterfly's order is
// fixed, so lane 0's total is the same bits on every run. Every lane of the warp must call it.
template <class A>
__device__ __forceinline__ A group_sum(A x, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// ---- the problem as kernels see it ----

struct Shape {
  std::int64_t N, S, M, D, Q, L, K;  // K: samples per head, the sum of the levels' P_l
  const LevelGeometry* levels;       // device copy, with each level's points and point_start
  int coords;                        // fused: 2 or 4
  DType location_type, weight_type, reference_type;
  bool discrete;        // Sampling::discrete: one pixel per sample, no location gradient
  double offset_scale;  // fused, 4 coordinates: loc = ref[:2] + off / P_l * ref[2:] * offset_scale
};

// Where a sample's location and weight come from: the caller's sampling_locations and
// attention_weights, or (fused) reference_points + sampling_offsets and the softmax of the logits.
template <class A>
struct SampleInputs {
  const void* locations;  // or sampling_offsets
  const void* weights;    // or attention_logits
  const void* reference;  // fused
  const A* softmax;       // fused: {max, 1/sum} per head
};

template <class A>
struct Sample {
  // Locations in double, as the CPU backend and the reference compute them: the fused op's
  // ref + off / W lands exactly where theirs does, and so on the same corners.
  double x, y;
  A a;
  double ox, oy, rw, rh;  // fused: the offset, and the box size (4 coordinates) it is scaled by
};

// head = (n*Q + q)*M + m, sample = head*K + g.point_start + p for point p of level l (g).
template <class A, bool Fused>
__device__ __forceinline__ Sample<A> fetch(const Shape& s, const SampleInputs<A>& in, std::int64_t sample,
                                           std::int64_t head, std::int64_t l, const LevelGeometry& g) {
  Sample<A> r{};
  const double px = load_real<double>(in.locations, s.location_type, 2 * sample);
  const double py = load_real<double>(in.locations, s.location_type, 2 * sample + 1);
  const A w = load_real<A>(in.weights, s.weight_type, sample);
  if constexpr (!Fused) {
    r.x = px;
    r.y = py;
    r.a = w;
  } else {
    r.ox = px;
    r.oy = py;
    const std::int64_t ref = (head / s.M * s.L + l) * s.coords;
    const double rx = load_real<double>(in.reference, s.reference_type, ref);
    const double ry = load_real<double>(in.reference, s.reference_type, ref + 1);
    if (s.coords == 2) {
      r.x = add_rn(rx, div_rn(px, double(g.width)));
      r.y = add_rn(ry, div_rn(py, double(g.height)));
    } else {
      r.rw = load_real<double>(in.reference, s.reference_type, ref + 2);
      r.rh = load_real<double>(in.reference, s.reference_type, ref + 3);
      // The reference's order: ((off / P_l) * size) * offset_scale, then + ref.
      r.x = add_rn(rx, mul_rn(mul_rn(div_rn(px, double(g.points)), r.rw), s.offset_scale));
      r.y = add_rn(ry, mul_rn(mul_rn(div_rn(py, double(g.points)), r.rh), s.offset_scale));
    }
    r.a = exp_of(w - in.softmax[2 * head]) * in.softmax[2 * head + 1];
  }
  return r;
}

// The sample's corners. u = x*W - 0.5 is computed in double, as the CPU backend does: exact for
// f32, bf16 and f16 coordinates, so the corners (and the one-sided derivative at integer
// coordinates) are the CPU's, whatever the rounding of the fractions in A after. Discrete: the
// pixel of x*W + 0.5 and y*H + 0.5, in double for the same reason (a pixel boundary falls where
// the reference's does).
template <class A>
__device__ __forceinline__ Corners<A> place(const Shape& s, const Sample<A>& smp, const LevelGeometry& g) {
  if (s.discrete)
    return pixel_at<A>(add_rn(mul_rn(smp.x, double(g.width)), 0.5), add_rn(mul_rn(smp.y, double(g.height)), 0.5),
                       g.height, g.width);
  const Corners<double> c = corners_at<double>(sub_rn(mul_rn(smp.x, double(g.width)), 0.5),
                                               sub_rn(mul_rn(smp.y, double(g.height)), 0.5), g.height, g.width);
  Corners<A> r;
  r.inside = c.inside;
  r.h0 = c.h0;
  r.w0 = c.w0;
  r.lh = A(c.lh);
  r.lw = A(c.lw);
  r.hh = A(1) - r.lh;
  r.hw = A(1) - r.lw;
  return r;
}

// ---- kernels ----

// Fused op: per head, the max logit and 1 / sum(exp(logit - max)), so every later kernel gets a
// sample's softmax weight from its own logit alone.
template <class A>
__global__ void softmax_stats_kernel(Shape s, const void* logits, A* stats, std::int64_t heads) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  const std::int64_t count = s.K;
  for (std::int64_t head = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; head < heads; head += stride) {
    A top = -INFINITY;
    for (std::int64_t i = 0; i < count; ++i) {
      const A z = load_real<A>(logits, s.weight_type, head * count + i);
      top = z > top ? z : top;
    }
    A sum = 0;
    for (std::int64_t i = 0; i < count; ++i) sum += exp_of(load_real<A>(logits, s.weight_type, head * count + i) - top);
    stats[2 * head] = top;
    stats[2 * head + 1] = A(1) / sum;
  }
}

template <class V, bool Fused>
__global__ void __launch_bounds__(kBlockThreads) forward_kernel(Shape s, SampleInputs<typename MathOf<V>::type> in,
                                                                 const V* value, V* output, int lanes) {
  using A = typename MathOf<V>::type;
  const std::int64_t heads = s.N * s.Q * s.M;
  const int lane = threadIdx.x & (lanes - 1);
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x / lanes;
  const std::int64_t row_stride = s.M * s.D;  // between rows of value for one head
  const int span = s.discrete ? 1 : 2;         // a discrete sample is its top-left corner alone
  for (std::int64_t head = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / lanes; head < heads;
       head += stride) {
    const std::int64_t m = head % s.M;
    const std::int64_t n = head / s.M / s.Q;
    const V* value_nm = value + (n * s.S * s.M + m) * s.D;
    for (std::int64_t c0 = 0; c0 < s.D; c0 += std::int64_t(lanes) * kChannelsPerLane) {
      A acc[kChannelsPerLane] = {};
      for (std::int64_t l = 0; l < s.L; ++l) {
        const LevelGeometry g = s.levels[l];
        for (std::int64_t p = 0; p < g.points; ++p) {
          const Sample<A> smp = fetch<A, Fused>(s, in, head * s.K + g.point_start + p, head, l, g);
          const Corners<A> c = place(s, smp, g);
          if (!c.inside) continue;
          for (int dh = 0; dh < span; ++dh) {
            const std::int64_t h = c.h0 + dh;
            if (h < 0 || h >= g.height) continue;
            for (int dw = 0; dw < span; ++dw) {
              const std::int64_t w = c.w0 + dw;
              if (w < 0 || w >= g.width) continue;
              const A weight = smp.a * corner_weight(c, dh, dw);
              const V* row = value_nm + (g.start + h * g.width + w) * row_stride;
#pragma unroll
              for (int k = 0; k < kChannelsPerLane; ++k) {
                const std::int64_t d = c0 + lane + std::int64_t(k) * lanes;
                if (d < s.D) acc[k] += weight * load(row, d);
              }
            }
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kChannelsPerLane; ++k) {
        const std::int64_t d = c0 + lane + std::int64_t(k) * lanes;
        if (d < s.D) store(output, head * s.D + d, acc[k]);
      }
    }
  }
}

// Where the per-sample gradients go. Plain op: grad_locations and grad_weights. Fused op:
// grad_offsets, grad_logits (via weight_gradients, dL/da per sample, and the softmax's backward)
// and reference_partials. `scatter`: the atomic variant's grad_value (or its f32 accumulator).
template <class A>
struct SampleGradients {
  void* locations;  // or sampling_offsets'
  void* weights;    // or attention_logits'
  A* weight_gradients;
  A* reference_partials;
  A* scatter;
};

// One group per head: for each of its samples the dot products with grad_output that give
// dL/da, dL/du and dL/dv, summed over the head's channels by the group, written by lane 0. The
// loop runs while any group of the warp has a head (the sums are warp shuffles); a group past
// the end recomputes the last head and writes nothing.
template <class V, bool Fused, bool Atomic>
__global__ void __launch_bounds__(kBlockThreads)
    sample_gradients_kernel(Shape s, SampleInputs<typename MathOf<V>::type> in, const V* value, const V* grad_output,
                            SampleGradients<typename MathOf<V>::type> out, int lanes) {
  using A = typename MathOf<V>::type;
  const std::int64_t heads = s.N * s.Q * s.M;
  const int lane = threadIdx.x & (lanes - 1);
  const int group_in_warp = (threadIdx.x & (kWarpLanes - 1)) / lanes;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x / lanes;
  const std::int64_t row_stride = s.M * s.D;
  for (std::int64_t item = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / lanes;
       item - group_in_warp < heads; item += stride) {
    const bool active = item < heads;
    const std::int64_t head = active ? item : heads - 1;
    const std::int64_t m = head % s.M;
    const std::int64_t n = head / s.M / s.Q;
    const V* value_nm = value + (n * s.S * s.M + m) * s.D;
    const V* g_head = grad_output + head * s.D;
    A weighted_sum = 0;  // fused, lane 0: sum of a * dL/da over the head's samples
    for (std::int64_t l = 0; l < s.L; ++l) {
      const LevelGeometry g = s.levels[l];
      A ref_part[4] = {};  // fused, lane 0: this head's share of grad_reference_points[n, q, l, :]
      for (std::int64_t p = 0; p < g.points; ++p) {
        const std::int64_t sample = head * s.K + g.point_start + p;
        const Sample<A> smp = fetch<A, Fused>(s, in, sample, head, l, g);
        const Corners<A> c = place(s, smp, g);
        A ga = 0, du = 0, dv = 0;
        if (c.inside) {
          std::int64_t rows[4];
          bool in_map[4];  // a corner the sample reads: discrete reads its top-left one alone
          A scatter_weight[4];  // atomic variant: a * the corner's bilinear weight
          for (int k = 0; k < 4; ++k) {
            const std::int64_t h = c.h0 + (k >> 1), w = c.w0 + (k & 1);
            in_map[k] = (k == 0 || !s.discrete) && h >= 0 && h < g.height && w >= 0 && w < g.width;
            rows[k] = in_map[k] ? (g.start + h * g.width + w) * row_stride : 0;
            scatter_weight[k] = smp.a * corner_weight(c, k >> 1, k & 1);
          }
          for (std::int64_t d = lane; d < s.D; d += lanes) {
            const A go = load(g_head, d);
            A v[4];
            for (int k = 0; k < 4; ++k) v[k] = in_map[k] ? A(load(value_nm + rows[k], d)) : A(0);
            if (s.discrete) {
              ga += go * v[0];  // the pixel itself: no 0-weighted neighbours, no location derivative
            } else {
              ga += go * (c.hh * c.hw * v[0] + c.hh * c.lw * v[1] + c.lh * c.hw * v[2] + c.lh * c.lw * v[3]);
              du += go * (c.hh * (v[1] - v[0]) + c.lh * (v[3] - v[2]));
              dv += go * (c.hw * (v[2] - v[0]) + c.lw * (v[3] - v[1]));
            }
            if constexpr (Atomic) {
              if (active && out.scatter) {
                A* base = out.scatter + (n * s.S * s.M + m) * s.D + d;
                for (int k = 0; k < 4; ++k)
                  if (in_map[k]) atomicAdd(base + rows[k], scatter_weight[k] * go);
              }
            }
          }
        }
        ga = group_sum(ga, lanes);
        du = group_sum(du, lanes);
        dv = group_sum(dv, lanes);
        if (lane != 0 || !active) continue;
        // A sample zeroed by the range rule moves nothing: no 0 * inf from its weight or box. Nor
        // does a discrete one: its pixel is piecewise constant in the location (SPEC), so its
        // location, offset and reference point gradients are zeros.
        const bool moves = c.inside && !s.discrete;
        const A gx = moves ? smp.a * A(g.width) * du : A(0);
        const A gy = moves ? smp.a * A(g.height) * dv : A(0);
        if constexpr (!Fused) {
          if (out.locations) {
            store_real(out.locations, s.location_type, 2 * sample, gx);
            store_real(out.locations, s.location_type, 2 * sample + 1, gy);
          }
          if (out.weights) store_real(out.weights, s.weight_type, sample, ga);
        } else {
          if (c.inside) weighted_sum += smp.a * ga;
          if (out.weight_gradients) out.weight_gradients[sample] = ga;
          A gox = 0, goy = 0;
          if (moves) {
            if (s.coords == 2) {
              gox = gx / A(g.width);
              goy = gy / A(g.height);
            } else {
              // d loc / d off = size * offset_scale / P_l, d loc / d size = off / P_l * offset_scale,
              // each factor in double in the reference's order.
              const double points = double(g.points);
              gox = gx * A(smp.rw * s.offset_scale / points);
              goy = gy * A(smp.rh * s.offset_scale / points);
              ref_part[2] += gx * A(smp.ox / points * s.offset_scale);
              ref_part[3] += gy * A(smp.oy / points * s.offset_scale);
            }
            ref_part[0] += gx;
            ref_part[1] += gy;
          }
          if (out.locations) {
            store_real(out.locations, s.location_type, 2 * sample, gox);
            store_real(out.locations, s.location_type, 2 * sample + 1, goy);
          }
        }
      }
      if constexpr (Fused) {
        if (lane == 0 && active && out.reference_partials)
          for (int k = 0; k < s.coords; ++k) out.reference_partials[(head * s.L + l) * s.coords + k] = ref_part[k];
      }
    }
    if constexpr (Fused) {
      // The softmax's backward: dL/dz_i = a_i * (dL/da_i - sum_j a_j dL/da_j).
      if (lane == 0 && active && out.weights) {
        for (std::int64_t i = 0; i < s.K; ++i) {
          const std::int64_t sample = head * s.K + i;
          const A a = exp_of(load_real<A>(in.weights, s.weight_type, sample) - in.softmax[2 * head]) *
                      in.softmax[2 * head + 1];
          store_real(out.weights, s.weight_type, sample, a * (out.weight_gradients[sample] - weighted_sum));
        }
      }
    }
  }
}

// grad_reference_points[n, q, l, k] = the sum over heads m, in order, of the partials.
template <class A>
__global__ void reference_sum_kernel(const A* partials, void* grad_reference, DType type, std::int64_t queries,
                                     std::int64_t M, std::int64_t per_query) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < queries * per_query; i += stride) {
    const std::int64_t nq = i / per_query, j = i % per_query;
    A sum = 0;
    for (std::int64_t m = 0; m < M; ++m) sum += partials[(nq * M + m) * per_query + j];
    store_real(grad_reference, type, i, sum);
  }
}

// Deterministic grad_value, step 1: each sample's bucket (the sentinel for a sample the range rule
// zeroes) and its Place.
template <class A, bool Fused, class Key, class Index>
__global__ void bucket_kernel(Shape s, SampleInputs<A> in, std::int64_t cells_per_head, std::int64_t buckets,
                              Place<A>* places, Key* keys, Index* ids) {
  const std::int64_t samples = s.N * s.Q * s.M * s.K;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < samples; i += stride) {
    const SampleSite site = site_of(i, s.levels, s.L, s.K);
    const LevelGeometry g = s.levels[site.level];
    const Sample<A> smp = fetch<A, Fused>(s, in, i, site.head, site.level, g);
    const Corners<A> c = place(s, smp, g);
    const std::int64_t m = site.head % s.M, n = site.head / s.M / s.Q;
    keys[i] = static_cast<Key>(sample_bucket(c, g, n, m, s.M, cells_per_head, buckets));
    ids[i] = static_cast<Index>(i);
    places[i] = {c.lh, c.lw, smp.a, site.head};
  }
}

// Step 3 (after the sort): where each bucket's samples start.
template <class Key, class Index>
__global__ void segments_kernel(const Key* sorted_keys, std::int64_t samples, std::int64_t buckets, Index* segments) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k <= buckets; k += stride)
    segments[k] = static_cast<Index>(segment_start(sorted_keys, samples, k));
}

// Step 4: one group per row (n, row, m) of grad_value sums what the samples of its four buckets
// put on it, bucket by bucket in sorted order; every element is written once.
template <class V, class Index>
__global__ void __launch_bounds__(kBlockThreads)
    gather_kernel(Shape s, std::int64_t cells_per_head, const Place<typename MathOf<V>::type>* places,
                  const Index* sorted_ids, const Index* segments, const V* grad_output, V* grad_value, int lanes) {
  using A = typename MathOf<V>::type;
  const std::int64_t rows = s.N * s.S * s.M;
  const int lane = threadIdx.x & (lanes - 1);
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x / lanes;
  for (std::int64_t item = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / lanes; item < rows;
       item += stride) {
    const std::int64_t m = item % s.M;
    const std::int64_t row = item / s.M % s.S;
    const std::int64_t n = item / s.M / s.S;
    const std::int64_t l = level_of_row(s.levels, s.L, row);
    const LevelGeometry g = s.levels[l];
    const std::int64_t h = (row - g.start) / g.width, w = (row - g.start) % g.width;
    for (std::int64_t c0 = 0; c0 < s.D; c0 += std::int64_t(lanes) * kChannelsPerLane) {
      A acc[kChannelsPerLane] = {};
      // This pixel is corner (dh, dw) of the samples whose top-left corner is (h - dh, w - dw). A
      // discrete sample's pixel is its top-left corner, and no corner of the samples in the other
      // three buckets (their 0 weight times an infinite grad_output would be NaN).
      const int corners = s.discrete ? 1 : 4;
      for (int corner = 0; corner < corners; ++corner) {
        const int dh = corner >> 1, dw = corner & 1;
        const std::int64_t bucket = pixel_bucket(g, n, m, s.M, cells_per_head, h, w, dh, dw);
        const std::int64_t end = static_cast<std::int64_t>(segments[bucket + 1]);
        for (std::int64_t i = static_cast<std::int64_t>(segments[bucket]); i < end; ++i) {
          const std::int64_t id = static_cast<std::int64_t>(sorted_ids[i]);
          const Place<A> pl = places[id];
          const A weight = pl.a * (dh ? pl.lh : A(1) - pl.lh) * (dw ? pl.lw : A(1) - pl.lw);
          const V* g_head = grad_output + pl.head * s.D;
#pragma unroll
          for (int k = 0; k < kChannelsPerLane; ++k) {
            const std::int64_t d = c0 + lane + std::int64_t(k) * lanes;
            if (d < s.D) acc[k] += weight * load(g_head, d);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kChannelsPerLane; ++k) {
        const std::int64_t d = c0 + lane + std::int64_t(k) * lanes;
        if (d < s.D) store(grad_value, item * s.D + d, acc[k]);
      }
    }
  }
}

// The atomic variant of bf16/f16 grad_value: the f32 accumulator rounded once.
template <class V>
__global__ void round_kernel(const float* accumulator, V* grad_value, std::int64_t count) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride)
    store(grad_value, i, accumulator[i]);
}

// ---- host side ----

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("msda: cuda backend: ") + what + ": " + cudaGetErrorString(status));
}

cudaStream_t stream_of(const Params& p) { return static_cast<cudaStream_t>(p.cuda.stream); }

// The memory behind every pointer must be reachable from the current device: a host pointer
// handed to the cuda backend is an Error naming it, not an illegal-address crash later.
void require_device_memory(const void* pointer, const char* argument) {
  if (!pointer) return;
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  cudaPointerAttributes attributes{};
  check(cudaPointerGetAttributes(&attributes, pointer), "cudaPointerGetAttributes");
  if (attributes.type == cudaMemoryTypeManaged) return;
  if (attributes.type == cudaMemoryTypeDevice && attributes.device == device) return;
  if (attributes.type == cudaMemoryTypeHost && attributes.devicePointer == pointer) return;  // mapped
  const std::string actual = attributes.type == cudaMemoryTypeDevice
                                 ? "memory of device " + std::to_string(attributes.device)
                                 : std::string("host memory");
  throw Error(argument, "memory of the current CUDA device (" + std::to_string(device) + ")", actual);
}

void require_device_pointers(const Params& p) {
  const bool fused = p.fused;
  require_device_memory(p.value, "value");
  require_device_memory(p.locations, fused ? "sampling_offsets" : "sampling_locations");
  require_device_memory(p.weights, fused ? "attention_logits" : "attention_weights");
  require_device_memory(p.reference_points, "reference_points");
  require_device_memory(p.output, "output");
  require_device_memory(p.grad_output, "grad_output");
  require_device_memory(p.grad_value, "gradients.value");
  require_device_memory(p.grad_locations, "gradients.sampling_locations");
  require_device_memory(p.grad_weights, "gradients.attention_weights");
  require_device_memory(p.grad_reference_points, "gradients.reference_points");
  require_device_memory(p.grad_offsets, "gradients.sampling_offsets");
  require_device_memory(p.grad_logits, "gradients.attention_logits");
}

// The call's workspace: the caller's, checked for size before anything runs, or a stream-ordered
// allocation freed once the stream is past the call's kernels.
class Scratch {
 public:
  Scratch(const Params& p, std::size_t bytes) : stream_(stream_of(p)) {
    if (bytes == 0) return;
    if (p.cuda.workspace) {
      // Regions are 256-byte aligned from the base and hold doubles and 64-bit keys.
      require_device_memory(p.cuda.workspace, "options.cuda.workspace");
      const auto misalignment = reinterpret_cast<std::uintptr_t>(p.cuda.workspace) % 256;
      if (misalignment != 0)
        throw Error("options.cuda.workspace", "a pointer aligned to 256 bytes",
                    "one " + std::to_string(misalignment) + " bytes past such a boundary");
      if (p.cuda.workspace_bytes < bytes)
        throw Error("options.cuda.workspace_bytes", ">= " + std::to_string(bytes) + " (msda::workspace_size)",
                    std::to_string(p.cuda.workspace_bytes));
      base_ = p.cuda.workspace;
    } else {
      check(cudaMallocAsync(&owned_, bytes, stream_), "cudaMallocAsync of the workspace");
      base_ = owned_;
    }
  }
  ~Scratch() {
    if (owned_) cudaFreeAsync(owned_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* at(const Region& r) const {
    return r.bytes ? reinterpret_cast<T*>(static_cast<char*>(base_) + r.offset) : nullptr;
  }

 private:
  cudaStream_t stream_;
  void* base_ = nullptr;
  void* owned_ = nullptr;
};

template <class Key, class Index>
std::size_t sort_scratch_bytes(std::int64_t samples, int bits, cudaStream_t stream) {
  std::size_t bytes = 0;
  cub::DoubleBuffer<Key> keys(nullptr, nullptr);
  cub::DoubleBuffer<Index> ids(nullptr, nullptr);
  // The count in the ids' type: CUB sizes its offsets by it (32-bit ones for narrow problems).
  check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, ids, static_cast<Index>(samples), 0, bits, stream),
        "sizing the sort");
  return bytes;
}

std::size_t sort_scratch_bytes(const BucketPlan& plan, cudaStream_t stream) {
  return plan.wide ? sort_scratch_bytes<std::uint64_t, std::uint64_t>(plan.samples, plan.key_bits, stream)
                   : sort_scratch_bytes<std::uint32_t, std::uint32_t>(plan.samples, plan.key_bits, stream);
}

// Whether the backward computes grad_value by the bucketed gather (and so sorts).
bool bucketed(const Params& p) { return p.grad_value && p.cuda.deterministic; }

std::size_t sort_scratch_for(const Params& p) {
  return bucketed(p) ? sort_scratch_bytes(plan_buckets(p), stream_of(p)) : 0;
}

template <class Kernel, class... Args>
void launch(Launch shape, cudaStream_t stream, Kernel kernel, Args... args) {
  if (shape.blocks == 0) return;
  // An error pending from earlier work of the process (another library's kernel) is not this
  // launch's: say so, and leave it pending for its owner.
  check(cudaPeekAtLastError(), "an earlier CUDA error, pending before msda's launch");
  MSDA_CUDA_LAUNCH(kernel, shape.blocks, shape.threads, stream, args...);
  check(cudaGetLastError(), "a kernel launch");
}

// Everything both passes set up: the workspace, the level table on the device, and (fused) the
// softmax statistics.
template <class A>
struct Setup {
  Workspace layout;
  Scratch scratch;
  Shape shape;
  SampleInputs<A> inputs;

  Setup(const Params& p, bool backward, std::size_t sort_bytes)
      : layout(plan_workspace(p, backward, sort_bytes)), scratch(p, layout.total) {
    const std::vector<LevelGeometry> levels = level_geometry(p);
    LevelGeometry* device_levels = scratch.at<LevelGeometry>(layout.levels);
    // Pageable to device: staged at once, so `levels` may go when this returns.
    check(cudaMemcpyAsync(device_levels, levels.data(), levels.size() * sizeof(LevelGeometry),
                          cudaMemcpyHostToDevice, stream_of(p)),
          "copying the level table");
    const Problem& pr = *p.problem;
    shape = {p.N, p.S, p.M, p.D, p.Q, p.L, p.K, device_levels, static_cast<int>(p.reference_coords),
             pr.location_dtype, pr.weight_dtype, pr.reference_dtype, p.discrete, p.offset_scale};
    inputs = {p.locations, p.weights, p.reference_points, scratch.at<A>(layout.softmax)};
    if (p.fused) {
      const std::int64_t heads = p.N * p.Q * p.M;
      launch(launch_flat(heads), stream_of(p), softmax_stats_kernel<A>, shape, p.weights,
             const_cast<A*>(inputs.softmax), heads);
    }
  }
};

template <class V>
void forward_typed(const Params& p) {
  using A = typename MathOf<V>::type;
  Setup<A> setup(p, false, 0);
  const int lanes = group_lanes(p.D);
  const Launch shape = launch_for(p.N * p.Q * p.M, lanes);
  const auto* value = static_cast<const V*>(p.value);
  auto* output = static_cast<V*>(p.output);
  if (p.fused)
    launch(shape, stream_of(p), forward_kernel<V, true>, setup.shape, setup.inputs, value, output, lanes);
  else
    launch(shape, stream_of(p), forward_kernel<V, false>, setup.shape, setup.inputs, value, output, lanes);
}

template <class V, class Key, class Index>
void deterministic_grad_value(const Params& p, const BucketPlan& plan, Setup<typename MathOf<V>::type>& setup) {
  using A = typename MathOf<V>::type;
  const Workspace& w = setup.layout;
  const Scratch& scratch = setup.scratch;
  cudaStream_t stream = stream_of(p);
  Place<A>* places = scratch.at<Place<A>>(w.samples);
  Key* keys[2] = {scratch.at<Key>(w.keys[0]), scratch.at<Key>(w.keys[1])};
  Index* ids[2] = {scratch.at<Index>(w.ids[0]), scratch.at<Index>(w.ids[1])};
  const Launch flat = launch_flat(plan.samples);
  if (p.fused)
    launch(flat, stream, bucket_kernel<A, true, Key, Index>, setup.shape, setup.inputs, plan.cells_per_head,
           plan.buckets, places, keys[0], ids[0]);
  else
    launch(flat, stream, bucket_kernel<A, false, Key, Index>, setup.shape, setup.inputs, plan.cells_per_head,
           plan.buckets, places, keys[0], ids[0]);

  // LSD radix sort is stable: equal keys keep the sample order the ids started in.
  cub::DoubleBuffer<Key> key_buffers(keys[0], keys[1]);
  cub::DoubleBuffer<Index> id_buffers(ids[0], ids[1]);
  std::size_t sort_bytes = w.sort_scratch.bytes;
  check(cub::DeviceRadixSort::SortPairs(scratch.at<void>(w.sort_scratch), sort_bytes, key_buffers, id_buffers,
                                        static_cast<Index>(plan.samples), 0, plan.key_bits, stream),
        "sorting the samples by bucket");

  Index* segments = scratch.at<Index>(w.segments);
  launch(launch_flat(plan.buckets + 1), stream, segments_kernel<Key, Index>, key_buffers.Current(), plan.samples,
         plan.buckets, segments);
  const int lanes = group_lanes(p.D);
  launch(launch_for(p.N * p.S * p.M, lanes), stream, gather_kernel<V, Index>, setup.shape, plan.cells_per_head,
         static_cast<const Place<A>*>(places), static_cast<const Index*>(id_buffers.Current()),
         static_cast<const Index*>(segments), static_cast<const V*>(p.grad_output), static_cast<V*>(p.grad_value),
         lanes);
}

template <class V, bool Fused, bool Atomic>
void launch_sample_gradients(const Params& p, Setup<typename MathOf<V>::type>& setup,
                             SampleGradients<typename MathOf<V>::type> out) {
  const int lanes = group_lanes(p.D);
  launch(launch_for(p.N * p.Q * p.M, lanes), stream_of(p), sample_gradients_kernel<V, Fused, Atomic>, setup.shape,
         setup.inputs, static_cast<const V*>(p.value), static_cast<const V*>(p.grad_output), out, lanes);
}

template <class V>
void backward_typed(const Params& p) {
  using A = typename MathOf<V>::type;
  cudaStream_t stream = stream_of(p);
  const BucketPlan plan = bucketed(p) ? plan_buckets(p) : BucketPlan{};
  Setup<A> setup(p, true, bucketed(p) ? sort_scratch_bytes(plan, stream) : 0);
  const Workspace& w = setup.layout;
  const bool atomic = p.grad_value && !p.cuda.deterministic;
  constexpr bool kStorageOnly = sizeof(V) == 2;
  const std::int64_t value_count = p.N * p.S * p.M * p.D;

  SampleGradients<A> out{};
  if (p.fused) {
    out = {p.grad_offsets, p.grad_logits, setup.scratch.template at<A>(w.weight_gradients),
           setup.scratch.template at<A>(w.reference_partials), nullptr};
  } else {
    out = {p.grad_locations, p.grad_weights, nullptr, nullptr, nullptr};
  }
  if (atomic) {
    out.scatter = kStorageOnly ? reinterpret_cast<A*>(setup.scratch.template at<float>(w.accumulator))
                               : static_cast<A*>(p.grad_value);
    check(cudaMemsetAsync(out.scatter, 0, static_cast<std::size_t>(value_count) * sizeof(A), stream),
          "zeroing grad_value");
    if (p.fused)
      launch_sample_gradients<V, true, true>(p, setup, out);
    else
      launch_sample_gradients<V, false, true>(p, setup, out);
  } else if (p.wants_sample_gradients()) {
    if (p.fused)
      launch_sample_gradients<V, true, false>(p, setup, out);
    else
      launch_sample_gradients<V, false, false>(p, setup, out);
  }
  if (atomic && kStorageOnly)
    launch(launch_flat(value_count), stream, round_kernel<V>, reinterpret_cast<const float*>(out.scatter),
           static_cast<V*>(p.grad_value), value_count);
  if (bucketed(p)) {
    if (plan.wide)
      deterministic_grad_value<V, std::uint64_t, std::uint64_t>(p, plan, setup);
    else
      deterministic_grad_value<V, std::uint32_t, std::uint32_t>(p, plan, setup);
  }
  if (p.fused && p.grad_reference_points) {
    const std::int64_t per_query = p.L * p.reference_coords;
    launch(launch_flat(p.N * p.Q * per_query), stream, reference_sum_kernel<A>,
           static_cast<const A*>(out.reference_partials), p.grad_reference_points, p.reference_dtype, p.N * p.Q, p.M,
           per_query);
  }
}

// The value dtype picks the instantiation; the per-sample tensors' dtypes are runtime tags.
#define MSDA_CUDA_VISIT_VALUE(params, function)                   \
  switch ((params).problem->value_dtype) {                        \
    case DType::f32: return function<float>(params);              \
    case DType::f64: return function<double>(params);             \
    case DType::bf16: return function<__nv_bfloat16>(params);     \
    case DType::f16: return function<__half>(params);             \
  }

}  // namespace

bool built() noexcept { return true; }

bool available() noexcept {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
}

std::size_t workspace_size(const Params& params, bool backward) {
  return plan_workspace(params, backward, backward ? sort_scratch_for(params) : 0).total;
}

void fill_zeros(const Params& params, void* pointer, std::size_t bytes) {
  require_device_memory(pointer, "a gradient");
  check(cudaMemsetAsync(pointer, 0, bytes, stream_of(params)), "zeroing a gradient");
}

void forward(const Params& params) {
  require_device_pointers(params);
  MSDA_CUDA_VISIT_VALUE(params, forward_typed)
}

void backward(const Params& params) {
  require_device_pointers(params);
  MSDA_CUDA_VISIT_VALUE(params, backward_typed)
}

}  // namespace MSDA_CUDA_NAMESPACE
