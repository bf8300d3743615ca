// The public entry points: problem -> checks -> backend. Nothing here computes.
#include <omp.h>

#include <cstring>

#include "cpu/cpu.h"
#include "cuda/cuda.h"
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
    case Backend::cuda:
      if (!cuda::built())
        throw Error("options.backend", "a backend this build has (msda was built without CUDA: CMake found no nvcc)",
                    "cuda");
      return Backend::cuda;
  }
  throw Error("options.backend", "automatic, reference, cpu or cuda",
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
  return {p.batch * p.value_len * p.heads * p.channels, p.batch * p.queries * p.heads * p.total_points(),
          p.batch * p.queries * p.heads * p.channels};
}

void check_tuning(const Options& options) {
  if (options.tuning.query_block < 0)
    throw Error("options.tuning.query_block", ">= 0 (0 = the default)", std::to_string(options.tuning.query_block));
  if (options.tuning.query_stripe < 0)
    throw Error("options.tuning.query_stripe", ">= 0 image rows (0 = the default)", std::to_string(options.tuning.query_stripe));
  if (options.tuning.accumulator_budget < 0)
    throw Error("options.tuning.accumulator_budget", ">= 0 bytes (0 = the default)",
                std::to_string(options.tuning.accumulator_budget));
  if (static_cast<unsigned>(options.tuning.scatter) > static_cast<unsigned>(CpuTuning::Scatter::owner))
    throw Error("options.tuning.scatter", "automatic (0), copy (1), in_place (2) or owner (3)",
                std::to_string(static_cast<unsigned>(options.tuning.scatter)));
  if (static_cast<unsigned>(options.tuning.staging) > static_cast<unsigned>(CpuTuning::Staging::direct))
    throw Error("options.tuning.staging", "automatic (0), copy (1) or direct (2)",
                std::to_string(static_cast<unsigned>(options.tuning.staging)));
}

}  // namespace

// Validated problem -> Params: everything the entry points share. Pointers are the per-sample
// tensors' (sampling_locations and attention_weights, or the fused op's offsets and logits).
Params make_params(const Problem& problem, const void* value, const void* locations, const void* weights,
                   const Options& options) {
  Params params;
  params.problem = &problem;
  params.N = problem.batch;
  params.S = problem.value_len;
  params.M = problem.heads;
  params.D = problem.channels;
  params.Q = problem.queries;
  params.L = problem.num_levels();
  params.K = problem.total_points();
  params.point_start.push_back(0);
  for (std::int64_t l = 0; l < params.L; ++l) {
    params.points.push_back(problem.points_of(l));
    params.point_start.push_back(params.point_start.back() + params.points.back());
  }
  params.discrete = problem.sampling == Sampling::discrete;
  params.offset_scale = problem.offset_scale;
  params.level_start = level_starts(problem.levels);
  for (const Level& level : problem.levels) {
    params.height.push_back(level.height);
    params.width.push_back(level.width);
    params.height_f.push_back(static_cast<double>(level.height));
    params.width_f.push_back(static_cast<double>(level.width));
  }
  params.location_bytes = size_of(problem.location_dtype);
  params.weight_bytes = size_of(problem.weight_dtype);
  params.value = value;
  params.locations = locations;
  params.weights = weights;

  params.threads = resolve_threads(options.threads);
  params.backend = resolve_backend(options.backend);
  params.isa = options.isa;
  if (options.tuning.query_block > 0) params.query_block = options.tuning.query_block;
  params.staging = options.tuning.staging;
  params.level_parts = options.tuning.level_parts;
  if (options.tuning.query_stripe > 0) params.query_stripe = options.tuning.query_stripe;
  if (options.tuning.accumulator_budget > 0) params.accumulator_budget = options.tuning.accumulator_budget;
  params.scatter = options.tuning.scatter;
  params.cuda = options.cuda;
  return params;
}

namespace {

// Problem -> checks -> Params for the plain op. Nothing is touched before every check has passed.
Params prepare(const Problem& problem, const Inputs& inputs, const Options& options) {
  validate(problem);
  const Counts n = counts(problem);
  require_pointer(inputs.value, n.value, "value");
  require_pointer(inputs.sampling_locations, 2 * n.samples, "sampling_locations");
  require_pointer(inputs.attention_weights, n.samples, "attention_weights");
  check_tuning(options);
  return make_params(problem, inputs.value, inputs.sampling_locations, inputs.attention_weights, options);
}

// The same for the fused op.
Params prepare_fused(const Problem& problem, const FusedInputs& inputs, const Options& options) {
  validate_fused(problem);
  const Counts n = counts(problem);
  require_pointer(inputs.value, n.value, "value");
  require_pointer(inputs.reference_points, problem.batch * problem.queries * problem.num_levels() * problem.reference_coords,
                  "reference_points");
  require_pointer(inputs.sampling_offsets, 2 * n.samples, "sampling_offsets");
  require_pointer(inputs.attention_logits, n.samples, "attention_logits");
  check_tuning(options);
  Params params = make_params(problem, inputs.value, inputs.sampling_offsets, inputs.attention_logits, options);
  params.fused = true;
  params.reference_points = inputs.reference_points;
  params.reference_coords = problem.reference_coords;
  params.reference_dtype = problem.reference_dtype;
  return params;
}

// Zeros of a gradient, where the backend keeps its memory.
void zero(const Params& params, void* pointer, std::size_t bytes) {
  if (params.backend == Backend::cuda) return cuda::fill_zeros(params, pointer, bytes);
  std::memset(pointer, 0, bytes);
}

}  // namespace

bool cuda_built() noexcept { return cuda::built(); }
bool cuda_available() noexcept { return cuda::available(); }
bool cuda_stream_capturing(void* stream) noexcept { return cuda::stream_capturing(stream); }

namespace {

// A call's cuda workspace: `set_gradients` marks in Params the gradients a backward computes
// (only whether each pointer is null matters).
template <class SetGradients>
std::size_t cuda_workspace(const Problem& problem, bool fused, bool backward, const Options& options,
                           SetGradients set_gradients) {
  if (fused)
    validate_fused(problem);
  else
    validate(problem);
  check_tuning(options);
  Params params = make_params(problem, nullptr, nullptr, nullptr, options);
  if (params.backend != Backend::cuda) return 0;
  // Empty problems launch nothing (forward and backward return before the backend).
  const Counts n = counts(problem);
  if ((backward ? n.samples : n.output) == 0) return 0;
  params.fused = fused;
  params.reference_coords = problem.reference_coords;
  params.reference_dtype = problem.reference_dtype;
  set_gradients(params);
  return cuda::workspace_size(params, backward);
}

// The caller's gradient pointers into Params (null: not wanted): for the calls and for sizing them.
void set_plain_gradients(Params& p, const Gradients& wanted) {
  p.grad_value = wanted.value;
  p.grad_locations = wanted.sampling_locations;
  p.grad_weights = wanted.attention_weights;
}

void set_fused_gradients(Params& p, const FusedGradients& wanted) {
  p.grad_value = wanted.value;
  p.grad_reference_points = wanted.reference_points;
  p.grad_offsets = wanted.sampling_offsets;
  p.grad_logits = wanted.attention_logits;
}

char every_gradient;  // a non-null stand-in: "wanted"

}  // namespace

std::size_t workspace_size(const Problem& problem, Pass pass, const Options& options) {
  void* all = &every_gradient;
  switch (pass) {
    case Pass::backward: return workspace_size(problem, Gradients{all, all, all}, options);
    case Pass::backward_fused: return workspace_size(problem, FusedGradients{all, all, all, all}, options);
    case Pass::forward_fused: return cuda_workspace(problem, true, false, options, [](Params&) {});
    case Pass::forward: break;
  }
  return cuda_workspace(problem, false, false, options, [](Params&) {});
}

std::size_t workspace_size(const Problem& problem, const Gradients& wanted, const Options& options) {
  return cuda_workspace(problem, false, true, options, [&](Params& p) { set_plain_gradients(p, wanted); });
}

std::size_t workspace_size(const Problem& problem, const FusedGradients& wanted, const Options& options) {
  return cuda_workspace(problem, true, true, options, [&](Params& p) { set_fused_gradients(p, wanted); });
}

void forward(const Problem& problem, const Inputs& inputs, void* output, const Options& options) {
  Params params = prepare(problem, inputs, options);
  const Counts n = counts(problem);
  require_pointer(output, n.output, "output");
  if (n.output == 0) return;
  params.output = output;
  switch (params.backend) {
    case Backend::reference: return reference::forward(params);
    case Backend::cuda: return cuda::forward(params);
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
    // scratch sizes (which scale with K) from being computed for a K that only an empty
    // tensor can have.
    if (gradients.value && n.value > 0)
      zero(params, gradients.value, static_cast<std::size_t>(n.value) * size_of(problem.value_dtype));
    return;
  }
  params.grad_output = grad_output;
  set_plain_gradients(params, gradients);
  switch (params.backend) {
    case Backend::reference: return reference::backward(params);
    case Backend::cuda: return cuda::backward(params);
    default: return cpu::backward(params);
  }
}

void forward_fused(const Problem& problem, const FusedInputs& inputs, void* output, const Options& options) {
  Params params = prepare_fused(problem, inputs, options);
  const Counts n = counts(problem);
  require_pointer(output, n.output, "output");
  if (n.output == 0) return;
  params.output = output;
  switch (params.backend) {
    case Backend::reference: return reference::forward_fused(params);
    case Backend::cuda: return cuda::forward(params);  // the kernels see params.fused
    default: return cpu::forward(params);  // the kernels' loads see params.fused
  }
}

void backward_fused(const Problem& problem, const FusedInputs& inputs, const void* grad_output,
                    const FusedGradients& gradients, const Options& options) {
  Params params = prepare_fused(problem, inputs, options);
  const Counts n = counts(problem);
  require_pointer(grad_output, n.output, "grad_output");
  if (n.samples == 0) {
    // As in backward(): no sample (N, Q or M is 0), so grad_value is zeros and the offsets and
    // logits are empty. reference_points is empty too unless only M is 0: then no sample moves
    // it, and its gradient is zeros.
    if (gradients.value && n.value > 0)
      zero(params, gradients.value, static_cast<std::size_t>(n.value) * size_of(problem.value_dtype));
    const std::int64_t refs = problem.batch * problem.queries * problem.num_levels() * problem.reference_coords;
    if (gradients.reference_points && refs > 0)
      zero(params, gradients.reference_points, static_cast<std::size_t>(refs) * size_of(problem.reference_dtype));
    return;
  }
  params.grad_output = grad_output;
  set_fused_gradients(params, gradients);
  switch (params.backend) {
    case Backend::reference: return reference::backward_fused(params);
    case Backend::cuda: return cuda::backward(params);
    default: return cpu::backward_fused(params);
  }
}

}  // namespace msda
