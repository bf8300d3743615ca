"""msda.MSDeformAttn against an independent re-implementation of Deformable DETR's MSDeformAttn
(written here from the paper's / reference code's public description, on the grid-sample path):
state_dict compatibility, outputs and gradients with padding masks and 2-/4-coordinate reference
points, Deformable DETR's initialisation, and a few training steps with either kernel."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msda
from conftest import assert_rel, level_start_index


class RefMSDeformAttn(nn.Module):
    """Deformable DETR's MSDeformAttn, re-derived: offsets in pixels of each level for 2-coordinate
    reference points, fractions of half the box (spread over the points) for 4-coordinate ones."""

    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        N, Lq, C = query.shape
        _, Lin, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask.unsqueeze(-1), 0.0)
        value = value.reshape(N, Lin, M, C // M)
        off = self.sampling_offsets(query).reshape(N, Lq, M, L, P, 2)
        aw = self.attention_weights(query).reshape(N, Lq, M, L * P).softmax(dim=-1).reshape(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            loc = torch.empty_like(off)
            for l in range(L):
                h, w = (int(x) for x in input_spatial_shapes[l])
                scale = torch.tensor([w, h], dtype=off.dtype)
                loc[:, :, :, l] = reference_points[:, :, None, l, None, :] + off[:, :, :, l] / scale
        else:
            centre = reference_points[:, :, None, :, None, :2]
            size = reference_points[:, :, None, :, None, 2:]
            loc = centre + off / P * size * 0.5
        out = msda.ms_deform_attn_pytorch(value, input_spatial_shapes, loc, aw)
        return self.output_proj(out)


def _setup(ref_coords, dtype, seed=0, n=2, q=7, d_model=16, heads=4, levels=((6, 7), (3, 4), (2, 2)), points=3,
           mask=True):
    torch.manual_seed(seed)
    shapes = torch.tensor(levels)
    starts = torch.tensor(level_start_index(levels))
    S = sum(h * w for h, w in levels)
    L = len(levels)
    mod = msda.MSDeformAttn(d_model=d_model, n_levels=L, n_heads=heads, n_points=points).to(dtype)
    with torch.no_grad():  # move away from the init so that offsets and weights depend on the query
        for p in mod.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ref = RefMSDeformAttn(d_model, L, heads, points).to(dtype)
    ref.load_state_dict(mod.state_dict(), strict=True)
    query = torch.randn(n, q, d_model, dtype=dtype)
    feats = torch.randn(n, S, d_model, dtype=dtype)
    if ref_coords == 2:
        refp = torch.rand(n, q, L, 2, dtype=dtype)
    else:
        refp = torch.cat([torch.rand(n, q, L, 2, dtype=dtype), 0.05 + 0.5 * torch.rand(n, q, L, 2, dtype=dtype)], -1)
    pad = None
    if mask:
        pad = torch.zeros(n, S, dtype=torch.bool)
        pad[0, -5:] = True
        pad[-1, 3:9] = True
    return mod, ref, (query, refp, feats, shapes, starts, pad)


def _forward_backward(module, args, g):
    query, refp, feats, shapes, starts, pad = args
    query = query.clone().requires_grad_()
    refp = refp.clone().requires_grad_()
    feats = feats.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(query, refp, feats, shapes, starts, pad)
    out.backward(g)
    grads = {"query": query.grad, "reference_points": refp.grad, "input_flatten": feats.grad}
    grads.update({"param " + k: p.grad for k, p in module.named_parameters()})
    return out.detach(), grads


def test_state_dict_round_trip():
    mod = msda.MSDeformAttn(d_model=32, n_levels=4, n_heads=8, n_points=4)
    ref = RefMSDeformAttn(32, 4, 8, 4)
    assert set(mod.state_dict()) == set(ref.state_dict())
    for k, t in ref.state_dict().items():
        assert mod.state_dict()[k].shape == t.shape, k
    ref.load_state_dict(mod.state_dict(), strict=True)
    for k, t in mod.state_dict().items():
        assert torch.equal(ref.state_dict()[k], t), k
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    mod.load_state_dict(ref.state_dict(), strict=True)
    for k, t in ref.state_dict().items():
        assert torch.equal(mod.state_dict()[k], t), k


def test_default_constructor_is_deformable_detr_size():
    mod = msda.MSDeformAttn()
    shapes = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256), "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256), "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256), "value_proj.bias": (256,),
        "output_proj.weight": (256, 256), "output_proj.bias": (256,),
    }


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("ref_coords", [2, 4])
@pytest.mark.parametrize("kernel", ["msda", "msda-unfused", "pytorch"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_module_matches_reimplementation(dtype, tol, kernel, ref_coords, mask):
    mod, ref, args = _setup(ref_coords, dtype, seed=ref_coords + 10 * mask, mask=mask)
    mod.kernel = kernel
    g = torch.randn(args[0].shape, dtype=dtype)
    out, grads = _forward_backward(mod, args, g)
    if dtype == torch.float64:
        ref_out, ref_grads = _forward_backward(ref, args, g)
    else:  # compare the f32 module with the f64 reimplementation on the same numbers
        ref64 = copy.deepcopy(ref).double()
        args64 = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        ref_out, ref_grads = _forward_backward(ref64, args64, g.double())
    assert out.dtype == dtype and out.shape == args[0].shape
    assert_rel(out, ref_out, tol, "output")
    assert set(grads) == set(ref_grads)
    for k in grads:
        assert grads[k] is not None, k
        if ref_grads[k].norm() == 0:
            assert grads[k].norm() == 0, k
        else:
            assert_rel(grads[k], ref_grads[k], tol, k)


def test_padding_mask_matters_and_masked_rows_get_no_gradient():
    mod, _, args = _setup(2, torch.float64, seed=3)
    query, refp, feats, shapes, starts, pad = args
    feats = feats.clone().requires_grad_()
    out = mod(query, refp, feats, shapes, starts, pad)
    out.sum().backward()
    assert (feats.grad[pad] == 0).all()
    assert feats.grad[~pad].abs().sum() > 0
    out_nomask = mod(query, refp, feats, shapes, starts, None)
    assert not torch.allclose(out, out_nomask)


def test_kernel_attribute_selects_path(monkeypatch):
    mod, _, args = _setup(2, torch.float64, seed=4)
    calls = []
    real_fused, real_op, real_pt = (msda.modules.ms_deform_attn_fused, msda.modules.ms_deform_attn,
                                    msda.modules.ms_deform_attn_pytorch)
    monkeypatch.setattr(msda.modules, "ms_deform_attn_fused",
                        lambda *a, **k: calls.append("msda") or real_fused(*a, **k))
    monkeypatch.setattr(msda.modules, "ms_deform_attn",
                        lambda *a, **k: calls.append("msda-unfused") or real_op(*a, **k))
    monkeypatch.setattr(msda.modules, "ms_deform_attn_pytorch",
                        lambda *a, **k: calls.append("pytorch") or real_pt(*a, **k))
    assert mod.kernel == "msda"  # the default: the fused op
    mod(*args)
    mod.kernel = "msda-unfused"
    mod(*args)
    mod.kernel = "pytorch"
    mod(*args)
    assert calls == ["msda", "msda-unfused", "pytorch"]


def test_reference_points_bad_last_dim():
    mod, _, (query, refp, feats, shapes, starts, pad) = _setup(2, torch.float64, seed=5)
    with pytest.raises(ValueError):
        mod(query, torch.rand(*refp.shape[:-1], 3, dtype=torch.float64), feats, shapes, starts, pad)


def test_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError):
        msda.MSDeformAttn(d_model=30, n_levels=2, n_heads=8, n_points=4)


@pytest.mark.parametrize("heads,levels,points", [(8, 4, 4), (6, 3, 2), (3, 1, 5), (1, 2, 1), (12, 2, 3)])
def test_initialisation_is_deformable_detrs(heads, levels, points):
    d_model = 4 * heads
    torch.manual_seed(0)
    mod = msda.MSDeformAttn(d_model=d_model, n_levels=levels, n_heads=heads, n_points=points)
    assert torch.equal(mod.sampling_offsets.weight, torch.zeros_like(mod.sampling_offsets.weight))
    bias = mod.sampling_offsets.bias.detach().view(heads, levels, points, 2).double()
    # The ray grid, computed independently in float64 with math.
    expected = torch.empty(heads, levels, points, 2, dtype=torch.float64)
    for h in range(heads):
        theta = 2.0 * math.pi * h / heads
        c, s = math.cos(theta), math.sin(theta)
        top = max(abs(c), abs(s))
        for l in range(levels):
            for k in range(points):
                expected[h, l, k] = torch.tensor([c / top * (k + 1), s / top * (k + 1)])
    assert torch.allclose(bias, expected, rtol=0, atol=1e-5), (bias - expected).abs().max()
    # Spot checks: head 0 points right, k+1 pixels out; with 8 heads head 1 is the diagonal (1, 1).
    assert torch.allclose(bias[0, :, :, 0], torch.arange(1, points + 1, dtype=torch.float64).expand(levels, -1))
    if heads == 8:
        assert torch.allclose(bias[1, 0, 0], torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-6)
        assert torch.allclose(bias[2, 0, 1], torch.tensor([0.0, 2.0], dtype=torch.float64), atol=1e-6)
    for lin in (mod.attention_weights,):
        assert torch.equal(lin.weight, torch.zeros_like(lin.weight))
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    for lin in (mod.value_proj, mod.output_proj):
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        bound = math.sqrt(6.0 / (2 * d_model))  # xavier_uniform_, square matrix
        assert lin.weight.abs().max() <= bound + 1e-7
        assert lin.weight.abs().max() > 0.5 * bound  # really drawn, not zeros or tiny
        assert lin.weight.std() > 0.4 * bound / math.sqrt(3)
    for p in mod.parameters():
        assert p.dtype == torch.float32 and p.requires_grad


def test_initial_module_samples_the_ray_grid():
    """With Deformable DETR's init the weights are uniform (1 / (L*P)) and the locations are the
    reference point plus the ray grid in pixels: check the module through the reimplementation
    and through a direct construction of the op's inputs."""
    torch.manual_seed(1)
    levels = [(8, 10), (4, 5)]
    shapes, starts = torch.tensor(levels), torch.tensor(level_start_index(levels))
    S = sum(h * w for h, w in levels)
    mod = msda.MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2).double()
    query = torch.randn(1, 3, 16, dtype=torch.float64)
    feats = torch.randn(1, S, 16, dtype=torch.float64)
    refp = torch.rand(1, 3, 2, 2, dtype=torch.float64)
    out = mod(query, refp, feats, shapes, starts)
    value = mod.value_proj(feats).view(1, S, 4, 4)
    grid = mod.sampling_offsets.bias.view(4, 2, 2, 2)
    wh = torch.tensor([[10.0, 8.0], [5.0, 4.0]], dtype=torch.float64)
    loc = refp[:, :, None, :, None, :] + grid[None, None] / wh[None, None, None, :, None, :]
    weights = torch.full((1, 3, 4, 2, 2), 0.25, dtype=torch.float64)
    expected = mod.output_proj(msda.ms_deform_attn_pytorch(value, shapes, loc, weights))
    assert_rel(out, expected, 1e-12, "init output")


class TinyNet(nn.Module):
    def __init__(self, in_dim, d_model, levels, heads, points):
        super().__init__()
        self.embed = nn.Linear(in_dim, d_model)
        self.attn = msda.MSDeformAttn(d_model=d_model, n_levels=levels, n_heads=heads, n_points=points)
        self.head = nn.Linear(d_model, 1)

    def forward(self, feats, query_feats, refp, shapes, starts, pad):
        return self.head(self.attn(self.embed(query_feats), refp, self.embed(feats), shapes, starts, pad)).squeeze(-1)


@pytest.mark.parametrize("ref_coords", [2, 4])
def test_sgd_steps_same_losses_with_either_kernel(ref_coords):
    torch.manual_seed(42)
    levels = [(8, 9), (4, 5), (2, 3)]
    shapes, starts = torch.tensor(levels), torch.tensor(level_start_index(levels))
    S = sum(h * w for h, w in levels)
    n, q, in_dim = 3, 10, 6
    net = TinyNet(in_dim, 16, len(levels), 4, 3).double()
    feats = torch.randn(n, S, in_dim, dtype=torch.float64)
    qf = torch.randn(n, q, in_dim, dtype=torch.float64)
    if ref_coords == 2:
        refp = torch.rand(n, q, len(levels), 2, dtype=torch.float64)
    else:
        refp = torch.cat([torch.rand(n, q, len(levels), 2), 0.1 + 0.4 * torch.rand(n, q, len(levels), 2)],
                         -1).double()
    pad = torch.zeros(n, S, dtype=torch.bool)
    pad[1, -7:] = True
    target = torch.randn(n, q, dtype=torch.float64)

    def train(kernel):
        model = copy.deepcopy(net)
        model.attn.kernel = kernel
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = F.mse_loss(model(feats, qf, refp, shapes, starts, pad), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model

    losses_a, model_a = train("msda")
    losses_b, model_b = train("pytorch")
    assert losses_a[-1] < losses_a[0]  # it trains
    # The attention's own parameters moved (the offsets get a real gradient).
    assert not torch.equal(model_a.attn.sampling_offsets.weight, net.attn.sampling_offsets.weight)
    for a, b in zip(losses_a, losses_b):
        assert abs(a - b) <= 1e-9 * abs(b), (losses_a, losses_b)
    for (k, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert_rel(pa, pb, 1e-9, k)
