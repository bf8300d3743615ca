// libFuzzer harness for msda's public API (include/msda/msda.h), against SPEC's "Bad input" and
// "Precision" rules. Any violation prints what failed and calls __builtin_trap().
//   - validate() / describe() / check_grad_output_sizes() return or throw msda::Error (naming an
//     argument, an expected and an actual value), never anything else, never crash; for inputs
//     whose validity the harness can decide itself (no size near 2^63) the verdict must match,
//     and an accepted problem's tensors must fit 64-bit offsets;
//   - an accepted problem runs forward and backward on the cpu backend (every instruction set the
//     CPU has, random thread counts and tuning switches, random subsets of gradients) and on the
//     reference backend, in the same dtypes, and the results must agree: where the reference is
//     finite the cpu result is finite, and over those elements
//       ||cpu - ref|| <= tol * max(||ref||, ||magnitude||)
//     where `magnitude` is the same sum over absolute values (so cancelling terms, e.g. weights of
//     +-1e30, cannot make a correct f32 sum look wrong), tol 1e-4 (f32), 1e-10 (f64), 2e-2
//     (bf16, f16) by the result's dtype. Excused: a non-finite cpu element where f32 arithmetic
//     may overflow on the way (SPEC lets f32 accumulate in f32); for f64 locations within
//     rounding of a cell edge or of the range rule (a sample that another rounding of x*W - 0.5
//     puts in another cell), the difference the other rounding makes, and those samples'
//     location gradients; half the compute type's smallest subnormal per product of a weight
//     (a kernel may round a tiny weight, or its product with a bilinear weight, to it); where
//     the fractions lh and lw are not exact in f32 (the fused op's double locations) and the
//     value's dtype computes in f32, what rounding them to f32 changes;
//   - every cpu result is bitwise identical at another thread count (SPEC: deterministic), and
//     Isa::best gives the bits of the widest instruction set the CPU has;
//   - calls with a null tensor, a negative thread count or an unknown backend or instruction set
//     throw msda::Error;
//   - all of the above for the v2 attention (SPEC "Points per level and discrete sampling") and
//     the fused op (SPEC "The fused op"): points per level (P_l of 1..6, and bad lists: a 0, a
//     negative, the wrong count, a sum K past 2^63), discrete sampling, forward_fused /
//     backward_fused with 2 or 4 reference coordinates and an offset_scale (a non-finite one with
//     boxes is an msda::Error naming "offset_scale"; the errors of bad points name "points", of
//     an unknown sampling "sampling"). The fused op is compared through the plain op it equals:
//     the harness materialises the locations (the reference's bits: SPEC's formula in its order,
//     each operation rounded, as the cpu backend promises) and the softmax weights in double, and
//     bounds each fused result by the magnitudes of the plain sums carried through the chain
//     rule. Discrete sampling reads one pixel with weight 1; a sample whose f64 x*W + 0.5 another
//     rounding puts on another pixel is ambiguous as above, and the location gradients
//     (sampling_locations; fused: sampling_offsets and reference_points) must be exactly zero.
// MSDA_FUZZ_STATS=1 prints at exit what the inputs exercised; MSDA_FUZZ_DUMP=1 prints a failing
// problem's tensors.
//
// Input format: a byte stream; when it runs out, a pseudo-random stream seeded by the input
// continues it, so a short input still describes a whole problem. Byte 0 picks describe()
// fuzzing (1 in 8) or problem fuzzing; then the shape (N, Q, M, D, P, L, H and W per level),
// dtypes, one corruption (level_start_index, S, sizes, huge sizes) or, for a corruption byte in
// [160, 224) (no corruption before the v2 fields existed, so older inputs decode as they did),
// the v2 fields (plain or fused, sampling, points per level, reference coordinates and dtype,
// offset_scale) and then the corruption byte proper; options, tuning, a bad call, the gradients
// wanted and how often contents are special values, then per element the contents: location,
// weight, value and grad_output (fused: reference_points, sampling_offsets, attention_logits,
// value, grad_output). fuzz/make_seeds.py writes seeds in this format (fuzz/corpus/).
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "msda/msda.h"
#include "numeric.h"  // src/: the bf16 and f16 bit conversions

namespace {

using msda::Backend;
using msda::DType;
using msda::Isa;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr std::int64_t kMaxElements = std::int64_t(1) << 20;  // per tensor, for a problem we run

// What the inputs exercised, printed at exit when MSDA_FUZZ_STATS is set (to see that a corpus
// reaches the comparisons, not only the rejections).
struct Stats {
  long problems = 0, accepted = 0, ran = 0, describe_calls = 0, describe_accepted = 0, bad_calls = 0,
       compared = 0, skipped_nonfinite = 0, skipped_overflow = 0, isa_runs = 0;
  // The v2 attention and the fused op.
  long v2_problems = 0, v2_accepted = 0, ran_fused = 0, ran_discrete = 0, ran_level_points = 0, zero_checked = 0,
       ambiguous_samples = 0, scale_errors = 0, points_errors = 0;
  ~Stats() {
    if (std::getenv("MSDA_FUZZ_STATS") == nullptr) return;
    std::fprintf(stderr,
                 "fuzz_msda stats: problems %ld, accepted %ld, ran %ld (cpu isa runs %ld), bad calls %ld; "
                 "tensors compared %ld; elements skipped (non-finite reference) %ld, excused (non-finite cpu: overflow, ambiguous) %ld; "
                 "describe %ld, accepted %ld\n"
                 "fuzz_msda stats: v2 problems %ld, accepted %ld; ran fused %ld, discrete %ld, points per level %ld; "
                 "location gradients checked zero %ld; ambiguous samples %ld; offset_scale errors %ld, points errors %ld\n",
                 problems, accepted, ran, isa_runs, bad_calls, compared, skipped_nonfinite, skipped_overflow,
                 describe_calls, describe_accepted, v2_problems, v2_accepted, ran_fused, ran_discrete, ran_level_points,
                 zero_checked, ambiguous_samples, scale_errors, points_errors);
  }
} stats;

// Set while a problem runs: with MSDA_FUZZ_DUMP set, a failure first prints every input element.
void (*dump_inputs)() = nullptr;

[[noreturn]] __attribute__((format(printf, 1, 2))) void fail(const char* format, ...) {
  if (dump_inputs != nullptr && std::getenv("MSDA_FUZZ_DUMP") != nullptr) dump_inputs();
  std::va_list args;
  va_start(args, format);
  std::fputs("fuzz_msda: FAILURE: ", stderr);
  std::vfprintf(stderr, format, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::fflush(stderr);
  __builtin_trap();
}

// ---- the input ------------------------------------------------------------------------------

class Reader {
 public:
  // The continuation is seeded by the whole input, so that every input describes its own
  // contents, even a short one.
  Reader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {
    for (std::size_t i = 0; i < size; ++i) state_ = (state_ ^ data[i]) * 0x100000001B3ull;  // FNV-1a
  }
  std::uint8_t u8() {
    if (at_ < size_) return data_[at_++];
    state_ += 0x9E3779B97F4A7C15ull;  // splitmix64
    std::uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return static_cast<std::uint8_t>((z ^ (z >> 31)) >> 56);
  }
  std::uint16_t u16() { return static_cast<std::uint16_t>(u8() | (u8() << 8)); }

 private:
  const std::uint8_t* data_;
  std::size_t size_, at_ = 0;
  std::uint64_t state_ = 0xCBF29CE484222325ull;
};

// ---- typed buffers --------------------------------------------------------------------------

double load(DType dtype, const void* data, std::int64_t i) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(data)[i];
    case DType::f64: return static_cast<const double*>(data)[i];
    case DType::bf16: return msda::bf16_to_float(static_cast<const msda::bf16*>(data)[i]);
    case DType::f16: return msda::f16_to_float(static_cast<const msda::f16*>(data)[i]);
  }
  return kNaN;
}

void store(DType dtype, void* data, std::int64_t i, double x) {
  // Every value the harness stores is within float's range or not finite.
  switch (dtype) {
    case DType::f32: static_cast<float*>(data)[i] = static_cast<float>(x); return;
    case DType::f64: static_cast<double*>(data)[i] = x; return;
    case DType::bf16: static_cast<msda::bf16*>(data)[i] = msda::float_to_bf16(static_cast<float>(x)); return;
    case DType::f16: static_cast<msda::f16*>(data)[i] = msda::float_to_f16(static_cast<float>(x)); return;
  }
}

// The element's neighbour in its dtype's bit pattern (+1 or -1 in the integer view): the next
// representable value towards or away from zero.
void nudge(DType dtype, void* data, std::int64_t i, int direction) {
  const std::size_t bytes = msda::size_of(dtype);
  unsigned char* p = static_cast<unsigned char*>(data) + static_cast<std::size_t>(i) * bytes;
  std::uint64_t bits = 0;
  std::memcpy(&bits, p, bytes);
  if (direction > 0) ++bits;
  else if (bits > 0) --bits;
  std::memcpy(p, &bits, bytes);
}

struct Buffer {
  DType dtype = DType::f32;
  std::int64_t size = 0;
  std::unique_ptr<unsigned char[]> memory;  // exactly size elements: ASan sees any overrun

  Buffer() = default;
  Buffer(DType t, std::int64_t n)
      : dtype(t), size(n), memory(new unsigned char[static_cast<std::size_t>(n) * msda::size_of(t)]) {}
  std::size_t bytes() const { return static_cast<std::size_t>(size) * msda::size_of(dtype); }
  void* data() { return memory.get(); }
  const void* data() const { return memory.get(); }
  double get(std::int64_t i) const { return load(dtype, data(), i); }
  void set(std::int64_t i, double x) { store(dtype, data(), i, x); }
  // All bits set: NaN in every dtype, so an element the library does not write is caught.
  void poison() { std::memset(data(), 0xFF, bytes()); }
  bool same_bits(const Buffer& other) const {
    return size == other.size && dtype == other.dtype && std::memcmp(data(), other.data(), bytes()) == 0;
  }
};

// ---- sizes ----------------------------------------------------------------------------------

// Product of the factors if it fits in int64 (and every factor is >= 0), else -1.
std::int64_t product(std::initializer_list<std::int64_t> factors) {
  std::int64_t result = 1;
  for (std::int64_t f : factors)
    if (f < 0 || __builtin_mul_overflow(result, f, &result)) return -1;
  return result;
}

// K, the samples of one (n, q, m): L*P, or the sum of the points per level; -1 if it does not
// fit in int64 or a term is negative (Problem::total_points() assumes a validated problem).
std::int64_t points_total(const msda::Problem& p) {
  if (p.level_points.empty()) return product({p.num_levels(), p.points});
  std::int64_t k = 0;
  for (std::int64_t x : p.level_points)
    if (x < 0 || __builtin_add_overflow(k, x, &k)) return -1;
  return k;
}

struct Counts {
  std::int64_t value, samples, output, reference;  // -1: does not fit (reference: the fused op's)
};

Counts counts(const msda::Problem& p) {
  const std::int64_t L = p.num_levels(), K = points_total(p);
  return {product({p.batch, p.value_len, p.heads, p.channels}),
          K < 0 ? -1 : product({p.batch, p.queries, p.heads, K}),
          product({p.batch, p.queries, p.heads, p.channels}),
          product({p.batch, p.queries, L, std::max<std::int64_t>(p.reference_coords, 0)})};
}

bool fits_bytes(std::int64_t elements, DType dtype) {
  std::int64_t bytes;
  return elements >= 0 && !__builtin_mul_overflow(elements, static_cast<std::int64_t>(msda::size_of(dtype)), &bytes);
}

std::string list(const std::vector<std::int64_t>& xs) {
  std::string s = "[";
  for (std::size_t i = 0; i < xs.size(); ++i) s += (i ? "," : "") + std::to_string(xs[i]);
  return s + "]";
}

// The problem's fields; the v2 and fused ones only where they differ from their defaults (so two
// problems print the same iff they are the same).
std::string describe_problem(const msda::Problem& p) {
  std::string s = "N=" + std::to_string(p.batch) + " S=" + std::to_string(p.value_len) + " M=" +
                  std::to_string(p.heads) + " D=" + std::to_string(p.channels) + " Q=" + std::to_string(p.queries) +
                  " P=" + (p.level_points.empty() ? std::to_string(p.points) : list(p.level_points)) + " levels=";
  for (const msda::Level& level : p.levels) s += "(" + std::to_string(level.height) + "," + std::to_string(level.width) + ")";
  s += " starts=";
  for (std::int64_t x : p.level_start_index) s += std::to_string(x) + ",";
  s += " dtypes=" + std::string(msda::name(p.value_dtype)) + "/" + std::string(msda::name(p.location_dtype)) + "/" +
       std::string(msda::name(p.weight_dtype));
  if (p.sampling != msda::Sampling::bilinear)
    s += " sampling=" + std::string(msda::name(p.sampling)) + "(" + std::to_string(static_cast<int>(p.sampling)) + ")";
  if (p.reference_coords != 2 || p.reference_dtype != DType::f32 || !(p.offset_scale == 0.5)) {
    char scale[40];
    std::snprintf(scale, sizeof scale, "%.17g", p.offset_scale);
    s += " reference=" + std::to_string(p.reference_coords) + "/" + std::string(msda::name(p.reference_dtype)) +
         " offset_scale=" + scale;
  }
  return s;
}

void check_error(const msda::Error& e, const char* call) {
  if (e.argument().empty() || e.expected().empty() || e.actual().empty() || std::strlen(e.what()) == 0)
    fail("%s threw msda::Error with an empty field: argument='%s' expected='%s' actual='%s'", call,
         e.argument().c_str(), e.expected().c_str(), e.actual().c_str());
}

// Runs f; true if it returned, false if it threw msda::Error (checked; its argument() in
// *argument when given). Anything else fails.
template <class F>
bool accepts(const char* call, F&& f, std::string* argument = nullptr) {
  try {
    f();
    return true;
  } catch (const msda::Error& e) {
    check_error(e, call);
    if (argument) *argument = e.argument();
    return false;
  } catch (const std::exception& e) {
    fail("%s threw a non-msda exception: %s", call, e.what());
  } catch (...) {
    fail("%s threw a non-std exception", call);
  }
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// SPEC's "Bad input" rules, decided by the harness for problems whose sizes are all small (no
// overflow possible): true when validate() (fused: validate_fused()) must accept.
bool should_accept(const msda::Problem& p, bool fused) {
  if (p.batch < 0 || p.queries < 0 || p.heads < 0 || p.channels < 1 || p.levels.empty() || p.value_len < 0)
    return false;
  // Points per level: one entry per level, each >= 1; `points` is then not read.
  if (p.level_points.empty() ? p.points < 1 : p.level_points.size() != p.levels.size()) return false;
  for (std::int64_t x : p.level_points)
    if (x < 1) return false;
  if (p.sampling != msda::Sampling::bilinear && p.sampling != msda::Sampling::discrete) return false;
  std::int64_t total = 0;
  for (const msda::Level& level : p.levels) {
    if (level.height < 1 || level.width < 1) return false;
    total += level.height * level.width;
  }
  if (p.level_start_index.size() != p.levels.size()) return false;
  std::int64_t start = 0;
  for (std::size_t l = 0; l < p.levels.size(); ++l) {
    if (p.level_start_index[l] != start) return false;
    start += p.levels[l].height * p.levels[l].width;
  }
  if (p.value_len != total) return false;
  const auto allowed = [&](DType t) { return t == p.value_dtype || t == DType::f32; };
  if (!allowed(p.location_dtype) || !allowed(p.weight_dtype)) return false;
  if (!fused) return true;
  // The fused op: 2 or 4 reference coordinates, reference_points' dtype, and with boxes a finite
  // offset_scale (not read with 2 coordinates).
  if (p.reference_coords != 2 && p.reference_coords != 4) return false;
  if (!allowed(p.reference_dtype)) return false;
  return p.reference_coords == 2 || std::isfinite(p.offset_scale);
}

// ---- decoding a problem ---------------------------------------------------------------------

std::int64_t decode_dim(std::uint8_t b) {
  static constexpr std::int64_t kOdd[12] = {0, -1, -7, 0, -1, 1, 1, 2, 16, 13, 0, 1};
  if (b < 160) return 1 + b % 5;  // mostly small maps: fast executions
  return b < 244 ? 1 + b % 12 : kOdd[b - 244];
}

struct Decoded {
  msda::Problem problem;
  bool small = true;         // every size is small: should_accept() decides validity
  bool v2 = false;           // the v2 fields were decoded
  bool fused = false;        // forward_fused / backward_fused (validate_fused, describe_fused)
  bool huge_points = false;  // points per level near 2^63: only the sizes' rules decide (not small)
};

// offset_scale of the fused op: 0.5 (Deformable DETR) usually, sometimes another finite scale
// (D-FINE and RT-DETRv2 pass their own), sometimes not finite (an error with boxes only).
double decode_offset_scale(std::uint8_t b) {
  static constexpr double kFinite[16] = {0.25, 0.75, 1.0, 0.3, 2.0, -0.5, 0.0, 1e-3,
                                         0.1,  1.5,  0.6, 4.0, 1e30, -1.0, 0.125, 0.7};
  static constexpr double kNonFinite[4] = {kNaN, kInf, -kInf, -kNaN};
  if (b < 160) return 0.5;
  return b < 232 ? kFinite[b % 16] : kNonFinite[b % 4];
}

// The v2 fields (after the older ones): plain or fused, the sampling, points per level (valid,
// or one of the bad lists), and for the fused op the reference points' coordinates and dtype and
// offset_scale.
void decode_v2(Reader& r, Decoded& d) {
  msda::Problem& p = d.problem;
  d.v2 = true;
  const std::uint8_t a = r.u8();
  d.fused = (a & 1) != 0;
  p.sampling = (a & 2) ? msda::Sampling::discrete : msda::Sampling::bilinear;
  const std::size_t L = p.levels.size();
  const int mode = (a >> 2) & 7;
  if (mode >= 2 && mode != 6)
    for (std::size_t l = 0; l < L; ++l) p.level_points.push_back(1 + r.u8() % 6);
  if (mode == 6) p.level_points.assign(L, p.points);  // equal points as a list: the [L, P] memory
  if (mode == 7) {  // something unusual or bad about the points or the sampling
    const std::uint8_t e = r.u8();
    const std::size_t k = (e >> 3) % L;
    constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
    switch (e & 7) {
      case 0: p.level_points[k] = 0; break;
      case 1: p.level_points[k] = -1 - (e >> 6); break;
      case 2: p.level_points.push_back(1 + (e >> 3) % 6); break;  // one entry too many
      case 3: p.level_points.pop_back(); break;                   // too few (none left: `points`)
      case 4: p.level_points[k] = kMax; d.huge_points = true; break;  // K overflows (L > 1) or offsets do
      case 5:  // 2^62 on every level: K overflows from L = 2 on; with L = 1, M*K*2 does
        for (std::int64_t& x : p.level_points) x = std::int64_t(1) << 62;
        d.huge_points = true;
        break;
      case 6: p.points = (e & 8) ? 0 : -3; break;  // not read when the points per level are given
      case 7: p.sampling = static_cast<msda::Sampling>(2 + (e >> 3) % 8); break;  // no such sampling
    }
  }
  if (!d.fused) return;
  const std::uint8_t b = r.u8(), c = r.u8();
  static constexpr std::int64_t kBadCoords[4] = {0, 3, 5, -2};
  p.reference_coords = (b & 7) < 4 ? 4 : (b & 7) < 7 ? 2 : kBadCoords[b >> 6];
  p.reference_dtype = (b & 8) ? DType::f32 : p.value_dtype;
  if ((b & 0x30) == 0x30) p.reference_dtype = static_cast<DType>(b >> 6);  // any, maybe not allowed
  p.offset_scale = decode_offset_scale(c);
}

Decoded decode_problem(Reader& r) {
  Decoded d;
  msda::Problem& p = d.problem;
  p.batch = r.u8() % 4;
  p.queries = r.u8() % 21;
  p.heads = 1 + r.u8() % 4;
  const std::uint8_t db = r.u8();
  p.channels = db < 64 ? 32 : 1 + db % 40;
  p.points = 1 + r.u8() % 5;
  const int L = 1 + r.u8() % 4;
  for (int l = 0; l < L; ++l) {
    const std::int64_t h = decode_dim(r.u8()), w = decode_dim(r.u8());
    p.levels.push_back({h, w});
  }
  std::int64_t start = 0;
  for (const msda::Level& level : p.levels) {
    p.level_start_index.push_back(start);
    start += level.height * level.width;
  }
  p.value_len = start;

  const std::uint8_t tb = r.u8();
  p.value_dtype = static_cast<DType>(tb & 3);
  if ((tb >> 6) == 3) {  // any mix, most of them illegal
    p.location_dtype = static_cast<DType>((tb >> 2) & 3);
    p.weight_dtype = static_cast<DType>((tb >> 4) & 3);
  } else {
    p.location_dtype = (tb >> 2) & 1 ? DType::f32 : p.value_dtype;
    p.weight_dtype = (tb >> 3) & 1 ? DType::f32 : p.value_dtype;
  }

  std::uint8_t cb = r.u8();
  if (cb >= 160 && cb < 224) {  // the v2 fields, then the corruption byte
    decode_v2(r, d);
    cb = r.u8();
  }
  if (cb >= 224) {
    const std::size_t k = r.u8() % p.levels.size();
    constexpr std::int64_t kBig = std::int64_t(1) << 62, kMax = std::numeric_limits<std::int64_t>::max();
    auto restart = [&] {  // level_start_index and S consistent with (possibly huge) levels
      __int128 s = 0;
      for (std::size_t l = 0; l < p.levels.size(); ++l) {
        p.level_start_index[l] = s > kMax ? kMax : static_cast<std::int64_t>(s);
        s += static_cast<__int128>(p.levels[l].height) * p.levels[l].width;
      }
      p.value_len = s > kMax ? kMax : static_cast<std::int64_t>(s);
    };
    switch (cb - 224) {
      case 0: p.level_start_index[k] += 1; break;
      case 1: p.level_start_index[k] -= 1; break;
      case 2: p.level_start_index.pop_back(); break;
      case 3: p.level_start_index.push_back(p.value_len); break;
      case 4: p.value_len += 1; break;
      case 5: p.value_len -= 1; break;
      case 6: p.batch = -1; break;
      case 7: p.queries = -1; break;
      case 8: p.heads = 0; break;
      case 9: p.heads = -1; break;
      case 10: p.channels = 0; break;
      case 11: p.points = 0; break;
      case 12: p.levels.clear(); p.level_start_index.clear(); break;
      case 13: p.channels = -5; break;
      case 14: p.queries = kBig; d.small = false; break;
      case 15: p.batch = 0; p.queries = kMax; d.small = false; break;
      case 16: p.levels[k] = {std::int64_t(1) << 32, std::int64_t(1) << 32}; restart(); d.small = false; break;
      case 17: p.levels[k] = {std::int64_t(1) << 31, std::int64_t(1) << 31}; restart(); d.small = false; break;
      case 18: p.channels = std::int64_t(1) << 40; d.small = false; break;
      case 19: p.points = std::int64_t(1) << 61; d.small = false; break;
      case 20: p.queries = 0; break;
      case 21: p.batch = 0; break;
      case 22: std::swap(p.level_start_index.front(), p.level_start_index.back()); break;
      case 23: for (std::int64_t& s : p.level_start_index) s = 0; break;
      case 24: p.levels[k].height = 0; break;
      case 25: p.levels[k].width = -1; break;
      case 26: p.heads = kMax; p.batch = 0; d.small = false; break;
      case 27: p.value_len = -p.value_len - 1; break;
      case 28: p.levels[k] = {kMax, 1}; restart(); d.small = false; break;
      case 29: p.levels[k] = {-3, -4}; restart(); break;  // a positive H*W from negative sizes
      default: break;
    }
  }
  return d;
}

// ---- contents -------------------------------------------------------------------------------

constexpr double kSpecials[16] = {kNaN,  kInf, -kInf, 1e30, -1e30, 1e-30, -1e-30, 0.0,
                                  -0.0,  1.0,  -1.0,  0.5,  2.0,   1e-40, 1.0 - 0x1p-24, 3.0e38};

// How often an element is one of the specials above (or, for values, of their own list): a
// header byte of the problem picks none, ~1/64, 1/8 or 1/2, so that most problems have results
// the comparisons can check, and some are full of NaN, inf and extremes.
struct Rate {
  unsigned special_from;  // element bytes >= this are specials
  explicit Rate(std::uint8_t b) : special_from(kFrom[b & 3]) {}
  static constexpr unsigned kFrom[4] = {256, 252, 224, 128};
  // A byte below special_from, spread over [0, 240).
  unsigned ordinary(std::uint8_t kind) const { return kind * 240u / special_from; }
};

// One coordinate (x along a map of `size` columns, or y along `size` rows).
void fill_location(Reader& r, Rate rate, Buffer& b, std::int64_t i, std::int64_t size) {
  const std::uint8_t byte = r.u8();
  if (byte >= rate.special_from) return b.set(i, kSpecials[byte % 16]);
  const unsigned kind = rate.ordinary(byte);
  const double n = static_cast<double>(size);
  if (kind < 150) {
    b.set(i, r.u16() / 65536.0 * 1.5 - 0.25);  // mostly on the map, some partly or fully off
  } else if (kind < 185) {
    b.set(i, (static_cast<double>(r.u8() % (size + 2)) - 1 + 0.5) / n);  // a pixel centre
  } else if (kind < 215) {
    b.set(i, static_cast<double>(r.u8() % (size + 3) - 1) / n);  // a pixel border
  } else {
    // the edges u = -1 and u = size of the range rule, or a neighbour in the dtype
    const std::uint8_t e = r.u8();
    b.set(i, (e & 1) ? (n + 0.5) / n : -0.5 / n);
    if (e & 2) nudge(b.dtype, b.data(), i, (e & 4) ? 1 : -1);
  }
}

void fill_weight(Reader& r, Rate rate, Buffer& b, std::int64_t i) {
  const std::uint8_t byte = r.u8();
  if (byte >= rate.special_from) return b.set(i, kSpecials[byte % 16]);
  const unsigned kind = rate.ordinary(byte);
  if (kind < 200) b.set(i, static_cast<std::int8_t>(r.u8()) / 32.0);
  else if (kind < 230) b.set(i, r.u16() / 65536.0);
  else b.set(i, (kind & 1 ? -1.0 : 1.0) * std::ldexp(1.0 + r.u8() / 256.0, r.u8() % 100 - 60));  // 2^-60 .. 2^39
}

// value and grad_output: k/16 in [-7.5, 7.5) (exact in every dtype), sometimes a special; NaN and inf
// only when `nonfinite`.
void fill_value(Reader& r, Rate rate, Buffer& b, std::int64_t i, bool nonfinite) {
  const std::uint8_t byte = r.u8();
  static constexpr double kFinite[8] = {1e4, -1e4, 1e-30, 1.0 / 3.0, 0.1, -0.0, 65504.0, 1e-7};
  static constexpr double kAny[8] = {kNaN, kInf, -kInf, 1e4, 1e30, -0.0, 0.1, 1e-40};
  if (byte >= rate.special_from) return b.set(i, (nonfinite ? kAny : kFinite)[byte % 8]);
  b.set(i, (static_cast<double>(rate.ordinary(byte)) - 120.0) / 16.0);
}

// The fused op's contents. A box size (w or h of reference_points with 4 coordinates): mostly a
// fraction of the map, sometimes a power of two (exact products), sometimes a special.
void fill_box(Reader& r, Rate rate, Buffer& b, std::int64_t i) {
  const std::uint8_t byte = r.u8();
  if (byte >= rate.special_from) return b.set(i, kSpecials[byte % 16]);
  const unsigned kind = rate.ordinary(byte);
  if (kind < 200) b.set(i, 0.02 + r.u16() / 65536.0);
  else b.set(i, std::ldexp(1.0, -static_cast<int>(r.u8() % 6)));
}

// One coordinate of a sampling offset (x along a level of `size` columns, or y along `size`
// rows), after the reference point's coordinate `origin` and (boxes) size `box` were filled:
// mostly within a few pixels (2 coordinates) or within the box (4: loc = origin + off / P_l *
// box * offset_scale), sometimes whole pixels or steps that put the location on a pixel edge or
// centre up to rounding, sometimes a special.
void fill_offset(Reader& r, Rate rate, Buffer& b, std::int64_t i, std::int64_t size, std::int64_t points,
                 std::int64_t coords, double box, double scale) {
  const std::uint8_t byte = r.u8();
  if (byte >= rate.special_from) return b.set(i, kSpecials[byte % 16]);
  const unsigned kind = rate.ordinary(byte);
  const double n = static_cast<double>(size), P = static_cast<double>(points);
  if (kind < 150) {
    const double unit = r.u16() / 32768.0 - 1.0;  // [-1, 1)
    b.set(i, coords == 2 ? 4.0 * unit : 1.5 * P * unit);
  } else if (kind < 215) {
    const double steps = static_cast<double>(static_cast<int>(r.u8() % 13) - 6) * 0.5;  // -3 .. 3 pixels, by halves
    // 2 coordinates: loc = origin + steps / size. Boxes: the offset that moves the location by
    // steps / size where the box and scale allow it, else whole multiples of P_l.
    const double per_pixel = P / (n * box * scale);
    b.set(i, coords == 2 ? steps : std::isfinite(per_pixel) && per_pixel != 0 ? steps * per_pixel : steps * P);
  } else {
    b.set(i, static_cast<std::int8_t>(r.u8()) / 64.0);  // any small offset, exact in every dtype
  }
}

// A logit (before the softmax over the K samples of a head): mostly a few units, sometimes a
// special: -inf (a masked sample), NaN, +inf, extremes.
void fill_logit(Reader& r, Rate rate, Buffer& b, std::int64_t i) {
  const std::uint8_t byte = r.u8();
  static constexpr double kLogitSpecials[8] = {-kInf, -kInf, kNaN, kInf, 1e30, -1e30, 88.0, -100.0};
  if (byte >= rate.special_from) return b.set(i, kLogitSpecials[byte % 8]);
  const unsigned kind = rate.ordinary(byte);
  if (kind < 200) b.set(i, static_cast<std::int8_t>(r.u8()) / 16.0);
  else b.set(i, r.u16() / 65536.0 * 40.0 - 20.0);
}

// ---- the magnitudes of the sums (SPEC "Forward" and "Backward" over absolute values) ----------

// Where a sample lands. Bilinear (SPEC "Forward"): u = x*W - 0.5, v = y*H - 0.5; discrete (SPEC
// "Points per level and discrete sampling"): the pixel (clamp(trunc(y*H + 0.5)),
// clamp(trunc(x*W + 0.5))) with weight 1, none for a NaN coordinate. Each coordinate computed as
// the reference does (rounding x*W, then adding) or with a fused multiply-add (as a kernel built
// with FMA contraction may).
struct Geometry {
  bool in = false;
  std::int64_t h0 = 0, w0 = 0;              // the cell (floor of v and u) or the discrete pixel
  std::int64_t row[4] = {-1, -1, -1, -1};  // the corners' rows in value (-1: off the map)
  double weight[4] = {0, 0, 0, 0};          // their bilinear weights
  double lh = 0, lw = 0;
};

Geometry locate(double x, double y, std::int64_t H, std::int64_t W, std::int64_t start, bool discrete,
                bool fused_u = false, bool fused_v = false) {
  Geometry g;
  const double Wd = static_cast<double>(W), Hd = static_cast<double>(H);
  volatile double xw = x * Wd, yh = y * Hd;  // volatile: never contracted
  if (discrete) {
    if (std::isnan(x) || std::isnan(y)) return g;
    const auto pixel = [](double t, double last) {
      t = std::trunc(t);
      return static_cast<std::int64_t>(t < 0 ? 0.0 : t > last ? last : t);
    };
    g.in = true;
    g.w0 = pixel(fused_u ? std::fma(x, Wd, 0.5) : xw + 0.5, Wd - 1);
    g.h0 = pixel(fused_v ? std::fma(y, Hd, 0.5) : yh + 0.5, Hd - 1);
    g.row[0] = start + g.h0 * W + g.w0;
    g.weight[0] = 1;
    return g;
  }
  const double u = fused_u ? std::fma(x, Wd, -0.5) : xw - 0.5, v = fused_v ? std::fma(y, Hd, -0.5) : yh - 0.5;
  g.in = v > -1 && u > -1 && v < Hd && u < Wd;
  if (!g.in) return g;
  const auto h0 = static_cast<std::int64_t>(std::floor(v)), w0 = static_cast<std::int64_t>(std::floor(u));
  g.h0 = h0;
  g.w0 = w0;
  g.lh = v - static_cast<double>(h0);
  g.lw = u - static_cast<double>(w0);
  const double hh = 1 - g.lh, hw = 1 - g.lw;
  const double weight[4] = {hh * hw, hh * g.lw, g.lh * hw, g.lh * g.lw};
  const std::int64_t hs[4] = {h0, h0, h0 + 1, h0 + 1}, ws[4] = {w0, w0 + 1, w0, w0 + 1};
  for (int k = 0; k < 4; ++k) {
    const bool on = hs[k] >= 0 && hs[k] < H && ws[k] >= 0 && ws[k] < W;
    g.row[k] = on ? start + hs[k] * W + ws[k] : -1;
    g.weight[k] = on ? weight[k] : 0.0;
  }
  return g;
}

// The same cell (bilinear: the range rule's verdict and floor(u), floor(v); discrete: the pixel).
bool same_cell(const Geometry& a, const Geometry& b) {
  return a.in == b.in && (!a.in || (a.h0 == b.h0 && a.w0 == b.w0));
}

// Each sample's level, and the first of each level's samples among a head's K (SPEC "Points per
// level": level l's samples at k in [first[l], first[l + 1])).
struct Layout {
  std::int64_t K = 0;
  std::vector<std::int64_t> level_of, first;
  explicit Layout(const msda::Problem& p) {
    first.push_back(0);
    for (std::int64_t l = 0; l < p.num_levels(); ++l) {
      first.push_back(first.back() + p.points_of(l));
      level_of.insert(level_of.end(), static_cast<std::size_t>(p.points_of(l)), l);
    }
    K = first.back();
  }
};

struct Tensors {
  // The fused op: locations holds sampling_offsets, weights attention_logits.
  Buffer value, locations, weights, grad_output, reference;
  msda::Inputs inputs() const { return {value.data(), locations.data(), weights.data()}; }
  msda::FusedInputs fused_inputs() const { return {value.data(), reference.data(), locations.data(), weights.data()}; }
};

// Per element of each result: the same sums over absolute values (the scale of the rounding
// error), and how much an ambiguous sample (one another rounding puts in another cell or pixel)
// can legitimately change the element.
struct Magnitudes {
  std::vector<double> output, grad_value, grad_locations, grad_weights;
  std::vector<double> output_slack, grad_value_slack, grad_weights_slack, grad_locations_slack;
  std::vector<char> location_ambiguous;  // per grad_locations element: not compared
  // Some ambiguous sample has a non-finite weight: whether it is zeroed (finite results) or not
  // (NaN or inf) depends on rounding.
  bool ambiguous_nonfinite_weight = false;
  bool any_ambiguous = false;
};

// The plain op's magnitudes for problem p's samples at `locations` with `weights` (f64 for the
// fused op: its materialised locations and softmax weights). `rounding`: whether another
// rounding of x*W - 0.5 (x*W + 0.5 discrete) can move a sample: f64 coordinates only (x*W is
// exact in double for f32, bf16 and f16 x). The fused op's locations themselves are the
// reference's bits: the cpu backend computes SPEC's formula in the reference's order, rounding
// each operation (src/cpu/kernels.inl, Group::load; tests/test_fused.cpp, Draw::boundaries).
Magnitudes magnitudes(const msda::Problem& p, const Layout& layout, const Buffer& value, const Buffer& locations,
                      const Buffer& weights, const Buffer& grad_output, bool rounding) {
  const std::int64_t N = p.batch, S = p.value_len, M = p.heads, D = p.channels, Q = p.queries, K = layout.K;
  const bool discrete = p.sampling == msda::Sampling::discrete;
  Magnitudes mag;
  const Counts c = counts(p);
  mag.output.assign(static_cast<std::size_t>(c.output), 0.0);
  mag.grad_value.assign(static_cast<std::size_t>(c.value), 0.0);
  mag.grad_locations.assign(static_cast<std::size_t>(2 * c.samples), 0.0);
  mag.grad_weights.assign(static_cast<std::size_t>(c.samples), 0.0);
  mag.output_slack.assign(mag.output.size(), 0.0);
  mag.grad_value_slack.assign(mag.grad_value.size(), 0.0);
  mag.grad_weights_slack.assign(mag.grad_weights.size(), 0.0);
  mag.grad_locations_slack.assign(mag.grad_locations.size(), 0.0);
  // The spacing of the compute type's subnormals: a kernel may round a * (bilinear weight), or the
  // weight itself (the fused op's softmax, computed in double), to the compute type, which for a
  // weight near its smallest values is an absolute error of up to half this spacing, however
  // large the value it then multiplies.
  const bool f32_compute = p.value_dtype != DType::f64;
  const double spacing = f32_compute ? 0x1p-149 : 0x1p-1074;
  mag.location_ambiguous.assign(static_cast<std::size_t>(2 * c.samples), 0);
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t q = 0; q < Q; ++q)
      for (std::int64_t m = 0; m < M; ++m)
        for (std::int64_t k = 0; k < K; ++k) {
          const std::int64_t i = ((n * Q + q) * M + m) * K + k, l = layout.level_of[static_cast<std::size_t>(k)];
          const std::int64_t H = p.levels[l].height, W = p.levels[l].width, start = p.level_start_index[l];
          const std::int64_t out_row = ((n * Q + q) * M + m) * D;
          const double a = weights.get(i), x = locations.get(2 * i), y = locations.get(2 * i + 1);
          const auto value_at = [&](std::int64_t row, std::int64_t d) {
            return row < 0 ? 0.0 : value.get(((n * S + row) * M + m) * D + d);
          };
          const Geometry g = locate(x, y, H, W, start, discrete);
          if (rounding) {
            // Every other rounding of x*W -/+ 0.5 (with or without a fused multiply-add).
            Geometry variants[3];
            int count = 0;
            for (int variant = 1; variant < 4; ++variant)
              variants[count++] = locate(x, y, H, W, start, discrete, variant & 1, variant & 2);
            bool ambiguous = false;
            for (int v = 0; v < count; ++v) ambiguous = ambiguous || !same_cell(variants[v], g);
            if (ambiguous) {
              ++stats.ambiguous_samples;
              mag.any_ambiguous = true;
              mag.location_ambiguous[2 * i] = mag.location_ambiguous[2 * i + 1] = 1;
              if (!std::isfinite(a)) mag.ambiguous_nonfinite_weight = true;
              // What the sample adds under each other rounding, minus what it adds here.
              for (int v = 0; v < count; ++v) {
                const Geometry& f = variants[v];
                std::int64_t rows[8];  // the corners of either
                int corners = 0;
                for (const Geometry* e : {&f, &g})
                  for (std::int64_t row : e->row)
                    if (row >= 0 && std::find(rows, rows + corners, row) == rows + corners) rows[corners++] = row;
                const auto weight_at = [](const Geometry& e, std::int64_t row) {
                  double w = 0;
                  for (int k = 0; k < 4; ++k) w += e.row[k] == row ? e.weight[k] : 0.0;
                  return w;
                };
                double dot = 0;
                for (std::int64_t d = 0; d < D; ++d) {
                  double delta = 0;
                  for (int k = 0; k < 4; ++k) delta += f.weight[k] * value_at(f.row[k], d) - g.weight[k] * value_at(g.row[k], d);
                  const double g_d = grad_output.get(out_row + d);
                  mag.output_slack[out_row + d] += std::fabs(a * delta);
                  dot += g_d * delta;
                  for (int r = 0; r < corners; ++r)
                    mag.grad_value_slack[((n * S + rows[r]) * M + m) * D + d] +=
                        std::fabs(a * (weight_at(f, rows[r]) - weight_at(g, rows[r])) * g_d);
                }
                mag.grad_weights_slack[i] += std::fabs(dot);
              }
            }
          }
          if (!g.in) continue;
          const double hh = 1 - g.lh, hw = 1 - g.lw;
          // The cpu backend rounds the fractions lh and lw to the compute type once (SPEC lets
          // f32, bf16 and f16 interpolate in f32), which is exact for f32, bf16 and f16
          // coordinates on small maps but not for a double location (f64 coordinates compute in
          // double): an absolute error in each corner weight, and in the location gradients, that
          // no magnitude of the sum scales (a corner weight 1e-8 of a value 65504 may become 0).
          // Twice the rounding of these fractions, as slack.
          double corner_error[4] = {0, 0, 0, 0}, lh_error = 0, lw_error = 0;
          if (!discrete && f32_compute) {
            const double lh_c = static_cast<float>(g.lh), lw_c = static_cast<float>(g.lw);
            lh_error = 2 * std::fabs(lh_c - g.lh);
            lw_error = 2 * std::fabs(lw_c - g.lw);
            const double hh_c = 1 - lh_c, hw_c = 1 - lw_c;
            const double rounded_weight[4] = {hh_c * hw_c, hh_c * lw_c, lh_c * hw_c, lh_c * lw_c};
            for (int k = 0; k < 4; ++k)
              if (g.row[k] >= 0) corner_error[k] = 2 * std::fabs(rounded_weight[k] - g.weight[k]);
          }
          double dot = 0, du = 0, dv = 0, dot_error = 0, values_error = 0;
          for (std::int64_t d = 0; d < D; ++d) {
            const double g_d = std::fabs(grad_output.get(out_row + d));
            double v[4];
            for (int k = 0; k < 4; ++k) v[k] = std::fabs(value_at(g.row[k], d));
            const double sample = g.weight[0] * v[0] + g.weight[1] * v[1] + g.weight[2] * v[2] + g.weight[3] * v[3];
            const double sample_error = corner_error[0] * v[0] + corner_error[1] * v[1] + corner_error[2] * v[2] +
                                        corner_error[3] * v[3];
            mag.output[out_row + d] += std::fabs(a) * sample;
            mag.output_slack[out_row + d] += spacing * (v[0] + v[1] + v[2] + v[3]) + std::fabs(a) * sample_error;
            dot += g_d * sample;
            dot_error += g_d * sample_error;
            values_error += g_d * (v[0] + v[1] + v[2] + v[3]);
            du += g_d * (hh * (v[1] + v[0]) + g.lh * (v[3] + v[2]));
            dv += g_d * (hw * (v[2] + v[0]) + g.lw * (v[3] + v[1]));
            for (int k = 0; k < 4; ++k)
              if (g.row[k] >= 0) {
                mag.grad_value[((n * S + g.row[k]) * M + m) * D + d] += std::fabs(a) * g.weight[k] * g_d;
                mag.grad_value_slack[((n * S + g.row[k]) * M + m) * D + d] +=
                    spacing * g_d + std::fabs(a) * corner_error[k] * g_d;
              }
          }
          mag.grad_weights[i] = dot;
          mag.grad_weights_slack[i] += dot_error;
          if (!discrete) {  // discrete: no location gradient (checked to be exactly zero)
            mag.grad_locations[2 * i] = std::fabs(a) * static_cast<double>(W) * du;
            mag.grad_locations[2 * i + 1] = std::fabs(a) * static_cast<double>(H) * dv;
            // d/du weighs the value differences by hh and lh (the row fraction), d/dv by hw and lw.
            mag.grad_locations_slack[2 * i] =
                spacing * static_cast<double>(W) * du + std::fabs(a) * static_cast<double>(W) * lh_error * values_error;
            mag.grad_locations_slack[2 * i + 1] =
                spacing * static_cast<double>(H) * dv + std::fabs(a) * static_cast<double>(H) * lw_error * values_error;
          }
        }
  return mag;
}

// ---- the fused op through the plain op ----------------------------------------------------------

// SPEC "The fused op" as the reference computes it, in double (this file is built without
// contraction): each sample's location and softmax weight.
struct Materialised {
  Buffer locations, weights;
};

Materialised materialise(const msda::Problem& p, const Layout& layout, const Tensors& t) {
  const std::int64_t N = p.batch, Q = p.queries, M = p.heads, L = p.num_levels(), K = layout.K, C = p.reference_coords;
  const Counts c = counts(p);
  Materialised out{Buffer(DType::f64, 2 * c.samples), Buffer(DType::f64, c.samples)};
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t q = 0; q < Q; ++q)
      for (std::int64_t m = 0; m < M; ++m) {
        const std::int64_t row = ((n * Q + q) * M + m) * K;
        // The softmax, max-subtracted: a NaN logit or a row of -inf gives a row of NaN.
        double max = -kInf, total = 0;
        for (std::int64_t k = 0; k < K; ++k) max = t.weights.get(row + k) > max ? t.weights.get(row + k) : max;
        for (std::int64_t k = 0; k < K; ++k) total += std::exp(t.weights.get(row + k) - max);
        for (std::int64_t k = 0; k < K; ++k) out.weights.set(row + k, std::exp(t.weights.get(row + k) - max) / total);
        for (std::int64_t k = 0; k < K; ++k) {
          const std::int64_t i = row + k, l = layout.level_of[static_cast<std::size_t>(k)];
          const std::int64_t r = ((n * Q + q) * L + l) * C;
          const double ox = t.locations.get(2 * i), oy = t.locations.get(2 * i + 1);
          const double rx = t.reference.get(r), ry = t.reference.get(r + 1);
          if (C == 2) {
            out.locations.set(2 * i, rx + ox / static_cast<double>(p.levels[l].width));
            out.locations.set(2 * i + 1, ry + oy / static_cast<double>(p.levels[l].height));
          } else {
            const double P = static_cast<double>(p.points_of(l)), s = p.offset_scale;
            const double tx = ox / P * t.reference.get(r + 2), ty = oy / P * t.reference.get(r + 3);
            out.locations.set(2 * i, rx + tx * s);
            out.locations.set(2 * i + 1, ry + ty * s);
          }
        }
      }
  return out;
}

// How one result is compared with the reference's.
struct Check {
  std::vector<double> magnitude;
  std::vector<double> slack;  // per element, a difference that is not an error; empty: none
  std::vector<char> skip;     // per element, not compared (ambiguous location gradients); empty: none
  bool zero = false;          // discrete sampling's location gradients: every element exactly 0
};

std::vector<Check> plain_checks(const msda::Problem& p, Magnitudes& mag) {
  std::vector<Check> checks(4);
  checks[0] = {std::move(mag.output), std::move(mag.output_slack), {}, false};
  checks[1] = {std::move(mag.grad_value), std::move(mag.grad_value_slack), {}, false};
  checks[2] = {std::move(mag.grad_locations), std::move(mag.grad_locations_slack), std::move(mag.location_ambiguous),
               p.sampling == msda::Sampling::discrete};
  checks[3] = {std::move(mag.grad_weights), std::move(mag.grad_weights_slack), {}, false};
  return checks;
}

// The fused op's results from the plain magnitudes over its materialised samples, through the
// chain rule of SPEC "The fused op" (the reference backend's backward_fused) over absolute values:
// d location / d offset is 1 / (W, H), or (w, h) * offset_scale / P_l with boxes; d location /
// d reference point is 1, and / d box size offset / P_l * offset_scale; the softmax's backward
// a_j (g_j - sum_k a_k g_k). A sample with no location gradient adds nothing (its factor may be
// infinite).
std::vector<Check> fused_checks(const msda::Problem& p, const Layout& layout, const Tensors& t,
                                const Materialised& mat, Magnitudes& mag, double& max_factor) {
  const std::int64_t N = p.batch, Q = p.queries, M = p.heads, L = p.num_levels(), K = layout.K, C = p.reference_coords;
  const bool discrete = p.sampling == msda::Sampling::discrete;
  const Counts c = counts(p);
  std::vector<Check> checks(5);
  Check& reference = checks[2];
  Check& offsets = checks[3];
  Check& logits = checks[4];
  reference.magnitude.assign(static_cast<std::size_t>(c.reference), 0.0);
  reference.skip.assign(static_cast<std::size_t>(c.reference), 0);
  reference.zero = offsets.zero = discrete;
  offsets.magnitude.assign(static_cast<std::size_t>(2 * c.samples), 0.0);
  offsets.slack.assign(static_cast<std::size_t>(2 * c.samples), 0.0);
  reference.slack.assign(static_cast<std::size_t>(c.reference), 0.0);
  logits.magnitude.assign(static_cast<std::size_t>(c.samples), 0.0);
  logits.slack.assign(static_cast<std::size_t>(c.samples), 0.0);
  const auto times = [](double g, double x) { return g == 0 ? 0.0 : g * std::fabs(x); };
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t q = 0; q < Q; ++q)
      for (std::int64_t m = 0; m < M; ++m) {
        const std::int64_t row = ((n * Q + q) * M + m) * K;
        double dot = 0, dot_slack = 0;
        for (std::int64_t k = 0; k < K; ++k) {
          dot += mat.weights.get(row + k) * mag.grad_weights[row + k];
          dot_slack += mat.weights.get(row + k) * mag.grad_weights_slack[row + k];
        }
        for (std::int64_t k = 0; k < K; ++k) {
          const std::int64_t i = row + k, l = layout.level_of[static_cast<std::size_t>(k)];
          const double a = mat.weights.get(i);
          logits.magnitude[i] = a * (mag.grad_weights[i] + dot);
          logits.slack[i] = a * (mag.grad_weights_slack[i] + dot_slack);
          const std::int64_t r = ((n * Q + q) * L + l) * C;
          const double gx = mag.grad_locations[2 * i], gy = mag.grad_locations[2 * i + 1];
          const double sx = mag.grad_locations_slack[2 * i], sy = mag.grad_locations_slack[2 * i + 1];
          double* ref = reference.magnitude.data() + r;
          double* ref_slack = reference.slack.data() + r;
          ref[0] += gx;
          ref[1] += gy;
          ref_slack[0] += sx;
          ref_slack[1] += sy;
          if (C == 2) {
            offsets.magnitude[2 * i] = gx / static_cast<double>(p.levels[l].width);
            offsets.magnitude[2 * i + 1] = gy / static_cast<double>(p.levels[l].height);
            offsets.slack[2 * i] = sx / static_cast<double>(p.levels[l].width);
            offsets.slack[2 * i + 1] = sy / static_cast<double>(p.levels[l].height);
          } else {
            const double P = static_cast<double>(p.points_of(l)), s = p.offset_scale;
            ref[2] += times(gx, t.locations.get(2 * i) / P * s);
            ref[3] += times(gy, t.locations.get(2 * i + 1) / P * s);
            ref_slack[2] += times(sx, t.locations.get(2 * i) / P * s);
            ref_slack[3] += times(sy, t.locations.get(2 * i + 1) / P * s);
            offsets.magnitude[2 * i] = times(gx, t.reference.get(r + 2) * s / P);
            offsets.magnitude[2 * i + 1] = times(gy, t.reference.get(r + 3) * s / P);
            offsets.slack[2 * i] = times(sx, t.reference.get(r + 2) * s / P);
            offsets.slack[2 * i + 1] = times(sy, t.reference.get(r + 3) * s / P);
          }
          // The largest factor a location gradient meets (1 / (W, H) <= 1 with 2 coordinates).
          if (C == 4 && (gx != 0 || gy != 0)) {
            const double P = static_cast<double>(p.points_of(l)), s = std::fabs(p.offset_scale);
            for (double f : {t.reference.get(r + 2) * s / P, t.reference.get(r + 3) * s / P,
                             t.locations.get(2 * i) / P * s, t.locations.get(2 * i + 1) / P * s})
              if (std::isfinite(f)) max_factor = std::max(max_factor, std::fabs(f));
          }
          if (mag.location_ambiguous[2 * i])  // its location gradient may be another one's
            for (std::int64_t e = 0; e < C; ++e) reference.skip[static_cast<std::size_t>(r + e)] = 1;
        }
      }
  offsets.skip = std::move(mag.location_ambiguous);
  checks[0] = {std::move(mag.output), std::move(mag.output_slack), {}, false};
  checks[1] = {std::move(mag.grad_value), std::move(mag.grad_value_slack), {}, false};
  return checks;
}

// ---- comparing ------------------------------------------------------------------------------

double tolerance(DType dtype) {
  switch (dtype) {
    case DType::f32: return 1e-4;
    case DType::f64: return 1e-10;
    case DType::bf16:
    case DType::f16: return 2e-2;
  }
  return 0;
}

double denorm_min(DType dtype) {
  switch (dtype) {
    case DType::f32:
    case DType::bf16: return 0x1p-149;  // bf16's subnormals are coarser, but its compute type is f32
    case DType::f64: return 0x1p-1074;
    case DType::f16: return 0x1p-24;
  }
  return 0;
}

double max_finite(DType dtype) {
  switch (dtype) {
    case DType::f32:
    case DType::bf16: return 3.4028234663852886e38;
    case DType::f64: return std::numeric_limits<double>::max();
    case DType::f16: return 65504.0;
  }
  return 0;
}

double max_abs(const Buffer& b) {
  double m = 0;
  for (std::int64_t i = 0; i < b.size; ++i)
    if (std::isfinite(b.get(i))) m = std::max(m, std::fabs(b.get(i)));  // NaN and inf make NaN and inf references
  return m;
}

struct Context {
  const msda::Problem* problem;
  const char* isa;
  int threads;
  // With f32 arithmetic (value f32, bf16 or f16) a product of the largest inputs could overflow
  // although the rounded result is finite (SPEC lets f32 accumulate in f32).
  bool f32_may_overflow;
  // A sample on the edge of a cell or of the range rule by rounding only (see ambiguous()) with a
  // non-finite weight, value or grad_output: the cpu backend may count it where the reference
  // zeroes it.
  bool ambiguous_nonfinite;
};

void compare(const char* what, const Buffer& cpu, const Buffer& ref, const Check& check, const Context& ctx) {
  const std::int64_t n = ref.size;
  if (check.zero) {  // discrete sampling: the location has no gradient, written as zeros
    ++stats.zero_checked;
    for (std::int64_t i = 0; i < n; ++i) {
      if (ref.get(i) != 0)
        fail("%s[%lld] is %g in the reference, not 0 (discrete sampling): %s", what, static_cast<long long>(i),
             ref.get(i), describe_problem(*ctx.problem).c_str());
      if (cpu.get(i) != 0)
        fail("%s[%lld] is %g, not 0 (discrete sampling; isa %s, threads %d): %s", what, static_cast<long long>(i),
             cpu.get(i), ctx.isa, ctx.threads, describe_problem(*ctx.problem).c_str());
    }
    return;
  }
  const std::vector<double>& magnitude = check.magnitude;
  const std::vector<double>* slack = check.slack.empty() ? nullptr : &check.slack;
  const std::vector<char>* skip = check.skip.empty() ? nullptr : &check.skip;
  const DType compute = ctx.problem->value_dtype == DType::f64 ? DType::f64 : DType::f32;
  // An overflow to inf never comes back to a finite number: where f32 arithmetic may overflow (or
  // an ambiguous sample meets a NaN or inf), a non-finite cpu element is excused, and every finite
  // one is still compared.
  const bool may_overflow = (compute == DType::f32 && ctx.f32_may_overflow) || ctx.ambiguous_nonfinite;
  ++stats.compared;
  double diff2 = 0, ref2 = 0, mag2 = 0, worst = -1;
  std::int64_t worst_at = -1;
  for (std::int64_t i = 0; i < n; ++i) {
    if (skip && (*skip)[static_cast<std::size_t>(i)]) continue;
    const double c = cpu.get(i), r = ref.get(i), m = magnitude[static_cast<std::size_t>(i)];
    // Only finite reference elements are checked; near the dtype's largest value, rounding
    // decides between finite and inf.
    if (!std::isfinite(r)) {
      ++stats.skipped_nonfinite;
      continue;
    }
    if (m > 0.5 * max_finite(cpu.dtype)) continue;
    if (!std::isfinite(c) && may_overflow) {
      ++stats.skipped_overflow;
      continue;
    }
    if (!std::isfinite(c))
      fail("%s[%lld] is %g, the reference %g (isa %s, threads %d): %s", what, static_cast<long long>(i), c, r,
           ctx.isa, ctx.threads, describe_problem(*ctx.problem).c_str());
    const double excess = std::max(0.0, std::fabs(c - r) - (slack ? 1.001 * (*slack)[static_cast<std::size_t>(i)] : 0.0));
    diff2 += excess * excess;
    ref2 += r * r;
    mag2 += m * m;
    if (std::fabs(c - r) > worst) worst = std::fabs(c - r), worst_at = i;
  }
  const double tol = tolerance(cpu.dtype);
  // Subnormal results: the storage type's and the arithmetic's spacing, not relative precision.
  const double floor = std::sqrt(static_cast<double>(n)) * (4 * denorm_min(cpu.dtype) + 256 * denorm_min(compute)) / tol;
  const double scale = std::max({std::sqrt(ref2), std::sqrt(mag2), floor});
  if (std::sqrt(diff2) > tol * scale)
    fail("%s differs from the reference: ||cpu - ref|| = %g > %g * %g (worst at %lld: cpu %.17g, ref %.17g) "
         "(isa %s, threads %d): %s",
         what, std::sqrt(diff2), tol, scale, static_cast<long long>(worst_at), cpu.get(worst_at), ref.get(worst_at),
         ctx.isa, ctx.threads, describe_problem(*ctx.problem).c_str());
}

// ---- one problem ------------------------------------------------------------------------------

const char* const kPlainNames[4] = {"output", "grad_value", "grad_sampling_locations", "grad_attention_weights"};
const char* const kFusedNames[5] = {"output", "grad_value", "grad_reference_points", "grad_sampling_offsets",
                                    "grad_attention_logits"};

// The results of one run: output, then the gradients (plain: value, sampling_locations,
// attention_weights; fused: value, reference_points, sampling_offsets, attention_logits).
struct Results {
  bool fused;
  std::vector<Buffer> b;
  Results(const msda::Problem& p, bool fused_op) : fused(fused_op) {
    const Counts c = counts(p);
    b.reserve(5);
    b.emplace_back(p.value_dtype, c.output);
    b.emplace_back(p.value_dtype, c.value);
    if (fused) b.emplace_back(p.reference_dtype, c.reference);
    b.emplace_back(p.location_dtype, 2 * c.samples);
    b.emplace_back(p.weight_dtype, c.samples);
    for (Buffer& x : b) x.poison();
  }
  const char* name(std::size_t k) const { return fused ? kFusedNames[k] : kPlainNames[k]; }
  void* want(std::size_t k, unsigned mask) { return (mask >> (k - 1)) & 1 ? b[k].data() : nullptr; }
  msda::Gradients gradients(unsigned mask) { return {want(1, mask), want(2, mask), want(3, mask)}; }
  msda::FusedGradients fused_gradients(unsigned mask) {
    return {want(1, mask), want(2, mask), want(3, mask), want(4, mask)};
  }
};

// Whether result k (0: the output) is computed when the gradients in `mask` are asked for.
bool wanted(std::size_t k, unsigned mask) { return k == 0 || ((mask >> (k - 1)) & 1); }

// forward, then backward for the gradients in `mask` (fused or plain as the results are); false
// when the options are rejected.
bool run(const msda::Problem& p, const Tensors& t, Results& r, const msda::Options& options, unsigned mask,
         const char* label) {
  try {
    if (r.fused) {
      msda::forward_fused(p, t.fused_inputs(), r.b[0].data(), options);
      msda::backward_fused(p, t.fused_inputs(), t.grad_output.data(), r.fused_gradients(mask), options);
    } else {
      msda::forward(p, t.inputs(), r.b[0].data(), options);
      msda::backward(p, t.inputs(), t.grad_output.data(), r.gradients(mask), options);
    }
    return true;
  } catch (const msda::Error& e) {
    check_error(e, label);
    if (e.argument() != "options.isa")
      fail("%s rejected a validated problem: %s (%s)", label, e.what(), describe_problem(p).c_str());
    return false;
  } catch (const std::exception& e) {
    fail("%s threw a non-msda exception: %s (%s)", label, e.what(), describe_problem(p).c_str());
  } catch (...) {
    fail("%s threw a non-std exception (%s)", label, describe_problem(p).c_str());
  }
}

// One call that must be rejected (or, when the tensor it nulls is empty, may be accepted).
void bad_call(const msda::Problem& p, const Tensors& t, std::uint8_t which, bool fused) {
  Results r(p, fused);
  const Counts c = counts(p);
  msda::FusedInputs in = t.fused_inputs();
  void* output = r.b[0].data();
  const void* grad_output = t.grad_output.data();
  msda::Options options{1, which & 0x80 ? Backend::reference : Backend::cpu, Isa::best, {}, {}};
  const bool cpu = options.backend == Backend::cpu;
  bool must_fail = true;
  switch (which % 8) {
    case 0: in.value = nullptr; must_fail = c.value > 0; break;
    case 1:
      if (fused && (which & 8)) {
        in.reference_points = nullptr;
        must_fail = c.reference > 0;
      } else {
        in.sampling_offsets = nullptr;
        must_fail = c.samples > 0;
      }
      break;
    case 2: in.attention_logits = nullptr; must_fail = c.samples > 0; break;
    case 3: output = nullptr; grad_output = nullptr; must_fail = c.output > 0; break;
    case 4: options.threads = -1 - ((which >> 3) & 7); break;
    case 5: options.backend = static_cast<Backend>(3 + ((which >> 3) & 7)); break;
    // The instruction set and the tuning only bind the cpu backend, and an empty problem need
    // not pick an instruction set.
    // An instruction set past the enum's last (sve256): unknown on every architecture.
    case 6: options.isa = static_cast<Isa>(6 + ((which >> 3) & 7)); must_fail = cpu && c.output > 0; break;
    case 7: options.tuning.query_block = -1 - ((which >> 3) & 7); must_fail = cpu; break;
  }
  bool fwd, bwd;
  if (fused) {
    fwd = accepts("forward_fused (bad call)", [&] { msda::forward_fused(p, in, output, options); });
    bwd = accepts("backward_fused (bad call)",
                  [&] { msda::backward_fused(p, in, grad_output, r.fused_gradients(15), options); });
  } else {
    const msda::Inputs plain{in.value, in.sampling_offsets, in.attention_logits};
    fwd = accepts("forward (bad call)", [&] { msda::forward(p, plain, output, options); });
    bwd = accepts("backward (bad call)", [&] { msda::backward(p, plain, grad_output, r.gradients(7), options); });
  }
  if (must_fail && (fwd || bwd))
    fail("a bad call (case %d%s) was accepted: forward %d, backward %d: %s", which % 8, fused ? ", fused" : "", fwd,
         bwd, describe_problem(p).c_str());
}

// The v2 rules' errors name what is wrong, where nothing else is: a non-finite offset_scale with
// boxes "offset_scale" (from the entry points too, before they read any memory), bad points per
// level "points" or "points[l]", an unknown sampling "sampling".
void check_v2_errors(const Decoded& d, bool valid, const std::string& argument) {
  const msda::Problem& p = d.problem;
  const bool decidable = d.small && !d.huge_points;
  if (d.fused && p.reference_coords == 4 && !std::isfinite(p.offset_scale)) {
    ++stats.scale_errors;
    if (valid) fail("validate_fused accepted offset_scale %g with 4 coordinates: %s", p.offset_scale, describe_problem(p).c_str());
    msda::Problem q = p;
    q.offset_scale = 0.5;
    const bool only_scale = decidable && should_accept(q, true);
    if (only_scale && argument != "offset_scale")
      fail("validate_fused named '%s', not offset_scale, for offset_scale %g: %s", argument.c_str(), p.offset_scale,
           describe_problem(p).c_str());
    std::string forward_argument, backward_argument;
    if (accepts("forward_fused", [&] { msda::forward_fused(p, {}, nullptr); }, &forward_argument) ||
        accepts("backward_fused", [&] { msda::backward_fused(p, {}, nullptr, {}); }, &backward_argument))
      fail("forward_fused or backward_fused accepted offset_scale %g with 4 coordinates: %s", p.offset_scale,
           describe_problem(p).c_str());
    if (only_scale && (forward_argument != "offset_scale" || backward_argument != "offset_scale"))
      fail("forward_fused / backward_fused named '%s' / '%s', not offset_scale: %s", forward_argument.c_str(),
           backward_argument.c_str(), describe_problem(p).c_str());
  }
  if (!p.level_points.empty() && !valid) {
    bool bad = p.level_points.size() != p.levels.size();
    std::int64_t K = 0;
    for (std::int64_t x : p.level_points) bad = bad || x < 1 || __builtin_add_overflow(K, x, &K);
    msda::Problem q = p;
    q.level_points.clear();
    q.points = 1;
    if (bad && d.small && should_accept(q, d.fused)) {
      ++stats.points_errors;
      if (!starts_with(argument, "points"))
        fail("%s named '%s', not the points, for points %s: %s", d.fused ? "validate_fused" : "validate",
             argument.c_str(), list(p.level_points).c_str(), describe_problem(p).c_str());
    }
  }
  if (p.sampling != msda::Sampling::bilinear && p.sampling != msda::Sampling::discrete) {
    if (valid) fail("an unknown sampling was accepted: %s", describe_problem(p).c_str());
    msda::Problem q = p;
    q.sampling = msda::Sampling::bilinear;
    if (decidable && should_accept(q, d.fused) && argument != "sampling")
      fail("named '%s', not sampling, for an unknown sampling: %s", argument.c_str(), describe_problem(p).c_str());
  }
}

// The plain op's sizes of the per-sample tensors ([N, Q, M, L, P, 2] and [N, Q, M, L, P], or with
// points per level [N, Q, M, K, 2] and [N, Q, M, K]); the fused op's attention_logits are
// [N, Q, M, L*P] or [N, Q, M, K]. K and L*P are saturated where they do not fit.
struct SampleSizes {
  std::vector<std::int64_t> locations, weights;
};

SampleSizes sample_sizes(const msda::Problem& p, bool fused) {
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  const std::int64_t N = p.batch, Q = p.queries, M = p.heads, L = p.num_levels(), P = p.points;
  if (!p.level_points.empty()) {
    std::int64_t K = 0;
    bool fits = true;
    for (std::int64_t x : p.level_points) fits = fits && !__builtin_add_overflow(K, x, &K);
    if (!fits) K = kMax;
    return {{N, Q, M, K, 2}, {N, Q, M, K}};
  }
  std::int64_t LP;
  if (__builtin_mul_overflow(L, P, &LP)) LP = kMax;
  return {{N, Q, M, L, P, 2}, fused ? std::vector<std::int64_t>{N, Q, M, LP} : std::vector<std::int64_t>{N, Q, M, L, P}};
}

void fuzz_problem(Reader& r) {
  const Decoded decoded = decode_problem(r);
  const msda::Problem& p = decoded.problem;
  const bool fused = decoded.fused;
  ++stats.problems;
  stats.v2_problems += decoded.v2;
  std::string argument;
  const bool valid = accepts(fused ? "validate_fused" : "validate",
                             [&] { fused ? msda::validate_fused(p) : msda::validate(p); }, &argument);
  if (decoded.small && !decoded.huge_points && valid != should_accept(p, fused))
    fail("%s %s a problem SPEC says is %s: %s", fused ? "validate_fused" : "validate", valid ? "accepted" : "rejected",
         valid ? "bad" : "good", describe_problem(p).c_str());
  check_v2_errors(decoded, valid, argument);
  // options, tuning, a bad call, contents (special rates, NaN in values, gradients wanted)
  const std::uint8_t ob = r.u8(), tb = r.u8(), bb = r.u8(), vb = r.u8(), rb = r.u8();
  if (!valid) return;
  ++stats.accepted;
  stats.v2_accepted += decoded.v2;

  // An accepted problem's tensors have sizes, and byte sizes, that fit in 64 bits.
  const Counts c = counts(p);
  if (c.value < 0 || c.samples < 0 || c.output < 0 || !fits_bytes(c.value, p.value_dtype) ||
      !fits_bytes(c.output, p.value_dtype) || c.samples > std::numeric_limits<std::int64_t>::max() / 2 ||
      !fits_bytes(2 * c.samples, p.location_dtype) || !fits_bytes(c.samples, p.weight_dtype) ||
      (fused && !fits_bytes(c.reference, p.reference_dtype)))
    fail("validate accepted a problem whose tensors overflow 64-bit offsets: %s", describe_problem(p).c_str());
  const std::int64_t MD = p.heads * p.channels;
  if (!accepts("check_grad_output_sizes", [&] { msda::check_grad_output_sizes(p, {p.batch, p.queries, MD}); }))
    fail("check_grad_output_sizes rejected the output's own sizes: %s", describe_problem(p).c_str());
  if (accepts("check_grad_output_sizes", [&] { msda::check_grad_output_sizes(p, {p.batch, p.queries ^ 1, MD}); }))
    fail("check_grad_output_sizes accepted a wrong Q: %s", describe_problem(p).c_str());
  if (c.value > kMaxElements || 2 * c.samples > kMaxElements || c.output > kMaxElements ||
      points_total(p) > kMaxElements || (fused && c.reference > kMaxElements))
    return;

  // The same problem through describe() (fused: describe_fused()), as a binding would pass it:
  // the [L, P] layout, or the K layout with the points per level.
  {
    const std::int64_t L = p.num_levels();
    const SampleSizes s = sample_sizes(p, fused);
    std::vector<std::int64_t> shapes;
    for (const msda::Level& level : p.levels) shapes.insert(shapes.end(), {level.height, level.width});
    msda::Problem back;
    const bool ok = accepts(fused ? "describe_fused" : "describe", [&] {
      if (fused)
        back = msda::describe_fused({{p.batch, p.value_len, p.heads, p.channels},
                                     {L, 2},
                                     {L},
                                     {p.batch, p.queries, L, p.reference_coords},
                                     s.locations,
                                     s.weights},
                                    shapes.data(), p.level_start_index.data(), p.value_dtype, p.reference_dtype,
                                    p.location_dtype, p.weight_dtype, p.level_points, p.sampling, p.offset_scale);
      else
        back = msda::describe({{p.batch, p.value_len, p.heads, p.channels}, {L, 2}, {L}, s.locations, s.weights},
                              shapes.data(), p.level_start_index.data(), p.value_dtype, p.location_dtype,
                              p.weight_dtype, p.level_points, p.sampling);
    });
    if (!ok) fail("describe rejected the sizes of a validated problem: %s", describe_problem(p).c_str());
    if (describe_problem(back) != describe_problem(p))
      fail("describe returned %s for %s", describe_problem(back).c_str(), describe_problem(p).c_str());
  }

  // Contents.
  const Layout layout(p);
  const std::int64_t K = layout.K, L = p.num_levels();
  Tensors t;
  t.value = Buffer(p.value_dtype, c.value);
  t.locations = Buffer(p.location_dtype, 2 * c.samples);
  t.weights = Buffer(p.weight_dtype, c.samples);
  t.grad_output = Buffer(p.value_dtype, c.output);
  if (!fused) {
    for (std::int64_t i = 0; i < c.samples; ++i) {
      const msda::Level& level = p.levels[static_cast<std::size_t>(layout.level_of[static_cast<std::size_t>(i % K)])];
      fill_location(r, Rate(rb), t.locations, 2 * i, level.width);
      fill_location(r, Rate(rb), t.locations, 2 * i + 1, level.height);
      fill_weight(r, Rate(rb >> 2), t.weights, i);
    }
  } else {
    const std::int64_t C = p.reference_coords;
    t.reference = Buffer(p.reference_dtype, c.reference);
    for (std::int64_t i = 0; i < c.reference; i += C) {
      const msda::Level& level = p.levels[static_cast<std::size_t>(i / C % L)];
      fill_location(r, Rate(rb), t.reference, i, level.width);
      fill_location(r, Rate(rb), t.reference, i + 1, level.height);
      if (C == 4) {
        fill_box(r, Rate(rb), t.reference, i + 2);
        fill_box(r, Rate(rb), t.reference, i + 3);
      }
    }
    for (std::int64_t i = 0; i < c.samples; ++i) {
      const std::int64_t l = layout.level_of[static_cast<std::size_t>(i % K)], nq = i / (p.heads * K);
      const std::int64_t at = (nq * L + l) * C;
      const double box_x = C == 4 ? t.reference.get(at + 2) : 1.0, box_y = C == 4 ? t.reference.get(at + 3) : 1.0;
      const double scale = C == 4 ? p.offset_scale : 1.0;
      fill_offset(r, Rate(rb), t.locations, 2 * i, p.levels[l].width, p.points_of(l), C, box_x, scale);
      fill_offset(r, Rate(rb), t.locations, 2 * i + 1, p.levels[l].height, p.points_of(l), C, box_y, scale);
      fill_logit(r, Rate(rb >> 2), t.weights, i);
    }
  }
  const bool nonfinite = (vb & 0x0F) == 0x0F;  // NaN and inf in value and grad_output
  for (std::int64_t i = 0; i < c.value; ++i) fill_value(r, Rate(rb >> 4), t.value, i, nonfinite);
  for (std::int64_t i = 0; i < c.output; ++i) fill_value(r, Rate(rb >> 6), t.grad_output, i, nonfinite);

  if (bb >= 224) {
    ++stats.bad_calls;
    return bad_call(p, t, r.u8(), fused);
  }
  ++stats.ran;
  stats.ran_fused += fused;
  stats.ran_discrete += p.sampling == msda::Sampling::discrete;
  stats.ran_level_points += !p.level_points.empty();

  static const msda::Problem* dump_problem;
  static const Tensors* dump_tensors;
  static const Layout* dump_layout;
  static bool dump_fused;
  dump_problem = &p;
  dump_tensors = &t;
  dump_layout = &layout;
  dump_fused = fused;
  dump_inputs = [] {
    const msda::Problem& q = *dump_problem;
    const Tensors& u = *dump_tensors;
    const std::int64_t Q = q.queries, M = q.heads, K = dump_layout->K;
    if (dump_fused) {
      const std::int64_t L = q.num_levels(), C = q.reference_coords;
      std::fprintf(stderr, "problem (fused): %s\nreference_points (n q l: coordinates):\n", describe_problem(q).c_str());
      for (std::int64_t i = 0; i < u.reference.size; i += C) {
        std::fprintf(stderr, "  %lld %lld %lld:", static_cast<long long>(i / C / L / Q),
                     static_cast<long long>(i / C / L % Q), static_cast<long long>(i / C % L));
        for (std::int64_t e = 0; e < C; ++e) std::fprintf(stderr, " %.17g", u.reference.get(i + e));
        std::fprintf(stderr, "\n");
      }
    } else {
      std::fprintf(stderr, "problem: %s\n", describe_problem(q).c_str());
    }
    std::fprintf(stderr, "samples (n q m k level: x y weight%s):\n", dump_fused ? "; offsets and logits" : "");
    for (std::int64_t i = 0; i < u.weights.size; ++i)
      std::fprintf(stderr, "  %lld %lld %lld %lld %lld: %.17g %.17g %.17g\n", static_cast<long long>(i / (Q * M * K)),
                   static_cast<long long>(i / (M * K) % Q), static_cast<long long>(i / K % M),
                   static_cast<long long>(i % K), static_cast<long long>(dump_layout->level_of[static_cast<std::size_t>(i % K)]),
                   u.locations.get(2 * i), u.locations.get(2 * i + 1), u.weights.get(i));
    std::fprintf(stderr, "value [N, S, M, D]:");
    for (std::int64_t i = 0; i < u.value.size; ++i) std::fprintf(stderr, "%s%.17g", i % q.channels ? " " : "\n  ", u.value.get(i));
    std::fprintf(stderr, "\ngrad_output [N, Q, M*D]:");
    for (std::int64_t i = 0; i < u.grad_output.size; ++i)
      std::fprintf(stderr, "%s%.17g", i % q.channels ? " " : "\n  ", u.grad_output.get(i));
    std::fprintf(stderr, "\n");
  };
  struct Reset {
    ~Reset() { dump_inputs = nullptr; }
  } reset;

  // The reference, in the problem's own dtypes, every gradient.
  const unsigned all = fused ? 15 : 7;
  Results ref(p, fused);
  if (!run(p, t, ref, {1, Backend::reference, Isa::best, {}, {}}, all, "reference")) fail("reference rejected its options");

  // What each result is compared against: the plain op's magnitudes over its own samples, or the
  // fused op's over the samples it materialises, carried through the chain rule.
  std::vector<Check> checks;
  double max_weight, max_factor = 1;
  Magnitudes mag;
  if (!fused) {
    mag = magnitudes(p, layout, t.value, t.locations, t.weights, t.grad_output, p.location_dtype == DType::f64);
    max_weight = max_abs(t.weights);
    checks = plain_checks(p, mag);  // moves the vectors only
  } else {
    const Materialised mat = materialise(p, layout, t);
    mag = magnitudes(p, layout, t.value, mat.locations, mat.weights, t.grad_output, true);
    max_weight = max_abs(mat.weights);
    // The chain rule's factors (of the samples with a location gradient), and the reference
    // points' sums over M*K samples.
    checks = fused_checks(p, layout, t, mat, mag, max_factor);  // moves the vectors only
    max_factor *= static_cast<double>(std::max<std::int64_t>(1, p.heads * K));
  }
  std::int64_t largest_map = 1;
  for (const msda::Level& level : p.levels) largest_map = std::max({largest_map, level.height, level.width});
  // A bound, with margin, on what an f32 kernel may form on the way: a * W * sum_d g * (v1 - v0)
  // for a location gradient, a * g summed over up to 4*Q*K samples for grad_value (fused: times
  // the chain rule's factors).
  const double bound = max_weight * std::max(1.0, max_abs(t.value)) * std::max(1.0, max_abs(t.grad_output)) *
                       (static_cast<double>(largest_map) * static_cast<double>(p.channels) +
                        static_cast<double>(p.queries) * static_cast<double>(K)) *
                       8.0 * max_factor;
  const bool f32_may_overflow = !(bound < 1e37);
  const bool ambiguous_nonfinite = mag.ambiguous_nonfinite_weight || (mag.any_ambiguous && nonfinite);

  // Which gradients the cpu backend is asked for: plain 3 bits, fused 4.
  const unsigned mask = fused ? (vb >> 4) & 15 : (vb >> 4) & 7;
  msda::Options options;
  options.backend = Backend::cpu;
  options.threads = 1 + (ob & 3);
  const int other_threads = 1 + ((ob >> 2) & 3) == options.threads ? options.threads % 4 + 1 : 1 + ((ob >> 2) & 3);
  options.tuning.staging = (tb & 1) ? msda::CpuTuning::Staging::copy
                           : (tb & 64) ? msda::CpuTuning::Staging::direct
                                       : msda::CpuTuning::Staging::automatic;
  options.tuning.level_parts = (tb & 2) != 0;
  static constexpr std::int64_t kBlocks[4] = {0, 1, 3, 64};
  options.tuning.query_block = kBlocks[(tb >> 2) & 3];
  static constexpr msda::CpuTuning::Scatter kScatters[4] = {
      msda::CpuTuning::Scatter::automatic, msda::CpuTuning::Scatter::copy, msda::CpuTuning::Scatter::in_place,
      msda::CpuTuning::Scatter::owner};
  options.tuning.scatter = kScatters[(tb >> 4) & 3];

  std::unique_ptr<Results> widest;  // the results of the widest instruction set this CPU has
  // Narrowest to widest of each architecture; the other architecture's are rejected (skipped).
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512, Isa::neon, Isa::sve256}) {
    options.isa = isa;
    const std::string label = "cpu/" + std::string(msda::name(isa));
    auto results = std::make_unique<Results>(p, fused);
    Results& cpu = *results;
    if (!run(p, t, cpu, options, mask, label.c_str())) {
      if (isa == Isa::baseline) fail("%s rejected: every CPU has it", label.c_str());
      continue;
    }
    ++stats.isa_runs;
    const Context ctx{&p, msda::name(isa).data(), options.threads, f32_may_overflow, ambiguous_nonfinite};
    for (std::size_t k = 0; k < cpu.b.size(); ++k)
      if (wanted(k, mask)) compare(cpu.name(k), cpu.b[k], ref.b[k], checks[k], ctx);

    // The same bits at another thread count.
    msda::Options again_options = options;
    again_options.threads = other_threads;
    Results again(p, fused);
    run(p, t, again, again_options, mask, label.c_str());
    for (std::size_t k = 0; k < cpu.b.size(); ++k)
      if (wanted(k, mask) && !cpu.b[k].same_bits(again.b[k]))
        fail("%s differs between %d and %d threads (isa %s): %s", cpu.name(k), options.threads, other_threads,
             ctx.isa, describe_problem(p).c_str());
    widest = std::move(results);
  }

  // Isa::best is the widest one: the same bits.
  options.isa = Isa::best;
  Results best(p, fused);
  if (!run(p, t, best, options, mask, "cpu/best")) fail("cpu/best rejected");
  for (std::size_t k = 0; k < best.b.size(); ++k)
    if (wanted(k, mask) && !best.b[k].same_bits(widest->b[k]))
      fail("isa best and the widest isa this CPU has differ (%s): %s", best.name(k), describe_problem(p).c_str());
}

// ---- describe() with arbitrary sizes ------------------------------------------------------------

std::int64_t decode_size(Reader& r) {
  const std::uint8_t b = r.u8();
  if (b < 200) return b % 13;
  static constexpr std::int64_t kOdd[8] = {-1, -2, std::int64_t(1) << 31, std::int64_t(1) << 32,
                                           std::int64_t(1) << 62, std::numeric_limits<std::int64_t>::max(),
                                           std::numeric_limits<std::int64_t>::min(), 0};
  return kOdd[b % 8];
}

bool same_scale(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

void fuzz_describe(Reader& r) {
  // Start from a problem's consistent sizes, then change some of them.
  const Decoded decoded = decode_problem(r);
  const msda::Problem& p = decoded.problem;
  const bool fused = decoded.fused;
  const std::int64_t L = p.num_levels();
  const SampleSizes samples = sample_sizes(p, fused);
  msda::FusedTensorSizes sizes{{p.batch, p.value_len, p.heads, p.channels},
                               {L, 2},
                               {static_cast<std::int64_t>(p.level_start_index.size())},
                               {p.batch, p.queries, L, p.reference_coords},
                               samples.locations,
                               samples.weights};
  // The plain op's five tensors; the fused op's six (reference_points last, so that the plain
  // op's inputs pick their tensors as they did before the fused op was fuzzed here).
  std::vector<std::int64_t>* tensors[6] = {&sizes.value, &sizes.spatial_shapes, &sizes.level_start_index,
                                           &sizes.sampling_offsets, &sizes.attention_logits, &sizes.reference_points};
  const int changes = r.u8() % 4;
  for (int k = 0; k < changes; ++k) {
    std::vector<std::int64_t>& t = *tensors[r.u8() % (fused ? 6 : 5)];
    const std::uint8_t how = r.u8();
    if (how < 64) {  // another rank, 0 to 7
      t.resize(how % 8);
      for (std::int64_t& s : t) s = decode_size(r);
    } else if (!t.empty()) {
      t[how % t.size()] = decode_size(r);
    }
  }
  const auto dtype = [&] { return static_cast<DType>(r.u8() & 3); };
  const bool same_dtypes = r.u8() < 192;
  const DType vt = same_dtypes ? p.value_dtype : dtype(), lt = same_dtypes ? p.location_dtype : dtype(),
              wt = same_dtypes ? p.weight_dtype : dtype();
  const DType rt = same_dtypes || !fused ? p.reference_dtype : dtype();

  // describe() reads 2*L spatial_shapes entries and L level_start_index entries once it has
  // checked the sizes: give it arrays that large (and skip the sizes no test could allocate).
  constexpr std::int64_t kCap = 64;
  const auto& ss = sizes.spatial_shapes;
  const auto& ls = sizes.level_start_index;
  if (ss.size() == 2 && ss[1] == 2 && ss[0] > kCap) return;
  std::vector<std::int64_t> shapes(static_cast<std::size_t>(ss.size() == 2 ? 2 * std::clamp<std::int64_t>(ss[0], 0, kCap) : 0));
  std::vector<std::int64_t> starts(static_cast<std::size_t>(ls.size() == 1 ? std::clamp<std::int64_t>(ls[0], 0, kCap) : 0));
  for (std::size_t i = 0; i < shapes.size(); ++i)
    shapes[i] = i / 2 < p.levels.size() ? (i % 2 ? p.levels[i / 2].width : p.levels[i / 2].height) : decode_size(r);
  for (std::size_t i = 0; i < starts.size(); ++i)
    starts[i] = i < p.level_start_index.size() ? p.level_start_index[i] : decode_size(r);
  const bool contents_changed = r.u8() >= 224 && !shapes.empty();
  if (contents_changed) shapes[r.u8() % shapes.size()] = decode_size(r);
  // The points per level as passed (v2 only): sometimes other than the sizes say.
  std::vector<std::int64_t> points = p.level_points;
  const std::uint8_t pb = decoded.v2 ? r.u8() : 0;
  const bool points_changed = pb >= 224;
  if (points_changed) {
    switch (pb & 3) {
      case 0: if (!points.empty()) points[(pb >> 2) % points.size()] += 1; break;  // K other than the sizes'
      case 1: points.push_back(1 + (pb >> 2) % 6); break;
      case 2: points.clear(); break;                                                // the sizes' K layout, no points
      case 3: points.assign(static_cast<std::size_t>(std::clamp<std::int64_t>(L, 0, kCap)), 1); break;
    }
  }

  msda::Problem got;
  ++stats.describe_calls;
  std::string argument;
  const bool ok = accepts(fused ? "describe_fused" : "describe", [&] {
    if (fused)
      got = msda::describe_fused(sizes, shapes.data(), starts.data(), vt, rt, lt, wt, points, p.sampling, p.offset_scale);
    else
      got = msda::describe({sizes.value, sizes.spatial_shapes, sizes.level_start_index, sizes.sampling_offsets,
                            sizes.attention_logits},
                           shapes.data(), starts.data(), vt, lt, wt, points, p.sampling);
  }, &argument);
  if (ok) {
    ++stats.describe_accepted;
    // What it returns is what the sizes say, and valid.
    const auto& v = sizes.value;
    const auto& loc = sizes.sampling_offsets;
    bool same = got.batch == v[0] && got.value_len == v[1] && got.heads == v[2] && got.channels == v[3] &&
                got.queries == loc[1] && got.num_levels() == ss[0] && got.value_dtype == vt &&
                got.location_dtype == lt && got.weight_dtype == wt && got.sampling == p.sampling;
    if (points.empty()) {  // [N, Q, M, L, P, 2]
      same = same && loc.size() == 6 && got.points == loc[4] && got.level_points.empty();
    } else {  // [N, Q, M, K, 2], K the sum of the points
      std::int64_t K = 0;
      for (std::int64_t x : points) K += x;  // describe accepted them: the sum fits
      same = same && loc.size() == 5 && got.level_points == points && loc[3] == K && got.total_points() == K;
    }
    if (fused)
      same = same && got.reference_coords == sizes.reference_points[3] && got.reference_dtype == rt &&
             same_scale(got.offset_scale, p.offset_scale);
    for (std::int64_t l = 0; same && l < got.num_levels(); ++l)
      same = got.levels[l].height == shapes[2 * l] && got.levels[l].width == shapes[2 * l + 1] &&
             got.level_start_index[l] == starts[l];
    if (!same) fail("describe returned a problem other than its sizes say: %s", describe_problem(got).c_str());
    if (!accepts("validate", [&] { fused ? msda::validate_fused(got) : msda::validate(got); }))
      fail("describe returned a problem validate rejects: %s", describe_problem(got).c_str());
  }
  // Unchanged sizes of a problem: describe decides as validate does (and a bad offset_scale, the
  // only flaw, is named).
  if (changes == 0 && !contents_changed && !points_changed) {
    msda::Problem q = p;
    q.value_dtype = vt, q.location_dtype = lt, q.weight_dtype = wt, q.reference_dtype = rt;
    const bool valid = accepts("validate", [&] { fused ? msda::validate_fused(q) : msda::validate(q); });
    if (valid != ok)
      fail("describe %s what validate %s: %s", ok ? "accepts" : "rejects", valid ? "accepts" : "rejects",
           describe_problem(q).c_str());
    if (fused && q.reference_coords == 4 && !std::isfinite(q.offset_scale)) {
      msda::Problem finite = q;
      finite.offset_scale = 0.5;
      if (accepts("validate_fused", [&] { msda::validate_fused(finite); }) && argument != "offset_scale")
        fail("describe_fused named '%s', not offset_scale, for offset_scale %g: %s", argument.c_str(), q.offset_scale,
             describe_problem(q).c_str());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader r(data, size);
  if (r.u8() % 8 == 7) fuzz_describe(r);
  else fuzz_problem(r);
  return 0;
}
