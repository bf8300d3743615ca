"""msda: multi-scale deformable attention (Deformable DETR's MSDeformAttn), on the CPU and on NVIDIA GPUs.

    import msda
    out = msda.ms_deform_attn(value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights)

The op is differentiable in value, sampling_locations and attention_weights, and is also
registered as torch.ops.msda.ms_deform_attn for C++ libtorch programs.
msda.ms_deform_attn_fused(value, spatial_shapes, level_start_index, reference_points,
sampling_offsets, attention_logits) computes the locations and the softmax inside the op.
"""
from ._build_info import version as __version__
from ._library import library_path
from .functional import (cuda_available, cuda_built, ms_deform_attn, ms_deform_attn_fused, ms_deform_attn_pytorch,
                         set_cuda_deterministic)
from .modules import MSDeformAttn
from .integrations.transformers import patch

__all__ = ["ms_deform_attn", "ms_deform_attn_fused", "ms_deform_attn_pytorch", "MSDeformAttn", "patch", "library_path",
           "cuda_built", "cuda_available", "set_cuda_deterministic", "__version__"]
