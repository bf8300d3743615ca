// The CPU kernels, written once and compiled once per instruction set: each target translation
// unit (targets/*.cpp) defines MSDA_VEC_BYTES and includes this file inside its own namespace
// msda::cpu::<target>. Vector code comes from GCC vector extensions over a compile-time channel
// count (D = 32 or 64, the sizes of every published model) or, for other D, from loops with a
// scalar tail. Nothing here allocates: scratch comes from the dispatcher (cpu.cpp).

#include "cpu/simd.h"

// ---- the D channels of one row --------------------------------------------------------------

// An accumulator of D channels: in registers when D is known at compile time.
template <class V, int kD>
struct Channels {
  using C = Compute<V>;
  static constexpr int kL = kLanes<C>;
  static constexpr int kRegs = kD > 0 ? kD / kL : 1;
  static_assert(kD % kL == 0, "compile-time D must be a whole number of vectors");

  std::int64_t D;
  C* mem;            // runtime D: D elements of thread scratch
  Vec<C> reg[kRegs];  // compile-time D

  MSDA_INLINE Channels(std::int64_t d, C* scratch) : D(d), mem(scratch) {}

  MSDA_INLINE void zero() {
    if constexpr (kD > 0) {
      for (int r = 0; r < kRegs; ++r) reg[r] = Vec<C>{};
    } else {
      for (std::int64_t d = 0; d < D; ++d) mem[d] = 0;
    }
  }

  MSDA_INLINE void load_row(const V* src) {
    if constexpr (kD > 0) {
      for (int r = 0; r < kRegs; ++r) reg[r] = load(src + r * kL);
    } else {
      for (std::int64_t d = 0; d < D; ++d) mem[d] = Storage<V>::load(src[d]);
    }
  }

  // this += w * row
  MSDA_INLINE void add_scaled(const V* row, C w) {
    if constexpr (kD > 0) {
      const Vec<C> wv = broadcast(w);
      for (int r = 0; r < kRegs; ++r) reg[r] += wv * load(row + r * kL);
    } else {
      const Vec<C> wv = broadcast(w);
      std::int64_t d = 0;
      for (; d + kL <= D; d += kL) store_compute(mem + d, load_compute(mem + d) + wv * load(row + d));
      for (; d < D; ++d) mem[d] += w * Storage<V>::load(row[d]);
    }
  }

  // dot(this, row)
  MSDA_INLINE C dot(const V* row) const {
    if constexpr (kD > 0) {
      Vec<C> sum = reg[0] * load(row);
      for (int r = 1; r < kRegs; ++r) sum += reg[r] * load(row + r * kL);
      return reduce_add<C>(sum);
    } else {
      Vec<C> sum{};
      std::int64_t d = 0;
      for (; d + kL <= D; d += kL) sum += load_compute(mem + d) * load(row + d);
      C total = reduce_add<C>(sum);
      for (; d < D; ++d) total += mem[d] * Storage<V>::load(row[d]);
      return total;
    }
  }

  // this += other (compile-time D: the registers of another accumulator)
  MSDA_INLINE void add(const Channels& other) {
    static_assert(kD > 0);
    for (int r = 0; r < kRegs; ++r) reg[r] += other.reg[r];
  }

  // this * row, lane by lane, summed over the row's vectors but not across lanes (fixed D).
  MSDA_INLINE Vec<C> products(const V* row) const {
    static_assert(kD > 0);
    Vec<C> sum = reg[0] * load(row);
    for (int r = 1; r < kRegs; ++r) sum += reg[r] * load(row + r * kL);
    return sum;
  }

  // dst[0:D] += w * this   (dst in the compute type: a gradient accumulator row)
  MSDA_INLINE void add_scaled_into(C* dst, C w) const {
    const Vec<C> wv = broadcast(w);
    if constexpr (kD > 0) {
      for (int r = 0; r < kRegs; ++r) store_compute(dst + r * kL, load_compute(dst + r * kL) + wv * reg[r]);
    } else {
      std::int64_t d = 0;
      for (; d + kL <= D; d += kL) store_compute(dst + d, load_compute(dst + d) + wv * load_compute(mem + d));
      for (; d < D; ++d) dst[d] += w * mem[d];
    }
  }

  // dst[0:D] = this, in the compute type
  MSDA_INLINE void store_compute_row(C* dst) const {
    if constexpr (kD > 0) {
      for (int r = 0; r < kRegs; ++r) store_compute(dst + r * kL, reg[r]);
    } else {
      for (std::int64_t d = 0; d < D; ++d) dst[d] = mem[d];
    }
  }

  MSDA_INLINE void store_row(V* dst) const {
    if constexpr (kD > 0) {
      for (int r = 0; r < kRegs; ++r) store(dst + r * kL, reg[r]);
    } else {
      store_elements(dst, mem, D);
    }
  }
};

// ---- work sharing ----------------------------------------------------------------------------

// Runs job(i) for i in [0, count) across the calling parallel region's threads, handed out as
// threads finish (dynamic): on a machine shared with other work, or with jobs of unequal cost, no
// thread waits at the loop's end for another's fixed share. `whole_heads`: no two jobs share a
// staged copy (each is a whole (batch, head), or in the backward one level of one), so they go
// one at a time; otherwise consecutive jobs (query ranges of one head) share its copy, and they go
// in runs of count / threads, static's runs, so each head is still copied once per run. One loop
// for both: two would compile the job twice, and the two copies could order a multiply-add's
// operands differently, which decides which of two NaNs a result carries (its bits at different
// thread counts must not differ). The split never changes a result's bits otherwise: every job
// writes its own outputs in its own fixed order.
template <class Job>
MSDA_INLINE void share_jobs(std::int64_t count, bool whole_heads, Job&& job) {
  const std::int64_t threads = omp_get_num_threads();
  const std::int64_t run = whole_heads ? 1 : (count + threads - 1) / threads;
#pragma omp for schedule(dynamic, run)
  for (std::int64_t i = 0; i < count; ++i) job(i);
}

// ---- prefetching -----------------------------------------------------------------------------

// Asks for `bytes` from p on into the cache, one request per 64-byte line.
MSDA_INLINE void prefetch(const void* p, std::size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (std::size_t at = 0; at < bytes; at += 64) __builtin_prefetch(c + at);
}

// Asks for the lines of [p, p + bytes), which the caller is about to write, into the cache, so
// that its stores find them there. A write hint: prefetchw where the target enables it (Arm's
// PRFM PST); the x86 targets are built without -mprfchw, so there it is a read prefetch, which
// measured the same (Intel Xeon: with -mprfchw, ddetr-enc and dino-dec unchanged, ddetr-dec's
// grad_value half 0.89 -> 0.93 ms at best).
MSDA_INLINE void prefetch_for_write(void* p, std::size_t bytes) {
  char* c = static_cast<char*>(p);
  for (std::size_t at = 0; at < bytes; at += 64) __builtin_prefetch(c + at, 1);
}

// The bytes of `count` samples' locations and weights from sample `first`.
MSDA_INLINE void prefetch_samples(const Params& p, std::int64_t first, std::int64_t count) {
  prefetch(static_cast<const char*>(p.locations) + 2 * first * p.location_bytes, 2 * count * p.location_bytes);
  prefetch(static_cast<const char*>(p.weights) + first * p.weight_bytes, count * p.weight_bytes);
}

// Step `step` of a part's walk over its queries: query walk[step] (an encoder's stripes, cpu.cpp
// query_walk), or query `step` where there is no walk order.
MSDA_INLINE std::int64_t query_at(const std::int64_t* walk, std::int64_t step) { return walk ? walk[step] : step; }

// ---- sample geometry, many samples at a time -------------------------------------------------

// dst[0, count) = src[0, count), each element converted as static_cast converts it: whole
// vectors of N elements, the last of them overlapping the one before where count is not a
// multiple of N (it writes the same values again), one element at a time only when count < N.
// Written out for the short runs a query reads and writes (its K weights, 2K locations and their
// gradients): GCC's own vector loop checked the two arrays for overlap and ran its tails element
// by element, ~5 instructions an element (AMD Zen 3, AVX2, callgrind). A copy goes through
// opaque(), or GCC makes the loop a call of memmove (on the x86 baseline, without FMA, opaque()
// hides nothing and the call may stay).
template <int N, class To, class From>
MSDA_INLINE void convert_run(To* __restrict dst, const From* __restrict src, std::int64_t count) {
  typedef From Narrow __attribute__((vector_size(N * sizeof(From))));
  typedef To Wide __attribute__((vector_size(N * sizeof(To))));
  if (count < N) {
    for (std::int64_t i = 0; i < count; ++i) dst[i] = static_cast<To>(src[i]);
    return;
  }
  auto vector_at = [&](std::int64_t i) MSDA_INLINE_LAMBDA {
    Wide w;
    if constexpr (std::is_same_v<To, double> && std::is_same_v<From, float> && N == kLanes<double>) {
      w = load_floats_as_doubles(src + i);
    } else {
      Narrow v;
      __builtin_memcpy(&v, src + i, sizeof(v));
      if constexpr (std::is_same_v<To, From>)
        w = opaque(v);
      else
        w = __builtin_convertvector(v, Wide);
    }
    __builtin_memcpy(dst + i, &w, sizeof(w));
  };
  for (std::int64_t i = 0; i < count - N; i += N) vector_at(i);
  vector_at(count - N);
}

// Reads `count` locations or weights of any allowed dtype as doubles; the dtype switch sits
// outside the loops so each loop is a plain (vectorized) conversion.
MSDA_INLINE void load_doubles(const void* base, std::int64_t first, std::int64_t count, DType dtype, double* dst) {
  switch (dtype) {
    case DType::f32:
      convert_run<kLanes<double>>(dst, static_cast<const float*>(base) + first, count);
      return;
    case DType::f64:
      convert_run<kLanes<double>>(dst, static_cast<const double*>(base) + first, count);
      return;
    case DType::bf16: {
      const bf16* src = static_cast<const bf16*>(base) + first;
      for (std::int64_t i = 0; i < count; ++i) dst[i] = bf16_to_float(src[i]);
      return;
    }
    case DType::f16: {
      const f16* src = static_cast<const f16*>(base) + first;
      for (std::int64_t i = 0; i < count; ++i) dst[i] = f16_to_float(src[i]);
      return;
    }
  }
}

template <class C>
MSDA_INLINE void store_values(void* base, std::int64_t first, std::int64_t count, DType dtype, const C* src) {
  switch (dtype) {
    case DType::f32:
      convert_run<kLanes<C>>(static_cast<float*>(base) + first, src, count);
      return;
    case DType::f64:
      convert_run<kLanes<C>>(static_cast<double*>(base) + first, src, count);
      return;
    case DType::bf16:
      for (std::int64_t i = 0; i < count; ++i)
        static_cast<bf16*>(base)[first + i] = float_to_bf16(static_cast<float>(src[i]));
      return;
    case DType::f16:
      for (std::int64_t i = 0; i < count; ++i)
        static_cast<f16*>(base)[first + i] = float_to_f16(static_cast<float>(src[i]));
      return;
  }
}

// The fused op's softmax of the K logits of row (n, q, m) into a[0, K), in double and
// max-subtracted (SPEC "The fused op"); a[K, K rounded up to whole vectors) must exist and is
// left 0. A NaN logit, or a row of -inf, makes the whole row NaN, as torch.softmax does. The max
// and the sum are taken over vector lanes, then across them in a fixed order: the same bits on
// every call.
MSDA_INLINE void softmax_row(const Params& p, std::int64_t row, std::int64_t LP, double* a) {
  using VD = Vec<double>;
  constexpr std::int64_t kStep = kLanes<double>;
  const std::int64_t padded = (LP + kStep - 1) / kStep * kStep;
  const double inf = __builtin_inf();
  load_doubles(p.weights, row * LP, LP, p.problem->weight_dtype, a);
  for (std::int64_t s = LP; s < padded; ++s) a[s] = -inf;
  VD high = load_compute(a);
  for (std::int64_t s = kStep; s < padded; s += kStep) {
    const VD v = load_compute(a + s);
    high = v > high ? v : high;  // a NaN never wins: it makes the row NaN through the sum instead
  }
  double lanes[kStep];
  __builtin_memcpy(lanes, &high, sizeof(high));
  for (int width = kStep / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] = lanes[i + width] > lanes[i] ? lanes[i + width] : lanes[i];
  const double max = lanes[0];
  VD sum{};
  for (std::int64_t s = 0; s < padded; s += kStep) {
    const VD e = exp_lanes(load_compute(a + s) - max);
    store_compute(a + s, e);
    sum += e;
  }
  const double inverse = 1.0 / reduce_add<double>(sum);
  for (std::int64_t s = 0; s < padded; s += kStep) store_compute(a + s, load_compute(a + s) * inverse);
  for (std::int64_t s = LP; s < padded; ++s) a[s] = 0;
}

// The geometry of a group of samples (SPEC "Forward"), in structure-of-arrays form, computed
// kLanes<double> samples at a time with vector code. Coordinates are computed in double:
// x*W - 0.5 is then exact for f32, bf16 and f16 locations, so which corners a sample touches
// (and its one-sided location gradient at integer coordinates) never depends on rounding, and
// agrees with the reference exactly. A sample zeroed by the range rule (NaN and inf included)
// gets attention weight 0, fractions 0 and no corner on the map.
template <class C>
struct Group {
  static constexpr std::int64_t kStep = kLanes<double>;
  std::int64_t capacity;  // a multiple of 8, so of kStep on every target
  double* x;              // in: locations
  double* y;
  double* a;              // in: attention weights; out: 0 where the sample is zeroed
  double* height;         // in: H and W of each sample's level
  double* width;
  std::int64_t* pixel;    // out [4][capacity]: corner row (level_offset + pixel in its level), -1 off the map
  // in: forward taps: byte offset of each sample's level in value; backward (locate_from): its
  // level's first row, counted from the first row of the part's first level
  std::int64_t* level_offset;
  C* bilinear;            // out [4][capacity]: hh*hw, hh*lw, lh*hw, lh*lw (0 off the map)
  C* lh;                  // out: fractional offsets (0 for a zeroed sample)
  C* lw;
  // The fused op (load): location = origin + offset / divisor * factor * half per coordinate,
  // SPEC's formulas in the reference backend's order, so the same bits (the same corners at any
  // pixel boundary): 2 coordinates: ref + off / (W, H) (divisor W or H, factor 1, half 1); 4:
  // ref[:2] + off / P_l * ref[2:] * offset_scale (divisor P_l, factor w or h, half offset_scale,
  // 0.5 by default). The origins and
  // factors of the L levels come from the reference points of query `prepared` (n * Q + q); the
  // offsets are kept as loaded for the backward's chain rule.
  std::int64_t* level_of;  // in: each sample's level, -1 for padding lanes
  double* level_origin_x;  // [L]
  double* level_origin_y;
  double* level_factor_x;
  double* level_factor_y;
  double* points;          // in: P_l of each sample's level (the fused op's divisor with boxes)
  C* offset_scale;  // [2 capacity], interleaved x, y: the backward's d location / d offset, 1 / (W, H)
                    // (set once, by set_levels) or (w, h) * offset_scale / P_l of query `prepared`
  double* offset_x;
  double* offset_y;
  double half = 1;
  std::int64_t prepared = -1;
  bool discrete = false;  // Sampling::discrete: each sample reads the one pixel it falls in
  // The fused op's softmax rows, computed kRows at a time (their dependency chains are
  // independent, so the CPU overlaps them: one row alone is a chain of max, exp, sum and
  // division); rows_first + k * rows_stride for k < rows_count, each `capacity` doubles.
  // row_stride is set by the kernel: the distance between the rows it reads in turn.
  static constexpr std::int64_t kRows = 8;
  double* rows;
  std::int64_t rows_first = -1, rows_stride = 1, rows_count = 0, row_stride = 1;
  const double* softmax = nullptr;  // the current row's weights before the range rule zeroes any
  static_assert(14 * sizeof(double) + kRows * sizeof(double) + 6 * sizeof(std::int64_t) + 6 * sizeof(C) <=
                kGroupBytesPerSample);

  MSDA_INLINE Group(std::byte* memory, std::int64_t cap) : capacity(cap) {
    x = reinterpret_cast<double*>(memory);
    y = x + cap;
    a = y + cap;
    height = a + cap;
    width = height + cap;
    pixel = reinterpret_cast<std::int64_t*>(width + cap);
    level_offset = pixel + 4 * cap;
    bilinear = reinterpret_cast<C*>(level_offset + cap);
    lh = bilinear + 4 * cap;
    lw = lh + cap;
    level_of = reinterpret_cast<std::int64_t*>(lw + cap);
    level_origin_x = reinterpret_cast<double*>(level_of + cap);
    level_origin_y = level_origin_x + cap;
    level_factor_x = level_origin_y + cap;
    level_factor_y = level_factor_x + cap;
    offset_scale = reinterpret_cast<C*>(level_factor_y + cap);
    offset_x = level_factor_y + 3 * cap;  // offset_scale: 2 * cap values of C, at most 2 * cap doubles
    offset_y = offset_x + cap;
    rows = offset_y + cap;
    points = rows + kRows * cap;
    // Padding lanes (past the samples of a group) hold a harmless finite sample, and its
    // geometry (lanes that locate_range does not reach) is zero.
    for (std::int64_t s = 0; s < cap; ++s) {
      lh[s] = lw[s] = 0;
      for (int c = 0; c < 4; ++c) bilinear[c * cap + s] = 0;
      x[s] = y[s] = a[s] = 0;
      height[s] = width[s] = points[s] = 1;
      level_offset[s] = 0;
      level_of[s] = -1;
      offset_x[s] = offset_y[s] = 0;
    }
  }

  // Reads `count` samples' (x, y) pairs and weights of any allowed dtype, from sample `first`.
  // The fused op reads offsets and logits there, and makes locations and softmax weights of them.
  MSDA_INLINE void load(const Params& p, std::int64_t first, std::int64_t count, std::int64_t at) {
    double* dx = p.fused ? offset_x : x;
    double* dy = p.fused ? offset_y : y;
    switch (p.problem->location_dtype) {  // outside the loops: each loop is a plain conversion
      case DType::f32: deinterleave(static_cast<const float*>(p.locations) + 2 * first, count, dx + at, dy + at); break;
      case DType::f64: deinterleave(static_cast<const double*>(p.locations) + 2 * first, count, dx + at, dy + at); break;
      case DType::bf16: deinterleave(static_cast<const bf16*>(p.locations) + 2 * first, count, dx + at, dy + at); break;
      case DType::f16: deinterleave(static_cast<const f16*>(p.locations) + 2 * first, count, dx + at, dy + at); break;
    }
    if (!p.fused) {
      load_doubles(p.weights, first, count, p.problem->weight_dtype, a + at);
      return;
    }
    // The softmax needs the whole row (all levels), even when only some levels' samples are read.
    const std::int64_t LP = p.K, row = first / LP;
    softmax = softmax_for(p, row, LP);
    prepare(p, row / p.M);
    for (std::int64_t s = 0; s < LP; s += kStep) store_compute(a + s, load_compute(softmax + s));
    // Whole vectors, whose lanes may span levels: each level's origin and factor are blended into
    // the lanes of its samples (built in registers: lanes stored one by one and read back as a
    // vector would stall on store forwarding). Lanes outside [at, at + count) belong to samples
    // this call does not use, or are padding (level -1: origin 0, factor 1, offset 0). The product
    // is rounded before the addition, as the reference's two operations round it: with a free
    // offset_scale a contracted multiply-add would move a location by an ulp and, at a pixel edge,
    // pick another pixel (the fuzzer's regression-v2-fused-offset-scale-fma-* inputs).
    using VD = Vec<double>;
    using VI = Vec<std::int64_t>;
    const std::int64_t R = p.reference_coords;
    const VD one = VD{} + 1.0;
    for (std::int64_t s = at - at % kStep; s < at + count; s += kStep) {
      VI level;
      __builtin_memcpy(&level, level_of + s, sizeof(level));
      VD origin_x{}, origin_y{}, factor_x = one, factor_y = one;
      // The levels of this vector's lanes: from lane 0's (s < K) to the last real sample's.
      const std::int64_t last = s + kStep - 1 < p.K ? s + kStep - 1 : p.K - 1;
      for (std::int64_t l = level_of[s]; l <= level_of[last]; ++l) {
        const VI on = level == l;
        origin_x = on ? VD{} + level_origin_x[l] : origin_x;
        origin_y = on ? VD{} + level_origin_y[l] : origin_y;
        if (R == 4) {
          factor_x = on ? VD{} + level_factor_x[l] : factor_x;
          factor_y = on ? VD{} + level_factor_y[l] : factor_y;
        }
      }
      const VD divisor_x = R == 2 ? load_compute(width + s) : load_compute(points + s);
      const VD divisor_y = R == 2 ? load_compute(height + s) : load_compute(points + s);
      store_compute(x + s, origin_x + rounded(load_compute(offset_x + s) / divisor_x * factor_x * half));
      store_compute(y + s, origin_y + rounded(load_compute(offset_y + s) / divisor_y * factor_y * half));
    }
  }

  // The softmax weights of `row`, from the rows computed ahead, computing the next kRows (every
  // row_stride-th from `row` on, within the tensor) when it is not among them.
  MSDA_INLINE const double* softmax_for(const Params& p, std::int64_t row, std::int64_t LP) {
    const std::int64_t k = (row - rows_first) / rows_stride;
    if (rows_first >= 0 && row >= rows_first && (row - rows_first) % rows_stride == 0 && k < rows_count)
      return rows + k * capacity;
    const std::int64_t last = p.N * p.Q * p.M - 1;
    rows_first = row;
    rows_stride = row_stride;
    rows_count = (last - row) / row_stride + 1 < kRows ? (last - row) / row_stride + 1 : kRows;
    for (std::int64_t i = 0; i < rows_count; ++i) softmax_row(p, row + i * row_stride, LP, rows + i * capacity);
    return rows;
  }

  // Per-sample constants of the problem: each sample's level, H, W and P_l, and (fused op, 2
  // coordinates) d location / d offset.
  MSDA_INLINE void set_levels(const Params& p) {
    discrete = p.discrete;
    for (std::int64_t l = 0; l < p.L; ++l)
      for (std::int64_t s = p.point_start[l]; s < p.point_start[l + 1]; ++s) {
        height[s] = p.height_f[l];
        width[s] = p.width_f[l];
        points[s] = static_cast<double>(p.points[l]);
        level_of[s] = l;
        offset_scale[2 * s] = static_cast<C>(1.0 / p.width_f[l]);
        offset_scale[2 * s + 1] = static_cast<C>(1.0 / p.height_f[l]);
      }
  }

  // The fused op's origin and factor of every level for query nq (= n * Q + q), read once for all
  // the heads of a query; with boxes, d location / d offset too.
  MSDA_INLINE void prepare(const Params& p, std::int64_t nq) {
    if (nq == prepared) return;
    prepared = nq;
    const std::int64_t R = p.reference_coords;
    half = R == 2 ? 1.0 : p.offset_scale;
    // Room for a whole vector of any target: R (2 or 4) values are written, but GCC's
    // array-bounds warning sees load_doubles' 8-lane path (AVX-512), which R never takes.
    double ref[kMaxLanes] = {0, 0, 1, 1};
    for (std::int64_t l = 0; l < p.L; ++l) {
      load_doubles(p.reference_points, (nq * p.L + l) * R, R, p.reference_dtype, ref);
      level_origin_x[l] = ref[0];
      level_origin_y[l] = ref[1];
      level_factor_x[l] = ref[2];
      level_factor_y[l] = ref[3];
      if (R == 4) {  // the reference backend's order: w * offset_scale / P_l
        const double P = static_cast<double>(p.points[l]);
        const C scale_x = static_cast<C>(ref[2] * half / P), scale_y = static_cast<C>(ref[3] * half / P);
        for (std::int64_t s = p.point_start[l]; s < p.point_start[l + 1]; ++s) {
          offset_scale[2 * s] = scale_x;
          offset_scale[2 * s + 1] = scale_y;
        }
      }
    }
  }

  template <class T>
  MSDA_INLINE static void deinterleave(const T* src, std::int64_t count, double* dx, double* dy) {
    for (std::int64_t i = 0; i < count; ++i) {
      dx[i] = Storage<T>::load(src[2 * i]);
      dy[i] = Storage<T>::load(src[2 * i + 1]);
    }
  }

  // Locates samples [begin, end); lanes past `end` up to the next vector boundary are computed
  // too (harmless: they hold earlier or padding samples).
  MSDA_INLINE void locate_range(std::int64_t begin, std::int64_t end) { locate_from(begin - begin % kStep, end); }

  // Samples [end, until) get no corner on the map (until - end < kMaxLanes): block_dot_gradients
  // reads whole blocks of samples from a level range's first, and the last block may end past
  // its last sample, beyond the lanes locate_range computed.
  MSDA_INLINE void no_corners(std::int64_t end, std::int64_t until) {
    for (std::int64_t s = end; s < until; ++s)
      for (int c = 0; c < 4; ++c) pixel[c * capacity + s] = -1;
  }

  // The geometry of kStep samples from s, as vectors.
  struct Lanes {
    Vec<std::int64_t> in;        // the sample is not zeroed by the range rule
    Vec<double> fh, fw;          // floor of the coordinates (0 for a zeroed sample)
    Vec<double> W;               // the level's width
    Vec<std::int64_t> on[4];     // corner on the map
    Vec<double> weight[4];       // bilinear weight of each corner, 0 off the map
    Vec<double> lh, lw;          // fractions, already rounded to C
  };

  MSDA_INLINE Lanes geometry(std::int64_t s) const {
    using VD = Vec<double>;
    typedef C VC __attribute__((vector_size(kStep * sizeof(C))));
    const VD zero{}, one = zero + 1.0;
    Lanes g;
    const VD H = load_compute(height + s);
    g.W = load_compute(width + s);
    if (__builtin_expect(discrete, 0)) return discrete_geometry(s, H);  // out of line: the bilinear loops stay as tight as before
    // The fused op's locations are full doubles, whose product with W is not exact: rounded
    // before the subtraction, as the reference does, or an FMA would pick other corners at pixel
    // boundaries.
    const VD u = rounded(load_compute(x + s) * g.W) - 0.5, v = rounded(load_compute(y + s) * H) - 0.5;
    g.in = (v > -1.0) & (u > -1.0) & (v < H) & (u < g.W);
    // Selects: a zeroed sample's NaN or huge coordinate never reaches an integer conversion.
    g.fh = g.in ? floor_lanes(v) : zero;
    g.fw = g.in ? floor_lanes(u) : zero;
    // The fractions are rounded to C once; the weights are formed from the rounded values.
    g.lh = __builtin_convertvector(__builtin_convertvector(g.in ? v - g.fh : zero, VC), VD);
    g.lw = __builtin_convertvector(__builtin_convertvector(g.in ? u - g.fw : zero, VC), VD);
    const VD hh = one - g.lh, hw = one - g.lw;
    const auto top = g.in & (g.fh >= 0.0), bottom = g.in & (g.fh + 1.0 < H), left = g.fw >= 0.0,
               right = g.fw + 1.0 < g.W;
    g.on[0] = top & left;
    g.on[1] = top & right;
    g.on[2] = bottom & left;
    g.on[3] = bottom & right;
    const VD weight[4] = {hh * hw, hh * g.lw, g.lh * hw, g.lh * g.lw};
    for (int c = 0; c < 4; ++c) g.weight[c] = g.on[c] ? weight[c] : zero;
    return g;
  }

  // Discrete sampling (SPEC): the one pixel (clamp(trunc(y*H + 0.5)), clamp(trunc(x*W + 0.5)))
  // as corner 0 with weight 1, the other corners off the map, fractions 0; a NaN coordinate zeroes
  // the sample. Clamped, trunc and floor agree (they differ below 0 only), and the clamp runs in
  // double, so an infinite coordinate never meets an integer conversion.
  [[gnu::noinline]] Lanes discrete_geometry(std::int64_t s, Vec<double> H) const {
    using VD = Vec<double>;
    const VD zero{}, one = zero + 1.0;
    Lanes g;
    g.W = load_compute(width + s);
    const VD x_ = load_compute(x + s), y_ = load_compute(y + s);
    g.in = (x_ == x_) & (y_ == y_);
    const VD u = floor_lanes(rounded(x_ * g.W) + 0.5), v = floor_lanes(rounded(y_ * H) + 0.5);
    const VD last_w = g.W - 1.0, last_h = H - 1.0;
    const VD col = u < zero ? zero : u > last_w ? last_w : u, row = v < zero ? zero : v > last_h ? last_h : v;
    g.fw = g.in ? col : zero;
    g.fh = g.in ? row : zero;
    g.lh = g.lw = zero;
    g.on[0] = g.in;
    g.on[1] = g.on[2] = g.on[3] = Vec<std::int64_t>{};
    g.weight[0] = g.in ? one : zero;
    g.weight[1] = g.weight[2] = g.weight[3] = zero;
    return g;
  }

  MSDA_INLINE static void put(C* dst, Vec<double> v) {
    typedef C VC __attribute__((vector_size(kStep * sizeof(C))));
    const VC narrow = __builtin_convertvector(v, VC);
    __builtin_memcpy(dst, &narrow, sizeof(narrow));
  }

  // Outputs for the backward: corner rows (counted from the part's first row, so that one base
  // and stride address any level's: the dot products and the scatter need no level lookup),
  // bilinear weights, fractions; the attention weight of a zeroed sample becomes 0.
  MSDA_INLINE void locate_from(std::int64_t first, std::int64_t count) {
    using VD = Vec<double>;
    using VI = Vec<std::int64_t>;
    const VD zero{};
    const VI off_map = VI{} - 1;
    for (std::int64_t s = first; s < count; s += kStep) {
      const Lanes g = geometry(s);
      // Exact: H*W < 2^51 for any real map; converted once (64-bit integer multiplies are slow).
      VI level;
      __builtin_memcpy(&level, level_offset + s, sizeof(level));
      const VI p00 = whole_lanes_to_int(g.fh * g.W + g.fw) + level, Wi = whole_lanes_to_int(g.W);
      const VI corner[4] = {p00, p00 + 1, p00 + Wi, p00 + Wi + 1};
      for (int c = 0; c < 4; ++c) {
        const VI px = g.on[c] ? corner[c] : off_map;
        __builtin_memcpy(pixel + c * capacity + s, &px, sizeof(px));
        put(bilinear + c * capacity + s, g.weight[c]);
      }
      put(lh + s, g.lh);
      put(lw + s, g.lw);
      store_compute(a + s, g.in ? load_compute(a + s) : zero);
    }
  }

  // Outputs for the forward: each corner's address (base + level_offset[s] + pixel * row_bytes,
  // or `zero_row` off the map) in pixel[c] and its weight, attention times bilinear (0 off the
  // map), in bilinear[c]. The sum over taps then needs no branch at all.
  MSDA_INLINE void locate_taps(std::int64_t count, std::int64_t base, std::int64_t row_bytes, std::int64_t zero_row) {
    using VD = Vec<double>;
    using VI = Vec<std::int64_t>;
    const VD zero{};
    const VI zero_rows = VI{} + zero_row;
    const double row_bytes_d = static_cast<double>(row_bytes);
    for (std::int64_t s = 0; s < count; s += kStep) {
      const Lanes g = geometry(s);
      VI level;
      __builtin_memcpy(&level, level_offset + s, sizeof(level));
      // Byte offsets in double: exact below 2^51, which any tensor in memory is.
      const VI p00 = whole_lanes_to_int((g.fh * g.W + g.fw) * row_bytes_d) + level + base;
      const VI down = whole_lanes_to_int(g.W * row_bytes_d);
      const VI corner[4] = {p00, p00 + row_bytes, p00 + down, p00 + down + row_bytes};
      const VD a_in = g.in ? load_compute(a + s) : zero;
      for (int c = 0; c < 4; ++c) {
        const VI address = g.on[c] ? corner[c] : zero_rows;
        __builtin_memcpy(pixel + c * capacity + s, &address, sizeof(address));
        put(bilinear + c * capacity + s, a_in * g.weight[c]);
      }
    }
  }
};

// A thread's kGroups geometry groups, where Scratch lays them out (after its channels row).
template <class C>
MSDA_INLINE std::array<Group<C>, kGroups> thread_groups(std::byte* mine, const Scratch& scratch) {
  auto group = [&](std::size_t i) {
    return Group<C>(mine + scratch.channels_bytes + i * scratch.group_bytes, scratch.group_capacity);
  };
  static_assert(kGroups == 3);
  return {group(0), group(1), group(2)};
}

// ---- staged gathers: one head's rows, contiguous ---------------------------------------------

// Copies value[n, first_row : first_row + rows, m, :] into `dst` ([rows, D]): a strided read of one
// row in M, fetched ahead, and a sequential write that stays in the thread's cache. With D known
// at compile time each row's copy is a few vector moves; a copy of runtime size was a call into
// the C library per row (a sixth of dino-dec's dot products, Intel Xeon).
template <int kD, class V>
MSDA_INLINE void copy_head_rows(const Params& p, const V* value, std::int64_t n, std::int64_t m, std::int64_t first_row,
                                std::int64_t rows, V* dst) {
  constexpr std::int64_t kAhead = 16;
  const std::int64_t D = kD > 0 ? kD : p.D, stride = p.M * D;
  const std::size_t row_bytes = static_cast<std::size_t>(D) * sizeof(V);
  const V* src = value + p.value_offset(n, first_row, m);
  for (std::int64_t r = 0; r < rows; ++r) {
    if (r + kAhead < rows) prefetch(src + (r + kAhead) * stride, row_bytes);
    __builtin_memcpy(static_cast<void*>(dst + r * D), src + r * stride, row_bytes);
  }
}

// ---- forward ---------------------------------------------------------------------------------

// Two walks. Direct: parallel over blocks of queries of one batch element, the gathers reading
// value where it is; inside a block the heads go one at a time (query_block > 1) or each query
// does all its heads (1, the default). Staged (CpuTuning::staging): parallel over (batch, head,
// query range); a thread copies the head's rows into its own contiguous buffer once and walks
// that head's queries, so the rows around them (1/M of the memory a band of value spans) stay in
// its L1/L2. For each (q, m) the geometry of its L*P samples is computed as one vectorized group,
// then the taps are summed in one tight loop of loads and FMAs over registers. Each output row is
// written by one thread, summing the same taps in a fixed order: results never depend on the
// walk or the thread count.
inline constexpr std::int64_t kPrefetchQueries = 8;

// How many Channels accumulators the forward's taps rotate over (corner c adds into c % count):
// 4 by default. A target with MSDA_ACCUMULATOR_REGS (the Arm ones) gives the accumulators at
// most that many vector registers: four of D = 32 f32 in 128-bit vectors would be 32 registers,
// NEON's whole file, and the compiler then spills them inside the tap loop. With 16-byte
// vectors a row is already 8 independent FMA chains, so fewer accumulators lose nothing.
template <class C, int kD>
constexpr int forward_accumulators() {
  if (kD == 0) return 1;
#if defined(MSDA_ACCUMULATOR_REGS)
  const int regs = kD / kLanes<C>, fit = MSDA_ACCUMULATOR_REGS / regs;
  return fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
#else
  return 4;
#endif
}

template <class V, int kD>
void forward_kernel(const Params& p, const Scratch& scratch) {
  using C = Compute<V>;
  const std::int64_t D = kD > 0 ? kD : p.D, LP = p.K, row_stride = p.M * D;
  const V* value = static_cast<const V*>(p.value);
  V* out = static_cast<V*>(p.output);
  const bool staged = scratch.head_rows_at > 0;
  const std::int64_t block = p.query_block, blocks_per_n = (p.Q + block - 1) / block;
  // Staged: query ranges per head, enough for about 4 jobs per thread (a thread copies a head
  // once for all its consecutive jobs of that head).
  const std::int64_t ranges = (4 * p.threads + p.N * p.M - 1) / (p.N * p.M);
  const std::int64_t range_size = (p.Q + ranges - 1) / ranges;
  const std::int64_t row_bytes = (staged ? D : row_stride) * static_cast<std::int64_t>(sizeof(V));

#pragma omp parallel num_threads(p.threads)
  {
    std::byte* mine = scratch.for_thread(omp_get_thread_num());
    std::array<Group<C>, kGroups> groups = thread_groups<C>(mine, scratch);
    // Rows take the groups in turn (walk_rows), so each group sees every kGroups-th row: the
    // distance between the (n, q, m) rows it reads in turn is kGroups times that of the walk
    // (heads of one query, or one head's queries).
    for (Group<C>& group : groups) group.row_stride = kGroups * (staged || block > 1 ? p.M : 1);
    // A row of zeros: where the taps of off-map corners point (with weight 0).
    V* zero_row = reinterpret_cast<V*>(mine + scratch.channels_bytes + kGroups * scratch.group_bytes + scratch.grads_bytes);
    __builtin_memset(static_cast<void*>(zero_row), 0, static_cast<std::size_t>(D) * sizeof(V));
    V* head_rows = staged ? reinterpret_cast<V*>(mine + scratch.head_rows_at) : nullptr;
    for (Group<C>& group : groups) {
      group.set_levels(p);
      for (std::int64_t s = 0; s < LP; ++s) group.level_offset[s] = p.level_start[group.level_of[s]] * row_bytes;
    }
    const std::int64_t cap = scratch.group_capacity;
    // The taps of row (n, q, m), read from `rows` (value + value_offset(n, 0, m), or the head's
    // copy): an address and a weight per corner (zero_row and 0 off the map).
    struct Row {
      std::int64_t n = 0, q = 0, m = 0;
      const V* rows = nullptr;
    };
    auto load_row = [&](Group<C>& group, const Row& r) MSDA_INLINE_LAMBDA {
      group.load(p, p.sample_index(r.n, r.q, r.m, 0, 0), LP, 0);
    };
    auto locate_row = [&](Group<C>& group, const Row& r) MSDA_INLINE_LAMBDA {
      group.locate_taps(LP, reinterpret_cast<std::int64_t>(r.rows), row_bytes, reinterpret_cast<std::int64_t>(zero_row));
    };
    // out[n, q, m] = the sum of the taps located in `group`, branch-free.
    // Inlined, with the accumulators its own locals: they then live in registers through the
    // tap loop (captured from outside, they were stored back to memory after every tap).
    auto sum_taps = [&](const Group<C>& group, std::int64_t n, std::int64_t q, std::int64_t m) MSDA_INLINE_LAMBDA {
      // One accumulator per corner when D is compile-time: four independent FMA chains instead of
      // one 4*L*P long (which made the sum latency-bound); two or one where the registers are
      // short (forward_accumulators). Runtime D sums into acc[0] only, kept in `mine`.
      constexpr int kAccs = forward_accumulators<C, kD>();
      Channels<V, kD> acc[4] = {{D, reinterpret_cast<C*>(mine)}, {D, reinterpret_cast<C*>(mine)},
                                {D, reinterpret_cast<C*>(mine)}, {D, reinterpret_cast<C*>(mine)}};
      for (int k = 0; k < kAccs; ++k) acc[k].zero();
      for (std::int64_t s = 0; s < LP; ++s)
        for (int c = 0; c < 4; ++c)
          acc[c % kAccs].add_scaled(reinterpret_cast<const V*>(group.pixel[c * cap + s]), group.bilinear[c * cap + s]);
      if constexpr (kAccs == 4) {
        acc[0].add(acc[1]);
        acc[2].add(acc[3]);
        acc[0].add(acc[2]);
      } else if constexpr (kAccs == 2) {
        acc[0].add(acc[1]);
      }
      acc[0].store_row(out + p.output_offset(n, q, m));
    };
    // Sums rows at(0), ..., at(count - 1) (at(i) gives n, q, m and the rows to read), loading
    // each two rows ahead and locating it one row ahead (kGroups): a row's geometry is a chain of
    // dependent steps (convert, floor, address) that then runs while the CPU waits on the
    // previous row's loads, not before the first of its own, and reads what the load stored an
    // iteration before.
    auto walk_rows = [&](std::int64_t count, auto&& at) MSDA_INLINE_LAMBDA {
      Row rows[kGroups];
      for (std::int64_t i = 0; i < count && i < 2; ++i) {
        at(i, rows[i].n, rows[i].q, rows[i].m, rows[i].rows);
        load_row(groups[i], rows[i]);
      }
      if (count > 0) locate_row(groups[0], rows[0]);
      for (std::int64_t i = 0, slot = 0; i < count; ++i, slot = slot + 1 < kGroups ? slot + 1 : 0) {
        if (i + 2 < count) {
          Row& r = rows[(slot + 2) % kGroups];
          at(i + 2, r.n, r.q, r.m, r.rows);
          load_row(groups[(slot + 2) % kGroups], r);
        }
        if (i + 1 < count) locate_row(groups[(slot + 1) % kGroups], rows[(slot + 1) % kGroups]);
        sum_taps(groups[slot], rows[slot].n, rows[slot].q, rows[slot].m);
      }
    };
    if (staged) {
      const std::int64_t* const walk = scratch.query_order;
      std::int64_t held = -1;  // the (n, m) whose rows head_rows holds
      share_jobs(p.N * p.M * ranges, ranges == 1, [&](std::int64_t job) MSDA_INLINE_LAMBDA {
        const std::int64_t nm = job / ranges, n = nm / p.M, m = nm % p.M, q_begin = job % ranges * range_size;
        const std::int64_t q_end = q_begin + range_size < p.Q ? q_begin + range_size : p.Q;
        if (q_begin >= q_end) return;
        if (held != nm) {
          copy_head_rows<kD>(p, value, n, m, 0, p.S, head_rows);
          held = nm;
        }
        walk_rows(q_end - q_begin, [&](std::int64_t i, std::int64_t& row_n, std::int64_t& q, std::int64_t& row_m,
                                       const V*& rows) MSDA_INLINE_LAMBDA {
          // In the order of scratch.query_order (an encoder's stripes), as the backward walks.
          q = query_at(walk, q_begin + i);
          row_n = n, row_m = m, rows = head_rows;
          // One head's queries: their samples sit M*L*P apart, so fetch ahead, and their output
          // rows M*D apart, a stride the hardware's prefetchers do not follow across pages: ask
          // for those lines, for writing, as far ahead.
          if (q_begin + i + kPrefetchQueries < q_end) {
            const std::int64_t ahead = query_at(walk, q_begin + i + kPrefetchQueries);
            prefetch_samples(p, p.sample_index(n, ahead, m, 0, 0), LP);
            prefetch_for_write(out + p.output_offset(n, ahead, m), static_cast<std::size_t>(D) * sizeof(V));
          }
        });
      });
    } else {
#pragma omp for schedule(static)
      for (std::int64_t job = 0; job < p.N * blocks_per_n; ++job) {
        const std::int64_t n = job / blocks_per_n, q_begin = job % blocks_per_n * block;
        const std::int64_t q_end = q_begin + block < p.Q ? q_begin + block : p.Q, queries = q_end - q_begin;
        walk_rows(p.M * queries, [&](std::int64_t i, std::int64_t& row_n, std::int64_t& q, std::int64_t& m,
                                     const V*& rows) MSDA_INLINE_LAMBDA {
          // Heads one at a time over the block's queries (query_block = 1: each query's heads).
          m = i / queries, q = q_begin + i % queries;
          row_n = n, rows = value + p.value_offset(n, 0, m);
          // Walking heads one at a time, a query's samples sit M*L*P apart: fetch ahead (with
          // all heads of a query at once, reads are sequential and the hardware prefetches).
          if (block > 1 && q + kPrefetchQueries < q_end)
            prefetch_samples(p, p.sample_index(n, q + kPrefetchQueries, m, 0, 0), LP);
        });
      }
    }
  }
}

// ---- backward --------------------------------------------------------------------------------

// Calls f(pointer) with `base` as a pointer to the storage type of `dtype`: the dtype switch sits
// outside the loops f runs, which then convert and store each value directly.
template <class F>
MSDA_INLINE void with_storage(DType dtype, void* base, F&& f) {
  switch (dtype) {
    case DType::f32: return f(static_cast<float*>(base));
    case DType::f64: return f(static_cast<double*>(base));
    case DType::bf16: return f(static_cast<bf16*>(base));
    case DType::f16: return f(static_cast<f16*>(base));
  }
}

template <class T>
MSDA_INLINE T stored(double x) {
  return Storage<T>::store(static_cast<Compute<T>>(x));
}

// The fused backward's chain rule for one row (n, q, m), right after its samples: grads holds
// g_a[LP] (d out / d weight) and, from grads_stride(LP) on, g_loc[2 LP] (d out / d location,
// interleaved x, y); group holds the row's softmax weights and offsets, and the scales
// d location / d offset. Writes the row's logit and offset gradients and, when `partial` is not
// null, the sums over the row's points of each level's reference-point gradient (partial[l * R + c]). A sample whose g_loc is zero (one
// zeroed by the range rule) adds nothing: its offset or box size may be infinite, and 0 * inf
// would be NaN. The per-element loops are plain vectorizable loops: scalar code here (a
// conversion and a store per element) cost more than the rest of the chain together.
template <class C>
MSDA_INLINE void fused_chain(const Params& p, const Group<C>& group, const C* grads, std::int64_t first,
                             double* partial) {
  constexpr std::int64_t kStep = kLanes<double>;
  using VD = Vec<double>;
  const std::int64_t L = p.L, LP = p.K, R = p.reference_coords;
  const C* g_a = grads;
  const C* g_loc = grads + grads_stride(LP);
  if (p.grad_logits) {  // softmax backward: a_j (g_j - sum_i a_i g_i)
    VD lanes{};
    std::int64_t j = 0;
    for (; j + kStep <= LP; j += kStep) {
      VD g;
      for (int k = 0; k < kStep; ++k) g[k] = static_cast<double>(g_a[j + k]);
      lanes += load_compute(group.softmax + j) * g;
    }
    double dot = reduce_add<double>(lanes);
    for (; j < LP; ++j) dot += group.softmax[j] * static_cast<double>(g_a[j]);
    with_storage(p.problem->weight_dtype, p.grad_logits, [&]<class T>(T* dst) {
      dst += first;
      for (std::int64_t k = 0; k < LP; ++k) dst[k] = stored<T>(group.softmax[k] * (static_cast<double>(g_a[k]) - dot));
    });
  }
  if (p.grad_offsets) {
    const C* scale = group.offset_scale;
    with_storage(p.problem->location_dtype, p.grad_offsets, [&]<class T>(T* dst) {
      dst += 2 * first;
      for (std::int64_t k = 0; k < 2 * LP; ++k)
        dst[k] = Storage<T>::store(static_cast<Compute<T>>(g_loc[k] == 0 ? C(0) : g_loc[k] * scale[k]));
    });
  }
  if (!partial) return;
  for (std::int64_t l = 0; l < L; ++l) {
    const std::int64_t P = p.points[l];
    const C* g = g_loc + 2 * p.point_start[l];
    double sum[4] = {0, 0, 0, 0};
    for (std::int64_t k = 0; k < 2 * P; k += 2) {
      sum[0] += g[k];
      sum[1] += g[k + 1];
    }
    if (R == 4)  // d location / d box size = offset / P_l * offset_scale
      for (std::int64_t pt = 0, s = p.point_start[l]; pt < P; ++pt, ++s) {
        if (g[2 * pt] != 0) sum[2] += g[2 * pt] * (group.offset_x[s] / group.points[s] * group.half);
        if (g[2 * pt + 1] != 0) sum[3] += g[2 * pt + 1] * (group.offset_y[s] / group.points[s] * group.half);
      }
    for (std::int64_t c = 0; c < R; ++c) partial[l * R + c] = sum[c];
  }
}

// The dot products of kLanes samples, as block_dot_gradients sums them: dots[j] holds block j's
// (samples j * B to j * B + B - 1) four corners, corner c of sample j * B + b in lane c * B + b.
// Transposed to d[c]: corner c of all kLanes samples, sample j * B + b in lane j * B + b. A 4 x 4
// transpose of B-lane elements in two rounds of two-vector shuffles, 8 in all.
template <int B, int L>
constexpr int pair_source(int i, int first_corner) {  // [x.c, y.c, x.c+1, y.c+1], c = first_corner
  const int e = i / B, b = i % B;
  return (e % 2) * L + (first_corner + e / 2) * B + b;
}
template <int B, int L>
constexpr int quad_source(int i, int element) {  // [x.e, x.e+1, y.e, y.e+1] of element pairs
  const int j = i / B, b = i % B;
  return (j / 2) * L + (element + j % 2) * B + b;
}
template <int B, class C, int... I>
MSDA_INLINE void transpose_dots(const Vec<C>* dots, Vec<C>* d, std::integer_sequence<int, I...>) {
  constexpr int L = kLanes<C>;
  const Vec<C> p = __builtin_shufflevector(dots[0], dots[1], pair_source<B, L>(I, 0)...);
  const Vec<C> q = __builtin_shufflevector(dots[0], dots[1], pair_source<B, L>(I, 2)...);
  const Vec<C> r = __builtin_shufflevector(dots[2], dots[3], pair_source<B, L>(I, 0)...);
  const Vec<C> t = __builtin_shufflevector(dots[2], dots[3], pair_source<B, L>(I, 2)...);
  d[0] = __builtin_shufflevector(p, r, quad_source<B, L>(I, 0)...);
  d[1] = __builtin_shufflevector(p, r, quad_source<B, L>(I, 2)...);
  d[2] = __builtin_shufflevector(q, t, quad_source<B, L>(I, 0)...);
  d[3] = __builtin_shufflevector(q, t, quad_source<B, L>(I, 2)...);
}

// lo, then hi: one vector of twice their lanes.
template <class P, int... I>
MSDA_INLINE auto concatenate(P lo, P hi, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(lo, hi, I...);
}

// x and y interleaved, x0, y0, x1, y1, ..., as two vectors of their lanes: the first (kHigh 0) or
// the second half (kHigh 1).
template <int kHigh, class C, int... I>
MSDA_INLINE Vec<C> interleave(Vec<C> x, Vec<C> y, std::integer_sequence<int, I...>) {
  constexpr int L = kLanes<C>;
  return __builtin_shufflevector(x, y, ((I % 2) * L + (kHigh * L + I) / 2)...);
}

// The backward's dot products for samples [s_begin, s_end) of one query (kD known, kBlock =
// kLanes / 4 >= 2 samples per vector): each block of samples' 4 * kBlock lane-wise products
// (corner c of sample b in vector c * kBlock + b) are summed across lanes together (reduce_lanes:
// kLanes - 1 pair sums for the block). Summing each sample's three lane-wise combinations on its
// own took 4 folds and ~20 vector operations per sample, which made the backward's dot products
// compute-bound. Four blocks' sums (kLanes samples) are then transposed to one vector per corner,
// and the weight and location gradients formed from them kLanes samples at a time: formed a block
// at a time, in vectors of kBlock lanes, with a scalar tail for the last samples, they were about
// 40 of the encoders' 290 backward instructions per sample (AMD Zen 3, AVX2, callgrind). Writes
// grads as backward_kernel reads it, in whole vectors: [count) weight gradients, then from
// grads_at on (grads_stride) [2 count) location gradients, x and y interleaved; lanes past s_end
// land in grads' padding. part_value: the part's first row, rows value_stride apart.
// kZeroRow: part_value is the staged copy (value_stride D), whose row -1 is zeros, and g's row is
// one whose dot product with zeros is +0 (zero_dot_is_plus_zero): an off-map corner (row -1)
// then reads the zero row, the same +0 as the select gives, with neither the select nor its
// branch, which mispredicts at the map's edges (a fifth of the dot products' instructions, AMD
// Zen 3, AVX2, callgrind).
template <int kBlock, bool kZeroRow, class V, int kD, class C>
MSDA_INLINE void block_dot_gradients(const Channels<V, kD>& g, const Group<C>& group, const V* part_value,
                                     std::int64_t value_stride, std::int64_t s_begin, std::int64_t s_end, C* grads,
                                     std::int64_t grads_at) {
  constexpr int kL = kLanes<C>;
  static_assert(kL == 4 * kBlock && kMaxLanes % kL == 0, "grads_stride and group capacities pad to whole vectors");
  const std::int64_t cap = group.capacity;
  // Whole vectors (kL lanes) are read from the group's arrays at s0 < s_end: each array has
  // kMaxLanes samples of room past K (cpu.cpp); lanes past s_end are computed from whatever they
  // hold, and stored only into grads' padding. Blocks wholly past s_end are skipped; the lanes
  // past s_end of the last one read no row (the caller set them off the map: Group::no_corners).
  // lanes_of_doubles: kL doubles from src in C,
  // converted a native vector at a time (a vector of kL doubles, wider than the target's, went
  // through the stack).
  auto lanes_of_doubles = [](const double* src) MSDA_INLINE_LAMBDA {
    if constexpr (std::is_same_v<C, double>) {
      return load_compute(src);
    } else {
      static_assert(kL == 2 * kLanes<double>);
      typedef C Half __attribute__((vector_size(kL / 2 * sizeof(C))));
      const Half lo = __builtin_convertvector(load_compute(src), Half);
      const Half hi = __builtin_convertvector(load_compute(src + kL / 2), Half);
      return concatenate(lo, hi, std::make_integer_sequence<int, kL>{});
    }
  };
  for (std::int64_t s0 = s_begin; s0 < s_end; s0 += kL) {
    Vec<C> dots[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (s0 + j * kBlock >= s_end) {  // a block wholly past the samples (K = 12 with kL = 8)
        dots[j] = Vec<C>{};
        continue;
      }
      Vec<C> t[4 * kBlock];  // unrolled, so that it lives in registers
#pragma GCC unroll 16
      for (int b = 0; b < kBlock; ++b) {
        const std::int64_t s = s0 + j * kBlock + b;
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const std::int64_t row = group.pixel[c * cap + s];
          if constexpr (kZeroRow)
            t[c * kBlock + b] = g.products(part_value + row * (kD > 0 ? kD : value_stride));
          else
            t[c * kBlock + b] = row >= 0 ? g.products(part_value + row * value_stride) : Vec<C>{};
        }
      }
      dots[j] = reduce_lanes<C>(t);
    }
    Vec<C> d[4];
    transpose_dots<kBlock, C>(dots, d, std::make_integer_sequence<int, kL>{});
    const Vec<C> lh = load_compute(group.lh + s0), lw = load_compute(group.lw + s0), hh = 1 - lh, hw = 1 - lw;
    // d_weight = sum_c w_c dot(g, v_c); d_u = dot(g, hh (v01 - v00) + lh (v11 - v10));
    // d_v = dot(g, hw (v10 - v00) + lw (v11 - v01)); an off-map corner's value is zero.
    const Vec<C> d_weight_sum = load_compute(group.bilinear + s0) * d[0] + load_compute(group.bilinear + cap + s0) * d[1] +
                                load_compute(group.bilinear + 2 * cap + s0) * d[2] +
                                load_compute(group.bilinear + 3 * cap + s0) * d[3];
    const Vec<C> d_u = hh * (d[1] - d[0]) + lh * (d[3] - d[2]), d_v = hw * (d[2] - d[0]) + lw * (d[3] - d[1]);
    const Vec<C> a = lanes_of_doubles(group.a + s0);
    // NaN gradients canonical: the backward's loop is compiled more than once (canonical_nan).
    const Vec<C> d_weight = canonical_nan<C>(d_weight_sum);
    const Vec<C> g_x = canonical_nan<C>(a * lanes_of_doubles(group.width + s0) * d_u),
                 g_y = canonical_nan<C>(a * lanes_of_doubles(group.height + s0) * d_v);
    const std::int64_t k = s0 - s_begin;  // a multiple of kL, as grads_at is; k < count <= grads_at
    constexpr auto lanes = std::make_integer_sequence<int, kL>{};
    const Vec<C> xy_low = interleave<0, C>(g_x, g_y, lanes), xy_high = interleave<1, C>(g_x, g_y, lanes);
    __builtin_memcpy(grads + k, &d_weight, sizeof(d_weight));
    __builtin_memcpy(grads + grads_at + 2 * k, &xy_low, sizeof(xy_low));
    __builtin_memcpy(grads + grads_at + 2 * k + kL, &xy_high, sizeof(xy_high));
  }
}

// Whether g's dot product with the row of zeros at `zeros` is +0, as a skipped corner's is: not
// when g has an infinity or a NaN (0 * inf is NaN), nor when every element of g is negative or -0
// (a sum of -0s is -0). Summed in another order than reduce_lanes sums, but a sum of zeros and
// NaNs is NaN, -0 or +0 in any order.
template <class V, int kD>
MSDA_INLINE bool zero_dot_is_plus_zero(const Channels<V, kD>& g, const V* zeros) {
  using C = Compute<V>;
  const C dot = reduce_add<C>(g.products(zeros));
  C plus_zero = 0;
  return __builtin_memcmp(&dot, &plus_zero, sizeof(C)) == 0;
}

// grad_value's scatter for samples [s0, s1) of one query on one level: row r of the level's
// accumulator (Group::pixel, counted from the part's first row) at acc + r * stride gets
// a * w_c * grad_output for each corner, in sample and corner order. Branch-free: an off-map
// corner (row -1) adds into `spare`, a row nobody reads. With a test and a jump per corner, and
// the add itself placed out of line, the scatter was about 100 instructions per sample (Intel
// Xeon, AVX-512, D = 32), several times the loads, multiply-adds and stores it has to do.
// kCopy: acc is the part's copy (own_rows), rows D apart, whose row -1 is the spare row (`spare`
// is not read), so an off-map corner needs no select either: GCC made the select a test and a
// branch, and with the stride's multiply it was a quarter of the scatter's instructions (AMD Zen
// 3, AVX2, callgrind).
template <bool kCopy, class V, int kD, class C>
MSDA_INLINE void scatter_samples(const Channels<V, kD>& g, const Group<C>& group, std::int64_t s0, std::int64_t s1,
                                 C* acc, std::int64_t stride, C* spare) {
  const std::int64_t cap = group.capacity;
  for (std::int64_t s = s0; s < s1; ++s) {
    const C a = static_cast<C>(group.a[s]);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const std::int64_t row = group.pixel[c * cap + s];
      C* dst;
      if constexpr (kCopy)
        dst = acc + row * (kD > 0 ? kD : stride);
      else
        dst = row >= 0 ? acc + row * stride : spare;
      g.add_scaled_into(dst, a * group.bilinear[c * cap + s]);
    }
  }
}

// One corner of an owner-computes level: the part's row it adds to, its query (counted from the
// part's first) and its weight a * w_c.
template <class C>
struct CornerRecord {
  std::int32_t row, query;
  C weight;
};
static_assert(sizeof(CornerRecord<double>) <= kCornerRecordBytes);

// The owner-computes sums of one part: `count` records, made in sample order, bucketed by row by a
// stable counting sort (so each row's terms stay in sample order: the bits of the copy and in
// place), then row r of [r0, r1) summed in registers from its bucket, from zero, and stored once
// at dst + r * row_stride; a row without records is stored as zeros. grads: the part's
// grad_output rows in the compute type, D apart. ends: rows + 1 entries.
template <class C>
MSDA_INLINE void bucket_corners(const CornerRecord<C>* records, std::int64_t count, std::int64_t rows,
                                CornerRecord<C>* bucketed, std::int32_t* ends) {
  __builtin_memset(static_cast<void*>(ends), 0, static_cast<std::size_t>(rows + 1) * sizeof(std::int32_t));
  for (std::int64_t i = 0; i < count; ++i) ++ends[records[i].row + 1];
  for (std::int64_t r = 0; r < rows; ++r) ends[r + 1] += ends[r];
  for (std::int64_t i = 0; i < count; ++i) bucketed[ends[records[i].row]++] = records[i];  // ends[r]: row r's end
}

template <class V, int kD, class C>
MSDA_INLINE void owner_rows_sum(std::int64_t D, const C* grads, const CornerRecord<C>* bucketed, const std::int32_t* ends,
                                std::int64_t r0, std::int64_t r1, V* dst, std::int64_t row_stride) {
  constexpr int kL = kLanes<C>;
  for (std::int64_t r = r0, from = r > 0 ? ends[r - 1] : 0; r < r1; from = ends[r++]) {
    const std::int64_t to = ends[r];
    V* const row = dst + r * row_stride;
    if constexpr (kD > 0) {
      constexpr int kRegs = kD / kL;
      Vec<C> acc[kRegs] = {};
      for (std::int64_t i = from; i < to; ++i) {
        const Vec<C> wv = broadcast(bucketed[i].weight);
        const C* g = grads + bucketed[i].query * kD;
        for (int k = 0; k < kRegs; ++k) acc[k] = acc[k] + wv * load_compute(g + k * kL);
      }
      for (int k = 0; k < kRegs; ++k) store(row + k * kL, acc[k]);
    } else {
      std::int64_t d = 0;
      for (; d + kL <= D; d += kL) {
        Vec<C> acc{};
        for (std::int64_t i = from; i < to; ++i)
          acc = acc + broadcast(bucketed[i].weight) * load_compute(grads + bucketed[i].query * D + d);
        store(row + d, acc);
      }
      for (; d < D; ++d) {
        C acc = 0;
        for (std::int64_t i = from; i < to; ++i) acc = acc + bucketed[i].weight * grads[bucketed[i].query * D + d];
        row[d] = Storage<V>::store(acc);
      }
    }
  }
}

// Parallel over parts: a part is one (batch, head) and a range of levels (all of them when there
// are at least as many (n, m) pairs as threads, one level each otherwise; see cpu.cpp for more
// threads than parts). A part owns the
// grad_value rows of its head and levels and the location/weight gradients of its samples: no
// two threads touch the same element. Every grad_value row is summed over its samples in the
// order of the query walk (scratch.query_order: an encoder's stripes, else q), then p, whatever
// the partition or thread count, so results are bitwise identical across both. A part walks its
// queries one at a time: each query's L*P locations and weights, its grad_output row and its
// gradients are contiguous runs, read and written once.
template <class V, int kD>
void backward_kernel(const Params& p, const Scratch& scratch) {
  using C = Compute<V>;
  const std::int64_t D = kD > 0 ? kD : p.D, row_stride = p.M * D;
  const std::int64_t levels_per_part = scratch.levels_per_part, level_parts = p.L / levels_per_part;
  const std::int64_t query_parts = scratch.query_parts, bands = scratch.bands;
  const std::int64_t parts_per_nm = level_parts * query_parts * bands;
  const V* value = static_cast<const V*>(p.value);
  const V* grad_out = static_cast<const V*>(p.grad_output);
  V* grad_value = static_cast<V*>(p.grad_value);
  const bool want_dots = p.wants_sample_gradients();
  // Level l's rows are summed in grad_value itself (f32, f64, where the plan says so: cpu.cpp),
  // in own_rows, a contiguous copy of the part's rows, or by owner-computes (bucket_corners).
  auto row_sum = [&](std::int64_t l) MSDA_INLINE_LAMBDA {
    return scratch.row_sums ? scratch.row_sums[l] : RowSum::copy;
  };
  auto in_place = [&](std::int64_t l) MSDA_INLINE_LAMBDA {
    return std::is_same_v<V, C> && row_sum(l) == RowSum::in_place;
  };

#pragma omp parallel num_threads(p.threads)
  {
    std::byte* mine = scratch.for_thread(omp_get_thread_num());
    Channels<V, kD> g(D, reinterpret_cast<C*>(mine));
    std::array<Group<C>, kGroups> groups = thread_groups<C>(mine, scratch);
    const std::size_t groups_end = scratch.channels_bytes + kGroups * scratch.group_bytes;
    C* grads = reinterpret_cast<C*>(mine + groups_end);  // [3][grads_stride(K)]
    const std::int64_t grads_at = grads_stride(p.K);     // where the location gradients start
    C* own_rows = reinterpret_cast<C*>(mine + groups_end + scratch.grads_bytes);
    // Where off-map corners' scatter adds (scatter_samples): row -1 of own_rows, at the end of the
    // grads reserve (cpu.cpp). Zeroed: never read, but left as the allocation found it, it could
    // hold subnormals, whose arithmetic is slow on some CPUs.
    C* const spare_row = own_rows - D;
    __builtin_memset(static_cast<void*>(spare_row), 0, static_cast<std::size_t>(D) * sizeof(C));
    // Staged (cpu.cpp: only with the dot products): the part's value rows, copied contiguous.
    V* head_rows = scratch.head_rows_at > 0 ? reinterpret_cast<V*>(mine + scratch.head_rows_at) : nullptr;
    std::int64_t held = -1;  // the (n, m, first level) whose rows head_rows holds
    // The copy's row -1 is zeros (cpu.cpp reserves it): the dot products' off-map corners read it.
    if (head_rows) __builtin_memset(static_cast<void*>(head_rows - D), 0, static_cast<std::size_t>(D) * sizeof(V));
    // Owner-computes: the part's grad_output rows, its corner records and their buckets.
    C* owner_grads = nullptr;
    CornerRecord<C>* records = nullptr;
    CornerRecord<C>* bucketed = nullptr;
    std::int32_t* ends = nullptr;
    if (scratch.owner_at > 0) {
      const OwnerLayout o = owner_layout(p.Q, D, sizeof(C), scratch.owner_records, scratch.owner_rows);
      std::byte* const area = mine + scratch.owner_at;
      owner_grads = reinterpret_cast<C*>(area);
      records = reinterpret_cast<CornerRecord<C>*>(area + o.records);
      bucketed = reinterpret_cast<CornerRecord<C>*>(area + o.bucketed);
      ends = reinterpret_cast<std::int32_t*>(area + o.ends);
    }
    for (Group<C>& group : groups) {
      group.row_stride = kGroups * p.M;  // every kGroups-th query of one head
      group.set_levels(p);
    }
    if (grad_value && scratch.row_sums && std::is_same_v<V, C>) {
      // The in-place levels' rows of grad_value (for each batch element and level, one contiguous
      // range of all heads' rows), zeroed in runs before any part adds into them: the loop's
      // barrier orders the two.
      constexpr std::int64_t kRun = std::int64_t(1) << 14;  // elements per run: 64 KiB of f32
      const std::int64_t batch_size = p.S * row_stride, total = p.N * batch_size;
#pragma omp for schedule(static)
      for (std::int64_t run = 0; run < (total + kRun - 1) / kRun; ++run) {
        const std::int64_t begin = run * kRun, end = total - begin < kRun ? total : begin + kRun;
        for (std::int64_t n = begin / batch_size; n * batch_size < end; ++n)
          for (std::int64_t l = 0; l < p.L; ++l) {
            if (!in_place(l)) continue;
            const std::int64_t level_begin = n * batch_size + p.level_start[l] * row_stride;
            const std::int64_t from = level_begin > begin ? level_begin : begin;
            const std::int64_t level_end = level_begin + p.height[l] * p.width[l] * row_stride, to = level_end < end ? level_end : end;
            if (from < to) __builtin_memset(static_cast<void*>(grad_value + from), 0, static_cast<std::size_t>(to - from) * sizeof(V));
          }
      }
    }
    // Parts of one (batch, head) split into query ranges share its staged copy: runs of them then.
    share_jobs(p.N * p.M * parts_per_nm, query_parts == 1, [&](std::int64_t part) MSDA_INLINE_LAMBDA {
      const std::int64_t n = part / (p.M * parts_per_nm), m = part / parts_per_nm % p.M, unit = part % parts_per_nm;
      const std::int64_t band = unit % bands, q_part = unit / bands % query_parts;
      const std::int64_t l_begin = unit / bands / query_parts * levels_per_part, l_end = l_begin + levels_per_part;
      // Query ranges split a part only when grad_value is not computed, and bands only when the
      // location and weight gradients are not (cpu.cpp): a query range owns its samples'
      // gradients but could not own grad_value rows; a band owns rows but not whole samples.
      const std::int64_t q_size = (p.Q + query_parts - 1) / query_parts;
      const std::int64_t q_begin = q_part * q_size, q_end = q_begin + q_size < p.Q ? q_begin + q_size : p.Q;
      // The part's rows, counted from its first level's first row: [row_begin, row_end).
      const std::int64_t part_rows = (l_end < p.L ? p.level_start[l_end] : p.S) - p.level_start[l_begin];
      const std::int64_t row_begin = scratch.band_rows > 0 ? band * scratch.band_rows : 0;
      const std::int64_t row_end = scratch.band_rows > 0 && row_begin + scratch.band_rows < part_rows
                                       ? row_begin + scratch.band_rows
                                       : part_rows;
      const std::int64_t first_row = p.level_start[l_begin] + row_begin;
      const std::int64_t rows = row_end > row_begin ? row_end - row_begin : 0;
      const bool whole_part = scratch.band_rows == 0;  // every row a sample can touch is the part's
      const std::int64_t s_begin = p.point_start[l_begin], s_end = p.point_start[l_end];
      // Row r of the part (grad_value[n, first_row + r, m, :]) is summed in the compute type at
      // level_acc(l) + r * acc_stride(l): in grad_value itself, zeroed above, or in a contiguous
      // copy of the part's rows, zeroed here and stored once at the end (bf16 and f16 are then
      // rounded once: SPEC "Precision"). Only the levels summed in the copy use it.
      auto acc_stride = [&](std::int64_t l) MSDA_INLINE_LAMBDA { return in_place(l) ? row_stride : D; };
      C* const in_place_rows = grad_value ? reinterpret_cast<C*>(grad_value) + p.value_offset(n, first_row, m) : nullptr;
      auto level_acc = [&](std::int64_t l) MSDA_INLINE_LAMBDA -> C* {
        if (!grad_value || row_sum(l) == RowSum::owner) return nullptr;
        return in_place(l) ? in_place_rows : own_rows;
      };
      bool owner_part = false;  // whether any of the part's levels is summed by owner-computes
      if (grad_value && records)
        for (std::int64_t l = l_begin; l < l_end; ++l) owner_part |= row_sum(l) == RowSum::owner;
      // Decided once per part, not per query and level (the per-level set-up and the prefetch
      // loop's level walk were ~10 instructions per sample on the encoders, AMD Zen 3): whether
      // any level's accumulator rows are far (summed in grad_value itself), and whether every
      // level adds into the same rows with the branch-free scatter and nothing per sample, so one
      // scatter covers all the query's samples (pixel rows are counted from the part's first row,
      // the same base for every level).
      bool far_acc_part = false, one_scatter = grad_value && whole_part && !owner_part && level_acc(l_begin);
      for (std::int64_t l = l_begin; l < l_end; ++l) {
        far_acc_part |= grad_value && in_place(l);
        one_scatter &= level_acc(l) == level_acc(l_begin) && acc_stride(l) == acc_stride(l_begin);
      }
      C* const part_acc = level_acc(l_begin);
      const std::int64_t part_stride = acc_stride(l_begin);
      std::int64_t recorded = 0;
      // The part's rows of level l, [first, last) counted from first_row, for l in [l_begin, l_end).
      auto level_rows = [&](std::int64_t l, std::int64_t& first, std::int64_t& last) MSDA_INLINE_LAMBDA {
        first = p.level_start[l] - first_row;
        last = first + p.height[l] * p.width[l];
        first = first > 0 ? first : 0;
        last = last < rows ? last : rows;
      };
      if (grad_value)
        for (std::int64_t l = l_begin; l < l_end; ++l) {
          std::int64_t r0, r1;
          level_rows(l, r0, r1);
          if (row_sum(l) == RowSum::copy && r0 < r1)
            __builtin_memset(static_cast<void*>(own_rows + r0 * D), 0, static_cast<std::size_t>((r1 - r0) * D) * sizeof(C));
        }

      // The dot products read the part's rows from part_value, value_stride elements apart: row r
      // (Group::pixel, counted from the first row of level l_begin) at part_value + r * value_stride.
      const std::int64_t value_stride = head_rows ? D : row_stride;
      const bool far_value = want_dots && !head_rows;  // value read where it is: worth a prefetch
      // The part's rows: those of (n, m) and its levels, the same for all its bands and query ranges.
      const std::int64_t rows_key = part / bands / query_parts;
      if (head_rows && held != rows_key) {
        copy_head_rows<kD>(p, value, n, m, p.level_start[l_begin], part_rows, head_rows);
        held = rows_key;
      }
      const V* const part_value = head_rows ? head_rows : value + p.value_offset(n, p.level_start[l_begin], m);
      const std::int64_t count = s_end - s_begin;
      // Group::pixel's rows are counted from the part's first level: its samples' level offsets.
      for (Group<C>& group : groups)
        for (std::int64_t s = s_begin; s < s_end; ++s)
          group.level_offset[s] = p.level_start[group.level_of[s]] - p.level_start[l_begin];
      // A query's samples are loaded two queries ahead and located one ahead (kGroups): the
      // location step's chain of dependent steps (convert, floor, pixel index) then runs while the
      // CPU waits on the previous query's rows, not before the first of its own loads, and reads
      // what the load stored an iteration before.
      // The part walks its queries in the order of scratch.query_order (stripes of an encoder's
      // pixels) or in turn: step k of [q_begin, q_end) is query query_at(walk, k). Grad_value's rows are
      // summed in walk order, the same at any thread count and partition (every pass walks so).
      const std::int64_t* const walk = scratch.query_order;
      auto load_query = [&](Group<C>& group, std::int64_t step) MSDA_INLINE_LAMBDA {
        group.load(p, p.sample_index(n, query_at(walk, step), m, l_begin, 0), count, s_begin);
      };
      // The block dot products' last block ends at blocks_end (block_dot_gradients).
      constexpr int kBlock = kD > 0 ? kLanes<C> / 4 : 0;
      const std::int64_t blocks_end = kBlock >= 2 ? s_begin + (s_end - s_begin + kBlock - 1) / kBlock * kBlock : s_end;
      auto locate_query = [&](Group<C>& group) MSDA_INLINE_LAMBDA {
        group.locate_range(s_begin, s_end);
        group.no_corners(s_end, blocks_end);
      };
      if (q_begin < q_end) {
        load_query(groups[0], q_begin);
        locate_query(groups[0]);
      }
      if (q_begin + 1 < q_end) load_query(groups[1], q_begin + 1);
      for (std::int64_t step = q_begin, slot = 0; step < q_end; ++step, slot = slot + 1 < kGroups ? slot + 1 : 0) {
        const std::int64_t q = query_at(walk, step);
        const std::int64_t first = p.sample_index(n, q, m, l_begin, 0);
        if (step + kPrefetchQueries < q_end) {
          const std::int64_t q_ahead = query_at(walk, step + kPrefetchQueries);
          const std::int64_t ahead = p.sample_index(n, q_ahead, m, l_begin, 0);
          prefetch_samples(p, ahead, count);
          prefetch(grad_out + p.output_offset(n, q_ahead, m), static_cast<std::size_t>(D) * sizeof(V));
          // And the lines its weight and location gradients will be stored to (written once:
          // each store would otherwise wait for its line).
          if (p.grad_weights)
            prefetch_for_write(static_cast<char*>(p.grad_weights) + ahead * p.weight_bytes, count * p.weight_bytes);
          if (p.grad_locations)
            prefetch_for_write(static_cast<char*>(p.grad_locations) + 2 * ahead * p.location_bytes,
                               2 * count * p.location_bytes);
        }
        Group<C>& group = groups[slot];
        if (step + 2 < q_end) load_query(groups[(slot + 2) % kGroups], step + 2);
        if (step + 1 < q_end) locate_query(groups[(slot + 1) % kGroups]);
        // Every far corner row of the query's samples requested before the first is used: where
        // locations scatter (decoders), the rows come from the last-level cache or memory, and
        // one sample's loads alone would leave the CPU waiting on each in turn. Rows of a staged
        // copy or of own_rows (dense parts, whose rows the neighbouring queries have just used)
        // are near: prefetching them cost ~20% of the encoders' backward in stalls.
        for (std::int64_t l = l_begin, s = s_begin; (far_value || far_acc_part) && l < l_end; ++l) {
          const bool far_acc = grad_value && in_place(l);
          if (!far_value && !far_acc) {
            s += p.points[l];
            continue;
          }
          const std::int64_t stride = acc_stride(l);
          const C* acc = far_acc ? level_acc(l) - row_begin * stride : nullptr;
          for (std::int64_t pt = 0; pt < p.points[l]; ++pt, ++s)
            for (int c = 0; c < 4; ++c)
              if (const std::int64_t row = group.pixel[c * group.capacity + s]; row >= 0) {
                if (far_value) prefetch(part_value + row * value_stride, static_cast<std::size_t>(D) * sizeof(V));
                if (acc) prefetch(acc + row * stride, static_cast<std::size_t>(D) * sizeof(C));
              }
        }
        g.load_row(grad_out + p.output_offset(n, q, m));
        if (owner_part) g.store_compute_row(owner_grads + (step - q_begin) * D);
        if constexpr (kBlock >= 2)
          if (want_dots) {
            if (head_rows && zero_dot_is_plus_zero(g, head_rows - D))
              block_dot_gradients<kBlock, true>(g, group, part_value, value_stride, s_begin, s_end, grads, grads_at);
            else
              block_dot_gradients<kBlock, false>(g, group, part_value, value_stride, s_begin, s_end, grads, grads_at);
          }
        // What is per sample, level by level (where there is any: not with one_scatter), then the
        // branch-free scatter.
        const bool per_sample_levels = !one_scatter || (kBlock < 2 && want_dots);
        for (std::int64_t l = l_begin, s = s_begin; per_sample_levels && l < l_end; ++l) {
          const C H = static_cast<C>(p.height_f[l]), W = static_cast<C>(p.width_f[l]);
          C* const acc = level_acc(l);
          const bool owner = owner_part && row_sum(l) == RowSum::owner;
          const std::int64_t stride = acc_stride(l);
          // A whole part's rows take the branch-free scatter below; the per-sample loop is left
          // with what is per sample: the dot products where they are not blocked, owner-computes'
          // records, and banded parts' rows (which need a range check).
          const bool banded_acc = acc && !whole_part;
          const bool per_sample = (kBlock < 2 && want_dots) || owner || banded_acc;
          const std::int64_t level_first = s;
          for (std::int64_t pt = 0; per_sample && pt < p.points[l]; ++pt, ++s) {
            const C a = static_cast<C>(group.a[s]);
            std::int64_t pixel[4];
            C w[4];
            for (int c = 0; c < 4; ++c) {
              pixel[c] = group.pixel[c * group.capacity + s];
              w[c] = group.bilinear[c * group.capacity + s];
            }
            const std::int64_t k = s - s_begin;  // this sample's slot in grads
            if (kBlock < 2 && want_dots) {
              const C lh = group.lh[s], lw = group.lw[s], hh = 1 - lh, hw = 1 - lw;
              // d_weight = sum_c w_c dot(g, v_c); d_u = dot(g, hh (v01 - v00) + lh (v11 - v10));
              // d_v = dot(g, hw (v10 - v00) + lw (v11 - v01)); an off-map corner's value is zero.
              C sums[4];
              if constexpr (kD > 0) {
                // Lane-wise products combined first, then one shared horizontal sum for all three.
                Vec<C> t[4];
                for (int c = 0; c < 4; ++c)
                  t[c] = pixel[c] >= 0 ? g.products(part_value + pixel[c] * value_stride) : Vec<C>{};
                const Vec<C> d_weight = broadcast(w[0]) * t[0] + broadcast(w[1]) * t[1] + broadcast(w[2]) * t[2] +
                                        broadcast(w[3]) * t[3];
                const Vec<C> d_u = broadcast(hh) * (t[1] - t[0]) + broadcast(lh) * (t[3] - t[2]);
                const Vec<C> d_v = broadcast(hw) * (t[2] - t[0]) + broadcast(lw) * (t[3] - t[1]);
                reduce4<C>(d_weight, d_u, d_v, Vec<C>{}, sums);
              } else {
                C dot[4] = {0, 0, 0, 0};
                for (int c = 0; c < 4; ++c)
                  if (pixel[c] >= 0) dot[c] = g.dot(part_value + pixel[c] * value_stride);
                sums[0] = w[0] * dot[0] + w[1] * dot[1] + w[2] * dot[2] + w[3] * dot[3];
                sums[1] = hh * (dot[1] - dot[0]) + lh * (dot[3] - dot[2]);
                sums[2] = hw * (dot[2] - dot[0]) + lw * (dot[3] - dot[1]);
              }
              grads[k] = canonical_nan<C>(sums[0]);
              grads[grads_at + 2 * k] = canonical_nan<C>(a * W * sums[1]);
              grads[grads_at + 2 * k + 1] = canonical_nan<C>(a * H * sums[2]);
            }
            if (banded_acc)
              for (int c = 0; c < 4; ++c) {
                const std::int64_t row = pixel[c] - row_begin;
                if (pixel[c] >= 0 && static_cast<std::uint64_t>(row) < static_cast<std::uint64_t>(rows))
                  g.add_scaled_into(acc + row * stride, a * w[c]);
              }
            else if (owner)
              for (int c = 0; c < 4; ++c) {
                const std::int64_t row = pixel[c] - row_begin;
                if (pixel[c] >= 0 && static_cast<std::uint64_t>(row) < static_cast<std::uint64_t>(rows))
                  records[recorded++] = {static_cast<std::int32_t>(row), static_cast<std::int32_t>(step - q_begin), a * w[c]};
              }
          }
          s = level_first + p.points[l];
        }
        // The scatter of a whole part's rows: the query's samples in one run where every level
        // adds into the same rows (one_scatter), else a run per level. One call site for each
        // kind of accumulator, whatever the plan: two inlined copies could order a multiply-add's
        // operands differently, and which NaN a sum of two NaNs keeps depends on that order, so
        // a plan that changes with the thread count (levels per part) could change grad_value's
        // NaN bits. Nothing per sample above reads or writes these rows (banded parts, which do,
        // are never whole), so the sums' order is the same as level by level.
        for (std::int64_t l = l_begin, s = s_begin; whole_part && l < l_end; ++l) {
          const std::int64_t run_end = one_scatter ? s_end : s + p.points[l];
          C* const acc = one_scatter ? part_acc : level_acc(l);
          const std::int64_t stride = one_scatter ? part_stride : acc_stride(l);
          if (acc == own_rows)  // the copy's row -1 is spare_row
            scatter_samples<true>(g, group, s, run_end, acc, stride, static_cast<C*>(nullptr));
          else if (acc)
            scatter_samples<false>(g, group, s, run_end, acc, stride, spare_row);
          s = run_end;
          if (one_scatter) break;
        }
        // Discrete sampling: the pixel choice is piecewise constant, so no location gradient (the
        // dot products above formed one from the off-map corners' zeros).
        if (want_dots && p.discrete)
          for (std::int64_t k = 0; k < 2 * count; ++k) grads[grads_at + k] = 0;
        if (p.fused) {
          // Parts of the fused backward cover whole rows (cpu.cpp): the chain rule runs here, while
          // the row's gradients are in `grads`, and only the reference-point sums leave the kernel.
          if (want_dots)
            fused_chain(p, group, grads, first,
                        p.reference_partials ? p.reference_partials + ((n * p.Q + q) * p.M + m) * p.L * p.reference_coords
                                             : nullptr);
          continue;
        }
        if (p.grad_weights) store_values(p.grad_weights, first, count, p.problem->weight_dtype, grads);
        if (p.grad_locations) store_values(p.grad_locations, 2 * first, 2 * count, p.problem->location_dtype, grads + grads_at);
      }
      if (owner_part) bucket_corners(records, recorded, rows, bucketed, ends);
      if (grad_value)
        for (std::int64_t l = l_begin; l < l_end; ++l) {
          std::int64_t r0, r1;
          level_rows(l, r0, r1);
          if (row_sum(l) == RowSum::owner) {
            if (r0 < r1) owner_rows_sum<V, kD>(D, owner_grads, bucketed, ends, r0, r1, grad_value + p.value_offset(n, first_row, m), row_stride);
            continue;
          }
          if (in_place(l)) continue;
          // The rows go out one per head's stride (M * D apart), a pattern the hardware's
          // prefetchers do not follow across pages: each row's line is asked for, for writing,
          // kRowsAhead rows before its store.
          constexpr std::int64_t kRowsAhead = 16;
          for (std::int64_t r = r0; r < r1; ++r) {
            if (r + kRowsAhead < r1)
              prefetch_for_write(grad_value + p.value_offset(n, first_row + r + kRowsAhead, m), static_cast<std::size_t>(D) * sizeof(V));
            store_elements(grad_value + p.value_offset(n, first_row + r, m), own_rows + r * D, D);
          }
        }
    });
  }
}

// ---- the fused backward's reference-point gradients --------------------------------------------

// grad_reference_points[n, q] = the sum over m, in order, of the kernel's per-(n, m, q) partial
// sums (fused_chain). Parallel over (n, q): each query's gradient is owned by one thread, summed
// in the same order whatever the thread count.
MSDA_INLINE void fused_reference_gradients(const Params& p) {
  const std::int64_t LR = p.L * p.reference_coords;
#pragma omp parallel for num_threads(p.threads) schedule(static)
  for (std::int64_t nq = 0; nq < p.N * p.Q; ++nq) {
    const double* partials = p.reference_partials + nq * p.M * LR;  // [M, L * R] of this query
    with_storage(p.reference_dtype, p.grad_reference_points, [&]<class T>(T* dst) {
      for (std::int64_t k = 0; k < LR; ++k) {
        double sum = 0;
        for (std::int64_t m = 0; m < p.M; ++m) sum += partials[m * LR + k];
        dst[nq * LR + k] = stored<T>(sum);
      }
    });
  }
}

// ---- entry points: value dtype and D to template arguments -----------------------------------

// MSDA_SPECIALIZE_D 0 (a target's file may say so): every D takes the runtime-D kernels, a third
// of the code to compile, for a target that no machine picks by default (targets/baseline.cpp).
#ifndef MSDA_SPECIALIZE_D
#define MSDA_SPECIALIZE_D 1
#endif
template <template <class, int> class Kernel>
void run(const Params& p, const Scratch& scratch) {
  auto with_value = [&]<class V>() {
    if constexpr (MSDA_SPECIALIZE_D != 0) {
      if (p.D == 32) return Kernel<V, 32>::run(p, scratch);
      if (p.D == 64) return Kernel<V, 64>::run(p, scratch);
    }
    return Kernel<V, 0>::run(p, scratch);
  };
  switch (p.problem->value_dtype) {
    case DType::f32: return with_value.template operator()<float>();
    case DType::f64: return with_value.template operator()<double>();
    case DType::bf16: return with_value.template operator()<bf16>();
    case DType::f16: return with_value.template operator()<f16>();
  }
}

template <class V, int kD>
struct Forward {
  static void run(const Params& p, const Scratch& s) { forward_kernel<V, kD>(p, s); }
};
template <class V, int kD>
struct Backward {
  static void run(const Params& p, const Scratch& s) { backward_kernel<V, kD>(p, s); }
};

void forward(const Params& p, const Scratch& s) { run<Forward>(p, s); }
void backward(const Params& p, const Scratch& s) { run<Backward>(p, s); }
void fused_epilogue(const Params& p, const Scratch&) { fused_reference_gradients(p); }
