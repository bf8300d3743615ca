// The CPU backend: OpenMP threads, 64-bit offsets, deterministic at any thread count.
#pragma once

#include "params.h"

namespace msda::cpu {

// Parallel over (n, q): each output row is written by one thread, summed in a fixed order.
void forward(const Params& params);

// Parallel over the N*M*L parts (batch, head, level): a part owns the grad_value rows of its
// level and head, and the location and weight gradients of its samples, so no two threads ever
// add into the same element and the sums run in the same order whatever the thread count.
void backward(const Params& params);

}  // namespace msda::cpu
