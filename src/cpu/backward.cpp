#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/bilinear.h"
#include "cpu/cpu.h"
#include "dtype_switch.h"

namespace msda::cpu {
namespace {

template <class V, class Loc, class W>
void backward_kernel(const Params& p) {
  using C = typename Storage<V>::Compute;
  // f32 and f64 gradients accumulate in place; bf16 and f16 ones in an f32 copy of the part's
  // rows, rounded once at the end (SPEC "Precision").
  constexpr bool in_place = std::is_same_v<V, C>;
  const V* value = static_cast<const V*>(p.value);
  const Loc* loc = static_cast<const Loc*>(p.locations);
  const W* weight = static_cast<const W*>(p.weights);
  const V* grad_out = static_cast<const V*>(p.grad_output);
  V* grad_value = static_cast<V*>(p.grad_value);
  Loc* grad_loc = static_cast<Loc*>(p.grad_locations);
  W* grad_weight = static_cast<W*>(p.grad_weights);
  const std::int64_t D = p.D;

  std::int64_t max_level_rows = 0;
  for (std::int64_t l = 0; l < p.L; ++l) max_level_rows = std::max(max_level_rows, p.height[l] * p.width[l]);
  const std::int64_t acc_size = (!in_place && grad_value) ? max_level_rows * D : 0;
  // Allocated before the parallel region: a bad_alloc reaches the caller.
  std::vector<C> scratch(static_cast<std::size_t>(p.threads * (D + acc_size)));

#pragma omp parallel num_threads(p.threads)
  {
    C* g = scratch.data() + omp_get_thread_num() * (D + acc_size);
    C* own_acc = g + D;
#pragma omp for schedule(static)
    for (std::int64_t part = 0; part < p.N * p.M * p.L; ++part) {
      const std::int64_t n = part / (p.M * p.L), m = part / p.L % p.M, l = part % p.L;
      const std::int64_t H = p.height[l], W_ = p.width[l], start = p.level_start[l];
      // The accumulator of grad_value[n, row, m, :] for the rows of this level.
      C* acc = nullptr;
      std::int64_t acc_stride = D;
      if (grad_value) {
        if constexpr (in_place) {
          acc = reinterpret_cast<C*>(grad_value) + p.value_offset(n, start, m);
          acc_stride = p.M * D;
        } else {
          acc = own_acc;
        }
        for (std::int64_t r = 0; r < H * W_; ++r) std::fill(acc + r * acc_stride, acc + r * acc_stride + D, C(0));
      }
      auto acc_row = [&](std::int64_t row) { return acc + (row - start) * acc_stride; };

      for (std::int64_t q = 0; q < p.Q; ++q) {
        const V* g_src = grad_out + p.output_offset(n, q, m);
        for (std::int64_t d = 0; d < D; ++d) g[d] = Storage<V>::load(g_src[d]);
        for (std::int64_t pt = 0; pt < p.P; ++pt) {
          const std::int64_t i = p.sample_index(n, q, m, l, pt);
          const C a = static_cast<C>(Storage<W>::load(weight[i]));
          Bilinear<C> b;
          if (!locate(Storage<Loc>::load(loc[2 * i]), Storage<Loc>::load(loc[2 * i + 1]), H, W_, start, b)) {
            if (grad_weight) grad_weight[i] = Storage<W>::store(0);
            if (grad_loc) grad_loc[2 * i] = grad_loc[2 * i + 1] = Storage<Loc>::store(0);
            continue;
          }
          // dot(g, corner value) for each corner; an off-map corner's value is zero.
          C dot[4] = {0, 0, 0, 0};
          if (grad_weight || grad_loc) {
            for (int c = 0; c < 4; ++c) {
              if (b.row[c] < 0) continue;
              const V* src = value + p.value_offset(n, b.row[c], m);
              C sum = 0;
              for (std::int64_t d = 0; d < D; ++d) sum += g[d] * Storage<V>::load(src[d]);
              dot[c] = sum;
            }
          }
          if (grad_weight)
            grad_weight[i] = Storage<W>::store(b.weight[0] * dot[0] + b.weight[1] * dot[1] +
                                               b.weight[2] * dot[2] + b.weight[3] * dot[3]);
          if (grad_loc) {
            const C d_u = b.hh * (dot[1] - dot[0]) + b.lh * (dot[3] - dot[2]);
            const C d_v = b.hw * (dot[2] - dot[0]) + b.lw * (dot[3] - dot[1]);
            grad_loc[2 * i] = Storage<Loc>::store(a * static_cast<C>(W_) * d_u);
            grad_loc[2 * i + 1] = Storage<Loc>::store(a * static_cast<C>(H) * d_v);
          }
          if (acc) {
            for (int c = 0; c < 4; ++c) {
              if (b.row[c] < 0) continue;
              C* dst = acc_row(b.row[c]);
              const C wa = a * b.weight[c];
              for (std::int64_t d = 0; d < D; ++d) dst[d] += wa * g[d];
            }
          }
        }
      }
      if constexpr (!in_place) {
        if (grad_value)
          for (std::int64_t r = 0; r < H * W_; ++r) {
            V* dst = grad_value + p.value_offset(n, start + r, m);
            for (std::int64_t d = 0; d < D; ++d) dst[d] = Storage<V>::store(acc[r * D + d]);
          }
      }
    }
  }
}

}  // namespace

void backward(const Params& params) {
  visit_dtypes(*params.problem, [&]<class V, class Loc, class W>() { backward_kernel<V, Loc, W>(params); });
}

}  // namespace msda::cpu
