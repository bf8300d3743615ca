"""Fake (meta) kernels of msda's ops: output shapes and dtypes without computing anything, so
that torch.compile, torch.export, FakeTensor and the meta device trace through the ops, with
symbolic sizes too. They check what the shapes, dtypes and devices alone decide, with the core
library's message form (`msda: <argument>: expected ..., got ...`, a ValueError); the checks on
the contents of spatial_shapes and level_start_index run in the real kernel."""
import math

import torch

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LAYOUTS = {"value": "[N, S, M, D]", "spatial_shapes": "[L, 2]", "level_start_index": "[L]",
            "sampling_locations": "[N, Q, M, L, P, 2]", "attention_weights": "[N, Q, M, L, P]",
            "grad_output": "[N, Q, M*D]", "reference_points": "[N, Q, L, 2 or 4]",
            "sampling_offsets": "[N, Q, M, L, P, 2]", "attention_logits": "[N, Q, M, L*P]"}
# With points per level the per-sample tensors are [N, Q, M, K, ...] (K = sum of the points).
_LAYOUTS_K = dict(_LAYOUTS, sampling_locations="[N, Q, M, K, 2]", attention_weights="[N, Q, M, K]",
                  sampling_offsets="[N, Q, M, K, 2]", attention_logits="[N, Q, M, K]")


def _layouts(points):
    return _LAYOUTS if points is None else _LAYOUTS_K


def _check_options(points, sampling, num_levels):
    if sampling not in ("bilinear", "discrete"):
        _fail("sampling", '"bilinear" or "discrete"', f'"{sampling}"')
    if points is None:
        return
    torch._check_value(len(points) == num_levels, lambda: f"msda: points: expected {num_levels} entries (one per "
                                                          f"level of spatial_shapes), got {len(points)} entries {list(points)}")
    for i, p in enumerate(points):
        if p < 1:
            _fail(f"points[{i}]", f">= 1 (points of level {i})", str(p))


def _fail(argument, expected, actual):
    raise ValueError(f"msda: {argument}: expected {expected}, got {actual}")


def _check_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points=None,
                   sampling="bilinear"):
    named = {"value": value, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
             "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    layouts = _layouts(points)
    for name, t in named.items():
        if t.device != value.device:
            _fail(name, f"the device of value ({value.device})", str(t.device))
        rank = layouts[name].count(",") + 1
        if t.dim() != rank:
            _fail(name, f"{rank} dimensions {layouts[name]}", f"{t.dim()} dimensions {list(t.shape)}")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype not in (torch.int64, torch.int32):
            _fail(name, "an integer tensor (int64 or int32)", str(named[name].dtype))
    if value.dtype not in _FLOATS:
        _fail("value", "a floating dtype (float32, float64, bfloat16 or float16)", str(value.dtype))
    for name in ("sampling_locations", "attention_weights"):
        if named[name].dtype not in (value.dtype, torch.float32):
            _fail(name, f"value's dtype ({value.dtype}) or float32", str(named[name].dtype))
    # Size agreement; symbolic sizes become runtime asserts instead of specialisations.
    n, _, m, _ = value.shape
    loc, w = sampling_locations, attention_weights
    torch._check_value(loc.shape[0] == n, lambda: f"msda: sampling_locations: expected N = {n} (value's), "
                                                  f"got {list(loc.shape)}")
    torch._check_value(loc.shape[2] == m, lambda: f"msda: sampling_locations: expected M = {m} (value's), "
                                                  f"got {list(loc.shape)}")
    torch._check_value(loc.shape[-1] == 2, lambda: f"msda: sampling_locations: expected a last size of 2 (x, y), "
                                                   f"got {list(loc.shape)}")
    for i in range(loc.dim() - 1):
        torch._check_value(w.shape[i] == loc.shape[i], lambda: f"msda: attention_weights: expected "
                           f"{list(loc.shape[:-1])} (sampling_locations' sizes but the last), got {list(w.shape)}")
    num_levels = spatial_shapes.shape[0] if points is not None else loc.shape[3]
    _check_options(points, sampling, num_levels)
    if points is not None:
        torch._check_value(loc.shape[3] == sum(points), lambda: f"msda: sampling_locations: expected K = "
                           f"{sum(points)} samples (the sum of points {list(points)}) in dimension 3, got {list(loc.shape)}")
    torch._check_value(spatial_shapes.shape[0] == num_levels and spatial_shapes.shape[1] == 2,
                       lambda: f"msda: spatial_shapes: expected [L, 2] with L = {num_levels}, "
                               f"got {list(spatial_shapes.shape)}")
    torch._check_value(level_start_index.shape[0] == num_levels,
                       lambda: f"msda: level_start_index: expected [L] with L = {num_levels}, "
                               f"got {list(level_start_index.shape)}")


@torch.library.register_fake("msda::ms_deform_attn")
def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         im2col_step=None, points=None, sampling="bilinear"):
    _check_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points, sampling)
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.register_fake("msda::ms_deform_attn_backward")
def _ms_deform_attn_backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, output_mask, points=None, sampling="bilinear"):
    _check_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points, sampling)
    if grad_output.device != value.device:
        _fail("grad_output", f"the device of value ({value.device})", str(grad_output.device))
    if grad_output.dtype != value.dtype:
        _fail("grad_output", f"the dtype of value ({value.dtype})", str(grad_output.dtype))
    n, _, m, d = value.shape
    expected = (n, sampling_locations.shape[1], m * d)
    if grad_output.dim() != 3:
        _fail("grad_output", f"3 dimensions {_LAYOUTS['grad_output']}", f"{grad_output.dim()} dimensions")
    for got, want in zip(grad_output.shape, expected):
        torch._check_value(got == want, lambda: f"msda: grad_output: expected sizes {list(expected)}, "
                                                f"got {list(grad_output.shape)}")

    # An input whose gradient was not asked for gets an empty [0] placeholder (torch/ops.cpp).
    def grad(t, wanted):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else t.new_empty((0,))

    return (grad(value, output_mask[0]), grad(sampling_locations, output_mask[1]),
            grad(attention_weights, output_mask[2]))


def _check_fused_tensors(value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
                         attention_logits, points=None, sampling="bilinear", offset_scale=0.5):
    named = {"value": value, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
             "reference_points": reference_points, "sampling_offsets": sampling_offsets,
             "attention_logits": attention_logits}
    layouts = _layouts(points)
    for name, t in named.items():
        if t.device != value.device:
            _fail(name, f"the device of value ({value.device})", str(t.device))
        rank = layouts[name].count(",") + 1
        if t.dim() != rank:
            _fail(name, f"{rank} dimensions {layouts[name]}", f"{t.dim()} dimensions {list(t.shape)}")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype not in (torch.int64, torch.int32):
            _fail(name, "an integer tensor (int64 or int32)", str(named[name].dtype))
    if value.dtype not in _FLOATS:
        _fail("value", "a floating dtype (float32, float64, bfloat16 or float16)", str(value.dtype))
    for name in ("reference_points", "sampling_offsets", "attention_logits"):
        if named[name].dtype not in (value.dtype, torch.float32):
            _fail(name, f"value's dtype ({value.dtype}) or float32", str(named[name].dtype))
    n, _, m, _ = value.shape
    ref, off, logits = reference_points, sampling_offsets, attention_logits
    if points is None:
        q, num_levels, samples = off.shape[1], off.shape[3], off.shape[3] * off.shape[4]
    else:
        q, num_levels, samples = off.shape[1], spatial_shapes.shape[0], sum(points)
        torch._check_value(off.shape[3] == samples, lambda: f"msda: sampling_offsets: expected K = {samples} "
                           f"samples (the sum of points {list(points)}) in dimension 3, got {list(off.shape)}")
    _check_options(points, sampling, num_levels)
    torch._check_value(off.shape[0] == n, lambda: f"msda: sampling_offsets: expected N = {n} (value's), "
                                                  f"got {list(off.shape)}")
    torch._check_value(off.shape[2] == m, lambda: f"msda: sampling_offsets: expected M = {m} (value's), "
                                                  f"got {list(off.shape)}")
    torch._check_value(off.shape[-1] == 2, lambda: f"msda: sampling_offsets: expected a last size of 2 (x, y), "
                                                   f"got {list(off.shape)}")
    torch._check_value(ref.shape[0] == n and ref.shape[1] == q and ref.shape[2] == num_levels,
                       lambda: f"msda: reference_points: expected [N, Q, L, 2 or 4] = [{n}, {q}, {num_levels}, 2 or 4] "
                               f"(N from value, Q and L from sampling_offsets), got {list(ref.shape)}")
    torch._check_value(ref.shape[3] == 2 or ref.shape[3] == 4,
                       lambda: f"msda: reference_points: expected 2 coordinates (x, y) or 4 (cx, cy, w, h) in the last "
                               f"dimension, got {list(ref.shape)}")
    # The box formula's scale: any finite number (unused with 2 coordinates, as in the kernel).
    if ref.shape[3] == 4 and not math.isfinite(offset_scale):
        _fail("offset_scale", "a finite number", str(float(offset_scale)))
    expected = (n, q, m, samples)
    for got, want in zip(logits.shape, expected):
        torch._check_value(got == want, lambda: f"msda: attention_logits: expected sizes {layouts['attention_logits']} = "
                                                f"{list(expected)} (from sampling_offsets), got {list(logits.shape)}")
    torch._check_value(spatial_shapes.shape[0] == num_levels and spatial_shapes.shape[1] == 2,
                       lambda: f"msda: spatial_shapes: expected [L, 2] with L = {num_levels}, "
                               f"got {list(spatial_shapes.shape)}")
    torch._check_value(level_start_index.shape[0] == num_levels,
                       lambda: f"msda: level_start_index: expected [L] with L = {num_levels}, "
                               f"got {list(level_start_index.shape)}")


@torch.library.register_fake("msda::ms_deform_attn_fused")
def _ms_deform_attn_fused_fake(value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
                               attention_logits, points=None, sampling="bilinear", offset_scale=0.5):
    _check_fused_tensors(value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
                         attention_logits, points, sampling, offset_scale)
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_offsets.shape[1], m * d))


@torch.library.register_fake("msda::ms_deform_attn_fused_backward")
def _ms_deform_attn_fused_backward_fake(grad_output, value, spatial_shapes, level_start_index, reference_points,
                                        sampling_offsets, attention_logits, output_mask, points=None,
                                        sampling="bilinear", offset_scale=0.5):
    _check_fused_tensors(value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
                         attention_logits, points, sampling, offset_scale)
    if grad_output.device != value.device:
        _fail("grad_output", f"the device of value ({value.device})", str(grad_output.device))
    if grad_output.dtype != value.dtype:
        _fail("grad_output", f"the dtype of value ({value.dtype})", str(grad_output.dtype))
    n, _, m, d = value.shape
    expected = (n, sampling_offsets.shape[1], m * d)
    if grad_output.dim() != 3:
        _fail("grad_output", f"3 dimensions {_LAYOUTS['grad_output']}", f"{grad_output.dim()} dimensions")
    for got, want in zip(grad_output.shape, expected):
        torch._check_value(got == want, lambda: f"msda: grad_output: expected sizes {list(expected)}, "
                                                f"got {list(grad_output.shape)}")

    def grad(t, wanted):  # as in the plain backward: an empty [0] placeholder when not wanted
        return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else t.new_empty((0,))

    return (grad(value, output_mask[0]), grad(reference_points, output_mask[1]),
            grad(sampling_offsets, output_mask[2]), grad(attention_logits, output_mask[3]))
