// The CPU backend's techniques switched one at a time, against the gather floor and the
// backward's floor, on one of SPEC's workloads: what each technique buys, measured in one run
// (medians of --repeats). Its last line gives issue 24's ratios: the default backward against
// the default forward and against the floors.
//
//   msda_ablation [--workload ddetr-enc] [--locations encoder|decoder|random] [--dtype f32|bf16]
//                 [--threads 2] [--repeats 7] [--only TEXT]
// --only TEXT times only the rows whose name contains TEXT (a profiler's run of one variant), or
// any of several texts separated by | (an A/B of two variants: --only "default|level_parts").
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "msda/msda.h"
#include "workloads.h"

namespace {

using msda::workloads::median_ms;

// The widest vectors this CPU has, asked once.
enum class Vectors { avx512, avx2, baseline };
Vectors widest_vectors() {
  static const Vectors widest = [] {
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx512f")) return Vectors::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Vectors::avx2;
#endif
    return Vectors::baseline;
  }();
  return widest;
}
const char* vectors_name(Vectors v) {
  return v == Vectors::avx512 ? "AVX-512" : v == Vectors::avx2 ? "AVX2" : "the baseline's";
}

// The floors' loops are written once, over 16-float vectors (GCC vector extensions), and run
// under the widest vector instructions this CPU has: f() is inlined whole (flatten) into a copy
// compiled for AVX-512, one for AVX2, or the baseline (SSE2, NEON), picked at run time, so the
// floors exist on every machine and use the registers the kernels would.
#if defined(__x86_64__)
template <class F>
__attribute__((target("avx512f"), flatten)) auto on_avx512(const F& f) {
  return f();
}
template <class F>
__attribute__((target("avx2,fma"), flatten)) auto on_avx2(const F& f) {
  return f();
}
#endif
template <class F>
auto with_widest_vectors(const F& f) {
#if defined(__x86_64__)
  if (widest_vectors() == Vectors::avx512) return on_avx512(f);
  if (widest_vectors() == Vectors::avx2) return on_avx2(f);
#endif
  return f();
}

// The gather floor: for every sample, in the forward kernel's order (blocks of queries, one head
// at a time), load exactly the in-range corner rows it loads and add them to a running sum, with
// no geometry and no weights. Each sample's corners come from an 8-byte record made before
// timing (its top-left pixel, level and which corners are on the map): about the bytes of
// locations the kernel itself reads.
struct GatherFloor {
  struct Record {
    std::int32_t pixel;  // top-left corner's pixel index in its level (may be -1 or -W-1)
    std::uint8_t level;
    std::uint8_t corners;  // bit c set: corner c (00, 01, 10, 11) is on the map
  };
  std::vector<std::vector<Record>> records_per_job;
  msda::Problem p;
  std::int64_t block;

  GatherFloor(const msda::Problem& problem, const std::vector<double>& loc, std::int64_t query_block)
      : p(problem), block(query_block) {
    const std::int64_t L = p.num_levels(), blocks = (p.queries + block - 1) / block;
    records_per_job.resize(static_cast<std::size_t>(p.batch * blocks));
    for (std::int64_t job = 0; job < p.batch * blocks; ++job) {
      const std::int64_t n = job / blocks, q0 = job % blocks * block, q1 = std::min(q0 + block, p.queries);
      auto& records = records_per_job[job];
      for (std::int64_t m = 0; m < p.heads; ++m)
        for (std::int64_t q = q0; q < q1; ++q)
          for (std::int64_t l = 0; l < L; ++l)
            for (std::int64_t pt = 0; pt < p.points; ++pt) {
              const std::int64_t i = (((n * p.queries + q) * p.heads + m) * L + l) * p.points + pt;
              const std::int64_t H = p.levels[l].height, W = p.levels[l].width;
              const double u = loc[2 * i] * W - 0.5, v = loc[2 * i + 1] * H - 0.5;
              Record r{0, static_cast<std::uint8_t>(l), 0};
              if (v > -1 && u > -1 && v < H && u < W) {
                const auto h0 = static_cast<std::int64_t>(std::floor(v)), w0 = static_cast<std::int64_t>(std::floor(u));
                r.pixel = static_cast<std::int32_t>(h0 * W + w0);
                r.corners = static_cast<std::uint8_t>((h0 >= 0 && w0 >= 0) | (h0 >= 0 && w0 + 1 < W) << 1 |
                                                      (h0 + 1 < H && w0 >= 0) << 2 | (h0 + 1 < H && w0 + 1 < W) << 3);
              }
              records.push_back(r);
            }
    }
  }

  typedef float Vec16 __attribute__((vector_size(64)));

  // Summed 16 floats at a time in registers, as the kernels do: loads and adds only.
  float sum_job(const float* value, std::size_t job) const {
    const std::int64_t blocks = (p.queries + block - 1) / block, n = static_cast<std::int64_t>(job) / blocks;
    const std::int64_t q0 = static_cast<std::int64_t>(job) % blocks * block, q1 = std::min(q0 + block, p.queries);
    const std::int64_t D = p.channels, stride = p.heads * D, samples = p.num_levels() * p.points;
    const std::vector<std::int64_t> starts = msda::level_starts(p.levels);
    const Record* r = records_per_job[job].data();
    Vec16 acc[4][2] = {};  // one pair per corner, like the kernel: the sum is not latency-bound
    for (std::int64_t m = 0; m < p.heads; ++m) {
      const float* base[16];
      std::int64_t width[16];
      for (std::int64_t l = 0; l < p.num_levels() && l < 16; ++l) {
        base[l] = value + ((n * p.value_len + starts[l]) * p.heads + m) * D;
        width[l] = p.levels[l].width;
      }
      for (std::int64_t q = q0; q < q1; ++q)
        for (std::int64_t s = 0; s < samples; ++s, ++r) {
          const std::int64_t corner[4] = {r->pixel, r->pixel + 1, r->pixel + width[r->level],
                                          r->pixel + width[r->level] + 1};
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) {
            if (!(r->corners >> c & 1)) continue;
            const float* row = base[r->level] + corner[c] * stride;
            Vec16 x0, x1;  // D == 32 (available() checks): one row is two vectors
            __builtin_memcpy(&x0, row, sizeof(x0));
            __builtin_memcpy(&x1, row + 16, sizeof(x1));
            acc[c][0] += x0;
            acc[c][1] += x1;
          }
        }
    }
    float total = 0;
    for (int c = 0; c < 4; ++c)
      for (int i = 0; i < 16; ++i) total += acc[c][0][i] + acc[c][1][i];
    return total;
  }

  bool available() const {
    return p.channels == 32 && p.num_levels() <= 16 && p.value_dtype == msda::DType::f32;
  }

  float run(const float* value, int threads) const {
    float total = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (std::size_t job = 0; job < records_per_job.size(); ++job)
      total += with_widest_vectors([&] { return sum_job(value, job); });
    return total;
  }
};

// The hardware's floor (issue 10): the same corner rows, read in the fastest order the machine
// allows: each (batch, head)'s rows sorted by address and streamed, so the prefetchers see
// ascending addresses and every row still in cache is reused at once. `head_major` reads them
// from a [N, M, S, D] copy of value (a head's map contiguous), else from value's own [N, S, M, D].
// The kernel's order is the one its output needs; no gather of these samples can be faster.
// Calls f(n, q, m, row, bilinear weight) for every in-range corner of every sample, in sample
// order (so each head's corners come in query order); row counts from value's first row.
template <class F>
void for_each_corner(const msda::Problem& p, const std::vector<double>& loc, F&& f) {
  const std::int64_t L = p.num_levels(), M = p.heads;
  const std::vector<std::int64_t> starts = msda::level_starts(p.levels);
  for (std::int64_t n = 0; n < p.batch; ++n)
    for (std::int64_t q = 0; q < p.queries; ++q)
      for (std::int64_t m = 0; m < M; ++m)
        for (std::int64_t l = 0; l < L; ++l)
          for (std::int64_t pt = 0; pt < p.points; ++pt) {
            const std::int64_t i = (((n * p.queries + q) * M + m) * L + l) * p.points + pt;
            const std::int64_t H = p.levels[l].height, W = p.levels[l].width;
            const double u = loc[2 * i] * W - 0.5, v = loc[2 * i + 1] * H - 0.5;
            if (!(v > -1 && u > -1 && v < H && u < W)) continue;
            const double fv = std::floor(v), fu = std::floor(u);
            const auto h0 = static_cast<std::int64_t>(fv), w0 = static_cast<std::int64_t>(fu);
            for (int c = 0; c < 4; ++c) {
              const std::int64_t h = h0 + (c >> 1), w = w0 + (c & 1);
              if (h < 0 || w < 0 || h >= H || w >= W) continue;
              const double wy = c >> 1 ? v - fv : 1 - (v - fv), wx = c & 1 ? u - fu : 1 - (u - fu);
              f(n, q, m, starts[l] + h * W + w, wy * wx);
            }
          }
}

struct SortedFloor {
  std::vector<std::vector<std::int64_t>> offsets_per_head;  // float offsets of every corner load
  std::vector<float> head_major_copy;
  bool head_major;

  SortedFloor(const msda::Problem& p, const std::vector<double>& loc, const float* value, bool head_major_layout)
      : head_major(head_major_layout) {
    const std::int64_t M = p.heads, D = p.channels, S = p.value_len;
    offsets_per_head.resize(static_cast<std::size_t>(p.batch * M));
    for_each_corner(p, loc, [&](std::int64_t n, std::int64_t, std::int64_t m, std::int64_t row, double) {
      offsets_per_head[n * M + m].push_back(head_major ? ((n * M + m) * S + row) * D : ((n * S + row) * M + m) * D);
    });
    for (auto& offsets : offsets_per_head) std::sort(offsets.begin(), offsets.end());
    if (head_major) {
      head_major_copy.resize(static_cast<std::size_t>(p.batch * S * M * D));
      for (std::int64_t n = 0; n < p.batch; ++n)
        for (std::int64_t row = 0; row < S; ++row)
          for (std::int64_t m = 0; m < M; ++m)
            std::memcpy(&head_major_copy[((n * M + m) * S + row) * D], value + ((n * S + row) * M + m) * D,
                        sizeof(float) * D);
    }
  }

  typedef float Vec16 __attribute__((vector_size(64)));

  float sum_head(const float* value, std::size_t head) const {
    Vec16 acc[4][2] = {};
    const std::vector<std::int64_t>& offsets = offsets_per_head[head];
    std::size_t i = 0;
    for (; i + 4 <= offsets.size(); i += 4)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        Vec16 x0, x1;  // D == 32
        __builtin_memcpy(&x0, value + offsets[i + c], sizeof(x0));
        __builtin_memcpy(&x1, value + offsets[i + c] + 16, sizeof(x1));
        acc[c][0] += x0;
        acc[c][1] += x1;
      }
    for (; i < offsets.size(); ++i) {
      Vec16 x0;
      __builtin_memcpy(&x0, value + offsets[i], sizeof(x0));
      acc[0][0] += x0;
    }
    float total = 0;
    for (int c = 0; c < 4; ++c)
      for (int k = 0; k < 16; ++k) total += acc[c][0][k] + acc[c][1][k];
    return total;
  }

  float run(const float* value, int threads) const {
    const float* base = head_major ? head_major_copy.data() : value;
    float total = 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(+ : total)
    for (std::size_t head = 0; head < offsets_per_head.size(); ++head)
      total += with_widest_vectors([&] { return sum_head(base, head); });
    return total;
  }
};

// The backward's floor (issue 24), defined like the forward's: grad_value zeroed once (a parallel
// memset of the whole tensor, which the backward must write anyway), then, for each (batch, head),
// the same corner rows of value read and the same rows of grad_value read-modified-written
// (grad_row += value_row: the load, the add and the store, no weights and no geometry), in address
// order. The per-sample location and weight gradients read the same value rows the scatter does
// and only add dot products, so this is what any backward of these samples must move. `sparse`
// counts each distinct row once (the decoders' case: a row's corners summed in registers, one
// read-modify-write per touched row).
struct BackwardFloor {
  const SortedFloor& rows;
  std::vector<std::vector<std::int64_t>> distinct;  // per head: each touched row once
  bool sparse;

  BackwardFloor(const SortedFloor& sorted_rows, bool distinct_rows) : rows(sorted_rows), sparse(distinct_rows) {
    if (!sparse) return;
    for (const auto& offsets : rows.offsets_per_head) {
      distinct.emplace_back(offsets);
      distinct.back().erase(std::unique(distinct.back().begin(), distinct.back().end()), distinct.back().end());
    }
  }

  typedef float Vec16 __attribute__((vector_size(64)));

  static void add_rows(const float* value, float* grad, const std::vector<std::int64_t>& offsets) {
    for (const std::int64_t off : offsets) {
      Vec16 v0, v1, g0, g1;  // D == 32
      __builtin_memcpy(&v0, value + off, sizeof(v0));
      __builtin_memcpy(&v1, value + off + 16, sizeof(v1));
      __builtin_memcpy(&g0, grad + off, sizeof(g0));
      __builtin_memcpy(&g1, grad + off + 16, sizeof(g1));
      g0 += v0;
      g1 += v1;
      __builtin_memcpy(grad + off, &g0, sizeof(g0));
      __builtin_memcpy(grad + off + 16, &g1, sizeof(g1));
    }
  }

  void run(const float* value, float* grad, std::size_t grad_elements, int threads) const {
    constexpr std::size_t kRun = std::size_t(1) << 14;
    const std::size_t runs = (grad_elements + kRun - 1) / kRun;
    const auto& per_head = sparse ? distinct : rows.offsets_per_head;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (std::size_t r = 0; r < runs; ++r)
        std::memset(grad + r * kRun, 0, sizeof(float) * std::min(kRun, grad_elements - r * kRun));
#pragma omp for schedule(dynamic)
      for (std::size_t head = 0; head < per_head.size(); ++head)
        with_widest_vectors([&] { add_rows(value, grad, per_head[head]); });
    }
  }
};

// The grad_value scatter alone, two ways, on the same inputs (issue 24's owner-computes
// question): every in-range corner of (batch, head) as a record (its row, its query, its weight
// a * w_c), in the kernel's sample order, made before timing as the kernel's geometry makes it.
// Both copy the head's grad_output rows contiguous first and store every row of grad_value once.
//  - read-modify-write: a contiguous copy of the head's rows zeroed, each corner's row
//    += weight * grad_output[query] in sample order, the copy stored into grad_value (the
//    kernel's scatter=copy, without its dot products);
//  - the same in place: grad_value zeroed by one parallel memset, each corner's row of it
//    read-modified-written (the kernel's scatter=in_place);
//  - owner-computes: the corners bucketed by row (a counting sort: count, prefix sum, fill), then
//    each row summed in registers from its bucket, in sample order, and stored once: no row is
//    read back, at the price of writing and reading the buckets.
struct ScatterFloor {
  struct Corner {
    std::int32_t row, query;
    float weight;
  };
  std::vector<std::vector<Corner>> per_head;
  enum class Way { copy, in_place, owner_computes };
  std::int64_t N, M, S, Q;
  Way way;
  std::size_t most_corners = 0;  // of any (batch, head): the buckets' size

  ScatterFloor(const msda::Problem& p, const std::vector<double>& loc, Way how)
      : N(p.batch), M(p.heads), S(p.value_len), Q(p.queries), way(how) {
    per_head.resize(static_cast<std::size_t>(N * M));
    for_each_corner(p, loc, [&](std::int64_t n, std::int64_t q, std::int64_t m, std::int64_t row, double w) {
      per_head[n * M + m].push_back(
          {static_cast<std::int32_t>(row), static_cast<std::int32_t>(q), static_cast<float>(w / 16)});
    });
    for (const auto& corners : per_head) most_corners = std::max(most_corners, corners.size());
  }

  // 16 floats at p, of any alignment (may_alias: the same memory is read as floats elsewhere).
  // A reference, not a vector passed by value: no calling convention that depends on the target.
  typedef float Vec16 __attribute__((vector_size(64), aligned(4), may_alias));
  static Vec16& as_vec(float* p) { return *reinterpret_cast<Vec16*>(p); }
  static const Vec16& as_vec(const float* p) { return *reinterpret_cast<const Vec16*>(p); }

  void head(const float* grad_out, float* grad_value, std::size_t nm, std::vector<float>& g, std::vector<float>& rows,
            std::vector<std::int32_t>& start, std::vector<Corner>& bucketed) const {
    constexpr std::int64_t D = 32;
    const std::int64_t n = static_cast<std::int64_t>(nm) / M, m = static_cast<std::int64_t>(nm) % M;
    for (std::int64_t q = 0; q < Q; ++q) std::memcpy(&g[q * D], grad_out + ((n * Q + q) * M + m) * D, sizeof(float) * D);
    const std::vector<Corner>& corners = per_head[nm];
    float* const out = grad_value + (n * S * M + m) * D;  // row r at out + r * M * D
    if (way != Way::owner_computes) {
      const bool in_place = way == Way::in_place;
      if (!in_place) std::memset(rows.data(), 0, sizeof(float) * S * D);
      for (const Corner& c : corners) {
        const Vec16 w = c.weight - Vec16{};
        float* acc = in_place ? out + c.row * M * D : &rows[c.row * D];
        as_vec(acc) += w * as_vec(&g[c.query * D]);
        as_vec(acc + 16) += w * as_vec(&g[c.query * D + 16]);
      }
      if (!in_place)
        for (std::int64_t r = 0; r < S; ++r) std::memcpy(out + r * M * D, &rows[r * D], sizeof(float) * D);
      return;
    }
    std::fill(start.begin(), start.end(), 0);
    for (const Corner& c : corners) ++start[c.row + 1];
    for (std::int64_t r = 0; r < S; ++r) start[r + 1] += start[r];
    for (const Corner& c : corners) bucketed[start[c.row]++] = c;  // start[r] moves to row r's end
    for (std::int64_t r = 0, at = 0; r < S; ++r) {
      Vec16 a0 = {}, a1 = {};
      for (; at < start[r]; ++at) {
        const Corner& c = bucketed[at];
        const Vec16 w = c.weight - Vec16{};
        a0 += w * as_vec(&g[c.query * D]);
        a1 += w * as_vec(&g[c.query * D + 16]);
      }
      as_vec(out + r * M * D) = a0;
      as_vec(out + r * M * D + 16) = a1;
    }
  }

  void run(const float* grad_out, float* grad_value, int threads) const {
    const bool owner = way == Way::owner_computes;
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> g(static_cast<std::size_t>(Q * 32)), rows(way == Way::copy ? static_cast<std::size_t>(S * 32) : 0);
      std::vector<std::int32_t> start(owner ? static_cast<std::size_t>(S + 1) : 0);
      std::vector<Corner> bucketed(owner ? most_corners : 0);
      if (way == Way::in_place) {
        constexpr std::size_t kRun = std::size_t(1) << 14;
        const std::size_t total = static_cast<std::size_t>(N * S * M * 32), runs = (total + kRun - 1) / kRun;
#pragma omp for schedule(static)
        for (std::size_t r = 0; r < runs; ++r)
          std::memset(grad_value + r * kRun, 0, sizeof(float) * std::min(kRun, total - r * kRun));
      }
#pragma omp for schedule(dynamic)
      for (std::size_t nm = 0; nm < per_head.size(); ++nm)
        with_widest_vectors([&] { head(grad_out, grad_value, nm, g, rows, start, bucketed); });
    }
  }
};

}  // namespace

int main(int argc, char** argv) try {
  std::string workload_name = "ddetr-enc", locations_name;
  int threads = 2, repeats = 7;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + ": expected a value");
      return argv[++i];
    };
    if (arg == "--workload") workload_name = next();
    else if (arg == "--locations") locations_name = next();
    else if (arg == "--threads") threads = std::stoi(next());
    else if (arg == "--repeats") repeats = std::max(1, std::stoi(next()));
    else if (arg == "--only") only = next();
    else throw std::invalid_argument("unknown argument " + arg);
  }
  const auto& workload = msda::workloads::find(workload_name);
  const auto kind = locations_name.empty() ? workload.locations : msda::workloads::parse_locations(locations_name);
  msda::Problem p = workload.problem;
  const auto data = msda::workloads::generate(p, kind, 11);
  const std::int64_t L = p.num_levels(), samples = p.batch * p.queries * p.heads * L * p.points;
  const std::int64_t out_n = p.batch * p.queries * p.heads * p.channels;
  // grad_value 64-byte aligned, as PyTorch's CPU allocator aligns a tensor's memory.
  const std::size_t gv_size = static_cast<std::size_t>(p.batch * p.value_len * p.heads * p.channels);
  std::vector<float> gv_storage(gv_size + 16);
  float* const gv_data = gv_storage.data() + (64 - reinterpret_cast<std::uintptr_t>(gv_storage.data()) % 64) % 64 / sizeof(float);
  std::vector<float> out(out_n), grad_out(out_n, 1.0f),
      gl(2 * samples), gw(samples);

  std::printf("ablation: %s, %s locations, f32, %d threads, median of %d, every row timed in turn; "
              "floors with %s vectors\n\n",
              workload.name.c_str(), std::string(msda::workloads::name(kind)).c_str(), threads, repeats,
              vectors_name(widest_vectors()));

  // Every row is one or two timed calls; the rows take turns, repeat after repeat, so a machine
  // whose speed drifts (a shared VM) moves them all alike and the ratios within a run hold.
  struct Row {
    std::string name;
    std::function<void()> forward, backward;
    std::vector<double> forward_ms, backward_ms;
  };
  std::vector<Row> rows;
  const auto* value = reinterpret_cast<const float*>(data.value.data());
  volatile float sink = 0;
  const std::vector<double> loc = msda::workloads::to_double(data.locations.data(), p.location_dtype, 2 * samples);
  const GatherFloor floor(p, loc, 1);
  std::vector<SortedFloor> sorted;
  std::deque<BackwardFloor> backward_floors;  // rows hold references: no reallocation
  if (floor.available()) {
    rows.push_back({"gather floor: the direct walk's rows in its order (query by query, all heads), running sum",
                    [&] { sink = floor.run(value, threads); }, nullptr});
    sorted.reserve(2);
    for (bool head_major : {false, true}) sorted.emplace_back(p, loc, value, head_major);
    for (const SortedFloor& s : sorted)
      rows.push_back({std::string("hardware floor: each head's rows in address order") +
                          (s.head_major ? ", from a head-major [N, M, S, D] copy" : ""),
                      [&] { sink = s.run(value, threads); }, nullptr});
    // The backward's floors, in the backward column (the forward column times the memset alone).
    for (bool sparse : {false, true}) {
      backward_floors.emplace_back(sorted[0], sparse);
      const BackwardFloor& f = backward_floors.back();
      rows.push_back({sparse ? "backward floor, sparse: grad_value zeroed, each touched row read-modify-written once"
                             : "backward floor: grad_value zeroed, every corner's value row read and grad_value row "
                               "read-modify-written, each head in address order",
                      [&] { std::memset(gv_data, 0, sizeof(float) * gv_size); },
                      [&] { f.run(value, gv_data, gv_size, threads); }});
    }
  }
  std::deque<ScatterFloor> scatter_floors;
  if (floor.available() && p.value_len < (std::int64_t(1) << 31) && p.queries < (std::int64_t(1) << 31))
    for (auto [way, name] : {std::pair{ScatterFloor::Way::copy, "read-modify-write in sample order into a contiguous copy"},
                             std::pair{ScatterFloor::Way::in_place, "read-modify-write in sample order in grad_value, zeroed"},
                             std::pair{ScatterFloor::Way::owner_computes,
                                       "owner-computes: corners bucketed by row, each row summed in registers"}}) {
      scatter_floors.emplace_back(p, loc, way);
      const ScatterFloor& f = scatter_floors.back();
      rows.push_back({std::string("grad_value scatter alone, ") + name, [] {},
                      [&] { f.run(grad_out.data(), gv_data, threads); }});
    }

  auto variant = [&](std::string name, msda::Options o) {
    rows.push_back({std::move(name), [&, o] { msda::forward(p, data.inputs(), out.data(), o); },
                    [&, o] { msda::backward(p, data.inputs(), grad_out.data(), {gv_data, gl.data(), gw.data()}, o); }});
  };
  variant("default", msda::Options{threads});
  // The backward's two halves on their own: where its time goes (the default's plan for each).
  rows.push_back({"default backward, grad_value alone", [] {},
                  [&] { msda::backward(p, data.inputs(), grad_out.data(), {gv_data, nullptr, nullptr}, msda::Options{threads}); }});
  rows.push_back({"default backward, location and weight gradients alone", [] {},
                  [&] { msda::backward(p, data.inputs(), grad_out.data(), {nullptr, gl.data(), gw.data()}, msda::Options{threads}); }});
  for (auto [staging, name] : {std::pair{msda::CpuTuning::Staging::copy, "staging=copy (each head's rows copied contiguous)"},
                               std::pair{msda::CpuTuning::Staging::direct, "staging=direct (gathers read value where it is)"}}) {
    msda::Options o{threads};
    o.tuning.staging = staging;
    variant(name, o);
  }
  for (std::int64_t block : {1, 16, 64, 256, 1024}) {  // the direct walk's blocks
    msda::Options o{threads};
    o.tuning.staging = msda::CpuTuning::Staging::direct;
    o.tuning.query_block = block;
    variant("staging=direct, query_block=" + std::to_string(block) + (block == 1 ? " (all heads per query)" : ""), o);
  }
  for (std::int64_t stripe : {1, 4, 16}) {  // encoders only: other problems walk in order
    if (p.queries != p.value_len) break;
    msda::Options o{threads};
    o.tuning.query_stripe = stripe;
    variant("query_stripe=" + std::to_string(stripe) +
                (stripe == 1 ? " (an encoder's queries walked in raster order)" : " (image rows per stripe of the query walk)"),
            o);
  }
  {
    msda::Options o{threads};
    o.tuning.level_parts = true;
    variant("level_parts=true (backward parts of one level)", o);
  }
  for (auto [scatter, name] : {std::pair{msda::CpuTuning::Scatter::copy, "scatter=copy (a part's rows in a copy)"},
                               std::pair{msda::CpuTuning::Scatter::in_place, "scatter=in_place (f32: in grad_value)"},
                               std::pair{msda::CpuTuning::Scatter::owner, "scatter=owner (corners bucketed by row)"}}) {
    msda::Options o{threads};
    o.tuning.scatter = scatter;
    variant(name, o);
  }
#if defined(__aarch64__)
  for (msda::Isa isa : {msda::Isa::neon, msda::Isa::baseline}) {
#else
  for (msda::Isa isa : {msda::Isa::avx2, msda::Isa::baseline}) {
#endif
    msda::Options o{threads};
    o.isa = isa;
    variant("isa=" + std::string(msda::name(isa)), o);
  }

  if (!only.empty()) {
    std::vector<std::string> wanted;  // the |-separated texts of --only
    for (std::size_t at = 0, bar; at <= only.size(); at = bar + 1) {
      bar = std::min(only.find('|', at), only.size());
      wanted.push_back(only.substr(at, bar - at));
    }
    rows.erase(std::remove_if(rows.begin(), rows.end(),
                              [&](const Row& row) {
                                return std::none_of(wanted.begin(), wanted.end(), [&](const std::string& text) {
                                  return !text.empty() && row.name.find(text) != std::string::npos;
                                });
                              }),
               rows.end());
  }
  for (Row& row : rows) {  // a warm-up each; a variant this machine cannot run is dropped
    try {
      row.forward();
      if (row.backward) row.backward();
    } catch (const msda::Error&) {
      row.forward = nullptr;
    }
  }
  for (int r = 0; r < repeats; ++r)
    for (Row& row : rows) {
      if (!row.forward) continue;
      row.forward_ms.push_back(median_ms(1, row.forward, 0));
      if (row.backward) row.backward_ms.push_back(median_ms(1, row.backward, 0));
    }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::printf("| variant | forward ms | backward ms |\n|---|---:|---:|\n");
  for (const Row& row : rows) {
    if (!row.forward) {
      std::printf("| %s | n/a | n/a |\n", row.name.c_str());
    } else if (row.backward_ms.empty()) {
      std::printf("| %s | %.2f | |\n", row.name.c_str(), median(row.forward_ms));
    } else {
      std::printf("| %s | %.2f | %.2f |\n", row.name.c_str(), median(row.forward_ms), median(row.backward_ms));
    }
  }
  // Issue 24's ratios, from the rows above where they were timed: the default backward against
  // the default forward and against the two backward floors (which one applies depends on how
  // sparse the workload's rows are: each corner's rows for encoders, each touched row for decoders).
  // A timed row's median: the row named `name`, or the first whose name starts with it (`prefix`).
  auto median_of = [&](const std::string& name, bool prefix, bool forward_column) {
    for (const Row& row : rows)
      if (row.forward && (prefix ? row.name.rfind(name, 0) == 0 : row.name == name)) {
        const std::vector<double>& ms = forward_column ? row.forward_ms : row.backward_ms;
        return ms.empty() ? 0.0 : median(ms);
      }
    return 0.0;
  };
  const double forward = median_of("default", false, true), backward = median_of("default", false, false);
  const double floor_every = median_of("backward floor:", true, false);
  const double floor_sparse = median_of("backward floor, sparse", true, false);
  if (forward > 0 && backward > 0) {
    std::printf("\nbackward / forward (default rows): %.2f", backward / forward);
    if (floor_every > 0) std::printf("; backward / floor: %.2f", backward / floor_every);
    if (floor_sparse > 0) std::printf("; backward / sparse floor: %.2f", backward / floor_sparse);
    std::printf("\n");
  }
  (void)sink;
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "msda_ablation: %s\n", e.what());
  return 2;
}
