// The dtype combinations SPEC allows, turned into template arguments in one place: value V in
// {f32, f64, bf16, f16}; sampling_locations and attention_weights each V or f32.
#pragma once

#include "msda/msda.h"
#include "numeric.h"

namespace msda {

// Calls f.template operator()<V, Loc, W>() for the problem's dtypes. Assumes a validated problem.
template <class F>
void visit_dtypes(const Problem& problem, F&& f) {
  auto with_value = [&]<class V>() {
    auto with_location = [&]<class Loc>() {
      if (problem.weight_dtype == Storage<V>::dtype)
        f.template operator()<V, Loc, V>();
      else
        f.template operator()<V, Loc, float>();
    };
    if (problem.location_dtype == Storage<V>::dtype)
      with_location.template operator()<V>();
    else
      with_location.template operator()<float>();
  };
  switch (problem.value_dtype) {
    case DType::f32: return with_value.template operator()<float>();
    case DType::f64: return with_value.template operator()<double>();
    case DType::bf16: return with_value.template operator()<bf16>();
    case DType::f16: return with_value.template operator()<f16>();
  }
}

}  // namespace msda
