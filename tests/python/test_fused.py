"""msda.ms_deform_attn_fused (SPEC "The fused op"): against ms_deform_attn fed locations and a
softmax that PyTorch computes, gradcheck in float64, opcheck on every dtype mix, the module's
fused default against its "msda-unfused" and "pytorch" kernels, torch.compile, autocast, and
the fused op's own errors."""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

import msda
from conftest import assert_rel, away_from_integer_pixels, level_start_index

SHAPES = [(5, 6), (3, 4), (2, 2)]


def fused_problem(n=2, q=6, m=3, d=4, shapes=SHAPES, p=2, coords=2, dtype=torch.float64, ref_dtype=None,
                  off_dtype=None, logit_dtype=None, seed=0, wide=False):
    """Random inputs of the fused op, drawn in float64 and then cast. Offsets are pixels of each
    level (2 coordinates) or fractions of half the box over the points (4), a few of them off the
    map when wide."""
    gen = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(n, S, m, d, generator=gen, dtype=torch.float64)
    ref = torch.rand(n, q, L, coords, generator=gen, dtype=torch.float64)
    if coords == 4:
        ref[..., 2:] = 0.1 + 0.5 * ref[..., 2:]
    scale = (3.0 if wide else 1.5) * (1 if coords == 2 else p)
    offsets = scale * (2 * torch.rand(n, q, m, L, p, 2, generator=gen, dtype=torch.float64) - 1)
    logits = 1.5 * torch.randn(n, q, m, L * p, generator=gen, dtype=torch.float64)
    return dict(value=value.to(dtype), spatial_shapes=torch.tensor(shapes).view(L, 2),
                level_start_index=torch.tensor(level_start_index(shapes)),
                reference_points=ref.to(ref_dtype or dtype), sampling_offsets=offsets.to(off_dtype or dtype),
                attention_logits=logits.to(logit_dtype or dtype))


ARGS = ("value", "spatial_shapes", "level_start_index", "reference_points", "sampling_offsets", "attention_logits")
DIFF = ("value", "reference_points", "sampling_offsets", "attention_logits")


def locations_and_weights(prob, shapes):
    """SPEC's formulas in PyTorch, in the inputs' dtype (what "msda-unfused" computes)."""
    ref, off, logits = prob["reference_points"], prob["sampling_offsets"], prob["attention_logits"]
    n, q, m, L, p, _ = off.shape
    if ref.shape[-1] == 2:
        wh = torch.tensor([[w, h] for h, w in shapes], dtype=off.dtype)
        loc = ref[:, :, None, :, None, :] + off / wh[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / p * ref[:, :, None, :, None, 2:] * 0.5
    return loc, logits.softmax(-1).view(n, q, m, L, p)


def run_fused(prob, grad=None, cast=None):
    leaves = {k: prob[k].detach().to(cast or prob[k].dtype).requires_grad_(grad is not None) for k in DIFF}
    out = msda.ms_deform_attn_fused(leaves["value"], prob["spatial_shapes"], prob["level_start_index"],
                                    leaves["reference_points"], leaves["sampling_offsets"], leaves["attention_logits"])
    if grad is None:
        return out.detach(), {}
    return out.detach(), dict(zip(DIFF, torch.autograd.grad(out, [leaves[k] for k in DIFF], grad)))


def run_unfused(prob, shapes, grad=None, cast=None, kernel="msda"):
    """ms_deform_attn (or the grid-sample path) on locations and weights PyTorch computes."""
    leaves = {k: prob[k].detach().to(cast or prob[k].dtype).requires_grad_(grad is not None) for k in DIFF}
    loc, weights = locations_and_weights(leaves, shapes)
    if kernel == "msda":
        out = msda.ms_deform_attn(leaves["value"], prob["spatial_shapes"], prob["level_start_index"], loc, weights)
    else:
        out = msda.ms_deform_attn_pytorch(leaves["value"], prob["spatial_shapes"], loc, weights)
    if grad is None:
        return out.detach(), {}
    return out.detach(), dict(zip(DIFF, torch.autograd.grad(out, [leaves[k] for k in DIFF], grad)))


# ---- the op against the unfused composition ------------------------------------------------

@pytest.mark.parametrize("coords", [2, 4])
def test_float64_equals_the_unfused_composition(coords):
    prob = fused_problem(coords=coords, seed=coords, wide=True)
    grad = torch.randn(2, 6, 12, dtype=torch.float64)
    out, grads = run_fused(prob, grad)
    want, want_grads = run_unfused(prob, SHAPES, grad)
    assert_rel(out, want, 1e-12, "output")
    for k in DIFF:
        assert_rel(grads[k], want_grads[k], 1e-12, k)


@pytest.mark.parametrize("coords", [2, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)],
                         ids=["f32", "bf16", "f16"])
def test_low_precision_within_spec_bounds(dtype, tol, coords):
    """The op in a narrow dtype against the float64 composition on the same (rounded) inputs."""
    prob = fused_problem(n=2, q=20, m=4, d=8, coords=coords, dtype=dtype, seed=3 + coords)
    grad = torch.randn(2, 20, 32, dtype=torch.float64)
    out, grads = run_fused(prob, grad.to(dtype))
    want, want_grads = run_unfused(prob, SHAPES, grad, cast=torch.float64)
    assert out.dtype == dtype
    assert_rel(out, want, tol, "output")
    for k in DIFF:
        assert grads[k].dtype == prob[k].dtype, k
        assert_rel(grads[k], want_grads[k], tol, k)


def test_bf16_value_with_f32_reference_points_offsets_logits():
    """Autocast's mix: bf16 value, f32 everything else (kept f32 inside: SPEC "Precision")."""
    prob = fused_problem(n=1, q=30, m=2, d=8, dtype=torch.bfloat16, ref_dtype=torch.float32,
                         off_dtype=torch.float32, logit_dtype=torch.float32, seed=9)
    grad = torch.randn(1, 30, 16, dtype=torch.float64)
    out, grads = run_fused(prob, grad.bfloat16())
    want, want_grads = run_unfused(prob, SHAPES, grad, cast=torch.float64)
    assert_rel(out, want, 1e-2, "output")
    for k in DIFF:
        assert grads[k].dtype == prob[k].dtype
        assert_rel(grads[k], want_grads[k], 1e-2, k)


def test_gradcheck_float64():
    """Finite differences in float64, with every location away from integer pixel coordinates
    (where the bilinear form has kinks)."""
    prob = fused_problem(n=1, q=3, m=2, d=3, shapes=[(4, 5), (2, 3)], p=2, coords=4, seed=11)
    shapes = [(4, 5), (2, 3)]
    gen = torch.Generator().manual_seed(12)
    for _ in range(200):
        loc, _ = locations_and_weights(prob, shapes)
        bad = ~away_from_integer_pixels(loc, shapes, margin=1e-3)
        if not bad.any():
            break
        fresh = 0.5 * torch.randn(prob["sampling_offsets"].shape, generator=gen, dtype=torch.float64)
        prob["sampling_offsets"] = torch.where(bad[..., None], prob["sampling_offsets"] + fresh,
                                               prob["sampling_offsets"])
    assert away_from_integer_pixels(loc, shapes, margin=1e-3).all()
    inputs = [prob[k].clone().requires_grad_(k in DIFF) for k in ARGS]
    assert torch.autograd.gradcheck(lambda *a: msda.ms_deform_attn_fused(*a), inputs, eps=1e-6, atol=1e-8,
                                    rtol=1e-6)


def test_zeroed_samples_give_finite_gradients():
    """Infinite and NaN offsets make zero samples, whose gradients are exactly zero: no 0 * inf."""
    prob = fused_problem(n=1, q=8, m=2, d=4, coords=4, seed=13)
    off = prob["sampling_offsets"]
    off[0, 0, 0, 0, 0, 0] = float("inf")
    off[0, 1, 1, 1, 1, 1] = float("nan")
    off[0, 2, :, 2, :, :] = -1e30
    grad = torch.randn(1, 8, 8, dtype=torch.float64)
    out, grads = run_fused(prob, grad)
    assert torch.isfinite(out).all()
    for k in DIFF:
        assert torch.isfinite(grads[k]).all(), k
    assert grads["sampling_offsets"][0, 0, 0, 0, 0].abs().sum() == 0
    assert grads["sampling_offsets"][0, 1, 1, 1, 1].abs().sum() == 0


@pytest.mark.parametrize("sizes", [dict(n=0, q=4), dict(n=2, q=0)], ids=["N0", "Q0"])
def test_empty_batch_or_queries(sizes):
    prob = fused_problem(**sizes, seed=1)
    grad = torch.zeros(sizes["n"], sizes["q"], 12, dtype=torch.float64)
    out, grads = run_fused(prob, grad)
    assert out.shape == (sizes["n"], sizes["q"], 12)
    for k in DIFF:
        assert grads[k].shape == prob[k].shape and (grads[k] == 0).all(), k


def test_double_backward_is_refused():
    prob = fused_problem(n=1, q=3, seed=2)
    leaves = [prob[k].clone().requires_grad_(k in DIFF) for k in ARGS]
    out = msda.ms_deform_attn_fused(*leaves)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), [leaves[0]], create_graph=True)
    assert torch.autograd.grad(out.sum(), [leaves[0]])[0].shape == leaves[0].shape  # first order works


def test_bad_input_names_the_argument():
    prob = fused_problem(n=1, q=3, seed=2)

    def call(**changes):
        args = dict(prob, **changes)
        return msda.ms_deform_attn_fused(*(args[k] for k in ARGS))

    cases = [
        (dict(reference_points=prob["reference_points"].new_zeros(1, 3, 3, 3)), "reference_points"),
        (dict(reference_points=prob["reference_points"][:, :2]), "reference_points"),
        (dict(reference_points=prob["reference_points"].float()), None),  # f32 beside f64: allowed
        (dict(sampling_offsets=prob["sampling_offsets"][..., :1, :]), "sampling_offsets"),
        (dict(sampling_offsets=prob["sampling_offsets"].half()), "sampling_offsets"),
        (dict(attention_logits=prob["attention_logits"][..., :-1]), "attention_logits"),
        (dict(attention_logits=prob["attention_logits"].bfloat16()), "attention_logits"),
        (dict(value=prob["value"].float()), "reference_points"),  # f64 reference points beside f32 value
        (dict(spatial_shapes=prob["spatial_shapes"].float()), "spatial_shapes"),
    ]
    for changes, name in cases:
        if name is None:
            call(**changes)
            continue
        with pytest.raises(ValueError, match=name):
            call(**changes)


# ---- PyTorch 2: opcheck, fake kernels --------------------------------------------------------

MIXES = []
for _v in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for _o in sorted({_v, torch.float32}, key=str):
        for _w in sorted({_v, torch.float32}, key=str):
            MIXES.append((_v, _o, _w))
assert len(MIXES) == 13


def _mix_id(mix):
    return "-".join(str(t).replace("torch.", "") for t in mix)


@pytest.mark.parametrize("sizes", [dict(n=2, q=4), dict(n=0, q=4), dict(n=2, q=0)], ids=["regular", "N0", "Q0"])
@pytest.mark.parametrize("mix", MIXES, ids=[_mix_id(m) for m in MIXES])
def test_opcheck(mix, sizes):
    """Every dtype mix: value; offsets and reference points (the autocast case keeps reference
    points f32 with 16-bit offsets, so they alternate); logits."""
    value_dtype, off_dtype, logit_dtype = mix
    ref_dtype = torch.float32 if off_dtype == value_dtype else value_dtype
    prob = fused_problem(m=2, d=3, coords=4 if value_dtype == torch.float64 else 2, dtype=value_dtype,
                         ref_dtype=ref_dtype, off_dtype=off_dtype, logit_dtype=logit_dtype, seed=5, **sizes)
    args = [prob[k].clone().requires_grad_(k in DIFF) for k in ARGS]
    result = opcheck(torch.ops.msda.ms_deform_attn_fused.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("mask", [(True, True, True, True), (False, True, False, True), (True, False, False, False)])
def test_opcheck_backward_op(mask):
    prob = fused_problem(n=2, q=4, m=2, d=3, coords=4, dtype=torch.float32, seed=6)
    g = torch.randn(2, 4, 6)
    result = opcheck(torch.ops.msda.ms_deform_attn_fused_backward.default,
                     (g, *(prob[k] for k in ARGS), list(mask)))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_fake_kernel_rejects_bad_shapes_at_trace_time():
    prob = fused_problem(n=2, q=4, dtype=torch.float32)
    bad = dict(prob, reference_points=prob["reference_points"][:, :, :2])
    fn = torch.compile(lambda *a: torch.ops.msda.ms_deform_attn_fused(*a), fullgraph=True, backend="eager")
    with pytest.raises(Exception) as e:
        fn(*(bad[k] for k in ARGS))
    assert "reference_points" in str(e.value) and "expected" in str(e.value)


# ---- the module -----------------------------------------------------------------------------

def module_setup(coords, dtype=torch.float64, seed=0, n=2, q=7, d_model=16, heads=4, levels=((6, 7), (3, 4), (2, 2)),
                 points=3, mask=True):
    torch.manual_seed(seed)
    shapes = torch.tensor(levels)
    starts = torch.tensor(level_start_index(levels))
    S = sum(h * w for h, w in levels)
    L = len(levels)
    mod = msda.MSDeformAttn(d_model=d_model, n_levels=L, n_heads=heads, n_points=points).to(dtype)
    with torch.no_grad():  # away from the init: offsets and weights depend on the query
        for p in mod.parameters():
            p.add_(0.2 * torch.randn_like(p))
    query = torch.randn(n, q, d_model, dtype=dtype)
    feats = torch.randn(n, S, d_model, dtype=dtype)
    refp = torch.rand(n, q, L, coords, dtype=dtype)
    if coords == 4:
        refp[..., 2:] = 0.05 + 0.5 * refp[..., 2:]
    pad = None
    if mask:
        pad = torch.zeros(n, S, dtype=torch.bool)
        pad[0, -5:] = True
    return mod, (query, refp, feats, shapes, starts, pad)


def module_forward_backward(mod, args, grad):
    query, refp, feats, shapes, starts, pad = args
    leaves = [t.clone().requires_grad_() for t in (query, refp, feats)]
    mod.zero_grad(set_to_none=True)
    out = mod(leaves[0], leaves[1], leaves[2], shapes, starts, pad)
    out.backward(grad)
    grads = {"query": leaves[0].grad, "reference_points": leaves[1].grad, "input_flatten": leaves[2].grad}
    grads.update({name: p.grad for name, p in mod.named_parameters()})
    return out.detach(), grads


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("coords", [2, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_module_fused_equals_unfused_and_pytorch(dtype, tol, coords, mask):
    mod, args = module_setup(coords, dtype, seed=coords + 10 * mask, mask=mask)
    grad = torch.randn(args[0].shape, dtype=dtype)
    assert mod.kernel == "msda"  # fused by default
    out, grads = module_forward_backward(mod, args, grad)
    for kernel in ("msda-unfused", "pytorch"):
        mod.kernel = kernel
        want, want_grads = module_forward_backward(mod, args, grad)
        assert_rel(out, want, tol, f"output vs {kernel}")
        assert grads.keys() == want_grads.keys()
        for k in grads:
            assert grads[k] is not None and grads[k].norm() > 0, k
            assert_rel(grads[k], want_grads[k], tol, f"{k} vs {kernel}")


def test_module_uses_the_fused_op_by_default_and_kernel_switches(monkeypatch):
    calls = []
    for name in ("ms_deform_attn_fused", "ms_deform_attn", "ms_deform_attn_pytorch"):
        real = getattr(msda.modules, name)
        monkeypatch.setattr(msda.modules, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    mod, args = module_setup(2, seed=1)
    for kernel in ("msda", "msda-unfused", "pytorch"):
        mod.kernel = kernel
        mod(*args)
    assert calls == ["ms_deform_attn_fused", "ms_deform_attn", "ms_deform_attn_pytorch"]
    mod.kernel = "cuda"
    with pytest.raises(ValueError, match="kernel"):
        mod(*args)


def test_state_dict_round_trip_and_no_new_state():
    mod, args = module_setup(4, seed=2)
    keys = {f"{lin}.{p}" for lin in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
            for p in ("weight", "bias")}
    assert set(mod.state_dict()) == keys  # the fused kernel adds no parameter or buffer
    other = msda.MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=3).double()
    other.load_state_dict(mod.state_dict(), strict=True)
    other.kernel = "msda-unfused"
    torch.testing.assert_close(other(*args), mod(*args), rtol=1e-11, atol=1e-12)


class FusedOpDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtypes (value, reference_points, sampling_offsets, attention_logits) of every
    ms_deform_attn_fused call made inside it, in `seen`."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.msda.ms_deform_attn_fused.default:
            self.seen.append(tuple(a.dtype for a in (args[0], args[3], args[4], args[5])))
        return func(*args, **(kwargs or {}))


def test_autocast_gives_the_op_16_bit_projections_and_f32_reference_points():
    mod, args = module_setup(2, torch.float32, seed=3, mask=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(), FusedOpDtypes() as spy:
        out = mod(*args)
    assert spy.seen == [(torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16)], spy.seen
    with torch.no_grad():
        want = mod(*args)
    assert_rel(out.float(), want, 3e-2, "autocast output")


def test_compile_fullgraph_equals_eager():
    """The fused module under torch.compile(fullgraph=True): no graph break, outputs and
    gradients equal eager's (float64, 4-coordinate reference points, padding mask)."""
    torch._dynamo.reset()
    mod, args = module_setup(4, seed=4)
    compiled = torch.compile(copy.deepcopy(mod), fullgraph=True)
    grad = torch.randn(args[0].shape, dtype=torch.float64)
    out, grads = module_forward_backward(mod, args, grad)
    c_out, c_grads = module_forward_backward(compiled, args, grad)
    torch.testing.assert_close(c_out, out, rtol=1e-10, atol=1e-12)
    for k in grads:
        torch.testing.assert_close(c_grads[k.removeprefix("_orig_mod.")] if k in c_grads else
                                   c_grads["_orig_mod." + k], grads[k], rtol=1e-10, atol=1e-12, msg=k)
