"""msda.onnx.export (SPEC "Deployment"): msda-domain nodes (portable=False) and standard ONNX
operators that ONNX Runtime runs equal to PyTorch (portable=True).

Every case exports a small module with dynamic batch, query count and image size (value's S) and
runs the portable graph in ONNX Runtime on the exported inputs and on inputs of another batch
size, query count and level sizes. The inputs include NaN and out-of-range sampling locations,
which contribute nothing (SPEC "Forward", "Points per level and discrete sampling").
"""
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import msda  # noqa: E402
import msda.onnx  # noqa: E402

SHAPES = [(4, 5), (2, 3)]
OTHER_SHAPES = [(3, 6), (5, 2)]  # the same number of levels, other sizes
M, D = 2, 4

# The exporter warns when one torch.export.Dim names several axes, as these tests do on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")


def _starts(shapes):
    out, s = [], 0
    for h, w in shapes:
        out.append(s)
        s += h * w
    return out


def _common(n, shapes, gen):
    s = sum(h * w for h, w in shapes)
    return (torch.randn(n, s, M, D, generator=gen), torch.tensor(shapes, dtype=torch.int64),
            torch.tensor(_starts(shapes), dtype=torch.int64))


def _plain_inputs(points, n=2, q=5, shapes=SHAPES, seed=0):
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights; equal points
    (P = 2) in the [N, Q, M, L, P, ...] layout, else [N, Q, M, K, ...]."""
    gen = torch.Generator().manual_seed(seed)
    value, ss, lsi = _common(n, shapes, gen)
    samples = (len(shapes), 2) if points is None else (sum(points),)
    loc = torch.rand(n, q, M, *samples, 2, generator=gen) * 1.2 - 0.1
    flat = loc.view(n, q, M, -1, 2)
    flat[0, 0, 0, 0, 0] = float("nan")  # NaN x
    flat[1, 1, 1, 1, 1] = float("nan")  # NaN y
    flat[0, 1, 1, 2] = torch.tensor([5.0, 0.5])  # far outside the map
    flat[1, 0, 0, 1] = torch.tensor([0.5, -3.0])
    weights = torch.softmax(torch.randn(n, q, M, flat.shape[3], generator=gen), -1).view(loc.shape[:-1])
    return value, ss, lsi, loc, weights


def _fused_inputs(points, coords, n=2, q=5, shapes=SHAPES, seed=0):
    """value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits."""
    gen = torch.Generator().manual_seed(seed)
    value, ss, lsi = _common(n, shapes, gen)
    L = len(shapes)
    samples = (L, 2) if points is None else (sum(points),)
    ref = torch.rand(n, q, L, coords, generator=gen)
    if coords == 4:
        ref[..., 2:] = ref[..., 2:] * 0.6 + 0.05  # box sizes
        off = torch.randn(n, q, M, *samples, 2, generator=gen)
    else:
        off = torch.randn(n, q, M, *samples, 2, generator=gen) * 2  # pixels
    off.view(n, q, M, -1, 2)[0, 0, 1, 0, 1] = float("nan")
    logits = torch.randn(n, q, M, L * samples[-1] if points is None else sum(points), generator=gen)
    return value, ss, lsi, ref, off, logits


class Plain(nn.Module):
    def __init__(self, points=None, sampling="bilinear"):
        super().__init__()
        self.points, self.sampling = points, sampling

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        # im2col_step=64 is accepted by the op and dropped by the export.
        return msda.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, 64,
                                   points=self.points, sampling=self.sampling)


class Fused(nn.Module):
    def __init__(self, points=None, sampling="bilinear", offset_scale=0.5):
        super().__init__()
        self.points, self.sampling, self.offset_scale = points, sampling, offset_scale

    def forward(self, value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits):
        return msda.ms_deform_attn_fused(value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
                                         attention_logits, points=self.points, sampling=self.sampling,
                                         offset_scale=self.offset_scale)


def _dims():
    return torch.export.Dim("batch"), torch.export.Dim("queries"), torch.export.Dim("rows")


def _op_dynamic_shapes(per_sample):
    """value [N, S, ...] and the `per_sample` tensors [N, Q, ...] dynamic; shapes and starts are data."""
    batch, queries, rows = _dims()
    return ({0: batch, 1: rows}, None, None) + ({0: batch, 1: queries},) * per_sample


def _run(model_proto, inputs):
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs)
    return session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})


def _assert_close(actual, expected, rel):
    expected = expected.detach().numpy()
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all() and np.isfinite(expected).all()
    err = np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected)
    assert err < rel, f"relative error {err:.3g} >= {rel}"


def _check_portable(model_proto, expected_opset=18):
    for node in model_proto.graph.node:
        assert node.domain in ("", "ai.onnx"), f"non-standard node {node.domain}::{node.op_type}"
    assert {o.domain for o in model_proto.opset_import} <= {"", "ai.onnx"}
    assert [o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")] == [expected_opset]
    onnx.checker.check_model(model_proto, full_check=True)


def _attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# --- portable=False: one msda node per op --------------------------------------------------------

class AllVariants(nn.Module):
    """Every variant of both ops, on graph inputs passed straight to the ops."""

    def forward(self, value, ss, lsi, loc, w, loc_k, w_k, ref2, ref4, off, logits, off_k, logits_k):
        return (msda.ms_deform_attn(value, ss, lsi, loc, w, 64),
                msda.ms_deform_attn(value, ss, lsi, loc, w, sampling="discrete"),
                msda.ms_deform_attn(value, ss, lsi, loc_k, w_k, points=[1, 3]),
                msda.ms_deform_attn(value, ss, lsi, loc_k, w_k, points=[1, 3], sampling="discrete"),
                msda.ms_deform_attn_fused(value, ss, lsi, ref2, off, logits),
                msda.ms_deform_attn_fused(value, ss, lsi, ref4, off, logits, offset_scale=0.25),
                msda.ms_deform_attn_fused(value, ss, lsi, ref4, off_k, logits_k, points=[1, 3], sampling="discrete",
                                          offset_scale=0.75),
                msda.ms_deform_attn_fused(value, ss, lsi, ref2, off_k, logits_k, points=[1, 3]))


def test_msda_nodes(tmp_path):
    value, ss, lsi, loc, w = _plain_inputs(None)
    _, _, _, loc_k, w_k = _plain_inputs([1, 3])
    _, _, _, ref2, off, logits = _fused_inputs(None, 2)
    _, _, _, ref4, off_k, logits_k = _fused_inputs([1, 3], 4)
    args = (value, ss, lsi, loc, w, loc_k, w_k, ref2, ref4, off, logits, off_k, logits_k)
    batch, queries, rows = _dims()
    per_sample = {0: batch, 1: queries}
    dynamic = ({0: batch, 1: rows}, None, None) + (per_sample,) * 10
    path = tmp_path / "msda.onnx"
    msda.onnx.export(AllVariants().eval(), args, path, dynamic_shapes=dynamic)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)  # the msda schemas are registered with onnx.defs
    assert {o.domain: o.version for o in model.opset_import} == {"": 18, "msda": 1}
    assert len(model.graph.node) == 8, [n.op_type for n in model.graph.node]
    names = [i.name for i in model.graph.input]
    value_, ss_, lsi_, loc_, w_, loc_k_, w_k_, ref2_, ref4_, off_, logits_, off_k_, logits_k_ = names
    plain, fused = msda.onnx.PLAIN_OP, msda.onnx.FUSED_OP
    expected = [
        (plain, [loc_, w_], {"sampling": b"bilinear"}),
        (plain, [loc_, w_], {"sampling": b"discrete"}),
        (plain, [loc_k_, w_k_], {"sampling": b"bilinear", "points": [1, 3]}),
        (plain, [loc_k_, w_k_], {"sampling": b"discrete", "points": [1, 3]}),
        (fused, [ref2_, off_, logits_], {"sampling": b"bilinear", "offset_scale": 0.5}),
        (fused, [ref4_, off_, logits_], {"sampling": b"bilinear", "offset_scale": 0.25}),
        (fused, [ref4_, off_k_, logits_k_], {"sampling": b"discrete", "offset_scale": 0.75, "points": [1, 3]}),
        (fused, [ref2_, off_k_, logits_k_], {"sampling": b"bilinear", "offset_scale": 0.5, "points": [1, 3]}),
    ]
    for i, (node, (op_type, inputs, attrs)) in enumerate(zip(model.graph.node, expected)):
        assert (node.domain, node.op_type) == ("msda", op_type), i
        assert list(node.input) == [value_, ss_, lsi_] + inputs, i
        got = _attributes(node)
        if "offset_scale" in attrs:
            assert got.pop("offset_scale") == pytest.approx(attrs.pop("offset_scale")), i
        assert got == attrs, i
        assert len(node.output) == 1
    for out in model.graph.output:  # [N, Q, M*D], N and Q symbolic
        dims = out.type.tensor_type.shape.dim
        assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_param != "" for d in dims] == [True, True, False] and dims[2].dim_value == M * D


# --- portable=True: standard ONNX, equal to the op in ONNX Runtime --------------------------------

@pytest.mark.parametrize("points", [None, [1, 3]], ids=["equal", "per-level"])
@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
def test_portable_plain(points, sampling):
    module = Plain(points, sampling).eval()
    inputs = _plain_inputs(points)
    program = msda.onnx.export(module, inputs, portable=True, dynamic_shapes=_op_dynamic_shapes(2))
    _check_portable(program.model_proto)
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert ("GridSample" in ops) == (sampling == "bilinear")
    for case in (inputs, _plain_inputs(points, n=3, q=4, shapes=OTHER_SHAPES, seed=1)):
        (out,) = _run(program.model_proto, case)
        _assert_close(out, module(*case), 1e-5)


@pytest.mark.parametrize("coords, points, sampling, offset_scale", [
    (2, None, "bilinear", 0.5),
    (4, None, "bilinear", 0.3),
    (4, [1, 3], "discrete", 0.7),
    (2, [1, 3], "bilinear", 0.5),
    (2, None, "discrete", 0.5),
])
def test_portable_fused(coords, points, sampling, offset_scale):
    module = Fused(points, sampling, offset_scale).eval()
    inputs = _fused_inputs(points, coords)
    program = msda.onnx.export(module, inputs, portable=True, dynamic_shapes=_op_dynamic_shapes(3))
    _check_portable(program.model_proto)
    for case in (inputs, _fused_inputs(points, coords, n=3, q=4, shapes=OTHER_SHAPES, seed=1)):
        (out,) = _run(program.model_proto, case)
        _assert_close(out, module(*case), 1e-5)


@pytest.mark.parametrize("opset", [17, 20])
def test_portable_opsets(opset):
    """Opset 17 (converted down by the exporter) and 20 (GridSample's mode is "linear" there)."""
    module = Plain(None, "bilinear").eval()
    inputs = _plain_inputs(None)
    program = msda.onnx.export(module, inputs, portable=True, opset_version=opset)
    _check_portable(program.model_proto, expected_opset=opset)
    modes = {_attributes(n)["mode"] for n in program.model_proto.graph.node if n.op_type == "GridSample"}
    assert modes == {b"linear" if opset >= 20 else b"bilinear"}
    (out,) = _run(program.model_proto, inputs)
    _assert_close(out, module(*inputs), 1e-5)


# --- msda.MSDeformAttn inside a module ------------------------------------------------------------

class TwoAttentions(nn.Module):
    """msda.MSDeformAttn with the fused op (box reference points) then with the plain one."""

    def __init__(self, d_model=16, levels=2, heads=2, points=3):
        super().__init__()
        self.fused = msda.MSDeformAttn(d_model, levels, heads, points)
        self.unfused = msda.MSDeformAttn(d_model, levels, heads, points)
        self.unfused.kernel = "msda-unfused"
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # away from the initialisation's whole-pixel offsets and uniform weights
            for p in self.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))

    def forward(self, query, boxes, points, src, shapes, starts, mask):
        x = self.fused(query, boxes, src, shapes, starts, mask)
        return self.unfused(x, points, src, shapes, starts, mask)


def _module_inputs(n=2, q=6, shapes=SHAPES, seed=0, d_model=16):
    gen = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    boxes = torch.rand(n, q, len(shapes), 4, generator=gen)
    boxes[..., 2:] = boxes[..., 2:] * 0.5 + 0.05
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[-1, -3:] = True
    return (torch.randn(n, q, d_model, generator=gen), boxes, torch.rand(n, q, len(shapes), 2, generator=gen),
            torch.randn(n, s, d_model, generator=gen), torch.tensor(shapes, dtype=torch.int64),
            torch.tensor(_starts(shapes), dtype=torch.int64), mask)


def test_module():
    module = TwoAttentions().eval()
    inputs = _module_inputs()
    batch, queries, rows = _dims()
    dynamic = ({0: batch, 1: queries}, {0: batch, 1: queries}, {0: batch, 1: queries}, {0: batch, 1: rows}, None, None,
               {0: batch, 1: rows})
    nodes = msda.onnx.export(module, inputs, dynamic_shapes=dynamic).model_proto
    onnx.checker.check_model(nodes, full_check=True)
    msda_nodes = [n.op_type for n in nodes.graph.node if n.domain == "msda"]
    assert msda_nodes == [msda.onnx.FUSED_OP, msda.onnx.PLAIN_OP]
    assert not any(n.op_type == "GridSample" for n in nodes.graph.node)

    program = msda.onnx.export(module, inputs, portable=True, dynamic_shapes=dynamic)
    _check_portable(program.model_proto)
    with torch.no_grad():
        for case in (inputs, _module_inputs(n=3, q=4, shapes=OTHER_SHAPES, seed=1)):
            (out,) = _run(program.model_proto, case)
            _assert_close(out, module(*case), 1e-5)


# --- patched transformers models --------------------------------------------------------------------

class _Detector(nn.Module):
    """pixel_values -> (logits, pred_boxes) of a transformers detector."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        return out.logits, out.pred_boxes


# RT-DETR's own code specialises the batch size under torch.export (with or without msda), so it
# is exported for a fixed batch; its msda-node export is left to Deformable DETR's case, which
# checks the same kernel module's translation, to keep the file's run time short.
@pytest.mark.parametrize("name, dynamic_batch, check_nodes", [("deformable_detr", True, True),
                                                             ("rt_detr", False, False)])
def test_transformers(name, dynamic_batch, check_nodes):
    pytest.importorskip("transformers")
    # The tiny random-weight models of the patch tests (He-initialised convolutions: with
    # transformers' std-0.01 init, RT-DETR's query-selection scores tie and top-k picks differ
    # between runtimes).
    from test_transformers import build

    model, inputs, layers = build(name, dtype=torch.float32)
    assert msda.patch(model.eval()) == layers
    detector = _Detector(model).eval()
    pixels = inputs["pixel_values"]
    dynamic = ({0: torch.export.Dim("batch", min=1, max=8)},) if dynamic_batch else None

    if check_nodes:
        nodes = msda.onnx.export(detector, (pixels,), dynamic_shapes=dynamic).model_proto
        assert [n.op_type for n in nodes.graph.node if n.domain == "msda"] == [msda.onnx.PLAIN_OP] * layers
        assert not any(n.op_type == "GridSample" for n in nodes.graph.node)

    program = msda.onnx.export(detector, (pixels,), portable=True, dynamic_shapes=dynamic)
    _check_portable(program.model_proto)
    cases = [pixels]
    if dynamic_batch:
        cases.append(torch.randn((3,) + tuple(pixels.shape[1:]), generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        for x in cases:
            logits, boxes = _run(program.model_proto, (x,))
            expected_logits, expected_boxes = detector(x)
            _assert_close(logits, expected_logits, 1e-4)
            _assert_close(boxes, expected_boxes, 1e-4)


# --- API ------------------------------------------------------------------------------------------

def test_bad_arguments():
    inputs = _plain_inputs(None)
    with pytest.raises(ValueError, match="dynamo"):
        msda.onnx.export(Plain(), inputs, dynamo=False)
    with pytest.raises(ValueError, match="opset_version"):
        msda.onnx.export(Plain(), inputs, opset_version=16)


def test_import_msda_does_not_import_onnx():
    code = ("import sys, msda; assert 'onnx' not in sys.modules and 'onnxscript' not in sys.modules; "
            "assert msda.onnx.export is not None and 'onnxscript' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
