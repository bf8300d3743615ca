"""The v2 attention (SPEC "Points per level and discrete sampling"): points=[P_0, ..., P_{L-1}] with
[N, Q, M, K, ...] tensors, and sampling="discrete", in ms_deform_attn, ms_deform_attn_fused and
the grid-sample baseline.

- against transformers' own multi_scale_deformable_attention_v2 (RT-DETRv2, D-FINE, DEIMv2) and
  msda.ms_deform_attn_pytorch in float64: output and gradients; discrete sampling gives the
  locations no gradient (None), as transformers does; equal points are the plain op, bitwise;
  discrete sampling against a loop over SPEC's formula (exact pixel boundaries, off-map, NaN, inf);
- torch.library.opcheck on every dtype mix of SPEC for both ops (and the backward ops), and the
  precision bounds for f32, and bf16/f16 beside f32 locations;
- torch.compile(fullgraph=True) and torch.export keep the op with its points and sampling;
- the fused op with points: ms_deform_attn on the locations of D-FINE's formula (offset_scale) and
  a softmax over K;
- bad points, sampling and offset_scale: a ValueError naming the argument, eagerly and under
  fake tensors (FakeTensorMode, the meta device, torch.compile's tracing).
"""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

import msda
from conftest import assert_bitwise, assert_rel, level_start_index, make_problem
from test_bad_input import _check_message
from test_pytorch2 import MIXES, _mix_id

F64 = torch.float64
SAMPLINGS = ["bilinear", "discrete"]
# transformers' name of each sampling (its `method` argument).
METHOD = {"bilinear": "default", "discrete": "discrete"}
DIFF = ("value", "sampling_locations", "attention_weights")
FUSED_DIFF = ("value", "reference_points", "sampling_offsets", "attention_logits")
# Inputs that get no gradient (None) with discrete sampling.
NO_GRAD_WHEN_DISCRETE = {"sampling_locations", "reference_points", "sampling_offsets"}


def v2_problem(n=2, q=5, m=2, d=4, shapes=((5, 6), (3, 4), (2, 2)), points=(3, 6, 3), dtype=F64, loc_dtype=None,
               weight_dtype=None, lo=-0.1, hi=1.1, seed=0):
    """Random inputs of the op with points per level: locations [N, Q, M, K, 2] uniform in [lo, hi]
    (a few off the map), weights [N, Q, M, K] a softmax over K. Drawn in float64, then cast."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [tuple(s) for s in shapes]
    assert len(points) == len(shapes)
    k = sum(points)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=gen, dtype=F64)
    loc = lo + (hi - lo) * torch.rand(n, q, m, k, 2, generator=gen, dtype=F64)
    weights = torch.randn(n, q, m, k, generator=gen, dtype=F64).softmax(-1)
    return dict(value=value.to(dtype), spatial_shapes=torch.tensor(shapes).view(-1, 2),
                level_start_index=torch.tensor(level_start_index(shapes)),
                sampling_locations=loc.to(loc_dtype or dtype), attention_weights=weights.to(weight_dtype or dtype),
                points=list(points))


def _transformers_v2():
    modeling = pytest.importorskip("transformers.models.rt_detr_v2.modeling_rt_detr_v2")
    return modeling.multi_scale_deformable_attention_v2


def _grads(out, leaves, names, grad):
    """{name: gradient of out with respect to leaves[name]}, None where the graph gives none."""
    got = torch.autograd.grad(out, [leaves[k] for k in names], grad, allow_unused=True)
    return dict(zip(names, got))


def run_v2(prob, grad=None, kernel="msda", sampling="bilinear", cast=None):
    """Forward (and backward with grad) of msda's op, the grid-sample baseline ("pytorch") or
    transformers' multi_scale_deformable_attention_v2 ("transformers") on prob.
    Returns (output, {input: gradient or None})."""
    leaves = {k: prob[k].detach().to(cast or prob[k].dtype).requires_grad_(grad is not None) for k in DIFF}
    v, loc, w = (leaves[k] for k in DIFF)
    if kernel == "msda":
        out = msda.ms_deform_attn(v, prob["spatial_shapes"], prob["level_start_index"], loc, w,
                                  points=prob["points"], sampling=sampling)
    elif kernel == "pytorch":
        out = msda.ms_deform_attn_pytorch(v, prob["spatial_shapes"], loc, w, points=prob["points"],
                                          sampling=sampling)
    else:
        shapes_list = [tuple(hw) for hw in prob["spatial_shapes"].tolist()]
        out = _transformers_v2()(v, shapes_list, loc, w, prob["points"], METHOD[sampling])
    if grad is None:
        return out.detach(), {}
    return out.detach(), _grads(out, leaves, DIFF, grad.to(out.dtype))


def assert_same_results(got, want, names, sampling, tol):
    """Output and gradients within tol (relative); with discrete sampling the locations' (and
    reference points' and offsets') gradients are None on both sides."""
    out, grads = got
    want_out, want_grads = want
    assert want_out.norm() > 0
    assert_rel(out, want_out, tol, "output")
    for k in names:
        if sampling == "discrete" and k in NO_GRAD_WHEN_DISCRETE:
            assert want_grads[k] is None, f"the reference gives {k} a gradient"
            assert grads[k] is None, f"{k}: expected no gradient (None) with discrete sampling"
            continue
        assert grads[k] is not None and want_grads[k] is not None, k
        assert want_grads[k].norm() > 0, k
        assert_rel(grads[k], want_grads[k], tol, "grad " + k)


# ---- the op against transformers and the grid-sample baseline, float64 -------------------------

CASES = [
    ("dfine_3_6_3", dict(shapes=[(5, 6), (3, 4), (2, 2)], points=[3, 6, 3])),
    ("deim_1_4_2", dict(shapes=[(4, 5), (2, 3), (1, 2)], points=[1, 4, 2])),
    ("equal_4_4", dict(shapes=[(6, 5), (3, 3)], points=[4, 4], m=3, d=5)),
    ("one_level", dict(shapes=[(6, 7)], points=[5], n=1, q=7)),
    ("five_levels", dict(shapes=[(8, 9), (4, 5), (2, 3), (1, 2), (1, 1)], points=[1, 2, 1, 3, 1], d=3)),
    ("degenerate_maps", dict(shapes=[(1, 7), (6, 1), (1, 1)], points=[2, 3, 1], m=1, d=6)),
    ("far_outside", dict(shapes=[(4, 4), (2, 3)], points=[2, 5], lo=-0.6, hi=1.6)),
    ("D1_M4", dict(shapes=[(5, 4), (3, 2)], points=[6, 1], m=4, d=1)),
]


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_float64_matches_transformers_and_grid_sample(name, kw, sampling):
    prob = v2_problem(seed=len(name) * 7 + len(kw["points"]), **kw)
    n, q, m, k, _ = prob["sampling_locations"].shape
    assert prob["attention_weights"].shape == (n, q, m, k) and k == sum(kw["points"])
    grad = torch.randn(n, q, prob["value"].shape[2] * prob["value"].shape[3], dtype=F64,
                       generator=torch.Generator().manual_seed(1))
    got = run_v2(prob, grad, "msda", sampling)
    assert got[0].shape == grad.shape and got[0].dtype == F64
    assert_same_results(got, run_v2(prob, grad, "pytorch", sampling), DIFF, sampling, 1e-12)
    assert_same_results(got, run_v2(prob, grad, "transformers", sampling), DIFF, sampling, 1e-12)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_equal_points_is_the_plain_op_bitwise(sampling):
    """points=[P]*L on the [N, Q, M, L*P, ...] view equals the op on [N, Q, M, L, P, ...] (no points):
    the same memory, the same samples, the same results to the bit."""
    prob = make_problem(n=2, q=9, m=2, d=5, shapes=[(6, 7), (3, 4), (2, 1)], p=3, lo=-0.1, hi=1.1, seed=4)
    n, q, m, L, p, _ = prob["sampling_locations"].shape
    g = torch.randn(n, q, m * 5, dtype=F64)
    leaves6 = {k: prob[k].clone().requires_grad_() for k in DIFF}
    out6 = msda.ms_deform_attn(leaves6["value"], prob["spatial_shapes"], prob["level_start_index"],
                               leaves6["sampling_locations"], leaves6["attention_weights"], sampling=sampling)
    grads6 = _grads(out6, leaves6, DIFF, g)
    leaves5 = {"value": prob["value"].clone().requires_grad_(),
               "sampling_locations": prob["sampling_locations"].reshape(n, q, m, L * p, 2).clone().requires_grad_(),
               "attention_weights": prob["attention_weights"].reshape(n, q, m, L * p).clone().requires_grad_()}
    out5 = msda.ms_deform_attn(leaves5["value"], prob["spatial_shapes"], prob["level_start_index"],
                               leaves5["sampling_locations"], leaves5["attention_weights"], points=[p] * L,
                               sampling=sampling)
    grads5 = _grads(out5, leaves5, DIFF, g)
    assert_bitwise(out5.detach(), out6.detach(), "output")
    for k in DIFF:
        if sampling == "discrete" and k == "sampling_locations":
            assert grads5[k] is None and grads6[k] is None
            continue
        assert_bitwise(grads5[k].reshape(prob[k].shape), grads6[k], k)


def _pixel(coordinate, size):
    """SPEC's discrete pixel index along one axis: clamp(trunc(c * size + 0.5), 0, size - 1); None for NaN."""
    t = coordinate * size + 0.5
    if math.isnan(t):
        return None
    if t >= size - 1:
        return size - 1
    if t <= 0:
        return 0
    return math.trunc(t)


def test_discrete_matches_spec_formula_loop():
    """Discrete sampling against a loop over SPEC's rule, output and the value and weight
    gradients, with samples on exact pixel boundaries (x*W + 0.5 an integer), at 0 and 1, off
    the map, huge, infinite and NaN (NaN contributes nothing; inf clamps like any large number)."""
    prob = v2_problem(n=2, q=4, m=2, d=3, shapes=[(3, 4), (2, 5), (1, 1)], points=[3, 2, 2], seed=31)
    loc = prob["sampling_locations"]
    specials = [0.625, 0.125, 0.0, 1.0, 0.5, -0.2, 1.2, 1e30, -1e30, float("inf"), float("-inf"), float("nan")]
    flat = loc.view(-1, 2)
    for i, x in enumerate(specials):  # spread over samples and both coordinates
        flat[5 * i + 1, i % 2] = x
    shapes = prob["spatial_shapes"].tolist()
    starts = prob["level_start_index"].tolist()
    level_of = [l for l, p in enumerate(prob["points"]) for _ in range(p)]
    v, a = prob["value"], prob["attention_weights"]
    n, q, m, k, _ = loc.shape
    g = torch.randn(n, q, m * 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    gv = g.view(n, q, m, 3)
    want = torch.zeros(n, q, m, 3, dtype=F64)
    want_gvalue = torch.zeros_like(v)
    want_gweights = torch.zeros_like(a)
    for b in range(n):
        for qq in range(q):
            for mm in range(m):
                for kk in range(k):
                    h, w = shapes[level_of[kk]]
                    col, row = _pixel(loc[b, qq, mm, kk, 0].item(), w), _pixel(loc[b, qq, mm, kk, 1].item(), h)
                    if col is None or row is None:
                        continue
                    r = starts[level_of[kk]] + row * w + col
                    want[b, qq, mm] += a[b, qq, mm, kk] * v[b, r, mm]
                    want_gvalue[b, r, mm] += a[b, qq, mm, kk] * gv[b, qq, mm]
                    want_gweights[b, qq, mm, kk] = torch.dot(gv[b, qq, mm], v[b, r, mm])
    for dtype, tol in ((F64, 1e-14), (torch.float32, 1e-6)):
        cast = dict(prob, **{k_: prob[k_].to(dtype) for k_ in DIFF})
        out, grads = run_v2(cast, g.to(dtype), "msda", "discrete")
        assert torch.isfinite(out).all()
        assert_rel(out, want.view(n, q, m * 3), tol, f"{dtype} output")
        assert_rel(grads["value"], want_gvalue, tol, f"{dtype} grad value")
        assert_rel(grads["attention_weights"], want_gweights, tol, f"{dtype} grad attention_weights")
        assert grads["sampling_locations"] is None
    # The NaN sample contributes nothing, not pixel 0: its weight's gradient is exactly zero.
    nan_sample = torch.isnan(loc).any(-1)
    assert nan_sample.sum() == 1
    assert (run_v2(prob, g, "msda", "discrete")[1]["attention_weights"][nan_sample] == 0).all()


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_discrete_leaves_no_grad_attribute(fused):
    """What an optimizer sees after backward(): with discrete sampling the locations (the fused
    op's reference points and offsets) keep .grad None, not a zero tensor (AdamW's weight decay
    skips a None grad only); with bilinear sampling every input gets a gradient."""
    for sampling in SAMPLINGS:
        if fused:
            prob = fused_v2_problem(coords=4, seed=3)
            leaves = {k: prob[k].clone().requires_grad_() for k in FUSED_DIFF}
            out = msda.ms_deform_attn_fused(*(leaves.get(k, prob.get(k)) for k in FUSED_ARGS),
                                            points=prob["points"], sampling=sampling)
        else:
            prob = v2_problem(seed=3)
            leaves = {k: prob[k].clone().requires_grad_() for k in DIFF}
            out = msda.ms_deform_attn(leaves["value"], prob["spatial_shapes"], prob["level_start_index"],
                                      leaves["sampling_locations"], leaves["attention_weights"],
                                      points=prob["points"], sampling=sampling)
        out.pow(2).sum().backward()
        for k, t in leaves.items():
            if sampling == "discrete" and k in NO_GRAD_WHEN_DISCRETE:
                assert t.grad is None, (sampling, k)
            else:
                assert t.grad is not None and t.grad.abs().sum() > 0, (sampling, k)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_deterministic_and_thread_independent(sampling, restore_threads):
    prob = v2_problem(n=2, q=64, m=4, d=8, shapes=[(12, 15), (6, 8), (3, 4)], points=[3, 6, 3], dtype=torch.float32,
                      seed=8)
    g = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(9))
    runs = []
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        runs.append(run_v2(prob, g, "msda", sampling))
    out, grads = runs[0]
    for other_out, other_grads in runs[1:]:
        assert_bitwise(other_out, out, "output")
        for k in DIFF:
            if grads[k] is None:
                assert other_grads[k] is None
            else:
                assert_bitwise(other_grads[k], grads[k], k)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("n,q", [(0, 4), (2, 0)], ids=["N0", "Q0"])
def test_empty_batch_or_queries(n, q, sampling):
    prob = v2_problem(n=n, q=q, seed=5)
    out, grads = run_v2(prob, torch.zeros(n, q, 8, dtype=F64), "msda", sampling)
    assert out.shape == (n, q, 8)
    for k in DIFF:
        if sampling == "discrete" and k == "sampling_locations":
            assert grads[k] is None
        else:
            assert grads[k].shape == prob[k].shape and (grads[k] == 0).all(), k


# ---- the fused op with points ------------------------------------------------------------------

FUSED_ARGS = ("value", "spatial_shapes", "level_start_index", "reference_points", "sampling_offsets",
              "attention_logits")


def fused_v2_problem(n=2, q=5, m=2, d=4, shapes=((5, 6), (3, 4), (2, 2)), points=(3, 6, 3), coords=4, dtype=F64,
                     ref_dtype=None, off_dtype=None, logit_dtype=None, seed=0):
    """Random inputs of the fused op with points per level: offsets [N, Q, M, K, 2] of a few
    pixels (2 coordinates) or of up to P_l times the box half-size spread (4), logits [N, Q, M, K]."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [tuple(s) for s in shapes]
    L, k = len(shapes), sum(points)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=gen, dtype=F64)
    ref = torch.rand(n, q, L, coords, generator=gen, dtype=F64)
    if coords == 4:
        ref[..., 2:] = 0.1 + 0.5 * ref[..., 2:]
    per_sample = torch.tensor([float(p) for p in points for _ in range(p)], dtype=F64)[:, None]
    scale = 2.0 if coords == 2 else 1.5 * per_sample
    offsets = scale * (2 * torch.rand(n, q, m, k, 2, generator=gen, dtype=F64) - 1)
    logits = 1.5 * torch.randn(n, q, m, k, generator=gen, dtype=F64)
    return dict(value=value.to(dtype), spatial_shapes=torch.tensor(shapes).view(L, 2),
                level_start_index=torch.tensor(level_start_index(shapes)),
                reference_points=ref.to(ref_dtype or dtype), sampling_offsets=offsets.to(off_dtype or dtype),
                attention_logits=logits.to(logit_dtype or dtype), points=list(points))


def v2_locations_and_weights(prob, offset_scale=0.5):
    """SPEC's fused formulas with points, in PyTorch: per sample k of level l,
    loc = ref_l + off / (W_l, H_l) (2 coordinates) or ref_l[:2] + off / P_l * ref_l[2:] * offset_scale
    (4: D-FINE's and RT-DETRv2's decoders), and one softmax over the K logits."""
    ref, off = prob["reference_points"], prob["sampling_offsets"]
    points = prob["points"]
    level_of = torch.tensor([l for l, p in enumerate(points) for _ in range(p)])
    ref_k = ref[:, :, None, level_of]  # [N, Q, 1, K, 2 or 4]
    if ref.shape[-1] == 2:
        wh = prob["spatial_shapes"].flip(-1).to(off.dtype)[level_of]  # [K, 2]: (W_l, H_l)
        loc = ref_k + off / wh
    else:
        p_k = torch.tensor([float(p) for p in points], dtype=off.dtype)[level_of][:, None]
        loc = ref_k[..., :2] + off / p_k * ref_k[..., 2:] * offset_scale
    return loc, prob["attention_logits"].softmax(-1)


def run_fused_v2(prob, grad=None, sampling="bilinear", offset_scale=0.5, composed=False, cast=None):
    """The fused op, or (composed) ms_deform_attn on v2_locations_and_weights. Returns (output, grads)."""
    leaves = {k: prob[k].detach().to(cast or prob[k].dtype).requires_grad_(grad is not None) for k in FUSED_DIFF}
    if composed:
        loc, weights = v2_locations_and_weights(dict(prob, **leaves), offset_scale)
        out = msda.ms_deform_attn(leaves["value"], prob["spatial_shapes"], prob["level_start_index"], loc, weights,
                                  points=prob["points"], sampling=sampling)
    else:
        out = msda.ms_deform_attn_fused(*(leaves.get(k, prob[k]) for k in FUSED_ARGS), points=prob["points"],
                                        sampling=sampling, offset_scale=offset_scale)
    if grad is None:
        return out.detach(), {}
    return out.detach(), _grads(out, leaves, FUSED_DIFF, grad.to(out.dtype))


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("coords,offset_scale,points", [(4, 0.5, [3, 6, 3]), (4, 0.75, [1, 4, 2]), (4, 0.5, [4, 4, 4]),
                                                        (2, 0.5, [3, 6, 3]), (2, 3.0, [2, 1, 5])],
                         ids=["box-0.5-3_6_3", "box-0.75-1_4_2", "box-0.5-equal", "xy-3_6_3", "xy-scale_ignored"])
def test_fused_equals_the_composition(coords, offset_scale, points, sampling):
    """float64: the fused op equals ms_deform_attn on the locations of SPEC's formula and a softmax
    over K, output and the gradients of value, reference_points, sampling_offsets and
    attention_logits (offset_scale scales box offsets only: two-coordinate offsets are pixels).
    Discrete: no gradient for reference points and offsets."""
    prob = fused_v2_problem(coords=coords, points=points, seed=coords + len(points) + sum(points))
    g = torch.randn(2, 5, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    got = run_fused_v2(prob, g, sampling, offset_scale)
    want = run_fused_v2(prob, g, sampling, offset_scale if coords == 4 else 0.5, composed=True)
    assert_same_results(got, want, FUSED_DIFF, sampling, 1e-12)
    # The locations really spread over and beyond the maps (some samples zero, some clamped).
    loc, _ = v2_locations_and_weights(prob, offset_scale if coords == 4 else 0.5)
    assert ((loc < 0) | (loc > 1)).any() and ((loc > 0) & (loc < 1)).all(-1).float().mean() > 0.25


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_fused_equal_points_is_the_plain_fused_op_bitwise(sampling):
    """The fused op with points=[P]*L on [N, Q, M, L*P, ...] offsets and logits equals it on the
    [N, Q, M, L, P, 2] offsets and [N, Q, M, L*P] logits without points (the same memory)."""
    prob = fused_v2_problem(n=2, q=6, m=2, d=3, points=[3, 3, 3], coords=4, seed=18)
    n, q, m, k, _ = prob["sampling_offsets"].shape
    g = torch.randn(n, q, m * 3, dtype=F64)
    out5, grads5 = run_fused_v2(prob, g, sampling, offset_scale=0.75)
    six = dict(prob, sampling_offsets=prob["sampling_offsets"].view(n, q, m, 3, 3, 2), points=None)
    out6, grads6 = run_fused_v2(six, g, sampling, offset_scale=0.75)
    assert_bitwise(out5, out6, "output")
    for k_ in FUSED_DIFF:
        if sampling == "discrete" and k_ in NO_GRAD_WHEN_DISCRETE:
            assert grads5[k_] is None and grads6[k_] is None, k_
        else:
            assert_bitwise(grads5[k_].reshape(prob[k_].shape), grads6[k_].reshape(prob[k_].shape), k_)


def test_fused_offset_scale_matters_for_boxes():
    """A different offset_scale gives a different result (the argument is not ignored) and 0 puts
    every sample at its box centre."""
    prob = fused_v2_problem(coords=4, seed=12)
    a, _ = run_fused_v2(prob, offset_scale=0.5)
    b, _ = run_fused_v2(prob, offset_scale=0.75)
    assert (a - b).abs().max() > 1e-3
    zero, _ = run_fused_v2(prob, offset_scale=0.0)
    centres = dict(prob, sampling_offsets=torch.zeros_like(prob["sampling_offsets"]))
    assert_rel(zero, run_fused_v2(centres)[0], 1e-14, "offset_scale 0")


# ---- precision and dtypes ------------------------------------------------------------------------

LOW = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)]


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("dtype,tol", LOW, ids=["f32", "bf16_f32", "f16_f32"])
def test_precision_within_spec_bounds(dtype, tol, fused, sampling):
    """A narrow value (bf16/f16 beside f32 locations and weights, as autocast gives them; f32
    throughout) against float64 on the same rounded inputs: the grid-sample baseline for the
    plain op, the float64 composition for the fused one. SPEC: 1e-5 for f32, 1e-2 for bf16/f16,
    output and each gradient, each gradient in its input's dtype."""
    shapes, points = [(12, 15), (6, 8), (3, 4)], [3, 6, 3]
    if fused:
        prob = fused_v2_problem(n=2, q=20, m=4, d=8, shapes=shapes, points=points, coords=4, dtype=dtype,
                                ref_dtype=torch.float32, off_dtype=torch.float32, logit_dtype=torch.float32, seed=21)
        names = FUSED_DIFF
    else:
        prob = v2_problem(n=2, q=20, m=4, d=8, shapes=shapes, points=points, dtype=dtype, loc_dtype=torch.float32,
                          weight_dtype=torch.float32, seed=22)
        names = DIFF
    g = torch.randn(2, 20, 32, dtype=F64, generator=torch.Generator().manual_seed(4))
    if fused:
        got = run_fused_v2(prob, g.to(dtype), sampling)
        want = run_fused_v2(prob, g, sampling, composed=True, cast=F64)
    else:
        got = run_v2(prob, g.to(dtype), "msda", sampling)
        want = run_v2(prob, g, "pytorch", sampling, cast=F64)
    assert got[0].dtype == dtype
    for k in names:
        if got[1][k] is not None:
            assert got[1][k].dtype == prob[k].dtype, k
    assert_same_results(got, want, names, sampling, tol)


def _opcheck_ok(result):
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("mix", MIXES, ids=[_mix_id(m) for m in MIXES])
def test_opcheck(mix, sampling):
    """Every dtype mix of SPEC (value; locations / offsets; weights / logits), both ops, with
    points per level: schema, autograd registration, fake kernel, AOT dispatch."""
    value_dtype, loc_dtype, weight_dtype = mix
    points = [3, 1, 2]
    shapes = [(3, 4), (2, 5), (1, 2)]
    prob = v2_problem(n=2, q=4, m=2, d=3, shapes=shapes, points=points, dtype=value_dtype, loc_dtype=loc_dtype,
                      weight_dtype=weight_dtype, seed=6)
    args = [prob[k].clone().requires_grad_(k in DIFF) for k in ("value", "spatial_shapes", "level_start_index",
                                                               "sampling_locations", "attention_weights")]
    _opcheck_ok(opcheck(torch.ops.msda.ms_deform_attn.default, (*args, None),
                        dict(points=points, sampling=sampling)))
    # The fused op: reference points alternate between f32 and value's dtype (autocast keeps them
    # f32 beside 16-bit offsets), boxes and points alternate with the mix.
    ref_dtype = torch.float32 if loc_dtype == value_dtype else value_dtype
    coords = 4 if MIXES.index(mix) % 2 == 0 else 2
    fprob = fused_v2_problem(n=2, q=4, m=2, d=3, shapes=shapes, points=points, coords=coords, dtype=value_dtype,
                             ref_dtype=ref_dtype, off_dtype=loc_dtype, logit_dtype=weight_dtype, seed=7)
    fargs = [fprob[k].clone().requires_grad_(k in FUSED_DIFF) for k in FUSED_ARGS]
    _opcheck_ok(opcheck(torch.ops.msda.ms_deform_attn_fused.default, fargs,
                        dict(points=points, sampling=sampling, offset_scale=0.75)))


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("n,q", [(0, 4), (2, 0)], ids=["N0", "Q0"])
def test_opcheck_empty(n, q, sampling):
    prob = v2_problem(n=n, q=q, points=[3, 6, 3], dtype=torch.float32, seed=8)
    args = [prob[k].clone().requires_grad_(k in DIFF) for k in ("value", "spatial_shapes", "level_start_index",
                                                               "sampling_locations", "attention_weights")]
    _opcheck_ok(opcheck(torch.ops.msda.ms_deform_attn.default, (*args, None),
                        dict(points=prob["points"], sampling=sampling)))
    fprob = fused_v2_problem(n=n, q=q, points=[3, 6, 3], dtype=torch.float32, seed=9)
    fargs = [fprob[k].clone().requires_grad_(k in FUSED_DIFF) for k in FUSED_ARGS]
    _opcheck_ok(opcheck(torch.ops.msda.ms_deform_attn_fused.default, fargs,
                        dict(points=fprob["points"], sampling=sampling)))


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("mask", [(True, True, True, True), (False, True, False, True)])
def test_opcheck_backward_ops(mask, sampling):
    prob = v2_problem(n=2, q=4, m=2, d=3, points=[3, 6, 3], dtype=torch.float32, seed=10)
    g = torch.randn(2, 4, 6)
    _opcheck_ok(opcheck(torch.ops.msda.ms_deform_attn_backward.default,
                        (g, *(prob[k] for k in ("value", "spatial_shapes", "level_start_index",
                                                "sampling_locations", "attention_weights")), list(mask[:3])),
                        dict(points=prob["points"], sampling=sampling)))
    fprob = fused_v2_problem(n=2, q=4, m=2, d=3, points=[3, 6, 3], dtype=torch.float32, seed=11)
    _opcheck_ok(opcheck(torch.ops.msda.ms_deform_attn_fused_backward.default,
                        (g, *(fprob[k] for k in FUSED_ARGS), list(mask)),
                        dict(points=fprob["points"], sampling=sampling, offset_scale=0.75)))


# ---- torch.compile and torch.export ---------------------------------------------------------

def _named_arguments(node):
    """{argument name: value} of a graph node calling an op (positional and keyword)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.default
    schema = target._schema.arguments
    named = {**dict(zip([a.name for a in schema], node.args)), **node.kwargs}
    # An export graph leaves out trailing arguments equal to their defaults.
    return {a.name: named[a.name] if a.name in named else a.default_value for a in schema}


def _msda_nodes(graph):
    return [n for n in graph.nodes if n.op == "call_function" and "msda.ms_deform_attn" in str(n.target)]


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_compile_fullgraph_equals_eager(fused, sampling):
    """torch.compile(fullgraph=True) (inductor) of a function around the op with points and
    sampling: one graph whose op call carries them, forward and backward equal to eager (and
    no gradient for the locations with discrete sampling)."""
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    if fused:
        prob = fused_v2_problem(coords=4, points=[1, 4, 2], seed=13)
        names = FUSED_DIFF

        def fn(value, reference_points, sampling_offsets, attention_logits):
            out = msda.ms_deform_attn_fused(value * 2, prob["spatial_shapes"], prob["level_start_index"],
                                            reference_points, sampling_offsets, attention_logits, points=[1, 4, 2],
                                            sampling=sampling, offset_scale=0.75)
            return out.tanh()
    else:
        prob = v2_problem(points=[3, 6, 3], seed=14)
        names = DIFF

        def fn(value, sampling_locations, attention_weights):
            out = msda.ms_deform_attn(value * 2, prob["spatial_shapes"], prob["level_start_index"],
                                      sampling_locations, attention_weights.softmax(-1), points=[3, 6, 3],
                                      sampling=sampling)
            return out.tanh()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=recording_inductor)
    g = torch.randn(2, 5, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    results = []
    for f in (fn, compiled):
        leaves = {k: prob[k].clone().requires_grad_() for k in names}
        out = f(*(leaves[k] for k in names))
        results.append((out.detach(), _grads(out, leaves, names, g)))
    torch._dynamo.reset()
    nodes = [n for gm in graphs for n in _msda_nodes(gm.graph)]
    assert len(nodes) == 1, nodes
    arguments = _named_arguments(nodes[0])
    assert list(arguments["points"]) == prob["points"] and arguments["sampling"] == sampling, arguments
    if fused:
        assert arguments["offset_scale"] == 0.75, arguments
    (out, grads), (c_out, c_grads) = results
    torch.testing.assert_close(c_out, out, rtol=1e-10, atol=1e-12)
    for k in names:
        if sampling == "discrete" and k in NO_GRAD_WHEN_DISCRETE:
            assert grads[k] is None and c_grads[k] is None, k
        else:
            torch.testing.assert_close(c_grads[k], grads[k], rtol=1e-10, atol=1e-12, msg=k)


class V2Attention(torch.nn.Module):
    """A decoder attention of D-FINE's kind: offsets and weights projected from the query, box
    reference points, points per level; plain (locations computed here) or fused."""

    def __init__(self, d_model=16, heads=2, points=(3, 6, 3), sampling="bilinear", fused=False, offset_scale=0.5):
        super().__init__()
        self.heads, self.points, self.sampling, self.fused = heads, list(points), sampling, fused
        self.offset_scale = offset_scale
        k = sum(points)
        self.sampling_offsets = torch.nn.Linear(d_model, heads * k * 2)
        self.attention_weights = torch.nn.Linear(d_model, heads * k)
        self.value_proj = torch.nn.Linear(d_model, d_model)
        scale = [1.0 / p for p in points for _ in range(p)]
        self.register_buffer("points_scale", torch.tensor(scale)[:, None])

    def forward(self, query, reference_points, features, spatial_shapes, level_start_index):
        n, q, c = query.shape
        k = sum(self.points)
        value = self.value_proj(features).view(n, features.shape[1], self.heads, c // self.heads)
        off = self.sampling_offsets(query).view(n, q, self.heads, k, 2)
        logits = self.attention_weights(query).view(n, q, self.heads, k)
        if self.fused:
            return msda.ms_deform_attn_fused(value, spatial_shapes, level_start_index, reference_points, off, logits,
                                             points=self.points, sampling=self.sampling,
                                             offset_scale=self.offset_scale)
        # D-FINE's formula, one box per query for every level.
        loc = reference_points[:, :, None, :1, :2] + off * self.points_scale.to(off.dtype) * \
            reference_points[:, :, None, :1, 2:] * self.offset_scale
        return msda.ms_deform_attn(value, spatial_shapes, level_start_index, loc, logits.softmax(-1),
                                   points=self.points, sampling=self.sampling)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_export_keeps_points_and_sampling(fused, sampling):
    torch.manual_seed(0)
    shapes_list = [(6, 7), (3, 4), (2, 2)]
    module = V2Attention(sampling=sampling, fused=fused, offset_scale=0.75).eval()
    n, q = 2, 6
    ref = torch.rand(n, q, 3, 4)
    ref[..., 2:] = 0.1 + 0.4 * ref[..., 2:]
    if not fused:
        ref = ref[:, :, :1].expand(n, q, 3, 4).contiguous()  # the module's formula reads level 0's box
    inputs = (torch.randn(n, q, 16), ref, torch.randn(n, sum(h * w for h, w in shapes_list), 16),
              torch.tensor(shapes_list), torch.tensor(level_start_index(shapes_list)))
    program = torch.export.export(module, inputs)
    nodes = _msda_nodes(program.graph)
    assert len(nodes) == 1, [str(n.target) for n in program.graph.nodes]
    want_op = "msda.ms_deform_attn_fused.default" if fused else "msda.ms_deform_attn.default"
    assert str(nodes[0].target) == want_op
    arguments = _named_arguments(nodes[0])
    assert list(arguments["points"]) == [3, 6, 3] and arguments["sampling"] == sampling, arguments
    if fused:
        assert arguments["offset_scale"] == 0.75
    with torch.no_grad():
        want = module(*inputs)
        torch.testing.assert_close(program.module()(*inputs), want, rtol=0, atol=0)
        other = (torch.randn(n, q, 16), *inputs[1:])  # other queries: the graph is not a constant
        torch.testing.assert_close(program.module()(*other), module(*other), rtol=0, atol=0)
    assert want.abs().sum() > 0


# ---- bad input -----------------------------------------------------------------------------------

def _plain_args(prob):
    return [prob[k] for k in ("value", "spatial_shapes", "level_start_index", "sampling_locations",
                              "attention_weights")]


def _six_d(t, levels):
    return t.view(*t.shape[:3], levels, t.shape[3] // levels, *t.shape[4:])


# (id, op "plain"/"fused", changes to the inputs, keyword arguments, accepted names in the message)
BAD = [
    ("points_too_few", "plain", {}, dict(points=[7, 5]), ("points",)),
    ("points_too_many", "plain", {}, dict(points=[3, 3, 3, 3]), ("points",)),
    ("points_zero", "plain", {}, dict(points=[3, 0, 9]), ("points",)),
    ("points_negative", "plain", {}, dict(points=[3, -1, 10]), ("points",)),
    ("points_sum", "plain", {}, dict(points=[3, 6, 4]), ("points", "sampling_locations")),
    ("points_sum_weights", "plain", dict(attention_weights=lambda w: w[..., :-1]), dict(points=[3, 6, 3]),
     ("attention_weights",)),
    ("six_d_with_points", "plain", dict(sampling_locations=lambda t: _six_d(t, 3), attention_weights=lambda t: _six_d(t, 3)),
     dict(points=[4, 4, 4]), ("sampling_locations",)),
    ("five_d_without_points", "plain", {}, {}, ("sampling_locations",)),
    ("sampling_unknown", "plain", {}, dict(points=[3, 6, 3], sampling="nearest"), ("sampling",)),
    ("sampling_case", "plain", {}, dict(points=[3, 6, 3], sampling="Discrete"), ("sampling",)),
    ("sampling_default", "plain", {}, dict(points=[3, 6, 3], sampling="default"), ("sampling",)),
    ("sampling_unknown_6d", "plain", dict(sampling_locations=lambda t: _six_d(t, 3), attention_weights=lambda t: _six_d(t, 3)),
     dict(sampling="nearest"), ("sampling",)),
    ("fused_points_count", "fused", {}, dict(points=[6, 6]), ("points",)),
    ("fused_points_zero", "fused", {}, dict(points=[0, 6, 6]), ("points",)),
    ("fused_points_sum", "fused", {}, dict(points=[3, 6, 2]), ("points", "sampling_offsets")),
    ("fused_logits_K", "fused", dict(attention_logits=lambda t: t[..., 1:]), dict(points=[3, 6, 3]),
     ("attention_logits",)),
    ("fused_six_d_with_points", "fused", dict(sampling_offsets=lambda t: _six_d(t, 3),
                                              attention_logits=lambda t: t.view(*t.shape[:3], 3, 4).flatten(3)),
     dict(points=[4, 4, 4]), ("sampling_offsets",)),
    ("fused_sampling", "fused", {}, dict(points=[3, 6, 3], sampling="bicubic"), ("sampling",)),
    ("fused_offset_scale_nan", "fused", {}, dict(points=[3, 6, 3], offset_scale=float("nan")), ("offset_scale",)),
    ("fused_offset_scale_inf", "fused", {}, dict(points=[3, 6, 3], offset_scale=float("inf")), ("offset_scale",)),
    ("fused_offset_scale_-inf", "fused", {}, dict(offset_scale=float("-inf"), points=[3, 6, 3],
                                                  sampling="discrete"), ("offset_scale",)),
]


def _bad_call(op, changes, kwargs, to=None):
    """The op's arguments with changes applied, moved to fake tensors or the meta device (to)."""
    prob = v2_problem(n=2, q=3, points=[4, 4, 4], seed=15) if op == "plain" else \
        fused_v2_problem(n=2, q=3, points=[4, 4, 4], coords=4, seed=15)
    for k, f in changes.items():
        prob[k] = f(prob[k])
    args = _plain_args(prob) if op == "plain" else [prob[k] for k in FUSED_ARGS]
    if to is not None:
        args = [to(t) for t in args]
    if op == "plain":
        return [(torch.ops.msda.ms_deform_attn, (*args, None)), (msda.ms_deform_attn, tuple(args))], kwargs
    return [(torch.ops.msda.ms_deform_attn_fused, tuple(args)), (msda.ms_deform_attn_fused, tuple(args))], kwargs


@pytest.mark.parametrize("mode", ["eager", "fake", "meta"])
@pytest.mark.parametrize("name,op,changes,kwargs,names", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(name, op, changes, kwargs, names, mode):
    """A ValueError naming the argument, from the real kernel (eager) and from the fake kernel that
    torch.compile and torch.export trace with (FakeTensorMode, the meta device)."""
    to, context = None, None
    if mode == "fake":
        context = FakeTensorMode()
        to = context.from_tensor
    elif mode == "meta":
        def to(t):
            return t.to("meta")
    calls, kwargs = _bad_call(op, changes, kwargs, to)
    for fn, args in calls:
        with pytest.raises(ValueError) as e:
            if context is not None:
                with context:
                    fn(*args, **kwargs)
            else:
                fn(*args, **kwargs)
        _check_message(e.value, names)


@pytest.mark.parametrize("name,op,changes,kwargs,names", [b for b in BAD if b[1] == "plain" and "points" in b[3]],
                         ids=[b[0] for b in BAD if b[1] == "plain" and "points" in b[3]])
def test_bad_input_backward_op(name, op, changes, kwargs, names):
    """The backward op checks points and sampling as the forward does."""
    calls, kwargs = _bad_call(op, changes, kwargs)
    args = calls[0][1][:-1]
    g = torch.zeros(2, 3, 8, dtype=F64)
    with pytest.raises(ValueError) as e:
        torch.ops.msda.ms_deform_attn_backward(g, *args, [True, True, True], **kwargs)
    _check_message(e.value, names)


def test_offset_scale_free_with_two_coordinates():
    """offset_scale only enters the box formula: any value, non-finite included, is legal (and
    has no effect) with two-coordinate reference points."""
    prob = fused_v2_problem(coords=2, seed=16)
    want, _ = run_fused_v2(prob)
    for scale in (float("nan"), float("inf"), -3.0, 0.0):
        assert_bitwise(run_fused_v2(prob, offset_scale=scale)[0], want, f"offset_scale {scale}")


def test_compile_rejects_bad_points_at_trace_time():
    """torch.compile traces with the fake kernel: a sum of points that disagrees with the
    locations fails while tracing, naming the argument."""
    prob = v2_problem(n=2, q=3, points=[3, 6, 3], dtype=torch.float32, seed=17)
    fn = torch.compile(lambda *a: msda.ms_deform_attn(*a, points=[3, 6, 4]), fullgraph=True, backend="eager")
    torch._dynamo.reset()
    with pytest.raises(Exception) as e:
        fn(*_plain_args(prob))
    torch._dynamo.reset()
    assert "sampling_locations" in str(e.value) and "expected" in str(e.value), str(e.value)
