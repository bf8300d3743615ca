// The cuda backend: kernels and their host side.
//
// Lanes. Every kernel maps an item (a query's head in the forward and the per-sample gradients, a
// chunk of grad_value records in the deterministic backward) onto a group of lanes (plan.h's
// ChannelMap): each lane holds a few neighbouring channels, read with one 16-byte load where the
// rows are aligned, and a warp holds several groups (D = 32 in f32: 8 lanes of float4, four heads
// per warp). A sample's geometry (its location, corners, range rule and weights, computed in
// double as the CPU backend does) is computed once per group, by the lane that owns the sample,
// and handed to the other lanes by shuffles: lane j of a group locates samples j, j + lanes, ...
// of its head, and the group walks them in order.
//
// grad_value, deterministically: the sample-gradient kernel writes a record per (sample, corner)
// (the grad_value row it adds to and its coefficient), a stable radix sort groups each row's
// records in record order, fixed-size chunks of the sorted list are summed by one group each, and a
// row that spans chunks is the sum of its pieces in chunk order (plan.h's RecordPlan). No float
// atomics, so the bits are the same on every run; the time follows the samples, not the busiest
// row. The atomic variant (options.cuda.deterministic = false) scatters with atomicAdd from the
// same kernel, as the measured ablation.
//
// Points per level and discrete sampling (SPEC, the v2 attention): a head's K samples are its
// levels' P_l in turn, so a sample's level comes from the level table; a discrete sample reads
// one pixel, which the kernels hold as its top-left corner with weight 1, and never touch the
// other three.
//
// Host side: nothing is read from host memory after a call returns and nothing synchronises, so
// the calls can be captured in a CUDA graph (the level table reaches the device as a kernel's
// arguments, which a capture copies); a failed CUDA call is reported and its error cleared.
//
// This file is compiled twice: by nvcc in cuda.cu (the CUDA runtime, CUB's radix sort,
// triple-chevron launches), and by the host compiler in tests/cuda_emulation/, over an emulated
// runtime that runs every thread of a warp in lockstep on the CPU, so the kernels' index math and
// shuffles are tested where no GPU is. The includer provides the runtime API, CUB's
// DeviceRadixSort and DoubleBuffer, __nv_bfloat16, __half and uint4, MSDA_CUDA_NAMESPACE and
// MSDA_CUDA_LAUNCH(kernel, blocks, threads, stream, args...).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "bilinear.h"
#include "plan.h"

namespace MSDA_CUDA_NAMESPACE {
using namespace ::msda::cuda;  // plan.h and bilinear.h (a no-op where this is msda::cuda itself)
namespace {

// ---- storage and math types (SPEC "Precision": bf16/f16 are storage, math in f32) ----

template <class V>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_math(float x) { return x; }
__device__ __forceinline__ double to_math(double x) { return x; }
__device__ __forceinline__ float to_math(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_math(__half x) { return __half2float(x); }

template <class V>
__device__ __forceinline__ V from_math(typename MathOf<V>::type x) {
  if constexpr (std::is_same_v<V, __nv_bfloat16>)
    return __float2bfloat16_rn(x);
  else if constexpr (std::is_same_v<V, __half>)
    return __float2half_rn(x);
  else
    return x;
}

// `Vec` neighbouring channels at p in the math type: one 16-byte load when Vec > 1 (the caller
// guarantees the alignment: plan.h's channel_map), a scalar one otherwise.
template <int Vec, class V, class A>
__device__ __forceinline__ void load_channels(const V* p, A (&x)[Vec]) {
  if constexpr (Vec == 1) {
    x[0] = to_math(__ldg(p));
  } else {
    static_assert(sizeof(V) * Vec == sizeof(uint4), "a vector of channels is one 16-byte access");
    V parts[Vec];
#if defined(__CUDA_ARCH__)
    const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p));
    std::memcpy(parts, &bits, sizeof(bits));
#else
    std::memcpy(parts, p, sizeof(parts));  // the emulation: no type punning through uint4
#endif
#pragma unroll
    for (int k = 0; k < Vec; ++k) x[k] = to_math(parts[k]);
  }
}

template <int Vec, class V, class A>
__device__ __forceinline__ void store_channels(V* p, const A (&x)[Vec]) {
  if constexpr (Vec == 1) {
    p[0] = from_math<V>(x[0]);
  } else {
    V parts[Vec];
#pragma unroll
    for (int k = 0; k < Vec; ++k) parts[k] = from_math<V>(x[k]);
#if defined(__CUDA_ARCH__)
    uint4 bits;
    std::memcpy(&bits, parts, sizeof(bits));
    *reinterpret_cast<uint4*>(p) = bits;
#else
    std::memcpy(p, parts, sizeof(parts));
#endif
  }
}

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

// ---- groups of lanes ----

// This thread's place: `lanes` lanes per group (a power of two dividing the warp), the group's
// first item and the items one grid stride covers. A kernel walks its items with
//   for (item = g.first; g.warp_has(item, items); item += g.stride)
// so every lane of a warp takes the same number of steps (the shuffles need the whole warp); a
// group past the end works on a copy of the last item and writes nothing.
struct Group {
  int lanes, lane, index_in_warp;
  std::int64_t first, stride;
  __device__ __forceinline__ bool warp_has(std::int64_t item, std::int64_t items) const {
    return item - index_in_warp < items;
  }
};

__device__ __forceinline__ Group group_of(int lanes) {
  const std::int64_t thread = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane_in_warp = static_cast<int>(threadIdx.x) & (kWarpLanes - 1);
  return {lanes, lane_in_warp & (lanes - 1), lane_in_warp / lanes, thread / lanes,
          std::int64_t(gridDim.x) * blockDim.x / lanes};
}

// Lane `source`'s x, within each group. Every lane of the warp must call it.
template <class T>
__device__ __forceinline__ T from_lane(T x, int source, int lanes) {
  return __shfl_sync(0xffffffffu, x, source, lanes);
}

// A sum over the lanes of a group. The butterfly's order is fixed, so every lane's total is the
// same bits on every run. Every lane of the warp must call it.
template <class A>
__device__ __forceinline__ A group_sum(A x, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <class A>
__device__ __forceinline__ A group_max(A x, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    const A y = __shfl_xor_sync(0xffffffffu, x, offset);
    x = y > x ? y : x;
  }
  return x;
}

// ---- the problem as kernels see it ----

struct Shape {
  std::int64_t N, S, M, D, Q, L, K;  // K: samples per head, the sum of the levels' P_l
  const LevelGeometry* levels;       // device table, with each level's points and point_start
  int coords;                        // fused: 2 or 4
  DType location_type, weight_type, reference_type;
  bool discrete;        // Sampling::discrete: one pixel per sample, no location gradient
  double offset_scale;  // fused, 4 coordinates: loc = ref[:2] + off / P_l * ref[2:] * offset_scale
};

// Where a sample's location and weight come from: the caller's sampling_locations and
// attention_weights, or (fused) reference_points + sampling_offsets and the softmax of the logits.
struct SampleInputs {
  const void* locations;  // or sampling_offsets
  const void* weights;    // or attention_logits
  const void* reference;  // fused
};

// Fused op: a head's softmax as {max logit, 1 / sum of exp(logit - max)}, so a sample's weight
// comes from its own logit alone. Computed by the head's group (each lane its samples in order,
// then the butterfly), the same way in the forward and the backward.
template <class A>
struct Softmax {
  A top = 0, scale = 0;
};

template <class A>
__device__ __forceinline__ Softmax<A> head_softmax(const Shape& s, const void* logits, std::int64_t head,
                                                   const Group& g) {
  A top = -INFINITY;
  for (std::int64_t k = g.lane; k < s.K; k += g.lanes) {
    const A z = load_real<A>(logits, s.weight_type, head * s.K + k);
    top = z > top ? z : top;
  }
  top = group_max(top, g.lanes);
  A sum = 0;
  for (std::int64_t k = g.lane; k < s.K; k += g.lanes)
    sum += exp_of(load_real<A>(logits, s.weight_type, head * s.K + k) - top);
  sum = group_sum(sum, g.lanes);
  return {top, A(1) / sum};
}

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
__device__ __forceinline__ Sample<A> fetch(const Shape& s, const SampleInputs& in, const Softmax<A>& softmax,
                                           std::int64_t sample, std::int64_t head, std::int64_t l,
                                           const LevelGeometry& g) {
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
    r.a = exp_of(w - softmax.top) * softmax.scale;
  }
  return r;
}

// The sample's corners. u = x*W - 0.5 is computed in double, as the CPU backend does: exact for
// f32, bf16 and f16 coordinates (in f32, x*W is not), so the corners (and the one-sided derivative
// at integer coordinates) are the CPU's, whatever the rounding of the fractions in A after; it
// runs once per sample per group, not per lane. Discrete: the pixel of x*W + 0.5 and y*H + 0.5,
// in double for the same reason (a pixel boundary falls where the reference's does).
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

// A sample as its owner lane holds it: where it is, and what the group needs to read its corners.
template <class A>
struct Located {
  Sample<A> smp;
  Corners<A> c;
  LevelGeometry g;
  std::int64_t level;
  // What the owner hands to its group. Corner k = (dh, dw) = (k >> 1, k & 1) is the value row
  // row + dh * below + dw (rows of the head's (n, m), counted from the map's first pixel); bit k
  // of `mask` says the sample reads it (in range, inside the map, and for a discrete sample only
  // its pixel, k = 0).
  std::int64_t row, below;
  int mask;
};

template <class A, bool Fused>
__device__ __forceinline__ Located<A> locate(const Shape& s, const SampleInputs& in, const Softmax<A>& softmax,
                                             std::int64_t head, std::int64_t k) {
  Located<A> r;
  r.level = last_level_at_or_below(s.levels, s.L, &LevelGeometry::point_start, k);
  r.g = s.levels[r.level];
  r.smp = fetch<A, Fused>(s, in, softmax, head * s.K + k, head, r.level, r.g);
  r.c = place(s, r.smp, r.g);
  r.row = r.g.start + r.c.h0 * r.g.width + r.c.w0;
  r.below = r.g.width;
  r.mask = 0;
  if (r.c.inside) {
    const int corners = s.discrete ? 1 : 4;
    for (int k4 = 0; k4 < corners; ++k4) {
      const std::int64_t h = r.c.h0 + (k4 >> 1), w = r.c.w0 + (k4 & 1);
      if (h >= 0 && h < r.g.height && w >= 0 && w < r.g.width) r.mask |= 1 << k4;
    }
  }
  return r;
}

// ---- kernels ----

// Blocks per SM the register allocation must leave room for. Stated, because without a minimum
// ptxas (CUDA 13, sm_90) picked 48-64 registers for the forward and spilled; a forward within 85
// registers keeps 3 blocks (24 warps) per SM, the sample gradients within 128 keep 2. CI checks
// that neither spills (scripts/ptxas-budget.sh).
constexpr int kForwardBlocksPerSM = 3;
constexpr int kGradientBlocksPerSM = 2;

// The level table, from the upload's arguments (which a captured graph keeps) into the workspace.
__global__ void upload_levels_kernel(LevelUpload upload, LevelGeometry* levels) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < upload.count) levels[i] = upload.levels[i];
}

template <class V, bool Fused, int Vec, class I, int kD, int kK>
__global__ void __launch_bounds__(kBlockThreads, kForwardBlocksPerSM)
    forward_kernel(Shape s, SampleInputs in, const V* value, V* output, int lanes) {
  using A = typename MathOf<V>::type;
  if constexpr (kD > 0) lanes = kD / Vec;  // compiled for Fixed<kD, kK> sizes: see with_fixed_sizes
  const std::int64_t K = kK > 0 ? kK : s.K;
  const Group g = group_of(lanes);
  const std::int64_t heads = s.N * s.Q * s.M;
  const I row_stride = static_cast<I>(s.M * s.D);  // between rows of value for one head
  const I D = kD > 0 ? I(kD) : static_cast<I>(s.D);
  for (std::int64_t item = g.first; g.warp_has(item, heads); item += g.stride) {
    const bool active = item < heads;
    const std::int64_t head = active ? item : heads - 1;
    const I m = static_cast<I>(head % s.M);
    const I n = static_cast<I>(head / s.M / s.Q);
    const V* value_nm = value + (n * static_cast<I>(s.S) * static_cast<I>(s.M) + m) * D;
    Softmax<A> softmax;
    if constexpr (Fused) softmax = head_softmax<A>(s, in.weights, head, g);
    for (I c0 = 0; c0 < D; c0 += static_cast<I>(lanes) * Vec) {
      const I d = c0 + static_cast<I>(g.lane) * Vec;
      const bool reads = d < D;  // lanes past the head's channels stay in step, reading nothing
      A acc[Vec] = {};
      for (std::int64_t base = 0; base < K; base += lanes) {
        // This lane locates sample base + lane; the group then walks the batch in order.
        I row = 0, below = 0;
        int mask = 0;
        A weight[4] = {};
        if (base + g.lane < K) {
          const Located<A> at = locate<A, Fused>(s, in, softmax, head, base + g.lane);
          row = static_cast<I>(at.row);
          below = static_cast<I>(at.below);
          mask = at.mask;
#pragma unroll
          for (int k4 = 0; k4 < 4; ++k4) weight[k4] = at.smp.a * corner_weight(at.c, k4 >> 1, k4 & 1);
        }
        const int batch = static_cast<int>(K - base < lanes ? K - base : lanes);
        for (int j = 0; j < batch; ++j) {
          const I r = from_lane(row, j, lanes), b = from_lane(below, j, lanes);
          const int bits = from_lane(mask, j, lanes);
          A w[4];
#pragma unroll
          for (int k4 = 0; k4 < 4; ++k4) w[k4] = from_lane(weight[k4], j, lanes);
          if (!reads) continue;
#pragma unroll
          for (int k4 = 0; k4 < 4; ++k4) {
            if (!(bits >> k4 & 1)) continue;
            A v[Vec];
            load_channels<Vec>(value_nm + (r + (k4 >> 1) * b + (k4 & 1)) * row_stride + d, v);
#pragma unroll
            for (int c = 0; c < Vec; ++c) acc[c] += w[k4] * v[c];
          }
        }
      }
      if (active && reads) store_channels<Vec>(output + static_cast<I>(head) * D + d, acc);
    }
  }
}

// Where the per-sample gradients go. Plain op: grad_locations and grad_weights. Fused op:
// grad_offsets, grad_logits (via weight_gradients, dL/da per sample, and the softmax's backward)
// and reference_partials (per sample, summed by reference_sum_kernel). `scatter`: the atomic
// variant's grad_value (or its f32 accumulator).
template <class A>
struct SampleGradients {
  void* locations;  // or sampling_offsets'
  void* weights;    // or attention_logits'
  A* weight_gradients;
  A* reference_partials;
  A* scatter;
};

// The deterministic grad_value's records (plan.h's RecordPlan), written by the sample-gradient
// kernel: keys null when grad_value is not wanted (or is the atomic variant's).
template <class A>
struct RecordsOut {
  void* keys;  // uint32 or uint64 (wide)
  void* ids;
  A* coefficients;
  std::int64_t rows;
  int corners;
  bool wide;
};

__device__ __forceinline__ void store_index(void* p, bool wide, std::int64_t i, std::int64_t x) {
  if (wide)
    static_cast<std::uint64_t*>(p)[i] = static_cast<std::uint64_t>(x);
  else
    static_cast<std::uint32_t*>(p)[i] = static_cast<std::uint32_t>(x);
}

// One group per head. For each of its samples, the group's lanes take the dot products of
// grad_output with the sample's four corner rows over their channels, the group sums them, and
// the sample's owner lane turns them into dL/da, dL/du and dL/dv and writes its gradients and its
// grad_value records.
template <class V, bool Fused, bool Atomic, int Vec, class I, int kD, int kK>
__global__ void __launch_bounds__(kBlockThreads, kGradientBlocksPerSM)
    sample_gradients_kernel(Shape s, SampleInputs in, const V* value, const V* grad_output,
                            SampleGradients<typename MathOf<V>::type> out, RecordsOut<typename MathOf<V>::type> records,
                            int lanes) {
  using A = typename MathOf<V>::type;
  if constexpr (kD > 0) lanes = kD / Vec;  // as in forward_kernel
  const std::int64_t K = kK > 0 ? std::int64_t(kK) : s.K;  // samples per head
  const Group g = group_of(lanes);
  const std::int64_t heads = s.N * s.Q * s.M;
  const I row_stride = static_cast<I>(s.M * s.D);
  const I D = kD > 0 ? I(kD) : static_cast<I>(s.D);
  const int corners = s.discrete ? 1 : 4;
  for (std::int64_t item = g.first; g.warp_has(item, heads); item += g.stride) {
    const bool active = item < heads;
    const std::int64_t head = active ? item : heads - 1;
    const I m = static_cast<I>(head % s.M);
    const I n = static_cast<I>(head / s.M / s.Q);
    const I nm = (n * static_cast<I>(s.S) * static_cast<I>(s.M) + m) * D;  // value[n, 0, m, 0]
    const V* value_nm = value + nm;
    const V* g_head = grad_output + static_cast<I>(head) * D;
    Softmax<A> softmax;
    if constexpr (Fused) softmax = head_softmax<A>(s, in.weights, head, g);
    A weighted_sum = 0;  // fused: this lane's share of sum_k a_k dL/da_k over the head's samples
    for (std::int64_t base = 0; base < K; base += lanes) {
      const std::int64_t k = base + g.lane;
      const bool owns = k < K;
      Located<A> at{};
      A weight[4] = {};  // atomic variant: a * the corner's bilinear weight
      if (owns) {
        at = locate<A, Fused>(s, in, softmax, head, k);
        if constexpr (Atomic)
#pragma unroll
          for (int k4 = 0; k4 < 4; ++k4) weight[k4] = at.smp.a * corner_weight(at.c, k4 >> 1, k4 & 1);
      }
      const I row = static_cast<I>(at.row), below = static_cast<I>(at.below);
      A mine[4] = {};  // the owner's dot(grad_output, corner row), summed over the group
      const int batch = static_cast<int>(K - base < lanes ? K - base : lanes);
      for (int j = 0; j < batch; ++j) {
        const I r = from_lane(row, j, lanes), b = from_lane(below, j, lanes);
        const int bits = from_lane(at.mask, j, lanes);
        A w[4] = {};
        if constexpr (Atomic)
#pragma unroll
          for (int k4 = 0; k4 < 4; ++k4) w[k4] = from_lane(weight[k4], j, lanes);
        A dot[4] = {};
        for (I c0 = 0; c0 < D && bits; c0 += static_cast<I>(lanes) * Vec) {
          const I d = c0 + static_cast<I>(g.lane) * Vec;
          if (d >= D) continue;
          A go[Vec];
          load_channels<Vec>(g_head + d, go);
#pragma unroll
          for (int k4 = 0; k4 < 4; ++k4) {
            if (!(bits >> k4 & 1)) continue;  // unread, or past a discrete sample's one pixel
            const I offset = (r + (k4 >> 1) * b + (k4 & 1)) * row_stride + d;
            A v[Vec];
            load_channels<Vec>(value_nm + offset, v);
#pragma unroll
            for (int c = 0; c < Vec; ++c) dot[k4] += go[c] * v[c];
            if constexpr (Atomic) {
              if (active && out.scatter)
#pragma unroll
                for (int c = 0; c < Vec; ++c) atomicAdd(out.scatter + nm + offset + c, w[k4] * go[c]);
            }
          }
        }
        // Constant trip counts and indices: the arrays stay in registers.
#pragma unroll
        for (int k4 = 0; k4 < 4; ++k4)
          if (k4 < corners) dot[k4] = group_sum(dot[k4], lanes);
        if (g.lane == j)
#pragma unroll
          for (int k4 = 0; k4 < 4; ++k4) mine[k4] = dot[k4];
      }
      if (!owns || !active) continue;

      // The owner's sample: dL/da = sum over corners of its weight * dot, dL/du and dL/dv from
      // the differences of the dots (SPEC "Backward"; an unread corner's dot is 0).
      const Corners<A>& c = at.c;
      const std::int64_t sample = head * K + k;
      A ga = 0, du = 0, dv = 0;
      if (c.inside) {
        if (s.discrete) {
          ga = mine[0];  // the pixel itself: no 0-weighted neighbours, no location derivative
        } else {
          ga = c.hh * c.hw * mine[0] + c.hh * c.lw * mine[1] + c.lh * c.hw * mine[2] + c.lh * c.lw * mine[3];
          du = c.hh * (mine[1] - mine[0]) + c.lh * (mine[3] - mine[2]);
          dv = c.hw * (mine[2] - mine[0]) + c.lw * (mine[3] - mine[1]);
        }
      }
      if (records.keys) {
        // An unread corner's record sorts last (key `rows`) and is never summed.
#pragma unroll
        for (int k4 = 0; k4 < 4; ++k4) {
          if (k4 >= records.corners) break;
          const std::int64_t record = sample * records.corners + k4;
          const bool read = at.mask >> k4 & 1;
          const std::int64_t pixel = at.row + (k4 >> 1) * at.below + (k4 & 1);
          store_index(records.keys, records.wide, record,
                            read ? (std::int64_t(n) * s.S + pixel) * s.M + m : records.rows);
          store_index(records.ids, records.wide, record, record);
          records.coefficients[record] = read ? at.smp.a * corner_weight(c, k4 >> 1, k4 & 1) : A(0);
        }
      }
      // A sample zeroed by the range rule moves nothing: no 0 * inf from its weight or box. Nor
      // does a discrete one: its pixel is piecewise constant in the location (SPEC), so its
      // location, offset and reference point gradients are zeros.
      const bool moves = c.inside && !s.discrete;
      const LevelGeometry& lg = at.g;
      const A gx = moves ? at.smp.a * A(lg.width) * du : A(0);
      const A gy = moves ? at.smp.a * A(lg.height) * dv : A(0);
      if constexpr (!Fused) {
        if (out.locations) {
          store_real(out.locations, s.location_type, 2 * sample, gx);
          store_real(out.locations, s.location_type, 2 * sample + 1, gy);
        }
        if (out.weights) store_real(out.weights, s.weight_type, sample, ga);
      } else {
        if (c.inside) weighted_sum += at.smp.a * ga;
        if (out.weight_gradients) out.weight_gradients[sample] = ga;
        A gox = 0, goy = 0;
        A ref[4] = {};  // this sample's share of grad_reference_points[n, q, l, :]
        if (moves) {
          if (s.coords == 2) {
            gox = gx / A(lg.width);
            goy = gy / A(lg.height);
          } else {
            // d loc / d off = size * offset_scale / P_l, d loc / d size = off / P_l * offset_scale,
            // each factor in double in the reference's order.
            const double points = double(lg.points);
            gox = gx * A(at.smp.rw * s.offset_scale / points);
            goy = gy * A(at.smp.rh * s.offset_scale / points);
            ref[2] = gx * A(at.smp.ox / points * s.offset_scale);
            ref[3] = gy * A(at.smp.oy / points * s.offset_scale);
          }
          ref[0] = gx;
          ref[1] = gy;
        }
        if (out.reference_partials)
#pragma unroll
          for (int k4 = 0; k4 < 4; ++k4)
            if (k4 < s.coords) out.reference_partials[sample * s.coords + k4] = ref[k4];
        if (out.locations) {
          store_real(out.locations, s.location_type, 2 * sample, gox);
          store_real(out.locations, s.location_type, 2 * sample + 1, goy);
        }
      }
    }
    if constexpr (Fused) {
      // The softmax's backward: dL/dz_k = a_k * (dL/da_k - sum_j a_j dL/da_j), each lane for the
      // samples it owns (it wrote their dL/da itself).
      weighted_sum = group_sum(weighted_sum, lanes);
      if (active && out.weights) {
        for (std::int64_t k = g.lane; k < K; k += lanes) {
          const std::int64_t sample = head * K + k;
          const A a = exp_of(load_real<A>(in.weights, s.weight_type, sample) - softmax.top) * softmax.scale;
          store_real(out.weights, s.weight_type, sample, a * (out.weight_gradients[sample] - weighted_sum));
        }
      }
    }
  }
}

// grad_reference_points[n, q, l, c] = the sum over heads m, then the level's points p, in that
// order, of the samples' partials.
template <class A>
__global__ void reference_sum_kernel(Shape s, const A* partials, void* grad_reference) {
  const std::int64_t per_query = s.L * s.coords;
  const std::int64_t count = s.N * s.Q * per_query;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const std::int64_t nq = i / per_query, l = i % per_query / s.coords, c = i % s.coords;
    const LevelGeometry g = s.levels[l];
    A sum = 0;
    for (std::int64_t m = 0; m < s.M; ++m)
      for (std::int64_t p = 0; p < g.points; ++p)
        sum += partials[((nq * s.M + m) * s.K + g.point_start + p) * s.coords + c];
    store_real(grad_reference, s.reference_type, i, sum);
  }
}

// The sorted records as the chunk kernels read them.
template <class Key, class Id>
struct SortedRecords {
  const Key* keys;
  const Id* ids;
  std::int64_t records, rows, chunk, chunks;  // chunk: records per chunk
  int corners;
};

// Deterministic grad_value, after the sort: one group per chunk of sorted records
// walks them in order, summing coefficient * grad_output[head] per run of equal keys (a piece of a
// row's records). A piece that is its row's whole run is the row: written to grad_value. A piece
// cut by the chunk's start or end is a partial: written to the chunk's slot 0 (its first piece)
// or 1 (its last), for combine_kernel.
template <class V, int Vec, class Key, class Id>
__global__ void __launch_bounds__(kBlockThreads)
    chunk_sums_kernel(Shape s, SortedRecords<Key, Id> sorted, const typename MathOf<V>::type* coefficients,
                      const V* grad_output, V* grad_value, typename MathOf<V>::type* partials, int lanes) {
  using A = typename MathOf<V>::type;
  const Group g = group_of(lanes);
  const std::int64_t D = s.D;
  for (std::int64_t chunk = g.first; chunk < sorted.chunks; chunk += g.stride) {
    const std::int64_t begin = chunk * sorted.chunk;
    const std::int64_t end = begin + sorted.chunk < sorted.records ? begin + sorted.chunk : sorted.records;
    for (std::int64_t c0 = 0; c0 < D; c0 += std::int64_t(lanes) * Vec) {
      const std::int64_t d = c0 + std::int64_t(g.lane) * Vec;
      if (d >= D) continue;
      A acc[Vec] = {};
      std::int64_t piece = begin;  // where the current piece starts
      for (std::int64_t i = begin; i < end; ++i) {
        const std::int64_t key = static_cast<std::int64_t>(sorted.keys[i]);
        if (key >= sorted.rows) break;  // unread corners sort last
        const std::int64_t id = static_cast<std::int64_t>(sorted.ids[i]);
        const A coefficient = coefficients[id];
        A go[Vec];
        load_channels<Vec>(grad_output + id / sorted.corners / s.K * D + d, go);
#pragma unroll
        for (int c = 0; c < Vec; ++c) acc[c] += coefficient * go[c];
        if (i + 1 < end && static_cast<std::int64_t>(sorted.keys[i + 1]) == key) continue;
        const bool starts_row = piece > begin || begin == 0 || static_cast<std::int64_t>(sorted.keys[begin - 1]) != key;
        const bool ends_row = i + 1 < end || end == sorted.records || static_cast<std::int64_t>(sorted.keys[end]) != key;
        if (starts_row && ends_row)
          store_channels<Vec>(grad_value + key * D + d, acc);
        else
          store_channels<Vec>(partials + (chunk * 2 + (piece == begin ? 0 : 1)) * D + d, acc);
#pragma unroll
        for (int c = 0; c < Vec; ++c) acc[c] = 0;
        piece = i + 1;
      }
    }
  }
}

// A row whose records span chunks: the chunk where the row starts adds its last piece's partial
// and the next chunks' first pieces', in chunk order, and writes the row.
template <class V, int Vec, class Key, class Id>
__global__ void __launch_bounds__(kBlockThreads)
    combine_kernel(Shape s, SortedRecords<Key, Id> sorted, const typename MathOf<V>::type* partials, V* grad_value,
                   int lanes) {
  using A = typename MathOf<V>::type;
  const Group g = group_of(lanes);
  const std::int64_t D = s.D;
  const auto key_at = [&](std::int64_t i) { return static_cast<std::int64_t>(sorted.keys[i]); };
  for (std::int64_t chunk = g.first; chunk < sorted.chunks; chunk += g.stride) {
    const std::int64_t begin = chunk * sorted.chunk;
    const std::int64_t end = begin + sorted.chunk < sorted.records ? begin + sorted.chunk : sorted.records;
    const std::int64_t key = key_at(end - 1);
    if (key >= sorted.rows || end == sorted.records || key_at(end) != key) continue;  // no row leaves this chunk
    const bool whole = key_at(begin) == key;  // the chunk is one piece
    if (whole && begin > 0 && key_at(begin - 1) == key) continue;  // the row started in an earlier chunk
    for (std::int64_t c0 = 0; c0 < D; c0 += std::int64_t(lanes) * Vec) {
      const std::int64_t d = c0 + std::int64_t(g.lane) * Vec;
      if (d >= D) continue;
      A sum[Vec];
      const A* own = partials + (chunk * 2 + (whole ? 0 : 1)) * D + d;
#pragma unroll
      for (int c = 0; c < Vec; ++c) sum[c] = own[c];
      for (std::int64_t next = chunk + 1; next < sorted.chunks; ++next) {
        const A* piece = partials + next * 2 * D + d;
#pragma unroll
        for (int c = 0; c < Vec; ++c) sum[c] += piece[c];
        const std::int64_t next_end =
            (next + 1) * sorted.chunk < sorted.records ? (next + 1) * sorted.chunk : sorted.records;
        if (key_at(next_end - 1) != key || next_end == sorted.records || key_at(next_end) != key) break;
      }
      store_channels<Vec>(grad_value + key * D + d, sum);
    }
  }
}

// The atomic variant of bf16/f16 grad_value: the f32 accumulator rounded once.
template <class V>
__global__ void round_kernel(const float* accumulator, V* grad_value, std::int64_t count) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride)
    grad_value[i] = from_math<V>(accumulator[i]);
}

// ---- host side ----

// A failed call is reported, and its error cleared: msda links its own CUDA runtime, whose last
// error only msda's calls set, so an error pending there has been reported already; left in
// place, one out-of-memory would make every later launch fail. (An error from inside a kernel is
// sticky in CUDA itself: the context is lost, and every call reports it, as it should.)
void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  throw std::runtime_error(std::string("msda: cuda backend: ") + what + ": " + cudaGetErrorString(status));
}

cudaStream_t stream_of(const Params& p) { return static_cast<cudaStream_t>(p.cuda.stream); }

// The caller's device (options.cuda.device) made current for the call, and the previous one
// restored after: msda's runtime keeps its own current device, apart from a framework's.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (device < 0) return;
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ == device) return;
    check(cudaSetDevice(device), "cudaSetDevice to options.cuda.device");
    restore_ = true;
  }
  ~DeviceScope() {
    if (restore_ && cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

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
  if (!p.cuda.check_pointers) return;  // the caller vouches for them (a framework's tensors)
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
      if (p.cuda.check_pointers) require_device_memory(p.cuda.workspace, "options.cuda.workspace");
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
    if (owned_ && cudaFreeAsync(owned_, stream_) != cudaSuccess) (void)cudaGetLastError();
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

template <class Key, class Id>
std::size_t sort_scratch_bytes(std::int64_t records, int bits, cudaStream_t stream) {
  std::size_t bytes = 0;
  cub::DoubleBuffer<Key> keys(nullptr, nullptr);
  cub::DoubleBuffer<Id> ids(nullptr, nullptr);
  // The count in the ids' type: CUB sizes its offsets by it (32-bit ones for narrow problems).
  check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, ids, static_cast<Id>(records), 0, bits, stream),
        "sizing the sort");
  return bytes;
}

std::size_t sort_scratch_bytes(const RecordPlan& plan, cudaStream_t stream) {
  return plan.wide ? sort_scratch_bytes<std::uint64_t, std::uint64_t>(plan.records, plan.key_bits, stream)
                   : sort_scratch_bytes<std::uint32_t, std::uint32_t>(plan.records, plan.key_bits, stream);
}

// Whether the backward computes grad_value from sorted records (and so sorts).
bool sorted_records(const Params& p) { return p.grad_value && p.cuda.deterministic; }

std::size_t sort_scratch_for(const Params& p) {
  return sorted_records(p) ? sort_scratch_bytes(plan_records(p), stream_of(p)) : 0;
}

template <class Kernel, class... Args>
void launch(Launch shape, cudaStream_t stream, Kernel kernel, Args... args) {
  if (shape.blocks == 0) return;
  MSDA_CUDA_LAUNCH(kernel, shape.blocks, shape.threads, stream, args...);
  check(cudaGetLastError(), "a kernel launch");
}

bool aligned16(const void* p) { return !p || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// The kernels' instantiation for a call: `Vec` channels per lane (16-byte loads, or 1) and the
// index type (int32 where every offset fits). f(vector, index) with std::integral_constant
// vector and a value of the index type.
template <int N>
using VectorOf = std::integral_constant<int, N>;

template <class V, class F>
void with_layout(const ChannelMap& map, bool narrow, F&& f) {
  constexpr int kVector = sizeof(V) < 8 ? int(16 / sizeof(V)) : 1;
  if (kVector > 1 && map.vector == kVector) {
    if (narrow)
      f(VectorOf<kVector>{}, std::int32_t{});
    else
      f(VectorOf<kVector>{}, std::int64_t{});
  } else {
    if (narrow)
      f(VectorOf<1>{}, std::int32_t{});
    else
      f(VectorOf<1>{}, std::int64_t{});
  }
}

// Sizes compiled into a kernel (FlashAttention's traits): D channels per head and K = L*P samples
// per head; 0 for either: read from the Shape at run time.
template <int D, int K>
struct Fixed {
  static constexpr int d = D, k = K;
};

// The DETR family's common case gets kernels compiled for its sizes: D = 32 and K = 16 (4 levels
// of 4 points: Deformable DETR, DINO, Mask2Former, RT-DETR's encoder-decoders at 4 levels), with
// 16-byte vectors and 32-bit offsets. The group's lane count, the sample loop's trip count and
// the channel loop are then constants: the loops unroll and every shuffle takes a constant lane.
// Any other problem runs the same kernels with their sizes read at run time.
template <int Vec, class I, class F>
void with_fixed_sizes(const Params& p, const ChannelMap& map, F&& f) {
  if constexpr (Vec > 1 && std::is_same_v<I, std::int32_t>) {
    if (p.D == 32 && p.K == 16 && map.lanes == 32 / Vec) return f(Fixed<32, 16>{});
  }
  f(Fixed<0, 0>{});
}

// Everything both passes set up: the workspace and the level table on the device.
struct Setup {
  Workspace layout;
  Scratch scratch;
  Shape shape;
  SampleInputs inputs;

  Setup(const Params& p, bool backward, std::size_t sort_bytes)
      : layout(plan_workspace(p, backward, sort_bytes)), scratch(p, layout.total) {
    const std::vector<LevelGeometry> levels = level_geometry(p);
    LevelGeometry* table = scratch.at<LevelGeometry>(layout.levels);
    for (std::size_t first = 0; first < levels.size(); first += kLevelsPerUpload) {
      LevelUpload upload{};
      upload.count = static_cast<int>(std::min<std::size_t>(kLevelsPerUpload, levels.size() - first));
      for (int i = 0; i < upload.count; ++i) upload.levels[i] = levels[first + i];
      launch(launch_flat(upload.count), stream_of(p), upload_levels_kernel, upload, table + first);
    }
    const Problem& pr = *p.problem;
    shape = {p.N, p.S, p.M, p.D, p.Q, p.L, p.K, table, static_cast<int>(p.reference_coords),
             pr.location_dtype, pr.weight_dtype, pr.reference_dtype, p.discrete, p.offset_scale};
    inputs = {p.locations, p.weights, p.reference_points};
  }
};

template <class V>
void forward_typed(const Params& p) {
  Setup setup(p, false, 0);
  const ChannelMap map = channel_map(p.D, sizeof(V), aligned16(p.value) && aligned16(p.output));
  const Launch shape = launch_for(p.N * p.Q * p.M, map.lanes);
  const auto* value = static_cast<const V*>(p.value);
  auto* output = static_cast<V*>(p.output);
  with_layout<V>(map, narrow_indexing(p), [&](auto vector, auto index) {
    using I = decltype(index);
    constexpr int kVec = decltype(vector)::value;
    with_fixed_sizes<kVec, I>(p, map, [&](auto fixed) {
      constexpr int kD = decltype(fixed)::d, kK = decltype(fixed)::k;
      if (p.fused)
        launch(shape, stream_of(p), forward_kernel<V, true, kVec, I, kD, kK>, setup.shape, setup.inputs, value, output,
               map.lanes);
      else
        launch(shape, stream_of(p), forward_kernel<V, false, kVec, I, kD, kK>, setup.shape, setup.inputs, value,
               output, map.lanes);
    });
  });
}

// After the sample-gradient kernel wrote the records: sort them, sum the chunks, join the rows
// that span chunks. grad_value is zeroed first: a row no sample reads has no record.
template <class V, class Key, class Id>
void sum_sorted_records(const Params& p, const RecordPlan& plan, const Setup& setup, const ChannelMap& map) {
  using A = typename MathOf<V>::type;
  const Workspace& w = setup.layout;
  const Scratch& scratch = setup.scratch;
  cudaStream_t stream = stream_of(p);
  // LSD radix sort is stable: equal keys keep the record order the ids started in.
  cub::DoubleBuffer<Key> keys(scratch.at<Key>(w.keys[0]), scratch.at<Key>(w.keys[1]));
  cub::DoubleBuffer<Id> ids(scratch.at<Id>(w.ids[0]), scratch.at<Id>(w.ids[1]));
  std::size_t sort_bytes = w.sort_scratch.bytes;
  check(cub::DeviceRadixSort::SortPairs(scratch.at<void>(w.sort_scratch), sort_bytes, keys, ids,
                                        static_cast<Id>(plan.records), 0, plan.key_bits, stream),
        "sorting the grad_value records");
  check(cudaMemsetAsync(p.grad_value, 0, static_cast<std::size_t>(plan.rows * p.D) * sizeof(V), stream),
        "zeroing grad_value");
  const SortedRecords<Key, Id> sorted{keys.Current(), ids.Current(), plan.records, plan.rows,
                                      plan.chunk,         plan.chunks,   plan.corners};
  const A* coefficients = scratch.at<A>(w.coefficients);
  A* partials = scratch.at<A>(w.partials);
  auto* grad_value = static_cast<V*>(p.grad_value);
  const Launch chunks = launch_for(plan.chunks, map.lanes);
  with_layout<V>(map, false, [&](auto vector, auto) {
    constexpr int kVec = decltype(vector)::value;
    launch(chunks, stream, chunk_sums_kernel<V, kVec, Key, Id>, setup.shape, sorted, coefficients,
           static_cast<const V*>(p.grad_output), grad_value, partials, map.lanes);
    launch(chunks, stream, combine_kernel<V, kVec, Key, Id>, setup.shape, sorted, static_cast<const A*>(partials),
           grad_value, map.lanes);
  });
}

template <class V>
void backward_typed(const Params& p) {
  using A = typename MathOf<V>::type;
  cudaStream_t stream = stream_of(p);
  const RecordPlan plan = plan_records(p);
  const bool deterministic = sorted_records(p);
  Setup setup(p, true, deterministic ? sort_scratch_bytes(plan, stream) : 0);
  const Workspace& w = setup.layout;
  const bool atomic = p.grad_value && !p.cuda.deterministic;
  constexpr bool kStorageOnly = sizeof(V) == 2;
  const std::int64_t value_count = p.N * p.S * p.M * p.D;
  const ChannelMap map = channel_map(
      p.D, sizeof(V), aligned16(p.value) && aligned16(p.grad_output) && aligned16(p.grad_value));

  SampleGradients<A> out{};
  if (p.fused) {
    out = {p.grad_offsets, p.grad_logits, setup.scratch.template at<A>(w.weight_gradients),
           setup.scratch.template at<A>(w.reference_partials), nullptr};
  } else {
    out = {p.grad_locations, p.grad_weights, nullptr, nullptr, nullptr};
  }
  RecordsOut<A> records{};
  if (deterministic)
    records = {setup.scratch.template at<void>(w.keys[0]), setup.scratch.template at<void>(w.ids[0]),
               setup.scratch.template at<A>(w.coefficients), plan.rows, plan.corners, plan.wide};
  if (atomic) {
    out.scatter = kStorageOnly ? reinterpret_cast<A*>(setup.scratch.template at<float>(w.accumulator))
                               : static_cast<A*>(p.grad_value);
    check(cudaMemsetAsync(out.scatter, 0, static_cast<std::size_t>(value_count) * sizeof(A), stream),
          "zeroing grad_value");
  }
  const Launch heads = launch_for(p.N * p.Q * p.M, map.lanes);
  const auto* value = static_cast<const V*>(p.value);
  const auto* grad_output = static_cast<const V*>(p.grad_output);
  if (atomic) {
    // The ablation: 64-bit indexing always (it is measured, not tuned).
    with_layout<V>(map, false, [&](auto vector, auto) {
      constexpr int kVec = decltype(vector)::value;
      if (p.fused)
        launch(heads, stream, sample_gradients_kernel<V, true, true, kVec, std::int64_t, 0, 0>, setup.shape,
               setup.inputs, value, grad_output, out, records, map.lanes);
      else
        launch(heads, stream, sample_gradients_kernel<V, false, true, kVec, std::int64_t, 0, 0>, setup.shape,
               setup.inputs, value, grad_output, out, records, map.lanes);
    });
    if (kStorageOnly)
      launch(launch_flat(value_count), stream, round_kernel<V>, reinterpret_cast<const float*>(out.scatter),
             static_cast<V*>(p.grad_value), value_count);
  } else if (p.wants_sample_gradients() || deterministic) {
    with_layout<V>(map, narrow_indexing(p), [&](auto vector, auto index) {
      constexpr int kVec = decltype(vector)::value;
      using I = decltype(index);
      with_fixed_sizes<kVec, I>(p, map, [&](auto fixed) {
        constexpr int kD = decltype(fixed)::d, kK = decltype(fixed)::k;
        if (p.fused)
          launch(heads, stream, sample_gradients_kernel<V, true, false, kVec, I, kD, kK>, setup.shape, setup.inputs,
                 value, grad_output, out, records, map.lanes);
        else
          launch(heads, stream, sample_gradients_kernel<V, false, false, kVec, I, kD, kK>, setup.shape, setup.inputs,
                 value, grad_output, out, records, map.lanes);
      });
    });
  }
  if (deterministic) {
    if (plan.wide)
      sum_sorted_records<V, std::uint64_t, std::uint64_t>(p, plan, setup, map);
    else
      sum_sorted_records<V, std::uint32_t, std::uint32_t>(p, plan, setup, map);
  }
  if (p.fused && p.grad_reference_points) {
    launch(launch_flat(p.N * p.Q * p.L * p.reference_coords), stream, reference_sum_kernel<A>, setup.shape,
           static_cast<const A*>(out.reference_partials), p.grad_reference_points);
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
  const bool any = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  if (!any) (void)cudaGetLastError();  // no driver or no device: an answer, not an error to keep
  return any;
}

bool stream_capturing(void* stream) noexcept {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t asked = cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status);
  if (asked != cudaSuccess) {
    (void)cudaGetLastError();
    // The legacy stream asked while another stream captures (global mode): a copy on it would
    // break that capture, so it counts as capturing.
    return asked == cudaErrorStreamCaptureImplicit || asked == cudaErrorStreamCaptureUnsupported;
  }
  return status != cudaStreamCaptureStatusNone;
}

std::size_t workspace_size(const Params& params, bool backward) {
  return plan_workspace(params, backward, backward ? sort_scratch_for(params) : 0).total;
}

void fill_zeros(const Params& params, void* pointer, std::size_t bytes) {
  const DeviceScope device(params.cuda.device);
  if (params.cuda.check_pointers) require_device_memory(pointer, "a gradient");
  check(cudaMemsetAsync(pointer, 0, bytes, stream_of(params)), "zeroing a gradient");
}

void forward(const Params& params) {
  const DeviceScope device(params.cuda.device);
  require_device_pointers(params);
  MSDA_CUDA_VISIT_VALUE(params, forward_typed)
}

void backward(const Params& params) {
  const DeviceScope device(params.cuda.device);
  require_device_pointers(params);
  MSDA_CUDA_VISIT_VALUE(params, backward_typed)
}

}  // namespace MSDA_CUDA_NAMESPACE
