#include "test_cuda_emulated_support.h"

#include <cmath>
#include <limits>
#include <random>
#include <sstream>

namespace msda_test {

namespace emulated = msda::cuda_emulation;

msda::Params with_inputs(const msda::Problem& pr, const Tensors& t, const Run& how) {
  msda::Params p = emulated::params_for(pr);
  p.value = t.value.data();
  p.locations = t.locations.data();
  p.weights = t.weights.data();
  p.cuda.deterministic = how.deterministic;
  p.cuda.workspace = how.workspace;
  p.cuda.workspace_bytes = how.workspace_bytes;
  p.cuda.stream = how.stream;
  return p;
}

void run_emulated(const msda::Problem& pr, const Tensors& t, Results& r, const Run& how) {
  r.poison();
  msda::Params forward = with_inputs(pr, t, how);
  forward.output = r.output.data();
  emulated::forward(forward);
  msda::Params backward = with_inputs(pr, t, how);
  backward.grad_output = t.grad_output.data();
  backward.grad_value = r.grad_value.data();
  backward.grad_locations = r.grad_locations.data();
  backward.grad_weights = r.grad_weights.data();
  emulated::backward(backward);
}

Results truth_of(const Case& c) {
  const msda::Problem f64 = as_f64(c.problem);
  Results truth(f64);
  msda::Options reference;
  reference.backend = msda::Backend::reference;
  run_all(f64, c.tensors.converted(DType::f64, DType::f64, DType::f64), truth, reference);
  return truth;
}

::testing::AssertionResult matches(const std::vector<double>& actual, const std::vector<double>& expected,
                                   double tol) {
  if (actual.size() != expected.size()) return close(actual, expected, tol);
  std::vector<double> finite_actual, finite_expected;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double a = actual[i], e = expected[i];
    if (std::isfinite(e) && std::isfinite(a)) {
      finite_actual.push_back(a);
      finite_expected.push_back(e);
    } else if (!(std::isnan(a) && std::isnan(e)) && a != e) {
      return ::testing::AssertionFailure() << "element " << i << ": " << a << ", the reference's " << e;
    }
  }
  return close(finite_actual, finite_expected, tol);
}

void expect_matches_reference(const Case& c, const Results& got) {
  const Results truth = truth_of(c);
  // Each result to the bound of its own dtype (an f32 gradient of an f64 problem to f32's).
  for (auto [member, name] : {std::pair{&Results::output, "output"}, std::pair{&Results::grad_value, "grad_value"},
                              std::pair{&Results::grad_locations, "grad_locations"},
                              std::pair{&Results::grad_weights, "grad_weights"}}) {
    const Buffer& g = got.*member;
    EXPECT_TRUE(matches(g.to_double(), (truth.*member).to_double(), tolerance(g.dtype()))) << name;
  }
  EXPECT_TRUE(got.guards_intact()) << "a result was written outside its buffer";
}

void expect_both_grad_values_match(const Case& c) {
  for (bool deterministic : {true, false}) {
    SCOPED_TRACE(deterministic ? "deterministic" : "atomic");
    Results got(c.problem);
    run_emulated(c.problem, c.tensors, got, {.deterministic = deterministic});
    expect_matches_reference(c, got);
  }
}

// ---- the fused op ----


const char* name(Draw d) {
  switch (d) {
    case Draw::local: return "local";
    case Draw::nonfinite: return "nonfinite";
    case Draw::boundaries: return "boundaries";
  }
  return "?";
}

std::int64_t reference_size(const msda::Problem& p) {
  return p.batch * p.queries * p.num_levels() * p.reference_coords;
}

FusedCase make_fused_case(const Shape& shape, std::int64_t coords, double offset_scale, const FusedDTypes& d,
                          Draw draw, std::uint64_t seed) {
  FusedCase c;
  c.problem = make_problem(shape, {d.value, d.offset, d.logit});
  c.problem.reference_coords = coords;
  c.problem.reference_dtype = d.reference;
  c.problem.offset_scale = offset_scale;
  const msda::Problem& p = c.problem;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0), sym(-1.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  const double inf = std::numeric_limits<double>::infinity();
  const std::int64_t L = p.num_levels(), K = p.total_points();
  const bool nonfinite = draw == Draw::nonfinite;
  auto special = [&] {
    const double values[] = {std::numeric_limits<double>::quiet_NaN(), inf, -inf, 1e30, -1e30};
    return values[std::uniform_int_distribution<int>(0, 4)(rng)];
  };
  auto pixel_centre = [&](std::int64_t size) {
    return (static_cast<double>(std::uniform_int_distribution<std::int64_t>(0, size - 1)(rng)) + 0.5) /
           static_cast<double>(size);
  };

  c.value = Buffer(d.value, value_size(p));
  for (std::int64_t i = 0; i < c.value.size(); ++i) c.value.set(i, sym(rng));

  c.reference = Buffer(d.reference, reference_size(p));
  for (std::int64_t i = 0; i < c.reference.size(); i += coords) {
    const msda::Level& level = p.levels[static_cast<std::size_t>(i / coords % L)];
    c.reference.set(i, draw == Draw::boundaries ? pixel_centre(level.width) : unit(rng));
    c.reference.set(i + 1, draw == Draw::boundaries ? pixel_centre(level.height) : unit(rng));
    if (coords == 4) {
      c.reference.set(i + 2, 0.05 + 0.6 * unit(rng));
      c.reference.set(i + 3, 0.05 + 0.6 * unit(rng));
      if (nonfinite && unit(rng) < 0.05) c.reference.set(i + 2 + (unit(rng) < 0.5), inf);
    }
  }

  c.offsets = Buffer(d.offset, location_size(p));
  std::int64_t sample = 0;
  for (std::int64_t head = 0; head < p.batch * p.queries * p.heads; ++head)
    for (std::int64_t l = 0; l < L; ++l)
      for (std::int64_t pt = 0; pt < p.points_of(l); ++pt, ++sample)
        for (std::int64_t k = 0; k < 2; ++k) {
          double o;
          if (draw == Draw::boundaries)
            o = static_cast<double>(std::uniform_int_distribution<int>(-3, 3)(rng));
          else if (coords == 2)  // pixels of the level
            o = 4.0 * sym(rng);
          else  // loc = centre + o / P_l * size * offset_scale: about the box, whatever P_l
            o = 1.2 * static_cast<double>(p.points_of(l)) * sym(rng);
          if (nonfinite && unit(rng) < 0.1) o = special();
          c.offsets.set(2 * sample + k, o);
        }

  c.logits = Buffer(d.logit, weight_size(p));
  for (std::int64_t i = 0; i < c.logits.size(); ++i) {
    // Every row (one softmax over K) keeps its first logit finite: a row of -inf is a row of NaN.
    const bool row_start = i % K == 0;
    c.logits.set(i, nonfinite && !row_start && unit(rng) < 0.15 ? -inf : 1.5 * normal(rng));
  }

  c.grad_output = Buffer(d.value, output_size(p));
  for (std::int64_t i = 0; i < c.grad_output.size(); ++i) c.grad_output.set(i, sym(rng));

  std::ostringstream os;
  os << "seed=" << seed << " " << describe(p) << " coords=" << coords << " offset_scale=" << offset_scale
     << " reference_dtype=" << msda::name(d.reference) << " draw=" << name(draw);
  c.label = os.str();
  return c;
}

FusedResults::FusedResults(const msda::Problem& p)
    : output(p.value_dtype, output_size(p)),
      grad_value(p.value_dtype, value_size(p)),
      grad_reference(p.reference_dtype, reference_size(p)),
      grad_offsets(p.location_dtype, location_size(p)),
      grad_logits(p.weight_dtype, weight_size(p)) {}

void FusedResults::poison() {
  for (Buffer* b : {&output, &grad_value, &grad_reference, &grad_offsets, &grad_logits}) b->poison();
}

const char* const kFusedResultNames[5] = {"output", "grad_value", "grad_reference_points", "grad_sampling_offsets",
                                          "grad_attention_logits"};

FusedResults fused_truth_of(const FusedCase& c) {
  msda::Problem p = c.problem;
  p.value_dtype = p.reference_dtype = p.location_dtype = p.weight_dtype = DType::f64;
  const Buffer value = c.value.converted(DType::f64), reference = c.reference.converted(DType::f64),
               offsets = c.offsets.converted(DType::f64), logits = c.logits.converted(DType::f64),
               grad_output = c.grad_output.converted(DType::f64);
  const msda::FusedInputs inputs{value.data(), reference.data(), offsets.data(), logits.data()};
  FusedResults truth(p);
  truth.poison();
  msda::Options reference_backend;
  reference_backend.backend = msda::Backend::reference;
  msda::forward_fused(p, inputs, truth.output.data(), reference_backend);
  msda::backward_fused(p, inputs, grad_output.data(),
                       {truth.grad_value.data(), truth.grad_reference.data(), truth.grad_offsets.data(),
                        truth.grad_logits.data()},
                       reference_backend);
  return truth;
}

void run_fused_emulated(const FusedCase& c, FusedResults& r, const Run& how) {
  r.poison();
  msda::Params p = emulated::params_for(c.problem);
  p.fused = true;
  p.cuda.deterministic = how.deterministic;
  p.cuda.workspace = how.workspace;
  p.cuda.workspace_bytes = how.workspace_bytes;
  p.cuda.stream = how.stream;
  p.value = c.value.data();
  p.reference_points = c.reference.data();
  p.locations = c.offsets.data();
  p.weights = c.logits.data();
  msda::Params forward = p;
  forward.output = r.output.data();
  emulated::forward(forward);
  p.grad_output = c.grad_output.data();
  p.grad_value = r.grad_value.data();
  p.grad_reference_points = r.grad_reference.data();
  p.grad_offsets = r.grad_offsets.data();
  p.grad_logits = r.grad_logits.data();
  emulated::backward(p);
}

void expect_fused_matches_reference(const FusedCase& c, const FusedResults& got, bool strict) {
  const FusedResults truth = fused_truth_of(c);
  const auto g = got.all(), t = truth.all();
  for (std::size_t k = 0; k < g.size(); ++k) {
    const std::vector<double> actual = g[k]->to_double(), expected = t[k]->to_double();
    const double tol = tolerance(g[k]->dtype());
    EXPECT_TRUE(strict ? close(actual, expected, tol) : matches(actual, expected, tol)) << kFusedResultNames[k];
  }
  for (const Buffer* b : g) EXPECT_TRUE(b->guards_intact()) << "a result was written outside its buffer";
}

}  // namespace msda_test
