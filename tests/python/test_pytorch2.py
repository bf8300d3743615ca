"""msda as a first-class PyTorch 2 custom op: torch.library.opcheck on every dtype mix of SPEC
(empty N and Q included), torch.compile(fullgraph=True) of a model built from msda.MSDeformAttn
(static and dynamic shapes, outputs and gradients equal eager), torch.export of an encoder layer,
and the fake kernels' own checks."""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

import msda
from conftest import level_start_index, make_problem

ORDER = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")

# SPEC's dtype mixes: value f32/f64/bf16/f16; locations and weights value's dtype or f32.
MIXES = []
for _v in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for _l in sorted({_v, torch.float32}, key=str):
        for _w in sorted({_v, torch.float32}, key=str):
            MIXES.append((_v, _l, _w))
assert len(MIXES) == 13


def _mix_id(mix):
    return "-".join(str(t).replace("torch.", "") for t in mix)


def _args(prob, requires_grad=True):
    args = [prob[k] for k in ORDER]
    if requires_grad:
        for t in args:
            if t.is_floating_point():
                t.requires_grad_()
    return args


@pytest.mark.parametrize("sizes", [dict(n=2, q=5), dict(n=0, q=5), dict(n=2, q=0)], ids=["regular", "N0", "Q0"])
@pytest.mark.parametrize("mix", MIXES, ids=[_mix_id(m) for m in MIXES])
def test_opcheck_forward(mix, sizes):
    value_dtype, loc_dtype, weight_dtype = mix
    prob = make_problem(m=2, d=4, shapes=[(3, 4), (2, 5)], p=3, dtype=value_dtype, loc_dtype=loc_dtype,
                        weight_dtype=weight_dtype, seed=3, **sizes)
    result = opcheck(torch.ops.msda.ms_deform_attn.default, (*_args(prob), None))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)])
def test_opcheck_backward_op(mask):
    prob = make_problem(n=2, q=4, m=2, d=3, shapes=[(3, 3), (2, 1)], p=2, dtype=torch.float32, seed=6)
    g = torch.randn(2, 4, 6)
    result = opcheck(torch.ops.msda.ms_deform_attn_backward.default, (g, *_args(prob, False), list(mask)))
    assert all(v == "SUCCESS" for v in result.values()), result


class EncoderLayer(nn.Module):
    """Deformable DETR's encoder layer: MSDeformAttn over the pyramid itself, then an FFN."""

    def __init__(self, d_model=32, levels=2, heads=4, points=2):
        super().__init__()
        self.attn = msda.MSDeformAttn(d_model, levels, heads, points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        with torch.no_grad():  # offsets and weights that depend on the query, unlike at initialisation
            self.attn.sampling_offsets.weight.normal_(0, 0.2)
            self.attn.attention_weights.weight.normal_(0, 0.2)

    def forward(self, src, pos, reference_points, shapes, starts, mask=None):
        x = self.norm1(src + self.attn(src + pos, reference_points, src, shapes, starts, mask))
        return self.norm2(x + self.ffn(x))


class Encoder(nn.Module):
    def __init__(self, layers=2, **kw):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**kw) for _ in range(layers))

    def forward(self, src, pos, reference_points, shapes, starts, mask=None):
        for layer in self.layers:
            src = layer(src, pos, reference_points, shapes, starts, mask)
        return src


def encoder_inputs(n, shapes_list, d_model=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes_list)
    src = torch.randn(n, S, d_model, generator=gen, dtype=dtype)
    pos = torch.randn(n, S, d_model, generator=gen, dtype=dtype)
    # Encoder reference points: pixel centres of each level, the same for every level.
    centres = []
    for h, w in shapes_list:
        y, x = torch.meshgrid((torch.arange(h, dtype=dtype) + 0.5) / h, (torch.arange(w, dtype=dtype) + 0.5) / w,
                              indexing="ij")
        centres.append(torch.stack([x.flatten(), y.flatten()], -1))
    ref = torch.cat(centres)[None, :, None].expand(n, S, len(shapes_list), 2).contiguous()
    shapes = torch.tensor(shapes_list)
    starts = torch.tensor(level_start_index(shapes_list))
    mask = torch.zeros(n, S, dtype=torch.bool)
    mask[-1, -3:] = True  # the last image is padded
    return src, pos, ref, shapes, starts, mask


def forward_backward(model, inputs):
    src = inputs[0].clone().requires_grad_()
    out = model(src, *inputs[1:])
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}
    grads["src"] = src.grad
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_close_all(got, want, rtol, atol):
    out, grads = got
    out_ref, grads_ref = want
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol, msg=name)


SHAPES = [[(6, 7), (3, 4)], [(5, 9), (3, 5)], [(8, 8), (4, 4)]]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_equals_eager(dynamic):
    """No graph break (fullgraph=True), outputs and gradients equal eager's on several shapes.
    float64, so that what inductor fuses differently around the op stays at rounding; with
    dynamic=True the later shapes must not recompile."""
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def counting_inductor(gm, example_inputs):  # inductor, counting the graphs it is given
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Encoder(layers=2).double()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, dynamic=dynamic, backend=counting_inductor)
    for i, shapes_list in enumerate(SHAPES):
        # Batches of 3, 4, 5: a size equal to another (L = 2, the 2 coordinates) would be the
        # same symbol under duck sizing and specialise with it.
        inputs = encoder_inputs(3 + i, shapes_list, dtype=torch.float64, seed=i)
        before = len(graphs)
        got = forward_backward(compiled, inputs)
        assert_close_all(got, forward_backward(model, inputs), rtol=1e-10, atol=1e-12)
        # Every shape compiles anew when static; when dynamic, only the first does (the backend
        # may be handed the first frame more than once while dynamo settles its analysis).
        assert (len(graphs) > before) == (i == 0 or not dynamic), (i, before, len(graphs))


def test_compile_float32_and_autocast():
    """float32 (inductor's own kernels around the op round differently: SPEC's 1e-5), and CPU
    autocast to bf16 under torch.compile: the fused op gets a bf16 value, offsets and logits as the
    projections make them, and the f32 reference points."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = Encoder(layers=1)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    inputs = encoder_inputs(2, SHAPES[0], seed=5)
    assert_close_all(forward_backward(compiled, inputs), forward_backward(model, inputs), rtol=1e-4, atol=1e-5)

    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.msda.ms_deform_attn_fused.default:
                seen.append((args[0].dtype, args[3].dtype, args[4].dtype, args[5].dtype))
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(), Spy():
        out = model(*inputs)  # eager under the spy: which dtypes reach the op
    assert seen == [(torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16)], seen
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        compiled_out = compiled(*inputs)
    assert compiled_out.dtype == out.dtype
    torch.testing.assert_close(compiled_out.float(), out.float(), rtol=0.05, atol=0.05)


def test_export_encoder_layer():
    """torch.export keeps the op in the graph; the exported program runs and matches eager, at the
    traced shapes and at another sequence length (a dynamic dimension)."""
    torch.manual_seed(2)
    layer = EncoderLayer().eval()
    inputs = encoder_inputs(2, SHAPES[0], seed=7)
    s = torch.export.Dim("S", min=4, max=4096)
    dynamic_shapes = ({1: s}, {1: s}, {1: s}, None, None, {1: s})
    program = torch.export.export(layer, inputs, dynamic_shapes=dynamic_shapes)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "msda.ms_deform_attn_fused.default" in targets, targets  # MSDeformAttn's default kernel
    runnable = program.module()
    with torch.no_grad():
        torch.testing.assert_close(runnable(*inputs), layer(*inputs), rtol=0, atol=0)
        other = encoder_inputs(2, SHAPES[1], seed=8)
        torch.testing.assert_close(runnable(*other), layer(*other), rtol=0, atol=0)


def test_fake_kernel_rejects_bad_shapes_at_trace_time():
    """The fake kernel names the argument, as the real kernel does, when a compiled or exported
    program is traced with inconsistent shapes."""
    prob = make_problem(n=2, q=5, m=2, d=4, shapes=[(3, 4), (2, 5)], p=3, dtype=torch.float32)
    bad = dict(prob, attention_weights=prob["attention_weights"][:, :, :, :, :2])
    fn = torch.compile(lambda *a: torch.ops.msda.ms_deform_attn(*a, None), fullgraph=True, backend="eager")
    with pytest.raises(Exception) as e:
        fn(*(bad[k] for k in ORDER))
    assert "attention_weights" in str(e.value) and "expected" in str(e.value)
