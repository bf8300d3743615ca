"""MSDeformAttn: the attention module of Deformable DETR, running on msda's op.

Parameter names, initialisation and forward signature are Deformable DETR's, so checkpoints of
Deformable DETR, DINO and Mask2Former (which share the module) load with strict=True.
"""
import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.init import constant_, xavier_uniform_

from .functional import ms_deform_attn, ms_deform_attn_fused, ms_deform_attn_pytorch

KERNELS = ("msda", "msda-unfused", "pytorch")


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        """d_model: hidden size; n_levels, n_heads, n_points: L, M, P of SPEC."""
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        self.im2col_step = 64  # kept for attribute compatibility; msda needs no such step
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        # Which kernel runs the attention: "msda" (the fused op: locations and softmax inside it),
        # "msda-unfused" (the plain op, locations and softmax computed by PyTorch) or "pytorch"
        # (the grid-sample path).
        self.kernel = "msda"
        self._reset_parameters()

    def _reset_parameters(self):
        constant_(self.sampling_offsets.weight.data, 0.0)
        # Head h starts its points on a ray at angle 2*pi*h/M, the k-th point k+1 steps out,
        # the ray scaled so that its longer coordinate is 1 (Deformable DETR's initialisation).
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * steps
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid.view(-1))
        constant_(self.attention_weights.weight.data, 0.0)
        constant_(self.attention_weights.bias.data, 0.0)
        xavier_uniform_(self.value_proj.weight.data)
        constant_(self.value_proj.bias.data, 0.0)
        xavier_uniform_(self.output_proj.weight.data)
        constant_(self.output_proj.bias.data, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query [N, Q, C]; reference_points [N, Q, L, 2] as (x, y) in 0..1, or [N, Q, L, 4] as
        boxes (cx, cy, w, h); input_flatten [N, S, C]; input_spatial_shapes [L, 2];
        input_level_start_index [L]; input_padding_mask [N, S], True where padded.
        Returns [N, Q, C]."""
        n, len_q, _ = query.shape
        n, len_in, _ = input_flatten.shape
        shapes = input_spatial_shapes
        # Reading shapes' contents is data-dependent: under torch.compile/export the op checks S
        # itself when it runs.
        if not torch.compiler.is_compiling() and int((shapes[:, 0] * shapes[:, 1]).sum()) != len_in:
            raise ValueError(f"MSDeformAttn: input_flatten has {len_in} rows, "
                             f"expected the sum of H*W over input_spatial_shapes")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        logits = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError("MSDeformAttn: reference_points must have 2 or 4 coordinates in the last dimension, "
                             f"got {reference_points.shape[-1]}")
        if self.kernel not in KERNELS:
            raise ValueError(f"MSDeformAttn: kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")

        if self.kernel == "msda":
            # The op computes the locations and the softmax itself, in double. Under autocast (or
            # in a bf16/f16 model) value, offsets and logits come in 16 bits as the projections
            # made them, and the reference points stay f32: the precision a location needs is in
            # them, not in the offsets of a few pixels. Any other mix becomes f32.
            def allowed(t):
                return t if t.dtype in (value.dtype, torch.float32) else t.float()

            output = ms_deform_attn_fused(value, shapes, input_level_start_index, allowed(reference_points),
                                          allowed(offsets), allowed(logits))
            return self.output_proj(output)

        # Under autocast (or in a bf16/f16 model) the projections come out in 16 bits; the softmax
        # and the location arithmetic run in f32 and the op keeps them f32 (SPEC, "Precision": a
        # bf16 coordinate is only good to ~1/256 of the map).
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits, offsets, reference_points = logits.float(), offsets.float(), reference_points.float()
        weights = F.softmax(logits, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W, H).
            normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            # Offsets are fractions of half the box, spread over the points.
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)

        if self.kernel == "pytorch":
            output = ms_deform_attn_pytorch(value, shapes, locations, weights)
        else:
            output = ms_deform_attn(value, shapes, input_level_start_index, locations, weights, self.im2col_step)
        return self.output_proj(output)
