"""python -m msda.bench: msda against the grid-sample path (and transformers' kernel) on SPEC's workloads.

For every workload: forward and forward+backward of msda.ms_deform_attn, of
msda.ms_deform_attn_pytorch (the grid-sample formulation) and, where transformers (>= 4.50) is
importable, of transformers' own pure-PyTorch kernel: the forward of
transformers.models.deformable_detr.modeling_deformable_detr.MultiScaleDeformableAttention, which
Deformable DETR, RT-DETR, Grounding DINO and OmDet-Turbo run on the CPU (its columns are absent
without transformers). It gets the same inputs, plus the list of (H, W) that transformers' models
compute once per forward and pass beside spatial_shapes; with a bfloat16/float16 value its
locations and weights are cast to the value's dtype first, as they are in a model converted with
.to(dtype) (its grid_sample takes a single dtype). With torch 2.15 its bfloat16 output has NaNs on
the CPU (grid_sample of a non-contiguous bfloat16 input, which is what its per-level views are):
its error column then says inf.

Before timing, each path's output and three gradients are checked against the grid-sample path in
float64 on the same inputs (the error columns: the largest relative error, SPEC's bound is 1e-5 for
float32 and 1e-2 for bfloat16/float16; the exit status is 1 if msda breaks it). Then each is timed
(median of --repeats). Columns: median ms, msda's speedup over each baseline, effective GB/s (the
bytes the operation must read and write: inputs, outputs, gradients, divided by the time) and peak
extra MB (the resident memory a call adds, outputs included; Linux). Prints one table and writes
the figures as JSON and CSV (one row per workload, pass and path) and a PNG chart into --out.
"""
import argparse
import csv
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from .functional import ms_deform_attn, ms_deform_attn_pytorch
from .workloads import LOCATION_KINDS, NAMED, find, generate, parse_shape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
QUICK_WORKLOADS = ("rtdetr-dec", "ddetr-dec")


def _v2_options(w):
    """The keywords of the v2 attention for workload w (none for the plain op's workloads)."""
    return {"points": w.level_points, "sampling": w.sampling} if w.v2 else {}


def _msda(w, value, shapes, starts, loc, weights):
    return ms_deform_attn(value, shapes, starts, loc, weights, **_v2_options(w))


def _grid_sample(w, value, shapes, starts, loc, weights):
    return ms_deform_attn_pytorch(value, shapes, loc, weights, **_v2_options(w))


PATHS = {"msda": _msda, "grid-sample": _grid_sample}
BASELINES = ("grid-sample", "transformers")


class _TransformersKernel:
    """transformers' MultiScaleDeformableAttention module, called as its models call it, or for the
    v2 workloads its multi_scale_deformable_attention_v2 (RT-DETRv2, D-FINE, DEIM), where that
    exists."""

    def __init__(self, module, v2_function=None):
        self.module, self.v2_function = module, v2_function
        self.shapes, self.shapes_list = None, None

    def supports(self, w):
        return not w.v2 or self.v2_function is not None

    def __call__(self, w, value, shapes, starts, loc, weights):
        # transformers' models build this list once per forward, outside the kernel.
        if shapes is not self.shapes:
            self.shapes, self.shapes_list = shapes, [tuple(hw) for hw in shapes.tolist()]
        if value.dtype in (torch.bfloat16, torch.float16):
            loc, weights = loc.to(value.dtype), weights.to(value.dtype)
        if w.v2:
            method = "discrete" if w.sampling == "discrete" else "default"
            return self.v2_function(value, self.shapes_list, loc, weights, w.level_points, method)
        return self.module(value, shapes, self.shapes_list, starts, loc, weights, 64)


def available_paths():
    """msda and the grid-sample path, and transformers' kernel where transformers has one."""
    paths = dict(PATHS)
    try:
        from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention
    except Exception:  # noqa: BLE001 (not installed, too old to have the module, or broken)
        return paths
    try:
        from transformers.models.rt_detr_v2.modeling_rt_detr_v2 import multi_scale_deformable_attention_v2
    except Exception:  # noqa: BLE001 (a release before RT-DETRv2)
        multi_scale_deformable_attention_v2 = None
    paths["transformers"] = _TransformersKernel(MultiScaleDeformableAttention(), multi_scale_deformable_attention_v2)
    return paths


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total):
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()

    def step(self, label):
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


def _peak_rss_reset():
    """Resets the kernel's peak-RSS mark of this process; returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kb("VmRSS") * 1024


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _release_free_memory():
    """Returns the allocator's cached free memory to the system, so that what a call allocates
    shows up as new resident memory instead of silently reusing pages of an earlier call."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_extra_bytes(fn):
    """Peak resident memory fn() adds above what was resident before it (Linux only)."""
    _release_free_memory()
    base = _peak_rss_reset()
    if base is None:
        return None
    fn()
    return max(0, _status_kb("VmHWM") * 1024 - base)


def _median_seconds(fn, repeats, budget_s):
    fn()  # warm-up
    times, spent = [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
        if spent > budget_s and len(times) >= 1:
            break
    return statistics.median(times), len(times)


def _relative_error(got, want):
    if got is None or want is None:  # a gradient that does not exist (discrete sampling's locations)
        return 0.0 if got is None and want is None else math.inf
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return math.inf
    norm = want.norm().item()
    diff = (got - want).norm().item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _supports(path, w):
    return getattr(path, "supports", lambda _: True)(w)


def _tensor_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def run_workload(w, args, dtype, progress, paths=PATHS):
    """Measures one workload; returns a list of result rows (one per pass and path)."""
    value, shapes, starts, loc, weights = generate(w, args.locations, dtype, seed=args.seed)
    kind = args.locations or w.locations
    paths = {name: path for name, path in paths.items() if _supports(path, w)}
    torch.manual_seed(args.seed)
    grad = torch.randn(w.batch, w.num_queries, w.heads * w.channels).to(dtype)

    # Agreement first: each path's output and three gradients against the grid-sample path in
    # float64 on the same (already rounded) inputs, which computes the same exact coordinates.
    def run(path, *inputs, g=grad):
        v, l, a = (t.detach().clone().requires_grad_() for t in inputs)
        out = path(w, v, shapes, starts, l, a)
        out.backward(g)
        return out.detach(), v.grad, l.grad, a.grad

    reference = run(_grid_sample, value.double(), loc.double(), weights.double(), g=grad.double())
    errors = {name: [_relative_error(x, y) for x, y in zip(run(path, value, loc, weights), reference)]
              for name, path in paths.items()}
    progress.step(f"{w.name}: checked")

    out_bytes = w.batch * w.num_queries * w.heads * w.channels * value.element_size()
    fwd_bytes = _tensor_bytes(value, loc, weights) + out_bytes
    bwd_bytes = fwd_bytes + out_bytes + _tensor_bytes(value, loc, weights)  # + grad_output, the grads

    rows = []
    for pass_name in ("forward", "forward+backward"):
        for name, path in paths.items():
            if pass_name == "forward":
                def fn(path=path):
                    with torch.no_grad():
                        path(w, value, shapes, starts, loc, weights)
                moved = fwd_bytes
            else:
                v, l, a = (t.detach().clone().requires_grad_() for t in (value, loc, weights))

                def fn(path=path, v=v, l=l, a=a):
                    v.grad = l.grad = a.grad = None
                    path(w, v, shapes, starts, l, a).backward(grad)
                moved = bwd_bytes
            seconds, count = _median_seconds(fn, args.repeats, args.budget)
            memory = None if args.no_memory else _peak_extra_bytes(fn)
            rows.append({
                "workload": w.name, "model": w.model, "shape": w.describe(), "locations": kind,
                "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                "pass": pass_name, "path": name, "median_ms": seconds * 1e3, "repeats": count,
                "effective_GBps": moved / seconds / 1e9, "peak_extra_MB": None if memory is None else memory / 2**20,
                "max_rel_error": max(errors[name]),
                "rel_errors": dict(zip(("output", "grad_value", "grad_sampling_locations", "grad_attention_weights"),
                                       errors[name])),
            })
            progress.step(f"{w.name}: {pass_name} {name}")
    return rows


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), for every benchmark's header line."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _machine():
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def format_table(rows):
    """One line per workload and pass; the transformers columns only when some row has them."""
    groups = {}
    for r in rows:
        groups.setdefault((r["workload"], r["locations"], r["pass"]), {})[r["path"]] = r
    baselines = [b for b in BASELINES if any(b in g for g in groups.values())]
    fmt_mb = lambda x: "n/a" if x is None else f"{x:.1f}"
    head = ["workload", "locations", "pass", "msda ms"]
    for b in baselines:
        head += [f"{b} ms", "speedup" if b == "grid-sample" else f"speedup vs {b}"]
    head += ["msda GB/s", "msda peak MB"] + [f"{b} peak MB" for b in baselines]
    head += ["msda rel err"] + [f"{b} rel err" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for (workload, locations, pass_name), g in groups.items():
        m = g["msda"]
        cells = [workload, locations, pass_name, f"{m['median_ms']:.2f}"]
        for b in baselines:
            cells += ([f"{g[b]['median_ms']:.1f}", f"{g[b]['median_ms'] / m['median_ms']:.1f}x"] if b in g
                      else ["n/a", "n/a"])
        cells += [f"{m['effective_GBps']:.1f}", fmt_mb(m["peak_extra_MB"])]
        cells += [fmt_mb(g[b]["peak_extra_MB"]) if b in g else "n/a" for b in baselines]
        cells += [f"{m['max_rel_error']:.1e}"] + [f"{g[b]['max_rel_error']:.1e}" if b in g else "n/a"
                                                   for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(rows, machine, args, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "bench.json"), "w") as f:
        json.dump({"machine": machine, "arguments": vars(args), "results": rows}, f, indent=2)
    with open(os.path.join(directory, "bench.csv"), "w", newline="") as f:
        fields = [k for k in rows[0] if k != "rel_errors"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if not args.no_chart:
        write_chart(rows, machine, os.path.join(directory, "bench.png"))


def write_chart(rows, machine, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, pass_name in zip(axes, ("forward", "forward+backward")):
        xs = range(len(workloads))
        paths = [p for p in ("msda", "grid-sample", "transformers") if any(r["path"] == p for r in rows)]
        times = {p: [next(r["median_ms"] for r in rows if r["workload"] == w and r["pass"] == pass_name
                          and r["path"] == p) for w in workloads] for p in paths}
        width = 0.8 / len(paths)
        styles = {"msda": ("msda", "#1f77b4"), "grid-sample": ("grid-sample (PyTorch)", "#bbbbbb"),
                  "transformers": ("transformers' kernel", "#ff7f0e")}
        for i, p in enumerate(paths):
            offset = (i - (len(paths) - 1) / 2) * width
            ax.bar([x + offset for x in xs], times[p], width, label=styles[p][0], color=styles[p][1])
            if p != "msda":  # msda's speedup over this baseline, above its bar
                for x, t, m in zip(xs, times[p], times["msda"]):
                    ax.text(x + offset, t * 1.15, f"{t / m:.0f}x", ha="center", fontsize=8)
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(workloads, rotation=30, ha="right")
        ax.set_ylabel("median time (ms, log scale)")
        ax.set_title(pass_name)
    r0 = rows[0]
    baselines = " and transformers" if any(r["path"] == "transformers" for r in rows) else ""
    fig.suptitle(f"msda vs grid-sample{baselines}, {r0['dtype']}, {r0['threads']} threads, {machine['cpu']}",
                 fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    # A line of its own under the title, above the bars, not over them.
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.89))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m msda.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="workloads: " + ", ".join(f"{w.name} ({w.model})" for w in NAMED) +
               "\n\nexamples:\n  .venv/bin/python -m msda.bench --quick\n"
               "  .venv/bin/python -m msda.bench --workloads ddetr-enc bev-sca --dtype bfloat16 --threads 2\n"
               "  .venv/bin/python -m msda.bench --shape 'N=2,Q=1000,M=8,D=64,P=4,levels=64x64+32x32,"
               "locations=random'")
    parser.add_argument("--workloads", nargs="+", metavar="NAME", help="named workloads to run (default: all)")
    parser.add_argument("--shape", action="append", default=[], metavar="SPEC",
                        help="a custom workload 'N=..,Q=..,M=..,D=..,P=..,levels=HxW+HxW,locations=KIND' "
                             "(repeatable); Q defaults to S (an encoder)")
    parser.add_argument("--json", metavar="FILE", help="a JSON list of custom workloads, each a SPEC string as for "
                                                       "--shape or an object with the same keys")
    parser.add_argument("--locations", choices=LOCATION_KINDS, help="override every workload's location kind")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="value dtype; locations and weights stay float32 (float64 for float64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for both paths")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--budget", type=float, default=15.0,
                        help="seconds after which a measurement stops repeating (at least one run)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a run of seconds: {', '.join(QUICK_WORKLOADS)} only, 2 repeats")
    parser.add_argument("--out", default="msda-bench", help="directory for bench.json, bench.csv, bench.png")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    if args.repeats < 1:
        parser.error(f"--repeats: expected >= 1, got {args.repeats}")
    return args


def select_workloads(args):
    workloads = []
    try:
        if args.quick:
            workloads = [find(name) for name in (args.workloads or QUICK_WORKLOADS)]
        elif args.workloads or not (args.shape or args.json):
            workloads = [find(name) for name in args.workloads] if args.workloads else list(NAMED)
        workloads += [parse_shape(s) for s in args.shape]
        if args.json:
            with open(args.json) as f:
                for item in json.load(f):
                    if isinstance(item, dict):
                        item = ",".join(f"{k}={v}" for k, v in item.items())
                    workloads.append(parse_shape(item))
    except (ValueError, OSError) as e:
        raise SystemExit(f"msda.bench: {e}")
    return workloads


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    workloads = select_workloads(args)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    machine = _machine()
    paths = available_paths()
    if "transformers" in paths:
        import transformers
        machine["transformers"] = transformers.__version__
    print(f"msda.bench: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"{args.threads} threads, value {args.dtype}, median of up to {args.repeats}; baselines: "
          + ", ".join(p if p != "transformers" else f"transformers {machine['transformers']}" for p in paths if p != "msda"))
    progress = Progress(sum(1 + 2 * sum(_supports(p, w) for p in paths.values()) for w in workloads))
    rows = []
    for w in workloads:
        rows += run_workload(w, args, dtype, progress, paths)
    progress.close()
    print()
    print(format_table(rows))
    write_outputs(rows, machine, args, args.out)
    print(f"\nwrote {os.path.join(args.out, 'bench.json')}, bench.csv" + ("" if args.no_chart else ", bench.png"))
    bound = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    bad = [r for r in rows if r["path"] == "msda" and not r["max_rel_error"] < bound]
    if bad:
        print(f"msda.bench: msda disagrees with the float64 reference beyond SPEC's {bound:g}: "
              + ", ".join(sorted({r['workload'] for r in bad})), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
