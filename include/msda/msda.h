// msda: multi-scale deformable attention (Deformable DETR's MSDeformAttn operator), forward and
// backward, over raw memory. The operator, its precision and its bad-input rules are those of
// shared/SPEC.md; this header is the whole public C++ API and depends on nothing but the standard
// library.
//
// Tensors (all contiguous, row-major, 64-bit element offsets):
//   value               [N, S, M, D]        value_dtype
//   sampling_locations  [N, Q, M, L, P, 2]  location_dtype   (x along W, y along H, 0..1 = map)
//   attention_weights   [N, Q, M, L, P]     weight_dtype
//   output              [N, Q, M*D]         value_dtype
// Each gradient has the shape and dtype of its input; grad_output has the output's.
//
// The fused op (SPEC "The fused op", forward_fused below) takes instead of the last two:
//   reference_points    [N, Q, L, 2 or 4]   reference_dtype  ((x, y) or a box (cx, cy, w, h))
//   sampling_offsets    [N, Q, M, L, P, 2]  location_dtype   (the offsets Linear's output)
//   attention_logits    [N, Q, M, L*P]      weight_dtype     (before the softmax)
//
// Points per level (SPEC "Points per level and discrete sampling"; Problem::level_points): level
// l has P_l points and K = sum of P_l; [L, P] above becomes [K] (the samples of level l at
// k in [P_0 + ... + P_{l-1}, P_0 + ... + P_l)): sampling_locations and sampling_offsets are
// [N, Q, M, K, 2], attention_weights and attention_logits [N, Q, M, K]. Equal P_l is the same
// memory as the [L, P] form.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace msda {

enum class DType : std::uint8_t { f32, f64, bf16, f16 };

std::string_view name(DType dtype) noexcept;
std::size_t size_of(DType dtype) noexcept;

// The one exception type of the library: every rejected input names the argument, what was
// expected and what it got. Derives from std::invalid_argument so generic handlers catch it.
class Error : public std::invalid_argument {
 public:
  Error(std::string argument, std::string expected, std::string actual);
  const std::string& argument() const noexcept { return argument_; }
  const std::string& expected() const noexcept { return expected_; }
  const std::string& actual() const noexcept { return actual_; }

 private:
  std::string argument_, expected_, actual_;
};

// How a sample reads its level (SPEC): bilinear interpolation of the four pixels around it, or
// the one pixel it falls in (RT-DETRv2's "discrete"), whose choice is piecewise constant and so
// gives the location no gradient (the backward writes zeros there).
enum class Sampling : std::uint8_t { bilinear, discrete };
std::string_view name(Sampling sampling) noexcept;

struct Level {
  std::int64_t height = 0;  // H_l
  std::int64_t width = 0;   // W_l
};

// One MSDA problem: the sizes of SPEC's tensors and their dtypes. Letters are SPEC's.
struct Problem {
  std::int64_t batch = 0;      // N
  std::int64_t value_len = 0;  // S: rows of value per batch element, must equal sum of H_l*W_l
  std::int64_t heads = 0;      // M
  std::int64_t channels = 0;   // D, per head
  std::int64_t queries = 0;    // Q
  std::int64_t points = 0;     // P, per head and level (when level_points is empty)
  std::vector<Level> levels;   // L entries: spatial_shapes
  // Points per level, P_0 .. P_{L-1} (each >= 1), or empty: `points` on every level. When given,
  // `points` is not read.
  std::vector<std::int64_t> level_points;
  Sampling sampling = Sampling::bilinear;
  std::vector<std::int64_t> level_start_index;  // L entries, as the caller's tensor holds them
  DType value_dtype = DType::f32;
  DType location_dtype = DType::f32;  // value_dtype, or f32
  DType weight_dtype = DType::f32;    // value_dtype, or f32
  // Read by the fused entry points only (there location_dtype is sampling_offsets' dtype and
  // weight_dtype attention_logits').
  std::int64_t reference_coords = 2;   // 2: points (x, y); 4: boxes (cx, cy, w, h)
  DType reference_dtype = DType::f32;  // value_dtype, or f32
  // Boxes: location = ref[:2] + offset / P_l * ref[2:] * offset_scale (Deformable DETR: 0.5;
  // D-FINE and RT-DETRv2 pass their own). Finite; not read with 2 coordinates.
  double offset_scale = 0.5;

  std::int64_t num_levels() const noexcept { return static_cast<std::int64_t>(levels.size()); }
  // P_l, and K = the sum of P_l over the levels (L * points when level_points is empty).
  std::int64_t points_of(std::int64_t level) const noexcept {
    return level_points.empty() ? points : level_points[static_cast<std::size_t>(level)];
  }
  std::int64_t total_points() const noexcept;
};

// level_start_index for the given levels: 0, H_0*W_0, H_0*W_0 + H_1*W_1, ...
std::vector<std::int64_t> level_starts(const std::vector<Level>& levels);

// Throws Error if the problem breaks any rule of SPEC's "Bad input" (zero L, P or D, negative
// sizes, non-positive H or W, level_start_index or S inconsistent with the levels, a dtype mix
// SPEC does not allow, element counts or byte offsets that overflow 64 bits).
void validate(const Problem& problem);

// For bindings that hold tensors: the sizes of SPEC's five tensors, checked for rank and for
// agreement with each other, plus the contents of spatial_shapes ([L, 2], row-major) and
// level_start_index ([L]). Returns the validated Problem or throws Error naming the tensor.
// With `points` (L entries) the per-sample tensors have the [N, Q, M, K, ...] form; empty: the
// [N, Q, M, L, P, ...] form, P read from sampling_locations.
struct TensorSizes {
  std::vector<std::int64_t> value, spatial_shapes, level_start_index, sampling_locations,
      attention_weights;
};
Problem describe(const TensorSizes& sizes, const std::int64_t* spatial_shapes,
                 const std::int64_t* level_start_index, DType value_dtype, DType location_dtype,
                 DType weight_dtype, const std::vector<std::int64_t>& points = {},
                 Sampling sampling = Sampling::bilinear);
// Throws Error unless grad_output has the output's sizes [N, Q, M*D].
void check_grad_output_sizes(const Problem& problem, const std::vector<std::int64_t>& sizes);

// validate() for the fused op: the same rules, with errors naming sampling_offsets and
// attention_logits, plus reference_coords (2 or 4) and reference_dtype (value's or f32).
void validate_fused(const Problem& problem);

// describe() for the fused op: value [N, S, M, D], spatial_shapes [L, 2], level_start_index [L],
// reference_points [N, Q, L, 2 or 4], sampling_offsets [N, Q, M, L, P, 2],
// attention_logits [N, Q, M, L*P]; with `points`, sampling_offsets [N, Q, M, K, 2] and
// attention_logits [N, Q, M, K].
struct FusedTensorSizes {
  std::vector<std::int64_t> value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
      attention_logits;
};
Problem describe_fused(const FusedTensorSizes& sizes, const std::int64_t* spatial_shapes,
                       const std::int64_t* level_start_index, DType value_dtype, DType reference_dtype,
                       DType offset_dtype, DType logit_dtype, const std::vector<std::int64_t>& points = {},
                       Sampling sampling = Sampling::bilinear, double offset_scale = 0.5);

enum class Backend : std::uint8_t {
  automatic,  // the fastest backend for host memory (today: cpu); never cuda, which needs asking
  reference,  // scalar loops that read like SPEC, double accumulation; the tests' oracle
  cpu,        // multi-threaded CPU kernels
  cuda,       // NVIDIA GPUs: every pointer is device memory, work goes on options.cuda.stream
};
std::string_view name(Backend backend) noexcept;

// Whether this build has the cuda backend (CMake found nvcc), and whether it can run now (a
// CUDA device is visible). Asking for Backend::cuda in a build without it is an Error.
bool cuda_built() noexcept;
bool cuda_available() noexcept;
// Whether `stream` (a cudaStream_t; null: the legacy default stream) is being captured into a
// CUDA graph. A framework asks before it copies device memory to the host, which a capture
// forbids. false in a build without the cuda backend, and where the runtime cannot tell.
bool cuda_stream_capturing(void* stream) noexcept;

// The instruction set of the cpu backend's kernels. `best` is the widest this CPU supports;
// asking for one it or the build lacks (an Arm one on x86, or the reverse) is an Error. Results
// are bitwise reproducible for a given choice.
//   baseline  portable vector code for the build's architecture (x86-64: SSE2; AArch64: NEON)
//   avx2      x86-64-v3: AVX2, FMA, F16C
//   avx512    x86-64-v4: AVX-512 F/BW/DQ/VL
//   neon      AArch64 Advanced SIMD (every AArch64 CPU), tuned for its 32 registers
//   sve256    AArch64 SVE on a machine whose vector length is 256 bits (e.g. Graviton3)
enum class Isa : std::uint8_t { best, baseline, avx2, avx512, neon, sve256 };
std::string_view name(Isa isa) noexcept;

// Switches of the cpu backend's techniques, for benchmarks and ablation studies. The defaults
// are the fastest measured (README, "Measured"). Results agree across settings (a zero may differ
// in sign) and each setting is bitwise deterministic.
struct CpuTuning {
  // forward, gathers read directly (`staging` below): queries per block; inside a block the
  // heads go one at a time so the gathered rows are those of one head. 0 = the default; 1 = each
  // query does all its heads at once. Staged gathers always walk one head's queries in turn.
  std::int64_t query_block = 0;
  // forward and backward: where the gathers read value's rows. In value ([N, S, M, D]) one
  // head's rows lie M*D elements apart, so the rows around a query's samples span M times the
  // memory that head uses and fall out of the core's own cache. Staged, each thread first copies
  // the rows of the (batch, head) it works on into a contiguous per-thread buffer ([S, D], kept
  // between calls) and walks that head's queries from it, so the rows around them stay in L1/L2
  // (the research's value re-layout, with a core's cache as the on-chip buffer). The copy is one
  // pass over value; it pays where each row is read several times. Same bits either way.
  //   copy       always (a part's rows at most 64 MiB; larger ones read value directly)
  //   direct     never: the gathers read value where it is
  //   automatic  copy where a (batch, head)'s samples have at least 4 corners per row of value
  //              in the forward (encoders: 64), 2 in the backward's dot products (dino-dec: 3.2),
  //              direct in sparse decoders (ddetr-dec: 1.1), where the copy costs more
  enum class Staging : std::uint8_t { automatic, copy, direct };
  Staging staging = Staging::automatic;
  // backward: a part (one thread's unit of work, owning its grad_value rows) is a (batch, head)
  // with all its levels, or one level of it when there are fewer (batch, head) pairs than
  // threads. true: always one level per part.
  bool level_parts = false;
  // backward and staged forward, encoders (queries as many as value's rows: query i is pixel i
  // of the pyramid, as every encoder lays them out): image rows per stripe of a level's queries.
  // A part walks each level's queries stripe by stripe, each stripe column by column, so the rows
  // around a query's samples (offsets of a few pixels) are those its neighbours in the walk have
  // just read and added into: they stay in the core's cache where the raster order's band of
  // rows, value's and the backward's sums, would not (512 KiB L2). Any order gives correct
  // results (the backward's bits depend on it; each is deterministic); this one is fast when
  // queries are pixels. 0 = the default, 8; 1 = raster order. Other problems walk in order.
  std::int64_t query_stripe = 0;
  // backward, rows summed in a copy (`scatter` below): the bytes of grad_value rows one thread
  // sums at a time in the compute type (its per-thread workspace); a larger part is cut into
  // levels, then into bands of rows (each pass re-reads the samples). Unused in place.
  // 0 = the default, 64 MiB.
  std::int64_t accumulator_budget = 0;
  // backward: where a part sums its grad_value rows. All give the same bits: each row's terms
  // are added in the same order, from the same zero.
  //   copy       in a contiguous per-thread copy of the part's rows (the compute type), zeroed,
  //              then stored once: three passes over the rows, cheap to add into
  //   in_place   f32 and f64: in grad_value itself, zeroed once up front: one pass, but each
  //              corner is a read-modify-write of a row M*D elements from its neighbours (bf16
  //              and f16 use the copy, to round once)
  //   owner      owner-computes: each corner recorded (row, query, weight) as the samples are
  //              walked, the records bucketed by row, then each row summed in registers from its
  //              bucket and stored once: no row read back, no zeroing, at the price of writing
  //              and reading 12-16 bytes per corner (levels whose records would take more
  //              than 64 MiB per thread use the copy)
  //   automatic  per level of the map: in place where a level has at most 1 corner per row on
  //              average (2 where value and grad_value fit in half the last-level cache), the
  //              copy otherwise; never owner-computes, which was slower inside the kernel on the
  //              decoders (docs/performance.md, "What did not pay")
  enum class Scatter : std::uint8_t { automatic, copy, in_place, owner };
  Scatter scatter = Scatter::automatic;
};

// The cuda backend's settings. Its calls are asynchronous: they enqueue kernels on `stream` and
// return; the results are there once the stream reaches them.
struct CudaOptions {
  void* stream = nullptr;  // a cudaStream_t (kept void* so this header needs no CUDA); null: the legacy default stream
  // Device scratch of at least workspace_size() bytes, aligned to 256 bytes (as cudaMalloc's and
  // torch's allocations are), owned by the caller (a framework passes its caching allocator's
  // memory), or null: msda allocates and frees it stream-ordered (cudaMallocAsync).
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  // true: grad_value is a gather over the samples bucketed by the pixel they touch, in an order
  // fixed by a stable sort, so the backward is bitwise reproducible. false: float atomicAdd
  // scatters, whose order (and so rounding) varies from run to run; an ablation, not a default.
  bool deterministic = true;
  // The device the pointers live on and the kernels run on; -1: the current device of msda's own
  // CUDA runtime. msda links its runtime statically, so a framework's runtime (torch's) keeps its
  // own current device: a framework passes the device of its tensors here.
  int device = -1;
  // false: the caller vouches that every pointer is memory of `device` (a framework that has
  // checked its tensors' devices), which saves a cudaPointerGetAttributes per pointer per call.
  bool check_pointers = true;
};

struct Options {
  int threads = 0;  // 0: OpenMP's default (omp_get_max_threads); results never depend on it
  Backend backend = Backend::automatic;
  Isa isa = Isa::best;  // cpu backend only
  CpuTuning tuning;     // cpu backend only
  CudaOptions cuda;     // cuda backend only
};


struct Inputs {
  const void* value = nullptr;
  const void* sampling_locations = nullptr;
  const void* attention_weights = nullptr;
};

// Null members are gradients the caller does not want: they are neither computed nor written.
struct Gradients {
  void* value = nullptr;               // [N, S, M, D], fully overwritten (no accumulation)
  void* sampling_locations = nullptr;  // [N, Q, M, L, P, 2] (discrete sampling: zeros)
  void* attention_weights = nullptr;   // [N, Q, M, L, P]
};

struct FusedInputs {
  const void* value = nullptr;
  const void* reference_points = nullptr;
  const void* sampling_offsets = nullptr;
  const void* attention_logits = nullptr;
};

// Null members are gradients the caller does not want, as in Gradients.
struct FusedGradients {
  void* value = nullptr;             // [N, S, M, D], fully overwritten
  void* reference_points = nullptr;  // [N, Q, L, coords] (discrete sampling: zeros)
  void* sampling_offsets = nullptr;  // [N, Q, M, L, P, 2] (discrete sampling: zeros)
  void* attention_logits = nullptr;  // [N, Q, M, L*P]
};

// The device scratch the cuda backend needs for one call (0 for the other backends): the level
// table, and for the backward the sample buckets and the sort's buffers. A backward with every
// gradient wanted needs the most; the overloads taking the gradients (only which are null is
// read) size a backward that wants fewer. Throws Error on a bad problem; sizing a backward needs
// a CUDA device (the sort sizes its own scratch per device).
enum class Pass : std::uint8_t { forward, backward, forward_fused, backward_fused };
std::size_t workspace_size(const Problem& problem, Pass pass, const Options& options = {});
std::size_t workspace_size(const Problem& problem, const Gradients& wanted, const Options& options);
std::size_t workspace_size(const Problem& problem, const FusedGradients& wanted, const Options& options);

// output = MSDA(inputs). Validates the problem first; throws Error on bad input.
void forward(const Problem& problem, const Inputs& inputs, void* output, const Options& options = {});

// The gradients of sum(grad_output * output) with respect to each input. Deterministic: bitwise
// identical across runs and thread counts.
void backward(const Problem& problem, const Inputs& inputs, const void* grad_output,
              const Gradients& gradients, const Options& options = {});

// The fused op: output = MSDA(value, locations, softmax(attention_logits)) with the locations
// computed from reference_points and sampling_offsets (SPEC "The fused op"); the cpu backend's
// locations and weights exist only inside its kernels. Validates with validate_fused; throws
// Error on bad input.
void forward_fused(const Problem& problem, const FusedInputs& inputs, void* output, const Options& options = {});

// The gradients of sum(grad_output * output) with respect to the four inputs, deterministic like
// backward()'s (grad_value comes from the same kernel). A sample zeroed by the range rule
// contributes nothing to any gradient: an infinite offset or box size gives no 0 * inf.
void backward_fused(const Problem& problem, const FusedInputs& inputs, const void* grad_output,
                    const FusedGradients& gradients, const Options& options = {});

}  // namespace msda
