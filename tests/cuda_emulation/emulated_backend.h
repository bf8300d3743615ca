// src/cuda/backend.inl compiled for the host over runtime.h (emulated_backend.cpp): the cuda
// backend's entry points, running its kernels on the CPU. Params as dispatch.cpp makes them.
#pragma once

#include <cstddef>

#include "params.h"

namespace msda::cuda_emulation {

// Params of a problem as dispatch.cpp makes them, for the cuda backend, with no pointers set.
inline Params params_for(const Problem& problem) {
  Params p = make_params(problem, nullptr, nullptr, nullptr, Options{});
  p.reference_coords = problem.reference_coords;
  p.reference_dtype = problem.reference_dtype;
  p.backend = Backend::cuda;  // set here: a build without nvcc refuses to resolve it
  return p;
}

bool built() noexcept;
bool available() noexcept;
bool stream_capturing(void* stream) noexcept;
std::size_t workspace_size(const Params& params, bool backward);
void fill_zeros(const Params& params, void* pointer, std::size_t bytes);
void forward(const Params& params);
void backward(const Params& params);

}  // namespace msda::cuda_emulation
