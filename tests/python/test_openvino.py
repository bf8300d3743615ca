"""msda's OpenVINO extension (SPEC "Deployment"; openvino/extension.cpp): ONNX models with nodes of
domain "msda" read by openvino.Core with msda.openvino.extension_path() loaded, compiled for the
CPU and run, against msda's PyTorch op on the same inputs.

- the plain node with and without points per level, bilinear and discrete; the fused node with
  2- and 4-coordinate reference points and offset_scale != 0.5; f32 to SPEC's 1e-5, f16 value
  (f32 locations) to 1e-2 against float64;
- static shape inference (output [N, Q, M*D], dynamic dimensions propagated) and a dynamic batch
  run with two batch sizes; results independent of OpenVINO's thread count; an IR saved with
  ov.save_model reads back (the extension's operations) and ov.convert_model takes the extension;
- bad input is an OpenVINO error (RuntimeError) naming the input: disagreeing shapes and wrong
  element types when the model is read, a spatial_shapes or level_start_index inconsistent with
  value when it runs;
- extension_path() without the library: a FileNotFoundError saying how to get it;
- a module using msda.MSDeformAttn exported with msda.onnx.export runs in OpenVINO equal to
  PyTorch.
Skipped where openvino or onnx is not installed or msda was built without the extension.
"""
import os

import numpy as np
import pytest
import torch

import msda
import msda.openvino
from conftest import assert_rel, level_start_index

SHAPES = ((3, 4), (2, 5))
S = sum(h * w for h, w in SHAPES)
L = len(SHAPES)
N, Q, M, D, P = 2, 5, 2, 4, 3
POINTS = [2, 3]  # points per level: K = 5


@pytest.fixture(scope="module")
def ov():
    return pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def onnx():
    return pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def core(ov):
    try:
        path = msda.openvino.extension_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    c = ov.Core()
    c.add_extension(path)
    return c


ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.int64: 7, torch.int32: 6}


def write_model(onnx, path, op_type, inputs, attributes, batch=None, symbols=()):
    """An ONNX model of one msda node. inputs: (name, tensor) pairs, whose dtypes and shapes the
    graph inputs get, except that the first dimension of value and of the per-sample tensors is
    the symbol `batch` when given, and each (input, axis, symbol) of `symbols` makes that one
    symbolic."""
    helper = onnx.helper
    graph_inputs = []
    for name, t in inputs:
        shape = list(t.shape)
        if batch and name not in ("spatial_shapes", "level_start_index"):
            shape[0] = batch
        for input_name, axis, symbol in symbols:
            if input_name == name:
                shape[axis] = symbol
        graph_inputs.append(helper.make_tensor_value_info(name, ONNX_TYPES[t.dtype], shape))
    node = helper.make_node(op_type, [name for name, _ in inputs], ["output"], domain="msda", **attributes)
    out_type = ONNX_TYPES[inputs[0][1].dtype]
    graph = helper.make_graph([node], "msda_test", graph_inputs,
                              [helper.make_tensor_value_info("output", out_type, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("msda", 1)])
    onnx.save(model, str(path))
    return str(path)


def infer(core, path, inputs, config=None):
    compiled = core.compile_model(core.read_model(path), "CPU", config or {})
    result = compiled([t.numpy() for _, t in inputs])
    return torch.from_numpy(np.array(result[compiled.output(0)]))


def tables(dtype=torch.int64):
    return (torch.tensor(SHAPES, dtype=dtype), torch.tensor(level_start_index(SHAPES), dtype=dtype))


def plain_inputs(points=None, n=N, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_dims = [sum(points)] if points else [L, P]
    value = torch.randn(n, S, M, D, generator=gen, dtype=torch.float64).to(dtype)
    loc = (-0.1 + 1.2 * torch.rand(n, Q, M, *k_dims, 2, generator=gen, dtype=torch.float64)).float()
    k = k_dims[0] * (k_dims[1] if len(k_dims) > 1 else 1)
    w = torch.softmax(torch.randn(n, Q, M, k, generator=gen, dtype=torch.float64), -1).view(n, Q, M, *k_dims).float()
    shapes, starts = tables()
    return [("value", value), ("spatial_shapes", shapes), ("level_start_index", starts),
            ("sampling_locations", loc), ("attention_weights", w)]


def fused_inputs(coords, points=None, n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_dims = [sum(points)] if points else [L, P]
    k = k_dims[0] * (k_dims[1] if len(k_dims) > 1 else 1)
    value = torch.randn(n, S, M, D, generator=gen)
    ref = torch.rand(n, Q, L, coords, generator=gen)
    off = torch.randn(n, Q, M, *k_dims, 2, generator=gen) * (2.0 if coords == 2 else 1.0)
    logits = torch.randn(n, Q, M, k, generator=gen)
    shapes, starts = tables()
    return [("value", value), ("spatial_shapes", shapes), ("level_start_index", starts),
            ("reference_points", ref), ("sampling_offsets", off), ("attention_logits", logits)]


def attributes(points, sampling, **extra):
    attrs = dict(sampling=sampling, **extra)
    if points:
        attrs["points"] = list(points)
    return attrs


def plain_reference(inputs, points, sampling):
    return msda.ms_deform_attn(*[t for _, t in inputs], points=points, sampling=sampling)


def fused_reference(inputs, points, sampling, offset_scale):
    return msda.ms_deform_attn_fused(*[t for _, t in inputs], points=points, sampling=sampling,
                                     offset_scale=offset_scale)


@pytest.mark.parametrize("points", [None, POINTS], ids=["equal-points", "points-per-level"])
@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
def test_plain_node_matches_pytorch(core, onnx, tmp_path, points, sampling):
    inputs = plain_inputs(points)
    path = write_model(onnx, tmp_path / "plain.onnx", "MultiScaleDeformableAttention", inputs,
                       attributes(points, sampling))
    out = infer(core, path, inputs)
    assert out.shape == (N, Q, M * D) and out.dtype == torch.float32
    assert_rel(out, plain_reference(inputs, points, sampling), 1e-5, f"plain {sampling} points={points}")


@pytest.mark.parametrize("coords,sampling,points", [
    (2, "bilinear", None), (4, "bilinear", None), (2, "discrete", None), (4, "discrete", POINTS),
    (4, "bilinear", POINTS)])
def test_fused_node_matches_pytorch(core, onnx, tmp_path, coords, sampling, points):
    offset_scale = 0.75
    inputs = fused_inputs(coords, points)
    path = write_model(onnx, tmp_path / "fused.onnx", "MultiScaleDeformableAttentionFused", inputs,
                       attributes(points, sampling, offset_scale=offset_scale))
    out = infer(core, path, inputs)
    assert out.shape == (N, Q, M * D)
    assert_rel(out, fused_reference(inputs, points, sampling, offset_scale), 1e-5,
               f"fused coords={coords} {sampling} points={points}")


def test_shape_inference_and_dynamic_batch(core, ov, onnx, tmp_path):
    inputs = plain_inputs()
    path = write_model(onnx, tmp_path / "dynamic.onnx", "MultiScaleDeformableAttention", inputs,
                       attributes(None, "bilinear"), batch="batch")
    model = core.read_model(path)
    assert model.output(0).get_partial_shape() == ov.PartialShape([-1, Q, M * D])
    assert model.output(0).get_element_type() == ov.Type.f32
    compiled = core.compile_model(model, "CPU")
    for n in (1, 3, 0):
        batch_inputs = plain_inputs(n=n, seed=n)
        out = torch.from_numpy(np.array(compiled([t.numpy() for _, t in batch_inputs])[0]))
        assert out.shape == (n, Q, M * D)
        assert_rel(out, plain_reference(batch_inputs, None, "bilinear"), 1e-5, f"batch {n}")

    # The fused node; N static in one input is enough; a dynamic D makes M*D dynamic; Q dynamic
    # in one per-sample tensor is taken from the others.
    fused = fused_inputs(4)
    cases = [([("value", 0, "n"), ("sampling_offsets", 0, "n")], [N, Q, M * D]),
             ([("value", 3, "d")], [N, Q, -1]),
             ([("reference_points", 1, "q"), ("sampling_offsets", 1, "q")], [N, Q, M * D]),
             ([("reference_points", 1, "q"), ("sampling_offsets", 1, "q"), ("attention_logits", 1, "q")],
              [N, -1, M * D])]
    for symbols, expected in cases:
        path = write_model(onnx, tmp_path / "fused_dynamic.onnx", "MultiScaleDeformableAttentionFused", fused,
                           attributes(None, "bilinear", offset_scale=0.5), symbols=symbols)
        assert core.read_model(path).output(0).get_partial_shape() == ov.PartialShape(expected), symbols


def test_results_do_not_depend_on_threads(core, onnx, tmp_path):
    inputs = fused_inputs(4, seed=3)
    path = write_model(onnx, tmp_path / "threads.onnx", "MultiScaleDeformableAttentionFused", inputs,
                       attributes(None, "bilinear", offset_scale=0.5))
    one = infer(core, path, inputs, {"INFERENCE_NUM_THREADS": 1})
    two = infer(core, path, inputs, {"INFERENCE_NUM_THREADS": 2})
    assert torch.equal(one, two)


def test_f16_value(core, onnx, tmp_path):
    # SPEC's mix: a half-precision value beside f32 locations and weights. The CPU plugin runs the
    # node in f32 by default (it converts value); with an f16 inference precision, on CPUs that
    # have f16 arithmetic, it passes every floating-point input in f16.
    inputs = plain_inputs(dtype=torch.float16)
    path = write_model(onnx, tmp_path / "f16.onnx", "MultiScaleDeformableAttention", inputs,
                       attributes(None, "bilinear"))
    model = core.read_model(path)
    assert model.output(0).get_element_type().get_type_name() == "f16"
    exact = plain_reference([(k, t.double() if t.is_floating_point() else t) for k, t in inputs], None, "bilinear")
    out = infer(core, path, inputs)
    assert out.dtype == torch.float16
    assert_rel(out, exact, 1e-2, "f16 value")
    if "FP16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        out = infer(core, path, inputs, {"INFERENCE_PRECISION_HINT": "f16"})
        assert_rel(out, exact, 1e-2, "f16 value, f16 inference precision")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_saved_ir_and_convert_model(core, ov, onnx, tmp_path, fused):
    if fused:  # no points attribute, and offset_scale
        inputs, op_type, attrs = fused_inputs(4), "MultiScaleDeformableAttentionFused", attributes(
            None, "bilinear", offset_scale=0.75)
        expected = fused_reference(inputs, None, "bilinear", 0.75)
    else:
        inputs, op_type, attrs = plain_inputs(POINTS), "MultiScaleDeformableAttention", attributes(POINTS, "discrete")
        expected = plain_reference(inputs, POINTS, "discrete")
    path = write_model(onnx, tmp_path / "ir.onnx", op_type, inputs, attrs)
    # ov.convert_model with the extension, then an IR that keeps the extension's operation.
    model = ov.convert_model(path, extension=msda.openvino.extension_path())
    xml = str(tmp_path / "model.xml")
    ov.save_model(model, xml, compress_to_fp16=False)
    reread = core.read_model(xml)
    assert op_type in [op.get_type_name() for op in reread.get_ordered_ops()]
    out = core.compile_model(reread, "CPU")([t.numpy() for _, t in inputs])[0]
    assert_rel(torch.from_numpy(np.array(out)), expected, 1e-5, "saved IR")


# --- bad input ---------------------------------------------------------------------------------


def read_and_run(core, path, inputs):
    compiled = core.compile_model(core.read_model(path), "CPU")
    compiled([t.numpy() for _, t in inputs])


def test_disagreeing_heads_name_the_input(core, onnx, tmp_path):
    inputs = plain_inputs()
    inputs[3] = ("sampling_locations", torch.rand(N, Q, M + 1, L, P, 2))  # M = 3 against value's 2
    path = write_model(onnx, tmp_path / "bad_m.onnx", "MultiScaleDeformableAttention", inputs,
                       attributes(None, "bilinear"))
    with pytest.raises(RuntimeError, match=r"sampling_locations.*expected M = 2"):
        read_and_run(core, path, inputs)


def test_disagreeing_shapes_of_the_fused_node_name_the_input(core, onnx, tmp_path):
    inputs = fused_inputs(2)
    inputs[5] = ("attention_logits", torch.randn(N, Q, M, L * P + 1))
    path = write_model(onnx, tmp_path / "bad_logits.onnx", "MultiScaleDeformableAttentionFused", inputs,
                       attributes(None, "bilinear", offset_scale=0.5))
    with pytest.raises(RuntimeError, match=r"attention_logits.*expected L\*P = 6"):
        read_and_run(core, path, inputs)
    inputs = fused_inputs(3)  # reference points of 3 coordinates
    path = write_model(onnx, tmp_path / "bad_ref.onnx", "MultiScaleDeformableAttentionFused", inputs,
                       attributes(None, "bilinear", offset_scale=0.5))
    with pytest.raises(RuntimeError, match=r"reference_points.*2 coordinates \(x, y\) or 4"):
        read_and_run(core, path, inputs)


def test_points_disagreeing_with_the_samples_name_the_input(core, onnx, tmp_path):
    inputs = plain_inputs(POINTS)
    path = write_model(onnx, tmp_path / "bad_points.onnx", "MultiScaleDeformableAttention", inputs,
                       attributes([2, 2], "bilinear"))
    with pytest.raises(RuntimeError, match=r"sampling_locations.*expected K = 4"):
        read_and_run(core, path, inputs)
    path = write_model(onnx, tmp_path / "bad_sampling.onnx", "MultiScaleDeformableAttention", inputs,
                       attributes(POINTS, "nearest"))
    with pytest.raises(RuntimeError, match=r"sampling: expected \"bilinear\" or \"discrete\""):
        read_and_run(core, path, inputs)


@pytest.mark.parametrize("name,dtype,message", [
    ("value", torch.int32, r"value: expected element type f32, f64, f16 or bf16, got i32"),
    ("sampling_locations", torch.float16, r"sampling_locations: expected element type f32 \(value's\) or f32"),
    ("spatial_shapes", torch.float32, r"spatial_shapes: expected element type i64 or i32, got f32"),
])
def test_wrong_element_types_name_the_input(core, onnx, tmp_path, name, dtype, message):
    inputs = [(k, t.to(dtype) if k == name else t) for k, t in plain_inputs()]
    path = write_model(onnx, tmp_path / "bad_dtype.onnx", "MultiScaleDeformableAttention", inputs,
                       attributes(None, "bilinear"))
    with pytest.raises(RuntimeError, match=message):
        read_and_run(core, path, inputs)


def test_tables_inconsistent_with_value_fail_at_run_time(core, onnx, tmp_path):
    # spatial_shapes and level_start_index are inputs: only their contents disagree with value.
    inputs = plain_inputs()
    path = write_model(onnx, tmp_path / "tables.onnx", "MultiScaleDeformableAttention", inputs,
                       attributes(None, "bilinear"))
    compiled = core.compile_model(core.read_model(path), "CPU")
    arrays = {k: t.numpy() for k, t in inputs}
    bad_shapes = dict(arrays, spatial_shapes=np.array([[3, 4], [2, 4]], dtype=np.int64))  # S = 20, not 22
    with pytest.raises(RuntimeError, match=r"msda: value: expected S = 20 rows"):
        compiled(list(bad_shapes.values()))
    bad_starts = dict(arrays, level_start_index=np.array([0, 11], dtype=np.int64))
    with pytest.raises(RuntimeError, match=r"msda: level_start_index\[1\]"):
        compiled(list(bad_starts.values()))
    non_positive = dict(arrays, spatial_shapes=np.array([[0, 4], [2, 5]], dtype=np.int64))
    with pytest.raises(RuntimeError, match=r"msda: spatial_shapes"):
        compiled(list(non_positive.values()))
    # and the compiled model still works afterwards
    out = torch.from_numpy(np.array(compiled(list(arrays.values()))[0]))
    assert_rel(out, plain_reference(inputs, None, "bilinear"), 1e-5, "after errors")


# --- the path helper -----------------------------------------------------------------------------


def test_extension_path_is_absolute_and_exists():
    try:
        path = msda.openvino.extension_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert os.path.isabs(path) and os.path.isfile(path)
    assert os.path.dirname(path) == os.path.dirname(os.path.abspath(msda.openvino.__file__))


def test_extension_path_without_the_library_says_how_to_get_it(monkeypatch, tmp_path):
    missing = str(tmp_path / "libmsda_openvino.so")
    monkeypatch.setattr(msda.openvino, "_library_file", lambda: missing)
    with pytest.raises(FileNotFoundError, match="built without OpenVINO") as info:
        msda.openvino.extension_path()
    message = str(info.value)
    assert missing in message and "pip install openvino" in message and "rebuild" in message


# --- msda.onnx.export -> OpenVINO --------------------------------------------------------------


class _Attention(torch.nn.Module):
    def __init__(self, kernel):
        super().__init__()
        self.attn = msda.MSDeformAttn(d_model=16, n_levels=L, n_heads=2, n_points=2)
        self.attn.kernel = kernel

    def forward(self, query, reference_points, input_flatten, spatial_shapes, level_start_index):
        return self.attn(query, reference_points, input_flatten, spatial_shapes, level_start_index)


@pytest.mark.parametrize("kernel,coords", [("msda", 4), ("msda-unfused", 2)])
def test_msda_onnx_export_runs_in_openvino(core, onnx, tmp_path, kernel, coords):
    try:
        import msda.onnx as msda_onnx
    except ImportError as e:
        pytest.skip(f"msda.onnx (python/msda/onnx.py) is missing or does not import: {e}")
    torch.manual_seed(0)
    model = _Attention(kernel).eval()
    with torch.no_grad():  # non-trivial offsets and weights (the module initialises some to zero)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    shapes, starts = tables()
    args = (torch.randn(1, 7, 16), torch.rand(1, 7, L, coords), torch.randn(1, S, 16), shapes, starts)
    path = str(tmp_path / "attention.onnx")
    msda_onnx.export(model, args, path)
    with torch.no_grad():
        expected = model(*args)
    ov_model = core.read_model(path)
    ops = [op.get_type_name() for op in ov_model.get_ordered_ops()]
    assert any(op.startswith("MultiScaleDeformableAttention") for op in ops), ops
    # f32 throughout: on CPUs with bf16 or f16 arithmetic (AMX, AVX512-BF16, ARM) the CPU plugin
    # would run the module's Linear layers in it by default.
    compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled([a.numpy() for a in args])[0]
    assert_rel(torch.from_numpy(np.array(out)), expected, 1e-5, f"exported {kernel}")
