"""Shared helpers for the msda PyTorch-binding tests.

Run from the repository root after the build:
    PYTHONPATH=build/python .venv/bin/python -m pytest tests/python
"""
import math

import pytest
import torch

import msda


def level_start_index(shapes):
    """level_start_index of SPEC for a list of (H, W)."""
    starts, s = [], 0
    for h, w in shapes:
        starts.append(s)
        s += h * w
    return starts


def away_from_integer_pixels(loc, shapes, margin=1e-3):
    """Boolean mask [N, Q, M, L, P]: True where both pixel coordinates x*W-0.5 and y*H-0.5
    are at least `margin` away from an integer (where the bilinear form has a kink)."""
    ok = torch.ones(loc.shape[:-1], dtype=torch.bool)
    for l, (h, w) in enumerate(shapes):
        for c, size in ((0, w), (1, h)):
            u = loc[:, :, :, l, :, c].double() * size - 0.5
            frac = u - torch.floor(u)
            ok[:, :, :, l, :] &= (frac > margin) & (frac < 1 - margin)
    return ok


def make_problem(n=2, q=5, m=2, d=4, shapes=((3, 4), (2, 5)), p=3, dtype=torch.float64,
                 loc_dtype=None, weight_dtype=None, lo=0.0, hi=1.0, seed=0, avoid_integers=False,
                 index_dtype=torch.int64):
    """Random inputs of the op. Values are drawn in float64 and then cast, so the same seed gives
    the same (rounded) problem in every dtype."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [tuple(s) for s in shapes]
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(n, S, m, d, generator=gen, dtype=torch.float64)
    loc = lo + (hi - lo) * torch.rand(n, q, m, L, p, 2, generator=gen, dtype=torch.float64)
    if avoid_integers:
        for _ in range(100):
            bad = ~away_from_integer_pixels(loc, shapes)
            if not bad.any():
                break
            fresh = lo + (hi - lo) * torch.rand(loc.shape, generator=gen, dtype=torch.float64)
            loc = torch.where(bad[..., None], fresh, loc)
        assert away_from_integer_pixels(loc, shapes).all()
    logits = torch.randn(n, q, m, L * p, generator=gen, dtype=torch.float64)
    weights = torch.softmax(logits, -1).view(n, q, m, L, p)
    return dict(
        value=value.to(dtype),
        spatial_shapes=torch.tensor(shapes, dtype=index_dtype).view(L, 2),
        level_start_index=torch.tensor(level_start_index(shapes), dtype=index_dtype),
        sampling_locations=loc.to(loc_dtype or dtype),
        attention_weights=weights.to(weight_dtype or dtype),
    )


def grad_output_for(prob, seed=1, dtype=None):
    v = prob["value"]
    n, _, m, d = v.shape
    q = prob["sampling_locations"].shape[1]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, q, m * d, generator=gen, dtype=torch.float64).to(dtype or v.dtype)


DIFF_KEYS = ("value", "sampling_locations", "attention_weights")


def run_op(prob, grad_output=None, kernel="msda", cast=None):
    """Forward (and backward with grad_output) of the op or of the grid-sample baseline.
    cast: a dtype the differentiable inputs (and grad_output) are converted to first.
    Returns (output, dict of gradients)."""
    inputs = {}
    for k in DIFF_KEYS:
        t = prob[k].detach()
        if cast is not None:
            t = t.to(cast)
        inputs[k] = t.requires_grad_(grad_output is not None)
    if kernel == "msda":
        out = msda.ms_deform_attn(inputs["value"], prob["spatial_shapes"], prob["level_start_index"],
                                  inputs["sampling_locations"], inputs["attention_weights"])
    else:
        out = msda.ms_deform_attn_pytorch(inputs["value"], prob["spatial_shapes"], inputs["sampling_locations"],
                                          inputs["attention_weights"])
    grads = {}
    if grad_output is not None:
        g = grad_output if cast is None else grad_output.to(cast)
        got = torch.autograd.grad(out, [inputs[k] for k in DIFF_KEYS], g)
        grads = dict(zip(DIFF_KEYS, got))
    return out.detach(), grads


def rel_err(actual, expected):
    """||actual - expected|| / ||expected|| in float64 (absolute error if expected is zero)."""
    a = actual.detach().double()
    e = expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite values"
    num = (a - e).norm().item()
    den = e.norm().item()
    return num / den if den > 0 else num


def assert_rel(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def assert_bitwise(actual, expected, what=""):
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    # NaN-safe bitwise comparison through the raw bytes.
    a = actual.detach().contiguous()
    e = expected.detach().contiguous()
    if a.dtype in (torch.bfloat16, torch.float16):
        a, e = a.view(torch.int16), e.view(torch.int16)
    elif a.dtype == torch.float32:
        a, e = a.view(torch.int32), e.view(torch.int32)
    elif a.dtype == torch.float64:
        a, e = a.view(torch.int64), e.view(torch.int64)
    assert torch.equal(a, e), f"{what}: not bitwise identical (max |diff| {(actual.double() - expected.double()).abs().max()})"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
