// Shared helpers of the msda test suite: typed buffers with guard bytes and poisoning, random
// problems with several kinds of sampling locations, and the relative-error measure of SPEC's
// "Precision" section.
//
// Seeds: every random case draws from its own std::mt19937_64 seeded by case_seed(), which mixes
// the running test's full name, a per-test case index and a base seed. The base seed is 0 unless
// the environment variable MSDA_TEST_SEED holds a number (or "random", for a fresh one per run).
// Every case puts its seed and shape in a SCOPED_TRACE, so a failure prints what reproduces it.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "msda/msda.h"
#include "numeric.h"

namespace msda_test {

using msda::DType;

// Element i of a buffer of `dtype`, widened to double (exact for every dtype).
double load_as_double(DType dtype, const void* data, std::int64_t i);
// Stores x rounded to `dtype` (f32: one rounding; bf16/f16: double -> float -> dtype).
void store_from_double(DType dtype, void* data, std::int64_t i, double x);

// A contiguous array of `size` elements of one dtype, with 64 guard bytes on each side that hold
// a fixed pattern: guards_intact() tells whether anything wrote outside the array.
class Buffer {
 public:
  Buffer() : Buffer(DType::f32, 0) {}
  Buffer(DType dtype, std::int64_t size);

  DType dtype() const { return dtype_; }
  std::int64_t size() const { return size_; }
  std::size_t bytes() const { return static_cast<std::size_t>(size_) * msda::size_of(dtype_); }
  void* data();
  const void* data() const;

  double get(std::int64_t i) const { return load_as_double(dtype_, data(), i); }
  void set(std::int64_t i, double x) { store_from_double(dtype_, data(), i, x); }
  std::vector<double> to_double() const;
  // The same values in a buffer of another dtype (exact when widening).
  Buffer converted(DType dtype) const;

  // Every element NaN (bf16/f16: their quiet-NaN bit pattern), so an element the library does not
  // write fails every comparison.
  void poison();
  void fill_bytes(unsigned char byte);
  bool all_bytes_are(unsigned char byte) const;
  bool guards_intact() const;
  bool same_bytes(const Buffer& other) const;  // the arrays only, not the guards

 private:
  static constexpr std::size_t kGuard = 64;
  static constexpr unsigned char kGuardByte = 0xA5;
  DType dtype_;
  std::int64_t size_;
  std::vector<std::uint64_t> storage_;  // 8-byte aligned; kGuard bytes, array, kGuard bytes
};

// ||a - b|| / ||b|| in double. NaN or inf anywhere (in a or b) gives +inf. If ||b|| == 0 the
// result is 0 when ||a|| == 0 and +inf otherwise. Sizes must match (else +inf).
double rel_error(const std::vector<double>& a, const std::vector<double>& b);

// Passes when rel_error(actual, expected) < tol; the failure message says where they differ most.
::testing::AssertionResult close(const std::vector<double>& actual,
                                 const std::vector<double>& expected, double tol);

// The error bound of SPEC "Precision" for results stored as `dtype`.
double tolerance(DType dtype);

// ---- random problems ----

enum class Locations {
  unit,       // uniform in [0, 1]^2
  wide,       // uniform in [-0.3, 1.3]^2: partial corners and fully outside samples
  centres,    // exactly on pixel centres (w + 0.5) / W (use power-of-two maps: exact in f32)
  borders,    // x, y in {0, 1} mixed with uniform ones
  edges,      // on and next to the edges u = -1, u = W of the range rule (dyadic, exact)
  nonfinite,  // NaN, +-inf and huge values mixed with ordinary ones, per coordinate
  cluster,    // uniform in [0.45, 0.55]^2: many samples share pixels (grad_value collisions)
  mixed,      // each sample draws one of the kinds above
};
const char* name(Locations kind);

enum class Weights { softmax, uniform };

struct Shape {
  std::int64_t batch = 1, heads = 1, channels = 1, queries = 1, points = 1;
  std::vector<msda::Level> levels;
  // The v2 attention (SPEC "Points per level and discrete sampling"): points per level (empty:
  // `points` on every level) and the sampling.
  std::vector<std::int64_t> level_points;
  msda::Sampling sampling = msda::Sampling::bilinear;
};
// The shape with points per level and a sampling.
Shape with_v2(Shape shape, std::vector<std::int64_t> level_points,
              msda::Sampling sampling = msda::Sampling::bilinear);

struct DTypes {
  DType value = DType::f32, location = DType::f32, weight = DType::f32;
};
std::string to_string(const DTypes& dtypes);
// The 13 mixes SPEC allows: value f32, f64, bf16 or f16; locations and weights each value's or f32.
const std::vector<DTypes>& dtype_mixes();

std::string describe(const msda::Problem& problem);

msda::Problem make_problem(const Shape& shape, const DTypes& dtypes);

// The tensors of one problem.
struct Tensors {
  Buffer value, locations, weights, grad_output;
  msda::Inputs inputs() const {
    return {value.data(), locations.data(), weights.data()};
  }
  Tensors converted(DType value, DType location, DType weight) const;  // grad_output as value
};

struct Case {
  std::uint64_t seed = 0;
  msda::Problem problem;
  Tensors tensors;
  std::string label;  // seed, shape, dtypes and location kind: for SCOPED_TRACE
};

// The seed of case `index` of the running test (see the top of this file).
std::uint64_t case_seed(std::uint64_t index);

Case make_case(const Shape& shape, const DTypes& dtypes, Locations kind, std::uint64_t seed,
               Weights weights = Weights::softmax);

// Writes one location pair (x, y) of the given kind for level `level` (sizes H, W).
void draw_location(std::mt19937_64& rng, Locations kind, const msda::Level& level, double& x,
                   double& y);

// Buffers for every result of a problem.
struct Results {
  Buffer output, grad_value, grad_locations, grad_weights;
  explicit Results(const msda::Problem& problem);
  void poison();
  msda::Gradients gradients();
  bool guards_intact() const;
};

// Element counts of the tensors of a problem.
std::int64_t value_size(const msda::Problem& p);
std::int64_t location_size(const msda::Problem& p);
std::int64_t weight_size(const msda::Problem& p);
std::int64_t output_size(const msda::Problem& p);

// The problem with every dtype f64 (for the f64 reference on the widened inputs).
msda::Problem as_f64(const msda::Problem& problem);

// Runs forward and backward (all three gradients) with the given backend into freshly poisoned
// results.
void run_all(const msda::Problem& problem, const Tensors& tensors, Results& results,
             const msda::Options& options);

// Every value of msda::Isa, `best` first, then as the enum lists them (each architecture's from
// narrowest to widest).
const std::vector<msda::Isa>& all_isas();

// The instruction sets the cpu backend accepts on this machine (those it rejects with an Error are
// left out), in all_isas() order: `best` first, the widest last.
const std::vector<msda::Isa>& supported_isas();

// The instruction sets a test of the cpu backend runs: supported_isas(), or only those named in the
// environment variable MSDA_TEST_ISA (comma-separated names, e.g. "neon" or "best,avx2"), so that
// a run can test one at a time (scripts/arm64-check.sh under emulation). A name that is unknown or
// not supported here ends the program with an error: a run that asked for an instruction set
// must never pass without testing it.
const std::vector<msda::Isa>& cpu_isas();

// True when the argument name contains one of `names` (case-insensitive); a one-letter name must
// stand alone (delimited by non-alphanumerics), so "D" does not match "value_dtype".
bool names_one_of(const std::string& argument, const std::vector<std::string>& names);

// The fused op's dtypes: value's, then reference_points', sampling_offsets', attention_logits'.
struct FusedDTypes {
  DType value = DType::f32, reference = DType::f32, offset = DType::f32, logit = DType::f32;
};
std::string to_string(const FusedDTypes& d);
// Every mix SPEC allows (25): value f32, f64, bf16 or f16; each of the other three value's or f32.
const std::vector<FusedDTypes>& fused_mixes();

}  // namespace msda_test
