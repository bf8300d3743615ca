"""msda.patch: msda's kernel inside Hugging Face transformers models, in place.

    model = DeformableDetrForObjectDetection.from_pretrained(...)
    msda.patch(model)          # returns how many attention kernels now run on msda

What it changes (transformers >= 4.50.0, the first release in which the kernel is a module):

- every `MultiScaleDeformableAttention` module of transformers (Deformable DETR, RT-DETR,
  Grounding DINO, MM Grounding DINO, OmDet-Turbo, LW-DETR, RF-DETR, PP-DocLayout v2/v3/v4) is
  replaced in its parent by `MSDAMultiScaleDeformableAttention`, which has the same forward
  signature and calls msda.ms_deform_attn. The kernel module holds no parameters or buffers, so
  the state dict does not change.
- Mask2Former and OneFormer have no kernel module: the forward of their pixel-decoder attention
  calls the module-level function `multi_scale_deformable_attention`. Each such attention module
  instance gets an instance attribute `forward` that runs the class's own forward code (the same
  code object, so it computes exactly what transformers' does) with a copy of its module's globals
  in which that one name is msda's kernel. Nothing global changes: the transformers module, its
  class and every other instance keep transformers' function.
- RT-DETRv2, D-FINE and DEIMv2 (and any transformers model that uses it) call the v2 attention,
  `multi_scale_deformable_attention_v2`: points per level and "default" (bilinear) or "discrete"
  sampling, which msda computes natively (msda.ms_deform_attn's points= and sampling=). RT-DETRv2's
  decoder attention calls the module-level function: it gets a rebound forward as above. D-FINE's
  and DEIMv2's keep the function in an instance attribute (`ms_deformable_attn_core`), which is
  set to msda's version on that instance.

What it refuses (ValueError, before changing anything): a model with nothing msda knows (and
nothing it already patched).

Calling patch twice replaces nothing more: the second call returns 0.
"""
import types
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..functional import ms_deform_attn

MIN_TRANSFORMERS_VERSION = "4.50.0"
_KERNEL_CLASS = "MultiScaleDeformableAttention"
_FUNCTION = "multi_scale_deformable_attention"
_V2_FUNCTION = "multi_scale_deformable_attention_v2"

KNOWN = (
    f"transformers' `{_KERNEL_CLASS}` kernel module (Deformable DETR, RT-DETR, Grounding DINO, "
    "MM Grounding DINO, OmDet-Turbo, LW-DETR, RF-DETR, PP-DocLayout v2/v3/v4), the pixel-decoder "
    f"attention of Mask2Former and OneFormer (which call `{_FUNCTION}`) and the v2 attention of "
    f"RT-DETRv2, D-FINE and DEIMv2 (`{_V2_FUNCTION}`)"
)


def _start_index(shapes: torch.Tensor) -> torch.Tensor:
    return torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))


# The (spatial_shapes, level_start_index) tensors made from a list of (H, W), per device: the same
# two tensors for every call with the same list. The op reads a GPU tensor's shapes on the host
# once and then keeps them by the tensor's identity and version (torch/host_indices.cpp), so
# reusing the tensors means no device-to-host copy and no stream synchronisation per call, which
# is also what lets a patched model run inside a captured CUDA graph. Nothing may write to them.
_INDEX_TENSORS: Dict[Tuple[Tuple[Tuple[int, int], ...], torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}
_MAX_INDEX_TENSORS = 64


def _make_index_tensors(shapes, device) -> Tuple[torch.Tensor, torch.Tensor]:
    made = torch.as_tensor(list(shapes), dtype=torch.int64, device=device).view(-1, 2)
    return made, _start_index(made)


def _index_tensors(shapes, device) -> Tuple[torch.Tensor, torch.Tensor]:
    device = torch.device(device)
    if torch.compiler.is_compiling() or device.type == "cpu":
        # Traced code makes its own tensors (the sizes may be symbolic: no int() here), and a
        # compiled model reads them on every call; on the CPU the op reads them where they are.
        return _make_index_tensors(shapes, device)
    if device.index is None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    key = (tuple((int(h), int(w)) for h, w in shapes), device)
    pair = _INDEX_TENSORS.get(key)
    if pair is None:
        if len(_INDEX_TENSORS) >= _MAX_INDEX_TENSORS:
            _INDEX_TENSORS.pop(next(iter(_INDEX_TENSORS), None), None)
        # Never inference tensors (a first call under torch.inference_mode() would otherwise keep
        # them for training too, which autograd refuses, and msda reads them on every call).
        with torch.inference_mode(False):
            pair = _INDEX_TENSORS[key] = _make_index_tensors(key[0], device)
    return pair


def _shapes_and_starts(shapes, device) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(shapes, torch.Tensor):
        shapes = shapes.to(device=device, dtype=torch.int64)
        return shapes, _start_index(shapes)
    return _index_tensors(shapes, device)


class MSDAMultiScaleDeformableAttention(nn.Module):
    """transformers' MultiScaleDeformableAttention (same forward arguments, same result), on msda's
    kernel. im2col_step is accepted and ignored: msda has no batch-divisibility rule."""

    def forward(self, value: torch.Tensor, value_spatial_shapes: Optional[torch.Tensor],
                value_spatial_shapes_list: Optional[List[Tuple[int, int]]], level_start_index: Optional[torch.Tensor],
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                im2col_step: Optional[int] = None) -> torch.Tensor:
        # transformers computes both shape forms before the call; either alone is enough for msda.
        if value_spatial_shapes is None:
            value_spatial_shapes, starts = _index_tensors(value_spatial_shapes_list, value.device)
            level_start_index = starts if level_start_index is None else level_start_index
        elif level_start_index is None:
            level_start_index = _start_index(value_spatial_shapes)
        return ms_deform_attn(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)

    def extra_repr(self) -> str:
        return f"msda kernel in place of transformers' {_KERNEL_CLASS}"


def _msda_function(value, value_spatial_shapes, sampling_locations, attention_weights):
    """transformers' multi_scale_deformable_attention(value, shapes, locations, weights) of
    Mask2Former and OneFormer on msda's kernel; shapes is a list of (H, W) or an [L, 2] tensor."""
    shapes, starts = _shapes_and_starts(value_spatial_shapes, value.device)
    return ms_deform_attn(value, shapes, starts, sampling_locations, attention_weights)


def _msda_v2_function(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list,
                      method="default"):
    """transformers' multi_scale_deformable_attention_v2 (RT-DETRv2, D-FINE, DEIMv2) on msda's kernel:
    locations [N, Q, M, K, 2] and weights [N, Q, M, K] with K = sum(num_points_list); method
    "default" (bilinear) or "discrete"."""
    if method not in ("default", "discrete"):
        raise ValueError(f'msda.patch: method: expected "default" or "discrete", got {method!r}')
    shapes, starts = _shapes_and_starts(value_spatial_shapes, value.device)
    return ms_deform_attn(value, shapes, starts, sampling_locations, attention_weights,
                          points=[int(p) for p in num_points_list],
                          sampling="discrete" if method == "discrete" else "bilinear")


_msda_v2_function._msda_patched = True

# One rebound forward per (class forward, replaced name), shared by all instances of that class.
_REBOUND: Dict[Tuple[types.FunctionType, str], types.FunctionType] = {}
_REPLACEMENTS = {_FUNCTION: _msda_function, _V2_FUNCTION: _msda_v2_function}


def _rebound_forward(func: types.FunctionType, name: str) -> types.FunctionType:
    new = _REBOUND.get((func, name))
    if new is None:
        # A copy of the globals, not a change to them: only functions created here see msda's kernel.
        scope = dict(func.__globals__)
        scope[name] = _REPLACEMENTS[name]
        new = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
        new.__kwdefaults__ = dict(func.__kwdefaults__) if func.__kwdefaults__ else None
        new.__qualname__ = func.__qualname__
        new.__doc__ = func.__doc__
        new.__module__ = func.__module__
        new.__dict__.update(func.__dict__)
        new._msda_patched = True
        _REBOUND[(func, name)] = new
    return new


def _from_transformers(obj) -> bool:
    return getattr(obj, "__module__", None) is not None and obj.__module__.startswith("transformers.")


def _is_kernel(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == _KERNEL_CLASS and _from_transformers(cls)


def _forward_attribute(module: nn.Module) -> str:
    # accelerate's hooks (device_map models) move the real forward to `_old_forward` on the
    # instance and put their wrapper in `forward`; the wrapper calls `_old_forward`.
    if "forward" in module.__dict__ and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def _is_patched_function_user(module: nn.Module) -> bool:
    bound = module.__dict__.get(_forward_attribute(module))
    return getattr(getattr(bound, "__func__", None), "_msda_patched", False)


def _calls_function(module: nn.Module, name: str) -> bool:
    """True when the class's forward calls the transformers module-level function `name`."""
    cls = type(module)
    if not _from_transformers(cls):
        return False
    forward = getattr(cls, "forward", None)
    if not isinstance(forward, types.FunctionType) or name not in forward.__code__.co_names:
        return False
    target = forward.__globals__.get(name)
    return isinstance(target, types.FunctionType) and _from_transformers(target)


def _v2_attributes(module: nn.Module) -> List[str]:
    """D-FINE and DEIMv2 keep the v2 function as an instance attribute and call it through self:
    the names of those attributes that hold transformers' function."""
    if not _from_transformers(type(module)):
        return []
    return [k for k, v in module.__dict__.items()
            if isinstance(v, types.FunctionType) and v.__name__ == _V2_FUNCTION and _from_transformers(v)]


def _has_patched_v2_attribute(module: nn.Module) -> bool:
    return any(v is _msda_v2_function for v in module.__dict__.values())


def _installed_transformers():
    try:
        import transformers
    except ImportError:
        return None
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"msda.patch: transformers {transformers.__version__} is installed, but msda.patch needs "
            f"transformers >= {MIN_TRANSFORMERS_VERSION}, the first release in which multi-scale deformable "
            f"attention is the nn.Module `{_KERNEL_CLASS}` that msda replaces (older releases call a "
            "custom autograd Function); upgrade with: pip install -U 'transformers>="
            f"{MIN_TRANSFORMERS_VERSION}'")
    return transformers


def patch(model: nn.Module) -> int:
    """Runs the multi-scale deformable attention of a Hugging Face transformers model (or any
    nn.Module that contains such models' attention modules) on msda's kernel, in place.

    Returns the number of attention kernels it replaced (0 when called again on a patched model).
    Raises ValueError naming the model's class when the model contains nothing msda knows;
    ImportError when the installed transformers is older than MIN_TRANSFORMERS_VERSION. Parameters,
    buffers and the state dict are unchanged; so are training/eval mode and every module other than
    the kernels.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"msda.patch: model: expected a torch.nn.Module, got {type(model).__name__}")
    transformers = _installed_transformers()
    name = type(model).__name__

    if _is_kernel(model):
        raise ValueError(f"msda.patch: model: got transformers' {_KERNEL_CLASS} itself; msda replaces it inside "
                         "its parent module, so pass the model (or module) that contains it")

    # The plan first, the changes after it, so that a refusal leaves the model as it was.
    kernels: List[Tuple[nn.Module, str, nn.Module]] = []   # (parent, attribute, kernel)
    function_users: List[Tuple[nn.Module, str]] = []      # (module, the function name its forward calls)
    v2_attribute_users: List[Tuple[nn.Module, List[str]]] = []
    already = 0
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None and _is_kernel(child):
                kernels.append((parent, child_name, child))
            elif isinstance(child, MSDAMultiScaleDeformableAttention):
                already += 1
        if _is_patched_function_user(parent) or _has_patched_v2_attribute(parent):
            already += 1
            continue
        for function in (_FUNCTION, _V2_FUNCTION):
            if _calls_function(parent, function):
                function_users.append((parent, function))
                break
        else:
            attributes = _v2_attributes(parent)
            if attributes:
                v2_attribute_users.append((parent, attributes))

    if not kernels and not function_users and not v2_attribute_users and not already:
        missing = "" if transformers is not None else " (transformers is not installed)"
        raise ValueError(f"msda.patch: found no multi-scale deformable attention that msda knows in {name}{missing}; "
                         f"msda knows {KNOWN}")

    # A kernel module shared by several parents becomes one msda module shared the same way.
    replacements: Dict[int, MSDAMultiScaleDeformableAttention] = {}
    for parent, child_name, kernel in kernels:
        new = replacements.get(id(kernel))
        if new is None:
            new = replacements[id(kernel)] = MSDAMultiScaleDeformableAttention()
            new.train(kernel.training)
        setattr(parent, child_name, new)
    for module, function in function_users:
        setattr(module, _forward_attribute(module),
                types.MethodType(_rebound_forward(type(module).forward, function), module))
    for module, attributes in v2_attribute_users:
        for attribute in attributes:
            setattr(module, attribute, _msda_v2_function)
    return len(replacements) + len(function_users) + len(v2_attribute_users)
