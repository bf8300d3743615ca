// The public entry points: problem -> checks -> backend. Nothing here computes.
#include <omp.h>

#include <cstring>

#include "cpu/cpu.h"
#include "msda/msda.h"
#include "params.h"
#include "reference/reference.h"

namespace msda {
namespace {

int resolve_threads(int requested) {
  if (requested < 0) throw Error("options.threads", ">= 0 (0 = OpenMP's default)", std::to_string(requested));
  return requested > 0 ? requested : std::max(1, omp_get_max_threads());
}

Backend resolve_backend(Backend requested) {
  switch (requested) {
    case Backend::automatic:
    case Backend::cpu: return Backend::cpu;
    case Backend::reference: return Backend::reference;
  }
  throw Error("options.backend", "automatic, reference or cpu",
              std::to_string(static_cast<int>(requested)));
}

// A tensor with elements needs memory behind it; an empty one may be null.
void require_pointer(const void* pointer, std::int64_t elements, const char* argument) {
  if (pointer == nullptr && elements > 0)
    throw Error(argument, "a pointer to " + std::to_string(elements) + " elements", "nullptr");
}

struct Counts {
  std::int64_t value, samples, output;
};

Counts counts(const Problem& p) {
  return {p.batch * p.value_len * p.heads * p.channels, p.batch * p.queries * p.heads * p.num_levels() * p.points,
          p.batch * p.queries * p.heads * p.channels};
}

// Problem -> checks -> Params: everything the two entry points share. Nothing is touched before
// every check has passed.
Params prepare(const Problem& problem, const Inputs& inputs, const Options& options) {
  validate(problem);
  const Counts n = counts(problem);
  require_pointer(inputs.value, n.value, "value");
  require_pointer(inputs.sampling_locations, 2 * n.samples, "sampling_locations");
  require_pointer(inputs.attention_weights, n.samples, "attention_weights");
  if (options.tuning.query_block < 0)
    throw Error("options.tuning.query_block", ">= 0 (0 = the default)", std::to_string(options.tuning.query_block));
  if (options.tuning.accumulator_budget < 0)
    throw Error("options.tuning.accumulator_budget", ">= 0 bytes (0 = the default)",
                std::to_string(options.tuning.accumulator_budget));

  Params params;
  params.problem = &problem;
  params.N = problem.batch;
  params.S = problem.value_len;
  params.M = problem.heads;
  params.D = problem.channels;
  params.Q = problem.queries;
  params.L = problem.num_levels();
  params.P = problem.points;
  params.level_start = level_starts(problem.levels);
  for (const Level& level : problem.levels) {
    params.height.push_back(level.height);
    params.width.push_back(level.width);
    params.height_f.push_back(static_cast<double>(level.height));
    params.width_f.push_back(static_cast<double>(level.width));
    params.padded_start.push_back(params.padded_rows);
    params.padded_rows += (level.height + 2) * (level.width + 2);
  }
  params.location_bytes = size_of(problem.location_dtype);
  params.weight_bytes = size_of(problem.weight_dtype);
  params.value = inputs.value;
  params.locations = inputs.sampling_locations;
  params.weights = inputs.attention_weights;

  params.threads = resolve_threads(options.threads);
  params.backend = resolve_backend(options.backend);
  params.isa = options.isa;
  if (options.tuning.query_block > 0) params.query_block = options.tuning.query_block;
  params.stage_value = options.tuning.stage_value;
  params.level_parts = options.tuning.level_parts;
  if (options.tuning.accumulator_budget > 0) params.accumulator_budget = options.tuning.accumulator_budget;
  return params;
}

}  // namespace

void forward(const Problem& problem, const Inputs& inputs, void* output, const Options& options) {
  Params params = prepare(problem, inputs, options);
  const Counts n = counts(problem);
  require_pointer(output, n.output, "output");
  if (n.output == 0) return;
  params.output = output;
  switch (params.backend) {
    case Backend::reference: return reference::forward(params);
    default: return cpu::forward(params);
  }
}

void backward(const Problem& problem, const Inputs& inputs, const void* grad_output, const Gradients& gradients,
              const Options& options) {
  Params params = prepare(problem, inputs, options);
  const Counts n = counts(problem);
  require_pointer(grad_output, n.output, "grad_output");
  if (n.samples == 0) {
    // No sample (N or Q or M is 0): grad_value is all zeros (the bits of +0.0 in every dtype)
    // and there are no location or weight gradients. Returning here also keeps per-sample
    // scratch sizes (which scale with L*P) from being computed for a P that only an empty
    // tensor can have.
    if (gradients.value && n.value > 0)
      std::memset(gradients.value, 0, static_cast<std::size_t>(n.value) * size_of(problem.value_dtype));
    return;
  }
  params.grad_output = grad_output;
  params.grad_value = gradients.value;
  params.grad_locations = gradients.sampling_locations;
  params.grad_weights = gradients.attention_weights;
  switch (params.backend) {
    case Backend::reference: return reference::backward(params);
    default: return cpu::backward(params);
  }
}

}  // namespace msda
