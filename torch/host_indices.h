// spatial_shapes and level_start_index on the host, where the core library reads them.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace msda::torch_ops {

// The index tensor `t` as a contiguous int64 CPU tensor (the caller must not write to it).
// A CPU tensor is read where it is. A tensor on a device is copied to the host once and kept,
// keyed by the tensor and its version counter, so that later calls with the same unchanged
// tensor neither wait for the stream nor break a CUDA graph capture (a device-to-host copy does
// both). An in-place write through torch (t[0, 0] = 8, t.copy_(...), any out= op) bumps the
// version and is seen, and so is `t.data = other` (another storage); a write torch does not
// count is not: through t.data's own tensor or t.untyped_storage(), DLPack, a raw pointer,
// DDP's broadcast of buffers, a CUDA graph's replay. Inference tensors have no version counter
// and are copied on every call.
at::Tensor host_indices(const at::Tensor& t, const char* argument);

// For the tests: `t` through the cache whatever its device (a CPU tensor is cached like a device
// one), and whether the call was a hit.
std::tuple<at::Tensor, bool> host_indices_cached(const at::Tensor& t);

}  // namespace msda::torch_ops
