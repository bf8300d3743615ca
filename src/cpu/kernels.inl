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

  MSDA_INLINE void store_row(V* dst) const {
    if constexpr (kD > 0) {
      for (int r = 0; r < kRegs; ++r) store(dst + r * kL, reg[r]);
    } else {
      for (std::int64_t d = 0; d < D; ++d) dst[d] = Storage<V>::store(mem[d]);
    }
  }
};

// ---- prefetching -----------------------------------------------------------------------------

// Asks for `bytes` from p on into the cache, one request per 64-byte line.
MSDA_INLINE void prefetch(const void* p, std::size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (std::size_t at = 0; at < bytes; at += 64) __builtin_prefetch(c + at);
}

// The bytes of `count` samples' locations and weights from sample `first`.
MSDA_INLINE void prefetch_samples(const Params& p, std::int64_t first, std::int64_t count) {
  const std::size_t loc_size = size_of(p.problem->location_dtype), weight_size = size_of(p.problem->weight_dtype);
  prefetch(static_cast<const char*>(p.locations) + 2 * first * loc_size, 2 * count * loc_size);
  prefetch(static_cast<const char*>(p.weights) + first * weight_size, count * weight_size);
}

// ---- sample geometry, many samples at a time -------------------------------------------------

// Reads `count` locations or weights of any allowed dtype as doubles; the dtype switch sits
// outside the loops so each loop is a plain (vectorized) conversion.
MSDA_INLINE void load_doubles(const void* base, std::int64_t first, std::int64_t count, DType dtype, double* dst) {
  switch (dtype) {
    case DType::f32: {
      const float* src = static_cast<const float*>(base) + first;
      for (std::int64_t i = 0; i < count; ++i) dst[i] = src[i];
      return;
    }
    case DType::f64: {
      const double* src = static_cast<const double*>(base) + first;
      for (std::int64_t i = 0; i < count; ++i) dst[i] = src[i];
      return;
    }
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
      for (std::int64_t i = 0; i < count; ++i) static_cast<float*>(base)[first + i] = static_cast<float>(src[i]);
      return;
    case DType::f64:
      for (std::int64_t i = 0; i < count; ++i) static_cast<double*>(base)[first + i] = static_cast<double>(src[i]);
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
  std::int64_t* pixel;    // out [4][capacity]: corner pixel index in its level, -1 off the map
  C* bilinear;            // out [4][capacity]: hh*hw, hh*lw, lh*hw, lh*lw (0 off the map)
  C* lh;                  // out: fractional offsets (0 for a zeroed sample)
  C* lw;
  static_assert(5 * sizeof(double) + 4 * sizeof(std::int64_t) + 6 * sizeof(C) <= kGroupBytesPerSample);

  MSDA_INLINE Group(std::byte* memory, std::int64_t cap) : capacity(cap) {
    x = reinterpret_cast<double*>(memory);
    y = x + cap;
    a = y + cap;
    height = a + cap;
    width = height + cap;
    pixel = reinterpret_cast<std::int64_t*>(width + cap);
    bilinear = reinterpret_cast<C*>(pixel + 4 * cap);
    lh = bilinear + 4 * cap;
    lw = lh + cap;
    // Padding lanes (past the samples of a group) hold a harmless finite sample.
    for (std::int64_t s = 0; s < cap; ++s) {
      x[s] = y[s] = a[s] = 0;
      height[s] = width[s] = 1;
    }
  }

  // Reads `count` samples' (x, y) pairs and weights of any allowed dtype, from sample `first`.
  MSDA_INLINE void load(const Params& p, std::int64_t first, std::int64_t count, std::int64_t at) {
    const DType loc_dtype = p.problem->location_dtype;
    switch (loc_dtype) {  // outside the loops: each loop is a plain conversion
      case DType::f32: deinterleave(static_cast<const float*>(p.locations) + 2 * first, count, at); break;
      case DType::f64: deinterleave(static_cast<const double*>(p.locations) + 2 * first, count, at); break;
      case DType::bf16: deinterleave(static_cast<const bf16*>(p.locations) + 2 * first, count, at); break;
      case DType::f16: deinterleave(static_cast<const f16*>(p.locations) + 2 * first, count, at); break;
    }
    load_doubles(p.weights, first, count, p.problem->weight_dtype, a + at);
  }

  template <class T>
  MSDA_INLINE void deinterleave(const T* src, std::int64_t count, std::int64_t at) {
    for (std::int64_t i = 0; i < count; ++i) {
      x[at + i] = Storage<T>::load(src[2 * i]);
      y[at + i] = Storage<T>::load(src[2 * i + 1]);
    }
  }

  MSDA_INLINE void locate(std::int64_t count) {
    using VD = Vec<double>;
    using VI = Vec<std::int64_t>;
    typedef C VC __attribute__((vector_size(kStep * sizeof(C))));
    const VD zero{}, one = zero + 1.0;
    const VI off_map = VI{} - 1;
    auto put = [](C* dst, VD v) {
      const VC narrow = __builtin_convertvector(v, VC);
      __builtin_memcpy(dst, &narrow, sizeof(narrow));
    };
    for (std::int64_t s = 0; s < count; s += kStep) {
      const VD H = load_compute(height + s), W = load_compute(width + s);
      const VD u = load_compute(x + s) * W - 0.5, v = load_compute(y + s) * H - 0.5;
      const VI in = (v > -1.0) & (u > -1.0) & (v < H) & (u < W);
      // Selects: a zeroed sample's NaN or huge coordinate never reaches the integer conversion.
      const VD fh = in ? floor_lanes(v) : zero, fw = in ? floor_lanes(u) : zero;
      const VD frac_h = in ? v - fh : zero, frac_w = in ? u - fw : zero;
      // The fractions are rounded to C once; the weights are formed from the rounded values.
      const VC lh_c = __builtin_convertvector(frac_h, VC), lw_c = __builtin_convertvector(frac_w, VC);
      const VD lh_r = __builtin_convertvector(lh_c, VD), lw_r = __builtin_convertvector(lw_c, VD);
      const VD hh = one - lh_r, hw = one - lw_r;
      const VI top = in & (fh >= 0.0), bottom = in & (fh + 1.0 < H), left = fw >= 0.0, right = fw + 1.0 < W;
      // Exact: H*W < 2^53 for any real map. Selected first, so that no lane of a zeroed sample
      // (NaN coordinates) is ever converted from a non-finite double.
      const VI p00 = __builtin_convertvector(in ? fh * W + fw : zero, VI);
      const VI Wi = __builtin_convertvector(in ? W : zero, VI);
      const VI on[4] = {top & left, top & right, bottom & left, bottom & right};
      const VI corner[4] = {p00, p00 + 1, p00 + Wi, p00 + Wi + 1};
      const VD weight[4] = {hh * hw, hh * lw_r, lh_r * hw, lh_r * lw_r};
      for (int c = 0; c < 4; ++c) {
        const VI px = on[c] ? corner[c] : off_map;
        __builtin_memcpy(pixel + c * capacity + s, &px, sizeof(px));
        put(bilinear + c * capacity + s, on[c] ? weight[c] : zero);
      }
      __builtin_memcpy(lh + s, &lh_c, sizeof(lh_c));
      __builtin_memcpy(lw + s, &lw_c, sizeof(lw_c));
      const VD a_in = in ? load_compute(a + s) : zero;
      store_compute(a + s, a_in);
    }
  }
};

// ---- forward ---------------------------------------------------------------------------------

// Parallel over blocks of queries of one batch element. Inside a block the heads go one at a
// time, so the rows being gathered are those of a single head (1/M of the map): for encoder-like
// locality that working set fits in L2, where all heads' rows of the same band do not. For each
// (q, m) the geometry of its L*P samples is computed as one vectorized group, then the taps are
// summed in one tight loop of loads and FMAs over registers. Each output row is written by one
// thread, summing in a fixed order: results never depend on the thread count.
inline constexpr std::int64_t kPrefetchQueries = 8;

template <class V, int kD>
void forward_kernel(const Params& p, const Scratch& scratch) {
  using C = Compute<V>;
  const std::int64_t D = kD > 0 ? kD : p.D, LP = p.L * p.P, row_stride = p.M * D;
  const V* value = static_cast<const V*>(p.value);
  V* out = static_cast<V*>(p.output);
  const std::int64_t block = p.query_block, blocks_per_n = (p.Q + block - 1) / block;

#pragma omp parallel num_threads(p.threads)
  {
    std::byte* mine = scratch.for_thread(omp_get_thread_num());
    Channels<V, kD> acc(D, reinterpret_cast<C*>(mine));
    Group<C> group(mine + scratch.channels_bytes, scratch.group_capacity);
    const V** level_base = reinterpret_cast<const V**>(mine + scratch.channels_bytes + scratch.group_bytes);
    for (std::int64_t s = 0; s < LP; ++s) {
      group.height[s] = p.height_f[s / p.P];
      group.width[s] = p.width_f[s / p.P];
    }
#pragma omp for schedule(static)
    for (std::int64_t job = 0; job < p.N * blocks_per_n; ++job) {
      const std::int64_t n = job / blocks_per_n, q_begin = job % blocks_per_n * block;
      const std::int64_t q_end = q_begin + block < p.Q ? q_begin + block : p.Q;
      for (std::int64_t m = 0; m < p.M; ++m) {
        for (std::int64_t l = 0; l < p.L; ++l) level_base[l] = value + p.value_offset(n, p.level_start[l], m);
        for (std::int64_t q = q_begin; q < q_end; ++q) {
          // With heads walked one at a time, a query's samples sit M*L*P apart: fetch ahead.
          if (q + kPrefetchQueries < q_end) prefetch_samples(p, p.sample_index(n, q + kPrefetchQueries, m, 0, 0), LP);
          group.load(p, p.sample_index(n, q, m, 0, 0), LP, 0);
          group.locate(LP);
          acc.zero();
          for (std::int64_t s = 0; s < LP; ++s) {
            const V* level = level_base[s / p.P];
            const C a = static_cast<C>(group.a[s]);
            for (int c = 0; c < 4; ++c) {
              const std::int64_t pixel = group.pixel[c * group.capacity + s];
              if (pixel >= 0) acc.add_scaled(level + pixel * row_stride, a * group.bilinear[c * group.capacity + s]);
            }
          }
          acc.store_row(out + p.output_offset(n, q, m));
        }
      }
    }
  }
}

// ---- backward --------------------------------------------------------------------------------

// Parallel over the N*M*L parts (batch, head, level). A part owns the grad_value rows of its
// level and head and the location/weight gradients of its samples: no two threads touch the
// same element, and every sum runs in sample order whatever the thread count. Its samples are
// located in vectorized groups of scratch.group_queries queries.
template <class V, int kD>
void backward_kernel(const Params& p, const Scratch& scratch) {
  using C = Compute<V>;
  // f32 and f64 gradients accumulate in place; bf16 and f16 ones in an f32 copy of the part's
  // rows, rounded once at the end (SPEC "Precision").
  constexpr bool in_place = std::is_same_v<V, C>;
  const std::int64_t D = kD > 0 ? kD : p.D, row_stride = p.M * D, P = p.P;
  const std::int64_t group_queries = scratch.group_queries, capacity = scratch.group_capacity;
  const V* value = static_cast<const V*>(p.value);
  const V* grad_out = static_cast<const V*>(p.grad_output);
  V* grad_value = static_cast<V*>(p.grad_value);
  const bool want_dots = p.grad_locations || p.grad_weights;
  const DType loc_dtype = p.problem->location_dtype, weight_dtype = p.problem->weight_dtype;

#pragma omp parallel num_threads(p.threads)
  {
    std::byte* mine = scratch.for_thread(omp_get_thread_num());
    Channels<V, kD> g(D, reinterpret_cast<C*>(mine));
    Group<C> group(mine + scratch.channels_bytes, capacity);
    C* grads = reinterpret_cast<C*>(mine + scratch.channels_bytes + scratch.group_bytes);  // [3][P]
    C* own_rows = reinterpret_cast<C*>(mine + scratch.channels_bytes + scratch.group_bytes + scratch.grads_bytes);
#pragma omp for schedule(static)
    for (std::int64_t part = 0; part < p.N * p.M * p.L; ++part) {
      const std::int64_t n = part / (p.M * p.L), m = part / p.L % p.M, l = part % p.L;
      const std::int64_t rows = p.height[l] * p.width[l];
      const C H = static_cast<C>(p.height_f[l]), W = static_cast<C>(p.width_f[l]);
      const V* level = value + p.value_offset(n, p.level_start[l], m);
      for (std::int64_t s = 0; s < capacity; ++s) {
        group.height[s] = p.height_f[l];
        group.width[s] = p.width_f[l];
      }
      // acc + r * acc_stride: the accumulator of grad_value[n, level_start + r, m, :]
      C* acc = nullptr;
      std::int64_t acc_stride = D;
      if (grad_value) {
        if constexpr (in_place) {
          acc = reinterpret_cast<C*>(grad_value) + p.value_offset(n, p.level_start[l], m);
          acc_stride = row_stride;
        } else {
          acc = own_rows;
        }
        for (std::int64_t r = 0; r < rows; ++r)
          for (std::int64_t d = 0; d < D; ++d) acc[r * acc_stride + d] = 0;
      }

      for (std::int64_t q0 = 0; q0 < p.Q; q0 += group_queries) {
        const std::int64_t nq = q0 + group_queries < p.Q ? group_queries : p.Q - q0;
        // A part's samples and grad_output rows are strided (M*L*P and M*D apart): fetch the next
        // group's while this one is worked on.
        for (std::int64_t q = q0 + group_queries; q < q0 + 2 * group_queries && q < p.Q; ++q) {
          prefetch_samples(p, p.sample_index(n, q, m, l, 0), P);
          prefetch(grad_out + p.output_offset(n, q, m), static_cast<std::size_t>(D) * sizeof(V));
        }
        for (std::int64_t j = 0; j < nq; ++j) group.load(p, p.sample_index(n, q0 + j, m, l, 0), P, j * P);
        group.locate(nq * P);
        for (std::int64_t j = 0; j < nq; ++j) {
          g.load_row(grad_out + p.output_offset(n, q0 + j, m));
          for (std::int64_t pt = 0; pt < P; ++pt) {
            const std::int64_t s = j * P + pt;
            const C a = static_cast<C>(group.a[s]);
            std::int64_t pixel[4];
            C w[4];
            for (int c = 0; c < 4; ++c) {
              pixel[c] = group.pixel[c * capacity + s];
              w[c] = group.bilinear[c * capacity + s];
            }
            if (want_dots) {
              const C lh = group.lh[s], lw = group.lw[s], hh = 1 - lh, hw = 1 - lw;
              // d_weight = sum_c w_c dot(g, v_c); d_u = dot(g, hh (v01 - v00) + lh (v11 - v10));
              // d_v = dot(g, hw (v10 - v00) + lw (v11 - v01)); an off-map corner's value is zero.
              C sums[4];
              if constexpr (kD > 0) {
                // Lane-wise products combined first, then one shared horizontal sum for all three.
                Vec<C> t[4];
                for (int c = 0; c < 4; ++c) t[c] = pixel[c] >= 0 ? g.products(level + pixel[c] * row_stride) : Vec<C>{};
                const Vec<C> d_weight = broadcast(w[0]) * t[0] + broadcast(w[1]) * t[1] + broadcast(w[2]) * t[2] +
                                        broadcast(w[3]) * t[3];
                const Vec<C> d_u = broadcast(hh) * (t[1] - t[0]) + broadcast(lh) * (t[3] - t[2]);
                const Vec<C> d_v = broadcast(hw) * (t[2] - t[0]) + broadcast(lw) * (t[3] - t[1]);
                reduce4<C>(d_weight, d_u, d_v, Vec<C>{}, sums);
              } else {
                C dot[4] = {0, 0, 0, 0};
                for (int c = 0; c < 4; ++c)
                  if (pixel[c] >= 0) dot[c] = g.dot(level + pixel[c] * row_stride);
                sums[0] = w[0] * dot[0] + w[1] * dot[1] + w[2] * dot[2] + w[3] * dot[3];
                sums[1] = hh * (dot[1] - dot[0]) + lh * (dot[3] - dot[2]);
                sums[2] = hw * (dot[2] - dot[0]) + lw * (dot[3] - dot[1]);
              }
              grads[pt] = sums[0];
              grads[P + 2 * pt] = a * W * sums[1];
              grads[P + 2 * pt + 1] = a * H * sums[2];
            }
            if (acc)
              for (int c = 0; c < 4; ++c)
                if (pixel[c] >= 0) g.add_scaled_into(acc + pixel[c] * acc_stride, a * w[c]);
          }
          const std::int64_t first = p.sample_index(n, q0 + j, m, l, 0);
          if (p.grad_weights) store_values(p.grad_weights, first, P, weight_dtype, grads);
          if (p.grad_locations) store_values(p.grad_locations, 2 * first, 2 * P, loc_dtype, grads + P);
        }
      }
      if constexpr (!in_place) {
        if (grad_value)
          for (std::int64_t r = 0; r < rows; ++r) {
            V* dst = grad_value + p.value_offset(n, p.level_start[l] + r, m);
            for (std::int64_t d = 0; d < D; ++d) dst[d] = Storage<V>::store(acc[r * D + d]);
          }
      }
    }
  }
}

// ---- entry points: value dtype and D to template arguments -----------------------------------

template <template <class, int> class Kernel>
void run(const Params& p, const Scratch& scratch) {
  auto with_value = [&]<class V>() {
    if (p.D == 32) return Kernel<V, 32>::run(p, scratch);
    if (p.D == 64) return Kernel<V, 64>::run(p, scratch);
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
