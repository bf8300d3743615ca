// The cuda backend's own source, compiled by the host compiler over the emulated runtime.
#include "runtime.h"
//
#include "emulated_backend.h"

#define MSDA_CUDA_NAMESPACE msda::cuda_emulation
// The kernel's arguments copied into the launch, as CUDA copies a kernel's parameters: a captured
// launch runs at each replay, after the caller's variables are gone.
#define MSDA_CUDA_LAUNCH(kernel, blocks, threads, stream, ...) \
  ::msda_emulator::launch((blocks), (threads), (stream), [=] { kernel(__VA_ARGS__); })

// scripts/mutation-check.sh names a copy of src/ with one bug planted in it, so that only this
// file rebuilds (the library, which nvcc builds from src/cuda/, never sees the copy).
#ifndef MSDA_CUDA_BACKEND_SOURCE
#define MSDA_CUDA_BACKEND_SOURCE "cuda/backend.inl"
#endif
#include MSDA_CUDA_BACKEND_SOURCE
