"""Deployment: transformers models exported to ONNX and run in OpenVINO and ONNX Runtime, with
transformers' own export (the grid-sample graph) against msda's (msda.onnx.export: msda's nodes
with msda's OpenVINO extension; portable standard ONNX for ONNX Runtime), and PyTorch eager beside
them (transformers' path, and msda.patch).

For each model, one instance with random weights (examples/hf_models_bench.py builds them: the
published encoder/decoder sizes with a small ResNet backbone), in eval mode, f32, batch 1:
- "transformers export": torch.onnx.export(model, dynamo=True) of the unpatched model;
- "msda export": msda.onnx.export of the model after msda.patch (portable=False for OpenVINO,
  with msda.openvino.extension_path(); portable=True for ONNX Runtime);
each compiled for the CPU with the given thread count (OpenVINO: INFERENCE_NUM_THREADS, f32
inference precision, latency hint; ONNX Runtime: intra_op_num_threads, sequential), then the median
of --repeats runs after one warm-up. Every path's outputs are compared with PyTorch eager's
(max rel diff over logits and boxes; exit status 1 above 1e-3).

    PYTHONPATH=build/python .venv/bin/python bench/deploy_bench.py --models ddetr-2+2 rt-detr
    PYTHONPATH=build/python .venv/bin/python bench/deploy_bench.py --quick     # tiny models, seconds
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import hf_models_bench  # noqa: E402  (the model builders)

import msda  # noqa: E402
from msda.bench import cpu_model  # noqa: E402


def ddetr(layers, size):
    def build(transformers, quick, batch):
        d, heads, queries, ffn, (h, w) = ((32, 2, 10, 32, (64, 80)) if quick else (256, 8, 300, 1024, size))
        config = transformers.DeformableDetrConfig(
            backbone_config=hf_models_bench._resnet(transformers, quick, ["stage2", "stage3", "stage4"]),
            use_pretrained_backbone=False, d_model=d, encoder_attention_heads=heads, decoder_attention_heads=heads,
            encoder_layers=layers, decoder_layers=layers, num_queries=queries, encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn, num_feature_levels=4, encoder_n_points=4, decoder_n_points=4, num_labels=91)
        model = transformers.DeformableDetrForObjectDetection(config)
        summary = f"d {d}, {layers}+{layers} layers, {queries} queries, {h}x{w}"
        return model, dict(pixel_values=hf_models_bench._image(batch, h, w)), summary
    return build


MODELS = {
    "ddetr-6+6": ("Deformable DETR", ddetr(6, (800, 1066))),
    "ddetr-2+2": ("Deformable DETR", ddetr(2, (512, 640))),
    "rt-detr": ("RT-DETR", hf_models_bench.rt_detr),
}


class Wrapped(torch.nn.Module):
    """The model as a function of the pixels, returning (logits, pred_boxes): what is exported."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        return out.logits, out.pred_boxes


def _median(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


def bench_model(key, args, transformers, workdir):
    label, build = MODELS[key]
    torch.manual_seed(0)
    model, inputs, summary = build(transformers, args.quick, 1)
    # transformers' initialisation leaves RT-DETR's query-selection scores tied, and top-k then
    # picks different queries in every runtime: a small perturbation of the weights breaks the ties.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=g))
    model.eval()
    patched = copy.deepcopy(model)
    msda.patch(patched)
    pixels = inputs["pixel_values"]
    reference, msda_model = Wrapped(model).eval(), Wrapped(patched).eval()
    with torch.no_grad():
        expected = reference(pixels)
    rows = []

    def add(runtime, export, seconds, outputs):
        diff = max(_rel(o, e) for o, e in zip(outputs, expected))
        rows.append((label, summary, runtime, export, seconds, diff))
        print(f"{label}: {runtime}, {export}: {seconds * 1e3:.0f} ms (max rel diff {diff:.1e})", file=sys.stderr)

    with torch.no_grad():
        for export, module in (("transformers", reference), ("msda.patch", msda_model)):
            add("PyTorch eager", export, _median(lambda: module(pixels), args.repeats), module(pixels))

    files = {}
    started = time.perf_counter()
    files["transformers"] = os.path.join(workdir, f"{key}-transformers.onnx")
    torch.onnx.export(reference, (pixels,), files["transformers"], dynamo=True, opset_version=18,
                      external_data=False)
    files["msda"] = os.path.join(workdir, f"{key}-msda.onnx")
    msda.onnx.export(msda_model, (pixels,), files["msda"], external_data=False)
    files["msda portable"] = os.path.join(workdir, f"{key}-msda-portable.onnx")
    msda.onnx.export(msda_model, (pixels,), files["msda portable"], portable=True, external_data=False)
    print(f"{label}: exported in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    import openvino as ov
    core = ov.Core()
    core.add_extension(msda.openvino.extension_path())
    config = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    feed = pixels.numpy()
    for export in ("transformers", "msda"):
        compiled = core.compile_model(core.read_model(files[export]), "CPU", config)
        request = compiled.create_infer_request()
        run = lambda: request.infer({0: feed})  # noqa: E731
        seconds = _median(run, args.repeats)
        results = request.infer({0: feed})
        add("OpenVINO", f"{export} export", seconds, [results[compiled.output(i)] for i in range(2)])

    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for export, path in (("transformers export", files["transformers"]), ("msda export (portable)", files["msda portable"])):
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        run = lambda: session.run(None, {name: feed})  # noqa: E731
        seconds = _median(run, args.repeats)
        add("ONNX Runtime", export, seconds, run()[:2])
    return rows


def format_table(rows):
    lines = ["| model | config | runtime | export | ms | vs transformers' | max rel diff |",
             "|---|---|---|---|---:|---:|---:|"]
    baseline = {}
    for label, summary, runtime, export, seconds, diff in rows:
        key = (label, summary, runtime)
        baseline.setdefault(key, seconds)
        lines.append(f"| {label} | {summary} | {runtime} | {export} | {seconds * 1e3:.0f} | "
                     f"{baseline[key] / seconds:.2f}x | {diff:.0e} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="deploy_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["ddetr-2+2", "rt-detr"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 repeat: a smoke test of seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    try:
        import onnxruntime  # noqa: F401
        import openvino  # noqa: F401
        import transformers
        import msda.onnx  # noqa: F401
        import msda.openvino
        msda.openvino.extension_path()
    except (ImportError, FileNotFoundError) as e:
        print(f"deploy_bench.py: needs transformers, onnx, onnxruntime, openvino and msda's extension ({e})",
              file=sys.stderr)
        return 77
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, openvino {openvino.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, f32, batch 1, median of {args.repeats}"
          + (" (--quick: tiny models)" if args.quick else ""))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for key in args.models:
            rows += bench_model(key, args, transformers, workdir)
    print()
    print(format_table(rows))
    bad = sorted({f"{r[0]} {r[2]} {r[3]}" for r in rows if not r[5] <= 1e-3})
    if bad:
        print(f"deploy_bench.py: outputs differ from PyTorch eager beyond 1e-3: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
