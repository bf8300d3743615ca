// src/cuda/backend.inl compiled for the host over runtime.h (emulated_backend.cpp): the cuda
// backend's entry points, running its kernels on the CPU. Params as dispatch.cpp makes them.
#pragma once

#include <cstddef>

#include "params.h"

namespace msda::cuda_emulation {

// Params of a problem as dispatch.cpp makes them for the cuda backend, with no pointers set.
inline Params params_for(const Problem& problem) {
  Params p;
  p.problem = &problem;
  p.N = problem.batch;
  p.S = problem.value_len;
  p.M = problem.heads;
  p.D = problem.channels;
  p.Q = problem.queries;
  p.L = problem.num_levels();
  p.P = problem.points;
  p.level_start = level_starts(problem.levels);
  for (const Level& level : problem.levels) {
    p.height.push_back(level.height);
    p.width.push_back(level.width);
    p.height_f.push_back(static_cast<double>(level.height));
    p.width_f.push_back(static_cast<double>(level.width));
  }
  p.location_bytes = size_of(problem.location_dtype);
  p.weight_bytes = size_of(problem.weight_dtype);
  p.reference_coords = problem.reference_coords;
  p.reference_dtype = problem.reference_dtype;
  p.backend = Backend::cuda;
  return p;
}

bool built() noexcept;
bool available() noexcept;
std::size_t workspace_size(const Params& params, bool backward);
void fill_zeros(const Params& params, void* pointer, std::size_t bytes);
void forward(const Params& params);
void backward(const Params& params);

}  // namespace msda::cuda_emulation
