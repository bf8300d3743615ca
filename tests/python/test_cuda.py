"""The CUDA backend against the oracle, msda's CPU op in float64 on float64 copies of the same
(rounded) inputs: forward and gradients of the plain op (3) and the fused op (4, reference points
of 2 and 4 coordinates) for every dtype mix of SPEC, SPEC's edge shapes, zero samples (off the
map, NaN, inf), samples exactly on pixel boundaries, non-contiguous and misaligned inputs, int32
index tensors, the deterministic backward (bitwise across runs, many samples on few pixels) and
the atomicAdd ablation, the caller's CUDA stream, bad input (devices first), and msda.MSDeformAttn
on CUDA (against the CPU, under autocast, under torch.compile).

The whole module skips, saying why, where msda was built without its CUDA backend or no GPU is
visible. Run it on a GPU machine with scripts/gpu-check.sh, or after a build with nvcc:
    PYTHONPATH=build/python python -m pytest -q tests/python/test_cuda.py
"""
import copy
import warnings
import zlib

import pytest
import torch

import msda


def _why_not_runnable():
    if not hasattr(msda, "cuda_built"):
        return "this msda has no CUDA backend at all (no msda.cuda_built)"
    if not msda.cuda_built():
        gpu = "a GPU is visible" if torch.cuda.is_available() else "and torch sees no GPU either"
        return f"msda was built without its CUDA backend (nvcc not found at build time); {gpu}"
    if not torch.cuda.is_available():
        return "msda's CUDA backend is built, but torch sees no CUDA GPU"
    if not msda.cuda_available():
        return "msda.cuda_available() is False although msda's CUDA backend is built and torch sees a GPU"
    return None


_reason = _why_not_runnable()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

import msda.workloads  # noqa: E402
from conftest import (DIFF_KEYS, assert_bitwise, assert_rel, grad_output_for, make_problem,  # noqa: E402
                      run_op)
from test_fused import (ARGS as FUSED_ARGS, DIFF as FUSED_DIFF, FusedOpDtypes, fused_problem,  # noqa: E402
                        module_forward_backward, module_setup, run_fused)

DEVICE = torch.device("cuda", torch.cuda.current_device())
ORDER = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# SPEC's bounds on ||got - ref|| / ||ref||; float64 has none in SPEC, but two float64 kernels differ
# only by summation order.
TOL = {F64: 1e-12, F32: 1e-5, BF16: 1e-2, F16: 1e-2}

# SPEC's 13 dtype mixes: (value, locations or offsets, weights or logits), each of the last two in
# value's dtype or f32.
MIXES = [(v, loc, w) for v in (F32, F64, BF16, F16)
         for loc in sorted({v, F32}, key=str) for w in sorted({v, F32}, key=str)]
assert len(MIXES) == 13


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _mix_id(mix):
    return "-".join(_name(t) for t in mix)


def tol_for(*dtypes):
    """The bound of the narrowest dtype among the inputs: an f32 location beside an f64 value is
    only as exact as f32 arithmetic on it (SPEC lets the kernel compute it in f32)."""
    return max(TOL[d] for d in dtypes)


def on(prob, device=DEVICE):
    return {k: t.to(device) for k, t in prob.items()}


def oracle(prob, grad):
    """Output and gradients of msda's CPU op in float64 on float64 copies of prob's inputs."""
    return run_op(on(prob, "cpu"), grad.cpu().double(), cast=F64)


def assert_like(t, shape, dtype, device, what):
    assert (tuple(t.shape), t.dtype, t.device) == (tuple(shape), dtype, device), what


def check_op(prob, grad, tol=None, poison=True):
    """The op on prob's (CUDA) tensors against the oracle: output and gradients have the right
    shapes, dtypes and device, are finite, and are within tol. Returns (output, grads)."""
    value, loc = prob["value"], prob["sampling_locations"]
    tol = tol or tol_for(value.dtype, loc.dtype, prob["attention_weights"].dtype)
    n, _, m, d = value.shape
    q = loc.shape[1]
    if poison:
        poison_allocator(n * q * m * d * value.element_size(), *(_bytes(prob[k]) for k in DIFF_KEYS),
                         value.numel() * 4)
    out, grads = run_op(prob, grad)
    want, want_grads = oracle(prob, grad)
    assert_like(out, (n, q, m * d), value.dtype, value.device, "output")
    assert_rel(out.cpu(), want, tol, "output")
    for k in DIFF_KEYS:
        assert_like(grads[k], prob[k].shape, prob[k].dtype, value.device, "grad " + k)
        assert_rel(grads[k].cpu(), want_grads[k], tol, "grad " + k)
    return out, grads


def _bytes(t):
    return t.numel() * t.element_size()


def poison_allocator(*sizes):
    """Frees blocks of the given byte sizes filled with all-ones bits (NaN in every float dtype)
    back into PyTorch's caching allocator, which hands such blocks out again for the op's outputs
    and workspace: an element a kernel forgets to write (a grad_value row no sample reaches, say)
    then reads as NaN instead of a lucky zero."""
    blocks = [torch.full((max(s, 1),), 255, dtype=torch.uint8, device=DEVICE) for s in sizes]
    del blocks


# ---- every dtype mix, against the float64 CPU op ----------------------------------------------

@pytest.mark.parametrize("mix", MIXES, ids=[_mix_id(m) for m in MIXES])
def test_dtype_mix_vs_float64_cpu(mix):
    value_dtype, loc_dtype, weight_dtype = mix
    # A wide first level (Deformable DETR's 134 columns): rounding f32 locations to 16 bits inside
    # the kernel would be far off 1e-2 there. Some samples fall off the map.
    prob = make_problem(n=2, q=40, m=4, d=8, shapes=[(50, 134), (6, 8), (3, 4), (1, 1)], p=4, dtype=value_dtype,
                        loc_dtype=loc_dtype, weight_dtype=weight_dtype, lo=-0.05, hi=1.05, seed=17)
    prob = on(prob)
    grad = grad_output_for(prob, seed=3).to(DEVICE)
    check_op(prob, grad)


@pytest.mark.parametrize("coords", [2, 4])
@pytest.mark.parametrize("mix", MIXES, ids=[_mix_id(m) for m in MIXES])
def test_fused_dtype_mix_vs_float64_cpu(mix, coords):
    """The fused op's four gradients. Reference points alternate with the offsets' dtype, as in
    test_fused's opcheck (autocast keeps them f32 beside 16-bit offsets)."""
    value_dtype, off_dtype, logit_dtype = mix
    ref_dtype = F32 if off_dtype == value_dtype else value_dtype
    cpu = fused_problem(n=2, q=20, m=4, d=8, coords=coords, dtype=value_dtype, ref_dtype=ref_dtype,
                        off_dtype=off_dtype, logit_dtype=logit_dtype, seed=coords, wide=True)
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(2, 20, 32, generator=gen, dtype=F64).to(value_dtype)
    prob = on(cpu)
    poison_allocator(_bytes(grad), *(_bytes(prob[k]) for k in FUSED_DIFF), prob["value"].numel() * 4)
    out, grads = run_fused(prob, grad.to(DEVICE))
    want, want_grads = run_fused(cpu, grad.double(), cast=F64)
    tol = tol_for(*(cpu[k].dtype for k in FUSED_DIFF))
    assert_like(out, grad.shape, value_dtype, DEVICE, "output")
    assert_rel(out.cpu(), want, tol, "output")
    for k in FUSED_DIFF:
        assert_like(grads[k], cpu[k].shape, cpu[k].dtype, DEVICE, k)
        assert_rel(grads[k].cpu(), want_grads[k], tol, k)


# ---- edge shapes ------------------------------------------------------------------------------

EDGES = [
    ("basic", dict(n=2, q=5, m=2, d=4, shapes=[(3, 4), (2, 5)], p=3)),
    ("map1x1", dict(n=1, q=6, m=2, d=3, shapes=[(1, 1)], p=2)),
    ("one_pixel_levels", dict(n=2, q=5, m=2, d=8, shapes=[(1, 1), (1, 1), (1, 1)], p=2)),
    ("mixed_degenerate", dict(n=1, q=7, m=2, d=4, shapes=[(1, 1), (1, 5), (4, 1), (3, 3)], p=2)),
    ("D1", dict(n=2, q=5, m=3, d=1, shapes=[(4, 3), (2, 2)], p=2)),
    ("D3", dict(n=1, q=5, m=2, d=3, shapes=[(5, 4)], p=4)),
    ("M3_D5", dict(n=2, q=4, m=3, d=5, shapes=[(4, 4), (2, 3)], p=2)),
    ("M8_D32", dict(n=1, q=10, m=8, d=32, shapes=[(10, 13), (5, 7), (3, 4), (2, 2)], p=4)),
    ("M4_D64", dict(n=1, q=9, m=4, d=64, shapes=[(8, 9), (4, 5)], p=4)),
    ("D257", dict(n=1, q=4, m=2, d=257, shapes=[(4, 5), (2, 3)], p=2)),
    ("D1100", dict(n=1, q=3, m=1, d=1100, shapes=[(3, 4)], p=2)),  # more channels than threads in a block
    ("M1", dict(n=2, q=6, m=1, d=8, shapes=[(5, 6), (3, 3)], p=3)),
    ("P1", dict(n=2, q=6, m=2, d=4, shapes=[(5, 5), (3, 2)], p=1)),
    ("L1", dict(n=2, q=8, m=4, d=8, shapes=[(7, 9)], p=4)),
    ("L20", dict(n=1, q=6, m=2, d=4, shapes=[(1 + l % 4, 2 + l % 3) for l in range(20)], p=2)),
    ("P16_L8", dict(n=1, q=5, m=2, d=8, shapes=[(8, 8), (6, 5), (4, 4), (3, 3), (2, 3), (2, 2), (1, 2), (1, 1)],
                    p=16)),
    ("P300", dict(n=1, q=2, m=1, d=4, shapes=[(5, 5)], p=300)),
    ("outside", dict(n=2, q=10, m=2, d=5, shapes=[(4, 5), (2, 3), (1, 1)], p=4, lo=-0.2, hi=1.2)),
    ("far_outside", dict(n=1, q=10, m=2, d=3, shapes=[(3, 3)], p=3, lo=-3.0, hi=4.0)),
    ("many_queries_small_map", dict(n=2, q=2000, m=2, d=4, shapes=[(2, 3), (1, 2)], p=4)),
    # Past CUDA's 65535 limit on a grid's y and z dimensions, whichever the kernels put them on.
    ("N70000", dict(n=70000, q=1, m=1, d=2, shapes=[(1, 2)], p=1)),
    ("Q70000", dict(n=1, q=70000, m=1, d=1, shapes=[(2, 2)], p=1)),
    ("M70000", dict(n=1, q=1, m=70000, d=1, shapes=[(1, 1)], p=1)),
]
# (value, locations and weights): autocast's mix for the 16-bit types.
EDGE_DTYPES = [(F64, F64), (F32, F32), (BF16, F32), (F16, F32)]


@pytest.mark.parametrize("dtypes", EDGE_DTYPES, ids=[_name(v) for v, _ in EDGE_DTYPES])
@pytest.mark.parametrize("name,kw", EDGES, ids=[e[0] for e in EDGES])
def test_edge_shapes_vs_float64_cpu(name, kw, dtypes):
    value_dtype, sample_dtype = dtypes
    prob = make_problem(dtype=value_dtype, loc_dtype=sample_dtype, weight_dtype=sample_dtype,
                        seed=zlib.crc32(name.encode()) % 1000, **kw)
    prob = on(prob)
    check_op(prob, grad_output_for(prob, seed=7).to(DEVICE))


@pytest.mark.parametrize("sizes", [dict(n=0, q=5), dict(n=2, q=0)], ids=["N0", "Q0"])
@pytest.mark.parametrize("dtypes", EDGE_DTYPES, ids=[_name(v) for v, _ in EDGE_DTYPES])
def test_empty_batch_or_queries(sizes, dtypes):
    value_dtype, sample_dtype = dtypes
    prob = on(make_problem(m=2, d=4, shapes=[(3, 4), (2, 5)], p=3, dtype=value_dtype, loc_dtype=sample_dtype,
                           weight_dtype=sample_dtype, **sizes))
    grad = grad_output_for(prob).to(DEVICE)
    poison_allocator(_bytes(prob["value"]), prob["value"].numel() * 4)
    out, grads = run_op(prob, grad)
    assert_like(out, (sizes["n"], sizes["q"], 8), value_dtype, DEVICE, "output")
    for k in DIFF_KEYS:
        assert_like(grads[k], prob[k].shape, prob[k].dtype, DEVICE, k)
        assert (grads[k] == 0).all(), k


@pytest.mark.parametrize("sizes", [dict(n=0, q=4), dict(n=2, q=0)], ids=["N0", "Q0"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_name)
def test_fused_empty_batch_or_queries(sizes, dtype):
    prob = on(fused_problem(coords=4, dtype=dtype, seed=1, **sizes))
    grad = torch.zeros(sizes["n"], sizes["q"], 12, dtype=dtype, device=DEVICE)
    out, grads = run_fused(prob, grad)
    assert_like(out, grad.shape, dtype, DEVICE, "output")
    for k in FUSED_DIFF:
        assert_like(grads[k], prob[k].shape, prob[k].dtype, DEVICE, k)
        assert (grads[k] == 0).all(), k


# ---- zero samples and exact pixel boundaries --------------------------------------------------

SPECIAL_DTYPES = [(F64, F64), (F32, F32), (BF16, F32), (BF16, BF16), (F16, F16)]


@pytest.mark.parametrize("dtypes", SPECIAL_DTYPES, ids=[f"{_name(v)}-{_name(s)}" for v, s in SPECIAL_DTYPES])
def test_nan_and_inf_locations_are_zero_samples(dtypes):
    """A NaN, infinite or huge coordinate makes a zero sample: nothing added to the output, and
    exactly zero gradients for its location and weight (no 0 * inf = NaN anywhere)."""
    value_dtype, sample_dtype = dtypes
    prob = make_problem(n=2, q=6, m=2, d=8, shapes=[(4, 5), (2, 3)], p=3, dtype=value_dtype, loc_dtype=sample_dtype,
                        weight_dtype=sample_dtype, seed=23)
    huge = torch.finfo(sample_dtype).max
    marked = [((0, 0, 0, 0, 0, 0), float("nan")), ((0, 1, 1, 1, 2, 1), float("nan")),
              ((1, 2, 0, 0, 1, 0), float("inf")), ((1, 3, 1, 1, 0, 1), float("-inf")),
              ((0, 4, 0, 1, 1, 0), huge), ((1, 5, 1, 0, 2, 1), -huge)]
    for index, x in marked:
        prob["sampling_locations"][index] = x
    prob = on(prob)
    _, grads = check_op(prob, grad_output_for(prob, seed=2).to(DEVICE))
    for index, _ in marked:
        sample = index[:5]
        assert (grads["sampling_locations"][sample] == 0).all(), sample
        assert grads["attention_weights"][sample] == 0, sample


def boundary_problem(value_dtype, sample_dtype, seed=0):
    """Every coordinate x = k / (2 W) (and y = k / (2 H)) for an integer k in [-1, 2W + 1], on
    maps whose sides are powers of two: x*W - 0.5 = k/2 - 0.5 is exact in every dtype, so samples
    sit exactly on pixel centres, on the lines between them, and on the edges of the range rule
    (u = -1 and u = W are zero samples, u = -0.5 and u = W - 0.5 are not)."""
    shapes = [(4, 8), (2, 2), (1, 1), (16, 4)]
    prob = make_problem(n=2, q=32, m=2, d=4, shapes=shapes, p=4, dtype=value_dtype, loc_dtype=sample_dtype,
                        weight_dtype=sample_dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    loc = prob["sampling_locations"]
    for level, (h, w) in enumerate(shapes):
        for coord, size in ((0, w), (1, h)):
            k = torch.randint(-1, 2 * size + 2, loc[:, :, :, level, :, coord].shape, generator=gen)
            loc[:, :, :, level, :, coord] = (k.double() / (2 * size)).to(sample_dtype)
    return prob


@pytest.mark.parametrize("dtypes", SPECIAL_DTYPES, ids=[f"{_name(v)}-{_name(s)}" for v, s in SPECIAL_DTYPES])
def test_locations_exactly_on_pixel_boundaries(dtypes):
    """Both backends take floor() of an exact integer coordinate and the one-sided derivative it
    implies (SPEC), so even the location gradients at the kinks agree."""
    prob = on(boundary_problem(*dtypes, seed=31))
    check_op(prob, grad_output_for(prob, seed=4).to(DEVICE))


def test_fused_nan_and_inf_offsets_give_finite_gradients():
    prob = fused_problem(n=1, q=8, m=2, d=4, coords=4, dtype=F32, seed=13)
    off = prob["sampling_offsets"]
    off[0, 0, 0, 0, 0, 0] = float("inf")
    off[0, 1, 1, 1, 1, 1] = float("nan")
    off[0, 2, :, 2, :, :] = -1e30
    prob = on(prob)
    out, grads = run_fused(prob, torch.randn(1, 8, 8, device=DEVICE))
    assert torch.isfinite(out).all()
    for k in FUSED_DIFF:
        assert torch.isfinite(grads[k]).all(), k
    assert (grads["sampling_offsets"][0, 0, 0, 0, 0] == 0).all()
    assert (grads["sampling_offsets"][0, 1, 1, 1, 1] == 0).all()


# ---- layouts: non-contiguous, misaligned, broadcast, int32 indices, partial gradients --------

def _grads_of(out, inputs, grad):
    return dict(zip(DIFF_KEYS, torch.autograd.grad(out, inputs, grad)))


@pytest.mark.parametrize("dtypes", EDGE_DTYPES, ids=[_name(v) for v, _ in EDGE_DTYPES])
def test_noncontiguous_inputs_same_bits(dtypes):
    value_dtype, sample_dtype = dtypes
    prob = on(make_problem(n=2, q=7, m=3, d=6, shapes=[(4, 5), (2, 3)], p=3, dtype=value_dtype,
                           loc_dtype=sample_dtype, weight_dtype=sample_dtype, lo=-0.1, hi=1.1, seed=5))
    grad = grad_output_for(prob).to(DEVICE)
    want, want_grads = run_op(prob, grad)

    # Each input stored in another layout, seen through a view with the op's shape.
    v_store = prob["value"].permute(0, 2, 1, 3).contiguous().requires_grad_()
    l_store = prob["sampling_locations"].transpose(-1, -2).contiguous().requires_grad_()
    w_wide = torch.zeros(*prob["attention_weights"].shape[:-1], 2 * prob["attention_weights"].shape[-1],
                         dtype=sample_dtype, device=DEVICE)
    w_wide[..., ::2] = prob["attention_weights"]
    w_store = w_wide.requires_grad_()
    views = (v_store.permute(0, 2, 1, 3), l_store.transpose(-1, -2), w_store[..., ::2])
    shapes = prob["spatial_shapes"].t().contiguous().t()
    starts = torch.stack([prob["level_start_index"]] * 2, -1)[:, 1]
    grad_view = grad.transpose(1, 2).contiguous().transpose(1, 2)
    for t in (*views, shapes, starts, grad_view):
        assert not t.is_contiguous()

    out = msda.ms_deform_attn(views[0], shapes, starts, views[1], views[2])
    assert_bitwise(out.detach(), want, "output")
    for k, g in _grads_of(out, views, grad_view).items():
        assert_bitwise(g, want_grads[k], k)


def _misaligned(t):
    """A contiguous copy of t that starts one element into its allocation: a data pointer that is
    not 16-byte aligned (2 bytes off for 16-bit types), which vector loads must not assume."""
    storage = t.new_empty(t.numel() + 1)
    storage[1:] = t.flatten()
    view = storage[1:].view(t.shape)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("dtypes", SPECIAL_DTYPES, ids=[f"{_name(v)}-{_name(s)}" for v, s in SPECIAL_DTYPES])
def test_misaligned_inputs_same_bits(dtypes):
    value_dtype, sample_dtype = dtypes
    prob = on(make_problem(n=2, q=9, m=2, d=32, shapes=[(6, 7), (3, 4)], p=4, dtype=value_dtype,
                           loc_dtype=sample_dtype, weight_dtype=sample_dtype, seed=8))
    grad = grad_output_for(prob).to(DEVICE)
    want, want_grads = run_op(prob, grad)
    shifted = {k: _misaligned(prob[k]).requires_grad_() for k in DIFF_KEYS}
    out = msda.ms_deform_attn(shifted["value"], prob["spatial_shapes"], prob["level_start_index"],
                              shifted["sampling_locations"], shifted["attention_weights"])
    assert_bitwise(out.detach(), want, "output")
    for k, g in _grads_of(out, [shifted[k] for k in DIFF_KEYS], _misaligned(grad)).items():
        assert_bitwise(g, want_grads[k], k)


def test_fused_noncontiguous_and_misaligned_inputs_same_bits():
    prob = on(fused_problem(n=2, q=6, m=3, d=8, coords=4, dtype=BF16, ref_dtype=F32, off_dtype=BF16,
                            logit_dtype=F32, seed=4))
    grad = torch.randn(2, 6, 24, device=DEVICE).to(BF16)
    want, want_grads = run_fused(prob, grad)
    changed = dict(prob)
    changed["value"] = _misaligned(prob["value"])
    changed["reference_points"] = prob["reference_points"].transpose(1, 2).contiguous().transpose(1, 2)
    changed["sampling_offsets"] = prob["sampling_offsets"].transpose(-1, -2).contiguous().transpose(-1, -2)
    changed["attention_logits"] = _misaligned(prob["attention_logits"])
    out, grads = run_fused(changed, grad.transpose(1, 2).contiguous().transpose(1, 2))
    assert_bitwise(out, want, "output")
    for k in FUSED_DIFF:
        assert_bitwise(grads[k], want_grads[k], k)


def test_expanded_stride0_inputs():
    """One set of locations and weights broadcast over the batch (stride 0)."""
    prob = on(make_problem(n=1, q=6, m=2, d=8, shapes=[(3, 4)], p=2, dtype=F32, seed=9))
    value = torch.randn(3, *prob["value"].shape[1:], device=DEVICE)
    loc = prob["sampling_locations"].expand(3, -1, -1, -1, -1, -1)
    weights = prob["attention_weights"].expand(3, -1, -1, -1, -1)
    out = msda.ms_deform_attn(value, prob["spatial_shapes"], prob["level_start_index"], loc, weights)
    want = msda.ms_deform_attn(value, prob["spatial_shapes"], prob["level_start_index"], loc.contiguous(),
                               weights.contiguous())
    assert_bitwise(out, want, "output")


def test_int32_index_tensors_same_bits():
    prob = on(make_problem(n=2, q=9, m=2, d=5, shapes=[(5, 6), (3, 3), (1, 2)], p=3, dtype=F32, lo=-0.1, hi=1.1,
                           seed=11))
    grad = grad_output_for(prob).to(DEVICE)
    want, want_grads = run_op(prob, grad)
    shapes32, starts32 = prob["spatial_shapes"].int(), prob["level_start_index"].int()
    for shapes, starts in ((shapes32, starts32), (shapes32, prob["level_start_index"]),
                           (prob["spatial_shapes"], starts32)):
        out, grads = run_op(dict(prob, spatial_shapes=shapes, level_start_index=starts), grad)
        assert_bitwise(out, want, "output")
        for k in DIFF_KEYS:
            assert_bitwise(grads[k], want_grads[k], k)


def test_fused_int32_index_tensors_same_bits():
    prob = on(fused_problem(coords=2, dtype=F32, seed=3))
    grad = torch.randn(2, 6, 12, device=DEVICE)
    want, want_grads = run_fused(prob, grad)
    out, grads = run_fused(dict(prob, spatial_shapes=prob["spatial_shapes"].int(),
                                level_start_index=prob["level_start_index"].int()), grad)
    assert_bitwise(out, want, "output")
    for k in FUSED_DIFF:
        assert_bitwise(grads[k], want_grads[k], k)


@pytest.mark.parametrize("wanted", [("value",), ("sampling_locations", "attention_weights"), ()],
                         ids=["value_only", "samples_only", "none"])
def test_partial_gradients_same_bits(wanted):
    """Only some inputs require grad: the op computes those (and the forward) bit for bit as when
    all three do."""
    prob = on(make_problem(n=2, q=30, m=2, d=16, shapes=[(6, 7), (3, 4)], p=4, dtype=BF16, loc_dtype=F32,
                           weight_dtype=F32, seed=12))
    grad = grad_output_for(prob).to(DEVICE)
    want, want_grads = run_op(prob, grad)
    inputs = {k: prob[k].detach().clone().requires_grad_(k in wanted) for k in DIFF_KEYS}
    out = msda.ms_deform_attn(inputs["value"], prob["spatial_shapes"], prob["level_start_index"],
                              inputs["sampling_locations"], inputs["attention_weights"])
    assert_bitwise(out.detach(), want, "output")
    if wanted:
        got = torch.autograd.grad(out, [inputs[k] for k in wanted], grad)
        for k, g in zip(wanted, got):
            assert_bitwise(g, want_grads[k], k)
    else:
        assert not out.requires_grad


# ---- determinism and the atomicAdd ablation ---------------------------------------------------

# Thousands of samples on each of a few pixels: an order-dependent sum of grad_value shows here.
COLLIDING = dict(n=2, q=3000, m=2, d=32, shapes=[(2, 2), (3, 3)], p=4)
# Every sample on the single pixel of a 1x1 map: one grad_value row per head takes 40000 terms.
HOT_ROW = dict(n=1, q=10000, m=2, d=8, shapes=[(1, 1)], p=4)
DETERMINISM_DTYPES = [(F32, F32), (BF16, F32), (F16, F16), (F64, F64)]


def _collision_problem(shape, dtypes, seed):
    """A COLLIDING or HOT_ROW problem on the GPU and its grad_output."""
    value_dtype, sample_dtype = dtypes
    prob = on(make_problem(dtype=value_dtype, loc_dtype=sample_dtype, weight_dtype=sample_dtype, seed=seed, **shape))
    return prob, grad_output_for(prob, seed=seed + 1).to(DEVICE)


@pytest.mark.parametrize("dtypes", DETERMINISM_DTYPES, ids=[f"{_name(v)}-{_name(s)}" for v, s in DETERMINISM_DTYPES])
@pytest.mark.parametrize("shape", [COLLIDING, HOT_ROW], ids=["colliding", "hot_row"])
def test_backward_bitwise_across_runs(shape, dtypes):
    prob, grad = _collision_problem(shape, dtypes, seed=21)
    first_out, first = check_op(prob, grad)
    for run in range(2):
        poison_allocator(_bytes(prob["value"]), prob["value"].numel() * 4)
        out, grads = run_op(prob, grad)
        assert_bitwise(out, first_out, f"output, run {run + 2}")
        for k in DIFF_KEYS:
            assert_bitwise(grads[k], first[k], f"grad {k}, run {run + 2}")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_name)
def test_fused_backward_bitwise_across_runs(dtype):
    prob = on(fused_problem(n=2, q=2000, m=2, d=32, shapes=[(2, 2), (3, 3)], p=4, coords=2, dtype=dtype,
                            ref_dtype=F32, off_dtype=F32, logit_dtype=F32, seed=7))
    grad = torch.randn(2, 2000, 64, device=DEVICE).to(dtype)
    first_out, first = run_fused(prob, grad)
    for _ in range(2):
        out, grads = run_fused(prob, grad)
        assert_bitwise(out, first_out, "output")
        for k in FUSED_DIFF:
            assert_bitwise(grads[k], first[k], k)


def test_deterministic_by_default_and_setter_returns_previous():
    assert msda.set_cuda_deterministic(True) is True  # the default, and every test here restores it
    try:
        assert msda.set_cuda_deterministic(False) is True
        assert msda.set_cuda_deterministic(False) is False
    finally:
        msda.set_cuda_deterministic(True)


def _atomic(fn, *args):
    """fn(*args) with grad_value by float atomicAdd, the deterministic default restored after."""
    previous = msda.set_cuda_deterministic(False)
    try:
        return fn(*args)
    finally:
        msda.set_cuda_deterministic(previous)


@pytest.mark.parametrize("dtypes", DETERMINISM_DTYPES, ids=[f"{_name(v)}-{_name(s)}" for v, s in DETERMINISM_DTYPES])
@pytest.mark.parametrize("shape", [COLLIDING, HOT_ROW], ids=["colliding", "hot_row"])
def test_atomic_mode_agrees_with_deterministic(shape, dtypes):
    value_dtype, sample_dtype = dtypes
    prob, grad = _collision_problem(shape, dtypes, seed=24)
    out, grads = check_op(prob, grad)
    atomic_out, atomic_grads = _atomic(check_op, prob, grad)  # within SPEC's bounds of the oracle too
    tol = tol_for(value_dtype, sample_dtype)
    assert_rel(atomic_out, out, tol, "output")
    for k in DIFF_KEYS:
        assert_rel(atomic_grads[k], grads[k], tol, k)
    assert msda.set_cuda_deterministic(True) is True


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_name)
def test_fused_atomic_mode_agrees_with_deterministic(dtype):
    cpu = fused_problem(n=2, q=2000, m=2, d=32, shapes=[(2, 2), (3, 3)], p=4, coords=4, dtype=dtype, ref_dtype=F32,
                        off_dtype=F32, logit_dtype=F32, seed=8)
    grad = torch.randn(2, 2000, 64, dtype=F64).to(dtype)
    want, want_grads = run_fused(cpu, grad.double(), cast=F64)
    out, grads = _atomic(run_fused, on(cpu), grad.to(DEVICE))
    assert_rel(out.cpu(), want, TOL[dtype], "output")
    for k in FUSED_DIFF:
        assert grads[k].dtype == cpu[k].dtype, k
        assert_rel(grads[k].cpu(), want_grads[k], TOL[dtype], k)


# ---- a named workload of SPEC -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16], ids=_name)
@pytest.mark.parametrize("name", ["rtdetr-dec", "ddetr-enc"])
def test_named_workload_vs_float64_cpu(name, dtype):
    """A real pyramid (ddetr-enc: S = Q = 17821), as SPEC draws its inputs; bf16 with autocast's
    f32 locations and weights. The backward is bitwise repeatable on it too."""
    w = msda.workloads.find(name)
    value, shapes, starts, loc, weights = msda.workloads.generate(w, dtype=dtype, seed=1)
    prob = on(dict(value=value, spatial_shapes=shapes, level_start_index=starts, sampling_locations=loc,
                   attention_weights=weights))
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(w.batch, w.num_queries, w.heads * w.channels, generator=gen).to(dtype).to(DEVICE)
    out, grads = check_op(prob, grad)
    again, again_grads = run_op(prob, grad)
    assert_bitwise(again, out, "output")
    for k in DIFF_KEYS:
        assert_bitwise(again_grads[k], grads[k], k)


# ---- streams and devices ----------------------------------------------------------------------

def test_runs_on_the_callers_stream():
    """Inputs written on a side stream after a long sleep: a kernel launched on any other stream
    than the current one would read them before they exist."""
    prob = on(make_problem(n=2, q=500, m=4, d=32, shapes=[(20, 30), (10, 15)], p=4, dtype=F32, seed=14))
    grad = grad_output_for(prob).to(DEVICE)
    source = {k: prob[k] + 1 for k in ("value", "attention_weights")}  # kept alive: never reused blocks
    want, want_grads = run_op(dict(prob, **source), grad)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU clock
        inputs = {"value": prob["value"] + 1, "sampling_locations": prob["sampling_locations"].clone(),
                  "attention_weights": prob["attention_weights"] + 1}
        for t in inputs.values():
            t.requires_grad_()
        out = msda.ms_deform_attn(inputs["value"], prob["spatial_shapes"], prob["level_start_index"],
                                  inputs["sampling_locations"], inputs["attention_weights"])
        torch.cuda._sleep(100_000_000)
        side_grad = grad * 1
        grads = _grads_of(out, [inputs[k] for k in DIFF_KEYS], side_grad)
    side.synchronize()
    assert_bitwise(out.detach(), want, "output")
    for k in DIFF_KEYS:
        assert_bitwise(grads[k], want_grads[k], k)


def _call(prob):
    return msda.ms_deform_attn(*(prob[k] for k in ORDER))


# ---- no host synchronisation per call; CUDA graphs ---------------------------------------------

def _graph_problem(seed, dtype=F32):
    return on(make_problem(n=2, q=50, m=4, d=8, shapes=[(10, 12), (5, 6), (3, 3)], p=4, dtype=dtype,
                           lo=-0.05, hi=1.05, seed=seed))


def _leaves(prob, keys):
    return {k: prob[k].detach().clone().requires_grad_() for k in keys}


def test_no_host_sync_once_the_shapes_are_known():
    """The first call copies spatial_shapes and level_start_index to the host; later calls with
    the same (unchanged) tensors read msda's copy: no device-to-host copy, no stream
    synchronisation, in the forward, the backward and the fused op. torch's sync debug mode makes
    any synchronising call an error."""
    prob = _graph_problem(1)
    grad = grad_output_for(prob).to(DEVICE)
    fused = on(fused_problem(coords=4, dtype=F32, seed=3))
    fused_grad = torch.randn(2, 6, 12, device=DEVICE)
    plain, fused_leaves = _leaves(prob, DIFF_KEYS), _leaves(fused, FUSED_DIFF)

    def step():
        out = msda.ms_deform_attn(plain["value"], prob["spatial_shapes"], prob["level_start_index"],
                                  plain["sampling_locations"], plain["attention_weights"])
        torch.autograd.grad(out, list(plain.values()), grad)
        out = msda.ms_deform_attn_fused(fused_leaves["value"], fused["spatial_shapes"], fused["level_start_index"],
                                        fused_leaves["reference_points"], fused_leaves["sampling_offsets"],
                                        fused_leaves["attention_logits"])
        torch.autograd.grad(out, list(fused_leaves.values()), fused_grad)

    step()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # The sync debug mode sees torch's runtime only, not msda's own (static) one: a GPU kept
        # busy for a second before the calls must still be busy after them.
        torch.cuda._sleep(2_000_000_000)
        step()
        assert not torch.cuda.current_stream().query(), "a call waited for the stream"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


def test_shapes_changed_in_place_are_honoured():
    """msda keeps the host copy by tensor and version: an in-place write makes it read them again."""
    prob = on(make_problem(n=1, q=6, m=2, d=4, shapes=[(3, 4), (2, 5)], p=2, dtype=F32, seed=3))
    first = _call(prob)
    prob["spatial_shapes"][0] = torch.tensor([4, 3], device=DEVICE)
    second = _call(prob)
    fresh = _call(dict(prob, spatial_shapes=torch.tensor([[4, 3], [2, 5]], device=DEVICE)))
    assert_bitwise(second, fresh, "output after the in-place write")
    assert not torch.equal(second, first)


def test_cuda_graph_replays_with_new_inputs_equal_eager():
    """torch.cuda.graph captures forward and backward (plain op: the deterministic grad_value's
    sort, chunk sums and combine included); replays with new inputs copied into the captured
    tensors give eager's results bit for bit."""
    static = _graph_problem(2)
    leaves = _leaves(static, DIFF_KEYS)
    static_grad = grad_output_for(static).to(DEVICE)
    args = lambda: (leaves["value"], static["spatial_shapes"], static["level_start_index"],  # noqa: E731
                    leaves["sampling_locations"], leaves["attention_weights"])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch.cuda.graph asks: it also makes msda read the shapes
        for _ in range(2):
            torch.autograd.grad(msda.ms_deform_attn(*args()), list(leaves.values()), static_grad)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = msda.ms_deform_attn(*args())
        static_grads = torch.autograd.grad(static_out, list(leaves.values()), static_grad)
    for seed in (5, 6):
        fresh = _graph_problem(seed)
        fresh_grad = grad_output_for(fresh, seed=seed).to(DEVICE)
        with torch.no_grad():
            for k in DIFF_KEYS:
                leaves[k].copy_(fresh[k])
            static_grad.copy_(fresh_grad)
        graph.replay()
        want, want_grads = run_op(fresh, fresh_grad)
        assert_bitwise(static_out.detach(), want, f"replayed output, seed {seed}")
        for k, g in zip(DIFF_KEYS, static_grads):
            assert_bitwise(g, want_grads[k], f"replayed grad {k}, seed {seed}")


class _Attention(torch.nn.Module):
    """The shapes as buffers, as a model keeps them: cudagraph trees pass buffers as they are
    (static inputs), so the op sees in the capture the tensors it read in the warm-up."""

    def __init__(self, prob):
        super().__init__()
        self.register_buffer("spatial_shapes", prob["spatial_shapes"].clone())
        self.register_buffer("level_start_index", prob["level_start_index"].clone())

    def forward(self, value, locations, weights):
        return msda.ms_deform_attn(value, self.spatial_shapes, self.level_start_index, locations, weights) * 2


def test_compile_reduce_overhead_equals_eager():
    """torch.compile(mode="reduce-overhead") runs the op inside CUDA graphs (cudagraph trees);
    every call, with new inputs, equals eager bit for bit."""
    module = _Attention(_graph_problem(0))
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    for seed in range(1, 5):
        prob = _graph_problem(seed)
        args = (prob["value"], prob["sampling_locations"], prob["attention_weights"])
        got = compiled(*args).clone()
        assert_bitwise(got, module(*args), f"call {seed}")


def test_capturing_with_shapes_msda_has_not_read_is_a_clear_error():
    """Reading a new spatial_shapes would need a device-to-host copy, which a capture forbids:
    the op says so, naming the argument, instead of failing inside CUDA."""
    prob = _graph_problem(7)
    unseen = {k: prob[k].clone() for k in ("spatial_shapes", "level_start_index")}
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the graph it ended is empty
        with torch.cuda.graph(graph):
            _call(dict(prob, **unseen))
    _assert_names(e.value, ["spatial_shapes"])
    assert "capture" in str(e.value), str(e.value)
    torch.cuda.synchronize()
    assert_bitwise(_call(dict(prob, **unseen)), _call(prob), "the op works after the refused capture")


def test_patched_models_reuse_their_index_tensors():
    """msda.patch's functions make spatial_shapes and level_start_index from transformers' list of
    (H, W) once per list and device, so that the op finds its host copy on every later call."""
    from msda.integrations.transformers import _index_tensors
    shapes = [(10, 12), (5, 6)]
    first = _index_tensors(shapes, DEVICE)
    again = _index_tensors([list(s) for s in shapes], DEVICE)
    assert first[0] is again[0] and first[1] is again[1]
    assert first[0].tolist() == [[10, 12], [5, 6]] and first[1].tolist() == [0, 120]


def _assert_names(exc, names):
    msg = str(exc)
    assert "expected" in msg and "got" in msg, msg
    assert any(name in msg for name in names), f"message names none of {names}: {msg}"


@pytest.mark.parametrize("arg", ["sampling_locations", "attention_weights", "spatial_shapes", "level_start_index"])
def test_an_input_on_the_cpu_is_named(arg):
    prob = on(make_problem(dtype=F32, seed=2))
    prob[arg] = prob[arg].cpu()
    with pytest.raises(ValueError) as e:
        _call(prob)
    _assert_names(e.value, [arg])
    assert "cpu" in str(e.value) and "cuda" in str(e.value), str(e.value)


def test_value_on_the_cpu_among_cuda_inputs_is_refused():
    prob = on(make_problem(dtype=F32, seed=2))
    prob["value"] = prob["value"].cpu()
    with pytest.raises(ValueError) as e:
        _call(prob)
    _assert_names(e.value, ORDER[1:])


@pytest.mark.parametrize("arg", ["reference_points", "sampling_offsets", "attention_logits", "spatial_shapes"])
def test_fused_input_on_the_cpu_is_named(arg):
    prob = on(fused_problem(dtype=F32, seed=2))
    prob[arg] = prob[arg].cpu()
    with pytest.raises(ValueError) as e:
        msda.ms_deform_attn_fused(*(prob[k] for k in FUSED_ARGS))
    _assert_names(e.value, [arg])


def _bad_starts(prob):
    prob["level_start_index"] = prob["level_start_index"] + torch.tensor([0, 1], device=DEVICE)


def _bad_dtype(prob):
    prob["sampling_locations"] = prob["sampling_locations"].bfloat16()


def _zero_height(prob):
    prob["spatial_shapes"] = torch.tensor([[0, 4], [2, 5]], device=DEVICE)


def _short_value(prob):
    prob["value"] = prob["value"][:, :-1]


SPOILS = [(_bad_starts, ["level_start_index"]), (_bad_dtype, ["sampling_locations"]),
          (_zero_height, ["spatial_shapes"]), (_short_value, ["value", "spatial_shapes"])]


@pytest.mark.parametrize("spoil,names", SPOILS, ids=["level_start_index", "dtype_mix", "zero_height", "S_mismatch"])
def test_bad_input_on_cuda_names_the_argument(spoil, names):
    """SPEC's checks run before any kernel for CUDA tensors too (the shapes live on the GPU)."""
    prob = on(make_problem(dtype=F32, seed=2))
    spoil(prob)
    with pytest.raises(ValueError) as e:
        _call(prob)
    _assert_names(e.value, names)


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@two_gpus
def test_two_gpus_mixed_is_refused():
    prob = on(make_problem(dtype=F32, seed=2), torch.device("cuda", 1))
    prob["sampling_locations"] = prob["sampling_locations"].to(DEVICE)
    with pytest.raises(ValueError) as e:
        _call(prob)
    _assert_names(e.value, ["sampling_locations"])


@two_gpus
def test_runs_on_the_inputs_gpu_not_the_current_one():
    other = torch.device("cuda", 1 if DEVICE.index == 0 else 0)
    prob = on(make_problem(n=2, q=20, m=2, d=8, dtype=F32, seed=6), other)
    grad = grad_output_for(prob).to(other)
    out, grads = check_op(prob, grad, poison=False)
    assert out.device == other


# ---- the module -------------------------------------------------------------------------------

def _module_on_cuda(mod):
    """A fresh module on the GPU with mod's state dict."""
    twin = msda.MSDeformAttn(d_model=mod.d_model, n_levels=mod.n_levels, n_heads=mod.n_heads,
                             n_points=mod.n_points)
    twin = twin.to(device=DEVICE, dtype=next(mod.parameters()).dtype)
    twin.load_state_dict(mod.state_dict(), strict=True)
    return twin


def _args_on_cuda(args):
    return tuple(None if a is None else a.to(DEVICE) for a in args)


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("coords", [2, 4])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-11), (F32, 1e-5)], ids=["f64", "f32"])
def test_module_on_cuda_equals_cpu(dtype, tol, coords, mask):
    mod, args = module_setup(coords, dtype, seed=coords + 10 * mask, mask=mask)
    grad = torch.randn(args[0].shape, dtype=dtype)
    # f32 on the GPU against the CPU's module in f64: the oracle, not another f32 rounding.
    want, want_grads = module_forward_backward(copy.deepcopy(mod).double(), tuple(
        a.double() if a is not None and a.is_floating_point() else a for a in args), grad.double())
    out, grads = module_forward_backward(_module_on_cuda(mod), _args_on_cuda(args), grad.to(DEVICE))
    assert_like(out, want.shape, dtype, DEVICE, "output")
    assert_rel(out.cpu(), want, tol, "output")
    assert grads.keys() == want_grads.keys()
    for k in grads:
        assert grads[k].device == DEVICE and grads[k].dtype == dtype, k
        assert_rel(grads[k].cpu(), want_grads[k], tol, k)


def test_module_under_autocast_bf16():
    mod, args = module_setup(2, F32, seed=3, mask=False)
    mod, args = _module_on_cuda(mod), _args_on_cuda(args)
    with torch.autocast("cuda", dtype=BF16), torch.no_grad(), FusedOpDtypes() as spy:
        mod(*args)
    assert spy.seen == [(BF16, F32, BF16, BF16)], spy.seen
    leaves = [a.clone().requires_grad_() for a in args[:3]]
    with torch.autocast("cuda", dtype=BF16):
        out = mod(*leaves, *args[3:])
    assert_like(out, args[0].shape, BF16, DEVICE, "output")
    out.float().backward(torch.randn_like(out, dtype=F32))
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.dtype == F32 and torch.isfinite(p.grad).all(), name
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    with torch.no_grad():
        want = mod(*args)
    assert_rel(out.float().cpu(), want.cpu(), 3e-2, "autocast output")


def test_module_compiled_fullgraph_equals_eager():
    """torch.compile(fullgraph=True): the CUDA op traces without a graph break (its fake kernel),
    and outputs and gradients equal eager's up to the compiled projections' rounding."""
    torch._dynamo.reset()
    mod, args = module_setup(4, F32, seed=4)
    mod, args = _module_on_cuda(mod), _args_on_cuda(args)
    compiled = torch.compile(copy.deepcopy(mod), fullgraph=True)
    grad = torch.randn(args[0].shape, device=DEVICE)
    out, grads = module_forward_backward(mod, args, grad)
    c_out, c_grads = module_forward_backward(compiled, args, grad)
    assert_rel(c_out, out, 1e-5, "output")
    for k in grads:
        got = c_grads[k] if k in c_grads else c_grads["_orig_mod." + k]
        assert_rel(got, grads[k], 1e-5, k)
