// The one struct that carries a validated problem to a backend (FlashAttention's Flash_fwd_params
// idea): sizes unpacked into SPEC's letters, per-level geometry, the caller's pointers, and the
// thread count. Backends read it and never look back at the API types.
#pragma once

#include <cstdint>
#include <vector>

#include "msda/msda.h"

namespace msda {

struct Params {
  const Problem* problem = nullptr;
  // K: the samples of one (n, q, m), the sum over levels of P_l (L * P with equal points).
  std::int64_t N = 0, S = 0, M = 0, D = 0, Q = 0, L = 0, K = 0;
  std::vector<std::int64_t> height, width, level_start;  // per level
  std::vector<double> height_f, width_f;                 // the same H and W, for coordinate math
  // Points per level: level l's P_l samples of an (n, q, m) are [point_start[l],
  // point_start[l + 1]) (L + 1 entries).
  std::vector<std::int64_t> points, point_start;
  bool discrete = false;  // Sampling::discrete: one pixel per sample, no location gradient

  const void* value = nullptr;
  const void* locations = nullptr;
  const void* weights = nullptr;
  const void* grad_output = nullptr;  // backward only
  void* output = nullptr;             // forward only
  void* grad_value = nullptr;         // backward; null = not wanted
  void* grad_locations = nullptr;
  void* grad_weights = nullptr;

  std::size_t location_bytes = 4, weight_bytes = 4;  // element sizes of sampling_locations, weights

  // The fused op: `locations` points at sampling_offsets and `weights` at attention_logits (the
  // same layouts and element counts), and the kernels turn them into locations and softmax
  // weights as they load them (cpu: Group::load), in double.
  bool fused = false;
  const void* reference_points = nullptr;  // [N, Q, L, reference_coords]
  std::int64_t reference_coords = 2;
  DType reference_dtype = DType::f32;
  double offset_scale = 0.5;  // boxes: location = ref[:2] + off / P_l * ref[2:] * offset_scale
  // fused backward: the caller's gradients of the three inputs that replace locations and
  // weights (null: not wanted), and per-(n, q, m) partial sums of grad_reference_points,
  // [N, Q, M, L, reference_coords] doubles, that the cpu backend's kernel writes and its epilogue
  // sums over m.
  void* grad_reference_points = nullptr;
  void* grad_offsets = nullptr;
  void* grad_logits = nullptr;
  double* reference_partials = nullptr;
  int threads = 1;  // resolved: >= 1
  Backend backend = Backend::cpu;  // resolved: never automatic
  Isa isa = Isa::best;
  std::int64_t query_block = 1;   // cpu forward: queries per block walked one head at a time
  CpuTuning::Staging staging = CpuTuning::Staging::automatic;  // cpu: gather from per-head copies of value
  bool level_parts = false;       // cpu backward: one level per part even with enough (n, m) pairs
  std::int64_t query_stripe = 8;  // cpu, Q == S: image rows per stripe of the query walk (1: raster)
  std::int64_t accumulator_budget = std::int64_t(64) << 20;  // cpu backward: bytes per part's rows
  CpuTuning::Scatter scatter = CpuTuning::Scatter::automatic;  // cpu backward: where a part sums its rows
  CudaOptions cuda;  // cuda backend: stream, caller's workspace, deterministic backward

  // Flat offsets, 64-bit. The sample (n, q, m, l, p) lives at sample_index * 2 in
  // sampling_locations and at sample_index in attention_weights.
  std::int64_t sample_index(std::int64_t n, std::int64_t q, std::int64_t m, std::int64_t l, std::int64_t p) const {
    return ((n * Q + q) * M + m) * K + point_start[l] + p;
  }
  // Whether the backward computes any per-sample gradient (the dot products of a sample).
  bool wants_sample_gradients() const {
    return grad_locations || grad_weights || grad_reference_points || grad_offsets || grad_logits;
  }
  void drop_sample_gradients() {
    grad_locations = grad_weights = grad_reference_points = grad_offsets = grad_logits = nullptr;
    reference_partials = nullptr;
  }
  // First element of reference_points[n, q, 0, :] (fused op).
  std::int64_t reference_offset(std::int64_t n, std::int64_t q) const { return (n * Q + q) * L * reference_coords; }
  // First element of value[n, row, m, :] (and of grad_value's).
  std::int64_t value_offset(std::int64_t n, std::int64_t row, std::int64_t m) const {
    return ((n * S + row) * M + m) * D;
  }
  // First element of output[n, q, m*D : (m+1)*D] (and of grad_output's).
  std::int64_t output_offset(std::int64_t n, std::int64_t q, std::int64_t m) const {
    return ((n * Q + q) * M + m) * D;
  }
};

// Validated problem -> Params, as every entry point makes them (dispatch.cpp): sizes, levels,
// resolved options, and the per-sample tensors' pointers (sampling_locations and
// attention_weights, or the fused op's offsets and logits).
Params make_params(const Problem& problem, const void* value, const void* locations, const void* weights,
                   const Options& options);

}  // namespace msda
