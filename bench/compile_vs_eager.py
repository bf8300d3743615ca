"""torch.compile vs eager for a Deformable DETR encoder built from msda.MSDeformAttn.

A stack of Deformable DETR encoder layers (MSDeformAttn over the pyramid + FFN, post-norm, at the
published sizes: d_model 256, 8 heads, 4 levels, 4 points, FFN 1024) on SPEC's ddetr-enc pyramid
(100x134, 50x67, 25x34, 13x17: S = 17821 queries), timed in one run: msda and the grid-sample
path, each eager and under torch.compile (fullgraph=True for msda; the grid-sample path has a
data-dependent graph break); forward (eval, no_grad) and
forward+backward (train). Prints the first call's time (compilation included; inductor's on-disk
cache makes it short after the first run on a machine) and the median of --repeats after it, and
checks that compiled outputs equal eager's.

    .venv/bin/python bench/compile_vs_eager.py              # ddetr-enc, 1 layer
    .venv/bin/python bench/compile_vs_eager.py --quick      # seconds: a small pyramid, msda only
"""
import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import msda
from msda.bench import cpu_model


class EncoderLayer(nn.Module):
    def __init__(self, d_model, levels, heads, points, ffn):
        super().__init__()
        self.attn = msda.MSDeformAttn(d_model, levels, heads, points)
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


def inputs_for(levels, d_model, batch):
    g = torch.Generator().manual_seed(0)
    S = sum(h * w for h, w in levels)
    centres = []
    for h, w in levels:
        y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([x.flatten(), y.flatten()], -1))
    ref = torch.cat(centres)[None, :, None].expand(batch, S, len(levels), 2).contiguous()
    starts, s = [], 0
    for h, w in levels:
        starts.append(s)
        s += h * w
    return (torch.randn(batch, S, d_model, generator=g), torch.randn(batch, S, d_model, generator=g), ref,
            torch.tensor(levels), torch.tensor(starts))


def timed(fn, repeats):
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return out, first, statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--kernels", nargs="+", default=["msda", "pytorch"], choices=["msda", "pytorch"],
                    help="msda: the op; pytorch: the grid-sample path")
    ap.add_argument("--quick", action="store_true", help="a small pyramid, msda only, 1 repeat")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [(100, 134), (50, 67), (25, 34), (13, 17)]
    if args.quick:
        levels, args.repeats, args.kernels = [(16, 20), (8, 10)], 1, ["msda"]
    torch.manual_seed(0)
    model = Encoder(args.layers, d_model=256, levels=len(levels), heads=8, points=4, ffn=1024)
    inputs = inputs_for(levels, 256, 1)
    print(f"# torch.compile vs eager: {args.layers} Deformable DETR encoder layer(s), d_model 256, 8 heads, "
          f"4 points, levels {' '.join(f'{h}x{w}' for h, w in levels)} (S = {inputs[0].shape[1]}), batch 1, "
          f"float32, {args.threads} threads; {cpu_model()}; torch {torch.__version__}; median of {args.repeats}")
    print()
    print("| attention | pass | eager ms | compiled ms | compiled / eager | first compiled call s | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    for kernel in args.kernels:
        eager = copy.deepcopy(model)
        for m in eager.modules():
            if isinstance(m, msda.MSDeformAttn):
                m.kernel = kernel
        torch._dynamo.reset()
        # The grid-sample path reads spatial_shapes' values (tolist) to split value per level: a
        # data-dependent graph break, so it compiles only in pieces (fullgraph=False).
        compiled = torch.compile(copy.deepcopy(eager), fullgraph=kernel == "msda")
        for name, train in (("forward", False), ("forward+backward", True)):
            def run(m):
                m.train(train)
                if not train:
                    with torch.no_grad():
                        return m(*inputs)
                out = m(*inputs)
                out.square().mean().backward()
                return out.detach()
            out_e, _, t_e = timed(lambda: run(eager), args.repeats)
            out_c, first, t_c = timed(lambda: run(compiled), args.repeats)
            diff = (out_c - out_e).abs().max().item()
            worst = max(worst, diff)
            print(f"| {kernel if kernel == 'msda' else 'grid-sample'} | {name} | {t_e * 1e3:.1f} | {t_c * 1e3:.1f} | "
                  f"{t_c / t_e:.2f} | {first:.1f} | {diff:.1e} |", flush=True)
    if worst > 1e-3:
        print(f"compiled and eager outputs differ by {worst:.1e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
