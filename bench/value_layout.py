"""What a head-major value ([N, M, S, D]) would cost the projection that makes it (issue 10).

The kernels gather a head's rows; in value's own layout [N, S, M, D] those rows are M*D apart, in
a head-major one they are contiguous (build/bench/msda_ablation measures both gather floors).
Deformable DETR's value_proj is one Linear, whose output is [N, S, M*D]: the head-major layout
needs either a copy (permute + contiguous) or the projection done per head (one batched matrix
product over M heads of D columns each). This times the three ways to get value, forward and
forward+backward (gradients of the input and of the weight), with the ddetr-enc sizes:

    PYTHONPATH=build/python .venv/bin/python bench/value_layout.py [--repeats 15] [--threads 2] [--quick]
"""
import argparse
import statistics
import time

import torch

from msda.bench import cpu_model


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a small problem, 2 repeats (CI smoke)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, s, c, m = (1, 17821, 256, 8) if not args.quick else (1, 500, 64, 4)
    repeats = 2 if args.quick else args.repeats
    d = c // m
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, s, c, generator=gen, requires_grad=True)
    weight = torch.randn(c, c, generator=gen).mul_(c ** -0.5).requires_grad_()
    bias = torch.zeros(c, requires_grad=True)

    ways = {
        "Linear, [N, S, M, D] view (today)":
            lambda: torch.nn.functional.linear(x, weight, bias).view(n, s, m, d),
        "Linear, then a head-major copy":
            lambda: torch.nn.functional.linear(x, weight, bias).view(n, s, m, d).permute(0, 2, 1, 3).contiguous(),
        "per-head batched matmul, head-major directly":
            lambda: torch.matmul(x.unsqueeze(1), weight.view(m, d, c).transpose(1, 2)) + bias.view(1, m, 1, d),
    }
    reference = ways["Linear, [N, S, M, D] view (today)"]().detach().permute(0, 2, 1, 3)
    for name, way in ways.items():
        got = way().detach()
        got = got if got.shape[1] == m else got.permute(0, 2, 1, 3)
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4, msg=f"{name}: not the same value")

    print(f"value_layout: N={n} S={s} d_model={c} M={m}, f32, {args.threads} threads, median of {repeats}; "
          f"CPU: {cpu_model()}; torch {torch.__version__}")
    print("| way | forward ms | forward+backward ms |\n|---|---:|---:|")
    for name, way in ways.items():
        forward = median_ms(lambda: way(), repeats)

        def step():
            out = way()
            x.grad = weight.grad = bias.grad = None
            out.backward(torch.ones_like(out))

        print(f"| {name} | {forward:.2f} | {median_ms(step, repeats):.2f} |")


if __name__ == "__main__":
    main()
