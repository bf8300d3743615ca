"""The fused op against the unfused path: what computing the locations and the softmax inside the
kernel saves, on SPEC's ddetr-enc pyramid (100x134, 50x67, 25x34, 13x17: S = Q = 17821) with the
published sizes (d_model 256, 8 heads, 4 levels, 4 points), float32, in one run:

(a) msda.MSDeformAttn, forward (no_grad) and forward+backward: kernel "msda" (fused, the
    default) against "msda-unfused" (the plain op; PyTorch builds the locations and the softmax).
    Target: fused forward+backward >= 1.4x faster.
(b) a training step of a 3-layer Deformable DETR encoder (MSDeformAttn + FFN 1024, post-norm):
    fused against the floor, the same encoder with the unfused module whose sampling is a no-op
    of the same shape. The no-op is exactly
        value.new_zeros(N, Q, M*D) + (value.sum() + sampling_locations.sum() + attention_weights.sum()) * 0
    so the step keeps every projection, the location and softmax arithmetic and their backward,
    the FFN and the norms, but no sampling. Target: fused step <= 0.85x the floor.
(c) the op alone: ms_deform_attn_fused against ms_deform_attn fed locations and weights computed
    beforehand (their cost not counted), forward and forward+backward (all gradients).

Times are medians of --repeats calls after --warmup, all in one run, the variants of a table
called in turn in every round (the machine may be shared: compare within a table). --quick runs a small pyramid once, checks that the fused and unfused
outputs agree, and exits 1 if they do not (a smoke test).

    PYTHONPATH=build/python .venv/bin/python bench/fused_bench.py [--repeats 9] [--threads 2]
    PYTHONPATH=build/python .venv/bin/python bench/fused_bench.py --quick
"""
import argparse
import contextlib
import platform
import statistics
import sys
import time

import torch
from torch import nn

import msda
from msda.bench import cpu_model
import msda.modules

LEVELS = [(100, 134), (50, 67), (25, 34), (13, 17)]
QUICK_LEVELS = [(16, 20), (8, 10)]


def medians_ms(fns, repeats, warmup):
    """Median ms of each function, called in turn in every round (not all repeats of one, then
    the next): load from other work on the machine then falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def pyramid(levels, d_model, seed=0):
    """Encoder inputs: features, positional embedding, reference points at pixel centres."""
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in levels)
    centres = []
    for h, w in levels:
        y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([x.flatten(), y.flatten()], -1))
    ref = torch.cat(centres)[None, :, None].expand(1, S, len(levels), 2).contiguous()
    starts = torch.tensor([0] + [h * w for h, w in levels]).cumsum(0)[:-1]
    return (torch.randn(1, S, d_model, generator=g), torch.randn(1, S, d_model, generator=g), ref,
            torch.tensor(levels), starts)


def noop_sampling(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  im2col_step=None):
    """The floor's attention: zeros of the output's shape that keep the inputs in the graph."""
    n, _, m, d = value.shape
    return (value.new_zeros(n, sampling_locations.shape[1], m * d)
            + (value.sum() + sampling_locations.sum() + attention_weights.sum()) * 0)


@contextlib.contextmanager
def sampling_replaced_by_noop():
    real = msda.modules.ms_deform_attn
    msda.modules.ms_deform_attn = noop_sampling
    try:
        yield
    finally:
        msda.modules.ms_deform_attn = real


def set_kernel(model, kernel):
    for m in model.modules():
        if isinstance(m, msda.MSDeformAttn):
            m.kernel = kernel
    return model


def trained_like(attn):
    """Offsets and weights that depend on the query, as after training (at initialisation the
    offset and logit projections are zero and every query samples the same pattern)."""
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.02)
        attn.attention_weights.weight.normal_(0, 0.05)
    return attn


class EncoderLayer(nn.Module):
    def __init__(self, d_model=256, levels=4, heads=8, points=4, ffn=1024):
        super().__init__()
        self.attn = trained_like(msda.MSDeformAttn(d_model, levels, heads, points))
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Linear(ffn, d_model))
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, ref, shapes, starts):
        src = self.norm1(src + self.attn(src + pos, ref, src, shapes, starts))
        return self.norm2(src + self.ffn(src))


class Encoder(nn.Module):
    def __init__(self, layers, **kw):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**kw) for _ in range(layers))

    def forward(self, src, pos, ref, shapes, starts):
        for layer in self.layers:
            src = layer(src, pos, ref, shapes, starts)
        return src


def table(title, header, rows):
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def verdict(ratio, target, higher_is_better):
    met = ratio >= target if higher_is_better else ratio <= target
    return f"{'met' if met else 'NOT met'} (target {'>=' if higher_is_better else '<='} {target})"


def bench_layer(inputs, repeats, warmup):
    src, pos, ref, shapes, starts = inputs
    torch.manual_seed(0)
    attn = trained_like(msda.MSDeformAttn(256, len(shapes), 8, 4))
    grad = torch.randn(src.shape)
    query = src + pos

    def forward(kernel):
        attn.kernel = kernel
        with torch.no_grad():
            return attn(query, ref, src, shapes, starts)

    def forward_backward(kernel):
        attn.kernel = kernel
        x = src.detach().requires_grad_()
        out = attn(query, ref, x, shapes, starts)
        out.backward(grad)
        attn.zero_grad(set_to_none=True)
        return out.detach()

    diff = (forward("msda") - forward("msda-unfused")).abs().max().item()
    kernels = ("msda", "msda-unfused")
    times = medians_ms([lambda k=k: forward(k) for k in kernels] + [lambda k=k: forward_backward(k) for k in kernels],
                       repeats, warmup)
    return {"msda": (times[0], times[2]), "msda-unfused": (times[1], times[3])}, diff


def profile_layer(inputs, repeats):
    """Self CPU time per forward+backward of the layer, by PyTorch op, for both kernels: where the
    time goes (the projections' GEMMs, msda's ops, PyTorch's elementwise work)."""
    from torch.profiler import ProfilerActivity, profile
    src, pos, ref, shapes, starts = inputs
    torch.manual_seed(0)
    attn = trained_like(msda.MSDeformAttn(256, len(shapes), 8, 4))
    grad = torch.randn(src.shape)
    query = src + pos
    per_kernel = {}
    for kernel in ("msda", "msda-unfused"):
        attn.kernel = kernel

        def forward_backward():
            x = src.detach().requires_grad_()
            attn(query, ref, x, shapes, starts).backward(grad)
            attn.zero_grad(set_to_none=True)

        forward_backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                forward_backward()
        per_kernel[kernel] = {e.key: e.self_cpu_time_total / 1e3 / repeats for e in prof.key_averages()}
    groups = {"GEMMs (aten::mm, addmm)": ("aten::mm", "aten::addmm"),
              "msda op forward": ("msda::ms_deform_attn_fused", "msda::ms_deform_attn"),
              "msda op backward": ("msda::ms_deform_attn_fused_backward", "msda::ms_deform_attn_backward")}
    rows = []
    for name, keys in groups.items():
        rows.append([name] + [f"{sum(t.get(k, 0.0) for k in keys):.1f}" for t in per_kernel.values()])
    grouped = {k for keys in groups.values() for k in keys}
    rows.append(["everything else (elementwise, copies, softmax, autograd)"] +
                [f"{sum(v for k, v in t.items() if k not in grouped):.1f}" for t in per_kernel.values()])
    rows.append(["total"] + [f"{sum(t.values()):.1f}" for t in per_kernel.values()])
    top = sorted(((v, k) for k, v in per_kernel["msda-unfused"].items() if k not in grouped), reverse=True)[:6]
    table("profile of (a), forward+backward: ms per iteration, torch.profiler's self time of each op on the "
          "calling thread (about its wall time: the op's other threads run while it waits)", ["ops", "fused", "unfused"],
          rows)
    print("\nlargest of the unfused path's other ops: " + ", ".join(f"{k} {v:.1f} ms" for v, k in top))


def bench_encoder(inputs, repeats, warmup, layers):
    torch.manual_seed(0)
    model = Encoder(layers, levels=len(inputs[3]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same model

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(*inputs)
        out.square().mean().backward()
        optimizer.step()

    def step_with(kernel, noop=False):
        set_kernel(model, kernel)
        with sampling_replaced_by_noop() if noop else contextlib.nullcontext():
            step()

    fused, unfused, floor = medians_ms([lambda: step_with("msda"), lambda: step_with("msda-unfused"),
                                        lambda: step_with("msda-unfused", noop=True)], repeats, warmup)
    set_kernel(model, "msda")
    return fused, unfused, floor


def op_inputs(levels, seed=0):
    """ddetr-enc op inputs (SPEC's encoder locations: pixel-centre references, offsets uniform in
    [-4, 4] pixels, standard normal logits) and the plain op's locations and weights from them."""
    g = torch.Generator().manual_seed(seed)
    n, m, d, p, num_levels = 1, 8, 32, 4, len(levels)
    _, _, ref, shapes, starts = pyramid(levels, 8, seed)
    S = ref.shape[1]
    value = torch.randn(n, S, m, d, generator=g)
    offsets = 8 * torch.rand(n, S, m, num_levels, p, 2, generator=g) - 4
    logits = torch.randn(n, S, m, num_levels * p, generator=g)
    normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1).float()
    locations = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    weights = logits.softmax(-1).view(n, S, m, num_levels, p)
    return value, shapes, starts, ref, offsets, logits, locations, weights


def bench_op(levels, repeats, warmup):
    value, shapes, starts, ref, offsets, logits, locations, weights = op_inputs(levels)
    grad = torch.randn(value.shape[0], ref.shape[1], value.shape[2] * value.shape[3])

    def run(fused, backward, reference_grad=True):
        leaves = [t.detach().requires_grad_(backward) for t in
                  ((value, ref, offsets, logits) if fused else (value, locations, weights))]
        if fused and not reference_grad:  # an encoder's reference points are constants
            leaves[1].requires_grad_(False)
        if fused:
            out = msda.ms_deform_attn_fused(leaves[0], shapes, starts, *leaves[1:])
        else:
            out = msda.ms_deform_attn(leaves[0], shapes, starts, *leaves[1:])
        if backward:
            out.backward(grad)
        return out.detach()

    with torch.no_grad():
        diff = (run(True, False) - run(False, False)).abs().max().item()
    variants = [(True, False), (True, True), (False, False), (False, True), (True, True, False)]
    times = medians_ms([lambda v=v: run(*v) for v in variants], repeats, warmup)
    return dict(zip(variants, times)), diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=3, help="encoder layers of (b)")
    ap.add_argument("--parts", default="abc", help="which of the benchmarks (a), (b), (c) to run")
    ap.add_argument("--profile", action="store_true", help="also break (a) down by PyTorch op (torch.profiler)")
    ap.add_argument("--quick", action="store_true", help="a small pyramid, one repeat: a smoke test")
    args = ap.parse_args(argv)
    levels = LEVELS
    if args.quick:
        levels, args.repeats, args.warmup = QUICK_LEVELS, 1, 1
    torch.set_num_threads(args.threads)
    S = sum(h * w for h, w in levels)
    print(f"# fused vs unfused MSDA: levels {' '.join(f'{h}x{w}' for h, w in levels)} (S = Q = {S}), batch 1, "
          f"d_model 256, 8 heads, 4 points, float32, {args.threads} threads; {cpu_model()}; torch {torch.__version__}; "
          f"median of {args.repeats} after {args.warmup} warm-up calls")
    worst = 0.0
    inputs = pyramid(levels, 256)

    if "a" in args.parts:
        results, diff = bench_layer(inputs, args.repeats, args.warmup)
        worst = max(worst, diff)
        (ff, fb), (uf, ub) = results["msda"], results["msda-unfused"]
        table("(a) msda.MSDeformAttn layer", ["pass", "fused ms", "unfused ms", "unfused / fused", "verdict"], [
            ["forward", f"{ff:.2f}", f"{uf:.2f}", f"{uf / ff:.2f}x", ""],
            ["forward+backward", f"{fb:.2f}", f"{ub:.2f}", f"{ub / fb:.2f}x", verdict(ub / fb, 1.4, True)],
        ])
        print(f"\nmax |fused - unfused| of the layer output: {diff:.1e}")
        if args.profile:
            profile_layer(inputs, args.repeats)

    if "b" in args.parts:
        fused, unfused, floor = bench_encoder(inputs, args.repeats, args.warmup, args.layers)
        table(f"(b) {args.layers}-layer Deformable DETR encoder, training step (forward, backward, SGD step)",
              ["attention", "step ms", "/ floor", "verdict"], [
                  ["msda fused", f"{fused:.1f}", f"{fused / floor:.3f}", verdict(fused / floor, 0.85, False)],
                  ["msda unfused", f"{unfused:.1f}", f"{unfused / floor:.3f}", ""],
                  ["floor: unfused, sampling a no-op", f"{floor:.1f}", "1.000", ""],
              ])

    if "c" in args.parts:
        times, diff = bench_op(levels, args.repeats, args.warmup)
        worst = max(worst, diff)
        table("(c) the op alone (plain op: locations and weights computed beforehand, not timed)",
              ["pass", "fused ms", "plain ms", "fused / plain"], [
                  ["forward", f"{times[True, False]:.2f}", f"{times[False, False]:.2f}",
                   f"{times[True, False] / times[False, False]:.2f}"],
                  ["forward+backward", f"{times[True, True]:.2f}", f"{times[False, True]:.2f}",
                   f"{times[True, True] / times[False, True]:.2f}"],
                  ["forward+backward, reference points constant", f"{times[True, True, False]:.2f}",
                   f"{times[False, True]:.2f}", f"{times[True, True, False] / times[False, True]:.2f}"],
              ])
        print(f"\nmax |fused - plain| of the op output: {diff:.1e}")

    if worst > 1e-3:
        print(f"fused and unfused outputs differ by {worst:.1e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
