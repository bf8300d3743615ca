"""The op, and the grid-sample formulation it replaces (the baseline of every benchmark)."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import _library  # noqa: F401  (registers torch.ops.msda)


def _points(points: Optional[Sequence[int]]) -> Optional[list]:
    return None if points is None else [int(p) for p in points]


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   im2col_step: Optional[int] = None, *, points: Optional[Sequence[int]] = None,
                   sampling: str = "bilinear") -> torch.Tensor:
    """Multi-scale deformable attention, as ../shared/SPEC.md defines it.

    value [N, S, M, D]; spatial_shapes [L, 2] (H, W); level_start_index [L];
    sampling_locations [N, Q, M, L, P, 2] (x, y in 0..1); attention_weights [N, Q, M, L, P].
    Returns [N, Q, M*D] in value's dtype. Locations and weights may be float32 beside a
    bfloat16/float16 value (they stay float32 inside the kernel). im2col_step is accepted for
    compatibility with Deformable DETR and mmcv and ignored: any batch size works.

    The v2 attention of RT-DETRv2, D-FINE and DEIM (SPEC "Points per level and discrete
    sampling"): ``points=[P_0, ..., P_{L-1}]`` gives each level its own number of points, with
    sampling_locations [N, Q, M, K, 2] and attention_weights [N, Q, M, K], K = sum(points), the
    samples of each level in turn. ``sampling="discrete"`` reads the one pixel a sample falls in
    (column trunc(x*W + 0.5), clamped) instead of interpolating; its locations get no gradient
    (None), as in transformers.
    """
    return torch.ops.msda.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights, im2col_step, points=_points(points), sampling=sampling)


def ms_deform_attn_fused(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                         reference_points: torch.Tensor, sampling_offsets: torch.Tensor,
                         attention_logits: torch.Tensor, *, points: Optional[Sequence[int]] = None,
                         sampling: str = "bilinear", offset_scale: float = 0.5) -> torch.Tensor:
    """Deformable DETR's MSDeformAttn from the projections on (SPEC "The fused op"): the sampling
    locations and the softmax are computed inside the op, never materialised.

    value [N, S, M, D]; spatial_shapes [L, 2] (H, W); level_start_index [L];
    reference_points [N, Q, L, 2] (x, y) or [N, Q, L, 4] (cx, cy, w, h), in 0..1;
    sampling_offsets [N, Q, M, L, P, 2]: pixels of each level for 2-coordinate reference points,
    fractions of half the box spread over the points (loc = c + off / P * wh / 2) for 4;
    attention_logits [N, Q, M, L*P], before the softmax.
    Equals ms_deform_attn(value, spatial_shapes, level_start_index, loc, softmax(logits)) with the
    locations and softmax computed in double. Returns [N, Q, M*D] in value's dtype; differentiable
    in value, reference_points, sampling_offsets and attention_logits, each of which may be
    float32 beside a bfloat16/float16 value.

    ``points`` and ``sampling`` as in ms_deform_attn (sampling_offsets [N, Q, M, K, 2] and
    attention_logits [N, Q, M, K] with points; one softmax over the K logits); ``offset_scale``
    replaces the 0.5 of the box formula: loc = c + off / P_l * wh * offset_scale (D-FINE's and
    RT-DETRv2's decoders pass theirs). With discrete sampling reference_points and
    sampling_offsets get no gradient (None).
    """
    return torch.ops.msda.ms_deform_attn_fused(value, spatial_shapes, level_start_index, reference_points,
                                               sampling_offsets, attention_logits, points=_points(points),
                                               sampling=sampling, offset_scale=float(offset_scale))


def ms_deform_attn_pytorch(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                           attention_weights: torch.Tensor, *, points: Optional[Sequence[int]] = None,
                           sampling: str = "bilinear") -> torch.Tensor:
    """The same operator built from torch.nn.functional.grid_sample, one level at a time.

    This is what every CPU user of MSDA runs today. It materialises a [N*M, D, Q, P] tensor per
    level. grid_sample needs the grid in the input's dtype, and PyTorch's CPU grid_sample has no
    bfloat16/float16 kernel, so a bfloat16/float16 value is computed in float32 and the output
    cast back.

    ``points`` and ``sampling`` as in ms_deform_attn: per-level points split the [N, Q, M, K, ...]
    tensors level by level; discrete sampling gathers the pixel trunc(loc * (W, H) + 0.5), clamped
    (transformers' multi_scale_deformable_attention_v2, which is the same arithmetic).
    """
    if value.dtype in (torch.bfloat16, torch.float16):
        out = ms_deform_attn_pytorch(value.float(), spatial_shapes, sampling_locations.float(),
                                     attention_weights.float(), points=points, sampling=sampling)
        return out.to(value.dtype)
    if points is not None or sampling != "bilinear":
        return _v2_pytorch(value, spatial_shapes, sampling_locations, attention_weights, points, sampling)
    n, _, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = (2 * sampling_locations - 1).to(value.dtype)  # grid_sample's [-1, 1] convention
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = per_level[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # [N, Q, M, P, 2] -> [N*M, Q, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, D, Q, L*P] weighted by [N*M, 1, Q, L*P], summed over samples.
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, q, num_levels * p).to(value.dtype)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, m * d, q).transpose(1, 2).contiguous()


def _v2_pytorch(value, spatial_shapes, sampling_locations, attention_weights, points, sampling):
    if sampling not in ("bilinear", "discrete"):
        raise ValueError(f'msda: sampling: expected "bilinear" or "discrete", got "{sampling}"')
    n, _, m, d = value.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if points is None:  # equal points, the [N, Q, M, L, P, ...] form
        points = [sampling_locations.shape[4]] * len(shapes)
        sampling_locations = sampling_locations.flatten(3, 4)
        attention_weights = attention_weights.flatten(3, 4)
    q = sampling_locations.shape[1]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    # [N, Q, M, K, 2] -> [N*M, Q, K, 2], split by level
    locations = sampling_locations.transpose(1, 2).flatten(0, 1).split(list(points), dim=2)
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = per_level[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        loc = locations[level]
        if sampling == "bilinear":
            sampled.append(F.grid_sample(v, (2 * loc - 1).to(value.dtype), mode="bilinear", padding_mode="zeros",
                                         align_corners=False))
        else:
            scale = torch.tensor([w, h], dtype=loc.dtype, device=loc.device)
            pixel = (loc * scale + 0.5).to(torch.int64)
            col, row = pixel[..., 0].clamp(0, w - 1), pixel[..., 1].clamp(0, h - 1)
            flat = v.flatten(2)  # [N*M, D, H*W]
            index = (row * w + col).flatten(1)  # [N*M, Q*P_l]
            gathered = flat.gather(2, index.unsqueeze(1).expand(-1, d, -1))
            sampled.append(gathered.view(n * m, d, q, -1))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, q, sum(points)).to(value.dtype)
    out = (torch.cat(sampled, dim=-1) * weights).sum(-1)
    return out.view(n, m * d, q).transpose(1, 2).contiguous()


def cuda_built() -> bool:
    """Whether this msda has its CUDA backend (CMake found nvcc when it was built)."""
    return bool(torch.ops.msda._cuda_built())


def cuda_available() -> bool:
    """Whether msda's ops run on CUDA tensors here: the CUDA backend is built and torch sees a GPU."""
    return cuda_built() and torch.cuda.is_available()


def set_cuda_deterministic(deterministic: bool) -> bool:
    """Chooses how the CUDA backward computes grad_value, for every later call of the process, and
    returns the previous choice. True (the default): a gather over the samples bucketed by pixel,
    bitwise identical from run to run. False: float atomicAdd scatters, whose summation order and
    so whose rounding vary between runs; kept as an ablation for benchmarks. Under
    torch.use_deterministic_algorithms(True) the backward stays deterministic whatever this says."""
    return bool(torch.ops.msda._set_cuda_deterministic(bool(deterministic)))
