// The problem's shape math and every check of SPEC's "Bad input", in one place: backends may
// assume a validated Problem and never check again.
#include <limits>
#include <sstream>

#include "msda/msda.h"

namespace msda {
namespace {

constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();

std::string str(std::int64_t x) { return std::to_string(x); }

std::string str(const std::vector<std::int64_t>& sizes) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << ']';
  return out.str();
}

std::string rank_str(const std::vector<std::int64_t>& sizes) {
  return str(static_cast<std::int64_t>(sizes.size())) + " dimensions " + str(sizes);
}

// a*b*... with overflow detection; `what` names the product in the error.
std::int64_t checked_product(std::initializer_list<std::int64_t> factors, const std::string& argument,
                             const std::string& what) {
  std::int64_t result = 1;
  std::string expression;
  for (std::int64_t f : factors) {
    if (!expression.empty()) expression += '*';
    expression += str(f);
    if (__builtin_mul_overflow(result, f, &result))
      throw Error(argument, what + " to fit in 64-bit offsets", expression + " overflows");
  }
  return result;
}

void require_nonnegative(std::int64_t x, const char* argument) {
  if (x < 0) throw Error(argument, ">= 0", str(x));
}

void require_positive(std::int64_t x, const char* argument) {
  if (x < 1) throw Error(argument, ">= 1", str(x));
}

void check_sample_dtype(DType value, DType sample, const char* argument) {
  if (sample == value || sample == DType::f32) return;
  throw Error(argument,
              value == DType::f32 ? "dtype f32 (value's)" : "dtype " + std::string(name(value)) + " (value's) or f32",
              std::string(name(sample)));
}

}  // namespace

Error::Error(std::string argument, std::string expected, std::string actual)
    : std::invalid_argument("msda: " + argument + ": expected " + expected + ", got " + actual),
      argument_(std::move(argument)),
      expected_(std::move(expected)),
      actual_(std::move(actual)) {}

std::string_view name(DType dtype) noexcept {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
  }
  return "unknown dtype";
}

std::size_t size_of(DType dtype) noexcept {
  switch (dtype) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16:
    case DType::f16: return 2;
  }
  return 0;
}

std::string_view name(Sampling sampling) noexcept {
  switch (sampling) {
    case Sampling::bilinear: return "bilinear";
    case Sampling::discrete: return "discrete";
  }
  return "unknown sampling";
}

std::int64_t Problem::total_points() const noexcept {
  if (level_points.empty()) return num_levels() * points;  // validated: fits
  std::int64_t k = 0;
  for (std::int64_t p : level_points) k += p;
  return k;
}

std::string_view name(Backend backend) noexcept {
  switch (backend) {
    case Backend::automatic: return "automatic";
    case Backend::reference: return "reference";
    case Backend::cpu: return "cpu";
    case Backend::cuda: return "cuda";
  }
  return "unknown backend";
}

std::string_view name(Isa isa) noexcept {
  switch (isa) {
    case Isa::best: return "best";
    case Isa::baseline: return "baseline";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::neon: return "neon";
    case Isa::sve256: return "sve256";
  }
  return "unknown isa";
}

std::vector<std::int64_t> level_starts(const std::vector<Level>& levels) {
  std::vector<std::int64_t> starts;
  starts.reserve(levels.size());
  std::int64_t start = 0;
  for (const Level& level : levels) {
    starts.push_back(start);
    start += level.height * level.width;
  }
  return starts;
}

namespace {

// The rules validate() and validate_fused() share; `names` names the two per-sample tensors.
struct SampleNames {
  const char* locations;  // [N, Q, M, L, P, 2]
  const char* weights;    // [N, Q, M, L, P] (the fused op's [N, Q, M, L*P]: the same elements)
};

void validate_common(const Problem& p, const SampleNames& names) {
  require_nonnegative(p.batch, "batch (N)");
  require_nonnegative(p.queries, "queries (Q)");
  require_nonnegative(p.heads, "heads (M)");
  require_positive(p.channels, "channels (D)");
  if (p.levels.empty()) throw Error("spatial_shapes", "at least 1 level (L >= 1)", "L = 0");
  // K = the points of a head over all levels: L*P, or the sum of the points per level.
  std::int64_t K = 0;
  if (p.level_points.empty()) {
    require_positive(p.points, "points (P)");
    K = checked_product({p.num_levels(), p.points}, names.weights, "L*P");
  } else {
    if (p.level_points.size() != p.levels.size())
      throw Error("points", str(p.num_levels()) + " entries (one per level of spatial_shapes)",
                  str(static_cast<std::int64_t>(p.level_points.size())) + " entries " + str(p.level_points));
    for (std::size_t l = 0; l < p.level_points.size(); ++l) {
      if (p.level_points[l] < 1)
        throw Error("points[" + std::to_string(l) + "]", ">= 1 (points of level " + std::to_string(l) + ")",
                    str(p.level_points[l]));
      if (__builtin_add_overflow(K, p.level_points[l], &K))
        throw Error("points", "a sum K that fits in 64 bits", str(p.level_points));
    }
  }
  if (p.sampling != Sampling::bilinear && p.sampling != Sampling::discrete)
    throw Error("sampling", "bilinear (0) or discrete (1)", str(static_cast<std::int64_t>(p.sampling)));
  require_nonnegative(p.value_len, "value_len (S)");

  std::int64_t total_rows = 0;
  for (std::size_t l = 0; l < p.levels.size(); ++l) {
    const Level& level = p.levels[l];
    const std::string argument = "spatial_shapes[" + std::to_string(l) + "]";
    if (level.height < 1 || level.width < 1)
      throw Error(argument, "H >= 1 and W >= 1", "(" + str(level.height) + ", " + str(level.width) + ")");
    const std::int64_t rows = checked_product({level.height, level.width}, argument, "H*W");
    if (__builtin_add_overflow(total_rows, rows, &total_rows))
      throw Error("spatial_shapes", "sum of H*W to fit in 64 bits", "an overflow at level " + std::to_string(l));
  }

  if (p.level_start_index.size() != p.levels.size())
    throw Error("level_start_index", str(p.num_levels()) + " entries (one per level)",
                str(static_cast<std::int64_t>(p.level_start_index.size())));
  const std::vector<std::int64_t> starts = level_starts(p.levels);
  for (std::size_t l = 0; l < starts.size(); ++l) {
    if (p.level_start_index[l] != starts[l])
      throw Error("level_start_index[" + std::to_string(l) + "]",
                  str(starts[l]) + " (sum of H*W of the levels before it) for spatial_shapes " +
                      [&] {
                        std::string s;
                        for (const Level& level : p.levels)
                          s += "(" + str(level.height) + "," + str(level.width) + ")";
                        return s;
                      }(),
                  str(p.level_start_index[l]));
  }
  if (p.value_len != total_rows)
    throw Error("value", "S = " + str(total_rows) + " rows (sum of H*W over the levels)",
                "S = " + str(p.value_len));

  check_sample_dtype(p.value_dtype, p.location_dtype, names.locations);
  check_sample_dtype(p.value_dtype, p.weight_dtype, names.weights);

  // Every element offset, and every byte offset, must fit in int64 (the kernels use 64-bit
  // indexing throughout; this is what makes that sufficient).
  const auto bytes = [](std::int64_t elements, DType dtype, const char* argument) {
    std::int64_t b;
    if (__builtin_mul_overflow(elements, static_cast<std::int64_t>(size_of(dtype)), &b))
      throw Error(argument, "a byte size that fits in 64 bits", str(elements) + " elements");
  };
  // Products that stay meaningful when N or Q is zero (the row widths of the tensors).
  checked_product({p.heads, p.channels}, "value", "M*D");
  checked_product({p.value_len, p.heads, p.channels}, "value", "S*M*D");
  checked_product({p.heads, K, 2}, names.locations, "M*K*2 (K = L*P or the sum of points)");
  bytes(checked_product({p.batch, p.value_len, p.heads, p.channels}, "value", "N*S*M*D"), p.value_dtype, "value");
  bytes(checked_product({p.batch, p.queries, p.heads, K, 2}, names.locations, "N*Q*M*K*2"), p.location_dtype,
        names.locations);
  bytes(checked_product({p.batch, p.queries, p.heads, K}, names.weights, "N*Q*M*K"), p.weight_dtype, names.weights);
  bytes(checked_product({p.batch, p.queries, p.heads, p.channels}, "output", "N*Q*M*D"), p.value_dtype, "output");
}

}  // namespace

void validate(const Problem& p) { validate_common(p, {"sampling_locations", "attention_weights"}); }

void validate_fused(const Problem& p) {
  // reference_points' own rules first: an unusable coordinate count must not surface as some
  // other tensor's size error.
  if (p.reference_coords != 2 && p.reference_coords != 4)
    throw Error("reference_points", "2 coordinates (x, y) or 4 (cx, cy, w, h) in the last dimension",
                str(p.reference_coords));
  check_sample_dtype(p.value_dtype, p.reference_dtype, "reference_points");
  if (p.reference_coords == 4 && !(p.offset_scale >= -std::numeric_limits<double>::max() &&
                                    p.offset_scale <= std::numeric_limits<double>::max()))
    throw Error("offset_scale", "a finite number", std::to_string(p.offset_scale));
  validate_common(p, {"sampling_offsets", "attention_logits"});
  const std::int64_t elements = checked_product({p.batch, p.queries, p.num_levels(), p.reference_coords},
                                                "reference_points", "N*Q*L*coords");
  std::int64_t b;
  if (__builtin_mul_overflow(elements, static_cast<std::int64_t>(size_of(p.reference_dtype)), &b))
    throw Error("reference_points", "a byte size that fits in 64 bits", str(elements) + " elements");
}

namespace {

// The per-sample tensors' sizes as describe() and describe_fused() check them: [N, Q, M, L, P, 2]
// and [N, Q, M, L, P] (or the fused logits' [N, Q, M, L*P]) without points per level,
// [N, Q, M, K, 2] and [N, Q, M, K] with them. Sets queries, points and level_points.
void describe_samples(Problem& p, const std::vector<std::int64_t>& loc, const char* loc_name,
                      const std::vector<std::int64_t>& w, const char* w_name, bool flat_weights,
                      const std::vector<std::int64_t>& points) {
  const std::int64_t N = p.batch, M = p.heads, L = p.num_levels();
  if (!points.empty()) {
    if (loc.size() != 5) throw Error(loc_name, "5 dimensions [N, Q, M, K, 2] (points per level given)", rank_str(loc));
    if (w.size() != 4) throw Error(w_name, "4 dimensions [N, Q, M, K] (points per level given)", rank_str(w));
    if (static_cast<std::int64_t>(points.size()) != L)
      throw Error("points", str(L) + " entries (one per level of spatial_shapes)",
                  str(static_cast<std::int64_t>(points.size())) + " entries " + str(points));
    std::int64_t K = 0;
    for (std::size_t l = 0; l < points.size(); ++l) {
      if (points[l] < 1)
        throw Error("points[" + std::to_string(l) + "]", ">= 1 (points of level " + std::to_string(l) + ")",
                    str(points[l]));
      if (__builtin_add_overflow(K, points[l], &K)) throw Error("points", "a sum K that fits in 64 bits", str(points));
    }
    const std::vector<std::int64_t> expected_loc{N, loc[1], M, K, 2};
    if (loc != expected_loc)
      throw Error(loc_name, "sizes [N, Q, M, K, 2] = " + str(expected_loc) +
                                " (N, M from value; K = sum of points " + str(points) + ")",
                  str(loc));
    const std::vector<std::int64_t> expected_w{N, loc[1], M, K};
    if (w != expected_w)
      throw Error(w_name, "sizes [N, Q, M, K] = " + str(expected_w) + " (from " + loc_name + ")", str(w));
    p.queries = loc[1];
    p.points = 0;
    p.level_points = points;
    return;
  }
  const char* w_shape = flat_weights ? "4 dimensions [N, Q, M, L*P]" : "5 dimensions [N, Q, M, L, P]";
  if (loc.size() != 6) throw Error(loc_name, "6 dimensions [N, Q, M, L, P, 2]", rank_str(loc));
  if (w.size() != (flat_weights ? 4u : 5u)) throw Error(w_name, w_shape, rank_str(w));
  const std::int64_t P = loc[4];
  if (P < 1) throw Error(loc_name, "P >= 1 points (dimension 4)", "P = " + str(P));
  const std::vector<std::int64_t> expected_loc{N, loc[1], M, L, P, 2};
  if (loc != expected_loc)
    throw Error(loc_name, "sizes [N, Q, M, L, P, 2] = " + str(expected_loc) +
                              " (N, M from value; L from spatial_shapes)",
                str(loc));
  if (flat_weights) {
    const std::vector<std::int64_t> expected_w{N, loc[1], M, checked_product({L, P}, w_name, "L*P")};
    if (w != expected_w)
      throw Error(w_name, "sizes [N, Q, M, L*P] = " + str(expected_w) + " (from " + loc_name + ")", str(w));
  } else {
    const std::vector<std::int64_t> expected_w(loc.begin(), loc.end() - 1);
    if (w != expected_w)
      throw Error(w_name, "sizes [N, Q, M, L, P] = " + str(expected_w) + " (from " + loc_name + ")", str(w));
  }
  p.queries = loc[1];
  p.points = P;
}

// The checks both describe()s share for value, spatial_shapes and level_start_index, and the
// Problem they give.
Problem describe_value(const std::vector<std::int64_t>& v, const std::vector<std::int64_t>& ss,
                       const std::vector<std::int64_t>& ls, const std::int64_t* spatial_shapes,
                       const std::int64_t* level_start_index) {
  if (v.size() != 4) throw Error("value", "4 dimensions [N, S, M, D]", rank_str(v));
  if (ss.size() != 2 || ss[1] != 2) throw Error("spatial_shapes", "2 dimensions [L, 2]", rank_str(ss));
  if (ls.size() != 1) throw Error("level_start_index", "1 dimension [L]", rank_str(ls));
  const std::int64_t L = ss[0];
  if (v[3] < 1) throw Error("value", "D >= 1 channels per head (dimension 3)", "D = " + str(v[3]));
  if (L < 1) throw Error("spatial_shapes", "at least 1 level (L >= 1)", "L = " + str(L));
  if (ls[0] != L) throw Error("level_start_index", "[L] = [" + str(L) + "] (L from spatial_shapes)", str(ls));
  Problem p;
  p.batch = v[0];
  p.value_len = v[1];
  p.heads = v[2];
  p.channels = v[3];
  p.levels.resize(static_cast<std::size_t>(L));
  p.level_start_index.assign(level_start_index, level_start_index + L);
  for (std::int64_t l = 0; l < L; ++l) p.levels[l] = Level{spatial_shapes[2 * l], spatial_shapes[2 * l + 1]};
  return p;
}

void require_nonnegative_sizes(std::initializer_list<std::pair<const std::vector<std::int64_t>*, const char*>> named) {
  for (const auto& [t, argument] : named)
    for (std::int64_t s : *t)
      if (s < 0) throw Error(argument, "non-negative sizes", str(*t));
}

}  // namespace

Problem describe(const TensorSizes& sizes, const std::int64_t* spatial_shapes,
                 const std::int64_t* level_start_index, DType value_dtype, DType location_dtype,
                 DType weight_dtype, const std::vector<std::int64_t>& points, Sampling sampling) {
  require_nonnegative_sizes({{&sizes.value, "value"},
                             {&sizes.spatial_shapes, "spatial_shapes"},
                             {&sizes.level_start_index, "level_start_index"},
                             {&sizes.sampling_locations, "sampling_locations"},
                             {&sizes.attention_weights, "attention_weights"}});
  Problem p = describe_value(sizes.value, sizes.spatial_shapes, sizes.level_start_index, spatial_shapes,
                             level_start_index);
  describe_samples(p, sizes.sampling_locations, "sampling_locations", sizes.attention_weights, "attention_weights",
                   false, points);
  p.sampling = sampling;
  p.value_dtype = value_dtype;
  p.location_dtype = location_dtype;
  p.weight_dtype = weight_dtype;
  validate(p);
  return p;
}

Problem describe_fused(const FusedTensorSizes& sizes, const std::int64_t* spatial_shapes,
                       const std::int64_t* level_start_index, DType value_dtype, DType reference_dtype,
                       DType offset_dtype, DType logit_dtype, const std::vector<std::int64_t>& points,
                       Sampling sampling, double offset_scale) {
  const auto& ref = sizes.reference_points;
  require_nonnegative_sizes({{&sizes.value, "value"},
                             {&sizes.spatial_shapes, "spatial_shapes"},
                             {&sizes.level_start_index, "level_start_index"},
                             {&ref, "reference_points"},
                             {&sizes.sampling_offsets, "sampling_offsets"},
                             {&sizes.attention_logits, "attention_logits"}});
  if (ref.size() != 4) throw Error("reference_points", "4 dimensions [N, Q, L, 2 or 4]", rank_str(ref));
  Problem p = describe_value(sizes.value, sizes.spatial_shapes, sizes.level_start_index, spatial_shapes,
                             level_start_index);
  describe_samples(p, sizes.sampling_offsets, "sampling_offsets", sizes.attention_logits, "attention_logits", true,
                   points);
  const std::int64_t N = p.batch, Q = p.queries, L = p.num_levels();
  if (ref[0] != N || ref[1] != Q || ref[2] != L || (ref[3] != 2 && ref[3] != 4))
    throw Error("reference_points",
                "sizes [N, Q, L, 2 or 4] = [" + str(N) + ", " + str(Q) + ", " + str(L) +
                    ", 2 or 4] (N from value, Q from sampling_offsets, L from spatial_shapes)",
                str(ref));
  p.sampling = sampling;
  p.offset_scale = offset_scale;
  p.value_dtype = value_dtype;
  p.location_dtype = offset_dtype;
  p.weight_dtype = logit_dtype;
  p.reference_coords = ref[3];
  p.reference_dtype = reference_dtype;
  validate_fused(p);
  return p;
}

void check_grad_output_sizes(const Problem& p, const std::vector<std::int64_t>& sizes) {
  const std::vector<std::int64_t> expected{p.batch, p.queries, p.heads * p.channels};
  if (sizes != expected) throw Error("grad_output", "sizes [N, Q, M*D] = " + str(expected), str(sizes));
}

}  // namespace msda
