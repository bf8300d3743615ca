"""msda: multi-scale deformable attention (Deformable DETR's MSDeformAttn), on the CPU and on NVIDIA GPUs.

    import msda
    out = msda.ms_deform_attn(value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights)

The op is differentiable in value, sampling_locations and attention_weights, and is also
registered as torch.ops.msda.ms_deform_attn for C++ libtorch programs.
msda.ms_deform_attn_fused(value, spatial_shapes, level_start_index, reference_points,
sampling_offsets, attention_logits) computes the locations and the softmax inside the op.
msda.onnx.export(model, args, f, portable=False) exports models that call them to ONNX.
"""
from ._build_info import version as __version__
from ._library import library_path
from .functional import (cuda_available, cuda_built, ms_deform_attn, ms_deform_attn_fused, ms_deform_attn_pytorch,
                         set_cuda_deterministic)
from .modules import MSDeformAttn
from .integrations.transformers import patch


def __getattr__(name):
    # msda.onnx needs the onnx and onnxscript packages: imported on first use (msda.onnx or
    # `import msda.onnx`), so that `import msda` works without them; msda.openvino likewise.
    if name in ("onnx", "openvino"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ms_deform_attn", "ms_deform_attn_fused", "ms_deform_attn_pytorch", "MSDeformAttn", "patch", "library_path",
           "cuda_built", "cuda_available", "set_cuda_deterministic", "__version__"]
