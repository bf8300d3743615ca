"""msda's CUDA backend against the grid-sample path on the same GPU, on every named workload of
SPEC (msda.workloads draws their inputs), value in float32 and in bfloat16 (locations and weights
float32, as autocast gives them).

For every workload and dtype, first a check: the output and the three gradients of msda (its
deterministic backward, run twice: the two must be bitwise equal, and its atomicAdd backward)
against the grid-sample path in float64 on the same rounded inputs; the largest relative error is
printed, and the exit status is 1 if it breaks SPEC's bound (1e-5 float32, 1e-2 bfloat16) or the
two deterministic runs differ. (The checks run msda through autograd: msda.ms_deform_attn and
torch.autograd.grad.) Then the medians (CUDA events, after warm-up) of the forward and of
forward+backward (all three gradients) for:

- msda: msda's ops called directly, the way ddetr-cuda is, so that neither pays for autograd:
  forward = torch.ops.msda.ms_deform_attn(value, spatial_shapes, level_start_index,
  sampling_locations, attention_weights); forward+backward = that forward, then
  torch.ops.msda.ms_deform_attn_backward(grad_output, value, ..., attention_weights,
  [True, True, True]) (which samples again: it needs no forward output). Both under
  torch.no_grad() on tensors that do not require grad: the dispatcher still passes through msda's
  autograd kernel, which then builds no graph. Deterministic backward (the default);
- msda atomic: the same calls with msda.set_cuda_deterministic(False), grad_value by float
  atomicAdd (an ablation: the forward is the same kernel, so its column there shows the timing
  noise);
- grid-sample: msda.ms_deform_attn_pytorch, which computes a bfloat16 value in float32 (as
  autocast runs grid_sample in float32) and gets spatial_shapes as a CPU tensor (as models pass
  a list), so that it needs no device-to-host copy. Through autograd, the only way it has a
  backward: forward under torch.no_grad(), forward+backward = the forward on leaves that require
  grad, then torch.autograd.grad of the three. Its column therefore includes autograd's overhead
  (small beside its own time);
- ddetr-cuda: Deformable DETR's own CUDA kernel (the MultiScaleDeformableAttention extension of its
  models/ops), the baseline of issue 11's targets, float32 rows only (it has no bfloat16), where
  that extension imports: scripts/gpu-check.sh builds it from build-ddetr/src when present. Called
  directly like msda (same helper, under torch.no_grad()): forward = its ms_deform_attn_forward,
  forward+backward = that, then its ms_deform_attn_backward (which, like msda's, samples again),
  with im2col_step = the batch. Its output and gradients are checked against the same float64
  reference and the error printed, never failing the run: it is a baseline. A last line per
  workload says whether issue 11's targets hold on float32: msda's forward at least 2x and
  forward+backward at least 3x faster than ddetr-cuda.

msda GB/s counts the bytes of the tensors the op must read or write at least once: value,
sampling_locations, attention_weights and the output; for forward+backward also grad_output and
the three gradients (each once, though a real backward reads the inputs again), over msda's
(direct) time. Every row (workload, dtype, pass) has its own. "% peak" is that over the GPU's
memory bandwidth: --peak-gbs, else a datasheet figure looked up by the GPU's name,
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

# Deformable DETR's kernel dispatches on value's dtype with AT_DISPATCH_FLOATING_TYPES.
DDETR_DTYPES = (torch.float32, torch.float64)
# Issue 11's targets: msda's speedup over ddetr-cuda on float32, per pass.
TARGETS = {"forward": 2.0, "forward+backward": 3.0}
# Beyond this relative error ddetr-cuda's output is wrong, not just rounded differently (its kernels
# report launch errors with a printf and go on, e.g. built for another GPU, leaving zeros), and its
# times say nothing about the targets.
DDETR_TRUSTED = 1e-3
DDETR_HOWTO = ("put a copy of github.com/fundamentalvision/Deformable-DETR (or its models/ops) in build-ddetr/src "
               "and run scripts/gpu-check.sh, which builds it into build-ddetr/lib and puts that on PYTHONPATH")

# How each column is timed (printed, and written to the JSON); the module docstring says more.
TIMING = {
    "msda": "torch.ops.msda.ms_deform_attn, then ms_deform_attn_backward (all 3 gradients), called directly "
            "under torch.no_grad() (no autograd); deterministic backward",
    "msda atomic": "as msda, with msda.set_cuda_deterministic(False)",
    "grid-sample": "msda.ms_deform_attn_pytorch through autograd (torch.autograd.grad of the 3 inputs): "
                   "it has no backward of its own",
    "ddetr-cuda": "MultiScaleDeformableAttention.ms_deform_attn_forward, then ms_deform_attn_backward, called "
                  "directly under torch.no_grad(), im2col_step = the batch",
}

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


def load_ddetr():
    """(Deformable DETR's extension module, None) or (None, why not). torch is imported first: the
    extension links against the libraries it loads."""
    try:
        import MultiScaleDeformableAttention as ext
    except ModuleNotFoundError:
        return None, "not built"
    except ImportError as e:  # e.g. built against another torch: undefined symbols
        return None, f"does not import ({e})"
    return ext, None


@contextlib.contextmanager
def backward_mode(deterministic):
    previous = msda.set_cuda_deterministic(deterministic)
    try:
        yield
    finally:
        msda.set_cuda_deterministic(previous)


class Problem:
    """One workload's inputs on the GPU in one dtype, and the paths over them."""

    def __init__(self, w, dtype, seed, device, ddetr=None):
        value, shapes, starts, loc, weights = generate(w, dtype=torch.float32, seed=seed)
        self.workload, self.dtype = w, dtype
        self.value = value.to(device=device, dtype=dtype)
        self.loc, self.weights = loc.to(device), weights.to(device)
        self.shapes, self.starts = shapes.to(device), starts.to(device)
        self.shapes_cpu = shapes
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.grad = torch.randn(w.batch, w.num_queries, w.heads * w.channels, device=device,
                                generator=gen).to(dtype)
        # Deformable DETR's extension where it can run this dtype, else None. Its kernels read the
        # locations and weights as value's type, which they are for the dtypes it takes.
        self.ddetr = ddetr if dtype in DDETR_DTYPES else None

    def inputs(self):
        return self.value, self.loc, self.weights

    def msda(self, v, l, a):
        """Through autograd (the checks)."""
        return msda.ms_deform_attn(v, self.shapes, self.starts, l, a)

    def msda_forward(self):
        """msda's forward op, called directly as ddetr_forward is (the timings)."""
        return torch.ops.msda.ms_deform_attn(self.value, self.shapes, self.starts, self.loc, self.weights)

    def msda_backward(self):
        """(grad_value, grad_sampling_locations, grad_attention_weights) from msda's backward op, called
        directly; like ddetr_backward it needs no forward output: it samples again."""
        return torch.ops.msda.ms_deform_attn_backward(self.grad, self.value, self.shapes, self.starts, self.loc,
                                                      self.weights, [True, True, True])

    def grid_sample(self, v, l, a):
        return msda.ms_deform_attn_pytorch(v, self.shapes_cpu, l, a)

    def ddetr_forward(self):
        # im2col_step = the batch: its kernels want the batch divisible by it, and one step over the
        # whole batch is what its models (im2col_step 64, batches up to 64) run.
        return self.ddetr.ms_deform_attn_forward(self.value, self.shapes, self.starts, self.loc, self.weights,
                                                 self.workload.batch)

    def ddetr_backward(self):
        """(grad_value, grad_sampling_locations, grad_attention_weights); its backward needs no
        forward output: it samples again."""
        return self.ddetr.ms_deform_attn_backward(self.value, self.shapes, self.starts, self.loc, self.weights,
                                                  self.grad, self.workload.batch)

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
    """msda (both backward modes) and ddetr-cuda (where it runs) against the grid-sample path in
    float64; and whether two deterministic runs are bitwise equal. Returns (error, atomic error,
    bitwise, ddetr-cuda error or None)."""
    reference = run_once(p.grid_sample, [t.double() for t in p.inputs()], p.grad.double())
    first = run_once(p.msda, p.inputs(), p.grad)
    second = run_once(p.msda, p.inputs(), p.grad)
    bitwise = all(torch.equal(a, b) for a, b in zip(first, second))
    with backward_mode(False):
        atomic = run_once(p.msda, p.inputs(), p.grad)
    error = max(relative_error(a, b) for a, b in zip(first, reference))
    atomic_error = max(relative_error(a, b) for a, b in zip(atomic, reference))
    ddetr_error = None
    if p.ddetr is not None:
        try:
            ddetr = (p.ddetr_forward(), *p.ddetr_backward())
        except RuntimeError as e:
            # Its argument checks: a baseline that cannot run is reported, not a failure of msda.
            print(f"gpu_bench: ddetr-cuda failed on {p.workload.name}, left out there: {e}", file=sys.stderr)
            p.ddetr = None
        else:
            ddetr_error = max(relative_error(a, b) for a, b in zip(ddetr, reference))
    return error, atomic_error, bitwise, ddetr_error


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


def direct_calls(forward, backward, pass_name):
    """The timed call of msda and ddetr-cuda alike: their ops called directly under torch.no_grad(),
    the forward, or the forward then the backward (neither backward takes the forward's output)."""
    if pass_name == "forward":
        def forward_only():
            with torch.no_grad():
                forward()
        return forward_only

    def forward_backward():
        with torch.no_grad():
            forward()
            backward()
    return forward_backward


def autograd_calls(p, path, pass_name):
    """The timed call of the grid-sample path, which has no backward but autograd's."""
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
    """Rows of one workload and dtype: forward and forward+backward, all paths."""
    error, atomic_error, bitwise, ddetr_error = check(p)
    rows = []
    for pass_name, moved in (("forward", p.forward_bytes()), ("forward+backward", p.backward_bytes())):
        times = {}
        for name, deterministic in (("msda", True), ("msda atomic", False)):
            with backward_mode(deterministic):
                times[name] = median_ms(direct_calls(p.msda_forward, p.msda_backward, pass_name), args.repeats,
                                        args.warmup, args.budget)
        times["grid-sample"] = median_ms(autograd_calls(p, p.grid_sample, pass_name), args.repeats, args.warmup,
                                         args.budget)
        ddetr_ms, ddetr_count = (None, None) if p.ddetr is None else median_ms(
            direct_calls(p.ddetr_forward, p.ddetr_backward, pass_name), args.repeats, args.warmup, args.budget)
        rows.append({
            "workload": p.workload.name, "shape": p.workload.describe(), "dtype": _dtype_name(p.dtype),
            "pass": pass_name, "bytes": moved,
            **{f"{name} ms": ms for name, (ms, _) in times.items()},
            **{f"{name} repeats": count for name, (_, count) in times.items()},
            "msda GB/s": moved / (times["msda"][0] * 1e-3) / 1e9,
            "rel error": error, "atomic rel error": atomic_error, "bitwise": bitwise,
            # None where it did not run: a dtype it lacks, not built, or it raised.
            "ddetr-cuda ms": ddetr_ms, "ddetr-cuda repeats": ddetr_count, "ddetr-cuda rel error": ddetr_error,
        })
    return rows


def _dtype_name(dtype):
    return next(k for k, v in DTYPES.items() if v == dtype)


def _ms(x):
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _ddetr_cells(r, ddetr_missing):
    """ddetr-cuda ms, msda vs ddetr, ddetr rel error."""
    if r["ddetr-cuda ms"] is not None:
        return [_ms(r["ddetr-cuda ms"]), f"{r['ddetr-cuda ms'] / r['msda ms']:.2f}x",
                f"{r['ddetr-cuda rel error']:.1e}"]
    if DTYPES[r["dtype"]] not in DDETR_DTYPES:
        return ["n/a (f32/f64 only)", "n/a", "n/a"]
    # Not built (said above the table), or it raised on this workload (said as it happened).
    return ["n/a" if ddetr_missing else "failed", "n/a", "n/a"]


def format_table(rows, peak, ddetr_missing):
    head = ["workload", "dtype", "pass", "msda ms", "msda atomic ms", "grid-sample ms", "speedup vs grid-sample",
            "atomic speedup", "msda GB/s", "% of peak", "rel error", "atomic rel error", "bitwise",
            "ddetr-cuda ms", "msda vs ddetr", "ddetr rel error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        gbs = r["msda GB/s"]
        cells = [r["workload"], r["dtype"], r["pass"], _ms(r["msda ms"]), _ms(r["msda atomic ms"]),
                 _ms(r["grid-sample ms"]), f"{r['grid-sample ms'] / r['msda ms']:.1f}x",
                 f"{r['msda ms'] / r['msda atomic ms']:.2f}x", f"{gbs:.0f}",
                 "n/a" if peak is None else f"{100 * gbs / peak:.0f}%",
                 f"{r['rel error']:.1e}", f"{r['atomic rel error']:.1e}", "yes" if r["bitwise"] else "NO",
                 *_ddetr_cells(r, ddetr_missing)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_targets(rows):
    """Issue 11's targets per workload, from its float32 rows: msda (its default, deterministic
    backward) against ddetr-cuda. [{workload, pass: {speedup, target, met}} or {workload, why}]."""
    results = []
    for name in dict.fromkeys(r["workload"] for r in rows if r["dtype"] == "f32"):
        by_pass = {r["pass"]: r for r in rows if r["workload"] == name and r["dtype"] == "f32"}
        if any(r["ddetr-cuda ms"] is None for r in by_pass.values()):
            results.append({"workload": name, "why": "ddetr-cuda not measured"})
            continue
        worst = max(r["ddetr-cuda rel error"] for r in by_pass.values())
        if not worst < DDETR_TRUSTED:
            results.append({"workload": name, "why": f"ddetr-cuda's results are wrong (rel error {worst:.1e})"})
            continue
        result = {"workload": name}
        for pass_name, target in TARGETS.items():
            speedup = by_pass[pass_name]["ddetr-cuda ms"] / by_pass[pass_name]["msda ms"]
            result[pass_name] = {"speedup": speedup, "target": target, "met": speedup >= target}
        results.append(result)
    return results


def format_targets(targets, ddetr_missing):
    if not targets:
        return "issue 11's targets: not evaluated (no f32 rows)"
    if ddetr_missing:
        return f"issue 11's targets (msda vs ddetr-cuda on f32): n/a, ddetr-cuda {ddetr_missing}"
    lines = [f"issue 11's targets on f32, msda (deterministic backward, the default) vs ddetr-cuda: "
             f"forward >= {TARGETS['forward']:g}x, forward+backward >= {TARGETS['forward+backward']:g}x"]
    for t in targets:
        if "why" in t:
            lines.append(f"  {t['workload']}: n/a, {t['why']}")
        else:
            lines.append(f"  {t['workload']}: " + ", ".join(
                f"{p} {t[p]['speedup']:.2f}x {'met' if t[p]['met'] else 'NOT met'}" for p in TARGETS))
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
    ddetr, ddetr_missing = load_ddetr()
    info["ddetr_cuda"] = ddetr.__file__ if ddetr else ddetr_missing
    print(f"gpu_bench: {info['gpu']} ({info['multiprocessors']} SMs, {info['memory_GiB']} GiB, peak "
          + (f"{peak:.0f} GB/s from {peak_source}" if peak else f"n/a: {peak_source}")
          + f"), torch {info['torch']}, CUDA {info['cuda']}, msda {info['msda']}; medians of up to {args.repeats} "
          f"calls (CUDA events) after {args.warmup} warm-up", flush=True)
    for name, how in TIMING.items():
        print(f"gpu_bench: {name} timed as {how}", flush=True)
    if ddetr:
        print(f"gpu_bench: ddetr-cuda (the baseline of issue 11's targets) from {ddetr.__file__}", flush=True)
    else:
        print(f"gpu_bench: ddetr-cuda, Deformable DETR's CUDA kernel (the baseline of issue 11's targets), "
              f"{ddetr_missing}: its columns say n/a; to measure it, {DDETR_HOWTO}", flush=True)

    started = time.perf_counter()
    rows = []
    for w in args.workload_list:
        for dtype in args.dtype_list:
            p = Problem(w, dtype, args.seed, device, ddetr)
            rows += measure(p, args)
            del p
            free_memory()
            print(f"  {w.name} {_dtype_name(dtype)}: done at {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    print()
    print(format_table(rows, peak, ddetr_missing))
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s. speedup = grid-sample ms / msda ms; "
          "atomic speedup = msda ms / msda atomic ms (above 1: atomicAdd is faster); rel error = largest of the "
          "output's and the three gradients' against the grid-sample path in float64; bitwise = two deterministic "
          "backward runs gave the same bits; msda vs ddetr = ddetr-cuda ms / msda ms, ddetr rel error its largest "
          "against the same float64 reference (not part of the exit status).")
    targets = evaluate_targets(rows)
    print(format_targets(targets, ddetr_missing))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "timing": TIMING, "arguments": {k: v for k, v in vars(args).items()
                                                      if k not in ("workload_list", "dtype_list")},
                       "rows": rows, "targets": targets}, f, indent=2)
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
