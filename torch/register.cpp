// Registers msda::ms_deform_attn and msda::ms_deform_attn_fused (differentiable) and their
// backward ops with the PyTorch dispatcher, so Python (torch.ops.msda) and C++ libtorch programs
// call the same ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "host_indices.h"
#include "ops.h"

namespace msda::torch_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The keyword options an autograd node keeps for its backward (saved_data holds IValues).
struct SampleOptions {
  c10::optional<std::vector<int64_t>> points;
  std::string sampling;
  double offset_scale = 0.5;

  SampleOptions(at::OptionalIntArrayRef p, c10::string_view s, double scale = 0.5)
      : sampling(s), offset_scale(scale) {
    if (p.has_value()) points = p->vec();
  }
  explicit SampleOptions(AutogradContext* ctx)
      : sampling(ctx->saved_data["sampling"].toStringRef()), offset_scale(ctx->saved_data["offset_scale"].toDouble()) {
    if (!ctx->saved_data["points"].isNone()) points = ctx->saved_data["points"].toIntVector();
  }
  void save(AutogradContext* ctx) const {
    ctx->saved_data["points"] = points.has_value() ? c10::IValue(*points) : c10::IValue();
    ctx->saved_data["sampling"] = sampling;
    ctx->saved_data["offset_scale"] = offset_scale;
  }
  at::OptionalIntArrayRef points_ref() const {
    return points.has_value() ? at::OptionalIntArrayRef(*points) : at::OptionalIntArrayRef();
  }
  // Discrete sampling picks a pixel, piecewise constant in the location: no gradient reaches the
  // locations (or the offsets and reference points they come from), None as in transformers.
  bool locations_move() const { return sampling != "discrete"; }
};

at::Tensor call_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights, c10::optional<int64_t> im2col_step,
                        at::OptionalIntArrayRef points, c10::string_view sampling) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("msda::ms_deform_attn", "").typed<decltype(forward)>();
  return op.call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step, points,
                 sampling);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights,
                                                             std::array<bool, 3> output_mask,
                                                             at::OptionalIntArrayRef points, c10::string_view sampling) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("msda::ms_deform_attn_backward", "").typed<decltype(backward)>();
  return op.call(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                 output_mask, points, sampling);
}

class MSDeformAttnFunction : public torch::autograd::Function<MSDeformAttnFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights, c10::optional<int64_t> im2col_step,
                            at::OptionalIntArrayRef points, c10::string_view sampling) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({value, spatial_shapes, level_start_index, sampling_locations, attention_weights});
    SampleOptions(points, sampling).save(ctx);
    return call_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                        im2col_step, points, sampling);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = grad_outputs[0];
    const SampleOptions options(ctx);
    // Tensor inputs in order: value 0, spatial_shapes 1, level_start_index 2, locations 3, weights 4.
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(3) && options.locations_move(),
                                   ctx->needs_input_grad(4)};
    if (!grad.defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(8);
    auto [grad_value, grad_locations, grad_weights] = call_backward(
        grad, saved[0], saved[1], saved[2], saved[3], saved[4], mask, options.points_ref(), options.sampling);
    auto wanted = [](at::Tensor& t, bool flag) { return flag ? t : at::Tensor(); };  // drop placeholders
    return {wanted(grad_value, mask[0]),
            at::Tensor(),
            at::Tensor(),
            wanted(grad_locations, mask[1]),
            wanted(grad_weights, mask[2]),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// The backward has no derivative of its own: refuse a double backward (create_graph=True)
// loudly instead of silently dropping the second-order term.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    std::array<bool, 3> output_mask, at::OptionalIntArrayRef points, c10::string_view sampling) {
  if (at::GradMode::is_enabled())
    for (const at::Tensor* t : {&grad_output, &value, &sampling_locations, &attention_weights})
      TORCH_CHECK(!(t->defined() && t->requires_grad()),
                  "msda: ms_deform_attn: expected a first-order gradient, got a request for a double backward "
                  "(create_graph=True), which msda does not implement");
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                       output_mask, points, sampling);
}

at::Tensor forward_autograd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights, c10::optional<int64_t> im2col_step,
                            at::OptionalIntArrayRef points, c10::string_view sampling) {
  return MSDeformAttnFunction::apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                     im2col_step, points, sampling);
}

at::Tensor call_fused_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& reference_points,
                              const at::Tensor& sampling_offsets, const at::Tensor& attention_logits,
                              at::OptionalIntArrayRef points, c10::string_view sampling, double offset_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msda::ms_deform_attn_fused", "")
                       .typed<decltype(fused_forward)>();
  return op.call(value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits,
                 points, sampling, offset_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_fused_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& reference_points, const at::Tensor& sampling_offsets,
    const at::Tensor& attention_logits, std::array<bool, 4> output_mask, at::OptionalIntArrayRef points,
    c10::string_view sampling, double offset_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msda::ms_deform_attn_fused_backward", "")
                       .typed<decltype(fused_backward)>();
  return op.call(grad_output, value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
                 attention_logits, output_mask, points, sampling, offset_scale);
}

class MSDeformAttnFusedFunction : public torch::autograd::Function<MSDeformAttnFusedFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& reference_points,
                            const at::Tensor& sampling_offsets, const at::Tensor& attention_logits,
                            at::OptionalIntArrayRef points, c10::string_view sampling, double offset_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward(
        {value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits});
    SampleOptions(points, sampling, offset_scale).save(ctx);
    return call_fused_forward(value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
                              attention_logits, points, sampling, offset_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = grad_outputs[0];
    const SampleOptions options(ctx);
    // Tensor inputs in order: value 0, spatial_shapes 1, level_start_index 2, reference_points 3,
    // sampling_offsets 4, attention_logits 5.
    const bool moves = options.locations_move();
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(3) && moves,
                                   ctx->needs_input_grad(4) && moves, ctx->needs_input_grad(5)};
    if (!grad.defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return variable_list(9);
    auto [grad_value, grad_reference, grad_offsets, grad_logits] =
        call_fused_backward(grad, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], mask,
                            options.points_ref(), options.sampling, options.offset_scale);
    auto wanted = [](at::Tensor& t, bool flag) { return flag ? t : at::Tensor(); };  // drop placeholders
    return {wanted(grad_value, mask[0]),   at::Tensor(),
            at::Tensor(),                  wanted(grad_reference, mask[1]),
            wanted(grad_offsets, mask[2]), wanted(grad_logits, mask[3]),
            at::Tensor(),                  at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& reference_points, const at::Tensor& sampling_offsets,
    const at::Tensor& attention_logits, std::array<bool, 4> output_mask, at::OptionalIntArrayRef points,
    c10::string_view sampling, double offset_scale) {
  if (at::GradMode::is_enabled())
    for (const at::Tensor* t : {&grad_output, &value, &reference_points, &sampling_offsets, &attention_logits})
      TORCH_CHECK(!(t->defined() && t->requires_grad()),
                  "msda: ms_deform_attn_fused: expected a first-order gradient, got a request for a double "
                  "backward (create_graph=True), which msda does not implement");
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_fused_backward(grad_output, value, spatial_shapes, level_start_index, reference_points,
                             sampling_offsets, attention_logits, output_mask, points, sampling, offset_scale);
}

at::Tensor fused_forward_autograd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& reference_points,
                                  const at::Tensor& sampling_offsets, const at::Tensor& attention_logits,
                                  at::OptionalIntArrayRef points, c10::string_view sampling, double offset_scale) {
  return MSDeformAttnFusedFunction::apply(value, spatial_shapes, level_start_index, reference_points,
                                          sampling_offsets, attention_logits, points, sampling, offset_scale);
}

}  // namespace
}  // namespace msda::torch_ops

TORCH_LIBRARY(msda, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights, int? im2col_step=None, int[]? points=None, str sampling=\"bilinear\") -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool[3] output_mask, int[]? points=None, "
      "str sampling=\"bilinear\") -> (Tensor, Tensor, Tensor)");
  m.def(
      "ms_deform_attn_fused(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor reference_points, "
      "Tensor sampling_offsets, Tensor attention_logits, int[]? points=None, str sampling=\"bilinear\", "
      "float offset_scale=0.5) -> Tensor");
  m.def(
      "ms_deform_attn_fused_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor reference_points, Tensor sampling_offsets, Tensor attention_logits, "
      "bool[4] output_mask, int[]? points=None, str sampling=\"bilinear\", float offset_scale=0.5) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Process-wide switches and facts, no tensors: catch-all kernels.
  m.def("_set_cuda_deterministic(bool deterministic) -> bool", &msda::torch_ops::set_cuda_deterministic);
  m.def("_cuda_built() -> bool", &msda::torch_ops::cuda_built);
  // For the tests: an index tensor through the host-copy cache, and whether that was a hit.
  m.def("_host_indices_cached(Tensor t) -> (Tensor, bool)", &msda::torch_ops::host_indices_cached);
}

// CompositeExplicitAutograd: one kernel for every device, so a tensor on a device msda has no
// kernel for gets msda's own error naming the argument, not a dispatcher error.
TORCH_LIBRARY_IMPL(msda, CompositeExplicitAutograd, m) {
  m.impl("ms_deform_attn", &msda::torch_ops::forward);
  m.impl("ms_deform_attn_backward", &msda::torch_ops::backward);
  m.impl("ms_deform_attn_fused", &msda::torch_ops::fused_forward);
  m.impl("ms_deform_attn_fused_backward", &msda::torch_ops::fused_backward);
}

// CUDA tensors run the same kernels, which pick the cuda backend from value's device; an explicit
// CUDA registration keeps the dispatcher's CUDA key pointing at msda even where a backend-specific
// fallback would otherwise be preferred.
TORCH_LIBRARY_IMPL(msda, CUDA, m) {
  m.impl("ms_deform_attn", &msda::torch_ops::forward);
  m.impl("ms_deform_attn_backward", &msda::torch_ops::backward);
  m.impl("ms_deform_attn_fused", &msda::torch_ops::fused_forward);
  m.impl("ms_deform_attn_fused_backward", &msda::torch_ops::fused_backward);
}

TORCH_LIBRARY_IMPL(msda, Autograd, m) {
  m.impl("ms_deform_attn", &msda::torch_ops::forward_autograd);
  m.impl("ms_deform_attn_backward", &msda::torch_ops::backward_autograd);
  m.impl("ms_deform_attn_fused", &msda::torch_ops::fused_forward_autograd);
  m.impl("ms_deform_attn_fused_backward", &msda::torch_ops::fused_backward_autograd);
}
