// The tensor-level kernels of the PyTorch op: tensors in, tensors out, everything checked by the
// core library's msda::describe. Registered in register.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace msda::torch_ops {

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   c10::optional<int64_t> im2col_step);

// Gradients for the inputs flagged in output_mask (value, sampling_locations,
// attention_weights); an unflagged one comes back as an empty placeholder of size [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        std::array<bool, 3> output_mask);

}  // namespace msda::torch_ops
