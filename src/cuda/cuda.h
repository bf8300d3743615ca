// The cuda backend's entry points, called by dispatch.cpp with a validated Params whose pointers
// are device memory. Built from cuda.cu when CMake finds nvcc, from unavailable.cpp otherwise.
#pragma once

#include <cstddef>

#include "../params.h"

namespace msda::cuda {

bool built() noexcept;
bool available() noexcept;  // built, and a CUDA device is visible
bool stream_capturing(void* stream) noexcept;

// Bytes of workspace one call needs (plan.h's Workspace::total, with the sort's scratch asked of
// the device). `backward` with params' gradient pointers set as the call will have them.
std::size_t workspace_size(const Params& params, bool backward);

void forward(const Params& params);   // plain and fused (params.fused)
// Zeros `bytes` of device memory on params' stream (the gradients of a problem with no sample).
void fill_zeros(const Params& params, void* pointer, std::size_t bytes);
void backward(const Params& params);  // plain and fused

}  // namespace msda::cuda
