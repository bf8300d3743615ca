// The tensor-level kernels of the PyTorch op: tensors in, tensors out, everything checked by the
// core library's msda::describe. Registered in register.cpp.
#pragma once

#include <ATen/ATen.h>

#include <c10/util/OptionalArrayRef.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace msda::torch_ops {

// `points` (SPEC "Points per level and discrete sampling"): P_l of each level, with the
// per-sample tensors in their [N, Q, M, K, ...] form; None: equal P from their [N, Q, M, L, P, ...]
// form. `sampling`: "bilinear" or "discrete".
at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   c10::optional<int64_t> im2col_step, at::OptionalIntArrayRef points, c10::string_view sampling);

// Gradients for the inputs flagged in output_mask (value, sampling_locations,
// attention_weights); an unflagged one comes back as an empty placeholder of size [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        std::array<bool, 3> output_mask, at::OptionalIntArrayRef points,
                                                        c10::string_view sampling);

// The fused op (SPEC "The fused op"): reference_points [N, Q, L, 2 or 4], sampling_offsets
// [N, Q, M, L, P, 2], attention_logits [N, Q, M, L*P] in place of locations and weights.
at::Tensor fused_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& reference_points,
                         const at::Tensor& sampling_offsets, const at::Tensor& attention_logits,
                         at::OptionalIntArrayRef points, c10::string_view sampling, double offset_scale);

// Gradients for the inputs flagged in output_mask (value, reference_points, sampling_offsets,
// attention_logits); an unflagged one is an empty placeholder of size [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& reference_points, const at::Tensor& sampling_offsets,
    const at::Tensor& attention_logits, std::array<bool, 4> output_mask, at::OptionalIntArrayRef points,
    c10::string_view sampling, double offset_scale);

// The cuda backend's grad_value: deterministic (default) or float atomics (an ablation). Returns
// the previous setting; it applies to every later CUDA backward of the process.
bool set_cuda_deterministic(bool deterministic);
// Whether this build has the cuda backend.
bool cuda_built();

}  // namespace msda::torch_ops
