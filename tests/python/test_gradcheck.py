"""torch.autograd.gradcheck of the op in float64; gradients requested for only some inputs;
bitwise determinism across repeated calls and thread counts."""
import itertools

import pytest
import torch

import msda
from conftest import DIFF_KEYS, assert_bitwise, grad_output_for, make_problem, run_op

GRADCHECK_CASES = [
    ("basic", dict(n=2, q=3, m=2, d=3, shapes=[(3, 4), (2, 2)], p=2)),
    ("degenerate_maps", dict(n=1, q=3, m=2, d=2, shapes=[(1, 1), (1, 4), (3, 1)], p=2)),
    ("outside", dict(n=2, q=4, m=1, d=2, shapes=[(3, 3), (2, 4)], p=2, lo=-0.2, hi=1.2)),
    ("P1_D1", dict(n=1, q=4, m=3, d=1, shapes=[(4, 5)], p=1)),
    ("five_levels", dict(n=1, q=2, m=1, d=2, shapes=[(5, 6), (3, 3), (2, 2), (1, 2), (1, 1)], p=2)),
]


@pytest.mark.parametrize("name,kw", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(name, kw):
    prob = make_problem(dtype=torch.float64, avoid_integers=True, seed=len(name), **kw)
    shapes, starts = prob["spatial_shapes"], prob["level_start_index"]
    inputs = tuple(prob[k].clone().requires_grad_() for k in DIFF_KEYS)

    def f(v, loc, w):
        return msda.ms_deform_attn(v, shapes, starts, loc, w)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_locations_alone_large_map():
    """The location gradient scales with W and H: check it on a larger, non-square level."""
    prob = make_problem(n=1, q=4, m=2, d=3, shapes=[(13, 29)], p=2, avoid_integers=True, seed=3)
    v, w = prob["value"], prob["attention_weights"]
    loc = prob["sampling_locations"].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: msda.ms_deform_attn(v, prob["spatial_shapes"], prob["level_start_index"], x, w), (loc,),
        eps=1e-7, atol=1e-6, rtol=1e-5)


SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(DIFF_KEYS[i] for i in s) for s in SUBSETS])
def test_partial_requires_grad(subset):
    prob = make_problem(n=2, q=5, m=2, d=3, shapes=[(4, 4), (2, 3)], p=2, lo=-0.1, hi=1.1, seed=2)
    g = grad_output_for(prob)
    _, full = run_op(prob, g)
    tensors = [prob[k].clone().requires_grad_(i in subset) for i, k in enumerate(DIFF_KEYS)]
    out = msda.ms_deform_attn(tensors[0], prob["spatial_shapes"], prob["level_start_index"], tensors[1], tensors[2])
    assert out.requires_grad
    out.backward(g)
    for i, (k, t) in enumerate(zip(DIFF_KEYS, tensors)):
        if i in subset:
            assert t.grad is not None, k
            assert_bitwise(t.grad, full[k], k)
        else:
            assert t.grad is None, k


def test_no_grad_requested():
    prob = make_problem(seed=4)
    out = msda.ms_deform_attn(*(prob[k] for k in ("value", "spatial_shapes", "level_start_index",
                                                  "sampling_locations", "attention_weights")))
    assert not out.requires_grad
    with torch.no_grad():
        v = prob["value"].clone().requires_grad_()
        out = msda.ms_deform_attn(v, prob["spatial_shapes"], prob["level_start_index"],
                                  prob["sampling_locations"], prob["attention_weights"])
    assert not out.requires_grad


def test_backward_op_output_mask():
    """torch.ops.msda.ms_deform_attn_backward returns an empty [0] placeholder (of the input's
    dtype) for the gradients not asked for, and the same numbers as the full call for the others."""
    prob = make_problem(n=2, q=4, m=2, d=3, shapes=[(3, 3), (2, 1)], p=2, seed=6)
    g = grad_output_for(prob)
    args = (g, prob["value"], prob["spatial_shapes"], prob["level_start_index"], prob["sampling_locations"],
            prob["attention_weights"])
    full = torch.ops.msda.ms_deform_attn_backward(*args, [True, True, True])
    for mask in itertools.product([False, True], repeat=3):
        got = torch.ops.msda.ms_deform_attn_backward(*args, list(mask))
        for flag, t, ref, k in zip(mask, got, full, DIFF_KEYS):
            if flag:
                assert_bitwise(t, ref, k)
            else:
                assert t.shape == (0,) and t.dtype == ref.dtype, k


def test_grad_flows_to_non_leaf_inputs():
    """Gradients flow through the op to tensors computed from leaves (not only leaves)."""
    prob = make_problem(n=1, q=3, m=2, d=2, shapes=[(3, 3)], p=2, avoid_integers=True, seed=8)
    logits = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(logits, -1).view(1, 3, 2, 1, 2)
    out = msda.ms_deform_attn(prob["value"], prob["spatial_shapes"], prob["level_start_index"],
                              prob["sampling_locations"], w)
    out.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def _all_results(prob, g):
    out, grads = run_op(prob, g)
    return [out] + [grads[k] for k in DIFF_KEYS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_deterministic_repeats_and_threads(dtype, restore_threads):
    # Many queries sampling a few small maps: every value row gets gradient from many samples
    # (where an atomic or thread-order-dependent reduction would show).
    prob = make_problem(n=2, q=300, m=4, d=8, shapes=[(6, 7), (3, 4), (2, 2), (1, 1)], p=4, dtype=dtype,
                        loc_dtype=torch.float32 if dtype == torch.bfloat16 else None,
                        weight_dtype=torch.float32 if dtype == torch.bfloat16 else None,
                        lo=-0.1, hi=1.1, seed=10)
    g = grad_output_for(prob)
    torch.set_num_threads(1)
    base = _all_results(prob, g)
    again = _all_results(prob, g)
    for name, a, b in zip(("output",) + DIFF_KEYS, again, base):
        assert_bitwise(a, b, "repeat, 1 thread: " + name)
    for threads in (2, 3):
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        for rep in range(2):
            got = _all_results(prob, g)
            for name, a, b in zip(("output",) + DIFF_KEYS, got, base):
                assert_bitwise(a, b, f"{threads} threads, repeat {rep}: {name}")
