"""msda's CUDA backend against the grid-sample path on the same GPU, on every named workload of
SPEC (msda.workloads draws their inputs), value in float32 and in bfloat16 (locations and weights
float32, as autocast gives them).

For every workload and dtype, first a check: the output and the three gradients of msda (its
deterministic backward, run twice: the two must be bitwise equal, and its atomicAdd backward)
against the grid-sample path in float64 on the same rounded inputs; the largest relative error is
printed, and the exit status is 1 if it breaks SPEC's bound (1e-5 float32, 1e-2 bfloat16) or the
two deterministic runs differ. Then the medians (CUDA events, after warm-up) of the forward and of
forward+backward (all three gradients) for:

- msda: msda.ms_deform_attn on CUDA, deterministic backward (the default);
- msda atomic: the same with msda.set_cuda_deterministic(False), grad_value by float atomicAdd
  (an ablation: the forward is the same kernel, so its column there shows the timing noise);
- grid-sample: msda.ms_deform_attn_pytorch, which computes a bfloat16 value in float32 (as
  autocast runs grid_sample in float32) and gets spatial_shapes as a CPU tensor (as models pass
  a list), so that it needs no device-to-host copy.

msda GB/s counts the bytes of the tensors the op must read or write at least once: value,
sampling_locations, attention_weights and the output; for forward+backward also grad_output and
the three gradients (each once, though a real backward reads the inputs again). "% peak" is that
over the GPU's memory bandwidth: --peak-gbs, else a datasheet figure looked up by the GPU's name,
else the memory clock and bus width the driver reports.

    PYTHONPATH=build/python python bench/gpu_bench.py [--quick] [--workloads rtdetr-dec,bev-sca]
        [--repeats 20] [--json gpu-bench.json]

Exits 77 (skipped) where torch sees no CUDA GPU.
"""
import argparse
import contextlib
import gc
import json
import statistics
import sys
import time

import torch

import msda
from msda.workloads import NAMED, find, generate

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
QUICK_WORKLOADS = ("rtdetr-dec",)
SKIPPED = 77

# Datasheet memory bandwidths (GB/s), matched against torch.cuda.get_device_name() in this order.
PEAK_GBS_BY_NAME = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM, named "NVIDIA H100 80GB HBM3"
    ("A100 80GB PCIe", 1935.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB", 2039.0),
    ("A100", 1555.0),  # the 40 GB parts
]


def peak_bandwidth(device, override):
    """(GB/s, where the figure comes from), or (None, reason)."""
    if override:
        return override, "--peak-gbs"
    name = torch.cuda.get_device_name(device)
    for key, gbs in PEAK_GBS_BY_NAME:
        if key in name:
            return gbs, "datasheet"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        # Double data rate: two transfers per clock over the whole bus.
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width"
    return None, "unknown GPU: pass --peak-gbs"


@contextlib.contextmanager
def backward_mode(deterministic):
    previous = msda.set_cuda_deterministic(deterministic)
    try:
        yield
    finally:
        msda.set_cuda_deterministic(previous)


class Problem:
    """One workload's inputs on the GPU in one dtype, and the three paths over them."""

    def __init__(self, w, dtype, seed, device):
        value, shapes, starts, loc, weights = generate(w, dtype=torch.float32, seed=seed)
        self.workload, self.dtype = w, dtype
        self.value = value.to(device=device, dtype=dtype)
        self.loc, self.weights = loc.to(device), weights.to(device)
        self.shapes, self.starts = shapes.to(device), starts.to(device)
        self.shapes_cpu = shapes
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.grad = torch.randn(w.batch, w.num_queries, w.heads * w.channels, device=device,
                                generator=gen).to(dtype)

    def inputs(self):
        return self.value, self.loc, self.weights

    def msda(self, v, l, a):
        return msda.ms_deform_attn(v, self.shapes, self.starts, l, a)

    def grid_sample(self, v, l, a):
        return msda.ms_deform_attn_pytorch(v, self.shapes_cpu, l, a)

    def forward_bytes(self):
        out = self.grad.numel() * self.value.element_size()
        return sum(t.numel() * t.element_size() for t in self.inputs()) + out

    def backward_bytes(self):
        # The forward's tensors, grad_output, and three gradients the size of the inputs.
        return 2 * self.forward_bytes()


def run_once(path, inputs, grad):
    """(output, grad_value, grad_sampling_locations, grad_attention_weights)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = path(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def relative_error(got, want):
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    norm = want.norm().item()
    diff = (got - want).norm().item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def check(p):
    """msda (both backward modes) against the grid-sample path in float64; and whether two
    deterministic runs are bitwise equal. Returns (error, atomic error, bitwise)."""
    reference = run_once(p.grid_sample, [t.double() for t in p.inputs()], p.grad.double())
    first = run_once(p.msda, p.inputs(), p.grad)
    second = run_once(p.msda, p.inputs(), p.grad)
    bitwise = all(torch.equal(a, b) for a, b in zip(first, second))
    with backward_mode(False):
        atomic = run_once(p.msda, p.inputs(), p.grad)
    error = max(relative_error(a, b) for a, b in zip(first, reference))
    atomic_error = max(relative_error(a, b) for a, b in zip(atomic, reference))
    return error, atomic_error, bitwise


def median_ms(fn, repeats, warmup, budget_s):
    """Median of up to `repeats` timed calls (CUDA events), fewer where one call is so slow that
    they would take more than budget_s (the grid-sample path on the big workloads)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - started
    count = min(repeats, max(3, int(budget_s / max(one, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events), count


def timed_calls(p, path, pass_name):
    if pass_name == "forward":
        def forward():
            with torch.no_grad():
                path(*p.inputs())
        return forward
    leaves = [t.detach().requires_grad_() for t in p.inputs()]

    def forward_backward():
        torch.autograd.grad(path(*leaves), leaves, p.grad)
    return forward_backward


def measure(p, args):
    """Rows of one workload and dtype: forward and forward+backward, all three paths."""
    error, atomic_error, bitwise = check(p)
    rows = []
    for pass_name, moved in (("forward", p.forward_bytes()), ("forward+backward", p.backward_bytes())):
        times = {}
        for name, path, deterministic in (("msda", p.msda, True), ("msda atomic", p.msda, False),
                                          ("grid-sample", p.grid_sample, True)):
            with backward_mode(deterministic):
                times[name] = median_ms(timed_calls(p, path, pass_name), args.repeats, args.warmup, args.budget)
        rows.append({
            "workload": p.workload.name, "shape": p.workload.describe(), "dtype": _dtype_name(p.dtype),
            "pass": pass_name, "bytes": moved,
            **{f"{name} ms": ms for name, (ms, _) in times.items()},
            **{f"{name} repeats": count for name, (_, count) in times.items()},
            "msda GB/s": moved / (times["msda"][0] * 1e-3) / 1e9,
            "rel error": error, "atomic rel error": atomic_error, "bitwise": bitwise,
        })
    return rows


def _dtype_name(dtype):
    return next(k for k, v in DTYPES.items() if v == dtype)


def _ms(x):
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def format_table(rows, peak):
    head = ["workload", "dtype", "pass", "msda ms", "msda atomic ms", "grid-sample ms", "speedup vs grid-sample",
            "atomic speedup", "msda GB/s", "% of peak", "rel error", "atomic rel error", "bitwise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        gbs = r["msda GB/s"]
        cells = [r["workload"], r["dtype"], r["pass"], _ms(r["msda ms"]), _ms(r["msda atomic ms"]),
                 _ms(r["grid-sample ms"]), f"{r['grid-sample ms'] / r['msda ms']:.1f}x",
                 f"{r['msda ms'] / r['msda atomic ms']:.2f}x", f"{gbs:.0f}",
                 "n/a" if peak is None else f"{100 * gbs / peak:.0f}%",
                 f"{r['rel error']:.1e}", f"{r['atomic rel error']:.1e}", "yes" if r["bitwise"] else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(device, peak, peak_source):
    props = torch.cuda.get_device_properties(device)
    return {"gpu": torch.cuda.get_device_name(device), "multiprocessors": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1), "peak_GBps": peak, "peak_source": peak_source,
            "torch": torch.__version__, "cuda": torch.version.cuda, "msda": msda.__version__}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/gpu_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="workloads: " + ", ".join(w.name for w in NAMED))
    parser.add_argument("--workloads", help="comma-separated named workloads (default: all)")
    parser.add_argument("--dtypes", default="f32,bf16", help="comma-separated value dtypes among f32, bf16")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each measurement")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds a measurement may take; slow paths get fewer repeats (at least 3)")
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_WORKLOADS)} only, 2 repeats")
    parser.add_argument("--peak-gbs", type=float, help="the GPU's memory bandwidth in GB/s, for the %% of peak")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the machine as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected >= 1, got {args.repeats}")
    if args.quick:
        args.repeats = min(args.repeats, 2)
    names = args.workloads.split(",") if args.workloads else (QUICK_WORKLOADS if args.quick else [w.name for w in NAMED])
    try:
        args.workload_list = [find(name.strip()) for name in names]
    except ValueError as e:
        parser.error(str(e))
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: expected some of {', '.join(DTYPES)}, got {', '.join(unknown)}")
    args.dtype_list = [DTYPES[d] for d in args.dtypes.split(",")]
    return args


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: torch sees no CUDA GPU; nothing to measure", file=sys.stderr)
        return SKIPPED
    if not (hasattr(msda, "cuda_built") and msda.cuda_built()):
        print("gpu_bench: this msda was built without its CUDA backend (no nvcc at build time): "
              "rebuild it where nvcc is found (scripts/gpu-check.sh does)", file=sys.stderr)
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    peak, peak_source = peak_bandwidth(device, args.peak_gbs)
    info = machine(device, peak, peak_source)
    print(f"gpu_bench: {info['gpu']} ({info['multiprocessors']} SMs, {info['memory_GiB']} GiB, peak "
          + (f"{peak:.0f} GB/s from {peak_source}" if peak else f"n/a: {peak_source}")
          + f"), torch {info['torch']}, CUDA {info['cuda']}, msda {info['msda']}; medians of up to {args.repeats} "
          f"calls (CUDA events) after {args.warmup} warm-up", flush=True)

    started = time.perf_counter()
    rows = []
    for w in args.workload_list:
        for dtype in args.dtype_list:
            p = Problem(w, dtype, args.seed, device)
            rows += measure(p, args)
            del p
            free_memory()
            print(f"  {w.name} {_dtype_name(dtype)}: done at {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    print()
    print(format_table(rows, peak))
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s. speedup = grid-sample ms / msda ms; "
          "atomic speedup = msda ms / msda atomic ms (above 1: atomicAdd is faster); rel error = largest of the "
          "output's and the three gradients' against the grid-sample path in float64; bitwise = two deterministic "
          "backward runs gave the same bits.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "arguments": {k: v for k, v in vars(args).items()
                                                      if k not in ("workload_list", "dtype_list")},
                       "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")

    bad = [f"{r['workload']} {r['dtype']}" for r in rows if r["pass"] == "forward" and not (
        r["rel error"] < BOUNDS[DTYPES[r["dtype"]]] and r["atomic rel error"] < BOUNDS[DTYPES[r["dtype"]]]
        and r["bitwise"])]
    if bad:
        print("gpu_bench: beyond SPEC's bound against float64, or not bitwise repeatable: " + ", ".join(bad),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
