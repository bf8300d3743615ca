#include "test_support.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>

namespace msda_test {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::uint64_t base_seed() {
  static const std::uint64_t seed = [] {
    const char* env = std::getenv("MSDA_TEST_SEED");
    if (env == nullptr || *env == '\0') return std::uint64_t{0};
    if (std::string(env) == "random") {
      std::random_device device;
      const std::uint64_t s = (static_cast<std::uint64_t>(device()) << 32) ^ device();
      std::fprintf(stderr, "msda tests: MSDA_TEST_SEED=%llu\n", static_cast<unsigned long long>(s));
      return s;
    }
    return static_cast<std::uint64_t>(std::strtoull(env, nullptr, 0));
  }();
  return seed;
}

bool is_power_of_two(std::int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

}  // namespace

// float -> double from the bits, so that the result never depends on the caller's MXCSR (a
// library that leaves denormals-are-zero set must not fool the tests' own conversions).
double widen_f32_bits(std::uint32_t bits) {
  const std::uint32_t exponent = (bits >> 23) & 0xFFu, mantissa = bits & 0x7FFFFFu;
  double magnitude;
  if (exponent == 0xFF)
    magnitude = mantissa ? std::numeric_limits<double>::quiet_NaN() : kInf;
  else if (exponent == 0)
    magnitude = std::ldexp(static_cast<double>(mantissa), -149);
  else
    magnitude = std::ldexp(static_cast<double>(mantissa | 0x800000u), static_cast<int>(exponent) - 150);
  return (bits >> 31) ? -magnitude : magnitude;
}

double load_as_double(DType dtype, const void* data, std::int64_t i) {
  switch (dtype) {
    case DType::f32: {
      std::uint32_t bits;
      std::memcpy(&bits, static_cast<const float*>(data) + i, sizeof bits);
      return widen_f32_bits(bits);
    }
    case DType::f64:
      return static_cast<const double*>(data)[i];
    case DType::bf16:
      return widen_f32_bits(static_cast<std::uint32_t>(static_cast<const msda::bf16*>(data)[i].bits) << 16);
    case DType::f16:
      return msda::f16_to_float(static_cast<const msda::f16*>(data)[i]);
  }
  return kNaN;
}

void store_from_double(DType dtype, void* data, std::int64_t i, double x) {
  switch (dtype) {
    case DType::f32:
      static_cast<float*>(data)[i] = static_cast<float>(x);
      return;
    case DType::f64:
      static_cast<double*>(data)[i] = x;
      return;
    case DType::bf16:
      static_cast<msda::bf16*>(data)[i] = msda::float_to_bf16(static_cast<float>(x));
      return;
    case DType::f16:
      static_cast<msda::f16*>(data)[i] = msda::float_to_f16(static_cast<float>(x));
      return;
  }
}

// ---- Buffer ----

Buffer::Buffer(DType dtype, std::int64_t size) : dtype_(dtype), size_(size) {
  const std::size_t total = 2 * kGuard + bytes();
  storage_.assign((total + 7) / 8, 0);
  auto* raw = reinterpret_cast<unsigned char*>(storage_.data());
  std::memset(raw, kGuardByte, storage_.size() * 8);
  std::memset(raw + kGuard, 0, bytes());
}

void* Buffer::data() { return reinterpret_cast<unsigned char*>(storage_.data()) + kGuard; }
const void* Buffer::data() const {
  return reinterpret_cast<const unsigned char*>(storage_.data()) + kGuard;
}

std::vector<double> Buffer::to_double() const {
  std::vector<double> out(static_cast<std::size_t>(size_));
  for (std::int64_t i = 0; i < size_; ++i) out[static_cast<std::size_t>(i)] = get(i);
  return out;
}

Buffer Buffer::converted(DType dtype) const {
  Buffer out(dtype, size_);
  for (std::int64_t i = 0; i < size_; ++i) out.set(i, get(i));
  return out;
}

void Buffer::poison() {
  for (std::int64_t i = 0; i < size_; ++i) set(i, kNaN);
}

void Buffer::fill_bytes(unsigned char byte) { std::memset(data(), byte, bytes()); }

bool Buffer::all_bytes_are(unsigned char byte) const {
  const auto* p = static_cast<const unsigned char*>(data());
  return std::all_of(p, p + bytes(), [byte](unsigned char b) { return b == byte; });
}

bool Buffer::guards_intact() const {
  const auto* raw = reinterpret_cast<const unsigned char*>(storage_.data());
  const std::size_t total = storage_.size() * 8;
  for (std::size_t i = 0; i < kGuard; ++i)
    if (raw[i] != kGuardByte) return false;
  for (std::size_t i = kGuard + bytes(); i < total; ++i)
    if (raw[i] != kGuardByte) return false;
  return true;
}

bool Buffer::same_bytes(const Buffer& other) const {
  return dtype_ == other.dtype_ && size_ == other.size_ &&
         std::memcmp(data(), other.data(), bytes()) == 0;
}

// ---- errors ----

double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return kInf;
  double diff = 0, norm_a = 0, norm_b = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return kInf;
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm_a += a[i] * a[i];
    norm_b += b[i] * b[i];
  }
  if (norm_b == 0) return norm_a == 0 ? 0.0 : kInf;
  return std::sqrt(diff) / std::sqrt(norm_b);
}

::testing::AssertionResult close(const std::vector<double>& actual,
                                 const std::vector<double>& expected, double tol) {
  const double err = rel_error(actual, expected);
  if (err < tol) return ::testing::AssertionSuccess();
  auto failure = ::testing::AssertionFailure();
  failure << "relative error " << err << " not below " << tol;
  if (actual.size() != expected.size()) {
    failure << " (sizes " << actual.size() << " vs expected " << expected.size() << ")";
    return failure;
  }
  std::size_t nonfinite = 0, first_nonfinite = actual.size(), worst = 0;
  double worst_diff = -1;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    if (!std::isfinite(actual[i]) || !std::isfinite(expected[i])) {
      if (nonfinite++ == 0) first_nonfinite = i;
      continue;
    }
    const double d = std::fabs(actual[i] - expected[i]);
    if (d > worst_diff) worst_diff = d, worst = i;
  }
  failure << "; " << actual.size() << " elements";
  if (nonfinite)
    failure << ", " << nonfinite << " non-finite (first at " << first_nonfinite << ": actual "
            << actual[first_nonfinite] << ", expected " << expected[first_nonfinite] << ")";
  if (worst_diff >= 0)
    failure << ", largest difference at " << worst << ": actual " << actual[worst]
            << ", expected " << expected[worst];
  return failure;
}

double tolerance(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return 1e-5;
    case DType::f64:
      return 1e-12;
    case DType::bf16:
    case DType::f16:
      return 1e-2;
  }
  return 0;
}

// ---- problems ----

const char* name(Locations kind) {
  switch (kind) {
    case Locations::unit: return "unit";
    case Locations::wide: return "wide";
    case Locations::centres: return "centres";
    case Locations::borders: return "borders";
    case Locations::edges: return "edges";
    case Locations::nonfinite: return "nonfinite";
    case Locations::cluster: return "cluster";
    case Locations::mixed: return "mixed";
  }
  return "?";
}

std::string to_string(const DTypes& d) {
  std::string s;
  s += msda::name(d.value);
  s += "/";
  s += msda::name(d.location);
  s += "/";
  s += msda::name(d.weight);
  return s;
}

std::string describe(const msda::Problem& p) {
  std::ostringstream os;
  os << "N=" << p.batch << " S=" << p.value_len << " M=" << p.heads << " D=" << p.channels
     << " Q=" << p.queries << " P=";
  if (p.level_points.empty()) {
    os << p.points;
  } else {
    for (std::size_t l = 0; l < p.level_points.size(); ++l) os << (l ? "," : "[") << p.level_points[l];
    os << "]";
  }
  if (p.sampling == msda::Sampling::discrete) os << " discrete";
  os << " levels=[";
  for (std::size_t l = 0; l < p.levels.size(); ++l)
    os << (l ? " " : "") << "(" << p.levels[l].height << "," << p.levels[l].width << ")";
  os << "] dtypes=" << msda::name(p.value_dtype) << "/" << msda::name(p.location_dtype) << "/"
     << msda::name(p.weight_dtype);
  return os.str();
}

msda::Problem make_problem(const Shape& shape, const DTypes& dtypes) {
  msda::Problem p;
  p.batch = shape.batch;
  p.heads = shape.heads;
  p.channels = shape.channels;
  p.queries = shape.queries;
  p.points = shape.points;
  p.levels = shape.levels;
  p.level_points = shape.level_points;
  p.sampling = shape.sampling;
  p.level_start_index = msda::level_starts(shape.levels);
  p.value_len = 0;
  for (const auto& l : shape.levels) p.value_len += l.height * l.width;
  p.value_dtype = dtypes.value;
  p.location_dtype = dtypes.location;
  p.weight_dtype = dtypes.weight;
  return p;
}

std::int64_t value_size(const msda::Problem& p) {
  return p.batch * p.value_len * p.heads * p.channels;
}
std::int64_t location_size(const msda::Problem& p) {
  return p.batch * p.queries * p.heads * p.total_points() * 2;
}
std::int64_t weight_size(const msda::Problem& p) {
  return p.batch * p.queries * p.heads * p.total_points();
}

Shape with_v2(Shape shape, std::vector<std::int64_t> level_points, msda::Sampling sampling) {
  shape.level_points = std::move(level_points);
  shape.sampling = sampling;
  return shape;
}
std::int64_t output_size(const msda::Problem& p) {
  return p.batch * p.queries * p.heads * p.channels;
}

msda::Problem as_f64(const msda::Problem& problem) {
  msda::Problem p = problem;
  p.value_dtype = p.location_dtype = p.weight_dtype = DType::f64;
  return p;
}

Tensors Tensors::converted(DType v, DType l, DType w) const {
  return {value.converted(v), locations.converted(l), weights.converted(w),
          grad_output.converted(v)};
}

std::uint64_t case_seed(std::uint64_t index) {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a of the test's full name
  if (const auto* info = ::testing::UnitTest::GetInstance()->current_test_info()) {
    std::string name = std::string(info->test_suite_name()) + "." + info->name();
    for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  }
  return splitmix64(h ^ splitmix64(base_seed() ^ splitmix64(index)));
}

void draw_location(std::mt19937_64& rng, Locations kind, const msda::Level& level, double& x,
                   double& y) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  auto coordinate = [&](Locations k, std::int64_t n) -> double {
    const double size = static_cast<double>(n);
    switch (k) {
      case Locations::unit:
        return unit(rng);
      case Locations::wide:
        return -0.3 + 1.6 * unit(rng);
      case Locations::centres: {
        std::uniform_int_distribution<std::int64_t> pixel(0, n - 1);
        return (static_cast<double>(pixel(rng)) + 0.5) / size;
      }
      case Locations::borders: {
        const int pick = std::uniform_int_distribution<int>(0, 3)(rng);
        return pick == 0 ? 0.0 : pick == 1 ? 1.0 : unit(rng);
      }
      case Locations::edges: {
        // u = x * n - 0.5 on or next to the limits -1 and n of the range rule, and on the map's
        // border pixels; dyadic offsets so that f32 and f64 arithmetic agree on power-of-two maps.
        const double e = 0x1p-10;
        const double us[] = {-1.0,     -1.0 + e, -1.0 - e, size,       size - e, size + e,
                             -0.5,     size - 0.5, 0.0,    size - 1.0, -1.0 + 0.5, size - 0.25};
        const int pick = std::uniform_int_distribution<int>(0, 15)(rng);
        if (pick >= 12) return unit(rng);
        return (us[pick] + 0.5) / size;
      }
      case Locations::nonfinite: {
        const double specials[] = {std::numeric_limits<double>::quiet_NaN(), kInf, -kInf, 1e30,
                                   -1e30, 3e38, -3e38, 1e10, -1e10};
        const int pick = std::uniform_int_distribution<int>(0, 2 * 9 - 1)(rng);
        if (pick >= 9) return -0.3 + 1.6 * unit(rng);
        return specials[pick];
      }
      case Locations::cluster:
        return 0.45 + 0.1 * unit(rng);
      case Locations::mixed:
        break;
    }
    return unit(rng);
  };
  Locations kx = kind, ky = kind;
  if (kind == Locations::mixed) {
    // centres and edges only where the map is a power of two (where f32 and f64 agree exactly on
    // which side of a pixel a coordinate lies).
    const bool exact = is_power_of_two(level.height) && is_power_of_two(level.width);
    const Locations kinds[] = {Locations::unit,   Locations::wide,      Locations::borders,
                               Locations::cluster, Locations::nonfinite, Locations::centres,
                               Locations::edges};
    const int count = exact ? 7 : 5;
    kx = ky = kinds[std::uniform_int_distribution<int>(0, count - 1)(rng)];
  }
  x = coordinate(kx, level.width);
  y = coordinate(ky, level.height);
}

Case make_case(const Shape& shape, const DTypes& dtypes, Locations kind, std::uint64_t seed,
               Weights weights) {
  Case c;
  c.seed = seed;
  c.problem = make_problem(shape, dtypes);
  const msda::Problem& p = c.problem;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> sym(-1.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);

  c.tensors.value = Buffer(dtypes.value, value_size(p));
  for (std::int64_t i = 0; i < c.tensors.value.size(); ++i) c.tensors.value.set(i, sym(rng));

  c.tensors.locations = Buffer(dtypes.location, location_size(p));
  c.tensors.weights = Buffer(dtypes.weight, weight_size(p));
  const std::int64_t L = p.num_levels();
  std::int64_t sample = 0;
  for (std::int64_t nqm = 0; nqm < p.batch * p.queries * p.heads; ++nqm) {
    std::vector<double> logits(static_cast<std::size_t>(p.total_points()));
    double max_logit = -kInf;
    for (auto& v : logits) v = normal(rng), max_logit = std::max(max_logit, v);
    double total = 0;
    for (auto& v : logits) v = std::exp(v - max_logit), total += v;
    for (std::int64_t l = 0, k = 0; l < L; ++l) {
      for (std::int64_t pt = 0; pt < p.points_of(l); ++pt, ++sample, ++k) {
        double x, y;
        draw_location(rng, kind, p.levels[static_cast<std::size_t>(l)], x, y);
        c.tensors.locations.set(2 * sample, x);
        c.tensors.locations.set(2 * sample + 1, y);
        const double w = weights == Weights::softmax
                             ? logits[static_cast<std::size_t>(k)] / total
                             : 2.0 * sym(rng);
        c.tensors.weights.set(sample, w);
      }
    }
  }
  c.tensors.grad_output = Buffer(dtypes.value, output_size(p));
  for (std::int64_t i = 0; i < c.tensors.grad_output.size(); ++i)
    c.tensors.grad_output.set(i, sym(rng));

  std::ostringstream os;
  os << "seed=" << seed << " (MSDA_TEST_SEED base " << base_seed() << ") " << describe(p)
     << " locations=" << name(kind)
     << " weights=" << (weights == Weights::softmax ? "softmax" : "uniform");
  c.label = os.str();
  return c;
}

// ---- results ----

Results::Results(const msda::Problem& p)
    : output(p.value_dtype, output_size(p)),
      grad_value(p.value_dtype, value_size(p)),
      grad_locations(p.location_dtype, location_size(p)),
      grad_weights(p.weight_dtype, weight_size(p)) {}

void Results::poison() {
  output.poison();
  grad_value.poison();
  grad_locations.poison();
  grad_weights.poison();
}

msda::Gradients Results::gradients() {
  return {grad_value.data(), grad_locations.data(), grad_weights.data()};
}

bool Results::guards_intact() const {
  return output.guards_intact() && grad_value.guards_intact() &&
         grad_locations.guards_intact() && grad_weights.guards_intact();
}

void run_all(const msda::Problem& problem, const Tensors& tensors, Results& results,
             const msda::Options& options) {
  results.poison();
  msda::forward(problem, tensors.inputs(), results.output.data(), options);
  msda::backward(problem, tensors.inputs(), tensors.grad_output.data(), results.gradients(),
                 options);
}

const std::vector<msda::Isa>& all_isas() {
  static const std::vector<msda::Isa> isas = {msda::Isa::best, msda::Isa::baseline, msda::Isa::avx2,
                                              msda::Isa::avx512, msda::Isa::neon, msda::Isa::sve256};
  return isas;
}

const std::vector<msda::Isa>& supported_isas() {
  static const std::vector<msda::Isa> isas = [] {
    std::vector<msda::Isa> out;
    Shape s;
    s.levels = {{2, 2}};
    const msda::Problem p = make_problem(s, {DType::f32, DType::f32, DType::f32});
    const float value[4] = {1, 2, 3, 4}, loc[2] = {0.5f, 0.5f}, weight[1] = {1};
    for (msda::Isa isa : all_isas()) {
      float output[1] = {0};
      try {
        msda::forward(p, {value, loc, weight}, output, {1, msda::Backend::cpu, isa});
        out.push_back(isa);
      } catch (const msda::Error&) {
      }
    }
    std::string names;
    for (msda::Isa isa : out) names += " " + std::string(msda::name(isa));
    std::fprintf(stderr, "msda tests: cpu backend instruction sets:%s\n", names.c_str());
    return out;
  }();
  return isas;
}

const std::vector<msda::Isa>& cpu_isas() {
  static const std::vector<msda::Isa> isas = [] {
    const char* env = std::getenv("MSDA_TEST_ISA");
    if (env == nullptr || *env == '\0') return supported_isas();
    std::vector<msda::Isa> out;
    std::stringstream list(env);
    for (std::string item; std::getline(list, item, ',');) {
      const auto known = std::find_if(all_isas().begin(), all_isas().end(),
                                       [&](msda::Isa isa) { return msda::name(isa) == item; });
      if (known == all_isas().end() ||
          std::find(supported_isas().begin(), supported_isas().end(), *known) == supported_isas().end()) {
        std::fprintf(stderr, "msda tests: MSDA_TEST_ISA=%s: '%s' is not an instruction set this machine and build support\n",
                     env, item.c_str());
        std::exit(2);
      }
      out.push_back(*known);
    }
    std::string names;
    for (msda::Isa isa : out) names += " " + std::string(msda::name(isa));
    std::fprintf(stderr, "msda tests: testing instruction sets (MSDA_TEST_ISA):%s\n", names.c_str());
    return out;
  }();
  return isas;
}

bool names_one_of(const std::string& argument, const std::vector<std::string>& names) {
  auto lower = [](std::string s) {
    for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return s;
  };
  const std::string arg = lower(argument);
  for (const auto& candidate : names) {
    const std::string name = lower(candidate);
    if (name.size() > 1) {
      if (arg.find(name) != std::string::npos) return true;
      continue;
    }
    for (std::size_t pos = arg.find(name); pos != std::string::npos;
         pos = arg.find(name, pos + 1)) {
      const bool left = pos == 0 || !std::isalnum(static_cast<unsigned char>(arg[pos - 1]));
      const std::size_t end = pos + name.size();
      const bool right = end == arg.size() || !std::isalnum(static_cast<unsigned char>(arg[end]));
      if (left && right) return true;
    }
  }
  return false;
}

// SPEC's 13 dtype mixes, plain f32 first.
const std::vector<DTypes>& dtype_mixes() {
  using msda::DType;
  static const std::vector<DTypes> all = {
      {DType::f32, DType::f32, DType::f32},    {DType::f64, DType::f64, DType::f64},
      {DType::bf16, DType::bf16, DType::bf16}, {DType::f16, DType::f16, DType::f16},
      {DType::bf16, DType::f32, DType::f32},   {DType::bf16, DType::f32, DType::bf16},
      {DType::bf16, DType::bf16, DType::f32},  {DType::f16, DType::f32, DType::f32},
      {DType::f16, DType::f32, DType::f16},    {DType::f16, DType::f16, DType::f32},
      {DType::f64, DType::f32, DType::f64},    {DType::f64, DType::f32, DType::f32},
      {DType::f64, DType::f64, DType::f32},
  };
  return all;
}

std::string to_string(const FusedDTypes& d) {
  return std::string(msda::name(d.value)) + "_ref" + std::string(msda::name(d.reference)) + "_off" +
         std::string(msda::name(d.offset)) + "_logit" + std::string(msda::name(d.logit));
}

const std::vector<FusedDTypes>& fused_mixes() {
  static const std::vector<FusedDTypes> all = [] {
    std::vector<FusedDTypes> out;
    for (DType v : {DType::f32, DType::f64, DType::bf16, DType::f16}) {
      std::vector<DType> others = {v};
      if (v != DType::f32) others.push_back(DType::f32);
      for (DType r : others)
        for (DType o : others)
          for (DType l : others) out.push_back({v, r, o, l});
    }
    return out;
  }();
  return all;
}

}  // namespace msda_test
