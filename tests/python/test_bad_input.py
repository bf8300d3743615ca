"""SPEC's "Bad input": every rejected input raises ValueError naming the argument, what was
expected and what was given, through msda.ms_deform_attn, torch.ops.msda.ms_deform_attn and the
backward op. And the legal corner cases: N = 0, Q = 0, NaN/inf locations, any im2col_step, the
allowed dtype mixes."""
import contextlib
import itertools

import pytest
import torch

import msda
from conftest import DIFF_KEYS, assert_bitwise, assert_rel, grad_output_for, make_problem, run_op

ORDER = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def base(dtype=torch.float64):
    # N=2, Q=3, M=2, D=4, levels (3,4) (2,5): S=22, L=2, P=2
    return make_problem(n=2, q=3, m=2, d=4, shapes=[(3, 4), (2, 5)], p=2, dtype=dtype, seed=0)


def _with(**changes):
    def build():
        prob = base()
        for k, f in changes.items():
            prob[k] = f(prob[k]) if callable(f) else f
        return prob
    return build


def _value_with_rows(s):
    return lambda v: torch.randn(v.shape[0], s, *v.shape[2:], dtype=v.dtype)


def _empty_levels():
    prob = base()
    prob["spatial_shapes"] = torch.zeros(0, 2, dtype=torch.int64)
    prob["level_start_index"] = torch.zeros(0, dtype=torch.int64)
    prob["value"] = torch.randn(2, 0, 2, 4, dtype=torch.float64)
    prob["sampling_locations"] = torch.rand(2, 3, 2, 0, 2, 2, dtype=torch.float64)
    prob["attention_weights"] = torch.rand(2, 3, 2, 0, 2, dtype=torch.float64)
    return prob


def _levels(shapes, starts, s):
    return _with(spatial_shapes=torch.tensor(shapes), level_start_index=torch.tensor(starts),
                 value=_value_with_rows(s))


def _overflowing_bytes():
    # N*S*M*D = 2^40 * 2^20 elements of 8 bytes: 2^63 bytes, one past int64. Stride-0 views, so
    # nothing is allocated; the op must refuse before touching memory.
    one = torch.zeros(1, dtype=torch.float64)
    return dict(value=one.view(1, 1, 1, 1).expand(2 ** 40, 2 ** 20, 1, 1),
                spatial_shapes=torch.tensor([[1024, 1024]]), level_start_index=torch.tensor([0]),
                sampling_locations=one.view(1, 1, 1, 1, 1, 1).expand(2 ** 40, 1, 1, 1, 1, 2),
                attention_weights=one.view(1, 1, 1, 1, 1).expand(2 ** 40, 1, 1, 1, 1))


# (id, problem builder, accepted argument names in the message)
BAD = [
    # ranks
    ("value_rank3", _with(value=lambda v: v[..., 0]), ("value",)),
    ("value_rank5", _with(value=lambda v: v[..., None]), ("value",)),
    ("shapes_rank1", _with(spatial_shapes=lambda s: s.flatten()), ("spatial_shapes",)),
    ("shapes_Lx3", _with(spatial_shapes=lambda s: torch.cat([s, s[:, :1]], 1)), ("spatial_shapes",)),
    ("shapes_rank3", _with(spatial_shapes=lambda s: s[None]), ("spatial_shapes",)),
    ("starts_rank2", _with(level_start_index=lambda s: s[None]), ("level_start_index",)),
    ("starts_rank0", _with(level_start_index=lambda s: s[0]), ("level_start_index",)),
    ("loc_rank5", _with(sampling_locations=lambda t: t[..., 0]), ("sampling_locations",)),
    ("loc_rank7", _with(sampling_locations=lambda t: t[..., None]), ("sampling_locations",)),
    ("loc_last_dim3", _with(sampling_locations=lambda t: torch.cat([t, t[..., :1]], -1)), ("sampling_locations",)),
    ("loc_last_dim1", _with(sampling_locations=lambda t: t[..., :1]), ("sampling_locations",)),
    ("weights_rank4", _with(attention_weights=lambda t: t[..., 0]), ("attention_weights",)),
    ("weights_rank6", _with(attention_weights=lambda t: t[..., None]), ("attention_weights",)),
    # mismatched N / Q / M / L / P between tensors
    ("loc_N", _with(sampling_locations=lambda t: t[:1], attention_weights=lambda t: t[:1]),
     ("sampling_locations", "value")),
    ("value_N", _with(value=lambda v: v[:1]), ("value", "sampling_locations")),
    ("loc_M", _with(sampling_locations=lambda t: t[:, :, :1], attention_weights=lambda t: t[:, :, :1]),
     ("sampling_locations", "value")),
    ("value_M", _with(value=lambda v: v[:, :, :1]), ("value", "sampling_locations")),
    ("loc_L", _with(sampling_locations=lambda t: t[:, :, :, :1], attention_weights=lambda t: t[:, :, :, :1]),
     ("sampling_locations", "spatial_shapes")),
    ("weights_N", _with(attention_weights=lambda t: t[:1]), ("attention_weights",)),
    ("weights_Q", _with(attention_weights=lambda t: t[:, :2]), ("attention_weights",)),
    ("weights_M", _with(attention_weights=lambda t: t[:, :, :1]), ("attention_weights",)),
    ("weights_L", _with(attention_weights=lambda t: t[:, :, :, :1]), ("attention_weights",)),
    ("weights_P", _with(attention_weights=lambda t: t[..., :1]), ("attention_weights",)),
    ("starts_length", _with(level_start_index=lambda s: s[:1]), ("level_start_index",)),
    ("starts_length_longer", _with(level_start_index=torch.tensor([0, 12, 22])), ("level_start_index",)),
    # zero sizes that are not legal
    ("L0", _empty_levels, ("spatial_shapes",)),
    ("P0", _with(sampling_locations=lambda t: t[..., :0, :], attention_weights=lambda t: t[..., :0]),
     ("sampling_locations", "attention_weights", "points (P)")),
    ("D0", _with(value=lambda v: v[..., :0]), ("value", "channels (D)")),
    # non-positive H or W
    ("H0", _levels([[0, 4], [2, 5]], [0, 0], 10), ("spatial_shapes",)),
    ("W0_level1", _levels([[3, 4], [2, 0]], [0, 12], 12), ("spatial_shapes",)),
    ("H_negative", _levels([[-3, 4], [2, 5]], [0, -12], 22), ("spatial_shapes",)),
    ("HW_both_negative", _levels([[-3, -4], [2, 5]], [0, 12], 22), ("spatial_shapes",)),
    # level_start_index / S inconsistent with spatial_shapes
    ("starts_off_by_one", _with(level_start_index=torch.tensor([0, 11])), ("level_start_index",)),
    ("starts_not_zero", _with(level_start_index=torch.tensor([1, 13])), ("level_start_index",)),
    ("starts_swapped_levels", _with(level_start_index=torch.tensor([0, 10])), ("level_start_index",)),
    ("S_too_many", _with(value=_value_with_rows(23)), ("value",)),
    ("S_too_few", _with(value=_value_with_rows(21)), ("value",)),
    # index tensors that are not integers
    ("shapes_float", _with(spatial_shapes=lambda s: s.float()), ("spatial_shapes",)),
    ("shapes_double", _with(spatial_shapes=lambda s: s.double()), ("spatial_shapes",)),
    ("starts_float", _with(level_start_index=lambda s: s.float()), ("level_start_index",)),
    # dtypes
    ("value_int64", _with(value=lambda v: v.long()), ("value",)),
    ("value_int32", _with(value=lambda v: v.int()), ("value",)),
    ("value_bool", _with(value=lambda v: v > 0), ("value",)),
    ("loc_int", _with(sampling_locations=lambda t: t.long()), ("sampling_locations",)),
    ("f32_value_f64_loc", _with(value=lambda v: v.float(), attention_weights=lambda t: t.float()),
     ("sampling_locations",)),
    ("f32_value_f64_weights", _with(value=lambda v: v.float(), sampling_locations=lambda t: t.float()),
     ("attention_weights",)),
    ("f32_value_bf16_loc", _with(value=lambda v: v.float(), sampling_locations=lambda t: t.bfloat16(),
                                 attention_weights=lambda t: t.float()), ("sampling_locations",)),
    ("bf16_value_f16_weights", _with(value=lambda v: v.bfloat16(), sampling_locations=lambda t: t.float(),
                                     attention_weights=lambda t: t.half()), ("attention_weights",)),
    ("f16_value_bf16_loc", _with(value=lambda v: v.half(), sampling_locations=lambda t: t.bfloat16(),
                                 attention_weights=lambda t: t.half()), ("sampling_locations",)),
    ("bf16_value_f64_loc", _with(value=lambda v: v.bfloat16(), attention_weights=lambda t: t.float()),
     ("sampling_locations",)),
    # devices (the meta device stands in for an accelerator)
    ("loc_other_device", _with(sampling_locations=lambda t: t.to("meta")), ("sampling_locations",)),
    ("shapes_other_device", _with(spatial_shapes=lambda t: t.to("meta")), ("spatial_shapes",)),
    ("value_other_device", _with(value=lambda t: t.to("meta")), ("sampling_locations", "spatial_shapes")),
    # sizes whose offsets overflow 64 bits
    ("HW_overflow", _with(spatial_shapes=torch.tensor([[2 ** 32, 2 ** 32], [2, 5]])), ("spatial_shapes",)),
    ("bytes_overflow", _overflowing_bytes, ("value", "sampling_locations", "attention_weights")),
]


def _below_autograd_if_meta(tensors):
    """A meta tensor among the inputs of the backward op: inference mode skips the autograd
    keys (whose meta entry was not a fallthrough in older torch), so the call reaches the op's own
    device checks as a real device's would."""
    if any(t.device.type == "meta" for t in tensors):
        return torch.inference_mode()
    return contextlib.nullcontext()


def _check_message(exc, names):
    msg = str(exc)
    assert "expected" in msg and "got" in msg, msg
    assert any(name in msg for name in names), f"message names none of {names}: {msg}"


@pytest.mark.parametrize("name,build,names", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(name, build, names):
    prob = build()
    args = [prob[k] for k in ORDER]
    with pytest.raises(ValueError) as e:
        msda.ms_deform_attn(*args)
    _check_message(e.value, names)
    with pytest.raises(ValueError) as e:
        torch.ops.msda.ms_deform_attn(*args, None)
    _check_message(e.value, names)
    # The backward op checks the same arguments first (grad_output is irrelevant here).
    g = torch.zeros(1, 1, 1, dtype=prob["value"].dtype, device=prob["value"].device)
    with pytest.raises(ValueError) as e, _below_autograd_if_meta(args):
        torch.ops.msda.ms_deform_attn_backward(g, *args, [True, True, True])
    _check_message(e.value, names)


def test_meta_tensors_give_shapes():
    """All on the meta device is legal: the fake kernels give the outputs' shapes and dtypes
    (what torch.compile and torch.export trace with), computing nothing."""
    prob = {k: t.to("meta") for k, t in base().items()}
    args = [prob[k] for k in ORDER]
    out = torch.ops.msda.ms_deform_attn(*args, None)
    n, q = prob["sampling_locations"].shape[:2]
    m, d = prob["value"].shape[2:]
    assert out.device.type == "meta" and out.shape == (n, q, m * d) and out.dtype == prob["value"].dtype
    g = torch.zeros(n, q, m * d, dtype=prob["value"].dtype, device="meta")
    grads = torch.ops.msda.ms_deform_attn_backward(g, *args, [True, False, True])
    assert grads[0].shape == prob["value"].shape and grads[0].device.type == "meta"
    assert grads[1].shape == (0,)
    assert grads[2].shape == prob["attention_weights"].shape


@pytest.mark.parametrize("which", ["shape_last", "shape_Q", "shape_N", "rank4", "rank2", "dtype", "device"])
def test_bad_grad_output(which):
    prob = base()
    g = grad_output_for(prob)  # [2, 3, 8]
    bad = {"shape_last": lambda: g[..., :7], "shape_Q": lambda: g[:, :2], "shape_N": lambda: g[:1],
           "rank4": lambda: g.view(2, 3, 2, 4), "rank2": lambda: g.view(6, 8),
           "dtype": lambda: g.float(), "device": lambda: g.to("meta")}[which]()
    with pytest.raises(ValueError) as e, _below_autograd_if_meta([bad]):
        torch.ops.msda.ms_deform_attn_backward(bad, *(prob[k] for k in ORDER), [True, True, True])
    _check_message(e.value, ("grad_output",))


def test_good_grad_output_accepted():
    prob = base()
    g = grad_output_for(prob)
    got = torch.ops.msda.ms_deform_attn_backward(g, *(prob[k] for k in ORDER), [True, True, True])
    _, ref = run_op(prob, g)
    for t, k in zip(got, DIFF_KEYS):
        assert_bitwise(t, ref[k], k)


# ---- legal inputs -------------------------------------------------------------------------


def _poison_allocator(numel, dtype):
    """Leave freed NaN-filled memory of the size the op will allocate, so a gradient that is not
    fully written shows up as NaN rather than as lucky zeros."""
    for _ in range(4):
        t = torch.full((numel,), float("nan"), dtype=dtype)
        del t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,q", [(0, 3), (2, 0), (0, 0)])
def test_empty_batch_or_queries(n, q, dtype):
    prob = make_problem(n=n, q=q, m=2, d=4, shapes=[(3, 4), (2, 5)], p=2, dtype=dtype, seed=1)
    assert prob["value"].shape[0] == n and prob["sampling_locations"].shape[1] == q
    inputs = [prob[k].clone().requires_grad_() for k in DIFF_KEYS]
    out = msda.ms_deform_attn(inputs[0], prob["spatial_shapes"], prob["level_start_index"], inputs[1], inputs[2])
    assert out.shape == (n, q, 8) and out.dtype == dtype
    _poison_allocator(prob["value"].numel(), dtype)
    grads = torch.autograd.grad(out, inputs, torch.zeros_like(out), allow_unused=True)
    for k, gr in zip(DIFF_KEYS, grads):
        assert gr is not None, k
        assert gr.shape == prob[k].shape and gr.dtype == prob[k].dtype, k
        assert torch.equal(gr, torch.zeros_like(gr)), f"{k} gradient not all zeros"
    # The backward op directly, with a (legal) empty grad_output.
    _poison_allocator(prob["value"].numel(), dtype)
    got = torch.ops.msda.ms_deform_attn_backward(torch.zeros(n, q, 8, dtype=dtype), *(prob[k] for k in ORDER),
                                                 [True, True, True])
    for k, gr in zip(DIFF_KEYS, got):
        assert gr.shape == prob[k].shape and gr.dtype == prob[k].dtype, k
        assert torch.equal(gr, torch.zeros_like(gr)), f"backward op: {k} gradient not all zeros"


SPECIALS = [
    ("x_nan", (float("nan"), 0.5)), ("y_nan", (0.5, float("nan"))), ("both_nan", (float("nan"), float("nan"))),
    ("x_inf", (float("inf"), 0.5)), ("x_-inf", (float("-inf"), 0.5)), ("y_inf", (0.5, float("inf"))),
    ("y_-inf", (0.5, float("-inf"))), ("nan_inf", (float("nan"), float("-inf"))),
    ("huge", (1e30, 0.5)), ("-huge", (0.5, -1e30)), ("f32_max", (3.0e38, 3.0e38)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_nonfinite_locations_contribute_nothing(dtype):
    sdt = torch.float32 if dtype == torch.bfloat16 else dtype
    prob = make_problem(n=2, q=6, m=2, d=3, shapes=[(4, 5), (2, 3)], p=2, dtype=dtype, loc_dtype=sdt,
                        weight_dtype=sdt, seed=12)
    loc = prob["sampling_locations"].clone()
    far = loc.clone()
    # One special sample per (query, level) slot, spread over heads and points.
    spots = list(itertools.product(range(2), range(6), range(2)))
    marked = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    for i, (name, (x, y)) in enumerate(SPECIALS):
        n, q, l = spots[i % len(spots)]
        m, p = i % 2, (i // 2) % 2
        loc[n, q, m, l, p] = torch.tensor([x, y], dtype=sdt)
        far[n, q, m, l, p] = torch.tensor([-5.0, -5.0], dtype=sdt)  # out of range: a zero sample
        marked[n, q, m, l, p] = True
    g = grad_output_for(prob)
    out, grads = run_op(dict(prob, sampling_locations=loc), g)
    out_far, grads_far = run_op(dict(prob, sampling_locations=far), g)
    tol = 1e-12 if dtype == torch.float64 else (1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.isfinite(out).all()
    assert_rel(out, out_far, tol, "output")
    for k in DIFF_KEYS:
        assert torch.isfinite(grads[k]).all(), k
        assert_rel(grads[k], grads_far[k], tol, k)
    assert (grads["sampling_locations"][marked] == 0).all()
    assert (grads["attention_weights"][marked] == 0).all()
    # Sanity: the unmarked samples do contribute.
    assert grads["attention_weights"][~marked].abs().sum() > 0


@pytest.mark.parametrize("step", [None, 64, 1, 2, 3, 5, 0, -1])
def test_im2col_step_accepted_and_ignored(step):
    prob = make_problem(n=3, q=4, m=2, d=4, shapes=[(3, 3), (2, 2)], p=2, seed=13)
    args = [prob[k] for k in ORDER]
    ref = msda.ms_deform_attn(*args)
    assert_bitwise(msda.ms_deform_attn(*args, im2col_step=step), ref, "functional")
    assert_bitwise(msda.ms_deform_attn(*args, step), ref, "positional")
    assert_bitwise(torch.ops.msda.ms_deform_attn(*args, step), ref, "torch.ops")


@pytest.mark.parametrize("vdt,ldt,wdt", [
    (torch.float64, torch.float32, torch.float32),
    (torch.float64, torch.float64, torch.float32),
    (torch.float16, torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
])
def test_allowed_dtype_mixes(vdt, ldt, wdt):
    """SPEC: locations and weights are in value's dtype or f32, each independently."""
    prob = make_problem(n=2, q=5, m=2, d=4, shapes=[(4, 4), (2, 3)], p=2, dtype=vdt, loc_dtype=ldt,
                        weight_dtype=wdt, seed=14)
    g = grad_output_for(prob)
    out, grads = run_op(prob, g)
    ref, ref_grads = run_op(prob, g, cast=torch.float64)
    assert out.dtype == vdt
    tol = 1e-2 if vdt in (torch.float16, torch.bfloat16) else 1e-6
    assert_rel(out, ref, tol, "output")
    for k in DIFF_KEYS:
        assert grads[k].dtype == prob[k].dtype, k
        assert_rel(grads[k], ref_grads[k], tol, k)
