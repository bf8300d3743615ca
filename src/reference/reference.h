// The reference backend: SPEC's formulas as plain scalar loops, every sum in double whatever the
// dtype. It is the oracle of the tests and is never tuned for speed.
#pragma once

#include "params.h"

namespace msda::reference {

void forward(const Params& params);
void backward(const Params& params);

// The fused op (SPEC "The fused op"): the locations and softmax weights are materialised in double,
// the kernels above run on them, and the backward applies the chain rule in double.
void forward_fused(const Params& params);
void backward_fused(const Params& params);

}  // namespace msda::reference
