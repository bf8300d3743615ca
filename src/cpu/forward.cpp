#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/bilinear.h"
#include "cpu/cpu.h"
#include "dtype_switch.h"

namespace msda::cpu {
namespace {

template <class V, class Loc, class W>
void forward_kernel(const Params& p) {
  using C = typename Storage<V>::Compute;
  const V* value = static_cast<const V*>(p.value);
  const Loc* loc = static_cast<const Loc*>(p.locations);
  const W* weight = static_cast<const W*>(p.weights);
  V* out = static_cast<V*>(p.output);
  const std::int64_t D = p.D;
  // Per-thread accumulators, allocated before the parallel region so that a bad_alloc reaches
  // the caller instead of terminating inside OpenMP.
  std::vector<C> scratch(static_cast<std::size_t>(p.threads * D));

#pragma omp parallel num_threads(p.threads)
  {
    C* acc = scratch.data() + omp_get_thread_num() * D;
#pragma omp for schedule(static)
    for (std::int64_t nq = 0; nq < p.N * p.Q; ++nq) {
      const std::int64_t n = nq / p.Q, q = nq % p.Q;
      for (std::int64_t m = 0; m < p.M; ++m) {
        std::fill(acc, acc + D, C(0));
        for (std::int64_t l = 0; l < p.L; ++l) {
          for (std::int64_t pt = 0; pt < p.P; ++pt) {
            const std::int64_t i = p.sample_index(n, q, m, l, pt);
            Bilinear<C> b;
            if (!locate(Storage<Loc>::load(loc[2 * i]), Storage<Loc>::load(loc[2 * i + 1]), p.height[l],
                        p.width[l], p.level_start[l], b))
              continue;
            const C a = static_cast<C>(Storage<W>::load(weight[i]));
            for (int c = 0; c < 4; ++c) {
              if (b.row[c] < 0) continue;
              const V* src = value + p.value_offset(n, b.row[c], m);
              const C wa = a * b.weight[c];
              for (std::int64_t d = 0; d < D; ++d) acc[d] += wa * Storage<V>::load(src[d]);
            }
          }
        }
        V* dst = out + p.output_offset(n, q, m);
        for (std::int64_t d = 0; d < D; ++d) dst[d] = Storage<V>::store(acc[d]);
      }
    }
  }
}

}  // namespace

void forward(const Params& params) {
  visit_dtypes(*params.problem, [&]<class V, class Loc, class W>() { forward_kernel<V, Loc, W>(params); });
}

}  // namespace msda::cpu
