// The CPU backend's techniques switched one at a time, against the gather floor, on one of
// SPEC's workloads: what each technique buys, measured in one run (medians of --repeats).
//
//   msda_ablation [--workload ddetr-enc] [--locations encoder|decoder|random] [--dtype f32|bf16]
//                 [--threads 2] [--repeats 7]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "msda/msda.h"
#include "workloads.h"

namespace {

using Clock = std::chrono::steady_clock;

double median_ms(int repeats, const std::function<void()>& f) {
  f();  // warm-up: page faults, caches
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    const auto start = Clock::now();
    f();
    times.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// The gather floor: for every sample, in the forward kernel's order (blocks of queries, one head
// at a time), load exactly the in-range corner rows it loads and add them to a running sum, with
// no geometry and no weights. The row offsets are computed before timing.
struct GatherFloor {
  std::vector<std::vector<std::int64_t>> rows_per_job;  // element offsets into value
  std::int64_t D;

  GatherFloor(const msda::Problem& p, const std::vector<double>& loc, std::int64_t block) : D(p.channels) {
    const std::int64_t L = p.num_levels(), blocks = (p.queries + block - 1) / block;
    const std::vector<std::int64_t> starts = msda::level_starts(p.levels);
    rows_per_job.resize(static_cast<std::size_t>(p.batch * blocks));
    for (std::int64_t job = 0; job < p.batch * blocks; ++job) {
      const std::int64_t n = job / blocks, q0 = job % blocks * block, q1 = std::min(q0 + block, p.queries);
      auto& rows = rows_per_job[job];
      for (std::int64_t m = 0; m < p.heads; ++m)
        for (std::int64_t q = q0; q < q1; ++q)
          for (std::int64_t l = 0; l < L; ++l)
            for (std::int64_t pt = 0; pt < p.points; ++pt) {
              const std::int64_t i = (((n * p.queries + q) * p.heads + m) * L + l) * p.points + pt;
              const std::int64_t H = p.levels[l].height, W = p.levels[l].width;
              const double u = loc[2 * i] * W - 0.5, v = loc[2 * i + 1] * H - 0.5;
              if (!(v > -1 && u > -1 && v < H && u < W)) continue;
              const auto h0 = static_cast<std::int64_t>(std::floor(v)), w0 = static_cast<std::int64_t>(std::floor(u));
              for (std::int64_t h = h0; h <= h0 + 1; ++h)
                for (std::int64_t w = w0; w <= w0 + 1; ++w)
                  if (h >= 0 && h < H && w >= 0 && w < W)
                    rows.push_back(((n * p.value_len + starts[l] + h * W + w) * p.heads + m) * D);
            }
    }
  }

  // Summed in registers when D is known at compile time, as the kernels do.
  template <int kD>
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static float sum_rows(
      const float* value, const std::int64_t* rows, std::size_t count, std::int64_t D) {
    constexpr int kMax = kD > 0 ? kD : 1024;
    float acc[kMax] = {};
    const std::int64_t n = kD > 0 ? kD : D;
    for (std::size_t r = 0; r < count; ++r) {
      const float* row = value + rows[r];
      for (std::int64_t d = 0; d < n; ++d) acc[d] += row[d];
    }
    float total = 0;
    for (std::int64_t d = 0; d < n; ++d) total += acc[d];
    return total;
  }

  float sum_job(const float* value, std::size_t job) const {
    const auto& rows = rows_per_job[job];
    if (D == 32) return sum_rows<32>(value, rows.data(), rows.size(), D);
    if (D == 64) return sum_rows<64>(value, rows.data(), rows.size(), D);
    return sum_rows<0>(value, rows.data(), rows.size(), std::min<std::int64_t>(D, 1024));
  }

  float run(const float* value, int threads) const {
    float total = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (std::size_t job = 0; job < rows_per_job.size(); ++job)
      total += sum_job(value, job);
    return total;
  }
};

}  // namespace

int main(int argc, char** argv) try {
  std::string workload_name = "ddetr-enc", locations_name;
  int threads = 2, repeats = 7;
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
    else throw std::invalid_argument("unknown argument " + arg);
  }
  const auto& workload = msda::workloads::find(workload_name);
  const auto kind = locations_name.empty() ? workload.locations : msda::workloads::parse_locations(locations_name);
  msda::Problem p = workload.problem;
  const auto data = msda::workloads::generate(p, kind, 11);
  const std::int64_t L = p.num_levels(), samples = p.batch * p.queries * p.heads * L * p.points;
  const std::int64_t out_n = p.batch * p.queries * p.heads * p.channels;
  std::vector<float> out(out_n), grad_out(out_n, 1.0f), gv(p.batch * p.value_len * p.heads * p.channels),
      gl(2 * samples), gw(samples);

  std::printf("ablation: %s, %s locations, f32, %d threads, median of %d\n\n", workload.name.c_str(),
              std::string(msda::workloads::name(kind)).c_str(), threads, repeats);
  std::printf("| variant | forward ms | backward ms |\n|---|---:|---:|\n");

  const GatherFloor floor(p, msda::workloads::to_double(data.locations.data(), p.location_dtype, 2 * samples), 64);
  const auto* value = reinterpret_cast<const float*>(data.value.data());
  volatile float sink = 0;
  std::printf("| gather floor (same rows, running sum) | %.2f | |\n",
              median_ms(repeats, [&] { sink = floor.run(value, threads); }));

  struct Variant {
    std::string name;
    msda::Options options;
  };
  std::vector<Variant> variants = {{"default", {threads}}};
  for (std::int64_t block : {1, 16, 64, 256, 1024}) {
    msda::Options o{threads};
    o.tuning.query_block = block;
    variants.push_back({"query_block=" + std::to_string(block) + (block == 1 ? " (all heads per query)" : ""), o});
  }
  for (msda::Isa isa : {msda::Isa::avx2, msda::Isa::baseline}) {
    msda::Options o{threads};
    o.isa = isa;
    variants.push_back({"isa=" + std::string(msda::name(isa)), o});
  }
  for (const Variant& v : variants) {
    double f = 0, b = 0;
    try {
      f = median_ms(repeats, [&] { msda::forward(p, data.inputs(), out.data(), v.options); });
      b = median_ms(repeats, [&] {
        msda::backward(p, data.inputs(), grad_out.data(), {gv.data(), gl.data(), gw.data()}, v.options);
      });
    } catch (const msda::Error& e) {
      std::printf("| %s | n/a | n/a |\n", v.name.c_str());
      continue;
    }
    std::printf("| %s | %.2f | %.2f |\n", v.name.c_str(), f, b);
  }
  (void)sink;
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "msda_ablation: %s\n", e.what());
  return 2;
}
