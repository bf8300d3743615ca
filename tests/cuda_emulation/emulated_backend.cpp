// The cuda backend's own source, compiled by the host compiler over the emulated runtime.
#include "runtime.h"
//
#include "emulated_backend.h"

#define MSDA_CUDA_NAMESPACE msda::cuda_emulation
#define MSDA_CUDA_LAUNCH(kernel, blocks, threads, stream, ...) \
  ::msda_emulator::run((blocks), (threads), [&] { kernel(__VA_ARGS__); })

#include "cuda/backend.inl"
