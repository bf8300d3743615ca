// Tensors -> msda::Problem -> the core library. Only what is about tensors is checked here
// (devices, dtypes that have no msda::DType, index tensors); every size rule is the core's.
#include "ops.h"

#include "host_indices.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <atomic>

#include <string>
#include <vector>

#include "msda/msda.h"

namespace msda::torch_ops {
namespace {

std::string str(const c10::ScalarType t) { return c10::toString(t); }

DType dtype_of(const at::Tensor& t, const char* argument) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: throw Error(argument, "a floating dtype (float32, float64, bfloat16 or float16)", str(t.scalar_type()));
  }
}

// Devices (all value's, and one msda has a kernel for) and the defined-ness of every tensor.
void check_devices(const at::Tensor& value, std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  for (const auto& [t, argument] : tensors) {
    if (!t->defined()) throw Error(argument, "a tensor", "None (an undefined tensor)");
    if (t->device() != value.device())
      throw Error(argument, "the device of value (" + value.device().str() + ")", t->device().str());
  }
  if (value.device().is_cuda() && !cuda_built())
    throw Error("value", "a CPU tensor (this msda was built without its CUDA backend: CMake found no nvcc)",
                value.device().str());
  if (!value.device().is_cpu() && !value.device().is_cuda())
    throw Error("value", "a CPU or CUDA tensor (msda has no kernel for this device)", value.device().str());
}

// The op's keyword options, as the core takes them.
std::vector<std::int64_t> points_of(at::OptionalIntArrayRef points) {
  return points.has_value() ? points->vec() : std::vector<std::int64_t>{};
}

Sampling sampling_of(c10::string_view sampling) {
  if (sampling == "bilinear") return Sampling::bilinear;
  if (sampling == "discrete") return Sampling::discrete;
  throw Error("sampling", "\"bilinear\" or \"discrete\"", "\"" + std::string(sampling) + "\"");
}

struct Prepared {
  Problem problem;
  at::Tensor value, locations, weights;
};

Prepared prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                 const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                 at::OptionalIntArrayRef points, c10::string_view sampling) {
  check_devices(value, {{&value, "value"},
                        {&spatial_shapes, "spatial_shapes"},
                        {&level_start_index, "level_start_index"},
                        {&sampling_locations, "sampling_locations"},
                        {&attention_weights, "attention_weights"}});
  const at::Tensor shapes = host_indices(spatial_shapes, "spatial_shapes");
  const at::Tensor starts = host_indices(level_start_index, "level_start_index");
  TensorSizes sizes{value.sizes().vec(), shapes.sizes().vec(), starts.sizes().vec(),
                    sampling_locations.sizes().vec(), attention_weights.sizes().vec()};
  Prepared p;
  p.problem = describe(sizes, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), dtype_of(value, "value"),
                       dtype_of(sampling_locations, "sampling_locations"),
                       dtype_of(attention_weights, "attention_weights"), points_of(points), sampling_of(sampling));
  p.value = value.contiguous();
  p.locations = sampling_locations.contiguous();
  p.weights = attention_weights.contiguous();
  return p;
}

struct PreparedFused {
  Problem problem;
  at::Tensor value, reference, offsets, logits;
  FusedInputs inputs() const {
    return {value.data_ptr(), reference.data_ptr(), offsets.data_ptr(), logits.data_ptr()};
  }
};

PreparedFused prepare_fused(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& reference_points,
                            const at::Tensor& sampling_offsets, const at::Tensor& attention_logits,
                            at::OptionalIntArrayRef points, c10::string_view sampling, double offset_scale) {
  check_devices(value, {{&value, "value"},
                        {&spatial_shapes, "spatial_shapes"},
                        {&level_start_index, "level_start_index"},
                        {&reference_points, "reference_points"},
                        {&sampling_offsets, "sampling_offsets"},
                        {&attention_logits, "attention_logits"}});
  const at::Tensor shapes = host_indices(spatial_shapes, "spatial_shapes");
  const at::Tensor starts = host_indices(level_start_index, "level_start_index");
  FusedTensorSizes sizes{value.sizes().vec(),          shapes.sizes().vec(),           starts.sizes().vec(),
                         reference_points.sizes().vec(), sampling_offsets.sizes().vec(), attention_logits.sizes().vec()};
  PreparedFused p;
  p.problem = describe_fused(sizes, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), dtype_of(value, "value"),
                             dtype_of(reference_points, "reference_points"),
                             dtype_of(sampling_offsets, "sampling_offsets"),
                             dtype_of(attention_logits, "attention_logits"), points_of(points),
                             sampling_of(sampling), offset_scale);
  p.value = value.contiguous();
  p.reference = reference_points.contiguous();
  p.offsets = sampling_offsets.contiguous();
  p.logits = attention_logits.contiguous();
  return p;
}

// grad_output: defined, on value's device, in value's dtype, sized [N, Q, M*D].
at::Tensor checked_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Problem& problem) {
  if (!grad_output.defined()) throw Error("grad_output", "a tensor", "None (an undefined tensor)");
  if (grad_output.device() != value.device())
    throw Error("grad_output", "the device of value (" + value.device().str() + ")", grad_output.device().str());
  if (grad_output.scalar_type() != value.scalar_type())
    throw Error("grad_output", "the dtype of value (" + str(value.scalar_type()) + ")", str(grad_output.scalar_type()));
  check_grad_output_sizes(problem, grad_output.sizes().vec());
  return grad_output.contiguous();
}

// A gradient that was not asked for is an empty placeholder, not an undefined tensor: the
// schema's outputs are plain Tensors, which torch.compile and torch.export require defined.
at::Tensor gradient_for(const at::Tensor& input, bool wanted) {
  return wanted ? at::empty_like(input) : at::empty({0}, input.options());
}

void* pointer_if(at::Tensor& t, bool wanted) { return wanted ? t.data_ptr() : nullptr; }

std::atomic<bool> cuda_deterministic{true};

// How one call runs: on the CPU with torch's thread count, or on value's CUDA device, on the
// current stream, with scratch from torch's caching allocator (which keeps it until the stream
// is past the call's kernels).
// `what` is the pass, or the gradients a backward will compute (its workspace is sized for them).
class Runner {
 public:
  template <class What>
  Runner(const at::Tensor& value, const Problem& problem, const What& what) : guard_(value.device()) {
    options_.threads = at::get_num_threads();  // follows torch.set_num_threads, like torch's own ops
    if (!value.is_cuda()) return;
    options_.backend = Backend::cuda;
    options_.cuda.stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(value.device()).native_handle();
    // msda's own (static) CUDA runtime does not know torch's current device: name it. check_devices
    // has put every tensor on it, so msda need not ask the driver where each pointer lives.
    options_.cuda.device = value.device().index();
    options_.cuda.check_pointers = false;
    // torch.use_deterministic_algorithms(True) wins over msda's own switch: no atomics then.
    options_.cuda.deterministic = cuda_deterministic.load() || at::globalContext().deterministicAlgorithms();
    const std::size_t bytes = workspace_size(problem, what, options_);
    if (bytes == 0) return;
    workspace_ = at::empty({static_cast<int64_t>(bytes)}, value.options().dtype(at::kByte));
    options_.cuda.workspace = workspace_.data_ptr();
    options_.cuda.workspace_bytes = bytes;
  }
  const Options& options() const { return options_; }

 private:
  c10::DeviceGuard guard_;
  Options options_;
  at::Tensor workspace_;
};

// msda::Error becomes c10::ValueError (Python ValueError) with the core's message.
template <class F>
auto translating_errors(F&& f) {
  try {
    return f();
  } catch (const Error& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

}  // namespace

bool set_cuda_deterministic(bool deterministic) { return cuda_deterministic.exchange(deterministic); }
bool cuda_built() { return msda::cuda_built(); }

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   c10::optional<int64_t> /*im2col_step: accepted for compatibility, no rule attached*/,
                   at::OptionalIntArrayRef points, c10::string_view sampling) {
  return translating_errors([&] {
    Prepared p = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points,
                         sampling);
    const Problem& pr = p.problem;
    at::Tensor output = at::empty({pr.batch, pr.queries, pr.heads * pr.channels}, p.value.options());
    const Runner run(value, pr, Pass::forward);
    msda::forward(pr, {p.value.data_ptr(), p.locations.data_ptr(), p.weights.data_ptr()}, output.data_ptr(),
                  run.options());
    return output;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        std::array<bool, 3> output_mask,
                                                        at::OptionalIntArrayRef points, c10::string_view sampling) {
  return translating_errors([&] {
    Prepared p = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points,
                         sampling);
    const at::Tensor g = checked_grad_output(grad_output, value, p.problem);
    at::Tensor grad_value = gradient_for(p.value, output_mask[0]);
    at::Tensor grad_locations = gradient_for(p.locations, output_mask[1]);
    at::Tensor grad_weights = gradient_for(p.weights, output_mask[2]);
    const Gradients wanted{pointer_if(grad_value, output_mask[0]), pointer_if(grad_locations, output_mask[1]),
                           pointer_if(grad_weights, output_mask[2])};
    msda::backward(p.problem, {p.value.data_ptr(), p.locations.data_ptr(), p.weights.data_ptr()}, g.data_ptr(),
                   wanted, Runner(value, p.problem, wanted).options());
    return std::make_tuple(grad_value, grad_locations, grad_weights);
  });
}

at::Tensor fused_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& reference_points,
                         const at::Tensor& sampling_offsets, const at::Tensor& attention_logits,
                         at::OptionalIntArrayRef points, c10::string_view sampling, double offset_scale) {
  return translating_errors([&] {
    const PreparedFused p = prepare_fused(value, spatial_shapes, level_start_index, reference_points,
                                          sampling_offsets, attention_logits, points, sampling, offset_scale);
    const Problem& pr = p.problem;
    at::Tensor output = at::empty({pr.batch, pr.queries, pr.heads * pr.channels}, p.value.options());
    const Runner run(value, pr, Pass::forward_fused);
    msda::forward_fused(pr, p.inputs(), output.data_ptr(), run.options());
    return output;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& reference_points, const at::Tensor& sampling_offsets,
    const at::Tensor& attention_logits, std::array<bool, 4> output_mask, at::OptionalIntArrayRef points,
    c10::string_view sampling, double offset_scale) {
  return translating_errors([&] {
    const PreparedFused p = prepare_fused(value, spatial_shapes, level_start_index, reference_points,
                                          sampling_offsets, attention_logits, points, sampling, offset_scale);
    const at::Tensor g = checked_grad_output(grad_output, value, p.problem);
    at::Tensor grad_value = gradient_for(p.value, output_mask[0]);
    at::Tensor grad_reference = gradient_for(p.reference, output_mask[1]);
    at::Tensor grad_offsets = gradient_for(p.offsets, output_mask[2]);
    at::Tensor grad_logits = gradient_for(p.logits, output_mask[3]);
    const FusedGradients wanted{pointer_if(grad_value, output_mask[0]), pointer_if(grad_reference, output_mask[1]),
                                pointer_if(grad_offsets, output_mask[2]), pointer_if(grad_logits, output_mask[3])};
    msda::backward_fused(p.problem, p.inputs(), g.data_ptr(), wanted, Runner(value, p.problem, wanted).options());
    return std::make_tuple(grad_value, grad_reference, grad_offsets, grad_logits);
  });
}

}  // namespace msda::torch_ops
