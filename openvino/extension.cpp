// msda's OpenVINO extension: the ONNX nodes msda.onnx.export writes (domain "msda", version 1)
// become two OpenVINO operations that run msda's CPU kernels (SPEC "Deployment").
//
//   MultiScaleDeformableAttention       (value, spatial_shapes, level_start_index,
//                                        sampling_locations, attention_weights)
//   MultiScaleDeformableAttentionFused  (value, spatial_shapes, level_start_index,
//                                        reference_points, sampling_offsets, attention_logits)
//
// Attributes: `points` (INTS, only when the levels have their own numbers of points; then the
// per-sample tensors have the [N, Q, M, K, ...] layout), `sampling` ("bilinear" or "discrete"),
// and for the fused op `offset_scale` (FLOAT). Output [N, Q, M*D] in value's element type.
//
// Shapes are inferred statically (dynamic dimensions propagate), and everything that can be
// checked from shapes and element types is checked in validate_and_infer_types, so that a
// mismatch fails when the model is read, naming the input. evaluate() calls msda::describe /
// describe_fused, which checks the rest (spatial_shapes against value's S, level_start_index),
// and turns msda::Error into an OpenVINO exception with msda's message.
//
// The library is loaded with ov::Core::add_extension(path); it exports create_extensions
// (OPENVINO_CREATE_EXTENSIONS) with the two ONNX conversions and the two operations (the latter
// also let ov::Core read an IR that ov::save_model wrote from such a model).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/conversion.hpp>
#include <openvino/op/op.hpp>

#ifdef MSDA_OPENVINO_TBB
#include <oneapi/tbb/task_arena.h>
#endif

#ifdef __linux__
#include <sched.h>
#endif

#include "msda/msda.h"

namespace msda_openvino {
namespace {

constexpr const char* kDomain = "msda";

std::optional<msda::DType> to_dtype(const ov::element::Type& type) {
  if (type == ov::element::f32) return msda::DType::f32;
  if (type == ov::element::f64) return msda::DType::f64;
  if (type == ov::element::f16) return msda::DType::f16;
  if (type == ov::element::bf16) return msda::DType::bf16;
  return std::nullopt;
}

std::optional<msda::Sampling> to_sampling(const std::string& sampling) {
  if (sampling == "bilinear") return msda::Sampling::bilinear;
  if (sampling == "discrete") return msda::Sampling::discrete;
  return std::nullopt;
}

// The threads of the OpenVINO stream this inference runs on: the CPU plugin runs each stream's
// nodes inside a TBB task arena of the size it chose (ov::inference_num_threads, or its own
// choice from the cores); 0 (OpenMP's default) where OpenVINO's threading library is not linked.
int openvino_threads() {
#ifdef MSDA_OPENVINO_TBB
  return std::max(1, tbb::this_task_arena::max_concurrency());
#else
  return 0;
#endif
}

#ifdef __linux__
// The CPUs the process could run on when the extension was loaded (ov::Core::add_extension).
struct LoadTimeCpus {
  cpu_set_t set;
  bool known = sched_getaffinity(0, sizeof set, &set) == 0;
};
const LoadTimeCpus load_time_cpus{};

// msda's kernels run on OpenMP threads, which the calling thread creates (once; they are kept)
// and which inherit its CPU affinity. The CPU plugin pins the threads of its streams, each to
// one core (ov::hint::enable_cpu_pinning, on by default on Linux), and runs a synchronous
// inference on the caller's thread, pinned the same way: OpenMP threads created from there would
// all share that one core. So while msda runs, a calling thread allowed fewer CPUs than threads
// gets the CPUs the process had when the extension was loaded, and its own back afterwards.
class AffinityForThreads {
 public:
  explicit AffinityForThreads(int threads) {
    if (threads <= 1 || !load_time_cpus.known || sched_getaffinity(0, sizeof saved_, &saved_) != 0) return;
    if (CPU_COUNT(&saved_) >= threads || CPU_COUNT(&load_time_cpus.set) <= CPU_COUNT(&saved_)) return;
    restore_ = sched_setaffinity(0, sizeof load_time_cpus.set, &load_time_cpus.set) == 0;
  }
  ~AffinityForThreads() {
    if (restore_) sched_setaffinity(0, sizeof saved_, &saved_);
  }
  AffinityForThreads(const AffinityForThreads&) = delete;
  AffinityForThreads& operator=(const AffinityForThreads&) = delete;

 private:
  cpu_set_t saved_;
  bool restore_ = false;
};
#else
class AffinityForThreads {
 public:
  explicit AffinityForThreads(int) {}
};
#endif

std::vector<std::int64_t> sizes_of(const ov::Tensor& tensor) {
  const ov::Shape& shape = tensor.get_shape();
  return std::vector<std::int64_t>(shape.begin(), shape.end());
}

// The contents of spatial_shapes or level_start_index (i64, or i32 as the CPU plugin makes them).
std::vector<std::int64_t> index_contents(const ov::Tensor& tensor, const char* name) {
  const std::size_t count = tensor.get_size();
  std::vector<std::int64_t> out(count);
  const ov::element::Type type = tensor.get_element_type();
  if (type == ov::element::i64) {
    const auto* data = tensor.data<const std::int64_t>();
    std::copy(data, data + count, out.begin());
  } else if (type == ov::element::i32) {
    const auto* data = tensor.data<const std::int32_t>();
    std::copy(data, data + count, out.begin());
  } else {
    OPENVINO_THROW("msda: ", name, ": expected element type i64 or i32, got ", type);
  }
  return out;
}

msda::DType float_dtype(const ov::Tensor& tensor, const char* name) {
  const auto dtype = to_dtype(tensor.get_element_type());
  if (!dtype)
    OPENVINO_THROW("msda: ", name, ": expected element type f32, f64, f16 or bf16, got ", tensor.get_element_type());
  return *dtype;
}

// The common part of both operations: attributes and the static checks of validate_and_infer_types.
class MsdaOpBase : public ov::op::Op {
 public:
  MsdaOpBase() = default;
  MsdaOpBase(const ov::OutputVector& inputs, std::vector<std::int64_t> points, std::string sampling)
      : ov::op::Op(inputs), points_(std::move(points)), sampling_(std::move(sampling)) {}

  bool has_evaluate() const override { return true; }

  const std::vector<std::int64_t>& points() const { return points_; }
  const std::string& sampling() const { return sampling_; }

 protected:
  // Names of the inputs, in order, for the messages.
  virtual const char* const* input_names() const = 0;

  // One letter of SPEC's sizes (N, Q, M, ...) gathered from several inputs: the first static
  // value seen, and which input it came from; a different static value is an error naming both.
  struct Letter {
    explicit Letter(const char* name) : letter(name) {}
    const char* letter;
    ov::Dimension dim = ov::Dimension::dynamic();
    std::string source;
  };

  void unify(Letter& letter, const ov::Dimension& dim, const std::string& source) const {
    if (dim.is_dynamic()) return;
    if (letter.dim.is_static()) {
      NODE_VALIDATION_CHECK(this, letter.dim.get_length() == dim.get_length(), "msda: ", source, ": expected ",
                            letter.letter, " = ", letter.dim.get_length(), " (", letter.source, "), got ",
                            dim.get_length());
      return;
    }
    letter.dim = dim;
    letter.source = source;
  }

  // The input's partial shape, with its rank checked when static (`layout` names the dimensions).
  ov::PartialShape shape_of(std::size_t index, std::int64_t rank, const char* layout) const {
    const ov::PartialShape shape = get_input_partial_shape(index);
    NODE_VALIDATION_CHECK(this, shape.rank().is_dynamic() || shape.rank().get_length() == rank, "msda: ",
                          input_names()[index], ": expected ", rank, " dimensions ", layout, ", got ", shape);
    return shape;
  }

  static std::string dim_source(const char* input, std::size_t axis) {
    return std::string(input) + " dimension " + std::to_string(axis);
  }

  void check_element_types(std::initializer_list<std::size_t> float_inputs) const {
    const char* const* names = input_names();
    const ov::element::Type value = get_input_element_type(0);
    NODE_VALIDATION_CHECK(this, value.is_dynamic() || to_dtype(value).has_value(), "msda: ", names[0],
                          ": expected element type f32, f64, f16 or bf16, got ", value);
    for (std::size_t index : {std::size_t{1}, std::size_t{2}}) {
      const ov::element::Type type = get_input_element_type(index);
      NODE_VALIDATION_CHECK(this, type.is_dynamic() || type == ov::element::i64 || type == ov::element::i32,
                            "msda: ", names[index], ": expected element type i64 or i32, got ", type);
    }
    for (std::size_t index : float_inputs) {
      const ov::element::Type type = get_input_element_type(index);
      if (type.is_dynamic()) continue;
      if (value.is_dynamic()) {
        NODE_VALIDATION_CHECK(this, to_dtype(type).has_value(), "msda: ", names[index],
                              ": expected element type f32, f64, f16 or bf16, got ", type);
      } else {
        NODE_VALIDATION_CHECK(this, type == value || type == ov::element::f32, "msda: ", names[index],
                              ": expected element type ", value, " (value's) or f32, got ", type);
      }
    }
  }

  void check_attributes() const {
    NODE_VALIDATION_CHECK(this, to_sampling(sampling_).has_value(),
                          "msda: sampling: expected \"bilinear\" or \"discrete\", got \"", sampling_, "\"");
    for (std::size_t l = 0; l < points_.size(); ++l)
      NODE_VALIDATION_CHECK(this, points_[l] >= 1, "msda: points[", l, "]: expected >= 1, got ", points_[l]);
  }

  // value [N, S, M, D], spatial_shapes [L, 2], level_start_index [L]; fills N, M, D, L.
  void check_value_and_levels(Letter& N, Letter& M, Letter& D, Letter& L) const {
    const char* const* names = input_names();
    const ov::PartialShape value = shape_of(0, 4, "[N, S, M, D]");
    if (value.rank().is_static()) {
      unify(N, value[0], dim_source(names[0], 0));
      unify(M, value[2], dim_source(names[0], 2));
      unify(D, value[3], dim_source(names[0], 3));
    }
    const ov::PartialShape shapes = shape_of(1, 2, "[L, 2]");
    if (shapes.rank().is_static()) {
      NODE_VALIDATION_CHECK(this, shapes[1].compatible(2), "msda: ", names[1],
                            ": expected 2 columns (H, W) in dimension 1, got ", shapes[1]);
      unify(L, shapes[0], dim_source(names[1], 0));
    }
    const ov::PartialShape starts = shape_of(2, 1, "[L]");
    if (starts.rank().is_static()) unify(L, starts[0], dim_source(names[2], 0));
    if (!points_.empty())
      unify(L, ov::Dimension(static_cast<std::int64_t>(points_.size())), "points (its length)");
  }

  // The per-sample tensors: `coords` (sampling_locations / sampling_offsets, [N, Q, M, L, P, 2]
  // or [N, Q, M, K, 2]) and `weights` (attention_weights [N, Q, M, L, P] or [N, Q, M, K]; with
  // flat_weights, attention_logits [N, Q, M, L*P]).
  void check_samples(std::size_t coords, std::size_t weights, bool flat_weights, Letter& N, Letter& Q, Letter& M,
                     Letter& L) const {
    const char* const* names = input_names();
    if (!points_.empty()) {
      const std::int64_t k = std::accumulate(points_.begin(), points_.end(), std::int64_t{0});
      Letter K{"K"};
      unify(K, ov::Dimension(k), "points (their sum)");
      const ov::PartialShape c = shape_of(coords, 5, "[N, Q, M, K, 2] (points per level given)");
      if (c.rank().is_static()) {
        unify(N, c[0], dim_source(names[coords], 0));
        unify(Q, c[1], dim_source(names[coords], 1));
        unify(M, c[2], dim_source(names[coords], 2));
        unify(K, c[3], dim_source(names[coords], 3));
        NODE_VALIDATION_CHECK(this, c[4].compatible(2), "msda: ", names[coords],
                              ": expected 2 coordinates (x, y) in dimension 4, got ", c[4]);
      }
      const ov::PartialShape w = shape_of(weights, 4, "[N, Q, M, K] (points per level given)");
      if (w.rank().is_static()) {
        unify(N, w[0], dim_source(names[weights], 0));
        unify(Q, w[1], dim_source(names[weights], 1));
        unify(M, w[2], dim_source(names[weights], 2));
        unify(K, w[3], dim_source(names[weights], 3));
      }
      return;
    }
    Letter P{"P"};
    const ov::PartialShape c = shape_of(coords, 6, "[N, Q, M, L, P, 2]");
    if (c.rank().is_static()) {
      unify(N, c[0], dim_source(names[coords], 0));
      unify(Q, c[1], dim_source(names[coords], 1));
      unify(M, c[2], dim_source(names[coords], 2));
      unify(L, c[3], dim_source(names[coords], 3));
      unify(P, c[4], dim_source(names[coords], 4));
      NODE_VALIDATION_CHECK(this, c[5].compatible(2), "msda: ", names[coords],
                            ": expected 2 coordinates (x, y) in dimension 5, got ", c[5]);
    }
    const ov::PartialShape w =
        shape_of(weights, flat_weights ? 4 : 5, flat_weights ? "[N, Q, M, L*P]" : "[N, Q, M, L, P]");
    if (w.rank().is_static()) {
      unify(N, w[0], dim_source(names[weights], 0));
      unify(Q, w[1], dim_source(names[weights], 1));
      unify(M, w[2], dim_source(names[weights], 2));
      if (flat_weights) {
        if (L.dim.is_static() && P.dim.is_static()) {
          Letter LP{"L*P"};
          unify(LP, ov::Dimension(L.dim.get_length() * P.dim.get_length()),
                L.source + " and " + P.source);
          unify(LP, w[3], dim_source(names[weights], 3));
        }
      } else {
        unify(L, w[3], dim_source(names[weights], 3));
        unify(P, w[4], dim_source(names[weights], 4));
      }
    }
  }

  void set_output(const Letter& N, const Letter& Q, const Letter& M, const Letter& D) {
    set_output_type(0, get_input_element_type(0), ov::PartialShape{N.dim, Q.dim, M.dim * D.dim});
  }

  bool visit_common(ov::AttributeVisitor& visitor) {
    visitor.on_attribute("points", points_);
    visitor.on_attribute("sampling", sampling_);
    return true;
  }

  msda::Sampling sampling_enum() const {
    const auto s = to_sampling(sampling_);
    if (!s) OPENVINO_THROW("msda: sampling: expected \"bilinear\" or \"discrete\", got \"", sampling_, "\"");
    return *s;
  }

  // Output [N, Q, M*D] for a validated problem (a plugin passes it allocated; other callers may
  // pass an empty tensor).
  static void* output_memory(ov::TensorVector& outputs, const msda::Problem& p, const ov::element::Type& type) {
    OPENVINO_ASSERT(outputs.size() == 1, "msda: expected 1 output tensor, got ", outputs.size());
    const ov::Shape shape{static_cast<std::size_t>(p.batch), static_cast<std::size_t>(p.queries),
                          static_cast<std::size_t>(p.heads * p.channels)};
    ov::Tensor& out = outputs[0];
    if (!out) out = ov::Tensor(type, shape);
    if (out.get_shape() != shape) out.set_shape(shape);
    OPENVINO_ASSERT(out.get_element_type() == type, "msda: output: expected element type ", type, " (value's), got ",
                    out.get_element_type());
    return out.data();
  }

  std::vector<std::int64_t> points_;
  std::string sampling_ = "bilinear";
};

// Runs fn(), turning msda's bad-input errors into OpenVINO exceptions that carry the message
// (which names the argument) and the node.
template <class Fn>
void run_msda(const ov::Node* node, Fn&& fn) {
  try {
    fn();
  } catch (const msda::Error& e) {
    OPENVINO_THROW(e.what(), " (in ", node->get_type_name(), " node '", node->get_friendly_name(), "')");
  }
}

class MultiScaleDeformableAttention : public MsdaOpBase {
 public:
  OPENVINO_OP("MultiScaleDeformableAttention", "msda");

  MultiScaleDeformableAttention() = default;
  MultiScaleDeformableAttention(const ov::OutputVector& inputs, std::vector<std::int64_t> points, std::string sampling)
      : MsdaOpBase(inputs, std::move(points), std::move(sampling)) {
    constructor_validate_and_infer_types();
  }

  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(this, get_input_size() == 5, "msda: expected 5 inputs (value, spatial_shapes, "
                          "level_start_index, sampling_locations, attention_weights), got ", get_input_size());
    check_attributes();
    check_element_types({3, 4});
    Letter N{"N"}, Q{"Q"}, M{"M"}, D{"D"}, L{"L"};
    check_value_and_levels(N, M, D, L);
    check_samples(3, 4, false, N, Q, M, L);
    set_output(N, Q, M, D);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& inputs) const override {
    ov::check_new_args_count(this, inputs);
    return std::make_shared<MultiScaleDeformableAttention>(inputs, points_, sampling_);
  }

  bool visit_attributes(ov::AttributeVisitor& visitor) override { return visit_common(visitor); }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    OPENVINO_ASSERT(inputs.size() == 5, "msda: expected 5 input tensors, got ", inputs.size());
    run_msda(this, [&] {
      const std::vector<std::int64_t> shapes = index_contents(inputs[1], "spatial_shapes");
      const std::vector<std::int64_t> starts = index_contents(inputs[2], "level_start_index");
      msda::TensorSizes sizes{sizes_of(inputs[0]), sizes_of(inputs[1]), sizes_of(inputs[2]), sizes_of(inputs[3]),
                              sizes_of(inputs[4])};
      // describe() checks the sizes of spatial_shapes and level_start_index before it reads them.
      const msda::Problem problem =
          msda::describe(sizes, shapes.data(), starts.data(), float_dtype(inputs[0], "value"),
                         float_dtype(inputs[3], "sampling_locations"), float_dtype(inputs[4], "attention_weights"),
                         points_, sampling_enum());
      void* out = output_memory(outputs, problem, inputs[0].get_element_type());
      msda::Options options;
      options.threads = openvino_threads();
      options.backend = msda::Backend::cpu;
      const AffinityForThreads affinity(options.threads);
      msda::forward(problem, {inputs[0].data(), inputs[3].data(), inputs[4].data()}, out, options);
    });
    return true;
  }

 protected:
  const char* const* input_names() const override {
    static const char* const names[] = {"value", "spatial_shapes", "level_start_index", "sampling_locations",
                                        "attention_weights"};
    return names;
  }
};

class MultiScaleDeformableAttentionFused : public MsdaOpBase {
 public:
  OPENVINO_OP("MultiScaleDeformableAttentionFused", "msda");

  MultiScaleDeformableAttentionFused() = default;
  MultiScaleDeformableAttentionFused(const ov::OutputVector& inputs, std::vector<std::int64_t> points,
                                     std::string sampling, float offset_scale)
      : MsdaOpBase(inputs, std::move(points), std::move(sampling)), offset_scale_(offset_scale) {
    constructor_validate_and_infer_types();
  }

  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(this, get_input_size() == 6, "msda: expected 6 inputs (value, spatial_shapes, "
                          "level_start_index, reference_points, sampling_offsets, attention_logits), got ",
                          get_input_size());
    check_attributes();
    NODE_VALIDATION_CHECK(this, std::isfinite(offset_scale_), "msda: offset_scale: expected a finite number, got ",
                          offset_scale_);
    check_element_types({3, 4, 5});
    Letter N{"N"}, Q{"Q"}, M{"M"}, D{"D"}, L{"L"};
    check_value_and_levels(N, M, D, L);
    const ov::PartialShape ref = shape_of(3, 4, "[N, Q, L, 2 or 4]");
    if (ref.rank().is_static()) {
      unify(N, ref[0], dim_source("reference_points", 0));
      unify(Q, ref[1], dim_source("reference_points", 1));
      unify(L, ref[2], dim_source("reference_points", 2));
      NODE_VALIDATION_CHECK(this, ref[3].compatible(2) || ref[3].compatible(4),
                            "msda: reference_points: expected 2 coordinates (x, y) or 4 (cx, cy, w, h) in "
                            "dimension 3, got ",
                            ref[3]);
    }
    check_samples(4, 5, true, N, Q, M, L);
    set_output(N, Q, M, D);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& inputs) const override {
    ov::check_new_args_count(this, inputs);
    return std::make_shared<MultiScaleDeformableAttentionFused>(inputs, points_, sampling_, offset_scale_);
  }

  bool visit_attributes(ov::AttributeVisitor& visitor) override {
    visit_common(visitor);
    visitor.on_attribute("offset_scale", offset_scale_);
    return true;
  }

  float offset_scale() const { return offset_scale_; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    OPENVINO_ASSERT(inputs.size() == 6, "msda: expected 6 input tensors, got ", inputs.size());
    run_msda(this, [&] {
      const std::vector<std::int64_t> shapes = index_contents(inputs[1], "spatial_shapes");
      const std::vector<std::int64_t> starts = index_contents(inputs[2], "level_start_index");
      msda::FusedTensorSizes sizes{sizes_of(inputs[0]), sizes_of(inputs[1]), sizes_of(inputs[2]),
                                   sizes_of(inputs[3]), sizes_of(inputs[4]), sizes_of(inputs[5])};
      const msda::Problem problem = msda::describe_fused(
          sizes, shapes.data(), starts.data(), float_dtype(inputs[0], "value"),
          float_dtype(inputs[3], "reference_points"), float_dtype(inputs[4], "sampling_offsets"),
          float_dtype(inputs[5], "attention_logits"), points_, sampling_enum(), static_cast<double>(offset_scale_));
      void* out = output_memory(outputs, problem, inputs[0].get_element_type());
      msda::Options options;
      options.threads = openvino_threads();
      options.backend = msda::Backend::cpu;
      const AffinityForThreads affinity(options.threads);
      msda::forward_fused(problem, {inputs[0].data(), inputs[3].data(), inputs[4].data(), inputs[5].data()}, out,
                          options);
    });
    return true;
  }

 protected:
  const char* const* input_names() const override {
    static const char* const names[] = {"value", "spatial_shapes", "level_start_index", "reference_points",
                                        "sampling_offsets", "attention_logits"};
    return names;
  }

 private:
  float offset_scale_ = 0.5f;
};

// The ONNX nodes' attributes.
std::vector<std::int64_t> points_attribute(const ov::frontend::NodeContext& node) {
  if (!node.has_attribute("points")) return {};
  return node.get_attribute<std::vector<std::int64_t>>("points");
}

std::string sampling_attribute(const ov::frontend::NodeContext& node) {
  return node.get_attribute<std::string>("sampling", "bilinear");
}

ov::OutputVector node_inputs(const ov::frontend::NodeContext& node, std::size_t count, const char* op) {
  FRONT_END_GENERAL_CHECK(node.get_input_size() == count, "msda: ", op, ": expected ", count, " inputs, got ",
                          node.get_input_size());
  ov::OutputVector inputs;
  for (std::size_t i = 0; i < count; ++i) inputs.push_back(node.get_input(static_cast<int>(i)));
  return inputs;
}

ov::OutputVector convert_plain(const ov::frontend::NodeContext& node) {
  auto op = std::make_shared<MultiScaleDeformableAttention>(node_inputs(node, 5, "MultiScaleDeformableAttention"),
                                                            points_attribute(node), sampling_attribute(node));
  return op->outputs();
}

ov::OutputVector convert_fused(const ov::frontend::NodeContext& node) {
  auto op = std::make_shared<MultiScaleDeformableAttentionFused>(
      node_inputs(node, 6, "MultiScaleDeformableAttentionFused"), points_attribute(node), sampling_attribute(node),
      node.get_attribute<float>("offset_scale", 0.5f));
  return op->outputs();
}

}  // namespace
}  // namespace msda_openvino

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<msda_openvino::MultiScaleDeformableAttention>>(),
    std::make_shared<ov::OpExtension<msda_openvino::MultiScaleDeformableAttentionFused>>(),
    std::make_shared<ov::frontend::onnx::ConversionExtension>("MultiScaleDeformableAttention", msda_openvino::kDomain,
                                                              msda_openvino::convert_plain),
    std::make_shared<ov::frontend::onnx::ConversionExtension>("MultiScaleDeformableAttentionFused",
                                                              msda_openvino::kDomain, msda_openvino::convert_fused),
}));
