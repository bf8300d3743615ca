// The reference backend: SPEC's formulas as plain scalar loops, every sum in double whatever the
// dtype. It is the oracle of the tests and is never tuned for speed.
#pragma once

#include "params.h"

namespace msda::reference {

void forward(const Params& params);
void backward(const Params& params);

}  // namespace msda::reference
