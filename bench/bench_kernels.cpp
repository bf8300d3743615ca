// Google Benchmark over SPEC's named workloads: forward and backward of each backend, f32 and
// bf16 values, at 1 and 2 threads. Quick smoke run: msda_bench --benchmark_min_time=0.01
#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "msda/msda.h"
#include "workloads.h"

namespace {

// Inputs and outputs of one (workload, dtype), generated once and shared by its benchmarks.
struct Case {
  msda::Problem problem;
  msda::workloads::Data data;
  std::vector<std::byte> out, grad_out, grad_value, grad_loc, grad_weight;
};

Case& get_case(const std::string& workload, msda::DType dtype) {
  static std::map<std::pair<std::string, msda::DType>, std::unique_ptr<Case>> cache;
  auto& slot = cache[{workload, dtype}];
  if (!slot) {
    const auto& w = msda::workloads::find(workload);
    auto c = std::make_unique<Case>();
    c->problem = w.problem;
    c->problem.value_dtype = dtype;
    c->data = msda::workloads::generate(c->problem, w.locations, 7);
    const auto& p = c->problem;
    const std::int64_t samples = p.batch * p.queries * p.heads * p.num_levels() * p.points;
    const std::size_t vs = msda::size_of(dtype);
    c->out.resize(p.batch * p.queries * p.heads * p.channels * vs);
    c->grad_out = c->data.value;  // any finite data of the right size will do
    c->grad_out.resize(c->out.size());
    c->grad_value.resize(p.batch * p.value_len * p.heads * p.channels * vs);
    c->grad_loc.resize(2 * samples * 4);
    c->grad_weight.resize(samples * 4);
    slot = std::move(c);
  }
  return *slot;
}

void register_all() {
  for (const auto& w : msda::workloads::named()) {
    for (msda::DType dtype : {msda::DType::f32, msda::DType::bf16}) {
      for (msda::Backend backend : {msda::Backend::cpu}) {
        for (int threads : {1, 2}) {
          const std::string suffix = w.name + "/" + std::string(msda::name(dtype)) + "/" +
                                     std::string(msda::name(backend)) + "/threads:" + std::to_string(threads);
          const std::string name = w.name;
          benchmark::RegisterBenchmark(("forward/" + suffix).c_str(), [=](benchmark::State& state) {
            Case& c = get_case(name, dtype);
            for (auto _ : state) msda::forward(c.problem, c.data.inputs(), c.out.data(), {threads, backend});
          })->Unit(benchmark::kMillisecond)->UseRealTime();
          benchmark::RegisterBenchmark(("backward/" + suffix).c_str(), [=](benchmark::State& state) {
            Case& c = get_case(name, dtype);
            const msda::Gradients g{c.grad_value.data(), c.grad_loc.data(), c.grad_weight.data()};
            for (auto _ : state) msda::backward(c.problem, c.data.inputs(), c.grad_out.data(), g, {threads, backend});
          })->Unit(benchmark::kMillisecond)->UseRealTime();
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
