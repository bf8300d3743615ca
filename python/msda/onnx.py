"""msda.onnx: ONNX export of models that call msda's ops (SPEC "Deployment").

    import msda.onnx
    msda.onnx.export(model, (inputs,), "model.onnx")                  # msda nodes, for msda's runtimes
    msda.onnx.export(model, (inputs,), "model.onnx", portable=True)   # standard ONNX only, any runtime

`export(model, args, f, portable=False, **kwargs)` is `torch.onnx.export(model, args, f,
dynamo=True, custom_translation_table=..., **kwargs)` with translations of
torch.ops.msda.ms_deform_attn and torch.ops.msda.ms_deform_attn_fused; opset 18 unless the caller
passes opset_version (17 or later); every other keyword (dynamic_shapes, input_names, ...) goes
to torch.onnx.export unchanged. It returns torch.onnx.export's ONNXProgram.

portable=False: each msda op becomes one node of domain "msda" (opset import "msda" version 1):

    MultiScaleDeformableAttention(value, spatial_shapes, level_start_index,
                                  sampling_locations, attention_weights) -> output
    MultiScaleDeformableAttentionFused(value, spatial_shapes, level_start_index,
                                       reference_points, sampling_offsets, attention_logits) -> output

with the op's inputs in the op's order and shapes (SPEC "Tensors", "The fused op"), output
[N, Q, M*D] in value's dtype, and attributes
  points        INTS    only when the op was called with points=[P_0, ..., P_{L-1}]
  sampling      STRING  "bilinear" or "discrete", always present
  offset_scale  FLOAT   fused node only, always present.
im2col_step is dropped (msda has no batch-divisibility rule). The schemas of these two ops are
registered with the onnx package (onnx.defs) when this module is imported, so that onnx.checker
and onnx.shape_inference know them; runtimes need msda's OpenVINO extension
(msda.openvino.extension_path()).

portable=True: the same computation in standard ONNX operators only, equal to the op within
rounding, for ONNX Runtime, OpenVINO without msda's extension, or any other runtime:
- bilinear: one GridSample (align_corners=0, padding_mode="zeros", mode "bilinear", "linear"
  from opset 20 on) per level, on the [N*M, D, H_l, W_l] view of that level's rows of value
  (a Slice at level_start_index[l]), then the weighted sum over the samples (Mul, ReduceSum);
- discrete: one Gather of the pixel clamp(trunc(x*W_l + 0.5), 0, W_l - 1),
  clamp(trunc(y*H_l + 0.5), 0, H_l - 1) from value viewed as [N*S*M, D];
- fused: Softmax over the last axis and the location arithmetic of SPEC "The fused op" (in f32,
  or f64 for f64 inputs), then the above.
Sizes are read from the graph (Shape of the tensors, Gather from spatial_shapes and
level_start_index), so dynamic batch, query count and image size work wherever the model allows
them; the optimizer folds them to constants where they are static. The number of levels, the
points per level and the number of reference-point coordinates must be static (they are in
every known model).

Non-finite locations in portable mode follow SPEC, not GridSample: with bilinear sampling a NaN
or infinite coordinate contributes nothing (before GridSample, every coordinate outside (-1, 2),
where a sample is zero by SPEC's range rule anyway, NaN included, is replaced by -1, well outside
the map: GridSample's handling of NaN and of huge coordinates is left unspecified by ONNX, and
ONNX Runtime 1.32's reads some pixel of the map for a NaN, infinite or 1e30 coordinate). With
discrete sampling a sample with a NaN coordinate contributes nothing (its weight is set to 0) and
an infinite coordinate is clamped to the border like any other. A NaN or infinite value or
weight propagates as in the op.

Precision: bilinear sampling in portable mode runs in value's dtype (GridSample wants the grid
in its input's type), so a bf16/f16 value gets bf16/f16 coordinates there: export such models in
f32 (or use the msda nodes, which keep f32 coordinates). ONNX Runtime's GridSample runs f64 only
from opset 20 on (its opset-16 kernel is f32 only): export f64 models with opset_version=20.
"""
from typing import Callable, Dict, List, Sequence

import numpy as np
import onnx
import onnxscript
import torch
from onnxscript import ir
from onnxscript import opset18 as op

from . import _library  # noqa: F401  (registers torch.ops.msda)

__all__ = ["export", "translation_table", "DOMAIN", "DOMAIN_VERSION", "PLAIN_OP", "FUSED_OP", "DEFAULT_OPSET"]

DOMAIN = "msda"
DOMAIN_VERSION = 1
PLAIN_OP = "MultiScaleDeformableAttention"
FUSED_OP = "MultiScaleDeformableAttentionFused"
DEFAULT_OPSET = 18
MIN_OPSET = 17

_FLOAT_TYPES = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]
_INT_TYPES = ["tensor(int64)", "tensor(int32)"]


def _register_schemas() -> None:
    """Registers the two msda-domain ops with onnx.defs (once per process)."""
    S = onnx.defs.OpSchema
    common = [("value", "T", "[N, S, M, D]: the flattened feature maps, split in M heads of D channels"),
              ("spatial_shapes", "I", "[L, 2]: (H, W) of each level"),
              ("level_start_index", "J", "[L]: first row of each level in S")]
    plain = common + [("sampling_locations", "F", "[N, Q, M, L, P, 2] or, with points, [N, Q, M, K, 2]: x, y in 0..1"),
                      ("attention_weights", "F", "[N, Q, M, L, P] or, with points, [N, Q, M, K]")]
    fused = common + [("reference_points", "F", "[N, Q, L, 2] (x, y) or [N, Q, L, 4] (cx, cy, w, h)"),
                      ("sampling_offsets", "F", "[N, Q, M, L, P, 2] or, with points, [N, Q, M, K, 2]"),
                      ("attention_logits", "F", "[N, Q, M, L*P] or, with points, [N, Q, M, K]: before the softmax")]
    constraints = [("T", _FLOAT_TYPES, "value and output"), ("F", _FLOAT_TYPES, "per-sample tensors"),
                   ("I", _INT_TYPES, "spatial_shapes"), ("J", _INT_TYPES, "level_start_index")]
    points = S.Attribute("points", S.AttrType.INTS, "points of each level (K = their sum); absent: equal points",
                         required=False)
    sampling = S.Attribute("sampling", onnx.helper.make_attribute("sampling", "bilinear"),
                           '"bilinear" or "discrete" (the pixel trunc(x*W + 0.5), clamped)')
    scale = S.Attribute("offset_scale", onnx.helper.make_attribute("offset_scale", 0.5),
                        "with 4-coordinate reference points: loc = c + off / P_l * wh * offset_scale")
    for name, inputs, attributes, doc in (
            (PLAIN_OP, plain, [points, sampling], "msda.ms_deform_attn (../shared/SPEC.md)"),
            (FUSED_OP, fused, [points, sampling, scale], "msda.ms_deform_attn_fused (../shared/SPEC.md)")):
        if onnx.defs.has(name, DOMAIN):
            continue
        onnx.defs.register_schema(S(
            name, DOMAIN, DOMAIN_VERSION, doc=doc,
            inputs=[S.FormalParameter(n, t, d) for n, t, d in inputs],
            outputs=[S.FormalParameter("output", "T", "[N, Q, M*D]")],
            type_constraints=constraints, attributes=attributes))


_register_schemas()
_MSDA = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _check_sampling(sampling: str) -> str:
    if sampling not in ("bilinear", "discrete"):
        raise ValueError(f'msda.onnx: sampling: expected "bilinear" or "discrete", got "{sampling}"')
    return sampling


def _attributes(points, sampling) -> dict:
    attrs = {}
    if points is not None:
        attrs["points"] = [int(p) for p in points]
    attrs["sampling"] = _check_sampling(str(sampling))
    return attrs


# ---------------------------------------------------------------------------------------------
# portable=False: one msda node per op.

def _plain_node(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                im2col_step=None, points=None, sampling="bilinear"):
    return _MSDA.MultiScaleDeformableAttention(value, spatial_shapes, level_start_index, sampling_locations,
                                               attention_weights, **_attributes(points, sampling))


def _fused_node(value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits,
                points=None, sampling="bilinear", offset_scale=0.5):
    return _MSDA.MultiScaleDeformableAttentionFused(value, spatial_shapes, level_start_index, reference_points,
                                                    sampling_offsets, attention_logits,
                                                    offset_scale=float(offset_scale),
                                                    **_attributes(points, sampling))


# ---------------------------------------------------------------------------------------------
# portable=True: standard ONNX operators.

def _static(tensor, axis: int, what: str) -> int:
    """A size the portable graph's structure depends on (levels, points, coordinates)."""
    shape = tensor.shape
    size = None if shape is None else shape[axis]
    if not isinstance(size, int):
        raise ValueError(f"msda.onnx: portable export needs a static {what} (dimension {axis} of a tensor of "
                         f"shape {shape}); export with that size fixed, or with portable=False")
    return size


def _ints(values: Sequence[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _int(value: int):
    return op.Constant(value_int=int(value))


def _like(x: float, like):
    """A scalar constant in `like`'s dtype (x is exact in every float type: 0, 0.5, 1, 2, 3)."""
    return op.CastLike(op.Constant(value_float=float(x)), like)


def _floats(values, dtype: ir.DataType):
    """A constant of f32 or f64 values (a scalar for a scalar), rounded once, to `dtype`."""
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.float64 if dtype == ir.DataType.DOUBLE
                                                  else np.float32)))


def _compute_type(tensor) -> ir.DataType:
    """f64 stays f64; everything else computes in f32 (SPEC: locations and softmax in f32 or wider)."""
    return ir.DataType.DOUBLE if tensor.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def _points_of(points, per_sample) -> List[int]:
    """The points of each level: the op's points=, or L equal P from per_sample's [N, Q, M, L, P, ...]
    (the PyTorch op checked them against spatial_shapes when the model was traced)."""
    if points is not None:
        return [int(p) for p in points]
    return [_static(per_sample, 4, "number of points P")] * _static(per_sample, 3, "number of levels L")


def _sampling_core(value, spatial_shapes, level_start_index, loc, weights, points: List[int], sampling: str,
                   grid_mode: str):
    """The op on loc [N, Q, M, K, 2] and weights [N, Q, M, K] (K = sum(points)) -> [N, Q, M*D]."""
    k_total = sum(points)
    level_of_k = [level for level, p in enumerate(points) for _ in range(p)]
    shapes = op.Cast(spatial_shapes, to=ir.DataType.INT64)  # [L, 2] (H, W)
    starts = op.Cast(level_start_index, to=ir.DataType.INT64)  # [L]
    value_shape = op.Shape(value)
    n, s, m, d = (op.Slice(value_shape, _ints([i]), _ints([i + 1])) for i in range(4))
    q = op.Shape(loc, start=1, end=2)

    if sampling == "discrete":
        ctype = _compute_type(loc)
        locf = op.Cast(loc, to=ctype)
        # Per-sample (W, H) of its level, [K, 2].
        wh_int = op.Gather(op.Gather(shapes, _ints([1, 0]), axis=1), _ints(level_of_k), axis=0)
        wh = op.Cast(wh_int, to=ctype)
        scaled = op.Add(op.Mul(locf, wh), _like(0.5, locf))
        nan = op.IsNaN(scaled)
        zero = _like(0.0, locf)
        # Clamping before the cast equals clamping after it (trunc is monotonic and the bounds are
        # integers), and keeps infinite or huge coordinates inside int64.
        scaled = op.Min(op.Max(op.Where(nan, zero, scaled), zero),
                        op.Sub(wh, _like(1.0, locf)))
        pixel = op.Cast(scaled, to=ir.DataType.INT64)  # trunc toward zero: (col, row)
        col = op.Gather(pixel, _int(0), axis=-1)
        row = op.Gather(pixel, _int(1), axis=-1)
        width_k = op.Gather(op.Gather(shapes, _int(1), axis=1), _ints(level_of_k), axis=0)  # [K]
        start_k = op.Gather(starts, _ints(level_of_k), axis=0)  # [K]
        rows = op.Add(op.Add(start_k, op.Mul(row, width_k)), col)  # [N, Q, M, K]: row in S
        # value [N, S, M, D] as [N*S*M, D]: row (n*S + s)*M + m.
        batch = op.Reshape(op.Range(_int(0), op.Squeeze(n), _int(1)), _ints([-1, 1, 1, 1]))
        head = op.Reshape(op.Range(_int(0), op.Squeeze(m), _int(1)), _ints([1, 1, -1, 1]))
        flat = op.Add(op.Mul(op.Add(rows, op.Mul(batch, s)), m), head)
        table = op.Reshape(value, op.Concat(_ints([-1]), d, axis=0))
        sampled = op.Gather(table, flat, axis=0)  # [N, Q, M, K, D]
        invalid = op.Or(op.Gather(nan, _int(0), axis=-1), op.Gather(nan, _int(1), axis=-1))
        w = op.CastLike(weights, value)
        w = op.Where(invalid, _like(0.0, w), w)
        out = op.ReduceSum(op.Mul(sampled, op.Unsqueeze(w, _ints([-1]))), _ints([3]), keepdims=0)  # [N, Q, M, D]
        return op.Reshape(out, op.Concat(n, q, _ints([-1]), axis=0))

    # Bilinear: GridSample per level. Coordinates outside (-1, 2), NaN included, give a zero
    # sample by SPEC's rule; they become -1 (grid -3), far outside the map, so that GridSample's
    # handling of NaN and huge values never matters.
    grid = op.Sub(op.Mul(op.CastLike(loc, value), _like(2.0, value)), _like(1.0, value))
    inside = op.Less(op.Abs(grid), _like(3.0, grid))
    grid = op.Where(inside, grid, _like(-3.0, grid))
    nm = op.Mul(n, m)
    # [N, Q, M, K, 2] -> [N*M, Q, K, 2]
    grid = op.Reshape(op.Transpose(grid, perm=[0, 2, 1, 3, 4]), op.Concat(nm, q, _ints([k_total, 2]), axis=0))
    # value [N, S, M, D] -> [N*M, D, S]
    planes = op.Reshape(op.Transpose(value, perm=[0, 2, 3, 1]), op.Concat(nm, d, s, axis=0))
    sampled = []
    k0 = 0
    for level, p in enumerate(points):
        hw = op.Gather(shapes, _int(level), axis=0)  # [2] (H, W)
        start = op.Gather(starts, _ints([level]), axis=0)  # [1]
        area = op.Mul(op.Slice(hw, _ints([0]), _ints([1])), op.Slice(hw, _ints([1]), _ints([2])))  # [1]
        end = op.Add(start, area)
        level_value = op.Reshape(op.Slice(planes, start, end, _ints([2])), op.Concat(nm, d, hw, axis=0))
        level_grid = op.Slice(grid, _ints([k0]), _ints([k0 + p]), _ints([2]))  # [N*M, Q, P_l, 2]
        sampled.append(op.GridSample(level_value, level_grid, align_corners=0, mode=grid_mode,
                                     padding_mode="zeros"))  # [N*M, D, Q, P_l]
        k0 += p
    sampled = sampled[0] if len(sampled) == 1 else op.Concat(*sampled, axis=3)  # [N*M, D, Q, K]
    w = op.Reshape(op.Transpose(op.CastLike(weights, value), perm=[0, 2, 1, 3]),
                   op.Concat(nm, _ints([1]), q, _ints([k_total]), axis=0))  # [N*M, 1, Q, K]
    out = op.ReduceSum(op.Mul(sampled, w), _ints([3]), keepdims=0)  # [N*M, D, Q]
    out = op.Reshape(out, op.Concat(n, _ints([-1]), q, axis=0))  # [N, M*D, Q]
    return op.Transpose(out, perm=[0, 2, 1])


def _make_portable(grid_mode: str):
    def plain(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
              im2col_step=None, points=None, sampling="bilinear"):
        sampling = _check_sampling(str(sampling))
        loc, weights = sampling_locations, attention_weights
        if points is None:  # [N, Q, M, L, P, ...] -> [N, Q, M, K, ...]
            loc = op.Reshape(loc, _ints([0, 0, 0, -1, 2]))
            weights = op.Reshape(weights, _ints([0, 0, 0, -1]))
        points = _points_of(points, sampling_locations)
        return _sampling_core(value, spatial_shapes, level_start_index, loc, weights, points, sampling, grid_mode)

    def fused(value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits,
              points=None, sampling="bilinear", offset_scale=0.5):
        sampling = _check_sampling(str(sampling))
        coords = _static(reference_points, 3, "number of reference-point coordinates (2 or 4)")
        if coords not in (2, 4):
            raise ValueError(f"msda.onnx: reference_points: expected 2 or 4 coordinates, got {coords}")
        points = _points_of(points, sampling_offsets)
        level_of_k = [level for level, p in enumerate(points) for _ in range(p)]
        ctype = _compute_type(sampling_offsets)
        weights = op.Softmax(op.Cast(attention_logits, to=ctype), axis=-1)  # [N, Q, M, K]
        off = op.Reshape(op.Cast(sampling_offsets, to=ctype), _ints([0, 0, 0, -1, 2]))  # [N, Q, M, K, 2]
        # Each sample's reference point: [N, Q, L, C] -> [N, Q, 1, K, C]
        ref = op.Unsqueeze(op.Gather(op.Cast(reference_points, to=ctype), _ints(level_of_k), axis=2), _ints([2]))
        if coords == 2:  # loc = ref + off / (W_l, H_l)
            shapes = op.Cast(spatial_shapes, to=ir.DataType.INT64)
            wh = op.Cast(op.Gather(op.Gather(shapes, _ints([1, 0]), axis=1), _ints(level_of_k), axis=0), to=ctype)
            loc = op.Add(ref, op.Div(off, wh))
        else:  # loc = ref[:2] + off / P_l * ref[2:] * offset_scale
            centre = op.Slice(ref, _ints([0]), _ints([2]), _ints([-1]))
            size = op.Slice(ref, _ints([2]), _ints([4]), _ints([-1]))
            per_k = _floats([points[level] for level in level_of_k], ctype)
            scale = _floats(offset_scale, ctype)
            loc = op.Add(centre, op.Mul(op.Mul(op.Div(off, op.Unsqueeze(per_k, _ints([1]))), size), scale))
        return _sampling_core(value, spatial_shapes, level_start_index, loc, weights, points, sampling, grid_mode)

    return plain, fused


def translation_table(portable: bool = False, opset_version: int = DEFAULT_OPSET) -> Dict[Callable, Callable]:
    """The custom_translation_table for torch.onnx.export(dynamo=True) that export() passes: msda
    nodes (portable=False) or standard ONNX (portable=True) for msda's two ops."""
    if portable:
        plain, fused = _make_portable("linear" if opset_version >= 20 else "bilinear")
    else:
        plain, fused = _plain_node, _fused_node
    return {torch.ops.msda.ms_deform_attn.default: plain, torch.ops.msda.ms_deform_attn_fused.default: fused}


def export(model, args=(), f=None, portable: bool = False, **kwargs):
    """Exports `model` (an nn.Module, or a torch.export.ExportedProgram) to ONNX with PyTorch's
    dynamo exporter and msda's translations; returns the torch.onnx.ONNXProgram (also saved to
    `f` when given).

    portable=False writes each msda op as one node of domain "msda" (MultiScaleDeformableAttention,
    MultiScaleDeformableAttentionFused); portable=True writes standard ONNX operators only (see
    the module's documentation). opset_version defaults to 18 (17 or later); every other keyword
    goes to torch.onnx.export (dynamic_shapes, input_names, output_names, external_data, ...).
    A custom_translation_table given here is merged over msda's.
    """
    if kwargs.pop("dynamo", True) is not True:
        raise ValueError("msda.onnx.export: dynamo: msda's translations are for the dynamo exporter "
                         "(torch.onnx.export(dynamo=True)); the TorchScript exporter is not supported")
    opset_version = kwargs.pop("opset_version", None)
    opset_version = DEFAULT_OPSET if opset_version is None else int(opset_version)
    if opset_version < MIN_OPSET:
        raise ValueError(f"msda.onnx.export: opset_version: expected {MIN_OPSET} or later, got {opset_version}")
    table = translation_table(portable, max(opset_version, DEFAULT_OPSET))
    table.update(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, f, dynamo=True, opset_version=opset_version,
                             custom_translation_table=table, **kwargs)
