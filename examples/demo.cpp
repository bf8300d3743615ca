// Runs forward and backward of one of SPEC's named workloads (ddetr-enc by default) with the CPU
// backend, times them, and checks every result against the double-precision reference.
//
//   msda_demo [--workload NAME] [--locations encoder|decoder|random] [--dtype f32|bf16|f16|f64]
//             [--threads T] [--repeats R]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "msda/msda.h"
#include "workloads.h"

namespace {

using msda::workloads::median_ms;


msda::DType parse_dtype(const std::string& s) {
  for (msda::DType d : {msda::DType::f32, msda::DType::f64, msda::DType::bf16, msda::DType::f16})
    if (s == msda::name(d)) return d;
  throw std::invalid_argument("--dtype: expected f32, f64, bf16 or f16, got " + s);
}

}  // namespace

int main(int argc, char** argv) try {
  std::string workload_name = "ddetr-enc", locations_name;
  msda::DType dtype = msda::DType::f32;
  int threads = 0, repeats = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + ": expected a value");
      return argv[++i];
    };
    if (arg == "--workload") workload_name = next();
    else if (arg == "--locations") locations_name = next();
    else if (arg == "--dtype") dtype = parse_dtype(next());
    else if (arg == "--threads") threads = std::stoi(next());
    else if (arg == "--repeats") repeats = std::max(1, std::stoi(next()));
    else if (arg == "--help" || arg == "-h") {
      std::printf("usage: msda_demo [--workload NAME] [--locations encoder|decoder|random]\n"
                  "                 [--dtype f32|f64|bf16|f16] [--threads T] [--repeats R]\nworkloads:");
      for (const auto& w : msda::workloads::named()) std::printf(" %s", w.name.c_str());
      std::printf("\n");
      return 0;
    } else throw std::invalid_argument("unknown argument " + arg + " (try --help)");
  }

  const msda::workloads::Workload& workload = msda::workloads::find(workload_name);
  msda::Problem problem = workload.problem;
  problem.value_dtype = dtype;
  problem.location_dtype = problem.weight_dtype = dtype == msda::DType::f64 ? dtype : msda::DType::f32;
  const auto locations =
      locations_name.empty() ? workload.locations : msda::workloads::parse_locations(locations_name);
  const msda::workloads::Data data = msda::workloads::generate(problem, locations, 2024);

  const std::int64_t L = problem.num_levels();
  const std::int64_t out_n = problem.batch * problem.queries * problem.heads * problem.channels;
  const std::int64_t value_n = problem.batch * problem.value_len * problem.heads * problem.channels;
  const std::int64_t samples = problem.batch * problem.queries * problem.heads * L * problem.points;
  const std::size_t vsize = msda::size_of(problem.value_dtype);
  std::vector<std::byte> out(out_n * vsize), grad_out = msda::workloads::from_double(
                                                 std::vector<double>(out_n, 0.0), problem.value_dtype);
  {  // grad_output: a fixed pseudo-random pattern
    std::vector<double> g(out_n);
    for (std::int64_t i = 0; i < out_n; ++i) g[i] = std::sin(0.37 * static_cast<double>(i));
    grad_out = msda::workloads::from_double(g, problem.value_dtype);
  }
  std::vector<std::byte> gv(value_n * vsize), gl(2 * samples * msda::size_of(problem.location_dtype)),
      gw(samples * msda::size_of(problem.weight_dtype));
  const msda::Gradients grads{gv.data(), gl.data(), gw.data()};

  std::printf("msda demo: %s (%s), %s locations, value %s, N=%lld Q=%lld M=%lld D=%lld L=%lld P=%lld\n",
              workload.name.c_str(), workload.model.c_str(), std::string(msda::workloads::name(locations)).c_str(),
              std::string(msda::name(dtype)).c_str(), (long long)problem.batch, (long long)problem.queries,
              (long long)problem.heads, (long long)problem.channels, (long long)L, (long long)problem.points);

  msda::Options cpu{threads, msda::Backend::cpu}, ref{1, msda::Backend::reference};
  const double fwd_ms = median_ms(repeats, [&] { msda::forward(problem, data.inputs(), out.data(), cpu); });
  const double bwd_ms =
      median_ms(repeats, [&] { msda::backward(problem, data.inputs(), grad_out.data(), grads, cpu); });

  // The reference, in f64 on the same (already rounded) inputs.
  msda::Problem problem64 = problem;
  problem64.value_dtype = problem64.location_dtype = problem64.weight_dtype = msda::DType::f64;
  auto as64 = [](const std::vector<std::byte>& b, msda::DType t, std::int64_t n) {
    return msda::workloads::from_double(msda::workloads::to_double(b.data(), t, n), msda::DType::f64);
  };
  const auto v64 = as64(data.value, problem.value_dtype, value_n);
  const auto l64 = as64(data.locations, problem.location_dtype, 2 * samples);
  const auto w64 = as64(data.weights, problem.weight_dtype, samples);
  const auto g64 = as64(grad_out, problem.value_dtype, out_n);
  const msda::Inputs in64{v64.data(), l64.data(), w64.data()};
  std::vector<double> ref_out(out_n), ref_gv(value_n), ref_gl(2 * samples), ref_gw(samples);
  const double ref_fwd_ms = median_ms(1, [&] { msda::forward(problem64, in64, ref_out.data(), ref); }, 0);
  const double ref_bwd_ms = median_ms(
      1, [&] { msda::backward(problem64, in64, g64.data(), {ref_gv.data(), ref_gl.data(), ref_gw.data()}, ref); }, 0);

  using msda::workloads::relative_error, msda::workloads::to_double;
  const double e_out = relative_error(to_double(out.data(), problem.value_dtype, out_n), ref_out);
  const double e_gv = relative_error(to_double(gv.data(), problem.value_dtype, value_n), ref_gv);
  const double e_gl = relative_error(to_double(gl.data(), problem.location_dtype, 2 * samples), ref_gl);
  const double e_gw = relative_error(to_double(gw.data(), problem.weight_dtype, samples), ref_gw);
  const double bound = (dtype == msda::DType::bf16 || dtype == msda::DType::f16) ? 1e-2 : 1e-5;

  std::printf("\n| pass     | cpu (%s threads) ms | reference (1 thread) ms | speedup |\n",
              threads > 0 ? std::to_string(threads).c_str() : "all");
  std::printf("|----------|--------------------:|------------------------:|--------:|\n");
  std::printf("| forward  | %19.2f | %23.1f | %6.1fx |\n", fwd_ms, ref_fwd_ms, ref_fwd_ms / fwd_ms);
  std::printf("| backward | %19.2f | %23.1f | %6.1fx |\n", bwd_ms, ref_bwd_ms, ref_bwd_ms / bwd_ms);
  std::printf("\nrelative error vs the f64 reference (SPEC bound %.0e):\n", bound);
  std::printf("  output %.2e  grad_value %.2e  grad_sampling_locations %.2e  grad_attention_weights %.2e\n",
              e_out, e_gv, e_gl, e_gw);
  const bool ok = e_out < bound && e_gv < bound && e_gl < bound && e_gw < bound;
  std::printf("%s\n", ok ? "check: PASS" : "check: FAIL");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "msda_demo: %s\n", e.what());
  return 2;
}
