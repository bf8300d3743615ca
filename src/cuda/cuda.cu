// The cuda backend as nvcc builds it: the CUDA runtime, CUB's radix sort and triple-chevron
// launches under backend.inl, which holds the kernels and their host side.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

#include "cuda.h"

#define MSDA_CUDA_NAMESPACE msda::cuda
#define MSDA_CUDA_LAUNCH(kernel, blocks, threads, stream, ...) \
  kernel<<<static_cast<unsigned>(blocks), (threads), 0, (stream)>>>(__VA_ARGS__)

#include "backend.inl"
