"""msda.ms_deform_attn against the grid-sample baseline msda.ms_deform_attn_pytorch: forward and
the three gradients, float64 and float32, on ordinary and edge shapes; int32 index tensors and
non-contiguous inputs give the same results as the contiguous int64 case."""
import zlib

import pytest
import torch

import msda
from conftest import (DIFF_KEYS, assert_bitwise, assert_rel, grad_output_for, make_problem, run_op)

# (id, kwargs of make_problem)
CASES = [
    ("basic", dict(n=2, q=5, m=2, d=4, shapes=[(3, 4), (2, 5)], p=3)),
    ("map1x1", dict(n=1, q=6, m=2, d=3, shapes=[(1, 1)], p=2)),
    ("map1xW", dict(n=2, q=4, m=1, d=5, shapes=[(1, 7)], p=3)),
    ("mapHx1", dict(n=2, q=4, m=3, d=2, shapes=[(6, 1)], p=3)),
    ("mixed_degenerate", dict(n=1, q=7, m=2, d=4, shapes=[(1, 1), (1, 5), (4, 1), (3, 3)], p=2)),
    ("D1", dict(n=2, q=5, m=3, d=1, shapes=[(4, 3), (2, 2)], p=2)),
    ("D3", dict(n=1, q=5, m=2, d=3, shapes=[(5, 4)], p=4)),
    ("D17", dict(n=2, q=3, m=2, d=17, shapes=[(4, 6), (2, 3)], p=2)),
    ("one_level", dict(n=2, q=8, m=4, d=8, shapes=[(7, 9)], p=4)),
    ("five_levels", dict(n=1, q=6, m=2, d=4, shapes=[(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)], p=4)),
    ("P1", dict(n=2, q=6, m=2, d=4, shapes=[(5, 5), (3, 2)], p=1)),
    ("P8", dict(n=1, q=4, m=2, d=4, shapes=[(5, 6), (3, 3)], p=8)),
    ("N4", dict(n=4, q=3, m=2, d=6, shapes=[(4, 4), (2, 2)], p=2)),
    ("M8_D32", dict(n=1, q=10, m=8, d=32, shapes=[(10, 13), (5, 7), (3, 4), (2, 2)], p=4)),
    ("many_queries_small_map", dict(n=2, q=200, m=2, d=4, shapes=[(2, 3), (1, 2)], p=4)),
    ("outside", dict(n=2, q=10, m=2, d=5, shapes=[(4, 5), (2, 3), (1, 1)], p=4, lo=-0.2, hi=1.2)),
    ("outside_1xW_Hx1", dict(n=2, q=10, m=2, d=3, shapes=[(1, 6), (5, 1)], p=3, lo=-0.2, hi=1.2)),
    ("far_outside", dict(n=1, q=10, m=2, d=3, shapes=[(3, 3)], p=3, lo=-3.0, hi=4.0)),
]


def _check(prob, dtype, tol, seed):
    g = grad_output_for(prob, seed=seed, dtype=torch.float64)
    # Reference: the grid-sample baseline on float64 copies of the same (rounded) inputs.
    ref_out, ref_grads = run_op(prob, g, kernel="pytorch", cast=torch.float64)
    out, grads = run_op(prob, g.to(dtype), kernel="msda")
    assert out.dtype == dtype
    n, q, m, d = prob["value"].shape[0], prob["sampling_locations"].shape[1], *prob["value"].shape[2:]
    assert out.shape == (n, q, m * d)
    assert ref_out.norm() > 0
    assert_rel(out, ref_out, tol, "output")
    for k in DIFF_KEYS:
        assert grads[k].dtype == prob[k].dtype, k
        assert grads[k].shape == prob[k].shape, k
        assert ref_grads[k].norm() > 0, k
        assert_rel(grads[k], ref_grads[k], tol, "grad " + k)


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_float64_matches_grid_sample(name, kw):
    prob = make_problem(dtype=torch.float64, seed=zlib.crc32(name.encode()) % 1000, **kw)
    _check(prob, torch.float64, 1e-10, seed=7)


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_float32_matches_grid_sample(name, kw):
    prob = make_problem(dtype=torch.float32, seed=zlib.crc32(name.encode()) % 1000 + 1, **kw)
    _check(prob, torch.float32, 1e-5, seed=8)


def test_float32_against_float32_baseline():
    """The f32 op and the f32 grid-sample baseline agree with each other too."""
    prob = make_problem(n=2, q=20, m=4, d=8, shapes=[(12, 15), (6, 8), (3, 4)], p=4, dtype=torch.float32,
                        lo=-0.1, hi=1.1, seed=3)
    g = grad_output_for(prob, seed=4)
    out_a, grads_a = run_op(prob, g, kernel="msda")
    out_b, grads_b = run_op(prob, g, kernel="pytorch")
    assert_rel(out_a, out_b, 1e-5, "output")
    for k in DIFF_KEYS:
        assert_rel(grads_a[k], grads_b[k], 1e-5, k)


def test_explicit_small_example():
    """A hand-computed value: one level 2x2, one sample at the map centre averages the 4 pixels,
    one sample at pixel (h=1, w=0) centre returns that pixel."""
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    shapes = torch.tensor([[2, 2]])
    starts = torch.tensor([0])
    loc = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64).view(1, 2, 1, 1, 1, 2)
    w = torch.tensor([2.0, -1.0], dtype=torch.float64).view(1, 2, 1, 1, 1)
    out = msda.ms_deform_attn(value, shapes, starts, loc, w)
    # Row of (h, w) = h*W + w: (1, 0) -> row 2 -> value 3.
    assert torch.allclose(out.view(-1), torch.tensor([2.0 * 2.5, -1.0 * 3.0], dtype=torch.float64), rtol=0, atol=1e-14)


def test_int32_index_tensors_same_result():
    prob = make_problem(n=2, q=9, m=2, d=5, shapes=[(5, 6), (3, 3), (1, 2)], p=3, lo=-0.1, hi=1.1, seed=11)
    g = grad_output_for(prob)
    out64, grads64 = run_op(prob, g)
    prob32 = dict(prob, spatial_shapes=prob["spatial_shapes"].int(), level_start_index=prob["level_start_index"].int())
    assert prob32["spatial_shapes"].dtype == torch.int32
    out32, grads32 = run_op(prob32, g)
    assert_bitwise(out32, out64, "output")
    for k in DIFF_KEYS:
        assert_bitwise(grads32[k], grads64[k], k)
    # Mixed: int32 shapes with int64 starts and vice versa.
    for mixed in (dict(prob, spatial_shapes=prob32["spatial_shapes"]),
                  dict(prob, level_start_index=prob32["level_start_index"])):
        out, _ = run_op(mixed)
        assert_bitwise(out, out64, "mixed index dtypes")


def _noncontiguous_views(prob, gen):
    """Non-contiguous tensors holding the same numbers as prob's (built from larger or permuted
    storage), each a view of a leaf that requires grad."""
    v = prob["value"]
    n, s, m, d = v.shape
    # value: a transposed view of [N, M, S, D] storage, then every other channel of a 2D-wide copy.
    v_base = v.permute(0, 2, 1, 3).contiguous().clone().requires_grad_()
    v_view = v_base.permute(0, 2, 1, 3)
    assert not v_view.is_contiguous()
    loc = prob["sampling_locations"]
    # locations: stored as [..., 2, P] and transposed, then a strided slice along Q.
    wide = torch.randn(loc.shape[0], 2 * loc.shape[1], *loc.shape[2:4], 2, loc.shape[4], generator=gen,
                       dtype=loc.dtype)
    wide[:, ::2] = loc.transpose(-1, -2)
    l_base = wide.clone().requires_grad_()
    l_view = l_base[:, ::2].transpose(-1, -2)
    assert not l_view.is_contiguous()
    w = prob["attention_weights"]
    # weights: a slice of the channel-last layout [N, Q, M, P, L] transposed, padded in P.
    wbase = torch.randn(*w.shape[:3], w.shape[4] + 3, w.shape[3], generator=gen, dtype=w.dtype)
    wbase[:, :, :, 1:1 + w.shape[4]] = w.transpose(-1, -2)
    w_base = wbase.clone().requires_grad_()
    w_view = w_base[:, :, :, 1:1 + w.shape[4]].transpose(-1, -2)
    assert not w_view.is_contiguous()
    return v_view, l_view, w_view


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_noncontiguous_inputs_same_result(dtype):
    prob = make_problem(n=2, q=7, m=3, d=4, shapes=[(4, 5), (2, 3)], p=3, dtype=dtype, lo=-0.1, hi=1.1, seed=5)
    gen = torch.Generator().manual_seed(123)
    g = grad_output_for(prob)
    out_c, grads_c = run_op(prob, g)

    v_view, l_view, w_view = _noncontiguous_views(prob, gen)
    assert torch.equal(v_view, prob["value"]) and torch.equal(l_view, prob["sampling_locations"])
    assert torch.equal(w_view, prob["attention_weights"])
    # Non-contiguous index tensors as well.
    shapes_nc = prob["spatial_shapes"].t().contiguous().t()
    starts_nc = torch.stack([prob["level_start_index"], prob["level_start_index"]], -1)[:, 1]
    assert not shapes_nc.is_contiguous() and not starts_nc.is_contiguous()
    # grad_output: transposed storage.
    g_nc = g.transpose(1, 2).contiguous().transpose(1, 2)
    assert not g_nc.is_contiguous() and torch.equal(g_nc, g)

    out = msda.ms_deform_attn(v_view, shapes_nc, starts_nc, l_view, w_view)
    assert_bitwise(out.detach(), out_c, "output")
    grads = torch.autograd.grad(out, [v_view, l_view, w_view], g_nc)
    for k, gr in zip(DIFF_KEYS, grads):
        assert gr.shape == prob[k].shape
        assert_bitwise(gr, grads_c[k], k)


def test_expanded_stride0_inputs():
    """Broadcast (stride-0) views: one set of weights and locations shared across the batch."""
    prob = make_problem(n=1, q=6, m=2, d=3, shapes=[(3, 4)], p=2, seed=9)
    n = 3
    v = torch.randn(n, *prob["value"].shape[1:], dtype=torch.float64)
    loc = prob["sampling_locations"].expand(n, -1, -1, -1, -1, -1)
    w = prob["attention_weights"].expand(n, -1, -1, -1, -1)
    out = msda.ms_deform_attn(v, prob["spatial_shapes"], prob["level_start_index"], loc, w)
    ref = msda.ms_deform_attn(v, prob["spatial_shapes"], prob["level_start_index"], loc.contiguous(), w.contiguous())
    assert_bitwise(out, ref, "output")


def test_grid_sample_baseline_matches_spec_formula():
    """Sanity check of the baseline itself against a direct loop over SPEC's forward formula."""
    prob = make_problem(n=1, q=3, m=2, d=2, shapes=[(3, 4), (2, 1)], p=2, lo=-0.2, hi=1.2, seed=21)
    v, loc, a = prob["value"], prob["sampling_locations"], prob["attention_weights"]
    shapes = prob["spatial_shapes"].tolist()
    starts = prob["level_start_index"].tolist()
    n, q, m, L, p, _ = loc.shape
    d = v.shape[3]
    ref = torch.zeros(n, q, m, d, dtype=torch.float64)
    for nn_ in range(n):
        for qq in range(q):
            for mm in range(m):
                for l, (H, W) in enumerate(shapes):
                    for pp in range(p):
                        x, y = loc[nn_, qq, mm, l, pp].tolist()
                        u, vv = x * W - 0.5, y * H - 0.5
                        if not (vv > -1 and u > -1 and vv < H and u < W):
                            continue
                        h0, w0 = int(torch.floor(torch.tensor(vv))), int(torch.floor(torch.tensor(u)))
                        lh, lw = vv - h0, u - w0
                        for hh, ww, wt in ((h0, w0, (1 - lh) * (1 - lw)), (h0, w0 + 1, (1 - lh) * lw),
                                           (h0 + 1, w0, lh * (1 - lw)), (h0 + 1, w0 + 1, lh * lw)):
                            if 0 <= hh < H and 0 <= ww < W:
                                ref[nn_, qq, mm] += a[nn_, qq, mm, l, pp] * wt * v[nn_, starts[l] + hh * W + ww, mm]
    ref = ref.view(n, q, m * d)
    assert_rel(msda.ms_deform_attn_pytorch(v, prob["spatial_shapes"], loc, a), ref, 1e-12, "baseline")
    assert_rel(msda.ms_deform_attn(v, prob["spatial_shapes"], prob["level_start_index"], loc, a), ref, 1e-12, "op")
