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
//     rounding of a cell edge or of the range rule (ambiguous()), the difference the other
//     rounding of x*W - 0.5 makes, and those samples' location gradients;
//   - every cpu result is bitwise identical at another thread count (SPEC: deterministic), and
//     Isa::best gives the bits of the widest instruction set the CPU has;
//   - calls with a null tensor, a negative thread count or an unknown backend or instruction set
//     throw msda::Error.
// MSDA_FUZZ_STATS=1 prints at exit what the inputs exercised; MSDA_FUZZ_DUMP=1 prints a failing
// problem's tensors.
//
// Input format: a byte stream; when it runs out, a pseudo-random stream seeded by the input
// continues it, so a short input still describes a whole problem. Byte 0 picks describe()
// fuzzing (1 in 8) or problem fuzzing; then the shape (N, Q, M, D, P, L, H and W per level),
// dtypes, one corruption (level_start_index, S, sizes, huge sizes), options, tuning, a bad call,
// the gradients wanted and how often contents are special values, then per element the
// location, weight, value and grad_output contents. fuzz/make_seeds.py writes seeds in this
// format (fuzz/corpus/).
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
  ~Stats() {
    if (std::getenv("MSDA_FUZZ_STATS") == nullptr) return;
    std::fprintf(stderr,
                 "fuzz_msda stats: problems %ld, accepted %ld, ran %ld (cpu isa runs %ld), bad calls %ld; "
                 "tensors compared %ld; elements skipped (non-finite reference) %ld, excused (non-finite cpu: overflow, ambiguous) %ld; "
                 "describe %ld, accepted %ld\n",
                 problems, accepted, ran, isa_runs, bad_calls, compared, skipped_nonfinite, skipped_overflow,
                 describe_calls, describe_accepted);
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

struct Counts {
  std::int64_t value, samples, output;  // -1: does not fit
};

Counts counts(const msda::Problem& p) {
  const std::int64_t L = p.num_levels();
  return {product({p.batch, p.value_len, p.heads, p.channels}), product({p.batch, p.queries, p.heads, L, p.points}),
          product({p.batch, p.queries, p.heads, p.channels})};
}

bool fits_bytes(std::int64_t elements, DType dtype) {
  std::int64_t bytes;
  return elements >= 0 && !__builtin_mul_overflow(elements, static_cast<std::int64_t>(msda::size_of(dtype)), &bytes);
}

std::string describe_problem(const msda::Problem& p) {
  std::string s = "N=" + std::to_string(p.batch) + " S=" + std::to_string(p.value_len) + " M=" +
                  std::to_string(p.heads) + " D=" + std::to_string(p.channels) + " Q=" + std::to_string(p.queries) +
                  " P=" + std::to_string(p.points) + " levels=";
  for (const msda::Level& level : p.levels) s += "(" + std::to_string(level.height) + "," + std::to_string(level.width) + ")";
  s += " starts=";
  for (std::int64_t x : p.level_start_index) s += std::to_string(x) + ",";
  s += " dtypes=" + std::string(msda::name(p.value_dtype)) + "/" + std::string(msda::name(p.location_dtype)) + "/" +
       std::string(msda::name(p.weight_dtype));
  return s;
}

void check_error(const msda::Error& e, const char* call) {
  if (e.argument().empty() || e.expected().empty() || e.actual().empty() || std::strlen(e.what()) == 0)
    fail("%s threw msda::Error with an empty field: argument='%s' expected='%s' actual='%s'", call,
         e.argument().c_str(), e.expected().c_str(), e.actual().c_str());
}

// Runs f; true if it returned, false if it threw msda::Error (checked). Anything else fails.
template <class F>
bool accepts(const char* call, F&& f) {
  try {
    f();
    return true;
  } catch (const msda::Error& e) {
    check_error(e, call);
    return false;
  } catch (const std::exception& e) {
    fail("%s threw a non-msda exception: %s", call, e.what());
  } catch (...) {
    fail("%s threw a non-std exception", call);
  }
}

// SPEC's "Bad input" rules, decided by the harness for problems whose sizes are all small (no
// overflow possible): true when validate() must accept.
bool should_accept(const msda::Problem& p) {
  if (p.batch < 0 || p.queries < 0 || p.heads < 0 || p.channels < 1 || p.points < 1 || p.levels.empty() ||
      p.value_len < 0)
    return false;
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
  return allowed(p.location_dtype) && allowed(p.weight_dtype);
}

// ---- decoding a problem ---------------------------------------------------------------------

std::int64_t decode_dim(std::uint8_t b) {
  static constexpr std::int64_t kOdd[12] = {0, -1, -7, 0, -1, 1, 1, 2, 16, 13, 0, 1};
  if (b < 160) return 1 + b % 5;  // mostly small maps: fast executions
  return b < 244 ? 1 + b % 12 : kOdd[b - 244];
}

struct Decoded {
  msda::Problem problem;
  bool small = true;  // every size is small: should_accept() decides validity
};

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

  const std::uint8_t cb = r.u8();
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

// ---- the magnitudes of the sums (SPEC "Forward" and "Backward" over absolute values) ----------

// Where a sample lands (SPEC "Forward"): u = x*W - 0.5, v = y*H - 0.5, each computed as the
// reference does (rounding x*W, then subtracting) or with a fused multiply-add (as a kernel built
// with FMA contraction may).
struct Geometry {
  bool in = false;
  std::int64_t row[4] = {-1, -1, -1, -1};  // the corners' rows in value (-1: off the map)
  double weight[4] = {0, 0, 0, 0};          // their bilinear weights
  double lh = 0, lw = 0;
};

Geometry locate(double x, double y, std::int64_t H, std::int64_t W, std::int64_t start, bool fused_u = false,
                bool fused_v = false) {
  Geometry g;
  const double Wd = static_cast<double>(W), Hd = static_cast<double>(H);
  volatile double xw = x * Wd, yh = y * Hd;  // volatile: never contracted
  const double u = fused_u ? std::fma(x, Wd, -0.5) : xw - 0.5, v = fused_v ? std::fma(y, Hd, -0.5) : yh - 0.5;
  g.in = v > -1 && u > -1 && v < Hd && u < Wd;
  if (!g.in) return g;
  const auto h0 = static_cast<std::int64_t>(std::floor(v)), w0 = static_cast<std::int64_t>(std::floor(u));
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

// True when rounding can decide which cell (or whether the range rule) applies to coordinate
// c*size - 0.5: computed with and without a fused multiply-add, the two disagree. Only f64
// coordinates can be affected (x*size is exact in double for f32, bf16 and f16 x); there the
// one-sided location gradient legitimately depends on how the backend rounds.
bool ambiguous(double c, std::int64_t size) {
  const double n = static_cast<double>(size);
  volatile double product = c * n;
  const double plain = product - 0.5, fused = std::fma(c, n, -0.5);
  const auto in = [&](double u) { return u > -1 && u < n; };
  if (in(plain) != in(fused)) return true;
  return in(plain) && std::floor(plain) != std::floor(fused);
}

struct Tensors {
  Buffer value, locations, weights, grad_output;
  msda::Inputs inputs() const { return {value.data(), locations.data(), weights.data()}; }
};

// Per element of each result: the same sums over absolute values (the scale of the rounding
// error), and how much an ambiguous sample (see ambiguous()) can legitimately change the element.
struct Magnitudes {
  std::vector<double> output, grad_value, grad_locations, grad_weights;
  std::vector<double> output_slack, grad_value_slack, grad_weights_slack;
  std::vector<char> location_ambiguous;  // per grad_locations element: not compared
  // Some ambiguous sample has a non-finite weight: whether it is zeroed (finite results) or not
  // (NaN or inf) depends on rounding.
  bool ambiguous_nonfinite_weight = false;
};

Magnitudes magnitudes(const msda::Problem& p, const Tensors& t) {
  const std::int64_t N = p.batch, S = p.value_len, M = p.heads, D = p.channels, Q = p.queries, P = p.points,
                     L = p.num_levels();
  Magnitudes mag;
  const Counts c = counts(p);
  mag.output.assign(static_cast<std::size_t>(c.output), 0.0);
  mag.grad_value.assign(static_cast<std::size_t>(c.value), 0.0);
  mag.grad_locations.assign(static_cast<std::size_t>(2 * c.samples), 0.0);
  mag.grad_weights.assign(static_cast<std::size_t>(c.samples), 0.0);
  mag.output_slack.assign(mag.output.size(), 0.0);
  mag.grad_value_slack.assign(mag.grad_value.size(), 0.0);
  mag.grad_weights_slack.assign(mag.grad_weights.size(), 0.0);
  mag.location_ambiguous.assign(static_cast<std::size_t>(2 * c.samples), 0);
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t q = 0; q < Q; ++q)
      for (std::int64_t m = 0; m < M; ++m)
        for (std::int64_t l = 0; l < L; ++l)
          for (std::int64_t pt = 0; pt < P; ++pt) {
            const std::int64_t i = (((n * Q + q) * M + m) * L + l) * P + pt;
            const std::int64_t H = p.levels[l].height, W = p.levels[l].width, start = p.level_start_index[l];
            const std::int64_t out_row = ((n * Q + q) * M + m) * D;
            const double a = t.weights.get(i), x = t.locations.get(2 * i), y = t.locations.get(2 * i + 1);
            const auto value_at = [&](std::int64_t row, std::int64_t d) {
              return row < 0 ? 0.0 : t.value.get(((n * S + row) * M + m) * D + d);
            };
            const Geometry g = locate(x, y, H, W, start);
            if (p.location_dtype == DType::f64 && (ambiguous(x, W) || ambiguous(y, H))) {
              mag.location_ambiguous[2 * i] = mag.location_ambiguous[2 * i + 1] = 1;
              if (!std::isfinite(a)) mag.ambiguous_nonfinite_weight = true;
              // What the sample adds under each other rounding, minus what it adds here.
              for (int variant = 1; variant < 4; ++variant) {
                const Geometry f = locate(x, y, H, W, start, variant & 1, variant & 2);
                std::int64_t rows[8];  // the corners of either
                int count = 0;
                for (const Geometry* corners : {&f, &g})
                  for (std::int64_t row : corners->row)
                    if (row >= 0 && std::find(rows, rows + count, row) == rows + count) rows[count++] = row;
                const auto weight_at = [](const Geometry& e, std::int64_t row) {
                  double w = 0;
                  for (int k = 0; k < 4; ++k) w += e.row[k] == row ? e.weight[k] : 0.0;
                  return w;
                };
                double dot = 0;
                for (std::int64_t d = 0; d < D; ++d) {
                  double delta = 0;
                  for (int k = 0; k < 4; ++k) delta += f.weight[k] * value_at(f.row[k], d) - g.weight[k] * value_at(g.row[k], d);
                  const double g_d = t.grad_output.get(out_row + d);
                  mag.output_slack[out_row + d] += std::fabs(a * delta);
                  dot += g_d * delta;
                  for (int r = 0; r < count; ++r)
                    mag.grad_value_slack[((n * S + rows[r]) * M + m) * D + d] +=
                        std::fabs(a * (weight_at(f, rows[r]) - weight_at(g, rows[r])) * g_d);
                }
                mag.grad_weights_slack[i] += std::fabs(dot);
              }
            }
            if (!g.in) continue;
            const double hh = 1 - g.lh, hw = 1 - g.lw;
            double dot = 0, du = 0, dv = 0;
            for (std::int64_t d = 0; d < D; ++d) {
              const double g_d = std::fabs(t.grad_output.get(out_row + d));
              double v[4];
              for (int k = 0; k < 4; ++k) v[k] = std::fabs(value_at(g.row[k], d));
              const double sample = g.weight[0] * v[0] + g.weight[1] * v[1] + g.weight[2] * v[2] + g.weight[3] * v[3];
              mag.output[out_row + d] += std::fabs(a) * sample;
              dot += g_d * sample;
              du += g_d * (hh * (v[1] + v[0]) + g.lh * (v[3] + v[2]));
              dv += g_d * (hw * (v[2] + v[0]) + g.lw * (v[3] + v[1]));
              for (int k = 0; k < 4; ++k)
                if (g.row[k] >= 0) mag.grad_value[((n * S + g.row[k]) * M + m) * D + d] += std::fabs(a) * g.weight[k] * g_d;
            }
            mag.grad_weights[i] = dot;
            mag.grad_locations[2 * i] = std::fabs(a) * static_cast<double>(W) * du;
            mag.grad_locations[2 * i + 1] = std::fabs(a) * static_cast<double>(H) * dv;
          }
  return mag;
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

// slack (optional): per element, a difference that is not an error (ambiguous samples).
void compare(const char* what, const Buffer& cpu, const Buffer& ref, const std::vector<double>& magnitude,
             const std::vector<double>* slack, const std::vector<char>* skip, const Context& ctx) {
  const std::int64_t n = ref.size;
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

struct Results {
  Buffer output, grad_value, grad_locations, grad_weights;
  explicit Results(const msda::Problem& p) {
    const Counts c = counts(p);
    output = Buffer(p.value_dtype, c.output);
    grad_value = Buffer(p.value_dtype, c.value);
    grad_locations = Buffer(p.location_dtype, 2 * c.samples);
    grad_weights = Buffer(p.weight_dtype, c.samples);
    output.poison();
    grad_value.poison();
    grad_locations.poison();
    grad_weights.poison();
  }
  msda::Gradients gradients(unsigned mask) {
    return {mask & 1 ? grad_value.data() : nullptr, mask & 2 ? grad_locations.data() : nullptr,
            mask & 4 ? grad_weights.data() : nullptr};
  }
};

// forward, then backward for the gradients in `mask`; false when the options are rejected.
bool run(const msda::Problem& p, const Tensors& t, Results& r, const msda::Options& options, unsigned mask,
         const char* label) {
  try {
    msda::forward(p, t.inputs(), r.output.data(), options);
    msda::backward(p, t.inputs(), t.grad_output.data(), r.gradients(mask), options);
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
void bad_call(const msda::Problem& p, const Tensors& t, std::uint8_t which) {
  Results r(p);
  const Counts c = counts(p);
  msda::Inputs in = t.inputs();
  void* output = r.output.data();
  const void* grad_output = t.grad_output.data();
  msda::Options options{1, which & 0x80 ? Backend::reference : Backend::cpu, Isa::best, {}};
  const bool cpu = options.backend == Backend::cpu;
  bool must_fail = true;
  switch (which % 8) {
    case 0: in.value = nullptr; must_fail = c.value > 0; break;
    case 1: in.sampling_locations = nullptr; must_fail = c.samples > 0; break;
    case 2: in.attention_weights = nullptr; must_fail = c.samples > 0; break;
    case 3: output = nullptr; grad_output = nullptr; must_fail = c.output > 0; break;
    case 4: options.threads = -1 - ((which >> 3) & 7); break;
    case 5: options.backend = static_cast<Backend>(3 + ((which >> 3) & 7)); break;
    // The instruction set and the tuning only bind the cpu backend, and an empty problem need
    // not pick an instruction set.
    // An instruction set past the enum's last (sve256): unknown on every architecture.
    case 6: options.isa = static_cast<Isa>(6 + ((which >> 3) & 7)); must_fail = cpu && c.output > 0; break;
    case 7: options.tuning.query_block = -1 - ((which >> 3) & 7); must_fail = cpu; break;
  }
  const bool fwd = accepts("forward (bad call)", [&] { msda::forward(p, in, output, options); });
  const bool bwd = accepts("backward (bad call)",
                           [&] { msda::backward(p, in, grad_output, r.gradients(7), options); });
  if (must_fail && (fwd || bwd))
    fail("a bad call (case %d) was accepted: forward %d, backward %d: %s", which % 8, fwd, bwd,
         describe_problem(p).c_str());
}

void fuzz_problem(Reader& r) {
  const Decoded decoded = decode_problem(r);
  const msda::Problem& p = decoded.problem;
  ++stats.problems;
  const bool valid = accepts("validate", [&] { msda::validate(p); });
  if (decoded.small && valid != should_accept(p))
    fail("validate %s a problem SPEC says is %s: %s", valid ? "accepted" : "rejected", valid ? "bad" : "good",
         describe_problem(p).c_str());
  // options, tuning, a bad call, contents (special rates, NaN in values, gradients wanted)
  const std::uint8_t ob = r.u8(), tb = r.u8(), bb = r.u8(), vb = r.u8(), rb = r.u8();
  if (!valid) return;
  ++stats.accepted;

  // An accepted problem's tensors have sizes, and byte sizes, that fit in 64 bits.
  const Counts c = counts(p);
  if (c.value < 0 || c.samples < 0 || c.output < 0 || !fits_bytes(c.value, p.value_dtype) ||
      !fits_bytes(c.output, p.value_dtype) || c.samples > std::numeric_limits<std::int64_t>::max() / 2 ||
      !fits_bytes(2 * c.samples, p.location_dtype) || !fits_bytes(c.samples, p.weight_dtype))
    fail("validate accepted a problem whose tensors overflow 64-bit offsets: %s", describe_problem(p).c_str());
  const std::int64_t MD = p.heads * p.channels;
  if (!accepts("check_grad_output_sizes", [&] { msda::check_grad_output_sizes(p, {p.batch, p.queries, MD}); }))
    fail("check_grad_output_sizes rejected the output's own sizes: %s", describe_problem(p).c_str());
  if (accepts("check_grad_output_sizes", [&] { msda::check_grad_output_sizes(p, {p.batch, p.queries ^ 1, MD}); }))
    fail("check_grad_output_sizes accepted a wrong Q: %s", describe_problem(p).c_str());
  if (c.value > kMaxElements || 2 * c.samples > kMaxElements || c.output > kMaxElements) return;

  // The same problem through describe(), as a binding would pass it.
  {
    const std::int64_t L = p.num_levels();
    msda::TensorSizes sizes{{p.batch, p.value_len, p.heads, p.channels},
                            {L, 2},
                            {L},
                            {p.batch, p.queries, p.heads, L, p.points, 2},
                            {p.batch, p.queries, p.heads, L, p.points}};
    std::vector<std::int64_t> shapes;
    for (const msda::Level& level : p.levels) shapes.insert(shapes.end(), {level.height, level.width});
    msda::Problem back;
    if (!accepts("describe", [&] {
          back = msda::describe(sizes, shapes.data(), p.level_start_index.data(), p.value_dtype, p.location_dtype,
                                p.weight_dtype);
        }))
      fail("describe rejected the sizes of a validated problem: %s", describe_problem(p).c_str());
    if (describe_problem(back) != describe_problem(p))
      fail("describe returned %s for %s", describe_problem(back).c_str(), describe_problem(p).c_str());
  }

  // Contents.
  Tensors t;
  t.value = Buffer(p.value_dtype, c.value);
  t.locations = Buffer(p.location_dtype, 2 * c.samples);
  t.weights = Buffer(p.weight_dtype, c.samples);
  t.grad_output = Buffer(p.value_dtype, c.output);
  const std::int64_t P = p.points, L = p.num_levels();
  for (std::int64_t i = 0; i < c.samples; ++i) {
    const msda::Level& level = p.levels[static_cast<std::size_t>((i / P) % L)];
    fill_location(r, Rate(rb), t.locations, 2 * i, level.width);
    fill_location(r, Rate(rb), t.locations, 2 * i + 1, level.height);
    fill_weight(r, Rate(rb >> 2), t.weights, i);
  }
  const bool nonfinite = (vb & 0x0F) == 0x0F;  // NaN and inf in value and grad_output
  for (std::int64_t i = 0; i < c.value; ++i) fill_value(r, Rate(rb >> 4), t.value, i, nonfinite);
  for (std::int64_t i = 0; i < c.output; ++i) fill_value(r, Rate(rb >> 6), t.grad_output, i, nonfinite);

  if (bb >= 224) {
    ++stats.bad_calls;
    return bad_call(p, t, r.u8());
  }
  ++stats.ran;

  static const msda::Problem* dump_problem;
  static const Tensors* dump_tensors;
  dump_problem = &p;
  dump_tensors = &t;
  dump_inputs = [] {
    const msda::Problem& q = *dump_problem;
    const Tensors& u = *dump_tensors;
    std::fprintf(stderr, "problem: %s\nsamples (n q m l p: x y weight):\n", describe_problem(q).c_str());
    const std::int64_t Q = q.queries, M = q.heads, L = q.num_levels(), P = q.points;
    for (std::int64_t i = 0; i < u.weights.size; ++i)
      std::fprintf(stderr, "  %lld %lld %lld %lld %lld: %.17g %.17g %.17g\n", static_cast<long long>(i / (Q * M * L * P)),
                   static_cast<long long>(i / (M * L * P) % Q), static_cast<long long>(i / (L * P) % M),
                   static_cast<long long>(i / P % L), static_cast<long long>(i % P), u.locations.get(2 * i),
                   u.locations.get(2 * i + 1), u.weights.get(i));
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

  // The reference, in the problem's own dtypes.
  Results ref(p);
  if (!run(p, t, ref, {1, Backend::reference, Isa::best, {}}, 7, "reference")) fail("reference rejected its options");
  const Magnitudes mag = magnitudes(p, t);
  std::int64_t largest_map = 1;
  for (const msda::Level& level : p.levels) largest_map = std::max({largest_map, level.height, level.width});
  // A bound, with margin, on what an f32 kernel may form on the way: a * W * sum_d g * (v1 - v0)
  // for a location gradient, a * g summed over up to 4*Q*L*P samples for grad_value.
  const double bound = max_abs(t.weights) * std::max(1.0, max_abs(t.value)) * std::max(1.0, max_abs(t.grad_output)) *
                       (static_cast<double>(largest_map) * static_cast<double>(p.channels) +
                        static_cast<double>(p.queries) * static_cast<double>(p.num_levels()) * static_cast<double>(p.points)) *
                       8.0;
  const bool f32_may_overflow = !(bound < 1e37);
  bool any_ambiguous = false;
  for (char a : mag.location_ambiguous) any_ambiguous = any_ambiguous || a;
  const bool ambiguous_nonfinite = mag.ambiguous_nonfinite_weight || (any_ambiguous && nonfinite);

  const unsigned mask = (vb >> 4) & 7;  // which gradients the cpu backend is asked for
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
      msda::CpuTuning::Scatter::automatic};
  options.tuning.scatter = kScatters[(tb >> 4) & 3];

  std::unique_ptr<Results> widest;  // the results of the widest instruction set this CPU has
  // Narrowest to widest of each architecture; the other architecture's are rejected (skipped).
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512, Isa::neon, Isa::sve256}) {
    options.isa = isa;
    const std::string label = "cpu/" + std::string(msda::name(isa));
    auto results = std::make_unique<Results>(p);
    Results& cpu = *results;
    if (!run(p, t, cpu, options, mask, label.c_str())) {
      if (isa == Isa::baseline) fail("%s rejected: every CPU has it", label.c_str());
      continue;
    }
    ++stats.isa_runs;
    const Context ctx{&p, msda::name(isa).data(), options.threads, f32_may_overflow, ambiguous_nonfinite};
    compare("output", cpu.output, ref.output, mag.output, &mag.output_slack, nullptr, ctx);
    if (mask & 1) compare("grad_value", cpu.grad_value, ref.grad_value, mag.grad_value, &mag.grad_value_slack, nullptr, ctx);
    if (mask & 2)
      compare("grad_sampling_locations", cpu.grad_locations, ref.grad_locations, mag.grad_locations, nullptr,
              &mag.location_ambiguous, ctx);
    if (mask & 4)
      compare("grad_attention_weights", cpu.grad_weights, ref.grad_weights, mag.grad_weights, &mag.grad_weights_slack,
              nullptr, ctx);

    // The same bits at another thread count.
    msda::Options again_options = options;
    again_options.threads = other_threads;
    Results again(p);
    run(p, t, again, again_options, mask, label.c_str());
    const std::pair<const Buffer*, const Buffer*> pairs[4] = {{&cpu.output, &again.output},
                                                              {&cpu.grad_value, &again.grad_value},
                                                              {&cpu.grad_locations, &again.grad_locations},
                                                              {&cpu.grad_weights, &again.grad_weights}};
    static const char* const kNames[4] = {"output", "grad_value", "grad_sampling_locations", "grad_attention_weights"};
    for (int k = 0; k < 4; ++k)
      if ((k == 0 || (mask >> (k - 1)) & 1) && !pairs[k].first->same_bits(*pairs[k].second))
        fail("%s differs between %d and %d threads (isa %s): %s", kNames[k], options.threads, other_threads,
             ctx.isa, describe_problem(p).c_str());
    widest = std::move(results);
  }

  // Isa::best is the widest one: the same bits.
  options.isa = Isa::best;
  Results best(p);
  if (!run(p, t, best, options, mask, "cpu/best")) fail("cpu/best rejected");
  const std::pair<const Buffer*, const Buffer*> pairs[4] = {{&best.output, &widest->output},
                                                            {&best.grad_value, &widest->grad_value},
                                                            {&best.grad_locations, &widest->grad_locations},
                                                            {&best.grad_weights, &widest->grad_weights}};
  for (int k = 0; k < 4; ++k)
    if ((k == 0 || (mask >> (k - 1)) & 1) && !pairs[k].first->same_bits(*pairs[k].second))
      fail("isa best and the widest isa this CPU has differ (result %d): %s", k, describe_problem(p).c_str());
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

void fuzz_describe(Reader& r) {
  // Start from a problem's consistent sizes, then change some of them.
  const Decoded decoded = decode_problem(r);
  const msda::Problem& p = decoded.problem;
  const std::int64_t L = p.num_levels();
  msda::TensorSizes sizes{{p.batch, p.value_len, p.heads, p.channels},
                          {L, 2},
                          {static_cast<std::int64_t>(p.level_start_index.size())},
                          {p.batch, p.queries, p.heads, L, p.points, 2},
                          {p.batch, p.queries, p.heads, L, p.points}};
  std::vector<std::int64_t>* tensors[5] = {&sizes.value, &sizes.spatial_shapes, &sizes.level_start_index,
                                           &sizes.sampling_locations, &sizes.attention_weights};
  const int changes = r.u8() % 4;
  for (int k = 0; k < changes; ++k) {
    std::vector<std::int64_t>& t = *tensors[r.u8() % 5];
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

  msda::Problem got;
  ++stats.describe_calls;
  const bool ok = accepts("describe", [&] { got = msda::describe(sizes, shapes.data(), starts.data(), vt, lt, wt); });
  if (ok) {
    ++stats.describe_accepted;
    // What it returns is what the sizes say, and valid.
    const auto& v = sizes.value;
    const auto& loc = sizes.sampling_locations;
    bool same = got.batch == v[0] && got.value_len == v[1] && got.heads == v[2] && got.channels == v[3] &&
                got.queries == loc[1] && got.points == loc[4] && got.num_levels() == ss[0] &&
                got.value_dtype == vt && got.location_dtype == lt && got.weight_dtype == wt;
    for (std::int64_t l = 0; same && l < got.num_levels(); ++l)
      same = got.levels[l].height == shapes[2 * l] && got.levels[l].width == shapes[2 * l + 1] &&
             got.level_start_index[l] == starts[l];
    if (!same) fail("describe returned a problem other than its sizes say: %s", describe_problem(got).c_str());
    if (!accepts("validate", [&] { msda::validate(got); }))
      fail("describe returned a problem validate rejects: %s", describe_problem(got).c_str());
  }
  // Unchanged sizes of a problem: describe decides as validate does.
  if (changes == 0 && !contents_changed) {
    msda::Problem q = p;
    q.value_dtype = vt, q.location_dtype = lt, q.weight_dtype = wt;
    const bool valid = accepts("validate", [&] { msda::validate(q); });
    if (valid != ok)
      fail("describe %s what validate %s: %s", ok ? "accepts" : "rejects", valid ? "accepts" : "rejects",
           describe_problem(q).c_str());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader r(data, size);
  if (r.u8() % 8 == 7) fuzz_describe(r);
  else fuzz_problem(r);
  return 0;
}
