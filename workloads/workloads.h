// SPEC's named workloads and the inputs SPEC draws for them, in any dtype. Shared by the tests,
// the benchmarks and the examples so that all of them measure the same thing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "msda/msda.h"

namespace msda::workloads {

// How sampling locations are drawn (SPEC "Named workloads").
enum class Locations {
  encoder,  // reference point = centre of the query's own pixel, offsets uniform in [-4, 4] px
  decoder,  // reference point uniform in [0, 1]^2, offsets as for the encoder
  random,   // every location uniform in [0, 1]^2: no locality, the worst case
};
std::string_view name(Locations locations);
Locations parse_locations(std::string_view text);  // throws std::invalid_argument

struct Workload {
  std::string name;
  std::string model;
  Problem problem;      // f32 throughout; change the dtypes as needed
  Locations locations;  // the kind SPEC gives it
};

const std::vector<Workload>& named();
const Workload& find(std::string_view name);  // throws std::invalid_argument listing the names

// A problem with the given levels and sizes (level_start_index and S derived).
Problem make_problem(std::int64_t N, std::int64_t Q, std::int64_t M, std::int64_t D, std::int64_t P,
                     std::vector<Level> levels);

// Inputs stored in the problem's dtypes: value standard normal, locations as `locations`,
// weights a softmax over L*P of standard normal logits.
struct Data {
  std::vector<std::byte> value, locations, weights;
  Inputs inputs() const { return {value.data(), locations.data(), weights.data()}; }
};
Data generate(const Problem& problem, Locations locations, std::uint64_t seed);

// Byte buffers holding `count` elements of `dtype`, converted from and to double.
std::vector<std::byte> from_double(const std::vector<double>& x, DType dtype);
std::vector<double> to_double(const void* data, DType dtype, std::int64_t count);

// ||got - want|| / ||want|| in double; infinite if anything in `got` is NaN or inf where
// `want` is finite, so a NaN never passes.
double relative_error(const std::vector<double>& got, const std::vector<double>& want);

// Median wall time of `repeats` calls of f, in milliseconds, after `warmups` untimed calls.
double median_ms(int repeats, const std::function<void()>& f, int warmups = 1);

}  // namespace msda::workloads
